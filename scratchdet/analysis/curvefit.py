"""Curves of AP against images seen: where a from-scratch arm levels off, and whether to believe it.

The main form is a saturating power law, ``AP(x) = a - b * (x / x0) ** (-1 / c)``, with ``x0`` the first
point's images seen: ``a`` is the plateau, ``b`` how far below it the first point lies, ``1 / c`` the exponent at
which the gap closes (each doubling of images seen shrinks it by ``2 ** (-1 / c)``).  Why a power law: learning
curves against training-set size follow one (Hestness et al. 2017, "Deep Learning Scaling is Predictable,
Empirically"); taking images seen over a schedule on a fixed set for that axis is our choice.  In
``u = ln(x / x0)`` the curve is ``a - b * exp(-u / c)``; for a fixed ``c`` that is linear in ``a`` and ``b``,
so ``fit_saturating`` is exact least squares on a log-spaced grid of ``c`` (then a finer grid around the best):
no starting point to guess.

A form is believed only after it predicted points it was not fitted on: ``fit_form`` fits the power law, an
exponential (scipy's ``curve_fit``) or a log-linear line, ``leave_last_out`` scores each on the arm's longest
run, ``choose_form`` applies a rule fixed in advance, and ``backtest_table1`` fits the paper's Table 1 at
2x-4x and predicts 5x-6x.  What each study found with them is on its report page and in docs/statistics.md.
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


@dataclass(frozen=True)
class CurveFit:
    """``AP(x) = a - b * (x / x0) ** (-1 / c)`` fitted to points, with the plateau ``a``'s bootstrap interval."""

    a: float
    b: float
    c: float
    x0: float
    interval: tuple[float, float]  # of the plateau a, at ``level``
    level: float
    rmse: float
    at_bound: bool  # c ended at its search limit: the plateau is an extrapolation the points do not support
    boot: np.ndarray  # [B, 3] refitted (a, b, c) per residual resample

    def predict(self, xs: np.ndarray | float) -> np.ndarray:
        """The fitted AP at images seen ``xs``."""
        return self.a - self.b * np.exp(-np.log(np.asarray(xs, dtype=float) / self.x0) / self.c)


class Reach(NamedTuple):
    """Images seen where the fitted curve reaches a target AP (inf: never), with its bootstrap interval."""

    images: float
    low: float
    high: float


def _check_points(xs: np.ndarray, ys: np.ndarray) -> None:
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"xs and ys must be 1-d and of one length; got shapes {xs.shape} and {ys.shape}")
    if len(np.unique(xs)) < 3:
        raise ValueError(f"a saturating fit has 3 parameters and needs at least 3 distinct points; got {len(xs)} "
                         f"point(s) at {len(np.unique(xs))} distinct x")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("xs and ys must be finite")
    if (xs <= 0).any():
        raise ValueError(f"images seen must be positive for a power law in them; got {xs.min()}")


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
    """Best (a, b, c) per row of ys [B, n], and whether c ended at its search limit."""
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


def _fit_point(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float, bool, float]:
    """The least-squares (a, b, c) of the power law, whether c ended at its search limit, and x0."""
    x0 = float(xs.min())
    a, b, c, at_bound = (v[0] for v in _fit_many(np.log(xs / x0), ys[None]))
    return float(a), float(b), float(c), bool(at_bound), x0


