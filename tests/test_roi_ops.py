"""Tests for mrcnn_edu.roi_ops: golden values, parity with torchvision (values and gradients),
reference == vectorised, gradcheck, FPN level mapping and MultiScaleRoIAlign, bad input."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.ops import poolers as tv_poolers

from mrcnn_edu import roi_ops
from mrcnn_edu.roi_ops import (
    MultiScaleRoIAlign,
    bilinear_interpolate,
    bilinear_weights,
    boxes_to_rois,
    map_levels,
    roi_align,
    roi_align_reference,
    roi_align_sampling_points,
    roi_pool,
    roi_pool_bins,
    roi_pool_reference,
)

TOL = dict(rtol=1e-5, atol=1e-5)
DTYPES = [torch.float32, torch.float64]


def arange_map() -> torch.Tensor:
    """The 5 x 5 golden map f[r, c] = 5 r + c: bilinear interpolation is exact on it, f(y, x) = 5 y + x."""
    return torch.arange(25.0).reshape(1, 1, 5, 5)


def random_rois(num_boxes: int, num_images: int, height: int, width: int, scale: float,
                generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Tensor[K, 5] of boxes in image pixels over feature maps of H x W cells at ``scale``.

    Mixes boxes inside the map, partly outside, wholly outside, zero-size (points and lines),
    tiny (< 1 cell) and large (several times the bin size); batch indices in 0..N-1.
    """
    size = torch.tensor([width, height]) / scale  # image size in pixels
    centre = (torch.rand(num_boxes, 2, generator=generator) * 1.6 - 0.3) * size  # some off the map
    half = torch.rand(num_boxes, 2, generator=generator) * size * 0.4
    boxes = torch.cat([centre - half, centre + half], dim=1)
    boxes[0] = torch.tensor([-30.0, -30.0, -10.0, -5.0]) / scale  # wholly outside, top-left
    boxes[1] = torch.cat([size + 5 / scale, size + 9 / scale])  # wholly outside, bottom-right
    boxes[2, 2:] = boxes[2, :2]  # zero size: a point
    boxes[3, 2] = boxes[3, 0]  # zero width: a vertical line
    boxes[4] = torch.tensor([1.2, 1.3, 1.5, 1.4]) / scale  # smaller than a cell
    boxes[5] = torch.cat([-0.5 * size, 1.5 * size])  # covers and overhangs the whole map
    batch_index = torch.randint(0, num_images, (num_boxes, 1), generator=generator).float()
    return torch.cat([batch_index, boxes], dim=1).to(dtype)


def value_and_grad(op, x: torch.Tensor, upstream: torch.Tensor | None = None, **kwargs):
    """(op(x, **kwargs), d<op, upstream>/dx) with a random upstream gradient of the output's shape."""
    x = x.detach().clone().requires_grad_(True)
    out = op(x, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, x, upstream, allow_unused=True)
    return out.detach(), (torch.zeros_like(x) if grad is None else grad), upstream


# ---------------------------------------------------------------------------------------------
# Golden values on the 5 x 5 arange map
# ---------------------------------------------------------------------------------------------


