"""Fitted scaling curves as budget profiles store them: the curve models and
:class:`FitResult` (parameters, errors, goodness of fit, ``predict(k)``, a JSON form).

The library reads profiles with this; ``ttscale.eval.fit`` fits the curves (scipy) and
re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MODELS", "ArrayLike", "FitResult", "saturation_point"]

ArrayLike = float | Sequence[float] | np.ndarray

# --------------------------------------------------------------------------------------------
# Model registry and the fit result
# --------------------------------------------------------------------------------------------


def power_law_coverage(k: np.ndarray, a: float, b: float) -> np.ndarray:
    out: np.ndarray = np.exp(a * np.power(k, b))
    return out


def saturating_power(k: np.ndarray, A_inf: float, A_1: float, beta: float) -> np.ndarray:
    out: np.ndarray = A_inf - (A_inf - A_1) * np.power(k, -beta)
    return out


def saturating_exp(k: np.ndarray, F_max: float, p: float) -> np.ndarray:
    out: np.ndarray = F_max * (1.0 - np.power(1.0 - p, k))
    return out


#: name → (parameter names, model function f(k, *params)).
MODELS: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "coverage_power_law": (("a", "b"), power_law_coverage),
    "selected_accuracy_ceiling": (("A_inf", "A_1", "beta"), saturating_power),
    "saturating_exponential": (("F_max", "p"), saturating_exp),
}


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _none_to_nan(x: Any) -> Any:
    return float("nan") if x is None else x


@dataclass(frozen=True)
class FitResult:
    """A fitted (or unfittable) curve.

    Attributes:
        name: model name, a key of :data:`MODELS` (decides what ``predict`` computes).
        params: fitted parameters by name (NaN when not fittable).
        stderr: standard errors from the fit covariance (NaN when unavailable).
        r2, rmse: goodness of fit in the space the residuals were minimised in (see each fit).
        n_points: number of points the fit used.
        fittable: False when the data cannot support the model; ``reason`` says why.
        extra: further JSON-compatible details (fit method, fit space, comparison values).
        ci: 95 % intervals of parameters by name, where the fit computes them.
        issues: why the fit (its asymptote) is not trustworthy; empty when no reason was found.
    """

    name: str
    params: dict[str, float]
    stderr: dict[str, float]
    r2: float
    rmse: float
    n_points: int
    fittable: bool = True
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    issues: tuple[str, ...] = ()

    @property
    def trusted(self) -> bool:
        """Fittable, with no reason found to distrust it."""
        return self.fittable and not self.issues

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {sorted(MODELS)}")

    def predict(self, k: ArrayLike) -> np.ndarray:
        """Model value at budget(s) ``k`` (always an ndarray). Raises ValueError if not fittable."""
        if not self.fittable:
            raise ValueError(f"{self.name} fit is not usable: {self.reason}")
        names, f = MODELS[self.name]
        kk = np.asarray(k, dtype=np.float64)
        return np.asarray(f(kk, *(self.params[p] for p in names)), dtype=np.float64)

    def saturation(self, eps: float = 1e-3) -> int:
        """Saturation point (:func:`saturation_point`) of a ``saturating_exponential`` fit."""
        if self.name != "saturating_exponential":
            raise TypeError(f"saturation() needs a saturating_exponential fit, not {self.name}")
        if not self.fittable:
            raise ValueError(f"fit is not usable: {self.reason}")
        return saturation_point(self.params["p"], F_max=self.params["F_max"], eps=eps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (non-finite floats become None)."""
        return {
            "name": self.name,
            "params": {k: _nan_to_none(float(v)) for k, v in self.params.items()},
            "stderr": {k: _nan_to_none(float(v)) for k, v in self.stderr.items()},
            "r2": _nan_to_none(float(self.r2)),
            "rmse": _nan_to_none(float(self.rmse)),
            "n_points": int(self.n_points),
            "fittable": bool(self.fittable),
            "reason": self.reason,
            "extra": {k: _nan_to_none(v) for k, v in self.extra.items()},
            "ci": {k: [_nan_to_none(float(a)), _nan_to_none(float(b))] for k, (a, b) in self.ci.items()},
            "issues": list(self.issues),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=d["name"],
            params={k: float(_none_to_nan(v)) for k, v in d["params"].items()},
            stderr={k: float(_none_to_nan(v)) for k, v in d["stderr"].items()},
            r2=float(_none_to_nan(d["r2"])),
            rmse=float(_none_to_nan(d["rmse"])),
            n_points=int(d["n_points"]),
            fittable=bool(d.get("fittable", True)),
            reason=str(d.get("reason", "")),
            extra={k: _none_to_nan(v) for k, v in dict(d.get("extra", {})).items()},
            ci={k: (float(_none_to_nan(a)), float(_none_to_nan(b))) for k, (a, b) in dict(d.get("ci", {})).items()},
            issues=tuple(str(x) for x in d.get("issues", ())),
        )


def saturation_point(p: float, F_max: float = 1.0, eps: float = 1e-3) -> int:
    """Smallest budget N >= 1 whose next unit gains at most ``eps``: ``F_max·p·(1−p)^N <= eps``.

    ``N* = ⌈ln(eps/(F_max·p)) / ln(1 − p)⌉`` clamped to >= 1; N* = 1 when ``F_max·p <= eps``
    (including p = 0) or p = 1. The ceiling ignores float noise of 1e-9 so exact boundary cases
    (e.g. p = 0.5, eps = 0.125 → 2) are not pushed up by rounding.
    """
    p, F_max, eps = float(p), float(F_max), float(eps)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not 0.0 < F_max <= 1.0:
        raise ValueError(f"F_max must be in (0, 1], got {F_max}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if p >= 1.0 or F_max * p <= eps:
        return 1
    n = math.log(eps / (F_max * p)) / math.log1p(-p)
    return max(1, math.ceil(n - 1e-9))
