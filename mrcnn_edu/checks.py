"""Friendly feedback for the exercise check cells of the course notebooks.

Used in: every stage notebook's *Exercises* section (course design §5), right after each
exercise cell. A check compares the student's result with the package's reference and either
prints one line starting with ``✔`` or raises :class:`ExerciseCheckError`, whose message says
exactly what is wrong (wrong type, shape, dtype, missing dict key, which values differ and by
how much, NaNs, an exception raised by the student's function) followed by a hint.

In Jupyter, :class:`ExerciseCheckError` shows only that message, not a traceback (IPython's
``_render_traceback_`` protocol), yet the cell still fails, so nbgrader and
``mrcnn-edu exercises grade`` count the check as failed.

A typical check cell::

    from mrcnn_edu import backbone, checks

    checks.check_function(
        top_down_merge, backbone.top_down_merge,
        cases=[(top, lateral), {"top": top2, "lateral": lateral2}],
        name="top_down_merge",
        hint="Upsample `top` with F.interpolate(mode='nearest') to the lateral's H, W, then add.",
    )
    checks.check_equal(my_shapes, {"p2": (1, 256, 64, 64)}, name="FPN shapes")

Shape shorthand: the comparisons work on tensors of any shape; indices in messages are
written like Python indexing, ``[n, c, y, x]``.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sysconfig
import traceback
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Any

import numpy as np
import torch

__all__ = ["ExerciseCheckError", "check_close", "check_equal", "check_function"]

#: At most this many problems are listed in one message (the rest are counted).
MAX_PROBLEMS = 5

NOT_IMPLEMENTED = "not implemented yet — replace `raise NotImplementedError()` with your code"


class ExerciseCheckError(AssertionError):
    """A failed exercise check. ``str(error)`` is the complete, human-readable feedback.

    Subclasses ``AssertionError`` so graders (nbgrader, pytest) count it as a failed test.
    """

    def __init__(self, feedback: str):
        super().__init__(feedback)
        self.feedback = feedback

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: just the feedback lines."""
        return self.feedback.splitlines()


# ---------------------------------------------------------------------------------------------
# public checks
# ---------------------------------------------------------------------------------------------


def check_close(
    got: Any,
    expected: Any,
    name: str,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    hint: str | None = None,
) -> None:
    """Check that ``got`` equals ``expected`` up to floating-point tolerance.

    Works on tensors, numpy arrays, numbers, lists/tuples and dicts (recursively; problems name
    the key path, e.g. ``at ['p2']``). Floats match when ``|got - expected| <= atol + rtol *
    |expected|``; integer and bool tensors must match exactly; NaN matches NaN. Tensors of
    different floating precision (float32 vs float64) are compared by value; a different dtype
    *kind* (integer vs floating-point) is reported.

    Prints ``✔ <name>: ...`` on success, raises :class:`ExerciseCheckError` otherwise.
    """
    problems: list[tuple[str, str]] = []
    _compare(got, expected, "", False, rtol, atol, problems)
    if problems:
        raise ExerciseCheckError(_message(name, problems, hint))
    print(f"✔ {name}: {_success_summary(got, expected, exact=False)}")


def check_equal(got: Any, expected: Any, name: str, hint: str | None = None) -> None:
    """Check that ``got`` equals ``expected`` exactly (ints, strings, tuples, dicts, tensors).

    Tensors must have the same shape, the same dtype and equal values. Lists and tuples are
    interchangeable (a shape may be given as either); dicts are compared key by key.

    Prints ``✔ <name>: ...`` on success, raises :class:`ExerciseCheckError` otherwise.
    """
    problems: list[tuple[str, str]] = []
    _compare(got, expected, "", True, 0.0, 0.0, problems)
    if problems:
        raise ExerciseCheckError(_message(name, problems, hint))
    print(f"✔ {name}: {_success_summary(got, expected, exact=True)}")


