"""The in-process vLLM adapter's log-prob path on a real engine (CPU, the embedded model):
log-probs read from vLLM's flat lists, and candidates streamed for their tokens and log-probs
only (no text until they end), give what vLLM's classic per-token dicts and a text stream give."""

from __future__ import annotations

import math

import pytest

from ttscale.engine import SamplingSettings

pytestmark = pytest.mark.vllm

PROMPT = "What is 12 + 30?"


async def test_flat_logprobs_and_token_only_streams_match_the_classic_path(monkeypatch):
    import ttscale.engine.vllm_engine as ve
    from ttscale.models import resolve_model

    eng = ve.VLLMEngine("p", resolve_model("ttscale-arith"))
    await eng.start()
    settings = [SamplingSettings(seed=11 + i, max_tokens=40, temperature=0.9, logprobs=5) for i in range(3)]
    flat: list[bool] = []
    orig = ve._to_params

    def spy(*a, **k):
        p = orig(*a, **k)
        flat.append(p.flat_logprobs)
        return p

    async def run(stream: bool, text: bool):
        live = []  # (text length, tokens so far) of each event before a candidate's end
        async with eng.fanout(PROMPT, settings, stream=stream, text=text) as fo:
            async for ev in fo:
                if not ev.finished:
                    live.append((len(ev.candidate.text), ev.candidate.num_tokens))
        return fo.candidates, live

    try:
        monkeypatch.setattr(ve, "_to_params", spy)
        tokens_only, live_tokens = await run(stream=True, text=False)
        texted, live_texted = await run(stream=True, text=True)
        final_only, _ = await run(stream=False, text=True)
        assert flat and all(flat)  # every candidate asked for flat log-probs

        def classic(*a, **k):  # vLLM's default: a dict of Logprob per position
            p = orig(*a, **k)
            p.flat_logprobs = False
            return p

        monkeypatch.setattr(ve, "_to_params", classic)
        reference, _ = await run(stream=True, text=True)
    finally:
        await eng.close()

    # streamed without text: tokens arrive, the text is written when the candidate ends
    assert live_tokens and all(n_text == 0 for n_text, _ in live_tokens)
    assert max(n for _, n in live_tokens) > 1
    assert any(n_text > 0 for n_text, _ in live_texted)
    for runs in zip(tokens_only, texted, final_only, reference):
        ref = runs[-1]
        assert ref.text and ref.token_ids and ref.finish_reason in ("stop", "length")
        for c in runs:
            assert c.token_ids == ref.token_ids
            assert c.text == ref.text
            assert c.finish_reason == ref.finish_reason
            assert len(c.logprobs) == len(c.top_logprobs) == len(ref.token_ids)
            assert c.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
            for row, ref_row in zip(c.top_logprobs, ref.top_logprobs):
                assert len(row) == 5 and all(isinstance(t, int) and math.isfinite(v) for t, v in row)
                assert isinstance(row, tuple)  # the garbage collector stops tracking it (test_gc.py)
                # best first; ties may come in either order
                assert [v for _, v in row] == sorted((v for _, v in row), reverse=True)
                mine = sorted(row, key=lambda tv: (-round(tv[1], 4), tv[0]))
                theirs = sorted(ref_row, key=lambda tv: (-round(tv[1], 4), tv[0]))
                assert [t for t, _ in mine] == [t for t, _ in theirs]
                assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-4)
            # the sampled token's log-prob is among the top 5 where the token is
            for tok, lp, row in zip(c.token_ids, c.logprobs, c.top_logprobs):
                if tok in dict(row):
                    assert dict(row)[tok] == pytest.approx(lp, abs=1e-4)
