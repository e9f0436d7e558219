"""Online conformal rejection and the two rejection strategies on the fake engine.

The fake engine gives each position the top-k log-probs ``lp, lp-1, ..., lp-(k-1)``, so with
k = 20 the token confidence is ``C = -mean(top-20) = 9.5 - lp``.
"""

from __future__ import annotations

import asyncio
import math
import random

import httpx
import pytest

from ttscale.budget import Budget
from ttscale.conformal import OnlineConformal
from ttscale.engine import Candidate, ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.errors import InvalidRequestError, ModelNotFoundError
from ttscale.scorers import ConfidenceScorer, ScorerOptions
from ttscale.server import create_app
from ttscale.strategies import RunContext, get_strategy
from ttscale.strategies.speculative import best_in_order, partial_confidence, resolve_checkpoints

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


class LateAborts(FakeEngine):
    """An engine whose aborts arrive after each candidate's last step: every candidate finishes."""

    def fanout(self, prompt, settings, *, request_id=None, stream=True, text=True, together=False):
        fo = super().fanout(prompt, settings, request_id=request_id, stream=stream, text=text, together=together)

        async def too_late(index):
            return None

        fo.abort = too_late
        return fo


async def test_a_rejection_that_lands_too_late_counts_as_accepted():
    pol = LateAborts("p", respond=lambda prompt, s: ("good " if s.seed % 2 == 0 else "bad! ") * 20, tick_s=0.001)
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9 if "good" in t else 0.05)
    ctx = _ctx(ModelPool([pol, ver]), pol, 8)
    r = await get_strategy("speculative_rejection").from_request({"checkpoints": [10], "verifier": "v"}).run(ctx)
    info = r.info
    assert info["checkpoint_stats"]["10"]["rejections"] > 0  # the tests rejected some ...
    assert not any(c.aborted for c in r.candidates)  # ... but none was stopped
    assert info["rejected"] == info["aborted"] == 0 and info["accepted"] == 8 and info["rejection_rate"] == 0.0


class SlowAborts(FakeEngine):
    """An engine whose aborts land some steps after they were asked for."""

    def fanout(self, prompt, settings, *, request_id=None, stream=True, text=True, together=False):
        fo = super().fanout(prompt, settings, request_id=request_id, stream=stream, text=text, together=together)
        now = fo.abort

        async def later(index):
            await asyncio.sleep(self.tick_s * 12)
            await now(index)

        fo.abort = later
        return fo


async def test_a_candidate_rejected_while_its_abort_travels_is_judged_once():
    # checkpoints 4 tokens apart, aborts landing ~12 steps late: a rejected candidate passes the
    # next checkpoint still running; it is no new decision and no second rejection
    pol = SlowAborts("p", respond=lambda prompt, s: ("good " if s.seed % 2 == 0 else "bad! ") * 20, tick_s=0.002)
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9 if "good" in t else 0.05)
    ctx = _ctx(ModelPool([pol, ver]), pol, 16)
    r = (
        await get_strategy("speculative_rejection")
        .from_request({"alpha": 0.5, "checkpoints": [8, 12, 16], "min_survivors": 2, "verifier": "v"})
        .run(ctx)
    )
    info = r.info
    aborted = [c for c in r.candidates if c.aborted]
    assert info["rejected"] == len(aborted) > 0
    assert sum(s["rejections"] for s in info["checkpoint_stats"].values()) == len(aborted)
    assert info["aborted"] == 0 and info["accepted"] == 16 - len(aborted)


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


# -- reward-free rejection: the policy's own confidence -----------------------------------------


def _rows(*pairs: tuple[float, ...]) -> list[list[tuple[int | str, float]]]:
    return [[(j, lp) for j, lp in enumerate(p)] for p in pairs]


