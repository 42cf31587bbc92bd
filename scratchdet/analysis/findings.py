"""The study's answers to "Rethinking ImageNet Pre-training"'s questions, from each run's final records.

``scratchdet report`` turns its runs into ``Point`` s (one per run: the pairing is report.py's ``dims`` and
``pair_key``; this module imports nothing of report.py, which imports it) and ``analyze`` answers:

1. catch-up (Table 1): random init against its pretrained twin per schedule length, AP with paired
   bootstrap intervals from the final evaluation's per-image matches (``bootstrap.py``);
2. plateau: does the last doubling of the random-init arm's schedule (largest data size) still add >= 1 AP?
3. prediction (an extrapolation): a saturating fit of final AP against images seen (``curvefit.py``), the
   random-init plateau, where it reaches the pretrained arm's best, and a holdout check of the fit;
4. breakdown (Sec. 5.2, Figs. 7-8): on the smallest data subset, does random init overfit (training loss as
   low as pretrained's, val AP lower by more than its interval)?
5. AP against images and pixels seen, pre-training counted (Fig. 2's argument).

Each answer says what it lacks when the runs do not have it, instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from ..evaluation import Matches, matches_from_record
from .bootstrap import DEFAULT_MARGIN, length_replicates, replicate_bootstrap, verdict, verdict_kind
from .curvefit import (
    FORM_PARAMS,
    MIN_POINTS_FOR_INTERVAL,
    CurveFit,
    choose_form,
    fit_curve,
    holdout_error,
    leave_last_out,
    reach,
)

IOU_TYPES = ("bbox", "segm")
TYPE_TITLES = {"bbox": "box AP", "segm": "mask AP"}
RANDOM, PRETRAINED = "random init", "pretrained"  # report.py's wording of the two arms
ARM_COLORS = {False: "#1f77b4", True: "#ff7f0e"}
GROUP_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
AP_CEILING = 100.0  # COCO AP is a percentage: a fitted plateau above it is no plateau of AP
PLATEAU_GAIN = 1.0  # AP points: a last doubling adding less is a plateau (the paper's curves flatten to ~0.5)
END_SHARE = 0.1  # "training loss at the end": the mean over the log lines of the last 10 % of iterations


@dataclass
class Point:
    """One run as the findings read it: what it is, what it saw, where it ended."""

    name: str
    pretrained: bool
    pair: tuple[str, ...]  # equal for a random-init run and its pretrained twin (report.pair_key)
    group: tuple[str, ...]  # ``pair`` without the schedule: the arm, init aside
    group_label: str  # the group in words ("data size: 150 images"), "" when there is one group
    schedule: str
    subset: float  # data.subset: 0 all, a count, or a fraction
    subset_label: str
    images: int  # images seen in detection training
    pixels: int
    pretrain_images: int | None  # None: the run's records carry no pre-training counts
    pretrain_pixels: int | None
    ap: dict[str, float]  # AP per iou type: the final evaluation's, or the best one's (``ap_mode``)
    finished: bool | None
    matches: dict[str, Any] | None  # the final evaluation's matches record per iou type, None when not recorded
    losses: list[tuple[int, float]] = field(default_factory=list)  # (iteration, training loss) per log line
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (iteration, AP per type)
    seed: int = 0  # train.seed: runs that differ only in it are replicates
    ap_mode: str = "final"  # report --ap: "final" (the last evaluation) or "best" (the best by box AP)
    matches_note: str = ""  # why ``matches`` is None though the run recorded them (its best is not its final)

    @property
    def arm(self) -> str:
        return PRETRAINED if self.pretrained else RANDOM

    @property
    def size_rank(self) -> tuple[bool, float]:
        """Sorts data sizes small to large ("all", subset 0, last)."""
        return (self.subset == 0, self.subset)


class TableData(NamedTuple):
    """A table as report.py's ``Table`` takes it."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str
    csv_name: str


@dataclass
class Section:
    """One answer: its statements, tables and (optionally) a figure with its caption."""

    title: str
    lines: list[str] = field(default_factory=list)
    tables: list[TableData] = field(default_factory=list)
    figure: Figure | None = None
    stem: str = ""
    caption: str = ""
    missing: list[str] = field(default_factory=list)  # what the runs lack for this answer
    # The verdicts the overall answer reads (``answer``): catch-up's at each group's longest schedule per AP type,
    # (group label, AP type) -> (schedule, verdict kind, words); the plateau check's, (group label, pretrained,
    # AP type) -> (levelled off, words).
    facts: dict[tuple[Any, ...], Any] = field(default_factory=dict)


def _count(x: float) -> str:
    if math.isinf(x):
        return "never"
    return f"{x:,.0f}"


def _level(level: float) -> str:
    return f"{100 * level:g}%"


def _pairs(points: list[Point]) -> list[tuple[Point, Point]]:
    """(random init, pretrained twin) per pair key, first of each where a key holds several."""
    by: dict[tuple[str, ...], dict[bool, Point]] = {}
    for p in points:
        by.setdefault(p.pair, {}).setdefault(p.pretrained, p)
    return [(v[False], v[True]) for v in by.values() if False in v and True in v]


def _replicates(points: list[Point]) -> list[tuple[list[Point], list[Point]]]:
    """(random-init runs, pretrained runs) per pair key: the runs that differ only in train.seed are one
    arm's replicates (report.dims leaves the seed out of the key), pooled, never arms of their own."""
    by: dict[tuple[str, ...], dict[bool, list[Point]]] = {}
    for p in points:
        by.setdefault(p.pair, {}).setdefault(p.pretrained, []).append(p)

    def finished(runs: list[Point]) -> list[Point]:
        # An unfinished replicate's AP is not its length's final AP: pooled only where no replicate finished
        # (the row then says the run is unfinished).
        done = [p for p in runs if p.finished is not False]
        return done or runs

    return [(finished(v[False]), finished(v[True])) for v in by.values() if False in v and True in v]


