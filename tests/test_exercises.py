"""mrcnn_edu.exercises: student versions and grading, on a tiny two-exercise notebook."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import exercise_notebooks as fx  # noqa: E402

from mrcnn_edu import exercises  # noqa: E402
from mrcnn_edu.exercises import MarkupError, UserError  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A solution notebook in src/, and its student version built into out/."""
    root = tmp_path_factory.mktemp("course")
    src = fx.write(fx.solution_notebook(), root / "src" / "01_tiny.ipynb")
    (root / "src" / "notes.txt").write_text("not a notebook, not copied")
    paths = exercises.build_student_versions(root / "src", root / "out")
    return src, paths


@pytest.fixture(scope="module")
def student_results(built):
    return exercises.grade_notebook(built[1][0], timeout=120)


@pytest.fixture(scope="module")
def solution_results(built):
    return exercises.grade_notebook(built[0], timeout=120)


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------


def test_build_writes_only_notebooks(built):
    src, paths = built
    assert [p.name for p in paths] == ["01_tiny.ipynb"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["01_tiny.ipynb"]


def test_student_version_hides_solutions_and_hidden_tests(built):
    text = built[1][0].read_text(encoding="utf-8")
    for line in fx.SOLUTION_LINES + fx.HIDDEN_LINES:
        assert line not in text, line
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS"):
        assert marker not in text
    nb = nbformat.reads(text, as_version=4)
    add_cell = nb.cells[2].source
    # the stub keeps the indentation of the block, inside the function
    assert add_cell == 'def add(a, b):\n    """Return a + b."""\n    # YOUR CODE HERE\n    raise NotImplementedError()'
    assert nb.cells[4].source.startswith("# YOUR CODE HERE\nraise NotImplementedError()\n")
    assert nb.cells[3].source.startswith("checks.check_function(add")  # visible tests are kept
    assert nb.cells[3].metadata.nbgrader["points"] == 1  # markup kept for nbgrader


def test_student_version_has_no_outputs(built, tmp_path):
    nb = fx.solution_notebook()
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    nb.cells[1].execution_count = 7
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00"}
    student = exercises.build_student_notebook(nb)
    for cell in student.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "execution" not in cell.metadata
    assert nb.cells[1].execution_count == 7  # the input is not modified
    data = json.loads(built[1][0].read_text(encoding="utf-8"))
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in data["cells"] if c["cell_type"] == "code")


def test_build_is_deterministic(built, tmp_path):
    src, paths = built
    again = exercises.build_student_versions(src.parent, tmp_path / "again")
    assert again[0].read_bytes() == paths[0].read_bytes()
    exercises.build_student_versions(src.parent, paths[0].parent)  # rebuild in place
    assert again[0].read_bytes() == paths[0].read_bytes()


def test_markdown_solution_and_whole_cell_solution():
    nb = fx.solution_notebook()
    md = new_markdown_cell("Why?\n### BEGIN SOLUTION\nIt adds the numbers.\n### END SOLUTION",
                           metadata={"nbgrader": {"schema_version": 3, "solution": True, "grade": True,
                                                  "points": 1, "locked": False, "grade_id": "why"}})
    whole = new_code_cell("x = 1", metadata={"nbgrader": {"schema_version": 3, "solution": True, "grade": False,
                                                           "locked": False, "grade_id": "whole"}})
    nb.cells += [md, whole]
    student = exercises.build_student_notebook(nb)
    assert student.cells[-2].source == "Why?\nYOUR ANSWER HERE"
    assert student.cells[-1].source == "# YOUR CODE HERE\nraise NotImplementedError()"


