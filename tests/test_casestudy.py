"""The case study end to end in fast mode (``mrcnn-edu casestudy --fast``): outputs, metrics, report, cache."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mrcnn_edu import casestudy
from mrcnn_edu.cli import main
from mrcnn_edu.evaluation import METRIC_KEYS

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["casestudy", *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fast runs sharing a fresh cache: the first trains (and saves its weights), the second
    evaluates those weights and must find every data set in the cache."""
    root = tmp_path_factory.mktemp("casestudy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MRCNN_EDU_CACHE", str(root / "cache"))
        saved = root / "shipped" / "tanks_small.safetensors"
        code1, log1 = run_cli("--fast", "--quiet", "--out", str(root / "first"), "--save-weights", str(saved))
        data_files = sorted((root / "cache" / "oil_tanks").rglob("annotations.json"))
        mtimes = {path: path.stat().st_mtime_ns for path in data_files}
        code2, log2 = run_cli("--fast", "--quiet", "--out", str(root / "second"), "--weights", str(saved))
    return {"root": root, "first": root / "first", "second": root / "second", "saved": saved, "codes": (code1, code2),
            "logs": (log1, log2), "data_files": data_files, "mtimes": mtimes}


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_fast_run_writes_every_output(runs):
    assert runs["codes"] == (0, 0), runs["logs"]
    first = runs["first"]
    for name in ("report.md", "metrics.json", "train/last.pt", "train/best.pt", "train/history.csv",
                 "train/history.json", "train/model.safetensors", "scenes/scene_000.png", "scenes/results.json"):
        assert (first / name).is_file(), name
    figures = {path.stem for path in (first / "figures").glob("*.png")}
    assert {"training_curves", "training_steps", "pr_curve", "examples", "scene_overlay"} <= figures
    assert figures <= set(casestudy.FIGURES)
    if casestudy._optional("error_analysis") is not None:
        assert {"recall_by_size", "leakage", "threshold_sweep", "gallery_fp", "gallery_fn"} <= figures
    fill = metrics_of(first)["fill_level"]
    if fill["available"] and (fill["n"] or fill["n_true_masks"]):
        assert "fill_scatter" in figures
    # each step announced, with progress lines
    for step in range(1, 7):
        assert f"[{step}/6]" in runs["logs"][0]


def test_metrics_have_the_expected_keys_and_values(runs):
    m = metrics_of(runs["first"])
    assert m["fast"] is True
    assert ({key: m["data"][key]["count"] for key in ("train", "val", "test", "scenes")}
            == {"train": 16, "val": 8, "test": 8, "scenes": 1})
    assert len({m["data"][key]["seed"] for key in ("train", "val", "test", "scenes")}) == 4
    assert all(m["data"][key]["tanks"] > 0 for key in ("train", "val", "test"))
    training = m["training"]
    assert training["skipped"] is False
    assert training["steps"] == 3 * 4  # three one-epoch stages of 16 tiles in batches of 4
    assert [row["trainable"] for row in training["epochs_table"]] == ["heads", "all", "all"]
    assert training["best_epoch"] in (1, 2, 3)
    for source in ("pycocotools", "ours"):
        for iou_type in ("segm", "bbox"):
            values = m["test"][source][iou_type]
            assert set(values) == set(METRIC_KEYS)
            assert all(v == -1 or 0 <= v <= 1 for v in values.values())
    assert m["test"]["max_difference"] < 1e-6
    assert m["test"]["images"] == 8
    scenes = m["scenes"]
    assert len(scenes["rows"]) == 1 and scenes["rows"][0]["seconds"] > 0 and scenes["rows"][0]["tiles"] > 1
    assert set(scenes["metrics"]) == {"segm", "bbox"} and "ARmax" in scenes["metrics"]["segm"]
    assert set(m["seconds"]) >= {"data", "train", "evaluate", "scenes", "analysis"}
    assert m["total_seconds"] == pytest.approx(sum(m["seconds"].values()), abs=0.05)
    assert m["machine"]["cores"] >= 1 and m["machine"]["torch"] == torch.__version__
    checks = {row["check"] for row in m["acceptance"]}
    assert any("mask AP50" in check for check in checks) and any("wall time" in check for check in checks)
    if casestudy._optional("error_analysis") is not None:
        summary = m["error_analysis"]["summary"]
        assert summary["num_gt"] == m["data"]["test"]["tanks"]
        assert [row["threshold"] for row in m["error_analysis"]["sweep"]] == list(casestudy.SWEEP_THRESHOLDS)
    else:
        assert m["error_analysis"]["available"] is False
    if casestudy._optional("fill_level") is not None:
        fill = m["fill_level"]
        gt = json.loads((Path(m["data"]["test"]["folder"]) / "annotations.json").read_text())
        floating = sum(a["roof"] == "floating" for a in gt["annotations"])
        assert fill["available"] is True and fill["floating"] == floating > 0
        assert fill["n"] + fill["missed"] + fill["unreliable"] == floating
        assert len(fill["rows"]) == floating and all(row["image_id"] >= 1 for row in fill["rows"])
        for key in ("mae", "mae_true_masks"):
            assert fill[key] is None or 0 <= fill[key] <= 1
        assert 0 < fill["n_true_masks"] <= floating  # the estimator reads most true discs
    else:
        assert m["fill_level"]["available"] is False


