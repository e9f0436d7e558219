"""``best_of_n``: K candidates, the best by a scorer wins (verifier by default)."""

from __future__ import annotations

from ttscale.scorers import ScorerOptions, make_scorer
from ttscale.strategies import register
from ttscale.strategies.base import RunContext, StrategyResult
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, Pool, best_by_score


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
        self.planned(ctx)
        scorer = make_scorer(o, ctx)
        sampler, cands, adapt = await self.draw(ctx, logprobs=scorer.logprobs,
                                                scoring_cost=scorer.scoring_cost(ctx))
        pool = await Pool.build(cands)
        scores = await scorer.score(ctx, cands)
        selected = best_by_score(cands, scores)
        return self.result(ctx, sampler, pool, selected, scores=scores, extra={"scorer": o.scorer, **adapt})
