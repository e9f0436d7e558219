"""Eval throughput: tokens/s of ``ttscale eval run``'s sampler (fan-outs, grading, verifier-less
records fsync'ed to a run store) vs. the same samples drawn straight from the engine
(vLLM ``AsyncLLM.generate`` with ``n=K``, ``RequestOutputKind.FINAL_ONLY``), in one process,
rounds interleaved (the order alternates each round).

    python bench/eval_throughput.py [--model ttscale-arith] [--k 16] [--problems 32] [--rounds 3]

Both sides use the same prompts (arith500 problems spread over the levels, chat template),
the same seeds (problem seed + i for sample i), K, temperature, max_tokens and per-token
log-probs, with the same number of problems in flight, so the ratio compares wall times for
the same tokens. Goal: ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path


async def raw_phase(engine, problems, a) -> tuple[int, float, dict[str, list[list[int]]]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from ttscale.eval.runner import chat_prompt, problem_seed

    sem = asyncio.Semaphore(a.concurrency)
    tokens = 0
    ids_out: dict[str, list[list[int]]] = {}

    async def one(p) -> None:
        nonlocal tokens
        async with sem:
            ids = engine.render(chat_prompt(p["problem"]))
            params = SamplingParams(
                n=a.k,
                temperature=a.temperature,
                top_p=1.0,
                max_tokens=a.max_tokens,
                seed=problem_seed(a.seed, p["id"]),
                logprobs=0,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            last = None
            async for out in engine.llm.generate({"prompt_token_ids": ids}, params, f"raw-{p['id']}-{time.time_ns()}"):
                last = out
        outs = sorted(last.outputs, key=lambda o: o.index)
        tokens += sum(len(o.token_ids) for o in outs)
        ids_out[p["id"]] = [list(o.token_ids) for o in outs]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in problems))
    return tokens, time.perf_counter() - t0, ids_out


async def eval_phase(engine, ds, a) -> tuple[int, float, dict[str, list[int]]]:
    from ttscale.eval.runner import EvalRunner, RunConfig

    cfg = RunConfig(
        dataset=ds.name,
        model=engine.name,
        k=a.k,
        seed=a.seed,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        concurrency=a.concurrency,
        prompt_template="plain",  # the problem alone, as the raw phase renders it (chat_prompt)
    )
    with tempfile.TemporaryDirectory() as d:
        runner = EvalRunner(cfg, Path(d) / "run", policy=engine, dataset=ds, progress=False)
        t0 = time.perf_counter()
        await runner.run()
        wall = time.perf_counter() - t0
        from ttscale.eval.store import load_run

        _, recs = load_run(Path(d) / "run")
    tok_counts = {r["id"]: [s["tokens"] for s in r["samples"]] for r in recs}
    return runner.tokens, wall, tok_counts


async def main(a: argparse.Namespace) -> None:
    from ttscale.engine import parse_model_arg
    from ttscale.engine.vllm_engine import VLLMEngine
    from ttscale.eval.data import load_dataset
    from ttscale.models import resolve_model

    spec = parse_model_arg(a.model)
    ds = load_dataset("arith500", limit=a.problems)
    warm = load_dataset("arith500", limit=4)
    engine = VLLMEngine(spec.name, resolve_model(spec.source))
    await engine.start()
    try:
        await raw_phase(engine, warm.problems, a)
        await eval_phase(engine, warm, a)
        rows = []
        for r in range(a.rounds):
            if r % 2 == 0:
                raw_tok, raw_s, raw_ids = await raw_phase(engine, ds.problems, a)
                ev_tok, ev_s, ev_counts = await eval_phase(engine, ds, a)
            else:
                ev_tok, ev_s, ev_counts = await eval_phase(engine, ds, a)
                raw_tok, raw_s, raw_ids = await raw_phase(engine, ds.problems, a)
            same = all([len(t) for t in raw_ids[pid]] == ev_counts[pid] for pid in raw_ids)
            rows.append(
                {
                    "raw_tok_s": raw_tok / raw_s,
                    "eval_tok_s": ev_tok / ev_s,
                    "ratio": (ev_tok / ev_s) / (raw_tok / raw_s),
                    "same": same and raw_tok == ev_tok,
                }
            )
            print(
                f"round {r}: engine {raw_tok} tok in {raw_s:.2f}s = {raw_tok / raw_s:,.0f} tok/s | "
                f"eval {ev_tok} tok in {ev_s:.2f}s = {ev_tok / ev_s:,.0f} tok/s | "
                f"ratio {rows[-1]['ratio']:.3f} | same samples {rows[-1]['same']}",
                flush=True,
            )
        print(
            json.dumps(
                {
                    "bench": "eval_throughput",
                    "model": spec.name,
                    "k": a.k,
                    "problems": len(ds.problems),
                    "max_tokens": a.max_tokens,
                    "concurrency": a.concurrency,
                    "same_samples": all(x["same"] for x in rows),
                    "engine_tok_s_median": round(statistics.median(x["raw_tok_s"] for x in rows), 1),
                    "eval_tok_s_median": round(statistics.median(x["eval_tok_s"] for x in rows), 1),
                    "ratio_median": round(statistics.median(x["ratio"] for x in rows), 3),
                    "ratios": [round(x["ratio"], 3) for x in rows],
                }
            )
        )
    finally:
        await engine.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ttscale-arith")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
