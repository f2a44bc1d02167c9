"""Tests for mrcnn_edu.nms: kept indices equal torchvision's exactly, on random and adversarial inputs.

Every parity test compares three results: torchvision's, our vectorised ``nms`` and our loop
``nms_reference``. Adversarial inputs: tied scores (more than 16 of them, where a non-stable
sort would reorder them), duplicate boxes, zero-area and inverted boxes, nested boxes, IoUs
exactly at (and one rounding step around) the threshold, thresholds 0 and 1, N = 0 and N = 1,
float64, large coordinates, infinite scores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.ops import boxes as tv_boxes

from mrcnn_edu import nms as nms_module
from mrcnn_edu.nms import (
    BLOCK_SIZE,
    batched_nms,
    batched_nms_coordinate_trick,
    batched_nms_per_class,
    kernel_threshold,
    nms,
    nms_reference,
    soft_nms,
    sort_by_score,
)

BOX_KINDS = ["uniform", "grid", "clustered", "degenerate", "nested", "large"]
SCORE_KINDS = ["distinct", "ties", "equal", "extreme"]
FIXED_THRESHOLDS = [0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 1.0]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_boxes(kind: str, n: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """(n, 4) boxes of one of BOX_KINDS (computed in float64, then cast)."""
    f64 = dict(generator=g, dtype=torch.float64)
    if kind == "uniform":
        xy = torch.rand(n, 2, **f64) * 100
        boxes = torch.cat([xy, xy + torch.rand(n, 2, **f64) * 50], dim=1)
    elif kind == "grid":  # small integers: duplicates, touching boxes, exact IoUs like 3/10
        xy = torch.randint(0, 10, (n, 2), generator=g)
        boxes = torch.cat([xy, xy + torch.randint(1, 8, (n, 2), generator=g)], dim=1).double()
    elif kind == "clustered":
        boxes = clustered_boxes(n, g, per_cluster=20)
    elif kind == "degenerate":  # zero-width, zero-height, points, inverted, repeated boxes
        xy = torch.randint(0, 6, (n, 2), generator=g).double()
        wh = torch.randint(-2, 4, (n, 2), generator=g).double()
        wh[torch.rand(n, generator=g) < 0.4, 0] = 0
        wh[torch.rand(n, generator=g) < 0.4, 1] = 0
        boxes = torch.cat([xy, xy + wh], dim=1)
    elif kind == "nested":  # concentric boxes around a few centres
        centres = torch.randint(0, 40, (3, 2), generator=g).double()
        centres = centres[torch.randint(0, 3, (n,), generator=g)]  # (3, 2) -> (n, 2)
        half = torch.randint(1, 12, (n, 1), generator=g).double() + torch.rand(n, 1, **f64)
        boxes = torch.cat([centres - half, centres + half], dim=1)
    elif kind == "large":  # float32 keeps only 1/16 of a pixel at 1e6
        xy = 1e6 + torch.rand(n, 2, **f64) * 50
        boxes = torch.cat([xy, xy + torch.rand(n, 2, **f64) * 20], dim=1)
    else:
        raise AssertionError(kind)
    return boxes.to(dtype)


def make_scores(kind: str, n: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    if kind == "distinct":
        scores = torch.rand(n, generator=g, dtype=torch.float64)
    elif kind == "ties":
        scores = torch.randint(0, 3, (n,), generator=g).double()
    elif kind == "equal":
        scores = torch.ones(n, dtype=torch.float64)
    elif kind == "extreme":
        choices = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 0.5])
        scores = choices[torch.randint(0, len(choices), (n,), generator=g)].double()
    else:
        raise AssertionError(kind)
    return scores.to(dtype)


def clustered_boxes(n: int, g: torch.Generator, per_cluster: int = 50) -> torch.Tensor:
    """Boxes jittered around n / per_cluster objects: NMS at 0.5 removes most of them."""
    k = max(1, n // per_cluster)
    centre = torch.rand(k, 2, generator=g, dtype=torch.float64) * 800
    size = 32 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 224
    which = torch.randint(0, k, (n,), generator=g)
    c = centre[which] + torch.randn(n, 2, generator=g, dtype=torch.float64) * size[which] * 0.1
    s = size[which] * (1 + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1)
    return torch.cat([c - s / 2, c + s / 2], dim=1)


def boundary_thresholds(boxes: torch.Tensor, g: torch.Generator, count: int = 2) -> list[float]:
    """Thresholds equal to IoUs of the input, and one double below them: decisions on the edge.

    A float32 IoU v against the double just below v must count as "greater"; comparing in
    float32 would round that threshold up to v itself and get it wrong.
    """
    ious = torchvision.ops.box_iou(boxes, boxes).flatten()
    ious = ious[(ious > 0) & (ious < 1)]  # finite, strictly inside (0, 1)
    if ious.numel() == 0:
        return []
    picks = ious[torch.randint(0, ious.numel(), (count,), generator=g)].tolist()
    return [t for v in picks for t in (v, math.nextafter(v, 0.0))]


def assert_all_equal_torchvision(boxes, scores, thresholds):
    for t in thresholds:
        expected = torchvision.ops.nms(boxes, scores, t)
        got, got_reference = nms(boxes, scores, t), nms_reference(boxes, scores, t)
        assert got.dtype == torch.int64 and got_reference.dtype == torch.int64
        assert torch.equal(got, expected), f"nms differs from torchvision at iou_threshold={t!r}"
        assert torch.equal(got_reference, expected), f"nms_reference differs at iou_threshold={t!r}"


# ---------------------------------------------------------------------------------------------
# nms and nms_reference: parity with torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("score_kind", SCORE_KINDS)
@pytest.mark.parametrize("box_kind", BOX_KINDS)
def test_nms_matches_torchvision_on_random_cases(box_kind, score_kind, dtype):
    g = torch.Generator().manual_seed(BOX_KINDS.index(box_kind) * 10 + SCORE_KINDS.index(score_kind))
    for i, n in enumerate([0, 1, 2, 17, 60, 130, 200]):
        boxes = make_boxes(box_kind, n, g, dtype)
        scores = make_scores(score_kind, n, g, dtype)
        # two of the fixed thresholds (all of them over the sizes), a random one, and two pairs
        # on the edge: an IoU of this input, and the double just below it
        thresholds = [FIXED_THRESHOLDS[i % 7], FIXED_THRESHOLDS[(i + 4) % 7],
                      float(torch.rand(1, generator=g))]
        thresholds += boundary_thresholds(boxes, g) if n else []
        assert_all_equal_torchvision(boxes, scores, thresholds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nms_matches_torchvision_on_large_clustered_inputs(dtype):
    # several blocks, and a first block that suppresses most of what follows
    g = torch.Generator().manual_seed(7)
    for n in [BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 1000, 5000]:
        boxes = clustered_boxes(n, g).to(dtype)
        scores = torch.rand(n, generator=g, dtype=dtype)
        assert_all_equal_torchvision(boxes, scores, [0.5] if n == 5000 else [0.5, 0.7])


def test_nms_matches_torchvision_when_few_boxes_are_suppressed():
    # sparse boxes: every block keeps most of its boxes, so the suppression step runs in many
    # chunks (PAIRS_PER_CHUNK // kept boxes) and the loop runs through all blocks
    g = torch.Generator().manual_seed(8)
    n = 1000
    xy = torch.rand(n, 2, generator=g) * 2000
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], dim=1)
    scores = torch.rand(n, generator=g)
    assert_all_equal_torchvision(boxes, scores, [0.5])
    for t in [0.0, 0.3]:
        assert torch.equal(nms(boxes, scores, t), torchvision.ops.nms(boxes, scores, t))
    assert nms(boxes, scores, 0.5).numel() > 0.9 * n


def test_nms_on_a_chain_of_boxes():
    # each box overlaps only its neighbours (IoU 0.6 > 0.5), scores decreasing along the chain:
    # greedy NMS keeps every other box, and inside a block that takes one sweep per link
    n = 3 * BLOCK_SIZE + 5
    x = torch.arange(n, dtype=torch.float32) * 2.5
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1, 0, n)
    assert_all_equal_torchvision(boxes, scores, [0.5])
    assert nms(boxes, scores, 0.5).tolist() == list(range(0, n, 2))


def test_nms_hand_checked_example():
    boxes = torch.tensor([
        [0.0, 0, 10, 10],  # 0: score 0.9, kept
        [1, 1, 11, 11],  # 1: IoU 81/119 = 0.68 with box 0: suppressed
        [20, 20, 30, 30],  # 2: far from everything: kept
        [0, 0, 10, 5],  # 3: IoU 0.5 with box 0: equal to the threshold, not greater: kept
        [21, 21, 29, 29],  # 4: nested in box 2, IoU 64/100: suppressed
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    # box 4 scores best and suppresses box 2; box 0 suppresses box 1
    assert nms(boxes, scores, 0.5).tolist() == [4, 0, 3]
    assert nms_reference(boxes, scores, 0.5).tolist() == [4, 0, 3]
    assert torchvision.ops.nms(boxes, scores, 0.5).tolist() == [4, 0, 3]


def test_iou_of_exactly_three_tenths_depends_on_the_dtype():
    # IoU = 30 / 100 exactly. In float32 it is stored as 0.30000001..., which the C++ kernel finds
    # greater than the double 0.3: suppressed. In float64 it is 0.3 itself: not greater, kept.
    boxes = torch.tensor([[0.0, 15, 5, 27], [2, 16, 9, 26]])
    scores = torch.tensor([2.0, 1.0])
    for dtype, expected in [(torch.float32, [0]), (torch.float64, [0, 1])]:
        b, s = boxes.to(dtype), scores.to(dtype)
        assert torchvision.ops.nms(b, s, 0.3).tolist() == expected
        assert nms(b, s, 0.3).tolist() == expected
        assert nms_reference(b, s, 0.3).tolist() == expected
    # the naive comparison `iou > 0.3` on a float32 tensor rounds 0.3 to float32 first, and
    # would keep both boxes; the double comparison (Python floats are doubles) suppresses
    iou32 = torchvision.ops.box_iou(boxes, boxes)[0, 1]
    assert not (iou32 > 0.3).item() and iou32.item() > 0.3


def test_ties_keep_the_lower_index():
    # 40 identical boxes with equal scores (more than 16: PyTorch's default sort would reorder)
    boxes = torch.tensor([[0.0, 0, 10, 10]]).repeat(40, 1)
    scores = torch.ones(40)
    assert nms(boxes, scores, 0.5).tolist() == [0]
    # disjoint boxes, tied scores: everything kept, ties in index order
    x = torch.arange(40, dtype=torch.float32) * 20
    disjoint = torch.stack([x, x, x + 10, x + 10], dim=1)
    tied = torch.tensor([1.0, 2.0]).repeat(20)
    expected = list(range(1, 40, 2)) + list(range(0, 40, 2))
    assert nms(disjoint, tied, 0.5).tolist() == expected
    assert torchvision.ops.nms(disjoint, tied, 0.5).tolist() == expected


def test_zero_area_boxes_never_suppress_each_other():
    # two identical points: IoU 0 / 0 = nan, and nan > t is False even at threshold 0
    boxes = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 10, 10], [0, 0, 10, 0]])
    scores = torch.tensor([4.0, 3, 2, 1])
    for t in [0.0, 0.5, 1.0]:
        assert nms(boxes, scores, t).tolist() == [0, 1, 2, 3]
        assert nms_reference(boxes, scores, t).tolist() == [0, 1, 2, 3]


def test_thresholds_zero_and_one():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [9, 9, 20, 20], [10, 0, 20, 10]])
    scores = torch.tensor([4.0, 3, 2, 1])
    # 0: any overlap suppresses, touching (IoU 0) does not; 1: even duplicates (IoU 1) survive
    assert nms(boxes, scores, 0.0).tolist() == [0, 3]
    assert nms(boxes, scores, 1.0).tolist() == [0, 1, 2, 3]
    assert_all_equal_torchvision(boxes, scores, [0.0, 1.0, 0, 1])  # ints are fine thresholds


def test_empty_and_single_box():
    for dtype in [torch.float32, torch.float64]:
        for fn in [nms, nms_reference]:
            empty = fn(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), 0.5)
            assert empty.shape == (0,) and empty.dtype == torch.int64
            one = fn(torch.tensor([[0.0, 0, 1, 1]], dtype=dtype), torch.tensor([0.3], dtype=dtype), 0.5)
            assert one.tolist() == [0] and one.dtype == torch.int64


def test_non_contiguous_inputs_and_boxes_that_require_grad():
    g = torch.Generator().manual_seed(9)
    boxes = make_boxes("uniform", 200, g).T.contiguous().T  # column-major
    scores = torch.rand(400, generator=g)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    assert_all_equal_torchvision(boxes, scores, [0.3, 0.5])
    with_grad = boxes.clone().requires_grad_()
    assert torch.equal(nms(with_grad, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nms_matches_torchvision_on_cuda(dtype):
    # Not tested: IoUs within one rounding step of the threshold. torchvision's CUDA kernel
    # is compiled with fused multiply-adds, so such a decision can differ by design there.
    g = torch.Generator().manual_seed(10)
    for box_kind in ["uniform", "grid", "clustered", "nested"]:
        for score_kind in ["distinct", "ties"]:
            boxes = make_boxes(box_kind, 500, g, dtype).cuda()
            scores = make_scores(score_kind, 500, g, dtype).cuda()
            for t in [0.0, 0.3, 0.5, 0.7, 1.0]:
                expected = torchvision.ops.nms(boxes, scores, t)
                assert torch.equal(nms(boxes, scores, t), expected)
                assert torch.equal(nms_reference(boxes, scores, t), expected)
                assert nms(boxes, scores, t).device == boxes.device


# ---------------------------------------------------------------------------------------------
# The building blocks
# ---------------------------------------------------------------------------------------------


def greedy_keep_by_loop(suppresses: torch.Tensor) -> list[bool]:
    keep = []
    for j in range(suppresses.shape[0]):
        keep.append(not any(keep[i] and bool(suppresses[i, j]) for i in range(j)))
    return keep


def test_greedy_keep_matches_a_plain_loop():
    g = torch.Generator().manual_seed(11)
    for size in [1, 2, 5, 30, 64]:
        for density in [0.0, 0.05, 0.3, 0.9]:
            suppresses = (torch.rand(size, size, generator=g) < density).triu(diagonal=1)
            assert nms_module._greedy_keep(suppresses).tolist() == greedy_keep_by_loop(suppresses)
    # a chain: each box suppresses the next one only -> keep every other box
    chain = torch.diag(torch.ones(19, dtype=torch.bool), diagonal=1)
    assert nms_module._greedy_keep(chain).tolist() == [i % 2 == 0 for i in range(20)]


@pytest.mark.parametrize("t", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1 / 3, 0.123456789])
def test_kernel_threshold_decides_like_a_double_comparison(t):
    # every float32 within 50 steps of float32(t), compared as C++ compares: in double precision
    centre = torch.tensor(t, dtype=torch.float32)
    steps = torch.arange(-50, 51, dtype=torch.float32)
    values = centre + steps * (torch.nextafter(centre, torch.tensor(2.0)) - centre)
    values = torch.cat([values, centre[None]])
    cpu = torch.device("cpu")
    expected = values.double() > t
    assert torch.equal(values > kernel_threshold(t, torch.float32, cpu), expected)
    assert torch.equal(values.double() > kernel_threshold(t, torch.float64, cpu), expected)


def test_kernel_threshold_on_cuda_is_the_nearest_float32():
    # torchvision's CUDA kernel takes the threshold as a C++ float (no CUDA needed to check this)
    cuda = torch.device("cuda")
    assert kernel_threshold(0.3, torch.float32, cuda) == float(torch.tensor(0.3))  # 0.30000001...
    assert kernel_threshold(0.3, torch.float64, cuda) == float(torch.tensor(0.3))
    assert kernel_threshold(0.3, torch.float32, torch.device("cpu")) < 0.3 < float(torch.tensor(0.3))


def test_sort_by_score_is_stable():
    scores = torch.tensor([0.5, 1.0, 0.5, 1.0] * 10)  # 40 values, only 2 distinct
    expected = list(range(1, 40, 2)) + list(range(0, 40, 2))
    assert sort_by_score(scores).tolist() == expected


# ---------------------------------------------------------------------------------------------
# batched_nms
# ---------------------------------------------------------------------------------------------


def make_batched_case(n: int, g: torch.Generator, num_classes: int, score_kind: str, dtype=torch.float32):
    box_kind = ["uniform", "grid", "clustered", "nested"][int(torch.randint(0, 4, (1,), generator=g))]
    boxes = make_boxes(box_kind, n, g, dtype)
    scores = make_scores(score_kind, n, g, dtype)
    idxs = torch.randint(0, num_classes, (n,), generator=g)
    return boxes, scores, idxs


@pytest.mark.parametrize("score_kind", ["distinct", "ties"])
@pytest.mark.parametrize("n", [0, 1, 2, 50, 999, 1000, 1001, 2500])
def test_batched_nms_matches_torchvision(n, score_kind):
    # 1000 boxes is the last size that uses the coordinate trick on CPU, 1001 the first that loops
    g = torch.Generator().manual_seed(n)
    for num_classes in [1, 3, 40]:
        boxes, scores, idxs = make_batched_case(n, g, num_classes, score_kind)
        for t in [0.0, 0.3, 0.5, 0.7]:
            expected = torchvision.ops.batched_nms(boxes, scores, idxs, t)
            assert torch.equal(batched_nms(boxes, scores, idxs, t), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_both_batched_nms_paths_match_torchvision_paths(dtype):
    # each of our two paths equals the torchvision path of the same name, at every size
    g = torch.Generator().manual_seed(12)
    for n in [0, 1, 40, 300, 1200]:
        for score_kind in ["distinct", "ties", "equal"]:
            boxes, scores, idxs = make_batched_case(n, g, 5, score_kind, dtype)
            for t in [0.3, 0.5]:
                assert torch.equal(batched_nms_coordinate_trick(boxes, scores, idxs, t),
                                   tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, t))
                assert torch.equal(batched_nms_per_class(boxes, scores, idxs, t),
                                   tv_boxes._batched_nms_vanilla(boxes, scores, idxs, t))


def test_batched_nms_paths_can_disagree_and_we_follow_torchvision():
    # the coordinate trick needs coordinates >= 0: here the shifted class-1 box still overlaps
    # the class-0 box, so the trick suppresses across classes and the per-class loop does not
    boxes = torch.tensor([[-10.0, -10, 0, 0], [-10, -10, 0, 0]])
    scores = torch.tensor([0.9, 0.8])
    idxs = torch.tensor([0, 1])
    assert batched_nms_coordinate_trick(boxes, scores, idxs, 0.5).tolist() == [0]
    assert batched_nms_per_class(boxes, scores, idxs, 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, idxs, 0.5).tolist() == \
        torchvision.ops.batched_nms(boxes, scores, idxs, 0.5).tolist() == [0]
    # tied scores: the per-class path orders kept boxes with PyTorch's default (unstable) sort
    x = torch.arange(40, dtype=torch.float32) * 20
    disjoint = torch.stack([x, x, x + 10, x + 10], dim=1)
    tied, classes = torch.ones(40), torch.arange(40) % 3
    by_trick = batched_nms_coordinate_trick(disjoint, tied, classes, 0.5)
    per_class = batched_nms_per_class(disjoint, tied, classes, 0.5)
    assert by_trick.tolist() == list(range(40))
    assert torch.equal(per_class, tv_boxes._batched_nms_vanilla(disjoint, tied, classes, 0.5))
    assert sorted(per_class.tolist()) == list(range(40))


def test_coordinate_trick_rounding_can_change_a_decision():
    # IoU(A, B) = 100 / 100.04 = 0.9996 < 0.9999: per class, both are kept. Shifted by
    # 2000 * 101 = 202000, float32 has only 1/64 of a pixel left, B's 10.004 becomes 10, and
    # B turns into a copy of A (IoU 1): the trick suppresses it, as torchvision's does.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.004], [90, 90, 100, 100]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([2000, 2000, 0])
    assert batched_nms_per_class(boxes, scores, idxs, 0.9999).tolist() == [0, 1, 2]
    assert batched_nms_coordinate_trick(boxes, scores, idxs, 0.9999).tolist() == [0, 2]
    assert tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, 0.9999).tolist() == [0, 2]
    assert batched_nms(boxes, scores, idxs, 0.9999).tolist() == [0, 2]  # 3 boxes: the trick


def test_batched_nms_is_nms_within_each_class():
    g = torch.Generator().manual_seed(13)
    boxes, scores, idxs = make_batched_case(300, g, 4, "distinct")
    kept = set(batched_nms(boxes, scores, idxs, 0.5).tolist())
    expected = set()
    for c in range(4):
        members = torch.where(idxs == c)[0]
        expected |= set(members[nms(boxes[members], scores[members], 0.5)].tolist())
    assert kept == expected


def test_batched_nms_with_negative_and_large_category_ids():
    g = torch.Generator().manual_seed(14)
    boxes, scores, _ = make_batched_case(400, g, 1, "ties")
    for idxs in [torch.randint(-3, 3, (400,), generator=g), torch.randint(0, 10_000, (400,), generator=g),
                 torch.randint(0, 5, (400,), generator=g).to(torch.int32)]:
        for t in [0.3, 0.5]:
            assert torch.equal(batched_nms(boxes, scores, idxs, t),
                               torchvision.ops.batched_nms(boxes, scores, idxs, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_nms_matches_torchvision_on_cuda():
    g = torch.Generator().manual_seed(15)
    for n in [50, 1500]:
        boxes, scores, idxs = (x.cuda() for x in make_batched_case(n, g, 5, "distinct"))
        assert torch.equal(batched_nms(boxes, scores, idxs, 0.5),
                           torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


# ---------------------------------------------------------------------------------------------
# Soft-NMS: a hand-worked example
# ---------------------------------------------------------------------------------------------

# A = (0, 0, 10, 10), B = its top half, C = A shifted right by 5.
# IoU(A, B) = 50 / 100 = 0.5, IoU(A, C) = 50 / 150 = 1/3, IoU(B, C) = 25 / 125 = 0.2.
SOFT_BOXES = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10]], dtype=torch.float64)
SOFT_SCORES = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)


def test_soft_nms_linear_hand_worked():
    # select A (0.9); B: 0.5 > 0.3 -> 0.8 * (1 - 0.5) = 0.4; C: 1/3 > 0.3 -> 0.7 * 2/3 = 0.4667
    # select C (0.4667); B: IoU 0.2 <= 0.3, unchanged -> select B (0.4). C overtook B.
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, method="linear", iou_threshold=0.3)
    assert keep.tolist() == [0, 2, 1]
    assert_close(scores, torch.tensor([0.9, 0.7 * 2 / 3, 0.4], dtype=torch.float64))
    # plain NMS at the same threshold keeps only A
    assert nms(SOFT_BOXES, SOFT_SCORES, 0.3).tolist() == [0]


def test_soft_nms_gaussian_hand_worked():
    # select A; B: 0.8 * exp(-0.5**2 / 0.5) = 0.4852; C: 0.7 * exp(-(1/3)**2 / 0.5) = 0.5605
    # select C; B: 0.4852 * exp(-0.2**2 / 0.5) = 0.4479 -> select B
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, method="gaussian", sigma=0.5)
    assert keep.tolist() == [0, 2, 1]
    expected = [0.9, 0.7 * math.exp(-2 / 9), 0.8 * math.exp(-0.5) * math.exp(-0.08)]
    assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert_close(scores, torch.tensor([0.9, 0.56052, 0.44792], dtype=torch.float64), rtol=0, atol=1e-5)


def test_soft_nms_score_threshold_drops_boxes():
    # with score_threshold 0.45, B (decayed to 0.4) leaves; C (0.4667) stays
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, method="linear", score_threshold=0.45)
    assert keep.tolist() == [0, 2]
    # a box below the threshold from the start never enters
    keep, _ = soft_nms(SOFT_BOXES, torch.tensor([0.9, 0.8, 0.0001], dtype=torch.float64))
    assert keep.tolist() == [0, 1]


def test_soft_nms_edge_cases():
    # ties go to the lower index; zero-area duplicates (nan IoU) do not decay each other
    boxes = torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10], [1, 1, 1, 1], [1, 1, 1, 1]])
    keep, scores = soft_nms(boxes, torch.tensor([0.5, 0.5, 0.7, 0.7]), method="gaussian")
    assert keep.tolist() == [2, 3, 0, 1]
    assert_close(scores, torch.tensor([0.7, 0.7, 0.5, 0.5]))
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and scores.shape == (0,) and keep.dtype == torch.int64
    # the input scores are not modified
    original = SOFT_SCORES.clone()
    soft_nms(SOFT_BOXES, SOFT_SCORES)
    assert torch.equal(SOFT_SCORES, original)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

B5 = torch.rand(5, 4)
S5 = torch.rand(5)
I5 = torch.zeros(5, dtype=torch.int64)


@pytest.mark.parametrize("fn", [nms, nms_reference, lambda b, s, t: batched_nms(b, s, I5, t),
                                lambda b, s, t: soft_nms(b, s, iou_threshold=t)],
                         ids=["nms", "nms_reference", "batched_nms", "soft_nms"])
@pytest.mark.parametrize("boxes, scores, iou_threshold, message", [
    (torch.rand(5, 3), S5, 0.5, r"boxes: expected a float tensor of shape \(N, 4\).* got shape \(5, 3\)"),
    (torch.rand(20), S5, 0.5, r"boxes: expected a float tensor of shape \(N, 4\).*got shape \(20,\)"),
    ([[0, 0, 1, 1]] * 5, S5, 0.5, r"boxes: expected a float tensor of shape \(N, 4\), got a list"),
    (B5.long(), S5, 0.5, r"boxes: expected a float32 or float64 tensor .* got dtype torch.int64"),
    (B5.half(), S5.half(), 0.5, r"boxes: expected a float32 or float64 tensor .* got dtype torch.float16"),
    (B5, torch.rand(4), 0.5,
     r"scores: expected a tensor of shape \(N,\) = \(5,\), one score per box, got shape \(4,\)"),
    (B5, torch.rand(5, 1), 0.5, r"scores: expected a tensor of shape \(N,\) = \(5,\).* got shape \(5, 1\)"),
    (B5, S5.double(), 0.5,
     r"scores: expected the dtype and device of boxes \(torch.float32, cpu\), got torch.float64"),
    (B5, torch.tensor([0.1, math.nan, 0.3, math.nan, 0.5]), 0.5,
     r"scores: expected no nan, got 2 nan score\(s\), the first at index 1"),
    (B5, S5, 1.5, r"iou_threshold: expected a number in \[0, 1\], got 1.5"),
    (B5, S5, -0.1, r"iou_threshold: expected a number in \[0, 1\], got -0.1"),
    (B5, S5, math.nan, r"iou_threshold: expected a number in \[0, 1\], got nan"),
    (B5, S5, "0.5", r"iou_threshold: expected a number in \[0, 1\], got '0.5'"),
    (B5, S5, None, r"iou_threshold: expected a number in \[0, 1\], got None"),
])
def test_bad_input_raises_a_clear_value_error(fn, boxes, scores, iou_threshold, message):
    with pytest.raises(ValueError, match=message):
        fn(boxes, scores, iou_threshold)


@pytest.mark.parametrize("idxs, message", [
    (torch.zeros(4, dtype=torch.int64),
     r"idxs: expected an integer tensor of shape \(N,\) = \(5,\).* got shape \(4,\)"),
    (torch.zeros(5), r"idxs: expected an integer tensor \(category ids\), got dtype torch.float32"),
    (torch.zeros(5, dtype=torch.bool),
     r"idxs: expected an integer tensor \(category ids\), got dtype torch.bool"),
    ([0, 0, 0, 0, 0], r"idxs: expected an integer tensor of shape \(N,\) = \(5,\).* got a list"),
])
@pytest.mark.parametrize("fn", [batched_nms, batched_nms_coordinate_trick, batched_nms_per_class])
def test_bad_idxs_raise_a_clear_value_error(fn, idxs, message):
    with pytest.raises(ValueError, match=message):
        fn(B5, S5, idxs, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="hard"), r"method: expected one of 'linear', 'gaussian', got 'hard'"),
    (dict(sigma=0.0), r"sigma: expected a number > 0, got 0.0"),
    (dict(score_threshold=-1), r"score_threshold: expected a number >= 0, got -1"),
])
def test_bad_soft_nms_options_raise_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        soft_nms(B5, S5, **kwargs)
