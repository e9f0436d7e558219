"""Adaptive budgets: the stopping rule, difficulty buckets, waves on the fake engine."""

from __future__ import annotations

import json

import pytest

from ttscale.adaptive import Bucket, Profile, decide
from ttscale.budget import Budget
from ttscale.engine import ModelPool, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.errors import InvalidRequestError
from ttscale.strategies import RunContext, get_strategy


def _profile(flat_hard: bool = True) -> Profile:
    from ttscale.eval.fit import FitResult

    easy = FitResult(
        name="selected_accuracy_ceiling",
        params={"A_inf": 0.99, "A_1": 0.9, "beta": 1.0},
        stderr={},
        r2=1.0,
        rmse=0.0,
        n_points=8,
        fittable=True,
        reason="",
    )
    hard_params = {"A_inf": 0.3, "A_1": 0.29, "beta": 1.0} if flat_hard else {"A_inf": 0.8, "A_1": 0.2, "beta": 0.3}
    hard = FitResult(
        name="selected_accuracy_ceiling",
        params=hard_params,
        stderr={},
        r2=1.0,
        rmse=0.0,
        n_points=8,
        fittable=True,
        reason="",
    )
    return Profile(
        model="p",
        buckets=[Bucket("easy", 0.9, {"majority": easy}), Bucket("hard", 0.2, {"majority": hard})],
        tokens_per_sample=50,
    )


@pytest.mark.parametrize(
    "counts,stop", [([4], True), ([3], False), ([6, 1], True), ([5, 1], False), ([8, 2], True), ([7, 2], False)]
)
def test_beta_rule_vectors(counts, stop):
    d = decide(
        counts,
        sum(counts),
        sum(counts),
        wave=4,
        profile=None,
        curve="majority",
        confidence=0.95,
        target=None,
        tokens_per_sample=50,
        token_cost=0.0,
    )
    assert d.stop is stop and (d.reason == "confident") is stop


def test_difficulty_and_marginal_gain():
    prof = _profile(flat_hard=True)
    d = decide(
        [1, 1, 1, 1],
        4,
        4,
        wave=4,
        profile=prof,
        curve="majority",
        confidence=0.95,
        target=None,
        tokens_per_sample=50,
        token_cost=1e-4,
    )
    assert d.bucket == "hard" and d.stop and d.reason == "marginal_gain"  # flat curve: not worth it
    steep = _profile(flat_hard=False)
    d = decide(
        [1, 1, 1, 1],
        4,
        4,
        wave=4,
        profile=steep,
        curve="majority",
        confidence=0.95,
        target=None,
        tokens_per_sample=50,
        token_cost=1e-4,
    )
    assert d.bucket == "hard" and not d.stop and d.gain > d.cost
    d = decide(
        [3, 1],
        4,
        4,
        wave=4,
        profile=prof,
        curve="majority",
        confidence=0.99,
        target=0.9,
        tokens_per_sample=50,
        token_cost=0.0,
    )
    assert d.bucket == "easy" and d.predicted_accuracy >= 0.9


def _engine(answers):
    def respond(prompt, s):
        return f"work \\boxed{{{answers[(s.seed or 0) % len(answers)]}}}"

    return FakeEngine("p", respond=respond)


def _ctx(eng, budget, profile=None):
    return RunContext(
        pool=ModelPool([eng]),
        model=eng,
        prompt=[{"role": "user", "content": "q"}],
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=40, seed=0, temperature=0.8),
        budget=budget,
        profile=profile,
    )


async def test_easy_stops_after_first_wave_hard_uses_more():
    easy = (
        await get_strategy("majority")
        .from_request({"wave": 4, "schedule": "waves"})
        .run(_ctx(_engine(["5"]), Budget(auto=True)))
    )
    assert easy.info["samples_used"] == 4 and easy.info["stop_reason"] == "confident"
    assert easy.info["adaptive"]["waves"] == 1 and easy.info["tokens_saved"] > 0
    hard = (
        await get_strategy("majority")
        .from_request({"wave": 4, "max_samples": 24, "schedule": "waves"})
        .run(_ctx(_engine(["1", "2", "3", "1", "4", "2"]), Budget(auto=True)))
    )
    assert hard.info["samples_used"] > 4


def _varied(answers, tick_s=0.001):
    """Sample s answers answers[s % len] after 3*s characters of work: they finish in seed order."""

    def respond(prompt, s):
        seed = s.seed or 0
        return "w" * (3 * seed) + f" \\boxed{{{answers[seed % len(answers)]}}}"

    return FakeEngine("p", respond=respond, tick_s=tick_s)


async def test_async_schedule_starts_every_sample_and_aborts_the_rest_when_the_rule_fires():
    eng = _varied(["5"])
    r = await get_strategy("majority").from_request({"max_samples": 16}).run(_ctx_long(eng, Budget(auto=True)))
    a = r.info["adaptive"]
    assert r.info["stop_reason"] == "confident" and r.info["answer"] == "5"
    assert a["schedule"] == "async" and a["waves"] == 0
    assert r.info["samples_used"] == 16 and eng.requests_started == 16  # all started at once
    assert a["samples_finished"] == 4  # Beta rule: 4 unanimous answers are enough
    aborted = [c for c in r.candidates if c.aborted]
    assert len(aborted) == 12 and all(c.settings.seed >= 4 for c in aborted)
    assert eng.num_running == 0
    # the aborted ones were cut before their end: fewer tokens than the fixed plan of 16
    assert all(c.num_tokens < 3 * c.settings.seed + len(" \\boxed{5}") for c in aborted)
    assert a["tokens_used"] == sum(c.num_tokens for c in r.candidates) < sum(3 * s + 11 for s in range(16))


