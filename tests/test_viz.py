"""Tests for mrcnn_edu.viz: every figure the notebooks and explorers draw."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the test process only; never exported to notebook kernels

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.patches import FancyBboxPatch, Rectangle

from mrcnn_edu import viz


def _highlighted(fig):
    ax = fig.axes[0]
    return [p for p in ax.patches if isinstance(p, FancyBboxPatch) and p.get_facecolor()[:3]
            == matplotlib.colors.to_rgb(viz.HIGHLIGHT)]


@pytest.mark.parametrize("highlight, n", [(None, 0), (1, 1), ("03", 1), ("mask_head", 1), ([2, 3], 2), (9, 1)])
def test_pipeline_highlights(highlight, n):
    fig = viz.pipeline_figure(highlight)
    assert len(_highlighted(fig)) == n
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for word in ["Backbone", "RPN", "NMS", "RoIAlign", "Box head", "Mask head", "Training", "Case study"]:
        assert word in texts
    plt.close(fig)


def test_pipeline_rejects_unknown_stage():
    with pytest.raises(ValueError, match="highlight"):
        viz.pipeline_figure("decoder")


def test_boxes_and_masks_drawn():
    fig, ax = plt.subplots()
    viz.show_image(torch.rand(3, 20, 30), ax=ax)
    viz.draw_boxes(ax, torch.tensor([[1.0, 2.0, 5.0, 9.0], [0, 0, 3, 3]]), labels=["a", "b"])
    viz.overlay_masks(ax, torch.ones(2, 1, 20, 30))
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 2 and rects[0].get_width() == 4 and rects[0].get_height() == 7
    assert len(ax.images) == 3
    plt.close(fig)


def test_show_image_rejects_bad_shape():
    with pytest.raises(ValueError, match="image"):
        viz.to_numpy_image(torch.rand(4, 4))


def test_feature_maps_panels():
    feats = {"p2": torch.rand(1, 8, 16, 16), "p3": torch.rand(1, 8, 8, 8)}
    fig = viz.plot_feature_maps(feats, image=torch.rand(3, 64, 64))
    assert len(fig.axes) == 3
    assert "p3: 8×8" in fig.axes[2].get_title()
    fig2 = viz.plot_feature_maps(feats, channel=3)
    assert "channel 3" in fig2.axes[0].get_title()
    torch.testing.assert_close(viz.feature_energy(feats["p3"]), feats["p3"][0].abs().mean(0))
    with pytest.raises(ValueError, match="channel"):
        viz.plot_feature_maps(feats, channel=8)
    plt.close("all")


def test_fpn_diagram_labels_every_level():
    fig = viz.fpn_diagram()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for name in ["c2", "c3", "c4", "c5", "p2", "p3", "p4", "p5", "p6"]:
        assert name in texts, name
    assert any("upsample" in t for t in texts)
    plt.close(fig)


def test_explore_interactive_and_batch(monkeypatch, capsys):
    import ipywidgets as widgets

    calls = []

    def draw(size=3, level="p2", show=True):
        calls.append((size, level, show))

    monkeypatch.setenv("MRCNN_EDU_BATCH", "0")
    w = viz.explore(draw, size=(2, 10), level=["p3", "p4"], show=widgets.Checkbox(value=False))
    assert isinstance(w, widgets.interactive) or callable(w)
    assert calls and calls[-1] == (3, "p3", False)  # interact ran it once with the initial values
    monkeypatch.setenv("MRCNN_EDU_BATCH", "1")
    calls.clear()
    viz.explore(draw, size=(2, 10), level=["p3", "p4"], show=widgets.Checkbox(value=False))
    assert calls == [(3, "p3", False)]
    assert "explorer drawn once" in capsys.readouterr().out
    calls.clear()

    @viz.explore(size=widgets.IntSlider(value=5, min=1, max=9))
    def decorated(size):
        calls.append(size)

    assert calls == [5]


def test_moving_average():
    assert viz.moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert viz.moving_average([2.0, 4.0], 1).tolist() == [2.0, 4.0]
    assert len(viz.moving_average([], 5)) == 0


def test_training_curves_draw_every_loss_term_and_validation():
    keys = ["loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"]
    steps = [{"step": s, "epoch": 1 + (s - 1) // 5, **{k: 1.0 / s for k in keys}} for s in range(1, 11)]
    epochs = [{"epoch": 1, "segm_AP": 0.1, "segm_AP50": 0.3, "bbox_AP50": 0.2}, {"epoch": 2, "segm_AP": 0.2}]
    fig = viz.plot_training_curves(steps, epochs, smooth=3)
    ax_loss, ax_val = fig.axes
    labels = [line.get_label() for line in ax_loss.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["total", "objectness", "rpn_box_reg", "classifier", "box_reg", "mask"]
    assert ax_loss.get_yscale() == "log"
    val = {line.get_label(): line for line in ax_val.get_lines()}
    assert list(val["mask AP"].get_xdata()) == [5, 10]  # at the last step of each epoch
    assert list(val["mask AP50"].get_ydata()) == [0.3]
    plt.close(fig)
    fig = viz.plot_training_curves(steps[:2])  # before any validation: a note instead of points
    assert "validation AP appears" in fig.axes[1].texts[0].get_text()
    plt.close(fig)


def test_outline_masks_draws_one_contour_per_nonempty_mask():
    fig, ax = plt.subplots()
    masks = torch.zeros(3, 1, 20, 30)
    masks[0, 0, 2:8, 3:9] = 1
    masks[1, 0, 10:18, 5:25] = 0.9
    viz.outline_masks(ax, masks, colors=["red", "blue", "green"])  # mask 2 is empty: no contour
    assert len(ax.images) == 0 and len(ax.collections) == 2
    plt.close(fig)
    fig, ax = plt.subplots()
    viz.show_image(torch.rand(3, 20, 30), ax=ax)
    viz.outline_masks(ax, masks)
    assert ax.get_xlim() == (-0.5, 29.5) and ax.get_ylim() == (19.5, -0.5)  # the image's extent is kept
    plt.close(fig)
