"""From a run's records to metrics vs k, fits, budget recommendations and the budget profile.

Every metric at budget k uses all n recorded samples of a problem (expectation over uniformly
random k-subsets, :mod:`ttscale.eval.metrics`); k runs over the powers of two up to K, plus K.
Strategies: ``coverage`` (pass@k, an oracle upper bound), ``majority`` (plurality vote),
``verifier_best_of`` (highest verifier score), ``weighted`` (vote weighted by verifier score)
and ``rpc`` (perplexity consistency; with ``rpc_prune`` also reasoning pruning from 16 paths on,
which fits a mixture per subset and is slow; exact at k = K, a Monte Carlo mean over
``rpc_draws`` random k-subsets below; ``rpc_draws=0`` skips it) and ``logprob_best_of`` (the
answered sample of highest mean token log-prob: verifier-free best-of-k, exact like
``verifier_best_of``).

Budget profile (``profile.json``, read by the server's adaptive budget), schema version 1::

    {
      "version": 1,
      "model": str, "verifier": str | null, "dataset": str,
      "prompt": {"system": str | null, "template": str},   # the prompt format the curves were
                                         # measured with ({problem} marks the problem; see
                                         # ttscale.eval.prompts); requests in another format
                                         # may scale differently
      "k_max": int,                      # K of the run
      "tokens_per_sample": float,        # mean completion tokens per sample
      "prompt_tokens": float,            # mean prompt tokens per problem
      "cost_per_1k_tokens": float,       # cost of 1000 tokens / value of a correct answer
      "engine_s_per_token": float | null, # engine-seconds per generated token in the run (its
                                         # measured rate; null for runs without finishing times)
      "bucket_by": "level" | "pass1_quantile",
      "buckets": [{
        "name": str,                     # "level 3" or "bin 2"
        "key": int,                      # the level, or the bin (0 = easiest)
        "n_problems": int,
        "pass1": float,                  # mean single-sample accuracy in the bucket
        "pass1_range": [lo, hi],         # per-problem pass@1 span (how to place a new request)
        "curves": {"coverage": Fit, "majority": Fit, "verifier_best_of": Fit},
        "saturation": {"coverage": Fit, "majority": Fit, "verifier_best_of": Fit},  # TTSPM fits
        "points": {"k": [...], "coverage": [...], "majority": [...], "verifier_best_of": [...],
                   "weighted": [...], "rpc": [...], "logprob_best_of": [...]},
        "verifier": {"tpr": float, "fpr": float, "auroc": float},
        "recommended": {
          "strategy": "majority" | "verifier_best_of",   # best expected utility
          "k": int,
          "expected_accuracy": float,
          "by_strategy": {"majority": {"k", "expected_accuracy", "utility"},
                          "verifier_best_of": {...}}
        }
      }, ...],
      "global": {same keys as a bucket, plus "flaws": {"completeness", "soundness",
                 "ceiling", "optimal_k": {"C=1": int, ...}}}
    }

``Fit`` is :meth:`ttscale.eval.fit.FitResult.to_dict` (rebuild with ``FitResult.from_dict`` and
call ``predict(k)``). The recommended k maximises ``accuracy(k) − cost_per_sample·k`` over
1..k_max with ``cost_per_sample = tokens_per_sample · cost_per_1k_tokens / 1000`` (fitted curve;
the measured points, interpolated in log k, when the fit's R² is below 0.9).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttscale.eval import fit as F
from ttscale.eval import metrics as M
from ttscale.eval.prompts import PromptFormat
from ttscale.eval.store import load_run

STRATEGIES = ("coverage", "majority", "verifier_best_of", "weighted", "rpc", "logprob_best_of")
SELECTORS = ("majority", "verifier_best_of")  # strategies with a profile recommendation
# the strategies that pick one answer of k (coverage is an upper bound, no selection)
SELECTING = ("majority", "verifier_best_of", "weighted", "rpc", "logprob_best_of")
LABELS = {
    "coverage": "coverage (pass@k)",
    "majority": "majority vote",
    "verifier_best_of": "verifier best-of-k",
    "weighted": "verifier-weighted vote",
    "rpc": "RPC (perplexity consistency)",
    "logprob_best_of": "best-of-k by mean log-prob (answered samples first)",
}
FLAWS_COSTS = (0.5, 1.0, 2.0, 4.0, 8.0)
FLAWS_PROFILE_KEYS = ("completeness", "soundness", "ceiling", "optimal_k")
# Reasoning pruning fits a two-component mixture to the paths' probabilities; on fewer paths
# than this the fit is both slow and unreliable, so smaller subsets are scored unpruned.
RPC_PRUNE_MIN_PATHS = 16
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class Problem:
    id: str
    level: Any
    subject: Any
    correct: np.ndarray
    clusters: list[Any]
    scores: np.ndarray | None
    mean_lp: np.ndarray
    tokens: np.ndarray
    latency: np.ndarray
    texts: list[str] | None
    prompt_tokens: int
    answered: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # an answer was extracted
    finish: list[str | None] = field(default_factory=list)  # finish reason per sample
    # answers of clusters that were split because their samples were graded differently
    split: list[list[str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.correct.size)


def _clusters(records: list[dict[str, Any]]) -> list[list[int | None]]:
    """Answer clusters of each record's samples: the problems at once over the math-verify
    workers (threads only wait on them), in record order."""
    from concurrent.futures import ThreadPoolExecutor

    from ttscale.answers import cluster_answers, symbolic_workers

    answers = [[x["answer"] for x in r["samples"]] for r in records]
    threads = min(symbolic_workers(), len(answers))
    if threads <= 1:
        return [cluster_answers(a) for a in answers]
    with ThreadPoolExecutor(threads, thread_name_prefix="ttscale-clusters") as pool:
        return list(pool.map(cluster_answers, answers))


def split_by_correctness(
    clusters: Sequence[int | None], correct: Sequence[bool], answers: Sequence[str | None]
) -> tuple[list[int | None], list[list[str]]]:
    """Clusters whose samples disagree on correctness split into their correct and their wrong
    part, renumbered 0, 1, 2, ... in order of first appearance; also the distinct answers of each
    cluster split. Equivalence is closed transitively, so one cluster can join answers that the
    grader tells apart (``0.5`` ≡ ``50\\%`` ≡ ``50`` against the gold ``50``); two answers graded
    differently are not the same answer, so they do not vote together."""
    verdicts: dict[int, set[bool]] = defaultdict(set)
    for c, ok in zip(clusters, correct, strict=True):
        if c is not None:
            verdicts[c].add(bool(ok))
    mixed = {c for c, v in verdicts.items() if len(v) > 1}
    if not mixed:
        return list(clusters), []
    ids: dict[tuple[int, bool | None], int] = {}
    out: list[int | None] = []
    for c, ok in zip(clusters, correct, strict=True):
        if c is None:
            out.append(None)
            continue
        key = (c, bool(ok) if c in mixed else None)
        out.append(ids.setdefault(key, len(ids)))
    split = [sorted({str(a) for cc, a in zip(clusters, answers, strict=True) if cc == c}) for c in sorted(mixed)]
    return out, split


def load_problems(records: list[dict[str, Any]]) -> list[Problem]:
    out = []
    for r, clusters in zip(records, _clusters(records), strict=True):
        s = r["samples"]
        correct = [bool(x["correct"]) for x in s]
        clusters, split = split_by_correctness(clusters, correct, [x["answer"] for x in s])
        scores = None
        if s and all(x.get("score") is not None for x in s):
            scores = np.array([x["score"] for x in s], dtype=np.float64)
        texts = [x["text"] for x in s] if s and all("text" in x for x in s) else None
        out.append(
            Problem(
                id=r["id"],
                level=r.get("level"),
                subject=r.get("subject"),
                correct=np.array(correct, dtype=bool),
                clusters=clusters,
                scores=scores,
                mean_lp=np.array([np.nan if x.get("mean_logprob") is None else x["mean_logprob"] for x in s]),
                tokens=np.array([x["tokens"] for x in s], dtype=np.float64),
                latency=np.array([x.get("latency_s") or 0.0 for x in s], dtype=np.float64),
                texts=texts,
                prompt_tokens=int(r.get("prompt_tokens") or 0),
                answered=np.array([x["answer"] is not None for x in s], dtype=bool),
                finish=[x.get("finish") for x in s],
                split=split,
            )
        )
    return out


def budgets(k_max: int) -> list[int]:
    ks = [1 << i for i in range(int(math.log2(k_max)) + 1)]
    if ks[-1] != k_max:
        ks.append(k_max)
    return ks


# --------------------------------------------------------------------------------------------
# Per-problem values
# --------------------------------------------------------------------------------------------


def _rpc_at_k(p: Problem, k: int, draws: int, rng: np.random.Generator, prune: bool = False) -> float:
    from ttscale.selection import rpc

    n = p.n
    flags: defaultdict[Any, bool] = defaultdict(bool)
    for cid, ok in zip(p.clusters, p.correct):
        if cid is not None:
            flags[cid] = flags[cid] or bool(ok)
    if k == 1:
        return float(np.mean([c is not None and flags[c] for c in p.clusters]))
    texts = p.texts or [str(i) for i in range(n)]
    lp = np.nan_to_num(p.mean_lp, nan=-np.inf)
    subsets = [np.arange(n)] if k >= n else [rng.choice(n, size=k, replace=False) for _ in range(draws)]
    vals = []
    for idx in subsets:
        res = rpc(
            [p.clusters[i] for i in idx],
            lp[idx].tolist(),
            [texts[i] for i in idx],
            prune=prune and k >= RPC_PRUNE_MIN_PATHS,
        )
        vals.append(1.0 if res.winner is not None and flags[res.winner] else 0.0)
    return float(np.mean(vals))


def per_problem_values(
    probs: list[Problem],
    ks: list[int],
    *,
    rpc_draws: int = 2,
    rpc_prune: bool = False,
    weighted_mc: int = 500,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{strategy: array [problems, len(ks)]}`` (verifier strategies only with scores)."""
    P, nk = len(probs), len(ks)
    out = {s: np.full((P, nk), np.nan) for s in STRATEGIES}
    rng = np.random.default_rng(seed)
    for i, p in enumerate(probs):
        c = int(p.correct.sum())
        kk = [min(k, p.n) for k in ks]
        out["coverage"][i] = [M.pass_at_k(p.n, c, k) for k in kk]
        out["majority"][i] = [M.majority_at_k(p.clusters, p.correct, k, seed=seed) for k in kk]
        if p.scores is not None:
            out["verifier_best_of"][i] = M.best_of_k(p.scores, p.correct, np.array(kk))
            out["weighted"][i] = [
                M.weighted_majority_at_k(p.clusters, p.scores, p.correct, k, n_mc=weighted_mc, seed=seed) for k in kk
            ]
        if np.isfinite(p.mean_lp).any():
            if rpc_draws > 0:
                out["rpc"][i] = [_rpc_at_k(p, k, rpc_draws, rng, rpc_prune) for k in kk]
            # no verifier: of the samples that state an answer, the one the model found likeliest
            # per token (answerless ones, often cut-off loops of high likelihood, and ones without
            # tokens rank last)
            lp = p.mean_lp
            ok = np.isfinite(lp) & (p.answered if p.answered.size == lp.size else True)
            lp = np.where(ok, lp, np.nanmin(lp) - 1.0)
            out["logprob_best_of"][i] = M.best_of_k(lp, p.correct, np.array(kk))
    return {s: v for s, v in out.items() if not np.all(np.isnan(v))}


