"""Tests for mrcnn_edu.matching: Matcher and BalancedPositiveNegativeSampler give torchvision's
results (the sampler with the same random state), golden examples, anchor_recall, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TorchvisionSampler
from torchvision.models.detection._utils import Matcher as TorchvisionMatcher

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.boxes import box_iou
from mrcnn_edu.matching import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, IGNORED, NEGATIVE, POSITIVE,
                                BalancedPositiveNegativeSampler, Matcher, anchor_recall, label_anchors)

# rows: 2 gt boxes, columns: 4 anchors
IOU = torch.tensor([
    [0.9, 0.5, 0.1, 0.2],
    [0.1, 0.65, 0.2, 0.25],
])


def random_boxes(n: int, g: torch.Generator, size: float = 128.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * size * 0.8
    wh = torch.rand(n, 2, generator=g) * size * 0.4 + 2
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------


def test_sentinels_have_names():
    assert (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS) == (-1, -2)
    assert Matcher.BELOW_LOW_THRESHOLD == TorchvisionMatcher.BELOW_LOW_THRESHOLD == BELOW_LOW_THRESHOLD
    assert Matcher.BETWEEN_THRESHOLDS == TorchvisionMatcher.BETWEEN_THRESHOLDS == BETWEEN_THRESHOLDS
    assert (POSITIVE, NEGATIVE, IGNORED) == (1, 0, -1)


def test_matcher_golden():
    # anchor 0: 0.9 with gt 0 -> matched to 0; anchor 1: best 0.65 (gt 1), between 0.3 and 0.7;
    # anchors 2 and 3: best 0.2 and 0.25, below 0.3 -> background
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    assert matcher(IOU).tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]
    # with low-quality matches, gt 1's best anchor (anchor 1, IoU 0.65) is matched to it as well
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    assert matcher(IOU).tolist() == [0, 1, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD]
    assert matcher(IOU).dtype == torch.int64


def test_matcher_thresholds_are_inclusive_at_the_bottom_of_each_band():
    iou = torch.tensor([[0.7, 0.3, 0.2999, 0.6999]])
    assert Matcher(0.7, 0.3)(iou).tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS]
    assert Matcher(0.5, 0.5)(iou).tolist() == [0, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, 0]


def test_low_quality_match_goes_to_the_anchors_own_best_gt():
    # both gt boxes overlap anchor 0 best; anchor 0 belongs to gt 0, its own best: gt 1 gets nothing
    iou = torch.tensor([[0.6, 0.1], [0.5, 0.0]])
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [0, BELOW_LOW_THRESHOLD]
    assert torch.equal(Matcher(0.7, 0.3, True)(iou), TorchvisionMatcher(0.7, 0.3, True)(iou))


def test_low_quality_matching_of_a_gt_box_no_anchor_touches_matches_everything():
    # torchvision's quirk, reproduced: gt 1's best IoU is 0, so every anchor with IoU 0 "ties" for
    # its best and is matched -- to its own best gt box. rpn.check_targets refuses zero-area boxes.
    iou = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ours = Matcher(0.7, 0.3, True)(iou)
    assert (ours >= 0).all()
    assert torch.equal(ours, TorchvisionMatcher(0.7, 0.3, True)(iou))


@pytest.mark.parametrize("thresholds", [(0.7, 0.3), (0.5, 0.5), (0.5, 0.4)])
@pytest.mark.parametrize("allow_low_quality_matches", [False, True])
@pytest.mark.parametrize("quantise", [False, True], ids=["float", "ties"])
def test_matcher_equals_torchvision(thresholds, allow_low_quality_matches, quantise):
    g = torch.Generator().manual_seed(0)
    generator = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    anchors = torch.cat(generator.anchors_per_level((64, 80), [(16, 20), (8, 10)]))
    for num_gt in [1, 2, 7]:
        iou = box_iou(random_boxes(num_gt, g, 64.0), anchors)
        if quantise:  # many exactly equal IoUs: ties for the best gt and for the best anchor
            iou = (iou * 20).round() / 20
        ours = Matcher(*thresholds, allow_low_quality_matches)(iou)
        theirs = TorchvisionMatcher(*thresholds, allow_low_quality_matches)(iou)
        assert torch.equal(ours, theirs)


def test_matcher_without_gt_boxes_makes_every_anchor_background():
    # a documented difference: torchvision raises for an image without gt boxes
    iou = torch.zeros(0, 5)
    assert Matcher(0.7, 0.3, True)(iou).tolist() == [BELOW_LOW_THRESHOLD] * 5
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        TorchvisionMatcher(0.7, 0.3, True)(iou)
    assert Matcher(0.7, 0.3)(torch.zeros(3, 0)).shape == (0,)


@pytest.mark.parametrize("call, message", [
    (lambda: Matcher(0.3, 0.7), r"low_threshold: expected at most high_threshold \(0.3\), got 0.7"),
    (lambda: Matcher("0.7", 0.3), r"high_threshold: expected a number, got '0.7'"),
    (lambda: Matcher(0.7, 0.3)(torch.zeros(5)), r"match_quality_matrix: expected a tensor of shape \(M, N\)"),
    (lambda: BalancedPositiveNegativeSampler(0, 0.5), r"batch_size_per_image: expected a positive integer"),
    (lambda: BalancedPositiveNegativeSampler(256, 1.5), r"positive_fraction: expected a number in \[0, 1\]"),
])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_label_anchors():
    matched_idxs = torch.tensor([2, BELOW_LOW_THRESHOLD, 0, BETWEEN_THRESHOLDS, 1])
    assert label_anchors(matched_idxs).tolist() == [POSITIVE, NEGATIVE, POSITIVE, IGNORED, POSITIVE]


# ---------------------------------------------------------------------------------------------
# BalancedPositiveNegativeSampler
# ---------------------------------------------------------------------------------------------


def test_sampler_counts():
    labels = torch.full((1000,), NEGATIVE)
    labels[:10] = POSITIVE
    labels[10:20] = IGNORED
    (positive,), (negative,) = BalancedPositiveNegativeSampler(256, 0.5)([labels])
    assert positive.dtype == torch.bool
    # only 10 positives: all of them, and 246 negatives fill the batch; never an ignored one
    assert positive.sum() == 10 and negative.sum() == 246
    assert not (positive & negative).any() and not (positive | negative)[10:20].any()
    # many positives: at most half the batch; class labels >= 1 count as positive (box head)
    labels = torch.tensor([3] * 500 + [0] * 500)
    (positive,), (negative,) = BalancedPositiveNegativeSampler(256, 0.25)([labels])
    assert positive.sum() == 64 and negative.sum() == 192
    assert not positive[500:].any() and not negative[:500].any()
    # not enough negatives either: fewer than batch_size_per_image in total
    (positive,), (negative,) = BalancedPositiveNegativeSampler(256, 0.5)([torch.tensor([1, 1, 0, -1])])
    assert positive.tolist() == [True, True, False, False] and negative.tolist() == [False, False, True, False]


def test_sampler_equals_torchvision_with_the_same_seed():
    g = torch.Generator().manual_seed(1)
    labels = [
        torch.randint(-1, 2, (1000,), generator=g).float(),  # the RPN passes float labels
        (torch.rand(700, generator=g) < 0.01).float(),  # few positives
        torch.ones(50),  # no negatives
        torch.full((300,), -1.0),  # nothing to sample
        torch.randint(-1, 5, (800,), generator=g),  # class labels, as in the box head
    ]
    for batch_size, fraction in [(256, 0.5), (512, 0.25), (16, 1.0)]:
        torch.manual_seed(42)
        ours = BalancedPositiveNegativeSampler(batch_size, fraction)(labels)
        after_ours = torch.rand(3)
        torch.manual_seed(42)
        theirs = TorchvisionSampler(batch_size, fraction)(labels)
        after_theirs = torch.rand(3)
        for ours_masks, theirs_masks in zip(ours, theirs):
            for ours_mask, theirs_mask in zip(ours_masks, theirs_masks):
                assert theirs_mask.dtype == torch.uint8 and ours_mask.dtype == torch.bool
                assert torch.equal(ours_mask, theirs_mask.bool())
        # the global generator was used in the same way: the same numbers come next
        assert torch.equal(after_ours, after_theirs)


def test_sampler_can_use_its_own_generator():
    labels = [torch.randint(-1, 2, (500,), generator=torch.Generator().manual_seed(2))]
    sampler = BalancedPositiveNegativeSampler(64, 0.5)
    first = sampler(labels, generator=torch.Generator().manual_seed(3))
    second = sampler(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0][0], second[0][0]) and torch.equal(first[1][0], second[1][0])


# ---------------------------------------------------------------------------------------------
# anchor_recall
# ---------------------------------------------------------------------------------------------


def test_anchor_recall_golden():
    anchors = torch.tensor([[0.0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64]])
    exact = torch.tensor([[0.0, 0, 32, 32], [32, 0, 64, 32]])
    assert anchor_recall(exact, anchors) == 1.0
    # a 6 x 6 box inside anchor 2: IoU 36/1024, far below 0.7 -- positive only as a low-quality match
    small = torch.tensor([[0.0, 0, 32, 32], [10, 40, 16, 46]])
    assert anchor_recall(small, anchors, allow_low_quality_matches=False) == 0.5
    assert anchor_recall(small, anchors, allow_low_quality_matches=True) == 1.0
    # two small boxes whose best anchor is the same: the anchor goes to one of them only
    crowded = torch.tensor([[2.0, 2, 12, 12], [14, 14, 20, 20]])
    assert anchor_recall(crowded, anchors) == 0.5
    assert math.isnan(anchor_recall(torch.zeros(0, 4), anchors))


def test_anchor_recall_small_tanks_need_small_anchors():
    # 16-pixel tanks on a 128 x 128 tile: torchvision's 32-pixel p2 anchors never reach IoU 0.7
    # (a 16 x 16 box inside a 32 x 32 anchor has IoU 0.25 at best); 16-pixel anchors do, where
    # the tank sits close enough to an anchor centre, and at IoU 0.5 nearly always
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(50, 2, generator=g) * 104 + 4
    tanks = torch.cat([xy, xy + 16], dim=1)
    grids = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    default = torch.cat(AnchorGenerator().anchors_per_level((128, 128), grids))
    small = torch.cat(AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
                      .anchors_per_level((128, 128), grids))
    assert anchor_recall(tanks, default, allow_low_quality_matches=False) == 0.0
    assert 0.1 < anchor_recall(tanks, small, allow_low_quality_matches=False) < 0.5
    assert anchor_recall(tanks, small, 0.5, 0.3, allow_low_quality_matches=False) > 0.8
    # with the RPN's low-quality matches nearly every tank gets its best anchor; not all of them:
    # neighbouring tanks can share one best anchor, which goes to one of them only
    assert 0.9 < anchor_recall(tanks, default) < 1.0
