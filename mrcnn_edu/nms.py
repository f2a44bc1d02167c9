"""Non-maximum suppression (NMS): keep the best box of each group of overlapping boxes.

Taught in: ``notebooks/03_nms.ipynb``.

Shape shorthand used in this module:
    N  boxes given to NMS (with one score each)
    K  boxes kept
    R  boxes still in play: not yet kept, not yet suppressed
    B  boxes in one block of the vectorised :func:`nms` (at most ``BLOCK_SIZE``)
    B' boxes of a block that NMS keeps

Greedy NMS, the algorithm every detector uses: sort the boxes by score, best first; keep the
best box; *suppress* (throw away) every lower-scored box whose IoU with it is greater than
``iou_threshold``; repeat with the best box that is left. A box can only be suppressed by a box
that is itself kept.

Two versions of it live here, both returning exactly what ``torchvision.ops.nms`` returns:

* :func:`nms_reference` -- the algorithm as written above, one kept box per loop iteration
  (the classic ``py_cpu_nms`` of Fast R-CNN). Read this one first.
* :func:`nms` -- the same result, computed block by block with few, large tensor operations,
  so that it keeps up with torchvision's compiled C++ loop. The model uses this one.

Built on them: :func:`batched_nms`, NMS within each class (or image) in one call, equal to
``torchvision.ops.batched_nms``; and :func:`soft_nms`, an extension that lowers scores instead
of removing boxes.

"Exactly" is meant literally: the tests compare kept indices with torchvision's over thousands
of random and adversarial inputs. Three details of torchvision's CPU kernel
(``torchvision/csrc/ops/cpu/nms_kernel.cpp``) decide the edge cases, and we copy all three:

1. **Ties in score** go to the lower index: the boxes are sorted with a *stable* sort
   (torchvision's kernels switched to one in 2021, pytorch/vision#4767; before, tied boxes
   came out in an order that depended on the platform). See :func:`sort_by_score`.
2. **Strictly greater**: a box is suppressed when IoU > ``iou_threshold``; IoU equal to the
   threshold survives. A ``nan`` IoU (two zero-area boxes: ``0 / 0``) never suppresses.
3. **The comparison is made in double precision**: the C++ code compares a float32 IoU with the
   threshold as a C++ ``double``. An IoU of exactly 3/10 is stored in float32 as
   0.30000001192..., which *is* greater than the double 0.3: at ``iou_threshold=0.3`` the
   lower-scored box of such a pair is suppressed in float32, and kept in float64 (where 3/10
   is the double 0.3 itself). See :func:`kernel_threshold`.

Speed notes. The vectorised :func:`nms` works on blocks of ``BLOCK_SIZE`` boxes and IoU
matrices of at most ``PAIRS_PER_CHUNK`` pairs, sizes that stay in the CPU cache. Where ``x[i]``
and ``x[mask]`` would read more naturally, the code uses ``x.index_select(0, i)`` and
``x.masked_select(mask)``: they select the same elements, but PyTorch's ``x[i]`` splits the work
across threads from 3,000 elements on, and on a busy 2-core machine, where the second thread is
often not free, waiting for it made :func:`nms_reference` on 5,000 boxes 30 times slower.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mrcnn_edu.boxes import box_iou

BLOCK_SIZE = 128
"""Boxes handled together per step of the vectorised :func:`nms` (measured fastest on CPU)."""

PAIRS_PER_CHUNK = 32_000
"""The vectorised :func:`nms` compares a block's kept boxes with the boxes after the block in
chunks of at most this many pairs. A small IoU matrix (128 KB in float32) stays in the CPU
cache and is several times faster per pair than one (B', 20000) matrix; and staying below
32,768 elements, where PyTorch starts splitting an operation across threads, keeps the
timing steady on a busy 2-core machine, where waiting for a second thread costs more than it
saves."""

PER_CLASS_LOOP_ABOVE = {"cpu": 1_000, "other": 25_000}
""":func:`batched_nms` loops over classes when there are more boxes than this (per device type),
and uses the coordinate trick otherwise -- torchvision's rule (``boxes.numel() > 4000`` on CPU,
``> 100_000`` elsewhere), which we follow so that results are identical."""

SOFT_NMS_METHODS = ("linear", "gaussian")
"""How :func:`soft_nms` lowers the score of a box that overlaps a kept box."""


# ----------------------------------------------------------------------------------------------
# Building blocks shared by every version
# ----------------------------------------------------------------------------------------------


def sort_by_score(scores: Tensor) -> Tensor:
    """Order of the boxes by decreasing score: ``Int64[N]`` indices, best box first.

    The sort is *stable*: boxes with equal scores keep their input order, so ties go to the
    lower index, as in torchvision's kernels (``scores.sort(stable=True, descending=True)``).
    PyTorch's default sort is not stable: beyond 16 elements on CPU, equal values come out in
    an order that depends on the sorting algorithm -- and NMS on tied scores would then keep
    different boxes on different machines.
    """
    return torch.sort(scores, dim=0, descending=True, stable=True).indices


def kernel_threshold(iou_threshold: float, dtype: torch.dtype, device: torch.device) -> float:
    """The threshold ``t`` for which ``iou > t`` decides exactly as torchvision's kernel does.

    ``iou > iou_threshold`` in PyTorch compares in the IoU's dtype: for a float32 IoU the
    threshold is first rounded to float32. torchvision's kernels compare differently:

    * CPU: ``ovr > iou_threshold`` in C++, with ``ovr`` a float and the threshold a ``double``,
      so C++ compares in double precision. For float32 IoUs we get the same answers by comparing
      with the largest float32 that is <= the threshold: a float32 IoU is greater than that
      number exactly when it is greater than the double threshold (there is no float32 in
      between). Converting every IoU to float64 would give the same answer, more slowly.
    * CUDA (and any other device): the kernel receives the threshold as a C++ ``float``:
      rounded to nearest float32, then compared with the IoU in the IoU's precision.

    Example: ``kernel_threshold(0.3, torch.float32, cpu)`` is 0.29999998..., because
    float32(0.3) = 0.30000001... lies above 0.3 and must count as "greater".
    """
    if device.type == "cpu" and dtype == torch.float64:
        return float(iou_threshold)
    as_float32 = torch.tensor(iou_threshold, dtype=torch.float32)  # rounded to nearest
    if device.type == "cpu" and float(as_float32) > iou_threshold:
        # step one float32 down, to the largest float32 below the threshold
        as_float32 = torch.nextafter(as_float32, torch.tensor(-math.inf))
    return float(as_float32)


# ----------------------------------------------------------------------------------------------
# NMS: the loop (teaching reference) and the vectorised version (used by the model)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()  # indices carry no gradient: record no graph even if boxes require grad
def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, one kept box per iteration: the readable reference for :func:`nms`.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``, float32 or float64.
        scores (Tensor[N]): one score per box, same dtype as ``boxes``, no ``nan``.
        iou_threshold (float): in ``[0, 1]``; a box whose IoU with a kept, higher-scored box is
            *greater* than this is suppressed.

    Returns:
        Tensor[K]: int64 indices of the kept boxes, by decreasing score: the same tensor as
        ``torchvision.ops.nms(boxes, scores, iou_threshold)``.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    threshold = kernel_threshold(iou_threshold, boxes.dtype, boxes.device)
    in_play = sort_by_score(scores)  # (R,) indices of the boxes still in play, best first
    keep = []
    while in_play.numel() > 0:
        best, in_play = in_play[0], in_play[1:]
        keep.append(best)
        # IoU of the best box with every box still in play: (1, 4) vs (R, 4) -> (1, R) -> (R,)
        ious = box_iou(boxes[best][None], boxes.index_select(0, in_play))[0]
        # keep in play what is NOT above the threshold (`ious <= t` would wrongly drop nan IoUs)
        in_play = in_play.masked_select(~(ious > threshold))
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return torch.stack(keep)


@torch.no_grad()  # indices carry no gradient: record no graph even if boxes require grad
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, vectorised: the same result as :func:`nms_reference`, much faster.

    :func:`nms_reference` runs one Python iteration, and a dozen small tensor operations, per
    kept box. Here the boxes in play are taken ``BLOCK_SIZE`` at a time, best first:

    1. *Inside the block*: compute the block's IoU matrix once, turn it into a boolean matrix
       ``suppresses[i, j]`` = "box i ranks above box j and overlaps it above the threshold",
       and work out which boxes greedy NMS keeps (:func:`_greedy_keep`).
    2. *After the block*: the boxes the block keeps suppress, all at once, every lower-scored
       box still in play that they overlap above the threshold.

    As in torchvision's C++ loop, a box is only ever compared with kept boxes, but in large
    tensor operations instead of one pair at a time. On clustered boxes, where NMS removes
    most of them, the first blocks suppress nearly everything and the loop ends after a few
    steps. Memory stays small: a (B, B) matrix and IoU chunks of ``PAIRS_PER_CHUNK`` pairs,
    never an (N, N) matrix.

    Args and returns: as :func:`nms_reference` (and ``torchvision.ops.nms``).
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    threshold = kernel_threshold(iou_threshold, boxes.dtype, boxes.device)
    # rank_i < rank_j inside a block: (B, 1) < (1, B) -> (B, B), True above the diagonal
    rank = torch.arange(BLOCK_SIZE, device=boxes.device)
    ranks_above = rank[:, None] < rank[None, :]
    in_play = sort_by_score(scores)  # (R,) indices of the boxes still in play, best first
    in_play_boxes = boxes.index_select(0, in_play)  # (R, 4), in the same order
    keep = []
    while in_play.numel() > 0:
        block = in_play_boxes[:BLOCK_SIZE]  # (B, 4): the B best boxes in play
        b = block.shape[0]
        # 1. greedy NMS inside the block
        suppresses = (box_iou(block, block) > threshold) & ranks_above[:b, :b]  # (B, B)
        keep_in_block = _greedy_keep(suppresses)  # (B,) bool
        keep.append(in_play[:BLOCK_SIZE][keep_in_block])
        # 2. the block's kept boxes (B') suppress the boxes after the block (R'), a chunk at a
        #    time: IoU (B', chunk) -> any over the kept boxes -> (chunk,)
        rest, rest_boxes = in_play[BLOCK_SIZE:], in_play_boxes[BLOCK_SIZE:]
        if rest.numel() == 0:
            break
        kept_boxes = block[keep_in_block]
        chunk_size = PAIRS_PER_CHUNK // kept_boxes.shape[0]  # box 0 of a block is always kept
        suppressed = torch.cat([(box_iou(kept_boxes, chunk) > threshold).any(dim=0)
                                for chunk in rest_boxes.split(chunk_size)])
        survivors = torch.where(~suppressed)[0]  # positions in `rest`
        in_play, in_play_boxes = rest.index_select(0, survivors), rest_boxes.index_select(0, survivors)
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return torch.cat(keep)


def _greedy_keep(suppresses: Tensor) -> Tensor:
    """Which boxes greedy NMS keeps, given who would suppress whom.

    Args:
        suppresses (Tensor[B, B]): bool, ``suppresses[i, j]`` is True when box ``i`` ranks
            above box ``j`` (``i < j``) and their IoU is above the threshold.

    Returns:
        Tensor[B]: bool, True for the boxes greedy NMS keeps: a box is kept exactly when no
        *kept* box suppresses it.

    That rule refers to itself, but only through higher-ranked boxes: box 0 is always kept,
    and the fate of box j depends only on boxes 0..j-1. So we start by keeping everything
    and apply the rule to all boxes at once, again and again: each sweep settles at least one
    more box from the top, and once a sweep changes nothing every box is settled. Usually a
    handful of sweeps suffice; a chain of boxes each overlapping the next needs one per link,
    and B sweeps always suffice.
    """
    keep = torch.ones(suppresses.shape[0], dtype=torch.bool, device=suppresses.device)
    for _ in range(suppresses.shape[0]):
        # box j is suppressed if some kept box i suppresses it: (B, B) -> (B,)
        suppressed = (suppresses & keep[:, None]).any(dim=0)
        if torch.equal(~suppressed, keep):
            break
        keep = ~suppressed
    return keep


# ----------------------------------------------------------------------------------------------
# Batched NMS: NMS within each class
# ----------------------------------------------------------------------------------------------


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category: boxes of different ``idxs`` never suppress each other.

    Detectors run NMS per class (a person box must not remove the bicycle box it overlaps)
    and per image. Both are "categories" here: ``idxs`` holds one category id per box.

    There are two ways to do it, and torchvision picks by size; so do we, because the two
    can differ (in the order of tied scores, and in float rounding), and we want identical
    results:

    * few boxes (at most ``PER_CLASS_LOOP_ABOVE`` per device type; 1,000 on CPU):
      :func:`batched_nms_coordinate_trick`, one NMS call on shifted boxes;
    * more boxes: :func:`batched_nms_per_class`, one NMS call per category.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``, float32 or float64.
        scores (Tensor[N]): one score per box, same dtype as ``boxes``, no ``nan``.
        idxs (Tensor[N]): integer category of each box.
        iou_threshold (float): in ``[0, 1]``, as for :func:`nms`.

    Returns:
        Tensor[K]: int64 indices of the kept boxes, by decreasing score: the same tensor as
        ``torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)``.
    """
    _check_batched_nms_inputs(boxes, scores, idxs, iou_threshold)
    limit = PER_CLASS_LOOP_ABOVE["cpu" if boxes.device.type == "cpu" else "other"]
    if boxes.shape[0] > limit:
        return batched_nms_per_class(boxes, scores, idxs, iou_threshold)
    return batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


