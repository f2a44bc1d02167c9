"""Oil storage tanks: their ground truth, the sun, and how a tank and its shadows are painted.

Taught in: ``09_case_study_oil_tanks.ipynb`` (fill-level geometry, roof types).

Shape shorthand:
    h, w     height and width of a tank's window (its bounding box, clipped to the canvas)

Geometry (nadir view; image x to the right, y down; lengths in pixels of ~1.2 m):
    A tank is a cylinder of radius ``r`` and height ``h``. ``Sun.azimuth`` is the direction
    *towards* the sun in image coordinates, ``u = (cos az, sin az)``, ``Sun.elevation`` its angle
    above the horizon ``el``.

    * Ground shadow: a point of the ground is in shadow iff the ray towards the sun meets the
      tank, i.e. the tank's disc swept from its centre ``c`` to ``c - (h / tan el) u``
      (a capsule), minus the tank itself. Its length beyond the tank is ``h / tan el``.
    * Floating roof: the roof floats at ``d = (1 - fill) * h`` below the rim. A roof point ``p``
      is lit iff the ray towards the sun clears the rim, i.e. iff ``p + (d / tan el) u`` still lies
      inside the rim circle. The *inner* shadow is therefore the part of the disc not covered by
      the disc shifted by ``-(d / tan el) u``: a crescent on the sun's side whose width along ``u``
      through the centre is ``s = d / tan el`` (:func:`crescent_width`). Measuring ``s`` in an
      image gives back ``fill = 1 - s tan(el) / h`` (:func:`fill_from_crescent`).
    * Fixed roofs (domes, cones) are shaded by Lambert's law: the side facing the sun is
      brighter, the far side darker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mrcnn_edu.oil_tanks.raster import Canvas, convex_hull, coverage, dist_segment, sdf_convex

ROOF_TYPES = ("floating", "fixed", "dark")
ROOF_STYLES = {
    "floating": ("pontoon", "double_deck"),  # grey or white floating roofs
    "fixed": ("dome", "cone"),
    "dark": ("rusty", "black", "open"),  # "open": an empty open-top tank, floor far below the rim
}
CLASSES = ("background", "oil-storage-tank")


@dataclass(frozen=True)
class Sun:
    """The sun: ``azimuth`` (radians, direction towards the sun, x right, y down), ``elevation``."""

    azimuth: float
    elevation: float

    @classmethod
    def from_degrees(cls, azimuth: float, elevation: float) -> "Sun":
        return cls(math.radians(azimuth % 360.0), math.radians(elevation))

    @property
    def toward(self) -> np.ndarray:
        """Unit vector Float[2] (x, y) pointing towards the sun; shadows fall along ``-toward``."""
        return np.array([math.cos(self.azimuth), math.sin(self.azimuth)])

    def shadow_length(self, height: float) -> float:
        """How far (pixels) an object ``height`` pixels tall casts its shadow: ``h / tan(el)``."""
        return height / math.tan(self.elevation)


@dataclass(frozen=True)
class Tank:
    """Ground truth of one tank, in pixels of its tile (or scene)."""

    cx: float
    cy: float
    radius: float
    roof: str  # one of ROOF_TYPES
    fill: float  # 0 (roof at the bottom) .. 1 (roof at the rim); 1.0 where no roof level shows
    height: float  # cylinder height in pixels
    style: str = ""  # one of ROOF_STYLES[roof]

    def attributes(self) -> dict:
        """The per-instance attributes written to COCO annotations."""
        return {"roof": self.roof, "style": self.style, "fill": round(self.fill, 4),
                "height": round(self.height, 3), "cx": round(self.cx, 3), "cy": round(self.cy, 3),
                "radius": round(self.radius, 3)}


@dataclass(frozen=True)
class TankLook:
    """How a tank is painted (colours and small details); chosen with the layout, not ground truth."""

    colour: tuple  # roof albedo, RGB
    rim: tuple  # colour of the top of the wall
    slope: float = 0.3  # roof slope at the edge (radians) for domes and cones
    ladder: float = 0.0  # angle of the rolling ladder on a floating roof (radians)
    detail: float = 1.0  # 0..1: how visible pontoon ring, drain and ladder are
    texture: float = 0.03  # grain amplitude on the roof


def crescent_width(fill: float, height: float, sun: Sun) -> float:
    """Width (pixels) of a floating roof's inner shadow along the sun's direction: ``d / tan(el)``."""
    return (1.0 - fill) * height / math.tan(sun.elevation)


def fill_from_crescent(width: float, height: float, sun: Sun) -> float:
    """Invert :func:`crescent_width`: the fill level from a measured crescent width."""
    return 1.0 - width * math.tan(sun.elevation) / height


def roof_rise(tank: Tank, look: TankLook) -> float:
    """Height (pixels) of a fixed roof's top above the rim: 0 for flat and floating roofs."""
    if tank.roof == "fixed" and tank.style == "cone":
        return tank.radius * math.tan(look.slope)
    if tank.roof == "fixed":  # a spherical cap whose edge slope is look.slope
        return tank.radius * math.tan(look.slope / 2)
    return 0.0


