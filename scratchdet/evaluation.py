"""COCO evaluation with faster-coco-eval (pycocotools' numbers, computed faster).

Every AP that scratchdet reports is scored by ``_score`` (behind ``evaluate_coco_types`` and
``evaluate_model``); a test checks it against the 24 numbers cocoapi itself prints for its fake
results (``shared/data/cocoapi_val2014_100``), and ``benchmarks/eval_speed.py`` against pycocotools
on a COCO-sized result set.

Scoring a results file needs neither torch nor the model: they are imported where inference needs
them, so ``scratchdet eval --results`` does not spend seconds importing them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faster_coco_eval.core.mask as mask_utils
import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize(), named as detectron2 names the first six.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# Keypoint AP's 10 numbers (COCOeval's summarize for keypoints: no small bucket, one maxDets of 20).
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm", "keypoints")
# COCO's per-keypoint OKS sigmas for its 17 person keypoints (pycocotools' Params), in COCO's order.
COCO_PERSON_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                         "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                         "right_knee", "left_ankle", "right_ankle")
COCO_OKS_SIGMAS = (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
# Any other keypoint layout: one sigma for every keypoint, about COCO's smaller ones (their mean is 0.067 after /10).
DEFAULT_OKS_SIGMA = 0.05
# What each model.task is scored on: Faster R-CNN boxes only; Mask R-CNN boxes and masks; Keypoint
# R-CNN boxes (its person detections) and keypoints (OKS), as detectron2's COCOEvaluator does.
TASK_IOU_TYPES = {"masks": ("bbox", "segm"), "boxes": ("bbox",), "keypoints": ("bbox", "keypoints")}


@contextlib.contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """Python's cycle collector runs every few hundred new containers and, as they pile up, walks all
    of them again: reading and indexing half a million detections took about twice as long with it on.
    What is built here (dicts, lists, strings) forms no cycles for it to find."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_gt(annotations: str | Path) -> COCO:
    """COCO ground truth, loaded quietly."""
    with contextlib.redirect_stdout(io.StringIO()), _cycle_collector_paused():
        return COCO(str(annotations))


def read_results(path: str | Path) -> list[dict]:
    """A COCO results file: a JSON list of detections."""
    with open(path) as f, _cycle_collector_paused():
        results = json.load(f)
    if not isinstance(results, list):
        raise ValueError(f"{path} is not a COCO results file (a JSON list of detections)")
    return results


def evaluate_coco(gt: COCO | str | Path, results: list[dict] | str | Path, iou_type: str,
                  img_ids: Iterable[int] | None = None) -> tuple[dict[str, float], str]:
    """Score COCO-format results; returns ``{"AP": ..., ...}`` in percent and the summary text.

    With no results every number is 0 (COCO's loader refuses an empty list).
    """
    return evaluate_coco_types(gt, results, (iou_type,), img_ids=img_ids)[iou_type]


def evaluate_coco_types(gt: COCO | str | Path, results: list[dict] | str | Path, iou_types: Sequence[str] | None = None,
                        img_ids: Iterable[int] | None = None) -> dict[str, tuple[dict[str, float], str]]:
    """Score results for several iou types from one loading of ground truth and results:
    ``{"bbox": (stats, text), "segm": (stats, text)}``, each as ``evaluate_coco`` returns it.

    ``iou_types=None`` scores every type the results carry (``results_iou_types``).  The caller's
    detection dicts are left as they were (the scoring works on copies).
    """
    _check_iou_types(iou_types or ())
    if isinstance(results, (str, Path)):
        results = read_results(results)  # ours alone: no copy needed
    else:
        with _cycle_collector_paused():
            results = [dict(r) for r in results]
    gt = gt if isinstance(gt, COCO) else load_gt(gt)
    return _score(gt, results, results_iou_types(results) if iou_types is None else tuple(iou_types), img_ids)


def _check_iou_types(iou_types: Iterable[str]) -> None:
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")


def results_iou_types(results: list[dict]) -> tuple[str, ...]:
    """The iou types results can be scored for: ``bbox`` for boxes, ``segm`` for masks, ``keypoints`` for keypoints."""
    if not results:
        return ("bbox",)
    return tuple(t for t, key in (("bbox", "bbox"), ("segm", "segmentation"), ("keypoints", "keypoints"))
                 if key in results[0]) or ("bbox",)


def stat_names(iou_type: str) -> tuple[str, ...]:
    """The names of COCOeval's summary numbers for ``iou_type``: 12, or 10 for keypoints."""
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


