"""Accuracy and cost of the strategies, measured through the server, in one run: on arith500
with the embedded models, or on a real set with a real model.

    python bench/accuracy.py --suite strategies --levels 3 4 5 --per-level 40
    python bench/accuracy.py --suite rejection --per-level 20
    python bench/accuracy.py --suite adaptive --per-level 20
    # a real model on a real set (GPU): each method a phase of its own, timed as a whole
    python bench/accuracy.py --suite real --model qwen=/models/qwen --dataset math500 --limit 300 \\
        --max-tokens 1024 --temperature 0.7 --concurrency 32 --schedule phased
    python bench/accuracy.py --suite votes,confidence-rejection --model qwen=/models/qwen \\
        --dataset math500,gsm8k --limit 300 --out 'out/{suite}-{dataset}-gpu.json' ...

Suites (each method sees the same problems and seeds):
* ``strategies``: pass@1 (mean correctness of the 16 samples a majority request drew),
  majority@16, verifier best-of-16, and majority / RPC at K = 4, 8, 16.
* ``rejection``: best_of_n (N=16, the verifier) vs speculative_rejection and draft_target.
* ``adaptive``: ``budget: auto`` (majority in waves, and asynchronous) and ``deepconf`` (online,
  low and high) vs fixed majority@16.
* ``real`` (no verifier needed): pass@1, majority@16, best-of-16 by log-prob and by DeepConf
  confidence, RPC@8/16, the temperature sweep, refine, budget ``auto``.
* ``votes``: ``deepconf`` (online, high and low) and budget ``auto`` (asynchronous early stop,
  at most 4 of a request's samples at once) vs fixed majority@16.
* ``confidence-rejection``: ``speculative_rejection`` scored by the policy's confidence
  (checkpoints at 0.1/0.25/0.5 and at 0.05/0.1/0.2 of max_tokens) vs best-of-16 by the same
  confidence.

``--schedule interleaved`` (the default) sends every method's request of a problem before the
next problem (time: per request, under the mixed load); ``phased`` runs each method over all
problems as a phase of its own after a pass that puts every prompt in the prefix cache, so each
method's ``phase_s`` is the engine's wall time for that method's work at the same concurrency.
``--model NAME=PATH`` (and ``--verifier``) serve a real model instead of the embedded family;
``--dataset`` / ``--limit`` pick the problems (arith500: ``--levels`` / ``--per-level``),
``--system-prompt`` / ``--prompt-template`` the prompt (default: the set's, as ``ttscale eval
run``).

One server runs every suite (comma-separated) on every set (comma-separated), in turn. Each
prints a Markdown table (accuracy with 95% bootstrap CIs over problems, paired differences
against the suite's baseline, tokens per problem, seconds per problem) and writes its JSON as soon
as it is complete, to ``bench/results/<suite>.json`` (``<suite>-<set>.json`` for a real set) or
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

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
    "real": [
        ("majority@16", {"strategy": "majority", "budget": {"samples": 16}}),
        ("best_of_16 (logprob mean)", {"strategy": "best_of_n", "budget": {"samples": 16}, "scorer": "logprob"}),
        ("best_of_16 (confidence)", {"strategy": "best_of_n", "budget": {"samples": 16}, "scorer": "confidence"}),
        ("rpc@8", {"strategy": "perplexity_consistency", "budget": {"samples": 8}}),
        ("rpc@16", {"strategy": "perplexity_consistency", "budget": {"samples": 16}}),
        ("temperature_sweep@16", {"strategy": "temperature_sweep", "budget": {"samples": 16}}),
        ("refine (self, 2 rounds)", {"strategy": "refine", "critic": "self", "max_rounds": 2}),
        ("auto (majority async)", {"strategy": "majority", "budget": "auto", "max_samples": 16, "schedule": "async"}),
    ],
    # traces of a few hundred tokens: a 256-token window and 4 warm-up traces of the 16
    "votes": [
        ("majority@16 fixed", {"strategy": "majority", "budget": {"samples": 16}, "stop_when_decided": False}),
        (
            "deepconf (high)",
            {"strategy": "deepconf", "budget": {"samples": 16}, "warmup": 4, "window": 256, "keep": 0.9},
        ),
        (
            "deepconf (low)",
            {"strategy": "deepconf", "budget": {"samples": 16}, "warmup": 4, "window": 256, "keep": 0.1},
        ),
        # a loaded server: at most 4 of a request's samples at once, the next one started as one ends
        # (all 16 at once, the no-added-latency choice, is in the `real` and `adaptive` suites)
        (
            "auto (majority async, 4 at a time)",
            {"strategy": "majority", "budget": "auto", "max_samples": 16, "schedule": "async", "concurrency": 4},
        ),
    ],
    "confidence-rejection": [
        ("best_of_16 (confidence)", {"strategy": "best_of_n", "budget": {"samples": 16}, "scorer": "confidence"}),
        (
            "speculative_rejection (confidence)",
            {"strategy": "speculative_rejection", "budget": {"samples": 16}, "scorer": "confidence"},
        ),
        # checkpoints at 0.05, 0.1, 0.2 of max_tokens instead of 0.1, 0.25, 0.5: for traces far shorter
        # than max_tokens
        (
            "speculative_rejection (confidence, early checkpoints)",
            {
                "strategy": "speculative_rejection",
                "budget": {"samples": 16},
                "scorer": "confidence",
                "checkpoints": [0.05, 0.1, 0.2],
            },
        ),
    ],
}
# the suites whose first method's samples give pass@1 (all 16 drawn, returned)
PASS1_SUITES = ("strategies", "real")


def problems(a: argparse.Namespace, dataset: str) -> list[dict]:
    from ttscale.eval.data import load_dataset

    if dataset != "arith500" or a.limit is not None:
        return load_dataset(dataset, limit=a.limit).problems
    rows = load_dataset("arith500").problems
    out = []
    for lv in a.levels:
        out += [r for r in rows if r["level"] == lv][: a.per_level]
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


@functools.cache
def model_ids(names: tuple[str, ...]) -> dict[str, str]:
    """Which weights a result was measured with: the first 12 hex digits of each model's
    safetensors SHA-256 (of its first shard). Read once a run: a real model's shard is GBs, and a
    summary written as the run's time runs out must not spend it hashing."""
    from ttscale.engine import parse_model_arg
    from ttscale.models import resolve_model

    out = {}
    for n in names:
        spec = parse_model_arg(n)
        d = Path(resolve_model(spec.source))
        f = next(iter(sorted(d.glob("*.safetensors"))), None)
        h = hashlib.sha256()
        if f is not None:
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        out[spec.name] = h.hexdigest()[:12] if f is not None else "?"
    return out


