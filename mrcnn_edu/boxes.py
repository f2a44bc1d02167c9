"""Boxes: areas, intersection-over-union (IoU), clipping, and the box encoding the regressors learn.

Taught in: ``notebooks/02_anchors_and_rpn.ipynb`` (and used by ``notebooks/03_nms.ipynb``).

Shape shorthand used in this module:
    N, M  numbers of boxes in the first and the second set
    ...   any number of leading dimensions (``box_area``, ``clip_boxes_to_image`` and
          :class:`BoxCoder`, whose arguments broadcast against each other)

A box is four numbers ``(x1, y1, x2, y2)`` in absolute pixels: ``(x1, y1)`` the top-left
corner, ``(x2, y2)`` the bottom-right corner, so that its width is ``x2 - x1`` and its height
``y2 - y1``. This is torchvision's ``"xyxy"`` format, the only box format in this package.

``box_area`` and ``box_iou`` compute exactly what ``torchvision.ops.box_area`` and
``torchvision.ops.box_iou`` compute, operation for operation, so their results are equal bit for
bit (the tests in ``tests/test_boxes.py`` check this). That includes the cases students meet by
accident:

* a zero-area box (``x1 == x2`` or ``y1 == y2``) has IoU ``0`` with a proper box, and IoU
  ``0 / 0 = nan`` with another zero-area box (or itself): the union is empty;
* an inverted box (``x2 < x1``) is not fixed up: its "area" is a product of signed lengths;
* integer boxes give a float IoU, like ``inter / union`` in plain PyTorch does.

The same holds for the second half of the module, which the region proposal network needs:
:func:`clip_boxes_to_image` and :func:`remove_small_boxes` (``torchvision.ops``), and
:class:`BoxCoder`, which turns a box into the four numbers a regressor predicts relative to an
anchor and back (``torchvision.models.detection._utils.BoxCoder``).
"""

from __future__ import annotations

import math
import numbers

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


# ----------------------------------------------------------------------------------------------
# Clipping and filtering (what the RPN does to its proposals)
# ----------------------------------------------------------------------------------------------


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip boxes to an image: every x into ``[0, width]``, every y into ``[0, height]``.

    A box that lies partly outside the image keeps the part inside; a box entirely outside
    collapses onto the border (zero width or height -- :func:`remove_small_boxes` then drops it).

    Args:
        boxes (Tensor[..., 4]): ``(x1, y1, x2, y2)``.
        size (tuple[int, int]): ``(height, width)`` of the image -- height first, as in
            ``image.shape[-2:]``.

    Returns:
        Tensor[..., 4]: the clipped boxes, same shape and dtype; equal to
        ``torchvision.ops.clip_boxes_to_image(boxes, size)``.
    """
    _check_boxes("boxes", boxes, leading_dims="...")
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)  # (..., 4) -> (..., 2): x1, x2
    y = boxes[..., 1::2].clamp(min=0, max=height)  # (..., 4) -> (..., 2): y1, y2
    # (..., 2) and (..., 2) -> (..., 2, 2): [[x1, y1], [x2, y2]] -> (..., 4): x1, y1, x2, y2
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both at least ``min_size``.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``.
        min_size (float): smallest side length kept, in pixels.

    Returns:
        Tensor[K]: int64 indices of the kept boxes, in increasing order; equal to
        ``torchvision.ops.remove_small_boxes(boxes, min_size)``.
    """
    _check_boxes("boxes", boxes, leading_dims="N")
    _, _, widths, heights = _centers_and_sizes(boxes)
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


# ----------------------------------------------------------------------------------------------
# Box encoding: what the box regressors predict
# ----------------------------------------------------------------------------------------------


