"""mrcnn_edu.checks: every kind of failure gives a specific, friendly message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrcnn_edu import checks
from mrcnn_edu.checks import ExerciseCheckError, check_close, check_equal, check_function


def feedback(fn, *args, **kwargs) -> str:
    with pytest.raises(ExerciseCheckError) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------------
# check_close
# ---------------------------------------------------------------------------------------------


def test_success_prints_one_tick_line(capsys):
    x = torch.arange(12.0).reshape(3, 4)
    check_close(x + 1e-7, x, name="features")
    out = capsys.readouterr().out
    assert out.startswith("✔ features:") and out.count("\n") == 1
    assert "(3, 4)" in out


def test_success_shows_numpy_scalars_as_plain_numbers(capsys):
    check_close(np.float64(0.8), 0.8, name="fill", atol=1e-6)
    assert capsys.readouterr().out.strip() == "✔ fill: 0.8 is correct"


def test_wrong_type():
    text = feedback(check_close, [1.0, 2.0], torch.tensor([1.0, 2.0]), name="boxes")
    assert text.startswith("✘ boxes:")
    assert "expected a torch.Tensor, got list" in text
    assert "expected a numpy.ndarray, got torch.Tensor" in feedback(
        check_close, torch.zeros(2), np.zeros(2), name="a")


def test_shape_mismatch():
    text = feedback(check_close, torch.zeros(1, 256, 16, 16), torch.zeros(1, 256, 32, 32), name="p2")
    assert "expected shape (1, 256, 32, 32), got (1, 256, 16, 16)" in text


def test_shape_mismatch_suggests_permute():
    text = feedback(check_close, torch.zeros(2, 4, 3), torch.zeros(2, 3, 4), name="x")
    assert "permute" in text


def test_dtype_kind_mismatch():
    text = feedback(check_close, torch.zeros(3, dtype=torch.int64), torch.zeros(3), name="scores")
    assert "expected a floating-point tensor (torch.float32), got an integer tensor (torch.int64)" in text


def test_float_precision_alone_is_not_a_mismatch(capsys):
    check_close(torch.ones(3, dtype=torch.float64), torch.ones(3), name="x")
    assert "✔ x" in capsys.readouterr().out


def test_value_mismatch_details_and_hint():
    expected = torch.arange(12.0).reshape(3, 4)
    got = expected.clone()
    got[1, 2] += 0.5
    got[2, 3] -= 2.0
    text = feedback(check_close, got, expected, name="deltas", hint="Check the sign of dy.")
    assert text.startswith("✘ deltas: values differ: 2 of 12 elements are not close")
    assert "max abs difference: 2 at index [2, 3]" in text
    assert "first difference at index [1, 2]: expected 6.0, got 6.5" in text
    assert text.splitlines()[-1] == "Hint: Check the sign of dy."


def test_tolerances_are_respected(capsys):
    check_close(torch.tensor([1.0]), torch.tensor([1.05]), name="loose", rtol=0.1)
    assert "✔ loose" in capsys.readouterr().out
    feedback(check_close, torch.tensor([1.0]), torch.tensor([1.05]), name="tight")


def test_nan_reported():
    got = torch.ones(2, 3)
    got[1, 2] = float("nan")
    text = feedback(check_close, got, torch.ones(2, 3), name="iou")
    assert "NaN" in text and "[1, 2]" in text


def test_nan_matches_nan(capsys):
    x = torch.tensor([1.0, float("nan")])
    check_close(x.clone(), x, name="x")
    assert "✔" in capsys.readouterr().out


def test_numpy_arrays_and_numbers():
    text = feedback(check_close, np.array([1.0, 2.0]), np.array([1.0, 3.0]), name="arr")
    assert "first difference at index [1]: expected 3.0, got 2.0" in text
    text = feedback(check_close, 0.52, 0.5, name="loss")
    assert "expected 0.5, got 0.52" in text
    assert "expected a number" in feedback(check_close, "0.5", 0.5, name="loss")


def test_zero_dim_tensor_counts_as_number(capsys):
    check_close(torch.tensor(0.5), 0.5, name="loss")
    assert "✔ loss" in capsys.readouterr().out


def test_dict_keys_and_path():
    got = {"p2": torch.zeros(1, 4, 8, 8), "p7": torch.zeros(1)}
    expected = {"p2": torch.zeros(1, 4, 16, 16), "p3": torch.zeros(1, 4, 8, 8)}
    text = feedback(check_close, got, expected, name="features")
    assert "missing key: 'p3'" in text
    assert "unexpected extra key: 'p7'" in text
    assert "at ['p2']: expected shape (1, 4, 16, 16), got (1, 4, 8, 8)" in text
    assert "expected a dict, got list" in feedback(check_close, [1], {"a": 1}, name="d")


def test_nested_sequences_name_the_position():
    text = feedback(check_close, [torch.zeros(2), (1.0, torch.ones(3))],
                    [torch.zeros(2), (1.0, torch.zeros(3))], name="outputs")
    assert "at [1][1]: values differ" in text
    assert "expected a list of 2 items, got 1 items" in feedback(check_close, [1.0], [1.0, 2.0], name="l")


def test_many_problems_are_capped():
    got = {f"k{i}": 0.0 for i in range(8)}
    text = feedback(check_close, got, {k: 1.0 for k in got}, name="many")
    assert "8 problems" in text and "... and 3 more" in text


# ---------------------------------------------------------------------------------------------
# check_equal
# ---------------------------------------------------------------------------------------------


def test_check_equal_success(capsys):
    check_equal({"p2": (1, 256, 32, 32)}, {"p2": torch.Size([1, 256, 32, 32])}, name="shapes")
    check_equal(torch.tensor([True, False]), torch.tensor([True, False]), name="keep")
    check_equal("cat", "cat", name="label")
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["✔ shapes", "✔ keep", "✔ label"]


def test_check_equal_shapes_dict():
    text = feedback(check_equal, {"p2": (1, 256, 16, 16)}, {"p2": (1, 256, 32, 32)}, name="shapes")
    assert "at ['p2']: expected (1, 256, 32, 32), got (1, 256, 16, 16)" in text


def test_check_equal_ints_strings_and_types():
    assert "expected 5, got 4" in feedback(check_equal, 4, 5, name="n")
    assert "expected an int (3), got float 3.0" in feedback(check_equal, 3.0, 3, name="n")
    assert ".item()" in feedback(check_equal, torch.tensor(3), 3, name="n")
    assert "expected 'cat', got 'dog'" in feedback(check_equal, "dog", "cat", name="label")
    assert "expected None, got int" in feedback(check_equal, 1, None, name="nothing")


def test_check_equal_tensors():
    text = feedback(check_equal, torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 3]), name="labels")
    assert "expected dtype torch.int64, got torch.int32" in text
    text = feedback(check_equal, torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]), name="keep")
    assert "values differ: 2 of 3 elements are not equal" in text
    assert "first difference at index [1]: expected 1, got 2" in text
    text = feedback(check_equal, torch.tensor([True, True]), torch.tensor([True, False]), name="mask")
    assert "first difference at index [1]: expected False, got True" in text


def test_check_equal_is_exact_for_floats():
    text = feedback(check_equal, torch.tensor([1.0 + 1e-6]), torch.tensor([1.0]), name="x")
    assert "not equal" in text


# ---------------------------------------------------------------------------------------------
# check_function
# ---------------------------------------------------------------------------------------------


def reference_merge(top, lateral):
    return torch.nn.functional.interpolate(top, size=lateral.shape[-2:], mode="nearest") + lateral


CASES = [
    (torch.rand(1, 4, 4, 4), torch.rand(1, 4, 8, 8)),
    {"top": torch.rand(2, 4, 3, 5), "lateral": torch.rand(2, 4, 6, 10)},
]


def test_check_function_success(capsys):
    check_function(reference_merge, reference_merge, CASES, name="top_down_merge")
    assert capsys.readouterr().out.strip() == "✔ top_down_merge: all 2 cases match the reference"


def test_check_function_not_implemented():
    def student(top, lateral):
        # YOUR CODE HERE
        raise NotImplementedError()

    text = feedback(check_function, student, reference_merge, CASES, name="top_down_merge", hint="Use F.interpolate.")
    assert text.startswith("✘ top_down_merge: not implemented yet — replace `raise NotImplementedError()` with your code")
    assert "Hint: Use F.interpolate." in text


def test_check_function_exception_is_named_with_case():
    def student(top, lateral):
        return top + lateral  # shapes do not broadcast

    text = feedback(check_function, student, reference_merge, CASES, name="top_down_merge")
    assert "raised RuntimeError on case 1 of 2" in text
    assert "must match the size" in text  # torch's own message
    assert "top=Tensor[1, 4, 4, 4] float32" in text and "lateral=Tensor[1, 4, 8, 8]" in text
    assert "return top + lateral" in text  # the line that raised


def test_check_function_wrong_result_names_case():
    def student(top, lateral):
        return torch.nn.functional.interpolate(top, size=lateral.shape[-2:], mode="bilinear") + lateral

    text = feedback(check_function, student, reference_merge, CASES, name="merge")
    assert text.startswith("✘ merge: wrong result for case 1 of 2: values differ:")
    assert "max abs difference" in text
    assert "  inputs: top=Tensor[1, 4, 4, 4] float32, lateral=Tensor[1, 4, 8, 8] float32" in text.splitlines()


def test_check_function_shape_problem():
    def student(top, lateral):
        return top

    text = feedback(check_function, student, reference_merge, CASES, name="merge")
    assert "expected shape (1, 4, 8, 8), got (1, 4, 4, 4)" in text


def test_check_function_never_mutates_inputs(capsys):
    x = torch.ones(3)
    originals = [x.clone()]

    def in_place_student(t):
        return t.mul_(2)

    def in_place_reference(t):
        return t.mul_(2)

    check_function(in_place_student, in_place_reference, [(x,), (x,)], name="double")
    assert torch.equal(x, originals[0])
    assert "all 2 cases" in capsys.readouterr().out


def test_check_function_single_argument_cases_and_not_callable():
    check_function(lambda n: n * 2, lambda n: n * 2, [3, 4.5], name="double")
    assert "expected a function, got int" in feedback(check_function, 3, abs, [(1,)], name="abs")


def test_torch_not_implemented_errors_are_not_mistaken_for_stubs():
    def student(x):
        raise NotImplementedError("Could not run 'aten::foo' with arguments from the 'Meta' backend")

    text = feedback(check_function, student, abs, [(1,)], name="f")
    assert "raised NotImplementedError" in text and "aten::foo" in text


# ---------------------------------------------------------------------------------------------
# in Jupyter
# ---------------------------------------------------------------------------------------------


def test_render_traceback_is_just_the_feedback():
    with pytest.raises(ExerciseCheckError) as info:
        check_close(torch.zeros(2), torch.ones(2), name="x", hint="h")
    lines = info.value._render_traceback_()
    assert lines[0].startswith("✘ x:") and lines[-1] == "Hint: h"
    assert not any("Traceback" in line for line in lines)
    assert isinstance(info.value, AssertionError)  # graders count it as a failed test


def test_module_exports():
    assert set(checks.__all__) == {"ExerciseCheckError", "check_close", "check_equal", "check_function"}


def test_integer_results_are_compared_exactly():
    import math

    with pytest.raises(checks.ExerciseCheckError, match=r"expected \(2, 3\), got \(2.0, 3.0\)"):
        checks.check_function(lambda h, w: (h / 4, w / 4), lambda h, w: (math.ceil(h / 4), math.ceil(w / 4)),
                              [(8, 12)], name="shape")
    checks.check_function(lambda h, w: (h // 4, w // 4), lambda h, w: (math.ceil(h / 4), math.ceil(w / 4)),
                          [(8, 12)], name="shape")
