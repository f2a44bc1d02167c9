"""Tests for mrcnn_edu.box_head: head and predictor, proposal sampling, Fast R-CNN loss and
post-processing, each against torchvision's pieces, plus hand-worked golden examples."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.box_head import (BOX_REG_WEIGHTS, BoxPredictor, TwoMLPHead, assign_targets_to_proposals,
                                detections_in_image, fastrcnn_loss, postprocess_detections, sample_proposals)
from mrcnn_edu.boxes import BoxCoder
from mrcnn_edu.matching import BELOW_LOW_THRESHOLD, IGNORED, BalancedPositiveNegativeSampler, Matcher
from mrcnn_edu.roi_heads import torchvision_roi_heads_key_map

CLOSE = dict(rtol=0, atol=1e-5)
IMAGE_SIZES = [(96, 128), (128, 100)]


def torchvision_roi_heads(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                          score_thresh=0.05, nms_thresh=0.5, detections_per_img=100):
    """torchvision's RoIHeads for its methods (matching, sampling, post-processing); no modules needed."""
    return tv_roi_heads.RoIHeads(None, None, None, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                                 positive_fraction, None, score_thresh, nms_thresh, detections_per_img)


def ours_for(theirs):
    """Our matcher, sampler and box coder with the settings of torchvision's RoIHeads ``theirs``."""
    return (Matcher(theirs.proposal_matcher.high_threshold, theirs.proposal_matcher.low_threshold),
            BalancedPositiveNegativeSampler(theirs.fg_bg_sampler.batch_size_per_image,
                                            theirs.fg_bg_sampler.positive_fraction),
            BoxCoder(BOX_REG_WEIGHTS))


def random_boxes(n, height, width, g, min_size=4.0):
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width / 2, height / 2]) + min_size
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - wh)
    return torch.cat([xy, xy + wh], dim=1)


def make_proposals_and_targets(seed=0, num_gt=(4, 3), num_random=150, jittered_per_gt=40, num_classes=4):
    """Per image: gt boxes and labels; proposals = random boxes + boxes jittered around the gt."""
    g = torch.Generator().manual_seed(seed)
    proposals, gt_boxes, gt_labels = [], [], []
    for (h, w), n in zip(IMAGE_SIZES, num_gt):
        gt = random_boxes(n, h, w, g, min_size=10.0)
        jittered = gt.repeat(jittered_per_gt, 1) + torch.randn(n * jittered_per_gt, 4, generator=g) * 3
        proposals.append(torch.cat([random_boxes(num_random, h, w, g), jittered]))
        gt_boxes.append(gt)
        gt_labels.append(torch.randint(1, num_classes, (n,), generator=g))
    return proposals, gt_boxes, gt_labels


# ---------------------------------------------------------------------------------------------
# Head and predictor
# ---------------------------------------------------------------------------------------------


def test_head_and_predictor_start_from_torchvisions_weights_and_compute_the_same():
    torch.manual_seed(0)
    theirs_head, theirs_predictor = tv_faster_rcnn.TwoMLPHead(8 * 7 * 7, 32), tv_faster_rcnn.FastRCNNPredictor(32, 5)
    torch.manual_seed(0)
    ours_head, ours_predictor = TwoMLPHead(8 * 7 * 7, 32), BoxPredictor(32, 5)
    for prefix, ours, theirs in [("box_head.", ours_head, theirs_head),
                                 ("box_predictor.", ours_predictor, theirs_predictor)]:
        ours_weights = ours.state_dict()
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours_weights[torchvision_roi_heads_key_map(prefix + key).removeprefix(prefix)], value)
    x = torch.randn(6, 8, 7, 7)
    features = ours_head(x)
    assert features.shape == (6, 32)
    assert_close(features, theirs_head(x), rtol=0, atol=0)
    logits, deltas = ours_predictor(features)
    assert logits.shape == (6, 5) and deltas.shape == (6, 20)
    for o, t in zip((logits, deltas), theirs_predictor(features)):
        assert_close(o, t, rtol=0, atol=0)
    # a conv head's (R, F, 1, 1) output is flattened first
    for o, t in zip(ours_predictor(features[:, :, None, None]), (logits, deltas)):
        assert torch.equal(o, t)


