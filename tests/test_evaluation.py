"""Tests for mrcnn_edu.evaluation: our COCO evaluation equals pycocotools' COCOeval (the 12
numbers *and* the full precision/recall arrays, to 1e-6) on many fixtures, for boxes and masks;
hand-checkable golden values for the teaching helpers; the pycocotools wrapper's pitfalls;
results_from_predictions, evaluate_model and format_table."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_edu.data import decode_segmentation
from mrcnn_edu.evaluation import (AREA_RANGES, IOU_THRESHOLDS, MAX_DETS, METRIC_KEYS, RECALL_THRESHOLDS, UNMATCHED,
                                  average_precision_101, box_iou_xywh, confusion_matrix, evaluate,
                                  evaluate_detailed, evaluate_image, evaluate_model, evaluate_pycocotools,
                                  find_errors, format_table, interpolated_precision, mask_iou, match_detections,
                                  precision_envelope, precision_recall, precision_recall_curve, prepare_coco_gt,
                                  results_from_predictions)
from mrcnn_edu.utils import UserError

# pycocotools' decode trips a numpy 2 DeprecationWarning on every call: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-6
IOU_TYPES = ("bbox", "segm")

# ---------------------------------------------------------------------------------------------
# Building COCO fixtures
# ---------------------------------------------------------------------------------------------


def rle(mask: np.ndarray) -> dict:
    """UInt8[H, W] -> compressed RLE with counts as str (what our results carry)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """UInt8[H, W] -> COCO's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def shape_mask(h: int, w: int, box, ellipse: bool) -> np.ndarray:
    """A rectangle or an ellipse filling ``box`` = (x, y, bw, bh), clipped to the image."""
    x, y, bw, bh = box
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    if ellipse:
        cx, cy = x + bw / 2, y + bh / 2
        inside = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
    else:
        inside = (xx >= x) & (xx < x + bw) & (yy >= y) & (yy < y + bh)
    return inside.astype(np.uint8)


def mask_bbox(mask: np.ndarray) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))]


def gt_annotation(ann_id, image_id, category_id, mask, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "bbox": mask_bbox(mask), "area": float(mask.sum()),
            "segmentation": uncompressed_rle(mask) if iscrowd else rle(mask)}


def prediction(image_id, category_id, score, box, mask):
    return {"image_id": image_id, "category_id": category_id, "score": float(score),
            "bbox": [float(v) for v in box], "segmentation": rle(mask)}


def categories(ids):
    return [{"id": i, "name": f"class{i}"} for i in ids]


def random_fixture(seed: int, num_images: int = 20, crowd_prob: float = 0.1, max_gt: int = 14,
                   score_decimals: int = 2):
    """Random ground truth and predictions: every area range, crowds, wrong classes, duplicates,
    false positives, images without ground truth, scores rounded to make ties, a category
    annotated but never predicted (5) and one predicted but never annotated (9)."""
    rng = np.random.default_rng(seed)
    cat_ids = [1, 3, 7]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        h, w = int(rng.integers(120, 300)), int(rng.integers(120, 300))
        images.append({"id": image_id * 10, "height": h, "width": w, "file_name": f"{image_id}.png"})
        num_gt = int(rng.integers(1, max_gt + 1)) if image_id % 4 else 0  # every 4th image: no gt
        # image 1 also holds squares of area exactly 32² and 96² (both ends of a range count)
        boundary = [(5.0, 5.0, 32.0, 32.0), (10.0, 20.0, 96.0, 96.0)] if image_id == 1 else []
        for i in range(num_gt + len(boundary)):
            if i < len(boundary):
                x, y, bw, bh = boundary[i]
                ellipse = False
            else:
                side, aspect = np.exp(rng.uniform(np.log(4), np.log(200))), np.exp(rng.uniform(-0.7, 0.7))
                bw, bh = side * aspect, side / aspect
                bw, bh = min(bw, w - 1), min(bh, h - 1)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                ellipse = bool(rng.random() < 0.5)
            mask = shape_mask(h, w, (x, y, bw, bh), ellipse=ellipse)
            if mask.sum() == 0:
                continue
            category_id = 5 if (image_id, i) == (2, 0) else int(rng.choice(cat_ids))
            iscrowd = int(rng.random() < crowd_prob)
            annotations.append(gt_annotation(len(annotations) + 1, image_id * 10, category_id, mask, iscrowd))
            for _ in range(int(rng.choice([0, 1, 1, 1, 2, 3]))):  # missed, found, found twice...
                jitter = rng.normal(0, 0.12, size=4) * [bw, bh, bw, bh]
                box = np.array([x, y, bw, bh]) + jitter
                box[2:] = np.maximum(box[2:], 1.0)
                pred_mask = shape_mask(h, w, box + rng.normal(0, 1.0, size=4), ellipse=bool(rng.random() < 0.5))
                if category_id == 5:
                    continue  # category 5 is annotated but never predicted
                predicted = category_id if rng.random() > 0.1 else int(rng.choice(cat_ids + [9]))
                score = round(rng.random(), score_decimals)
                results.append(prediction(image_id * 10, predicted, score, box, pred_mask))
        for _ in range(int(rng.integers(0, 5))):  # false positives anywhere
            bw, bh = np.minimum(np.exp(rng.uniform(np.log(3), np.log(120), size=2)), [w - 1, h - 1])
            box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
            score = round(rng.random(), score_decimals)
            results.append(prediction(image_id * 10, int(rng.choice(cat_ids + [9])), score, box,
                                      shape_mask(h, w, box, ellipse=False)))
    gt = {"images": images, "annotations": annotations, "categories": categories(cat_ids + [5, 9])}
    return gt, results


# ---------------------------------------------------------------------------------------------
# The reference: pycocotools itself, called directly
# ---------------------------------------------------------------------------------------------


def reference(gt: dict, results: list, iou_type: str):
    """pycocotools' (stats dict, precision [T,R,K,A,M], recall [T,K,A,M]) on copies of the inputs."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        if results:
            coco_dt = coco.loadRes(copy.deepcopy(results))
        else:  # loadRes crashes on []: an empty result set by hand
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = dict(zip(METRIC_KEYS, map(float, evaluator.stats)))
    return stats, evaluator.eval["precision"], evaluator.eval["recall"]


