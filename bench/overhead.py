"""Server overhead: tokens/s of K samples through the ttscale server vs. the same work sent
straight to the engine (vLLM ``AsyncLLM``, ``n=K``), in one run, phases interleaved (the order
alternates between rounds).

    python bench/overhead.py [--model ttscale-arith] [--k 16] [--prompts 32] [--rounds 3]
    python bench/overhead.py --strategy majority     # majority@K through the server vs raw n=K

Both sides draw identical samples (same prompts, seeds, K, max_tokens; with ``majority`` the
raw side also returns the sampled tokens' log-probs, which the vote's tie-break uses), so the
ratio is a ratio of wall times for the same tokens. Goal: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def load_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in open(ROOT / "eval" / "datasets" / "arith500.jsonl")]
    step = max(1, len(rows) // n)
    return [r["problem"] for r in rows[::step][:n]]


async def raw_phase(engine, prompts, k, max_tokens, concurrency, logprobs=None) -> tuple[int, float]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int, p: str) -> None:
        nonlocal tokens
        ids = engine.render([{"role": "user", "content": p}])
        params = SamplingParams(n=k, temperature=0.8, seed=1000 + i, max_tokens=max_tokens,
                                logprobs=logprobs, output_kind=RequestOutputKind.FINAL_ONLY)
        async with sem:
            last = None
            async for out in engine.llm.generate({"prompt_token_ids": ids}, params, f"raw-{i}-{time.time_ns()}"):
                last = out
        tokens += sum(len(o.token_ids) for o in last.outputs)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return tokens, time.perf_counter() - t0


async def server_phase(base_url, model, prompts, k, max_tokens, concurrency, strategy="none") -> tuple[int, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int, p: str) -> None:
        nonlocal tokens
        async with sem:
            if strategy == "none":
                kw = {"n": k}
            else:  # the same K samples, selected by the strategy (no early stop: same work)
                kw = {"extra_body": {"ttscale": {"strategy": strategy, "budget": {"samples": k},
                                                 "stop_when_decided": False}}}
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": p}], temperature=0.8,
                seed=1000 + i, max_tokens=max_tokens, **kw)
        tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    await client.close()
    return tokens, time.perf_counter() - t0


async def main(a: argparse.Namespace) -> None:
    from conftest import start_server
    from ttscale.engine import parse_model_arg
    from ttscale.engine.vllm_engine import VLLMEngine
    from ttscale.models import resolve_model

    spec = parse_model_arg(a.model)
    prompts = load_prompts(a.prompts)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "ttscale-bench-server.log"
    srv = start_server([a.model], log)
    engine = VLLMEngine(spec.name, resolve_model(spec.source))
    await engine.start()
    try:
        # warm both
        lp = 0 if a.strategy == "majority" else None
        await raw_phase(engine, prompts[:2], a.k, a.max_tokens, a.concurrency, lp)
        await server_phase(srv.v1, spec.name, prompts[:2], a.k, a.max_tokens, a.concurrency, a.strategy)

        async def raw():
            return await raw_phase(engine, prompts, a.k, a.max_tokens, a.concurrency, lp)

        async def server():
            return await server_phase(srv.v1, spec.name, prompts, a.k, a.max_tokens, a.concurrency, a.strategy)

        rows = []
        for r in range(a.rounds):
            # A-B, B-A, A-B ...: a slow drift of the machine's load does not favour one side
            if r % 2 == 0:
                (raw_tok, raw_s), (srv_tok, srv_s) = await raw(), await server()
            else:
                (srv_tok, srv_s), (raw_tok, raw_s) = await server(), await raw()
            rows.append((raw_tok / raw_s, srv_tok / srv_s, raw_tok, srv_tok))
            print(f"round {r}: engine {raw_tok} tok in {raw_s:.2f}s = {raw_tok / raw_s:,.0f} tok/s | "
                  f"server {srv_tok} tok in {srv_s:.2f}s = {srv_tok / srv_s:,.0f} tok/s | "
                  f"ratio {srv_tok / srv_s / (raw_tok / raw_s):.3f}", flush=True)
        ratios = [s / r for r, s, _, _ in rows]
        same = all(rt == st for _, _, rt, st in rows)
        print(json.dumps({"bench": "overhead", "strategy": a.strategy, "model": spec.name, "k": a.k, "prompts": len(prompts),
                          "max_tokens": a.max_tokens, "same_tokens": same,
                          "ratio_median": round(statistics.median(ratios), 3),
                          "ratio_geomean": round(statistics.geometric_mean(ratios), 3),
                          "ratios": [round(x, 3) for x in ratios]}))
    finally:
        await engine.close()
        srv.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ttscale-arith")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategy", choices=["none", "majority"], default="none")
    asyncio.run(main(ap.parse_args()))
