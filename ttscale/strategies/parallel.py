"""Shared machinery of the parallel strategies: K candidates in one fan-out, answers
extracted and clustered by mathematical equivalence, one answer selected."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import Field

from ttscale.answers import cluster_answers, extract_answer
from ttscale.engine import Candidate, CandidateEvent
from ttscale.errors import InvalidRequestError
from ttscale.strategies.base import Choice, RunContext, Sampler, Strategy, StrategyOptions, StrategyResult

DEFAULT_SAMPLES = 8


class ParallelOptions(StrategyOptions):
    samples: int = Field(default=DEFAULT_SAMPLES, ge=1, le=4096,
                         description="K when the budget sets no sample count")


@dataclass
class Pool:
    """Candidates with their extracted answers and clusters."""

    cands: list[Candidate]
    answers: list[str | None] = field(default_factory=list)
    clusters: list[int | None] = field(default_factory=list)

    @classmethod
    async def build(cls, cands: Sequence[Candidate]) -> Pool:
        answers = [extract_answer(c.text) for c in cands]
        clusters = await asyncio.to_thread(cluster_answers, answers)
        return cls(list(cands), answers, clusters)

    def cluster_answer(self, cluster: int | None) -> str | None:
        if cluster is None:
            return None
        for a, c in zip(self.answers, self.clusters):
            if c == cluster:
                return a
        return None

    def distribution(self, scores: dict[int, float] | None = None) -> list[dict[str, Any]]:
        votes: dict[int, int] = {}
        for c in self.clusters:
            if c is not None:
                votes[c] = votes.get(c, 0) + 1
        rows = [{"answer": self.cluster_answer(c), "votes": n,
                 **({"score": round(float(scores.get(c, 0.0)), 6)} if scores is not None else {})}
                for c, n in votes.items()]
        key = (lambda r: (-r["score"], -r["votes"])) if scores is not None else (lambda r: -r["votes"])
        return sorted(rows, key=key)

    def counts(self) -> list[int]:
        votes: dict[int, int] = {}
        for c in self.clusters:
            if c is not None:
                votes[c] = votes.get(c, 0) + 1
        return sorted(votes.values(), reverse=True)


class ParallelStrategy(Strategy):
    Options = ParallelOptions

    def planned(self, ctx: RunContext) -> int:
        if ctx.n != 1:
            raise InvalidRequestError(f"strategy {self.name!r} returns one selected answer; n must be 1",
                                      param="n")
        return ctx.budget.samples or self.options.samples

    async def sample(self, ctx: RunContext, k: int, *, logprobs: int | None = None,
                     scoring_cost: Callable[[int], int] | None = None,
                     should_stop: Callable[[list[Candidate]], bool] | None = None,
                     settings: list | None = None) -> tuple[Sampler, list[Candidate]]:
        """Draw k candidates (one fan-out). ``should_stop(finished)`` is asked after each
        candidate finishes; True aborts the rest (stop reason ``early_stop``)."""
        base = ctx.settings
        if logprobs is not None:
            want = logprobs if base.logprobs is None else max(base.logprobs, logprobs)
            base = replace(base, logprobs=want)
        plan = settings if settings is not None else base.replicate(k)
        if logprobs is not None and settings is not None:
            plan = [replace(s, logprobs=base.logprobs) for s in plan]
        sampler = Sampler(ctx, scoring_cost=scoring_cost)
        finished: list[Candidate] = []

        async def on_event(ev: CandidateEvent) -> None:
            if not ev.finished:
                return
            finished.append(ev.candidate)
            await ctx.progress({"type": "sample", "samples_done": len(finished), "samples_planned": len(plan),
                                "tokens": ev.candidate.num_tokens,
                                "answer": extract_answer(ev.candidate.text)})
            if should_stop is not None and len(finished) < len(plan) and should_stop(finished):
                sampler.stop("early_stop")

        cands = await sampler.run(plan, on_event=on_event)
        return sampler, cands

    def result(self, ctx: RunContext, sampler: Sampler, pool: Pool, selected: int | None, *,
               scores: Sequence[float] | None = None, cluster_scores: dict[int, float] | None = None,
               extra: dict[str, Any] | None = None) -> StrategyResult:
        cands = pool.cands
        if selected is None:  # nothing answered: fall back to the first finished candidate
            done = [i for i, c in enumerate(cands) if not c.aborted] or list(range(len(cands)))
            selected = min(done, key=lambda i: (cands[i].finished_at or 0.0, i)) if done else None
        per = [{"answer": a, "cluster": cl, **({"score": _finite(s)} if scores is not None else {})}
               for a, cl, s in zip(pool.answers, pool.clusters, scores or [None] * len(cands))]
        info: dict[str, Any] = {
            "samples_used": len(cands), "stop_reason": sampler.stop_reason, "selected_index": selected,
            "answer": pool.answers[selected] if selected is not None else None,
            "answer_distribution": pool.distribution(cluster_scores),
            "answerless": sum(a is None for a in pool.answers),
            "per_sample": per,
        }
        if scores is not None:
            info["scores"] = [_finite(s) for s in scores]  # None: not scored (e.g. out of budget)
        info.update(extra or {})
        if selected is None:
            return StrategyResult(choices=[Choice(0, "", "stop")], info=info, candidates=cands)
        c = cands[selected]
        finish = "length" if c.aborted else (c.finish_reason or "stop")
        return StrategyResult(choices=[Choice(0, c.text, finish, c)], info=info, candidates=cands)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def decided(pool_counts: list[int], remaining: int) -> bool:
    """The leader cannot be caught by the samples still to come."""
    if not pool_counts:
        return False
    second = pool_counts[1] if len(pool_counts) > 1 else 0
    return pool_counts[0] > second + remaining
