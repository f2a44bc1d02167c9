"""Everything around the tanks: ground, fields, water, roads, bunds, pipes, buildings, trees.

Taught in: ``09_case_study_oil_tanks.ipynb`` (the generator's internals).

Shape shorthand:
    H, W     canvas height and width in pixels
    h, w     one element's window

Every element is drawn in three phases (see ``generator._render``): ``ground`` paints flat things
(fields, water, roads, bund floors and walls, pipes on sleepers) in the order of their ``z``;
``cast`` adds the shadows of raised things to the canvas' shadow map; after the shadows are
applied, ``top`` paints the tops of raised things (roofs, canopies, racks, tanks). Colours are
chosen when the layout is planned, so drawing uses no randomness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mrcnn_edu.oil_tanks.raster import (
    Canvas,
    capsule_windows,
    convex_hull,
    coverage,
    dist_segment,
    local_coords,
    quantile_threshold,
    rect_corners,
    sdf_convex,
    sdf_disc,
    sdf_rect,
    value_noise,
)
from mrcnn_edu.oil_tanks.tanks import Sun, lambert

BIOMES = ("arid", "semi_arid", "temperate", "industrial", "tropical")


@dataclass(frozen=True)
class Distractor:
    """A round thing that is *not* a tank (never labelled): where it is, for tests and galleries."""

    kind: str  # "pond", "clarifier", "circular_field", "roundabout", "round_building", "silo"
    cx: float
    cy: float
    radius: float


# ---------------------------------------------------------------------------------------------
# Palettes: one per biome, jittered per tile
# ---------------------------------------------------------------------------------------------

_BIOME_SPECS = {  # soil A, soil B, bare ground, vegetation (RGB); vegetation and bare cover ranges
    "arid": ([.80, .71, .58], [.70, .60, .47], [.91, .87, .79], [.40, .43, .30], (0.0, 0.05), (0.05, 0.30)),
    "semi_arid": ([.66, .60, .50], [.56, .50, .41], [.82, .79, .72], [.35, .40, .28], (0.04, 0.25), (0.03, 0.20)),
    "temperate": ([.46, .49, .36], [.56, .52, .42], [.78, .76, .70], [.22, .30, .19], (0.15, 0.45), (0.02, 0.10)),
    "industrial": ([.60, .59, .56], [.52, .50, .46], [.84, .83, .80], [.32, .39, .27], (0.03, 0.18), (0.05, 0.25)),
    "tropical": ([.60, .47, .36], [.44, .45, .31], [.80, .72, .62], [.18, .29, .16], (0.25, 0.55), (0.02, 0.12)),
}
# how much of each kind of land use a biome has (per unit area, before the clutter level)
BIOME_USE = {
    "arid": dict(fields=0.15, pivots=0.8, trees=0.1, buildings=0.8, ponds=0.6, shrubs=0.5),
    "semi_arid": dict(fields=0.5, pivots=0.5, trees=0.5, buildings=1.0, ponds=0.8, shrubs=0.9),
    "temperate": dict(fields=1.0, pivots=0.05, trees=1.5, buildings=1.0, ponds=1.0, shrubs=0.3),
    "industrial": dict(fields=0.1, pivots=0.05, trees=0.4, buildings=2.2, ponds=1.0, shrubs=0.3),
    "tropical": dict(fields=0.6, pivots=0.05, trees=2.0, buildings=0.8, ponds=1.2, shrubs=0.5),
}


@dataclass
class Palette:
    biome: str
    soil_a: np.ndarray
    soil_b: np.ndarray
    bare: np.ndarray
    veg: np.ndarray
    veg_cover: float
    bare_cover: float
    asphalt: np.ndarray
    concrete: np.ndarray
    gravel: np.ndarray
    dirt: np.ndarray
    shadow_tint: np.ndarray  # what a shadowed surface keeps of its brightness, per channel
    use: dict = field(default_factory=dict)


def jitter(rng, colour, amount=0.04, gain=(0.92, 1.08)):
    """A colour varied in brightness (``gain``) and, less, in hue (``amount``)."""
    c = np.asarray(colour, dtype=np.float32) * rng.uniform(*gain) + rng.normal(0, amount / 3, 3)
    return np.clip(c, 0.03, 0.97).astype(np.float32)


def make_palette(rng: np.random.Generator, biome: str) -> Palette:
    soil_a, soil_b, bare, veg, veg_cover, bare_cover = _BIOME_SPECS[biome]
    base = rng.uniform(0.9, 1.06)  # overall brightness of this place
    soil_a = jitter(rng, np.array(soil_a) * base)
    return Palette(
        biome=biome, soil_a=soil_a, soil_b=jitter(rng, np.array(soil_b) * base), bare=jitter(rng, bare, 0.02),
        veg=jitter(rng, veg, 0.03), veg_cover=float(rng.uniform(*veg_cover)),
        bare_cover=float(rng.uniform(*bare_cover)),
        asphalt=jitter(rng, [0.33, 0.33, 0.34], 0.02, (0.8, 1.25)),
        concrete=jitter(rng, [0.74, 0.73, 0.70], 0.02, (0.9, 1.08)),
        gravel=jitter(rng, (0.6 * soil_a + 0.4 * np.array([0.6, 0.6, 0.6])), 0.02),
        dirt=jitter(rng, np.clip(soil_a * 1.12, 0, 0.95), 0.02),
        shadow_tint=np.array([0.30, 0.34, 0.42], np.float32) * rng.uniform(0.8, 1.25),
        use=dict(BIOME_USE[biome]),
    )


def paint_ground(canvas: Canvas, pal: Palette, rng: np.random.Generator) -> None:
    """Soil of two tones, bright bare patches, vegetation with ragged edges and scattered shrubs.

    Each layer is an alpha blend; expanded, the result is a per-pixel mix of four colours,
    ``weights Float[H, W, 4] @ colours Float[4, 3]``: scalar fields and one matrix product
    instead of many passes over a 3-channel image (it matters for 2560 × 2560 scenes).
    """
    h, w = canvas.h, canvas.w
    large, mid, small = value_noise(rng, h, w, 170), value_noise(rng, h, w, 45), value_noise(rng, h, w, 9)
    fine, dots = value_noise(rng, h, w, 3.5), value_noise(rng, h, w, 2.2)
    region = value_noise(rng, h, w, 600)  # in a scene: greener and barer regions
    mix = _unit(2.5 * (0.6 * large + 0.4 * mid) - 0.75)  # soil A -> soil B
    tone = 0.82 + 0.14 * small + 0.12 * fine + 0.045 * canvas.grain + 0.05 * canvas.mottle
    keep = tone  # how much of the (toned) soil is left after each layer
    bare_w = np.zeros_like(tone)
    if pal.bare_cover > 0.01:  # bright bare ground: gravel, salt, sand; edges broken by fine noise
        bn = 0.45 * (1.0 - mid) + 0.2 * small + 0.15 * fine + 0.2 * (1.0 - region)
        t = quantile_threshold(bn, pal.bare_cover)
        a = _unit(12.0 * (bn - t)) * rng.uniform(0.3, 0.6)
        bare_w, keep = tone * a, keep * (1.0 - a)
    veg_w = np.zeros_like(tone)
    if pal.veg_cover > 0.01:  # vegetation: crowns (dots) thinning out towards the patch edges
        vn = 0.3 * value_noise(rng, h, w, 90) + 0.15 * mid + 0.25 * dots + 0.3 * region
        t = quantile_threshold(vn, pal.veg_cover)
        a = _unit(14.0 * (vn - t))
        veg_w = a * (0.6 + 0.7 * dots + 0.1 * canvas.mottle)  # mottled crowns
        keep, bare_w = keep * (1.0 - a), bare_w * (1.0 - a)
    shrubs = pal.use.get("shrubs", 0.0)
    if shrubs > 0:  # scattered shrubs: dark dots where the fine noise peaks, denser in places
        a = _unit(12.0 * (dots - 0.74)) * _unit(1.6 * mid - 0.3) * shrubs
        veg_w = veg_w * (1.0 - a) + 0.75 * a
        keep, bare_w = keep * (1.0 - a), bare_w * (1.0 - a)
    weights = np.empty((h, w, 4), dtype=np.float32)  # (H, W, 4): soil A, soil B, bare, vegetation
    np.multiply(keep, mix, out=weights[..., 1])
    np.subtract(keep, weights[..., 1], out=weights[..., 0])
    weights[..., 2], weights[..., 3] = bare_w, veg_w
    colours = np.stack([pal.soil_a, pal.soil_b, pal.bare, pal.veg]).astype(np.float32)  # (4, 3)
    np.matmul(weights, colours, out=canvas.img)  # (H, W, 4) @ (4, 3) -> (H, W, 3)


def _unit(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place (cheaper than np.clip on large arrays)."""
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


