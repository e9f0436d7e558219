"""Request-size limit and the engine watchdog, on the in-process app (fake engine)."""

from __future__ import annotations

import asyncio

import httpx

from ttscale.engine import ModelPool
from ttscale.engine.fake import FakeEngine
from ttscale.server import create_app
from ttscale.server.limits import watch_engines

ASK = {"model": "p", "max_tokens": 4, "messages": [{"role": "user", "content": "q"}]}


class Mortal(FakeEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.up = True

    @property
    def alive(self) -> bool:
        return self.up


async def test_bodies_beyond_the_limit_get_413_unparsed():
    eng = FakeEngine("p", tick_s=0.0)
    app = create_app(ModelPool([eng]), manage_pool=False, max_request_bytes=2000)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        assert (await h.post("/v1/chat/completions", json=ASK)).status_code == 200
        big = {**ASK, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = await h.post("/v1/chat/completions", json=big)  # Content-Length says so
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 500
            yield b"{}"

        r = await h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
        assert (await h.post("/v1/chat/completions", json=ASK)).status_code == 200
    assert app.state.in_flight == 0


async def test_an_engine_that_dies_is_reported_once_and_health_turns_503():
    eng = Mortal("p", tick_s=0.0)
    seen: list[list[str]] = []
    app = create_app(ModelPool([eng]), manage_pool=False, on_engine_death=seen.append)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as h:
        assert (await h.get("/health")).status_code == 200
        eng.up = False
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert seen == [["p"]]
        r = await h.get("/health")
        assert r.status_code == 503 and r.json()["engines"] == {"p": "down"}


async def test_the_watchdog_checks_every_engine():
    a, b = Mortal("a"), Mortal("b")
    seen: list[list[str]] = []
    task = asyncio.create_task(watch_engines(ModelPool([a, b]), seen.append, interval_s=0.01))
    await asyncio.sleep(0.05)
    assert seen == [] and not task.done()
    b.up = False
    await asyncio.wait_for(task, 5)
    assert seen == [["b"]]
