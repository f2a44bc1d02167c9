"""Tests for mrcnn_edu.error_analysis: hand-made fixtures with known answers (counts, reasons, recall
by size and attribute, leakage to the pixel, the threshold sweep), agreement with
evaluation.find_errors, edge cases (no predictions, no ground truth, crowds, boxes only), and a
smoke test of every plot and of the error gallery."""

from __future__ import annotations

import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")  # the test process only

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mrcnn_edu import error_analysis as ea
from mrcnn_edu.evaluation import evaluate_detailed, find_errors, mask_iou
from mrcnn_edu.utils import UserError

# pycocotools' compiled code trips a numpy 2 DeprecationWarning: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H = W = 64


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def disc(cx: int, cy: int, r: int, h: int = H, w: int = W) -> np.ndarray:
    """UInt8[H, W]: the pixels within ``r`` of (cx, cy); its box is 2r + 1 pixels wide."""
    yy, xx = np.mgrid[:h, :w]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8)


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))]


def annotation(ann_id: int, image_id: int, mask: np.ndarray, **attributes) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": rle(mask), "area": int(mask.sum()),
            "bbox": bbox(mask), "iscrowd": 0, **attributes}


def result(image_id: int, mask: np.ndarray, score: float) -> dict:
    return {"image_id": image_id, "category_id": 1, "segmentation": rle(mask), "bbox": bbox(mask), "score": score}


def leaky(mask: np.ndarray) -> np.ndarray:
    """Disc B minus 5 pixels inside it plus a 3 x 4 block (12 pixels) outside it."""
    out = mask.copy()
    assert out[20, 38:43].all()
    out[20, 38:43] = 0  # 5 tank pixels missed
    assert not out[40:43, 56:60].any()
    out[40:43, 56:60] = 1  # 12 pixels leaked
    return out


# ground truth: 5 tanks on 2 images (diameters 13, 17, 7, 25, 11 px)
A, B, C = disc(14, 14, 6), disc(44, 20, 8), disc(12, 50, 3)
D, E = disc(32, 32, 12), disc(10, 54, 5)
B_PRED = leaky(B)


def fixture() -> tuple[dict, list[dict]]:
    """Predictions: A perfect (0.92); B leaking 12 px and missing 5 (0.83); a false positive on the
    background (0.61); C found with a low score (0.33); D perfect (0.995) and again, shifted by one
    pixel (0.72, a duplicate); E poorly located (shifted 5 px, 0.55)."""
    gt = {
        "images": [{"id": 1, "height": H, "width": W, "file_name": "a.png", "biome": "arid"},
                   {"id": 2, "height": H, "width": W, "file_name": "b.png", "biome": "temperate"}],
        "categories": [{"id": 1, "name": "oil-storage-tank"}],
        "annotations": [
            annotation(1, 1, A, roof="floating", truncated=False, fill=0.2),
            annotation(2, 1, B, roof="fixed", truncated=False, fill=0.6),
            annotation(3, 1, C, roof="dark", truncated=True, fill=0.9),
            annotation(4, 2, D, roof="floating", truncated=False, fill=0.7),
            annotation(5, 2, E, roof="dark", truncated=False, fill=0.1),
        ],
    }
    results = [
        result(1, A, 0.92),
        result(1, B_PRED, 0.83),
        result(1, disc(50, 50, 4), 0.61),
        result(1, C, 0.33),
        result(2, D, 0.995),
        result(2, disc(33, 32, 12), 0.72),
        result(2, disc(15, 54, 5), 0.55),
    ]
    return gt, results


def test_fixture_is_what_the_docstring_says():
    assert mask_iou(disc(33, 32, 12)[None], D[None])[0, 0] >= 0.5  # the duplicate would match D
    assert 0.1 < mask_iou(disc(15, 54, 5)[None], E[None])[0, 0] < 0.5  # E: a localisation error
    assert mask_iou(disc(50, 50, 4)[None], np.stack([A, B, C]))[0].max() == 0  # background
    assert [bbox(m)[2] for m in (A, B, C, D, E)] == [13, 17, 7, 25, 11]


