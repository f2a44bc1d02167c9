"""RoI pooling: a fixed-size feature grid for every box (RoIPool, RoIAlign, RoIAlign over FPN levels).

Taught in: ``notebooks/04_roi_pool_and_align.ipynb``.

Shape shorthand used in this module:
    N       images in a batch (feature maps in ``input``)
    C       channels of the feature map
    H, W    height and width of the feature map (one pyramid level)
    K       boxes (RoIs, "regions of interest") over the whole batch
    Kc      the RoIs of one chunk (the vectorised ops bound their memory by chunking RoIs)
    L       boxes of one image
    h, w    output size: bins per RoI down and across (7 x 7 for the box head, 14 x 14 for masks)
    gh, gw  RoIAlign's sampling points per bin, down and across
    S       RoIAlign's sampling points over all bins of Kc RoIs
    E       RoIPool's cells over all bins of Kc RoIs

Boxes come as torchvision takes them: a ``Tensor[K, 5]`` of ``(batch_index, x1, y1, x2, y2)``
rows, or a list with one ``Tensor[L, 4]`` of ``(x1, y1, x2, y2)`` per image. Coordinates are in
image pixels; ``spatial_scale`` (1 / stride of the feature map) takes them to feature cells.

Coordinates on a feature map: cell ``(r, c)`` holds the value *at the point* ``(y, x) = (r, c)``;
between cells, RoIAlign interpolates bilinearly. A box edge at image pixel ``x1`` lands on
``x1 * spatial_scale``. Image pixel ``i`` covers ``[i, i + 1)``, its centre is ``i + 0.5``: the
legacy ``aligned=False`` ignores that half pixel; ``aligned=True`` shifts the box by ``-0.5``
cell so that a box's centre samples the right place (Detectron2's fix).

Every function equals torchvision's (values and gradients, checked in ``tests/test_roi_ops.py``):
``roi_align``, ``roi_pool``, and :class:`MultiScaleRoIAlign` with :func:`map_levels`. For each op
there is a readable reference written point by point (``roi_align_reference``,
``roi_pool_reference``) and a vectorised version used by the model. No gradient flows into the
boxes, as in torchvision (proposals are constants for the box head).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_BAG_ENTRIES = 2**21
"""The vectorised ops build their bag entries (see ``_pixel_table``) a chunk of RoIs at a time,
about this many entries per chunk: it bounds their memory (~50 bytes per entry) for large
adaptive grids and large boxes."""


# ----------------------------------------------------------------------------------------------
# Boxes and argument checks
# ----------------------------------------------------------------------------------------------


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """A list of per-image boxes -> one ``Tensor[K, 5]`` of ``(batch_index, x1, y1, x2, y2)`` rows.

    Args:
        boxes (list of Tensor[L, 4]): ``boxes[i]`` holds the ``(x1, y1, x2, y2)`` of image ``i``.

    Returns:
        Tensor[K, 5]: the boxes of all images, one after the other, each with its image's index.
    """
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4] of (x1, y1, x2, y2), got {shape}")
    if len(boxes) == 0:
        return torch.zeros(0, 5)
    dtype = torch.promote_types(boxes[0].dtype, torch.get_default_dtype())
    # (L, 1) column of image index i beside each (L, 4) block -> (L, 5); all blocks -> (K, 5)
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i, dtype=dtype), b.to(dtype)], dim=1)
                      for i, b in enumerate(boxes)])


def _check_feature_map(name: str, input) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4 or not input.is_floating_point():
        got = (f"shape {tuple(input.shape)} and dtype {input.dtype}" if isinstance(input, Tensor)
               else f"a {type(input).__name__}")
        raise ValueError(f"{name} must be a float Tensor[N, C, H, W], got {got}")
    if min(input.shape[2:]) < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(input.shape)}")


def _check_output_size(output_size) -> tuple[int, int]:
    """``7`` or ``(7, 7)`` -> ``(7, 7)``; both sides must be positive ints."""
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)):
        size = tuple(output_size)
    else:
        size = ()
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"output_size must be a positive int or a pair (h, w) of positive ints, "
                         f"got {output_size!r}")
    return size


def _check_spatial_scale(spatial_scale) -> None:
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0 (1 / stride of the feature map), got {spatial_scale!r}")


def _as_rois(boxes, input: Tensor) -> Tensor:
    """Check ``boxes`` against ``input`` (N images) and return them as a ``Tensor[K, 5]``.

    The result has ``input``'s dtype and device and is detached: no gradient flows to boxes.
    """
    num_images = input.shape[0]
    if isinstance(boxes, (list, tuple)):
        if len(boxes) > num_images:
            raise ValueError(f"boxes has one Tensor[L, 4] per image: got {len(boxes)} tensors for "
                             f"{num_images} images in input")
        rois = boxes_to_rois(boxes)
    elif isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be a Tensor[K, 5] of (batch_index, x1, y1, x2, y2) or a list "
                             f"of Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        rois = boxes
    else:
        raise ValueError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], "
                         f"got a {type(boxes).__name__}")
    rois = rois.detach().to(device=input.device, dtype=input.dtype)
    if not torch.isfinite(rois).all():
        raise ValueError("boxes must be finite (found inf or nan)")
    batch_index = rois[:, 0]
    bad = (batch_index < 0) | (batch_index > num_images - 1) | (batch_index != batch_index.floor())
    if bad.any():
        raise ValueError(f"boxes[:, 0] (the batch index) must be integers in [0, {num_images - 1}] for "
                         f"{num_images} images in input, got {batch_index[bad][:5].tolist()}")
    return rois


def _check_box(box) -> Tensor:
    """One box (Tensor[4] or a sequence of 4 numbers) -> a float Tensor[4]."""
    box = torch.as_tensor(box)
    if box.shape != (4,):
        raise ValueError(f"box must be a Tensor[4] of (x1, y1, x2, y2), got shape {tuple(box.shape)}")
    return box.to(torch.promote_types(box.dtype, torch.get_default_dtype()))


def _checked_rois(input: Tensor, boxes, output_size, spatial_scale) -> tuple[Tensor, int, int]:
    """Validate the arguments every RoI op shares; return (rois Tensor[K, 5], out_h, out_w)."""
    _check_feature_map("input", input)
    out_h, out_w = _check_output_size(output_size)
    _check_spatial_scale(spatial_scale)
    return _as_rois(boxes, input), out_h, out_w


def _empty_result(input: Tensor, out_h: int, out_w: int) -> Tensor:
    """The (0, C, h, w) result for K = 0 boxes, still part of the autograd graph (as torchvision's is).

    So ``output.sum().backward()`` gives ``input`` a zero gradient instead of failing.
    """
    # (N, C, H, W) -> (0, C, 1, 1) -> (0, C, h, w)
    return input[:0, :, :1, :1].repeat(1, 1, out_h, out_w)


# ----------------------------------------------------------------------------------------------
# Bilinear interpolation
# ----------------------------------------------------------------------------------------------


class BilinearWeights(NamedTuple):
    """The four neighbour cells of a point and their weights (see :func:`bilinear_weights`)."""

    y_low: Tensor  # int64: row above (or at) the point
    x_low: Tensor  # int64: column left of (or at) the point
    y_high: Tensor  # int64: row below
    x_high: Tensor  # int64: column right
    w1: Tensor  # weight of (y_low, x_low)
    w2: Tensor  # weight of (y_low, x_high)
    w3: Tensor  # weight of (y_high, x_low)
    w4: Tensor  # weight of (y_high, x_high)


def _linear_weights(t: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Linear interpolation along one axis of ``size`` cells, as torchvision's RoIAlign kernel does it.

    Returns ``(low, high, w_low, w_high, outside)`` for the coordinates ``t`` (any shape):
    the two cells around ``t``, their weights (summing to 1), and whether ``t`` is more than one
    cell off the axis (``t < -1`` or ``t > size``), where the kernel reads nothing.
    """
    outside = (t < -1) | (t > size)
    # [-1, 0) reads cell 0; the upper clamp only keeps far-off (outside) points from overflowing
    t = t.clamp(min=0, max=size)
    low = t.floor().long()
    past_end = low >= size - 1  # at or past the last cell: both neighbours are the last cell
    low = torch.where(past_end, size - 1, low)
    high = torch.where(past_end, size - 1, low + 1)
    t = torch.where(past_end, low.to(t.dtype), t)
    w_high = t - low  # distance from the low cell: 0 on it, nearly 1 just before the high cell
    return low, high, 1 - w_high, w_high, outside


def bilinear_weights(y, x, height: int, width: int) -> BilinearWeights:
    """Which four cells a point ``(y, x)`` reads on a ``height x width`` map, and with which weights.

    Follows torchvision's RoIAlign kernel exactly:
      * a point more than one cell outside the map (``y < -1``, ``y > height``, ``x < -1`` or
        ``x > width``) reads nothing: all four weights are 0 (and the indices 0);
      * otherwise a point in ``[-1, 0)`` is moved to 0, and a point past the last row (column)
        is moved onto it: the border value extends up to one cell beyond the map;
      * with ``ly = y - y_low``, ``lx = x - x_low``: ``w1 = (1-ly)(1-lx)``, ``w2 = (1-ly) lx``,
        ``w3 = ly (1-lx)``, ``w4 = ly lx``; the nearer a cell, the larger its weight, and
        ``w1 + w2 + w3 + w4 == 1``. Bilinear is linear along y times linear along x.

    Args:
        y, x (float or Tensor, any shape, broadcastable): the point(s), in feature-map cells.
        height, width (int): H and W of the feature map.

    Returns:
        BilinearWeights: ``(y_low, x_low, y_high, x_high, w1, w2, w3, w4)``, each of the
        broadcast shape of ``y`` and ``x``.
    """
    y = torch.as_tensor(y)
    x = torch.as_tensor(x, device=y.device)
    dtype = torch.promote_types(torch.promote_types(y.dtype, x.dtype), torch.get_default_dtype())
    y, x = torch.broadcast_tensors(y.to(dtype), x.to(dtype))
    y_low, y_high, hy, ly, y_outside = _linear_weights(y, height)
    x_low, x_high, hx, lx, x_outside = _linear_weights(x, width)
    outside = y_outside | x_outside
    indices = [torch.where(outside, 0, i) for i in (y_low, x_low, y_high, x_high)]
    weights = [torch.where(outside, 0, wi) for wi in (hy * hx, hy * lx, ly * hx, ly * lx)]
    return BilinearWeights(*indices, *weights)


def bilinear_interpolate(feature: Tensor, y, x) -> Tensor:
    """The value of ``feature`` at the point ``(y, x)``, interpolated from the four nearest cells.

    Args:
        feature (Tensor[..., H, W]): a feature map; leading dims (e.g. channels C) are kept.
        y, x (float or Tensor): the point in feature-map cells (tensors of any broadcastable
            shape give one value per point, in trailing dims).

    Returns:
        Tensor[...]: ``w1 f(y_low, x_low) + w2 f(y_low, x_high) + w3 f(y_high, x_low)
        + w4 f(y_high, x_high)``, with weights from :func:`bilinear_weights`.
    """
    height, width = feature.shape[-2:]
    y_low, x_low, y_high, x_high, w1, w2, w3, w4 = bilinear_weights(y, x, height, width)
    w1, w2, w3, w4 = (wi.to(feature.dtype) for wi in (w1, w2, w3, w4))
    return (w1 * feature[..., y_low, x_low] + w2 * feature[..., y_low, x_high]
            + w3 * feature[..., y_high, x_low] + w4 * feature[..., y_high, x_high])


# ----------------------------------------------------------------------------------------------
# Helpers of the vectorised ops: every bin is a "bag" of pixels
# ----------------------------------------------------------------------------------------------
#
# RoIAlign and RoIPool both reduce, for every bin, a set of feature vectors (pixels, C values
# each): RoIAlign a weighted sum over the four neighbours of its sampling points, RoIPool a max
# over its cells. ``F.embedding_bag`` does exactly that for a table with one row per pixel:
# given the rows of each bag (and weights for a sum), it reduces them without first copying the
# gathered rows out. Bags may differ in size, which covers RoIAlign's per-RoI adaptive grids
# and RoIPool's bins of different sizes without padding.


def _pixel_table(input: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C): one row per pixel; pixel (n, r, c) is row ``(n*H + r)*W + c``."""
    num_images, channels, height, width = input.shape
    # (N, C, H, W) -> (N, H, W, C) -> (N*H*W, C). Copied into that order (unless the input already
    # is channels-last): embedding_bag is an order of magnitude slower on a strided table.
    return input.permute(0, 2, 3, 1).reshape(num_images * height * width, channels).contiguous()


def _ragged_arange(counts: Tensor) -> tuple[Tensor, Tensor]:
    """One entry per member of groups of sizes ``counts``: (its group, its place in the group).

    ``counts = [2, 0, 3]`` -> groups ``[0, 0, 2, 2, 2]``, places ``[0, 1, 0, 1, 2]``.
    """
    group = torch.repeat_interleave(counts)
    first = torch.cumsum(counts, 0) - counts  # where each group starts
    place = torch.arange(len(group), device=counts.device) - first[group]
    return group, place


def _chunks(entries_per_roi: Tensor, limit: int) -> list[slice]:
    """Consecutive runs of RoIs with about ``limit`` bag entries each (a bigger RoI runs alone)."""
    chunk_of_roi = (torch.cumsum(entries_per_roi, 0) - entries_per_roi) // limit  # (K,) 0,0,..,1,1,..
    sizes = torch.unique_consecutive(chunk_of_roi, return_counts=True)[1].tolist()
    starts = [0] + list(itertools.accumulate(sizes))
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def _bins_to_nchw(bags: Tensor, out_h: int, out_w: int) -> Tensor:
    """Bag results, one (C,) row per bin, RoI by RoI -> (Kc, C, h, w) (a view)."""
    # (Kc*h*w, C) -> (Kc, h, w, C) -> (Kc, C, h, w)
    return bags.reshape(-1, out_h, out_w, bags.shape[1]).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------------------


class _AlignGeometry(NamedTuple):
    """Where RoIAlign samples, per RoI (every field is a Tensor[K])."""

    start_y: Tensor  # top edge of the RoI, in feature cells
    start_x: Tensor  # left edge
    bin_h: Tensor  # height of one bin, in feature cells
    bin_w: Tensor  # width of one bin
    grid_h: Tensor  # int64: sampling points per bin, down (gh)
    grid_w: Tensor  # int64: sampling points per bin, across (gw)


def _align_geometry(boxes: Tensor, out_h: int, out_w: int, spatial_scale: float,
                    sampling_ratio: int, aligned: bool) -> _AlignGeometry:
    """Bins and sampling grids of ``boxes`` (Tensor[K, 4], image pixels), as the CPU kernel has them."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes * spatial_scale - offset).unbind(dim=1)  # (K, 4) -> 4 x (K,)
    roi_h = y2 - y1
    roi_w = x2 - x1
    if not aligned:
        # legacy: a box is at least one cell tall and wide (so even a zero-size box samples)
        roi_h = roi_h.clamp(min=1)
        roi_w = roi_w.clamp(min=1)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.long)
    else:
        # adaptive: about one sampling point per cell, ceil(bin size), per RoI (0 for an empty box)
        grid_h = torch.ceil(roi_h / out_h).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / out_w).long().clamp(min=0)
    return _AlignGeometry(y1, x1, roi_h / out_h, roi_w / out_w, grid_h, grid_w)