def set_tag(dataset: str) -> str:
    """A set's name in file names: ``math500``, ``owner-name`` for ``hf:owner/name``, a file's stem."""
    if dataset.startswith("hf:"):
        return dataset[3:].replace("/", "-")
    return Path(dataset).stem


def out_path(a: argparse.Namespace, suite: str, dataset: str) -> Path:
    """Where one suite's result on one set goes: ``--out`` with ``{suite}`` and ``{dataset}``
    filled in, else ``bench/results/<suite>.json`` (``<suite>-<set>.json`` for a set other than
    arith500)."""
    if a.out:
        return Path(a.out.format(suite=suite, dataset=set_tag(dataset)))
    tail = "" if dataset == "arith500" else f"-{set_tag(dataset)}"
    return ROOT / "bench" / "results" / f"{suite}{tail}.json"


async def main(a: argparse.Namespace) -> None:
    """Start one server, then run every suite on every set (each suite on all sets before the
    next suite), writing each result file as each phase completes."""
    import openai

    from conftest import start_server
    from ttscale.engine import parse_model_arg
    from ttscale.engine.vllm_engine import has_cuda

    models = [a.model, *([a.verifier] if a.verifier else [])] if a.model else MODELS
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ttscale-bench-{'+'.join(a.suites)}.log"
    share = ["--gpu-memory-utilization", str(a.gpu_share)] if a.model and has_cuda() else []
    srv = start_server(models, log, *share, *a.server_arg)
    client = openai.AsyncOpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=900)
    try:
        model_ids(tuple(models))  # hashed once, before any phase
        for suite in a.suites:
            for dataset in a.datasets:
                await run_suite(a, client, parse_model_arg(models[0]).name, models, suite, dataset)
    finally:
        await client.close()
        srv.stop()


