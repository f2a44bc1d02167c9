"""Static checks on the committed notebooks (they are executed separately by nbval).

Committed notebooks must carry no outputs and no execution counts, follow the course template
and use well-formed nbgrader markup, so that `mrcnn-edu exercises build` can make student copies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import NOTEBOOKS

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOK_PATHS]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_course_has_notebooks():
    names = [p.name for p in NOTEBOOK_PATHS]
    assert "00_course_map.ipynb" in names, names
    assert all(re.match(r"^\d\d[a-z]?_[a-z0-9_]+\.ipynb$", n) for n in names), names


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_no_outputs_committed(path: Path):
    nb = _load(path)
    dirty = [
        i for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before "
        f"committing (e.g. `jupyter nbconvert --clear-output --inplace {path.name}`)"
    )


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_cells_have_unique_ids(path: Path):
    """nbformat >= 4.5 wants an id on every cell (a missing one is a warning now, an error later)."""
    nb = _load(path)
    if (nb["nbformat"], nb["nbformat_minor"]) < (4, 5):
        return
    ids = [cell.get("id") for cell in nb["cells"]]
    missing = [i for i, cell_id in enumerate(ids) if not cell_id]
    assert not missing, f"{path.name}: cells {missing} have no id (nbformat.validator.normalize adds them)"
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_kernel_and_no_path_hacks(path: Path):
    nb = _load(path)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    for cell in nb["cells"]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        assert "sys.path" not in src, f"{path.name}: notebooks import the installed package, no sys.path hacks"
        assert "MPLBACKEND" not in src, f"{path.name}: never set MPLBACKEND in a kernel"
        assert "widgets.interact(" not in src and "@interact" not in src, (
            f"{path.name}: use viz.explore (safe headless) instead of ipywidgets.interact")


STAGE_SECTIONS = ["Goals", "Exercise", "Quiz", "Summary"]


@pytest.mark.parametrize("path", [p for p in NOTEBOOK_PATHS if not p.name.startswith("00")],
                         ids=[p.name for p in NOTEBOOK_PATHS if not p.name.startswith("00")])
def test_stage_notebook_follows_template(path: Path):
    nb = _load(path)
    headings = " ".join(
        "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"
    )
    missing = [s for s in STAGE_SECTIONS if s.lower() not in headings.lower()]
    assert not missing, f"{path.name}: template sections missing: {missing}"
    code = " ".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "torchvision" in code, f"{path.name}: every stage is compared with torchvision"
    assert "viz.explore(" in code, f"{path.name}: needs an ipywidgets explorer (viz.explore)"
    assert "pipeline_figure" in code, f"{path.name}: show the pipeline map with this stage highlighted"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=IDS)
def test_nbgrader_markup_is_well_formed(path: Path):
    nb = _load(path)
    ids = []
    for cell in nb["cells"]:
        meta = cell.get("metadata", {}).get("nbgrader")
        src = "".join(cell["source"])
        if meta is None:
            assert "### BEGIN SOLUTION" not in src, f"{path.name}: solution markers in a cell without nbgrader metadata"
            continue
        assert meta.get("schema_version") == 3, f"{path.name}: nbgrader schema_version must be 3"
        assert meta.get("grade_id"), f"{path.name}: nbgrader cell without grade_id"
        ids.append(meta["grade_id"])
        if meta.get("solution"):
            assert src.count("### BEGIN SOLUTION") == src.count("### END SOLUTION") >= 1, (
                f"{path.name}:{meta['grade_id']}: solution cell needs BEGIN/END SOLUTION markers")
        if meta.get("grade"):
            assert meta.get("locked") is True and meta.get("points", 0) > 0, (
                f"{path.name}:{meta['grade_id']}: check cells are locked and worth points")
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate grade_ids {ids}"
    if not path.name.startswith("00"):
        kinds = [c["metadata"]["nbgrader"] for c in nb["cells"] if "nbgrader" in c.get("metadata", {})]
        assert any(k.get("solution") for k in kinds) and any(k.get("grade") for k in kinds), (
            f"{path.name}: a stage notebook needs at least one exercise with a check cell")
