"""``scratchdet report``: the paper's figures and tables, drawn from runs' ``metrics.jsonl`` and ``config.yaml``.

Nothing else of a run is read (as pycls compares runs from their JSON logs): a run copied off a
cluster as those two files is reportable.  What it draws:

- AP vs iteration, box and mask (Fig. 1 of "Rethinking ImageNet Pre-training"): colour = what
  the runs differ in besides the init (one legend entry per colour), line style = init (random
  init solid, pretrained dashed), one labelled LR-drop marker per schedule (``resolve_schedule``
  on the run's config), and optionally the pre-training stage on an axis of its own, its images
  in the run's iterations (on the fine-tuning axis it would dwarf the curves);
- images / instances / pixels seen per run, pre-training stacked on fine-tuning (Fig. 2);
- the 12 COCO numbers per type per run; Table 1's pivot (schedule x init) and the data-size pivot
  (``data.subset`` x init, the paper's Sec. 5.2, Figs. 7-8), each with random init minus pretrained;
- what each run had (data, model, batch, schedule) and a caption per figure, so the page stands alone;
  run names, never machine paths, on the page;
- the findings (scratchdet/analysis/findings.py: catch-up with paired bootstrap intervals, plateau check, a saturating-fit
  prediction, the small-data breakdown, AP against images / pixels seen with pre-training counted), each saying on
  the page what the runs lack where they cannot answer, and as text in ``findings.txt``;
- one self-contained HTML page (figures inlined as base64 PNG, no script, no network), CSV tables,
  PNG and SVG figures; ``--compare A B`` adds a two-run side-by-side.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window: reports are made on headless machines

from matplotlib.figure import Figure  # noqa: E402 - after choosing the backend
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from ..config import ConfigError, SolverConfig, flatten, merge_dict  # noqa: E402
from ..evaluation import STAT_NAMES  # noqa: E402
from ..run import read_metrics  # noqa: E402
from ..schedule import Schedule, resolve_schedule

IOU_TYPES = ("bbox", "segm")
TYPE_TITLES = {"bbox": "box AP", "segm": "mask AP"}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
PRETRAIN_GREY = "#d9d9d9"
HEADER_BG = "#ffe4a0"  # table headers; the HTML test finds this color in a screenshot
# The keys that make up a run's schedule (one "schedule" dimension in the pivots), and the data size.
SCHEDULE_KEYS = ("solver.schedule", "solver.max_iter", "solver.steps", "solver.epochs", "solver.warmup_iters")
SUBSET_KEYS = ("data.subset",)
SEEN_KEYS = ("images_seen", "instances_seen", "pixels_seen")
# One wording for the two arms in every table, legend and caption (model.init: random is "random init").
RANDOM, PRETRAINED = "random init", "pretrained"


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """A run as its two files describe it."""

    name: str
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    flat: dict[str, Any] = field(init=False)
    schedule: Schedule | None = field(init=False)

    def __post_init__(self) -> None:
        from ..config import without_removed

        self.flat = without_removed(flatten(self.config))
        self.schedule = _schedule(self.config, self.flat)

    @property
    def pretrained(self) -> bool:
        return str(self.flat.get("model.init", "random")) != "random"

    @property
    def init_label(self) -> str:
        return PRETRAINED if self.pretrained else RANDOM

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "bbox/AP" in r or "voc/mAP" in r]  # a VOC validation set logs voc/mAP

    @property
    def last_eval(self) -> dict[str, Any] | None:
        evals = self.evals
        return evals[-1] if evals else None

    @property
    def iteration(self) -> int:
        return max((int(r.get("iteration", 0)) for r in self.records), default=0)

    @property
    def max_iter(self) -> int | None:
        return self.schedule.max_iter if self.schedule else None

    @property
    def finished(self) -> bool | None:
        """Evaluated at the schedule's last iteration (the engine's final evaluation); None when the
        length is unknown (``solver.epochs`` over a data set whose size these two files do not give)."""
        if self.max_iter is None:
            return None
        last = self.last_eval
        return last is not None and last["iteration"] >= self.max_iter

    @property
    def ims_per_batch(self) -> int:
        return int(self.flat.get("solver.ims_per_batch", 1)) or 1

    @property
    def seen(self) -> dict[str, int]:
        """The latest counts (own and ``pretrain_*``); pre-training has one instance per image, as Fig. 2 counts."""
        line = next((r for r in reversed(self.records) if "images_seen" in r), {})
        out = {k: int(line.get(k, 0)) for k in SEEN_KEYS}
        out["pretrain_images_seen"] = int(line.get("pretrain_images_seen", 0))
        out["pretrain_instances_seen"] = out["pretrain_images_seen"]
        out["pretrain_pixels_seen"] = int(line.get("pretrain_pixels_seen", 0))
        return out

    @property
    def pretrain_offset(self) -> float:
        """The pre-training stage's images in this run's iterations (where Fig. 1 starts a pretrained curve)."""
        return self.seen["pretrain_images_seen"] / self.ims_per_batch

    @property
    def precision(self) -> str:
        """The precision the config asked for (train.amp); "auto" was resolved on the machine, not recorded here."""
        amp = str(self.flat.get("train.amp", "auto"))
        return {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(amp, f"{amp} (bf16 where native, else fp32)")

    @property
    def train_seconds(self) -> float:
        """Seconds of the run's own training steps: each log line's time per iteration times the iterations it
        covers (evaluations and checkpoints are not in it, ``loop.Throughput``); a branch's copied trunk lines are
        the trunk's, left out."""
        total, last = 0.0, 0
        for r in self.records:
            if "time_per_iter" not in r:
                continue
            it = int(r["iteration"])
            if "branched_from" not in r:
                total += float(r["time_per_iter"]) * max(it - last, 0)
            last = it
        return total

    def metric(self, iou_type: str, stat: str = "AP") -> float | None:
        last = self.last_eval
        return None if last is None or f"{iou_type}/{stat}" not in last else float(last[f"{iou_type}/{stat}"])


