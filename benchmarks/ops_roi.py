"""Benchmark cases for RoIAlign, RoIPool and MultiScaleRoIAlign: ours vs torchvision (CPU).

Run through the runner: ``python benchmarks/bench_ops.py roi``.

Workload: 512 boxes on one 256-channel 200 x 200 map (P2 of an 800 x 800 image, stride 4,
``spatial_scale=0.25``). Box sides are log-uniform between 8 and 400 image pixels (2 to 100
cells), centres uniform over the image, so some boxes hang over the border. Outputs 7 x 7 (box
head) and 14 x 14 (mask head); ``sampling_ratio`` 2 (torchvision's Mask R-CNN) and -1
(adaptive: about one point per cell, so big boxes cost more). Forward, and forward + backward
with the same upstream gradient.

torchvision's CPU kernels are single-threaded; ours uses PyTorch's ops, which run on all
threads. The "1 thread" rows time ours with ``torch.set_num_threads(1)`` for a like-for-like
comparison.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from timing import Case, single_thread

from mrcnn_edu import roi_ops

IMAGE_SIZE = 800
STRIDE = 4
NUM_BOXES = 512
CHANNELS = 256


def make_boxes(num_boxes: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Tensor[K, 4] of (x1, y1, x2, y2): sides log-uniform in [8, 400] px, centres anywhere in the image."""
    side = torch.exp(torch.empty(num_boxes, 2).uniform_(2.08, 5.99, generator=generator))  # e^2.08 = 8
    centre = torch.rand(num_boxes, 2, generator=generator) * image_size
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


def forward_backward(op, feature: torch.Tensor, upstream: torch.Tensor, *args, **kwargs):
    """A zero-argument call: op forward on a fresh leaf, then backward of <output, upstream>."""
    def run():
        x = feature.detach().requires_grad_(True)
        op(x, *args, **kwargs).backward(upstream)
        return x.grad
    return run


def cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    size = IMAGE_SIZE // STRIDE
    feature = torch.randn(1, CHANNELS, size, size, generator=g)
    boxes = make_boxes(NUM_BOXES, IMAGE_SIZE, g)
    rois = torch.cat([torch.zeros(NUM_BOXES, 1), boxes], dim=1)  # (K, 5), all in image 0
    scale = 1.0 / STRIDE
    shape = f"{NUM_BOXES} boxes, 1x{CHANNELS}x{size}x{size}"
    result = []

    def forward_and_backward_cases(op: str, ours_op, theirs_op, args: tuple, name: str, upstream) -> list[Case]:
        ours = lambda: ours_op(feature, *args)  # noqa: E731
        return [
            Case(f"{op} fwd", name, {"vectorised": ours, "vectorised, 1 thread": single_thread(ours)},
                 lambda: theirs_op(feature, *args), repeats=5),
            Case(f"{op} fwd+bwd", name, {"vectorised": forward_backward(ours_op, feature, upstream, *args)},
                 forward_backward(theirs_op, feature, upstream, *args), repeats=5),
        ]

    for out in (7, 14):
        upstream = torch.randn(NUM_BOXES, CHANNELS, out, out, generator=g)
        for ratio in (2, -1):
            result += forward_and_backward_cases("roi_align", roi_ops.roi_align, torchvision.ops.roi_align,
                                                 (rois, out, scale, ratio),
                                                 f"{shape}, {out}x{out}, sampling_ratio={ratio}", upstream)

    for out in (7, 14):
        upstream = torch.randn(NUM_BOXES, CHANNELS, out, out, generator=g)
        result += forward_and_backward_cases("roi_pool", roi_ops.roi_pool, torchvision.ops.roi_pool,
                                             (rois, out, scale), f"{shape}, {out}x{out}", upstream)

    # MultiScaleRoIAlign over P2-P5 of a batch of 2 images (800 x 800 and 800 x 608), as the box head uses it
    image_sizes = [(IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, 608)]
    features = OrderedDict((str(i), torch.randn(2, CHANNELS, IMAGE_SIZE // s, IMAGE_SIZE // s, generator=g))
                           for i, s in enumerate((4, 8, 16, 32)))
    per_image = [make_boxes(NUM_BOXES // 2, IMAGE_SIZE, g) for _ in image_sizes]
    ours_pooler = roi_ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    tv_pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    result.append(Case("multiscale_roi_align fwd",
                       f"{NUM_BOXES} boxes, 2 images, P2-P5 x {CHANNELS} channels, 7x7, sampling_ratio=2",
                       {"vectorised": lambda: ours_pooler(features, per_image, image_sizes)},
                       lambda: tv_pooler(features, per_image, image_sizes), repeats=5))
    return result
