"""A recipe sized from the training set: the input size, the anchors and the length, each with its reason.

``fit_recipe`` reads the training annotations only (no image opened) and returns config overrides;
``scratchdet data fit`` prints them, and ``data.fit=true`` applies them at the start of a run (the dry run and
the log say what was chosen and why).  The rules, fixed in advance and stated here:

- **Input size.** The default's 256 px shorter side is the CPU budget it was timed at.  It is kept unless the
  training boxes' 10th percentile (sqrt of box area, resized as training resizes them, the longer side's cap
  included) falls under ``data.TINY_BOX`` (8 px: two cells of the stride-4 P2 map, under which no anchor
  setting brings an object back); then the shorter side grows, in steps of 32 px, until that percentile
  reaches 8 px, at most to ``max_side`` (512 px: 4x the default's pixels, about 4x its step on a CPU).  The
  longer side's cap follows the images' 90th-percentile aspect ratio, at most 1333/800 (our choice: the ratio of
  the config's own defaults, data.min_size_train 800 and data.max_size_train 1333).
- **Anchors.** Five sizes an octave apart (one per FPN level, P2-P6), the smallest the power of 2 nearest the
  boxes' 10th percentile at that input size, at least 8 px; the start one octave lower or higher is taken
  instead when it covers more boxes (YOLOv5's AutoAnchor check: the share of boxes with an anchor of their
  shape at IoU >= ``data.COVERAGE_IOU``).  Under ``data.COVERAGE_MIN`` of the boxes covered is a warning.
- **Length.** The same pixels as the default job sees (1500 iterations of 8 images at 256 px: its timed
  budget), as iterations of ``solver.ims_per_batch`` images at the chosen size, the LR dropping at 5/6 and 19/20
  of them as the default's does.  Fewer than 20 passes over the set is a warning: from scratch, a 24-epoch
  schedule lost 17 segm AP to the default's 88 epochs on a 136-image pedestrian set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import COVERAGE_IOU, COVERAGE_MIN, TINY_BOX, anchor_coverage, box_dims

BASE_SIDE = 256  # the default job's shorter side: the CPU budget it was timed at
BASE_PIXELS = 1500 * 8 * 256 * 256  # the default job's pixels seen (1500 iterations of 8 images at 256 x 256)
MAX_SIDE = 512
MAX_ASPECT = 1333 / 800
MIN_EPOCHS = 20
LEVELS = 5  # P2-P6, one anchor size each


@dataclass(frozen=True)
class RecipeFit:
    """What ``fit_recipe`` chose: dotted config keys and values, why, and what it warns of."""

    overrides: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    coverage: float = 1.0

    def override_args(self) -> str:
        """The overrides as a command line's ``key=value`` words."""
        def text(v: Any) -> str:
            return "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)

        return " ".join(f"{k}={text(v)}" for k, v in self.overrides.items())


