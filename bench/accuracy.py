"""Accuracy and cost of the strategies on arith500, measured through the server, in one run.

    python bench/accuracy.py --suite strategies --levels 3 4 5 --per-level 40
    python bench/accuracy.py --suite rejection --per-level 20
    python bench/accuracy.py --suite adaptive --per-level 20

Suites (each method sees the same problems and seeds):
* ``strategies``: pass@1 (mean correctness of the 16 samples a majority request drew),
  majority@16, verifier best-of-16, and majority / RPC at K = 4, 8, 16.
* ``rejection``: best_of_n (N=16, the verifier) vs speculative_rejection and draft_target.
* ``adaptive``: ``budget: auto`` (majority in waves, and asynchronous) and ``deepconf`` (online,
  low and high) vs fixed majority@16.

Prints a Markdown table (accuracy with 95% bootstrap CIs over problems, paired differences
against the suite's baseline, tokens per problem, seconds per problem) and writes JSON to
``bench/results/<suite>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SUITES = {
    "strategies": [
        ("majority@16", {"strategy": "majority", "budget": {"samples": 16}}),
        ("best_of_16 (verifier)", {"strategy": "best_of_n", "budget": {"samples": 16}}),
        ("best_of_16 (logprob mean)", {"strategy": "best_of_n", "budget": {"samples": 16}, "scorer": "logprob"}),
        (
            "best_of_16 (logprob min)",
            {"strategy": "best_of_n", "budget": {"samples": 16}, "scorer": "logprob", "logprob": "min"},
        ),
        ("majority@4", {"strategy": "majority", "budget": {"samples": 4}}),
        ("majority@8", {"strategy": "majority", "budget": {"samples": 8}}),
        ("rpc@4", {"strategy": "perplexity_consistency", "budget": {"samples": 4}}),
        ("rpc@8", {"strategy": "perplexity_consistency", "budget": {"samples": 8}}),
        ("rpc@16", {"strategy": "perplexity_consistency", "budget": {"samples": 16}}),
    ],
    "rejection": [
        ("best_of_16 (verifier)", {"strategy": "best_of_n", "budget": {"samples": 16}}),
        ("speculative_rejection", {"strategy": "speculative_rejection", "budget": {"samples": 16}}),
        ("draft_target", {"strategy": "draft_target", "budget": {"samples": 16}}),
    ],
    "adaptive": [
        ("majority@16 fixed", {"strategy": "majority", "budget": {"samples": 16}, "stop_when_decided": False}),
        (
            "auto (majority waves)",
            {"strategy": "majority", "budget": "auto", "max_samples": 16, "schedule": "waves"},
        ),
        (
            "auto (majority async)",
            {"strategy": "majority", "budget": "auto", "max_samples": 16, "schedule": "async"},
        ),
        # the embedded model writes ~80 tokens: a 16-token window (DeepConf's is 2048 for long traces)
        (
            "deepconf (low, window 16)",
            {"strategy": "deepconf", "budget": {"samples": 16}, "warmup": 4, "window": 16, "keep": 0.1},
        ),
        (
            "deepconf (high, window 16)",
            {"strategy": "deepconf", "budget": {"samples": 16}, "warmup": 4, "window": 16, "keep": 0.9},
        ),
    ],
}


def problems(levels: list[int], per_level: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "eval" / "datasets" / "arith500.jsonl").read_text().splitlines()]
    out = []
    for lv in levels:
        out += [r for r in rows if r["level"] == lv][:per_level]
    return out


def seed_of(pid: str) -> int:
    return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16)


def tokens_of(tts: dict) -> int:
    """Completion tokens of every model plus what scoring models read (the budget's tokens)."""
    total = 0
    for m in tts["usage"]["models"].values():
        total += m["completion_tokens"]
        if m["completion_tokens"] == 0:  # a pure scorer
            total += m["prompt_tokens"]
    # draft_target: the spans the target scored by perplexity
    total += sum(v for k, v in (tts.get("tokens_by_model") or {}).items() if k.endswith(":scored"))
    return total


# the server's models (policy first: the default), also named in each result file
MODELS = ["ttscale-arith", "ttscale-arith-verifier", "ttscale-arith-draft"]


def model_ids(names: list[str]) -> dict[str, str]:
    """Which weights a result was measured with: the first 12 hex digits of each model's
    safetensors SHA-256."""
    import hashlib

    from ttscale.models import resolve_model

    out = {}
    for n in names:
        f = Path(resolve_model(n)) / "model.safetensors"
        out[n] = hashlib.sha256(f.read_bytes()).hexdigest()[:12] if f.is_file() else "?"
    return out


async def main(a: argparse.Namespace) -> None:
    import openai

    from conftest import start_server
    from ttscale.answers import grade
    from ttscale.eval.metrics import bootstrap_ci, paired_bootstrap_diff

    probs = problems(a.levels, a.per_level)
    methods = SUITES[a.suite]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ttscale-bench-{a.suite}.log"
    srv = start_server(MODELS, log)
    client = openai.AsyncOpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=900)
    sem = asyncio.Semaphore(a.concurrency)
    res: dict[str, dict[str, list]] = {
        m: {"correct": [], "tokens": [], "decode": [], "prefill": [], "cached": [], "seconds": [], "samples": []}
        for m, _ in methods
    }
    pass1: list[float] = []
    extra: dict[str, list] = {m: [] for m, _ in methods}

    async def one(p: dict) -> None:
        for name, tts in methods:
            body = dict(tts)
            if a.suite == "strategies" and name == "majority@16":
                body["return_samples"] = True
                body["stop_when_decided"] = False  # all 16 samples: they also give pass@1
            async with sem:
                t0 = time.perf_counter()
                r = await client.chat.completions.create(
                    model="ttscale-arith",
                    messages=[{"role": "user", "content": p["problem"]}],
                    temperature=a.temperature,
                    seed=seed_of(p["id"]),
                    max_tokens=a.max_tokens,
                    extra_body={"ttscale": body},
                )
                dt = time.perf_counter() - t0
            info = r.model_extra["ttscale"]
            res[name]["correct"].append(float(grade(info.get("answer"), p["answer"])))
            res[name]["tokens"].append(tokens_of(info))
            usage = info["usage"]  # the engine's work, every model
            res[name]["decode"].append(usage["decode_tokens"])
            res[name]["prefill"].append(usage["prefill_tokens"])
            res[name]["cached"].append(usage["cached_prefill_tokens"] or 0)
            res[name]["seconds"].append(dt)
            res[name]["samples"].append(info["samples_used"])
            keep = {k: info.get(k) for k in ("rejection_rate", "rejected", "accepted", "takeovers", "stop_reason")}
            extra[name].append(keep)
            if "samples" in info:
                pass1.append(sum(grade(s.get("answer"), p["answer"]) for s in info["samples"]) / len(info["samples"]))

    t0 = time.perf_counter()
    try:
        done = 0
        for chunk in range(0, len(probs), a.concurrency * 2):
            await asyncio.gather(*(one(p) for p in probs[chunk : chunk + a.concurrency * 2]))
            done += len(probs[chunk : chunk + a.concurrency * 2])
            print(f"{done}/{len(probs)} problems, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    finally:
        await client.close()
        srv.stop()

    base = methods[0][0]
    rows = []
    if pass1:
        m, lo, hi = bootstrap_ci(pass1)
        rows.append({"method": "pass@1", "acc": m, "lo": lo, "hi": hi})
    for name, _ in methods:
        r = res[name]
        m, lo, hi = bootstrap_ci(r["correct"])
        row = {
            "method": name,
            "acc": m,
            "lo": lo,
            "hi": hi,
            "tokens_per_problem": sum(r["tokens"]) / len(r["tokens"]),
            "decode_tokens_per_problem": sum(r["decode"]) / len(r["decode"]),
            "prefill_tokens_per_problem": sum(r["prefill"]) / len(r["prefill"]),
            "cached_prefill_tokens_per_problem": sum(r["cached"]) / len(r["cached"]),
            "seconds_per_problem": sum(r["seconds"]) / len(r["seconds"]),
            "samples_per_problem": sum(r["samples"]) / len(r["samples"]),
        }
        if name != base:
            d, dlo, dhi = paired_bootstrap_diff(r["correct"], res[base]["correct"])
            row.update(
                diff_vs_base=d,
                diff_lo=dlo,
                diff_hi=dhi,
                token_ratio=sum(r["tokens"]) / max(1, sum(res[base]["tokens"])),
                time_ratio=sum(r["seconds"]) / max(1e-9, sum(res[base]["seconds"])),
            )
        if pass1:
            d, dlo, dhi = paired_bootstrap_diff(r["correct"], pass1)
            row.update(diff_vs_pass1=d, diff_vs_pass1_lo=dlo, diff_vs_pass1_hi=dhi)
        rates = [e["rejection_rate"] for e in extra[name] if e.get("rejection_rate") is not None]
        if rates:
            row["mean_rejection_rate"] = sum(rates) / len(rates)
        rows.append(row)
    out = {
        "suite": a.suite,
        "levels": a.levels,
        "problems": len(probs),
        "temperature": a.temperature,
        "baseline": base,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
        "models": model_ids(MODELS),
    }
    dest = ROOT / "bench" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{a.suite}.json").write_text(json.dumps(out, indent=1))
    print(f"\n{a.suite}: {len(probs)} problems (levels {a.levels}), T={a.temperature}\n")
    print(
        "| method | accuracy [95% CI] | vs baseline [CI] | vs pass@1 [CI] | tokens/problem "
        "| decode / prefill (cached) per problem | s/problem | samples |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vp = (
            f"{r['diff_vs_pass1']:+.3f} [{r['diff_vs_pass1_lo']:+.3f}, {r['diff_vs_pass1_hi']:+.3f}]"
            if "diff_vs_pass1" in r
            else ""
        )
        vb = f"{r['diff_vs_base']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]" if "diff_vs_base" in r else ""
        print(
            f"| {r['method']} | {r['acc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {vb} | {vp} | "
            f"{r.get('tokens_per_problem', float('nan')):.0f} | {r.get('decode_tokens_per_problem', float('nan')):.0f}"
            f" / {r.get('prefill_tokens_per_problem', float('nan')):.0f}"
            f" ({r.get('cached_prefill_tokens_per_problem', float('nan')):.0f}) | "
            f"{r.get('seconds_per_problem', float('nan')):.2f} | "
            f"{r.get('samples_per_problem', float('nan')):.1f} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--per-level", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--concurrency", type=int, default=4)
    # a terminated bench unwinds like Ctrl-C, so the server it started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    asyncio.run(main(ap.parse_args()))
