"""Tests for mrcnn_edu.roi_heads: RoIHeads (box + mask branches) gives torchvision's losses and
detections for the same weights, inputs and seed; empty images; bad targets; loading weights."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.ops import MultiScaleRoIAlign as TorchvisionMultiScaleRoIAlign

from mrcnn_edu.box_head import BoxPredictor, TwoMLPHead
from mrcnn_edu.mask_head import MaskHead, MaskPredictor
from mrcnn_edu.roi_heads import RoIHeads, load_torchvision_roi_heads, torchvision_roi_heads_key_map
from mrcnn_edu.roi_ops import MultiScaleRoIAlign

CHANNELS, REPRESENTATION, NUM_CLASSES = 32, 64, 3
LEVELS = ["0", "1", "2", "3"]
STRIDES = (4, 8, 16, 32, 64)  # '0'..'3' and 'pool', as torchvision's FPN
IMAGE_SIZES = [(128, 160), (100, 120)]
# The tolerance. Our RoIAlign sums in another order than torchvision's kernel, so decoded
# boxes can differ in the last bit: 7.6e-6 between 64 and 128 px (seen here) passes; the last
# bit of a coordinate between 128 and 256 px (1.5e-5) would not -- then compare with rtol=1e-6.
CLOSE = dict(rtol=0, atol=1e-5)
# torchvision's RoIHeads has no defaults: these are maskrcnn_resnet50_fpn's
TORCHVISION_DEFAULTS = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                            bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)


def build_torchvision(with_masks: bool, **settings) -> tv_roi_heads.RoIHeads:
    mask_branch = dict(mask_roi_pool=TorchvisionMultiScaleRoIAlign(LEVELS, 14, 2),
                       mask_head=tv_mask_rcnn.MaskRCNNHeads(CHANNELS, (CHANNELS,) * 4, 1),
                       mask_predictor=tv_mask_rcnn.MaskRCNNPredictor(CHANNELS, CHANNELS, NUM_CLASSES))
    return tv_roi_heads.RoIHeads(
        TorchvisionMultiScaleRoIAlign(LEVELS, 7, 2), tv_faster_rcnn.TwoMLPHead(CHANNELS * 7 * 7, REPRESENTATION),
        tv_faster_rcnn.FastRCNNPredictor(REPRESENTATION, NUM_CLASSES), **{**TORCHVISION_DEFAULTS, **settings},
        **(mask_branch if with_masks else {}))


def build_ours(with_masks: bool, **settings) -> RoIHeads:
    mask_branch = dict(mask_roi_pool=MultiScaleRoIAlign(LEVELS, 14, 2), mask_head=MaskHead(CHANNELS, (CHANNELS,) * 4),
                       mask_predictor=MaskPredictor(CHANNELS, CHANNELS, NUM_CLASSES))
    return RoIHeads(MultiScaleRoIAlign(LEVELS, 7, 2), TwoMLPHead(CHANNELS * 7 * 7, REPRESENTATION),
                    BoxPredictor(REPRESENTATION, NUM_CLASSES), **settings, **(mask_branch if with_masks else {}))


def make_heads(with_masks: bool = True, **settings):
    """Our RoIHeads and torchvision's, with the same (torchvision's) weights."""
    torch.manual_seed(0)
    theirs = build_torchvision(with_masks, **settings)
    ours = build_ours(with_masks, **settings)
    load_torchvision_roi_heads(ours, theirs.state_dict())
    return ours, theirs


def make_batch(seed: int = 1, boxes_per_image=(3, 4), random_per_image: int = 150, jittered_per_gt: int = 25):
    """Random FPN features of a padded batch, proposals (random + jittered gt) and targets with disk masks."""
    g = torch.Generator().manual_seed(seed)
    height, width = (math.ceil(max(size[k] for size in IMAGE_SIZES) / 32) * 32 for k in (0, 1))
    features = OrderedDict(
        (name, torch.randn(len(IMAGE_SIZES), CHANNELS, math.ceil(height / s), math.ceil(width / s), generator=g))
        for name, s in zip([*LEVELS, "pool"], STRIDES))
    proposals, targets = [], []
    for (h, w), n in zip(IMAGE_SIZES, boxes_per_image):
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 10
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        # a disk (ellipse) inscribed in every box, like an oil tank seen from above
        ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
        centre, radius = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
        masks = torch.stack([(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
                             for (cx, cy), (rx, ry) in zip(centre.tolist(), radius.tolist())]).to(torch.uint8)
        targets.append({"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g), "masks": masks})
        corners = torch.rand(random_per_image, 2, 2, generator=g) * torch.tensor([w, h])
        random_boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 2], dim=1)
        jittered = boxes.repeat(jittered_per_gt, 1) + torch.randn(n * jittered_per_gt, 4, generator=g) * 4
        proposals.append(torch.cat([random_boxes, jittered]).clamp(min=0))
    return features, proposals, list(IMAGE_SIZES), targets


def run_both(ours, theirs, features, proposals, image_sizes, targets, training: bool, seed: int = 5):
    """Both in the same mode, each after torch.manual_seed(seed); also returns a draw made after each."""
    outputs = []
    for heads in (ours, theirs):
        heads.train(training)
        torch.manual_seed(seed)
        outputs.append((*heads(features, proposals, image_sizes, targets if training else None), torch.rand(3)))
    return outputs


def assert_same(ours_out, theirs_out):
    (ours_detections, ours_losses, ours_next), (theirs_detections, theirs_losses, theirs_next) = ours_out, theirs_out
    assert torch.equal(ours_next, theirs_next)  # the global generator was used the same way
    assert list(ours_losses) == list(theirs_losses)
    for key in ours_losses:
        assert_close(ours_losses[key], theirs_losses[key], **CLOSE)
    assert len(ours_detections) == len(theirs_detections)
    for ours_image, theirs_image in zip(ours_detections, theirs_detections):
        assert list(ours_image) == list(theirs_image)
        for key in ours_image:
            assert ours_image[key].shape == theirs_image[key].shape, key
            assert_close(ours_image[key], theirs_image[key], **CLOSE)


# ---------------------------------------------------------------------------------------------
# Parity with torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_masks", [True, False], ids=["mask_rcnn", "faster_rcnn"])
def test_train_losses_equal_torchvision(with_masks):
    ours, theirs = make_heads(with_masks)
    ours_out, theirs_out = run_both(ours, theirs, *make_batch(), training=True)
    detections, losses, _ = ours_out
    assert detections == []
    assert set(losses) == {"loss_classifier", "loss_box_reg"} | ({"loss_mask"} if with_masks else set())
    assert all(loss > 0 for loss in losses.values())
    assert_same(ours_out, theirs_out)


@pytest.mark.parametrize("with_masks", [True, False], ids=["mask_rcnn", "faster_rcnn"])
def test_eval_detections_equal_torchvision(with_masks):
    ours, theirs = make_heads(with_masks)
    with torch.no_grad():
        ours_out, theirs_out = run_both(ours, theirs, *make_batch(), training=False)
    detections, losses, _ = ours_out
    assert losses == {}
    for image in detections:
        assert 0 < len(image["boxes"]) <= 100
        if with_masks:
            assert image["masks"].shape == (len(image["boxes"]), 1, 28, 28)
            assert 0 <= image["masks"].min() and image["masks"].max() <= 1
        else:
            assert "masks" not in image
    assert_same(ours_out, theirs_out)


def test_gradients_equal_torchvision():
    ours, theirs = make_heads()
    (_, ours_losses, _), (_, theirs_losses, _) = run_both(ours, theirs, *make_batch(), training=True)
    sum(ours_losses.values()).backward()
    sum(theirs_losses.values()).backward()
    ours_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        assert_close(ours_params[torchvision_roi_heads_key_map(name)].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_other_settings_equal_torchvision():
    settings = dict(fg_iou_thresh=0.6, bg_iou_thresh=0.4, batch_size_per_image=64, positive_fraction=0.5,
                    bbox_reg_weights=(1.0, 1.0, 1.0, 1.0), score_thresh=0.34, nms_thresh=0.3, detections_per_img=10)
    ours, theirs = make_heads(**settings)
    batch = make_batch(seed=2)
    for training in (True, False):
        with torch.set_grad_enabled(training):
            assert_same(*run_both(ours, theirs, *batch, training=training))


def test_same_seed_gives_torchvisions_initial_weights():
    torch.manual_seed(3)
    theirs = build_torchvision(with_masks=True)
    torch.manual_seed(3)
    ours = build_ours(with_masks=True)
    ours_weights = ours.state_dict()
    theirs_weights = theirs.state_dict()
    assert len(ours_weights) == len(theirs_weights)
    for key, value in theirs_weights.items():
        assert torch.equal(ours_weights[torchvision_roi_heads_key_map(key)], value), key


# ---------------------------------------------------------------------------------------------
# Images without positives, without ground truth, without proposals
# ---------------------------------------------------------------------------------------------


def empty_target(image_size):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, *image_size, dtype=torch.uint8)}


def test_an_image_without_ground_truth_trains_as_background_like_torchvision():
    ours, theirs = make_heads()
    features, proposals, image_sizes, targets = make_batch()
    targets[0] = empty_target(image_sizes[0])
    ours_out, theirs_out = run_both(ours, theirs, features, proposals, image_sizes, targets, training=True)
    assert all(loss > 0 for loss in ours_out[1].values())  # image 1 still has positives
    assert_same(ours_out, theirs_out)
    sampled = ours.select_training_samples(proposals, targets)
    assert (sampled[0].labels == 0).all() and (sampled[1].labels > 0).any()


def test_a_batch_without_positive_rois_trains_with_a_zero_mask_loss():
    ours, theirs = make_heads()
    features, proposals, image_sizes, _ = make_batch()
    targets = [empty_target(size) for size in image_sizes]
    ours_out, theirs_out = run_both(ours, theirs, features, proposals, image_sizes, targets, training=True)
    assert_same(ours_out, theirs_out)
    losses = ours_out[1]
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    assert losses["loss_classifier"] > 0
    sum(losses.values()).backward()  # trains without error: the classifier learns "background"
    assert ours.box_predictor.class_logits.weight.grad.abs().sum() > 0
    assert (ours.mask_predictor.mask_logits.weight.grad == 0).all()
    assert (ours.mask_head.convs[0].weight.grad == 0).all()


def test_images_without_proposals():
    ours, theirs = make_heads()
    features, proposals, image_sizes, targets = make_batch()
    proposals[1] = torch.zeros(0, 4)
    # training: the gt boxes are the only RoIs of image 1
    ours_out, theirs_out = run_both(ours, theirs, features, proposals, image_sizes, targets, training=True)
    assert_same(ours_out, theirs_out)
    # no proposal and no gt box anywhere: no RoI at all, zero losses (torchvision: nan)
    ours.train()
    _, losses = ours(features, [torch.zeros(0, 4)] * 2, image_sizes, [empty_target(s) for s in image_sizes])
    assert {key: loss.item() for key, loss in losses.items()} == dict(loss_classifier=0, loss_box_reg=0, loss_mask=0)
    sum(losses.values()).backward()
    # inference: no detections in image 1, and an empty mask tensor of the right shape
    ours.eval()
    with torch.no_grad():
        detections, _ = ours(features, proposals, image_sizes)
    assert len(detections[0]["boxes"]) > 0
    assert detections[1]["boxes"].shape == (0, 4) and detections[1]["masks"].shape == (0, 1, 28, 28)


def test_no_detection_above_the_score_threshold():
    ours, theirs = make_heads(score_thresh=0.99)
    with torch.no_grad():
        ours_out, theirs_out = run_both(ours, theirs, *make_batch(), training=False)
    assert_same(ours_out, theirs_out)
    assert all(image["masks"].shape == (0, 1, 28, 28) for image in ours_out[0])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def without(target, key):
    return {k: v for k, v in target.items() if k != key}


# case: (the field of image 1's target, how to spoil it -- None: remove it --, what the message says
# after "targets[1]['<field>']: ")
BAD_TARGETS = {
    "masks_missing": ("masks", None, "missing"),
    "masks_float": ("masks", lambda m: m.float(), r"expected UInt8\[4, 100, 120\]"),
    "masks_bool": ("masks", lambda m: m.bool(), r".*\.to\(torch\.uint8\)"),
    "masks_wrong_count": ("masks", lambda m: m[:2], r".*got shape \(2, 100, 120\)"),
    "masks_wrong_size": ("masks", lambda m: m[:, :50], r".*got shape \(4, 50, 120\)"),
    "masks_0_255": ("masks", lambda m: m * 255, "expected 0/1 values"),
    "masks_2d": ("masks", lambda m: m[0], r"expected UInt8\[4, 100, 120\]"),
    "labels_missing": ("labels", None, "missing"),
    "labels_float": ("labels", lambda l: l.float(), r"expected Int64\[4\]"),
    "labels_out_of_range": ("labels", lambda l: l + NUM_CLASSES, r"expected classes in \[1, 2\]"),
    "labels_background": ("labels", lambda l: l * 0, r"expected classes in \[1, 2\]"),
    "boxes_int": ("boxes", lambda b: b.long(), r"expected Float\[N, 4\]"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_targets_are_refused_naming_the_image_and_field(case):
    ours, _ = make_heads()
    ours.train()
    features, proposals, image_sizes, targets = make_batch()
    field, spoil, message = BAD_TARGETS[case]
    targets[1] = without(targets[1], field) if spoil is None else {**targets[1], field: spoil(targets[1][field])}
    with pytest.raises(ValueError, match=rf"targets\[1\]\['{field}'\]: {message}"):
        ours(features, proposals, image_sizes, targets)


def test_masks_are_not_required_without_a_mask_branch():
    ours, _ = make_heads(with_masks=False)
    ours.train()
    features, proposals, image_sizes, targets = make_batch()
    _, losses = ours(features, proposals, image_sizes, [without(t, "masks") for t in targets])
    assert "loss_mask" not in losses


def test_bad_inputs_are_refused():
    ours, _ = make_heads()
    features, proposals, image_sizes, _ = make_batch()
    ours.train()
    with pytest.raises(ValueError, match="targets: expected a list of 2 dicts"):
        ours(features, proposals, image_sizes)
    ours.eval()
    with pytest.raises(ValueError, match=r"proposals: expected a list of 2 Tensor\[K_i, 4\]"):
        ours(features, proposals[:1], image_sizes)
    with pytest.raises(ValueError, match=r"proposals\[0\]: expected Float\[K, 4\]"):
        ours(features, [proposals[0][:, :3], proposals[1]], image_sizes)
    with pytest.raises(ValueError, match=r"features\['0'\]: expected a Tensor\[N, C, h, w\] with N = 2"):
        ours({**features, "0": features["0"][:1]}, proposals, image_sizes)
    with pytest.raises(ValueError, match="image_sizes: expected a list of"):
        ours(features, proposals, [128, 160])


def test_an_incomplete_mask_branch_is_refused():
    with pytest.raises(ValueError, match="expected all three .* got only mask_head, mask_predictor"):
        RoIHeads(MultiScaleRoIAlign(LEVELS, 7, 2), TwoMLPHead(CHANNELS * 49, REPRESENTATION),
                 BoxPredictor(REPRESENTATION, NUM_CLASSES), mask_head=MaskHead(CHANNELS, (CHANNELS,)),
                 mask_predictor=MaskPredictor(CHANNELS, CHANNELS, NUM_CLASSES))


# ---------------------------------------------------------------------------------------------
# Loading torchvision weights
# ---------------------------------------------------------------------------------------------


def full_size_roi_heads(num_classes: int = 91) -> RoIHeads:
    """Our RoI heads with the sizes of maskrcnn_resnet50_fpn."""
    return RoIHeads(MultiScaleRoIAlign(LEVELS, 7, 2), TwoMLPHead(256 * 7 * 7, 1024), BoxPredictor(1024, num_classes),
                    mask_roi_pool=MultiScaleRoIAlign(LEVELS, 14, 2), mask_head=MaskHead(256, (256,) * 4),
                    mask_predictor=MaskPredictor(256, 256, num_classes))


def test_a_torchvision_mask_rcnn_state_dict_loads():
    model = tv_mask_rcnn.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state_dict = model.state_dict()
    ours = full_size_roi_heads()
    load_torchvision_roi_heads(ours, state_dict)  # the whole model's: only roi_heads.* is read
    ours_weights = ours.state_dict()
    roi_keys = [key for key in state_dict if key.startswith("roi_heads.")]
    assert len(roi_keys) == len(ours_weights) == 20
    for key in roi_keys:
        assert torch.equal(ours_weights[torchvision_roi_heads_key_map(key).removeprefix("roi_heads.")], state_dict[key])
    # the settings mirror torchvision's
    for name in ("score_thresh", "nms_thresh", "detections_per_img"):
        assert getattr(ours, name) == getattr(model.roi_heads, name)
    assert ours.box_coder.weights == model.roi_heads.box_coder.weights
    assert ours.fg_bg_sampler.batch_size_per_image == model.roi_heads.fg_bg_sampler.batch_size_per_image
    # a model with another number of classes does not fit, and says why
    with pytest.raises(ValueError, match="shape mismatches"):
        load_torchvision_roi_heads(full_size_roi_heads(num_classes=2), state_dict)


def test_key_map_renames_every_torchvision_layer():
    assert torchvision_roi_heads_key_map("roi_heads.box_head.fc6.weight") == "roi_heads.box_head.fc1.weight"
    assert torchvision_roi_heads_key_map("box_head.fc7.bias") == "box_head.fc2.bias"
    assert torchvision_roi_heads_key_map("box_predictor.cls_score.weight") == "box_predictor.class_logits.weight"
    assert torchvision_roi_heads_key_map("box_predictor.bbox_pred.bias") == "box_predictor.box_deltas.bias"
    assert torchvision_roi_heads_key_map("roi_heads.mask_head.3.0.weight") == "roi_heads.mask_head.convs.3.weight"
    assert torchvision_roi_heads_key_map("mask_head.mask_fcn1.bias") == "mask_head.convs.0.bias"  # old checkpoints
    assert torchvision_roi_heads_key_map("mask_predictor.conv5_mask.weight") == "mask_predictor.upsample.weight"
    assert torchvision_roi_heads_key_map("mask_predictor.mask_fcn_logits.bias") == "mask_predictor.mask_logits.bias"
    assert torchvision_roi_heads_key_map("backbone.body.conv1.weight") == "backbone.body.conv1.weight"