def _arms(points: list[Point]) -> dict[tuple[tuple[str, ...], bool], list[Point]]:
    """(group, pretrained) -> the arm's finished runs, shortest first (one per schedule length)."""
    out: dict[tuple[tuple[str, ...], bool], list[Point]] = {}
    for p in points:
        if p.finished is not False:  # an unfinished run's AP is not its length's final AP
            out.setdefault((p.group, p.pretrained), []).append(p)
    return {k: sorted(v, key=lambda p: p.images) for k, v in out.items()}


def _missing_matches(p: Point) -> str:
    if p.matches_note:
        return p.matches_note
    if p.finished is False:
        return f"run {p.name} is unfinished (no final evaluation): no intervals"
    return f"no per-image matches in run {p.name} (trained before they were recorded): no intervals"


class Paired:
    """Bootstraps of (random init, pretrained) at their final evaluations over validation images and seeds
    (``replicate_bootstrap``), computed once per pair of arms and type."""

    def __init__(self, *, resamples: int, seed: int, level: float, margin: float = DEFAULT_MARGIN) -> None:
        self.resamples, self.seed, self.level, self.margin = resamples, seed, level, margin
        self._cache: dict[tuple[Any, ...], dict | list[str]] = {}
        self._decoded: dict[tuple[str, str], Matches] = {}

    def matches(self, p: Point, iou_type: str) -> Matches | None:
        """The run's final per-image matches of ``iou_type``, decoded once; None where it recorded none."""
        if not p.matches or iou_type not in p.matches:
            return None
        key = (p.name, iou_type)
        if key not in self._decoded:
            self._decoded[key] = matches_from_record(p.matches[iou_type])
        return self._decoded[key]

    def get(self, scratch: Point | list[Point], pre: Point | list[Point], iou_type: str, *,
            paired_seeds: bool = False) -> dict | list[str]:
        """The bootstrap (a = pretrained, b = random init: diff is random init - pretrained), each arm one run
        or its seed replicates, or why there is none."""
        scratch_runs = scratch if isinstance(scratch, list) else [scratch]
        pre_runs = pre if isinstance(pre, list) else [pre]
        key = (tuple(p.name for p in scratch_runs), tuple(p.name for p in pre_runs), iou_type, paired_seeds)
        if key not in self._cache:
            ms = [self.matches(q, iou_type) for q in scratch_runs]
            mp = [self.matches(q, iou_type) for q in pre_runs]
            missing = [_missing_matches(q) for q, m in zip(scratch_runs + pre_runs, ms + mp) if m is None]
            if missing:
                self._cache[key] = missing
            else:
                try:
                    self._cache[key] = replicate_bootstrap(mp, ms, resamples=self.resamples, seed=self.seed,
                                                           level=self.level, paired_seeds=paired_seeds)
                except ValueError as e:  # different validation sets: no pairing to be had
                    self._cache[key] = [f"{scratch_runs[0].name} vs {pre_runs[0].name}: {e}"]
        return self._cache[key]


# --------------------------------------------------------------------------- 1. catch-up


def catch_up(points: list[Point], paired: Paired) -> Section:
    """Table 1 with intervals: per schedule length (and data size), random init, pretrained and their difference,
    each arm's seeds pooled, read against the equivalence margin."""
    sec = Section("Catch-up: random init vs pretrained, with intervals (Table 1)")
    groups = sorted(_replicates(points), key=lambda sp: (sp[0][0].size_rank, sp[0][0].group, sp[0][0].images))
    if not groups:
        sec.missing.append("no random-init run with a pretrained twin (same config but model.init): no catch-up table")
        return sec
    lv = _level(paired.level)
    several_groups = len({s[0].group for s, _ in groups}) > 1
    columns = ["schedule", *(["arm"] if several_groups else []), "AP", "seeds", f"{RANDOM}", f"{RANDOM} {lv} lo",
               f"{RANDOM} {lv} hi", f"{RANDOM} seed sd", PRETRAINED, f"{PRETRAINED} {lv} lo", f"{PRETRAINED} {lv} hi",
               f"{PRETRAINED} seed sd", f"{RANDOM} - {PRETRAINED}", "difference lo", "difference hi", "interval covers",
               "verdict", "runs"]
    rows = []
    for ss, ps in groups:
        s = ss[0]
        for t in IOU_TYPES:
            ss_t, ps_t = [q for q in ss if t in q.ap], [q for q in ps if t in q.ap]
            if not ss_t or not ps_t:
                continue
            got = paired.get(ss_t, ps_t, t)
            head = [s.schedule, *([s.group_label] if several_groups else []), TYPE_TITLES[t], f"{len(ss_t)} / {len(ps_t)}"]
            names = f"{', '.join(q.name for q in ss_t)} / {', '.join(q.name for q in ps_t)}"
            if isinstance(got, list):
                for m in got:
                    _note(sec, m)
                sap, pap = (sum(q.ap[t] for q in g) / len(g) for g in (ss_t, ps_t))
                rows.append([*head, sap, None, None, None, pap, None, None, None, round(sap - pap, 4), None, None, None,
                             "no interval (no per-image matches)", names])
                continue
            (slo, shi), (plo, phi), (dlo, dhi) = got["interval_b"], got["interval_a"], got["interval_diff"]
            text = verdict(got["diff"], dlo, dhi, name_a=PRETRAINED, name_b=RANDOM, margin=paired.margin)
            rows.append([*head, got["ap_b"], slo, shi, got["seed_sd_b"], got["ap_a"], plo, phi, got["seed_sd_a"],
                         got["diff"], dlo, dhi, got["covers"], text, names])
            where = f"{s.schedule}{', ' + s.group_label if s.group_label else ''}, {TYPE_TITLES[t]}"
            sec.lines.append(f"{where} ({len(ss_t)} / {len(ps_t)} seeds; the interval covers {got['covers']}): {text}")
            kind = verdict_kind(dlo, dhi, paired.margin)
            sec.facts[(s.group_label, t)] = (s.schedule, kind, text)  # rows run shortest first: the longest stays
    note = ("Final AP (%)." if all(r[-2].startswith("no interval") for r in rows) else
            f"Final AP (%), each arm the mean over its seeds (runs that differ only in train.seed are replicates, "
            f"pooled), with {lv} percentile intervals of a two-stage bootstrap ({paired.resamples} resamples, seed "
            f"{paired.seed}): validation images drawn with replacement (the same draw for both arms, which pairs "
            "them), then each arm's seeds with replacement. 'seed sd' is the seed-to-seed standard deviation of AP "
            "(none with one seed, where the interval covers the images only). Verdicts against an equivalence "
            f"margin of +-{paired.margin:g} AP (report --margin): equivalent only when the whole interval of the "
            "difference lies inside it; an interval that holds 0 but reaches past it is inconclusive, not caught up.")
    sec.tables.append(TableData("Catch-up: random init vs pretrained, with intervals", columns, rows, note,
                                "catch_up.csv"))
    return sec