def fit_recipe(records: list[Any], *, ims_per_batch: int = 8, aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
               max_side: int = MAX_SIDE, side: int | None = None) -> RecipeFit:
    """Size the input, the anchors and the length from a training set's records (``CocoDetection.records``);
    ``side``: the shorter side is given (the anchors and the length are fitted at it)."""
    if not records:
        raise ValueError("data fit: the training set has no images")
    wh_img = np.array([(r.width, r.height) for r in records], dtype=np.float64)
    short, long = wh_img.min(1), wh_img.max(1)
    dims, owner = box_dims(records)
    if not len(dims):
        raise ValueError("data fit: the training set has no boxes to size the input and anchors from")
    boxes = np.sqrt(dims[:, 0] * dims[:, 1])  # in the images' own pixels
    reasons, warnings = [], []

    aspect = min(float(np.percentile(long / short, 90)), MAX_ASPECT)

    def longer_cap(side: int) -> int:  # the longer side's cap at this shorter side (the images' 90th-pct aspect)
        return int(math.ceil(side * aspect / 32) * 32)

    def scale_at(side: int) -> np.ndarray:  # each box's resize, as the training resize does it (the cap included)
        return np.minimum(side / short, longer_cap(side) / long)[owner]

    def p10_at(side: int) -> float:
        return float(np.percentile(boxes * scale_at(side), 10))

    start = min(BASE_SIDE, max_side)
    if side is not None:
        reasons.append(f"input {side} px (shorter side), as given: the boxes' 10th percentile is {p10_at(side):.1f} "
                       "px there")
    elif p10_at(start) < TINY_BOX:
        side = start
        while side < max_side and p10_at(side) < TINY_BOX:
            side = min(side + 32, max_side)
        reasons.append(f"input {side} px (shorter side): at {start} px the boxes' 10th percentile is "
                       f"{p10_at(start):.1f} px, under {TINY_BOX:g} (2 cells of the stride-4 map); at {side} px it "
                       f"is {p10_at(side):.1f}")
        if p10_at(side) < TINY_BOX:
            warnings.append(f"at the largest input allowed ({max_side} px) the boxes' 10th percentile is still "
                            f"{p10_at(side):.1f} px: the smallest objects stay under {TINY_BOX:g} px")
    else:
        side = start
        reasons.append(f"input {side} px (shorter side){', the default' if side == BASE_SIDE else ''}: the boxes' "
                       f"10th percentile is {p10_at(side):.1f} px there, at least {TINY_BOX:g}")
    max_size = longer_cap(side)
    at_size = dims * scale_at(side)[:, None]
    p10 = float(np.percentile(np.sqrt(at_size[:, 0] * at_size[:, 1]), 10))
    first = max(8, 2 ** round(math.log2(max(p10, 1.0))))
    candidates = [first, first * 2] + ([first // 2] if first >= 16 else [])
    coverage = {c: float(np.mean(anchor_coverage(at_size, [c * 2 ** i for i in range(LEVELS)], aspect_ratios)
                                 >= COVERAGE_IOU)) for c in candidates}
    start = max(candidates, key=lambda c: (coverage[c], c == first))
    anchors = [start * 2 ** i for i in range(LEVELS)]
    reasons.append(f"anchors {anchors} px: from the power of 2 nearest the boxes' 10th percentile at {side} px "
                   f"({p10:.1f} px), they cover {coverage[start]:.1%} of the boxes (IoU >= {COVERAGE_IOU:g})")
    if coverage[start] < COVERAGE_MIN:
        warnings.append(f"the fitted anchors cover {coverage[start]:.0%} of the training boxes, under "
                        f"{COVERAGE_MIN:.0%}: many objects are left to the low-quality-match rule")

    pixels_per_image = side * min(float(np.median(long / short)) * side, max_size)
    max_iter = max(1, round(BASE_PIXELS / (pixels_per_image * ims_per_batch)))
    # Drops inside the run, in order (a very short run keeps fewer: a drop at its end would not take effect).
    steps = sorted({s for s in (round(max_iter * 5 / 6), round(max_iter * 19 / 20)) if 0 < s < max_iter})
    epochs = max_iter * ims_per_batch / len(records)
    reasons.append(f"{max_iter} iterations of {ims_per_batch} images (LR drops at {steps}): the default job's "
                   f"pixels seen at {side} px, {epochs:.0f} passes over the {len(records)} training images")
    if epochs < MIN_EPOCHS:
        warnings.append(f"{epochs:.0f} passes over the training set, under {MIN_EPOCHS}: from scratch that is "
                        "short; more iterations (solver.max_iter, solver.steps) cost time in proportion")
    overrides = {"data.min_size_train": [side], "data.max_size_train": max_size, "data.min_size_test": side,
                 "data.max_size_test": max_size, "model.anchor_sizes": anchors, "solver.max_iter": max_iter,
                 "solver.steps": steps, "solver.warmup_iters": min(100, max(0, (steps[0] if steps else max_iter) // 2))}
    return RecipeFit(overrides, reasons, warnings, coverage[start])
