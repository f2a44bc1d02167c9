"""Tests for mrcnn_edu.data: image loading, COCO folders (reading, checking, writing), shapes, augmentations."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_edu import data
from mrcnn_edu.data import (
    CocoDataset,
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomRotate90,
    RandomVerticalFlip,
    ScaleJitter,
    ShapesDataset,
    collate_fn,
    decode_segmentation,
    load_image,
    mask_to_rle,
    write_coco,
)
from mrcnn_edu.oil_tanks import masks_to_boxes
from mrcnn_edu.utils import UserError

# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def _save(img: Image.Image, path: Path, fmt: str = "PNG") -> Path:
    img.save(path, format=fmt)
    return path


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I"])
def test_load_image_converts_every_mode_to_float_rgb(tmp_path, mode):
    grey8 = RGB[..., 0]
    if mode == "RGB":
        img, expected = Image.fromarray(RGB), RGB / 255
    elif mode == "RGBA":
        alpha = np.full((5, 7, 1), 17, np.uint8)
        img, expected = Image.fromarray(np.concatenate([RGB, alpha], 2)), RGB / 255  # alpha dropped
    elif mode == "L":
        img, expected = Image.fromarray(grey8), np.repeat(grey8[..., None], 3, 2) / 255
    elif mode == "LA":
        img = Image.fromarray(np.stack([grey8, np.zeros_like(grey8)], 2), mode="LA")
        expected = np.repeat(grey8[..., None], 3, 2) / 255
    elif mode == "P":
        palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
        img = Image.fromarray(grey8, mode="L").convert("P")
        img.putpalette(palette.reshape(-1).tolist())
        expected = palette[grey8] / 255
    elif mode == "1":
        bits = grey8 > 127
        img, expected = Image.fromarray(bits), np.repeat(bits[..., None], 3, 2).astype(float)
    elif mode == "I;16":
        values = grey8.astype(np.uint16) * 257 + 3
        img, expected = Image.fromarray(values), np.repeat(values[..., None], 3, 2) / 65535
    else:  # "I": 32-bit integers, from TIFF
        values = grey8.astype(np.int32) * 200
        img, expected = Image.fromarray(values), np.repeat(values[..., None], 3, 2) / 65535
    assert img.mode == mode
    path = _save(img, tmp_path / "x.tif", "TIFF") if mode == "I" else _save(img, tmp_path / "x.png")
    image = load_image(path)
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(image, torch.from_numpy(expected).float().permute(2, 0, 1), atol=1e-6, rtol=0)


def test_load_image_jpeg_and_1bit_extremes(tmp_path):
    smooth = np.stack([*np.meshgrid(np.linspace(0, 200, 24), np.linspace(30, 90, 16)), np.full((16, 24), 128.0)], 2)
    image = load_image(_save(Image.fromarray(smooth.astype(np.uint8)), tmp_path / "x.jpg", "JPEG"))
    expected = torch.from_numpy(smooth / 255).float().permute(2, 0, 1)
    assert image.shape == (3, 16, 24) and (image - expected).abs().max() < 0.05
    ones = load_image(_save(Image.fromarray(np.ones((2, 3), bool)), tmp_path / "ones.png"))
    assert torch.equal(ones, torch.ones(3, 2, 3))


def _truncated(path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("folder", "not a file"),
    ("text", "cannot read"),
    ("empty", "cannot read"),
    ("truncated_png", "cannot read"),
    ("truncated_jpeg", "cannot read"),
    ("int32_out_of_range", "0..65535"),
    ("float", "float"),
])
def test_load_image_refuses_bad_files_naming_them(tmp_path, case, expected):
    path = tmp_path / f"{case}.png"
    if case == "folder":
        path.mkdir()
    elif case == "text":
        path.write_text("not an image\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated_png":
        _truncated(path, "PNG")
    elif case == "truncated_jpeg":
        path = _truncated(tmp_path / "t.jpg", "JPEG")
    elif case == "int32_out_of_range":
        path = _save(Image.fromarray(np.array([[0, 70000]], np.int32)), tmp_path / "i.tif", "TIFF")
    elif case == "float":
        path = _save(Image.fromarray(np.array([[0.5, 1.0]], np.float32)), tmp_path / "f.tif", "TIFF")
    with pytest.raises(UserError, match=expected) as info:
        load_image(path)
    assert path.name in str(info.value)


# ----------------------------------------------------------------------------------------------
# Segmentations: RLE and polygons
# ----------------------------------------------------------------------------------------------


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, h, w)) < 0.3).to(torch.uint8)


def test_rle_round_trip_and_our_reading_of_the_compressed_string():
    for mask in list(_random_masks(4, 13, 9)) + [torch.zeros(4, 5, dtype=torch.uint8),
                                                 torch.ones(4, 5, dtype=torch.uint8)]:
        rle = mask_to_rle(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == list(mask.shape)
        assert torch.equal(decode_segmentation(rle, *mask.shape), mask)
        # our Python reading of the string gives the runs of the column-major mask
        runs = data._rle_string_to_counts(rle["counts"])
        assert sum(runs) == mask.numel()
        values = np.resize([0, 1], len(runs))
        column_major = np.repeat(values, runs).reshape(mask.shape[1], mask.shape[0]).T
        assert np.array_equal(column_major, mask.numpy())
        # the same runs, uncompressed, decode to the same mask
        assert torch.equal(decode_segmentation({"size": list(mask.shape), "counts": runs}, *mask.shape), mask)
    assert mask_to_rle(torch.tensor([[0, 255]]))["counts"] == mask_to_rle(torch.tensor([[0, 1]]))["counts"]


def test_polygons_rasterise_like_coco():
    square = decode_segmentation([[0, 0, 4, 0, 4, 4, 0, 4]], 6, 6)  # pixel (i, j) covers [j, j+1] x [i, i+1]
    expected = torch.zeros(6, 6, dtype=torch.uint8)
    expected[:4, :4] = 1
    assert torch.equal(square, expected)
    two = decode_segmentation([[1, 1, 3, 1, 3, 3, 1, 3], [4, 4, 6, 4, 6, 6, 4, 6]], 6, 6)  # the union
    assert two.sum() == 8 and two[1:3, 1:3].all() and two[4:, 4:].all()


@pytest.mark.parametrize("segmentation, expected", [
    ([], "segmentation is"),
    ([[1, 2, 3, 4, 5]], "even number"),
    ([[1, 2, 3, 4]], "at least 6"),
    ([[1, 2, "a", 4, 5, 6]], "list of numbers"),
    ([[1, 2, float("nan"), 4, 5, 6]], "finite"),
    ("1 2 3", "segmentation is"),
    ({"size": [4, 5], "counts": [3, 4]}, "add up to"),
    ({"size": [4, 5], "counts": [25, -5]}, ">= 0"),
    ({"size": [5, 4], "counts": [20]}, "image is"),
    ({"size": [4, 5], "counts": "0~~"}, "invalid character"),
    ({"size": [4, 5], "counts": "P"}, "middle of a number"),
    ({"size": [4, 5], "counts": 3.5}, "counts"),
    ({"counts": [20]}, "size"),
])
def test_malformed_segmentations_are_refused(segmentation, expected):
    with pytest.raises(UserError, match=expected):
        decode_segmentation(segmentation, 4, 5)


# ----------------------------------------------------------------------------------------------
# CocoDataset: reading and checking
# ----------------------------------------------------------------------------------------------

H, W = 20, 30


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).to(torch.uint8)


def _coco_dict() -> dict:
    """Three images (one in a sub-folder, one without annotations), every kind of segmentation."""
    block = torch.zeros(H, W, dtype=torch.uint8)
    block[2:6, 20:27] = 1
    crowd = torch.zeros(H, W, dtype=torch.uint8)
    crowd[10:18, 0:10] = 1
    runs = data._rle_string_to_counts(mask_to_rle(block)["counts"])
    return {
        "info": {"description": "fixture"},
        "images": [
            {"id": 5, "file_name": "a.png", "width": W, "height": H, "scene": "north"},
            {"id": 9, "file_name": "sub/b.png", "width": W, "height": H},
            {"id": 11, "file_name": "c.png", "width": W, "height": H},
        ],
        "categories": [{"id": 12, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]],
             "bbox": [2, 2, 8, 6], "iscrowd": 0, "roof": "floating", "fill": 0.25},
            {"id": 2, "image_id": 5, "category_id": 12, "segmentation": mask_to_rle(_disc(H, W, 15, 12, 4)),
             "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 1, "segmentation": {"size": [H, W], "counts": runs},
             "bbox": [20, 2, 7, 4]},
            {"id": 4, "image_id": 9, "category_id": 7, "segmentation": mask_to_rle(crowd), "iscrowd": 1,
             "bbox": [0, 10, 10, 8]},
        ],
    }


def _write_folder(root: Path, coco: dict, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for k, entry in enumerate(coco["images"]):
            path = root / entry["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(k).integers(0, 256, (entry["height"], entry["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def coco_folder(tmp_path) -> Path:
    return _write_folder(tmp_path / "coco", _coco_dict())


def test_coco_dataset_reads_polygons_rle_and_maps_arbitrary_category_ids(coco_folder):
    ds = CocoDataset(coco_folder)
    assert len(ds) == 3 and ds.num_classes == 4
    assert ds.class_names == ("__background__", "cat", "dog", "bird")  # sorted by category id 1, 7, 12
    assert ds.label_to_category_id == {1: 1, 2: 7, 3: 12}

    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert torch.equal(image, load_image(coco_folder / "a.png"))
    assert target["image_id"] == 5 and isinstance(target["image_id"], int)
    assert target["labels"].tolist() == [2, 3]  # dog (7), bird (12)
    assert target["masks"].shape == (2, H, W) and target["masks"].dtype == torch.uint8
    assert target["masks"][0].sum() == 8 * 6 and target["masks"][0][2:8, 2:10].all()  # the polygon
    assert torch.equal(target["masks"][1], _disc(H, W, 15, 12, 4))  # the compressed RLE
    assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]))
    assert target["boxes"][0].tolist() == [2, 2, 10, 8]
    assert target["attributes"] == [{"roof": "floating", "fill": 0.25}, {}]
    assert target["image_attributes"] == {"scene": "north"}

    _, target = ds[1]  # the crowd region is no training object
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[20, 2, 27, 6]]

    _, target = ds[-1]  # no annotations: empty targets of the right shapes
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, H, W) and target["image_id"] == 11
    with pytest.raises(IndexError):
        ds[3]


def test_coco_gt_keeps_crowds_and_fills_in_area_and_bbox(coco_folder):
    ds = CocoDataset(coco_folder)
    gt = ds.coco_gt()
    assert [image["id"] for image in gt["images"]] == [5, 9, 11]
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0, 1]
    for a in gt["annotations"]:
        assert isinstance(a["segmentation"]["counts"], str) and a["segmentation"]["size"] == [H, W]
        mask = decode_segmentation(a["segmentation"], H, W)
        assert a["area"] == mask.sum().item()
        x, y, w, h = a["bbox"]
        assert masks_to_boxes(mask[None])[0].tolist() == [x, y, x + w, y + h]
    assert gt["annotations"][0]["roof"] == "floating"  # extra fields pass through
    json.dumps(gt)  # plain JSON types only
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    assert sorted(coco.getAnnIds(imgIds=[9], iscrowd=None)) == [3, 4]


def test_coco_gt_renumbers_annotation_id_zero(tmp_path):
    coco = _coco_dict()
    for a in coco["annotations"]:
        a["id"] -= 1
    ds = CocoDataset(_write_folder(tmp_path / "c", coco))
    assert [a["id"] for a in ds.coco_gt()["annotations"]] == [1, 2, 3, 4]


def _edit(path: list, value):
    def edit(coco: dict) -> None:
        node = coco
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(path: list):
    def edit(coco: dict) -> None:
        node = coco
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_delete(["categories"]), r"missing top-level key\(s\) \['categories'\]"),
    (_edit(["images"], {}), "'images' must be a list"),
    (_edit(["annotations", 1, "image_id"], 99), "annotation id 2: image_id 99 is not in 'images'"),
    (_edit(["annotations", 0, "category_id"], 3), r"annotation id 1 \(image id 5, 'a.png'\): category_id 3 is not"),
    (_edit(["annotations", 0, "bbox"], [25, 2, 8, 6]), "annotation id 1 .*bbox .* lies outside the image"),
    (_edit(["annotations", 0, "bbox"], [-2, 2, 8, 6]), "annotation id 1 .*outside"),
    (_edit(["annotations", 0, "bbox"], [2, 2, 8]), "annotation id 1 .*4 numbers"),
    (_edit(["annotations", 0, "segmentation"], []), "annotation id 1 .*segmentation is"),
    (_edit(["annotations", 0, "segmentation"], [[2, 2, 10, 2, 10, 2]]), "annotation id 1 .*empty"),
    (_edit(["annotations", 0, "segmentation"], [[2, 2, 10, 2, 10]]), "annotation id 1 .*even number"),
    (_delete(["annotations", 0, "segmentation"]), "annotation id 1 .*no 'segmentation'"),
    (_edit(["annotations", 1, "segmentation"], {"size": [H, W], "counts": "0000"}),
     "annotation id 2 .*add up to"),
    (_edit(["annotations", 2, "segmentation"], {"size": [H, W], "counts": [H * W]}), "annotation id 3 .*empty"),
    (_edit(["annotations", 1, "segmentation", "size"], [W, H]), "annotation id 2 .*'size'"),
    (_edit(["annotations", 1, "id"], 1), "annotation id 1: id appears twice"),
    (_edit(["annotations", 1, "iscrowd"], 2), "annotation id 2 .*'iscrowd' must be 0 or 1"),
    (_edit(["images", 1, "id"], 5), "image id 5: id appears twice"),
    (_edit(["images", 0, "width"], 0), r"image id 5 \('a.png'\): 'width' must be a positive integer"),
    (_edit(["images", 0, "file_name"], "../a.png"), r"image id 5 \('../a.png'\): file_name contains '..'"),
    (_edit(["images", 0, "file_name"], "sub/../../a.png"), "contains '..'"),
    (_edit(["images", 0, "file_name"], "..\\a.png"), "contains '..'"),
    (_edit(["images", 0, "file_name"], "/etc/passwd"), "image id 5 .*absolute path"),
    (_edit(["images", 0, "file_name"], "C:\\data\\a.png"), "absolute path"),
    (_edit(["images", 0, "file_name"], "missing.png"), r"image id 5 \('missing.png'\): image file .* not found"),
    (_edit(["categories", 1, "id"], 12), "category id 12 appears twice"),
    (_edit(["categories"], []), "non-empty list"),
])
def test_bad_coco_files_are_refused_naming_the_entry(tmp_path, edit, expected):
    coco = _coco_dict()
    root = _write_folder(tmp_path / "c", coco)
    edit(coco)
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(UserError, match=expected) as info:
        CocoDataset(root)
    assert "annotations.json" in str(info.value)


def test_bbox_within_one_pixel_of_the_border_is_accepted(tmp_path):
    coco = _coco_dict()
    coco["annotations"][0]["bbox"] = [-0.9, 2, W + 1.8, 6]
    assert len(CocoDataset(_write_folder(tmp_path / "c", coco))) == 3


def test_missing_or_broken_annotation_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CocoDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no annotation file .*annotations.json"):
        CocoDataset(tmp_path / "empty")
    (tmp_path / "empty" / "annotations.json").write_text('{"images": [}')
    with pytest.raises(UserError, match=r"not valid JSON: .* line 1, column 13"):
        CocoDataset(tmp_path / "empty")
    (tmp_path / "empty" / "annotations.json").write_text("[]")
    with pytest.raises(UserError, match="expected a JSON object"):
        CocoDataset(tmp_path / "empty")


def test_many_problems_are_summarised_in_one_message(tmp_path):
    coco = _coco_dict()
    root = _write_folder(tmp_path / "c", coco)
    for entry in coco["images"]:
        entry["file_name"] = "gone_" + entry["file_name"].replace("/", "_")
    for a in coco["annotations"]:
        a["category_id"] = 99
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(UserError, match=r"3 image files missing") as info:
        CocoDataset(root)
    (root / "annotations.json").write_text(json.dumps({**_coco_dict(), "annotations": coco["annotations"] * 2}))
    with pytest.raises(UserError, match=r"and \d+ more problems") as info:
        CocoDataset(root)
    assert "\n" not in str(info.value)


def test_image_size_mismatch_is_reported_when_loading(tmp_path):
    coco = _coco_dict()
    root = _write_folder(tmp_path / "c", coco)
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(root / "a.png")
    ds = CocoDataset(root)
    with pytest.raises(UserError, match=r"a.png is 30x21 pixels but .* says width=30, height=20 \(image id 5\)"):
        ds[0]


def test_image_dir_and_annotation_path_options(tmp_path):
    coco = _coco_dict()
    _write_folder(tmp_path / "root" / "pictures", coco, images=True)
    (tmp_path / "root" / "labels").mkdir()
    (tmp_path / "root" / "pictures" / "annotations.json").rename(tmp_path / "root" / "labels" / "val.json")
    ds = CocoDataset(tmp_path / "root", "labels/val.json", image_dir="pictures")
    assert ds.image_path(1) == tmp_path / "root" / "pictures" / "sub" / "b.png"
    assert ds[1][0].shape == (3, H, W)


# ----------------------------------------------------------------------------------------------
# write_coco
# ----------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 3, "name": "triangle"}, {"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]


def _shapes_items(n: int = 3, with_attributes: bool = True):
    ds = ShapesDataset(n, size=48, seed=5, min_shapes=2)
    for i in range(n):
        image, target = ds[i]
        if with_attributes:
            target["attributes"] = [{"index": k, "colourful": bool(k % 2)} for k in range(len(target["labels"]))]
            target["image_attributes"] = {"scene": f"s{i}", "sun": [0.5, 1.0]}
        yield image, target, f"img_{i:03d}.png"


def test_write_coco_rle_round_trip_is_exact(tmp_path):
    out = write_coco(tmp_path / "out", _shapes_items(), CATEGORIES, info={"note": "x"}, manifest={"seed": 5})
    assert out == tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "images", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"seed": 5}
    assert json.loads((out / "annotations.json").read_text())["info"] == {"note": "x"}
    ds = CocoDataset(out)
    assert ds.class_names == ("__background__", "square", "circle", "triangle")
    assert len(ds) == 3
    for (image, target, name), (image2, target2) in zip(_shapes_items(), ds):
        assert ds.images[target2["image_id"]]["file_name"] == f"images/{name}"
        assert torch.equal(image2, (image * 255).round() / 255)  # PNG: exact up to 8-bit quantisation
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(target2[key], target[key]), key
        assert target2["image_id"] == target["image_id"]
        assert target2["attributes"] == target["attributes"]
        assert target2["image_attributes"] == target["image_attributes"]


def test_write_coco_polygon_round_trip_on_discs(tmp_path):
    discs = torch.stack([_disc(64, 80, 20, 20, 6), _disc(64, 80, 50, 35, 14.5), _disc(64, 80, 70, 55, 25)])
    target = {"masks": discs, "labels": torch.tensor([1, 2, 3])}
    out = write_coco(tmp_path / "p", [(torch.rand(3, 64, 80), target, "d")], CATEGORIES, mask_format="polygon")
    written = json.loads((out / "annotations.json").read_text())
    assert all(isinstance(a["segmentation"], list) for a in written["annotations"])
    assert written["images"][0]["file_name"] == "images/d.png"  # the extension is added
    _, target2 = CocoDataset(out)[0]
    assert target2["labels"].tolist() == [1, 2, 3]
    for before, after in zip(discs, target2["masks"]):
        iou = (before & after).sum() / (before | after).sum()
        assert iou > 0.9, iou


def test_write_coco_is_atomic_when_an_item_fails(tmp_path):
    def items():
        yield from _shapes_items(2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_coco(tmp_path / "out", items(), CATEGORIES)
    assert list(tmp_path.iterdir()) == []  # neither out nor a temporary folder

    # an existing folder survives a failed rewrite untouched
    write_coco(tmp_path / "out", _shapes_items(1), CATEGORIES)
    before = (tmp_path / "out" / "annotations.json").read_bytes()
    with pytest.raises(RuntimeError):
        write_coco(tmp_path / "out", items(), CATEGORIES, overwrite=True)
    assert (tmp_path / "out" / "annotations.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_coco_restores_the_old_folder_if_the_final_rename_fails(tmp_path, monkeypatch):
    write_coco(tmp_path / "out", _shapes_items(1), CATEGORIES)
    before = (tmp_path / "out" / "annotations.json").read_bytes()
    real_replace = data.os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "out" and ".tmp-" in Path(src).name:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_coco(tmp_path / "out", _shapes_items(2), CATEGORIES, overwrite=True)
    assert (tmp_path / "out" / "annotations.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_coco_refuses_to_overwrite_without_permission(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists and is not empty; pass overwrite=True"):
        write_coco(out, _shapes_items(1), CATEGORIES)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    write_coco(out, _shapes_items(1), CATEGORIES, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "annotations.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        write_coco(tmp_path / "file", _shapes_items(1), CATEGORIES)


def test_write_coco_accepts_an_empty_existing_folder_and_images_without_objects(tmp_path):
    (tmp_path / "out").mkdir()
    empty = {"masks": torch.zeros(0, 16, 16, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.int64)}
    write_coco(tmp_path / "out", [(torch.zeros(3, 16, 16), empty, "e.png")], CATEGORIES)
    _, target = CocoDataset(tmp_path / "out")[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 16, 16)


@pytest.mark.parametrize("change, expected", [
    (lambda t, n: (t, "../x.png"), "contains '..'"),
    (lambda t, n: (t, "/tmp/x.png"), "absolute path"),
    (lambda t, n: (t, "x.jpg"), "image_format is 'png'"),
    (lambda t, n: ({**t, "labels": t["labels"] + 5}, n), "expected 1..3"),
    (lambda t, n: ({**t, "attributes": [{"area": 1}] * len(t["labels"])}, n), "overwrite COCO's own fields"),
    (lambda t, n: ({**t, "attributes": [{}]}, n), "1 attributes for"),
    (lambda t, n: ({**t, "image_attributes": {"width": 3}}, n), "overwrite COCO's own fields"),
    (lambda t, n: ({k: v for k, v in t.items() if k != "masks"}, n), "needs 'masks'"),
    (lambda t, n: ({**t, "attributes": [{"f": object()}] * len(t["labels"])}, n), "JSON-serialisable"),
])
def test_write_coco_refuses_bad_items(tmp_path, change, expected):
    image, target, name = next(_shapes_items(1, with_attributes=False))
    target, name = change(target, name)
    with pytest.raises(UserError, match=expected):
        write_coco(tmp_path / "out", [(image, target, name)], CATEGORIES)
    assert list(tmp_path.iterdir()) == []


def test_write_coco_refuses_bad_arguments(tmp_path):
    items = list(_shapes_items(1))
    with pytest.raises(UserError, match="mask_format"):
        write_coco(tmp_path / "o", items, CATEGORIES, mask_format="bitmap")
    with pytest.raises(UserError, match="image_format"):
        write_coco(tmp_path / "o", items, CATEGORIES, image_format="gif")
    with pytest.raises(UserError, match="same target\\['image_id'\\]"):
        write_coco(tmp_path / "o", [items[0], (items[0][0], items[0][1], "other.png")], CATEGORIES)
    assert list(tmp_path.iterdir()) == []


def test_write_coco_jpeg(tmp_path):
    items = [(image, target, name.removesuffix(".png")) for image, target, name in _shapes_items(1)]
    out = write_coco(tmp_path / "j", items, CATEGORIES, image_format="jpeg")
    assert (out / "images" / "img_000.jpg").is_file()
    (image, target, _), (image2, target2) = next(_shapes_items(1)), CocoDataset(out)[0]
    assert (image - image2).abs().mean() < 0.03 and torch.equal(target["masks"], target2["masks"])


# ----------------------------------------------------------------------------------------------
# ShapesDataset
# ----------------------------------------------------------------------------------------------


def test_shapes_follow_the_data_contract_and_are_deterministic_per_index():
    ds = ShapesDataset(40, seed=0)
    assert ds.class_names == ("__background__", "square", "circle", "triangle")
    assert ds.label_to_category_id == {1: 1, 2: 2, 3: 3} and len(ds) == 40
    for i in range(len(ds)):
        image, target = ds[i]
        n = len(target["labels"])
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert 1 <= n <= 4 and target["labels"].dtype == torch.int64 and target["image_id"] == i
        assert set(target["labels"].tolist()) <= {1, 2, 3}
        assert target["masks"].shape == (n, 128, 128) and target["masks"].dtype == torch.uint8
        assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]))
        assert target["masks"].sum(0).max() <= 1  # occlusion: every pixel belongs to at most one shape
        sides = target["boxes"][:, 2:] - target["boxes"][:, :2]
        assert sides.max() <= 51 and target["masks"].flatten(1).sum(1).min() >= 0.5 * 12 * 10 * 0.43
    # the same index gives the same item, whatever was drawn before; other seeds differ
    a = ShapesDataset(40, seed=0)[17]
    assert torch.equal(a[0], ds[17][0]) and torch.equal(a[1]["masks"], ds[17][1]["masks"])
    assert not torch.equal(ShapesDataset(40, seed=1)[17][0], a[0])
    assert torch.equal(ds[-1][0], ds[39][0])
    with pytest.raises(IndexError):
        ds[40]


def test_shape_silhouettes_tell_the_class_and_colours_do_not():
    ds = ShapesDataset(60, seed=3)
    fill = {1: [], 2: [], 3: []}
    colours = {1: [], 2: [], 3: []}
    occluded = 0
    for i in range(len(ds)):
        image, target = ds[i]
        boxes = target["boxes"]
        for k, (mask, label) in enumerate(zip(target["masks"].bool(), target["labels"].tolist())):
            colours[label].append(image[:, mask].mean(1))
            others = torch.cat([boxes[:k], boxes[k + 1:]])
            overlap = (torch.min(others[:, 2:], boxes[k, 2:]) > torch.max(others[:, :2], boxes[k, :2])).all(1)
            if overlap.any():
                occluded += 1
                continue
            x1, y1, x2, y2 = boxes[k].int().tolist()
            fill[label].append(mask.sum().item() / ((x2 - x1) * (y2 - y1)))
    # the share of its box a shape fills: square 1, circle pi/4, triangle 1/2
    for label, expected in [(1, 1.0), (2, math.pi / 4), (3, 0.5)]:
        assert abs(np.mean(fill[label]) - expected) < 0.06, (label, np.mean(fill[label]))
    for label, values in colours.items():
        spread = torch.stack(values).std(0)
        assert (spread > 0.15).all(), (label, spread)  # colours vary within every class
    assert occluded >= 10  # overlapping shapes are common enough to learn occlusion from


def test_occlusion_removes_covered_pixels_from_earlier_masks():
    ds = ShapesDataset(80, seed=0)
    cut = 0
    for i in range(len(ds)):
        _, target = ds[i]
        for mask, box, label in zip(target["masks"], target["boxes"], target["labels"].tolist()):
            x1, y1, x2, y2 = box.int().tolist()
            if label == 1 and mask.sum() < (x2 - x1) * (y2 - y1):  # a square that is not a full box
                cut += 1
    assert cut > 0


def test_shapes_options_and_bad_arguments():
    small = ShapesDataset(5, size=(48, 64), seed=2, max_shapes=2, min_shapes=2)
    image, target = small[0]
    assert image.shape == (3, 48, 64) and target["masks"].shape[1:] == (48, 64)
    assert all(1 <= len(small[i][1]["labels"]) <= 2 for i in range(5))
    empty = ShapesDataset(2, min_shapes=0, max_shapes=0)[0][1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 128, 128)
    for kwargs, expected in [({"n": -1}, "n:"), ({"n": 3, "size": 8}, "size"),
                             ({"n": 3, "min_shapes": 3, "max_shapes": 2}, "min_shapes"),
                             ({"n": 3, "shape_size": (10, 200)}, "shape_size"), ({"n": 3, "seed": -2}, "seed")]:
        with pytest.raises(UserError, match=expected):
            ShapesDataset(**kwargs)


def test_shapes_coco_gt_matches_the_items_and_scores_perfect_predictions_as_ap_1():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = ShapesDataset(6, size=64, seed=4)
    gt = ds.coco_gt()
    assert [image["id"] for image in gt["images"]] == list(range(6))
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    results = []
    for i in range(len(ds)):
        _, target = ds[i]
        mine = [a for a in gt["annotations"] if a["image_id"] == i]
        assert len(mine) == len(target["labels"])
        for a, mask, label in zip(mine, target["masks"], target["labels"].tolist()):
            assert torch.equal(decode_segmentation(a["segmentation"], 64, 64), mask)
            assert a["category_id"] == ds.label_to_category_id[label] and a["area"] == mask.sum().item()
            results.append({"image_id": i, "category_id": a["category_id"], "segmentation": a["segmentation"],
                            "bbox": a["bbox"], "score": 0.9})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Augmentations
# ----------------------------------------------------------------------------------------------


def _item(seed: int = 0):
    image, target = ShapesDataset(10, size=64, seed=seed, min_shapes=3)[0]
    n = len(target["labels"])
    target["attributes"] = [{"k": k} for k in range(n)]
    target["area"] = target["masks"].flatten(1).sum(1).float()
    return image, target


AUGMENTATIONS = {
    "hflip": RandomHorizontalFlip(1.0),
    "vflip": RandomVerticalFlip(1.0),
    "rot90": RandomRotate90(1.0),
    "scale": ScaleJitter(0.5, 1.5),
    "scale_keep_size": ScaleJitter(0.5, 1.5, keep_size=True),
    "colour": ColorJitter(0.4, 0.4, 0.4, 0.1),
    "all": Compose([RandomHorizontalFlip(), RandomVerticalFlip(), RandomRotate90(), ScaleJitter(0.7, 1.4, True),
                    ColorJitter(0.3, 0.3, 0.3, 0.05)]),
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentations_keep_boxes_masks_and_instances_consistent(name):
    augment = AUGMENTATIONS[name]
    for seed in range(4):
        torch.manual_seed(seed)
        image, target = _item(seed)
        image2, target2 = augment(image, target)
        n = len(target2["labels"])
        assert image2.dim() == 3 and image2.shape[0] == 3 and 0 <= image2.min() and image2.max() <= 1
        assert target2["masks"].shape == (n, *image2.shape[1:]) and target2["masks"].dtype == torch.uint8
        assert torch.equal(target2["boxes"], masks_to_boxes(target2["masks"]))
        assert target2["masks"].flatten(1).any(1).all()  # no empty instance left
        assert len(target2["attributes"]) == n and target2["area"].shape == (n,)
        assert torch.equal(target2["area"], target2["masks"].flatten(1).sum(1).float())
        assert target2["image_id"] == target["image_id"]
        # the attributes still belong to their instance: label of instance "k" unchanged
        for attributes, label in zip(target2["attributes"], target2["labels"].tolist()):
            assert target["labels"][attributes["k"]] == label
        # the input is not modified
        assert torch.equal(target["boxes"], masks_to_boxes(target["masks"])) and len(target["attributes"]) == len(
            target["labels"])
        # reproducible from PyTorch's global generator
        torch.manual_seed(seed)
        image3, target3 = augment(*_item(seed))
        assert torch.equal(image2, image3) and torch.equal(target2["masks"], target3["masks"])


@pytest.mark.parametrize("augment, times", [(RandomHorizontalFlip(1.0), 2), (RandomVerticalFlip(1.0), 2),
                                            (RandomRotate90(1.0), 4)])
def test_flips_and_rotations_undo_themselves(augment, times):
    image, target = _item()
    image2, target2 = image, target
    for step in range(times):
        image2, target2 = augment(image2, target2)
        if step == 0:
            assert not torch.equal(image2, image)
    assert torch.equal(image2, image)
    for key in ("boxes", "labels", "masks", "area"):
        assert torch.equal(target2[key], target[key]), key
    assert target2["attributes"] == target["attributes"]


def test_rotate90_moves_a_pixel_where_the_docstring_says():
    image = torch.zeros(3, 4, 6)
    mask = torch.zeros(1, 4, 6, dtype=torch.uint8)
    image[:, 1, 4] = 1.0  # (x, y) = (4, 1)
    mask[0, 1, 4] = 1
    target = {"boxes": masks_to_boxes(mask), "labels": torch.tensor([1]), "masks": mask}
    image2, target2 = RandomRotate90(1.0)(image, target)
    assert image2.shape == (3, 6, 4) and image2[0, 6 - 1 - 4, 1] == 1  # -> (y, W - 1 - x) = (1, 1)
    assert target2["boxes"].tolist() == [[1, 1, 2, 2]]


@pytest.mark.parametrize("augment", [RandomHorizontalFlip(1.0), RandomVerticalFlip(1.0), RandomRotate90(1.0),
                                     ScaleJitter(2.0, 2.0)])
def test_box_only_targets_move_like_the_masks(augment):
    image, target = _item()
    boxes_only = {k: v for k, v in target.items() if k != "masks"}
    _, with_masks = augment(image, target)
    _, without = augment(image, boxes_only)
    assert "masks" not in without
    torch.testing.assert_close(without["boxes"], with_masks["boxes"])


def test_probability_zero_changes_nothing():
    image, target = _item()
    for augment in [RandomHorizontalFlip(0.0), RandomVerticalFlip(0.0), RandomRotate90(0.0)]:
        image2, target2 = augment(image, target)
        assert image2 is image and target2 is target
    with pytest.raises(UserError, match="probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(UserError, match="min_scale"):
        ScaleJitter(1.5, 0.5)


def test_scale_jitter_resizes_image_and_masks_together():
    image, target = _item()
    image2, target2 = ScaleJitter(1.5, 1.5)(image, target)
    assert image2.shape == (3, 96, 96) and target2["masks"].shape[1:] == (96, 96)
    assert len(target2["labels"]) == len(target["labels"])
    ratio = target2["area"].sum() / target["area"].sum()
    assert abs(ratio - 1.5 ** 2) < 0.1
    image2, target2 = ScaleJitter(0.5, 0.5)(image, target)
    assert image2.shape == (3, 32, 32) and target2["masks"].shape[1:] == (32, 32)
    torch.manual_seed(0)
    image2, target2 = ScaleJitter(0.5, 2.0, keep_size=True)(image, target)
    assert image2.shape == image.shape and target2["masks"].shape == (len(target2["labels"]), 64, 64)


def test_vanishing_instances_are_dropped_everywhere():
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(4, 64, 64, dtype=torch.uint8)
    masks[0, 1, 1] = 1  # a single pixel: gone after shrinking 4x
    masks[1, 20:40, 20:40] = 1
    masks[2, 0:6, 58:64] = 1  # corners: cropped away unless the crop lies in their corner
    masks[3, 58:64, 0:6] = 1
    target = {"boxes": masks_to_boxes(masks), "labels": torch.tensor([1, 2, 3, 1]), "masks": masks,
              "area": masks.flatten(1).sum(1).float(), "iscrowd": torch.zeros(4, dtype=torch.int64),
              "attributes": [{"k": k} for k in range(4)], "image_id": 7}
    _, small = ScaleJitter(0.25, 0.25)(image, target)
    assert [a["k"] for a in small["attributes"]] == [1, 2, 3]
    assert small["labels"].tolist() == [2, 3, 1] and small["masks"].shape == (3, 16, 16)
    assert small["boxes"].shape == (3, 4) and small["area"].shape == (3,) and small["iscrowd"].shape == (3,)

    torch.manual_seed(1)
    _, cropped = ScaleJitter(2.0, 2.0, keep_size=True)(image, target)
    kept = [a["k"] for a in cropped["attributes"]]
    assert len(kept) < 4 and cropped["labels"].tolist() == [target["labels"][k].item() for k in kept]
    assert cropped["masks"].shape == (len(kept), 64, 64)
    assert torch.equal(cropped["boxes"], masks_to_boxes(cropped["masks"]))

    boxes_only = {k: v for k, v in target.items() if k not in ("masks", "area")}
    torch.manual_seed(1)
    _, cropped_boxes = ScaleJitter(2.0, 2.0, keep_size=True)(image, boxes_only)
    assert [a["k"] for a in cropped_boxes["attributes"]] == kept
    assert ((cropped_boxes["boxes"][:, 2:] > cropped_boxes["boxes"][:, :2]).all()
            and cropped_boxes["boxes"].min() >= 0 and cropped_boxes["boxes"].max() <= 64)


def test_colour_jitter_touches_only_the_image():
    image, target = _item()
    torch.manual_seed(0)
    image2, target2 = ColorJitter(0.5, 0.5, 0.5, 0.2)(image, target)
    assert target2 is target and image2.shape == image.shape
    assert 0 <= image2.min() and image2.max() <= 1 and not torch.allclose(image2, image)
    bright = torch.ones(3, 8, 8)
    torch.manual_seed(0)
    assert ColorJitter(brightness=0.9)(bright, {})[0].max() <= 1


def test_collate_fn_keeps_lists():
    ds = ShapesDataset(3, size=32)
    images, targets = collate_fn([ds[0], ds[1], ds[2]])
    assert isinstance(images, list) and len(images) == 3 and targets[2]["image_id"] == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == 2 and images[0].shape == (3, 32, 32) and targets[1]["image_id"] == 1
    assert collate_fn([]) == ([], [])


def test_transforms_are_applied_by_getitem_not_by_load():
    ds = ShapesDataset(2, size=32, transforms=RandomHorizontalFlip(1.0))
    image, _ = ds[0]
    raw, _ = ds.load(0)
    assert torch.equal(image, raw.flip(-1))
    assert len(ds.coco_gt()["annotations"]) == len(ds.load(0)[1]["labels"]) + len(ds.load(1)[1]["labels"])
