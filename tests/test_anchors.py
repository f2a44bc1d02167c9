"""Tests for mrcnn_edu.anchors: golden anchors a student can check by hand, and exactly
torchvision's AnchorGenerator (values and order) on several configurations and image sizes."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_edu.anchors import (FPN_ANCHOR_SIZES, FPN_ASPECT_RATIOS, AnchorGenerator, anchors_at_one_location,
                               pyramid_grid_sizes, shift_anchors)
from mrcnn_edu.backbone import feature_shapes, small_fpn

TANK_SIZES = ((8,), (16,), (32,), (64,), (128,))  # small oil tanks: 8 to 128 pixels
CONFIGS = {
    "fpn_default": (FPN_ANCHOR_SIZES, FPN_ASPECT_RATIOS),
    "small_tanks": (TANK_SIZES, FPN_ASPECT_RATIOS),
    "three_sizes_per_level": (((16, 24, 32),) * 5, ((0.5, 1.0, 2.0, 3.0),) * 5),
}


# ---------------------------------------------------------------------------------------------
# Golden values
# ---------------------------------------------------------------------------------------------


def test_anchors_at_one_location_golden():
    # size 32: ratio 0.5 -> w = 32 / sqrt(0.5) = 45.25, h = 32 * sqrt(0.5) = 22.63; the half
    # sides 22.63 and 11.31 round to 23 and 11
    expected = torch.tensor([[-23.0, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
    assert torch.equal(anchors_at_one_location((32,), (0.5, 1.0, 2.0)), expected)


def test_anchors_at_one_location_order_is_ratio_major_and_keeps_area_and_ratio():
    anchors = anchors_at_one_location((32, 64), (0.5, 2.0))
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    # order: (r=0.5, s=32), (r=0.5, s=64), (r=2, s=32), (r=2, s=64)
    assert widths.tolist() == [46.0, 90.0, 22.0, 46.0]
    assert heights.tolist() == [22.0, 46.0, 46.0, 90.0]
    # up to the rounding to integers: area size**2, height / width = ratio
    assert torch.allclose(widths * heights, torch.tensor([32.0, 64, 32, 64]) ** 2, rtol=0.03)
    assert torch.allclose(heights / widths, torch.tensor([0.5, 0.5, 2, 2]), rtol=0.05)
    # centred on 0
    assert torch.equal(anchors[:, :2], -anchors[:, 2:])
    assert anchors_at_one_location((16,), (1.0,), dtype=torch.float64).dtype == torch.float64


def test_anchors_on_a_15_by_15_image_golden():
    # one level with a 3 x 3 grid on a 15 x 15 image: stride 15 // 3 = 5; one 4 x 4 anchor per cell,
    # centred on the top-left corner of each cell: x, y in {0, 5, 10}, row by row
    generator = AnchorGenerator(sizes=((4,),), aspect_ratios=((1.0,),))
    (anchors,) = generator.anchors_per_level((15, 15), [(3, 3)])
    centres = [(x, y) for y in (0, 5, 10) for x in (0, 5, 10)]
    expected = torch.tensor([[x - 2.0, y - 2, x + 2, y + 2] for x, y in centres])
    assert torch.equal(anchors, expected)
    assert generator.strides((15, 15), [(3, 3)]) == [(5, 5)]


@pytest.mark.parametrize("image_size", [(128, 160), (97, 130), (15, 15)], ids=str)
def test_pyramid_grid_sizes_are_the_backbones_feature_shapes(image_size):
    shapes = [level["shape"][-2:] for level in feature_shapes(small_fpn(out_channels=8), image_size)]
    assert pyramid_grid_sizes(image_size) == shapes
    assert pyramid_grid_sizes((97, 130)) == [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]


def test_shift_anchors_places_the_cell_anchors_cell_by_cell():
    cell = anchors_at_one_location((8,), (0.5, 1.0))  # A = 2
    anchors = shift_anchors(cell, grid_size=(2, 3), stride=(10, 7))  # (h, w), (stride_y, stride_x)
    assert anchors.shape == (2 * 3 * 2, 4)
    # anchor (row * w + col) * A + a is cell[a] moved to (col * 7, row * 10)
    for row in range(2):
        for col in range(3):
            for a in range(2):
                shift = torch.tensor([col * 7.0, row * 10, col * 7, row * 10])
                assert torch.equal(anchors[(row * 3 + col) * 2 + a], cell[a] + shift)


# ---------------------------------------------------------------------------------------------
# Parity with torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("image_size", [(128, 160), (160, 96), (97, 130), (800, 1088)], ids=str)
def test_anchors_equal_torchvision(config, image_size):
    sizes, ratios = CONFIGS[config]
    ours, theirs = AnchorGenerator(sizes, ratios), TorchvisionAnchorGenerator(sizes, ratios)
    images = torch.zeros(2, 3, *image_size)
    features = [torch.zeros(2, 1, h, w) for h, w in pyramid_grid_sizes(image_size)]
    expected = theirs(ImageList(images, [image_size, (image_size[0] - 5, image_size[1] - 9)]), features)
    got = ours(images, features)
    assert len(got) == 2
    for ours_per_image, theirs_per_image in zip(got, expected):
        assert ours_per_image.dtype == theirs_per_image.dtype
        assert torch.equal(ours_per_image, theirs_per_image)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    # the levels concatenated are forward's anchors
    levels = ours.anchors_per_level(image_size, pyramid_grid_sizes(image_size))
    assert [len(level) for level in levels] == [h * w * len(s) * len(r) for (h, w), s, r
                                                in zip(pyramid_grid_sizes(image_size), sizes, ratios)]
    assert torch.equal(torch.cat(levels), got[0])


def test_anchors_follow_the_feature_dtype_like_torchvision():
    features = [torch.zeros(1, 1, h, w, dtype=torch.float64) for h, w in pyramid_grid_sizes((64, 96))]
    images = torch.zeros(1, 3, 64, 96)
    (ours,) = AnchorGenerator()(images, features)
    (theirs,) = TorchvisionAnchorGenerator(FPN_ANCHOR_SIZES, FPN_ASPECT_RATIOS)(ImageList(images, [(64, 96)]), features)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, theirs)


def test_strides_are_image_size_floor_divided_by_grid_size():
    # torchvision's convention, which we copy: an 800-pixel-high image has a 13-row p6 grid and
    # a computed stride of 800 // 13 = 61, not 64; 1088 is a multiple of 64
    generator = AnchorGenerator()
    strides = generator.strides((800, 1088), pyramid_grid_sizes((800, 1088)))
    assert strides == [(4, 4), (8, 8), (16, 16), (32, 32), (61, 64)]
    p6 = generator.anchors_per_level((800, 1088), pyramid_grid_sizes((800, 1088)))[-1]
    centres_y = ((p6[:, 1] + p6[:, 3]) / 2).unique()
    assert centres_y[:3].tolist() == [0.0, 61.0, 122.0]


def test_anchor_generator_has_no_state():
    generator = AnchorGenerator()
    assert generator.state_dict() == {} and list(generator.parameters()) == []
    assert generator.num_anchors_per_location() == [3] * 5
    assert "sizes=((32,), (64,)" in repr(generator)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=(32, 64, 128)), r"sizes: expected one tuple of positive numbers per pyramid level"),
    (dict(sizes=((32,), (0,))), r"sizes: expected one tuple"),
    (dict(sizes=(), aspect_ratios=()), r"sizes: expected one tuple"),
    (dict(aspect_ratios=((0.5, 1.0, 2.0),)), r"sizes and aspect_ratios: expected one entry per pyramid level "
                                             r"in each, got 5 and 1"),
    (dict(aspect_ratios=((0.5, -1.0),) * 5), r"aspect_ratios: expected one tuple"),
])
def test_bad_configuration_raises_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnchorGenerator(**kwargs)


def test_wrong_number_of_feature_maps_raises():
    with pytest.raises(ValueError, match=r"grid_sizes: expected one \(h, w\) per pyramid level \(5 levels"):
        AnchorGenerator().anchors_per_level((64, 64), [(16, 16), (8, 8)])
