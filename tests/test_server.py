"""The real server (vLLM CPU, embedded models) driven by the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest

from conftest import DRAFT, POLICY, SERVER_ARGS, VERIFIER, has_cuda, wait_until
from test_conformance import CONFIGS
from ttscale.engine import parse_model_arg

pytestmark = [pytest.mark.server, pytest.mark.vllm]

POLICY_NAME = parse_model_arg(POLICY).name
VERIFIER_NAME = parse_model_arg(VERIFIER).name
DRAFT_NAME = parse_model_arg(DRAFT).name
PROBLEM = "Sara has 78 books. She sells 27. How many books does Sara have now?"
MSGS = [{"role": "user", "content": PROBLEM}]


def test_models_list(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {POLICY_NAME, VERIFIER_NAME, DRAFT_NAME}
    assert models[VERIFIER_NAME].model_extra["ttscale"]["role"] == "score"
    assert models[POLICY_NAME].model_extra["ttscale"]["role"] == "generate"
    assert client.models.retrieve(POLICY_NAME).id == POLICY_NAME


def test_engines_batch_as_vllm_serve_would(client):
    """With no option of the user's, each engine batches as many sequences as `vllm serve` would on
    this hardware (an H200: 1024), not the 128 of an embedded vLLM engine: K samples of many requests
    run at once."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    if "--max-num-seqs" in SERVER_ARGS:
        pytest.skip("the session server was given --max-num-seqs")
    expected = AsyncEngineArgs.get_batch_defaults(1)[1][UsageContext.OPENAI_API_SERVER]
    seqs = {m.id: m.model_extra["ttscale"]["max_num_seqs"] for m in client.models.list().data}
    assert seqs == dict.fromkeys(seqs, expected) and len(seqs) == 3, seqs


def test_chat_sync_n_seed_usage(client):
    kw = dict(model=POLICY_NAME, messages=MSGS, n=3, temperature=0.8, seed=11, max_tokens=64)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.role == "assistant"
    tts = a.model_extra["ttscale"]
    assert tts["strategy"] == "none" and tts["samples_used"] == 3
    # usage adds up: the policy's prompt once per fan-out, every candidate's tokens
    m = tts["usage"]["models"][POLICY_NAME]
    assert a.usage.completion_tokens == m["completion_tokens"] > 0
    assert a.usage.prompt_tokens == m["prompt_tokens"] > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


def test_usage_splits_prefill_cached_and_decode(client):
    """The engine's work adds up on vLLM: each of K engine requests reads the prompt, decode is
    every sample's tokens, and the same request again finds the prompt in the prefix cache."""
    msgs = [{"role": "user", "content": " ".join([PROBLEM] * 3)}]  # more than one cache block (CPU: 128)
    tts = {"strategy": "majority", "budget": {"samples": 4}, "stop_when_decided": False, "return_samples": True}
    kw = dict(model=POLICY_NAME, messages=msgs, temperature=0.8, seed=5, max_tokens=24, extra_body={"ttscale": tts})
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    for r in (first, again):
        info = r.model_extra["ttscale"]
        u, m = info["usage"], info["usage"]["models"][POLICY_NAME]
        assert m["requests"] == 4 and r.usage.prompt_tokens > 128
        assert m["decode_tokens"] == u["decode_tokens"] == r.usage.completion_tokens
        assert r.usage.completion_tokens == sum(s["tokens"] for s in info["samples"]) > 0
        assert m["prefill_tokens"] == u["prefill_tokens"] == 4 * r.usage.prompt_tokens
        # vLLM computes at least each request's last prompt token; the bill's cached share is
        # what no request computed
        assert 0 <= m["cached_prefill_tokens"] == u["cached_prefill_tokens"] <= m["prefill_tokens"] - 4
        assert r.usage.prompt_tokens_details.cached_tokens == m["cached_prompt_tokens"] < r.usage.prompt_tokens
    hit = again.usage.prompt_tokens_details.cached_tokens
    assert hit > 0  # vLLM's prefix caching is on: every request of the repeat found the prompt's blocks
    assert again.model_extra["ttscale"]["usage"]["cached_prefill_tokens"] >= 4 * hit


