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
    assert place(5, r, "spread", slack=0.25) == [r[0], r[1], r[2], r[0], r[1]]
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
    page = httpx.get(srv.url + "/metrics", timeout=10).text
    rows = re.finditer(r"^ttscale_requests_total\{([^}]*)\} (\S+)$", page, re.M)
    return sum(float(m.group(2)) for m in rows if status is None or f'status="{status}"' in m.group(1))


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
        assert sorted(delta) == [0, 0, 4], delta  # all K on the prompt's replica
        # the same prompt again: the same replica (its prefix cache)
        r = cli.chat.completions.create(model="pol", messages=msgs, n=4, seed=4, max_tokens=32)
        again = [_requests(s) - b for s, b in zip(reps, before, strict=True)]
        assert [a - d for a, d in zip(again, delta, strict=True)] == [4 if d else 0 for d in delta]
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
    assert [_requests(s) - b for s, b in zip(reps, before, strict=True)] == [2, 2, 2]
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
    # while it is out, its sessions go to the next replica
    before = [_requests(s) for s in (reps[0], reps[2])]
    cli.chat.completions.create(model="pol", messages=MSGS, n=2, max_tokens=8)
    assert sum(_requests(s) - b for s, b in zip((reps[0], reps[2]), before, strict=True)) == 2
    # back on its port: the health checks re-admit it and its sessions return to it
    victim.restart()
    assert wait_until(lambda: _replica_state(front)[victim.url]["up"], 60), _replica_state(front)
    before = _requests(victim)
    cli.chat.completions.create(model="pol", messages=MSGS, n=2, max_tokens=8)
    assert _requests(victim) - before == 2


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
    before = [_requests(r, status="disconnected") for r in reps]
    with httpx.Client(timeout=120) as h, h.stream("POST", front.v1 + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first text: gone at once, 1,500 tokens before any candidate could end
    # each replica saw its 2 candidates' streams end unfinished and stopped their engine requests
    assert wait_until(
        lambda: [_requests(s, status="disconnected") - b for s, b in zip(reps, before, strict=True)] == [2, 2, 2], 30
    ), [_requests(s, status="disconnected") - b for s, b in zip(reps, before, strict=True)]
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
    assert sum(delta) == 24, delta
    # 12 prompts on 3 replicas by their hashes: all on one would be a broken key (p ~ 1e-5)
    assert sum(d > 0 for d in delta) >= 2, delta
    assert all(d % 2 == 0 for d in delta), delta  # a problem's samples stay together


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