def test_bilinear_interpolate_golden():
    f = arange_map()[0, 0]
    # (1.25, 2.5): rows 1 and 2, columns 2 and 3; ly = 0.25, lx = 0.5
    w = bilinear_weights(1.25, 2.5, 5, 5)
    assert (w.y_low, w.x_low, w.y_high, w.x_high) == (1, 2, 2, 3)
    # w1 = 0.75 * 0.5, w2 = 0.75 * 0.5, w3 = 0.25 * 0.5, w4 = 0.25 * 0.5
    assert_close(torch.stack([w.w1, w.w2, w.w3, w.w4]), torch.tensor([0.375, 0.375, 0.125, 0.125]))
    # 0.375 * f(1,2)=7 + 0.375 * f(1,3)=8 + 0.125 * f(2,2)=12 + 0.125 * f(2,3)=13 = 8.75 = 5 * 1.25 + 2.5
    assert_close(bilinear_interpolate(f, 1.25, 2.5), torch.tensor(8.75))
    # border: y = 4.5 is past the last row (4) but within one cell: it reads row 4 -> f(4, 1) = 21
    assert_close(bilinear_interpolate(f, 4.5, 1.0), torch.tensor(21.0))
    # y in [-1, 0) reads row 0; more than one cell off the map reads nothing
    assert_close(bilinear_interpolate(f, -0.5, 2.0), torch.tensor(2.0))
    assert_close(bilinear_interpolate(f, -1.5, 2.0), torch.tensor(0.0))
    assert_close(bilinear_interpolate(f, 2.0, 5.5), torch.tensor(0.0))
    # vectorised: one value per point, leading dims (channels) kept
    points = bilinear_interpolate(torch.stack([f, 2 * f]), torch.tensor([1.25, 0.0]),
                                  torch.tensor([2.5, 4.0]))
    assert_close(points, torch.tensor([[8.75, 4.0], [17.5, 8.0]]))


def test_bilinear_weights_sum_to_one_on_the_map_and_zero_off_it():
    y = torch.linspace(-2, 7, 37)
    x = torch.linspace(-2, 7, 37)[:, None]
    w = bilinear_weights(y, x, 5, 6)
    total = w.w1 + w.w2 + w.w3 + w.w4
    on_map = (y >= -1) & (y <= 5) & (x >= -1) & (x <= 6)
    assert_close(total, on_map.float())
    for index, size in ((w.y_low, 5), (w.y_high, 5), (w.x_low, 6), (w.x_high, 6)):
        assert index.min() >= 0 and index.max() <= size - 1


def test_roi_align_sampling_points_golden():
    # box (1, 1, 3, 3), 2 x 2 bins of 1 x 1 cell, 2 x 2 points per bin at 0.25 and 0.75 of the bin
    points = roi_align_sampling_points(torch.tensor([1.0, 1.0, 3.0, 3.0]), 2, sampling_ratio=2)
    assert points.shape == (2, 2, 2, 2, 2)
    assert_close(points[0, 0, :, :, 0], torch.tensor([[1.25, 1.25], [1.75, 1.75]]))  # y
    assert_close(points[1, 1, :, :, 1], torch.tensor([[2.25, 2.75], [2.25, 2.75]]))  # x
    # aligned: shifted by -0.5 cell
    shifted = roi_align_sampling_points(torch.tensor([1.0, 1.0, 3.0, 3.0]), 2, sampling_ratio=2, aligned=True)
    assert_close(shifted, points - 0.5)
    # adaptive grid: ceil(roi / bins) = ceil(6 / 2) = 3 down, ceil(2 / 2) = 1 across
    assert roi_align_sampling_points(torch.tensor([0.0, 0.0, 2.0, 6.0]), 2).shape == (2, 2, 3, 1, 2)
    # spatial scale: a box in image pixels (stride 4) lands on cells / 4
    scaled = roi_align_sampling_points(torch.tensor([4.0, 4.0, 12.0, 12.0]), 2, 0.25, 2)
    assert_close(scaled, points)
    # an aligned zero-size box with adaptive sampling has no points
    empty = roi_align_sampling_points(torch.tensor([2.0, 2.0, 2.0, 2.0]), 2, aligned=True)
    assert empty.shape == (2, 2, 0, 0, 2)


