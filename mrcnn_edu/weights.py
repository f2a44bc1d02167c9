"""Weights files: a model's tensors in safetensors, with the config and a JSON card to rebuild it.

Taught in: ``07_training.ipynb`` (saving the trained model; the case study ships one, ``09``).

Shape shorthand: none -- this module stores tensors of every shape as they are.

A weights file is one ``.safetensors`` file (tensors only, no pickle: safe to open from anyone)
whose string metadata holds everything needed to use it::

    "format"        "mrcnn_edu.weights"  (and "format_version")
    "config"        MaskRCNNConfig as JSON: the builder makes the architecture from it
    "class_names"   JSON list, index = label (0 = "__background__")
    "card"          JSON object: how the weights were made -- training command, data, metrics

:func:`save_weights` writes it atomically (a crash never leaves half a file) and, by default, the
card again beside it as ``<name>.card.json`` for people to read. :func:`load_weights` rebuilds the
model from the stored config and loads the tensors; :func:`read_card` reads only the metadata.
A missing, truncated or foreign file gives a :class:`~mrcnn_edu.utils.UserError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mrcnn_edu.config import ConfigError, MaskRCNNConfig
from mrcnn_edu.utils import UserError, atomic_write_bytes, atomic_write_text, load_state_dict_checked

FORMAT = "mrcnn_edu.weights"
FORMAT_VERSION = "1"
CARD_SUFFIX = ".card.json"


def save_weights(path: str | os.PathLike, model: nn.Module, config: MaskRCNNConfig,
                 class_names: Sequence[str], card: Mapping[str, Any] | None = None,
                 write_card_file: bool = True) -> Path:
    """Write ``model``'s state dict to a safetensors file with its config, classes and card.

    Args:
        path: the ``.safetensors`` file to write (its folder is created).
        model (MaskRCNN): the model (a ``DistributedDataParallel`` wrapper is unwrapped).
        config (MaskRCNNConfig): the config ``model`` was built from; checked against it.
        class_names: ``config.num_classes`` names, index = label, ``class_names[0]`` the background.
        card (dict, optional): JSON-ready facts about the weights, e.g. ``{"command": ...,
            "data": ..., "metrics": {...}}``.
        write_card_file (bool): also write ``<stem>.card.json`` beside it (config, classes and
            card, indented), for reading on GitHub or in a terminal.

    Returns:
        The path written.

    Raises:
        UserError: ``class_names`` or ``card`` do not fit, or the model does not match ``config``.
    """
    path = Path(path)
    model = getattr(model, "module", model)  # DistributedDataParallel -> the model itself
    if not isinstance(config, MaskRCNNConfig):
        raise TypeError(f"config: expected a MaskRCNNConfig, got {type(config).__name__}")
    class_names = [str(name) for name in class_names]
    if len(class_names) != config.num_classes:
        raise UserError(f"class_names: expected {config.num_classes} names (config.num_classes, background "
                        f"first), got {len(class_names)}: {class_names}")
    try:
        card_json = json.dumps(dict(card or {}), indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise UserError(f"card: must be JSON-ready (dicts, lists, str, finite numbers): {error}") from None
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    _check_matches_config(state, config)

    from safetensors.torch import save

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json(),
                "class_names": json.dumps(class_names), "card": card_json}
    atomic_write_bytes(path, save(state, metadata=metadata))
    if write_card_file:
        readable = {"config": config.to_dict(), "class_names": class_names, **json.loads(card_json)}
        atomic_write_text(card_path(path), json.dumps(readable, indent=2) + "\n")
    return path


def card_path(path: str | os.PathLike) -> Path:
    """The readable card beside a weights file: ``model.safetensors`` -> ``model.card.json``."""
    path = Path(path)
    return path.with_name(path.stem + CARD_SUFFIX)


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card of a weights file, with ``"config"`` (a dict) and ``"class_names"`` added in front.

    Reads only the metadata (no tensors). Raises :class:`UserError` like :func:`load_weights`.
    """
    metadata, _ = _read(path, tensors=False)
    return _card(path, metadata)[0]


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a weights file.

    Args:
        path: a file written by :func:`save_weights` (or ``mrcnn-edu train``).
        device: where to put the model.

    Returns:
        ``(model, card)``: the :class:`~mrcnn_edu.model.MaskRCNN` in eval mode, and its card
        (a dict with ``"config"`` and ``"class_names"`` first, then the saved card's keys).

    Raises:
        UserError: the file is missing, truncated or corrupt, has no mrcnn_edu metadata, or its
            tensors do not fit its config (each message names the file).
    """
    from mrcnn_edu.model import build_mask_rcnn

    metadata, state = _read(path, tensors=True)
    card, config = _card(path, metadata)
    model = build_mask_rcnn(config)
    try:
        load_state_dict_checked(model, state, str(path))
    except ValueError as error:
        raise UserError(str(error)) from None
    return model.to(device).eval(), card


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata (and the tensors) of a safetensors file; UserError if unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist" if not path.exists()
                        else f"weights file {path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except Exception as error:  # safetensors raises its own error types for bad headers/buffers
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"weights file {path} is truncated or corrupt (not a readable safetensors file: "
                        f"{reason}); write it again or use another file") from None
    return metadata, state


def _card(path, metadata: Mapping[str, str]) -> tuple[dict[str, Any], MaskRCNNConfig]:
    """Parse our metadata: (card with config and class names, config)."""
    missing = [key for key in ("config", "class_names", "card") if key not in metadata]
    if metadata.get("format") != FORMAT or missing:
        raise UserError(f"weights file {path} has no mrcnn_edu metadata (format, config, class_names, card): it "
                        f"was not written by mrcnn_edu's save_weights or 'mrcnn-edu train'. A torchvision "
                        f"state dict loads with mrcnn_edu.model.load_torchvision_state_dict")
    try:
        config = MaskRCNNConfig.from_json(metadata["config"])
        class_names = json.loads(metadata["class_names"])
        card = json.loads(metadata["card"])
    except (ConfigError, json.JSONDecodeError) as error:
        raise UserError(f"weights file {path}: unreadable metadata: {error}") from None
    if not isinstance(card, dict) or not isinstance(class_names, list) or len(class_names) != config.num_classes:
        raise UserError(f"weights file {path}: inconsistent metadata (class_names must list "
                        f"{config.num_classes} names, card must be a JSON object)")
    return {"config": config.to_dict(), "class_names": class_names, **card}, config


def _check_matches_config(state: Mapping[str, torch.Tensor], config: MaskRCNNConfig) -> None:
    """The state dict must be exactly what ``build_mask_rcnn(config)`` makes, so the file loads again.

    The reference model is built under ``fork_rng``: its random initialisation leaves the global
    random state (and so a training run's reproducibility) untouched.
    """
    from mrcnn_edu.model import build_mask_rcnn

    with torch.random.fork_rng(devices=[]):
        expected = build_mask_rcnn(config).state_dict()
    wrong = [key for key in expected if key not in state or state[key].shape != expected[key].shape]
    extra = [key for key in state if key not in expected]
    if wrong or extra:
        raise UserError(f"the model does not match its config (was it built from another config?): "
                        f"{len(wrong)} missing or reshaped tensors, e.g. {wrong[:3]}; {len(extra)} unexpected, "
                        f"e.g. {extra[:3]}")
