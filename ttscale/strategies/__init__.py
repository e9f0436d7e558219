"""Strategies by name. ``register`` adds one; ``get_strategy`` finds one for a request."""

from __future__ import annotations

from typing import Any

from ttscale.errors import UnknownStrategyError
from ttscale.run import Choice, Ledger, RunContext, StopReason, StrategyOptions, StrategyResult, Usage
from ttscale.strategies.base import Sampler, Strategy

__all__ = [
    "Choice",
    "Ledger",
    "RunContext",
    "Sampler",
    "StopReason",
    "Strategy",
    "StrategyOptions",
    "StrategyResult",
    "Usage",
    "get_strategy",
    "register",
    "registered",
]

_REGISTRY: dict[str, type[Strategy[Any]]] = {}


def register(cls: type[Strategy[Any]]) -> type[Strategy[Any]]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Strategy[Any]]]:
    _load_builtins()
    return dict(_REGISTRY)


def get_strategy(name: str) -> type[Strategy[Any]]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}", param="ttscale.strategy"
        ) from None


def _load_builtins() -> None:
    from ttscale.strategies import (  # noqa: F401
        auto,
        best_of_n,
        deepconf,
        none,
        refine,
        rpc,
        speculative,
        temperature_sweep,
        voting,
    )