# ---------------------------------------------------------------------------------------------
# Counts, reasons, breakdowns, leakage
# ---------------------------------------------------------------------------------------------


def test_counts_and_reasons_by_hand():
    gt, results = fixture()
    report = ea.analyse(gt, results, iou_threshold=0.5, score_threshold=0.5)
    assert (report.tp, report.fp, report.fn, report.ignored) == (3, 3, 2, 0)
    assert (report.num_gt, report.num_predictions, report.num_kept, report.num_images) == (5, 7, 6, 2)
    assert report.precision == pytest.approx(3 / 6)
    assert report.recall == pytest.approx(3 / 5)
    assert report.f1 == pytest.approx(2 * 3 / (2 * 3 + 3 + 2))
    # false positives, best score first, each with its reason
    assert [(e["result_index"], e["reason"]) for e in report.false_positives] == [
        (5, "duplicate"), (2, "background"), (6, "localisation")]
    assert report.fp_reasons == {"background": 1, "localisation": 1, "duplicate": 1}
    # misses, largest first: E poorly located (11 px), C found at 0.33 only (7 px)
    misses = [(e["annotation_index"], e["reason"]) for e in report.false_negatives]
    assert misses == [(4, "localisation"), (2, "low_score")]
    assert report.fn_reasons == {"missed": 0, "localisation": 1, "low_score": 1}
    c = report.false_negatives[1]
    assert c["matched_score"] == 0.33 and c["matched_result_index"] == 3 and c["size"] == 7
    assert c["attributes"] == {"roof": "dark", "truncated": True, "fill": 0.9}
    assert 0.1 < report.false_negatives[0]["best_iou"] < 0.5
    assert sorted(m["annotation_index"] for m in report.matches) == [0, 1, 3]


def test_a_gt_with_no_prediction_at_all_is_missed():
    gt, results = fixture()
    report = ea.analyse(gt, [r for i, r in enumerate(results) if i != 3], score_threshold=0.5)
    assert {e["annotation_index"]: e["reason"] for e in report.false_negatives}[2] == "missed"
    assert report.false_negatives[1]["matched_score"] is None and report.false_negatives[1]["best_iou"] == 0.0


def test_recall_by_size_bins():
    gt, results = fixture()
    report = ea.analyse(gt, results)
    rows = {r["bin"]: r for r in report.by_size}
    assert list(rows) == ["0-16", "16-24", "24-32", "32-48", "48-64", "64+"]
    # ground truths: A (13), C (7), E (11) small; B (17); D (25)
    assert (rows["0-16"]["n"], rows["0-16"]["found"]) == (3, 1) and rows["0-16"]["recall"] == pytest.approx(1 / 3)
    assert (rows["16-24"]["n"], rows["16-24"]["found"], rows["16-24"]["recall"]) == (1, 1, 1.0)
    assert (rows["24-32"]["n"], rows["24-32"]["found"], rows["24-32"]["recall"]) == (1, 1, 1.0)
    for label in ("32-48", "48-64", "64+"):
        assert rows[label]["n"] == 0 and math.isnan(rows[label]["recall"])
    # kept predictions binned by their own box: A 13, background 9, E-shift 11 | B leaky 24 wide, D 25, dup 25
    assert (rows["0-16"]["predictions"], rows["0-16"]["fp"]) == (3, 2)
    assert (rows["24-32"]["predictions"], rows["24-32"]["fp"]) == (3, 1)
    # custom bins: [0, 10) [10, 20] -> C | A, B, E; D outside every bin
    custom = ea.analyse(gt, results, size_bins=(0, 10, 20))
    assert [(r["bin"], r["n"], r["found"]) for r in custom.by_size] == [("0-10", 1, 0), ("10-20", 3, 2)]
    assert ea.analyse(gt, results, size_bins=(0, 13, 25)).by_size[1]["n"] == 3  # last bin closed: 13, 17, 25


