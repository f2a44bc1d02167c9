"""Render tiles and scenes: plan the layout, paint it, pass it through the sensor, build the targets.

Taught in: ``09_case_study_oil_tanks.ipynb``; its sample tiles are used by every stage notebook.

Shape shorthand:
    H, W     tile (or scene) height and width in pixels
    N        tanks visible in the tile
    h, w     a tank's mask patch (its tight box)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from mrcnn_edu.oil_tanks import landscape as ls
from mrcnn_edu.oil_tanks import sensor as sensor_mod
from mrcnn_edu.oil_tanks.layout import GSD, Options, plan_canvas
from mrcnn_edu.oil_tanks.raster import Canvas, value_noise, window
from mrcnn_edu.oil_tanks.tanks import Sun, Tank
from mrcnn_edu.utils import UserError

GENERATOR_VERSION = "2.0.0"  # bump whenever the same seed would give different tiles
MIN_VISIBLE_AREA = 10  # pixels: tanks showing less than this inside the tile are not labelled
_STREAMS = ("layout", "sun", "ground", "clutter", "sensor", "texture", "knobs")
_BIOME_WEIGHTS = {"arid": 0.3, "semi_arid": 0.2, "temperate": 0.2, "industrial": 0.2, "tropical": 0.1}


@dataclass
class Tile:
    """A rendered tile (or scene) and everything known about it.

    ``image`` Float[3, H, W] in [0, 1]; ``target`` {"boxes": Float[N, 4], "labels": Int64[N] (all 1,
    oil-storage-tank), "masks": UInt8[N, H, W]} in the course's data contract (``masks`` is left out
    when rendered with ``with_masks=False``: use :meth:`instance_mask`); ``tanks[i]`` is the ground
    truth of instance ``i``; ``distractors`` the round things that are *not* tanks; ``info`` the
    biome, clutter level, sensor settings and generator version.
    """

    image: torch.Tensor
    target: dict
    tanks: list = field(default_factory=list)
    sun: Sun | None = None
    distractors: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    mask_patches: list = field(default_factory=list, repr=False)  # [(y0, x0, Bool[h, w])] per tank

    def instance_mask(self, i: int) -> torch.Tensor:
        """The mask UInt8[H, W] of tank ``i`` (cheap, also when the tile holds no dense masks)."""
        y0, x0, patch = self.mask_patches[i]
        mask = torch.zeros(self.image.shape[-2:], dtype=torch.uint8)
        mask[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = torch.from_numpy(patch.astype(np.uint8))
        return mask


def make_tile(
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    n_groups: int | None = None,
    radius_range: tuple[float, float] = (5.0, 30.0),
    roof_weights: tuple[float, float, float] = (0.55, 0.3, 0.15),
    *,
    group_size: tuple[int, int] = (1, 6),
    sun: Sun | None = None,
    fill: float | None = None,
    clutter: float | None = None,
    biome: str | None = None,
    distractors: bool = True,
    sensor: bool = True,
    with_masks: bool = True,
) -> Tile:
    """Render one synthetic ~1.2 m/pixel tile of a tank farm with its exact ground truth.

    Args:
        size: ``H`` (square) or ``(H, W)`` in pixels, at least 16.
        seed: a non-negative integer; the same seed (and options) always gives the same tile.
        n_groups: bunded groups of tanks asked for (random 1-4 when None; 0 = no tanks). Groups
            that do not fit in the tile are dropped.
        radius_range: tank radii in pixels (default: diameters 10-60 px, i.e. 12-72 m).
        roof_weights: probabilities of floating, fixed and dark roofs (:data:`ROOF_TYPES`).
        group_size: (min, max) tanks in one bund (at most 12).
        sun: a :class:`Sun` (e.g. ``Sun.from_degrees(135, 40)``); random when None.
        fill: fill level in [0, 1] of every floating roof; random (0.05-0.95) when None.
        clutter: 0 (bare ground, tanks and bunds only) .. 1 (roads, pipes, buildings, many
            distractors); random when None.
        biome: one of :data:`BIOMES` ("arid", "semi_arid", "temperate", "industrial",
            "tropical"); random when None.
        distractors: place round things that are not tanks (ponds, clarifiers, circular fields,
            roundabouts, round buildings, silos).
        sensor: apply haze, blur, pan-sharpening, colour casts, noise and JPEG; ``False`` gives the
            clean rendering (for geometry checks).
        with_masks: include the dense ``target["masks"]``.

    Overriding ``sun``, ``fill``, ``clutter`` or ``biome`` leaves the rest of the tile as the seed
    made it (each aspect draws from its own random stream), so an explorer can move one knob.

    Returns:
        A :class:`Tile`. Tanks cut by the border keep their visible part; those showing fewer
        than ``MIN_VISIBLE_AREA`` pixels are left out of every field of the ground truth.
    """
    h, w = _check_size(size)
    _check_int("n_groups", n_groups, 0, 64, allow_none=True)
    opt, rngs, biome, sun = _setup(seed, radius_range, roof_weights, group_size, sun, fill, clutter, biome,
                                   distractors, sensor, with_masks)
    n = int(rngs["layout"].integers(1, 5)) if n_groups is None else n_groups
    farms = [[n // 2], [n - n // 2]] if n >= 3 and rngs["layout"].random() < 0.35 else ([[n]] if n else [])
    plan = plan_canvas(h, w, rngs, opt, farms, scene=False, biome=biome)
    return _finish(plan, h, w, sun, rngs, seed, opt, biome, sensor, with_masks)


def make_scene(
    size: int | tuple[int, int] = 2560,
    seed: int = 0,
    n_farms: int | None = None,
    radius_range: tuple[float, float] = (5.0, 30.0),
    roof_weights: tuple[float, float, float] = (0.55, 0.3, 0.15),
    *,
    group_size: tuple[int, int] = (1, 6),
    sun: Sun | None = None,
    fill: float | None = None,
    clutter: float | None = None,
    biome: str | None = None,
    distractors: bool = True,
    sensor: bool = True,
    with_masks: bool = True,
) -> Tile:
    """Render a large scene (default 2560 × 2560, like the Airbus images): several tank farms
    separated by roads, fields and open land, with the same ground truth as :func:`make_tile`.

    ``n_farms`` farms of 1-3 sites each (random when None: 0.5-1 farm per 1100 × 1100 px, i.e. 3-5
    in a 2560² scene, typically 30-110 tanks); around them industry, towns along the main roads,
    farming areas (fields or centre pivots), water treatment, ponds, trees, sometimes the sea. The
    other arguments are those of :func:`make_tile`.

    Dense masks take N × H × W bytes (6.5 MB per tank at 2560², ~0.5 GB for 80 tanks): for
    scene-scale evaluation pass ``with_masks=False`` and take one mask at a time with
    :meth:`Tile.instance_mask` (boxes, labels and ``tanks`` are always there).
    """
    h, w = _check_size(size)
    _check_int("n_farms", n_farms, 0, 64, allow_none=True)
    opt, rngs, biome, sun = _setup(seed, radius_range, roof_weights, group_size, sun, fill, clutter, biome,
                                   distractors, sensor, with_masks)
    rng = rngs["layout"]
    if n_farms is None:
        n_farms = max(1, int(round(h * w / 1100**2 * rng.uniform(0.5, 1.0))))
    farms = [[int(rng.integers(1, 5)) for _ in range(int(rng.integers(1, 4)))] for _ in range(n_farms)]
    plan = plan_canvas(h, w, rngs, opt, farms, scene=True, biome=biome)
    return _finish(plan, h, w, sun, rngs, seed, opt, biome, sensor, with_masks)


# ---------------------------------------------------------------------------------------------
# Rendering and ground truth
# ---------------------------------------------------------------------------------------------


def render(plan, h: int, w: int, sun: Sun, rng_texture, rng_ground) -> np.ndarray:
    """Paint a planned canvas: ground, flat things, shadows, raised things -> Float[H, W, 3]."""
    grain = (value_noise(rng_texture, h, w, 1.6) - 0.5) * 3.0
    mottle = (value_noise(rng_texture, h, w, 12) - 0.5) * 3.0
    canvas = Canvas(h, w, grain, mottle)
    ls.paint_ground(canvas, plan.palette, rng_ground)
    elements = sorted(plan.elements, key=lambda e: e.z)  # stable: planning order within a layer
    for e in elements:
        e.ground(canvas, sun)
    for e in elements:
        e.cast(canvas, sun)
    canvas.apply_shadows(plan.palette.shadow_tint)
    for e in elements:
        e.top(canvas, sun, plan.palette.shadow_tint)
    return canvas.img


def tank_patch(tank: Tank, h: int, w: int):
    """The tank's mask inside an H × W image as (y0, x0, Bool[h, w]) cut to its tight box, or None.

    A pixel belongs to the tank iff its centre lies inside the disc (nadir view: the roof's
    footprint; the ground shadow is not part of the tank).
    """
    r = tank.radius
    win = window(h, w, tank.cx - r - 1, tank.cy - r - 1, tank.cx + r + 1, tank.cy + r + 1)
    if win is None:
        return None
    inside = (win.xx - tank.cx) ** 2 + (win.yy - tank.cy) ** 2 <= r * r  # Bool[h, w]
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if len(rows) == 0:
        return None
    patch = inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return win.sy.start + int(rows[0]), win.sx.start + int(cols[0]), patch


def _finish(plan, h, w, sun, rngs, seed, opt, biome, use_sensor, with_masks) -> Tile:
    img = render(plan, h, w, sun, rngs["texture"], rngs["ground"])
    params = sensor_mod.draw_parameters(rngs["sensor"])
    image = sensor_mod.apply(img, params, rngs["sensor"]) if use_sensor else sensor_mod.clean(img)

    tanks, patches = [], []
    for tank, _look in plan.tanks:
        p = tank_patch(tank, h, w)
        if p is not None and p[2].sum() >= MIN_VISIBLE_AREA:
            tanks.append(tank)
            patches.append(p)
    boxes = torch.tensor([[x0, y0, x0 + m.shape[1], y0 + m.shape[0]] for y0, x0, m in patches],
                         dtype=torch.float32).reshape(-1, 4)
    target = {"boxes": boxes, "labels": torch.ones(len(tanks), dtype=torch.int64)}
    if with_masks:
        masks = torch.zeros((len(tanks), h, w), dtype=torch.uint8)
        for i, (y0, x0, m) in enumerate(patches):
            masks[i, y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = torch.from_numpy(m.astype(np.uint8))
        target["masks"] = masks
    info = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "size": [h, w], "gsd_m": GSD,
            "biome": biome, "clutter": round(opt.clutter, 4), "sensor": params if use_sensor else None}
    return Tile(image=image.contiguous(), target=target, tanks=tanks, sun=sun, distractors=list(plan.distractors),
                info=info, mask_patches=patches)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _setup(seed, radius_range, roof_weights, group_size, sun, fill, clutter, biome, distractors, sensor, with_masks):
    _check_int("seed", seed, 0, None)
    lo_hi = _check_pair("radius_range", radius_range, float)
    if not 1.0 <= lo_hi[0] <= lo_hi[1] <= 250.0:
        raise UserError(f"radius_range: expected 1 <= min <= max <= 250 pixels, got {tuple(radius_range)}")
    try:
        weights = tuple(float(v) for v in roof_weights)
    except (TypeError, ValueError):
        weights = ()
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0 or not all(map(math.isfinite, weights)):
        raise UserError(f"roof_weights: expected three non-negative weights (floating, fixed, dark) with a "
                        f"positive sum, got {roof_weights!r}")
    groups = _check_pair("group_size", group_size, int)
    if not 1 <= groups[0] <= groups[1] <= 12:
        raise UserError(f"group_size: expected 1 <= min <= max <= 12 tanks per bund, got {tuple(group_size)}")
    if sun is not None and not (isinstance(sun, Sun) and 0.01 < sun.elevation < math.pi / 2 - 0.01):
        raise UserError(f"sun: expected a Sun with an elevation between 1 and 89 degrees "
                        f"(e.g. Sun.from_degrees(135, 40)), got {sun!r}")
    _check_unit("fill", fill)
    _check_unit("clutter", clutter)
    if biome is not None and biome not in ls.BIOMES:
        raise UserError(f"biome: expected one of {', '.join(ls.BIOMES)} or None, got {biome!r}")
    for name, value in [("distractors", distractors), ("sensor", sensor), ("with_masks", with_masks)]:
        if not isinstance(value, (bool, np.bool_)):
            raise UserError(f"{name}: expected True or False, got {value!r}")
    rngs = {name: np.random.default_rng([int(seed), k]) for k, name in enumerate(_STREAMS)}
    knobs = rngs["knobs"]  # drawn whether or not they are overridden: the other streams stay put
    random_clutter = float(knobs.uniform(0.2, 1.0))
    random_biome = str(knobs.choice(list(_BIOME_WEIGHTS), p=list(_BIOME_WEIGHTS.values())))
    random_sun = Sun(float(rngs["sun"].uniform(0, 2 * math.pi)), math.radians(float(rngs["sun"].uniform(30, 70))))
    opt = Options(radius_range=lo_hi, roof_weights=weights, group_size=groups,
                  fill=None if fill is None else float(fill),
                  clutter=random_clutter if clutter is None else float(clutter), distractors=bool(distractors))
    return opt, rngs, (biome or random_biome), (sun or random_sun)


def _check_size(size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, numbers.Integral) and not isinstance(size, bool) else size
    try:
        h, w = pair
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok or min(h, w) < 16:
        raise UserError(f"size: expected an int or (height, width), at least 16×16 pixels, got {size!r}")
    return int(h), int(w)


def _check_int(name, value, lo, hi, allow_none=False):
    if value is None and allow_none:
        return
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise UserError(f"{name}: expected an integer {bound}{' or None' if allow_none else ''}, got {value!r}")


def _check_pair(name, value, kind):
    try:
        a, b = value
        pair = (kind(a), kind(b))
        if kind is int and (pair[0] != a or pair[1] != b):
            raise ValueError
        if not all(math.isfinite(v) for v in pair):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a pair (min, max), got {value!r}") from None
    if pair[0] > pair[1]:
        raise UserError(f"{name}: expected min <= max, got {tuple(value)}")
    return pair


def _check_unit(name, value):
    if value is None:
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{name}: expected a number in [0, 1] or None, got {value!r}")