# --------------------------------------------------------------------------- 2. plateau


def last_doubling(arm: list[Point], iou_type: str) -> tuple[Point, Point] | None:
    """(shorter, longest): the longest run and the one with half its images seen, else the nearest shorter than
    half, else the nearest shorter at all; None with fewer than two lengths."""
    runs = sorted((p for p in arm if iou_type in p.ap), key=lambda p: p.images)
    if len(runs) < 2:
        return None
    longest = runs[-1]
    shorter = [p for p in runs[:-1] if p.images < longest.images]
    if not shorter:
        return None
    half = [p for p in shorter if p.images <= longest.images / 2]
    # At most half: a span of a doubling or more, so a small gain over it is a plateau all the more.
    return (half[-1] if half else shorter[-1]), longest


def levelled_off(interval: tuple[float, float] | None) -> bool:
    """The plateau check's rule: the last doubling's whole gain interval under the threshold (none: never)."""
    return interval is not None and interval[1] < PLATEAU_GAIN


def plateau_statement(gain: float, interval: tuple[float, float] | None = None) -> str:
    """The plateau check's words for the last doubling's gain in AP points and its interval: "levelled off" only
    when the whole interval lies under the threshold; with no interval, a small gain is not called a plateau."""
    if interval is None:
        if gain < PLATEAU_GAIN:
            return (f"not shown levelled off (last doubling adds {gain:.2f} < {PLATEAU_GAIN:g} AP, but with no "
                    "interval: no per-image matches)")
        return (f"NOT levelled off (last doubling adds {gain:.2f} >= {PLATEAU_GAIN:g} AP): the longest schedule is too "
                "short to answer")
    lo, hi = interval
    ci = f"{gain:.2f} [{lo:+.2f}, {hi:+.2f}]"
    if levelled_off(interval):
        return f"levelled off (last doubling adds {ci}, all of the interval under {PLATEAU_GAIN:g} AP)"
    if lo >= PLATEAU_GAIN:
        return (f"NOT levelled off (last doubling adds {ci}, all of the interval at or over {PLATEAU_GAIN:g} AP): the "
                "longest schedule is too short to answer")
    return (f"not known whether levelled off (last doubling adds {ci}: the interval straddles {PLATEAU_GAIN:g} AP); "
            "a longer schedule or more seeds would tell")


def plateau_check(points: list[Point], paired: Paired | None = None) -> Section:
    """Each arm at each data size: what its last doubling of the schedule adds, with the interval of that gain
    (a bootstrap over validation images and seeds, ``replicate_bootstrap`` of the longer runs against the shorter)."""
    sec = Section("Plateau check: each arm's last doubling, with its interval")
    arms = _arms(points)
    if not arms:
        sec.missing.append("no finished run: no plateau check")
        return sec
    rows = []
    for (_, pretrained), arm in sorted(arms.items(), key=lambda kv: (kv[1][0].size_rank, kv[0][1], kv[0][0])):
        label = arm[0].group_label
        who = f"{PRETRAINED if pretrained else RANDOM}{', ' + label if label else ''}"
        for t in IOU_TYPES:
            pair = last_doubling(arm, t)
            if pair is None:
                sec.missing.append(f"{who}: one schedule length only: no doubling to check")
                break
            short, long_ = pair
            shorts = [p for p in arm if p.images == short.images and t in p.ap]
            longs = [p for p in arm if p.images == long_.images and t in p.ap]
            # One seed's lengths share a trunk (schedule branching) and its data order: paired by seed where
            # every seed has both lengths, as the image draw pairs them.
            by_seed = {p.seed: p for p in shorts}, {p.seed: p for p in longs}
            same = sorted(by_seed[0]) == sorted(by_seed[1]) and len(by_seed[0]) == len(shorts) == len(longs)
            if same:
                shorts, longs = [by_seed[0][k] for k in sorted(by_seed[0])], [by_seed[1][k] for k in sorted(by_seed[1])]
            got = paired.get(longs, shorts, t, paired_seeds=same) if paired is not None else ["no bootstrap asked for"]
            if isinstance(got, list):
                gain, interval = (sum(p.ap[t] for p in longs) / len(longs) - sum(p.ap[t] for p in shorts) / len(shorts),
                                  None)
            else:
                gain, interval = got["diff"], got["interval_diff"]
            text = plateau_statement(gain, interval)
            ratio = long_.images / max(short.images, 1)
            span = "" if abs(ratio - 2) < 0.05 else f" (from {short.schedule} to {long_.schedule}: {ratio:.3g}x images)"
            sec.lines.append(f"{who}, {TYPE_TITLES[t]}: {text}{span}")
            sec.facts[(label, pretrained, t)] = (levelled_off(interval), text)
            rows.append([label or short.subset_label, PRETRAINED if pretrained else RANDOM, TYPE_TITLES[t],
                         ", ".join(p.name for p in longs), long_.images, ", ".join(p.name for p in shorts), short.images,
                         round(gain, 4), *(interval if interval else (None, None)), text])
    if rows:
        lv = _level(paired.level) if paired is not None else "95%"
        sec.tables.append(TableData(
            "Plateau check", ["data", "arm", "AP", "longest run(s)", "its images", "shorter run(s)", "its images",
                              "gain", f"gain {lv} lo", f"gain {lv} hi", "statement"], rows,
            f"Every arm at every data size: the longest schedule against the one with half its images (or the nearest "
            f"shorter), each length's seeds pooled; the gain's interval is a bootstrap over validation images and seeds "
            f"(the same image draw for both lengths). Levelled off: the whole interval under {PLATEAU_GAIN:g} AP; at or "
            "over it: not levelled off, the study cannot say where the arm ends; straddling it: not known.",
            "plateau.csv"))
    return sec