class Element:
    """Something drawn on the canvas; see the module docstring for the three phases."""

    z = 0

    def ground(self, canvas: Canvas, sun: Sun) -> None:
        pass

    def cast(self, canvas: Canvas, sun: Sun) -> None:
        pass

    def top(self, canvas: Canvas, sun: Sun, tint: np.ndarray) -> None:
        pass


def _disc_window(canvas, cx, cy, r):
    return canvas.window(cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1)


def _cast_extruded(canvas: Canvas, corners: np.ndarray, height: float, sun: Sun, strength: float = 1.0) -> None:
    """The shadow of a prism (a convex footprint raised to ``height``): hull of base and shifted base."""
    length = sun.shadow_length(height)
    shifted = corners - length * sun.toward[None, :]
    pts = np.concatenate([corners, shifted])
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    win = canvas.window(x0 - 1, y0 - 1, x1 + 1, y1 + 1)
    if win is not None:
        canvas.cast(win, coverage(sdf_convex(win, convex_hull(pts))) * strength)


def _cast_capsule(canvas: Canvas, cx, cy, r, h0, h1, sun: Sun, strength=1.0) -> None:
    """The shadow of a disc raised from height h0 to h1 (a cylinder, or a tree crown)."""
    u = sun.toward
    a0, a1 = sun.shadow_length(h0), sun.shadow_length(h1)
    ax, ay, bx, by = cx - a0 * u[0], cy - a0 * u[1], cx - a1 * u[0], cy - a1 * u[1]
    win = canvas.window(min(ax, bx) - r - 1, min(ay, by) - r - 1, max(ax, bx) + r + 1, max(ay, by) + r + 1)
    if win is not None:
        canvas.cast(win, coverage(dist_segment(win, ax, ay, bx, by) - r, soft=1.2) * strength)


