"""Scaling-curve fits and budget models.

Fits return a :class:`FitResult`: parameters with standard errors, goodness of fit, a
``predict(k)`` method and a JSON-serialisable dict form (budget profiles store these).

* coverage vs k: :func:`fit_coverage_power_law` (exponentiated power law, ``c(k) = exp(a·k^b)``);
* selected accuracy vs k: :func:`fit_selected_accuracy_ceiling` (saturating power law with an
  asymptote ``A_inf`` bounded by what is possible, with a 95 % interval and the reasons it is
  not trustworthy, ``FitResult.issues``);
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
    "MAX_CI_WIDTH",
    "MIN_TRUST_POINTS",
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


# Trust of a fitted asymptote: fewer budgets, a wider 95 % interval, or a parameter on a bound
# (the data do not locate it) make a fit not trustworthy (FitResult.issues).
MIN_TRUST_POINTS = 5
MAX_CI_WIDTH = 0.15
_BOUND_TOL = 1e-3


def fit_selected_accuracy_ceiling(
    ks: ArrayLike,
    accuracy: ArrayLike,
    *,
    r_per_problem: ArrayLike | None = None,
    c: float | None = None,
    s: float | None = None,
    upper: float = 1.0,
) -> FitResult:
    """Fit a saturating curve with an accuracy ceiling to selected accuracy vs k.

    Model: ``A(k) = A_inf − (A_inf − A_1)·k^(−β)``, β > 0: ``A(1) = A_1`` and ``A(k) → A_inf``
    (the plateau of a selection method limited by false positives; ``A_inf < A_1`` is allowed,
    e.g. voting when the common wrong answer wins). Bounds keep the curve possible: selected
    accuracy is at most coverage, and coverage at most 1, so ``A_inf ∈ [0, upper]`` (``upper``
    = 1 unless a lower coverage ceiling is known), ``A_1 ∈ [0, 1]``, ``β ∈ [1e-3, 20]``.

    Procedure: for fixed (A_inf, β) the model is linear in A_1, whose bounded least-squares value
    is exact (the clipped solution); a grid over A_inf (201 values on [0, upper]) and β (121
    log-spaced values) gives the starting point, refined by ``scipy.optimize.least_squares``
    with the bounds. Residuals in accuracy space. Fewer than 3 distinct budgets → not fittable;
    with exactly 3 there are no standard errors and no interval.

    Uncertainty (``ci``, ``issues``): ``ci["A_inf"]`` is the 95 % profile interval of A_inf, the
    grid values whose profile SSE (minimised over A_1, β) is within
    ``SSE_min·(1 + F_{0.95}(1, n − 3)/(n − 3))``, clipped to the bounds. ``issues`` lists why the
    asymptote is not trustworthy: fewer than 5 budgets; A_inf held at a bound (the same fit with
    A_inf, A_1 free in [−0.5, 1.5] puts it elsewhere: ``extra["A_inf_unbounded"]``; a plateau the
    data put at 1 is no issue); β on a bound; an interval wider than 0.15; R² below 0.9.
    Standard errors come from the Jacobian at the solution, NaN for a parameter on a bound (they
    treat the points as independent, which points over the same problems are not: the interval
    and the flags are the better guide).

    When ``r_per_problem`` (single-sample accuracy per problem), ``c`` (verifier completeness) and
    ``s`` (soundness) are all given, ``extra`` also holds ``flaws_ceiling``, the mean over problems
    of the resampling ceiling ``c·r/(c·r + (1−s)(1−r))`` (0 for a problem whose samples are never
    accepted), and ``flaws_rmse``, the RMSE of the model's mixture curve
    ``mean_i flaws_accuracy(r_i, c, s, k)`` against the data, for comparison with ``A_inf``.
    """
    from scipy.optimize import least_squares
    from scipy.stats import f as f_dist

    name = "selected_accuracy_ceiling"
    given = [x is not None for x in (r_per_problem, c, s)]
    if any(given) and not all(given):
        raise ValueError("r_per_problem, c and s must be given together")
    if not 0.0 < float(upper) <= 1.0:
        raise ValueError(f"upper (the ceiling of A_inf) must lie in (0, 1], got {upper}")
    upper = float(upper)
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

    lo, hi = np.array([0.0, 0.0, 1e-3]), np.array([upper, 1.0, 20.0])
    a_grid = np.linspace(0.0, upper, 201)
    b_grid = np.logspace(-3, np.log10(20.0), 121)
    sse_grid = _ceiling_grid_sse(k, y, a_grid, b_grid)  # [A_inf, beta]
    ia, ib = np.unravel_index(int(np.argmin(sse_grid)), sse_grid.shape)
    a0, b0 = float(a_grid[ia]), float(b_grid[ib])
    p0 = np.clip([a0, _best_a1(k, y, a0, b0), b0], lo, hi)

    def resid(p: np.ndarray) -> np.ndarray:
        out: np.ndarray = saturating_power(k, *p) - y
        return out

    method = "least_squares"
    popt, jac = p0, None
    with np.errstate(all="ignore"):
        try:
            res = least_squares(resid, p0, bounds=(lo, hi), method="trf", max_nfev=20000)
            if np.all(np.isfinite(res.x)) and float(np.sum(res.fun**2)) <= float(np.sum(resid(p0) ** 2)):
                popt, jac = res.x, res.jac
            else:
                method = "grid"
        except (RuntimeError, ValueError):
            method = "grid"
    names = ("A_inf", "A_1", "beta")
    sse = float(np.sum(resid(popt) ** 2))
    dof = int(k.size) - 3
    at_bound = [bool(min(v - lo_, hi_ - v) < _BOUND_TOL) for v, lo_, hi_ in zip(popt, lo, hi)]
    # Is A_inf held by its bound? The same fit with the impossible region open (A_inf, A_1 in
    # [−0.5, 1.5]) says where the data alone would put it.
    unbounded = float(popt[0])
    if at_bound[0]:
        wide_lo, wide_hi = np.array([-0.5, -0.5, 1e-3]), np.array([1.5, 1.5, 20.0])
        with np.errstate(all="ignore"):
            try:
                wide = least_squares(resid, popt, bounds=(wide_lo, wide_hi), method="trf", max_nfev=20000)
                if np.all(np.isfinite(wide.x)):
                    unbounded = float(wide.x[0])
            except (RuntimeError, ValueError):
                pass
        extra["A_inf_unbounded"] = unbounded
    stderr = {p: float("nan") for p in names}
    if dof > 0 and jac is not None:
        cov = np.linalg.pinv(jac.T @ jac) * (sse / dof)
        stderr = _stderr_from_cov(cov, names)
        stderr = {p: (float("nan") if b else v) for (p, v), b in zip(stderr.items(), at_bound)}
    ci: dict[str, tuple[float, float]] = {}
    if dof > 0:
        limit = sse * (1.0 + float(f_dist.ppf(0.95, 1, dof)) / dof) + 1e-12 * k.size
        inside = a_grid[sse_grid.min(axis=1) <= limit]
        a_hat = float(popt[0])
        ci["A_inf"] = (
            min(float(inside.min()), a_hat) if inside.size else a_hat,
            max(float(inside.max()), a_hat) if inside.size else a_hat,
        )
    r2, rmse = _goodness(y, saturating_power(k, *popt))
    held: list[str] = []
    if abs(unbounded - float(popt[0])) > _BOUND_TOL:
        edge = lo[0] if unbounded < popt[0] else hi[0]
        held.append(f"A_inf held at its bound {edge:g} (unbounded, the fit would put it at {unbounded:.3f})")
    if at_bound[2]:
        held.append(f"beta on its bound {lo[2] if popt[2] - lo[2] < hi[2] - popt[2] else hi[2]:g}")
    issues = _trust_issues(int(k.size), held, ci.get("A_inf"), r2)
    extra["method"] = method
    return FitResult(
        name=name,
        params={p: float(v) for p, v in zip(names, popt)},
        stderr=stderr,
        r2=r2,
        rmse=rmse,
        n_points=int(k.size),
        extra=extra,
        ci=ci,
        issues=tuple(issues),
    )


def _ceiling_grid_sse(k: np.ndarray, y: np.ndarray, a_grid: np.ndarray, b_grid: np.ndarray) -> np.ndarray:
    """SSE of the ceiling model at every (A_inf, β) of the grids, A_1 at its bounded optimum."""
    g = np.power(k[None, :], -b_grid[:, None])  # [beta, k]
    # y − A_inf·(1 − g) = A_1·g  →  A_1 = Σ g·(y − A_inf(1 − g)) / Σ g², clipped to [0, 1]
    target = y[None, None, :] - a_grid[:, None, None] * (1.0 - g[None, :, :])  # [A, beta, k]
    a1 = np.clip((target * g[None]).sum(axis=2) / (g**2).sum(axis=1)[None, :], 0.0, 1.0)
    out: np.ndarray = ((target - a1[:, :, None] * g[None]) ** 2).sum(axis=2)
    return out


def _best_a1(k: np.ndarray, y: np.ndarray, a_inf: float, beta: float) -> float:
    g = np.power(k, -beta)
    return float(np.clip(np.sum(g * (y - a_inf * (1.0 - g))) / np.sum(g**2), 0.0, 1.0))


def _trust_issues(n_points: int, bounds: list[str], ci: tuple[float, float] | None, r2: float) -> list[str]:
    """Why a fit's asymptote is not trustworthy (empty: no reason found)."""
    issues = []
    if n_points < MIN_TRUST_POINTS:
        issues.append(f"{n_points} budgets (need >= {MIN_TRUST_POINTS})")
    issues += bounds
    if ci is not None and ci[1] - ci[0] > MAX_CI_WIDTH:
        issues.append(f"95% CI of A_inf [{ci[0]:.3f}, {ci[1]:.3f}] wider than {MAX_CI_WIDTH:g}")
    if math.isfinite(r2) and r2 < 0.9:
        issues.append(f"R² {r2:.3f} < 0.9")
    return issues


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
