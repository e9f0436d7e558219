"""One model served by several OpenAI-compatible replicas (``vllm serve`` or ``ttscale serve``
on other GPUs or hosts), behind one name.

Placement: the replicas are ranked per request by rendezvous hashing of the request's key (the
model and the prompt, or its first ``prefix_chars`` characters, or the client's
``X-Session-ID``), so every ttscale instance that knows the same replicas ranks them alike, and
the candidates of a request, its later waves and its repeats meet one replica's prefix cache.
The candidates of a request go to the first replica in that order (``affinity``); to the first
in the order with room for them within its share of the load (``auto``: bounded-load hashing;
spread under a deadline); split over the order in blocks (``spread``); or dealt out one by one
in turn whatever the key (``round_robin``, the baseline). The candidates of one replica that the
caller stops only all at once go there as one ``n=k`` request (its prompt rendered and
tokenized there once, one stream).
Load is the candidates this process has open on a replica plus, from the replica's
``/metrics``, the requests other clients keep there (vLLM's ``vllm:num_requests_running`` +
``vllm:num_requests_waiting``, or ttscale's own gauges). The key goes to the replica as
``X-Session-ID``, so a router in front of it can agree.

Failures: a replica whose connection fails, or which answers 5xx, 429 or 404 (it does not serve
the model), is ejected; its candidates in flight (of an ``n=k`` request: those not yet
finished) are redrawn one by one on the next replica in their order (same seed; the tokens lost
with it stay counted as ``lost_tokens``) up to ``retries`` times. Ejected replicas are probed
(``/health``) and re-admitted after ``readmit_after`` good probes in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from ttscale.engine.base import (
    PLACEMENTS,
    ROUTING,
    Candidate,
    CandidateEvent,
    Engine,
    Fanout,
    Placement,
    PromptInput,
    Routing,
    SamplingSettings,
    is_token_ids,
    new_request_id,
)
from ttscale.engine.openai_engine import (
    GroupRefused,
    OpenAIEngine,
    StreamsFanout,
    is_chat,
    reset_candidate,
    split_groups,
    stream_candidate,
    stream_group,
)
from ttscale.errors import EngineUnavailableError, InvalidRequestError, ModelRoleError, UpstreamError

log = logging.getLogger(__name__)


# gauges a replica's /metrics may carry: requests it holds for all its clients
_LOAD_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "ttscale_engine_requests_running": "running",
    "ttscale_requests_queued": "waiting",
}
KV_FULL = 0.95  # vllm:kv_cache_usage_perc at which a replica takes no more requests under auto
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


@dataclass(frozen=True)
class ReplicaOptions:
    """How a replicated model places and recovers its candidates."""

    placement: Placement = "auto"  # the default of requests that name none
    load_slack: float = 0.25  # auto: a replica takes up to (1 + slack) × the mean load
    retries: int = 2  # redraws of one candidate whose replica was lost
    health_interval_s: float = 2.0  # probes of /health and /metrics
    readmit_after: int = 1  # good probes in a row that re-admit an ejected replica
    # the prompt's first characters that make its placement key; None: the whole prompt (the
    # K candidates and later waves of a request meet, requests spread by content; a chat that
    # should keep its replica as it grows sends an X-Session-ID)
    prefix_chars: int | None = None
    # a replica's candidates of one wave as one n=k request (False: one request each, for an
    # upstream that takes no n > 1)
    group: bool = True
    # streams open at once to one replica; more candidates wait their turn at this process, in order
    max_connections: int = 100

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}")
        if not (self.load_slack >= 0 and self.retries >= 0 and self.health_interval_s > 0):
            raise ValueError("load_slack and retries must be >= 0, health_interval_s > 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.readmit_after < 1 or (self.prefix_chars is not None and self.prefix_chars < 1):
            raise ValueError("readmit_after and prefix_chars must be >= 1")


@dataclass(eq=False)
class Replica:
    url: str
    engine: OpenAIEngine
    up: bool = False
    good_probes: int = 0
    in_flight: int = 0  # candidates this process has open there
    others: int = 0  # requests other clients keep there (from its /metrics)
    kv_usage: float | None = None
    candidates: int = 0  # candidates started there
    failures: int = 0  # times it was ejected
    redrawn: int = 0  # candidates lost with it and redrawn elsewhere
    last_error: str | None = None

    @property
    def load(self) -> int:
        return self.in_flight + self.others

    def state(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "in_flight": self.in_flight,
            "others": self.others,
            "kv_cache_usage": self.kv_usage,
            "candidates": self.candidates,
            "failures": self.failures,
            "redrawn": self.redrawn,
            "last_error": self.last_error,
        }


def rendezvous(key: str, urls: Sequence[str]) -> list[int]:
    """Indices of ``urls`` by descending highest-random-weight score of ``key``: the same key
    ranks the same replicas alike everywhere, and removing a replica moves only its keys."""

    def weight(url: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{url}\x00{key}".encode(), digest_size=8).digest(), "big")

    return sorted(range(len(urls)), key=lambda i: weight(urls[i]), reverse=True)


def prompt_key(model: str, prompt: PromptInput, prefix_chars: int | None) -> str:
    """The placement key of a prompt: the model and the prompt's first ``prefix_chars``
    characters (all of them with None)."""
    if is_token_ids(prompt):
        text = " ".join(map(str, prompt))
    elif isinstance(prompt, str):
        text = prompt
    else:
        text = "".join(f"<{m.get('role')}>{m.get('content') or ''}" for m in prompt)
    return f"{model}\x00{text if prefix_chars is None else text[:prefix_chars]}"


def place(k: int, order: Sequence[Replica], placement: Placement, *, slack: float, start: int = 0) -> list[Replica]:
    """The replica of each of ``k`` candidates, given the healthy replicas in the key's order.

    ``affinity``: all on the first. ``spread``: split over the order in blocks as even as can
    be (candidates of consecutive seeds meet: one ``n=k`` call per replica). ``round_robin``:
    dealt out one by one from position ``start``. ``auto``: all on the first replica in the
    order whose load, with them, stays within ``ceil((1 + slack) × (total load + k) / replicas)`` (consistent
    hashing with bounded loads, Mirrokni et al. 2018, the request as one ball of weight k);
    on the least loaded one when none does (a large request on an idle pool: the first). A
    replica whose KV cache is ``KV_FULL`` used has no room."""
    if not order:
        return []
    n = len(order)
    if placement == "affinity":
        return [order[0]] * k
    if placement == "spread":
        return [order[i * n // k] for i in range(k)]
    if placement == "round_robin":
        return [order[(start + i) % n] for i in range(k)]
    cap = math.ceil((1 + slack) * (sum(r.load for r in order) + k) / n)
    # a replica whose KV cache is (nearly) full would queue them: it has no room either
    fits = [r for r in order if r.load + k <= cap and (r.kv_usage is None or r.kv_usage < KV_FULL)]
    return [fits[0] if fits else min(order, key=lambda r: r.load)] * k


def parse_load(text: str) -> dict[str, float]:
    """running / waiting / kv from a Prometheus text page (summed over label sets)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m and m.group(1) in _LOAD_METRICS:
            with contextlib.suppress(ValueError):
                key = _LOAD_METRICS[m.group(1)]
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


