"""Benchmark our ops against torchvision's in one process: `python benchmarks/bench_ops.py`.

Each op family contributes its cases from a module beside this file (``ops_nms.py``,
``ops_roi.py``). Prints a Markdown table with ours / torchvision ratios; copy it into the
README's Performance section together with the machine line.

    python benchmarks/bench_ops.py            # everything
    python benchmarks/bench_ops.py nms        # only groups whose name contains "nms"
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark helpers beside this file

from timing import run_cases  # noqa: E402

FAMILIES = ["ops_nms", "ops_roi"]


def main(argv: list[str]) -> None:
    cases = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(family)
        except ModuleNotFoundError as err:
            if err.name == family:
                continue  # that op family has no benchmark yet
            raise
        cases += module.cases()
    if argv:
        cases = [c for c in cases if any(word in c.group for word in argv)]
    run_cases(cases)


if __name__ == "__main__":
    main(sys.argv[1:])
