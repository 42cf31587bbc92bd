"""Studies: a base config plus a grid over config keys, expanded into named runs under one directory.

The paper's figures and tables each compare a handful of runs that differ in one or two keys:
Table 1 and Fig. 1 are ``model.init`` x ``solver.schedule``, Figs. 7-8 (Sec. 5.2) add
``data.subset``, and Fig. 4 (SyncBN) against Figs. 1 and 3 (GN) varies ``model.norm``.  A study
is that grid written down once (a small YAML file, below), run
member after member on this machine (each resumable, finished ones skipped, a failure recorded and
the rest run anyway) or written out as torchrun / SLURM commands.  ``scratchdet report`` then
draws the figures from the members' ``metrics.jsonl`` alone.

The study file::

    base: default                 # preset name or YAML file (relative to the study file) every run starts from
    overrides: [train.amp=auto]   # key=value applied to every run and to the pretrain stage, after base
    grid:                         # the runs are the product of these values, in this order (or a list of
                                  # such mappings: each one's product, one after the other)
      model.init: [random, "@pretrain"]    # "@pretrain": the pretrain stage's backbone_final.pth
      solver.schedule: ["0.005x", "0.01x"]
      data.subset: [150, 0]
    name: "{model.init}_{solver.schedule}_{data.subset}"  # optional run-name template ({key}: the run's grid value)
    pretrain:                     # optional: the pretrained arm's pre-training (`scratchdet pretrain`), run first
      synth_cls: {seed: 0, per_class: 300, size: 64}  # optional: generate its ImageFolder (`scratchdet data synth-cls`)
      overrides: [solver.max_iter=2000]                # after the study's overrides (base and overrides set the trunk)
    branch: true                  # optional (default true): lengths of one arm share one trunk (below)

Schedule branching (Table 1 for the cost of one run): runs whose resolved configs differ only in
the schedule's length (``solver.schedule``, ``max_iter``, ``steps``) are one run at the same warmup
and base LR up to each one's first LR drop.  The one whose first drop comes last is the *trunk*:
it trains in full and saves its state at the others' first drops (``branch_*.pth``); each other
run is a *branch* that starts from that state (its ``metrics.jsonl`` up to there copied from the
trunk, marked ``branched_from``) and trains only its tail.  On a CPU a branch ends bitwise equal
to the same run trained alone.  2x-6x under the paper's rule: 480k + 5 x 60k iterations instead of
1,800k.  A run that cannot branch (its schedule in epochs, or no other length of its arm) trains
alone and ``--status`` says why.

The study directory holds ``study.yaml`` (the spec as run, ``base`` made absolute), ``study.json``
(each member's status, error and times), ``synth_cls/`` and ``pretrain/`` when there is a pretrain
stage, and one run directory per member.  Each run directory has its own ``tensorboard/``, so
``tensorboard --logdir STUDY_DIR`` shows every member as a run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..branching import BRANCH_FREE_KEYS, branch_name
from ..config import ConfigError, differing_keys, flatten, load_config, resolve_preset, to_dict

SPEC_FILE = "study.yaml"
STATE_FILE = "study.json"
PRETRAIN_REF = "@pretrain"
PRETRAIN_NAME = "pretrain"
SYNTH_CLS_DIR = "synth_cls"
RESERVED = (PRETRAIN_NAME, SYNTH_CLS_DIR, "report")
SPEC_KEYS = ("base", "overrides", "grid", "name", "pretrain", "branch")
PRETRAIN_KEYS = ("overrides", "synth_cls")
SYNTH_CLS_KEYS = {"seed": 0, "per_class": 300, "size": 64, "classes": "target"}


@dataclass
class Member:
    """One run of the study: a detection run (``kind='train'``) or the pretrain stage."""

    name: str
    kind: str
    overrides: list[str]
    values: dict[str, Any] = field(default_factory=dict)  # its grid values (what the name is made of)
    needs_pretrain: bool = False
    # Schedule branching (``plan_branches``): a trunk saves its state at its branches' first LR drops;
    # a branch starts from the trunk's state there; a run that cannot branch says why it trains alone.
    keep_at: tuple[int, ...] = ()
    trunk: str | None = None
    branch_at: int | None = None
    alone_reason: str | None = None
    max_iter: int | None = None


@dataclass
class Study:
    root: Path
    name: str
    spec: dict[str, Any]  # normalized: base absolute when it is a file, defaults filled in
    base: str
    members: list[Member]  # the pretrain stage first when there is one
    synth_cls: dict[str, int] | None = None

    def run_dir(self, member: Member) -> Path:
        return self.root / member.name

    def config(self, member: Member) -> Any:
        """The member's resolved config (``load_config(base, overrides)``, as the emitted commands give)."""
        return load_config(self.base, member.overrides)


