"""Student versions and grading of the course notebooks' exercises (nbgrader-compatible markup).

Used by: ``mrcnn-edu exercises build`` and ``mrcnn-edu exercises grade`` (see ``cli.py``), and
by instructors who prefer nbgrader itself — the markup is nbgrader's (course design §5):

* **Solution cells** — ``metadata.nbgrader = {"schema_version": 3, "solution": true,
  "grade": false, "locked": false, "grade_id": "..."}`` — hold the answer between
  ``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines.
* **Check cells** — ``{"grade": true, "locked": true, "points": n, "solution": false, ...}`` —
  call :mod:`mrcnn_edu.checks`; they may contain ``### BEGIN HIDDEN TESTS`` /
  ``### END HIDDEN TESTS`` blocks that students never see.

The notebooks in ``notebooks/`` are the solution versions. :func:`build_student_notebook`
replaces every solution block by ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (in
markdown: ``YOUR ANSWER HERE``), drops hidden tests and clears outputs. :func:`grade_notebook`
executes a filled-in notebook on a fresh kernel and reports, per check cell, the points earned
and the first lines of its error — the friendly :class:`~mrcnn_edu.checks.ExerciseCheckError`
message, never a traceback.

Mistakes a user can make (a missing file, a file that is not a notebook, broken markup) raise
:class:`UserError` with a one-line message; the CLI prints it as ``mrcnn-edu: error: ...``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrcnn_edu.utils import FAST_ENV_VAR, atomic_write_text

__all__ = [
    "UserError",
    "MarkupError",
    "CellResult",
    "read_notebook",
    "validate_markup",
    "build_student_notebook",
    "build_student_versions",
    "grade_notebook",
    "total_points",
]

CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
TEXT_STUB = ["YOUR ANSWER HERE"]

# `### BEGIN SOLUTION`, `### END HIDDEN TESTS`, ... on a line of their own (any number of #).
from mrcnn_edu.utils import UserError  # noqa: E402  (re-exported: part of this API)

_MARKER = re.compile(r"^(?P<indent>\s*)#+\s*(?P<edge>BEGIN|END) (?P<region>SOLUTION|HIDDEN TESTS)\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ARROW = re.compile(r"^\s*-+>\s*(\d+)\s?(.*)$")  # IPython's "----> 3 assert f(x) == y"

MAX_FEEDBACK_LINES = 12


class MarkupError(UserError):
    """Broken nbgrader markup in a notebook (unmatched BEGIN/END markers, missing grade_id, ...)."""


@dataclass(frozen=True)
class CellResult:
    """What grading found for one cell.

    ``kind`` is ``"check"`` for an auto-graded check cell (``grade: true``), ``"exercise"`` for
    a solution cell that raised (unfinished or broken), ``"cell"`` for any other cell that raised,
    and ``"manual"`` for an answer cell graded by hand (``grade`` and ``solution`` both true).
    """

    grade_id: str
    kind: str
    passed: bool
    points: float
    max_points: float
    feedback: str
    cell_index: int

    @property
    def status(self) -> str:
        if self.kind == "manual":
            return "MANUAL"
        if self.kind == "check":
            return "PASS" if self.passed else "FAIL"
        if self.kind == "exercise" and self.feedback.startswith("not implemented yet"):
            return "TODO"
        return "PASS" if self.passed else "ERROR"


# ---------------------------------------------------------------------------------------------
# reading and validating
# ---------------------------------------------------------------------------------------------


def read_notebook(path: str | os.PathLike) -> Any:
    """Read a v4 notebook, or raise :class:`UserError` saying why ``path`` is not one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such notebook: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a Jupyter notebook")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a Jupyter notebook: it is not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not a Jupyter notebook: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, dict) or "nbformat" not in data or "cells" not in data:
        raise UserError(f"{path} is not a Jupyter notebook: JSON without the 'nbformat' and 'cells' fields")
    if data["nbformat"] != 4:
        raise UserError(
            f"{path} is not a Jupyter notebook in format 4 (it says nbformat {data['nbformat']!r}); "
            "open and save it in a current Jupyter to convert it"
        )
    _add_missing_cell_ids(data)
    import nbformat
    from nbformat.v4.rwbase import rejoin_lines, strip_transient

    nb = strip_transient(rejoin_lines(nbformat.from_dict(data)))  # what nbformat.read does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            nbformat.validate(nb)
        except nbformat.ValidationError as err:
            first = str(getattr(err, "message", err)).strip().splitlines()[0]
            raise UserError(f"{path} is not a Jupyter notebook: {first}") from None
    return nb


