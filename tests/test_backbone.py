"""Tests for mrcnn_edu.backbone: parity with torchvision, shapes, freezing, loading, errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torch.testing import assert_close
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork as TVFeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from mrcnn_edu import backbone as bb

TOL = dict(rtol=1e-5, atol=1e-5)
IMAGE_SIZE = (128, 160)
TV_LAYERS = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
TV_FPN_NAMES = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every (frozen) batch norm non-trivial statistics and affine parameters."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, TVFrozenBatchNorm2d, bb.FrozenBatchNorm2d)):
            c = m.running_mean.numel()
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def randomise_fpn_biases(fpn: nn.Module, generator: torch.Generator) -> None:
    for m in fpn.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            with torch.no_grad():
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


def images(n: int = 1, size=IMAGE_SIZE) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# Norm layers
# ---------------------------------------------------------------------------------------------


def test_frozen_batchnorm_matches_torchvision_and_loads_batchnorm_state():
    g = torch.Generator().manual_seed(2)
    bn = nn.BatchNorm2d(8)
    randomise_norms(bn, g)
    ours, theirs = bb.FrozenBatchNorm2d(8), TVFrozenBatchNorm2d(8)
    ours.load_state_dict(bn.state_dict())  # has num_batches_tracked: must be ignored
    theirs.load_state_dict(bn.state_dict())
    x = torch.randn(2, 8, 5, 3, generator=g)
    assert_close(ours(x), theirs(x), **TOL)
    assert_close(ours(x), bn.eval()(x), **TOL)
    assert list(ours.parameters()) == []  # nothing to train
    assert sorted(ours.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_make_norm_kinds():
    assert isinstance(bb.make_norm("frozen", 64), bb.FrozenBatchNorm2d)
    assert isinstance(bb.make_norm("batch", 64), nn.BatchNorm2d)
    assert [bb.make_norm("group", c).num_groups for c in (64, 256, 32, 16, 24)] == [32, 32, 32, 16, 8]
    with pytest.raises(ValueError, match=r"kind must be one of 'frozen', 'batch', 'group'; got 'layer'"):
        bb.make_norm("layer", 64)


# ---------------------------------------------------------------------------------------------
# (a) ResNet-50 trunk vs torchvision
# ---------------------------------------------------------------------------------------------


def test_resnet50_matches_torchvision_with_random_frozen_norms():
    theirs = torchvision.models.resnet50(weights=None, norm_layer=TVFrozenBatchNorm2d)
    randomise_norms(theirs, torch.Generator().manual_seed(3))
    ours = bb.resnet50()
    bb.load_torchvision_resnet(ours, theirs.state_dict())

    x = images()
    with torch.no_grad():
        expected = IntermediateLayerGetter(theirs, TV_LAYERS)(x)
        got = ours(x)
    assert list(got) == ["c2", "c3", "c4", "c5"]
    assert ours.out_channels_per_level == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}
    for level, feature in expected.items():
        assert feature.abs().max() > 0.1  # non-trivial values
        assert_close(got[level], feature, **TOL)
        assert got[level].shape[-1] == math.ceil(IMAGE_SIZE[1] / ours.strides[level])


# ---------------------------------------------------------------------------------------------
# (b) ResNet-50 + FPN vs torchvision's resnet_fpn_backbone
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_r50_fpn():
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    g = torch.Generator().manual_seed(4)
    randomise_norms(theirs, g)
    randomise_fpn_biases(theirs.fpn, g)
    with torch.no_grad():
        expected = theirs(images())
    return theirs, expected


@pytest.mark.parametrize("prefixed", [False, True], ids=["backbone_keys", "maskrcnn_keys"])
def test_resnet50_fpn_matches_torchvision(torchvision_r50_fpn, prefixed):
    theirs, expected = torchvision_r50_fpn
    state = theirs.state_dict()
    if prefixed:  # as inside a whole Mask R-CNN checkpoint, with other stages' keys around
        state = {f"backbone.{k}": v for k, v in state.items()}
        state["rpn.head.conv.0.0.weight"] = torch.zeros(1)
    ours = bb.resnet50_fpn()
    bb.load_torchvision_backbone(ours, state)
    with torch.no_grad():
        got = ours(images())
    assert list(got) == ["p2", "p3", "p4", "p5", "p6"]
    for their_name, our_name in TV_FPN_NAMES.items():
        assert_close(got[our_name], expected[their_name], **TOL)
    # same trainable parameters, under the renamed keys
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {bb.torchvision_backbone_key_map(n)
                        for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_trainable == theirs_trainable


def test_fpn_alone_matches_torchvision_including_init():
    in_channels = [8, 16, 32, 64]
    torch.manual_seed(5)
    theirs = TVFeaturePyramidNetwork(in_channels, 16, extra_blocks=LastLevelMaxPool())
    torch.manual_seed(5)
    ours = bb.FeaturePyramidNetwork(in_channels, 16)
    # same init scheme, in the same order -> the same weights from the same seed
    assert_close(ours.state_dict(), fpn_state_as_ours(theirs))
    g = torch.Generator().manual_seed(6)
    randomise_fpn_biases(theirs, g)
    ours.load_state_dict(fpn_state_as_ours(theirs))
    # odd sizes: 25x33 -> 13x17 -> 7x9 -> 4x5
    feats = OrderedDict((f"c{k + 2}", torch.randn(2, c, *s, generator=g))
                        for k, (c, s) in enumerate(zip(in_channels, [(25, 33), (13, 17), (7, 9), (4, 5)])))
    expected = theirs(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))
    got = ours(feats)
    for their_name, our_name in TV_FPN_NAMES.items():
        assert_close(got[our_name], expected[their_name], **TOL)
    assert got["p6"].shape[-2:] == (2, 3)


def fpn_state_as_ours(tv_fpn: nn.Module) -> dict:
    """A torchvision FeaturePyramidNetwork's state dict under our FPN's key names."""
    # "inner_blocks.0.0.weight" -> "fpn.inner_blocks.0.0.weight" -> "fpn.lateral_convs.0.weight"
    #   -> "lateral_convs.0.weight"
    return {bb.torchvision_backbone_key_map("fpn." + k).removeprefix("fpn."): v
            for k, v in tv_fpn.state_dict().items()}


def test_key_map():
    m = bb.torchvision_backbone_key_map
    assert m("fpn.inner_blocks.0.0.weight") == "fpn.lateral_convs.0.weight"
    assert m("fpn.layer_blocks.3.0.bias") == "fpn.output_convs.3.bias"
    assert m("backbone.fpn.inner_blocks.2.0.bias") == "backbone.fpn.lateral_convs.2.bias"
    # keys saved before torchvision 0.13 (e.g. its COCO Mask R-CNN checkpoint) have no ".0"
    assert m("backbone.fpn.layer_blocks.1.weight") == "backbone.fpn.output_convs.1.weight"
    assert m("fpn.inner_blocks.3.bias") == "fpn.lateral_convs.3.bias"
    assert m("body.layer1.0.downsample.0.weight") == "body.layer1.0.downsample.0.weight"
    assert m("backbone.body.bn1.running_var") == "backbone.body.bn1.running_var"


# ---------------------------------------------------------------------------------------------
# (c) freezing: the same requires_grad pattern as torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable_layers", [0, 3, 5])
@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_trainable_layers_match_torchvision(trainable_layers, norm):
    norm_layer = TVFrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=norm_layer,
                                 trainable_layers=trainable_layers)
    ours = bb.resnet18(norm=norm, trainable_layers=trainable_layers)
    their_flags = {n: p.requires_grad for n, p in theirs.body.named_parameters()}
    our_flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert our_flags == their_flags
    assert any(our_flags.values()) == (trainable_layers > 0)
    assert all(our_flags.values()) == (trainable_layers == 5)


def test_resnet50_fpn_trainable_layers_default_and_unfreeze():
    model = bb.resnet50_fpn()
    frozen = {n.split(".")[0] for n, p in model.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # frozen norm: no bn parameters at all
    assert all(p.requires_grad for p in model.fpn.parameters())
    model.body.set_trainable_layers(5)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# (d) trainable batch norm in train mode: forward, running stats and gradients
# ---------------------------------------------------------------------------------------------


def test_batch_norm_training_matches_torchvision():
    theirs = torchvision.models.resnet18(weights=None)  # nn.BatchNorm2d
    randomise_norms(theirs, torch.Generator().manual_seed(7))
    ours = bb.resnet18(norm="batch", trainable_layers=5)
    bb.load_torchvision_resnet(ours, theirs.state_dict())
    theirs_body = IntermediateLayerGetter(theirs, TV_LAYERS)
    theirs_body.train()
    ours.train()

    x = images(2)
    expected, got = theirs_body(x), ours(x)
    for level in expected:
        assert_close(got[level], expected[level], **TOL)

    def loss(features):
        return sum((f ** 2).mean() for f in features.values())

    loss(expected).backward()
    loss(got).backward()
    assert_close(ours.layer1[0].conv1.weight.grad, theirs.layer1[0].conv1.weight.grad, **TOL)
    assert_close(ours.bn1.weight.grad, theirs.bn1.weight.grad, **TOL)
    assert_close(ours.layer4[1].bn2.running_var, theirs.layer4[1].bn2.running_var, **TOL)
    assert ours.bn1.num_batches_tracked.item() == theirs.bn1.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------------------------
# (e) top_down_merge on hand-checkable tensors
# ---------------------------------------------------------------------------------------------


def test_top_down_merge_golden_values():
    top = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)

    out = bb.top_down_merge(top, torch.zeros(1, 1, 4, 4))
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    assert_close(out[0, 0], expected)

    # odd target: source row = floor(i * 2 / 5) -> 0,0,0,1,1; column = floor(j * 2 / 3) -> 0,0,1
    lateral = torch.arange(15.0).reshape(1, 1, 5, 3)
    out = bb.top_down_merge(top, lateral)
    upsampled = torch.tensor([[1.0, 1, 2], [1, 1, 2], [1, 1, 2], [3, 3, 4], [3, 3, 4]])
    assert_close(out[0, 0], upsampled + lateral[0, 0])


# ---------------------------------------------------------------------------------------------
# (f) feature_shapes equals a real forward, odd sizes included
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(97, 131), (128, 160), (33, 47), (64, 64)])
def test_feature_shapes_match_forward(size):
    model = bb.small_fpn()  # train mode on purpose: feature_shapes must not care
    shapes = bb.feature_shapes(model, image_size=size)
    with torch.no_grad():
        real = model.eval()(images(1, size))
    assert [s["level"] for s in shapes] == list(real)
    assert [s["shape"] for s in shapes] == [tuple(f.shape) for f in real.values()]
    assert [s["stride"] for s in shapes] == [4, 8, 16, 32, 64]
    assert all(s["channels"] == 64 for s in shapes)
    for s in shapes:  # every stride-2 layer rounds up
        assert s["shape"][-2:] == (math.ceil(size[0] / s["stride"]), math.ceil(size[1] / s["stride"]))
    # the weights stay real
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_feature_shapes_resnet50_and_body():
    model = bb.resnet50_fpn()
    shapes = bb.feature_shapes(model, image_size=(97, 131))
    assert [s["shape"] for s in shapes] == [(1, 256, 25, 33), (1, 256, 13, 17), (1, 256, 7, 9),
                                            (1, 256, 4, 5), (1, 256, 2, 3)]
    body_shapes = bb.feature_shapes(model.body, image_size=(97, 131))
    assert [(s["level"], s["channels"], s["stride"]) for s in body_shapes] == [
        ("c2", 256, 4), ("c3", 512, 8), ("c4", 1024, 16), ("c5", 2048, 32)]


# ---------------------------------------------------------------------------------------------
# (g) receptive fields
# ---------------------------------------------------------------------------------------------


def test_receptive_field_grows_with_level():
    model = bb.small_fpn()
    model.train()
    extents = {level: bb.receptive_field_extent(bb.gradient_receptive_field(model, IMAGE_SIZE, level))
               for level in ["c2", "c3", "c4", "c5", "p2"]}
    # theoretical sizes of resnet_small: stem 7x7/2 -> 7, maxpool 3x3/2 -> 11, then each 3x3 conv
    # adds 2 * (its input stride): layer1 -> 27, layer2 -> 51, layer3 -> 99, layer4 -> 195
    assert extents["c2"] == (27, 27)
    assert extents["c3"] == (51, 51)
    assert extents["c4"] == (99, 99)
    assert extents["c5"] == IMAGE_SIZE  # 195 > the image: clipped
    # the top-down pathway lets even p2 see what c5 sees
    assert extents["p2"] == IMAGE_SIZE
    assert model.training  # mode restored


def test_gradient_receptive_field_map():
    grad = bb.gradient_receptive_field(bb.resnet_small(), (64, 64), "c2")
    assert grad.shape == (64, 64)
    assert (grad >= 0).all()
    # the centre cell of the 16x16 c2 map is (8, 8); c2 cell i sees pixels 4i - 13 ... 4i + 13
    rows = torch.nonzero(grad.sum(dim=1)).flatten()
    cols = torch.nonzero(grad.sum(dim=0)).flatten()
    assert (rows[0].item(), rows[-1].item()) == (4 * 8 - 13, 4 * 8 + 13)
    assert (cols[0].item(), cols[-1].item()) == (4 * 8 - 13, 4 * 8 + 13)


def test_receptive_field_extent_golden():
    g = torch.zeros(6, 7)
    assert bb.receptive_field_extent(g) == (0, 0)
    g[1, 2] = 0.5
    g[3, 5] = -1.0
    assert bb.receptive_field_extent(g) == (3, 4)


# ---------------------------------------------------------------------------------------------
# (h) bad inputs give clear errors naming the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, what", [
    (torch.rand(3, 32, 32), r"\(3, 32, 32\)"),
    (torch.rand(1, 1, 32, 32), r"\(1, 1, 32, 32\)"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "uint8"),
    ([torch.rand(3, 32, 32)], "list"),
])
def test_backbone_rejects_bad_images(bad, what):
    model = bb.small_fpn()
    with pytest.raises(ValueError, match=r"images must be a float tensor of shape \(N, 3, H, W\).*" + what):
        model(bad)
    with pytest.raises(ValueError, match=r"x must be a float tensor"):
        model.body(bad)


def test_constructor_and_helper_errors():
    with pytest.raises(ValueError, match="norm must be one of 'frozen', 'batch', 'group'; got 'bn'"):
        bb.resnet50(norm="bn")
    with pytest.raises(ValueError, match=r"trainable_layers must be an int in 0..5, got 6"):
        bb.resnet_small(trainable_layers=6)
    with pytest.raises(ValueError, match="top and lateral .* got top shape \\(1, 2, 2, 2\\)"):
        bb.top_down_merge(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 4, 4))
    fpn = bb.FeaturePyramidNetwork([4, 8], 8)
    with pytest.raises(ValueError, match=r"features must have the keys \['c2', 'c3'\]"):
        fpn(OrderedDict([("0", torch.zeros(1, 4, 4, 4)), ("1", torch.zeros(1, 8, 2, 2))]))
    with pytest.raises(ValueError, match="level must be one of"):
        bb.gradient_receptive_field(bb.small_fpn(), (32, 32), "p9")
    with pytest.raises(ValueError, match="grad_map must be a 2-D"):
        bb.receptive_field_extent(torch.zeros(1, 4, 4))


# ---------------------------------------------------------------------------------------------
# (i) the small CPU model
# ---------------------------------------------------------------------------------------------


def test_small_model_is_small_and_has_declared_strides():
    body = bb.resnet_small()
    model = bb.small_fpn()
    assert sum(p.numel() for p in body.parameters()) < 2_000_000
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(body.bn1, nn.BatchNorm2d)
    assert model.out_channels == 64
    assert model.strides == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    out = model(images(2))  # train mode, batch of 2
    for level, feature in out.items():
        stride = model.strides[level]
        h, w = math.ceil(IMAGE_SIZE[0] / stride), math.ceil(IMAGE_SIZE[1] / stride)
        assert feature.shape == (2, 64, h, w)
    sum(f.mean() for f in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_group_norm_model_runs():
    model = bb.small_fpn(norm="group")
    assert isinstance(model.body.layer1[0].bn1, nn.GroupNorm)
    out = model(images(1, (64, 64)))
    assert out["p6"].shape == (1, 64, 1, 1)


# ---------------------------------------------------------------------------------------------
# (j) mismatched state dicts: clear errors, nothing loaded
# ---------------------------------------------------------------------------------------------


def test_load_mismatched_resnet_raises_and_loads_nothing():
    ours = bb.resnet50()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    state = torchvision.models.resnet18(weights=None).state_dict()
    expected_message = "state_dict from a torchvision ResNet does not match this ResNet"
    with pytest.raises(ValueError, match=expected_message) as info:
        bb.load_torchvision_resnet(ours, state)
    message = str(info.value)
    assert "missing keys, e.g. ['layer1.0.conv3.weight'" in message  # resnet18 blocks have no conv3
    assert "shape mismatches" in message
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_mismatched_backbone_raises():
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    ours = bb.small_fpn(norm="frozen")
    with pytest.raises(ValueError, match="torchvision BackboneWithFPN does not match this BackboneWithFPN"):
        bb.load_torchvision_backbone(ours, theirs.state_dict())
    # an extra key alone is reported as unexpected
    state = {bb.torchvision_backbone_key_map(k): v for k, v in ours.state_dict().items()}
    state["fpn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 unexpected keys, e\.g\. \['fpn\.extra\.weight'\]"):
        bb.load_torchvision_backbone(ours, state)
    # batch-norm weights into a group-norm model: the running statistics have nowhere to go
    with pytest.raises(ValueError, match="unexpected keys.*running_mean"):
        bb.load_torchvision_resnet(bb.resnet18(norm="group"),
                                   torchvision.models.resnet18(weights=None).state_dict())