def fit_saturating(xs: np.ndarray, ys: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> CurveFit:
    """Fit ``a - b * (x / x0) ** (-1 / c)`` to AP ``ys`` at images seen ``xs``, the plateau's interval by residual bootstrap."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    _check_points(xs, ys)
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie between 0 and 1")
    a, b, c, at_bound, x0 = _fit_point(xs, ys)
    dx = np.log(xs / x0)
    fitted = a - b * np.exp(-dx / c)
    resid = ys - fitted
    n = len(xs)
    if n < MIN_POINTS_FOR_INTERVAL:
        return CurveFit(a=float(a), b=float(b), c=float(c), x0=x0, interval=(math.nan, math.nan), level=level,
                        rmse=float(np.sqrt(np.mean(resid ** 2))), at_bound=bool(at_bound), boot=np.zeros((0, 3)))
    # Residuals of a 3-parameter fit are smaller than the noise: inflate them.
    scaled = resid * math.sqrt(n / (n - 3))
    rng = np.random.default_rng(seed)
    boot_ys = fitted + scaled[rng.integers(0, n, size=(resamples, n))]
    ba, bb, bc, _ = _fit_many(dx, boot_ys)
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]
    lo, hi = np.quantile(ba, tails)
    return CurveFit(a=float(a), b=float(b), c=float(c), x0=x0, interval=(float(lo), float(hi)),
                    level=level, rmse=float(np.sqrt(np.mean(resid ** 2))), at_bound=bool(at_bound),
                    boot=np.stack([ba, bb, bc], axis=1))


def _reach(a: np.ndarray, b: np.ndarray, c: np.ndarray, x0: float, target: float) -> np.ndarray:
    """Images seen where each curve first reaches ``target``: x0 when it starts there, inf when it never does."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = x0 * np.exp(-c * np.log((a - target) / b))
    return np.where(a - b >= target, x0, np.where((a > target) & (b > 0), x, math.inf))


def reach(fit: CurveFit, target: float) -> Reach:
    """Images seen where the fitted curve reaches AP ``target`` (inf when its plateau is at or below it), with interval."""
    point = float(_reach(np.array(fit.a), np.array(fit.b), np.array(fit.c), fit.x0, target))
    if not len(fit.boot):  # too few points for an interval (MIN_POINTS_FOR_INTERVAL)
        return Reach(point, math.nan, math.nan)
    boot = _reach(fit.boot[:, 0], fit.boot[:, 1], fit.boot[:, 2], fit.x0, target)
    tails = [(1 - fit.level) / 2, 1 - (1 - fit.level) / 2]
    # inverted_cdf picks order statistics: no arithmetic on inf, which interpolation would turn into nan.
    lo, hi = np.quantile(boot, tails, method="inverted_cdf")
    return Reach(point, float(lo), float(hi))


def holdout_error(xs: np.ndarray, ys: np.ndarray, *, split: float, resamples: int = 200) -> dict:
    """Fit on the points with x <= split, predict the rest: their xs, errors (predicted - seen), mean absolute error."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    train = xs <= split
    if train.all():
        raise ValueError(f"no point lies beyond split={split}: nothing to predict")
    fit = fit_saturating(xs[train], ys[train], resamples=resamples)
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
        fit = fit_saturating(xs[train], ys[train], resamples=200)
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

FORM_PARAMS = {"power law": 3, "exponential": 3, "log-linear": 2}


def fit_form(form: str, xs: np.ndarray, ys: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The fitted curve of ``form`` through (images seen, AP), as a function of images seen."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    x0 = float(xs.min())
    if form == "power law":  # the point fit alone: a holdout needs no interval, so no bootstrap of refits
        _check_points(xs, ys)
        a, b, c, _, _ = _fit_point(xs, ys)
        return lambda x: a - b * np.exp(-np.log(np.asarray(x, dtype=float) / x0) / c)
    if form == "log-linear":
        b, a = np.polyfit(np.log(xs / x0), ys, 1)
        return lambda x: a + b * np.log(np.asarray(x, dtype=float) / x0)
    if form == "exponential":
        from scipy.optimize import curve_fit

        r = xs / x0 - 1

        def curve(r: np.ndarray, a: float, b: float, log_s: float) -> np.ndarray:
            return a - b * np.exp(-r / np.exp(log_s))

        span = max(float(r.max()), 1e-9)
        best = None
        for guess in np.log(span * np.array([0.1, 0.3, 1.0, 3.0])):  # a few starts: the fit is not convex in s
            try:
                p, _ = curve_fit(curve, r, ys, p0=(ys.max() + 1, ys.max() - ys.min() + 1, guess), maxfev=5000)
            except RuntimeError:
                continue
            sse = float(((curve(r, *p) - ys) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, p)
        if best is None:
            raise ValueError("the exponential did not converge on these points")
        p = best[1]
        return lambda x: curve(np.asarray(x, dtype=float) / x0 - 1, *p)
    raise ValueError(f"unknown curve form {form!r}; forms: {', '.join(FORM_PARAMS)}")


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