def test_recall_by_attribute():
    gt, results = fixture()
    report = ea.analyse(gt, results, attribute_bins={"fill": (0, 0.5, 1.0)})
    table = {name: {r["value"]: (r["n"], r["found"]) for r in rows} for name, rows in report.by_attribute.items()}
    # string/boolean attributes are found automatically; fill (a number) only when binned
    assert set(table) == {"roof", "truncated", "image.biome", "fill"}
    assert table["roof"] == {"dark": (2, 0), "fixed": (1, 1), "floating": (2, 2)}
    assert table["truncated"] == {False: (4, 3), True: (1, 0)}
    assert table["image.biome"] == {"arid": (3, 2), "temperate": (2, 1)}
    assert table["fill"] == {"0-0.5": (2, 1), "0.5-1": (3, 2)}  # A, E | B, C, D
    only = ea.analyse(gt, results, attributes=["roof", "no_such_key"])
    assert list(only.by_attribute) == ["roof"]


def test_leakage_exact():
    gt, results = fixture()
    report = ea.analyse(gt, results)
    b_area, a_area, d_area = int(B.sum()), int(A.sum()), int(D.sum())
    pair = next(m for m in report.matches if m["annotation_index"] == 1)
    assert pair["pred_area"] == b_area - 5 + 12 == int(B_PRED.sum())
    assert (pair["leak_area"], pair["missed_area"], pair["gt_area"]) == (12, 5, b_area)
    leak_fraction = 12 / (b_area + 7)
    assert pair["leak_fraction"] == pytest.approx(leak_fraction, abs=1e-15)
    assert pair["under_coverage"] == pytest.approx(5 / b_area, abs=1e-15)
    assert pair["leak_width"] == pytest.approx(12 / (2 * math.sqrt(math.pi * b_area)))
    assert pair["iou"] == pytest.approx((b_area - 5) / (b_area + 12))
    for m in report.matches:
        if m["annotation_index"] != 1:
            assert m["leak_area"] == m["missed_area"] == 0 and m["leak_fraction"] == 0.0
    leak = report.leakage
    assert leak["n"] == 3 and leak["leaking"] == 1
    assert leak["leak_fraction"]["mean"] == pytest.approx(leak_fraction / 3)
    assert leak["leak_fraction"]["median"] == 0.0
    assert leak["leak_fraction"]["p90"] == pytest.approx(0.8 * leak_fraction)  # [0, 0, x]: linear interpolation
    assert leak["leak_fraction"]["pooled"] == pytest.approx(12 / (a_area + b_area + 7 + d_area))
    assert leak["under_coverage"]["pooled"] == pytest.approx(5 / (a_area + b_area + d_area))
    assert (leak["leak_area"]["total"], leak["missed_area"]["total"]) == (12, 5)
    assert leak["leak_area"]["mean"] == pytest.approx(4.0)
    # a mask dilated by one pixel leaks about one pixel of width
    dilated = disc(32, 32, 13)
    halo = ea.analyse(gt, [result(2, dilated, 0.9)]).matches[0]
    assert halo["leak_area"] == int(dilated.sum() - D.sum())
    assert 0.8 < halo["leak_width"] < 1.2


def test_rle_iou_equals_dense_mask_iou():
    gt, results = fixture()
    preds = [r for r in results if r["image_id"] == 1]
    ours = mask_utils.iou([r["segmentation"] for r in preds], [a["segmentation"] for a in gt["annotations"][:3]],
                          [0, 0, 0])
    pred_masks = [B_PRED if i == 1 else mask_utils.decode(r["segmentation"]) for i, r in enumerate(preds)]
    dense = mask_iou(np.stack(pred_masks), np.stack([A, B, C]))
    np.testing.assert_array_equal(ours, dense)


