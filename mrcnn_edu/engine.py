"""Training: the loop, its learning-rate schedule, checkpoints, exact resume and multi-process runs.

Taught in: ``07_training.ipynb`` (the case study, ``09``, trains in three stages with it, and
``mrcnn-edu train`` is a thin layer over :func:`train`).

Shape shorthand used in this module:
    N   images in a batch (``TrainConfig.batch_size``, per process)
    G   ground-truth objects of an image
    S   optimisation steps per epoch (per process: ``ceil(len(train_set) / world_size / N)``)

The heart is :func:`train_step` -- forward, check, backward, step -- run by :func:`train_one_epoch`
over a data loader. :func:`train` wraps them with everything a real run needs:

* **Optimiser and schedule** (:class:`TrainConfig`): SGD or AdamW; linear warm-up, then a
  constant, step or cosine schedule; gradient clipping. The learning rate of step ``s`` is a pure
  function of ``s`` (:func:`lr_factor`, plotted with :func:`lr_schedule`).
* **Stages** (:class:`Stage`): a run is a sequence of stages, each with its epochs, a learning-rate
  multiplier and what trains. ``"heads"`` freezes the ResNet trunk (``backbone.body``) and trains
  the FPN, the RPN and the RoI heads, as the original case study (matterport's ``layers="heads"``
  trains ``fpn_*``, ``rpn_*`` and ``mrcnn_*``); ``"all"`` trains everything the model config lets
  train (``backbone.trainable_layers``); ``"backbone_from:layer3"`` trains ``layer3``, ``layer4``
  of the trunk and everything after it (matterport's ``"4+"``). Batch-norm layers whose parameters
  are all frozen are kept in eval mode, so a frozen trunk's statistics stay frozen too.
  The original's three stages are one config: :func:`three_stage_schedule`.
* **Validation** every ``eval_every`` epochs: the loss on the validation set, and COCO AP by
  ``evaluation.evaluate_model``; the *best* checkpoint is chosen by mask AP (box AP without a
  mask branch), not by loss.
* **Files** in ``out_dir`` (rank 0 only, each written atomically): ``last.pt`` (every epoch and
  every ``checkpoint_every`` steps), ``best.pt``, ``history.csv`` (one row per epoch),
  ``history.json`` (every step too), and at the end ``model.safetensors`` + ``model.card.json``
  (``mrcnn_edu.weights``; the best epoch's weights when there was validation, else the last).
* **Exact resume.** A checkpoint holds the model, optimiser, scheduler and gradient-scaler states,
  every random state (torch, CUDA, numpy, python; of every process), both configs, the step and
  the history -- tensors and plain containers only, so ``torch.load(weights_only=True)`` reads it.
  Nothing else carries state: the data order of epoch ``e`` is a permutation drawn from
  ``(seed, e)`` (``DistributedSampler``), and each item's augmentation draws from a generator
  seeded by ``(seed, e, index)`` (:class:`SeededItems`). Resuming at step ``s`` of an epoch
  therefore skips the first ``s`` batches of that same order, and an interrupted-then-resumed
  run ends with bit-identical weights (on the CPU; cuDNN kernels may not be deterministic).
* **Validation does not disturb training**: it runs with every random state saved and restored
  afterwards, and the validation loss runs the model in training mode (losses exist only there)
  with its batch-norm layers in eval mode, so no running statistics move.
* **Divergence**: a non-finite loss term stops the run with :class:`TrainingDiverged`, naming the
  term, the step and the epoch, before that step changes anything; ``last.pt`` stays the last
  good checkpoint.
* **Devices**: CUDA when present (``device="auto"``); mixed precision (``torch.autocast`` and a
  ``GradScaler``) on CUDA only (``amp="auto"``).
* **Several processes** (``torchrun --nproc_per_node=N``): when ``WORLD_SIZE > 1`` the same
  :func:`train` joins the process group (gloo on the CPU, NCCL on GPUs), wraps the model in
  ``DistributedDataParallel`` (gradients are averaged, so every process holds the same weights)
  and gives each process its share of every epoch (``DistributedSampler``). Rank 0 alone
  validates, prints and writes files; the others wait at a barrier. Each process updates its own
  batch-norm statistics; rank 0's are copied to all at the end of every epoch.

In a notebook::

    seed_everything(0)                                  # reproducible initial weights
    model = build_mask_rcnn(cfg)
    history = train(model, cfg, ShapesDataset(200), ShapesDataset(50, seed=1),
                    TrainConfig(lr=0.02, stages=(Stage(epochs=8),)), "runs/shapes")
    history.column("val_loss"), history.column("segm_AP")
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import random
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mrcnn_edu.config import ConfigError, MaskRCNNConfig
from mrcnn_edu.data import collate_fn
from mrcnn_edu.model import LOSS_KEYS
from mrcnn_edu.utils import UserError, atomic_write_bytes, atomic_write_text, pick_device

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")
TRUNK_LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The ResNet stages ``"backbone_from:<layer>"`` may name (the stem trains with ``layer1``)."""

CHECKPOINT_FORMAT = "mrcnn_edu.checkpoint"
LAST, BEST, WEIGHTS = "last.pt", "best.pt", "model.safetensors"
HISTORY_CSV, HISTORY_JSON = "history.csv", "history.json"

RESUMABLE_FIELDS = ("device", "num_workers", "eval_every", "checkpoint_every", "max_val_images")
"""TrainConfig fields that may change between a run and its resumption (they do not change what
is learned); any other difference is refused."""


class TrainingDiverged(UserError):
    """A loss term became NaN or infinite; the message names the term, the step and the epoch."""


