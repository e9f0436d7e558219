"""Placement over replicas: majority@K at a fixed request rate through one ttscale in front of
several replicas of one model, with the candidates placed by ``affinity`` (all K of a request on
its replica), ``spread`` (split over the replicas) or ``round_robin`` (dealt out in turn), in
one run (phases interleaved; the order alternates between rounds).

    # GPU: two vLLM servers (`vllm serve`) on one GPU, 0.3 of its memory each
    python bench/replicas.py --model qwen=/models/qwen --replicas 2 --replica-share 0.3 \\
        --dataset gsm8k --k 16 --max-tokens 256 --rate 4 --requests 64
    # CPU smoke run: two `ttscale serve` replicas of the embedded model
    python bench/replicas.py --replica-server ttscale --requests 6 --rate 1 --k 4 --max-tokens 32

Per phase: requests answered per second (from the first arrival to the last answer), p50/p95
latency, tokens, and the replicas' prefix-cache hit rate where they report it (vLLM's
``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``). Arrivals are open-loop (Poisson,
seeded): a phase that falls behind shows it in its latency, not in a slower arrival rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def launch_replica(kind: str, name: str, path: str, port: int, share: float | None, log: Path) -> subprocess.Popen:
    if kind == "vllm":
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path]
        args += ["--served-model-name", name, "--port", str(port), "--max-model-len", "4096"]
        if share is not None:
            args += ["--gpu-memory-utilization", str(share)]
    else:
        args = [sys.executable, "-P", "-m", "ttscale.cli", "serve", "--model", f"{name}={path}", "--port", str(port)]
        args += ["--log-level", "warning"] + (["--gpu-memory-utilization", str(share)] if share is not None else [])
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


def few_shot(dataset: str, shots: int) -> str:
    """A system prompt of ``shots`` worked examples (the last problems of the set, which the
    bench does not ask): long prompts, where one prefill per request instead of several pays."""
    if not shots:
        return ""
    rows = [json.loads(line) for line in (ROOT / "eval" / "datasets" / f"{dataset}.jsonl").read_text().splitlines()]
    ex = [f"Question: {r['problem']}\nAnswer: {r.get('solution') or r['answer']}" for r in rows[-shots:]]
    return "Solve the problem as in these examples.\n\n" + "\n\n".join(ex)


async def phase(front: str, model: str, problems: list[dict], placement: str, a: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=1800)
    rng = random.Random(a.seed)
    lat: list[float] = []
    tokens = 0
    errors = 0

    async def one(i: int, p: dict) -> None:
        nonlocal tokens, errors
        t = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model=model,
                messages=([{"role": "system", "content": a.system}] if a.system else [])
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

    t0 = time.perf_counter()
    tasks = []
    for i, p in enumerate(problems):
        tasks.append(asyncio.create_task(one(i, p)))
        await asyncio.sleep(rng.expovariate(a.rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(problems),
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 4),
        "tok_per_s": round(tokens / wall, 1),
        "tokens": tokens,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
    }


def versions() -> dict:
    out: dict = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
        import vllm

        out.update(vllm=vllm.__version__, torch=torch.__version__)
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # versions are informative only
        pass
    return out


async def main(a: argparse.Namespace) -> None:
    from conftest import free_port, start_server
    from ttscale.engine import parse_model_arg
    from ttscale.eval.data import load_dataset
    from ttscale.models import resolve_model

    spec = parse_model_arg(a.model)
    path = str(resolve_model(spec.source))
    problems = load_dataset(a.dataset, limit=a.requests).problems
    a.system = few_shot(a.dataset, a.shots)
    logs = Path(tempfile.mkdtemp(prefix="ttscale-replicas-"))
    procs, urls = [], []
    t0 = time.perf_counter()
    for i in range(a.replicas):
        port = free_port()
        log = logs / f"replica{i}.log"
        procs.append((launch_replica(a.replica_server, spec.name, path, port, a.replica_share, log), log))
        urls.append(f"http://127.0.0.1:{port}")
        if a.replica_server == "vllm" and a.replica_share is not None:
            wait_healthy(urls[-1], *procs[-1])  # one at a time: each checks the memory left
    for u, (p, log) in zip(urls, procs, strict=True):
        wait_healthy(u, p, log)
    front = start_server([f"pol={','.join(urls)}@{spec.name}"], logs / "front.log", "--max-concurrent-requests", "4096")
    start_s = time.perf_counter() - t0
    phases = a.phases.split(",")
    results: dict[str, list[dict]] = {ph: [] for ph in phases}
    try:
        await phase(front.url, "pol", problems[: min(4, len(problems))], "affinity", a)  # warm-up
        for rnd in range(a.rounds):
            order = phases if rnd % 2 == 0 else phases[::-1]
            for ph in order:
                before = [prefix_cache(u) for u in urls]
                row = await phase(front.url, "pol", problems, ph, a)
                after = [prefix_cache(u) for u in urls]
                q = sum(x.get("queries", 0) - y.get("queries", 0) for x, y in zip(after, before, strict=True))
                h = sum(x.get("hits", 0) - y.get("hits", 0) for x, y in zip(after, before, strict=True))
                row["prefix_cache_hit_rate"] = round(h / q, 4) if q else None
                row["round"] = rnd
                results[ph].append(row)
                print(ph, json.dumps(row), flush=True)
                write(a, results, start_s, final=False)
    finally:
        front.stop()
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    write(a, results, start_s, final=True)


def write(a: argparse.Namespace, results: dict[str, list[dict]], start_s: float, *, final: bool) -> None:
    summary: dict = {}
    base = results.get("round_robin") or []
    for ph, rows in results.items():
        if not rows:
            continue
        s = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in ("req_per_s", "latency_p95_s")}
        if base and ph != "round_robin":
            pairs = [(r, b) for r, b in zip(rows, base, strict=False) if b["req_per_s"]]
            s["throughput_vs_round_robin"] = [round(r["req_per_s"] / b["req_per_s"], 3) for r, b in pairs]
        summary[ph] = s
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
            "rate_req_s": a.rate,
            "requests": a.requests,
            "dataset": a.dataset,
            "few_shot_examples": a.shots,
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
    ap.add_argument("--replica-server", choices=("vllm", "ttscale"), default="vllm")
    ap.add_argument("--replica-share", type=float, default=None, help="GPU memory share of each replica")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--shots", type=int, default=0, help="worked examples in a shared system prompt")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rate", type=float, default=4.0, help="request arrivals per second (Poisson)")
    ap.add_argument("--requests", type=int, default=64, help="requests per phase")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="affinity,spread,round_robin")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas.json"))
    asyncio.run(main(ap.parse_args()))