# ---------------------------------------------------------------------------------------------
# The threshold sweep
# ---------------------------------------------------------------------------------------------


def test_threshold_sweep_by_hand():
    gt, results = fixture()
    # scores: TP .92 (A), TP .83 (B), FP .61, TP .33 (C), TP .995 (D), FP .72, FP .55; 5 ground truths
    expected = {0.3: (7, 4, 3), 0.5: (6, 3, 3), 0.6: (5, 3, 2), 0.65: (4, 3, 1), 0.75: (3, 3, 0),
                0.85: (2, 2, 0), 0.95: (1, 1, 0), 0.99: (1, 1, 0), 1.0: (0, 0, 0)}
    rows = ea.threshold_sweep(gt, results, thresholds=list(expected))
    assert [r["threshold"] for r in rows] == list(expected)
    for row in rows:
        kept, tp, fp = expected[row["threshold"]]
        assert (row["kept"], row["tp"], row["fp"], row["fn"]) == (kept, tp, fp, 5 - tp)
        assert row["recall"] == pytest.approx(tp / 5)
        assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + 5 - tp))
        if kept:
            assert row["precision"] == pytest.approx(tp / kept)
        else:
            assert math.isnan(row["precision"])
    # default thresholds: 0.05 ... 0.95 and 0.99; recall never rises with the threshold
    default = ea.threshold_sweep(gt, results)
    assert [r["threshold"] for r in default] == [round(0.05 * i, 2) for i in range(1, 20)] + [0.99]
    assert all(a["recall"] >= b["recall"] for a, b in itertools.pairwise(default))
    # the report carries the same rows and the cost of 0.99
    report = ea.analyse(gt, results, score_threshold=0.5)
    assert report.threshold_sweep([0.5, 0.99]) == ea.threshold_sweep(gt, results, [0.5, 0.99])
    assert report.threshold_cost["recall"] == pytest.approx(0.6)
    assert report.threshold_cost["recall_at_original"] == pytest.approx(0.2)
    assert report.threshold_cost["recall_lost"] == pytest.approx(0.4)
    assert report.threshold_cost["extra_misses"] == 2
    # a different IoU threshold: at 0.2 the shifted E prediction (IoU about 0.27) matches
    loose = {r["threshold"]: r for r in ea.threshold_sweep(gt, results, [0.5], iou_threshold=0.2)}
    assert (loose[0.5]["tp"], loose[0.5]["fp"]) == (4, 2)


def test_sweep_agrees_with_analyse_at_every_threshold():
    gt, results = fixture()
    for row in ea.threshold_sweep(gt, results, thresholds=(0.1, 0.4, 0.58, 0.7, 0.9)):
        report = ea.analyse(gt, results, score_threshold=row["threshold"])
        assert (report.tp, report.fp, report.fn) == (row["tp"], row["fp"], row["fn"])


# ---------------------------------------------------------------------------------------------
# Agreement with evaluation.find_errors
# ---------------------------------------------------------------------------------------------


def _find_errors_at(gt, results, score_threshold, iou_type="segm"):
    """TP/FP result indices and FN annotation indices from evaluation.find_errors, on the kept results."""
    kept = [i for i, r in enumerate(results) if r["score"] >= score_threshold]
    errors = find_errors(evaluate_detailed(gt, [results[i] for i in kept], iou_type), iou_threshold=0.5)
    tp = sorted(kept[i] for e in errors.values() for i in e["true_positives"])
    fp = sorted(kept[i] for e in errors.values() for i in e["false_positives"])
    fn = sorted(i for e in errors.values() for i in e["false_negatives"])
    return tp, fp, fn


def _ours(report):
    return (sorted(m["result_index"] for m in report.matches),
            sorted(e["result_index"] for e in report.false_positives),
            sorted(e["annotation_index"] for e in report.false_negatives))


