"""ttscale's HTTP adapter against a real ``vllm serve`` (the CPU build, the embedded model): a
fan-out whose candidates stop only together is one ``n=k`` request, and it draws what k
seeded requests draw (vLLM seeds choice i with seed + i), counted per choice through
``continuous_usage_stats``; closing its stream stops vLLM's work."""

from __future__ import annotations

import re
import sys

import httpx
import pytest

from conftest import POLICY, _launch, free_port, wait_until
from ttscale.engine import SamplingSettings
from ttscale.engine.openai_engine import OpenAIEngine
from ttscale.models import resolve_model

pytestmark = [pytest.mark.server, pytest.mark.vllm]

CHAT = [{"role": "user", "content": "Ada has 17 pens. She buys 25 more. How many pens does Ada have now?"}]


@pytest.fixture(scope="module")
def vllm_serve(tmp_path_factory):
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model(POLICY))]
    args += ["--served-model-name", "arith", "--port", str(port), "--max-model-len", "2048"]
    args += ["--gpu-memory-utilization", "0.5"]
    srv = _launch(args, port, tmp_path_factory.mktemp("vllm") / "vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"})
    yield srv
    srv.stop()


async def _engine(url: str) -> tuple[OpenAIEngine, list[dict]]:
    eng = OpenAIEngine("arith", url)
    await eng.start()
    sent: list[dict] = []

    async def note(request: httpx.Request) -> None:
        if request.url.path.endswith("completions"):
            import json

            sent.append(json.loads(request.content))

    eng._client = httpx.AsyncClient(timeout=300, event_hooks={"request": [note]})
    return eng, sent


def _gauge(url: str, name: str) -> float:
    page = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", page, re.M))


def _running(url: str) -> float:
    return _gauge(url, "vllm:num_requests_running")


@pytest.mark.parametrize(("prompt", "logprobs"), [(CHAT, None), ("Q: 17 + 25 = ?\nA:", 2)])
async def test_one_n_k_request_draws_what_k_seeded_requests_draw(vllm_serve, prompt, logprobs):
    eng, sent = await _engine(vllm_serve.url)
    settings = SamplingSettings(seed=5, max_tokens=40, temperature=1.0, logprobs=logprobs).replicate(4)
    try:
        async with eng.fanout(prompt, settings, together=True) as group:
            await group.wait()
        assert [(b.get("n"), b["seed"]) for b in sent] == [(4, 5)]
        sent.clear()
        async with eng.fanout(prompt, settings) as apart:
            await apart.wait()
        assert sorted((b.get("n"), b["seed"]) for b in sent) == [(None, 5), (None, 6), (None, 7), (None, 8)]
    finally:
        await eng.close()
    g, a = group.candidates, apart.candidates
    assert [c.text for c in g] == [c.text for c in a] and any(c.text for c in g)
    assert [c.token_count for c in g] == [c.token_count for c in a]  # vLLM counted each choice
    assert [c.finish_reason for c in g] == [c.finish_reason for c in a]
    assert group.prompt_tokens == apart.prompt_tokens > 0
    if logprobs is not None:
        assert [len(c.logprobs) for c in g] == [c.token_count for c in g]
        for x, y in zip(g, a, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
    if isinstance(prompt, str):
        assert len({c.text for c in g}) > 1  # the seeds differ per choice, as they do apart


async def test_closing_an_n_k_stream_stops_vllms_work(vllm_serve):
    eng, _ = await _engine(vllm_serve.url)
    settings = SamplingSettings(seed=1, max_tokens=1900, ignore_eos=True).replicate(3)
    generated = _gauge(vllm_serve.url, "vllm:generation_tokens_total")
    try:
        async with eng.fanout(CHAT, settings, together=True) as fo:
            async for ev in fo:
                if ev.delta_text:
                    break
            await fo.abort_all()
        assert all(c.aborted and c.token_count < 1900 for c in fo.candidates)
        assert wait_until(lambda: _running(vllm_serve.url) == 0, 60)
        # vLLM stopped all three: it generated far fewer than the 3 × 1,900 tokens asked for
        spent = _gauge(vllm_serve.url, "vllm:generation_tokens_total") - generated
        assert 0 < spent < 1900
        assert eng.num_running == 0
    finally:
        await eng.close()
