"""Synthetic satellite tiles of oil tank farms, with exact ground truth.

Taught in: ``09_case_study_oil_tanks.ipynb``; its sample tiles are used by every stage notebook.

This first version renders the essentials of ~1.2 m/pixel optical imagery: soil and vegetation,
earthen bunds around groups of tanks, floating-roof tanks (whose inner crescent shadow grows as
the roof sinks), fixed-roof (domed) tanks, dark empty tanks, and the shadow each tank casts away
from the sun. The case-study issue grows it (distractors, roads, sensor effects, COCO export).

Shape shorthand:
    H, W   tile height and width in pixels
    N      number of tanks in a tile

Geometry of one tank (used again for the fill-level estimate):
    a cylinder of radius ``r`` pixels and height ``h`` pixels; the sun is at azimuth ``az``
    (direction towards the sun, radians, image x to the right, y down) and elevation ``el``.
    * The ground shadow is the disc swept from the tank away from the sun by ``h / tan(el)``.
    * A floating roof lies ``d = (1 - fill) * h`` below the rim. A roof point ``p`` is lit iff
      ``p + (d / tan(el)) * u_sun`` still lies inside the rim circle, so the inner shadow is the
      part of the disc *not* covered by the disc shifted by ``-(d / tan(el)) * u_sun``: a crescent
      on the sun's side, whose width ``d / tan(el)`` tells how far the roof has sunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

ROOF_TYPES = ("floating", "fixed", "dark")
CLASSES = ("background", "oil-storage-tank")


@dataclass(frozen=True)
class Tank:
    """Ground truth of one tank, in pixels of its tile."""

    cx: float
    cy: float
    radius: float
    roof: str  # one of ROOF_TYPES
    fill: float  # 0 (empty, roof at the bottom) .. 1 (full, roof at the rim); floating roofs only
    height: float  # cylinder height in pixels


@dataclass(frozen=True)
class Sun:
    azimuth: float  # radians, direction towards the sun in image coordinates (x right, y down)
    elevation: float  # radians above the horizon

    @property
    def toward(self) -> np.ndarray:
        return np.array([math.cos(self.azimuth), math.sin(self.azimuth)])


@dataclass
class Tile:
    image: torch.Tensor  # Float[3, H, W] in [0, 1]
    target: dict  # {"boxes": Float[N, 4], "labels": Int64[N], "masks": UInt8[N, H, W]}
    tanks: list[Tank] = field(default_factory=list)
    sun: Sun | None = None


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    gh, gw = h // scale + 2, w // scale + 2
    grid = torch.from_numpy(rng.random((1, 1, gh, gw)).astype(np.float32))
    up = torch.nn.functional.interpolate(grid, size=(gh * scale, gw * scale), mode="bilinear",
                                         align_corners=False)
    return up[0, 0, :h, :w].numpy()


def _ground(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Soil with patches of vegetation: H×W×3 float array."""
    soil = np.array(rng.choice([[0.66, 0.60, 0.50], [0.60, 0.58, 0.54], [0.70, 0.64, 0.52]]))
    soil = soil + rng.normal(0, 0.02, 3)
    tone = 0.85 + 0.3 * _smooth_noise(rng, h, w, 32) + 0.06 * _smooth_noise(rng, h, w, 4)
    img = tone[..., None] * soil[None, None, :]
    veg = _smooth_noise(rng, h, w, 48)
    veg_mask = np.clip((veg - 0.7) * 8, 0, 1)[..., None] * rng.uniform(0.3, 1.0)
    green = np.array([0.33, 0.40, 0.27]) * (0.8 + 0.4 * _smooth_noise(rng, h, w, 6))[..., None]
    return img * (1 - veg_mask) + green * veg_mask


def _disc(xx, yy, cx, cy, r):
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _draw_tank(img: np.ndarray, xx, yy, tank: Tank, sun: Sun, rng: np.random.Generator) -> np.ndarray:
    """Paint one tank (its ground shadow, walls and roof) into img; return its binary mask."""
    u = sun.toward
    cx, cy, r = tank.cx, tank.cy, tank.radius
    body = _disc(xx, yy, cx, cy, r)
    # ground shadow: discs swept away from the sun over the length h / tan(el)
    length = tank.height / math.tan(sun.elevation)
    shadow = np.zeros_like(body)
    for t in np.linspace(0.0, 1.0, max(2, int(length) + 2)):
        shadow |= _disc(xx, yy, cx - u[0] * length * t, cy - u[1] * length * t, r)
    img[shadow & ~body] *= 0.42

    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    if tank.roof == "floating":
        roof = rng.uniform(0.72, 0.86)
        img[body] = roof
        depth = (1.0 - tank.fill) * tank.height
        shift = depth / math.tan(sun.elevation)
        lit = _disc(xx + u[0] * shift, yy + u[1] * shift, cx, cy, r)
        img[body & ~lit] *= 0.38  # the inner crescent shadow cast by the rim onto the roof
        rim = body & (dist >= r - 1.0)
        img[rim] = 0.93
    elif tank.roof == "fixed":
        # a shallow dome: brighter on the side facing the sun
        nx, ny = (xx - cx) / max(r, 1e-6), (yy - cy) / max(r, 1e-6)
        shade = 0.82 + 0.12 * (nx * u[0] + ny * u[1]) * np.clip(1.0 - (nx**2 + ny**2) ** 2, 0, 1)
        base = rng.uniform(0.8, 0.95)
        img[body] = (base * shade[body])[:, None] * np.array([1.0, 1.0, 0.98])
        img[body & (dist >= r - 1.0)] *= 0.9
    else:  # dark: empty or open tanks, rusty or black
        colour = np.array(rng.choice([[0.22, 0.20, 0.19], [0.36, 0.25, 0.18], [0.15, 0.16, 0.17]]))
        img[body] = colour
        img[body & (dist >= r - 1.2)] = 0.55
    return body


