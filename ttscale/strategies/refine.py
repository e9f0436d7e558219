"""``refine``: sequential refinement — draft, critique, revise, with the whole history in
context. Stops on the critique's signal (``stop_regex``; or a verifier's score when
``critic="verifier"``), on a stable answer (two iterates with the same extracted answer), on
``max_rounds``, or on the budget. Every round's tokens are counted."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator

from ttscale.answers import answer_key, extract_answer
from ttscale.engine import Candidate, SamplingSettings
from ttscale.errors import BudgetError, InvalidRequestError
from ttscale.run import JSON, Choice, RunContext, StopReason, StrategyOptions, StrategyResult
from ttscale.scorers import VerifierScorer
from ttscale.strategies import register
from ttscale.strategies.base import Sampler, Strategy

CRITIQUE_PROMPT = (
    "Review the answer above. List concrete errors or weaknesses and how to fix them. "
    "If it is already correct and complete, say 'It is correct.'"
)
REFINE_PROMPT = "Rewrite the answer, fixing every issue in the feedback. End with the final answer in \\boxed{}."
STOP_REGEX = r"(?i)\b(it is correct|no (further )?(issues|errors|changes))\b"


class RefineOptions(StrategyOptions):
    max_rounds: int = Field(default=2, ge=0, le=4, description="critique+revise rounds after the draft")
    critic: Literal["self", "verifier"] = "self"
    verifier: str | None = None
    verifier_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    stop_regex: str = Field(
        default=STOP_REGEX, max_length=1000, description="RE2 pattern: a critique that matches it ends the refinement"
    )
    stop_on_stable_answer: bool = True
    critique_prompt: str = CRITIQUE_PROMPT
    refine_prompt: str = REFINE_PROMPT
    critique_temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    critique_max_tokens: int = Field(default=256, ge=1)
    select: Literal["last", "best_scored"] = "last"

    @field_validator("stop_regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        compile_stop_regex(v)  # raises ValueError naming what RE2 did not take
        return v


def compile_stop_regex(pattern: str) -> Any:
    """A user's pattern compiled by RE2: linear-time matching, so no pattern can stall the server
    (Python's backtracking ``re`` can take exponential time, holding the interpreter lock).
    RE2 has no backreferences or lookaround."""
    import re2

    opts = re2.Options()
    opts.log_errors = False
    try:
        return re2.compile(pattern, opts)
    except re2.error as e:
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"not a regular expression RE2 takes: {msg}") from None


@register
class Refine(Strategy[RefineOptions]):
    name = "refine"
    summary = "sequential refinement: draft, critique, revise with the full history"
    Options = RefineOptions

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        stop_pattern = compile_stop_regex(o.stop_regex)
        if ctx.n != 1:
            raise InvalidRequestError("strategy 'refine' returns one answer; n must be 1", param="n")
        if not (isinstance(ctx.prompt, list) and ctx.prompt and isinstance(ctx.prompt[0], dict)):
            raise InvalidRequestError(
                "strategy 'refine' needs chat messages (/v1/chat/completions)", param="ttscale.strategy"
            )
        need_verifier = o.critic == "verifier" or o.select == "best_scored"
        verifier = (
            VerifierScorer(ctx.pool.get(o.verifier, role="score", param="ttscale.verifier")) if need_verifier else None
        )
        history: list[dict[str, Any]] = list(ctx.prompt)
        iterates: list[Candidate] = []
        rounds: list[dict[str, Any]] = []
        all_cands: list[Candidate] = []
        stop_reason = StopReason.MAX_ROUNDS
        seed = ctx.settings.seed
        calls = 0

        async def generate(messages: list[dict[str, Any]], settings: SamplingSettings) -> Candidate | None:
            nonlocal calls, stop_reason
            s = replace(settings, seed=None if seed is None else seed + calls)
            calls += 1
            sampler = Sampler(ctx, prompt=messages, scoring_cost=verifier.scoring_cost(ctx) if verifier else None)
            try:
                cands = await sampler.run([s])
            except InvalidRequestError as e:
                if e.code == "context_length_exceeded" and iterates:
                    stop_reason = StopReason.CONTEXT_LENGTH  # the history no longer fits the model
                    return None
                raise
            except BudgetError:
                if iterates:
                    stop_reason = StopReason.TOKEN_BUDGET
                    return None
                raise
            all_cands.extend(cands)
            if sampler.stop_reason != StopReason.COMPLETE or not cands or cands[0].aborted:
                stop_reason = sampler.stop_reason if sampler.stop_reason != StopReason.COMPLETE else StopReason.DEADLINE
                return None
            return cands[0]

        scores: list[float | None] = []

        async def judge(c: Candidate) -> float | None:
            if verifier is None:
                return None
            return (await verifier.score(ctx, [c]))[0]

        draft = await generate(history, ctx.settings)
        if draft is None:
            if stop_reason == StopReason.DEADLINE and all_cands and all_cands[-1].text:
                iterates.append(all_cands[-1])  # the draft the deadline cut is what exists
                scores.append(None)
            return self._result(
                ctx, iterates, all_cands, rounds, scores, StopReason.TOKEN_BUDGET if not all_cands else stop_reason
            )
        iterates.append(draft)
        scores.append(await judge(draft) if need_verifier else None)
        await ctx.progress({"type": "round", "round": 0, "answer": extract_answer(draft.text)})
        for r in range(o.max_rounds):
            current = iterates[-1]
            history = [*history, {"role": "assistant", "content": current.text}]
            if o.critic == "verifier":
                p = scores[-1]
                if p is None or not math.isfinite(p):  # the budget could not pay for the check
                    stop_reason = StopReason.TOKEN_BUDGET
                    break
                if p >= o.verifier_threshold:
                    stop_reason = StopReason.CRITIC_ACCEPTED
                    break
                feedback = (
                    f"A checker rates this answer {p:.2f} likely to be correct. Check every step and fix the mistakes."
                )
            else:
                crit = await generate(
                    [*history, {"role": "user", "content": o.critique_prompt}],
                    replace(
                        ctx.settings,
                        temperature=o.critique_temperature,
                        max_tokens=min(o.critique_max_tokens, ctx.settings.max_tokens),
                    ),
                )
                if crit is None:
                    break
                feedback = crit.text
                rounds.append({"round": r + 1, "critique": feedback})
                if stop_pattern.search(feedback):
                    stop_reason = StopReason.CRITIC_ACCEPTED
                    break
            history = [
                *history,
                {"role": "user", "content": o.critique_prompt},
                {"role": "assistant", "content": feedback},
                {"role": "user", "content": o.refine_prompt},
            ]
            revised = await generate(history, ctx.settings)
            if revised is None:
                break
            iterates.append(revised)
            scores.append(await judge(revised) if need_verifier else None)
            a_old, a_new = extract_answer(current.text), extract_answer(revised.text)
            await ctx.progress({"type": "round", "round": r + 1, "answer": a_new})
            if (
                o.stop_on_stable_answer
                and a_old is not None
                and a_new is not None
                # math-verify may take seconds: off the event loop
                and await asyncio.to_thread(_same_answer, a_old, a_new)
            ):
                stop_reason = StopReason.STABLE_ANSWER
                break
        return self._result(ctx, iterates, all_cands, rounds, scores, stop_reason)

    def _result(
        self,
        ctx: RunContext,
        iterates: list[Candidate],
        all_cands: list[Candidate],
        rounds: list[dict[str, Any]],
        scores: list[float | None],
        stop_reason: StopReason,
    ) -> StrategyResult:
        o = self.options
        chosen = None
        if iterates:
            chosen = len(iterates) - 1
            if o.select == "best_scored" and any(s is not None for s in scores):
                chosen = max(range(len(iterates)), key=lambda i: (scores[i] if scores[i] is not None else -1, i))
        c = iterates[chosen] if chosen is not None else None
        details: dict[str, JSON] = {
            "rounds": len(iterates) - 1 if iterates else 0,
            "iterates": [
                {"answer": extract_answer(it.text), "score": s if s is not None and math.isfinite(s) else None}
                for it, s in zip(iterates, scores)
            ],
            "critiques": [r["critique"] for r in rounds],
        }
        text = c.text if c is not None else ""
        return StrategyResult(
            choices=[Choice(0, text, "stop" if c is None else (c.finish_reason or "stop"), c)],
            candidates=all_cands,
            stop_reason=stop_reason,
            selected_index=all_cands.index(c) if c is not None else None,
            answer=extract_answer(c.text) if c is not None else None,
            per_sample=[{"role": "iterate" if x in iterates else "critique"} for x in all_cands],
            details=details,
        )


def _same_answer(a: str, b: str) -> bool:
    return answer_key(a) == answer_key(b)