def _schedule(config: dict[str, Any], flat: dict[str, Any]) -> Schedule | None:
    """The run's schedule as training resolved it (None when its length depends on the data set's size)."""
    solver = SolverConfig()
    try:
        merge_dict(solver, config.get("solver", {}), "solver.")
        subset = float(flat.get("data.subset", 0) or 0)
        return resolve_schedule(solver, int(subset) if subset >= 1 else None)
    except (ConfigError, TypeError, ValueError):
        return None


def is_detection_run(path: Path) -> bool:
    """A run directory with both files whose metrics are a detector's (a pretrain stage logs no mask loss or AP)."""
    if not ((path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file()):
        return False
    records = read_metrics(path)
    # Mask R-CNN logs loss_mask, Faster R-CNN loss_box_reg; a VOC validation set logs voc/mAP, not bbox/AP.
    return any("loss_mask" in r or "loss_box_reg" in r or "bbox/AP" in r or "voc/mAP" in r for r in records)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each a run, or a folder (a study) whose sub-folders are runs."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: not a directory")
        if (p / "metrics.jsonl").is_file():
            if is_detection_run(p):
                found.append(p)
            continue
        subs = [d for d in sorted(p.iterdir()) if d.is_dir() and is_detection_run(d)]
        if not subs:
            raise FileNotFoundError(f"{p}: neither a run (metrics.jsonl, config.yaml) nor a folder of runs")
        found.extend(subs)
    return found


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Read each run's ``config.yaml`` and ``metrics.jsonl``; names are folder names (with the parent's where two clash)."""
    import yaml

    dirs = list(dict.fromkeys(p.resolve() for p in find_runs(paths)))
    names = [d.name for d in dirs]
    runs = []
    for d in dirs:
        name = d.name if names.count(d.name) == 1 else f"{d.parent.name}/{d.name}"
        runs.append(Run(name, d, yaml.safe_load((d / "config.yaml").read_text()) or {}, read_metrics(d)))
    # Random init first, then pretrained; each by schedule length and data size (the grid's usual order).
    return sorted(runs, key=lambda r: (r.pretrained, SCHEDULE_DIM.order(r), SUBSET_DIM.order(r), r.name))


# --------------------------------------------------------------------------- dimensions and pivots


def schedule_label(run: Run) -> str:
    s = run.flat.get("solver.schedule") or ""
    n = run.max_iter
    return f"{s} ({n} it)" if s and n else (f"{n} it" if n else "?")


def subset_label(run: Run) -> str:
    x = float(run.flat.get("data.subset", 0) or 0)
    return "all" if x == 0 else (f"{100 * x:g}%" if x < 1 else f"{int(x)} images")


@dataclass(frozen=True)
class Dim:
    """One axis along which runs differ: a title, a label per run, and a sort key."""

    title: str
    label: Callable[[Run], str]
    order: Callable[[Run], Any]


SCHEDULE_DIM = Dim("schedule", schedule_label, lambda r: (r.max_iter or 0) * r.ims_per_batch)
SUBSET_DIM = Dim("data size", subset_label, lambda r: (float(r.flat.get("data.subset", 0) or 0) == 0,
                                                       float(r.flat.get("data.subset", 0) or 0)))


def _varying(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.flat})
    return [k for k in keys if len({_key(r.flat.get(k)) for r in runs}) > 1]


def _init_coupled(runs: list[Run], key: str) -> bool:
    """A key set together with the init (the pretrained presets' pixel means, say): not a pairing key."""
    by_init = {g: {_key(r.flat.get(key)) for r in runs if r.pretrained == g} for g in (False, True)}
    return all(len(v) == 1 for v in by_init.values()) and by_init[False] != by_init[True]


# Keys whose runs are replicates of one another, not arms: pooled by the findings, listed side by side in tables.
REPLICATE_KEYS = ("train.seed",)


def dims(runs: list[Run]) -> list[Dim]:
    """Schedule, data size, then every other key that varies (the init, what goes with it, and the training seed,
    whose runs are replicates, aside)."""
    varying = [k for k in _varying(runs) if k != "model.init" and k not in REPLICATE_KEYS and not _init_coupled(runs, k)]
    out = [SCHEDULE_DIM, SUBSET_DIM]
    for k in varying:
        if k not in SCHEDULE_KEYS + SUBSET_KEYS:
            out.append(Dim(k, lambda r, k=k: str(r.flat.get(k)), lambda r, k=k: _key(r.flat.get(k))))
    return out


def pair_key(run: Run, all_dims: list[Dim]) -> tuple[str, ...]:
    """Runs equal in every dimension but the init: a random-init run and its pretrained twin."""
    return tuple(d.label(run) for d in all_dims)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    csv_name: str = ""


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        # COCO's -1 (-100 in percent): no ground truth in that size range, so no number.
        return "n/a" if v <= -100 else f"{v:.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def pivot(runs: list[Run], *, primary: Dim, title: str, csv_name: str, note: str) -> Table:
    """Rows: ``primary`` (then the other dimensions that vary); columns: box and mask AP for random
    init, pretrained, and random init minus pretrained (the paper's Table 1 layout)."""
    all_dims = dims(runs)
    others = [d for d in all_dims if d.title != primary.title and len({d.label(r) for r in runs}) > 1]
    row_dims = [primary, *others]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for r in sorted(runs, key=lambda r: tuple(_sortable(d.order(r)) for d in row_dims)):
        groups.setdefault(tuple(d.label(r) for d in row_dims), []).append(r)
    columns = [d.title for d in row_dims]
    for t in IOU_TYPES:
        columns += [f"{TYPE_TITLES[t]} {RANDOM}", f"{TYPE_TITLES[t]} {PRETRAINED}", f"{TYPE_TITLES[t]} {RANDOM} - {PRETRAINED}"]
    rows = []
    unfinished = several = False
    for labels, members in groups.items():
        row: list[Any] = list(labels)
        for t in IOU_TYPES:
            cells = []
            for pretrained in (False, True):
                vals = [(r.metric(t), r.finished) for r in members if r.pretrained == pretrained and r.metric(t) is not None]
                unfinished |= any(f is False for _, f in vals)
                cells.append(vals)
            # Several runs in one cell are seed replicates (train.seed is no dimension): their mean.
            shown = [None if not v else v[0][0] if len(v) == 1 else round(sum(x for x, _ in v) / len(v), 4)
                     for v in cells]
            several |= any(len(v) > 1 for v in cells)
            diff = round(shown[0] - shown[1], 4) if all(isinstance(x, float) for x in shown) else None
            row += [*shown, diff]
        rows.append(row)
    if unfinished:
        note += " Some runs are unfinished: their latest evaluation is shown."
    if several:
        note += (" A cell with several runs (they differ only in train.seed: replicates) shows their mean; the "
                 "catch-up table gives each arm's seeds, spread and interval.")
    return Table(title, columns, rows, note.strip(), csv_name)


def _sortable(v: Any) -> Any:
    return v if isinstance(v, tuple) else (v,)


def coco_table(runs: list[Run], iou_type: str) -> Table:
    """The 12 COCO numbers of each run's latest evaluation."""
    columns = ["run", "init", "iteration", *STAT_NAMES]
    rows = []
    for r in runs:
        last = r.last_eval or {}
        rows.append([r.name, r.init_label, last.get("iteration"),
                     *[None if f"{iou_type}/{k}" not in last else float(last[f"{iou_type}/{k}"]) for k in STAT_NAMES]])
    return Table(f"{TYPE_TITLES[iou_type][:-3].capitalize()} AP: the 12 COCO numbers ({iou_type})", columns, rows,
                 "At each run's latest evaluation, in percent.", f"coco_{iou_type}.csv")


def seen_table(runs: list[Run]) -> Table:
    columns = ["run", "init", "images", "instances", "pixels", "pretrain images", "pretrain pixels",
               "images incl. pretrain", "pixels incl. pretrain"]
    rows = []
    for r in runs:
        s = r.seen
        rows.append([r.name, r.init_label, s["images_seen"], s["instances_seen"], s["pixels_seen"],
                     s["pretrain_images_seen"], s["pretrain_pixels_seen"], s["images_seen"] + s["pretrain_images_seen"],
                     s["pixels_seen"] + s["pretrain_pixels_seen"]])
    return Table("Seen, in numbers", columns, rows,
                 "Pre-training counts come from the fine-tuning run's pretrain_* fields (one instance per "
                 "classification image).", "seen.csv")


def runs_table(runs: list[Run]) -> Table:
    """What each run had (data, model, batch, schedule): the page says it, so it needs no other file."""
    extra = dims(runs)[2:]
    columns = ["run", "init", "data", "data size", "model", "batch", "schedule", *[d.title for d in extra], "status",
               "iteration", "precision", "training time (min)"]
    rows = [[r.name, init_detail(r), data_label(r), subset_label(r), model_label(r), r.ims_per_batch, schedule_detail(r),
             *[d.label(r) for d in extra], {True: "finished", False: "unfinished", None: "?"}[r.finished], r.iteration,
             r.precision, round(r.train_seconds / 60, 2)] for r in runs]
    return Table("Runs: data, model, batch and schedule", columns, rows,
                 "Schedule as training resolved it from config.yaml (LR drops are divisions by 10). Precision as "
                 "train.amp asked for it. Training time: the run's own logged time per iteration times its iterations "
                 "(evaluations, checkpoints and start-up left out; a branch counts its own tail only).", "runs.csv")


def _unpath(v: Any) -> Any:
    """A machine path as its last two parts (``pretrain/backbone_final.pth``): the page names no one's folders."""
    if isinstance(v, str) and (v.startswith(("/", "~", "\\")) or (len(v) > 2 and v[1] == ":" and v[2] in "/\\")):
        parts = [x for x in v.replace("\\", "/").split("/") if x]
        return "/".join(parts[-2:])
    return v


def init_detail(run: Run) -> str:
    init = str(run.flat.get("model.init", "random"))
    return RANDOM if init == "random" else f"{PRETRAINED} ({_unpath(init)})"


def data_label(run: Run) -> str:
    """The training set (its annotation file's name, or the synthetic shapes) and the input size."""
    f = run.flat
    ann = str(f.get("data.train.annotations") or "")
    if ann:
        data = ann.replace("\\", "/").rsplit("/", 1)[-1]  # the file's name: its folder is one machine's
    else:
        data = (f"synthetic shapes (seed {f.get('data.synth.seed', 0)}, {f.get('data.synth.num_train', '?')} train / "
                f"{f.get('data.synth.num_val', '?')} val, {f.get('data.synth.image_size', '?')} px)")
    sizes = f.get("data.min_size_train")
    if f.get("data.lsj"):
        size = f"LSJ {f.get('data.lsj_size')} px"
    elif sizes is not None:
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
        short = f"{min(sizes)}-{max(sizes)}" if len(sizes) > 1 else f"{sizes[0]}"
        size = f"shorter side {short}, longer at most {f.get('data.max_size_train')}"
    else:
        size = ""
    return f"{data}; {size}" if size else data


def model_label(run: Run) -> str:
    """Task, trunk, norm and RoI head, as the presets name them (``masks, R50-FPN, GN``)."""
    f = run.flat
    groups, width = int(f.get("model.groups", 1) or 1), int(f.get("model.width_per_group", 64) or 64)
    trunk = f"X{f.get('model.depth', '?')}-{groups}x{width}d" if groups > 1 else f"R{f.get('model.depth', '?')}"
    parts = [str(f.get("model.task", "masks")), f"{trunk}-FPN", str(f.get("model.norm", "?"))]
    if f.get("model.roi_head", "standard") != "standard":
        parts.append(f"{f.get('model.roi_head')} RoI head")
    return ", ".join(parts)


def schedule_detail(run: Run) -> str:
    s = run.schedule
    if s is None:
        return f"{run.flat.get('solver.epochs')} epochs (length depends on the data set's size)"
    name = run.flat.get("solver.schedule") or ""
    drops = ", ".join(str(x) for x in s.steps) or "none"
    return (f"{name + ': ' if name else ''}{s.max_iter} it, LR {s.base_lr:g}, /10 at {drops}, "
            f"warmup {s.warmup_iters}")


# --------------------------------------------------------------------------- figures


def _color_dims(runs: list[Run]) -> list[Dim]:
    """The dimensions (besides the init) along which these runs vary: what a colour stands for."""
    return [d for d in dims(runs) if len({d.label(r) for r in runs}) > 1]


def color_keys(runs: list[Run]) -> dict[str, str]:
    """Colour -> what it stands for (``schedule: 0.001x (360 it), data size: 150 images``), in the runs' order."""
    cdims, colors = _color_dims(runs), _colors(runs)
    out: dict[str, str] = {}
    for r in runs:
        out.setdefault(colors[r.name], ", ".join(f"{d.title}: {d.label(r)}" for d in cdims) or "all runs")
    return out


def _colors(runs: list[Run]) -> dict[str, str]:
    """A random-init run and its pretrained twin share a color (told apart by the dash)."""
    all_dims = dims(runs)
    keys = list(dict.fromkeys(pair_key(r, all_dims) for r in runs))
    return {r.name: COLORS[keys.index(pair_key(r, all_dims)) % len(COLORS)] for r in runs}


def _curve(run: Run, iou_type: str) -> tuple[list[float], list[float]]:
    pts = [(r["iteration"], r[f"{iou_type}/AP"]) for r in run.evals if f"{iou_type}/AP" in r]
    return [float(x) for x, _ in pts], [float(y) for _, y in pts]


def lr_drops(runs: list[Run]) -> dict[int, list[str]]:
    """Each LR drop's iteration -> the schedules that drop there (one marker per drop, not one per run)."""
    out: dict[int, list[str]] = {}
    for r in runs:
        for step in (r.schedule.steps if r.schedule else ()):
            label = r.flat.get("solver.schedule") or f"{r.max_iter} it"
            if label not in out.setdefault(int(step), []):
                out[int(step)].append(str(label))
    return dict(sorted(out.items()))


def _series(runs: list[Run]) -> list[list[Run]]:
    """The runs as curves: the seed replicates of one arm (equal but for ``train.seed``) pooled into one."""
    all_dims = dims(runs)
    by: dict[tuple[Any, ...], list[Run]] = {}
    for r in runs:
        by.setdefault((pair_key(r, all_dims), r.pretrained), []).append(r)
    return list(by.values())


def _pooled(reps: list[Run], iou_type: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Iterations, mean AP over the replicates that evaluated there (an unfinished one misses the last), and
    their lowest and highest AP."""
    curves = [dict(zip(*_curve(r, iou_type))) for r in reps]
    xs = sorted(set().union(*curves)) if curves else []
    ys = [[c[x] for c in curves if x in c] for x in xs]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def curves_figure(runs: list[Run], *, pretrain_offset: bool = False, title: str = "") -> Figure:
    """Box and mask AP vs iteration (Fig. 1), one row of panels per data size as the paper's figures: colour is
    the schedule (darker, longer) or what else the runs differ in, solid random init, dashed pretrained; seed
    replicates pooled into their mean with a band from the lowest to the highest seed; each LR drop a short tick
    at the panel's foot in its curve's colour.  ``pretrain_offset``: a pretrained curve starts after its
    pre-training, counted in the run's iterations."""
    import matplotlib as mpl

    rows = sorted({subset_label(r): SUBSET_DIM.order(r) for r in runs}.items(), key=lambda kv: kv[1])
    series = _series(runs)
    others = [d for d in _color_dims(runs) if d.title not in (SCHEDULE_DIM.title, SUBSET_DIM.title)]
    lengths = sorted({SCHEDULE_DIM.order(rs[0]) for rs in series})
    cmap = mpl.colormaps["viridis"]

    def kind(rs: list[Run]) -> str:  # what a curve is, data size aside (the row says it)
        return ", ".join([schedule_label(rs[0])] + [f"{d.title}: {d.label(rs[0])}" for d in others])

    kinds = list(dict.fromkeys(kind(rs) for rs in sorted(series, key=lambda rs: SCHEDULE_DIM.order(rs[0]))))

    def color(rs: list[Run]) -> str:
        if others:  # a colour per kind of curve: the legend names each
            return COLORS[kinds.index(kind(rs)) % len(COLORS)]
        k = lengths.index(SCHEDULE_DIM.order(rs[0]))
        return mpl.colors.to_hex(cmap(0.85 - 0.75 * k / max(len(lengths) - 1, 1)))

    # The pre-training drawn on the same axis only where it does not dwarf the runs (else the legend says it).
    longest = max((r.max_iter or 0) for r in runs) or 1
    shift = {r.name: r.pretrain_offset for r in runs if pretrain_offset and r.pretrained and r.pretrain_offset > 0}
    drawn = bool(shift) and max(shift.values()) <= 2 * longest

    def label(rs: list[Run]) -> str:
        text = f"{PRETRAINED if rs[0].pretrained else RANDOM}, {kind(rs)}"
        if rs[0].name in shift and not drawn:
            text += f" (after pre-training on {rs[0].seen['pretrain_images_seen']:,} images, not drawn)"
        return text

    ordered = sorted(series, key=lambda rs: (rs[0].pretrained, SCHEDULE_DIM.order(rs[0]), label(rs)))
    ncol = 2
    legend_h = 0.2 * -(-(len({label(rs) for rs in ordered}) + 2) // ncol) + 0.15
    fig = Figure(figsize=(11, 0.6 + 3.0 * len(rows) + legend_h), dpi=100)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for i, (size, _) in enumerate(rows):
        for j, t in enumerate(IOU_TYPES):
            ax = axes[i, j]
            for rs in ordered:
                if subset_label(rs[0]) != size:
                    continue
                offset = shift.get(rs[0].name, 0.0) if drawn else 0.0
                xs, mean, lo, hi = _pooled(rs, t)
                xs = [x + offset for x in xs]
                c = color(rs)
                # Markers tell the arms apart too: a run evaluated once is a dot, where no dash can show.
                ax.plot(xs, mean, color=c, ls="--" if rs[0].pretrained else "-", lw=2,
                        marker="s" if rs[0].pretrained else "o", ms=4 if rs[0].pretrained else 3.5,
                        mfc="white" if rs[0].pretrained else c)
                if len(rs) > 1:
                    ax.fill_between(xs, lo, hi, color=c, alpha=0.2, lw=0)
                steps = [x + offset for x in (rs[0].schedule.steps if rs[0].schedule else ())]
                ax.plot(steps, [0] * len(steps), ls="none", marker="|", ms=9, mew=1.5, color=c,
                        transform=ax.get_xaxis_transform(), clip_on=False)
            ax.set_title(f"{TYPE_TITLES[t]}" + (f", data size: {size}" if len(rows) > 1 or size != "all" else ""),
                         fontsize=10)
            ax.set_xlabel("iterations of detection training" + (" (pretrained: after its pre-training)"
                                                                 if drawn else ""))
            ax.set_ylabel(f"{TYPE_TITLES[t]} (%)")
            ax.grid(True, alpha=0.3)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
    entries = {label(rs): (color(rs), "--" if rs[0].pretrained else "-") for rs in ordered}  # one per curve kind
    handles = [Line2D([], [], color=c, lw=2, ls=ls, marker="s" if ls == "--" else "o", ms=4,
                      mfc="white" if ls == "--" else c, label=text) for text, (c, ls) in entries.items()]
    if any(len(rs) > 1 for rs in series):
        handles.append(Patch(color="#555555", alpha=0.25, label="seeds pooled: the mean, a band from lowest to highest"))
    handles.append(Line2D([], [], color="#555555", ls="none", marker="|", ms=9, mew=1.5,
                          label="LR drop (divided by 10), in its curve's colour"))
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    height = 0.6 + 3.0 * len(rows) + legend_h
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - (0.5 if title else 0.35) / height, hspace=0.45, wspace=0.2,
                        bottom=(legend_h + 0.45) / height)
    return fig


def seen_figure(runs: list[Run]) -> Figure:
    """Images, instances and pixels seen per run, fine-tuning in the run's color, pre-training stacked in grey (Fig. 2)."""
    colors = _colors(runs)
    fig = Figure(figsize=(11, 1.2 + 0.35 * len(runs)), dpi=100)
    axes = fig.subplots(1, 3, sharey=True)
    ys = list(range(len(runs)))[::-1]
    for ax, key, title in zip(axes, SEEN_KEYS, ("images seen", "instances seen", "pixels seen")):
        own = [r.seen[key] for r in runs]
        pre = [r.seen[f"pretrain_{key}"] for r in runs]
        ax.barh(ys, pre, color=PRETRAIN_GREY, hatch="//", edgecolor="#999999", lw=0.5)
        ax.barh(ys, own, left=pre, color=[colors[r.name] for r in runs])
        ax.set_title(title)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 (pixels run to billions)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [r.name for r in runs], fontsize=8)
    fig.legend([Patch(color=PRETRAIN_GREY), Patch(color="#555555")],
               ["pre-training", "detection training (in the run's colour)"], loc="upper right", fontsize=8,
               frameon=False, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def save_figure(fig: Figure, out: Path, stem: str) -> bytes:
    """Write ``stem.png`` and ``stem.svg`` (no timestamp in the SVG: reruns give the same file); return the PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = buf.getvalue()
    (out / f"{stem}.png").write_bytes(png)
    fig.savefig(out / f"{stem}.svg", format="svg", metadata={"Date": None})
    return png


# --------------------------------------------------------------------------- compare


def compare_tables(a: Run, b: Run) -> list[Table]:
    """The two-run side-by-side: what differs in their configs, their 24 numbers, what they saw."""
    keys = sorted(set(a.flat) | set(b.flat))
    diff = [[k, _short(a.flat.get(k)), _short(b.flat.get(k))] for k in keys if _key(a.flat.get(k)) != _key(b.flat.get(k))]
    rows = []
    for t in IOU_TYPES:
        for s in STAT_NAMES:
            va, vb = a.metric(t, s), b.metric(t, s)
            rows.append([f"{t}/{s}", va, vb, round(vb - va, 4) if va is not None and vb is not None else None])
    sa, sb = a.seen, b.seen
    seen_rows = [[k, sa[k], sb[k], sb[k] - sa[k]] for k in (*SEEN_KEYS, "pretrain_images_seen", "pretrain_pixels_seen")]
    status = [["iteration", a.iteration, b.iteration, None], ["finished", str(a.finished), str(b.finished), None]]
    return [Table(f"Config: where {a.name} and {b.name} differ", ["key", a.name, b.name], diff or [["(none)", "", ""]],
                  "", "compare_config.csv"),
            Table("COCO numbers, side by side", ["metric", a.name, b.name, f"{b.name} - {a.name}"], rows,
                  "At each run's latest evaluation.", "compare_metrics.csv"),
            Table("Seen", ["", a.name, b.name, f"{b.name} - {a.name}"], status + seen_rows, "", "compare_seen.csv")]


def _short(v: Any) -> str:
    v = [_unpath(x) for x in v] if isinstance(v, list) else _unpath(v)
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- writing


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(table.columns)
        w.writerows([["" if v is None else v for v in row] for row in table.rows])


def table_text(table: Table) -> str:
    cells = [[_fmt(v) for v in row] for row in table.rows]
    widths = [max(len(x) for x in col) for col in zip(table.columns, *cells)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [table.columns, *cells]]
    return f"{table.title}\n" + "\n".join(lines) + (f"\n{table.note}" if table.note else "")


def table_html(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{e(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{e(table.note)}</p>' if table.note else ""
    return f"<h2>{e(table.title)}</h2>\n<table><thead><tr>{head}</tr></thead>\n<tbody>{''.join(body)}</tbody></table>{note}"


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def curves_caption(runs: list[Run], pretrain_offset: bool) -> str:
    """What the AP figure shows, in words: the page says it, not a README."""
    sizes = sorted({subset_label(r) for r in runs})
    text = ("Box AP (left) and mask AP (right) on the validation set, in percent, at each evaluation, against "
            "iterations of detection training" + (f"; one row per data size ({', '.join(sizes)})" if len(sizes) > 1
                                                  else "") +
            f". Line style is the init: solid {RANDOM}, dashed {PRETRAINED}; colour the schedule, darker for longer "
            "(or, where the runs differ in more, what they differ in: the legend names each curve). ")
    if any(len(rs) > 1 for rs in _series(runs)):
        text += ("Runs that differ only in train.seed are one curve: the mean over the seeds, with a band from the "
                 "lowest to the highest seed at each evaluation. ")
    if lr_drops(runs):
        text += "Ticks at each panel's foot: the LR drops (divided by 10), in the colour of the curve they belong to. "
    if any(r.pretrained and r.pretrain_offset > 0 for r in runs) and pretrain_offset:
        text += ("With the pre-training counted (its images in the run's iterations): where it is at most twice the "
                 "longest run, the pretrained curves start after it; where it would dwarf the curves, the legend "
                 "gives its length and the seen figure draws it. ")
    return text + "Data, model, batch and schedule of every run: the table 'Runs' below."


AP_MODES = ("final", "best")


def study_points(runs: list[Run], ap: str = "final") -> list[Any]:
    """The runs as ``findings.Point`` s: paired by ``pair_key`` (twins share it), grouped by it less the schedule.

    ``ap``: each run's AP at its final evaluation, or (``best``, for presets that say "report each arm's best
    evaluation") at its best evaluation by box AP; per-image matches, recorded at the final evaluation only,
    give intervals only where the best is the final one."""
    from .findings import Point

    if ap not in AP_MODES:
        raise ConfigError(f"report --ap {ap!r}: one of {', '.join(AP_MODES)}")

    all_dims = dims(runs)
    shown = [d for d in _color_dims(runs) if d.title != SCHEDULE_DIM.title]
    points = []
    for r in runs:
        key = pair_key(r, all_dims)
        last = r.last_eval or {}
        # The final evaluation's own matches record: a schedule branch's copied trunk records are not its own.
        matches = next((x["matches"] for x in reversed(r.records) if "matches" in x and "branched_from" not in x
                        and x.get("iteration") == last.get("iteration")), None)
        s = r.seen
        images = s["images_seen"] or ((r.max_iter or 0) * r.ims_per_batch if r.finished else 0)
        values = {t: v for t in IOU_TYPES if (v := r.metric(t)) is not None}
        note, pixels = "", s["pixels_seen"]
        if ap == "best" and r.evals:
            # One evaluation per run, the best by its first type's AP (box AP), every type read there, with
            # what the run had seen by then: AP and images seen come from the same moment.
            first = next(t for t in IOU_TYPES if any(f"{t}/AP" in x for x in r.evals))
            chosen = max(r.evals, key=lambda x: x.get(f"{first}/AP", -1.0))  # the earliest of equal bests
            it = int(chosen["iteration"])
            values = {t: float(chosen[f"{t}/AP"]) for t in IOU_TYPES if f"{t}/AP" in chosen}
            if it != last.get("iteration"):
                at = [x for x in r.records if x.get("iteration") == it and "images_seen" in x]
                images = at[-1]["images_seen"] if at else it * r.ims_per_batch
                pixels = at[-1].get("pixels_seen", 0) if at else 0
                note = (f"run {r.name}'s best evaluation (iteration {it}) is not its final one, and per-image "
                        "matches are recorded at the final evaluation only: no intervals")
                matches = None
        points.append(Point(
            name=r.name, pretrained=r.pretrained, pair=key, group=key[1:], seed=int(r.flat.get("train.seed", 0) or 0),
            group_label=", ".join(f"{d.title}: {d.label(r)}" for d in shown), schedule=schedule_label(r),
            subset=float(r.flat.get("data.subset", 0) or 0), subset_label=subset_label(r), images=images,
            pixels=pixels,
            pretrain_images=s["pretrain_images_seen"] if _logged(r, "pretrain_images_seen") else None,
            pretrain_pixels=s["pretrain_pixels_seen"] if _logged(r, "pretrain_pixels_seen") else None,
            ap=values, ap_mode=ap, matches_note=note, finished=r.finished, matches=matches,
            losses=[(int(x["iteration"]), float(x["loss"])) for x in r.records if "loss" in x and "iteration" in x],
            evals=[(int(x["iteration"]), {t: float(x[f"{t}/AP"]) for t in IOU_TYPES if f"{t}/AP" in x})
                   for x in r.evals]))
    return points


def _logged(run: Run, key: str) -> bool:
    return any(key in x for x in run.records)


def findings_section(sections: list[Any], pngs: dict[str, bytes], *,
                     heading: str = "Findings: the paper's questions, as these runs answer them") -> str:
    """The findings on the page: per answer its statements, what it lacks, its figure and tables."""
    e = html.escape
    parts = [f"<h2>{e(heading, quote=False)}</h2>"]
    for sec in sections:
        parts.append(f"<h3>{e(sec.title)}</h3>")
        if sec.lines:
            parts.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in sec.lines) + "</ul>")
        parts += [f'<p class="note">Not answered: {e(m)}</p>' for m in sec.missing]
        if sec.figure is not None:
            parts.append(_figure(pngs[sec.stem], sec.title, sec.caption))
        parts += [table_html(Table(*t)) for t in sec.tables]
    return "\n".join(parts)


def _img(png: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" width="1100" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


STYLE = f"""
body {{ font-family: sans-serif; margin: 16px 24px; color: #222; max-width: 1140px; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 16px; margin: 22px 0 6px; }}
h3 {{ font-size: 14px; margin: 14px 0 4px; }} li {{ font-size: 13px; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 4px; }}
th {{ background: {HEADER_BG}; text-align: left; }}
th, td {{ border: 1px solid #bbb; padding: 3px 7px; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
p.note, p.meta, figcaption {{ font-size: 12px; color: #555; margin: 2px 0; }}
figure {{ margin: 0 0 8px; }}
img {{ display: block; max-width: 100%; height: auto; }}
"""


def build_report(paths: list[str | Path], out: str | Path, *, compare: tuple[str, str] | None = None,
                 pretrain_offset: bool = False, title: str = "scratchdet report", resamples: int = 1000,
                 seed: int = 0, margin: float | None = None, ap: str = "final",
                 notes: str = "") -> dict[str, Any]:
    """Write the report into ``out``; returns what was written and the tables (for the CLI to print).
    ``ap``: the findings read each run's final evaluation, or its best (``study_points``). ``notes``: text the
    runs' records cannot hold (a study's measured wall time, caveats from elsewhere), shown first, as given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    runs = load_runs(list(paths) or list(compare or ()))
    if not runs:
        raise FileNotFoundError("no runs to report")
    pair = None
    if compare is not None:
        pair = tuple(_pick(runs, c) for c in compare)
    sections: list[str] = []
    tables: list[Table] = []
    written: list[Path] = []
    if pair is not None:
        a, b = pair
        fig = curves_figure([a, b], pretrain_offset=pretrain_offset, title=f"{a.name} vs {b.name}")
        png = save_figure(fig, out, "compare")
        written += [out / "compare.png", out / "compare.svg"]
        ctables = compare_tables(a, b)
        tables += ctables
        sections.append(f"<h2>{html.escape(a.name)} vs {html.escape(b.name)}</h2>" +
                        _figure(png, "compare curves", curves_caption([a, b], pretrain_offset)) +
                        "\n".join(table_html(t) for t in ctables))
    png = save_figure(curves_figure(runs, pretrain_offset=pretrain_offset), out, "ap_curves")
    written += [out / "ap_curves.png", out / "ap_curves.svg"]
    sections.append("<h2>AP vs iteration (Fig. 1)</h2>" +
                    _figure(png, "AP vs iteration", curves_caption(runs, pretrain_offset)))
    # The paper's questions answered (catch-up with intervals, plateau, prediction, breakdown, Fig. 2's argument).
    from .bootstrap import DEFAULT_MARGIN
    from .findings import analyze, findings_text

    found = analyze(study_points(runs, ap), resamples=resamples, seed=seed,
                    margin=DEFAULT_MARGIN if margin is None else margin)
    pngs = {}
    for sec in found:
        if sec.figure is not None:
            pngs[sec.stem] = save_figure(sec.figure, out, sec.stem)
            written += [out / f"{sec.stem}.png", out / f"{sec.stem}.svg"]
    # The answer first on the page (under the notes), its evidence in the findings below.
    sections.insert(0, findings_section(found[:1], pngs, heading="Answer"))
    sections.append(findings_section(found[1:], pngs))
    (out / "findings.txt").write_text(findings_text(found, lambda t: table_text(Table(*t))), encoding="utf-8")
    written.append(out / "findings.txt")
    t1 = pivot(runs, primary=SCHEDULE_DIM, title="Table 1: schedule x init", csv_name="table1_schedule.csv",
               note=f"Final AP (%); '{RANDOM} - {PRETRAINED}' is the difference the paper's Table 1 compares.")
    ts = pivot(runs, primary=SUBSET_DIM, title="Data size x init (Sec. 5.2, Figs. 7-8)", csv_name="table_data_size.csv",
               note=f"Final AP (%) by data.subset; '{RANDOM} - {PRETRAINED}' as in Table 1.")
    cb, cs = coco_table(runs, "bbox"), coco_table(runs, "segm")
    seen = seen_table(runs)
    png_seen = save_figure(seen_figure(runs), out, "seen")
    written += [out / "seen.png", out / "seen.svg"]
    sections += [table_html(t1), table_html(ts), table_html(cb), table_html(cs),
                 "<h2>Images, instances and pixels seen (Fig. 2)</h2>" +
                 _figure(png_seen, "seen", "Images, instances and pixels each run saw: detection training in the run's "
                         "colour (a run and its pretrained twin share one), its pre-training's (grey, hatched; one "
                         "instance per classification image) stacked before it, as the paper's Fig. 2 counts them.") +
                 table_html(seen),
                 table_html(rt := runs_table(runs))]
    tables += [t1, ts, cb, cs, seen, rt]
    tables += [Table(*t) for sec in found for t in sec.tables]
    for t in tables:
        write_csv(t, out / "tables" / t.csv_name)
        written.append(out / "tables" / t.csv_name)
    # Folder names only: the page is shared, the machine's directories are not.
    sources = ", ".join(html.escape(Path(p).resolve().name) for p in (paths or compare or ()))
    precisions = ", ".join(sorted({r.precision for r in runs}))
    minutes = sum(r.train_seconds for r in runs) / 60
    notes_html = "".join(f"<p>{html.escape(p.strip())}</p>" for p in notes.split("\n\n") if p.strip())
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1><p class=\"meta\">{len(runs)} runs from {sources}; read from each run's "
            f"metrics.jsonl and config.yaml. Findings read each run's {ap} evaluation (report --ap {ap}). Precision: "
            f"{html.escape(precisions)}; training steps logged by the runs: {minutes:.1f} min in all (evaluations, "
            "checkpoints, start-up and any pretrain stage left out: the runs table has each run's).</p>\n"
            + (f"<h2>Notes</h2>{notes_html}\n" if notes_html else "")
            + "\n".join(sections) + "\n</body></html>\n")
    (out / "index.html").write_text(page, encoding="utf-8")
    written.insert(0, out / "index.html")
    return {"runs": runs, "tables": tables, "written": written, "compare": pair, "findings": found}


def _pick(runs: list[Run], ref: str) -> Run:
    """A ``--compare`` argument: a run directory, or the name of a run being reported."""
    p = Path(ref)
    if p.is_dir():
        for r in runs:
            if r.path == p.resolve():
                return r
        extra = load_runs([p])
        if len(extra) == 1:
            runs.append(extra[0])
            return extra[0]
    matches = [r for r in runs if r.name == ref or r.path.name == ref]
    if len(matches) != 1:
        raise FileNotFoundError(f"--compare {ref}: no single run of that directory or name among "
                                f"{', '.join(r.name for r in runs)}")
    return matches[0]