def batched_nms_coordinate_trick(boxes: Tensor, scores: Tensor, idxs: Tensor,
                                 iou_threshold: float) -> Tensor:
    """Batched NMS with one call to :func:`nms`: move each category to its own part of the plane.

    Shift every box of category ``c`` by ``c * (max_coordinate + 1)`` along both axes. If all
    coordinates lie in ``[0, max_coordinate]`` -- true for boxes clipped to an image -- the
    shifted categories occupy disjoint squares, boxes of different categories no longer
    overlap (IoU 0), and a single NMS over all boxes is NMS within each category. Shifting
    does not change a box's size, so IoUs within a category stay the same, up to float
    rounding: a large shift leaves fewer bits for the fractional part of a coordinate.

    Caveats, inherited from the trick (and from torchvision, whose results we reproduce):
    with negative coordinates the squares can overlap, so categories can suppress each other;
    with many categories and float32 coordinates, the rounding can change a decision at the
    threshold.

    Args and returns: as :func:`batched_nms`.
    """
    _check_batched_nms_inputs(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes.dtype) * (boxes.max() + 1)  # (N,): one shift per box
    # (N, 4) + (N, 1): the same shift for x1, y1, x2 and y2
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def batched_nms_per_class(boxes: Tensor, scores: Tensor, idxs: Tensor,
                          iou_threshold: float) -> Tensor:
    """Batched NMS with one call to :func:`nms` per category, then one sort of all kept boxes.

    Plain and robust: no shifted coordinates, so no rounding and no assumption about the
    coordinate range. Faster than the coordinate trick for many boxes, since each category's
    NMS only compares boxes of that category.

    Args and returns: as :func:`batched_nms`.
    """
    _check_batched_nms_inputs(boxes, scores, idxs, iou_threshold)
    is_kept = torch.zeros_like(scores, dtype=torch.bool)  # (N,)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]  # indices of this category's boxes
        keep = nms(boxes.index_select(0, members), scores.index_select(0, members), iou_threshold)
        is_kept[members[keep]] = True
    kept = torch.where(is_kept)[0]  # (K,), by index
    # (K,), by decreasing score. torchvision sorts here with PyTorch's default sort, which is
    # not stable: kept boxes with equal scores may come out of index order. We copy the call.
    return kept[torch.sort(scores[kept], descending=True).indices]