def test_report_references_every_figure_and_only_existing_ones(runs):
    first = runs["first"]
    report = (first / "report.md").read_text(encoding="utf-8")
    for path in (first / "figures").glob("*.png"):
        assert f"](figures/{path.name})" in report, path.name
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (first / link).is_file(), link
    metrics = metrics_of(first)
    assert f"{metrics['test']['pycocotools']['segm']['AP50']:.3f}" in report  # the COCO table
    assert "## 7. Time per step" in report and "FAST MODE" in report


def test_second_run_reuses_the_cached_data(runs):
    log2 = runs["logs"][1]
    assert "generating" not in log2
    assert log2.count("reusing cached") == 4
    assert len(runs["data_files"]) == 4  # train, validation and test tiles, scenes
    assert {path: path.stat().st_mtime_ns for path in runs["data_files"]} == runs["mtimes"]
    m = metrics_of(runs["second"])
    assert all(m["data"][key]["reused"] for key in ("train", "val", "test", "scenes"))
    assert not any(metrics_of(runs["first"])["data"][key]["reused"] for key in ("train", "val", "test", "scenes"))


def test_given_weights_skip_training_and_reproduce_the_metrics(runs):
    first, second = metrics_of(runs["first"]), metrics_of(runs["second"])
    assert second["training"]["skipped"] is True and not (runs["second"] / "train").exists()
    # the saved weights are the trained run's best ones: same data, same numbers
    assert second["test"]["pycocotools"] == first["test"]["pycocotools"]
    assert "Skipped: evaluating the given weights" in (runs["second"] / "report.md").read_text(encoding="utf-8")


def test_saved_weights_carry_a_card(runs):
    from mrcnn_edu.weights import card_path, load_weights

    saved = runs["saved"]
    assert saved.is_file() and card_path(saved).is_file()
    assert saved.stat().st_size < 20e6
    _model, card = load_weights(saved)
    assert card["class_names"] == ["__background__", "oil-storage-tank"]
    assert "casestudy" in card["command"] and "--save-weights" in card["command"]
    assert card["data"]["train_seed"] == casestudy.TRAIN_SEED and card["data"]["val_seed"] == casestudy.VAL_SEED
    assert card["data"]["test_seed"] == casestudy.TEST_SEED
    assert card["test_pycocotools"]["segm"] == metrics_of(runs["first"])["test"]["pycocotools"]["segm"]
    assert card["train_config"]["stages"][0]["trainable"] == "heads"


