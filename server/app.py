"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics. A request's ``ttscale`` object picks the strategy and the budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ttscale.budget import parse_budget
from ttscale.engine import Engine, ModelPool, SamplingSettings
from ttscale.errors import InvalidRequestError, OverloadedError, TTScaleError
from ttscale.server import errors
from ttscale.server.metrics import Metrics
from ttscale.server.protocol import ChatCompletionRequest, CompletionRequest
from ttscale.strategies import RunContext, Strategy, StrategyResult, get_strategy, registered

log = logging.getLogger(__name__)

STREAM_PIECE_CHARS = 24  # selected answers stream in pieces of this many characters
DEFAULT_UPSTREAM_MAX_TOKENS = 1024  # max_tokens when neither the request nor a tokenizer sets it


def create_app(pool: ModelPool, *, max_concurrent_requests: int = 256,
               manage_pool: bool = True, profiles: dict[str, str] | None = None) -> FastAPI:
    """The app serving ``pool``. With ``manage_pool`` the app starts and closes the models.

    ``profiles`` maps model names to budget-profile files (adaptive budgets); a generating
    model without one uses the profile shipped for it, if any.
    """
    from ttscale.adaptive import load_profile

    loaded = {}
    for e in pool:
        if e.role == "generate":
            prof = load_profile(e.name, (profiles or {}).get(e.name))
            if prof is not None:
                loaded[e.name] = prof

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_pool:
            await pool.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            if manage_pool:
                await pool.close()

    app = FastAPI(title="ttscale", version=_version(), lifespan=lifespan)
    app.state.pool = pool
    app.state.ready = False
    app.state.metrics = metrics = Metrics(pool)
    app.state.in_flight = 0
    app.state.profiles = loaded
    errors.install(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        # 200 only while every engine is up: a supervisor restarts a server whose engine died.
        alive = pool.alive
        ok = app.state.ready and all(alive.values())
        status = "ok" if ok else ("starting" if not app.state.ready else "engine_down")
        return JSONResponse(
            {"status": status, "models": pool.names, "engines": {n: "up" if a else "down" for n, a in alive.items()},
             "engine_requests_running": pool.num_running, "requests_in_flight": app.state.in_flight},
            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [_model_card(e, app.state.profiles) for e in pool]
        cards += [{**_model_card(pool.get(name), app.state.profiles), "id": alias, "root": name}
                  for alias, name in pool.aliases.items()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return _model_card(pool.get(name), app.state.profiles)

    @app.get("/v1/strategies")
    async def strategies() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "summary": c.summary, "options": c.Options.model_json_schema()}
            for n, c in sorted(registered().items())]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _serve(app, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(app, request, body, chat=False)

    app.state.max_concurrent_requests = max_concurrent_requests
    return app


def _version() -> str:
    from ttscale import __version__

    return __version__


def _model_card(e: Engine, profiles: dict | None = None) -> dict[str, Any]:
    prof = (profiles or {}).get(e.name)
    return {"id": e.name, "object": "model", "created": 0, "owned_by": "ttscale",
            "max_model_len": e.max_model_len,
            "ttscale": {"role": e.role, "budget_profile": prof.source if prof is not None else None}}


def _parse_ttscale(raw: dict[str, Any] | None):
    raw = dict(raw or {})
    name = raw.pop("strategy", "none")
    if not isinstance(name, str):
        raise InvalidRequestError("strategy must be a string", param="ttscale.strategy")
    budget = parse_budget(raw.pop("budget", None))
    return_samples = raw.pop("return_samples", False)
    if not isinstance(return_samples, bool):
        raise InvalidRequestError("return_samples must be a boolean", param="ttscale.return_samples")
    strategy: Strategy = get_strategy(name).from_request(raw)
    strategy.check_budget(budget)
    return strategy, budget, return_samples


async def _serve(app: FastAPI, request: Request, body: ChatCompletionRequest | CompletionRequest,
                 *, chat: bool):
    pool: ModelPool = app.state.pool
    metrics: Metrics = app.state.metrics
    if app.state.in_flight >= app.state.max_concurrent_requests:
        raise OverloadedError(f"more than {app.state.max_concurrent_requests} requests in flight; retry later")
    slot = _Slot(app.state)  # held from admission: streams and requests still tokenising count too
    try:
        return await _admitted(app, request, body, chat=chat, slot=slot)
    except BaseException:
        slot.release_unless_owned()
        raise


class _Slot:
    """One admitted request in ``app.state.in_flight``; released once, by whoever ends it."""

    def __init__(self, state: Any):
        self.state = state
        self.held = True
        self.owned = False  # a running task (or stream) has taken over the release
        self.started = False  # a stream's generator has begun (its task releases the slot)
        state.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.in_flight -= 1

    def release_unless_owned(self) -> None:
        if not self.owned:
            self.release()

    def release_unless_started(self) -> None:
        if not self.started:
            self.release()


async def _admitted(app: FastAPI, request: Request, body: ChatCompletionRequest | CompletionRequest,
                    *, chat: bool, slot: _Slot):
    pool: ModelPool = app.state.pool
    metrics: Metrics = app.state.metrics
    engine = pool.get(body.model, role="generate")
    strategy, budget, return_samples = _parse_ttscale(body.ttscale)

    prompt: Any = body.message_dicts() if chat else body.prompt
    ids: list[int] | None = None
    if engine.can_render:  # else an upstream checks lengths itself
        # tokenised once, in a worker thread: a long prompt must not stall other requests
        if chat:
            ids = await asyncio.to_thread(engine.render, prompt,
                                          continue_final_message=body.continue_final_message,
                                          add_generation_prompt=body.add_generation_prompt)
            if body.continue_final_message:
                prompt = ids  # rendered exactly as asked; the engine takes the ids
        else:
            ids = await asyncio.to_thread(engine.render, prompt)
    ctx_len = engine.max_model_len
    if ctx_len is not None and ids is not None:
        if len(ids) >= ctx_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; model {engine.name!r} takes at most {ctx_len - 1}",
                param="messages" if chat else "prompt", code="context_length_exceeded")
        room = ctx_len - len(ids)
        if body.max_tokens is not None and body.max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens={body.max_tokens} does not fit: the prompt has {len(ids)} tokens and "
                f"the context {ctx_len}", param="max_tokens", code="context_length_exceeded")
    else:
        room = DEFAULT_UPSTREAM_MAX_TOKENS
    settings = SamplingSettings(
        temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k if body.top_k and body.top_k > 0 else 0,
        max_tokens=body.max_tokens or room, min_tokens=body.min_tokens, seed=body.seed,
        stop=tuple(body.stop or ()), logprobs=body.logprobs_k,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    ctx = RunContext(pool=pool, model=engine, prompt=prompt, settings=settings, n=body.n,
                     budget=budget, request_id=rid, profile=app.state.profiles.get(engine.name),
                     prompt_ids=ids)
    meta = dict(id=rid, created=int(time.time()), model=engine.name, chat=chat,
                strategy=strategy.name, return_samples=return_samples, engine=engine,
                logprobs=body.logprobs_k is not None,
                echo=(body.prompt if (not chat and getattr(body, "echo", False)) else None))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(app, strategy, ctx, meta, include_usage, slot)
        # a stream the server never starts (its client left first) still gives its slot back;
        # a started one gives it back when its strategy task has ended (``settle``)
        weakref.finalize(gen, slot.release_unless_started)
        slot.owned = True
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    slot.owned = True
    t0 = time.perf_counter()
    state = {"status": "ok"}
    work = asyncio.create_task(strategy.run(ctx))

    def settle(task: asyncio.Task) -> None:
        # After the strategy's own cleanup (engine requests finished or aborted, tokens booked).
        if not task.cancelled() and task.exception() is not None:
            state["status"] = type(task.exception()).__name__
        slot.release()
        metrics.requests.labels("chat" if chat else "completions", strategy.name, state["status"]).inc()
        metrics.count_tokens(ctx.usage)

    work.add_done_callback(settle)
    gone = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server gave up on this request (client gone)
        state["status"] = "disconnected"
        metrics.disconnects.inc()
        work.cancel()  # its cleanup aborts every engine request; no await under a cancelled scope
        raise
    finally:
        gone.cancel()
    if work not in done:  # the client left: stop every engine request of it
        state["status"] = "disconnected"
        metrics.disconnects.inc()
        work.cancel()
        return Response(status_code=499)
    result = work.result()  # raises the strategy's error, mapped to HTTP by the handlers
    metrics.observe(strategy.name, result.info, time.perf_counter() - t0)
    # built and serialised in a worker thread: K samples' texts and log-probs make large bodies
    body_bytes = await asyncio.to_thread(
        lambda: _dumps(_response(result, ctx, meta, time.perf_counter() - t0)))
    return Response(body_bytes, media_type="application/json")


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _ttscale_info(result: StrategyResult, ctx: RunContext, meta: dict, seconds: float) -> dict[str, Any]:
    info = {"strategy": meta["strategy"], **{k: v for k, v in result.info.items() if k != "per_sample"}}
    info["budget"] = ctx.budget.model_dump(exclude_none=True, exclude_defaults=True)
    info["usage"] = ctx.usage.detail()
    info["elapsed_ms"] = round(seconds * 1000.0, 1)
    if meta["return_samples"]:
        per = result.info.get("per_sample") or [{} for _ in result.candidates]
        info["samples"] = [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "tokens": c.num_tokens,
             "mean_logprob": c.mean_logprob, **extra}
            for i, (c, extra) in enumerate(zip(result.candidates, per))]
    return info


