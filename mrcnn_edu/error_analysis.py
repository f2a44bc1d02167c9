"""Taught in: ``notebooks/09_case_study_oil_tanks.ipynb`` (error analysis): what a detector gets wrong, and why.

Shape shorthand used in this module:
    D  predictions of one image and one category
    G  ground-truth objects of one image and one category (crowd regions included)
    H, W  image height and width
    h, w  a crop around one error (for the gallery)

COCO's AP (:mod:`mrcnn_edu.evaluation`) is one number over all score thresholds. A user of the
detector picks *one* threshold, and then wants to know what is left: which tanks are missed,
which detections are wrong, and how good the masks of the right ones are. :func:`analyse`
answers that for a COCO ground truth and a COCO results list (synthetic tiles, Airbus tiles or
whole scenes alike):

1. **Matching**, once, over all predictions: per image and category, the IoU of every
   prediction with every ground truth (masks as RLE with ``pycocotools.mask.iou``, which equals
   :func:`mrcnn_edu.evaluation.mask_iou` without decoding whole scenes; boxes with
   :func:`mrcnn_edu.evaluation.box_iou_xywh`), then :func:`mrcnn_edu.evaluation.match_detections`:
   COCO's greedy matching, best score first, crowd regions ignored. Because the matching is
   greedy by score, the matching of the predictions with ``score >= s`` is the first part of it,
   for every ``s``: one matching serves every score threshold (:func:`threshold_sweep`).
2. **Counts** at the score threshold ``s``: a *true positive* (TP) is a prediction with score
   ``>= s`` matched to a ground truth (IoU ``>= iou_threshold``); a *false positive* (FP) one
   that matched nothing; a *false negative* (FN) a ground truth no such prediction matched.
   ``precision = TP / (TP + FP)`` (nan without predictions), ``recall = TP / (TP + FN)`` (nan
   without ground truth), ``F1 = 2 TP / (2 TP + FP + FN)``.
3. **Why** each error happened. A false positive is a *duplicate* (IoU ``>= iou_threshold``
   with a ground truth another, better-scored prediction had already taken), a *localisation*
   error (best IoU with a ground truth in ``[localisation_iou, iou_threshold)``), or
   *background* (overlaps no ground truth: a pond, a roundabout, a round roof). A false negative
   had a *low score* (a prediction matched it, but scored below ``s``: the threshold threw it
   away), a *localisation* error (a kept prediction overlaps it with IoU ``>= localisation_iou``
   but not enough), or was *missed* outright.
4. **Breakdowns**: recall by object size (the longer side of the ground-truth box, i.e. a
   tank's diameter, in ``size_bins``), by annotation attribute (``roof``, ``truncated``, ... when
   the ground truth carries them) and by category.
5. **Mask leakage**, the original case study's main complaint ("masks leak beyond the tank").
   For every true positive with a predicted mask ``P`` and a true mask ``G`` (pixel sets):

   * ``leak_area = |P \\ G|``, predicted pixels outside the true mask, and
     ``leak_fraction = |P \\ G| / |P|``, the share of the predicted mask that is not tank;
   * ``missed_area = |G \\ P|`` and ``under_coverage = |G \\ P| / |G|``, the converse: the share
     of the tank the mask does not cover;
   * ``leak_width = leak_area / (2 sqrt(pi |G|))``: the leak spread along the outline of a disc
     of the tank's area, i.e. by how many pixels the mask spills beyond the edge on average (a
     1-pixel halo around a disc of radius ``r`` gives about 1, whatever ``r``; the fraction of
     that halo is about ``2 / r``, large for small tanks).

   :attr:`ErrorReport.leakage` summarises them over the matched pairs: mean, median, 90th
   percentile (``numpy.percentile``, linear interpolation) and, for the fractions, the pooled
   value (total leak / total predicted pixels, which weighs big tanks more).

:func:`threshold_sweep` gives precision, recall and F1 at many score thresholds, showing what
the original's minimum score of 0.99 costs in recall. :func:`plot_recall_by_size`,
:func:`plot_threshold_sweep`, :func:`plot_leakage` and :func:`error_gallery` draw the results;
:meth:`ErrorReport.to_dict` (JSON, for ``metrics.json``) and :meth:`ErrorReport.summary_table`
(text) report them.

One difference from COCO's AP on purpose: by default every prediction is matched
(``max_det=None``), not only the 100 best of each image; a 2560 x 2560 scene holds hundreds of
tanks. With at most 100 predictions per image and category (or ``max_det=100``), the true
positives, false positives and misses are exactly those of
:func:`mrcnn_edu.evaluation.find_errors` on the predictions above the threshold
(``tests/test_error_analysis.py``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from mrcnn_edu import evaluation
from mrcnn_edu.utils import UserError

DEFAULT_SIZE_BINS = (0.0, 16.0, 24.0, 32.0, 48.0, 64.0, math.inf)
"""Edges of the object-size bins in pixels (the longer side of the box, a tank's diameter)."""
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99,)
"""Score thresholds of :func:`threshold_sweep`: 0.05, 0.10, ..., 0.95 and the original's 0.99."""
ORIGINAL_THRESHOLD = 0.99
"""The minimum detection score the original case study used at inference."""
FP_REASONS = ("background", "localisation", "duplicate")
FN_REASONS = ("missed", "localisation", "low_score")
_STANDARD_ANNOTATION_KEYS = {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
_STANDARD_IMAGE_KEYS = {"id", "file_name", "height", "width", "license", "flickr_url", "coco_url", "date_captured"}
_MAX_CATEGORICAL_VALUES = 20  # attributes with more distinct values are not broken down automatically

# colours of the gallery (and their legend)
_GT_COLOUR = "#00e5ff"  # ground truth outlines
_PRED_COLOUR = "#ff9f1c"  # other predictions above the threshold
_ERROR_COLOUR = "#ff1744"  # the false positive itself
_MISS_COLOUR = "#ffee00"  # the missed ground truth itself


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass(repr=False)
class ErrorReport:
    """Everything :func:`analyse` found, at one IoU and one score threshold.

    Attributes:
        iou_type (str): ``"segm"`` (mask IoU) or ``"bbox"`` (box IoU) decided the matches.
        iou_threshold, score_threshold (float): a match needs IoU ``>=`` the first; predictions
            count when their score is ``>=`` the second.
        size_bins (tuple of float): the bin edges of :attr:`by_size` (pixels).
        num_images (int): images in the ground truth.
        num_gt (int): ground-truth objects that count (crowd regions and unknown categories not).
        num_predictions (int): predictions of known categories, any score.
        num_kept (int): predictions with score ``>= score_threshold`` (TP + FP + ignored).
        tp, fp, fn, ignored (int): counts at the threshold; ``ignored`` predictions matched a
            crowd region (neither TP nor FP, as in COCO).
        precision, recall, f1 (float): see the module docstring (nan where undefined).
        by_size (list of dict): one row per size bin: ``bin`` (label), ``lo``, ``hi``, ``n``
            (ground truths), ``found`` (TPs), ``recall``, ``predictions`` and ``fp`` (kept
            predictions whose *own* box falls in the bin, crowd matches left out) and ``precision``, ``leak_fraction``
            (mean over the bin's matched pairs).
        by_attribute (dict): attribute name -> rows ``{"value", "n", "found", "recall"}``;
            image attributes are named ``"image.<name>"``.
        by_category (list of dict): ``category_id``, ``name``, ``n``, ``tp``, ``fp``, ``fn``,
            ``precision``, ``recall``.
        leakage (dict): summary of :attr:`matches` (module docstring), ``{"n": 0}`` without masks.
        matches (list of dict): one per true positive: ``image_id``, ``result_index`` (position
            in ``results``), ``annotation_index`` (in ``coco_gt["annotations"]``), ``category_id``,
            ``score``, ``iou``, ``size``, and with masks ``pred_area``, ``gt_area``,
            ``leak_area``, ``leak_fraction``, ``missed_area``, ``under_coverage``, ``leak_width``.
        false_positives (list of dict): ``image_id``, ``result_index``, ``category_id``,
            ``score``, ``bbox`` (x, y, w, h), ``size``, ``best_iou`` (with any ground truth of the
            category), ``reason`` (:data:`FP_REASONS`); best score first.
        false_negatives (list of dict): ``image_id``, ``annotation_index``, ``category_id``,
            ``bbox``, ``size``, ``area``, ``attributes`` (the annotation's extra fields),
            ``best_iou`` (with a kept prediction), ``matched_score`` (score of the prediction
            below the threshold that matched it, or None), ``reason`` (:data:`FN_REASONS`);
            largest first.
        fp_reasons, fn_reasons (dict): reason -> count.
        sweep (list of dict): :func:`threshold_sweep` rows at :data:`DEFAULT_THRESHOLDS` and the
            score threshold.
        threshold_cost (dict): recall and misses at ``score_threshold`` and at the original's
            0.99, and the difference.
    """

    iou_type: str
    iou_threshold: float
    score_threshold: float
    size_bins: tuple[float, ...]
    num_images: int
    num_gt: int
    num_predictions: int
    num_kept: int
    tp: int
    fp: int
    fn: int
    ignored: int
    precision: float
    recall: float
    f1: float
    by_size: list[dict]
    by_attribute: dict[str, list[dict]]
    by_category: list[dict]
    leakage: dict
    matches: list[dict]
    false_positives: list[dict]
    false_negatives: list[dict]
    fp_reasons: dict[str, int]
    fn_reasons: dict[str, int]
    sweep: list[dict]
    threshold_cost: dict
    _matching: _Matching | None = field(repr=False, compare=False, default=None)
    _coco_gt: Mapping | None = field(repr=False, compare=False, default=None)  # for the gallery's masks
    _results: Sequence[Mapping] | None = field(repr=False, compare=False, default=None)

    def __repr__(self) -> str:
        return (f"ErrorReport({self.iou_type}, IoU>={self.iou_threshold:g}, score>={self.score_threshold:g}: "
                f"TP={self.tp} FP={self.fp} FN={self.fn}, precision={self.precision:.3f} "
                f"recall={self.recall:.3f} F1={self.f1:.3f})")

    def threshold_sweep(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
        """:func:`threshold_sweep` rows from this report's matching (no new matching needed)."""
        return self._matching.sweep(thresholds)

    def to_dict(self, max_errors: int = 0) -> dict:
        """A JSON-serialisable summary (nan and infinity become ``None``).

        Args:
            max_errors (int): also list up to this many false positives and false negatives
                (without masks); 0 keeps only their counts and reasons.
        """
        summary = {
            "iou_type": self.iou_type, "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold, "size_bins": list(self.size_bins),
            "num_images": self.num_images, "num_gt": self.num_gt, "num_predictions": self.num_predictions,
            "num_kept": self.num_kept, "tp": self.tp, "fp": self.fp, "fn": self.fn, "ignored": self.ignored,
            "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "fp_reasons": dict(self.fp_reasons), "fn_reasons": dict(self.fn_reasons),
            "by_size": self.by_size, "by_attribute": self.by_attribute, "by_category": self.by_category,
            "leakage": self.leakage, "threshold_cost": self.threshold_cost, "sweep": self.sweep,
        }
        if max_errors > 0:
            summary["false_positives"] = self.false_positives[:max_errors]
            summary["false_negatives"] = self.false_negatives[:max_errors]
        return _jsonable(summary)

    def summary_table(self) -> str:
        """The report as text: counts, reasons, recall by size and attribute, leakage, 0.99's cost."""
        ignored = f"  ignored {self.ignored}" if self.ignored else ""
        lines = [(f"Error analysis ({self.iou_type}): IoU >= {self.iou_threshold:.2f}, score >= "
                  f"{self.score_threshold:.2f}, {self.num_images} images"),
                 (f"  ground truth {self.num_gt}, predictions {self.num_predictions} "
                  f"({self.num_kept} kept at score >= {self.score_threshold:.2f})"),
                 (f"  TP {self.tp}  FP {self.fp}  FN {self.fn}{ignored}   precision {_fmt(self.precision)}  "
                  f"recall {_fmt(self.recall)}  F1 {_fmt(self.f1)}")]
        if self.fp:
            lines.append("  false positives: " + ", ".join(f"{n} {r}" for r, n in self.fp_reasons.items() if n))
        if self.fn:
            lines.append("  false negatives: " + ", ".join(f"{n} {r.replace('_', ' ')}"
                                                           for r, n in self.fn_reasons.items() if n))
        lines += ["", "Recall by size (longer side of the box, pixels)",
                  f"  {'size':<8}{'n':>6}{'found':>7}{'recall':>8}{'kept':>7}{'FP':>5}{'precision':>10}{'leak':>7}"]
        for row in self.by_size:
            lines.append(f"  {row['bin']:<8}{row['n']:>6}{row['found']:>7}{_fmt(row['recall']):>8}"
                         f"{row['predictions']:>7}{row['fp']:>5}{_fmt(row['precision']):>10}"
                         f"{_fmt(row['leak_fraction']):>7}")
        for name, rows in self.by_attribute.items():
            lines += ["", f"Recall by {name}", f"  {'value':<14}{'n':>6}{'found':>7}{'recall':>8}"]
            lines += [f"  {r['value']!s:<14}{r['n']:>6}{r['found']:>7}{_fmt(r['recall']):>8}" for r in rows]
        if len(self.by_category) > 1:
            lines += ["", "By category",
                      f"  {'category':<18}{'n':>6}{'TP':>6}{'FP':>6}{'FN':>6}{'precision':>10}{'recall':>8}"]
            lines += [f"  {r['name']!s:<18}{r['n']:>6}{r['tp']:>6}{r['fp']:>6}{r['fn']:>6}"
                      f"{_fmt(r['precision']):>10}{_fmt(r['recall']):>8}" for r in self.by_category]
        lines.append("")
        if self.leakage.get("n", 0):
            lines += [f"Mask leakage ({self.leakage['n']} matched pairs)",
                      f"  {'':<26}{'mean':>8}{'median':>8}{'p90':>8}{'pooled':>8}"]
            for key, label in [("leak_fraction", "leak fraction (P\\G / P)"),
                               ("under_coverage", "under-coverage (G\\P / G)"), ("leak_area", "leak area (px)"),
                               ("missed_area", "missed area (px)"), ("leak_width", "leak width (px)"),
                               ("iou", "mask IoU")]:
                stats, digits = self.leakage[key], 1 if key.endswith("_area") else 3
                lines.append(f"  {label:<26}{_fmt(stats['mean'], digits):>8}{_fmt(stats['median'], digits):>8}"
                             f"{_fmt(stats['p90'], digits):>8}"
                             f"{_fmt(stats['pooled']) if 'pooled' in stats else '':>8}")
        else:
            lines.append("Mask leakage: no matched pair with both masks")
        cost = self.threshold_cost
        if self.num_gt:
            lines += ["", (f"Score threshold: recall {_fmt(cost['recall'])} at {cost['score_threshold']:.2f}, "
                           f"{_fmt(cost['recall_at_original'])} at {cost['original_threshold']:.2f} "
                           f"(the original's): {cost['extra_misses']} more objects missed")]
        return "\n".join(lines)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits if abs(value) < 100 else 1}f}"


