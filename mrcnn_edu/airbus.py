"""Taught in: ``09_case_study_oil_tanks.ipynb`` (data preparation): the real-data path.

This module turns the Airbus "Oil Storage Detection" data set (Kaggle, CC BY-NC-SA 4.0; you
download it yourself, nothing here downloads anything) into two COCO folders that the rest of the
course trains and evaluates on. The data set's layout::

    SRC/images/<image_id>.jpg     ~100 scenes, 2560 x 2560 RGB JPEGs, ~1.2 m per pixel (SPOT)
    SRC/annotations.csv           image_id,bounds,class
                                  01864b8e-...,"(1055, 820, 1089, 853)",oil-storage-tank

There are boxes only, no masks. The steps, one function each:

1. :func:`read_annotations` reads the CSV and checks every row (bounds that do not parse, x2 < x1,
   boxes outside their image, unknown classes, missing or unreadable images) and reports *all*
   problems with their CSV line numbers in one :class:`~mrcnn_edu.utils.UserError`.
2. :func:`box_to_disc_mask` makes an instance mask from a box: the ellipse inscribed in the box
   (a disc when the box is square). Tanks are circles; the ellipse is the round shape that
   touches all four sides of the box, so the mask's tight box is the annotated box again, and a
   slightly non-square box (labelling noise, a slanted view) is followed rather than cut.
   A tank cut by the *scene* border has a truncated box; :func:`complete_border_box` first
   extends it back to a square beyond the border, so its mask is the visible part of a disc
   and not a squashed ellipse.
3. :func:`tile_scene` cuts the whole scene into tiles of ``tile_size`` pixels that overlap by
   ``overlap`` pixels (the last tile of a row or column is aligned to the scene border), keeping
   the real background around every tank. A tank belongs to a tile when at least
   ``min_visible`` of its mask lies inside the tile (a tank cut by the tile border keeps its
   visible part); a tank that no tile shows that much of goes to the tile that shows most of it,
   so every tank is annotated at least once.
4. :func:`split_scenes` splits by *scene* (seeded), so tiles of one scene never end up in both
   train and validation (the original split chips at random, leaking scenes into validation).
5. :func:`prepare_airbus` runs it all and writes ``OUT/train`` and ``OUT/val`` with
   :func:`mrcnn_edu.data.write_coco` (masks as RLE or polygons), one white-on-black mask PNG per
   tile (255 = tank, 0 = background, as the original used) in ``OUT/<split>/masks/``, and
   ``OUT/manifest.json``. Output is built in a temporary folder next to ``OUT`` and renamed at the
   end: a failure leaves no partial output and an existing ``OUT`` untouched.

Tiles without tanks carry the background a detector must learn to ignore (ponds, round fields,
roundabouts) but vastly outnumber the others in a 2560 x 2560 scene; a seeded fraction
``keep_empty`` of them (default 0.25) is kept.

:func:`write_example_layout` writes a small fake data set in exactly this layout (bright discs on
a textured background) for the tests and the notebook.

Shape shorthand:
    H, W     scene height and width in pixels
    h, w     tile (or patch) height and width
    N        boxes (tanks) in a scene
    n        instances in one tile
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrcnn_edu.utils import UserError

CSV_NAME = "annotations.csv"
IMAGES_DIR = "images"
CSV_COLUMNS = ("image_id", "bounds", "class")
TANK_CLASS = "oil-storage-tank"
CATEGORIES = [{"id": 1, "name": TANK_CLASS, "supercategory": "tank"}]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MAX_REPORTED_PROBLEMS = 20  # one error message lists at most this many problems
BORDER_TOLERANCE = 1.0  # px: a box this close to the scene border "touches" it
LICENCE = "Airbus Oil Storage Detection data set, CC BY-NC-SA 4.0 (non-commercial use only)"

_NUMBER = r"\s*([^,()\[\]]*?)\s*"
_BOUNDS = re.compile(r"^\s*[(\[]?" + ",".join([_NUMBER] * 4) + r"[)\]]?\s*$")


# ---------------------------------------------------------------------------------------------
# 1. reading and checking annotations.csv
# ---------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """One source image and its tank boxes.

    Attributes:
        scene_id (str): the image's file stem (the CSV's ``image_id``, without an extension).
        image_path (Path): the JPEG.
        height, width (int): image size in pixels.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) in scene pixels, as in the CSV.
        lines (list[int]): the CSV line of each box (line 1 is the header).
        skipped_lines (list[int]): CSV lines of zero-area boxes (x1 == x2 or y1 == y2), which
            are skipped: the real data has a few and no mask can be drawn from them.
    """

    scene_id: str
    image_path: Path
    height: int
    width: int
    boxes: torch.Tensor
    lines: list[int] = field(default_factory=list)
    skipped_lines: list[int] = field(default_factory=list)


def parse_bounds(text: str) -> tuple[float, float, float, float]:
    """``"(x1, y1, x2, y2)"`` -> four floats; ValueError saying what is wrong otherwise."""
    match = _BOUNDS.match(text or "")
    if match is None:
        raise ValueError(f"bounds {text!r} is not of the form \"(x1, y1, x2, y2)\"")
    values = []
    for part in match.groups():
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"bounds {text!r}: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"bounds {text!r}: {part!r} is not a finite number")
        values.append(value)
    return tuple(values)  # type: ignore[return-value]


def _index_images(images_dir: Path) -> dict[str, Path]:
    """Image files by name and by stem (``abc.jpg`` is found as ``abc.jpg`` and as ``abc``)."""
    index: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            index.setdefault(path.name, path)
            index.setdefault(path.stem, path)
    return index


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image, decoding it fully so that truncated files are caught now."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.height, im.width


def _problems_error(csv_path: Path, problems: list[str]) -> UserError:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return UserError(f"{csv_path}: {len(problems)} {noun}{more}, nothing was written: " + "; ".join(shown))


def read_annotations(csv_path: str | os.PathLike, images_dir: str | os.PathLike,
                     progress: bool = False) -> list[Scene]:
    """Read and check ``annotations.csv``; return one :class:`Scene` per annotated image.

    Every row is checked before anything is returned: the header must name the columns
    ``image_id``, ``bounds``, ``class`` (in any order; extra columns are ignored); ``bounds``
    must be ``"(x1, y1, x2, y2)"`` with finite numbers, ``x1 <= x2``, ``y1 <= y2`` and the box
    inside its image (``0 <= x1``, ``x2 <= W``, ...); ``class`` must be ``oil-storage-tank``;
    ``image_id`` must name a readable image in ``images_dir`` (``<image_id>.jpg``, or the exact
    file name). All problems are reported together, each with its CSV line number (line 1 is
    the header), in one UserError. Zero-area boxes are skipped (``Scene.skipped_lines``).

    Args:
        csv_path: the annotations file.
        images_dir: the folder of scene images.
        progress: show a progress bar while the images are checked.

    Returns:
        Scenes sorted by ``scene_id``; ``boxes`` (Tensor[N, 4]) in CSV order.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    if not csv_path.is_file():
        raise UserError(f"no annotations file {csv_path} (expected the Airbus layout: "
                        f"{CSV_NAME} next to an {IMAGES_DIR}/ folder)")
    if not images_dir.is_dir():
        raise UserError(f"no images folder {images_dir} (expected the Airbus layout: "
                        f"{CSV_NAME} next to an {IMAGES_DIR}/ folder)")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {csv_path}: {err}") from None

    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise UserError(f"{csv_path} is empty: expected the header {','.join(CSV_COLUMNS)}") from None
    except csv.Error as err:
        raise UserError(f"{csv_path} line 1: {err}") from None
    missing = [name for name in CSV_COLUMNS if name not in header]
    if missing:
        raise UserError(f"{csv_path} line 1: the header must name the columns {', '.join(CSV_COLUMNS)}; "
                        f"missing {', '.join(missing)} (found: {', '.join(header) or 'nothing'})")
    col = {name: header.index(name) for name in CSV_COLUMNS}

    # Pass 1: parse every row (no image access yet).
    problems: list[str] = []
    rows: list[tuple[int, str, tuple[float, float, float, float]]] = []  # (line, image_id, box)
    previous_end = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            problems.append(f"line {previous_end + 1}: {err}")
            break
        line, previous_end = previous_end + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) < len(header):
            problems.append(f"line {line}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
            continue
        image_id, bounds, klass = (row[col[name]].strip() for name in CSV_COLUMNS)
        line_problems = []
        if not image_id:
            line_problems.append("empty image_id")
        if klass != TANK_CLASS:
            line_problems.append(f"unknown class {klass!r} (expected {TANK_CLASS!r})")
        try:
            box = parse_bounds(bounds)
        except ValueError as err:
            line_problems.append(str(err))
            box = None
        if box is not None:
            x1, y1, x2, y2 = box
            if x2 < x1 or y2 < y1:
                line_problems.append(f"bounds {bounds!r} has x2 < x1 or y2 < y1 (expected (x1, y1, x2, y2))")
                box = None
        if line_problems:
            problems += [f"line {line}: {p}" for p in line_problems]
        elif box is not None:
            rows.append((line, image_id, box))
    if not rows and not problems:
        raise UserError(f"{csv_path} has a header but no annotation rows")

    # Pass 2: every referenced image must exist and be readable; boxes must lie inside it.
    index = _index_images(images_dir)
    first_line: dict[str, int] = {}
    for line, image_id, _ in rows:
        first_line.setdefault(image_id, line)
    sizes: dict[str, tuple[int, int]] = {}
    from tqdm.auto import tqdm

    for image_id in tqdm(sorted(first_line), desc="checking images", unit="image", disable=not progress):
        path = index.get(image_id)
        if path is None:
            problems.append(f"line {first_line[image_id]}: image_id {image_id!r} has no image file "
                            f"{images_dir / (image_id + '.jpg')}")
            continue
        try:
            sizes[image_id] = _image_size(path)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on bad files
            problems.append(f"line {first_line[image_id]}: cannot read image {path} ({type(err).__name__}: {err})")

    scenes: dict[str, Scene] = {}
    for line, image_id, (x1, y1, x2, y2) in rows:
        if image_id not in sizes:
            continue  # already reported once, at its first line
        height, width = sizes[image_id]
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            problems.append(f"line {line}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside its "
                            f"{width}x{height} image {image_id!r}")
            continue
        path = index[image_id]
        scene = scenes.get(path.stem)  # keyed by file stem: "abc" and "abc.jpg" name one scene
        if scene is None:
            scene = scenes[path.stem] = Scene(path.stem, path, height, width, torch.zeros(0, 4))
        if x2 == x1 or y2 == y1:
            scene.skipped_lines.append(line)
        else:
            scene.lines.append(line)
    if problems:
        raise _problems_error(csv_path, problems)

    boxes_by_line = {line: box for line, _, box in rows}
    for scene in scenes.values():
        scene.boxes = torch.tensor([boxes_by_line[line] for line in scene.lines],
                                   dtype=torch.float32).reshape(-1, 4)  # (N, 4), also when N = 0
    return [scenes[key] for key in sorted(scenes)]


# ---------------------------------------------------------------------------------------------
# 2. boxes -> disc masks
# ---------------------------------------------------------------------------------------------


def box_to_disc_mask(box, height: int, width: int, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The ellipse inscribed in ``box`` (a disc for a square box), drawn on a ``height x width`` grid.

    A pixel belongs to the mask when its centre lies inside the ellipse. The grid's pixel (0, 0)
    is pixel ``origin = (x0, y0)`` of the scene, so the same tank can be drawn on the whole scene
    (origin (0, 0)), on a tile, or on a small patch around the box, always with identical pixels.
    A box too thin to contain a pixel centre still gets the pixel under its centre.

    Args:
        box (sequence of 4 floats): (x1, y1, x2, y2) in scene pixels, x2/y2 exclusive edges.
        height, width (int): grid size.
        origin (tuple[int, int]): scene coordinates (x0, y0) of the grid's top-left pixel.

    Returns:
        UInt8[height, width] with 1 inside the ellipse, 0 outside.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x0, y0 = origin
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    ax, ay = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)  # semi-axes, at least half a pixel
    xs = torch.arange(width, dtype=torch.float64) + x0 + 0.5  # (w,) pixel centres in scene coordinates
    ys = torch.arange(height, dtype=torch.float64) + y0 + 0.5  # (h,)
    # (1, w) and (h, 1) broadcast to (h, w)
    inside = ((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2 <= 1.0
    if not inside.any():
        col, row = math.floor(cx) - x0, math.floor(cy) - y0
        if 0 <= col < width and 0 <= row < height and x1 <= cx < x2 + 1 and y1 <= cy < y2 + 1:
            inside[row, col] = True
    return inside.to(torch.uint8)


def complete_border_box(box, height: int, width: int) -> tuple[float, float, float, float]:
    """Extend a box cut by the scene border back to the square of the whole tank.

    A tank cut by the scene border is annotated by the box of its visible part, which is narrower
    along the cut axis. Tanks are round, so the whole tank is a square of side ``max(w, h)``: along
    each axis where the box is shorter than that *and* touches the border (within
    :data:`BORDER_TOLERANCE`), the box is extended outwards, beyond the border. Boxes that touch
    no border are returned unchanged. Drawing the disc of the completed box and clipping it to the
    scene gives the visible part of a disc, instead of an ellipse squashed into the cut box.

    Args:
        box (sequence of 4 floats): (x1, y1, x2, y2) in scene pixels.
        height, width (int): scene size.

    Returns:
        (x1, y1, x2, y2), possibly reaching outside the scene.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1)
    if x2 - x1 < side:
        if x1 <= BORDER_TOLERANCE:
            x1 = x2 - side
        elif x2 >= width - BORDER_TOLERANCE:
            x2 = x1 + side
    if y2 - y1 < side:
        if y1 <= BORDER_TOLERANCE:
            y1 = y2 - side
        elif y2 >= height - BORDER_TOLERANCE:
            y2 = y1 + side
    return x1, y1, x2, y2


@dataclass
class DiscPatch:
    """One tank's mask on a small patch of the scene: ``mask`` covers scene pixels
    ``x0 <= x < x0 + w`` and ``y0 <= y < y0 + h``; ``area`` is its pixel count."""

    x0: int
    y0: int
    mask: torch.Tensor  # UInt8[h, w]
    area: int


def disc_patch(box, height: int, width: int) -> DiscPatch:
    """The mask of the tank in ``box`` (border-completed, clipped to the scene) on the patch around it."""
    full = complete_border_box(box, height, width)
    x0, y0 = max(math.floor(full[0]), 0), max(math.floor(full[1]), 0)
    x1, y1 = min(math.ceil(full[2]), width), min(math.ceil(full[3]), height)
    mask = box_to_disc_mask(full, max(y1 - y0, 0), max(x1 - x0, 0), origin=(x0, y0))
    if mask.sum() == 0:  # the completed box's centre fell outside the scene: use the box as given
        mask = box_to_disc_mask(box, max(y1 - y0, 0), max(x1 - x0, 0), origin=(x0, y0))
    return DiscPatch(x0, y0, mask, int(mask.sum()))


# ---------------------------------------------------------------------------------------------
# 3. tiling a scene
# ---------------------------------------------------------------------------------------------


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``: stride ``tile_size - overlap``, the last
    tile aligned to the end. A length shorter than the tile gives one tile (of that length).

    >>> tile_starts(600, 256, 32)
    [0, 224, 344]
    """
    if not 0 <= overlap < tile_size:
        raise UserError(f"overlap must be >= 0 and smaller than the tile size {tile_size}, got {overlap}")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    return list(range(0, length - tile_size, stride)) + [length - tile_size]


def tile_grid(height: int, width: int, tile_size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles covering a ``height x width`` scene, row by row, as (x0, y0, x1, y1) with x1/y1 exclusive."""
    th, tw = min(tile_size, height), min(tile_size, width)
    return [(x, y, x + tw, y + th)
            for y in tile_starts(height, tile_size, overlap)
            for x in tile_starts(width, tile_size, overlap)]


@dataclass
class SceneTile:
    """One tile cut from a scene.

    Attributes:
        x0, y0 (int): the tile's top-left pixel in the scene.
        image (Tensor[3, h, w]): the tile (a view into the scene image).
        target (dict): ``boxes`` Float[n, 4] (tight around the visible mask, tile pixels),
            ``labels`` Int64[n] (all 1), ``masks`` UInt8[n, h, w].
        tank_ids (list[int]): index of each instance in the scene's boxes.
        visible (list[float]): fraction of each tank's mask inside this tile.
    """

    x0: int
    y0: int
    image: torch.Tensor
    target: dict
    tank_ids: list[int]
    visible: list[float]


def tile_scene(image: torch.Tensor, boxes: torch.Tensor, tile_size: int = 256, overlap: int = 32,
               min_visible: float = 0.5) -> list[SceneTile]:
    """Cut a scene into overlapping tiles with disc masks for the tanks each tile shows.

    Every tank's disc (:func:`disc_patch`) is intersected with every tile (:func:`tile_grid`).
    A tank is an instance of each tile that holds at least ``min_visible`` of its mask area; a
    tank that no tile holds that much of becomes an instance of the tile holding the largest
    part (the first such tile on a tie), so no tank is lost. The instance's mask is the part
    inside the tile. Tiles without instances are returned too (``target`` with n = 0).

    Args:
        image (Tensor[3, H, W]): the scene.
        boxes (Tensor[N, 4]): (x1, y1, x2, y2) tank boxes in scene pixels.
        tile_size (int): tile side in pixels (smaller along an axis where the scene is smaller).
        overlap (int): pixels shared by neighbouring tiles (0 <= overlap < tile_size).
        min_visible (float): in (0, 1], the fraction of a tank's mask a tile must hold.

    Returns:
        list[SceneTile], row by row.
    """
    from mrcnn_edu.oil_tanks import masks_to_boxes

    if not 0 < min_visible <= 1:
        raise UserError(f"min_visible must be in (0, 1], got {min_visible}")
    _, height, width = image.shape
    tiles = tile_grid(height, width, tile_size, overlap)
    patches = [disc_patch(box.tolist(), height, width) for box in boxes]

    # visible[t][i] = pixels of tank i inside tile t (only for tiles the patch overlaps)
    visible: list[dict[int, int]] = [{} for _ in tiles]
    for i, p in enumerate(patches):
        ph, pw = p.mask.shape
        for t, (tx0, ty0, tx1, ty1) in enumerate(tiles):
            ix0, iy0 = max(p.x0, tx0), max(p.y0, ty0)
            ix1, iy1 = min(p.x0 + pw, tx1), min(p.y0 + ph, ty1)
            if ix0 < ix1 and iy0 < iy1:
                pixels = int(p.mask[iy0 - p.y0:iy1 - p.y0, ix0 - p.x0:ix1 - p.x0].sum())
                if pixels:
                    visible[t][i] = pixels

    # which tiles each tank belongs to
    members: list[list[int]] = [[] for _ in tiles]
    for i, p in enumerate(patches):
        fractions = {t: visible[t][i] / p.area for t in range(len(tiles)) if i in visible[t]}
        if not fractions:
            continue  # an empty mask cannot happen for a box inside the scene; be safe
        chosen = [t for t, f in fractions.items() if f >= min_visible - 1e-9]
        if not chosen:
            chosen = [max(fractions, key=lambda t: (fractions[t], -t))]
        for t in chosen:
            members[t].append(i)

    out = []
    for t, (tx0, ty0, tx1, ty1) in enumerate(tiles):
        h, w = ty1 - ty0, tx1 - tx0
        masks = torch.zeros(len(members[t]), h, w, dtype=torch.uint8)
        for k, i in enumerate(members[t]):
            p = patches[i]
            ph, pw = p.mask.shape
            ix0, iy0 = max(p.x0, tx0), max(p.y0, ty0)
            ix1, iy1 = min(p.x0 + pw, tx1), min(p.y0 + ph, ty1)
            masks[k, iy0 - ty0:iy1 - ty0, ix0 - tx0:ix1 - tx0] = p.mask[iy0 - p.y0:iy1 - p.y0, ix0 - p.x0:ix1 - p.x0]
        target = {"boxes": masks_to_boxes(masks).reshape(-1, 4),  # (n, 4), also when n = 0
                  "labels": torch.ones(len(members[t]), dtype=torch.int64),
                  "masks": masks}
        out.append(SceneTile(tx0, ty0, image[:, ty0:ty1, tx0:tx1], target, list(members[t]),
                             [visible[t][i] / patches[i].area for i in members[t]]))
    return out


# ---------------------------------------------------------------------------------------------
# 4. splitting by scene
# ---------------------------------------------------------------------------------------------


def split_scenes(scene_ids, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split scene ids into (train, val), seeded and independent of the input order.

    ``round(val_fraction * n)`` scenes go to validation, but at least one when ``n >= 2`` and
    ``val_fraction > 0``, and never all of them (training keeps at least one scene).

    Args:
        scene_ids (iterable of str): the scenes.
        val_fraction (float): in [0, 1).
        seed (int): the shuffle's seed.

    Returns:
        (train_ids, val_ids), each sorted.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(set(scene_ids))
    n = len(ids)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


# ---------------------------------------------------------------------------------------------
# 5. the whole preparation
# ---------------------------------------------------------------------------------------------


def _scene_rng(seed: int, scene_id: str) -> np.random.Generator:
    """A generator that depends only on the seed and the scene (not on the order scenes come in)."""
    return np.random.default_rng([seed, zlib.crc32(scene_id.encode("utf-8"))])


def _load_scene_image(path: Path) -> torch.Tensor:
    """Float[3, H, W] in [0, 1], through the package's one image loader."""
    from mrcnn_edu.data import load_image

    return load_image(path)


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    src_r, out_r = src.resolve(), out.resolve()
    if src_r == out_r or out_r in src_r.parents or src_r in out_r.parents:
        raise UserError(f"the output folder {out} must lie outside the source {src} (and not contain it)")


def _save_mask_png(path: Path, masks: torch.Tensor, height: int, width: int) -> None:
    """The union of the instance masks, white (255) on black (0), as an 8-bit PNG."""
    from PIL import Image

    union = masks.amax(dim=0) if len(masks) else torch.zeros(height, width, dtype=torch.uint8)  # (n, h, w) -> (h, w)
    Image.fromarray((union.numpy() > 0).astype(np.uint8) * 255, mode="L").save(path)


def prepare_airbus(src: str | os.PathLike, out: str | os.PathLike, *, tile_size: int = 256, overlap: int = 32,
                   val_fraction: float = 0.1, seed: int = 0, mask_format: str = "rle",
                   min_visible: float = 0.5, keep_empty: float = 0.25, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Prepare the Airbus layout in ``src`` as COCO folders ``out/train`` and ``out/val``.

    Checks everything first (:func:`read_annotations`), then tiles each scene
    (:func:`tile_scene`), keeps every tile with tanks and a seeded ``keep_empty`` fraction of the
    others, splits by scene (:func:`split_scenes`) and writes, in a temporary folder renamed to
    ``out`` at the end::

        out/manifest.json                 source, options, counts, the scenes of each split
        out/train/annotations.json        COCO (masks as RLE or polygons), per-tile attributes
        out/train/images/...              tiles with their real background
        out/train/masks/<tile>.png        all tanks of the tile, white (255) on black (0)
        out/val/...                       the same for the validation scenes

    Each image entry carries ``scene_id``, ``tile_x``, ``tile_y`` (its top-left pixel in the
    scene), ``scene_width`` and ``scene_height``; each annotation ``scene_id``, ``csv_line`` and
    ``visible_fraction``. Images without CSV rows are not used (the data set's ``extras``-style
    unlabelled images); zero-area boxes are skipped. Both are counted in the manifest.

    Args:
        src: folder with ``annotations.csv`` and ``images/``.
        out: output folder; must not exist (or be empty) unless ``overwrite``.
        tile_size (int): tile side in pixels.
        overlap (int): pixels shared by neighbouring tiles.
        val_fraction (float): fraction of scenes for validation, in [0, 1).
        seed (int): seeds the split and the choice of empty tiles.
        mask_format (str): ``"rle"`` or ``"polygon"`` segmentations in the COCO files.
        min_visible (float): fraction of a tank's mask a tile must hold to annotate it.
        keep_empty (float): fraction of tiles without tanks to keep, in [0, 1].
        overwrite (bool): replace an existing ``out``.
        progress (bool): show progress bars.

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    import mrcnn_edu
    from mrcnn_edu.data import write_coco
    from mrcnn_edu.utils import replace_dir  # the same atomic rename as write_coco's
    from tqdm.auto import tqdm

    src, out = Path(src), Path(out)
    if tile_size < 1:
        raise UserError(f"tile size must be a positive number of pixels, got {tile_size}")
    tile_starts(tile_size + 1, tile_size, overlap)  # checks 0 <= overlap < tile_size
    if not 0 < min_visible <= 1:
        raise UserError(f"min_visible must be in (0, 1], got {min_visible}")
    if not 0 <= keep_empty <= 1:
        raise UserError(f"keep_empty must be in [0, 1], got {keep_empty}")
    if mask_format not in ("rle", "polygon"):
        raise UserError(f"mask format must be 'rle' or 'polygon', got {mask_format!r}")
    split_scenes([], val_fraction)  # checks val_fraction
    if not src.is_dir():
        raise UserError(f"no source folder {src} (expected {CSV_NAME} and {IMAGES_DIR}/ inside it)")
    _check_out(src, out, overwrite)

    scenes = read_annotations(src / CSV_NAME, src / IMAGES_DIR, progress=progress)
    if not any(len(s.boxes) for s in scenes):
        raise UserError(f"{src / CSV_NAME} has no usable boxes (all of them have zero area)")
    annotated = {s.image_path.name for s in scenes}
    unannotated = sorted(p.name for p in (src / IMAGES_DIR).iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in annotated)
    train_ids, val_ids = split_scenes([s.scene_id for s in scenes], val_fraction, seed)
    by_id = {s.scene_id: s for s in scenes}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        splits = {}
        for split, ids in (("train", train_ids), ("val", val_ids)):
            counts = {"scenes": len(ids), "tanks": 0, "tiles": 0, "empty_tiles": 0, "instances": 0,
                      "dropped_empty_tiles": 0}
            mask_dir = tmp / f"masks-{split}"
            mask_dir.mkdir()

            def items(ids=ids, counts=counts, mask_dir=mask_dir, split=split):
                for scene_id in tqdm(ids, desc=f"tiling {split}", unit="scene", disable=not progress):
                    scene = by_id[scene_id]
                    image = _load_scene_image(scene.image_path)
                    if tuple(image.shape[1:]) != (scene.height, scene.width):
                        raise UserError(f"{scene.image_path} changed while preparing (size {tuple(image.shape[1:])})")
                    tiles = tile_scene(image, scene.boxes, tile_size, overlap, min_visible)
                    empty = [k for k, tile in enumerate(tiles) if not tile.tank_ids]
                    rng = _scene_rng(seed, scene_id)
                    n_keep = round(keep_empty * len(empty))
                    keep = set(rng.choice(empty, size=n_keep, replace=False).tolist()) if n_keep else set()
                    counts["tanks"] += len(scene.boxes)
                    counts["dropped_empty_tiles"] += len(empty) - n_keep
                    for k, tile in enumerate(tiles):
                        if not tile.tank_ids and k not in keep:
                            continue
                        _, h, w = tile.image.shape
                        stem = f"{scene_id}_x{tile.x0:05d}_y{tile.y0:05d}"
                        _save_mask_png(mask_dir / f"{stem}.png", tile.target["masks"], h, w)
                        counts["tiles"] += 1
                        counts["empty_tiles"] += not tile.tank_ids
                        counts["instances"] += len(tile.tank_ids)
                        target = dict(tile.target)
                        target["image_id"] = counts["tiles"]
                        target["attributes"] = [
                            {"scene_id": scene_id, "csv_line": scene.lines[i], "visible_fraction": round(f, 4)}
                            for i, f in zip(tile.tank_ids, tile.visible)]
                        target["image_attributes"] = {"scene_id": scene_id, "tile_x": tile.x0, "tile_y": tile.y0,
                                                      "scene_width": scene.width, "scene_height": scene.height}
                        yield tile.image.contiguous(), target, f"{stem}.png"

            info = {"description": f"Airbus Oil Storage Detection, {split} split, tiles of {tile_size} px "
                                   f"(overlap {overlap}), prepared by mrcnn-edu prepare-airbus",
                    "version": mrcnn_edu.__version__, "licence": LICENCE}
            write_coco(tmp / split, items(), CATEGORIES, mask_format=mask_format, info=info)
            os.replace(mask_dir, tmp / split / "masks")
            splits[split] = counts

        manifest = {
            "source": str(src.resolve()),
            "licence": LICENCE,
            "prepared_by": f"mrcnn_edu {mrcnn_edu.__version__} prepare-airbus",
            "options": {"tile_size": tile_size, "overlap": overlap, "val_fraction": val_fraction, "seed": seed,
                        "mask_format": mask_format, "min_visible": min_visible, "keep_empty": keep_empty},
            "mask": "ellipse inscribed in each box (a disc for a square box); boxes cut by the scene "
                    "border are first completed to a square beyond the border",
            "counts": {"scenes": len(scenes), "tanks": sum(len(s.boxes) for s in scenes), **{
                split: counts for split, counts in splits.items()}},
            "skipped_zero_area_boxes": {s.scene_id: s.skipped_lines for s in scenes if s.skipped_lines},
            "unannotated_images": unannotated,
            "split": {"train": train_ids, "val": val_ids},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def format_summary(manifest: dict) -> str:
    """A few lines: scenes, tanks and tiles per split, as ``mrcnn-edu prepare-airbus`` prints them."""
    c, options = manifest["counts"], manifest["options"]
    lines = [f"{c['scenes']} scene{'s' * (c['scenes'] != 1)}, {c['tanks']} tanks; tiles of "
             f"{options['tile_size']} px with {options['overlap']} px overlap"]
    for split in ("train", "val"):
        s = c[split]
        lines.append(f"{split:<5}  {s['scenes']:>4} scenes  {s['tanks']:>6} tanks  {s['tiles']:>6} tiles "
                     f"({s['empty_tiles']} without tanks kept, {s['dropped_empty_tiles']} left out)  "
                     f"{s['instances']:>6} instances")
    if c["val"]["scenes"] == 0:
        lines.append("warning: no validation scenes (a split by scene needs at least 2 scenes and "
                     "--val-fraction > 0); val/ is empty")
    skipped = sum(len(v) for v in manifest["skipped_zero_area_boxes"].values())
    if skipped:
        lines.append(f"skipped {skipped} zero-area boxes (their CSV lines are in manifest.json)")
    if manifest["unannotated_images"]:
        lines.append(f"not used: {len(manifest['unannotated_images'])} images without annotation rows")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# a small data set in the Airbus layout (tests and the notebook)
# ---------------------------------------------------------------------------------------------


def write_example_layout(root: str | os.PathLike, n_scenes: int = 3, size: tuple[int, int] = (500, 600),
                         seed: int = 0, tanks_per_scene: int = 8) -> dict[str, list[tuple[int, int, int, int]]]:
    """Write a fake data set in the Airbus layout: ``root/images/*.jpg`` + ``root/annotations.csv``.

    Each scene (``size = (H, W)``) is a textured beige/grey ground with bright (and a few dark)
    discs that cast a small shadow. With 256-px tiles and 32 px overlap, every scene has a tank cut
    by the left scene border, one inside the overlap of the first two tile columns (x = 240) and
    one cut by the right end of the second tile column (x = 470), besides tanks at random
    non-overlapping places (scenes at least 600 px wide are assumed). Bounds are written as the real CSV
    writes them, ``"(x1, y1, x2, y2)"`` in quotes, with integer pixel coordinates.

    Returns:
        {scene_id: [(x1, y1, x2, y2), ...]}, the boxes written, per scene.
    """
    from PIL import Image

    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    written: dict[str, list[tuple[int, int, int, int]]] = {}
    rows = []
    for s in range(n_scenes):
        scene_id = f"scene{s:02d}-{rng.integers(16**6):06x}"
        # ground: smooth noise at two scales on a beige/grey base
        ground = np.zeros((height, width), dtype=np.float64)
        for cell, weight in ((64, 0.10), (8, 0.04)):
            coarse = torch.from_numpy(rng.normal(size=(1, 1, height // cell + 2, width // cell + 2)))
            smooth = torch.nn.functional.interpolate(coarse, scale_factor=cell, mode="bilinear", align_corners=False)
            ground += weight * smooth[0, 0, :height, :width].numpy()  # (1, 1, h', w') -> (H, W)
        base = np.array([0.55, 0.52, 0.45]) + rng.uniform(-0.05, 0.05, size=3)
        img = base[None, None, :] + ground[..., None] + rng.normal(0, 0.02, size=(height, width, 3))

        circles = [(4.0, height * 0.5, 18.0),  # cut by the left scene border
                   (240.0, height * 0.3, 14.0),  # whole in tile columns 0 and 1 (they overlap)
                   (470.0, height * 0.7, 16.0)]  # cut by the end of tile column 1, whole in column 2
        tries = 0
        while len(circles) < tanks_per_scene and tries < 1000:
            tries += 1
            r = float(rng.uniform(6, 22))
            cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
            if all(math.hypot(cx - a, cy - b) > r + c + 6 for a, b, c in circles):
                circles.append((cx, cy, r))
        boxes = []
        for k, (cx, cy, r) in enumerate(circles):
            # draw on the window around the tank and its shadow only
            x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
            x1, y1 = min(int(cx + 1.4 * r) + 2, width), min(int(cy + 1.4 * r) + 2, height)
            xx, yy = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)  # pixel centres, (h, w) each
            window = img[y0:y1, x0:x1]  # a view: drawing on it draws on the scene
            window[(xx - cx - 0.4 * r) ** 2 + (yy - cy - 0.4 * r) ** 2 <= r * r] *= 0.55  # shadow
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            window[disc] = [0.22, 0.2, 0.18] if k % 5 == 4 else [0.93, 0.93, 0.9]  # every fifth tank is dark
            box = (max(round(cx - r), 0), max(round(cy - r), 0), min(round(cx + r), width), min(round(cy + r), height))
            boxes.append(box)
            rows.append((scene_id, "({}, {}, {}, {})".format(*box), TANK_CLASS))
        pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="RGB").save(root / IMAGES_DIR / f"{scene_id}.jpg", quality=90)
        written[scene_id] = boxes
    with open(root / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return written