# ---------------------------------------------------------------------------------------------
# Matching and sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thresholds", [(0.5, 0.5), (0.5, 0.3)], ids=["mask_rcnn", "with_ignored"])
def test_assign_targets_equals_torchvision(thresholds):
    theirs = torchvision_roi_heads(*thresholds)
    matcher, _, _ = ours_for(theirs)
    proposals, gt_boxes, gt_labels = make_proposals_and_targets()
    theirs_matched, theirs_labels = theirs.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
    for p, gt, gt_l, theirs_m, theirs_l in zip(proposals, gt_boxes, gt_labels, theirs_matched, theirs_labels):
        matched, labels = assign_targets_to_proposals(p, gt, gt_l, matcher)
        assert torch.equal(labels, theirs_l)
        assert torch.equal(matched.clamp(min=0), theirs_m)  # torchvision clamps the sentinels to 0
        assert (labels > 0).sum() > 0 and (labels == 0).sum() > 0
        assert ((labels == IGNORED).sum() > 0) == (thresholds[1] < thresholds[0])


def test_an_image_without_gt_boxes_is_all_background():
    p = random_boxes(20, 64, 64, torch.Generator().manual_seed(0))
    matched, labels = assign_targets_to_proposals(p, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                                  Matcher(0.5, 0.5))
    assert (labels == 0).all() and (matched == BELOW_LOW_THRESHOLD).all()
    _, theirs_labels = torchvision_roi_heads().assign_targets_to_proposals(
        [p], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)])
    assert torch.equal(labels, theirs_labels[0])


def test_sampling_equals_torchvision_with_the_same_seed():
    theirs = torchvision_roi_heads(batch_size_per_image=128)
    matcher, sampler, coder = ours_for(theirs)
    proposals, gt_boxes, gt_labels = make_proposals_and_targets()
    targets = [{"boxes": b, "labels": l} for b, l in zip(gt_boxes, gt_labels)]
    torch.manual_seed(7)
    ours = [sample_proposals(p, gt, l, matcher, sampler, coder) for p, gt, l in zip(proposals, gt_boxes, gt_labels)]
    after_ours = torch.rand(3)
    torch.manual_seed(7)
    theirs_rois, theirs_matched, theirs_labels, theirs_targets = theirs.select_training_samples(proposals, targets)
    assert torch.equal(after_ours, torch.rand(3))  # the global generator was used the same way
    for o, rois, matched, labels, deltas in zip(ours, theirs_rois, theirs_matched, theirs_labels, theirs_targets):
        assert torch.equal(o.proposals, rois)
        assert torch.equal(o.labels, labels)
        positive = labels > 0
        assert 0 < positive.sum() <= 32  # 25 % of 128
        assert torch.equal(o.matched_idxs[positive], matched[positive])
        assert_close(o.regression_targets[positive], deltas[positive], rtol=0, atol=0)
        # background RoIs: the matcher's sentinel and no regression target
        assert (o.matched_idxs[~positive] == BELOW_LOW_THRESHOLD).all()
        assert (o.regression_targets[~positive] == 0).all()


