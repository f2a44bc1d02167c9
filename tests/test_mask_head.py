"""Tests for mrcnn_edu.mask_head: head and predictor, mask targets, mask loss, mask probabilities and
pasting masks into the image -- against torchvision, and on hand-made golden examples."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.mask_head import (MASK_THRESHOLD, MaskHead, MaskPredictor, expand_boxes, expand_masks,
                                 mask_loss, mask_probabilities, paste_masks_in_image, project_masks_on_boxes)
from mrcnn_edu.roi_heads import torchvision_roi_heads_key_map


def random_masks_and_boxes(seed=0, num_objects=3, size=(40, 50), num_rois=6):
    """0/1 uint8 gt masks (rectangles), RoIs jittered around them, and each RoI's matched object."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    masks = torch.zeros(num_objects, height, width, dtype=torch.uint8)
    boxes = []
    for j in range(num_objects):
        x1 = int(torch.randint(0, width // 2, (1,), generator=g))
        y1 = int(torch.randint(0, height // 2, (1,), generator=g))
        x2, y2 = x1 + 8 + j * 5, y1 + 6 + j * 4
        masks[j, y1:y2, x1:x2] = 1
        boxes.append([x1, y1, x2, y2])
    matched = torch.randint(0, num_objects, (num_rois,), generator=g)
    rois = torch.tensor(boxes, dtype=torch.float32)[matched] + torch.randn(num_rois, 4, generator=g) * 2
    return masks, rois, matched


# ---------------------------------------------------------------------------------------------
# Head and predictor
# ---------------------------------------------------------------------------------------------


def test_head_and_predictor_start_from_torchvisions_weights_and_compute_the_same():
    torch.manual_seed(0)
    theirs_head = tv_mask_rcnn.MaskRCNNHeads(8, (8, 8, 8, 8), 1)
    theirs_predictor = tv_mask_rcnn.MaskRCNNPredictor(8, 6, 3)
    torch.manual_seed(0)
    ours_head = MaskHead(8, (8, 8, 8, 8))
    ours_predictor = MaskPredictor(8, 6, 3)
    for prefix, ours, theirs in [("mask_head.", ours_head, theirs_head),
                                 ("mask_predictor.", ours_predictor, theirs_predictor)]:
        ours_weights = ours.state_dict()
        theirs_weights = theirs.state_dict()
        assert len(ours_weights) == len(theirs_weights)
        for key, value in theirs_weights.items():
            assert torch.equal(ours_weights[torchvision_roi_heads_key_map(prefix + key).removeprefix(prefix)], value)
    assert (ours_head.convs[0].bias == 0).all() and (ours_predictor.mask_logits.bias != 0).all()
    x = torch.randn(5, 8, 14, 14)
    features = ours_head(x)
    assert features.shape == (5, 8, 14, 14)
    assert_close(features, theirs_head(x), rtol=1e-6, atol=1e-6)
    logits = ours_predictor(features)
    assert logits.shape == (5, 3, 28, 28)  # one 28 x 28 mask per class
    assert_close(logits, theirs_predictor(features), rtol=1e-6, atol=1e-6)
    assert ours_predictor(ours_head(torch.zeros(0, 8, 14, 14))).shape == (0, 3, 28, 28)


# ---------------------------------------------------------------------------------------------
# Targets and loss
# ---------------------------------------------------------------------------------------------


def test_mask_target_golden():
    # a 16 x 16 mask with ones on rows and columns 4..11, the RoI (4, 4, 12, 12) exactly around them,
    # 4 x 4 bins of 2 x 2 pixels, 2 x 2 sampling points per bin. Legacy RoIAlign (aligned=False)
    # samples pixel *corners*: the points of the last bin are at 10.5 and 11.5, and 11.5 lies
    # halfway between pixel 11 (1) and pixel 12 (0): (1 + 0.5) / 2 = 0.75 along each axis.
    gt_mask = torch.zeros(16, 16, dtype=torch.uint8)
    gt_mask[4:12, 4:12] = 1
    target = project_masks_on_boxes(gt_mask[None], torch.tensor([[4.0, 4.0, 12.0, 12.0]]), torch.zeros(1), 4)[0]
    along = torch.tensor([1.0, 1.0, 1.0, 0.75])
    assert_close(target, along[:, None] * along[None, :])


def test_mask_targets_equal_torchvision():
    masks, rois, matched = random_masks_and_boxes()
    ours = project_masks_on_boxes(masks, rois, matched, 28)
    assert ours.shape == (6, 28, 28) and 0 <= ours.min() and ours.max() <= 1
    assert_close(ours, tv_roi_heads.project_masks_on_boxes(masks, rois, matched, 28), rtol=0, atol=1e-6)
    assert project_masks_on_boxes(masks, rois[:0], matched[:0], 28).shape == (0, 28, 28)
    assert project_masks_on_boxes(masks[:0], rois[:0], matched[:0], 28).shape == (0, 28, 28)


def test_mask_loss_equals_torchvision_values_and_gradients():
    images = [random_masks_and_boxes(seed) for seed in (0, 1)]
    gt_labels = [torch.tensor([1, 2, 1]), torch.tensor([2, 2, 1])]
    logits = torch.randn(12, 3, 28, 28, requires_grad=True)
    labels = torch.cat([l[m] for l, (_, _, m) in zip(gt_labels, images)])
    targets = torch.cat([project_masks_on_boxes(masks, rois, m, 28) for masks, rois, m in images])
    ours = mask_loss(logits, labels, targets)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = tv_roi_heads.maskrcnn_loss(logits, [rois for _, rois, _ in images], [masks for masks, _, _ in images],
                                        gt_labels, [m for _, _, m in images])
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-9)
    # only the channel of each RoI's gt class learns
    other_class = torch.ones(12, 3, dtype=torch.bool)
    other_class[torch.arange(12), labels] = False
    assert (ours_grad[other_class] == 0).all() and (ours_grad[~other_class] != 0).any()


def test_mask_loss_without_positives_is_a_differentiable_zero():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad.shape == (0, 3, 28, 28)


def test_mask_probabilities_equal_torchvision():
    logits = torch.randn(5, 4, 28, 28)
    labels = [torch.tensor([1, 3, 2]), torch.tensor([2, 2])]
    ours = mask_probabilities(logits, labels)
    theirs = tv_roi_heads.maskrcnn_inference(logits, labels)
    assert [p.shape for p in ours] == [(3, 1, 28, 28), (2, 1, 28, 28)]
    for o, t in zip(ours, theirs):
        assert torch.equal(o, t)
    assert_close(ours[0][1, 0], logits[1, 3].sigmoid())


# ---------------------------------------------------------------------------------------------
# Pasting: golden values
# ---------------------------------------------------------------------------------------------


def test_paste_golden_padding_ramps_the_edges():
    # a 2 x 2 mask of ones, padded to 4 x 4 ([0, 1, 1, 0] along each axis), pasted into the 4 x 4
    # box (2, 2, 6, 6). The box grows by 4 / 2 = 2 about its centre to (0, 0, 8, 8): 9 pixels
    # (x2 inclusive). Bilinear resize 4 -> 9, pixel i samples the source at (i + 0.5) * 4/9 - 0.5:
    # -0.28 (clamped to 0), 0.17, 0.61, 1.06, 1.5, 1.94, 2.39, 2.83, 3.28 (clamped to 3), giving
    # 0, 1/6, 11/18, 1, 1, 1, 11/18, 1/6, 0 -- and 0 outside the box (pixel 9).
    along = torch.tensor([0, 1 / 6, 11 / 18, 1, 1, 1, 11 / 18, 1 / 6, 0, 0])
    pasted = paste_masks_in_image(torch.ones(1, 1, 2, 2), torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (10, 10))
    assert pasted.shape == (1, 1, 10, 10)
    assert_close(pasted[0, 0], along[:, None] * along[None, :])
    # thresholded at 0.5: pixels 2..6 -- the box (2..5) and its inclusive x2, y2 pixel -- except
    # the four corners, where (11/18)**2 = 0.37: the ramp rounds the corners of the square
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:7, 2:7] = True
    for corner in [(2, 2), (2, 6), (6, 2), (6, 6)]:
        expected[corner] = False
    assert torch.equal(pasted[0, 0] > MASK_THRESHOLD, expected)


def test_paste_golden_without_padding_is_a_top_hat():
    # no padding: the border cells are repeated up to the box edge, a hard-edged square
    pasted = paste_masks_in_image(torch.ones(1, 1, 2, 2), torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (10, 10), padding=0)
    expected = torch.zeros(10, 10)
    expected[2:7, 2:7] = 1
    assert torch.equal(pasted[0, 0], expected)


def test_paste_golden_one_corner_and_clipping():
    # [[1, 0], [0, 0]] resized 2 -> 4 (box 0..3, x2 inclusive): source points -0.25 (clamped),
    # 0.25, 0.75, 1.25 (clamped) -> 1, 0.75, 0.25, 0 along each axis
    corner = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    pasted = paste_masks_in_image(corner, torch.tensor([[0.0, 0.0, 3.0, 3.0]]), (5, 5), padding=0)
    assert_close(pasted[0, 0], torch.tensor([
        [1.0, 0.75, 0.25, 0.0, 0.0],
        [0.75, 0.5625, 0.1875, 0.0, 0.0],
        [0.25, 0.1875, 0.0625, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]))
    # a box reaching out of the image: only the part inside is pasted
    pasted = paste_masks_in_image(torch.ones(1, 1, 2, 2), torch.tensor([[-2.0, -2.0, 2.0, 2.0]]), (4, 4), padding=0)
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1
    assert torch.equal(pasted[0, 0], expected)
    # a box wholly outside the image pastes nothing
    outside = paste_masks_in_image(torch.ones(1, 1, 2, 2), torch.tensor([[10.0, 1.0, 14.0, 3.0]]), (4, 4))
    assert (outside == 0).all()


# ---------------------------------------------------------------------------------------------
# Pasting: equal to torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [1, 0, 2])
def test_paste_equals_torchvision(padding):
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([
        [10.3, 5.7, 40.2, 30.9],  # fractional corners
        [0.0, 0.0, 69.0, 49.0],  # the whole image
        [-5.0, 40.0, 12.5, 60.0],  # out of the image to the left and below
        [60.0, -3.2, 75.0, 8.0],  # out to the right and above
        [20.0, 20.0, 20.4, 20.3],  # smaller than a pixel
        [33.0, 12.0, 33.0, 12.0],  # zero size
    ])
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    ours = paste_masks_in_image(masks, boxes, (50, 70), padding=padding)
    theirs = tv_roi_heads.paste_masks_in_image(masks, boxes, (50, 70), padding=padding)
    assert ours.shape == (6, 1, 50, 70)
    assert torch.equal(ours, theirs)
    empty = paste_masks_in_image(masks[:0], boxes[:0], (50, 70))
    assert empty.shape == (0, 1, 50, 70)


def test_expand_masks_and_boxes_equal_torchvision():
    masks = torch.rand(3, 1, 28, 28)
    boxes = torch.rand(3, 4) * 50 + torch.tensor([0.0, 0.0, 50.0, 50.0])
    ours_masks, ours_scale = expand_masks(masks, 1)
    theirs_masks, theirs_scale = tv_roi_heads.expand_masks(masks, 1)
    assert ours_scale == theirs_scale == 30 / 28
    assert torch.equal(ours_masks, theirs_masks)
    assert torch.equal(expand_boxes(boxes, ours_scale), tv_roi_heads.expand_boxes(boxes, theirs_scale))
