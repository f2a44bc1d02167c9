"""Tests for the synthetic tank-farm generator (mrcnn_edu.oil_tanks)."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")  # the test process only; never exported to notebook kernels

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mrcnn_edu import oil_tanks  # noqa: E402
from mrcnn_edu.oil_tanks import Sun  # noqa: E402
from mrcnn_edu.utils import UserError  # noqa: E402

BATCH_SEEDS = range(24)


@pytest.fixture(scope="module")
def batch():
    """A batch of default 256 × 256 tiles, rendered once for the tests that look at many."""
    return [oil_tanks.make_tile(256, seed=s) for s in BATCH_SEEDS]


def disc_mask(tank, h, w):
    """The tank's disc as the contract defines it: pixels whose centre lies inside the circle."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return ((xx - tank.cx) ** 2 + (yy - tank.cy) ** 2 <= tank.radius**2).to(torch.uint8)


def luminance(image):
    return (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)  # (3, H, W) -> (H, W)


# ---------------------------------------------------------------------------------------------
# Contract and determinism
# ---------------------------------------------------------------------------------------------


def test_tile_is_deterministic_and_follows_the_data_contract():
    a, b = oil_tanks.make_tile(96, seed=3), oil_tanks.make_tile(96, seed=3)
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.target["masks"], b.target["masks"]) and a.tanks == b.tanks and a.sun == b.sun
    assert a.image.shape == (3, 96, 96) and a.image.dtype == torch.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    n = len(a.tanks)
    assert a.target["boxes"].shape == (n, 4) and a.target["boxes"].dtype == torch.float32
    assert a.target["labels"].dtype == torch.int64 and a.target["labels"].tolist() == [1] * n
    assert a.target["masks"].shape == (n, 96, 96) and a.target["masks"].dtype == torch.uint8
    assert a.info["generator_version"] == oil_tanks.GENERATOR_VERSION and a.info["seed"] == 3
    other = oil_tanks.make_tile(96, seed=4)
    assert not torch.equal(a.image, other.image)


def test_different_seeds_give_different_layouts(batch):
    layouts = {tuple((round(t.cx, 2), round(t.cy, 2)) for t in tile.tanks) for tile in batch}
    assert len(layouts) == len(batch)
    assert len({round(tile.sun.azimuth, 4) for tile in batch}) == len(batch)


def test_boxes_are_the_masks_tight_boxes_and_masks_are_disjoint(batch):
    for tile in batch:
        masks = tile.target["masks"]
        torch.testing.assert_close(tile.target["boxes"], oil_tanks.masks_to_boxes(masks), rtol=0, atol=0)
        assert masks.sum(0).max() <= 1, "two tanks claim the same pixel"
        assert (masks.flatten(1).sum(1) >= oil_tanks.MIN_VISIBLE_AREA).all()


def test_every_mask_is_its_tanks_disc_inside_the_tile(batch):
    for tile in batch[:8]:
        h, w = tile.image.shape[-2:]
        for i, (tank, mask) in enumerate(zip(tile.tanks, tile.target["masks"])):
            assert torch.equal(mask, disc_mask(tank, h, w))
            assert torch.equal(tile.instance_mask(i), mask)


def test_distractors_are_never_labelled(batch):
    kinds = set()
    for tile in batch:
        h, w = tile.image.shape[-2:]
        covered = tile.target["masks"].sum(0).bool()
        for d in tile.distractors:
            kinds.add(d.kind)
            yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            inside = (xx - d.cx) ** 2 + (yy - d.cy) ** 2 <= d.radius**2
            assert not (inside & covered).any(), f"a tank mask overlaps a {d.kind}"
    assert len(kinds) >= 4, f"too few kinds of distractors over the batch: {kinds}"


def test_tanks_cut_by_the_border_keep_their_visible_part(batch):
    cut = 0
    for tile in batch:
        h, w = tile.image.shape[-2:]
        for tank, mask in zip(tile.tanks, tile.target["masks"]):
            r = tank.radius
            if tank.cx - r < 0 or tank.cy - r < 0 or tank.cx + r > w or tank.cy + r > h:
                cut += 1
                assert mask.sum() < math.pi * r * r
    assert cut >= 3, "the batch should hold tanks cut by the tile border"