def _jsonable(value):
    """Plain JSON types; nan / inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# Step 1: one matching over all predictions
# ----------------------------------------------------------------------------------------------


@dataclass
class _Matching:
    """The greedy matching of every prediction (any score), with what each error analysis needs.

    ``preds``: one dict per prediction of a known category: ``result_index``, ``image_id``,
    ``category_id``, ``score``, ``bbox``, ``size``, ``status`` ("tp", "fp", "ignored"),
    ``annotation_index`` (matched ground truth or None), ``iou`` (of the match), ``best_iou``
    (with any non-crowd ground truth of its category). ``gts``: one dict per ground truth that
    counts: ``annotation_index``, ``image_id``, ``category_id``, ``bbox``, ``size``, ``area``,
    ``attributes``, ``image_attributes``, ``matched_score`` (or None), ``result_index`` of the
    match, ``overlaps`` ([(score, iou)] of every prediction touching it). ``pairs``: leakage
    numbers of each matched pair, by result index.
    """

    iou_type: str
    iou_threshold: float
    num_images: int
    preds: list[dict]
    gts: list[dict]
    pairs: dict[int, dict]
    categories: dict[int, str]

    def counts(self, score_threshold: float) -> tuple[int, int, int, int]:
        """(TP, FP, FN, ignored) when only predictions with score >= ``score_threshold`` count."""
        kept = [p for p in self.preds if p["score"] >= score_threshold]
        tp = sum(p["status"] == "tp" for p in kept)
        fp = sum(p["status"] == "fp" for p in kept)
        return tp, fp, len(self.gts) - tp, len(kept) - tp - fp

    def sweep(self, thresholds: Sequence[float]) -> list[dict]:
        scores = np.array([p["score"] for p in self.preds], dtype=np.float64)
        is_tp = np.array([p["status"] == "tp" for p in self.preds], dtype=bool)
        is_fp = np.array([p["status"] == "fp" for p in self.preds], dtype=bool)
        rows = []
        for threshold in thresholds:
            kept = scores >= float(threshold)
            tp = int(np.sum(kept & is_tp))
            fp = int(np.sum(kept & is_fp))
            rows.append({"threshold": float(threshold), "kept": int(kept.sum()), "tp": tp, "fp": fp,
                         "fn": len(self.gts) - tp, **_prf(tp, fp, len(self.gts) - tp)})
        return rows


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """precision, recall, F1 (nan where the denominator is 0)."""
    nan = float("nan")
    return {"precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan}


def _rle(segmentation, height, width, where: str) -> dict:
    """One pycocotools RLE (counts as bytes) from any COCO segmentation, checked against (H, W)."""
    from mrcnn_edu.data import _segmentation_to_rle

    if height is None or width is None:
        raise UserError(f"{where}: its image has no 'height'/'width' in coco_gt['images'] (needed for masks)")
    try:
        return _segmentation_to_rle(segmentation, int(height), int(width))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def _size(bbox) -> float:
    """The longer side of an (x, y, w, h) box: a tank's diameter."""
    return float(max(bbox[2], bbox[3]))