# --------------------------------------------------------------------------- the spec


def _value_text(value: Any) -> str:
    """A grid value as the right-hand side of ``key=value`` (read back with YAML by ``parse_override``)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML: quoted strings, lists, numbers read back as written


def _safe(value: Any) -> str:
    """A grid value as part of a directory name: stable and filesystem-safe."""
    if value == PRETRAIN_REF:
        return "pretrained"
    if isinstance(value, str) and ("/" in value or os.sep in value):
        value = Path(value).stem  # a weights file: its name, not its folder
    if isinstance(value, (list, tuple)):
        value = "-".join(map(str, value))
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value).lower() if isinstance(value, bool) else str(value))
    return text.strip("-.") or "x"


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a study file and check its shape; ``base`` is made absolute when it names a file."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a study is a mapping with keys {', '.join(SPEC_KEYS)}")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown study key(s) {', '.join(sorted(unknown))} (known: {', '.join(SPEC_KEYS)})")
    spec.setdefault("base", "default")
    base = str(spec["base"])
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str((path.parent / base).resolve())
    resolve_preset(base)  # an unknown preset or a missing file is an error here, naming it
    spec["base"] = base
    spec["overrides"] = _string_list(spec.get("overrides") or [], f"{path}: overrides")
    grid = spec.get("grid") or {}
    for i, part in enumerate(grid if isinstance(grid, list) else [grid]):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        if not isinstance(part, dict):
            raise ConfigError(f"{path}: {where}: a mapping of config key to a list of values (or a list of such "
                              "mappings: the runs of each, one after the other)")
        for key, values in part.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: {where}.{key}: give a non-empty list of values")
    spec["grid"] = grid
    if not isinstance(spec.setdefault("branch", True), bool):
        raise ConfigError(f"{path}: branch: true or false (got {spec['branch']!r})")
    pre = spec.get("pretrain")
    if pre is not None:
        if not isinstance(pre, dict) or set(pre) - set(PRETRAIN_KEYS):
            raise ConfigError(f"{path}: pretrain: a mapping with keys {', '.join(PRETRAIN_KEYS)}")
        pre["overrides"] = _string_list(pre.get("overrides") or [], f"{path}: pretrain.overrides")
        if pre.get("synth_cls") is not None:
            sc = pre["synth_cls"] or {}
            if not isinstance(sc, dict) or set(sc) - set(SYNTH_CLS_KEYS):
                raise ConfigError(f"{path}: pretrain.synth_cls: a mapping with keys {', '.join(SYNTH_CLS_KEYS)}")
            pre["synth_cls"] = {k: type(v)(sc.get(k, v)) for k, v in SYNTH_CLS_KEYS.items()}
            if pre["synth_cls"]["classes"] not in ("target", "other"):
                raise ConfigError(f"{path}: pretrain.synth_cls.classes: target or other "
                                  f"(got {pre['synth_cls']['classes']!r})")
    return spec


def _string_list(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) and "=" in v for v in values):
        raise ConfigError(f"{what}: a list of key=value strings")
    return list(values)


def expand(spec: dict[str, Any], root: str | Path, *, name: str) -> Study:
    """The study's members: the pretrain stage (if any), then the grid's product in order."""
    root = Path(root)
    pre = spec.get("pretrain")
    backbone = str((root / PRETRAIN_NAME / "backbone_final.pth").resolve())
    members: list[Member] = []
    synth_cls = None
    if pre is not None:
        images = []
        if pre.get("synth_cls") is not None:
            synth_cls = pre["synth_cls"]
            images = [f"pretrain.images={(root / SYNTH_CLS_DIR).resolve()}"]
        # An override that names the pretrain stage's output (model.init=@pretrain) is the detection runs' only.
        common = [o for o in spec["overrides"] if PRETRAIN_REF not in o]
        members.append(Member(PRETRAIN_NAME, "pretrain", common + images + pre["overrides"]))
    combos = []
    for grid in grid_parts(spec):
        # Default names: each grid key's last part and the value (init-random_schedule-0.01x_subset-150).
        template = spec.get("name") or "_".join(f"{k.rsplit('.', 1)[-1]}-{{{k}}}" for k in grid) or "run"
        combos += [(template, dict(zip(grid, combo))) for combo in itertools.product(*grid.values())]
    for template, values in combos:
        uses = PRETRAIN_REF in values.values() or PRETRAIN_REF in " ".join(spec["overrides"])
        if uses and pre is None:
            raise ConfigError(f"{PRETRAIN_REF} is used but the study has no pretrain: stage")
        overrides = [o.replace(PRETRAIN_REF, backbone) for o in spec["overrides"]]
        overrides += [f"{k}={_value_text(backbone if v == PRETRAIN_REF else v)}" for k, v in values.items()]

        def field_value(m: re.Match, values: dict[str, Any] = values) -> str:
            if m.group(1) not in values:
                raise ConfigError(f"name: {{{m.group(1)}}} is not a grid key (grid keys: {', '.join(values)})")
            return _safe(values[m.group(1)])

        run_name = re.sub(r"[^A-Za-z0-9._+-]+", "-", re.sub(r"\{([^{}]+)\}", field_value, str(template))).strip("-.")
        members.append(Member(run_name or "run", "train", overrides, values, needs_pretrain=uses))
    names = [m.name for m in members if m.kind == "train"]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"name: two runs are both named {n!r}; put every grid key in the name template")
        if n in RESERVED:
            raise ConfigError(f"name: a run may not be named {n!r} (reserved for the study's own folders)")
    study = Study(root=root, name=name, spec=spec, base=spec["base"], members=members, synth_cls=synth_cls)
    plan_branches(study)
    return study


# --------------------------------------------------------------------------- schedule branching


def grid_parts(spec: dict[str, Any]) -> list[dict[str, list[Any]]]:
    """The study's grids: one mapping, or a list of them whose products run one after the other."""
    grid = spec["grid"]
    return grid if isinstance(grid, list) else [grid]


