"""Scene-scale inference: tiling, the merge across tile borders, files in and out, the CLI.

Most tests use a fake detector instead of a trained model: a callable that "detects" known discs
exactly -- whatever part of each disc is visible in the tile it is given -- so that the merge
rule is tested on its own: a disc cut by a tile border must come out once, whole.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_edu.cli import main
from mrcnn_edu.config import small
from mrcnn_edu.inference import (InstanceMasks, TileWindow, coco_results, default_tile_size, draw_prediction,
                                 find_images, plan_tiles, predict_image, predict_paths, tile_origins,
                                 write_results)
from mrcnn_edu.model import build_mask_rcnn
from mrcnn_edu.utils import UserError

# ----------------------------------------------------------------------------------------------
# A fake detector: exact detections of known discs, for whatever part of them a tile shows
# ----------------------------------------------------------------------------------------------

CODE = 4096.0  # pixel (x, y) of the test image stores x / CODE and y / CODE: a tile knows where it is


def coded_image(height: int, width: int) -> torch.Tensor:
    """Float[3, H, W]: channel 0 = x / CODE, channel 1 = y / CODE (exact in float32)."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([xx / CODE, yy / CODE, torch.zeros(height, width)])


def disc_mask(height: int, width: int, cx: float, cy: float, r: float, x0: int = 0, y0: int = 0) -> torch.Tensor:
    """Bool[h, w]: the pixels of the window at (x0, y0) whose centres lie in the disc."""
    yy, xx = torch.meshgrid(torch.arange(height) + y0 + 0.5, torch.arange(width) + x0 + 0.5, indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class DiscDetector:
    """Detects every disc ``(cx, cy, r)`` visible in a tile of a :func:`coded_image`, in the model's format.

    ``tile_score``: the score also depends on the tile (so that different tiles' copies differ);
    ``calls`` counts the images seen.
    """

    def __init__(self, discs, tile_score: bool = False, label: int = 1):
        self.discs, self.tile_score, self.label, self.calls = list(discs), tile_score, label, 0

    def __call__(self, images):
        outputs = []
        for image in images:
            self.calls += 1
            x0, y0 = round(float(image[0, 0, 0]) * CODE), round(float(image[1, 0, 0]) * CODE)
            height, width = image.shape[-2:]
            boxes, masks, scores = [], [], []
            for k, (cx, cy, r) in enumerate(self.discs):
                mask = disc_mask(height, width, cx, cy, r, x0, y0)
                if mask.any():
                    boxes.append(tight_box(mask))
                    masks.append(mask)
                    scores.append(0.9 - 0.001 * k - (0.0001 * (x0 + 3 * y0) / CODE if self.tile_score else 0.0))
            outputs.append({
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.full((len(boxes),), self.label, dtype=torch.int64),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "masks": torch.stack(masks)[:, None].float() if masks else torch.zeros(0, 1, height, width)})
        return outputs


def assert_each_disc_once(prediction, discs, image_size):
    """As many detections as discs, and each disc matched by exactly one, with its exact mask."""
    height, width = image_size
    masks = prediction["masks"]
    assert len(prediction["boxes"]) == len(masks) == len(discs), (len(prediction["boxes"]), len(discs))
    crop_boxes = masks.crop_boxes()
    for cx, cy, r in discs:
        gt = disc_mask(height, width, cx, cy, r)
        gt_box = torch.tensor(tight_box(gt))
        # candidates: detections whose crop overlaps the disc's box
        near = [i for i in range(len(masks))
                if crop_boxes[i, 0] < gt_box[2] and crop_boxes[i, 2] > gt_box[0]
                and crop_boxes[i, 1] < gt_box[3] and crop_boxes[i, 3] > gt_box[1]]
        ious = []
        for i in near:
            mask = masks.mask(i).bool()
            ious.append(float((mask & gt).sum()) / float((mask | gt).sum()))
        matched = [iou for iou in ious if iou > 0.95]
        assert len(matched) == 1, f"disc {(cx, cy, r)}: IoUs of nearby detections {ious}"
        i = near[ious.index(matched[0])]
        assert torch.equal(masks.mask(i).bool(), gt), f"disc {(cx, cy, r)}: mask differs"
        torch.testing.assert_close(prediction["boxes"][i], gt_box)


# ----------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------


def test_tile_origins_examples():
    assert tile_origins(700, 256, 64) == [0, 192, 384, 444]  # last tile moved back to end at 700
    assert tile_origins(448, 256, 64) == [0, 192]  # fits exactly
    assert tile_origins(257, 256, 64) == [0, 1]
    assert tile_origins(256, 256, 64) == [0]
    assert tile_origins(100, 256, 64) == [0]
    assert tile_origins(2560, 256, 64)[-1] == 2560 - 256 and len(tile_origins(2560, 256, 64)) == 13


@pytest.mark.parametrize("size", [(100, 100), (256, 256), (257, 300), (700, 1000), (100, 1000), (1000, 255),
                                  (2560, 2560), (513, 449)])
@pytest.mark.parametrize("tile_size,overlap", [(256, 64), (128, 0), (100, 60)])
def test_tiles_cover_the_image_exactly(size, tile_size, overlap):
    height, width = size
    windows = plan_tiles(size, tile_size, overlap)
    covered = torch.zeros(size, dtype=torch.int32)
    for w in windows:
        assert 0 <= w.x0 < w.x1 <= width and 0 <= w.y0 < w.y1 <= height
        assert (w.width, w.height) == (min(tile_size, width), min(tile_size, height))
        covered[w.y0:w.y1, w.x0:w.x1] += 1
    assert int(covered.min()) >= 1  # every pixel is seen
    for length in (height, width):
        origins = tile_origins(length, tile_size, overlap)
        assert origins[0] == 0 and origins == sorted(set(origins))
        assert origins[-1] + min(tile_size, length) == length  # the last tile is flush with the border
        steps = np.diff(origins)
        assert (steps <= tile_size - overlap).all()  # neighbours share at least `overlap` pixels
        # no more tiles than needed: all but the last step are full strides
        assert (steps[:-1] == tile_size - overlap).all()
    assert len(windows) == len(tile_origins(height, tile_size, overlap)) * len(tile_origins(width, tile_size, overlap))


def test_tiling_arguments_are_checked():
    for tile_size, overlap in [(256, 256), (256, -1), (0, 0), (256, 300)]:
        with pytest.raises(ValueError):
            plan_tiles((500, 500), tile_size, overlap)
    with pytest.raises(ValueError, match="tile_size"):
        predict_image(DiscDetector([]), coded_image(64, 64))  # a plain callable has no transform


# ----------------------------------------------------------------------------------------------
# The merge rule, with the fake detector
# ----------------------------------------------------------------------------------------------

SCENE = (700, 700)  # tiles of 256 at x, y in {0, 192, 384, 444}: inner edges at 192, 256, 384, 444, 448, 640
EDGES = (192, 256, 384, 444, 448, 640)


def border_positions():
    """Discs centred on tile edges, on the crossings of edges (tile corners), just off them, and in strips."""
    positions = []
    for r in (6.0, 17.5, 29.0):
        for k, (ex, ey) in enumerate([(256, 192), (448, 444), (192, 640), (384, 256), (640, 384), (444, 448)]):
            for dx, dy in [(0, 0), (-r, 0), (0, r), (r / 2, -r / 2), (-r + 1, r - 1), (0.5, 0.5), (32, 32 + k)]:
                positions.append((ex + dx, ey + dy, r))
    return positions


@pytest.mark.parametrize("tile_score", [False, True])
def test_disc_cut_by_a_tile_border_is_reported_once_with_its_whole_mask(tile_score):
    for cx, cy, r in border_positions():
        detector = DiscDetector([(cx, cy, r)], tile_score=tile_score)
        prediction = predict_image(detector, coded_image(*SCENE), tile_size=256, overlap=64)
        assert detector.calls == 16
        assert_each_disc_once(prediction, [(cx, cy, r)], SCENE)


def test_many_discs_in_one_scene():
    rng = random.Random(0)
    discs: list[tuple[float, float, float]] = []
    while len(discs) < 40:  # non-overlapping discs anywhere, border of the image included
        r = rng.uniform(4, 30)
        cx, cy = rng.uniform(0, 1000), rng.uniform(0, 900)
        if all(math.hypot(cx - x, cy - y) > r + s + 2 for x, y, s in discs):
            discs.append((cx, cy, r))
    report = {}
    prediction = predict_image(DiscDetector(discs, tile_score=True), coded_image(900, 1000), tile_size=256,
                               overlap=64, batch_size=3, report=report)
    assert_each_disc_once(prediction, discs, (900, 1000))
    assert report["tiles"] == 5 * 5 and report["raw"] > len(discs) and report["final"] == len(discs)
    assert report["cut"] > 0 and report["cut_covered"] == report["cut"]  # every partial view was dropped
    scores = prediction["scores"]
    assert (scores[:-1] >= scores[1:]).all()  # best first


def test_disc_in_an_overlap_strip_seen_whole_twice_is_reported_once():
    disc = (224.0, 100.0, 20.0)  # x in [204, 244]: whole in the tiles at x = 0 and x = 192
    report = {}
    prediction = predict_image(DiscDetector([disc]), coded_image(256, 700), tile_size=256, overlap=64,
                               report=report)
    assert report["raw"] == 2 and report["cut"] == 0 and report["whole_after_nms"] == 1
    assert_each_disc_once(prediction, [disc], (256, 700))


class MaskDetector:
    """Detects given ground-truth masks UInt8[G, H, W] of a :func:`coded_image`, cut to each tile."""

    def __init__(self, masks: torch.Tensor):
        self.masks = masks

    def __call__(self, images):
        outputs = []
        for image in images:
            x0, y0 = round(float(image[0, 0, 0]) * CODE), round(float(image[1, 0, 0]) * CODE)
            height, width = image.shape[-2:]
            visible = self.masks[:, y0:y0 + height, x0:x0 + width]  # (G, H, W) -> (G, h, w)
            keep = torch.nonzero(visible.flatten(1).any(1)).flatten()
            outputs.append({"boxes": torch.tensor([tight_box(visible[k]) for k in keep]).reshape(-1, 4),
                            "labels": torch.ones(len(keep), dtype=torch.int64),
                            "scores": 0.9 - 0.001 * keep.float(), "masks": visible[keep]})
        return outputs


def test_every_tank_of_a_synthetic_scene_is_reported_once():
    from mrcnn_edu.oil_tanks import make_scene

    # tank farms as the case study draws them: groups in bunds, tanks up to 60 px, some cut by the border
    scene = make_scene(1024, seed=3, n_farms=3)
    gt = scene.target["masks"]
    assert len(gt) >= 20 and max(t.radius for t in scene.tanks) >= 25
    report = {}
    prediction = predict_image(MaskDetector(gt), coded_image(1024, 1024), tile_size=256, overlap=64, report=report)
    assert report["cut"] > 0  # some tanks were cut by tile borders
    assert len(prediction["boxes"]) == len(gt)
    matched = set()
    for i in range(len(prediction["boxes"])):
        mask = prediction["masks"].mask(i)
        (k,) = torch.nonzero((gt & mask[None]).flatten(1).any(1)).flatten().tolist()  # touches one tank only
        assert torch.equal(mask, gt[k]), f"tank {k}: mask differs"
        matched.add(k)
    assert len(matched) == len(gt)


@pytest.mark.parametrize("disc", [(350.0, 350.0, 150.0), (330.0, 200.0, 120.0), (448.0, 444.0, 70.0)])
def test_objects_larger_than_the_overlap_are_stitched(disc):
    # no tile sees these whole: every view is cut, and the views are stitched into one instance
    report = {}
    prediction = predict_image(DiscDetector([disc]), coded_image(*SCENE), tile_size=256, overlap=64, report=report)
    assert report["stitched_groups"] == 1
    assert_each_disc_once(prediction, [disc], SCENE)


def test_classes_are_merged_separately():
    disc = (256.0, 192.0, 20.0)
    first, second = DiscDetector([disc], label=1), DiscDetector([disc], label=2)

    def both(images):
        return [_concat(a, b) for a, b in zip(first(images), second(images))]

    prediction = predict_image(both, coded_image(*SCENE), tile_size=256, overlap=64)
    assert sorted(prediction["labels"].tolist()) == [1, 2]  # one per class, not merged into each other


def _concat(a: dict, b: dict) -> dict:
    return {key: torch.cat([a[key], b[key]]) for key in a}


def test_image_no_larger_than_a_tile_is_run_whole():
    detector = DiscDetector([(60.0, 40.0, 10.0)])
    prediction = predict_image(detector, coded_image(200, 256), tile_size=256)
    assert detector.calls == 1
    assert_each_disc_once(prediction, [(60.0, 40.0, 10.0)], (200, 256))


def test_score_threshold_applies_to_every_tile():
    discs = [(100.0, 100.0, 10.0), (500.0, 500.0, 10.0)]
    prediction = predict_image(DiscDetector(discs), coded_image(*SCENE), tile_size=256, score_threshold=0.8995)
    assert len(prediction["boxes"]) == 1  # the second disc scores 0.899


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mask_rcnn(small(num_classes=2)).eval()


def test_untiled_image_gives_exactly_the_models_output(model):
    torch.manual_seed(1)
    image = torch.rand(3, 200, 240)
    with torch.no_grad():
        (expected,) = model([image])
    prediction = predict_image(model, image, score_threshold=0.0)
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(prediction[key], expected[key]), key
    assert torch.equal(prediction["masks"].to_dense(), (expected["masks"][:, 0] > 0.5).to(torch.uint8))


def test_tiled_model_prediction_is_consistent(model):
    torch.manual_seed(2)
    image = torch.rand(3, 300, 420)
    model.train()
    threshold = model.roi_heads.score_thresh
    report = {}
    prediction = predict_image(model, image, score_threshold=0.5, report=report)
    assert model.training and model.roi_heads.score_thresh == threshold  # mode and threshold restored
    assert default_tile_size(model) == 256 and report["tiles"] == 2 * 2
    n = len(prediction["boxes"])
    assert n == len(prediction["labels"]) == len(prediction["scores"]) == len(prediction["masks"])
    assert (prediction["scores"] > 0.5).all()
    assert prediction["masks"].image_size == (300, 420)
    boxes = prediction["masks"].crop_boxes()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 420).all() and (boxes[:, 3] <= 300).all()
    for crop in prediction["masks"].crops:  # crops are tight: no empty border row or column
        if crop.numel():
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()


