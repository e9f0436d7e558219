"""Placement over replicas: majority@K at a fixed request rate through one ttscale in front of
several replicas of one model, with the candidates placed by ``affinity`` (all K of a request on
its replica, as one ``n=K`` request), ``affinity_apart`` (the same, one request per candidate:
what the ``n=K`` call itself is worth), ``auto``, ``spread`` (split over the replicas, one ``n=k``
request each) or ``round_robin`` (each sample to the next replica in turn), in one run (phases
interleaved; the order alternates between rounds).

    # GPU: two vLLM servers (`vllm serve`) on one GPU, 0.3 of its memory each
    python bench/replicas.py --model qwen=/models/qwen --replicas 2 --replica-share 0.3 \\
        --dataset gsm8k --k 16 --max-tokens 256 --shots 40 --max-model-len 12288 --rate 3,12 --requests 48
    # CPU smoke run: two `ttscale serve` replicas of the embedded model
    python bench/replicas.py --replica-server ttscale --requests 6 --rate 1 --k 4 --max-tokens 32

Per phase: requests answered per second (from the first arrival to the last answer), p50/p95
latency, tokens, and the replicas' prefix-cache hit rate where they report it (vLLM's
``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``). Arrivals are open-loop (Poisson,
seeded): a phase that falls behind shows it in its latency, not in a slower arrival rate; at a
rate above what the pool sustains, requests/s is its capacity. ``--shots N`` gives each request a
system prompt of N worked examples of its own (``--shot-mode per-request``, reordered for every
phase, so that a phase finds none of its prompts in a prefix cache filled by an earlier one) or
the same N for all (``shared``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def launch_replica(
    kind: str, name: str, path: str, port: int, share: float | None, log: Path, max_len: int | None
) -> subprocess.Popen:
    if kind == "vllm":
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path]
        args += ["--served-model-name", name, "--port", str(port), "--max-model-len", str(max_len or 4096)]
        if share is not None:
            args += ["--gpu-memory-utilization", str(share)]
    else:
        args = [sys.executable, "-P", "-m", "ttscale.cli", "serve", "--model", f"{name}={path}", "--port", str(port)]
        args += ["--log-level", "warning"] + (["--max-model-len", str(max_len)] if max_len else [])
        args += ["--gpu-memory-utilization", str(share)] if share is not None else []
    fh = open(log, "wb")  # noqa: SIM115 - the replica logs here while it runs
    return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} did not start in {timeout:.0f} s")


def prefix_cache(url: str) -> dict[str, float]:
    """Cumulative prefix-cache queries and hits (tokens) of a vLLM replica, {} elsewhere."""
    try:
        page = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for name in ("queries", "hits"):
        vals = re.findall(rf"^vllm:prefix_cache_{name}(?:_total)?(?:\{{[^}}]*\}})? (\S+)$", page, re.M)
        if vals:
            out[name] = sum(float(v) for v in vals)
    return out


def few_shot(pool: list[dict], shots: int, rng: random.Random | None) -> list[str]:
    """``shots`` worked examples from ``pool`` (problems the bench does not ask): drawn per
    request when ``rng`` is given (a long context of the request's own, as retrieved examples or
    a long document make it: where one prefill per request instead of one per replica pays), else
    the same first ``shots`` for every request (a shared prefix)."""
    rows = rng.sample(pool, shots) if rng is not None else pool[:shots]
    return [f"Question: {r['problem']}\nAnswer: {r.get('solution') or r['answer']}" for r in rows]


def system_prompts(examples: list[list[str]], rng: random.Random | None) -> list[str]:
    """One system prompt per request from its examples, in an order of ``rng``'s (per-request
    mode: each phase sends the same tokens in a new order, so no replica's prefix cache holds a
    phase's prompts from an earlier one and every phase does the same work)."""
    out = []
    for ex in examples:
        ex = rng.sample(ex, len(ex)) if rng is not None else ex
        out.append("Solve the problem as in these examples.\n\n" + "\n\n".join(ex) if ex else "")
    return out