@pytest.mark.parametrize("aligned, box, sampling_ratio, output_size, expected", [
    # box (1, 1, 3, 3), 2 x 2 bins, points at y (and x) 1.25, 1.75 | 2.25, 2.75: bin means
    # y = 1.5 | 2.5 and x = 1.5 | 2.5, and f = 5 y + x is linear: 5*1.5+1.5 = 9, 5*1.5+2.5 = 10,
    # 5*2.5+1.5 = 14, 5*2.5+2.5 = 15
    (False, (1, 1, 3, 3), 2, 2, [[9.0, 10.0], [14.0, 15.0]]),
    # aligned: all points shifted by -0.5: means 1.0 | 2.0 -> 6, 7, 11, 12
    (True, (1, 1, 3, 3), 2, 2, [[6.0, 7.0], [11.0, 12.0]]),
    # adaptive grid: ceil(2 / 2) = 1 point per bin, at the bin centre: the same as above here
    (False, (1, 1, 3, 3), -1, 2, [[9.0, 10.0], [14.0, 15.0]]),
    # the border: box (3, 3, 5, 5), one 2 x 2 bin, points at 3.5 and 4.5; 4.5 is past the last
    # row/column (4) and reads it: f(3.5,3.5) = 21, f(3.5,4) = 21.5, f(4,3.5) = 23.5, f(4,4) = 24;
    # mean (21 + 21.5 + 23.5 + 24) / 4 = 22.5
    (False, (3, 3, 5, 5), 2, 1, [[22.5]]),
    # off the map: box (3, 3, 7, 7), one 4 x 4 bin, points at 4 and 6; 6 > 5 reads nothing:
    # only (4, 4) counts: f = 24, divided by all 4 points: 6
    (False, (3, 3, 7, 7), 2, 1, [[6.0]]),
    # legacy zero-size box: made 1 x 1 cell: box (2, 2, 2, 2) -> (2, 2, 3, 3), one point at 2.5:
    # f(2.5, 2.5) = 15
    (False, (2, 2, 2, 2), -1, 1, [[15.0]]),
    # the same box aligned has zero size and, with adaptive sampling, no points: 0
    (True, (2, 2, 2, 2), -1, 1, [[0.0]]),
])
def test_roi_align_golden(aligned, box, sampling_ratio, output_size, expected):
    f = arange_map()
    rois = torch.tensor([[0.0, *box]])
    expected = torch.tensor(expected)[None, None]
    for op in (roi_align, roi_align_reference, torchvision.ops.roi_align):
        assert_close(op(f, rois, output_size, 1.0, sampling_ratio, aligned), expected)


def test_roi_pool_golden_two_quantisations():
    f = arange_map()
    # box (0.6, 0.4, 3.5, 2.5): C's round -> cells x 1..4, y 0..3 (2.5 -> 3, 3.5 -> 4; torch.round
    # would give y2 = 2). 4 x 4 cells in 2 x 2 bins of 2 x 2 cells: rows 0-1 | 2-3, cols 1-2 | 3-4.
    # Max of each bin = its bottom-right cell: f(1,2) = 7, f(1,4) = 9, f(3,2) = 17, f(3,4) = 19
    box = torch.tensor([0.6, 0.4, 3.5, 2.5])
    bins = roi_pool_bins(box, 2, feature_size=(5, 5))
    assert bins.box.tolist() == [1, 0, 4, 3]
    assert (bins.row_start.tolist(), bins.row_end.tolist()) == ([0, 2], [2, 4])
    assert (bins.col_start.tolist(), bins.col_end.tolist()) == ([1, 3], [3, 5])
    expected = torch.tensor([[[[7.0, 9.0], [17.0, 19.0]]]])
    rois = torch.cat([torch.zeros(1), box])[None]
    for op in (roi_pool, roi_pool_reference, torchvision.ops.roi_pool):
        assert_close(op(f, rois, 2), expected)
    # 3 cells in 2 bins: bin size 1.5, edges floor(0) = 0..ceil(1.5) = 2 and floor(1.5) = 1..ceil(3) = 3:
    # the bins overlap on the middle cell
    bins = roi_pool_bins(torch.tensor([0.0, 0.0, 2.0, 2.0]), 2)
    assert (bins.row_start.tolist(), bins.row_end.tolist()) == ([0, 1], [2, 3])


