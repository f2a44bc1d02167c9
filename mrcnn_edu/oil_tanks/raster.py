"""Drawing primitives of the tank-farm generator: windows, signed distances, a canvas, noise.

Taught in: ``09_case_study_oil_tanks.ipynb`` (the generator's internals; students read the public
API in ``mrcnn_edu.oil_tanks``).

Shape shorthand:
    H, W     canvas height and width in pixels
    h, w     height and width of one object's window (its bounding box clipped to the canvas)

Every object is drawn inside its own bounding box only (a :class:`Window`), never over the
whole canvas, so that a 2560 × 2560 scene costs about as much per object as a 256 × 256 tile.
Shapes are described by signed distance functions (negative inside, in pixels) evaluated at the
pixel centres; ``coverage(sdf)`` turns them into anti-aliased alpha values in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Window:
    """A rectangle of canvas pixels: ``img[sy, sx]``, with the pixel centres' coordinates."""

    sy: slice
    sx: slice
    yy: np.ndarray  # Float[h, 1]: y of the pixel centres (row index + 0.5)
    xx: np.ndarray  # Float[1, w]: x of the pixel centres (column index + 0.5)

    @property
    def shape(self) -> tuple[int, int]:
        return self.yy.shape[0], self.xx.shape[1]


def window(height: int, width: int, x0: float, y0: float, x1: float, y1: float) -> Window | None:
    """The pixels whose centres may lie in the box [x0, x1] × [y0, y1], clipped; None if empty."""
    c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, width)
    r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, height)
    if c0 >= c1 or r0 >= r1:
        return None
    yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
    return Window(slice(r0, r1), slice(c0, c1), yy, xx)


def capsule_windows(height: int, width: int, ax: float, ay: float, bx: float, by: float, reach: float,
                    step: int = 48):
    """Disjoint windows covering the points within ``reach`` of the segment a-b.

    A long diagonal road's bounding box is nearly the whole scene; bands ``step`` pixels wide
    along its main axis, each only as tall as the road there, cover it at a small cost. The
    windows do not overlap, so nothing is painted twice.
    """
    x_major = abs(bx - ax) >= abs(by - ay)
    a_m, a_n, b_m, b_n = (ax, ay, bx, by) if x_major else (ay, ax, by, bx)  # main / minor coordinates
    size_m, size_n = (width, height) if x_major else (height, width)
    lo = max(int(math.floor(min(a_m, b_m) - reach)), 0)
    hi = min(int(math.ceil(max(a_m, b_m) + reach)) + 1, size_m)
    d_m = b_m - a_m
    for c0 in range(lo, hi, step):
        c1 = min(c0 + step, hi)
        if abs(d_m) > 1e-9:  # the minor coordinate along this band of the segment (clamped to it)
            t0 = min(max((c0 - reach - a_m) / d_m, 0.0), 1.0)
            t1 = min(max((c1 + reach - a_m) / d_m, 0.0), 1.0)
            n0, n1 = a_n + t0 * (b_n - a_n), a_n + t1 * (b_n - a_n)
        else:
            n0, n1 = a_n, b_n
        r0 = max(int(math.floor(min(n0, n1) - reach)), 0)
        r1 = min(int(math.ceil(max(n0, n1) + reach)) + 1, size_n)
        if r0 >= r1:
            continue
        main = np.arange(c0, c1, dtype=np.float32) + 0.5
        minor = np.arange(r0, r1, dtype=np.float32) + 0.5
        if x_major:
            yield Window(slice(r0, r1), slice(c0, c1), minor[:, None], main[None, :])
        else:
            yield Window(slice(c0, c1), slice(r0, r1), main[:, None], minor[None, :])


# ---------------------------------------------------------------------------------------------
# Signed distances (pixels; < 0 inside). Arguments broadcast: yy Float[h, 1], xx Float[1, w].
# ---------------------------------------------------------------------------------------------


def sdf_disc(win: Window, cx: float, cy: float, r: float) -> np.ndarray:
    return np.sqrt((win.xx - cx) ** 2 + (win.yy - cy) ** 2) - r


def dist_segment(win: Window, ax: float, ay: float, bx: float, by: float) -> np.ndarray:
    """Distance to the segment a-b (a capsule of radius r is ``dist_segment(...) - r``)."""
    px, py = win.xx - ax, win.yy - ay
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    if length2 < 1e-9:
        return np.sqrt(px * px + py * py)
    t = np.clip((px * dx + py * dy) / length2, 0.0, 1.0)
    return np.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2)


