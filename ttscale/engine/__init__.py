"""Engine layer: one async interface over vLLM in-process, OpenAI-compatible upstreams and a fake.

Importing this package imports neither vLLM nor torch; an adapter loads them when it starts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from ttscale.engine.base import (
    Candidate,
    CandidateEvent,
    Engine,
    Fanout,
    Prefill,
    PromptInput,
    ReadResult,
    SamplingSettings,
    new_request_id,
    perplexity,
)
from ttscale.errors import ConfigError, ModelNotFoundError, ModelRoleError

__all__ = [
    "Candidate",
    "CandidateEvent",
    "Engine",
    "Fanout",
    "ModelPool",
    "ModelSpec",
    "Prefill",
    "PromptInput",
    "ReadResult",
    "SamplingSettings",
    "build_engine",
    "new_request_id",
    "parse_model_arg",
    "perplexity",
    "with_engine_options",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What to serve under ``name``: a local/embedded model or an upstream's model."""

    name: str
    source: str  # embedded name, local directory, or upstream base URL
    upstream_model: str | None = None  # for an upstream source: its model id
    role: Literal["generate", "score"] | None = None  # None: detect from the checkpoint
    engine: tuple[tuple[str, Any], ...] = ()  # vLLM engine arguments of this model (by field name)
    aliases: tuple[str, ...] = ()  # further names the model answers to
    replicas: tuple[str, ...] = ()  # further upstream URLs serving the same model (a replica pool)
    replica_options: tuple[tuple[str, Any], ...] = ()  # ReplicaOptions fields

    @property
    def is_upstream(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.source, *self.replicas) if self.is_upstream else ()


def parse_model_arg(arg: str) -> ModelSpec:
    """``NAME|PATH``, ``SERVED=NAME|PATH``, or ``SERVED=http://host:port[,http://host2:port...][@upstream-id]``
    (several URLs: replicas of one model)."""
    served, sep, source = arg.partition("=")
    if not sep:
        served, source = "", arg
    if source.startswith(("http://", "https://")):
        urls, _, up = source.rpartition("@") if "@" in source.rsplit(",", 1)[-1] else (source, "", "")
        parts = [u.strip() for u in urls.split(",") if u.strip()]
        if len(set(parts)) != len(parts):
            raise ConfigError(f"the replicas of {arg!r} repeat a URL", param="model")
        if any(not u.startswith(("http://", "https://")) for u in parts):
            raise ConfigError(f"every replica of {arg!r} must be an http(s) URL", param="model")
        return ModelSpec(
            name=served or up or parts[0],
            source=parts[0],
            upstream_model=up or served or None,
            replicas=tuple(parts[1:]),
        )
    if not served:
        from pathlib import Path

        served = source if "/" not in source else Path(source.rstrip("/")).name
    return ModelSpec(name=served, source=source)


def with_engine_options(spec: ModelSpec, options: dict[str, Any]) -> ModelSpec:
    """``spec`` with vLLM engine ``options`` over its own; ``served_model_name`` renames it
    (the first name; the others become aliases)."""
    merged = {**dict(spec.engine), **options}
    names = merged.pop("served_model_name", None)
    if isinstance(names, str):
        names = [names]
    if names:
        spec = replace(spec, name=names[0], aliases=tuple(names[1:]))
    return replace(spec, engine=tuple(merged.items()))


def build_engine(spec: ModelSpec, **vllm_options: Any) -> Engine:
    """An engine for ``spec``; ``vllm_options`` are :class:`VLLMOptions` fields (the spec's own
    engine arguments override them)."""
    if spec.is_upstream and (spec.replicas or spec.replica_options):
        from ttscale.engine.replicas import ReplicaOptions, ReplicaPool

        try:
            ropts = ReplicaOptions(**dict(spec.replica_options))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"replica options of {spec.name!r}: {e}", param="replicas") from None
        return ReplicaPool(
            spec.name, spec.urls, upstream_model=spec.upstream_model, role=spec.role or "generate", options=ropts
        )
    if spec.is_upstream:
        from ttscale.engine.openai_engine import OpenAIEngine

        return OpenAIEngine(spec.name, spec.source, upstream_model=spec.upstream_model, role=spec.role or "generate")
    from ttscale.engine.vllm_engine import VLLMEngine, VLLMOptions
    from ttscale.models import resolve_model

    path = resolve_model(spec.source)
    extra = dict(vllm_options.pop("extra", ()))
    extra.update(dict(spec.engine))
    return VLLMEngine(spec.name, path, role=spec.role, options=VLLMOptions(**vllm_options, extra=tuple(extra.items())))


