"""Tests for mrcnn_edu.rpn: the RPN head and the region proposal network give torchvision's
proposals and losses for the same weights, inputs and random seed; ties, empty targets, errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection import rpn as torchvision_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_edu.anchors import FPN_ANCHOR_SIZES, FPN_ASPECT_RATIOS, AnchorGenerator
from mrcnn_edu.matching import NEGATIVE, label_anchors
from mrcnn_edu.rpn import (RegionProposalNetwork, RPNHead, check_targets, flatten_predictions,
                           load_torchvision_rpn, torchvision_rpn_key_map)

CHANNELS = 8
TANK_SIZES = ((8,), (16,), (32,), (64,), (128,))
STRIDES = (4, 8, 16, 32, 64)
CLOSE = dict(rtol=0, atol=1e-5)
# torchvision's RegionProposalNetwork has no defaults: these are maskrcnn_resnet50_fpn's
TORCHVISION_DEFAULTS = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
                            pre_nms_top_n=dict(training=2000, testing=1000),
                            post_nms_top_n=dict(training=2000, testing=1000), nms_thresh=0.7, score_thresh=0.0)

# (anchor sizes, image sizes of the batch)
CASES = {
    "one_image_128x160_fpn": (FPN_ANCHOR_SIZES, [(128, 160)]),
    "one_portrait_image_160x96_tanks": (TANK_SIZES, [(160, 96)]),
    "two_images_fpn": (FPN_ANCHOR_SIZES, [(128, 160), (100, 150)]),
    "two_images_tanks": (TANK_SIZES, [(96, 128), (128, 100)]),
}


def make_rpns(sizes=FPN_ANCHOR_SIZES, weight_std: float | None = 0.2, seed: int = 0, **settings):
    """Our RPN and torchvision's, with the same weights (loaded through load_torchvision_rpn)."""
    torch.manual_seed(seed)
    ratios = FPN_ASPECT_RATIOS[:len(sizes)]
    theirs = torchvision_rpn.RegionProposalNetwork(TorchvisionAnchorGenerator(sizes, ratios),
                                                   torchvision_rpn.RPNHead(CHANNELS, 3),
                                                   **{**TORCHVISION_DEFAULTS, **settings})
    if weight_std is not None:  # larger than the 0.01 of the init: proposals move, scores spread
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(std=weight_std)
    ours = RegionProposalNetwork(AnchorGenerator(sizes, ratios), RPNHead(CHANNELS, 3), **settings)
    load_torchvision_rpn(ours, theirs.state_dict())
    return ours, theirs


def make_batch(image_sizes, seed: int = 1, boxes_per_image=(5, 3)):
    """A padded batch (to a multiple of 32), random p2..p6 features, and targets inside each image."""
    g = torch.Generator().manual_seed(seed)
    height = math.ceil(max(h for h, _ in image_sizes) / 32) * 32
    width = math.ceil(max(w for _, w in image_sizes) / 32) * 32
    images = torch.zeros(len(image_sizes), 3, height, width)
    features = OrderedDict(
        (f"p{k + 2}", torch.randn(len(image_sizes), CHANNELS, math.ceil(height / s), math.ceil(width / s),
                                  generator=g))
        for k, s in enumerate(STRIDES))
    targets = []
    for (h, w), n in zip(image_sizes, boxes_per_image):
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 4
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": torch.ones(n, dtype=torch.int64)})
    return images, list(image_sizes), features, targets


def run_both(ours, theirs, images, image_sizes, features, targets, training: bool, seed: int = 5):
    """Both RPNs in the same mode, each after torch.manual_seed(seed)."""
    ours.train(training)
    theirs.train(training)
    torch.manual_seed(seed)
    ours_out = ours(images, image_sizes, features, targets if training else None)
    torch.manual_seed(seed)
    theirs_out = theirs(ImageList(images, image_sizes), features, targets if training else None)
    return ours_out, theirs_out


