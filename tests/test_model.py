"""Tests for mrcnn_edu.model: the assembled r50_fpn model gives torchvision's maskrcnn_resnet50_fpn
losses and detections for the same weights, images and seed; loading checkpoints; the small preset
trains and is small; trace; clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from mrcnn_edu.config import MaskRCNNConfig, r50_fpn, small
from mrcnn_edu.model import (LOSS_KEYS, TRACE_KEYS, TRAINING_TRACE_KEYS, MaskRCNN, build_mask_rcnn,
                             count_parameters, load_torchvision_state_dict, parameter_summary, trace)
from mrcnn_edu.oil_tanks import make_tile

# Small images and fewer detections, set identically on both models, keep the CPU time low; a score
# threshold just below 1/91 lets detections through although untrained scores spread over 91 classes.
MIN_SIZE, MAX_SIZE, DETECTIONS, SCORE_THRESH = 200, 300, 20, 0.011
NUM_CLASSES = 91
# The tolerance (differences seen: boxes 1.5e-5 px, masks 4e-7, scores 4e-9; see randomise).
CLOSE = dict(atol=1e-4, rtol=0)


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights: random batch-norm statistics and affine terms, random biases
    (torchvision initialises them to 0).

    The last layers of the box and mask predictors are scaled down: with random weights the
    features grow to a few hundred and the logits with them, so that float32 rounding (our
    RoIAlign adds in another order than torchvision's kernel: ~1e-7 relative) would reach 1e-4 in
    saturated-but-not-quite probabilities. Scaled, scores and masks spread over (0, 1) as with
    trained weights, and more detections pass the score threshold.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=g))
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and not name.startswith("backbone.body"):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
        model.roi_heads.box_predictor.cls_score.weight.mul_(0.02)
        model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.01)


def disk_target(image: torch.Tensor, num_objects: int, seed: int) -> dict:
    """Boxes with an ellipse mask inscribed in each (like a tank seen from above) and random labels."""
    g = torch.Generator().manual_seed(seed)
    h, w = image.shape[-2:]
    wh = torch.rand(num_objects, 2, generator=g) * torch.tensor([w / 3, h / 3]) + 10
    xy = torch.rand(num_objects, 2, generator=g) * (torch.tensor([w, h]) - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    ys, xs = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None, :] + 0.5
    centre, radius = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
    masks = torch.stack([(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
                         for (cx, cy), (rx, ry) in zip(centre.tolist(), radius.tolist())]).to(torch.uint8)
    return {"boxes": boxes, "labels": torch.randint(1, NUM_CLASSES, (num_objects,), generator=g), "masks": masks}


def reduced(cfg: MaskRCNNConfig, **backbone) -> MaskRCNNConfig:
    return dataclasses.replace(
        cfg, transform=dataclasses.replace(cfg.transform, min_size=(MIN_SIZE,), max_size=MAX_SIZE),
        backbone=dataclasses.replace(cfg.backbone, **backbone),
        roi_heads=dataclasses.replace(cfg.roi_heads, detections_per_img=DETECTIONS,
                                      score_thresh=SCORE_THRESH))


@pytest.fixture(scope="module")
def models():
    """torchvision's model (weights=None: trainable BatchNorm2d in all 5 stages), ours built the same
    way, and our r50_fpn preset as is (frozen batch norm), all with torchvision's (randomised) weights."""
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                   box_detections_per_img=DETECTIONS, box_score_thresh=SCORE_THRESH)
    randomise(theirs)
    ours = build_mask_rcnn(reduced(r50_fpn(), norm="batch", trainable_layers=5))
    load_torchvision_state_dict(ours, theirs.state_dict())
    frozen = build_mask_rcnn(reduced(r50_fpn()))
    load_torchvision_state_dict(frozen, theirs.state_dict())
    return theirs, ours, frozen


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 180, 240, generator=g), torch.rand(3, 150, 130, generator=g)]
    targets = [disk_target(images[0], 3, 5), disk_target(images[1], 2, 6)]
    return images, targets


@pytest.fixture(scope="module")
def torchvision_detections(models, batch):
    theirs = models[0].eval()
    with torch.no_grad():
        return theirs(batch[0])


def assert_same_detections(expected, actual):
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert set(a) == {"boxes", "labels", "scores", "masks"}
        assert len(e["boxes"]) > 0  # not a trivial comparison of empty results
        assert_close(a["boxes"], e["boxes"], **CLOSE)
        assert_close(a["scores"], e["scores"], **CLOSE)
        assert torch.equal(a["labels"], e["labels"])
        assert_close(a["masks"], e["masks"], **CLOSE)


def test_eval_detections_equal_torchvision(models, batch, torchvision_detections):
    ours = models[1].eval()
    with torch.no_grad():
        detections = ours(batch[0])
    assert_same_detections(torchvision_detections, detections)
    for image, d in zip(batch[0], detections):  # the data contract: masks at the original size
        assert d["masks"].shape == (len(d["boxes"]), 1, *image.shape[-2:]) and d["masks"].dtype == torch.float32


