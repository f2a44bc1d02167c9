"""The ``mrcnn-edu`` command line: environment check and the exercise tools.

Sub-commands::

    mrcnn-edu doctor                                          versions, device, paths
    mrcnn-edu exercises build OUT_DIR [--notebooks DIR]       student versions of the notebooks
    mrcnn-edu exercises grade NOTEBOOK [--timeout S] [--full] run a notebook, print a score table

Adding a sub-command: write ``register_<name>(subparsers)`` that adds its parser and sets
``func`` to a ``run_<name>(args) -> int`` function, and append the register function to
:data:`SUBCOMMANDS`. Import heavy modules inside ``run_<name>`` so ``--help`` stays quick.
A ``run_*`` function reports problems the user can fix by raising
:class:`mrcnn_edu.utils.UserError` (``OSError`` is caught too); :func:`main` turns them
into one line ``mrcnn-edu: error: ...`` on stderr and exit code 2 — never a traceback.

Exit codes: 0 success, 1 a graded notebook has failing checks, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import mrcnn_edu
from mrcnn_edu.utils import UserError

PROG = "mrcnn-edu"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _UsageError(UserError):
    """A command line argparse could not parse."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors become one line (no usage dump) via :class:`UserError`."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def register_doctor(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="show versions, device, threads and paths",
        description="Show what the course runs on: versions, device, threads, fast mode and data paths.",
    )
    p.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    from mrcnn_edu.utils import environment_report

    report = environment_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# exercises build / grade
# ---------------------------------------------------------------------------------------------


def register_exercises(subparsers) -> None:
    p = subparsers.add_parser(
        "exercises",
        help="build student notebooks, or grade a filled-in one",
        description="Exercise tools (nbgrader-compatible markup).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions")

    b = actions.add_parser(
        "build",
        help="write student versions of every notebook",
        description="Write student versions of every notebook: solution blocks become "
        "`raise NotImplementedError()`, hidden tests and outputs are removed.",
    )
    b.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the student notebooks to")
    b.add_argument(
        "--notebooks", metavar="DIR", type=Path, default=None,
        help="folder of solution notebooks (default: ./notebooks if it exists, else the course's notebooks/)",
    )
    b.add_argument("--force", action="store_true",
                   help="overwrite student notebooks in OUT_DIR even if they contain work")
    b.set_defaults(func=run_exercises_build)

    g = actions.add_parser(
        "grade",
        help="run a notebook and print a score table",
        description="Execute a filled-in notebook from its own folder and grade its check cells. "
        "Exit code 0 if every check passes, 1 otherwise.",
    )
    g.add_argument("notebook", metavar="NOTEBOOK", type=Path, help="the notebook to grade")
    g.add_argument("--timeout", metavar="S", type=_positive_float, default=600.0,
                   help="time limit per cell in seconds (default: 600)")
    g.add_argument("--full", action="store_true",
                   help="run in full mode (default: fast mode, MRCNN_EDU_FAST=1)")
    g.add_argument("--source", metavar="SOLUTION", type=Path, default=None,
                   help="instructor's notebook whose check cells (with hidden tests) replace the "
                        "submitted ones (default: the course notebook of the same name, if any)")
    g.set_defaults(func=run_exercises_grade)

    p.set_defaults(func=lambda args: _print_help(p))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _default_notebooks_dir(required: bool = True) -> Path | None:
    local = Path("notebooks")
    if local.is_dir():
        return local
    from mrcnn_edu.utils import repo_root

    root = repo_root()
    if root is not None:
        return root / "notebooks"
    if not required:
        return None
    raise UserError("no ./notebooks folder here and no course checkout found: pass --notebooks DIR")