def make_tile(
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    n_groups: int | None = None,
    radius_range: tuple[float, float] = (5.0, 30.0),
    roof_weights: tuple[float, float, float] = (0.55, 0.3, 0.15),
) -> Tile:
    """Render one synthetic tile of a tank farm with its exact ground truth.

    Args:
        size: tile size ``H`` (square) or ``(H, W)`` in pixels.
        seed: the same seed always gives the same tile.
        n_groups: number of bunded groups of tanks (random 1–3 when None).
        radius_range: tank radii in pixels (diameters ~10–60 px at 1.2 m/pixel).
        roof_weights: probabilities of floating, fixed and dark roofs.

    Returns:
        A :class:`Tile` with ``image`` Float[3, H, W] in [0, 1] and ``target`` in the course's
        data contract (label 1 = oil-storage-tank), plus every tank's attributes and the sun.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if h < 16 or w < 16:
        raise ValueError(f"size: expected at least 16×16 pixels, got {h}×{w}")
    lo, hi = radius_range
    if not 0 < lo <= hi:
        raise ValueError(f"radius_range: expected 0 < min <= max, got {radius_range}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    img = _ground(rng, h, w)
    sun = Sun(azimuth=rng.uniform(0, 2 * math.pi), elevation=math.radians(rng.uniform(30, 65)))

    tanks: list[Tank] = []
    occupied = np.zeros((h, w), dtype=bool)
    for _ in range(n_groups if n_groups is not None else int(rng.integers(1, 4))):
        radius = float(rng.uniform(lo, hi))
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 4))
        gap = radius * rng.uniform(0.6, 1.2)
        pitch = 2 * radius + gap
        gw, gh = cols * pitch + gap, rows * pitch + gap
        # groups may be cut by the tile border; one larger than the tile is centred on it
        x0 = rng.uniform(-0.15 * gw, w - 0.85 * gw) if gw <= w / 0.7 else (w - gw) / 2
        y0 = rng.uniform(-0.15 * gh, h - 0.85 * gh) if gh <= h / 0.7 else (h - gh) / 2
        bund = (xx >= x0) & (xx <= x0 + gw) & (yy >= y0) & (yy <= y0 + gh)
        if (bund & occupied).any():
            continue
        occupied |= bund
        wall = bund & ~((xx >= x0 + 2) & (xx <= x0 + gw - 2) & (yy >= y0 + 2) & (yy <= y0 + gh - 2))
        img[bund] = img[bund] * 0.3 + 0.7 * np.array([0.64, 0.60, 0.53])
        img[wall] = img[wall] * 0.5 + 0.5 * np.array([0.76, 0.72, 0.64])
        for i in range(rows):
            for j in range(cols):
                roof = str(rng.choice(ROOF_TYPES, p=np.array(roof_weights) / sum(roof_weights)))
                r = radius * rng.uniform(0.9, 1.05)
                tanks.append(Tank(
                    cx=float(x0 + gap + radius + j * pitch), cy=float(y0 + gap + radius + i * pitch),
                    radius=float(r), roof=roof,
                    fill=float(rng.uniform(0.05, 0.95)) if roof == "floating" else 1.0,
                    height=float(r * rng.uniform(0.35, 0.6)),
                ))

    masks = []
    for tank in tanks:
        masks.append(_draw_tank(img, xx, yy, tank, sun, rng))
    # sensor: slight blur and noise
    t = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    t = torch.nn.functional.conv2d(t[None], kernel2d, padding=1, groups=3)[0]
    t = t + torch.from_numpy(rng.normal(0, 0.012, t.shape).astype(np.float32))
    image = t.clamp(0, 1)

    keep = [i for i, m in enumerate(masks) if m.any()]
    tanks = [tanks[i] for i in keep]
    mask_t = torch.from_numpy(np.stack([masks[i] for i in keep])).to(torch.uint8) if keep \
        else torch.zeros(0, h, w, dtype=torch.uint8)
    boxes = masks_to_boxes(mask_t)
    target = {"boxes": boxes, "labels": torch.ones(len(tanks), dtype=torch.int64), "masks": mask_t}
    return Tile(image=image, target=target, tanks=tanks, sun=sun)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (x1, y1, x2, y2) around binary masks UInt8[N, H, W] → Float[N, 4].

    x2 and y2 are exclusive pixel edges, so a single pixel at (x, y) gives (x, y, x + 1, y + 1).
    """
    if masks.numel() == 0:
        return torch.zeros(0, 4)
    boxes = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(boxes, dtype=torch.float32)