def assert_same(ours_out, theirs_out):
    (ours_proposals, ours_losses), (theirs_proposals, theirs_losses) = ours_out, theirs_out
    assert len(ours_proposals) == len(theirs_proposals)
    for ours_boxes, theirs_boxes in zip(ours_proposals, theirs_proposals):
        assert ours_boxes.shape == theirs_boxes.shape
        assert_close(ours_boxes, theirs_boxes, **CLOSE)
    assert ours_losses.keys() == theirs_losses.keys()
    for key in ours_losses:
        assert_close(ours_losses[key], theirs_losses[key], **CLOSE)


# ---------------------------------------------------------------------------------------------
# Parity with torchvision: proposals and losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_train_mode_proposals_and_losses_equal_torchvision(case):
    sizes, image_sizes = CASES[case]
    ours, theirs = make_rpns(sizes)
    batch = make_batch(image_sizes)
    (ours_proposals, ours_losses), theirs_out = run_both(ours, theirs, *batch, training=True)
    assert set(ours_losses) == {"loss_objectness", "loss_rpn_box_reg"}
    assert ours_losses["loss_rpn_box_reg"] > 0
    assert_same((ours_proposals, ours_losses), theirs_out)


@pytest.mark.parametrize("case", list(CASES))
def test_eval_mode_proposals_equal_torchvision(case):
    sizes, image_sizes = CASES[case]
    ours, theirs = make_rpns(sizes)
    ours_out, theirs_out = run_both(ours, theirs, *make_batch(image_sizes), training=False)
    assert ours_out[1] == {}
    assert all(len(boxes) > 0 for boxes in ours_out[0])
    assert_same(ours_out, theirs_out)


@pytest.mark.parametrize("settings", [
    dict(pre_nms_top_n=dict(training=300, testing=200), post_nms_top_n=dict(training=150, testing=100)),
    dict(score_thresh=0.6, nms_thresh=0.5),
    dict(batch_size_per_image=64, positive_fraction=0.25, fg_iou_thresh=0.5, bg_iou_thresh=0.4),
], ids=["top_n", "score_and_nms_thresh", "sampling_and_matching"])
def test_other_settings_equal_torchvision(settings):
    ours, theirs = make_rpns(TANK_SIZES, **settings)
    batch = make_batch(CASES["two_images_tanks"][1])
    for training in (True, False):
        assert_same(*run_both(ours, theirs, *batch, training=training))
    if "post_nms_top_n" in settings:  # the pairs are used by mode
        ours.train()
        assert max(len(b) for b in ours(*batch)[0]) == 150
        ours.eval()
        assert max(len(b) for b in ours(*batch[:3])[0]) == 100


