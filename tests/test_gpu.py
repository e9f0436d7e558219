"""On a GPU host (`make test-gpu`; skipped elsewhere): `ttscale serve` with no arguments starts the
embedded family on one GPU (memory split by the plan) and answers every strategy; a real model
(``TTSCALE_TEST_REAL_MODEL``) serves with vLLM engine options; models that cannot fit fail at
start with a message naming them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from conftest import REAL_MODEL, start_server

pytestmark = [pytest.mark.gpu, pytest.mark.server, pytest.mark.vllm]


def test_no_arguments_plans_the_gpu_for_the_family(server):
    """The session server is `ttscale serve` with no model arguments (the embedded family): on a
    GPU its log holds the memory plan, and every engine is up (the conformance suite then runs
    every strategy against it)."""
    h = server.health()
    assert h["status"] == "ok" and set(h["engines"].values()) == {"up"} and len(h["engines"]) == 3
    text = server.log.read_text(errors="replace")
    assert "GPU memory plan" in text and "gpu_memory_utilization" in text, server.tail()


@pytest.mark.skipif(not REAL_MODEL, reason="set TTSCALE_TEST_REAL_MODEL to a local model directory")
def test_real_model_with_engine_options(tmp_path):
    log = tmp_path / "server.log"
    srv = start_server(
        [f"real={REAL_MODEL}"],
        log,
        "--gpu-memory-utilization",
        "0.3",
        "--max-num-seqs",
        "48",
        "--max-model-len",
        "4096",
        "--log-level",
        "info",
    )
    try:
        card = httpx.get(srv.v1 + "/models/real", timeout=10).json()
        assert card["max_model_len"] == 4096
        text = log.read_text(errors="replace")
        assert "'gpu_memory_utilization': 0.3" in text and "'max_num_seqs': 48" in text, srv.tail()
        client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(
            model="real",
            temperature=0.7,
            seed=1,
            max_tokens=512,
            messages=[{"role": "user", "content": "What is 17 * 23? Put the final answer in \\boxed{}."}],
            extra_body={"ttscale": {"strategy": "majority", "budget": {"samples": 8}}},
        )
        tts = r.model_extra["ttscale"]
        assert tts["answer"] == "391", tts
        assert r.usage.completion_tokens == tts["usage"]["models"]["real"]["completion_tokens"] > 0
        assert srv.health()["status"] == "ok"
    finally:
        srv.stop()


def test_models_that_do_not_fit_fail_at_start_naming_them():
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "ttscale.cli", "serve", "--gpu-memory-utilization", "0.02", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "do not fit" in err and "ttscale-arith" in err and "ttscale-arith-verifier" in err, err[-2000:]