# ----------------------------------------------------------------------------------------------
# Extension: Soft-NMS
# ----------------------------------------------------------------------------------------------


def soft_nms(boxes: Tensor, scores: Tensor, method: str = "linear", iou_threshold: float = 0.3,
             sigma: float = 0.5, score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., 2017): lower the scores of overlapping boxes instead of removing them.

    Greedy NMS throws away every box that overlaps a kept box by more than the threshold --
    also a second object standing close behind the first. Soft-NMS keeps all boxes but
    multiplies the score of each box in play by a *decay* that grows with its IoU with the box
    just selected, then selects the box that now scores best, and so on:

    * ``"linear"``: ``score *= 1 - IoU`` when ``IoU > iou_threshold``, otherwise unchanged;
    * ``"gaussian"``: ``score *= exp(-IoU**2 / sigma)`` for every box (``iou_threshold`` unused).

    A box leaves once its score falls below ``score_threshold`` (also at the start). A ``nan``
    IoU (two zero-area boxes) counts as no overlap, as in :func:`nms`. Equal scores are broken
    in favour of the lower index. This is a readable loop (one iteration per selected box), as
    in the paper; torchvision has no Soft-NMS to compare with, so the tests check a hand-worked
    example.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``, float32 or float64.
        scores (Tensor[N]): one score per box, same dtype as ``boxes``, no ``nan``.
        method (str): ``"linear"`` or ``"gaussian"``.
        iou_threshold (float): in ``[0, 1]``; overlap above which the linear decay applies.
        sigma (float): > 0, width of the Gaussian decay (smaller decays faster).
        score_threshold (float): >= 0, boxes whose score falls below this are dropped.

    Returns:
        (Tensor[K], Tensor[K]): int64 indices of the kept boxes in the order they were selected
        (by decreasing decayed score), and their decayed scores.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, SOFT_NMS_METHODS))}, "
                         f"got {method!r}")
    _check_number("sigma", sigma, "a number > 0", lambda x: x > 0)
    _check_number("score_threshold", score_threshold, "a number >= 0", lambda x: x >= 0)

    scores = scores.clone()  # decayed in place below
    in_play = torch.where(scores >= score_threshold)[0]  # (R,), by index
    keep = []
    while in_play.numel() > 0:
        position = int(torch.argmax(scores[in_play]))  # first of equal maxima: the lower index
        best = in_play[position]
        keep.append(best)
        in_play = torch.cat([in_play[:position], in_play[position + 1:]])
        # IoU of the selected box with every box in play: (1, 4) vs (R, 4) -> (1, R) -> (R,)
        ious = box_iou(boxes[best][None], boxes[in_play])[0].nan_to_num(nan=0.0)
        if method == "linear":
            decay = torch.where(ious > iou_threshold, 1 - ious, torch.ones_like(ious))
        else:
            decay = torch.exp(-ious**2 / sigma)
        scores[in_play] *= decay
        in_play = in_play[scores[in_play] >= score_threshold]
    if not keep:
        empty = torch.empty(0, dtype=torch.int64, device=boxes.device)
        return empty, scores[empty]
    keep = torch.stack(keep)
    return keep, scores[keep]


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_nms_inputs(boxes, scores, iou_threshold) -> None:
    """Float32/64 boxes (N, 4); scores (N,), same dtype and device, no nan; a threshold in [0, 1]."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"boxes: expected a float tensor of shape (N, 4), got a {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected a float tensor of shape (N, 4) holding (x1, y1, x2, y2), "
                         f"got shape {tuple(boxes.shape)}")
    if boxes.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"boxes: expected a float32 or float64 tensor of shape (N, 4), got dtype "
                         f"{boxes.dtype} (convert with boxes.float())")
    n = boxes.shape[0]
    _check_per_box("scores", scores, n, "a tensor", "one score per box")
    if scores.dtype != boxes.dtype or scores.device != boxes.device:
        raise ValueError(f"scores: expected the dtype and device of boxes ({boxes.dtype}, "
                         f"{boxes.device}), got {scores.dtype}, {scores.device}")
    nan_at = torch.where(torch.isnan(scores))[0]
    if nan_at.numel() > 0:
        raise ValueError(f"scores: expected no nan, got {nan_at.numel()} nan score(s), "
                         f"the first at index {int(nan_at[0])}")
    _check_number("iou_threshold", iou_threshold, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def _check_batched_nms_inputs(boxes, scores, idxs, iou_threshold) -> None:
    """As :func:`_check_nms_inputs`, plus integer category ids idxs (N,) on the same device."""
    _check_nms_inputs(boxes, scores, iou_threshold)
    n = boxes.shape[0]
    _check_per_box("idxs", idxs, n, "an integer tensor", "one category per box")
    if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
        raise ValueError(f"idxs: expected an integer tensor (category ids), got dtype {idxs.dtype}")
    if idxs.device != boxes.device:
        raise ValueError(f"idxs: expected the device of boxes ({boxes.device}), got {idxs.device}")


def _check_per_box(name: str, value, n: int, kind: str, meaning: str) -> None:
    """``value`` must be a Tensor of shape (n,): one entry per box."""
    expected = f"{name}: expected {kind} of shape (N,) = ({n},), {meaning}, got"
    if not isinstance(value, Tensor):
        raise ValueError(f"{expected} a {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"{expected} shape {tuple(value.shape)}")


def _check_number(name: str, value, expected: str, is_valid) -> None:
    """``value`` must be a real number (not a bool, not nan) for which ``is_valid(value)`` holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
            or not is_valid(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
