"""Anchors: the fixed reference boxes, tiled over every feature map, that the RPN starts from.

Taught in: ``notebooks/02_anchors_and_rpn.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    H, W  height and width of the (padded) image batch
    L     pyramid levels (feature maps)
    h, w  height and width of one feature map (its *grid*)
    A     anchors per location of one level: ``len(sizes[l]) * len(aspect_ratios[l])``
    T     anchors over all levels: ``sum over l of h_l * w_l * A_l``

The RPN looks at every cell of every feature map and asks, for each of a few boxes of fixed
sizes and shapes placed there -- the *anchors* -- "is there an object here, and how must this
box move to fit it?". Anchors are not learned: they are a grid of boxes fixed by two lists,

* ``sizes[l]``: the side of a square anchor of level ``l``, in image pixels (the square root of
  the area of every anchor of that size), and
* ``aspect_ratios[l]``: ``height / width`` of the anchors (0.5 = twice as wide as high).

**Width and height for an aspect ratio.** An anchor of size ``s`` and aspect ratio ``r`` keeps
the area ``s * s`` and has ``h / w = r``. From ``w * h = s**2`` and ``h = r * w`` follow
``w = s / sqrt(r)`` and ``h = s * sqrt(r)``. For ``s = 32``: ``r = 0.5`` gives 45.3 x 22.6,
``r = 1`` gives 32 x 32, ``r = 2`` gives 22.6 x 45.3. The anchor is centred on 0:
``(-w/2, -h/2, w/2, h/2)``, and -- torchvision's convention -- each of these four coordinates is
then *rounded to the nearest integer* (``torch.round``, which rounds halves to even). So the
``s = 32, r = 0.5`` anchor is ``(-23, -11, 23, 11)``, really 46 x 22. See
:func:`anchors_at_one_location`.

**Where anchors are placed.** Level ``l`` of a pyramid whose grid is ``h x w`` places a copy of
its A anchors at ``(x, y) = (col * stride_x, row * stride_y)`` for every cell ``(row, col)``:
the anchors are centred on the *top-left corner* of each cell, not on its centre (another
torchvision convention, inherited from Detectron). The stride is not the level's nominal stride
(4, 8, ..., 64) but, as in torchvision, the padded image size divided by the grid size, rounded
down: ``H // h`` and ``W // w``. The two agree whenever the image is a multiple of the stride;
otherwise they do not: an 800-pixel-high image has a p6 grid of ``ceil(800 / 64) = 13`` rows and
a computed stride of ``800 // 13 = 61``, not 64. We reproduce this, so that our anchors equal
torchvision's exactly (``tests/test_anchors.py`` checks both, the quirk included).

**Order.** Anchors are listed level by level; within a level, cell by cell in row-major order
(``row * w + col``); within a cell, aspect ratio by aspect ratio and, for each ratio, size by
size. The RPN head's outputs are flattened in the same order (see ``mrcnn_edu.rpn``), so that
anchor ``i`` and prediction ``i`` belong together.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from mrcnn_edu.backbone import FPN_STRIDES

FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))
"""torchvision's anchor sizes for Mask R-CNN with FPN: one size per level p2..p6."""

FPN_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5
"""torchvision's aspect ratios (height / width) for Mask R-CNN with FPN: three per level."""


def pyramid_grid_sizes(image_size: tuple[int, int],
                       strides: Sequence[int] = tuple(FPN_STRIDES.values())) -> list[tuple[int, int]]:
    """``(h_l, w_l)`` of every pyramid level for an image of ``image_size``, without a backbone.

    Each stride-2 layer of the ResNet-FPN rounds up, so level ``l`` has ``ceil(H / stride_l)``
    rows and ``ceil(W / stride_l)`` columns (``mrcnn_edu.backbone.feature_shapes`` computes the
    same by running the backbone on shapes only). Handy for drawing anchors on an image::

        generator.anchors_per_level((H, W), pyramid_grid_sizes((H, W)))
    """
    height, width = image_size
    return [(math.ceil(height / stride), math.ceil(width / stride)) for stride in strides]


