"""Serving one completions request: admission, request → run (strategy, budget, sampling,
prompt tokens), the run itself with disconnect handling, the answer as JSON or a stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import State
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ttscale.adaptive import select_profile
from ttscale.budget import Budget, parse_budget
from ttscale.engine import ModelPool, PromptInput, SamplingSettings
from ttscale.engine.base import PLACEMENTS, Placement, Routing, check_encodable, prompt_chars
from ttscale.errors import InvalidRequestError, OverloadedError, ShuttingDownError
from ttscale.run import JSON, RunContext, StrategyResult
from ttscale.server import errors, render
from ttscale.server.limits import Drain
from ttscale.server.metrics import Metrics
from ttscale.server.protocol import ChatCompletionRequest, CompletionRequest
from ttscale.server.render import Endpoint, Reply, StreamWriter
from ttscale.strategies import Strategy, get_strategy

DEFAULT_UPSTREAM_MAX_TOKENS = 1024  # max_tokens when neither the request nor a tokenizer sets it

Body: TypeAlias = ChatCompletionRequest | CompletionRequest


class Slot:
    """One admitted request in ``state.in_flight``; released once, by whoever ends it. A slot
    given back while requests queue passes straight to the first of them."""

    def __init__(self, state: State, *, handed_over: bool = False):
        self.state = state
        self.held = True
        self.owned = False  # a running task (or stream) has taken over the release
        self.started = False  # a stream's generator has begun (its task releases the slot)
        if not handed_over:  # else it was counted for the request that gave it back
            state.in_flight += 1
            state.metrics.in_flight.set(state.in_flight)

    def release(self) -> None:
        if self.held:
            self.held = False
            if not self.state.queue.hand_over():
                self.state.in_flight -= 1
                self.state.metrics.in_flight.set(self.state.in_flight)

    def release_unless_owned(self) -> None:
        if not self.owned:
            self.release()

    def release_unless_started(self) -> None:
        if not self.started:
            self.release()


class AdmissionQueue:
    """Requests beyond the concurrency limit wait here (first come, first served), at most
    ``max_queued`` of them and ``timeout_s`` each; beyond either they get 429."""

    def __init__(self, metrics: Metrics, max_queued: int = 0, timeout_s: float = 30.0):
        self.metrics = metrics
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def hand_over(self) -> bool:
        """Give a slot being released to the first waiter; False when none waits."""
        while self._waiters:
            fut = self._waiters.popleft()
            self.metrics.queued.set(len(self._waiters))
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    async def wait(self, state: State, limit: int) -> Slot:
        """A slot, once one is handed over; OverloadedError when the queue is full or the wait too long."""
        if len(self._waiters) >= self.max_queued:
            raise OverloadedError(f"more than {limit} requests in flight; retry later")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.metrics.queued.set(len(self._waiters))
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except BaseException as e:
            if fut.done() and not fut.cancelled():  # handed over just as the wait ended: pass it on
                Slot(state, handed_over=True).release()
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
                self.metrics.queued.set(len(self._waiters))
            if isinstance(e, TimeoutError):
                raise OverloadedError(
                    f"more than {limit} requests in flight; waited {self.timeout_s:g} s in the queue; retry later"
                ) from None
            raise
        finally:
            self.metrics.queue_time.observe(time.perf_counter() - t0)
        return Slot(state, handed_over=True)


@dataclass
class Run:
    """A request made ready to run."""

    strategy: Strategy[Any]
    ctx: RunContext
    reply: Reply


def parse_ttscale(raw: dict[str, Any] | None) -> tuple[Strategy[Any], Budget, bool, Placement]:
    raw = dict(raw or {})
    name = raw.pop("strategy", "none")
    if not isinstance(name, str):
        raise InvalidRequestError("strategy must be a string", param="ttscale.strategy")
    budget = parse_budget(raw.pop("budget", None))
    return_samples = raw.pop("return_samples", False)
    if not isinstance(return_samples, bool):
        raise InvalidRequestError("return_samples must be a boolean", param="ttscale.return_samples")
    placement = raw.pop("placement", "auto")
    if placement not in PLACEMENTS:
        raise InvalidRequestError(
            f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}", param="ttscale.placement"
        )
    strategy = get_strategy(name).from_request(raw)
    strategy.check_budget(budget)
    return strategy, budget, return_samples, placement


MAX_SESSION_ID = 256


def session_key(request: Request | None) -> str | None:
    """The client's ``X-Session-ID``: requests that share one share a replica."""
    sid = request.headers.get("x-session-id") if request is not None else None
    if sid is not None and (not sid or len(sid) > MAX_SESSION_ID):
        raise InvalidRequestError(f"X-Session-ID must be 1 to {MAX_SESSION_ID} characters", param="X-Session-ID")
    return sid


