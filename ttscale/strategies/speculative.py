"""Asynchronous speculative rejection (after Sun et al. 2024) and draft/target conformal
rejection (after ATTS, Xiong et al.).

``speculative_rejection``: N policy candidates start together. When a candidate reaches a
checkpoint its partial text is scored, and an online conformal test against the scores other
candidates had at that checkpoint decides, at rate α, whether it is among the weak ones: then it
is aborted in the engine (its work stops, its slot is freed for the survivors; its tokens stay
counted). No candidate waits for another. The best finished candidate by the same score wins.
What scores a partial candidate (``scorer``):

- ``verifier``: a scoring model reads (prompt, partial text); its reads are charged to the
  budget. Checkpoints default to 24, 48 and 96 tokens.
- ``confidence``: the policy's own confidence, with no read at all: the DeepConf confidence
  (Fu et al. 2025) of the candidate's first ``checkpoint`` tokens, from the top-k log-probs the
  engine streams with each token (``C_i = -mean(top-k log-probs)``, k = ``top_logprobs`` = 20),
  by default the lowest sliding-window group confidence (window ``confidence_window``; a prefix
  shorter than the window gives its mean token confidence). Partial and final score are one
  measure: once a prefix holds a full window, the trace's final lowest group confidence can
  only be lower (a partial score bounds the final one from above). Every candidate is judged on
  a prefix of exactly the checkpoint's length (the lowest group falls with length; streamed
  deltas may overshoot the checkpoint), so the scores one test compares are alike. DeepConf's
  online mode stops a trace whose window falls below a threshold set by warm-up traces; here
  the conformal test against the candidates ahead at the checkpoint plays that part, with no
  warm-up. (Self-truncation best-of-N, Wang et al. 2025, judges the early consistency of hidden
  states, which the engines' sampling does not expose; log-probs it does.) Checkpoints default
  to 0.1, 0.25 and 0.5 of the expected sample length: the first tokens' confidence says little,
  and a trace's expected length, not a fixed count, tells how early "early" is (DeepConf stops
  nothing before a full window of 2048 tokens, with max_tokens of 32k and more). Final
  selection: the highest confidence; ties go to the earlier launched candidate.

The default is the verifier when one is named or served, else confidence. ``checkpoints`` are
token counts, or fractions (all in (0, 1)) of the expected sample length L: the mean sample
length the model's budget profile measured (at most max_tokens), else the request's
max_tokens; fraction f is reached at ``ceil(f · L)`` tokens (``checkpoint_basis`` in the
result says which L).

``draft_target``: N independent chains. The draft writes a chunk; the target scores it by its
perplexity of the chunk (prompt log-probabilities, prefill only); an online conformal test at
rate α accepts it, or has the draft resample (up to r times), after which the target writes the
chunk itself. A chain ends at EOS, at a ``\\boxed{}`` answer, or at max_tokens; no chain waits for
another. The answer is chosen among the chains by the verifier (or by vote).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ttscale.answers import extract_answer
from ttscale.conformal import OnlineConformal
from ttscale.engine import Candidate, CandidateEvent, Engine
from ttscale.errors import BudgetError, InvalidRequestError
from ttscale.run import JSON, RunContext, StopReason, StrategyResult
from ttscale.scorers import ConfidenceScorer, ScorerOptions, VerifierScorer, compose_scorer, fit_budget
from ttscale.selection import vote
from ttscale.strategies import register
from ttscale.strategies.base import Sampler
from ttscale.strategies.parallel import ParallelOptions, ParallelStrategy, Pool, best_by_score


async def score_partial(ctx: RunContext, verifier: VerifierScorer, text: str) -> float | None:
    """Verifier score of a partial answer, if the token budget can pay for reading it."""
    p = (await verifier.inputs(ctx, [text]))[0]
    eng = verifier.engine
    cost = len(p) if eng.can_render else 0
    if not fit_budget(ctx, [cost], 0):
        return None
    got = await eng.score([p], request_id=f"{ctx.request_id}-partial")
    ctx.ledger.charge_read(eng.name, cost, got)
    return float(got[0])


VERIFIER_CHECKPOINTS = (24, 48, 96)  # tokens
CONFIDENCE_CHECKPOINTS = (0.1, 0.25, 0.5)  # fractions of the expected sample length


def resolve_checkpoints(checkpoints: Sequence[float], max_tokens: int) -> list[int]:
    """The token counts of ``checkpoints``: token counts stay as they are; fractions of
    ``max_tokens`` (all in (0, 1)) become the least count at which that share is written,
    ``ceil(f · max_tokens)``, at least 1. Distinct and ascending (on a short ``max_tokens``,
    fractions that reach the same count merge)."""
    if all(c < 1 for c in checkpoints):
        # 1e-9: a product that float arithmetic puts just above an integer (0.3 · 10) stays on it
        return sorted({max(1, math.ceil(f * max_tokens - 1e-9)) for f in checkpoints})
    return sorted({int(c) for c in checkpoints})


def expected_length(ctx: RunContext) -> tuple[int, str]:
    """The length a request's checkpoint fractions refer to, and where it comes from: the mean
    sample length the model's budget profile measured (``"profile"``; at most max_tokens), else
    the request's max_tokens (``"max_tokens"``)."""
    cap = ctx.settings.max_tokens
    t = ctx.profile.tokens_per_sample if ctx.profile is not None else None
    if t is not None and math.isfinite(t) and t >= 1:
        return min(cap, round(t)), "profile"
    return cap, "max_tokens"