def grid_keys(spec: dict[str, Any]) -> set[str]:
    """Every key any of the study's grids varies."""
    return {k for part in grid_parts(spec) for k in part}


def _schedule_as_run(cfg: Any) -> Any:
    """The schedule ``engine.train`` will run for ``cfg`` (the same in every precision); a ConfigError
    when it depends on the data set's size (``solver.epochs``)."""
    from ..schedule import resolve_schedule

    subset = cfg.data.subset
    return cfg, resolve_schedule(cfg.solver, int(subset) if subset >= 1 else None)


def _nearest_arm(name: str, keys: dict[str, dict[str, Any]]) -> str:
    """Why a run has no other length to share a trunk with: the keys in which it differs from the closest run."""
    ours = keys[name]
    diffs = {other: differing_keys(ours, theirs) for other, theirs in keys.items() if other != name}
    if not diffs:
        return "no other run in the study to share a trunk with"
    other, differ = min(diffs.items(), key=lambda x: (len(x[1]), x[0]))
    return (f"no other length of its arm: the closest run, {other}, differs in {', '.join(differ[:4])}"
            + (f" and {len(differ) - 4} more" if len(differ) > 4 else "") + " (a trunk is shared only by runs "
            "that differ in the schedule's length alone)")


def plan_branches(study: Study) -> None:
    """Group the runs into arms (configs equal but for the schedule's length) and make the run with
    the latest first LR drop of each arm its trunk, the others its branches (``Member`` fields)."""
    from ..branching import branch_point

    runs = [m for m in study.members if m.kind == "train"]
    arms: dict[str, list[tuple[Member, int]]] = {}
    keys: dict[str, dict[str, Any]] = {}  # each run's config without the schedule's length
    for m in runs:
        try:
            cfg = study.config(m)
        except ConfigError:
            continue  # check_configs names the run and the key
        try:
            cfg, sched = _schedule_as_run(cfg)
        except ConfigError as e:
            subset = "without data.subset" if not cfg.data.subset else f"with data.subset={cfg.data.subset:g} a fraction"
            m.alone_reason = (f"solver.epochs {subset}: its length depends on the training set's size, known only "
                              "when the data loads (give data.subset as a count of images, or solver.schedule, to branch)"
                              if cfg.solver.epochs else f"its schedule cannot be resolved before the data loads ({e})")
            continue
        m.max_iter = sched.max_iter
        if not study.spec.get("branch", True):
            m.alone_reason = "branch: false in the study file"
            continue
        fixed = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in BRANCH_FREE_KEYS}
        keys[m.name] = fixed
        arms.setdefault(json.dumps(fixed, sort_keys=True, default=str), []).append((m, branch_point(sched)))
    varies = bool(grid_keys(study.spec) & set(BRANCH_FREE_KEYS))
    for arm in arms.values():
        if len(arm) == 1:
            if varies:
                arm[0][0].alone_reason = _nearest_arm(arm[0][0].name, keys)
            continue
        trunk, last = max(arm, key=lambda x: (x[1], x[0].max_iter or 0))
        trunk.keep_at = tuple(sorted({at for m, at in arm if m is not trunk}))
        for m, at in arm:
            if m is not trunk:
                m.trunk, m.branch_at = trunk.name, at


