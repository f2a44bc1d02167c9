"""Pictures for the course: the pipeline map, images with boxes and masks, feature maps.

Taught in: ``00_course_map.ipynb`` (the pipeline figure) and used by every stage notebook.

Shape shorthand:
    C, H, W   channels, height, width of one image or feature map
    K         number of boxes; boxes are (x1, y1, x2, y2) in pixels

Every function draws into a matplotlib ``Axes`` it is given (or a new one) and returns the
``Figure``/``Axes``, so notebooks, widgets and tests all call the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle


# --------------------------------------------------------------------------------------------
# The pipeline map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    key: str
    notebook: str
    title: str
    detail: str
    xy: tuple[float, float]  # centre of the box in figure units


# Positions on a 17.8 x 6 canvas: the top row is the proposal path, the bottom row the heads.
_TOP, _BOTTOM = 4.5, 1.6
STAGES: tuple[Stage, ...] = (
    Stage("image", "", "Image", "3×H×W in [0, 1]", (1.4, _TOP)),
    Stage("backbone", "01", "Backbone + FPN", "ResNet → p2…p6\nstrides 4…64", (5.2, _TOP)),
    Stage("rpn", "02", "Anchors + RPN", "objectness and\nbox deltas per anchor", (9.0, _TOP)),
    Stage("nms", "03", "NMS", "~1000 proposals\nper image", (12.8, _TOP)),
    Stage("roi", "04", "RoIAlign", "each box → 7×7\n(14×14 for masks)", (5.2, _BOTTOM)),
    Stage("box_head", "05", "Box head", "class scores,\nrefined boxes", (9.0, _BOTTOM)),
    Stage("mask_head", "06", "Mask head", "28×28 mask\nper detection", (12.8, _BOTTOM)),
    Stage("output", "", "Detections", "boxes, labels,\nscores, masks", (16.4, _BOTTOM)),
)

SIDE_STAGES: tuple[Stage, ...] = (
    Stage("training", "07", "Training", "five losses, one model", (16.4, 5.35)),
    Stage("evaluation", "08", "Evaluation", "COCO AP, boxes & masks", (16.4, 4.45)),
    Stage("case_study", "09", "Case study", "oil tanks from space", (16.4, 3.55)),
)

_ALIASES = {s.notebook: s.key for s in STAGES + SIDE_STAGES if s.notebook}
_ALIASES.update({str(int(k)): v for k, v in list(_ALIASES.items())})

HIGHLIGHT = "#f28e2b"
NEUTRAL = "#dfe8f2"
NEUTRAL_EDGE = "#6b7f99"


def _stage_keys(highlight) -> set[str]:
    if highlight is None:
        return set()
    items = [highlight] if isinstance(highlight, (str, int)) else list(highlight)
    keys = set()
    valid = {s.key for s in STAGES + SIDE_STAGES}
    for item in items:
        key = _ALIASES.get(str(item), str(item))
        if key not in valid:
            raise ValueError(
                f"highlight: unknown stage {item!r}; expected a notebook number 1-9 or one of "
                f"{sorted(valid)}"
            )
        keys.add(key)
    return keys


def pipeline_figure(highlight=None, ax=None, title: str | None = None):
    """Draw the Mask R-CNN pipeline, highlighting one or more stages.

    Args:
        highlight: a notebook number (``1`` or ``"01"``), a stage key (``"backbone"``,
            ``"rpn"``, ``"nms"``, ``"roi"``, ``"box_head"``, ``"mask_head"``, ``"training"``,
            ``"evaluation"``, ``"case_study"``), a list of them, or None.
        ax: matplotlib Axes to draw into (a new 13×5 figure when None).
        title: optional title above the map.

    Returns:
        The matplotlib Figure.
    """
    keys = _stage_keys(highlight)
    if ax is None:
        fig, ax = plt.subplots(figsize=(14, 4.9))
    else:
        fig = ax.figure
    ax.set_xlim(0, 18.0)
    ax.set_ylim(-0.35, 5.9)
    ax.set_aspect("equal")
    ax.axis("off")

    w, h = 2.5, 1.45
    pos = {s.key: s.xy for s in STAGES}

    def box(stage: Stage, width=w, height=h, small=False):
        on = stage.key in keys
        x, y = stage.xy
        face = HIGHLIGHT if on else (NEUTRAL if stage.notebook else "white")
        ax.add_patch(
            FancyBboxPatch(
                (x - width / 2, y - height / 2), width, height,
                boxstyle="round,pad=0.02,rounding_size=0.15",
                facecolor=face, edgecolor="#b35900" if on else NEUTRAL_EDGE,
                linewidth=2.5 if on else 1.2, zorder=2,
            )
        )
        label = stage.title
        if stage.notebook and not small:  # the notebook number as a badge on the corner
            ax.text(x - width / 2 + 0.05, y + height / 2 - 0.02, stage.notebook, ha="center",
                    va="center", fontsize=9, fontweight="bold", zorder=4, color="white",
                    bbox=dict(boxstyle="circle,pad=0.25", facecolor="#b35900" if on else NEUTRAL_EDGE,
                              edgecolor="none"))
        elif stage.notebook:
            label = f"{stage.notebook}  {stage.title}"
        if small:
            ax.text(x, y + 0.1, label, ha="center", va="center", fontsize=10.5,
                    fontweight="bold", zorder=3)
            ax.text(x, y - 0.2, stage.detail, ha="center", va="center", fontsize=8.5,
                    color="#333", zorder=3)
        else:
            ax.text(x, y + 0.33, label, ha="center", va="center", fontsize=11,
                    fontweight="bold", zorder=3)
            ax.text(x, y - 0.22, stage.detail, ha="center", va="center", fontsize=9,
                    color="#333", zorder=3, linespacing=1.25)

    def arrow(a, b, text=None, text_offset=(0, 0.18), style="-|>", rad=0.0):
        ax.add_patch(
            FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=16, linewidth=1.6,
                            color="#44546a", connectionstyle=f"arc3,rad={rad}", zorder=1)
        )
        if text:
            ax.text((a[0] + b[0]) / 2 + text_offset[0], (a[1] + b[1]) / 2 + text_offset[1],
                    text, ha="center", va="bottom", fontsize=8, color="#44546a",
                    style="italic")

    for stage in STAGES:
        box(stage)
    for stage in SIDE_STAGES:
        box(stage, width=3.2, height=0.78, small=True)

    half = w / 2
    # top row: image -> backbone -> rpn -> nms
    top, bottom = _TOP, _BOTTOM - 0.2
    arrow((pos["image"][0] + half, top), (pos["backbone"][0] - half, top), "pixels")
    arrow((pos["backbone"][0] + half, top), (pos["rpn"][0] - half, top), "features")
    arrow((pos["rpn"][0] + half, top), (pos["nms"][0] - half, top), "scored boxes")
    # the features also go down to RoIAlign
    arrow((pos["backbone"][0], top - h / 2), (pos["roi"][0], _BOTTOM + h / 2), "features",
          text_offset=(0.5, -0.1))
    # the proposals go from NMS down-left into RoIAlign
    arrow((pos["nms"][0] - 0.6, top - h / 2), (pos["roi"][0] + half, _BOTTOM + 0.4),
          "proposals", text_offset=(1.2, 0.1))
    # bottom row: roi -> box head -> mask head -> output
    arrow((pos["roi"][0] + half, bottom), (pos["box_head"][0] - half, bottom), "RoI features")
    arrow((pos["box_head"][0] + half, bottom), (pos["mask_head"][0] - half, bottom), "detections")
    arrow((pos["mask_head"][0] + half, bottom), (pos["output"][0] - half, bottom), "masks")
    # RoIAlign also crops 14×14 features of every detection for the mask head
    arrow((pos["roi"][0] + 0.3, _BOTTOM - h / 2), (pos["mask_head"][0] - 0.3, _BOTTOM - h / 2),
          "14×14 crops of the detections", text_offset=(0, -0.62), rad=0.25)

    if title:
        ax.set_title(title, fontsize=13)
    return fig


# --------------------------------------------------------------------------------------------
# Images, boxes, masks
# --------------------------------------------------------------------------------------------


def to_numpy_image(image) -> np.ndarray:
    """Tensor[3, H, W] in [0, 1] (or an H×W×3 array) → H×W×3 float array for imshow."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image: expected Tensor[3, H, W] or [1, H, W], got {tuple(image.shape)}")
        image = image.permute(1, 2, 0).float().numpy()  # (C, H, W) -> (H, W, C)
        if image.shape[2] == 1:
            image = image[..., 0]
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def show_image(image, ax=None, title: str | None = None):
    """Show an image tensor (3×H×W in [0, 1]) without axes ticks; returns the Axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(to_numpy_image(image), cmap="gray" if isinstance(image, torch.Tensor) and image.shape[0] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def draw_boxes(
    ax,
    boxes,
    labels: Sequence[str] | None = None,
    color: str | Sequence[str] = "#00e5ff",
    linewidth: float = 1.8,
    linestyle: str = "-",
    alpha: float = 1.0,
):
    """Draw boxes (Tensor[K, 4] or array, (x1, y1, x2, y2) in pixels) on an Axes."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    colors = [color] * len(boxes) if isinstance(color, str) else list(color)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        ax.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colors[i],
                      linewidth=linewidth, linestyle=linestyle, alpha=alpha)
        )
        if labels is not None:
            ax.text(x1, y1 - 2, labels[i], color="black", fontsize=8, va="bottom",
                    bbox=dict(facecolor=colors[i], alpha=0.8, pad=1, edgecolor="none"))
    return ax


