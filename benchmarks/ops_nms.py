"""Benchmark cases for NMS and batched NMS: ours vs torchvision (CPU).

Run through the runner: ``python benchmarks/bench_ops.py nms``.

Workload: N boxes (1,000 / 5,000 / 20,000) jittered around N / 50 objects in an 800 x 800
image -- what a detector produces before NMS: object sides uniform in [32, 256] px, each box's
centre and size jittered by 10 % of the object's size, scores uniform in [0, 1]. At IoU 0.5
(the box head's threshold) NMS removes about 95 % of the boxes; at 0.7 (the RPN's) about 80 %.
Every case first checks that our kept indices equal torchvision's.

``nms`` is the vectorised version the model uses, ``nms_reference`` the loop written for
reading. torchvision's CPU kernel is a single-threaded C++ loop; ours uses PyTorch's ops, which
may use all threads, so the "1 thread" rows time ours with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import torch
import torchvision
from timing import Case, single_thread

from mrcnn_edu.nms import batched_nms, nms, nms_reference

IMAGE_SIZE = 800
BOXES_PER_OBJECT = 50


def clustered_boxes(num_boxes: int, generator: torch.Generator) -> torch.Tensor:
    """Tensor[N, 4] of (x1, y1, x2, y2), jittered around num_boxes / BOXES_PER_OBJECT objects."""
    num_objects = max(1, num_boxes // BOXES_PER_OBJECT)
    centre = torch.rand(num_objects, 2, generator=generator) * IMAGE_SIZE
    size = 32 + torch.rand(num_objects, 2, generator=generator) * 224
    which = torch.randint(0, num_objects, (num_boxes,), generator=generator)  # object of each box
    box_centre = centre[which] + torch.randn(num_boxes, 2, generator=generator) * size[which] * 0.1
    box_size = size[which] * (1 + torch.randn(num_boxes, 2, generator=generator) * 0.1)
    return torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=1)


def cases() -> list[Case]:
    result = []
    for iou_threshold in (0.5, 0.7):
        for num_boxes in (1_000, 5_000, 20_000):
            g = torch.Generator().manual_seed(num_boxes)
            boxes = clustered_boxes(num_boxes, g)
            scores = torch.rand(num_boxes, generator=g)
            expected = torchvision.ops.nms(boxes, scores, iou_threshold)
            for ours in (nms, nms_reference):
                if not torch.equal(ours(boxes, scores, iou_threshold), expected):
                    raise AssertionError(f"{ours.__name__} differs from torchvision on this workload")
            removed = 100 * (1 - expected.numel() / num_boxes)
            name = f"{num_boxes} boxes, clustered, IoU {iou_threshold} ({removed:.0f} % removed)"
            args = (boxes, scores, iou_threshold)
            result.append(Case(
                "nms", name,
                {"vectorised": lambda args=args: nms(*args),
                 "vectorised, 1 thread": single_thread(lambda args=args: nms(*args)),
                 "loop (nms_reference)": lambda args=args: nms_reference(*args)},
                lambda args=args: torchvision.ops.nms(*args),
                repeats=7 if num_boxes < 20_000 else 5))

    # batched: 1,000 boxes use the coordinate trick, 5,000 the per-class loop (torchvision's rule)
    for num_boxes in (1_000, 5_000):
        g = torch.Generator().manual_seed(num_boxes + 1)
        boxes = clustered_boxes(num_boxes, g)
        scores = torch.rand(num_boxes, generator=g)
        idxs = torch.randint(0, 10, (num_boxes,), generator=g)
        args = (boxes, scores, idxs, 0.5)
        if not torch.equal(batched_nms(*args), torchvision.ops.batched_nms(*args)):
            raise AssertionError("batched_nms differs from torchvision on this workload")
        result.append(Case(
            "batched_nms", f"{num_boxes} boxes, clustered, 10 classes, IoU 0.5",
            {"vectorised": lambda args=args: batched_nms(*args)},
            lambda args=args: torchvision.ops.batched_nms(*args)))
    return result