# ---------------------------------------------------------------------------------------------
# Flat land use
# ---------------------------------------------------------------------------------------------


@dataclass
class Field(Element):
    """A cultivated parcel: a rotated rectangle with crop rows and a faint boundary."""

    cx: float
    cy: float
    hw: float
    hh: float
    angle: float
    colour: np.ndarray
    stripe_period: float = 0.0
    stripe_amp: float = 0.0
    border: np.ndarray | None = None
    z = 0

    def ground(self, canvas, sun):
        reach = math.hypot(self.hw, self.hh) + 1
        win = canvas.window(self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)
        if win is None:
            return
        sdf = sdf_rect(win, self.cx, self.cy, self.hw, self.hh, self.angle)
        tone = canvas.texture(win, 0.04, 0.09)
        if self.stripe_period:
            u, _ = local_coords(win, self.cx, self.cy, self.angle)
            tone = tone * (1.0 + self.stripe_amp * np.sin(2 * math.pi * u / self.stripe_period))[..., None]
        canvas.paint(win, coverage(sdf, soft=1.5), self.colour * tone)
        if self.border is not None:
            canvas.paint(win, coverage(np.abs(sdf + 0.7) - 0.6) * 0.6, self.border)


@dataclass
class Pad(Element):
    """Graded ground (gravel, compacted soil, concrete) under a site, with soft, ragged edges."""

    cx: float
    cy: float
    hw: float
    hh: float
    angle: float
    colour: np.ndarray
    z = 1

    def ground(self, canvas, sun):
        reach = math.hypot(self.hw, self.hh) + 6
        win = canvas.window(self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)
        if win is None:
            return
        sdf = sdf_rect(win, self.cx, self.cy, self.hw, self.hh, self.angle) + 2.5 * canvas.mottle[win.sy, win.sx]
        canvas.paint(win, coverage(sdf, soft=4.0) * 0.85, self.colour * canvas.texture(win, 0.06, 0.08))