def test_gradients_equal_torchvision():
    ours, theirs = make_rpns(TANK_SIZES)
    (_, ours_losses), (_, theirs_losses) = run_both(ours, theirs, *make_batch(CASES["two_images_tanks"][1]),
                                                    training=True)
    sum(ours_losses.values()).backward()
    sum(theirs_losses.values()).backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        assert_close(ours_grads[torchvision_rpn_key_map(name)].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_matching_and_sampling_inside_the_rpn_equal_torchvision():
    ours, theirs = make_rpns(FPN_ANCHOR_SIZES)
    images, image_sizes, features, targets = make_batch(CASES["two_images_fpn"][1])
    anchors = torch.cat(ours.anchor_generator.anchors_per_level(images.shape[-2:], [f.shape[-2:] for f in
                                                                                    features.values()]))
    matched_idxs = ours.match_anchors(anchors, [t["boxes"] for t in targets])
    ours_labels = [label_anchors(m) for m in matched_idxs]
    theirs_labels, theirs_matched_boxes = theirs.assign_targets_to_anchors([anchors, anchors], targets)
    for ours_l, theirs_l, m, t, theirs_boxes in zip(ours_labels, theirs_labels, matched_idxs, targets,
                                                    theirs_matched_boxes):
        assert torch.equal(ours_l.float(), theirs_l)
        positive = m >= 0
        assert positive.sum() > 0
        assert torch.equal(t["boxes"][m[positive]], theirs_boxes[positive])
    # the same seed samples the same anchors
    torch.manual_seed(3)
    ours_sampled = ours.fg_bg_sampler(ours_labels)
    torch.manual_seed(3)
    theirs_sampled = theirs.fg_bg_sampler(theirs_labels)
    for ours_masks, theirs_masks in zip(ours_sampled, theirs_sampled):
        assert all(torch.equal(o, t.bool()) for o, t in zip(ours_masks, theirs_masks))
    # a whole training step leaves the global generator in the same state
    ours.train()
    theirs.train()
    torch.manual_seed(5)
    ours(images, image_sizes, features, targets)
    after_ours = torch.rand(4)
    torch.manual_seed(5)
    theirs(ImageList(images, image_sizes), features, targets)
    assert torch.equal(after_ours, torch.rand(4))


def test_tied_objectness_gives_torchvisions_choice():
    # a head whose weights are all 0: every logit is 0 (all anchors tie), every delta is 0 (the
    # proposals are the clipped anchors). Which tied anchors survive the per-level top-k is
    # torch.topk's choice; we call it as torchvision does, so we keep the same ones.
    ours, theirs = make_rpns(FPN_ANCHOR_SIZES, weight_std=None,
                             pre_nms_top_n=dict(training=300, testing=100),
                             post_nms_top_n=dict(training=200, testing=50))
    with torch.no_grad():
        for p in [*ours.parameters(), *theirs.parameters()]:
            p.zero_()
    batch = make_batch(CASES["two_images_fpn"][1])
    for training in (True, False):
        ours_out, theirs_out = run_both(ours, theirs, *batch, training=training)
        assert_same(ours_out, theirs_out)
        for ours_boxes, theirs_boxes in zip(ours_out[0], theirs_out[0]):
            assert torch.equal(ours_boxes, theirs_boxes)  # not only close: the very same boxes
    # every score is sigmoid(0) = 0.5
    ours.eval()
    images, image_sizes, features, _ = batch
    objectness, deltas = flatten_predictions(*ours.head(list(features.values())))
    anchors = ours.anchor_generator(images, list(features.values()))[0]
    num_per_level = [f.shape[-2] * f.shape[-1] * 3 for f in features.values()]
    _, scores = ours.filter_proposals(ours.box_coder.decode(deltas, anchors), objectness, image_sizes, num_per_level)
    assert all((s == 0.5).all() for s in scores)


# ---------------------------------------------------------------------------------------------
# Images without ground-truth boxes
# ---------------------------------------------------------------------------------------------


def empty_target():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_an_image_without_boxes_trains_all_anchors_negative():
    ours, theirs = make_rpns(FPN_ANCHOR_SIZES)
    images, image_sizes, features, _ = make_batch([(128, 160)])
    ours_out, theirs_out = run_both(ours, theirs, images, image_sizes, features, [empty_target()], training=True)
    assert_same(ours_out, theirs_out)
    losses = ours_out[1]
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_objectness"].item() > 0
    sum(losses.values()).backward()  # trains: gradients reach the head
    assert ours.head.objectness.weight.grad.abs().sum() > 0
    # every anchor is negative
    anchors = ours.anchor_generator(images, list(features.values()))[0]
    (matched,) = ours.match_anchors(anchors, [torch.zeros(0, 4)])
    assert (label_anchors(matched) == NEGATIVE).all()


def test_a_batch_with_one_empty_image_equals_torchvision():
    ours, theirs = make_rpns(TANK_SIZES)
    images, image_sizes, features, targets = make_batch(CASES["two_images_tanks"][1])
    targets[0] = empty_target()
    ours_out, theirs_out = run_both(ours, theirs, images, image_sizes, features, targets, training=True)
    assert ours_out[1]["loss_rpn_box_reg"] > 0  # image 1 still has positives
    assert_same(ours_out, theirs_out)


# ---------------------------------------------------------------------------------------------
# Proposals
# ---------------------------------------------------------------------------------------------


def test_proposals_lie_in_their_own_image_and_carry_no_gradient():
    ours, _ = make_rpns(FPN_ANCHOR_SIZES)
    images, image_sizes, features, targets = make_batch([(128, 160), (70, 90)])
    for training in (True, False):
        ours.train(training)
        proposals, _ = ours(images, image_sizes, features, targets)
        for boxes, (h, w) in zip(proposals, image_sizes):
            assert not boxes.requires_grad
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()  # not the padded 128 x 160
            assert ((boxes[:, 2:] - boxes[:, :2]) >= 1e-3).all()


def test_flatten_predictions_follows_the_anchor_order():
    g = torch.Generator().manual_seed(6)
    objectness = [torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 2, 3, generator=g)]
    deltas = [torch.randn(2, 12, 4, 5, generator=g), torch.randn(2, 12, 2, 3, generator=g)]
    flat_objectness, flat_deltas = flatten_predictions(objectness, deltas)
    assert flat_objectness.shape == (2, 4 * 5 * 3 + 2 * 3 * 3) and flat_deltas.shape == (2, 78, 4)
    n, row, col, a = 1, 2, 3, 1  # level 0: anchor index (row * w + col) * A + a
    t = (row * 5 + col) * 3 + a
    assert flat_objectness[n, t] == objectness[0][n, a, row, col]
    assert torch.equal(flat_deltas[n, t], deltas[0][n, a * 4:(a + 1) * 4, row, col])
    row, col, a = 1, 2, 2  # level 1 comes after all 60 anchors of level 0
    t = 60 + (row * 3 + col) * 3 + a
    assert flat_objectness[n, t] == objectness[1][n, a, row, col]
    assert torch.equal(flat_deltas[n, t], deltas[1][n, a * 4:(a + 1) * 4, row, col])
    # and it equals torchvision's concat_box_prediction_layers
    theirs_objectness, theirs_deltas = torchvision_rpn.concat_box_prediction_layers(objectness, deltas)
    assert torch.equal(flat_objectness.reshape(-1, 1), theirs_objectness)
    assert torch.equal(flat_deltas.reshape(-1, 4), theirs_deltas)