async def run_suite(
    a: argparse.Namespace, client: openai.AsyncOpenAI, policy: str, models: list[str], suite: str, dataset: str
) -> None:
    from machine import versions

    from ttscale.eval.data import grade
    from ttscale.eval.metrics import bootstrap_ci, paired_bootstrap_diff
    from ttscale.eval.prompts import resolve_prompt, unescape

    probs = problems(a, dataset)
    # --methods: the baseline (a suite's first method) and the methods whose name it matches
    methods = [m for i, m in enumerate(SUITES[suite]) if i == 0 or not a.methods or re.search(a.methods, m[0])]
    fmt = resolve_prompt(
        dataset,
        unescape(a.prompt_template) if a.prompt_template else None,
        unescape(a.system_prompt) if a.system_prompt else None,
    )
    sem = asyncio.Semaphore(a.concurrency)
    # per method, per problem id: what its request gave (kept by problem, not by finishing order,
    # so the paired differences pair each problem with itself)
    res: dict[str, dict[str, dict]] = {m: {} for m, _ in methods}
    pass1: dict[str, float] = {}
    phase_s: dict[str, float] = {}

    async def ask(p: dict, name: str, tts: dict, max_tokens: int | None = None) -> tuple[dict, float]:
        """One request: its ``ttscale`` object and its seconds."""
        body = dict(tts)
        if suite in PASS1_SUITES and name == "majority@16":
            body["return_samples"] = True
            body["stop_when_decided"] = False  # all 16 samples: they also give pass@1
        async with sem:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=policy,
                messages=fmt.messages(p["problem"]),
                temperature=a.temperature,
                seed=seed_of(p["id"]),
                max_tokens=max_tokens or a.max_tokens,
                extra_body={"ttscale": body},
            )
            dt = time.perf_counter() - t0
        return r.model_extra["ttscale"], dt

    async def measure(p: dict, name: str, tts: dict) -> None:
        info, dt = await ask(p, name, tts)
        usage = info["usage"]  # the engine's work, every model
        res[name][p["id"]] = {
            "correct": float(grade(info.get("answer"), p["answer"])),
            "tokens": tokens_of(info),
            "decode": usage["decode_tokens"],
            "prefill": usage["prefill_tokens"],
            "cached": usage["cached_prefill_tokens"] or 0,
            "seconds": dt,
            "samples": info["samples_used"],
            "rejection_rate": info.get("rejection_rate"),
            "stop_reason": info.get("stop_reason"),
        }
        if "samples" in info:
            pass1[p["id"]] = sum(grade(s.get("answer"), p["answer"]) for s in info["samples"]) / len(info["samples"])

    async def one(p: dict) -> None:
        for name, tts in methods:
            await measure(p, name, tts)

    def summarize(complete: bool) -> tuple[list[dict], Path]:
        """The rows of the methods measured so far, written to the result file."""
        base = methods[0][0]
        ids = [p["id"] for p in probs]

        def col(name: str, key: str, among: list[str] | None = None) -> list[float]:
            return [res[name][i][key] for i in (among or ids) if i in res[name]]

        def both(x: dict, y: dict) -> list[str]:
            return [i for i in ids if i in x and i in y]

        rows = []
        if pass1:
            m, lo, hi = bootstrap_ci([pass1[i] for i in ids if i in pass1])
            rows.append({"method": "pass@1", "acc": m, "lo": lo, "hi": hi})
        for name in [n for n, _ in methods if res[n]]:
            r = {k: col(name, k) for k in ("correct", "tokens", "decode", "prefill", "cached", "seconds", "samples")}
            m, lo, hi = bootstrap_ci(r["correct"])
            row = {
                "method": name,
                "problems": len(res[name]),
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
            if name in phase_s:
                row["phase_s"] = phase_s[name]
            if name != base and res[base]:
                on = both(res[name], res[base])

                def ratio(key: str, on: list[str] = on, name: str = name) -> float:
                    return sum(col(name, key, on)) / max(1e-9, sum(col(base, key, on)))

                d, dlo, dhi = paired_bootstrap_diff(col(name, "correct", on), col(base, "correct", on))
                row.update(
                    diff_vs_base=d,
                    diff_lo=dlo,
                    diff_hi=dhi,
                    token_ratio=ratio("tokens"),
                    decode_ratio=ratio("decode"),
                    prefill_ratio=ratio("prefill"),
                    time_ratio=ratio("seconds"),
                )
                if name in phase_s and base in phase_s:
                    row["phase_time_ratio"] = phase_s[name] / max(1e-9, phase_s[base])
            if pass1:
                on = both(res[name], pass1)
                d, dlo, dhi = paired_bootstrap_diff(col(name, "correct", on), [pass1[i] for i in on])
                row.update(diff_vs_pass1=d, diff_vs_pass1_lo=dlo, diff_vs_pass1_hi=dhi)
            rates = [e["rejection_rate"] for e in res[name].values() if e["rejection_rate"] is not None]
            if rates:
                row["mean_rejection_rate"] = sum(rates) / len(rates)
            reasons = Counter(str(e["stop_reason"]) for e in res[name].values())
            row["stop_reasons"] = dict(reasons.most_common())
            rows.append(row)
        out = {
            "suite": suite,
            "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/accuracy.py " + " ".join(sys.argv[1:]),
            "dataset": dataset,
            "levels": a.levels if dataset == "arith500" and a.limit is None else None,
            "problems": len(probs),
            "prompt": fmt.to_dict(),
            "temperature": a.temperature,
            "max_tokens": a.max_tokens,
            "concurrency": a.concurrency,
            "schedule": a.schedule,
            "baseline": base,
            "rows": rows,
            "wall_s": time.perf_counter() - t0,
            "complete": complete,
            "models": model_ids(tuple(models)),
            "machine": versions(),
        }
        dest = out_path(a, suite, dataset)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=1))
        return rows, dest

    t0 = time.perf_counter()
    if a.schedule == "phased":
        # every prompt once (16 tokens) first: no phase finds a prefix cache warmed by another, and
        # the first does not pay for the engine's warm-up
        prime = {"strategy": "majority", "budget": {"samples": 16}}  # the 16-way fan-out, short
        await asyncio.gather(*(ask(p, "prime", prime, max_tokens=16) for p in probs))
        for name, tts in methods:
            t1 = time.perf_counter()
            await asyncio.gather(*(measure(p, name, tts) for p in probs))
            phase_s[name] = time.perf_counter() - t1
            print(f"{name}: {len(probs)} problems in {phase_s[name]:.1f}s", file=sys.stderr, flush=True)
            summarize(False)  # a run cut short keeps its finished phases
    else:
        done = 0
        for chunk in range(0, len(probs), a.concurrency * 2):
            await asyncio.gather(*(one(p) for p in probs[chunk : chunk + a.concurrency * 2]))
            done += len(probs[chunk : chunk + a.concurrency * 2])
            print(f"{done}/{len(probs)} problems, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    rows, dest = summarize(True)
    print(f"\n{suite}: {len(probs)} problems of {dataset}, T={a.temperature} ({dest})\n")
    print(
        "| method | accuracy [95% CI] | vs baseline [CI] | vs pass@1 [CI] | tokens/problem "
        "| decode / prefill (cached) per problem | s/problem | phase s | samples |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
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
            f"{r.get('phase_s', float('nan')):.1f} | "
            f"{r.get('samples_per_problem', float('nan')):.1f} |"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, help=f"one or more of {', '.join(SUITES)}, comma-separated")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--per-level", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--model", help="NAME=PATH of a real policy model (default: the embedded family)")
    ap.add_argument("--verifier", help="NAME=PATH of a scoring model beside --model")
    ap.add_argument(
        "--dataset", default="arith500", help="a packaged set, a JSONL file or hf:OWNER/NAME; several comma-separated"
    )
    ap.add_argument("--limit", type=int, help="the first N problems (arith500: --levels / --per-level)")
    ap.add_argument("--system-prompt", help="system prompt (\\n: a line break)")
    ap.add_argument("--prompt-template", help="a preset (boxed, plain) or a template holding {problem}")
    ap.add_argument(
        "--methods", help="a regular expression: run only the methods whose name it matches (and each suite's baseline)"
    )
    ap.add_argument("--schedule", choices=("interleaved", "phased"), default="interleaved")
    ap.add_argument("--gpu-share", type=float, default=0.85, help="GPU memory share of the served model")
    ap.add_argument(
        "--out", help="result JSON; {suite} and {dataset} are filled in (default: bench/results/<suite>[-<set>].json)"
    )
    ap.add_argument("--server-arg", action="append", default=[], help="extra `ttscale serve` argument")
    # a terminated bench unwinds like Ctrl-C, so the server it started is stopped too
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = ap.parse_args()
    args.suites = args.suite.split(",")
    args.datasets = args.dataset.split(",")
    if unknown := [x for x in args.suites if x not in SUITES]:
        ap.error(f"--suite: unknown {', '.join(unknown)} (known: {', '.join(SUITES)})")
    if args.out and len(args.suites) * len(args.datasets) > 1 and "{" not in args.out:
        ap.error("--out: several suites or sets need {suite} / {dataset} in the path")
    asyncio.run(main(args))
