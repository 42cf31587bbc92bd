"""Paired bootstrap intervals for COCO AP over validation images (issue 17: is scratch behind pretrained?).

COCO's AP is not a mean over images, so its sampling error cannot be read off per-image numbers: an
image's detections enter every category's precision/recall curve.  ``per_image_matches`` runs the
evaluator once and keeps, per category, what COCO's accumulate reads (scores, matched and ignore flags
per IoU threshold, non-ignored ground truth per image); ``ap_from_matches`` redoes accumulate with each
image counted as often as a bootstrap resample draws it, and ``paired_bootstrap`` scores two runs on the
same resamples, so the interval of their difference leaves out the spread the two runs share.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from .evaluation import _check_iou_types, _results_coco, _set_areas, load_gt, oks_sigmas, read_results

# Elements of one [resamples, IoU thresholds, detections] block: bounds the memory of a category with many detections.
_BLOCK = 2_000_000


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


def ap_from_matches(matches: Matches, image_weights: np.ndarray | None = None) -> float:
    """COCO AP in percent with image i counted ``image_weights[i]`` times (all once when None)."""
    num_i = len(matches.img_ids)
    weights = np.ones(num_i) if image_weights is None else np.asarray(image_weights, dtype=np.float64)
    if weights.shape != (num_i,):
        raise ValueError(f"image_weights has shape {weights.shape}; expected ({num_i},), one per image")
    return float(_ap_batch(matches, weights[None])[0])


def _ap_batch(matches: Matches, weights: np.ndarray) -> np.ndarray:
    """AP in percent for each row of ``weights`` [B, I]: pycocotools' accumulate with weighted TP/FP counts."""
    num_b = weights.shape[0]
    rec_thrs, num_t, num_r = matches.rec_thrs, len(matches.iou_thrs), len(matches.rec_thrs)
    total = np.zeros(num_b)
    counted = np.zeros(num_b)  # categories with ground truth in each resample
    gt_counts = weights @ matches.npig.T.astype(np.float64)  # [B, K]
    for k, cat in enumerate(matches.categories):
        valid = np.flatnonzero(gt_counts[:, k] > 0)  # COCO leaves categories without ground truth out (-1)
        counted[valid] += 1
        n = len(cat.score)
        if n == 0 or len(valid) == 0:
            continue  # no detections: precision 0 at every recall, which adds nothing
        step = max(1, _BLOCK // (num_t * n))
        for start in range(0, len(valid), step):
            rows = valid[start:start + step]
            b = len(rows)
            w = weights[rows][:, cat.image][:, None, :]  # [b, 1, D]: a detection counts as often as its image
            tp = np.cumsum(w * cat.tp, axis=2)
            fp = np.cumsum(w * cat.fp, axis=2)
            rc = tp / gt_counts[rows, k][:, None, None]
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[..., ::-1], axis=2)[..., ::-1]  # accumulate's precision envelope
            # accumulate's searchsorted(rc, recThrs, 'left') per curve, batched: threshold r's first index with
            # rc >= thr[r] is how many detections pass fewer than r + 1 thresholds.  Exact comparisons, as COCO's.
            passed = np.searchsorted(rec_thrs, rc, side="right")  # [b, T, D] thresholds each rc reaches
            bins = np.arange(b * num_t).reshape(b, num_t, 1) * (num_r + 1) + passed
            hist = np.bincount(bins.ravel(), minlength=b * num_t * (num_r + 1)).reshape(b, num_t, num_r + 1)
            first = np.cumsum(hist, axis=2)[..., :num_r]  # [b, T, R], == D where the recall is never reached
            pr = np.concatenate([pr, np.zeros((b, num_t, 1))], axis=2)
            total[rows] += np.take_along_axis(pr, first, axis=2).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        # COCO's summarize gives -1 where no category has ground truth.
        return np.where(counted > 0, total / (counted * num_t * num_r) * 100, -1.0)


def _check_paired(matches_a: Matches, matches_b: Matches) -> None:
    if matches_a.iou_type != matches_b.iou_type:
        raise ValueError(f"the runs were scored for different iou types: {matches_a.iou_type} vs {matches_b.iou_type}")
    if not np.array_equal(matches_a.img_ids, matches_b.img_ids):
        only_a = np.setdiff1d(matches_a.img_ids, matches_b.img_ids)
        only_b = np.setdiff1d(matches_b.img_ids, matches_a.img_ids)
        raise ValueError(f"the runs were evaluated on different image sets ({len(matches_a.img_ids)} vs "
                         f"{len(matches_b.img_ids)} images; only in a: {only_a[:5].tolist()}, only in b: "
                         f"{only_b[:5].tolist()}): a paired bootstrap needs the same ground truth")
    if not np.array_equal(matches_a.cat_ids, matches_b.cat_ids) or not np.array_equal(matches_a.npig, matches_b.npig):
        raise ValueError("the runs were evaluated against different ground truth (categories or annotations differ)")


def paired_bootstrap(matches_a: Matches, matches_b: Matches, *, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """AP of runs a and b, b - a, and percentile intervals of each over the same resampled image sets (percent)."""
    _check_paired(matches_a, matches_b)
    if resamples < 200:
        raise ValueError(f"resamples={resamples}: percentile intervals need at least 200 resamples")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie between 0 and 1")
    num_i = len(matches_a.img_ids)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_i, size=(resamples, num_i))
    # One multiplicity per (resample, image), the same rows for both runs: that is what pairs them.
    rows = np.repeat(np.arange(resamples), num_i) * num_i
    weights = np.bincount(rows + draws.ravel(), minlength=resamples * num_i).reshape(resamples, num_i).astype(float)
    boot_a, boot_b = _ap_batch(matches_a, weights), _ap_batch(matches_b, weights)
    ap_a, ap_b = ap_from_matches(matches_a), ap_from_matches(matches_b)
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]

    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(values, tails)
        return float(lo), float(hi)

    return {"ap_a": ap_a, "ap_b": ap_b, "diff": ap_b - ap_a, "interval_a": interval(boot_a),
            "interval_b": interval(boot_b), "interval_diff": interval(boot_b - boot_a), "resamples": resamples,
            "seed": seed, "level": level, "images": num_i, "iou_type": matches_a.iou_type}


def verdict(diff: float, lo: float, hi: float, *, name_a: str, name_b: str) -> str:
    """Where run b stands against run a, from the difference b - a and its interval (AP points)."""
    if lo <= 0 <= hi:
        return f"{name_b} caught up with {name_a} (difference within the interval: {diff:+.2f} [{lo:+.2f}, {hi:+.2f}])"
    if hi < 0:
        return f"{name_b} behind {name_a} by {-diff:.2f} AP [{lo:+.2f}, {hi:+.2f}]"
    return f"{name_b} ahead of {name_a} by {diff:.2f} AP [{lo:+.2f}, {hi:+.2f}]"


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
