"""Selection math for sampled completions: votes, stopping rules and confidence signals.

Everything here works on plain Python sequences and numpy arrays (cluster ids from
:func:`ttscale.answers.cluster_answers`, per-sample log-probs, per-token top-k log-probs), so the
strategies can call it without any engine types. All functions are deterministic.

Contents:

* :func:`vote`: (weighted) majority vote with deterministic tie-breaking;
* :func:`rpc`: Perplexity Consistency with Reasoning Pruning (Weibull-mixture threshold);
* DeepConf confidences: :func:`token_confidence`, :func:`group_confidences` and the trace
  scores built on them;
* :func:`beta_stop_probability`: Adaptive-Consistency's Beta stopping probability (used by the
  adaptive budget);
* :func:`multi_temperature_exit`: the early exit of multi-temperature voting.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "RPCResult",
    "VoteResult",
    "beta_stop_probability",
    "bottom_fraction_confidence",
    "fit_weibull_mixture",
    "group_confidences",
    "lowest_group_confidence",
    "mean_confidence",
    "multi_temperature_exit",
    "rpc",
    "tail_confidence",
    "token_confidence",
    "vote",
]


def _check_len(name: str, values: Sequence[object] | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} samples")


def _tied(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# Majority / weighted vote
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteResult:
    """Outcome of :func:`vote`.

    ``winner`` is a cluster id (``None`` when no sample has an answer), ``scores`` maps each
    voting cluster to its summed weight, ``representative`` is the index of the sample whose
    text stands for the winning answer, and ``share`` is the winner's fraction of all weight.
    """

    winner: int | None
    scores: dict[int, float] = field(default_factory=dict)
    representative: int | None = None
    share: float = 0.0


def vote(
    cluster_ids: Sequence[int | None],
    weights: Sequence[float] | None = None,
    *,
    tie_scores: Sequence[float] | None = None,
    finish_order: Sequence[float] | None = None,
) -> VoteResult:
    """Weighted majority vote over answer clusters.

    Answerless samples (cluster ``None``) do not vote. Each sample adds its weight (1 when
    *weights* is None) to its cluster. Clusters with the same top score are separated by the
    larger sum of *tie_scores* (sequence log-probs), then by holding the earliest-finished
    sample (*finish_order*, smaller is earlier), then by the lower cluster id. Within the
    winning cluster the representative is the sample with the highest tie score, then the
    earliest finish, then the lowest index.
    """
    n = len(cluster_ids)
    _check_len("weights", weights, n)
    _check_len("tie_scores", tie_scores, n)
    _check_len("finish_order", finish_order, n)

    scores: dict[int, float] = {}
    tie_sum: dict[int, float] = {}
    first_finish: dict[int, float] = {}
    members: dict[int, list[int]] = {}
    for i, cid in enumerate(cluster_ids):
        if cid is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        scores[cid] = scores.get(cid, 0.0) + w
        members.setdefault(cid, []).append(i)
        if tie_scores is not None:
            tie_sum[cid] = tie_sum.get(cid, 0.0) + float(tie_scores[i])
        if finish_order is not None:
            f = float(finish_order[i])
            first_finish[cid] = min(first_finish.get(cid, math.inf), f)

    if not scores:
        return VoteResult(winner=None, scores={}, representative=None, share=0.0)

    best = max(scores.values())
    candidates = sorted(c for c, s in scores.items() if _tied(s, best))
    if len(candidates) > 1 and tie_scores is not None:
        top = max(tie_sum[c] for c in candidates)
        candidates = [c for c in candidates if _tied(tie_sum[c], top)]
    if len(candidates) > 1 and finish_order is not None:
        earliest = min(first_finish[c] for c in candidates)
        candidates = [c for c in candidates if first_finish[c] == earliest]
    winner = candidates[0]

    def rep_key(i: int) -> tuple[float, float, int]:
        ts = float(tie_scores[i]) if tie_scores is not None else 0.0
        fo = float(finish_order[i]) if finish_order is not None else 0.0
        return (-ts, fo, i)

    representative = min(members[winner], key=rep_key)
    total = sum(scores.values())
    share = scores[winner] / total if total > 0 else 0.0
    return VoteResult(winner=winner, scores=scores, representative=representative, share=share)


# ---------------------------------------------------------------------------------------------
# RPC: Perplexity Consistency with Reasoning Pruning
# ---------------------------------------------------------------------------------------------

_PDF_FLOOR = 1e-300
_LOG_PDF_FLOOR = math.log(_PDF_FLOOR)
_WEIBULL_INIT = (0.5, 1.0, 1.0, 1.5, 2.0)
_WEIBULL_BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))
_WEIBULL_MAXITER = 500


def _weibull_logpdf(x: np.ndarray, k: float, lam: float) -> np.ndarray:
    z = np.log(x) - math.log(lam)
    out: np.ndarray = math.log(k) - math.log(lam) + (k - 1.0) * z - np.exp(k * z)
    return out


def _component_logs(x: np.ndarray, params: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(w f1(x)) and log((1-w) f2(x)), each floored at log(1e-300)."""
    w, k1, l1, k2, l2 = (float(v) for v in params)
    a = math.log(w) + _weibull_logpdf(x, k1, l1)
    b = math.log1p(-w) + _weibull_logpdf(x, k2, l2)
    return np.maximum(a, _LOG_PDF_FLOOR), np.maximum(b, _LOG_PDF_FLOOR)


