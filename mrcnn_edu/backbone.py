"""The backbone: a ResNet trunk and a Feature Pyramid Network (image -> multi-scale feature maps).

Taught in: ``notebooks/01_backbone.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    C     channels (of whatever tensor the line is about)
    H, W  height and width of the input images
    h, w  height and width of one feature map
    L     number of pyramid levels
    H/4   short for ceil(H / 4): every stride-2 layer here rounds *up* (an odd 97 becomes 49)

Level names follow the FPN paper: ``c2..c5`` are the outputs of the ResNet stages ``layer1..layer4``
(``c`` for "conv"), ``p2..p6`` the pyramid levels built from them. Level ``k`` has stride ``2**k``:
one cell of ``p4`` covers a 16 x 16 patch of the image.

Everything here is layer-for-layer torchvision's ``resnet_fpn_backbone(backbone_name="resnet50")``
(same attribute names in the trunk, same numbers), so torchvision weights load into it; the
tests in ``tests/test_backbone.py`` check this.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn_edu.utils import check_images, load_mapped_state_dict, load_state_dict_checked

NORM_KINDS = ("frozen", "batch", "group")
"""Normalisation layers a ResNet can be built with (see :func:`make_norm`)."""

BODY_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
"""How many image pixels one cell of each ResNet level steps over."""

FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
"""How many image pixels one cell of each pyramid level steps over."""

# torchvision unfreezes the trunk from the top: trainable_layers=1 trains layer4 only,
# 2 trains layer4 and layer3, ..., 5 trains everything including the stem (conv1 and bn1).
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


# ----------------------------------------------------------------------------------------------
# Normalisation layers
# ----------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and fixed affine parameters: a per-channel ``x * a + b``.

    Detection models train with 1-2 images per GPU, far too few for good batch statistics, so a
    pretrained trunk keeps the ImageNet statistics frozen. All four tensors are *buffers*, not
    parameters: they are saved and loaded with the model but never trained.

    Args:
        num_features (int): number of channels C of the input (N, C, h, w).
        eps (float): added to the variance before the square root.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A BatchNorm2d state dict also holds `num_batches_tracked`, a training counter we do
        # not need: drop it (as torchvision does) so BatchNorm2d weights load into this layer.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor[N, C, h, w]) -> Tensor[N, C, h, w], normalised with the stored statistics."""
        # (C,) -> (1, C, 1, 1) so that each tensor broadcasts over N, h and w
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        # (x - mean) / sqrt(var + eps) * weight + bias, folded into one multiply and one add
        scale = weight * (running_var + self.eps).rsqrt()
        shift = bias - running_mean * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(kind: str, num_channels: int) -> nn.Module:
    """Build the normalisation layer for ``num_channels`` channels.

    Args:
        kind (str): one of
            ``"frozen"``: :class:`FrozenBatchNorm2d`, for a pretrained trunk (what detection
            models use; nothing to train);
            ``"batch"``: ``nn.BatchNorm2d``, trainable, statistics from the batch;
            ``"group"``: ``nn.GroupNorm`` with 32 groups (fewer when the channels do not split
            into 32), trainable and independent of the batch size.
        num_channels (int): channels C of the (N, C, h, w) input.
    """
    _check_choice("kind", kind, NORM_KINDS)
    if kind == "frozen":
        return FrozenBatchNorm2d(num_channels)
    if kind == "batch":
        return nn.BatchNorm2d(num_channels)
    # the largest group count <= 32 that divides num_channels: 64 -> 32, 16 -> 16, 24 -> 8
    num_groups = math.gcd(32, num_channels)
    return nn.GroupNorm(num_groups, num_channels)