@dataclass
class Pivot(Element):
    """A centre-pivot irrigated field: a disc with wheel-track rings, the arm and a harvested sector."""

    cx: float
    cy: float
    r: float
    colour: np.ndarray
    colour2: np.ndarray
    sector: tuple  # (start angle, span) of the second colour
    ring_period: float
    arm: float
    z = 0

    def ground(self, canvas, sun):
        win = _disc_window(canvas, self.cx, self.cy, self.r)
        if win is None:
            return
        dx, dy = win.xx - self.cx, win.yy - self.cy
        dist = np.sqrt(dx * dx + dy * dy)
        ang = np.arctan2(dy, dx)
        second = ((ang - self.sector[0]) % (2 * math.pi) < self.sector[1])[..., None]
        base = np.where(second, self.colour2, self.colour)
        rings = 1.0 - 0.09 * coverage(np.abs(dist % self.ring_period - self.ring_period / 2) - 0.5)
        colour = base * (rings[..., None] * canvas.texture(win, 0.04, 0.1))
        canvas.paint(win, coverage(dist - self.r, soft=1.5), colour)
        ex, ey = self.cx + self.r * math.cos(self.arm), self.cy + self.r * math.sin(self.arm)
        canvas.paint(win, coverage(dist_segment(win, self.cx, self.cy, ex, ey) - 0.5) * 0.5, [0.72, 0.72, 0.70])
        canvas.paint(win, coverage(dist - 1.5) * 0.8, [0.75, 0.74, 0.70])


@dataclass
class Pond(Element):
    """A round pond: dark (bluish, greenish or muddy) water inside an embankment."""

    cx: float
    cy: float
    r: float
    water: np.ndarray
    bank: np.ndarray
    bank_width: float
    z = 1

    def ground(self, canvas, sun):
        win = _disc_window(canvas, self.cx, self.cy, self.r + self.bank_width)
        if win is None:
            return
        sdf = sdf_disc(win, self.cx, self.cy, self.r)
        canvas.paint(win, coverage(sdf - self.bank_width, soft=1.3), self.bank * canvas.texture(win, 0.05, 0.05))
        depth = np.clip(-sdf / max(self.r, 1.0), 0.0, 1.0)[..., None]  # darker towards the middle
        water = self.water * (1.05 - 0.2 * depth) * canvas.texture(win, 0.012, 0.05)
        canvas.paint(win, coverage(sdf), water)


@dataclass
class Clarifier(Element):
    """A round settling tank of a treatment plant: water in a concrete ring, a hub and a bridge."""

    cx: float
    cy: float
    r: float
    water: np.ndarray
    concrete: np.ndarray
    bridge: float  # angle
    z = 1

    def ground(self, canvas, sun):
        win = _disc_window(canvas, self.cx, self.cy, self.r + 2)
        if win is None:
            return
        sdf = sdf_disc(win, self.cx, self.cy, self.r)
        canvas.paint(win, coverage(sdf - 1.8), self.concrete * canvas.texture(win, 0.03))
        water = self.water * canvas.texture(win, 0.01, 0.04)
        canvas.paint(win, coverage(sdf), water)
        canvas.paint(win, coverage(np.abs(sdf + 0.12 * self.r) - 0.5) * 0.7, self.concrete * 0.8)  # weir
        canvas.paint(win, coverage(sdf + 0.86 * self.r), self.concrete)  # the central hub

    def _bridge_end(self):
        return self.cx + (self.r + 1.5) * math.cos(self.bridge), self.cy + (self.r + 1.5) * math.sin(self.bridge)

    def cast(self, canvas, sun):
        length = sun.shadow_length(1.5)
        u = sun.toward
        ex, ey = self._bridge_end()
        win = _disc_window(canvas, self.cx, self.cy, self.r + 2 + length)
        if win is not None:
            sx, sy = -length * u[0], -length * u[1]  # the bridge's shadow, shifted away from the sun
            d = dist_segment(win, self.cx + sx, self.cy + sy, ex + sx, ey + sy)
            canvas.cast(win, coverage(d - 0.8) * 0.8)

    def top(self, canvas, sun, tint):
        win = _disc_window(canvas, self.cx, self.cy, self.r + 2)
        if win is not None:
            ex, ey = self._bridge_end()
            canvas.paint(win, coverage(dist_segment(win, self.cx, self.cy, ex, ey) - 0.8), self.concrete * 1.1)


@dataclass
class Sea(Element):
    """Open water beyond a straight quay: everything with ``n · p > offset``."""

    nx: float
    ny: float
    offset: float
    water: np.ndarray
    quay: np.ndarray
    z = 1

    def ground(self, canvas, sun):
        win = canvas.window(0, 0, canvas.w, canvas.h)
        d = self.offset - (win.xx * self.nx + win.yy * self.ny)  # < 0 on the water
        canvas.paint(win, coverage(d + 1.5), self.quay * canvas.texture(win, 0.04))
        ripple = 1.0 + 0.012 * canvas.grain[win.sy, win.sx] + 0.03 * canvas.mottle[win.sy, win.sx]
        canvas.paint(win, coverage(d), self.water * ripple[..., None])


