"""The request path keeps CPU-heavy answer work off the event loop: math-verify parses and
comparisons run in worker threads, integer answers need none, and a vote is tracked
incrementally as samples finish (fake engine: fast and exact)."""

from __future__ import annotations

import threading

import pytest

import ttscale.answers as answers
from test_strategies import ctx, run, scripted
from ttscale.answers import AnswerClusters, cluster_answers, equivalent
from ttscale.engine import SamplingSettings
from ttscale.engine.fake import FakeEngine
from ttscale.engine.vllm_engine import detokenizes_in_engine


def test_two_different_integers_are_told_apart_without_math_verify(monkeypatch):
    calls = []  # (equivalent and answer_key swallow exceptions: record, do not raise)
    monkeypatch.setattr(answers._SYMBOLIC, "call", lambda op, *args: calls.append((op, args)))
    equivalent.cache_clear()
    answers.answer_key.cache_clear()
    assert not equivalent("51", "52") and not equivalent("1,000", "999")
    assert equivalent("051", "51") and equivalent("$7$", "7")
    c = AnswerClusters().extend(["18", "18", None, "20", "18.0", "$20$"])
    assert c.ids() == [0, 0, None, 1, 0, 1] and c.counts() == [3, 2]
    assert calls == []


def test_incremental_clusters_read_at_any_point_match_the_batch():
    seq = ["\\frac{1}{2}", "0.5", "3", None, "1/2", "x+1", "1+x", "3.0", "\\dfrac12"]
    inc = AnswerClusters()
    for i, a in enumerate(seq):
        inc.add(a)
        assert inc.ids() == cluster_answers(seq[: i + 1])
    assert inc.counts() == [4, 2, 2]


def test_cheap_means_integers_among_integers():
    c = AnswerClusters()
    assert c.is_cheap("12") and c.is_cheap(None)
    c.add("12")
    assert c.is_cheap("13") and not c.is_cheap("\\frac{1}{2}")
    c.add("\\sqrt{2}")
    assert not c.is_cheap("13")  # an integer against a symbolic answer needs math-verify


async def test_symbolic_answers_are_clustered_in_worker_threads(monkeypatch):
    where: list[str] = []
    real = AnswerClusters.add

    def spy(self, answer):
        where.append(threading.current_thread().name)
        return real(self, answer)

    monkeypatch.setattr(AnswerClusters, "add", spy)
    pol = FakeEngine("p", respond=scripted(["\\frac{1}{2}", "0.5", "\\sqrt{2}", "1/2"]))
    r = await run("majority", ctx(pol, samples=8), stop_when_decided=True)
    assert r.info["answer_distribution"][0]["votes"] >= 5
    tracked = where[: r.info["samples_used"]]  # the per-sample tracking (the final pool re-reads too)
    assert tracked and all(name != threading.main_thread().name for name in tracked), where


async def test_integer_votes_are_tracked_inline_and_stop_early(monkeypatch):
    where: list[str] = []
    real = AnswerClusters.add
    monkeypatch.setattr(
        AnswerClusters, "add", lambda self, a: (where.append(threading.current_thread().name), real(self, a))[1]
    )
    pol = FakeEngine("p", respond=scripted(["7"]), tick_s=0.001)
    r = await run("majority", ctx(pol, samples=16))
    assert where and set(where[:5]) == {threading.main_thread().name}
    assert r.info["answer"] == "7" and r.info["stop_reason"] == "early_stop"
    assert r.info["samples_used"] == 16 and any(s.finish_reason == "abort" for s in r.candidates)


@pytest.mark.parametrize(
    "stream,text,stop,expect",
    [
        (False, True, (), False),
        (True, True, (), True),
        (True, False, (), False),  # tokens and log-probs watched, no live text (deepconf, confidence)
        (False, True, ("\n\n",), True),
        (True, False, ("\n\n",), True),  # stop strings need the text
    ],
)
def test_engine_detokenizes_only_what_needs_live_text(stream, text, stop, expect):
    assert detokenizes_in_engine(SamplingSettings(stop=stop), stream=stream, text=text) is expect