# ----------------------------------------------------------------------------------------------
# ResNet blocks and trunk
# ----------------------------------------------------------------------------------------------


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the norm layer after it has one)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _make_downsample(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    """The shortcut branch of a block: identity if shapes match, else a strided 1x1 conv + norm."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), make_norm(norm, out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut (ResNet-18/34).

    Args:
        in_channels (int): channels of the input.
        width (int): channels of both 3x3 convolutions; the output has ``width * expansion``.
        stride (int): 2 halves h and w (in ``conv1`` and in the shortcut), 1 keeps them.
        norm (str): see :func:`make_norm`.

    Shapes: x (Tensor[N, in_channels, h, w]) -> Tensor[N, width, h/stride, w/stride].
    """

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, norm: str = "frozen") -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = make_norm(norm, width)
        self.conv2 = conv3x3(width, out_channels)
        self.bn2 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _make_downsample(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand 4x) plus a shortcut (ResNet-50/101/152).

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5"); the original paper
    put it on the first 1x1.

    Args:
        in_channels (int): channels of the input.
        width (int): channels inside the block; the output has ``width * 4``.
        stride (int): 2 halves h and w (in ``conv2`` and in the shortcut), 1 keeps them.
        norm (str): see :func:`make_norm`.

    Shapes: x (Tensor[N, in_channels, h, w]) -> Tensor[N, 4 * width, h/stride, w/stride].
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, norm: str = "frozen") -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = make_norm(norm, width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = make_norm(norm, width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _make_downsample(in_channels, out_channels, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """The ResNet trunk without its classifier: image -> feature maps c2, c3, c4, c5.

    Args:
        block (type): :class:`BasicBlock` or :class:`Bottleneck`.
        layers (list[int]): blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50.
        widths (tuple[int, int, int, int]): block width of each stage; stage k outputs
            ``widths[k] * block.expansion`` channels.
        stem_width (int): channels of the 7x7 stem convolution.
        norm (str): ``"frozen"``, ``"batch"`` or ``"group"`` (see :func:`make_norm`).
        trainable_layers (int): 0..5, how many stages get gradients, counted from the top
            (torchvision's ``resnet_fpn_backbone`` rule): 0 freezes everything, 3 trains
            layer4, layer3 and layer2, 5 trains everything. See :meth:`set_trainable_layers`.

    Attributes:
        out_channels_per_level (dict[str, int]): ``{"c2": C2, ..., "c5": C5}``.
        strides (dict[str, int]): ``{"c2": 4, "c3": 8, "c4": 16, "c5": 32}``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem_width: int = 64,
        norm: str = "frozen",
        trainable_layers: int = 5,
    ) -> None:
        super().__init__()
        _check_choice("norm", norm, NORM_KINDS)
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 entries (one per stage), got {layers}, {widths}")

        # stem: (N, 3, H, W) -> conv 7x7/2 -> (N, stem, H/2, W/2) -> maxpool 3x3/2 -> (N, stem, H/4, W/4)
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # four stages; all but the first halve h and w in their first block
        channels = stem_width
        self.layer1, channels = self._make_stage(block, channels, widths[0], layers[0], 1, norm)
        self.layer2, channels = self._make_stage(block, channels, widths[1], layers[1], 2, norm)
        self.layer3, channels = self._make_stage(block, channels, widths[2], layers[2], 2, norm)
        self.layer4, channels = self._make_stage(block, channels, widths[3], layers[3], 2, norm)

        self.out_channels_per_level = {
            f"c{k + 2}": width * block.expansion for k, width in enumerate(widths)
        }
        self.strides = dict(BODY_STRIDES)

        # torchvision's initialisation: He (Kaiming) normal for convolutions, norm layers as identity
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.set_trainable_layers(trainable_layers)

    @staticmethod
    def _make_stage(block, in_channels, width, num_blocks, stride, norm) -> tuple[nn.Sequential, int]:
        """``num_blocks`` blocks; only the first one changes the stride/channels."""
        blocks = [block(in_channels, width, stride, norm)]
        out_channels = width * block.expansion
        for _ in range(1, num_blocks):
            blocks.append(block(out_channels, width, 1, norm))
        return nn.Sequential(*blocks), out_channels

    def set_trainable_layers(self, trainable_layers: int) -> None:
        """Let the top ``trainable_layers`` stages (0..5) train and freeze the rest.

        Same rule as torchvision's ``resnet_fpn_backbone``: 1 = layer4, 2 = + layer3,
        3 = + layer2, 4 = + layer1, 5 = + the stem (conv1 and bn1), i.e. everything.
        Freezing sets ``requires_grad=False``; it does not stop a ``"batch"`` norm layer from
        updating its running statistics in train mode (``norm="frozen"`` fixes those too).
        Can be called again later, e.g. to unfreeze everything for fine-tuning.
        """
        if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be an int in 0..5, got {trainable_layers!r}")
        trainable = list(_TRAINABLE_ORDER[:trainable_layers])
        if trainable_layers == 5:
            trainable.append("bn1")
        for name, parameter in self.named_parameters():
            top_module = name.split(".")[0]  # "layer3.1.conv2.weight" -> "layer3"
            parameter.requires_grad_(top_module in trainable)
        self.trainable_layers = trainable_layers

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Run the trunk.

        Args:
            x (Tensor[N, 3, H, W]): float images.

        Returns:
            OrderedDict with ``c2`` (Tensor[N, C2, H/4, W/4]), ``c3`` (Tensor[N, C3, H/8, W/8]),
            ``c4`` (Tensor[N, C4, H/16, W/16]) and ``c5`` (Tensor[N, C5, H/32, W/32]).
        """
        check_images("x", x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 3, H, W) -> (N, stem, H/4, W/4)
        c2 = self.layer1(x)  # (N, C2, H/4, W/4)
        c3 = self.layer2(c2)  # (N, C3, H/8, W/8)
        c4 = self.layer3(c3)  # (N, C4, H/16, W/16)
        c5 = self.layer4(c4)  # (N, C5, H/32, W/32)
        return OrderedDict([("c2", c2), ("c3", c3), ("c4", c4), ("c5", c5)])


def resnet50(norm: str = "frozen", trainable_layers: int = 3) -> ResNet:
    """ResNet-50 trunk (Bottleneck, [3, 4, 6, 3]): c2..c5 have 256, 512, 1024, 2048 channels.

    The defaults are those of torchvision's detection models (frozen norm, top 3 stages trainable).
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], norm=norm, trainable_layers=trainable_layers)


def resnet18(norm: str = "frozen", trainable_layers: int = 3) -> ResNet:
    """ResNet-18 trunk (BasicBlock, [2, 2, 2, 2]): c2..c5 have 64, 128, 256, 512 channels."""
    return ResNet(BasicBlock, [2, 2, 2, 2], norm=norm, trainable_layers=trainable_layers)


SMALL_WIDTHS = (32, 64, 128, 256)
"""Stage widths of :func:`resnet_small` unless told otherwise."""


def resnet_small(norm: str = "batch", trainable_layers: int = 5,
                 widths: tuple[int, int, int, int] = SMALL_WIDTHS) -> ResNet:
    """A small CPU-friendly trunk for training from scratch: BasicBlock, one block per stage.

    c2..c5 have ``widths`` channels (default 32, 64, 128, 256: about 1.2 M parameters, 5 MB) and
    the stem ``widths[0]``; same strides as ResNet-50. Trainable batch norm by default, since
    there are no pretrained weights for it.
    """
    return ResNet(BasicBlock, [1, 1, 1, 1], widths=tuple(widths), stem_width=widths[0],
                  norm=norm, trainable_layers=trainable_layers)


# ----------------------------------------------------------------------------------------------
# Feature Pyramid Network
# ----------------------------------------------------------------------------------------------


def top_down_merge(top: Tensor, lateral: Tensor) -> Tensor:
    """One FPN merge step: upsample the coarser map to the finer one's size and add them.

    Nearest-neighbour upsampling copies each cell of ``top`` into a block of cells; with an
    explicit output ``size`` it also handles odd sizes (a 2x2 map onto a 5x3 one).

    Args:
        top (Tensor[N, C, h, w]): the coarser, already merged level (e.g. from p5).
        lateral (Tensor[N, C, H', W']): the finer level after its 1x1 lateral conv (e.g. from c4).

    Returns:
        Tensor[N, C, H', W']: ``lateral + upsample(top)``.
    """
    if top.dim() != 4 or lateral.dim() != 4 or top.shape[:2] != lateral.shape[:2]:
        raise ValueError(
            "top and lateral must be 4-D (N, C, h, w) tensors with the same N and C, "
            f"got top shape {tuple(top.shape)} and lateral shape {tuple(lateral.shape)}"
        )
    # (N, C, h, w) -> (N, C, H', W')
    top_upsampled = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    return lateral + top_upsampled


class FeaturePyramidNetwork(nn.Module):
    """FPN (Lin et al., 2017): turns c2..c5 into p2..p6, all with ``out_channels`` channels.

    1. a 1x1 *lateral* conv brings every c_k to ``out_channels``;
    2. top-down, each level adds the upsampled level above it (:func:`top_down_merge`);
    3. a 3x3 *output* conv smooths every merged map into p_k;
    4. p6 subsamples p5 by 2 (a max-pool with kernel 1 and stride 2, torchvision's
       ``LastLevelMaxPool``); the RPN uses it for the largest anchors.

    Args:
        in_channels_list (list[int]): channels of c2, c3, ... in that order.
        out_channels (int): channels of every pyramid level.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, kernel_size=1) for in_channels in in_channels_list
        )
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels_list
        )
        # torchvision's initialisation
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Build the pyramid.

        Args:
            features (OrderedDict[str, Tensor]): ``c2`` (Tensor[N, C2, H/4, W/4]) ...
                ``c5`` (Tensor[N, C5, H/32, W/32]), finest first, as returned by :class:`ResNet`.

        Returns:
            OrderedDict ``p2`` ... ``p6``: Tensor[N, out_channels, H/4, W/4] ...
            Tensor[N, out_channels, H/64, W/64].
        """
        expected_names = [f"c{k + 2}" for k in range(len(self.lateral_convs))]
        if list(features.keys()) != expected_names:
            raise ValueError(f"features must have the keys {expected_names} in this order, "
                             f"got {list(features.keys())}")
        c_maps = list(features.values())

        # 1. lateral 1x1 convs: (N, C_k, h_k, w_k) -> (N, out_channels, h_k, w_k)
        laterals = [conv(c) for conv, c in zip(self.lateral_convs, c_maps)]

        # 2. top-down pathway, from the coarsest level (c5) to the finest (c2)
        merged = list(laterals)
        for k in range(len(merged) - 2, -1, -1):
            merged[k] = top_down_merge(merged[k + 1], laterals[k])

        # 3. 3x3 output convs: (N, out_channels, h_k, w_k), same shape
        outputs = [conv(m) for conv, m in zip(self.output_convs, merged)]

        pyramid = OrderedDict((f"p{k + 2}", p) for k, p in enumerate(outputs))
        # 4. one more, coarser level: keep every other cell of the last one,
        # (N, out_channels, h, w) -> (N, out_channels, ceil(h/2), ceil(w/2))
        pyramid[f"p{len(outputs) + 2}"] = F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0)
        return pyramid


class BackboneWithFPN(nn.Module):
    """A trunk (``body``) followed by an FPN (``fpn``): images -> pyramid p2..p6.

    Args:
        body (ResNet): returns c2..c5.
        fpn (FeaturePyramidNetwork): turns them into p2..p6.

    Attributes:
        out_channels (int): channels of every pyramid level (what the RPN and heads expect).
        strides (dict[str, int]): ``{"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}``.
    """

    def __init__(self, body: ResNet, fpn: FeaturePyramidNetwork) -> None:
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels
        self.strides = dict(FPN_STRIDES)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        """images (Tensor[N, 3, H, W]) -> OrderedDict p2..p6, p_k: Tensor[N, out_channels, H/2^k, W/2^k]."""
        check_images("images", images)
        return self.fpn(self.body(images))


def resnet50_fpn(
    norm: str = "frozen", trainable_layers: int = 3, out_channels: int = 256
) -> BackboneWithFPN:
    """ResNet-50 + FPN, layer for layer torchvision's
    ``resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)``."""
    body = resnet50(norm=norm, trainable_layers=trainable_layers)
    fpn = FeaturePyramidNetwork(list(body.out_channels_per_level.values()), out_channels)
    return BackboneWithFPN(body, fpn)


def small_fpn(out_channels: int = 64, norm: str = "batch", trainable_layers: int = 5,
              widths: tuple[int, int, int, int] = SMALL_WIDTHS) -> BackboneWithFPN:
    """:func:`resnet_small` + FPN with ``out_channels`` channels: about 1.4 M parameters with the
    default widths, CPU-trainable."""
    body = resnet_small(norm=norm, trainable_layers=trainable_layers, widths=widths)
    fpn = FeaturePyramidNetwork(list(body.out_channels_per_level.values()), out_channels)
    return BackboneWithFPN(body, fpn)


# ----------------------------------------------------------------------------------------------
# Loading torchvision weights
# ----------------------------------------------------------------------------------------------


def load_torchvision_resnet(model: ResNet, state_dict: Mapping[str, Tensor]) -> None:
    """Load a torchvision ResNet state dict (``torchvision.models.resnet50().state_dict()``) into ``model``.

    The classifier (``fc.*``) is dropped: our trunk has none. All other names are the same.

    Raises:
        ValueError: if the architectures do not match (lists missing/unexpected keys and shape
            mismatches). Nothing is loaded in that case.
    """
    trunk_state = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    load_state_dict_checked(model, trunk_state, "a torchvision ResNet")


def torchvision_backbone_key_map(torchvision_key: str) -> str:
    """Rename one key of a torchvision ``BackboneWithFPN`` state dict to ours.

    The trunk keys (``body.*``) are the same; the FPN convs have readable names here, and
    torchvision wraps each conv in a ``Conv2dNormActivation`` (the extra ``.0``; checkpoints
    saved before torchvision 0.13 have no ``.0``). Any prefix (``backbone.``) is kept::

        fpn.inner_blocks.2.0.weight          -> fpn.lateral_convs.2.weight
        fpn.layer_blocks.0.0.bias            -> fpn.output_convs.0.bias
        backbone.fpn.inner_blocks.1.weight   -> backbone.fpn.lateral_convs.1.weight
        body.layer1.0.conv1.weight           -> body.layer1.0.conv1.weight
    """
    key = re.sub(r"fpn\.inner_blocks\.(\d+)\.(0\.)?", r"fpn.lateral_convs.\1.", torchvision_key)
    key = re.sub(r"fpn\.layer_blocks\.(\d+)\.(0\.)?", r"fpn.output_convs.\1.", key)
    return key


def load_torchvision_backbone(backbone: BackboneWithFPN, state_dict: Mapping[str, Tensor]) -> None:
    """Load the state dict of a torchvision ``BackboneWithFPN`` into ``backbone``.

    Accepts the backbone's own keys (``body.layer1.0.conv1.weight``, ``fpn.inner_blocks.0.0.weight``)
    or a whole Mask R-CNN state dict, whose backbone keys start with ``backbone.``; the other
    keys of such a checkpoint (``rpn.*``, ``roi_heads.*``) belong to later stages and are ignored.

    Raises:
        ValueError: if the architectures do not match (lists missing/unexpected keys and shape
            mismatches). Nothing is loaded in that case.
    """
    load_mapped_state_dict(backbone, state_dict, "backbone.", torchvision_backbone_key_map,
                           "a torchvision BackboneWithFPN")


# ----------------------------------------------------------------------------------------------
# Teaching helpers: shapes and receptive fields
# ----------------------------------------------------------------------------------------------


def feature_shapes(backbone: nn.Module, image_size: tuple[int, int] = (800, 1088)) -> list[dict]:
    """Shapes of every level for one image of ``image_size``, without computing anything.

    The backbone runs on *meta* tensors, which carry a shape and a dtype but no data: each layer
    only works out its output shape, so this is instant even for a large image and exact for odd
    sizes (97 -> 49 -> 25 ...).

    Args:
        backbone (BackboneWithFPN or ResNet): anything with ``strides`` that maps images to a dict.
        image_size (tuple[int, int]): (H, W).

    Returns:
        list of dicts, one per level, finest first: ``{"level": "p2", "stride": 4,
        "channels": 256, "shape": (1, 256, h, w)}``.
    """
    height, width = image_size
    # meta stand-ins for every weight and buffer; the real ones are left untouched
    tensors = {**dict(backbone.named_parameters()), **dict(backbone.named_buffers())}
    meta_tensors = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    images = torch.empty(1, 3, height, width, device="meta")
    with _eval_mode(backbone):  # batch norm in train mode would refuse a 1x1 map of one image
        features = torch.func.functional_call(backbone, meta_tensors, (images,))
    return [
        {"level": level, "stride": backbone.strides[level], "channels": f.shape[1], "shape": tuple(f.shape)}
        for level, f in features.items()
    ]


def gradient_receptive_field(
    backbone: nn.Module, image_size: tuple[int, int] = (256, 256), level: str = "p4", seed: int = 0
) -> Tensor:
    """Which input pixels influence the centre cell of one level: |d output / d input|.

    Runs a random image (fixed ``seed``) through the backbone in eval mode, sums the chosen
    level's channels at its centre cell and backpropagates to the image. Pixels with a nonzero
    gradient form the *receptive field*; how the gradient is spread over it is the *effective*
    receptive field (Luo et al., 2016), usually much more concentrated than the theoretical one.
    Note that through the FPN's top-down pathway even a ``p2`` cell sees what ``c5`` sees.

    Args:
        backbone (BackboneWithFPN or ResNet): ``c*`` levels of a BackboneWithFPN come from its body.
        image_size (tuple[int, int]): (H, W).
        level (str): ``"c2"..."c5"`` or ``"p2"..."p6"``.

    Returns:
        Tensor[H, W]: |gradient| summed over the 3 colour channels.
    """
    model = backbone.body if level.startswith("c") and hasattr(backbone, "body") else backbone
    if level not in model.strides:
        raise ValueError(f"level must be one of {list(model.strides)}, got {level!r}")
    generator = torch.Generator().manual_seed(seed)
    device = next(backbone.parameters()).device
    images = torch.rand(1, 3, *image_size, generator=generator).to(device).requires_grad_(True)

    with _eval_mode(model):  # batch norm uses its running statistics, as at inference time
        feature = model(images)[level]  # (1, C, h, w)
        centre_row, centre_col = feature.shape[-2] // 2, feature.shape[-1] // 2
        centre = feature[0, :, centre_row, centre_col].sum()  # (C,) -> scalar
        (grad,) = torch.autograd.grad(centre, images)  # (1, 3, H, W)
    return grad[0].abs().sum(dim=0)  # (1, 3, H, W) -> (H, W)


def receptive_field_extent(grad_map: Tensor) -> tuple[int, int]:
    """(height, width) of the bounding box of the nonzero pixels of ``grad_map`` (Tensor[H, W]).

    (0, 0) if every pixel is zero.
    """
    if grad_map.dim() != 2:
        raise ValueError(f"grad_map must be a 2-D (H, W) tensor, got shape {tuple(grad_map.shape)}")
    rows = torch.nonzero(grad_map.abs().sum(dim=1)).flatten()  # (H, W) -> (H,) -> nonzero row indices
    cols = torch.nonzero(grad_map.abs().sum(dim=0)).flatten()  # (H, W) -> (W,) -> nonzero column indices
    if rows.numel() == 0:
        return (0, 0)
    return (int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for a ``with`` block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
