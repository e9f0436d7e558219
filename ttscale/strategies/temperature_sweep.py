"""``temperature_sweep``: the sample budget split over a temperature grid; per-temperature
answer pools; early exit when every temperature is confident and all agree (multi-temperature
voting); otherwise the full budget and a vote over the union (or a verifier)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from ttscale.engine import Candidate, SamplingSettings
from ttscale.run import JSON, RunContext, StopReason, StrategyResult
from ttscale.scorers import VerifierScorer
from ttscale.selection import multi_temperature_exit, vote
from ttscale.strategies import register
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, Pool, best_by_score


class SweepOptions(ParallelOptions):
    samples: int = Field(default=24, ge=1, le=4096)
    temperatures: list[float] = Field(default_factory=lambda: [0.4, 0.7, 1.0], min_length=1, max_length=32)
    round_size: int = Field(default=8, ge=1, description="samples per temperature per round")
    min_per_temperature: int = Field(default=8, ge=1, description="no exit decision before this")
    share: float = Field(default=0.8, gt=0.0, le=1.0, description="majority share that makes a temperature confident")
    early_exit: bool = True
    select: Literal["vote", "verifier"] = "vote"
    verifier: str | None = None

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        if any(t < 0 or t > 2 for t in v):
            raise ValueError("temperatures must lie in [0, 2]")
        if len(set(v)) != len(v):
            raise ValueError("temperatures must be distinct")
        return v


@register
class TemperatureSweep(ParallelStrategy[SweepOptions]):
    name = "temperature_sweep"
    summary = "samples spread over a temperature grid, multi-temperature vote with early exit"
    Options = SweepOptions
    supports_auto = False  # it has its own early exit

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        k = self.planned(ctx)
        temps = o.temperatures
        # Per-temperature quotas: uniform split; greedy (T=0) is deterministic, one sample is enough.
        quota = {t: 0 for t in temps}
        left = k
        if 0.0 in quota:
            quota[0.0] = 1
            left -= 1
        hot = [t for t in temps if t > 0] or temps
        for i in range(max(left, 0)):
            quota[hot[i % len(hot)]] += 1
        seed = ctx.settings.seed
        plan_all: list[list[SamplingSettings]] = []
        drawn = {t: 0 for t in temps}
        # round r: up to round_size more samples of every temperature
        while any(drawn[t] < quota[t] for t in temps):
            round_plan: list[SamplingSettings] = []
            for t in temps:
                m = min(o.round_size, quota[t] - drawn[t])
                for _ in range(m):
                    idx = len(plan_all) + len(round_plan)
                    round_plan.append(replace(ctx.settings, temperature=t, seed=None if seed is None else seed + idx))
                drawn[t] += m
            plan_all.append(round_plan)

        scorer = (
            VerifierScorer(ctx.pool.get(o.verifier, role="score", param="ttscale.verifier"))
            if o.select == "verifier"
            else None
        )
        cost = scorer.scoring_cost(ctx) if scorer else None
        all_cands: list[Candidate] = []
        stop_reason = StopReason.COMPLETE
        exited = None
        for r, round_plan in enumerate(plan_all):
            sampler, cands = await self.sample(ctx, len(round_plan), settings=round_plan, scoring_cost=cost, logprobs=0)
            all_cands.extend(cands)
            stop_reason = sampler.stop_reason
            if stop_reason != StopReason.COMPLETE:
                break
            if o.early_exit and r + 1 < len(plan_all):
                pool = await Pool.build(all_cands)
                pools: dict[float, list[int | None]] = {t: [] for t in temps}
                for c, cl in zip(all_cands, pool.clusters):
                    pools[c.settings.temperature].append(cl)
                exited = multi_temperature_exit(
                    {t: p for t, p in pools.items() if t > 0 or len(temps) == 1},
                    share=o.share,
                    min_per_temperature=o.min_per_temperature,
                )
                await ctx.progress(
                    {"type": "round", "round": r, "samples_done": len(all_cands), "early_exit": exited is not None}
                )
                if exited is not None:
                    stop_reason = StopReason.EARLY_STOP
                    break
        pool = await Pool.build(all_cands)
        per_t = {str(t): sum(1 for c in all_cands if c.settings.temperature == t) for t in temps}
        extra: dict[str, JSON] = {"temperatures": per_t, "planned_samples": k}
        if scorer is not None:
            scores = await scorer.score(ctx, all_cands)
            return self.result(
                pool, best_by_score(all_cands, scores), stop_reason=stop_reason, scores=scores, extra=extra
            )
        v = vote(
            pool.clusters,
            tie_scores=[c.sum_logprob or 0.0 for c in all_cands],
            finish_order=[c.finished_at or math.inf for c in all_cands],
        )
        return self.result(pool, v.representative, stop_reason=stop_reason, cluster_scores=v.scores, extra=extra)
