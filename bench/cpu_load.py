"""Engines on a loaded CPU host: how long the embedded family's engine steps take while other
processes keep every core busy, under two OpenMP thread policies, in one run.

    python bench/cpu_load.py [--hogs 2] [--requests 24] [--max-tokens 96]

For each policy the script starts `ttscale serve` (policy, verifier, draft: three vLLM CPU
engines), starts ``--hogs`` busy-looping processes, and streams ``--requests`` chat completions
(4 at a time, ``ignore_eos``) while timing the gap between consecutive tokens of each stream: the
largest gaps are the engine's worst steps under load (a scheduling stall shows up there). The
policies:
* ``default``: what vLLM's CPU build does with ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (ttscale's
  setting): each engine's OpenMP pool as wide as the machine, threads spin while waiting;
* ``shared``: what ttscale now sets when several CPU engines share the cores (``OMP_NUM_THREADS``
  = cores / engines, at least 1; ``OMP_WAIT_POLICY=PASSIVE``).
Writes ``bench/results/cpu_load.json`` (machine, versions, gap percentiles, tokens/s per policy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

POLICIES = {
    "default": {"TTSCALE_CPU_THREADS": "off"},  # ttscale leaves OpenMP alone
    "shared": {},  # ttscale's own setting for engines sharing the cores
}


def hog(stop: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


async def measure(url: str, model: str, n: int, max_tokens: int) -> dict:
    import httpx

    gaps: list[float] = []
    tokens = 0
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> None:
        nonlocal tokens
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"What is {17 + i} + {25 + 2 * i}?"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "seed": i,
        }
        async with sem, httpx.AsyncClient(timeout=600) as h:
            last = None
            async with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    tokens += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    gaps.sort()

    def pct(q: float) -> float:
        return round(gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000, 1)

    return {
        "chunks": tokens,
        "chunks_per_s": round(tokens / wall, 1),
        "gap_ms_p50": pct(0.5),
        "gap_ms_p99": pct(0.99),
        "gap_ms_max": round(gaps[-1] * 1000, 1),
        "mean_gap_ms": round(statistics.fmean(gaps) * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=96)
    a = ap.parse_args()

    from conftest import start_server

    out: dict = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "versions": _versions(),
        "hogs": a.hogs,
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "policies": {},
    }
    for name, env in POLICIES.items():
        log = Path(tempfile.mkdtemp()) / f"server-{name}.log"
        srv = start_server([], log, env=env)  # the embedded family: three engines
        stop = mp.Event()
        hogs = [mp.Process(target=hog, args=(stop,), daemon=True) for _ in range(a.hogs)]
        try:
            asyncio.run(measure(srv.url, "ttscale-arith", 4, 16))  # warm-up, unloaded
            for p in hogs:
                p.start()
            time.sleep(1.0)
            out["policies"][name] = {
                "env": env,
                **asyncio.run(measure(srv.url, "ttscale-arith", a.requests, a.max_tokens)),
            }
        finally:
            stop.set()
            for p in hogs:
                p.join(timeout=5)
            srv.stop()
        print(name, out["policies"][name], flush=True)
    d, s = out["policies"]["default"], out["policies"]["shared"]
    out["ratios_shared_over_default"] = {
        k: round(s[k] / d[k], 3) for k in ("chunks_per_s", "gap_ms_p50", "gap_ms_p99", "gap_ms_max") if d[k]
    }
    dest = ROOT / "bench" / "results" / "cpu_load.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["ratios_shared_over_default"]))


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("vllm-cpu", "torch", "ttscale") if _has(p)} | {
        "python": platform.python_version()
    }


def _has(p: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