# ---------------------------------------------------------------------------------------------
# The head and torchvision weights
# ---------------------------------------------------------------------------------------------


def test_head_shapes_and_initialisation_match_torchvision():
    torch.manual_seed(0)
    ours = RPNHead(16, 3, conv_depth=2)
    torch.manual_seed(0)
    theirs = torchvision_rpn.RPNHead(16, 3, conv_depth=2)
    # same seed, same layers created in the same order: the very same initial weights
    theirs_state = {torchvision_rpn_key_map(f"head.{k}").removeprefix("head."): v for k, v in theirs.state_dict().items()}
    assert ours.state_dict().keys() == theirs_state.keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[key])
    for conv in [*ours.convs, ours.objectness, ours.box_deltas]:
        assert (conv.bias == 0).all()
        assert 0.005 < conv.weight.std() < 0.015
    features = [torch.randn(2, 16, 8, 10), torch.randn(2, 16, 4, 5)]
    objectness, deltas = ours(features)
    assert [o.shape for o in objectness] == [(2, 3, 8, 10), (2, 3, 4, 5)]
    assert [d.shape for d in deltas] == [(2, 12, 8, 10), (2, 12, 4, 5)]
    theirs_objectness, theirs_deltas = theirs(features)
    for o, t in zip([*objectness, *deltas], [*theirs_objectness, *theirs_deltas]):
        assert_close(o, t, rtol=0, atol=0)