# ----------------------------------------------------------------------------------------------
# Value checks (for the configs)
# ----------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A part of a run: ``epochs`` epochs at ``lr_scale`` x the base learning rate, training ``trainable``.

    ``trainable``: ``"all"`` (everything the model config lets train), ``"heads"`` (the trunk
    ``backbone.body`` frozen; FPN, RPN and RoI heads train) or ``"backbone_from:<layer>"`` with
    ``<layer>`` one of ``layer1`` .. ``layer4`` (that trunk stage and the ones above it train, as
    well as FPN and heads).
    """

    epochs: int
    lr_scale: float = 1.0
    trainable: str = "all"

    def __post_init__(self) -> None:
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"epochs: expected a positive int, got {self.epochs!r}")
        if not _is_number(self.lr_scale) or not self.lr_scale > 0:
            raise ConfigError(f"lr_scale: expected a positive number, got {self.lr_scale!r}")
        if trainable_trunk_layers(self.trainable) is None and self.trainable != "all":
            raise ConfigError(f"trainable: expected 'all', 'heads' or 'backbone_from:<layer>' with <layer> one of "
                              f"{', '.join(TRUNK_LAYERS)}, got {self.trainable!r}")


def trainable_trunk_layers(trainable: str) -> tuple[str, ...] | None:
    """The trunk stages a stage trains: ``()`` for ``"heads"``, ``("layer3", "layer4")`` for
    ``"backbone_from:layer3"``; ``None`` for ``"all"`` (and for anything invalid)."""
    if trainable == "heads":
        return ()
    prefix = "backbone_from:"
    if isinstance(trainable, str) and trainable.startswith(prefix) and trainable[len(prefix):] in TRUNK_LAYERS:
        return TRUNK_LAYERS[TRUNK_LAYERS.index(trainable[len(prefix):]):]
    return None


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model is described by ``MaskRCNNConfig``). JSON round trip as the model config.

    Optimiser: ``optimizer`` ``"sgd"`` (with ``momentum``) or ``"adamw"``; ``lr`` the base learning
    rate; ``weight_decay``; ``grad_clip``: ``None`` or the maximal gradient norm.
    Schedule (per step, :func:`lr_factor`): linear warm-up from ``warmup_factor * lr`` to ``lr`` over
    the first ``warmup_iters`` steps; then ``"constant"``, ``"step"`` (times ``gamma`` at each epoch
    in ``milestones``, counted over the whole run) or ``"cosine"`` (from ``lr`` to 0 over the run);
    times the current stage's ``lr_scale``.
    ``stages``: the :class:`Stage` sequence; the run lasts ``sum(stage.epochs)`` epochs.
    ``batch_size``: images per step (per process). ``seed``: data order, augmentation and sampling.
    ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    ``amp``: mixed precision, ``"auto"`` = on for CUDA only; ``True`` needs CUDA.
    ``num_workers``: data-loader processes. ``eval_every``: validate every that many epochs (and after
    the last). ``checkpoint_every``: also write ``last.pt`` every that many steps (``None``: each
    epoch only). ``max_val_images``: validate on the first that many images only (``None``: all).
    ``augment``: names from ``mrcnn_edu.data.AUGMENTATIONS`` (``"hflip"``, ``"flip"``, ``"rot90"``,
    ``"scale"``, ``"color"``) applied to training items (after the dataset's own ``transforms``).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 2
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | str = "auto"
    num_workers: int = 0
    eval_every: int = 1
    checkpoint_every: int | None = None
    max_val_images: int | None = None
    augment: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = (Stage(epochs=10),)

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if not _is_number(self.lr) or not self.lr > 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: expected a number in [0, 1), got {self.momentum!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        for name in ("batch_size", "eval_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        for name in ("warmup_iters", "seed", "num_workers"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an int >= 0, got {getattr(self, name)!r}")
        if not _is_number(self.warmup_factor) or not 0 < self.warmup_factor <= 1:
            raise ConfigError(f"warmup_factor: expected a number in (0, 1], got {self.warmup_factor!r}")
        if not _is_number(self.gamma) or not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma: expected a number in (0, 1], got {self.gamma!r}")
        if isinstance(self.milestones, list):
            object.__setattr__(self, "milestones", tuple(self.milestones))
        if not isinstance(self.milestones, tuple) or not all(_is_int(m) and m > 0 for m in self.milestones) or list(
                self.milestones) != sorted(set(self.milestones)):
            raise ConfigError(f"milestones: expected increasing positive epoch numbers, got {self.milestones!r}")
        for name in ("grad_clip", "checkpoint_every", "max_val_images"):
            value, kind = getattr(self, name), "number" if name == "grad_clip" else "int"
            if value is not None and (not (_is_number if kind == "number" else _is_int)(value) or not value > 0):
                raise ConfigError(f"{name}: expected null (none) or a positive {kind}, got {value!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>', "
                                  f"got {self.device!r}") from None
        if self.amp not in (True, False, "auto"):
            raise ConfigError(f"amp: expected true, false or 'auto', got {self.amp!r}")
        if isinstance(self.augment, (list, str)):
            object.__setattr__(self, "augment", (self.augment,) if isinstance(self.augment, str) else tuple(self.augment))
        from mrcnn_edu.data import AUGMENTATIONS

        if not isinstance(self.augment, tuple) or any(name not in AUGMENTATIONS for name in self.augment):
            raise ConfigError(f"augment: expected a list of names from {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if isinstance(self.stages, list):
            object.__setattr__(self, "stages", tuple(self.stages))
        if not isinstance(self.stages, tuple) or not self.stages or not all(isinstance(s, Stage) for s in self.stages):
            raise ConfigError(f"stages: expected a non-empty list of Stage(epochs, lr_scale, trainable), "
                              f"got {self.stages!r}")
        if self.milestones and self.milestones[-1] >= self.epochs:
            raise ConfigError(f"milestones: epoch {self.milestones[-1]} is not before the end of the run "
                              f"({self.epochs} epochs)")

    @property
    def epochs(self) -> int:
        """Epochs of the whole run (all stages)."""
        return sum(stage.epochs for stage in self.stages)

    def stage_index(self, epoch: int) -> int:
        """The index of the stage that epoch ``epoch`` (0-based) belongs to."""
        ends = list(accumulate(stage.epochs for stage in self.stages))  # e.g. 6, 12, 24
        return min(bisect_right(ends, epoch), len(self.stages) - 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists, stages as dicts)."""
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        data["augment"] = list(self.augment)
        data["stages"] = [dataclasses.asdict(stage) for stage in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused.

        Raises:
            ConfigError: naming the key (``stages[1].trainable``) or the bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"train config: expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key in the train config; expected one of: {', '.join(names)}")
        kwargs = dict(data)
        if "stages" in kwargs:
            if not isinstance(kwargs["stages"], (list, tuple)):
                raise ConfigError(f"stages: expected a list of {{epochs, lr_scale, trainable}}, "
                                  f"got {kwargs['stages']!r}")
            kwargs["stages"] = tuple(_stage_from_dict(stage, i) for i, stage in enumerate(kwargs["stages"]))
        try:
            return cls(**kwargs)
        except TypeError as error:
            raise ConfigError(f"train config: {error}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"train config JSON: {error}") from None
        return cls.from_dict(data)


def _stage_from_dict(data: Any, index: int) -> Stage:
    where = f"stages[{index}]"
    if isinstance(data, Stage):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected {{epochs, lr_scale, trainable}}, got {data!r}")
    unknown = [key for key in data if key not in ("epochs", "lr_scale", "trainable")]
    if unknown or "epochs" not in data:
        problem = f"unknown key {unknown[0]!r}" if unknown else "missing key 'epochs'"
        raise ConfigError(f"{where}: {problem}; a stage has epochs, lr_scale, trainable")
    try:
        return Stage(**data)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None


def three_stage_schedule(heads_epochs: int = 6, all_epochs: int = 6, low_lr_epochs: int = 12,
                         heads_lr_scale: float = 2.0, low_lr_scale: float = 0.2) -> tuple[Stage, Stage, Stage]:
    """The original case study's schedule: heads only at 2x the base rate for 6 epochs, then all
    layers at the base rate to epoch 12, then all layers at a fifth of it to epoch 24.

    ``TrainConfig(lr=1e-4, schedule="constant", stages=three_stage_schedule())`` is that run.
    """
    return (Stage(heads_epochs, heads_lr_scale, "heads"), Stage(all_epochs, 1.0, "all"),
            Stage(low_lr_epochs, low_lr_scale, "all"))


# ----------------------------------------------------------------------------------------------
# Learning rate, stages, devices, random states
# ----------------------------------------------------------------------------------------------


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of step ``step`` (0-based, over the whole run) as a multiple of ``config.lr``.

    warm-up (linear, first ``warmup_iters`` steps) x schedule x the stage's ``lr_scale``.
    """
    epoch = step // steps_per_epoch
    factor = config.stages[config.stage_index(epoch)].lr_scale
    if step < config.warmup_iters:
        alpha = step / config.warmup_iters
        factor *= config.warmup_factor * (1 - alpha) + alpha
    if config.schedule == "step":
        factor *= config.gamma ** bisect_right(config.milestones, epoch)
    elif config.schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * step / (config.epochs * steps_per_epoch)))
    return factor


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step of the run (to plot the schedule)."""
    return [config.lr * lr_factor(config, step, steps_per_epoch) for step in range(config.epochs * steps_per_epoch)]


def apply_stage(model: nn.Module, stage: Stage, model_config: MaskRCNNConfig) -> None:
    """Set ``requires_grad`` of every parameter for ``stage`` (see :class:`Stage`).

    The trunk first gets the model config's own trainable stages (``backbone.trainable_layers``),
    then the stage may freeze more of it; the FPN, RPN and RoI heads always train.
    """
    model = _unwrap(model)
    model.requires_grad_(True)
    body = model.backbone.body
    body.set_trainable_layers(model_config.backbone.trainable_layers)
    layers = trainable_trunk_layers(stage.trainable)
    if layers is not None:  # "heads" or "backbone_from:<layer>"
        for name, parameter in body.named_parameters():
            top_module = name.split(".")[0]  # "layer3.1.conv2.weight" -> "layer3"
            if top_module not in layers:
                parameter.requires_grad_(False)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except batch-norm layers whose parameters are all frozen stay in eval
    mode (their running statistics must not drift while the layers around them are frozen)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def resolve_device(config: TrainConfig, local_rank: int | None = None) -> torch.device:
    """``config.device``; ``"auto"`` = CUDA if present. Under torchrun with CUDA: ``cuda:<local rank>``."""
    device = pick_device(None if config.device == "auto" else config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {config.device!r} asks for CUDA, but no GPU is available (use 'auto' or 'cpu')")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def use_amp(config: TrainConfig, device: torch.device) -> bool:
    """Mixed precision: ``amp="auto"`` is on for CUDA only; ``amp=True`` on a CPU is refused."""
    if config.amp == "auto":
        return device.type == "cuda"
    if config.amp and device.type != "cuda":
        raise UserError(f"amp: mixed precision needs a CUDA device, the run uses {device} (set amp to 'auto' or false)")
    return bool(config.amp)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and CUDA). Call it before building a model
    so that its initial weights are reproducible too."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_states() -> dict[str, Any]:
    """Every random state, as tensors and lists (``torch.load(weights_only=True)`` reads them back)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(python_state), gauss_next],
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """The inverse of :func:`get_rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


@contextlib.contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Run a block (validation) without changing any random state seen by the code after it."""
    states = get_rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


# ----------------------------------------------------------------------------------------------
# Data: the order of an epoch and each item's augmentation depend on (seed, epoch) only
# ----------------------------------------------------------------------------------------------


class SeededItems(Dataset):
    """``dataset[i]`` with torch's global generator seeded from ``(seed, epoch, i)`` meanwhile.

    The augmentations (``mrcnn_edu.data``) draw from torch's global generator; seeding it per item
    makes an item's augmentation the same whatever the number of loader workers, and whether the
    epoch ran in one go or was resumed half-way. The caller's random state is restored afterwards.
    ``augment`` (``TrainConfig.augment`` made by ``data.make_augmentation``) is applied after the
    dataset's own ``transforms``, under the same seed.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, augment: Callable | None = None) -> None:
        self.dataset, self.seed, self.epoch, self.augment = dataset, seed, epoch, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            image, target = self.dataset[index]
            return (image, target) if self.augment is None else self.augment(image, target)


def epoch_indices(dataset_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's share of epoch ``epoch``, in order: a permutation drawn from ``(seed, epoch)``
    (``DistributedSampler``: padded to a multiple of ``world_size``, every ``world_size``-th index)."""
    sampler = DistributedSampler(range(dataset_size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def make_loader(dataset: Dataset, config: TrainConfig, epoch: int, skip_batches: int = 0, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """The batches of epoch ``epoch`` for this process, without the first ``skip_batches`` (resume)."""
    indices = epoch_indices(len(dataset), config.seed, epoch, rank, world_size)[skip_batches * config.batch_size:]
    # The loader's own generator (instead of torch's global one) seeds its workers: creating a loader
    # then leaves the global random state alone, as resuming requires.
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    from mrcnn_edu.data import make_augmentation

    augment = make_augmentation(config.augment)
    return DataLoader(SeededItems(dataset, config.seed, epoch, augment), batch_size=config.batch_size, sampler=indices,
                      collate_fn=collate_fn, num_workers=config.num_workers, generator=generator)


def to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Images and the tensors of the targets on ``device`` (``image_id`` and other values stay)."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{key: value.to(device) if isinstance(value, Tensor) else value for key, value in target.items()}
               for target in targets]
    return images, targets


def steps_per_epoch(dataset_size: int, batch_size: int, world_size: int = 1) -> int:
    """S: the batches each process takes per epoch (the last one may be smaller)."""
    return math.ceil(math.ceil(dataset_size / world_size) / batch_size)


# ----------------------------------------------------------------------------------------------
# The training step and the epoch loop
# ----------------------------------------------------------------------------------------------


def train_step(model: nn.Module, images: list[Tensor], targets: list[dict], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, grad_clip: float | None = None, amp: bool = False,
               where: str = "") -> dict[str, float]:
    """One optimisation step: forward, check the losses, backward, (clip,) update.

    Args:
        model: the MaskRCNN (or its DistributedDataParallel wrapper), in training mode.
        images (list of N Tensor[3, H, W]) and targets (list of N dicts: boxes Float[G, 4],
            labels Int64[G], masks UInt8[G, H, W]), on the model's device.
        scaler: scales the loss for mixed precision (a disabled scaler is a no-op).
        where: the position for an error message, e.g. ``"step 17 (epoch 3, batch 2 of 8)"``.

    Returns:
        The loss terms and their sum ``"loss"`` as floats (averaged over processes).

    Raises:
        TrainingDiverged: a loss term is NaN or infinite (checked before anything is updated).
    """
    with torch.autocast(device_type=images[0].device.type, enabled=amp):
        losses = model(images, targets)
    loss = sum(losses.values())

    values = _average_over_processes({"loss": loss, **losses})  # the same numbers on every process
    for name, value in values.items():
        if name != "loss" and not math.isfinite(value):
            raise TrainingDiverged(f"training diverged: {name} is {value}" + (f" at {where}" if where else ""))

    optimizer.zero_grad()
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return values


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    device: torch.device, epoch: int, epochs: int, first_step: int, steps_per_epoch: int,
                    grad_clip: float | None = None, amp: bool = False,
                    on_step: Callable[[dict[str, float]], None] | None = None, progress: bool = True) -> None:
    """Run ``loader``'s batches through :func:`train_step`, the scheduler after each step.

    Args:
        epoch, epochs: this epoch (0-based) and how many the run has (for the progress bar).
        first_step: the run's step number (0-based) of the loader's first batch: a resumed epoch
            starts later than ``epoch * steps_per_epoch``.
        on_step: called after each step with ``{"step", "epoch" (1-based), "lr", "loss", <terms>}``.
    """
    from tqdm.auto import tqdm

    done = first_step - epoch * steps_per_epoch
    running_losses = []
    with tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
              dynamic_ncols=True) as bar:
        for step, (images, targets) in enumerate(loader, start=first_step):
            images, targets = to_device(images, targets, device)
            lr = optimizer.param_groups[0]["lr"]
            batch = step - epoch * steps_per_epoch + 1
            where = f"step {step + 1} (epoch {epoch + 1}, batch {batch} of {steps_per_epoch})"
            losses = train_step(model, images, targets, optimizer, scaler, grad_clip, amp, where)
            scheduler.step()  # the learning rate of the next step
            running_losses.append(losses["loss"])
            bar.set_postfix(loss=f"{np.mean(running_losses[-20:]):.3f}", lr=f"{lr:.2g}")
            bar.update()
            if on_step is not None:
                on_step({"step": step + 1, "epoch": epoch + 1, "lr": lr, **losses})


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 2,
                    max_images: int | None = None, seed: int = 0) -> dict[str, float]:
    """Mean loss terms (and their sum ``"loss"``) over ``dataset``, without training anything.

    Losses only exist in training mode, so the model runs in training mode, but without
    gradients and with every batch-norm layer in eval mode (their running statistics stay as
    they are; there is no dropout). The RPN and RoI sampling is drawn from ``seed``; all random
    states are restored afterwards, so calling this does not change the training that follows.
    """
    model = _unwrap(model)
    was_training = model.training
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    totals: dict[str, float] = {}
    with preserved_rng_states():
        torch.manual_seed(seed)
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        try:
            for start in range(0, count, batch_size):
                images, targets = collate_fn([dataset[i] for i in range(start, min(start + batch_size, count))])
                losses = model(*to_device(images, targets, device))
                losses = {"loss": sum(losses.values()), **losses}
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * len(images)
        finally:
            model.train(was_training)
    return {name: value / max(count, 1) for name, value in totals.items()}


def _validate(model: nn.Module, val_set: Dataset, config: TrainConfig, device: torch.device,
              evaluate_fn: Callable | None, progress: bool) -> dict[str, float]:
    """Validation loss and AP as one flat record: ``val_loss``, ``val_loss_mask``, ``segm_AP``, ..."""
    record = {f"val_{name}": value for name, value in validation_loss(
        model, val_set, device, config.batch_size, config.max_val_images, config.seed).items()}
    if evaluate_fn is None:
        from mrcnn_edu.evaluation import evaluate_model as evaluate_fn
    model = _unwrap(model)
    with preserved_rng_states():
        metrics = evaluate_fn(model, val_set, device=device, batch_size=config.batch_size, progress=progress,
                              max_images=config.max_val_images)
    for iou_type in ("segm", "bbox"):
        for key in ("AP", "AP50", "AP75"):
            if iou_type in metrics and key in metrics[iou_type]:
                record[f"{iou_type}_{key}"] = float(metrics[iou_type][key])
    return record


def selection_metric(record: Mapping[str, Any]) -> tuple[str, float] | None:
    """What picks the best checkpoint: mask AP (``segm_AP``), or box AP without a mask branch."""
    for key in ("segm_AP", "bbox_AP"):
        if record.get(key) is not None:
            return key, float(record[key])
    return None


# ----------------------------------------------------------------------------------------------
# History
# ----------------------------------------------------------------------------------------------


@dataclass
class History:
    """What happened during a run.

    ``steps``: one dict per step: ``step``, ``epoch`` (both 1-based), ``lr``, ``loss`` and each loss term.
    ``epochs``: one dict per epoch: ``epoch``, ``stage``, ``trainable``, ``lr`` (at the end),
    ``train_loss`` and ``train_<term>`` (means over the epoch's steps), and after validation
    ``val_loss``, ``val_<term>``, ``segm_AP``, ``segm_AP50``, ``segm_AP75``, ``bbox_AP``, ... ;
    ``seconds`` of training.
    ``best_epoch`` / ``best_metric``: the epoch of ``best.pt`` and its ``segm_AP`` (or ``bbox_AP``).
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    best_metric_name: str | None = None

    def column(self, key: str, per: str = "epoch") -> list:
        """One column of the epoch table (``per="epoch"``) or the step table (``per="step"``); ``None`` where absent."""
        rows = self.epochs if per == "epoch" else self.steps
        return [row.get(key) for row in rows]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "History":
        return cls(**{f.name: data.get(f.name, f.default if f.default is not dataclasses.MISSING else [])
                      for f in dataclasses.fields(cls)})

    def write(self, out_dir: str | os.PathLike) -> None:
        """``history.json`` (everything) and ``history.csv`` (the epoch table), atomically."""
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / HISTORY_JSON, json.dumps(self.to_dict(), indent=1) + "\n")
        columns = list(dict.fromkeys(key for row in self.epochs for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.epochs)
        atomic_write_text(out_dir / HISTORY_CSV, text.getvalue())


def _epoch_record(history: History, epoch: int, config: TrainConfig, seconds: float) -> dict[str, Any]:
    """The epoch's row: means of its steps' losses (from the history, so a resumed epoch counts all)."""
    steps = [row for row in history.steps if row["epoch"] == epoch + 1]
    stage_index = config.stage_index(epoch)
    record: dict[str, Any] = {"epoch": epoch + 1, "stage": stage_index + 1,
                              "trainable": config.stages[stage_index].trainable, "lr": steps[-1]["lr"]}
    for name in ["loss", *[key for key in LOSS_KEYS if steps and key in steps[0]]]:
        record[f"train_{name}"] = float(np.mean([row[name] for row in steps]))
    record["seconds"] = round(seconds, 3)
    return record


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename: the old checkpoint survives any crash."""
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` (``weights_only=True``: no code runs on load).

    Raises:
        UserError: missing, truncated, corrupt or not a training checkpoint (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:160]
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(error).__name__}: {reason}); delete it "
                        f"or pass --resume=none (resume=False in Python) to start over") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not an mrcnn_edu training checkpoint (no 'format': "
                        f"{CHECKPOINT_FORMAT!r}); delete it or pass --resume=none to start over")
    return checkpoint