# --------------------------------------------------------------------------------------------
# Groups, fits and recommendations
# --------------------------------------------------------------------------------------------


def _ci_points(values: np.ndarray, n_boot: int) -> dict[str, list[float]]:
    mean, lo, hi = [], [], []
    for j in range(values.shape[1]):
        m, a, b = M.bootstrap_ci(values[:, j], n_boot=n_boot, seed=j)
        mean.append(m)
        lo.append(a)
        hi.append(b)
    return {"mean": mean, "lo": lo, "hi": hi}


def _fits(
    ks: list[int], pts: dict[str, list[float]], cov_full: np.ndarray, pass1: np.ndarray, rates: dict[str, float] | None
) -> tuple[dict[str, F.FitResult], dict[str, F.FitResult]]:
    curves: dict[str, F.FitResult] = {}
    sat: dict[str, F.FitResult] = {}
    kfull = np.arange(1, cov_full.size + 1)
    curves["coverage"] = F.fit_coverage_power_law(kfull, cov_full)
    sat["coverage"] = F.fit_saturating_exponential(ks, pts["coverage"])
    for s in SELECTORS:
        if s not in pts:
            continue
        kw: dict[str, Any] = {}
        if s == "verifier_best_of" and rates and all(math.isfinite(rates[x]) for x in ("tpr", "fpr")):
            kw = dict(r_per_problem=pass1, c=rates["tpr"], s=1.0 - rates["fpr"])
        curves[s] = F.fit_selected_accuracy_ceiling(ks, pts[s], **kw)
        sat[s] = F.fit_saturating_exponential(ks, pts[s])
    return curves, sat