def oks_sigmas(gt: COCO) -> list[float]:
    """The OKS sigma of each keypoint of the ground truth's layout: COCO's for its 17 person keypoints, else
    ``DEFAULT_OKS_SIGMA`` for each (detectron2 asks for TEST.KEYPOINT_OKS_SIGMAS instead)."""
    names = next((c["keypoints"] for c in gt.dataset["categories"] if c.get("keypoints")), None)
    if names is None:
        raise ValueError("keypoint AP needs ground truth whose categories list 'keypoints' (COCO person keypoints)")
    if tuple(names) == COCO_PERSON_KEYPOINTS:
        return [s / 10 for s in COCO_OKS_SIGMAS]
    return [DEFAULT_OKS_SIGMA] * len(names)


def _score(gt: COCO, dts: list[dict], iou_types: tuple[str, ...],
           img_ids: Iterable[int] | None) -> dict[str, tuple[dict[str, float], str]]:
    """Score detections the caller lets us write into (ids, areas, RLEs), for each iou type in turn."""
    _check_iou_types(iou_types)
    if not dts:
        return {t: ({k: 0.0 for k in stat_names(t)},
                    "no detections: every number is 0\n") for t in iou_types}
    if "segm" in iou_types and "segmentation" not in dts[0]:
        raise ValueError("segm needs results with masks ('segmentation'); these have none")
    if "keypoints" in iou_types and "keypoints" not in dts[0]:
        raise ValueError("keypoints needs results with 'keypoints'; these have none")
    img_ids = None if img_ids is None else sorted(img_ids)
    scored = {}
    with _cycle_collector_paused():
        dt = _results_coco(gt, dts)
        for iou_type in iou_types:
            _set_areas(dts, iou_type)
            scored[iou_type] = _summarize(gt, dt, iou_type, img_ids)
    return scored


