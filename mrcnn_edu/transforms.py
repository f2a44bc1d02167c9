"""The model's input and output transform: normalise, resize, batch -- and back to the original size.

Taught in: ``notebooks/07_training.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    H, W  height and width of an original image
    h, w  height and width of an image after resizing
    Hp, Wp  height and width of the padded batch (multiples of ``size_divisible``)
    G     ground-truth objects of one image
    D     detections of one image
    M     mask size of the mask head (28)

Before the backbone sees them, images are

1. **normalised** with the ImageNet mean and standard deviation, channel by channel (the trunk
   was designed -- and pretrained, for torchvision's weights -- on such inputs);
2. **resized** so that the short side becomes ``min_size``, unless the long side would then
   exceed ``max_size``, in which case the long side becomes ``max_size``. One scale factor for
   both sides keeps the aspect ratio; boxes are scaled with the image, masks are resized with
   nearest-neighbour interpolation (they stay 0/1);
3. **batched**: copied into the top-left corner of one zero tensor whose height and width are
   the largest in the batch, rounded up to a multiple of 32 (the coarsest FPN stride before p6),
   so every level of the pyramid has whole cells.

After the heads, :meth:`DetectionTransform.postprocess` scales the detected boxes back to the
original image and pastes each 28 x 28 mask into it (``mask_head.paste_masks_in_image``).

Everything equals torchvision's ``GeneralizedRCNNTransform`` (``tests/test_transforms.py``): the
same scale factor, the same bilinear interpolation (``recompute_scale_factor=True``: the output
size is ``floor(H * scale)``, and the interpolation then uses ``h / H``, not ``scale``), the same
random draw of ``min_size`` in training (one per image, from PyTorch's global generator), the
same padding. Differences: inputs are checked and refused with errors that name the image index
and the field; resized target boxes are clamped to the resized image (float rounding can put an
edge that lay on the border 1 ulp outside, which the RPN's target check would refuse); the
transform returns a :class:`TransformedBatch` instead of an ``ImageList``; no TorchScript/ONNX
branches.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn_edu.mask_head import paste_masks_in_image
from mrcnn_edu.roi_heads import check_roi_targets


class TransformedBatch(NamedTuple):
    """What :class:`DetectionTransform` returns: the padded batch, sizes and resized targets."""

    images: Tensor
    """Tensor[N, 3, Hp, Wp]: normalised, resized images, zero-padded to a multiple of ``size_divisible``."""
    image_sizes: list[tuple[int, int]]
    """``(h, w)`` of every image after resizing, before padding (where the image ends in ``images``)."""
    original_sizes: list[tuple[int, int]]
    """``(H, W)`` of every input image."""
    targets: list[dict[str, Tensor]] | None
    """The targets with boxes and masks resized like their images (``None`` if none were given)."""

    def scale_factors(self) -> list[tuple[float, float]]:
        """``(h / H, w / W)`` per image: multiply ``y`` and ``x`` coordinates of the input by these."""
        return [(h / H, w / W) for (h, w), (H, W) in zip(self.image_sizes, self.original_sizes)]


class DetectionTransform(nn.Module):
    """Normalise, resize and batch images (and their targets), as torchvision's ``GeneralizedRCNNTransform``.

    Args:
        min_size (int or tuple of int): target length of the short side. With several values,
            training draws one per image (multi-scale training); inference uses the last one.
        max_size (int): the long side never exceeds this.
        image_mean, image_std (3 floats): per-channel normalisation, RGB.
        size_divisible (int): the padded batch's height and width are multiples of this.
        fixed_size (tuple (width, height), optional): resize every image to exactly this size
            instead (torchvision's order: width first), ignoring the aspect ratio.

    No parameters or buffers: it adds nothing to a state dict.
    """

    def __init__(self, min_size: int | Sequence[int], max_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], size_divisible: int = 32,
                 fixed_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not self.min_size or not all(isinstance(s, int) and s > 0 for s in self.min_size):
            raise ValueError(f"min_size: expected a positive int or a tuple of them, got {min_size!r}")
        if not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f"max_size: expected a positive int, got {max_size!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean, image_std: expected 3 numbers each (R, G, B), "
                             f"got {image_mean!r} and {image_std!r}")
        self.max_size = max_size
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.size_divisible = size_divisible
        self.fixed_size = None if fixed_size is None else tuple(fixed_size)

    def extra_repr(self) -> str:
        return (f"min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, "
                f"std={self.image_std}, size_divisible={self.size_divisible}, fixed_size={self.fixed_size}")

    def forward(self, images: Sequence[Tensor],
                targets: Sequence[Mapping[str, Tensor]] | None = None) -> TransformedBatch:
        """Normalise, resize and batch.

        Args:
            images (list of N Tensor[3, H_i, W_i]): float RGB images in ``[0, 1]``, any sizes.
            targets (list of N dicts, optional): ``"boxes"`` Float[G, 4] ``(x1, y1, x2, y2)``,
                ``"labels"`` Int64[G], ``"masks"`` UInt8[G, H_i, W_i] (optional); not modified.
                Other keys are passed through unchanged.

        Returns:
            TransformedBatch: ``images`` Tensor[N, 3, Hp, Wp], ``image_sizes``, ``original_sizes``,
            ``targets`` resized (new dicts).

        Raises:
            ValueError: naming the image index and the field (``images[1]: expected ...``).
        """
        check_image_list(images)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if targets is not None:
            check_roi_targets(list(targets) if isinstance(targets, (list, tuple)) else targets, original_sizes,
                              require_masks=False)
        resized_images, resized_targets = [], None if targets is None else []
        for i, image in enumerate(images):
            image = self.normalize(image)
            target = None if targets is None else dict(targets[i])  # a copy: the caller's dict is kept
            image, target = self.resize(image, target)
            resized_images.append(image)
            if target is not None:
                resized_targets.append(target)
        image_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in resized_images]
        return TransformedBatch(self.batch_images(resized_images), image_sizes, original_sizes, resized_targets)

    def normalize(self, image: Tensor) -> Tensor:
        """``(image - mean) / std`` per channel: Tensor[3, H, W] -> Tensor[3, H, W]."""
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]  # (3,) -> (3, 1, 1) broadcasts over H, W

    def pick_min_size(self) -> int:
        """The short-side length for the next image: random in training (torchvision's draw), the last at inference."""
        if not self.training:
            return self.min_size[-1]
        # torchvision's torch_choice: one uniform draw from PyTorch's global generator per image,
        # even when there is only one size, so that the random stream stays in step with torchvision's
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Resize one image (Tensor[3, H, W] -> Tensor[3, h, w]) and its target's boxes and masks."""
        height, width = image.shape[-2:]
        size, scale = resize_parameters((height, width), self.pick_min_size(), self.max_size, self.fixed_size)
        # bilinear, half-pixel centres; with recompute_scale_factor the output is floor(H * scale)
        # and the interpolation uses the ratio of the sizes: (3, H, W) -> (1, 3, H, W) -> (1, 3, h, w) -> (3, h, w)
        image = F.interpolate(image[None], size=size, scale_factor=scale, mode="bilinear",
                              recompute_scale_factor=True if scale is not None else None, align_corners=False)[0]
        if target is None:
            return image, None
        new_size = (int(image.shape[-2]), int(image.shape[-1]))
        boxes = resize_boxes(target["boxes"], (height, width), new_size)
        # float rounding may put an edge that lay on the border 1 ulp outside the resized image
        target["boxes"] = clamp_boxes(boxes, new_size)
        if "masks" in target:
            # nearest neighbour keeps 0/1 values: (G, H, W) -> (G, 1, H, W) float -> (G, 1, h, w) -> (G, h, w) uint8
            masks = target["masks"][:, None].float()
            masks = F.interpolate(masks, size=size, scale_factor=scale,
                                  recompute_scale_factor=True if scale is not None else None)
            target["masks"] = masks[:, 0].byte()
        return image, target

    def batch_images(self, images: Sequence[Tensor]) -> Tensor:
        """Zero-pad N Tensor[3, h_i, w_i] into one Tensor[N, 3, Hp, Wp], images in the top-left corner."""
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        stride = float(self.size_divisible)
        padded_height = int(math.ceil(height / stride) * stride)
        padded_width = int(math.ceil(width / stride) * stride)
        batch = images[0].new_zeros((len(images), images[0].shape[0], padded_height, padded_width))
        for i, image in enumerate(images):
            batch[i, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        return batch

    def postprocess(self, detections: Sequence[dict[str, Tensor]], image_sizes: Sequence[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Detections back in the original images (inference).

        Args:
            detections (list of N dicts): ``"boxes"`` Float[D, 4] in the resized image,
                ``"labels"``, ``"scores"``, optionally ``"masks"`` Float[D, 1, M, M] probabilities.
            image_sizes (list of N (h, w)): sizes after resizing.
            original_sizes (list of N (H, W)): sizes of the input images.

        Returns:
            list of N new dicts: boxes scaled to the original image; masks pasted into it,
            Float[D, 1, H, W] probabilities (threshold at 0.5 for binary masks).
        """
        results = []
        for detection, size, original_size in zip(detections, image_sizes, original_sizes):
            result = dict(detection)
            result["boxes"] = resize_boxes(detection["boxes"], size, original_size)
            if "masks" in detection:
                result["masks"] = paste_masks_in_image(detection["masks"], result["boxes"], tuple(original_size))
            results.append(result)
        return results


def resize_parameters(image_size: tuple[int, int], min_size: int, max_size: int,
                      fixed_size: tuple[int, int] | None = None) -> tuple[list[int] | None, float | None]:
    """``(size, scale_factor)`` for ``F.interpolate``, by torchvision's rules (exactly one is not None).

    ``scale = min(min_size / short side, max_size / long side)``: the short side becomes
    ``min_size`` unless the long side would then exceed ``max_size``. With ``fixed_size``
    ``(width, height)``: ``size = [height, width]``.
    """
    if fixed_size is not None:
        return [fixed_size[1], fixed_size[0]], None
    height, width = image_size
    return None, min(min_size / min(height, width), max_size / max(height, width))


def resized_image_size(image_size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` an image of ``(H, W)`` gets: ``floor(H * scale)``, ``floor(W * scale)`` (for drawing)."""
    _, scale = resize_parameters(image_size, min_size, max_size)
    return tuple(int(math.floor(s * scale)) for s in image_size)


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scale ``(x1, y1, x2, y2)`` boxes from an image of ``original_size`` (H, W) to ``new_size`` (h, w).

    x by ``w / W`` and y by ``h / H``, the ratios computed in float32 as torchvision does.
    """
    ratio_height, ratio_width = (torch.tensor(new, dtype=torch.float32, device=boxes.device)
                                 / torch.tensor(old, dtype=torch.float32, device=boxes.device)
                                 for new, old in zip(new_size, original_size))
    x1, y1, x2, y2 = boxes.unbind(1)  # (D, 4) -> 4 x (D,)
    # 4 x (D,) -> (D, 4)
    return torch.stack((x1 * ratio_width, y1 * ratio_height, x2 * ratio_width, y2 * ratio_height), dim=1)


def clamp_boxes(boxes: Tensor, image_size: Sequence[int]) -> Tensor:
    """Boxes Tensor[D, 4] clamped to ``[0, W] x [0, H]`` of ``image_size`` (H, W)."""
    height, width = image_size
    x = boxes[:, 0::2].clamp(0, width)  # (D, 2): x1, x2
    y = boxes[:, 1::2].clamp(0, height)  # (D, 2): y1, y2
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def describe_batch(transform: DetectionTransform, images: Sequence[Tensor],
                   targets: Sequence[Mapping[str, Tensor]] | None = None) -> dict:
    """What the transform does to a batch, for drawing in the notebook (inference-mode sizes).

    Returns a dict:
        ``"batch"``: the TransformedBatch (``images`` normalised: use :func:`denormalize` to draw),
        ``"original_sizes"``, ``"image_sizes"``, ``"padded_size"`` ((Hp, Wp)),
        ``"scale_factors"`` (per image ``(h / H, w / W)``),
        ``"padding"`` (per image ``(Hp - h, Wp - w)``, the zero rows and columns added).
    """
    was_training = transform.training
    transform.eval()
    try:
        batch = transform(images, targets)
    finally:
        transform.train(was_training)
    padded = tuple(batch.images.shape[-2:])
    return {
        "batch": batch,
        "original_sizes": batch.original_sizes,
        "image_sizes": batch.image_sizes,
        "padded_size": padded,
        "scale_factors": batch.scale_factors(),
        "padding": [(padded[0] - h, padded[1] - w) for h, w in batch.image_sizes],
    }


def denormalize(images: Tensor, transform: DetectionTransform) -> Tensor:
    """Undo :meth:`DetectionTransform.normalize` for drawing: Tensor[..., 3, h, w] in ``[0, 1]`` (clamped)."""
    mean = torch.as_tensor(transform.image_mean, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.as_tensor(transform.image_std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std + mean).clamp(0, 1)


def check_image_list(images) -> None:
    """Images must be a non-empty list of float Tensor[3, H, W]."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        got = "an empty list" if isinstance(images, (list, tuple)) else (
            f"a tensor of shape {tuple(images.shape)} (unbind a batch with list(images))"
            if isinstance(images, Tensor) else f"a {type(images).__name__}")
        raise ValueError(f"images: expected a non-empty list of float Tensor[3, H, W], got {got}")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"images[{i}]: expected a float Tensor[3, H, W], got a {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point() or min(image.shape[1:]) == 0:
            hint = " (convert uint8 images with image.float() / 255)" if not image.is_floating_point() else ""
            raise ValueError(f"images[{i}]: expected a float Tensor[3, H, W] (RGB in [0, 1]), got shape "
                             f"{tuple(image.shape)} and dtype {image.dtype}{hint}")