def _mixture_nll(params: np.ndarray, x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        a, b = _component_logs(x, params)
        log_g = np.maximum(np.logaddexp(a, b), _LOG_PDF_FLOOR)
        value = -float(np.sum(log_g))
    return value if math.isfinite(value) else 1e300


def _weibull_mean(k: float, lam: float) -> float:
    return lam * math.gamma(1.0 + 1.0 / k)


def fit_weibull_mixture(p: Sequence[float] | np.ndarray) -> tuple[float, float, float, float, float]:
    """Maximum-likelihood 2-component Weibull mixture of the path probabilities *p*.

    L-BFGS-B from ``(w, k1, lam1, k2, lam2) = (0.5, 1, 1, 1.5, 2)`` with ``w`` in [0.2, 0.8]
    and the shapes/scales at least 0.01. Component 1 is returned as the one with the larger
    Weibull mean (the "high-probability" component); ``w`` is its weight.
    """
    from scipy.optimize import minimize  # here: keeps the module import light

    x = np.clip(np.asarray(p, dtype=float), _PDF_FLOOR, None)
    if x.size == 0:
        raise ValueError("cannot fit a mixture to no samples")
    res = minimize(
        _mixture_nll,
        x0=np.asarray(_WEIBULL_INIT, dtype=float),
        args=(x,),
        method="L-BFGS-B",
        bounds=_WEIBULL_BOUNDS,
        options={"maxiter": _WEIBULL_MAXITER},
    )
    w, k1, l1, k2, l2 = (float(v) for v in res.x)
    if _weibull_mean(k1, l1) < _weibull_mean(k2, l2):
        w, k1, l1, k2, l2 = 1.0 - w, k2, l2, k1, l1
    return (w, k1, l1, k2, l2)


@dataclass(frozen=True)
class RPCResult:
    """Outcome of :func:`rpc`.

    ``scores`` maps clusters to their Perplexity-Consistency score, ``confidence`` is the
    winner's share of the summed scores, ``pruned`` flags the paths Reasoning Pruning removed,
    ``representative`` is the winning cluster's most probable path and ``weibull`` the fitted
    ``(w, k1, lam1, k2, lam2)`` (``None`` when pruning was skipped).
    """

    winner: int | None
    scores: dict[int, float]
    confidence: float
    pruned: list[bool]
    representative: int | None
    weibull: tuple[float, float, float, float, float] | None = None


def _prune_mask(p: np.ndarray, min_paths: int) -> tuple[list[bool], tuple[float, float, float, float, float] | None]:
    n = p.size
    if n < max(min_paths, 2) or float(np.ptp(p)) < 1e-6 * max(float(np.max(p)), 1e-12):
        return [False] * n, None
    try:
        params = fit_weibull_mixture(p)
    except Exception:
        return [False] * n, None
    x = np.clip(p, _PDF_FLOOR, None)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        hi, lo = _component_logs(x, params)
    # P_hi < P_lo  <=>  w f1 < (1 - w) f2
    mean_p = float(np.mean(p))
    mask = [bool(h < l_ and pi < mean_p) for h, l_, pi in zip(hi, lo, p)]
    return mask, params


def rpc(
    cluster_ids: Sequence[int | None],
    mean_logprobs: Sequence[float],
    texts: Sequence[str],
    *,
    prune: bool = True,
    min_paths: int = 8,
) -> RPCResult:
    """Perplexity Consistency with Reasoning Pruning.

    ``p_i = exp(mean_logprobs[i])``. With *prune*, a 2-component Weibull mixture is fitted to
    all paths' p (skipped with fewer than *min_paths* paths or near-constant p) and path i is
    pruned when it is more likely under the low component and below the mean p. A cluster's
    score sums p over its non-pruned paths, counting identical completion texts once. Pruned
    paths keep their cluster membership. If pruning would leave no answered path, it is
    skipped. Ties go to the larger summed log-prob, then the lower cluster id.
    """
    n = len(cluster_ids)
    _check_len("mean_logprobs", mean_logprobs, n)
    _check_len("texts", texts, n)
    ell = np.asarray(mean_logprobs, dtype=float).reshape(-1)
    ell = np.where(np.isnan(ell), -np.inf, ell)
    p = np.exp(np.minimum(ell, 0.0))

    pruned, params = ([False] * n, None)
    if prune and n:
        pruned, params = _prune_mask(p, min_paths)
        answered = [i for i, c in enumerate(cluster_ids) if c is not None]
        if answered and all(pruned[i] for i in answered):
            pruned, params = [False] * n, None

    per_text: dict[int, dict[object, float]] = {}
    log_sum: dict[int, float] = {}
    members: dict[int, list[int]] = {}
    for i, cid in enumerate(cluster_ids):
        if cid is None:
            continue
        members.setdefault(cid, []).append(i)
        log_sum[cid] = log_sum.get(cid, 0.0) + (float(ell[i]) if math.isfinite(ell[i]) else -1e300)
        texts_of = per_text.setdefault(cid, {})
        if pruned[i]:
            continue
        text_key: object = texts[i] if texts[i] is not None else ("__none__", i)
        texts_of[text_key] = max(texts_of.get(text_key, 0.0), float(p[i]))

    scores = {cid: float(sum(by_text.values())) for cid, by_text in per_text.items()}
    if not scores:
        return RPCResult(None, {}, 0.0, list(pruned), None, params)

    best = max(scores.values())
    candidates = sorted(c for c, s in scores.items() if _tied(s, best))
    if len(candidates) > 1:
        top = max(log_sum[c] for c in candidates)
        candidates = [c for c in candidates if _tied(log_sum[c], top)]
    winner = candidates[0]
    representative = min(members[winner], key=lambda i: (-float(p[i]), i))
    total = sum(scores.values())
    confidence = scores[winner] / total if total > 0 else 0.0
    return RPCResult(winner, scores, confidence, list(pruned), representative, params)


# ---------------------------------------------------------------------------------------------
# DeepConf confidences
# ---------------------------------------------------------------------------------------------


def token_confidence(top_logprobs: Sequence[Sequence[float]], k: int = 20) -> np.ndarray:
    """Per-token confidence ``C_i = -mean(top-k log-probs at position i)``.

    At most *k* entries (the largest) are used per position, so a sampled token returned in
    addition to the top k does not change the value. Non-finite log-probs are ignored; a
    position with no usable entry gets confidence 0.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    if len(top_logprobs) == 0:
        return np.zeros(0, dtype=float)
    try:
        grid = np.asarray(top_logprobs, dtype=float)
    except ValueError:  # ragged rows
        grid = None
    if grid is not None and grid.ndim == 2 and grid.shape[1] > 0 and np.isfinite(grid).all():
        if grid.shape[1] > k:
            grid = np.partition(grid, grid.shape[1] - k, axis=1)[:, grid.shape[1] - k :]
        conf: np.ndarray = -grid.mean(axis=1)
        return conf
    out = np.zeros(len(top_logprobs), dtype=float)
    for i, row in enumerate(top_logprobs):
        vals = np.asarray(row, dtype=float).reshape(-1)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            continue
        if vals.size > k:
            vals = np.partition(vals, vals.size - k)[vals.size - k :]
        out[i] = -float(vals.mean())
    return out


def candidate_confidence(top_logprobs: Sequence[Sequence[tuple[object, float]]], k: int = 20) -> np.ndarray:
    """:func:`token_confidence` of a candidate's ``top_logprobs`` rows of (token, log-prob)."""
    return token_confidence([[lp for _, lp in row] for row in top_logprobs], k=k)


def group_confidences(conf: Sequence[float] | np.ndarray, window: int = 2048) -> np.ndarray:
    """Means of every *window*-token sliding window (stride 1), computed with a cumulative sum.

    A trace shorter than the window gives the single mean over all its tokens; an empty trace
    gives an empty array.
    """
    if window < 1:
        raise ValueError("window must be at least 1")
    c = np.asarray(conf, dtype=float).reshape(-1)
    if c.size == 0:
        return np.zeros(0, dtype=float)
    if c.size < window:
        return np.array([float(c.mean())])
    csum = np.concatenate(([0.0], np.cumsum(c)))
    means: np.ndarray = (csum[window:] - csum[:-window]) / window
    return means


def lowest_group_confidence(conf: Sequence[float] | np.ndarray, window: int = 2048) -> float:
    """The minimum sliding-window mean (DeepConf ``min_conf``); 0 for an empty trace."""
    groups = group_confidences(conf, window)
    return float(groups.min()) if groups.size else 0.0


def bottom_fraction_confidence(conf: Sequence[float] | np.ndarray, window: int = 2048, fraction: float = 0.1) -> float:
    """Mean of the lowest *fraction* of window means (at least one window); 0 when empty."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must lie in (0, 1]")
    groups = group_confidences(conf, window)
    if groups.size == 0:
        return 0.0
    m = max(1, int(groups.size * fraction))
    return float(np.sort(groups)[:m].mean())


def tail_confidence(conf: Sequence[float] | np.ndarray, tail: int = 2048) -> float:
    """Mean confidence of the last *tail* tokens; 0 for an empty trace."""
    if tail < 1:
        raise ValueError("tail must be at least 1")
    c = np.asarray(conf, dtype=float).reshape(-1)
    return float(c[-tail:].mean()) if c.size else 0.0


def mean_confidence(conf: Sequence[float] | np.ndarray) -> float:
    """Mean confidence over all tokens; 0 for an empty trace."""
    c = np.asarray(conf, dtype=float).reshape(-1)
    return float(c.mean()) if c.size else 0.0


# ---------------------------------------------------------------------------------------------
# Adaptive-Consistency's Beta stopping probability
# ---------------------------------------------------------------------------------------------


def beta_stop_probability(a: float, b: float) -> float:
    """P(p1 > p2) when the top answer's share of the top two is Beta(a + 1, b + 1).

    Equals ``1 - I_0.5(a + 1, b + 1)`` with I the regularised incomplete beta function.
    """
    from scipy.special import betainc

    return float(1.0 - betainc(a + 1.0, b + 1.0, 0.5))


# ---------------------------------------------------------------------------------------------
# Multi-temperature voting
# ---------------------------------------------------------------------------------------------


def multi_temperature_exit(
    pools: Mapping[float, Sequence[int | None]],
    *,
    share: float = 0.8,
    min_per_temperature: int = 8,
) -> int | None:
    """Early-exit decision of multi-temperature voting.

    Returns the agreed cluster id when every temperature's pool holds at least
    *min_per_temperature* samples, each temperature's majority cluster has at least *share*
    of its answered samples (a tie for the majority is not confident), and all temperatures
    agree on that cluster; otherwise ``None``.
    """
    if not pools:
        return None
    agreed: int | None = None
    for _temperature, pool in sorted(pools.items(), key=lambda kv: kv[0]):
        if len(pool) < min_per_temperature:
            return None
        tally = Counter(c for c in pool if c is not None)
        answered = sum(tally.values())
        if answered == 0:
            return None
        ranked = tally.most_common(2)
        top_cluster, top_count = ranked[0]
        if len(ranked) > 1 and ranked[1][1] == top_count:
            return None
        if top_count / answered < share:
            return None
        if agreed is None:
            agreed = top_cluster
        elif agreed != top_cluster:
            return None
    return agreed
