"""The region proposal network (RPN): from feature maps to a few thousand candidate object boxes.

Taught in: ``notebooks/02_anchors_and_rpn.ipynb``.

Shape shorthand used in this module:
    N     images in a batch
    C     channels of every feature map
    H, W  height and width of the padded image batch
    L     pyramid levels
    h, w  height and width of one level's feature map
    A     anchors per location (the same on every level: one head serves them all)
    T     anchors of one image over all levels: ``sum over l of h_l * w_l * A``
    k     anchors of one image kept before NMS: ``sum over l of min(pre_nms_top_n, h_l * w_l * A)``
    K_i   proposals returned for image i (at most ``post_nms_top_n``)
    M     ground-truth boxes of one image
    P     sampled positive anchors over the whole batch (P_i: of image i)

The RPN (Ren et al., Faster R-CNN, 2015) slides a small network over every level of the
pyramid. At each cell it predicts, for each of the A anchors there (``mrcnn_edu.anchors``),

* an *objectness* logit: is there an object in this anchor? (one number), and
* *box deltas*: how to move and stretch the anchor onto that object (``BoxCoder``, four numbers).

**Proposals** (training and inference): decode every anchor's deltas into a box; per level,
keep the ``pre_nms_top_n`` highest objectness logits; clip the boxes to their image; drop boxes
smaller than ``MIN_PROPOSAL_SIZE``; drop scores below ``score_thresh``; run NMS within each
level; keep the ``post_nms_top_n`` best. The box head (stage 05) classifies these proposals.

**Losses** (training): match the anchors to the gt boxes by IoU (``mrcnn_edu.matching``),
sample 256 anchors per image, at most half of them positive, and compute

* ``loss_objectness``: binary cross-entropy of the sampled anchors' logits against 1
  (positive) / 0 (negative), averaged over the sampled anchors;
* ``loss_rpn_box_reg``: smooth L1 (``beta = 1/9``) between the positives' predicted deltas and
  the deltas that would move them onto their gt boxes, summed and divided by the number of
  *sampled* anchors (positives and negatives), as in torchvision.

Everything here gives torchvision's results for the same weights and inputs (``RPNHead`` and
``RegionProposalNetwork`` in ``torchvision/models/detection/rpn.py``): the same proposals and the
same losses, the random sampling included when the random seed is the same
(``tests/test_rpn.py``). Differences in form, not in results: the parameters have readable names
(:func:`torchvision_rpn_key_map`), ``forward`` takes the padded batch and the image sizes instead
of an ``ImageList``, and the anchors are one ``Tensor[T, 4]`` shared by all images (the images of
a batch are padded to one size, so their anchors are the same).

**Ties.** Which anchors survive the per-level top-k when several have *exactly* the same logit
is decided by ``torch.topk``, which does not specify an order among equal values -- and does not
take the lowest indices: among 3,840 equal logits, ``topk(300)`` on the CPU returns a block from
the middle. We call ``topk`` exactly as torchvision does, on the same tensor, so we make the
same choice (the tests check this on a head whose weights are all 0, where every logit ties); an
implementation that sorted instead, even stably, would keep other, equally scored anchors, and
so return other proposals. NMS then breaks ties as torchvision's does (``mrcnn_edu.nms``). Exact
ties are rare with trained weights, common with a zeroed or saturated head.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.utils import check_images, load_mapped_state_dict
from mrcnn_edu.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from mrcnn_edu.matching import BalancedPositiveNegativeSampler, Matcher, label_anchors
from mrcnn_edu.nms import batched_nms

MIN_PROPOSAL_SIZE = 1e-3
"""Proposals narrower or lower than this (in pixels, after clipping) are dropped (torchvision's value)."""

SMOOTH_L1_BETA = 1 / 9
"""Where the box loss turns from quadratic (small errors) to linear (large errors), in delta units."""

MODES = ("training", "testing")
"""The keys of the settings that differ between training and inference (``pre_nms_top_n``...)."""


# ----------------------------------------------------------------------------------------------
# The head: a small conv net shared by all levels
# ----------------------------------------------------------------------------------------------


class RPNHead(nn.Module):
    """3x3 conv(s) + ReLU, then two 1x1 convs: objectness logits and box deltas for every anchor.

    Args:
        in_channels (int): C, the channels of every feature map.
        num_anchors (int): A, anchors per location.
        conv_depth (int): how many 3x3 conv + ReLU layers come first (1 in Faster/Mask R-CNN).

    Parameters are named ``convs.<i>``, ``objectness`` and ``box_deltas`` (torchvision:
    ``conv.<i>.0``, ``cls_logits``, ``bbox_pred``; see :func:`torchvision_rpn_key_map`). Every
    weight starts from a normal distribution with std 0.01 and every bias from 0, as in
    torchvision -- with the same random seed, the very same numbers.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1) for _ in range(conv_depth)
        )
        self.objectness = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.box_deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for conv in [*self.convs, self.objectness, self.box_deltas]:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Predict on every level.

        Args:
            features (sequence of L Tensor[N, C, h_l, w_l]): the pyramid, finest first.

        Returns:
            (list of L Tensor[N, A, h_l, w_l], list of L Tensor[N, A*4, h_l, w_l]): objectness
            logits and box deltas; channel ``a * 4 + j`` of the deltas is delta ``j`` of anchor ``a``.
        """
        objectness, box_deltas = [], []
        for feature in features:
            x = feature
            for conv in self.convs:
                x = F.relu(conv(x))  # (N, C, h, w), same shape
            objectness.append(self.objectness(x))  # (N, C, h, w) -> (N, A, h, w)
            box_deltas.append(self.box_deltas(x))  # (N, C, h, w) -> (N, A*4, h, w)
        return objectness, box_deltas


def flatten_predictions(objectness_per_level: Sequence[Tensor],
                        deltas_per_level: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Put the head's outputs in the order of the anchors: level, then cell (row-major), then anchor.

    Args:
        objectness_per_level (sequence of L Tensor[N, A, h_l, w_l]): logits.
        deltas_per_level (sequence of L Tensor[N, A*4, h_l, w_l]): box deltas.

    Returns:
        (Tensor[N, T], Tensor[N, T, 4]): prediction ``t`` of an image belongs to anchor ``t``
        of ``torch.cat(AnchorGenerator.anchors_per_level(...))``.
    """
    flat_objectness, flat_deltas = [], []
    for objectness, deltas in zip(objectness_per_level, deltas_per_level):
        n, a, h, w = objectness.shape
        # (N, A, h, w) -> (N, h, w, A) -> (N, h*w*A)
        flat_objectness.append(objectness.permute(0, 2, 3, 1).reshape(n, -1))
        # (N, A*4, h, w) -> (N, A, 4, h, w) -> (N, h, w, A, 4) -> (N, h*w*A, 4)
        flat_deltas.append(deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    # L x (N, h_l*w_l*A) -> (N, T) and L x (N, h_l*w_l*A, 4) -> (N, T, 4)
    return torch.cat(flat_objectness, dim=1), torch.cat(flat_deltas, dim=1)


# ----------------------------------------------------------------------------------------------
# The region proposal network
# ----------------------------------------------------------------------------------------------


class RegionProposalNetwork(nn.Module):
    """Anchors + head -> proposals for every image, and the two RPN losses in training.

    Args (torchvision's names and defaults of ``maskrcnn_resnet50_fpn``):
        anchor_generator (AnchorGenerator): the anchors of every level.
        head (RPNHead): its ``num_anchors`` must equal the anchors per location of every level.
        fg_iou_thresh (float): an anchor whose IoU with a gt box is ``>=`` this is positive.
        bg_iou_thresh (float): an anchor whose IoU with every gt box is ``<`` this is negative.
        batch_size_per_image (int): anchors sampled per image for the losses.
        positive_fraction (float): largest share of positives among them.
        pre_nms_top_n (dict): ``{"training": ..., "testing": ...}``, anchors kept *per level*
            (by objectness) before NMS.
        post_nms_top_n (dict): ``{"training": ..., "testing": ...}``, proposals kept per image
            after NMS.
        nms_thresh (float): IoU above which NMS suppresses a lower-scored proposal.
        score_thresh (float): proposals whose objectness probability is below this are dropped.

    The matcher always allows low-quality matches (every gt box gets its best anchors), as in
    torchvision's RPN.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: Mapping[str, int] = {"training": 2000, "testing": 1000},  # copied, never modified
        post_nms_top_n: Mapping[str, int] = {"training": 2000, "testing": 1000},
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        if set(anchor_generator.num_anchors_per_location()) != {head.num_anchors}:
            raise ValueError(f"head: expected as many anchors per location on every level as the head "
                             f"predicts ({head.num_anchors}), got "
                             f"{anchor_generator.num_anchors_per_location()} from the anchor generator")
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_top_n = _check_mode_pair("pre_nms_top_n", pre_nms_top_n)
        self.post_nms_top_n = _check_mode_pair("post_nms_top_n", post_nms_top_n)
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = MIN_PROPOSAL_SIZE

    def extra_repr(self) -> str:
        return (f"{self.proposal_matcher}, {self.fg_bg_sampler},\npre_nms_top_n={self.pre_nms_top_n}, "
                f"post_nms_top_n={self.post_nms_top_n}, nms_thresh={self.nms_thresh}, "
                f"score_thresh={self.score_thresh}")

    def for_mode(self, setting: Mapping[str, int]) -> int:
        """The training or the testing value of a setting, by the module's mode (``.train()``/``.eval()``)."""
        return setting["training" if self.training else "testing"]

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        features: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals for every image; the losses too in training mode.

        Args:
            images (Tensor[N, 3, H, W]): the padded batch (only its size is used: it places the anchors).
            image_sizes (list of N (int, int)): ``(height, width)`` of every image before padding.
            features (dict[str, Tensor[N, C, h_l, w_l]]): the pyramid, finest level first
                (``p2`` ... ``p6``).
            targets (list of N dicts, training only): ``"boxes"``: Float[M, 4] ``(x1, y1, x2, y2)``
                inside the image, with positive width and height (M may be 0: a background
                image); ``"labels"`` (optional here): Int64[M].

        Returns:
            proposals (list of N Tensor[K_i, 4]): ``(x1, y1, x2, y2)``, best objectness first,
            without gradient.
            losses (dict): ``{"loss_objectness", "loss_rpn_box_reg"}`` (scalars) in training
            mode, ``{}`` in eval mode.

        Raises:
            ValueError: bad images, image sizes or features; in training, missing or bad
                targets (naming the image index and the field).
        """
        feature_maps = _check_inputs(images, image_sizes, features)
        if self.training:
            check_targets(targets, image_sizes)

        pred_objectness_per_level, pred_deltas_per_level = self.head(feature_maps)
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        anchors_per_level = self.anchor_generator.anchors_per_level(
            tuple(images.shape[-2:]), grid_sizes, feature_maps[0].dtype, feature_maps[0].device)
        anchors = torch.cat(anchors_per_level)  # L x (h_l*w_l*A, 4) -> (T, 4)
        num_anchors_per_level = [len(a) for a in anchors_per_level]
        pred_objectness, pred_deltas = flatten_predictions(pred_objectness_per_level, pred_deltas_per_level)

        # No gradient flows through the proposals: the box head takes them as given boxes
        # (Faster R-CNN's "approximate joint training"). (N, T, 4) deltas with (T, 4) anchors -> (N, T, 4)
        proposals = self.box_coder.decode(pred_deltas.detach(), anchors)
        proposals, _ = self.filter_proposals(proposals, pred_objectness.detach(), image_sizes,
                                             num_anchors_per_level)

        losses = {}
        if self.training:
            gt_boxes = [target["boxes"].to(anchors) for target in targets]
            matched_idxs = self.match_anchors(anchors, gt_boxes)
            losses = self.compute_loss(pred_objectness, pred_deltas, anchors, gt_boxes, matched_idxs)
        return proposals, losses

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: Sequence[tuple[int, int]],
                         num_anchors_per_level: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
        """From every anchor's decoded box to a few good, distinct proposals per image.

        Args:
            proposals (Tensor[N, T, 4]): decoded boxes, one per anchor.
            objectness (Tensor[N, T]): logits, one per anchor.
            image_sizes (list of N (int, int)): ``(height, width)`` to clip to.
            num_anchors_per_level (list of L int): ``h_l * w_l * A``, to split T into levels.

        Returns:
            (list of N Tensor[K_i, 4], list of N Tensor[K_i]): proposals and their objectness
            probabilities, best first.

        Steps, with torchvision's values: top ``pre_nms_top_n`` per level by logit (all images
        at once; ties as ``torch.topk`` decides, see the module docstring) -> sigmoid -> per
        image: clip -> drop boxes smaller than ``min_size`` -> drop probabilities below
        ``score_thresh`` -> NMS within each level -> the best ``post_nms_top_n``.
        """
        num_images = proposals.shape[0]
        device = proposals.device
        pre_nms_top_n, post_nms_top_n = self.for_mode(self.pre_nms_top_n), self.for_mode(self.post_nms_top_n)
        # the level of every anchor: L x (h_l*w_l*A,) -> (T,)
        levels = torch.cat([torch.full((n,), level, dtype=torch.int64, device=device)
                            for level, n in enumerate(num_anchors_per_level)])

        # 1. the best anchors of each level, for all images at once: (N, T) -> (N, k) indices into T
        top_idx, offset = [], 0
        for objectness_of_level in objectness.split(list(num_anchors_per_level), dim=1):  # (N, h_l*w_l*A)
            k = min(pre_nms_top_n, objectness_of_level.shape[1])
            top_idx.append(objectness_of_level.topk(k, dim=1).indices + offset)
            offset += objectness_of_level.shape[1]
        top_idx = torch.cat(top_idx, dim=1)  # (N, k)
        rows = torch.arange(num_images, device=device)[:, None]  # (N, 1), broadcasts against (N, k)
        scores = torch.sigmoid(objectness[rows, top_idx])  # (N, k)
        proposals = proposals[rows, top_idx]  # (N, T, 4) -> (N, k, 4)
        levels = levels[top_idx]  # (T,) -> (N, k)

        final_boxes, final_scores = [], []
        for boxes, probs, levels_of_boxes, image_size in zip(proposals, scores, levels, image_sizes):
            # 2. clip to the image (k, 4), 3. drop (nearly) empty boxes, 4. drop low scores
            boxes = clip_boxes_to_image(boxes, image_size)
            keep = remove_small_boxes(boxes, self.min_size)
            keep = keep[probs[keep] >= self.score_thresh]
            boxes, probs, levels_of_boxes = boxes[keep], probs[keep], levels_of_boxes[keep]
            # 5. NMS within each level (a large anchor's box does not suppress a small one's), best
            # first, 6. the best post_nms_top_n
            keep = batched_nms(boxes, probs, levels_of_boxes, self.nms_thresh)[:post_nms_top_n]
            final_boxes.append(boxes[keep])
            final_scores.append(probs[keep])
        return final_boxes, final_scores

    @torch.no_grad()
    def match_anchors(self, anchors: Tensor, gt_boxes: Sequence[Tensor]) -> list[Tensor]:
        """Match the anchors of every image to its gt boxes (``Matcher`` on ``box_iou``).

        Args:
            anchors (Tensor[T, 4]): the anchors, the same for every image.
            gt_boxes (list of N Tensor[M_i, 4]): M_i may be 0 (then every anchor is background).

        Returns:
            list of N Tensor[T]: int64, a gt index or ``BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``.
        """
        return [self.proposal_matcher(box_iou(gt, anchors)) for gt in gt_boxes]

    def compute_loss(self, pred_objectness: Tensor, pred_deltas: Tensor, anchors: Tensor,
                     gt_boxes: Sequence[Tensor], matched_idxs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Sample anchors and compute ``loss_objectness`` and ``loss_rpn_box_reg``.

        Args:
            pred_objectness (Tensor[N, T]): logits.
            pred_deltas (Tensor[N, T, 4]): predicted deltas.
            anchors (Tensor[T, 4]): the anchors.
            gt_boxes (list of N Tensor[M_i, 4]): ground truth, in the dtype of the anchors.
            matched_idxs (list of N Tensor[T]): from :meth:`match_anchors`.

        Returns:
            dict with the scalars ``loss_objectness`` and ``loss_rpn_box_reg``.

        Randomness: the sampler draws from PyTorch's global generator exactly as torchvision's
        does, so with the same seed the same anchors are sampled.
        """
        num_anchors = anchors.shape[0]
        labels = [label_anchors(m) for m in matched_idxs]  # N x (T,): POSITIVE / NEGATIVE / IGNORED
        positive_masks, negative_masks = self.fg_bg_sampler(labels)

        # indices into the whole batch, (N, T) -> (N*T,): anchor t of image i is i*T + t.
        # Positives first, then negatives, as torchvision orders them.
        positive = torch.where(torch.cat(positive_masks))[0]  # (P,)
        negative = torch.where(torch.cat(negative_masks))[0]
        sampled = torch.cat([positive, negative])

        objectness_targets = torch.cat(labels).to(pred_objectness.dtype)  # N x (T,) -> (N*T,)
        loss_objectness = F.binary_cross_entropy_with_logits(
            pred_objectness.reshape(-1)[sampled], objectness_targets[sampled])  # (N, T) -> (N*T,)

        # regression targets, only where they are used: for every sampled positive, the deltas
        # that move its anchor onto its gt box (an image without gt boxes has no positives)
        matched_gt = torch.cat([gt[matched[is_positive]]  # N x (P_i, 4) -> (P, 4)
                                for gt, matched, is_positive in zip(gt_boxes, matched_idxs, positive_masks)])
        target_deltas = self.box_coder.encode(matched_gt, anchors[positive % num_anchors])  # (P, 4)
        loss_rpn_box_reg = F.smooth_l1_loss(
            pred_deltas.reshape(-1, 4)[positive],  # (N, T, 4) -> (N*T, 4) -> (P, 4)
            target_deltas, beta=SMOOTH_L1_BETA, reduction="sum") / sampled.numel()
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}


# ----------------------------------------------------------------------------------------------
# Loading torchvision weights
# ----------------------------------------------------------------------------------------------


def torchvision_rpn_key_map(torchvision_key: str) -> str:
    """Rename one key of a torchvision ``RegionProposalNetwork`` state dict to ours.

    Any prefix (``rpn.``) is kept; keys outside the head are returned unchanged::

        rpn.head.conv.0.0.weight     -> rpn.head.convs.0.weight
        head.conv.0.0.bias           -> head.convs.0.bias
        head.conv.weight             -> head.convs.0.weight    (RPNHead version 1 checkpoints)
        rpn.head.cls_logits.weight   -> rpn.head.objectness.weight
        rpn.head.bbox_pred.bias      -> rpn.head.box_deltas.bias
    """
    key = re.sub(r"(^|\.)head\.conv\.(\d+)\.0\.", r"\1head.convs.\2.", torchvision_key)
    key = re.sub(r"(^|\.)head\.conv\.(weight|bias)$", r"\1head.convs.0.\2", key)
    key = re.sub(r"(^|\.)head\.cls_logits\.", r"\1head.objectness.", key)
    return re.sub(r"(^|\.)head\.bbox_pred\.", r"\1head.box_deltas.", key)


def load_torchvision_rpn(rpn: RegionProposalNetwork, state_dict: Mapping[str, Tensor]) -> None:
    """Load the state dict of a torchvision ``RegionProposalNetwork`` into ``rpn``.

    Accepts the RPN's own keys (``head.conv.0.0.weight``, ...) or a whole Mask R-CNN state dict,
    whose RPN keys start with ``rpn.``; its other keys (``backbone.*``, ``roi_heads.*``) are
    ignored. The anchor generator has no weights.

    Raises:
        ValueError: if the architectures do not match (lists missing/unexpected keys and shape
            mismatches). Nothing is loaded in that case.
    """
    load_mapped_state_dict(rpn, state_dict, "rpn.", torchvision_rpn_key_map,
                           "a torchvision RegionProposalNetwork")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def check_targets(targets, image_sizes: Sequence[tuple[int, int]]) -> None:
    """Training targets must be one dict per image with valid ``"boxes"`` (and ``"labels"``).

    Per image ``i``: ``targets[i]["boxes"]`` a float Tensor[M, 4], finite, with ``x1 < x2`` and
    ``y1 < y2`` (zero-area boxes are refused: see ``Matcher``), inside the image
    (``0 <= x1``, ``x2 <= width``, ``0 <= y1``, ``y2 <= height``); ``targets[i]["labels"]``, if
    present, an int64 Tensor[M].

    Raises:
        ValueError: naming the image index and the field, e.g.
            ``targets[1]['boxes']: expected Float[N, 4] (x1, y1, x2, y2), got shape (3,) and dtype torch.float32``.
    """
    if not isinstance(targets, (list, tuple)) or len(targets) != len(image_sizes):
        got = "None" if targets is None else (
            f"{len(targets)} targets" if isinstance(targets, (list, tuple)) else _describe(targets))
        raise ValueError(f"targets: expected a list of {len(image_sizes)} dicts (one per image) in "
                         f"training mode, got {got}")
    for i, (target, (height, width)) in enumerate(zip(targets, image_sizes)):
        if not isinstance(target, Mapping) or "boxes" not in target:
            raise ValueError(f"targets[{i}]: expected a dict with 'boxes' (Float[N, 4]) and 'labels' "
                             f"(Int64[N]), got {_describe(target)}")
        boxes, where = target["boxes"], f"targets[{i}]['boxes']"
        if not isinstance(boxes, Tensor) or not boxes.is_floating_point() or boxes.dim() != 2 \
                or boxes.shape[1] != 4:
            raise ValueError(f"{where}: expected Float[N, 4] (x1, y1, x2, y2), got {_describe(boxes)}")
        problems = [
            (~torch.isfinite(boxes).all(dim=1), "expected finite coordinates"),
            ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
             "expected x1 < x2 and y1 < y2 (a positive width and height)"),
            ((boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height),
             f"expected boxes inside the image of (height, width) = ({height}, {width}): "
             f"0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} (clip_boxes_to_image clips them)"),
        ]
        for is_bad, expected in problems:
            bad = torch.where(is_bad)[0]
            if bad.numel() > 0:
                j = int(bad[0])
                raise ValueError(f"{where}: {expected}; got box {j} = {boxes[j].tolist()} "
                                 f"({bad.numel()} bad box(es) in this image)")
        if "labels" in target:
            labels = target["labels"]
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (len(boxes),):
                raise ValueError(f"targets[{i}]['labels']: expected Int64[{len(boxes)}] (one class per box, "
                                 f"0 = background), got {_describe(labels)}")