def check_function(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    cases: Sequence[Any],
    name: str | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    hint: str | None = None,
) -> None:
    """Call the student's ``fn`` and the ``reference`` on every case and compare the results.

    Args:
        fn: the student's function.
        reference: the package's implementation (the expected behaviour).
        cases: each case is a ``tuple`` of positional arguments or a ``dict`` of keyword
            arguments; any other value is passed as the single positional argument.
        name: what the messages call the function (default: the reference's ``__name__``).
        rtol, atol: tolerances for :func:`check_close`.
        hint: printed after any failure.

    Both functions get fresh clones of the inputs on every call, so neither can change the
    cases (or the other's inputs) in place. Stops at the first failing case: an unfinished
    function (``raise NotImplementedError()``), an exception (named, with its message, the
    case number and the line that raised it) or a result that differs from the reference.
    """
    name = name or getattr(reference, "__name__", "your function")
    if not callable(fn):
        raise ExerciseCheckError(
            _message(name, [("", f"expected a function, got {_type_name(fn)}")], hint)
        )
    cases = list(cases)
    if not cases:
        raise ValueError("check_function needs at least one case")
    n = len(cases)
    for i, case in enumerate(cases, 1):
        args, kwargs = _split_case(case)
        expected = reference(*_clone(args), **_clone(kwargs))
        try:
            got = fn(*_clone(args), **_clone(kwargs))
        except NotImplementedError as err:
            if not str(err):  # the exercise stub, not an operator missing inside torch
                raise ExerciseCheckError(_message(name, [("", NOT_IMPLEMENTED)], hint)) from None
            raise _function_raised(name, err, i, n, reference, args, kwargs, hint) from err
        except Exception as err:  # noqa: BLE001 - any error in student code becomes feedback
            raise _function_raised(name, err, i, n, reference, args, kwargs, hint) from err
        problems: list[tuple[str, str]] = []
        # integer results (counts, shapes, indices) must match exactly, not within a tolerance
        _compare(got, expected, "", _is_integral(expected), rtol, atol, problems)
        if problems:
            inputs = _describe_case(reference, args, kwargs)
            raise ExerciseCheckError(_message(name, problems, hint, context=f"wrong result for case {i} of {n}",
                                              notes=[f"inputs: {inputs}"] if inputs else []))
    print(f"✔ {name}: all {n} cases match the reference" if n != 1 else f"✔ {name}: the case matches the reference")


def _is_integral(x: Any) -> bool:
    """True for ints, integer/bool tensors and (nested) tuples/lists/dicts of only those."""
    if isinstance(x, (bool, int)):
        return True
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() and not x.is_complex()
    if isinstance(x, (tuple, list)) and x:
        return all(_is_integral(v) for v in x)
    if isinstance(x, dict) and x:
        return all(_is_integral(v) for v in x.values())
    return False


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------