def _results_coco(gt: COCO, dts: list[dict]) -> COCO:
    """What COCO's ``gt.loadRes(dts)`` builds from boxes and RLE masks (ids 1..N in order, no crowd, the
    ground truth's images and categories), built once for every iou type and without loadRes's work per
    detection: for masks it parses each RLE string twice (area, box), and scoring a second iou type
    would repeat it all.  Areas are set per iou type by ``_set_areas``."""
    unknown = {d["image_id"] for d in dts}.difference(gt.imgs)
    if unknown:
        raise ValueError(f"results name {len(unknown)} image id(s) that the ground truth does not have, "
                         f"e.g. {sorted(unknown)[:5]}")
    for i, d in enumerate(dts, start=1):
        d["id"] = i
        d["iscrowd"] = 0
    res = COCO()
    res.dataset = {"info": copy.deepcopy(gt.dataset.get("info", {})), "images": list(gt.dataset["images"]),
                   "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": dts}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _set_areas(dts: list[dict], iou_type: str) -> None:
    """Each detection's area, which picks its small/medium/large bucket, as pycocotools' loadRes gives it.

    loadRes takes a detection's area from its box when it has one, else from its mask.  For segm that
    would put masks in buckets by box areas, so segm always uses mask areas (detectron2 drops the boxes
    of its segm results for this reason); a box-less result set scored as bbox gets the masks' boxes.
    """
    if iou_type in ("bbox", "keypoints") and "bbox" in dts[0]:
        # loadRes takes keypoint results with a box down its box branch too: area = w * h.
        for d in dts:
            box = d["bbox"]
            d["area"] = box[2] * box[3]
        return
    if iou_type == "keypoints":
        # loadRes's keypoints branch (results without boxes): the box and area of the keypoints' extent.
        for d in dts:
            xs, ys = d["keypoints"][0::3], d["keypoints"][1::3]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            d["area"] = (x1 - x0) * (y1 - y0)
            d["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        return
    # One call for all masks: mask_utils parses an RLE string per call, and the call costs more than the area.
    segms = [d["segmentation"] for d in dts]
    for d, area in zip(dts, mask_utils.area(segms).tolist()):
        d["area"] = area
    if iou_type == "bbox":
        for d, box in zip(dts, mask_utils.toBbox(segms)):
            d["bbox"] = box


def _summarize(gt: COCO, dt: COCO, iou_type: str, img_ids: list[int] | None) -> tuple[dict[str, float], str]:
    lines: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()):
        sigmas = oks_sigmas(gt) if iou_type == "keypoints" else None
        ev = COCOeval_faster(gt, dt, iou_type, print_function=lines.append, kpt_oks_sigmas=sigmas)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = stat_names(iou_type)
    stats = {name: float(v) * 100 for name, v in zip(names, ev.stats[:len(names)])}
    text = "\n".join(line for line in lines if "Average" in line) + "\n"
    return stats, text


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, label_to_cat_id: dict[int, int]) -> list[dict]:
    """One image's pasted detections -> COCO result dicts (xywh boxes, RLE masks, keypoints [x, y, v] * K from
    ``keypoints`` [N, K, 3], COCO category ids)."""
    boxes = output["boxes"].float().cpu().numpy().tolist()
    scores = output["scores"].float().cpu().numpy().tolist()
    labels = output["labels"].cpu().numpy().tolist()
    rles: list[dict] = []
    keypoints = None
    if "keypoints" in output:
        # The model's keypoints are continuous coordinates; COCO's are pixel indices: - 0.5, the inverse of the
        # + 0.5 CocoDetection adds (detectron2's instances_to_coco_json). Visibility 1: predicted (torchvision's).
        kps = output["keypoints"].float().cpu().clone()  # [N, K, 3]
        kps[..., :2] -= 0.5
        kps[..., 2] = 1.0
        keypoints = [[round(v, 2) for v in row] for row in kps.flatten(1).numpy().tolist()]
    if "masks" in output and len(boxes):
        # One encode call for the image's masks, read in the Fortran (H, W, N) order the encoder walks.
        # paste_detections lays its masks out so: no copy here, where a C-ordered [N, H, W] mask needs two.
        masks = np.asfortranarray(output["masks"].cpu().numpy().transpose(1, 2, 0))
        rles = mask_utils.encode(masks.view(np.uint8) if masks.dtype == np.bool_ else masks.astype(np.uint8, order="F"))
    image_id = int(image_id)
    out = []
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        res = {"image_id": image_id, "category_id": int(label_to_cat_id[labels[k]]),
               "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
               "score": round(scores[k], 5)}
        if rles:
            res["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        if keypoints is not None:
            res["keypoints"] = keypoints[k]
        out.append(res)
    return out


def run_inference(model: nn.Module, loader: Iterable, *, device: torch.device, label_to_cat_id: dict[int, int],
                  amp_dtype: torch.dtype | None = None, progress: Any = None) -> tuple[list[dict], list[int]]:
    """Predict every image of ``loader``; returns COCO results and the image ids seen."""
    import torch

    from .model import paste_detections

    was_training = model.training
    model.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    test_aug = getattr(loader, "test_aug", None)  # a tta.TestTimeAug that build_eval set for test.aug
    try:
        with torch.no_grad():
            for images, targets in loader:
                batch = [im.to(device, non_blocking=True).float() for im in images]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(batch) if test_aug is None else test_aug(model, batch)
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
                   results_path: str | Path | None = None, progress: Any = None,
                   iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, float]:
    """COCO AP of a model on a loader for each of ``iou_types`` (``TASK_IOU_TYPES[task]``):
    ``{"bbox/AP": ..., "segm/AP": ...}`` in percent.

    Under torchrun each rank predicts its shard of the loader's images; rank 0 gathers the
    results, puts them in the single-process order, scores them once, and every rank returns
    the same numbers.
    """
    from . import distributed as dist

    results, image_ids = run_inference(model, loader, device=device, label_to_cat_id=label_to_cat_id,
                                       amp_dtype=amp_dtype, progress=progress)
    parts = dist.gather_to_main((results, image_ids))
    metrics: dict[str, float] | None = None
    if parts is not None:
        results, image_ids = merge_shards(parts)
        if results_path is not None:
            with open(results_path, "w") as f:
                json.dump(results, f)
        metrics = {}
        # The results are ours, and written out already: both types are scored on them in place.
        for iou_type, (stats, _) in _score(gt, results, tuple(iou_types), image_ids).items():
            metrics.update({f"{iou_type}/{k}": round(v, 4) for k, v in stats.items()})
    return dist.broadcast(metrics)


