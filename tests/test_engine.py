"""Tests for mrcnn_edu.engine: configs and schedules, stages, files written, best-by-AP selection,
seed determinism, validation that does not disturb training, exact resume after an interruption,
corrupt checkpoints, divergence, two processes with DDP (gloo), and the `mrcnn-edu train` command.

The model is the small preset shrunk to ~70 k parameters on 64 px images (tests/fixtures/
tiny_training.py): a step takes ~30 ms on one core.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from tiny_training import ScriptedEvaluation, TinyShapes, tiny_config  # noqa: E402

from mrcnn_edu import engine  # noqa: E402
from mrcnn_edu.config import ConfigError  # noqa: E402
from mrcnn_edu.engine import (Stage, TrainConfig, TrainingDiverged, apply_stage, epoch_indices,  # noqa: E402
                              load_checkpoint, lr_factor, lr_schedule, make_loader, seed_everything,
                              set_train_mode, three_stage_schedule, train, validation_loss)
from mrcnn_edu.model import LOSS_KEYS, build_mask_rcnn  # noqa: E402
from mrcnn_edu.oil_tanks import masks_to_boxes  # noqa: E402
from mrcnn_edu.utils import UserError  # noqa: E402
from mrcnn_edu.weights import load_weights  # noqa: E402

HERE = Path(__file__).parent
CFG = tiny_config()
TRAIN = TinyShapes(6, flip=True)  # 3 steps per epoch with batches of 2
VAL = TinyShapes(4, seed=1)
APS = (0.1, 0.5, 0.3)  # scripted validation AP of epochs 1, 2, 3: epoch 2 is the best


def run_config(**changes) -> TrainConfig:
    """3 epochs of 3 steps: one epoch "heads" at 2x the rate, then two of "all"; cosine with warm-up."""
    settings = dict(lr=0.02, batch_size=2, warmup_iters=2, schedule="cosine", device="cpu",
                    stages=(Stage(1, 2.0, "heads"), Stage(2)))
    return TrainConfig(**{**settings, **changes})


def fresh_model(seed: int = 0):
    seed_everything(seed)
    return build_mask_rcnn(CFG)


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def losses_of(history) -> list[list[float]]:
    return [[row[key] for key in ("loss", *LOSS_KEYS)] for row in history.steps]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted 9-step run with validation: the reference for several tests."""
    out = tmp_path_factory.mktemp("finished")
    model = fresh_model()
    evaluation = ScriptedEvaluation(APS)
    history = train(model, CFG, TRAIN, VAL, run_config(), out, evaluate_fn=evaluation, progress=False)
    return {"out": out, "model": model, "state": state(model), "history": history, "evaluation": evaluation}


# ----------------------------------------------------------------------------------------------
# Configs and schedules
# ----------------------------------------------------------------------------------------------


def test_train_config_json_round_trip():
    config = TrainConfig(optimizer="adamw", lr=3e-4, grad_clip=5.0, schedule="step", milestones=(3, 5), amp=False,
                         checkpoint_every=50, max_val_images=20,
                         stages=(Stage(2, 2.0, "heads"), Stage(4, 1.0, "backbone_from:layer3")))
    again = TrainConfig.from_json(config.to_json())
    assert again == config and isinstance(again.stages[1], Stage) and isinstance(again.milestones, tuple)
    assert json.loads(config.to_json())["stages"][0] == {"epochs": 2, "lr_scale": 2.0, "trainable": "heads"}
    assert TrainConfig.from_dict({}) == TrainConfig()  # missing keys take the defaults


