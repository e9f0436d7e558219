"""A model served by a pool of replicas (ttscale.engine.replicas): placement, load, failover.

The unit tests check the placement rules; the server tests put one ttscale in front of three
real upstream servers on loopback (the session's server and two more ttscale servers of the
policy model, each with its own vLLM engine) and kill, restart and disconnect from them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from conftest import POLICY, start_server, wait_until
from ttscale.engine import parse_model_arg
from ttscale.engine.replicas import Replica, ReplicaOptions, parse_load, place, prompt_key, rendezvous
from ttscale.errors import ConfigError

URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 6)]


# -- placement rules -------------------------------------------------------------------------------
def test_rendezvous_is_stable_and_moves_only_the_removed_replicas_keys():
    keys = [f"key-{i}" for i in range(400)]
    first = {k: URLS[rendezvous(k, URLS)[0]] for k in keys}
    assert first == {k: URLS[rendezvous(k, URLS)[0]] for k in keys}  # the same everywhere
    assert len(set(first.values())) == len(URLS)  # every replica gets keys
    counts = [list(first.values()).count(u) for u in URLS]
    assert min(counts) > 400 / len(URLS) / 2  # roughly even
    gone = URLS[2]
    rest = [u for u in URLS if u != gone]
    after = {k: rest[rendezvous(k, rest)[0]] for k in keys}
    for k in keys:
        if first[k] != gone:
            assert after[k] == first[k]  # keys of the others stay put
        else:
            # the removed replica's keys go to their second choice
            assert after[k] == URLS[rendezvous(k, URLS)[1]]


def _replicas(loads: list[int]) -> list[Replica]:
    return [Replica(URLS[i], engine=None, up=True, in_flight=n) for i, n in enumerate(loads)]  # type: ignore[arg-type]


def test_place_affinity_spread_round_robin():
    r = _replicas([0, 0, 0])
    assert place(4, r, "affinity", slack=0.25) == [r[0]] * 4
    # spread: blocks as even as can be, so a replica's candidates have consecutive seeds
    assert place(5, r, "spread", slack=0.25) == [r[0], r[0], r[1], r[1], r[2]]
    assert place(2, r, "spread", slack=0.25) == [r[0], r[1]]
    assert place(6, r, "spread", slack=0.25) == [r[0]] * 2 + [r[1]] * 2 + [r[2]] * 2
    assert place(4, r, "round_robin", slack=0.25, start=2) == [r[2], r[0], r[1], r[2]]
    assert place(3, [], "affinity", slack=0.25) == []


def test_place_auto_is_bounded_load_hashing():
    # idle: cap = ceil(1.25 × 4 / 3) = 2, no replica takes 4 within it: the least loaded, the first
    r = _replicas([0, 0, 0])
    assert place(4, r, "auto", slack=0.25) == [r[0]] * 4
    # the first is busy (load 5): cap = ceil(1.25 × (5 + 4) / 3) = 4, the second has room for 4
    r = _replicas([5, 0, 0])
    assert place(4, r, "auto", slack=0.25) == [r[1]] * 4
    # cap = ceil(1.25 × 7 / 3) = 3: none has room for 4, the least loaded in the order takes them
    r = _replicas([3, 0, 0])
    assert place(4, r, "auto", slack=0.25) == [r[1]] * 4
    # others' requests (from /metrics) count as load too: cap = ceil(1.25 × 11 / 3) = 5
    r = _replicas([0, 0, 0])
    r[0].others = 9
    assert place(2, r, "auto", slack=0.25) == [r[1], r[1]]
    # equally full: the first in the order
    r = _replicas([9, 9])
    assert place(2, r, "auto", slack=0.0) == [r[0], r[0]]
    # a replica whose KV cache is full has no room, whatever its request count
    r = _replicas([0, 0])
    r[0].kv_usage = 0.97
    assert place(2, r, "auto", slack=0.25) == [r[1], r[1]]
    assert place(2, r, "affinity", slack=0.25) == [r[0], r[0]]  # affinity asked for it


def test_prompt_key_is_the_model_and_the_prompts_prefix():
    chat = [{"role": "system", "content": "S" * 50}, {"role": "user", "content": "question one"}]
    longer = [*chat, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "two"}]
    assert prompt_key("m", chat, 30) == prompt_key("m", longer, 30)  # a growing chat keeps its key
    assert prompt_key("m", chat, 4096) != prompt_key("m", longer, 4096)
    assert prompt_key("m", "abc", 8) != prompt_key("n", "abc", 8)
    assert prompt_key("m", [1, 2, 3], 8) == "m\x001 2 3"


def test_parse_load_reads_vllm_and_ttscale_gauges():
    vllm_page = """# HELP vllm:num_requests_running Number of requests in model execution batches.
