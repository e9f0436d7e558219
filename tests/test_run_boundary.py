"""The run boundary: the ledger alone writes budget numbers, results are typed, scorer options
compose into a strategy's options, the published response schema matches what is served."""

from __future__ import annotations

import httpx
import pytest

from ttscale.budget import Budget
from ttscale.engine import Candidate, ModelPool, Prefill, ReadResult, SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.errors import InvalidRequestError
from ttscale.run import Ledger, StopReason, StrategyResult
from ttscale.server import create_app
from ttscale.server.protocol import ChatCompletionResponse, CompletionResponse
from ttscale.strategies import RunContext, get_strategy

Q = [{"role": "user", "content": "q"}]


def _ctx(engine, budget: Budget, pool=None) -> RunContext:
    return RunContext(
        pool=pool or ModelPool([engine]),
        model=engine,
        prompt=Q,
        n=1,
        request_id="t",
        settings=SamplingSettings(max_tokens=40, seed=0, temperature=0.8),
        budget=budget,
    )


def test_ledger_reserve_settle_hold_release():
    led = Ledger(Budget(tokens=100))
    assert led.reserve(60) and led.tokens_left() == 40
    assert not led.reserve(41)  # does not fit: nothing charged
    led.settle(60, 25)  # used 25 of the 60 reserved
    assert led.tokens_spent == 25 and led.tokens_left() == 75
    led.hold(30)
    assert led.tokens_left() == 45
    led.charge_scoring("v", 20, released=30)  # the scoring cost 20 of the 30 held
    assert (led.tokens_spent, led.tokens_held, led.tokens_left()) == (45, 0, 55)
    led.charge("p", prompt=7, completion=5, requests=1, budget_prompt=False)
    assert led.tokens_spent == 50 and led.usage.of("p").prompt_tokens == 7
    assert led.usage.of("v").prompt_tokens == 20 and led.usage.total_tokens == 32


def _cand(tokens: int, cached: int | None, finish: str = "stop") -> Candidate:
    c = Candidate(0, SamplingSettings(), token_count=tokens, cached_tokens=cached)
    c.finish_reason = finish  # type: ignore[assignment]
    return c