def execution_order(study: Study) -> list[Member]:
    """The members in study order, each trunk moved before its first branch."""
    by_name = {m.name: m for m in study.members}
    order: list[Member] = []
    for m in study.members:
        if m.trunk is not None and by_name[m.trunk] not in order:
            order.append(by_name[m.trunk])
        if m not in order:
            order.append(m)
    return order


def iteration_counts(study: Study) -> dict[str, int]:
    """Planned iterations alone and with branching, and those run so far (a branch's own tail only)."""
    alone = with_branching = run = 0
    for m in study.members:
        if m.kind != "train" or m.max_iter is None:
            continue
        reached = member_progress(study.run_dir(m))["iteration"]
        start = m.branch_at or 0
        alone += m.max_iter
        with_branching += m.max_iter - start
        run += max(0, reached - start)
    return {"alone": alone, "branched": with_branching, "run": run, "saved": alone - with_branching}


def open_study(path: str | Path, out: str | Path | None = None) -> Study:
    """A study from its file (into ``out``, default ``runs/<file stem>``), or an existing study directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / SPEC_FILE).is_file():
            raise ConfigError(f"{path}: not a study directory (no {SPEC_FILE}); give the study's YAML file")
        if out is not None and Path(out).resolve() != path.resolve():
            raise ConfigError(f"{path} is a study directory; --out does not apply to it")
        return expand(load_spec(path / SPEC_FILE), path, name=path.name)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    root = Path(out) if out else Path("runs") / path.stem
    return expand(load_spec(path), root, name=root.name)


def save_spec(study: Study) -> None:
    """``STUDY_DIR/study.yaml``: the spec as run (resume and ``--status`` read it)."""
    study.root.mkdir(parents=True, exist_ok=True)
    text = "# written by `scratchdet study`; `scratchdet study THIS_DIR` resumes the study\n" + \
        yaml.safe_dump(study.spec, sort_keys=False)
    ckpt.atomic_write_bytes(study.root / SPEC_FILE, text.encode())


def check_configs(study: Study) -> None:
    """Every member's config loads (names the member and the key otherwise)."""
    for m in study.members:
        try:
            study.config(m)
        except ConfigError as e:
            raise ConfigError(f"run {m.name}: {e}") from None


# --------------------------------------------------------------------------- state (study.json)


