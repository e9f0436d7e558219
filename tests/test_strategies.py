"""Selection logic of every strategy on the deterministic fake engine (fast, exact)."""

from __future__ import annotations

import pytest

from ttscale.budget import Budget
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.errors import InvalidRequestError
from ttscale.strategies import RunContext, get_strategy

Q = [{"role": "user", "content": "q"}]


def scripted(answers):
    """Candidate i (seed i) answers answers[i % len]; None gives an answerless sample."""

    def respond(prompt, s):
        a = answers[(s.seed or 0) % len(answers)]
        body = "work " * (1 + (s.seed or 0) % 3)
        return body + (f"\\boxed{{{a}}}" if a is not None else "no idea")

    return respond


def ctx(policy, *others, samples=None, tokens=None, n=1, seed=0, temperature=0.8, deadline_ms=None):
    pool = ModelPool([policy, *others])
    return RunContext(
        pool=pool,
        model=policy,
        prompt=Q,
        n=n,
        request_id="t",
        settings=SamplingSettings(max_tokens=64, seed=seed, temperature=temperature),
        budget=Budget(samples=samples, tokens=tokens, deadline_ms=deadline_ms),
    )


async def run(name, c, **opts):
    return await get_strategy(name).from_request(opts).run(c)


async def test_majority_plurality_and_answerless():
    pol = FakeEngine("p", respond=scripted([None, "3", "4", "3", None, None, "4", "3"]))
    r = await run("majority", ctx(pol, samples=8), stop_when_decided=False)
    assert r.info["answer"] == "3" and r.info["answerless"] == 3 and r.info["samples_used"] == 8
    assert r.choices[0].text.endswith("\\boxed{3}")
    dist = {d["answer"]: d["votes"] for d in r.info["answer_distribution"]}
    assert dist == {"3": 3, "4": 2}


async def test_majority_clusters_equivalent_forms():
    pol = FakeEngine("p", respond=scripted(["1/2", "0.5", "\\frac{1}{2}", "2", "3"]))
    r = await run("majority", ctx(pol, samples=5), stop_when_decided=False)
    assert r.info["answer"] in ("1/2", "0.5", "\\frac{1}{2}")
    assert r.info["answer_distribution"][0]["votes"] == 3


async def test_majority_stops_when_decided():
    pol = FakeEngine("p", respond=scripted(["5"]), tick_s=0.001)
    r = await run("majority", ctx(pol, samples=16))
    assert r.info["answer"] == "5" and r.info["stop_reason"] in ("early_stop", "complete")


async def test_best_of_n_picks_the_top_verifier_score():
    pol = FakeEngine("p", respond=scripted(["1", "2", "3", "4"]))
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.9 if "{3}" in t else 0.1)
    r = await run("best_of_n", ctx(pol, ver, samples=4))
    assert r.info["answer"] == "3" and r.info["scores"][r.info["selected_index"]] == pytest.approx(0.9)
    # the verifier read every candidate; its tokens are booked
    assert r.info["samples_used"] == 4


async def test_weighted_majority_follows_the_weights():
    pol = FakeEngine("p", respond=scripted(["1", "1", "1", "2"]))
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.95 if "{2}" in t else 0.1)
    r = await run("weighted_majority", ctx(pol, ver, samples=4))
    assert r.info["answer"] == "2"  # 0.95 > 3 × 0.1
    r = await run("majority", ctx(pol, samples=4), stop_when_decided=False)
    assert r.info["answer"] == "1"


async def test_scorer_tokens_fit_the_budget():
    pol = FakeEngine("p", respond=scripted(["1", "2"]))
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.5)
    c = ctx(pol, ver, samples=8, tokens=200)
    await run("best_of_n", c)
    spent = c.usage.completion_tokens + c.usage.of("v").prompt_tokens
    assert 0 < spent <= 200


async def test_selection_strategies_need_n_1_and_refine_needs_chat():
    pol = FakeEngine("p", respond=scripted(["1"]))
    with pytest.raises(InvalidRequestError) as e:
        await run("majority", ctx(pol, n=2))
    assert e.value.param == "n"
    c = ctx(pol)
    c.prompt = "raw prompt"
    with pytest.raises(InvalidRequestError):
        await run("refine", c)