def _check_same_run(checkpoint: Mapping[str, Any], path: Path, model_config: MaskRCNNConfig,
                    train_config: TrainConfig, class_names: Sequence[str], per_epoch: int, world_size: int) -> None:
    """Resume only the run the checkpoint belongs to; name the first difference."""
    def differences(saved: Mapping, current: Mapping, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
        for key in dict.fromkeys([*saved, *current]):
            a, b = saved.get(key), current.get(key)
            if isinstance(a, Mapping) and isinstance(b, Mapping):
                yield from differences(a, b, f"{prefix}{key}.")
            elif a != b:
                yield f"{prefix}{key}", a, b

    advice = "resume with the same settings, or start over with --resume=none (resume=False in Python)"
    for what, saved, current, skip in (
            ("model config", json.loads(checkpoint["model_config"]), model_config.to_dict(), ()),
            ("train config", json.loads(checkpoint["train_config"]), train_config.to_dict(), RESUMABLE_FIELDS)):
        for name, a, b in differences(saved, current):
            if name not in skip:
                raise UserError(f"cannot resume from {path}: {what} field {name!r} differs ({a!r} in the checkpoint, "
                                f"{b!r} now); {advice}")
    if list(checkpoint["class_names"]) != list(class_names):
        raise UserError(f"cannot resume from {path}: class names differ ({checkpoint['class_names']} in the "
                        f"checkpoint, {list(class_names)} now); {advice}")
    if checkpoint["world_size"] != world_size:
        raise UserError(f"cannot resume from {path}: it was written by a run of {checkpoint['world_size']} "
                        f"process(es), this one has {world_size}; {advice}")
    if checkpoint["steps_per_epoch"] != per_epoch:
        raise UserError(f"cannot resume from {path}: {checkpoint['steps_per_epoch']} steps per epoch in the "
                        f"checkpoint, {per_epoch} now (did the training data change?); {advice}")


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world_size`` (``0`` of ``1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group when torchrun started several processes (``WORLD_SIZE > 1``).

    gloo on the CPU, NCCL with GPUs; an existing group (initialised by the caller) is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # rank 0 validates while the others wait: allow that to take a while
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
        created = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, created)


def _average_over_processes(losses: Mapping[str, Tensor]) -> dict[str, float]:
    """Loss values as floats, averaged over processes (so every process sees the same numbers)."""
    values = torch.stack([value.detach().float() for value in losses.values()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(losses.keys(), values.tolist()))


def _gather_rng_states(ddp: Distributed) -> list[dict[str, Any]]:
    """Every process's random states, in rank order (each needs its own back on resume)."""
    states = get_rng_states()
    if ddp.world_size == 1:
        return [states]
    gathered: list = [None] * ddp.world_size
    dist.all_gather_object(gathered, states)
    return gathered


def _broadcast_buffers(model: nn.Module, ddp: Distributed) -> None:
    """Give every process rank 0's buffers (batch-norm statistics). DDP averages gradients, so the
    parameters agree; but each process updates its running statistics on its own batches (DDP only
    copies rank 0's at the start of each forward pass), so after the last step they differ."""
    if ddp.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def train(model: nn.Module, model_config: MaskRCNNConfig, train_set: Dataset, val_set: Dataset | None,
          train_config: TrainConfig, out_dir: str | os.PathLike, class_names: Sequence[str] | None = None,
          resume: bool | str | os.PathLike = False, evaluate_fn: Callable | None = None, progress: bool = True,
          callbacks: Sequence[Callable[[str, dict], None]] | None = None,
          card: Mapping[str, Any] | None = None) -> History:
    """Train ``model`` on ``train_set`` as ``train_config`` says; validate on ``val_set``; write ``out_dir``.

    Args:
        model (MaskRCNN): built from ``model_config`` (seed before building it -- see
            :func:`seed_everything` -- for reproducible initial weights). Trained in place.
        model_config (MaskRCNNConfig): stored in checkpoints and the weights file.
        train_set, val_set: datasets of ``(image Float[3, H, W], target)`` (``mrcnn_edu.data``);
            ``val_set`` may be ``None`` (no validation, no ``best.pt``).
        train_config (TrainConfig): optimiser, schedule, stages, seed, device, ...
        out_dir: folder for ``last.pt``, ``best.pt``, ``history.csv/json``, ``model.safetensors``.
        class_names: index = label, ``"__background__"`` first; default ``train_set.class_names``.
        resume: ``False`` / ``"none"``: start afresh (files in ``out_dir`` are overwritten);
            ``"auto"`` / ``True``: continue from ``out_dir/last.pt`` if it exists; a path: continue
            from that checkpoint. A corrupt checkpoint or a different config is an error, never a
            silent restart.
        evaluate_fn: ``f(model, dataset, device=, batch_size=, progress=, max_images=) ->
            {"segm": {"AP", "AP50", ...}, "bbox": {...}}``; default ``evaluation.evaluate_model``.
        progress: tqdm bars and a summary line per epoch (rank 0 only).
        callbacks: functions ``f(event, info)`` called on every process; ``event`` is ``"step"``
            (after each step and its checkpoint, if any), ``"epoch"`` (after validation and the
            epoch's checkpoint) or ``"end"``; ``info`` holds ``step``, ``epoch``, ``record``,
            ``history``, ``model``, ``rank``.
        card: extra facts for the weights card, e.g. ``{"command": ..., "data": ...}``.

    Returns:
        The :class:`History` (also in ``out_dir/history.json``).

    Raises:
        TrainingDiverged: a loss became NaN/inf (``last.pt`` is kept as the last good state).
        UserError: bad arguments, an unreadable checkpoint, or one from a different run.
    """
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config: expected a TrainConfig, got {type(train_config).__name__}")
    if not isinstance(model_config, MaskRCNNConfig):
        raise TypeError(f"model_config: expected a MaskRCNNConfig, got {type(model_config).__name__}")
    config, out_dir, callbacks = train_config, Path(out_dir), list(callbacks or [])
    class_names = list(class_names if class_names is not None else _class_names(train_set, model_config))
    if len(class_names) != model_config.num_classes:
        raise UserError(f"class_names: {len(class_names)} classes (background included) {class_names}, but the model "
                        f"config has num_classes={model_config.num_classes}")
    if len(train_set) == 0:
        raise UserError("train_set is empty")

    ddp = setup_distributed(config.device)
    try:
        device = resolve_device(config, ddp.local_rank if ddp.world_size > 1 else None)
        amp = use_amp(config, device)
        progress = progress and ddp.is_main
        model = _unwrap(model).to(device)
        per_epoch = steps_per_epoch(len(train_set), config.batch_size, ddp.world_size)
        total_steps = per_epoch * config.epochs

        optimizer = _make_optimizer(model, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, per_epoch))
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        history, step = History(), 0

        checkpoint_path = _checkpoint_to_resume(resume, out_dir)
        if checkpoint_path is not None:
            checkpoint = load_checkpoint(checkpoint_path)
            _check_same_run(checkpoint, checkpoint_path, model_config, config, class_names, per_epoch, ddp.world_size)
            history, step = _restore(checkpoint, model, optimizer, scheduler, scaler, ddp.rank)
            if progress:
                print(f"resuming from {checkpoint_path} at step {step} of {total_steps}")
        else:
            seed_everything(config.seed + ddp.rank)
        if ddp.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

        def checkpoint_now() -> dict[str, Any]:
            return {"format": CHECKPOINT_FORMAT, "version": 1, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": _gather_rng_states(ddp),
                    "model_config": model_config.to_json(), "train_config": config.to_json(),
                    "class_names": class_names, "step": step, "epoch": step // per_epoch,
                    "steps_per_epoch": per_epoch, "world_size": ddp.world_size,
                    "best_metric": history.best_metric, "history": history.to_dict()}

        def notify(event: str, record: dict | None = None) -> None:
            info = {"step": step, "epoch": step // per_epoch, "record": record, "history": history,
                    "model": model, "rank": ddp.rank}
            for callback in callbacks:
                callback(event, info)

        saved_step: int | None = step if checkpoint_path is not None else None

        def write_last(also_best: bool = False) -> None:
            nonlocal saved_step
            ckpt = checkpoint_now()  # on every process: the random states of all are gathered
            if ddp.is_main:
                save_checkpoint(out_dir / LAST, ckpt)
                if also_best:
                    save_checkpoint(out_dir / BEST, ckpt)
            saved_step = step

        def on_step(record: dict[str, float]) -> None:
            nonlocal step
            step = record["step"]
            history.steps.append(record)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step % per_epoch != 0:
                write_last()  # (the end of an epoch writes its own, after validation)
            notify("step", record)

        wrapped, wrapped_stage = model, None
        try:
            for epoch in range(step // per_epoch, config.epochs):
                stage_index = config.stage_index(epoch)
                if stage_index != wrapped_stage:  # what trains changes between stages: (re)wrap for DDP
                    apply_stage(model, config.stages[stage_index], model_config)
                    wrapped, wrapped_stage = _wrap(model, ddp, device), stage_index
                set_train_mode(model)
                started = time.perf_counter()
                loader = make_loader(train_set, config, epoch, step - epoch * per_epoch, ddp.rank, ddp.world_size)
                train_one_epoch(wrapped, loader, optimizer, scheduler, scaler, device, epoch, config.epochs, step,
                                per_epoch, config.grad_clip, amp, on_step, progress)

                _broadcast_buffers(model, ddp)
                record = _epoch_record(history, epoch, config, time.perf_counter() - started)
                validate = val_set is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs)
                is_best = False
                if validate and ddp.is_main:
                    record.update(_validate(model, val_set, config, device, evaluate_fn, progress))
                    metric = selection_metric(record)
                    if metric is not None and (history.best_metric is None or metric[1] > history.best_metric):
                        history.best_metric_name, history.best_metric = metric
                        history.best_epoch, is_best = epoch + 1, True
                history.epochs.append(record)
                write_last(also_best=is_best)
                if ddp.is_main:
                    history.write(out_dir)
                    if progress:
                        print(_epoch_summary(record, config, is_best), flush=True)
                ddp.barrier()  # the other processes wait for validation and files
                notify("epoch", record)
        except TrainingDiverged as error:
            kept = (f"{out_dir / LAST} (step {saved_step}) is the last good checkpoint and is kept"
                    if saved_step is not None else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{error}; that step was not taken and training stopped. {kept}. Lower the "
                                   f"learning rate (lr) or set grad_clip, then start again") from None
        except KeyboardInterrupt:
            if progress:
                where = f"{out_dir / LAST} (step {saved_step})" if saved_step is not None else "no checkpoint yet"
                print(f"interrupted at step {step}; last checkpoint: {where}; resume='auto' continues from it",
                      flush=True)
            raise

        if ddp.is_main:
            _write_final_weights(model, model_config, class_names, config, history, out_dir, train_set, val_set, card)
            if progress:
                print(f"wrote {out_dir / WEIGHTS}")
        ddp.barrier()
        notify("end")
        return history
    finally:
        if ddp.created_group:
            dist.destroy_process_group()


def _restore(checkpoint: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
             rank: int) -> tuple[History, int]:
    """Put every state of the checkpoint back; returns its history and step."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:  # (empty when saved without mixed precision)
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"][rank])
    return History.from_dict(checkpoint["history"]), checkpoint["step"]


def _checkpoint_to_resume(resume: bool | str | os.PathLike, out_dir: Path) -> Path | None:
    if resume is False or resume is None or resume == "none":
        return None
    if resume is True or resume == "auto":
        return out_dir / LAST if (out_dir / LAST).exists() else None
    return Path(resume)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Over every parameter: frozen ones get no gradient, and optimisers skip those; so one optimiser
    (and one state to checkpoint) serves all stages."""
    parameters = list(model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _wrap(model: nn.Module, ddp: Distributed, device: torch.device) -> nn.Module:
    """The model itself in one process; a DistributedDataParallel wrapper with several (built after
    ``requires_grad`` is set: DDP synchronises the gradients of the parameters that train)."""
    if ddp.world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _class_names(dataset: Dataset, model_config: MaskRCNNConfig) -> list[str]:
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return list(names)
    return ["__background__", *[f"class_{i}" for i in range(1, model_config.num_classes)]]


def _epoch_summary(record: Mapping[str, Any], config: TrainConfig, is_best: bool) -> str:
    parts = [f"epoch {record['epoch']}/{config.epochs}", f"train loss {record['train_loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    for key, label in (("segm_AP", "mask AP"), ("segm_AP50", "mask AP50"), ("bbox_AP", "box AP")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    return " | ".join(parts) + (" | best so far" if is_best else "")


def _write_final_weights(model: nn.Module, model_config: MaskRCNNConfig, class_names: list[str],
                         config: TrainConfig, history: History, out_dir: Path, train_set: Dataset,
                         val_set: Dataset | None, card: Mapping[str, Any] | None) -> None:
    """``model.safetensors``: the best checkpoint's weights if there was validation, else the last."""
    from mrcnn_edu.model import build_mask_rcnn
    from mrcnn_edu.weights import save_weights

    final, selected = model, f"last epoch ({config.epochs})"
    if history.best_epoch is not None and (out_dir / BEST).is_file():
        with preserved_rng_states():
            final = build_mask_rcnn(model_config)
        final.load_state_dict(load_checkpoint(out_dir / BEST)["model"])
        selected = f"best validation {history.best_metric_name} (epoch {history.best_epoch})"
    chosen = next((row for row in history.epochs if row["epoch"] == history.best_epoch), None) or history.epochs[-1]
    metrics = {key: value for key, value in chosen.items() if key not in ("stage", "trainable", "seconds")}
    full_card = {
        "weights": selected,
        "metrics": metrics,
        "data": {"train": _describe_dataset(train_set),
                 "validation": _describe_dataset(val_set) if val_set is not None else None},
        "train_config": config.to_dict(),
        "steps": len(history.steps),
        # how labels map to the data's COCO categories (`mrcnn-edu predict` writes category ids)
        "categories": [dict(c) for c in getattr(train_set, "categories", [])] or None,
        "label_to_category_id": {str(label): int(category) for label, category in
                                 getattr(train_set, "label_to_category_id", {}).items()} or None,
        "versions": {"mrcnn_edu": _version(), "torch": torch.__version__},
        **dict(card or {}),
    }
    save_weights(out_dir / WEIGHTS, final, model_config, class_names, full_card)


def _describe_dataset(dataset: Dataset) -> str:
    return f"{type(dataset).__name__} of {len(dataset)} images"


def _version() -> str:
    import mrcnn_edu

    return mrcnn_edu.__version__


# ----------------------------------------------------------------------------------------------
# For the command line (`mrcnn-edu train`): configs and data from arguments
# ----------------------------------------------------------------------------------------------


def load_model_config(config_or_preset: str | os.PathLike) -> MaskRCNNConfig:
    """A preset name (``small``, ``r50_fpn``) or the path of a ``MaskRCNNConfig`` JSON file.

    Raises:
        UserError: neither a preset nor a file, or a bad file (naming it and the field).
    """
    from mrcnn_edu.config import PRESETS, get_preset

    name = str(config_or_preset)
    if name in PRESETS:
        return get_preset(name)
    path = Path(name)
    if not path.is_file():
        raise UserError(f"CONFIG_OR_PRESET: {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                        f"MaskRCNNConfig JSON file")
    try:
        return MaskRCNNConfig.from_json(path.read_text(encoding="utf-8"))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text (JSON) file") from None


def load_train_config(path: str | os.PathLike | None = None, *, epochs: int | None = None, lr: float | None = None,
                      batch_size: int | None = None, seed: int | None = None,
                      device: str | None = None, augment: str | Sequence[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file (or the defaults), with the given fields replaced.

    ``epochs`` sets the epochs of a one-stage run; a multi-stage run's epochs live in its stages.
    ``augment``: names, or one comma-separated string (``"flip,rot90"``; ``""`` for none).
    """
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"train config {path} does not exist")
        try:
            config = TrainConfig.from_json(path.read_text(encoding="utf-8"))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    changes = {name: value for name, value in
               (("lr", lr), ("batch_size", batch_size), ("seed", seed), ("device", device)) if value is not None}
    if augment is not None:
        names = [n.strip() for n in augment.split(",") if n.strip()] if isinstance(augment, str) else list(augment)
        changes["augment"] = tuple(names)
    if epochs is not None:
        if len(config.stages) != 1:
            raise UserError(f"--epochs: the train config has {len(config.stages)} stages; set the epochs of each "
                            f"stage in the train config file instead")
        changes["stages"] = (dataclasses.replace(config.stages[0], epochs=epochs),)
    return dataclasses.replace(config, **changes)


def open_datasets(data: str | os.PathLike, val_data: str | os.PathLike | None = None, shapes: int = 200,
                  shapes_size: int = 128) -> tuple[Dataset, Dataset | None, dict[str, str | None]]:
    """``(train_set, val_set, description)`` for ``--data`` / ``--val-data``.

    ``data``: a COCO folder (``mrcnn_edu.data.CocoDataset``) or ``"shapes"``: ``shapes`` toy images
    (``ShapesDataset(seed=0)``), validated -- unless ``val_data`` is given -- on a quarter as many
    (at least 8) of another seed. ``val_data``: a COCO folder, or ``None`` (no validation for COCO).
    """
    from mrcnn_edu.data import CocoDataset, ShapesDataset

    def coco(folder: str | os.PathLike, option: str) -> Dataset:
        if not Path(folder).is_dir():
            raise UserError(f"{option}: {folder} is not a folder (expected a COCO folder with annotations.json"
                            f"{', or the word shapes' if option == '--data' else ''})")
        return CocoDataset(folder)

    if str(data) == "shapes":
        train_set = ShapesDataset(shapes, size=shapes_size, seed=0)
        val_set = ShapesDataset(max(8, shapes // 4), size=shapes_size, seed=1) if val_data is None else None
    else:
        train_set = coco(data, "--data")
        val_set = None
    if val_data is not None:
        val_set = coco(val_data, "--val-data")
    if val_set is not None and tuple(val_set.class_names) != tuple(train_set.class_names):
        raise UserError(f"--val-data: its classes {list(val_set.class_names[1:])} differ from the training "
                        f"data's {list(train_set.class_names[1:])}")
    description = {"train": repr(train_set), "validation": repr(val_set) if val_set is not None else None}
    return train_set, val_set, description


def build_and_train(model_config: MaskRCNNConfig, train_set: Dataset, val_set: Dataset | None,
                    train_config: TrainConfig, out_dir: str | os.PathLike, resume: bool | str | os.PathLike = "auto",
                    progress: bool = True, card: Mapping[str, Any] | None = None,
                    callbacks: Sequence[Callable[[str, dict], None]] | None = None) -> tuple[nn.Module, History]:
    """Set ``num_classes`` from the data, seed, build the model and :func:`train` it (the CLI's path)."""
    from mrcnn_edu.model import build_mask_rcnn

    class_names = list(train_set.class_names)
    model_config = dataclasses.replace(model_config, num_classes=len(class_names))
    seed_everything(train_config.seed)  # reproducible initial weights
    model = build_mask_rcnn(model_config)
    history = train(model, model_config, train_set, val_set, train_config, out_dir, class_names=class_names,
                    resume=resume, progress=progress, card=card, callbacks=callbacks)
    return model, history