def evaluate_model_voc(model: torch.nn.Module, loader: Iterable, *, gt: Any, device: torch.device,
                       amp_dtype: torch.dtype | None = None, results_path: str | Path | None = None,
                       progress: Any = None) -> tuple[dict[str, float], str]:
    """VOC mAP of a model on a VOC loader (``voc_metrics``: both metrics, per class and mean) and the tables.

    As ``evaluate_model``: under torchrun each rank predicts its shard, rank 0 scores the merged
    results once, every rank returns the same. Results are COCO-style dicts whose category id is the label
    (VOC has no ids; ``gt`` is built with the training set's ``class_names``, so label k is the same class).
    """
    from . import distributed as dist
    from .voc import voc_metrics

    identity = {k: k for k in range(1, gt.num_classes + 1)}
    results, image_ids = run_inference(model, loader, device=device, label_to_cat_id=identity, amp_dtype=amp_dtype,
                                       progress=progress)
    parts = dist.gather_to_main((results, image_ids))
    scored = None
    if parts is not None:
        results, image_ids = merge_shards(parts)
        if results_path is not None:
            with open(results_path, "w") as f:
                json.dump(results, f)
        scored = voc_metrics(gt, results, image_ids)
    return dist.broadcast(scored)


def ap_line(metrics: dict[str, Any]) -> str:
    """``bbox/AP 43.76  segm/AP 41.27``: the AP of every type the metrics hold (``voc/mAP07  voc/mAP`` for VOC)."""
    return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                     if k.endswith(("/AP", "/mAP", "/mAP07")) and v is not None) or "no AP"


def merge_shards(parts: list[tuple[list[dict], list[int]]]) -> tuple[list[dict], list[int]]:
    """Rank r predicted images r, r + W, r + 2W, ... (``data.test_loader``): interleave them back."""
    by_image: dict[int, list[dict]] = {}
    for results, _ in parts:
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
    order = [ids[i] for i in range(max(len(ids) for _, ids in parts)) for _, ids in parts if i < len(ids)]
    return [r for image_id in order for r in by_image.get(image_id, [])], order


# --------------------------------------------------------------------------- per-image matches
#
# COCO's AP is not a mean over images, so its sampling error cannot be read off per-image numbers: an image's
# detections enter every category's precision/recall curve.  ``per_image_matches`` runs the evaluator once and keeps,
# per category, what COCO's accumulate reads; a run's final evaluation writes them into metrics.jsonl
# (``matches_record``), from which ``analysis/bootstrap.py`` resamples images and seeds.


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections over all images, in COCO's accumulate order (score descending, stable)."""

    image: np.ndarray  # [D] index into Matches.img_ids of each detection's image
    score: np.ndarray  # [D]
    tp: np.ndarray  # [T, D] bool: matched and not ignored, per IoU threshold
    fp: np.ndarray  # [T, D] bool: unmatched and not ignored


@dataclass(frozen=True)
class Matches:
    """What COCO's accumulate needs from one run's evaluation, per (category, image)."""

    iou_type: str
    img_ids: np.ndarray  # [I] the ground truth's image ids, sorted
    cat_ids: np.ndarray  # [K]
    iou_thrs: np.ndarray  # [T]
    rec_thrs: np.ndarray  # [R]
    npig: np.ndarray  # [K, I] non-ignored ground truth per category and image
    categories: tuple[CategoryMatches, ...]  # [K]


