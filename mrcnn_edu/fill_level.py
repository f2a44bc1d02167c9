r"""How full is a floating-roof tank? Read it off one image: the roof's crescent and the tank's shadow.

Taught in: ``notebooks/09_case_study_oil_tanks.ipynb`` (fill-level estimation); used by the case
study's report (``make casestudy``).

Shape shorthand:
    H, W   image height and width in pixels
    N      tanks (instance masks) in one image
    K      parallel profiles ("chords") through one tank, along the sun's direction
    T      samples along one profile, every ``STEP`` = 0.25 px
    C      candidate widths tried by a fit;  P  levels of one fitted model

The geometry (nadir view; image x to the right, y down; lengths in pixels)
--------------------------------------------------------------------------

A tank is a cylinder of radius ``r`` and height ``h``. The sun stands at azimuth ``az`` (the
direction *towards* the sun, ``u = (cos az, sin az)``, as ``oil_tanks.Sun.azimuth``) and at
elevation ``el``. The tank cut through its centre along ``u``, sun rays grazing the rim::

      sun
         \      \
           \      \
             \      \        rim (top of the wall)
               +_____________________+
               | \                   | \
               |   \                 |   \
               |#####================|     \       roof sunk by d = (1 - fill) h
               |    floating roof    |       \
               |                     |         \
               |                     |           \      h = the tank's height
               |                     |             \
    ___________|_____________________|###############\_________ ground
               |<-s->|               |<---- L ---->|
               crescent              ground shadow

* The **crescent** (inner shadow): a floating roof lies ``d = (1 - fill) * h`` below the rim.
  Sun rays that clear the rim on the sun's side reach the roof only ``d / tan(el)`` further on,
  so a band of width ``s = d / tan(el)`` along ``u`` stays dark. Seen from above it is a crescent
  on the *sun's* side of the roof: the disc minus the disc shifted by ``-s u``. Along every line
  parallel to ``u`` that crosses the roof the dark part is ``s`` long (the same for all lines).
* The **ground shadow**: the whole tank, ``h`` tall, throws the disc swept away from the sun by
  ``L = h / tan(el)``; beyond the tank's far edge, along every line parallel to ``u``, the
  shadow is ``L`` long.

Their ratio needs neither the tank's height nor the sun's elevation::

    s / L = (d / tan el) / (h / tan el) = d / h = 1 - fill      =>     fill = 1 - s / L

(the same geometry as ``oil_tanks.crescent_width``; ``fill`` is 1 for a roof at the rim, 0 at
the bottom). All we need from outside the image is the sun's azimuth (in the image metadata of
real imagery; :func:`estimate_sun_azimuth` guesses it from the shadows otherwise).

Why the ratio: the alternative, a *known elevation and a height prior*
(``fill = 1 - s tan(el) / h``), needs each tank's height, which varies by about ±15 % between
tanks of one size -- up to ±15 percentage points of fill for a nearly empty tank; the ratio
cancels it, and the elevation too. The price: the ground shadow must be measured as well, and
it can leave the image, run under a neighbouring tank, or fall on dark ground. For those tanks
:func:`estimate_fills` falls back on the other tanks of the image (one sun for all:
``L_i / h_i`` is the same for every tank, so ``L_i = h_i * median_j(L_j / h_j)`` over the tanks
measured by the ratio, with heights from :func:`height_prior`) and says so in ``reason``;
:func:`estimate_fill`, which sees one tank only, flags them unreliable instead.

How it is measured
------------------

1. **Where is the tank?** The far edge of the roof (bright roof -> dark ground shadow) is where
   the brightness falls fastest along the sun's direction: the image fixes it to a fraction of a
   pixel. A detector's mask is less trustworthy: it may leave (part of) the dark crescent out,
   which biases its centroid and area away from the sun. :func:`tank_circle` treats the mask as what it
   then is, the lit roof -- a *lens*, the disc ∩ the disc shifted by ``s`` -- whose length ``a``
   along the sun and width ``w`` across it give the radius ``r = (w² + a²) / (4 a)`` (exact for a
   lens and for a whole disc); the centre lies ``r`` from the far edge. (Tanks cut by the image
   border: a circle fit to the mask's outline, :func:`mask_circle`.) The crescent fit (step 3)
   then finds the roof's sun-side edge in the image within ±``EDGE_SEARCH_PX`` of the circle's.
2. **Profiles** (:func:`tank_profiles`): brightness sampled (bilinear, :func:`sample_bilinear`)
   every 0.25 px along ``K`` parallel chords across the central 60 % of the disc. On the sun's
   side each chord is aligned at the roof's edge (``depth`` = distance into the roof); on the far
   side at the far edge (``beyond`` = distance past it). The median over chords gives two clean
   profiles: ground, bright rim, dark crescent, lit roof; and lit roof, rim, dark ground shadow,
   ground. Samples outside the image, and on the far side everything from where a chord enters
   another tank (``occluders``, grown by ``OCCLUDER_MARGIN_PX``), are left out.
3. **Find, then measure.** The shadow's end is found with a threshold halfway between the
   shadow and the lit ground next to the tank; then both widths are measured by *analysis by
   synthesis* (:func:`fit_staircase`): for every candidate width (crescent ``s``, shadow ``L``)
   and blur, draw the ideal profile -- a staircase of flat levels blurred by a Gaussian
   (:func:`staircase`) -- fit its levels by least squares, and keep the width that explains the
   measured profile best. Blur is why a threshold alone fails on narrow crescents (a 1 px dark
   band never gets dark after blurring); the fit still sees how much darkness there is. Two
   facts about the crescent are built in: the rim (top of the wall, ``RIM_PX`` wide) is drawn
   over the roof's edge, so a crescent narrower than the rim is hidden (reported as
   ``RIM_PX / 2``, with a note); and the crescent is a shadow like the ground's, a little deeper
   because the wall also hides part of the sky: its brightness is ``ROOF_SHADE * S / G`` times
   the lit roof's, ``S / G`` the ground shadow's brightness over the lit ground's (measured in
   the same image). Fitted levels must be physically possible (a shadow keeps some light).
4. **fill = 1 - s / L**, clipped to [0, 1], with ``reliable = False`` and a ``reason`` when the
   profiles do not show a floating roof: no ground shadow found, a tank cut by the image border
   on the sun's side, a roof entirely in shadow (nearly empty: only an upper bound is known),
   a dark roof without a crescent, or a roof brighter on its sun's half than on the far half
   (shaded like a dome or cone: a fixed roof).

On synthetic tiles (``oil_tanks.make_tile(256, seed)``, sensor effects on, ground-truth masks)
the mean absolute error is about 5 percentage points; 6-8 with masks a pixel too small or large
or with the crescent left out of the mask (``tests/test_fill_level.py`` checks <= 10); about 5 %
of floating roofs are flagged (15 % without the shared-sun fallback), mostly tanks cut by the
border. With the masks the shipped model detects, see ``make casestudy``'s report.

Public API: :func:`estimate_fill`, :func:`estimate_fills`, :func:`estimate_sun_azimuth`,
:func:`evaluate_fill`, :func:`plot_fill_scatter`, :func:`plot_fill_profile`, :func:`grow_masks`,
:func:`height_prior`, :class:`FillEstimate`; the steps: :func:`mask_circle`, :func:`tank_circle`,
:func:`sample_bilinear`, :func:`tank_profiles`, :func:`staircase`, :func:`fit_staircase`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mrcnn_edu.utils import UserError

STEP = 0.25  # px between samples along a profile
CHORD_SPAN = 0.6  # chords cross the disc at offsets within ±CHORD_SPAN * r of its centre
MIN_CHORDS = 3  # a profile sample needs this many valid chords (else NaN)
RIM_PX = 1.1  # the top of the wall: a bright ring about one pixel wide, drawn over the roof's edge
ROOF_SHADE = 0.75  # crescent / lit roof = ROOF_SHADE * (ground shadow / lit ground): the wall hides sky too
BLUR_SIGMAS = (0.5, 0.7, 0.9, 1.1, 1.3)  # px: Gaussian blurs tried by the fits (optics + sampling)
MIN_SHADOW_CONTRAST = 0.3  # a ground shadow is at least 30 % darker than the ground next to it
MAX_SHADOW_PX = 80.0  # longest ground shadow looked for
HEIGHT_PRIOR_M = (7.5, 0.17)  # shell height ≈ 7.5 m + 0.17 × diameter (only ratios between tanks are used)
GSD_M = 1.2  # metres per pixel of the imagery (the Airbus / SPOT data and the generator)
EDGE_SEARCH_PX = 1.0  # the crescent fit looks for the roof's sun-side edge within ±this of the circle's
EDGE_PRIOR_PX = 0.5  # ... preferring the circle's: a Gaussian prior with this standard deviation
OCCLUDER_MARGIN_PX = 1  # other tanks' masks are grown by this much (their rims, blur, imperfect masks)
FIXED_ROOF_TILT = 1.06  # roof brighter on the sun's half by more than 6 %: shaded like a dome or cone
LUMA = (0.299, 0.587, 0.114)  # brightness of an RGB pixel (ITU-R 601)


@dataclass
class FillEstimate:
    """The fill level of one tank and what it was read from.

    ``fill`` in [0, 1] (1 = roof at the rim), NaN when nothing could be measured;
    ``crescent_px`` the crescent's width ``s`` along the sun's direction and ``shadow_px`` the
    ground shadow's length ``L`` beyond the tank (pixels; NaN when not measured);
    ``reliable`` False when the profiles do not show a floating roof's signature -- ``reason``
    says why (it may also carry a note for a reliable estimate, e.g. a crescent hidden by the
    rim); ``shadow_from`` "tank" (its own ground shadow), "image" (borrowed from the other
    tanks of the image, see :func:`estimate_fills`) or "" (none); ``cx``, ``cy``, ``radius`` the
    circle used (pixels, pixel centres at +0.5); ``profiles`` the measured profiles and fitted
    models (for :func:`plot_fill_profile`).
    """

    fill: float
    crescent_px: float
    shadow_px: float
    reliable: bool
    reason: str = ""
    shadow_from: str = ""
    cx: float = float("nan")
    cy: float = float("nan")
    radius: float = float("nan")
    profiles: TankProfiles | None = field(default=None, repr=False, compare=False)


@dataclass
class TankProfiles:
    """Median brightness profiles of one tank along the sun's direction (see :func:`tank_profiles`).

    ``depth`` Float[T1]: distance (px) into the roof from its sun-side edge (negative: the ground
    before the tank); ``sun_side`` Float[T1] the median brightness there. ``beyond`` Float[T2]:
    distance past the tank's far edge (negative: the roof); ``far_side`` Float[T2]. NaN where
    fewer than ``MIN_CHORDS`` chords had a valid sample. The fits (filled in by
    :func:`estimate_fill`) are kept for plotting: ``sun_model``, ``far_model`` (same shapes, NaN
    outside the fitted window) and their levels.
    """

    cx: float
    cy: float
    radius: float
    azimuth: float
    offsets: np.ndarray  # Float[K] chord offsets from the centre, across the sun's direction
    depth: np.ndarray
    sun_side: np.ndarray
    beyond: np.ndarray
    far_side: np.ndarray
    sun_model: np.ndarray | None = None
    far_model: np.ndarray | None = None
    levels: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def luminance(image: torch.Tensor) -> np.ndarray:
    """Brightness Float[H, W] (numpy) of an RGB image Float[3, H, W]."""
    weights = torch.tensor(LUMA, dtype=image.dtype).view(3, 1, 1)
    return (image.detach().cpu() * weights).sum(0).float().numpy()  # (3, H, W) -> (H, W)


def sample_bilinear(gray: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``gray`` Float[H, W] at points (xs, ys) of any (same) shape; NaN outside.

    Coordinates are continuous with pixel ``(i, j)`` covering ``[j, j + 1] × [i, i + 1]``, its
    centre at ``(j + 0.5, i + 0.5)`` (the generator's and the masks' convention).
    """
    h, w = gray.shape
    inside = (xs >= 0) & (xs <= w) & (ys >= 0) & (ys <= h)
    x = np.clip(xs - 0.5, 0, w - 1)  # pixel-centre coordinates
    y = np.clip(ys - 0.5, 0, h - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 2, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 2, 0))
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = x - x0, y - y0
    top = gray[y0, x0] * (1 - fx) + gray[y0, x1] * fx
    bottom = gray[y1, x0] * (1 - fx) + gray[y1, x1] * fx
    return np.where(inside, top * (1 - fy) + bottom * fy, np.nan)


