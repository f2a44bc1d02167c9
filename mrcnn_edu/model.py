"""The whole model: transform -> backbone -> RPN -> RoI heads -> back to the original image size.

Taught in: ``notebooks/07_training.ipynb`` (and the pipeline overview of ``00_course_map.ipynb``).

Shape shorthand used in this module:
    N     images in a batch
    H, W  height and width of an original image
    h, w  height and width after resizing;  Hp, Wp  of the padded batch
    C     channels of every pyramid level
    h_l, w_l  height and width of pyramid level l
    A     anchors per location;  T  anchors of an image over all levels
    K     proposals of an image;  R  RoIs given to the box head
    NC    classes, background included;  M  mask size (28)
    D     detections of an image;  G  ground-truth objects of an image

:class:`MaskRCNN` only composes the stages, each of which lives in its own module and notebook::

    images ─ transform ─ backbone ─ features ─ rpn ─ proposals ─ roi_heads ─ detections ─ postprocess
             (07)        (01)                  (02)              (05, 06)                  (07)

Its attributes carry torchvision's names (``transform``, ``backbone``, ``rpn``, ``roi_heads``),
its ``forward`` torchvision's contract (losses in training, detections in eval), and
:func:`load_torchvision_state_dict` loads a torchvision Mask R-CNN checkpoint into the ``r50_fpn``
preset. ``tests/test_model.py`` checks that with the same weights, images and random seed our
``r50_fpn`` model gives torchvision's losses and detections.

:func:`trace` runs one image through the model step by step and returns every intermediate
product, for the notebooks and the step-through explorer.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from os import PathLike
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.backbone import (SMALL_WIDTHS, BackboneWithFPN, load_torchvision_backbone, resnet50_fpn,
                                small_fpn)
from mrcnn_edu.box_head import BoxPredictor, TwoMLPHead, postprocess_detections
from mrcnn_edu.config import BackboneConfig, MaskRCNNConfig
from mrcnn_edu.mask_head import MaskHead, MaskPredictor, mask_probabilities, project_masks_on_boxes
from mrcnn_edu.matching import label_anchors
from mrcnn_edu.roi_heads import RoIHeads, check_roi_targets, load_torchvision_roi_heads
from mrcnn_edu.roi_ops import MultiScaleRoIAlign
from mrcnn_edu.rpn import RegionProposalNetwork, RPNHead, flatten_predictions, load_torchvision_rpn
from mrcnn_edu.transforms import DetectionTransform, check_image_list

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
"""The keys of the training loss dict (torchvision's); ``loss_mask`` only with a mask branch."""


class MaskRCNN(nn.Module):
    """Mask R-CNN: a thin orchestrator over the four stages (torchvision's ``GeneralizedRCNN``).

    Args:
        transform (DetectionTransform): normalise, resize, batch; and back (``postprocess``).
        backbone (nn.Module): ``Tensor[N, 3, Hp, Wp] -> dict of Tensor[N, C, h_l, w_l]``, with
            an ``out_channels`` attribute.
        rpn (RegionProposalNetwork): features -> proposals (+ RPN losses in training).
        roi_heads (RoIHeads): proposals -> detections (+ box and mask losses in training).

    Build one from a config with :func:`build_mask_rcnn`.
    """

    def __init__(self, transform: DetectionTransform, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None):
        """Losses in training mode, detections in eval mode.

        Args:
            images (list of N Tensor[3, H, W]): float RGB in ``[0, 1]``, sizes may differ.
            targets (list of N dicts, training only): ``"boxes"`` Float[G, 4] ``(x1, y1, x2, y2)``
                in pixels, ``"labels"`` Int64[G] (1 .. num_classes - 1), ``"masks"`` UInt8[G, H, W]
                of 0/1 (with a mask branch). G may be 0 (a background image).

        Returns:
            training: ``{"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
            "loss_mask"}`` (scalar tensors; their sum is what to minimise).
            eval: one dict per image, ``"boxes"`` Float[D, 4] in the original image's pixels,
            ``"labels"`` Int64[D], ``"scores"`` Float[D], ``"masks"`` Float[D, 1, H, W]
            probabilities (threshold at 0.5).

        Raises:
            ValueError: bad images or (in training) targets, naming the image index and field.
        """
        check_image_list(images)
        if self.training:
            self.check_targets(images, targets)
        batch = self.transform(images, targets)
        features = self.backbone(batch.images)
        proposals, proposal_losses = self.rpn(batch.images, batch.image_sizes, features, batch.targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, batch.targets)
        if self.training:
            return {**proposal_losses, **detector_losses}
        return self.transform.postprocess(detections, batch.image_sizes, batch.original_sizes)

    def check_targets(self, images: Sequence[Tensor], targets) -> None:
        """Training targets, checked against the *original* image sizes (errors name index and field)."""
        sizes = [tuple(image.shape[-2:]) for image in images]
        num_classes = getattr(self.roi_heads.box_predictor, "num_classes", None)
        check_roi_targets(targets, sizes, self.roi_heads.has_mask(), num_classes)


# ----------------------------------------------------------------------------------------------
# Building from a config
# ----------------------------------------------------------------------------------------------


def build_backbone(cfg: BackboneConfig) -> BackboneWithFPN:
    """The trunk + FPN named by ``cfg`` (``mrcnn_edu.backbone``)."""
    if cfg.name == "resnet50_fpn":
        return resnet50_fpn(norm=cfg.norm, trainable_layers=cfg.trainable_layers, out_channels=cfg.out_channels)
    return small_fpn(out_channels=cfg.out_channels, norm=cfg.norm, trainable_layers=cfg.trainable_layers,
                     widths=cfg.widths if cfg.widths is not None else SMALL_WIDTHS)


def build_mask_rcnn(cfg: MaskRCNNConfig) -> MaskRCNN:
    """The model described by ``cfg`` (``mrcnn_edu.config``), with freshly initialised weights.

    The only place that reads a config: every module gets plain constructor arguments.
    """
    if not isinstance(cfg, MaskRCNNConfig):
        raise TypeError(f"cfg: expected a MaskRCNNConfig (e.g. mrcnn_edu.config.small()), got {type(cfg).__name__}")
    t, r, h = cfg.transform, cfg.rpn, cfg.roi_heads
    transform = DetectionTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size)
    backbone = build_backbone(cfg.backbone)
    channels = backbone.out_channels

    anchor_generator = AnchorGenerator(r.anchor_sizes, r.aspect_ratios)
    rpn = RegionProposalNetwork(
        anchor_generator, RPNHead(channels, anchor_generator.num_anchors_per_location()[0], r.conv_depth),
        fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh, score_thresh=r.score_thresh)

    mask_branch = {}
    if h.mask:
        mask_branch = dict(
            mask_roi_pool=MultiScaleRoIAlign(h.featmap_names, h.mask_roi_size, h.sampling_ratio),
            mask_head=MaskHead(channels, h.mask_layers, h.mask_dilation),
            mask_predictor=MaskPredictor(h.mask_layers[-1], h.mask_dim_reduced, cfg.num_classes))
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(h.featmap_names, h.box_roi_size, h.sampling_ratio),
        TwoMLPHead(channels * h.box_roi_size ** 2, h.representation_size),
        BoxPredictor(h.representation_size, cfg.num_classes),
        fg_iou_thresh=h.fg_iou_thresh, bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
        bbox_reg_weights=h.bbox_reg_weights, score_thresh=h.score_thresh, nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img, **mask_branch)
    return MaskRCNN(transform, backbone, rpn, roi_heads)


