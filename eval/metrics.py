"""Estimators over the full set of n samples drawn per problem.

Every estimator here uses *all* n samples of a problem: a budget of k is evaluated as the
expectation over uniformly random k-subsets (without replacement) of the n samples, never as
"the first k samples". Inputs are plain per-problem arrays; nothing here imports the server,
torch or vLLM.

Contents:

* coverage: :func:`pass_at_k` (unbiased, numerically stable), :func:`coverage_curve`;
* selection: :func:`best_of_k` (exact), :func:`majority_at_k` and :func:`weighted_majority_at_k`
  (exact where feasible, otherwise seeded Monte Carlo);
* uncertainty: :func:`bootstrap_ci`, :func:`paired_bootstrap_diff`, :func:`by_group`;
* verifiers: :func:`auroc`, :func:`verifier_rates`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.special import gammaln

__all__ = [
    "auroc",
    "best_of_k",
    "bootstrap_ci",
    "by_group",
    "coverage_curve",
    "majority_at_k",
    "paired_bootstrap_diff",
    "pass_at_k",
    "verifier_rates",
    "weighted_majority_at_k",
]

# Above this many k-subsets, weighted voting falls back to Monte Carlo.
_MAX_ENUMERATED_SUBSETS = 20_000
# Above this many array-element updates, the exact plurality-vote recursion falls back to Monte Carlo.
_MAX_EXACT_VOTE_WORK = 50_000_000


# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------


def _check_nck(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: ``1 − C(n−c, k)/C(n, k)``.

    Computed in the stable product form ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``; returns 1.0 when
    ``n − c < k``. Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    n, c, k = int(n), int(c), int(k)
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    if c == 0:
        return 0.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def coverage_curve(correct_counts: Sequence[int], n: int | Sequence[int], ks: Iterable[int]) -> np.ndarray:
    """Dataset coverage@k (mean of :func:`pass_at_k` over problems) for every k in ``ks``.

    ``n`` is either one sample count for all problems or one per problem. Every k must satisfy
    ``k <= n`` for every problem (a ValueError otherwise): coverage beyond the samples drawn is not
    estimable without a model (see :func:`ttscale.eval.fit.fit_coverage_power_law`).
    """
    cs = np.asarray(correct_counts, dtype=np.int64).ravel()
    if cs.size == 0:
        raise ValueError("coverage_curve needs at least one problem")
    ns = np.broadcast_to(np.asarray(n, dtype=np.int64), cs.shape)
    ks_arr = np.atleast_1d(np.asarray(list(ks) if not isinstance(ks, np.ndarray) else ks, dtype=np.int64))
    out = np.empty(ks_arr.shape, dtype=np.float64)
    # Group problems by (n, c): benchmarks usually have few distinct pairs.
    pairs, counts = np.unique(np.stack([ns, cs], axis=1), axis=0, return_counts=True)
    for j, k in enumerate(ks_arr):
        total = 0.0
        for (ni, ci), m in zip(pairs, counts):
            total += m * pass_at_k(int(ni), int(ci), int(k))
        out[j] = total / cs.size
    return out


# --------------------------------------------------------------------------------------------
# Best-of-k (exact)
# --------------------------------------------------------------------------------------------


def _log_comb(a: ArrayLike, k: ArrayLike) -> np.ndarray:
    """log C(a, k), −inf where a < k (elementwise, broadcasting)."""
    av = np.asarray(a, dtype=np.float64)
    kv = np.asarray(k, dtype=np.float64)
    valid = av >= kv
    safe_a = np.where(valid, av, kv)
    out = gammaln(safe_a + 1) - gammaln(kv + 1) - gammaln(safe_a - kv + 1)
    return np.where(valid, out, -np.inf)


def best_of_k(scores: ArrayLike, correct: ArrayLike, k: int | Sequence[int] | np.ndarray) -> float | np.ndarray:
    """Expected correctness of the top-scored sample of a uniformly random k-subset (exact).

    For one problem with n scored samples: a k-subset is drawn uniformly without replacement and
    its highest-scored sample is returned; ties in score are broken uniformly at random. The
    estimate is computed exactly, not by sampling. With samples sorted by score, a sample with
    ``L`` strictly lower-scored samples is the subset maximum with probability
    ``C(L, k−1)/C(n, k)``; for a group of ``t`` samples tied at one score, averaging over tie
    orders gives P(the subset maximum lies in the group) ``= [C(L+t, k) − C(L, k)]/C(n, k)``, and
    given that, the selected sample is a uniformly random member of the group. Hence::

        best_of_k = Σ_groups [C(L_g + t_g, k) − C(L_g, k)]/C(n, k) · (correct in g)/t_g

    ``k`` may be an int (returns a float) or an array of ints (returns an array). ``1 <= k <= n``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(correct, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and correct differ in length: {s.size} vs {y.size}")
    n = s.size
    if n == 0:
        raise ValueError("best_of_k needs at least one sample")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    scalar = np.ndim(k) == 0
    ks = np.atleast_1d(np.asarray(k, dtype=np.int64))
    if np.any(ks < 1) or np.any(ks > n):
        raise ValueError(f"k must be in [1, n={n}], got {ks.tolist()}")
    values, inverse, group_sizes = np.unique(s, return_inverse=True, return_counts=True)
    group_correct = np.bincount(inverse, weights=y, minlength=values.size)
    lower = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])  # strictly lower-scored samples
    frac = group_correct / group_sizes
    kk = ks[:, None].astype(np.float64)
    log_total = _log_comb(np.float64(n), kk)
    p_upto = np.exp(_log_comb(lower[None, :] + group_sizes[None, :], kk) - log_total)
    p_below = np.exp(_log_comb(lower[None, :], kk) - log_total)
    out = ((p_upto - p_below) * frac[None, :]).sum(axis=1)
    out = np.clip(out, 0.0, 1.0)
    return float(out[0]) if scalar else out