def mask_circle(mask: np.ndarray) -> tuple[float, float, float, bool]:
    """Centre and radius of a disc mask Bool[H, W]: ``(cx, cy, r, touches_border)`` in pixels.

    A whole disc: the centroid of its pixel centres and ``r = sqrt(area / pi)`` (both unbiased
    when a predicted mask is uniformly a little too large or small). A disc cut by the image
    border: a least-squares circle (Kasa fit) through the centres of its boundary pixels that
    are not on the border, plus half a pixel (boundary pixel centres lie inside the circle).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise UserError("mask: the mask is empty (no pixel set); expected the tank's disc")
    h, w = mask.shape
    touches = bool(ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1)
    if touches:
        padded = np.pad(mask, 1)
        interior = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                    & padded[1:-1, :-2] & padded[1:-1, 2:])
        edge = mask & ~interior
        edge[[0, -1], :] = False
        edge[:, [0, -1]] = False
        by, bx = np.nonzero(edge)
        if len(bx) >= 6:
            bx, by = bx + 0.5, by + 0.5
            # x² + y² + D x + E y + F = 0 is linear in (D, E, F)
            design = np.stack([bx, by, np.ones_like(bx)], axis=1)  # (P, 3)
            (d, e, f), *_ = np.linalg.lstsq(design, -(bx**2 + by**2), rcond=None)
            cx, cy = -d / 2, -e / 2
            r2 = cx * cx + cy * cy - f
            if r2 > 0:
                return float(cx), float(cy), float(math.sqrt(r2) + 0.5), True
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5), math.sqrt(len(xs) / math.pi), touches


def tank_profiles(gray: np.ndarray, cx: float, cy: float, radius: float, azimuth: float,
                  occluders: np.ndarray | None = None, max_shadow_px: float = MAX_SHADOW_PX) -> TankProfiles:
    """Median brightness profiles across a tank, along the sun's direction (see the module doc).

    Args:
        gray: Float[H, W] brightness.
        cx, cy, radius: the tank's circle (pixels).
        azimuth: direction towards the sun (radians, x right, y down).
        occluders: optional Bool[H, W], True on other tanks: on the far side a chord stops where
            it enters one (the shadow may end there, hidden under that tank's roof).
        max_shadow_px: how far past the far edge to sample.
    """
    u, v, offsets, half = _chords(radius, azimuth)
    depth = np.arange(-3.0 - EDGE_SEARCH_PX, 2 * radius + STEP / 2, STEP)  # (T1,)
    t_sun = half[:, None] - depth[None, :]  # (K, T1): position along u from the centre
    sun = _sample_chords(gray, cx, cy, u, v, offsets, t_sun)
    sun[depth[None, :] > 2 * half[:, None] - 1.5] = np.nan  # stop before the far edge's rim
    beyond = np.arange(-2 * radius, max_shadow_px + STEP / 2, STEP)  # (T2,)
    return TankProfiles(cx=cx, cy=cy, radius=radius, azimuth=azimuth, offsets=offsets, depth=depth,
                        sun_side=_median_over_chords(sun), beyond=beyond,
                        far_side=_far_side(gray, cx, cy, radius, azimuth, occluders, beyond))


def _chords(radius: float, azimuth: float):
    """The sun's direction ``u`` Float[2], across it ``v``, the chords' offsets Float[K] and half-lengths Float[K]."""
    u = np.array([math.cos(azimuth), math.sin(azimuth)])  # towards the sun
    v = np.array([-u[1], u[0]])
    k = int(np.clip(round(2 * CHORD_SPAN * radius) + 1, 5, 31))
    offsets = np.linspace(-CHORD_SPAN * radius, CHORD_SPAN * radius, k)  # (K,)
    half = np.sqrt(np.maximum(radius**2 - offsets**2, 0.0))  # (K,)
    return u, v, offsets, half


def _far_side(gray, cx, cy, radius, azimuth, occluders, beyond) -> np.ndarray:
    """The far side's median profile Float[T2] at distances ``beyond`` Float[T2] past the far edge."""
    u, v, offsets, half = _chords(radius, azimuth)
    t_far = -half[:, None] - beyond[None, :]  # (K, T2)
    far = _sample_chords(gray, cx, cy, u, v, offsets, t_far, occluders, stop_after=beyond > 0)
    far[beyond[None, :] < -2 * half[:, None] + 1.5] = np.nan  # stop before the sun side's rim
    return _median_over_chords(far)


def _sample_chords(gray, cx, cy, u, v, offsets, t, occluders=None, stop_after=None) -> np.ndarray:
    """Samples Float[K, T] at ``centre + t u + offset v``; with ``occluders``, NaN from the first
    sample (where ``stop_after`` Bool[T]) that falls on an occluder to the end of the chord."""
    xs = cx + t * u[0] + offsets[:, None] * v[0]  # (K, T)
    ys = cy + t * u[1] + offsets[:, None] * v[1]
    values = sample_bilinear(gray, xs, ys)
    if occluders is not None:
        h, w = gray.shape
        ix = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
        iy = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
        hit = occluders[iy, ix] & stop_after[None, :]
        values[np.maximum.accumulate(hit, axis=1)] = np.nan
    return values


def _median_over_chords(values: np.ndarray) -> np.ndarray:
    """Float[K, T] -> Float[T]: the median over chords, NaN where fewer than MIN_CHORDS are valid."""
    valid = (~np.isnan(values)).sum(0)  # (T,)
    ordered = np.sort(values, axis=0)  # NaN sort last
    lo = np.take_along_axis(ordered, np.maximum(valid - 1, 0)[None] // 2, axis=0)[0]
    hi = np.take_along_axis(ordered, (valid // 2)[None], axis=0)[0]
    median = 0.5 * (lo + np.where(valid > 0, hi, np.nan))
    median[valid < min(MIN_CHORDS, values.shape[0])] = np.nan
    return median


def staircase(t: np.ndarray, edges: np.ndarray, sigma) -> np.ndarray:
    """Blurred indicator functions of the steps of a staircase.

    Args:
        t: Float[T] positions.
        edges: Float[..., E] positions of the E edges (increasing).
        sigma: Gaussian blur (px), a float or an array broadcasting with ``edges[..., :1]``.

    Returns:
        Float[..., T, E + 1]: column j is 1 between edge j - 1 and edge j (before the first edge
        for j = 0, after the last for j = E), blurred. A staircase with levels ``c`` is
        ``basis @ c``.
    """
    sigma = np.asarray(sigma, dtype=np.float64)[..., None, None]
    # fraction of the blur kernel past each edge: (..., T, E)
    past = torch.special.ndtr(torch.from_numpy((t[:, None] - edges[..., None, :]) / sigma)).numpy()
    steps = np.empty(past.shape[:-1] + (past.shape[-1] + 1,))  # (..., T, E + 1)
    steps[..., 0] = 1.0 - past[..., 0]  # before the first edge
    steps[..., 1:-1] = past[..., :-1] - past[..., 1:]  # past one edge, not yet past the next
    steps[..., -1] = past[..., -1]  # past the last edge
    return steps


def fit_staircase(t: np.ndarray, values: np.ndarray, design: Callable[[float], np.ndarray],
                  plausible: Callable[[np.ndarray], np.ndarray] | None = None, prior: np.ndarray | None = None):
    """Least-squares fit of many candidate models that are linear in their levels.

    Args:
        t: Float[T] positions; values: Float[T] the measured profile (no NaN).
        design: ``design(sigma)`` returns the design matrices Float[C, T, P] of the C candidates
            for one blur (e.g. from :func:`staircase`); the levels Float[P] of each candidate are
            fitted by least squares.
        plausible: optional ``plausible(levels Float[C, P]) -> Bool[C]``: candidates whose fitted
            levels are not physically possible (a shadow darker than black...) are skipped.
            Blur and a narrow dark band trade off (narrower and darker looks the same); this
            keeps the fit honest.
        prior: optional Float[C], a cost per candidate in units of the noise variance (e.g.
            ``(offset / sd)²`` for a Gaussian prior on a parameter): the fit then minimises
            ``residual / noise + prior``, the noise estimated from the best candidate's residual
            (a least-squares fit with a Gaussian prior; without it, plain least squares).

    Returns:
        ``(candidate, sigma, levels, model)``: the index of the best candidate, its blur, its
        levels Float[P] and the fitted profile Float[T]; candidate is -1 when none is plausible.
    """
    best = (math.inf, -1, BLUR_SIGMAS[0], None, None)
    for sigma in BLUR_SIGMAS:
        a = design(sigma)  # (C, T, P)
        ata = a.transpose(0, 2, 1) @ a + 1e-9 * np.eye(a.shape[-1])  # (C, P, P)
        atb = a.transpose(0, 2, 1) @ values  # (C, P)
        levels = np.linalg.solve(ata, atb[..., None])[..., 0]  # (C, P)
        model = (a @ levels[..., None])[..., 0]  # (C, T)
        residual = ((model - values) ** 2).sum(-1)  # (C,)
        if plausible is not None:
            residual = np.where(plausible(levels), residual, np.inf)
        if prior is not None and np.isfinite(residual).any():
            noise = max(float(residual[np.isfinite(residual)].min()) / max(len(values) - a.shape[-1], 1), 1e-12)
            residual = residual + noise * prior  # (residual / noise + prior), scaled back by noise
        c = int(np.argmin(residual))
        if residual[c] < best[0]:
            best = (float(residual[c]), c, sigma, levels[c], model[c])
    return best[1:]


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


def estimate_fill(image: torch.Tensor, mask, sun_azimuth: float, *, occluders=None,
                  max_shadow_px: float = MAX_SHADOW_PX) -> FillEstimate:
    """Estimate how full one floating-roof tank is from one image (see the module doc).

    Args:
        image: Float[3, H, W] RGB in [0, 1].
        mask: UInt8[H, W] or Bool[H, W] (tensor or numpy): the tank's disc (ground truth or a
            thresholded predicted mask).
        sun_azimuth: direction towards the sun (radians; image x to the right, y down), as
            ``oil_tanks.Sun.azimuth``.
        occluders: optional Bool[H, W]: other tanks (their shadows may end under them);
            :func:`estimate_fills` passes the other masks.
        max_shadow_px: the longest ground shadow to look for.

    Returns:
        A :class:`FillEstimate`.
    """
    gray = _check_image(image)
    mask = _check_mask(mask, gray.shape, "mask")
    azimuth = _check_azimuth(sun_azimuth)
    if not mask.any():
        raise UserError("mask: the mask is empty (no pixel set); expected the tank's disc")
    if occluders is not None:
        occluders = grow_masks(_check_mask(occluders, gray.shape, "occluders")[None], OCCLUDER_MARGIN_PX)[0] & ~mask
    return _estimate(gray, mask, azimuth, occluders, float(max_shadow_px))


def estimate_fills(image: torch.Tensor, masks, sun_azimuth: float, *, max_shadow_px: float = MAX_SHADOW_PX,
                   shared_sun: bool = True, gsd_m: float = GSD_M) -> list[FillEstimate]:
    """:func:`estimate_fill` for every mask UInt8[N, H, W] of one image; each tank sees the others
    as occluders. An empty mask gives an unreliable estimate (NaN) instead of an error.

    With ``shared_sun``, a tank whose own ground shadow cannot be measured (cut by the border,
    running under a neighbour) borrows it from the others: one sun for the whole image, so
    ``L_i / h_i = 1 / tan(el)`` is the same for all tanks; with the heights from
    :func:`height_prior` (``gsd_m`` metres per pixel), ``L_i = h_i * median_j(L_j / h_j)`` over
    the tanks measured by the ratio method. Such estimates say so in ``reason``; they carry the
    height prior's error (about ±15 % of ``1 - fill``).
    """
    gray = _check_image(image)
    azimuth = _check_azimuth(sun_azimuth)
    masks = _as_bool_array(masks, "masks")
    if masks.ndim != 3 or masks.shape[1:] != gray.shape:
        raise UserError(f"masks: expected shape (N, {gray.shape[0]}, {gray.shape[1]}) to match the image, "
                        f"got {tuple(masks.shape)}")
    grown = grow_masks(masks, OCCLUDER_MARGIN_PX)  # (N, H, W)
    count = grown.sum(0, dtype=np.int32)  # (N, H, W) -> (H, W): how many grown masks cover a pixel

    def one(i, borrowed=None):
        others = (count - grown[i]) > 0
        return _estimate(gray, masks[i], azimuth, others & ~masks[i], float(max_shadow_px), borrowed)

    out = [one(i) if masks[i].any() else FillEstimate(math.nan, math.nan, math.nan, False, "empty mask")
           for i in range(masks.shape[0])]
    if not shared_sun:
        return out
    # All tanks of one image share the sun: L = h / tan(el). Where a shadow could not be
    # measured, take tan(el) from the measured ones (with a height prior for h).
    measured = [e for e in out if e.reliable and e.shadow_from == "tank"]
    if not measured:
        return out
    per_metre = float(np.median([e.shadow_px / height_prior(e.radius, gsd_m) for e in measured]))
    ratio = float(np.median([e.profiles.levels["shadow"] / e.profiles.levels["ground"] for e in measured]))
    for i, e in enumerate(out):
        if not e.reliable and np.isnan(e.shadow_px) and e.profiles is not None:
            out[i] = one(i, (per_metre, ratio, gsd_m))
    return out


def grow_masks(masks, pixels: int):
    """Grow (``pixels`` > 0) or shrink (< 0) binary masks [N, H, W] by ``|pixels|`` steps of a 3 × 3
    square -- to emulate predicted masks a pixel too large or small, or to pad occluders.

    Takes and returns a Bool numpy array, or a tensor (returned as UInt8).
    """
    if not isinstance(pixels, numbers.Integral) or isinstance(pixels, bool):
        raise UserError(f"pixels: expected an integer (negative shrinks), got {pixels!r}")
    is_tensor = isinstance(masks, torch.Tensor)
    m = torch.as_tensor(_as_bool_array(masks, "masks"))
    if m.dim() != 3:
        raise UserError(f"masks: expected shape (N, H, W), got {tuple(m.shape)}")
    x = m.float()[:, None]  # (N, H, W) -> (N, 1, H, W)
    for _ in range(abs(int(pixels))):
        # a 3 × 3 maximum grows by one pixel; the maximum of the negation shrinks
        x = F.max_pool2d(x, 3, stride=1, padding=1) if pixels > 0 else -F.max_pool2d(-x, 3, stride=1, padding=1)
    out = x[:, 0] > 0.5  # (N, 1, H, W) -> (N, H, W)
    return out.to(torch.uint8) if is_tensor else out.numpy()


def _estimate(gray, mask, azimuth, occluders, max_shadow_px, shared_sun=None) -> FillEstimate:
    """One tank. ``shared_sun`` = (shadow length in px per metre of prior height, shadow / ground
    brightness, metres per pixel) from the other tanks of the image, used when this tank's own
    shadow can't be measured."""
    circle = mask_circle(mask)
    cx, cy, radius, _ = circle
    if radius < 2.0:
        return FillEstimate(math.nan, math.nan, math.nan, False, "mask too small (radius < 2 px)", "", cx, cy, radius)
    cx, cy, radius = tank_circle(gray, mask, azimuth, occluders, circle)
    prof = tank_profiles(gray, cx, cy, radius, azimuth, occluders, max_shadow_px)

    source = "tank"

    def result(fill, s, length, reliable, reason):
        return FillEstimate(float(fill), float(s), float(length), reliable, reason,
                            source if np.isfinite(length) else "", cx, cy, radius, prof)

    # -- the ground shadow: find it with a threshold, then measure it by a fit
    shadow = _measure_shadow(gray, prof, occluders)
    note = ""
    if isinstance(shadow, str) and shared_sun is None:
        return result(math.nan, math.nan, math.nan, False, shadow)
    if isinstance(shadow, str):  # the other tanks' shadows tell the sun's elevation
        per_metre, ratio, gsd_m = shared_sun
        ground = _ground_level(gray, prof, occluders)
        if not np.isfinite(ground):
            return result(math.nan, math.nan, math.nan, False, shadow)
        length, shade = per_metre * height_prior(radius, gsd_m), ratio * ground
        note = f"{shadow}; L from the other tanks' shadows and a height prior"
        source = "image"
    else:
        length, shade, ground = shadow
    # -- the crescent
    crescent = _measure_crescent(prof, ROOF_SHADE * shade / ground)
    if isinstance(crescent, str):
        return result(math.nan, math.nan, length, False, crescent)
    s, roof, s_max = crescent
    if s >= s_max:  # no lit roof left on the sun side: the crescent may be even wider
        upper = float(np.clip(1.0 - s / length, 0.0, 1.0))
        return result(upper, s, length, False, f"roof (almost) entirely in shadow: fill <= {upper:.2f}")
    fill = float(np.clip(1.0 - s / length, 0.0, 1.0))
    if s <= RIM_PX and roof < shade + 0.5 * (ground - shade):
        return result(fill, s, length, False, "dark roof without a crescent: not a floating roof")
    tilt = _roof_tilt(prof, s)
    if tilt > FIXED_ROOF_TILT:
        return result(fill, s, length, False, f"roof brighter on the sun's side ({tilt:.2f}x): a fixed roof")
    if s <= RIM_PX:
        hidden = f"crescent hidden under the rim: fill >= {max(0.0, 1.0 - RIM_PX / length):.2f}"
        note = f"{note}; {hidden}" if note else hidden
    return result(fill, s, length, True, note)


def height_prior(radius_px: float, gsd_m: float = GSD_M) -> float:
    """A tank's likely shell height (m) from its radius (px): ``7.5 m + 0.17 × diameter``, the
    generator's rule (real tanks: 10-20 m for 20-80 m across); individual tanks vary by ±15 %."""
    return HEIGHT_PRIOR_M[0] + HEIGHT_PRIOR_M[1] * 2 * radius_px * gsd_m


def _refine_radius(gray, cx, cy, radius, azimuth, occluders) -> float:
    """Correct the mask's radius (a predicted mask may be a pixel too large or small) with the
    image: the far edge is where the profile falls fastest (bright roof -> dark shadow)."""
    b = np.arange(-4.0, 4.0 + STEP / 2, STEP)
    p = _far_side(gray, cx, cy, radius, azimuth, occluders, b)
    window = np.flatnonzero((b >= -2.5) & (b <= 2.5))
    slope = -(p[window + 1] - p[window - 1]) / (2 * STEP)  # falling brightness, per px
    if np.all(np.isnan(slope)):
        return radius
    j = int(np.nanargmax(slope))
    offset = float(b[window[j]])
    if 0 < j < len(slope) - 1 and np.isfinite(slope[j - 1:j + 2]).all():  # parabola through the peak
        y0, y1, y2 = slope[j - 1:j + 2]
        curvature = y0 - 2 * y1 + y2
        if curvature < 0:
            offset += STEP * float(np.clip(0.5 * (y0 - y2) / curvature, -0.5, 0.5))
    inside = p[(b >= offset - 2.5) & (b <= offset - 1.0)]
    outside = p[(b >= offset + 1.0) & (b <= offset + 2.0)]
    if np.isnan(inside).all() or np.isnan(outside).all() or np.nanmean(inside) - np.nanmean(outside) < 0.05:
        return radius  # no clear edge: keep the mask's
    return radius + offset


def tank_circle(gray: np.ndarray, mask: np.ndarray, azimuth: float, occluders=None,
                circle: tuple[float, float, float, bool] | None = None) -> tuple[float, float, float]:
    """The tank's circle ``(cx, cy, r)`` from its mask Bool[H, W] and the image ``gray`` Float[H, W].

    A detector may leave (part of) the dark crescent out of a floating roof's mask (it looks like
    ground); then the mask's centroid and area are biased *away from the sun* and too small. Seen
    along the sun's direction ``u``, such a mask is the lit roof: a *lens*, the disc minus the
    crescent = the disc ∩ the disc shifted by ``s`` away from the sun. Its length along ``u`` is
    ``a = 2r - s`` and its width across is ``w = 2 sqrt(r² - s²/4)``; eliminating ``s``::

        w² = 4 r a - a²    =>    r = (w² + a²) / (4 a)        (a whole disc: a = w = 2r)

    ``w`` and the centre across ``u`` come from the mask's extent across the sun; ``a`` runs from
    the far edge, found in the image (bright roof -> dark ground shadow, :func:`_refine_radius`),
    to the mask's sun-side extent. The centre lies ``r`` from the far edge. A tank cut by the
    image border keeps :func:`mask_circle`'s circle, its radius corrected at the far edge.
    ``circle``: ``mask_circle(mask)`` if the caller has it already.
    """
    cx, cy, radius, touches = mask_circle(mask) if circle is None else circle
    far = _refine_radius(gray, cx, cy, radius, azimuth, occluders)  # centre -> far edge, from the image
    if touches:
        return cx, cy, far
    u = np.array([math.cos(azimuth), math.sin(azimuth)])  # towards the sun
    v = np.array([-u[1], u[0]])
    ys, xs = np.nonzero(mask)
    px, py = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres relative to the centroid
    along, across = px * u[0] + py * u[1], px * v[0] + py * v[1]  # (P,) each
    # how far the mask's outline is off (too large > 0), read at the far edge. Half of it is taken
    # off all round: a predicted mask's far side also swallows the blurred edge of the dark shadow
    # (on the tanks of 60 tiles it was ~1 px too large there, ~0.5 px across the sun)
    grown = 0.5 * ((0.5 - float(along.min())) - far)
    w = float(across.max() - across.min()) + 1.0 - 2 * grown  # pixel centres -> pixel edges
    a = float(along.max()) + 0.5 - grown + far  # the far edge sits at -far along u
    if a <= 0 or w <= 0:
        return cx, cy, far
    r = float(np.clip((w * w + a * a) / (4 * a), 0.5 * a, a))  # 0 <= s = 2r - a <= a
    centre_along = r - far  # r from the far edge, towards the sun
    centre_across = 0.5 * float(across.max() + across.min())
    return (cx + centre_along * u[0] + centre_across * v[0], cy + centre_along * u[1] + centre_across * v[1], r)


def _measure_shadow(gray, prof: TankProfiles, occluders):
    """(L, shadow level, ground level) of the ground shadow beyond the far edge, or a reason."""
    b, p = prof.beyond, prof.far_side
    near = (b >= 0.25) & (b <= 2.5)
    if np.isnan(p[near]).mean() > 0.5:
        return "no ground shadow in the image (cut by the border or under another tank)"
    smooth = _box_smooth(p, 1.0)
    shade = float(np.nanmin(smooth[near]))
    # the lit ground around the tank; if neighbours' shadows darken it, the brighter ground further on
    ground = _ground_level(gray, prof, occluders)
    past = p[(b > 0) & (b <= 3 * prof.radius + 20)]
    if not (ground - shade >= MIN_SHADOW_CONTRAST * ground) and (~np.isnan(past)).sum() >= 8:
        ground = float(np.nanpercentile(past, 75))
    if not np.isfinite(ground):
        return "no ground visible around the tank"
    if ground - shade < MIN_SHADOW_CONTRAST * ground:
        return "no ground shadow darker than the ground next to the tank"
    start = int(np.flatnonzero(near)[np.nanargmin(smooth[near])])
    threshold = 0.5 * (shade + ground)
    end = None
    for j in range(start, len(p)):
        if np.isnan(p[j]):
            return "ground shadow cut by the image border or another tank"
        if smooth[j] >= threshold:
            end = j
            break
    if end is None:
        return f"ground shadow longer than {prof.beyond[-1]:.0f} px"
    rough = float(b[end])
    # fit: roof | rim | shadow | ground, edges at -RIM_PX, 0 and the candidate L
    hi = rough + 4.0
    window = (b >= -2.5) & (b <= hi) & ~np.isnan(p)
    if (b[window] > rough + 1.0).sum() < 4:
        return "ground shadow cut by the image border or another tank"
    t, y = b[window], p[window]
    lengths = np.arange(max(0.25, rough - 2.5), rough + 2.5, 0.05)  # (C,)
    edges = np.stack(np.broadcast_arrays(-RIM_PX, 0.0, lengths), axis=-1)  # (C, 3)
    c, sigma, levels, model = fit_staircase(t, y, lambda sg: staircase(t, edges, sg), _plausible_shadow)
    if c < 0:
        return "no ground shadow darker than the ground next to the tank"
    length = float(lengths[c])
    _, _, shade_fit, ground_fit = (float(v) for v in levels)
    prof.far_model = np.full_like(p, np.nan)
    prof.far_model[window] = model
    prof.levels.update(shadow=shade_fit, ground=ground_fit, far_roof=float(levels[0]), far_blur=sigma)
    if ground_fit - shade_fit < MIN_SHADOW_CONTRAST * ground_fit or shade_fit <= 0:
        return "no ground shadow darker than the ground next to the tank"
    return length, shade_fit, ground_fit


def _plausible_shadow(levels: np.ndarray) -> np.ndarray:
    """Levels (roof, rim, shadow, ground) Float[C, 4] -> Bool[C]: a shadow keeps some of the
    ground's brightness (the sky still lights it, at least 10 %) but is clearly darker
    (``MIN_SHADOW_CONTRAST``), and nothing is brighter than white."""
    shade, ground = levels[:, 2], levels[:, 3]
    return (shade >= 0.1 * ground) & (shade <= (1 - MIN_SHADOW_CONTRAST) * ground) & _plausible_levels(levels)


def _plausible_levels(levels: np.ndarray) -> np.ndarray:
    """Levels Float[C, P] -> Bool[C]: between black and white (with some slack for noise)."""
    return (levels.min(1) >= -0.05) & (levels.max(1) <= 1.1)


def _measure_crescent(prof: TankProfiles, kappa: float):
    """(s, lit roof level, largest measurable s) of the crescent on the sun's side, or a reason.

    Fit: ground | rim | crescent (``kappa`` × roof) | roof, edges at ``e``, ``e + RIM_PX`` and
    ``e + s``, for every roof edge ``e`` within ±``EDGE_SEARCH_PX`` of the circle's and every
    width ``s`` (the circle of a predicted mask may be a pixel off; the image says where the roof
    begins). A crescent narrower than the rim is hidden under it: all s <= RIM_PX fit alike; we
    report RIM_PX / 2, the middle of what cannot be told apart.
    """
    d, p = prof.depth, prof.sun_side
    valid = ~np.isnan(p)
    if np.isnan(p[(d >= -1.0 - EDGE_SEARCH_PX) & (d <= 1.5)]).any():
        return "tank cut by the image border on the sun's side"
    last = float(d[valid].max())
    window = (d >= -2.5 - EDGE_SEARCH_PX) & valid
    t, y = d[window], p[window]
    s_max = last - 1.0
    if s_max <= RIM_PX:
        return "roof too small to measure a crescent"
    # coarse: every (edge, width) on a 0.25 px grid, fitted on every other sample (0.5 px)
    edge, width = _grid(np.arange(-EDGE_SEARCH_PX, EDGE_SEARCH_PX + 1e-9, 0.25), np.arange(0.0, s_max + 1e-9, 0.25))
    keep = edge + width <= s_max
    edge, width = edge[keep], width[keep]  # (C,) each
    tc, yc = t[::2], y[::2]
    c, _, _, _ = fit_staircase(tc, yc, lambda sg: _crescent_design(tc, edge, width, sg, kappa), _plausible_levels,
                               (edge / EDGE_PRIOR_PX) ** 2)
    if c < 0:
        return "the roof's profile fits no crescent model"
    # fine: ±0.25 px around the best, every 0.05 px
    steps = np.arange(-0.25, 0.25 + 1e-9, 0.05)
    edge, width = _grid(edge[c] + steps, np.clip(width[c] + steps, 0.0, s_max))
    c, sigma, levels, model = fit_staircase(t, y, lambda sg: _crescent_design(t, edge, width, sg, kappa),
                                            _plausible_levels, (edge / EDGE_PRIOR_PX) ** 2)
    if c < 0:
        return "the roof's profile fits no crescent model"
    s = float(width[c])
    ground_level, rim_level, roof = (float(v) for v in levels)
    prof.sun_model = np.full_like(p, np.nan)
    prof.sun_model[window] = model
    prof.levels.update(sun_ground=ground_level, rim=rim_level, roof=roof, crescent=kappa * roof, sun_blur=sigma,
                       sun_edge=float(edge[c]))
    if s <= RIM_PX:
        s = RIM_PX / 2
    return s, roof, s_max


def _grid(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of Float[A] and Float[B], flattened: two Float[A * B]."""
    ga, gb = np.meshgrid(a, b, indexing="ij")
    return ga.ravel(), gb.ravel()


def _crescent_design(t, edge, widths, sigma, kappa) -> np.ndarray:
    """Design matrices Float[C, T, 3] (ground, rim, roof with its crescent) for roof edges and
    crescent widths Float[C]."""
    edges = np.stack([edge, edge + RIM_PX, edge + np.maximum(widths, RIM_PX)], axis=-1)  # (C, 3)
    basis = staircase(t, edges, sigma)  # (C, T, 4): ground, rim, crescent, roof
    return np.stack([basis[..., 0], basis[..., 1], basis[..., 3] + kappa * basis[..., 2]], axis=-1)


def _ground_level(gray, prof: TankProfiles, occluders) -> float:
    """Median brightness of the lit ground around the tank: a ring 2-5 px (up to r/2) outside the
    rim, on the sun's half and the sides (the far side is in the tank's own shadow)."""
    r = prof.radius
    u = np.array([math.cos(prof.azimuth), math.sin(prof.azimuth)])
    angles = np.linspace(-0.6 * math.pi, 0.6 * math.pi, 25)[None, :]  # around u
    dist = np.arange(r + 2.0, r + 2.0 + max(3.0, 0.5 * r), 0.5)[:, None]
    dx = u[0] * np.cos(angles) - u[1] * np.sin(angles)  # u rotated by each angle
    dy = u[1] * np.cos(angles) + u[0] * np.sin(angles)
    xs, ys = prof.cx + dist * dx, prof.cy + dist * dy  # (R, A)
    values = sample_bilinear(gray, xs, ys)
    if occluders is not None:
        values = _mask_out(values, occluders, xs, ys)
    if np.isnan(values).all():
        return math.nan
    return float(np.nanmedian(values))


def _roof_tilt(prof: TankProfiles, s: float) -> float:
    """Brightness of the lit roof on the sun's half over the far half (1 for a flat roof).
    NaN when the crescent leaves too little lit roof on the sun's half."""
    d, p = prof.depth, prof.sun_side
    r = prof.radius
    sun_half = (d >= max(s + 1.5, 0.3 * r)) & (d <= 0.8 * r)
    far_half = (d >= 1.2 * r) & (d <= 1.7 * r)
    if (~np.isnan(p[sun_half])).sum() < 4 or (~np.isnan(p[far_half])).sum() < 4:
        return math.nan
    return float(np.nanmedian(p[sun_half]) / max(np.nanmedian(p[far_half]), 1e-6))


def _box_smooth(p: np.ndarray, width_px: float) -> np.ndarray:
    """Moving average over ``width_px`` (odd number of samples, NaN-aware; NaN stays NaN)."""
    n = max(1, round(width_px / STEP) // 2 * 2 + 1)
    kernel = np.ones(n)
    valid = ~np.isnan(p)
    total = np.convolve(np.where(valid, p, 0.0), kernel, mode="same")
    count = np.convolve(valid.astype(float), kernel, mode="same")
    out = total / np.maximum(count, 1e-9)
    out[~valid] = np.nan
    return out


def estimate_sun_azimuth(image: torch.Tensor, masks) -> float:
    """Guess the direction towards the sun (radians in [0, 2 pi)) from the tanks' ground shadows.

    Around each tank, on a ring just outside its disc, the ground is dark over the half that
    faces away from the sun (the shadow is as wide as the tank). The darkness-weighted mean
    direction around the ring points away from the sun; the tanks' unit vectors are summed.
    Use the image metadata when you have it: this is a fallback (a few degrees off at worst on
    the synthetic tiles; a tilted fill estimate barely changes, ``s`` and ``L`` tilt alike).

    Args:
        image: Float[3, H, W]; masks: UInt8/Bool[N, H, W] of the tanks (at least one with a
            visible ring of ground around it).
    """
    gray = _check_image(image)
    masks = _as_bool_array(masks, "masks")
    if masks.ndim != 3 or masks.shape[1:] != gray.shape:
        raise UserError(f"masks: expected shape (N, {gray.shape[0]}, {gray.shape[1]}) to match the image, "
                        f"got {tuple(masks.shape)}")
    tanks = grow_masks(masks, OCCLUDER_MARGIN_PX).any(0)  # (N, H, W) -> (H, W)
    circles = [mask_circle(m) for m in masks if m.sum() >= 20]
    angles = np.linspace(0, 2 * math.pi, 72, endpoint=False)  # (A,)
    total = np.zeros(2)
    for cx, cy, r, _ in circles:
        dist = r + np.array([1.5, 2.5, 3.5])[:, None]  # (3, 1)
        xs, ys = cx + dist * np.cos(angles), cy + dist * np.sin(angles)  # (3, A)
        ring = _mask_out(sample_bilinear(gray, xs, ys), tanks, xs, ys)
        ring = _median_over_chords(ring)  # (3, A) -> (A,)
        if np.isnan(ring).mean() > 0.5:
            continue
        dark = np.nan_to_num(np.clip(np.nanpercentile(ring, 80) - ring, 0, None))  # (A,)
        if dark.sum() > 0:
            total += np.array([dark @ np.cos(angles), dark @ np.sin(angles)]) / dark.sum()
    if not np.any(total):
        raise UserError("masks: no tank with a ring of visible ground around it; cannot find the shadows")
    first = math.atan2(-total[1], -total[0])  # away from the shadows
    # refine: the shadow is a band exactly as wide as the tank; along the right direction the
    # ground just inside the band's sides is dark and just outside is lit
    candidates = first + np.radians(np.arange(-20.0, 20.5, 1.0))  # (C,)
    u = np.stack([np.cos(candidates), np.sin(candidates)], axis=1)[:, None, None, :]  # (C, 1, 1, 2)
    v = np.stack([-np.sin(candidates), np.cos(candidates)], axis=1)[:, None, None, :]
    score = np.zeros(len(candidates))
    for cx, cy, r, _ in circles:
        # past the far edge (1-6 px), just inside the band's sides and just outside them
        along = -(0.53 * r + np.arange(1.0, 6.01, 0.5))[None, None, :, None]  # (1, 1, B, 1)
        inside, outside = np.array([0.6, 0.85]) * r, r + np.array([1.5, 3.0])
        offsets = np.concatenate([inside, -inside, outside, -outside])[None, :, None, None]  # (1, 8, 1, 1)
        points = np.array([cx, cy]) + along * u + offsets * v  # (C, 8, B, 2)
        xs, ys = points[..., 0], points[..., 1]
        values = _mask_out(sample_bilinear(gray, xs, ys), tanks, xs, ys)  # (C, 8, B)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (all on other tanks)
            contrast = np.nanmean(values[:, 4:], axis=(1, 2)) - np.nanmean(values[:, :4], axis=(1, 2))  # (C,)
        score += np.nan_to_num(contrast)
    return float(candidates[int(np.argmax(score))] % (2 * math.pi))


def _mask_out(values: np.ndarray, tanks: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``values`` (in place) set to NaN where the sample points (xs, ys) fall on ``tanks`` Bool[H, W]."""
    h, w = tanks.shape
    values[tanks[np.clip(ys.astype(np.int64), 0, h - 1), np.clip(xs.astype(np.int64), 0, w - 1)]] = np.nan
    return values


# ---------------------------------------------------------------------------------------------
# Evaluation against the generator's ground truth
# ---------------------------------------------------------------------------------------------


def evaluate_fill(data, *, masks=None, sun_azimuths: Sequence[float] | None = None,
                  shared_sun: bool = True) -> dict:
    """Compare estimated and true fill levels of the floating-roof tanks of a set of images.

    Args:
        data: a sequence of ``oil_tanks.Tile`` (``make_tile`` output: image, masks, sun, tanks);
            or a pair ``(images, targets)`` of lists; or an iterable of ``(image, target)``
            items (e.g. a ``data.CocoDataset`` of ``oil_tanks.make_dataset``). Targets need
            ``"masks"`` and ``"attributes"`` (per instance ``"roof"`` and ``"fill"``) and, unless
            ``sun_azimuths`` is given, ``"image_attributes"["sun"]["azimuth_deg"]``.
        masks: None (the ground-truth masks); a list, per image, of UInt8[N, H, W] in the ground
            truth's order (e.g. predicted masks matched to the tanks; an all-zero mask is a missed
            tank); or a callable applied to each image's ground-truth masks, e.g.
            ``lambda m: grow_masks(m, -1)`` for masks a pixel too small.
        sun_azimuths: per image, radians towards the sun (overrides what the data says).
        shared_sun: passed to :func:`estimate_fills`.

    Returns:
        ``{"mae", "median_error", "n", "n_floating", "unreliable_fraction", "rows"}``: the mean
        and median absolute error of the reliable estimates (fill fractions: 0.05 = 5 percentage
        points) over ``n`` tanks; all ``n_floating`` floating-roof tanks; the fraction flagged
        unreliable (excluded from the errors); one row per floating-roof tank: ``image``,
        ``instance``, ``true_fill``, ``fill``, ``error`` (NaN if unreliable), ``crescent_px``,
        ``shadow_px``, ``shadow_from``, ``radius``, ``reliable``, ``reason``.
    """
    items = _evaluation_items(data)
    if sun_azimuths is not None and len(sun_azimuths) != len(items):
        raise UserError(f"sun_azimuths: expected one per image ({len(items)}), got {len(sun_azimuths)}")
    if masks is not None and not callable(masks) and len(masks) != len(items):
        raise UserError(f"masks: expected one UInt8[N, H, W] per image ({len(items)}), got {len(masks)}")
    rows = []
    for i, (image, gt_masks, roofs, fills, azimuth) in enumerate(items):
        if sun_azimuths is not None:
            azimuth = sun_azimuths[i]
        if azimuth is None:
            raise UserError(f"sun_azimuths: image {i} has no image_attributes['sun']['azimuth_deg']; "
                            f"pass sun_azimuths=[...] (radians)")
        use = gt_masks if masks is None else (masks(gt_masks) if callable(masks) else masks[i])
        if len(use) != len(roofs):
            raise UserError(f"masks: image {i} has {len(roofs)} tanks but {len(use)} masks")
        floating = [j for j, roof in enumerate(roofs) if roof == "floating"]
        if not floating:
            continue
        estimates = estimate_fills(image, use, azimuth, shared_sun=shared_sun)
        for j in floating:
            e = estimates[j]
            rows.append({"image": i, "instance": j, "true_fill": float(fills[j]), "fill": e.fill,
                         "error": abs(e.fill - float(fills[j])) if e.reliable else math.nan,
                         "crescent_px": e.crescent_px, "shadow_px": e.shadow_px, "shadow_from": e.shadow_from,
                         "radius": e.radius, "reliable": e.reliable, "reason": e.reason})
    errors = np.array([r["error"] for r in rows if r["reliable"]])
    return {"mae": float(errors.mean()) if len(errors) else math.nan,
            "median_error": float(np.median(errors)) if len(errors) else math.nan,
            "n": len(errors), "n_floating": len(rows),
            "unreliable_fraction": 1.0 - len(errors) / len(rows) if rows else math.nan, "rows": rows}


def _evaluation_items(data) -> list:
    """(image, masks, roofs, fills, azimuth or None) per image from tiles, a pair or items."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], (list, tuple)) \
            and all(isinstance(t, dict) for t in data[1]):
        images, targets = data
        if len(images) != len(targets):
            raise UserError(f"data: {len(images)} images but {len(targets)} targets")
        pairs = list(zip(images, targets))
    else:
        pairs = list(data)
    items = []
    for i, item in enumerate(pairs):
        if hasattr(item, "tanks") and hasattr(item, "sun"):  # an oil_tanks.Tile
            masks = item.target.get("masks")
            if masks is None:
                masks = torch.stack([item.instance_mask(j) for j in range(len(item.tanks))]) if item.tanks \
                    else torch.zeros((0,) + tuple(item.image.shape[-2:]), dtype=torch.uint8)
            items.append((item.image, masks, [t.roof for t in item.tanks], [t.fill for t in item.tanks],
                          item.sun.azimuth))
            continue
        try:
            image, target = item
            masks, attributes = target["masks"], target["attributes"]
            roofs, fills = [a["roof"] for a in attributes], [a["fill"] for a in attributes]
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"data: item {i} is neither an oil_tanks.Tile nor (image, target) with target "
                            f"'masks' and 'attributes' (each with 'roof' and 'fill'): {err!r}") from None
        sun = (target.get("image_attributes") or {}).get("sun") or {}
        azimuth = math.radians(sun["azimuth_deg"]) if "azimuth_deg" in sun else None
        items.append((image, masks, roofs, fills, azimuth))
    return items


def plot_fill_scatter(rows, ax=None, title: str | None = None):
    """True vs estimated fill level (percent) of floating-roof tanks, with the line y = x.

    ``rows``: the ``"rows"`` of :func:`evaluate_fill` (or the whole dict). Reliable estimates are
    dots (orange where the ground shadow was borrowed from the other tanks); unreliable ones are
    counted in the title but not drawn. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    if isinstance(rows, dict):
        rows = rows["rows"]
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ok = [r for r in rows if r["reliable"]]
    borrowed = [r for r in ok if r.get("shadow_from") == "image"]
    own = [r for r in ok if r.get("shadow_from") != "image"]
    ax.plot([0, 100], [0, 100], color="grey", lw=1, label="y = x")
    ax.scatter([100 * r["true_fill"] for r in own], [100 * r["fill"] for r in own], s=12, alpha=0.7,
               label=f"s / L from the tank's own shadow ({len(own)})")
    if borrowed:
        ax.scatter([100 * r["true_fill"] for r in borrowed], [100 * r["fill"] for r in borrowed], s=12, alpha=0.7,
                   color="tab:orange", label=f"shadow length from the other tanks ({len(borrowed)})")
    errors = [r["error"] for r in ok]
    mae = 100 * float(np.mean(errors)) if errors else math.nan
    unreliable = len(rows) - len(ok)
    ax.set_title(title or f"fill level: MAE {mae:.1f} pp over {len(ok)} floating roofs\n"
                          f"({unreliable} of {len(rows)} flagged unreliable, not shown)", fontsize=10)
    ax.set_xlabel("true fill level (%)")
    ax.set_ylabel("estimated fill level (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return ax


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _check_image(image) -> np.ndarray:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        got = f"shape {tuple(image.shape)} and dtype {image.dtype}" if isinstance(image, torch.Tensor) \
            else f"a {type(image).__name__}"
        raise UserError(f"image: expected a float tensor of shape (3, H, W) in [0, 1], got {got}")
    if image.shape[1] < 4 or image.shape[2] < 4:
        raise UserError(f"image: expected at least 4 × 4 pixels, got {tuple(image.shape)}")
    gray = luminance(image)
    if not np.isfinite(gray).all():
        raise UserError("image: contains NaN or infinite values")
    return gray


def _as_bool_array(mask, name: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        if mask.is_floating_point():
            raise UserError(f"{name}: expected a binary UInt8 or Bool mask, got dtype {mask.dtype} "
                            f"(threshold predicted probabilities first, e.g. masks[:, 0] > 0.5)")
        return mask.detach().cpu().numpy() != 0
    if isinstance(mask, np.ndarray):
        if mask.dtype.kind == "f":
            raise UserError(f"{name}: expected a binary UInt8 or Bool mask, got dtype {mask.dtype}")
        return mask != 0
    raise UserError(f"{name}: expected a UInt8 or Bool tensor, got a {type(mask).__name__}")


def _check_mask(mask, shape, name: str) -> np.ndarray:
    m = _as_bool_array(mask, name)
    if m.shape != tuple(shape):
        raise UserError(f"{name}: expected shape {tuple(shape)} to match the image (H, W), got {tuple(m.shape)}")
    return m


def _check_azimuth(azimuth) -> float:
    if isinstance(azimuth, torch.Tensor) and azimuth.numel() == 1:
        azimuth = azimuth.item()
    if not isinstance(azimuth, numbers.Real) or isinstance(azimuth, bool) or not math.isfinite(float(azimuth)):
        raise UserError(f"sun_azimuth: expected a finite angle in radians (direction towards the sun), "
                        f"got {azimuth!r}")
    return float(azimuth)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def plot_fill_profile(image: torch.Tensor, mask, sun_azimuth: float, ax=None, *, occluders=None,
                      title: str | None = None):
    """Show how one tank's fill level is read: the tank with its chords, and the two profiles
    with the crescent ``s`` and the ground shadow ``L`` marked.

    ``ax``: None (a new figure with two axes), two axes (tank, profiles) or one axes (profiles
    only). Returns ``(estimate, axes)``.
    """
    import matplotlib.pyplot as plt

    est = estimate_fill(image, mask, sun_azimuth, occluders=occluders)
    if ax is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2.2]})
    elif isinstance(ax, (list, tuple, np.ndarray)):
        axes = list(np.ravel(ax))
    else:
        axes = [ax]
    prof = est.profiles
    if prof is None:
        axes[-1].text(0.5, 0.5, f"no profile: {est.reason}", ha="center", va="center", transform=axes[-1].transAxes)
        return est, axes
    r = prof.radius
    if len(axes) == 2:
        _draw_tank(axes[0], image, prof, est)
    a = axes[-1]
    # one axis for both profiles: x = distance from the roof's sun-side edge, away from the sun
    x_sun, x_far = prof.depth, 2 * r + prof.beyond
    keep_far = x_far >= r  # the far side's profile from the tank's centre on
    a.plot(x_sun[x_sun <= r], prof.sun_side[x_sun <= r], color="tab:orange", lw=2, label="sun side (median of chords)")
    a.plot(x_far[keep_far], prof.far_side[keep_far], color="tab:blue", lw=2, label="far side (median of chords)")
    if prof.sun_model is not None:
        a.plot(x_sun, prof.sun_model, "k--", lw=1, label="fitted staircases")
    if prof.far_model is not None:
        a.plot(x_far, prof.far_model, "k--", lw=1)
    if np.isfinite(est.crescent_px):
        e0 = prof.levels.get("sun_edge", 0.0)  # where the fit put the roof's edge
        a.axvspan(e0, e0 + est.crescent_px, color="tab:orange", alpha=0.18)
        a.annotate(f"crescent\ns = {est.crescent_px:.1f} px", (e0 + 0.3, 0.97), xycoords=("data", "axes fraction"),
                   ha="left", va="top", fontsize=9)
    if np.isfinite(est.shadow_px):
        a.axvspan(2 * r, 2 * r + est.shadow_px, color="tab:blue", alpha=0.15)
        a.annotate(f"ground shadow\nL = {est.shadow_px:.1f} px", (2 * r + 0.3, 0.97),
                   xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=9)
    a.axvline(0, color="grey", lw=0.8, ls=":")
    a.axvline(2 * r, color="grey", lw=0.8, ls=":")
    end = 2 * r + (est.shadow_px if np.isfinite(est.shadow_px) else 10.0) + 8
    a.set_xlim(-3, end)
    a.set_xlabel("distance from the tank's edge on the sun's side, away from the sun (px)")
    a.set_ylabel("brightness")
    fill = f"fill = 1 - s / L = {est.fill:.2f}" if np.isfinite(est.fill) else "fill: not measured"
    flag = "" if est.reliable else "  (unreliable)"
    a.set_title(title or f"{fill}{flag}" + (f"\n{est.reason}" if est.reason else ""), fontsize=10)
    a.legend(loc="lower center", fontsize=8, framealpha=0.9)
    return est, axes


def _draw_tank(ax, image, prof: TankProfiles, est: FillEstimate) -> None:
    """The image around the tank, its circle, the chords and an arrow towards the sun."""
    from matplotlib.patches import Circle, FancyArrow

    from mrcnn_edu import viz

    r, cx, cy = prof.radius, prof.cx, prof.cy
    u = np.array([math.cos(prof.azimuth), math.sin(prof.azimuth)])
    v = np.array([-u[1], u[0]])
    length = est.shadow_px if np.isfinite(est.shadow_px) else 2 * r
    reach = r + length + 6
    viz.show_image(image, ax=ax)
    h, w = image.shape[-2:]
    ax.set_xlim(max(cx - reach, 0) - 0.5, min(cx + reach, w) - 0.5)
    ax.set_ylim(min(cy + reach, h) - 0.5, max(cy - reach, 0) - 0.5)
    ax.add_patch(Circle((cx - 0.5, cy - 0.5), r, fill=False, color="yellow", lw=1))
    for o in prof.offsets[:: max(1, len(prof.offsets) // 5)]:
        half = math.sqrt(max(r * r - o * o, 0.0))
        t0, t1 = half, -half - length
        xs = cx + np.array([t0, t1]) * u[0] + o * v[0] - 0.5
        ys = cy + np.array([t0, t1]) * u[1] + o * v[1] - 0.5
        ax.plot(xs, ys, color="cyan", lw=0.7, alpha=0.8)
    ax.add_patch(FancyArrow(cx - 0.5 + u[0] * (r + 1), cy - 0.5 + u[1] * (r + 1), u[0] * 0.6 * r, u[1] * 0.6 * r,
                            width=0.08 * r, color="gold"))
    ax.set_title("tank, chords, arrow towards the sun", fontsize=10)