# ---------------------------------------------------------------------------------------------
# Roads, bunds, pipes
# ---------------------------------------------------------------------------------------------


@dataclass
class Road(Element):
    """A polyline road of some width: asphalt, concrete or dirt, with lighter or darker shoulders."""

    points: list
    width: float
    colour: np.ndarray
    shoulder: np.ndarray | None = None
    z = 2

    def ground(self, canvas, sun):
        half = self.width / 2
        for (ax, ay), (bx, by) in zip(self.points[:-1], self.points[1:]):
            for win in capsule_windows(canvas.h, canvas.w, ax, ay, bx, by, half + 3):
                d = dist_segment(win, ax, ay, bx, by)
                if self.shoulder is not None:
                    canvas.paint(win, coverage(d - half - 1.2) * 0.6, self.shoulder * canvas.texture(win, 0.05))
                canvas.paint(win, coverage(d - half, soft=1.1), self.colour * canvas.texture(win, 0.035, 0.03))


@dataclass
class Roundabout(Element):
    """A ring road around a round island of grass or soil."""

    cx: float
    cy: float
    r_in: float
    width: float
    asphalt: np.ndarray
    island: np.ndarray
    z = 3

    def ground(self, canvas, sun):
        win = _disc_window(canvas, self.cx, self.cy, self.r_in + self.width + 1)
        if win is None:
            return
        sdf = sdf_disc(win, self.cx, self.cy, self.r_in)
        canvas.paint(win, coverage(sdf - self.width, soft=1.1), self.asphalt * canvas.texture(win, 0.035))
        canvas.paint(win, coverage(sdf + 0.8) * 0.8, [0.78, 0.77, 0.74])  # kerb
        canvas.paint(win, coverage(sdf + 1.6), self.island * canvas.texture(win, 0.06, 0.08))


@dataclass
class Bund(Element):
    """An earthen (or concrete) wall around a group of tanks, with its floor inside."""

    cx: float
    cy: float
    hw: float
    hh: float
    angle: float
    wall_width: float
    floor: np.ndarray
    wall: np.ndarray
    height: float
    z = 4

    def _window(self, canvas, extra=0.0):
        reach = math.hypot(self.hw, self.hh) + self.wall_width + 2 + extra
        return canvas.window(self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)

    def ground(self, canvas, sun):
        win = self._window(canvas)
        if win is None:
            return
        sdf = sdf_rect(win, self.cx, self.cy, self.hw, self.hh, self.angle)
        half = self.wall_width / 2
        canvas.paint(win, coverage(sdf + half - 0.5), self.floor * canvas.texture(win, 0.05, 0.07))
        # outward normal of the nearest side, in the rectangle's frame, then in the image
        u, v = local_coords(win, self.cx, self.cy, self.angle)
        side_u = (np.abs(u) - self.hw) > (np.abs(v) - self.hh)
        nu, nv = np.where(side_u, np.sign(u), 0.0), np.where(side_u, 0.0, np.sign(v))
        c, s = math.cos(self.angle), math.sin(self.angle)
        nx, ny = nu * c - nv * s, nu * s + nv * c
        facing = np.where(sdf > 0, 1.0, -1.0)  # outer slope faces out, inner slope faces in
        toward = sun.toward
        light = 1.0 + 0.2 * math.cos(sun.elevation) * facing * (nx * toward[0] + ny * toward[1])
        colour = self.wall * (light[..., None] * canvas.texture(win, 0.05))
        canvas.paint(win, coverage(np.abs(sdf) - half), colour)

    def cast(self, canvas, sun):
        length = sun.shadow_length(self.height)
        win = self._window(canvas, length)
        if win is None:
            return
        u = sun.toward
        half = self.wall_width / 2
        alpha = None
        for t in (0.35 * length, 0.7 * length, length):  # ground points whose ray to the sun hits the wall
            sdf = sdf_rect(win, self.cx - t * u[0], self.cy - t * u[1], self.hw, self.hh, self.angle)
            a = coverage(np.abs(sdf) - half * (1.0 - t / (length + 1e-6)))
            alpha = a if alpha is None else np.maximum(alpha, a)
        canvas.cast(win, alpha * 0.45)


