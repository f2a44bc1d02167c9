"""Where things go: tank farms (sites of bunded groups), roads, buildings, distractors, fields, trees.

Taught in: ``09_case_study_oil_tanks.ipynb`` (the generator's internals).

Shape shorthand:
    H, W     canvas height and width in pixels
    Gh, Gw   the occupancy grid (one cell per 4 × 4 pixels, plus a margin around the canvas)

A *site* is a grid of rectangular bunds sharing one orientation; a bund holds 1-6 tanks (more
if asked) of about the same size in rows, with fire-safety gaps between them; lanes (roads) run
between the bunds, pipes run from every tank to a header along the lane, a pipe rack and a few
service buildings stand beside the site. Everything else is placed in the free space left by the
sites, checked on a coarse occupancy grid so that nothing lands on a tank: distractors never
overlap a tank's disc (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mrcnn_edu.oil_tanks import landscape as ls
from mrcnn_edu.oil_tanks.raster import Window, dist_segment, sdf_disc, sdf_rect
from mrcnn_edu.oil_tanks.tanks import ROOF_STYLES, ROOF_TYPES, Tank, TankLook, cast_tank_shadow, paint_tank

GSD = 1.2  # metres per pixel
HARD, ROAD = 1, 2  # occupancy layers: things nothing may overlap; roads


@dataclass
class Options:
    """The generator's knobs after validation (see ``make_tile``)."""

    radius_range: tuple = (5.0, 30.0)
    roof_weights: tuple = (0.55, 0.3, 0.15)
    group_size: tuple = (1, 6)
    fill: float | None = None
    clutter: float = 0.6
    distractors: bool = True


@dataclass
class TankElement(ls.Element):
    tank: Tank
    look: TankLook
    z = 20

    def cast(self, canvas, sun):
        cast_tank_shadow(canvas, self.tank, self.look, sun)

    def top(self, canvas, sun, tint):
        paint_tank(canvas, self.tank, self.look, sun, tint)


@dataclass
class Plan:
    palette: ls.Palette
    height: int = 0
    width: int = 0
    elements: list = field(default_factory=list)
    tanks: list = field(default_factory=list)  # [(Tank, TankLook)]
    distractors: list = field(default_factory=list)  # [Distractor]