def test_slivers_are_dropped_from_every_field():
    # a tank whose centre lies just outside the tile: only a few pixels show
    tile = oil_tanks.make_tile(64, seed=1, n_groups=0, clutter=0.0, sensor=False)
    assert len(tile.tanks) == 0 and tile.target["masks"].shape == (0, 64, 64)
    found = False
    for seed in range(60):
        t = oil_tanks.make_tile(80, seed=seed, radius_range=(6, 10))
        assert len(t.tanks) == len(t.target["boxes"]) == len(t.target["labels"]) == len(t.target["masks"])
        assert len(t.mask_patches) == len(t.tanks)
        found |= any(min(k.cx, k.cy) < 0 or max(k.cx, k.cy) > 80 for k in t.tanks)
    assert found, "tanks centred outside the tile but partly visible should be kept"


def test_roof_types_and_styles_all_appear(batch):
    roofs = {t.roof for tile in batch for t in tile.tanks}
    styles = {t.style for tile in batch for t in tile.tanks}
    assert roofs == set(oil_tanks.ROOF_TYPES)
    assert styles == {s for v in oil_tanks.ROOF_STYLES.values() for s in v}
    for tile in batch:
        for t in tile.tanks:
            assert t.style in oil_tanks.ROOF_STYLES[t.roof]
            assert 0.0 <= t.fill <= 1.0 and t.height > 0
            assert (t.fill == 1.0) if t.roof == "fixed" else True
    diameters = [2 * t.radius for tile in batch for t in tile.tanks]
    assert 9.5 <= min(diameters) and max(diameters) <= 60.5 and max(diameters) > 35


def test_roof_weights_are_respected():
    only = {roof: {t.roof for s in range(6) for t in oil_tanks.make_tile(
        128, seed=s, roof_weights=tuple(float(r == roof) for r in oil_tanks.ROOF_TYPES)).tanks}
        for roof in oil_tanks.ROOF_TYPES}
    assert only == {roof: {roof} for roof in oil_tanks.ROOF_TYPES}


@pytest.mark.parametrize("size", [16, 48, 128, (64, 200)])
def test_any_seed_and_size_renders(size):
    # groups wider than a small tile must not break the placement
    for seed in range(20):
        tile = oil_tanks.make_tile(size, seed=seed)
        assert tile.image.shape[1:] == ((size, size) if isinstance(size, int) else size)
        assert len(tile.tanks) == len(tile.target["boxes"])


def test_overriding_one_knob_keeps_the_rest_of_the_tile():
    base = oil_tanks.make_tile(160, seed=11, sensor=False)
    lit = oil_tanks.make_tile(160, seed=11, sensor=False, sun=Sun.from_degrees(200, 35))
    full = oil_tanks.make_tile(160, seed=11, sensor=False, fill=1.0)
    assert lit.sun == Sun.from_degrees(200, 35) and lit.sun != base.sun
    assert [(t.cx, t.cy, t.radius, t.roof) for t in lit.tanks] == [(t.cx, t.cy, t.radius, t.roof) for t in base.tanks]
    assert [(t.cx, t.cy, t.radius, t.roof) for t in full.tanks] == [(t.cx, t.cy, t.radius, t.roof) for t in base.tanks]
    assert all(t.fill == 1.0 for t in full.tanks if t.roof == "floating")
    assert lit.info["biome"] == base.info["biome"] and lit.info["clutter"] == base.info["clutter"]
    bare = oil_tanks.make_tile(160, seed=11, clutter=0.0)
    assert bare.distractors == [] and bare.info["clutter"] == 0.0


def test_biomes_and_sensor_settings_are_recorded():
    biomes = {oil_tanks.make_tile(32, seed=s).info["biome"] for s in range(40)}
    assert biomes == set(oil_tanks.BIOMES)
    tile = oil_tanks.make_tile(64, seed=2, biome="temperate")
    assert tile.info["biome"] == "temperate" and set(tile.info["sensor"]) >= {"blur_sigma", "noise", "jpeg_quality"}
    json.dumps(tile.info)  # plain JSON
    assert oil_tanks.make_tile(64, seed=2, sensor=False).info["sensor"] is None