def _sample_coordinate(start: Tensor, bin_index, bin_size: Tensor, sample_index, grid) -> Tensor:
    """Coordinate of sampling point ``sample_index`` of bin ``bin_index``: evenly spread, none on an edge.

    A bin of size ``s`` with ``g`` points has them at ``(a + 0.5) * s / g`` from its start.
    (Written in the kernel's order of operations, so that float32 results agree to the last bit.)
    """
    return start + bin_index * bin_size + (sample_index + 0.5) * bin_size / grid


def roi_align_sampling_points(box: Tensor, output_size, spatial_scale: float = 1.0,
                              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Every sampling point of one box, for drawing them over a feature map.

    Args:
        box (Tensor[4]): ``(x1, y1, x2, y2)`` in image pixels.
        output_size (int or (h, w)), spatial_scale, sampling_ratio, aligned: as in :func:`roi_align`.

    Returns:
        Tensor[h, w, gh, gw, 2]: ``points[i, j, a, b]`` is the ``(y, x)``, in feature cells, of
        sampling point ``(a, b)`` of bin ``(i, j)``. ``gh`` or ``gw`` may be 0 (an aligned box of
        zero size with adaptive sampling): that box has no points and pools to 0.
    """
    out_h, out_w = _check_output_size(output_size)
    _check_spatial_scale(spatial_scale)
    box = _check_box(box)
    g = _align_geometry(box[None], out_h, out_w, spatial_scale, sampling_ratio, aligned)
    g = _AlignGeometry(*(field[0] for field in g))  # K = 1 -> scalars
    grid_h, grid_w = int(g.grid_h), int(g.grid_w)
    dtype, device = box.dtype, box.device
    # (h, 1) bin rows with (1, gh) point rows -> (h, gh); likewise (w, gw) across
    ys = _sample_coordinate(g.start_y, torch.arange(out_h, device=device)[:, None], g.bin_h,
                            torch.arange(grid_h, dtype=dtype, device=device)[None, :], grid_h)
    xs = _sample_coordinate(g.start_x, torch.arange(out_w, device=device)[:, None], g.bin_w,
                            torch.arange(grid_w, dtype=dtype, device=device)[None, :], grid_w)
    # (h, gh) -> (h, 1, gh, 1) and (w, gw) -> (1, w, 1, gw), both broadcast to (h, w, gh, gw)
    ys, xs = torch.broadcast_tensors(ys[:, None, :, None], xs[None, :, None, :])
    return torch.stack([ys, xs], dim=-1)  # 2 x (h, w, gh, gw) -> (h, w, gh, gw, 2)


def roi_align_reference(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
                        sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign written out point by point: slow, for reading and for checking :func:`roi_align`.

    For every box, every bin: the average of the feature interpolated at the bin's sampling
    points (:func:`roi_align_sampling_points`, :func:`bilinear_interpolate`). Same arguments and
    result as :func:`roi_align`.
    """
    rois, out_h, out_w = _checked_rois(input, boxes, output_size, spatial_scale)
    if len(rois) == 0:
        return _empty_result(input, out_h, out_w)
    channels = input.shape[1]
    pooled_rois = []
    for roi in rois:
        feature = input[int(roi[0])]  # (C, H, W): the map of this box's image
        points = roi_align_sampling_points(roi[1:], (out_h, out_w), spatial_scale, sampling_ratio, aligned)
        count = max(points.shape[2] * points.shape[3], 1)  # gh * gw points per bin
        bins = []
        for i in range(out_h):
            for j in range(out_w):
                total = input.new_zeros(channels)
                for y, x in points[i, j].reshape(-1, 2):  # (gh, gw, 2) -> (gh*gw, 2)
                    total = total + bilinear_interpolate(feature, y, x)
                bins.append(total / count)
        # h*w tensors (C,) -> (C, h*w) -> (C, h, w)
        pooled_rois.append(torch.stack(bins, dim=1).reshape(channels, out_h, out_w))
    return torch.stack(pooled_rois)  # K x (C, h, w) -> (K, C, h, w)


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (Mask R-CNN): average of bilinearly interpolated samples in every bin, no rounding.

    Same signature and numbers as ``torchvision.ops.roi_align``.

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): ``(batch_index, x1, y1, x2, y2)`` rows, or
            ``(x1, y1, x2, y2)`` per image; in image pixels.
        output_size (int or (h, w)): bins per RoI.
        spatial_scale (float): image pixels -> feature cells (1/4 for a stride-4 map).
        sampling_ratio (int): ``gh = gw = sampling_ratio`` points per bin if > 0; if <= 0, per RoI
            ``gh = ceil(roi_height / h)`` and ``gw = ceil(roi_width / w)`` (adaptive).
        aligned (bool): shift boxes by -0.5 cell (pixel centres; see the module docstring).
            ``False`` is the legacy behaviour that also makes every box at least 1 x 1 cell.

    Returns:
        Tensor[K, C, h, w]: the pooled features of every box.

    How: a bin's value is a weighted sum of pixels, ``sum of w * pixel`` over the four neighbours
    of its ``gh * gw`` sampling points, divided by ``gh * gw``: one ``F.embedding_bag`` (mode
    "sum", with per-entry weights) over all bins of all RoIs.
    """
    rois, out_h, out_w = _checked_rois(input, boxes, output_size, spatial_scale)
    if len(rois) == 0:
        return _empty_result(input, out_h, out_w)
    _, channels, height, width = input.shape
    geometry = _align_geometry(rois[:, 1:], out_h, out_w, spatial_scale, sampling_ratio, aligned)
    pixels = _pixel_table(input)  # (N*H*W, C)
    result = input.new_empty(len(rois), channels, out_h, out_w)
    entries_per_roi = 4 * out_h * out_w * geometry.grid_h * geometry.grid_w  # (K,)
    for chunk in _chunks(entries_per_roi, MAX_BAG_ENTRIES):
        g = _AlignGeometry(*(field[chunk] for field in geometry))
        index, weight, first = _align_bags(rois[chunk, 0].long(), g, out_h, out_w, height, width)
        # every bin: sum over its entries of weight * pixels[index]  -> (Kc*h*w, C)
        means = F.embedding_bag(index, pixels, first, mode="sum", per_sample_weights=weight)
        result[chunk] = _bins_to_nchw(means, out_h, out_w)
    return result


def _align_bags(batch_index: Tensor, g: _AlignGeometry, out_h: int, out_w: int,
                height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The sampling points of every bin of ``Kc`` RoIs as embedding-bag entries, 4 per point.

    Bilinear weights are products of a weight along y and one along x, so the coordinates and
    1-D weights are worked out per axis (few: Kc*h*gh rows, Kc*w*gw columns) and only combined
    per point at the end. The average over a bin's ``gh * gw`` points is folded into the weights
    (``/ gh`` along y, ``/ gw`` along x), so the bags' weighted sums are already the means.

    Returns:
        index (Tensor[4*S]): pixel row (see :func:`_pixel_table`) of each neighbour of each point.
        weight (Tensor[4*S]): its bilinear weight / (gh * gw) (0 for a point off the map).
        first (Tensor[Kc*h*w]): where each bin's entries start in ``index``.
    """
    num_rois = len(batch_index)
    # -- along y: point a of bin row i of RoI k, for all (k, i, a) with a < gh[k]
    row_group, a = _ragged_arange(g.grid_h.repeat_interleave(out_h))  # groups (k, i) = k*h + i
    roi = row_group // out_h
    y = _sample_coordinate(g.start_y[roi], row_group % out_h, g.bin_h[roi], a.to(g.bin_h.dtype),
                           g.grid_h[roi])
    y_low, y_high, y_w_low, y_w_high, y_outside = _linear_weights(y, height)
    image_start = batch_index[roi] * height  # first row of the RoI's image in the (N*H) rows
    # 2 x (Ty,) -> (Ty, 2): the pixel rows of the low and high neighbour (times W: row starts)
    y_rows = (torch.stack([y_low, y_high], dim=1) + image_start[:, None]) * width
    y_weights = torch.stack([y_w_low, y_w_high], dim=1).masked_fill(y_outside[:, None], 0)
    y_weights = y_weights / g.grid_h[roi, None]  # the mean over the bin's gh rows of points
    # -- along x: point b of bin column j of RoI k
    col_group, b = _ragged_arange(g.grid_w.repeat_interleave(out_w))  # groups (k, j) = k*w + j
    roi = col_group // out_w
    x = _sample_coordinate(g.start_x[roi], col_group % out_w, g.bin_w[roi], b.to(g.bin_w.dtype),
                           g.grid_w[roi])
    x_low, x_high, x_w_low, x_w_high, x_outside = _linear_weights(x, width)
    x_cols = torch.stack([x_low, x_high], dim=1)  # 2 x (Tx,) -> (Tx, 2)
    x_weights = torch.stack([x_w_low, x_w_high], dim=1).masked_fill(x_outside[:, None], 0)
    x_weights = x_weights / g.grid_w[roi, None]

    # -- the points: bin (k, i, j) has gh[k] * gw[k] of them, (a, b) in row-major order
    first_row = (torch.cumsum(g.grid_h, 0) - g.grid_h) * out_h  # (Kc,) first y entry of RoI k
    first_col = (torch.cumsum(g.grid_w, 0) - g.grid_w) * out_w
    i = torch.arange(out_h, device=batch_index.device)
    j = torch.arange(out_w, device=batch_index.device)
    # (Kc, 1, 1) + (1, h, 1) * (Kc, 1, 1) -> (Kc, h, 1) -> (Kc, h, w) -> (Kc*h*w,): first y entry of each bin
    bin_first_row = (first_row[:, None, None] + i[None, :, None] * g.grid_h[:, None, None]).expand(
        num_rois, out_h, out_w).reshape(-1)
    bin_first_col = (first_col[:, None, None] + j[None, None, :] * g.grid_w[:, None, None]).expand(
        num_rois, out_h, out_w).reshape(-1)
    bin_grid_w = g.grid_w.repeat_interleave(out_h * out_w)  # (Kc*h*w,)
    count = g.grid_h.repeat_interleave(out_h * out_w) * bin_grid_w  # points per bin
    point_bin, place = _ragged_arange(count)  # (S,) each point's bin, and its place a*gw + b there
    point_grid_w = bin_grid_w[point_bin]
    y_entry = bin_first_row[point_bin] + place // point_grid_w  # (S,) index into the y entries
    x_entry = bin_first_col[point_bin] + place % point_grid_w
    # neighbours (low, high) along y times (low, high) along x:
    # (S, 2, 1) + (S, 1, 2) -> (S, 2, 2) -> (4*S,) = w1 (y_low, x_low), w2, w3, w4 (y_high, x_high)
    index = (y_rows[y_entry][:, :, None] + x_cols[x_entry][:, None, :]).reshape(-1)
    weight = (y_weights[y_entry][:, :, None] * x_weights[x_entry][:, None, :]).reshape(-1)
    first = 4 * (torch.cumsum(count, 0) - count)
    return index, weight, first


