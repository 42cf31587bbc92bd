"""Curves of AP against images seen: where a from-scratch arm levels off, and whether to believe it.

The main form is a saturating power law, ``AP(x) = a - b * (x / x0) ** (-1 / c)``, with ``x0`` the first
point's images seen: ``a`` is the plateau, ``b`` how far below it the first point lies, ``1 / c`` the exponent at
which the gap closes (each doubling of images seen shrinks it by ``2 ** (-1 / c)``).  Why a power law: learning
curves against training-set size follow one (Hestness et al. 2017, "Deep Learning Scaling is Predictable,
Empirically"); taking images seen over a schedule on a fixed set for that axis is our choice.  In
``u = ln(x / x0)`` the curve is ``a - b * exp(-u / c)``; for a fixed ``c`` that is linear in ``a`` and ``b``,
so ``fit_curve`` is exact least squares on a log-spaced grid of ``c`` (then a finer grid around the best):
no starting point to guess.  The exponential ``a - b * exp(-(x / x0 - 1) / c)`` is fitted the same way, the
log-linear ``a + b * ln(x / x0)`` (never levels off) by ordinary least squares.

Intervals come from refits, not residuals: ``bootstrap.length_replicates`` resamples each length's AP jointly
(validation images and seeds, the same image draw at every length) and ``fit_curve`` refits the form on every
replicate, so the plateau's interval carries each point's own uncertainty (a residual bootstrap of a 3-parameter
fit through 4 points had one degree of freedom and gave intervals 5-10x too narrow).  From fewer lengths than the
form's parameters + 2 there is no interval, and the fit says why.

A form is believed only after it predicted points it was not fitted on: ``leave_last_out`` scores each form on
the arm's longest run, ``choose_form`` applies a rule fixed in advance (the extrapolations use the form it
picks), and ``backtest_table1`` fits the paper's Table 1 at 2x-4x and predicts 5x-6x.  What each study found
with them is on its report page and in docs/statistics.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# c is searched from 1/300 to 30 times the span of ln(images seen): a c at either end means the points do not
# show the bend (still straight, or flat from the first point), and the plateau is not identified.
_C_RANGE = (1 / 300, 30.0)
# Points an interval needs: the curve's 3 parameters plus 2, so that refits see at least 2 residual degrees of
# freedom (with 4 points the residual bootstrap had 1, and gave intervals 5-10x narrower than each point's own
# uncertainty); with fewer, no interval is given, and the findings say so in words.
MIN_POINTS_FOR_INTERVAL = 5
_GRID = 400
_FINE = 40
# The curve forms (CurveFit's docstring) and their parameter counts.
FORM_PARAMS = {"power law": 3, "exponential": 3, "log-linear": 2}


@dataclass(frozen=True)
class CurveFit:
    """A curve of ``form`` fitted to (images seen, AP), with its plateau's interval from refits on replicates.

    power law    ``a - b * (x / x0) ** (-1 / c)``      plateau a
    exponential  ``a - b * exp(-(x / x0 - 1) / c)``    plateau a
    log-linear   ``a + b * ln(x / x0)``                no plateau (c is nan): it never levels off
    """

    a: float
    b: float
    c: float
    x0: float
    interval: tuple[float, float]  # of the plateau a, at ``level``; nan where there is none (``why_no_interval``)
    level: float
    rmse: float
    at_bound: bool  # c ended at its search limit: the plateau is an extrapolation the points do not support
    boot: np.ndarray  # [B, 3] refitted (a, b, c) per replicate row; empty where there is no interval
    form: str = "power law"
    why_no_interval: str = ""

    @property
    def plateau(self) -> float:
        """Where the curve levels off: ``a``; inf for the log-linear form, which never does."""
        return math.inf if self.form == "log-linear" else self.a

    def predict(self, xs: np.ndarray | float) -> np.ndarray:
        """The fitted AP at images seen ``xs``."""
        return _curve(self.form, np.asarray(xs, dtype=float) / self.x0, self.a, self.b, self.c)


class Reach(NamedTuple):
    """Images seen where the fitted curve reaches a target AP (inf: never), with its interval."""

    images: float
    low: float
    high: float


def _axis(form: str, r: np.ndarray) -> np.ndarray:
    """The variable in which ``form`` is linear in (a, b) for a fixed c, from ``r = x / x0``."""
    if form not in FORM_PARAMS:
        raise ValueError(f"unknown curve form {form!r}; forms: {', '.join(FORM_PARAMS)}")
    return np.log(r) if form in ("power law", "log-linear") else r - 1


def _curve(form: str, r: np.ndarray, a: float | np.ndarray, b: float | np.ndarray,
           c: float | np.ndarray) -> np.ndarray:
    u = _axis(form, r)
    return a + b * u if form == "log-linear" else a - b * np.exp(-u / c)


def _check_points(xs: np.ndarray, ys: np.ndarray, params: int = 3) -> None:
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"xs and ys must be 1-d and of one length; got shapes {xs.shape} and {ys.shape}")
    if len(np.unique(xs)) < params:
        raise ValueError(f"a curve of {params} parameters needs at least {params} distinct points; got {len(xs)} "
                         f"point(s) at {len(np.unique(xs))} distinct x")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("xs and ys must be finite")
    if (xs <= 0).any():
        raise ValueError(f"images seen must be positive for a curve in their ratio; got {xs.min()}")


def _fit_rows(dx: np.ndarray, ys: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Least-squares (a, b) for each row of ys [B, n] at each c of cs [B, G]; returns a, b, sse, each [B, G]."""
    e = np.exp(-dx / cs[..., None])  # [B, G, n]
    n = dx.shape[-1]
    se, see = e.sum(-1), (e * e).sum(-1)
    sy, sey = ys.sum(-1)[:, None], np.einsum("bgn,bn->bg", e, ys)
    det = n * see - se * se
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (n * sey - se * sy) / det  # y = a + slope * e, so b = -slope
        a = (sy - slope * se) / n
    sse = ((a[..., None] + slope[..., None] * e - ys[:, None, :]) ** 2).sum(-1)
    # A c that makes e constant over the points (too small or too large) leaves a and b undetermined.
    sse = np.where(det > 1e-12 * n * n, sse, np.inf)
    return a, -slope, sse


