"""What the satellite and its ground processing do to the ideal picture.

Taught in: ``09_case_study_oil_tanks.ipynb`` (why synthetic tiles are blurred, noisy and JPEG'd).

Shape shorthand:
    H, W     image height and width in pixels

In the order the light meets them: atmospheric haze (a bluish veil, uneven over the scene);
the optics' blur (a Gaussian point spread function); pan-sharpening (colour comes from a
coarser multispectral band, so chroma is blurrier than brightness, and the product is often
sharpened, with faint halos); radiometric processing (per-band gains: colour casts, brightness,
gamma, contrast, saturation); sensor noise; 8-bit quantisation and JPEG compression at a
random quality (through PIL, like the Airbus chips). Every parameter is drawn from the tile's
own random stream and recorded in ``Tile.info["sensor"]``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mrcnn_edu.oil_tanks.raster import gaussian_blur, value_noise

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def draw_parameters(rng: np.random.Generator) -> dict:
    """Random sensor settings for one tile (plain floats: JSON-ready)."""
    haze = float(rng.uniform(0.0, 0.22)) if rng.random() < 0.75 else 0.0
    return {
        "haze": haze,
        "haze_colour": [float(v) for v in np.array([0.72, 0.76, 0.82]) * rng.uniform(0.9, 1.1)],
        "blur_sigma": float(rng.uniform(0.35, 0.9)),
        "chroma_sigma": float(rng.uniform(0.8, 2.2)),
        "saturation": float(rng.uniform(0.7, 1.05)),
        "sharpen": float(rng.uniform(0.2, 0.9)) if rng.random() < 0.6 else 0.0,
        "gains": _cast(rng),
        "brightness": float(rng.uniform(0.88, 1.12)),
        "gamma": float(rng.uniform(0.85, 1.15)),
        "contrast": float(rng.uniform(0.85, 1.15)),
        "noise": float(rng.uniform(0.004, 0.016)),
        "jpeg_quality": int(rng.integers(35, 93)) if rng.random() < 0.85 else None,
    }


def _cast(rng: np.random.Generator) -> list:
    """Per-band gains: casts run mostly from blue (cool, hazy) to yellow (warm), little to magenta."""
    warm, green = rng.normal(0.0, 0.035), rng.normal(0.0, 0.01)
    return [float(np.exp(warm)), float(np.exp(0.4 * warm + green)), float(np.exp(-warm))]


def apply(img: np.ndarray, params: dict, rng: np.random.Generator) -> torch.Tensor:
    """Float[H, W, 3] ideal radiance (about 0..1) -> Float[3, H, W] image in [0, 1].

    (Written with in-place operations: a 2560 × 2560 scene is 20 M values per pass.)
    """
    h, w, _ = img.shape
    x = img
    if params["haze"] > 0:
        a = np.clip(params["haze"] * (0.7 + 0.6 * value_noise(rng, h, w, 300)), 0, 0.5)[..., None]  # (H, W, 1)
        x = x + a * (np.asarray(params["haze_colour"], np.float32) - x)
    x = gaussian_blur(x, params["blur_sigma"])
    if x is img:  # (no blur, no haze): never modify the caller's array
        x = x.copy()
    # pan-sharpening: brightness at full resolution, colour (x - luma) from a coarser band
    luma = x @ _LUMA  # (H, W, 3) @ (3,) -> (H, W)
    x -= luma[..., None]
    x = _coarse_blur(x, params["chroma_sigma"])  # the chroma
    x *= params["saturation"]
    if params["sharpen"] > 0:
        luma += params["sharpen"] * (luma - gaussian_blur(luma, 1.2))
    x += luma[..., None]
    x *= np.asarray(params["gains"], np.float32) * params["brightness"]
    _unit(x)
    np.power(x, params["gamma"], out=x)
    mean = float(x.mean())
    x *= params["contrast"]  # contrast about the mean: mean + (x - mean) * contrast
    x += mean * (1.0 - params["contrast"])
    noise = rng.random((h, w, 3), dtype=np.float32)  # uniform noise (std 1/sqrt(12)): cheaper than normal
    noise -= 0.5
    noise *= 0.6 + 0.6 * x
    x += (params["noise"] * math.sqrt(12.0)) * noise
    _unit(x)
    x *= 255.0
    x += 0.5
    pixels = x.astype(np.uint8)  # 8-bit, like the delivered product
    if params["jpeg_quality"] is not None:
        pixels = _jpeg(pixels, params["jpeg_quality"])
    image = torch.from_numpy(pixels).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return image.float().div_(255)


def _unit(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place."""
    return np.minimum(np.maximum(x, 0.0, out=x), 1.0, out=x)


def _coarse_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of Float[H, W, C] computed at half resolution (for blurs wider than ~1 px)."""
    h, w = x.shape[:2]
    if sigma < 1.0 or h < 8 or w < 8:
        return gaussian_blur(x, sigma)
    he, we = h - h % 2, w - w % 2
    half = x[:he:2, :we:2] + x[1:he:2, :we:2] + x[:he:2, 1:we:2] + x[1:he:2, 1:we:2]  # (H/2, W/2, C) sums
    half = gaussian_blur(half * 0.25, sigma / 2)
    t = torch.from_numpy(np.ascontiguousarray(half)).permute(2, 0, 1)[None]  # (H/2, W/2, C) -> (1, C, H/2, W/2)
    up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return up[0].permute(1, 2, 0).numpy()  # (1, C, H, W) -> (H, W, C)


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    """UInt8[H, W, 3] -> the same after a JPEG encode / decode round trip at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.array(Image.open(buffer).convert("RGB"))


def clean(img: np.ndarray) -> torch.Tensor:
    """No sensor at all (for geometry checks): Float[H, W, 3] -> Float[3, H, W] clamped to [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).clamp(0, 1)  # (H, W, 3) -> (3, H, W)