MAX_DIFF = {"value": 0.0}


def assert_same_as_pycocotools(gt: dict, results: list, iou_type: str) -> dict:
    """Our evaluation, the wrapper and pycocotools agree; returns our stats."""
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    ours = evaluate_detailed(gt, results, iou_type)
    stats, precision, recall = reference(gt, results, iou_type)
    assert ours.precision.shape == precision.shape and ours.recall.shape == recall.shape
    diff = max(np.abs(ours.precision - precision).max(), np.abs(ours.recall - recall).max(),
               max(abs(ours.stats[k] - stats[k]) for k in METRIC_KEYS))
    MAX_DIFF["value"] = max(MAX_DIFF["value"], float(diff))
    np.testing.assert_allclose(ours.precision, precision, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.recall, recall, rtol=0, atol=TOL)
    for key in METRIC_KEYS:
        assert ours.stats[key] == pytest.approx(stats[key], abs=TOL), (key, ours.stats[key], stats[key])
    wrapped = evaluate_pycocotools(gt, results, iou_type)
    for key in METRIC_KEYS:
        assert wrapped[key] == pytest.approx(stats[key], abs=TOL), key
    assert gt == gt_before and results == results_before  # nobody mutated the caller's dicts
    return ours.stats


# ---------------------------------------------------------------------------------------------
# Fixtures compared with pycocotools
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_random_predictions_equal_pycocotools(seed, iou_type):
    gt, results = random_fixture(seed)
    assert len(results) > 150 and len(gt["annotations"]) > 80  # hundreds of boxes
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    assert 0 < stats["AP50"] < 1  # a non-trivial fixture


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_fixture_covers_every_case(seed):
    """The random fixtures exercise what they claim to (areas, crowds, empty images, ties)."""
    gt, results = random_fixture(seed)
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    assert (areas == 32**2).any() and (areas == 96**2).any()
    pred_areas = np.array([r["bbox"][2] * r["bbox"][3] for r in results])
    assert (pred_areas < 32**2).any() and (pred_areas > 96**2).any()
    assert any(a["iscrowd"] for a in gt["annotations"])
    assert {img["id"] for img in gt["images"]} - {a["image_id"] for a in gt["annotations"]}
    scores = [r["score"] for r in results]
    assert len(set(scores)) < len(scores)
    annotated = {a["category_id"] for a in gt["annotations"]}
    predicted = {r["category_id"] for r in results}
    assert 5 in annotated - predicted and 9 in predicted - annotated


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_crowd_free_multi_class(iou_type):
    gt, results = random_fixture(11, crowd_prob=0.0)
    assert not any(a["iscrowd"] for a in gt["annotations"])
    assert_same_as_pycocotools(gt, results, iou_type)


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_perfect_predictions_score_one(iou_type):
    gt, _ = random_fixture(5, crowd_prob=0.0)
    results = [prediction(a["image_id"], a["category_id"], 0.5 + 0.01 * (i % 7), a["bbox"],
                          mask_utils.decode(a["segmentation"])) for i, a in enumerate(gt["annotations"])]
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    # (COCO's precision is TP / (TP + FP + eps): a perfect score is 1 - 2e-16)
    for key in METRIC_KEYS:
        if key != "AR1":  # AR1 < 1: several objects per image
            assert stats[key] == pytest.approx(1.0, abs=1e-12), (key, stats[key])


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_empty_predictions(iou_type):
    gt, _ = random_fixture(6)
    stats = assert_same_as_pycocotools(gt, [], iou_type)
    assert set(stats.values()) <= {0.0, -1.0} and stats["AP"] == 0.0


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_empty_ground_truth_gives_minus_one(iou_type):
    gt, results = random_fixture(7)
    gt = {**gt, "annotations": []}
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    assert set(stats.values()) == {-1.0}


