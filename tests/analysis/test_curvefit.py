import math

import numpy as np
import pytest

from scratchdet.analysis.curvefit import fit_curve, fit_saturating, holdout_error, reach

# A from-scratch arm's AP against images seen: plateau 40, 30 points below it at the first eval, the gap
# closing as 1 / images seen (c = 1: each doubling halves it), lengths doubling-ish from 100k to 12M images.
A, B, C, X0 = 40.0, 30.0, 1.0, 1.0e5
XS = np.geomspace(X0, 1.2e7, 12)


def _curve(xs):
    return A - B * (xs / X0) ** (-1 / C)


def _replicates(ys, sd, seed=0, n=400):
    """What bootstrap.length_replicates gives when each length's AP has sampling noise ``sd``: the measured
    points, each resample moved by that noise."""
    return ys + np.random.default_rng(seed + 1000).normal(0, sd, (n, len(ys)))


def test_recovers_a_known_plateau_from_noisy_points():
    ys = _curve(XS) + np.random.default_rng(0).normal(0, 0.2, len(XS))
    fit = fit_saturating(XS, ys, replicates=_replicates(ys, 0.2))
    lo, hi = fit.interval
    assert fit.a == pytest.approx(A, abs=0.5)
    assert lo < A < hi and lo < fit.a < hi
    assert hi - lo < 2.0  # 0.2 AP of noise on 12 points pins the plateau to about a point
    assert fit.c == pytest.approx(C, rel=0.2)
    assert fit.rmse < 0.3 and not fit.at_bound


def test_exact_points_give_the_exact_curve():
    fit = fit_saturating(XS, _curve(XS))
    assert (fit.a, fit.b, fit.c) == pytest.approx((A, B, C), rel=1e-5)
    np.testing.assert_allclose(fit.predict(XS), _curve(XS), atol=1e-4)


def test_reach_on_a_known_curve():
    fit = fit_saturating(XS, _curve(XS))
    # 40 - 30 (x / x0) ** (-1 / c) = 37  =>  x = x0 * 10 ** c
    got = reach(fit, 37.0)
    assert got.images == pytest.approx(X0 * 10 ** C, rel=1e-3)
    assert reach(fit, 5.0).images == X0  # below the first point: reached from the start
    ys = _curve(XS) + np.random.default_rng(0).normal(0, 0.2, len(XS))
    noisy = fit_saturating(XS, ys, replicates=_replicates(ys, 0.2))
    got = reach(noisy, 37.0)
    assert got.low < got.images < got.high
    assert got.low < X0 * 10 ** C < got.high


def test_a_plateau_below_the_target_is_never_reached():
    ys = _curve(XS) + np.random.default_rng(1).normal(0, 0.2, len(XS))
    fit = fit_saturating(XS, ys, replicates=_replicates(ys, 0.2, seed=1))
    got = reach(fit, 45.0)
    assert got.images == math.inf and got.high == math.inf
    assert not math.isnan(got.low)


def test_fewer_than_three_points_are_refused():
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        fit_saturating([1e5, 2e5], [10.0, 20.0])
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        fit_saturating([1e5, 1e5, 2e5], [10.0, 11.0, 20.0])
    with pytest.raises(ValueError, match="must be positive"):
        fit_saturating([0.0, 1e5, 2e5], [1.0, 10.0, 20.0])
    with pytest.raises(ValueError, match="one length"):
        fit_saturating([1e5, 2e5, 3e5], [10.0, 20.0])


def test_a_straight_run_flags_its_plateau_as_unidentified():
    xs = np.linspace(1e5, 1e6, 6)
    fit = fit_saturating(xs, 5 + xs / 1e5)
    assert fit.at_bound


def test_holdout_error_predicts_the_later_points():
    ys = _curve(XS) + np.random.default_rng(2).normal(0, 0.2, len(XS))
    out = holdout_error(XS, ys, split=1e6)
    assert len(out["xs"]) == len(out["errors"]) == int((XS > 1e6).sum())
    assert out["mae"] == pytest.approx(np.mean(np.abs(out["errors"])))
    assert out["mae"] < 1.0
    with pytest.raises(ValueError, match="nothing to predict"):
        holdout_error(XS, ys, split=XS.max())
    with pytest.raises(ValueError, match="at least 3"):
        holdout_error(XS, ys, split=XS[1])


def test_fewer_points_than_parameters_plus_two_give_no_interval():
    # 4 lengths and 3 parameters left the residual bootstrap one degree of freedom: intervals 5-10x too narrow.
    from scratchdet.analysis.curvefit import MIN_POINTS_FOR_INTERVAL

    xs = XS[:MIN_POINTS_FOR_INTERVAL - 1]
    ys = _curve(xs) + np.array([0.3, -0.2, 0.1, -0.3])
    fit = fit_saturating(xs, ys, replicates=_replicates(ys, 0.5))
    assert all(math.isnan(v) for v in fit.interval) and not len(fit.boot)
    assert "4 lengths for 3 parameters" in fit.why_no_interval
    r = reach(fit, 35.0)
    assert math.isfinite(r.images) and math.isnan(r.low) and math.isnan(r.high)
    five = _curve(XS[:5])
    assert not any(math.isnan(v) for v in fit_saturating(XS[:5], five, replicates=_replicates(five, 0.5)).interval)
    # Without replicates (no per-image matches) there is no interval either, and the fit says why.
    assert "no replicates" in fit_saturating(XS[:5], five).why_no_interval