def test_ledger_books_a_fan_out_as_billed_and_as_the_engines_work():
    led = Ledger(Budget(tokens=1000))
    # K=3 of a 40-token prompt: the first request computed it all, its siblings found 32 cached
    cands = [_cand(10, 0), _cand(12, 32), _cand(5, 32, "abort")]
    led.book_candidates("p", 40, cands)
    m = led.usage.of("p")
    assert (m.prompt_tokens, m.cached_prompt_tokens, m.completion_tokens, m.aborted_tokens, m.requests) == (
        40,
        0,  # the prompt counted once: no token of it came from the cache for every request
        27,
        5,
        3,
    )
    assert (m.prefill_tokens, m.cached_prefill_tokens, m.decode_tokens) == (120, 64, 27)
    assert led.tokens_spent == 0  # a sampler charges its candidates as they settle; the prompt never
    # the same prompt again, every request served 32 from the cache
    led.book_candidates("p", 40, [_cand(3, 32), _cand(4, 32)], budget=True)
    assert (m.prompt_tokens, m.cached_prompt_tokens, m.prefill_tokens, m.cached_prefill_tokens) == (80, 32, 200, 128)
    assert (m.completion_tokens, m.decode_tokens, led.tokens_spent) == (34, 34, 7)
    assert led.usage.openai() == {
        "prompt_tokens": 80,
        "completion_tokens": 34,
        "total_tokens": 114,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    assert Prefill.of(40, cands) == Prefill(120, 64, 0)


def test_cached_tokens_are_unknown_until_an_engine_reports_them():
    led = Ledger(Budget())
    led.book_candidates("up", 9, [_cand(4, None), _cand(6, None)])  # an upstream that does not say
    led.charge_scoring("v", 30)  # a read booked as billed: 30 read, nothing known cached
    u = led.usage
    assert (u.prefill_tokens, u.cached_prefill_tokens, u.cached_prompt_tokens, u.decode_tokens) == (48, None, None, 10)
    assert "prompt_tokens_details" not in u.openai()  # unknown is not 0
    detail = u.detail()
    assert (detail["prefill_tokens"], detail["cached_prefill_tokens"], detail["decode_tokens"]) == (48, None, 10)
    assert detail["models"]["up"]["cached_prefill_tokens"] is None
    # one candidate that reports makes the model's numbers known (a lower bound where others did not)
    led.book_candidates("up", 9, [_cand(1, 0), _cand(1, None)])
    assert (u.of("up").cached_prefill_tokens, u.of("up").cached_prompt_tokens) == (0, 0)
    assert u.openai()["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_ledger_books_a_reads_engine_work_from_the_engine():
    target = FakeEngine("t")
    seq = list(range(65, 65 + 50))  # a 40-token prompt and draft, then a 10-token chunk to score
    led = Ledger(Budget(tokens=100))
    got = await target.prompt_logprobs(seq, start=40)
    assert isinstance(got, ReadResult) and len(got) == 10
    led.charge_read("t", 10, got, sent=len(seq), budget=False)  # billed: the chunk; read: all of it
    m = led.usage.of("t")
    assert (m.prompt_tokens, m.prefill_tokens, m.cached_prefill_tokens, m.cached_prompt_tokens) == (10, 50, 0, 0)
    assert (m.completion_tokens, m.decode_tokens, m.requests, led.tokens_spent) == (0, 0, 1, 0)
    # an engine that served the sequence's prefix from its cache: the bill's share is what lies past it
    led.charge_read("t", 10, ReadResult([0.0] * 10, prefill_tokens=50, cached_tokens=45, decode_tokens=1))
    assert (m.prompt_tokens, m.prefill_tokens, m.cached_prefill_tokens, m.cached_prompt_tokens) == (20, 100, 45, 5)
    assert (m.decode_tokens, led.tokens_spent) == (1, 10)
    # a read the deadline cut: what was sent counts, nothing cached is known; a plain list: as billed
    led.charge_read("t", 10, None, sent=50)
    led.charge_read("v", 7, [0.5])
    assert (m.prefill_tokens, m.cached_prefill_tokens, m.requests) == (150, 45, 3)
    v = led.usage.of("v")
    assert (v.prompt_tokens, v.prefill_tokens, v.cached_prefill_tokens, led.tokens_spent) == (7, 7, None, 27)


def test_the_fake_engine_caches_full_blocks_of_prompts_it_read():
    eng = FakeEngine("p", block_size=16)
    assert eng.read_prompt("a" * 40) == 0  # first read: nothing cached
    assert eng.read_prompt("a" * 40) == 32  # two full blocks; the third is not full
    assert eng.read_prompt("a" * 32) == 16  # never the prompt's last token: the second block is recomputed
    assert eng.read_prompt("a" * 16 + "b" * 24) == 16  # a shared first block only
    assert eng.read_prompt("b" * 40) == 0
    assert FakeEngine("q", prefix_cache=False).read_prompt("a" * 40) == 0


def test_run_context_has_no_writable_budget_numbers():
    c = _ctx(FakeEngine("p"), Budget(samples=3))
    for name in ("budget", "usage", "budget_tokens_used", "pending_scoring", "samples_used"):
        with pytest.raises(AttributeError):
            setattr(c, name, 1)


async def test_results_are_typed_and_name_the_budget_in_effect():
    pol = FakeEngine("p")
    c = _ctx(pol, Budget(samples=4))
    r = await get_strategy("majority").from_request({"stop_when_decided": False}).execute(c)
    assert isinstance(r, StrategyResult) and r.stop_reason is StopReason.COMPLETE
    assert r.samples_used == 4 == c.ledger.samples_used and r.budget == Budget(samples=4)
    assert r.answer == r.per_sample[r.selected_index]["answer"]
    assert r.info["stop_reason"] == "complete" and r.info["answer"] == r.answer
    # `auto` runs under an automatic budget; the request's own stays what it asked
    c = _ctx(pol, Budget(samples=6))
    r = await get_strategy("auto").from_request({"wave": 2}).execute(c)
    assert c.ledger.requested == Budget(samples=6) and r.budget is not None and r.budget.auto
    assert 1 <= r.samples_used <= 6


async def test_scorer_options_compose_and_confidence_kind_is_the_scorers():
    # the scorer's `confidence` (which DeepConf confidence) and the adaptive stop's
    # `confidence` (a probability) are different options: both can be set
    s = get_strategy("best_of_n").from_request(
        {"scorer": {"name": "confidence", "confidence": "tail", "confidence_window": 8}, "confidence": 0.9}
    )
    assert s.options.scorer.name == "confidence" and s.options.scorer.confidence == "tail"
    assert s.options.scorer.confidence_window == 8 and s.options.confidence == 0.9
    flat = get_strategy("weighted_majority").from_request({"scorer": "judge", "judge_model": "j"})
    assert flat.options.scorer.name == "judge" and flat.options.scorer.judge_model == "j"
    with pytest.raises(InvalidRequestError) as e:
        get_strategy("best_of_n").from_request({"scorer": {"name": "confidence", "confidence": 0.5}})
    assert e.value.param == "ttscale.scorer.confidence"
    # and the kind chosen is the kind used
    pol = FakeEngine("p")
    picks = {}
    for kind in ("tail", "mean"):
        r = (
            await get_strategy("best_of_n")
            .from_request({"samples": 6, "scorer": {"name": "confidence", "confidence": kind, "confidence_window": 4}})
            .run(_ctx(pol, Budget()))
        )
        picks[kind] = r.scores
    assert picks["tail"] != picks["mean"]


def _app():
    eng = FakeEngine("p", respond=lambda prompt, s: "step \\boxed{4}", tick_s=0.0)
    return create_app(ModelPool([eng]), manage_pool=False)


async def test_served_bodies_match_the_published_schema():
    app = _app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
        schema = (await h.get("/openapi.json")).json()
        chat = (
            await h.post(
                "/v1/chat/completions",
                json={
                    "model": "p",
                    "messages": Q,
                    "max_tokens": 16,
                    "logprobs": True,
                    "ttscale": {"strategy": "majority", "budget": {"samples": 3}, "return_samples": True},
                },
            )
        ).json()
        auto = (
            await h.post(
                "/v1/chat/completions",
                json={
                    "model": "p",
                    "messages": Q,
                    "max_tokens": 16,
                    "ttscale": {"strategy": "auto", "wave": 2, "budget": {"samples": 4}},
                },
            )
        ).json()
        cmpl = (await h.post("/v1/completions", json={"model": "p", "prompt": "q", "max_tokens": 8, "n": 2})).json()
    refs = {
        p: schema["paths"][p]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        for p in ("/v1/chat/completions", "/v1/completions")
    }
    assert refs == {
        "/v1/chat/completions": "#/components/schemas/ChatCompletionResponse",
        "/v1/completions": "#/components/schemas/CompletionResponse",
    }
    assert "TTScaleOut" in schema["components"]["schemas"]
    c = ChatCompletionResponse.model_validate(chat)
    assert c.ttscale.strategy == "majority" and c.ttscale.answer == "4" and len(c.ttscale.samples or []) == 3
    assert c.choices[0].logprobs is not None
    a = ChatCompletionResponse.model_validate(auto)
    assert a.ttscale.budget == {"samples": 4} and a.ttscale.budget_in_effect == {"samples": 4, "auto": True}
    t = CompletionResponse.model_validate(cmpl)
    assert [ch.index for ch in t.choices] == [0, 1] and t.ttscale.stop_reason == "complete"
