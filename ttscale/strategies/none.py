"""``none``: plain sampling, ``n`` choices, no selection. The baseline every method is measured against."""

from __future__ import annotations

from ttscale.engine import CandidateEvent
from ttscale.errors import BudgetError
from ttscale.run import Choice, RunContext, StrategyOptions, StrategyResult
from ttscale.strategies import register
from ttscale.strategies.base import Sampler, Strategy


@register
class NoneStrategy(Strategy[StrategyOptions]):
    name = "none"
    summary = "plain sampling: n independent completions, returned as n choices"

    async def run(self, ctx: RunContext) -> StrategyResult:
        if ctx.budget.samples is not None and ctx.budget.samples < ctx.n:
            raise BudgetError(
                f"n={ctx.n} needs {ctx.n} samples but the budget allows {ctx.budget.samples}",
                param="ttscale.budget.samples",
            )
        sampler = Sampler(ctx)

        spelled: dict[int, int] = {}  # tokens each candidate's events so far carried

        async def forward(ev: CandidateEvent) -> None:
            n = spelled[id(ev.candidate)] = spelled.get(id(ev.candidate), 0) + ev.delta_tokens
            if ctx.on_delta is not None and ev.delta_text:
                await ctx.on_delta(sampler.candidates.index(ev.candidate), ev.delta_text, n)

        live = ctx.on_delta is not None  # the client streams: pass tokens on as they come
        cands = await sampler.run(ctx.settings.replicate(ctx.n), on_event=forward if live else None, stream=live)
        choices = [
            Choice(
                index=i, text=c.text, finish_reason="length" if c.aborted else (c.finish_reason or "stop"), candidate=c
            )
            for i, c in enumerate(cands)
        ]
        return StrategyResult(
            choices=choices,
            candidates=cands,
            stop_reason=sampler.stop_reason,
            selected_index=0 if cands else None,
            streamed=live,
            answers=False,
        )
