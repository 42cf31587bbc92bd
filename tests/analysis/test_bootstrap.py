import json

import faster_coco_eval.core.mask as mask_utils
import numpy as np
import pytest

from scratchdet.analysis.bootstrap import ap_from_matches, paired_bootstrap, replicate_bootstrap, verdict
from scratchdet.evaluation import (
    CategoryMatches,
    Matches,
    evaluate_coco,
    matches_from_record,
    matches_record,
    per_image_matches,
)

from ..conftest import coco_from_dict


def _small_case(seed: int = 0, num_images: int = 6) -> tuple[dict, list[dict]]:
    """A few images with 1-4 boxes of 3 categories, detections near them (some off, some extra), distinct scores."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in range(num_images)]
    anns, results = [], []
    for im in images:
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = rng.uniform(0, 100, 2).tolist() + rng.uniform(10, 90, 2).tolist()
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(0, 3)):  # 0-2 detections per object, shifted by up to 12 px
                dx, dy = rng.uniform(-12, 12, 2).tolist()
                results.append({"image_id": im["id"], "category_id": cat, "bbox": [x + dx, y + dy, w, h],
                                "score": float(rng.uniform())})
        for _ in range(rng.integers(0, 3)):  # false positives
            results.append({"image_id": im["id"], "category_id": int(rng.integers(1, 4)),
                            "bbox": rng.uniform(0, 100, 4).tolist(), "score": float(rng.uniform())})
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)]  # category 4 has no ground truth: COCO leaves it out
    return {"images": images, "annotations": anns, "categories": cats}, results


def test_all_weights_one_is_cocos_ap_on_a_small_case():
    dataset, results = _small_case()
    stats, _ = evaluate_coco(coco_from_dict(dataset), results, "bbox")
    matches = per_image_matches(coco_from_dict(dataset), results, "bbox")
    assert ap_from_matches(matches) == pytest.approx(stats["AP"], abs=1e-9)
    assert ap_from_matches(matches, np.ones(len(dataset["images"]))) == pytest.approx(stats["AP"], abs=1e-9)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_all_weights_one_is_cocos_ap_on_cocoapis_fake_results(cocoapi, iou_type):
    gt = cocoapi / "instances_val2014_100.json"
    results = cocoapi / f"instances_val2014_fake{iou_type}100_results.json"
    stats, _ = evaluate_coco(gt, results, iou_type)  # equals cocoapi's printed AP (test_evaluation)
    matches = per_image_matches(gt, results, iou_type)
    assert len(matches.img_ids) == 100
    assert ap_from_matches(matches) / 100 == pytest.approx(stats["AP"] / 100, abs=1e-6)


def test_a_weight_counts_an_image_that_many_times():
    # Weight 2 must equal evaluating a copy of the image (new ids) alongside it; weight 0 leaving the image out.
    dataset, results = _small_case(seed=1)
    weights = np.array([2, 0, 1, 3, 1, 0], dtype=float)
    big = {"images": [], "annotations": [], "categories": dataset["categories"]}
    big_results = []
    for i, im in enumerate(dataset["images"]):
        for copy in range(int(weights[i])):
            new_id = im["id"] + 100 * copy
            big["images"].append({**im, "id": new_id})
            big["annotations"] += [{**a, "id": len(big["annotations"]) + j + 1, "image_id": new_id}
                                   for j, a in enumerate(a for a in dataset["annotations"] if a["image_id"] == im["id"])]
            big_results += [{**r, "image_id": new_id} for r in results if r["image_id"] == im["id"]]
    stats, _ = evaluate_coco(coco_from_dict(big), big_results, "bbox")
    matches = per_image_matches(coco_from_dict(dataset), results, "bbox")
    assert ap_from_matches(matches, weights) == pytest.approx(stats["AP"], abs=1e-9)
    assert ap_from_matches(matches, weights) != pytest.approx(ap_from_matches(matches), abs=1e-3)


def test_no_detections_score_zero():
    dataset, _ = _small_case()
    assert ap_from_matches(per_image_matches(coco_from_dict(dataset), [], "bbox")) == 0.0


def test_identical_runs_differ_by_exactly_zero(cocoapi):
    gt = cocoapi / "instances_val2014_100.json"
    results = json.loads((cocoapi / "instances_val2014_fakebbox100_results.json").read_text())
    a = per_image_matches(gt, results, "bbox")
    b = per_image_matches(gt, results, "bbox")  # scored again: the same numbers, not the same object
    out = paired_bootstrap(a, b, resamples=300)
    assert out["diff"] == 0.0
    assert out["interval_diff"] == (0.0, 0.0)
    lo, hi = out["interval_a"]
    assert lo < out["ap_a"] < hi and hi - lo > 1  # 100 images: AP is uncertain by points
    assert verdict(out["diff"], *out["interval_diff"], name_a="pretrained", name_b="scratch").startswith(
        "scratch equivalent to pretrained within +-1 AP")


def _drop_true_positives(gt_path, results: list[dict], share: float, seed: int) -> list[dict]:
    """Results without ``share`` of the detections that overlap a same-category ground truth box by IoU >= 0.5."""
    gt = json.loads(gt_path.read_text())
    boxes: dict[tuple[int, int], list] = {}
    for a in gt["annotations"]:
        boxes.setdefault((a["image_id"], a["category_id"]), []).append(a["bbox"])
    rng = np.random.default_rng(seed)
    kept = []
    for r in results:
        gts = boxes.get((r["image_id"], r["category_id"]))
        hit = bool(gts) and mask_utils.iou([r["bbox"]], gts, [0] * len(gts)).max() >= 0.5
        if not (hit and rng.uniform() < share):
            kept.append(r)
    assert len(kept) < len(results)
    return kept


def test_a_run_missing_true_positives_is_behind(cocoapi):
    gt = cocoapi / "instances_val2014_100.json"
    results = json.loads((cocoapi / "instances_val2014_fakebbox100_results.json").read_text())
    a = per_image_matches(gt, results, "bbox")
    b = per_image_matches(gt, _drop_true_positives(gt, results, 0.05, seed=0), "bbox")
    out = paired_bootstrap(a, b, resamples=500, seed=0)
    lo, hi = out["interval_diff"]
    assert out["diff"] < 0 and lo <= out["diff"] <= hi < 0
    # Pairing is what makes it decisive: the runs' own intervals overlap, the interval of their difference does not
    # reach 0.
    assert out["interval_b"][1] > out["interval_a"][0]
    text = verdict(out["diff"], lo, hi, name_a="pretrained", name_b="scratch")
    assert text.startswith(f"scratch behind pretrained by {-out['diff']:.2f} AP [")
    assert verdict(-out["diff"], -hi, -lo, name_a="scratch", name_b="pretrained").startswith(
        "pretrained ahead of scratch by")


def test_seeded_bootstrap_repeats(cocoapi):
    gt = cocoapi / "instances_val2014_100.json"
    results = json.loads((cocoapi / "instances_val2014_fakebbox100_results.json").read_text())
    a = per_image_matches(gt, results, "bbox")
    b = per_image_matches(gt, [{**r, "score": r["score"] * (1 + 0.5 * (r["image_id"] % 3))} for r in results], "bbox")
    first, second = paired_bootstrap(a, b, resamples=200, seed=3), paired_bootstrap(a, b, resamples=200, seed=3)
    assert first == second
    assert paired_bootstrap(a, b, resamples=200, seed=4)["interval_a"] != first["interval_a"]


def test_runs_on_different_images_or_too_few_resamples_are_refused():
    dataset, results = _small_case()
    a = per_image_matches(coco_from_dict(dataset), results, "bbox")
    fewer = {**dataset, "images": dataset["images"][:-1],
             "annotations": [x for x in dataset["annotations"] if x["image_id"] != dataset["images"][-1]["id"]]}
    b = per_image_matches(coco_from_dict(fewer), [r for r in results if r["image_id"] != dataset["images"][-1]["id"]], "bbox")
    with pytest.raises(ValueError, match="different image sets"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="at least 200"):
        paired_bootstrap(a, a, resamples=50)
    with pytest.raises(ValueError, match="one per image"):
        ap_from_matches(a, np.ones(3))


def test_verdict_wording():
    assert verdict(-0.4, -0.9, 0.35, name_a="pretrained", name_b="scratch") == (
        "scratch equivalent to pretrained within +-1 AP (-0.40 [-0.90, +0.35])")
    assert verdict(-2.1, -3.0, -1.2, name_a="pretrained", name_b="scratch") == (
        "scratch behind pretrained by 2.10 AP [-3.00, -1.20]")
    assert verdict(1.0, 0.2, 1.8, name_a="pretrained", name_b="scratch") == (
        "scratch ahead of pretrained by 1.00 AP [+0.20, +1.80]")
    # A significant difference smaller than the margin is equivalent in its terms.
    assert verdict(0.4, 0.1, 0.7, name_a="pretrained", name_b="scratch", margin=1.0).startswith("scratch equivalent")


def test_an_interval_that_holds_0_but_is_wider_than_the_margin_is_inconclusive():
    # The shipped study's 30-image, 4x row: -1.53 [-3.45, +0.39] was called "caught up" while the pretrained
    # arm led at all six evaluations.  An underpowered test cannot show equality.
    text = verdict(-1.53, -3.45, 0.39, name_a="pretrained", name_b="random init")
    assert text.startswith("inconclusive: random init vs pretrained -1.53 [-3.45, +0.39]") and "caught up" not in text
    assert verdict(-1.53, -3.45, 0.39, name_a="pretrained", name_b="random init", margin=4.0).startswith(
        "random init equivalent to pretrained within +-4 AP")
    with pytest.raises(ValueError, match="margin"):
        verdict(0.0, -1.0, 1.0, name_a="a", name_b="b", margin=0)


# --------------------------------------------------------------------------- seeds as replicates


def _simple_matches(correct: np.ndarray) -> Matches:
    """One category, one ground-truth box per image, one detection per image: a true positive at every IoU
    threshold where ``correct`` (scored above every false positive), else a false positive.  Its COCO AP is
    then 100 * (floor(100 q) + 1) / 101 with q the share of images correct (101-point interpolation)."""
    num_i = len(correct)
    order = np.argsort(~correct, kind="mergesort")  # the true positives first, each group in image order
    score = np.where(correct[order], 1.0, 0.5) - np.arange(num_i) * 1e-6
    tp = np.repeat(correct[order][None], 10, axis=0)
    cat = CategoryMatches(order.astype(np.int64), score, tp, ~tp)
    return Matches("bbox", np.arange(num_i, dtype=np.int64), np.array([1]), np.linspace(0.5, 0.95, 10),
                   np.linspace(0, 1, 101), np.ones((1, num_i), dtype=np.int64), (cat,))


def _coco_ap(q: np.ndarray) -> np.ndarray:
    return 100 * (np.floor(100 * q + 1e-9) + 1) / 101


def test_simple_matches_score_as_coco_would():
    correct = np.array([True, False, True, True, False, False, True, False, False, False])
    assert ap_from_matches(_simple_matches(correct)) == pytest.approx(_coco_ap(np.array(0.4)), abs=1e-9)


@pytest.mark.parametrize("seeds", [3, 2])
def test_seed_and_image_interval_covers_a_known_difference(seeds):
    """Simulated studies with seed noise and image noise, the true difference known: the two-stage bootstrap's
    nominal 95% interval must cover it in at least 90% of 200 studies (images alone: far less, shown too), with
    three seeds an arm and with two, the fewest a study pools (its seed spread then rests on one degree of
    freedom per arm)."""
    rng = np.random.default_rng(0)
    p_a, p_b, seed_sd, num_i, studies = 0.55, 0.50, 0.03, 150, 200
    # Truth: the expected COCO AP difference over seeds and image sets, by a large simulation of the same model.
    big = 200_000
    diff_true = float(np.mean(_coco_ap(np.clip(p_b + rng.normal(0, seed_sd, big) + rng.normal(0, 0.04, big), 0, 1))
                              - _coco_ap(np.clip(p_a + rng.normal(0, seed_sd, big) + rng.normal(0, 0.04, big), 0, 1))))
    covered = covered_images_only = 0
    for k in range(studies):
        difficulty = rng.uniform(-0.35, 0.35, num_i)  # shared by both arms: the same validation images

        def arm(p: float, d: np.ndarray = difficulty) -> list[Matches]:
            return [_simple_matches(rng.uniform(size=num_i) < np.clip(p + rng.normal(0, seed_sd) + d, 0, 1))
                    for _ in range(seeds)]

        a, b = arm(p_a), arm(p_b)
        lo, hi = replicate_bootstrap(a, b, resamples=200, seed=k)["interval_diff"]
        covered += lo <= diff_true <= hi
        lo1, hi1 = paired_bootstrap(a[0], b[0], resamples=200, seed=k)["interval_diff"]  # one seed per arm
        covered_images_only += lo1 <= diff_true <= hi1
    assert covered / studies >= 0.90, (covered, covered_images_only, diff_true)
    assert covered_images_only < covered  # images alone miss the seed-to-seed spread


def test_replicates_pool_seeds_and_say_what_the_interval_covers():
    rng = np.random.default_rng(1)
    runs = [_simple_matches(rng.uniform(size=80) < p) for p in (0.6, 0.62, 0.58, 0.4)]
    out = replicate_bootstrap(runs[:3], runs[3:], resamples=300, seed=0)
    assert out["seeds_a"] == 3 and out["seeds_b"] == 1
    assert out["ap_a"] == pytest.approx(np.mean([ap_from_matches(m) for m in runs[:3]]))
    assert out["seed_sd_a"] == pytest.approx(np.std([ap_from_matches(m) for m in runs[:3]], ddof=1))
    assert out["seed_sd_b"] is None and "seeds only in the arm with several" in out["covers"]
    one = replicate_bootstrap(runs[:1], runs[3:], resamples=300, seed=0)
    assert one["covers"] == "validation images only (one training seed per arm)"
    # With one seed per arm it is the paired bootstrap over images, resample for resample.
    pb = paired_bootstrap(runs[0], runs[3], resamples=300, seed=0)
    assert one["interval_diff"] == pb["interval_diff"] and one["diff"] == pytest.approx(pb["diff"])


def test_matches_survive_the_metrics_record(cocoapi):
    """Through JSON (metrics.jsonl) and back: the same AP and the same bootstrap."""
    gt = cocoapi / "instances_val2014_100.json"
    matches = per_image_matches(gt, cocoapi / "instances_val2014_fakebbox100_results.json", "bbox")
    back = matches_from_record(json.loads(json.dumps(matches_record(matches))))
    assert ap_from_matches(back) == ap_from_matches(matches)
    worse = per_image_matches(gt, _drop_true_positives(gt, json.loads(
        (cocoapi / "instances_val2014_fakebbox100_results.json").read_text()), 0.05, 0), "bbox")
    assert paired_bootstrap(back, worse, resamples=200) == paired_bootstrap(matches, worse, resamples=200)


def test_paired_seeds_leave_out_what_a_seed_shares():
    # One arm at two lengths: seed k's short and long runs share its trunk (a seed effect of +-5 AP here).
    # Drawn independently, the seed stage mixes one seed's short run with another's long run.
    rng = np.random.default_rng(2)
    num_i = 120
    difficulty = rng.uniform(-0.3, 0.3, num_i)
    noise = [rng.uniform(size=num_i) for _ in range(3)]
    short = [_simple_matches(noise[k] < np.clip(0.45 + e + difficulty, 0, 1)) for k, e in enumerate((-0.05, 0, 0.05))]
    long_ = [_simple_matches(noise[k] < np.clip(0.47 + e + difficulty, 0, 1)) for k, e in enumerate((-0.05, 0, 0.05))]
    paired = replicate_bootstrap(short, long_, resamples=400, seed=0, paired_seeds=True)
    apart = replicate_bootstrap(short, long_, resamples=400, seed=0)
    width = lambda out: out["interval_diff"][1] - out["interval_diff"][0]  # noqa: E731
    assert width(paired) < width(apart) / 3
    assert paired["diff"] == pytest.approx(apart["diff"])
    with pytest.raises(ValueError, match="as many runs"):
        replicate_bootstrap(short, long_[:2], resamples=200, paired_seeds=True)


def test_seed_stage_is_widened_for_few_seeds():
    # Two seeds 40 AP apart on the same images: a plain bootstrap of 2 seeds puts their mean at most at either
    # seed (the interval ends near them); scaled by sqrt(n / (n - 1)) it reaches about 0.41 x 20 AP beyond.
    rng = np.random.default_rng(3)
    u = rng.uniform(size=400)
    runs = [_simple_matches(u < 0.3), _simple_matches(u < 0.7)]
    low, high = ap_from_matches(runs[0]), ap_from_matches(runs[1])
    lo, hi = replicate_bootstrap(runs, runs[:1], resamples=1000, seed=0)["interval_a"]
    assert lo < low - 5 and hi > high + 5


def test_length_replicates_draw_the_images_jointly_and_pair_seeds():
    from scratchdet.analysis.bootstrap import length_replicates

    rng = np.random.default_rng(4)
    num_i = 100
    difficulty = rng.uniform(-0.3, 0.3, num_i)
    noise = [rng.uniform(size=num_i) for _ in range(2)]
    # Three lengths of one arm, two seeds each; seed k keeps its noise at every length (its trunk).
    lengths = [[_simple_matches(noise[k] < np.clip(p + e + difficulty, 0, 1)) for k, e in enumerate((-0.05, 0.05))]
               for p in (0.4, 0.45, 0.48)]
    rep = length_replicates(lengths, resamples=300, seed=0, paired_seeds=True)
    assert rep.shape == (300, 3)
    # The same validation images at every length: an identical run at two lengths gives identical columns.
    same = length_replicates([lengths[0], lengths[0]], resamples=300, seed=0, paired_seeds=True)
    np.testing.assert_array_equal(same[:, 0], same[:, 1])
    # Jointly drawn, the lengths move together: a difference between lengths spreads far less than when each
    # length is drawn on its own (images and seeds), which adds the two spreads.
    apart = length_replicates(lengths[2:], resamples=300, seed=1)[:, 0] - length_replicates(
        lengths[:1], resamples=300, seed=2)[:, 0]
    assert (rep[:, 2] - rep[:, 0]).std() < apart.std() / 1.5
    # Seeds paired (the caller found the same seed values at every length) leave out what a seed shares; drawn
    # per length, one seed's short run meets another's long run.
    unpaired = length_replicates(lengths, resamples=300, seed=0)
    assert (rep[:, 2] - rep[:, 0]).std() < (unpaired[:, 2] - unpaired[:, 0]).std()
    with pytest.raises(ValueError, match="as many runs at every length"):
        length_replicates([lengths[0], lengths[1][:1]], resamples=300, paired_seeds=True)
    assert np.mean(rep, axis=0) == pytest.approx(
        [np.mean([ap_from_matches(m) for m in runs]) for runs in lengths], abs=1.5)
    with pytest.raises(ValueError, match="every length needs"):
        length_replicates([lengths[0], []], resamples=300)


def test_a_run_is_resampled_once_per_set_of_weights(monkeypatch):
    """A report asks for one run on the same resamples in several places; the AP per resample is computed once,
    and new weights (another seed) are computed afresh, not served from the cache."""
    from scratchdet.analysis import bootstrap

    rng = np.random.default_rng(5)
    a, b = (_simple_matches(rng.uniform(size=80) < p) for p in (0.4, 0.5))
    calls = []
    real = bootstrap._ap_batch
    # Resampled calls only: the point estimates (all weights one) are one row each and cheap.
    monkeypatch.setattr(bootstrap, "_ap_batch", lambda m, w: (len(w) > 1 and calls.append(id(m))) or real(m, w))
    first = replicate_bootstrap([a], [b], resamples=200, seed=0)
    assert len(calls) == 2
    again = replicate_bootstrap([a], [b], resamples=200, seed=0)
    rep = bootstrap.length_replicates([[a], [b]], resamples=200, seed=0)
    assert len(calls) == 2  # both runs served from the cache
    assert again == first
    np.testing.assert_array_equal(rep[:, 0], real(a, bootstrap._resample_weights(np.random.default_rng(0), 200, 80)))
    other = replicate_bootstrap([a], [b], resamples=200, seed=1)
    assert len(calls) == 4 and other["interval_diff"] != first["interval_diff"]