@dataclass
class Pipe(Element):
    """A pipeline on low sleepers: a thin line with a thin shadow beside it."""

    points: list
    width: float
    colour: np.ndarray
    elevation: float = 0.8
    z = 5

    def _segments(self, canvas, dx=0.0, dy=0.0):
        for (ax, ay), (bx, by) in zip(self.points[:-1], self.points[1:]):
            ax, ay, bx, by = ax + dx, ay + dy, bx + dx, by + dy
            for win in capsule_windows(canvas.h, canvas.w, ax, ay, bx, by, self.width + 2):
                yield win, dist_segment(win, ax, ay, bx, by)

    def ground(self, canvas, sun):
        for win, d in self._segments(canvas):
            canvas.paint(win, coverage(d - self.width / 2) * 0.9, self.colour)

    def cast(self, canvas, sun):
        length = sun.shadow_length(self.elevation)
        u = sun.toward
        for win, d in self._segments(canvas, -length * u[0], -length * u[1]):
            canvas.cast(win, coverage(d - self.width / 2) * 0.7)


@dataclass
class PipeRack(Element):
    """An elevated pipe rack: parallel pipes on cross beams, casting a long banded shadow."""

    ax: float
    ay: float
    bx: float
    by: float
    width: float
    height: float
    pipes: list  # colours, one per pipe
    beam: np.ndarray
    z = 6

    def _geometry(self):
        length = math.hypot(self.bx - self.ax, self.by - self.ay)
        angle = math.atan2(self.by - self.ay, self.bx - self.ax)
        return (self.ax + self.bx) / 2, (self.ay + self.by) / 2, length / 2, angle

    def cast(self, canvas, sun):
        cx, cy, half_len, angle = self._geometry()
        _cast_extruded(canvas, rect_corners(cx, cy, half_len, self.width / 2, angle), self.height, sun, 0.7)

    def top(self, canvas, sun, tint):
        cx, cy, half_len, angle = self._geometry()
        reach = half_len + self.width
        win = canvas.window(cx - reach, cy - reach, cx + reach, cy + reach)
        if win is None:
            return
        u, v = local_coords(win, cx, cy, angle)
        inside = (np.abs(u) <= half_len) & (np.abs(v) <= self.width / 2 + 0.5)
        beams = coverage(np.abs(u % 7.0 - 3.5) - 3.0) * inside  # a cross beam every ~8 m
        canvas.paint(win, beams * 0.6, self.beam)
        n = len(self.pipes)
        for i, colour in enumerate(self.pipes):
            offset = (i - (n - 1) / 2) * self.width / max(n, 1)
            a = coverage(np.abs(v - offset) - 0.45) * (np.abs(u) <= half_len)
            canvas.paint(win, a * 0.9, colour)


# ---------------------------------------------------------------------------------------------
# Raised things: buildings, round buildings, silos, trees, vehicles
# ---------------------------------------------------------------------------------------------


@dataclass
class Building(Element):
    """A rectangular building: flat roof (parapet, rooftop units) or gable roof (two shaded halves)."""

    cx: float
    cy: float
    hw: float
    hh: float
    angle: float
    height: float
    roof: np.ndarray
    kind: str = "flat"
    units: list = field(default_factory=list)  # rooftop units: (u, v, half size) in the roof's frame
    z = 7

    def cast(self, canvas, sun):
        _cast_extruded(canvas, rect_corners(self.cx, self.cy, self.hw, self.hh, self.angle), self.height, sun)

    def top(self, canvas, sun, tint):
        reach = math.hypot(self.hw, self.hh) + 1
        win = canvas.window(self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)
        if win is None:
            return
        sdf = sdf_rect(win, self.cx, self.cy, self.hw, self.hh, self.angle)
        colour = self.roof * canvas.texture(win, 0.03, 0.03)
        u, v = local_coords(win, self.cx, self.cy, self.angle)
        if self.kind == "gable":  # ridge along the long side: each half faces its own way
            along_u = self.hw >= self.hh
            side = np.sign(v) if along_u else np.sign(u)
            c, s = math.cos(self.angle), math.sin(self.angle)
            nx, ny = (-s * side, c * side) if along_u else (c * side, s * side)
            t = sun.toward
            slope = 0.4
            n_dot_s = (math.sin(slope) * math.cos(sun.elevation) * (nx * t[0] + ny * t[1])
                       + math.cos(slope) * math.sin(sun.elevation))
            colour = colour * (0.3 + 0.7 * np.clip(n_dot_s, 0, None) / math.sin(sun.elevation))[..., None]
        else:
            colour = colour * (1.0 - 0.12 * coverage(np.abs(sdf + 1.0) - 0.5))[..., None]  # parapet
            for (pu, pv, ps) in self.units:
                q = np.maximum(np.abs(u - pu), np.abs(v - pv)) - ps
                colour = colour * (1.0 + 0.15 * coverage(q))[..., None]
        canvas.paint(win, coverage(sdf), colour)