def two_object_image():
    """One 100x100 image: a 20x20 square (small) and a 50x50 square (medium), category 1."""
    h = w = 100
    masks = [shape_mask(h, w, (10, 10, 20, 20), False), shape_mask(h, w, (40, 40, 50, 50), False)]
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": categories([1, 2]),
          "annotations": [gt_annotation(i + 1, 1, 1, m) for i, m in enumerate(masks)]}
    return gt, masks


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_duplicates_of_a_correct_detection(iou_type):
    gt, masks = two_object_image()
    # the small square found three times (scores 0.9, 0.8, 0.7), the medium one once, last
    results = [prediction(1, 1, s, [10, 10, 20, 20], masks[0]) for s in (0.9, 0.8, 0.7)]
    results.append(prediction(1, 1, 0.6, [40, 40, 50, 50], masks[1]))
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    # ranking TP FP FP TP over 2 objects: precision 1 at recall 0.5, 2/4 at recall 1
    # -> 51 recall points at 1.0 and 50 at 0.5: AP = (51 + 25) / 101
    assert stats["AP"] == pytest.approx(76 / 101, abs=1e-12)
    # (COCO's precision is TP / (TP + FP + eps): "1" is 1 - 2e-16)
    assert stats["APs"] == pytest.approx(1.0) and stats["APm"] == pytest.approx(1.0) and stats["APl"] == -1.0
    assert stats["AR1"] == 0.5 and stats["AR100"] == 1.0


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_ties_in_score(iou_type):
    gt, results = random_fixture(8, score_decimals=0)  # scores are 0.0 or 1.0: many ties
    assert len({r["score"] for r in results}) <= 2
    assert_same_as_pycocotools(gt, results, iou_type)
    # all predictions with one score
    assert_same_as_pycocotools(gt, [{**r, "score": 0.5} for r in results], iou_type)


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_more_than_100_detections_per_image(iou_type):
    rng = np.random.default_rng(3)
    h, w = 160, 200
    gt = {"images": [{"id": 7, "height": h, "width": w}, {"id": 8, "height": h, "width": w}],
          "categories": categories([1, 2]), "annotations": []}
    results = []
    for image_id in (7, 8):
        for _ in range(12):
            box = [rng.uniform(0, 150), rng.uniform(0, 110), rng.uniform(8, 50), rng.uniform(8, 50)]
            gt["annotations"].append(gt_annotation(len(gt["annotations"]) + 1, image_id, int(rng.integers(1, 3)),
                                                   shape_mask(h, w, box, True)))
        for _ in range(130):  # 130 predictions per image, near objects, scores with ties
            anchor = gt["annotations"][int(rng.integers(len(gt["annotations"])))]["bbox"]
            box = list(np.array(anchor) + rng.normal(0, 4, size=4))
            box[2], box[3] = max(box[2], 2), max(box[3], 2)
            category_id = 1 if image_id == 7 else int(rng.integers(1, 3))  # image 7: 130 of category 1
            results.append(prediction(image_id, category_id, round(rng.random(), 2), box, shape_mask(h, w, box, False)))
    assert sum(r["image_id"] == 7 and r["category_id"] == 1 for r in results) > 100  # COCO keeps the best 100
    assert_same_as_pycocotools(gt, results, iou_type)


