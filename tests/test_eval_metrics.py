"""Estimators of ttscale.eval.metrics against spec test vectors and brute-force enumeration."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from ttscale.eval.metrics import (
    auroc,
    best_of_k,
    bootstrap_ci,
    by_group,
    coverage_curve,
    majority_at_k,
    paired_bootstrap_diff,
    pass_at_k,
    verifier_rates,
    weighted_majority_at_k,
)

# ------------------------------------------------------------------------------------------
# pass@k / coverage
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "k", "expected"), [(10, 3, 5, 0.916667), (100, 1, 1, 0.01), (5, 0, 3, 0.0)])
def test_pass_at_k_spec_vectors(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-6)


def test_pass_at_k_matches_binomial_ratio():
    for n in range(1, 16):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_finite_and_monotone():
    vals = [pass_at_k(10_000, 3, k) for k in (1, 10, 100, 1000, 9997, 9998)]
    assert all(0 <= v <= 1 for v in vals)
    assert vals == sorted(vals)
    assert vals[-2] < 1.0 and vals[-1] == 1.0  # n − c < k only at the last
    assert vals[0] == pytest.approx(3e-4, rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5, -1, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_coverage_curve_mean_over_problems_with_per_problem_n():
    counts = [0, 1, 5, 8]
    ns = [8, 10, 10, 8]
    ks = [1, 2, 8]
    curve = coverage_curve(counts, ns, ks)
    expected = [np.mean([pass_at_k(n, c, k) for n, c in zip(ns, counts)]) for k in ks]
    np.testing.assert_allclose(curve, expected, atol=1e-12)
    assert curve[0] == pytest.approx((0 + 0.1 + 0.5 + 1.0) / 4)
    # Scalar n broadcasts.
    np.testing.assert_allclose(
        coverage_curve([2, 3], 10, [1, 5]),
        [(pass_at_k(10, 2, 1) + pass_at_k(10, 3, 1)) / 2, (pass_at_k(10, 2, 5) + pass_at_k(10, 3, 5)) / 2],
    )
    with pytest.raises(ValueError):
        coverage_curve(counts, ns, [9])  # exceeds n = 8 of two problems


# ------------------------------------------------------------------------------------------
# best-of-k
# ------------------------------------------------------------------------------------------


def brute_best_of_k(scores, correct, k):
    """Average over all k-subsets; within a subset, average over the samples tied at the top."""
    total = Fraction(0)
    subsets = list(combinations(range(len(scores)), k))
    for sub in subsets:
        top = max(scores[i] for i in sub)
        tied = [i for i in sub if scores[i] == top]
        total += Fraction(sum(correct[i] for i in tied), len(tied))
    return float(total / len(subsets))


@pytest.mark.parametrize("seed", range(6))
def test_best_of_k_exact_against_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 10))
    scores = rng.integers(0, 4, size=n).astype(float).tolist()  # many ties
    correct = rng.integers(0, 2, size=n).tolist()
    ks = np.arange(1, n + 1)
    got = best_of_k(scores, correct, ks)
    assert got.shape == (n,)
    for k in ks:
        assert got[k - 1] == pytest.approx(brute_best_of_k(scores, correct, int(k)), abs=1e-12)
        assert best_of_k(scores, correct, int(k)) == pytest.approx(got[k - 1], abs=1e-15)


def test_best_of_k_known_values():
    scores = [0.1, 0.9, 0.5, 0.3]
    correct = [1, 0, 1, 1]
    assert best_of_k(scores, correct, 1) == pytest.approx(0.75)  # plain accuracy
    assert best_of_k(scores, correct, 4) == 0.0  # the top-scored sample is wrong
    # Large n with ties: stays a probability and matches the tie-group formula at k = n.
    rng = np.random.default_rng(1)
    s = rng.integers(0, 50, size=3000).astype(float)
    y = rng.integers(0, 2, size=3000)
    v = best_of_k(s, y, [1, 100, 3000])
    assert np.all((v >= 0) & (v <= 1))
    assert v[0] == pytest.approx(y.mean())
    assert v[2] == pytest.approx(y[s == s.max()].mean())


def test_best_of_k_rejects_bad_input():
    with pytest.raises(ValueError):
        best_of_k([1.0, 2.0], [1], 1)
    with pytest.raises(ValueError):
        best_of_k([1.0, 2.0], [1, 0], 3)
    with pytest.raises(ValueError):
        best_of_k([1.0, float("nan")], [1, 0], 1)


# ------------------------------------------------------------------------------------------
# (weighted) majority
# ------------------------------------------------------------------------------------------


def brute_vote(cluster_ids, weights, good, k):
    total = Fraction(0)
    subsets = list(combinations(range(len(cluster_ids)), k))
    for sub in subsets:
        tally: dict = {}
        for i in sub:
            if cluster_ids[i] is not None:
                tally[cluster_ids[i]] = tally.get(cluster_ids[i], Fraction(0)) + Fraction(weights[i])
        if not tally:
            continue
        top = max(tally.values())
        tied = [cid for cid, v in tally.items() if v == top]
        total += Fraction(sum(cid in good for cid in tied), len(tied))
    return float(total / len(subsets))


def random_votes(rng, n, n_clusters, p_none=0.15):
    ids = []
    for _ in range(n):
        ids.append(None if rng.random() < p_none else int(rng.integers(0, n_clusters)))
    return ids


@pytest.mark.parametrize("seed", range(8))
def test_majority_exact_against_enumeration(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 11))
    ids = random_votes(rng, n, int(rng.integers(1, 4)))
    good = {0}
    for k in range(1, n + 1):
        want = brute_vote(ids, [1] * n, good, k)
        assert majority_at_k(ids, 0, k) == pytest.approx(want, abs=1e-10), (ids, k)
        assert majority_at_k(ids, 0, k, exact=True) == pytest.approx(want, abs=1e-10), (ids, k)


def test_majority_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(7)
    ids = random_votes(rng, 40, 4)
    for k in (3, 8, 20):
        exact = majority_at_k(ids, 1, k, exact=True)
        mc = majority_at_k(ids, 1, k, exact=False, n_mc=20_000, seed=3)
        # MC standard error <= 0.5/sqrt(20000) ≈ 0.0035; allow ~4 SE.
        assert mc == pytest.approx(exact, abs=0.015), k
        # Same seed, same answer.
        assert majority_at_k(ids, 1, k, exact=False, n_mc=500, seed=5) == majority_at_k(
            ids, 1, k, exact=False, n_mc=500, seed=5
        )


def test_majority_special_cases():
    ids = ["a", "a", "b", None]
    # k = 1: fraction of samples that are answered and correct; the answerless one scores 0.
    assert majority_at_k(ids, "a", 1) == pytest.approx(0.5)
    assert majority_at_k([None, None], "a", 1) == 0.0
    # k = n: the full vote.
    assert majority_at_k(ids, "a", 4) == 1.0
    assert majority_at_k(ids, "b", 4) == 0.0
    # Two-way tie at the top is credited 1/2.
    assert majority_at_k(["a", "b"], "a", 2) == pytest.approx(0.5)
    assert majority_at_k(["a", "b", "c"], {"a", "b"}, 3) == pytest.approx(2 / 3)
    # Correct answer given as a per-sample mask or a mapping.
    assert majority_at_k(ids, [True, True, False, False], 4) == 1.0
    assert majority_at_k(ids, {"b": True}, 4) == 0.0
    # No correct cluster at all.
    assert majority_at_k(ids, "zzz", 2) == 0.0
    with pytest.raises(ValueError):
        majority_at_k(ids, "a", 5)
    with pytest.raises(ValueError):  # mask disagrees within a cluster
        majority_at_k(ids, [True, False, False, False], 2)


def test_majority_exact_for_large_n_stays_a_probability():
    rng = np.random.default_rng(11)
    ids = random_votes(rng, 300, 6)
    vals = [majority_at_k(ids, 0, k) for k in (1, 50, 150, 299)]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert vals[0] == pytest.approx(sum(i == 0 for i in ids) / 300)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_majority_against_enumeration(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(2, 10))
    ids = random_votes(rng, n, 3)
    weights = rng.integers(1, 5, size=n).tolist()  # integers so exact ties happen
    mapping = {0: True, 1: False, 2: False}
    for k in range(1, n + 1):
        want = brute_vote(ids, weights, {0}, k)
        assert weighted_majority_at_k(ids, weights, mapping, k) == pytest.approx(want, abs=1e-12), (ids, k)


def test_weighted_majority_weights_matter_and_mc_agrees():
    ids = ["a", "b", "b"]
    assert weighted_majority_at_k(ids, [5.0, 1.0, 1.0], {"a": True}, 3) == 1.0
    assert majority_at_k(ids, "a", 3) == 0.0
    rng = np.random.default_rng(5)
    ids = random_votes(rng, 30, 3)
    w = rng.random(30)
    exact = weighted_majority_at_k(ids, w, {1: True}, 6, exact=True)
    mc = weighted_majority_at_k(ids, w, {1: True}, 6, exact=False, n_mc=20_000, seed=1)
    assert mc == pytest.approx(exact, abs=0.015)
    # With unit weights it is plain plurality voting.
    ones = np.ones(30)
    assert weighted_majority_at_k(ids, ones, {1: True}, 6, exact=True) == pytest.approx(
        majority_at_k(ids, 1, 6), abs=1e-12
    )


# ------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_truth_and_is_seeded():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(x, seed=1)
    assert mean == pytest.approx(x.mean())
    assert lo < 0.3 < hi
    # Width close to the normal approximation 2·1.96·sqrt(p(1−p)/n).
    width = 2 * 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert (hi - lo) == pytest.approx(width, rel=0.15)
    assert bootstrap_ci(x, seed=1) == (mean, lo, hi)
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_bootstrap_ci_frequentist_coverage():
    rng = np.random.default_rng(42)
    hits = 0
    trials = 200
    for t in range(trials):
        x = rng.normal(1.0, 2.0, size=100)
        _, lo, hi = bootstrap_ci(x, n_boot=400, seed=t)
        hits += lo <= 1.0 <= hi
    # Nominal 95%; binomial SE over 200 trials ≈ 1.5%.
    assert 0.89 <= hits / trials <= 0.99


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, size=300)
    b = difficulty + rng.normal(0, 0.1, size=300)
    a = b + 0.05 + rng.normal(0, 0.1, size=300)
    d, lo, hi = paired_bootstrap_diff(a, b, seed=0)
    assert d == pytest.approx(np.mean(a - b))
    assert lo < 0.05 < hi
    assert lo > 0  # paired: the shared difficulty cancels
    # Unpaired intervals would be dominated by the difficulty spread and straddle zero.
    _, lo_a, hi_a = bootstrap_ci(a, seed=0)
    _, lo_b, hi_b = bootstrap_ci(b, seed=0)
    assert lo_a < hi_b and lo_b < hi_a
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 2], [1, 2, 3])


def test_by_group():
    values = [1, 0, 1, 1, 0, 0, 1]
    groups = [2, 1, 2, 2, 1, 1, 3]
    out = by_group(values, groups, seed=0)
    assert list(out) == [1, 2, 3]
    assert out[1][0] == 0.0 and out[1][3] == 3
    assert out[2] == (1.0, 1.0, 1.0, 3)
    assert out[3] == (1.0, 1.0, 1.0, 1)
    with pytest.raises(ValueError):
        by_group([1, 2], [1])


# ------------------------------------------------------------------------------------------
# verifier quality
# ------------------------------------------------------------------------------------------


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=60).astype(float)  # heavy ties
    labels = rng.random(60) < 0.4 + 0.1 * (scores > 2)
    assert auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auroc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_verifier_rates():
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.5]
    labels = [1, 1, 1, 0, 0, 0]
    r = verifier_rates(scores, labels, threshold=0.5)
    # Accepted: 0.9 (T), 0.8 (T), 0.6 (F), 0.5 (F; score == threshold is accepted).
    assert r["tpr"] == pytest.approx(2 / 3)
    assert r["fpr"] == pytest.approx(2 / 3)
    assert r["precision"] == pytest.approx(0.5)
    assert r["accept_rate"] == pytest.approx(4 / 6)
    assert r["completeness"] == r["tpr"]
    assert r["soundness"] == pytest.approx(1 / 3)
    r = verifier_rates([0.1, 0.2], [1, 0], threshold=0.95)
    assert r["accept_rate"] == 0.0 and math.isnan(r["precision"])