# ----------------------------------------------------------------------------------------------
# RoIPool
# ----------------------------------------------------------------------------------------------


def _round_half_away_from_zero(t: Tensor) -> Tensor:
    """C's ``round``: 2.5 -> 3, -2.5 -> -3. (``torch.round`` rounds halves to even: 2.5 -> 2.)"""
    whole = torch.trunc(t)
    is_half = (t - whole).abs() == 0.5  # exact in floating point
    return torch.where(is_half, whole + torch.sign(t), torch.round(t))


class RoIPoolBins(NamedTuple):
    """RoIPool's two quantisations of one box (see :func:`roi_pool_bins`)."""

    box: Tensor  # int64 [4]: (x1, y1, x2, y2) rounded to whole cells, x2 and y2 *inclusive*
    row_start: Tensor  # int64 [h]: first row of each bin row
    row_end: Tensor  # int64 [h]: one past its last row
    col_start: Tensor  # int64 [w]: first column of each bin column
    col_end: Tensor  # int64 [w]: one past its last column


def _pool_bins(boxes: Tensor, out_h: int, out_w: int, spatial_scale: float,
               height: int | None, width: int | None) -> RoIPoolBins:
    """RoIPool's bins of ``boxes`` (Tensor[K, 4]); fields get a leading K. Clipped to H, W if given."""
    # quantisation 1: box corners rounded to whole cells (C's round, as the kernel)
    box = _round_half_away_from_zero(boxes * spatial_scale).long()  # (K, 4)
    x1, y1, x2, y2 = box.unbind(dim=1)
    roi_h = (y2 - y1 + 1).clamp(min=1)  # cells y1..y2, both included; malformed boxes -> 1 cell
    roi_w = (x2 - x1 + 1).clamp(min=1)
    bin_h = roi_h.to(boxes.dtype) / out_h  # (K,) fractional bin size
    bin_w = roi_w.to(boxes.dtype) / out_w
    # quantisation 2: bin edges floored (start) and ceiled (end): neighbouring bins may share a cell
    i = torch.arange(out_h, device=boxes.device, dtype=boxes.dtype)
    j = torch.arange(out_w, device=boxes.device, dtype=boxes.dtype)
    # (K, 1) with (h,) -> (K, h); likewise (K, w)
    row_start = torch.floor(i * bin_h[:, None]).long() + y1[:, None]
    row_end = torch.ceil((i + 1) * bin_h[:, None]).long() + y1[:, None]
    col_start = torch.floor(j * bin_w[:, None]).long() + x1[:, None]
    col_end = torch.ceil((j + 1) * bin_w[:, None]).long() + x1[:, None]
    if height is not None:
        row_start, row_end = row_start.clamp(0, height), row_end.clamp(0, height)
    if width is not None:
        col_start, col_end = col_start.clamp(0, width), col_end.clamp(0, width)
    return RoIPoolBins(box, row_start, row_end, col_start, col_end)