# --------------------------------------------------------------------------- 3. prediction


def _fit_line(fit: CurveFit, n: int, measured: float | None = None) -> str:
    """One fit in words.  A plateau the points do not show (c at its search limit) or above AP's ceiling of 100
    is said to be not identified before its number, so that the number is not read as a prediction."""
    lo, hi = fit.interval
    unidentified = _unidentified(fit)
    if fit.form == "log-linear":
        text = (f"log-linear, +{fit.b * math.log(2):.2f} AP per doubling from {n} lengths (rmse {fit.rmse:.2f}): "
                "the chosen form never levels off, so no plateau")
    elif unidentified:
        text = (f"no plateau identified: {'; '.join(unidentified)}; the fit's a = {fit.a:.2f} from {n} lengths "
                f"(rmse {fit.rmse:.2f}) is not a prediction")
    elif math.isnan(lo):
        text = f"plateau {fit.a:.2f} from {n} lengths (rmse {fit.rmse:.2f}), no interval: {fit.why_no_interval}"
    else:
        text = (f"plateau {fit.a:.2f} [{lo:.2f}, {hi:.2f}] from {n} lengths (rmse {fit.rmse:.2f}; the interval: "
                f"the {fit.form} refitted on {len(fit.boot)} joint resamples of validation images and seeds)")
    if measured is not None and fit.plateau < measured:
        text += (f"; FLAGGED: the plateau lies below a measured AP ({measured:.2f}): the curve does not describe "
                 "these runs, and is not used")
    return text


def _unidentified(fit: CurveFit) -> list[str]:
    """Why a saturating fit's plateau may not be read as one (c at its search limit, a above 100 AP); empty
    where it may.  The log-linear form has no plateau to identify, and no reasons here."""
    if fit.form == "log-linear":
        return []
    return ((["the points do not show the bend (c at its search limit)"] if fit.at_bound else [])
            + ([f"the curve levels off above AP's ceiling of {AP_CEILING:g}"] if fit.a > AP_CEILING else []))


def _identified(fit: CurveFit) -> bool:
    """Whether the fit's plateau may be read as one: a saturating form, c inside its search range, a <= 100."""
    return fit.form != "log-linear" and not _unidentified(fit)


def _interval_cells(interval: tuple[float, float]) -> tuple[float | None, float | None]:
    """An interval for a table: None ("-") where there is none (too few points), not nan."""
    return (None, None) if any(math.isnan(v) for v in interval) else interval


def _note(sec: Section, text: str) -> None:
    if text not in sec.missing:
        sec.missing.append(text)


class _Lengths(NamedTuple):
    """One arm's points pooled per schedule length: images seen (x), the seeds' mean AP (y), and the replicates
    (``bootstrap.length_replicates``) or why there are none."""

    xs: np.ndarray
    ys: np.ndarray
    replicates: np.ndarray | None
    why: str
    names: list[str]  # the runs at each length, joined


def _pool_lengths(pts: list[Point], t: str, paired: Paired, *, counted: bool = False,
                  replicates: bool = True) -> _Lengths:
    """``pts`` pooled per length; ``counted``: images seen include the pre-training's; ``replicates``: resample."""
    by: dict[int, list[Point]] = {}
    for p in pts:
        by.setdefault(p.images + ((p.pretrain_images or 0) if counted else 0), []).append(p)
    xs = np.array(sorted(by), float)
    ys = np.array([np.mean([p.ap[t] for p in by[x]]) for x in sorted(by)])
    groups = [sorted(by[x], key=lambda p: p.seed) for x in sorted(by)]
    names = [", ".join(p.name for p in g) for g in groups]
    if not replicates or len(groups) < MIN_POINTS_FOR_INTERVAL:
        return _Lengths(xs, ys, None, "", names)
    matches = [[paired.matches(p, t) for p in g] for g in groups]
    missing = [_missing_matches(p) for g, ms in zip(groups, matches) for p, m in zip(g, ms) if m is None]
    if missing:
        return _Lengths(xs, ys, None, missing[0], names)
    # A seed's lengths share its trunk (schedule branching): paired by seed value, and only where every length
    # has the same seeds; otherwise each length's seeds are drawn apart.
    same_seeds = len({tuple(p.seed for p in g) for g in groups}) == 1
    try:
        rep = length_replicates(matches, resamples=paired.resamples, seed=paired.seed, paired_seeds=same_seeds)
    except ValueError as e:
        return _Lengths(xs, ys, None, str(e), names)
    return _Lengths(xs, ys, rep, "", names)


