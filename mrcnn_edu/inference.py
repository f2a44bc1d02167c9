"""Inference on whole images and scenes: tiling, merging across tile borders, results files.

Taught in: ``notebooks/09_case_study_oil_tanks.ipynb`` (inference on a whole 2560 x 2560 scene);
used by ``mrcnn-edu predict``.

Shape shorthand used in this module:
    H, W      height and width of the whole image (a scene)
    T         tile size in pixels;  O  overlap between neighbouring tiles
    h, w      height and width of one tile (T, or less where the image is smaller)
    n         detections of one tile;  N  detections of the whole image
    h_i, w_i  height and width of the crop that holds the mask of detection i

A model sees images of about the size it was trained on (the small preset: 256 x 256 tiles). A
satellite scene is 2560 x 2560: shrinking it to 256 px would shrink a 20 px tank to 2 px. So
:func:`predict_image` cuts the scene into overlapping tiles at full resolution, runs the model on
batches of tiles, moves every tile's boxes and masks into scene coordinates and merges the
detections of neighbouring tiles, so that a tank cut by a tile border is reported once, with a
full-resolution mask (the rule: :func:`merge_tile_detections`).

Masks of a scene are not stored as ``UInt8[N, H, W]`` (100 tanks x 2560 x 2560 = 655 MB) but as
:class:`InstanceMasks`: each mask is the crop of the image its object covers, with the crop's
position (100 tanks of 60 px: 360 KB). ``masks.to_dense()`` gives ``UInt8[N, H, W]`` when that
is affordable, ``masks.mask(i)`` one ``UInt8[H, W]`` and ``masks.to_rle()`` COCO run-length
encodings.

The rest serves ``mrcnn-edu predict``: :func:`find_images` and :func:`iter_predictions` /
:func:`predict_paths` (unreadable images are reported by name and skipped), :func:`coco_results`
and :func:`write_results` (COCO results JSON), and :func:`draw_prediction` (overlay PNGs).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mrcnn_edu.mask_head import MASK_THRESHOLD, PASTE_PADDING, expand_boxes, expand_masks, paste_mask_in_image
from mrcnn_edu.nms import batched_nms
from mrcnn_edu.transforms import check_image_list, resize_boxes
from mrcnn_edu.utils import UserError, atomic_write_bytes, atomic_write_text

DEFAULT_OVERLAP = 64
"""Pixels shared by neighbouring tiles. Objects up to ``overlap - 2 * edge_margin`` px across
(60 px: the largest tanks) are seen whole by at least one tile (see :func:`merge_tile_detections`)."""

EDGE_MARGIN = 2
"""A detection whose box comes within this many pixels of an inner tile edge counts as *cut*."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
"""File endings :func:`find_images` picks up in a folder (a file named explicitly may have any)."""

Detector = Callable[[list[Tensor]], list[dict]]
"""A plain callable that stands in for the model: list of Float[3, h, w] -> one dict per image with
``"boxes"`` Float[n, 4], ``"labels"`` Int64[n], ``"scores"`` Float[n] and ``"masks"``
(Float[n, 1, h, w] probabilities as the model returns, UInt8/bool[n, h, w], or InstanceMasks)."""


# ----------------------------------------------------------------------------------------------
# Masks stored as crops
# ----------------------------------------------------------------------------------------------