@pytest.mark.parametrize(
    "cell_index, source, problem",
    [
        (2, "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n", "'### BEGIN SOLUTION' at line 2 has no matching '### END SOLUTION'"),
        (2, "def add(a, b):\n    return a + b\n    ### END SOLUTION", "'### END SOLUTION' at line 3 has no matching '### BEGIN SOLUTION'"),
        (3, "### BEGIN HIDDEN TESTS\nassert add(1, 1) == 2\n", "'### BEGIN HIDDEN TESTS' at line 1 has no matching '### END HIDDEN TESTS'"),
        (2, "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "inside the '### BEGIN SOLUTION' block opened at line 1"),
        (1, "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "is not a solution cell"),
    ],
)
def test_broken_markup_is_a_clear_error(tmp_path, cell_index, source, problem):
    nb = fx.solution_notebook()
    nb.cells[cell_index].source = source
    fx.write(nb, tmp_path / "src" / "broken.ipynb")
    with pytest.raises(MarkupError) as info:
        exercises.build_student_versions(tmp_path / "src", tmp_path / "out")
    message = str(info.value)
    assert "broken.ipynb" in message and problem in message
    grade_id = nb.cells[cell_index].metadata.get("nbgrader", {}).get("grade_id")
    if grade_id:
        assert repr(grade_id) in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written when any notebook is broken


def test_duplicate_grade_ids_and_missing_points():
    nb = fx.solution_notebook()
    nb.cells[5].metadata.nbgrader["grade_id"] = "add_check"
    with pytest.raises(MarkupError, match="'add_check' is also used by cell #3"):
        exercises.validate_markup(nb, "dup.ipynb")
    nb = fx.solution_notebook()
    del nb.cells[3].metadata.nbgrader["points"]
    with pytest.raises(MarkupError, match="needs a number of points"):
        exercises.validate_markup(nb, "nopoints.ipynb")


def test_build_user_errors(tmp_path, built):
    src = built[0].parent
    with pytest.raises(UserError, match="no such folder"):
        exercises.build_student_versions(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no notebooks"):
        exercises.build_student_versions(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is an existing file"):
        exercises.build_student_versions(src, tmp_path / "file")
    with pytest.raises(UserError, match="overwrite the solutions"):
        exercises.build_student_versions(src, src)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def test_read_notebook_errors(tmp_path):
    with pytest.raises(UserError, match="no such notebook: "):
        exercises.read_notebook(tmp_path / "nope.ipynb")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes.txt is not a Jupyter notebook: not valid JSON"):
        exercises.read_notebook(tmp_path / "notes.txt")
    (tmp_path / "data.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="is not a Jupyter notebook"):
        exercises.read_notebook(tmp_path / "data.json")
    (tmp_path / "old.ipynb").write_text('{"nbformat": 3, "nbformat_minor": 0, "cells": [], "worksheets": []}')
    with pytest.raises(UserError, match="format 4"):
        exercises.read_notebook(tmp_path / "old.ipynb")
    (tmp_path / "bin.ipynb").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="not UTF-8"):
        exercises.read_notebook(tmp_path / "bin.ipynb")


def test_grade_needs_graded_cells(tmp_path):
    nb = fx.solution_notebook()
    nb.cells = nb.cells[:3]  # no check cells
    path = fx.write(nb, tmp_path / "plain.ipynb")
    with pytest.raises(UserError, match=r"plain.ipynb has no graded exercises \(no cells with nbgrader grade=true\)"):
        exercises.grade_notebook(path)


# ---------------------------------------------------------------------------------------------
# grading (each grade_notebook call runs a kernel: a few seconds)
# ---------------------------------------------------------------------------------------------


def test_grading_the_student_version_fails_every_check(student_results):
    checks_ = [r for r in student_results if r.kind == "check"]
    assert [r.grade_id for r in checks_] == ["add_check", "squares_check"]
    assert all(not r.passed and r.points == 0 and r.status == "FAIL" for r in checks_)
    assert [r.max_points for r in checks_] == [1, 2]
    for r in checks_:
        assert r.feedback and "Traceback" not in r.feedback and "\x1b[" not in r.feedback
    add = checks_[0]
    assert add.feedback.startswith("✘ add: not implemented yet")
    assert "Hint: Use the + operator." in add.feedback
    squares = checks_[1]
    assert "name 'squares' is not defined" in squares.feedback
    assert "'squares_solution'" in squares.feedback  # points at the unfinished exercise
    assert exercises.total_points(student_results) == (0, 3)


def test_grading_reports_unfinished_solution_cells(student_results):
    unfinished = [r for r in student_results if r.kind == "exercise"]
    assert [r.grade_id for r in unfinished] == ["squares_solution"]
    assert unfinished[0].feedback.startswith("not implemented yet")
    assert unfinished[0].status == "TODO"


def test_grading_the_solution_version_passes(solution_results):
    assert [(r.grade_id, r.passed, r.points) for r in solution_results] == [
        ("add_check", True, 1), ("squares_check", True, 2)]
    assert exercises.total_points(solution_results) == (3, 3)


def test_grading_does_not_modify_the_notebook(built, solution_results):
    data = json.loads(built[0].read_text(encoding="utf-8"))
    assert all(not c.get("outputs") for c in data["cells"] if c["cell_type"] == "code")


def test_feedback_for_plain_errors():
    error = {"ename": "AssertionError", "evalue": "",
             "traceback": ["\x1b[0;31m---------\x1b[0m", "Cell \x1b[0;32mIn[3], line 2\x1b[0m\n      1 x = 1\n"
                           "\x1b[0;32m----> 2\x1b[0m \x1b[38;5;28;01massert\x1b[39;00m x \x1b[38;5;241m==\x1b[39m 2\n",
                           "\x1b[0;31mAssertionError\x1b[0m: "]}
    assert exercises._feedback(error, 60) == "AssertionError\n(at line 2 of the cell: assert x == 2)"
    error = {"ename": "ExerciseCheckError", "evalue": "✘ f: wrong\nHint: h", "traceback": ["✘ f: wrong", "Hint: h"]}
    assert exercises._feedback(error, 60) == "✘ f: wrong\nHint: h"
    assert exercises._feedback({"ename": "NotImplementedError", "evalue": ""}, 60).startswith("not implemented yet")



def test_rebuild_keeps_student_work_unless_forced(tmp_path):
    src = fx.write(fx.solution_notebook(), tmp_path / "src" / "01_tiny.ipynb")
    (student,) = exercises.build_student_versions(src.parent, tmp_path / "out")
    fresh = student.read_text()
    worked = fresh.replace("raise NotImplementedError()", "return a + b", 1)
    assert worked != fresh
    student.write_text(worked)
    kept = []
    assert exercises.build_student_versions(src.parent, tmp_path / "out", kept=kept) == []
    assert kept == [student] and student.read_text() == worked, "a rebuild erased the student's work"
    assert exercises.build_student_versions(src.parent, tmp_path / "out", force=True) == [student]
    assert student.read_text() == fresh


def test_grading_with_source_restores_tampered_and_missing_checks(tmp_path):
    src = fx.write(fx.solution_notebook(), tmp_path / "src" / "01_tiny.ipynb")
    (student,) = exercises.build_student_versions(src.parent, tmp_path / "out")
    nb = nbformat.read(student, as_version=4)
    checks = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert len(checks) >= 2
    checks[0].source = "print('ok')"  # a check the student tampered with
    nb.cells.remove(checks[1])  # and one deleted
    nbformat.write(nb, student)
    naive = exercises.grade_notebook(student, timeout=120)
    assert any(r.kind == "check" and r.passed for r in naive), "the tampered check passes without --source"
    results = exercises.grade_notebook(student, timeout=120, source=src)
    graded = [r for r in results if r.kind == "check"]
    assert graded and not any(r.passed for r in graded)
    assert any("missing" in r.feedback for r in graded)
    earned, possible = exercises.total_points(results)
    assert earned == 0 and possible == sum(
        c.metadata["nbgrader"]["points"] for c in nbformat.read(src, as_version=4).cells
        if c.metadata.get("nbgrader", {}).get("grade"))
