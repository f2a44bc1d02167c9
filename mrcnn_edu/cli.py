"""The ``mrcnn-edu`` command line: environment check and the exercise tools.

Sub-commands::

    mrcnn-edu doctor                                          versions, device, paths
    mrcnn-edu exercises build OUT_DIR [--notebooks DIR]       student versions of the notebooks
    mrcnn-edu exercises grade NOTEBOOK [--timeout S] [--full] run a notebook, print a score table
    mrcnn-edu predict IMAGES_OR_DIR --weights W --out R.json  COCO results (+ --viz overlays), scenes tiled
    mrcnn-edu evaluate --weights W --data DIR_OR_SHAPES       print the COCO AP table
    mrcnn-edu prepare-airbus SRC OUT [--tile-size PX] ...     Airbus oil tanks -> COCO tiles
    mrcnn-edu train CONFIG_OR_PRESET --data DIR|shapes [--epochs N] ... train, resume, write weights
    mrcnn-edu casestudy [--out DIR] [--fast] [--weights W] ...  the oil-tank case study end to end + report

Adding a sub-command: write ``register_<name>(subparsers)`` that adds its parser and sets
``func`` to a ``run_<name>(args) -> int`` function, and append the register function to
:data:`SUBCOMMANDS`. Import heavy modules inside ``run_<name>`` so ``--help`` stays quick.
A ``run_*`` function reports problems the user can fix by raising
:class:`mrcnn_edu.utils.UserError` (``OSError`` is caught too); :func:`main` turns them
into one line ``mrcnn-edu: error: ...`` on stderr and exit code 2 — never a traceback.

Exit codes: 0 success, 1 a graded notebook has failing checks, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import mrcnn_edu
from mrcnn_edu.utils import UserError

PROG = "mrcnn-edu"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _UsageError(UserError):
    """A command line argparse could not parse."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors become one line (no usage dump) via :class:`UserError`."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def register_doctor(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="show versions, device, threads and paths",
        description="Show what the course runs on: versions, device, threads, fast mode and data paths.",
    )
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from mrcnn_edu.utils import environment_report

    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# exercises build / grade
# ---------------------------------------------------------------------------------------------


def register_exercises(subparsers) -> None:
    p = subparsers.add_parser(
        "exercises",
        help="build student notebooks, or grade a filled-in one",
        description="Exercise tools (nbgrader-compatible markup).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions")

    b = actions.add_parser(
        "build",
        help="write student versions of every notebook",
        description="Write student versions of every notebook: solution blocks become "
        "`raise NotImplementedError()`, hidden tests and outputs are removed.",
    )
    b.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the student notebooks to")
    b.add_argument(
        "--notebooks", metavar="DIR", type=Path, default=None,
        help="folder of solution notebooks (default: ./notebooks if it exists, else the course's notebooks/)",
    )
    b.add_argument("--force", action="store_true",
                   help="overwrite student notebooks in OUT_DIR even if they contain work")
    b.set_defaults(func=run_exercises_build)

    g = actions.add_parser(
        "grade",
        help="run a notebook and print a score table",
        description="Execute a filled-in notebook from its own folder and grade its check cells. "
        "Exit code 0 if every check passes, 1 otherwise.",
    )
    g.add_argument("notebook", metavar="NOTEBOOK", type=Path, help="the notebook to grade")
    g.add_argument("--timeout", metavar="S", type=_positive_float, default=600.0,
                   help="time limit per cell in seconds (default: 600)")
    g.add_argument("--full", action="store_true",
                   help="run in full mode (default: fast mode, MRCNN_EDU_FAST=1)")
    g.add_argument("--source", metavar="SOLUTION", type=Path, default=None,
                   help="instructor's notebook whose check cells (with hidden tests) replace the "
                        "submitted ones (default: the course notebook of the same name, if any)")
    g.set_defaults(func=run_exercises_grade)

    p.set_defaults(func=lambda args: _print_help(p))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _default_notebooks_dir(required: bool = True) -> Path | None:
    local = Path("notebooks")
    if local.is_dir():
        return local
    from mrcnn_edu.utils import repo_root

    root = repo_root()
    if root is not None:
        return root / "notebooks"
    if not required:
        return None
    raise UserError("no ./notebooks folder here and no course checkout found: pass --notebooks DIR")