def test_sensor_effects_keep_the_scene_and_quantise_to_8_bits():
    clean = oil_tanks.make_tile(128, seed=9, sensor=False).image
    seen = oil_tanks.make_tile(128, seed=9).image
    assert torch.equal((seen * 255).round() / 255, seen)  # 8-bit values, like the delivered product
    assert 0.005 < (seen - clean).abs().mean() < 0.15
    both = torch.stack([luminance(clean).flatten(), luminance(seen).flatten()])  # (2, H*W)
    assert torch.corrcoef(both)[0, 1] > 0.8, "the sensor should degrade the scene, not replace it"


# ---------------------------------------------------------------------------------------------
# Geometry: shadows and the fill level
# ---------------------------------------------------------------------------------------------


def single_tank(sun, fill=0.5, radius=24.0, roof="floating", size=160, seed=3):
    weights = tuple(float(r == roof) for r in oil_tanks.ROOF_TYPES)
    tile = oil_tanks.make_tile(size, seed=seed, n_groups=1, group_size=(1, 1), radius_range=(radius, radius),
                               roof_weights=weights, sun=sun, fill=fill, clutter=0.0, sensor=False)
    assert len(tile.tanks) == 1
    return tile


@pytest.mark.parametrize("azimuth, elevation", [(0, 45), (135, 35), (250, 60)])
def test_ground_shadow_falls_away_from_the_sun(azimuth, elevation):
    sun = Sun.from_degrees(azimuth, elevation)
    tile = single_tank(sun, roof="fixed", seed=4)
    noon = single_tank(Sun.from_degrees(azimuth, 89.0), roof="fixed", seed=4)  # almost no shadow
    tank = tile.tanks[0]
    outside = tile.target["masks"][0] == 0
    darker = (luminance(noon.image) - luminance(tile.image) > 0.15) & outside
    ys, xs = torch.nonzero(darker, as_tuple=True)
    assert len(ys) > 50
    offsets = torch.stack([xs + 0.5 - tank.cx, ys + 0.5 - tank.cy], dim=1)  # (P, 2) from the tank's centre
    toward = torch.tensor(sun.toward, dtype=torch.float32)
    direction = offsets.mean(0) / offsets.mean(0).norm()
    assert direction @ toward < -0.95, "the shadow's mean direction should be opposite to sun.toward"
    # its far end is h / tan(el) beyond the tank's rim (the shadow of a dome roof reaches a bit further)
    reach = (offsets @ -toward).max().item()
    expected = tank.radius + sun.shadow_length(tank.height)
    assert expected - 2.0 <= reach <= expected + sun.shadow_length(tank.radius * 0.5) + 2.0


