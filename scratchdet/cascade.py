"""Cascade R-CNN box heads (Cai and Vasconcelos, CVPR 2018) on torchvision's RoIHeads.

``model.roi_head: cascade`` replaces the detector's single box head by a sequence of stages, each
its own normalized 4conv1fc head and class-agnostic box regressor, trained at a rising foreground
IoU (0.5 / 0.6 / 0.7): each stage's input boxes are the previous stage's regressed boxes, so every
stage sees positives of the quality it is trained for.  "Rethinking ImageNet Pre-training" (Sec. 5.1,
'Enhanced baselines') uses it for its 50.9 box AP system: "We implement its Mask R-CNN version by
simply adding a mask head to the last stage".

Where choices differ among the reference implementations, this one takes:

- per-stage box coder weights (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15): Cai's Detectron port
  and detectron2's ``ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS`` (the later stages regress smaller offsets);
- stage loss weights (``model.cascade_weights``, 1 / 0.5 / 0.25 by default): Cai's
  ``CASCADE_RCNN.STAGE_WEIGHTS`` (detectron2 instead sums the stages' losses and scales the gradient
  reaching the shared features by 1 / stages);
- stage k > 0 in training: the previous stage's regressed boxes (detached, clipped, empty ones
  dropped), ground-truth boxes appended, matched at the stage's IoU and re-sampled by the seeded
  balanced sampler (detectron2 relabels the previous stage's boxes without appending or
  re-sampling; mmdetection re-samples but first drops the boxes that came from appended ground
  truth, which this keeps: at stage k up to k + 1 near-copies of a ground-truth box can be among the
  positives).  Stage 0 samples exactly as the standard head does;
- the mask head and its loss on the *last* stage's positive RoIs (the paper's wording, and Cai's
  ``MRCNN.AT_STAGE``; detectron2 trains it on the first stage's samples), its inference on the final boxes;
- inference: class scores averaged over the stages (each stage scoring its own input boxes, as
  detectron2), boxes from the last stage's regression, then torchvision's per-class NMS.

Box deltas and everything decoded from them stay fp32 under autocast (``model.FP32BoxPredictor``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import boxes as box_ops

from .layers import FP32BoxPredictor, SeededSampler, msra_fill_, normal_fill_, xavier_fill_


def stage_reg_weights(stage: int) -> tuple[float, float, float, float]:
    """Box coder weights of stage ``stage`` (0-based): detectron2's (10, 10, 5, 5) x (stage + 1), i.e. its
    three cascade stages' weights, continued linearly for longer cascades."""
    k = float(stage + 1)
    return (10.0 * k, 10.0 * k, 5.0 * k, 5.0 * k)