# ----------------------------------------------------------------------------------------------
# InstanceMasks, results files, overlays
# ----------------------------------------------------------------------------------------------


def test_instance_masks_round_trip():
    torch.manual_seed(3)
    dense = torch.zeros(4, 40, 50, dtype=torch.uint8)
    dense[0, 5:9, 7:20] = 1
    dense[1] = (torch.rand(40, 50) > 0.7).to(torch.uint8)
    dense[3, 39, 49] = 1  # mask 2 stays empty
    masks = InstanceMasks.from_dense(dense)
    assert torch.equal(masks.to_dense(), dense)
    assert masks.crops[0].shape == (4, 13) and masks.offsets[0].tolist() == [7, 5]
    assert masks.crops[2].numel() == 0
    assert masks.areas().tolist() == dense.flatten(1).sum(1).tolist()
    assert torch.equal(masks.select([3, 0]).to_dense(), dense[[3, 0]])
    shifted = masks.shifted(10, 20, (100, 100))
    assert torch.equal(shifted.mask(0)[25:29, 17:30], dense[0, 5:9, 7:20]) and int(shifted.mask(0).sum()) == 52
    assert masks.intersection(0, 1) == int((dense[0] & dense[1]).sum())
    assert masks.area_within(1, TileWindow(10, 10, 30, 20)) == int(dense[1, 10:20, 10:30].sum())
    from pycocotools import mask as mask_utils

    for rle, expected in zip(masks.to_rle(), dense):
        assert isinstance(rle["counts"], str) and rle["size"] == [40, 50]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded, expected.numpy())


