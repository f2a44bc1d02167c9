"""Taught in: ``notebooks/08_evaluation.ipynb``: COCO evaluation from scratch (IoU, matching, AP, AR).

Shape shorthand used in this module:
    D  predictions of one image and one category (ranked best score first once sorted)
    G  ground-truth objects of one image and one category
    N  predictions of one category pooled over the whole data set, ranked by score
    T  IoU thresholds: 10, namely 0.50, 0.55, ..., 0.95
    R  recall thresholds: 101, namely 0.00, 0.01, ..., 1.00
    K  categories (sorted by COCO category id)
    A  area ranges: 4, namely all, small, medium, large
    M  limits on predictions per image: 3, namely 1, 10, 100
    H, W  image height and width

The recipe of ``pycocotools.cocoeval.COCOeval``, one small function per step:

1. **IoU** between every prediction and every ground-truth object of the same image and
   category: boxes (:func:`box_iou_xywh`, boxes are ``(x, y, w, h)`` in COCO files) or masks
   (:func:`mask_iou`). Against a *crowd* region (``iscrowd=1``, e.g. "a crowd of people") the
   union is replaced by the prediction's own area: a prediction inside a crowd is not penalised.
2. **Matching** (:func:`match_detections`): predictions in order of decreasing score each take
   the best still-free ground truth with IoU >= the threshold. A ground truth that is a crowd,
   or whose area is outside the area range being evaluated, is *ignored*: a prediction matched
   to it counts neither as a true nor as a false positive. (:func:`evaluate_image` runs the
   matching at the 10 thresholds for one image, category and area range.)
3. **Ranking** the predictions of one category over all images by score, and counting true
   and false positives as the score threshold sweeps down (:func:`precision_recall`).
4. **Average precision** (:func:`average_precision_101`): the precision curve is made monotone
   (the best precision at any higher recall, :func:`precision_envelope`) and read at 101
   recall values 0, 0.01, ..., 1 (:func:`interpolated_precision`); AP is their mean.
5. **Summary** (:func:`summarize`): AP averaged over the categories and over the IoU thresholds
   0.50:0.95 ("AP"), at one threshold ("AP50", "AP75"), per object size ("APs/m/l": areas
   below 32², between 32² and 96², above 96² pixels); average recall with at most 1, 10, 100
   predictions per image ("AR1/10/100") and per size ("ARs/m/l"). A value is ``-1`` when no
   category has a ground-truth object in that setting (COCO's convention).

:func:`evaluate` returns the 12 numbers, :func:`evaluate_detailed` also every intermediate
array; both give ``pycocotools``' numbers to 1e-6 (``tests/test_evaluation.py``).
:func:`evaluate_pycocotools` calls ``pycocotools`` itself, avoiding its pitfalls.
:func:`results_from_predictions` and :func:`evaluate_model` turn model outputs into COCO results
and metrics; :func:`format_table` prints them.

Two ``pycocotools`` behaviours we reproduce on purpose, so that numbers agree:

* when a prediction carries a box, its *area* (used only to decide which area range it is
  counted in when it matches nothing) is the box's ``w * h``, even for mask evaluation;
* ties: predictions with equal scores keep their order (stable sort) -- within an image, the
  order of the results list; across images, images in increasing id order. Between two
  ground truths with the same IoU, the later one (in ground-truth order) wins.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from mrcnn_edu.data import decode_segmentation
from mrcnn_edu.utils import UserError

# ----------------------------------------------------------------------------------------------
# COCO's evaluation settings
# ----------------------------------------------------------------------------------------------

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
"""The T = 10 IoU thresholds 0.50, 0.55, ..., 0.95 (``linspace``, as COCO: ``arange`` drifts)."""
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
"""The R = 101 recall values 0.00, 0.01, ..., 1.00 at which precision is read."""
MAX_DETS = (1, 10, 100)
"""The M = 3 limits on predictions per image and category."""
AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
"""The A = 4 object-area ranges in pixels, both ends included (as COCO: an area of exactly
32² counts as small *and* medium)."""

UNMATCHED = -1
"""What a match array holds for a prediction (or ground truth) that matched nothing."""
NO_GROUND_TRUTH = -1.0
"""COCO's value for a precision, recall or metric with no ground truth to measure it on."""

IOU_TYPES = ("bbox", "segm")

# The 12 summary numbers: key -> (AP or AR, IoU threshold or None = all 10, area range, max dets)
METRICS: dict[str, tuple[str, float | None, str, int]] = {
    "AP": ("AP", None, "all", 100),
    "AP50": ("AP", 0.5, "all", 100),
    "AP75": ("AP", 0.75, "all", 100),
    "APs": ("AP", None, "small", 100),
    "APm": ("AP", None, "medium", 100),
    "APl": ("AP", None, "large", 100),
    "AR1": ("AR", None, "all", 1),
    "AR10": ("AR", None, "all", 10),
    "AR100": ("AR", None, "all", 100),
    "ARs": ("AR", None, "small", 100),
    "ARm": ("AR", None, "medium", 100),
    "ARl": ("AR", None, "large", 100),
}
METRIC_KEYS = tuple(METRICS)
"""``("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")``."""


# ----------------------------------------------------------------------------------------------
# Step 1: IoU
# ----------------------------------------------------------------------------------------------


def box_iou_xywh(pred_boxes, gt_boxes, gt_iscrowd=None) -> np.ndarray:
    """IoU of every predicted box with every ground-truth box, boxes in COCO's ``(x, y, w, h)``.

    Args:
        pred_boxes (array[D, 4]): ``(x, y, w, h)``, top-left corner, width, height in pixels.
        gt_boxes (array[G, 4]): same.
        gt_iscrowd (array[G] of bool, optional): for a crowd region the union is the predicted
            box's area (the score is "how much of the prediction lies inside the crowd").

    Returns:
        Float64[D, G]: IoU in ``[0, 1]``.

    The arithmetic follows pycocotools' C code step by step, so values agree to the last bit.
    """
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)  # (D, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)  # (G, 4)
    crowd = _crowd_flags(gt_iscrowd, len(gt))
    # broadcast (D, 1) against (1, G) -> (D, G)
    px, py, pw, ph = (pred[:, i, None] for i in range(4))
    gx, gy, gw, gh = (gt[None, :, i] for i in range(4))
    inter_w = np.minimum(px + pw, gx + gw) - np.maximum(px, gx)
    inter_h = np.minimum(py + ph, gy + gh) - np.maximum(py, gy)
    overlap = (inter_w > 0) & (inter_h > 0)
    inter = np.where(overlap, inter_w * inter_h, 0.0)
    pred_area, gt_area = pw * ph, gw * gh  # (D, 1), (1, G)
    union = np.where(crowd[None, :], pred_area, pred_area + gt_area - inter)
    return _safe_divide(inter, union, overlap)