def test_usage_of_reads_verifier_and_target(client):
    """A verifier's reads are prefill only (its pooling engine keeps no prefix cache); a target's
    perplexity reads re-read the whole sequence uncached (vLLM skips the cache for prompt
    log-probs) and sample one token each, while only the scored chunks are billed."""
    kw = dict(model=POLICY_NAME, messages=MSGS, temperature=0.8, seed=3, max_tokens=48)
    r = client.chat.completions.create(
        **kw, extra_body={"ttscale": {"strategy": "best_of_n", "budget": {"samples": 3}, "verifier": VERIFIER_NAME}}
    )
    models = r.model_extra["ttscale"]["usage"]["models"]
    prompt = models[POLICY_NAME]["prompt_tokens"]  # one fan-out: the policy's prompt once
    v = models[VERIFIER_NAME]
    assert v["requests"] == 3 and v["prefill_tokens"] == v["prompt_tokens"] > 0
    assert (v["cached_prefill_tokens"], v["decode_tokens"], v["completion_tokens"]) == (0, 0, 0)
    opts = {"strategy": "draft_target", "draft": DRAFT_NAME, "chunk_tokens": 16, "alpha": 0.0, "select": "vote"}
    r = client.chat.completions.create(**kw, extra_body={"ttscale": {**opts, "budget": {"samples": 2}}})
    info = r.model_extra["ttscale"]
    t = info["usage"]["models"][POLICY_NAME]
    assert info["takeovers"] == 0, info  # alpha 0 rejects no chunk: the target only reads
    assert t["requests"] > 0 and t["decode_tokens"] == t["requests"] and t["completion_tokens"] == 0
    assert t["cached_prefill_tokens"] == 0
    assert t["prefill_tokens"] >= t["prompt_tokens"] + t["requests"] * prompt  # each read: prompt, chain, chunk
    assert t["prompt_tokens"] == info["tokens_by_model"][f"{POLICY_NAME}:scored"]


def test_chat_solves_level1(client):
    r = client.chat.completions.create(model=POLICY_NAME, messages=MSGS, temperature=0.0, max_tokens=128)
    assert re.search(r"\\boxed\{\s*51\s*\}", r.choices[0].message.content), r.choices[0].message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=POLICY_NAME, messages=MSGS, max_tokens=16, seed=1, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0.0 and 1 <= len(t.top_logprobs) <= 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob


async def test_chat_async_concurrent(aclient):
    async def one(seed):
        r = await aclient.chat.completions.create(
            model=POLICY_NAME, messages=MSGS, seed=seed, temperature=0.8, max_tokens=48
        )
        return r.choices[0].message.content

    outs = await asyncio.gather(*(one(s) for s in range(6)))
    assert len(outs) == 6 and all(isinstance(o, str) and o for o in outs)
    assert outs[0] == await one(0)  # concurrency does not change a seeded sample


def test_chat_stream_matches_non_stream(client):
    kw = dict(model=POLICY_NAME, messages=MSGS, n=2, temperature=0.8, seed=5, max_tokens=64)
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    texts, finish, usage, roles = {0: "", 1: ""}, {}, None, set()
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        for ch in chunk.choices:
            if ch.delta.role:
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert roles == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_completions_and_stream(client):
    from ttscale.zoo import format_prompt

    prompt = format_prompt(PROBLEM)
    r = client.completions.create(model=POLICY_NAME, prompt=prompt, max_tokens=64, temperature=0.0)
    assert "\\boxed{" in r.choices[0].text and r.object == "text_completion"
    chat = client.chat.completions.create(model=POLICY_NAME, messages=MSGS, max_tokens=64, temperature=0.0)
    assert r.choices[0].text == chat.choices[0].message.content  # same rendered prompt
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=POLICY_NAME, prompt=prompt, max_tokens=64, temperature=0.0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == r.choices[0].text
    echo = client.completions.create(model=POLICY_NAME, prompt=prompt, max_tokens=8, temperature=0.0, echo=True)
    assert echo.choices[0].text.startswith(prompt)
    toks = client.completions.create(model=POLICY_NAME, prompt=[1, 52, 27], max_tokens=4, temperature=0.0)
    assert toks.usage.prompt_tokens == 3


def test_extra_body_ttscale(client):
    r = client.chat.completions.create(
        model=POLICY_NAME,
        messages=MSGS,
        n=2,
        seed=3,
        max_tokens=32,
        extra_body={"ttscale": {"strategy": "none", "budget": {"samples": 4}, "return_samples": True}},
    )
    tts = r.model_extra["ttscale"]
    assert tts["budget"] == {"samples": 4}
    assert [s["text"] for s in tts["samples"]] == [c.message.content for c in r.choices]
    assert sum(s["tokens"] for s in tts["samples"]) == r.usage.completion_tokens


