"""The HTTP routes; each hands its work to a serving module (:mod:`ttscale.server.serving`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ttscale.engine import Engine
from ttscale.engine.replicas import ReplicaPool
from ttscale.server import serving
from ttscale.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from ttscale.server.render import CHAT, COMPLETIONS
from ttscale.strategies import registered

router = APIRouter()


def _health(state: Any) -> tuple[str, dict[str, Any]]:
    alive = state.pool.alive
    replicas = {e.name: e.replica_states() for e in state.pool if isinstance(e, ReplicaPool)}
    if not all(alive.values()):
        status = "engine_down"
    elif any(not any(r["up"] for r in reps.values()) for reps in replicas.values()):
        status = "no_replica"  # a replicated model has none up (the server itself is alive)
    elif not state.ready:
        status = "starting"
    elif state.drain.draining:
        status = "draining"
    else:
        status = "ok"
    return status, {
        "status": status,
        "models": state.pool.names,
        "engines": {n: "up" if a else "down" for n, a in alive.items()},
        "engine_requests_running": state.pool.num_running,
        "requests_in_flight": state.in_flight,
        **({"replicas": replicas} if replicas else {}),
    }


@router.get("/health")
@router.get("/health/ready")
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 only while every engine is up and the server admits requests (not while
    it starts or drains for a shutdown)."""
    status, body = _health(request.app.state)
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    """Liveness: 503 only when an engine has died (a supervisor restarts the server then);
    starting and draining servers are alive."""
    status, body = _health(request.app.state)
    return JSONResponse(body, status_code=503 if status == "engine_down" else 200)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def model_card(e: Engine, profiles: dict[str, Any]) -> dict[str, Any]:
    profs = profiles.get(e.name) or []
    prof = profs[0] if profs else None
    return {
        "id": e.name,
        "object": "model",
        "created": 0,
        "owned_by": "ttscale",
        "max_model_len": e.max_model_len,
        "ttscale": {
            "role": e.role,
            # sequences the engine batches at once (vLLM's max_num_seqs; None for an upstream)
            "max_num_seqs": e.max_num_seqs,
            "budget_profile": prof.source if prof is not None else None,
            # the prompt format the profile's curves were measured with (None: not recorded)
            "budget_profile_prompt": prof.prompt if prof is not None else None,
            # every profile of the model: a request gets the one of its prompt format
            "budget_profiles": [{"source": p.source, "prompt": p.prompt} for p in profs],
        },
    }


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    pool, profiles = request.app.state.pool, request.app.state.profiles
    cards = [model_card(e, profiles) for e in pool]
    cards += [
        {**model_card(pool.get(name), profiles), "id": alias, "root": name} for alias, name in pool.aliases.items()
    ]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request) -> dict[str, Any]:
    return model_card(request.app.state.pool.get(name), request.app.state.profiles)


@router.get("/v1/strategies")
async def strategies() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": n, "summary": c.summary, "options": c.Options.model_json_schema()}
            for n, c in sorted(registered().items())
        ],
    }


_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {
            "model": ChatCompletionResponse,
            "content": _SSE,
            "description": "the completion; with `stream`, server-sent chunks",
        }
    },
)
async def chat(body: ChatCompletionRequest, request: Request) -> Response:
    return await serving.serve(request.app.state, request, body, CHAT)


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {
            "model": CompletionResponse,
            "content": _SSE,
            "description": "the completion; with `stream`, server-sent chunks",
        }
    },
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await serving.serve(request.app.state, request, body, COMPLETIONS)