def _predict_scratch(sec: Section, s_pts: list[Point], p_pts: list[Point], t: str, *, where: str, label: str,
                     fits: list[list[Any]], hold: list[list[Any]], paired: Paired, form: str) -> None:
    """The random-init arm's fit in ``form``, where it reaches the pretrained arm's best, and a holdout check."""
    pooled = _pool_lengths(s_pts, t, paired)
    xs, ys = pooled.xs, pooled.ys
    fit = fit_curve(form, xs, ys, replicates=pooled.replicates, level=paired.level)
    if pooled.why:
        _note(sec, f"{RANDOM}{where}, {TYPE_TITLES[t]}: no interval for the fit: {pooled.why}")
    measured = float(ys.max())  # the best length's seed mean: what the fit is drawn through
    text = _fit_line(fit, len(xs), measured)
    sec.lines.append(f"EXTRAPOLATION, {RANDOM}{where}, {TYPE_TITLES[t]}: "
                     + (f"predicted {text}" if text.startswith("plateau") else text))
    fits.append([label, RANDOM, "own images", TYPE_TITLES[t], fit.form, len(xs),
                 None if fit.form == "log-linear" else fit.a, *_interval_cells(fit.interval), fit.rmse, fit.at_bound,
                 _identified(fit)])
    if p_pts and fit.plateau >= measured:  # a plateau below a measured AP is flagged, and nothing is read from it
        pre = _pool_lengths(p_pts, t, paired, replicates=False)
        k = int(np.argmax(pre.ys))
        target, names = float(pre.ys[k]), pre.names[k]
        r = reach(fit, target)
        where_seen = ("never: the fitted curve stays below it" if math.isinf(r.images) else
                      f"at {_count(r.images)} images seen " + (
                          f"(no interval: {fit.why_no_interval or 'none'})" if math.isnan(r.low) else
                          f"[{_count(r.low)}, {_count(r.high)}]") + f", {r.images / xs.max():.3g}x its longest run's images")
        # Reaching the other arm's best run is catching up only if that arm has stopped rising there.
        still = ("; the pretrained arm's best is its longest run, and reaching an arm that may still rise is not "
                 "catching up with it (its plateau check above)" if k == len(pre.ys) - 1 else "")
        # The reach of an unidentified fit is the curve's local shape carried past the data: its interval is
        # sampling noise only, and the form's own error (the holdout below) can be larger.
        shaky = ("" if _identified(fit) or fit.form == "log-linear" else
                 "; from a fit with no identified plateau: the interval covers sampling noise only, not the form's "
                 "error (the holdout check below)")
        sec.lines.append(f"EXTRAPOLATION, {RANDOM}{where}, {TYPE_TITLES[t]}: reaches the {PRETRAINED} arm's best "
                         f"length ({names}: {target:.2f}, its seeds' mean) {where_seen}{still}{shaky}")
        fits.append([label, RANDOM, f"reaches {PRETRAINED}'s best {target:.2f}", TYPE_TITLES[t], fit.form,
                     len(xs), r.images, *_interval_cells((r.low, r.high)), None, fit.at_bound, None])
    # Validate on the study itself: fit the lengths up to half the longest, predict the longer ones.
    split = float(xs.max()) / 2
    n_train = int((xs <= split).sum())
    if n_train < FORM_PARAMS[form]:
        _note(sec, f"{RANDOM}{where}, {TYPE_TITLES[t]}: {n_train} length(s) up to half the longest; validating the "
              f"{form} needs {FORM_PARAMS[form]}: not validated")
        return
    out = holdout_error(xs, ys, split=split, form=form)
    later = [n for x, n in zip(xs, pooled.names) if x > split]
    rows = [[label, RANDOM, TYPE_TITLES[t], form, name, int(x), float(y), float(y + err), float(err)]
            for name, x, y, err in zip(later, out["xs"], ys[xs > split], out["errors"])]
    hold += rows
    sec.lines.append(f"validation, {RANDOM}{where}, {TYPE_TITLES[t]}: the {form} fitted on the {n_train} lengths up "
                     f"to {_count(split)} images, the {len(rows)} longer predicted with mean absolute error "
                     f"{out['mae']:.2f} AP (" + ", ".join(f"{r[4]}: {r[8]:+.2f}" for r in rows) + ")")


def _compare_forms(sec: Section, arms: dict[tuple[tuple[str, ...], bool], list[Point]]) -> str | None:
    """Every curve form's leave-last-out error on both arms at every data size and AP type, in one table; the
    form the rule fixed in advance (curvefit.choose_form) picks, which the extrapolations then use."""
    rows, errors = [], {f: [] for f in FORM_PARAMS}
    for (_, pretrained), arm in sorted(arms.items(), key=lambda kv: (kv[1][0].size_rank, kv[0][1], kv[0][0])):
        for t in IOU_TYPES:
            pts = [p for p in arm if t in p.ap]
            if len({p.images for p in pts}) < 3:
                continue
            xs, ys = np.array([p.images for p in pts], float), np.array([p.ap[t] for p in pts])
            longest = max(p.images for p in pts)
            row = [pts[0].group_label or pts[0].subset_label, PRETRAINED if pretrained else RANDOM, TYPE_TITLES[t],
                   len(set(xs.tolist())), ", ".join(p.name for p in pts if p.images == longest)]
            errs = {form: leave_last_out(form, xs, ys) for form in FORM_PARAMS}
            row += [None if e is None else round(e, 4) for e in errs.values()]
            # Forms are compared on the same arms only: a form tested where the others could not be (a 2-parameter
            # line on 4 lengths) would win on arms where it had no competitor.
            if all(e is not None for e in errs.values()):
                for form, e in errs.items():
                    errors[form].append(e)
            rows.append(row)
    if not rows:
        return None
    chosen = choose_form(errors)
    complete = len(errors[next(iter(FORM_PARAMS))])
    means = ", ".join(f"{f} {np.mean(np.abs(e)):.2f}" for f, e in errors.items() if e)
    rule = ("the form with the smallest mean absolute leave-last-out error over every arm, data size and AP type "
            "where every form could be tested (fewer parameters within 0.05 AP), fixed before any study was fitted")
    if chosen is None:
        sec.lines.append(f"curve forms: no arm has the lengths to test every form by leave-last-out (the 3-parameter "
                         f"forms need 5; the rule: {rule}); the extrapolations use the power law, untested here: read "
                         "them as a guess")
    else:
        sec.lines.append(f"curve forms: mean absolute leave-last-out error {means} AP over {complete} arm and AP-type "
                         f"pair(s) where every form could be tested (box and mask AP of the same runs are not "
                         f"independent checks); the rule ({rule}) picks the {chosen}, and the extrapolations below use "
                         "it")
    sec.tables.append(TableData(
        "Prediction, forms compared: each fitted without the longest length, predicting it",
        ["data", "init", "AP", "lengths", "longest run", *[f"{f} error" for f in FORM_PARAMS]], rows,
        "Error = predicted - measured AP at the longest length, each form fitted to the shorter ones (a form "
        "needs its parameters + 1 shorter lengths, else '-'). Forms in images seen x, u = ln(x / x0): power law "
        "a - b exp(-u/c); exponential a - b exp(-(x/x0 - 1)/c); log-linear a + b u (never levels off).",
        "prediction_forms.csv"))
    return chosen