@pytest.mark.parametrize("data, field", [
    ({"lr": -1}, "lr"), ({"optimizer": "adam"}, "optimizer"), ({"batch_size": 0}, "batch_size"),
    ({"schedule": "linear"}, "schedule"), ({"amp": "yes"}, "amp"), ({"device": "gpu"}, "device"),
    ({"milestones": [3, 2]}, "milestones"), ({"milestones": [10]}, "milestones"), ({"grad_clip": 0}, "grad_clip"),
    ({"stages": []}, "stages"), ({"stages": [{"epochs": 0}]}, "stages[0].epochs"),
    ({"stages": [{"epochs": 1}, {"epochs": 2, "trainable": "backbone"}]}, "stages[1].trainable"),
    ({"stages": [{"epochs": 1, "lr": 2}]}, "stages[0]"), ({"learning_rate": 0.1}, "learning_rate"),
    ({"augment": ["flip", "mixup"]}, "augment"),
])
def test_train_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(data)
    assert str(error.value).startswith(field), str(error.value)
    assert isinstance(error.value, UserError)


def test_augment_names_are_applied_to_training_items():
    from mrcnn_edu.data import ShapesDataset

    config = engine.load_train_config(None, augment="hflip, rot90", epochs=1)
    assert config.augment == ("hflip", "rot90") and TrainConfig.from_json(config.to_json()) == config
    assert engine.load_train_config(None, augment="").augment == ()
    train_set = ShapesDataset(8, size=64, seed=0)
    plain = [train_set[i] for i in range(8)]
    batches = list(engine.make_loader(train_set, dataclasses.replace(config, batch_size=8), epoch=0))
    images, targets = batches[0]
    indices = engine.epoch_indices(8, config.seed, 0)
    changed = [not torch.equal(image, plain[i][0]) for image, i in zip(images, indices)]
    assert any(changed)  # some items were flipped or turned ...
    for image, target, i in zip(images, targets, indices):  # ... each into one of the 8 symmetries of its original
        variants = [plain[i][0].flip(-1) if f else plain[i][0] for f in (0, 1)]
        variants = [torch.rot90(v, k, dims=(-2, -1)) for v in variants for k in range(4)]
        assert any(torch.equal(image, v) for v in variants)
        assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]))
    again = list(engine.make_loader(train_set, dataclasses.replace(config, batch_size=8), epoch=0))[0][0]
    assert all(torch.equal(a, b) for a, b in zip(images, again))  # seeded by (seed, epoch, index)
    assert train_set.transforms is None  # the caller's data set is left as it is


def test_three_stage_training_is_one_config():
    """The original: heads at 2x LR for 6 epochs, all layers at LR to epoch 12, at LR/5 to epoch 24."""
    config = TrainConfig(lr=1e-4, schedule="constant", warmup_iters=0, stages=three_stage_schedule())
    assert config.epochs == 24 and TrainConfig.from_json(config.to_json()) == config
    assert [config.stage_index(e) for e in (0, 5, 6, 11, 12, 23)] == [0, 0, 1, 1, 2, 2]
    lrs = lr_schedule(config, steps_per_epoch=2)
    assert len(lrs) == 48
    assert lrs[:12] == pytest.approx([2e-4] * 12) and lrs[12:24] == pytest.approx([1e-4] * 12)
    assert lrs[24:] == pytest.approx([2e-5] * 24)
    assert [s.trainable for s in config.stages] == ["heads", "all", "all"]