def test_partial_confidence_vectors():
    # token confidences -mean(top-2): (1+3)/2 = 2.0, (0.5+1.5)/2 = 1.0, (0.25+0.75)/2 = 0.5,
    # (2+4)/2 = 3.0; the third entry of the last row (-9) is outside the top 2
    c = Candidate(0, SamplingSettings(), top_logprobs=_rows((-1, -3), (-0.5, -1.5), (-0.25, -0.75), (-2, -4, -9)))
    c.token_count = 4
    low = ConfidenceScorer(ScorerOptions(name="confidence", top_logprobs=2, confidence_window=2))
    # windows of 2 over the first t tokens: t=2: [1.5]; t=3: [1.5, 0.75]; t=4: [1.5, 0.75, 1.75]
    assert partial_confidence(low, c, 2) == pytest.approx(1.5)
    assert partial_confidence(low, c, 3) == pytest.approx(0.75)
    assert partial_confidence(low, c, 4) == pytest.approx(0.75) == low.of(c)
    assert partial_confidence(low, c, 99) == pytest.approx(0.75)  # the whole trace so far
    mean = ConfidenceScorer(ScorerOptions(name="confidence", top_logprobs=2, confidence="mean"))
    assert partial_confidence(mean, c, 3) == pytest.approx(3.5 / 3)
    assert partial_confidence(mean, c, 4) == pytest.approx(6.5 / 4)
    # the default window (2048) is longer than the prefix: its mean token confidence
    wide = ConfidenceScorer(ScorerOptions(name="confidence", top_logprobs=2))
    assert partial_confidence(wide, c, 3) == pytest.approx(3.5 / 3)
    assert partial_confidence(wide, Candidate(1, SamplingSettings()), 3) is None  # no log-probs: no decision


def test_checkpoint_resolution_vectors():
    assert resolve_checkpoints([0.1, 0.25, 0.5], 160) == [16, 40, 80]
    assert resolve_checkpoints([0.3], 10) == [3]  # 0.3 * 10 is 3.0000000000000004 in floats
    assert resolve_checkpoints([0.1, 0.11], 10) == [1, 2]  # ceil(1.0), ceil(1.1)
    assert resolve_checkpoints([0.01, 0.5], 50) == [1, 25]  # ceil(0.5) = 1
    assert resolve_checkpoints([0.1, 0.12], 5) == [1]  # 0.5 and 0.6 are both reached at 1 token
    assert resolve_checkpoints([48.0, 24.0], 10) == [24, 48]  # token counts as they are


def test_confidence_ties_go_to_the_earlier_launched_candidate():
    assert best_in_order([1.0, 3.0, 3.0, 2.0]) == 1
    assert best_in_order([-math.inf, -math.inf]) == 0
    assert best_in_order([]) is None


@pytest.mark.parametrize(
    "raw,param",
    [
        ({"checkpoints": [0.5, 24]}, "ttscale.checkpoints"),  # fractions and counts mixed
        ({"checkpoints": [1.5]}, "ttscale.checkpoints"),
        ({"checkpoints": [0]}, "ttscale.checkpoints"),
        ({"checkpoints": [0.25, 0.25]}, "ttscale.checkpoints"),
        ({"checkpoints": []}, "ttscale.checkpoints"),
        ({"scorer": "judge"}, "ttscale.scorer"),
        ({"scorer": "nope"}, "ttscale.scorer"),
        ({"scorer": "confidence", "top_logprobs": 21}, "ttscale.scorer.top_logprobs"),
    ],
)
def test_bad_options_name_the_parameter(raw, param):
    with pytest.raises(InvalidRequestError) as e:
        get_strategy("speculative_rejection").from_request(raw)
    assert e.value.param == param


