"""Matching anchors to ground-truth boxes, and sampling a balanced training batch of them.

Taught in: ``notebooks/02_anchors_and_rpn.ipynb`` (the box head of ``notebooks/05_box_head.ipynb``
reuses both classes for its proposals).

Shape shorthand used in this module:
    M  ground-truth boxes of one image
    N  anchors (or proposals) of one image
    P  positives, of one image

To train the RPN, every anchor needs a target: "object" (and which box it should regress to),
"background", or "don't care". :class:`Matcher` decides by IoU:

* IoU with the best-overlapping gt box ``>= high_threshold`` (0.7): *matched* to that gt box;
* IoU ``< low_threshold`` (0.3) with every gt box: ``BELOW_LOW_THRESHOLD`` -- background;
* in between: ``BETWEEN_THRESHOLDS`` -- ambiguous, ignored by the loss;
* with ``allow_low_quality_matches``: also the anchor(s) that overlap a gt box best, even below
  0.7, so that a box no anchor fits well still gets a positive anchor.

:func:`label_anchors` turns these matches into labels ``POSITIVE`` / ``NEGATIVE`` / ``IGNORED``,
and :class:`BalancedPositiveNegativeSampler` picks a few hundred of them per image, at most half
positive: an image has ~100,000 anchors and a handful of objects, and training on all of them
would teach mostly "background".

Both classes give torchvision's results (``torchvision.models.detection._utils.Matcher`` and
``BalancedPositiveNegativeSampler``; checked in ``tests/test_matching.py``), with two documented
differences: our :class:`Matcher` accepts an image without ground-truth boxes (every anchor is
background) where torchvision's raises, and our sampler returns ``bool`` masks where
torchvision's returns ``uint8`` masks with the same ones.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from mrcnn_edu.boxes import box_iou

# What Matcher returns for an anchor that is not matched to a gt box (matches are indices >= 0).
BELOW_LOW_THRESHOLD = -1
"""Best IoU below ``low_threshold``: background."""
BETWEEN_THRESHOLDS = -2
"""Best IoU in ``[low_threshold, high_threshold)``: ambiguous, ignored in training."""

# Training labels of anchors, what the sampler and the objectness loss use.
POSITIVE = 1
"""An object: the objectness target is 1 and the box regressor learns the matched gt box."""
NEGATIVE = 0
"""Background: the objectness target is 0, no box regression."""
IGNORED = -1
"""Neither: never sampled, so it contributes to no loss."""


class Matcher:
    """Match each anchor (or proposal) to at most one ground-truth box, by IoU.

    Args:
        high_threshold (float): an IoU ``>= high_threshold`` with its best gt box makes a match.
        low_threshold (float): an IoU ``< low_threshold`` with every gt box makes background;
            ``low_threshold <= high_threshold``.
        allow_low_quality_matches (bool): also match, for every gt box, the anchor(s) with the
            highest IoU with it (all of them if several tie), whatever that IoU is.

    A subtlety of ``allow_low_quality_matches``, copied from torchvision (and Detectron): such an
    anchor is matched to *its own* best gt box, which may be another one than the gt box that
    selected it -- so two gt boxes sharing one best anchor leave one of them without a match
    (see :func:`anchor_recall`). And a gt box whose best IoU is 0 (a box no anchor touches)
    selects every anchor with IoU 0: all of them become matches. Zero-area gt boxes do that;
    ``mrcnn_edu.rpn`` refuses them for this reason, as torchvision's ``GeneralizedRCNN`` does.
    """

    BELOW_LOW_THRESHOLD = BELOW_LOW_THRESHOLD
    BETWEEN_THRESHOLDS = BETWEEN_THRESHOLDS

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False) -> None:
        for name, value in [("high_threshold", high_threshold), ("low_threshold", low_threshold)]:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}: expected a number, got {value!r}")
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold: expected at most high_threshold ({high_threshold}), "
                             f"got {low_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __repr__(self) -> str:
        return (f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
                f"allow_low_quality_matches={self.allow_low_quality_matches})")

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """Match every column (anchor) of ``match_quality_matrix`` to a row (gt box) or a sentinel.

        Args:
            match_quality_matrix (Tensor[M, N]): ``iou[i, j]`` = IoU of gt box ``i`` and anchor
                ``j`` (``box_iou(gt_boxes, anchors)``).

        Returns:
            Tensor[N]: int64; for anchor ``j`` the index of its gt box in ``[0, M)``, or
            ``BELOW_LOW_THRESHOLD`` (-1), or ``BETWEEN_THRESHOLDS`` (-2). With no gt box
            (M = 0) every anchor is ``BELOW_LOW_THRESHOLD``.
        """
        if not isinstance(match_quality_matrix, Tensor) or match_quality_matrix.dim() != 2:
            shape = tuple(match_quality_matrix.shape) if isinstance(match_quality_matrix, Tensor) \
                else type(match_quality_matrix).__name__
            raise ValueError(f"match_quality_matrix: expected a tensor of shape (M, N) = "
                             f"(gt boxes, anchors), got {shape}")
        num_gt, num_anchors = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0 or num_anchors == 0:  # torchvision raises here; nothing to match is all background
            return torch.full((num_anchors,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=device)

        # the best gt box of every anchor: (M, N) -> (N,) values and (N,) gt indices
        best_iou, best_gt = match_quality_matrix.max(dim=0)
        matches = best_gt.clone()
        matches[best_iou < self.low_threshold] = BELOW_LOW_THRESHOLD
        matches[(best_iou >= self.low_threshold) & (best_iou < self.high_threshold)] = BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            # the best IoU of every gt box: (M, N) -> (M,)
            best_iou_per_gt = match_quality_matrix.max(dim=1).values
            # every (gt, anchor) pair reaching its gt's best IoU, ties included: (M, N) -> 2 x (pairs,)
            _, anchors_to_match = torch.where(match_quality_matrix == best_iou_per_gt[:, None])
            matches[anchors_to_match] = best_gt[anchors_to_match]
        return matches


def label_anchors(matched_idxs: Tensor) -> Tensor:
    """Training labels from matches: ``POSITIVE`` (1), ``NEGATIVE`` (0) or ``IGNORED`` (-1).

    Args:
        matched_idxs (Tensor[N]): what :class:`Matcher` returns.

    Returns:
        Tensor[N]: int64; ``labels == POSITIVE``, ``== NEGATIVE`` and ``== IGNORED`` are the
        three groups to draw in three colours.
    """
    labels = torch.full_like(matched_idxs, IGNORED, dtype=torch.int64)
    labels[matched_idxs >= 0] = POSITIVE
    labels[matched_idxs == BELOW_LOW_THRESHOLD] = NEGATIVE
    return labels


class BalancedPositiveNegativeSampler:
    """Pick ``batch_size_per_image`` labelled examples per image, at most a fraction positive.

    Per image: ``min(#positives, int(batch_size_per_image * positive_fraction))`` positives at
    random, then negatives at random to fill the batch (fewer if there are not enough).

    Args:
        batch_size_per_image (int): examples per image (256 for the RPN, 512 for the box head).
        positive_fraction (float): largest share of positives (0.5 for the RPN, 0.25 for the
            box head).

    Randomness: per image, in image order, one ``torch.randperm`` over the positives and then one
    over the negatives -- exactly torchvision's calls in torchvision's order. With the same
    ``torch.manual_seed`` both samplers therefore draw the same examples and leave the global
    random generator in the same state (``tests/test_matching.py``).
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, numbers.Integral) \
                or batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image: expected a positive integer, got {batch_size_per_image!r}")
        if isinstance(positive_fraction, bool) or not isinstance(positive_fraction, numbers.Real) \
                or not 0 <= positive_fraction <= 1:
            raise ValueError(f"positive_fraction: expected a number in [0, 1], got {positive_fraction!r}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = positive_fraction

    def __repr__(self) -> str:
        return (f"BalancedPositiveNegativeSampler(batch_size_per_image={self.batch_size_per_image}, "
                f"positive_fraction={self.positive_fraction})")

    def __call__(self, labels: list[Tensor],
                 generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Sample positives and negatives in every image.

        Args:
            labels (list of Tensor[N_i]): one integer or float tensor per image; ``>= 1``
                positive (``POSITIVE``, or a class label in the box head), ``0`` negative,
                ``< 0`` ignored.
            generator (torch.Generator, optional): where the random permutations come from;
                ``None`` (default, as torchvision) uses PyTorch's global generator.

        Returns:
            (list of Tensor[N_i], list of Tensor[N_i]): bool masks of the sampled positives and of
            the sampled negatives, one per image (torchvision returns the same masks as uint8).
        """
        positive_masks, negative_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]  # indices of all positives
            negative = torch.where(labels_per_image == 0)[0]  # indices of all negatives
            num_positive = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_negative = min(negative.numel(), self.batch_size_per_image - num_positive)

            # a random subset = the first elements of a random permutation
            picked_positive = positive[torch.randperm(positive.numel(), generator=generator,
                                                      device=positive.device)[:num_positive]]
            picked_negative = negative[torch.randperm(negative.numel(), generator=generator,
                                                      device=negative.device)[:num_negative]]

            positive_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            negative_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            positive_mask[picked_positive] = True
            negative_mask[picked_negative] = True
            positive_masks.append(positive_mask)
            negative_masks.append(negative_mask)
        return positive_masks, negative_masks


def anchor_recall(gt_boxes: Tensor, anchors: Tensor, high_threshold: float = 0.7,
                  low_threshold: float = 0.3, allow_low_quality_matches: bool = True) -> float:
    """The fraction of gt boxes that at least one anchor is matched to (would be positive for).

    A gt box no anchor matches teaches the RPN nothing about that object: a quick test of
    whether anchor sizes and ratios suit a data set (small oil tanks against 32-pixel anchors).

    Args:
        gt_boxes (Tensor[M, 4]): ``(x1, y1, x2, y2)`` of one image.
        anchors (Tensor[N, 4]): ``(x1, y1, x2, y2)``, e.g. ``torch.cat(anchors_per_level)``.
        high_threshold, low_threshold, allow_low_quality_matches: as for :class:`Matcher`
            (the RPN's defaults). With low-quality matches, recall is below 1 only when gt boxes
            compete for the same best anchor.

    Returns:
        float in ``[0, 1]``; ``nan`` when there are no gt boxes (nothing to recall).
    """
    if gt_boxes.shape[0] == 0:
        return float("nan")
    matcher = Matcher(high_threshold, low_threshold, allow_low_quality_matches)
    matched_idxs = matcher(box_iou(gt_boxes, anchors.to(gt_boxes.dtype)))  # (N,)
    matched_gt = torch.unique(matched_idxs[matched_idxs >= 0])  # the gt boxes with a match
    return matched_gt.numel() / gt_boxes.shape[0]