def test_a_changed_train_config_asks_for_restart(runs, tmp_path, monkeypatch, capsys):
    """OUT/train/last.pt of another schedule: a one-line error naming the field and --restart, no silent restart."""
    config = json.loads((REPO / "configs" / "tanks_train.json").read_text())
    config["lr"] = config["lr"] / 2
    changed = tmp_path / "train.json"
    changed.write_text(json.dumps(config))
    monkeypatch.setenv("MRCNN_EDU_CACHE", str(runs["root"] / "cache"))
    last = runs["first"] / "train" / "last.pt"
    before = last.stat().st_mtime_ns
    code = main(["casestudy", "--fast", "--quiet", "--out", str(runs["first"]), "--train-config", str(changed)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot resume" in err and "lr" in err and "--restart" in err and "--resume" not in err
    assert last.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, fragment", [
    (["--train-tiles", "0"], "--train-tiles"),
    (["--scenes", "many"], "--scenes"),
    (["--weights", "no/such/file.safetensors"], "no/such/file.safetensors"),
    (["--weights", "w.safetensors", "--save-weights", "x.safetensors"], "--save-weights"),
    (["--save-weights", "weights.pt"], ".safetensors"),
    (["--train-config", "no/such/train.json"], "no/such/train.json"),
])
def test_argument_errors_are_one_line(args, fragment, capsys, tmp_path):
    code = main(["casestudy", "--fast", "--out", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mrcnn-edu: error: ") and fragment in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_configs_are_the_small_preset_and_three_stages():
    from mrcnn_edu import engine
    from mrcnn_edu.config import small

    assert json.loads((REPO / "configs" / "tanks_small.json").read_text()) == json.loads(small(2).to_json())
    config = engine.load_train_config(REPO / "configs" / "tanks_train.json")
    assert [stage.trainable for stage in config.stages] == ["heads", "all", "all"]
    assert [stage.lr_scale for stage in config.stages] == [2.0, 1.0, 0.2]
    assert (config.optimizer, config.lr, config.momentum, config.batch_size, config.schedule) == (
        "sgd", 0.02, 0.9, 4, "constant")
    assert config.grad_clip == 10.0 and set(config.augment) == {"flip", "rot90"}


def test_scene_ground_truth_is_one_rle_per_tank(tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    from mrcnn_edu.oil_tanks import make_scene, tile_seed

    monkeypatch.setenv("MRCNN_EDU_CACHE", str(tmp_path))
    folder, reused = casestudy.cached_scenes(7, 1, 256, progress=False, log=lambda message: None)
    assert not reused and casestudy.cached_scenes(7, 1, 256, progress=False, log=lambda message: None) == (folder, True)
    gt = json.loads((folder / "annotations.json").read_text())
    scene = make_scene(256, seed=tile_seed(7, 0))
    assert len(gt["annotations"]) == len(scene.tanks)
    for annotation, mask in zip(gt["annotations"], scene.target["masks"]):
        rle = {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle), mask.numpy())
        assert annotation["area"] == int(mask.sum())
    assert (folder / "scene_000.png").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_scene_metrics_count_more_than_100_detections():
    """COCO keeps 100 detections per image; a scene has more tanks, so scene_metrics keeps 1000."""
    boxes = [[10 * (i % 15), 10 * (i // 15), 8, 8] for i in range(150)]  # 150 separate squares
    gt = {"images": [{"id": 1, "width": 160, "height": 160}], "categories": [{"id": 1, "name": "tank"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 64, "iscrowd": 0}
                          for i, b in enumerate(boxes)]}
    results = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - i / 1000} for i, b in enumerate(boxes)]
    metrics = casestudy.scene_metrics(gt, results, "bbox")
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["ARmax"] == pytest.approx(1.0)
    assert metrics["AR10"] == pytest.approx(10 / 150)