class Occupancy:
    """A coarse grid (4 px cells) of what is taken, by layer bits, reaching beyond the canvas."""

    def __init__(self, height: int, width: int, cell: int = 4, margin: int = 160):
        self.cell, self.margin = cell, margin
        shape = (math.ceil((height + 2 * margin) / cell), math.ceil((width + 2 * margin) / cell))
        self.grid = np.zeros(shape, np.uint8)

    def _cells(self, x0, y0, x1, y1) -> Window | None:
        m, c = self.margin, self.cell
        c0, c1 = max(int((x0 + m) // c), 0), min(int((x1 + m) // c) + 1, self.grid.shape[1])
        r0, r1 = max(int((y0 + m) // c), 0), min(int((y1 + m) // c) + 1, self.grid.shape[0])
        if c0 >= c1 or r0 >= r1:
            return None
        yy = (np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5) * c - m
        xx = (np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5) * c - m
        return Window(slice(r0, r1), slice(c0, c1), yy, xx)

    def _region(self, shape, pad):
        kind, *p = shape
        if kind == "rect":
            cx, cy, hw, hh, angle = p
            reach = math.hypot(hw, hh) + pad + self.cell
            win = self._cells(cx - reach, cy - reach, cx + reach, cy + reach)
            return win, (None if win is None else sdf_rect(win, cx, cy, hw, hh, angle))
        if kind == "disc":
            cx, cy, r = p
            reach = r + pad + self.cell
            win = self._cells(cx - reach, cy - reach, cx + reach, cy + reach)
            return win, (None if win is None else sdf_disc(win, cx, cy, r))
        ax, ay, bx, by, r = p  # capsule
        reach = r + pad + self.cell
        win = self._cells(min(ax, bx) - reach, min(ay, by) - reach, max(ax, bx) + reach, max(ay, by) + reach)
        return win, (None if win is None else dist_segment(win, ax, ay, bx, by) - r)

    def free(self, shape, pad: float = 0.0, layers: int = HARD | ROAD) -> bool:
        win, sdf = self._region(shape, pad)
        if win is None:
            return True
        return not (self.grid[win.sy, win.sx][sdf <= pad + 0.75 * self.cell] & layers).any()

    def mark(self, shape, layer: int = HARD, pad: float = 0.0) -> None:
        win, sdf = self._region(shape, pad)
        if win is not None:
            cells = self.grid[win.sy, win.sx]
            cells[sdf <= pad + 0.5 * self.cell] |= layer

    def take(self, shape, pad: float = 0.0, layers: int = HARD | ROAD, layer: int = HARD) -> bool:
        """Mark ``shape`` if it is free; say whether it was."""
        if self.free(shape, pad, layers):
            self.mark(shape, layer)
            return True
        return False


def _rot(cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return lambda u, v: (cx + u * c - v * s, cy + u * s + v * c)


def _choice(rng, options, weights):
    w = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


# ---------------------------------------------------------------------------------------------
# Tanks and sites
# ---------------------------------------------------------------------------------------------

_GROUP_WEIGHTS = {1: 0.18, 2: 0.24, 3: 0.12, 4: 0.24, 5: 0.06, 6: 0.16}


def _tank_grid(rng, group_size) -> tuple[int, int, int]:
    """(rows, cols, n): how many tanks a bund holds and how they stand."""
    lo, hi = group_size
    ns = list(range(lo, hi + 1))
    n = int(_choice(rng, ns, [_GROUP_WEIGHTS.get(k, 0.05) for k in ns]))
    if n <= 3:
        rows = 1
    elif n == 4:
        rows = 2 if rng.random() < 0.8 else 1
    else:
        rows = 2 if n <= 8 else 3
    return rows, math.ceil(n / rows), n


def _tank_height(rng, radius: float) -> float:
    """Shell height in pixels: small tanks are slim, large ones squat (~8-22 m)."""
    diameter_m = 2 * radius * GSD
    height_m = float(np.clip((7.5 + 0.17 * diameter_m) * rng.uniform(0.85, 1.15), 6.0, 24.0))
    return height_m / GSD


def _tank_look(rng, roof: str, style: str) -> TankLook:
    if roof == "floating":
        grey = rng.uniform(0.8, 0.92) if style == "double_deck" else rng.uniform(0.6, 0.82)
        colour = np.clip(grey + rng.normal(0, 0.012, 3), 0, 1)
        return TankLook(tuple(colour), tuple(np.clip(rng.uniform(0.86, 0.97) + rng.normal(0, 0.01, 3), 0, 1)),
                        ladder=float(rng.uniform(0, 2 * math.pi)), detail=float(rng.uniform(0.3, 1.0)))
    if roof == "fixed":
        if rng.random() < 0.75:
            colour = rng.uniform(0.84, 0.96) + rng.normal(0, 0.01, 3)
        else:  # painted roofs: pale green, pale blue, beige, aluminium
            colour = np.array(_choice(rng, [[0.70, 0.78, 0.70], [0.72, 0.77, 0.82], [0.84, 0.80, 0.68],
                                            [0.70, 0.70, 0.70]], [1, 1, 1, 1])) * rng.uniform(0.92, 1.06)
        slope = rng.uniform(0.25, 0.55) if style == "dome" else rng.uniform(0.12, 0.3)
        return TankLook(tuple(np.clip(colour, 0, 1)), tuple(np.clip(colour * 0.97, 0, 1)), slope=float(slope))
    if style == "rusty":
        colour = np.array([0.46, 0.32, 0.22]) * rng.uniform(0.75, 1.15)
        return TankLook(tuple(colour), tuple(colour * 1.25), slope=0.12, texture=0.1)
    if style == "black":
        colour = np.array([0.13, 0.13, 0.14]) * rng.uniform(0.9, 1.7)
        return TankLook(tuple(colour), (0.5, 0.5, 0.5), slope=0.1, texture=0.06)
    floor = _choice(rng, [[0.27, 0.25, 0.22], [0.20, 0.24, 0.22], [0.34, 0.30, 0.26]], [2, 1, 1])  # open, empty
    return TankLook(tuple(np.array(floor) * rng.uniform(0.8, 1.25)), tuple([rng.uniform(0.65, 0.8)] * 3), texture=0.08)


def _make_tank(rng, x, y, radius, roof, style, opt: Options) -> tuple[Tank, TankLook]:
    height = _tank_height(rng, radius)
    if roof == "floating":
        fill = float(rng.uniform(0.05, 0.95)) if opt.fill is None else float(opt.fill)
    elif style == "open":
        fill = float(rng.uniform(0.0, 0.35))
    else:
        fill = 1.0
    tank = Tank(cx=float(x), cy=float(y), radius=float(radius), roof=roof, fill=fill, height=float(height), style=style)
    return tank, _tank_look(rng, roof, style)


def _pick_roof(rng, opt: Options, like: tuple | None = None) -> tuple[str, str]:
    """Roof type and style; ``like`` (a bund's own) is kept 70% of the time (marginals unchanged)."""
    if like is not None and rng.random() < 0.7:
        return like
    roof = _choice(rng, ROOF_TYPES, opt.roof_weights)
    styles = ROOF_STYLES[roof]
    style_weights = {"floating": [0.7, 0.3], "fixed": [0.5, 0.5], "dark": [0.35, 0.25, 0.4]}[roof]
    return roof, _choice(rng, styles, style_weights)


@dataclass
class _Site:
    """A planned site in its own frame (u along, v across), before it is placed."""

    bunds: list  # [(u, v, hw, hh)]: bund centres and half sizes (on the walls' centre lines)
    tanks: list  # [(u, v, radius, roof, style, bund index)]
    lane: float
    wall: float
    half_extent: tuple  # (EW, EH) of the whole site, walls included
    col_edges: list  # u of the lanes between bund columns
    row_edges: list  # v of the lanes between bund rows


def _plan_site(rng, n_bunds: int, opt: Options) -> _Site:
    """Bunds on a grid; each holds a group of tanks in rows. Half of the sites are uniform (one tank
    size), the others mix sizes and layouts bund by bund (columns and rows fit their largest bund)."""
    lo, hi = opt.radius_range
    radius = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # small tanks are more common
    mixed = rng.random() < 0.5
    layout = _tank_grid(rng, opt.group_size)
    wall = float(rng.uniform(3.0, 6.0))  # earthen berms are 4-8 m wide
    lane = float(rng.uniform(4.0, 10.0))
    if n_bunds <= 3 and rng.random() < 0.6:
        brows, bcols = 1, n_bunds
    else:
        bcols = math.ceil(math.sqrt(n_bunds))
        brows = math.ceil(n_bunds / bcols)
    if rng.random() < 0.5:
        brows, bcols = bcols, brows
    groups = []  # per bund: (radius, rows, cols, n, gap, hw, hh)
    for _ in range(n_bunds):
        r_b = float(np.clip(radius * math.exp(rng.normal(0, 0.4)), lo, hi)) if mixed else radius
        rows, cols, n = _tank_grid(rng, opt.group_size) if (mixed and rng.random() < 0.5) else layout
        gap = r_b * rng.uniform(0.35, 0.8) + 2.5
        margin = r_b * rng.uniform(0.3, 0.6) + 3.0
        hw = (cols * 2 * r_b + (cols - 1) * gap) / 2 + margin + wall / 2
        hh = (rows * 2 * r_b + (rows - 1) * gap) / 2 + margin + wall / 2
        groups.append((r_b, rows, cols, n, gap, hw, hh))
    col_w = [max(g[5] for k, g in enumerate(groups) if k % bcols == j) for j in range(bcols)]
    row_h = [max(g[6] for k, g in enumerate(groups) if k // bcols == i) for i in range(brows)]
    # bunds' walls are ``lane`` apart; (hw, hh) are measured to the walls' centre lines
    ew = sum(col_w) + (bcols - 1) * (lane + wall) / 2 + wall / 2
    eh = sum(row_h) + (brows - 1) * (lane + wall) / 2 + wall / 2
    col_u = np.cumsum([0.0] + [2 * c + lane + wall for c in col_w]) - ew + wall / 2  # each column's left wall
    row_v = np.cumsum([0.0] + [2 * r + lane + wall for r in row_h]) - eh + wall / 2
    bunds, tanks = [], []
    for b, (r_b, rows, cols, n, gap, hw, hh) in enumerate(groups):
        i, j = divmod(b, bcols)
        bu, bv = col_u[j] + col_w[j], row_v[i] + row_h[i]  # the bund is centred in its grid cell
        bunds.append((float(bu), float(bv), hw, hh))
        like = _pick_roof(rng, opt)
        slots = [(r, c) for r in range(rows) for c in range(cols)]
        if n < len(slots):
            drop = set(rng.choice(len(slots), size=len(slots) - n, replace=False).tolist())
            slots = [s for k, s in enumerate(slots) if k not in drop]
        pitch = 2 * r_b + gap
        for r, c in slots:
            roof, style = _pick_roof(rng, opt, like)
            tr = float(np.clip(r_b * rng.uniform(0.94, 1.04), lo, hi))
            tanks.append((bu + (c - (cols - 1) / 2) * pitch + rng.normal(0, 0.3),
                          bv + (r - (rows - 1) / 2) * pitch + rng.normal(0, 0.3), tr, roof, style, b))
    col_edges = [float(col_u[j] - lane / 2 - wall / 2) for j in range(1, bcols)]
    row_edges = [float(row_v[i] - lane / 2 - wall / 2) for i in range(1, brows)]
    return _Site(bunds, tanks, lane, wall, (ew, eh), col_edges, row_edges)


def _shows_a_tank(site: _Site, cx, cy, angle, h, w) -> bool:
    """Whether some tank of the site, placed at (cx, cy), has its centre inside the canvas."""
    to_xy = _rot(cx, cy, angle)
    for (u, v, *_rest) in site.tanks:
        x, y = to_xy(u, v)
        if 0 <= x < w and 0 <= y < h:
            return True
    return False


def _site_angle(rng) -> float:
    return 0.0 if rng.random() < 0.35 else float(rng.uniform(0, math.pi / 2))


def _place_site(plan: Plan, occ: Occupancy, rng, site: _Site, cx, cy, angle, opt: Options, clutter: float) -> bool:
    """Check the site's footprint, then add its bunds, tanks, lanes, pipes, rack and buildings."""
    pal = plan.palette
    ew, eh = site.half_extent
    perimeter = rng.random() < 0.35 + 0.5 * clutter
    p_width = float(rng.uniform(4.0, 7.0))
    outer = p_width + 3 if perimeter else 2.0
    footprint = ("rect", cx, cy, ew + outer, eh + outer, angle)
    if not occ.free(footprint, pad=2):
        return False
    occ.mark(footprint, HARD)
    to_xy = _rot(cx, cy, angle)
    if rng.random() < 0.75:  # the graded ground the site stands on
        grow = outer + rng.uniform(4, 30)
        pad = _choice(rng, [pal.gravel, pal.dirt, pal.concrete * 0.9, pal.soil_b], [3, 2, 1, 1])
        plan.elements.append(ls.Pad(cx, cy, ew + grow, eh + grow, angle, ls.jitter(rng, pad, 0.02)))
    floor = _choice(rng, [pal.gravel, pal.soil_a * 0.94, pal.concrete * 0.92, pal.veg * 1.35, pal.dirt],
                    [3, 2, 1, 1.5 if pal.biome in ("temperate", "tropical") else 0.3, 1.5])
    floor = ls.jitter(rng, floor, 0.02)
    wall = ls.jitter(rng, _choice(rng, [pal.dirt * 1.05, pal.concrete, pal.soil_b * 1.1], [3, 1.5, 1]), 0.02)
    for (bu, bv, hw, hh) in site.bunds:
        x, y = to_xy(bu, bv)
        plan.elements.append(ls.Bund(x, y, hw, hh, angle, site.wall, floor, wall, height=float(rng.uniform(1.0, 2.0))))
    for (tu, tv, tr, roof, style, _) in site.tanks:
        x, y = to_xy(tu, tv)
        tank, look = _make_tank(rng, x, y, tr, roof, style, opt)
        plan.tanks.append((tank, look))
        plan.elements.append(TankElement(tank, look))

    road_colour = ls.jitter(rng, _choice(rng, [pal.asphalt, pal.concrete * 0.95, pal.gravel * 1.05, pal.dirt],
                                          [2, 1, 2, 1.5]), 0.015)
    lane_w = max(2.5, site.lane - rng.uniform(0.5, 2.5))
    if rng.random() < 0.85:  # service lanes between the bunds
        for u in site.col_edges:
            plan.elements.append(ls.Road([to_xy(u, -eh), to_xy(u, eh)], lane_w, road_colour))
        for v in site.row_edges:
            plan.elements.append(ls.Road([to_xy(-ew, v), to_xy(ew, v)], lane_w, road_colour))
    if perimeter:
        o = site.wall / 2 + 1.0 + p_width / 2
        ring = [to_xy(-ew - o, -eh - o), to_xy(ew + o, -eh - o), to_xy(ew + o, eh + o), to_xy(-ew - o, eh + o)]
        plan.elements.append(ls.Road(ring + [ring[0]], p_width, road_colour))
    if rng.random() < 0.3 + 0.6 * clutter:  # pipes: tank -> bund wall -> header along the lane
        colour = ls.jitter(rng, _choice(rng, [[.78, .78, .76], [.32, .32, .33], [.62, .6, .55]], [2, 1, 1]), 0.02)
        width = float(rng.uniform(0.7, 1.4))
        side = 1 if rng.random() < 0.5 else -1
        for (tu, tv, tr, *_rest, b) in site.tanks:
            bu, bv, hw, hh = site.bunds[b]
            wall_v = bv + side * (hh + site.wall / 2 + 1.2)
            plan.elements.append(ls.Pipe([to_xy(tu, tv + side * tr), to_xy(tu, wall_v)], width, colour))
        for (bu, bv, hw, hh) in site.bunds:
            wall_v = bv + side * (hh + site.wall / 2 + 1.2)
            plan.elements.append(ls.Pipe([to_xy(bu - hw, wall_v), to_xy(bu + hw, wall_v)], width, colour))
    if rng.random() < 0.15 + 0.5 * clutter:  # a pipe rack along one end of the site
        end = 1 if rng.random() < 0.5 else -1
        u = end * (ew + outer + rng.uniform(3, 8))
        extra = rng.uniform(0, 120)
        a, b = to_xy(u, -eh - outer - extra * rng.random()), to_xy(u, eh + outer + extra * rng.random())
        width = float(rng.uniform(4.0, 7.0))
        if occ.take(("capsule", *a, *b, width / 2 + 1)):
            pipes = [ls.jitter(rng, _choice(rng, [[.8, .8, .78], [.4, .4, .42], [.65, .6, .5]], [3, 1, 1]), 0.03)
                     for _ in range(int(rng.integers(2, 5)))]
            plan.elements.append(ls.PipeRack(*a, *b, width, float(rng.uniform(4, 7) / GSD), pipes,
                                             ls.jitter(rng, [0.5, 0.5, 0.5])))
    for _ in range(int(rng.poisson(0.5 + 2.0 * clutter))):  # pump houses, control rooms, loading bays
        bw, bh = rng.uniform(3, 14), rng.uniform(3, 9)
        u = rng.uniform(-ew, ew)
        v = (eh + outer + bh + rng.uniform(2, 10)) * (1 if rng.random() < 0.5 else -1)
        x, y = to_xy(u, v)
        _try_building(plan, occ, rng, x, y, bw, bh, angle)
    return True


# ---------------------------------------------------------------------------------------------
# Everything else
# ---------------------------------------------------------------------------------------------


def _roof_colour(rng, pal: ls.Palette) -> np.ndarray:
    options = [[0.86, 0.86, 0.84], [0.70, 0.70, 0.69], [0.42, 0.42, 0.43], [0.40, 0.48, 0.60],
               [0.62, 0.38, 0.32], [0.74, 0.67, 0.55], [0.42, 0.52, 0.45], pal.concrete]
    return ls.jitter(rng, _choice(rng, options, [3, 3, 2, 1, 1.2, 1.5, 0.6, 2]), 0.03)


def _try_building(plan, occ, rng, x, y, hw, hh, angle) -> bool:
    if not occ.take(("rect", x, y, hw, hh, angle), pad=2):
        return False
    units = []
    if hw * hh > 60 and rng.random() < 0.6:
        for _ in range(int(rng.integers(1, 5))):
            units.append((rng.uniform(-hw + 2, hw - 2), rng.uniform(-hh + 2, hh - 2), rng.uniform(0.6, 1.6)))
    kind = "gable" if (hw * hh < 150 and rng.random() < 0.35) else "flat"
    plan.elements.append(ls.Building(x, y, hw, hh, angle, float(rng.uniform(3.0, 12.0) / GSD),
                                     _roof_colour(rng, plan.palette), kind, units))
    return True


def _road_colour(rng, pal):
    kind = _choice(rng, ["asphalt", "concrete", "dirt"], [6, 2, 2])
    colour = {"asphalt": pal.asphalt, "concrete": pal.concrete * 0.92, "dirt": pal.dirt}[kind]
    shoulder = pal.dirt * 0.95 if (kind != "dirt" and rng.random() < 0.5) else None
    return ls.jitter(rng, colour, 0.015), shoulder


def _add_road(plan, occ, rng, h, w, angles, tries=12) -> list | None:
    """A straight road across the canvas (sometimes with one bend) that misses every site."""
    for _ in range(tries):
        angle = float(_choice(rng, angles, [1] * len(angles)) if rng.random() < 0.75 else rng.uniform(0, math.pi))
        d = np.array([math.cos(angle), math.sin(angle)])
        n = np.array([-d[1], d[0]])
        centre = np.array([w / 2, h / 2]) + n * rng.uniform(-0.5, 0.5) * math.hypot(w, h) * 0.8
        span = math.hypot(w, h)
        pts = [tuple(centre - d * span), tuple(centre + d * span)]
        if rng.random() < 0.3:  # a bend somewhere along it
            mid = centre + d * rng.uniform(-0.3, 0.3) * span
            turn = rng.uniform(-0.5, 0.5)
            d2 = np.array([math.cos(angle + turn), math.sin(angle + turn)])
            pts = [pts[0], tuple(mid), tuple(mid + d2 * span)]
        width = float(rng.uniform(4.0, 9.0))
        capsules = [("capsule", *a, *b, width / 2 + 1) for a, b in zip(pts[:-1], pts[1:])]
        if all(occ.free(c, pad=2, layers=HARD) for c in capsules):
            for c in capsules:
                occ.mark(c, ROAD)
            colour, shoulder = _road_colour(rng, plan.palette)
            plan.elements.append(ls.Road(pts, width, colour, shoulder))
            return [pts, width]
    return None


def _point_on_road(rng, road, h, w, margin=0.1):
    """A random point (x, y) of ``road`` inside the canvas (away from its border), and the road's
    direction there; None if the road hardly crosses the canvas."""
    pts, _ = road
    for _ in range(20):
        k = int(rng.integers(len(pts) - 1))
        (ax, ay), (bx, by) = pts[k], pts[k + 1]
        t = rng.random()
        x, y = ax + t * (bx - ax), ay + t * (by - ay)
        if margin * w <= x <= (1 - margin) * w and margin * h <= y <= (1 - margin) * h:
            return x, y, math.atan2(by - ay, bx - ax)
    return None


def _add_vehicles(plan, rng, road, clutter):
    pts, width = road
    for a, b in zip(pts[:-1], pts[1:]):
        length = math.hypot(b[0] - a[0], b[1] - a[1])
        angle = math.atan2(b[1] - a[1], b[0] - a[0])
        for _ in range(int(rng.poisson(length / 90 * clutter))):
            t = rng.random()
            off = rng.uniform(-0.25, 0.25) * width
            x = a[0] + t * (b[0] - a[0]) - off * math.sin(angle)
            y = a[1] + t * (b[1] - a[1]) + off * math.cos(angle)
            if not (-10 < x < plan.width + 10 and -10 < y < plan.height + 10):
                continue
            truck = rng.random() < 0.25
            colour = _choice(rng, [[0.92, 0.92, 0.92], [0.15, 0.15, 0.16], [0.6, 0.6, 0.62], [0.6, 0.15, 0.12],
                                   [0.2, 0.3, 0.55]], [4, 2, 2, 1, 1])
            plan.elements.append(ls.Vehicle(x, y, (5.0 if truck else 2.0), (1.1 if truck else 0.8), angle,
                                            np.array(colour, np.float32)))


def _add_distractor(plan, occ, rng, h, w, kind, roads, near=None, at=None) -> bool:
    """Place one distractor of ``kind``: anywhere, within ~``near[2]`` px of ``near[:2]``, or ``at``
    (x, y, radius) for circular fields."""
    pal = plan.palette

    def where(r, inside=0.0):
        if near is not None:
            return near[0] + rng.uniform(-1, 1) * near[2], near[1] + rng.uniform(-1, 1) * near[2]
        return rng.uniform(-inside * r, w + inside * r), rng.uniform(-inside * r, h + inside * r)

    if kind == "pond":
        r = float(np.exp(rng.uniform(math.log(6), math.log(45))))
        x, y = where(r, 0.5)
        bank = float(rng.uniform(1.5, 4.0))
        if not occ.take(("disc", x, y, r + bank), pad=3):
            return False
        water = _choice(rng, [[.10, .15, .18], [.18, .26, .22], [.30, .30, .24], [.14, .22, .26]], [3, 2, 1, 2])
        bank_c = _choice(rng, [pal.dirt, pal.veg * 1.2, pal.concrete], [2, 2, 1])
        plan.elements.append(ls.Pond(x, y, r, ls.jitter(rng, water, 0.02), ls.jitter(rng, bank_c, 0.02), bank))
        plan.distractors.append(ls.Distractor("pond", x, y, r + bank))
    elif kind == "clarifier":
        r0 = float(rng.uniform(8, 24))
        x0, y0 = where(r0, 0.3)
        n = int(rng.integers(1, 5))
        angle = rng.uniform(0, 2 * math.pi)
        placed = False
        for i in range(n):
            x, y = x0 + i * (2 * r0 + 8) * math.cos(angle), y0 + i * (2 * r0 + 8) * math.sin(angle)
            if not occ.take(("disc", x, y, r0 + 2), pad=3):
                break
            water = _choice(rng, [[0.22, 0.26, 0.24], [0.16, 0.20, 0.20], [0.30, 0.32, 0.28]], [2, 2, 1])
            plan.elements.append(ls.Clarifier(x, y, r0, ls.jitter(rng, water, 0.02), ls.jitter(rng, pal.concrete),
                                              float(rng.uniform(0, 2 * math.pi))))
            plan.distractors.append(ls.Distractor("clarifier", x, y, r0 + 2))
            placed = True
        return placed
    elif kind == "circular_field":
        x, y, r = at if at is not None else (*where(250, 0.6), float(rng.uniform(50, 250)))
        if not occ.take(("disc", x, y, r), pad=4, layers=HARD):
            return False
        crops = [[0.30, 0.42, 0.22], [0.42, 0.50, 0.30], [0.52, 0.45, 0.34], [0.68, 0.62, 0.44], [0.24, 0.34, 0.18]]
        c1 = ls.jitter(rng, _choice(rng, crops, [3, 2, 2, 1, 2]))
        c2 = ls.jitter(rng, _choice(rng, crops, [1, 1, 2, 2, 1])) if rng.random() < 0.4 else c1
        plan.elements.append(ls.Pivot(x, y, r, c1, c2, (float(rng.uniform(0, 6.3)), float(rng.uniform(0.5, 3.5))),
                                      float(rng.uniform(8, 14)), float(rng.uniform(0, 2 * math.pi))))
        plan.distractors.append(ls.Distractor("circular_field", x, y, r))
    elif kind == "roundabout":
        if not roads:
            return False
        road = roads[int(rng.integers(len(roads)))]
        width = road[1]
        spot = _point_on_road(rng, road, plan.height, plan.width, 0.0)
        if spot is None:
            return False
        x, y, along = spot
        if near is not None and math.hypot(x - near[0], y - near[1]) > 2 * near[2]:
            return False
        r_in = float(rng.uniform(5, 22))
        ring = float(rng.uniform(4.5, 8))
        if not occ.free(("disc", x, y, r_in + ring), pad=3, layers=HARD):
            return False
        occ.mark(("disc", x, y, r_in + ring), HARD)
        angle = along + math.pi / 2 + rng.normal(0, 0.2)
        if rng.random() < 0.5:
            angle += math.pi
        start = (x + (r_in + ring + 2) * math.cos(angle), y + (r_in + ring + 2) * math.sin(angle))
        length = rng.uniform(60, 300)
        end = (x + length * math.cos(angle), y + length * math.sin(angle))
        if occ.free(("capsule", *start, *end, width / 2 + 1), pad=2, layers=HARD):  # a side road
            occ.mark(("capsule", *start, *end, width / 2 + 1), ROAD)
            plan.elements.append(ls.Road([(x, y), end], width, _road_colour(rng, pal)[0]))
        island = _choice(rng, [pal.veg * 1.3, pal.dirt, pal.soil_a], [3, 1, 1])
        plan.elements.append(ls.Roundabout(x, y, r_in, ring, ls.jitter(rng, pal.asphalt, 0.01),
                                           ls.jitter(rng, island)))
        plan.distractors.append(ls.Distractor("roundabout", x, y, r_in + ring))
    elif kind == "round_building":
        r = float(np.exp(rng.uniform(math.log(5), math.log(24))))
        x, y = where(r, 0.3)
        if not occ.take(("disc", x, y, r), pad=3):
            return False
        roof = _choice(rng, [[.80, .80, .78], [.60, .60, .60], [.45, .45, .46], pal.concrete, [.66, .55, .45]],
                       [2, 2, 1, 2, 1])
        plan.elements.append(ls.RoundBuilding(x, y, r, float(rng.uniform(2.5, 8) / GSD), ls.jitter(rng, roof),
                                              bool(rng.random() < 0.4)))
        plan.distractors.append(ls.Distractor("round_building", x, y, r))
    elif kind == "silo":
        r = float(rng.uniform(2.5, 7))
        x0, y0 = where(r, 0.2)
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 6))
        angle = float(rng.uniform(0, math.pi))
        to_xy = _rot(x0, y0, angle)
        height = float(rng.uniform(15, 35) / GSD)
        colour = ls.jitter(rng, _choice(rng, [[0.74, 0.74, 0.72], [0.78, 0.79, 0.81], [0.62, 0.60, 0.56]], [2, 2, 1]))
        spots = [to_xy(c * 2 * r, rr * 2 * r) for rr in range(rows) for c in range(cols)]
        centre = to_xy((cols - 1) * r, (rows - 1) * r)
        if not occ.take(("rect", *centre, cols * r + 1, rows * r + 1, angle), pad=3):
            return False
        for (x, y) in spots:
            plan.elements.append(ls.Silo(x, y, r, height, colour))
            plan.distractors.append(ls.Distractor("silo", x, y, r))
    return True


def _add_fields(plan, occ, rng, zone, angle, density=0.85):
    """Cultivated parcels filling ``zone`` = (cx, cy, hw, hh) in a frame rotated by ``angle``: a grid of
    blocks, each cut into 1-3 strips, with tracks between them; a few crops per farming area."""
    pal = plan.palette
    zx, zy, zw, zh = zone
    crops = [[0.34, 0.42, 0.26], [0.46, 0.50, 0.34], [0.50, 0.44, 0.36], [0.66, 0.60, 0.46], [0.40, 0.35, 0.29],
             list(pal.soil_a * 0.95)]
    crops = [crops[k] for k in rng.choice(len(crops), size=3, replace=False)]  # what grows here
    pw, ph = rng.uniform(60, 180), rng.uniform(70, 220)
    to_xy = _rot(zx, zy, angle)
    for i in range(int(2 * zh // ph) + 1):
        for j in range(int(2 * zw // pw) + 1):
            if rng.random() > density:
                continue
            cuts = np.cumsum(rng.dirichlet(np.ones(int(_choice(rng, [1, 2, 3], [2, 2, 1]))) * 3)) * pw
            left = 0.0
            for right in cuts:  # strips across the block
                fw, fh = (right - left) / 2 - rng.uniform(0.7, 2), ph / 2 - rng.uniform(1, 3)
                x, y = to_xy(-zw + j * pw + (left + right) / 2, -zh + (i + 0.5) * ph)
                left = right
                if fw < 4 or not occ.free(("rect", x, y, fw, fh, angle), pad=3, layers=HARD):
                    continue
                colour = ls.jitter(rng, crops[int(rng.integers(3))], 0.015, (0.88, 1.1))
                stripes = float(rng.uniform(2.5, 7)) if rng.random() < 0.6 else 0.0
                plan.elements.append(ls.Field(x, y, fw, fh, angle, colour, stripes, float(rng.uniform(0.02, 0.06)),
                                              ls.jitter(rng, pal.dirt) if rng.random() < 0.5 else None))


def _add_pivots(plan, occ, rng, zone, angle):
    """Centre-pivot fields on a lattice filling ``zone`` (arid farming)."""
    zx, zy, zw, zh = zone
    r = float(rng.uniform(60, 200))
    pitch = 2 * r + rng.uniform(4, 30)
    to_xy = _rot(zx, zy, angle)
    for i in range(int(2 * zh // pitch) + 1):
        for j in range(int(2 * zw // pitch) + 1):
            if rng.random() < 0.8:
                x, y = to_xy(-zw + (j + 0.5) * pitch, -zh + (i + 0.5) * pitch)
                _add_distractor(plan, occ, rng, 0, 0, "circular_field", [], at=(x, y, r * rng.uniform(0.9, 1.0)))


def _add_town(plan, occ, rng, cx, cy, angle, radius, clutter):
    """A settlement: a street grid with buildings in its blocks and trees here and there."""
    pal = plan.palette
    block = float(rng.uniform(40, 75))
    k_max = max(1, int(radius // block))
    radius = k_max * block  # streets end at the last block
    to_xy = _rot(cx, cy, angle)
    width = float(rng.uniform(3.0, 5.0))
    colour, _ = _road_colour(rng, pal)
    for k in range(-k_max, k_max + 1):
        for street in ([to_xy(-radius, k * block), to_xy(radius, k * block)],
                       [to_xy(k * block, -radius), to_xy(k * block, radius)]):
            capsule = ("capsule", *street[0], *street[1], width / 2 + 1)
            if occ.free(capsule, pad=1, layers=HARD):
                occ.mark(capsule, ROAD)
                plan.elements.append(ls.Road(street, width, colour))
    for i in range(-k_max, k_max):
        for j in range(-k_max, k_max):
            bu, bv = (j + 0.5) * block, (i + 0.5) * block
            if rng.random() > 0.8 + 0.2 * clutter:
                continue
            lot = (block - width - 8) / 2  # 2 x 2 lots per block, one building each (mostly)
            for du in (-0.5, 0.5):
                for dv in (-0.5, 0.5):
                    if rng.random() < 0.9:
                        hw, hh = lot / 2 * rng.uniform(0.5, 0.95), lot / 2 * rng.uniform(0.5, 0.95)
                        _try_building(plan, occ, rng, *to_xy(bu + du * lot, bv + dv * lot), hw, hh, angle)
    _add_trees(plan, occ, rng, 0, 0, int(radius / 8), around=(cx, cy, radius))


def _add_cluster(plan, occ, rng, cx, cy, angle, radius, n, big=8.0):
    """``n`` buildings aligned with ``angle`` around (cx, cy): a compound, a yard, an industrial block."""
    to_xy = _rot(cx, cy, angle)
    for _ in range(n):
        hw = float(np.exp(rng.uniform(math.log(3), math.log(big + 3))))
        hh = float(rng.uniform(3, min(hw, 14) + 1))
        if rng.random() < 0.5:
            hw, hh = hh, hw
        u, v = rng.uniform(-radius, radius), rng.uniform(-radius, radius)
        _try_building(plan, occ, rng, *to_xy(u, v), hw, hh, angle)


def _add_trees(plan, occ, rng, h, w, count, around=None):
    pal = plan.palette
    for _ in range(count // 6 + 1):  # groves and hedgerows of about six trees
        if around is None:
            x, y = rng.uniform(0, w), rng.uniform(0, h)
        else:
            x, y = around[0] + rng.uniform(-1, 1) * around[2], around[1] + rng.uniform(-1, 1) * around[2]
        row = rng.random() < 0.4
        angle = rng.uniform(0, math.pi)
        for k in range(int(rng.integers(2, 11))):
            if row:
                tx, ty = x + k * 6 * math.cos(angle), y + k * 6 * math.sin(angle)
            else:
                tx, ty = x + rng.normal(0, 8), y + rng.normal(0, 8)
            r = float(rng.uniform(1.5, 4.0))
            if occ.free(("disc", tx, ty, r), pad=1):
                plan.elements.append(ls.Tree(tx, ty, r, float(rng.uniform(5, 15) / GSD),
                                             ls.jitter(rng, pal.veg * rng.uniform(0.7, 1.05), 0.02)))


def _add_sea(plan, occ, rng, h, w):
    """Open water along one side of the canvas (ports: many tank farms stand on the coast), kept
    clear of whatever is already placed; skipped when too little of the canvas would be sea."""
    angle = rng.uniform(0, 2 * math.pi)
    n = np.array([math.cos(angle), math.sin(angle)])
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64) @ n
    offset = float(corners.max() - rng.uniform(0.12, 0.35) * (corners.max() - corners.min()))
    m, c = occ.margin, occ.cell
    yy = (np.arange(occ.grid.shape[0])[:, None] + 0.5) * c - m
    xx = (np.arange(occ.grid.shape[1])[None, :] + 0.5) * c - m
    along = xx * n[0] + yy * n[1]  # (Gh, Gw): how far each cell lies towards the sea
    taken = (occ.grid & HARD) > 0
    if taken.any():
        offset = max(offset, float(along[taken].max()) + 12.0)
    if corners.max() - offset < 0.08 * (corners.max() - corners.min()):
        return
    plan.elements.append(ls.Sea(float(n[0]), float(n[1]), offset,
                                ls.jitter(rng, [0.10, 0.16, 0.21], 0.02), ls.jitter(rng, plan.palette.concrete)))
    occ.grid[along > offset - 4] |= HARD


def plan_canvas(h: int, w: int, rngs: dict, opt: Options, farms: list, scene: bool, biome: str) -> Plan:
    """Plan a tile (``scene=False``: the sites near the middle) or a scene (farms spread out).

    ``farms`` lists, per farm, the numbers of bunds of its sites, e.g. ``[[3], [2, 4]]``.
    """
    rng_layout, rng_clutter = rngs["layout"], rngs["clutter"]
    pal = ls.make_palette(rngs["ground"], biome)
    plan = Plan(pal, h, w)
    occ = Occupancy(h, w)
    clutter = opt.clutter
    area = h * w / 256**2  # in 256 x 256 tiles
    coast = biome in ("industrial", "tropical", "temperate") and clutter > 0 and \
        rng_clutter.random() < (0.25 if scene else 0.12)
    if coast and scene:  # a scene's roads and farms keep off the sea; a tile's sea keeps off its farm
        _add_sea(plan, occ, rng_clutter, h, w)
    roads: list = []
    angles = []
    if scene and clutter > 0:  # main roads first: farms are placed along them
        base = _site_angle(rng_layout)
        angles = [base, base + math.pi / 2]
        for _ in range(int(rng_clutter.integers(2, 5))):
            road = _add_road(plan, occ, rng_clutter, h, w, angles)
            if road:
                roads.append(road)
    farm_spots = []  # (cx, cy, half extent, angle) of every placed site
    for farm in farms:
        angle = _site_angle(rng_layout) if not (scene and angles and rng_layout.random() < 0.6) else angles[0]
        angles.append(angle)
        anchor = None
        for n_bunds in farm:
            n = n_bunds
            while n > 0:
                site = _plan_site(rng_layout, n, opt)
                placed = False
                for _ in range(25):
                    cx, cy = _site_centre(rng_layout, site, angle, h, w, scene, anchor)
                    if not (scene or _shows_a_tank(site, cx, cy, angle, h, w)):
                        continue  # a tile asked for tanks: some must show, not only lanes and walls
                    if _place_site(plan, occ, rng_layout, site, cx, cy, angle, opt, clutter):
                        placed = True
                        break
                if placed:
                    anchor = (cx, cy, site)
                    farm_spots.append((cx, cy, max(site.half_extent), angle))
                    break
                n -= 1  # does not fit: try a smaller site
    if coast and not scene:
        _add_sea(plan, occ, rng_clutter, h, w)
    if not scene and clutter > 0:
        for _ in range(int(rng_clutter.poisson((0.5 + 1.0 * clutter) * math.sqrt(area)))):
            road = _add_road(plan, occ, rng_clutter, h, w, angles or [0.0, math.pi / 2])
            if road:
                roads.append(road)
    for road in roads:
        _add_vehicles(plan, rng_clutter, road, clutter)
    if clutter > 0:
        if scene:
            _plan_scene_land(plan, occ, rng_clutter, h, w, farm_spots, roads, angles, opt, clutter)
        else:
            _plan_tile_land(plan, occ, rng_clutter, h, w, roads, angles, opt, clutter, area)
    return plan


def _pick_angle(rng, angles):
    if angles and rng.random() < 0.75:
        return float(angles[int(rng.integers(len(angles)))])
    return float(rng.uniform(0, math.pi))


def _plan_tile_land(plan, occ, rng, h, w, roads, angles, opt: Options, clutter, area):
    """A tile is a window on a larger world: a compound or two, a few round things, maybe the edge of
    a farming area, trees."""
    use = plan.palette.use
    for _ in range(int(rng.poisson(1.2 * clutter * use["buildings"] * area))):  # building compounds
        angle = _pick_angle(rng, angles)
        road = roads[int(rng.integers(len(roads)))] if roads and rng.random() < 0.6 else None
        spot = _point_on_road(rng, road, h, w, 0.0) if road else None
        if spot is not None:  # beside a road
            x, y, angle = spot
            side = (road[1] / 2 + rng.uniform(15, 40)) * (1 if rng.random() < 0.5 else -1)
            cx, cy = x - side * math.sin(angle), y + side * math.cos(angle)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        _add_cluster(plan, occ, rng, cx, cy, angle, rng.uniform(15, 45), int(rng.integers(1, 7)))
    if opt.distractors:
        kinds = ["pond", "clarifier", "circular_field", "roundabout", "round_building", "silo"]
        weights = [0.22 * use["ponds"], 0.12, 0.14 * use["pivots"], 0.14, 0.22, 0.14]
        for _ in range(int(rng.poisson((0.6 + 1.6 * clutter) * area))):
            kind = _choice(rng, kinds, weights)
            for _ in range(6):  # free space is scarce in a tile with a farm
                if _add_distractor(plan, occ, rng, h, w, kind, roads):
                    break
    if rng.random() < use["fields"] * 0.6:  # the edge of a farming area
        angle = _pick_angle(rng, angles)
        zw, zh = rng.uniform(0.3, 1.0) * w, rng.uniform(0.3, 1.0) * h
        _add_fields(plan, occ, rng, (rng.uniform(0, w), rng.uniform(0, h), zw, zh), angle)
    _add_trees(plan, occ, rng, h, w, int(rng.poisson(22 * use["trees"] * (0.2 + 0.8 * clutter) * area)))


def _plan_scene_land(plan, occ, rng, h, w, farm_spots, roads, angles, opt: Options, clutter):
    """A scene's land use in zones: industry around the farms, towns along the roads, farming areas,
    water treatment, scattered ponds and trees."""
    use = plan.palette.use
    area = h * w / 2560**2  # in Airbus scenes
    for (cx, cy, extent, angle) in farm_spots:  # the farms' industrial surroundings
        _add_cluster(plan, occ, rng, cx, cy, angle, extent + rng.uniform(60, 200),
                     int(rng.poisson(10 * clutter * use["buildings"])), big=30.0)
        for _ in range(int(rng.poisson(1.5 * clutter))):
            if opt.distractors:
                kind = _choice(rng, ["round_building", "silo", "clarifier", "pond"], [3, 2, 1, 1])
                _add_distractor(plan, occ, rng, h, w, kind, roads, near=(cx, cy, extent + 200))
    for _ in range(int(rng.poisson(2.0 * area * (0.3 + clutter)))):  # towns along the roads
        spot = _point_on_road(rng, roads[int(rng.integers(len(roads)))], h, w) if roads else None
        if spot is not None:
            x, y, angle = spot
            side = rng.uniform(-150, 150)
            cx, cy = x - side * math.sin(angle), y + side * math.cos(angle)
        else:
            cx, cy, angle = rng.uniform(0, w), rng.uniform(0, h), _pick_angle(rng, angles)
        radius = float(rng.uniform(100, 300) * math.sqrt(use["buildings"]))
        _add_town(plan, occ, rng, cx, cy, angle, radius, clutter)
        if opt.distractors:
            odds = [("clarifier", 0.5), ("pond", 0.6), ("round_building", 0.7), ("silo", 0.3), ("roundabout", 0.6)]
            for kind, p in odds:
                if rng.random() < p:
                    _add_distractor(plan, occ, rng, h, w, kind, roads, near=(cx, cy, radius + 120))
    for _ in range(int(rng.poisson(area * (1 + 3 * use["fields"])))):  # farming areas
        angle = _pick_angle(rng, angles)
        zone = (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(150, 600), rng.uniform(150, 600))
        if opt.distractors and rng.random() < use["pivots"] / (use["pivots"] + use["fields"]):
            _add_pivots(plan, occ, rng, zone, angle)
        else:
            _add_fields(plan, occ, rng, zone, angle)
    if opt.distractors:  # scattered ponds, round buildings, roundabouts
        for kind, n in [("pond", 4 * use["ponds"]), ("round_building", 2), ("roundabout", 2), ("silo", 1)]:
            for _ in range(int(rng.poisson(n * area * clutter))):
                _add_distractor(plan, occ, rng, h, w, kind, roads)
    for road in roads:  # trees along the roads
        spot = _point_on_road(rng, road, h, w, 0.0)
        if spot is not None and rng.random() < 0.5 * use["trees"]:
            _add_trees(plan, occ, rng, h, w, 30, around=(spot[0], spot[1], 150))
    _add_trees(plan, occ, rng, h, w, int(rng.poisson(300 * use["trees"] * (0.2 + 0.8 * clutter) * area)))


def _site_centre(rng, site: _Site, angle, h, w, scene, anchor):
    """Where to try a site: near the tile's middle (cut by the border at times), anywhere in a scene,
    or right next to the previous site of the same farm."""
    ew, eh = site.half_extent
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    ex, ey = ew * c + eh * s, ew * s + eh * c  # half extent of the rotated site along x and y
    if anchor is not None:
        ax, ay, prev = anchor
        pew, peh = prev.half_extent
        gap = rng.uniform(12, 40)
        along = rng.random() < 0.5
        sign = 1 if rng.random() < 0.5 else -1
        du, dv = (sign * (pew + ew + gap), rng.uniform(-0.3, 0.3) * peh) if along else \
            (rng.uniform(-0.3, 0.3) * pew, sign * (peh + eh + gap))
        return _rot(ax, ay, angle)(du, dv)
    if scene:  # anywhere, but mostly inside the scene (a scene smaller than the site: its middle)
        x_lo, x_hi = 0.1 * w + ex * 0.5, 0.9 * w - ex * 0.5
        y_lo, y_hi = 0.1 * h + ey * 0.5, 0.9 * h - ey * 0.5
        x = rng.uniform(x_lo, x_hi) if x_lo < x_hi else w / 2 + rng.uniform(-0.2, 0.2) * w
        y = rng.uniform(y_lo, y_hi) if y_lo < y_hi else h / 2 + rng.uniform(-0.2, 0.2) * h
        return x, y

    def coord(extent, size):
        lo, hi = min(0.75 * extent, size / 2), max(size - 0.75 * extent, size / 2)
        jitter = rng.uniform(-0.2, 0.2) * size if extent > size / 2 else 0.0
        return rng.uniform(lo, hi) + jitter

    return coord(ex, w), coord(ey, h)
