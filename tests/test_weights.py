"""Tests for mrcnn_edu.weights: safetensors + config + card round trip gives the same model and the
same outputs; missing, truncated, corrupt and foreign files give clear errors naming the file."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from tiny_training import TinyShapes, tiny_config  # noqa: E402

from mrcnn_edu.model import build_mask_rcnn  # noqa: E402
from mrcnn_edu.utils import UserError  # noqa: E402
from mrcnn_edu.weights import card_path, load_weights, read_card, save_weights  # noqa: E402

CFG = tiny_config()
CLASSES = list(TinyShapes.class_names)
CARD = {"command": "mrcnn-edu train small --data shapes", "data": "TinyShapes", "metrics": {"segm_AP": 0.42}}


@pytest.fixture(scope="module")
def model():
    """The tiny model with non-trivial weights and batch-norm statistics (one training step)."""
    torch.manual_seed(0)
    model = build_mask_rcnn(CFG)
    images, targets = zip(*(TinyShapes(2)[i] for i in range(2)))
    losses = model(list(images), list(targets))
    sum(losses.values()).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return model.eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    assert save_weights(path, model, CFG, CLASSES, CARD) == path
    return path


def test_round_trip_gives_the_same_model_and_outputs(model, saved):
    loaded, card = load_weights(saved)
    assert not loaded.training
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert any("running_mean" in k and v.abs().sum() > 0 for k, v in expected.items())  # BN statistics kept
    image = TinyShapes(1, seed=5)[0][0]
    with torch.no_grad():
        ours, theirs = model([image])[0], loaded([image])[0]
    assert len(ours["boxes"]) > 0 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert card == {"config": CFG.to_dict(), "class_names": CLASSES, **CARD}


def test_card_is_readable_without_the_tensors_and_beside_the_file(saved):
    assert read_card(saved) == load_weights(saved)[1]
    beside = card_path(saved)
    assert beside.name == "model.card.json"
    assert json.loads(beside.read_text()) == {"config": CFG.to_dict(), "class_names": CLASSES, **CARD}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.card.json", "model.safetensors"]  # no temp files


def test_metadata_holds_config_classes_and_card(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "mrcnn_edu.weights"
    assert json.loads(metadata["config"]) == CFG.to_dict()
    assert json.loads(metadata["class_names"]) == CLASSES and json.loads(metadata["card"]) == CARD


def test_saving_leaves_the_random_state_alone(model, tmp_path):
    state = torch.get_rng_state()
    save_weights(tmp_path / "w.safetensors", model, CFG, CLASSES, write_card_file=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert not card_path(tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is truncated or corrupt"), ("garbage", "is truncated or corrupt"),
    ("empty", "is truncated or corrupt"), ("missing", "does not exist"),
])
def test_damaged_files_are_refused_by_name(saved, tmp_path, damage, message):
    path = tmp_path / "damaged.safetensors"
    data = saved.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not safetensors" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    for load in (load_weights, read_card):
        with pytest.raises(UserError) as error:
            load(path)
        assert str(path) in str(error.value) and message in str(error.value)


def test_file_without_our_metadata_is_refused(saved, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(load_file(saved), path)  # the same tensors, no metadata
    with pytest.raises(UserError, match="no mrcnn_edu metadata") as error:
        load_weights(path)
    assert str(path) in str(error.value) and "load_torchvision_state_dict" in str(error.value)


def test_tensors_that_do_not_fit_the_config_are_refused(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(saved)
    del tensors["roi_heads.box_predictor.class_logits.bias"]
    path = tmp_path / "missing_tensor.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(UserError, match="missing keys") as error:
        load_weights(path)
    assert str(path) in str(error.value)


def test_save_checks_its_arguments(model, tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(UserError, match="class_names: expected 3 names"):
        save_weights(path, model, CFG, CLASSES[:2], CARD)
    other = dataclasses.replace(CFG, num_classes=5)
    with pytest.raises(UserError, match="does not match its config"):
        save_weights(path, model, other, ["bg", "a", "b", "c", "d"], CARD)
    with pytest.raises(UserError, match="card: must be JSON-ready"):
        save_weights(path, model, CFG, CLASSES, {"metrics": {"AP": float("nan")}})
    assert not path.exists()