async def test_bad_checkpoints_are_a_400_naming_the_parameter():
    pol = FakeEngine("p")
    app = create_app(ModelPool([pol]), manage_pool=False)
    tts = {"strategy": "speculative_rejection", "checkpoints": [0.1, 64]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        r = await h.post("/v1/chat/completions", json={"model": "p", "messages": Q, "ttscale": tts})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "ttscale.checkpoints" and "fractions of the expected sample length" in err["message"]


HIGH, LOW = -5.0, 0.0  # lp of confident and unsure candidates: C = 14.5 and 9.5


def _confidence_policy(tick_s: float = 0.002) -> FakeEngine:
    # even seeds: confident, answer 0; odd seeds: unsure, answer 1 (the same length)
    def respond(prompt, s):
        return ("H" if s.seed % 2 == 0 else "L") + "w" * 100 + f"\\boxed{{{s.seed % 2}}}"

    def logprob(prompt, text, pos):
        return HIGH if text[0] == "H" else LOW

    return FakeEngine("p", respond=respond, logprob=logprob, tick_s=tick_s)


async def test_confidence_rejects_unsure_partials_without_a_verifier():
    pol = _confidence_policy()
    ctx = _ctx(ModelPool([pol]), pol, 16)  # no scoring model served: confidence by default
    events = []

    async def on_progress(ev):
        events.append(ev)

    ctx.on_progress = on_progress
    r = await get_strategy("speculative_rejection").from_request({"checkpoints": [0.1, 0.25]}).run(ctx)
    info = r.info
    assert info["scorer"] == "confidence" and info["checkpoints"] == [12, 30]  # of max_tokens 120
    aborted = [c for c in r.candidates if c.aborted]
    unsure = [c for c in r.candidates if c.text.startswith("L")]
    # an unsure candidate is worse than every confident one ahead of it: p <= 1/2 = alpha
    assert len(unsure) == 8 and all(c.aborted for c in unsure)
    assert info["rejected"] == len(aborted) >= 8
    assert all(c.num_tokens < 60 for c in aborted)  # stopped early: far short of the 104 tokens
    assert info["checkpoint_basis"] == {"from": "max_tokens", "tokens": 120}
    won = r.candidates[r.selected_index]
    assert info["answer"] == "0" and won.text.startswith("H") and not won.aborted
    assert info["scores"][r.selected_index] == pytest.approx(14.5)
    # ties between the confident finishers: the earliest launched one
    assert r.selected_index == min(i for i, c in enumerate(r.candidates) if not c.aborted)
    judged = {round(e["score"], 4) for e in events if e["type"] in ("reject", "accept")}
    assert judged == {9.5, 14.5}
    # the sampler asked for the top-20 log-probs; nothing read the candidates but the policy
    assert all(len(c.top_logprobs[0]) == 20 for c in r.candidates)
    assert set(ctx.usage.models) == {"p"}
    # the budget counts the generated tokens, the aborted ones too, and nothing else
    assert ctx.ledger.tokens_spent == sum(c.num_tokens for c in r.candidates) and ctx.ledger.tokens_held == 0
    assert ctx.usage.of("p").aborted_tokens == sum(c.num_tokens for c in aborted) > 0
    assert pol.num_running == 0


@pytest.mark.parametrize(
    "tokens_per_sample,basis,cps",
    [
        (40.0, {"from": "profile", "tokens": 40}, [4, 10, 20]),  # the profile's mean sample length
        (400.0, {"from": "profile", "tokens": 120}, [12, 30, 60]),  # at most max_tokens
        (None, {"from": "max_tokens", "tokens": 120}, [12, 30, 60]),  # a profile without lengths
    ],
)
async def test_confidence_checkpoints_follow_the_expected_sample_length(tokens_per_sample, basis, cps):
    from ttscale.adaptive import Profile

    pol = _confidence_policy()
    ctx = _ctx(ModelPool([pol]), pol, 8)
    ctx.profile = Profile(model="p", buckets=[], tokens_per_sample=tokens_per_sample)
    r = await get_strategy("speculative_rejection").from_request({}).run(ctx)
    assert r.info["checkpoints"] == cps and r.info["checkpoint_basis"] == basis
    assert set(r.info["checkpoint_stats"]) == {str(c) for c in cps}
    # token-count checkpoints are counts, whatever the profile says
    r = await get_strategy("speculative_rejection").from_request({"checkpoints": [5, 50]}).run(ctx)
    assert r.info["checkpoints"] == [5, 50] and "checkpoint_basis" not in r.info


async def test_confidence_chosen_beside_a_served_verifier_reads_nothing():
    pol = _confidence_policy(tick_s=0.0)
    ver = FakeEngine("v", role="score", scorer=lambda t: 1.0 if "{1}" in t else 0.0)  # prefers unsure
    ctx = _ctx(ModelPool([pol, ver]), pol, 8, tokens=8 * 104)  # room for the samples only
    r = await get_strategy("speculative_rejection").from_request({"scorer": "confidence"}).run(ctx)
    assert r.info["scorer"] == "confidence" and r.info["checkpoints"] == [12, 30, 60]  # the default
    assert r.info["answer"] == "0" and "v" not in ctx.usage.models


async def test_default_scorer_is_the_verifier_where_one_is_served():
    pol = _confidence_policy(tick_s=0.0)
    ver = FakeEngine("v", role="score", scorer=lambda t: 1.0 if "{1}" in t else 0.0)
    ctx = _ctx(ModelPool([pol, ver]), pol, 4)
    r = await get_strategy("speculative_rejection").from_request({"checkpoints": [200]}).run(ctx)
    assert r.info["scorer"] == "verifier" and r.info["answer"] == "1"  # the verifier's choice
    assert ctx.usage.of("v").prompt_tokens > 0
    alone = _ctx(ModelPool([pol]), pol, 4)
    with pytest.raises(ModelNotFoundError):  # named, not served
        await get_strategy("speculative_rejection").from_request({"scorer": "verifier"}).run(alone)