def _message(
    name: str,
    problems: list[tuple[str, str]],
    hint: str | None,
    context: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """``✘ name: [context: ]problem`` (or a list of problems), indented notes, then the hint."""
    texts = [f"at {path}: {text}" if path else text for path, text in problems]
    prefix = f"✘ {name}: " + (f"{context}: " if context else "")
    if len(texts) == 1:
        first, *rest = (prefix + texts[0]).splitlines()
        lines = [first] + [f"  {line.strip()}" for line in rest]
    else:
        lines = [f"{prefix}{len(texts)} problems:"]
        for text in texts[:MAX_PROBLEMS]:
            first, *rest = text.splitlines()
            lines.append(f"  - {first}")
            lines += [f"    {line.strip()}" for line in rest]
        if len(texts) > MAX_PROBLEMS:
            lines.append(f"  ... and {len(texts) - MAX_PROBLEMS} more")
    lines += [f"  {note}" for note in notes]
    if hint:
        lines.append(f"Hint: {hint}")
    return "\n".join(lines)


def _function_raised(name, err, i, n, reference, args, kwargs, hint) -> ExerciseCheckError:
    text = f"your function raised {type(err).__name__} on case {i} of {n}"
    msg = str(err).strip()
    if msg:
        first, *rest = msg.splitlines()
        text += f": {first}" + (" ..." if rest else "")
    notes = []
    inputs = _describe_case(reference, args, kwargs)
    if inputs:
        notes.append(f"inputs: {inputs}")
    where = _where(err)
    if where:
        notes.append(f"raised at {where}")
    return ExerciseCheckError(_message(name, [("", text)], hint, notes=notes))


def _where(err: BaseException) -> str | None:
    """The line of the student's code that raised (skipping torch/numpy/stdlib frames)."""
    frames = traceback.extract_tb(err.__traceback__)[1:]  # [0] is check_function itself
    if not frames:
        return None
    paths = sysconfig.get_paths()
    lib_dirs = tuple({paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths})
    own = [f for f in frames if not f.filename.startswith(lib_dirs)]
    frame = own[-1] if own else frames[-1]
    code = (frame.line or "").strip()
    return f"line {frame.lineno} in {frame.name}()" + (f": {code}" if code else "")


def _describe_case(reference: Callable, args: tuple, kwargs: dict) -> str:
    """``top=Tensor[1, 256, 8, 8] float32, lateral=...`` — what a case passes in."""
    try:
        bound = inspect.signature(reference).bind(*args, **kwargs)
        items = list(bound.arguments.items())
    except (TypeError, ValueError):
        items = [(f"arg{j}", a) for j, a in enumerate(args)] + list(kwargs.items())
    text = ", ".join(f"{k}={_short(v)}" for k, v in items)
    return text if len(text) <= 300 else text[:297] + "..."


def _short(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, np.ndarray):
        return f"ndarray{list(x.shape)} {x.dtype}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)) and any(isinstance(v, (torch.Tensor, np.ndarray)) for v in x):
        inner = ", ".join(_short(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    text = repr(x)
    return text if len(text) <= 60 else f"{_type_name(x)} of length {len(x)}" if hasattr(x, "__len__") else text[:57] + "..."


def _type_name(x: Any) -> str:
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return "torch.Tensor"
    if isinstance(x, np.ndarray):
        return "numpy.ndarray"
    t = type(x)
    if t.__module__ in ("builtins", "__main__"):
        return t.__name__
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def _fmt_index(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return repr(v) if len(repr(v)) <= 10 else f"{v:.6g}"
    if isinstance(v, complex):
        return f"{v:.6g}"
    return str(v)


def _fmt_seq(x: Sequence) -> str:
    return repr(tuple(x)) if isinstance(x, tuple) else repr(list(x))


def _success_summary(got: Any, expected: Any, exact: bool) -> str:
    if isinstance(expected, (torch.Tensor, np.ndarray)):
        shape = tuple(expected.shape)
        if not exact and _as_tensor(expected).is_floating_point() and _as_tensor(expected).numel():
            g, e = _as_tensor(got).detach().cpu().double(), _as_tensor(expected).detach().cpu().double()
            finite = torch.isfinite(g) & torch.isfinite(e)
            maxd = (g - e)[finite].abs().max().item() if finite.any() else 0.0
            return f"shape {shape} and values match (max abs difference {maxd:.2g})"
        return f"shape {shape} and values match"
    if isinstance(expected, Mapping):
        return f"all {len(expected)} entries match" if len(expected) != 1 else "the entry matches"
    if isinstance(expected, (list, tuple)) and not _is_flat_exact_seq(expected):
        return f"all {len(expected)} items match" if len(expected) != 1 else "the item matches"
    text = repr(got.item() if isinstance(got, np.generic) else got)  # 0.8, not np.float64(0.8)
    return f"{text if len(text) <= 80 else text[:77] + '...'} is correct"


# ---------------------------------------------------------------------------------------------
# comparison: appends (path, problem) pairs
# ---------------------------------------------------------------------------------------------


def _compare(got, expected, path: str, exact: bool, rtol: float, atol: float, problems: list) -> None:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            advice = {
                np.ndarray: " (convert it with torch.from_numpy(...))",
                list: " (build a tensor with torch.tensor(...) or torch.stack(...))",
                tuple: " (build a tensor with torch.tensor(...) or torch.stack(...))",
            }.get(type(got), "")
            problems.append((path, f"expected a torch.Tensor, got {_type_name(got)}{advice}"))
            return
        _compare_arrays(got, expected, path, exact, rtol, atol, problems)
    elif isinstance(expected, np.ndarray):
        if not isinstance(got, np.ndarray):
            advice = " (convert it with .numpy())" if isinstance(got, torch.Tensor) else ""
            problems.append((path, f"expected a numpy.ndarray, got {_type_name(got)}{advice}"))
            return
        _compare_arrays(got, expected, path, exact, rtol, atol, problems)
    elif isinstance(expected, (bool, np.bool_)):
        if not isinstance(got, (bool, np.bool_)):
            problems.append((path, f"expected a bool ({expected}), got {_type_name(got)}{_item_advice(got)}"))
        elif bool(got) != bool(expected):
            problems.append((path, f"expected {bool(expected)}, got {bool(got)}"))
    elif isinstance(expected, numbers.Number):
        _compare_numbers(got, expected, path, exact, rtol, atol, problems)
    elif isinstance(expected, Mapping):
        _compare_mappings(got, expected, path, exact, rtol, atol, problems)
    elif isinstance(expected, (list, tuple)):
        _compare_sequences(got, expected, path, exact, rtol, atol, problems)
    elif expected is None:
        if got is not None:
            problems.append((path, f"expected None, got {_type_name(got)}"))
    elif isinstance(expected, str):
        if not isinstance(got, str):
            problems.append((path, f"expected a string ({expected!r}), got {_type_name(got)}"))
        elif got != expected:
            problems.append((path, f"expected {expected!r}, got {got!r}"))
    elif isinstance(expected, Set):
        if not isinstance(got, Set):
            problems.append((path, f"expected a set, got {_type_name(got)}"))
        elif got != expected:
            parts = []
            if expected - got:
                parts.append(f"missing {sorted(expected - got, key=repr)}")
            if got - expected:
                parts.append(f"unexpected {sorted(got - expected, key=repr)}")
            problems.append((path, "sets differ: " + ", ".join(parts)))
    else:
        try:
            same = bool(got == expected)
        except Exception:  # noqa: BLE001 - objects whose == is not a bool
            same = False
        if not same:
            problems.append((path, f"expected {expected!r}, got {got!r}"))


def _item_advice(got: Any) -> str:
    if isinstance(got, (torch.Tensor, np.ndarray)) and getattr(got, "ndim", None) == 0:
        return " (call .item() to turn a one-element tensor into a Python number)"
    return ""


def _compare_numbers(got, expected, path, exact, rtol, atol, problems) -> None:
    value = got
    if not exact and isinstance(got, (torch.Tensor, np.ndarray)) and got.ndim == 0:
        value = got.item()  # a 0-d tensor is an acceptable "number" for a tolerance check
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Number):
        problems.append((path, f"expected a number ({_fmt_value(expected)}), got {_type_name(got)}{_item_advice(got)}"))
        return
    if exact:
        if isinstance(expected, numbers.Integral) and not isinstance(value, numbers.Integral):
            problems.append((path, f"expected an int ({expected}), got {_type_name(value)} {_fmt_value(value)}"))
        elif value != expected:
            problems.append((path, f"expected {_fmt_value(expected)}, got {_fmt_value(value)}"))
        return
    if isinstance(expected, complex) or isinstance(value, complex):
        e, g = complex(expected), complex(value)
        nan_e, nan_g = math.isnan(abs(e)), math.isnan(abs(g))
    else:
        e, g = float(expected), float(value)
        nan_e, nan_g = math.isnan(e), math.isnan(g)
    if nan_e and nan_g:
        return
    if nan_g:
        problems.append((path, f"got NaN, expected {_fmt_value(expected)}"))
        return
    if g == e:
        return
    diff = abs(g - e)
    tol = atol + rtol * abs(e)
    if not diff <= tol:
        problems.append(
            (path, f"expected {_fmt_value(expected)}, got {_fmt_value(value)} "
                   f"(difference {diff:.3g}, tolerance {tol:.3g})")
        )


def _compare_mappings(got, expected, path, exact, rtol, atol, problems) -> None:
    if not isinstance(got, Mapping):
        problems.append((path, f"expected a dict, got {_type_name(got)}"))
        return
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing:
        problems.append((path, f"missing key{'s' if len(missing) > 1 else ''}: {', '.join(map(repr, missing))}"))
    if extra:
        problems.append((path, f"unexpected extra key{'s' if len(extra) > 1 else ''}: {', '.join(map(repr, extra))}"))
    for key in expected:
        if key in got:
            _compare(got[key], expected[key], f"{path}[{key!r}]", exact, rtol, atol, problems)


def _is_flat_exact_seq(x: Sequence) -> bool:
    """A short sequence of ints/strings/bools (like a shape), best shown whole."""
    return len(x) <= 12 and all(
        isinstance(v, (numbers.Integral, str, np.bool_)) and not isinstance(v, torch.Tensor) for v in x
    )


def _compare_sequences(got, expected, path, exact, rtol, atol, problems) -> None:
    kind = "tuple" if isinstance(expected, tuple) else "list"
    if not isinstance(got, (list, tuple)):
        problems.append((path, f"expected a {kind}, got {_type_name(got)}"))
        return
    if _is_flat_exact_seq(expected):
        inner: list = []
        if len(got) == len(expected):
            for j, (g, e) in enumerate(zip(got, expected)):
                _compare(g, e, f"[{j}]", exact, rtol, atol, inner)
        if len(got) != len(expected) or inner:
            text = f"expected {_fmt_seq(expected)}, got {_fmt_seq(got)}"
            if len(got) != len(expected):
                text += f" ({len(expected)} items expected, got {len(got)})"
            elif len(inner) == 1:
                text += f" (differs at {inner[0][0]}: {inner[0][1]})"
            problems.append((path, text))
        return
    if len(got) != len(expected):
        problems.append((path, f"expected a {kind} of {len(expected)} items, got {len(got)} items"))
        return
    for j, (g, e) in enumerate(zip(got, expected)):
        _compare(g, e, f"{path}[{j}]", exact, rtol, atol, problems)


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_floating_point():
        return "floating-point"
    if t.is_complex():
        return "complex"
    return "integer"


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.ascontiguousarray(x))


def _shape_advice(got: tuple, expected: tuple) -> str:
    if sorted(got) == sorted(expected):
        return " — the same sizes in a different order: a missing or wrong permute/transpose?"
    if math.prod(got) == math.prod(expected):
        return " — the same number of elements: check your view/reshape"
    if len(got) == len(expected) + 1 and 1 in got and tuple(s for s in got if s != 1) == tuple(s for s in expected if s != 1):
        return " — an extra dimension of size 1 (squeeze it?)"
    if len(got) + 1 == len(expected) and 1 in expected and tuple(s for s in got if s != 1) == tuple(s for s in expected if s != 1):
        return " — a dimension of size 1 is missing (unsqueeze?)"
    return ""


def _compare_arrays(got, expected, path, exact, rtol, atol, problems) -> None:
    gshape, eshape = tuple(got.shape), tuple(expected.shape)
    if gshape != eshape:
        problems.append((path, f"expected shape {eshape}, got {gshape}{_shape_advice(gshape, eshape)}"))
        return
    try:
        g, e = _as_tensor(got).detach().cpu(), _as_tensor(expected).detach().cpu()
    except (TypeError, RuntimeError, ValueError):  # e.g. numpy arrays of strings/objects
        if not np.array_equal(np.asarray(got), np.asarray(expected)):
            problems.append((path, "values differ"))
        return
    gname, ename = str(got.dtype), str(expected.dtype)
    gkind, ekind = _dtype_kind(g), _dtype_kind(e)
    if exact and g.dtype != e.dtype:
        problems.append((path, f"expected dtype {ename}, got {gname}"))
        return
    if gkind != ekind:
        problems.append((path, f"expected a{'n' if ekind[0] == 'i' else ''} {ekind} tensor ({ename}), "
                               f"got a{'n' if gkind[0] == 'i' else ''} {gkind} tensor ({gname})"))
        return
    if e.numel() == 0:
        return
    if ekind in ("bool", "integer"):
        mismatch = g != e
        diff = (g.long() - e.long()).abs().double() if ekind == "integer" else None
        exact_cmp = True
    else:
        if ekind == "complex":
            gd, ed = g.to(torch.complex128), e.to(torch.complex128)
        else:
            gd, ed = g.double(), e.double()
        nan_g, nan_e = torch.isnan(gd), torch.isnan(ed)
        bad_nan = nan_g & ~nan_e
        if bad_nan.any():
            first = tuple(np.unravel_index(int(bad_nan.flatten().nonzero()[0]), eshape)) if eshape else ()
            where = f"first at index {_fmt_index(first)}" if eshape else "(the value itself)"
            problems.append((path, f"got {int(bad_nan.sum())} NaN value{'s' if int(bad_nan.sum()) > 1 else ''} "
                                   f"where numbers were expected, {where} — look for 0/0, log(0) or sqrt of a negative"))
            return
        diff = (gd - ed).abs()
        if exact:
            mismatch = ~((gd == ed) | (nan_g & nan_e))
        else:
            tol = atol + rtol * ed.abs()
            mismatch = ~((diff <= tol) | (gd == ed) | (nan_g & nan_e))
        exact_cmp = exact
    if not mismatch.any():
        return
    count, total = int(mismatch.sum()), e.numel()
    flat = mismatch.flatten()
    first_flat = int(flat.nonzero()[0])
    first = tuple(np.unravel_index(first_flat, eshape)) if eshape else ()
    ev, gv = e.flatten()[first_flat].item(), g.flatten()[first_flat].item()
    rule = "not equal" if exact_cmp else f"not close (rtol={rtol:g}, atol={atol:g})"
    lines = [f"values differ: {count} of {total} element{'s' if total != 1 else ''} {'is' if count == 1 else 'are'} {rule}"]
    if diff is not None:
        d = diff.flatten().clone()
        d[~flat | ~torch.isfinite(d)] = -1
        if d.max() >= 0:
            k = int(d.argmax())
            at = f" at index {_fmt_index(np.unravel_index(k, eshape))}" if eshape else ""
            lines.append(f"max abs difference: {d[k].item():.4g}{at}")
    if eshape:
        lines.append(f"first difference at index {_fmt_index(first)}: expected {_fmt_value(ev)}, got {_fmt_value(gv)}")
    else:
        lines.append(f"expected {_fmt_value(ev)}, got {_fmt_value(gv)}")
    problems.append((path, "\n".join(lines)))


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


def _split_case(case: Any) -> tuple[tuple, dict]:
    if isinstance(case, tuple):
        return case, {}
    if isinstance(case, Mapping):
        return (), dict(case)
    return (case,), {}


def _clone(x: Any) -> Any:
    """A copy of the inputs: tensors and arrays cloned (keeping requires_grad), containers rebuilt."""
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(True) if x.requires_grad and y.is_floating_point() else y
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, tuple):
        items = [_clone(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)  # namedtuples too
    return x