def _match_all(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str, iou_threshold: float,
               max_det: int | None) -> _Matching:
    """:class:`_Matching` of ``results`` against ``coco_gt`` (per image and category, as COCO)."""
    evaluation._check_iou_type(iou_type)
    images = evaluation._gt_images(coco_gt)
    evaluation._check_results(results, images, iou_type)
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise UserError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if max_det is not None and (not isinstance(max_det, int) or max_det < 1):
        raise UserError(f"max_det must be a positive integer or None, got {max_det!r}")
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in coco_gt.get("categories", [])}
    image_entries = {img["id"]: img for img in coco_gt["images"]}

    gt_by_key: dict[tuple, list[int]] = {}
    for index, ann in enumerate(coco_gt.get("annotations", [])):
        key = (ann["image_id"], int(ann["category_id"]))
        if key[0] in images and key[1] in categories:
            gt_by_key.setdefault(key, []).append(index)
    pred_by_key: dict[tuple, list[int]] = {}
    for index, result in enumerate(results):
        key = (result["image_id"], int(result["category_id"]))
        if key[1] in categories:
            pred_by_key.setdefault(key, []).append(index)

    preds, gts, pairs = [], [], {}
    for key in sorted(set(gt_by_key) | set(pred_by_key), key=lambda k: (k[1], k[0])):
        image_id, category_id = key
        height, width = images[image_id]
        anns = [coco_gt["annotations"][i] for i in gt_by_key.get(key, [])]
        result_indices = pred_by_key.get(key, [])
        scores = np.array([float(results[i]["score"]) for i in result_indices], dtype=np.float64)
        if max_det is not None:  # COCO's limit: only the max_det best predictions
            keep = np.sort(np.argsort(-scores, kind="mergesort")[:max_det])
            result_indices, scores = [result_indices[i] for i in keep], scores[keep]
        dets = [results[i] for i in result_indices]
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        gt_boxes = [evaluation._gt_bbox(a, height, width) for a in anns]
        where_gt = [f"image {image_id}, annotation {a.get('id', '?')}" for a in anns]
        where_dt = [f"image {image_id}, results[{i}]" for i in result_indices]

        # IoU, D x G: masks as RLE (whole scenes are never decoded), or boxes
        gt_rles = dt_rles = None
        if iou_type == "segm" or (anns and dets and all("segmentation" in d for d in dets)
                                  and all(a.get("segmentation") for a in anns)):
            gt_rles = [_rle(a.get("segmentation"), height, width, w) for a, w in zip(anns, where_gt)]
            dt_rles = [_rle(d["segmentation"], height, width, w) for d, w in zip(dets, where_dt)]
        dt_boxes = [[float(v) for v in d["bbox"]] if d.get("bbox") else
                    [float(v) for v in mask_utils.toBbox(r)] for d, r in zip(dets, dt_rles or [None] * len(dets))]
        if not dets or not anns:
            ious = np.zeros((len(dets), len(anns)), dtype=np.float64)
        elif iou_type == "segm":
            ious = np.asarray(mask_utils.iou(dt_rles, gt_rles, crowd.astype(np.uint8).tolist()),
                              dtype=np.float64).reshape(len(dets), len(anns))  # (D, G)
        else:
            ious = evaluation.box_iou_xywh(dt_boxes, gt_boxes, crowd)  # (D, G)

        matches = evaluation.match_detections(ious, scores, iou_threshold, gt_ignore=crowd, gt_iscrowd=crowd)
        real = ~crowd
        for d, result_index in enumerate(result_indices):
            g = int(matches.pred_to_gt[d])
            status = "fp" if g == evaluation.UNMATCHED else ("ignored" if matches.pred_ignored[d] else "tp")
            best = float(ious[d, real].max()) if real.any() else 0.0
            preds.append({"result_index": int(result_index), "image_id": image_id, "category_id": category_id,
                          "score": float(scores[d]), "bbox": dt_boxes[d], "size": _size(dt_boxes[d]),
                          "status": status, "annotation_index": gt_by_key[key][g] if status == "tp" else None,
                          "iou": float(ious[d, g]) if status == "tp" else None, "best_iou": best})
            if status == "tp" and gt_rles is not None:
                pairs[int(result_index)] = _leakage(dt_rles[d], gt_rles[g], float(ious[d, g]))
        image_attributes = {k: v for k, v in image_entries[image_id].items() if k not in _STANDARD_IMAGE_KEYS}
        for g, ann in enumerate(anns):
            if crowd[g]:
                continue
            d = int(matches.gt_to_pred[g])
            touching = np.flatnonzero(ious[:, g] > 0)
            gts.append({"annotation_index": gt_by_key[key][g], "image_id": image_id, "category_id": category_id,
                        "bbox": gt_boxes[g], "size": _size(gt_boxes[g]),
                        "area": evaluation._gt_area(ann, height, width),
                        "attributes": {k: v for k, v in ann.items() if k not in _STANDARD_ANNOTATION_KEYS},
                        "image_attributes": image_attributes,
                        "matched_score": None if d == evaluation.UNMATCHED else float(scores[d]),
                        "result_index": None if d == evaluation.UNMATCHED else int(result_indices[d]),
                        "overlaps": [(float(scores[i]), float(ious[i, g])) for i in touching]})
    return _Matching(iou_type=iou_type, iou_threshold=float(iou_threshold), num_images=len(images), preds=preds,
                     gts=gts, pairs=pairs, categories=categories)


