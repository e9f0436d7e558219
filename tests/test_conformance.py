"""Every registered strategy through the real server (vLLM CPU, embedded models), with the SDK:
deterministic under a seed, budget respected, usage adds up, response object complete,
streaming works."""

from __future__ import annotations

import pytest

from conftest import DRAFT, POLICY, VERIFIER
from ttscale.engine import parse_model_arg
from ttscale.strategies import registered

pytestmark = [pytest.mark.server, pytest.mark.vllm]

POLICY_NAME = parse_model_arg(POLICY).name
VERIFIER_NAME = parse_model_arg(VERIFIER).name
DRAFT_NAME = parse_model_arg(DRAFT).name
MSGS = [
    {
        "role": "user",
        "content": "Lena has 35 pens. She buys 48 more, then gives away 19. How many pens does Lena have now?",
    }
]

# strategy -> options used in the suite (small budgets keep the CPU run short)
CONFIGS: dict[str, dict] = {
    "none": {},
    "majority": {},
    "weighted_majority": {"verifier": VERIFIER_NAME},
    "best_of_n": {"scorer": "verifier", "verifier": VERIFIER_NAME},
    "perplexity_consistency": {},
    "temperature_sweep": {"temperatures": [0.5, 1.0], "round_size": 3, "min_per_temperature": 3},
    "refine": {"max_rounds": 1},
    "speculative_rejection": {"checkpoints": [16, 32], "verifier": VERIFIER_NAME},
    "draft_target": {"draft": DRAFT_NAME, "chunk_tokens": 24},
    "auto": {"wave": 3},
    "deepconf": {"warmup": 3, "window": 16, "keep": 0.5, "consensus": 1.0},
}
EXTRA_VARIANTS = [
    ("majority", {"wave": 2, "auto_budget": True}),
    ("best_of_n", {"wave": 3, "auto_budget": True}),
    ("best_of_n", {"scorer": "logprob"}),
    ("best_of_n", {"scorer": "confidence"}),
    ("best_of_n", {"scorer": "judge", "judge_model": DRAFT_NAME}),
    ("weighted_majority", {"scorer": "confidence"}),
    ("speculative_rejection", {"scorer": "confidence"}),  # reward-free: checkpoints at fractions of the expected length
    ("refine", {"critic": "verifier", "max_rounds": 2, "verifier": VERIFIER_NAME}),
]
SAMPLES = 6
INFO_KEYS = {"strategy", "samples_used", "stop_reason", "selected_index", "budget", "usage", "elapsed_ms"}


def test_every_registered_strategy_is_covered():
    assert set(CONFIGS) == set(registered())


def _ask(client, strategy, options, *, budget=None, stream=False, seed=7, return_samples=True):
    options = dict(options)
    budget = dict(budget or {"samples": SAMPLES})
    if options.pop("auto_budget", False):
        budget["target_accuracy"] = 0.9  # adaptive waves under the samples / tokens caps
    tts = {"strategy": strategy, **options, "return_samples": return_samples, "budget": budget}
    return client.chat.completions.create(
        model=POLICY_NAME,
        messages=MSGS,
        temperature=0.8,
        seed=seed,
        max_tokens=160,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
        extra_body={"ttscale": tts},
    )


def _chargeable(tts: dict, options: dict) -> int:
    """Tokens the budget counts: every completion, plus what scoring / judging models read
    (a verifier's inputs, a judge's prompts, the chunks a target scores by perplexity)."""
    total = 0
    for name, m in tts["usage"]["models"].items():
        total += m["completion_tokens"]
        if name == VERIFIER_NAME or (name == options.get("judge_model")):
            total += m["prompt_tokens"]
    total += sum(v for k, v in (tts.get("tokens_by_model") or {}).items() if k.endswith(":scored"))
    return total


def check_usage_split(usage, tts: dict) -> None:
    """The engine's work adds up for any strategy: totals are the models' sums, a model's engine
    requests read at least what it was billed for and generated at least its completion tokens,
    cache hits are a part of what was read, the bill's cached share a part of its prompt tokens."""
    u, models = tts["usage"], tts["usage"]["models"]
    for key in ("prefill_tokens", "cached_prefill_tokens", "decode_tokens"):
        assert u[key] == sum(m[key] for m in models.values()), key
    for name, m in models.items():
        assert m["prefill_tokens"] >= m["prompt_tokens"] and m["decode_tokens"] >= m["completion_tokens"], name
        assert 0 <= m["cached_prefill_tokens"] <= m["prefill_tokens"] - m["requests"], name  # vLLM: last token
        assert 0 <= m["cached_prompt_tokens"] <= m["prompt_tokens"], name
    assert usage.prompt_tokens_details.cached_tokens == sum(m["cached_prompt_tokens"] for m in models.values())