def _logprobs_obj(engine: Engine, cand, chat: bool) -> dict[str, Any] | None:
    if cand is None or cand.logprobs is None:
        return None
    toks = _token_strings(engine, cand.token_ids)
    tops = cand.top_logprobs or [[] for _ in cand.logprobs]
    if chat:
        return {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())}
                              for s, v in zip(_token_strings(engine, [i for i, _ in top]), [v for _, v in top])]}
            for t, lp, top in zip(toks, cand.logprobs, tops)]}
    return {"tokens": toks, "token_logprobs": cand.logprobs,
            "top_logprobs": [dict(zip(_token_strings(engine, [i for i, _ in top]), [v for _, v in top]))
                             for top in tops] if cand.top_logprobs is not None else None,
            "text_offset": None}


def _token_strings(engine: Engine, ids: list[int]) -> list[str]:
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return [i if isinstance(i, str) else tok.decode([i]) for i in ids]


def _response(result: StrategyResult, ctx: RunContext, meta: dict, seconds: float) -> dict[str, Any]:
    chat = meta["chat"]
    choices = []
    for ch in result.choices:
        # only when the request asked: strategies draw log-probs for their own use (tie-breaks)
        lp = _logprobs_obj(meta["engine"], ch.candidate, chat) if meta["logprobs"] else None
        if chat:
            choices.append({"index": ch.index, "message": {"role": "assistant", "content": ch.text},
                            "logprobs": lp, "finish_reason": ch.finish_reason})
        else:
            text = (meta["echo"] if isinstance(meta["echo"], str) else "") + ch.text
            choices.append({"index": ch.index, "text": text, "logprobs": lp,
                            "finish_reason": ch.finish_reason})
    return {"id": meta["id"], "object": "chat.completion" if chat else "text_completion",
            "created": meta["created"], "model": meta["model"], "choices": choices,
            "usage": ctx.usage.openai(), "ttscale": _ttscale_info(result, ctx, meta, seconds)}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(app: FastAPI, strategy: Strategy, ctx: RunContext, meta: dict,
                  include_usage: bool, slot: _Slot) -> AsyncIterator[bytes]:
    slot.started = True
    metrics: Metrics = app.state.metrics
    chat = meta["chat"]
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": meta["id"], "object": obj, "created": meta["created"], "model": meta["model"]}

    def chunk(index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              **extra: Any) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [c], **extra}

    queue: asyncio.Queue[tuple] = asyncio.Queue()

    async def on_delta(i: int, text: str) -> None:
        queue.put_nowait(("delta", i, text))

    async def on_progress(ev: dict[str, Any]) -> None:
        queue.put_nowait(("progress", ev))

    ctx.on_delta = on_delta
    ctx.on_progress = on_progress

    async def run() -> None:
        try:
            queue.put_nowait(("result", await strategy.run(ctx)))
        except BaseException as e:  # noqa: BLE001 - forwarded into the stream
            queue.put_nowait(("error", e))

    t0 = time.perf_counter()
    status = "ok"
    task = asyncio.create_task(run())

    def settle(_: asyncio.Task) -> None:
        # Runs when the strategy task ends, after its engine requests were finished or aborted
        # and booked. Not in the generator's `finally`: on a disconnect the server cancels the
        # generator's scope, and every await there would be cancelled again.
        slot.release()
        metrics.requests.labels("chat" if chat else "completions", strategy.name, status).inc()
        metrics.count_tokens(ctx.usage)

    task.add_done_callback(settle)
    try:
        for i in range(ctx.n):
            yield _sse(chunk(i, "" if chat else None, role=True))
        echo = meta["echo"]
        if isinstance(echo, str):
            for i in range(ctx.n):
                yield _sse(chunk(i, echo))
        while True:
            item = await queue.get()
            kind = item[0]
            if kind == "delta":
                yield _sse(chunk(item[1], item[2]))
            elif kind == "progress":
                yield _sse(chunk(0, None if chat else "", ttscale={"progress": item[1]}))
            elif kind == "error":
                exc = item[1]
                status = type(exc).__name__
                if isinstance(exc, asyncio.CancelledError):
                    raise exc
                resp = errors.to_response(exc)
                yield _sse(json.loads(resp.body))
                yield b"data: [DONE]\n\n"
                return
            else:
                result: StrategyResult = item[1]
                seconds = time.perf_counter() - t0
                if not result.streamed:
                    for ch in result.choices:
                        for k in range(0, len(ch.text), STREAM_PIECE_CHARS):
                            yield _sse(chunk(ch.index, ch.text[k:k + STREAM_PIECE_CHARS]))
                info = _ttscale_info(result, ctx, meta, seconds)
                for ch in result.choices:
                    yield _sse(chunk(ch.index, None if chat else "", finish=ch.finish_reason,
                                     ttscale=info if ch.index == result.choices[-1].index else None))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": ctx.usage.openai()})
                yield b"data: [DONE]\n\n"
                metrics.observe(strategy.name, result.info, seconds)
                return
    except (asyncio.CancelledError, GeneratorExit):
        status = "disconnected"
        metrics.disconnects.inc()
        raise
    finally:
        if not task.done():
            task.cancel()  # its own cleanup aborts the engine requests