def _leakage(pred_rle: dict, gt_rle: dict, iou: float) -> dict:
    """Leak and under-coverage of one matched pair (pixel counts from the RLEs)."""
    with warnings.catch_warnings():  # pycocotools' compiled code trips a NumPy 2 deprecation warning
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        pred_area, gt_area = (int(a) for a in mask_utils.area([pred_rle, gt_rle]))
        inter = int(mask_utils.area(mask_utils.merge([pred_rle, gt_rle], intersect=True)))
    leak, missed = pred_area - inter, gt_area - inter
    return {"pred_area": pred_area, "gt_area": gt_area, "leak_area": leak,
            "leak_fraction": leak / pred_area if pred_area else float("nan"),
            "missed_area": missed, "under_coverage": missed / gt_area if gt_area else float("nan"),
            "leak_width": leak / (2.0 * math.sqrt(math.pi * gt_area)) if gt_area else float("nan"), "mask_iou": iou}


# ----------------------------------------------------------------------------------------------
# Step 2-5: the analysis at one score threshold
# ----------------------------------------------------------------------------------------------


def analyse(coco_gt: Mapping, results: Sequence[Mapping], iou_threshold: float = 0.5, score_threshold: float = 0.5,
            size_bins: Sequence[float] = DEFAULT_SIZE_BINS, iou_type: str = "segm",
            attributes: Sequence[str] | None = None, attribute_bins: Mapping[str, Sequence[float]] | None = None,
            localisation_iou: float = 0.1, max_det: int | None = None) -> ErrorReport:
    """Errors of ``results`` against ``coco_gt`` at one score threshold (see the module docstring).

    Args:
        coco_gt (dict): COCO ground truth ``{"images", "annotations", "categories"}``
            (``mrcnn_edu.data.DetectionDataset.coco_gt()``, a COCO folder's annotations.json);
            extra annotation fields (``roof``, ``truncated``, ...) and image fields (``biome``)
            give the attribute breakdowns.
        results (list of dict): COCO results ``{"image_id", "category_id", "score", "bbox"
            [x, y, w, h], "segmentation"}`` (``evaluation.results_from_predictions``).
        iou_threshold (float): minimum IoU of a match, in (0, 1].
        score_threshold (float): predictions with ``score >= score_threshold`` count.
        size_bins (sequence of float): increasing bin edges in pixels (longer box side); each bin
            is ``[lo, hi)``, the last one ``[lo, hi]``.
        iou_type (str): ``"segm"`` (mask IoU, needs masks in ``results``) or ``"bbox"``.
            Leakage is measured whenever both masks of a matched pair exist.
        attributes (sequence of str, optional): annotation (or ``"image.<name>"``) attributes to
            break recall down by; default: every attribute whose values are all strings or
            booleans (e.g. ``roof``, ``style``, ``truncated``, ``image.biome``) with at most 20
            distinct values.
        attribute_bins (dict, optional): numeric attributes to break down by bins, e.g.
            ``{"fill": (0, 0.25, 0.5, 0.75, 1)}`` (bins as ``size_bins``).
        localisation_iou (float): the IoU above which an error counts as a localisation error.
        max_det (int, optional): match only each image's ``max_det`` best predictions per
            category (COCO: 100); default all.

    Returns:
        :class:`ErrorReport`.

    Raises:
        UserError: malformed inputs (as :func:`mrcnn_edu.evaluation.evaluate`), bad thresholds
            or bins.
    """
    edges = _check_bins("size_bins", size_bins)
    score_threshold = float(score_threshold)
    if math.isnan(score_threshold):
        raise UserError("score_threshold must be a number, got nan")
    if not 0.0 <= localisation_iou <= 1.0:
        raise UserError(f"localisation_iou must be in [0, 1], got {localisation_iou}")
    matching = _match_all(coco_gt, results, iou_type, iou_threshold, max_det)
    iou_threshold = matching.iou_threshold
    kept = [p for p in matching.preds if p["score"] >= score_threshold]
    tp, fp, fn, ignored = matching.counts(score_threshold)
    found = {p["annotation_index"] for p in kept if p["status"] == "tp"}

    # false positives and their reasons
    false_positives = []
    for p in sorted((p for p in kept if p["status"] == "fp"), key=lambda p: -p["score"]):
        reason = ("duplicate" if p["best_iou"] >= iou_threshold else
                  "localisation" if p["best_iou"] >= localisation_iou else "background")
        false_positives.append({k: p[k] for k in ("image_id", "result_index", "category_id", "score", "bbox",
                                                  "size", "best_iou")} | {"reason": reason})
    # false negatives and their reasons
    false_negatives = []
    for g in sorted((g for g in matching.gts if g["annotation_index"] not in found), key=lambda g: -g["size"]):
        best = max((iou for score, iou in g["overlaps"] if score >= score_threshold), default=0.0)
        reason = ("low_score" if g["matched_score"] is not None else
                  "localisation" if best >= localisation_iou else "missed")
        false_negatives.append({k: g[k] for k in ("image_id", "annotation_index", "category_id", "bbox", "size",
                                                  "area", "attributes", "matched_score")}
                               | {"matched_result_index": g["result_index"], "best_iou": best, "reason": reason})

    # true positives with their leakage
    gt_size = {g["annotation_index"]: g["size"] for g in matching.gts}
    matches = []
    for p in kept:
        if p["status"] == "tp":
            row = {k: p[k] for k in ("image_id", "result_index", "annotation_index", "category_id", "score", "iou")}
            row["size"] = gt_size[p["annotation_index"]]
            row.update({k: v for k, v in matching.pairs.get(p["result_index"], {}).items() if k != "mask_iou"})
            matches.append(row)

    by_size = _by_size(matching, kept, found, matches, edges)
    by_attribute = _by_attribute(matching.gts, found, attributes, attribute_bins)
    by_category = []
    for category_id, name in sorted(matching.categories.items()):
        c_tp = sum(p["status"] == "tp" and p["category_id"] == category_id for p in kept)
        c_fp = sum(p["status"] == "fp" and p["category_id"] == category_id for p in kept)
        c_n = sum(g["category_id"] == category_id for g in matching.gts)
        by_category.append({"category_id": category_id, "name": name, "n": c_n, "tp": c_tp, "fp": c_fp,
                            "fn": c_n - c_tp, **{k: v for k, v in _prf(c_tp, c_fp, c_n - c_tp).items() if k != "f1"}})

    thresholds = sorted(set(DEFAULT_THRESHOLDS) | {score_threshold})
    sweep = matching.sweep(thresholds)
    at = {row["threshold"]: row for row in sweep}
    original = matching.sweep([ORIGINAL_THRESHOLD])[0]
    threshold_cost = {"score_threshold": score_threshold, "recall": at[score_threshold]["recall"],
                      "fn": at[score_threshold]["fn"], "original_threshold": ORIGINAL_THRESHOLD,
                      "recall_at_original": original["recall"], "fn_at_original": original["fn"],
                      "recall_lost": at[score_threshold]["recall"] - original["recall"],
                      "extra_misses": original["fn"] - at[score_threshold]["fn"]}

    return ErrorReport(
        iou_type=iou_type, iou_threshold=iou_threshold, score_threshold=score_threshold, size_bins=tuple(edges),
        num_images=matching.num_images, num_gt=len(matching.gts), num_predictions=len(matching.preds),
        num_kept=len(kept), tp=tp, fp=fp, fn=fn, ignored=ignored, **_prf(tp, fp, fn),
        by_size=by_size, by_attribute=by_attribute, by_category=by_category,
        leakage=_leakage_summary([matching.pairs[m["result_index"]] for m in matches
                                  if m["result_index"] in matching.pairs]),
        matches=matches, false_positives=false_positives, false_negatives=false_negatives,
        fp_reasons={r: sum(e["reason"] == r for e in false_positives) for r in FP_REASONS},
        fn_reasons={r: sum(e["reason"] == r for e in false_negatives) for r in FN_REASONS},
        sweep=sweep, threshold_cost=threshold_cost, _matching=matching, _coco_gt=coco_gt, _results=results)