def _add_missing_cell_ids(data: dict) -> None:
    """Format 4.5+ requires cell ids; give missing ones deterministic values (not random)."""
    if data.get("nbformat_minor", 0) < 5 or not isinstance(data["cells"], list):
        return
    taken = {c.get("id") for c in data["cells"] if isinstance(c, dict)}
    for i, cell in enumerate(data["cells"]):
        if isinstance(cell, dict) and not cell.get("id"):
            new, k = f"cell-{i}", 0
            while new in taken:
                k += 1
                new = f"cell-{i}-{k}"
            cell["id"] = new
            taken.add(new)


def _nbgrader(cell: Any) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta if isinstance(meta, dict) else {}


def _cell_label(cell: Any, index: int) -> str:
    grade_id = _nbgrader(cell).get("grade_id")
    return f"cell {grade_id!r} (cell #{index})" if grade_id else f"cell #{index}"


def _regions(source: str, where: str) -> list[tuple[str, int, int, str]]:
    """The marked regions of a cell: ``(region, begin_line, end_line, indent)``, 0-based lines.

    Raises :class:`MarkupError` (message prefixed with ``where``) for unmatched or nested markers.
    """
    regions: list[tuple[str, int, int, str]] = []
    open_region: tuple[str, int, str] | None = None
    lines = source.split("\n")
    for i, line in enumerate(lines):
        m = _MARKER.match(line)
        if not m:
            continue
        region, edge = m["region"], m["edge"]
        if edge == "BEGIN":
            if open_region:
                raise MarkupError(
                    f"{where}: '### BEGIN {region}' at line {i + 1} inside the '### BEGIN {open_region[0]}' "
                    f"block opened at line {open_region[1] + 1} (missing '### END {open_region[0]}'?)"
                )
            open_region = (region, i, m["indent"])
        else:
            if not open_region:
                raise MarkupError(f"{where}: '### END {region}' at line {i + 1} has no matching '### BEGIN {region}'")
            if open_region[0] != region:
                raise MarkupError(
                    f"{where}: '### END {region}' at line {i + 1} closes the '### BEGIN {open_region[0]}' "
                    f"block opened at line {open_region[1] + 1}"
                )
            regions.append((region, open_region[1], i, open_region[2]))
            open_region = None
    if open_region:
        raise MarkupError(
            f"{where}: '### BEGIN {open_region[0]}' at line {open_region[1] + 1} has no matching '### END {open_region[0]}'"
        )
    return regions


def validate_markup(nb: Any, name: str = "notebook") -> None:
    """Check the nbgrader markup of ``nb``; raise :class:`MarkupError` naming the problem.

    Checks: markers matched and not nested; solution blocks only in solution cells and hidden
    tests only in check cells; every nbgrader cell has a unique ``grade_id``; every
    auto-graded check cell has a number of ``points``.
    """
    seen: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        meta = _nbgrader(cell)
        where = f"{name}: {_cell_label(cell, index)}"
        if cell.cell_type in ("code", "markdown"):
            regions = _regions(cell.source, where)
            kinds = {r[0] for r in regions}
            if "SOLUTION" in kinds and not meta.get("solution"):
                raise MarkupError(f"{where}: has a '### BEGIN SOLUTION' block but is not a solution cell "
                                  "(metadata.nbgrader.solution is not true)")
            if "HIDDEN TESTS" in kinds and not meta.get("grade"):
                raise MarkupError(f"{where}: has a '### BEGIN HIDDEN TESTS' block but is not a check cell "
                                  "(metadata.nbgrader.grade is not true)")
        if not meta:
            continue
        grade_id = meta.get("grade_id")
        if not (meta.get("solution") or meta.get("grade") or meta.get("task")):
            continue  # e.g. a "read-only" locked cell: needs no id of its own here
        if not grade_id or not isinstance(grade_id, str):
            raise MarkupError(f"{where}: nbgrader cell without a grade_id")
        if grade_id in seen:
            raise MarkupError(f"{where}: grade_id {grade_id!r} is also used by cell #{seen[grade_id]}")
        seen[grade_id] = index
        if meta.get("grade"):
            points = meta.get("points")
            if isinstance(points, bool) or not isinstance(points, (int, float)) or points < 0:
                raise MarkupError(f"{where}: check cell needs a number of points (metadata.nbgrader.points), "
                                  f"got {points!r}")


