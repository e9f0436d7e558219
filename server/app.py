"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models,
/v1/strategies, /health, /metrics. A request's ``ttscale`` object picks the strategy and the
budget. This module builds the app; routes are in ``routes``, serving in ``serving``, the wire
format in ``render``, the error mapping in ``errors``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ttscale.engine import ModelPool
from ttscale.server import errors
from ttscale.server.auth import DOCS_PATHS, ApiKeyAuth
from ttscale.server.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, Drain, watch_engines
from ttscale.server.metrics import Metrics
from ttscale.server.routes import router
from ttscale.server.serving import AdmissionQueue


def create_app(
    pool: ModelPool,
    *,
    max_concurrent_requests: int = 256,
    manage_pool: bool = True,
    profiles: Mapping[str, str | Sequence[str]] | None = None,
    api_keys: Sequence[str] = (),
    public_metrics: bool = False,
    public_docs: bool = False,
    cors_origins: Sequence[str] = (),
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_engine_death: Callable[[list[str]], None] | None = None,
    max_queued_requests: int = 0,
    queue_timeout_s: float = 30.0,
) -> FastAPI:
    """The app serving ``pool``. With ``manage_pool`` the app starts and closes the models.

    ``profiles`` maps model names to budget-profile files (adaptive budgets), one or several (a
    request gets the one fitted on its prompt format, ``select_profile``); a generating model
    without one uses the profile shipped for it, if any. With ``api_keys`` every route
    but ``/health`` (and ``/metrics``, the docs, when public) needs one of them; ``cors_origins``
    are the browser origins allowed to call the API. Beyond ``max_concurrent_requests``, up to
    ``max_queued_requests`` wait for a slot (``queue_timeout_s`` each) before 429s.
    ``on_engine_death(names)`` is called once when an engine stops (the command line exits the
    server then, so a supervisor restarts it).
    """
    from ttscale.adaptive import Profile, load_profile

    loaded: dict[str, list[Profile]] = {}
    for e in pool:
        if e.role == "generate":
            given = (profiles or {}).get(e.name)
            paths: list[str | None] = [given] if isinstance(given, str) else list(given or []) or [None]
            profs = [p for p in (load_profile(e.name, path) for path in paths) if p is not None]
            if profs:
                loaded[e.name] = profs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_pool:
            await pool.start()
        app.state.ready = True
        watch = asyncio.create_task(watch_engines(pool, on_engine_death)) if on_engine_death else None
        try:
            yield
        finally:
            app.state.ready = False
            if watch is not None:
                watch.cancel()
            if manage_pool:
                await pool.close()

    app = FastAPI(title="ttscale", version=_version(), lifespan=lifespan)
    # what the routes read (request.app.state)
    app.state.pool = pool
    app.state.ready = False
    app.state.metrics = Metrics(pool)
    app.state.queue = AdmissionQueue(app.state.metrics, max_queued_requests, queue_timeout_s)
    app.state.in_flight = 0
    app.state.drain = Drain()  # begun by the command line's server on SIGTERM
    app.state.max_concurrent_requests = max_concurrent_requests
    app.state.profiles = loaded
    errors.install(app)
    app.include_router(router)
    if api_keys:
        open_paths = ["/health", *(["/metrics"] if public_metrics else []), *(DOCS_PATHS if public_docs else [])]
        app.add_middleware(ApiKeyAuth, keys=list(api_keys), open_paths=open_paths)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if cors_origins:  # outermost: a browser's preflight is answered before authentication
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _version() -> str:
    from ttscale import __version__

    return __version__