def overlay_masks(ax, masks, colors: Iterable | None = None, alpha: float = 0.45):
    """Overlay binary or probability masks (Tensor[K, H, W] or [K, 1, H, W]) on an Axes."""
    masks = torch.as_tensor(masks).detach().cpu().float()
    if masks.ndim == 4:
        masks = masks[:, 0]  # (K, 1, H, W) -> (K, H, W)
    cmap = plt.get_cmap("tab10")
    colors = list(colors) if colors is not None else [cmap(i % 10) for i in range(len(masks))]
    for mask, color in zip(masks, colors):
        rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
        rgba[..., :3] = np.array(plt.matplotlib.colors.to_rgb(color))
        rgba[..., 3] = mask.numpy() * alpha
        ax.imshow(rgba)
    return ax


def outline_masks(ax, masks, colors: Iterable | None = None, linewidth: float = 1.5, threshold: float = 0.5,
                  halo: str | None = "black"):
    """Draw the outline (the ``threshold`` contour) of each mask (Tensor[K, H, W] or [K, 1, H, W]).

    Unlike :func:`overlay_masks` it leaves the pixels inside visible (their own colours). ``halo``:
    a thin line of this colour around each outline, so it shows on any background (None: none).
    """
    from matplotlib import patheffects

    masks = torch.as_tensor(masks).detach().cpu().float()
    if masks.ndim == 4:
        masks = masks[:, 0]  # (K, 1, H, W) -> (K, H, W)
    cmap = plt.get_cmap("tab10")
    colors = list(colors) if colors is not None else [cmap(i % 10) for i in range(len(masks))]
    limits = ax.get_xlim(), ax.get_ylim()  # contour would rescale the axes to its own extent
    for mask, color in zip(masks, colors):
        if mask.min() < threshold <= mask.max():  # a contour exists
            # pixel centres at integer coordinates, as imshow draws them
            contour = ax.contour(mask.numpy(), levels=[threshold], colors=[color], linewidths=linewidth)
            if halo is not None:
                contour.set_path_effects([patheffects.withStroke(linewidth=linewidth + 1.5, foreground=halo)])
    if ax.images:  # keep an image's extent
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])
    return ax


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


