"""Boxes: areas and intersection-over-union (IoU), the measure of overlap every later stage uses.

Taught in: ``notebooks/02_anchors_and_rpn.ipynb`` (and used by ``notebooks/03_nms.ipynb``).

Shape shorthand used in this module:
    N, M  numbers of boxes in the first and the second set
    ...   any number of leading dimensions (``box_area`` only)

A box is four numbers ``(x1, y1, x2, y2)`` in absolute pixels: ``(x1, y1)`` the top-left
corner, ``(x2, y2)`` the bottom-right corner, so that its width is ``x2 - x1`` and its height
``y2 - y1``. This is torchvision's ``"xyxy"`` format, the only box format in this package.

Both functions compute exactly what ``torchvision.ops.box_area`` and ``torchvision.ops.box_iou``
compute, operation for operation, so their results are equal bit for bit (the tests in
``tests/test_boxes.py`` check this). That includes the cases students meet by accident:

* a zero-area box (``x1 == x2`` or ``y1 == y2``) has IoU ``0`` with a proper box, and IoU
  ``0 / 0 = nan`` with another zero-area box (or itself): the union is empty;
* an inverted box (``x2 < x1``) is not fixed up: its "area" is a product of signed lengths;
* integer boxes give a float IoU, like ``inter / union`` in plain PyTorch does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """Area of each box: ``(x2 - x1) * (y2 - y1)``.

    Args:
        boxes (Tensor[..., 4]): ``(x1, y1, x2, y2)``, any real dtype.

    Returns:
        Tensor[...]: one area per box. Like torchvision, half-precision boxes give float32
        areas and 8/16-bit integer boxes give int32 areas (see :func:`_upcast`); other dtypes
        are kept.

    Raises:
        ValueError: if ``boxes`` is not a real tensor whose last dimension has 4 entries.
    """
    _check_boxes("boxes", boxes, leading_dims="...")
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over union of every box of ``boxes1`` with every box of ``boxes2``.

    ``IoU(a, b) = area(a ∩ b) / area(a ∪ b)``, with ``area(a ∪ b) = area(a) + area(b) - area(a ∩ b)``.
    The intersection of two boxes is itself a box: its top-left corner is the larger of the two
    top-left corners, its bottom-right corner the smaller of the two bottom-right corners, and
    its width and height are clamped at 0 when the boxes do not overlap.

    Args:
        boxes1 (Tensor[N, 4]): ``(x1, y1, x2, y2)``.
        boxes2 (Tensor[M, 4]): ``(x1, y1, x2, y2)``, same dtype as ``boxes1``.

    Returns:
        Tensor[N, M]: ``iou[i, j]`` is the IoU of ``boxes1[i]`` and ``boxes2[j]``, a float in
        ``[0, 1]`` for proper boxes (``nan`` when the union is empty: two zero-area boxes).

    Raises:
        ValueError: if either argument is not a real tensor of shape ``(N, 4)``, or the two
            differ in dtype or device.
    """
    _check_boxes("boxes1", boxes1, leading_dims="N")
    _check_boxes("boxes2", boxes2, leading_dims="M")
    if boxes2.dtype != boxes1.dtype or boxes2.device != boxes1.device:
        raise ValueError(f"boxes2: expected the dtype and device of boxes1 ({boxes1.dtype}, "
                         f"{boxes1.device}), got {boxes2.dtype}, {boxes2.device}")
    area1 = box_area(boxes1)  # (N,)
    area2 = box_area(boxes2)  # (M,)
    # one vector per coordinate: (N, 4) -> 4 x (N,). boxes2's are copied to contiguous memory:
    # the (N, M) operations below read them along M, much faster without the stride of 4.
    x1_a, y1_a, x2_a, y2_a = boxes1.unbind(dim=1)
    x1_b, y1_b, x2_b, y2_b = (coordinate.contiguous() for coordinate in boxes2.unbind(dim=1))
    # the intersection's sides: (N, 1) against (1, M) broadcasts to (N, M); 0 = no overlap
    width = _upcast(torch.minimum(x2_a[:, None], x2_b[None, :])
                    - torch.maximum(x1_a[:, None], x1_b[None, :])).clamp(min=0)
    height = _upcast(torch.minimum(y2_a[:, None], y2_b[None, :])
                     - torch.maximum(y1_a[:, None], y1_b[None, :])).clamp(min=0)
    inter = width * height  # (N, M)
    # (N, 1) + (1, M) -> (N, M)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def _upcast(t: Tensor) -> Tensor:
    """Widen small dtypes so that products of coordinates cannot overflow (as torchvision does).

    float16 and bfloat16 become float32; int8, uint8, int16 (and bool) become int32; float32,
    float64, int32 and int64 are kept.
    """
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _check_boxes(name: str, boxes, leading_dims: str) -> None:
    """``boxes`` must be a real (float or integer) tensor of shape ``(N, 4)`` or ``(..., 4)``.

    ``leading_dims`` names the dimensions before the 4 coordinates in the error message:
    ``"N"`` or ``"M"`` (exactly one dimension) or ``"..."`` (any number, including none).
    """
    shape = f"({leading_dims}, 4)"
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got a {type(boxes).__name__}")
    if boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(f"{name}: expected a float or integer tensor, got dtype {boxes.dtype}")
    rank_ok = boxes.dim() >= 1 if leading_dims == "..." else boxes.dim() == 2
    if not rank_ok or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected a tensor of shape {shape} holding (x1, y1, x2, y2), "
                         f"got shape {tuple(boxes.shape)}")
