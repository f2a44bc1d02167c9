"""The mrcnn-edu command line: help, doctor, exercises build/grade, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import exercise_notebooks as fx  # noqa: E402

import mrcnn_edu  # noqa: E402
from mrcnn_edu.cli import SUBCOMMANDS, main  # noqa: E402

EXE = Path(sys.executable).parent / "mrcnn-edu"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if not EXE.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mrcnn-edu: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# the console script (subprocess)
# ---------------------------------------------------------------------------------------------


def test_help_lists_subcommands():
    proc = run("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for command in ("doctor", "exercises"):
        assert command in proc.stdout


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mrcnn-edu {mrcnn_edu.__version__}"


def test_doctor_prints_torch_and_device():
    proc = run("doctor")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # two aligned columns: every value starts at the same column, after two spaces
    first = lines[0]
    col = len(first) - len(first.split(None, 1)[1])
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in lines), proc.stdout
    rows = {line[:col].strip(): line[col:] for line in lines}
    assert rows["torch"] == torch.__version__
    assert rows["device"].startswith(("cpu", "cuda"))
    assert rows["mrcnn_edu"] == mrcnn_edu.__version__


def test_unknown_subcommand():
    assert_one_line_error(run("train-everything"), "invalid choice", "see mrcnn-edu --help")


def test_unknown_option():
    assert_one_line_error(run("doctor", "--colour"), "unrecognized arguments: --colour")


def test_grade_missing_notebook(tmp_path):
    assert_one_line_error(run("exercises", "grade", str(tmp_path / "nope.ipynb")), "no such notebook")


def test_grade_text_file_and_invalid_json(tmp_path):
    (tmp_path / "notes.txt").write_text("just some notes\n")
    assert_one_line_error(run("exercises", "grade", str(tmp_path / "notes.txt")),
                          "notes.txt is not a Jupyter notebook")
    (tmp_path / "broken.ipynb").write_text('{"cells": [')
    assert_one_line_error(run("exercises", "grade", str(tmp_path / "broken.ipynb")),
                          "broken.ipynb is not a Jupyter notebook: not valid JSON")


def test_grade_notebook_without_exercises(tmp_path):
    nb = fx.solution_notebook()
    nb.cells = nb.cells[:2]
    path = fx.write(nb, tmp_path / "plain.ipynb")
    assert_one_line_error(run("exercises", "grade", str(path)), "has no graded exercises")


def test_grade_prints_table_and_fails(tmp_path):
    fx.write(fx.solution_notebook(), tmp_path / "src" / "01_tiny.ipynb")
    proc = run("exercises", "build", "student", "--notebooks", "src", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote student/01_tiny.ipynb" in proc.stdout

    proc = run("exercises", "grade", "student/01_tiny.ipynb", "--timeout", "120", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout
    assert "fast mode" in out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
            if line.startswith(("add_check", "squares_check", "squares_solution"))}
    assert rows == {"add_check": ["0/1", "FAIL"], "squares_solution": ["-", "TODO"], "squares_check": ["0/2", "FAIL"]}
    assert "✘ add: not implemented yet" in out
    assert "total: 0/3 points" in out


# ---------------------------------------------------------------------------------------------
# main() in-process (quicker)
# ---------------------------------------------------------------------------------------------


def test_main_help_and_version_return_zero(capsys):
    assert main(["--help"]) == 0
    assert "exercises" in capsys.readouterr().out
    assert main([]) == 0  # no command: the help, not an error
    assert "COMMAND" in capsys.readouterr().out
    assert main(["exercises", "build", "--help"]) == 0
    assert "--notebooks" in capsys.readouterr().out


def test_main_usage_errors_are_one_line(capsys):
    assert main(["exercises", "grade"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOTEBOOK" in err and "--help" in err
    assert main(["exercises", "grade", "x.ipynb", "--timeout", "soon"]) == 2
    assert "expected a number of seconds" in capsys.readouterr().err


def test_main_build(tmp_path, capsys):
    fx.write(fx.solution_notebook(), tmp_path / "nbs" / "01_tiny.ipynb")
    assert main(["exercises", "build", str(tmp_path / "out"), "--notebooks", str(tmp_path / "nbs")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "01_tiny.ipynb") in out and "1 student notebook" in out
    assert "raise NotImplementedError()" in (tmp_path / "out" / "01_tiny.ipynb").read_text()


def test_main_build_errors(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "nbs").mkdir()
    assert main(["exercises", "build", str(tmp_path / "out"), "--notebooks", str(tmp_path / "nbs")]) == 2
    assert "has no notebooks" in capsys.readouterr().err
    fx.write(fx.solution_notebook(), tmp_path / "nbs" / "01_tiny.ipynb")
    assert main(["exercises", "build", str(tmp_path / "taken"), "--notebooks", str(tmp_path / "nbs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrcnn-edu: error: ") and "is an existing file" in err and err.count("\n") == 1


def test_subcommands_are_pluggable():
    # later issues add train/evaluate/predict by appending a register function
    assert all(callable(register) for register in SUBCOMMANDS)
    names = [r.__name__ for r in SUBCOMMANDS]
    assert names[:2] == ["register_doctor", "register_exercises"]
    assert all(name.startswith("register_") for name in names) and len(set(names)) == len(names)


def test_file_system_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import mrcnn_edu.exercises as exercises

    def refuse(src, out, **kwargs):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(exercises, "build_student_versions", refuse)
    assert main(["exercises", "build", str(tmp_path / "out"), "--notebooks", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"mrcnn-edu: error: Permission denied: {tmp_path / 'out'}\n"
