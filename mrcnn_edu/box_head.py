"""The box head (Fast R-CNN): classify every proposal and refine its box, one box per class.

Taught in: ``notebooks/05_box_head.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    C     channels of the pooled features
    h, w  size of the pooled grid (7 x 7)
    K     proposals of one image (from the RPN; in training, plus the gt boxes)
    M     ground-truth boxes of one image
    R     RoIs over the whole batch: all proposals at inference, the sampled ones in training
    R_i   RoIs of image i (at most ``batch_size_per_image`` = 512 in training)
    F     features per RoI after the head (``representation_size``, 1024)
    NC    classes, background included (``num_classes``; class 0 is background)
    D     detections of one image (at most ``detections_per_img``)

The RPN proposes a thousand or two class-agnostic boxes per image. The box head looks at each
of them once more, through RoIAlign (``mrcnn_edu.roi_ops``): a 7 x 7 grid of features per box.

* :class:`TwoMLPHead` (the *head*) turns each RoI's ``C x 7 x 7`` features into ``F`` numbers;
* :class:`BoxPredictor` (the *predictor*) turns them into ``NC`` class logits and ``NC x 4`` box
  deltas: one refined box per class, each relative to the RoI (:class:`~mrcnn_edu.boxes.BoxCoder`
  with weights ``(10, 10, 5, 5)``: proposals are already close, so their deltas are small and
  get scaled up to roughly unit variance). Swapping only the predictor changes the classes.

**Training** (:func:`sample_proposals`, :func:`fastrcnn_loss`): add the gt boxes to the
proposals (so every object has at least one perfect RoI), match every proposal to a gt box by
IoU (``>= 0.5``: that box's class; ``< 0.5``: background), sample 512 RoIs per image with at
most 25 % positives, and encode the deltas that would move each positive RoI onto its gt box.
``loss_classifier`` is the cross-entropy over the sampled RoIs; ``loss_box_reg`` is a smooth L1
(``beta = 1/9``) between the deltas predicted *for the gt class* and the target deltas, summed
over the positives and divided by the number of sampled RoIs.

**Inference** (:func:`postprocess_detections`): softmax over the classes, decode every class's
box, clip to the image, drop the background column, then turn every (RoI, class) pair with a
probability above ``score_thresh`` into a candidate detection; drop tiny boxes, run NMS within
each class (``mrcnn_edu.nms.batched_nms``), keep the ``detections_per_img`` best.

Everything gives torchvision's numbers (``roi_heads.py``, ``faster_rcnn.py`` in
``torchvision/models/detection``; ``tests/test_box_head.py`` and ``tests/test_roi_heads.py``),
the random sampling included: with the same ``torch.manual_seed``, the same RoIs. Differences
in form: parameters have readable names (``fc1``/``fc2``, ``class_logits``/``box_deltas``
instead of ``fc6``/``fc7``, ``cls_score``/``bbox_pred``; ``mrcnn_edu.roi_heads`` maps them);
functions take concatenated tensors instead of per-image lists where the math is per RoI;
:class:`SampledRoIs` keeps the matcher's sentinel (-1) for background RoIs where torchvision
clamps it to 0, and gives background RoIs target deltas of 0 where torchvision encodes them
against gt box 0 (no loss ever reads them).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn_edu.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from mrcnn_edu.matching import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORED,
                                BalancedPositiveNegativeSampler, Matcher)
from mrcnn_edu.nms import batched_nms
from mrcnn_edu.rpn import SMOOTH_L1_BETA

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
"""``(wx, wy, ww, wh)`` of the box head's :class:`BoxCoder`: RoIs are already near their objects,
so their deltas are small; these weights scale them up to roughly unit variance."""

MIN_DETECTION_SIZE = 1e-2
"""Detections narrower or lower than this (in pixels, after clipping) are dropped (torchvision's value)."""


# ----------------------------------------------------------------------------------------------
# The head and the predictor
# ----------------------------------------------------------------------------------------------


class TwoMLPHead(nn.Module):
    """Two fully connected layers with ReLU: a RoI's pooled features -> one feature vector.

    Args:
        in_channels (int): ``C * h * w``, the pooled features of one RoI flattened
            (256 * 7 * 7 in Mask R-CNN).
        representation_size (int): F, the width of both layers (1024).

    Parameters ``fc1``, ``fc2`` (torchvision: ``fc6``, ``fc7``, named after the VGG layers they
    replaced). Both use PyTorch's default ``nn.Linear`` initialisation, as torchvision: with the
    same random seed, the very same weights.
    """

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels, representation_size)
        self.fc2 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (Tensor[R, C, h, w]) -> Tensor[R, F]."""
        x = x.flatten(start_dim=1)  # (R, C, h, w) -> (R, C*h*w)
        x = F.relu(self.fc1(x))  # (R, F)
        return F.relu(self.fc2(x))  # (R, F)


class BoxPredictor(nn.Module):
    """Two linear layers side by side: class logits and class-specific box deltas per RoI.

    Args:
        in_channels (int): F, the features per RoI from the head.
        num_classes (int): NC, background included.

    Parameters ``class_logits``, ``box_deltas`` (torchvision's ``FastRCNNPredictor``:
    ``cls_score``, ``bbox_pred``), default ``nn.Linear`` initialisation as torchvision.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_logits = nn.Linear(in_channels, num_classes)
        self.box_deltas = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (Tensor[R, F], or Tensor[R, F, 1, 1] from a conv head) -> class logits
        (Tensor[R, NC]) and box deltas (Tensor[R, NC*4]: entries ``4*c .. 4*c+3`` are class c's)."""
        x = x.flatten(start_dim=1)  # (R, F, 1, 1) -> (R, F); (R, F) unchanged
        return self.class_logits(x), self.box_deltas(x)


# ----------------------------------------------------------------------------------------------
# Training: which RoIs, with which targets
# ----------------------------------------------------------------------------------------------


class SampledRoIs(NamedTuple):
    """The training RoIs of one image and their targets (what :func:`sample_proposals` returns).

    Draw ``proposals[labels > 0]`` (positives, coloured by class) and ``proposals[labels == 0]``
    (background) to see what the box head learns from.
    """

    proposals: Tensor
    """Tensor[R_i, 4]: ``(x1, y1, x2, y2)`` of the sampled RoIs, in increasing index order among
    the candidates (the proposals, then the gt boxes)."""
    labels: Tensor
    """Tensor[R_i] int64: the class to predict; 0 for background."""
    matched_idxs: Tensor
    """Tensor[R_i] int64: the matched gt box of each positive; ``BELOW_LOW_THRESHOLD`` (-1) for background."""
    regression_targets: Tensor
    """Tensor[R_i, 4]: the deltas that move each positive onto its gt box; 0 for background."""


def add_gt_proposals(proposals: Tensor, gt_boxes: Tensor) -> Tensor:
    """The proposals of one image followed by its gt boxes: Tensor[K, 4] and Tensor[M, 4] -> Tensor[K+M, 4].

    Early in training the RPN proposes poorly; the gt boxes guarantee every object a RoI with IoU 1.
    """
    return torch.cat([proposals, gt_boxes.to(proposals.dtype)])  # (K, 4) and (M, 4) -> (K+M, 4)


def assign_targets_to_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                                proposal_matcher: Matcher) -> tuple[Tensor, Tensor]:
    """Match the proposals of one image to its gt boxes, and give each one a class label.

    Args:
        proposals (Tensor[K, 4]): ``(x1, y1, x2, y2)``.
        gt_boxes (Tensor[M, 4]): ``(x1, y1, x2, y2)``, same dtype; M may be 0.
        gt_labels (Tensor[M]): int64 class of each gt box (>= 1).
        proposal_matcher (Matcher): decides by IoU (``Matcher(0.5, 0.5)`` in Mask R-CNN, no
            low-quality matches: a RoI that overlaps its object poorly is not a positive).

    Returns:
        (Tensor[K], Tensor[K]): int64 matches (a gt index, ``BELOW_LOW_THRESHOLD`` or
        ``BETWEEN_THRESHOLDS``) and labels: the matched gt box's class, 0 (background) below
        the low threshold, ``IGNORED`` (-1) in between. Without gt boxes every proposal is background.
    """
    matched_idxs = proposal_matcher(box_iou(gt_boxes, proposals))  # (M, K) IoUs -> (K,)
    labels = torch.zeros_like(matched_idxs)  # (K,) background unless matched
    is_matched = matched_idxs >= 0
    labels[is_matched] = gt_labels[matched_idxs[is_matched]].to(torch.int64)
    labels[matched_idxs == BETWEEN_THRESHOLDS] = IGNORED
    return matched_idxs, labels