def run_exercises_build(args: argparse.Namespace) -> int:
    from mrcnn_edu.exercises import build_student_versions

    src = args.notebooks if args.notebooks is not None else _default_notebooks_dir()
    kept: list = []
    paths = build_student_versions(src, args.out_dir, force=args.force, kept=kept)
    for path in paths:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept  {path} (it has your work in it; --force overwrites it)")
    print(f"{len(paths)} student notebook{'s' if len(paths) != 1 else ''} built from {src} in {args.out_dir}")
    return EXIT_OK


def run_exercises_grade(args: argparse.Namespace) -> int:
    from mrcnn_edu.exercises import grade_notebook, total_points

    mode = "full mode" if args.full else "fast mode"

    def announce() -> None:
        print(f"grading {args.notebook} ({mode}, time limit {args.timeout:g} s per cell) ...", flush=True)

    source = args.source
    if source is None:  # the course's own solution notebook of the same name, when there is one
        candidate = _default_notebooks_dir(required=False)
        candidate = candidate / Path(args.notebook).name if candidate is not None else None
        if candidate is not None and candidate.is_file() and candidate.resolve() != Path(args.notebook).resolve():
            source = candidate
    if source is not None:
        print(f"check cells are taken from {source}")
    results = grade_notebook(args.notebook, timeout=args.timeout, fast=not args.full, on_start=announce,
                             source=source)
    print()
    print(format_grade_table(results))
    earned, possible = total_points(results)
    checks = [r for r in results if r.kind == "check"]
    passed = sum(r.passed for r in checks)
    manual = [r for r in results if r.kind == "manual"]
    print()
    line = f"total: {earned:g}/{possible:g} points — {passed} of {len(checks)} checks passed"
    if manual:
        line += f" (+ {sum(r.max_points for r in manual):g} points graded by hand)"
    print(line)
    failed = any(r.kind != "manual" and not r.passed for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def format_grade_table(results) -> str:
    """Rows of grade_id, points, PASS/FAIL and feedback; extra feedback lines indented below."""
    rows = []
    for r in results:
        points = f"{r.points:g}/{r.max_points:g}" if r.kind in ("check", "manual") else "-"
        rows.append((r.grade_id, points, r.status, r.feedback.splitlines()))
    header = ("exercise", "points", "result", "feedback")
    w0 = max([len(header[0])] + [len(r[0]) for r in rows])
    w1 = max([len(header[1])] + [len(r[1]) for r in rows])
    w2 = max([len(header[2])] + [len(r[2]) for r in rows])
    out = [f"{header[0]:<{w0}}  {header[1]:>{w1}}  {header[2]:<{w2}}  {header[3]}",
           f"{'-' * w0}  {'-' * w1}  {'-' * w2}  {'-' * 8}"]
    indent = " " * (w0 + w1 + w2 + 6)
    for grade_id, points, status, feedback in rows:
        first = feedback[0] if feedback else ""
        out.append(f"{grade_id:<{w0}}  {points:>{w1}}  {status:<{w2}}  {first}".rstrip())
        out += [indent + line for line in feedback[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# prepare-airbus
# ---------------------------------------------------------------------------------------------


def register_prepare_airbus(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-airbus",
        help="turn the Airbus Oil Storage data set into COCO tiles (train/val by scene)",
        description="Read the Airbus Oil Storage Detection layout (SRC/images/*.jpg + "
        "SRC/annotations.csv with image_id, bounds, class), check every row, draw a disc mask in "
        "each box, cut overlapping tiles with their real background, split by scene and write "
        "COCO folders OUT/train and OUT/val (plus white-on-black mask PNGs and OUT/manifest.json). "
        "Download the data yourself from Kaggle (CC BY-NC-SA 4.0); nothing is downloaded here.",
    )
    p.add_argument("src", metavar="SRC", type=Path, help="folder holding annotations.csv and images/")
    p.add_argument("out", metavar="OUT", type=Path, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--tile-size", metavar="PX", type=_whole_number_at_least(1), default=256,
                   help="tile side in pixels (default: 256)")
    p.add_argument("--overlap", metavar="PX", type=_whole_number_at_least(0), default=32,
                   help="pixels shared by neighbouring tiles (default: 32)")
    p.add_argument("--val-fraction", metavar="F", type=float, default=0.1,
                   help="fraction of scenes for validation (default: 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the scene split and of the empty tiles kept (default: 0)")
    p.add_argument("--mask-format", choices=("rle", "polygon"), default="rle",
                   help="segmentations in annotations.json (default: rle)")
    p.add_argument("--min-visible", metavar="F", type=float, default=0.5,
                   help="fraction of a tank's disc a tile must show to annotate it there (default: 0.5)")
    p.add_argument("--keep-empty", metavar="F", type=float, default=0.25,
                   help="fraction of tiles without tanks to keep, chosen with the seed (default: 0.25)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_prepare_airbus)


def _whole_number_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers >= ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return convert


def run_prepare_airbus(args: argparse.Namespace) -> int:
    from mrcnn_edu.airbus import format_summary, prepare_airbus

    manifest = prepare_airbus(
        args.src, args.out, tile_size=args.tile_size, overlap=args.overlap, val_fraction=args.val_fraction,
        seed=args.seed, mask_format=args.mask_format, min_visible=args.min_visible, keep_empty=args.keep_empty,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(format_summary(manifest))
    print(f"wrote {args.out}/train, {args.out}/val and {args.out}/manifest.json")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# predict / evaluate
# ---------------------------------------------------------------------------------------------


def register_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images or whole scenes and write COCO results (+ overlays)",
        description="Run a trained model on image files and folders (searched recursively). An image "
        "larger than one tile (default: the model's input size) is cut into overlapping tiles whose "
        "detections are merged across the tile borders, so a large scene keeps its full resolution. "
        "Writes COCO results JSON (file_name, image_id, category_id, bbox as x y w h, score, "
        "segmentation as compressed RLE) and, with --viz, one overlay PNG per image. Images that "
        "cannot be read are reported by name and skipped.",
    )
    p.add_argument("inputs", metavar="IMAGES_OR_DIR", nargs="+", type=Path,
                   help="image files (RGB, RGBA, grey, 16-bit; PNG, JPEG, TIFF, ...) and/or folders")
    p.add_argument("--weights", metavar="W", type=Path, required=True,
                   help="weights file (.safetensors) written by mrcnn-edu train")
    p.add_argument("--out", metavar="RESULTS_JSON", type=Path, required=True, help="COCO results file to write")
    p.add_argument("--viz", metavar="OUT_DIR", type=Path, default=None,
                   help="also write an overlay PNG per image (masks, boxes, scores) into this folder")
    p.add_argument("--score-threshold", metavar="S", type=_fraction, default=0.5,
                   help="keep detections scoring more than S (default: 0.5)")
    p.add_argument("--tile-size", metavar="PX", type=_whole_number_at_least(16), default=None,
                   help="tile side in pixels (default: the model's min_size, 256 for the small preset)")
    p.add_argument("--overlap", metavar="PX", type=_whole_number_at_least(0), default=64,
                   help="pixels shared by neighbouring tiles; more than the largest object (default: 64)")
    p.add_argument("--batch-size", metavar="N", type=_whole_number_at_least(1), default=4,
                   help="tiles per forward pass (default: 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_predict)


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="COCO AP of a trained model on a data set (prints the COCO table)",
        description="Run a trained model over a COCO folder (images + annotations.json) or the toy "
        "shapes validation set and print COCO's box and mask metrics (AP@[.5:.95], AP50, AP75, "
        "by size, AR), computed by mrcnn_edu.evaluation (equal to pycocotools).",
    )
    p.add_argument("--weights", metavar="W", type=Path, required=True,
                   help="weights file (.safetensors) written by mrcnn-edu train")
    p.add_argument("--data", metavar="DIR_OR_SHAPES", required=True,
                   help="a COCO folder (images + annotations.json), or 'shapes' / 'shapes:N' for N images "
                        f"of the toy shapes validation set (seed {SHAPES_VAL_SEED}, {SHAPES_SIZE} px; "
                        f"default N = {SHAPES_VAL_IMAGES})")
    p.add_argument("--annotations", metavar="FILE", default="annotations.json",
                   help="annotation file inside DIR (default: annotations.json)")
    p.add_argument("--iou-type", metavar="TYPE", nargs="+", choices=("segm", "bbox"), default=["bbox", "segm"],
                   help="segm and/or bbox (default: both)")
    p.add_argument("--max-images", metavar="N", type=_whole_number_at_least(1), default=None,
                   help="evaluate only the first N images")
    p.add_argument("--batch-size", metavar="N", type=_whole_number_at_least(1), default=2,
                   help="images per forward pass (default: 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if present)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)


SHAPES_VAL_SEED, SHAPES_SIZE, SHAPES_VAL_IMAGES = 1, 128, 100
"""``--data shapes``: the toy shapes validation set (``ShapesDataset(n, size, seed=1)``; training uses seed 0)."""


def _fraction(text: str) -> float:
    """An argparse ``type`` accepting numbers in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _device(name: str):
    """``--device``: ``auto`` -> CUDA if present, else the named device (checked)."""
    import torch

    from mrcnn_edu.utils import pick_device

    if name == "auto":
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (expected cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here (use cpu or auto)")
    return device


def _label_to_category_id(card: dict, num_classes: int) -> dict[int, int]:
    """Model label -> COCO category id, from the weights card (default: the label itself)."""
    mapping = card.get("label_to_category_id")
    if isinstance(mapping, dict):
        return {int(label): int(category) for label, category in mapping.items()}
    categories = card.get("categories")
    if isinstance(categories, list) and len(categories) == num_classes - 1:
        return {label: int(c["id"]) for label, c in enumerate(categories, start=1)}
    return {label: label for label in range(1, num_classes)}


def run_predict(args: argparse.Namespace) -> int:
    import json

    from mrcnn_edu.inference import coco_results, default_tile_size, find_images, iter_predictions, save_overlay
    from mrcnn_edu.utils import atomic_write_text
    from mrcnn_edu.weights import load_weights

    model, card = load_weights(args.weights, device=_device(args.device))
    images = find_images(args.inputs, exclude=[args.viz] if args.viz is not None else [])
    tile_size = args.tile_size if args.tile_size is not None else default_tile_size(model)
    if args.overlap >= tile_size:
        raise UserError(f"--overlap {args.overlap} must be smaller than the tile size ({tile_size} px)")
    overlays = {}
    if args.viz is not None:
        overlays = {image.file_name: args.viz / Path(image.file_name).with_suffix(".png") for image in images}
        clash = [image.path for image in images if overlays[image.file_name].resolve() == image.path.resolve()]
        if clash:
            raise UserError(f"--viz {args.viz}: the overlay of {clash[0]} would overwrite it; choose another folder")
    class_names = card["class_names"]
    label_to_category_id = _label_to_category_id(card, len(class_names))
    image_ids = {image.file_name: number for number, image in enumerate(images, start=1)}

    results, skipped, predicted = [], [], 0
    for image_file, image, prediction in iter_predictions(
            model, images, progress=not args.quiet, skipped=skipped, tile_size=tile_size, overlap=args.overlap,
            score_threshold=args.score_threshold, batch_size=args.batch_size):
        results += coco_results(prediction, image_ids[image_file.file_name], image_file.file_name,
                                label_to_category_id)
        if args.viz is not None:
            save_overlay(overlays[image_file.file_name], image, prediction, class_names)
        predicted += 1
    if predicted == 0:
        raise UserError(f"none of the {len(images)} images could be read ({skipped[0][0]}: {skipped[0][1]})")
    atomic_write_text(args.out, json.dumps(results) + "\n")
    summary = (f"{len(results)} detection{'s' if len(results) != 1 else ''} in {predicted} "
               f"image{'s' if predicted != 1 else ''} -> {args.out}")
    if args.viz is not None:
        summary += f"; overlays in {args.viz}"
    print(summary)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}: "
              + ", ".join(name for name, _ in skipped))
    return EXIT_OK


def _evaluation_dataset(spec: str, annotations: str):
    """``--data``: a COCO folder, or ``shapes[:N]`` (the shapes validation set)."""
    from mrcnn_edu.data import CocoDataset, ShapesDataset

    if spec == "shapes" or spec.startswith("shapes:"):
        count = spec.partition(":")[2] or str(SHAPES_VAL_IMAGES)
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--data {spec}: expected 'shapes' or 'shapes:N' with N a whole number >= 1")
        return ShapesDataset(int(count), size=SHAPES_SIZE, seed=SHAPES_VAL_SEED)
    return CocoDataset(spec, annotations)


def run_evaluate(args: argparse.Namespace) -> int:
    from mrcnn_edu.evaluation import evaluate_model, format_table
    from mrcnn_edu.weights import load_weights

    model, card = load_weights(args.weights, device=_device(args.device))
    dataset = _evaluation_dataset(args.data, args.annotations)
    if len(dataset) == 0:
        raise UserError(f"--data {args.data}: the data set has no images")
    if dataset.num_classes != len(card["class_names"]):
        raise UserError(f"--data {args.data} has {dataset.num_classes - 1} classes {list(dataset.class_names[1:])} but "
                        f"the model {args.weights} predicts {len(card['class_names']) - 1}: "
                        f"{list(card['class_names'][1:])}")
    metrics = evaluate_model(model, dataset, batch_size=args.batch_size, progress=not args.quiet,
                             max_images=args.max_images)
    missing = [t for t in args.iou_type if t not in metrics]
    if missing:
        raise UserError(f"--iou-type {missing[0]}: the model predicts no masks (it has no mask branch)")
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    print(f"{args.weights} on {args.data}: {count} image{'s' if count != 1 else ''}")
    print(format_table({t: metrics[t] for t in dict.fromkeys(args.iou_type)}))
    if list(dataset.class_names) != list(card["class_names"]):
        print(f"note: class names differ (data {list(dataset.class_names[1:])}, model "
              f"{list(card['class_names'][1:])}); labels were matched by number")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a COCO folder or the toy shapes",
        description="Train Mask R-CNN (mrcnn_edu.engine.train). Writes OUT/last.pt (resumable), "
        "OUT/best.pt (best validation mask AP), OUT/history.csv and history.json, and the final "
        "OUT/model.safetensors with its card OUT/model.card.json (this command line included). "
        "The number of classes comes from the data. Several processes: "
        "torchrun --nproc_per_node=N -m mrcnn_edu.cli train ...",
    )
    p.add_argument("config", metavar="CONFIG_OR_PRESET",
                   help="a preset (small, r50_fpn) or a MaskRCNNConfig JSON file")
    p.add_argument("--data", metavar="DIR", required=True,
                   help="COCO folder (images + annotations.json), or 'shapes' for the toy data set")
    p.add_argument("--val-data", metavar="DIR", default=None,
                   help="COCO folder to validate on each epoch (default: none; with --data shapes, "
                        "toy images of another seed)")
    p.add_argument("--shapes", metavar="N", type=_positive_count, default=200,
                   help="with --data shapes: number of training images (default: 200)")
    p.add_argument("--epochs", metavar="N", type=_positive_count, default=None,
                   help="epochs of a one-stage run (default: the train config's)")
    p.add_argument("--lr", metavar="LR", type=float, default=None, help="base learning rate")
    p.add_argument("--batch-size", metavar="N", type=_positive_count, default=None, help="images per step")
    p.add_argument("--seed", metavar="N", type=int, default=None, help="random seed (default: 0)")
    p.add_argument("--augment", metavar="NAMES", default=None,
                   help="comma-separated augmentations: hflip, flip, rot90, scale, color (default: the train config's)")
    p.add_argument("--train-config", metavar="FILE", type=Path, default=None,
                   help="TrainConfig JSON file (optimizer, schedule, stages, ...); the options above override it")
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="auto (default: CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", metavar="auto|none|CKPT", default="auto",
                   help="auto (default): continue from OUT/last.pt if it exists; none: start over; "
                        "or a checkpoint file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def run_train(args: argparse.Namespace) -> int:
    import os
    import shlex

    from mrcnn_edu import engine

    model_config = engine.load_model_config(args.config)
    train_config = engine.load_train_config(args.train_config, epochs=args.epochs, lr=args.lr,
                                            batch_size=args.batch_size, seed=args.seed, device=args.device,
                                            augment=args.augment)
    train_set, val_set, data = engine.open_datasets(args.data, args.val_data, shapes=args.shapes)
    out = args.out if args.out is not None else Path("runs") / Path(args.config).stem
    names = ("data", "val_data", "shapes", "epochs", "lr", "batch_size", "seed", "augment", "train_config", "device")
    options = [(f"--{name.replace('_', '-')}", getattr(args, name)) for name in names
               if name != "shapes" or args.data == "shapes"]
    command = shlex.join([PROG, "train", args.config, *[str(part) for option, value in options
                                                         if value is not None for part in (option, value)]])
    _, history = engine.build_and_train(model_config, train_set, val_set, train_config, out,
                                        resume=args.resume, progress=not args.quiet,
                                        card={"command": command, "data": data})
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports (it alone validated)
        label = "mask AP" if history.best_metric_name == "segm_AP" else "box AP"
        best = f", best {label} {history.best_metric:.3f} (epoch {history.best_epoch})" if history.best_epoch else ""
        print(f"trained {len(history.steps)} steps{best}; weights: {out / engine.WEIGHTS}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# casestudy
# ---------------------------------------------------------------------------------------------


def register_casestudy(subparsers) -> None:
    p = subparsers.add_parser(
        "casestudy",
        help="the oil-tank case study end to end: data, three-stage training, evaluation, scenes, report",
        description="Generate the synthetic oil-tank data (cached), train the small model from scratch with "
        "the original's three stages (configs/tanks_small.json, configs/tanks_train.json; resumed "
        "automatically if interrupted), evaluate it on the validation tiles (COCO table by pycocotools), "
        "run tiled inference on held-out scenes, analyse the errors and the fill levels, and write "
        "OUT/report.md, OUT/metrics.json and OUT/figures/. With --fast: tiny everything (a smoke test).",
    )
    p.add_argument("--out", metavar="DIR", type=Path, default=Path("runs/casestudy"),
                   help="output folder (default: runs/casestudy)")
    p.add_argument("--fast", action="store_true",
                   help="tiny data and a few training steps, about a minute (also MRCNN_EDU_FAST=1)")
    p.add_argument("--train-tiles", metavar="N", type=_positive_count, default=None,
                   help="training tiles (default: 1600; fast: 16)")
    p.add_argument("--val-tiles", metavar="N", type=_positive_count, default=None,
                   help="validation tiles that choose the best epoch, a seed training never uses (default: 100; "
                        "fast: 8)")
    p.add_argument("--test-tiles", metavar="N", type=_positive_count, default=None,
                   help="test tiles for the reported numbers, another unused seed (default: 200; fast: 8)")
    p.add_argument("--scenes", metavar="N", type=_positive_count, default=None,
                   help="held-out scenes for tiled inference (default: 2 of 2560 px; fast: 1 of 384 px)")
    p.add_argument("--weights", metavar="W", type=Path, default=None,
                   help="skip training: evaluate these weights (.safetensors)")
    p.add_argument("--save-weights", metavar="PATH", type=Path, default=None,
                   help="also save the trained weights and their card here (make weights: "
                        "data/weights/tanks_small.safetensors)")
    p.add_argument("--model-config", metavar="FILE", type=Path, default=None,
                   help="MaskRCNNConfig JSON or a preset name (default: configs/tanks_small.json)")
    p.add_argument("--train-config", metavar="FILE", type=Path, default=None,
                   help="TrainConfig JSON with the stages (default: configs/tanks_train.json)")
    p.add_argument("--restart", action="store_true",
                   help="train from scratch even if OUT/train/last.pt exists (default: resume it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=run_casestudy)


def run_casestudy(args: argparse.Namespace) -> int:
    import shlex

    from mrcnn_edu import casestudy

    command = shlex.join([PROG, "casestudy", *_casestudy_options(args)])
    casestudy.run_casestudy(args.out, fast=True if args.fast else None, train_tiles=args.train_tiles,
                            val_tiles=args.val_tiles, test_tiles=args.test_tiles, scenes=args.scenes,
                            weights=args.weights, save_weights=args.save_weights, progress=not args.quiet, restart=args.restart,
                            model_config=args.model_config, train_config=args.train_config, command=command)
    return EXIT_OK


def _casestudy_options(args: argparse.Namespace) -> list[str]:
    """The command line's options, normalised (for the report and the weights card)."""
    words = ["--out", str(args.out)] + (["--fast"] if args.fast else [])
    for name in ("train_tiles", "val_tiles", "test_tiles", "scenes", "weights", "save_weights", "model_config",
                 "train_config"):
        if getattr(args, name) is not None:
            words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return words + [flag for flag in ("--restart", "--quiet") if getattr(args, flag[2:])]


# ---------------------------------------------------------------------------------------------
# the parser and main
# ---------------------------------------------------------------------------------------------

#: One register function per sub-command, in the order ``--help`` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_doctor,
    register_exercises,
    register_prepare_airbus,
    register_predict,
    register_evaluate,
    register_train,
    register_casestudy,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Mask R-CNN, stage by stage: tools for the mrcnn_edu course.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {mrcnn_edu.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for register in SUBCOMMANDS:
        register(subparsers)
    parser.set_defaults(func=lambda args: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_OK


def _error(message: str) -> None:
    first = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {first}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    for stream in (sys.stdout, sys.stderr):  # never crash on ✔/✘ in a non-UTF-8 terminal
        if hasattr(stream, "reconfigure") and (getattr(stream, "encoding", "") or "").lower() not in ("utf-8", "utf8"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):
                pass
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    except UserError as err:
        _error(str(err))
        return EXIT_USAGE
    except OSError as err:  # e.g. an output folder without write permission, a full disk
        where = f": {err.filename}" if err.filename else ""
        _error(f"{err.strerror or err}{where}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