def _check_inputs(images, image_sizes, features) -> list[Tensor]:
    """Images (N, 3, H, W); N image sizes (h, w) within (H, W); a non-empty dict of (N, C, h, w) maps."""
    check_images("images", images)
    num_images, (height, width) = images.shape[0], images.shape[-2:]
    if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != num_images or not all(
            len(size) == 2 and 0 < size[0] <= height and 0 < size[1] <= width for size in image_sizes):
        raise ValueError(f"image_sizes: expected {num_images} (height, width) pairs, each within the padded "
                         f"size ({height}, {width}), got {image_sizes!r}")
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError(f"features: expected a dict of feature maps, finest level first, "
                         f"got {_describe(features)}")
    for name, feature in features.items():
        if not isinstance(feature, Tensor) or feature.dim() != 4 or feature.shape[0] != num_images:
            raise ValueError(f"features[{name!r}]: expected a Tensor[N, C, h, w] with N = {num_images}, "
                             f"got {_describe(feature)}")
    return list(features.values())


def _check_mode_pair(name: str, value) -> dict[str, int]:
    """A setting given for both modes: ``{"training": int > 0, "testing": int > 0}``."""
    if not isinstance(value, Mapping) or sorted(value) != sorted(MODES) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"{name}: expected dict(training=..., testing=...) with positive integers, "
                         f"got {value!r}")
    return dict(value)


def _describe(x) -> str:
    """``shape (3,) and dtype torch.float32`` for a tensor, ``a list`` for anything else."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"a {type(x).__name__}"