def test_torchvision_rpn_key_map():
    assert torchvision_rpn_key_map("rpn.head.conv.0.0.weight") == "rpn.head.convs.0.weight"
    assert torchvision_rpn_key_map("head.conv.1.0.bias") == "head.convs.1.bias"
    assert torchvision_rpn_key_map("rpn.head.conv.weight") == "rpn.head.convs.0.weight"  # RPNHead version 1
    assert torchvision_rpn_key_map("rpn.head.cls_logits.weight") == "rpn.head.objectness.weight"
    assert torchvision_rpn_key_map("rpn.head.bbox_pred.bias") == "rpn.head.box_deltas.bias"
    # keys outside the RPN head are left alone, even the box predictor's bbox_pred
    assert torchvision_rpn_key_map("roi_heads.box_predictor.bbox_pred.weight") == \
        "roi_heads.box_predictor.bbox_pred.weight"
    assert torchvision_rpn_key_map("roi_heads.box_head.fc6.weight") == "roi_heads.box_head.fc6.weight"


def test_load_the_rpn_of_a_torchvision_mask_rcnn_state_dict():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    state_dict = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(256, 3))
    load_torchvision_rpn(rpn, state_dict)
    assert torch.equal(rpn.head.convs[0].weight, state_dict["rpn.head.conv.0.0.weight"])
    assert torch.equal(rpn.head.objectness.bias, state_dict["rpn.head.cls_logits.bias"])
    assert torch.equal(rpn.head.box_deltas.weight, state_dict["rpn.head.bbox_pred.weight"])
    with pytest.raises(ValueError, match="does not match this RegionProposalNetwork"):
        load_torchvision_rpn(RegionProposalNetwork(AnchorGenerator(), RPNHead(64, 3)), state_dict)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def good_targets():
    return [{"boxes": torch.tensor([[10.0, 10, 50, 40]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[0.0, 0, 20, 30], [5, 5, 150, 100]]), "labels": torch.tensor([1, 2])}]


def with_field(image: int, field: str, value):
    targets = good_targets()
    targets[image][field] = value
    return targets


@pytest.mark.parametrize("targets, message", [
    (None, r"targets: expected a list of 2 dicts \(one per image\) in training mode, got None"),
    (good_targets()[:1], r"targets: expected a list of 2 dicts .* got 1 targets"),
    ([good_targets()[0], {"labels": torch.tensor([1])}], r"targets\[1\]: expected a dict with 'boxes'"),
    (with_field(1, "boxes", torch.tensor([0.0, 0, 20, 30])),
     r"targets\[1\]\['boxes'\]: expected Float\[N, 4\] \(x1, y1, x2, y2\), got shape \(4,\) and dtype torch.float32"),
    (with_field(1, "boxes", torch.zeros(2, 5)), r"targets\[1\]\['boxes'\]: expected Float\[N, 4\] .* got shape \(2, 5\)"),
    (with_field(0, "boxes", torch.tensor([[10, 10, 50, 40]])),
     r"targets\[0\]\['boxes'\]: expected Float\[N, 4\] .* dtype torch.int64"),
    (with_field(0, "boxes", [[10.0, 10, 50, 40]]), r"targets\[0\]\['boxes'\]: expected Float\[N, 4\] .* got a list"),
    (with_field(1, "boxes", torch.tensor([[0.0, 0, 20, 30], [50, 5, 40, 100]])),
     r"targets\[1\]\['boxes'\]: expected x1 < x2 and y1 < y2 .* got box 1 = \[50.0, 5.0, 40.0, 100.0\]"),
    (with_field(1, "boxes", torch.tensor([[0.0, 0, 20, 30], [5, 5, 5, 100]])),
     r"targets\[1\]\['boxes'\]: expected x1 < x2 and y1 < y2 \(a positive width and height\)"),
    # image 1 is 100 x 150 inside the padded 128 x 160 batch: x2 = 155 is outside *its* image
    (with_field(1, "boxes", torch.tensor([[0.0, 0, 20, 30], [5, 5, 155, 100]])),
     r"targets\[1\]\['boxes'\]: expected boxes inside the image of \(height, width\) = \(100, 150\).* "
     r"got box 1 = \[5.0, 5.0, 155.0, 100.0\]"),
    (with_field(0, "boxes", torch.tensor([[-1.0, 10, 50, 40]])), r"targets\[0\]\['boxes'\]: expected boxes inside"),
    (with_field(0, "boxes", torch.tensor([[float("nan"), 10, 50, 40]])),
     r"targets\[0\]\['boxes'\]: expected finite coordinates"),
    (with_field(1, "labels", torch.tensor([1, 2], dtype=torch.int32)),
     r"targets\[1\]\['labels'\]: expected Int64\[2\] .* got shape \(2,\) and dtype torch.int32"),
    (with_field(1, "labels", torch.tensor([1.0, 2.0])), r"targets\[1\]\['labels'\]: expected Int64\[2\]"),
    (with_field(0, "labels", torch.tensor([1, 1])), r"targets\[0\]\['labels'\]: expected Int64\[1\] .* shape \(2,\)"),
])
def test_bad_targets_raise_a_value_error_naming_image_and_field(targets, message):
    rpn, _ = make_rpns(FPN_ANCHOR_SIZES)
    images, image_sizes, features, _ = make_batch([(128, 160), (100, 150)])
    rpn.train()
    with pytest.raises(ValueError, match=message):
        rpn(images, image_sizes, features, targets)