def test_lr_factor_warmup_step_and_cosine():
    warm = TrainConfig(warmup_iters=10, warmup_factor=0.1, schedule="constant", stages=(Stage(4),))
    assert lr_factor(warm, 0, 5) == pytest.approx(0.1)
    assert lr_factor(warm, 5, 5) == pytest.approx(0.55)  # linear: halfway from 0.1 to 1
    assert lr_factor(warm, 10, 5) == 1.0
    step = TrainConfig(warmup_iters=0, schedule="step", milestones=(2, 3), gamma=0.5, stages=(Stage(4),))
    assert [lr_factor(step, s, 5) for s in (0, 9, 10, 14, 15, 19)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    cosine = TrainConfig(warmup_iters=0, schedule="cosine", stages=(Stage(4),))
    values = [lr_factor(cosine, s, 5) for s in range(20)]
    assert values[0] == 1 and values[10] == pytest.approx(0.5) and 0 < values[-1] < 0.01
    assert all(a > b for a, b in zip(values, values[1:]))


def test_stages_freeze_the_trunk_only():
    model = fresh_model()
    apply_stage(model, Stage(1, trainable="heads"), CFG)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    for part in (model.backbone.fpn, model.rpn, model.roi_heads):  # matterport's "heads": fpn_*, rpn_*, mrcnn_*
        assert all(p.requires_grad for p in part.parameters())
    set_train_mode(model)
    bn = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn) and model.roi_heads.training  # frozen statistics

    apply_stage(model, Stage(1, trainable="backbone_from:layer3"), CFG)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    set_train_mode(model)
    assert model.backbone.body.layer3[0].bn1.training and not model.backbone.body.layer1[0].bn1.training

    apply_stage(model, Stage(1), CFG)
    assert all(p.requires_grad for p in model.parameters())  # the small preset trains all 5 stages
    limited = dataclasses.replace(CFG, backbone=dataclasses.replace(CFG.backbone, trainable_layers=2))
    apply_stage(model, Stage(1), limited)  # "all" = what the model config lets train
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_device_and_mixed_precision_choice():
    device = engine.resolve_device(TrainConfig())
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert engine.use_amp(TrainConfig(), torch.device("cpu")) is False
    assert engine.use_amp(TrainConfig(), torch.device("cuda")) is True
    with pytest.raises(UserError, match="amp"):
        engine.use_amp(TrainConfig(amp=True), torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no GPU"):
            engine.resolve_device(TrainConfig(device="cuda"))


# ----------------------------------------------------------------------------------------------
# Data order and validation: functions of the seed, and leaving the random state alone
# ----------------------------------------------------------------------------------------------


def test_epoch_order_and_augmentation_depend_on_seed_and_epoch_only():
    assert epoch_indices(10, seed=3, epoch=1) == epoch_indices(10, seed=3, epoch=1)
    assert epoch_indices(10, seed=3, epoch=1) != epoch_indices(10, seed=3, epoch=2)
    assert sorted(epoch_indices(10, 3, 1, rank=0, world_size=2) + epoch_indices(10, 3, 1, rank=1, world_size=2)) == \
        list(range(10))
    config = run_config(seed=3)

    def batches(loader):
        return [(torch.stack(images), [t["boxes"] for t in targets]) for images, targets in loader]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    whole = batches(make_loader(TRAIN, config, epoch=1))
    assert torch.equal(torch.get_rng_state(), before)  # loading data leaves the global generator alone
    skipped = batches(make_loader(TRAIN, config, epoch=1, skip_batches=1))
    workers = batches(make_loader(TRAIN, dataclasses.replace(config, num_workers=2), epoch=1))
    for a, b in zip(whole[1:], skipped, strict=True):
        assert torch.equal(a[0], b[0])
    for a, b in zip(whole, workers, strict=True):
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    unflipped, images = TinyShapes(6), torch.cat([batch[0] for batch in whole])
    same = [torch.equal(image, unflipped[i][0]) for i, image in zip(epoch_indices(6, 3, 1), images, strict=True)]
    assert any(same) and not all(same)  # the random flip flipped some images, not all


def test_validation_loss_leaves_batch_norm_and_random_state_alone():
    model = fresh_model()
    set_train_mode(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    rng = torch.get_rng_state()
    losses = validation_loss(model, VAL, torch.device("cpu"), batch_size=2, max_images=3)
    assert set(losses) == {"loss", *LOSS_KEYS} and all(math.isfinite(v) for v in losses.values())
    assert losses["loss"] == pytest.approx(sum(losses[k] for k in LOSS_KEYS))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert losses == validation_loss(model, VAL, torch.device("cpu"), batch_size=2, max_images=3)  # seeded


# ----------------------------------------------------------------------------------------------
# A whole run: files, history, best checkpoint by AP, final weights
# ----------------------------------------------------------------------------------------------


def test_run_writes_history_checkpoints_and_weights(finished):
    out, history = finished["out"], finished["history"]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "history.csv", "history.json", "last.pt",
                                                     "model.card.json", "model.safetensors"]
    assert len(history.steps) == 9 and [row["epoch"] for row in history.epochs] == [1, 2, 3]
    assert [row["trainable"] for row in history.epochs] == ["heads", "all", "all"]
    assert [row["segm_AP"] for row in history.epochs] == list(APS)
    for row in history.epochs:
        assert math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"])
        steps = [s["loss_mask"] for s in history.steps if s["epoch"] == row["epoch"]]
        assert row["train_loss_mask"] == pytest.approx(np.mean(steps))
    assert history.steps[0]["lr"] == pytest.approx(0.02 * 2.0 * 0.001)  # warm-up start, heads stage at 2x
    assert history.epochs[0]["train_loss"] > history.epochs[-1]["train_loss"]  # it learns
    assert finished["evaluation"].calls == [{"training": True, "max_images": None, "n": 4}] * 3

    saved = json.loads((out / "history.json").read_text())
    assert saved["steps"] == history.steps and saved["best_epoch"] == 2
    csv_lines = (out / "history.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("epoch,stage,trainable,lr,train_loss,")

    last = torch.load(out / "last.pt", weights_only=True)  # tensors and plain containers only
    best = load_checkpoint(out / "best.pt")
    assert last["step"] == 9 and best["step"] == 6  # best = epoch 2 (AP 0.5), not the last epoch
    assert set(last) >= {"model", "optimizer", "scheduler", "rng", "model_config", "train_config", "history", "step"}
    assert_same_state(last["model"], finished["state"])
    assert history.best_epoch == 2 and history.best_metric == 0.5 and history.best_metric_name == "segm_AP"

    model, card = load_weights(out / "model.safetensors")  # the best epoch's weights
    assert_same_state(model.state_dict(), best["model"])
    assert card["metrics"]["segm_AP"] == 0.5 and card["metrics"]["epoch"] == 2 and "epoch 2" in card["weights"]
    assert card["class_names"] == list(TRAIN.class_names) and card["train_config"] == run_config().to_dict()
    assert card["label_to_category_id"] == {"1": 1, "2": 2}


def test_same_seed_same_losses_and_validation_changes_nothing(finished, tmp_path, capfd):
    """Without validation (which draws random numbers and runs the model) training is bit-identical:
    validation restores every random state and keeps batch norm's statistics."""
    model = fresh_model()
    history = train(model, CFG, TRAIN, None, run_config(), tmp_path / "again", progress=True)
    assert losses_of(history) == losses_of(finished["history"])
    assert_same_state(state(model), finished["state"])
    assert not (tmp_path / "again" / "best.pt").exists()
    captured = capfd.readouterr()
    assert "epoch 1/3" in captured.err and "train loss" in captured.out  # tqdm bars, summary lines

    other = train(fresh_model(), CFG, TRAIN, None, run_config(seed=1), tmp_path / "other", progress=False)
    assert losses_of(other) != losses_of(history)  # the seed matters (sampling, order, augmentation)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # progress=False is silent


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


class Interrupt:
    """A callback that raises KeyboardInterrupt after step ``at`` (after that step's checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, event, info):
        if event == "step" and info["step"] == self.at:
            raise KeyboardInterrupt


def test_interrupt_and_resume_gives_identical_weights(finished, tmp_path):
    out = tmp_path / "run"
    config = run_config(checkpoint_every=2)  # steps 2 and 4 mid-epoch, 3 at the end of epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), CFG, TRAIN, VAL, config, out, evaluate_fn=ScriptedEvaluation(APS), progress=False,
              callbacks=[Interrupt(at=4)])
    assert load_checkpoint(out / "last.pt")["step"] == 4  # in epoch 2, after its first batch
    assert not (out / "model.safetensors").exists()

    model = fresh_model(seed=99)  # other initial weights: everything must come from the checkpoint
    history = train(model, CFG, TRAIN, VAL, config, out, resume="auto", evaluate_fn=ScriptedEvaluation(APS[1:]),
                    progress=False)
    assert_same_state(state(model), finished["state"])
    assert losses_of(history) == losses_of(finished["history"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in history.epochs]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in finished["history"].epochs]
    assert history.best_epoch == 2

    done = train(fresh_model(), CFG, TRAIN, VAL, dataclasses.replace(config, eval_every=2), out, resume="auto",
                 evaluate_fn=ScriptedEvaluation(), progress=False)  # finished: nothing left to do
    assert len(done.steps) == 9


def test_resume_refuses_another_configuration(finished, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(finished["out"] / "last.pt", out / "last.pt")
    with pytest.raises(UserError, match="train config field 'lr' differs") as error:
        train(fresh_model(), CFG, TRAIN, VAL, run_config(lr=0.05), out, resume="auto", progress=False)
    assert str(out / "last.pt") in str(error.value)
    other = CFG.from_dict({**CFG.to_dict(), "rpn": {**CFG.to_dict()["rpn"], "nms_thresh": 0.6}})
    with pytest.raises(UserError, match="model config field 'rpn.nms_thresh' differs"):
        train(build_mask_rcnn(other), other, TRAIN, VAL, run_config(), out, resume="auto", progress=False)
    with pytest.raises(UserError, match="steps per epoch"):
        train(fresh_model(), CFG, TinyShapes(8), VAL, run_config(), out, resume="auto", progress=False)
    with pytest.raises(UserError, match="does not exist"):
        train(fresh_model(), CFG, TRAIN, VAL, run_config(), out, resume=tmp_path / "nope.pt", progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_is_an_error_never_a_restart(finished, tmp_path, damage):
    out = tmp_path / "damaged"
    out.mkdir()
    data = (finished["out"] / "last.pt").read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not a checkpoint" * 100
    else:  # a readable torch file that is not our checkpoint
        path = tmp_path / "other.pt"
        torch.save({"model": {}}, path)
        data = path.read_bytes()
    (out / "last.pt").write_bytes(data)
    with pytest.raises(UserError) as error:
        train(fresh_model(), CFG, TRAIN, VAL, run_config(), out, resume="auto", progress=False)
    message = str(error.value)
    assert str(out / "last.pt") in message and "--resume=none" in message
    assert ("truncated or corrupt" if damage != "foreign" else "not an mrcnn_edu training checkpoint") in message
    assert (out / "last.pt").read_bytes() == data and sorted(p.name for p in out.iterdir()) == ["last.pt"]


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capfd):
    model = fresh_model()
    forward, calls = model.forward, []

    def poisoned(images, targets=None):  # the 5th training step's mask loss becomes NaN
        losses = forward(images, targets)
        if model.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:
                losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    model.forward = poisoned
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as error:
        train(model, CFG, TRAIN, None, run_config(checkpoint_every=2), out, progress=False)
    message = str(error.value)
    assert "loss_mask is nan" in message and "step 5 (epoch 2, batch 2 of 3)" in message
    assert f"{out / 'last.pt'} (step 4)" in message and isinstance(error.value, UserError)
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["step"] == 4 and len(checkpoint["history"]["steps"]) == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not taken
    assert not (out / "model.safetensors").exists()
    assert capfd.readouterr().out == ""


# ----------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo)
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = (torch.load(tmp_path / f"state_rank{r}.pt", weights_only=True) for r in (0, 1))
    initial0, initial1 = (torch.load(tmp_path / f"initial_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not all(torch.equal(initial0[k], initial1[k]) for k in initial0)  # they started apart (other seeds)
    assert_same_state(rank0, rank1)  # DDP: broadcast at the start, averaged gradients after
    assert not all(torch.equal(rank0[k], initial0[k]) for k in rank0)  # and they trained
    steps0, steps1 = (json.loads((tmp_path / f"steps_rank{r}.json").read_text()) for r in (0, 1))
    assert steps0 == steps1 and len(steps0) == 4  # losses averaged over both processes

    assert sorted(p.name for p in (tmp_path / "out_rank0").iterdir()) == [
        "history.csv", "history.json", "last.pt", "model.card.json", "model.safetensors"]
    assert not (tmp_path / "out_rank1").exists()  # rank 1 wrote nothing
    checkpoint = load_checkpoint(tmp_path / "out_rank0" / "last.pt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2 and checkpoint["steps_per_epoch"] == 2
    assert_same_state(checkpoint["model"], rank0)


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def cli(*args: str) -> int:
    from mrcnn_edu.cli import main

    return main(list(args))


@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(CFG.to_json())
    return path


def test_cli_trains_on_shapes_and_resumes(tmp_path, tiny_config_file, capsys):
    out = tmp_path / "run"
    args = ["train", str(tiny_config_file), "--data", "shapes", "--shapes", "4", "--epochs", "1", "--batch-size", "2",
            "--lr", "0.01", "--seed", "3", "--out", str(out), "--quiet"]
    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "model.safetensors" in printed
    model, card = load_weights(out / "model.safetensors")
    assert card["class_names"] == ["__background__", "square", "circle", "triangle"]
    assert card["config"]["num_classes"] == 4  # from the data, not from the config file
    assert card["command"].startswith(f"mrcnn-edu train {tiny_config_file} --data shapes --shapes 4 --epochs 1")
    assert "--seed 3" in card["command"] and card["train_config"]["seed"] == 3
    assert card["data"]["train"].startswith("ShapesDataset(n=4") and "seed=1" in card["data"]["validation"]
    assert 0 <= card["metrics"]["segm_AP"] <= 1 and "bbox_AP50" in card["metrics"]  # the real evaluation
    assert cli(*args) == 0  # --resume auto: the run is complete, nothing more is trained
    assert "trained 2 steps" in capsys.readouterr().out
    again, card_again = load_weights(out / "model.safetensors")
    assert_same_state(again.state_dict(), model.state_dict())
    assert card_again == card


def test_cli_trains_on_a_coco_folder(tmp_path, tiny_config_file):
    from mrcnn_edu.data import write_coco

    for name, dataset in (("train", TinyShapes(4)), ("val", TinyShapes(2, seed=1))):
        write_coco(tmp_path / name, ((image, target, f"{i}.png") for i, (image, target) in
                                     enumerate(dataset[i] for i in range(len(dataset)))), TinyShapes.categories)
    out = tmp_path / "run"
    assert cli("train", str(tiny_config_file), "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"),
               "--epochs", "1", "--out", str(out), "--quiet") == 0
    _, card = load_weights(out / "model.safetensors")
    assert card["class_names"] == ["__background__", "square", "disk"] and (out / "best.pt").exists()
    assert card["command"] == (f"mrcnn-edu train {tiny_config_file} --data {tmp_path / 'train'} "
                               f"--val-data {tmp_path / 'val'} --epochs 1")


@pytest.mark.parametrize("args, fragments", [
    (["big", "--data", "shapes"], ["'big' is neither a preset (r50_fpn, small)"]),
    (["small", "--data", "{tmp}/missing"], ["--data", "missing is not a folder"]),
    (["{tmp}/bad.json", "--data", "shapes"], ["bad.json", "config JSON"]),
    (["small", "--data", "shapes", "--train-config", "{tmp}/three.json", "--epochs", "2"], ["--epochs", "3 stages"]),
    (["small", "--data", "shapes", "--train-config", "{tmp}/nope.json"], ["nope.json does not exist"]),
    (["small", "--data", "shapes", "--epochs", "0"], ["--epochs", ">= 1"]),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, fragments):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "three.json").write_text(TrainConfig(stages=three_stage_schedule()).to_json())
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli("train", *args, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("mrcnn-edu: error: ")
    for fragment in fragments:
        assert fragment.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "out").exists()
