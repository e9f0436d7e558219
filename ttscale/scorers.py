"""Scorers: how best-of-N and weighted votes rate a candidate. Pluggable by name.

- ``verifier``: a reward / classification model on the engine's pooling path reads
  (prompt, candidate) rendered with its chat template; its score is P(correct).
- ``logprob``: the candidate's mean token log-probability (free: comes with sampling).
- ``confidence``: DeepConf confidence from the top-k log-probs of each generated token
  (lowest sliding-window group confidence by default).
- ``judge``: LLM-as-a-judge: a named generating model is asked whether the candidate is
  correct; the score is P(yes) / (P(yes) + P(no)) from its first token's top log-probs.

Scorer tokens (verifier and judge inputs, judge outputs) are booked in usage and charged to
the token budget; the sampler reserves them up front with ``scoring_cost``.
"""

from __future__ import annotations

import abc
import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from ttscale.engine import Candidate, Engine, PromptInput, SamplingSettings
from ttscale.errors import InvalidRequestError
from ttscale.run import RunContext, StrategyOptions

ScorerName = Literal["verifier", "logprob", "confidence", "judge"]

JUDGE_TEMPLATE = (
    "Problem:\n{problem}\n\nProposed solution:\n{solution}\n\nIs the proposed solution correct? Answer yes or no."
)


class ScorerOptions(StrategyOptions):
    """Which scorer rates the candidates and how: the ``scorer`` field of a scoring strategy's
    options. A request may give just its name (``"scorer": "judge"``); the scorer's settings
    may also sit beside it at the top of the ``ttscale`` object (``"verifier": "v"``)."""

    name: ScorerName = "verifier"
    verifier: str | None = Field(default=None, description="scoring model (default: the first served)")
    judge_model: str | None = Field(default=None, description="judge model (default: the policy)")
    logprob: Literal["mean", "min", "sum"] = Field(
        default="mean", description="logprob scorer: mean token log-prob, the least likely token, or the sum"
    )
    confidence: Literal["lowest_group", "bottom_10", "tail", "mean"] = Field(
        default="lowest_group", description="confidence scorer: which DeepConf confidence"
    )
    confidence_window: int = Field(default=2048, ge=1)
    top_logprobs: int = Field(default=20, ge=1, le=20)


# the scorer's settings a request may give at the top level of its ``ttscale`` object
# (``confidence`` is not one of them: there it is the adaptive stop's threshold)
FLAT_SCORER_KEYS = ("verifier", "judge_model", "logprob", "confidence_window", "top_logprobs")


def compose_scorer(raw: Any) -> Any:
    """The ``before`` validator of options with a ``scorer`` field: a name becomes the scorer's
    options; the flat scorer keys beside it move in."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    spec = out.get("scorer", {})
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        spec = dict(spec)
        for k in FLAT_SCORER_KEYS:
            if k in out:
                spec.setdefault(k, out.pop(k))
        out["scorer"] = spec
    return out


def problem_text(prompt: PromptInput, policy: Engine) -> str:
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], int):
        tok = getattr(policy, "tokenizer", None)
        return tok.decode(prompt) if tok is not None else ""
    users = [str(m["content"]) for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def with_answer(prompt: PromptInput, policy: Engine, text: str) -> PromptInput:
    """The conversation with ``text`` as the assistant's answer (what a verifier reads)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return [*prompt, {"role": "assistant", "content": text}]
    if isinstance(prompt, str):
        return prompt + text
    return problem_text(prompt, policy) + text  # token ids: decoded with the policy's tokenizer


class Scorer(abc.ABC):
    name: str
    logprobs: int | None = None  # what sampling must request for this scorer

    def scoring_cost(self, ctx: RunContext) -> Callable[[int], int] | None:
        return None

    @abc.abstractmethod
    async def score(self, ctx: RunContext, cands: Sequence[Candidate]) -> list[float]: ...