@pytest.mark.parametrize("score_threshold", [0.0, 0.5, 0.8, 0.99])
def test_agrees_with_find_errors_on_the_fixture(score_threshold):
    gt, results = fixture()
    report = ea.analyse(gt, results, score_threshold=score_threshold)
    assert _ours(report) == _find_errors_at(gt, results, score_threshold)


def synthetic(n_tiles: int = 3, size: int = 96, seed: int = 0):
    """Synthetic tiles with perturbed ground truth as fake predictions (shifted, grown, shrunk,
    dropped), false positives on the tiles' distractors, and random scores."""
    from mrcnn_edu.oil_tanks import make_tile

    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "oil-storage-tank"}]}
    results, images = [], {}
    for image_id in range(1, n_tiles + 1):
        tile = make_tile(size, seed=seed * 100 + image_id, n_groups=2)
        images[image_id] = tile.image
        gt["images"].append({"id": image_id, "height": size, "width": size})
        for tank, mask in zip(tile.tanks, tile.target["masks"].numpy()):
            gt["annotations"].append(annotation(len(gt["annotations"]) + 1, image_id, mask, roof=tank.roof))
            if rng.random() < 0.2:
                continue  # missed
            r = tank.radius + rng.choice([-1.5, 0, 0, 1, 2])
            dx, dy = rng.normal(0, 0.25 * tank.radius, 2)
            yy, xx = np.mgrid[:size, :size]
            pred = (((xx + 0.5 - tank.cx - dx) ** 2 + (yy + 0.5 - tank.cy - dy) ** 2) <= r * r).astype(np.uint8)
            if pred.sum():
                results.append(result(image_id, pred, float(rng.uniform(0.2, 1.0))))
        for d in tile.distractors[:3]:
            pred = disc(int(d.cx), int(d.cy), max(2, int(d.radius)), size, size)
            if pred.sum():
                results.append(result(image_id, pred, float(rng.uniform(0.2, 0.9))))
    return gt, results, images


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_find_errors_on_synthetic_tiles(seed):
    gt, results, _ = synthetic(seed=seed)
    assert len(gt["annotations"]) >= 4 and len(results) >= 4
    for score_threshold in (0.3, 0.6):
        report = ea.analyse(gt, results, score_threshold=score_threshold)
        ours = _ours(report)
        assert ours == _find_errors_at(gt, results, score_threshold)
        assert (report.tp, report.fp, report.fn) == tuple(len(x) for x in ours)
        # leakage against a dense count, pair by pair
        for m in report.matches:
            pred = mask_utils.decode(results[m["result_index"]]["segmentation"]).astype(bool)
            true = mask_utils.decode(gt["annotations"][m["annotation_index"]]["segmentation"]).astype(bool)
            assert m["leak_area"] == int((pred & ~true).sum()) and m["missed_area"] == int((true & ~pred).sum())
            assert m["leak_fraction"] == pytest.approx((pred & ~true).sum() / pred.sum())


def test_boxes_only():
    gt, results = fixture()
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    report = ea.analyse(gt, boxes, iou_type="bbox")
    assert _ours(report) == _find_errors_at(gt, boxes, 0.5, "bbox")
    assert report.leakage == {"n": 0} and "leak_area" not in report.matches[0]
    with pytest.raises(UserError, match="segmentation"):
        ea.analyse(gt, boxes, iou_type="segm")
    # boxes matched, masks present: leakage still measured (B's leak, 20 px away, stretches its box
    # to 24 x 31 px: box IoU 289 / 744, no match)
    by_box = ea.analyse(gt, results, iou_type="bbox")
    assert by_box.tp == by_box.leakage["n"] == 2 and 1 not in [m["annotation_index"] for m in by_box.matches]


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


