"""Time-to-accuracy: train the small preset on the shapes toy set on this CPU, print mask AP50 over time.

The issue's target: mask AP50 >= 0.9 on the shapes validation set within 10 minutes on a 2-core CPU.
The model and the training recipe are the committed files ``configs/shapes_small.json`` (the
``small`` preset at 128 px) and ``configs/shapes_train.json`` (SGD, warm-up, cosine, flips and
quarter turns), the same ones ``make weights`` uses for the shipped ``shapes_small`` weights::

    .venv/bin/python benchmarks/bench_train.py                # the measurement (about 10 min)
    .venv/bin/python benchmarks/bench_train.py --save data/weights/shapes_small.safetensors

Every epoch the engine validates (our COCO evaluation, `mrcnn_edu.evaluation`) on
``--val-images`` shapes of another seed; the script prints, per epoch, the wall time since the
start (validation included), the mask and box AP50 and AP; at the end the same numbers by
pycocotools, and when AP50 first reached the target. Nothing here is a test: timings depend on
the machine and on what else runs on it (the machine line says which CPU it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import machine_line  # noqa: E402

from mrcnn_edu import engine  # noqa: E402
from mrcnn_edu.data import ShapesDataset  # noqa: E402
from mrcnn_edu.evaluation import evaluate_pycocotools  # noqa: E402

ROOT = HERE.parent
TARGET = 0.9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-config", type=Path, default=ROOT / "configs" / "shapes_small.json")
    parser.add_argument("--train-config", type=Path, default=ROOT / "configs" / "shapes_train.json")
    parser.add_argument("--images-per-epoch", type=int, default=1600, help="shapes per epoch (seed 0)")
    parser.add_argument("--val-images", type=int, default=100, help="validation shapes (seed 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the train config's epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_train")
    parser.add_argument("--save", type=Path, default=None, help="copy the trained weights (+ card) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_config = engine.load_model_config(args.model_config)
    train_config = engine.load_train_config(args.train_config, epochs=args.epochs)
    train_set = ShapesDataset(args.images_per_epoch, size=128, seed=0)
    val_set = ShapesDataset(args.val_images, size=128, seed=1)
    train_config = dataclasses.replace(train_config, max_val_images=None)
    print(machine_line())
    print(f"torch threads: {torch.get_num_threads()}; {train_config.epochs} epochs x {args.images_per_epoch} images, "
          f"batch {train_config.batch_size}; validation: {args.val_images} images")
    print(f"{'epoch':>5} {'wall min':>8} {'train min':>9} {'mask AP50':>9} {'mask AP':>7} {'box AP50':>8} {'loss':>6}")

    started = time.perf_counter()
    curve: list[tuple[float, float]] = []
    train_seconds = 0.0

    def report(event: str, info: dict) -> None:
        nonlocal train_seconds
        if event != "epoch" or info["rank"] != 0:
            return
        record = info["record"]
        wall = (time.perf_counter() - started) / 60
        train_seconds += record.get("seconds", 0.0)
        ap50, ap, box50 = record.get("segm_AP50", float("nan")), record.get("segm_AP", float("nan")), record.get(
            "bbox_AP50", float("nan"))
        curve.append((wall, ap50))
        print(f"{record['epoch']:>5} {wall:>8.1f} {train_seconds / 60:>9.1f} {ap50:>9.3f} {ap:>7.3f} {box50:>8.3f} "
              f"{record.get('train_loss', float('nan')):>6.3f}", flush=True)

    model, history = engine.build_and_train(
        model_config, train_set, val_set, train_config, args.out, resume=False, progress=False, callbacks=[report],
        card={"command": "benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": {"train": repr(train_set), "validation": repr(val_set)}})
    total = (time.perf_counter() - started) / 60

    # the chosen (best) weights, by pycocotools this time
    from mrcnn_edu.evaluation import results_from_predictions
    from mrcnn_edu.weights import card_path, load_weights, save_weights

    best, card = load_weights(args.out / engine.WEIGHTS)
    outputs, ids = [], []
    with torch.no_grad():
        for i in range(len(val_set)):
            image, target = val_set[i]
            outputs.append(best([image])[0])
            ids.append(target["image_id"])
    results = results_from_predictions(outputs, ids, val_set.label_to_category_id)
    segm = evaluate_pycocotools(val_set.coco_gt(), results, "segm")
    bbox = evaluate_pycocotools(val_set.coco_gt(), results, "bbox")
    reached = next((wall for wall, ap50 in curve if ap50 >= TARGET), None)
    print(f"total {total:.1f} min; chosen epoch {history.best_epoch}: pycocotools mask AP50 {segm['AP50']:.3f}, "
          f"mask AP {segm['AP']:.3f}, box AP50 {bbox['AP50']:.3f}")
    print(f"mask AP50 >= {TARGET}: " + (f"first reached after {reached:.1f} min (wall, validation included)"
                                        if reached is not None else "not reached"))
    if args.save is not None:  # the chosen weights, their card enriched with this run's facts
        from mrcnn_edu.config import MaskRCNNConfig

        config = MaskRCNNConfig.from_dict(card.pop("config"))
        class_names = card.pop("class_names")
        card.update({"seconds": round(total * 60), "benchmark": {
            "machine": machine_line(), "curve_min_ap50": [[round(w, 2), round(a, 4)] for w, a in curve],
            "pycocotools_segm": segm, "pycocotools_bbox": bbox,
            "validation": f"ShapesDataset({args.val_images}, size=128, seed=1)"}})
        save_weights(args.save, best, config, class_names, card)
        print(f"saved {args.save} (+ {card_path(args.save).name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