class LogprobScorer(Scorer):
    """The policy's own probability of what it wrote: ``mean`` token log-prob (length-fair),
    ``min`` (the least likely token: one slip in a chain of steps shows up here), or ``sum``."""

    name = "logprob"
    logprobs = 0

    def __init__(self, how: str = "mean"):
        self.how = how

    async def score(self, ctx: RunContext, cands: Sequence[Candidate]) -> list[float]:
        out = []
        for c in cands:
            lps = [x for x in (c.logprobs or []) if math.isfinite(x)]
            if not lps:
                out.append(-math.inf)
            elif self.how == "min":
                out.append(min(lps))
            elif self.how == "sum":
                out.append(sum(lps))
            else:
                out.append(sum(lps) / len(lps))
        return out


class ConfidenceScorer(Scorer):
    name = "confidence"

    def __init__(self, opts: ScorerOptions):
        self.logprobs = opts.top_logprobs
        self.kind = opts.confidence
        self.window = opts.confidence_window

    def of(self, c: Candidate) -> float:
        return self.of_rows(c.top_logprobs or [])

    def of_rows(self, rows: Sequence[Sequence[tuple[int | str, float]]]) -> float:
        """The confidence of a trace from its top log-probs (one row of (token, log-prob) per
        token); -inf without any (the engine returned none)."""
        from ttscale import selection as S

        if not rows:
            return -math.inf
        conf = S.candidate_confidence(rows, k=self.logprobs or 20)
        if self.kind == "lowest_group":
            return float(S.lowest_group_confidence(conf, self.window))
        if self.kind == "bottom_10":
            return float(S.bottom_fraction_confidence(conf, self.window, 0.1))
        if self.kind == "tail":
            return float(S.tail_confidence(conf, self.window))
        return float(S.mean_confidence(conf))

    async def score(self, ctx: RunContext, cands: Sequence[Candidate]) -> list[float]:
        return [self.of(c) for c in cands]


class VerifierScorer(Scorer):
    name = "verifier"

    def __init__(self, engine: Engine):
        self.engine = engine

    async def inputs(self, ctx: RunContext, texts: Sequence[str]) -> list[PromptInput]:
        """What the verifier reads for each text: (prompt, text) rendered by its own template, once
        (in a worker thread), as token ids; an upstream verifier gets the conversation."""
        convs: list[PromptInput] = [with_answer(ctx.prompt, ctx.model, t) for t in texts]
        return await render_all(self.engine, convs, add_generation_prompt=False)

    def scoring_cost(self, ctx: RunContext) -> Callable[[int], int]:
        base = ctx.prompt_tokens()
        # Same tokenizer for policy and verifier in the embedded family; a margin covers others.
        return lambda t: int(1.25 * (base + t)) + 16

    async def score(self, ctx: RunContext, cands: Sequence[Candidate], *, reserved: bool = True) -> list[float]:
        """Scores of ``cands``; ``reserved``: the sampler held back their scoring cost."""
        if not cands:
            return []
        inputs = await self.inputs(ctx, [c.text for c in cands])
        costs = [len(p) if self.engine.can_render else 0 for p in inputs]
        released = sum(self.scoring_cost(ctx)(c.num_tokens) for c in cands) if reserved else 0
        keep = fit_budget(ctx, costs, released)
        scores = [-math.inf] * len(cands)  # a candidate the budget cannot score is never preferred
        # one read per candidate: what the deadline leaves unread stays unscored (-inf)
        got = await ctx.by_deadline(
            [self.engine.score([inputs[i]], request_id=f"{ctx.request_id}-verify{i}") for i in keep]
        )
        for i, v in zip(keep, got):
            if v is not None:
                scores[i] = v[0]
            # a read the deadline cut may have been prefilled: its prompt is counted as spent
            ctx.ledger.charge_read(self.engine.name, costs[i], v)
        ctx.ledger.release(released)
        return scores