async def test_temperature_sweep_quotas_and_early_exit():
    pol = FakeEngine("p", respond=scripted(["9"]))
    r = await run(
        "temperature_sweep", ctx(pol, samples=24), temperatures=[0.3, 0.9], round_size=4, min_per_temperature=4
    )
    assert r.info["answer"] == "9" and r.info["stop_reason"] == "early_stop"
    assert r.info["samples_used"] == 8 and r.info["temperatures"] == {"0.3": 4, "0.9": 4}
    mixed = FakeEngine("p", respond=scripted(["1", "2"]))
    r = await run(
        "temperature_sweep", ctx(mixed, samples=12), temperatures=[0.0, 0.5, 1.0], round_size=4, min_per_temperature=4
    )
    assert r.info["samples_used"] == 12 and r.info["temperatures"]["0.0"] == 1
    assert r.info["stop_reason"] == "complete"


async def test_refine_stops_on_stable_answer_and_on_critic():
    pol = FakeEngine("p", respond=lambda p, s: "ok \\boxed{4}")
    r = await run("refine", ctx(pol), max_rounds=3)
    assert r.info["stop_reason"] == "stable_answer" and r.info["rounds"] == 1
    assert r.info["samples_used"] == 3  # draft, critique, revision
    happy = FakeEngine("p", respond=lambda p, s: "It is correct." if "Review the answer" in p else "\\boxed{1}")
    r = await run("refine", ctx(happy), max_rounds=3)
    assert r.info["stop_reason"] == "critic_accepted" and r.info["rounds"] == 0
    ver = FakeEngine("v", role="score", scorer=lambda t: 0.2)
    drifting = FakeEngine("p", respond=lambda p, s: f"\\boxed{{{len(p)}}}")
    r = await run("refine", ctx(drifting, ver), max_rounds=2, critic="verifier")
    assert r.info["stop_reason"] == "max_rounds" and r.info["rounds"] == 2


async def test_rpc_runs_and_reports_pruning():
    def lp(prompt, text, pos):
        return -0.05 if "{7}" in text else -1.5

    pol = FakeEngine("p", respond=scripted(["7", "8", "8", "8", "7", "8", "8", "8", "8", "8"]), logprob=lp)
    r = await run("perplexity_consistency", ctx(pol, samples=10))
    assert r.info["answer"] == "7"  # few high-probability paths beat many low-probability ones
    m = await run("majority", ctx(pol, samples=10), stop_when_decided=False)
    assert m.info["answer"] == "8"


async def test_deadline_reports_partial_work():
    pol = FakeEngine("p", respond=lambda p, s: "x" * 60 + "\\boxed{1}", tick_s=0.01)
    r = await run("majority", ctx(pol, samples=4, deadline_ms=100))
    assert r.info["stop_reason"] == "deadline"


async def test_logprob_scorer_min_finds_the_slip():
    # every candidate is likely on average; odd seeds contain one very unlikely token (a slip)
    def respond(prompt, s):
        return f"ab{'X' if s.seed % 2 else 'c'}defghij \\boxed{{{s.seed % 2}}}"

    def lp(prompt, text, pos):
        return -6.0 if text[pos] == "X" else -0.05 - 0.02 * (pos % 3)

    pol = FakeEngine("p", respond=respond, logprob=lp)
    r = await run("best_of_n", ctx(pol, samples=6), scorer="logprob", logprob="min")
    assert r.info["answer"] == "0" and min(x for x in r.info["scores"] if x is not None) == -6.0


async def test_refine_stop_regex_runs_on_re2_in_linear_time():
    # a pattern that takes Python's backtracking `re` exponential time on a long critique
    evil = r"(?s)\A(?:.|.){0,28}\x00"
    critic = FakeEngine("p", respond=lambda p, s: ("a" * 60) if "Review the answer" in p else "\\boxed{1}")
    r = await run("refine", ctx(critic), max_rounds=1, stop_regex=evil, stop_on_stable_answer=False)
    assert r.info["stop_reason"] == "max_rounds"
    r = await run("refine", ctx(critic), max_rounds=1, stop_regex="(?i)A{60}")
    assert r.info["stop_reason"] == "critic_accepted"
    for bad in ("(?=x)", r"(a)\1", "(", "x" * 1001):  # lookaround, backreferences: not RE2
        with pytest.raises(InvalidRequestError) as e:
            get_strategy("refine").from_request({"stop_regex": bad})
        assert e.value.param == "ttscale.stop_regex"