@dataclass
class RoundBuilding(Element):
    """A round building or low silo with a flat roof: a tank-like disc, but no bund and a short shadow."""

    cx: float
    cy: float
    r: float
    height: float
    roof: np.ndarray
    ring: bool = False
    z = 8

    def cast(self, canvas, sun):
        _cast_capsule(canvas, self.cx, self.cy, self.r, 0.0, self.height, sun)

    def top(self, canvas, sun, tint):
        win = _disc_window(canvas, self.cx, self.cy, self.r)
        if win is None:
            return
        sdf = sdf_disc(win, self.cx, self.cy, self.r)
        colour = self.roof * canvas.texture(win, 0.03, 0.03)
        colour = colour * (1.0 + 0.1 * coverage(np.abs(sdf + 0.7) - 0.5))[..., None]  # parapet
        if self.ring:
            colour = colour * (1.0 - 0.18 * coverage(np.abs(sdf + 0.45 * self.r) - 0.6))[..., None]
        canvas.paint(win, coverage(sdf), colour)


@dataclass
class Silo(Element):
    """A tall, narrow silo with a conical top (grain or cement): long shadow, small disc."""

    cx: float
    cy: float
    r: float
    height: float
    colour: np.ndarray
    z = 8

    def cast(self, canvas, sun):
        _cast_capsule(canvas, self.cx, self.cy, self.r, 0.0, self.height, sun)

    def top(self, canvas, sun, tint):
        win = _disc_window(canvas, self.cx, self.cy, self.r)
        if win is None:
            return
        dx, dy = win.xx - self.cx, win.yy - self.cy
        dist = np.sqrt(dx * dx + dy * dy)
        shade = lambert(dx, dy, dist, self.r, 0.55, "cone", sun)
        canvas.paint(win, coverage(dist - self.r), self.colour * (shade[..., None] * canvas.texture(win, 0.03)))


@dataclass
class Tree(Element):
    """A tree crown: a small, dark, rounded blob lit from the sun's side, with its shadow."""

    cx: float
    cy: float
    r: float
    height: float
    colour: np.ndarray
    z = 9

    def cast(self, canvas, sun):
        _cast_capsule(canvas, self.cx, self.cy, self.r * 0.9, self.height * 0.5, self.height, sun, 0.9)

    def top(self, canvas, sun, tint):
        win = _disc_window(canvas, self.cx, self.cy, self.r)
        if win is None:
            return
        dx, dy = win.xx - self.cx, win.yy - self.cy
        dist = np.sqrt(dx * dx + dy * dy)
        shade = lambert(dx, dy, dist, self.r, 1.2, "dome", sun)
        colour = self.colour * (shade[..., None] * canvas.texture(win, 0.12, 0.05))
        canvas.paint(win, coverage(dist - self.r, soft=1.4), colour)


@dataclass
class Vehicle(Element):
    """A car or truck: a few bright or dark pixels on a road, with a tiny shadow."""

    cx: float
    cy: float
    hw: float
    hh: float
    angle: float
    colour: np.ndarray
    z = 10

    def cast(self, canvas, sun):
        _cast_extruded(canvas, rect_corners(self.cx, self.cy, self.hw, self.hh, self.angle), 1.4, sun, 0.8)

    def top(self, canvas, sun, tint):
        reach = max(self.hw, self.hh) + 1
        win = canvas.window(self.cx - reach, self.cy - reach, self.cx + reach, self.cy + reach)
        if win is not None:
            canvas.paint(win, coverage(sdf_rect(win, self.cx, self.cy, self.hw, self.hh, self.angle)), self.colour)