def read_state(root: str | Path) -> dict[str, Any]:
    """``study.json``: ``{"members": {name: {status, error, started, finished, seconds, pid}}}``."""
    path = Path(root) / STATE_FILE
    if not path.is_file():
        return {"members": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # a write is atomic, so only a hand edit gets here
        return {"members": {}}


def _record(study: Study, name: str, **entry: Any) -> None:
    state = read_state(study.root)
    state["members"].setdefault(name, {}).update(entry)
    ckpt.atomic_write_bytes(study.root / STATE_FILE, json.dumps(state, indent=1).encode())


def is_finished(run_dir: Path) -> bool:
    """A member is done when its run wrote ``model_final.pth`` (train and pretrain both write it last)."""
    return (run_dir / ckpt.FINAL).is_file()


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- running


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def _config_drift(run_dir: Path, cfg: Any) -> list[str]:
    """Keys whose value in the run's ``config.yaml`` differs from the study's config for it now."""
    saved = _saved_config(run_dir)
    if saved is None:
        return []
    from ..config import without_removed

    return differing_keys(without_removed(flatten(saved)), flatten(to_dict(cfg)))


def ensure_synth_cls(root: Path, params: dict[str, Any]) -> Path:
    """Generate the pretrain stage's ImageFolder once (into a temporary folder, then renamed)."""
    from ..synth import generate_cls

    out = root / SYNTH_CLS_DIR
    manifest = out / "synth_cls.json"
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        done["classes"] = done.get("class_set", "target")  # the manifest's "classes" lists the names
        if all(done.get(k) == v for k, v in params.items()):
            return out
        raise ConfigError(f"{out} was generated with other settings ({manifest}); remove it or restore the study's "
                          "pretrain.synth_cls")
    tmp = root / (SYNTH_CLS_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_cls(tmp, **params)
    os.replace(tmp, out)
    return out


def run_member(study: Study, member: Member, *, progress: bool) -> None:
    """Train one member in this process, resuming it when it has started (``--resume`` semantics)."""
    cfg = study.config(member)
    run_dir = study.run_dir(member)
    drift = _config_drift(run_dir, cfg)
    if drift:
        saved = _saved_config(run_dir) or {}
        why = ("; it was saved with solver.fp32_cpu_scale, since removed: a member trained in fp32 on a CPU without "
               "native bf16 then ran a scaled schedule, and every precision now runs the spec's"
               if "fp32_cpu_scale" in (saved.get("solver") or {}) else "")
        raise ConfigError(f"{run_dir} was started with another config ({', '.join(drift[:6])} differ{why}); remove the "
                          "run directory to train it under the study's current spec, or restore the spec")
    if member.kind == "pretrain":
        from ..pretrain import pretrain

        if study.synth_cls is not None:
            ensure_synth_cls(study.root, study.synth_cls)
        pretrain(cfg, run_dir, resume=True, progress=progress)
    else:
        from ..engine import train

        trunk = study.root / member.trunk if member.trunk is not None else None
        train(cfg, run_dir, resume=True, progress=progress, keep_at=member.keep_at, branch_from=trunk)


def run_study(study: Study, *, progress: bool = True) -> dict[str, str]:
    """Run every member one after another; returns ``{name: status}`` (done, failed).

    A finished member is skipped, a started one resumes from its newest checkpoint, a failure is
    recorded in ``study.json`` with its error and the study goes on (members that need a failed
    pretrain stage fail with that reason).  SIGTERM/SIGINT stop the study after the current run's
    checkpoint; running the study again continues it.
    """
    save_spec(study)
    results: dict[str, str] = {}
    bar = tqdm(total=len(study.members), position=0, desc=f"study {study.name}", file=sys.stderr, dynamic_ncols=True,
               disable=not progress, unit="run")
    try:
        for i, member in enumerate(execution_order(study)):
            bar.set_postfix_str(member.name)
            run_dir = study.run_dir(member)
            if is_finished(run_dir):
                results[member.name] = "done"
                _record(study, member.name, status="done", error=None)
                bar.update(1)
                continue
            if member.needs_pretrain and results.get(PRETRAIN_NAME) != "done":
                why = read_state(study.root)["members"].get(PRETRAIN_NAME, {}).get("error")
                error = "the pretrain stage did not finish" + (f" ({why})" if why else "")
                results[member.name] = "failed"
                _record(study, member.name, status="failed", error=error, finished=time.time())
                tqdm.write(f"study: {member.name}: failed: {error}", file=sys.stderr)
                bar.update(1)
                continue
            if member.trunk is not None and results.get(member.trunk) == "failed" and \
                    not (study.root / member.trunk / branch_name(member.branch_at)).is_file():
                error = f"its trunk {member.trunk} failed before iteration {member.branch_at}, its branch point"
                results[member.name] = "failed"
                _record(study, member.name, status="failed", error=error, finished=time.time())
                tqdm.write(f"study: {member.name}: failed: {error}", file=sys.stderr)
                bar.update(1)
                continue
            tqdm.write(f"study: [{i + 1}/{len(study.members)}] {member.name} -> {run_dir}", file=sys.stderr)
            start = time.time()
            _record(study, member.name, status="running", error=None, started=start, pid=os.getpid())
            try:
                run_member(study, member, progress=progress)
            except (KeyboardInterrupt, SystemExit):  # Preempted (SIGTERM) included: the run checkpointed
                _record(study, member.name, status="interrupted", seconds=round(time.time() - start, 1))
                raise
            except Exception as e:  # noqa: BLE001 - one member's failure must not stop the others
                error = f"{type(e).__name__}: {e}"
                results[member.name] = "failed"
                _record(study, member.name, status="failed", error=error, finished=time.time(),
                        seconds=round(time.time() - start, 1), traceback=traceback.format_exc(limit=-4))
                tqdm.write(f"study: {member.name}: failed: {error}", file=sys.stderr)
            else:
                results[member.name] = "done"
                _record(study, member.name, status="done", error=None, finished=time.time(),
                        seconds=round(time.time() - start, 1))
            bar.update(1)
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------- status


def member_progress(run_dir: Path) -> dict[str, Any]:
    """Iteration reached and the latest AP, from the run's ``metrics.jsonl``."""
    from ..run import read_metrics

    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    out: dict[str, Any] = {"iteration": max((r.get("iteration", 0) for r in records), default=0)}
    evals = [r for r in records if "bbox/AP" in r or "voc/mAP" in r]  # a VOC validation set logs voc/mAP
    if evals:
        out.update({k: evals[-1].get(k) for k in ("bbox/AP", "segm/AP", "voc/mAP")}, ap_iteration=evals[-1]["iteration"])
    return out


def planned_iterations(study: Study, member: Member) -> int | None:
    """The member's schedule length from its config (None when it depends on the data set's size: solver.epochs)."""
    from ..schedule import resolve_schedule

    try:
        cfg = study.config(member)
        subset = cfg.data.subset
        return resolve_schedule(cfg.solver, int(subset) if subset >= 1 else None).max_iter
    except ConfigError:
        return None


def status_rows(study: Study) -> list[dict[str, Any]]:
    """One row per member: status (done, running, interrupted, failed, started, pending) and progress."""
    state = read_state(study.root)["members"]
    rows = []
    for m in study.members:
        run_dir = study.run_dir(m)
        entry = state.get(m.name, {})
        p = member_progress(run_dir)
        p["max_iter"] = m.max_iter if m.kind == "train" else planned_iterations(study, m)
        if is_finished(run_dir):
            status = "done"
        elif entry.get("status") == "running":
            status = "running" if _pid_alive(entry.get("pid")) else "interrupted"
        elif entry.get("status") in ("failed", "interrupted"):
            status = entry["status"]
        else:
            status = "started" if p["iteration"] else "pending"
        rows.append({"run": m.name, "status": status, **p, "error": entry.get("error") if status == "failed" else None,
                     "seconds": entry.get("seconds"), "role": role(m)})
    return rows


def role(member: Member) -> str:
    """A run's part in schedule branching, as ``--status`` shows it."""
    if member.trunk is not None:
        return f"branch of {member.trunk} at {member.branch_at}"
    if member.keep_at:
        return f"trunk (branches at {', '.join(map(str, member.keep_at))})"
    return f"alone: {member.alone_reason}" if member.alone_reason else ""


def format_status(study: Study) -> str:
    """The ``--status`` table: run, status, progress, latest box and mask AP, and a failure's error."""
    rows = status_rows(study)
    header = ("run", "status", "iteration", "progress", "bbox AP", "segm AP", "branching", "note")
    table = []
    for r in rows:
        total = r["max_iter"]
        pct = f"{100 * r['iteration'] / total:.0f}%" if total else "?"
        ap = [f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("bbox/AP", "segm/AP")]
        note = r["error"] or (f"AP at iteration {r['ap_iteration']}" if r.get("ap_iteration") else "")
        if r.get("voc/mAP") is not None and not r["error"]:
            note = f"VOC mAP {r['voc/mAP']:.2f}; {note}"
        table.append((r["run"], r["status"], f"{r['iteration']}/{total or '?'}", pct, *ap, r["role"], note))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *table)]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "failed", "interrupted")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    n = iteration_counts(study)
    counted = (f"iterations: {n['run']:,} run of {n['branched']:,} planned with branching; {n['alone']:,} trained "
               f"alone, so branching saves {n['saved']:,} ({100 * n['saved'] / n['alone']:.0f}%)") \
        if n["alone"] and grid_keys(study.spec) & set(BRANCH_FREE_KEYS) else ""
    return f"study {study.name} ({study.root}): {len(rows)} runs" + (f", {summary}" if summary else "") + "\n" + \
        "\n".join(lines) + (f"\n{counted}" if counted else "")