def feature_energy(feature: torch.Tensor) -> torch.Tensor:
    """Mean absolute activation over channels: Tensor[C, H, W] (or [1, C, H, W]) → Tensor[H, W]."""
    if feature.ndim == 4:
        feature = feature[0]  # (1, C, H, W) -> (C, H, W)
    if feature.ndim != 3:
        raise ValueError(f"feature: expected Tensor[C, H, W], got shape {tuple(feature.shape)}")
    return feature.detach().abs().mean(dim=0).cpu()  # (C, H, W) -> (H, W)


def plot_feature_maps(
    features: Mapping[str, torch.Tensor],
    channel: int | None = None,
    image: torch.Tensor | None = None,
    axes=None,
    cmap: str = "magma",
):
    """One panel per pyramid level: a channel (or the mean |activation| when ``channel`` is None).

    Every panel is drawn at the image's extent so that positions line up across levels; the cell
    grid of coarse levels is visible as blocks. Returns the Figure.
    """
    names = list(features)
    n = len(names) + (1 if image is not None else 0)
    if axes is None:
        fig, axes = plt.subplots(1, n, figsize=(3.1 * n, 3.3))
    else:
        fig = np.ravel(axes)[0].figure
    axes = list(np.ravel(axes))
    i = 0
    if image is not None:
        show_image(image, ax=axes[0], title="input image")
        i = 1
    for name in names:
        f = features[name]
        f0 = f[0] if f.ndim == 4 else f  # (N, C, H, W) -> (C, H, W)
        if channel is None:
            fmap, what = feature_energy(f0), "mean |activation|"
        else:
            if not 0 <= channel < f0.shape[0]:
                raise ValueError(f"channel: expected 0 <= channel < {f0.shape[0]}, got {channel}")
            fmap, what = f0[channel].detach().cpu(), f"channel {channel}"
        ax = axes[i]
        extent = None
        if image is not None:
            extent = (0, image.shape[-1], image.shape[-2], 0)
        ax.imshow(fmap.numpy(), cmap=cmap, interpolation="nearest", extent=extent)
        ax.set_title(f"{name}: {tuple(f0.shape[-2:])[0]}×{tuple(f0.shape[-2:])[1]}\n{what}",
                     fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        i += 1
    fig.tight_layout()
    return fig


def fpn_diagram(ax=None):
    """The Feature Pyramid Network as a picture: c2..c5 on the left, p2..p6 on the right.

    Each map is drawn as a square whose side halves from level to level; arrows show the 1×1
    lateral convs, the top-down ×2 upsampling with addition, and the 3×3 output convs.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 6.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.9, 10.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ys = {2: 1.5, 3: 4.3, 4: 6.6, 5: 8.6}
    sides = {2: 2.2, 3: 1.5, 4: 1.0, 5: 0.65}
    cx, mx, px = 1.8, 6.0, 10.0  # column centres: c_k, merged, p_k

    def square(x, y, side, face, text, text_dx=0.0):
        ax.add_patch(Rectangle((x - side / 2, y - side / 2), side, side, facecolor=face,
                               edgecolor="#44546a", linewidth=1.2, zorder=2))
        ax.text(x + text_dx, y, text, ha="center", va="center", fontsize=10, zorder=3,
                fontweight="bold")

    def arrow(a, b, text=None, dx=0.0, dy=0.15, color="#44546a"):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=13, linewidth=1.4,
                                     color=color, zorder=1))
        if text:
            ax.text((a[0] + b[0]) / 2 + dx, (a[1] + b[1]) / 2 + dy, text, ha="center",
                    va="bottom", fontsize=8.5, color=color, style="italic")

    for k in (2, 3, 4, 5):
        y, s = ys[k], sides[k]
        square(cx, y, s, "#dfe8f2", f"c{k}")
        ax.text(cx - s / 2 - 0.15, y, f"stride {2 ** k}\n{256 * 2 ** (k - 2)} ch", ha="right",
                va="center", fontsize=8, color="#333")
        square(mx, y, s, "#fde2c4", "+" if k < 5 else "")
        square(px, y, s, HIGHLIGHT, f"p{k}")
        arrow((cx + s / 2, y), (mx - s / 2, y), "1×1 lateral" if k == 2 else "1×1")
        arrow((mx + s / 2, y), (px - s / 2, y), "3×3 output" if k == 2 else "3×3")
        if k < 5:
            arrow((cx, y + s / 2), (cx, ys[k + 1] - sides[k + 1] / 2),
                  "bottom-up\n(ResNet stage)" if k == 2 else None, dx=-0.9, dy=-0.35)
            arrow((mx, ys[k + 1] - sides[k + 1] / 2), (mx, y + s / 2),
                  "×2 nearest\nupsample" if k == 4 else None, dx=0.95, dy=-0.35, color="#b35900")
    # p6 from p5
    y6 = 9.85
    square(px, y6, 0.42, HIGHLIGHT, "")
    ax.text(px + 0.4, y6, "p6", ha="left", va="center", fontsize=10, fontweight="bold")
    arrow((px, ys[5] + sides[5] / 2), (px, y6 - 0.21))
    ax.text(px - 0.3, (ys[5] + y6) / 2, "max-pool\nk=1, s=2", ha="right", va="center",
            fontsize=8, color="#44546a", style="italic")
    ax.text(cx, -0.45, "ResNet stages\n(bottom-up)", ha="center", va="center", fontsize=9.5)
    ax.text(mx, -0.45, "top-down\nmerge", ha="center", va="center", fontsize=9.5, color="#b35900")
    ax.text(px, -0.45, "pyramid: 256 ch\nat every level", ha="center", va="center", fontsize=9.5)
    return ax.figure


# --------------------------------------------------------------------------------------------
# Explorers
# --------------------------------------------------------------------------------------------

BATCH_ENV_VAR = "MRCNN_EDU_BATCH"


def batch_mode() -> bool:
    """True when notebooks run without a front-end (tests, grading, ``make book``).

    Set ``MRCNN_EDU_BATCH=1`` for such runs. ipywidgets' ``interact`` relies on an Output widget
    that only a live front-end handles; executed headless it can deadlock the executor
    (jupyter/nbclient#312, jupyter/nbconvert#2029), so explorers then draw once instead.
    """
    import os

    return os.environ.get(BATCH_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def explore(_explore_fn=None, **controls):
    """``ipywidgets.interact`` for the course's explorers, safe to execute headless.

    Use it exactly like ``interact``: ``viz.explore(draw, size=(8, 64), level=["p2", "p3"])``
    or as a decorator ``@viz.explore(size=(8, 64))``. In JupyterLab it returns interact's
    widget. In batch mode (:func:`batch_mode`) it builds the same controls, calls the function
    once with their initial values (so the figure still appears in executed copies) and says so.
    """
    if _explore_fn is None:
        return lambda fn: explore(fn, **controls)
    import ipywidgets as widgets

    if not batch_mode():
        return widgets.interact(_explore_fn, **controls)
    # manual=True builds the controls without running the function inside an Output widget
    panel = widgets.interactive(_explore_fn, {"manual": True}, **controls)
    kwargs = {w._kwarg: w.get_interact_value() for w in panel.kwargs_widgets}
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"[explorer drawn once with {shown}; run the notebook in JupyterLab to move the controls]")
    result = _explore_fn(**kwargs)
    panel.close()
    return result


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------

LOSS_COLORS = {"loss": "black", "loss_objectness": "#4e79a7", "loss_rpn_box_reg": "#76b7b2",
               "loss_classifier": "#e15759", "loss_box_reg": "#f28e2b", "loss_mask": "#59a14f"}


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start): same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))  # sums[i] = values[:i].sum()
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_training_curves(steps: Sequence[Mapping], epochs: Sequence[Mapping] = (), axes=None,
                         smooth: int = 20, title: str | None = None):
    """The loss terms per step and the validation AP per epoch of a training run.

    Args:
        steps: one dict per step with ``"step"``, ``"loss"`` and the loss terms
            (``engine.History.steps``).
        epochs: one dict per epoch with ``"epoch"`` and, after validation, ``"segm_AP"``,
            ``"segm_AP50"``, ``"bbox_AP50"`` (``engine.History.epochs``).
        axes: two Axes (losses, validation); a new 13 x 4 figure when None.
        smooth: moving-average window in steps (the raw values are drawn faintly behind).

    Returns:
        The Figure. Losses use a log scale: the terms differ by an order of magnitude.
    """
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.6, 1]})
    ax_loss, ax_val = axes
    fig = ax_loss.figure
    x = [row["step"] for row in steps]
    keys = [k for k in LOSS_COLORS if steps and k in steps[0]]
    for key in keys:
        values = [row[key] for row in steps]
        color = LOSS_COLORS[key]
        ax_loss.plot(x, values, color=color, alpha=0.18, linewidth=0.8)
        ax_loss.plot(x, moving_average(values, smooth), color=color, linewidth=2.2 if key == "loss" else 1.5,
                     label=("total" if key == "loss" else key.replace("loss_", "")))
    if steps:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (log scale)")
    ax_loss.set_title(f"training losses (lines: mean of the last {smooth} steps)", fontsize=10)
    ax_loss.grid(alpha=0.3)

    last_step = {}  # epoch -> its last step, to put validation points on the step axis
    for row in steps:
        last_step[row.get("epoch")] = row["step"]
    rows = [row for row in epochs if row.get("segm_AP") is not None or row.get("bbox_AP") is not None]
    for key, label, style in (("segm_AP50", "mask AP50", "o-"), ("segm_AP", "mask AP", "s-"),
                              ("bbox_AP50", "box AP50", "^--")):
        points = [(last_step.get(row["epoch"], row["epoch"]), row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax_val.plot(*zip(*points), style, label=label)
    if rows:
        ax_val.legend(fontsize=8, loc="lower right")
    else:
        ax_val.text(0.5, 0.5, "validation AP appears\nafter each epoch", ha="center", va="center",
                    transform=ax_val.transAxes, color="0.4")
    ax_val.set_ylim(0, 1)
    if x:
        ax_val.set_xlim(0, max(x) * 1.02 + 1)
    ax_val.set_xlabel("step")
    ax_val.set_title("validation (COCO AP)", fontsize=10)
    ax_val.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