def crowd_fixture():
    """A 120x120 image: a crowd region (left half), a person on the right, predictions inside the
    crowd (ignored), one on the person, one false positive, and a small person hidden in the crowd."""
    h = w = 120
    crowd = shape_mask(h, w, (0, 0, 60, 120), False)
    person = shape_mask(h, w, (70, 20, 30, 60), False)
    small = shape_mask(h, w, (5, 5, 10, 10), False)
    gt = {"images": [{"id": 1, "height": h, "width": w}], "categories": categories([1]),
          "annotations": [gt_annotation(1, 1, 1, crowd, iscrowd=1), gt_annotation(2, 1, 1, person),
                          gt_annotation(3, 1, 1, small)]}
    results = [prediction(1, 1, 0.95, [10, 30, 20, 20], shape_mask(h, w, (10, 30, 20, 20), False)),  # in crowd
               prediction(1, 1, 0.9, [70, 20, 30, 60], person),                                      # the person
               prediction(1, 1, 0.85, [30, 60, 25, 40], shape_mask(h, w, (30, 60, 25, 40), False)),  # in crowd
               prediction(1, 1, 0.8, [5, 5, 10, 10], small),                                        # small person
               prediction(1, 1, 0.7, [100, 100, 15, 15], shape_mask(h, w, (100, 100, 15, 15), False))]  # FP
    return gt, results


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_iscrowd_regions(iou_type):
    gt, results = crowd_fixture()
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    # the crowd predictions are ignored, the small person matches its own box (IoU 1, preferred to
    # the crowd), the FP counts: ranking TP TP FP over 2 people -> AP50 = 1
    assert stats["AP50"] == 1.0
    detailed = evaluate_detailed(gt, results, iou_type)
    e = detailed.images[1, 1, "all"]
    assert e.pred_ignored[0].tolist() == [True, False, True, False, False]
    assert e.pred_to_gt[0].tolist() == [0, 1, 0, 2, UNMATCHED]
    assert e.gt_ignored.tolist() == [True, False, False]


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_category_in_gt_never_predicted_and_vice_versa(iou_type):
    gt, masks = two_object_image()
    gt["annotations"][1]["category_id"] = 2  # class 2: annotated, never predicted
    gt["categories"].append({"id": 3, "name": "listed, never annotated"})
    results = [prediction(1, 1, 0.9, [10, 10, 20, 20], masks[0]),
               prediction(1, 3, 0.8, [40, 40, 50, 50], masks[1]),  # class 3: predicted, never annotated
               prediction(1, 4, 0.7, [40, 40, 50, 50], masks[1])]  # class 4: not a category at all
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    assert stats["AP"] == pytest.approx(0.5)  # class 1 perfect, class 2 zero, class 3 undefined
    detailed = evaluate_detailed(gt, results, iou_type)
    assert detailed.category_ids == [1, 2, 3]
    assert (detailed.precision[:, :, 2] == -1).all()


@pytest.mark.parametrize("iou_type", IOU_TYPES)
def test_images_without_ground_truth(iou_type):
    gt, masks = two_object_image()
    gt["images"].append({"id": 2, "height": 100, "width": 100})
    results = [prediction(1, 1, 0.5, [10, 10, 20, 20], masks[0]),
               prediction(2, 1, 0.9, [10, 10, 20, 20], masks[0]),  # on the empty image: a FP, ranked first
               prediction(2, 2, 0.8, [10, 10, 20, 20], masks[0])]
    stats = assert_same_as_pycocotools(gt, results, iou_type)
    # ranking FP TP over 2 objects: precision 1/2 up to recall 1/2 -> AP50 = 51 * 0.5 / 101
    assert stats["AP50"] == pytest.approx(25.5 / 101)


def test_polygon_ground_truth_and_missing_fields():
    """Polygons, no iscrowd/area/bbox, annotation ids starting at 0: the wrapper fills and renumbers."""
    h, w = 90, 110
    gt = {"images": [{"id": 3, "height": h, "width": w}], "categories": categories([1]),
          "annotations": [{"id": 0, "image_id": 3, "category_id": 1,
                           "segmentation": [[10, 10, 60, 12, 55, 70, 12, 50]]},
                          {"id": 1, "image_id": 3, "category_id": 1,
                           "segmentation": [[70, 20, 100, 20, 100, 40, 70, 40]]}]}
    mask0 = decode_segmentation(gt["annotations"][0]["segmentation"], h, w).numpy()
    mask1 = decode_segmentation(gt["annotations"][1]["segmentation"], h, w).numpy()
    results = [prediction(3, 1, 0.9, mask_bbox(mask0), mask0), prediction(3, 1, 0.8, mask_bbox(mask1), mask1)]
    filled = prepare_coco_gt(gt, "segm")
    assert "area" not in gt["annotations"][0]  # the caller's dict is untouched
    assert filled["annotations"][0]["area"] == mask0.sum() and filled["annotations"][0]["iscrowd"] == 0
    assert [a["id"] for a in filled["annotations"]] == [1, 2]
    for iou_type in IOU_TYPES:
        ours = evaluate(gt, results, iou_type)
        assert ours == pytest.approx(evaluate_pycocotools(gt, results, iou_type), abs=TOL)
        assert ours == pytest.approx(reference(filled, results, iou_type)[0], abs=TOL)
        assert ours["AP50"] == 1.0


