"""Taught in: ``notebooks/07_training.ipynb``: images, COCO folders, the toy shapes data set, augmentations.

Shape shorthand used in this module:
    H, W   height and width of one image
    N      instances (objects) of one image
    K      categories, background excluded (labels run 1..K; 0 is the background)
    P      points of one polygon

Everything here produces the course's data contract (``COURSE_DESIGN.md`` §2, torchvision's)::

    image   Float[3, H, W] in [0, 1], RGB
    target  {"boxes": Float[N, 4] (x1, y1, x2, y2) absolute pixels, x2/y2 exclusive edges,
             "labels": Int64[N] in 1..K, "masks": UInt8[N, H, W], "image_id": int,
             optional "attributes": list of N dicts (extra per-instance fields),
             optional "image_attributes": dict (extra per-image fields)}

* :func:`load_image` reads any common image file (RGB, RGBA, grey, palette, 16-bit, 1-bit).
* :class:`DetectionDataset` is the base of every data set: class names, COCO categories, the
  label <-> category id map, optional augmentations, and :meth:`~DetectionDataset.coco_gt` (the
  ground truth in COCO format, which the evaluation compares predictions with).
* :class:`CocoDataset` reads a COCO folder (images + ``annotations.json``, polygons or RLE) and
  checks it on load; :func:`write_coco` writes one, atomically.
* :class:`ShapesDataset` draws squares, circles and triangles on textured backgrounds, on the fly:
  the toy set on which notebook 07 trains a small Mask R-CNN on a CPU in minutes.
* Augmentations (:class:`RandomHorizontalFlip`, :class:`RandomVerticalFlip`,
  :class:`RandomRotate90`, :class:`ScaleJitter`, :class:`ColorJitter`, chained by
  :class:`Compose`) move boxes and masks with the image and draw from PyTorch's global random
  generator, so seeding it (as the training engine does) makes them reproducible.

COCO conventions used throughout: ``bbox`` is ``[x, y, width, height]``; a segmentation is either
polygons ``[[x1, y1, x2, y2, ...], ...]`` (pixel (i, j) covers ``[j, j + 1] x [i, i + 1]``) or a
run-length encoding (RLE) ``{"size": [H, W], "counts": ...}`` of the mask read column by column
(Fortran order), starting with a run of zeros; ``counts`` is a list of run lengths
("uncompressed") or a string ("compressed", :func:`_rle_string_to_counts` shows the format).
Category ids may be any integers; labels are 1..K in the order of sorted category ids.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path, PureWindowsPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mrcnn_edu.oil_tanks import masks_to_boxes
from mrcnn_edu.utils import UserError, replace_dir

BACKGROUND = "__background__"
BOX_TOLERANCE = 1.0  # px: a COCO bbox may stick out of its image by this much (rounding in tools)
MAX_REPORTED_PROBLEMS = 5  # one error message names at most this many bad entries
# Keys of COCO entries that are not "attributes" (extra fields carried through to targets).
IMAGE_KEYS = ("id", "file_name", "width", "height")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd")
# Per-instance entries of a target: augmentations index them together when instances vanish.
INSTANCE_KEYS = ("boxes", "labels", "masks", "area", "iscrowd")

SEGMENTATION_FORM = ("polygons [[x1, y1, x2, y2, x3, y3, ...], ...] (at least 3 points each) or RLE "
                     "{'size': [H, W], 'counts': [run lengths] or 'compressed string'}")


# ============================================================================================
# Images
# ============================================================================================


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as Float[3, H, W] in [0, 1], RGB.

    Converts every common mode: RGB; RGBA and LA (alpha dropped, not composited); grey ``L`` and
    1-bit ``1`` (copied to the three channels); palette ``P`` (looked up); 16-bit ``I;16`` and
    32-bit integer ``I`` with values in 0..65535 (divided by 65535); CMYK and YCbCr. Pixels are
    taken as stored: an EXIF orientation tag is not applied (COCO annotations refer to the stored
    pixels too).

    Raises:
        UserError: naming the file, if it is missing, not an image, truncated or corrupt, or
            holds float or out-of-range 32-bit values.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image file {path} does not exist" if not path.exists()
                        else f"{path} is not a file (expected an image file: PNG, JPEG, TIFF, BMP, ...)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not later
            if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
                values = np.asarray(img).astype(np.int64)  # (H, W)
                if values.size and (values.min() < 0 or values.max() > 65535):
                    raise UserError(f"{path}: 32-bit integer image with values in "
                                    f"{values.min()}..{values.max()} (expected 0..65535)")
                grey = values.astype(np.float32) / 65535.0
                array = np.repeat(grey[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
            elif img.mode == "F":
                raise UserError(f"{path}: 32-bit float images are not supported "
                                "(expected 8- or 16-bit RGB or grey values)")
            else:
                if img.mode in ("P", "PA"):
                    img = img.convert("RGBA")  # palettes may carry transparency: look up RGBA first
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {path} as an image (expected a PNG, JPEG, TIFF or BMP file): "
                        f"{e}") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def _save_image(image: Tensor, path: Path, image_format: str) -> None:
    """Write Float[3, H, W] in [0, 1] as 8-bit PNG (lossless) or JPEG (quality 95)."""
    from PIL import Image

    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    if image_format == "png":
        Image.fromarray(array).save(path, format="PNG")
    else:
        Image.fromarray(array).save(path, format="JPEG", quality=95)


# ============================================================================================
# Masks <-> COCO segmentations
# ============================================================================================


def mask_to_rle(mask: Tensor | np.ndarray) -> dict:
    """UInt8[H, W] (or bool; any non-zero pixel is foreground) -> compressed RLE ``{"size", "counts": str}``."""
    from pycocotools import mask as mask_utils

    array = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask: expected a 2-d array UInt8[H, W], got shape {array.shape}")
    rle = mask_utils.encode(np.asfortranarray(array != 0, dtype=np.uint8))  # COCO reads column by column
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation: Any, height: int, width: int) -> Tensor:
    """A COCO segmentation (polygons, or RLE with compressed or uncompressed counts) -> UInt8[H, W].

    Raises:
        UserError: saying what is malformed and what was expected (see :data:`SEGMENTATION_FORM`).
    """
    from pycocotools import mask as mask_utils

    rle = _segmentation_to_rle(segmentation, height, width)
    with warnings.catch_warnings():  # pycocotools' compiled code trips a NumPy 2 deprecation warning
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return torch.from_numpy(mask_utils.decode(rle))


def _segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Check a COCO segmentation and convert it to one pycocotools RLE (``counts`` as bytes).

    pycocotools itself checks little (an RLE whose runs add up to more than H * W pixels makes it
    write past its buffer), so everything is checked here first.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, Mapping):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) for s in size)):
            raise UserError(f"RLE 'size' must be [height, width], got {size!r}")
        if list(size) != [height, width]:
            raise UserError(f"RLE 'size' is {list(size)} but the image is [height, width] = "
                            f"[{height}, {width}]")
        if isinstance(counts, str):
            runs = _rle_string_to_counts(counts)
        elif isinstance(counts, (list, tuple)) and all(_is_int(c) for c in counts):
            runs = [int(c) for c in counts]
        else:
            raise UserError(f"RLE 'counts' must be a list of run lengths or a compressed string, got "
                            f"{_short(counts)}")
        if any(c < 0 for c in runs) or sum(runs) != height * width:
            raise UserError(f"RLE run lengths must be >= 0 and add up to height * width = "
                            f"{height * width}, they add up to {sum(runs)}")
        if isinstance(counts, str):
            return {"size": [height, width], "counts": counts.encode("ascii")}
        return mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)

    if not isinstance(segmentation, (list, tuple)) or not segmentation:
        raise UserError(f"segmentation is {_short(segmentation)} (expected {SEGMENTATION_FORM})")
    for polygon in segmentation:
        if not isinstance(polygon, (list, tuple)) or not all(_is_number(v) for v in polygon):
            raise UserError(f"a polygon must be a list of numbers [x1, y1, x2, y2, ...], got "
                            f"{_short(polygon)}")
        if len(polygon) < 6 or len(polygon) % 2:
            raise UserError(f"a polygon needs an even number of coordinates, at least 6 (3 points), got "
                            f"{len(polygon)}: {_short(polygon)}")
        if not all(math.isfinite(v) for v in polygon):
            raise UserError(f"polygon coordinates must be finite, got {_short(polygon)}")
    polygons = [[float(v) for v in polygon] for polygon in segmentation]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))  # the union of the polygons


def _rle_string_to_counts(s: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' ``rleFrString``, in Python).

    Each run length is written in groups of 5 bits, least significant first, one character
    ``chr(48 + group)`` per group; bit 0x20 says "another group follows" and, in the last group,
    bit 0x10 is the sign. From the third run on, the difference to the run two places back is
    stored (runs of zeros and of ones alternate, so that difference is small).
    """
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise UserError(f"compressed RLE string ends in the middle of a number: {_short(s)}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise UserError(f"compressed RLE string has an invalid character {s[p]!r} "
                                f"(expected characters '0'..'o')")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # negative: extend the sign
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """UInt8[H, W] -> COCO polygons along the pixel edges (marching squares at level 0.5).

    Lossy: corners are cut diagonally, and holes are filled (COCO takes the union of polygons).
    """
    import contourpy

    padded = np.pad((mask != 0).astype(np.float64), 1)  # a zero border closes every contour
    lines = contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5)
    polygons = []
    for line in lines:  # (P + 1, 2): (x, y) in padded array indices, the last point repeats the first
        points = line[:-1] - 0.5  # padded index -> image index (-1) -> COCO coordinates (+0.5)
        if len(points) >= 3:
            polygons.append([round(float(v), 2) for v in points.reshape(-1)])  # (P, 2) -> (2P,)
    return polygons