async def phase(
    front: str, model: str, problems: list[dict], systems: list[str], placement: str, rate: float, a: argparse.Namespace
) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=1800)
    rng = random.Random(a.seed)
    lat: list[float] = []
    tokens = prompt_tokens = 0
    errors = 0

    async def one(i: int, p: dict) -> None:
        nonlocal tokens, prompt_tokens, errors
        t = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=model,
                messages=([{"role": "system", "content": systems[i]}] if systems[i] else [])
                + [{"role": "user", "content": p["problem"] + SUFFIX}],
                temperature=0.7,
                seed=1000 + i,
                max_tokens=a.max_tokens,
                extra_body={
                    "ttscale": {
                        "strategy": "majority",
                        "budget": {"samples": a.k},
                        "stop_when_decided": False,  # the same K samples in every phase
                        "placement": placement,
                    }
                },
            )
        except openai.APIError:
            errors += 1
            return
        lat.append(time.perf_counter() - t)
        tokens += r.usage.completion_tokens
        prompt_tokens += r.usage.prompt_tokens

    t0 = time.perf_counter()
    tasks = []
    for i, p in enumerate(problems):
        tasks.append(asyncio.create_task(one(i, p)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "placement": placement,
        "rate_req_s": rate,
        "requests": len(problems),
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 4),
        "tok_per_s": round(tokens / wall, 1),
        "tokens": tokens,
        "prompt_tokens_per_request": round(prompt_tokens / max(1, len(lat))),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
    }


async def main(a: argparse.Namespace) -> None:
    from conftest import free_port, start_server
    from ttscale.engine import parse_model_arg
    from ttscale.eval.data import load_dataset
    from ttscale.models import resolve_model

    spec = parse_model_arg(a.model)
    path = str(resolve_model(spec.source))
    rows = load_dataset(a.dataset).problems
    problems, pool = rows[: a.requests], rows[a.requests :]
    per_request = a.shot_mode == "per-request"
    shot_rng = random.Random(a.seed + 1) if per_request else None
    examples = [few_shot(pool, a.shots, shot_rng) for _ in problems]
    order_rng = random.Random(a.seed + 2) if per_request else None
    rates = [float(x) for x in str(a.rate).split(",")]
    logs = Path(tempfile.mkdtemp(prefix="ttscale-replicas-"))
    procs, urls = [], []
    front = None
    results: dict[str, list[dict]] = {}
    start_s = 0.0
    t0 = time.perf_counter()
    try:
        for i in range(a.replicas):
            port = free_port()
            log = logs / f"replica{i}.log"
            proc = launch_replica(a.replica_server, spec.name, path, port, a.replica_share, log, a.max_model_len)
            procs.append((proc, log))
            urls.append(f"http://127.0.0.1:{port}")
            if a.replica_server == "vllm" and a.replica_share is not None:
                wait_healthy(urls[-1], *procs[-1])  # one at a time: each checks the memory left
        for u, (p, log) in zip(urls, procs, strict=True):
            wait_healthy(u, p, log)
        # one front, the replicas under two names: "pol" (a replica's candidates as one n=k request)
        # and "pol-apart" (one request per candidate)
        config = logs / "front.yaml"
        cap = {"max_connections": a.max_connections}
        config.write_text(
            json.dumps(
                {
                    "models": [
                        {"name": "pol", "urls": urls, "upstream_model": spec.name, "replicas": cap},
                        {
                            "name": "pol-apart",
                            "urls": urls,
                            "upstream_model": spec.name,
                            "replicas": {"group": False, **cap},
                        },
                    ]
                }
            )
        )
        front = start_server([], logs / "front.log", "--config", str(config), "--max-concurrent-requests", "4096")
        start_s = time.perf_counter() - t0
        phases = a.phases.split(",")
        results = {ph: [] for ph in phases}
        w = min(4, len(problems))
        warm = system_prompts(examples[:w], order_rng)
        await phase(front.url, "pol", problems[:w], warm, "affinity", rates[0], a)  # warm-up
        runs = [(rate, rnd) for rate in rates for rnd in range(a.rounds)]
        for n, (rate, rnd) in enumerate(runs):
            order = phases if n % 2 == 0 else phases[::-1]
            for ph in order:
                before = [prefix_cache(u) for u in urls]
                systems = system_prompts(examples, order_rng)
                model, placement = ("pol-apart", "affinity") if ph == "affinity_apart" else ("pol", ph)
                row = await phase(front.url, model, problems, systems, placement, rate, a)
                row["phase"] = ph
                after = [prefix_cache(u) for u in urls]
                q = sum(x.get("queries", 0) - y.get("queries", 0) for x, y in zip(after, before, strict=True))
                h = sum(x.get("hits", 0) - y.get("hits", 0) for x, y in zip(after, before, strict=True))
                row["prefix_cache_hit_rate"] = round(h / q, 4) if q else None
                row["round"] = rnd
                results[ph].append(row)
                print(ph, json.dumps(row), flush=True)
                write(a, results, start_s, final=False)
    finally:
        if front is not None:
            front.stop()
        for p, _ in procs:  # each replica runs in a session of its own, with its engine processes
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    write(a, results, start_s, final=True)