def prediction(points: list[Point], paired: Paired) -> Section:
    """Fits of final AP against images seen per arm in the form the rule picks, the random-init plateau, its reach,
    a holdout check; intervals from refits on joint resamples of each length's validation images and seeds."""
    sec = Section("Prediction (an extrapolation, not a measurement)")
    arms = _arms(points)
    forms = Section("")  # stated first on the page, its table last
    form = _compare_forms(forms, arms) or "power law"
    fits, hold = [], []
    for group in sorted({g for g, _ in arms}, key=lambda g: arms.get((g, False), arms.get((g, True)))[0].size_rank):
        scratch, pre = arms.get((group, False), []), arms.get((group, True), [])
        label = (scratch or pre)[0].group_label
        where = f", {label}" if label else ""
        for t in IOU_TYPES:
            s_pts = [p for p in scratch if t in p.ap]
            p_pts = [p for p in pre if t in p.ap]
            if len({p.images for p in s_pts}) < FORM_PARAMS[form]:
                _note(sec, f"{RANDOM}{where}, {TYPE_TITLES[t]}: {len({p.images for p in s_pts})} schedule length(s); "
                      f"the {form} needs {FORM_PARAMS[form]}: no prediction")
            else:
                _predict_scratch(sec, s_pts, p_pts, t, where=where, label=label, fits=fits, hold=hold, paired=paired,
                                 form=form)
            for counted in (False, True):
                if len({p.images for p in p_pts}) < FORM_PARAMS[form]:
                    _note(sec, f"{PRETRAINED}{where}, {TYPE_TITLES[t]}: {len({p.images for p in p_pts})} schedule "
                          f"length(s); the {form} needs {FORM_PARAMS[form]}: no fit")
                    break
                if counted and any(p.pretrain_images is None for p in p_pts):
                    _note(sec, f"{PRETRAINED}{where}: no pretrain_images_seen in its records: no fit with pre-training "
                          "counted")
                    break
                pooled = _pool_lengths(p_pts, t, paired, counted=counted)
                pf = fit_curve(form, pooled.xs, pooled.ys, replicates=pooled.replicates, level=paired.level)
                axis = "images incl. pre-training" if counted else "own images"
                sec.lines.append(f"EXTRAPOLATION, {PRETRAINED}{where}, {TYPE_TITLES[t]} ({axis}): "
                                 f"{_fit_line(pf, len(pooled.xs), float(max(p.ap[t] for p in p_pts)))}")
                fits.append([label, PRETRAINED, axis, TYPE_TITLES[t], pf.form, len(pooled.xs),
                             None if pf.form == "log-linear" else pf.a, *_interval_cells(pf.interval), pf.rmse,
                             pf.at_bound, _identified(pf)])
    sec.lines[:0] = forms.lines
    lv = _level(paired.level)
    if fits:
        sec.tables.append(TableData(
            f"Prediction: fits of {points[0].ap_mode} AP against images seen (extrapolation)",
            ["arm", "init", "x / target", "AP", "form", "lengths", "plateau (AP) or images to reach", f"{lv} lo",
             f"{lv} hi", "rmse", "c at search limit", "plateau identified"], fits,
            f"The form the rule picked (table below), fitted to each length's {points[0].ap_mode} AP (seeds pooled); "
            "intervals: the form refitted on joint resamples of every length's validation images and seeds "
            f"(none from fewer lengths than its parameters + 2). A plateau is identified only where c stayed inside "
            f"its search range and the plateau is at most {AP_CEILING:g} AP; otherwise its number is the fit's a, not a "
            "prediction. The exponential is unchanged by shifting x, so counting the pre-training's images leaves its "
            "plateau as it is. An extrapolation beyond the longest run: a model's guess, not a measurement.",
            "prediction.csv"))
    if hold:
        sec.tables.append(TableData(
            "Prediction, validated: fitted up to half the longest length, the longer lengths predicted",
            ["arm", "init", "AP", "form", "run(s)", "images", "seen AP", "predicted AP", "error"], hold,
            "Error = predicted - seen, AP points.", "prediction_holdout.csv"))
    sec.tables += forms.tables
    return sec


# --------------------------------------------------------------------------- 4. breakdown


def end_loss(p: Point) -> float | None:
    """Mean training loss over the log lines of the last ``END_SHARE`` of the run's iterations (one line at least)."""
    if not p.losses:
        return None
    last = max(it for it, _ in p.losses)
    tail = [v for it, v in p.losses if it >= last * (1 - END_SHARE)]
    return float(np.mean(tail))


def best_ap(p: Point, iou_type: str) -> float | None:
    vals = [ap[iou_type] for _, ap in p.evals if iou_type in ap]
    return max(vals) if vals else None


def overfit_statement(scratch: Point, pre: Point, iou_type: str, paired: Paired) -> str:
    """Whether random init overfits: training loss at the end as low as pretrained's or lower while its best val AP
    is lower by more than its interval (the final evaluation's paired interval, moved to the gap of the bests)."""
    head = f"{scratch.subset_label}, {scratch.schedule}, {TYPE_TITLES[iou_type]}: "
    ls, lp = end_loss(scratch), end_loss(pre)
    bs, bp = best_ap(scratch, iou_type), best_ap(pre, iou_type)
    if ls is None or lp is None:
        return head + f"not shown: no training loss logged in {scratch.name if ls is None else pre.name}"
    if bs is None or bp is None:
        return head + f"not shown: no validation AP in {scratch.name if bs is None else pre.name}"
    got = paired.get(scratch, pre, iou_type)
    gap = bs - bp
    if isinstance(got, list):
        return head + f"not shown: {'; '.join(got)} (best val AP {RANDOM} - {PRETRAINED}: {gap:+.2f})"
    d, (lo, hi) = got["diff"], got["interval_diff"]
    glo, ghi = gap + lo - d, gap + hi - d
    losses = f"training loss at the end {ls:.3f} vs {PRETRAINED}'s {lp:.3f}"
    gap_text = f"best val {TYPE_TITLES[iou_type]} {RANDOM} - {PRETRAINED}: {gap:+.2f} [{glo:+.2f}, {ghi:+.2f}]"
    if ls <= lp and ghi < 0:
        return head + f"{RANDOM} overfits: {losses} (as low or lower), while its {gap_text} (lower beyond the interval)"
    why = "its training loss stays higher" if ls > lp else "its val AP is not lower beyond the interval"
    return head + f"overfitting not shown ({why}): {losses}; {gap_text}"