async def prepare(state: State, body: Body, endpoint: Endpoint, request: Request | None = None) -> Run:
    """The run of a request: its model, strategy and budget, the prompt tokenised once (in a
    worker thread: a long prompt must not stall other requests) and checked against the context."""
    pool: ModelPool = state.pool
    engine = pool.get(body.model, role="generate")
    strategy, budget, return_samples, placement = parse_ttscale(body.ttscale)
    routing = Routing(key=session_key(request), placement=placement, deadline=budget.deadline_ms is not None)
    chat = isinstance(body, ChatCompletionRequest)
    prompt: PromptInput = body.message_dicts() if isinstance(body, ChatCompletionRequest) else body.prompt_input()
    check_encodable(prompt)  # whichever engine serves it
    ctx_len = engine.max_model_len
    if ctx_len is not None and engine.max_token_chars and engine.can_render:
        # a text too long for any tokenization of it is refused before it is tokenised
        chars = prompt_chars(prompt)
        if chars > ctx_len * engine.max_token_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters, at least {-(-chars // engine.max_token_chars)} tokens; "
                f"model {engine.name!r} takes at most {ctx_len - 1}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
    ids: list[int] | None = None
    if engine.can_render:  # else an upstream checks lengths itself
        if isinstance(body, ChatCompletionRequest):
            ids = await asyncio.to_thread(
                engine.render,
                prompt,
                continue_final_message=body.continue_final_message,
                add_generation_prompt=body.add_generation_prompt,
            )
            if body.continue_final_message:
                prompt = ids  # rendered exactly as asked; the engine takes the ids
        else:
            ids = await asyncio.to_thread(engine.render, prompt)
    if ctx_len is not None and ids is not None:
        if len(ids) >= ctx_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; model {engine.name!r} takes at most {ctx_len - 1}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        room = ctx_len - len(ids)
        if body.max_tokens is not None and body.max_tokens > room:
            param = body.max_tokens_param
            raise InvalidRequestError(
                f"{param}={body.max_tokens} does not fit: the prompt has {len(ids)} tokens and the context {ctx_len}",
                param=param,
                code="context_length_exceeded",
            )
    else:
        room = DEFAULT_UPSTREAM_MAX_TOKENS
    settings = SamplingSettings(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else 0,
        max_tokens=body.max_tokens or room,
        min_tokens=body.min_tokens,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        logprobs=body.logprobs_k,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
    )
    rid = endpoint.id_prefix + uuid.uuid4().hex[:24]
    ctx = RunContext(
        pool=pool,
        model=engine,
        prompt=prompt,
        settings=settings,
        n=body.n,
        budget=budget,
        request_id=rid,
        profile=select_profile(state.profiles.get(engine.name, ()), prompt),
        prompt_ids=ids,
        routing=routing,
    )
    echo = body.prompt if isinstance(body, CompletionRequest) and body.echo and isinstance(body.prompt, str) else None
    reply = Reply(
        endpoint=endpoint,
        id=rid,
        model=engine.name,
        strategy=strategy.name,
        engine=engine,
        logprobs=body.logprobs_k is not None,
        return_samples=return_samples,
        echo=echo,
    )
    return Run(strategy, ctx, reply)


class _EventStream(StreamingResponse):
    """A stream that ends its generator (and with it the strategy's engine requests) as soon as
    the client is gone: servers of ASGI 2.4 tell by a failed send, which leaves the generator
    suspended until garbage collection would close it; nothing is left to answer then."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _cut_short(drain: Drain) -> ShuttingDownError:
    return ShuttingDownError(f"the server shut down before this request finished (grace period {drain.grace_s:g} s)")


async def serve(state: State, request: Request, body: Body, endpoint: Endpoint) -> Response:
    if state.drain.draining:
        raise ShuttingDownError("the server is shutting down; it takes no new requests")
    limit = state.max_concurrent_requests
    if state.in_flight >= limit or state.queue.waiting:  # behind those already queued
        slot = await state.queue.wait(state, limit)
    else:
        slot = Slot(state)  # held from admission: streams and requests still tokenising count too
    try:
        run = await prepare(state, body, endpoint, request)
        if body.stream:
            opts = body.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = bool(opts and opts.continuous_usage_stats)
            gen = _stream(state.metrics, state.drain, run, include_usage, slot, continuous)
            # a stream the server never starts (its client left first) still gives its slot back;
            # a started one gives it back when its strategy task has ended (``settle``)
            weakref.finalize(gen, slot.release_unless_started)
            slot.owned = True
            return _EventStream(
                gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        slot.owned = True
        return await _answer(state.metrics, state.drain, request, run, slot)
    except BaseException:
        slot.release_unless_owned()
        raise


def _settler(metrics: Metrics, run: Run, slot: Slot, status: list[str]) -> Callable[[asyncio.Task[Any]], None]:
    """The done-callback of a strategy task: runs after the strategy's own cleanup (engine
    requests finished or aborted, tokens booked), whatever ended it."""

    def settle(task: asyncio.Task[Any]) -> None:
        if status[0] == "ok" and not task.cancelled() and task.exception() is not None:
            status[0] = type(task.exception()).__name__
        slot.release()
        metrics.requests.labels(run.reply.endpoint.name, run.strategy.name, status[0]).inc()
        metrics.count_tokens(run.ctx.usage)

    return settle


async def _answer(metrics: Metrics, drain: Drain, request: Request, run: Run, slot: Slot) -> Response:
    t0 = time.perf_counter()
    status = ["ok"]
    work = asyncio.create_task(run.strategy.execute(run.ctx))
    work.add_done_callback(_settler(metrics, run, slot, status))
    gone = asyncio.create_task(_wait_disconnect(request))
    expired = asyncio.create_task(drain.wait_expired())
    try:
        done, _ = await asyncio.wait({work, gone, expired}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server gave up on this request (client gone)
        status[0] = "disconnected"
        metrics.disconnects.inc()
        work.cancel()  # its cleanup aborts every engine request; no await under a cancelled scope
        raise
    finally:
        gone.cancel()
        expired.cancel()
    if work not in done and expired in done:  # shutting down, out of grace: abort, answer 503
        status[0] = "shutdown"
        work.cancel()
        raise _cut_short(drain)
    if work not in done:  # the client left: stop every engine request of it
        status[0] = "disconnected"
        metrics.disconnects.inc()
        work.cancel()
        return Response(status_code=499)
    result = work.result()  # raises the strategy's error, mapped to HTTP by the handlers
    metrics.observe(run.strategy.name, result, time.perf_counter() - t0)
    # built and serialised in a worker thread: K samples' texts and log-probs make large bodies
    body = await asyncio.to_thread(
        lambda: render.dumps(render.response(result, run.ctx, run.reply, time.perf_counter() - t0))
    )
    return Response(body, media_type="application/json")


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _stream(
    metrics: Metrics, drain: Drain, run: Run, include_usage: bool, slot: Slot, continuous_usage: bool = False
) -> AsyncIterator[bytes]:
    slot.started = True
    ctx = run.ctx
    out = StreamWriter(
        run.reply, ctx.n, continuous_usage=continuous_usage, prompt_tokens=len(ctx.prompt_ids or ()) or None
    )
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def on_delta(i: int, text: str, tokens: int) -> None:
        queue.put_nowait(("delta", (i, text, tokens)))

    async def on_progress(ev: dict[str, JSON]) -> None:
        queue.put_nowait(("progress", ev))

    ctx.on_delta = on_delta
    ctx.on_progress = on_progress

    async def work() -> None:
        try:
            queue.put_nowait(("result", await run.strategy.execute(ctx)))
        except BaseException as e:  # forwarded into the stream
            queue.put_nowait(("error", e))

    t0 = time.perf_counter()
    status = ["ok"]
    task = asyncio.create_task(work())
    # Not in the generator's `finally`: on a disconnect the server cancels the generator's
    # scope, and every await there would be cancelled again.
    task.add_done_callback(_settler(metrics, run, slot, status))
    expired = asyncio.create_task(drain.wait_expired())

    def out_of_grace(t: asyncio.Task[None]) -> None:
        if not t.cancelled():
            queue.put_nowait(("error", _cut_short(drain)))

    expired.add_done_callback(out_of_grace)
    try:
        for piece in out.opening():
            yield piece
        while True:
            kind, item = await queue.get()
            if kind == "delta":
                yield out.delta(*item)
            elif kind == "progress":
                yield out.progress(item)
            elif kind == "error":
                status[0] = "shutdown" if isinstance(item, ShuttingDownError) else type(item).__name__
                if isinstance(item, asyncio.CancelledError):
                    raise item
                for piece in out.error(errors.error_json(item)):
                    yield piece
                return
            else:
                result: StrategyResult = item
                seconds = time.perf_counter() - t0
                for piece in out.closing(result, ctx, seconds, include_usage):
                    yield piece
                metrics.observe(run.strategy.name, result, seconds)
                return
    except (asyncio.CancelledError, GeneratorExit):
        status[0] = "disconnected"
        metrics.disconnects.inc()
        raise
    finally:
        expired.cancel()
        if not task.done():
            task.cancel()  # its own cleanup aborts the engine requests