FIT_TRUST_R2 = 0.9  # below this a fitted curve is not used to plan budgets


def _recommend(
    ks: list[int], pts: dict[str, list[float]], curves: dict[str, F.FitResult], cost_per_sample: float, k_max: int
) -> dict[str, Any]:
    """Best k per selector on accuracy(k) − cost·k: the fitted curve where it fits well
    (R² >= 0.9), else the measured points interpolated linearly in log k."""
    by: dict[str, Any] = {}
    kk = np.arange(1, k_max + 1)
    for s in SELECTORS:
        if s not in pts:
            continue
        f = curves.get(s)
        if f is not None and f.fittable and math.isfinite(f.r2) and f.r2 >= FIT_TRUST_R2:
            acc = np.clip(f.predict(kk), 0.0, 1.0)
            src = "fit"
        else:
            acc = np.interp(np.log(kk), np.log(ks), pts[s])
            src = "points"
        acc[0] = pts[s][0]  # k = 1 is one sample for every selector: the measured pass@1
        u = acc - cost_per_sample * kk
        j = int(np.flatnonzero(u >= u.max() - 1e-12)[0])
        by[s] = {"k": int(kk[j]), "expected_accuracy": float(acc[j]), "utility": float(u[j]), "source": src}
    if not by:
        return {}
    best = max(by, key=lambda s: (round(by[s]["utility"], 9), s == "majority"))
    return {"strategy": best, "k": by[best]["k"], "expected_accuracy": by[best]["expected_accuracy"], "by_strategy": by}