def _check_bins(name: str, edges: Sequence[float]) -> list[float]:
    """Increasing bin edges (at least two) as floats."""
    try:
        edges = [float(e) for e in edges]
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a sequence of numbers, got {edges!r}") from None
    if len(edges) < 2 or any(math.isnan(e) for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise UserError(f"{name} must be at least two strictly increasing edges, got {edges}")
    return edges


def _bin_index(value: float, edges: Sequence[float]) -> int | None:
    """The bin ``[lo, hi)`` holding ``value`` (the last bin includes ``hi``), or None outside all bins."""
    if value is None or not edges[0] <= value <= edges[-1]:
        return None
    return min(int(np.searchsorted(edges, value, side="right")) - 1, len(edges) - 2)


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}+" if math.isinf(hi) else f"{lo:g}-{hi:g}"


def _by_size(matching: _Matching, kept: list[dict], found: set, matches: list[dict], edges: list[float]) -> list[dict]:
    """Rows of recall (ground truths binned by their size) and precision (predictions by theirs)."""
    rows = []
    for i, (lo, hi) in enumerate(pairwise(edges)):
        gts = [g for g in matching.gts if _bin_index(g["size"], edges) == i]
        preds = [p for p in kept if p["status"] != "ignored" and _bin_index(p["size"], edges) == i]
        hits = sum(g["annotation_index"] in found for g in gts)
        fps = sum(p["status"] == "fp" for p in preds)
        leaks = [m["leak_fraction"] for m in matches if "leak_fraction" in m and _bin_index(m["size"], edges) == i]
        rows.append({"bin": _bin_label(lo, hi), "lo": lo, "hi": hi, "n": len(gts), "found": hits,
                     "recall": hits / len(gts) if gts else float("nan"), "predictions": len(preds), "fp": fps,
                     "precision": (len(preds) - fps) / len(preds) if preds else float("nan"),
                     "leak_fraction": float(np.mean(leaks)) if leaks else float("nan")})
    return rows


