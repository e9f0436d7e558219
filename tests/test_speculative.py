"""Online conformal rejection and the two rejection strategies on the fake engine."""

from __future__ import annotations

import random

import pytest

from ttscale.budget import Budget
from ttscale.conformal import OnlineConformal
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.strategies import RunContext, get_strategy

Q = [{"role": "user", "content": "q"}]


def test_p_value_vectors():
    t = OnlineConformal(alpha=0.25, smoothed=False)
    for s in [1.0, 2.0, 3.0]:
        t.test(s)
    assert t.p_value(10.0) == pytest.approx(1 / 4)  # worse than all three: (1 + 0) / 4
    assert t.p_value(2.5) == pytest.approx(2 / 4)
    assert t.p_value(0.0) == pytest.approx(4 / 4)
    assert t.test(10.0) == (pytest.approx(0.25), True)
    lo = OnlineConformal(alpha=0.5, higher_is_worse=False, smoothed=False)
    lo.test(5.0)
    assert lo.test(1.0)[1] is True  # lower is worse here
    assert t.p_value(2.0, u=0.5) == pytest.approx((2 + 0.5 * 2) / 5)  # ties share the randomised mass


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_smoothed_rate_is_alpha_even_with_ties(alpha):
    rng = random.Random(2)
    t = OnlineConformal(alpha=alpha, seed=3)
    for _ in range(4000):
        t.test(float(rng.randint(0, 2)))  # three distinct values: heavy ties
    assert abs(t.rejection_rate - alpha) < 0.03, t.rejection_rate
    plain = OnlineConformal(alpha=alpha, smoothed=False)
    for _ in range(4000):
        plain.test(float(rng.randint(0, 2)))
    assert plain.rejection_rate < alpha - 0.05  # ties make the plain p-value conservative


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.4, 0.5])
def test_realised_rejection_rate_tracks_alpha(alpha):
    rng = random.Random(1)
    t = OnlineConformal(alpha=alpha)
    for _ in range(4000):
        t.test(rng.random())
    assert abs(t.rejection_rate - alpha) < 0.03, t.rejection_rate


def _ctx(pool, policy, samples, **kw):
    return RunContext(
        pool=pool,
        model=policy,
        prompt=Q,
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=kw.pop("max_tokens", 120), seed=0, temperature=0.8),
        budget=Budget(samples=samples, **kw),
    )


async def test_speculative_rejection_aborts_weak_partials():
    # even seeds write good solutions, odd seeds bad ones; the verifier sees it early
    def respond(prompt, s):
        return ("good " if s.seed % 2 == 0 else "bad! ") * 20 + f"\\boxed{{{s.seed % 2}}}"

    pol = FakeEngine("p", respond=respond, tick_s=0.002)
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9 if "good" in t else 0.05)
    ctx = _ctx(ModelPool([pol, ver]), pol, 16)
    r = (
        await get_strategy("speculative_rejection")
        .from_request({"alpha": 0.5, "checkpoints": [10, 30], "min_survivors": 2})
        .run(ctx)
    )
    info = r.info
    assert info["answer"] == "0" and info["rejected"] >= 4
    assert info["decisions"] >= info["rejected"] and 0 < info["rejection_rate"] <= 0.6
    aborted = [c for c in r.candidates if c.aborted]
    assert all(c.num_tokens < 60 for c in aborted)  # rejected early: far short of full length
    bad = sum("bad" in c.text for c in aborted)
    assert bad > len(aborted) - bad  # the weak ones are the ones mostly rejected
    assert pol.num_running == 0


async def test_speculative_rejection_reports_progress_without_rejections():
    # every candidate is good: nothing is rejected, yet a streaming client still sees the
    # checkpoint decisions and each finished sample
    pol = FakeEngine("p", respond=lambda prompt, s: "good " * 20 + "\\boxed{1}", tick_s=0.002)
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9)
    ctx = _ctx(ModelPool([pol, ver]), pol, 4)
    events = []

    async def on_progress(ev):
        events.append(ev)

    ctx.on_progress = on_progress
    r = (
        await get_strategy("speculative_rejection")
        .from_request({"alpha": 0.1, "checkpoints": [10], "min_survivors": 4})
        .run(ctx)
    )
    assert r.info["rejected"] == 0
    kinds = [e["type"] for e in events]
    assert [e["samples_done"] for e in events if e["type"] == "sample"] == [1, 2, 3, 4]
    assert "reject" not in kinds and kinds.count("accept") >= 1


async def test_draft_target_accepts_resamples_and_takes_over():
    solution = "12 + 7 = 19\n19 - 4 = 15\n\\boxed{15}"

    def target_respond(prompt, s):
        done = prompt.split("A: ", 1)[-1] if "A: " in prompt else ""
        return solution[len(done) :] if solution.startswith(done) else "\\boxed{15}"

    def draft_respond(prompt, s):
        # the draft garbles every other chunk
        return "#~#~#~#~" if s.seed % 2 else target_respond(prompt, s)

    def lp(prompt, text, pos):  # target perplexity: garbage is unlikely
        return -4.0 if "#~" in text[max(0, pos - 8) : pos + 1] else -0.1

    target = FakeEngine("t", respond=target_respond, logprob=lp)
    draft = FakeEngine("d", respond=draft_respond)
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9 if t.endswith("{15}") else 0.1)
    ctx = RunContext(
        pool=ModelPool([target, draft, ver]),
        model=target,
        prompt="Q: x\nA: ",
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=200, seed=0, temperature=0.8),
        budget=Budget(samples=4),
    )
    r = (
        await get_strategy("draft_target")
        .from_request({"alpha": 0.3, "chunk_tokens": 8, "max_resamples": 1, "draft": "d"})
        .run(ctx)
    )
    info = r.info
    assert info["answer"] == "15"
    assert info["calibration_chunks"] == 4  # every chain's first chunk
    assert info["accepted"] > 0 and info["decisions"] + 4 == info["accepted"] + info["rejected"]
    assert info["rejected"] > 0 and info["takeovers"] > 0  # garbled chunks: the target wrote them
    tb = info["tokens_by_model"]
    assert tb["d"] > 0
    assert ctx.usage.of("d").completion_tokens >= tb["d"]