def measured_crescent_width(image, tank, sun):
    """The inner shadow's width along the sun's direction, measured in the image.

    The luminance is sampled (bilinearly) along lines parallel to the sun's direction, from the
    far rim towards the sun, and the crossing of the half-way level between the lit roof and the
    crescent is interpolated. On a line ``o`` pixels off the centre, the lit part (the disc shifted
    by ``-s u``) ends at ``sqrt(r² - o²) - s``; three lines, median.
    """
    lum = luminance(image)[None, None]  # (H, W) -> (1, 1, H, W)
    h, w = lum.shape[-2:]
    u = torch.tensor(sun.toward, dtype=torch.float32)
    perp = torch.stack([-u[1], u[0]])
    r = tank.radius
    t = torch.arange(-r + 3.0, r - 2.5, 0.05)
    widths = []
    for offset in (-2.0, 0.0, 2.0):
        pts = torch.tensor([tank.cx, tank.cy]) + t[:, None] * u + offset * perp  # (T, 2) in pixels
        grid = torch.stack([pts[:, 0] / w * 2 - 1, pts[:, 1] / h * 2 - 1], dim=1)  # pixels -> [-1, 1]
        profile = torch.nn.functional.grid_sample(lum, grid[None, None], align_corners=False)[0, 0, 0]  # (T,)
        lit, dark = profile[: len(t) // 5].median(), profile.min()
        mid = ((lit + dark) / 2).item()
        k = torch.nonzero(profile < mid)[0, 0].item()
        a, b = profile[k - 1].item(), profile[k].item()
        t_cross = t[k - 1].item() + (a - mid) / (a - b) * (t[k] - t[k - 1]).item()
        widths.append(math.sqrt(r * r - offset * offset) - t_cross)
    return float(np.median(widths))


@pytest.mark.parametrize("fill, azimuth, elevation", [(0.75, 0, 45), (0.6, 30, 55), (0.35, 120, 40),
                                                      (0.15, 225, 62), (0.5, 300, 35)])
def test_fill_level_is_recovered_from_the_inner_crescent(fill, azimuth, elevation):
    sun = Sun.from_degrees(azimuth, elevation)
    tile = single_tank(sun, fill=fill, radius=26.0)
    tank = tile.tanks[0]
    assert tank.roof == "floating" and tank.fill == fill
    width = measured_crescent_width(tile.image, tank, sun)
    assert width == pytest.approx(oil_tanks.crescent_width(fill, tank.height, sun), abs=0.6)
    assert oil_tanks.fill_from_crescent(width, tank.height, sun) == pytest.approx(fill, abs=0.03)


def test_crescent_width_formula_round_trips():
    sun = Sun.from_degrees(40, 30)
    assert oil_tanks.crescent_width(1.0, 15.0, sun) == 0.0
    assert oil_tanks.crescent_width(0.0, 15.0, sun) == pytest.approx(15.0 / math.tan(math.radians(30)))
    for fill in (0.1, 0.5, 0.77):
        assert oil_tanks.fill_from_crescent(oil_tanks.crescent_width(fill, 12.0, sun), 12.0, sun) == pytest.approx(fill)
    assert sun.toward == pytest.approx([math.cos(math.radians(40)), math.sin(math.radians(40))])


def test_a_sinking_roof_darkens_more_of_the_tank():
    sun = Sun.from_degrees(60, 45)
    dark = []
    for fill in (0.95, 0.6, 0.2):
        tile = single_tank(sun, fill=fill)
        mask = tile.target["masks"][0].bool()
        dark.append((luminance(tile.image)[mask] < 0.35).float().mean().item())
    assert dark[0] < dark[1] < dark[2]


# ---------------------------------------------------------------------------------------------
# Scenes, data sets, the explorer
# ---------------------------------------------------------------------------------------------


def test_scene_has_several_farms_and_the_same_ground_truth():
    scene = oil_tanks.make_scene(640, seed=2, n_farms=3)
    h, w = scene.image.shape[-2:]
    assert (h, w) == (640, 640) and len(scene.tanks) >= 6
    masks = scene.target["masks"]
    torch.testing.assert_close(scene.target["boxes"], oil_tanks.masks_to_boxes(masks), rtol=0, atol=0)
    assert masks.sum(0).max() <= 1
    light = oil_tanks.make_scene(640, seed=2, n_farms=3, with_masks=False)
    assert "masks" not in light.target and torch.equal(light.image, scene.image)
    for i in (0, len(light.tanks) - 1):
        assert torch.equal(light.instance_mask(i), masks[i])
    xs = torch.tensor([t.cx for t in scene.tanks])
    assert xs.max() - xs.min() > 100, "the farms should be spread over the scene"


def test_tile_seeds_are_stable_and_distinct():
    seeds = [oil_tanks.tile_seed(7, i) for i in range(100)]
    assert len(set(seeds)) == 100 and seeds == [oil_tanks.tile_seed(7, i) for i in range(100)]
    assert oil_tanks.tile_seed(7, 0) != oil_tanks.tile_seed(8, 0)


def test_make_dataset_round_trip(tmp_path):
    data = pytest.importorskip("mrcnn_edu.data")
    out = oil_tanks.make_dataset(tmp_path / "tanks", n_tiles=3, seed=5, size=(64, 80), progress=False,
                                 n_groups=2, roof_weights=(1.0, 1.0, 1.0))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator_version"] == oil_tanks.GENERATOR_VERSION
    assert (manifest["seed"], manifest["size"], manifest["n_tiles"]) == (5, [64, 80], 3)
    assert manifest["options"] == {"n_groups": 2, "roof_weights": [1.0, 1.0, 1.0]}
    dataset = data.CocoDataset(out)
    assert len(dataset) == 3 and dataset.class_names == ("__background__", "oil-storage-tank")
    raw = json.loads((out / "annotations.json").read_text())
    for i in range(3):
        tile = oil_tanks.make_tile((64, 80), seed=oil_tanks.tile_seed(5, i), n_groups=2, roof_weights=(1.0, 1.0, 1.0))
        image, target = dataset[i]
        assert torch.equal(image, tile.image)  # PNG keeps the 8-bit tile exactly
        assert torch.equal(target["masks"], tile.target["masks"])
        assert torch.equal(target["boxes"], tile.target["boxes"])
        entry = raw["images"][i]
        assert entry["tile_seed"] == oil_tanks.tile_seed(5, i) and entry["biome"] == tile.info["biome"]
        assert entry["sun"]["azimuth_deg"] == pytest.approx(math.degrees(tile.sun.azimuth))
        assert entry["sun"]["elevation_deg"] == pytest.approx(math.degrees(tile.sun.elevation))
        anns = [a for a in raw["annotations"] if a["image_id"] == entry["id"]]
        assert [a["roof"] for a in anns] == [t.roof for t in tile.tanks]
        assert [a["fill"] for a in anns] == pytest.approx([t.fill for t in tile.tanks], abs=1e-4)
        assert [a["radius"] for a in anns] == pytest.approx([t.radius for t in tile.tanks], abs=1e-3)
        assert all({"cx", "cy", "height", "style", "truncated"} <= set(a) for a in anns)
    with pytest.raises(UserError, match="overwrite"):
        oil_tanks.make_dataset(out, n_tiles=1, seed=5, size=32, progress=False)
    oil_tanks.make_dataset(out, n_tiles=1, seed=6, size=32, progress=False, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 6


@pytest.mark.parametrize("kwargs, name", [
    ({"n_tiles": 0}, "n_tiles"), ({"seed": -1}, "seed"), ({"colour": "red"}, "colour"),
    ({"radius_range": (5, 1)}, "radius_range"), ({"size": 8}, "size"), ({"image_format": "gif"}, "image_format"),
])
def test_make_dataset_rejects_bad_arguments(tmp_path, kwargs, name):
    pytest.importorskip("mrcnn_edu.data")
    args = {"n_tiles": 1, "seed": 0, "progress": False, **kwargs}
    with pytest.raises(UserError, match=name):
        oil_tanks.make_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_explorer_draws_once_in_batch_mode(monkeypatch, capsys):
    monkeypatch.setenv("MRCNN_EDU_BATCH", "1")
    plt.close("all")
    oil_tanks.explore_generator(size=96)
    assert "explorer drawn once" in capsys.readouterr().out
    assert len(plt.get_fignums()) == 1
    plt.close("all")
    tile = oil_tanks.make_tile(96, seed=1)
    ax = oil_tanks.draw_tile(tile)
    assert len(ax.patches) == len(tile.tanks) + len(tile.distractors) + 1  # + the sun arrow
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Small pieces and bad arguments
# ---------------------------------------------------------------------------------------------


def test_masks_to_boxes():
    m = torch.zeros(3, 5, 6, dtype=torch.uint8)
    m[0, 2, 3] = 1
    m[1, 1:4, 0:6] = 1
    assert oil_tanks.masks_to_boxes(m).tolist() == [[3.0, 2.0, 4.0, 3.0], [0.0, 1.0, 6.0, 4.0], [0.0, 0.0, 0.0, 0.0]]
    assert oil_tanks.masks_to_boxes(torch.zeros(0, 5, 5)).shape == (0, 4)


@pytest.mark.parametrize("kwargs, name", [
    ({"size": 8}, "size"), ({"size": (32,)}, "size"), ({"size": 32.0}, "size"), ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"), ({"n_groups": -1}, "n_groups"), ({"radius_range": (10, 5)}, "radius_range"),
    ({"radius_range": (0, 5)}, "radius_range"), ({"roof_weights": (0, 0, 0)}, "roof_weights"),
    ({"roof_weights": (1, 2)}, "roof_weights"), ({"group_size": (0, 3)}, "group_size"),
    ({"sun": (135, 40)}, "sun"), ({"sun": Sun(0.0, 0.0)}, "sun"), ({"fill": 1.5}, "fill"),
    ({"clutter": -0.1}, "clutter"), ({"biome": "moon"}, "biome"), ({"sensor": "yes"}, "sensor"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(UserError, match=name):
        oil_tanks.make_tile(**{"size": 32, **kwargs})
    assert issubclass(UserError, ValueError)


def test_bad_scene_arguments():
    with pytest.raises(UserError, match="n_farms"):
        oil_tanks.make_scene(64, n_farms=-2)
    with pytest.raises(UserError, match="size"):
        oil_tanks.make_scene(10)