def _verifier_stats(probs: list[Problem]) -> dict[str, float] | None:
    if not probs or any(p.scores is None for p in probs):
        return None
    s = np.concatenate([p.scores for p in probs])
    y = np.concatenate([p.correct for p in probs])
    r = M.verifier_rates(s, y, 0.5)
    return {
        "tpr": r["tpr"],
        "fpr": r["fpr"],
        "precision": r["precision"],
        "accept_rate": r["accept_rate"],
        "auroc": M.auroc(s, y),
    }


@dataclass
class Group:
    name: str
    key: Any
    idx: np.ndarray
    pass1: np.ndarray
    points: dict[str, dict[str, list[float]]]
    curves: dict[str, F.FitResult]
    saturation: dict[str, F.FitResult]
    verifier: dict[str, float] | None
    recommended: dict[str, Any]
    flaws: dict[str, Any] | None = None

    def to_profile(self, ks: list[int]) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "key": self.key,
            "n_problems": int(self.idx.size),
            "pass1": float(self.pass1.mean()),
            "pass1_range": [float(self.pass1.min()), float(self.pass1.max())],
            "curves": {s: f.to_dict() for s, f in self.curves.items()},
            "saturation": {s: {**f.to_dict(), "n_star_eps_1e-3": _sat(f, 1e-3)} for s, f in self.saturation.items()},
            "points": {"k": list(ks), **{s: v["mean"] for s, v in self.points.items()}},
            "verifier": self.verifier,
            "recommended": self.recommended,
        }
        if self.flaws is not None:
            d["flaws"] = {k: v for k, v in self.flaws.items() if k in FLAWS_PROFILE_KEYS}
        return d


def _sat(f: F.FitResult, eps: float) -> int | None:
    try:
        return f.saturation(eps) if f.fittable and f.params["F_max"] > 0 else None
    except ValueError:
        return None


def _flaws(pass1: np.ndarray, rates: dict[str, float] | None, k_max: int) -> dict[str, Any] | None:
    if rates is None or not all(math.isfinite(rates[x]) for x in ("tpr", "fpr")):
        return None
    c, s = rates["tpr"], 1.0 - rates["fpr"]
    ceil = np.nan_to_num(F.flaws_ceiling(pass1, c, s), nan=0.0)
    pi = np.ones_like(pass1)
    kk = np.arange(0, k_max + 1)
    curve = np.mean(F.flaws_accuracy(pass1[None, :], c, s, kk[:, None]), axis=1)
    fp = np.mean(F.flaws_fp(pass1[None, :], c, s, kk[:, None]), axis=1)
    return {
        "completeness": c,
        "soundness": s,
        "ceiling": float(np.mean(ceil)),
        "optimal_k": {f"C={C:g}": F.flaws_optimal_k(pass1, pi, c, s, C, K_max=k_max) for C in FLAWS_COSTS},
        "expected_utility": {
            f"C={C:g}": F.flaws_expected_utility(pass1, pi, c, s, C, k_max).tolist() for C in FLAWS_COSTS
        },
        "accuracy_curve": curve.tolist(),
        "fp_curve": fp.tolist(),
    }