def test_results_json_round_trips_through_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    discs = [(256.0, 192.0, 20.0), (60.0, 600.0, 8.0), (600.0, 60.0, 28.0)]
    prediction = predict_image(DiscDetector(discs), coded_image(*SCENE), tile_size=256)
    small_image = predict_image(DiscDetector([(20.0, 20.0, 5.0)]), coded_image(64, 64), tile_size=256)
    path = tmp_path / "out" / "results.json"
    count = write_results(path, {"scene.png": prediction, "sub/small.png": small_image},
                          label_to_category_id={1: 7}, image_ids={"scene.png": 11, "sub/small.png": 12})
    assert count == 4 and not list(path.parent.glob(".*tmp*"))

    gt = COCO()
    gt.dataset = {"images": [{"id": 11, "width": 700, "height": 700, "file_name": "scene.png"},
                             {"id": 12, "width": 64, "height": 64, "file_name": "sub/small.png"}],
                  "annotations": [], "categories": [{"id": 7, "name": "oil-storage-tank"}]}
    gt.createIndex()
    results = gt.loadRes(str(path))
    annotations = results.loadAnns(results.getAnnIds(imgIds=[11]))
    assert len(annotations) == 3
    for annotation, box, score, i in zip(annotations, prediction["boxes"], prediction["scores"], range(3)):
        assert annotation["file_name"] == "scene.png" and annotation["category_id"] == 7
        assert annotation["score"] == pytest.approx(float(score))
        x1, y1, x2, y2 = box.tolist()
        assert annotation["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        decoded = mask_utils.decode(annotation["segmentation"])
        assert np.array_equal(decoded, prediction["masks"].mask(i).numpy())
    (small_annotation,) = results.loadAnns(results.getAnnIds(imgIds=[12]))
    assert small_annotation["file_name"] == "sub/small.png"
    entry = json.loads(path.read_text())[0]
    assert set(entry) == {"file_name", "image_id", "category_id", "bbox", "score", "segmentation"}
    assert isinstance(entry["segmentation"]["counts"], str)
    with pytest.raises(UserError, match="label 1"):
        coco_results(prediction, 1, label_to_category_id={2: 2})


def test_draw_prediction_tints_masks_only():
    image = torch.full((3, 120, 160), 0.5)
    prediction = predict_image(DiscDetector([(80.0, 60.0, 20.0)]), coded_image(120, 160), tile_size=256)
    picture = draw_prediction(image, prediction, class_names=["__background__", "tank"])
    assert picture.size == (160, 120) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    assert not np.array_equal(pixels[60, 80], [128, 128, 128])  # inside the disc: tinted
    assert np.array_equal(pixels[5, 5], [128, 128, 128])  # far away: untouched


# ----------------------------------------------------------------------------------------------
# Files: formats, corrupt files, folders
# ----------------------------------------------------------------------------------------------


def bright_detector(images):
    """Detects the bright pixels of each image as one object (label 1)."""
    outputs = []
    for image in images:
        mask = image.mean(0) > 0.5
        boxes = torch.tensor([tight_box(mask)]) if mask.any() else torch.zeros(0, 4)
        outputs.append({"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
                        "scores": torch.full((len(boxes),), 0.9), "masks": mask[None, None].float()[:len(boxes)]})
    return outputs


def write_format_zoo(folder):
    """One bright disc on black in RGB, RGBA, grey, 16-bit grey and JPEG files, plus a corrupt PNG."""
    disc = disc_mask(48, 64, 30.0, 20.0, 9.0).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[disc] = 255
    Image.fromarray(rgb).save(folder / "rgb.png")
    rgba = np.dstack([rgb, np.where(disc, 255, 0).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0], "L").save(folder / "grey.png")
    Image.fromarray(np.where(disc, 65535, 300).astype(np.uint16)).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    Image.fromarray(rgb).save(folder / "photo.JPG", quality=95)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "notes.txt").write_text("not an image")
    return torch.from_numpy(disc)


