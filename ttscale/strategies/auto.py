"""``auto``: adaptive sampling in waves (see ttscale.adaptive), then the selection the budget
profile predicts is best for the request's estimated difficulty: majority vote or verifier
best-of (when a verifier is served)."""

from __future__ import annotations

import math

from ttscale.run import RunContext, StrategyResult
from ttscale.scorers import VerifierScorer
from ttscale.selection import vote
from ttscale.strategies import register
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, Pool, best_by_score


class AutoOptions(ParallelOptions):
    verifier: str | None = None


@register
class Auto(ParallelStrategy[AutoOptions]):
    name = "auto"
    summary = "adaptive waves; the profile picks vote or verifier selection by difficulty"
    Options = AutoOptions

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        if not (ctx.budget.auto or ctx.budget.target_accuracy is not None):
            ctx.ledger.adopt(ctx.budget.model_copy(update={"auto": True}))
        verifier = None
        if o.verifier is not None or any(e.role == "score" for e in ctx.pool):
            verifier = VerifierScorer(ctx.pool.get(o.verifier, role="score", param="ttscale.verifier"))
        stop_reason, cands, adapt = await self._adaptive(
            ctx, logprobs=0, scoring_cost=verifier.scoring_cost(ctx) if verifier else None
        )
        pool = await Pool.build(cands)
        k = len(cands)
        choice, why = "majority", "no profile"
        bucket = None
        if ctx.profile is not None:
            counts = pool.counts()
            answered = sum(c is not None for c in pool.clusters)
            bucket = ctx.profile.bucket_for(counts[0] / answered if answered and counts else 0.0)
        if bucket is not None:
            maj = bucket.accuracy("majority", k)
            ver = bucket.accuracy("verifier_best_of", k)
            if verifier is not None and ver is not None and (maj is None or ver > maj):
                choice, why = "best_of_n", f"profile bucket {bucket.name}: verifier {ver:.3f} > vote {maj}"
            else:
                why = f"profile bucket {bucket.name}: vote {maj} >= verifier {ver}"
        extra = {**adapt, "selection": choice, "selection_reason": why}
        if choice == "best_of_n" and verifier is not None:
            scores = await verifier.score(ctx, cands)
            return self.result(pool, best_by_score(cands, scores), stop_reason=stop_reason, scores=scores, extra=extra)
        if verifier is not None:  # reserved scoring not used: give it back
            cost = verifier.scoring_cost(ctx)
            ctx.ledger.release(sum(cost(c.num_tokens) for c in cands))
        v = vote(
            pool.clusters,
            tie_scores=[c.sum_logprob or 0.0 for c in cands],
            finish_order=[c.finished_at or math.inf for c in cands],
        )
        return self.result(pool, v.representative, stop_reason=stop_reason, cluster_scores=v.scores, extra=extra)