class AgnosticBoxPredictor(FP32BoxPredictor):
    """Class scores [N, K + 1] and one class-agnostic box delta [N, 4] per RoI, both in fp32."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes + 1)
        # Class-agnostic regression, as every Cascade R-CNN implementation (detectron2 asserts
        # CLS_AGNOSTIC_BBOX_REG): each stage refines the box, whatever the class.
        self.bbox_pred = nn.Linear(in_channels, 4)
        normal_fill_(self.cls_score, std=0.01)  # detectron2's FastRCNNOutputLayers init
        normal_fill_(self.bbox_pred, std=0.001)


def _stage_losses(class_logits: Tensor, box_deltas: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` for class-agnostic deltas [N, 4]: cross-entropy, and smooth-L1
    (beta 1/9) over the positives divided by all sampled RoIs."""
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    loss_cls = F.cross_entropy(class_logits, labels_all)
    pos = torch.where(labels_all > 0)[0]
    loss_box = F.smooth_l1_loss(box_deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / max(labels_all.numel(), 1)
    return loss_cls, loss_box


class CascadeRoIHeads(RoIHeads):
    """torchvision's RoIHeads with a cascade of box stages; ``box_head`` and ``box_predictor`` are
    ModuleLists (stage k at index k, as detectron2 names them).

    Training returns ``loss_classifier_stage{k}`` and ``loss_box_reg_stage{k}`` (each times the stage's
    weight) and ``loss_mask``; inference returns per image ``boxes`` [N, 4], ``labels`` [N], ``scores`` [N]
    (averaged over stages) and, with a mask head, ``masks`` [N, 1, 28, 28] probabilities.
    """

    def __init__(self, *, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 ious: Sequence[float], weights: Sequence[float], batch_size_per_image: int, positive_fraction: float,
                 score_thresh: float, nms_thresh: float, detections_per_img: int, mask_roi_pool: nn.Module | None = None,
                 mask_head: nn.Module | None = None, mask_predictor: nn.Module | None = None) -> None:
        n = len(ious)
        if not (n == len(weights) == len(box_heads) == len(box_predictors)) or n < 1:
            raise ValueError(f"cascade: {len(ious)} IoUs, {len(weights)} weights, {len(box_heads)} heads and "
                             f"{len(box_predictors)} predictors; give one of each per stage")
        if any(not 0 < iou < 1 for iou in ious):
            raise ValueError(f"cascade IoUs {list(ious)} must lie strictly between 0 and 1")
        super().__init__(box_roi_pool, nn.ModuleList(box_heads), nn.ModuleList(box_predictors), ious[0], ious[0],
                         batch_size_per_image, positive_fraction, stage_reg_weights(0), score_thresh, nms_thresh,
                         detections_per_img, mask_roi_pool, mask_head, mask_predictor)
        self.ious = tuple(float(i) for i in ious)
        self.stage_weights = tuple(float(w) for w in weights)
        # One IoU threshold per stage with no ignored band (fg >= iou > bg), as the standard head's 0.5/0.5.
        self.stage_matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in self.ious]
        self.stage_coders = [det_utils.BoxCoder(stage_reg_weights(k)) for k in range(n)]
        # Stage 0 draws with the standard head's salt (the same RoIs as a standard model for the same
        # seeds); the later stages with their own, so their draws are not copies of stage 0's.
        self.stage_samplers = [SeededSampler(batch_size_per_image, positive_fraction, salt=2 if k == 0 else 100 + k)
                               for k in range(n)]
        self.fg_bg_sampler = self.stage_samplers[0]
        self.proposal_matcher = self.stage_matchers[0]
        self.box_coder = self.stage_coders[0]

    @property
    def num_stages(self) -> int:
        return len(self.ious)

    def extra_repr(self) -> str:
        return f"ious={self.ious}, stage_weights={self.stage_weights}"

    # ------------------------------------------------------------------ training samples

    def sample_stage(self, stage: int, proposals: list[Tensor], targets: list[dict[str, Tensor]]
                     ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Append gt boxes, match at the stage's IoU, sample: per image the sampled boxes [R, 4], matched gt
        indices [R], labels [R] (0 background) and regression targets [R, 4] for the stage's coder."""
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]
        matcher = self.stage_matchers[stage]
        matched_idxs, labels = [], []
        for boxes, gt, gt_lab in zip(proposals, gt_boxes, gt_labels):
            if gt.numel() == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=device)
                lab = torch.zeros(len(boxes), dtype=torch.int64, device=device)
            else:
                raw = matcher(box_ops.box_iou(gt, boxes))
                matched = raw.clamp(min=0)
                lab = gt_lab[matched].to(torch.int64)
                lab[raw < 0] = 0  # below the stage's IoU: background (equal thresholds leave no ignored band)
            matched_idxs.append(matched)
            labels.append(lab)
        pos, neg = self.stage_samplers[stage](labels)
        matched_gt = []
        for i, (p, n) in enumerate(zip(pos, neg)):
            keep = torch.where(p | n)[0]
            proposals[i], labels[i], matched_idxs[i] = proposals[i][keep], labels[i][keep], matched_idxs[i][keep]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt.append(gt[matched_idxs[i]])
        regression_targets = list(self.stage_coders[stage].encode(matched_gt, proposals))
        return proposals, matched_idxs, labels, regression_targets

    # ------------------------------------------------------------------ one stage

    def run_stage(self, stage: int, features: dict[str, Tensor], boxes: list[Tensor],
                  image_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Stage ``stage`` on per-image boxes: class logits [R, K + 1] and box deltas [R, 4], fp32."""
        x = self.box_roi_pool(features, boxes, image_shapes)
        x = self.box_head[stage](x)
        return self.box_predictor[stage](x)

    def decode(self, stage: int, deltas: Tensor, boxes: list[Tensor]) -> list[Tensor]:
        """The stage's regressed boxes, per image [R_i, 4], decoded in fp32 whatever the autocast state."""
        with torch.autocast(deltas.device.type, enabled=False):
            decoded = self.stage_coders[stage].decode(deltas.float(), [b.float() for b in boxes])
        return list(decoded.reshape(-1, 4).split([len(b) for b in boxes]))

    @staticmethod
    def next_proposals(boxes: list[Tensor], image_shapes: list[tuple[int, int]], *, training: bool) -> list[Tensor]:
        """A stage's regressed boxes as the next stage's input: detached (as the RPN's proposals), clipped;
        in training, empty boxes dropped (at inference every box is kept so stage scores stay aligned)."""
        out = []
        for b, shape in zip(boxes, image_shapes):
            b = box_ops.clip_boxes_to_image(b.detach(), shape)
            if training:
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            out.append(b)
        return out

    # ------------------------------------------------------------------ forward

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Training: the stage and mask losses; inference: the detections (see the class docstring)."""
        if self.has_keypoint():
            raise ValueError("the cascade head has no keypoint branch (model.roi_head cascade is for boxes and masks)")
        if self.training:
            self.check_targets(targets)
            assert targets is not None
            return [], self._forward_train(features, proposals, image_shapes, targets)
        return self._forward_test(features, proposals, image_shapes), {}

    def _forward_train(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                       targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        boxes = regressed = proposals
        for k in range(self.num_stages):
            if k > 0:
                boxes = self.next_proposals(regressed, image_shapes, training=True)
            boxes, matched_idxs, labels, targets_k = self.sample_stage(k, boxes, targets)
            class_logits, deltas = self.run_stage(k, features, boxes, image_shapes)
            loss_cls, loss_box = _stage_losses(class_logits, deltas, labels, targets_k)
            losses[f"loss_classifier_stage{k}"] = loss_cls * self.stage_weights[k]
            losses[f"loss_box_reg_stage{k}"] = loss_box * self.stage_weights[k]
            if k + 1 < self.num_stages:
                regressed = self.decode(k, deltas.detach(), boxes)
        if self.has_mask():
            # The mask head on the last stage's positive RoIs (see the module docstring).
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [b[p] for b, p in zip(boxes, pos)]
            mask_matched = [m[p] for m, p in zip(matched_idxs, pos)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                                [t["labels"] for t in targets], mask_matched)
        return losses

    def _forward_test(self, features: dict[str, Tensor], proposals: list[Tensor],
                      image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        boxes = regressed = proposals
        score_sum: Tensor | None = None
        for k in range(self.num_stages):
            if k > 0:
                boxes = self.next_proposals(regressed, image_shapes, training=False)
            class_logits, deltas = self.run_stage(k, features, boxes, image_shapes)
            probs = F.softmax(class_logits.float(), -1)
            score_sum = probs if score_sum is None else score_sum + probs
            regressed = self.decode(k, deltas, boxes)
        assert score_sum is not None
        scores = (score_sum / self.num_stages).split([len(b) for b in regressed])
        result = [self.select_detections(b, s, shape) for b, s, shape in zip(regressed, scores, image_shapes)]
        if self.has_mask():
            mask_boxes = [r["boxes"] for r in result]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probs
        return result

    def select_detections(self, boxes: Tensor, scores: Tensor, image_shape: tuple[int, int]) -> dict[str, Tensor]:
        """One image's final boxes [R, 4] and class scores [R, K + 1] -> detections, as torchvision's
        ``postprocess_detections`` (score threshold, tiny boxes out, NMS per class, top k), with one
        class-agnostic box shared by every class of an RoI."""
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        num_fg = scores.shape[1] - 1
        labels = torch.arange(1, num_fg + 1, device=scores.device).view(1, -1).expand(len(boxes), -1).reshape(-1)
        boxes = boxes[:, None, :].expand(-1, num_fg, 4).reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def make_cascade(model: nn.Module, *, ious: Sequence[float], weights: Sequence[float], fpn_channels: int,
                 conv_dims: Sequence[int], fc_dim: int, norm_layer: Callable[[int], nn.Module] | None,
                 num_classes: int) -> None:
    """Replace ``model.roi_heads`` (torchvision's, as ``build_model`` made it) by a ``CascadeRoIHeads`` with
    one ``norm_layer``-normalized conv-fc head per stage; its RoI poolers, sampling sizes, test thresholds
    and mask branch are the standard head's."""
    old = model.roi_heads
    if old.has_keypoint():
        raise ValueError("model.roi_head cascade is built for boxes and masks; keypoints use the standard head")
    heads, predictors = [], []
    for _ in ious:
        head = FastRCNNConvFCHead((fpn_channels, 7, 7), list(conv_dims), [fc_dim], norm_layer=norm_layer)
        msra_fill_(head)  # the convs, as the standard box head (model.build_model)
        for fc in (m for m in head if isinstance(m, nn.Linear)):
            xavier_fill_(fc)
        heads.append(head)
        predictors.append(AgnosticBoxPredictor(in_channels=fc_dim, num_classes=num_classes))
    sampler = old.fg_bg_sampler
    model.roi_heads = CascadeRoIHeads(
        box_roi_pool=old.box_roi_pool, box_heads=heads, box_predictors=predictors, ious=ious, weights=weights,
        batch_size_per_image=sampler.batch_size_per_image, positive_fraction=sampler.positive_fraction,
        score_thresh=old.score_thresh, nms_thresh=old.nms_thresh, detections_per_img=old.detections_per_img,
        mask_roi_pool=old.mask_roi_pool, mask_head=old.mask_head, mask_predictor=old.mask_predictor)