def test_predict_paths_reads_every_format_and_skips_a_corrupt_file(tmp_path, capsys):
    disc = write_format_zoo(tmp_path / "images")
    result = predict_paths(bright_detector, [tmp_path / "images"], tile_size=256, progress=False)
    assert sorted(result.predictions) == ["deep16.png", "grey.png", "photo.JPG", "rgb.png", "rgba.png"]
    assert [name for name, _ in result.skipped] == ["corrupt.png"]
    assert "corrupt.png" in result.skipped[0][1]
    assert "warning: skipped corrupt.png" in capsys.readouterr().err
    for name, prediction in result.predictions.items():
        assert len(prediction["boxes"]) == 1, name
        mask = prediction["masks"].mask(0).bool()
        assert float((mask & disc).sum()) / float((mask | disc).sum()) > 0.95, name
    with pytest.raises(UserError, match="corrupt.png"):
        predict_paths(bright_detector, [tmp_path / "images" / "corrupt.png"], tile_size=256, progress=False,
                      on_error="raise")


def test_find_images(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "a" / "viz").mkdir()
    for name in ("a/x.png", "a/deep/y.TIF", "a/.hidden/z.png", "a/viz/x.png", "a/readme.md", "b.bin"):
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path / "a", tmp_path / "b.bin"], exclude=[tmp_path / "a" / "viz"])
    assert [f.file_name for f in found] == ["deep/y.TIF", "x.png", "b.bin"]
    with pytest.raises(UserError, match="no such file"):
        find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        find_images([tmp_path / "empty"])
    with pytest.raises(UserError, match="x.png"):
        find_images([tmp_path / "a", tmp_path / "a" / "x.png"])


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    from mrcnn_edu.weights import save_weights

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    tanks = small(num_classes=2)
    save_weights(folder / "tanks.safetensors", build_mask_rcnn(tanks), tanks, ["__background__", "oil-storage-tank"],
                 {"command": "test"})
    save_weights(folder / "tanks_cat7.safetensors", build_mask_rcnn(tanks), tanks,
                 ["__background__", "oil-storage-tank"], {"label_to_category_id": {"1": 7}})  # as mrcnn-edu train
    shapes = small(num_classes=4)
    save_weights(folder / "shapes.safetensors", build_mask_rcnn(shapes), shapes,
                 ["__background__", "square", "circle", "triangle"], {"command": "test"})
    return folder


