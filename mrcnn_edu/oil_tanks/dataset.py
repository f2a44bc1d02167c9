"""Synthetic tiles as a COCO folder on disk, and the generator's interactive explorer.

Taught in: ``09_case_study_oil_tanks.ipynb`` (data preparation: the generator).

Shape shorthand:
    H, W   tile height and width in pixels
    N      number of tanks in a tile
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import numpy as np

from mrcnn_edu.oil_tanks.generator import GENERATOR_VERSION, Tile, make_tile
from mrcnn_edu.oil_tanks.tanks import CLASSES, ROOF_TYPES, Sun
from mrcnn_edu.utils import UserError

_ROOF_COLOURS = {"floating": "#f28e2b", "fixed": "#3d6fd9", "dark": "#e0218a"}


def tile_seed(seed: int, index: int) -> int:
    """The seed of tile ``index`` of a data set made with ``seed``: a 32-bit hash of both.

    ``numpy.random.SeedSequence([seed, index])`` is stable across numpy versions and platforms, and
    neighbouring data-set seeds give unrelated tiles (unlike ``seed + index``).
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def _generator_options() -> set[str]:
    return set(inspect.signature(make_tile).parameters) - {"size", "seed", "with_masks"}


def _jsonable(value):
    if isinstance(value, Sun):
        return {"azimuth_deg": math.degrees(value.azimuth), "elevation_deg": math.degrees(value.elevation)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def make_dataset(
    out_dir: str | os.PathLike,
    n_tiles: int,
    seed: int,
    size: int | tuple[int, int] = 256,
    overwrite: bool = False,
    progress: bool = True,
    image_format: str = "png",
    mask_format: str = "rle",
    **generator_options,
) -> Path:
    """Write ``n_tiles`` synthetic tiles as a COCO folder that ``data.CocoDataset`` reads back.

    ::

        out_dir/images/tile_000000.png ...
        out_dir/annotations.json   one category (1, "oil-storage-tank"); every annotation keeps the
                                   tank's roof, style, fill, height, cx, cy, radius (pixels) and
                                   truncated (cut by the border); every image entry keeps its
                                   tile_index, tile_seed, sun {azimuth_deg, elevation_deg}, biome,
                                   clutter
        out_dir/manifest.json      generator version, seed, size, n_tiles, options, how tile seeds
                                   are derived

    Tile ``i`` is ``make_tile(size, seed=tile_seed(seed, i), **generator_options)``, so any tile can
    be rebuilt from the manifest alone. The folder is written atomically (``data.write_coco``);
    an existing non-empty ``out_dir`` is replaced only with ``overwrite=True``.

    Args:
        out_dir: the folder to create.
        n_tiles: how many tiles (>= 1).
        seed: the data set's seed (>= 0); use different seeds for training and validation.
        size: tile size, as in :func:`make_tile`.
        progress: show a progress bar.
        image_format: ``"png"`` (lossless: the tiles exactly as generated) or ``"jpg"`` (quality 95,
            about 5× smaller; the generator applies its own JPEG artefacts anyway).
        mask_format: ``"rle"`` or ``"polygon"``.
        **generator_options: any keyword of :func:`make_tile` (``n_groups``, ``radius_range``,
            ``roof_weights``, ``group_size``, ``sun``, ``fill``, ``clutter``, ``biome``,
            ``distractors``, ``sensor``).

    Returns:
        ``out_dir`` as a Path.
    """
    from tqdm.auto import tqdm

    from mrcnn_edu import data

    if not isinstance(n_tiles, int) or isinstance(n_tiles, bool) or n_tiles < 1:
        raise UserError(f"n_tiles: expected a positive integer, got {n_tiles!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UserError(f"seed: expected an integer >= 0, got {seed!r}")
    unknown = sorted(set(generator_options) - _generator_options())
    if unknown:
        raise UserError(f"{unknown[0]}: not an option of the generator; expected some of "
                        f"{', '.join(sorted(_generator_options()))}")
    make_tile(16 if isinstance(size, int) else size, seed=0, **generator_options)  # checks every option early
    make_tile(size, seed=0, n_groups=0, clutter=0.0, sensor=False)  # checks size
    h, w = (size, size) if isinstance(size, int) else tuple(size)

    def items():
        for i in tqdm(range(n_tiles), desc="synthetic tiles", unit="tile", disable=not progress):
            s = tile_seed(seed, i)
            tile = make_tile(size, seed=s, **generator_options)
            target = dict(tile.target)
            target["image_id"] = i + 1
            target["attributes"] = [{**t.attributes(), "truncated": _truncated(t, h, w)} for t in tile.tanks]
            target["image_attributes"] = {"tile_index": i, "tile_seed": s, "sun": _jsonable(tile.sun),
                                          "biome": tile.info["biome"], "clutter": tile.info["clutter"]}
            yield tile.image, target, f"tile_{i:06d}"

    manifest = {
        "generator": "mrcnn_edu.oil_tanks.make_tile",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": [h, w],
        "n_tiles": n_tiles,
        "options": {k: _jsonable(v) for k, v in sorted(generator_options.items())},
        "tile_seeds": "tile i uses mrcnn_edu.oil_tanks.tile_seed(seed, i) = "
                      "numpy.random.SeedSequence([seed, i]).generate_state(1, uint32)[0]",
        "image_format": image_format,
        "mask_format": mask_format,
        "classes": list(CLASSES[1:]),
        "roof_types": list(ROOF_TYPES),
    }
    info = {"description": f"synthetic oil tank farms, mrcnn_edu.oil_tanks {GENERATOR_VERSION}, seed {seed}",
            "version": GENERATOR_VERSION}
    return data.write_coco(out_dir, items(), categories=[{"id": 1, "name": CLASSES[1]}], mask_format=mask_format,
                           image_format=image_format, info=info, manifest=manifest, overwrite=overwrite)


def _truncated(tank, h: int, w: int) -> bool:
    r = tank.radius
    return bool(tank.cx - r < 0 or tank.cy - r < 0 or tank.cx + r > w or tank.cy + r > h)


def draw_tile(tile: Tile, ax=None, truth: bool = True, title: str | None = None):
    """Show a tile; with ``truth``, outline every tank (coloured by roof type), the distractors
    (dashed white) and an arrow pointing towards the sun. Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyArrow

    from mrcnn_edu import viz

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    viz.show_image(tile.image, ax=ax, title=title)
    if truth:
        for t in tile.tanks:
            ax.add_patch(Circle((t.cx - 0.5, t.cy - 0.5), t.radius, fill=False, lw=1.2, color=_ROOF_COLOURS[t.roof]))
        for d in tile.distractors:
            ax.add_patch(Circle((d.cx - 0.5, d.cy - 0.5), d.radius, fill=False, lw=1.0, ls="--", color="white"))
        h, w = tile.image.shape[-2:]
        u = tile.sun.toward
        length = 0.08 * min(h, w)
        x0, y0 = 0.12 * w, 0.12 * h
        ax.add_patch(FancyArrow(x0, y0, u[0] * length, u[1] * length, width=0.01 * min(h, w), color="yellow"))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    return ax


def explore_generator(size: int = 256, seed: int = 0):
    """Interactive explorer: sun azimuth and elevation, fill level, tank size, clutter, sensor.

    A thin layer over :func:`make_tile` (``sun``, ``fill``, ``radius_range``, ``clutter``,
    ``sensor``) and :func:`draw_tile`, built with ``mrcnn_edu.viz.explore`` (drawn once in batch
    runs). Left: the tile as a model sees it; right: the ground truth (tanks coloured by roof type:
    orange floating, blue fixed, pink dark; distractors dashed; the arrow points to the sun).
    """
    import matplotlib.pyplot as plt

    from mrcnn_edu import viz

    def draw(seed=seed, sun_azimuth=135, sun_elevation=40, fill=0.5, tank_radius=16, clutter=0.6, sensor=True):
        radius = (max(1.0, tank_radius * 0.85), tank_radius * 1.15)
        tile = make_tile(size, seed=seed, sun=Sun.from_degrees(sun_azimuth, sun_elevation), fill=fill,
                         radius_range=radius, clutter=clutter, sensor=sensor)
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6))
        draw_tile(tile, left, truth=False, title=f"seed {seed}: {tile.info['biome']}, {len(tile.tanks)} tanks")
        draw_tile(tile, right, truth=True, title=f"ground truth; floating roofs {fill:.0%} full")
        fig.tight_layout()
        plt.show()

    return viz.explore(draw, seed=(0, 500), sun_azimuth=(0, 355, 5), sun_elevation=(20, 80, 1),
                       fill=(0.0, 1.0, 0.05), tank_radius=(5, 30, 1), clutter=(0.0, 1.0, 0.05), sensor=True)
