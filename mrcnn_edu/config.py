"""Model configuration: frozen dataclasses, presets, and JSON round trips.

Taught in: ``notebooks/07_training.ipynb`` (assembling the model).

Shape shorthand used in this module:
    L     pyramid levels that carry anchors (p2..p6: 5)
    NC    classes, background included (``num_classes``)

A configuration is plain data: :class:`MaskRCNNConfig` holds one frozen dataclass per stage
(:class:`TransformConfig`, :class:`BackboneConfig`, :class:`RPNConfig`, :class:`RoIHeadsConfig`).
Only the builder (``mrcnn_edu.model.build_mask_rcnn``) reads it; every module takes plain
constructor arguments. Frozen means a config cannot change behind the model's back: derive a new
one with ``dataclasses.replace``::

    cfg = r50_fpn(num_classes=2)
    cfg = replace(cfg, transform=replace(cfg.transform, min_size=(512,), max_size=853))

Presets (:func:`get_preset`):

* ``r50_fpn`` -- layer for layer torchvision's ``maskrcnn_resnet50_fpn`` with the settings of its
  pretrained checkpoints (frozen batch norm, top 3 ResNet stages trainable), so a torchvision
  checkpoint loads into it (``mrcnn_edu.model.load_torchvision_state_dict``). torchvision's
  ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` instead uses trainable
  ``BatchNorm2d`` in all 5 stages: ``replace(cfg.backbone, norm="batch", trainable_layers=5)``.
* ``small`` -- a CPU model for the course: trains on a 2-core CPU in minutes, ~1 M parameters.

``to_dict`` / ``from_dict`` turn a config into JSON-ready dicts and back (tuples become lists
in JSON and tuples again on the way back); an unknown key is refused with its dotted path.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

from mrcnn_edu.utils import UserError

BACKBONES = ("resnet50_fpn", "small_fpn")
"""Backbones the builder knows (``mrcnn_edu.backbone.resnet50_fpn`` and a small ResNet + FPN)."""

NORM_KINDS = ("frozen", "batch", "group")
"""Normalisation layers of the ResNet trunk (``mrcnn_edu.backbone.make_norm``)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError):
    """A configuration value or key the user can fix; the message names the field."""


# ----------------------------------------------------------------------------------------------
# The stage configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformConfig:
    """Resizing and normalisation (``mrcnn_edu.transforms.DetectionTransform``), torchvision's defaults.

    ``min_size`` is a tuple: at inference the last entry is used; in training one is drawn per
    image (multi-scale training, as torchvision). An int is accepted and becomes a 1-tuple.
    """

    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    size_divisible: int = 32
    fixed_size: tuple[int, int] | None = None  # (width, height), torchvision's order

    def __post_init__(self) -> None:
        if isinstance(self.min_size, int) and not isinstance(self.min_size, bool):
            object.__setattr__(self, "min_size", (self.min_size,))
        _check_positive_ints("transform.min_size", self.min_size)
        _check_positive_int("transform.max_size", self.max_size)
        _check_positive_int("transform.size_divisible", self.size_divisible)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not _is_number_tuple(value, 3) or (name == "image_std" and min(value) <= 0):
                raise ConfigError(f"transform.{name}: expected 3 numbers (R, G, B){', all > 0' if name == 'image_std' else ''}, "
                                  f"got {value!r}")
        if self.fixed_size is not None:
            _check_positive_ints("transform.fixed_size", self.fixed_size, length=2)


@dataclass(frozen=True)
class BackboneConfig:
    """Which trunk + FPN (``mrcnn_edu.backbone``).

    ``name``: ``"resnet50_fpn"`` (torchvision's) or ``"small_fpn"`` (BasicBlock, one block per
    stage). ``widths`` (``small_fpn`` only): the four stage widths; ``None`` = ``small_fpn``'s
    own ``(32, 64, 128, 256)``. The stem gets ``widths[0]`` channels.
    """

    name: str = "resnet50_fpn"
    out_channels: int = 256
    norm: str = "frozen"
    trainable_layers: int = 3
    widths: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        _check_choice("backbone.name", self.name, BACKBONES)
        _check_choice("backbone.norm", self.norm, NORM_KINDS)
        _check_positive_int("backbone.out_channels", self.out_channels)
        if not isinstance(self.trainable_layers, int) or not 0 <= self.trainable_layers <= 5:
            raise ConfigError(f"backbone.trainable_layers: expected an int in 0..5, got {self.trainable_layers!r}")
        if self.widths is not None:
            if self.name != "small_fpn":
                raise ConfigError(f"backbone.widths: only small_fpn takes widths (resnet50_fpn's are fixed); "
                                  f"set it to null, got {self.widths!r}")
            _check_positive_ints("backbone.widths", self.widths, length=4)


