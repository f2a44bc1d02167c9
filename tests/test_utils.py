"""Tests for mrcnn_edu.utils: describe, fast mode, devices, paths, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from mrcnn_edu import utils


def test_describe_tensor(capsys):
    text = utils.describe(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "x")
    assert text == capsys.readouterr().out.strip()
    assert "shape=(2, 2)" in text and "float32" in text and "min=-2" in text and "max=4" in text
    assert "mean=1.5" in text


def test_describe_dict_empty_bool_and_int():
    text = utils.describe({"boxes": torch.zeros(0, 4), "keep": torch.tensor([True, False]),
                           "labels": torch.tensor([3, 7])})
    lines = text.splitlines()
    assert len(lines) == 3
    assert "(empty)" in lines[0] and "true=1/2" in lines[1] and "int64" in lines[2] and "max=7" in lines[2]


def test_fast_mode(monkeypatch):
    monkeypatch.setenv("MRCNN_EDU_FAST", "0")
    assert not utils.fast_mode()
    monkeypatch.setenv("MRCNN_EDU_FAST", "yes")
    assert utils.fast_mode()


def test_paths_and_report(monkeypatch, tmp_path):
    monkeypatch.setenv("MRCNN_EDU_CACHE", str(tmp_path / "c"))
    assert utils.cache_dir() == tmp_path / "c"
    assert utils.repo_root() is not None and (utils.repo_root() / "notebooks").is_dir()
    report = utils.environment_report()
    assert report["torch"] == torch.__version__
    assert report["cache dir"] == str(tmp_path / "c")
    assert report["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert utils.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    utils.atomic_write_text(target, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        utils.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "temporary file left behind"


def test_nothing_downloaded(torch_home):
    import torchvision

    torchvision.models.resnet18(weights=None)
    torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    assert os.environ["TORCH_HOME"] == str(torch_home)
    assert not any(torch_home.rglob("*")), "something was written to TORCH_HOME"