class BoxCoder:
    """Encode a box relative to a reference box (an anchor) as four *deltas*, and decode them back.

    A regressor does not predict the corners of a box: that would ask the same conv filter to
    output 30 at one place of the image and 700 at another, and 8 for a small box but 300 for a
    large one. It predicts how to move and stretch the reference box it starts from (R-CNN,
    Girshick et al. 2014). With ``(cx, cy, w, h)`` the centre and size of the reference box
    (anchor) and ``(gx, gy, gw, gh)`` those of the box to encode (ground truth)::

        dx = wx * (gx - cx) / w       shift, in units of the anchor's width
        dy = wy * (gy - cy) / h       shift, in units of the anchor's height
        dw = ww * log(gw / w)         log of the stretch: 0 = same width, log(2) = twice as wide
        dh = wh * log(gh / h)

    The deltas do not depend on where the anchor is or how large it is -- only on how the two
    boxes relate -- so one regressor serves every position and scale. :meth:`decode` inverts
    the formulas: ``gx = dx / wx * w + cx``, ``gw = exp(dw / ww) * w``, then the corners are
    ``gx -+ gw / 2``.

    Args:
        weights (tuple[float, float, float, float]): ``(wx, wy, ww, wh)``, scale the deltas so
            that they have roughly unit variance: ``(1, 1, 1, 1)`` for the RPN,
            ``(10, 10, 5, 5)`` for the box head (whose proposals are already close).
        bbox_xform_clip (float): :meth:`decode` clips ``dw`` and ``dh`` at this value before
            ``exp``, so that a wild prediction cannot overflow: the default ``log(1000 / 16)``
            lets a box grow to at most 62.5 times the width and height of its anchor.

    ``encode`` and ``decode`` equal torchvision's ``BoxCoder.encode_single`` and
    ``decode_single`` bit for bit (the same operations in the same order), and are each
    other's inverse up to float rounding (``tests/test_boxes.py`` checks both).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = math.log(1000.0 / 16)) -> None:
        if len(weights) != 4 or not all(isinstance(w, numbers.Real) and w > 0 for w in weights):
            raise ValueError(f"weights: expected four positive numbers (wx, wy, ww, wh), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip:.4f})"

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """The deltas that move and stretch each anchor onto its ground-truth box.

        Args:
            gt_boxes (Tensor[..., 4]): ``(x1, y1, x2, y2)``, the boxes to encode, with positive
                width and height.
            anchors (Tensor[..., 4]): ``(x1, y1, x2, y2)``, the reference boxes, with positive
                width and height; broadcasts against ``gt_boxes`` (usually both ``(N, 4)``).

        Returns:
            Tensor[..., 4]: ``(dx, dy, dw, dh)`` per pair, in the dtype of ``gt_boxes``.
        """
        _check_boxes("gt_boxes", gt_boxes, leading_dims="...")
        _check_boxes("anchors", anchors, leading_dims="...")
        # torchvision turns the weights into a tensor of the boxes' dtype: we do too, so that
        # weights that float32 cannot hold exactly are rounded the same way
        wx, wy, ww, wh = torch.tensor(self.weights, dtype=gt_boxes.dtype, device=gt_boxes.device)
        anchor_x, anchor_y, anchor_w, anchor_h = _centers_and_sizes(anchors)
        gt_x, gt_y, gt_w, gt_h = _centers_and_sizes(gt_boxes)
        dx = wx * (gt_x - anchor_x) / anchor_w
        dy = wy * (gt_y - anchor_y) / anchor_h
        dw = ww * torch.log(gt_w / anchor_w)
        dh = wh * torch.log(gt_h / anchor_h)
        return torch.stack((dx, dy, dw, dh), dim=-1)  # 4 x (...) -> (..., 4)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """The boxes obtained by applying ``deltas`` to ``anchors``: the inverse of :meth:`encode`.

        Args:
            deltas (Tensor[..., 4]): ``(dx, dy, dw, dh)``, e.g. a regressor's output.
            anchors (Tensor[..., 4]): ``(x1, y1, x2, y2)``, the reference boxes; broadcasts
                against ``deltas``: ``(N, 4)`` with ``(N, 4)``, or ``(N, A, 4)`` deltas with
                ``(A, 4)`` anchors shared by all N images, or ``(K, C, 4)`` class-specific deltas
                with ``(K, 1, 4)`` proposals.

        Returns:
            Tensor[..., 4]: ``(x1, y1, x2, y2)`` boxes in the dtype of ``deltas``; not clipped to
            any image (see :func:`clip_boxes_to_image`).
        """
        _check_boxes("deltas", deltas, leading_dims="...")
        _check_boxes("anchors", anchors, leading_dims="...")
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        anchor_x, anchor_y, anchor_w, anchor_h = _centers_and_sizes(anchors)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        # exp(4.2) is 66 times the anchor, exp(100) is inf: clip what goes into exp
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        centre_x = dx * anchor_w + anchor_x
        centre_y = dy * anchor_h + anchor_y
        half_w = 0.5 * (torch.exp(dw) * anchor_w)
        half_h = 0.5 * (torch.exp(dh) * anchor_h)
        # 4 x (...) -> (..., 4)
        return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=-1)


def _centers_and_sizes(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x1, y1, x2, y2)`` -> centre x, centre y, width, height: (..., 4) -> 4 x (...).

    The centre is computed as ``x1 + 0.5 * width`` (not ``(x1 + x2) / 2``), as torchvision does:
    the two can differ in the last bit of a float.
    """
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


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