def _aborted(tts: dict) -> bool:
    return any(s["finish_reason"] == "abort" for s in tts["samples"])


def _finished_in_both(a: dict, b: dict) -> tuple[list[int], list[int]]:
    """Token counts of the samples that finished (were not aborted) in both runs. Whether a
    sample still running when a vote is decided finishes or is aborted depends on when the abort
    reaches the engine (it may finish in the same engine step), so only these must agree."""
    pairs = [
        (x["tokens"], y["tokens"])
        for x, y in zip(a["samples"], b["samples"])
        if x["finish_reason"] != "abort" and y["finish_reason"] != "abort"
    ]
    return [p for p, _ in pairs], [q for _, q in pairs]


CASES = list(CONFIGS.items()) + EXTRA_VARIANTS


@pytest.mark.parametrize("strategy,options", CASES, ids=[f"{s}-{'-'.join(map(str, o.values()))}" for s, o in CASES])
def test_strategy_conformance(client, strategy, options):
    deterministic = registered()[strategy].deterministic
    a = _ask(client, strategy, options)
    b = _ask(client, strategy, options)
    ta, tb = a.model_extra["ttscale"], b.model_extra["ttscale"]
    # deterministic under a seed (the asynchronous rejection strategy: its seeded samples are,
    # its rejections depend on arrival order)
    if deterministic:
        assert a.choices[0].message.content == b.choices[0].message.content
        assert ta.get("answer") == tb.get("answer") and ta["samples_used"] == tb["samples_used"]
    else:
        assert ta["samples_used"] == tb["samples_used"] == SAMPLES
    # response object complete
    assert set(ta) >= INFO_KEYS, set(ta)
    assert ta["strategy"] == strategy
    assert 1 <= ta["samples_used"] <= SAMPLES
    assert len(ta["samples"]) == ta["samples_used"]
    if strategy != "none":
        assert ta["selected_index"] is not None
        assert ta["samples"][ta["selected_index"]]["text"] == a.choices[0].message.content
        assert "answer" in ta
    # usage adds up
    models = ta["usage"]["models"]
    assert a.usage.prompt_tokens == sum(m["prompt_tokens"] for m in models.values())
    assert a.usage.completion_tokens == sum(m["completion_tokens"] for m in models.values())
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    check_usage_split(a.usage, ta)
    generated = sum(m["completion_tokens"] for n, m in models.items() if n != options.get("judge_model"))
    assert sum(s["tokens"] for s in ta["samples"]) == generated
    if options.get("scorer", "verifier") == "verifier" and strategy in ("best_of_n", "weighted_majority"):
        assert models[VERIFIER_NAME]["prompt_tokens"] > 0  # the verifier's reading is counted
    if options.get("scorer") == "confidence":
        assert VERIFIER_NAME not in models  # the policy's own log-probs: nothing read them

    # streaming gives the same answer through the SDK; progress chunks are tolerated
    chunks = list(_ask(client, strategy, options, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1].model_extra["ttscale"]["strategy"] == strategy
    st = finals[-1].model_extra["ttscale"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    if strategy != "none":
        assert text == st["samples"][st["selected_index"]]["text"]
    if deterministic:
        assert text == a.choices[0].message.content
        # tokens of finished samples are seeded; an aborted sample's count depends on when the
        # abort reached the engine (an early stop), so only those are allowed to differ
        mine, theirs = _finished_in_both(st, ta)
        assert mine == theirs and mine
        if not _aborted(st) and not _aborted(ta):
            assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    if strategy not in ("none",):
        assert any(
            c.choices and (c.model_extra or {}).get("ttscale", {}) and (c.model_extra["ttscale"] or {}).get("progress")
            for c in chunks
        )


@pytest.mark.parametrize("strategy,options", CASES, ids=[f"{s}-{'-'.join(map(str, o.values()))}" for s, o in CASES])
def test_strategy_token_budget(client, strategy, options):
    cap = 420
    r = _ask(client, strategy, options, budget={"samples": SAMPLES, "tokens": cap}, seed=3)
    tts = r.model_extra["ttscale"]
    assert _chargeable(tts, options) <= cap, tts["usage"]
    assert tts["samples_used"] >= 1
