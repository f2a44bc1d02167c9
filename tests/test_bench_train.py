"""The time-to-accuracy benchmark in fast mode: the shapes recipe of ``benchmarks/bench_train.py``
(``configs/shapes_*.json``) trains, and its loss falls. No timing is checked (that is the
benchmark's job, recorded in the README)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mrcnn_edu import engine
from mrcnn_edu.data import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_recipe_loss_falls(tmp_path):
    model_config = engine.load_model_config(ROOT / "configs" / "shapes_small.json")
    train_config = engine.load_train_config(ROOT / "configs" / "shapes_train.json", epochs=1)
    # the recipe, shortened: 40 steps with a short warm-up instead of thousands of steps
    train_config = dataclasses.replace(train_config, warmup_iters=5)
    train_set = ShapesDataset(160, size=128, seed=0)
    _, history = engine.build_and_train(model_config, train_set, None, train_config, tmp_path, resume=False,
                                        progress=False)
    losses = np.array([row["loss"] for row in history.steps])
    assert len(losses) == 40 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.8 * first, f"the loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"


def test_bench_train_script_runs_and_saves_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_train

    out, save = tmp_path / "run", tmp_path / "weights" / "shapes.safetensors"
    assert bench_train.main(["--images-per-epoch", "8", "--val-images", "4", "--epochs", "1", "--out", str(out),
                             "--save", str(save), "--threads", str(torch.get_num_threads())]) == 0
    printed = capsys.readouterr().out
    assert "mask AP50" in printed and "chosen epoch 1" in printed
    card = json.loads(save.with_name("shapes.card.json").read_text())
    assert card["benchmark"]["validation"].startswith("ShapesDataset(4")
    assert 0 <= card["benchmark"]["pycocotools_segm"]["AP50"] <= 1
    sys.modules.pop("bench_train", None)