def per_image_matches(gt: COCO | str | Path, results: list[dict] | str | Path, iou_type: str) -> Matches:
    """Evaluate results once (COCO's IoU thresholds, area 'all', its AP's maxDets) and keep the per-image matches."""
    _check_iou_types((iou_type,))
    gt = gt if isinstance(gt, COCO) else load_gt(gt)
    dts = read_results(results) if isinstance(results, (str, Path)) else [dict(r) for r in results]
    if dts and iou_type == "segm" and "segmentation" not in dts[0]:
        raise ValueError("segm needs results with masks ('segmentation'); these have none")
    dt = _results_coco(gt, dts)
    if dts:
        _set_areas(dts, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        sigmas = oks_sigmas(gt) if iou_type == "keypoints" else None
        # separate_eval keeps the per-image evaluations (faster-coco-eval's evalImgs); the default fuses them
        # into accumulate and drops them.
        ev = COCOeval_faster(gt, dt, iou_type, print_function=lambda *_: None, kpt_oks_sigmas=sigmas,
                             separate_eval=True)
        p = ev.params
        if p.areaRngLbl[0] != "all":
            raise RuntimeError(f"faster-coco-eval's first area range is {p.areaRngLbl[0]!r}, not 'all'")
        # AP reads area 'all' only: the other ranges would be evaluated for nothing.
        p.areaRng, p.areaRngLbl = p.areaRng[:1], p.areaRngLbl[:1]
        ev.evaluate()
    img_ids, cat_ids = np.asarray(p.imgIds, dtype=np.int64), np.asarray(p.catIds, dtype=np.int64)
    num_t, num_i, max_det = len(p.iouThrs), len(img_ids), p.maxDets[-1]
    evals = ev._evalImgs_cpp
    if len(evals) != len(cat_ids) * num_i:
        raise RuntimeError(f"faster-coco-eval returned {len(evals)} image evaluations, expected "
                           f"{len(cat_ids)} categories x {num_i} images: its layout has changed")
    npig = np.zeros((len(cat_ids), num_i), dtype=np.int64)
    categories = []
    for k in range(len(cat_ids)):
        images, scores, matched, ignored = [], [], [], []
        for i in range(num_i):
            # The C++ ImageEvaluation is opaque but pickles: (detection matches [T*D] (gt id, 0 = none),
            # gt matches, detection scores [D], gt ignores [G], detection ignores [T*D], matched pairs),
            # with detections sorted by score and cut at maxDets as pycocotools' evaluateImg leaves them.
            dtm, _, score, gt_ignore, dt_ignore, _ = evals[k * num_i + i].__getstate__()
            npig[k, i] = len(gt_ignore) - sum(gt_ignore)
            d = min(len(score), max_det)
            if d:
                images.append(np.full(d, i, dtype=np.int64))
                scores.append(np.asarray(score[:d], dtype=np.float64))
                n = len(score)
                matched.append(np.asarray(dtm, dtype=np.uint64).reshape(num_t, n)[:, :d] != 0)
                ignored.append(np.asarray(dt_ignore, dtype=bool).reshape(num_t, n)[:, :d])
        if images:
            score = np.concatenate(scores)
            # accumulate's order: images concatenated in id order, then a stable sort by score.
            order = np.argsort(-score, kind="mergesort")
            m, ig = np.concatenate(matched, axis=1)[:, order], np.concatenate(ignored, axis=1)[:, order]
            categories.append(CategoryMatches(np.concatenate(images)[order], score[order], m & ~ig, ~m & ~ig))
        else:
            categories.append(CategoryMatches(np.zeros(0, np.int64), np.zeros(0), np.zeros((num_t, 0), bool),
                                              np.zeros((num_t, 0), bool)))
    return Matches(iou_type, img_ids, cat_ids, np.asarray(p.iouThrs, dtype=np.float64),
                   np.asarray(p.recThrs, dtype=np.float64), npig, tuple(categories))


def matches_record(matches: Matches) -> dict:
    """``matches`` as JSON-safe values, for the final evaluation's record in ``metrics.jsonl`` (the run's
    one record: a report bootstraps from it without the validation set or the results file)."""
    bits = (1 << np.arange(len(matches.iou_thrs), dtype=np.int64))[:, None]  # a detection's flags per threshold

    def category(c: CategoryMatches) -> dict:
        return {"image": c.image.tolist(), "score": [round(float(v), 6) for v in c.score],
                "tp": (c.tp * bits).sum(0).tolist(), "fp": (c.fp * bits).sum(0).tolist()}

    return {"iou_type": matches.iou_type, "img_ids": matches.img_ids.tolist(), "cat_ids": matches.cat_ids.tolist(),
            "iou_thrs": matches.iou_thrs.tolist(), "rec_thrs": matches.rec_thrs.tolist(),
            "npig": matches.npig.tolist(), "categories": [category(c) for c in matches.categories]}


def matches_from_record(record: dict) -> Matches:
    """The inverse of ``matches_record`` (the detections keep their stored order: COCO's accumulate order)."""
    num_t = len(record["iou_thrs"])
    bits = (1 << np.arange(num_t, dtype=np.int64))[:, None]

    def category(c: dict) -> CategoryMatches:
        tp, fp = np.asarray(c["tp"], dtype=np.int64), np.asarray(c["fp"], dtype=np.int64)
        return CategoryMatches(np.asarray(c["image"], dtype=np.int64), np.asarray(c["score"], dtype=np.float64),
                               (tp[None] & bits) != 0, (fp[None] & bits) != 0)

    return Matches(record["iou_type"], np.asarray(record["img_ids"], dtype=np.int64),
                   np.asarray(record["cat_ids"], dtype=np.int64), np.asarray(record["iou_thrs"], dtype=np.float64),
                   np.asarray(record["rec_thrs"], dtype=np.float64),
                   np.asarray(record["npig"], dtype=np.int64).reshape(len(record["cat_ids"]), len(record["img_ids"])),
                   tuple(category(c) for c in record["categories"]))


def matches_line(gt: COCO, results: str | Path, iou_types: Sequence[str]) -> dict[str, dict]:
    """The per-image matches of every type, as the final evaluation's record holds them."""
    return {t: matches_record(per_image_matches(gt, results, t)) for t in iou_types}


# --------------------------------------------------------------------------- a run's validation set

COCO_RESULTS = "coco_instances_results.json"


def build_eval(cfg: Any, val: tuple[str, str] | None, *, rank: int = 0, world_size: int = 1,
               class_names: list[str] | None = None) -> tuple[Any, Any] | tuple[None, None]:
    """The validation loader (test-time resize, no flip; this rank's shard) and its ground truth: COCO's,
    or for ``data.val.format: voc`` the VocDetection itself (read with the training set's ``class_names``)."""
    from .data import CocoDetection, build_transforms, test_loader
    from .voc import load_voc

    if val is None:
        return None, None
    transforms = None if cfg.test.aug else build_transforms(
        train=False, min_sizes=[cfg.data.min_size_test], max_size=cfg.data.max_size_test, flip_prob=0)
    voc = cfg.data.val.format == "voc"
    dataset = load_voc(val[0], val[1], class_names=class_names, transforms=transforms) if voc else \
        CocoDetection(images=val[0], annotations=val[1], transforms=transforms, task=cfg.model.task)
    loader = test_loader(dataset, batch_size=cfg.test.ims_per_batch, num_workers=cfg.dataloader.num_workers,
                         max_images=cfg.test.max_images, rank=rank, world_size=world_size)
    gt = dataset if voc else load_gt(val[1])
    if cfg.test.aug:
        # Test-time augmentation resizes each original image itself; run_inference predicts through it.
        from .tta import TestTimeAug, keypoint_flip_map

        loader.test_aug = TestTimeAug(min_sizes=cfg.test.aug_min_sizes, max_size=cfg.test.aug_max_size,
                                      flip=cfg.test.aug_flip,
                                      keypoint_flip=None if voc else keypoint_flip_map(gt.dataset["categories"]))
    return loader, gt


class RunEvaluation(NamedTuple):
    """What ``evaluate_run`` gives: the numbers (every rank), VOC's per-class tables, and COCO's per-image
    matches per type (rank 0, when asked: the record a report bootstraps from)."""

    metrics: dict[str, float]
    tables: str | None = None
    matches: dict[str, dict] | None = None


def evaluate_run(model: nn.Module, loader: Any, gt: Any, *, device: torch.device, dtype: torch.dtype | None,
                 out_dir: Path, task: str, label_to_cat_id: dict[int, int], voc: bool = False,
                 iteration: int | None = None, matches: bool = False, progress: bool = False) -> RunEvaluation:
    """A model's AP on a run's validation set, as training and ``scratchdet eval`` both score it: COCO AP of
    the task's types (``TASK_IOU_TYPES``), results in ``out_dir/coco_instances_results.json`` and, with
    ``matches``, their per-image matches; or for a VOC set both VOC mAPs, per class and mean, results and
    tables (headed by ``iteration``) in ``out_dir``.  Every rank predicts its shard and gets the same numbers."""
    import sys

    import torch
    from tqdm import tqdm

    from . import distributed as dist
    from .voc import VOC_RESULTS, VOC_TABLES

    dist.broadcast_buffers(model)  # every shard scored with the statistics the checkpoint holds
    with torch.no_grad(), tqdm(total=len(loader.dataset), desc="eval", leave=False, file=sys.stderr,
                               disable=not progress or not dist.is_main()) as bar:
        if not voc:
            metrics = evaluate_model(model, loader, gt=gt, device=device, label_to_cat_id=label_to_cat_id,
                                     amp_dtype=dtype, results_path=out_dir / COCO_RESULTS, progress=bar,
                                     iou_types=TASK_IOU_TYPES[task])
            found = matches_line(gt, out_dir / COCO_RESULTS, TASK_IOU_TYPES[task]) if matches and dist.is_main() \
                else None
            return RunEvaluation(metrics, None, found)
        scores, tables = evaluate_model_voc(model, loader, gt=gt, device=device, amp_dtype=dtype,
                                            results_path=out_dir / VOC_RESULTS, progress=bar)
    if dist.is_main():
        (out_dir / VOC_TABLES).write_text(tables if iteration is None else f"iteration {iteration}\n\n{tables}")
    return RunEvaluation(scores, tables)
