"""ttscale in front of an existing OpenAI-compatible deployment (here: another ttscale server
with real vLLM), through the HTTP upstream adapter."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import POLICY, start_server, wait_until
from ttscale.engine import parse_model_arg

pytestmark = [pytest.mark.server, pytest.mark.vllm]

POLICY_NAME = parse_model_arg(POLICY).name
MSGS = [{"role": "user", "content": "Raj has 44 shells. He loses 36. How many shells does Raj have now?"}]


@pytest.fixture(scope="module")
def front(server, tmp_path_factory):
    log = tmp_path_factory.mktemp("front") / "front.log"
    srv = start_server([f"up={server.url}@{POLICY_NAME}"], log)
    yield srv
    srv.stop()


def test_front_matches_direct(server, front):
    direct = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0)
    via = openai.OpenAI(base_url=front.v1, api_key="x", max_retries=0)
    assert [m.id for m in via.models.list().data] == ["up"]
    kw = dict(messages=MSGS, n=2, seed=9, temperature=0.8, max_tokens=48, logprobs=True)
    a = direct.chat.completions.create(model=POLICY_NAME, **kw)
    b = via.chat.completions.create(model="up", **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert b.usage.completion_tokens == a.usage.completion_tokens
    assert b.usage.prompt_tokens == a.usage.prompt_tokens
    # the upstream reports its prefix-cache hits (prompt_tokens_details): the front books them
    up = b.model_extra["ttscale"]["usage"]["models"]["up"]
    assert up["prefill_tokens"] == 2 * b.usage.prompt_tokens  # n=2: two upstream requests
    assert up["cached_prefill_tokens"] is not None and b.usage.prompt_tokens_details is not None
    assert b.usage.prompt_tokens_details.cached_tokens == up["cached_prompt_tokens"] < b.usage.prompt_tokens
    s = via.chat.completions.create(model="up", stream=True, **{**kw, "n": 1})
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == a.choices[0].message.content
    c = via.completions.create(model="up", prompt="<s>Q: 2 + 2?\nA: ", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens > 0


def test_front_errors_and_abort(server, front):
    r = httpx.post(front.v1 + "/chat/completions", json={"model": "up", "messages": MSGS, "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert wait_until(lambda: server.health()["engine_requests_running"] == 0, 60)
    body = {"model": "up", "messages": MSGS, "n": 8, "ignore_eos": True, "stream": True, "max_tokens": 1500}
    with httpx.Client(timeout=60) as h, h.stream("POST", front.v1 + "/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    # closing the client closes the front's upstream streams; the upstream aborts its engine work
    assert wait_until(lambda: server.health()["engine_requests_running"] == 0, 15), server.health()
    assert wait_until(lambda: front.health()["engine_requests_running"] == 0, 15)