def test_roi_pool_float_bin_edges_like_torchvision():
    # rows 0..56 (57 cells) in 7 bins: bin size float32(57 / 7) = 8.142857; the last bin ends at
    # ceil(7 * 8.142857) = ceil(57.000004) = 58 in float32, one row past the box: as in
    # torchvision's kernel, that bin reads row 57 (exact integer arithmetic would stop at 57)
    f = torch.arange(60.0).reshape(1, 1, 60, 1)  # value = row
    box = torch.tensor([0.0, 0.0, 0.0, 56.0])
    assert roi_pool_bins(box, (7, 1)).row_end[-1] == 58
    rois = torch.cat([torch.zeros(1), box])[None]
    assert roi_pool(f, rois, (7, 1))[0, 0, -1, 0] == 57
    assert_close(roi_pool(f, rois, (7, 1)), torchvision.ops.roi_pool(f, rois, (7, 1)))


def test_round_half_away_from_zero():
    t = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, 2.5001, -2.6])
    assert roi_ops._round_half_away_from_zero(t).tolist() == [-3, -2, -1, 1, 2, 3, 2, 3, -3]


# ---------------------------------------------------------------------------------------------
# Parity with torchvision: values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
def test_roi_align_matches_torchvision(dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 13, 17, generator=g, dtype=dtype)
    for scale, output_size in ((1.0, 7), (0.25, (3, 5))):
        rois = random_rois(40, 3, 13, 17, scale, g, dtype)
        kwargs = dict(boxes=rois, output_size=output_size, spatial_scale=scale,
                      sampling_ratio=sampling_ratio, aligned=aligned)
        ours, our_grad, upstream = value_and_grad(roi_align, x, **kwargs)
        theirs, their_grad, _ = value_and_grad(torchvision.ops.roi_align, x, upstream, **kwargs)
        assert ours.dtype == dtype and ours.is_contiguous()
        assert_close(ours, theirs, **TOL)
        assert_close(our_grad, their_grad, **TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, output_size", [(1.0, 7), (0.5, (3, 4)), (0.3, 1)])
def test_roi_pool_matches_torchvision(dtype, scale, output_size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 13, 17, generator=g, dtype=dtype)
    rois = random_rois(40, 3, 13, 17, scale, g, dtype)
    kwargs = dict(boxes=rois, output_size=output_size, spatial_scale=scale)
    ours, our_grad, upstream = value_and_grad(roi_pool, x, **kwargs)
    theirs, their_grad, _ = value_and_grad(torchvision.ops.roi_pool, x, upstream, **kwargs)
    assert ours.dtype == dtype and ours.is_contiguous()
    assert_close(ours, theirs, **TOL)
    assert_close(our_grad, their_grad, **TOL)


def test_roi_pool_ties_send_the_gradient_to_the_first_cell_like_torchvision():
    # ReLU features have many equal values (zeros): the gradient must go to the same cell
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3)).relu().round()
    rois = random_rois(20, 2, 9, 9, 1.0, torch.Generator().manual_seed(4))
    ours, our_grad, upstream = value_and_grad(roi_pool, x, boxes=rois, output_size=3)
    theirs, their_grad, _ = value_and_grad(torchvision.ops.roi_pool, x, upstream, boxes=rois, output_size=3)
    assert_close(ours, theirs)
    assert_close(our_grad, their_grad)


@pytest.mark.parametrize("op, tv_op", [(roi_align, torchvision.ops.roi_align),
                                       (roi_pool, torchvision.ops.roi_pool),
                                       (roi_align_reference, torchvision.ops.roi_align),
                                       (roi_pool_reference, torchvision.ops.roi_pool)])
