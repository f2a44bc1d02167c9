"""The RoI heads: the box head and the mask head behind one ``forward``, as torchvision's ``RoIHeads``.

Taught in: ``notebooks/05_box_head.ipynb`` (box branch) and ``notebooks/06_mask_head.ipynb``
(mask branch); assembled into the model in ``notebooks/07_training.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    C     channels of every feature map
    K_i   proposals of image i (from the RPN)
    R     RoIs over the batch: the sampled ones in training, all proposals at inference
    P     positive RoIs over the batch (training), or detections (inference)
    NC    classes, background included
    M     mask size (28)
    D_i   detections of image i
    G     ground-truth objects of one image; H, W its height and width

This module only composes; the stages live in their own modules, one per notebook:

* training: ``box_head.sample_proposals`` per image -> box RoIAlign -> ``TwoMLPHead`` ->
  ``BoxPredictor`` -> ``box_head.fastrcnn_loss``; then, for the positive RoIs only, mask RoIAlign
  -> ``MaskHead`` -> ``MaskPredictor`` -> ``mask_head.mask_loss`` against
  ``mask_head.project_masks_on_boxes``;
* inference: box RoIAlign on all proposals -> head -> predictor ->
  ``box_head.postprocess_detections``; then the mask branch on the *detected* boxes ->
  ``mask_head.mask_probabilities`` (28 x 28 maps; the model pastes them into the image later,
  ``mask_head.paste_masks_in_image``).

:class:`RoIHeads` lives here rather than in ``box_head`` or ``mask_head`` so that each stage module
stays about one stage, neither imports the other, and the orchestrator reads top to bottom.

With the same weights, inputs and random seed it gives the outputs of torchvision's ``RoIHeads``
(``tests/test_roi_heads.py``): the same losses in training, the same boxes, scores, labels and
mask probabilities at inference. Differences, all in what torchvision does not define or leaves
unchecked: training targets are checked and refused with a clear ``ValueError`` (naming the image
and the field); the three mask modules must be given all together or not at all (torchvision
silently drops an incomplete mask branch); a batch without any RoI gives zero box losses instead
of nan; targets are ignored at inference.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from mrcnn_edu.box_head import (BOX_REG_WEIGHTS, SampledRoIs, fastrcnn_loss, postprocess_detections,
                                sample_proposals)
from mrcnn_edu.boxes import BoxCoder
from mrcnn_edu.mask_head import mask_loss, mask_probabilities, project_masks_on_boxes
from mrcnn_edu.matching import BalancedPositiveNegativeSampler, Matcher
from mrcnn_edu.rpn import _describe, check_targets
from mrcnn_edu.utils import load_mapped_state_dict


class RoIHeads(nn.Module):
    """Box head and (optionally) mask head on top of the RPN's proposals.

    Args (torchvision's names; defaults those of ``maskrcnn_resnet50_fpn``):
        box_roi_pool (nn.Module): ``(features, boxes, image_sizes) -> Tensor[R, C, 7, 7]``, e.g.
            ``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)``.
        box_head (nn.Module): e.g. ``TwoMLPHead(C * 7 * 7, 1024)``.
        box_predictor (nn.Module): e.g. ``BoxPredictor(1024, num_classes)``.
        fg_iou_thresh (float): a proposal with IoU ``>=`` this with a gt box is a positive of its class.
        bg_iou_thresh (float): a proposal with IoU ``<`` this with every gt box is background.
        batch_size_per_image (int): RoIs sampled per image in training.
        positive_fraction (float): largest share of positives among them.
        bbox_reg_weights (tuple of 4 floats, optional): the box coder's weights; ``None`` ->
            ``(10, 10, 5, 5)``.
        score_thresh (float): inference: a detection needs a class probability above this.
        nms_thresh (float): inference: IoU for the per-class NMS.
        detections_per_img (int): inference: at most this many detections per image.
        mask_roi_pool, mask_head, mask_predictor (nn.Module, optional): the mask branch, e.g.
            ``MultiScaleRoIAlign([...], 14, 2)``, ``MaskHead(C, (256,) * 4)``,
            ``MaskPredictor(256, 256, num_classes)``; all three or none (Faster R-CNN).

    The matcher allows no low-quality matches; the attributes ``proposal_matcher``,
    ``fg_bg_sampler``, ``box_coder``, ``score_thresh``, ``nms_thresh`` and
    ``detections_per_img`` carry torchvision's names, so ``roi_heads.score_thresh = 0.9`` works
    the same on both.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        mask_branch = {"mask_roi_pool": mask_roi_pool, "mask_head": mask_head, "mask_predictor": mask_predictor}
        given = [name for name, module in mask_branch.items() if module is not None]
        if 0 < len(given) < 3:
            raise ValueError(f"mask_roi_pool, mask_head, mask_predictor: expected all three (Mask R-CNN) or "
                             f"none (Faster R-CNN), got only {', '.join(given)}")
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(BOX_REG_WEIGHTS if bbox_reg_weights is None else bbox_reg_weights)
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def extra_repr(self) -> str:
        return (f"{self.proposal_matcher}, {self.fg_bg_sampler}, {self.box_coder},\n"
                f"score_thresh={self.score_thresh}, nms_thresh={self.nms_thresh}, "
                f"detections_per_img={self.detections_per_img}")

    def has_mask(self) -> bool:
        """True for Mask R-CNN (a mask branch), False for Faster R-CNN."""
        return self.mask_predictor is not None

    def forward(
        self,
        features: Mapping[str, Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode.

        Args:
            features (dict[str, Tensor[N, C, h_l, w_l]]): the FPN levels (the pools pick theirs).
            proposals (list of N Tensor[K_i, 4]): ``(x1, y1, x2, y2)`` per image, from the RPN.
            image_sizes (list of N (int, int)): ``(height, width)`` of every image before padding.
            targets (list of N dicts, training only): ``"boxes"`` Float[G, 4], ``"labels"``
                Int64[G] (>= 1), and with a mask branch ``"masks"`` UInt8[G, H, W] of 0/1 values
                (H, W = the image's size). G may be 0: every RoI of that image is background.

        Returns:
            (detections, losses): in training ``[]`` and ``{"loss_classifier", "loss_box_reg"}``
            (+ ``"loss_mask"``); in eval one dict per image ``{"boxes": Float[D_i, 4],
            "labels": Int64[D_i], "scores": Float[D_i]}`` (+ ``"masks": Float[D_i, 1, M, M]``,
            probabilities before pasting) and ``{}``.

        Raises:
            ValueError: bad features, proposals or image sizes; in training, missing or bad
                targets (naming the image index and the field).
        """
        _check_inputs(features, proposals, image_sizes)
        if self.training:
            check_roi_targets(targets, image_sizes, self.has_mask(), getattr(self.box_predictor, "num_classes", None))
            return [], self.compute_losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes), {}

    def select_training_samples(self, proposals: Sequence[Tensor],
                                targets: Sequence[Mapping[str, Tensor]]) -> list[SampledRoIs]:
        """The sampled RoIs of every image with their labels and targets (``box_head.sample_proposals``).

        Images are sampled in order, each drawing from PyTorch's global generator as torchvision does.
        """
        return [sample_proposals(p, t["boxes"], t["labels"], self.proposal_matcher, self.fg_bg_sampler,
                                 self.box_coder) for p, t in zip(proposals, targets)]

    def predict_boxes(self, features: Mapping[str, Tensor], rois: Sequence[Tensor],
                      image_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """The box branch on the RoIs of every image: class logits Tensor[R, NC] and deltas Tensor[R, NC*4]."""
        box_features = self.box_roi_pool(features, list(rois), image_sizes)  # (R, C, 7, 7)
        return self.box_predictor(self.box_head(box_features))  # (R, F) -> (R, NC), (R, NC*4)

    def predict_masks(self, features: Mapping[str, Tensor], rois: Sequence[Tensor],
                      image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """The mask branch on the RoIs of every image: mask logits Tensor[P, NC, M, M]."""
        mask_features = self.mask_roi_pool(features, list(rois), image_sizes)  # (P, C, 14, 14)
        return self.mask_predictor(self.mask_head(mask_features))  # (P, C, 14, 14) -> (P, NC, 28, 28)

    def compute_losses(self, features: Mapping[str, Tensor], proposals: Sequence[Tensor],
                       image_sizes: Sequence[tuple[int, int]],
                       targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Sample RoIs, run the branches on them, and compute the losses (training)."""
        sampled = self.select_training_samples(proposals, targets)
        pred_class_logits, pred_box_deltas = self.predict_boxes(features, [s.proposals for s in sampled],
                                                                image_sizes)
        labels = torch.cat([s.labels for s in sampled])  # N x (R_i,) -> (R,)
        regression_targets = torch.cat([s.regression_targets for s in sampled])  # N x (R_i, 4) -> (R, 4)
        loss_classifier, loss_box_reg = fastrcnn_loss(pred_class_logits, pred_box_deltas, labels,
                                                      regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            # only positive RoIs learn masks: background has no mask to draw
            positives = [s.labels > 0 for s in sampled]
            positive_rois = [s.proposals[p] for s, p in zip(sampled, positives)]
            pred_mask_logits = self.predict_masks(features, positive_rois, image_sizes)  # (P, NC, M, M)
            mask_targets = torch.cat([  # N x (P_i, M, M) -> (P, M, M)
                project_masks_on_boxes(t["masks"], rois, s.matched_idxs[p], pred_mask_logits.shape[-1])
                for t, s, p, rois in zip(targets, sampled, positives, positive_rois)])
            positive_labels = labels[torch.cat(positives)]  # (R,) -> (P,), in the order of the logits
            losses["loss_mask"] = mask_loss(pred_mask_logits, positive_labels, mask_targets)
        return losses

    def detect(self, features: Mapping[str, Tensor], proposals: Sequence[Tensor],
               image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Classify the proposals, keep the detections, and draw their masks (inference)."""
        pred_class_logits, pred_box_deltas = self.predict_boxes(features, proposals, image_sizes)
        detections = postprocess_detections(pred_class_logits, pred_box_deltas, proposals, image_sizes,
                                            self.box_coder, self.score_thresh, self.nms_thresh,
                                            self.detections_per_img)
        results = [{"boxes": d.boxes, "labels": d.labels, "scores": d.scores} for d in detections]
        if self.has_mask():
            pred_mask_logits = self.predict_masks(features, [d.boxes for d in detections], image_sizes)
            for result, masks in zip(results, mask_probabilities(pred_mask_logits, [d.labels for d in detections])):
                result["masks"] = masks  # (D_i, 1, M, M)
        return results


# ----------------------------------------------------------------------------------------------
# Loading torchvision weights
# ----------------------------------------------------------------------------------------------


def torchvision_roi_heads_key_map(torchvision_key: str) -> str:
    """Rename one key of a torchvision ``RoIHeads`` state dict to ours.

    Any prefix (``roi_heads.``) is kept::

        box_head.fc6.weight                  -> box_head.fc1.weight
        box_head.fc7.bias                    -> box_head.fc2.bias
        box_predictor.cls_score.weight       -> box_predictor.class_logits.weight
        box_predictor.bbox_pred.bias         -> box_predictor.box_deltas.bias
        mask_head.0.0.weight                 -> mask_head.convs.0.weight   (Conv2dNormActivation)
        mask_head.mask_fcn1.weight           -> mask_head.convs.0.weight   (old checkpoints)
        mask_predictor.conv5_mask.weight     -> mask_predictor.upsample.weight
        mask_predictor.mask_fcn_logits.bias  -> mask_predictor.mask_logits.bias
    """
    key = re.sub(r"(^|\.)box_head\.fc6\.", r"\1box_head.fc1.", torchvision_key)
    key = re.sub(r"(^|\.)box_head\.fc7\.", r"\1box_head.fc2.", key)
    key = re.sub(r"(^|\.)box_predictor\.cls_score\.", r"\1box_predictor.class_logits.", key)
    key = re.sub(r"(^|\.)box_predictor\.bbox_pred\.", r"\1box_predictor.box_deltas.", key)
    key = re.sub(r"(^|\.)mask_head\.(\d+)\.0\.", r"\1mask_head.convs.\2.", key)
    key = re.sub(r"(^|\.)mask_head\.mask_fcn(\d+)\.",
                 lambda m: f"{m[1]}mask_head.convs.{int(m[2]) - 1}.", key)
    key = re.sub(r"(^|\.)mask_predictor\.conv5_mask\.", r"\1mask_predictor.upsample.", key)
    return re.sub(r"(^|\.)mask_predictor\.mask_fcn_logits\.", r"\1mask_predictor.mask_logits.", key)


def load_torchvision_roi_heads(roi_heads: RoIHeads, state_dict: Mapping[str, Tensor]) -> None:
    """Load the state dict of a torchvision ``RoIHeads`` into ``roi_heads``.

    Accepts the RoI heads' own keys (``box_head.fc6.weight``, ...) or a whole Mask R-CNN state
    dict, whose RoI-head keys start with ``roi_heads.``; its other keys are ignored. The RoI pools
    have no weights.

    Raises:
        ValueError: if the architectures do not match (lists missing/unexpected keys and shape
            mismatches). Nothing is loaded in that case.
    """
    load_mapped_state_dict(roi_heads, state_dict, "roi_heads.", torchvision_roi_heads_key_map,
                           "a torchvision RoIHeads")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def check_roi_targets(targets, image_sizes: Sequence[tuple[int, int]], require_masks: bool,
                      num_classes: int | None = None) -> None:
    """Training targets for the RoI heads: the RPN's checks (``rpn.check_targets``) and more.

    Per image ``i``: ``"labels"`` required, Int64[G], in ``[1, num_classes)`` when ``num_classes``
    is known; with ``require_masks``, ``"masks"`` a UInt8[G, H, W] of 0/1 values, one per box,
    ``(H, W)`` the image's size.

    Raises:
        ValueError: naming the image index and the field, e.g.
            ``targets[1]['masks']: expected UInt8[3, 100, 120] (one 0/1 mask per box, the image's size), ...``.
    """
    check_targets(targets, image_sizes)
    for i, (target, (height, width)) in enumerate(zip(targets, image_sizes)):
        num_boxes = len(target["boxes"])
        if "labels" not in target:
            raise ValueError(f"targets[{i}]['labels']: missing; expected Int64[{num_boxes}], one class per box "
                             f"(1 .. num_classes - 1; 0 is background)")
        labels = target["labels"]
        if num_classes is not None and len(labels) > 0 and (labels.min() < 1 or labels.max() >= num_classes):
            raise ValueError(f"targets[{i}]['labels']: expected classes in [1, {num_classes - 1}] "
                             f"(0 is background, num_classes = {num_classes}), got {labels.tolist()}")
        if not require_masks:
            continue
        expected = f"UInt8[{num_boxes}, {height}, {width}] (one 0/1 mask per box, the image's size)"
        if "masks" not in target:
            raise ValueError(f"targets[{i}]['masks']: missing; the mask branch needs {expected}")
        masks = target["masks"]
        if not isinstance(masks, Tensor) or masks.dtype != torch.uint8 or masks.shape != (num_boxes, height, width):
            raise ValueError(f"targets[{i}]['masks']: expected {expected}, got {_describe(masks)} "
                             f"(convert 0/1 or bool masks with .to(torch.uint8))")
        if masks.numel() > 0 and masks.max() > 1:
            raise ValueError(f"targets[{i}]['masks']: expected 0/1 values, got a maximum of {int(masks.max())} "
                             f"(for 0/255 masks use (masks > 0).to(torch.uint8))")


def _check_inputs(features, proposals, image_sizes) -> None:
    """N image sizes (h, w); N float proposal tensors (K_i, 4); a non-empty dict of (N, C, h, w) maps."""
    if not isinstance(image_sizes, (list, tuple)) or not all(
            isinstance(size, (list, tuple)) and len(size) == 2 for size in image_sizes):
        raise ValueError(f"image_sizes: expected a list of (height, width) pairs, one per image, "
                         f"got {image_sizes!r}")
    num_images = len(image_sizes)
    if not isinstance(proposals, (list, tuple)) or len(proposals) != num_images:
        got = f"{len(proposals)} tensors" if isinstance(proposals, (list, tuple)) else _describe(proposals)
        raise ValueError(f"proposals: expected a list of {num_images} Tensor[K_i, 4] (one per image), got {got}")
    for i, p in enumerate(proposals):
        if not isinstance(p, Tensor) or not p.is_floating_point() or p.dim() != 2 or p.shape[1] != 4:
            raise ValueError(f"proposals[{i}]: expected Float[K, 4] (x1, y1, x2, y2), got {_describe(p)}")
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError(f"features: expected a dict of feature maps, got {_describe(features)}")
    for name, feature in features.items():
        if not isinstance(feature, Tensor) or feature.dim() != 4 or feature.shape[0] != num_images:
            raise ValueError(f"features[{name!r}]: expected a Tensor[N, C, h, w] with N = {num_images}, "
                             f"got {_describe(feature)}")
