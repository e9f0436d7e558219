"""Fits and budget models of ttscale.eval.fit: spec vectors, recovery of known parameters, edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ttscale.eval.fit import (
    FitResult,
    difficulty_bins,
    fit_coverage_power_law,
    fit_saturating_exponential,
    fit_selected_accuracy_ceiling,
    flaws_abstain,
    flaws_accuracy,
    flaws_ceiling,
    flaws_expected_utility,
    flaws_fp,
    flaws_optimal_k,
    recommend_k,
    saturation_point,
)

# ------------------------------------------------------------------------------------------
# Coverage power law
# ------------------------------------------------------------------------------------------


def test_power_law_recovers_parameters_with_noise():
    a, b = -2.5, -0.4
    ks = np.arange(1, 2001)
    rng = np.random.default_rng(0)
    # 3% multiplicative noise on log-coverage.
    logc = a * ks**b * (1 + 0.03 * rng.standard_normal(ks.size))
    fit = fit_coverage_power_law(ks, np.exp(logc))
    assert fit.fittable and fit.extra["method"] == "curve_fit"
    assert fit.params["a"] == pytest.approx(a, rel=0.05)
    assert fit.params["b"] == pytest.approx(b, abs=0.03)
    # Truth lies within ~4 standard errors.
    assert abs(fit.params["a"] - a) < 4 * fit.stderr["a"]
    assert abs(fit.params["b"] - b) < 4 * fit.stderr["b"]
    assert fit.r2 > 0.95
    np.testing.assert_allclose(fit.predict([1, 100]), np.exp(fit.params["a"] * np.array([1, 100.0]) ** fit.params["b"]))


def test_power_law_uses_at_most_40_log_spaced_points():
    ks = np.arange(1, 10_001)
    cov = np.exp(-3.0 * ks**-0.3)
    fit = fit_coverage_power_law(ks, cov)
    grid = np.unique(np.round(np.logspace(0, 4, 40)))
    assert fit.n_points == grid.size <= 40
    assert fit.extra["k_min"] == 1 and fit.extra["k_max"] == 10_000
    assert fit.params["a"] == pytest.approx(-3.0, abs=1e-6)
    assert fit.params["b"] == pytest.approx(-0.3, abs=1e-6)
    # Few points are used as given.
    small = fit_coverage_power_law([1, 2, 4, 8], np.exp(-1.0 * np.array([1, 2, 4, 8.0]) ** -0.5))
    assert small.n_points == 4


def test_power_law_drops_zero_and_one_and_reports_unfittable():
    ks = [1, 2, 4, 8, 16, 32]
    cov = [0.0, 0.2, 0.35, 0.5, 1.0, 1.0]
    fit = fit_coverage_power_law(ks, cov)
    assert fit.n_points == 3 and fit.fittable
    bad = fit_coverage_power_law(ks, [0.0, 0.0, 0.4, 1.0, 1.0, 1.0])
    assert not bad.fittable and "need >= 3" in bad.reason
    assert math.isnan(bad.params["a"])
    with pytest.raises(ValueError):
        bad.predict([1, 2])
    with pytest.raises(ValueError):
        recommend_k(bad, cost_per_sample=0.01)
    with pytest.raises(ValueError):
        fit_coverage_power_law([1, 2, 3], [0.2, 1.3, 0.5])


def test_power_law_ols_initial_guess_is_exact_on_clean_data():
    # On noise-free data the linearised OLS and curve_fit agree with the truth.
    ks = np.array([1, 3, 10, 30, 100.0])
    fit = fit_coverage_power_law(ks, np.exp(-0.8 * ks**-0.25))
    assert fit.params == pytest.approx({"a": -0.8, "b": -0.25}, abs=1e-8)


# ------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------


def test_fit_result_round_trip_through_json():
    ks = np.arange(1, 65)
    fit = fit_saturating_exponential(ks, 0.8 * (1 - 0.9**ks))
    back = FitResult.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert back == fit
    np.testing.assert_allclose(back.predict(ks), fit.predict(ks))
    bad = fit_coverage_power_law([1, 2], [0.5, 0.6])
    d = bad.to_dict()
    assert d["params"]["a"] is None  # NaN is stored as null: strict JSON
    back = FitResult.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert not back.fittable and back.reason == bad.reason and math.isnan(back.params["b"])
    with pytest.raises(ValueError):
        FitResult.from_dict({**fit.to_dict(), "name": "no_such_model"})


# ------------------------------------------------------------------------------------------
# Verifier-limited resampling
# ------------------------------------------------------------------------------------------


def test_flaws_ceiling_spec_vectors():
    assert flaws_ceiling(0.87, 1.0, 0.75) == pytest.approx(0.964, abs=5e-4)
    assert flaws_ceiling(0.13, 1.0, 0.75) == pytest.approx(0.374, abs=5e-4)
    assert math.isnan(flaws_ceiling(0.0, 1.0, 1.0))  # nothing is ever accepted


def test_flaws_outcomes_partition_and_limit():
    r, c, s = 0.4, 0.9, 0.7
    for K in (0, 1, 2, 5, 50):
        total = flaws_accuracy(r, c, s, K) + flaws_fp(r, c, s, K) + flaws_abstain(r, c, s, K)
        assert total == pytest.approx(1.0, abs=1e-12)
    assert flaws_accuracy(r, c, s, 1) == pytest.approx(c * r)
    assert flaws_fp(r, c, s, 1) == pytest.approx((1 - s) * (1 - r))
    assert flaws_accuracy(r, c, s, math.inf) == pytest.approx(flaws_ceiling(r, c, s))
    beta = (1 - c) * r + s * (1 - r)
    assert flaws_abstain(r, c, s, 3) == pytest.approx(beta**3)
    np.testing.assert_allclose(flaws_accuracy(r, c, s, np.array([1, 2])), [c * r, c * r * (1 + beta)])


def test_flaws_accuracy_matches_simulation_of_the_policy():
    r, c, s, K = 0.3, 0.8, 0.6, 4
    rng = np.random.default_rng(0)
    m = 200_000
    correct = rng.random((m, K)) < r
    accept = np.where(correct, rng.random((m, K)) < c, rng.random((m, K)) >= s)
    first = np.where(accept.any(axis=1), accept.argmax(axis=1), -1)
    got_correct = np.mean((first >= 0) & correct[np.arange(m), np.maximum(first, 0)])
    got_fp = np.mean((first >= 0) & ~correct[np.arange(m), np.maximum(first, 0)])
    assert got_correct == pytest.approx(flaws_accuracy(r, c, s, K), abs=0.005)
    assert got_fp == pytest.approx(flaws_fp(r, c, s, K), abs=0.005)


@pytest.mark.parametrize(("C", "k_star"), [(0.7, 3), (1.0, 2), (2.0, 1)])
def test_flaws_optimal_k_spec_vectors(C, k_star):
    assert flaws_optimal_k((0.87, 0.13), (0.58, 0.42), 1.0, 0.75, C) == k_star


def test_flaws_expected_utility_is_mixture_of_per_type_outcomes():
    r = np.array([0.87, 0.13])
    pi = np.array([0.58, 0.42])
    C = 1.0
    eu = flaws_expected_utility(r, pi, 1.0, 0.75, C, K_max=30)
    assert eu.shape == (31,) and eu[0] == 0.0
    for K in range(31):
        want = np.sum(pi * (flaws_accuracy(r, 1.0, 0.75, K) - C * flaws_fp(r, 1.0, 0.75, K)))
        assert eu[K] == pytest.approx(want, abs=1e-12)
    # Unnormalised priors are normalised.
    np.testing.assert_allclose(flaws_expected_utility(r, 2 * pi, 1.0, 0.75, C, 30), eu)


def test_flaws_homogeneous_and_abstain_cases():
    # Single type with positive margin: utility is monotone, so K* = K_max ...
    assert flaws_optimal_k([0.2], [1.0], 0.5, 0.95, C=1.0, K_max=50) == 50
    # ... unless later attempts are essentially never reached (β = 0.38: gains < 1e-12 after K = 29).
    k = flaws_optimal_k([0.6], [1.0], 0.9, 0.8, C=1.0, K_max=50)
    eu = flaws_expected_utility([0.6], [1.0], 0.9, 0.8, 1.0, 50)
    assert 20 < k < 50 and eu[k] == pytest.approx(eu.max(), abs=1e-12) and eu[k - 1] < eu.max() - 1e-12
    # Negative margin everywhere: abstain.
    assert flaws_optimal_k([0.1], [1.0], 1.0, 0.5, C=4.0) == 0
    assert flaws_optimal_k((0.87, 0.13), (0.58, 0.42), 1.0, 0.75, C=100.0) == 0
    # A per-attempt cost pulls K* down.
    assert flaws_optimal_k([0.6], [1.0], 0.9, 0.8, C=1.0, K_max=50, attempt_cost=0.05) < 50


# ------------------------------------------------------------------------------------------
# Selected-accuracy ceiling
# ------------------------------------------------------------------------------------------


def test_selected_accuracy_ceiling_recovers_asymptote():
    ks = np.unique(np.round(np.logspace(0, 3, 25)))
    truth = dict(A_inf=0.62, A_1=0.35, beta=0.45)
    rng = np.random.default_rng(1)
    acc = truth["A_inf"] - (truth["A_inf"] - truth["A_1"]) * ks ** -truth["beta"] + 0.004 * rng.standard_normal(ks.size)
    fit = fit_selected_accuracy_ceiling(ks, acc)
    assert fit.fittable
    assert fit.params["A_inf"] == pytest.approx(0.62, abs=0.02)
    assert fit.params["A_1"] == pytest.approx(0.35, abs=0.02)
    assert fit.params["beta"] == pytest.approx(0.45, abs=0.08)
    assert 0 < fit.stderr["A_inf"] < 0.05
    assert abs(fit.params["A_inf"] - 0.62) < 4 * fit.stderr["A_inf"]
    assert fit.predict(1e9) == pytest.approx(fit.params["A_inf"], abs=1e-3)
    assert "flaws_ceiling" not in fit.extra


def test_selected_accuracy_ceiling_reports_flaws_comparison():
    r = np.array([0.9, 0.5, 0.1, 0.0])
    c, s = 1.0, 0.8
    ks = np.array([1, 2, 4, 8, 16, 32, 64.0])
    acc = np.mean(flaws_accuracy(r[None, :], c, s, ks[:, None]), axis=1)
    fit = fit_selected_accuracy_ceiling(ks, acc, r_per_problem=r, c=c, s=s)
    expected = np.mean([0.9 / (0.9 + 0.2 * 0.1), 0.5 / (0.5 + 0.2 * 0.5), 0.1 / (0.1 + 0.2 * 0.9), 0.0])
    assert fit.extra["flaws_ceiling"] == pytest.approx(expected)
    assert fit.extra["flaws_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert fit.params["A_inf"] == pytest.approx(expected, abs=0.03)
    with pytest.raises(ValueError):
        fit_selected_accuracy_ceiling(ks, acc, c=c, s=s)  # r_per_problem missing


def test_selected_accuracy_ceiling_unfittable():
    fit = fit_selected_accuracy_ceiling([1, 2, 2], [0.3, 0.4, 0.42])
    assert not fit.fittable and fit.n_points == 2
    three = fit_selected_accuracy_ceiling([1, 2, 4], [0.3, 0.4, 0.45])
    assert three.fittable and math.isnan(three.stderr["A_inf"])
    assert three.ci == {} and "3 budgets (need >= 5)" in three.issues and not three.trusted


# The global curves of the committed example report (eval/reports/ttscale-arith-arith500, K = 64):
# its unbounded fit put the majority-vote asymptote at A_inf = 1.141 ± 0.28, an accuracy above 1.
ARITH_KS = [1, 2, 4, 8, 16, 32, 64]
ARITH_MAJORITY = [0.567, 0.567, 0.723, 0.842, 0.902, 0.922, 0.930]
ARITH_VERIFIER = [0.567, 0.733, 0.845, 0.900, 0.912, 0.906, 0.892]


def test_selected_accuracy_ceiling_is_bounded_and_says_when_it_is_held_there():
    fit = fit_selected_accuracy_ceiling(ARITH_KS, ARITH_MAJORITY)
    assert fit.fittable and fit.params["A_inf"] == pytest.approx(1.0, abs=1e-9)
    assert 0 <= fit.params["A_1"] <= 1
    assert fit.extra["A_inf_unbounded"] == pytest.approx(1.142, abs=5e-3)  # what the old fit reported
    assert fit.issues == ("A_inf held at its bound 1 (unbounded, the fit would put it at 1.142)",)
    assert not fit.trusted and math.isnan(fit.stderr["A_inf"])  # no standard error on a bound
    assert fit.ci["A_inf"] == pytest.approx((0.86, 1.0), abs=1e-9)  # profile interval on the 0.005 grid
    assert float(fit.predict(1e9)) <= 1.0


def test_selected_accuracy_ceiling_trusted_fit_has_a_narrow_interval():
    fit = fit_selected_accuracy_ceiling(ARITH_KS, ARITH_VERIFIER)
    assert fit.params["A_inf"] == pytest.approx(0.9161, abs=1e-3)  # the committed report: 0.9161 ± 0.013
    assert fit.stderr["A_inf"] == pytest.approx(0.0135, abs=1e-3)
    assert fit.ci["A_inf"] == pytest.approx((0.885, 0.955), abs=1e-9)
    assert fit.issues == () and fit.trusted
    back = FitResult.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert back.ci == fit.ci and back.issues == () and back.trusted


def test_selected_accuracy_ceiling_flags():
    # four budgets: too few for an asymptote (the fit itself is fine)
    few = fit_selected_accuracy_ceiling([1, 2, 4, 8], [0.4, 0.55, 0.63, 0.67])
    assert few.fittable and few.issues[0] == "4 budgets (need >= 5)"
    # verifier best-of-k on level 5 of the example report: the plateau is not located (interval to 1)
    level5 = [0.2225, 0.3724, 0.5518, 0.6893, 0.7365, 0.742, 0.76]
    wide = fit_selected_accuracy_ceiling(ARITH_KS, level5)
    assert wide.params["A_inf"] == pytest.approx(0.833, abs=1e-3) and wide.ci["A_inf"] == pytest.approx((0.73, 1.0))
    assert wide.issues == ("95% CI of A_inf [0.730, 1.000] wider than 0.15",)
    ks = np.array(ARITH_KS, dtype=float)
    # a lower ceiling known (say, the coverage plateau): A_inf stays below it
    capped = fit_selected_accuracy_ceiling(ks, 0.9 - 0.5 * ks**-0.8, upper=0.8)
    assert capped.params["A_inf"] == pytest.approx(0.8, abs=1e-9)
    assert capped.extra["A_inf_unbounded"] == pytest.approx(0.9, abs=1e-3)
    assert "A_inf held at its bound 0.8 (unbounded, the fit would put it at 0.900)" in capped.issues
    # a plateau the data themselves put at 1 is no issue
    at_one = fit_selected_accuracy_ceiling(ks, 1.0 - 0.1 * ks**-2.0)
    assert at_one.params["A_inf"] == pytest.approx(1.0, abs=1e-6) and at_one.trusted
    with pytest.raises(ValueError, match="upper"):
        fit_selected_accuracy_ceiling(ks, ARITH_VERIFIER, upper=1.2)


# ------------------------------------------------------------------------------------------
# Saturating exponential and the saturation point
# ------------------------------------------------------------------------------------------


def test_saturating_exponential_recovers_parameters():
    ks = np.arange(1, 41)
    rng = np.random.default_rng(2)
    y = 0.85 * (1 - (1 - 0.12) ** ks) + 0.005 * rng.standard_normal(ks.size)
    fit = fit_saturating_exponential(ks, y)
    assert fit.params["F_max"] == pytest.approx(0.85, abs=0.01)
    assert fit.params["p"] == pytest.approx(0.12, abs=0.01)
    assert abs(fit.params["p"] - 0.12) < 4 * fit.stderr["p"]
    assert fit.r2 > 0.99
    assert fit.saturation(1e-3) == saturation_point(fit.params["p"], fit.params["F_max"], 1e-3)
    with pytest.raises(TypeError):
        fit_coverage_power_law(ks, np.exp(-(ks**-0.5))).saturation(1e-3)
    assert not fit_saturating_exponential([1, 2], [0.1, 0.2]).fittable


def brute_saturation(p, F_max, eps):
    n = 1
    while F_max * p * (1 - p) ** n > eps:
        n += 1
    return n


def test_saturation_point_formula_and_clamping():
    # Exact boundary: ΔF(2) = 0.5·0.25 = 0.125 = eps.
    assert saturation_point(0.5, 1.0, 0.125) == 2
    # F_max·p <= eps → 1; p = 1 → 1; p = 0 → 1.
    assert saturation_point(0.01, 0.5, 0.01) == 1
    assert saturation_point(1.0, 1.0, 1e-9) == 1
    assert saturation_point(0.0, 1.0, 1e-3) == 1
    # Clamped to >= 1 even where the log ratio is tiny.
    assert saturation_point(0.9, 1.0, 0.85) == 1
    for p in (0.01, 0.1, 0.3, 0.77):
        for F_max in (0.4, 1.0):
            for eps in (1e-2, 1e-3, 1e-5):
                want = brute_saturation(p, F_max, eps)
                assert saturation_point(p, F_max, eps) == want, (p, F_max, eps)
    with pytest.raises(ValueError):
        saturation_point(1.2)
    with pytest.raises(ValueError):
        saturation_point(0.5, F_max=0.0)
    with pytest.raises(ValueError):
        saturation_point(0.5, eps=0.0)


# ------------------------------------------------------------------------------------------
# Difficulty bins and recommend_k
# ------------------------------------------------------------------------------------------


def test_difficulty_bins_quantiles_and_ties():
    p1 = np.linspace(1.0, 0.0, 10)
    np.testing.assert_array_equal(difficulty_bins(p1), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    rng = np.random.default_rng(0)
    perm = rng.permutation(10)
    np.testing.assert_array_equal(difficulty_bins(p1[perm]), difficulty_bins(p1)[perm])
    # Ties share one bin (by the centre of the tie group), independent of order.
    tied = np.array([0.0, 1.0, 0.0, 0.5, 0.0, 0.0])
    bins = difficulty_bins(tied, n_bins=3)
    assert bins[1] == 0 and bins[3] == 0
    # The four zeros span ranks 2..5 (centre 4 of 6): bin floor(4/6 · 3) = 2, the hardest.
    assert set(bins[tied == 0.0].tolist()) == {2}
    # N = 4, 5 bins: positions u = 0.75 (zeros), 0.125, 0.375 → bins 3, 0, 1.
    np.testing.assert_array_equal(difficulty_bins(np.array([0.0, 0.0, 1.0, 0.5])), [3, 3, 0, 1])
    # Equal-sized bins for large N without ties, easiest first.
    x = rng.random(1000)
    b = difficulty_bins(x, n_bins=5)
    assert np.bincount(b).tolist() == [200] * 5
    assert x[b == 0].min() > x[b == 4].max()
    assert difficulty_bins([]).size == 0
    with pytest.raises(ValueError):
        difficulty_bins([0.5, float("nan")])


def test_recommend_k_matches_brute_force():
    fit = FitResult(
        name="coverage_power_law",
        params={"a": -2.0, "b": -0.5},
        stderr={"a": 0.0, "b": 0.0},
        r2=1.0,
        rmse=0.0,
        n_points=10,
    )
    cost = 0.002
    k = np.arange(1, 1025)
    u = np.exp(-2.0 * k**-0.5) - cost * k
    assert recommend_k(fit, cost_per_sample=cost) == int(k[np.argmax(u)])
    assert recommend_k(fit, cost_per_sample=0.0, k_max=64) == 64  # increasing curve, free samples
    assert recommend_k(fit, cost_per_sample=10.0) == 1
    # A larger value per correct answer buys more samples.
    assert recommend_k(fit, cost_per_sample=cost, value_of_correct=10.0) > recommend_k(fit, cost_per_sample=cost)
