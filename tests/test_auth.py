"""API keys on the in-process app (fake engine), through the official OpenAI SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from ttscale.engine import ModelPool
from ttscale.engine.fake import FakeEngine
from ttscale.errors import ConfigError
from ttscale.server import create_app
from ttscale.server.auth import load_api_keys

ASK = {"model": "p", "max_tokens": 4, "messages": [{"role": "user", "content": "q"}]}


def _app(**kw):
    return create_app(ModelPool([FakeEngine("p", tick_s=0.0)]), manage_pool=False, **kw)


def _sdk(app, key: str) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, http_client=http, max_retries=0)


async def test_the_sdk_with_a_good_key_passes_and_a_bad_one_gets_authentication_error():
    app = _app(api_keys=["k1", "k2"])
    for key in ("k1", "k2"):
        r = await _sdk(app, key).chat.completions.create(**ASK)
        assert r.choices[0].message.content
    for key in ("k3", "k1k2", "k"):
        with pytest.raises(openai.AuthenticationError) as e:
            await _sdk(app, key).chat.completions.create(**ASK)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


async def test_missing_or_malformed_headers_get_a_401_in_openai_shape():
    app = _app(api_keys=["k1"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        for headers in ({}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer "}):
            r = await h.post("/v1/chat/completions", json=ASK, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"] == {
                "message": r.json()["error"]["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        ok = await h.post("/v1/chat/completions", json=ASK, headers={"authorization": "bearer k1"})
        assert ok.status_code == 200
    assert app.state.in_flight == 0


async def test_health_is_open_metrics_and_docs_only_when_public():
    closed, public = _app(api_keys=["k"]), _app(api_keys=["k"], public_metrics=True, public_docs=True)
    for app, want in ((closed, 401), (public, 200)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            assert (await h.get("/health")).status_code == 503  # open (no lifespan here: "starting")
            for path in ("/metrics", "/openapi.json", "/docs"):
                assert (await h.get(path)).status_code == want, path
            assert (await h.get("/v1/models")).status_code == 401


async def test_without_keys_the_app_is_open_and_cors_answers_preflights():
    app = _app(cors_origins=["https://ui.example"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        assert (await h.post("/v1/chat/completions", json=ASK)).status_code == 200
        pre = await h.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://ui.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ui.example"
    keyed = _app(api_keys=["k"], cors_origins=["*"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=keyed), base_url="http://t") as h:
        pre = await h.options("/v1/models", headers={"Origin": "https://x", "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 200  # a browser's preflight carries no key


def test_keys_from_arguments_files_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("a\n# comment\n b  # trailing comment\n\na\n")
    monkeypatch.setenv("TTSCALE_API_KEY", "c, d,,a")
    assert load_api_keys(["x", "a"], [f]) == ["x", "a", "b", "c", "d"]
    assert load_api_keys([], [], env=False) == []
    with pytest.raises(ConfigError, match="API key file"):
        load_api_keys([], [tmp_path / "missing"])
