"""Bootstrap intervals for COCO AP over validation images and training seeds: is scratch behind pretrained?

COCO's AP is not a mean over images, so its sampling error cannot be read off per-image numbers: an
image's detections enter every category's precision/recall curve.  ``evaluation.per_image_matches`` runs the
evaluator once and keeps, per category, what COCO's accumulate reads (scores, matched and ignore flags
per IoU threshold, non-ignored ground truth per image); ``ap_from_matches`` redoes accumulate with each
image counted as often as a bootstrap resample draws it, and ``paired_bootstrap`` scores two runs on the
same resamples, so the interval of their difference leaves out the spread the two runs share.
``replicate_bootstrap`` adds the other thing that varies: runs that differ only in ``train.seed`` are
replicates of one arm, resampled too (a two-stage bootstrap: images, then each arm's seeds), so the
interval covers which validation images were drawn *and* which seeds trained.  ``verdict`` reads a
difference against an equivalence margin: a test that fails to find a gap does not show equality.
"""

from __future__ import annotations

import hashlib
import weakref

import numpy as np

from ..evaluation import Matches  # the per-image matches a run's final evaluation records (evaluation.py)

# Elements of one [resamples, IoU thresholds, detections] block: bounds the memory of a category with many detections.
_BLOCK = 2_000_000
# The default equivalence margin, in AP points.  The paper's Table 1 (R50-FPN GN box AP, random init / pretrained)
# reads 39.5 / 40.8 at 3x (a 1.3-point gap) as not yet caught up and 40.6 / 40.9 at 4x, 40.7 / 40.9 at 5x and
# 41.3 / 41.1 at 6x (0.2-0.3 points) as matching: a 1-point margin separates the two.  ``report --margin`` sets another.
DEFAULT_MARGIN = 1.0


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


# A run's AP on each resample is what a study's report spends its time on (seconds per run and type at 1,000
# resamples, 500 images), and a report asks for the same run on the same resamples in several places (catch-up,
# plateau, the fits).  Kept per Matches object (dropped with it), keyed by the resample weights' shape and bytes, so
# a hit is the same computation by construction; a Matches object is not to be changed in place once resampled.
_AP_CACHE: dict[int, tuple[weakref.ref, dict[bytes, np.ndarray]]] = {}


def _resampled_ap(matches: Matches, weights: np.ndarray) -> np.ndarray:
    """``_ap_batch``, computed once per run and set of resample weights."""
    entry = _AP_CACHE.get(id(matches))
    if entry is None or entry[0]() is not matches:
        key_id = id(matches)
        entry = (weakref.ref(matches, lambda _, k=key_id: _AP_CACHE.pop(k, None)), {})
        _AP_CACHE[key_id] = entry
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    key = repr(weights.shape).encode() + hashlib.blake2b(weights.view(np.uint8).ravel(), digest_size=16).digest()
    if key not in entry[1]:
        entry[1][key] = _ap_batch(matches, weights)
        entry[1][key].setflags(write=False)
    return entry[1][key].view()  # a view: its caller cannot make the cached array writable again


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
    """AP of runs a and b, b - a, and percentile intervals of each over the same resampled image sets (percent):
    ``replicate_bootstrap`` with one run an arm, whose seed stage then draws nothing."""
    out = replicate_bootstrap([matches_a], [matches_b], resamples=resamples, seed=seed, level=level)
    keys = ("ap_a", "ap_b", "diff", "interval_a", "interval_b", "interval_diff", "resamples", "seed", "level", "images",
            "iou_type")
    return {k: out[k] for k in keys}


def _resample_weights(rng: np.random.Generator, resamples: int, num_i: int) -> np.ndarray:
    """[resamples, images]: how often each validation image is drawn in each resample (with replacement)."""
    draws = rng.integers(0, num_i, size=(resamples, num_i))
    rows = np.repeat(np.arange(resamples), num_i) * num_i
    return np.bincount(rows + draws.ravel(), minlength=resamples * num_i).reshape(resamples, num_i).astype(float)