def sample_proposals(proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, proposal_matcher: Matcher,
                     fg_bg_sampler: BalancedPositiveNegativeSampler, box_coder: BoxCoder,
                     generator: torch.Generator | None = None) -> SampledRoIs:
    """The training RoIs of one image: add the gt boxes, match, sample, encode the targets.

    Args:
        proposals (Tensor[K, 4]): the RPN's proposals of the image, ``(x1, y1, x2, y2)``.
        gt_boxes (Tensor[M, 4]): its gt boxes (M may be 0: then every RoI is background).
        gt_labels (Tensor[M]): int64 class of each gt box.
        proposal_matcher (Matcher): see :func:`assign_targets_to_proposals`.
        fg_bg_sampler (BalancedPositiveNegativeSampler): 512 RoIs, at most 25 % positive.
        box_coder (BoxCoder): with :data:`BOX_REG_WEIGHTS`.
        generator (torch.Generator, optional): for the sampler; ``None`` (as in the model) draws
            from PyTorch's global generator, exactly as torchvision does (same seed, same RoIs).

    Returns:
        SampledRoIs: ``proposals``, ``labels``, ``matched_idxs``, ``regression_targets``.
    """
    gt_boxes = gt_boxes.to(proposals.dtype)
    candidates = add_gt_proposals(proposals, gt_boxes)  # (K+M, 4)
    matched_idxs, labels = assign_targets_to_proposals(candidates, gt_boxes, gt_labels, proposal_matcher)
    (positive,), (negative,) = fg_bg_sampler([labels], generator=generator)  # (K+M,) bool masks
    sampled = torch.where(positive | negative)[0]  # (R_i,) in index order, as torchvision
    rois, labels, matched_idxs = candidates[sampled], labels[sampled], matched_idxs[sampled]

    is_positive = labels > 0
    regression_targets = torch.zeros_like(rois)  # (R_i, 4); background RoIs regress nothing
    regression_targets[is_positive] = box_coder.encode(gt_boxes[matched_idxs[is_positive]], rois[is_positive])
    matched_idxs[~is_positive] = BELOW_LOW_THRESHOLD  # sampled RoIs are positive or background
    return SampledRoIs(rois, labels, matched_idxs, regression_targets)