# ---------------------------------------------------------------------------------------------
# Teaching helpers on hand-checkable cases
# ---------------------------------------------------------------------------------------------


def test_box_iou_xywh_golden_values():
    pred = [[0, 0, 2, 2], [5, 5, 1, 1], [2, 0, 2, 2]]
    gt = [[1, 1, 2, 2], [0, 0, 2, 2]]
    ious = box_iou_xywh(pred, gt)
    # overlap 1x1 of two 2x2 squares: 1 / (4 + 4 - 1); identical: 1; apart or only touching: 0
    np.testing.assert_allclose(ious, [[1 / 7, 1], [0, 0], [1 / 7, 0]])
    crowd = box_iou_xywh(pred, gt, gt_iscrowd=[True, False])
    assert crowd[0, 0] == pytest.approx(1 / 4)  # against a crowd: overlap / predicted area
    assert box_iou_xywh(np.zeros((0, 4)), gt).shape == (0, 2) and box_iou_xywh(pred, []).shape == (3, 0)


def test_box_and_mask_iou_bitwise_equal_pycocotools():
    rng = np.random.default_rng(0)
    pred = np.concatenate([rng.uniform(0, 50, (40, 2)), rng.uniform(0.5, 30, (40, 2))], axis=1)
    gt = np.concatenate([rng.uniform(0, 50, (15, 2)), rng.uniform(0.5, 30, (15, 2))], axis=1)
    crowd = rng.random(15) < 0.3
    assert np.array_equal(box_iou_xywh(pred, gt, crowd), mask_utils.iou(pred.tolist(), gt.tolist(), crowd.tolist()))
    pred_masks = np.stack([shape_mask(64, 80, b, bool(i % 2)) for i, b in enumerate(pred)])
    gt_masks = np.stack([shape_mask(64, 80, b, bool(i % 3)) for i, b in enumerate(gt)])
    ours = mask_iou(pred_masks, gt_masks, crowd)
    theirs = mask_utils.iou([rle(m) for m in pred_masks], [rle(m) for m in gt_masks], crowd.tolist())
    assert np.array_equal(ours, theirs)


def test_mask_iou_golden_values_and_size_mismatch():
    a = np.zeros((1, 4, 4), np.uint8)
    a[0, :2, :2] = 1  # 4 pixels
    b = np.zeros((1, 4, 4), np.uint8)
    b[0, 1:3, 1:3] = 1  # 4 pixels, 1 shared
    assert mask_iou(a, b)[0, 0] == pytest.approx(1 / 7)
    assert mask_iou(a, b, [True])[0, 0] == pytest.approx(1 / 4)
    assert mask_iou(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))[0, 0] == 0  # empty masks: 0, not nan
    with pytest.raises(UserError, match="size"):
        mask_iou(a, np.zeros((1, 5, 4)))


def test_match_detections_hand_example():
    # three predictions, two objects; rows = predictions, columns = gt
    ious = np.array([[0.6, 0.0],    # score 0.7: would take gt 0, but comes second
                     [0.8, 0.3],    # score 0.9: takes gt 0
                     [0.55, 0.52]])  # score 0.8: gt 0 is taken, gt 1 is >= 0.5
    m = match_detections(ious, [0.7, 0.9, 0.8], iou_threshold=0.5)
    assert m.pred_to_gt.tolist() == [UNMATCHED, 0, 1]
    assert m.gt_to_pred.tolist() == [1, 2]
    assert m.true_positives.tolist() == [False, True, True]
    assert match_detections(ious, [0.7, 0.9, 0.8], iou_threshold=0.75).pred_to_gt.tolist() == [UNMATCHED, 0, UNMATCHED]


