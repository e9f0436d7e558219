"""Every strategy ends by its request's deadline and answers with what exists then
(``stop_reason: deadline``), whether the deadline falls while it samples or while it scores.

On the fake engine, work is made to last far longer than the bound these tests wait: a policy
whose candidates run ~40 s unless aborted, a verifier whose reads never end unless cancelled.
So a strategy that returns at all has honoured the deadline; none of these tests times anything.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ttscale.budget import Budget
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.run import RunContext, StopReason
from ttscale.strategies import get_strategy, registered

WAIT_S = 20.0  # every run here would take minutes without the deadline
Q = [{"role": "user", "content": "q"}]

OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "majority": {},
    "weighted_majority": {"verifier": "v"},
    "best_of_n": {"scorer": "verifier", "verifier": "v"},
    "perplexity_consistency": {},
    "temperature_sweep": {"temperatures": [0.5, 1.0], "round_size": 2, "min_per_temperature": 2},
    "refine": {"max_rounds": 2, "critic": "verifier", "verifier": "v"},
    "speculative_rejection": {"checkpoints": [8, 16], "verifier": "v"},
    "draft_target": {"draft": "d", "verifier": "v", "chunk_tokens": 8},
    "auto": {"wave": 2},
    "deepconf": {"warmup": 2, "window": 16},
}
# the strategies that read a scoring model (cut there when sampling is quick); `auto` reads
# one only where a budget profile says so, through the same scorer as best_of_n
SCORING = ["weighted_majority", "best_of_n", "refine", "speculative_rejection", "draft_target"]


class HangingVerifier(FakeEngine):
    """A scoring model whose reads end only when cancelled."""

    def __init__(self) -> None:
        super().__init__("v", role="score")
        self.reads = self.cancelled = 0

    async def score(self, prompts, *, request_id=None):  # type: ignore[override]
        self.reads += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return []  # pragma: no cover - never reached


def test_every_strategy_is_covered():
    assert set(OPTIONS) == set(registered())


def _pool(policy_text: str, tick_s: float, verifier: FakeEngine) -> tuple[ModelPool, FakeEngine, FakeEngine]:
    def respond(prompt: str, s: SamplingSettings) -> str:  # continues what the prompt already has of it
        written = prompt.removeprefix("user: q\n")
        return policy_text[len(written) :] if policy_text.startswith(written) else policy_text

    policy = FakeEngine("p", respond=respond, tick_s=tick_s, max_model_len=8192)
    draft = FakeEngine("d", respond=respond, tick_s=tick_s, max_model_len=8192)
    return ModelPool([policy, draft, verifier]), policy, draft


def _ctx(pool: ModelPool, deadline_ms: int, max_tokens: int) -> RunContext:
    return RunContext(
        pool=pool,
        model=pool.get("p"),
        prompt=Q,
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=max_tokens, seed=0, temperature=0.8),
        budget=Budget(samples=4, deadline_ms=deadline_ms),
    )


async def _run(name: str, ctx: RunContext):
    strategy = get_strategy(name).from_request(dict(OPTIONS[name]))
    return await asyncio.wait_for(strategy.execute(ctx), WAIT_S)


@pytest.mark.parametrize("name", sorted(OPTIONS))
async def test_a_deadline_while_sampling_ends_the_run_with_what_exists(name):
    verifier = FakeEngine("v", role="score")
    # 4000 tokens at 10 ms a step: 40 s per candidate unless the deadline aborts it
    pool, policy, draft = _pool("x" * 4000 + " \\boxed{1}", 0.01, verifier)
    ctx = _ctx(pool, deadline_ms=300, max_tokens=4050)
    result = await _run(name, ctx)
    assert result.stop_reason == StopReason.DEADLINE, result.details
    assert policy.num_running == 0 and draft.num_running == 0  # every engine request ended
    assert result.choices and all(c.text for c in result.choices)  # the partial text is the answer
    written = sum(c.num_tokens for c in result.candidates)
    assert 0 < written < 4000 * len(result.candidates)
    # every token written is counted (aborted ones included)
    assert sum(m.completion_tokens for m in ctx.usage.models.values()) >= written


@pytest.fixture
def deadline_at_scoring(monkeypatch):
    """The request's deadline falls 0.2 s after the verifier is first asked to score, whatever
    sampling took (no wall-clock race between sampling and the deadline in these tests)."""
    from ttscale.scorers import VerifierScorer

    at: list[float] = []
    real_inputs = VerifierScorer.inputs

    async def inputs(self, ctx, texts):
        if not at:
            at.append(time.monotonic() + 0.2)
        return await real_inputs(self, ctx, texts)

    monkeypatch.setattr(VerifierScorer, "inputs", inputs)
    monkeypatch.setattr(RunContext, "time_left", lambda self: at[0] - time.monotonic() if at else None)
    return at


@pytest.mark.parametrize("name", SCORING)
async def test_a_deadline_while_scoring_cancels_the_reads_and_answers(name, deadline_at_scoring):
    verifier = HangingVerifier()
    pool, policy, _ = _pool("short \\boxed{2}", 0.0, verifier)
    ctx = _ctx(pool, deadline_ms=3_600_000, max_tokens=64)  # the fixture sets the real one
    result = await _run(name, ctx)
    assert deadline_at_scoring, "the verifier was asked to score"
    assert result.stop_reason == StopReason.DEADLINE, result.details
    assert verifier.reads > 0 and verifier.cancelled == verifier.reads  # no read left running
    assert policy.num_running == 0
    assert result.choices and result.choices[0].text.endswith("\\boxed{2}")
    assert ctx.usage.models["v"].requests >= 1  # the cut reads are counted


async def test_without_a_deadline_scoring_is_complete():
    pool, _, _ = _pool("short \\boxed{2}", 0.0, FakeEngine("v", role="score"))
    ctx = _ctx(pool, deadline_ms=3_600_000, max_tokens=64)
    result = await _run("best_of_n", ctx)
    assert result.stop_reason == StopReason.COMPLETE
    assert result.scores is not None and all(s is not None and s > float("-inf") for s in result.scores)
