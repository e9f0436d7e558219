"""``majority`` (self-consistency) and ``weighted_majority`` (votes weighted by a scorer)."""

from __future__ import annotations

import math
from typing import Literal

from ttscale.run import RunContext, StrategyResult
from ttscale.selection import vote
from ttscale.strategies import register
from ttscale.strategies.parallel import AnswerTracker, ParallelOptions, ParallelStrategy, Pool, ScoredOptions, decided


class MajorityOptions(ParallelOptions):
    tie_break: Literal["logprob", "first"] = "logprob"
    stop_when_decided: bool = True


@register
class Majority(ParallelStrategy[MajorityOptions]):
    """Plurality of the extracted answers; answerless samples don't vote but count."""

    name = "majority"
    summary = "self-consistency: the most frequent answer (math-equivalence clusters)"
    Options = MajorityOptions

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        self.planned(ctx)

        def should_stop(tracker: AnswerTracker, remaining: int) -> bool:
            return decided(tracker.counts(), remaining)

        tracker = AnswerTracker()
        stop_reason, cands, adapt = await self.draw(
            ctx,
            logprobs=0 if o.tie_break == "logprob" else None,
            should_stop=should_stop if o.stop_when_decided else None,
            tracker=tracker,
        )
        pool = await Pool.build(cands, known=tracker.answers)
        v = vote(
            pool.clusters,
            tie_scores=[c.sum_logprob or 0.0 for c in cands] if o.tie_break == "logprob" else None,
            finish_order=[c.finished_at or math.inf for c in cands],
        )
        return self.result(
            pool,
            v.representative,
            stop_reason=stop_reason,
            cluster_scores=v.scores,
            extra={"vote_share": round(v.share, 6), **adapt},
        )


class WeightedOptions(ScoredOptions):
    pass


@register
class WeightedMajority(ParallelStrategy[WeightedOptions]):
    """Each answer's vote is the sum of its samples' scores (verifier P(correct) by default)."""

    name = "weighted_majority"
    summary = "votes weighted by a scorer (verifier, logprob, confidence or judge)"
    Options = WeightedOptions

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        stop_reason, pool, scores, extra = await self.draw_scored(ctx, o.scorer)
        cands = pool.cands
        weights = [math.exp(s) if o.scorer.name == "logprob" else max(float(s), 0.0) for s in scores]
        weights = [0.0 if not math.isfinite(w) else w for w in weights]
        v = vote(pool.clusters, weights, tie_scores=scores, finish_order=[c.finished_at or math.inf for c in cands])
        return self.result(
            pool,
            v.representative,
            stop_reason=stop_reason,
            scores=scores,
            cluster_scores=v.scores,
            extra={"vote_share": round(v.share, 6), **extra},
        )