# ---------------------------------------------------------------------------------------------
# student versions
# ---------------------------------------------------------------------------------------------


def build_student_notebook(nb: Any, name: str = "notebook") -> Any:
    """Return the student version of a solution notebook (``nb`` itself is not changed).

    Solution blocks become ``# YOUR CODE HERE`` + ``raise NotImplementedError()`` at the block's
    indentation (``YOUR ANSWER HERE`` in markdown); a solution cell without markers is replaced
    as a whole (as nbgrader does). Hidden-test blocks are removed. Outputs, execution counts,
    execution timings and widget state are cleared.
    """
    validate_markup(nb, name)
    nb = copy.deepcopy(nb)
    for index, cell in enumerate(nb.cells):
        meta = _nbgrader(cell)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.get("metadata", {}).pop("execution", None)
        if cell.cell_type not in ("code", "markdown"):
            continue
        stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
        regions = _regions(cell.source, f"{name}: {_cell_label(cell, index)}")
        if meta.get("solution") and not any(r[0] == "SOLUTION" for r in regions):
            cell.source = "\n".join(stub)
            continue
        if not regions:
            continue
        lines = cell.source.split("\n")
        out: list[str] = []
        pos = 0
        for region, begin, end, indent in regions:
            out += lines[pos:begin]
            if region == "SOLUTION":
                pad = indent if cell.cell_type == "code" else ""
                out += [pad + s for s in stub]
            pos = end + 1
        out += lines[pos:]
        cell.source = "\n".join(out)
    nb.metadata.pop("widgets", None)
    return nb


