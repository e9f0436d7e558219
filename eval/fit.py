"""Scaling-curve fits and budget models.

Fits return a :class:`FitResult`: parameters with standard errors, goodness of fit, a
``predict(k)`` method and a JSON-serialisable dict form (budget profiles store these).

* coverage vs k: :func:`fit_coverage_power_law` (exponentiated power law, ``c(k) = exp(a·k^b)``);
* selected accuracy vs k: :func:`fit_selected_accuracy_ceiling` (saturating power law with an
  asymptote ``A_inf``);
* saturating exponential ``F(N) = F_max·(1 − (1 − p)^N)``: :func:`fit_saturating_exponential`,
  :func:`saturation_point`;
* verifier-limited resampling (completeness/soundness model): :func:`flaws_accuracy`,
  :func:`flaws_fp`, :func:`flaws_abstain`, :func:`flaws_ceiling`, :func:`flaws_expected_utility`,
  :func:`flaws_optimal_k`;
* :func:`difficulty_bins` (quantile bins of per-problem pass@1) and :func:`recommend_k`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from ttscale.curves import MODELS, ArrayLike, FitResult, saturating_exp, saturating_power, saturation_point

__all__ = [
    "MODELS",
    "FitResult",
    "difficulty_bins",
    "fit_coverage_power_law",
    "fit_saturating_exponential",
    "fit_selected_accuracy_ceiling",
    "flaws_abstain",
    "flaws_accuracy",
    "flaws_ceiling",
    "flaws_expected_utility",
    "flaws_fp",
    "flaws_optimal_k",
    "recommend_k",
    "saturation_point",
]


def _unfittable(name: str, reason: str, n_points: int, **extra: Any) -> FitResult:
    names = MODELS[name][0]
    nan = float("nan")
    return FitResult(
        name=name,
        params={p: nan for p in names},
        stderr={p: nan for p in names},
        r2=nan,
        rmse=nan,
        n_points=n_points,
        fittable=False,
        reason=reason,
        extra=dict(extra),
    )


def _goodness(y: np.ndarray, yhat: np.ndarray) -> tuple[float, float]:
    resid = y - yhat
    ss_res = float(np.sum(resid**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))
    return r2, math.sqrt(ss_res / y.size)


def _stderr_from_cov(cov: np.ndarray | None, names: Sequence[str]) -> dict[str, float]:
    if cov is None or not np.all(np.isfinite(cov)):
        return {p: float("nan") for p in names}
    diag = np.diag(cov)
    return {p: float(math.sqrt(v)) if v >= 0 else float("nan") for p, v in zip(names, diag)}


def _clean_xy(ks: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(ks, dtype=np.float64).ravel()
    v = np.asarray(y, dtype=np.float64).ravel()
    if k.shape != v.shape:
        raise ValueError(f"ks and values differ in length: {k.size} vs {v.size}")
    keep = np.isfinite(k) & np.isfinite(v)
    k, v = k[keep], v[keep]
    if np.any(k <= 0):
        raise ValueError("budgets k must be positive")
    # Average duplicate budgets so each k is one point.
    uk, inv = np.unique(k, return_inverse=True)
    uv = np.bincount(inv, weights=v) / np.bincount(inv)
    return uk, uv


# --------------------------------------------------------------------------------------------
# Coverage: exponentiated power law
# --------------------------------------------------------------------------------------------


def _log_spaced_subset(k: np.ndarray, n_grid: int) -> np.ndarray:
    """Indices of the points nearest (in log k) to ``n_grid`` log-spaced integer budgets."""
    if k.size <= n_grid:
        return np.arange(k.size)
    grid = np.unique(np.round(np.logspace(np.log10(k.min()), np.log10(k.max()), n_grid)))
    logk = np.log(k)
    idx = np.abs(np.log(grid)[:, None] - logk[None, :]).argmin(axis=1)
    return np.unique(idx)


def fit_coverage_power_law(ks: ArrayLike, coverage: ArrayLike, *, n_grid: int = 40) -> FitResult:
    """Fit ``log c(k) = a·k^b`` (so ``c(k) = exp(a·k^b)``, a < 0, b < 0 for rising coverage).

    Procedure:

    1. When more than ``n_grid`` (40) budgets are given, keep the points nearest to ``n_grid``
       log-spaced integer budgets over [min k, max k] (unique after rounding; with a full curve
       k = 1..n these are exactly the grid budgets in [1, n]).
    2. Drop points with c = 0 or c = 1 (log or log(−log) undefined). Fewer than 3 left → not
       fittable.
    3. Initial guess from the OLS fit ``log(−log c) = log(−a) + b·log k``: ``a₀ = −exp(intercept)``,
       ``b₀ = slope``.
    4. ``scipy.optimize.curve_fit`` (Levenberg–Marquardt) of ``a·k^b`` to ``log c``: residuals in
       log-coverage space. If it fails, the OLS estimate is returned (``extra["method"]`` says
       which; the OLS stderr of a uses the delta method).

    ``r2`` and ``rmse`` are in log-coverage space; ``extra["rmse_coverage"]`` is the RMSE of
    ``predict`` against coverage itself. ``predict(k)`` returns ``exp(a·k^b)``.
    """
    name = "coverage_power_law"
    k, c = _clean_xy(ks, coverage)
    sel = _log_spaced_subset(k, n_grid)
    k, c = k[sel], c[sel]
    if np.any((c < 0) | (c > 1)):
        raise ValueError("coverage values must lie in [0, 1]")
    keep = (c > 0) & (c < 1)
    k, c = k[keep], c[keep]
    if k.size < 3:
        return _unfittable(name, f"{k.size} points with 0 < coverage < 1 (need >= 3)", int(k.size))
    y = np.log(c)
    X = np.log(k)
    Z = np.log(-y)
    slope, intercept = np.polyfit(X, Z, 1)
    a0, b0 = -math.exp(intercept), float(slope)
    method = "curve_fit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov = curve_fit(lambda kk, a, b: a * np.power(kk, b), k, y, p0=(a0, b0), maxfev=20000)
        if not np.all(np.isfinite(popt)):
            raise RuntimeError("non-finite parameters")
        a, b = float(popt[0]), float(popt[1])
        stderr = _stderr_from_cov(pcov, ("a", "b"))
    except (RuntimeError, ValueError):
        method = "ols_fallback"
        a, b = a0, b0
        stderr = _ols_stderr(X, Z, a)
    yhat = a * np.power(k, b)
    r2, rmse = _goodness(y, yhat)
    rmse_c = float(np.sqrt(np.mean((np.exp(yhat) - c) ** 2)))
    return FitResult(
        name=name,
        params={"a": a, "b": b},
        stderr=stderr,
        r2=r2,
        rmse=rmse,
        n_points=int(k.size),
        extra={
            "method": method,
            "space": "log_coverage",
            "rmse_coverage": rmse_c,
            "k_min": float(k.min()),
            "k_max": float(k.max()),
        },
    )


def _ols_stderr(X: np.ndarray, Z: np.ndarray, a: float) -> dict[str, float]:
    n = X.size
    if n <= 2:
        return {"a": float("nan"), "b": float("nan")}
    A = np.stack([np.ones_like(X), X], axis=1)
    coef, *_ = np.linalg.lstsq(A, Z, rcond=None)
    resid = Z - A @ coef
    s2 = float(resid @ resid) / (n - 2)
    cov = s2 * np.linalg.inv(A.T @ A)
    se_int, se_slope = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    return {"a": abs(a) * se_int, "b": se_slope}


# --------------------------------------------------------------------------------------------
# Saturating fits
# --------------------------------------------------------------------------------------------


def _profile_fit(
    k: np.ndarray, y: np.ndarray, basis: Callable[[np.ndarray, float], np.ndarray], grid: np.ndarray
) -> tuple[float, np.ndarray, float]:
    """Grid over the nonlinear parameter θ; for each θ, linear least squares on basis(k, θ)."""
    best = (float("nan"), np.full(1, np.nan), float("inf"))
    for theta in grid:
        A = basis(k, float(theta))
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        sse = float(np.sum((A @ coef - y) ** 2))
        if sse < best[2]:
            best = (float(theta), coef, sse)
    return best


def fit_selected_accuracy_ceiling(
    ks: ArrayLike,
    accuracy: ArrayLike,
    *,
    r_per_problem: ArrayLike | None = None,
    c: float | None = None,
    s: float | None = None,
) -> FitResult:
    """Fit a saturating curve with an accuracy ceiling to selected accuracy vs k.

    Model: ``A(k) = A_inf − (A_inf − A_1)·k^(−β)``, β > 0: ``A(1) = A_1`` and ``A(k) → A_inf``
    (the plateau of a selection method limited by false positives; ``A_inf < A_1`` is allowed,
    e.g. voting when the common wrong answer wins). For fixed β the model is linear in
    (A_inf, A_1), so β is first located on a log grid by profile least squares and then all three
    parameters are refined with ``curve_fit`` (bounds: A_inf, A_1 in [−0.5, 1.5], β in
    [1e-3, 20]). Residuals in accuracy space. Fewer than 3 distinct budgets → not fittable;
    with exactly 3 the standard errors are NaN.

    When ``r_per_problem`` (single-sample accuracy per problem), ``c`` (verifier completeness) and
    ``s`` (soundness) are all given, ``extra`` also holds ``flaws_ceiling``, the mean over problems
    of the resampling ceiling ``c·r/(c·r + (1−s)(1−r))`` (0 for a problem whose samples are never
    accepted), and ``flaws_rmse``, the RMSE of the model's mixture curve
    ``mean_i flaws_accuracy(r_i, c, s, k)`` against the data, for comparison with ``A_inf``.
    """
    name = "selected_accuracy_ceiling"
    given = [x is not None for x in (r_per_problem, c, s)]
    if any(given) and not all(given):
        raise ValueError("r_per_problem, c and s must be given together")
    k, y = _clean_xy(ks, accuracy)
    extra: dict[str, Any] = {"space": "accuracy"}
    if r_per_problem is not None and c is not None and s is not None:
        r = np.asarray(r_per_problem, dtype=np.float64).ravel()
        ceil_i = np.nan_to_num(flaws_ceiling(r, c, s), nan=0.0)
        extra["flaws_ceiling"] = float(np.mean(ceil_i))
        if k.size:
            mix = np.mean(flaws_accuracy(r[None, :], c, s, k[:, None]), axis=1)
            extra["flaws_rmse"] = float(np.sqrt(np.mean((mix - y) ** 2)))
    if k.size < 3:
        return _unfittable(name, f"{k.size} distinct budgets (need >= 3)", int(k.size), **extra)

    def basis(kk: np.ndarray, beta: float) -> np.ndarray:
        g = np.power(kk, -beta)
        return np.stack([1.0 - g, g], axis=1)

    beta0, coef, _ = _profile_fit(k, y, basis, np.logspace(-3, np.log10(20.0), 121))
    lo, hi = np.array([-0.5, -0.5, 1e-3]), np.array([1.5, 1.5, 20.0])
    p0 = np.clip([coef[0], coef[1], beta0], lo + 1e-9, hi - 1e-9)
    method = "curve_fit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov = curve_fit(saturating_power, k, y, p0=p0, bounds=(lo, hi), maxfev=20000)
        if k.size <= 3:
            pcov = None
    except (RuntimeError, ValueError):
        method = "profile_grid"
        popt, pcov = p0, None
    names = ("A_inf", "A_1", "beta")
    params = {p: float(v) for p, v in zip(names, popt)}
    r2, rmse = _goodness(y, saturating_power(k, *popt))
    extra["method"] = method
    return FitResult(
        name=name,
        params=params,
        stderr=_stderr_from_cov(pcov, names),
        r2=r2,
        rmse=rmse,
        n_points=int(k.size),
        extra=extra,
    )


def fit_saturating_exponential(ks: ArrayLike, y: ArrayLike) -> FitResult:
    """Fit ``F(N) = F_max·(1 − (1 − p)^N)`` with ``F_max, p ∈ [0, 1]``.

    p is located on a grid by profile least squares (F_max is linear given p), then both are
    refined with bounded ``curve_fit``. Residuals in F space. Fewer than 3 distinct budgets →
    not fittable. ``FitResult.saturation(eps)`` gives the saturation point of the fit.
    """
    name = "saturating_exponential"
    k, v = _clean_xy(ks, y)
    if k.size < 3:
        return _unfittable(name, f"{k.size} distinct budgets (need >= 3)", int(k.size))

    def basis(kk: np.ndarray, p: float) -> np.ndarray:
        col: np.ndarray = (1.0 - np.power(1.0 - p, kk))[:, None]
        return col

    grid = np.concatenate([np.logspace(-5, np.log10(0.5), 100), 1.0 - np.logspace(np.log10(0.5), -6, 60)[1:]])
    p0, coef, _ = _profile_fit(k, v, basis, grid)
    F0 = float(np.clip(coef[0], 1e-6, 1.0))
    method = "curve_fit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov = curve_fit(
                saturating_exp,
                k,
                v,
                p0=(min(F0, 1 - 1e-9), min(max(p0, 1e-9), 1 - 1e-9)),
                bounds=([0.0, 0.0], [1.0, 1.0]),
                maxfev=20000,
            )
    except (RuntimeError, ValueError):
        method = "profile_grid"
        popt, pcov = np.array([F0, p0]), None
    names = ("F_max", "p")
    r2, rmse = _goodness(v, saturating_exp(k, *popt))
    return FitResult(
        name=name,
        params={p: float(x) for p, x in zip(names, popt)},
        stderr=_stderr_from_cov(pcov, names),
        r2=r2,
        rmse=rmse,
        n_points=int(k.size),
        extra={"method": method, "space": "value"},
    )


# --------------------------------------------------------------------------------------------
# Verifier-limited resampling (completeness c, soundness s)
# --------------------------------------------------------------------------------------------


def _flaws_parts(r: ArrayLike, c: ArrayLike, s: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rv, cv, sv = (np.asarray(x, dtype=np.float64) for x in (r, c, s))
    for nm, x in (("r", rv), ("c", cv), ("s", sv)):
        if np.any((x < 0) | (x > 1)):
            raise ValueError(f"{nm} must lie in [0, 1]")
    tp = cv * rv  # correct and accepted
    fp = (1.0 - sv) * (1.0 - rv)  # incorrect and accepted
    beta = (1.0 - cv) * rv + sv * (1.0 - rv)  # rejected
    return tp, fp, beta


def _accept_within(tp_or_fp: np.ndarray, beta: np.ndarray, K: ArrayLike) -> np.ndarray:
    """x·(1 − β^K)/(1 − β) written as x/q·(1 − β^K), q = 1 − β = tp + fp; 0 where q = 0."""
    Kv = np.asarray(K, dtype=np.float64)
    if np.any(Kv < 0):
        raise ValueError("K must be >= 0")
    q = 1.0 - beta
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(q > 0, tp_or_fp / np.where(q > 0, q, 1.0), 0.0)
    out: np.ndarray = ratio * (1.0 - np.power(beta, Kv))
    return out


def flaws_accuracy(r: ArrayLike, c: ArrayLike, s: ArrayLike, K: ArrayLike) -> np.ndarray | float:
    """P(the first accepted sample within K attempts is correct) = ``c·r·(1 − β^K)/(1 − β)``.

    ``β = (1−c)·r + s·(1−r)`` is the per-attempt rejection probability. Broadcasts; K may be inf.
    """
    tp, _fp, beta = _flaws_parts(r, c, s)
    out = _accept_within(tp, beta, K)
    return float(out) if np.ndim(out) == 0 else out


def flaws_fp(r: ArrayLike, c: ArrayLike, s: ArrayLike, K: ArrayLike) -> np.ndarray | float:
    """P(a false positive is returned within K attempts) = ``(1−s)(1−r)·(1 − β^K)/(1 − β)``."""
    _tp, fp, beta = _flaws_parts(r, c, s)
    out = _accept_within(fp, beta, K)
    return float(out) if np.ndim(out) == 0 else out


def flaws_abstain(r: ArrayLike, c: ArrayLike, s: ArrayLike, K: ArrayLike) -> np.ndarray | float:
    """P(no sample accepted within K attempts) = ``β^K``."""
    _, _, beta = _flaws_parts(r, c, s)
    K = np.asarray(K, dtype=np.float64)
    out = np.power(beta, K)
    return float(out) if np.ndim(out) == 0 else out


def flaws_ceiling(r: ArrayLike, c: ArrayLike, s: ArrayLike) -> np.ndarray | float:
    """Accuracy as K → ∞: ``c·r/(c·r + (1−s)(1−r))`` (accuracy given acceptance = 1 − FPR).

    NaN where nothing is ever accepted (c·r + (1−s)(1−r) = 0).
    """
    tp, fp, _ = _flaws_parts(r, c, s)
    q = tp + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(q > 0, tp / np.where(q > 0, q, 1.0), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def flaws_expected_utility(
    r_types: ArrayLike,
    pi: ArrayLike,
    c: ArrayLike,
    s: ArrayLike,
    C: float,
    K_max: int,
    *,
    attempt_cost: float = 0.0,
) -> np.ndarray:
    """Expected utility ``E[U_K]`` for K = 0..K_max (index = K; ``E[U_0] = 0``).

    Rewards: +1 for an accepted correct answer, −C for an accepted false positive, 0 for abstaining.
    With task types j (prior ``pi_j``, single-sample accuracy ``r_types_j``; c and s scalar or per
    type), the exact marginal value of attempt k is::

        Δ_k = Σ_j π_j · β_j^(k−1) · (c_j·r_j − C·(1−s_j)(1−r_j) − attempt_cost)

    (``attempt_cost`` per attempt actually made; 0 in the original model) and
    ``E[U_K] = Σ_{k<=K} Δ_k``. ``pi`` is normalised to sum to 1.
    """
    r = np.asarray(r_types, dtype=np.float64).ravel()
    w = np.asarray(pi, dtype=np.float64).ravel()
    if r.shape != w.shape:
        raise ValueError(f"r_types and pi differ in length: {r.size} vs {w.size}")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("pi must be non-negative with a positive sum")
    if int(K_max) < 0:
        raise ValueError("K_max must be >= 0")
    w = w / w.sum()
    tp, fp, beta = _flaws_parts(r, np.broadcast_to(c, r.shape), np.broadcast_to(s, r.shape))
    margin = tp - float(C) * fp - float(attempt_cost)
    k = np.arange(1, int(K_max) + 1, dtype=np.float64)
    reach = np.power(beta[None, :], k[:, None] - 1.0)  # P(attempt k happens | type j)
    delta = (reach * (w * margin)[None, :]).sum(axis=1)
    return np.concatenate([[0.0], np.cumsum(delta)])


def flaws_optimal_k(
    r_types: ArrayLike,
    pi: ArrayLike,
    c: ArrayLike,
    s: ArrayLike,
    C: float,
    K_max: int = 200,
    *,
    attempt_cost: float = 0.0,
) -> int:
    """``K* = argmax_{0<=K<=K_max} E[U_K]``; 0 means abstain (no K has positive value).

    Ties go to the smallest K, where "tie" includes differences below 1e-12 (relative): once the
    remaining attempts are almost never reached, more of them add nothing measurable, and the
    smallest budget achieving the maximum is returned.
    """
    eu = flaws_expected_utility(r_types, pi, c, s, C, K_max, attempt_cost=attempt_cost)
    best = eu.max()
    # Smallest K within float noise of the maximum.
    return int(np.flatnonzero(eu >= best - 1e-12 * max(1.0, abs(best)))[0])


# --------------------------------------------------------------------------------------------
# Difficulty bins and budget choice
# --------------------------------------------------------------------------------------------


def difficulty_bins(pass1_per_problem: ArrayLike, n_bins: int = 5) -> np.ndarray:
    """Quantile bin per problem by pass@1: 0 = easiest (highest pass@1) … ``n_bins − 1`` = hardest.

    A problem's bin is ``floor(u · n_bins)`` (clipped to ``n_bins − 1``) with its
    mid-distribution position ``u = (#problems with higher pass@1 + #tied/2)/N``, the centre of
    its tie group's span in the ranking. Without ties this gives equal-sized bins (when N is a
    multiple of ``n_bins``); problems with equal pass@1 always share one bin; the result does not
    depend on input order. With many ties some bins can be empty.
    """
    v = np.asarray(pass1_per_problem, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        raise ValueError("pass@1 values must be finite")
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    N = v.size
    if N == 0:
        return np.zeros(0, dtype=np.int64)
    # Mid-distribution position of each tie group of −v (so the easiest come first).
    _, inv, counts = np.unique(-v, return_inverse=True, return_counts=True)
    higher = np.concatenate([[0], np.cumsum(counts)[:-1]])
    u = (higher + counts / 2.0) / N
    bins = np.floor(u[inv] * n_bins + 1e-12).astype(np.int64)
    return np.clip(bins, 0, n_bins - 1)


def recommend_k(fit: FitResult, *, cost_per_sample: float, value_of_correct: float = 1.0, k_max: int = 1024) -> int:
    """The k in 1..k_max maximising ``value_of_correct·fit.predict(k) − cost_per_sample·k``.

    Ties go to the smallest k. Works with any fit that has ``predict``.
    """
    k_max = int(k_max)
    if k_max < 1:
        raise ValueError("k_max must be >= 1")
    k = np.arange(1, k_max + 1, dtype=np.float64)
    u = float(value_of_correct) * np.asarray(fit.predict(k), dtype=np.float64) - float(cost_per_sample) * k
    if not np.any(np.isfinite(u)):
        raise ValueError("the fit predicts no finite value on 1..k_max")
    u = np.where(np.isfinite(u), u, -np.inf)
    best = u.max()
    return int(k[np.flatnonzero(u >= best - 1e-12 * max(1.0, abs(best)))[0]])