def train_losses(model, images, targets, seed=3):
    """The training losses, leaving the model as it was (batch norm in train mode updates its statistics)."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    torch.manual_seed(seed)  # the transform, the RPN and the RoI heads draw from it, in this order
    with torch.no_grad():
        losses = model(images, targets)
    model.load_state_dict(state)
    return losses


def test_train_losses_equal_torchvision(models, batch):
    theirs, ours, _ = models
    expected = train_losses(theirs, *batch)
    actual = train_losses(ours, *batch)
    assert list(actual) == list(LOSS_KEYS)
    assert set(actual) == set(expected)
    for key in expected:
        assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)
    assert expected["loss_box_reg"] > 0 and expected["loss_mask"] > 0  # positives were sampled


@pytest.fixture(scope="module")
def torchvision_frozen(models):
    """torchvision's Mask R-CNN as maskrcnn_resnet50_fpn builds it for pretrained weights
    (FrozenBatchNorm2d, top 3 stages trainable), with the same weights: what our r50_fpn preset mirrors."""
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = TorchvisionMaskRCNN(backbone, num_classes=NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE,
                                box_detections_per_img=DETECTIONS, box_score_thresh=SCORE_THRESH)
    model.load_state_dict(models[0].state_dict())
    return model


def test_r50_fpn_preset_equals_torchvision_pretrained_configuration(models, torchvision_frozen, batch):
    frozen = models[2]
    assert frozen.backbone.body.trainable_layers == 3
    with torch.no_grad():
        assert_same_detections(torchvision_frozen.eval()(batch[0]), frozen.eval()(batch[0]))
    expected = train_losses(torchvision_frozen, *batch, seed=4)
    actual = train_losses(frozen, *batch, seed=4)
    for key in expected:
        assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


def test_attribute_names_follow_torchvision(models):
    ours = models[1]
    assert [name for name, _ in ours.named_children()] == ["transform", "backbone", "rpn", "roi_heads"]
    # same number of weights, key by key (after renaming), as torchvision's model
    theirs_sd, ours_sd = models[0].state_dict(), ours.state_dict()
    assert sum(v.numel() for v in ours_sd.values()) == sum(v.numel() for v in theirs_sd.values())


def test_load_refuses_wrong_checkpoint_and_changes_nothing(models):
    theirs, _, frozen = models
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    other_classes = build_mask_rcnn(dataclasses.replace(r50_fpn(num_classes=3), backbone=small().backbone))
    with pytest.raises(ValueError, match="shape|missing|unexpected"):
        load_torchvision_state_dict(frozen, {**theirs.state_dict(),
                                             "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 1024)})
    with pytest.raises(ValueError, match="rpn"):
        load_torchvision_state_dict(frozen, {k: v for k, v in theirs.state_dict().items() if not k.startswith("rpn.")})
    with pytest.raises(ValueError, match="does not match"):
        load_torchvision_state_dict(other_classes, theirs.state_dict())
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_accepts_a_checkpoint_file_with_a_model_key(models, tmp_path):
    theirs, _, _ = models
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 3}, path)
    model = build_mask_rcnn(reduced(r50_fpn()))
    load_torchvision_state_dict(model, path)
    assert torch.equal(model.rpn.head.objectness.weight, theirs.rpn.head.cls_logits.weight)


# ----------------------------------------------------------------------------------------------
# The small preset
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile():
    return make_tile(size=128, seed=3, n_groups=2, radius_range=(6.0, 14.0))


def test_small_preset_is_small():
    model = build_mask_rcnn(small())
    summary = parameter_summary(model)
    assert summary["total"] == count_parameters(model) == sum(summary[k] for k in ("backbone", "rpn", "roi_heads"))
    assert summary["trainable"] == summary["total"]  # no pretrained weights: everything trains
    assert summary["megabytes_float32"] < 5
    buffers = sum(b.numel() for b in model.buffers())
    assert (summary["total"] + buffers) * 4 < 5e6  # the whole state dict too


def test_small_preset_trains_on_a_tile(tile):
    assert len(tile.target["boxes"]) > 0
    torch.manual_seed(0)
    model = build_mask_rcnn(small())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        losses = model([tile.image], [tile.target])
        assert list(losses) == list(LOSS_KEYS) and all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-2:]) < sum(totals[:2]), totals

    model.eval()
    with torch.no_grad():
        (result,) = model([tile.image])
    d = len(result["boxes"])
    assert result["masks"].shape == (d, 1, *tile.image.shape[-2:])
    assert result["labels"].dtype == torch.int64 and result["scores"].shape == (d,)


def test_faster_rcnn_config_has_no_mask_branch(tile):
    cfg = small()
    model = build_mask_rcnn(dataclasses.replace(cfg, roi_heads=dataclasses.replace(cfg.roi_heads, mask=False)))
    losses = model.train()([tile.image], [{k: v for k, v in tile.target.items() if k != "masks"}])
    assert set(losses) == set(LOSS_KEYS) - {"loss_mask"}
    with torch.no_grad():
        (result,) = model.eval()([tile.image])
    assert "masks" not in result


def test_config_json_round_trip_builds_the_same_model():
    cfg = MaskRCNNConfig.from_dict(json.loads(json.dumps(small(num_classes=3).to_dict())))
    torch.manual_seed(0)
    a = build_mask_rcnn(cfg)
    torch.manual_seed(0)
    b = build_mask_rcnn(small(num_classes=3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# trace
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tile):
    torch.manual_seed(0)
    cfg = small()
    # a low score threshold so that an untrained model still detects something to trace
    model = build_mask_rcnn(dataclasses.replace(cfg, roi_heads=dataclasses.replace(cfg.roi_heads, score_thresh=0.0)))
    return model.eval()


def test_trace_returns_documented_keys_with_consistent_shapes(small_model, tile):
    out = trace(small_model, tile.image)
    assert list(out) == list(TRACE_KEYS)
    h, w = out["image_size"]
    assert out["resized_image"].shape == (3, h, w) and out["batch"].shape[:2] == (1, 3)
    assert out["original_size"] == tuple(tile.image.shape[-2:])
    t = len(out["anchors"])
    assert t == sum(len(a) for a in out["anchors_per_level"])
    assert out["objectness"].shape == (t,) and out["rpn_box_deltas"].shape == out["decoded_anchors"].shape == (t, 4)
    assert list(out["features"]) == ["p2", "p3", "p4", "p5", "p6"]
    k = len(out["proposals"])
    assert 0 < k <= len(out["proposals_before_nms"]) and out["proposal_scores"].shape == (k,)
    assert k <= small_model.rpn.post_nms_top_n["testing"]
    assert out["box_features"].shape == (k, 64, 7, 7)
    assert out["class_logits"].shape == (k, 2) and out["box_deltas"].shape == (k, 8)
    d = len(out["detections"]["boxes"])
    assert d > 0
    assert out["mask_logits"].shape == (d, 2, 28, 28) and out["mask_probabilities"].shape == (d, 1, 28, 28)
    assert out["result"]["masks"].shape == (d, 1, *tile.image.shape[-2:])
    # the trace is the model's forward pass, step by step
    with torch.no_grad():
        (expected,) = small_model([tile.image])
    for key in expected:
        assert_close(out["result"][key], expected[key])
    assert small_model.rpn.nms_thresh == small().rpn.nms_thresh  # attributes restored


def test_trace_with_target_adds_training_products(small_model, tile):
    state = torch.random.get_rng_state()
    out = trace(small_model, tile.image, tile.target, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched
    assert not small_model.training
    assert list(out) == list(TRACE_KEYS) + list(TRAINING_TRACE_KEYS)
    t = len(out["anchors"])
    assert out["anchor_matches"].shape == out["anchor_labels"].shape == (t,)
    rpn_batch = small_model.rpn.fg_bg_sampler.batch_size_per_image
    assert 0 < len(out["sampled_positive_anchors"]) and \
        len(out["sampled_positive_anchors"]) + len(out["sampled_negative_anchors"]) <= rpn_batch
    r = len(out["sampled_rois"])
    assert out["roi_labels"].shape == (r,) and out["roi_regression_targets"].shape == (r, 4)
    assert out["mask_targets"].shape == (int((out["roi_labels"] > 0).sum()), 28, 28)
    assert list(out["losses"]) == list(LOSS_KEYS)
    again = trace(small_model, tile.image, tile.target, seed=1)
    assert all(torch.equal(again["losses"][k], out["losses"][k]) for k in LOSS_KEYS)


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images, message", [
    (torch.rand(1, 3, 32, 32), r"images: expected a non-empty list .* \(unbind"),
    ([], r"images: expected a non-empty list"),
    ([torch.rand(3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.uint8)], r"images\[1\]: .*uint8.*/ 255"),
    ([torch.rand(32, 32)], r"images\[0\]: expected a float Tensor\[3, H, W\]"),
])
def test_bad_images_are_refused(small_model, images, message):
    with pytest.raises(ValueError, match=message):
        small_model(images)


def test_bad_training_targets_are_refused(small_model, tile):
    image, target = tile.image, tile.target
    model = small_model.train()
    try:
        with pytest.raises(ValueError, match=r"targets: expected a list of 2 dicts"):
            model([image, image])
        bad_masks = {**target, "masks": target["masks"][:, :10]}
        with pytest.raises(ValueError, match=r"targets\[1\]\['masks'\]: expected UInt8"):
            model([image, image], [target, bad_masks])
        with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: expected classes in \[1, 1\]"):
            model([image], [{**target, "labels": target["labels"] + 1}])
        flipped = target["boxes"][:, [2, 1, 0, 3]]
        with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: expected x1 < x2"):
            model([image], [{**target, "boxes": flipped}])
    finally:
        model.eval()


def test_build_refuses_a_dict():
    with pytest.raises(TypeError, match="MaskRCNNConfig"):
        build_mask_rcnn(small().to_dict())
    assert isinstance(build_mask_rcnn(small()), MaskRCNN)