def test_list_boxes_and_no_boxes(op, tv_op):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 10, generator=g)
    per_image = [torch.tensor([[0.5, 1.0, 6.0, 5.5], [2.0, 2.0, 9.0, 7.0]]),
                 torch.tensor([[1.0, 0.0, 4.0, 3.0]])]
    assert_close(op(x, per_image, 2), tv_op(x, per_image, 2), **TOL)
    assert_close(op(x, per_image, 2), op(x, boxes_to_rois(per_image), 2))
    # K = 0: an empty (0, C, h, w) result whose backward gives a zero gradient, as torchvision's
    for empty in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        ours, our_grad, upstream = value_and_grad(op, x, boxes=empty, output_size=(2, 3))
        theirs, their_grad, _ = value_and_grad(tv_op, x, upstream, boxes=empty, output_size=(2, 3))
        assert ours.shape == theirs.shape == (0, 3, 2, 3)
        assert_close(our_grad, their_grad)


def test_channels_last_and_strided_inputs_give_the_same_result():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 9, 11, generator=g)
    rois = random_rois(12, 2, 9, 11, 1.0, g)
    for op in (roi_align, roi_pool):
        expected = op(x, rois, 3)
        assert_close(op(x.contiguous(memory_format=torch.channels_last), rois, 3), expected)
        assert_close(op(x.transpose(2, 3).contiguous().transpose(2, 3), rois, 3), expected)


def test_boxes_get_no_gradient_like_torchvision():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.5, 0.5, 4.0, 3.0]], requires_grad=True)
    roi_align(x, boxes, 2, sampling_ratio=2).sum().backward()
    assert boxes.grad is None and x.grad is not None


# ---------------------------------------------------------------------------------------------
# Reference == vectorised; gradcheck; chunking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_reference_equals_vectorised(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 7, 9, generator=g, dtype=torch.float64)
    rois = random_rois(10, 2, 7, 9, 0.5, g, torch.float64)
    kwargs = dict(boxes=rois, output_size=(2, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio,
                  aligned=aligned)
    ours, our_grad, upstream = value_and_grad(roi_align, x, **kwargs)
    ref, ref_grad, _ = value_and_grad(roi_align_reference, x, upstream, **kwargs)
    assert_close(ours, ref)
    assert_close(our_grad, ref_grad)


def test_roi_pool_reference_equals_vectorised():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 7, 9, generator=g, dtype=torch.float64)
    rois = random_rois(12, 2, 7, 9, 0.5, g, torch.float64)
    kwargs = dict(boxes=rois, output_size=(3, 2), spatial_scale=0.5)
    ours, our_grad, upstream = value_and_grad(roi_pool, x, **kwargs)
    ref, ref_grad, _ = value_and_grad(roi_pool_reference, x, upstream, **kwargs)
    assert_close(ours, ref)
    assert_close(our_grad, ref_grad)


@pytest.mark.parametrize("sampling_ratio, aligned", [(-1, False), (2, True)])
def test_roi_align_gradcheck(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.6, 4.2, 3.9], [1, -1.0, 2.0, 7.0, 6.0], [1, 2.0, 2.0, 2.0, 2.0]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned), (x,))


def test_roi_pool_gradcheck():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.6, 4.2, 3.9], [1, -1.0, 2.0, 7.0, 6.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (2, 3)), (x,))


def test_small_chunks_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 12, 12, generator=g)
    rois = random_rois(30, 2, 12, 12, 1.0, g)
    whole = roi_align(x, rois, 4), roi_pool(x, rois, 4)
    monkeypatch.setattr(roi_ops, "MAX_BAG_ENTRIES", 50)  # one RoI (or a few) per chunk
    assert_close(roi_align(x, rois, 4), whole[0])
    assert_close(roi_pool(x, rois, 4), whole[1])


# ---------------------------------------------------------------------------------------------
# FPN levels: map_levels and MultiScaleRoIAlign
# ---------------------------------------------------------------------------------------------