def test_no_predictions():
    gt, _ = fixture()
    report = ea.analyse(gt, [])
    assert (report.tp, report.fp, report.fn) == (0, 0, 5)
    assert math.isnan(report.precision) and report.recall == 0.0 and report.f1 == 0.0
    assert report.leakage == {"n": 0} and report.fn_reasons["missed"] == 5
    assert all(r["tp"] == 0 and math.isnan(r["precision"]) for r in ea.threshold_sweep(gt, []))
    json.dumps(report.to_dict(), allow_nan=False)


def test_no_ground_truth():
    gt, results = fixture()
    empty = {**gt, "annotations": []}
    report = ea.analyse(empty, results)
    assert (report.tp, report.fp, report.fn) == (0, 6, 0)
    assert report.precision == 0.0 and math.isnan(report.recall) and report.f1 == 0.0
    assert report.fp_reasons == {"background": 6, "localisation": 0, "duplicate": 0}
    assert all(r["n"] == 0 for r in report.by_size) and report.by_attribute == {}
    text = report.summary_table()
    assert "TP 0  FP 6  FN 0" in text
    json.dumps(report.to_dict(max_errors=10), allow_nan=False)
    nothing = ea.analyse({**gt, "annotations": []}, [])
    assert (nothing.tp, nothing.fp, nothing.fn) == (0, 0, 0) and math.isnan(nothing.f1)


def test_crowd_regions_are_ignored():
    gt, _ = fixture()
    crowd = {**annotation(9, 1, disc(50, 50, 6), roof="floating"), "iscrowd": 1}
    gt = {**gt, "annotations": gt["annotations"] + [crowd]}
    report = ea.analyse(gt, [result(1, disc(50, 50, 4), 0.9), result(1, A, 0.8)])
    assert (report.tp, report.fp, report.fn, report.ignored) == (1, 0, 4, 1)
    assert report.num_gt == 5  # the crowd does not count


def test_max_det_keeps_the_best_predictions():
    gt, results = fixture()
    report = ea.analyse(gt, results, max_det=1, score_threshold=0.0)  # one prediction per image: .92 and .995
    assert (report.tp, report.fp, report.num_predictions) == (2, 0, 2)


def test_bad_inputs():
    gt, results = fixture()
    with pytest.raises(UserError, match="size_bins"):
        ea.analyse(gt, results, size_bins=(0, 32, 16))
    with pytest.raises(UserError, match="iou_threshold"):
        ea.analyse(gt, results, iou_threshold=0)
    with pytest.raises(UserError, match="image_id 7"):
        ea.analyse(gt, [result(7, A, 0.9)])
    with pytest.raises(UserError, match="iou_type"):
        ea.threshold_sweep(gt, results, iou_type="mask")
    with pytest.raises(UserError, match="size"):
        ea.analyse(gt, [result(1, np.ones((32, 32), np.uint8), 0.9)])
    with pytest.raises(UserError, match="thresholds"):
        ea.threshold_sweep(gt, results, thresholds=[])
    with pytest.raises(UserError, match="score_threshold"):
        ea.analyse(gt, results, score_threshold=float("nan"))


def test_to_dict_and_summary_table():
    gt, results = fixture()
    report = ea.analyse(gt, results, attribute_bins={"fill": (0, 0.5, 1)})
    summary = report.to_dict()
    text = json.dumps(summary, allow_nan=False)  # strict JSON: nan became null
    back = json.loads(text)
    assert (back["tp"], back["fp"], back["fn"]) == (3, 3, 2)
    assert back["by_size"][-1]["recall"] is None and back["by_size"][-1]["hi"] is None
    assert back["leakage"]["leak_area"]["total"] == 12
    assert back["threshold_cost"]["extra_misses"] == 2
    assert "false_positives" not in back
    assert len(report.to_dict(max_errors=2)["false_positives"]) == 2
    table = report.summary_table()
    for needle in ("TP 3  FP 3  FN 2", "precision 0.500", "recall 0.600", "1 duplicate", "1 low score",
                   "Recall by roof", "dark", "Mask leakage (3 matched pairs)", "at 0.99", "2 more objects missed"):
        assert needle in table, needle
    assert "TP=3 FP=3 FN=2" in repr(report)


