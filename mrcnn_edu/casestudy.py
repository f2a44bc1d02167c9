"""The case study end to end: synthetic data, three-stage training, evaluation, scenes, a report.

Taught in: ``09_case_study_oil_tanks.ipynb`` (the notebook calls the steps one by one); run
headless by ``make casestudy`` (``mrcnn-edu casestudy``), which also rebuilds the shipped
``data/weights/tanks_small.safetensors`` (``make weights``).

Shape shorthand:
    H, W   tile (or scene) height and width in pixels
    N      ground-truth tanks of a tile or scene
    D      detections of a tile or scene

The steps, each a function (what a notebook calls) and each timed:

1. :func:`prepare_data` -- synthetic tiles for training (seed 1), validation (seed 2: picks the
   best epoch) and testing (seed 4: the final numbers; neither seed is ever trained on) and
   held-out 2560 px scenes (seed 3), generated once and cached under
   ``utils.cache_dir()/oil_tanks/`` (re-used while the manifest matches: same generator
   version, seed, count and size).
2. :func:`train_model` -- the original's three stages (heads only with the backbone's trunk
   frozen, then all layers, then all layers at a lower rate; ``configs/tanks_train.json``) on the
   ``small`` model (``configs/tanks_small.json``) with ``engine.build_and_train``: checkpoints and
   history in ``OUT/train/``, resumed automatically when interrupted, best epoch by mask AP.
3. :func:`evaluate_test` -- the chosen weights on every test tile: COCO AP by
   pycocotools *and* by our own evaluation (they must agree), the PR curve.
4. :func:`predict_scenes` -- whole scenes through the tiled predictor
   (``inference.predict_image``), timed and scored against the scene ground truth.
5. :func:`analyse_errors` and :func:`estimate_fill_levels` -- false positives and misses, recall
   by tank size, mask leakage, the 0.99-threshold sweep (``mrcnn_edu.error_analysis``); fill level
   of floating roofs from the *predicted* masks and the shadows (``mrcnn_edu.fill_level``).
6. :func:`write_report` -- ``OUT/report.md``, ``OUT/metrics.json`` and ``OUT/figures/*.png``.

:func:`run_casestudy` runs them all. ``fast=True`` (or ``MRCNN_EDU_FAST=1``) shrinks everything
(16 training tiles of 128 px, 8 validation and 8 test tiles, one 384 px scene, three one-epoch
stages) so the whole pipeline runs in well under a minute: a smoke test, not a model.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrcnn_edu.utils import (UserError, atomic_write_bytes, atomic_write_text, cache_dir, fast_mode, machine_info,
                             machine_line, replace_dir, repo_root, weights_dir)

TRAIN_SEED, VAL_SEED, SCENE_SEED, TEST_SEED = 1, 2, 3, 4
"""Data-set seeds: training tiles; validation tiles (choose the best epoch); held-out scenes; test
tiles (the reported numbers: neither trained on nor used to choose anything)."""

FAST_VAL_IMAGES, FAST_DETECTIONS = 4, 20
"""Fast mode: validation tiles per epoch during training, and detections per image the model keeps."""

SCORE_THRESHOLD = 0.5
"""Detections scoring at least this count as "found" in overlays, error analysis and fill levels."""

SWEEP_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
"""Score thresholds of the threshold sweep (0.99: the original's choice)."""

TARGETS = {"test_mask_AP50": 0.95, "test_mask_AP": 0.70, "fill_mae_pp": 10.0, "scene_seconds": 60.0,
           "total_minutes": 25.0, "shipped_AP50_gap": 0.03}
"""The issue's acceptance numbers, checked in the report (meaningless in fast mode)."""

FIGURES = {
    "training_curves": "train and validation loss per epoch, stages shaded; validation AP per epoch",
    "training_steps": "loss terms per step",
    "pr_curve": "precision-recall curve of the masks on the test tiles",
    "examples": "example predictions on test tiles",
    "scene_overlay": "a held-out scene with its detections",
    "recall_by_size": "recall by tank size",
    "leakage": "mask leakage: predicted pixels outside the true disc",
    "threshold_sweep": "precision and recall against the score threshold",
    "gallery_fp": "false positives",
    "gallery_fn": "missed tanks (false negatives)",
    "fill_scatter": "estimated against true fill level of floating roofs",
}
"""Every figure :func:`write_report` may write (``OUT/figures/<name>.png``), with its caption."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseStudySettings:
    """What a case-study run does; :meth:`create` fills in the full or the fast defaults.

    ``model_config`` / ``train_config``: JSON files (``configs/tanks_small.json``,
    ``configs/tanks_train.json``). In fast mode the train config's stages are cut to one epoch
    each, and the model's input size follows the tile size (``transform.min_size = tile_size``).
    ``weights``: evaluate these weights instead of training. ``save_weights``: copy the trained
    weights there (with a card holding the command, data seeds and test metrics).
    """

    out_dir: Path = Path("runs/casestudy")
    fast: bool = False
    train_tiles: int = 1600
    val_tiles: int = 100
    test_tiles: int = 200
    scenes: int = 2
    tile_size: int = 256
    scene_size: int = 2560
    scene_overlap: int = 64
    model_config: Path | None = None
    train_config: Path | None = None
    weights: Path | None = None
    save_weights: Path | None = None
    restart: bool = False
    progress: bool = True
    batch_size: int = 4
    examples: int = 8
    command: str | None = None

    @classmethod
    def create(cls, out_dir: str | os.PathLike = "runs/casestudy", fast: bool | None = None,
               **overrides: Any) -> CaseStudySettings:
        """Settings for a full run, or a fast one (``fast=None``: ``MRCNN_EDU_FAST``); ``None`` values keep defaults."""
        fast = fast_mode() if fast is None else bool(fast)
        values: dict[str, Any] = {}
        if fast:
            values.update(train_tiles=16, val_tiles=8, test_tiles=8, scenes=1, tile_size=128, scene_size=384,
                          scene_overlap=32, examples=4)
        values.update({key: value for key, value in overrides.items() if value is not None})
        root = repo_root() or Path.cwd()
        values.setdefault("model_config", root / "configs" / "tanks_small.json")
        values.setdefault("train_config", root / "configs" / "tanks_train.json")
        for key in ("model_config", "train_config", "weights", "save_weights"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        settings = cls(out_dir=Path(out_dir), fast=fast, **values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, before any data is generated (one clear UserError)."""
        for name in ("train_tiles", "val_tiles", "test_tiles", "scenes", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name.replace('_', '-')}: expected a whole number >= 1, got {value!r}")
        if not 16 <= self.tile_size <= self.scene_size:
            raise UserError(f"tile_size {self.tile_size}: expected 16 <= tile size <= scene size ({self.scene_size})")
        if not 0 <= self.scene_overlap < self.tile_size:
            raise UserError(f"scene_overlap {self.scene_overlap}: expected 0 <= overlap < tile size ({self.tile_size})")
        if self.weights is not None and self.save_weights is not None:
            raise UserError("--save-weights saves the weights this run trains; with --weights nothing is trained "
                            "(copy the file instead)")
        if self.save_weights is not None and self.save_weights.suffix != ".safetensors":
            raise UserError(f"--save-weights {self.save_weights}: expected a .safetensors file name")
        if self.weights is not None:
            from mrcnn_edu.weights import read_card

            card = read_card(self.weights)  # UserError naming the file if missing or not a weights file
            if len(card["class_names"]) != 2:
                raise UserError(f"--weights {self.weights}: the model predicts {len(card['class_names']) - 1} classes "
                                f"{card['class_names'][1:]}; the case study needs one (oil-storage-tank)")
        else:
            from mrcnn_edu import engine
            from mrcnn_edu.config import PRESETS

            for option, path in (("model config", self.model_config), ("train config", self.train_config)):
                if option == "model config" and str(path) in PRESETS:
                    continue
                if path is None or not Path(path).is_file():
                    raise UserError(f"{option} {path} does not exist (expected a JSON file; see configs/)")
            engine.load_model_config(self.model_config)  # a bad file fails now, not after the data
            engine.load_train_config(self.train_config)  # (num_classes comes from the data: build_and_train)


@dataclass
class CaseStudy:
    """Everything a run produced, step by step (``None`` for steps not run yet)."""

    settings: CaseStudySettings
    data: dict | None = None
    training: dict | None = None
    test: dict | None = None
    scenes: dict | None = None
    errors: dict | None = None
    fill: dict | None = None
    seconds: dict = field(default_factory=dict)
    log_lines: list = field(default_factory=list)


def _logger(lines: list | None = None) -> Callable[[str], None]:
    """``print`` that also appends each message to ``lines``."""

    def log(message: str) -> None:
        if lines is not None:
            lines.append(message)
        print(message, flush=True)

    return log


# ----------------------------------------------------------------------------------------------
# Step 1: data (cached)
# ----------------------------------------------------------------------------------------------


def tiles_folder(seed: int, n: int, size: int) -> Path:
    """``cache_dir()/oil_tanks/<generator version>-<seed>-<n>-<size>``: where :func:`cached_tiles` keeps a tile set."""
    from mrcnn_edu.oil_tanks import GENERATOR_VERSION

    return cache_dir() / "oil_tanks" / f"{GENERATOR_VERSION}-{seed}-{n}-{size}"


def scenes_folder(seed: int, n: int, size: int) -> Path:
    """``cache_dir()/oil_tanks/scenes-<generator version>-<seed>-<n>-<size>``: :func:`cached_scenes`' folder."""
    from mrcnn_edu.oil_tanks import GENERATOR_VERSION

    return cache_dir() / "oil_tanks" / f"scenes-{GENERATOR_VERSION}-{seed}-{n}-{size}"


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_tiles(seed: int, n: int, size: int, progress: bool = True,
                 log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """A COCO folder of ``n`` synthetic tiles (``oil_tanks.make_dataset``), generated once.

    Returns:
        ``(folder, reused)``: ``reused`` is True when a folder with a matching manifest (generator
        version, seed, count, size, default options) was there already. A folder whose manifest
        does not match (or is missing) is generated again, atomically.
    """
    from mrcnn_edu.oil_tanks import GENERATOR_VERSION, make_dataset

    folder = tiles_folder(seed, n, size)
    manifest = _manifest(folder)
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_tiles": n, "size": [size, size], "options": {}}
    if manifest is not None and (folder / "annotations.json").is_file() and all(
            manifest.get(key) == value for key, value in wanted.items()):
        log(f"  reusing cached tiles {folder} ({n} tiles, seed {seed})")
        return folder, True
    log(f"  generating {n} tiles of {size} px (seed {seed}) -> {folder}")
    make_dataset(folder, n, seed, size=size, overwrite=True, progress=progress)
    return folder, False


def cached_scenes(seed: int, n: int, size: int, progress: bool = True,
                  log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """``n`` held-out scenes (``oil_tanks.make_scene``, scene ``i`` seeded ``tile_seed(seed, i)``), generated once.

    The folder holds ``scene_000.png`` ... and ``annotations.json``: the COCO ground truth of all
    scenes (image ids 1..n; one RLE per tank, built one instance mask at a time so a 2560 px scene
    never holds ``N x H x W`` bytes; each annotation keeps the tank's attributes) and
    ``manifest.json``. Written into a temporary folder that is renamed when complete.

    Returns:
        ``(folder, reused)`` as :func:`cached_tiles`.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from mrcnn_edu.data import mask_to_rle
    from mrcnn_edu.oil_tanks import CLASSES, GENERATOR_VERSION, make_scene, tile_seed

    folder = scenes_folder(seed, n, size)
    manifest = _manifest(folder)
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_scenes": n, "size": [size, size]}
    if manifest is not None and (folder / "annotations.json").is_file() and all(
            manifest.get(key) == value for key, value in wanted.items()):
        log(f"  reusing cached scenes {folder} ({n} scene{'s' if n != 1 else ''}, seed {seed})")
        return folder, True
    log(f"  generating {n} scene{'s' if n != 1 else ''} of {size} px (seed {seed}) -> {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        images, annotations = [], []
        for i in tqdm(range(n), desc="scenes", unit="scene", disable=not progress):
            scene_seed = tile_seed(seed, i)
            scene = make_scene(size, seed=scene_seed, with_masks=False)
            file_name = f"scene_{i:03d}.png"
            pixels = (scene.image.clamp(0, 1) * 255).round().to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp / file_name)  # (3, H, W) -> (H, W, 3)
            images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size, "scene_seed": scene_seed,
                           "sun": {"azimuth_deg": math.degrees(scene.sun.azimuth),
                                   "elevation_deg": math.degrees(scene.sun.elevation)},
                           "biome": scene.info["biome"]})
            for k, tank in enumerate(scene.tanks):
                y0, x0, patch = scene.mask_patches[k]
                rle = mask_to_rle(scene.instance_mask(k))  # one UInt8[H, W] at a time
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                    "segmentation": rle, "area": int(patch.sum()), "iscrowd": 0,
                                    "bbox": [int(x0), int(y0), int(patch.shape[1]), int(patch.shape[0])],
                                    **tank.attributes()})
        coco = {"info": {"description": f"held-out synthetic scenes, mrcnn_edu.oil_tanks {GENERATOR_VERSION}, "
                                        f"seed {seed}"},
                "images": images, "annotations": annotations, "categories": [{"id": 1, "name": CLASSES[1]}]}
        (tmp / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps({
            "generator": "mrcnn_edu.oil_tanks.make_scene", "generator_version": GENERATOR_VERSION, "seed": seed,
            "n_scenes": n, "size": [size, size], "files": [image["file_name"] for image in images],
            "scene_seeds": "scene i uses mrcnn_edu.oil_tanks.tile_seed(seed, i)"}, indent=2), encoding="utf-8")
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, False


def prepare_data(settings: CaseStudySettings, log: Callable[[str], None] = print) -> dict:
    """Step 1: the training, validation and test tiles and the held-out scenes (cached).

    Returns:
        ``{"train": {...}, "val": {...}, "test": {...}, "scenes": {...}}``, each with ``folder``,
        ``seed``, ``count``, ``size``, ``tanks`` and ``reused`` (True when taken from the cache).
    """
    s = settings
    out: dict[str, Any] = {}
    for name, seed, n in (("train", TRAIN_SEED, s.train_tiles), ("val", VAL_SEED, s.val_tiles),
                          ("test", TEST_SEED, s.test_tiles)):
        folder, reused = cached_tiles(seed, n, s.tile_size, s.progress, log)
        out[name] = {"folder": str(folder), "seed": seed, "count": n, "size": s.tile_size, "reused": reused,
                     "tanks": _count_annotations(folder)}
    folder, reused = cached_scenes(SCENE_SEED, s.scenes, s.scene_size, s.progress, log)
    out["scenes"] = {"folder": str(folder), "seed": SCENE_SEED, "count": s.scenes, "size": s.scene_size,
                     "reused": reused, "tanks": _count_annotations(folder)}
    return out


def _count_annotations(folder: Path) -> int:
    return len(json.loads((Path(folder) / "annotations.json").read_text(encoding="utf-8"))["annotations"])


# ----------------------------------------------------------------------------------------------
# Step 2: training
# ----------------------------------------------------------------------------------------------


def load_configs(settings: CaseStudySettings):
    """``(MaskRCNNConfig, TrainConfig)`` from the settings' JSON files, shrunk in fast mode.

    The model's input size follows the tiles (``min_size = tile_size``: no resizing). Fast mode:
    every stage lasts one epoch, the warm-up at most 4 steps, validation during training uses
    :data:`FAST_VAL_IMAGES` tiles and the model keeps :data:`FAST_DETECTIONS` detections per image.
    """
    from mrcnn_edu import engine

    model_config = engine.load_model_config(settings.model_config)
    train_config = engine.load_train_config(settings.train_config)
    if model_config.transform.min_size[-1] != settings.tile_size:  # the model sees tiles at full resolution
        transform = dataclasses.replace(model_config.transform, min_size=(settings.tile_size,),
                                        max_size=max(model_config.transform.max_size, settings.tile_size))
        model_config = dataclasses.replace(model_config, transform=transform)
    if settings.fast:
        train_config = dataclasses.replace(
            train_config, stages=tuple(dataclasses.replace(stage, epochs=1) for stage in train_config.stages),
            warmup_iters=min(train_config.warmup_iters, 4), max_val_images=FAST_VAL_IMAGES, milestones=())
        # an untrained model keeps ~100 detections of score ~0.5 per tile: pasting and scoring their
        # masks would be most of a fast run
        roi_heads = dataclasses.replace(model_config.roi_heads, detections_per_img=FAST_DETECTIONS)
        model_config = dataclasses.replace(model_config, roi_heads=roi_heads)
    return model_config, train_config


def train_model(settings: CaseStudySettings, data: dict, log: Callable[[str], None] = print) -> dict:
    """Step 2: train the case-study model from scratch with the three-stage schedule.

    Writes ``OUT/train/`` (``last.pt``, ``best.pt``, ``history.csv/json``, ``model.safetensors``
    = the best epoch by validation mask AP, and its card); an interrupted run continues from
    ``last.pt`` (``restart=True`` starts over). Returns ``{"weights", "history", "steps", ...}``.
    """
    from mrcnn_edu import engine
    from mrcnn_edu.data import CocoDataset

    s = settings
    model_config, train_config = load_configs(s)
    train_set, val_set = CocoDataset(data["train"]["folder"]), CocoDataset(data["val"]["folder"])
    out = s.out_dir / "train"
    per_epoch = engine.steps_per_epoch(len(train_set), train_config.batch_size)
    stages = ", ".join(f"{st.epochs} x {st.trainable} at {st.lr_scale:g} x lr" for st in train_config.stages)
    log(f"  {len(train_set)} tiles, batch {train_config.batch_size}: {per_epoch} steps per epoch, "
        f"{train_config.epochs} epochs ({stages}); validation on "
        f"{min(len(val_set), train_config.max_val_images or len(val_set))} tiles each epoch -> {out}")
    card = {"command": s.command or "mrcnn_edu.casestudy.run_casestudy",
            "data": {"train": _describe_data(data["train"], "tiles"),
                     "validation": _describe_data(data["val"], "tiles")}}
    resume = False if s.restart else "auto"
    try:
        _, history = engine.build_and_train(model_config, train_set, val_set, train_config, out, resume=resume,
                                            progress=s.progress, card=card)
    except UserError as error:
        if not str(error).startswith("cannot resume from"):
            raise
        # e.g. the stages of configs/tanks_train.json changed since OUT/train/last.pt was written
        reason = str(error).split("; resume with the same settings")[0]
        raise UserError(f"{reason}; run the case study with --restart (restart=True) to train afresh in "
                        f"{s.out_dir}, or choose another --out") from None
    return {"weights": str(out / engine.WEIGHTS), "out_dir": str(out), "history": history.to_dict(),
            "best_epoch": history.best_epoch, "best_metric": history.best_metric,
            "best_metric_name": history.best_metric_name, "steps": len(history.steps), "steps_per_epoch": per_epoch,
            "epochs": train_config.epochs, "train_config": train_config.to_dict(),
            "train_seconds": round(sum(row.get("seconds", 0.0) for row in history.epochs), 1),
            "model_config": json.loads(model_config.to_json()), "skipped": False}


def _describe_data(entry: Mapping, kind: str) -> str:
    from mrcnn_edu.oil_tanks import GENERATOR_VERSION

    return (f"{entry['count']} synthetic {kind} of {entry['size']} px (mrcnn_edu.oil_tanks {GENERATOR_VERSION}, "
            f"seed {entry['seed']}), {entry['tanks']} tanks")


# ----------------------------------------------------------------------------------------------
# Step 3: evaluation on the test tiles
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_dataset(model, dataset, batch_size: int = 4, progress: bool = True) -> tuple[list[dict], list[int]]:
    """The model's eval outputs (masks: probabilities Float[D, 1, H, W], on the CPU) and the image ids of every item."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    outputs, image_ids = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = [dataset.load(i) for i in range(start, min(start + batch_size, len(dataset)))]
        for (_, target), output in zip(batch, model([image.to(device) for image, _ in batch])):
            outputs.append({key: value.cpu() for key, value in output.items()})
            image_ids.append(int(target["image_id"]))
    return outputs, image_ids


def evaluate_test(settings: CaseStudySettings, model, data: dict, log: Callable[[str], None] = print) -> dict:
    """Step 3: COCO box and mask AP of ``model`` on every test tile, by pycocotools and by ours.

    The test tiles (seed 4) were neither trained on nor used to choose the epoch (that was the
    validation tiles' job), so these numbers are not tuned to them.

    Returns:
        ``{"pycocotools": {"segm", "bbox"}, "ours": {...}, "max_difference", "results" (COCO
        result dicts), "coco_gt", "pr_curves" {iou: {"recall", "precision", "scores"}},
        "images", "seconds_per_tile"}``.
    """
    from mrcnn_edu import evaluation
    from mrcnn_edu.data import CocoDataset

    dataset = CocoDataset(data["test"]["folder"])
    started = time.perf_counter()
    outputs, image_ids = predict_dataset(model, dataset, settings.batch_size, settings.progress)
    seconds = time.perf_counter() - started
    results = evaluation.results_from_predictions(outputs, image_ids, dataset.label_to_category_id)
    del outputs
    coco_gt = dataset.coco_gt()
    pycoco = {t: evaluation.evaluate_pycocotools(coco_gt, results, t) for t in ("segm", "bbox")}
    detailed = {t: evaluation.evaluate_detailed(coco_gt, results, t) for t in ("segm", "bbox")}
    ours = {t: dict(detailed[t].stats) for t in ("segm", "bbox")}
    difference = max(abs(pycoco[t][k] - ours[t][k]) for t in pycoco for k in pycoco[t])
    curves = {}
    for iou in (0.5, 0.75):
        try:
            curve = evaluation.precision_recall_curve(detailed["segm"], category_id=1, iou_threshold=iou)
        except UserError:  # no ground truth at all (cannot happen with the generator's defaults)
            continue
        curves[f"{iou:.2f}"] = {key: np.asarray(curve[key]).tolist() for key in ("recall", "precision", "scores")}
        curves[f"{iou:.2f}"]["ap"] = float(curve["ap"])
    log(f"  {len(dataset)} test tiles in {seconds:.1f} s; COCO by pycocotools (our evaluation agrees to "
        f"{difference:.1e}):")
    log(evaluation.format_table(pycoco))
    return {"pycocotools": pycoco, "ours": ours, "max_difference": difference, "results": results,
            "coco_gt": coco_gt, "pr_curves": curves, "images": len(dataset),
            "seconds_per_tile": seconds / max(1, len(dataset))}


def save_shipped_weights(settings: CaseStudySettings, training: dict, test: dict, data: dict,
                         log: Callable[[str], None] = print) -> Path:
    """Copy the trained (best) weights to ``settings.save_weights`` with a card for the shipped file.

    The card keeps the training card (config, train config, epoch metrics) and adds the command
    that rebuilds it, the data seeds and the pycocotools metrics on the test tiles.
    """
    from mrcnn_edu.weights import load_weights, save_weights

    model, card = load_weights(training["weights"])
    config, class_names = card.pop("config"), card.pop("class_names")
    from mrcnn_edu.config import MaskRCNNConfig

    config = MaskRCNNConfig.from_dict(config) if isinstance(config, Mapping) else config
    card.update({
        "command": "make weights  (= " + (settings.command or "mrcnn-edu casestudy --save-weights ...") + ")",
        "data": {"train": _describe_data(data["train"], "tiles"), "validation": _describe_data(data["val"], "tiles"),
                 "test": _describe_data(data["test"], "tiles"), "train_seed": TRAIN_SEED, "val_seed": VAL_SEED,
                 "test_seed": TEST_SEED},
        "test_pycocotools": {t: dict(m) for t, m in test["pycocotools"].items()},
        "made_by": "mrcnn_edu.casestudy (make weights)",
    })
    card.pop("provisional", None)
    path = save_weights(settings.save_weights, model, config, class_names, card)
    log(f"  saved {path} ({path.stat().st_size / 1e6:.1f} MB) and its card")
    return path


# ----------------------------------------------------------------------------------------------
# Step 4: scenes
# ----------------------------------------------------------------------------------------------


def scene_metrics(coco_gt: Mapping, results: Sequence[Mapping], iou_type: str = "segm",
                  max_det: int = 1000) -> dict[str, float]:
    """COCO metrics by pycocotools with up to ``max_det`` detections per image (a scene holds more than 100 tanks).

    Keys as ``evaluation.METRIC_KEYS`` except ``AR100``, which becomes ``ARmax`` (recall at ``max_det``).
    """
    import contextlib
    import copy

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from mrcnn_edu.evaluation import METRIC_KEYS, prepare_coco_gt, summarize

    keys = [("ARmax" if key == "AR100" else key) for key in METRIC_KEYS]
    gt = prepare_coco_gt(coco_gt, iou_type)
    if not results:
        return {key: (0.0 if gt["annotations"] else -1.0) for key in keys}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(list(results))), iouType=iou_type)
        evaluator.params.maxDets = [1, 10, max_det]
        evaluator.evaluate()
        evaluator.accumulate()
    # pycocotools' own summarize() reads AP at 100 detections whatever maxDets says (AP -1 with 1000):
    # our summarize() reads the third maxDets slot, which holds max_det here
    stats = summarize(evaluator.eval["precision"], evaluator.eval["recall"])
    return {new: stats[old] for new, old in zip(keys, METRIC_KEYS)}


def predict_scenes(settings: CaseStudySettings, model, data: dict, log: Callable[[str], None] = print) -> dict:
    """Step 4: every held-out scene through ``inference.predict_image`` (tiles, merge), timed and scored.

    Writes ``OUT/scenes/scene_XXX.png`` (overlay of the detections scoring >= 0.5) and
    ``OUT/scenes/results.json`` (COCO results of every detection). Returns per-scene rows and the
    mask and box metrics over all scenes (pycocotools, up to 1000 detections per scene).
    """
    from mrcnn_edu.data import load_image
    from mrcnn_edu.inference import coco_results, default_tile_size, draw_prediction, plan_tiles, predict_image

    s = settings
    folder = Path(data["scenes"]["folder"])
    coco_gt = json.loads((folder / "annotations.json").read_text(encoding="utf-8"))
    out = s.out_dir / "scenes"
    tile_size = default_tile_size(model)
    results, rows, thumbnail = [], [], None
    for info in coco_gt["images"]:
        image = load_image(folder / info["file_name"])
        report: dict = {}
        started = time.perf_counter()
        prediction = predict_image(model, image, tile_size=tile_size, overlap=s.scene_overlap,
                                   batch_size=s.batch_size, progress=s.progress, report=report)
        seconds = time.perf_counter() - started
        results += coco_results(prediction, info["id"], info["file_name"])
        keep = torch.nonzero(prediction["scores"] >= SCORE_THRESHOLD).flatten()
        shown = {"boxes": prediction["boxes"][keep], "labels": prediction["labels"][keep],
                 "scores": prediction["scores"][keep], "masks": prediction["masks"].select(keep)}
        picture = draw_prediction(image, shown, ["__background__", "tank"])
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        atomic_write_bytes(out / info["file_name"], buffer.getvalue())
        if thumbnail is None:
            thumbnail = picture
        tanks = sum(1 for a in coco_gt["annotations"] if a["image_id"] == info["id"])
        rows.append({"file": info["file_name"], "size": [info["height"], info["width"]], "tanks": tanks,
                     "detections": len(prediction["scores"]), "detections_0.5": len(keep),
                     "tiles": report.get("tiles", len(plan_tiles((info["height"], info["width"]), tile_size,
                                                                 s.scene_overlap))),
                     "seconds": round(seconds, 3)})
        log(f"  {info['file_name']}: {tanks} tanks, {len(keep)} detections >= {SCORE_THRESHOLD} "
            f"({rows[-1]['tiles']} tiles of {tile_size} px, overlap {s.scene_overlap}) in {seconds:.1f} s")
    atomic_write_text(out / "results.json", json.dumps(results) + "\n")
    metrics = {t: scene_metrics(coco_gt, results, t) for t in ("segm", "bbox")}
    log(f"  scenes: mask AP50 {metrics['segm']['AP50']:.3f}, mask AP {metrics['segm']['AP']:.3f}, "
        f"box AP50 {metrics['bbox']['AP50']:.3f}")
    return {"rows": rows, "metrics": metrics, "tile_size": tile_size, "overlap": s.scene_overlap,
            "max_seconds": max(row["seconds"] for row in rows), "overlay_dir": str(out), "_thumbnail": thumbnail}


# ----------------------------------------------------------------------------------------------
# Step 5: error analysis and fill level
# ----------------------------------------------------------------------------------------------


def _optional(module: str):
    """``mrcnn_edu.<module>``, or None when it is not there (the report says so)."""
    import importlib

    try:
        return importlib.import_module(f"mrcnn_edu.{module}")
    except ImportError as error:
        if error.name not in (f"mrcnn_edu.{module}",):
            raise
        return None


class LazyImages(Mapping):
    """``image_id -> Float[3, H, W]`` of a data set, loaded when asked for (a gallery shows only a few)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.index = {int(image["id"]): i for i, image in enumerate(dataset.images)}

    def __getitem__(self, image_id):
        return self.dataset.load(self.index[int(image_id)])[0]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def _as_figure(obj):
    """The Figure behind what a plotting function returned (a Figure, Axes, or an array of them)."""
    import matplotlib.pyplot as plt

    if obj is None:
        return plt.gcf()
    if hasattr(obj, "savefig"):
        return obj
    if hasattr(obj, "figure"):
        return obj.figure
    if isinstance(obj, (list, tuple, np.ndarray)) and len(obj):
        return _as_figure(np.asarray(obj, dtype=object).flat[0])
    return plt.gcf()


def analyse_errors(settings: CaseStudySettings, data: dict, test: dict,
                   log: Callable[[str], None] = print) -> dict:
    """Step 5a: error analysis on the test tiles at score 0.5 (``mrcnn_edu.error_analysis``).

    Returns ``{"available": bool, "summary": dict, "table": str, "sweep": rows, "figures": {name: Figure}}``.
    """
    from mrcnn_edu.data import CocoDataset

    module = _optional("error_analysis")
    if module is None:
        log("  mrcnn_edu.error_analysis is not available: error analysis skipped")
        return {"available": False, "figures": {}}
    coco_gt, results = test["coco_gt"], test["results"]
    report = module.analyse(coco_gt, results, iou_threshold=0.5, score_threshold=SCORE_THRESHOLD)
    if hasattr(report, "threshold_sweep"):  # from the report's own matching: no second matching
        sweep = report.threshold_sweep(list(SWEEP_THRESHOLDS))
    else:
        sweep = module.threshold_sweep(coco_gt, results, thresholds=list(SWEEP_THRESHOLDS), iou_threshold=0.5)
    images = LazyImages(CocoDataset(data["test"]["folder"]))
    figures = {"recall_by_size": _as_figure(module.plot_recall_by_size(report)),
               "threshold_sweep": _as_figure(module.plot_threshold_sweep(sweep, mark=(SCORE_THRESHOLD, 0.99))),
               "leakage": _as_figure(module.plot_leakage(report))}
    for kind in ("fp", "fn"):
        figures[f"gallery_{kind}"] = _as_figure(module.error_gallery(images, report, kind=kind, max_items=12))
    table = report.summary_table()
    log(table)
    return {"available": True, "summary": _jsonable(report.to_dict()), "table": table,
            "sweep": _jsonable(sweep), "figures": figures}


def estimate_fill_levels(settings: CaseStudySettings, data: dict, test: dict,
                         log: Callable[[str], None] = print) -> dict:
    """Step 5b: fill level of the floating-roof tanks of the test tiles (``mrcnn_edu.fill_level``).

    ``fill_level.evaluate_fill`` on the tiles that hold floating roofs, with the *predicted* masks
    matched to the true tanks (:func:`matched_masks`; a tank without a matching detection gets an
    empty mask and no estimate), and again with the true masks for comparison: the estimator's own
    error. Estimates flagged unreliable (shadow cut by the border, roof all in shadow, ...) are
    left out of the errors.

    Returns:
        ``{"available", "mae" (fill fraction 0..1, NaN -> None without estimates), "median_error",
        "n" (tanks in the MAE), "floating", "missed", "unreliable", "mae_true_masks",
        "n_true_masks", "rows", "figures"}``.
    """
    module = _optional("fill_level")
    if module is None or not hasattr(module, "evaluate_fill"):
        log("  mrcnn_edu.fill_level is not available: fill-level estimation skipped")
        return {"available": False, "figures": {}}
    items, masks, image_ids, matched = matched_masks(data, test, floating_only=True)
    predicted = module.evaluate_fill(items, masks=masks)
    truth = module.evaluate_fill(items)
    rows = predicted["rows"]
    for row in rows:
        row["image_id"] = image_ids[row["image"]]
        row["matched"] = bool(matched[row["image"]][row["instance"]])
    missed = sum(not row["matched"] for row in rows)
    result = {"available": True, "mae": predicted["mae"], "median_error": predicted["median_error"],
              "n": predicted["n"], "floating": len(rows), "missed": missed,
              "unreliable": sum(row["matched"] and not row["reliable"] for row in rows),
              "mae_true_masks": truth["mae"], "n_true_masks": truth["n"]}
    if predicted["n"]:
        log(f"  fill level: mean absolute error {100 * predicted['mae']:.1f} percentage points over "
            f"{predicted['n']} of {len(rows)} floating roofs ({missed} not detected, {result['unreliable']} flagged "
            f"unreliable); {100 * truth['mae']:.1f} with the true masks")
    else:
        log(f"  fill level: no reliable estimate ({len(rows)} floating roofs, {missed} not detected)")
    if predicted["n"]:
        figure = module.plot_fill_scatter(rows)
    else:  # nothing detected well enough (an untrained model): show what the true masks give
        figure = module.plot_fill_scatter(truth["rows"], title=f"true masks (no reliable estimate from the "
                                                              f"detections): MAE {100 * truth['mae']:.1f} pp")
    figures = {"fill_scatter": _as_figure(figure)} if predicted["n"] or truth["n"] else {}
    result = _jsonable(result)
    result.update(rows=_jsonable(rows), figures=figures)
    return result


def matched_masks(data: dict, test: dict, floating_only: bool = True):
    """The test tiles with the predicted mask that matches each true tank.

    A detection matches a tank when it scores >= :data:`SCORE_THRESHOLD` and its mask overlaps the
    tank's disc with IoU >= 0.5 (then no other tank can match it: true discs do not overlap).

    Returns:
        ``(items, masks, image_ids, matched)``, one entry per tile (only tiles with a floating
        roof when ``floating_only``): ``(image Float[3, H, W], target)`` as the data set gives
        them; UInt8[N, H, W] in the order of the target's tanks (zeros where nothing matched);
        the COCO image id; Bool[N] which tanks matched.
    """
    from pycocotools import mask as mask_utils

    from mrcnn_edu.data import CocoDataset

    def rle(segmentation: Mapping) -> dict:  # counts as bytes, as pycocotools wants them
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}

    dataset = CocoDataset(data["test"]["folder"])
    detections: dict[int, list[dict]] = {}
    for result in test["results"]:
        if result["score"] >= SCORE_THRESHOLD:
            detections.setdefault(result["image_id"], []).append(result)
    items, masks, image_ids, matched = [], [], [], []
    for index in range(len(dataset)):
        image, target = dataset.load(index)
        roofs = [a.get("roof") for a in target["attributes"]]
        if floating_only and "floating" not in roofs:
            continue
        found = detections.get(int(target["image_id"]), [])
        predicted = torch.zeros_like(target["masks"])  # (N, H, W)
        hit = torch.zeros(len(roofs), dtype=torch.bool)
        if found and len(roofs):
            # pycocotools wants (H, W, N) in Fortran order: (N, H, W) -> (H, W, N)
            truth = mask_utils.encode(np.asfortranarray(target["masks"].permute(1, 2, 0).numpy()))
            ious = np.asarray(mask_utils.iou([rle(d["segmentation"]) for d in found], truth,
                                             [0] * len(roofs))).reshape(len(found), len(roofs))  # (D, N)
            for j in range(len(roofs)):
                best = int(np.argmax(ious[:, j]))
                if ious[best, j] >= 0.5:
                    predicted[j] = torch.from_numpy(mask_utils.decode(rle(found[best]["segmentation"])))
                    hit[j] = True
        items.append((image, target))
        masks.append(predicted)
        image_ids.append(int(target["image_id"]))
        matched.append(hit)
    return items, masks, image_ids, matched


def _jsonable(value):
    """Plain JSON types from numpy scalars/arrays, tensors, tuples, dataclasses and Paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# ----------------------------------------------------------------------------------------------
# Step 6: figures, report.md and metrics.json
# ----------------------------------------------------------------------------------------------


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_training(history: Mapping):
    """Train and validation loss per epoch (stages shaded) and validation AP per epoch: one Figure."""
    import matplotlib.pyplot as plt

    epochs = history.get("epochs", [])
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = [row["epoch"] for row in epochs]
    stage_colours = ("#f2e6c9", "#dbe8f5", "#e3f1dc", "#f1dcea")
    for ax in (ax_loss, ax_ap):
        for stage in sorted({row.get("stage", 1) for row in epochs}):
            members = [row["epoch"] for row in epochs if row.get("stage", 1) == stage]
            trainable = next(row.get("trainable", "") for row in epochs if row.get("stage", 1) == stage)
            ax.axvspan(min(members) - 0.5, max(members) + 0.5, color=stage_colours[(stage - 1) % 4], zorder=0)
            ax.text((min(members) + max(members)) / 2, 1.0, f"stage {stage}\n{trainable}", ha="center", va="top",
                    fontsize=8, transform=ax.get_xaxis_transform(), color="0.3")
    for key, label, style in (("train_loss", "train loss", "o-"), ("val_loss", "validation loss", "s-")):
        points = [(row["epoch"], row[key]) for row in epochs if row.get(key) is not None]
        if points:
            ax_loss.plot(*zip(*points), style, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (sum of the five terms)")
    ax_loss.set_title("loss per epoch", fontsize=10)
    ax_loss.legend(fontsize=8, loc="center right")
    for key, label, style in (("segm_AP50", "mask AP50", "o-"), ("segm_AP", "mask AP", "s-"),
                              ("bbox_AP50", "box AP50", "^--")):
        points = [(row["epoch"], row[key]) for row in epochs if row.get(key) is not None]
        if points:
            ax_ap.plot(*zip(*points), style, label=label)
    best = history.get("best_epoch")
    if best is not None:
        ax_ap.axvline(best, color="k", lw=0.8, ls=":")
        ax_ap.text(best, 0.4, f"chosen: epoch {best} ", fontsize=8, ha="right")  # clear of the legend
    ax_ap.set_ylim(0, 1.05)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_title("validation COCO AP per epoch (the best mask AP is kept)", fontsize=10)
    ax_ap.legend(fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_ap):
        if x:
            ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pr_curves(curves: Mapping):
    """Mask precision-recall curves at IoU 0.5 and 0.75, with the operating points of score 0.5 and 0.99."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for iou, curve in curves.items():
        recall, precision, scores = (np.asarray(curve[k]) for k in ("recall", "precision", "scores"))
        line, = ax.plot(recall, precision, label=f"IoU {iou}: AP {curve['ap']:.3f}")
        for threshold, marker in ((SCORE_THRESHOLD, "o"), (0.99, "X")):
            above = np.flatnonzero(scores >= threshold)
            if len(above):
                k = above[-1]
                ax.plot(recall[k], precision[k], marker, color=line.get_color(), ms=8,
                        label=f"score >= {threshold:g} (IoU {iou})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("masks on the test tiles", fontsize=10)
    fig.tight_layout()
    return fig


def plot_examples(data: dict, test: dict, count: int = 8):
    """The first ``count`` test tiles: detections >= 0.5 drawn, with tank and detection counts."""
    import matplotlib.pyplot as plt

    from mrcnn_edu import viz
    from mrcnn_edu.data import CocoDataset, decode_segmentation
    from mrcnn_edu.inference import InstanceMasks, draw_prediction

    dataset = CocoDataset(data["test"]["folder"])
    count = max(1, min(count, len(dataset)))
    columns = min(4, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in zip(range(count), axes.flat):
        image, target = dataset.load(i)
        h, w = image.shape[-2:]
        found = [r for r in test["results"]
                 if r["image_id"] == target["image_id"] and r["score"] >= SCORE_THRESHOLD]
        masks = torch.stack([decode_segmentation(r["segmentation"], h, w) for r in found]) if found else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        prediction = {"boxes": torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (r["bbox"] for r in found)],
                                            dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.ones(len(found), dtype=torch.int64),
                      "scores": torch.tensor([r["score"] for r in found], dtype=torch.float32),
                      "masks": InstanceMasks.from_dense(masks)}
        ax.imshow(draw_prediction(image, prediction, ["__background__", "tank"], line_width=1))
        viz.outline_masks(ax, target["masks"], colors=["white"] * len(target["masks"]), linewidth=0.8, halo=None)
        ax.set_title(f"{len(target['labels'])} tanks, {len(found)} detections", fontsize=9)
    fig.suptitle(f"test tiles: detections scoring >= {SCORE_THRESHOLD} (coloured), true tanks outlined in white",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_training_steps(history: Mapping):
    """``viz.plot_training_curves`` of the run's steps and epochs."""
    from mrcnn_edu import viz

    steps = history.get("steps", [])
    return viz.plot_training_curves(steps, history.get("epochs", []), smooth=max(1, min(20, len(steps) // 10)))


def shipped_test_metrics(settings: CaseStudySettings) -> dict | None:
    """Mask AP metrics (pycocotools) on the test tiles from the shipped tank weights' card, or None.

    None when the card is missing, was made on other test data (seed, count or tile size), or
    when this run evaluates (or writes) the shipped file itself.
    """
    from mrcnn_edu.weights import read_card

    path = weights_dir() / "tanks_small.safetensors"
    if settings.fast or not path.is_file():
        return None
    for mine in (settings.weights, settings.save_weights):
        if mine is not None and Path(mine).resolve() == path.resolve():
            return None
    try:
        card = read_card(path)
    except UserError:
        return None
    data, metrics = card.get("data", {}), card.get("test_pycocotools", {}).get("segm")
    wanted = f"{settings.test_tiles} synthetic tiles of {settings.tile_size} px"
    if not metrics or data.get("test_seed") != TEST_SEED or not str(data.get("test", "")).startswith(wanted):
        return None
    return dict(metrics)


def acceptance(study: CaseStudy) -> list[dict]:
    """The issue's acceptance numbers for this run: ``{"check", "target", "value", "passed"}`` rows."""
    rows = []

    def add(check: str, target: str, value, passed) -> None:
        rows.append({"check": check, "target": target, "value": value, "passed": passed})

    if study.test is not None:
        segm = study.test["pycocotools"]["segm"]
        # the issue sets these two for the shipped weights (make weights); the case study's shorter
        # schedule must land within TARGETS["shipped_AP50_gap"] of their AP50 (the row after)
        add("test mask AP50 (pycocotools; target of the shipped weights)", f">= {TARGETS['test_mask_AP50']}",
            round(segm["AP50"], 4), segm["AP50"] >= TARGETS["test_mask_AP50"])
        add("test mask AP@[.5:.95] (pycocotools; target of the shipped weights)", f">= {TARGETS['test_mask_AP']}",
            round(segm["AP"], 4), segm["AP"] >= TARGETS["test_mask_AP"])
        shipped = shipped_test_metrics(study.settings)
        if shipped is not None:
            gap = shipped["AP50"] - segm["AP50"]
            add(f"mask AP50 below the shipped weights' {shipped['AP50']:.4f}", f"<= {TARGETS['shipped_AP50_gap']}",
                round(gap, 4), gap <= TARGETS["shipped_AP50_gap"])
    for key, what in (("mae", "predicted masks"), ("mae_true_masks", "true masks")):
        if study.fill is not None and study.fill.get(key) is not None:
            mae = 100 * study.fill[key]
            add(f"fill level MAE, {what} (percentage points)", f"<= {TARGETS['fill_mae_pp']:g}", round(mae, 2),
                mae <= TARGETS["fill_mae_pp"])
    if study.scenes is not None:
        size = study.settings.scene_size
        add(f"slowest {size} px scene (s)", f"< {TARGETS['scene_seconds']:g}" + ("" if size == 2560 else
                                                                                 " (for 2560 px)"),
            round(study.scenes["max_seconds"], 2), study.scenes["max_seconds"] < TARGETS["scene_seconds"])
    total = sum(study.seconds.values()) / 60
    add("total wall time (min)", f"<= {TARGETS['total_minutes']:g}", round(total, 2), total <= TARGETS["total_minutes"])
    return rows


def build_metrics(study: CaseStudy) -> dict:
    """``metrics.json``: settings, data, training, test, scenes, error analysis, fill level, timing, machine."""
    s = study.settings
    metrics: dict[str, Any] = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "fast": s.fast,
        "command": s.command,
        "settings": _jsonable({k: v for k, v in dataclasses.asdict(s).items() if k != "command"}),
        "data": study.data,
        "machine": machine_info(),
        "seconds": {k: round(v, 2) for k, v in study.seconds.items()},
        "total_seconds": round(sum(study.seconds.values()), 2),
    }
    if study.training is not None:
        t = study.training
        metrics["training"] = {k: t.get(k) for k in ("weights", "skipped", "best_epoch", "best_metric",
                                                     "best_metric_name", "steps", "steps_per_epoch", "epochs",
                                                     "train_seconds", "train_config")}
        metrics["training"]["epochs_table"] = t.get("history", {}).get("epochs", [])
    if study.test is not None:
        v = study.test
        metrics["test"] = {"images": v["images"], "pycocotools": v["pycocotools"], "ours": v["ours"],
                                 "max_difference": v["max_difference"], "seconds_per_tile": v["seconds_per_tile"],
                                 "pr_ap": {iou: c["ap"] for iou, c in v["pr_curves"].items()}}
    if study.scenes is not None:
        metrics["scenes"] = {k: v for k, v in study.scenes.items() if not k.startswith("_")}
    if study.errors is not None:
        metrics["error_analysis"] = {k: v for k, v in study.errors.items() if k not in ("figures", "table")}
    if study.fill is not None:
        metrics["fill_level"] = {k: v for k, v in study.fill.items() if k != "figures"}
    metrics["acceptance"] = acceptance(study)
    return _jsonable(metrics)


def write_report(study: CaseStudy, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Step 6: ``OUT/figures/*.png``, ``OUT/metrics.json`` and ``OUT/report.md`` (each written atomically).

    Returns ``{"report": path, "metrics": path, "figures": {name: path}}``.
    """
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    s = study.settings
    out, fig_dir = s.out_dir, s.out_dir / "figures"
    figures: dict[str, Path] = {}

    def save(name: str, make: Callable[[], Any]) -> None:
        try:
            figure = make()
        except Exception as error:  # noqa: BLE001 -- a figure must never cost the whole report
            log(f"  figure {name} failed: {type(error).__name__}: {error}")
            return
        if figure is not None:
            figures[name] = _save_figure(_as_figure(figure), fig_dir / f"{name}.png")

    if study.training is not None and study.training.get("history"):
        save("training_curves", lambda: plot_training(study.training["history"]))
        save("training_steps", lambda: plot_training_steps(study.training["history"]))
    if study.test is not None:
        if study.test["pr_curves"]:
            save("pr_curve", lambda: plot_pr_curves(study.test["pr_curves"]))
        save("examples", lambda: plot_examples(study.data, study.test, s.examples))
    if study.scenes is not None and study.scenes.get("_thumbnail") is not None:
        thumbnail = study.scenes["_thumbnail"].copy()
        thumbnail.thumbnail((1024, 1024))
        buffer = io.BytesIO()
        thumbnail.save(buffer, format="PNG")
        atomic_write_bytes(fig_dir / "scene_overlay.png", buffer.getvalue())
        figures["scene_overlay"] = fig_dir / "scene_overlay.png"
    for part in (study.errors, study.fill):
        for name, figure in (part or {}).get("figures", {}).items():
            save(name, lambda figure=figure: figure)

    metrics = build_metrics(study)
    metrics["figures"] = {name: str(path.relative_to(out)) for name, path in figures.items()}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(study, metrics, figures))
    log(f"  wrote {out / 'report.md'}, {out / 'metrics.json'} and {len(figures)} figures in {fig_dir}")
    return {"report": out / "report.md", "metrics": out / "metrics.json", "figures": figures}


def _figure_md(figures: Mapping[str, Path], name: str, out: Path) -> str:
    if name not in figures:
        return ""
    return f"![{FIGURES[name]}]({figures[name].relative_to(out).as_posix()})\n\n*{FIGURES[name]}.*\n"


def _table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)\n"
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, (list, dict)):
            return json.dumps(value)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_report(study: CaseStudy, metrics: Mapping, figures: Mapping[str, Path]) -> str:
    """The Markdown text of ``report.md``."""
    from mrcnn_edu.evaluation import format_table

    s, out = study.settings, study.settings.out_dir
    md = [f"# Case study: oil storage tanks -- report{' (FAST MODE: a smoke test, not a model)' if s.fast else ''}\n",
          f"Created {metrics['created']} by `{s.command or 'mrcnn_edu.casestudy.run_casestudy'}`.\n",
          (f"Machine: {machine_line(metrics['machine'])}. Total wall time "
           f"{metrics['total_seconds'] / 60:.1f} min.\n")]
    md.append("## Targets\n")
    md.append(_table([{**row, "passed": "yes" if row["passed"] else "NO"} for row in metrics["acceptance"]],
                     ["check", "target", "value", "passed"]))
    if s.fast:
        md.append("\nFast mode trains for a few steps on a handful of tiny tiles: the numbers above only show that "
                  "the pipeline runs.\n")

    md.append("\n## 1. Data\n")
    if study.data:
        rows = [{"set": name, "seed": d["seed"], "count": d["count"], "size (px)": d["size"], "tanks": d["tanks"],
                 "from cache": "yes" if d["reused"] else "generated now", "folder": f"`{d['folder']}`"}
                for name, d in study.data.items()]
        md.append("Synthetic ~1.2 m/pixel tiles and scenes from `mrcnn_edu.oil_tanks`. Training sees only the train "
                  "seed; the validation tiles choose the best epoch; the test tiles and the scenes give the numbers "
                  "below and choose nothing.\n\n" + _table(rows))

    md.append("\n## 2. Training\n")
    t = study.training
    if t is None:
        md.append("Not run.\n")
    elif t.get("skipped"):
        md.append(f"Skipped: evaluating the given weights `{t['weights']}`.\n")
    else:
        config = t["train_config"]
        stages = [{"stage": i + 1, "epochs": st["epochs"], "trains": st["trainable"],
                   "learning rate": config["lr"] * st["lr_scale"]} for i, st in enumerate(config["stages"])]
        best = (f"{t['best_epoch']} ({t['best_metric_name']} {t['best_metric']:.3f})"
                if t.get("best_metric") is not None else "n/a (no validation)")
        md.append(f"{config['optimizer'].upper()} (momentum {config['momentum']}, weight decay "
                  f"{config['weight_decay']}), batch {config['batch_size']}, warm-up {config['warmup_iters']} steps, "
                  f"schedule `{config['schedule']}` within stages, gradient clipping {config['grad_clip']}, "
                  f"augmentations {', '.join(config['augment']) or 'none'}; {t['steps']} steps "
                  f"({t['steps_per_epoch']} per epoch), {t['train_seconds'] / 60:.1f} min of training steps over "
                  f"all sessions (validation excluded). Best epoch by validation mask AP: {best}; its weights: "
                  f"`{t['weights']}`.\n\n" + _table(stages))
        md.append(_figure_md(figures, "training_curves", out))
        md.append(_figure_md(figures, "training_steps", out))
        epochs = t.get("history", {}).get("epochs", [])
        md.append("\n" + _table(epochs, [c for c in ("epoch", "stage", "trainable", "lr", "train_loss", "val_loss",
                                                     "segm_AP", "segm_AP50", "bbox_AP50", "seconds")
                                         if any(c in row for row in epochs)]))

    md.append("\n## 3. Test tiles: COCO AP\n")
    v = study.test
    if v is not None:
        md.append(f"{v['images']} test tiles (seed {TEST_SEED}); by pycocotools (our own evaluation, "
                  f"`mrcnn_edu.evaluation`, agrees to {v['max_difference']:.1e}); "
                  f"{1000 * v['seconds_per_tile']:.0f} ms per tile.\n\n```\n{format_table(v['pycocotools'])}\n```\n\n")
        md.append(_figure_md(figures, "pr_curve", out) + "\n" + _figure_md(figures, "examples", out))

    md.append("\n## 4. Scene-scale inference\n")
    sc = study.scenes
    if sc is not None:
        m = sc["metrics"]
        md.append(f"Held-out scenes (seed {SCENE_SEED}) cut into {sc['tile_size']} px tiles with {sc['overlap']} px "
                  f"overlap, detections merged across tile borders (`inference.predict_image`). Over all scenes, "
                  f"pycocotools with up to 1000 detections per scene: mask AP50 {m['segm']['AP50']:.3f}, mask AP "
                  f"{m['segm']['AP']:.3f}, box AP50 {m['bbox']['AP50']:.3f}. Overlays (detections >= "
                  f"{SCORE_THRESHOLD}) in `{Path(sc['overlay_dir']).relative_to(out).as_posix()}/`.\n\n")
        md.append(_table(sc["rows"], ["file", "tanks", "detections", "detections_0.5", "tiles", "seconds"]) + "\n")
        md.append(_figure_md(figures, "scene_overlay", out))

    md.append("\n## 5. Error analysis\n")
    e = study.errors
    if e is None or not e.get("available"):
        md.append("Not available in this run (`mrcnn_edu.error_analysis` is missing).\n")
    else:
        md.append(f"Validation tiles, detections scoring >= {SCORE_THRESHOLD}, matched at IoU 0.5.\n\n"
                  f"```\n{e['table']}\n```\n\n")
        md.append(_figure_md(figures, "recall_by_size", out) + "\n" + _figure_md(figures, "leakage", out) + "\n")
        md.append("Threshold sweep (the original kept only detections scoring >= 0.99):\n\n")
        md.append(_table(e["sweep"] if isinstance(e["sweep"], list) and all(isinstance(r, Mapping) for r in e["sweep"])
                         else []) + "\n")
        md.append(_figure_md(figures, "threshold_sweep", out) + "\n" + _figure_md(figures, "gallery_fp", out) + "\n"
                  + _figure_md(figures, "gallery_fn", out))

    md.append("\n## 6. Fill level of floating roofs\n")
    f = study.fill
    if f is None or not f.get("available"):
        md.append("Not available in this run (`mrcnn_edu.fill_level` is missing).\n")
    else:
        mae = f"{100 * f['mae']:.1f} percentage points" if f.get("mae") is not None else "n/a"
        true_mae = f"{100 * f['mae_true_masks']:.1f}" if f.get("mae_true_masks") is not None else "n/a"
        md.append(f"Fill level = 1 - (crescent width / ground-shadow length), measured along the sun's direction "
                  f"(`mrcnn_edu.fill_level`) on the *predicted* mask of the detection matching each floating roof "
                  f"(score >= {SCORE_THRESHOLD}, mask IoU >= 0.5), on the test tiles.\n\n"
                  f"Mean absolute error **{mae}** over {f['n']} reliable estimates. Of {f['floating']} floating "
                  f"roofs, {f['missed']} had no matching detection and {f['unreliable']} were flagged unreliable by "
                  f"the estimator (shadow cut by the tile border or another tank, roof all in shadow, ...). With the "
                  f"true masks instead of the predicted ones: {true_mae} percentage points over {f['n_true_masks']} "
                  f"tanks.")
        md.append(_figure_md(figures, "fill_scatter", out))

    md.append("\n## 7. Time per step\n")
    md.append(_table([{"step": k, "seconds": round(v, 1)} for k, v in study.seconds.items()]
                     + [{"step": "total", "seconds": round(sum(study.seconds.values()), 1)}]))
    md.append(f"\nMachine: {machine_line(metrics['machine'])}.\n")
    md.append("\n## Files\n\n- `metrics.json`: every number above\n- `figures/`: the figures\n"
              "- `train/`: checkpoints (`last.pt`, `best.pt`), `history.csv`, `history.json`, `model.safetensors`\n"
              "- `scenes/`: overlays and COCO results of the scenes\n")
    return "\n\n".join(part.strip("\n") for part in md if part.strip()) + "\n"  # one blank line between blocks


# ----------------------------------------------------------------------------------------------
# All steps
# ----------------------------------------------------------------------------------------------


def run_casestudy(out_dir: str | os.PathLike = "runs/casestudy", fast: bool | None = None,
                  train_tiles: int | None = None, val_tiles: int | None = None, test_tiles: int | None = None,
                  scenes: int | None = None,
                  weights: str | os.PathLike | None = None, save_weights: str | os.PathLike | None = None,
                  progress: bool = True, restart: bool = False, model_config: str | os.PathLike | None = None,
                  train_config: str | os.PathLike | None = None, command: str | None = None) -> CaseStudy:
    """Run every step of the case study and write ``OUT/report.md``, ``OUT/metrics.json`` and ``OUT/figures/``.

    Args:
        out_dir: the run's folder (``train/``, ``scenes/``, ``figures/``, the report).
        fast: tiny everything (default: ``MRCNN_EDU_FAST``).
        train_tiles, val_tiles, test_tiles, scenes: data sizes (defaults 1600, 100, 200, 2; fast 16, 8, 8, 1).
        weights: evaluate these weights instead of training.
        save_weights: also write the trained weights here with a card (``make weights``).
        progress: tqdm bars and one line per epoch.
        restart: train from scratch even if ``OUT/train/last.pt`` exists (default: resume it).
        model_config, train_config: JSON files (default ``configs/tanks_small.json`` and
            ``configs/tanks_train.json``).
        command: the command line, for the report and the weights card.

    Returns:
        The :class:`CaseStudy` with every step's outcome (``study.seconds``: wall time per step).
    """
    settings = CaseStudySettings.create(out_dir, fast=fast, train_tiles=train_tiles, val_tiles=val_tiles,
                                        test_tiles=test_tiles, scenes=scenes, weights=weights,
                                        save_weights=save_weights, progress=progress, restart=restart,
                                        model_config=model_config, train_config=train_config, command=command)
    study = CaseStudy(settings)
    log = _logger(study.log_lines)
    s = settings
    s.out_dir.mkdir(parents=True, exist_ok=True)
    log(f"case study{' (fast mode)' if s.fast else ''} -> {s.out_dir}; {machine_line()}")

    def step(name: str, title: str, fn: Callable[[], Any]):
        log(f"[{len(study.seconds) + 1}/6] {title}")
        started = time.perf_counter()
        value = fn()
        study.seconds[name] = study.seconds.get(name, 0.0) + time.perf_counter() - started
        return value

    study.data = step("data", "synthetic data", lambda: prepare_data(s, log))
    if s.weights is None:
        study.training = step("train", "training (three stages)", lambda: train_model(s, study.data, log))
        weights_path = Path(study.training["weights"])
    else:
        weights_path = s.weights
        study.training = {"weights": str(weights_path), "skipped": True}
        study.seconds["train"] = 0.0

    from mrcnn_edu.weights import load_weights

    model, _card = load_weights(weights_path, device="cuda" if torch.cuda.is_available() else "cpu")
    study.test = step("evaluate", f"evaluation of {weights_path} on the test tiles",
                      lambda: evaluate_test(s, model, study.data, log))
    if s.save_weights is not None:
        save_shipped_weights(s, study.training, study.test, study.data, log)
    study.scenes = step("scenes", "scene-scale inference", lambda: predict_scenes(s, model, study.data, log))

    def analysis():
        study.errors = analyse_errors(s, study.data, study.test, log)
        study.fill = estimate_fill_levels(s, study.data, study.test, log)

    step("analysis", "error analysis and fill level", analysis)
    step("report", "report", lambda: write_report(study, log))
    log(f"done in {sum(study.seconds.values()) / 60:.1f} min: {s.out_dir / 'report.md'}")
    return study
