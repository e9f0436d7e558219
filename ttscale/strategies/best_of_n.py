"""``best_of_n``: K candidates, the best by a scorer wins (verifier by default)."""

from __future__ import annotations

from ttscale.scorers import ScorerOptions
from ttscale.strategies import register
from ttscale.strategies.base import RunContext, StrategyResult
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, best_by_score


class BestOfNOptions(ParallelOptions, ScorerOptions):
    pass


@register
class BestOfN(ParallelStrategy):
    name = "best_of_n"
    summary = "the highest-scoring of K candidates (verifier, logprob, confidence or judge)"
    Options = BestOfNOptions
    curve = "verifier_best_of"

    async def run(self, ctx: RunContext) -> StrategyResult:
        o: BestOfNOptions = self.options  # type: ignore[assignment]
        sampler, pool, scores, extra = await self.draw_scored(ctx, o)
        return self.result(ctx, sampler, pool, best_by_score(pool.cands, scores), scores=scores, extra=extra)
