"""The schedule a run uses: the paper's Nx rule (Sec. 4: LR drops in the last 60k and 20k
iterations of N x 90k at 16 images), epochs, linear scaling to the batch, and the checks and
warnings on it (Table 1: from scratch needs 5x-6x on COCO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ITERS_PER_X, REFERENCE_BATCH, ConfigError, SolverConfig


@dataclass(frozen=True)
class Schedule:
    """The schedule a run actually uses, after the paper's rule and batch-size scaling."""

    base_lr: float
    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    notes: tuple[str, ...]


def parse_schedule(text: str) -> float:
    """``'6x'`` -> 6.0; any positive N, fractional too (``'0.5x'``)."""
    t = text.strip().lower()
    if not t.endswith("x"):
        raise ConfigError(f"solver.schedule: {text!r} is not of the form Nx (e.g. 2x, 6x, 0.5x)")
    try:
        n = float(t[:-1])
    except ValueError:
        raise ConfigError(f"solver.schedule: {text!r} is not of the form Nx (e.g. 2x, 6x, 0.5x)") from None
    if n <= 0:
        raise ConfigError(f"solver.schedule: {text!r} must be positive")
    return n


def resolve_schedule(solver: SolverConfig, num_images: int | None = None) -> Schedule:
    """Apply ``schedule`` (the paper's Nx rule) or ``epochs``, then linear scaling to ``ims_per_batch``."""
    notes = []
    base_lr, max_iter, steps, warmup = solver.base_lr, solver.max_iter, list(solver.steps), solver.warmup_iters
    ref = solver.reference_batch_size
    if solver.schedule and solver.epochs:
        raise ConfigError("solver.schedule and solver.epochs: give one of them")
    if solver.schedule:
        n = parse_schedule(solver.schedule)
        ref = ref or REFERENCE_BATCH
        unit = solver.schedule_unit
        max_iter = round(n * unit)
        if n <= 1 and unit == ITERS_PER_X:
            # Detectron's 1x rule (LR drops at 60k and 80k of 90k) scaled by N: the paper's own 1x.
            drops = (round(30_000 * n), round(10_000 * n))
        else:
            # Sec. 4 of the paper: "reduce the learning rate by 10x in the last 60k and last 20k iterations",
            # i.e. 2/3 and 2/9 of the 90k unit: one rule at any scale, so every Nx of one arm shares its
            # constant-LR trunk (study.py branches the tails from it).
            drops = (round(2 * unit / 3), round(2 * unit / 9))
            if max_iter - drops[0] <= 0:
                raise ConfigError(f"solver.schedule={solver.schedule} with solver.schedule_unit={unit}: the first LR "
                                  f"drop (total - 2/3 unit) would fall at {max_iter - drops[0]}; use a schedule above "
                                  "0.67x of the unit, or a smaller unit")
        steps = [max_iter - d for d in drops]
        notes.append(
            f"schedule {solver.schedule}: {max_iter} iterations at {ref} images, LR drops at {steps[0]} and {steps[1]}"
        )
    if ref and ref != solver.ims_per_batch:
        k = solver.ims_per_batch / ref
        base_lr = base_lr * k
        max_iter = max(1, round(max_iter / k))
        steps = [round(s / k) for s in steps]
        warmup = round(warmup / k)
        notes.append(
            f"linear scaling from {ref} to {solver.ims_per_batch} images per batch: LR {solver.base_lr:g} -> "
            f"{base_lr:g}, {max_iter} iterations, LR drops at {steps}, warmup {warmup} iterations"
        )
    if solver.epochs:
        if not num_images:
            raise ConfigError("solver.epochs: needs the training set's size")
        new_max = max(1, math.ceil(solver.epochs * num_images / solver.ims_per_batch))
        steps = [round(s * new_max / max_iter) for s in steps]
        max_iter = new_max
        notes.append(f"{solver.epochs:g} epochs of {num_images} images at {solver.ims_per_batch} per batch: "
                     f"{max_iter} iterations, LR drops at {steps} (same fractions of the schedule)")
    return Schedule(base_lr, max_iter, tuple(steps), warmup, tuple(notes))


def check_schedule(sched: Schedule) -> None:
    """LR drops and warmup that would not take effect as given are errors (detection training's schedule)."""
    late = [v for v in sched.steps if v >= sched.max_iter]
    if late:
        raise ConfigError(f"solver.steps: LR drop(s) at {late} fall at or past the end of the run (max_iter "
                          f"{sched.max_iter}), where they cannot take effect; move them inside the run")
    if sched.steps and sched.warmup_iters > sched.steps[0]:
        raise ConfigError(f"solver.warmup_iters: warmup of {sched.warmup_iters} iterations outlasts the first LR drop "
                          f"at {sched.steps[0]}; shorten the warmup or move solver.steps")


# Table 1 of the paper (R50-FPN GN, COCO val2017 box AP, random init / ImageNet pre-training, by
# schedule; Sec. 5.1): scratch catches up "if a 5x or 6x schedule is used". The warning fires below 5x.
TABLE1_R50_GN = {2: (36.8, 40.3), 3: (39.5, 40.8), 4: (40.6, 40.9), 5: (40.7, 40.9), 6: (41.3, 41.1)}
SCRATCH_MIN_IMAGES = 5 * ITERS_PER_X * REFERENCE_BATCH


def short_schedule_warning(init: str, images_seen: int) -> str | None:
    """A warning for a from-scratch schedule shorter than the paper's catch-up (5x on COCO), else None."""
    if init != "random" or images_seen >= SCRATCH_MIN_IMAGES:
        return None
    x = images_seen / (ITERS_PER_X * REFERENCE_BATCH)
    table = ", ".join(f"{n}x {s:.1f}/{p:.1f}" for n, (s, p) in TABLE1_R50_GN.items())
    return (f"training from scratch for {images_seen:,} images ({x:.3g}x of COCO's 1x at 16 images): in the paper's "
            f"Table 1 (R50-FPN GN box AP, scratch/pretrained: {table}) scratch catches up at 5x-6x "
            f"({SCRATCH_MIN_IMAGES:,} images or more; this run has {images_seen / SCRATCH_MIN_IMAGES:.3g} of that). "
            "Smaller datasets may need fewer, but expect a gap if the schedule is short")