def fastrcnn_loss(pred_class_logits: Tensor, pred_box_deltas: Tensor, labels: Tensor,
                  regression_targets: Tensor) -> tuple[Tensor, Tensor]:
    """``loss_classifier`` and ``loss_box_reg`` over the sampled RoIs of the whole batch.

    Args:
        pred_class_logits (Tensor[R, NC]): the predictor's logits.
        pred_box_deltas (Tensor[R, NC*4]): the predictor's deltas, four per class.
        labels (Tensor[R]): int64 target class of every RoI, 0 for background
            (``torch.cat`` of :attr:`SampledRoIs.labels` over the images).
        regression_targets (Tensor[R, 4]): target deltas (read for the positives only).

    Returns:
        (Tensor, Tensor): scalars. ``loss_classifier``: cross-entropy averaged over the R RoIs.
        ``loss_box_reg``: smooth L1 (``beta = 1/9``) between the deltas predicted for each
        positive's *own* class and its target deltas, summed and divided by R (not by the
        number of positives, as torchvision). With no RoI at all (no proposals and no gt
        boxes in the batch) both are 0 and still backpropagate, where torchvision gives nan.
    """
    num_rois, num_classes = pred_class_logits.shape
    if num_rois == 0:
        zero = pred_class_logits.sum() * 0 + pred_box_deltas.sum() * 0
        return zero, zero.clone()
    loss_classifier = F.cross_entropy(pred_class_logits, labels)

    positive = torch.where(labels > 0)[0]  # (P,)
    # (R, NC*4) -> (R, NC, 4); then the row of each positive and the column of its class -> (P, 4)
    pred_deltas_of_gt_class = pred_box_deltas.reshape(num_rois, num_classes, 4)[positive, labels[positive]]
    loss_box_reg = F.smooth_l1_loss(pred_deltas_of_gt_class, regression_targets[positive],
                                    beta=SMOOTH_L1_BETA, reduction="sum") / num_rois
    return loss_classifier, loss_box_reg


# ----------------------------------------------------------------------------------------------
# Inference: from per-class scores and boxes to a few detections per image
# ----------------------------------------------------------------------------------------------


