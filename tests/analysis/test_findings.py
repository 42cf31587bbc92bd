"""The study's answers (scratchdet/analysis/findings.py) on runs written as their two files: no training."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from scratchdet.analysis.bootstrap import ap_from_matches
from scratchdet.analysis.findings import (
    Paired,
    analyze,
    answer,
    breakdown,
    catch_up,
    plateau_check,
    plateau_statement,
    prediction,
)
from scratchdet.analysis.report import build_report, load_runs, study_points
from scratchdet.evaluation import matches_record, per_image_matches

from ..conftest import coco_from_dict

IMS = 4  # images per batch of every fake run


def _case(num_images: int = 30, seed: int = 0) -> tuple[dict, list[dict]]:
    """Images with 1-4 boxes of 3 categories, a near detection per box and a false positive per image (distinct scores)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in range(num_images)]
    anns, results = [], []
    for im in images:
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = rng.uniform(0, 100, 2).tolist() + rng.uniform(20, 90, 2).tolist()
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            dx, dy = rng.uniform(-3, 3, 2).tolist()
            results.append({"image_id": im["id"], "category_id": cat, "bbox": [x + dx, y + dy, w, h],
                            "score": float(rng.uniform(0.3, 1))})
        results.append({"image_id": im["id"], "category_id": int(rng.integers(1, 4)),
                        "bbox": rng.uniform(0, 100, 4).tolist(), "score": float(rng.uniform(0, 0.6))})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}, results


def _worse(results: list[dict], share: float, seed: int = 1) -> list[dict]:
    """``share`` of the true detections moved off their objects (IoU < 0.5): a run that finds less."""
    rng = np.random.default_rng(seed)
    out = []
    for k, r in enumerate(results):
        if k % 5 != 4 and rng.uniform() < share:  # every 5th is a false positive already: leave it
            x, y, w, h = r["bbox"]
            r = {**r, "bbox": [x + w * 0.8, y + h * 0.8, w, h]}
        out.append(r)
    return out


@pytest.fixture(scope="module")
def case() -> dict:
    """Matches records of a good run and a worse one on the same 30 validation images (box; mask reuses them)."""
    dataset, results = _case()
    good = per_image_matches(coco_from_dict(dataset), results, "bbox")
    bad = per_image_matches(coco_from_dict(dataset), _worse(results, 0.5), "bbox")
    return {"good": good, "bad": bad}


def _record(matches) -> dict:
    """A final evaluation's matches record, box and mask (the mask one the box's, under its own iou type)."""
    rec = matches_record(matches)
    return {"bbox": rec, "segm": {**rec, "iou_type": "segm"}}