def roi_pool_bins(box: Tensor, output_size, spatial_scale: float = 1.0,
                  feature_size: tuple[int, int] | None = None) -> RoIPoolBins:
    """RoIPool's quantised box and bin edges of one box, for drawing the two roundings.

    Args:
        box (Tensor[4]): ``(x1, y1, x2, y2)`` in image pixels.
        output_size (int or (h, w)), spatial_scale: as in :func:`roi_pool`.
        feature_size ((H, W), optional): clip the bins to the map, as RoIPool does (a bin
            wholly outside becomes empty: ``start == end``).

    Returns:
        RoIPoolBins: ``box`` (Tensor[4], whole cells, ``x2``/``y2`` inclusive), and
        ``row_start``/``row_end`` (Tensor[h]), ``col_start``/``col_end`` (Tensor[w]):
        bin ``(i, j)`` is rows ``row_start[i]:row_end[i]``, columns ``col_start[j]:col_end[j]``.
    """
    out_h, out_w = _check_output_size(output_size)
    _check_spatial_scale(spatial_scale)
    box = _check_box(box)
    height, width = feature_size if feature_size is not None else (None, None)
    bins = _pool_bins(box[None], out_h, out_w, spatial_scale, height, width)
    return RoIPoolBins(*(field[0] for field in bins))