def test_token_budget_is_never_exceeded(client):
    r = client.chat.completions.create(
        model=POLICY_NAME,
        messages=MSGS,
        n=4,
        seed=3,
        max_tokens=100,
        extra_body={"ignore_eos": True, "ttscale": {"budget": {"tokens": 150}, "return_samples": True}},
    )
    assert r.usage.completion_tokens <= 150
    assert r.model_extra["ttscale"]["samples_used"] <= 4


@pytest.fixture(scope="module")
def long_tokens(client) -> int:
    """A max_tokens that fills the policy's context: far more work than any test waits for."""
    return client.models.retrieve(POLICY_NAME).model_extra["max_model_len"] - 128


def test_deadline_answers_with_what_exists(client, long_tokens):
    r = client.chat.completions.create(
        model=POLICY_NAME,
        messages=MSGS,
        n=2,
        max_tokens=long_tokens,
        extra_body={"ignore_eos": True, "ttscale": {"budget": {"deadline_ms": 1500}}},
    )
    tts = r.model_extra["ttscale"]
    assert tts["stop_reason"] == "deadline"
    assert r.usage.completion_tokens < 2 * long_tokens  # cut before the end
    assert all(c.finish_reason == "length" for c in r.choices)
    # the aborted candidates' tokens are counted, and what they wrote is returned
    assert tts["usage"]["aborted_tokens"] == r.usage.completion_tokens > 0
    assert all(c.message.content for c in r.choices)


# the options the conformance suite runs each strategy with
DEADLINE_CONFIGS = CONFIGS


def test_every_strategy_is_in_the_deadline_test():
    from ttscale.strategies import registered

    assert set(DEADLINE_CONFIGS) == set(registered())


@pytest.mark.parametrize("strategy", sorted(DEADLINE_CONFIGS))
def test_every_strategy_answers_at_its_deadline(client, long_tokens, strategy):
    """Work that would fill the context ends at the deadline with an answer from what exists
    (best_of_n: its verifier reads end there too; draft_target: 200, not an error)."""
    tts_req = {"strategy": strategy, **DEADLINE_CONFIGS[strategy], "return_samples": True}
    r = client.chat.completions.create(
        model=POLICY_NAME,
        messages=MSGS,
        max_tokens=long_tokens,
        seed=0,
        extra_body={"ignore_eos": True, "ttscale": {**tts_req, "budget": {"samples": 8, "deadline_ms": 1000}}},
    )
    tts = r.model_extra["ttscale"]
    if strategy == "draft_target":
        # its chains end at their first \boxed{} answer (ignore_eos or not), which the embedded
        # model writes within ~100 tokens: it may be done first (the cut itself: test_deadlines.py)
        assert tts["stop_reason"] in ("deadline", "complete"), tts
    else:
        assert tts["stop_reason"] == "deadline", tts
    assert r.usage.completion_tokens < tts["samples_used"] * long_tokens  # cut before the end
    # the answer is a text that existed at the deadline (a chain's, for draft_target)
    assert len(r.choices) == 1
    texts = [s["text"] for s in tts["samples"]]
    if strategy != "refine":  # refine's answer is its last complete iterate, else the cut draft
        assert r.choices[0].message.content in texts, (r.choices[0].message.content[:80], [t[:80] for t in texts])


