"""Test-time augmentation (``test.aug``): several scales, each also flipped, merged into one result.

As detectron2's ``DatasetMapperTTA`` + ``GeneralizedRCNNWithTTA`` (and Detectron's BBOX_AUG/MASK_AUG, which
the paper's 50.9 AP system used, Sec. 5.1 'Test-time augmentation'):

1. the original image is resized to every shorter side of ``min_sizes`` (longer side capped at
   ``max_size``, the data pipeline's own ``ResizeShortestEdge``), and each is also flipped horizontally;
2. the detector runs on each; all boxes, mapped back to the original image, are merged by NMS per
   class (the model's test NMS threshold and detections per image);
3. masks (and keypoints) are predicted *for the merged boxes* on every augmentation, mapped back
   (a flipped augmentation's 28x28 masks flipped back) and averaged: mask probabilities as
   detectron2, keypoint heatmap logits (flipped ones with left and right swapped) before decoding.

Where it differs from Detectron's (the paper's): no box voting (Detectron's X-152 config sets
``BBOX_VOTE`` with threshold 0.9), each augmentation's already-NMS'd detections merged (detectron2's way;
Detectron merges every augmentation's raw boxes before one NMS), and every scale capped by the same
``max_size`` (Detectron runs its identity scale at 800/1333, the others at 2000).

Images come in at their original size (``evaluation.build_eval`` skips the loader's resize when
``test.aug`` is on) and the result is in their coordinates, as a plain forward's is in its input's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.models.detection.roi_heads import keypointrcnn_inference, maskrcnn_inference
from torchvision.ops import boxes as box_ops

from .data import ResizeShortestEdge

log = logging.getLogger(__name__)


def keypoint_flip_map(categories: Sequence[dict[str, Any]]) -> list[int] | None:
    """The keypoint permutation of a horizontal flip, from COCO categories' ``keypoints`` names
    ("left_eye" <-> "right_eye", others to themselves); None without names, or when a left/right name
    has no partner (a flipped heatmap could then not be mapped back)."""
    from .data import DataError, keypoint_flip_index

    names = next((list(c["keypoints"]) for c in categories if c.get("keypoints")), None)
    if not names:
        return None
    try:
        return keypoint_flip_index(names)  # the training flip's map: the same pairs in both
    except DataError:
        return None


def _flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """xyxy boxes [N, 4] mirrored in an image of ``width`` pixels."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class TestTimeAug:
    """Predict with test-time augmentation: ``tta(model, images)`` for float images [3, H, W] (0-255, as the
    model takes them) returns what ``model(images)`` returns, per image ``boxes`` [N, 4] (xyxy, input pixels),
    ``labels`` [N], ``scores`` [N] and, as the model has them, ``masks`` [N, 1, 28, 28] probabilities or
    ``keypoints`` [N, K, 3] and ``keypoints_scores`` [N, K]."""

    def __init__(self, *, min_sizes: Sequence[int], max_size: int, flip: bool = True,
                 keypoint_flip: Sequence[int] | None = None) -> None:
        if not min_sizes:
            raise ValueError("test.aug_min_sizes: give at least one size")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.flip = bool(flip)
        self.keypoint_flip = None if keypoint_flip is None else list(keypoint_flip)
        self._warned = False

    def __call__(self, model: nn.Module, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [self.predict(model, image) for image in images]

    def resize(self, image: Tensor, min_size: int) -> Tensor:
        """[3, H, W] float 0-255 -> [3, h, w] float, resized exactly as the test loader resizes (uint8 pixels,
        antialiased), so that one size without flip gives the plain evaluation's input."""
        pixels = image.round().clamp(0, 255).to(torch.uint8)
        resize = ResizeShortestEdge([min_size], self.max_size)
        params = resize.make_params([tv_tensors.Image(pixels)])
        if params["unchanged"]:
            return image
        return resize.transform(tv_tensors.Image(pixels), params).as_subclass(Tensor).float()

    def augmented(self, image: Tensor) -> list[list[tuple[Tensor, bool]]]:
        """Per size, the images run together: the resized image and, with ``flip``, its mirror."""
        groups = []
        for size in self.min_sizes:
            resized = self.resize(image, size)
            groups.append([(resized, False)] + ([(resized.flip(-1), True)] if self.flip else []))
        return groups

    @torch.no_grad()
    def predict(self, model: nn.Module, image: Tensor) -> dict[str, Tensor]:
        """One image [3, H, W] -> its merged detections (see the class docstring)."""
        height, width = image.shape[-2:]
        groups = self.augmented(image)
        boxes, scores, labels = [], [], []
        for group in groups:
            outputs = model([im for im, _ in group])
            for (im, flipped), out in zip(group, outputs):
                boxes.append(self._to_original(out["boxes"].float(), im.shape[-2:], flipped, (height, width)))
                scores.append(out["scores"].float())
                labels.append(out["labels"])
        boxes_all, scores_all, labels_all = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        heads = model.roi_heads
        keep = box_ops.batched_nms(boxes_all, scores_all, labels_all, heads.nms_thresh)[: heads.detections_per_img]
        result = {"boxes": boxes_all[keep], "labels": labels_all[keep], "scores": scores_all[keep]}
        if heads.has_mask() or heads.has_keypoint():
            result.update(self._instance_outputs(model, groups, result, (height, width)))
        return result

    @staticmethod
    def _to_original(boxes: Tensor, size: Any, flipped: bool, orig: tuple[int, int]) -> Tensor:
        h, w = int(size[0]), int(size[1])
        if flipped:
            boxes = _flip_boxes(boxes, w)
        scale = boxes.new_tensor([orig[1] / w, orig[0] / h, orig[1] / w, orig[0] / h])
        return boxes * scale if (h, w) != tuple(orig) else boxes

    @staticmethod
    def _to_augmented(boxes: Tensor, size: Any, flipped: bool, orig: tuple[int, int]) -> Tensor:
        h, w = int(size[0]), int(size[1])
        if (h, w) != tuple(orig):
            boxes = boxes * boxes.new_tensor([w / orig[1], h / orig[0], w / orig[1], h / orig[0]])
        return _flip_boxes(boxes, w) if flipped else boxes

    def _instance_outputs(self, model: nn.Module, groups: list[list[tuple[Tensor, bool]]], result: dict[str, Tensor],
                          orig: tuple[int, int]) -> dict[str, Tensor]:
        """Masks and keypoints of the merged boxes, averaged over the augmentations."""
        heads = model.roi_heads
        boxes, labels = result["boxes"], result["labels"]
        mask_sum: Tensor | None = None
        heatmap_sum: Tensor | None = None
        n_masks = n_heatmaps = 0
        use_flipped_keypoints = self.keypoint_flip is not None
        if heads.has_keypoint() and self.flip and not use_flipped_keypoints and not self._warned:
            log.warning("test.aug: no left/right keypoint names to map flipped heatmaps back; keypoints are averaged "
                        "over the unflipped sizes only")
            self._warned = True
        if len(boxes):
            for group in groups:
                image_list, _ = model.transform([im for im, _ in group])
                features = model.backbone(image_list.tensors)
                shapes = image_list.image_sizes
                aug_boxes = [self._to_augmented(boxes, im.shape[-2:], flipped, orig) for im, flipped in group]
                if heads.has_mask():
                    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, aug_boxes, shapes)))
                    for (_, flipped), probs in zip(group, maskrcnn_inference(logits, [labels] * len(group))):
                        probs = probs.float()
                        probs = probs.flip(-1) if flipped else probs
                        mask_sum = probs if mask_sum is None else mask_sum + probs
                        n_masks += 1
                if heads.has_keypoint():
                    x = heads.keypoint_roi_pool(features, aug_boxes, shapes)
                    maps = heads.keypoint_predictor(heads.keypoint_head(x)).float().split(len(boxes))
                    for (_, flipped), m in zip(group, maps):
                        if flipped and not use_flipped_keypoints:
                            continue
                        if flipped:
                            # Mirrored back, and a left keypoint's heatmap is the flipped image's right one.
                            m = m.flip(-1)[:, self.keypoint_flip]
                        heatmap_sum = m if heatmap_sum is None else heatmap_sum + m
                        n_heatmaps += 1
        out: dict[str, Tensor] = {}
        if heads.has_mask():
            size = 2 * int(heads.mask_roi_pool.output_size[0])  # the mask predictor's 2x upsampling of the RoI
            out["masks"] = mask_sum / n_masks if mask_sum is not None else boxes.new_zeros((0, 1, size, size))
        if heads.has_keypoint():
            if heatmap_sum is None:
                k = heads.keypoint_predictor.kps_score_lowres.out_channels
                out["keypoints"], out["keypoints_scores"] = boxes.new_zeros((0, k, 3)), boxes.new_zeros((0, k))
            else:
                kps, kp_scores = keypointrcnn_inference(heatmap_sum / n_heatmaps, [boxes])
                out["keypoints"], out["keypoints_scores"] = kps[0], kp_scores[0]
        return out