# ---------------------------------------------------------------------------------------------
# Plots and the gallery
# ---------------------------------------------------------------------------------------------


def test_plots():
    gt, results = fixture()
    report = ea.analyse(gt, results)
    fig = ea.plot_recall_by_size(report)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == len(report.by_size)
    assert [round(p.get_height(), 3) for p in fig.axes[0].patches][:3] == [0.333, 1.0, 1.0]
    plt.close(fig)
    fig = ea.plot_threshold_sweep(ea.threshold_sweep(gt, results))
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 3 + 2  # precision, recall, F1 + two marks
    assert "costs 0.40 recall (2 more misses)" in ax.get_title()
    plt.close(fig)
    fig = ea.plot_leakage(report)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 2 * 20
    plt.close(fig)
    fig, ax = plt.subplots()
    assert ea.plot_leakage(ea.analyse(gt, []), ax=ax) is fig  # nothing to show: a note
    plt.close(fig)


def test_error_gallery():
    gt, results = fixture()
    report = ea.analyse(gt, results)
    images = {1: torch.rand(3, H, W), 2: torch.rand(3, H, W)}
    fig = ea.error_gallery(images, report, kind="fp")
    assert len(fig.axes) == 3
    assert "duplicate" in fig.axes[0].get_title()
    plt.close(fig)
    fig = ea.error_gallery(images, report, kind="fn", crop_margin=4)
    assert len(fig.axes) == 2 and "low score · 0.33" in fig.axes[1].get_title()
    crop = fig.axes[1].images[0].get_array()
    assert crop.shape[:2] == (7 + 8, 7 + 8)  # C's box plus 4 px each side
    plt.close(fig)
    assert len(ea.error_gallery(images, report, kind="fp", max_items=2).axes) == 2
    assert len(ea.error_gallery({2: images[2]}, report, kind="fp").axes) == 2  # image 1 not given
    fig = ea.error_gallery(images, report, kind="fn", reason="missed")
    assert len(fig.axes) == 1 and "no false negatives (missed)" in fig.axes[0].texts[0].get_text()
    plt.close("all")
    with pytest.raises(UserError, match="kind"):
        ea.error_gallery(images, report, kind="tp")
    with pytest.raises(UserError, match="none of the images"):
        ea.error_gallery({3: images[1]}, report, kind="fp")


def test_gallery_loads_only_the_images_it_shows():
    from collections.abc import Mapping

    class Lazy(Mapping):  # like a data set that reads images from disk on demand
        def __init__(self):
            self.loads = []

        def __getitem__(self, image_id):
            if image_id not in (1, 2):
                raise KeyError(image_id)
            self.loads.append(image_id)
            return torch.rand(3, H, W)

        def __iter__(self):
            return iter((1, 2))

        def __len__(self):
            return 2

    gt, results = fixture()
    report = ea.analyse(gt, results)
    images = Lazy()
    plt.close(ea.error_gallery(images, report, kind="fp"))  # 3 false positives: 2 on image 2, 1 on image 1
    assert sorted(images.loads) == [1, 2]
    images.loads.clear()
    plt.close(ea.error_gallery(images, report, kind="fp", max_items=1))
    assert images.loads == [2]


def test_gallery_on_synthetic_tiles(tmp_path):
    gt, results, images = synthetic(n_tiles=2, seed=3)
    report = ea.analyse(gt, results, score_threshold=0.5)
    for kind, expected in (("fp", report.fp), ("fn", report.fn)):
        fig = ea.error_gallery(images, report, kind=kind, max_items=5)
        assert len(fig.axes) == max(1, min(5, expected))
        fig.savefig(tmp_path / f"{kind}.png", dpi=40)
        plt.close(fig)