vllm:num_requests_running{engine="0",model_name="q"} 7.0
vllm:num_requests_running{engine="1",model_name="q"} 3.0
vllm:num_requests_waiting{engine="0",model_name="q"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="q"} 0.5
vllm:prompt_tokens_total{model_name="q"} 1234.0
"""
    assert parse_load(vllm_page) == {"running": 10.0, "waiting": 2.0, "kv": 0.5}
    ttscale_page = 'ttscale_engine_requests_running{model="a"} 4.0\nttscale_requests_queued 1.0\n'
    assert parse_load(ttscale_page) == {"running": 4.0, "waiting": 1.0}
    assert parse_load("garbage\n{}\n") == {}


def test_model_argument_with_replicas():
    s = parse_model_arg("pol=http://a:1,http://b:2@up-id")
    assert (s.name, s.upstream_model, s.urls) == ("pol", "up-id", ("http://a:1", "http://b:2"))
    assert parse_model_arg("http://a:1").urls == ("http://a:1",)
    with pytest.raises(ConfigError):
        parse_model_arg("pol=http://a:1,http://a:1")
    with pytest.raises(ConfigError):
        parse_model_arg("pol=http://a:1,b:2")
    with pytest.raises(ValueError):
        ReplicaOptions(placement="nearest")  # type: ignore[arg-type]


# -- three real upstreams behind one ttscale -------------------------------------------------------
POLICY_NAME = parse_model_arg(POLICY).name
MSGS = [{"role": "user", "content": "Ada has 17 pens. She buys 25 more. How many pens does Ada have now?"}]
LONG = {"ignore_eos": True, "max_tokens": 1200}


def _requests(srv, status: str | None = None) -> float:
    """Completions the server answered or started (its ttscale_requests_total: all, or those
    that ended with ``status``)."""
    by = _statuses(srv)
    return sum(by.values()) if status is None else by.get(status, 0.0)


def _statuses(srv) -> dict[str, float]:
    """The server's ttscale_requests_total by status."""
    page = httpx.get(srv.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for m in re.finditer(r"^ttscale_requests_total\{([^}]*)\} (\S+)$", page, re.M):
        st = re.search(r'status="([^"]*)"', m.group(1))
        key = st.group(1) if st else "?"
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def _replica_state(front) -> dict:
    return front.health()["replicas"]["pol"]


@pytest.fixture(scope="module")
def fleet(server, tmp_path_factory):
    """(front, [replica servers]): the session server and two policy-only servers."""
    d = tmp_path_factory.mktemp("fleet")
    extra = [start_server([POLICY], d / f"replica{i}.log", "--kv-cache-gib", "0.5") for i in (1, 2)]
    reps = [server, *extra]
    urls = ",".join(r.url for r in reps)
    front = start_server([f"pol={urls}@{POLICY_NAME}"], d / "front.log", "--placement", "affinity")
    yield front, reps
    front.stop()
    for r in extra:
        r.stop()


def _session_for(reps, target) -> str:
    """A session id whose first replica is ``target``."""
    urls = [r.url for r in reps]
    return next(s for s in (f"s{i}" for i in range(1000)) if urls[rendezvous(s, urls)[0]] == target.url)


@pytest.mark.server
@pytest.mark.vllm
def test_affinity_puts_every_candidate_on_one_replica(fleet):
    front, reps = fleet
    cli = openai.OpenAI(base_url=front.v1, api_key="x", max_retries=0, timeout=300)
    for msgs in (MSGS, [{"role": "user", "content": "Tom has 8 apples and eats 3. How many are left?"}]):
        before = [_requests(r) for r in reps]
        r = cli.chat.completions.create(model="pol", messages=msgs, n=4, seed=3, max_tokens=32)
        assert len(r.choices) == 4
        delta = [_requests(s) - b for s, b in zip(reps, before, strict=True)]
        # all K on the prompt's replica, as one request with n=4
        assert sorted(delta) == [0, 0, 1], delta
        home = reps[delta.index(1)]
        # the same prompt again: the same replica (its prefix cache)
        r = cli.chat.completions.create(model="pol", messages=msgs, n=4, seed=4, max_tokens=32)
        again = [_requests(s) - b for s, b in zip(reps, before, strict=True)]
        assert [a - d for a, d in zip(again, delta, strict=True)] == delta
        # the replica counted each choice (continuous usage): the front's usage is its own
        direct = openai.OpenAI(base_url=home.v1, api_key="x", max_retries=0, timeout=300)
        d = direct.chat.completions.create(model=POLICY_NAME, messages=msgs, n=4, seed=4, max_tokens=32)
        assert [c.message.content for c in r.choices] == [c.message.content for c in d.choices]
        assert r.usage.completion_tokens == d.usage.completion_tokens
    # the front's own per-replica counters agree
    page = httpx.get(front.url + "/metrics", timeout=10).text
    assert sum(float(v) for v in re.findall(r"^ttscale_replica_candidates_total\{[^}]*\} (\S+)$", page, re.M)) >= 16


@pytest.mark.server
@pytest.mark.vllm
def test_spreading_splits_the_candidates(fleet):
    front, reps = fleet
    cli = openai.OpenAI(base_url=front.v1, api_key="x", max_retries=0, timeout=300)
    before = [_requests(r) for r in reps]
    r = cli.chat.completions.create(
        model="pol", messages=MSGS, n=6, seed=5, max_tokens=32, extra_body={"ttscale": {"placement": "spread"}}
    )
    assert len(r.choices) == 6
    # two candidates per replica, as one n=2 request each
    assert [_requests(s) - b for s, b in zip(reps, before, strict=True)] == [1, 1, 1]
    bad = httpx.post(
        front.v1 + "/chat/completions",
        json={"model": "pol", "messages": MSGS, "ttscale": {"placement": "nearest"}},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttscale.placement"


@pytest.mark.server
@pytest.mark.vllm
def test_a_replica_killed_mid_request_loses_nothing_and_comes_back(fleet):
    front, reps = fleet
    victim = reps[1]
    sid = _session_for(reps, victim)
    cli = openai.OpenAI(
        base_url=front.v1, api_key="x", max_retries=0, timeout=300, default_headers={"X-Session-ID": sid}
    )
    out: dict = {}

    def call() -> None:
        try:
            out["r"] = cli.chat.completions.create(
                model="pol", messages=MSGS, n=4, seed=11, extra_body={**LONG, "ttscale": {"return_samples": True}}
            )
        except Exception as e:  # reported below
            out["e"] = e

    t = threading.Thread(target=call)
    t.start()
    assert wait_until(lambda: victim.health()["engine_requests_running"] > 0, 120)
    os.killpg(victim.proc.pid, signal.SIGKILL)
    t.join(300)
    assert "e" not in out, out.get("e")
    r = out["r"]
    assert len(r.choices) == 4 and all(c.finish_reason == "length" for c in r.choices)
    usage = r.model_extra["ttscale"]["usage"]
    assert usage["models"]["pol"]["redrawn"] == 4  # every candidate was redrawn elsewhere ...
    # ... and the tokens lost with the replica are counted (aborted: nothing of them is used)
    assert r.usage.completion_tokens == 4 * LONG["max_tokens"] + usage["aborted_tokens"]
    st = _replica_state(front)
    assert st[victim.url]["up"] is False and st[victim.url]["redrawn"] == 4
    # while it is out, its sessions go to the next replica (one n=2 request)
    before = [_requests(s) for s in (reps[0], reps[2])]
    cli.chat.completions.create(model="pol", messages=MSGS, n=2, max_tokens=8)
    assert sum(_requests(s) - b for s, b in zip((reps[0], reps[2]), before, strict=True)) == 1
    # back on its port: the health checks re-admit it and its sessions return to it
    victim.restart()
    assert wait_until(lambda: _replica_state(front)[victim.url]["up"], 60), _replica_state(front)
    before = _requests(victim)
    cli.chat.completions.create(model="pol", messages=MSGS, n=2, max_tokens=8)
    assert _requests(victim) - before == 1


@pytest.mark.server
@pytest.mark.vllm
def test_a_disconnect_aborts_on_every_replica(fleet):
    front, reps = fleet
    assert wait_until(lambda: all(r.health()["engine_requests_running"] == 0 for r in reps), 60)
    body = {
        "model": "pol",
        "messages": MSGS,
        "n": 6,
        "stream": True,
        **LONG,
        "max_tokens": 1500,
        "ttscale": {"placement": "spread"},
    }
    # every replica in the pool (a health probe of the session server that timed out on a busy
    # host ejects it until the next good one): spread splits over the replicas that are up
    assert wait_until(lambda: all(v["up"] for v in _replica_state(front).values()), 60), _replica_state(front)
    seen = [_statuses(r) for r in reps]
    before = [b.get("disconnected", 0.0) for b in seen]
    with httpx.Client(timeout=120) as h, h.stream("POST", front.v1 + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first text: gone at once, 1,500 tokens before any candidate could end

    def changed():
        return [
            {k: v - b.get(k, 0.0) for k, v in _statuses(s).items() if v != b.get(k, 0.0)}
            for s, b in zip(reps, seen, strict=True)
        ]

    # each replica saw its n=2 request's stream end unfinished and stopped its engine requests
    assert wait_until(
        lambda: [_requests(s, status="disconnected") - b for s, b in zip(reps, before, strict=True)] == [1, 1, 1], 30
    ), (changed(), seen, _replica_state(front))
    assert wait_until(lambda: all(s.health()["engine_requests_running"] == 0 for s in reps), 15), [
        s.health() for s in reps
    ]
    assert wait_until(lambda: front.health()["engine_requests_running"] == 0, 15)


@pytest.mark.server
@pytest.mark.vllm
def test_batch_eval_spreads_its_problems_over_the_pool(fleet, tmp_path):
    """`ttscale eval run -m NAME=url,url,url@id`: each problem's K samples go to its replica
    (by the prompt's hash), the problems spread over all of them, every sample is recorded."""
    _, reps = fleet
    urls = ",".join(r.url for r in reps)
    before = [_requests(r) for r in reps]
    out = tmp_path / "run"
    cmd = [sys.executable, "-P", "-m", "ttscale.cli", "eval", "run", "arith500", "--limit", "12", "-k", "2"]
    cmd += ["-m", f"pol={urls}@{POLICY_NAME}", "--max-tokens", "48", "--out", str(out), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(r["samples"]) == 2 for r in rows)
    delta = [_requests(s) - b for s, b in zip(reps, before, strict=True)]
    # a problem's samples stay together: one n=2 request per problem
    assert sum(delta) == 12, delta
    # 12 prompts on 3 replicas by their hashes: all on one would be a broken key (p ~ 1e-5)
    assert sum(d > 0 for d in delta) >= 2, delta


def test_the_compose_example_fronts_the_same_replicas_from_every_instance():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "deploy" / "compose.yaml").read_text())
    svc = doc["services"]
    fronts = [s for n, s in svc.items() if n.startswith("ttscale")]
    assert len(fronts) == 2 and fronts[0]["command"] == fronts[1]["command"]
    cmd = fronts[0]["command"]
    spec = parse_model_arg(cmd[cmd.index("--model") + 1])
    hosts = {u.split("//")[1].split(":")[0] for u in spec.urls}
    assert hosts == {n for n in svc if n.startswith("vllm")} and len(spec.urls) == 2
    assert (root / "deploy" / "nginx.conf").is_file()


# -- failover on scripted replicas (httpx transports; the fleet test above does it for real) -------
def _sse(texts: list[str], *, finish: bool, usage: int | None = None) -> list[bytes]:
    out = [
        ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}) + "\n\n")
        for t in texts
    ]
    if finish:
        out.append("data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}) + "\n\n")
        if usage is not None:
            out.append(
                "data: "
                + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": usage}})
                + "\n\n"
            )
        out.append("data: [DONE]\n\n")
    return [s.encode() for s in out]


class _Broken(httpx.AsyncByteStream):
    """A stream that sends some chunks, then loses its connection."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self):
        for c in self.chunks:
            yield c
        raise httpx.ReadError("connection reset by peer")


def _pool(scripts: dict[str, httpx.AsyncByteStream | list[bytes]]):
    from ttscale.engine.replicas import ReplicaPool

    pool = ReplicaPool("m", list(scripts), options=ReplicaOptions(placement="affinity"))
    for rep in pool.replicas:
        script = scripts[rep.url]

        def handler(request: httpx.Request, script=script) -> httpx.Response:
            assert request.headers["X-Session-ID"]  # the placement key goes along
            stream = script if isinstance(script, httpx.AsyncByteStream) else httpx.ByteStream(b"".join(script))
            return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})

        rep.engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        rep.up = True
    pool._started = True
    return pool


async def test_a_streamed_candidate_redrawn_elsewhere_continues_where_the_client_is():
    from ttscale.engine import SamplingSettings

    prompt = [{"role": "user", "content": "q"}]
    urls = ["http://r1:1", "http://r2:1"]
    order = [urls[i] for i in rendezvous(prompt_key("m", prompt, None), urls)]
    full = ["The ", "answer ", "is ", "42."]
    pool = _pool({order[0]: _Broken(_sse(full[:2], finish=False)), order[1]: _sse(full, finish=True, usage=4)})
    deltas = []
    async with pool.fanout(prompt, [SamplingSettings(seed=1, max_tokens=4)]) as fo:
        async for ev in fo:
            deltas.append(ev.delta_text)
    c = fo.candidates[0]
    assert "".join(deltas) == c.text == "The answer is 42."  # nothing sent twice
    assert (c.redraws, c.lost_tokens, c.token_count, c.finish_reason) == (1, 2, 4, "length")
    first = next(r for r in pool.replicas if r.url == order[0])
    assert not first.up and first.failures == 1 and first.redrawn == 1
    assert fo.placement == [order[1]]


async def test_a_redraw_that_differs_from_what_was_streamed_fails_the_candidate():
    from ttscale.engine import SamplingSettings
    from ttscale.errors import UpstreamError

    prompt = [{"role": "user", "content": "p"}]
    urls = ["http://r1:1", "http://r2:1"]
    order = [urls[i] for i in rendezvous(prompt_key("m", prompt, None), urls)]
    pool = _pool({order[0]: _Broken(_sse(["The ", "answer "], finish=False)), order[1]: _sse(["A ", "b"], finish=True)})
    with pytest.raises(UpstreamError, match="differs"):
        async with pool.fanout(prompt, [SamplingSettings(seed=1)]) as fo:
            async for _ in fo:
                pass


async def test_no_replica_left_is_a_clear_engine_error():
    from ttscale.engine import SamplingSettings
    from ttscale.errors import EngineUnavailableError

    pool = _pool({"http://r1:1": _Broken([]), "http://r2:1": _Broken([])})
    with pytest.raises(EngineUnavailableError, match="could run the request"):
        async with pool.fanout("p", [SamplingSettings()]) as fo:
            await fo.wait()
    assert not any(r.up for r in pool.replicas)
    with pytest.raises(EngineUnavailableError, match="no replica"):
        pool.fanout("p", [SamplingSettings()])


# -- one n=k request per replica (scripted upstreams) ---------------------------------------------
def test_split_groups_takes_runs_of_like_settings_and_consecutive_seeds():
    from ttscale.engine import SamplingSettings
    from ttscale.engine.openai_engine import split_groups

    s = SamplingSettings(seed=10, max_tokens=8)
    assert split_groups(s.replicate(4)) == [[0, 1, 2, 3]]  # seeds 10..13: one n=4 call
    assert split_groups([SamplingSettings()] * 3) == [[0, 1, 2]]  # unseeded
    hot = SamplingSettings(seed=14, max_tokens=8, temperature=1.3)
    assert split_groups([*s.replicate(2), hot]) == [[0, 1], [2]]  # another temperature
    gap = [s, SamplingSettings(seed=12, max_tokens=8)]
    assert split_groups(gap) == [[0], [1]]  # seed 12 is not choice 1 of seed 10
    assert split_groups(s.replicate(5), max_group=2) == [[0, 1], [2, 3], [4]]
    a, b = object(), object()
    assert split_groups(s.replicate(4), [a, a, b, b]) == [[0, 1], [2, 3]]  # one per replica
    assert split_groups(s.replicate(3), [a, b, a]) == [[0], [1], [2]]  # round robin: one each


Q = [{"role": "user", "content": "Q: 40 + 2 = ?"}]


def _choice(i: int, text: str | None = None, *, finish: str | None = None, tokens: int | None = None) -> bytes:
    chunk: dict = {"choices": [{"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
    if tokens is not None:
        chunk["usage"] = {"prompt_tokens": 7, "completion_tokens": tokens}
    return ("data: " + json.dumps(chunk) + "\n\n").encode()


def _end(total: int) -> list[bytes]:
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": total}}
    return [("data: " + json.dumps(usage) + "\n\n").encode(), b"data: [DONE]\n\n"]


class _Gated(httpx.AsyncByteStream):
    """Sends ``head``, waits for ``gate``, sends ``tail``; notes whether it was closed early."""

    def __init__(self, head: list[bytes], tail: list[bytes]):
        import asyncio

        self.head, self.tail, self.gate = head, tail, asyncio.Event()
        self.sent_all = self.closed = False

    async def __aiter__(self):
        for c in self.head:
            yield c
        await self.gate.wait()
        for c in self.tail:
            yield c
        self.sent_all = True

    async def aclose(self) -> None:
        self.closed = True


def _engine(script, bodies: list[dict]):
    from ttscale.engine.openai_engine import OpenAIEngine

    eng = OpenAIEngine("m", "http://up:1")

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        stream = script if isinstance(script, httpx.AsyncByteStream) else httpx.ByteStream(b"".join(script))
        return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})

    eng._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return eng


async def test_candidates_stopped_together_are_one_n_k_request_counted_per_choice():
    from ttscale.engine import SamplingSettings

    script = [
        _choice(0, "4", tokens=1),
        _choice(1, "Fo", tokens=1),
        _choice(1, "ur", tokens=2),
        _choice(0, "2", finish="stop", tokens=2),
        _choice(1, finish="length", tokens=3),  # a token that spells nothing
        *_end(5),
    ]
    bodies: list[dict] = []
    eng = _engine(script, bodies)
    settings = SamplingSettings(seed=3, max_tokens=3).replicate(2)
    events = []
    async with eng.fanout(Q, settings, together=True) as fo:
        async for ev in fo:
            events.append((ev.candidate.index, ev.delta_text, ev.finished))
            if ev.finished and not fo.running:  # what a caller books as the fan-out ends
                booked = fo.prompt_tokens, fo.completion_tokens
    assert booked == (7, 5)
    assert len(bodies) == 1 and bodies[0]["n"] == 2 and bodies[0]["seed"] == 3
    assert bodies[0]["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    a, b = fo.candidates
    assert (a.text, a.token_count, a.finish_reason) == ("42", 2, "stop")
    assert (b.text, b.token_count, b.finish_reason) == ("Four", 3, "length")
    assert fo.prompt_tokens == 7 and eng.num_running == 0
    assert (0, "", True) in events[: events.index((1, "", True))]  # the first finished first
    # apart (a strategy that aborts one by one): one n=1 request each, seeds 3 and 4
    bodies.clear()
    one = [_choice(0, "x", finish="stop"), *_end(1)]
    eng = _engine(one, bodies)
    async with eng.fanout(Q, settings) as fo:
        await fo.wait()
    assert [(b.get("n"), b["seed"]) for b in bodies] == [(None, 3), (None, 4)]


async def test_an_upstream_that_counts_only_the_whole_request_has_its_total_shared_out():
    from ttscale.engine import SamplingSettings

    script = [_choice(0, "ab"), _choice(1, "c"), _choice(0, finish="stop"), _choice(1, finish="stop"), *_end(9)]
    eng = _engine(script, [])
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        async for ev in fo:
            if ev.finished and not fo.running:
                booked = fo.completion_tokens
    assert booked == sum(c.token_count for c in fo.candidates) == 9  # usage stays exact
    assert [c.text for c in fo.candidates] == ["ab", "c"]


async def test_aborting_some_of_a_group_stops_them_for_the_caller_and_counts_what_the_upstream_spends():
    from ttscale.engine import SamplingSettings

    tail = [_choice(0, "b", tokens=2), _choice(1, "y", finish="stop", tokens=2), _choice(0, "c", tokens=3)]
    gated = _Gated([_choice(0, "a", tokens=1), _choice(1, "x", tokens=1)], [*tail, *_end(5)])
    eng = _engine(gated, [])
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        async for ev in fo:
            if ev.candidate.index == 0 and ev.delta_text == "a":
                await fo.abort(0)  # its sibling still runs: the stream stays open
                gated.gate.set()
        a, b = fo.candidates
        assert (b.text, b.finish_reason) == ("xy", "stop")
        # only the aborted one was left: the stream closed then, the upstream stopped it
        assert gated.closed and not gated.sent_all
    assert (a.text, a.finish_reason, a.token_count) == ("a", "abort", 2)  # the upstream spent 2
    assert fo.prompt_tokens == 7
    # aborting every one of them closes the stream: the upstream stops the request
    gated = _Gated([_choice(0, "a", tokens=1), _choice(1, "x", tokens=1)], [])
    eng = _engine(gated, [])
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        seen = 0
        async for _ in fo:
            seen += 1
            if seen == 2:
                await fo.abort_all()
    assert [c.finish_reason for c in fo.candidates] == ["abort", "abort"]
    assert gated.closed and not gated.sent_all and eng.num_running == 0


async def test_a_group_lost_with_its_replica_is_redrawn_one_by_one_and_keeps_what_finished():
    from ttscale.engine import SamplingSettings

    prompt = [{"role": "user", "content": "q"}]
    urls = ["http://r1:1", "http://r2:1"]
    order = [urls[i] for i in rendezvous(prompt_key("m", prompt, None), urls)]
    bodies: dict[str, list[dict]] = {u: [] for u in urls}
    first = [_choice(0, "done", finish="stop", tokens=1), _choice(1, "ag", tokens=1), _choice(2, "a", tokens=1)]
    pool = _pool({order[0]: _Broken(first), order[1]: _sse(["again"], finish=True, usage=1)})
    for rep in pool.replicas:
        inner = rep.engine._client._transport.handler  # type: ignore[attr-defined]

        def spy(request: httpx.Request, inner=inner, url=rep.url) -> httpx.Response:
            bodies[url].append(json.loads(request.content))
            return inner(request)

        rep.engine._client = httpx.AsyncClient(transport=httpx.MockTransport(spy))
    async with pool.fanout(prompt, SamplingSettings(seed=5).replicate(3), together=True) as fo:
        await fo.wait()
    assert [(b["n"], b["seed"]) for b in bodies[order[0]]] == [(3, 5)]  # one call for all three
    assert sorted((b.get("n"), b["seed"]) for b in bodies[order[1]]) == [(None, 6), (None, 7)]
    done, *redrawn = fo.candidates
    assert (done.text, done.redraws) == ("done", 0)
    assert [(c.text, c.redraws, c.lost_tokens) for c in redrawn] == [("again", 1, 1), ("again", 1, 1)]
    assert fo.placement == [order[0], order[1], order[1]]
    lost = next(r for r in pool.replicas if r.url == order[0])
    assert not lost.up and lost.redrawn == 2 and lost.in_flight == 0


async def test_a_pool_told_not_to_group_sends_one_request_per_candidate():
    from dataclasses import replace

    from ttscale.engine import SamplingSettings

    bodies: list[dict] = []
    pool = _pool({"http://r1:1": []})

    def spy(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        n = bodies[-1].get("n", 1)
        script = [*(_choice(i, "x", finish="stop", tokens=1) for i in range(n)), *_end(n)]
        return httpx.Response(200, content=b"".join(script), headers={"content-type": "text/event-stream"})

    pool.replicas[0].engine._client = httpx.AsyncClient(transport=httpx.MockTransport(spy))
    settings = SamplingSettings(seed=2).replicate(3)
    async with pool.fanout(Q, settings, together=True) as fo:
        await fo.wait()
    assert [(b.get("n"), b["seed"]) for b in bodies] == [(3, 2)]
    assert [c.text for c in fo.candidates] == ["x"] * 3
    bodies.clear()
    pool.options = replace(pool.options, group=False)
    async with pool.fanout(Q, settings, together=True) as fo:
        await fo.wait()
    assert sorted((b.get("n"), b["seed"]) for b in bodies) == [(None, 2), (None, 3), (None, 4)]
    assert [c.text for c in fo.candidates] == ["x"] * 3


async def test_a_group_cut_after_some_finished_keeps_its_prompt_tokens_and_finished_answers():
    from ttscale.engine import SamplingSettings

    # A ends; B's whole answer is in but the request's usage is not: an abort then keeps B's end
    gated = _Gated([_choice(0, "a", finish="stop", tokens=1), _choice(1, "b", finish="stop", tokens=1)], _end(2))
    eng = _engine(gated, [])
    finished = []
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        async for ev in fo:
            if ev.finished:
                finished.append((ev.candidate.index, ev.candidate.finish_reason, fo.prompt_tokens))
                if ev.candidate.index == 0:
                    await fo.abort_all()
    assert finished == [(0, "stop", 7), (1, "stop", 7)]
    # B still generating when the rest is aborted: the prompt tokens are booked all the same
    gated = _Gated([_choice(0, "a", finish="stop", tokens=1), _choice(1, "b", tokens=1)], _end(2))
    eng = _engine(gated, [])
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        async for ev in fo:
            if ev.finished and ev.candidate.index == 0:
                await fo.abort_all()
    assert [c.finish_reason for c in fo.candidates] == ["stop", "abort"] and fo.prompt_tokens == 7


async def test_an_abort_before_the_group_request_goes_out_is_not_undone():
    from ttscale.engine import SamplingSettings

    script = [_choice(0, "a", finish="stop", tokens=1), _choice(1, "b", finish="stop", tokens=1), *_end(2)]
    eng = _engine(script, [])
    ends = []
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        await fo.abort(0)  # before the stream task first runs; its sibling still runs
        async for ev in fo:
            if ev.finished:
                ends.append(ev.candidate.index)
    assert sorted(ends) == [0, 1]  # one end each
    assert [c.finish_reason for c in fo.candidates] == ["abort", "stop"] and fo.candidates[1].text == "b"


async def test_the_requests_usage_beyond_its_choices_is_counted():
    from ttscale.engine import SamplingSettings

    # an upstream that spent more than its choices show (a ttscale replica that redrew one)
    script = [_choice(0, "a", finish="stop", tokens=1), _choice(1, "b", finish="stop", tokens=1), *_end(5)]
    eng = _engine(script, [])
    async with eng.fanout(Q, [SamplingSettings()] * 2, together=True) as fo:
        await fo.wait()
    assert [c.token_count for c in fo.candidates] == [1, 1]
    assert sum(c.token_count + c.lost_tokens for c in fo.candidates) == 5


async def test_an_upstream_that_refuses_or_ignores_n_gets_one_request_per_candidate():
    from ttscale.engine import SamplingSettings
    from ttscale.engine.openai_engine import OpenAIEngine

    def make(refuse: bool):
        eng = OpenAIEngine("m", "http://up:1")
        bodies: list[dict] = []

        def handler(request: httpx.Request) -> httpx.Response:
            bodies.append(json.loads(request.content))
            if bodies[-1].get("n") and refuse:
                return httpx.Response(400, json={"error": {"message": "n > 1 is not supported", "param": "n"}})
            # one choice whatever n says
            script = [_choice(0, f"s{bodies[-1]['seed']}", finish="stop", tokens=1), *_end(1)]
            return httpx.Response(200, content=b"".join(script), headers={"content-type": "text/event-stream"})

        eng._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return eng, bodies

    settings = SamplingSettings(seed=3).replicate(3)
    for refuse in (True, False):
        eng, bodies = make(refuse)
        async with eng.fanout(Q, settings, together=True) as fo:
            await fo.wait()
        assert [c.text for c in fo.candidates] == ["s3", "s4", "s5"], refuse
        assert (bodies[0].get("n"), bodies[0]["seed"]) == (3, 3)
        apart = sorted(b["seed"] for b in bodies[1:] if not b.get("n"))
        assert apart == ([3, 4, 5] if refuse else [4, 5])  # ignored: its choice 0 was seed 3's
        # refused: maybe this request's fault, so n is tried again; ignored: never again
        bodies.clear()
        async with eng.fanout(Q, settings, together=True) as fo:
            await fo.wait()
        assert (bodies[0].get("n") == 3) is refuse


async def _held_upstream(release_at: int):
    """A loopback upstream (raw HTTP/1.1) whose chat streams are held until ``release_at`` of them
    are open at once; notes the most open at once."""
    import asyncio

    seen = {"open": 0, "most": 0, "posts": 0}
    full = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(h.split(":")[1]) for h in head.split("\r\n") if h.lower().startswith("content-length")), 0)
        await reader.readexactly(length)
        if head.startswith("GET"):
            body = json.dumps({"data": [{"id": "m", "max_model_len": 4096}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
            writer.write(body)
        else:
            seen["posts"] += 1
            seen["open"] += 1
            seen["most"] = max(seen["most"], seen["open"])
            if seen["open"] >= release_at:
                full.set()
            await full.wait()
            # held a moment longer: streams a client sends beyond its cap would be open by then (the
            # capped case cannot fail by this wait; without it a broken cap could pass unseen)
            await asyncio.sleep(0.2)
            sse = b"".join([_choice(0, "x"), _choice(0, finish="stop", tokens=1), *_end(1)])
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + sse)
            seen["open"] -= 1
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", seen


@pytest.mark.parametrize("cap", [2, None])
async def test_streams_to_a_replica_are_capped_by_max_connections_and_the_rest_wait(cap):
    """One request per candidate (a pool told not to group): at most ``max_connections`` streams
    are open at the replica, the others wait their turn and all finish; without a cap this low,
    all five are open at once."""
    import asyncio

    from ttscale.engine import SamplingSettings
    from ttscale.engine.replicas import ReplicaPool

    srv, url, seen = await _held_upstream(release_at=cap or 5)
    opts = ReplicaOptions(group=False, **({"max_connections": cap} if cap else {}))
    pool = ReplicaPool("m", [url], options=opts)
    await pool.start()
    try:
        async with pool.fanout(Q, SamplingSettings(seed=1).replicate(5), together=True) as fo:
            await asyncio.wait_for(fo.wait(), 60)
    finally:
        await pool.close()
        srv.close()
    assert [c.text for c in fo.candidates] == ["x"] * 5
    assert seen["posts"] == 5
    assert seen["most"] == (cap or 5)


def test_max_connections_must_be_positive():
    with pytest.raises(ValueError, match="max_connections"):
        ReplicaOptions(max_connections=0)
