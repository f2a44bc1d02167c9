"""Tests for mrcnn_edu.config: presets (r50_fpn = torchvision's defaults), JSON round trips, clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn_edu.config import (PRESETS, BackboneConfig, ConfigError, MaskRCNNConfig, RoIHeadsConfig, RPNConfig,
                              TransformConfig, get_preset, r50_fpn, small)
from mrcnn_edu.utils import UserError


def test_r50_fpn_defaults_are_torchvisions():
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    cfg = r50_fpn()
    assert cfg.num_classes == tv.roi_heads.box_predictor.cls_score.out_features == 91
    t = cfg.transform
    assert (t.min_size, t.max_size, t.size_divisible, t.fixed_size) == \
        (tuple(tv.transform.min_size), tv.transform.max_size, tv.transform.size_divisible, tv.transform.fixed_size)
    assert list(t.image_mean) == tv.transform.image_mean and list(t.image_std) == tv.transform.image_std
    r = cfg.rpn
    assert r.anchor_sizes == tv.rpn.anchor_generator.sizes and r.aspect_ratios == tv.rpn.anchor_generator.aspect_ratios
    assert (r.pre_nms_top_n_train, r.pre_nms_top_n_test) == (tv.rpn._pre_nms_top_n["training"], tv.rpn._pre_nms_top_n["testing"])
    assert (r.post_nms_top_n_train, r.post_nms_top_n_test) == (tv.rpn._post_nms_top_n["training"], tv.rpn._post_nms_top_n["testing"])
    assert (r.nms_thresh, r.score_thresh, r.fg_iou_thresh, r.bg_iou_thresh) == \
        (tv.rpn.nms_thresh, tv.rpn.score_thresh, tv.rpn.proposal_matcher.high_threshold, tv.rpn.proposal_matcher.low_threshold)
    assert (r.batch_size_per_image, r.positive_fraction) == \
        (tv.rpn.fg_bg_sampler.batch_size_per_image, tv.rpn.fg_bg_sampler.positive_fraction)
    h = cfg.roi_heads
    assert (h.score_thresh, h.nms_thresh, h.detections_per_img) == \
        (tv.roi_heads.score_thresh, tv.roi_heads.nms_thresh, tv.roi_heads.detections_per_img)
    assert (h.fg_iou_thresh, h.bg_iou_thresh) == (tv.roi_heads.proposal_matcher.high_threshold,
                                                  tv.roi_heads.proposal_matcher.low_threshold)
    assert (h.batch_size_per_image, h.positive_fraction) == \
        (tv.roi_heads.fg_bg_sampler.batch_size_per_image, tv.roi_heads.fg_bg_sampler.positive_fraction)
    assert h.representation_size == tv.roi_heads.box_head.fc7.out_features
    assert (h.box_roi_size, h.mask_roi_size) == (tv.roi_heads.box_roi_pool.output_size[0],
                                                 tv.roi_heads.mask_roi_pool.output_size[0])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = get_preset(name)
    text = json.dumps(cfg.to_dict())
    assert MaskRCNNConfig.from_dict(json.loads(text)) == cfg
    assert MaskRCNNConfig.from_json(cfg.to_json()) == cfg
    assert hash(cfg) == hash(MaskRCNNConfig.from_json(text))  # frozen and hashable


def test_missing_keys_take_defaults_and_num_classes_override():
    assert MaskRCNNConfig.from_dict({"num_classes": 5, "rpn": {"nms_thresh": 0.6}}) == \
        dataclasses.replace(r50_fpn(5), rpn=dataclasses.replace(RPNConfig(), nms_thresh=0.6))
    assert get_preset("small", num_classes=4).num_classes == 4 and small().num_classes == 2


def test_configs_are_frozen_and_min_size_int_is_accepted():
    cfg = small()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_classes = 3
    assert TransformConfig(min_size=512).min_size == (512,)


@pytest.mark.parametrize("data, message", [
    ({"rpn": {"nms_treshold": 0.5}}, r"rpn\.nms_treshold: unknown key .*nms_thresh"),
    ({"colour": "red"}, r"colour: unknown key"),
    ({"num_classes": 1}, r"num_classes: expected an int >= 2"),
    ({"backbone": {"name": "vgg16"}}, r"backbone\.name: expected one of 'resnet50_fpn', 'small_fpn'"),
    ({"backbone": {"widths": [8, 16, 32, 64]}}, r"backbone\.widths: only small_fpn"),
    ({"backbone": "small"}, r"backbone: expected a dict"),
    ({"rpn": {"anchor_sizes": [[8], [16]]}}, r"rpn\.anchor_sizes: expected 5 tuples"),
    ({"rpn": {"aspect_ratios": [[1.0]] * 4 + [[0.5, 1.0]]}}, r"same number of anchors"),
    ({"roi_heads": {"score_thresh": 2}}, r"roi_heads\.score_thresh: expected a number in \[0, 1\]"),
    ({"roi_heads": {"featmap_names": ["0", "1"]}}, r"roi_heads\.featmap_names"),
    ({"transform": {"image_std": [0.2, 0.2, 0]}}, r"transform\.image_std"),
])
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        MaskRCNNConfig.from_dict(data)


def test_errors_are_user_errors():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=r"preset 'tiny' does not exist; choose one of: r50_fpn, small"):
        get_preset("tiny")
    with pytest.raises(ConfigError, match="config JSON"):
        MaskRCNNConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="backbone: expected a BackboneConfig"):
        MaskRCNNConfig(backbone={"name": "small_fpn"})
    with pytest.raises(ConfigError, match="trainable_layers"):
        BackboneConfig(trainable_layers=6)
    with pytest.raises(ConfigError, match="mask_layers"):
        RoIHeadsConfig(mask_layers=())
