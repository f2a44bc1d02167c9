"""Synthetic satellite tiles of oil tank farms, with exact ground truth.

Taught in: ``09_case_study_oil_tanks.ipynb``; its sample tiles are used by every stage notebook.

Shape shorthand:
    H, W   tile height and width in pixels
    N      number of tanks in a tile

The tiles imitate ~1.2 m/pixel optical imagery (SPOT-like, as in the Airbus Oil Storage data):

* **Tank farms**: sites of square or rectangular earthen (or concrete) bunds in a grid, with
  service lanes between them; a bund holds a single tank or a group (2-6) of about the same
  size, 10-60 px across, with fire-safety gaps; pipes run from each tank to a header, pipe
  racks and pump houses stand beside the site. Tanks are cut by the tile border at times.
* **Roofs** (:data:`ROOF_TYPES`, styles in :data:`ROOF_STYLES`): *floating* roofs (grey or
  white, a bright rim, pontoon ring, drain and rolling ladder, and the dark inner crescent that
  grows as the roof sinks); *fixed* roofs, domes or cones shaded by the sun; *dark* tanks
  (rusty, black, or open and empty).
* **Shadows**: every raised thing (tanks, buildings, racks, silos, trees, bund walls, cars)
  casts its shadow away from the sun, ``height / tan(elevation)`` long, bluish and soft.
* **Ground**: soil of the biome (arid sand, semi-arid, temperate grass and fields, grey
  industrial, red tropical), bright bare patches, patchy vegetation and trees, fields with crop
  rows, roads with cars, rectangular buildings with flat or gable roofs, sometimes the sea.
* **Distractors** (never labelled, listed in ``Tile.distractors``): round ponds, water-treatment
  clarifiers, centre-pivot fields, roundabouts, round buildings with flat roofs and silos, so
  that a model must learn more than "bright disc".
* **Sensor**: haze, optical blur, pan-sharpening (blurrier colour, sharpened brightness),
  colour casts, gamma, noise, 8-bit quantisation and JPEG at a random quality.

Everything is drawn from ``seed`` through separate random streams (layout, sun, ground,
clutter, sensor), so the same seed gives the same tile, and moving one knob of
:func:`make_tile` (``sun``, ``fill``, ``clutter``, ``biome``) leaves the rest in place.

Ground truth (nadir view): a tank's mask is its disc, the pixels whose centre lies inside the
circle of radius ``radius`` around ``(cx, cy)`` -- the roof's footprint seen from straight above.
Walls seen off-nadir are not modelled, and the ground shadow is not part of the tank. Tanks cut
by the border keep their visible part; those showing fewer than ``MIN_VISIBLE_AREA`` (10) pixels
are left out of every field. Each tank has class label 1 (``CLASSES[1]``, oil-storage-tank) and
the attributes of :class:`Tank`: roof type and style, fill level, centre, radius and height.

Geometry of one tank (used again for the fill-level estimate):
    a cylinder of radius ``r`` pixels and height ``h`` pixels; the sun is at azimuth ``az``
    (direction towards the sun, radians, image x to the right, y down) and elevation ``el``.
    * The ground shadow is the disc swept from the tank away from the sun by ``h / tan(el)``.
    * A floating roof lies ``d = (1 - fill) * h`` below the rim. A roof point ``p`` is lit iff
      ``p + (d / tan(el)) * u_sun`` still lies inside the rim circle, so the inner shadow is the
      part of the disc *not* covered by the disc shifted by ``-(d / tan(el)) * u_sun``: a crescent
      on the sun's side, whose width ``d / tan(el)`` tells how far the roof has sunk
      (:func:`crescent_width`, inverted by :func:`fill_from_crescent`).

Public API: :func:`make_tile`, :func:`make_scene`, :func:`make_dataset`, :func:`tile_seed`,
:func:`explore_generator`, :func:`draw_tile`, :func:`masks_to_boxes`, :class:`Tile`, :class:`Tank`, :class:`Sun`,
:class:`Distractor`, :func:`crescent_width`, :func:`fill_from_crescent`, constants
:data:`GENERATOR_VERSION`, :data:`ROOF_TYPES`, :data:`ROOF_STYLES`, :data:`CLASSES`,
:data:`BIOMES`, :data:`MIN_VISIBLE_AREA`, :data:`GSD`.
"""

from __future__ import annotations

import torch

from mrcnn_edu.oil_tanks.dataset import draw_tile, explore_generator, make_dataset, tile_seed
from mrcnn_edu.oil_tanks.generator import GENERATOR_VERSION, MIN_VISIBLE_AREA, Tile, make_scene, make_tile
from mrcnn_edu.oil_tanks.landscape import BIOMES, Distractor
from mrcnn_edu.oil_tanks.layout import GSD
from mrcnn_edu.oil_tanks.tanks import CLASSES, ROOF_STYLES, ROOF_TYPES, Sun, Tank, crescent_width, fill_from_crescent

__all__ = [
    "BIOMES", "CLASSES", "GENERATOR_VERSION", "GSD", "MIN_VISIBLE_AREA", "ROOF_STYLES", "ROOF_TYPES",
    "Distractor", "Sun", "Tank", "Tile", "crescent_width", "draw_tile", "explore_generator", "fill_from_crescent",
    "make_dataset", "make_scene", "make_tile", "masks_to_boxes", "tile_seed",
]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes (x1, y1, x2, y2) around binary masks UInt8[N, H, W] → Float[N, 4].

    x2 and y2 are exclusive pixel edges, so a single pixel at (x, y) gives (x, y, x + 1, y + 1).
    An empty mask gives the box (0, 0, 0, 0).
    """
    if masks.numel() == 0:
        return torch.zeros(masks.shape[0], 4)
    m = masks.bool()
    rows, cols = m.any(dim=2), m.any(dim=1)  # (N, H, W) -> (N, H) and (N, W)
    h, w = rows.shape[1], cols.shape[1]
    # first and last True index along each axis (argmax finds the first maximum)
    y1 = rows.int().argmax(dim=1)
    y2 = h - rows.flip(1).int().argmax(dim=1)
    x1 = cols.int().argmax(dim=1)
    x2 = w - cols.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # 4 × (N,) -> (N, 4)
    boxes[~rows.any(dim=1)] = 0.0
    return boxes