def cast_tank_shadow(canvas: Canvas, tank: Tank, look: TankLook, sun: Sun) -> None:
    """Add the tank's ground shadow to ``canvas.shadow``: a capsule, plus the roof's tip if any."""
    u = sun.toward
    length = sun.shadow_length(tank.height)
    r, cx, cy = tank.radius, tank.cx, tank.cy
    ex, ey = cx - length * u[0], cy - length * u[1]  # where the rim's shadow is centred
    rise = sun.shadow_length(roof_rise(tank, look))
    reach = r + rise + 2
    win = canvas.window(min(cx, ex) - reach, min(cy, ey) - reach, max(cx, ex) + reach, max(cy, ey) + reach)
    if win is None:
        return
    sdf = dist_segment(win, cx, cy, ex, ey) - r
    if rise > 0.3:  # a roof above the rim lengthens the shadow: a cone to a point, a dome rounder
        px, py = -u[1], u[0]  # perpendicular to the sun
        tip = np.array([ex - rise * u[0], ey - rise * u[1]])
        pts = [(ex + r * px, ey + r * py), (ex - r * px, ey - r * py), tuple(tip)]
        if tank.style == "dome":
            for side in (1, -1):
                pts.append((ex - 0.7 * rise * u[0] + side * 0.7 * r * px, ey - 0.7 * rise * u[1] + side * 0.7 * r * py))
        sdf = np.minimum(sdf, sdf_convex(win, convex_hull(np.array(pts))))
    canvas.cast(win, coverage(sdf, soft=1.2))


def paint_tank(canvas: Canvas, tank: Tank, look: TankLook, sun: Sun, shadow_tint: np.ndarray) -> None:
    """Paint the tank's top (roof, rim, inner shadow) as seen from straight above."""
    r, cx, cy = tank.radius, tank.cx, tank.cy
    win = canvas.window(cx - r - 1, cy - r - 1, cx + r + 1, cy + r + 1)
    if win is None:
        return
    u = sun.toward
    dx, dy = win.xx - cx, win.yy - cy  # Float[1, w], Float[h, 1]
    dist = np.sqrt(dx * dx + dy * dy)  # Float[h, w]
    body = coverage(dist - r)
    albedo = np.asarray(look.colour, dtype=np.float32)
    tex = canvas.texture(win, look.texture)
    rim_alpha = coverage(np.abs(dist - (r - 0.55)) - 0.55)  # the top of the wall: ~1 px ring

    if tank.roof == "fixed" or tank.style in ("rusty", "black"):
        colour = albedo * lambert(dx, dy, dist, r, look.slope, tank.style, sun)[..., None] * tex
        edge = coverage(np.abs(dist - (r - 1.0)) - 0.7) * 0.35  # gutter / roof edge, slightly darker
        colour = colour * (1.0 - edge[..., None] * 0.25)
        if tank.style == "cone":  # a small vent at the apex
            colour = colour * (1.0 - 0.25 * coverage(dist - 0.9)[..., None])
    else:  # floating roofs and open tanks: a flat floor below the rim, with the inner shadow
        colour = albedo * tex * np.ones_like(dist)[..., None]
        if tank.roof == "floating":
            colour = colour * (1.0 - look.detail * _floating_details(dx, dy, dist, r, look)[..., None])
        s = crescent_width(tank.fill, tank.height, sun)
        lit = coverage(np.sqrt((dx + s * u[0]) ** 2 + (dy + s * u[1]) ** 2) - r)  # the shifted disc
        dark = 1.0 - lit  # the crescent on the sun's side
        # the roof in the wall's shadow is lit by part of the sky only: darker than ground shadows
        colour = colour * (1.0 - dark[..., None] * (1.0 - 0.75 * shadow_tint))
    colour = colour * (1.0 - rim_alpha[..., None]) + np.asarray(look.rim, np.float32) * rim_alpha[..., None]
    canvas.paint(win, body, colour)


def lambert(dx, dy, dist, r, slope, style, sun: Sun) -> np.ndarray:
    """Brightness Float[h, w] of a dome or cone lit by the sun (1 = a flat roof), with sky light.

    ``dx``, ``dy``, ``dist``: offsets and distance of the pixels from the roof's centre; ``r`` its
    radius; ``slope`` the roof's slope at the edge (radians); ``style`` "dome" (slope growing from 0
    at the top) or anything else for a cone (one slope everywhere).
    """
    safe = np.maximum(dist, 1e-3)
    nx, ny = dx / safe, dy / safe
    if style == "dome":
        sin_b = np.clip(dist / r, 0.0, 1.0) * math.sin(slope)
    else:  # cone (or a low cone for dark roofs)
        sin_b = np.full_like(dist, math.sin(slope))
    cos_b = np.sqrt(1.0 - sin_b * sin_b)
    u = sun.toward
    sx, sy, sz = math.cos(sun.elevation) * u[0], math.cos(sun.elevation) * u[1], math.sin(sun.elevation)
    # surface normal: tilted away from the centre by the local slope, n = (sin_b nx, sin_b ny, cos_b)
    n_dot_s = sin_b * (nx * sx + ny * sy) + cos_b * sz
    return 0.3 + 0.7 * np.clip(n_dot_s, 0.0, None) / sz


def _floating_details(dx, dy, dist, r, look: TankLook) -> np.ndarray:
    """Darkening Float[h, w] from a floating roof's pontoon ring, seal, drain and rolling ladder."""
    ring = coverage(np.abs(dist - 0.78 * r) - 0.5, soft=1.5) * 0.07
    seal = coverage(np.abs(dist - (r - 1.6)) - 0.5) * 0.12
    drain = coverage(dist - max(0.6, 0.06 * r)) * 0.18
    ca, sa = math.cos(look.ladder), math.sin(look.ladder)
    # the rolling ladder: from the rim towards the centre, about half the radius long
    along = dx * ca + dy * sa
    across = np.abs(-dx * sa + dy * ca)
    ladder = coverage(across - 0.45) * ((along > 0.45 * r) & (along < r - 1.0)) * 0.22
    return np.maximum.reduce([ring, seal, drain, ladder])