def run_exercises_build(args: argparse.Namespace) -> int:
    from mrcnn_edu.exercises import build_student_versions

    src = args.notebooks if args.notebooks is not None else _default_notebooks_dir()
    kept: list = []
    paths = build_student_versions(src, args.out_dir, force=args.force, kept=kept)
    for path in paths:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept  {path} (it has your work in it; --force overwrites it)")
    print(f"{len(paths)} student notebook{'s' if len(paths) != 1 else ''} built from {src} in {args.out_dir}")
    return EXIT_OK


def run_exercises_grade(args: argparse.Namespace) -> int:
    from mrcnn_edu.exercises import grade_notebook, total_points

    mode = "full mode" if args.full else "fast mode"

    def announce() -> None:
        print(f"grading {args.notebook} ({mode}, time limit {args.timeout:g} s per cell) ...", flush=True)

    source = args.source
    if source is None:  # the course's own solution notebook of the same name, when there is one
        candidate = _default_notebooks_dir(required=False)
        candidate = candidate / Path(args.notebook).name if candidate is not None else None
        if candidate is not None and candidate.is_file() and candidate.resolve() != Path(args.notebook).resolve():
            source = candidate
    if source is not None:
        print(f"check cells are taken from {source}")
    results = grade_notebook(args.notebook, timeout=args.timeout, fast=not args.full, on_start=announce,
                             source=source)
    print()
    print(format_grade_table(results))
    earned, possible = total_points(results)
    checks = [r for r in results if r.kind == "check"]
    passed = sum(r.passed for r in checks)
    manual = [r for r in results if r.kind == "manual"]
    print()
    line = f"total: {earned:g}/{possible:g} points — {passed} of {len(checks)} checks passed"
    if manual:
        line += f" (+ {sum(r.max_points for r in manual):g} points graded by hand)"
    print(line)
    failed = any(r.kind != "manual" and not r.passed for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def format_grade_table(results) -> str:
    """Rows of grade_id, points, PASS/FAIL and feedback; extra feedback lines indented below."""
    rows = []
    for r in results:
        points = f"{r.points:g}/{r.max_points:g}" if r.kind in ("check", "manual") else "-"
        rows.append((r.grade_id, points, r.status, r.feedback.splitlines()))
    header = ("exercise", "points", "result", "feedback")
    w0 = max([len(header[0])] + [len(r[0]) for r in rows])
    w1 = max([len(header[1])] + [len(r[1]) for r in rows])
    w2 = max([len(header[2])] + [len(r[2]) for r in rows])
    out = [f"{header[0]:<{w0}}  {header[1]:>{w1}}  {header[2]:<{w2}}  {header[3]}",
           f"{'-' * w0}  {'-' * w1}  {'-' * w2}  {'-' * 8}"]
    indent = " " * (w0 + w1 + w2 + 6)
    for grade_id, points, status, feedback in rows:
        first = feedback[0] if feedback else ""
        out.append(f"{grade_id:<{w0}}  {points:>{w1}}  {status:<{w2}}  {first}".rstrip())
        out += [indent + line for line in feedback[1:]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the parser and main
# ---------------------------------------------------------------------------------------------

#: One register function per sub-command, in the order ``--help`` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_doctor,
    register_exercises,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Mask R-CNN, stage by stage: tools for the mrcnn_edu course.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {mrcnn_edu.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for register in SUBCOMMANDS:
        register(subparsers)
    parser.set_defaults(func=lambda args: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_OK


def _error(message: str) -> None:
    first = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {first}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    for stream in (sys.stdout, sys.stderr):  # never crash on ✔/✘ in a non-UTF-8 terminal
        if hasattr(stream, "reconfigure") and (getattr(stream, "encoding", "") or "").lower() not in ("utf-8", "utf8"):
            try:
                stream.reconfigure(errors="replace")
            except (ValueError, OSError):
                pass
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    except UserError as err:
        _error(str(err))
        return EXIT_USAGE
    except OSError as err:  # e.g. an output folder without write permission, a full disk
        where = f": {err.filename}" if err.filename else ""
        _error(f"{err.strerror or err}{where}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