@dataclass
class Analysis:
    manifest: dict[str, Any]
    probs: list[Problem]
    ks: list[int]
    k_max: int
    values: dict[str, np.ndarray]
    coverage_full: np.ndarray  # [problems, k_max]
    tokens_per_sample: float
    prompt_tokens: float
    cost_per_1k_tokens: float
    global_: Group
    buckets: list[Group]
    bucket_by: str
    levels: dict[str, dict[Any, tuple[float, float, float, int]]]
    subjects: dict[str, dict[Any, tuple[float, float, float, int]]]
    targets: dict[str, list[dict[str, Any]]]
    latency_at_k: list[float]
    extraction: dict[str, Any] = field(default_factory=dict)  # extraction_summary()
    holdout: dict[str, Any] = field(default_factory=dict)  # holdout_check()
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    engine_s_per_token: float | None = None  # engine_seconds_per_token()

    @property
    def prompt(self) -> PromptFormat:
        """The run's prompt format (runs recorded before formats were recorded: the plain one)."""
        return PromptFormat.from_dict(self.manifest.get("prompt"))

    @property
    def cost_per_sample(self) -> float:
        return self.tokens_per_sample * self.cost_per_1k_tokens / 1000.0

    def profile(self) -> dict[str, Any]:
        m = self.manifest
        out: dict[str, Any] = _clean(
            {
                "version": 1,
                "model": m.get("model"),
                "verifier": m.get("verifier"),
                "dataset": m.get("dataset"),
                "prompt": self.prompt.to_dict(),
                "k_max": self.k_max,
                "tokens_per_sample": self.tokens_per_sample,
                "prompt_tokens": self.prompt_tokens,
                "cost_per_1k_tokens": self.cost_per_1k_tokens,
                "engine_s_per_token": self.engine_s_per_token,
                "bucket_by": self.bucket_by,
                "n_problems": len(self.probs),
                "sampling": m.get("sampling"),
                "generated": time.strftime("%Y-%m-%d"),
                "buckets": [b.to_profile(self.ks) for b in self.buckets],
                "global": self.global_.to_profile(self.ks),
            }
        )
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = _clean(
            {
                "manifest": self.manifest,
                "ks": self.ks,
                "n_problems": len(self.probs),
                "points": {s: self.global_.points[s] for s in self.global_.points},
                "levels": {s: {str(k): v for k, v in d.items()} for s, d in self.levels.items()},
                "subjects": {s: {str(k): v for k, v in d.items()} for s, d in self.subjects.items()},
                "targets": self.targets,
                "latency_at_k": self.latency_at_k,
                "extraction": self.extraction,
                "holdout": self.holdout,
                "profile": self.profile(),
            }
        )
        return out


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _group(
    name: str,
    key: Any,
    idx: np.ndarray,
    an_values: dict[str, np.ndarray],
    cov_full: np.ndarray,
    probs: list[Problem],
    ks: list[int],
    n_boot: int,
    cost_per_sample: float,
    k_max: int,
    with_flaws: bool = False,
) -> Group:
    vals = {s: v[idx] for s, v in an_values.items()}
    pts = {s: _ci_points(v, n_boot) for s, v in vals.items()}
    means = {s: v["mean"] for s, v in pts.items()}
    pass1 = vals["coverage"][:, 0]
    sub = [probs[i] for i in idx]
    rates = _verifier_stats(sub)
    curves, sat = _fits(ks, means, cov_full[idx].mean(axis=0), pass1, rates)
    rec = _recommend(ks, means, curves, cost_per_sample, k_max)
    g = Group(name, key, idx, pass1, pts, curves, sat, rates, rec)
    if with_flaws:
        g.flaws = _flaws(pass1, rates, max(200, k_max))
    return g


def analyse_run(
    run_dir: str | Path,
    *,
    cost_per_1k_tokens: float = 0.05,
    n_boot: int = 1000,
    rpc_draws: int = 2,
    rpc_prune: bool = False,
    n_bins: int = 5,
) -> Analysis:
    t0 = time.perf_counter()
    manifest, records = load_run(run_dir)
    if not records:
        raise ValueError(f"{run_dir} has no finished problems yet")
    probs = load_problems(records)
    k_max = min(p.n for p in probs)
    ks = budgets(k_max)
    values = per_problem_values(probs, ks, rpc_draws=rpc_draws, rpc_prune=rpc_prune)
    cov_full = np.array([[M.pass_at_k(p.n, int(p.correct.sum()), k) for k in range(1, k_max + 1)] for p in probs])
    toks = np.concatenate([p.tokens for p in probs])
    tps = float(toks.mean())
    cps = tps * cost_per_1k_tokens / 1000.0
    all_idx = np.arange(len(probs))
    glob = _group("all", None, all_idx, values, cov_full, probs, ks, n_boot, cps, k_max, with_flaws=True)
    has_levels = all(p.level is not None for p in probs)
    buckets: list[Group] = []
    if has_levels:
        bucket_by = "level"
        levels = np.array([p.level for p in probs], dtype=object)
        for lv in sorted(set(levels.tolist())):
            idx = np.flatnonzero(levels == lv)
            buckets.append(
                _group(f"level {lv}", lv, idx, values, cov_full, probs, ks, n_boot, cps, k_max, with_flaws=True)
            )
    else:
        bucket_by = "pass1_quantile"
        bins = F.difficulty_bins(values["coverage"][:, 0], n_bins)
        for b in range(n_bins):
            idx = np.flatnonzero(bins == b)
            if idx.size:
                buckets.append(
                    _group(f"bin {b}", b, idx, values, cov_full, probs, ks, n_boot, cps, k_max, with_flaws=True)
                )
    # Per level / subject accuracy tables (k = 1 and k = K).
    levels_tab: dict[str, dict[Any, tuple[float, float, float, int]]] = {}
    subjects_tab: dict[str, dict[Any, tuple[float, float, float, int]]] = {}
    jK = len(ks) - 1
    cols = {"pass@1": values["coverage"][:, 0], f"pass@{k_max}": values["coverage"][:, jK]}
    for s in SELECTING:
        if s in values:
            cols[f"{s}@{k_max}"] = values[s][:, jK]
    if has_levels:
        g = [p.level for p in probs]
        levels_tab = {c: M.by_group(v, g, n_boot=n_boot) for c, v in cols.items()}
    if all(p.subject is not None for p in probs):
        g = [p.subject for p in probs]
        subjects_tab = {c: M.by_group(v, g, n_boot=n_boot) for c, v in cols.items()}
    # Expected wall time of a k-sample fan-out: E[max latency of k samples] (exact order statistic).
    lat = np.array([expected_max(p.latency[:k_max], k_max) for p in probs]).mean(axis=0)
    spt = engine_seconds_per_token(records)
    targets = _targets(glob, k_max, tps, float(np.mean([p.prompt_tokens for p in probs])), lat, cost_per_1k_tokens, spt)
    an = Analysis(
        manifest=manifest,
        probs=probs,
        ks=ks,
        k_max=k_max,
        values=values,
        coverage_full=cov_full,
        tokens_per_sample=tps,
        prompt_tokens=float(np.mean([p.prompt_tokens for p in probs])),
        cost_per_1k_tokens=cost_per_1k_tokens,
        global_=glob,
        buckets=buckets,
        bucket_by=bucket_by,
        levels=levels_tab,
        subjects=subjects_tab,
        targets=targets,
        engine_s_per_token=spt,
        latency_at_k=lat.tolist(),
        extraction=extraction_summary(probs),
        holdout=holdout_check(
            probs,
            values,
            cov_full,
            ks,
            cost_per_1k_tokens=cost_per_1k_tokens,
            k_max=k_max,
            by_level=has_levels,
            n_bins=n_bins,
            n_boot=n_boot,
        ),
    )
    if "rpc" in values and not rpc_prune:
        an.notes.append("RPC here is perplexity consistency without reasoning pruning (`--rpc-prune` adds it)")
    if manifest.get("n_problems") and len(probs) < manifest["n_problems"]:
        an.notes.append(f"{len(probs)} of {manifest['n_problems']} problems recorded (run incomplete)")
    an.elapsed_s = time.perf_counter() - t0
    return an