class SpecRejOptions(ParallelOptions):
    samples: int = Field(default=16, ge=1, le=4096)
    alpha: float = Field(default=0.5, ge=0.0, lt=1.0, description="rejection rate at each checkpoint")
    checkpoints: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="where partial candidates are tested: token counts, or fractions (all in (0, 1)) of the expected "
        "sample length (the model's budget profile's mean, else max_tokens); default: [24, 48, 96] tokens with the "
        "verifier, [0.1, 0.25, 0.5] of the expected length with confidence",
    )
    min_survivors: int = Field(default=2, ge=1, description="never reject below this many live candidates")
    scorer: ScorerOptions = Field(
        default_factory=ScorerOptions,
        description="what scores a partial candidate: 'verifier' (a scoring model reads it) or 'confidence' (the "
        "policy's own top-k log-probs, no read); default: the verifier when one is named or served, else confidence",
    )

    @model_validator(mode="before")
    @classmethod
    def _compose(cls, raw: Any) -> Any:
        return compose_scorer(raw)

    @field_validator("checkpoints")
    @classmethod
    def _cps(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        counts = all(c >= 1 and c.is_integer() for c in v)
        if not (counts or all(0 < c < 1 for c in v)) or len(set(v)) != len(v):
            raise ValueError(
                "checkpoints must be distinct token counts (integers >= 1) or distinct fractions of the expected "
                "sample length (all in (0, 1)), not both"
            )
        return sorted(v)

    @field_validator("scorer")
    @classmethod
    def _partial_scorer(cls, v: ScorerOptions) -> ScorerOptions:
        if v.name not in ("verifier", "confidence"):
            raise ValueError(f"a partial candidate is scored by 'verifier' or 'confidence', not {v.name!r}")
        return v

    def scorer_for(self, ctx: RunContext) -> Literal["verifier", "confidence"]:
        """The scorer named, else the verifier where one is named or served, else confidence."""
        s = self.scorer
        if "name" in s.model_fields_set:
            return "confidence" if s.name == "confidence" else "verifier"
        if s.verifier is not None or any(e.role == "score" for e in ctx.pool):
            return "verifier"
        return "confidence"


@register
class SpeculativeRejection(ParallelStrategy[SpecRejOptions]):
    name = "speculative_rejection"
    summary = "best-of-N that aborts weak partial candidates early (verifier or own confidence + online conformal test)"
    Options = SpecRejOptions
    supports_auto = False
    # A candidate's checkpoint test uses the scores of those that reached the checkpoint before
    # it: no barrier, so the decisions depend on arrival order (the samples themselves are seeded).
    deterministic = False

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        k = self.planned(ctx)
        by = o.scorer_for(ctx)
        given = o.checkpoints or (VERIFIER_CHECKPOINTS if by == "verifier" else CONFIDENCE_CHECKPOINTS)
        length, basis = expected_length(ctx)
        cps = resolve_checkpoints(given, length)
        verifier: VerifierScorer | None = None
        confidence = ConfidenceScorer(o.scorer)
        settings = ctx.settings
        if by == "verifier":
            verifier = VerifierScorer(ctx.pool.get(o.scorer.verifier, role="score", param="ttscale.verifier"))
            sampler = Sampler(ctx, scoring_cost=verifier.scoring_cost(ctx), aborts_each=True)
        else:
            want = o.scorer.top_logprobs
            settings = replace(settings, logprobs=want if settings.logprobs is None else max(settings.logprobs, want))
            sampler = Sampler(ctx, aborts_each=True)  # nothing to reserve: log-probs come with the tokens
        seed = ctx.settings.seed
        tests = {cp: OnlineConformal(o.alpha, seed=None if seed is None else seed + cp) for cp in cps}
        next_cp: dict[int, int] = {}
        judging: set[asyncio.Task[None]] = set()
        rejected: list[Candidate] = []

        def alive() -> int:
            return sum(1 for c in sampler.candidates if not c.aborted)

        async def decide(c: Candidate, cp: int, s: float) -> None:
            # a rejected candidate runs on until its abort lands: a later checkpoint's judgement of
            # it (a verifier read already under way) is no decision
            if c.finished or c in rejected:
                return
            _, reject = tests[cp].test(-s)  # nonconformity: a low score is bad
            if reject and alive() > o.min_survivors and not c.finished:
                rejected.append(c)
                await sampler.abort(c)
                await ctx.progress({"type": "reject", "checkpoint": cp, "score": round(s, 4), "live": alive()})
            else:
                await ctx.progress({"type": "accept", "checkpoint": cp, "score": round(s, 4), "live": alive()})

        async def judge(v: VerifierScorer, c: Candidate, cp: int, text: str) -> None:
            s = await score_partial(ctx, v, text)
            if s is not None:
                await decide(c, cp, s)

        n_done = 0

        async def on_event(ev: CandidateEvent) -> None:
            nonlocal n_done
            c = ev.candidate
            if ev.finished:
                if not c.aborted:
                    n_done += 1
                    await ctx.progress(
                        {
                            "type": "sample",
                            "samples_done": n_done,
                            "samples_planned": k,
                            "tokens": c.num_tokens,
                            "live": alive(),
                        }
                    )
                return
            if c in rejected:
                return
            i = next_cp.get(id(c), 0)
            if i < len(cps) and c.num_tokens >= cps[i]:
                while i < len(cps) and c.num_tokens >= cps[i]:
                    i += 1
                next_cp[id(c)] = i
                cp = cps[i - 1]
                if verifier is None:
                    # the first cp tokens only: every candidate is judged on a prefix of one length
                    s = partial_confidence(confidence, c, cp)
                    if s is not None:
                        await decide(c, cp, s)
                    return
                t = asyncio.create_task(judge(verifier, c, cp, c.text))
                judging.add(t)
                t.add_done_callback(judging.discard)

        try:
            # the confidence reads log-probs only: no text while the candidates run
            cands = await sampler.run(settings.replicate(k), on_event=on_event, stream=True, text=verifier is not None)
        finally:
            for t in list(judging):
                t.cancel()
            await asyncio.gather(*judging, return_exceptions=True)
        pool = await Pool.build(cands)
        finished = [c for c in cands if not c.aborted]
        if verifier is not None:
            fscores = await verifier.score(ctx, finished) if finished else []
        else:
            fscores = [confidence.of(c) for c in finished]
        by_id = {id(c): s for c, s in zip(finished, fscores)}
        scores = [by_id.get(id(c), -math.inf) for c in cands]
        decisions = sum(t.decisions for t in tests.values())
        # rejected: the candidates a rejection stopped (one whose abort reached the engine after
        # its last step has finished, and is among the accepted)
        stopped = sum(1 for c in rejected if c.aborted)
        extra: dict[str, JSON] = {
            "scorer": by,
            "checkpoints": list(cps),
            **({"checkpoint_basis": {"from": basis, "tokens": length}} if all(c < 1 for c in given) else {}),
            "alpha": o.alpha,
            "accepted": len(finished),
            "rejected": stopped,
            "aborted": sum(1 for c in cands if c.aborted) - stopped,
            "decisions": decisions,
            "rejection_rate": round(stopped / decisions, 6) if decisions else 0.0,
            "checkpoint_stats": {
                str(cp): {"decisions": t.decisions, "rejections": t.rejections} for cp, t in tests.items()
            },
            "tokens_by_model": {n: m.completion_tokens + m.prompt_tokens for n, m in ctx.usage.models.items()},
        }
        # the verifier's ties go to the earlier finisher; confidence's to the earlier launched
        # candidate (identical traces score alike: the choice must not depend on timing)
        sel = best_by_score(cands, scores) if verifier is not None else best_in_order(scores)
        return self.result(pool, sel, stop_reason=sampler.stop_reason, scores=scores, extra=extra)


def partial_confidence(scorer: ConfidenceScorer, c: Candidate, tokens: int) -> float | None:
    """The confidence of the first ``tokens`` tokens of a running candidate (as the scorer
    measures a whole trace); None where the engine returned no top log-probs."""
    rows = (c.top_logprobs or [])[:tokens]
    return scorer.of_rows(rows) if rows else None


def best_in_order(scores: Sequence[float]) -> int | None:
    """Index of the highest score; ties (and unscored, -inf) go to the lower index."""
    if not scores:
        return None
    return min(range(len(scores)), key=lambda i: (-(scores[i] if math.isfinite(scores[i]) else -1e300), i))


class DraftTargetOptions(ParallelOptions):
    samples: int = Field(default=8, ge=1, le=1024, description="parallel chains")
    alpha: float = Field(default=0.4, ge=0.0, lt=1.0, description="rejection rate of draft chunks")
    chunk_tokens: int = Field(default=32, ge=1)
    target_chunk_tokens: int | None = Field(default=None, ge=1, description="default: chunk_tokens")
    max_resamples: int = Field(default=1, ge=0, le=8, description="r: draft resamples before the target writes")
    max_turns: int = Field(default=64, ge=1)
    draft: str | None = None
    target: str | None = Field(default=None, description="default: the request's model")
    verifier: str | None = None
    select: Literal["verifier", "vote"] = "verifier"
    draft_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    target_concurrency: int = Field(default=4, ge=1)


@dataclass
class _Chain:
    index: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    draft_tokens: int = 0
    target_tokens: int = 0
    accepted: int = 0
    rejected: int = 0
    takeovers: int = 0
    finish_reason: str | None = None
    finished_at: float | None = None
    cut: bool = False  # the deadline ended it


@register
class DraftTarget(ParallelStrategy[DraftTargetOptions]):
    name = "draft_target"
    summary = "a small draft writes chunks, the target checks their perplexity (online conformal) or takes over"
    Options = DraftTargetOptions
    supports_auto = False

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        n = self.planned(ctx)
        target = ctx.pool.get(o.target, role="generate", param="ttscale.target") if o.target else ctx.model
        if o.draft is None:
            drafts = [e for e in ctx.pool if e.role == "generate" and e is not target]
            if not drafts:
                raise InvalidRequestError(
                    "draft_target needs a draft model; none other is served", param="ttscale.draft"
                )
            draft = drafts[0]
        else:
            draft = ctx.pool.get(o.draft, role="generate", param="ttscale.draft")
        if not (target.can_render and draft.can_render):
            raise InvalidRequestError("draft_target needs local tokenizers for both models", param="ttscale.draft")
        prompt_ids = target.render(ctx.prompt)
        if draft.render(ctx.prompt) != prompt_ids:
            raise InvalidRequestError(
                f"draft {draft.name!r} and target {target.name!r} tokenize differently", param="ttscale.draft"
            )
        verifier = None
        if o.select == "verifier":
            verifier = VerifierScorer(ctx.pool.get(o.verifier, role="score", param="ttscale.verifier"))
        # Label-free calibration: every chain's first draft chunk is scored and accepted; their
        # perplexities form the calibration array, fixed from then on, so later decisions don't
        # depend on the order in which chains arrive.
        test = OnlineConformal(o.alpha, smoothed=False)  # continuous perplexities: ties are rare; order-free
        calibrated = asyncio.Event()
        first_chunks: dict[int, float] = {}
        target_sem = asyncio.Semaphore(o.target_concurrency)
        max_total = ctx.settings.max_tokens
        t_chunk = o.target_chunk_tokens or o.chunk_tokens
        base_seed = ctx.settings.seed
        calls = {"n": 0}
        chains = [_Chain(i) for i in range(n)]
        stop = {"reason": StopReason.COMPLETE}
        scored_span_tokens = 0

        async def gen(engine: Engine, ch: _Chain, limit: int, temperature: float) -> Candidate | None:
            """One chunk (a part of the chain's sample); at the deadline, the part written by then
            (its chain ends there); None when the token budget has no room left."""
            seed = None if base_seed is None else base_seed + 7919 * ch.index + calls["n"]
            calls["n"] += 1
            s = replace(ctx.settings, max_tokens=limit, temperature=temperature, seed=seed, logprobs=None)
            sampler = Sampler(ctx, engine, prompt_ids + ch.ids, counts_samples=False)
            got = await sampler.run([s])  # books every token, those of a chunk the deadline cut too
            if sampler.stop_reason == StopReason.DEADLINE:
                stop["reason"] = StopReason.DEADLINE
                ch.cut = True
            elif not got:
                stop["reason"] = StopReason.TOKEN_BUDGET
                return None
            return got[0] if got else None

        async def ppl(ch: _Chain, chunk: Candidate) -> float | None:
            nonlocal scored_span_tokens
            span = len(chunk.token_ids)
            if span == 0 or ch.cut:  # a chunk the deadline cut is kept as it is
                return 0.0
            if not ctx.ledger.reserve(span):
                stop["reason"] = StopReason.TOKEN_BUDGET
                return None
            seq = prompt_ids + ch.ids + list(chunk.token_ids)
            async with target_sem:
                try:
                    lps = await target.prompt_logprobs(
                        seq, start=len(prompt_ids) + len(ch.ids), request_id=f"{ctx.request_id}-p{ch.index}"
                    )
                except asyncio.CancelledError:  # cut by the deadline; the read may have run
                    ctx.ledger.charge_read(target.name, span, None, sent=len(seq), budget=False)
                    raise
            # billed: the chunk (reserved above); the engine's work: the whole sequence, read
            # again (vLLM reads a prompt whose log-probs are asked for without its prefix cache)
            ctx.ledger.charge_read(target.name, span, lps, sent=len(seq), budget=False)
            scored_span_tokens += span
            finite = [x for x in lps if math.isfinite(x)]
            return math.exp(-sum(finite) / len(finite)) if finite else math.inf

        def append(ch: _Chain, c: Candidate, by_target: bool) -> None:
            ch.ids.extend(c.token_ids)
            ch.text += c.text
            if by_target:
                ch.target_tokens += c.num_tokens
            else:
                ch.draft_tokens += c.num_tokens
            if c.finish_reason == "stop":
                ch.finish_reason = "stop"  # EOS or a stop string ended the chunk (not its length cap)

        async def run_chain(ch: _Chain) -> None:
            d_temp = ctx.settings.temperature if o.draft_temperature is None else o.draft_temperature
            for _turn in range(o.max_turns):
                room = max_total - len(ch.ids)
                if room <= 0:
                    ch.finish_reason = "length"
                    break
                chunk = None
                for attempt in range(o.max_resamples + 1):
                    c = await gen(draft, ch, min(o.chunk_tokens, room), d_temp)
                    if c is None:
                        return
                    if ch.cut:
                        append(ch, c, by_target=False)
                        return
                    score = await ppl(ch, c)
                    if score is None:
                        return
                    if not calibrated.is_set():  # this chain's first chunk: calibration
                        first_chunks[ch.index] = score
                        if len(first_chunks) == n:
                            test.calibrate([first_chunks[i] for i in sorted(first_chunks)])
                            calibrated.set()
                        reject = False
                    else:
                        _, reject = test.test(score, learn=False)
                    await ctx.progress(
                        {
                            "type": "chunk",
                            "chain": ch.index,
                            "ppl": round(score, 4),
                            "rejected": reject,
                            "attempt": attempt,
                        }
                    )
                    if not reject:
                        chunk = c
                        ch.accepted += 1
                        break
                    ch.rejected += 1
                if chunk is not None:
                    append(ch, chunk, by_target=False)
                else:
                    async with target_sem:
                        c = await gen(target, ch, min(t_chunk, room), ctx.settings.temperature)
                    if c is None:
                        return
                    ch.takeovers += 1
                    append(ch, c, by_target=True)
                    if ch.cut:
                        return
                if ch.finish_reason is not None or extract_answer(ch.text) is not None:
                    ch.finish_reason = ch.finish_reason or "stop"
                    break
                await calibrated.wait()  # only the first chunk waits: for the calibration array
            else:
                ch.finish_reason = "length"
            ch.finished_at = time.perf_counter()

        async def guarded(ch: _Chain) -> None:
            try:
                await run_chain(ch)
            finally:
                if not calibrated.is_set() and ch.index not in first_chunks:
                    first_chunks[ch.index] = math.nan  # a chain that ended early must not block the rest
                    if len(first_chunks) == n:
                        test.calibrate([v for _, v in sorted(first_chunks.items()) if math.isfinite(v)])
                        calibrated.set()

        tasks = [asyncio.create_task(guarded(ch)) for ch in chains]
        ctx.ledger.count_samples(n)
        try:
            # the chains' samplers end at the deadline themselves; this cuts a perplexity read
            await ctx.by_deadline(tasks)
        finally:
            for t in tasks:
                t.cancel()
        if ctx.ledger.deadline_cut:
            stop["reason"] = StopReason.DEADLINE
        elif not any(ch.ids for ch in chains):
            raise BudgetError("the budget does not allow a single chunk", param="ttscale.budget")

        cands = []
        for ch in chains:
            c = Candidate(
                index=ch.index,
                settings=ctx.settings,
                text=ch.text,
                token_ids=list(ch.ids),
                token_count=len(ch.ids),
                finish_reason=("abort" if ch.finish_reason is None else ch.finish_reason),  # type: ignore[arg-type]
                finished_at=ch.finished_at,
            )
            cands.append(c)
        pool = await Pool.build(cands)
        scores = None
        if verifier is not None:
            live = [c for c in cands if c.token_ids]
            got = await verifier.score(ctx, live, reserved=False)
            m = {id(c): s for c, s in zip(live, got)}
            scores = [m.get(id(c), -math.inf) for c in cands]
            sel = best_by_score(cands, scores)
        else:
            sel = vote(pool.clusters, finish_order=[c.finished_at or math.inf for c in cands]).representative
        stop_reason = stop["reason"]
        extra: dict[str, JSON] = {
            "alpha": o.alpha,
            "draft": draft.name,
            "target": target.name,
            "accepted": sum(ch.accepted for ch in chains),
            "rejected": sum(ch.rejected for ch in chains),
            "takeovers": sum(ch.takeovers for ch in chains),
            "calibration_chunks": sum(1 for v in first_chunks.values() if math.isfinite(v)),
            "decisions": test.decisions,  # conformal tests after calibration
            "rejection_rate": round(test.rejection_rate, 6),
            "tokens_by_model": {
                draft.name: sum(ch.draft_tokens for ch in chains),
                target.name: sum(ch.target_tokens for ch in chains),
                f"{target.name}:scored": scored_span_tokens,
            },
        }
        return self.result(pool, sel, stop_reason=stop_reason, scores=scores, extra=extra)
