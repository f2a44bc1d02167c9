"""Timing helpers shared by the benchmark scripts (never used by tests' pass/fail).

A benchmark case names one workload and the callables that run it: ours and torchvision's, on
the same inputs, in the same process. We report the median of several repeats after warm-up,
and the ratio ours / torchvision (below 1 means we are faster).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    group: str  # e.g. "nms", "roi_align fwd"
    name: str  # the workload, e.g. "5000 boxes, clustered"
    ours: dict[str, Callable[[], object]]  # label -> zero-argument callable
    reference: Callable[[], object]  # torchvision on the same inputs
    repeats: int = 7


def time_call(fn: Callable[[], object], repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def single_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """Run ``fn`` with one PyTorch thread (torchvision's CPU kernels are single-threaded)."""

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def machine_line() -> str:
    from mrcnn_edu.utils import machine_line as line

    return line(short=True)


def run_cases(cases: list[Case]) -> list[dict]:
    """Time every case; print and return rows with ours / torchvision ratios (Markdown table)."""
    rows = []
    print(f"machine: {machine_line()}\n")
    print("| op | workload | implementation | ours (ms) | torchvision (ms) | ours / torchvision |")
    print("|---|---|---|---:|---:|---:|")
    for case in cases:
        ref = time_call(case.reference, case.repeats)
        for label, fn in case.ours.items():
            t = time_call(fn, case.repeats)
            row = dict(group=case.group, workload=case.name, impl=label, ours_ms=t * 1e3,
                       ref_ms=ref * 1e3, ratio=t / ref)
            rows.append(row)
            print(f"| {case.group} | {case.name} | {label} | {t * 1e3:.2f} | {ref * 1e3:.2f} | "
                  f"{t / ref:.2f}x |", flush=True)
    return rows
