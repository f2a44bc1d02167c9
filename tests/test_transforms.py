"""Tests for mrcnn_edu.transforms: DetectionTransform equals torchvision's GeneralizedRCNNTransform
(normalise, resize, batch, targets, postprocess), masks and boxes resize consistently, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mrcnn_edu.oil_tanks import make_tile, masks_to_boxes
from mrcnn_edu.transforms import (DetectionTransform, denormalize, describe_batch, resize_boxes,
                                  resized_image_size)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [(97, 130), (64, 200), (150, 61)]


def make_pair(min_size=(80,), max_size=160, **kwargs):
    return DetectionTransform(min_size, max_size, MEAN, STD, **kwargs), \
        GeneralizedRCNNTransform(min_size, max_size, list(MEAN), list(STD), **kwargs)


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in SIZES:
        images.append(torch.rand(3, h, w, generator=g))
        xy = torch.rand(2, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], dim=1)
        boxes[1, 2:] = torch.tensor([w, h], dtype=torch.float32)  # one box touching the border
        masks = (torch.rand(2, h, w, generator=g) > 0.5).to(torch.uint8)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


@pytest.mark.parametrize("kwargs", [dict(), dict(min_size=(50,), max_size=100), dict(fixed_size=(96, 64)),
                                    dict(size_divisible=16)])
def test_equals_torchvision_in_eval(kwargs):
    ours, theirs = make_pair(**kwargs)
    ours.eval(), theirs.eval()
    images, targets = make_batch()
    batch = ours(images, targets)
    image_list, their_targets = theirs(images, targets)
    assert torch.equal(batch.images, image_list.tensors)
    assert batch.image_sizes == image_list.image_sizes
    assert batch.original_sizes == SIZES
    for mine, expected in zip(batch.targets, their_targets):
        # we clamp to the resized image (a 1-ulp difference at most); torchvision does not
        assert_close(mine["boxes"], expected["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(mine["masks"], expected["masks"]) and torch.equal(mine["labels"], expected["labels"])
    assert all(t["masks"].shape[0] == 2 for t in targets)  # the caller's targets are not modified
    assert [tuple(t["masks"].shape[-2:]) for t in targets] == SIZES


def test_multiscale_training_draws_like_torchvision():
    ours, theirs = make_pair(min_size=(60, 70, 80, 90))
    ours.train(), theirs.train()
    images, _ = make_batch()
    torch.manual_seed(5)
    batch = ours(images)
    after_ours = torch.rand(1)
    torch.manual_seed(5)
    image_list, _ = theirs(images)
    after_theirs = torch.rand(1)
    assert batch.image_sizes == image_list.image_sizes and torch.equal(batch.images, image_list.tensors)
    assert torch.equal(after_ours, after_theirs)  # the random stream stays in step


def test_padding_is_a_multiple_of_32_and_zero():
    ours, _ = make_pair()
    batch = ours.eval()(make_batch()[0])
    assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
    for image, (h, w) in zip(batch.images, batch.image_sizes):
        assert image[:, h:].abs().sum() == 0 and image[:, :, w:].abs().sum() == 0


def test_postprocess_equals_torchvision():
    ours, theirs = make_pair()
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(3)
    image_sizes, original_sizes = [(80, 107), (51, 160)], [(97, 130), (64, 200)]
    detections = []
    for h, w in image_sizes:
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.rand(4, 2, generator=g) * 30 + 2], dim=1)
        detections.append({"boxes": boxes, "labels": torch.ones(4, dtype=torch.int64), "scores": torch.rand(4, generator=g),
                           "masks": torch.rand(4, 1, 28, 28, generator=g)})
    mine = ours.postprocess(detections, image_sizes, original_sizes)
    expected = theirs.postprocess([dict(d) for d in detections], image_sizes, original_sizes)
    for a, e, size in zip(mine, expected, original_sizes):
        assert_close(a["boxes"], e["boxes"], atol=0, rtol=0)
        assert_close(a["masks"], e["masks"], atol=1e-6, rtol=0)
        assert a["masks"].shape == (4, 1, *size)


def test_masks_and_boxes_resize_consistently():
    tile = make_tile(size=(120, 150), seed=2, n_groups=2)
    ours = DetectionTransform((200,), 400, MEAN, STD).eval()
    batch = ours([tile.image], [tile.target])
    (target,) = batch.targets
    (h, w), (sy, sx) = batch.image_sizes[0], batch.scale_factors()[0]
    assert target["masks"].shape[-2:] == (h, w) and target["masks"].dtype == torch.uint8
    assert abs(sy - 200 / 120) < 1e-9 and (h, w) == resized_image_size((120, 150), 200, 400)
    # the box around each resized mask lies within about a (new) pixel of the resized box
    assert_close(masks_to_boxes(target["masks"]), target["boxes"], atol=1.5 * max(sy, sx), rtol=0)
    assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()


def test_describe_batch_and_denormalize():
    ours, _ = make_pair()
    images, _ = make_batch()
    info = describe_batch(ours.train(), images)
    assert ours.training  # mode restored
    assert info["original_sizes"] == SIZES
    assert info["padded_size"] == tuple(info["batch"].images.shape[-2:])
    for (ph, pw), (h, w), (fy, fx), (H, W) in zip(info["padding"], info["image_sizes"], info["scale_factors"], SIZES):
        assert (ph + h, pw + w) == info["padded_size"] and (fy, fx) == (h / H, w / W)
    image = torch.rand(3, 8, 8)
    assert_close(denormalize(ours.normalize(image), ours), image)
    assert_close(resize_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (100, 100), (50, 200)),
                 torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


@pytest.mark.parametrize("images, targets, message", [
    ("not a list", None, r"images: expected a non-empty list"),
    ([torch.rand(3, 10, 10), torch.rand(1, 10, 10)], None, r"images\[1\]: expected a float Tensor\[3, H, W\]"),
    ([torch.rand(3, 10, 10)], [{"boxes": torch.zeros(1, 3), "labels": torch.ones(1, dtype=torch.int64)}],
     r"targets\[0\]\['boxes'\]: expected Float\[N, 4\]"),
    ([torch.rand(3, 10, 10)], [{"boxes": torch.tensor([[0.0, 0.0, 11.0, 5.0]]), "labels": torch.ones(1, dtype=torch.int64)}],
     r"targets\[0\]\['boxes'\]: expected boxes inside the image"),
    ([torch.rand(3, 10, 10)], [{"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]])}], r"targets\[0\]\['labels'\]: missing"),
])
def test_bad_inputs_are_refused(images, targets, message):
    ours, _ = make_pair()
    with pytest.raises(ValueError, match=message):
        ours(images, targets)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="min_size"):
        DetectionTransform((0,), 100, MEAN, STD)
    with pytest.raises(ValueError, match="image_mean"):
        DetectionTransform(100, 200, (0.5,), STD)
