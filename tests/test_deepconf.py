"""DeepConf online on the fake engine: the threshold from the warm-up's lowest group
confidences, low-confidence traces aborted in the engine once their window is full, the
confidence-weighted vote over the traces that pass, the consensus stop.

The fake engine gives each position the top-k log-probs ``lp, lp-1, ..., lp-(k-1)``, so the
token confidence ``C = -mean(top-20) = 9.5 - lp``: a trace's confidence is set by its ``lp``.
"""

from __future__ import annotations

import numpy as np
import pytest

from ttscale.budget import Budget
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.run import RunContext, StopReason
from ttscale.strategies import get_strategy
from ttscale.strategies.deepconf import _Watch, lowest_group

Q = [{"role": "user", "content": "q"}]
HIGH, MID, LOW = -5.0, -2.0, 0.0  # lp of confident, middling and unsure traces
C = {HIGH: 14.5, MID: 11.5, LOW: 9.5}  # their token confidence


def engine(plan: dict[int, tuple[float, str, int]], tick_s: float = 0.001) -> FakeEngine:
    """Trace of seed s: plan[s] = (lp, answer, length of its working)."""

    def respond(prompt, s):
        lp, answer, n = plan[s.seed]
        return ("H" if lp == HIGH else "M" if lp == MID else "L") + "w" * n + f" \\boxed{{{answer}}}"

    def logprob(prompt, text, pos):
        return {"H": HIGH, "M": MID, "L": LOW}[text[0]]

    return FakeEngine("p", respond=respond, logprob=logprob, tick_s=tick_s)


def ctx(eng: FakeEngine, samples: int) -> RunContext:
    return RunContext(
        pool=ModelPool([eng]),
        model=eng,
        prompt=Q,
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=400, seed=0, temperature=0.8),
        budget=Budget(samples=samples),
    )


async def run(c: RunContext, **opts):
    return await get_strategy("deepconf").from_request(opts).execute(c)


def test_the_watch_stops_only_on_a_full_window_below_the_threshold():
    from ttscale.engine import Candidate

    c = Candidate(0, SamplingSettings())
    c.top_logprobs = []
    w = _Watch(window=4, k=20)
    for lp in [HIGH, HIGH, LOW, LOW]:  # window mean (14.5+14.5+9.5+9.5)/4 = 12.0
        c.top_logprobs.append([(1, lp - j) for j in range(20)])
    assert not w.low(c, threshold=11.9)
    assert _Watch(window=4, k=20).low(c, threshold=12.1)
    assert not w.low(c, threshold=12.1)  # a watch reads each token once: nothing new here
    c.top_logprobs.append([(1, LOW - j) for j in range(20)])  # window now H L L L: 10.75
    assert w.low(c, threshold=11.0)
    w2 = _Watch(window=8, k=20)
    assert not w2.low(c, threshold=100.0)  # 4 tokens: the window is not full yet


def test_lowest_group_confidence_of_a_trace():
    eng = engine({})
    from ttscale.engine import Candidate

    c = Candidate(0, SamplingSettings())
    c.top_logprobs = [[(1, lp - j) for j in range(20)] for lp in [HIGH] * 6 + [LOW] * 2 + [HIGH] * 6]
    assert lowest_group(c, window=4, k=20) == pytest.approx((2 * C[HIGH] + 2 * C[LOW]) / 4)
    assert lowest_group(c, window=100, k=20) == pytest.approx((12 * C[HIGH] + 2 * C[LOW]) / 14)  # shorter: all
    assert eng is not None


async def test_threshold_abort_and_weighted_vote():
    plan = {
        0: (HIGH, "1", 30),  # warm-up: two confident, two middling
        1: (HIGH, "1", 30),
        2: (MID, "2", 30),
        3: (MID, "2", 30),
        4: (HIGH, "1", 30),  # final: two confident, three unsure
        5: (HIGH, "1", 30),
        6: (LOW, "3", 200),
        7: (LOW, "3", 200),
        8: (LOW, "3", 200),
    }
    eng = engine(plan)
    r = await run(ctx(eng, 9), warmup=4, keep=0.5, window=4, consensus=1.0)
    d = r.details
    # s = the 50th percentile of the warm-up's lowest group confidences
    assert d["threshold"] == pytest.approx(float(np.percentile([C[HIGH]] * 2 + [C[MID]] * 2, 50)))
    assert d["warmup"] == 4 and r.samples_used == 9
    assert d["stopped_low_confidence"] == 3
    unsure = r.candidates[6:]
    assert all(c.aborted and c.num_tokens < 40 for c in unsure)  # stopped soon after the window filled
    assert d["tokens_of_stopped"] == sum(c.num_tokens for c in unsure)
    assert d["voters"] == 4  # warm-up 0, 1 (above s) and final 4, 5
    assert r.answer == "1" and r.stop_reason == StopReason.COMPLETE
    assert d["confidences"][2] == pytest.approx(C[MID]) and d["confidences"][0] == pytest.approx(C[HIGH])


async def test_middling_warmup_traces_do_not_vote():
    # the warm-up's middling traces hold the majority but fall below s: the confident answer wins
    plan = {
        0: (MID, "2", 20),
        1: (MID, "2", 20),
        2: (MID, "2", 20),
        3: (HIGH, "1", 20),
    }
    r = await run(ctx(engine(plan), 4), warmup=4, keep=0.1, window=4, consensus=1.0)
    assert r.details["voters"] == 1 and r.answer == "1"


async def test_a_unanimous_warmup_needs_no_final_phase():
    plan = {s: (HIGH, "7", 10) for s in range(16)}
    eng = engine(plan)
    r = await run(ctx(eng, 16), warmup=3, window=4)
    assert r.samples_used == 3 and r.stop_reason == StopReason.EARLY_STOP
    assert r.answer == "7" and r.details["consensus"] == 1.0
    assert eng.requests_started == 3


async def test_one_voter_is_no_consensus():
    # DeepConf-low over 4 warm-up traces keeps one: the final phase runs, and stops at its first voter
    plan = {s: (MID if s in (1, 2, 3) else HIGH, "7", 10 + 5 * s) for s in range(12)}
    r = await run(ctx(engine(plan), 12), warmup=4, keep=0.1, window=4)
    assert r.samples_used == 12 and r.answer == "7" and r.stop_reason == StopReason.EARLY_STOP
    assert r.details["consensus_at_voters"] == 2  # warm-up's seed 0, then the first final trace


async def test_consensus_in_the_final_phase_aborts_the_rest():
    # warm-up split 1:1, then every final trace says "1"; trace s works s*3 tokens, so they finish
    # in seed order: with equal weights, β = (1+m)/(2+m) reaches 0.95 at m = 18 final voters
    plan = {0: (HIGH, "1", 5), 1: (HIGH, "2", 5), **{s: (HIGH, "1", 3 * s) for s in range(2, 40)}}
    eng = engine(plan)
    r = await run(ctx(eng, 40), warmup=2, keep=0.9, window=4, consensus=0.95)
    assert r.stop_reason == StopReason.EARLY_STOP and r.answer == "1"
    assert r.details["consensus_at_voters"] == 20 and r.details["consensus"] >= 0.95
    aborted = [c for c in r.candidates if c.aborted]
    assert aborted and r.details["stopped_low_confidence"] == 0
    assert eng.num_running == 0
    # the abort came as soon as the rule fired: the later (longer) traces never finished
    assert min(c.settings.seed for c in aborted) >= 20