BAD = [
    # (request changes, status, param)
    ({"model": "no-such-model"}, 404, "model"),
    ({"model": VERIFIER_NAME}, 400, "model"),
    ({"n": 0}, 400, "n"),
    ({"n": 100000}, 400, "n"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10**7}, 400, "max_tokens"),
    ({"temperature": 3.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": "hello"}, 400, "messages"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": ["\ud800"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, 400, "messages"),
    ({"top_k": 10**30}, 400, "top_k"),
    ({"temperature": float("nan")}, 400, "temperature"),
    ({"ttscale": {"strategy": "temperature_sweep", "temperatures": [float("nan")]}}, 400, "ttscale.temperatures.0"),
    ({"ttscale": {"strategy": "majority", "budget": "auto", "token_cost": float("inf")}}, 400, "ttscale.token_cost"),
    ({"ttscale": {"strategy": "no-such-strategy"}}, 400, "ttscale.strategy"),
    ({"ttscale": {"strategy": 7}}, 400, "ttscale.strategy"),
    ({"ttscale": {"budget": {"samples": 0}}}, 400, "ttscale.budget.samples"),
    ({"ttscale": {"budget": {"tokens": -5}}}, 400, "ttscale.budget.tokens"),
    ({"ttscale": {"budget": {"bananas": 1}}}, 400, "ttscale.budget.bananas"),
    ({"ttscale": {"budget": "lots"}}, 400, "ttscale.budget"),
    ({"ttscale": {"frobnicate": True}}, 400, "ttscale.frobnicate"),
    ({"ttscale": {"budget": {"samples": 2}}, "n": 3}, 422, "ttscale.budget.samples"),
    ({"ttscale": {"budget": {"tokens": 1}}, "n": 1, "max_tokens": 5, "seed": 1}, 200, None),
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[str(b[0])[:60] for b in BAD])
def test_bad_requests(server, change, status, param):
    body = {"model": POLICY_NAME, "messages": MSGS, "max_tokens": 8}
    body.update(change)
    # json.dumps escapes lone surrogates (\ud800) and writes NaN / Infinity as JSON5-style literals,
    # which the server must refuse by name
    r = httpx.post(
        server.v1 + "/chat/completions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["param"] == param, err
        assert err["message"] and err["type"]


def test_malformed_json_and_unknown_route(server):
    r = httpx.post(
        server.v1 + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.v1 + "/completions", json={"model": POLICY_NAME, "prompt": ["a", "b"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=POLICY_NAME, messages=MSGS, extra_body={"ttscale": {"strategy": "nope"}})
    assert e.value.body["param"] == "ttscale.strategy"


def _engine_idle(server) -> bool:
    return server.health()["engine_requests_running"] == 0


def _tokens(server, kind: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf'ttscale_tokens_total\{{kind="{kind}",model="{re.escape(POLICY_NAME)}"\}} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


N_LONG = 16
# How long the non-streaming client stays once its request runs: long enough for first tokens on a
# loaded CPU; a GPU writes ~2k tokens per sequence in a few seconds, so there it leaves sooner.
DROP_AFTER_S = 0.3 if has_cuda() else 2.0


def _long_body(stream: bool, max_tokens: int) -> dict:
    return {
        "model": POLICY_NAME,
        "messages": MSGS,
        "n": N_LONG,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "seed": 2,
    }


def test_dropped_streaming_client_aborts_engine_requests(server, long_tokens):
    assert wait_until(lambda: _engine_idle(server), 60)
    before = _tokens(server, "completion")
    with (
        httpx.Client(timeout=60) as h,
        h.stream("POST", server.v1 + "/chat/completions", json=_long_body(True, long_tokens)) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                break
    assert wait_until(lambda: _engine_idle(server), 15), server.health()
    assert wait_until(lambda: _tokens(server, "completion") > before, 10)
    spent = _tokens(server, "completion") - before
    # the engine stopped: far fewer tokens than the request would have generated
    assert 0 < spent < 0.5 * N_LONG * long_tokens, spent
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r"ttscale_client_disconnects_total [1-9]", metrics)


def test_dropped_client_without_stream_aborts_engine_requests(server, long_tokens):
    assert wait_until(lambda: _engine_idle(server), 60)
    before = _tokens(server, "completion")
    body = json.dumps(_long_body(False, long_tokens)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    try:  # leave only once the engine is working on it (and has had time for a first token,
        # so that the aborted tokens' accounting is exercised too, even on a loaded machine)
        assert wait_until(lambda: server.health()["engine_requests_running"] > 0, 60)
        time.sleep(DROP_AFTER_S)
    finally:
        sock.close()
    assert wait_until(lambda: _engine_idle(server), 15), server.health()
    assert wait_until(lambda: _tokens(server, "completion") > before, 10)
    spent = _tokens(server, "completion") - before
    assert 0 < spent < 0.5 * N_LONG * long_tokens, spent


def test_health_and_metrics(server):
    h = server.health()
    assert h["status"] == "ok" and POLICY_NAME in h["models"]
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert "ttscale_requests_total" in text and "ttscale_engine_requests_running" in text
    assert re.search(rf'ttscale_tokens_total\{{kind="completion",model="{re.escape(POLICY_NAME)}"\}} [1-9]', text)


def test_strategies_listing(server):
    data = httpx.get(server.v1 + "/strategies", timeout=10).json()["data"]
    assert "none" in {d["id"] for d in data}
    json.dumps(data)


def _http_get(sock: socket.socket, path: str) -> bytes:
    """One HTTP/1.1 request on an open connection; the status line, or b'' if the server closed it."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n", 1)[0]


def test_idle_connection_outlives_client_pools(server):
    """An idle keep-alive connection stays open longer than httpx keeps it in its pool (5 s), so the
    OpenAI SDK never reuses a connection the server is closing at that moment."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        assert b" 200" in _http_get(s, "/health")
        time.sleep(6.5)
        assert b" 200" in _http_get(s, "/health")