def test_match_detections_ignore_crowd_and_ties():
    ious = np.array([[0.7, 0.9], [0.6, 0.8]])
    # gt 1 ignored: a prediction prefers a regular gt (0.7) to a better-overlapping ignored one
    m = match_detections(ious, [0.9, 0.8], 0.5, gt_ignore=[False, True])
    assert m.pred_to_gt.tolist() == [0, 1] and m.pred_ignored.tolist() == [False, True]
    # a crowd can take several predictions
    m = match_detections(ious, [0.9, 0.8], 0.5, gt_ignore=[True, True], gt_iscrowd=[True, True])
    assert m.pred_to_gt.tolist() == [1, 1] and m.pred_ignored.all() and not m.true_positives.any()
    # equal IoU with two free gts: the later gt wins (COCO's ">=" update)
    assert match_detections([[0.6, 0.6]], [1.0], 0.5).pred_to_gt.tolist() == [1]
    # equal scores: the prediction given first goes first
    assert match_detections([[0.9], [0.9]], [0.5, 0.5], 0.5).pred_to_gt.tolist() == [0, UNMATCHED]
    # IoU exactly at the threshold matches
    assert match_detections([[0.5]], [1.0], 0.5).pred_to_gt.tolist() == [0]
    # nothing to match
    assert match_detections(np.zeros((0, 2)), [], 0.5).gt_to_pred.tolist() == [UNMATCHED, UNMATCHED]