def one_line_error(capsys, *fragments):
    """One error line (after any warnings about skipped images), no traceback."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("mrcnn-edu: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_cli_predict_end_to_end(tmp_path, weights_files, capsys):
    images = tmp_path / "images"
    write_format_zoo(images)
    torch.manual_seed(4)
    scene = (torch.rand(3, 300, 280) * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # larger than a tile
    Image.fromarray(scene).save(images / "scene.png")
    out, viz = tmp_path / "results.json", images / "viz"
    code = main(["predict", str(images), "--weights", str(weights_files / "tanks.safetensors"), "--out", str(out),
                 "--viz", str(viz), "--score-threshold", "0.5", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: skipped corrupt.png" in captured.err and "skipped 1 unreadable image: corrupt.png" in captured.out
    results = json.loads(out.read_text())
    assert isinstance(results, list)
    names = ["deep16.png", "grey.png", "photo.JPG", "rgb.png", "rgba.png", "scene.png"]
    assert {r["file_name"] for r in results} <= set(names)
    for r in results:
        assert r["score"] > 0.5 and r["category_id"] == 1 and len(r["bbox"]) == 4
        assert isinstance(r["segmentation"]["counts"], str)
    assert sorted(p.relative_to(viz).as_posix() for p in viz.rglob("*.png")) == \
        sorted(n.rsplit(".", 1)[0] + ".png" for n in names)
    assert Image.open(viz / "scene.png").size == (280, 300)
    # a second run does not pick up its own overlays as inputs
    assert main(["predict", str(images), "--weights", str(weights_files / "tanks.safetensors"), "--out", str(out),
                 "--viz", str(viz), "--quiet", "--tile-size", "128", "--overlap", "32"]) == 0
    assert "6 image" in capsys.readouterr().out
    # the weights card's label -> COCO category id mapping is applied
    assert main(["predict", str(images / "rgb.png"), "--weights", str(weights_files / "tanks_cat7.safetensors"),
                 "--out", str(out), "--score-threshold", "0", "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} == {7} and {r["file_name"] for r in results} == {"rgb.png"}


def test_cli_predict_errors(tmp_path, weights_files, capsys):
    weights = str(weights_files / "tanks.safetensors")
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = str(tmp_path / "r.json")
    assert main(["predict", str(image), "--weights", str(tmp_path / "nope.safetensors"), "--out", out]) == 2
    one_line_error(capsys, "nope.safetensors")
    assert main(["predict", str(tmp_path / "missing_dir"), "--weights", weights, "--out", out]) == 2
    one_line_error(capsys, "missing_dir")
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--weights", weights, "--out", out]) == 2
    one_line_error(capsys, "no images found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["predict", str(tmp_path / "bad"), "--weights", weights, "--out", out, "--quiet"]) == 2
    one_line_error(capsys, "none of the 1 images", "broken.jpg")
    assert main(["predict", str(image), "--weights", weights, "--out", out, "--overlap", "256"]) == 2
    one_line_error(capsys, "--overlap")
    assert main(["predict", str(tmp_path), "--weights", weights, "--out", out, "--viz", str(tmp_path)]) == 2
    one_line_error(capsys, "overwrite")
    assert main(["predict", str(image), "--weights", weights, "--out", out, "--score-threshold", "2"]) == 2
    one_line_error(capsys, "score-threshold")
    assert not (tmp_path / "r.json").exists()


def test_cli_evaluate(tmp_path, weights_files, capsys):
    shapes = str(weights_files / "shapes.safetensors")
    assert main(["evaluate", "--weights", shapes, "--data", "shapes:2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "AP50" in out and "bbox" in out and "segm" in out
    assert main(["evaluate", "--weights", shapes, "--data", "shapes:2", "--iou-type", "bbox", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bbox" in out and "segm" not in out

    from mrcnn_edu.data import ShapesDataset, write_coco

    data = ShapesDataset(2, size=96, seed=5)
    write_coco(tmp_path / "coco", [(*data[i], f"img{i}.png") for i in range(2)], data.categories)
    assert main(["evaluate", "--weights", shapes, "--data", str(tmp_path / "coco"), "--max-images", "1",
                 "--quiet"]) == 0
    assert "1 image" in capsys.readouterr().out
    assert main(["evaluate", "--weights", str(weights_files / "tanks.safetensors"), "--data",
                 str(tmp_path / "coco"), "--quiet"]) == 2
    one_line_error(capsys, "classes")
    assert main(["evaluate", "--weights", shapes, "--data", str(tmp_path / "nowhere")]) == 2
    one_line_error(capsys, "nowhere")
    assert main(["evaluate", "--weights", shapes, "--data", "shapes:zero"]) == 2
    one_line_error(capsys, "shapes:N")
    assert main(["evaluate", "--weights", str(tmp_path / "w.safetensors"), "--data", "shapes"]) == 2
    one_line_error(capsys, "w.safetensors")