def anchors_at_one_location(sizes: Sequence[float], aspect_ratios: Sequence[float],
                            dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu") -> Tensor:
    """The A = ``len(aspect_ratios) * len(sizes)`` anchors of one location, centred on ``(0, 0)``.

    Each anchor has the area ``size**2`` and ``height / width = ratio``, hence
    ``width = size / sqrt(ratio)`` and ``height = size * sqrt(ratio)``; its corners
    ``(-width/2, -height/2, width/2, height/2)`` are rounded to integers, as in torchvision.

    Args:
        sizes (sequence of float): anchor sizes in pixels (sqrt of the area).
        aspect_ratios (sequence of float): ``height / width`` ratios, > 0.
        dtype, device: of the result (computed in float32 on the CPU first, as torchvision does).

    Returns:
        Tensor[A, 4]: ``(x1, y1, x2, y2)``, ratio-major: anchor ``i * len(sizes) + j`` has ratio
        ``aspect_ratios[i]`` and size ``sizes[j]``. Example::

            >>> anchors_at_one_location((32,), (0.5, 1.0, 2.0))
            tensor([[-23., -11.,  23.,  11.],
                    [-16., -16.,  16.,  16.],
                    [-11., -23.,  11.,  23.]])
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float32)  # (S,)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)  # (R,)
    height_factors = torch.sqrt(ratios)  # (R,): h = size * sqrt(r)
    width_factors = 1 / height_factors  # (R,): w = size / sqrt(r)
    # (R, 1) * (1, S) -> (R, S) -> (R*S,): ratio-major, then size
    widths = (width_factors[:, None] * sizes[None, :]).reshape(-1)
    heights = (height_factors[:, None] * sizes[None, :]).reshape(-1)
    # 4 x (A,) -> (A, 4)
    anchors = torch.stack([-widths, -heights, widths, heights], dim=1) / 2
    return anchors.round().to(dtype=dtype, device=device)


def shift_anchors(cell_anchors: Tensor, grid_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Copy one location's anchors to every cell of a grid: the anchors of one level.

    Args:
        cell_anchors (Tensor[A, 4]): ``(x1, y1, x2, y2)`` centred on 0 (:func:`anchors_at_one_location`).
        grid_size (tuple[int, int]): ``(h, w)`` of the feature map.
        stride (tuple[int, int]): ``(stride_y, stride_x)``, image pixels from one cell to the next.

    Returns:
        Tensor[h*w*A, 4]: anchor ``(row * w + col) * A + a`` is ``cell_anchors[a]`` moved to
        ``(x, y) = (col * stride_x, row * stride_y)``.
    """
    grid_height, grid_width = grid_size
    stride_y, stride_x = stride
    device = cell_anchors.device
    # integer shifts as in torchvision (an int32 arange times the stride, then added to the float anchors)
    shifts_x = torch.arange(0, grid_width, dtype=torch.int32, device=device) * stride_x  # (w,)
    shifts_y = torch.arange(0, grid_height, dtype=torch.int32, device=device) * stride_y  # (h,)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # 2 x (h, w)
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)  # (h, w) -> (h*w,), row-major
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # 4 x (h*w,) -> (h*w, 4)
    # (h*w, 1, 4) + (1, A, 4) -> (h*w, A, 4) -> (h*w*A, 4)
    return (shifts[:, None, :] + cell_anchors[None, :, :]).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """The anchors of every level of a feature pyramid, for a batch of images.

    Same results as ``torchvision.models.detection.anchor_utils.AnchorGenerator`` (values and
    order). An ``nn.Module`` without parameters or buffers, so that it sits in the model like
    torchvision's and adds nothing to a state dict.

    Args:
        sizes (sequence of sequences of float): ``sizes[l]``, the anchor sizes of level ``l``
            (default: torchvision's FPN sizes, 32 for p2 ... 512 for p6).
        aspect_ratios (sequence of sequences of float): ``aspect_ratios[l]``, the ratios
            ``height / width`` of level ``l`` (default: 0.5, 1, 2 on every level).

    Attributes:
        cell_anchors (list[Tensor[A_l, 4]]): the anchors of one location of each level,
            centred on 0 (:func:`anchors_at_one_location`).
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = FPN_ANCHOR_SIZES,
                 aspect_ratios: Sequence[Sequence[float]] = FPN_ASPECT_RATIOS) -> None:
        super().__init__()
        _check_per_level("sizes", sizes, "(32,), (64,)")
        _check_per_level("aspect_ratios", aspect_ratios, "(0.5, 1.0, 2.0), (0.5, 1.0, 2.0)")
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes and aspect_ratios: expected one entry per pyramid level in each, "
                             f"got {len(sizes)} and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(level) for level in sizes)
        self.aspect_ratios = tuple(tuple(level) for level in aspect_ratios)
        self.cell_anchors = [anchors_at_one_location(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"

    def num_anchors_per_location(self) -> list[int]:
        """A_l for every level: how many anchors (and RPN predictions) each cell has."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def strides(self, image_size: tuple[int, int],
                grid_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """``(stride_y, stride_x) = (H // h, W // w)`` for every level, as torchvision computes them."""
        height, width = image_size
        return [(int(height) // int(h), int(width) // int(w)) for h, w in grid_sizes]

    def anchors_per_level(self, image_size: tuple[int, int], grid_sizes: Sequence[tuple[int, int]],
                          dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> list[Tensor]:
        """The anchors of each level, for drawing or for the RPN.

        Args:
            image_size (tuple[int, int]): ``(H, W)`` of the padded image batch.
            grid_sizes (sequence of (int, int)): ``(h_l, w_l)`` of every feature map, finest first.
            dtype, device: of the anchors (the features' in the RPN).

        Returns:
            list of L Tensor[h_l*w_l*A_l, 4]: ``(x1, y1, x2, y2)`` in image pixels; anchors near
            the border reach outside the image.
        """
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(f"grid_sizes: expected one (h, w) per pyramid level ({len(self.cell_anchors)} "
                             f"levels, from sizes={self.sizes}), got {len(grid_sizes)}")
        strides = self.strides(image_size, grid_sizes)
        return [shift_anchors(cell.to(dtype=dtype, device=device), tuple(grid), stride)
                for cell, grid, stride in zip(self.cell_anchors, grid_sizes, strides)]

    def forward(self, images: Tensor, feature_maps: Sequence[Tensor]) -> list[Tensor]:
        """The anchors of all levels, once per image (torchvision's return value).

        Args:
            images (Tensor[N, 3, H, W]): the padded batch; only its shape is used.
            feature_maps (sequence of L Tensor[N, C, h_l, w_l]): only their shapes, dtype and
                device are used.

        Returns:
            list of N Tensor[T, 4]: every level's anchors concatenated, finest level first. All
            images of a batch share the padded size, hence the anchors: the N entries are the
            same tensor (do not modify it in place).
        """
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        levels = self.anchors_per_level(tuple(images.shape[-2:]), grid_sizes,
                                        feature_maps[0].dtype, feature_maps[0].device)
        anchors = torch.cat(levels)  # L x (h_l*w_l*A_l, 4) -> (T, 4)
        return [anchors] * images.shape[0]


def _check_per_level(name: str, value, example: str) -> None:
    """``value`` must be a non-empty sequence (one per level) of non-empty sequences of positive numbers."""
    expected = f"one tuple of positive numbers per pyramid level, e.g. ({example}, ...)"
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    for level in value:
        if not isinstance(level, Sequence) or len(level) == 0 or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0 for x in level):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