class InstanceMasks:
    """N binary masks of one H x W image, each stored as the crop of the image that holds it.

    Args:
        crops (list of N UInt8[h_i, w_i]): 0/1 values; a crop may be empty (0 x 0) for an empty mask.
        offsets (Int64[N, 2]): ``(x0, y0)``, the image pixel of each crop's top-left corner.
        image_size ((int, int)): ``(H, W)`` of the image.

    Mask ``i`` as a full image: ``zeros(H, W)`` with ``crops[i]`` written at rows
    ``y0 .. y0 + h_i`` and columns ``x0 .. x0 + w_i`` (:meth:`mask`).
    """

    def __init__(self, crops: Sequence[Tensor], offsets: Tensor, image_size: tuple[int, int]) -> None:
        self.crops = [c.to(torch.uint8) for c in crops]
        self.offsets = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1, 2)  # (N, 2): x0, y0
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if len(self.crops) != len(self.offsets):
            raise ValueError(f"InstanceMasks: {len(self.crops)} crops but {len(self.offsets)} offsets")

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> InstanceMasks:
        """No masks."""
        return cls([], torch.zeros(0, 2, dtype=torch.int64), image_size)

    @classmethod
    def from_dense(cls, masks: Tensor, threshold: float = MASK_THRESHOLD) -> InstanceMasks:
        """From full-image masks: Float[N, 1, H, W] probabilities (``> threshold``) or 0/1 [N, H, W]."""
        if masks.dim() == 4:
            masks = masks[:, 0]  # (N, 1, H, W) -> (N, H, W)
        if masks.dim() != 3:
            raise ValueError(f"masks: expected [N, 1, H, W] or [N, H, W], got shape {tuple(masks.shape)}")
        binary = masks > threshold if masks.is_floating_point() else masks != 0
        crops, offsets = [], []
        for mask in binary.cpu():
            crop, x0, y0 = _tight_crop(mask, 0, 0)
            crops.append(crop)
            offsets.append((x0, y0))
        return cls(crops, torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2), tuple(masks.shape[-2:]))

    @classmethod
    def from_box_probabilities(cls, masks: Tensor, boxes: Tensor, image_size: tuple[int, int],
                               threshold: float = MASK_THRESHOLD) -> InstanceMasks:
        """Paste the mask head's M x M probabilities into their boxes, keeping only the boxes' pixels.

        Args:
            masks (Tensor[N, 1, M, M]): probabilities (the RoI heads' eval output).
            boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` in the image's pixels.
            image_size ((int, int)): ``(H, W)``.

        Gives exactly ``paste_masks_in_image(masks, boxes, image_size) > threshold`` (what the
        model returns, thresholded), without ever allocating a full H x W map per detection: the
        pasted values are computed only inside each grown, whole-pixel box, where
        ``paste_masks_in_image`` puts them (everything else is 0 there too).
        """
        height, width = image_size
        padded, scale = expand_masks(masks, PASTE_PADDING)
        int_boxes = expand_boxes(boxes, scale).to(torch.int64)  # (N, 4), x2/y2 inclusive pixels
        crops, offsets = [], []
        for mask, (x1, y1, x2, y2) in zip(padded, int_boxes.tolist()):
            top, bottom, left, right = max(y1, 0), min(y2 + 1, height), max(x1, 0), min(x2 + 1, width)
            if bottom <= top or right <= left:
                crops.append(torch.zeros(0, 0, dtype=torch.uint8))
                offsets.append((0, 0))
                continue
            # the same resize as the full paste, into an image that is just the region of the box
            local_box = torch.tensor([x1 - left, y1 - top, x2 - left, y2 - top])
            region = paste_mask_in_image(mask[0], local_box, (bottom - top, right - left))
            crop, x0, y0 = _tight_crop((region > threshold).cpu(), left, top)
            crops.append(crop)
            offsets.append((x0, y0))
        return cls(crops, torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2), image_size)

    @classmethod
    def cat(cls, parts: Sequence[InstanceMasks], image_size: tuple[int, int]) -> InstanceMasks:
        """All masks of ``parts`` (same image) in order."""
        crops = [c for part in parts for c in part.crops]
        offsets = torch.cat([part.offsets for part in parts]) if parts else torch.zeros(0, 2, dtype=torch.int64)
        return cls(crops, offsets, image_size)

    # -- views ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.crops)

    def __repr__(self) -> str:
        return (f"InstanceMasks({len(self)} masks of {self.image_size[0]}x{self.image_size[1]}, "
                f"{self.nbytes() / 1e3:.1f} KB)")

    def nbytes(self) -> int:
        """Bytes held by the crops (``N * H * W`` for the dense equivalent)."""
        return sum(c.numel() for c in self.crops)

    def select(self, index: Sequence[int] | Tensor) -> InstanceMasks:
        """The masks at ``index`` (a list or an int64 tensor), in that order."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        return InstanceMasks([self.crops[i] for i in index.tolist()], self.offsets[index], self.image_size)

    def shifted(self, dx: int, dy: int, image_size: tuple[int, int]) -> InstanceMasks:
        """The same masks in a larger image, where this image's (0, 0) lies at pixel ``(dx, dy)``."""
        offsets = self.offsets + torch.tensor([dx, dy], dtype=torch.int64)
        return InstanceMasks(self.crops, offsets, image_size)

    def crop_boxes(self) -> Tensor:
        """Int64[N, 4]: ``(x0, y0, x1, y1)`` of every crop, exclusive ``x1, y1`` (tight boxes of the masks)."""
        sizes = torch.tensor([[c.shape[1], c.shape[0]] for c in self.crops], dtype=torch.int64).reshape(-1, 2)
        return torch.cat([self.offsets, self.offsets + sizes], dim=1)  # (N, 2) + (N, 2) -> (N, 4)

    def areas(self) -> Tensor:
        """Int64[N]: pixels in each mask."""
        return torch.tensor([int(c.sum()) for c in self.crops], dtype=torch.int64)

    def mask(self, i: int) -> Tensor:
        """Mask ``i`` as UInt8[H, W]."""
        out = torch.zeros(self.image_size, dtype=torch.uint8)
        self._write(out, i)
        return out

    def to_dense(self) -> Tensor:
        """UInt8[N, H, W] (beware: N * H * W bytes)."""
        out = torch.zeros((len(self), *self.image_size), dtype=torch.uint8)
        for i in range(len(self)):
            self._write(out[i], i)
        return out

    def to_rle(self) -> list[dict]:
        """COCO compressed RLE of every mask: ``{"size": [H, W], "counts": str}``.

        One reusable column-major H x W buffer: each crop is written into it, encoded, erased.
        """
        from pycocotools import mask as mask_utils

        buffer = np.zeros(self.image_size, dtype=np.uint8, order="F")  # pycocotools wants Fortran order
        out = []
        for crop, (x0, y0) in zip(self.crops, self.offsets.tolist()):
            h, w = crop.shape
            buffer[y0:y0 + h, x0:x0 + w] = crop.numpy()
            rle = mask_utils.encode(buffer)
            buffer[y0:y0 + h, x0:x0 + w] = 0
            out.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        return out

    def intersection(self, i: int, j: int) -> int:
        """Pixels in both mask ``i`` and mask ``j``."""
        (ax, ay), (bx, by) = self.offsets[i].tolist(), self.offsets[j].tolist()
        a, b = self.crops[i], self.crops[j]
        x0, y0 = max(ax, bx), max(ay, by)
        x1, y1 = min(ax + a.shape[1], bx + b.shape[1]), min(ay + a.shape[0], by + b.shape[0])
        if x1 <= x0 or y1 <= y0:
            return 0
        return int((a[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & b[y0 - by:y1 - by, x0 - bx:x1 - bx]).sum())

    def area_within(self, i: int, window: TileWindow) -> int:
        """Pixels of mask ``i`` inside ``window``."""
        (ax, ay), a = self.offsets[i].tolist(), self.crops[i]
        x0, y0 = max(ax, window.x0), max(ay, window.y0)
        x1, y1 = min(ax + a.shape[1], window.x1), min(ay + a.shape[0], window.y1)
        if x1 <= x0 or y1 <= y0:
            return 0
        return int(a[y0 - ay:y1 - ay, x0 - ax:x1 - ax].sum())

    def _write(self, out: Tensor, i: int) -> None:
        crop, (x0, y0) = self.crops[i], self.offsets[i].tolist()
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop


def _tight_crop(mask: Tensor, x0: int, y0: int) -> tuple[Tensor, int, int]:
    """Bool/0-1 [h, w] at image pixel (x0, y0) -> (UInt8 crop of its non-zero rows and columns, x0', y0')."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()  # (h, w) -> (h,) -> indices of non-empty rows
    if len(rows) == 0:
        return torch.zeros(0, 0, dtype=torch.uint8), 0, 0
    cols = torch.nonzero(mask.any(dim=0)).flatten()  # (h, w) -> (w,) -> indices of non-empty columns
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return mask[top:bottom, left:right].to(torch.uint8).contiguous(), x0 + left, y0 + top


# ----------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------


class TileWindow(NamedTuple):
    """One tile: image pixels ``[y0, y1) x [x0, x1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def intersect(self, other: TileWindow) -> TileWindow:
        """The pixels both windows cover (may be empty: ``x1 <= x0``)."""
        return TileWindow(max(self.x0, other.x0), max(self.y0, other.y0), min(self.x1, other.x1),
                          min(self.y1, other.y1))


def tile_origins(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start positions of the tiles along one side of ``length`` pixels.

    Tiles start every ``tile_size - overlap`` pixels; the last tile is moved back so that it ends
    exactly at the border (it then overlaps its neighbour by more than ``overlap``). A side no
    longer than one tile gets a single tile at 0 (of the side's length).

    >>> tile_origins(700, 256, 64)
    [0, 192, 384, 444]
    """
    _check_tiling(tile_size, overlap)
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((length - tile_size) / stride) + 1
    return [min(i * stride, length - tile_size) for i in range(count)]


def plan_tiles(image_size: tuple[int, int], tile_size: int, overlap: int = DEFAULT_OVERLAP) -> list[TileWindow]:
    """The tiles that cover an ``(H, W)`` image, row by row: ``tile_size`` squares (smaller where the image is)."""
    height, width = image_size
    return [TileWindow(x0, y0, x0 + min(tile_size, width), y0 + min(tile_size, height))
            for y0 in tile_origins(height, tile_size, overlap) for x0 in tile_origins(width, tile_size, overlap)]


def default_tile_size(model) -> int:
    """The tile size at which ``model`` sees the image at full resolution: its transform's ``min_size``.

    The transform scales an image so that its short side becomes ``min_size`` (unless the long
    side would exceed ``max_size``): a square tile of ``min_size`` pixels is not resized at all,
    so tanks keep the size in pixels they had in training (256 for the small preset, 800 for
    ``r50_fpn``). Larger tiles would be shrunk (a 512 px tile to 256 px for the small preset).
    """
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        raise ValueError("tile_size: cannot be inferred from a plain callable; pass tile_size")
    if getattr(transform, "fixed_size", None):
        return int(min(transform.fixed_size))
    return int(min(transform.min_size[-1], transform.max_size))


def _check_tiling(tile_size: int, overlap: int) -> None:
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size <= 0:
        raise ValueError(f"tile_size: expected a positive int, got {tile_size!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < tile_size:
        raise ValueError(f"overlap: expected an int in [0, tile_size) = [0, {tile_size}), got {overlap!r}")


# ----------------------------------------------------------------------------------------------
# Running the model (or a stand-in) on a list of images
# ----------------------------------------------------------------------------------------------


def detect_with_crops(model: nn.Module, images: list[Tensor]) -> list[dict]:
    """The model's eval forward, with masks pasted into their boxes only (:class:`InstanceMasks`).

    ``model(images)`` pastes every detection's mask into a full-size map (100 detections of a
    256 px tile: 26 MB; of an 800 px tile: 256 MB); here each mask only fills its box. Boxes,
    labels and scores are the model's; ``masks.to_dense()`` equals ``model(images)[i]["masks"][:, 0] > 0.5``.
    """
    batch = model.transform(images)
    features = model.backbone(batch.images)
    proposals, _ = model.rpn(batch.images, batch.image_sizes, features)
    detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
    results = []
    for detection, size, original_size in zip(detections, batch.image_sizes, batch.original_sizes):
        if "masks" not in detection:
            raise ValueError("predict_image: the model has no mask branch (config roi_heads.mask=False)")
        boxes = resize_boxes(detection["boxes"], size, original_size)
        results.append({"boxes": boxes.cpu(), "labels": detection["labels"].cpu(), "scores": detection["scores"].cpu(),
                        "masks": InstanceMasks.from_box_probabilities(detection["masks"], boxes, original_size)})
    return results


def _run_detector(model_or_fn, images: list[Tensor]) -> list[dict]:
    """Detections per image, with :class:`InstanceMasks` masks, on the CPU."""
    if isinstance(model_or_fn, nn.Module) and hasattr(model_or_fn, "roi_heads"):
        return detect_with_crops(model_or_fn, images)
    outputs = model_or_fn(images)
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(images):
        raise ValueError(f"the detector returned {type(outputs).__name__} for {len(images)} images; expected "
                         f"a list of {len(images)} dicts")
    results = []
    for output, image in zip(outputs, images):
        masks = output["masks"]
        if not isinstance(masks, InstanceMasks):
            masks = InstanceMasks.from_dense(masks) if len(masks) else InstanceMasks.empty(tuple(image.shape[-2:]))
        results.append({"boxes": output["boxes"].detach().float().cpu().reshape(-1, 4),
                        "labels": output["labels"].cpu().to(torch.int64), "scores": output["scores"].detach().cpu(),
                        "masks": masks})
    return results


@contextlib.contextmanager
def _inference_mode(model_or_fn, score_threshold: float) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` for a ``with`` block, the module's mode restored afterwards.

    The RoI heads' own ``score_thresh`` is raised to ``score_threshold`` meanwhile, so that the
    mask head only runs on detections that will be kept (the same detections come out: a box
    below the threshold can only suppress boxes scoring even lower in NMS).
    """
    module = model_or_fn if isinstance(model_or_fn, nn.Module) else None
    was_training = module.training if module is not None else False
    heads = getattr(module, "roi_heads", None)
    own_threshold = getattr(heads, "score_thresh", None)
    if module is not None:
        module.eval()
    if own_threshold is not None:
        heads.score_thresh = max(own_threshold, score_threshold)
    try:
        with torch.no_grad():
            yield
    finally:
        if own_threshold is not None:
            heads.score_thresh = own_threshold
        if module is not None:
            module.train(was_training)


def _model_device(model_or_fn) -> torch.device | None:
    if isinstance(model_or_fn, nn.Module):
        for parameter in model_or_fn.parameters():
            return parameter.device
    return None


def _select(detections: dict, index: Tensor) -> dict:
    return {"boxes": detections["boxes"][index], "labels": detections["labels"][index],
            "scores": detections["scores"][index], "masks": detections["masks"].select(index)}


def _empty(image_size: tuple[int, int]) -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
            "masks": InstanceMasks.empty(image_size)}


# ----------------------------------------------------------------------------------------------
# Predicting one image, tiled when needed
# ----------------------------------------------------------------------------------------------


def predict_image(model, image: Tensor, tile_size: int | None = None, overlap: int = DEFAULT_OVERLAP,
                  score_threshold: float = 0.05, nms_threshold: float = 0.5, batch_size: int = 4,
                  progress: bool = False, edge_margin: int = EDGE_MARGIN, containment_threshold: float = 0.5,
                  stitch_iou: float = 0.5, report: dict | None = None) -> dict:
    """Detections on an image of any size: whole if it fits in one tile, else tile by tile, merged.

    Args:
        model: a :class:`mrcnn_edu.model.MaskRCNN` (set to eval mode here, its mode restored), or
            any callable ``list of Float[3, h, w] -> list of dicts`` in the model's eval format
            (:data:`Detector`) -- e.g. a fake detector in a test.
        image (Tensor[3, H, W]): float RGB in ``[0, 1]``, any size.
        tile_size (int): tile side in pixels; default :func:`default_tile_size` (the model's
            ``min_size``: no resizing inside the model). An image no larger than one tile
            (``H <= T`` and ``W <= T``) is run whole.
        overlap (int): pixels shared by neighbouring tiles; make it larger than the largest
            object plus ``2 * edge_margin``.
        score_threshold (float): only detections scoring more than this are kept (the model's
            rule for its own ``score_thresh``; applied in every tile, before merging).
        nms_threshold (float): box IoU above which one of two detections of the same class from
            overlapping tiles is dropped.
        batch_size (int): tiles per forward pass.
        progress (bool): a tqdm bar over the tiles (only when there are several).
        edge_margin, containment_threshold, stitch_iou: the merge rule's settings
            (:func:`merge_tile_detections`).
        report (dict, optional): filled with the tile count and the merge step counts.

    Returns:
        dict: ``"boxes"`` Float[N, 4] ``(x1, y1, x2, y2)`` in image pixels, ``"labels"`` Int64[N],
        ``"scores"`` Float[N] (highest first), ``"masks"`` :class:`InstanceMasks` (binary masks
        at full resolution, stored as crops). For an image run whole, exactly the model's output
        (above ``score_threshold``) with its masks thresholded at 0.5.
    """
    check_image_list([image])
    image_size = (int(image.shape[-2]), int(image.shape[-1]))
    tile_size = default_tile_size(model) if tile_size is None else tile_size
    windows = plan_tiles(image_size, tile_size, overlap)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    device = _model_device(model)
    if device is not None:
        image = image.to(device)
    if report is not None:
        report["tiles"] = len(windows)

    with _inference_mode(model, score_threshold):
        if len(windows) == 1:
            (detections,) = _run_detector(model, [image])
            return _select(detections, torch.nonzero(detections["scores"] > score_threshold).flatten())
        per_tile = []
        bar = _progress(total=len(windows), desc="tiles", unit="tile", leave=False) if progress else None
        for start in range(0, len(windows), batch_size):
            batch_windows = windows[start:start + batch_size]
            tiles = [image[:, w.y0:w.y1, w.x0:w.x1] for w in batch_windows]  # (3, H, W) -> (3, h, w) views
            for window, detections in zip(batch_windows, _run_detector(model, tiles)):
                detections = _select(detections, torch.nonzero(detections["scores"] > score_threshold).flatten())
                per_tile.append(shift_detections(detections, window, image_size))
            if bar is not None:
                bar.update(len(batch_windows))
        if bar is not None:
            bar.close()
    return merge_tile_detections(per_tile, windows, image_size, nms_threshold=nms_threshold,
                                 edge_margin=edge_margin, containment_threshold=containment_threshold,
                                 stitch_iou=stitch_iou, report=report)


def shift_detections(detections: dict, window: TileWindow, image_size: tuple[int, int]) -> dict:
    """A tile's detections in the coordinates of the whole ``(H, W)`` image (boxes and masks moved)."""
    shift = torch.tensor([window.x0, window.y0, window.x0, window.y0], dtype=detections["boxes"].dtype)
    return {"boxes": detections["boxes"] + shift, "labels": detections["labels"], "scores": detections["scores"],
            "masks": detections["masks"].shifted(window.x0, window.y0, image_size)}


# ----------------------------------------------------------------------------------------------
# Merging the tiles' detections
# ----------------------------------------------------------------------------------------------


def merge_tile_detections(tile_detections: Sequence[dict], windows: Sequence[TileWindow],
                          image_size: tuple[int, int], nms_threshold: float = 0.5, edge_margin: int = EDGE_MARGIN,
                          containment_threshold: float = 0.5, stitch_iou: float = 0.5,
                          report: dict | None = None) -> dict:
    """One set of detections for the whole image from the detections of overlapping tiles.

    Args:
        tile_detections (list of dicts): per tile, in image coordinates (:func:`shift_detections`):
            ``"boxes"``, ``"labels"``, ``"scores"``, ``"masks"`` (:class:`InstanceMasks`).
        windows (list of TileWindow): the tile of each entry.
        image_size ((int, int)): ``(H, W)``.
        nms_threshold (float): box IoU for the NMS across tiles (step 3).
        edge_margin (int): pixels from an inner tile edge within which a box counts as cut (step 2).
        containment_threshold (float): share of the smaller mask inside the other above which two
            detections are one object (steps 3 and 4).
        stitch_iou (float): mask IoU, where both tiles look, above which two cut detections are
            stitched into one (step 5).
        report (dict, optional): filled with counts per step.

    Returns:
        dict like :func:`predict_image`'s, sorted by score.

    The rule. Two neighbouring tiles share a strip ``O`` pixels wide; an edge of a tile that is
    not on the image border is an *inner* edge::

            tile A |=======================|
            tile B                 |=======================|
                                   <-- O -->
            X         ( )                       whole in A only:      A reports it
            Y                  (  |  )          cut by A's inner edge: A's part is dropped, B's whole kept
            Z                    (   )          whole in A and in B:  NMS keeps one
            BIG          (      |      |      ) cut in every tile:   the parts are stitched together

    1. Every tile's detections are moved into image coordinates.
    2. A detection whose box comes within ``edge_margin`` px of an inner edge of its tile is
       **cut**: its tile saw only part of the object. The others are **whole**.
    3. Whole detections: class-wise NMS across tiles (:func:`mrcnn_edu.nms.batched_nms` at
       ``nms_threshold``) removes the second copy of an object that lies in an overlap strip and
       was seen whole by two (up to four) tiles; then, of two whole detections of one class from
       different tiles whose masks overlap by ``containment_threshold`` of the smaller one, the
       lower-scored goes (duplicates whose boxes differ more than NMS catches).
    4. A cut detection whose mask lies (by ``containment_threshold`` of its pixels) inside a kept
       whole detection of its class is a partial view of that object: dropped.
    5. Cut detections left over belong to objects no tile saw whole (wider than the overlap).
       Two of them from different tiles, same class, whose masks agree where both tiles look
       (IoU within the two tiles' intersection >= ``stitch_iou``) are one object: each group
       becomes one detection -- the union of the masks, the box around the boxes, the highest
       score. A cut detection with no partner is kept as it is.

    Why it works: an object at most ``O - 2 * edge_margin`` pixels across lies, with the margin,
    inside at least one tile (tile starts are at most ``T - O`` apart), so some tile sees it
    whole and every cut view of it is dropped in step 4 -- it is reported exactly once, with the
    mask of the tile that saw it whole. Larger objects are stitched in step 5. Within one tile
    the model's output is not changed (its own NMS already ran at the same IoU threshold, 0.5).
    Empty masks take their box's rectangle in steps 3-5.
    """
    height, width = image_size
    count = [len(d["boxes"]) for d in tile_detections]
    if not tile_detections or sum(count) == 0:
        if report is not None:
            report.update(raw=0, cut=0, whole_after_nms=0, whole_after_mask_check=0, cut_covered=0,
                          stitched_groups=0, final=0)
        return _empty(image_size)
    boxes = torch.cat([d["boxes"] for d in tile_detections])
    labels = torch.cat([d["labels"] for d in tile_detections])
    scores = torch.cat([d["scores"] for d in tile_detections])
    masks = InstanceMasks.cat([d["masks"] for d in tile_detections], image_size)
    tile_of = torch.repeat_interleave(torch.arange(len(count)), torch.tensor(count))  # (N,) tile index
    regions = _masks_or_boxes(masks, boxes)  # what steps 3-5 compare
    label_of, tile_list = labels.tolist(), tile_of.tolist()  # plain lists for the loops below

    # step 2: cut by an inner edge of its tile?
    win = torch.tensor([tuple(w) for w in windows], dtype=boxes.dtype)[tile_of]  # (N, 4): x0, y0, x1, y1
    cut = (((win[:, 0] > 0) & (boxes[:, 0] < win[:, 0] + edge_margin))
           | ((win[:, 1] > 0) & (boxes[:, 1] < win[:, 1] + edge_margin))
           | ((win[:, 2] < width) & (boxes[:, 2] > win[:, 2] - edge_margin))
           | ((win[:, 3] < height) & (boxes[:, 3] > win[:, 3] - edge_margin)))

    # step 3: whole detections, NMS across tiles, then the mask check
    whole = torch.nonzero(~cut).flatten()
    whole = whole[batched_nms(boxes[whole], scores[whole], labels[whole], nms_threshold)]  # best first
    num_after_nms = len(whole)
    kept_whole: list[int] = []
    kept_lookup: set[int] = set()
    pairs = _pairs_by_index(_intersecting_pairs(boxes[whole], boxes[whole]), whole, whole)
    areas = regions.areas().tolist()
    for j in whole.tolist():  # best first: a detection can only be removed by a better kept one
        duplicate = any(
            label_of[i] == label_of[j] and tile_list[i] != tile_list[j]
            and regions.intersection(i, j) >= containment_threshold * max(min(areas[i], areas[j]), 1)
            for i in pairs.get(j, ()) if i in kept_lookup)
        if not duplicate:
            kept_whole.append(j)
            kept_lookup.add(j)
    kept_whole_t = torch.tensor(kept_whole, dtype=torch.int64)

    # step 4: cut detections inside a kept whole one
    cut_idx = torch.nonzero(cut).flatten()
    inside = _pairs_by_index(_intersecting_pairs(boxes[cut_idx], boxes[kept_whole_t]), cut_idx, kept_whole_t)
    leftover = [c for c in cut_idx.tolist()
                if not any(label_of[w] == label_of[c]
                           and regions.intersection(c, w) >= containment_threshold * max(areas[c], 1)
                           for w in inside.get(c, ()))]

    # step 5: stitch the leftover cut detections that agree where both tiles look
    leftover_t = torch.tensor(leftover, dtype=torch.int64)
    parent = {c: c for c in leftover}

    def root(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    partners = _pairs_by_index(_intersecting_pairs(boxes[leftover_t], boxes[leftover_t]), leftover_t, leftover_t)
    for a in leftover:
        for b in partners.get(a, ()):
            if b <= a or label_of[a] != label_of[b] or tile_list[a] == tile_list[b]:
                continue
            shared = windows[tile_list[a]].intersect(windows[tile_list[b]])
            inter = regions.intersection(a, b)
            union = regions.area_within(a, shared) + regions.area_within(b, shared) - inter
            if union > 0 and inter >= stitch_iou * union:
                parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for c in leftover:
        groups.setdefault(root(c), []).append(c)

    # assemble: kept whole + lone cut detections as they are, stitched groups as new detections
    singles = kept_whole + [g[0] for g in groups.values() if len(g) == 1]
    stitched = [g for g in groups.values() if len(g) > 1]
    out_boxes = [boxes[singles]] + [torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values])[None]
                                    for g in stitched]
    out = {"boxes": torch.cat(out_boxes),
           "labels": torch.cat([labels[singles], labels[[g[0] for g in stitched]]]),
           "scores": torch.cat([scores[singles], torch.stack([scores[g].max() for g in stitched])
                                if stitched else scores.new_zeros(0)]),
           "masks": InstanceMasks.cat([masks.select(singles)] + [_union_mask(masks, g) for g in stitched], image_size)}
    order = torch.sort(out["scores"], descending=True, stable=True).indices
    out = _select(out, order)
    if report is not None:
        report.update(raw=len(boxes), cut=int(cut.sum()), whole_after_nms=num_after_nms,
                      whole_after_mask_check=len(kept_whole), cut_covered=len(cut_idx) - len(leftover),
                      stitched_groups=len(stitched), final=len(out["boxes"]))
    return out



def _masks_or_boxes(masks: InstanceMasks, boxes: Tensor) -> InstanceMasks:
    """The masks, with an empty mask replaced by its (whole-pixel) box rectangle: the regions the merge compares."""
    crops, offsets = list(masks.crops), masks.offsets.clone()
    height, width = masks.image_size
    for i, crop in enumerate(crops):
        if crop.numel() == 0 or not bool(crop.any()):
            left, top, right, bottom = boxes[i].tolist()
            x0, y0 = max(math.floor(left), 0), max(math.floor(top), 0)
            x1, y1 = min(math.ceil(right), width), min(math.ceil(bottom), height)
            crops[i] = torch.ones(max(y1 - y0, 0), max(x1 - x0, 0), dtype=torch.uint8)
            offsets[i] = torch.tensor([x0, y0])
    return InstanceMasks(crops, offsets, masks.image_size)


def _intersecting_pairs(boxes1: Tensor, boxes2: Tensor, block: int = 512) -> Tensor:
    """Int64[P, 2]: every ``(i, j)`` whose boxes ``boxes1[i]`` and ``boxes2[j]`` overlap (positive area).

    Row blocks of ``block`` boxes keep the ``(block, M)`` comparison small for thousands of boxes.
    """
    found = [torch.zeros(0, 2, dtype=torch.int64)]
    for start in range(0, len(boxes1), block):
        a = boxes1[start:start + block, None]  # (B, 4) -> (B, 1, 4), broadcast against (M, 4)
        overlap_w = torch.minimum(a[..., 2], boxes2[:, 2]) - torch.maximum(a[..., 0], boxes2[:, 0])  # (B, M)
        overlap_h = torch.minimum(a[..., 3], boxes2[:, 3]) - torch.maximum(a[..., 1], boxes2[:, 1])  # (B, M)
        pairs = torch.nonzero((overlap_w > 0) & (overlap_h > 0))  # (P_b, 2): rows within the block, columns
        pairs[:, 0] += start
        found.append(pairs)
    return torch.cat(found)


def _pairs_by_index(pairs: Tensor, index1: Tensor, index2: Tensor) -> dict[int, list[int]]:
    """Local pairs (i, j) -> ``{index1[i]: [index2[j], ...]}`` (global detection numbers)."""
    out: dict[int, list[int]] = {}
    for i, j in zip(index1[pairs[:, 0]].tolist(), index2[pairs[:, 1]].tolist()):
        out.setdefault(i, []).append(j)
    return out


def _union_mask(masks: InstanceMasks, group: Sequence[int]) -> InstanceMasks:
    """One mask, the union of the masks in ``group``."""
    parts = masks.select(list(group))
    boxes = parts.crop_boxes()  # (G, 4) x0, y0, x1, y1
    x0, y0 = boxes[:, :2].min(0).values.tolist()
    x1, y1 = boxes[:, 2:].max(0).values.tolist()
    union = torch.zeros(max(y1 - y0, 0), max(x1 - x0, 0), dtype=torch.uint8)
    for crop, (cx, cy) in zip(parts.crops, parts.offsets.tolist()):
        view = union[cy - y0:cy - y0 + crop.shape[0], cx - x0:cx - x0 + crop.shape[1]]
        view |= crop
    crop, ox, oy = _tight_crop(union, x0, y0)
    return InstanceMasks([crop], torch.tensor([[ox, oy]]), masks.image_size)


def _progress(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


# ----------------------------------------------------------------------------------------------
# Many images from files
# ----------------------------------------------------------------------------------------------


class ImageFile(NamedTuple):
    """An input image: where it is and the name it gets in the results (``file_name``)."""

    path: Path
    file_name: str


class PathPredictions(NamedTuple):
    """What :func:`predict_paths` returns."""

    predictions: dict[str, dict]
    """``file_name`` -> prediction (as :func:`predict_image` returns), in input order."""
    skipped: list[tuple[str, str]]
    """``(file_name, reason)`` of every image that could not be read."""


def find_images(inputs: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()) -> list[ImageFile]:
    """The images named by ``inputs``: files as given, folders searched (recursively) for image files.

    Args:
        inputs: files and folders. A file is taken whatever its ending; a folder contributes the
            files ending in :data:`IMAGE_SUFFIXES` (any case) below it, sorted, skipping hidden ones.
        exclude: folders inside an input folder whose files are left out (e.g. the overlay folder;
            ignored for an input folder that lies inside one of them).

    Returns:
        list of :class:`ImageFile`: ``file_name`` is the path relative to its folder (``/``
        separators), or the file's name for a file given directly.

    Raises:
        UserError: an input does not exist or a folder cannot be read; no image found; two
            inputs would get the same ``file_name``.
    """
    excluded = [Path(e).resolve() for e in exclude]
    found: list[ImageFile] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                               and not any(part.startswith(".") for part in p.relative_to(path).parts))
            except OSError as error:
                raise UserError(f"cannot read the folder {path}: {error.strerror or error}") from None
            inside = [e for e in excluded if not path.resolve().is_relative_to(e)]  # strictly below `path`
            files = [p for p in files if not any(p.resolve().is_relative_to(e) for e in inside)]
            found += [ImageFile(p, p.relative_to(path).as_posix()) for p in files]
        elif path.is_file():
            found.append(ImageFile(path, path.name))
        elif not path.exists():
            raise UserError(f"{path}: no such file or folder")
        else:
            raise UserError(f"{path}: not a file or folder")
    if not found:
        raise UserError(f"no images found in {', '.join(str(i) for i in inputs)} "
                        f"(looked for files ending in {', '.join(IMAGE_SUFFIXES)})")
    seen: dict[str, Path] = {}
    for image in found:
        if image.file_name in seen:
            raise UserError(f"two inputs would both be called {image.file_name!r} in the results: "
                            f"{seen[image.file_name]} and {image.path}; predict them separately")
        seen[image.file_name] = image.path
    return found


def iter_predictions(model, images: Sequence[ImageFile], on_error: str = "skip", progress: bool = True,
                     skipped: list | None = None, **predict_kwargs) -> Iterator[tuple[ImageFile, Tensor, dict]]:
    """Load and predict every image in turn: yields ``(image_file, image Float[3, H, W], prediction)``.

    Args:
        model: as for :func:`predict_image`.
        images: from :func:`find_images`.
        on_error: ``"skip"``: an image that cannot be read (missing, corrupt, unsupported) is
            reported by name on stderr (``warning: skipped NAME: reason``) and skipped;
            ``"raise"``: the error is raised.
        progress (bool): a tqdm bar over the images (and one over the tiles of a large image).
        skipped (list, optional): receives ``(file_name, reason)`` for every skipped image.
        **predict_kwargs: for :func:`predict_image` (``tile_size``, ``overlap``, ``score_threshold``, ...).
    """
    from mrcnn_edu.data import load_image

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error: expected 'skip' or 'raise', got {on_error!r}")
    bar = _progress(total=len(images), desc="images", unit="img", disable=not progress)
    try:
        for image_file in images:
            try:
                image = load_image(image_file.path)
            except (OSError, ValueError) as error:  # UserError is a ValueError
                if on_error == "raise":
                    raise
                reason = " ".join(str(error).split()) or type(error).__name__
                if skipped is not None:
                    skipped.append((image_file.file_name, reason))
                bar.write(f"warning: skipped {image_file.file_name}: {reason}", file=sys.stderr)
                bar.update(1)
                continue
            prediction = predict_image(model, image, progress=progress, **predict_kwargs)
            bar.update(1)
            yield image_file, image, prediction
    finally:
        bar.close()


def predict_paths(model, paths: Iterable[str | os.PathLike], on_error: str = "skip", progress: bool = True,
                  **predict_kwargs) -> PathPredictions:
    """Predict every image of ``paths`` (files and folders, :func:`find_images`).

    RGB, RGBA, grayscale, palette and 16-bit files are read by :func:`mrcnn_edu.data.load_image`;
    images that cannot be read are reported by name and skipped (``on_error="skip"``), the others
    are predicted. Returns :class:`PathPredictions` ``(predictions, skipped)``.
    """
    skipped: list[tuple[str, str]] = []
    predictions = {image_file.file_name: prediction for image_file, _, prediction
                   in iter_predictions(model, find_images(paths), on_error=on_error, progress=progress,
                                       skipped=skipped, **predict_kwargs)}
    return PathPredictions(predictions, skipped)


# ----------------------------------------------------------------------------------------------
# COCO results
# ----------------------------------------------------------------------------------------------


def coco_results(prediction: Mapping, image_id: int, file_name: str | None = None,
                 label_to_category_id: Mapping[int, int] | None = None) -> list[dict]:
    """One image's prediction as COCO result dicts.

    Args:
        prediction (dict): as :func:`predict_image` returns (``"masks"`` :class:`InstanceMasks`).
        image_id (int): the COCO image id.
        file_name (str, optional): added to every result (COCO tools ignore the extra key).
        label_to_category_id (dict, optional): model label -> COCO category id (default: the same number).

    Returns:
        list of ``{"file_name", "image_id", "category_id", "bbox": [x, y, w, h], "score",
        "segmentation": {"size": [H, W], "counts": str}}``, highest score first.
    """
    masks = prediction["masks"]
    rles = masks.to_rle() if isinstance(masks, InstanceMasks) else InstanceMasks.from_dense(masks).to_rle()
    from mrcnn_edu.evaluation import coco_result

    head = {} if file_name is None else {"file_name": file_name}
    return [{**head, **coco_result(image_id, label, box, score, label_to_category_id, rle)}
            for box, label, score, rle in zip(prediction["boxes"].double().tolist(), prediction["labels"].tolist(),
                                              prediction["scores"].tolist(), rles)]


def write_results(path: str | os.PathLike, predictions_by_file: Mapping[str, Mapping],
                  label_to_category_id: Mapping[int, int] | None = None,
                  image_ids: Mapping[str, int] | None = None) -> int:
    """Write COCO results JSON (a list of :func:`coco_results` dicts) for many images, atomically.

    Args:
        path: the ``.json`` file to write (its folder is created).
        predictions_by_file (dict): ``file_name`` -> prediction.
        label_to_category_id (dict, optional): model label -> COCO category id.
        image_ids (dict, optional): ``file_name`` -> image id (default: 1, 2, ... in order).

    Returns:
        int: the number of results written.

    ``pycocotools.coco.COCO.loadRes`` reads the file (the ``file_name`` key is extra).
    """
    results = []
    for number, (file_name, prediction) in enumerate(predictions_by_file.items(), start=1):
        image_id = number if image_ids is None else image_ids[file_name]
        results += coco_results(prediction, image_id, file_name, label_to_category_id)
    atomic_write_text(path, json.dumps(results) + "\n")
    return len(results)


# ----------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
"""matplotlib's ``tab10``, the colours ``viz.overlay_masks`` uses: detection ``i`` gets ``PALETTE[i % 10]``."""


def draw_prediction(image: Tensor, prediction: Mapping, class_names: Sequence[str] | None = None,
                    alpha: float = 0.45, line_width: int | None = None):
    """The image with every detection's mask tinted, its box drawn and ``name score`` written.

    Args:
        image (Tensor[3, H, W]): float RGB in ``[0, 1]``.
        prediction (dict): from :func:`predict_image`.
        class_names (list of str, optional): name of each label (index = label).
        alpha (float): opacity of the mask colour.
        line_width (int, optional): box outline in pixels (default: grows with the image, 1 per 640 px).

    Returns:
        PIL.Image.Image (RGB). Drawn with PIL, mask crop by mask crop: fast for 2560 px scenes
        (matplotlib's ``imshow`` of one full RGBA layer per mask is not).
    """
    from PIL import Image, ImageDraw

    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    canvas = pixels.permute(1, 2, 0).numpy().astype(np.float32)  # (3, H, W) -> (H, W, 3)
    colours = [np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) for c in PALETTE]
    masks = prediction["masks"]
    if not isinstance(masks, InstanceMasks):
        masks = InstanceMasks.from_dense(masks)
    for i, (crop, (x0, y0)) in enumerate(zip(masks.crops, masks.offsets.tolist())):
        region = canvas[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]  # a view: (h_i, w_i, 3)
        inside = crop.numpy().astype(bool)
        region[inside] = (1 - alpha) * region[inside] + alpha * colours[i % len(colours)]
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    width = line_width if line_width is not None else max(1, round(max(picture.size) / 640))
    for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(prediction["boxes"].tolist(),
                                                             prediction["labels"].tolist(),
                                                             prediction["scores"].tolist())):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colour, width=width)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        draw.text((x1 + 2, max(y1 - 11, 0)), f"{name} {score:.2f}", fill=colour)
    return picture


def save_overlay(path: str | os.PathLike, image: Tensor, prediction: Mapping,
                 class_names: Sequence[str] | None = None) -> Path:
    """:func:`draw_prediction` saved as a PNG, atomically (fast zlib level: a 2560 px scene in well under a second)."""
    buffer = io.BytesIO()
    draw_prediction(image, prediction, class_names).save(buffer, format="PNG", compress_level=1)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