def test_sampled_rois_follow_the_recipe():
    # 400 jittered boxes around 2 gt boxes: far more positives than 25 % of 512
    proposals, gt_boxes, gt_labels = make_proposals_and_targets(num_gt=(2, 2), jittered_per_gt=200, num_random=600)
    sampled = sample_proposals(proposals[0], gt_boxes[0], gt_labels[0], Matcher(0.5, 0.5),
                               BalancedPositiveNegativeSampler(512, 0.25), BoxCoder(BOX_REG_WEIGHTS),
                               generator=torch.Generator().manual_seed(0))
    assert len(sampled.proposals) == 512
    positive = sampled.labels > 0
    assert positive.sum() == 128
    assert set(sampled.labels[positive].tolist()) <= set(gt_labels[0].tolist())
    # decoding a positive's target deltas gives back its gt box
    decoded = BoxCoder(BOX_REG_WEIGHTS).decode(sampled.regression_targets[positive], sampled.proposals[positive])
    assert_close(decoded, gt_boxes[0][sampled.matched_idxs[positive]], rtol=0, atol=1e-4)
    # the same generator seed gives the same RoIs, without touching the global generator
    state = torch.get_rng_state()
    again = sample_proposals(proposals[0], gt_boxes[0], gt_labels[0], Matcher(0.5, 0.5),
                             BalancedPositiveNegativeSampler(512, 0.25), BoxCoder(BOX_REG_WEIGHTS),
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.proposals, sampled.proposals)
    assert torch.equal(state, torch.get_rng_state())


def test_gt_boxes_are_added_to_the_proposals():
    # no proposal overlaps the gt box: its only positive RoI is the gt box itself, with zero deltas
    gt = torch.tensor([[40.0, 40.0, 60.0, 70.0]])
    far = torch.tensor([[0.0, 0.0, 10.0, 10.0], [80.0, 80.0, 99.0, 99.0]])
    sampled = sample_proposals(far, gt, torch.tensor([2]), Matcher(0.5, 0.5),
                               BalancedPositiveNegativeSampler(512, 0.25), BoxCoder(BOX_REG_WEIGHTS))
    assert sampled.labels.tolist() == [0, 0, 2]
    assert torch.equal(sampled.proposals[2], gt[0])
    assert sampled.matched_idxs.tolist() == [BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, 0]
    assert (sampled.regression_targets == 0).all()


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def test_fastrcnn_loss_golden():
    # zero logits over 3 classes: cross-entropy log(3) for every RoI. One positive (class 2)
    # whose target is dx = 0.05 and whose prediction is 0: smooth L1 = 0.5 * 0.05**2 / (1/9)
    # (quadratic part, |0.05| < 1/9) = 0.01125, divided by the 2 sampled RoIs.
    logits = torch.zeros(2, 3)
    deltas = torch.zeros(2, 12)
    deltas[1, :4] = 5.0  # the deltas of class 0 and 1 are never read for a class-2 positive
    targets = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.05, 0.0, 0.0, 0.0]])  # row 0 (background) ignored
    loss_classifier, loss_box_reg = fastrcnn_loss(logits, deltas, torch.tensor([0, 2]), targets)
    assert_close(loss_classifier, torch.tensor(math.log(3)))
    assert_close(loss_box_reg, torch.tensor(0.01125 / 2))


def test_fastrcnn_loss_equals_torchvision_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (20,), generator=g)]
    targets = [torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g)]
    logits = torch.randn(50, 4, generator=g, requires_grad=True)
    deltas = torch.randn(50, 16, generator=g, requires_grad=True)
    ours = fastrcnn_loss(logits, deltas, torch.cat(labels), torch.cat(targets))
    ours_grads = torch.autograd.grad(sum(ours), (logits, deltas))
    theirs = tv_roi_heads.fastrcnn_loss(logits, deltas, labels, targets)
    theirs_grads = torch.autograd.grad(sum(theirs), (logits, deltas))
    for o, t in zip((*ours, *ours_grads), (*theirs, *theirs_grads)):
        assert_close(o, t, rtol=0, atol=1e-7)


