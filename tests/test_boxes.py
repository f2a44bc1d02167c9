"""Tests for mrcnn_edu.boxes: box_area, box_iou, clipping and BoxCoder equal torchvision's bit for bit;
golden values; round trips; errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from mrcnn_edu.boxes import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes

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


# ---------------------------------------------------------------------------------------------
# clip_boxes_to_image and remove_small_boxes
# ---------------------------------------------------------------------------------------------


def test_clip_boxes_to_image_golden():
    boxes = torch.tensor([
        [10.0, 20, 30, 40],  # inside: unchanged
        [-5, -8, 30, 40],  # sticks out top-left
        [90, 40, 130, 70],  # sticks out right and bottom (image is 60 high, 120 wide)
        [150, 80, 170, 90],  # entirely outside: collapses onto the corner, zero area
    ])
    expected = torch.tensor([[10.0, 20, 30, 40], [0, 0, 30, 40], [90, 40, 120, 60], [120, 60, 120, 60]])
    assert_close(clip_boxes_to_image(boxes, (60, 120)), expected, **EXACT)


@pytest.mark.parametrize("size", [(60, 120), (120, 60), (1, 1)])
@pytest.mark.parametrize("shape", [(50, 4), (2, 25, 4), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64], ids=str)
def test_clip_boxes_to_image_matches_torchvision(size, shape, dtype):
    g = torch.Generator().manual_seed(7)
    boxes = (torch.randn(shape, generator=g) * 80 + 40).to(dtype)
    ours = clip_boxes_to_image(boxes, size)
    assert ours.shape == boxes.shape and ours.dtype == boxes.dtype
    assert_close(ours, torchvision.ops.clip_boxes_to_image(boxes, size), **EXACT)


def test_remove_small_boxes_golden_and_matches_torchvision():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 0.5, 10], [0, 0, 10, 0.999], [5, 5, 6, 6], [3, 3, 2, 9]])
    assert remove_small_boxes(boxes, 1.0).tolist() == [0, 3]  # a side of exactly min_size is kept
    assert remove_small_boxes(boxes, 1e-3).tolist() == [0, 1, 2, 3]  # the inverted box never
    g = torch.Generator().manual_seed(8)
    boxes = float_boxes(200, g, scale=4.0)
    for min_size in [0.0, 1e-3, 0.5, 1.0, 3.0]:
        assert torch.equal(remove_small_boxes(boxes, min_size), torchvision.ops.remove_small_boxes(boxes, min_size))
    assert remove_small_boxes(torch.zeros(0, 4), 1.0).shape == (0,)


# ---------------------------------------------------------------------------------------------
# BoxCoder: golden values, parity with torchvision, round trip
# ---------------------------------------------------------------------------------------------


def test_box_coder_golden():
    anchor = torch.tensor([[0.0, 0, 10, 10]])  # centre (5, 5), 10 x 10
    gt = torch.tensor([[5.0, 5, 15, 25]])  # centre (10, 15), 10 x 20
    # dx = (10 - 5) / 10, dy = (15 - 5) / 10, dw = log(10 / 10), dh = log(20 / 10)
    expected = torch.tensor([[0.5, 1.0, 0.0, math.log(2)]])
    assert_close(BoxCoder().encode(gt, anchor), expected)
    assert_close(BoxCoder().decode(expected, anchor), gt)
    # the box head's weights scale the deltas: (10, 10, 5, 5)
    assert_close(BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt, anchor), expected * torch.tensor([10.0, 10, 5, 5]))
    # zero deltas give back the anchor
    assert_close(BoxCoder().decode(torch.zeros(1, 4), anchor), anchor, **EXACT)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (1 / 3, 0.7, 2.1, 1.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_box_coder_matches_torchvision_bit_for_bit(weights, dtype):
    g = torch.Generator().manual_seed(9)
    gt, anchors = float_boxes(500, g, dtype, scale=300.0) + 1, float_boxes(500, g, dtype, scale=300.0) + 1
    deltas = torch.randn(500, 4, generator=g, dtype=dtype) * 2
    ours, theirs = BoxCoder(weights), TorchvisionBoxCoder(weights)
    assert_close(ours.encode(gt, anchors), theirs.encode_single(gt, anchors), **EXACT)
    assert_close(ours.decode(deltas, anchors), theirs.decode_single(deltas, anchors), **EXACT)
    # huge dw, dh are clipped at log(1000 / 16) before exp, as in torchvision: finite boxes
    deltas[:10, 2:] = 100.0
    decoded = ours.decode(deltas, anchors)
    assert torch.isfinite(decoded).all()
    assert_close(decoded, theirs.decode_single(deltas, anchors), **EXACT)


def test_box_coder_broadcasts_like_torchvision_class_specific_decoding():
    # the box head decodes C class-specific deltas per proposal: torchvision takes (K, C*4) deltas
    # with (K, 4) proposals; we take (K, C, 4) deltas with (K, 1, 4) proposals
    g = torch.Generator().manual_seed(10)
    proposals, deltas = float_boxes(40, g) + 1, torch.randn(40, 3 * 4, generator=g)
    weights = (10.0, 10.0, 5.0, 5.0)
    ours = BoxCoder(weights).decode(deltas.reshape(40, 3, 4), proposals[:, None, :])  # (K, C*4) -> (K, C, 4)
    assert ours.shape == (40, 3, 4)
    assert_close(ours.reshape(40, 12), TorchvisionBoxCoder(weights).decode_single(deltas, proposals), **EXACT)
    # (N, T, 4) deltas of N images with (T, 4) anchors shared by all images
    anchors, deltas = float_boxes(30, g) + 1, torch.randn(2, 30, 4, generator=g)
    assert_close(BoxCoder().decode(deltas, anchors)[1], BoxCoder().decode(deltas[1], anchors), **EXACT)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    g = torch.Generator().manual_seed(11)
    coder = BoxCoder(weights)
    anchors = float_boxes(300, g, torch.float64, scale=200.0) + 1
    # gt boxes at most 50 times larger or smaller than their anchor: below the exp clip
    gt = coder.decode(torch.randn(300, 4, generator=g, dtype=torch.float64), anchors)
    assert_close(coder.decode(coder.encode(gt, anchors), anchors), gt, rtol=0, atol=1e-9)
    deltas = torch.randn(300, 4, generator=g, dtype=torch.float64)
    assert_close(coder.encode(coder.decode(deltas, anchors), anchors), deltas, rtol=0, atol=1e-9)
    gt32, anchors32 = gt.float(), anchors.float()
    assert_close(coder.decode(coder.encode(gt32, anchors32), anchors32), gt32, rtol=0, atol=1e-3)


@pytest.mark.parametrize("call, message", [
    (lambda: BoxCoder((1.0, 1.0, 1.0)), r"weights: expected four positive numbers"),
    (lambda: BoxCoder((1.0, 0.0, 1.0, 1.0)), r"weights: expected four positive numbers"),
    (lambda: BoxCoder().encode(torch.zeros(3, 5), torch.zeros(3, 4)), r"gt_boxes: .* got shape \(3, 5\)"),
    (lambda: BoxCoder().decode(torch.zeros(3, 4), torch.zeros(3, 2)), r"anchors: .* got shape \(3, 2\)"),
    (lambda: clip_boxes_to_image(torch.zeros(3, 3), (10, 10)), r"boxes: .* got shape \(3, 3\)"),
    (lambda: remove_small_boxes(torch.zeros(2, 2, 4), 1.0), r"boxes: .* got shape \(2, 2, 4\)"),
])
def test_box_coder_and_clipping_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