# ----------------------------------------------------------------------------------------------
# Loading torchvision checkpoints, counting parameters
# ----------------------------------------------------------------------------------------------

_TORCHVISION_PREFIXES = ("backbone.", "rpn.", "roi_heads.")


def load_torchvision_state_dict(model: MaskRCNN, state_dict: Mapping[str, Tensor] | str | PathLike) -> None:
    """Load a torchvision Mask R-CNN state dict (``torchvision_model.state_dict()``) into ``model``.

    Args:
        model (MaskRCNN): e.g. ``build_mask_rcnn(r50_fpn(num_classes))``, with the checkpoint's
            number of classes.
        state_dict: the state dict, a training checkpoint holding it under ``"model"`` (as
            torchvision's reference scripts save), or the path of a file with either
            (read with ``torch.load(..., weights_only=True)``, on the CPU).

    Keys are renamed stage by stage (``backbone.load_torchvision_backbone``,
    ``rpn.load_torchvision_rpn``, ``roi_heads.load_torchvision_roi_heads``). All or nothing: if
    any stage does not match, the model is left as it was.

    Raises:
        ValueError: not a Mask R-CNN state dict, or a mismatch (names the keys and shapes).

    Note: torchvision's ``COCO_V1`` weights were trained with frozen batch norm of ``eps = 0``
    (torchvision sets it when loading them); ours keep ``eps = 1e-5``, which changes outputs by
    about 1e-5 relative. Set ``m.eps = 0.0`` on every ``FrozenBatchNorm2d`` to match exactly.
    """
    if isinstance(state_dict, (str, PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict: expected a dict of tensors, got a {type(state_dict).__name__}")
    missing = [prefix for prefix in _TORCHVISION_PREFIXES if not any(k.startswith(prefix) for k in state_dict)]
    other = [k for k in state_dict if not k.startswith(_TORCHVISION_PREFIXES)]
    if missing or other:
        problem = f"no keys starting with {missing}" if missing else f"unexpected keys, e.g. {other[:5]}"
        raise ValueError(f"state_dict: expected a whole torchvision Mask R-CNN state dict (keys backbone.*, "
                         f"rpn.*, roi_heads.*), found {problem}")
    saved = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        load_torchvision_backbone(model.backbone, state_dict)
        load_torchvision_rpn(model.rpn, state_dict)
        load_torchvision_roi_heads(model.roi_heads, state_dict)
    except Exception:
        model.load_state_dict(saved)
        raise


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (``trainable_only``: those with ``requires_grad``). Buffers are not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(model: MaskRCNN) -> dict[str, int | float]:
    """Parameters per stage, in total, trainable, and the float32 size in MB (10**6 bytes)."""
    summary: dict[str, int | float] = {name: count_parameters(getattr(model, name))
                                       for name in ("backbone", "rpn", "roi_heads")}
    summary["total"] = count_parameters(model)
    summary["trainable"] = count_parameters(model, trainable_only=True)
    summary["megabytes_float32"] = summary["total"] * 4 / 1e6
    return summary


# ----------------------------------------------------------------------------------------------
# Tracing one forward pass
# ----------------------------------------------------------------------------------------------

TRACE_KEYS = OrderedDict([
    ("image", "Float[3, H, W]: the input image"),
    ("resized_image", "Float[3, h, w]: normalised and resized (before padding)"),
    ("batch", "Float[1, 3, Hp, Wp]: the padded batch the backbone sees"),
    ("image_size", "(h, w): the resized size; the rest of the batch is padding"),
    ("original_size", "(H, W)"),
    ("scale_factor", "(h / H, w / W)"),
    ("features", "dict level -> Float[1, C, h_l, w_l]: the pyramid p2..p6"),
    ("anchors_per_level", "list of L Float[h_l*w_l*A, 4]: anchors of each level"),
    ("anchors", "Float[T, 4]: all anchors, level by level"),
    ("objectness", "Float[T]: the RPN's objectness logit of every anchor"),
    ("rpn_box_deltas", "Float[T, 4]: the RPN's deltas of every anchor"),
    ("decoded_anchors", "Float[T, 4]: every anchor moved by its deltas"),
    ("proposals_before_nms", "Float[k, 4]: per-level top-k, clipped, small/low-score dropped, best first"),
    ("proposal_scores_before_nms", "Float[k]: their objectness probabilities"),
    ("proposals", "Float[K, 4]: after NMS, the best post_nms_top_n (what the RoI heads get)"),
    ("proposal_scores", "Float[K]"),
    ("box_features", "Float[K, C, 7, 7]: RoIAlign of every proposal"),
    ("box_head_features", "Float[K, F]: after the two fully connected layers"),
    ("class_logits", "Float[K, NC]"),
    ("box_deltas", "Float[K, NC*4]: one box refinement per class"),
    ("detections", "dict boxes Float[D, 4], labels Int64[D], scores Float[D]: in the resized image"),
    ("mask_features", "Float[D, C, 14, 14]: RoIAlign of every detection (mask branch only)"),
    ("mask_logits", "Float[D, NC, M, M] (mask branch only)"),
    ("mask_probabilities", "Float[D, 1, M, M]: sigmoid of each detection's class channel (mask branch only)"),
    ("result", "dict boxes Float[D, 4], labels, scores, masks Float[D, 1, H, W]: what model.eval()(images) returns"),
])
"""The keys :func:`trace` returns, in order, each with its shape (without a target)."""

TRAINING_TRACE_KEYS = OrderedDict([
    ("target", "dict boxes Float[G, 4], labels Int64[G], masks UInt8[G, h, w]: resized like the image"),
    ("anchor_matches", "Int64[T]: gt index per anchor, -1 below bg_iou_thresh, -2 between the thresholds"),
    ("anchor_labels", "Int64[T]: 1 positive, 0 negative, -1 ignored"),
    ("sampled_positive_anchors", "Float[P, 4]: the positive anchors sampled for the RPN loss"),
    ("sampled_negative_anchors", "Float[Q, 4]: the negative ones"),
    ("training_proposals", "Float[K', 4]: the proposals with the training settings (pre/post NMS top-n)"),
    ("sampled_rois", "Float[R, 4]: the RoIs sampled for the box head (proposals + gt boxes)"),
    ("roi_labels", "Int64[R]: their classes, 0 = background"),
    ("roi_regression_targets", "Float[R, 4]: deltas onto their gt boxes (0 for background)"),
    ("mask_targets", "Float[P', M, M]: the gt masks cropped to the positive RoIs (mask branch only)"),
    ("losses", "dict of the five losses, for the samples shown above"),
])
"""The extra keys of :func:`trace` with a target, after :data:`TRACE_KEYS`."""


@torch.no_grad()
def trace(model: MaskRCNN, image: Tensor, target: Mapping[str, Tensor] | None = None,
          seed: int = 0) -> OrderedDict:
    """Every intermediate product of one forward pass of one image, in pipeline order.

    Args:
        model (MaskRCNN): any preset; run in eval mode here (its mode is restored afterwards).
        image (Tensor[3, H, W]): float RGB in ``[0, 1]``.
        target (dict, optional): ``"boxes"``, ``"labels"``, ``"masks"`` of the image, as in
            training; adds the training-time products (:data:`TRAINING_TRACE_KEYS`).
        seed (int): seeds the random sampling of anchors and RoIs (a forked generator: the global
            random state is left unchanged). Sampling is drawn twice with this seed, once to
            show the samples and once inside the loss functions, so the losses belong to exactly
            the samples shown (``model(images, targets)`` draws both from one stream instead).

    Returns:
        OrderedDict with the keys of :data:`TRACE_KEYS` (documented there with shapes), then
        those of :data:`TRAINING_TRACE_KEYS` if a target was given. ``result`` equals
        ``model.eval()([image])[0]``.
    """
    check_image_list([image])
    out: OrderedDict = OrderedDict(image=image)
    with _mode(model, training=False):
        batch = model.transform([image], None if target is None else [target])
        out["resized_image"] = batch.images[0, :, : batch.image_sizes[0][0], : batch.image_sizes[0][1]]
        out["batch"] = batch.images
        out["image_size"], out["original_size"] = batch.image_sizes[0], batch.original_sizes[0]
        out["scale_factor"] = batch.scale_factors()[0]
        features = model.backbone(batch.images)
        out["features"] = features

        # RPN (rpn.forward, step by step)
        rpn, sizes = model.rpn, batch.image_sizes
        feature_maps = list(features.values())
        pred_objectness_per_level, pred_deltas_per_level = rpn.head(feature_maps)
        anchors_per_level = rpn.anchor_generator.anchors_per_level(
            tuple(batch.images.shape[-2:]), [tuple(f.shape[-2:]) for f in feature_maps],
            feature_maps[0].dtype, feature_maps[0].device)
        anchors = torch.cat(anchors_per_level)  # L x (h_l*w_l*A, 4) -> (T, 4)
        pred_objectness, pred_deltas = flatten_predictions(pred_objectness_per_level, pred_deltas_per_level)
        decoded = rpn.box_coder.decode(pred_deltas, anchors)  # (1, T, 4)
        num_per_level = [len(a) for a in anchors_per_level]
        out["anchors_per_level"], out["anchors"] = anchors_per_level, anchors
        out["objectness"], out["rpn_box_deltas"], out["decoded_anchors"] = pred_objectness[0], pred_deltas[0], decoded[0]
        # the same filter without its NMS step: a threshold of 1 suppresses nothing (IoU > 1 never holds)
        with _attributes(rpn, nms_thresh=1.0, post_nms_top_n={"training": decoded.shape[1],
                                                              "testing": decoded.shape[1]}):
            before, before_scores = rpn.filter_proposals(decoded, pred_objectness, sizes, num_per_level)
        out["proposals_before_nms"], out["proposal_scores_before_nms"] = before[0], before_scores[0]
        proposals, scores = rpn.filter_proposals(decoded, pred_objectness, sizes, num_per_level)
        out["proposals"], out["proposal_scores"] = proposals[0], scores[0]

        # box branch (roi_heads.detect, step by step)
        heads = model.roi_heads
        out["box_features"] = heads.box_roi_pool(features, proposals, sizes)
        out["box_head_features"] = heads.box_head(out["box_features"])
        class_logits, box_deltas = heads.box_predictor(out["box_head_features"])
        out["class_logits"], out["box_deltas"] = class_logits, box_deltas
        (d,) = postprocess_detections(class_logits, box_deltas, proposals, sizes, heads.box_coder,
                                      heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
        detection = {"boxes": d.boxes, "labels": d.labels, "scores": d.scores}
        out["detections"] = dict(detection)
        if heads.has_mask():
            out["mask_features"] = heads.mask_roi_pool(features, [d.boxes], sizes)
            out["mask_logits"] = heads.mask_predictor(heads.mask_head(out["mask_features"]))
            (detection["masks"],) = mask_probabilities(out["mask_logits"], [d.labels])
            out["mask_probabilities"] = detection["masks"]
        (out["result"],) = model.transform.postprocess([detection], sizes, batch.original_sizes)

    if target is not None:
        model.check_targets([image], [target])
        mask_size = out["mask_logits"].shape[-1] if "mask_logits" in out else None
        out.update(_trace_training(model, batch, features, anchors, pred_objectness, pred_deltas, decoded,
                                   num_per_level, mask_size, seed))
    return out


def _trace_training(model: MaskRCNN, batch, features, anchors, pred_objectness, pred_deltas, decoded,
                    num_per_level, mask_size: int | None, seed: int) -> OrderedDict:
    """The training-time products of :func:`trace` (features from the eval pass: batch norm unchanged)."""
    rpn, heads, sizes = model.rpn, model.roi_heads, batch.image_sizes
    target = batch.targets[0]
    out: OrderedDict = OrderedDict(target=target)
    gt_boxes = [target["boxes"].to(anchors)]
    with torch.random.fork_rng(devices=[]), _mode(rpn, training=True), _mode(heads, training=True):
        (matches,) = rpn.match_anchors(anchors, gt_boxes)
        labels = label_anchors(matches)
        torch.manual_seed(seed)
        (positive,), (negative,) = rpn.fg_bg_sampler([labels])
        out["anchor_matches"], out["anchor_labels"] = matches, labels
        out["sampled_positive_anchors"], out["sampled_negative_anchors"] = anchors[positive], anchors[negative]
        proposals, _ = rpn.filter_proposals(decoded, pred_objectness, sizes, num_per_level)
        out["training_proposals"] = proposals[0]

        torch.manual_seed(seed + 1)
        (sampled,) = heads.select_training_samples(proposals, [target])
        out["sampled_rois"], out["roi_labels"] = sampled.proposals, sampled.labels
        out["roi_regression_targets"] = sampled.regression_targets
        if heads.has_mask():
            is_positive = sampled.labels > 0
            out["mask_targets"] = project_masks_on_boxes(target["masks"], sampled.proposals[is_positive],
                                                         sampled.matched_idxs[is_positive], mask_size)

        torch.manual_seed(seed)
        losses = rpn.compute_loss(pred_objectness, pred_deltas, anchors, gt_boxes, [matches])
        torch.manual_seed(seed + 1)
        losses.update(heads.compute_losses(features, proposals, sizes, [target]))
        out["losses"] = losses
    return out


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module.train(training)`` for a ``with`` block, then the previous mode again."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _attributes(obj, **values) -> Iterator[None]:
    """Set attributes of ``obj`` for a ``with`` block, then restore them."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)