def fit_half(ids: list[str]) -> np.ndarray:
    """The deterministic half split of the held-out check: True where a problem's id hashes to the
    fit half (low bit of its 8-byte BLAKE2b digest is 0), False for the held-out half. Depends on
    the id alone, not on the order or on the other problems."""
    return np.array([hashlib.blake2b(i.encode(), digest_size=8).digest()[-1] & 1 == 0 for i in ids], dtype=bool)


def realised_accuracy(p: Problem, strategy: str, k: int) -> float:
    """Expected accuracy of ``strategy`` at budget ``k`` on one problem's recorded samples
    (uniformly random k-subsets, as every metric here)."""
    k = min(int(k), p.n)
    if strategy == "majority":
        return M.majority_at_k(p.clusters, p.correct, k, seed=0)
    if strategy == "verifier_best_of":
        if p.scores is None:
            raise ValueError(f"problem {p.id} has no verifier scores")
        return float(np.asarray(M.best_of_k(p.scores, p.correct, np.array([k])))[0])
    if strategy == "coverage":
        return M.pass_at_k(p.n, int(p.correct.sum()), k)
    raise ValueError(f"no realised accuracy for strategy {strategy!r}")


def holdout_check(
    probs: list[Problem],
    values: dict[str, np.ndarray],
    cov_full: np.ndarray,
    ks: list[int],
    *,
    cost_per_1k_tokens: float,
    k_max: int,
    by_level: bool,
    n_bins: int = 5,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Plan on one half of the problems, check on the other.

    The problems split by :func:`fit_half`. On the fit half, buckets (levels, or pass@1 quantile
    bins of the fit half) get their curves and their recommended strategy and k exactly as the
    profile's buckets do (:func:`_recommend`; the cost per sample from the fit half's tokens):
    the plans a report of the fit half alone would make. Each held-out problem goes to its level's bucket,
    or to the bucket with the nearest mean pass@1 (its pass@1 from all its samples: how the server
    places a request by its estimated pass@1, with the estimate exact here). The check reports,
    per bucket, the accuracy the fit half predicts for its recommendation and the accuracy that
    recommendation realises on the held-out problems of the bucket (mean [95% bootstrap CI]).
    """
    fit = fit_half([p.id for p in probs])
    fit_idx, test_idx = np.flatnonzero(fit), np.flatnonzero(~fit)
    out: dict[str, Any] = {
        "split": "blake2b(id) low bit: 0 = fit half, 1 = held out",
        "n_fit": int(fit_idx.size),
        "n_heldout": int(test_idx.size),
        "buckets": [],
    }
    if fit_idx.size == 0 or test_idx.size == 0:
        out["note"] = "one half is empty: no check"
        return out
    pass1 = values["coverage"][:, 0]
    # the cost per sample from the fit half's tokens too: the plans are what that half alone gives
    cost_per_sample = float(np.concatenate([probs[i].tokens for i in fit_idx]).mean()) * cost_per_1k_tokens / 1000.0
    if by_level:
        lv = np.array([p.level for p in probs], dtype=object)
        groups = [(f"level {x}", np.flatnonzero(fit & (lv == x))) for x in sorted(set(lv[fit_idx].tolist()))]
    else:
        bins = F.difficulty_bins(pass1[fit_idx], n_bins)
        groups = [(f"bin {b}", fit_idx[bins == b]) for b in range(n_bins) if np.any(bins == b)]
    plans = []
    for name, idx in groups:
        means = {s: v[idx].mean(axis=0).tolist() for s, v in values.items()}
        curves, _ = _fits(ks, means, cov_full[idx].mean(axis=0), pass1[idx], _verifier_stats([probs[i] for i in idx]))
        plans.append((name, idx, _recommend(ks, means, curves, cost_per_sample, k_max)))
    # place each held-out problem
    if by_level:
        where = {name: [i for i in test_idx if f"level {probs[i].level}" == name] for name, _, _ in plans}
    else:
        centres = np.array([pass1[idx].mean() for _, idx, _ in plans])
        nearest = np.abs(pass1[test_idx][:, None] - centres[None, :]).argmin(axis=1)
        where = {plans[j][0]: [int(i) for i, b in zip(test_idx, nearest) if b == j] for j in range(len(plans))}
    all_pred: list[float] = []
    all_real: list[float] = []
    all_k: list[int] = []
    for j, (name, idx, rec) in enumerate(plans):
        held = where[name]
        row: dict[str, Any] = {"name": name, "n_fit": int(idx.size), "n_heldout": len(held)}
        if rec:
            row.update(strategy=rec["strategy"], k=rec["k"], predicted=rec["expected_accuracy"])
        if rec and held:
            real = np.array([realised_accuracy(probs[i], rec["strategy"], rec["k"]) for i in held])
            m, lo, hi = M.bootstrap_ci(real, n_boot=n_boot, seed=j)
            row.update(realised=m, realised_lo=lo, realised_hi=hi, difference=m - rec["expected_accuracy"])
            all_pred += [rec["expected_accuracy"]] * len(held)
            all_real += real.tolist()
            all_k += [rec["k"]] * len(held)
        out["buckets"].append(row)
    if all_real:
        m, lo, hi = M.bootstrap_ci(np.array(all_real), n_boot=n_boot, seed=len(plans))
        out["all"] = {
            "n_heldout": len(all_real),
            "predicted": float(np.mean(all_pred)),
            "realised": m,
            "realised_lo": lo,
            "realised_hi": hi,
            "difference": m - float(np.mean(all_pred)),
            "mean_k": float(np.mean(all_k)),
        }
    return out


EXTRACTION_EXAMPLES = 5  # answerless samples shown in the report
EXAMPLE_HEAD, EXAMPLE_TAIL = 200, 400  # characters kept of an example's start and end


def extraction_summary(probs: list[Problem], n_examples: int = EXTRACTION_EXAMPLES) -> dict[str, Any]:
    """How often no answer was extracted (answerless samples: they do not vote), how many of those
    were cut at ``max_tokens`` (finish ``length``), per level when there are levels, and a few
    examples: the first answerless sample of each of the first ``n_examples`` problems that have
    one (record order), their text shortened to its first 200 and last 400 characters."""
    n = sum(p.n for p in probs)
    none = [(p, i) for p in probs for i in np.flatnonzero(~p.answered)]
    out: dict[str, Any] = {
        "samples": n,
        "answerless": len(none),
        "rate": len(none) / n if n else float("nan"),
        "answerless_cut_at_max_tokens": sum(p.finish[i] == "length" for p, i in none),
        "problems_with_answerless": len({p.id for p, _ in none}),
    }
    if probs and all(p.level is not None for p in probs):
        by: dict[Any, list[int]] = {}
        for p in probs:
            acc = by.setdefault(p.level, [0, 0])
            acc[0] += int((~p.answered).sum())
            acc[1] += p.n
        out["by_level"] = {lv: {"answerless": a, "samples": t, "rate": a / t} for lv, (a, t) in sorted(by.items())}
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p, i in none:
        if len(examples) >= n_examples:
            break
        if p.id in seen:
            continue
        seen.add(p.id)
        examples.append(
            {
                "id": p.id,
                "i": int(i),
                "finish": p.finish[i],
                "tokens": int(p.tokens[i]),
                "text": None if p.texts is None else shorten(p.texts[i]),
            }
        )
    out["examples"] = examples
    out["split_clusters"] = [{"id": p.id, "answers": a} for p in probs for a in p.split]
    return out


def shorten(text: str, head: int = EXAMPLE_HEAD, tail: int = EXAMPLE_TAIL) -> str:
    """``text`` itself when short, else its first ``head`` and last ``tail`` characters around
    a marker saying how many were left out."""
    if len(text) <= head + tail + 40:
        return text
    return f"{text[:head]} […{len(text) - head - tail} characters…] {text[-tail:]}"


def expected_max(x: np.ndarray, k_max: int) -> np.ndarray:
    """E[max of a uniformly random k-subset of x] for k = 1..k_max (exact order statistics):
    the j-th smallest of n values is the maximum with probability C(j−1, k−1)/C(n, k)."""
    from scipy.special import gammaln

    v = np.sort(np.asarray(x, dtype=np.float64))
    n = v.size
    j = np.arange(1, n + 1)[None, :]
    k = np.arange(1, k_max + 1)[:, None]
    with np.errstate(invalid="ignore"):
        logw = (gammaln(j) - gammaln(k) - gammaln(j - k + 1)) - (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))
    w = np.where(j >= k, np.exp(np.where(j >= k, logw, 0.0)), 0.0)
    return w @ v


def engine_seconds_per_token(records: Sequence[dict[str, Any]]) -> float | None:
    """Seconds of the run's engine per generated token: the length of the union of the problems'
    in-flight intervals ``[finished_at - wall_s, finished_at]`` (pauses between resumed sessions
    fall out) over the tokens those problems generated. None for runs recorded without
    ``finished_at``. On a GPU shared by several engines it is the time of this run's share."""
    spans, tokens = [], 0
    for r in records:
        end, wall = r.get("finished_at"), r.get("wall_s")
        if end is None or wall is None:
            return None
        spans.append((float(end) - float(wall), float(end)))
        tokens += sum(int(x.get("tokens") or 0) for x in r.get("samples", []))
    if not spans or tokens <= 0:
        return None
    spans.sort()
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo, hi = busy + hi - lo, a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    return busy / tokens