def breakdown_figure(pairs: list[tuple[Point, Point]]) -> Figure:
    """Per pair: training loss (left) and val box / mask AP (right) against iteration, one colour per arm."""
    fig = Figure(figsize=(11, 0.6 + 3.2 * len(pairs)), dpi=100)
    axes = np.atleast_2d(fig.subplots(len(pairs), 2, squeeze=False))
    for row, (s, p) in zip(axes, pairs):
        for q in (s, p):
            ls = "--" if q.pretrained else "-"
            c = ARM_COLORS[q.pretrained]
            if q.losses:
                row[0].plot(*zip(*q.losses), color=c, ls=ls, lw=1.8)
            for t, marker, alpha in (("bbox", "o", 1.0), ("segm", "s", 0.55)):
                pts = [(it, ap[t]) for it, ap in q.evals if t in ap]
                if pts:
                    row[1].plot(*zip(*pts), color=c, ls=ls, lw=1.8, marker=marker, ms=4, alpha=alpha)
        row[0].set_ylabel("training loss")
        row[1].set_ylabel("val AP (%)")
        for ax, name in zip(row, ("training loss", "validation AP")):
            ax.set_title(f"{name}: {s.subset_label}, {s.schedule}", fontsize=10)
            ax.set_xlabel("iterations of detection training")
            ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=ARM_COLORS[False], lw=2, ls="-", label=RANDOM),
               Line2D([], [], color=ARM_COLORS[True], lw=2, ls="--", label=PRETRAINED),
               Line2D([], [], color="k", marker="o", ls="", label="box AP"),
               Line2D([], [], color="k", marker="s", ls="", alpha=0.55, label="mask AP")]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (0.6 + 3.2 * len(pairs))))
    return fig


def breakdown(points: list[Point], paired: Paired) -> Section:
    """The smallest data subset: training loss and val AP per arm, and whether random init overfits."""
    sec = Section("Breakdown regime: the smallest data subset (Sec. 5.2, Figs. 7-8)")
    subsets = sorted({p.subset for p in points if p.subset > 0})
    if not subsets:
        sec.missing.append("no run trains on a data.subset: no breakdown check")
        return sec
    # Fractions and counts do not compare; the smallest of either kind is the one to look at.
    small = min(subsets, key=lambda x: (x >= 1, x))
    pairs = [(s, p) for s, p in _pairs(points) if s.subset == small]
    if not pairs:
        sec.missing.append(f"no random-init run with a pretrained twin at data.subset {small:g}: no breakdown check")
        return sec
    longest: dict[tuple[str, ...], tuple[Point, Point]] = {}
    for s, p in pairs:  # the longest schedule per arm: its curves hold the shorter ones' (schedule branching)
        if s.group not in longest or s.images > longest[s.group][0].images:
            longest[s.group] = (s, p)
    chosen = list(longest.values())[:4]
    for s, p in chosen:
        for t in IOU_TYPES:
            if t in s.ap and t in p.ap:
                sec.lines.append(overfit_statement(s, p, t, paired))
    if any(s.losses or p.losses for s, p in chosen):
        sec.figure = breakdown_figure(chosen)
        sec.stem = "breakdown"
        sec.caption = (f"Training loss (left; the log lines' total loss) and validation AP (right; box AP circles, mask "
                       f"AP squares, faint) against iterations of detection training, on the smallest data subset "
                       f"({chosen[0][0].subset_label}): {RANDOM} solid blue, {PRETRAINED} dashed orange. Overfitting "
                       "shows as a training loss as low as the pretrained arm's with a lower val AP.")
    else:
        sec.missing.append("no training loss ('loss') in the log records: no breakdown figure")
    return sec


# --------------------------------------------------------------------------- 5. AP against what was seen


def seen_figure(arms: dict[tuple[tuple[str, ...], bool], list[Point]]) -> Figure:
    """Final box and mask AP per length against images and pixels seen (log x), pre-training counted for pretrained."""
    fig = Figure(figsize=(11, 7.2), dpi=100)
    axes = fig.subplots(2, 2)
    groups = list(dict.fromkeys(g for g, _ in arms))
    mode = next(iter(arms.values()))[0].ap_mode
    for (group, pre), arm in arms.items():
        # One group: colour tells the arms apart (as in the breakdown figure); several: colour is the group.
        color = GROUP_COLORS[groups.index(group) % len(GROUP_COLORS)] if len(groups) > 1 else ARM_COLORS[pre]
        for i, t in enumerate(IOU_TYPES):
            pts = [p for p in arm if t in p.ap]
            for j, (own, extra) in enumerate((("images", "pretrain_images"), ("pixels", "pretrain_pixels"))):
                ax = axes[i, j]
                xs = [getattr(p, own) + (getattr(p, extra) or 0) * pre for p in pts]
                ax.plot(xs, [p.ap[t] for p in pts], color=color, ls="--" if pre else "-", marker="s" if pre else "o",
                        lw=2, ms=4)
                if pre:  # the same runs at their detection training alone: what the counted pre-training moves
                    ax.plot([getattr(p, own) for p in pts], [p.ap[t] for p in pts], color=color, ls=":", lw=1,
                            marker="s", ms=3, alpha=0.45)
    for i, t in enumerate(IOU_TYPES):
        for j, what in enumerate(("images", "pixels")):
            ax = axes[i, j]
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel(f"{what} seen (pretrained: pre-training + detection training)")
            ax.set_ylabel(f"{mode} {TYPE_TITLES[t]} (%)")
            ax.grid(True, alpha=0.3, which="both")
    handles = [Line2D([], [], color="k", lw=2, ls="-", marker="o", label=RANDOM),
               Line2D([], [], color="k", lw=2, ls="--", marker="s", label=f"{PRETRAINED}, pre-training counted"),
               Line2D([], [], color="k", lw=1, ls=":", marker="s", alpha=0.45, label=f"{PRETRAINED}, detection only")]
    if len(groups) > 1:
        for k, g in enumerate(groups):
            first = arms[(g, False) if (g, False) in arms else (g, True)][0]
            handles.append(Line2D([], [], color=GROUP_COLORS[k % len(GROUP_COLORS)], lw=6, label=first.group_label))
    fig.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if len(groups) > 1 else 0.94))
    return fig