def _notebook_text(nb: Any) -> str:
    import nbformat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def build_student_versions(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
    kept: list[Path] | None = None,
) -> list[Path]:
    """Write the student version of every ``*.ipynb`` in ``src_dir`` to ``out_dir``.

    All notebooks are read and checked before anything is written, each file is written
    atomically, and building twice gives byte-identical files. Only notebooks are written.
    A student notebook already in ``out_dir`` that differs from a fresh build (the student has
    worked in it) is kept, not overwritten, unless ``force``; such paths are appended to
    ``kept``. Returns the written paths, sorted by name.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.exists():
        raise UserError(f"no such folder: {src}")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder of notebooks")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is an existing file, not a folder: choose another output folder")
    if out.resolve() == src.resolve():
        raise UserError(f"refusing to write student versions into {src}: that would overwrite the solutions")
    sources = sorted(p for p in src.glob("*.ipynb") if p.is_file() and not p.name.startswith("."))
    if not sources:
        raise UserError(f"{src} has no notebooks (*.ipynb)")
    built = [(out / p.name, _notebook_text(build_student_notebook(read_notebook(p), str(p)))) for p in sources]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in built:
        if not force and path.is_file() and path.read_text(encoding="utf-8") != text:
            if kept is not None:
                kept.append(path)
            continue
        atomic_write_text(path, text)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# grading
# ---------------------------------------------------------------------------------------------


def grade_notebook(
    path: str | os.PathLike,
    timeout: float = 600,
    fast: bool = True,
    *,
    on_start: Callable[[], None] | None = None,
    source: str | os.PathLike | None = None,
) -> list[CellResult]:
    """Execute a (filled-in) notebook on a fresh kernel and grade its check cells.

    The notebook runs from its own folder with every cell executed even after errors
    (``MRCNN_EDU_FAST=1`` when ``fast``, unset otherwise); ``timeout`` is per cell, in seconds.
    The file itself is not modified. A check cell passes iff it produced no error and earns its
    points; otherwise its feedback is the first lines of the error. Solution cells (and other
    cells) that raised are reported too, so a student sees which exercise is unfinished.

    ``on_start`` is called once the notebook has been read and checked, just before the kernel
    starts (the CLI prints its progress line there). Returns the results in notebook order;
    see :class:`CellResult`.

    ``source`` names the instructor's (solution) notebook. Its check cells, hidden tests
    included, then replace the submitted ones by ``grade_id`` — an edited or deleted check cell
    cannot change the grade — and a check missing from the submission fails with 0 points.
    """
    path = Path(path)
    nb = read_notebook(path)
    validate_markup(nb, str(path))
    if not any(_nbgrader(c).get("grade") for c in nb.cells):
        raise UserError(f"{path} has no graded exercises (no cells with nbgrader grade=true)")
    run = copy.deepcopy(nb)
    for cell in run.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    missing = _restore_checks(run, source) if source is not None else []
    if on_start is not None:
        on_start()
    stopped, culprit = _execute(run, path, timeout, fast)

    results: list[CellResult] = []
    last_failure: str | None = None  # the most recent cell that raised, to explain NameErrors
    for index, cell in enumerate(run.cells):
        meta = _nbgrader(cell)
        label = meta.get("grade_id") or f"cell #{index}"
        if meta.get("grade") and meta.get("solution"):
            results.append(CellResult(label, "manual", False, 0.0, float(meta.get("points", 0)),
                                      "graded by hand by the instructor", index))
            continue
        if cell.cell_type != "code":
            continue
        ran = cell.execution_count is not None or not cell.source.strip()
        error = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if index == culprit:
            ran, error = True, {"ename": "Stopped"}
            feedback = f"{stopped} while running this cell"
        elif not ran:
            where = f" in {_cell_label(run.cells[culprit], culprit)}" if culprit is not None else ""
            feedback = f"not run: {stopped}{where}" if stopped else "not run"
        elif error is not None:
            feedback = _feedback(error, timeout)
            if error.get("ename") == "NameError" and last_failure:
                feedback += f"\n(an earlier cell failed: {last_failure} — fix that one first)"
        else:
            feedback = ""
        failed = not ran or error is not None
        if meta.get("grade"):
            points = float(meta.get("points", 0))
            results.append(CellResult(label, "check", not failed, 0.0 if failed else points, points, feedback, index))
        elif failed and ran:
            kind = "exercise" if meta.get("solution") else "cell"
            results.append(CellResult(label, kind, False, 0.0, 0.0, feedback, index))
        if failed and ran:
            last_failure = repr(label) if meta.get("grade_id") else label
    for grade_id, points in missing:
        results.append(CellResult(grade_id, "check", False, 0.0, points,
                                  "this check cell is missing from the submitted notebook", -1))
    return results


def _restore_checks(run: Any, source: str | os.PathLike) -> list[tuple[str, float]]:
    """Put the instructor's check cells (by grade_id) into ``run``; return the missing ones."""
    reference = read_notebook(Path(source))
    checks = {_nbgrader(c)["grade_id"]: c for c in reference.cells
              if _nbgrader(c).get("grade") and not _nbgrader(c).get("solution")}
    present = set()
    for cell in run.cells:
        grade_id = _nbgrader(cell).get("grade_id")
        if grade_id in checks:
            cell.source = checks[grade_id].source
            cell.metadata["nbgrader"] = copy.deepcopy(_nbgrader(checks[grade_id]))
            present.add(grade_id)
    return [(gid, float(_nbgrader(c).get("points", 0))) for gid, c in checks.items() if gid not in present]