def test_average_precision_of_a_hand_made_ranking():
    # ranking TP FP TP FP TP, 4 objects (one never found):
    #   recall    .25  .25  .50  .50  .75
    #   precision 1    1/2  2/3  1/2  3/5
    #   envelope  1    2/3  2/3  3/5  3/5
    # the 101 recall points: 0.00..0.25 (26 points) read 1, 0.26..0.50 (25) read 2/3,
    # 0.51..0.75 (25) read 3/5, 0.76..1.00 (25) read 0 -> AP = (26 + 25*2/3 + 25*3/5) / 101
    recall, precision = precision_recall([1, 0, 1, 0, 1], num_gt=4)
    np.testing.assert_allclose(recall, [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    np.testing.assert_allclose(precision_envelope(precision), [1, 2 / 3, 2 / 3, 3 / 5, 3 / 5])
    sampled = interpolated_precision(recall, precision)
    assert sampled.shape == (101,) and sampled[25] == pytest.approx(1) and sampled[26] == pytest.approx(2 / 3)
    assert sampled[75] == pytest.approx(3 / 5) and sampled[76] == 0
    assert average_precision_101(recall, precision) == pytest.approx((26 + 25 * 2 / 3 + 25 * 3 / 5) / 101)
    # ignored predictions (neither TP nor FP) change nothing
    r2, p2 = precision_recall([1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 1, 0], num_gt=4)
    assert average_precision_101(r2, p2) == pytest.approx(average_precision_101(recall, precision))
    with pytest.raises(ValueError):
        precision_recall([1], num_gt=0)


def test_evaluate_image_area_range_and_max_det():
    ious = np.array([[0.9, 0.0], [0.0, 0.0], [0.0, 0.8]])
    scores = [0.9, 0.8, 0.7]
    gt_areas, pred_areas = [100.0, 5000.0], [100.0, 50.0, 5000.0]
    e = evaluate_image(ious, scores, pred_areas, gt_areas, [False, False], AREA_RANGES["small"])
    assert e.pred_to_gt.shape == (len(IOU_THRESHOLDS), 3)
    assert e.gt_ignored.tolist() == [False, True]  # the 5000-pixel object is not small
    # prediction 2 matches the ignored medium object -> ignored; prediction 1 (small, unmatched) -> FP
    assert e.pred_ignored[0].tolist() == [False, False, True]
    assert e.true_positives[0].tolist() == [True, False, False]
    e = evaluate_image(ious, scores, pred_areas, gt_areas, None, AREA_RANGES["medium"])
    # unmatched predictions outside the range are ignored, not false positives
    assert e.false_positives[0].tolist() == [False, False, False]
    e = evaluate_image(ious, scores, pred_areas, gt_areas, None, max_det=2)
    assert e.pred_order.tolist() == [0, 1] and e.gt_to_pred[0].tolist() == [0, UNMATCHED]


def test_constants_match_pycocotools():
    from pycocotools.cocoeval import Params

    p = Params("bbox")
    assert np.array_equal(IOU_THRESHOLDS, p.iouThrs) and np.array_equal(RECALL_THRESHOLDS, p.recThrs)
    assert list(MAX_DETS) == p.maxDets
    assert [list(r) for r in AREA_RANGES.values()] == p.areaRng and list(AREA_RANGES) == p.areaRngLbl


def test_precision_recall_curve_find_errors_and_confusion():
    gt, masks = two_object_image()
    gt["annotations"][1]["category_id"] = 2
    results = [prediction(1, 1, 0.9, [10, 10, 20, 20], masks[0]),   # TP class 1
               prediction(1, 1, 0.8, [60, 60, 10, 10], shape_mask(100, 100, (60, 60, 10, 10), False)),  # FP
               prediction(1, 1, 0.7, [40, 40, 50, 50], masks[1])]   # on the class-2 object: confusion
    detailed = evaluate_detailed(gt, results, "bbox")
    curve = precision_recall_curve(detailed, 1, iou_threshold=0.5)
    np.testing.assert_allclose(curve["scores"], [0.9, 0.8, 0.7])
    np.testing.assert_allclose(curve["recall"], [1, 1, 1])
    assert curve["ap"] == pytest.approx(detailed.precision[0, :, 0, 0, 2].mean())
    errors = find_errors(detailed, iou_threshold=0.5)
    assert errors[1]["true_positives"] == [0] and sorted(errors[1]["false_positives"]) == [1, 2]
    assert errors[1]["false_negatives"] == [1]  # the class-2 object
    matrix, names = confusion_matrix(gt, results, "bbox", score_threshold=0.5)
    assert names == ["class1", "class2", "background"]
    # rows gt, columns predicted: class1->class1 once, class2 predicted as class1 once, one FP
    assert matrix.tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    with pytest.raises(UserError, match="iou_threshold"):
        precision_recall_curve(detailed, 1, iou_threshold=0.42)


# ---------------------------------------------------------------------------------------------
# Errors and the pycocotools wrapper's pitfalls
# ---------------------------------------------------------------------------------------------


def test_clear_errors():
    gt, masks = two_object_image()
    good = prediction(1, 1, 0.9, [10, 10, 20, 20], masks[0])
    for evaluate_fn in (evaluate, evaluate_pycocotools):
        with pytest.raises(UserError, match="image_id 99"):
            evaluate_fn(gt, [{**good, "image_id": 99}], "bbox")
        with pytest.raises(UserError, match="iou_type"):
            evaluate_fn(gt, [good], "keypoints")
        with pytest.raises(UserError, match="segmentation"):
            evaluate_fn(gt, [{k: v for k, v in good.items() if k != "segmentation"}], "segm")
        with pytest.raises(UserError, match="score"):
            evaluate_fn(gt, [{k: v for k, v in good.items() if k != "score"}], "bbox")
    wrong_size = {**good, "segmentation": rle(np.ones((50, 50), np.uint8))}
    with pytest.raises(UserError, match=r"image 1, a result: RLE 'size' is \[50, 50\]"):
        evaluate(gt, [wrong_size], "segm")


def test_wrapper_handles_empty_results_and_missing_fields():
    gt, masks = two_object_image()
    bare = copy.deepcopy(gt)
    for ann in bare["annotations"]:
        del ann["iscrowd"], ann["area"]
    results = [prediction(1, 1, 0.9, [10, 10, 20, 20], masks[0])]
    for iou_type in IOU_TYPES:
        assert evaluate_pycocotools(bare, [], iou_type) == evaluate(bare, [], iou_type)
        assert evaluate_pycocotools(bare, results, iou_type) == pytest.approx(evaluate(gt, results, iou_type), abs=TOL)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluate_pycocotools(gt, results, "bbox")
    assert out.getvalue() == ""  # pycocotools' prints are silenced


# ---------------------------------------------------------------------------------------------
# From model outputs to metrics
# ---------------------------------------------------------------------------------------------


def test_results_from_predictions():
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[1, 0, 4:, :] = 0.5  # exactly at the threshold: not in the mask
    output = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.5, 4.0, 8.0, 6.0]]), "labels": torch.tensor([1, 2]),
              "scores": torch.tensor([0.75, 0.5]), "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 6, 8)}
    results = results_from_predictions([output, empty], [42, 43], {1: 10, 2: 20})
    assert len(results) == 2
    json.dumps(results)  # JSON-serialisable
    first, second = results
    assert first["image_id"] == 42 and first["category_id"] == 10 and second["category_id"] == 20
    assert first["bbox"] == [2.0, 1.0, 3.0, 2.0] and second["bbox"] == [0.5, 4.0, 7.5, 2.0]
    assert first["score"] == 0.75 and isinstance(first["segmentation"]["counts"], str)
    decoded = mask_utils.decode(first["segmentation"])
    assert decoded.shape == (6, 8) and decoded.sum() == 6 and decoded[1:3, 2:5].all()
    assert mask_utils.decode(second["segmentation"]).sum() == 0
    boxes_only = results_from_predictions([{k: v for k, v in output.items() if k != "masks"}], [1], {1: 10, 2: 20})
    assert "segmentation" not in boxes_only[0]
    with pytest.raises(UserError, match="label 2"):
        results_from_predictions([output], [42], {1: 10})
    with pytest.raises(UserError, match="image ids"):
        results_from_predictions([output], [1, 2], {1: 10, 2: 20})