def _fit_many(dx: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best (a, b, c) of ``a - b exp(-dx / c)`` per row of ys [B, n], and whether c ended at its search limit.

    For a fixed c the curve is linear in a and b: exact least squares on a log-spaced grid of c, refined
    around the best, for every row at once (a thousand replicate refits in one pass, no starting point to
    guess, where an iterative solver such as scipy's curve_fit needs several starts per row)."""
    span = dx.max()
    grid = np.geomspace(_C_RANGE[0] * span, _C_RANGE[1] * span, _GRID)
    a, b, sse = _fit_rows(dx, ys, np.broadcast_to(grid, (len(ys), _GRID)))
    best = np.argmin(sse, axis=1)
    at_bound = (best == 0) | (best == _GRID - 1)
    # Refine between the best point's neighbours, three times: the grid's 1.5 % steps in c would show in a.
    cs = np.broadcast_to(grid, (len(ys), _GRID))
    for _ in range(3):
        width = cs.shape[1] - 1
        lo = np.take_along_axis(cs, np.maximum(best - 1, 0)[:, None], 1)[:, 0]
        hi = np.take_along_axis(cs, np.minimum(best + 1, width)[:, None], 1)[:, 0]
        cs = np.geomspace(lo, hi, _FINE, axis=1)  # [B, F]
        a, b, sse = _fit_rows(dx, ys, cs)
        best = np.argmin(sse, axis=1)
    pick = best[:, None]
    return (np.take_along_axis(a, pick, 1)[:, 0], np.take_along_axis(b, pick, 1)[:, 0],
            np.take_along_axis(cs, pick, 1)[:, 0], at_bound)


def _fit_rows_of(form: str, dx: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, c, at_bound) of ``form`` for every row of ys [B, n] at the points dx = _axis(form, x / x0)."""
    if form == "log-linear":  # ordinary least squares, every row at once
        design = np.stack([np.ones_like(dx), dx], axis=1)
        coef = np.linalg.lstsq(design, ys.T, rcond=None)[0]  # [2, B]
        nan = np.full(len(ys), math.nan)
        return coef[0], coef[1], nan, np.zeros(len(ys), bool)
    return _fit_many(dx, ys)


def fit_curve(form: str, xs: np.ndarray, ys: np.ndarray, *, replicates: np.ndarray | None = None,
              level: float = 0.95) -> CurveFit:
    """Fit ``form`` to AP ``ys`` at images seen ``xs`` (one point per length); the plateau's interval from the
    same form refitted on each row of ``replicates`` [B, len(xs)] (each length's AP jointly resampled over
    validation images and seeds: ``bootstrap.length_replicates``), percentile at ``level``.

    No interval (said in ``why_no_interval``) without replicates, or from fewer lengths than the form's
    parameters + 2: a refit needs residual degrees of freedom to move with its points."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    _check_points(xs, ys, FORM_PARAMS.get(form, 3))
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie between 0 and 1")
    x0 = float(xs.min())
    dx = _axis(form, xs / x0)
    a, b, c, at_bound = (float(v[0]) for v in _fit_rows_of(form, dx, ys[None]))
    rmse = float(np.sqrt(np.mean((_curve(form, xs / x0, a, b, c) - ys) ** 2)))
    need = FORM_PARAMS[form] + 2
    why = ""
    if len(np.unique(xs)) < need:
        why = f"{len(np.unique(xs))} lengths for {FORM_PARAMS[form]} parameters, and an interval needs {need}"
    elif replicates is None:
        why = "no replicates (the runs recorded no per-image matches to resample)"
    else:
        replicates = np.asarray(replicates, dtype=float)
        if replicates.ndim != 2 or replicates.shape[1] != len(xs):
            raise ValueError(f"replicates must be [resamples, {len(xs)}] (one column per length); got "
                             f"{replicates.shape}")
        # A resample with no ground truth left scores COCO's -1 (or nan): not an AP to fit. A few such rows are
        # dropped; more than 5% mean the validation set is too sparse to resample, and no interval is given.
        valid = np.isfinite(replicates).all(1) & (replicates >= 0).all(1)
        if valid.mean() < 0.95:
            why = (f"{(~valid).sum()} of {len(valid)} resamples had no AP at some length (too few validation "
                   "images with ground truth to resample)")
        replicates = replicates[valid]
    if why:
        return CurveFit(a=a, b=b, c=c, x0=x0, interval=(math.nan, math.nan), level=level, rmse=rmse,
                        at_bound=bool(at_bound), boot=np.zeros((0, 3)), form=form, why_no_interval=why)
    ba, bb, bc, _ = _fit_rows_of(form, dx, replicates)
    boot = np.stack([ba, bb, bc], axis=1)
    if form == "log-linear":  # refits for reach()'s interval; no plateau to give one for
        return CurveFit(a=a, b=b, c=c, x0=x0, interval=(math.nan, math.nan), level=level, rmse=rmse,
                        at_bound=False, boot=boot, form=form, why_no_interval="the log-linear form has no plateau")
    lo, hi = np.quantile(ba, [(1 - level) / 2, 1 - (1 - level) / 2])
    return CurveFit(a=a, b=b, c=c, x0=x0, interval=(float(lo), float(hi)), level=level, rmse=rmse,
                    at_bound=bool(at_bound), boot=boot, form=form)


def fit_saturating(xs: np.ndarray, ys: np.ndarray, *, replicates: np.ndarray | None = None,
                   level: float = 0.95) -> CurveFit:
    """``fit_curve`` with the saturating power law."""
    return fit_curve("power law", xs, ys, replicates=replicates, level=level)


def _reach(form: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, x0: float, target: float) -> np.ndarray:
    """Images seen where each curve first reaches ``target``: x0 when it starts there, inf when it never does."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if form == "log-linear":
            return np.where(a >= target, x0, np.where(b > 0, x0 * np.exp((target - a) / b), math.inf))
        u = -c * np.log((a - target) / b)  # where a - b exp(-u / c) = target
        x = x0 * (np.exp(u) if form == "power law" else 1 + u)
    return np.where(a - b >= target, x0, np.where((a > target) & (b > 0), x, math.inf))


def reach(fit: CurveFit, target: float) -> Reach:
    """Images seen where the fitted curve reaches AP ``target`` (inf when its plateau is at or below it), with
    the interval of the same over the replicate refits (nan where the fit has none)."""
    point = float(_reach(fit.form, np.array(fit.a), np.array(fit.b), np.array(fit.c), fit.x0, target))
    if not len(fit.boot):
        return Reach(point, math.nan, math.nan)
    boot = _reach(fit.form, fit.boot[:, 0], fit.boot[:, 1], fit.boot[:, 2], fit.x0, target)
    tails = [(1 - fit.level) / 2, 1 - (1 - fit.level) / 2]
    # inverted_cdf picks order statistics: no arithmetic on inf, which interpolation would turn into nan.
    lo, hi = np.quantile(boot, tails, method="inverted_cdf")
    return Reach(point, float(lo), float(hi))


def holdout_error(xs: np.ndarray, ys: np.ndarray, *, split: float, form: str = "power law") -> dict:
    """Fit ``form`` on the points with x <= split, predict the rest: their xs, errors (predicted - seen), mean
    absolute error."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    train = xs <= split
    if train.all():
        raise ValueError(f"no point lies beyond split={split}: nothing to predict")
    fit = fit_curve(form, xs[train], ys[train])
    errors = fit.predict(xs[~train]) - ys[~train]
    return {"xs": xs[~train], "errors": errors, "mae": float(np.mean(np.abs(errors))), "fit": fit}


# The paper's Table 1 (R50-FPN GN, COCO box AP, random init / pretrained) at 2x-6x: schedule.TABLE1_R50_GN.


def backtest_table1(fit_upto: int = 4) -> dict[str, dict[int, float]]:
    """Fit each arm of the paper's Table 1 (AP against images seen: N x 90k iterations x 16 images) on the
    lengths up to ``fit_upto``x and predict the longer ones: {arm: {length: predicted - published}}.  The
    published numbers are the test: a form that misses them there is not to be trusted on a study."""
    from ..config import ITERS_PER_X, REFERENCE_BATCH
    from ..schedule import TABLE1_R50_GN

    lengths = sorted(TABLE1_R50_GN)
    xs = np.array([n * ITERS_PER_X * REFERENCE_BATCH for n in lengths], dtype=float)
    out = {}
    for k, arm in enumerate(("random init", "pretrained")):
        ys = np.array([TABLE1_R50_GN[n][k] for n in lengths])
        train = np.array([n <= fit_upto for n in lengths])
        fit = fit_saturating(xs[train], ys[train])
        out[arm] = {n: float(fit.predict(x) - y) for n, x, y in zip(lengths, xs, ys) if n > fit_upto}
    return out


# --------------------------------------------------------------------------- curve forms, compared by holdout
#
# Which form to extrapolate with is decided by a rule fixed before looking at a study's numbers: each form
# is fitted to every arm's lengths but its longest and predicts that one (leave-last-out), on both arms at
# every data size and AP type; the form with the smallest mean absolute error over all of them is chosen,
# the one with fewer parameters on a tie within 0.05 AP.  In u = ln(x / x0):
#   power law    a - b exp(-u / c)      (fit_saturating: saturates, 3 parameters)
#   exponential  a - b exp(-(x / x0 - 1) / s)  (saturates in images seen itself, 3 parameters)
#   log-linear   a + b u                (never saturates: no plateau, 2 parameters)



def fit_form(form: str, xs: np.ndarray, ys: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The fitted curve of ``form`` through (images seen, AP), as a function of images seen (no interval: a
    holdout needs none)."""
    return fit_curve(form, xs, ys).predict


def leave_last_out(form: str, xs: np.ndarray, ys: np.ndarray) -> float | None:
    """``form`` fitted to all lengths but the longest, its prediction there minus the measured AP; None where
    the shorter lengths are too few to fit it (its parameters + 1: one residual degree of freedom at least)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    last = xs == xs.max()
    if len(np.unique(xs[~last])) < FORM_PARAMS[form] + 1:
        return None
    try:
        curve = fit_form(form, xs[~last], ys[~last])
    except ValueError:
        return None
    return float(np.mean(curve(xs[last]) - ys[last]))


def choose_form(errors: dict[str, list[float]]) -> str | None:
    """The rule: the smallest mean absolute leave-last-out error over every arm; within 0.05 AP, fewer parameters.
    None when no form could be tested anywhere."""
    scored = {f: float(np.mean(np.abs(e))) for f, e in errors.items() if e}
    if not scored:
        return None
    best = min(scored.values())
    near = [f for f, v in scored.items() if v <= best + 0.05]
    return min(near, key=lambda f: (FORM_PARAMS[f], scored[f]))
