"""Tests for mrcnn_edu.boxes: box_area and box_iou equal torchvision's bit for bit; golden values; errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.testing import assert_close

from mrcnn_edu.boxes import box_area, box_iou

EXACT = dict(rtol=0, atol=0, equal_nan=True)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16,
          torch.int64, torch.int32, torch.int16, torch.uint8]


def random_boxes(n: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """(n, 4) boxes on a small integer grid: many duplicates, zero-area and nested boxes."""
    xy = torch.randint(0, 12, (n, 2), generator=generator)
    wh = torch.randint(0, 8, (n, 2), generator=generator)
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def float_boxes(n: int, generator: torch.Generator, dtype=torch.float32, scale=100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale / 2
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


# ---------------------------------------------------------------------------------------------
# Golden values a student can check by hand
# ---------------------------------------------------------------------------------------------


def test_box_area_golden():
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 3, 5, 7], [4, 4, 4, 9], [5, 5, 3, 6]])
    # 10x10, 3x4, a zero-width line, an inverted box (x2 < x1): signed width * height
    assert box_area(boxes).tolist() == [100.0, 12.0, 0.0, -2.0]


def test_box_iou_golden():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([
        [0.0, 0, 10, 10],  # the same box: IoU 1
        [5, 0, 15, 10],  # half of it shifted out: 50 / 150
        [10, 0, 20, 10],  # touching along an edge: IoU 0
        [20, 20, 30, 30],  # far away: IoU 0
        [2, 2, 4, 4],  # nested inside: 4 / 100
        [0, 0, 10, 5],  # the top half: 50 / 100
    ])
    expected = torch.tensor([[1.0, 1 / 3, 0.0, 0.0, 0.04, 0.5]])
    assert_close(box_iou(a, b), expected)
    assert box_iou(a, b).shape == (1, 6)


def test_box_iou_zero_area_boxes():
    point = torch.tensor([[3.0, 3, 3, 3]])
    square = torch.tensor([[0.0, 0, 10, 10]])
    assert box_iou(point, square).item() == 0.0  # 0 / 100
    assert torch.isnan(box_iou(point, point)).item()  # 0 / 0: no union at all
    # a point on another point's position: still 0 / 0
    assert torch.isnan(box_iou(point, torch.tensor([[3.0, 3, 3, 3]]))).item()


def test_box_iou_empty_sets():
    boxes = torch.tensor([[0.0, 0, 1, 1]] * 3)
    assert box_iou(torch.zeros(0, 4), boxes).shape == (0, 3)
    assert box_iou(boxes, torch.zeros(0, 4)).shape == (3, 0)
    assert box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 0)


def test_box_iou_is_symmetric_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    a, b = float_boxes(40, g), float_boxes(30, g)
    assert torch.equal(box_iou(a, b), box_iou(b, a).T)


# ---------------------------------------------------------------------------------------------
# Parity with torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_box_area_matches_torchvision(dtype):
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(50, g, dtype)
    ours, theirs = box_area(boxes), torchvision.ops.box_area(boxes)
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, **EXACT)
    # leading dimensions are kept: (2, 25, 4) -> (2, 25)
    assert_close(box_area(boxes.reshape(2, 25, 4)), theirs.reshape(2, 25), **EXACT)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_box_iou_matches_torchvision_on_grid_boxes(dtype):
    # integer grid: exact duplicates, nested and touching boxes, zero-area boxes (nan IoUs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a, b = random_boxes(60, g, dtype), random_boxes(45, g, dtype)
        ours, theirs = box_iou(a, b), torchvision.ops.box_iou(a, b)
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1e-3, 100.0, 1e6])
def test_box_iou_matches_torchvision_on_float_boxes(dtype, scale):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        a, b = float_boxes(70, g, dtype, scale), float_boxes(50, g, dtype, scale)
        if scale == 1e6:
            a, b = a + 1e6, b + 1e6  # large coordinates: float32 keeps only ~0.1 of precision
        assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), **EXACT)


def test_box_iou_matches_torchvision_on_inverted_and_negative_boxes():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(80, 4, generator=g) * 10  # x2 < x1 about half of the time
    b = torch.randn(60, 4, generator=g) * 10
    assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), **EXACT)


def test_box_iou_accepts_non_contiguous_boxes():
    g = torch.Generator().manual_seed(5)
    a = float_boxes(20, g).T.contiguous().T  # same values, column-major memory
    b = float_boxes(30, g)[::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), **EXACT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_box_iou_matches_torchvision_on_cuda():
    g = torch.Generator().manual_seed(6)
    a, b = float_boxes(100, g).cuda(), float_boxes(80, g).cuda()
    assert_close(box_iou(a, b), torchvision.ops.box_iou(a, b), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: box_area([[0, 0, 1, 1]]), r"boxes: expected a tensor of shape \(\.\.\., 4\), got a list"),
    (lambda: box_area(torch.zeros(5, 3)), r"boxes: expected .*\(\.\.\., 4\).* got shape \(5, 3\)"),
    (lambda: box_area(torch.zeros(())), r"boxes: expected .* got shape \(\)"),
    (lambda: box_area(torch.zeros(2, 4, dtype=torch.bool)),
     r"boxes: expected a float or integer tensor, got dtype torch.bool"),
    (lambda: box_iou(torch.zeros(5, 3), torch.zeros(2, 4)),
     r"boxes1: expected a tensor of shape \(N, 4\).* got shape \(5, 3\)"),
    (lambda: box_iou(torch.zeros(2, 4), torch.zeros(4)),
     r"boxes2: expected a tensor of shape \(M, 4\).* got shape \(4,\)"),
    (lambda: box_iou(torch.zeros(2, 2, 4), torch.zeros(2, 4)), r"boxes1: .* got shape \(2, 2, 4\)"),
    (lambda: box_iou(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)),
     r"boxes2: expected the dtype and device of boxes1 \(torch.float32, cpu\), got torch.float64, cpu"),
])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