class Detections(NamedTuple):
    """The detections of one image (what :func:`postprocess_detections` returns per image)."""

    boxes: Tensor
    """Tensor[D, 4]: ``(x1, y1, x2, y2)``, clipped to the image."""
    scores: Tensor
    """Tensor[D]: the class probability of each detection, best first."""
    labels: Tensor
    """Tensor[D] int64: the class of each detection (>= 1)."""
    counts: dict[str, int]
    """How many candidates were left after each step: ``candidates`` (every RoI x every
    non-background class), ``above_score_thresh``, ``large_enough``, ``after_nms``,
    ``top_detections`` (= D)."""


def postprocess_detections(pred_class_logits: Tensor, pred_box_deltas: Tensor, proposals: Sequence[Tensor],
                           image_sizes: Sequence[tuple[int, int]], box_coder: BoxCoder,
                           score_thresh: float = 0.05, nms_thresh: float = 0.5,
                           detections_per_img: int = 100) -> list[Detections]:
    """The predictor's outputs for every proposal -> the detections of every image.

    Args:
        pred_class_logits (Tensor[R, NC]): logits of all proposals of the batch, image by image.
        pred_box_deltas (Tensor[R, NC*4]): their deltas.
        proposals (list of N Tensor[K_i, 4]): the RoIs the predictions were made for.
        image_sizes (list of N (int, int)): ``(height, width)`` to clip to.
        box_coder (BoxCoder): with :data:`BOX_REG_WEIGHTS`.
        score_thresh (float): a (RoI, class) pair needs a probability ``>`` this.
        nms_thresh (float): IoU above which NMS suppresses a lower-scored box of the same class.
        detections_per_img (int): keep at most this many per image.

    Returns:
        list of N :class:`Detections` (boxes, scores, labels, counts after each step), equal to
        torchvision's ``RoIHeads.postprocess_detections``.
    """
    num_rois, num_classes = pred_class_logits.shape
    all_proposals = torch.cat(list(proposals))  # N x (K_i, 4) -> (R, 4)
    # one box per class: (R, NC*4) -> (R, NC, 4) deltas with (R, 1, 4) proposals -> (R, NC, 4) boxes
    pred_boxes = box_coder.decode(pred_box_deltas.reshape(num_rois, num_classes, 4), all_proposals[:, None, :])
    pred_scores = F.softmax(pred_class_logits, dim=-1)  # (R, NC), every row sums to 1
    boxes_per_image = [len(p) for p in proposals]
    # back to images: (R, NC) -> N x (K_i, NC) and (R, NC, 4) -> N x (K_i, NC, 4)
    return [detections_in_image(scores, boxes, image_size, score_thresh, nms_thresh, detections_per_img)
            for scores, boxes, image_size in zip(pred_scores.split(boxes_per_image),
                                                 pred_boxes.split(boxes_per_image), image_sizes)]


def detections_in_image(pred_scores: Tensor, pred_boxes: Tensor, image_size: tuple[int, int],
                        score_thresh: float, nms_thresh: float, detections_per_img: int) -> Detections:
    """The detections of one image from its per-class probabilities and boxes.

    Args:
        pred_scores (Tensor[K, NC]): class probabilities (softmax) of the image's K RoIs.
        pred_boxes (Tensor[K, NC, 4]): one decoded box per RoI and class.
        image_size ((int, int)): ``(height, width)``.
        score_thresh, nms_thresh, detections_per_img: as in :func:`postprocess_detections`.

    Returns:
        Detections, with the number of candidates left after each step in ``counts``.
    """
    num_classes = pred_scores.shape[1]
    boxes = clip_boxes_to_image(pred_boxes, image_size)  # (K, NC, 4)
    # the class of every (RoI, class) pair: (NC,) -> (1, NC) -> (K, NC)
    labels = torch.arange(num_classes, device=pred_scores.device).view(1, -1).expand_as(pred_scores)
    # drop the background column, and make every (RoI, class) pair a candidate of its own:
    # (K, NC-1, 4) -> (K*(NC-1), 4) and (K, NC-1) -> (K*(NC-1),)
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = pred_scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)
    counts = {"candidates": len(scores)}

    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    counts["above_score_thresh"] = len(keep)

    keep = remove_small_boxes(boxes, MIN_DETECTION_SIZE)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    counts["large_enough"] = len(keep)

    keep = batched_nms(boxes, scores, labels, nms_thresh)  # NMS within each class, best first
    counts["after_nms"] = len(keep)
    keep = keep[:detections_per_img]
    counts["top_detections"] = len(keep)
    return Detections(boxes[keep], scores[keep], labels[keep], counts)