class TinyDataset:
    """The DetectionDataset interface (mrcnn_edu.data), on hand-made squares."""

    class_names = ("__background__", "square", "bar")
    transforms = None

    def __init__(self, n: int = 5, size: int = 48):
        self.categories = [{"id": 5, "name": "square"}, {"id": 8, "name": "bar"}]
        self.label_to_category_id = {1: 5, 2: 8}
        self.items = []
        for i in range(n):
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            masks[0, 4 + i:20 + i, 5:21] = 1
            masks[1, 30:34, 10:40 - i] = 1
            boxes = torch.tensor([[5.0, 4 + i, 21, 20 + i], [10.0, 30, 40 - i, 34]])
            image = torch.zeros(3, size, size)
            image[:, masks.any(0).bool()] = 1.0
            self.items.append((image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks,
                                       "image_id": 100 + i}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def coco_gt(self):
        images, annotations = [], []
        for image, target in self.items:
            h, w = image.shape[-2:]
            images.append({"id": target["image_id"], "height": h, "width": w, "file_name": f"{target['image_id']}.png"})
            for mask, label in zip(target["masks"], target["labels"]):
                annotations.append(gt_annotation(len(annotations) + 1, target["image_id"],
                                                 self.label_to_category_id[int(label)], mask.numpy()))
        return {"images": images, "annotations": annotations, "categories": self.categories}


class OracleModel(torch.nn.Module):
    """Predicts the dataset's ground truth, in order (a perfect model), plus one weak false positive."""

    def __init__(self, dataset):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.targets = [target for _, target in dataset.items]
        self.calls = 0

    def forward(self, images):
        assert not self.training
        outputs = []
        for image in images:
            target = self.targets[self.calls]
            self.calls += 1
            h, w = image.shape[-2:]
            masks = torch.cat([target["masks"][:, None].float(), torch.zeros(1, 1, h, w)])
            masks[-1, 0, 40:44, 0:4] = 1.0
            outputs.append({"boxes": torch.cat([target["boxes"], torch.tensor([[0.0, 40, 4, 44]])]),
                            "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.9, 0.8, 0.1]),
                            "masks": masks})
        return outputs


def test_evaluate_model_with_a_perfect_model():
    dataset = TinyDataset(5)
    model = OracleModel(dataset)
    model.train()
    metrics = evaluate_model(model, dataset, batch_size=2, progress=False, max_images=3)
    assert model.training and model.calls == 3  # mode restored, only 3 images run
    assert {img["image_id"] for img in metrics["results"]} == {100, 101, 102}
    for iou_type in IOU_TYPES:
        # the false positive is ranked last: AP stays 1; max_images restricts the ground truth
        assert metrics[iou_type]["AP"] == pytest.approx(1.0) and metrics[iou_type]["AR100"] == pytest.approx(1.0)
        gt = dataset.coco_gt()
        gt["images"] = gt["images"][:3]
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] < 103]
        assert metrics[iou_type] == pytest.approx(evaluate_pycocotools(gt, metrics["results"], iou_type), abs=TOL)
    table = format_table(metrics)
    assert table.splitlines()[0].split()[-2:] == ["bbox", "segm"]
    assert "n/a" in table and "1.000" in table  # no large objects: -1 shown as n/a


def test_evaluate_model_with_the_small_preset():
    from mrcnn_edu.config import get_preset
    from mrcnn_edu.model import build_mask_rcnn

    torch.manual_seed(0)
    model = build_mask_rcnn(get_preset("small", num_classes=3))
    dataset = TinyDataset(2, size=64)
    metrics = evaluate_model(model, dataset, device="cpu", batch_size=2, progress=False)
    gt = dataset.coco_gt()
    for iou_type in IOU_TYPES:
        assert set(metrics[iou_type]) == set(METRIC_KEYS)
        assert metrics[iou_type] == pytest.approx(evaluate_pycocotools(gt, metrics["results"], iou_type), abs=TOL)


def test_format_table():
    bbox = dict.fromkeys(METRIC_KEYS, 0.5)
    segm = {**bbox, "APl": -1.0, "AP": 0.123456}
    table = format_table({"bbox": bbox, "segm": segm, "results": []})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "IoU", "area", "maxDets", "bbox", "segm"]
    rows = {line.split()[0]: line.split() for line in lines[2:2 + len(METRIC_KEYS)]}
    assert list(rows) == list(METRIC_KEYS)
    assert rows["AP"][-2:] == ["0.500", "0.123"] and rows["APl"][-1] == "n/a"
    assert rows["AP50"][1] == "0.50" and rows["AR1"][3] == "1"
    assert "n/a" not in format_table({"bbox": bbox})