def test_good_targets_pass_and_eval_mode_needs_none():
    check_targets(good_targets(), [(128, 160), (100, 150)])
    check_targets([empty_target()], [(64, 64)])
    rpn, _ = make_rpns(FPN_ANCHOR_SIZES)
    images, image_sizes, features, _ = make_batch([(128, 160), (100, 150)])
    rpn.eval()
    proposals, losses = rpn(images, image_sizes, features)
    assert len(proposals) == 2 and losses == {}


@pytest.mark.parametrize("call, message", [
    (lambda: RegionProposalNetwork(AnchorGenerator(), RPNHead(8, 9)), r"head: expected as many anchors per location"),
    (lambda: RegionProposalNetwork(AnchorGenerator(), RPNHead(8, 3), pre_nms_top_n=dict(training=100)),
     r"pre_nms_top_n: expected dict\(training=\.\.\., testing=\.\.\.\)"),
    (lambda: RegionProposalNetwork(AnchorGenerator(), RPNHead(8, 3), post_nms_top_n=dict(training=0, testing=5)),
     r"post_nms_top_n: expected dict"),
])
def test_bad_settings_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_inputs_raise():
    rpn, _ = make_rpns(FPN_ANCHOR_SIZES)
    rpn.eval()
    images, image_sizes, features, _ = make_batch([(128, 160), (100, 150)])
    with pytest.raises(ValueError, match=r"image_sizes: expected 2 \(height, width\) pairs, each within the "
                                         r"padded size \(128, 160\)"):
        rpn(images, [(128, 160)], features)
    with pytest.raises(ValueError, match=r"image_sizes: .* got \[\(128, 160\), \(100, 200\)\]"):
        rpn(images, [(128, 160), (100, 200)], features)
    with pytest.raises(ValueError, match=r"features: expected a dict of feature maps"):
        rpn(images, image_sizes, list(features.values()))
    with pytest.raises(ValueError, match=r"features\['p3'\]: expected a Tensor\[N, C, h, w\] with N = 2"):
        rpn(images, image_sizes, {**features, "p3": features["p3"][:1]})
    with pytest.raises(ValueError, match=r"grid_sizes: expected one \(h, w\) per pyramid level"):
        rpn(images, image_sizes, OrderedDict(list(features.items())[:3]))
