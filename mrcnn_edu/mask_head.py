"""The mask head: a small fully convolutional network that draws a 28 x 28 mask in every box.

Taught in: ``notebooks/06_mask_head.ipynb``.

Shape shorthand used in this module:
    P       positive RoIs over the whole batch (training), or detections (inference)
    P_i     of image i
    C       channels of the pooled features (256)
    C'      channels after the upsampling (``dim_reduced``, 256)
    NC      classes, background included
    m       size of the pooled grid (14 x 14)
    M       size of a predicted mask: 2 * m = 28
    G       ground-truth objects of one image
    H, W    height and width of one (unpadded) image
    h, w    height and width of a box in whole pixels, after expansion (pasting)

Mask R-CNN (He et al., 2017) adds a third output to every box: a mask, predicted on a small
fixed grid *inside the box*, so that it does not have to know where the box is in the image.

* :class:`MaskHead` (the *head*): RoIAlign gives a ``C x 14 x 14`` grid per box
  (``mrcnn_edu.roi_ops.MultiScaleRoIAlign``, 14 x 14 this time, not 7 x 7), then four 3x3 conv
  + ReLU layers that keep the size: the network stays spatial, pixel ``(i, j)`` of the output
  looks at pixel ``(i, j)`` of the box.
* :class:`MaskPredictor` (the *predictor*): a 2x2 transposed conv with stride 2 doubles the grid
  to 28 x 28, a 1x1 conv gives **one mask logit per class** at every pixel. Only the channel of
  the box's class is ever used: the masks of the classes do not compete (a per-pixel sigmoid, not
  a softmax over classes), which the paper found much better.

**Training targets** (:func:`project_masks_on_boxes`): the gt mask of the object a positive RoI
is matched to, cropped to the RoI and resized to ``M x M`` -- with RoIAlign itself, on the 0/1
mask as a one-channel "feature map" at scale 1. Edge pixels come out between 0 and 1 (soft
targets, as torchvision; Detectron2 rounds them to 0/1 instead).

**Loss** (:func:`mask_loss`): per-pixel binary cross-entropy between the logits of the gt
class's channel and the target, averaged over all ``P * M * M`` pixels. With no positive RoI in
the batch the loss is ``0`` -- a zero that still belongs to the graph, so ``backward()`` works
and every mask parameter gets a (zero) gradient.

**Inference** (:func:`mask_probabilities`, :func:`paste_masks_in_image`): the sigmoid of the
predicted class's channel gives a 28 x 28 probability map per detection; the model's final step
resizes each map into its box in the full image. Thresholding at :data:`MASK_THRESHOLD` = 0.5
(probability 0.5 = logit 0: "more likely object than not") gives the binary mask; do it *after*
pasting, on the interpolated probabilities, and the mask's outline is smooth instead of made of
28 x 28 blocks.

Everything gives torchvision's numbers (``roi_heads.py``, ``mask_rcnn.py`` in
``torchvision/models/detection``; ``tests/test_mask_head.py``) with readable parameter names
(``convs.<i>``, ``upsample``, ``mask_logits``; ``mrcnn_edu.roi_heads`` maps torchvision's).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn_edu.roi_ops import roi_align

MASK_THRESHOLD = 0.5
"""Probability above which a pixel of a pasted mask belongs to the object (``masks > MASK_THRESHOLD``)."""

PASTE_PADDING = 1
"""Zero cells added around every mask before pasting (see :func:`paste_masks_in_image`)."""


# ----------------------------------------------------------------------------------------------
# The head and the predictor
# ----------------------------------------------------------------------------------------------


class MaskHead(nn.Module):
    """A stack of 3x3 conv + ReLU layers that keep the size of the pooled grid (four in Mask R-CNN).

    Args:
        in_channels (int): C, channels of the pooled features.
        layers (sequence of int): output channels of each conv layer (``(256, 256, 256, 256)``).
        dilation (int): dilation of every conv (padding = dilation, so H and W are kept).

    Parameters ``convs.<i>`` (torchvision's ``MaskRCNNHeads``: ``<i>.0``, or ``mask_fcn<i+1>`` in
    old checkpoints). Initialised as torchvision: every layer is built (PyTorch's default
    initialisation, which draws random numbers), then each weight is redrawn from
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and each bias set to 0 -- with the
    same random seed, the very same weights. (No normalisation layer: torchvision's optional
    ``norm_layer`` is left out.)
    """

    def __init__(self, in_channels: int, layers: Sequence[int] = (256, 256, 256, 256), dilation: int = 1) -> None:
        super().__init__()
        channels = [in_channels, *layers]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=dilation, dilation=dilation)
            for c_in, c_out in zip(channels[:-1], channels[1:]))
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (Tensor[P, C, m, m]) -> Tensor[P, layers[-1], m, m]."""
        for conv in self.convs:
            x = F.relu(conv(x))  # (P, C_in, m, m) -> (P, C_out, m, m)
        return x