def roi_pool_reference(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool written out bin by bin: slow, for reading and for checking :func:`roi_pool`."""
    rois, out_h, out_w = _checked_rois(input, boxes, output_size, spatial_scale)
    if len(rois) == 0:
        return _empty_result(input, out_h, out_w)
    _, channels, height, width = input.shape
    pooled_rois = []
    for roi in rois:
        feature = input[int(roi[0])]  # (C, H, W)
        bins = roi_pool_bins(roi[1:], (out_h, out_w), spatial_scale, (height, width))
        values = []
        for i in range(out_h):
            for j in range(out_w):
                cells = feature[:, bins.row_start[i]:bins.row_end[i], bins.col_start[j]:bins.col_end[j]]
                if cells.numel() == 0:
                    values.append(input.new_zeros(channels))  # a bin off the map pools to 0
                else:
                    # (C, bh, bw) -> (C, bh*bw): max over the bin; the gradient goes to the
                    # first maximum in row-major order
                    values.append(cells.reshape(channels, -1).max(dim=1).values)
        # h*w tensors (C,) -> (C, h*w) -> (C, h, w)
        pooled_rois.append(torch.stack(values, dim=1).reshape(channels, out_h, out_w))
    return torch.stack(pooled_rois)  # K x (C, h, w) -> (K, C, h, w)


def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool (Fast R-CNN): max over every bin, after rounding the box and the bins to whole cells.

    Same signature and numbers as ``torchvision.ops.roi_pool``; the gradient of a bin goes to the
    cell holding its maximum (the first one in row-major order on a tie, as torchvision).

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`.
        output_size (int or (h, w)): bins per RoI.
        spatial_scale (float): image pixels -> feature cells.

    Returns:
        Tensor[K, C, h, w]: the maximum of every bin (0 for a bin wholly off the map).

    How: one ``F.embedding_bag`` (mode "max") whose bags are the cells of each bin.
    """
    rois, out_h, out_w = _checked_rois(input, boxes, output_size, spatial_scale)
    if len(rois) == 0:
        return _empty_result(input, out_h, out_w)
    _, channels, height, width = input.shape
    bins = _pool_bins(rois[:, 1:], out_h, out_w, spatial_scale, height, width)
    batch_index = rois[:, 0].long()
    pixels = _pixel_table(input)  # (N*H*W, C)
    result = input.new_empty(len(rois), channels, out_h, out_w)
    bin_rows = bins.row_end - bins.row_start  # (K, h) rows of each bin row (0 off the map)
    bin_cols = bins.col_end - bins.col_start  # (K, w)
    entries_per_roi = bin_rows.sum(dim=1) * bin_cols.sum(dim=1)  # (K,) cells over all bins
    for chunk in _chunks(entries_per_roi, MAX_BAG_ENTRIES):
        c = RoIPoolBins(*(field[chunk] for field in bins))
        index, first = _pool_bags(batch_index[chunk], c, height, width)
        maxima = F.embedding_bag(index, pixels, first, mode="max")  # (Kc*h*w, C)
        result[chunk] = _bins_to_nchw(maxima, out_h, out_w)
    return result


def _pool_bags(batch_index: Tensor, bins: RoIPoolBins, height: int,
               width: int) -> tuple[Tensor, Tensor]:
    """The cells of every bin of ``Kc`` RoIs as embedding-bag entries, row-major inside each bin.

    Returns ``index`` (Tensor[E]: pixel rows, see :func:`_pixel_table`) and ``first``
    (Tensor[Kc*h*w]: where each bin's entries start).
    """
    num_rois, out_h = bins.row_start.shape
    out_w = bins.col_start.shape[1]
    shape = (num_rois, out_h, out_w)
    # per bin (k, i, j): (Kc, h, 1) or (Kc, 1, w) -> (Kc, h, w) -> (Kc*h*w,)
    row_start = bins.row_start[:, :, None].expand(shape).reshape(-1)
    col_start = bins.col_start[:, None, :].expand(shape).reshape(-1)
    bin_cols = (bins.col_end - bins.col_start)[:, None, :].expand(shape).reshape(-1)
    bin_rows = (bins.row_end - bins.row_start)[:, :, None].expand(shape).reshape(-1)
    image_start = batch_index[:, None, None].expand(shape).reshape(-1) * height
    count = bin_rows * bin_cols  # cells per bin
    cell_bin, place = _ragged_arange(count)  # (E,) each cell's bin, and its place there (row-major)
    row = image_start[cell_bin] + row_start[cell_bin] + place // bin_cols[cell_bin]
    col = col_start[cell_bin] + place % bin_cols[cell_bin]
    return row * width + col, torch.cumsum(count, 0) - count


# ----------------------------------------------------------------------------------------------
# RoIAlign over FPN levels
# ----------------------------------------------------------------------------------------------


def map_levels(boxes_list: Sequence[Tensor], k_min: int, k_max: int, canonical_scale: float = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """Which FPN level pools each box: FPN paper eq. (1), as torchvision's ``LevelMapper``.

    ``k = floor(k0 + log2(sqrt(area) / s0) + eps)``, clamped to ``[k_min, k_max]``: a box of
    ``s0 x s0`` = 224 x 224 pixels goes to level ``k0`` = 4 (stride 16), one half as large to
    level 3, twice as large to level 5. ``eps`` is added to the level, after the log (not
    inside it): a box whose side is ``s0 * 2**n`` up to float rounding (``sqrt(area)`` =
    111.99999 for 112) stays on level ``k0 + n`` instead of dropping one level.

    Args:
        boxes_list (list of Tensor[L, 4]): ``(x1, y1, x2, y2)`` per image, in image pixels.
        k_min, k_max (int): the finest and coarsest level available (2 and 5 for P2-P5).
        canonical_scale (float): ``s0``; canonical_level (int): ``k0``.

    Returns:
        Tensor[K] (int64): ``k - k_min``, the index into the list of levels (0 = level k_min).
    """
    if len(boxes_list) == 0:
        return torch.zeros(0, dtype=torch.long)
    boxes = torch.cat(list(boxes_list))  # (K, 4)
    if not boxes.is_floating_point():
        boxes = boxes.to(torch.get_default_dtype())
    side = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # sqrt(area)
    level = torch.floor(canonical_level + torch.log2(side / canonical_scale)
                        + torch.tensor(eps, dtype=side.dtype))
    return level.clamp(min=k_min, max=k_max).long() - k_min


def infer_scale(feature_size: Sequence[int], image_size: Sequence[int]) -> float:
    """``spatial_scale`` of a feature map: ``2 ** round(log2(feature_height / image_height))``.

    As torchvision, from the heights only, rounded to a power of 2: a 25-row map of an 800-row
    image -> 1/32. (Widths agree for images padded to a multiple of the coarsest stride.)
    """
    return 2.0 ** round(math.log2(feature_size[0] / image_size[0]))


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign from the FPN level that suits each box's size (torchvision's ``MultiScaleRoIAlign``).

    Args:
        featmap_names (list of str): the levels to pool from, finest first (e.g. p2..p5 as
            ``["0", "1", "2", "3"]`` in torchvision's FPN output).
        output_size (int or (h, w)): bins per RoI.
        sampling_ratio (int): as in :func:`roi_align` (``aligned=False``, as torchvision).
        canonical_scale, canonical_level: ``s0`` and ``k0`` of :func:`map_levels`.

    Unlike torchvision, which infers the level scales on its first call and keeps them, the
    scales are inferred on every call (same numbers whenever torchvision's would be right).
    """

    def __init__(self, featmap_names: Sequence[str], output_size, sampling_ratio: int, *,
                 canonical_scale: float = 224, canonical_level: int = 4) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _check_output_size(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> Tensor:
        """Pool every box from its level.

        Args:
            features (dict of str -> Tensor[N, C, H_k, W_k]): the pyramid; only the maps named in
                ``featmap_names`` are used, in the dict's order (as torchvision).
            boxes (list of Tensor[L, 4]): ``(x1, y1, x2, y2)`` per image, in image pixels.
            image_sizes (list of (H, W)): size of each image before padding into the batch.

        Returns:
            Tensor[K, C, h, w]: pooled features, boxes in the order of ``boxes``.
        """
        missing = [name for name in self.featmap_names if name not in features]
        if missing:
            raise ValueError(f"features has no map named {missing} (it has {list(features)})")
        if not isinstance(boxes, (list, tuple)):
            raise ValueError(f"boxes must be a list of Tensor[L, 4], one per image, "
                             f"got a {type(boxes).__name__}")
        feature_maps = [v for k, v in features.items() if k in self.featmap_names]
        scales = self.infer_scales(feature_maps, image_sizes)
        if len(feature_maps) == 1:
            return roi_align(feature_maps[0], boxes, self.output_size, scales[0], self.sampling_ratio)

        rois = _as_rois(boxes, feature_maps[0])
        k_min = round(-math.log2(scales[0]))  # 1/4 -> level 2
        k_max = round(-math.log2(scales[-1]))
        levels = map_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level)  # (K,)
        first = feature_maps[0]
        result = first.new_zeros((len(rois), first.shape[1]) + self.output_size)
        for level, (feature, scale) in enumerate(zip(feature_maps, scales)):
            in_level = torch.nonzero(levels.to(rois.device) == level).flatten()
            result[in_level] = roi_align(feature, rois[in_level], self.output_size, scale,
                                         self.sampling_ratio).to(result.dtype)
        return result

    @staticmethod
    def infer_scales(feature_maps: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]) -> list[float]:
        """``spatial_scale`` of each map, against the largest image height and width of the batch."""
        if len(image_sizes) == 0:
            raise ValueError("image_sizes must list the (H, W) of at least one image, got an empty list")
        batch_size = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
        return [infer_scale(f.shape[-2:], batch_size) for f in feature_maps]

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")