def test_fastrcnn_loss_without_positives_or_rois():
    logits = torch.randn(5, 3, requires_grad=True)
    deltas = torch.randn(5, 12, requires_grad=True)
    loss_classifier, loss_box_reg = fastrcnn_loss(logits, deltas, torch.zeros(5, dtype=torch.int64), torch.zeros(5, 4))
    assert loss_classifier > 0 and loss_box_reg == 0
    (loss_classifier + loss_box_reg).backward()
    assert logits.grad.abs().sum() > 0 and (deltas.grad == 0).all()
    # no RoI at all: zeros (torchvision: nan), and backward still works
    logits, deltas = torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 12, requires_grad=True)
    losses = fastrcnn_loss(logits, deltas, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert [loss.item() for loss in losses] == [0.0, 0.0]
    sum(losses).backward()
    assert logits.grad.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def test_postprocess_golden():
    # two heavily overlapping proposals (IoU 0.82), classes: background, A (1), B (2); zero deltas
    # keep the proposals. Softmax of log(p) is p: row 0 = (0.1, 0.7, 0.2), row 1 = (0.25, 0.45, 0.3).
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0]])]
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.25, 0.45, 0.3]]).log()
    (detections,) = postprocess_detections(logits, torch.zeros(2, 12), proposals, [(100, 100)],
                                           BoxCoder(BOX_REG_WEIGHTS))
    # class A: 0.7 (box 0) suppresses 0.45 (box 1); class B: 0.3 (box 1) suppresses 0.2 (box 0);
    # different classes never suppress each other
    assert_close(detections.boxes, proposals[0])
    assert_close(detections.scores, torch.tensor([0.7, 0.3]))
    assert detections.labels.tolist() == [1, 2]
    assert detections.counts == dict(candidates=4, above_score_thresh=4, large_enough=4, after_nms=2,
                                     top_detections=2)
    (detections,) = postprocess_detections(logits, torch.zeros(2, 12), proposals, [(100, 100)],
                                           BoxCoder(BOX_REG_WEIGHTS), score_thresh=0.4, detections_per_img=1)
    assert detections.labels.tolist() == [1]
    assert detections.counts == dict(candidates=4, above_score_thresh=2, large_enough=2, after_nms=1,
                                     top_detections=1)


@pytest.mark.parametrize("settings", [dict(), dict(score_thresh=0.3, nms_thresh=0.3, detections_per_img=7)],
                         ids=["defaults", "strict"])
def test_postprocess_equals_torchvision(settings):
    g = torch.Generator().manual_seed(0)
    proposals, _, _ = make_proposals_and_targets(num_random=60, jittered_per_gt=10)
    num_rois = sum(len(p) for p in proposals)
    logits = torch.randn(num_rois, 4, generator=g) * 2
    deltas = torch.randn(num_rois, 16, generator=g)
    deltas[:5] *= 100  # wild deltas: boxes leave the image (clipped) or collapse (dropped as small)
    theirs = torchvision_roi_heads(**settings).postprocess_detections(logits, deltas, proposals, IMAGE_SIZES)
    ours = postprocess_detections(logits, deltas, proposals, IMAGE_SIZES, BoxCoder(BOX_REG_WEIGHTS), **settings)
    for o, boxes, scores, labels, rois in zip(ours, *theirs, proposals):
        assert len(o.boxes) > 0
        assert_close(o.boxes, boxes, **CLOSE)
        assert_close(o.scores, scores, **CLOSE)
        assert torch.equal(o.labels, labels)
        counts = list(o.counts.values())
        assert counts == sorted(counts, reverse=True) and counts[-1] == len(o.boxes)
        assert o.counts["candidates"] == len(rois) * 3  # every RoI x every non-background class


def test_postprocess_of_an_image_without_proposals():
    detections = detections_in_image(torch.zeros(0, 3), torch.zeros(0, 3, 4), (50, 60), 0.05, 0.5, 100)
    assert detections.boxes.shape == (0, 4) and detections.scores.shape == (0,) and detections.labels.shape == (0,)
    assert set(detections.counts.values()) == {0}
    (first, second) = postprocess_detections(torch.randn(3, 3), torch.zeros(3, 12),
                                             [torch.zeros(0, 4), torch.tensor([[1.0, 1, 20, 20]] * 3)],
                                             [(50, 60), (50, 60)], BoxCoder(BOX_REG_WEIGHTS))
    assert len(first.boxes) == 0 and len(second.boxes) > 0