class ReplicaPool(Engine):
    """A model whose requests run on several OpenAI-compatible replicas."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        role: Literal["generate", "score"] = "generate",
        options: ReplicaOptions | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        if len(set(urls)) != len(urls) or not urls:
            raise ValueError("a replicated model needs distinct replica URLs")
        self.name = name
        self.role = role
        self.upstream_model = upstream_model or name
        self.options = options or ReplicaOptions()
        self.replicas = [
            Replica(
                u,
                OpenAIEngine(
                    name,
                    u,
                    upstream_model=self.upstream_model,
                    api_key=api_key,
                    role=role,
                    tokenizer_path=tokenizer_path,
                    max_connections=self.options.max_connections,
                ),
            )
            for u in urls
        ]
        self._rr = 0
        self._renderer: OpenAIEngine | None = None  # a replica's local tokenizer, if any
        self._monitor: asyncio.Task[None] | None = None
        self._started = False

    # -- life -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to every replica; the ones not answering yet start ejected (and are probed)."""
        results = await asyncio.gather(*(r.engine.start() for r in self.replicas), return_exceptions=True)
        for r, res in zip(self.replicas, results, strict=True):
            if isinstance(res, BaseException):
                r.last_error = str(res)
                if r.engine._client is None:  # keep a client to probe it with
                    r.engine._client = httpx.AsyncClient(
                        headers=r.engine._headers, timeout=httpx.Timeout(r.engine._timeout, connect=10.0)
                    )
                log.warning("replica %s of %s is not up yet: %s", r.url, self.name, res)
            else:
                r.up = True
        up = [r for r in self.replicas if r.up]
        if not up:
            await self.close()
            raise EngineUnavailableError(
                f"no replica of {self.name!r} answers: " + "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas)
            )
        lens = [r.engine.max_model_len for r in up if r.engine.max_model_len]
        self.max_model_len = min(lens) if lens else None
        tok = next((r.engine for r in up if r.engine.can_render), None)
        self._renderer = tok
        self._started = True
        self._monitor = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await asyncio.gather(*(r.engine.close() for r in self.replicas), return_exceptions=True)
        self._started = False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            await asyncio.gather(*(self.probe(r) for r in self.replicas), return_exceptions=True)

    async def probe(self, r: Replica) -> None:
        """One health check of ``r`` (``/health``, then its load from ``/metrics``)."""
        root = r.engine.base_url[: -len("/v1")]
        client = r.engine.client
        try:
            h = await client.get(f"{root}/health", timeout=5.0)
            ok = h.status_code == 200
            if not ok:
                r.last_error = f"/health answered {h.status_code}"
        except httpx.HTTPError as e:
            ok, r.last_error = False, f"/health failed: {e}"
        if not ok:
            if r.up:
                self.eject(r, r.last_error or "health check failed")
            r.good_probes = 0
            return
        if not r.up:
            r.good_probes += 1
            if r.good_probes >= self.options.readmit_after:
                r.up = True
                log.warning("replica %s of %s is back", r.url, self.name)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            m = await client.get(f"{root}/metrics", timeout=5.0)
            if m.status_code == 200:
                load = parse_load(m.text)
                held = int(load.get("running", 0) + load.get("waiting", 0))
                r.others = max(0, held - r.in_flight)
                r.kv_usage = load.get("kv")

    def eject(self, r: Replica, why: str) -> None:
        if r.up:
            r.up = False
            r.failures += 1
            r.good_probes = 0
            log.warning("replica %s of %s ejected: %s", r.url, self.name, why)
        r.last_error = why

    # -- state ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        # the pool itself never dies: a replica that does is ejected, and the pool serves on
        return self._started

    @property
    def ready(self) -> bool:
        return any(r.up for r in self.replicas)

    @property
    def num_running(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def replica_states(self) -> dict[str, dict[str, Any]]:
        return {r.url: r.state() for r in self.replicas}

    @property
    def can_render(self) -> bool:
        return self._renderer is not None

    def render(
        self, prompt: PromptInput, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        eng = self._renderer
        if eng is None:
            raise ModelRoleError(f"model {self.name!r} has no local tokenizer", param="model")
        return eng.render(
            prompt, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
        )

    # -- placement --------------------------------------------------------------------------
    def order(self, key: str) -> list[Replica]:
        """The healthy replicas in ``key``'s rendezvous order."""
        ranked = [self.replicas[i] for i in rendezvous(key, [r.url for r in self.replicas])]
        return [r for r in ranked if r.up]

    def assign(self, prompt: PromptInput, k: int, routing: Routing) -> tuple[str, list[list[Replica]]]:
        """(key, per candidate its replicas in the order to try them)."""
        key = routing.key or prompt_key(self.upstream_model, prompt, self.options.prefix_chars)
        order = self.order(key)
        if not order:
            raise EngineUnavailableError(f"no replica of {self.name!r} is up", param="model")
        placement = routing.placement if routing.placement != "auto" else self.options.placement
        if placement == "auto" and routing.deadline:
            placement = "spread"
        start = self._rr
        if placement == "round_robin":
            self._rr = (self._rr + k) % len(order)
        firsts = place(k, order, placement, slack=self.options.load_slack, start=start)
        return key, [[f, *(r for r in order if r is not f)] for f in firsts]

    # -- work -------------------------------------------------------------------------------
    def fanout(
        self,
        prompt: PromptInput,
        settings: Sequence[SamplingSettings],
        *,
        request_id: str | None = None,
        stream: bool = True,
        text: bool = True,
        together: bool = False,
    ) -> Fanout:
        if self.role != "generate":
            raise ModelRoleError(f"model {self.name!r} cannot generate", param="model")
        settings = list(settings)
        key, plans = self.assign(prompt, len(settings), ROUTING.get())
        groups = (
            split_groups(settings, [p[0] for p in plans])
            if together and self.options.group
            else [[i] for i in range(len(settings))]
        )
        fo = _PoolFanout(self, prompt, settings, plans, groups, key, request_id or new_request_id())
        fo.together = together
        return fo

    async def _on_replica(self, key: str, call: Any) -> Any:
        """``await call(engine)`` on the key's replica, failing over down its order."""
        last: Exception | None = None
        for r in self.order(key)[: self.options.retries + 1]:
            try:
                return await call(r.engine)
            except (EngineUnavailableError, UpstreamError) as e:
                if not _replica_fault(e):
                    raise
                self.eject(r, str(e))
                last = e
        raise last or EngineUnavailableError(f"no replica of {self.name!r} is up", param="model")

    async def score(self, prompts: Sequence[PromptInput], *, request_id: str | None = None) -> list[float]:
        if self.role != "score":
            raise ModelRoleError(f"model {self.name!r} is not a scoring model", param="model")
        key = ROUTING.get().key or (
            prompt_key(self.upstream_model, prompts[0], self.options.prefix_chars) if prompts else ""
        )
        out: list[float] = await self._on_replica(key, lambda e: e.score(prompts, request_id=request_id))
        return out

    async def prompt_logprobs(
        self, prompt: PromptInput, *, start: int = 0, request_id: str | None = None
    ) -> list[float]:
        key = ROUTING.get().key or prompt_key(self.upstream_model, prompt, self.options.prefix_chars)
        out: list[float] = await self._on_replica(key, lambda e: e.prompt_logprobs(prompt, start=start))
        return out


def _replica_fault(e: Exception) -> bool:
    """Whether ``e`` is the replica's fault (try another) rather than the request's."""
    if isinstance(e, EngineUnavailableError):
        return True
    if not isinstance(e, UpstreamError):
        return False
    status = e.upstream_status
    # 404: the replica does not serve the model (anymore); 429: it is full; 5xx: it failed
    return status is None or status >= 500 or status in (404, 429)


@dataclass(eq=False)
class _Run:
    """One candidate's life on the pool: the replicas to try, the one it runs on."""

    plan: list[Replica]
    on: Replica | None = None
    streamed: str = ""  # text already passed on in delta events (a redraw must match it)
    tried: list[Replica] = field(default_factory=list)


class _PoolFanout(StreamsFanout):
    def __init__(
        self,
        pool: ReplicaPool,
        prompt: PromptInput,
        settings: list[SamplingSettings],
        plans: list[list[Replica]],
        groups: list[list[int]],
        key: str,
        request_id: str,
    ):
        super().__init__([Candidate(i, s) for i, s in enumerate(settings)], 0, request_id)
        self._pool = pool
        self._prompt = prompt
        self._chat = is_chat(prompt)
        self._headers = {"X-Session-ID": _header_safe(key)}
        self._runs = [_Run(p) for p in plans]
        self._task_of, self._all_tasks = {}, []
        for g in groups:
            self._spawn(g, self._run(g[0]) if len(g) == 1 else self._run_group(g))

    @property
    def placement(self) -> list[str | None]:
        """The replica each candidate runs (or ran) on."""
        return [r.on.url if r.on else None for r in self._runs]

    async def _run_group(self, group: list[int]) -> None:
        """Candidates of one replica as one ``n=k`` request; those a lost replica took with it
        are redrawn one by one down their orders (and all go one by one to a replica that does
        not take ``n``)."""
        rep = self._runs[group[0]].plan[0]
        if not rep.up or not rep.engine.takes_n:  # ejected since the placement, or no n there
            for i in group:
                if not self.candidates[i].finished:
                    self._spawn([i], self._run(i))
            return
        cands = [self.candidates[i] for i in group]
        for i, c in zip(group, cands, strict=True):
            c.started_at = time.perf_counter()
            self._runs[i].on = rep
            self._runs[i].tried.append(rep)
        rep.in_flight += len(group)
        rep.candidates += len(group)
        held = len(group)

        def finish(c: Candidate) -> None:
            nonlocal held
            held -= 1
            rep.in_flight -= 1  # the replica's load drops as each choice ends
            self._end(c)

        try:
            await stream_group(
                rep.engine,
                self._prompt,
                cands,
                lambda ev: self._relay(self._runs[ev.candidate.index], ev),
                finish,
                on_prompt_tokens=self._set_prompt_tokens,
                headers=self._headers,
            )
        except GroupRefused as e:  # not the replica's fault: the open ones go one by one
            if e.error is None:
                rep.engine.takes_n = False
            for i, c in zip(group, cands, strict=True):
                if not c.finished:
                    c.lost_tokens += c.token_count
                    reset_candidate(c)
                    self._runs[i].tried.remove(rep)
                    rep.candidates -= 1
                    self._spawn([i], self._run(i))
        except (EngineUnavailableError, UpstreamError, InvalidRequestError) as e:
            if not _replica_fault(e):
                self._fail(e)
                return
            self._pool.eject(rep, str(e))
            for i, c in zip(group, cands, strict=True):
                if c.finished:
                    continue
                rep.redrawn += 1
                c.lost_tokens += c.token_count
                c.redraws += 1
                reset_candidate(c)
                self._spawn([i], self._run(i))
        except (ValueError, TypeError, AttributeError) as e:  # a malformed answer: never a hang
            self._fail(UpstreamError(f"replica {rep.url} sent a malformed stream: {e}", status=502))
        finally:
            rep.in_flight -= held

    async def _run(self, i: int) -> None:
        c, run = self.candidates[i], self._runs[i]
        c.started_at = c.started_at or time.perf_counter()
        opts = self._pool.options
        while True:
            rep = next((r for r in run.plan if r.up and r not in run.tried), None)
            if rep is None or len(run.tried) > opts.retries:
                why = "; ".join(f"{r.url}: {r.last_error}" for r in run.tried) or "none is up"
                self._fail(EngineUnavailableError(f"no replica of {self._pool.name!r} could run the request ({why})"))
                return
            run.on = rep
            run.tried.append(rep)
            rep.in_flight += 1
            rep.candidates += 1
            try:
                pt = await stream_candidate(
                    rep.engine, self._prompt, c, lambda ev: self._relay(run, ev), headers=self._headers
                )
                self.prompt_tokens = self.prompt_tokens or pt
                break
            except (EngineUnavailableError, UpstreamError, InvalidRequestError) as e:
                if not _replica_fault(e):
                    self._fail(e)
                    return
                self._pool.eject(rep, str(e))
                rep.redrawn += 1
                c.lost_tokens += c.token_count
                c.redraws += 1
                reset_candidate(c)
            except _Diverged as e:
                self._fail(UpstreamError(str(e), status=502))
                return
            except (ValueError, TypeError, AttributeError) as e:  # a malformed answer: never a hang
                self._fail(UpstreamError(f"replica {rep.url} sent a malformed stream: {e}", status=502))
                return
            finally:
                rep.in_flight -= 1
        self._end(c)

    def _relay(self, run: _Run, ev: CandidateEvent) -> None:
        """Pass a delta on; after a redraw, only what goes beyond the text already passed on
        (the same seed draws the same text; one that differs cannot be taken back)."""
        c = ev.candidate
        if not c.redraws:
            run.streamed = c.text
            self._emit(ev)
            return
        if len(c.text) <= len(run.streamed):
            if not run.streamed.startswith(c.text):
                raise _Diverged("a redrawn candidate differs from the text already streamed")
            return
        if not c.text.startswith(run.streamed):
            raise _Diverged("a redrawn candidate differs from the text already streamed")
        delta = c.text[len(run.streamed) :]
        run.streamed = c.text
        self._emit(CandidateEvent(c, delta, ev.delta_tokens, False))


class _Diverged(Exception):
    pass


def _header_safe(key: str) -> str:
    """A key as an HTTP header value: a session id as it came, a prompt key as its hash."""
    if key.isascii() and key.isprintable() and len(key) <= 256:
        return key
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
