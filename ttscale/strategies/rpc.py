"""``perplexity_consistency``: RPC — perplexity consistency with reasoning pruning."""

from __future__ import annotations

import asyncio

from pydantic import Field

from ttscale.run import RunContext, StrategyResult
from ttscale.selection import rpc
from ttscale.strategies import register
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, Pool


class RPCOptions(ParallelOptions):
    prune: bool = True
    min_paths: int = Field(default=8, ge=2, description="fewer paths: no pruning")


@register
class PerplexityConsistency(ParallelStrategy[RPCOptions]):
    name = "perplexity_consistency"
    summary = "RPC: answer clusters scored by summed path probability, low-probability paths pruned"
    Options = RPCOptions

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        self.planned(ctx)
        stop_reason, cands, adapt = await self.draw(ctx, logprobs=0)
        pool = await Pool.build(cands)
        mean_lp = [c.mean_logprob if c.mean_logprob is not None else -1e9 for c in cands]
        r = await asyncio.to_thread(
            rpc, pool.clusters, mean_lp, [c.text for c in cands], prune=o.prune, min_paths=o.min_paths
        )
        return self.result(
            pool,
            r.representative,
            stop_reason=stop_reason,
            scores=mean_lp,
            cluster_scores=r.scores,
            extra={
                "pruned": [i for i, p in enumerate(r.pruned) if p],
                "confidence": round(float(r.confidence), 6) if r.confidence is not None else None,
                **adapt,
            },
        )