def ap_vs_seen(points: list[Point]) -> Section:
    """Fig. 2's argument: each arm's final AP per length against images and pixels seen, pre-training counted."""
    sec = Section("AP against images and pixels seen, pre-training counted (Fig. 2)")
    arms = _arms(points)
    if not any(pre for _, pre in arms):
        sec.missing.append("no finished pretrained run: no AP-vs-seen comparison")
        return sec
    lacking = sorted({p.name for (_, pre), arm in arms.items() if pre for p in arm
                      if p.pretrain_images is None or p.pretrain_pixels is None})
    if lacking:
        # Without its pre-training the pretrained arm would sit at its fine-tuning counts: the comparison Fig. 2 refutes.
        sec.missing.append(f"no pre-training counts (pretrain_images_seen and pretrain_pixels_seen) in the records of "
                           f"{', '.join(lacking)}: no AP-vs-seen figure")
        return sec
    if all(len({p.images for p in arm}) < 2 for arm in arms.values()):
        # One point per arm is no curve: the counts alone are the seen figure's and table's (Fig. 2 section).
        sec.missing.append("one schedule length per arm: no AP-vs-seen curve (the counts: 'Images, instances and "
                           "pixels seen')")
        return sec
    if any(p.images <= 0 or p.pixels <= 0 for arm in arms.values() for p in arm):
        sec.missing.append("some runs log no images_seen / pixels_seen: no AP-vs-seen figure")
        return sec
    sec.figure = seen_figure(arms)
    sec.stem = "ap_vs_seen"
    sec.caption = (f"Final box AP (top) and mask AP (bottom) of each schedule length against images seen (left) and "
                   f"pixels seen (right), log scale: {RANDOM} solid circles; {PRETRAINED} dashed squares with its "
                   "pre-training's images and pixels added (as the paper's Fig. 2 counts them), dotted faint squares "
                   "at its detection training alone." + (" Colour: the arm (data size and what else differs)."
                                                          if len({g for g, _ in arms}) > 1 else
                                                          f" Blue: {RANDOM}; orange: {PRETRAINED}."))
    for (_, pre), arm in arms.items():
        if pre:
            p = arm[-1]
            sec.lines.append(f"{PRETRAINED}{', ' + p.group_label if p.group_label else ''}: its longest run "
                             f"{p.name} saw {_count(p.images + (p.pretrain_images or 0))} images with pre-training "
                             f"({_count(p.images)} in detection training)")
    return sec


# --------------------------------------------------------------------------- the answer


def answer(catch: Section, plateau: Section) -> Section:
    """The study's question in one line per arm group and AP type, from catch-up's verdict at the longest schedule
    and both arms' plateau checks: "caught up" only from an equivalence verdict; behind at the longest length is
    "not caught up" only where random init has levelled off, else "inconclusive", and says why."""
    sec = Section("Answer: does random init catch up with pretrained?")
    for (group, t), (schedule, kind, verdict_text) in catch.facts.items():
        mine_levelled, mine = plateau.facts.get((group, False, t), (False, "no plateau check"))
        theirs_levelled, _ = plateau.facts.get((group, True, t), (False, ""))
        head = f"{group + ', ' if group else ''}{TYPE_TITLES[t]}, at the longest schedule {schedule}"
        other = ("" if theirs_levelled else " The pretrained arm has not levelled off either: both stop short of "
                 "where the paper compares them.")
        if kind == "equivalent":
            text = f"CAUGHT UP: {verdict_text}."
        elif kind == "ahead":
            text = f"AHEAD: {verdict_text}."
        elif kind == "behind" and mine_levelled:
            text = f"NOT CAUGHT UP: {verdict_text}, and random init has levelled off there."
        elif kind == "behind":
            text = (f"INCONCLUSIVE: {verdict_text}, but random init has not been shown to level off ({mine}): "
                    "whether it catches up is not known; longer schedules would tell.")
        else:
            text = f"INCONCLUSIVE: {verdict_text}; more validation images or seeds would narrow the interval."
        sec.lines.append(f"{head}: {text}{other}")
    if not sec.lines:
        sec.missing.append("no random-init run with a pretrained twin and an interval: no answer")
    return sec


# --------------------------------------------------------------------------- all of it


def analyze(points: list[Point], *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
            margin: float = DEFAULT_MARGIN) -> list[Section]:
    """The answer, then the five findings it rests on, each saying what it lacks where the runs do not have it."""
    if resamples < 200:
        raise ValueError(f"resamples={resamples}: percentile intervals need at least 200 resamples")
    if margin <= 0:
        raise ValueError(f"margin={margin}: an equivalence margin is a positive number of AP points")
    paired = Paired(resamples=resamples, seed=seed, level=level, margin=margin)
    catch, plateau = catch_up(points, paired), plateau_check(points, paired)
    return [answer(catch, plateau), catch, plateau, prediction(points, paired), breakdown(points, paired),
            ap_vs_seen(points)]


def findings_text(sections: list[Section], table_text: Callable[[Any], str]) -> str:
    """The text summary (``findings.txt``): each answer's statements, what it lacks, and its tables."""
    out = []
    for sec in sections:
        out.append(f"== {sec.title}")
        out += [f"- {line}" for line in sec.lines]
        out += [f"- (not answered) {m}" for m in sec.missing]
        out += ["", *[table_text(t) + "\n" for t in sec.tables]] if sec.tables else []
        out.append("")
    return "\n".join(out).rstrip() + "\n"