# --------------------------------------------------------------------------------------------
# Plurality voting
# --------------------------------------------------------------------------------------------


def _encode_clusters(cluster_ids: Sequence[Hashable | None]) -> tuple[np.ndarray, list[Hashable]]:
    """Integer codes per sample (−1 = answerless) and the list of distinct cluster ids."""
    index: dict[Hashable, int] = {}
    codes = np.empty(len(cluster_ids), dtype=np.int64)
    for i, cid in enumerate(cluster_ids):
        if cid is None:
            codes[i] = -1
        else:
            codes[i] = index.setdefault(cid, len(index))
    return codes, list(index)


def _is_bool_mask(x: Any, n: int) -> bool:
    if isinstance(x, np.ndarray):
        return bool(x.dtype == np.bool_ and x.shape == (n,))
    if isinstance(x, (list, tuple)) and len(x) == n and n > 0:
        return all(isinstance(v, (bool, np.bool_)) for v in x)
    return False


def _correct_cluster_flags(codes: np.ndarray, clusters: list[Hashable], correct: Any) -> np.ndarray:
    """Boolean flag per distinct cluster: is that answer correct?

    ``correct`` may be a per-sample boolean mask (length n; a cluster is correct iff its samples
    are, and they must agree), a mapping cluster id → bool, a collection of correct cluster ids,
    or a single correct cluster id.
    """
    n = codes.size
    flags = np.zeros(len(clusters), dtype=bool)
    if _is_bool_mask(correct, n):
        mask = np.asarray(correct, dtype=bool)
        for j in range(len(clusters)):
            members = mask[codes == j]
            if members.any() != members.all():
                raise ValueError(f"samples of cluster {clusters[j]!r} disagree on correctness")
            flags[j] = bool(members[0])
        return flags
    if isinstance(correct, Mapping):
        for j, cid in enumerate(clusters):
            flags[j] = bool(correct.get(cid, False))
        return flags
    if isinstance(correct, (set, frozenset, list, tuple, np.ndarray)):
        good = (
            set(np.asarray(correct, dtype=object).ravel().tolist()) if isinstance(correct, np.ndarray) else set(correct)
        )
    else:
        good = {correct}
    for j, cid in enumerate(clusters):
        flags[j] = cid in good
    return flags