def local_coords(win: Window, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) along the axes of a frame centred at (cx, cy) and rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = win.xx - cx, win.yy - cy
    return dx * c + dy * s, -dx * s + dy * c


def sdf_rect(win: Window, cx: float, cy: float, half_w: float, half_h: float, angle: float = 0.0) -> np.ndarray:
    """A rectangle of half sizes (half_w, half_h) along its own axes, rotated by ``angle``."""
    u, v = local_coords(win, cx, cy, angle)
    qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: Float[P, 2] -> the hull's vertices Float[Q, 2], counter-clockwise."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def sdf_convex(win: Window, vertices: np.ndarray) -> np.ndarray:
    """Signed distance (exact inside, a close lower bound outside) to a counter-clockwise polygon."""
    out = None
    n = len(vertices)
    for i in range(n):
        (x0, y0), (x1, y1) = vertices[i], vertices[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        length = math.hypot(ex, ey)
        if length < 1e-9:
            continue
        d = ((win.xx - x0) * ey - (win.yy - y0) * ex) / length  # > 0 on the outer side
        out = d if out is None else np.maximum(out, d)
    return out


def rect_corners(cx: float, cy: float, half_w: float, half_h: float, angle: float) -> np.ndarray:
    """The 4 corners Float[4, 2] of a rotated rectangle."""
    c, s = math.cos(angle), math.sin(angle)
    local = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    return np.stack([cx + local[:, 0] * c - local[:, 1] * s, cy + local[:, 0] * s + local[:, 1] * c], axis=1)


def coverage(sdf: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased alpha in [0, 1]: 1 well inside, 0 well outside, 0.5 on the outline."""
    a = 0.5 - sdf / soft if soft != 1.0 else 0.5 - sdf
    return np.minimum(np.maximum(a, 0.0, out=a), 1.0, out=a).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# The canvas
# ---------------------------------------------------------------------------------------------


class Canvas:
    """An RGB image Float[H, W, 3] being painted, plus the map of cast shadows Float[H, W].

    ``shadow`` holds, per pixel, the fraction of direct sunlight blocked by raised objects (0..1);
    it is applied once to the ground (:meth:`apply_shadows`), so that overlapping shadows do not
    darken twice, before the tops of raised objects (roofs, canopies) are painted.
    """

    def __init__(self, height: int, width: int, grain: np.ndarray, mottle: np.ndarray):
        self.h, self.w = height, width
        self.img = np.zeros((height, width, 3), dtype=np.float32)
        self.shadow = np.zeros((height, width), dtype=np.float32)
        # textures shared by all objects, Float[H, W] around 0 (about ±1): pixel-scale grain and
        # blotches ~12 px across
        self.grain, self.mottle = grain, mottle

    def window(self, x0: float, y0: float, x1: float, y1: float) -> Window | None:
        return window(self.h, self.w, x0, y0, x1, y1)

    def paint(self, win: Window, alpha: np.ndarray, colour) -> None:
        """Blend ``colour`` (RGB Float[3] or Float[h, w, 3]) over the window with ``alpha`` Float[h, w]."""
        region = self.img[win.sy, win.sx]  # a view: painted in place
        colour = np.asarray(colour, dtype=np.float32)
        region += alpha[..., None] * (colour - region)

    def scale(self, win: Window, alpha: np.ndarray, factor) -> None:
        """Multiply the window by ``factor`` (scalar or RGB) where ``alpha`` is 1, smoothly."""
        region = self.img[win.sy, win.sx]
        region *= 1.0 + alpha[..., None] * (np.asarray(factor, dtype=np.float32) - 1.0)

    def cast(self, win: Window, alpha: np.ndarray) -> None:
        """Add a cast shadow (the union of shadows: a maximum, not a sum)."""
        region = self.shadow[win.sy, win.sx]
        np.maximum(region, alpha, out=region)

    def texture(self, win: Window, amount: float, mottle: float = 0.0) -> np.ndarray:
        """Brightness factors Float[h, w, 1] = 1 + amount * grain + mottle * blotches."""
        t = 1.0 + amount * self.grain[win.sy, win.sx]
        if mottle:
            t = t + mottle * self.mottle[win.sy, win.sx]
        return t[..., None]

    def apply_shadows(self, tint) -> None:
        """Darken the ground under cast shadows: lit by the (bluish) sky only, ``tint`` of sunlight."""
        s = self.shadow[..., None]
        self.img *= 1.0 - s * (1.0 - np.asarray(tint, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


_FINE_BLOCK = 384  # fine noise of large canvases repeats a block this big


def value_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Smooth noise Float[H, W], values about in [0, 1], features about ``scale`` pixels across.

    Random values on a coarse grid (one per ``scale`` pixels) interpolated to every pixel, from
    a random sub-cell offset so that the grids of different tiles do not line up. Coarse grids
    are interpolated with separable Catmull-Rom weights (two small matrix products,
    ``A_y @ grid @ A_x.T``: cheap even for a 2560 × 2560 scene); fine ones bilinearly.
    """
    scale = max(float(scale), 1.0)
    if scale < 5:  # fine grain: white noise blurred (interpolating a fine grid looks blocky)
        sigma = scale / 2.5
        bh, bw = min(height, _FINE_BLOCK), min(width, _FINE_BLOCK)
        z = gaussian_blur(rng.standard_normal((bh, bw), dtype=np.float32), sigma)
        z = 0.5 + (0.2 / _blur_gain(sigma)) * z
        if (bh, bw) != (height, width):  # large canvases: repeat a block (invisible at this grain)
            oy, ox = (int(v) for v in rng.integers(0, _FINE_BLOCK, size=2))
            z = np.roll(z, (oy, ox), axis=(0, 1))
            z = np.tile(z, (-(-height // bh), -(-width // bw)))[:height, :width]
        return z
    if scale < 16:
        gh, gw = int(height / scale) + 3, int(width / scale) + 3
        grid = torch.from_numpy(rng.random((gh, gw), dtype=np.float32))
        out = (int(math.ceil((gh - 1) * scale)), int(math.ceil((gw - 1) * scale)))
        up = F.interpolate(grid[None, None], size=out, mode="bilinear", align_corners=False)[0, 0]
        oy, ox = (int(v) for v in rng.integers(0, max(int(scale), 1), size=2))
        return up[oy:oy + height, ox:ox + width].numpy()
    gh, gw = int(height / scale) + 4, int(width / scale) + 4
    grid = rng.random((gh, gw), dtype=np.float32)
    offset = rng.random(2)
    a_y = _catmull_rom_weights(height, gh, scale, offset[0])  # (H, gh)
    a_x = _catmull_rom_weights(width, gw, scale, offset[1])  # (W, gw)
    return (a_y @ grid) @ a_x.T  # (H, gh) @ (gh, gw) @ (gw, W) -> (H, W)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of Float[H, W] or Float[H, W, C] (reflected borders).

    Written as a sum of shifted copies: with 5-11 taps this is faster on a CPU than a grouped
    convolution, and it is plain numpy.
    """
    if sigma <= 0.05:
        return x
    k = _gaussian_kernel(sigma, min(x.shape[0], x.shape[1]) - 1)
    radius = len(k) // 2
    h, w = x.shape[:2]
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (x.ndim - 2)
    xp = np.pad(x, pad, mode="reflect")
    rows = k[0] * xp[:, 0:w]
    for i in range(1, len(k)):  # along x
        rows += k[i] * xp[:, i:i + w]
    out = k[0] * rows[0:h]
    for i in range(1, len(k)):  # along y
        out += k[i] * rows[i:i + h]
    return out


def _gaussian_kernel(sigma: float, limit: int) -> np.ndarray:
    radius = min(max(1, int(math.ceil(2.5 * sigma))), limit)
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after :func:`gaussian_blur` (separable: sum of k²)."""
    return float((_gaussian_kernel(sigma, 1000) ** 2).sum())


def _catmull_rom_weights(n: int, cells: int, scale: float, offset: float) -> np.ndarray:
    """Float[n, cells]: row i interpolates the grid at position 1 + (i + offset) / scale."""
    p = 1.0 + (np.arange(n) + offset) / scale
    i = np.floor(p).astype(np.int64)
    t = (p - i).astype(np.float32)
    weights = [(-t + 2 * t**2 - t**3) / 2, (2 - 5 * t**2 + 3 * t**3) / 2,
               (t + 4 * t**2 - 3 * t**3) / 2, (-t**2 + t**3) / 2]  # neighbours i-1 .. i+2
    a = np.zeros((n, cells), dtype=np.float32)
    rows = np.arange(n)
    for k, wk in enumerate(weights):  # i - 1 >= 0 and i + 2 < cells by construction
        a[rows, i - 1 + k] = wk
    return a


def quantile_threshold(field: np.ndarray, fraction: float) -> float:
    """The value above which ``fraction`` of ``field`` lies (estimated on a subsample: fast)."""
    step = max(2, int(math.sqrt(field.size / 20000)))
    sample = field[::step, ::step]
    return float(np.quantile(sample, min(max(1.0 - fraction, 0.0), 1.0)))
