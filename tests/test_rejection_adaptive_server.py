"""Through the real server (vLLM CPU, embedded models): rejection sampling really stops aborted
candidates and tracks its rejection rate; adaptive budgets spend little on easy questions, more
on hard ones, and never cross hard limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import POLICY, VERIFIER
from ttscale.engine import parse_model_arg
from ttscale.strategies.speculative import resolve_checkpoints

pytestmark = [pytest.mark.server, pytest.mark.vllm]

POLICY_NAME = parse_model_arg(POLICY).name
VERIFIER_NAME = parse_model_arg(VERIFIER).name
ROWS = [
    json.loads(x)
    for x in (Path(__file__).resolve().parents[1] / "eval" / "datasets" / "arith500.jsonl").read_text().splitlines()
]
EASY = next(r for r in ROWS if r["level"] == 1)
HARD = [r for r in ROWS if r["level"] == 5][:3]


def _ask(client, problem, tts, **kw):
    return client.chat.completions.create(
        model=POLICY_NAME,
        messages=[{"role": "user", "content": problem}],
        extra_body={"ttscale": {"return_samples": True, **tts}, **kw.pop("extra", {})},
        **kw,
    )


def test_speculative_rejection_aborts_in_the_engine_and_tracks_alpha(client):
    max_tokens, alpha = 300, 0.5
    rejected = decisions = 0
    for seed in range(3):
        r = _ask(
            client,
            HARD[0]["problem"],
            {
                "strategy": "speculative_rejection",
                "alpha": alpha,
                "checkpoints": [12, 24],
                "min_survivors": 2,
                "verifier": VERIFIER_NAME,
                "budget": {"samples": 16},
            },
            seed=seed,
            temperature=0.9,
            max_tokens=max_tokens,
            extra={"ignore_eos": True},
        )
        tts = r.model_extra["ttscale"]
        aborted = [s for s in tts["samples"] if s["finish_reason"] == "abort"]
        assert len(aborted) == tts["rejected"] > 0
        # a rejected candidate was stopped in the engine before its end (how far past its checkpoint it
        # ran depends on how fast the verifier read it: on a loaded host the policy runs on meanwhile)
        assert all(s["tokens"] < max_tokens for s in aborted), [s["tokens"] for s in aborted]
        assert all(s["tokens"] == max_tokens for s in tts["samples"] if s["finish_reason"] != "abort")
        assert tts["usage"]["aborted_tokens"] == sum(s["tokens"] for s in aborted)
        rejected += tts["rejected"]
        decisions += tts["decisions"]
    # small runs: the conformal test rejects at most alpha in expectation, a little less early on
    # (and never below min_survivors); over 3 requests the rate stays within 0.25 of alpha
    assert abs(rejected / decisions - alpha) <= 0.25, (rejected, decisions)


def test_speculative_rejection_by_confidence_aborts_with_no_verifier_read(client):
    max_tokens = 200
    rejected = 0
    for seed in range(2):
        r = _ask(
            client,
            HARD[0]["problem"],
            {
                "strategy": "speculative_rejection",
                "scorer": "confidence",
                "alpha": 0.5,
                "checkpoints": [0.06, 0.12],  # of the expected sample length
                "budget": {"samples": 16},
            },
            seed=seed,
            temperature=0.9,
            max_tokens=max_tokens,
            extra={"ignore_eos": True},
        )
        tts = r.model_extra["ttscale"]
        # the embedded model's shipped profile measured its mean sample length: the fractions are of it
        basis = tts["checkpoint_basis"]
        assert basis["from"] == "profile" and 1 <= basis["tokens"] < max_tokens, basis
        assert tts["scorer"] == "confidence"
        assert tts["checkpoints"] == resolve_checkpoints([0.06, 0.12], basis["tokens"])
        aborted = [s for s in tts["samples"] if s["finish_reason"] == "abort"]
        assert len(aborted) == tts["rejected"]
        assert all(s["tokens"] < max_tokens for s in aborted), [s["tokens"] for s in aborted]
        assert tts["usage"]["aborted_tokens"] == sum(s["tokens"] for s in aborted)
        assert set(tts["usage"]["models"]) == {POLICY_NAME}  # no scoring model read anything
        finished = [s for s in tts["samples"] if s["finish_reason"] != "abort"]
        assert len(finished) >= 2  # min_survivors
        # the winner: the most confident finished candidate (a real confidence, from top-20 log-probs)
        best = max(s["score"] for s in finished)
        assert best > 0 and tts["samples"][tts["selected_index"]]["score"] == best
        rejected += tts["rejected"]
    assert rejected > 0


def test_easy_question_stops_after_first_wave_hard_uses_more(client):
    tts = {"strategy": "majority", "budget": "auto", "wave": 4, "max_samples": 24, "schedule": "waves"}
    easy = _ask(client, EASY["problem"], tts, seed=0, temperature=0.3, max_tokens=200).model_extra["ttscale"]
    assert easy["samples_used"] == 4 and easy["stop_reason"] == "confident", easy["adaptive"]
    used = [
        _ask(client, h["problem"], tts, seed=0, temperature=0.8, max_tokens=320).model_extra["ttscale"] for h in HARD
    ]
    assert max(u["samples_used"] for u in used) > 4, [u["adaptive"] for u in used]
    for u in used:
        assert u["adaptive"]["difficulty"]["bucket"] is not None  # the shipped profile is in use


def test_async_adaptive_budget_stops_as_soon_as_the_rule_fires(client):
    tts = {"strategy": "majority", "budget": "auto", "max_samples": 24, "return_samples": True}
    r = _ask(client, EASY["problem"], tts, seed=0, temperature=0.3, max_tokens=200).model_extra["ttscale"]
    a = r["adaptive"]
    assert r["stop_reason"] == "confident" and a["schedule"] == "async" and a["waves"] == 0, a
    assert r["samples_used"] == 24  # every sample started at once
    finished = [s for s in r["samples"] if s["finish_reason"] != "abort"]
    assert len(finished) == a["samples_finished"] >= 4
    aborted = [s for s in r["samples"] if s["finish_reason"] == "abort"]
    assert r["usage"]["aborted_tokens"] == sum(s["tokens"] for s in aborted)


def test_auto_budget_hard_limits(client):
    r = _ask(
        client,
        HARD[1]["problem"],
        {"strategy": "auto", "budget": {"target_accuracy": 0.99, "tokens": 500}},
        seed=1,
        temperature=0.8,
        max_tokens=320,
    )
    tts = r.model_extra["ttscale"]
    spent = sum(m["completion_tokens"] for m in tts["usage"]["models"].values()) + tts["usage"]["models"].get(
        VERIFIER_NAME, {}
    ).get("prompt_tokens", 0)
    assert spent <= 500, tts["usage"]
    r = _ask(
        client,
        HARD[2]["problem"],
        {"strategy": "majority", "budget": {"target_accuracy": 0.99, "deadline_ms": 300}},
        seed=1,
        temperature=0.8,
        max_tokens=1500,
        extra={"ignore_eos": True},
    )
    tts = r.model_extra["ttscale"]
    assert tts["stop_reason"] == "deadline"
    # it stopped early: every candidate in flight was cut before its 1500 tokens (on a busy host
    # possibly before its first one), and what they wrote counts as aborted
    assert tts["usage"]["aborted_tokens"] == r.usage.completion_tokens, (tts["usage"], r.usage)
    assert r.usage.completion_tokens < tts["samples_used"] * 1500, (r.usage, tts["samples_used"])
