"""Tests for the synthetic tank-farm tiles (first version, used by the stage notebooks)."""

from __future__ import annotations

import math

import pytest
import torch

from mrcnn_edu import oil_tanks


def test_tile_is_deterministic_and_follows_the_data_contract():
    a, b = oil_tanks.make_tile(96, seed=3), oil_tanks.make_tile(96, seed=3)
    torch.testing.assert_close(a.image, b.image)
    assert a.image.shape == (3, 96, 96) and a.image.dtype == torch.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    n = len(a.tanks)
    assert a.target["boxes"].shape == (n, 4) and a.target["labels"].dtype == torch.int64
    assert a.target["masks"].shape == (n, 96, 96) and a.target["masks"].dtype == torch.uint8
    assert not torch.equal(a.image, oil_tanks.make_tile(96, seed=4).image)


def test_masks_are_the_tank_discs():
    tile = oil_tanks.make_tile((160, 200), seed=0, n_groups=2)
    assert len(tile.tanks) > 0
    for tank, mask, box in zip(tile.tanks, tile.target["masks"], tile.target["boxes"]):
        inside = tank.cx - tank.radius >= 0 and tank.cy - tank.radius >= 0 and \
            tank.cx + tank.radius <= 200 and tank.cy + tank.radius <= 160
        if inside:  # a whole disc: its area is close to pi r^2
            assert abs(mask.sum().item() - math.pi * tank.radius**2) < 2 * math.pi * tank.radius + 4
            assert abs((box[2] - box[0]).item() - 2 * tank.radius) <= 2
        assert mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])].sum() == mask.sum()


def test_masks_to_boxes_single_pixel():
    m = torch.zeros(1, 5, 5, dtype=torch.uint8)
    m[0, 2, 3] = 1
    assert oil_tanks.masks_to_boxes(m).tolist() == [[3.0, 2.0, 4.0, 3.0]]
    assert oil_tanks.masks_to_boxes(torch.zeros(0, 5, 5)).shape == (0, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        oil_tanks.make_tile(8)
    with pytest.raises(ValueError, match="radius_range"):
        oil_tanks.make_tile(64, radius_range=(10, 5))


@pytest.mark.parametrize("size", [16, 48, 128, (64, 200)])
def test_any_seed_and_size_renders(size):
    # groups wider than a small tile must not break the placement
    for seed in range(25):
        tile = oil_tanks.make_tile(size, seed=seed)
        assert tile.image.shape[1:] == ((size, size) if isinstance(size, int) else size)
        assert len(tile.tanks) == len(tile.target["boxes"])