# ============================================================================================
# Data sets
# ============================================================================================


class DetectionDataset(torch.utils.data.Dataset):
    """Base of every data set: ``dataset[i] -> (image Float[3, H, W], target)``.

    Subclasses implement ``__len__`` and :meth:`load` (the item without augmentations);
    ``__getitem__`` applies ``transforms``.

    Attributes:
        categories (list[dict]): COCO categories ``{"id", "name", ...}`` sorted by id.
        class_names (tuple[str]): ``("__background__", name of label 1, ..., name of label K)``.
        label_to_category_id (dict[int, int]): label 1..K -> COCO category id.
        transforms: ``(image, target) -> (image, target)`` applied by ``__getitem__``, or None.
    """

    def __init__(self, categories: Sequence[Mapping], transforms: Callable | None = None):
        self.categories = _check_categories(categories, "categories")
        self.class_names = (BACKGROUND, *(c["name"] for c in self.categories))
        self.label_to_category_id = {label: c["id"] for label, c in enumerate(self.categories, start=1)}
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        """K + 1: the classes of the model's box predictor, background included."""
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Tensor, dict]:
        """Item ``index`` without augmentations."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def coco_gt(self) -> dict:
        """The ground truth in COCO format, every item in index order, without augmentations.

        ``{"images": [{"id", "width", "height"}], "annotations": [...], "categories": [...]}``
        with segmentations as compressed RLE (counts as str), ``area`` = mask pixel count,
        ``iscrowd`` 0 and ``bbox`` ``[x, y, w, h]``; annotation ids run 1, 2, ... (pycocotools
        treats an id of 0 as "unmatched").
        """
        images, annotations = [], []
        for index in range(len(self)):
            image, target = self.load(index)
            image_id = int(target["image_id"])
            images.append({"id": image_id, "width": image.shape[-1], "height": image.shape[-2]})
            annotations += _annotation_entries(target, image_id, len(annotations) + 1,
                                               self.label_to_category_id, "rle", f"item {index}")
        return {"images": images, "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, classes {self.class_names[1:]})"


class CocoDataset(DetectionDataset):
    """A COCO folder: images and ``annotations.json`` with polygon or RLE segmentations.

    The file is checked on load; every problem is reported with the file and the entry (image id
    and file name, annotation id), e.g. a missing image file, an annotation whose image or
    category id is unknown, a ``bbox`` outside its image (by more than 1 px), an empty or
    malformed segmentation, or a ``file_name`` that leaves the image folder (``..`` or an
    absolute path). Images without annotations are fine (empty targets).

    Items come in the order of ``images`` in the file. Targets hold the annotations with
    ``iscrowd`` 0 (crowd regions are no training objects; :meth:`coco_gt` keeps them, as COCO's
    evaluation ignores detections on them): ``boxes`` tight around the masks, ``labels``,
    ``masks``, ``image_id``, ``attributes`` (each annotation's fields beyond the standard ones)
    and ``image_attributes`` (the image entry's extra fields).

    Args:
        root: the folder.
        annotations: the annotation file, relative to ``root``.
        transforms: augmentations ``(image, target) -> (image, target)``.
        image_dir: folder the ``file_name`` values are relative to (relative to ``root``);
            default ``root`` itself. Official COCO: ``CocoDataset("coco",
            "annotations/instances_val2017.json", image_dir="val2017")``.
    """

    def __init__(self, root: str | os.PathLike, annotations: str | os.PathLike = "annotations.json",
                 transforms: Callable | None = None, image_dir: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data folder {self.root} does not exist (expected a COCO folder: images "
                            f"and {annotations})")
        self.annotations_path = self.root / annotations
        self.image_dir = self.root if image_dir is None else self.root / image_dir
        data = _read_coco_json(self.annotations_path)
        super().__init__(_check_categories(data["categories"], f"{self.annotations_path}: categories"),
                         transforms)
        self.images = _check_images(data["images"], self.image_dir, self.annotations_path)
        self.annotations = _check_annotations(data["annotations"], self.images, self.categories,
                                              self.annotations_path)
        self._annotations_per_image: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        for annotation in self.annotations:
            self._annotations_per_image[annotation["image_id"]].append(annotation)
        self._label_of_category = {c: label for label, c in self.label_to_category_id.items()}
        self._images_by_id = {image["id"]: image for image in self.images}

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        """Where item ``index``'s image file is."""
        return self.image_dir / self.images[index]["file_name"]

    def load(self, index: int) -> tuple[Tensor, dict]:
        info = self.images[range(len(self))[index]]  # range(...)[index]: negative indices, IndexError
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise UserError(f"{path} is {width}x{height} pixels but {self.annotations_path} says "
                            f"width={info['width']}, height={info['height']} (image id {info['id']})")
        objects = [a for a in self._annotations_per_image[info["id"]] if not a.get("iscrowd", 0)]
        masks = torch.stack([decode_segmentation(a["segmentation"], height, width) for a in objects]) \
            if objects else torch.zeros(0, height, width, dtype=torch.uint8)
        target = {
            "boxes": masks_to_boxes(masks),
            "labels": torch.tensor([self._label_of_category[a["category_id"]] for a in objects],
                                   dtype=torch.int64),
            "masks": masks,
            "image_id": int(info["id"]),
            "attributes": [{k: v for k, v in a.items() if k not in ANNOTATION_KEYS} for a in objects],
            "image_attributes": {k: v for k, v in info.items() if k not in IMAGE_KEYS},
        }
        return image, target

    def coco_gt(self) -> dict:
        """The file's ground truth, crowd regions included, segmentations as compressed RLE.

        ``area`` (mask pixel count) and ``bbox`` are filled in where the file has none; annotation
        ids are kept unless one is below 1 (then all are renumbered 1, 2, ...: pycocotools' matching
        takes an id of 0 for "unmatched").
        """
        from pycocotools import mask as mask_utils

        annotations = []
        renumber = any(a["id"] < 1 for a in self.annotations)
        for number, annotation in enumerate(self.annotations, start=1):
            image = self._images_by_id[annotation["image_id"]]
            rle = _segmentation_to_rle(annotation["segmentation"], image["height"], image["width"])
            entry = dict(annotation)
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            entry.setdefault("area", float(mask_utils.area(rle)))
            entry.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
            entry.setdefault("iscrowd", 0)
            if renumber:
                entry["id"] = number
            annotations.append(entry)
        return {"images": [dict(image) for image in self.images], "annotations": annotations,
                "categories": [dict(c) for c in self.categories]}

    def __repr__(self) -> str:
        return (f"CocoDataset({str(self.root)!r}, {len(self)} images, {len(self.annotations)} annotations, "
                f"classes {self.class_names[1:]})")


SHAPE_CLASSES = (BACKGROUND, "square", "circle", "triangle")


class ShapesDataset(DetectionDataset):
    """Squares, circles and triangles on textured backgrounds, drawn on the fly.

    Item ``i`` depends only on ``(seed, i)``, so a data set of a million images costs no memory
    and ``ShapesDataset(n, seed=1)`` is a validation set disjoint from ``seed=0``'s training set.
    Each image holds ``min_shapes``..``max_shapes`` shapes, fully inside the image, each with a
    random colour (independent of its class: only the silhouette tells the class) far enough from
    the background and from the shapes it overlaps. Later shapes are painted over earlier ones and
    the earlier masks lose the covered pixels; a shape is placed only where every earlier shape
    stays at least half visible (up to 20 tries, else it is left out), so occluded objects are
    never reduced to slivers.

    Args:
        n: number of images.
        size: image side ``H = W`` in pixels, or ``(H, W)``.
        seed: the data set's seed.
        transforms: augmentations ``(image, target) -> (image, target)``.
        max_shapes, min_shapes: shapes per image.
        shape_size: ``(min, max)`` side / diameter in pixels; default 12..50 px for a 128 px
            image, scaled with the image.
    """

    MIN_VISIBLE = 0.5  # fraction of an earlier shape that must stay visible under a new one
    MAX_TRIES = 20  # placements tried per shape
    MIN_COLOUR_DISTANCE = 0.35  # RGB distance of a shape's colour to the background and its neighbours

    def __init__(self, n: int, size: int | tuple[int, int] = 128, seed: int = 0,
                 transforms: Callable | None = None, max_shapes: int = 4, min_shapes: int = 1,
                 shape_size: tuple[float, float] | None = None):
        super().__init__([{"id": i, "name": name, "supercategory": "shape"}
                          for i, name in enumerate(SHAPE_CLASSES[1:], start=1)], transforms)
        height, width = (size, size) if _is_int(size) else tuple(size)
        if not (_is_int(seed) and seed >= 0):
            raise UserError(f"seed: expected an integer >= 0, got {seed!r}")
        if not (_is_int(n) and n >= 0):
            raise UserError(f"n: expected a number of images >= 0, got {n!r}")
        if not (_is_int(height) and _is_int(width) and min(height, width) >= 16):
            raise UserError(f"size: expected at least 16 x 16 pixels, got {size!r}")
        if not (_is_int(min_shapes) and _is_int(max_shapes) and 0 <= min_shapes <= max_shapes):
            raise UserError(f"shapes per image: expected 0 <= min_shapes <= max_shapes, got "
                            f"{min_shapes}, {max_shapes}")
        scale = min(height, width) / 128
        low, high = shape_size if shape_size is not None else (12 * scale, 50 * scale)
        if not 2 <= low <= high <= min(height, width) - 2:
            raise UserError(f"shape_size: expected 2 <= min <= max <= {min(height, width) - 2} "
                            f"(pixels), got ({low}, {high})")
        self.n, self.size, self.seed = int(n), (int(height), int(width)), seed
        self.min_shapes, self.max_shapes, self.shape_size = int(min_shapes), int(max_shapes), (low, high)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres, (H, W) each
        self._yy, self._xx = yy, xx

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[Tensor, dict]:
        index = range(self.n)[index]
        rng = np.random.default_rng([self.seed, index])
        height, width = self.size
        background = rng.uniform(0.2, 0.8) + rng.normal(0.0, 0.06, 3)  # a muted colour
        image = _textured_background(rng, height, width, background)  # (H, W, 3)
        masks: list[np.ndarray] = []
        labels: list[int] = []
        areas: list[int] = []
        colours: list[np.ndarray] = []
        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            for _try in range(self.MAX_TRIES):
                label = int(rng.integers(1, len(SHAPE_CLASSES)))
                side = rng.uniform(*self.shape_size)
                cx = rng.uniform(side / 2 + 1, width - side / 2 - 1)  # the whole shape inside the image
                cy = rng.uniform(side / 2 + 1, height - side / 2 - 1)
                mask = _shape_mask(SHAPE_CLASSES[label], cx, cy, side, self._xx, self._yy)
                if all((m & ~mask).sum() >= self.MIN_VISIBLE * a for m, a in zip(masks, areas)):
                    break
            else:
                continue  # no room for this shape
            neighbours = [c for m, c in zip(masks, colours) if (m & mask).any()]
            colour = _pick_colour(rng, [background, *neighbours], self.MIN_COLOUR_DISTANCE)
            image[mask] = colour
            masks = [m & ~mask for m in masks]  # the new shape hides what lies under it
            masks.append(mask)
            labels.append(label)
            areas.append(int(mask.sum()))
            colours.append(colour)
        image += 0.015 * rng.standard_normal(image.shape, dtype=np.float32)  # sensor grain
        image_t = torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
        masks_t = torch.from_numpy(np.stack(masks)).to(torch.uint8) if masks \
            else torch.zeros(0, height, width, dtype=torch.uint8)
        target = {"boxes": masks_to_boxes(masks_t), "labels": torch.tensor(labels, dtype=torch.int64),
                  "masks": masks_t, "image_id": index}
        return image_t, target

    def __repr__(self) -> str:
        return (f"ShapesDataset(n={self.n}, size={self.size}, seed={self.seed}, "
                f"{self.min_shapes}..{self.max_shapes} shapes of "
                f"{self.shape_size[0]:.0f}..{self.shape_size[1]:.0f} px)")


def _textured_background(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32: ``colour`` with soft blotches, finer mottling and faint stripes."""
    def smooth_noise(cell: int) -> Tensor:  # values in [0, 1] on a grid of cell px, bilinearly upsampled
        grid = torch.from_numpy(rng.random((1, 1, height // cell + 2, width // cell + 2), dtype=np.float32))
        up = F.interpolate(grid, scale_factor=cell, mode="bilinear", align_corners=False)
        return up[0, 0, :height, :width]  # (1, 1, h, w) -> (H, W)

    blotches = smooth_noise(max(4, min(height, width) // 4)) - 0.5
    mottling = smooth_noise(4) - 0.5
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    yy = torch.arange(height, dtype=torch.float32)[:, None]
    xx = torch.arange(width, dtype=torch.float32)[None, :]
    stripes = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period))
    shade = 0.22 * blotches + 0.08 * mottling + rng.uniform(0.0, 0.04) * stripes  # (H, W)
    return (torch.from_numpy(colour.astype(np.float32))[None, None, :] + shade[:, :, None]).numpy()


def _shape_mask(kind: str, cx: float, cy: float, side: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Bool[H, W]: pixels whose centre lies in the shape of size ``side`` centred at (cx, cy)."""
    if kind == "square":
        return (np.abs(xx - cx) <= side / 2) & (np.abs(yy - cy) <= side / 2)
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= (side / 2) ** 2
    # an equilateral triangle pointing up: its width grows linearly from the apex to the base
    height = side * math.sqrt(3) / 2
    top = cy - height / 2
    return (yy <= top + height) & (np.abs(xx - cx) <= (yy - top) / height * (side / 2))


def _pick_colour(rng: np.random.Generator, avoid: Sequence[np.ndarray], min_distance: float) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` from every colour in ``avoid`` (best of 50 tries)."""
    best, best_distance = None, -1.0
    for _ in range(50):
        colour = rng.uniform(0.0, 1.0, 3)
        distance = min(float(np.linalg.norm(colour - a)) for a in avoid)
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def collate_fn(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """For ``DataLoader``: images differ in size, so keep lists (the model's transform pads them)."""
    return [image for image, _ in batch], [target for _, target in batch]


# ============================================================================================
# Reading and checking COCO files
# ============================================================================================


def _read_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"no annotation file {path} (expected a COCO folder: images and this JSON file)")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', "
                        f"got a {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise UserError(f"{path}: missing top-level key(s) {missing} (a COCO file has 'images', "
                        f"'annotations' and 'categories')")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise UserError(f"{path}: '{key}' must be a list, got a {type(data[key]).__name__}")
    return data


def _check_categories(categories: Any, where: str) -> list[dict]:
    """Categories sorted by id; each a dict with a unique int ``id`` and a str ``name``."""
    if not isinstance(categories, (list, tuple)) or not categories:
        raise UserError(f"{where}: expected a non-empty list of {{'id': int, 'name': str}}, got "
                        f"{_short(categories)}")
    seen = set()
    for k, c in enumerate(categories):
        if not (isinstance(c, Mapping) and _is_int(c.get("id")) and isinstance(c.get("name"), str)):
            raise UserError(f"{where}[{k}]: expected {{'id': int, 'name': str}}, got {_short(c)}")
        if c["id"] in seen:
            raise UserError(f"{where}[{k}]: category id {c['id']} appears twice")
        seen.add(c["id"])
    return sorted((dict(c) for c in categories), key=lambda c: c["id"])


def _unsafe_file_name(name: str) -> str | None:
    """Why ``name`` may not be used as a path inside the data folder, or None if it may."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or Path(name).is_absolute():
        return "is an absolute path (expected a path relative to the image folder)"
    if ".." in re.split(r"[\\/]", name):
        return "contains '..' (expected a path inside the image folder)"
    return None


def _check_images(images: list, image_dir: Path, path: Path) -> list[dict]:
    problems, seen, missing = [], set(), []
    for k, image in enumerate(images):
        where = f"images[{k}]"
        if not isinstance(image, Mapping):
            problems.append(f"{where}: expected a dict, got {_short(image)}")
            continue
        if not _is_int(image.get("id")):
            problems.append(f"{where}: 'id' must be an integer, got {_short(image.get('id'))}")
            continue
        where = f"image id {image['id']}"
        name = image.get("file_name")
        if image["id"] in seen:
            problems.append(f"{where}: id appears twice in 'images'")
        seen.add(image["id"])
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: 'file_name' must be a non-empty string, got {_short(name)}")
            continue
        where = f"image id {image['id']} ({name!r})"
        for key in ("width", "height"):
            if not (_is_int(image.get(key)) and image[key] > 0):
                problems.append(f"{where}: '{key}' must be a positive integer, got {_short(image.get(key))}")
        why = _unsafe_file_name(name)
        if why:
            problems.append(f"{where}: file_name {why}")
        elif not (image_dir / name).is_file():
            missing.append(f"{where}: image file {image_dir / name} not found")
    if missing:
        problems.append(missing[0] + (f" ({len(missing)} image files missing)" if len(missing) > 1 else ""))
    _raise_problems(path, problems)
    return [dict(image) for image in images]


def _check_annotations(annotations: list, images: list[dict], categories: list[dict], path: Path) -> list[dict]:
    from pycocotools import mask as mask_utils

    images_by_id = {image["id"]: image for image in images}
    category_ids = {c["id"] for c in categories}
    problems, seen = [], set()
    for k, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping):
            problems.append(f"annotations[{k}]: expected a dict, got {_short(annotation)}")
            continue
        if not _is_int(annotation.get("id")):
            problems.append(f"annotations[{k}]: 'id' must be an integer, got {_short(annotation.get('id'))}")
            continue
        where = f"annotation id {annotation['id']}"
        if annotation["id"] in seen:
            problems.append(f"{where}: id appears twice in 'annotations'")
        seen.add(annotation["id"])
        image = images_by_id.get(annotation.get("image_id"))
        if image is None:
            problems.append(f"{where}: image_id {_short(annotation.get('image_id'))} is not in 'images'")
            continue
        where += f" (image id {image['id']}, {image['file_name']!r})"
        if annotation.get("category_id") not in category_ids:
            problems.append(f"{where}: category_id {_short(annotation.get('category_id'))} is not in "
                            f"'categories' (ids {sorted(category_ids)})")
        if annotation.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{where}: 'iscrowd' must be 0 or 1, got {_short(annotation['iscrowd'])}")
        height, width = image["height"], image["width"]
        if "bbox" in annotation:
            bbox = annotation["bbox"]
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) and math.isfinite(v)
                                                                            for v in bbox)):
                problems.append(f"{where}: 'bbox' must be [x, y, width, height] (4 numbers), got {_short(bbox)}")
            elif bbox[2] < 0 or bbox[3] < 0:
                problems.append(f"{where}: bbox {bbox} has a negative width or height")
            elif bbox[0] < -BOX_TOLERANCE or bbox[1] < -BOX_TOLERANCE or bbox[0] + bbox[2] > width + BOX_TOLERANCE \
                    or bbox[1] + bbox[3] > height + BOX_TOLERANCE:
                problems.append(f"{where}: bbox [x, y, w, h] = {bbox} lies outside the image of width "
                                f"{width} and height {height} (by more than {BOX_TOLERANCE:g} px)")
        if "segmentation" not in annotation:
            problems.append(f"{where}: no 'segmentation' (expected {SEGMENTATION_FORM})")
            continue
        try:
            rle = _segmentation_to_rle(annotation["segmentation"], height, width)
        except UserError as e:
            problems.append(f"{where}: {e}")
            continue
        if int(mask_utils.area(rle)) == 0:
            problems.append(f"{where}: the segmentation is empty (covers no pixel of the image)")
    _raise_problems(path, problems)
    return [dict(annotation) for annotation in annotations]


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED_PROBLEMS} more problems)" \
            if len(problems) > MAX_REPORTED_PROBLEMS else ""
        raise UserError(f"{path}: " + "; ".join(problems[:MAX_REPORTED_PROBLEMS]) + more)


# ============================================================================================
# Writing COCO folders
# ============================================================================================


def write_coco(out_dir: str | os.PathLike, items: Iterable[tuple[Tensor, dict, str]],
               categories: Sequence[Mapping], mask_format: str = "rle", image_format: str = "png",
               info: dict | None = None, manifest: dict | None = None, overwrite: bool = False) -> Path:
    """Write a COCO folder that :class:`CocoDataset` reads back::

        out_dir/annotations.json     images, annotations, categories (and info)
        out_dir/images/<file_name>   one image per item
        out_dir/manifest.json        when ``manifest`` is given

    Atomic: everything is written into a temporary folder next to ``out_dir``, which is renamed
    to ``out_dir`` only at the end; an error (or Ctrl-C) on the way removes it and leaves any
    previous ``out_dir`` untouched.

    Args:
        out_dir: the folder to create; an existing non-empty one is replaced only if ``overwrite``.
        items: ``(image Float[3, H, W], target, file_name)``; ``target`` needs ``"masks"`` and
            ``"labels"`` (labels 1..K = ``categories`` sorted by id), may have ``"boxes"`` (else
            the masks' tight boxes), ``"image_id"`` (else 1, 2, ...), ``"attributes"`` (N dicts
            merged into the annotations) and ``"image_attributes"`` (merged into the image entry).
            ``file_name`` is relative to ``out_dir/images``; the extension is added if missing.
        categories: COCO categories ``[{"id", "name"}, ...]``.
        mask_format: ``"rle"`` (compressed, exact) or ``"polygon"`` (lossy: corners are cut
            diagonally and holes filled).
        image_format: ``"png"`` (lossless) or ``"jpg"``.
        info, manifest: JSON-serialisable dicts (``info`` goes into ``annotations.json``).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    if mask_format not in ("rle", "polygon"):
        raise UserError(f"mask_format: expected 'rle' or 'polygon', got {mask_format!r}")
    image_format = {"jpeg": "jpg"}.get(str(image_format).lower(), str(image_format).lower())
    if image_format not in ("png", "jpg"):
        raise UserError(f"image_format: expected 'png' or 'jpg', got {image_format!r}")
    categories = _check_categories(categories, "write_coco categories")
    label_to_category_id = {label: c["id"] for label, c in enumerate(categories, start=1)}
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} already exists and is not empty; pass overwrite=True to replace it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images, annotations, names = [], [], set()
        for index, (image, target, file_name) in enumerate(items):
            where = f"write_coco item {index} ({file_name!r})"
            file_name = _image_file_name(file_name, image_format, where)
            if file_name in names:
                raise UserError(f"{where}: file name {file_name!r} used twice")
            names.add(file_name)
            if not (isinstance(image, Tensor) and image.dim() == 3 and image.shape[0] == 3):
                raise UserError(f"{where}: image must be Float[3, H, W], got {_short(image)}")
            image_id = int(target.get("image_id", index + 1))
            (tmp / "images" / file_name).parent.mkdir(parents=True, exist_ok=True)
            _save_image(image, tmp / "images" / file_name, image_format)
            entry = {"id": image_id, "file_name": f"images/{file_name}",
                     "width": int(image.shape[2]), "height": int(image.shape[1])}
            _merge_attributes(entry, target.get("image_attributes") or {}, IMAGE_KEYS, where)
            images.append(entry)
            annotations += _annotation_entries(target, image_id, len(annotations) + 1, label_to_category_id,
                                               mask_format, where, image_size=tuple(image.shape[1:]))
        if len({image["id"] for image in images}) != len(images):
            raise UserError("write_coco: two items have the same target['image_id']")
        data = {**({"info": info} if info is not None else {}),
                "images": images, "annotations": annotations, "categories": categories}
        (tmp / "annotations.json").write_text(_to_json(data, "annotations.json"), encoding="utf-8")
        if manifest is not None:
            (tmp / "manifest.json").write_text(_to_json(manifest, "manifest"), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _annotation_entries(target: Mapping, image_id: int, first_id: int, label_to_category_id: Mapping[int, int],
                        mask_format: str, where: str, image_size: tuple[int, int] | None = None) -> list[dict]:
    """COCO annotation dicts for the N instances of one target; ids ``first_id``, ``first_id + 1``, ..."""
    from pycocotools import mask as mask_utils

    masks, labels = target.get("masks"), target.get("labels")
    if not (isinstance(masks, Tensor) and masks.dim() == 3 and isinstance(labels, Tensor)
            and labels.shape == masks.shape[:1]):
        raise UserError(f"{where}: target needs 'masks' UInt8[N, H, W] and 'labels' Int64[N], got "
                        f"masks {_short(masks)}, labels {_short(labels)}")
    if image_size is not None and tuple(masks.shape[1:]) != image_size:
        raise UserError(f"{where}: masks are {tuple(masks.shape[1:])} but the image is {image_size} (H, W)")
    boxes = target["boxes"] if "boxes" in target else masks_to_boxes(masks)
    if tuple(boxes.shape) != (len(masks), 4):
        raise UserError(f"{where}: boxes {_short(boxes)} do not match {len(masks)} masks (expected Float[N, 4])")
    attributes = target.get("attributes") or [{} for _ in range(len(masks))]
    if len(attributes) != len(masks):
        raise UserError(f"{where}: {len(attributes)} attributes for {len(masks)} instances")
    height, width = masks.shape[1:]
    entries = []
    for k, (mask, label, box) in enumerate(zip(masks.cpu(), labels.tolist(), boxes.tolist())):
        if label not in label_to_category_id:
            raise UserError(f"{where}: instance {k} has label {label}; expected 1..{len(label_to_category_id)}")
        mask_np = mask.numpy()
        if mask_format == "rle":
            segmentation = mask_to_rle(mask_np)
        else:
            segmentation = _mask_to_polygons(mask_np)
            if not segmentation or mask_utils.area(_segmentation_to_rle(segmentation, height, width)) == 0:
                raise UserError(f"{where}: instance {k} ({int(mask_np.sum())} pixels) is too small for "
                                "polygons; use mask_format='rle'")
        x1, y1, x2, y2 = box
        entry = {"id": first_id + k, "image_id": image_id, "category_id": label_to_category_id[label],
                 "segmentation": segmentation, "area": float((mask_np != 0).sum()),
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
        _merge_attributes(entry, attributes[k], ANNOTATION_KEYS, f"{where}, instance {k}")
        entries.append(entry)
    return entries


def _merge_attributes(entry: dict, attributes: Mapping, reserved: Sequence[str], where: str) -> None:
    clash = sorted(set(attributes) & set(reserved))
    if clash:
        raise UserError(f"{where}: attributes {clash} would overwrite COCO's own fields {list(reserved)}")
    entry.update(attributes)


def _image_file_name(file_name: Any, image_format: str, where: str) -> str:
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{where}: file_name must be a non-empty string")
    why = _unsafe_file_name(file_name)
    if why:
        raise UserError(f"{where}: file_name {why}")
    suffix = Path(file_name).suffix.lower()
    if not suffix:
        return f"{file_name}.{image_format}"
    if suffix.lstrip(".").replace("jpeg", "jpg") != image_format:
        raise UserError(f"{where}: file_name ends in {suffix!r} but image_format is {image_format!r}")
    return file_name


def _to_json(data: Any, what: str) -> str:
    def default(value):  # tensors and numpy values inside attributes, info or manifest
        if isinstance(value, (Tensor, np.ndarray, np.generic)):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    try:
        return json.dumps(data, default=default)
    except (TypeError, ValueError) as e:
        raise UserError(f"write_coco: {what} must be JSON-serialisable: {e}") from None


# ============================================================================================
# Augmentations: (image, target) -> (image, target)
# ============================================================================================


class Compose:
    """Apply augmentations one after the other."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``: x -> W - x."""

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(1).item() >= self.p:
            return image, target
        width = image.shape[-1]
        return image.flip(-1), _move_instances(
            target, lambda masks: masks.flip(-1),
            lambda b: torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1))

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomVerticalFlip:
    """Mirror top-bottom with probability ``p``: y -> H - y."""

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(1).item() >= self.p:
            return image, target
        height = image.shape[-2]
        return image.flip(-2), _move_instances(
            target, lambda masks: masks.flip(-2),
            lambda b: torch.stack([b[:, 0], height - b[:, 3], b[:, 2], height - b[:, 1]], dim=1))

    def __repr__(self) -> str:
        return f"RandomVerticalFlip(p={self.p})"


class RandomRotate90:
    """Rotate by 90 degrees counter-clockwise with probability ``p`` (an H x W image becomes W x H).

    A pixel at (x, y) moves to (y, W - 1 - x); as box edges: (x1, y1, x2, y2) -> (y1, W - x2, y2, W - x1).
    With both flips (p = 0.5 each) it draws each of the square's 8 symmetries equally often.
    """

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(1).item() >= self.p:
            return image, target
        width = image.shape[-1]
        return torch.rot90(image, 1, dims=(-2, -1)), _move_instances(
            target, lambda masks: torch.rot90(masks, 1, dims=(-2, -1)),
            lambda b: torch.stack([b[:, 1], width - b[:, 2], b[:, 3], width - b[:, 0]], dim=1))

    def __repr__(self) -> str:
        return f"RandomRotate90(p={self.p})"


class ScaleJitter:
    """Resize by a random factor in ``[min_scale, max_scale]`` (image bilinear, masks nearest).

    The model's transform resizes every image to its ``min_size`` again, which undoes a plain
    resize (only the resampling remains). ``keep_size=True`` makes the jitter count: the rescaled
    image is then cropped (when larger) or zero-padded (when smaller) back to the input size at a
    random position, so objects really change size -- "large scale jitter" (Ghiasi et al., 2021,
    without its fixed output size). Instances cropped away are dropped.
    """

    def __init__(self, min_scale: float = 0.8, max_scale: float = 1.25, keep_size: bool = False):
        if not 0 < min_scale <= max_scale:
            raise UserError(f"ScaleJitter: expected 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.min_scale, self.max_scale, self.keep_size = min_scale, max_scale, keep_size

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(1).item()
        height, width = image.shape[-2:]
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                              antialias=scale < 1)[0].clamp(0, 1)  # (3, H, W) -> (1, 3, H, W) -> (3, h, w)
        fx, fy = new_w / width, new_h / height
        target = _move_instances(target, lambda masks: _resize_masks(masks, new_h, new_w),
                                 lambda b: b * torch.tensor([fx, fy, fx, fy]))
        if not self.keep_size:
            return image, target
        # back to (height, width): crop at a random offset along a longer axis, pad along a shorter one
        (src_y, dst_y, rows), (src_x, dst_x, cols) = _crop_or_pad(new_h, height), _crop_or_pad(new_w, width)
        canvas = image.new_zeros(3, height, width)
        canvas[:, dst_y:dst_y + rows, dst_x:dst_x + cols] = image[:, src_y:src_y + rows, src_x:src_x + cols]

        def move_masks(masks: Tensor) -> Tensor:
            out = masks.new_zeros(masks.shape[0], height, width)
            out[:, dst_y:dst_y + rows, dst_x:dst_x + cols] = masks[:, src_y:src_y + rows, src_x:src_x + cols]
            return out

        def move_boxes(b: Tensor) -> Tensor:
            shifted = b + torch.tensor([dst_x - src_x, dst_y - src_y] * 2, dtype=b.dtype)
            return torch.stack([shifted[:, 0].clamp(0, width), shifted[:, 1].clamp(0, height),
                                shifted[:, 2].clamp(0, width), shifted[:, 3].clamp(0, height)], dim=1)

        return canvas, _move_instances(target, move_masks, move_boxes)

    def __repr__(self) -> str:
        return f"ScaleJitter(min_scale={self.min_scale}, max_scale={self.max_scale}, keep_size={self.keep_size})"


class ColorJitter:
    """Random brightness, contrast, saturation and hue (torchvision's ``ColorJitter``); the target is untouched."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        import torchvision

        self.jitter = torchvision.transforms.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        return self.jitter(image).clamp(0, 1), target

    def __repr__(self) -> str:
        return repr(self.jitter)


AUGMENTATIONS = {
    "hflip": lambda: [RandomHorizontalFlip(0.5)],
    "flip": lambda: [RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5)],
    "rot90": lambda: [RandomRotate90(0.5)],
    "scale": lambda: [ScaleJitter(0.75, 1.33, keep_size=True)],
    "color": lambda: [ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03)],
}
"""Named augmentations for configs and the command line (``TrainConfig.augment``): name -> factory."""


def make_augmentation(names: Sequence[str]) -> Compose | None:
    """``Compose`` of the named augmentations (in the order given), ``None`` for no names.

    ``"hflip"``: left-right flips only (for data with an "up", e.g. the shapes' triangles);
    ``"flip"``: left-right and top-bottom flips; ``"rot90"``: quarter turns (with ``flip``, all 8
    symmetries of a square -- overhead images have no "up"); ``"scale"``: objects 0.75-1.33x their
    size, image size kept; ``"color"``: brightness, contrast, saturation and a little hue.

    Raises:
        UserError: an unknown name, listing the known ones.
    """
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise UserError(f"augment: unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)}")
    return Compose([t for name in names for t in AUGMENTATIONS[name]()]) if names else None


def _move_instances(target: Mapping, move_masks: Callable[[Tensor], Tensor],
                    move_boxes: Callable[[Tensor], Tensor]) -> dict:
    """Apply a geometric change to a target's masks (or, without masks, its boxes).

    With masks, boxes are recomputed from them (tight, x2/y2 exclusive) and ``area`` is updated;
    instances whose mask (or, without masks, whose box) became empty are dropped from every
    per-instance entry (:data:`INSTANCE_KEYS` and ``attributes``).
    """
    target = dict(target)
    if "masks" in target:
        target["masks"] = move_masks(target["masks"])
        keep = target["masks"].flatten(1).bool().any(dim=1)  # (N, H, W) -> (N, H*W) -> (N,)
    elif "boxes" in target:
        target["boxes"] = move_boxes(target["boxes"])
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    else:
        return target
    for key in INSTANCE_KEYS:
        if key in target:
            target[key] = target[key][keep]
    if "attributes" in target:
        target["attributes"] = [a for a, k in zip(target["attributes"], keep.tolist()) if k]
    if "masks" in target:
        target["boxes"] = masks_to_boxes(target["masks"])
        if "area" in target:
            target["area"] = target["masks"].flatten(1).sum(dim=1).to(target["area"].dtype)  # (N, H, W) -> (N,)
    return target


def _resize_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """UInt8[N, H, W] -> UInt8[N, height, width], nearest neighbour (values stay 0/1)."""
    if masks.shape[0] == 0:
        return masks.new_zeros(0, height, width)
    resized = F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest-exact")
    return resized[:, 0].to(masks.dtype)  # (N, H, W) -> (N, 1, H, W) -> (N, 1, h, w) -> (N, h, w)


def _crop_or_pad(size: int, out_size: int) -> tuple[int, int, int]:
    """Along one axis: (source start, destination start, length) of a random crop or pad."""
    if size >= out_size:
        return int(torch.randint(0, size - out_size + 1, (1,))), 0, out_size
    return 0, int(torch.randint(0, out_size - size + 1, (1,))), size


def _check_probability(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise UserError(f"p: expected a probability in [0, 1], got {p}")
    return float(p)


# ============================================================================================
# Small helpers
# ============================================================================================


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