def boxes_of_all_scales(image_size, num_boxes: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with sides from 2 px to the whole image (log-uniform), a few partly outside."""
    height, width = image_size
    side = torch.exp(torch.empty(num_boxes, 2).uniform_(0.7, 6.8, generator=generator))  # 2..900 px
    centre = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([width, height])
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
    # exactly canonical sizes: 224 px goes to level 4, 112 px to level 3, 448 px to level 5
    boxes[:3] = torch.tensor([[10.0, 10.0, 234.0, 234.0], [0.0, 0.0, 112.0, 112.0], [5.0, 5.0, 453.0, 453.0]])
    boxes[3] = torch.tensor([20.0, 20.0, 20.0, 20.0])  # zero size
    return boxes


def test_map_levels_matches_torchvision_level_mapper():
    g = torch.Generator().manual_seed(11)
    boxes = [boxes_of_all_scales((800, 800), 200, g), boxes_of_all_scales((600, 900), 100, g)]
    for k_min, k_max in ((2, 5), (3, 4), (2, 2)):
        ours = map_levels(boxes, k_min, k_max)
        theirs = tv_poolers.LevelMapper(k_min, k_max)(boxes)
        assert ours.dtype == torch.int64
        assert torch.equal(ours, theirs)
    assert map_levels(boxes, 2, 5)[:3].tolist() == [2, 1, 3]  # levels 4, 3, 5 as indices from k_min = 2
    assert torch.equal(map_levels(boxes, 2, 5, canonical_scale=112, canonical_level=3),
                       tv_poolers.LevelMapper(2, 5, 112, 3)(boxes))


def fpn_features(image_size, channels: int, num_images: int, generator: torch.Generator):
    """p2..p5 and an unused "pool" level of a padded batch of ``image_size`` (torchvision's FPN names)."""
    height, width = image_size
    features = OrderedDict()
    for name, stride in (("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)):
        features[name] = torch.randn(num_images, channels, -(-height // stride), -(-width // stride),
                                     generator=generator)
    return features


@pytest.mark.parametrize("image_sizes, featmap_names, output_size, sampling_ratio", [
    ([(320, 320)], ["0", "1", "2", "3"], 7, 2),
    # two images of different sizes in one padded batch (320 x 384)
    ([(256, 384), (320, 288)], ["0", "1", "2", "3"], 7, 2),
    ([(256, 384), (320, 288)], ["0", "1", "2", "3"], 14, -1),
    ([(200, 300)], ["1", "3"], (5, 3), 2),  # a subset of levels (k = 3 and 5)
    ([(200, 300), (150, 310)], ["2"], 7, 2),  # one level: no level mapping
])
def test_multiscale_roi_align_matches_torchvision(image_sizes, featmap_names, output_size, sampling_ratio):
    g = torch.Generator().manual_seed(12)
    padded = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
    padded = tuple(-(-s // 32) * 32 for s in padded)  # batches are padded to a multiple of 32
    features = fpn_features(padded, 3, len(image_sizes), g)
    boxes = [boxes_of_all_scales(size, 40, g) for size in image_sizes]
    ours = MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio)
    theirs = torchvision.ops.MultiScaleRoIAlign(featmap_names, output_size, sampling_ratio)

    leaves = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in features.items())
    out = ours(leaves, boxes, image_sizes)
    upstream = torch.randn(out.shape, generator=g)
    our_grads = torch.autograd.grad(out, list(leaves.values()), upstream, allow_unused=True)
    tv_leaves = OrderedDict((k, v.clone().requires_grad_(True)) for k, v in features.items())
    expected = theirs(tv_leaves, boxes, image_sizes)
    tv_grads = torch.autograd.grad(expected, list(tv_leaves.values()), upstream, allow_unused=True)

    assert out.shape == (sum(len(b) for b in boxes), 3, *roi_ops._check_output_size(output_size))
    assert_close(out, expected, **TOL)
    for ours_g, tv_g in zip(our_grads, tv_grads):
        if tv_g is None:
            assert ours_g is None or not ours_g.any()
        else:
            assert_close(ours_g, tv_g, **TOL)


def test_multiscale_roi_align_without_boxes():
    features = fpn_features((128, 128), 2, 2, torch.Generator().manual_seed(16))
    no_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, no_boxes, [(128, 128), (100, 120)])
    expected = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(features, no_boxes,
                                                                             [(128, 128), (100, 120)])
    assert out.shape == expected.shape == (0, 2, 7, 7)


def test_multiscale_roi_align_uses_each_level():
    # boxes of 32, 112, 224 and 448 px come from p2 ... p5: a map that is zero except on one level
    features = fpn_features((512, 512), 1, 1, torch.Generator().manual_seed(13))
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 112.0, 112.0],
                           [0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 448.0, 448.0]])]
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)
    for level, name in enumerate(["0", "1", "2", "3"]):
        only = OrderedDict((k, v if k == name else torch.zeros_like(v)) for k, v in features.items())
        nonzero = pooler(only, boxes, [(512, 512)]).flatten(1).abs().sum(1) > 0
        assert nonzero.tolist() == [i == level for i in range(4)]