class MaskPredictor(nn.Module):
    """Upsample 2x with a transposed conv, ReLU, then a 1x1 conv: one mask logit per class and pixel.

    Args:
        in_channels (int): channels from the head.
        dim_reduced (int): C', channels after the transposed conv (256).
        num_classes (int): NC, background included.

    Parameters ``upsample`` and ``mask_logits`` (torchvision's ``MaskRCNNPredictor``:
    ``conv5_mask``, ``mask_fcn_logits``). Initialised as torchvision: both layers built, then both
    *weights* redrawn with ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``; the biases
    keep PyTorch's default initialisation (torchvision leaves them so too).
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.upsample = nn.ConvTranspose2d(in_channels, dim_reduced, kernel_size=2, stride=2, padding=0)
        self.mask_logits = nn.Conv2d(dim_reduced, num_classes, kernel_size=1, stride=1, padding=0)
        for layer in (self.upsample, self.mask_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (Tensor[P, C, m, m]) -> mask logits Tensor[P, NC, 2m, 2m]."""
        x = F.relu(self.upsample(x))  # (P, C, m, m) -> (P, C', 2m, 2m)
        return self.mask_logits(x)  # (P, C', M, M) -> (P, NC, M, M)


# ----------------------------------------------------------------------------------------------
# Training: targets and loss
# ----------------------------------------------------------------------------------------------


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, mask_size: int) -> Tensor:
    """The mask target of every RoI: its matched gt mask, cropped to the RoI and resized to M x M.

    Args:
        gt_masks (Tensor[G, H, W]): the 0/1 masks of one image's gt objects (any real dtype).
        boxes (Tensor[P_i, 4]): ``(x1, y1, x2, y2)`` of the image's positive RoIs, in pixels.
        matched_idxs (Tensor[P_i]): the gt object of each RoI (an index into ``gt_masks``).
        mask_size (int): M (28).

    Returns:
        Tensor[P_i, M, M]: values in ``[0, 1]``, soft at the object's edges.

    It is RoIAlign (``aligned=False``, adaptive sampling, scale 1), as torchvision: each gt mask is
    a one-channel map, and the RoI's ``batch_index`` column picks its matched mask. For one RoI:
    ``project_masks_on_boxes(gt_mask[None], box[None], torch.zeros(1), 28)[0]``.
    """
    # (P_i,) -> (P_i, 1) beside (P_i, 4) -> (P_i, 5) rows (mask index, x1, y1, x2, y2)
    rois = torch.cat([matched_idxs[:, None].to(boxes.dtype), boxes], dim=1)
    # (G, H, W) -> (G, 1, H, W) -> RoIAlign -> (P_i, 1, M, M) -> (P_i, M, M)
    return roi_align(gt_masks[:, None].to(rois.dtype), rois, (mask_size, mask_size), spatial_scale=1.0)[:, 0]


def select_class_masks(pred_mask_logits: Tensor, labels: Tensor) -> Tensor:
    """The channel of each RoI's own class: Tensor[P, NC, M, M] with Tensor[P] -> Tensor[P, M, M]."""
    return pred_mask_logits[torch.arange(len(labels), device=labels.device), labels]