def _run(root: Path, name: str, *, pretrained: bool, max_iter: int, ap: float | None = None, matches=None,
         subset: float = 0, losses: tuple[float, float] = (2.0, 1.0), pretrain_images: int = 50_000,
         best: float | None = None, seed: int = 0) -> Path:
    """A finished run as its two files: log lines with loss and seen counts, evaluations at half and end, and
    (given ``matches``) the final evaluation's matches record; AP from the matches when given."""
    d = root / name
    d.mkdir(parents=True)
    config = {"model": {"init": "/somewhere/pretrain/backbone_final.pth" if pretrained else "random"},
              "solver": {"max_iter": max_iter, "steps": [max_iter * 3 // 4], "ims_per_batch": IMS, "warmup_iters": 1},
              "data": {"subset": subset}, "train": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    final = ap_from_matches(matches) if matches is not None else ap
    lines = []
    for k in (1, 2, 3, 4):
        it = max_iter * k // 4
        line = {"iteration": it, "loss": losses[0] + (losses[1] - losses[0]) * k / 4, "lr": 0.02,
                "images_seen": IMS * it, "instances_seen": 5 * IMS * it, "pixels_seen": 10_000 * IMS * it}
        if pretrained:
            line.update(pretrain_images_seen=pretrain_images, pretrain_pixels_seen=pretrain_images * 4_000)
        lines.append(line)
        if k in (2, 4):
            v = final if k == 4 else (best if best is not None else final - 2)
            lines.append({"iteration": it, "bbox/AP": v, "segm/AP": v})
    if matches is not None:
        lines.append({"iteration": max_iter, "matches": _record(matches)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def _points(*roots: Path):
    return study_points(load_runs(list(roots)))


def _paired() -> Paired:
    """A fresh one per test: it caches by run name, and the tests reuse names."""
    return Paired(resamples=300, seed=0, level=0.95)


def test_identical_matches_are_equivalent_within_the_margin(tmp_path, case):
    _run(tmp_path, "rand", pretrained=False, max_iter=40, matches=case["good"])
    _run(tmp_path, "pre", pretrained=True, max_iter=40, matches=case["good"])
    sec = catch_up(_points(tmp_path), _paired())
    assert not sec.missing
    assert len(sec.lines) == 2 and all("random init equivalent to pretrained within +-1 AP" in x for x in sec.lines)
    assert all("validation images only (one training seed per arm)" in x for x in sec.lines)
    row = sec.tables[0].rows[0]
    cols = sec.tables[0].columns
    assert row[cols.index("random init - pretrained")] == 0.0
    lo, hi = row[cols.index("random init 95% lo")], row[cols.index("random init 95% hi")]
    assert lo < row[cols.index("random init")] < hi


def test_worse_scratch_is_behind_and_pairing_is_by_config(tmp_path, case):
    # Two schedules: each random-init run must meet its own twin (the 80 it one is worse, the 40 it one equal).
    _run(tmp_path, "rand_40", pretrained=False, max_iter=40, matches=case["good"])
    _run(tmp_path, "pre_40", pretrained=True, max_iter=40, matches=case["good"])
    _run(tmp_path, "rand_80", pretrained=False, max_iter=80, matches=case["bad"])
    _run(tmp_path, "pre_80", pretrained=True, max_iter=80, matches=case["good"])
    sec = catch_up(_points(tmp_path), _paired())
    rows = {(r[0], r[1]): r for r in sec.tables[0].rows}
    cols = sec.tables[0].columns
    assert rows[("40 it", "box AP")][cols.index("runs")] == "rand_40 / pre_40"
    assert rows[("40 it", "box AP")][cols.index("verdict")].startswith("random init equivalent to pretrained")
    behind = rows[("80 it", "box AP")]
    assert behind[cols.index("runs")] == "rand_80 / pre_80"
    assert behind[cols.index("verdict")].startswith("random init behind pretrained by")
    assert behind[cols.index("difference hi")] < 0
    assert behind[cols.index("random init")] == pytest.approx(ap_from_matches(case["bad"]))


def test_the_answer_says_inconclusive_unless_scratch_levelled_off_or_matched(tmp_path, case):
    # Behind at the longest schedule and still rising: inconclusive, with why; levelled off behind: not caught up;
    # equivalent at the longest: caught up.  Never "caught up" from an interval that merely holds 0.
    dataset, results = _case()
    case = {**case, "mid": per_image_matches(coco_from_dict(dataset), _worse(results, 0.25), "bbox")}

    def study(root: Path, rand: tuple, pre: tuple):
        for n, r, p in zip((40, 80), rand, pre):
            _run(root, f"rand_{n}", pretrained=False, max_iter=n, matches=case[r])
            _run(root, f"pre_{n}", pretrained=True, max_iter=n, matches=case[p])
        pts, paired = _points(root), _paired()
        return answer(catch_up(pts, paired), plateau_check(pts, paired)).lines

    rising = study(tmp_path / "rising", ("bad", "mid"), ("good", "good"))
    box = next(x for x in rising if x.startswith("box AP, at the longest schedule 80 it"))
    assert "INCONCLUSIVE: random init behind pretrained by" in box and "not been shown to level off" in box
    assert "not levelled off either" not in box  # pretrained's last doubling adds exactly 0
    both_rising = study(tmp_path / "both", ("bad", "mid"), ("bad", "good"))
    assert "The pretrained arm has not levelled off either" in next(x for x in both_rising if x.startswith("box AP"))
    flat = study(tmp_path / "flat", ("bad", "bad"), ("good", "good"))
    box = next(x for x in flat if x.startswith("box AP"))
    assert "NOT CAUGHT UP" in box and "has levelled off" in box
    matched = study(tmp_path / "matched", ("bad", "good"), ("good", "good"))
    assert next(x for x in matched if x.startswith("box AP")).startswith(
        "box AP, at the longest schedule 80 it: CAUGHT UP: random init equivalent to pretrained")


def _seed_run(root: Path, name: str, seed: int, **kw) -> Path:
    d = _run(root, name, **kw)
    config = yaml.safe_load((d / "config.yaml").read_text())
    config["train"] = {"seed": seed}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


def test_runs_that_differ_only_in_the_seed_are_pooled_replicates(tmp_path, case):
    # Seeds are replicates of one arm, never arms of their own: one catch-up row per length, both seeds in it,
    # the seed count and the seed-to-seed spread shown, the interval saying it covers seeds and images.
    for seed, m in ((0, case["good"]), (1, case["bad"])):
        _seed_run(tmp_path, f"rand_s{seed}", seed, pretrained=False, max_iter=40, matches=m)
        _seed_run(tmp_path, f"pre_s{seed}", seed, pretrained=True, max_iter=40, matches=case["good"])
    points = _points(tmp_path)
    assert len({p.pair for p in points}) == 1  # train.seed is not a pairing key
    sec = catch_up(points, _paired())
    table = sec.tables[0]
    cols = table.columns
    box = [r for r in table.rows if r[cols.index("AP")] == "box AP"]
    assert len(box) == 1
    row = box[0]
    assert row[cols.index("seeds")] == "2 / 2"
    assert row[cols.index("runs")] == "rand_s0, rand_s1 / pre_s0, pre_s1"
    aps = [ap_from_matches(case["good"]), ap_from_matches(case["bad"])]
    assert row[cols.index("random init")] == pytest.approx(np.mean(aps))
    assert row[cols.index("random init seed sd")] == pytest.approx(np.std(aps, ddof=1))
    assert row[cols.index("pretrained seed sd")] == 0.0
    assert row[cols.index("interval covers")] == "validation images and training seeds"
    assert "seed-to-seed standard deviation" in table.note and "margin of +-1 AP" in table.note


def test_margin_turns_an_interval_that_holds_0_into_inconclusive(tmp_path, case):
    # A gap the test cannot resolve: with a tight margin it is "inconclusive", never "caught up".
    _run(tmp_path, "rand", pretrained=False, max_iter=40, matches=case["bad"])
    _run(tmp_path, "pre", pretrained=True, max_iter=40, matches=case["good"])
    wide = catch_up(_points(tmp_path), Paired(resamples=300, seed=0, level=0.9999, margin=0.01))
    verdicts = [r[wide.tables[0].columns.index("verdict")] for r in wide.tables[0].rows]
    assert all(v.startswith(("inconclusive", "random init behind")) for v in verdicts), verdicts
    assert not any("caught up" in v or "equivalent" in v for v in verdicts)


def _arm(root: Path, aps: list[float], *, pretrained: bool = False, unit: int = 50, subset: float = 0) -> None:
    for k, ap in enumerate(aps):
        n = unit * 2 ** k
        _run(root, f"{'pre' if pretrained else 'rand'}_{n}", pretrained=pretrained, max_iter=n, ap=ap, subset=subset)


@pytest.mark.parametrize(("aps", "plateaued"), [([20.0, 30.0, 34.5, 35.0], True), ([20.0, 26.0, 29.0, 32.0], False)])
def test_plateau_check_without_intervals_never_calls_a_plateau(tmp_path, aps, plateaued):
    _arm(tmp_path, aps)
    sec = plateau_check(_points(tmp_path))
    gain = aps[-1] - aps[-2]
    assert sec.lines[0] == f"random init, box AP: {plateau_statement(gain)}"
    assert sec.lines[0].startswith("random init, box AP: not shown levelled off (last doubling adds 0.50 < 1 AP, but "
                                   "with no interval" if plateaued else
                                   "random init, box AP: NOT levelled off (last doubling adds 3.00 >= 1 AP)")
    row = sec.tables[0].rows[0]
    assert (row[3], row[5]) == ("rand_400", "rand_200")


def test_plateau_check_covers_both_arms_at_every_data_size(tmp_path):
    _arm(tmp_path / "all", [20.0, 26.0, 29.0])  # all images: still climbing
    _arm(tmp_path / "all", [30.0, 31.0, 31.2], pretrained=True)
    _arm(tmp_path / "small", [20.0, 20.1, 20.2], subset=100)
    sec = plateau_check(_points(tmp_path / "all", tmp_path / "small"))
    assert len(sec.lines) == 6
    assert sum("NOT levelled off" in x and x.startswith("random init, data size: all") for x in sec.lines) == 2
    assert sum(x.startswith("pretrained, data size: all") for x in sec.lines) == 2
    assert sum(x.startswith("random init, data size: 100 images") and "not shown levelled off" in x
               for x in sec.lines) == 2


def test_plateau_interval_decides_levelled_off(tmp_path, case):
    # Identical final matches at both lengths: gain 0 with an interval of [0, 0], under 1 AP: levelled off.
    # A worse shorter run: a gain whose interval lies over 1 AP: not levelled off.
    _run(tmp_path / "flat", "rand_40", pretrained=False, max_iter=40, matches=case["good"])
    _run(tmp_path / "flat", "rand_80", pretrained=False, max_iter=80, matches=case["good"])
    flat = plateau_check(_points(tmp_path / "flat"), _paired())
    assert flat.lines[0].startswith("random init, box AP: levelled off (last doubling adds 0.00 [+0.00, +0.00]")
    _run(tmp_path / "rise", "rand_40", pretrained=False, max_iter=40, matches=case["bad"])
    _run(tmp_path / "rise", "rand_80", pretrained=False, max_iter=80, matches=case["good"])
    rise = plateau_check(_points(tmp_path / "rise"), _paired())
    gain = ap_from_matches(case["good"]) - ap_from_matches(case["bad"])
    assert rise.lines[0].startswith(f"random init, box AP: NOT levelled off (last doubling adds {gain:.2f} [")
    assert plateau_statement(0.5, (-0.4, 1.4)).startswith("not known whether levelled off")


A, B = 40.0, 30.0


def _saturating(images: float, *, c: float, x0: float) -> float:
    return A - B * (images / x0) ** (-1 / c)


def test_prediction_recovers_a_known_plateau_and_validates(tmp_path):
    unit = 50
    images = [IMS * unit * 2 ** k for k in range(5)]
    c = 1.0  # each doubling of images seen halves the gap to the plateau
    _arm(tmp_path, [_saturating(x, c=c, x0=images[0]) for x in images], unit=unit)
    _arm(tmp_path, [38.0, 39.0, 39.5], pretrained=True, unit=unit)
    sec = prediction(_points(tmp_path), _paired())
    fits = {(r[1], r[2], r[3]): r for r in sec.tables[0].rows}
    box = fits[("random init", "own images", "box AP")]
    assert box[4] == "power law"  # the rule's pick: the exact power law predicted its held-out length best
    assert box[6] == pytest.approx(A, abs=0.05)
    reached = fits[("random init", "reaches pretrained's best 39.50", "box AP")]
    # 40 - 30 (x / x0) ** (-1 / c) = 39.5  =>  x = x0 * 60 ** c
    assert reached[6] == pytest.approx(images[0] * 60 ** c, rel=0.02)
    assert any(x.startswith("EXTRAPOLATION, random init, box AP: predicted plateau 40.00") for x in sec.lines)
    assert any("the rule" in x and "picks the power law, and the extrapolations below use it" in x for x in sec.lines)
    holdout = sec.tables[1].rows
    assert [r[4] for r in holdout if r[2] == "box AP"] == ["rand_800"]  # fitted on 50-400 it, predicts 800 it
    assert all(abs(r[8]) < 0.05 for r in holdout)
    assert any(x.startswith("validation, random init, box AP: the power law fitted on the 4 lengths")
               and "mean absolute error 0.0" in x for x in sec.lines)
    # Pretrained has 3 lengths: fitted (exactly), with and without its pre-training counted.
    assert ("pretrained", "images incl. pre-training", "box AP") in fits


def test_a_plateau_above_100_ap_is_not_identified_and_reaching_a_rising_arm_is_not_catching_up(tmp_path):
    # An exact power law whose plateau (150) lies above AP's ceiling while every point is under 100: the fit is
    # exact, its a is no plateau of AP, and the words must not present it as a prediction.
    images = [IMS * 50 * 2 ** k for k in range(5)]
    _arm(tmp_path, [150 - 130 * (x / images[0]) ** (-1 / 3) for x in images])
    _arm(tmp_path, [38.0, 39.0, 39.5], pretrained=True)  # still rising at its longest run
    sec = prediction(_points(tmp_path), _paired())
    table = sec.tables[0]
    row = next(r for r in table.rows if r[1:4] == ["random init", "own images", "box AP"])
    assert row[6] == pytest.approx(150, abs=0.1) and row[table.columns.index("plateau identified")] is False
    line = next(x for x in sec.lines if x.startswith("EXTRAPOLATION, random init, box AP: no plateau identified"))
    assert "no plateau identified: the curve levels off above AP's ceiling of 100" in line
    assert "predicted plateau" not in line
    reach_line = next(x for x in sec.lines if "reaches the pretrained arm's best length" in x and "box AP" in x)
    assert "is not catching up with it" in reach_line
    assert "from a fit with no identified plateau" in reach_line


def test_a_plateau_below_a_measured_ap_is_flagged_and_not_used(tmp_path):
    # The arm peaks at its third length (36.0) and settles lower: the fitted plateau (about 35.6) lies below a
    # measured AP, so the curve does not describe the runs: flagged, and no "reaches" line is read from it.
    _arm(tmp_path, [20.0, 30.0, 36.0, 35.0, 35.5])
    _arm(tmp_path, [38.0, 39.0, 39.5], pretrained=True)
    sec = prediction(_points(tmp_path), _paired())
    line = next(x for x in sec.lines if x.startswith("EXTRAPOLATION, random init, box AP"))
    assert "FLAGGED: the plateau lies below a measured AP (36.00)" in line and "is not used" in line
    assert not any("reaches the pretrained arm's best length" in x for x in sec.lines)


def test_prediction_intervals_come_from_joint_resamples_of_each_length(tmp_path):
    # Five lengths, each run finding more of the same 30 images' objects: the plateau's interval is the power
    # law refitted on joint resamples of those images (each length's own uncertainty), and says so.
    dataset, results = _case()
    gt = coco_from_dict(dataset)
    for k, share in enumerate((0.7, 0.5, 0.35, 0.27, 0.23)):
        n = 50 * 2 ** k
        _run(tmp_path, f"rand_{n}", pretrained=False, max_iter=n,
             matches=per_image_matches(gt, _worse(results, share), "bbox"))
    sec = prediction(_points(tmp_path), _paired())
    table = sec.tables[0]
    box = next(r for r in table.rows if r[1:4] == ["random init", "own images", "box AP"])
    lo, hi = box[table.columns.index("95% lo")], box[table.columns.index("95% hi")]
    assert lo is not None and lo < box[6] < hi
    line = next(x for x in sec.lines if x.startswith("EXTRAPOLATION, random init, box AP"))
    assert "refitted on 300 joint resamples of validation images and seeds" in line
    # Four lengths: 3 shorter ones cannot test a 3-parameter form, so no form is compared with another (the line,
    # tested alone, would win without a competitor): the power law, said to be an untested guess, with no interval.
    (tmp_path / "rand_800" / "metrics.jsonl").unlink()
    (tmp_path / "rand_800" / "config.yaml").unlink()
    (tmp_path / "rand_800").rmdir()
    four = prediction(_points(tmp_path), _paired())
    assert any("no arm has the lengths to test every form" in x and "untested here" in x for x in four.lines)
    line = next(x for x in four.lines if x.startswith("EXTRAPOLATION, random init, box AP"))
    assert "no interval: 4 lengths for 3 parameters, and an interval needs 5" in line


def test_prediction_reads_seed_means_and_compares_forms_on_the_same_arms(tmp_path):
    # Two seeds 1 AP either side of an exact power law at 6 lengths: the fit through their means is exact, and
    # the seed above the curve at the longest length must not flag its plateau as "below a measured AP".
    unit = 50
    images = [IMS * unit * 2 ** k for k in range(6)]
    for k, x in enumerate(images):
        for seed, off in ((0, -1.0), (1, 1.0)):
            _run(tmp_path, f"rand_{unit * 2 ** k}_s{seed}", pretrained=False, max_iter=unit * 2 ** k, seed=seed,
                 ap=_saturating(x, c=1.0, x0=images[0]) + off)
    # Pretrained: 4 lengths, where only the log-linear line can be tested; it must not count in the comparison.
    _arm(tmp_path, [36.0, 37.0, 38.0, 39.0], pretrained=True, unit=unit)
    sec = prediction(_points(tmp_path), _paired())
    line = next(x for x in sec.lines if x.startswith("EXTRAPOLATION, random init, box AP"))
    assert "plateau 40.00" in line and "FLAGGED" not in line
    assert any("over 2 arm and AP-type pair(s) where every form could be tested" in x and "picks the power law" in x
               for x in sec.lines)  # random init's box and mask AP; not pretrained's 4 lengths
    reach_line = next(x for x in sec.lines if "reaches the pretrained arm's best length" in x and "box AP" in x)
    assert "(pre_400: 39.00, its seeds' mean)" in reach_line and "no interval: no replicates" in reach_line


def test_prediction_with_too_few_lengths_says_so(tmp_path):
    _arm(tmp_path, [20.0, 26.0])
    sec = prediction(_points(tmp_path), _paired())
    assert not sec.tables and not sec.lines
    assert "random init, box AP: 2 schedule length(s); the power law needs 3: no prediction" in sec.missing


def test_breakdown_says_whether_scratch_overfits(tmp_path, case):
    # 100 images: random init ends with a lower training loss than pretrained and a val AP lower beyond its interval.
    _run(tmp_path, "rand", pretrained=False, max_iter=40, matches=case["bad"], subset=100, losses=(2.0, 0.2))
    _run(tmp_path, "pre", pretrained=True, max_iter=40, matches=case["good"], subset=100, losses=(1.5, 0.6))
    _run(tmp_path, "rand_all", pretrained=False, max_iter=40, matches=case["bad"], losses=(2.0, 1.2))
    _run(tmp_path, "pre_all", pretrained=True, max_iter=40, matches=case["good"], losses=(1.5, 0.6))
    _run(tmp_path, "rand_1k", pretrained=False, max_iter=40, matches=case["bad"], subset=1000, losses=(2.0, 1.2))
    _run(tmp_path, "pre_1k", pretrained=True, max_iter=40, matches=case["good"], subset=1000, losses=(1.5, 0.6))
    sec = breakdown(_points(tmp_path), _paired())
    assert len(sec.lines) == 2 and all(x.startswith("100 images, 40 it, ") for x in sec.lines)
    assert "random init overfits: training loss at the end 0.200 vs pretrained's 0.600" in sec.lines[0]
    assert sec.figure is not None and sec.stem == "breakdown"


def test_breakdown_not_shown_when_scratch_loss_stays_higher(tmp_path, case):
    _run(tmp_path, "rand", pretrained=False, max_iter=40, matches=case["bad"], subset=100, losses=(2.0, 0.9))
    _run(tmp_path, "pre", pretrained=True, max_iter=40, matches=case["good"], subset=100, losses=(1.5, 0.6))
    sec = breakdown(_points(tmp_path), _paired())
    assert all("overfitting not shown (its training loss stays higher)" in x for x in sec.lines)


def test_report_page_holds_the_catch_up_table_and_verdicts(tmp_path, case):
    root = tmp_path / "study"
    for n, scratch in ((40, "good"), (80, "bad")):
        _run(root, f"rand_{n}", pretrained=False, max_iter=n, matches=case[scratch], subset=100, losses=(2.0, 0.3))
        _run(root, f"pre_{n}", pretrained=True, max_iter=n, matches=case["good"], subset=100, losses=(1.5, 0.6))
    out = tmp_path / "report"
    result = build_report([root], out, resamples=200)
    page = (out / "index.html").read_text()
    assert "<h2>Catch-up: random init vs pretrained, with intervals</h2>" in page
    assert "random init equivalent to pretrained within +-1 AP" in page
    assert "random init behind pretrained by" in page
    assert "last doubling adds" in page and "Breakdown regime" in page
    # Every figure inlined, captioned: Fig. 1, the breakdown, AP vs seen (pre-training counted), Fig. 2's bars.
    assert page.count("<figure>") == page.count("<figcaption>") == page.count("data:image/png;base64,") == 4
    with open(out / "tables" / "catch_up.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["AP"] for r in rows} == {"box AP", "mask AP"}
    text = (out / "findings.txt").read_text()
    assert "random init behind pretrained by" in text and "== Plateau check" in text
    assert (out / "breakdown.png").is_file() and (out / "ap_vs_seen.png").is_file()
    assert any(t.csv_name == "catch_up.csv" for t in result["tables"])


def test_report_of_old_runs_without_matches_still_builds(tmp_path):
    root = tmp_path / "study"
    for n in (40, 80):
        _run(root, f"rand_{n}", pretrained=False, max_iter=n, ap=20.0 + n / 10)
        _run(root, f"pre_{n}", pretrained=True, max_iter=n, ap=30.0 + n / 10)
    out = tmp_path / "report"
    build_report([root], out, resamples=200)
    page = (out / "index.html").read_text()
    assert "no per-image matches in run rand_40 (trained before they were recorded): no intervals" in page
    with open(out / "tables" / "catch_up.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["verdict"] == "no interval (no per-image matches)" and float(rows[0]["random init"]) == 24.0
    assert rows[0]["random init 95% lo"] == ""
    assert "NOT levelled off (last doubling adds 4.00 &gt;= 1 AP)" in page  # escaped on the page


def test_analyze_refuses_too_few_resamples():
    with pytest.raises(ValueError, match="at least 200"):
        analyze([], resamples=50)


def test_stale_matches_of_an_earlier_final_evaluation_are_not_used(tmp_path, case):
    # A run extended from 40 to 80 iterations: its 40 it matches record scored another model than its final AP's.
    d = _run(tmp_path, "rand", pretrained=False, max_iter=80, matches=case["bad"])
    _run(tmp_path, "pre", pretrained=True, max_iter=80, matches=case["good"])
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    lines = [{**x, "iteration": 40} if "matches" in x else x for x in lines]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    sec = catch_up(_points(tmp_path), _paired())
    assert sec.missing == ["no per-image matches in run rand (trained before they were recorded): no intervals"]


def test_plateau_pairs_each_seeds_lengths(tmp_path, case):
    # Two seeds a level apart, each gaining the same from 40 to 80 it: seed 0 from the worst matches to the
    # middle ones, seed 1 from the middle to the best.  Paired by seed every resample sees a gain well over 1 AP;
    # drawn apart, seed 1's short run meets seed 0's long one (the same matches: no gain) and the interval
    # reaches under 1 AP.
    dataset, results = _case()
    mid = per_image_matches(coco_from_dict(dataset), _worse(results, 0.25), "bbox")
    levels = [(case["bad"], mid), (mid, case["good"])]
    for seed, (short, long_) in enumerate(levels):
        _seed_run(tmp_path, f"rand_40_s{seed}", seed, pretrained=False, max_iter=40, matches=short)
        _seed_run(tmp_path, f"rand_80_s{seed}", seed, pretrained=False, max_iter=80, matches=long_)
    gains = [ap_from_matches(b) - ap_from_matches(a) for a, b in levels]
    assert min(gains) > 2  # each seed's own gain
    sec = plateau_check(_points(tmp_path), _paired())
    row = sec.tables[0].rows[0]
    assert row[3] == "rand_80_s0, rand_80_s1" and row[5] == "rand_40_s0, rand_40_s1"
    assert row[8] > 1, row  # the gain's interval, paired by seed, lies over 1 AP
    assert sec.lines[0].startswith("random init, box AP: NOT levelled off"), sec.lines[0]


def test_a_removed_config_key_does_not_split_runs(tmp_path, case):
    # Runs saved before solver.fp32_cpu_scale was removed hold it in config.yaml; mixed with newer runs (seed 0
    # old, seed 1 new, both inits) it must not become a report dimension: pairs and seed replicates would split.
    for seed in (0, 1):
        for pretrained in (False, True):
            d = _seed_run(tmp_path, f"{'pre' if pretrained else 'rand'}_s{seed}", seed, pretrained=pretrained,
                          max_iter=40, matches=case["good"])
            if seed == 0:
                config = yaml.safe_load((d / "config.yaml").read_text())
                config["solver"]["fp32_cpu_scale"] = 0.65
                (d / "config.yaml").write_text(yaml.safe_dump(config))
    points = _points(tmp_path)
    assert len({p.pair for p in points}) == 1
    rows = catch_up(points, _paired()).tables[0].rows
    assert len(rows) == 2 and all(r[2] == "2 / 2" for r in rows)  # box and mask, one pair of two seeds each