def _attribute_value(gt: dict, key: str):
    if key.startswith("image."):
        return gt["image_attributes"].get(key[len("image."):])
    return gt["attributes"].get(key)


def _by_attribute(gts: list[dict], found: set, attributes: Sequence[str] | None,
                  attribute_bins: Mapping[str, Sequence[float]] | None) -> dict[str, list[dict]]:
    """Recall per value of each categorical attribute (and per bin of each binned numeric one)."""
    present = {k for g in gts for k in g["attributes"]} | {f"image.{k}" for g in gts for k in g["image_attributes"]}
    binned = {key: _check_bins(f"attribute_bins[{key!r}]", edges) for key, edges in (attribute_bins or {}).items()}
    if attributes is None:  # automatic: string / boolean attributes with few values
        keys = []
        for key in sorted(present, key=lambda k: (k.startswith("image."), k)):
            values = {_attribute_value(g, key) for g in gts if _attribute_value(g, key) is not None
                      and isinstance(_attribute_value(g, key), (str, bool))}
            non_categorical = any(_attribute_value(g, key) is not None
                                  and not isinstance(_attribute_value(g, key), (str, bool)) for g in gts)
            if values and not non_categorical and len(values) <= _MAX_CATEGORICAL_VALUES and key not in binned:
                keys.append(key)
    else:
        keys = [k for k in attributes if k in present and k not in binned]
    keys += [k for k in binned if k in present]

    table: dict[str, list[dict]] = {}
    for key in keys:
        groups: dict[Any, list[dict]] = {}  # value (or bin index) -> ground truths
        for g in gts:
            value = _attribute_value(g, key)
            if key in binned:
                value = _bin_index(float(value), binned[key]) if isinstance(value, (int, float)) else None
            elif not isinstance(value, (str, bool, int, float, type(None))):
                value = json.dumps(value, sort_keys=True, default=str)
            groups.setdefault(value, []).append(g)
        rows = []
        for value in sorted(groups, key=lambda v: (v is None, v if key in binned else str(v))):
            label = ("n/a" if value is None else
                     _bin_label(binned[key][value], binned[key][value + 1]) if key in binned else value)
            hits = sum(g["annotation_index"] in found for g in groups[value])
            rows.append({"value": label, "n": len(groups[value]), "found": hits,
                         "recall": hits / len(groups[value])})
        table[key] = rows
    return table


def _stats(values: Sequence[float]) -> dict[str, float]:
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not values.size:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan")}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def _leakage_summary(pairs: list[dict]) -> dict:
    """Mean, median, p90 (and pooled or total) of the leakage numbers of the matched pairs."""
    if not pairs:
        return {"n": 0}
    col = {key: [p[key] for p in pairs] for key in pairs[0]}
    total_pred, total_gt = sum(col["pred_area"]), sum(col["gt_area"])
    return {
        "n": len(pairs),
        "leak_fraction": _stats(col["leak_fraction"]) | {"pooled": sum(col["leak_area"]) / total_pred
                                                         if total_pred else float("nan")},
        "under_coverage": _stats(col["under_coverage"]) | {"pooled": sum(col["missed_area"]) / total_gt
                                                           if total_gt else float("nan")},
        "leak_area": _stats(col["leak_area"]) | {"total": int(sum(col["leak_area"]))},
        "missed_area": _stats(col["missed_area"]) | {"total": int(sum(col["missed_area"]))},
        "leak_width": _stats(col["leak_width"]),
        "iou": _stats(col["mask_iou"]),
        "leaking": int(sum(a > 0 for a in col["leak_area"])),
    }