class JudgeScorer(Scorer):
    name = "judge"

    def __init__(self, engine: Engine, template: str = JUDGE_TEMPLATE):
        self.engine = engine
        self.template = template

    def _prompt(self, ctx: RunContext, text: str) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": self.template.format(problem=problem_text(ctx.prompt, ctx.model), solution=text),
            }
        ]

    def scoring_cost(self, ctx: RunContext) -> Callable[[int], int]:
        base = ctx.model.count_tokens(self._prompt(ctx, "")) if ctx.model.can_render else 0
        return lambda t: int(1.25 * (base + t)) + 17  # prompt + one judged token

    async def score(self, ctx: RunContext, cands: Sequence[Candidate]) -> list[float]:
        settings = [SamplingSettings(temperature=0.0, max_tokens=1, logprobs=20)]
        tok = getattr(self.engine, "tokenizer", None)
        cost = self.scoring_cost(ctx)
        released = sum(cost(c.num_tokens) for c in cands)
        prompts = await render_all(self.engine, [self._prompt(ctx, c.text) for c in cands])
        costs = [(len(p) if self.engine.can_render else 0) + 1 for p in prompts]
        keep = set(fit_budget(ctx, costs, released))
        ctx.ledger.release(released)

        async def one(i: int, c: Candidate) -> float:
            if i not in keep:
                return -math.inf
            prompt = prompts[i]
            try:
                out, ptoks = await self.engine.generate(prompt, settings, request_id=f"{ctx.request_id}-judge{i}")
            except asyncio.CancelledError:  # the deadline cut it: its prompt may have been prefilled
                ctx.ledger.charge(self.engine.name, prompt=costs[i] - 1, requests=1)
                raise
            ctx.ledger.book_candidates(self.engine.name, ptoks, out, budget=True, budget_prompt=True)
            top = (out[0].top_logprobs or [()])[0]
            yes = no = 0.0
            for t, lp in top:
                s = (t if isinstance(t, str) else (tok.decode([t]) if tok is not None else "")).strip().lower()
                if s and "yes".startswith(s[:3]) and s[0] == "y":
                    yes += math.exp(lp)
                elif s and "no".startswith(s[:2]) and s[0] == "n":
                    no += math.exp(lp)
            return yes / (yes + no) if yes + no > 0 else 0.5

        got = await ctx.by_deadline([one(i, c) for i, c in enumerate(cands)])
        return [-math.inf if v is None else v for v in got]  # the deadline's cut: unscored


async def render_all(
    engine: Engine, prompts: Sequence[PromptInput], *, add_generation_prompt: bool = True
) -> list[PromptInput]:
    """``prompts`` as ``engine`` reads them: rendered once, in a worker thread (chat templates are
    CPU work), as token ids the engine takes as they are; unchanged where it cannot render."""
    if not engine.can_render:
        return list(prompts)
    return list(
        await asyncio.to_thread(
            lambda: [engine.render(p, add_generation_prompt=add_generation_prompt) for p in prompts]
        )
    )


def fit_budget(ctx: RunContext, costs: Sequence[int], released: int) -> list[int]:
    """Indices (in order) whose exact scoring cost fits the token budget: the tokens held back
    for this scoring plus whatever else is left."""
    if ctx.budget.tokens is None:
        return list(range(len(costs)))
    headroom = (ctx.tokens_left() or 0) + released
    keep, acc = [], 0
    for i, c in enumerate(costs):
        if acc + c <= headroom:
            keep.append(i)
            acc += c
    return keep


def make_scorer(opts: ScorerOptions, ctx: RunContext) -> Scorer:
    if opts.name == "logprob":
        return LogprobScorer(opts.logprob)
    if opts.name == "confidence":
        return ConfidenceScorer(opts)
    if opts.name == "verifier":
        eng = ctx.pool.get(opts.verifier, role="score", param="ttscale.verifier")
        return VerifierScorer(eng)
    if opts.name == "judge":
        eng = ctx.pool.get(opts.judge_model or ctx.model.name, role="generate", param="ttscale.judge_model")
        return JudgeScorer(eng)
    raise InvalidRequestError(f"unknown scorer {opts.name!r}", param="ttscale.scorer")