_gc_tuned = False
GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (Python: 700)


def tune_gc_for_serving() -> None:
    """Once per process, after the engines started: put every object alive then (the imported
    libraries, the engines' clients and tokenizers: ~650k objects with vLLM and torch) out of the
    garbage collector's sight, as vLLM's own server does, and collect the youngest generation
    every ``GC_YOUNG_THRESHOLD`` allocations. A full collection otherwise walks the whole start-up
    heap with the event loop stopped (pauses of ~1 s on a 2-core host), and a streaming server
    allocates a few objects per token of every candidate. ``bench/gc_pauses.py``: with both, the
    collector's time per token 0.29x and its longest pause 69 ms instead of 1,025 ms."""
    global _gc_tuned
    if not _gc_tuned:
        _gc_tuned = True
        gc.collect()
        gc.freeze()
        young, *older = gc.get_threshold()
        if 0 < young < GC_YOUNG_THRESHOLD:  # 0: the collector is off; a higher one was chosen
            gc.set_threshold(GC_YOUNG_THRESHOLD, *older)


class ModelPool:
    """The models a server (or eval run) has loaded, addressed by name."""

    def __init__(
        self, engines: Iterable[Engine] = (), *, gpu_share: float | None = None, aliases: dict[str, str] | None = None
    ) -> None:
        """``gpu_share``: the part of the GPU all in-process engines together may take (split
        by the memory plan); ``aliases`` maps further names to served models."""
        self._engines: dict[str, Engine] = {}
        self._aliases: dict[str, str] = {}
        self.gpu_share = gpu_share
        for e in engines:
            self.add(e)
        for alias, name in (aliases or {}).items():
            self.alias(alias, name)

    def add(self, engine: Engine) -> None:
        if engine.name in self._engines or engine.name in self._aliases:
            raise ConfigError(f"two models named {engine.name!r}", param="model")
        self._engines[engine.name] = engine

    def alias(self, alias: str, name: str) -> None:
        if alias in self._engines or alias in self._aliases:
            raise ConfigError(f"two models named {alias!r}", param="served_model_name")
        self._aliases[alias] = name

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    def __iter__(self) -> Iterator[Engine]:
        return iter(self._engines.values())

    def __contains__(self, name: str) -> bool:
        return name in self._engines or name in self._aliases

    @property
    def default(self) -> Engine:
        for e in self._engines.values():
            if e.role == "generate":
                return e
        raise ModelNotFoundError("no generating model is loaded", param="model")

    def get(self, name: str | None, *, role: str | None = None, param: str = "model") -> Engine:
        eng: Engine | None
        if name is None:
            eng = self.default if role in (None, "generate") else self.first(role, param=param)
        else:
            eng = self._engines.get(self._aliases.get(name, name))
            if eng is None:
                raise ModelNotFoundError(
                    f"model {name!r} is not served here (served: {', '.join(self._engines) or 'none'})", param=param
                )
        if role is not None and eng.role != role:
            what = "a scoring (verifier / reward) model" if role == "score" else "a generating model"
            raise ModelRoleError(f"model {eng.name!r} is not {what}", param=param)
        return eng

    def first(self, role: str, *, param: str = "model") -> Engine:
        for e in self._engines.values():
            if e.role == role:
                return e
        raise ModelNotFoundError(f"no model with role {role!r} is loaded", param=param)

    def plan(self) -> None:
        """Split the GPU between the in-process engines (no-op on CPU); raises ``ConfigError``
        naming the models and numbers when they do not fit."""
        from ttscale.engine.vllm_engine import plan_engines

        plan_engines(list(self._engines.values()), share=self.gpu_share)
        self._planned = True

    async def start(self) -> None:
        if not getattr(self, "_planned", False):
            self.plan()
        # CPU engines share the host's cores: each learns how many of them there are
        cpu = [e for e in self._engines.values() if hasattr(e, "cpu_peers")]
        for e in cpu:
            e.cpu_peers = len(cpu)
        # One at a time: engine start-up is CPU-heavy and parallel starts only contend; on a
        # shared GPU each engine also checks the memory left by the ones before it.
        for e in self._engines.values():
            await e.start()
        tune_gc_for_serving()

    @property
    def alive(self) -> dict[str, bool]:
        """Per model: started and running (a dead engine process reads False)."""
        return {n: e.alive for n, e in self._engines.items()}

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self._engines.values()), return_exceptions=True)

    @property
    def num_running(self) -> int:
        return sum(e.num_running for e in self._engines.values())