def _targets(
    g: Group,
    k_max: int,
    tps: float,
    prompt: float,
    lat: np.ndarray,
    cost_per_1k: float,
    s_per_token: float | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Smallest k reaching each target accuracy (fitted curve on 1..k_max) and its cost."""
    out: dict[str, list[dict[str, Any]]] = {}
    kk = np.arange(1, k_max + 1)
    for s in ("coverage", *SELECTORS):
        f = g.curves.get(s)
        if f is None or not f.fittable:
            continue
        acc = np.clip(f.predict(kk), 0, 1)
        rows = []
        for t in TARGETS:
            hit = np.flatnonzero(acc >= t)
            if hit.size == 0:
                rows.append({"target": t, "k": None})
                continue
            k = int(kk[hit[0]])
            tokens = prompt + k * tps
            rows.append(
                {
                    "target": t,
                    "k": k,
                    "tokens": tokens,
                    "latency_s": float(lat[k - 1]),
                    # engine-seconds of the k completions at the run's measured throughput
                    "gpu_s": None if s_per_token is None else k * tps * s_per_token,
                    "cost": tokens / 1000.0 * cost_per_1k,
                }
            )
        out[s] = rows
    return out


def summary_lines(an: Analysis) -> list[str]:
    g = an.global_
    lines = [
        f"{an.manifest.get('model')} on {an.manifest.get('dataset')}: {len(an.probs)} problems, "
        f"K={an.k_max}, {an.tokens_per_sample:.1f} tokens/sample"
    ]
    ex = an.extraction
    if ex:
        lines.append(
            f"  no answer extracted: {ex['answerless']} of {ex['samples']} samples ({100 * ex['rate']:.1f}%), "
            f"{ex['answerless_cut_at_max_tokens']} of them cut at max_tokens"
        )
    for s, v in g.points.items():
        lines.append(f"  {s:<17} " + "  ".join(f"k={k}:{m:.3f}" for k, m in zip(an.ks, v["mean"])))
    for s, f in g.curves.items():
        ps = ", ".join(f"{k}={v:.4g}±{f.stderr[k]:.2g}" for k, v in f.params.items()) if f.fittable else f.reason
        ci = f.ci.get("A_inf")
        trust = "" if ci is None else f"  A_inf 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"
        if f.issues:
            trust += "  not trustworthy: " + "; ".join(f.issues)
        lines.append(f"  fit {s:<13} {f.name}: {ps}  R2={f.r2:.4f}{trust}")
    if g.flaws:
        lines.append(
            f"  fLaws: TPR={g.flaws['completeness']:.3f} FPR={1 - g.flaws['soundness']:.3f} "
            f"ceiling={g.flaws['ceiling']:.3f} optimal K {g.flaws['optimal_k']}"
        )
    for b in an.buckets:
        r = b.recommended
        if r:
            lines.append(
                f"  {b.name:<8} pass@1={b.pass1.mean():.3f} → {r['strategy']} k={r['k']} "
                f"(acc≈{r['expected_accuracy']:.3f})"
            )
    return lines