# --------------------------------------------------------------------------- emitting commands


def _command(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def _synth_cls_command(study: Study) -> str:
    sc = study.synth_cls or {}
    return _command("scratchdet", "data", "synth-cls", "--out", str((study.root / SYNTH_CLS_DIR).resolve()),
                    "--seed", str(sc["seed"]), "--per-class", str(sc["per_class"]), "--size", str(sc["size"]),
                    "--classes", sc["classes"])


def indivisible_batches(study: Study, *, world: int) -> list[str]:
    """Runs whose global batch (``solver.ims_per_batch``) cannot be split among ``world`` processes."""
    out = []
    for m in study.members:
        n = study.config(m).solver.ims_per_batch
        if m.kind == "train" and n % world:
            out.append(f"{m.name}: solver.ims_per_batch={n} does not divide among {world} processes")
    return out


def emit_torchrun(study: Study, *, nproc: int) -> str:
    """A shell script: the pretrain stage (one process, as ``scratchdet pretrain`` runs), then one
    ``torchrun`` command per run, in the study's order."""
    lines = [f"# study {study.name}: {len(study.members)} runs into {study.root.resolve()}, in this order "
             "(the pretrained arm needs the pretrain stage first)",
             f"# a stopped run continues with `scratchdet train --resume DIR`; progress: "
             f"scratchdet study {study.root} --status", "set -e"]
    for m in execution_order(study):
        out = str(study.run_dir(m).resolve())
        if m.kind == "pretrain":
            if study.synth_cls is not None:
                lines.append(_synth_cls_command(study))
            lines.append(_command("scratchdet", "pretrain", study.base, *m.overrides, "--out", out))
        else:
            lines.append(_command("torchrun", f"--nproc_per_node={nproc}", "-m", "scratchdet", "train", study.base,
                                  *m.overrides, "--out", out, *_branch_args(study, m)))
    return "\n".join(lines) + "\n"


def _branch_args(study: Study, m: Member) -> list[str]:
    """``train``'s schedule-branching flags for a member: a trunk's ``--keep-at``, a branch's ``--branch-from``."""
    if m.trunk is not None:
        return ["--branch-from", str((study.root / m.trunk).resolve())]
    return ["--keep-at", ",".join(map(str, m.keep_at))] if m.keep_at else []


def emit_slurm(study: Study, *, nproc: int, nodes: int) -> dict[str, str]:
    """sbatch scripts: ``pretrain.sbatch`` (when there is a pretrain stage), ``study.sbatch``, a job
    array with one task per trunk or run alone (``srun torchrun``, docs/distributed.md's multi-node pattern),
    and ``branches.sbatch`` (when runs branch), one task per schedule branch, each submitted to start
    after its own trunk's task of ``study.sbatch`` succeeded (``--dependency=afterok:JOB_TASK``).  A task
    skips a finished run and resumes a started one, so an array can be resubmitted after a failure."""
    root = str(study.root.resolve())
    runs = [m for m in study.members if m.kind == "train"]
    scripts: dict[str, str] = {}
    pre = next((m for m in study.members if m.kind == "pretrain"), None)
    if pre is not None:
        steps = [f"srun {_synth_cls_command(study)}"] if study.synth_cls is not None else []
        scripts["pretrain.sbatch"] = "\n".join([
            "#!/bin/bash",
            f"#SBATCH --job-name={study.name}-pretrain",
            "#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=1",
            f"#SBATCH --output={root}/slurm-pretrain-%j.out",
            "set -euo pipefail",
            f"dir={shlex.quote(str(study.run_dir(pre).resolve()))}",
            'if [ -f "$dir/model_final.pth" ]; then echo "pretrain: finished"; exit 0; fi',
            'where=(--out "$dir"); if [ -e "$dir/metrics.jsonl" ]; then where=(--resume "$dir"); fi',
            *steps,
            "srun " + _command("scratchdet", "pretrain", study.base, *pre.overrides) + ' "${where[@]}"', ""])
    trunks = [m for m in runs if m.trunk is None]  # trunks and runs alone, then the branches after them
    branches = [m for m in runs if m.trunk is not None]
    after_pre = "--dependency=afterok:$pre " if pre is not None else ""
    q = shlex.quote(root)
    submit = f"sbatch {after_pre}{q}/study.sbatch"
    if branches:
        # Each branch waits for its own trunk's array task only (afterok:JOB_TASK), not the whole array.
        index = {m.name: i for i, m in enumerate(trunks)}
        waits: dict[int, list[int]] = {}
        for j, m in enumerate(branches):
            waits.setdefault(index[m.trunk], []).append(j)
        # --parsable prints JOB or JOB;CLUSTER: the dependency takes the job id alone.
        submit = f"runs=$(sbatch --parsable {after_pre}{q}/study.sbatch) && runs=${{runs%%;*}} && " + " && ".join(
            f"sbatch --dependency=afterok:${{runs}}_{i} --array={','.join(map(str, js))} {q}/branches.sbatch"
            for i, js in sorted(waits.items()))
    if pre is not None:
        submit = f"pre=$(sbatch --parsable {q}/pretrain.sbatch) && pre=${{pre%%;*}} && {submit}"
    for file, members, what in (("study.sbatch", trunks, "run"), ("branches.sbatch", branches, "schedule branch")):
        if not members:
            continue
        cases = [f"  {i}) run={shlex.quote(m.name)}; args=({_command(study.base, *m.overrides, *_branch_args(study, m))}) ;;"
                 for i, m in enumerate(members)]
        # A branch always names its trunk: train --branch-from starts it there, or resumes it once started.
        where = 'where=(--out "$dir")' if what == "schedule branch" else \
            'where=(--out "$dir"); if [ -e "$dir/metrics.jsonl" ]; then where=(--resume "$dir"); fi'
        scripts[file] = "\n".join([
            "#!/bin/bash",
            f"# study {study.name}: one array task per {what}"
            + (" (each starts from its trunk's state: submitted per trunk, after that trunk's task of "
               "study.sbatch)" if what == "schedule branch" else "")
            + ". Submit with:",
            f"#   {submit}",
            f"#SBATCH --job-name={study.name}" + ("-branches" if what == "schedule branch" else ""),
            f"#SBATCH --nodes={nodes} --ntasks-per-node=1 --gpus-per-node={nproc}",
            f"#SBATCH --array=0-{len(members) - 1}",
            f"#SBATCH --output={root}/slurm-%A_%a.out",
            "set -euo pipefail",
            'case "$SLURM_ARRAY_TASK_ID" in', *cases, '  *) echo "no run for task $SLURM_ARRAY_TASK_ID"; exit 1 ;;',
            "esac",
            f'dir={shlex.quote(root)}/"$run"',
            'if [ -f "$dir/model_final.pth" ]; then echo "$run: finished"; exit 0; fi',
            where,
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node={nproc} --rdzv-backend=c10d '
            '--rdzv-endpoint="$head:29500" --rdzv-id="$SLURM_JOB_ID" --max-restarts=3 \\',
            '     -m scratchdet train "${args[@]}" "${where[@]}"', ""])
    return scripts