def mask_iou(pred_masks, gt_masks, gt_iscrowd=None) -> np.ndarray:
    """IoU of every predicted mask with every ground-truth mask (pixel counts).

    Args:
        pred_masks (array[D, H, W]): 0/1 or bool.
        gt_masks (array[G, H, W]): 0/1 or bool, same H, W.
        gt_iscrowd (array[G] of bool, optional): for a crowd region the union is the predicted
            mask's area.

    Returns:
        Float64[D, G]: ``|pred & gt| / |pred | gt|`` (0 when the masks do not touch).
    """
    pred = np.asarray(pred_masks)
    gt = np.asarray(gt_masks)
    if pred.shape[1:] != gt.shape[1:]:
        raise UserError(f"mask_iou: predicted masks are {pred.shape[1:]} but ground-truth masks are "
                        f"{gt.shape[1:]}; both must have the image's size (H, W)")
    num_pixels = int(np.prod(pred.shape[1:]))
    # (D, H, W) -> (D, H*W) and (G, H, W) -> (G, H*W): one row of 0/1 per mask
    pred_flat = pred.reshape(len(pred), num_pixels).astype(np.float64)
    gt_flat = gt.reshape(len(gt), num_pixels).astype(np.float64)
    inter = pred_flat @ gt_flat.T  # (D, G) pixels in both masks (exact: integers in float64)
    pred_area = pred_flat.sum(axis=1)[:, None]  # (D, 1)
    gt_area = gt_flat.sum(axis=1)[None, :]  # (1, G)
    crowd = _crowd_flags(gt_iscrowd, len(gt))
    union = np.where(crowd[None, :], pred_area, pred_area + gt_area - inter)
    return _safe_divide(inter, union, inter > 0)


