"""`ttscale serve` takes vLLM's own engine options (command line and config file, per model),
and /health tells the truth about its engines."""

from __future__ import annotations

import json
import os
import signal

import httpx
import openai
import psutil
import pytest
from typer.testing import CliRunner

import ttscale.cli as cli
from conftest import DRAFT, POLICY, VERIFIER, start_server, wait_until
from ttscale.engine.options import parse_engine_cli, parse_engine_mapping, to_tokens
from ttscale.errors import ConfigError


def test_command_line_words_go_through_vllms_parser(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    opts, bare = parse_engine_cli(
        [
            "--tensor-parallel-size",
            "2",
            str(model),
            "--enforce-eager",
            "--kv-cache-dtype",
            "fp8",
            "--served-model-name",
            "a",
            "b",
            "--hf-overrides",
            '{"rope_theta": 1e6}',
        ]
    )
    assert bare == [str(model)]
    assert opts == {
        "tensor_parallel_size": 2,
        "enforce_eager": True,
        "kv_cache_dtype": "fp8",
        "served_model_name": ["a", "b"],
        "hf_overrides": {"rope_theta": 1e6},
    }
    # vLLM's own spellings, and values equal to vLLM's defaults, still count as set
    opts, bare = parse_engine_cli(
        ["/x/first-word-is-the-model", "--max_num_seqs", "4", "--gpu-memory-utilization", "0.92", "--no-enforce-eager"]
    )
    assert bare == ["/x/first-word-is-the-model"]
    assert opts == {"max_num_seqs": 4, "gpu_memory_utilization": 0.92, "enforce_eager": False}


@pytest.mark.parametrize(
    "words,needle",
    [
        (["--max-num-seqs", "many"], "--max-num-seqs"),
        (["--no-such-option", "1"], "--no-such-option"),
        (["--kv-cache-dtype", "int3"], "--kv-cache-dtype"),
        (["a", "b"], "unrecognized"),
        (["--model", "x"], "--model is set by ttscale"),
    ],
)
def test_bad_engine_options_are_named(words, needle):
    with pytest.raises(ConfigError) as e:
        parse_engine_cli(words)
    assert needle in e.value.message


def test_config_mappings_are_typed_like_the_command_line():
    opts = parse_engine_mapping(
        {
            "max_num_seqs": 64,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "served_model_name": ["x"],
            "gpu_memory_utilization": 0.25,
            "hf_overrides": {"a": 1},
        },
        where="test",
    )
    assert opts == {
        "max_num_seqs": 64,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "served_model_name": ["x"],
        "gpu_memory_utilization": 0.25,
        "hf_overrides": {"a": 1},
    }
    assert "--no-enable-prefix-caching" in to_tokens({"enable_prefix_caching": False}, where="test")
    with pytest.raises(ConfigError, match="unknown vLLM engine option 'max_num_seq'"):
        parse_engine_mapping({"max_num_seq": 1}, where="test")


@pytest.fixture
def captured(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_server", lambda pool, **kw: seen.update(pool=pool, **kw))
    return seen


def test_serve_model_argument_and_options_in_any_order(captured):
    r = CliRunner().invoke(
        cli.app, ["serve", "--max-num-seqs", "8", POLICY, "--port", "9", "--served-model-name", "pol", "pol2"]
    )
    assert r.exit_code == 0, r.output
    pool = captured["pool"]
    assert pool.names == ["pol"] and pool.aliases == {"pol2": "pol"} and captured["port"] == 9
    (eng,) = list(pool)
    assert eng.options.engine_args()["max_num_seqs"] == 8
    assert "served_model_name" not in eng.engine_kwargs(gpu=False)


def test_api_keys_from_the_command_line_a_file_and_the_environment(captured, tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("k2\n")
    monkeypatch.setenv("TTSCALE_API_KEY", "k3")
    r = CliRunner().invoke(
        cli.app,
        ["serve", POLICY, "--api-key", "k1", "--api-key-file", str(f), "--public-metrics", "--cors-origin", "*"],
    )
    assert r.exit_code == 0, r.output
    assert captured["api_keys"] == ["k1", "k2", "k3"] and captured["public_metrics"] is True
    assert captured["public_docs"] is False and captured["cors_origins"] == ["*"]
    r = CliRunner().invoke(cli.app, ["serve", POLICY, "--api-key-file", str(tmp_path / "none")])
    assert r.exit_code == 2 and "API key file" in r.output


def test_a_share_for_several_models_is_split_by_the_plan(captured):
    r = CliRunner().invoke(cli.app, ["serve", "--gpu-memory-utilization", "0.5", "--max-model-len", "512"])
    assert r.exit_code == 0, r.output
    pool = captured["pool"]
    assert pool.gpu_share == 0.5 and len(pool.names) == 3
    for e in pool:
        args = e.options.engine_args()
        assert args["max_model_len"] == 512 and "gpu_memory_utilization" not in args


def test_config_file_per_model_options(tmp_path, captured):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"""
engine: {{max_model_len: 640}}
models:
  - {{name: pol, path: {POLICY}, engine: {{max_num_seqs: 12, max_model_len: 700}}}}
  - {{name: ver, path: {VERIFIER}, role: score}}
""")
    r = CliRunner().invoke(cli.app, ["serve", "--config", str(cfg), "--enforce-eager"])
    assert r.exit_code == 0, r.output
    pol, ver = list(captured["pool"])
    assert pol.name == "pol" and ver.name == "ver" and ver.role == "score"
    assert pol.options.engine_args() == {"max_model_len": 700, "max_num_seqs": 12, "enforce_eager": True}
    assert ver.options.engine_args() == {"max_model_len": 640, "enforce_eager": True}


def test_config_file_replicas_and_their_options(tmp_path, captured):
    from ttscale.engine.openai_engine import OpenAIEngine
    from ttscale.engine.replicas import ReplicaPool

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("""
models:
  - name: pol
    urls: [http://10.0.0.1:8000, http://10.0.0.2:8000]
    upstream_model: qwen
    replicas: {placement: spread, retries: 1, group: false}
  - {name: one, url: http://10.0.0.3:8000}
  - {name: apart, url: http://10.0.0.3:8000, replicas: {group: false}}
""")
    r = CliRunner().invoke(cli.app, ["serve", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    pol, one, apart = list(captured["pool"])
    assert isinstance(pol, ReplicaPool) and [x.url for x in pol.replicas] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
    ]
    assert (pol.upstream_model, pol.options.placement, pol.options.retries, pol.options.group) == (
        "qwen",
        "spread",
        1,
        False,
    )
    assert isinstance(one, OpenAIEngine)
    assert isinstance(apart, ReplicaPool) and apart.options.group is False  # a single URL with options
    cfg.write_text("models: [{name: p, urls: [http://a:1], replicas: {placement: nearest}}]")
    r = CliRunner().invoke(cli.app, ["serve", "--config", str(cfg)])
    assert r.exit_code != 0 and "placement" in r.output, r.output


@pytest.mark.parametrize(
    "text,needle",
    [
        ("models: [{name: a, path: x, engine: {max_num_seq: 1}}]", "unknown vLLM engine option 'max_num_seq'"),
        ("models: [{name: a}]", "needs a 'path'"),
        ("modles: []", "unknown key 'modles'"),
        ("models: [{name: a, path: x, engine: {max_num_seqs: lots}}]", "--max-num-seqs"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_config_files_fail_with_a_clear_message(tmp_path, captured, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    r = CliRunner().invoke(cli.app, ["serve", "--config", str(cfg)])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "pool" not in captured


def test_help_engine_prints_vllms_options():
    r = CliRunner().invoke(cli.app, ["serve", "--help-engine"])
    assert r.exit_code == 0 and "--tensor-parallel-size" in r.output and "--kv-cache-dtype" in r.output


# -- a real server started from a config file ------------------------------------------------------


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    d = tmp_path_factory.mktemp("configured")
    cfg = d / "serve.json"
    cfg.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "pol",
                        "path": POLICY,
                        "engine": {"max_model_len": 384, "served_model_name": ["pol", "pol-alias"]},
                    },
                    {"name": "drf", "path": DRAFT, "engine": {"max_model_len": 256, "max_num_seqs": 4}},
                ]
            }
        )
    )
    keys = d / "keys.txt"
    keys.write_text("# clients\nk-two  # the second client\n\n")
    srv = start_server(
        [], d / "server.log", "--config", str(cfg), "--max-num-seqs", "16",
        "--api-key", "k-one", "--api-key-file", str(keys), "--on-engine-death", "stay",
        env={"TTSCALE_API_KEY": "k-three, k-four"},
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.mark.server
@pytest.mark.vllm
def test_config_file_options_reach_the_engines(configured):
    auth = {"Authorization": "Bearer k-one"}
    cards = {c["id"]: c for c in httpx.get(configured.v1 + "/models", headers=auth, timeout=10).json()["data"]}
    assert cards["pol"]["max_model_len"] == 384 and cards["drf"]["max_model_len"] == 256
    assert cards["pol"]["ttscale"]["max_num_seqs"] == 16 and cards["drf"]["ttscale"]["max_num_seqs"] == 4
    assert cards["pol-alias"]["root"] == "pol"
    client = openai.OpenAI(base_url=configured.v1, api_key="k-two", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="pol-alias", max_tokens=16, seed=1, messages=[{"role": "user", "content": "What is 2 + 3?"}]
    )
    assert r.model == "pol" and r.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:  # the configured context length holds
        client.completions.create(model="drf", prompt="1 + 1 = ", max_tokens=300)
    assert e.value.body["param"] == "max_tokens"


@pytest.mark.server
@pytest.mark.vllm
def test_api_keys_guard_everything_but_health(configured):
    ask = {"model": "pol", "max_tokens": 4, "messages": [{"role": "user", "content": "1 + 1 = ?"}]}
    for key in ("k-one", "k-two", "k-four"):  # command line, key file, environment
        c = openai.OpenAI(base_url=configured.v1, api_key=key, max_retries=0, timeout=120)
        assert c.chat.completions.create(**ask).usage.completion_tokens > 0
    for key in ("wrong", "k-one "[:-2], "# clients"):
        c = openai.OpenAI(base_url=configured.v1, api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(**ask)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs"):
        r = httpx.get(configured.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", (path, r.text)
    assert httpx.get(configured.url + "/health", timeout=10).status_code == 200


@pytest.mark.server
@pytest.mark.vllm
def test_health_goes_503_when_an_engine_process_dies(configured):
    h = configured.health()
    assert h["status"] == "ok" and h["engines"] == {"pol": "up", "drf": "up"}
    server = psutil.Process(configured.proc.pid)
    cores = [
        p for p in server.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
    ]
    assert cores, [(p.name(), p.cmdline()) for p in server.children(recursive=True)]
    victim = cores[-1]
    os.kill(victim.pid, signal.SIGKILL)

    def down() -> bool:
        r = httpx.get(configured.url + "/health", timeout=10)
        return r.status_code == 503 and r.json()["status"] == "engine_down"

    assert wait_until(down, 60), configured.health()
    assert "down" in configured.health()["engines"].values()


def _engine_cores(pid: int) -> list[psutil.Process]:
    procs = psutil.Process(pid).children(recursive=True)
    return [p for p in procs if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]


@pytest.mark.server
@pytest.mark.vllm
def test_the_server_exits_with_code_4_when_an_engine_dies(tmp_path):
    srv = start_server([POLICY], tmp_path / "server.log")  # --on-engine-death exit is the default
    try:
        cores = _engine_cores(srv.proc.pid)
        assert cores, srv.tail()
        os.kill(cores[-1].pid, signal.SIGKILL)
        assert wait_until(lambda: srv.proc.poll() is not None, 90), srv.tail()
        assert srv.proc.returncode == 4, srv.tail()
        assert "stopped; the server exits" in srv.log.read_text(errors="replace")
        # what a supervisor (and the suite's fixture, for its session server) does next
        assert srv.broken()
        port = srv.port
        srv.restart()
        assert srv.port == port and not srv.broken() and srv.health()["status"] == "ok"
        name = httpx.get(srv.v1 + "/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(srv.v1 + "/completions", json={"model": name, "prompt": "1+1=", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


def _answer_or_openai_error(kind: str, r: httpx.Response) -> str:
    """What one client of a shutdown saw: a complete answer, or an OpenAI-shaped error."""
    if kind == "stream":
        assert r.status_code == 200, r.text
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "shutting_down" and last["error"]["message"], last
            return "error"
        finished = [c for e in events[:-1] for c in json.loads(e).get("choices", []) if c.get("finish_reason")]
        assert finished, r.text[-300:]
        return "answer"
    if r.status_code == 200:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop"), r.text
        return "answer"
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["code"] == "shutting_down" and err["type"] == "service_unavailable", err
    return "error"


@pytest.mark.server
@pytest.mark.vllm
def test_sigterm_drains_requests_in_flight_then_exits(tmp_path):
    import concurrent.futures as cf
    import time

    grace = 2.0
    srv = start_server([POLICY], tmp_path / "server.log", "--shutdown-grace", str(grace))
    try:
        name = httpx.get(srv.v1 + "/models", timeout=10).json()["data"][0]["id"]
        room = httpx.get(srv.v1 + f"/models/{name}", timeout=10).json()["max_model_len"] - 64
        msgs = [{"role": "user", "content": "1+1="}]

        def call(kind: str, max_tokens: int) -> tuple[str, httpx.Response]:
            body = {"model": name, "messages": msgs, "max_tokens": max_tokens, "ignore_eos": True}
            body |= {"stream": True} if kind == "stream" else {}
            return kind, httpx.post(srv.v1 + "/chat/completions", json=body, timeout=120)

        with cf.ThreadPoolExecutor(4) as pool:
            # two that a 2 s grace lets finish on any host, two that it cuts on a CPU host
            futs = [pool.submit(call, k, t) for k, t in [("json", 8), ("stream", 8), ("json", room), ("stream", room)]]
            assert wait_until(lambda: srv.health()["requests_in_flight"] == 4 or any(f.done() for f in futs), 60)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            seen = [_answer_or_openai_error(*f.result(timeout=120)) for f in futs]
        # uvicorn ends by re-raising the signal it handled: killed by SIGTERM, the shutdown's own
        assert srv.proc.wait(timeout=120) in (0, -signal.SIGTERM), srv.tail()
        took = time.monotonic() - t0
        log = srv.log.read_text(errors="replace")
        assert "Traceback" not in log, srv.tail()
        print(f"SIGTERM with 4 in flight: {seen}, exit after {took:.1f} s (grace {grace} s)")
    finally:
        srv.stop()


def test_eval_run_and_rescore_take_vllm_engine_options(monkeypatch, tmp_path):
    """`ttscale eval run/rescore ... --gpu-memory-utilization 0.45` reach the in-process engines."""
    import ttscale.eval.runner as runner

    seen = {}
    monkeypatch.setattr(runner, "run_sync", lambda cfg, out, **kw: (seen.update(cfg=cfg), {})[1])
    monkeypatch.setattr(runner, "rescore_sync", lambda src, out, verifier, **kw: (seen.update(kw=kw), {})[1])
    r = CliRunner().invoke(
        cli.app,
        [
            "eval",
            "run",
            "arith500",
            "--gpu-memory-utilization",
            "0.45",
            "-m",
            POLICY,
            "--verifier",
            VERIFIER,
            "--max-model-len",
            "1024",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert dict(cfg.engine) == {"gpu_memory_utilization": 0.45, "max_model_len": 1024}
    policy, verifier = runner.build_engines(cfg)
    for eng in (policy, verifier):
        assert eng.options.engine_args() == {"gpu_memory_utilization": 0.45, "max_model_len": 1024}
    assert (policy.name, verifier.name) == (POLICY, VERIFIER)
    assert runner.manifest_for(cfg, runner.load_dataset("arith500", limit=2))["engine"] == dict(cfg.engine)

    r = CliRunner().invoke(
        cli.app,
        [
            "eval",
            "rescore",
            str(tmp_path / "r"),
            "--verifier",
            VERIFIER,
            "-o",
            str(tmp_path / "s"),
            "--kv-cache-dtype",
            "fp8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert seen["kw"]["engine_options"] == {"kv_cache_dtype": "fp8"}


@pytest.mark.parametrize(
    "words,needle",
    [
        (["--gpu-memory-utilization", "lots"], "--gpu-memory-utilization"),
        (["--no-such-option", "1"], "--no-such-option"),
        (["stray"], "unrecognized arguments: stray"),
        # engine options with only an HTTP upstream to run: refused before anything is written
        (["-m", "up=http://127.0.0.1:9", "--max-model-len", "1024"], "every model of this run is an HTTP upstream"),
    ],
)
def test_eval_run_names_a_bad_engine_option(tmp_path, words, needle):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli.app, ["eval", "run", "arith500", "--out", str(out), "--limit", "1", *words])
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output and not out.exists()