def total_points(results: list[CellResult]) -> tuple[float, float]:
    """(points earned, points possible) over the auto-graded check cells."""
    checks = [r for r in results if r.kind == "check"]
    return sum(r.points for r in checks), sum(r.max_points for r in checks)


def _kernel_name(nb: Any) -> str:
    name = nb.metadata.get("kernelspec", {}).get("name") or "python3"
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        if name in KernelSpecManager().find_kernel_specs():
            return name
    except Exception:  # noqa: BLE001 - fall back to the interpreter's own kernel
        pass
    return "python3"


def _execute(nb: Any, path: Path, timeout: float, fast: bool) -> tuple[str | None, int | None]:
    """Run all cells in place.

    Returns ``(None, None)`` if every cell ran, else why execution stopped early and the index
    of the cell that was running then.
    """
    try:
        from jupyter_client.kernelspec import NoSuchKernel
        from nbclient import NotebookClient
        from nbclient.exceptions import CellTimeoutError, DeadKernelError
    except ImportError as err:
        raise UserError(f"grading needs nbclient and ipykernel ({err}); install them with pip install 'mrcnn_edu[dev]'") from None
    env = dict(os.environ)
    env["MRCNN_EDU_BATCH"] = "1"  # no front-end: explorers draw once (mrcnn_edu.viz.batch_mode)
    if fast:
        env[FAST_ENV_VAR] = "1"
    else:
        env.pop(FAST_ENV_VAR, None)
    started: list[int] = []
    finished: set[int] = set()
    client = NotebookClient(
        nb,
        on_cell_start=lambda cell, cell_index: started.append(cell_index),
        on_cell_executed=lambda cell, cell_index, execute_reply: finished.add(cell_index),
        timeout=timeout,
        kernel_name=_kernel_name(nb),
        allow_errors=True,
        interrupt_on_timeout=True,
        resources={"metadata": {"path": str(path.resolve().parent)}},
    )
    # The kernel process's own stdout/stderr (start-up warnings) stay out of the grader's
    # terminal; cell outputs travel over ZMQ as usual.
    try:
        client.execute(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except NoSuchKernel as err:
        raise UserError(f"cannot start a Jupyter kernel for {path}: {err}") from None
    except DeadKernelError:
        stopped = "the Python kernel died (out of memory, or a crash in native code)"
    except CellTimeoutError:
        stopped = f"a cell ran longer than the {timeout:g} s time limit"
    else:
        return None, None
    culprit = started[-1] if started and started[-1] not in finished else None
    return stopped, culprit


def _feedback(error: dict, timeout: float) -> str:
    """The first lines of a cell's error: friendly for checks, ``Name: message`` otherwise."""
    ename, evalue = error.get("ename", "Error"), str(error.get("evalue", "")).strip()
    if ename == "ExerciseCheckError":
        text = evalue
    elif ename == "NotImplementedError" and not evalue:
        text = "not implemented yet — replace `raise NotImplementedError()` with your code"
    elif ename == "KeyboardInterrupt":
        text = f"stopped: the cell ran longer than the time limit ({timeout:g} s per cell)"
    else:
        text = f"{ename}: {evalue}" if evalue else ename
        line = _failing_line(error.get("traceback", []))
        if line:
            text += f"\n(at {line})"
    lines = _ANSI.sub("", text).splitlines() or [ename]
    if len(lines) > MAX_FEEDBACK_LINES:
        lines = lines[:MAX_FEEDBACK_LINES] + ["..."]
    return "\n".join(lines)


def _failing_line(tb: list[str]) -> str | None:
    """The check cell's own line that raised, from IPython's traceback (``----> 3 code``)."""
    for chunk in tb:
        for line in _ANSI.sub("", chunk).splitlines():
            m = _ARROW.match(line)
            if m:
                code = m[2].strip()
                return f"line {m[1]} of the cell: {code if len(code) <= 100 else code[:97] + '...'}"
    return None