def _crowd_flags(gt_iscrowd, num_gt: int) -> np.ndarray:
    if gt_iscrowd is None:
        return np.zeros(num_gt, dtype=bool)
    return np.asarray(gt_iscrowd, dtype=bool).reshape(num_gt)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, where: np.ndarray) -> np.ndarray:
    """numerator / denominator where ``where`` holds, else 0 (no 0/0 warnings)."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape), dtype=np.float64)
    return np.divide(numerator, denominator, out=out, where=where & (denominator > 0))


# ----------------------------------------------------------------------------------------------
# Step 2: matching predictions to ground truth, in one image and one category
# ----------------------------------------------------------------------------------------------


@dataclass
class Matches:
    """The greedy matching of one image and category at one IoU threshold (caller's order).

    Attributes:
        pred_to_gt (Int64[D]): index of the ground truth each prediction matched, or ``UNMATCHED``.
        gt_to_pred (Int64[G]): index of the prediction that matched each ground truth, or
            ``UNMATCHED`` (a crowd region may match several predictions: the last one is kept).
        pred_ignored (Bool[D]): the prediction matched an *ignored* ground truth (a crowd or an
            object outside the area range): neither a true nor a false positive.
    """

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray
    pred_ignored: np.ndarray

    @property
    def true_positives(self) -> np.ndarray:
        """Bool[D]: matched a ground truth that counts."""
        return (self.pred_to_gt != UNMATCHED) & ~self.pred_ignored

    @property
    def false_positives(self) -> np.ndarray:
        """Bool[D]: matched nothing (before any area-range rule for unmatched predictions)."""
        return self.pred_to_gt == UNMATCHED


def match_detections(ious, pred_scores, iou_threshold: float = 0.5, gt_ignore=None,
                     gt_iscrowd=None) -> Matches:
    """Greedy matching by score, exactly COCO's rules.

    Predictions are visited best score first (ties: the given order). Each takes, among the
    ground truths not yet taken, the one with the highest IoU >= ``iou_threshold``; ground
    truths that count are preferred to ignored ones (a prediction that found a regular ground
    truth stops looking), and a crowd region can be taken by any number of predictions.

    Args:
        ious (array[D, G]): IoU of each prediction with each ground truth (:func:`box_iou_xywh`).
        pred_scores (array[D]): confidence of each prediction.
        iou_threshold (float): minimum IoU for a match (0.5 for AP50).
        gt_ignore (array[G] of bool, optional): ground truths that do not count (crowds,
            objects outside the area range being evaluated). Default: none.
        gt_iscrowd (array[G] of bool, optional): crowd regions. Default: none.

    Returns:
        :class:`Matches`, indices in the order the arguments were given.
    """
    ious = np.asarray(ious, dtype=np.float64)
    num_pred, num_gt = len(np.asarray(pred_scores)), (ious.shape[1] if ious.ndim == 2 else 0)
    ious = ious.reshape(num_pred, num_gt)
    ignore = _crowd_flags(gt_ignore, num_gt)
    crowd = _crowd_flags(gt_iscrowd, num_gt)
    pred_order = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="mergesort")  # best first
    gt_order = np.argsort(ignore, kind="mergesort")  # ground truths that count first, ignored last

    pred_to_gt = np.full(num_pred, UNMATCHED, dtype=np.int64)
    gt_to_pred = np.full(num_gt, UNMATCHED, dtype=np.int64)
    pred_ignored = np.zeros(num_pred, dtype=bool)
    for d in pred_order:
        best_iou = min(iou_threshold, 1 - 1e-10)  # a match needs IoU >= threshold
        best = UNMATCHED
        for g in gt_order:
            if gt_to_pred[g] != UNMATCHED and not crowd[g]:
                continue  # already taken by a better-scored prediction
            if best != UNMATCHED and not ignore[best] and ignore[g]:
                break  # we hold a regular ground truth; only ignored ones are left
            if ious[d, g] < best_iou:
                continue
            best_iou, best = ious[d, g], g  # ">=": of equal IoUs, the later ground truth wins
        if best != UNMATCHED:
            pred_to_gt[d], gt_to_pred[best], pred_ignored[d] = best, d, ignore[best]
    return Matches(pred_to_gt, gt_to_pred, pred_ignored)


@dataclass
class ImageEvaluation:
    """One image and category in one area range, matched at every IoU threshold.

    Attributes:
        pred_order (Int64[D]): the predictions kept (at most ``max_det``), best score first, as
            indices into the caller's list of predictions.
        pred_scores (Float64[D]): their scores (non-increasing).
        pred_to_gt (Int64[T, D]): index (caller's gt order) of the matched ground truth, or
            ``UNMATCHED``.
        pred_ignored (Bool[T, D]): neither TP nor FP: matched an ignored ground truth, or
            matched nothing while its own area is outside the area range.
        gt_ignored (Bool[G]): crowd, or area outside the range (caller's gt order).
        gt_to_pred (Int64[T, G]): index (caller's prediction order) of the matching prediction,
            or ``UNMATCHED``.
        result_indices, annotation_indices (Int64[D_all], Int64[G], optional): filled by
            :func:`evaluate_detailed`: where the predictions / ground truths given to
            :func:`evaluate_image` sit in the ``results`` list / ``coco_gt["annotations"]``
            (so ``result_indices[pred_order]`` are the kept predictions' positions in ``results``).
    """

    pred_order: np.ndarray
    pred_scores: np.ndarray
    pred_to_gt: np.ndarray
    pred_ignored: np.ndarray
    gt_ignored: np.ndarray
    gt_to_pred: np.ndarray
    result_indices: np.ndarray | None = None
    annotation_indices: np.ndarray | None = None

    @property
    def true_positives(self) -> np.ndarray:
        """Bool[T, D]."""
        return (self.pred_to_gt != UNMATCHED) & ~self.pred_ignored

    @property
    def false_positives(self) -> np.ndarray:
        """Bool[T, D]."""
        return (self.pred_to_gt == UNMATCHED) & ~self.pred_ignored

    @property
    def num_gt(self) -> int:
        """Ground truths that count (not ignored)."""
        return int((~self.gt_ignored).sum())


def evaluate_image(ious, pred_scores, pred_areas, gt_areas, gt_iscrowd=None,
                   area_range: tuple[float, float] = AREA_RANGES["all"], max_det: int = MAX_DETS[-1],
                   iou_thresholds=IOU_THRESHOLDS) -> ImageEvaluation:
    """Match one image's predictions of one category at every IoU threshold (COCO's ``evaluateImg``).

    Args:
        ious (array[D_all, G]): prediction x ground-truth IoU.
        pred_scores (array[D_all]), pred_areas (array[D_all]): score and area of each prediction.
        gt_areas (array[G]), gt_iscrowd (array[G] of bool): area and crowd flag of each ground truth.
        area_range ((lo, hi)): ground truths with area outside ``[lo, hi]`` are ignored; so are
            predictions outside it that match nothing.
        max_det (int): keep only the ``max_det`` best-scored predictions.
        iou_thresholds (array[T]).

    Returns:
        :class:`ImageEvaluation`.
    """
    lo, hi = area_range
    gt_areas = np.asarray(gt_areas, dtype=np.float64).reshape(-1)
    crowd = _crowd_flags(gt_iscrowd, len(gt_areas))
    gt_ignored = crowd | (gt_areas < lo) | (gt_areas > hi)

    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pred_order = np.argsort(-pred_scores, kind="mergesort")[:max_det]  # (D,) best first
    ious = np.asarray(ious, dtype=np.float64).reshape(len(pred_scores), len(gt_areas))[pred_order]  # (D, G)
    pred_areas = np.asarray(pred_areas, dtype=np.float64).reshape(-1)[pred_order]  # (D,)

    per_threshold = [match_detections(ious, pred_scores[pred_order], t, gt_ignored, crowd) for t in iou_thresholds]
    pred_to_gt = np.stack([m.pred_to_gt for m in per_threshold]).reshape(len(iou_thresholds), len(pred_order))
    matched_ignored = np.stack([m.pred_ignored for m in per_threshold]).reshape(pred_to_gt.shape)
    sorted_gt_to_pred = np.stack([m.gt_to_pred for m in per_threshold]).reshape(len(iou_thresholds), len(gt_areas))
    # gt_to_pred holds positions in the sorted list: back to the caller's prediction indices
    gt_to_pred = np.where(sorted_gt_to_pred == UNMATCHED, UNMATCHED,
                          pred_order[np.maximum(sorted_gt_to_pred, 0)] if len(pred_order) else UNMATCHED)
    outside = (pred_areas < lo) | (pred_areas > hi)  # (D,)
    pred_ignored = matched_ignored | ((pred_to_gt == UNMATCHED) & outside[None, :])  # (T, D)
    return ImageEvaluation(pred_order=pred_order, pred_scores=pred_scores[pred_order], pred_to_gt=pred_to_gt,
                           pred_ignored=pred_ignored, gt_ignored=gt_ignored, gt_to_pred=gt_to_pred.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Steps 3 and 4: precision, recall and average precision of a ranking
# ----------------------------------------------------------------------------------------------


def precision_recall(is_tp, is_fp=None, num_gt: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each prediction of a ranking (best score first).

    Args:
        is_tp (array[N] of bool): the prediction is a true positive.
        is_fp (array[N] of bool, optional): it is a false positive. Default ``~is_tp``; pass it
            when some predictions are ignored (neither).
        num_gt (int): ground-truth objects that count (the denominator of recall).

    Returns:
        (recall, precision), each Float64[N]: after the first ``i + 1`` predictions,
        ``recall[i] = TP / num_gt`` and ``precision[i] = TP / (TP + FP)``.
    """
    is_tp = np.asarray(is_tp, dtype=bool).reshape(-1)
    is_fp = ~is_tp if is_fp is None else np.asarray(is_fp, dtype=bool).reshape(-1)
    if num_gt is None or num_gt <= 0:
        raise ValueError("precision_recall: num_gt must be a positive number of ground-truth objects")
    tp = np.cumsum(is_tp).astype(np.float64)
    fp = np.cumsum(is_fp).astype(np.float64)
    recall = tp / num_gt
    # the tiny epsilon only matters when the first predictions are all ignored (0 / 0 -> 0)
    precision = tp / (tp + fp + np.spacing(1))
    return recall, precision


def precision_envelope(precision) -> np.ndarray:
    """Make precision non-increasing: at each point, the best precision at this or any later rank.

    ``[1, 0.5, 0.67, 0.5]`` becomes ``[1, 0.67, 0.67, 0.5]``: "if I accept a few more
    predictions I can do at least this well", which removes the zig-zag of the raw curve.
    """
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    return np.maximum.accumulate(precision[::-1])[::-1]  # running max from the right


def interpolated_precision(recall, precision, recall_thresholds=RECALL_THRESHOLDS) -> np.ndarray:
    """Precision (envelope) at each recall threshold: Float64[R].

    At threshold ``r`` it is the envelope's value at the first rank whose recall is ``>= r``,
    and 0 if recall never reaches ``r``.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    envelope = precision_envelope(precision)
    first_rank = np.searchsorted(recall, recall_thresholds, side="left")  # (R,)
    reached = first_rank < len(recall)
    sampled = np.zeros(len(recall_thresholds), dtype=np.float64)
    sampled[reached] = envelope[first_rank[reached]]
    return sampled


def average_precision_101(recall, precision) -> float:
    """COCO's AP of one ranking: the mean of the 101 interpolated precisions."""
    return float(interpolated_precision(recall, precision).mean())


def pool_ranking(image_evaluations: Iterable[ImageEvaluation], max_det: int = MAX_DETS[-1]):
    """Pool the predictions of one category over images and rank them by score.

    Args:
        image_evaluations: one :class:`ImageEvaluation` per image (in increasing image id order,
            which breaks ties between images), all of the same category and area range.
        max_det (int): use only each image's ``max_det`` best predictions.

    Returns:
        (scores Float64[N], true_positives Bool[T, N], false_positives Bool[T, N], num_gt int)
    """
    evaluations = list(image_evaluations)
    scores = np.concatenate([e.pred_scores[:max_det] for e in evaluations])  # (N,)
    # (T, D_i) per image -> (T, N); then reorder the columns by decreasing score (stable)
    tps = np.concatenate([e.true_positives[:, :max_det] for e in evaluations], axis=1)
    fps = np.concatenate([e.false_positives[:, :max_det] for e in evaluations], axis=1)
    order = np.argsort(-scores, kind="mergesort")
    num_gt = sum(e.num_gt for e in evaluations)
    return scores[order], tps[:, order], fps[:, order], num_gt


# ----------------------------------------------------------------------------------------------
# Step 5: the whole data set
# ----------------------------------------------------------------------------------------------


@dataclass(repr=False)
class CocoEvaluation:
    """Everything :func:`evaluate_detailed` computed.

    Attributes:
        stats (dict): the 12 summary numbers (:data:`METRIC_KEYS`), ``-1`` where undefined.
        precision (Float64[T, R, K, A, M]): interpolated precision; ``-1`` for settings without
            ground truth. ``precision[0, :, k, 0, 2]`` is category k's PR curve at IoU 0.5.
        recall (Float64[T, K, A, M]): final recall; ``-1`` likewise.
        image_ids (list[int]), category_ids (list[int]): the images and the K categories.
        images (dict): ``(image_id, category_id, area_label) -> ImageEvaluation`` for every pair
            with a prediction or a ground truth (``max_det`` = 100).
        ious (dict): ``(image_id, category_id) -> Float64[D, G]``, predictions best first.
        iou_type (str): ``"bbox"`` or ``"segm"``.
    """

    stats: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    image_ids: list[int]
    category_ids: list[int]
    images: dict[tuple[int, int, str], ImageEvaluation] = field(repr=False)
    ious: dict[tuple[int, int], np.ndarray] = field(repr=False)
    iou_type: str = "segm"
    iou_thresholds: np.ndarray = field(default_factory=lambda: IOU_THRESHOLDS.copy(), repr=False)
    recall_thresholds: np.ndarray = field(default_factory=lambda: RECALL_THRESHOLDS.copy(), repr=False)
    area_labels: tuple[str, ...] = tuple(AREA_RANGES)
    max_dets: tuple[int, ...] = MAX_DETS

    def __repr__(self) -> str:  # short: the arrays hold tens of thousands of numbers
        stats = ", ".join(f"{key}={value:.3f}" for key, value in self.stats.items())
        return (f"CocoEvaluation(iou_type={self.iou_type!r}, {len(self.image_ids)} images, categories "
                f"{self.category_ids}, precision[T, R, K, A, M]={list(self.precision.shape)}, "
                f"recall[T, K, A, M]={list(self.recall.shape)}, {stats})")


def evaluate(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str = "segm") -> dict[str, float]:
    """COCO's 12 metrics of ``results`` against ``coco_gt``, computed from scratch.

    Args:
        coco_gt (dict): COCO ground truth ``{"images", "annotations", "categories"}``;
            annotations need ``image_id``, ``category_id``, ``bbox`` (xywh) or ``segmentation``;
            a missing ``iscrowd`` means 0, a missing ``area`` is the mask's pixel count (the box's
            ``w * h`` without a mask).
        results (list of dict): ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}``
            (+ ``"segmentation"``, compressed RLE, for ``"segm"``). Results of categories absent
            from ``coco_gt["categories"]`` are not counted (as COCO).
        iou_type (str): ``"bbox"`` (box IoU) or ``"segm"`` (mask IoU).

    Returns:
        dict of the 12 floats of :data:`METRIC_KEYS` (``-1`` where COCO gives -1).

    Raises:
        UserError: an unknown iou_type, a result for an image not in ``coco_gt``, a result without
            the field the iou_type needs, masks whose size differs from the image's.
    """
    return evaluate_detailed(coco_gt, results, iou_type).stats


def evaluate_detailed(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str = "segm") -> CocoEvaluation:
    """:func:`evaluate` keeping every intermediate result (see :class:`CocoEvaluation`)."""
    _check_iou_type(iou_type)
    images = _gt_images(coco_gt)
    category_ids = sorted({int(c["id"]) for c in coco_gt.get("categories", [])})
    _check_results(results, images, iou_type)
    known_categories = set(category_ids)

    # group ground truths and predictions by (image, category), keeping positions in the inputs
    gt_by_key: dict[tuple[int, int], list[int]] = {}
    for index, ann in enumerate(coco_gt.get("annotations", [])):
        key = (ann["image_id"], int(ann["category_id"]))
        if key[0] in images and key[1] in known_categories:
            gt_by_key.setdefault(key, []).append(index)
    pred_by_key: dict[tuple[int, int], list[int]] = {}
    for index, result in enumerate(results):
        key = (result["image_id"], int(result["category_id"]))
        if key[1] in known_categories:
            pred_by_key.setdefault(key, []).append(index)

    image_ids = sorted(images)
    evaluations: dict[tuple[int, int, str], ImageEvaluation] = {}
    all_ious: dict[tuple[int, int], np.ndarray] = {}
    for category_id in category_ids:
        for image_id in image_ids:
            gt_indices = np.asarray(gt_by_key.get((image_id, category_id), []), dtype=np.int64)
            result_indices = np.asarray(pred_by_key.get((image_id, category_id), []), dtype=np.int64)
            if len(gt_indices) == 0 and len(result_indices) == 0:
                continue  # nothing to say about this pair (COCO's None)
            gts = [coco_gt["annotations"][i] for i in gt_indices]
            preds = [results[i] for i in result_indices]
            height, width = images[image_id]
            scores = np.array([float(p["score"]) for p in preds], dtype=np.float64)
            # COCO computes IoU for the 100 best predictions only
            kept = np.argsort(-scores, kind="mergesort")[: MAX_DETS[-1]]
            ious = _iou_matrix([preds[i] for i in kept], gts, iou_type, height, width, image_id)  # (D, G)
            all_ious[image_id, category_id] = ious
            gt_areas = [_gt_area(g, height, width) for g in gts]
            gt_crowd = [bool(g.get("iscrowd", 0)) for g in gts]
            pred_areas = [_result_area(preds[i]) for i in kept]
            for label, area_range in AREA_RANGES.items():
                evaluation = evaluate_image(ious, scores[kept], pred_areas, gt_areas, gt_crowd, area_range)
                evaluation.result_indices, evaluation.annotation_indices = result_indices[kept], gt_indices
                evaluations[image_id, category_id, label] = evaluation

    precision, recall = accumulate(evaluations, image_ids, category_ids)
    return CocoEvaluation(stats=summarize(precision, recall), precision=precision, recall=recall,
                          image_ids=image_ids, category_ids=category_ids, images=evaluations, ious=all_ious,
                          iou_type=iou_type)


def accumulate(evaluations: Mapping[tuple[int, int, str], ImageEvaluation], image_ids: Sequence[int],
               category_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Precision Float64[T, R, K, A, M] and recall Float64[T, K, A, M] (COCO's ``accumulate``).

    For each category, area range and detection limit: pool the images' predictions, rank them,
    and read precision at the 101 recall thresholds at each IoU threshold. Settings without
    ground truth that counts stay at ``-1``.
    """
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(category_ids), len(AREA_RANGES), len(MAX_DETS))
    precision = np.full(shape, NO_GROUND_TRUTH)
    recall = np.full((shape[0],) + shape[2:], NO_GROUND_TRUTH)
    for k, category_id in enumerate(category_ids):
        for a, label in enumerate(AREA_RANGES):
            per_image = [evaluations[key] for key in ((i, category_id, label) for i in image_ids) if key in evaluations]
            if not per_image:
                continue
            for m, max_det in enumerate(MAX_DETS):
                _, tps, fps, num_gt = pool_ranking(per_image, max_det)
                if num_gt == 0:
                    continue  # nothing to recall: precision and recall undefined (-1)
                for t in range(len(IOU_THRESHOLDS)):
                    rc, pr = precision_recall(tps[t], fps[t], num_gt)
                    recall[t, k, a, m] = rc[-1] if len(rc) else 0.0
                    precision[t, :, k, a, m] = interpolated_precision(rc, pr)
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> dict[str, float]:
    """The 12 COCO numbers: means of ``precision`` / ``recall`` over the settings each one names.

    Entries equal to ``-1`` (no ground truth) are left out of each mean; a metric with no
    entries left is ``-1``.
    """
    stats = {}
    area_labels, max_dets = list(AREA_RANGES), list(MAX_DETS)
    for key, (kind, iou_threshold, area, max_det) in METRICS.items():
        a, m = area_labels.index(area), max_dets.index(max_det)
        values = precision[..., a, m] if kind == "AP" else recall[..., a, m]  # (T, R, K) or (T, K)
        if iou_threshold is not None:
            values = values[np.isclose(IOU_THRESHOLDS, iou_threshold)]
        defined = values[values > NO_GROUND_TRUTH]
        stats[key] = float(np.mean(defined)) if defined.size else NO_GROUND_TRUTH
    return stats


def precision_recall_curve(detailed: CocoEvaluation, category_id: int, iou_threshold: float = 0.5,
                           area: str = "all", max_det: int = MAX_DETS[-1]) -> dict[str, Any]:
    """The raw PR curve of one category over the data set, at one IoU threshold (for plotting).

    Args:
        detailed (CocoEvaluation): the output of :func:`evaluate_detailed`.
        category_id (int): the COCO category.
        iou_threshold (float): one of :data:`IOU_THRESHOLDS`.
        area (str): one of :data:`AREA_RANGES`.
        max_det (int): one of :data:`MAX_DETS`.

    Returns:
        dict with ``"scores"``, ``"recall"``, ``"precision"``, ``"envelope"`` (each Float64[N]:
        after each prediction of the ranking, best first; ignored predictions leave recall and
        precision unchanged) and ``"ap"`` (float, the 101-point AP at this threshold, the
        mean of ``detailed.precision[t, :, k, a, m]``).
    """
    t = _threshold_index(iou_threshold)
    _check_area(area)
    per_image = [detailed.images[key] for key in ((i, category_id, area) for i in detailed.image_ids)
                 if key in detailed.images]
    if not per_image:
        raise UserError(f"category {category_id} has neither ground truth nor predictions")
    scores, tps, fps, num_gt = pool_ranking(per_image, max_det)
    if num_gt == 0:
        raise UserError(f"category {category_id} has no ground truth in area range {area!r}: recall is undefined")
    rc, pr = precision_recall(tps[t], fps[t], num_gt)
    return {"scores": scores, "recall": rc, "precision": pr, "envelope": precision_envelope(pr),
            "ap": average_precision_101(rc, pr)}


def _check_area(area: str) -> None:
    if area not in AREA_RANGES:
        raise UserError(f"area must be one of {list(AREA_RANGES)}, got {area!r}")


def _threshold_index(iou_threshold: float) -> int:
    """Position of ``iou_threshold`` in :data:`IOU_THRESHOLDS`."""
    found = np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou_threshold))
    if len(found) == 0:
        raise UserError(f"iou_threshold must be one of {np.round(IOU_THRESHOLDS, 2).tolist()}, got {iou_threshold}")
    return int(found[0])


def find_errors(detailed: CocoEvaluation, iou_threshold: float = 0.5, area: str = "all",
                max_det: int = MAX_DETS[-1]) -> dict[int, dict[str, list[int]]]:
    """True positives, false positives and misses of every image, for an error gallery.

    Returns:
        ``image_id -> {"true_positives": [...], "false_positives": [...], "ignored": [...],
        "false_negatives": [...]}``: the first three list positions in the ``results`` list,
        the last positions in ``coco_gt["annotations"]`` (ground truths that count but matched
        nothing).
    """
    t = _threshold_index(iou_threshold)
    _check_area(area)
    errors: dict[int, dict[str, list[int]]] = {
        i: {"true_positives": [], "false_positives": [], "ignored": [], "false_negatives": []}
        for i in detailed.image_ids}
    for (image_id, _, label), e in detailed.images.items():
        if label != area:
            continue
        kept = e.pred_order[:max_det]
        for d, pred in enumerate(kept):
            kind = ("ignored" if e.pred_ignored[t, d] else
                    "true_positives" if e.pred_to_gt[t, d] != UNMATCHED else "false_positives")
            errors[image_id][kind].append(int(e.result_indices[pred]))
        matched = set(e.pred_to_gt[t, : len(kept)].tolist())
        for g, ignored in enumerate(e.gt_ignored):
            if not ignored and g not in matched:
                errors[image_id]["false_negatives"].append(int(e.annotation_indices[g]))
    return errors


def confusion_matrix(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str = "segm",
                     iou_threshold: float = 0.5, score_threshold: float = 0.5) -> tuple[np.ndarray, list[str]]:
    """Which category was predicted for which ground truth, ignoring categories while matching.

    Predictions with ``score >= score_threshold`` are matched greedily by score, per image, to
    non-crowd ground truths of *any* category (IoU >= ``iou_threshold``).

    Returns:
        (matrix Int64[K+1, K+1], names): rows are ground-truth categories then ``"background"``
        (predictions that matched nothing: false positives), columns are predicted categories
        then ``"background"`` (ground truths nobody found: misses). ``names`` labels both axes.
    """
    _check_iou_type(iou_type)
    images = _gt_images(coco_gt)
    _check_results(results, images, iou_type)
    categories = sorted(coco_gt.get("categories", []), key=lambda c: int(c["id"]))
    column = {int(c["id"]): k for k, c in enumerate(categories)}
    background = len(categories)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    gts_by_image: dict[Any, list[Mapping]] = {i: [] for i in images}
    for ann in coco_gt.get("annotations", []):
        if ann["image_id"] in images and not ann.get("iscrowd", 0) and int(ann["category_id"]) in column:
            gts_by_image[ann["image_id"]].append(ann)
    preds_by_image: dict[Any, list[Mapping]] = {i: [] for i in images}
    for result in results:
        if float(result["score"]) >= score_threshold and int(result["category_id"]) in column:
            preds_by_image[result["image_id"]].append(result)
    for image_id, (height, width) in sorted(images.items()):
        gts, preds = gts_by_image[image_id], preds_by_image[image_id]
        ious = _iou_matrix(preds, gts, iou_type, height, width, image_id)  # (D, G)
        matches = match_detections(ious, [float(p["score"]) for p in preds], iou_threshold)
        for p, g in zip(preds, matches.pred_to_gt):
            row = background if g == UNMATCHED else column[int(gts[g]["category_id"])]
            matrix[row, column[int(p["category_id"])]] += 1
        for g, p in zip(gts, matches.gt_to_pred):
            if p == UNMATCHED:
                matrix[column[int(g["category_id"])], background] += 1
    return matrix, [str(c.get("name", c["id"])) for c in categories] + ["background"]


# ----------------------------------------------------------------------------------------------
# Reading COCO dicts
# ----------------------------------------------------------------------------------------------


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise UserError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")


def _gt_images(coco_gt: Mapping) -> dict[int, tuple[int | None, int | None]]:
    """image id -> (height, width) of every image of the ground truth."""
    if not isinstance(coco_gt, Mapping) or "images" not in coco_gt:
        raise UserError("coco_gt must be a COCO dict with 'images', 'annotations' and 'categories'")
    return {img["id"]: (img.get("height"), img.get("width")) for img in coco_gt["images"]}


def _check_results(results: Sequence[Mapping], images: Mapping, iou_type: str) -> None:
    """Clear errors for results that COCO would crash on (or silently misread)."""
    if not isinstance(results, (list, tuple)):
        raise UserError(f"results must be a list of dicts, got {type(results).__name__}")
    needed = ("image_id", "category_id", "score", iou_type if iou_type == "bbox" else "segmentation")
    for index, result in enumerate(results):
        missing = [key for key in needed if key not in result]
        if missing:
            hint = " (pass iou_type='bbox' to evaluate boxes)" if "segmentation" in missing else ""
            raise UserError(f"results[{index}] lacks {', '.join(map(repr, missing))}{hint}")
        if result["image_id"] not in images:
            raise UserError(f"results[{index}]: image_id {result['image_id']!r} is not an image of the "
                            f"ground truth (coco_gt['images'])")


def _box_area(bbox) -> float:
    return float(bbox[2]) * float(bbox[3])


def _gt_area(ann: Mapping, height, width) -> float:
    """A ground truth's ``area`` field; if missing, the mask's pixel count (box ``w * h`` without a mask)."""
    if "area" in ann:
        return float(ann["area"])
    if ann.get("segmentation"):
        return float(_decode(ann["segmentation"], height, width, f"annotation {ann.get('id', '?')}").sum())
    if "bbox" in ann:
        return _box_area(ann["bbox"])
    raise UserError(f"annotation {ann.get('id', '?')} has neither 'area', 'segmentation' nor 'bbox'")


def _result_area(result: Mapping) -> float:
    """A prediction's area as COCO's ``loadRes`` sets it: the box's ``w * h`` if it has a box."""
    if result.get("bbox"):
        return _box_area(result["bbox"])
    return float(mask_utils.area(_as_rle(result["segmentation"])))


def _gt_bbox(ann: Mapping, height, width) -> list[float]:
    if "bbox" in ann:
        return [float(v) for v in ann["bbox"]]
    if ann.get("segmentation"):
        mask = _decode(ann["segmentation"], height, width, f"annotation {ann.get('id', '?')}")
        rle = mask_utils.encode(np.asfortranarray(mask))
        return [float(v) for v in mask_utils.toBbox(rle)]
    raise UserError(f"annotation {ann.get('id', '?')} has neither 'bbox' nor 'segmentation'")


def _as_rle(segmentation: Mapping) -> dict:
    return {"size": list(segmentation["size"]), "counts": segmentation["counts"]}


def _iou_matrix(preds: Sequence[Mapping], gts: Sequence[Mapping], iou_type: str, height, width,
                image_id) -> np.ndarray:
    """Float64[D, G] IoU of the predictions (in the given order) with the ground truths."""
    crowd = [bool(g.get("iscrowd", 0)) for g in gts]
    if iou_type == "bbox":
        return box_iou_xywh([p["bbox"] for p in preds], [_gt_bbox(g, height, width) for g in gts], crowd)
    gt_masks = [_decode(g["segmentation"], height, width, f"image {image_id}, annotation {g.get('id', '?')}")
                for g in gts]
    pred_masks = [_decode(p["segmentation"], height, width, f"image {image_id}, a result") for p in preds]
    empty = np.zeros((0, height or 0, width or 0), dtype=np.uint8)
    return mask_iou(np.stack(pred_masks) if pred_masks else empty, np.stack(gt_masks) if gt_masks else empty, crowd)


def _decode(segmentation, height, width, where: str) -> np.ndarray:
    """UInt8[H, W] from a COCO segmentation (``mrcnn_edu.data.decode_segmentation``), errors naming ``where``."""
    if height is None or width is None:
        raise UserError(f"{where}: its image has no 'height'/'width' in coco_gt['images'] (needed for masks)")
    try:
        return decode_segmentation(segmentation, int(height), int(width)).numpy()
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------------------------
# pycocotools, for production use
# ----------------------------------------------------------------------------------------------


def prepare_coco_gt(coco_gt: Mapping, iou_type: str = "segm") -> dict:
    """A copy of ``coco_gt`` that pycocotools reads without surprises.

    Fills a missing ``iscrowd`` (0), ``area`` (mask pixel count, or box ``w * h``) and ``bbox``
    (from the mask), and numbers the annotations 1, 2, ... (pycocotools reads an annotation id
    of 0 as "no match", and keeps only one of two annotations with the same id).
    The caller's dict is not modified.
    """
    _check_iou_type(iou_type)
    images = _gt_images(coco_gt)
    gt = copy.deepcopy(dict(coco_gt))
    gt.setdefault("categories", [])
    gt.setdefault("annotations", [])
    for number, ann in enumerate(gt["annotations"], start=1):
        height, width = images.get(ann.get("image_id"), (None, None))
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = _gt_area(ann, height, width)
        if "bbox" not in ann:
            ann["bbox"] = _gt_bbox(ann, height, width)
        ann["id"] = number
    return gt


def evaluate_pycocotools(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str = "segm") -> dict[str, float]:
    """COCO's 12 metrics computed by ``pycocotools.cocoeval.COCOeval`` itself.

    Handles its pitfalls: an empty results list (``loadRes`` crashes on it: every metric is 0,
    or -1 without ground truth), missing ``iscrowd``/``area``/``bbox`` in the ground truth
    (:func:`prepare_coco_gt`), results for unknown images (a clear :class:`UserError` instead
    of an ``AssertionError``), its prints (silenced), and its habit of modifying the dicts it
    is given (it gets copies).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = prepare_coco_gt(coco_gt, iou_type)
    _check_results(results, _gt_images(gt), iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if results:
            coco_dt = coco.loadRes(copy.deepcopy(list(results)))
        else:  # an empty result set: the same images and categories, no annotations
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats)}


# ----------------------------------------------------------------------------------------------
# From a model to metrics
# ----------------------------------------------------------------------------------------------


def coco_result(image_id: int, label: int, box: Sequence[float], score: float,
                label_to_category_id: Mapping[int, int] | None = None, segmentation: dict | None = None) -> dict:
    """One detection as a COCO result dict (the format ``loadRes`` reads).

    Args:
        image_id (int): the COCO image id.
        label (int): the model's label; ``label_to_category_id`` maps it to the COCO category id
            (``None``: the same number).
        box: ``(x1, y1, x2, y2)``, written as ``"bbox": [x, y, w, h]``.
        segmentation (dict, optional): compressed RLE ``{"size": [H, W], "counts": str}``.
    """
    label = int(label)
    if label_to_category_id is not None and label not in label_to_category_id:
        raise UserError(f"label {label} has no COCO category id (known labels: {sorted(label_to_category_id)})")
    x1, y1, x2, y2 = (float(v) for v in box)
    result = {"image_id": int(image_id),
              "category_id": int(label if label_to_category_id is None else label_to_category_id[label]),
              "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
    if segmentation is not None:
        result["segmentation"] = segmentation
    return result


def results_from_predictions(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                             label_to_category_id: Mapping[int, int], mask_threshold: float = 0.5) -> list[dict]:
    """COCO results (JSON-serialisable) from the model's eval outputs.

    Args:
        outputs (list of dict): per image ``"boxes"`` Float[D, 4] ``(x1, y1, x2, y2)``,
            ``"labels"`` Int64[D], ``"scores"`` Float[D], optionally ``"masks"`` Float[D, 1, H, W]
            probabilities.
        image_ids (list[int]): the COCO image id of each output.
        label_to_category_id (dict): model label (1..K) -> COCO category id.
        mask_threshold (float): a pixel belongs to the mask when its probability is ``>`` this.

    Returns:
        list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` dicts (+
        ``"segmentation"``: compressed RLE ``{"size": [H, W], "counts": str}`` with masks).
    """
    if len(outputs) != len(image_ids):
        raise UserError(f"results_from_predictions: {len(outputs)} outputs but {len(image_ids)} image ids")
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu().double().reshape(-1, 4)  # (D, 4) x1, y1, x2, y2
        labels = output["labels"].detach().cpu().reshape(-1).tolist()
        scores = output["scores"].detach().cpu().reshape(-1).tolist()
        rles = None
        if "masks" in output:
            masks = output["masks"].detach().cpu()
            masks = masks.reshape(len(labels), *masks.shape[-2:])  # (D, 1, H, W) -> (D, H, W)
            binary = (masks > mask_threshold).numpy().astype(np.uint8)
            # pycocotools wants (H, W, D) in Fortran order: (D, H, W) -> (H, W, D)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(labels) else []
        for d, (label, score) in enumerate(zip(labels, scores)):
            segmentation = None if rles is None else {"size": [int(s) for s in rles[d]["size"]],
                                                      "counts": rles[d]["counts"].decode("ascii")}
            results.append(coco_result(image_id, label, boxes[d].tolist(), score, label_to_category_id,
                                       segmentation))
    return results


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset, device=None, batch_size: int = 2, progress: bool = True,
                   max_images: int | None = None) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and compute COCO box and mask metrics (from scratch).

    Args:
        model: a Mask R-CNN; put in eval mode for the run (its mode is restored afterwards).
        dataset: a ``DetectionDataset`` (``mrcnn_edu.data``): ``dataset[i] -> (image, target)``
            with ``target["image_id"]``, plus ``coco_gt()`` and ``label_to_category_id``. Use
            it without augmentations: predictions are compared with ``coco_gt()``'s geometry.
        device: where to run (the model is moved there); ``None`` = where its parameters are.
        batch_size (int): images per forward pass.
        progress (bool): show a tqdm progress bar.
        max_images (int, optional): evaluate only the first ``max_images`` images (the ground
            truth is restricted to them).

    Returns:
        ``{"bbox": metrics, "segm": metrics, "results": list}``, metrics as :func:`evaluate`
        (``"segm"`` only when the model predicts masks).
    """
    from tqdm.auto import tqdm

    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    else:
        device = torch.device(device)
        model.to(device)
    num_images = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    was_training = model.training
    model.eval()
    outputs, image_ids = [], []
    try:
        with tqdm(total=num_images, desc="evaluate", disable=not progress, unit="img") as bar:
            for start in range(0, num_images, batch_size):
                batch = [dataset[i] for i in range(start, min(start + batch_size, num_images))]
                images = [image.to(device) for image, _ in batch]
                for output in model(images):
                    outputs.append({key: value.cpu() for key, value in output.items()})
                image_ids += [int(target["image_id"]) for _, target in batch]
                bar.update(len(batch))
    finally:
        model.train(was_training)

    gt = dataset.coco_gt()
    if num_images < len(dataset):  # only the images we ran the model on
        keep = set(image_ids)
        gt = {**gt, "images": [img for img in gt["images"] if img["id"] in keep],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    results = results_from_predictions(outputs, image_ids, dataset.label_to_category_id)
    metrics: dict[str, Any] = {"bbox": evaluate(gt, results, "bbox")}
    if all("masks" in output for output in outputs):
        metrics["segm"] = evaluate(gt, results, "segm")
    metrics["results"] = results
    return metrics


def format_table(metrics_by_type: Mapping[str, Any]) -> str:
    """COCO's summary as a table: one row per metric, one column per iou type.

    Args:
        metrics_by_type (dict): ``{"bbox": metrics, "segm": metrics}`` (the output of
            :func:`evaluate_model` works; entries that are not metric dicts are skipped).

    Returns:
        str: the table (``n/a`` where COCO gives -1: no ground truth of that size).
    """
    columns = {name: m for name, m in metrics_by_type.items()
               if isinstance(m, Mapping) and all(key in m for key in METRIC_KEYS)}
    header = f"{'metric':<7}{'IoU':>10}  {'area':<7}{'maxDets':>7}" + "".join(f"{name:>9}" for name in columns)
    lines = [header, "-" * len(header)]
    any_missing = False
    for key, (_, iou_threshold, area, max_det) in METRICS.items():
        iou = "0.50:0.95" if iou_threshold is None else f"{iou_threshold:.2f}"
        cells = []
        for metrics in columns.values():
            value = float(metrics[key])
            any_missing |= value == NO_GROUND_TRUTH
            cells.append(f"{'n/a':>9}" if value == NO_GROUND_TRUTH else f"{value:>9.3f}")
        lines.append(f"{key:<7}{iou:>10}  {area:<7}{max_det:>7}" + "".join(cells))
    if any_missing:
        lines.append("n/a: no ground-truth object in that setting (COCO reports -1)")
    return "\n".join(lines)
