"""Test-suite set-up shared by package tests and notebook runs (nbval).

Environment variables set here at import time are inherited by the Jupyter kernels that nbval
starts, so notebooks run in fast mode and with an empty TORCH_HOME too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

# Nothing may rely on cached downloads: point TORCH_HOME at a fresh, empty folder.
_TORCH_HOME = Path(tempfile.mkdtemp(prefix="mrcnn_edu_torch_home_"))
os.environ["TORCH_HOME"] = str(_TORCH_HOME)
os.environ["MRCNN_EDU_FAST"] = "1"
# No front-end: explorers draw once instead of running ipywidgets.interact (see viz.batch_mode).
os.environ["MRCNN_EDU_BATCH"] = "1"
# Generated data goes to a per-run cache so tests never see a developer's cache (removed at the end).
_OWN_CACHE = None
if "MRCNN_EDU_CACHE" not in os.environ:
    _OWN_CACHE = Path(tempfile.mkdtemp(prefix="mrcnn_edu_cache_"))
    os.environ["MRCNN_EDU_CACHE"] = str(_OWN_CACHE)
# Two cores: keep each process (and each notebook kernel) from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def torch_home() -> Path:
    return _TORCH_HOME


def pytest_sessionfinish(session, exitstatus):
    # Anything that landed in TORCH_HOME was downloaded (or expected to be): make it visible.
    leftovers = [p for p in _TORCH_HOME.rglob("*") if p.is_file()]
    if leftovers:
        print(f"\nERROR: files appeared in TORCH_HOME during the tests: {leftovers[:5]}")
        session.exitstatus = 1
    shutil.rmtree(_TORCH_HOME, ignore_errors=True)
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