def replicate_bootstrap(arm_a: list[Matches], arm_b: list[Matches], *, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95, paired_seeds: bool = False) -> dict:
    """AP of two arms, each a list of replicate runs (training seeds), and b - a, with percentile intervals
    over validation images and seeds (percent).

    A two-stage bootstrap, the hierarchy of how the numbers arise: each resample draws the validation images
    with replacement (one draw for every run of both arms: the same images score both, which pairs them), then,
    within each arm, as many seeds as it has, with replacement; an arm's AP in the resample is the mean AP of
    its drawn seeds on the drawn images.  The point estimate of an arm is its seeds' mean AP on all images.
    With one seed an arm's seed stage always draws it: its interval covers the images alone, and
    ``covers`` says so (seed-to-seed spread cannot be estimated from one run).  A bootstrap of n seeds
    spreads their mean by sqrt((n - 1) / n) of its true spread (too narrow with 2 or 3 seeds: 86% coverage
    at 2 seeds in a simulation); each resample's seed-stage deviation is scaled by sqrt(n / (n - 1)).
    ``paired_seeds``: the two arms' i-th runs share a seed (the same arm at two lengths, one trunk each):
    the seed stage draws the same indices in both, so the difference leaves out what a seed shares.
    """
    if not arm_a or not arm_b:
        raise ValueError("each arm needs at least one run")
    for m in [*arm_a[1:], *arm_b]:
        _check_paired(arm_a[0], m)
    if resamples < 200:
        raise ValueError(f"resamples={resamples}: percentile intervals need at least 200 resamples")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie between 0 and 1")
    num_i = len(arm_a[0].img_ids)
    rng = np.random.default_rng(seed)
    weights = _resample_weights(rng, resamples, num_i)
    if paired_seeds and len(arm_a) != len(arm_b):
        raise ValueError(f"paired seeds need as many runs in each arm; got {len(arm_a)} and {len(arm_b)}")
    boot = [np.stack([_resampled_ap(m, weights) for m in arm]) for arm in (arm_a, arm_b)]  # [seeds, resamples] each
    shared = rng.integers(0, len(arm_a), size=(resamples, len(arm_a))) if paired_seeds else None
    arm_boot = [_seed_stage(b, shared if shared is not None else rng.integers(0, len(b), size=(resamples, len(b))))
                for b in boot]
    full = [np.array([ap_from_matches(m) for m in arm]) for arm in (arm_a, arm_b)]
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]

    def interval(values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.quantile(values, tails)
        return float(lo), float(hi)

    seeds = (len(arm_a), len(arm_b))
    covers = "validation images and training seeds" if min(seeds) > 1 else (
        "validation images only (one training seed per arm)" if max(seeds) == 1 else
        "validation images, and seeds only in the arm with several")
    spread = [float(np.std(f, ddof=1)) if len(f) > 1 else None for f in full]
    return {"ap_a": float(full[0].mean()), "ap_b": float(full[1].mean()), "diff": float(full[1].mean() - full[0].mean()),
            "interval_a": interval(arm_boot[0]), "interval_b": interval(arm_boot[1]),
            "interval_diff": interval(arm_boot[1] - arm_boot[0]), "seeds_a": seeds[0], "seeds_b": seeds[1],
            "seed_ap_a": full[0].tolist(), "seed_ap_b": full[1].tolist(), "seed_sd_a": spread[0], "seed_sd_b": spread[1],
            "covers": covers, "resamples": resamples, "seed": seed, "level": level, "images": num_i,
            "iou_type": arm_a[0].iou_type}


def _seed_stage(ap: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """An arm's AP per resample from its seeds' APs ``ap`` [seeds, resamples] on each resample's images and the
    seeds each resample draws, ``picks`` [resamples, seeds]: their mean, its deviation from the all-seeds mean
    widened by sqrt(n / (n - 1)) (``replicate_bootstrap``'s docstring says why)."""
    n = ap.shape[0]
    drawn = np.take_along_axis(ap.T, picks, axis=1).mean(1)
    if n == 1:
        return drawn
    centre = ap.mean(0)  # each resample's all-seeds mean on its images: the seed stage deviates from it
    return centre + (drawn - centre) * np.sqrt(n / (n - 1))


def length_replicates(lengths: list[list[Matches]], *, resamples: int = 1000, seed: int = 0,
                      paired_seeds: bool = False) -> np.ndarray:
    """One arm's AP at each of its schedule lengths, jointly resampled: [resamples, lengths] (percent).

    ``lengths[j]`` holds the runs (training seeds) at length j, all evaluated on one validation set.  Each resample
    draws the validation images once for every length (the same images score them all, so what they share moves
    them together) and, per length, as many seeds as it has.  ``paired_seeds``: the i-th run of every length has
    the same training seed (the caller checks the seed values, not just the counts: a seed's lengths share its
    trunk and data order), and each resample draws the same seed indices at every length; otherwise each length
    draws its own.  A curve refitted on each row carries each length's own uncertainty into the fit's intervals
    (``curvefit.fit_curve``), where residuals of a 3-parameter fit through 4 or 5 points could not.
    """
    if not lengths or any(not runs for runs in lengths):
        raise ValueError("every length needs at least one run")
    first = lengths[0][0]
    for m in [m for runs in lengths for m in runs][1:]:
        _check_paired(first, m)
    if resamples < 200:
        raise ValueError(f"resamples={resamples}: percentile intervals need at least 200 resamples")
    rng = np.random.default_rng(seed)
    weights = _resample_weights(rng, resamples, len(first.img_ids))
    if paired_seeds and len({len(runs) for runs in lengths}) != 1:
        raise ValueError(f"paired seeds need as many runs at every length; got {[len(r) for r in lengths]}")
    shared = rng.integers(0, len(lengths[0]), size=(resamples, len(lengths[0]))) if paired_seeds else None
    out = []
    for runs in lengths:
        ap = np.stack([_resampled_ap(m, weights) for m in runs])  # [seeds, resamples]
        picks = shared if shared is not None else rng.integers(0, len(runs), size=(resamples, len(runs)))
        out.append(_seed_stage(ap, picks))
    return np.stack(out, axis=1)


def verdict_kind(lo: float, hi: float, margin: float = DEFAULT_MARGIN) -> str:
    """``verdict``'s reading of an interval of b - a: "equivalent", "behind", "ahead" or "inconclusive"."""
    if margin <= 0:
        raise ValueError(f"margin={margin}: an equivalence margin is a positive number of AP points")
    if -margin <= lo and hi <= margin:
        return "equivalent"
    if hi < 0:
        return "behind"
    if lo > 0:
        return "ahead"
    return "inconclusive"


def verdict(diff: float, lo: float, hi: float, *, name_a: str, name_b: str, margin: float = DEFAULT_MARGIN) -> str:
    """Where b stands against a, from the difference b - a and its interval (AP points), against an
    equivalence margin ``m``: "equivalent within +-m" only when the whole interval lies inside [-m, m]
    (two one-sided tests' reading of an interval); "behind" / "ahead" when it excludes 0 and is not inside;
    "inconclusive" when it holds 0 but reaches past the margin: no gap was found, and none was ruled out."""
    kind = verdict_kind(lo, hi, margin)
    ci = f"[{lo:+.2f}, {hi:+.2f}]"
    if kind == "equivalent":
        return f"{name_b} equivalent to {name_a} within +-{margin:g} AP ({diff:+.2f} {ci})"
    if kind == "behind":
        return f"{name_b} behind {name_a} by {-diff:.2f} AP {ci}"
    if kind == "ahead":
        return f"{name_b} ahead of {name_a} by {diff:.2f} AP {ci}"
    return (f"inconclusive: {name_b} vs {name_a} {diff:+.2f} {ci}, the interval holds 0 but reaches past the "
            f"+-{margin:g} AP margin (not shown equivalent, not shown behind)")
