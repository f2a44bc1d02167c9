"""The real-data path: the Airbus Oil Storage layout -> checked rows -> disc masks -> tiles -> COCO.

The fixture is written on the fly in exactly the Airbus layout (``images/*.jpg`` and
``annotations.csv`` with quoted ``"(x1, y1, x2, y2)"`` bounds) by ``airbus.write_example_layout``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_edu import airbus
from mrcnn_edu.cli import main
from mrcnn_edu.utils import UserError

TILE, OVERLAP = 256, 32

# pycocotools' decode with numpy 2 (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def read_rows(src: Path) -> list[list[str]]:
    with open(src / "annotations.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def write_rows(src: Path, rows: list[list[str]]) -> None:
    with open(src / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def tile_file(split_dir: Path, file_name: str) -> Path:
    for candidate in (split_dir / file_name, split_dir / "images" / file_name):
        if candidate.is_file():
            return candidate
    raise AssertionError(f"no image {file_name} in {split_dir}")


def decode(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = segmentation if isinstance(segmentation["counts"], str) else \
            mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, dict]:
    src = tmp_path_factory.mktemp("airbus") / "src"
    boxes = airbus.write_example_layout(src, n_scenes=3, size=(500, 600), seed=0)
    return src, boxes


@pytest.fixture(scope="module")
def prepared(layout, tmp_path_factory) -> Path:
    src, _ = layout
    out = tmp_path_factory.mktemp("prepared") / "out"
    airbus.prepare_airbus(src, out, tile_size=TILE, overlap=OVERLAP, val_fraction=0.1, seed=0,
                          keep_empty=1.0, progress=False)
    return out


def fresh_layout(tmp_path: Path, n_scenes: int = 2) -> Path:
    src = tmp_path / "src"
    airbus.write_example_layout(src, n_scenes=n_scenes, size=(500, 600), seed=1)
    return src


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("(1, 2, 3, 4)", (1, 2, 3, 4)),
    ("(10.5,20,  30.25 ,40)", (10.5, 20, 30.25, 40)),
    ("[1, 2, 3, 4]", (1, 2, 3, 4)),
])
def test_parse_bounds(text, expected):
    assert airbus.parse_bounds(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("(1, 2, 3)", "not of the form"),
    ("(1, 2, 3, 4, 5)", "not of the form"),
    ("(a, 2, 3, 4)", "'a' is not a number"),
    ("(1, 2, nan, 4)", "not a finite number"),
    ("", "not of the form"),
])
def test_parse_bounds_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        airbus.parse_bounds(text)


@pytest.mark.parametrize("height, width, tile, overlap", [(500, 600, 256, 32), (2560, 2560, 256, 32),
                                                          (300, 100, 128, 0), (257, 256, 256, 100)])
def test_tiles_cover_the_scene_with_overlap(height, width, tile, overlap):
    grid = airbus.tile_grid(height, width, tile, overlap)
    covered = torch.zeros(height, width, dtype=torch.int64)
    for x0, y0, x1, y1 in grid:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel is in a tile
    for starts, length in ((sorted({g[0] for g in grid}), width), (sorted({g[1] for g in grid}), height)):
        assert starts[0] == 0 and starts[-1] == max(length - tile, 0)  # the last tile meets the border
        for a, b in zip(starts, starts[1:]):
            assert tile - (b - a) >= overlap  # neighbours share at least `overlap` pixels


def test_tile_starts_example_and_bad_overlap():
    assert airbus.tile_starts(600, 256, 32) == [0, 224, 344]
    assert airbus.tile_starts(480, 256, 32) == [0, 224]
    assert airbus.tile_starts(100, 256, 32) == [0]
    with pytest.raises(UserError, match="overlap"):
        airbus.tile_starts(600, 256, 256)


def test_disc_mask_is_the_inscribed_disc():
    mask = airbus.box_to_disc_mask((20, 10, 60, 50), 64, 80)  # a 40 px square: radius 20
    assert mask.dtype == torch.uint8 and mask.shape == (64, 80)
    assert abs(mask.sum().item() - math.pi * 20**2) < 2 * math.pi * 20
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # the tight box around the mask is the annotated box (exclusive x2/y2)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (20, 10, 60, 50)
    # symmetric about the centre
    assert torch.equal(mask[10:50, 20:60], mask[10:50, 20:60].flip(0))
    assert torch.equal(mask[10:50, 20:60], mask[10:50, 20:60].flip(1))


def test_disc_mask_follows_a_non_square_box_and_any_origin():
    box = (13.0, 7.0, 41.0, 27.0)  # 28 x 20: an ellipse
    full = airbus.box_to_disc_mask(box, 40, 50)
    ys, xs = torch.nonzero(full, as_tuple=True)
    assert (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1) == (13, 7, 41, 27)
    assert abs(full.sum().item() - math.pi * 14 * 10) < 2 * math.pi * 14
    patch = airbus.box_to_disc_mask(box, 25, 30, origin=(10, 5))  # the same tank on a patch
    assert torch.equal(patch, full[5:30, 10:40])
    tiny = airbus.box_to_disc_mask((5.2, 5.2, 5.6, 5.6), 10, 10)  # too thin for a pixel centre
    assert tiny.sum() == 1 and tiny[5, 5] == 1


def test_box_cut_by_the_scene_border_is_completed_to_a_disc():
    # a 36 px tank centred at x = 4 shows only x in [0, 22) in a 100 x 100 scene
    assert airbus.complete_border_box((0, 40, 22, 76), 100, 100) == (-14, 40, 22, 76)
    assert airbus.complete_border_box((80, 0, 100, 30), 100, 100) == (80, 0, 110, 30)  # two borders
    assert airbus.complete_border_box((30, 40, 52, 76), 100, 100) == (30, 40, 52, 76)  # inside: unchanged
    patch = airbus.disc_patch((0, 40, 22, 76), 100, 100)
    disc = airbus.box_to_disc_mask((-14, 40, 22, 76), 100, 100)
    assert (patch.x0, patch.y0) == (0, 40) and patch.area == int(disc.sum())
    assert torch.equal(patch.mask, disc[40:76, 0:22])
    # the visible part of a disc: the column at the border is the disc's widest chord cut off,
    # far taller than an ellipse squeezed into the 22 px wide box would have there
    squeezed = airbus.box_to_disc_mask((0, 40, 22, 76), 100, 100)
    assert patch.mask[:, 0].sum() > squeezed[:, 0].sum() + 10


def test_tile_scene_keeps_every_tank_and_cuts_masks_at_tile_borders():
    torch.manual_seed(0)
    image = torch.rand(3, 200, 300)
    boxes = torch.tensor([[10., 10., 40., 40.],      # inside tile (0, 0)
                          [110., 50., 140., 80.],    # on the border between the first two columns
                          [0., 150., 20., 190.],     # cut by the scene border
                          [270., 160., 300., 190.]])  # in the last column, against the right border
    tiles = airbus.tile_scene(image, boxes, tile_size=128, overlap=16, min_visible=0.5)
    assert len(tiles) == len(airbus.tile_grid(200, 300, 128, 16))
    seen = set()
    for tile in tiles:
        _, h, w = tile.image.shape
        assert torch.equal(tile.image, image[:, tile.y0:tile.y0 + h, tile.x0:tile.x0 + w])  # real background
        assert tile.target["masks"].shape == (len(tile.tank_ids), h, w)
        assert tile.target["boxes"].shape == (len(tile.tank_ids), 4)
        for k, (i, fraction) in enumerate(zip(tile.tank_ids, tile.visible)):
            seen.add(i)
            assert fraction >= 0.5
            whole = airbus.disc_patch(boxes[i].tolist(), 200, 300)
            scene_mask = torch.zeros(200, 300, dtype=torch.uint8)
            ph, pw = whole.mask.shape
            scene_mask[whole.y0:whole.y0 + ph, whole.x0:whole.x0 + pw] = whole.mask
            # the instance is exactly the part of the tank's disc inside this tile
            assert torch.equal(tile.target["masks"][k], scene_mask[tile.y0:tile.y0 + h, tile.x0:tile.x0 + w])
            assert abs(fraction - tile.target["masks"][k].sum().item() / whole.area) < 1e-6
            x1, y1, x2, y2 = tile.target["boxes"][k].tolist()
            bx1, by1, bx2, by2 = boxes[i].tolist()
            assert bx1 <= x1 + tile.x0 and x2 + tile.x0 <= bx2 and by1 <= y1 + tile.y0 and y2 + tile.y0 <= by2
    assert seen == set(range(len(boxes)))
    cut = [f for tile in tiles for f in tile.visible if f < 1]
    assert cut, "the tank on the column border must appear cut in one tile"


def test_tank_no_tile_holds_enough_of_goes_to_the_best_tile():
    image = torch.zeros(3, 100, 100)
    boxes = torch.tensor([[30., 30., 90., 90.]])  # 60 px: larger than any 50 px tile
    tiles = airbus.tile_scene(image, boxes, tile_size=50, overlap=0, min_visible=0.9)
    holding = [(tile.x0, tile.y0, tile.visible[0]) for tile in tiles if tile.tank_ids]
    assert len(holding) == 1
    best = max(tiles, key=lambda t: airbus.box_to_disc_mask(boxes[0], 100, 100)[t.y0:t.y0 + 50, t.x0:t.x0 + 50].sum())
    assert holding[0][:2] == (best.x0, best.y0) and holding[0][2] < 0.9


def test_split_is_by_scene_seeded_and_order_independent():
    ids = [f"s{i}" for i in range(20)]
    train, val = airbus.split_scenes(ids, 0.1, seed=3)
    assert len(val) == 2 and set(train) | set(val) == set(ids) and not set(train) & set(val)
    assert airbus.split_scenes(list(reversed(ids)), 0.1, seed=3) == (train, val)
    assert len({tuple(airbus.split_scenes(ids, 0.1, seed=s)[1]) for s in range(5)}) > 1
    assert airbus.split_scenes(["a", "b"], 0.1, 0)[1] != []  # at least one validation scene
    assert len(airbus.split_scenes(["a", "b"], 0.9, 0)[0]) == 1  # and at least one training scene
    assert airbus.split_scenes(["a"], 0.1, 0) == (["a"], [])
    with pytest.raises(UserError, match="val_fraction"):
        airbus.split_scenes(ids, 1.0)


# ---------------------------------------------------------------------------------------------
# end to end on the fixture
# ---------------------------------------------------------------------------------------------


def test_prepared_folders_split_by_scene(layout, prepared):
    src, boxes = layout
    manifest = json.loads((prepared / "manifest.json").read_text())
    train, val = manifest["split"]["train"], manifest["split"]["val"]
    assert sorted(train + val) == sorted(boxes) and not set(train) & set(val) and len(val) == 1
    for split, scene_ids in (("train", train), ("val", val)):
        coco = json.loads((prepared / split / "annotations.json").read_text())
        assert {im["scene_id"] for im in coco["images"]} == set(scene_ids)
        assert manifest["counts"][split]["tiles"] == len(coco["images"])
        assert manifest["counts"][split]["instances"] == len(coco["annotations"])
        assert {a["scene_id"] for a in coco["annotations"]} <= set(scene_ids)
    assert manifest["options"]["tile_size"] == TILE and manifest["options"]["seed"] == 0
    assert manifest["source"] == str(src.resolve())
    assert manifest["counts"]["tanks"] == sum(len(b) for b in boxes.values())


def test_every_tile_is_a_crop_of_its_scene_and_tiles_cover_it(layout, prepared):
    src, boxes = layout
    for split in ("train", "val"):
        coco = json.loads((prepared / split / "annotations.json").read_text())
        by_scene: dict[str, list] = {}
        for im in coco["images"]:
            by_scene.setdefault(im["scene_id"], []).append(im)
        for scene_id, images in by_scene.items():
            scene = np.asarray(Image.open(src / "images" / f"{scene_id}.jpg").convert("RGB"))
            covered = np.zeros(scene.shape[:2], dtype=bool)
            for im in images:
                x, y, w, h = im["tile_x"], im["tile_y"], im["width"], im["height"]
                assert (w, h) == (TILE, TILE)
                tile = np.asarray(Image.open(tile_file(prepared / split, im["file_name"])).convert("RGB"))
                np.testing.assert_array_equal(tile, scene[y:y + h, x:x + w])  # lossless, real background
                covered[y:y + h, x:x + w] = True
            assert covered.all()  # keep_empty=1.0 keeps every tile


def test_every_tank_is_annotated_inside_its_box(layout, prepared):
    src, boxes = layout
    rows = read_rows(src)
    line_of = {}  # csv line -> (scene_id, box)
    for line, row in enumerate(rows[1:], start=2):
        line_of[line] = (row[0], airbus.parse_bounds(row[1]))
    seen, cut = set(), 0
    for split in ("train", "val"):
        coco = json.loads((prepared / split / "annotations.json").read_text())
        images = {im["id"]: im for im in coco["images"]}
        for ann in coco["annotations"]:
            im = images[ann["image_id"]]
            scene_id, (x1, y1, x2, y2) = line_of[ann["csv_line"]]
            assert scene_id == ann["scene_id"] == im["scene_id"]
            seen.add(ann["csv_line"])
            cut += ann["visible_fraction"] < 1
            mask = decode(ann["segmentation"], im["height"], im["width"])
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0 and ann["category_id"] == 1
            # the mask lies inside the annotated box (tile -> scene coordinates)
            assert x1 <= xs.min() + im["tile_x"] and xs.max() + 1 + im["tile_x"] <= x2
            assert y1 <= ys.min() + im["tile_y"] and ys.max() + 1 + im["tile_y"] <= y2
            # and fills it the way a disc fills its square (pi/4 of the visible box), give or take
            visible_box = (xs.max() + 1 - xs.min()) * (ys.max() + 1 - ys.min())
            assert 0.5 < mask.sum() / visible_box <= 1
    assert seen == set(line_of)  # every tank appears in some tile
    assert cut >= 3  # each scene has a tank cut by a tile border (x = 470) and one by the scene border


def test_mask_pngs_are_white_on_black_unions(prepared):
    for split in ("train", "val"):
        coco = json.loads((prepared / split / "annotations.json").read_text())
        anns: dict[int, list] = {}
        for ann in coco["annotations"]:
            anns.setdefault(ann["image_id"], []).append(ann)
        pngs = sorted((prepared / split / "masks").glob("*.png"))
        assert len(pngs) == len(coco["images"])
        for im in coco["images"]:
            png = Image.open(prepared / split / "masks" / (Path(im["file_name"]).stem + ".png"))
            assert png.mode == "L" and png.size == (im["width"], im["height"])
            pixels = np.asarray(png)
            assert set(np.unique(pixels)) <= {0, 255}
            union = np.zeros((im["height"], im["width"]), dtype=bool)
            for ann in anns.get(im["id"], []):
                union |= decode(ann["segmentation"], im["height"], im["width"])
            np.testing.assert_array_equal(pixels == 255, union)
        assert any(np.asarray(Image.open(p)).max() == 255 for p in pngs)


def test_coco_dataset_loads_both_splits(prepared):
    data = pytest.importorskip("mrcnn_edu.data")
    for split in ("train", "val"):
        ds = data.CocoDataset(prepared / split)
        coco = json.loads((prepared / split / "annotations.json").read_text())
        assert len(ds) == len(coco["images"]) > 0
        n_instances = 0
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, TILE, TILE) and image.dtype == torch.float32
            assert target["masks"].shape[1:] == (TILE, TILE)
            assert set(target["labels"].tolist()) <= {1}
            n_instances += len(target["labels"])
        assert n_instances == len(coco["annotations"])
        assert ds.class_names[1] == "oil-storage-tank"


def test_preparation_is_deterministic(layout, prepared, tmp_path):
    src, _ = layout
    again = tmp_path / "again"
    airbus.prepare_airbus(src, again, tile_size=TILE, overlap=OVERLAP, seed=0, keep_empty=1.0, progress=False)
    for name in ("manifest.json", "train/annotations.json", "val/annotations.json"):
        assert (again / name).read_bytes() == (prepared / name).read_bytes(), name
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".png":
            assert (again / rel).read_bytes() == (prepared / rel).read_bytes(), rel


def test_keep_empty_and_polygons(tmp_path):
    src = fresh_layout(tmp_path, n_scenes=2)
    m0 = airbus.prepare_airbus(src, tmp_path / "none", keep_empty=0.0, mask_format="polygon", progress=False)
    m1 = airbus.prepare_airbus(src, tmp_path / "all", keep_empty=1.0, progress=False)
    for split in ("train", "val"):
        assert m0["counts"][split]["empty_tiles"] == 0
        assert m1["counts"][split]["dropped_empty_tiles"] == 0
        assert m0["counts"][split]["instances"] == m1["counts"][split]["instances"]
        assert m1["counts"][split]["tiles"] == m0["counts"][split]["tiles"] + m0["counts"][split]["dropped_empty_tiles"]
        coco = json.loads((tmp_path / "none" / split / "annotations.json").read_text())
        assert all(a["segmentation"] and isinstance(a["segmentation"], list) for a in coco["annotations"])
    assert m0["split"] == m1["split"] and len(m0["split"]["val"]) == 1


# ---------------------------------------------------------------------------------------------
# bad input: every problem named with its CSV line, and no output left behind
# ---------------------------------------------------------------------------------------------


def no_output_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def corrupt(src: Path, case: str) -> tuple[list[str], int]:
    """Break the fixture in one way; return (fragments the error must contain, line number)."""
    rows = read_rows(src)
    line = 4  # row index 3
    if case == "malformed bounds":
        rows[3][1] = "(10, 20, 30)"
        fragments = ["not of the form"]
    elif case == "non-numeric bounds":
        rows[3][1] = "(10, twenty, 30, 40)"
        fragments = ["'twenty' is not a number"]
    elif case == "x2 < x1":
        rows[3][1] = "(50, 20, 30, 40)"
        fragments = ["x2 < x1"]
    elif case == "outside image":
        rows[3][1] = "(580, 20, 620, 60)"
        fragments = ["outside", "600x500"]
    elif case == "unknown class":
        rows[3][2] = "water-tank"
        fragments = ["unknown class 'water-tank'"]
    elif case == "missing image":
        rows[3][0] = "no-such-scene"
        fragments = ["'no-such-scene' has no image file"]
    elif case == "unreadable image":
        path = src / "images" / f"{rows[3][0]}.jpg"
        path.write_bytes(path.read_bytes()[:400])  # truncated JPEG
        line = next(i for i, r in enumerate(rows[1:], start=2) if r[0] == rows[3][0])
        fragments = ["cannot read image"]
    elif case == "wrong header":
        rows[0] = ["image", "bbox", "class"]
        line = 1
        fragments = ["header", "image_id", "bounds"]
    else:
        raise AssertionError(case)
    write_rows(src, rows)
    return fragments, line


@pytest.mark.parametrize("case", ["malformed bounds", "non-numeric bounds", "x2 < x1", "outside image",
                                  "unknown class", "missing image", "unreadable image", "wrong header"])
def test_bad_input_names_the_line_and_writes_nothing(tmp_path, case):
    src = fresh_layout(tmp_path)
    fragments, line = corrupt(src, case)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        airbus.prepare_airbus(src, out, progress=False)
    message = str(err.value)
    assert f"line {line}" in message and "annotations.csv" in message, message
    for fragment in fragments:
        assert fragment in message, message
    no_output_left(out)


def test_all_problems_are_reported_at_once(tmp_path):
    src = fresh_layout(tmp_path)
    rows = read_rows(src)
    rows[2][1] = "(1, 2, 3)"
    rows[5][1] = "(9, 9, 1, 1)"
    rows[7][0] = "ghost"
    write_rows(src, rows)
    with pytest.raises(UserError, match="3 problems") as err:
        airbus.read_annotations(src / "annotations.csv", src / "images")
    for line in (3, 6, 8):
        assert f"line {line}:" in str(err.value)


def test_image_id_may_carry_the_file_extension(tmp_path):
    src = fresh_layout(tmp_path)
    rows = read_rows(src)
    rows[2][0] += ".jpg"  # one row of the first scene names the file, the others its stem
    write_rows(src, rows)
    scenes = airbus.read_annotations(src / "annotations.csv", src / "images")
    assert len(scenes) == 2 and scenes[0].scene_id == rows[1][0] and 3 in scenes[0].lines
    assert sum(len(s.boxes) for s in scenes) == len(rows) - 1


def test_zero_area_boxes_are_skipped_and_counted(tmp_path):
    src = fresh_layout(tmp_path)
    rows = read_rows(src)
    rows.append([rows[1][0], "(100, 100, 100, 120)", "oil-storage-tank"])
    write_rows(src, rows)
    scenes = airbus.read_annotations(src / "annotations.csv", src / "images")
    assert sum(len(s.boxes) for s in scenes) == len(rows) - 2
    assert [line for s in scenes for line in s.skipped_lines] == [len(rows)]


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    src = fresh_layout(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        airbus.prepare_airbus(src, out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    # a failing run with --overwrite keeps the old output too
    rows = read_rows(src)
    rows[2][1] = "(oops)"
    write_rows(src, rows)
    with pytest.raises(UserError, match="line 3"):
        airbus.prepare_airbus(src, out, overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    # fixed, --overwrite replaces it
    src2 = fresh_layout(tmp_path / "fixed")
    airbus.prepare_airbus(src2, out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "train" / "annotations.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_output_inside_the_source_is_refused(tmp_path):
    src = fresh_layout(tmp_path)
    with pytest.raises(UserError, match="outside the source"):
        airbus.prepare_airbus(src, src / "prepared", progress=False)
    with pytest.raises(UserError, match="outside the source"):
        airbus.prepare_airbus(src, tmp_path, overwrite=True, progress=False)
    assert (src / "annotations.csv").is_file()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_cli_subcommand_is_registered(capsys):
    from mrcnn_edu.cli import SUBCOMMANDS, register_prepare_airbus

    assert register_prepare_airbus in SUBCOMMANDS
    assert main(["--help"]) == 0 and "prepare-airbus" in capsys.readouterr().out
    assert main(["prepare-airbus", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--tile-size", "--overlap", "--val-fraction", "--seed", "--mask-format", "--min-visible",
                   "--keep-empty", "--overwrite"):
        assert option in help_text


def test_cli_prepares_and_prints_a_summary(tmp_path, capsys):
    src = fresh_layout(tmp_path, n_scenes=2)
    code = main(["prepare-airbus", str(src), str(tmp_path / "out"), "--tile-size", "200", "--overlap", "40",
                 "--seed", "7", "--mask-format", "polygon", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 scenes" in captured.out and "train" in captured.out and "val" in captured.out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"] == {"tile_size": 200, "overlap": 40, "val_fraction": 0.1, "seed": 7,
                                   "mask_format": "polygon", "min_visible": 0.5, "keep_empty": 0.25}
    # a second run refuses to overwrite: exit code 2 and one line
    assert main(["prepare-airbus", str(src), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mrcnn-edu: error: ") and "--overwrite" in err[0]


@pytest.mark.parametrize("args, fragment", [(["--overlap", "256"], "overlap"),
                                            (["--min-visible", "0"], "min_visible"),
                                            (["--val-fraction", "1"], "val_fraction"),
                                            (["--tile-size", "-5"], "--tile-size")])
def test_cli_rejects_bad_options(tmp_path, capsys, args, fragment):
    src = fresh_layout(tmp_path)
    assert main(["prepare-airbus", str(src), str(tmp_path / "out"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mrcnn-edu: error: ") and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_console_script_bad_csv_is_one_line_exit_2(tmp_path):
    exe = Path(sys.executable).parent / "mrcnn-edu"
    if not exe.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    src = fresh_layout(tmp_path)
    rows = read_rows(src)
    rows[4][1] = "(1, 2, x, 4)"
    write_rows(src, rows)
    proc = subprocess.run([str(exe), "prepare-airbus", str(src), str(tmp_path / "out"), "--quiet"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrcnn-edu: error: ") and "line 5" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
