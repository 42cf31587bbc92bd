"""COCO evaluation with faster-coco-eval (pycocotools' numbers, computed faster).

Every AP that scratchdet reports goes through ``evaluate_coco``; a test checks it against the
24 numbers cocoapi itself prints for its fake results (``shared/data/cocoapi_val2014_100``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faster_coco_eval.core.mask as mask_utils
import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import nn

from . import distributed as dist
from .model import paste_detections

log = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize(), named as detectron2 names the first six.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def load_gt(annotations: str | Path) -> COCO:
    """COCO ground truth, loaded quietly."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotations))


def evaluate_coco(gt: COCO | str | Path, results: list[dict] | str | Path, iou_type: str,
                  img_ids: Iterable[int] | None = None) -> tuple[dict[str, float], str]:
    """Score COCO-format results; returns ``{"AP": ..., ...}`` in percent and the summary text.

    With no results every number is 0 (COCO's loader refuses an empty list).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")
    gt = gt if isinstance(gt, COCO) else load_gt(gt)
    if isinstance(results, (str, Path)):
        with open(results) as f:
            results = json.load(f)
    if not results:
        return {k: 0.0 for k in STAT_NAMES}, "no detections: every number is 0\n"
    if iou_type == "segm":
        # COCO's loadRes takes a result's area from its bbox when it has one, and the small/medium/
        # large buckets of segm APs..ARl would then use box areas; without the bbox it takes the
        # mask's area (detectron2 drops the bbox from segm results for this reason).
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    lines: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval_faster(gt, dt, iou_type, print_function=lines.append)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {name: float(v) * 100 for name, v in zip(STAT_NAMES, ev.stats[:12])}
    text = "\n".join(line for line in lines if "Average" in line) + "\n"
    return stats, text


def infer_iou_type(results: list[dict]) -> str:
    """``segm`` for results with a ``segmentation``, else ``bbox``."""
    return "segm" if results and "segmentation" in results[0] else "bbox"


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, label_to_cat_id: dict[int, int]) -> list[dict]:
    """One image's pasted detections -> COCO result dicts (xywh boxes, RLE masks, COCO category ids)."""
    boxes = output["boxes"].float().cpu().numpy()
    scores = output["scores"].float().cpu().numpy()
    labels = output["labels"].cpu().numpy()
    rles = []
    if "masks" in output and len(boxes):
        masks = output["masks"].cpu().numpy().astype(np.uint8)  # [N, H, W]
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    out = []
    for k in range(len(boxes)):
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        res = {"image_id": int(image_id), "category_id": int(label_to_cat_id[int(labels[k])]),
               "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
               "score": round(float(scores[k]), 5)}
        if rles:
            res["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        out.append(res)
    return out


@torch.no_grad()
def run_inference(model: nn.Module, loader: Iterable, *, device: torch.device, label_to_cat_id: dict[int, int],
                  amp_dtype: torch.dtype | None = None, progress: Any = None) -> tuple[list[dict], list[int]]:
    """Predict every image of ``loader``; returns COCO results and the image ids seen."""
    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    try:
        for images, targets in loader:
            batch = [im.to(device, non_blocking=True).float() for im in images]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(batch)
            for im, out, tgt in zip(images, outputs, targets):
                out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
                pasted = paste_detections(out, tuple(im.shape[-2:]), tuple(tgt["orig_size"]))
                results.extend(to_coco_results(pasted, tgt["image_id"], label_to_cat_id))
                image_ids.append(int(tgt["image_id"]))
            if progress is not None:
                progress.update(len(images))
    finally:
        model.train(was_training)
    return results, image_ids


def evaluate_model(model: nn.Module, loader: Iterable, *, gt: COCO, device: torch.device,
                   label_to_cat_id: dict[int, int], amp_dtype: torch.dtype | None = None,
                   results_path: str | Path | None = None, progress: Any = None) -> dict[str, float]:
    """Box and mask AP of a model on a loader; ``{"bbox/AP": ..., "segm/AP": ...}`` in percent.

    Under torchrun each rank predicts its shard of the loader's images; rank 0 gathers the
    results, puts them in the single-process order, scores them once, and every rank returns
    the same numbers.
    """
    results, image_ids = run_inference(model, loader, device=device, label_to_cat_id=label_to_cat_id,
                                       amp_dtype=amp_dtype, progress=progress)
    parts = dist.gather_to_main((results, image_ids))
    metrics: dict[str, float] | None = None
    if parts is not None:
        results, image_ids = _merge_shards(parts)
        if results_path is not None:
            with open(results_path, "w") as f:
                json.dump(results, f)
        metrics = {}
        for iou_type in IOU_TYPES:
            stats, _ = evaluate_coco(gt, results, iou_type, img_ids=image_ids)
            metrics.update({f"{iou_type}/{k}": round(v, 4) for k, v in stats.items()})
    return dist.broadcast(metrics)


def _merge_shards(parts: list[tuple[list[dict], list[int]]]) -> tuple[list[dict], list[int]]:
    """Rank r predicted images r, r + W, r + 2W, ... (``data.test_loader``): interleave them back."""
    by_image: dict[int, list[dict]] = {}
    for results, _ in parts:
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
    order = [ids[i] for i in range(max(len(ids) for _, ids in parts)) for _, ids in parts if i < len(ids)]
    return [r for image_id in order for r in by_image.get(image_id, [])], order
