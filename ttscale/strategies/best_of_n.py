"""``best_of_n``: K candidates, the best by a scorer wins (verifier by default)."""

from __future__ import annotations

from ttscale.run import RunContext, StrategyResult
from ttscale.strategies import register
from ttscale.strategies.parallel import ParallelStrategy, ScoredOptions, best_by_score


class BestOfNOptions(ScoredOptions):
    pass


@register
class BestOfN(ParallelStrategy[BestOfNOptions]):
    name = "best_of_n"
    summary = "the highest-scoring of K candidates (verifier, logprob, confidence or judge)"
    Options = BestOfNOptions
    curve = "verifier_best_of"

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        stop_reason, pool, scores, extra = await self.draw_scored(ctx, o.scorer)
        return self.result(pool, best_by_score(pool.cands, scores), stop_reason=stop_reason, scores=scores, extra=extra)
