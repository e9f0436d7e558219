"""What Python's garbage collector costs the serving process while candidates with top-k
log-probs run, three ways side by side in one process.

    python bench/gc_pauses.py                         # the embedded model, CPU or GPU
    python bench/gc_pauses.py --model /models/qwen --k 128 --max-tokens 256 --rounds 5

The serving process holds every running candidate's tokens and top-20 (token, log-prob) pairs;
the process also holds ~650k objects from start-up (vLLM, torch, tokenizers). A full collection
walks every tracked object, with the event loop stopped. Modes, each a fan-out of ``--k``
streamed candidates of ``--max-tokens`` tokens (EOS ignored) with ``--top`` log-probs while the
``--hold`` fan-outs before it stay alive (requests in flight), in rotating order per round:

* ``lists, heap tracked``: each token's top-k row a list (tracked for as long as it lives), the
  start-up heap in the collector's sight (how the server ran before);
* ``tuples, heap tracked``: rows as tuples of numbers, which the collector stops tracking after
  its first pass over them;
* ``lists, heap frozen``: the start-up heap frozen (``gc.freeze()`` once the engines are up),
  rows as lists;
* ``tuples, heap frozen``: both;
* ``tuples, heap frozen, gen0 at 20k``: and the youngest generation collected every 20,000
  allocations instead of 700 (``gc.set_threshold``): what ``ModelPool.start`` sets up now.

Reports per mode the collector's pause time per 1,000 tokens (``gc.callbacks``), the longest
pause, the full (oldest-generation) collections, and the process CPU per 1,000 tokens; ratios to
the first mode per round; JSON to ``bench/results/gc-pauses-<machine>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MODES = (
    "lists, heap tracked",
    "tuples, heap tracked",
    "lists, heap frozen",
    "tuples, heap frozen",
    "tuples, heap frozen, gen0 at 20k",
)


class Pauses:
    """Collector pauses, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self.full = 0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._t0
        self.total += dt
        self.longest = max(self.longest, dt)
        self.full += info["generation"] == 2


async def main(a: argparse.Namespace) -> None:
    from machine import write_fanout_result

    import ttscale.engine.vllm_engine as ve
    from ttscale.engine import GC_YOUNG_THRESHOLD, ModelPool, SamplingSettings
    from ttscale.models import resolve_model

    eng = ve.VLLMEngine("p", resolve_model(a.model))
    await ModelPool([eng]).start()  # freezes the start-up heap, raises the youngest threshold
    frozen = gc.get_freeze_count()
    book = ve._book_logprobs
    mode = {"lists": False}

    def booking(c, new, logprobs, top_k):  # type: ignore[no-untyped-def]
        """The adapter's booking of vLLM's flat lists, with each row a list in the lists mode."""
        if not mode["lists"]:
            return book(c, new, logprobs, top_k)
        starts, ends, vals, ids = logprobs.start_indices, logprobs.end_indices, logprobs.logprobs, logprobs.token_ids
        for p in range(len(starts) - min(len(new), len(starts)), len(starts)):
            b, e = starts[p], ends[p]
            c.logprobs.append(float(vals[b]) if e > b else float("nan"))
            stop = min(e, b + 1 + top_k)
            c.top_logprobs.append(list(zip(ids[b + 1 : stop], vals[b + 1 : stop])))
        return None

    ve._book_logprobs = booking
    settings = [
        SamplingSettings(seed=100 + i, max_tokens=a.max_tokens, temperature=0.8, logprobs=a.top, ignore_eos=True)
        for i in range(a.k)
    ]
    held: list[object] = []
    threshold = (700, *gc.get_threshold()[1:])  # Python's default for the other modes

    async def one(name: str) -> dict:
        mode["lists"] = name.startswith("lists")
        if "tracked" in name:
            gc.unfreeze()
        else:
            gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD if "gen0" in name else threshold[0], *threshold[1:])
        held.clear()  # each mode builds its own in-flight set (of its kind of rows)
        gc.collect()
        tokens = 0
        p = Pauses()
        gc.callbacks.append(p)
        cpu0 = time.process_time()
        try:
            for _ in range(a.hold + 1):
                async with eng.fanout(a.prompt, settings, stream=True, text=False) as fo:
                    async for _ in fo:
                        pass
                tokens += sum(c.num_tokens for c in fo.candidates)
                held.append(fo.candidates)
        finally:
            gc.callbacks.remove(p)
        cpu = time.process_time() - cpu0
        return {"gc_s": p.total, "longest_s": p.longest, "full": p.full, "cpu_s": cpu, "tokens": tokens}

    per: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        await one(MODES[-1])  # warm-up
        for r in range(a.rounds):
            for name in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                per[name].append(await one(name))
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    finally:
        ve._book_logprobs = book
        await eng.close()

    base = per[MODES[0]]
    rows = []
    for name in MODES:
        rs = per[name]
        tokens = sum(x["tokens"] for x in rs)
        gc_ratio = [x["gc_s"] / b["gc_s"] for x, b in zip(rs, base) if b["gc_s"] > 0]
        rows.append(
            {
                "mode": name,
                "gc_ms_per_1k_tokens": 1e6 * sum(x["gc_s"] for x in rs) / tokens,
                "gc_ratio_vs_first_median": statistics.median(gc_ratio) if gc_ratio else None,
                "longest_pause_ms": 1e3 * max(x["longest_s"] for x in rs),
                "full_collections_per_round": statistics.mean(x["full"] for x in rs),
                "cpu_ms_per_1k_tokens": 1e6 * sum(x["cpu_s"] for x in rs) / tokens,
                "cpu_ratio_vs_first_median": statistics.median(
                    [x["cpu_s"] / x["tokens"] / (b["cpu_s"] / b["tokens"]) for x, b in zip(rs, base)]
                ),
                "rounds": rs,
            }
        )
    write_fanout_result(a, "gc_pauses", "gc-pauses", rows, hold=a.hold, startup_objects_frozen=frozen)
    print(f"start-up objects frozen: {frozen}")
    print("| mode | GC ms / 1k tokens | GC ratio (median) | longest pause ms | full GCs / round | CPU ms / 1k tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = r["gc_ratio_vs_first_median"]
        print(
            f"| {r['mode']} | {r['gc_ms_per_1k_tokens']:.1f} | {'-' if g is None else f'{g:.2f}'} "
            f"| {r['longest_pause_ms']:.0f} | {r['full_collections_per_round']:.1f} | {r['cpu_ms_per_1k_tokens']:.0f} |"
        )


if __name__ == "__main__":
    from machine import fanout_args

    ap = fanout_args(__doc__, k=64, max_tokens=256, rounds=3, name="gc-pauses")
    ap.add_argument("--hold", type=int, default=3, help="fan-outs kept alive before the measured one")
    asyncio.run(main(ap.parse_args()))
