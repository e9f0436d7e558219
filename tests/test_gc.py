"""What the serving process holds per running candidate stays out of the garbage collector's
walks: the start-up heap is frozen once the engines are up, the youngest generation is collected
less often, and top-k log-prob rows are tuples
of numbers, which the collector stops tracking after its first passes over them (bench/gc_pauses.py measures the
pauses both save)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys

from ttscale.engine import GC_YOUNG_THRESHOLD, SamplingSettings
from ttscale.engine.fake import FakeEngine


def test_pool_start_freezes_the_startup_heap_once() -> None:
    code = """
import asyncio, gc
from ttscale.engine import ModelPool
from ttscale.engine.fake import FakeEngine
before = gc.get_freeze_count(), gc.get_threshold()[0]
asyncio.run(ModelPool([FakeEngine("p")]).start())
first = gc.get_freeze_count(), gc.get_threshold()[0]
junk = [[i] for i in range(5000)]
asyncio.run(ModelPool([FakeEngine("q")]).start())
print(*before, *first, gc.get_freeze_count())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    frozen0, young0, frozen1, young1, frozen2 = map(int, out.stdout.split())
    assert frozen0 == 0 and 0 < young0 < GC_YOUNG_THRESHOLD  # Python's defaults (700 up to 3.13)
    assert frozen1 > 10_000  # the imported modules, classes and functions
    assert young1 == GC_YOUNG_THRESHOLD
    assert frozen2 == frozen1  # later pools (tests, a restarted engine) freeze nothing more


def test_logprob_rows_leave_the_collectors_tracking() -> None:
    async def draw() -> list:
        eng = FakeEngine("p", tick_s=0.0)
        await eng.start()
        settings = [SamplingSettings(seed=i, max_tokens=12, logprobs=5) for i in range(4)]
        async with eng.fanout("What is 2 + 3?", settings, stream=True) as fo:
            async for _ in fo:
                pass
        await eng.close()
        return fo.candidates

    cands = asyncio.run(draw())
    rows = [row for c in cands for row in c.top_logprobs or []]
    assert len(rows) > 8 and all(len(r) == 5 for r in rows)
    gc.collect()  # the (token, log-prob) pairs leave the tracking ...
    gc.collect()  # ... then the rows holding only them
    assert not any(gc.is_tracked(r) for r in rows)
    assert all(isinstance(t, int) and isinstance(v, float) for r in rows for t, v in r)