async def test_async_schedule_with_a_concurrency_cap_starts_samples_as_others_finish():
    eng = _varied(["5"], tick_s=0.0)
    r = (
        await get_strategy("majority")
        .from_request({"max_samples": 16, "concurrency": 2})
        .run(_ctx_long(eng, Budget(auto=True)))
    )
    assert r.info["stop_reason"] == "confident" and r.info["adaptive"]["samples_finished"] == 4
    assert eng.requests_started <= 5  # never more than 2 running: at most one more started
    hard = _varied(["1", "2", "3"])
    r = (
        await get_strategy("majority")
        .from_request({"max_samples": 9, "concurrency": 3})
        .run(_ctx_long(hard, Budget(auto=True)))
    )
    assert r.info["samples_used"] == 9 and r.info["stop_reason"] == "sample_budget"


def _ctx_long(eng, budget):
    c = _ctx(eng, budget)
    return RunContext(
        pool=c.pool,
        model=eng,
        prompt=c.prompt,
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=200, seed=0, temperature=0.8),
        budget=budget,
    )


async def test_hard_limits_hold_under_auto():
    r = (
        await get_strategy("majority")
        .from_request({"wave": 4, "schedule": "waves"})
        .run(_ctx(_engine(["1", "2", "3"]), Budget(auto=True, tokens=100)))
    )
    used = r.info["adaptive"]["tokens_used"]
    assert used <= 100 and r.info["stop_reason"] == "token_budget"
    r = (
        await get_strategy("best_of_n")
        .from_request({"wave": 2, "scorer": "logprob"})
        .run(_ctx(_engine(["1", "2", "3"]), Budget(target_accuracy=0.99, samples=6)))
    )
    assert r.info["samples_used"] <= 6


async def test_auto_strategy_and_budget_checks():
    r = await get_strategy("auto").from_request({"wave": 4}).run(_ctx(_engine(["7"]), Budget(), _profile()))
    assert r.info["answer"] == "7" and r.info["selection"] == "majority"
    assert r.info["adaptive"]["difficulty"]["bucket"] == "easy"
    with pytest.raises(InvalidRequestError) as e:
        get_strategy("none").from_request({}).check_budget(Budget(auto=True))
    assert e.value.param == "ttscale.budget"
    get_strategy("majority").from_request({}).check_budget(Budget(auto=True))


def test_profile_roundtrip(tmp_path):
    prof = _profile()
    d = {
        "version": 1,
        "model": "p",
        "tokens_per_sample": 50,
        "k_max": 64,
        "buckets": [
            {
                "name": b.name,
                "pass1": b.pass1,
                "curves": {k: v.to_dict() for k, v in b.curves.items()},
                "points": {"k": [1, 4, 16], "majority": [0.2, 0.25, 0.3]},
            }
            for b in prof.buckets
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    loaded = Profile.load(path)
    assert [b.name for b in loaded.buckets] == ["easy", "hard"]
    assert loaded.buckets[0].accuracy("majority", 4) == pytest.approx(prof.buckets[0].accuracy("majority", 4))
    assert loaded.bucket_for(0.85).name == "easy"
    # points-only curves interpolate in log k
    b = Bucket("x", 0.5, points={"k": [1, 4, 16], "majority": [0.2, 0.4, 0.5]})
    assert b.accuracy("majority", 2) == pytest.approx(0.3)
    assert b.accuracy("majority", 64) == pytest.approx(0.5)


def test_profiles_match_the_prompt_format_they_were_fitted_on():
    from ttscale.adaptive import select_profile

    boxed = Profile("p", [], prompt={"system": None, "template": "Q: {problem}\nBox it."})
    plain = Profile("p", [], prompt={"system": None, "template": "{problem}"})
    sys_ = Profile("p", [], prompt={"system": "S", "template": "{problem}"})
    old = Profile("p", [])  # no format recorded: fits anything, least specific
    user = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    assert boxed.matches(user("Q: 1+1?\nBox it.")) and not boxed.matches(user("1+1?"))
    assert not boxed.matches(user("Q: \nBox"))  # shorter than the template's fixed text
    assert plain.matches(user("anything")) and not plain.matches([{"role": "system", "content": "S"}, *user("x")])
    assert sys_.matches([{"role": "system", "content": "S"}, *user("x")]) and not sys_.matches(user("x"))
    assert boxed.matches("Q: raw text\nBox it.") and plain.matches([1, 2, 3]) and not boxed.matches([1, 2, 3])
    assert old.matches(user("x")) and old.matches([1])
    profs = [old, plain, boxed, sys_]
    assert select_profile(profs, user("Q: 3?\nBox it.")) is boxed  # the most specific fitting one
    assert select_profile(profs, user("3?")) is plain
    assert select_profile([boxed, sys_], user("3?")) is boxed  # none fits: the first
    assert select_profile([], user("3?")) is None