@dataclass(frozen=True)
class RPNConfig:
    """Anchors and region proposal network (``mrcnn_edu.anchors``, ``mrcnn_edu.rpn``), torchvision's defaults.

    ``anchor_sizes[l]`` / ``aspect_ratios[l]``: anchors of pyramid level l (p2..p6). The
    ``*_train`` / ``*_test`` pairs become the RPN's ``{"training": ..., "testing": ...}`` dicts;
    ``pre_nms_top_n`` counts *per level*, ``post_nms_top_n`` per image.
    """

    anchor_sizes: tuple[tuple[float, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5
    conv_depth: int = 1
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0

    def __post_init__(self) -> None:
        for name in ("anchor_sizes", "aspect_ratios"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != 5 or not all(
                    _is_number_tuple(level) and len(level) > 0 and min(level) > 0 for level in value):
                raise ConfigError(f"rpn.{name}: expected 5 tuples of positive numbers, one per level p2..p6, "
                                  f"got {value!r}")
        counts = {len(s) * len(r) for s, r in zip(self.anchor_sizes, self.aspect_ratios)}
        if len(counts) != 1:
            raise ConfigError(f"rpn.anchor_sizes, rpn.aspect_ratios: every level needs the same number of anchors "
                              f"per location (one RPN head serves all levels), got {counts}")
        for name in ("conv_depth", "batch_size_per_image", "pre_nms_top_n_train", "pre_nms_top_n_test",
                     "post_nms_top_n_train", "post_nms_top_n_test"):
            _check_positive_int(f"rpn.{name}", getattr(self, name))
        for name in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "nms_thresh", "score_thresh"):
            _check_fraction(f"rpn.{name}", getattr(self, name))
        if self.bg_iou_thresh > self.fg_iou_thresh:
            raise ConfigError(f"rpn.bg_iou_thresh: expected <= fg_iou_thresh ({self.fg_iou_thresh}), "
                              f"got {self.bg_iou_thresh}")


@dataclass(frozen=True)
class RoIHeadsConfig:
    """Box and mask heads (``mrcnn_edu.roi_heads``, ``box_head``, ``mask_head``), torchvision's defaults.

    ``featmap_names``: the pyramid levels RoIAlign pools from (p6 only carries anchors).
    ``mask=False`` builds Faster R-CNN (no mask branch).
    """

    featmap_names: tuple[str, ...] = ("p2", "p3", "p4", "p5")
    sampling_ratio: int = 2
    box_roi_size: int = 7
    representation_size: int = 1024
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] | None = None  # None = (10, 10, 5, 5)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask: bool = True
    mask_roi_size: int = 14
    mask_layers: tuple[int, ...] = (256, 256, 256, 256)
    mask_dilation: int = 1
    mask_dim_reduced: int = 256

    def __post_init__(self) -> None:
        valid_levels = ("p2", "p3", "p4", "p5", "p6")
        if not isinstance(self.featmap_names, tuple) or not self.featmap_names or any(
                name not in valid_levels for name in self.featmap_names):
            raise ConfigError(f"roi_heads.featmap_names: expected pyramid levels among {valid_levels}, finest "
                              f"first, got {self.featmap_names!r}")
        for name in ("sampling_ratio", "box_roi_size", "representation_size", "batch_size_per_image",
                     "detections_per_img", "mask_roi_size", "mask_dilation", "mask_dim_reduced"):
            _check_positive_int(f"roi_heads.{name}", getattr(self, name))
        for name in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction", "score_thresh", "nms_thresh"):
            _check_fraction(f"roi_heads.{name}", getattr(self, name))
        _check_positive_ints("roi_heads.mask_layers", self.mask_layers)
        if self.bbox_reg_weights is not None and not (
                _is_number_tuple(self.bbox_reg_weights, 4) and min(self.bbox_reg_weights) > 0):
            raise ConfigError(f"roi_heads.bbox_reg_weights: expected null or 4 positive numbers (wx, wy, ww, wh), "
                              f"got {self.bbox_reg_weights!r}")
        if not isinstance(self.mask, bool):
            raise ConfigError(f"roi_heads.mask: expected true or false, got {self.mask!r}")


@dataclass(frozen=True)
class MaskRCNNConfig:
    """The whole model: ``num_classes`` (background included) and one config per stage."""

    num_classes: int = 91
    transform: TransformConfig = field(default_factory=TransformConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 2:
            raise ConfigError(f"num_classes: expected an int >= 2 (background + at least one class), "
                              f"got {self.num_classes!r}")
        for name, cls in (("transform", TransformConfig), ("backbone", BackboneConfig), ("rpn", RPNConfig),
                          ("roi_heads", RoIHeadsConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__} "
                                  f"(use MaskRCNNConfig.from_dict for plain dicts)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists): ``json.dumps(cfg.to_dict())``."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MaskRCNNConfig":
        """The inverse of :meth:`to_dict`. Missing keys take their defaults; unknown keys are refused.

        Raises:
            ConfigError: naming the key (``rpn.nms_treshold``) or the bad value.
        """
        return _from_plain(cls, data, "")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MaskRCNNConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config JSON: {error}") from None
        return cls.from_dict(data)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def r50_fpn(num_classes: int = 91) -> MaskRCNNConfig:
    """torchvision's ``maskrcnn_resnet50_fpn``: every default above is torchvision's value."""
    return MaskRCNNConfig(num_classes=num_classes)


def small(num_classes: int = 2) -> MaskRCNNConfig:
    """A CPU model for the course: about 1 M parameters (~4 MB), trains in minutes on 2 cores.

    Tuned for the synthetic oil-tank tiles (256 x 256, tanks 10-60 px across); every choice below
    trades accuracy headroom for CPU time and size, never changes the algorithm.
    """
    return MaskRCNNConfig(
        num_classes=num_classes,  # background + oil-storage-tank
        transform=TransformConfig(
            # tiles are 256 px: no resizing (a 256 x 256 image has 16x fewer pixels than 800 x 1066,
            # the cost of every conv layer falls by as much); tanks keep their 10-60 px
            min_size=(256,),
            max_size=512,
        ),
        backbone=BackboneConfig(
            name="small_fpn",
            # 64 pyramid channels instead of 256: the RPN head, the pooled RoI features and the
            # first box-head layer all shrink with it (one class, simple textures)
            out_channels=64,
            # no pretrained weights exist for this trunk: train everything, with batch norm
            # (statistics over the many pixels of a 256 px image, even with 1-2 images a batch)
            norm="batch",
            trainable_layers=5,
            # half small_fpn's widths: the trunk falls from 1.2 M to 0.3 M parameters, and
            # the whole model fits in ~4 MB (tanks are simple round shapes)
            widths=(16, 32, 64, 128),
        ),
        rpn=RPNConfig(
            # tanks are 10-60 px: anchors from 8 px (p2) to 128 px (p6) cover them twice over,
            # where torchvision's 32..512 would leave every tank under 32 px without a good anchor
            anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
            # tanks are round (ratio 1), but a tank cut by the tile border is elongated: keep 3 ratios
            aspect_ratios=((0.5, 1.0, 2.0),) * 5,
            # a tile holds a few dozen tanks, not hundreds of objects: far fewer proposals
            # (per level before NMS / per image after), which speeds up NMS and the box head
            pre_nms_top_n_train=600,
            post_nms_top_n_train=300,
            pre_nms_top_n_test=300,
            post_nms_top_n_test=100,
        ),
        roi_heads=RoIHeadsConfig(
            # 64 * 7 * 7 -> 128 -> 128: the first fully connected layer is most of the head's
            # weights (3136 x 1024 = 3.2 M in torchvision's with 64 channels); 128 suffices for one class
            representation_size=128,
            # 128 RoIs per image instead of 512: a tile has few objects, so 512 would be mostly
            # background; a quarter of the box-head work
            batch_size_per_image=128,
            # two 64-channel conv layers instead of four of 256: masks of round tanks are simple
            mask_layers=(64, 64),
            mask_dim_reduced=64,
            # at most 100 detections per tile (a tile holds fewer tanks than that)
            detections_per_img=100,
        ),
    )


PRESETS = {"r50_fpn": r50_fpn, "small": small}
"""Preset name -> function ``(num_classes) -> MaskRCNNConfig``."""


def get_preset(name: str, num_classes: int | None = None) -> MaskRCNNConfig:
    """The preset ``name`` (``"r50_fpn"`` or ``"small"``), with its default ``num_classes`` unless given.

    Raises:
        ConfigError: for an unknown name, listing the presets.
    """
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} does not exist; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]() if num_classes is None else PRESETS[name](num_classes)


# ----------------------------------------------------------------------------------------------
# Plain dicts <-> dataclasses
# ----------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    """Tuples -> lists, recursively (what ``json.dumps`` would write anyway)."""
    if isinstance(value, dict):
        return {key: _to_plain(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    """Lists -> tuples, recursively (configs hold tuples so that they stay hashable and frozen)."""
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value


def _from_plain(cls: type, data: Any, path: str) -> Any:
    """Build the dataclass ``cls`` from a dict, recursing into nested dataclasses."""
    where = path.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a dict (JSON object), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key in the {cls.__name__} "
                          f"({where}); expected one of: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_plain(hint, value, f"{path}{key}.")
        else:
            kwargs[key] = _to_tuples(value)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        # the stage configs name their fields relative to the model ("rpn.nms_thresh") already
        raise error from None
    except TypeError as error:  # e.g. a comparison of a str with a number in a check
        raise ConfigError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_number_tuple(value: Any, length: int | None = None) -> bool:
    return isinstance(value, tuple) and (length is None or len(value) == length) and all(map(_is_number, value))


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: expected a positive int, got {value!r}")


def _check_positive_ints(name: str, value: Any, length: int | None = None) -> None:
    if not isinstance(value, tuple) or len(value) == 0 or (length is not None and len(value) != length) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        count = f"{length} " if length else ""
        raise ConfigError(f"{name}: expected a tuple of {count}positive ints, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ConfigError(f"{name}: expected a number in [0, 1], got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