def write(a: argparse.Namespace, results: dict[str, list[dict]], start_s: float, *, final: bool) -> None:
    from machine import versions

    summary: dict = {}
    for rate in sorted({r["rate_req_s"] for rows in results.values() for r in rows}):
        at = {ph: [r for r in rows if r["rate_req_s"] == rate] for ph, rows in results.items()}
        base = at.get("round_robin") or []
        per: dict = {}
        for ph, rows in at.items():
            if not rows:
                continue
            s = {
                k: statistics.median(r[k] for r in rows if r[k] is not None)
                for k in ("req_per_s", "latency_p50_s", "latency_p95_s")
            }
            if base and ph != "round_robin":
                pairs = [(r, b) for r, b in zip(rows, base, strict=False) if b["req_per_s"]]
                s["throughput_vs_round_robin"] = [round(r["req_per_s"] / b["req_per_s"], 3) for r, b in pairs]
                s["p95_vs_round_robin"] = [
                    round(r["latency_p95_s"] / b["latency_p95_s"], 3) for r, b in pairs if b["latency_p95_s"]
                ]
            per[ph] = s
        summary[f"rate {rate:g}"] = per
    out = {
        "bench": "replicas",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "machine": versions(),
        "setup": {
            "replicas": a.replicas,
            "replica_server": a.replica_server,
            "replica_share": a.replica_share,
            "k": a.k,
            "max_tokens": a.max_tokens,
            "rates_req_s": a.rate,
            "requests": a.requests,
            "dataset": a.dataset,
            "few_shot_examples": a.shots,
            "few_shot_mode": a.shot_mode,
            "max_model_len": a.max_model_len,
            "max_connections": a.max_connections,
            "start_s": round(start_s, 1),
        },
        "complete": final,
        "summary": summary,
        "phases": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ttscale-arith", help="NAME or NAME=PATH of the replicated model")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="the front's streams open at once to a replica (option replicas)",
    )
    ap.add_argument("--replica-server", choices=("vllm", "ttscale"), default="vllm")
    ap.add_argument("--replica-share", type=float, default=None, help="GPU memory share of each replica")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--shots", type=int, default=0, help="worked examples in the system prompt")
    ap.add_argument(
        "--shot-mode",
        choices=("per-request", "shared"),
        default="per-request",
        help="each request's own examples (a long prompt of its own) or the same for all",
    )
    ap.add_argument("--max-model-len", type=int, help="the replicas' context length (vllm serve: 4096)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rate", default="4", help="request arrivals per second (Poisson); several: comma-separated")
    ap.add_argument("--requests", type=int, default=64, help="requests per phase")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="affinity,affinity_apart,auto,spread,round_robin")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas.json"))
    asyncio.run(main(ap.parse_args()))
