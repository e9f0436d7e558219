"""Shared machinery of the parallel strategies: K candidates in one fan-out, answers
extracted and clustered by mathematical equivalence, one answer selected."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from pydantic import Field, model_validator

from ttscale.answers import AnswerClusters, cluster_answers, extract_answer
from ttscale.engine import Candidate, CandidateEvent, SamplingSettings
from ttscale.errors import InvalidRequestError
from ttscale.run import JSON, Choice, RunContext, StopReason, StrategyOptions, StrategyResult
from ttscale.scorers import ScorerOptions, compose_scorer, make_scorer
from ttscale.strategies.base import Sampler, Strategy

DEFAULT_SAMPLES = 8


class ParallelOptions(StrategyOptions):
    samples: int = Field(default=DEFAULT_SAMPLES, ge=1, le=4096, description="K when the budget sets no sample count")
    # adaptive budgets ("budget": "auto" or {"target_accuracy": p}): see ttscale.adaptive
    wave: int = Field(default=4, ge=1, le=256, description="samples per wave (adaptive budgets)")
    max_samples: int = Field(default=32, ge=1, le=4096, description="adaptive cap without budget.samples")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0, description="Beta-rule stop threshold")
    token_cost: float = Field(default=1e-5, ge=0.0, description="accuracy one token is worth")
    schedule: Literal["async", "waves"] = Field(
        default="async",
        description="adaptive budgets: 'async' starts the samples at once and stops the rest when the rule "
        "fires (no added latency); 'waves' draws `wave` samples at a time (fewer wasted tokens on a loaded server)",
    )
    concurrency: int | None = Field(
        default=None, ge=1, le=4096, description="most samples of one request running at once (default: all)"
    )


class ScoredOptions(ParallelOptions):
    """Options of strategies that score their candidates (best-of-N, weighted votes)."""

    scorer: ScorerOptions = Field(
        default_factory=ScorerOptions, description="the scorer: a name, or its options with a `name`"
    )

    @model_validator(mode="before")
    @classmethod
    def _compose(cls, raw: Any) -> Any:
        return compose_scorer(raw)


class AnswerTracker:
    """The answers of a request's finished candidates, extracted and clustered as each one
    finishes (incrementally, in a worker thread: nothing CPU-heavy runs on the event loop)."""

    def __init__(self) -> None:
        self.clusters = AnswerClusters()
        self.answers: dict[int, str | None] = {}  # id(candidate) -> answer

    async def add(self, cand: Candidate) -> str | None:
        answer = extract_answer(cand.text)  # a few string scans
        if self.clusters.is_cheap(answer):  # integers among integers: microseconds, done here
            self.clusters.add(answer)
        else:  # math-verify parses and comparisons: a worker thread
            await asyncio.to_thread(self.clusters.add, answer)
        self.answers[id(cand)] = answer
        return answer

    def counts(self) -> list[int]:
        return self.clusters.counts()


@dataclass
class Pool:
    """Candidates with their extracted answers and clusters."""

    cands: list[Candidate]
    answers: list[str | None] = field(default_factory=list)
    clusters: list[int | None] = field(default_factory=list)

    @classmethod
    async def build(cls, cands: Sequence[Candidate], known: dict[int, str | None] | None = None) -> Pool:
        """Extract and cluster the answers of ``cands`` in a worker thread (math-verify is CPU
        work); ``known`` maps ``id(candidate)`` to an answer extracted already."""
        known = known or {}

        def work() -> tuple[list[str | None], list[int | None]]:
            answers = [known[id(c)] if id(c) in known else extract_answer(c.text) for c in cands]
            return answers, cluster_answers(answers)

        answers, clusters = await asyncio.to_thread(work)
        return cls(list(cands), answers, clusters)

    def cluster_answer(self, cluster: int | None) -> str | None:
        if cluster is None:
            return None
        for a, c in zip(self.answers, self.clusters):
            if c == cluster:
                return a
        return None

    def distribution(self, scores: dict[int, float] | None = None) -> list[JSON]:
        votes: dict[int, int] = {}
        for c in self.clusters:
            if c is not None:
                votes[c] = votes.get(c, 0) + 1
        rows = [
            {
                "answer": self.cluster_answer(c),
                "votes": n,
                **({"score": round(float(scores.get(c, 0.0)), 6)} if scores is not None else {}),
            }
            for c, n in votes.items()
        ]
        key = (lambda r: (-r["score"], -r["votes"])) if scores is not None else (lambda r: -r["votes"])
        return sorted(rows, key=key)

    def counts(self) -> list[int]:
        votes: dict[int, int] = {}
        for c in self.clusters:
            if c is not None:
                votes[c] = votes.get(c, 0) + 1
        return sorted(votes.values(), reverse=True)


PO = TypeVar("PO", bound=ParallelOptions)


class ParallelStrategy(Strategy[PO]):
    Options = ParallelOptions

    def planned(self, ctx: RunContext) -> int:
        if ctx.n != 1:
            raise InvalidRequestError(f"strategy {self.name!r} returns one selected answer; n must be 1", param="n")
        return ctx.budget.samples or self.options.samples

    async def sample(
        self,
        ctx: RunContext,
        k: int,
        *,
        logprobs: int | None = None,
        scoring_cost: Callable[[int], int] | None = None,
        should_stop: Callable[[AnswerTracker, int], bool] | None = None,
        settings: list[SamplingSettings] | None = None,
        tracker: AnswerTracker | None = None,
    ) -> tuple[Sampler, list[Candidate]]:
        """Draw k candidates (one fan-out). ``should_stop(tracker, remaining)`` is asked after
        each candidate finishes, its answer tracked; True aborts the rest (stop reason
        ``early_stop``). Answers are tracked only when something reads them (a stopping rule,
        a progress listener, or the caller's ``tracker``)."""
        base = ctx.settings
        if logprobs is not None:
            want = logprobs if base.logprobs is None else max(base.logprobs, logprobs)
            base = replace(base, logprobs=want)
        plan = settings if settings is not None else base.replicate(k)
        if logprobs is not None and settings is not None:
            plan = [replace(s, logprobs=base.logprobs) for s in plan]
        sampler = Sampler(ctx, scoring_cost=scoring_cost, max_live=self.options.concurrency)
        finished = 0
        if tracker is None and (should_stop is not None or ctx.on_progress is not None):
            tracker = AnswerTracker()

        async def on_event(ev: CandidateEvent) -> None:
            nonlocal finished
            if not ev.finished:
                return
            finished += 1
            if tracker is None:
                return
            answer = await tracker.add(ev.candidate)
            await ctx.progress(
                {
                    "type": "sample",
                    "samples_done": finished,
                    "samples_planned": len(plan),
                    "tokens": ev.candidate.num_tokens,
                    "answer": answer,
                }
            )
            if should_stop is not None and finished < len(plan) and should_stop(tracker, len(plan) - finished):
                sampler.stop(StopReason.EARLY_STOP)

        cands = await sampler.run(plan, on_event=on_event)
        return sampler, cands

    supports_auto = True
    curve = "majority"  # the profile curve that predicts this strategy's accuracy

    async def draw(
        self,
        ctx: RunContext,
        *,
        logprobs: int | None = None,
        scoring_cost: Callable[[int], int] | None = None,
        should_stop: Callable[[AnswerTracker, int], bool] | None = None,
        tracker: AnswerTracker | None = None,
    ) -> tuple[StopReason, list[Candidate], dict[str, JSON]]:
        """The request's candidates: K in one fan-out, or waves under an adaptive budget."""
        if not (ctx.budget.auto or ctx.budget.target_accuracy is not None):
            sampler, cands = await self.sample(
                ctx,
                self.planned(ctx),
                logprobs=logprobs,
                scoring_cost=scoring_cost,
                should_stop=should_stop,
                tracker=tracker,
            )
            return sampler.stop_reason, cands, {}
        return await self._adaptive(ctx, logprobs=logprobs, scoring_cost=scoring_cost)

    async def draw_scored(
        self,
        ctx: RunContext,
        opts: ScorerOptions,
    ) -> tuple[StopReason, Pool, list[float], dict[str, JSON]]:
        """Draw the candidates and score them with the scorer of ``opts``."""
        self.planned(ctx)
        scorer = make_scorer(opts, ctx)
        stop_reason, cands, adapt = await self.draw(
            ctx, logprobs=scorer.logprobs, scoring_cost=scorer.scoring_cost(ctx)
        )
        pool = await Pool.build(cands)
        return stop_reason, pool, await scorer.score(ctx, cands), {"scorer": opts.name, **adapt}

    async def _adaptive(
        self, ctx: RunContext, *, logprobs: int | None, scoring_cost: Callable[[int], int] | None
    ) -> tuple[StopReason, list[Candidate], dict[str, JSON]]:
        """Samples under an adaptive budget: after each sample (``async``) or wave (``waves``)
        the stopping rule of :mod:`ttscale.adaptive` decides whether more are worth their cost."""
        from ttscale.adaptive import Decision, decide

        o = self.options
        if ctx.n != 1:
            raise InvalidRequestError(f"strategy {self.name!r} returns one selected answer; n must be 1", param="n")
        cap = ctx.budget.samples or o.max_samples
        planned = ctx.budget.samples or o.samples
        target = ctx.budget.target_accuracy
        confidence = max(o.confidence, target) if target is not None else o.confidence
        profile = ctx.profile
        base = (
            ctx.settings
            if logprobs is None
            else replace(
                ctx.settings,
                logprobs=logprobs if ctx.settings.logprobs is None else max(ctx.settings.logprobs, logprobs),
            )
        )
        cands: list[Candidate] = []
        sampler: Sampler | None = None
        stop_reason, waves = StopReason.SAMPLE_BUDGET, 0
        decision: Decision | None = None
        if o.schedule == "async":
            tracker = AnswerTracker()
            done: list[Candidate] = []
            sampler = Sampler(ctx, scoring_cost=scoring_cost, max_live=o.concurrency)
            live_sampler = sampler

            async def on_event(ev: CandidateEvent) -> None:
                nonlocal decision
                if not ev.finished or ev.candidate.aborted:
                    return
                done.append(ev.candidate)
                answer = await tracker.add(ev.candidate)
                answered = sum(a is not None for a in tracker.answers.values())
                d = decide(
                    tracker.counts(),
                    answered,
                    len(done),
                    wave=1,  # the next sample
                    profile=profile,
                    curve=self.curve,
                    confidence=confidence,
                    target=target,
                    tokens_per_sample=(sum(c.num_tokens for c in done) / len(done))
                    or (profile.tokens_per_sample if profile else 0)
                    or 0,
                    token_cost=o.token_cost,
                )
                decision = d
                await ctx.progress(
                    {
                        "type": "sample",
                        "samples_done": len(done),
                        "answer": answer,
                        "p_major": round(d.p_major, 4),
                        "difficulty": d.bucket,
                        "stop": d.stop,
                    }
                )
                if d.stop and len(done) < cap:
                    live_sampler.stop(StopReason(d.reason or StopReason.EARLY_STOP))

            cands = await sampler.run(base.replicate(cap), on_event=on_event)
            if sampler.stop_reason != StopReason.COMPLETE:
                stop_reason = sampler.stop_reason
        while o.schedule == "waves" and len(cands) < cap:
            w = min(o.wave, cap - len(cands))
            sampler, got = await self.sample(
                ctx, w, settings=base.replicate(w, first_index=len(cands)), scoring_cost=scoring_cost
            )
            cands.extend(got)
            waves += 1
            if sampler.stop_reason != StopReason.COMPLETE:
                stop_reason = sampler.stop_reason
                break
            pool = await Pool.build(cands)
            answered = sum(c is not None for c in pool.clusters)
            tps = (sum(c.num_tokens for c in cands) / len(cands)) if cands else 0.0
            decision = decide(
                pool.counts(),
                answered,
                len(cands),
                wave=o.wave,
                profile=profile,
                curve=self.curve,
                confidence=confidence,
                target=target,
                tokens_per_sample=tps or (profile.tokens_per_sample if profile else 0) or 0,
                token_cost=o.token_cost,
            )
            await ctx.progress(
                {
                    "type": "wave",
                    "wave": waves,
                    "samples_done": len(cands),
                    "p_major": round(decision.p_major, 4),
                    "difficulty": decision.bucket,
                    "stop": decision.stop,
                }
            )
            if decision.stop:
                stop_reason = StopReason(decision.reason or StopReason.EARLY_STOP)
                break
        finished = [c for c in cands if not c.aborted] or cands
        tps = (sum(c.num_tokens for c in finished) / len(finished)) if finished else 0.0
        tokens_planned = round(planned * tps)
        tokens_used = sum(c.num_tokens for c in cands)
        info: dict[str, JSON] = {
            "adaptive": {
                "schedule": o.schedule,
                "samples_finished": sum(1 for c in cands if not c.aborted),
                "waves": waves,
                "wave_size": o.wave,
                "samples_planned": planned,
                "samples_cap": cap,
                "tokens_planned": tokens_planned,
                "tokens_used": tokens_used,
                "difficulty": None
                if decision is None
                else {
                    "bucket": decision.bucket,
                    "p1_estimate": round(decision.p1_estimate, 4),
                    "p_major": round(decision.p_major, 6),
                    "predicted_accuracy": decision.predicted_accuracy,
                    "marginal_gain": decision.gain,
                    "wave_cost": decision.cost,
                },
                "profile": getattr(profile, "source", None) or None,
            }
        }
        info["tokens_saved"] = max(0, tokens_planned - tokens_used)
        return stop_reason, cands, info

    def result(
        self,
        pool: Pool,
        selected: int | None,
        *,
        stop_reason: StopReason,
        scores: Sequence[float] | None = None,
        cluster_scores: dict[int, float] | None = None,
        extra: dict[str, JSON] | None = None,
    ) -> StrategyResult:
        cands = pool.cands
        if selected is None:  # nothing answered: fall back to the first finished candidate
            done = [i for i, c in enumerate(cands) if not c.aborted] or list(range(len(cands)))
            selected = min(done, key=lambda i: (cands[i].finished_at or 0.0, i)) if done else None
        finite = [_finite(s) for s in scores] if scores is not None else None
        per: list[dict[str, JSON]] = [
            {"answer": a, "cluster": cl, **({"score": finite[i]} if finite is not None else {})}
            for i, (a, cl) in enumerate(zip(pool.answers, pool.clusters))
        ]
        details: dict[str, JSON] = {
            "answer_distribution": pool.distribution(cluster_scores),
            "answerless": sum(a is None for a in pool.answers),
            **(extra or {}),
        }
        answer = pool.answers[selected] if selected is not None else None
        if selected is None:
            choices = [Choice(0, "", "stop")]
        else:
            c = cands[selected]
            choices = [Choice(0, c.text, "length" if c.aborted else (c.finish_reason or "stop"), c)]
        return StrategyResult(
            choices=choices,
            candidates=cands,
            stop_reason=stop_reason,
            selected_index=selected,
            answer=answer,
            scores=finite,
            per_sample=per,
            details=details,
        )


def best_by_score(cands: Sequence[Candidate], scores: Sequence[float]) -> int | None:
    """Index of the highest score; ties (and unscored, -inf) go to the earlier finisher, then
    the lower index."""
    if not cands:
        return None
    return min(
        range(len(cands)),
        key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -1e300), cands[i].finished_at or math.inf, i),
    )


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def decided(pool_counts: list[int], remaining: int) -> bool:
    """The leader cannot be caught by the samples still to come."""
    if not pool_counts:
        return False
    second = pool_counts[1] if len(pool_counts) > 1 else 0
    return pool_counts[0] > second + remaining