def test_the_plateau_interval_covers_the_true_plateau_of_noisy_curves():
    # 200 simulated arms of 5 doubling lengths (the fewest that get an interval), each length's AP off by 0.5 AP
    # of noise (about a bootstrap's spread on a few hundred validation images), refitted on 400 replicates each:
    # the nominal 95% interval of the plateau must hold the true one in at least 85% of them (93.5% here).  A
    # residual bootstrap of the same fits held it in 79.5% (its residuals are smaller than the noise that made them).
    xs = X0 * 2.0 ** np.arange(5)
    truth = _curve(xs)
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for trial in range(200):
        ys = truth + rng.normal(0, 0.5, len(xs))
        lo, hi = fit_saturating(xs, ys, replicates=_replicates(ys, 0.5, seed=trial)).interval
        hits += lo <= A <= hi
        widths.append(hi - lo)
    assert hits / 200 >= 0.85
    assert np.median(widths) < 4.0  # and not by being uninformative


def test_every_form_fits_reaches_and_refits():
    xs = X0 * 2.0 ** np.arange(6)
    exp_truth = 40 - 30 * np.exp(-(xs / X0 - 1) / 4.0)
    fit = fit_curve("exponential", xs, exp_truth, replicates=_replicates(exp_truth, 0.3))
    assert (fit.a, fit.b, fit.c) == pytest.approx((40, 30, 4.0), rel=1e-3)
    assert fit.interval[0] < 40 < fit.interval[1]
    # 40 - 30 exp(-(x/x0 - 1) / 4) = 37  =>  x = x0 (1 + 4 ln 10)
    assert reach(fit, 37.0).images == pytest.approx(X0 * (1 + 4 * math.log(10)), rel=1e-3)
    line = 10 + 5 * np.log(xs / X0)
    lin = fit_curve("log-linear", xs, line, replicates=_replicates(line, 0.3))
    assert (lin.a, lin.b) == pytest.approx((10, 5)) and lin.plateau == math.inf
    assert "no plateau" in lin.why_no_interval
    assert reach(lin, 20.0).images == pytest.approx(X0 * math.exp(2))  # 10 + 5 ln(x/x0) = 20
    with pytest.raises(ValueError, match="unknown curve form"):
        fit_curve("cubic", xs, line)
    # The line has no plateau, but its refits give where it reaches a target an interval.
    got = reach(lin, 20.0)
    assert got.low < got.images < got.high


def test_resamples_without_an_ap_are_dropped_and_too_many_give_no_interval():
    xs = X0 * 2.0 ** np.arange(5)
    ys = _curve(xs)
    rep = _replicates(ys, 0.3)
    rep[:10, 2] = -1.0  # COCO's -1: no ground truth left in that resample
    fit = fit_saturating(xs, ys, replicates=rep)
    assert len(fit.boot) == len(rep) - 10 and fit.interval[0] < A < fit.interval[1]
    rep[:100, 1] = np.nan
    sparse = fit_saturating(xs, ys, replicates=rep)
    assert math.isnan(sparse.interval[0]) and "100 of 400 resamples had no AP" in sparse.why_no_interval


def test_backtest_on_the_papers_table1():
    # Fit each arm on the paper's 2x-4x (R50-FPN GN box AP), predict its 5x and 6x: the errors are what the
    # saturating power law would have claimed, and docs/statistics.md reports them.
    from scratchdet.analysis.curvefit import backtest_table1
    from scratchdet.schedule import TABLE1_R50_GN

    errors = backtest_table1(fit_upto=4)
    assert set(errors) == {"random init", "pretrained"} and all(set(e) == {5, 6} for e in errors.values())
    assert all(math.isfinite(v) for e in errors.values() for v in e.values())
    # 3 points, 3 parameters: the fit passes through 2x-4x, so the errors are the form's alone.
    from scratchdet.analysis.curvefit import fit_saturating as fs

    xs = np.array([2, 3, 4], float) * 90_000 * 16
    fit = fs(xs, np.array([TABLE1_R50_GN[n][0] for n in (2, 3, 4)]))
    assert errors["random init"][5] == pytest.approx(float(fit.predict(5 * 90_000 * 16)) - TABLE1_R50_GN[5][0])


@pytest.mark.parametrize("truth, expect", [("power", "power law"), ("log", "log-linear")])
def test_the_rule_picks_the_form_that_predicted_the_held_out_length(truth, expect):
    from scratchdet.analysis.curvefit import FORM_PARAMS, choose_form, leave_last_out

    xs = 200 * np.array([1, 2, 4, 8, 16], float)
    ys = 40 - 30 * (xs / xs[0]) ** -1.0 if truth == "power" else 10 + 5 * np.log(xs / xs[0])
    errors = {f: [e] for f in FORM_PARAMS if (e := leave_last_out(f, xs, ys)) is not None}
    assert set(errors) == set(FORM_PARAMS)  # 4 shorter lengths: every form can be tested
    assert choose_form(errors) == expect
    assert abs(errors[expect][0]) < 0.15
    # Too few shorter lengths for a 3-parameter form: not tested rather than fitted exactly.
    assert leave_last_out("power law", xs[:4], ys[:4]) is None and leave_last_out("log-linear", xs[:4], ys[:4]) is not None
    assert choose_form({f: [] for f in FORM_PARAMS}) is None