def test_infer_scale_matches_torchvision():
    for feature_size, image_size in (((200, 200), (800, 800)), ((25, 34), (800, 1088)),
                                     ((13, 13), (400, 400)), ((7, 9), (200, 300))):
        expected = tv_poolers._infer_scale(torch.zeros(1, 1, *feature_size), list(image_size))
        assert roi_ops.infer_scale(feature_size, image_size) == expected


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [roi_align, roi_pool, roi_align_reference, roi_pool_reference])
def test_bad_input_raises_value_error_naming_the_argument(op):
    x = torch.zeros(2, 3, 8, 8)
    good = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="boxes must be a Tensor\\[K, 5\\]"):
        op(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="boxes must be a Tensor\\[K, 5\\]"):
        op(x, torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"boxes\[1\] must be a Tensor\[L, 4\]"):
        op(x, [torch.zeros(1, 4), torch.zeros(1, 5)], 2)
    with pytest.raises(ValueError, match="boxes has one Tensor"):
        op(x, [torch.zeros(1, 4)] * 3, 2)
    for batch_index in (2.0, -1.0, 0.5):
        bad = good.clone()
        bad[0, 0] = batch_index
        with pytest.raises(ValueError, match=r"boxes\[:, 0\] \(the batch index\)"):
            op(x, bad, 2)
    with pytest.raises(ValueError, match="boxes must be finite"):
        op(x, torch.tensor([[0.0, 1.0, 1.0, float("nan"), 5.0]]), 2)
    for size in (0, -1, (2, 0), (2,), (2, 2, 2), 2.5):
        with pytest.raises(ValueError, match="output_size must be"):
            op(x, good, size)
    with pytest.raises(ValueError, match="spatial_scale must be > 0"):
        op(x, good, 2, 0.0)
    with pytest.raises(ValueError, match="input must be a float Tensor\\[N, C, H, W\\]"):
        op(x[0], good, 2)
    with pytest.raises(ValueError, match="input must be a float Tensor\\[N, C, H, W\\]"):
        op(x.long(), good, 2)


def test_bad_input_to_helpers_and_multiscale():
    with pytest.raises(ValueError, match="box must be a Tensor\\[4\\]"):
        roi_align_sampling_points(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="box must be a Tensor\\[4\\]"):
        roi_pool_bins(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="output_size must be"):
        MultiScaleRoIAlign(["0"], 0, 2)
    features = fpn_features((64, 64), 2, 1, torch.Generator().manual_seed(14))
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    with pytest.raises(ValueError, match="features has no map named \\['p7'\\]"):
        MultiScaleRoIAlign(["0", "p7"], 2, 2)(features, boxes, [(64, 64)])
    with pytest.raises(ValueError, match="image_sizes must list"):
        MultiScaleRoIAlign(["0", "1"], 2, 2)(features, boxes, [])
    with pytest.raises(ValueError, match="boxes must be a list"):
        MultiScaleRoIAlign(["0", "1"], 2, 2)(features, boxes[0], [(64, 64)])
