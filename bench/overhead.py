"""Server overhead: the same samples through the ttscale server and straight from the engine
(vLLM ``AsyncLLM``, ``n=K``), in one run, phases interleaved (the order alternates between rounds).

    python bench/overhead.py [--model ttscale-arith] [--k 16] [--prompts 32] [--rounds 5]
    python bench/overhead.py --phases none,majority,eval          # several pairs in one run
    python bench/overhead.py --model qwen=/models/qwen --dataset gsm8k --prompts 150 \\
        --concurrency 32 --max-tokens 1024 --phases majority --rounds 2 --gpu-share 0.42

Pairs (each server-side phase against its own raw baseline, same prompts, seeds, K, max_tokens):
- ``none``: ``n=K`` through the server ÷ raw ``n=K``;
- ``majority``: majority@K through the server (early stop off, so the same K samples) ÷ raw
  ``n=K`` with the sampled tokens' log-probs (the vote's tie-break reads them);
- ``majority_es``: majority@K with its default early stop (fewer tokens: compared by wall time);
- ``eval``: ``ttscale eval run``'s sampler (grading, records fsync'ed) ÷ raw with log-probs.
The ratio is tokens/s over tokens/s (decode tokens; each round also records the server side's
prefill tokens and the prefix-cache hits among them). On a GPU the server and the raw engine share the device:
``--gpu-share`` is each one's part of its memory. ``--profile DIR`` runs the server under cProfile
and writes its stats there (``python -m pstats``). Prompts ask for a ``\\boxed{}`` answer, so
real models give real answers to extract and cluster. Each timed side is preceded by a few short
requests on that side (warm-up), and the summary gives the median, the spread and the pooled
ratio (all rounds' tokens over all rounds' seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def load_problems(dataset: str, n: int) -> list[dict]:
    from ttscale.eval.data import load_dataset

    return load_dataset(dataset, limit=n).problems


def messages(p: dict, suffix: bool) -> list[dict[str, str]]:
    return [{"role": "user", "content": p["problem"] + (SUFFIX if suffix else "")}]


async def raw_phase(engine, problems, a, logprobs=None) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sem = asyncio.Semaphore(a.concurrency)
    tokens = 0

    async def one(i: int, p: dict) -> None:
        nonlocal tokens
        async with sem:
            ids = engine.render(messages(p, a.suffix))
            params = SamplingParams(
                n=a.k,
                temperature=a.temperature,
                seed=1000 + i,
                max_tokens=a.max_tokens,
                logprobs=logprobs,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            last = None
            async for out in engine.llm.generate({"prompt_token_ids": ids}, params, f"raw-{i}-{time.time_ns()}"):
                last = out
        tokens += sum(len(o.token_ids) for o in last.outputs)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


async def server_phase(base_url, model, problems, a, strategy) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=1800)
    sem = asyncio.Semaphore(a.concurrency)
    tokens = prefill = cached = 0
    lag: list[float] = []

    async def one(i: int, p: dict) -> None:
        nonlocal tokens, prefill, cached
        async with sem:
            if strategy == "none":
                kw = {"n": a.k}
            else:
                tts = {"strategy": "majority", "budget": {"samples": a.k}}
                if strategy == "majority":  # no early stop: the same K samples as the raw side
                    tts["stop_when_decided"] = False
                kw = {"extra_body": {"ttscale": tts}}
            r = await client.chat.completions.create(
                model=model,
                messages=messages(p, a.suffix),
                temperature=a.temperature,
                seed=1000 + i,
                max_tokens=a.max_tokens,
                **kw,
            )
        tokens += r.usage.completion_tokens  # decode
        usage = r.model_extra["ttscale"]["usage"]
        prefill += usage["prefill_tokens"]
        cached += usage["cached_prefill_tokens"] or 0

    async def probe() -> None:  # event-loop lag of the server: /health round trips under load
        import httpx

        async with httpx.AsyncClient(timeout=60) as h:
            while True:
                t = time.perf_counter()
                await h.get(base_url.removesuffix("/v1") + "/health")
                lag.append(time.perf_counter() - t)
                await asyncio.sleep(0.25)

    prober = asyncio.create_task(probe())
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    seconds = time.perf_counter() - t0
    prober.cancel()
    await client.close()
    return {
        "tokens": tokens,
        "prefill_tokens": prefill,
        "cached_prefill_tokens": cached,
        "seconds": seconds,
        "health_ms_p50": round(1000 * statistics.median(lag), 1) if lag else None,
        "health_ms_max": round(1000 * max(lag), 1) if lag else None,
    }


async def eval_phase(engine, problems, a) -> dict:
    from ttscale.eval.data import Dataset
    from ttscale.eval.runner import EvalRunner, RunConfig

    if a.suffix:  # the eval runner sends the problem as the user message: same text as raw_phase
        problems = [{**p, "problem": p["problem"] + SUFFIX} for p in problems]
    ds = Dataset(name=a.dataset, source=a.dataset, problems=problems, kind="gsm8k" if "gsm8k" in a.dataset else "math")
    cfg = RunConfig(
        dataset=ds.name,
        model=engine.name,
        k=a.k,
        seed=0,
        temperature=a.temperature,
        max_tokens=a.max_tokens,
        concurrency=a.concurrency,
        prompt_template="plain",  # the problem alone, as raw_phase sends it
    )
    with tempfile.TemporaryDirectory() as d:
        runner = EvalRunner(cfg, Path(d) / "run", policy=engine, dataset=ds, progress=False)
        t0 = time.perf_counter()
        await runner.run()
        return {
            "tokens": runner.tokens,
            "prefill_tokens": runner.prefill_tokens,
            "cached_prefill_tokens": runner.cached_prefill_tokens,
            "seconds": time.perf_counter() - t0,
        }


async def main(a: argparse.Namespace) -> None:
    from machine import versions

    from conftest import start_server
    from ttscale.engine import parse_model_arg
    from ttscale.engine.vllm_engine import VLLMEngine, VLLMOptions, has_cuda
    from ttscale.models import resolve_model

    spec = parse_model_arg(a.model)
    problems = load_problems(a.dataset, a.prompts)
    phases = a.phases.split(",")
    gpu = has_cuda()
    share = ["--gpu-memory-utilization", str(a.gpu_share)] if gpu else []
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "ttscale-bench-server.log"
    py_args: tuple[str, ...] = ()
    if a.profile:
        Path(a.profile).mkdir(parents=True, exist_ok=True)
        py_args = ("-m", "cProfile", "-o", str(Path(a.profile) / "server.prof"))
    t0 = time.perf_counter()
    srv = start_server([a.model], log, *share, *a.server_arg, python_args=py_args)
    start_s = time.perf_counter() - t0
    engine = VLLMEngine(
        spec.name, resolve_model(spec.source), options=VLLMOptions(gpu_memory_utilization=a.gpu_share if gpu else None)
    )
    await engine.start()
    try:
        warm = problems[:4]
        await raw_phase(engine, warm, a)
        await raw_phase(engine, warm, a, logprobs=0)
        for ph in phases:
            if ph == "eval":
                await eval_phase(engine, warm, a)
            else:
                await server_phase(srv.v1, spec.name, warm, a, ph)

        brief = argparse.Namespace(**{**vars(a), "k": 4, "max_tokens": 16})

        async def run(ph: str, side: str) -> dict:
            # A few short requests on the side about to be timed: the first run after the other
            # side's measured ~10 % slower on the GPU (rounds that alternate the order swung both
            # ways), whichever side it was.
            if side == "raw" or ph == "eval":
                await raw_phase(engine, warm, brief, logprobs=None if ph == "none" else 0)
            else:
                await server_phase(srv.v1, spec.name, warm, brief, ph)
            if side == "raw":
                return await raw_phase(engine, problems, a, logprobs=None if ph == "none" else 0)
            if ph == "eval":
                return await eval_phase(engine, problems, a)
            return await server_phase(srv.v1, spec.name, problems, a, ph)

        def write(results: dict[str, list[dict]], *, final: bool) -> None:
            """The summary so far (after every round: a run cut short keeps what it measured)."""
            summary = {
                "bench": "overhead",
                "model": spec.name,
                "model_path": str(resolve_model(spec.source).name),
                "dataset": a.dataset,
                "k": a.k,
                "prompts": len(problems),
                "max_tokens": a.max_tokens,
                "concurrency": a.concurrency,
                "rounds": a.rounds,
                "server_start_s": round(start_s, 1),
                "machine": versions(),
                "command": "python bench/overhead.py " + " ".join(sys.argv[1:]),
                "complete": final,
                "phases": {},
            }
            for ph, rows in results.items():
                if not rows:
                    continue
                ratios = [x["ratio"] for x in rows]
                pooled = (sum(x["tokens"] for x in rows) / sum(x["s"] for x in rows)) / (
                    sum(x["raw_tokens"] for x in rows) / sum(x["raw_s"] for x in rows)
                )
                summary["phases"][ph] = {
                    "ratio_median": round(statistics.median(ratios), 3),
                    "ratio_pooled": round(pooled, 3),  # all rounds' tokens / seconds, both sides
                    "ratio_min": round(min(ratios), 3),
                    "ratio_max": round(max(ratios), 3),
                    "ratio_geomean": round(statistics.geometric_mean(ratios), 3),
                    "time_ratio_median": round(statistics.median(x["time_ratio"] for x in rows), 3),
                    "engine_tok_s_median": round(statistics.median(x["raw_tokens"] / x["raw_s"] for x in rows)),
                    "rounds": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in rows],
                }
            if final:
                print(json.dumps(summary, indent=1))
            if a.out:
                Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")

        results: dict[str, list[dict]] = {ph: [] for ph in phases}
        for r in range(a.rounds):
            for ph in phases:
                # A-B, B-A, ...: a slow drift of the machine does not favour one side
                order = ("raw", "tts") if r % 2 == 0 else ("tts", "raw")
                got = {side: await run(ph, side) for side in order}
                raw, tts = got["raw"], got["tts"]
                row = {
                    "raw_tokens": raw["tokens"],
                    "raw_s": round(raw["seconds"], 3),
                    "tokens": tts["tokens"],
                    "prefill_tokens": tts["prefill_tokens"],
                    "cached_prefill_tokens": tts["cached_prefill_tokens"],
                    "s": round(tts["seconds"], 3),
                    "ratio": (tts["tokens"] / tts["seconds"]) / (raw["tokens"] / raw["seconds"]),
                    "time_ratio": tts["seconds"] / raw["seconds"],
                    **{k: v for k, v in tts.items() if k.startswith("health")},
                }
                results[ph].append(row)
                print(
                    f"round {r} {ph}: engine {raw['tokens']} tok in {raw['seconds']:.2f}s "
                    f"({raw['tokens'] / raw['seconds']:,.0f} tok/s) | ttscale {tts['tokens']} tok in "
                    f"{tts['seconds']:.2f}s ({tts['tokens'] / tts['seconds']:,.0f} tok/s) | "
                    f"ratio {row['ratio']:.3f} | time x{row['time_ratio']:.3f}",
                    flush=True,
                )
            write(results, final=False)
        write(results, final=True)
    finally:
        await engine.close()
        srv.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ttscale-arith")
    ap.add_argument("--dataset", default="arith500", help="a packaged set name or a JSONL path")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--phases", default="none", help="comma-separated: none, majority, majority_es, eval")
    ap.add_argument("--strategy", dest="phases", help="alias of --phases")
    ap.add_argument("--gpu-share", type=float, default=0.42, help="GPU: memory share of each side")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `ttscale serve` argument")
    ap.add_argument(
        "--no-suffix",
        dest="suffix",
        action="store_false",
        help="send the problem alone (no 'put your final answer within \\boxed{}')",
    )
    ap.add_argument("--profile", help="directory for the server's cProfile stats")
    ap.add_argument("--out", help="also write the summary JSON here")
    asyncio.run(main(ap.parse_args()))
