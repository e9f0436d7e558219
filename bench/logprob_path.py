"""What the server process spends per token on top-k log-probs, the way the in-process vLLM
adapter reads them now and the way vLLM's defaults would, side by side in one process.

    python bench/logprob_path.py                      # the embedded model, CPU or GPU
    python bench/logprob_path.py --model /models/qwen --k 64 --max-tokens 256 --rounds 5

DeepConf and confidence-scored speculative rejection watch every token's top-20 log-probs while
the candidates run. With vLLM's defaults each token costs the serving process a dict of 21
``Logprob`` objects and the detokenization of all 21 tokens; at GPU speed that Python work
bounds the tokens/s (measured on an H200: deepconf's phase took 3.1x the time of majority@16 for
0.79x the tokens, server and engine processes at 100% CPU, GPU at 40-50%). Modes, each a
fan-out of ``--k`` streamed candidates of ``--max-tokens`` tokens (EOS ignored) with
``--top`` log-probs, in rotating order per round:

* ``classic``: a dict of ``Logprob`` per position, text streamed (vLLM's defaults);
* ``flat``: vLLM's flat log-prob lists (``flat_logprobs``), text streamed;
* ``flat, no text``: flat lists and no detokenization while running (what deepconf and
  confidence-scored rejection use now: the text is decoded once at the end).

Reports this process's CPU seconds per 1,000 tokens (the engine core is a process of its own and
not counted) and wall tokens/s, each mode's ratio to ``classic``; JSON to
``bench/results/logprob-path-<machine>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MODES = ("classic", "flat", "flat, no text")


async def main(a: argparse.Namespace) -> None:
    from machine import write_fanout_result

    import ttscale.engine.vllm_engine as ve
    from ttscale.engine import SamplingSettings
    from ttscale.models import resolve_model

    eng = ve.VLLMEngine("p", resolve_model(a.model))
    await eng.start()
    orig = ve._to_params
    mode = {"flat": True}

    def params(*args, **kw):  # type: ignore[no-untyped-def]
        p = orig(*args, **kw)
        p.flat_logprobs = mode["flat"]
        return p

    ve._to_params = params
    settings = [
        SamplingSettings(seed=100 + i, max_tokens=a.max_tokens, temperature=0.8, logprobs=a.top, ignore_eos=True)
        for i in range(a.k)
    ]

    async def one(name: str) -> tuple[float, float, int]:
        mode["flat"] = name != "classic"
        text = name != "flat, no text"
        cpu0, t0 = time.process_time(), time.perf_counter()
        async with eng.fanout(a.prompt, settings, stream=True, text=text) as fo:
            async for _ in fo:
                pass
        tokens = sum(c.num_tokens for c in fo.candidates)
        return time.process_time() - cpu0, time.perf_counter() - t0, tokens

    per: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        await one("flat")  # warm-up: compile, caches
        for r in range(a.rounds):
            order = MODES[r % 3 :] + MODES[: r % 3]
            for name in order:
                cpu, wall, tokens = await one(name)
                per[name].append({"cpu_s": cpu, "wall_s": wall, "tokens": tokens})
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    finally:
        ve._to_params = orig
        await eng.close()

    def cpu_per_1k(rows: list[dict]) -> float:
        return 1000.0 * sum(x["cpu_s"] for x in rows) / sum(x["tokens"] for x in rows)

    base = per["classic"]
    out_rows = []
    for name in MODES:
        rows = per[name]
        ratios = [x["cpu_s"] / x["tokens"] / (b["cpu_s"] / b["tokens"]) for x, b in zip(rows, base)]
        out_rows.append(
            {
                "mode": name,
                "cpu_ms_per_1k_tokens": 1000.0 * cpu_per_1k(rows),
                "tokens_per_s": sum(x["tokens"] for x in rows) / sum(x["wall_s"] for x in rows),
                "cpu_ratio_vs_classic_median": statistics.median(ratios),
                "cpu_ratio_vs_classic_range": [min(ratios), max(ratios)],
                "rounds": rows,
            }
        )
    write_fanout_result(a, "logprob_path", "logprob-path", out_rows)
    print("| mode | server CPU ms / 1k tokens | ratio to classic, median (range) | tokens/s |")
    print("|---|---|---|---|")
    for r in out_rows:
        lo, hi = r["cpu_ratio_vs_classic_range"]
        print(
            f"| {r['mode']} | {r['cpu_ms_per_1k_tokens']:.0f} | {r['cpu_ratio_vs_classic_median']:.2f} "
            f"({lo:.2f}-{hi:.2f}) | {r['tokens_per_s']:.0f} |"
        )


if __name__ == "__main__":
    from machine import fanout_args

    asyncio.run(main(fanout_args(__doc__, k=32, max_tokens=64, rounds=5, name="logprob-path").parse_args()))
