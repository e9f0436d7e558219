"""Budget keeping of the sampler, on the deterministic fake engine (fast, no vLLM)."""

from __future__ import annotations

import pytest

from ttscale.budget import Budget, parse_budget
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.errors import BudgetError, InvalidRequestError
from ttscale.strategies import RunContext, Sampler, get_strategy


def ctx_for(engine, budget=Budget(), n=1, **s):
    settings = SamplingSettings(**{"max_tokens": 50, "seed": 0, **s})
    return RunContext(
        pool=ModelPool([engine]), model=engine, prompt="q", settings=settings, n=n, budget=budget, request_id="t"
    )


def long_text(prompt, s):
    return "x" * 40 + f" \\boxed{{{s.seed}}}"


async def test_one_fanout_when_budget_allows():
    eng = FakeEngine(respond=long_text)
    ctx = ctx_for(eng, max_tokens=80)
    cands = await Sampler(ctx).run(ctx.settings.replicate(5))
    assert [c.settings.seed for c in cands] == [0, 1, 2, 3, 4]
    assert all(c.finish_reason == "stop" for c in cands)
    assert [c.text for c in cands] == [long_text("q", c.settings) for c in cands]
    assert ctx.usage.completion_tokens == sum(len(c.text) for c in cands)
    assert ctx.usage.of("fake").requests == 5
    assert ctx.usage.prompt_tokens == 1  # one fan-out, prompt counted once


@pytest.mark.parametrize("tokens", [1, 49, 50, 51, 120, 333])
async def test_token_budget_never_exceeded(tokens):
    eng = FakeEngine(respond=long_text)
    ctx = ctx_for(eng, Budget(tokens=tokens), ignore_eos=True)
    sampler = Sampler(ctx)
    cands = await sampler.run(ctx.settings.replicate(16))
    used = sum(c.num_tokens for c in cands)
    assert 0 < used <= tokens
    assert ctx.ledger.tokens_spent == used
    assert sampler.stop_reason in ("token_budget", "complete")


async def test_sample_budget_and_early_stop():
    eng = FakeEngine(respond=long_text)
    ctx = ctx_for(eng, Budget(samples=3))
    sampler = Sampler(ctx)
    cands = await sampler.run(ctx.settings.replicate(10))
    assert len(cands) == 3 and sampler.stop_reason == "sample_budget"

    ctx = ctx_for(eng)
    sampler = Sampler(ctx)

    def on_event(ev):
        if ev.finished:
            sampler.stop("early_stop")

    cands = await sampler.run(ctx.settings.replicate(4), on_event=on_event)
    assert sampler.stop_reason == "early_stop"
    assert eng.num_running == 0


async def test_deadline_aborts_and_keeps_partial_text():
    eng = FakeEngine(respond=long_text, tick_s=0.01)
    ctx = ctx_for(eng, Budget(deadline_ms=100))
    sampler = Sampler(ctx)
    cands = await sampler.run(ctx.settings.replicate(3))
    assert sampler.stop_reason == "deadline"
    assert all(c.aborted and 0 < c.num_tokens < 45 for c in cands)
    assert ctx.usage.aborted_tokens == ctx.usage.completion_tokens > 0
    assert eng.num_running == 0


async def test_abort_one_candidate():
    eng = FakeEngine(respond=long_text, tick_s=0.001)
    ctx = ctx_for(eng)
    sampler = Sampler(ctx)

    async def on_event(ev):
        if ev.candidate is sampler.candidates[1] and ev.candidate.num_tokens == 5:
            await sampler.abort(ev.candidate)

    cands = await sampler.run(ctx.settings.replicate(3), on_event=on_event, stream=True)
    assert cands[1].aborted and cands[1].num_tokens <= 6
    assert not cands[0].aborted and cands[0].num_tokens > 40


async def test_none_strategy_budget_errors():
    eng = FakeEngine(respond=long_text)
    none = get_strategy("none").from_request({})
    with pytest.raises(BudgetError):
        await none.run(ctx_for(eng, Budget(samples=1), n=2))
    res = await none.run(ctx_for(eng, n=2))
    assert [c.index for c in res.choices] == [0, 1] and res.info["samples_used"] == 2


def test_parse_budget():
    assert parse_budget(None) == Budget()
    assert parse_budget("auto").auto
    assert parse_budget({"samples": 4, "tokens": 100}).tokens == 100
    for bad, param in [
        ({"samples": 0}, "ttscale.budget.samples"),
        ("x", "ttscale.budget"),
        ({"deadline_ms": -1}, "ttscale.budget.deadline_ms"),
        (3, "ttscale.budget"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            parse_budget(bad)
        assert e.value.param == param


class Recording(FakeEngine):
    """Notes, per fan-out, whether its caller allowed one engine request for all of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.together: list[tuple[int, bool]] = []

    def fanout(self, prompt, settings, **kw):
        fo = super().fanout(prompt, settings, **kw)
        self.together.append((len(settings), fo.together))
        return fo


@pytest.mark.parametrize(
    ("strategy", "opts", "want"),
    [
        ("majority", {}, {True}),  # stopped only all at once: one n=k call on an upstream
        ("none", {}, {True}),
        ("deepconf", {"warmup": 2}, {True, False}),  # warm-up together; the traces it stops alone
        ("speculative_rejection", {"scorer": "confidence", "checkpoints": [10]}, {False}),
    ],
)
async def test_fanouts_say_whether_their_candidates_stop_only_together(strategy, opts, want):
    eng = Recording(respond=long_text)
    ctx = ctx_for(eng, Budget(samples=4), n=4 if strategy == "none" else 1)
    await get_strategy(strategy).from_request(opts).execute(ctx)
    assert {t for _, t in eng.together} == want, eng.together
    assert sum(k for k, _ in eng.together) == 4