def threshold_sweep(coco_gt: Mapping, results: Sequence[Mapping], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    iou_threshold: float = 0.5, iou_type: str = "segm", max_det: int | None = None) -> list[dict]:
    """Precision, recall and F1 at each score threshold, from one matching.

    Args:
        coco_gt, results, iou_threshold, iou_type, max_det: as :func:`analyse`.
        thresholds (sequence of float): score thresholds (a prediction counts at ``t`` when its
            score is ``>= t``). Default: 0.05, 0.10, ..., 0.95 and the original's 0.99.

    Returns:
        list of dict, one per threshold in the given order: ``threshold``, ``kept`` (predictions
        with score ``>= threshold``), ``tp``, ``fp``, ``fn``, ``precision`` (nan when nothing is
        kept), ``recall`` (nan without ground truth), ``f1``. Recall can only fall as the
        threshold rises: the rows at 0.5 and 0.99 show what the original's threshold cost.
    """
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(math.isnan(t) for t in thresholds):
        raise UserError(f"thresholds must be a non-empty sequence of numbers, got {thresholds}")
    return _match_all(coco_gt, results, iou_type, iou_threshold, max_det).sweep(thresholds)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _figure_axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_recall_by_size(report: ErrorReport, ax=None):
    """Bar chart of recall per size bin, each bar labelled ``found/n``; returns the Figure."""
    fig, ax = _figure_axes(ax, (6.4, 3.6))
    rows = report.by_size
    x = np.arange(len(rows))
    recall = np.array([r["recall"] for r in rows], dtype=np.float64)
    colours = ["#4c78a8" if r["n"] else "#dddddd" for r in rows]
    ax.bar(x, np.nan_to_num(recall), color=colours, width=0.7)
    for i, row in enumerate(rows):
        text = f"{row['found']}/{row['n']}" if row["n"] else "none"
        ax.text(i, (0 if math.isnan(recall[i]) else recall[i]) + 0.02, text, ha="center", va="bottom", fontsize=8,
                color="black" if row["n"] else "grey")
    overall = ""
    if not math.isnan(report.recall):
        ax.axhline(report.recall, color="#e45756", linestyle="--", linewidth=1)
        overall = f"; dashed: all sizes, {report.recall:.2f}"
    ax.set_xticks(x)
    ax.set_xticklabels([r["bin"] for r in rows])
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("object size: longer side of the box (pixels)")
    ax.set_ylabel("recall")
    ax.set_title(f"Recall by size (IoU ≥ {report.iou_threshold:g}, score ≥ {report.score_threshold:g}{overall})",
                 fontsize=10)
    return fig