def mask_loss(pred_mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """``loss_mask``: binary cross-entropy per pixel, on the gt class's channel only.

    Args:
        pred_mask_logits (Tensor[P, NC, M, M]): the predictor's logits for the positive RoIs.
        labels (Tensor[P]): int64 gt class of each positive RoI.
        mask_targets (Tensor[P, M, M]): from :func:`project_masks_on_boxes`.

    Returns:
        Tensor: a scalar, the mean over all ``P * M * M`` pixels; ``0`` when P = 0 (no positive
        RoI in the batch), still connected to the graph (``pred_mask_logits.sum() * 0``, as
        torchvision), so that ``backward()`` works and gives zero gradients.
    """
    if mask_targets.numel() == 0:  # the mean of nothing would be nan
        return pred_mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(select_class_masks(pred_mask_logits, labels), mask_targets)


# ----------------------------------------------------------------------------------------------
# Inference: probabilities, and pasting them into the image
# ----------------------------------------------------------------------------------------------


def mask_probabilities(pred_mask_logits: Tensor, labels_per_image: Sequence[Tensor]) -> list[Tensor]:
    """The mask of every detection: the sigmoid of its predicted class's channel.

    Args:
        pred_mask_logits (Tensor[P, NC, M, M]): logits for the detections of all images.
        labels_per_image (list of N Tensor[P_i]): the class of each detection.

    Returns:
        list of N Tensor[P_i, 1, M, M]: probabilities in ``[0, 1]`` (torchvision's ``maskrcnn_inference``).
    """
    labels = torch.cat(list(labels_per_image))  # N x (P_i,) -> (P,)
    # (P, NC, M, M) -> (P, M, M) -> (P, 1, M, M)
    probabilities = select_class_masks(pred_mask_logits, labels).sigmoid()[:, None]
    return list(probabilities.split([len(l) for l in labels_per_image]))  # -> N x (P_i, 1, M, M)


def expand_masks(masks: Tensor, padding: int) -> tuple[Tensor, float]:
    """Surround every mask with ``padding`` cells of 0: Tensor[..., M, M] -> Tensor[..., M+2p, M+2p].

    Returns the padded masks and the factor ``(M + 2p) / M`` by which the boxes must grow so
    that the mask's original cells still cover the original box (:func:`expand_boxes`).
    """
    mask_size = masks.shape[-1]
    return F.pad(masks, (padding,) * 4), float(mask_size + 2 * padding) / mask_size


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Boxes grown by ``scale`` about their centres: Tensor[P, 4] -> Tensor[P, 4]."""
    # computed as torchvision does, operation for operation, so the truncation to whole pixels
    # in paste_masks_in_image lands on the same integers
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    # 4 x (P,) -> (P, 4)
    return torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)


def paste_mask_in_image(mask: Tensor, box: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Resize one mask to its box and place it in an empty image.

    Args:
        mask (Tensor[M, M]): probabilities (already padded by :func:`paste_masks_in_image`).
        box (Tensor[4]): int64 ``(x1, y1, x2, y2)`` in whole pixels. As in torchvision (and
            Detectron before it), ``x2`` and ``y2`` are *inclusive* pixel indices: the mask is
            resized to ``x2 - x1 + 1`` by ``y2 - y1 + 1`` pixels (at least 1 x 1).
        image_size ((int, int)): ``(H, W)``.

    Returns:
        Tensor[H, W]: the resized mask inside the box (the part within the image), 0 elsewhere.
    """
    height, width = image_size
    x1, y1, x2, y2 = (int(v) for v in box)
    box_w, box_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    # bilinear resize, half-pixel centres: (M, M) -> (1, 1, M, M) -> (1, 1, h, w) -> (h, w)
    resized = F.interpolate(mask[None, None], size=(box_h, box_w), mode="bilinear", align_corners=False)[0, 0]
    image = mask.new_zeros((height, width))
    # the part of the box inside the image, in image pixels [top, bottom) x [left, right)
    top, bottom, left, right = max(y1, 0), min(y2 + 1, height), max(x1, 0), min(x2 + 1, width)
    if bottom > top and right > left:
        image[top:bottom, left:right] = resized[top - y1:bottom - y1, left - x1:right - x1]
    return image


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int],
                         padding: int = PASTE_PADDING) -> Tensor:
    """Every ``M x M`` probability map resized into its box in the full image (torchvision's function).

    Args:
        masks (Tensor[P, 1, M, M]): mask probabilities (:func:`mask_probabilities`).
        boxes (Tensor[P, 4]): ``(x1, y1, x2, y2)`` of the detections, in the image's pixels.
        image_size ((int, int)): ``(H, W)`` of the image to paste into.
        padding (int): zero cells added around each mask first (1).

    Returns:
        Tensor[P, 1, H, W]: one full-image probability map per detection; threshold with
        ``> MASK_THRESHOLD`` for binary masks.

    The padding trick: a bilinear resize (``align_corners=False``) repeats the border cells of
    the map outwards, so an object that fills its box up to the edge would be cut off sharply at
    the box -- a hard-edged "top hat" in the shape of the box. Padding every map with a ring of
    zeros, and growing every box by the same factor ``(M + 2p) / M`` so that the original cells
    still cover the original box, lets the probabilities fall to 0 smoothly across the box edge.
    The grown boxes are then truncated to whole pixels (``int64``, towards zero).
    """
    masks, scale = expand_masks(masks, padding)
    boxes = expand_boxes(boxes, scale).to(torch.int64)  # (P, 4) whole pixels
    if len(masks) == 0:
        return masks.new_empty((0, 1, *image_size))
    # P x (H, W) -> (P, H, W) -> (P, 1, H, W)
    return torch.stack([paste_mask_in_image(m[0], b, image_size) for m, b in zip(masks, boxes)])[:, None]
