"""Scene-scale inference: one 2560 x 2560 synthetic scene through the tiled predictor.

Times ``mrcnn_edu.inference.predict_image`` (tiling, the model on every tile, the merge across
tile borders) with the small preset, as ``mrcnn-edu predict`` runs it; then, separately, the
two extras of the command: COCO RLE encoding of the masks and the overlay PNG. The case-study
acceptance asks for a 2560 x 2560 scene in under 60 s on a 2-core CPU.

    python benchmarks/bench_scene.py                            # random weights, small preset
    python benchmarks/bench_scene.py --weights W.safetensors    # trained weights (e.g. the shipped ones)
    python benchmarks/bench_scene.py --threads 1                # one thread: steadier on a busy machine

With random weights every tile yields up to 100 detections, all scoring about 0.5, so no fixed
threshold gives a realistic amount of mask work. The bench then calibrates one on the first
tiles: the score kept by about ``--per-tile`` (default 1.5) detections per tile, i.e. ~250 in the
scene -- as many as a dense scene has tanks. Trained weights use 0.5 (``mrcnn-edu predict``'s
default). ``--score-threshold`` overrides both; the detection counts are printed.

Wall time on a shared machine depends on what else runs: the CPU time of the process is printed
beside it (with 2 threads it can exceed the wall time).
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine_line  # noqa: E402

from mrcnn_edu.config import small  # noqa: E402
from mrcnn_edu.inference import (DEFAULT_OVERLAP, default_tile_size, draw_prediction, plan_tiles,  # noqa: E402
                                 predict_image)
from mrcnn_edu.model import build_mask_rcnn, count_parameters  # noqa: E402


def synthetic_scene(size: int, seed: int) -> tuple[torch.Tensor, str]:
    """The case study's synthetic scene (tank farms, fields, roads, sensor effects), without masks."""
    from mrcnn_edu.oil_tanks import make_scene

    return make_scene(size, seed=seed, with_masks=False).image, f"oil_tanks.make_scene({size}, seed={seed})"


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM = peak RSS) in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_memory() -> bool:
    """Restart the VmHWM count from the current RSS (Linux >= 4.0), so the peak of one step can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="weights file (default: random small preset)")
    parser.add_argument("--size", type=int, default=2560)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-threshold", type=float, default=None)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--per-tile", type=float, default=1.5,
                        help="random weights: calibrate the score threshold to keep this many detections per tile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.weights is not None:
        from mrcnn_edu.weights import load_weights

        model, _ = load_weights(args.weights)
        what = f"weights {args.weights}"
        threshold = 0.5 if args.score_threshold is None else args.score_threshold
    else:
        torch.manual_seed(0)
        model = build_mask_rcnn(small(num_classes=2)).eval()
        what = "small preset, random weights (seed 0)"
        threshold = args.score_threshold
    model.eval()

    t0 = time.perf_counter()
    image, source = synthetic_scene(args.size, args.seed)
    make_seconds = time.perf_counter() - t0
    tile_size = args.tile_size
    used_tile = tile_size if tile_size is not None else default_tile_size(model)
    print(f"machine: {machine_line()}")
    print(f"model:   {what}, {count_parameters(model) / 1e6:.2f} M parameters")
    print(f"scene:   {source}, {tuple(image.shape)} (made in {make_seconds:.1f} s)")

    # warm-up (allocator, kernels) on the scene's top-left corner, which also calibrates the threshold
    corner = image[:, :used_tile * 2, :used_tile * 4]
    warm = predict_image(model, corner, tile_size=used_tile, overlap=args.overlap, score_threshold=0.0, report={})
    if threshold is None:
        count = len(plan_tiles(tuple(corner.shape[-2:]), used_tile, args.overlap))
        keep = min(len(warm["scores"]), max(1, round(args.per_tile * count)))
        threshold = float(warm["scores"].sort(descending=True).values[keep - 1]) - 1e-6 if keep else 0.5
        what += f"; score threshold calibrated to ~{args.per_tile:g} detections per tile"

    rss_before = _status_mb("VmRSS")
    peak_reset = _reset_peak_memory()
    report: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    prediction = predict_image(model, image, tile_size=tile_size, overlap=args.overlap, score_threshold=threshold,
                               batch_size=args.batch_size, report=report)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak_during = _status_mb("VmHWM") if peak_reset else None
    tiles = report["tiles"]
    t0 = time.perf_counter()
    rles = prediction["masks"].to_rle()
    rle_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    buffer = io.BytesIO()
    draw_prediction(image, prediction).save(buffer, format="PNG", compress_level=1)
    overlay_seconds = time.perf_counter() - t0

    print(f"tiles:   {tiles} of {used_tile} px, overlap {args.overlap}, batch {args.batch_size}, "
          f"score threshold {threshold:.4f}")
    print(f"merge:   {report['raw']} tile detections -> {report['final']} "
          f"(cut {report['cut']}, cut views dropped {report['cut_covered']}, "
          f"whole after NMS {report['whole_after_nms']}, after mask check {report['whole_after_mask_check']}, "
          f"stitched groups {report['stitched_groups']})")
    print(f"masks:   {prediction['masks'].nbytes() / 1e6:.2f} MB as crops "
          f"(dense uint8 would be {len(rles) * args.size * args.size / 1e6:.0f} MB)")
    print()
    print("| step | wall s | CPU s | rate |")
    print("|---|---:|---:|---:|")
    print(f"| predict_image ({args.size}x{args.size}, {tiles} tiles) | {seconds:.1f} | {cpu_seconds:.1f} | "
          f"{tiles / seconds:.1f} tiles/s |")
    print(f"| COCO RLE of {len(rles)} masks | {rle_seconds:.2f} | | |")
    print(f"| overlay PNG | {overlay_seconds:.2f} | | |")
    if rss_before is not None and peak_during is not None:
        print(f"\nresident memory: {rss_before:.0f} MB before predict_image (torch, model, scene), "
              f"peak {peak_during:.0f} MB during it (+{peak_during - rss_before:.0f} MB)")
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\npeak resident memory of the process (scene generation included): {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