def plot_threshold_sweep(rows: Sequence[Mapping], mark: Sequence[float] = (0.5, ORIGINAL_THRESHOLD), ax=None):
    """Precision, recall and F1 against the score threshold, with vertical lines at ``mark``.

    The recall at each marked threshold is written next to its line; with two marks, the title
    says how much recall the higher one costs (the original case study kept only scores >= 0.99).
    Returns the Figure.
    """
    fig, ax = _figure_axes(ax, (6.4, 3.8))
    if not rows:
        raise UserError("plot_threshold_sweep: no rows (threshold_sweep gave nothing to plot)")
    t = np.array([r["threshold"] for r in rows], dtype=np.float64)
    order = np.argsort(t)
    for key, colour, style in [("precision", "#4c78a8", "-o"), ("recall", "#e45756", "-s"), ("f1", "#54a24b", "-^")]:
        values = np.array([r[key] for r in rows], dtype=np.float64)[order]
        ax.plot(t[order], values, style, color=colour, markersize=3, linewidth=1.5, label=key.replace("f1", "F1"))
    marked = []
    for m in mark:
        ax.axvline(m, color="grey", linestyle=":", linewidth=1)
        hit = [r for r in rows if math.isclose(r["threshold"], m, abs_tol=1e-9)]
        if hit:
            marked.append(hit[0])
            if not math.isnan(hit[0]["recall"]):
                ax.annotate(f"recall {hit[0]['recall']:.2f}\n({hit[0]['fn']} missed)", (m, hit[0]["recall"]),
                            xytext=(-6, -8), textcoords="offset points", ha="right", va="top", fontsize=8,
                            color="#e45756")
    title = "Score threshold sweep"
    if len(marked) == 2 and not any(math.isnan(r["recall"]) for r in marked):
        low, high = sorted(marked, key=lambda r: r["threshold"])
        title += (f": {high['threshold']:g} instead of {low['threshold']:g} costs "
                  f"{low['recall'] - high['recall']:.2f} recall ({high['fn'] - low['fn']} more misses)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("minimum score kept")
    ax.set_ylabel("value")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_leakage(report: ErrorReport, ax=None, bins: int = 20):
    """Histogram over matched pairs of the leak fraction (and of the under-coverage); returns the Figure."""
    fig, ax = _figure_axes(ax, (6.4, 3.6))
    leak = [m["leak_fraction"] for m in report.matches if "leak_fraction" in m]
    under = [m["under_coverage"] for m in report.matches if "under_coverage" in m]
    if not leak:
        ax.text(0.5, 0.5, "no matched pair with both masks", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    top = max(0.05, max(leak), max(under))
    edges = np.linspace(0.0, top * 1.0001, bins + 1)
    ax.hist(leak, bins=edges, color="#e45756", alpha=0.75, label="leak: predicted pixels outside the truth")
    ax.hist(under, bins=edges, color="#4c78a8", alpha=0.45, label="under-coverage: true pixels missed")
    stats = report.leakage["leak_fraction"]
    ax.axvline(stats["mean"], color="#9d1c1c", linestyle="--", linewidth=1, label=f"mean leak {stats['mean']:.3f}")
    ax.axvline(stats["p90"], color="#9d1c1c", linestyle=":", linewidth=1, label=f"90th percentile {stats['p90']:.3f}")
    ax.set_xlabel("fraction of the predicted (leak) or true (under-coverage) mask")
    ax.set_ylabel("matched pairs")
    ax.set_title(f"Mask leakage over {len(leak)} true positives "
                 f"(mean width {report.leakage['leak_width']['mean']:.2f} px)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def error_gallery(images_by_id: Mapping[int, Any], report: ErrorReport, kind: str = "fp", max_items: int = 12,
                  crop_margin: int = 16, ncols: int = 4, reason: str | None = None, label_attribute: str = "roof"):
    """Crops around false positives (``kind="fp"``) or false negatives (``"fn"``), one axes each.

    In each crop: the ground truth outlined in cyan (the missed object itself in yellow, thicker),
    predictions kept at the score threshold filled in orange (the false positive itself in red,
    with its box dashed); for a miss with a low score, the box of the prediction that the
    threshold removed, dashed, with its score. False positives come best score first, misses
    largest first, as in the report.

    Args:
        images_by_id (mapping): COCO image id -> image Float[3, H, W] in [0, 1] (any subset;
            errors on other images are skipped). Only the images shown are looked up, once each,
            so a mapping that loads images on demand is cheap.
        report (ErrorReport): from :func:`analyse`.
        kind (str): ``"fp"`` or ``"fn"``.
        max_items (int): at most this many crops.
        crop_margin (int): pixels of context around each error's box.
        ncols (int): crops per row.
        reason (str, optional): only errors of this reason (:data:`FP_REASONS` / :data:`FN_REASONS`).
        label_attribute (str): a ground-truth attribute shown in a miss's title when present.

    Returns:
        The Figure: one axes per crop (one axes with a note when there is nothing to show).
    """
    import matplotlib.pyplot as plt


    if kind not in ("fp", "fn"):
        raise UserError(f"kind must be 'fp' (false positives) or 'fn' (false negatives), got {kind!r}")
    reasons = FP_REASONS if kind == "fp" else FN_REASONS
    if reason is not None and reason not in reasons:
        raise UserError(f"reason must be one of {list(reasons)} for kind {kind!r}, got {reason!r}")
    if report._matching is None:
        raise UserError("error_gallery needs a report made by analyse()")
    errors = [e for e in (report.false_positives if kind == "fp" else report.false_negatives)
              if reason is None or e["reason"] == reason]
    available = set(images_by_id)  # the keys, without loading lazily-loaded images
    items = [e for e in errors if e["image_id"] in available][: max(0, int(max_items))]
    if errors and not items and max_items > 0:
        missing = sorted({e["image_id"] for e in errors}, key=str)[:5]
        raise UserError(f"error_gallery: images_by_id holds none of the images with errors (e.g. ids {missing})")
    what = {"fp": "false positives", "fn": "false negatives"}[kind] + (f" ({reason})" if reason else "")
    if not items:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig

    ncols = max(1, min(int(ncols), len(items)))
    nrows = math.ceil(len(items) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.75 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(items):]:
        fig.delaxes(ax)
    sizes = evaluation._gt_images(report._coco_gt)
    kept = [p for p in report._matching.preds if p["score"] >= report.score_threshold and p["status"] != "ignored"]
    loaded: dict = {}  # each image read once, however many of its errors are shown
    for ax, item in zip(axes.flat, items):
        if item["image_id"] not in loaded:
            loaded[item["image_id"]] = images_by_id[item["image_id"]]
        image = loaded[item["image_id"]]
        if tuple(sizes[item["image_id"]]) != tuple(image.shape[-2:]):
            raise UserError(f"error_gallery: image {item['image_id']} is {tuple(image.shape[-2:])} (H, W) but the "
                            f"ground truth says {tuple(sizes[item['image_id']])}")
        _draw_error(ax, image, item, kind, report, kept, crop_margin)
        if kind == "fp":
            title = f"img {item['image_id']} · score {item['score']:.3f}\n{item['reason']} · {item['size']:.0f} px"
        else:
            extra = item["attributes"].get(label_attribute)
            detail = f" · {item['matched_score']:.2f}" if item["reason"] == "low_score" else ""
            title = (f"img {item['image_id']} · {item['size']:.0f} px" + (f" · {extra}" if extra is not None else "")
                     + f"\n{item['reason'].replace('_', ' ')}{detail}")
        ax.set_title(title, fontsize=8)
    legend = ("red: the false positive · orange: other predictions · cyan: ground truth" if kind == "fp" else
              "yellow: the missed object · cyan: other ground truth · orange: predictions · white: below threshold")
    fig.suptitle(f"{len(items)} of {len(errors)} {what} (score ≥ {report.score_threshold:g}, "
                 f"IoU ≥ {report.iou_threshold:g})\n{legend}", fontsize=9)
    fig.tight_layout()
    return fig


def _draw_error(ax, image, item: dict, kind: str, report: ErrorReport, kept: list[dict], crop_margin: int) -> None:
    """One crop of the gallery: the image around ``item``'s box, predictions and ground truth on it."""
    from mrcnn_edu import viz

    height, width = int(image.shape[-2]), int(image.shape[-1])
    x, y, w, h = item["bbox"]
    x0, y0 = max(0, math.floor(x - crop_margin)), max(0, math.floor(y - crop_margin))
    x1, y1 = min(width, math.ceil(x + w + crop_margin)), min(height, math.ceil(y + h + crop_margin))
    viz.show_image(image[:, y0:y1, x0:x1], ax=ax)  # crop: (3, H, W) -> (3, h, w)

    def crop(segmentation, where: str) -> np.ndarray:
        with warnings.catch_warnings():  # pycocotools' compiled code trips a NumPy 2 deprecation warning
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return mask_utils.decode(_rle(segmentation, height, width, where))[y0:y1, x0:x1]  # (H, W) -> (h, w)

    def inside(bbox) -> bool:
        return bbox[0] < x1 and bbox[0] + bbox[2] > x0 and bbox[1] < y1 and bbox[1] + bbox[3] > y0

    def box(bbox, **style) -> None:  # an (x, y, w, h) box in crop coordinates
        bx, by, bw, bh = bbox
        viz.draw_boxes(ax, [[bx - x0, by - y0, bx + bw - x0, by + bh - y0]], **style)

    # predictions kept at the threshold: filled; the false positive itself in red, its box dashed
    for p in kept:
        if p["image_id"] != item["image_id"] or not inside(p["bbox"]):
            continue
        own = kind == "fp" and p["result_index"] == item["result_index"]
        segmentation = report._results[p["result_index"]].get("segmentation")
        colour = _ERROR_COLOUR if own else _PRED_COLOUR
        if segmentation:
            viz.overlay_masks(ax, crop(segmentation, f"results[{p['result_index']}]")[None], colors=[colour],
                              alpha=0.5 if own else 0.35)
        if own or not segmentation:
            box(p["bbox"], color=colour, linestyle="--", linewidth=1.2)
    # ground truth: outlines; the missed object itself thicker, in yellow
    for g in report._matching.gts:
        if g["image_id"] != item["image_id"] or not inside(g["bbox"]):
            continue
        own = kind == "fn" and g["annotation_index"] == item["annotation_index"]
        ann = report._coco_gt["annotations"][g["annotation_index"]]
        colour, linewidth = (_MISS_COLOUR, 2.0) if own else (_GT_COLOUR, 1.0)
        if ann.get("segmentation"):
            viz.outline_masks(ax, crop(ann["segmentation"], f"annotation {ann.get('id', '?')}")[None],
                              colors=[colour], linewidth=linewidth)
        else:
            box(g["bbox"], color=colour, linewidth=linewidth)
    # a miss that a prediction below the threshold had found: that prediction's box and score
    if kind == "fn" and item["matched_result_index"] is not None:
        box(report._results[item["matched_result_index"]]["bbox"], color="white", linestyle="--", linewidth=1.0,
            labels=[f"{item['matched_score']:.2f}"])
    ax.set_xlim(-0.5, x1 - x0 - 0.5)
    ax.set_ylim(y1 - y0 - 0.5, -0.5)
