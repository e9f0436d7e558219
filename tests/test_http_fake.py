"""The HTTP layer on the fake engine (fast): admission counts streams from the moment they are
accepted, a 429 says when to retry, log-probs are returned only when asked for."""

from __future__ import annotations

import asyncio

import httpx

from ttscale.engine import ModelPool
from ttscale.engine.fake import FakeEngine
from ttscale.server import create_app

MSGS = [{"role": "user", "content": "q"}]


def _app(limit: int, tick_s: float = 0.005):
    slow = FakeEngine("p", respond=lambda prompt, s: "x" * 60 + "\\boxed{4}", tick_s=tick_s)
    return create_app(ModelPool([slow]), max_concurrent_requests=limit, manage_pool=False)


async def test_streams_beyond_the_limit_get_429_with_retry_after():
    app = _app(limit=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:

        async def one(stream: bool):
            return await h.post(
                "/v1/chat/completions", json={"model": "p", "messages": MSGS, "stream": stream, "max_tokens": 64}
            )

        rs = await asyncio.gather(*(one(i % 2 == 0) for i in range(6)))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    assert app.state.in_flight == 0  # every slot given back


async def test_majority_returns_logprobs_only_when_asked():
    app = _app(limit=8, tick_s=0.0)
    body = {
        "model": "p",
        "messages": MSGS,
        "max_tokens": 128,
        "ttscale": {"strategy": "majority", "budget": {"samples": 3}},
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        plain = (await h.post("/v1/chat/completions", json=body)).json()
        asked = (await h.post("/v1/chat/completions", json={**body, "logprobs": True})).json()
    assert plain["choices"][0]["logprobs"] is None
    assert plain["ttscale"]["answer"] == "4"
    assert len(asked["choices"][0]["logprobs"]["content"]) == asked["usage"]["completion_tokens"] // 3