def _vote_credit(tallies: np.ndarray, present: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Per-row credit: (#correct clusters tied at the top)/(#tied), over clusters present."""
    if tallies.shape[1] == 0:
        return np.zeros(tallies.shape[0])
    masked = np.where(present, tallies, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    tol = 1e-12 * np.maximum(1.0, np.abs(np.where(np.isfinite(top), top, 0.0)))
    tied = present & (masked >= top - tol)
    n_tied = tied.sum(axis=1)
    n_good = (tied & flags[None, :]).sum(axis=1)
    return np.where(n_tied > 0, n_good / np.maximum(n_tied, 1), 0.0)


def _subset_tallies(
    subsets: np.ndarray, codes: np.ndarray, weights: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-subset summed weight and presence per cluster (answerless samples are ignored)."""
    rows = np.repeat(np.arange(subsets.shape[0]), subsets.shape[1])
    sub_codes = codes[subsets].ravel()
    sub_w = weights[subsets].ravel()
    keep = sub_codes >= 0
    tallies = np.zeros((subsets.shape[0], n_clusters))
    counts = np.zeros((subsets.shape[0], n_clusters), dtype=np.int64)
    np.add.at(tallies, (rows[keep], sub_codes[keep]), sub_w[keep])
    np.add.at(counts, (rows[keep], sub_codes[keep]), 1)
    return tallies, counts > 0


def _vote_monte_carlo(
    codes: np.ndarray, weights: np.ndarray, flags: np.ndarray, k: int, n_mc: int, seed: int, chunk: int = 2048
) -> float:
    n = codes.size
    rng = np.random.default_rng(seed)
    total = 0.0
    done = 0
    while done < n_mc:
        m = min(chunk, n_mc - done)
        subsets = np.argpartition(rng.random((m, n)), k - 1, axis=1)[:, :k]
        tallies, present = _subset_tallies(subsets, codes, weights, flags.size)
        total += _vote_credit(tallies, present, flags).sum()
        done += m
    return total / n_mc


def _vote_enumerate(codes: np.ndarray, weights: np.ndarray, flags: np.ndarray, k: int) -> float:
    n = codes.size
    subsets = np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    tallies, present = _subset_tallies(subsets, codes, weights, flags.size)
    return float(_vote_credit(tallies, present, flags).mean())


def _binom_weights(m: int, k: int, p: float) -> np.ndarray:
    """Scaled C(m, y) for y = 0..min(m, k): the Binomial(m, p) pmf (the p-scaling cancels)."""
    y = np.arange(0, min(m, k) + 1)
    pmf: np.ndarray = stats.binom.pmf(y, m, p)
    return pmf


def _majority_exact(codes: np.ndarray, flags: np.ndarray, k: int) -> float:
    """Exact expected plurality-vote accuracy over all k-subsets (multivariate hypergeometric).

    For each correct cluster g and each vote count x >= 1 it receives, a recursion over the other
    clusters (and the answerless pool) sums the subset weights in which no other cluster exceeds x,
    tracking how many reach exactly x; that configuration earns 1/(1 + #others at x). Binomial
    coefficients are scaled by p^y(1−p)^(m−y) with p = k/n, which multiplies every k-subset's weight
    by the same constant p^k(1−p)^(n−k) and keeps the arithmetic in floating range.
    """
    n = codes.size
    sizes = np.bincount(codes[codes >= 0], minlength=flags.size)
    n_none = int(np.sum(codes < 0))
    p = k / n
    denom = float(stats.binom.pmf(k, n, p))
    total = 0.0
    for g in np.flatnonzero(flags):
        others = [int(sizes[j]) for j in range(flags.size) if j != g]
        w_g = _binom_weights(int(sizes[g]), k, p)
        w_none = _binom_weights(n_none, k, p)
        n_ot = len(others)
        for x in range(1, min(int(sizes[g]), k) + 1):
            if w_g[x] == 0.0:
                continue
            rest = k - x
            # D[t, s]: weight of configurations with s samples drawn from the processed clusters and
            # t of them tied at exactly x.
            D = np.zeros((n_ot + 1, rest + 1))
            D[0, : min(n_none, rest) + 1] = w_none[: rest + 1]
            for m in others:
                w = _binom_weights(m, min(x, rest), p)
                new = np.zeros_like(D)
                for y, wy in enumerate(w):
                    if y > rest:
                        break
                    if y < x:
                        new[:, y:] += wy * D[:, : rest + 1 - y]
                    else:  # y == x: one more cluster tied with g
                        new[1:, y:] += wy * D[:-1, : rest + 1 - y]
                D = new
            credit = D[:, rest] / (1.0 + np.arange(n_ot + 1))
            total += w_g[x] * credit.sum()
    return float(min(max(total / denom, 0.0), 1.0))


def _exact_vote_work(codes: np.ndarray, flags: np.ndarray, k: int) -> int:
    sizes = np.bincount(codes[codes >= 0], minlength=flags.size)
    n_clusters = flags.size
    work = 0
    for g in np.flatnonzero(flags):
        xs = min(int(sizes[g]), k)
        per_x = sum(min(xs, int(m)) + 1 for j, m in enumerate(sizes) if j != g)
        work += xs * per_x * n_clusters * (k + 1)
    return work


def _prepare_votes(cluster_ids: Sequence[Hashable | None], correct: Any, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    n = len(cluster_ids)
    if n == 0:
        raise ValueError("voting needs at least one sample")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    codes, clusters = _encode_clusters(list(cluster_ids))
    flags = _correct_cluster_flags(codes, clusters, correct)
    return codes, flags, k


def majority_at_k(
    cluster_ids: Sequence[Hashable | None],
    correct_cluster_ids_or_mask: Any,
    k: int,
    *,
    n_mc: int = 2000,
    seed: int = 0,
    exact: bool | None = None,
) -> float:
    """Expected accuracy of plurality voting over a uniformly random k-subset of one problem's samples.

    ``cluster_ids[i]`` is the answer cluster of sample i (any hashable), or None for an answerless
    sample; answerless samples are drawn like any other (they use budget) but do not vote. The
    correct answer(s) are given as a per-sample boolean mask, a mapping cluster → bool, a collection
    of correct cluster ids, or a single correct cluster id.

    Estimator: E over k-subsets S drawn without replacement of ``credit(S)``, where credit(S) is
    (#correct clusters among those with the most votes in S) / (#clusters with the most votes in S),
    i.e. the expected accuracy under a uniformly random tie-break, and 0 when S has no answered
    sample. The expectation is computed exactly by a recursion over clusters (multivariate
    hypergeometric counts; this covers k = 1 and k = n) whenever its cost is moderate, otherwise
    by Monte Carlo over ``n_mc`` subsets drawn with ``numpy.random.default_rng(seed)``. ``exact``
    forces one or the other (None = automatic).
    """
    codes, flags, k = _prepare_votes(cluster_ids, correct_cluster_ids_or_mask, k)
    n = codes.size
    if not flags.any():
        return 0.0
    if k == n:
        return _vote_enumerate(codes, np.ones(n), flags, k)
    if exact is None:
        exact = _exact_vote_work(codes, flags, k) <= _MAX_EXACT_VOTE_WORK
    if exact:
        return _majority_exact(codes, flags, k)
    return float(_vote_monte_carlo(codes, np.ones(n), flags, k, n_mc, seed))


def weighted_majority_at_k(
    cluster_ids: Sequence[Hashable | None],
    weights: ArrayLike,
    correct_mask_by_cluster: Any,
    k: int,
    *,
    n_mc: int = 2000,
    seed: int = 0,
    exact: bool | None = None,
) -> float:
    """Expected accuracy of weighted plurality voting over a uniformly random k-subset.

    Each answered sample adds its weight (e.g. a reward-model score) to its cluster; among the
    clusters that have at least one member in the subset, the one with the largest summed weight
    wins (ties, up to a 1e-12 relative tolerance, credited 1/#tied). Answerless samples (None) use
    budget but do not vote. ``correct_mask_by_cluster`` takes the same forms as in
    :func:`majority_at_k` (mapping cluster → bool, per-sample mask, collection of ids, single id).

    Estimator: the mean credit over all C(n, k) subsets when k == 1, k == n or C(n, k) <= 20,000
    (exact), otherwise over ``n_mc`` subsets drawn with ``numpy.random.default_rng(seed)``.
    ``exact`` forces one or the other (forcing exact with very many subsets is slow).
    """
    codes, flags, k = _prepare_votes(cluster_ids, correct_mask_by_cluster, k)
    w = np.asarray(weights, dtype=np.float64).ravel()
    n = codes.size
    if w.size != n:
        raise ValueError(f"weights has {w.size} entries for {n} samples")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite")
    if not flags.any():
        return 0.0
    if k == 1:
        # A single answered sample always wins; answerless ones score 0.
        answered = codes >= 0
        return float(np.mean(answered & flags[np.maximum(codes, 0)]))
    if exact is None:
        exact = k == n or math.comb(n, k) <= _MAX_ENUMERATED_SUBSETS
    if exact:
        return _vote_enumerate(codes, w, flags, k)
    return float(_vote_monte_carlo(codes, w, flags, k, n_mc, seed))


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def _as_values(x: ArrayLike, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or inf")
    return v


def _percentile_ci(v: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // v.size)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        means[start : start + m] = v[rng.integers(0, v.size, size=(m, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def bootstrap_ci(
    per_problem_values: ArrayLike, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``1 − alpha`` CI, resampling problems with replacement.

    Returns ``(mean, lo, hi)``. A single problem gives a zero-width interval.
    """
    return _percentile_ci(_as_values(per_problem_values, "per_problem_values"), n_boot, alpha, seed)


def paired_bootstrap_diff(
    a: ArrayLike, b: ArrayLike, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a − b`` over the same problems with its paired percentile-bootstrap CI.

    Problems are resampled jointly (the same indices for both methods), so per-problem
    difficulty cancels. Returns ``(mean_diff, lo, hi)``.
    """
    va = _as_values(a, "a")
    vb = _as_values(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"a and b differ in length: {va.size} vs {vb.size}")
    return _percentile_ci(va - vb, n_boot, alpha, seed)


def by_group(
    values: ArrayLike,
    groups: Sequence[Hashable],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[Hashable, tuple[float, float, float, int]]:
    """Per-group ``(mean, lo, hi, n)`` with a percentile-bootstrap CI (e.g. per level or subject).

    Groups appear in sorted order when their keys sort, otherwise in order of first appearance.
    """
    v = _as_values(values, "values")
    g = list(groups)
    if len(g) != v.size:
        raise ValueError(f"values and groups differ in length: {v.size} vs {len(g)}")
    order: list[Hashable] = list(dict.fromkeys(g))
    with contextlib.suppress(TypeError):
        order = sorted(cast("list[Any]", order))  # keys that do not sort raise TypeError
    out: dict[Hashable, tuple[float, float, float, int]] = {}
    g_arr = np.empty(len(g), dtype=object)
    g_arr[:] = g
    for key in order:
        sel = v[np.array([x == key for x in g_arr], dtype=bool)]
        mean, lo, hi = _percentile_ci(sel, n_boot, alpha, seed)
        out[key] = (mean, lo, hi, int(sel.size))
    return out


# --------------------------------------------------------------------------------------------
# Verifier quality
# --------------------------------------------------------------------------------------------


def _scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, y


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative).

    Rank-based (Mann–Whitney U with mid-ranks), so a tied positive/negative pair counts 1/2.
    Returns NaN when either class is absent.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks for ties
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def verifier_rates(scores: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Rates of a verifier that accepts a sample iff ``score >= threshold``.

    Returns ``tpr`` (accepted | correct), ``fpr`` (accepted | incorrect), ``precision``
    (correct | accepted) and ``accept_rate``, plus the fLaws names ``completeness`` (= tpr) and
    ``soundness`` (= 1 − fpr). A rate whose denominator is empty is NaN.
    """
    s, y = _scores_labels(scores, labels)
    if s.size == 0:
        raise ValueError("verifier_rates needs at least one sample")
    acc = s >= threshold
    tp = int(np.sum(acc & y))
    fp = int(np.sum(acc & ~y))
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    n_acc = tp + fp

    def ratio(a: int, b: int) -> float:
        return a / b if b > 0 else float("nan")

    tpr = ratio(tp, n_pos)
    fpr = ratio(fp, n_neg)
    return {
        "tpr": tpr,
        "fpr": fpr,
        "precision": ratio(tp, n_acc),
        "accept_rate": n_acc / y.size,
        "completeness": tpr,
        "soundness": 1.0 - fpr,
    }
