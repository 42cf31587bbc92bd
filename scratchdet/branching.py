"""Schedule branching: one trunk, many lengths.

Runs of one arm that differ only in length share everything before their first LR drop (the
paper's rule drops the LR in the last 60k and 20k iterations, so a longer run is the shorter
one's trunk up to there).  A trunk saves its state at the shorter lengths' first drops
(``--keep-at``, ``branch_name``); a branch starts from that state (``--branch-from``,
``start_branch``) and trains only its tail.  ``analysis/study.py`` plans the trunks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import distributed as dist
from .config import ConfigError, differing_keys, flatten, from_dict, without_removed
from .run import read_metrics
from .schedule import Schedule, resolve_schedule

log = logging.getLogger("scratchdet")


def branch_point(sched: Schedule) -> int:
    """Where a schedule parts from a longer run of its arm: its first LR drop (its end where it has none).

    Before it the LR is the same warmup and base LR for every length, so the runs are one run."""
    return sched.steps[0] if sched.steps else sched.max_iter


def branch_name(iteration: int) -> str:
    """A trunk's checkpoint at a branch point (``ckpt.prune`` never matches this name)."""
    return f"branch_{iteration:07d}.pth"


# What a branch may change: the length and where its LR drops (start_branch checks the trunk is at its
# base LR up to the branch point, whichever rule placed the drops).
BRANCH_FREE_KEYS = ("solver.schedule", "solver.max_iter", "solver.steps", "solver.epochs")


def start_branch(trunk_dir: str | Path, run_dir: str | Path, at: int, *, config: dict[str, Any] | None = None,
                 num_images: int | None = None, end: int | None = None) -> bool:
    """Start ``run_dir`` as a schedule branch of ``trunk_dir`` at iteration ``at``: the trunk's
    branch checkpoint becomes the run's ``model_{at}.pth`` and the trunk's metrics up to ``at``
    (each marked ``branched_from``) its ``metrics.jsonl``, so a plain resume trains the tail.
    Returns False (and changes nothing) when the run has started already: it resumes as it is."""
    import yaml

    trunk_dir, run_dir = Path(trunk_dir), Path(run_dir)
    if (run_dir / ckpt.FINAL).exists() or ckpt.periodic_checkpoints(run_dir):
        return False
    if config is not None and (trunk_dir / "config.yaml").is_file():
        # A branch is the trunk's own run up to ``at`` only when nothing but the schedule's length differs.
        raw = yaml.safe_load((trunk_dir / "config.yaml").read_text()) or {}
        theirs, ours = without_removed(flatten(raw)), without_removed(flatten(config))
        differ = [k for k in differing_keys(theirs, ours) if k not in BRANCH_FREE_KEYS]
        if differ:
            raise FileExistsError(f"{run_dir}: cannot branch from {trunk_dir}: its config differs in "
                                  f"{', '.join(differ[:6])} (a branch may differ only in {', '.join(BRANCH_FREE_KEYS)})")
        # ... and only when the trunk was still at its base LR up to ``at``: a trunk whose LR dropped
        # earlier (a shorter length, or solver.steps of its own) is another run before the branch point.
        trunk = resolve_schedule(from_dict(raw).solver, num_images)
        if trunk.steps and trunk.steps[0] < at:
            raise FileExistsError(f"{run_dir}: cannot branch from {trunk_dir} at iteration {at}: the trunk's LR "
                                  f"dropped at iteration {trunk.steps[0]}, before the branch point (LR drops "
                                  f"{list(trunk.steps)}); the trunk must be the arm's length with the latest "
                                  "first drop")
    source = trunk_dir / branch_name(at)
    if (problem := ckpt.verify(source)) is not None:
        raise FileNotFoundError(f"{source}: {problem}; the trunk {trunk_dir} saves it when it reaches iteration {at} "
                                f"(train it with --keep-at {at})")
    run_dir.mkdir(parents=True, exist_ok=True)
    # The curve before the branch point is the trunk's (the same run up to there): copied, marked.
    # Written before the checkpoint, which marks the branch as started: a branch killed in between
    # starts again rather than resuming without the trunk's curve.
    # A branch point at the branch's end (``end``): the trunk's evaluation there is the branch's final one,
    # which the branch runs itself (a run alone evaluates once at its end).
    records = [{**r, "branched_from": str(trunk_dir.resolve())} for r in read_metrics(trunk_dir)
               if "iteration" in r and r["iteration"] <= at
               and not (r["iteration"] == at == end and ("matches" in r or any("/" in k for k in r)))]
    ckpt.atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    target = run_dir / f"model_{at:07d}.pth"
    ckpt.atomic_write_bytes(target, source.read_bytes())
    digest = source.with_name(source.name + ".sha256").read_text().split()[0]  # verified above
    ckpt.atomic_write_bytes(target.with_name(target.name + ".sha256"), f"{digest}  {target.name}\n".encode())
    log.info("schedule branch of %s at iteration %d (its first LR drop): %s", trunk_dir, at, run_dir)
    return True


def check_keep_at(keep_at: tuple[int, ...], sched: Schedule) -> None:
    """A branch point the trunk never reaches (or its end, where model_final.pth is the state) is an error."""
    late = [k for k in keep_at if k >= sched.max_iter]
    if late:
        raise ConfigError(f"--keep-at {', '.join(map(str, late))}: at or past this run's end ({sched.max_iter} "
                          "iterations); a trunk keeps the first LR drops of shorter lengths")


def needs_end_line(run_dir: Path, *, start_iter: int, max_iter: int, log_period: int) -> bool:
    """Whether a branch must write its last log line itself: a branch whose branch point is its end (a
    schedule without LR drops) runs no step, and its last line (the trunk's steps since its last line) is
    the one a run alone writes, once (a branch killed before model_final.pth kept it).  A collective."""
    return start_iter == max_iter and bool(max_iter % log_period) and not dist.broadcast(
        dist.is_main() and any(r.get("iteration") == max_iter and "loss" in r for r in read_metrics(run_dir)))
