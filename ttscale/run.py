"""One request's run: what strategies and scorers read, the ledger that books its cost, the
typed result a strategy hands back.

- :class:`RunContext`: the request as strategies and scorers see it (prompt, sampling, models,
  deadline); read-only except through its :class:`Ledger`.
- :class:`Ledger`: the only writer of the request's budget numbers and usage — samples counted,
  tokens charged (``charge``), tokens held for work still to come (``hold`` / ``release``) and
  reservations that settle at their real cost (``reserve`` → ``settle``).
- :class:`StrategyResult`: the choices, the selected sample, its answer, why sampling stopped
  (:class:`StopReason`), scores, the budget in effect, and strategy-specific details.

This module imports neither strategies nor the server: both depend on it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, Union

from pydantic import BaseModel, ConfigDict

from ttscale.budget import Budget
from ttscale.engine import Candidate, Engine, ModelPool, Prefill, PromptInput, ReadResult, SamplingSettings
from ttscale.engine.base import Routing

if TYPE_CHECKING:
    from ttscale.adaptive import Profile

T = TypeVar("T")

# What a strategy's details may hold: plain JSON values (they go to the client as they are).
# (read-only container types: a dict[str, int] is a JSON value too)
JSON = Union[str, int, float, bool, None, Sequence["JSON"], Mapping[str, "JSON"]]  # noqa: UP007


class StrategyOptions(BaseModel):
    """Base of every strategy's options: frozen, unknown keys rejected."""

    # NaN / infinity are no option's value (they would poison votes and the response's JSON)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StopReason(enum.StrEnum):
    """Why a run stopped drawing samples."""

    COMPLETE = "complete"  # every planned sample finished
    EARLY_STOP = "early_stop"  # the strategy's own rule (a decided vote, an early exit)
    DEADLINE = "deadline"
    TOKEN_BUDGET = "token_budget"
    SAMPLE_BUDGET = "sample_budget"
    # adaptive budgets (ttscale.adaptive)
    CONFIDENT = "confident"
    TARGET_REACHED = "target_reached"
    MARGINAL_GAIN = "marginal_gain"
    # sequential refinement
    MAX_ROUNDS = "max_rounds"
    CONTEXT_LENGTH = "context_length"
    CRITIC_ACCEPTED = "critic_accepted"
    STABLE_ANSWER = "stable_answer"


def _add(a: int | None, b: int | None) -> int | None:
    """Sum of counts that may be unknown (None): unknown only while no part is known."""
    return a if b is None else (b if a is None else a + b)


@dataclass
class ModelUsage:
    """One model's tokens (README, "Usage").

    The billing view, as OpenAI's ``usage``: ``prompt_tokens`` (a fan-out's prompt once, however
    many candidates share it, plus what scorers read), of them ``cached_prompt_tokens`` served
    from the prefix cache, and ``completion_tokens`` (every candidate's, aborted ones included).
    The engine's work: ``prefill_tokens`` (the prompt of every engine request: K per fan-out of K),
    of them ``cached_prefill_tokens`` served from the prefix cache instead of computed, and
    ``decode_tokens`` (every token generated, a prompt-log-prob read's one sampled token too).
    A cached count is None while the model's engine has not reported one.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    aborted_tokens: int = 0
    requests: int = 0
    redrawn: int = 0  # candidates redrawn on another replica after theirs was lost
    prefill_tokens: int = 0
    cached_prefill_tokens: int | None = None
    decode_tokens: int = 0
    cached_prompt_tokens: int | None = None


@dataclass
class Usage:
    """Every token a request cost, per model (written by the :class:`Ledger`)."""

    models: dict[str, ModelUsage] = field(default_factory=dict)

    def of(self, model: str) -> ModelUsage:
        return self.models.setdefault(model, ModelUsage())

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.models.values())

    @property
    def completion_tokens(self) -> int:
        return sum(m.completion_tokens for m in self.models.values())

    @property
    def aborted_tokens(self) -> int:
        return sum(m.aborted_tokens for m in self.models.values())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def prefill_tokens(self) -> int:
        return sum(m.prefill_tokens for m in self.models.values())

    @property
    def cached_prefill_tokens(self) -> int | None:
        out: int | None = None
        for m in self.models.values():
            out = _add(out, m.cached_prefill_tokens)
        return out

    @property
    def decode_tokens(self) -> int:
        return sum(m.decode_tokens for m in self.models.values())

    @property
    def cached_prompt_tokens(self) -> int | None:
        out: int | None = None
        for m in self.models.values():
            out = _add(out, m.cached_prompt_tokens)
        return out

    def openai(self) -> dict[str, Any]:
        """OpenAI's ``usage``; ``prompt_tokens_details.cached_tokens`` where an engine reported it."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        cached = self.cached_prompt_tokens
        if cached is not None:
            out["prompt_tokens_details"] = {"cached_tokens": cached}
        return out

    def detail(self) -> dict[str, Any]:
        return {
            "aborted_tokens": self.aborted_tokens,
            "prefill_tokens": self.prefill_tokens,
            "cached_prefill_tokens": self.cached_prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "models": {k: vars(v) for k, v in self.models.items()},
        }


class Ledger:
    """The request's budget and usage numbers; nothing else writes them.

    Tokens against ``budget.tokens``: ``spent`` (charged for good) and ``held`` (set aside for
    work still to come, e.g. scoring candidates that are still being sampled). Usage books
    every token per model, whether or not the budget counts it (a policy's prompt does not),
    both as billed and as the engine's work (prefill, cached, decode: :class:`ModelUsage`).
    """

    def __init__(self, budget: Budget, usage: Usage | None = None):
        self.requested = budget  # what the request asked for
        self._budget = budget  # in effect (an adaptive strategy may turn it to `auto`)
        self.usage = usage if usage is not None else Usage()
        self._spent = 0
        self._held = 0
        self._samples = 0
        self._cut = False

    # -- reading ----------------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        return self._budget

    @property
    def tokens_spent(self) -> int:
        return self._spent

    @property
    def tokens_held(self) -> int:
        return self._held

    @property
    def samples_used(self) -> int:
        return self._samples

    @property
    def deadline_cut(self) -> bool:
        """The deadline ended some of the run's work (sampling, scoring) before it finished."""
        return self._cut

    def tokens_left(self) -> int | None:
        t = self._budget.tokens
        return None if t is None else t - self._spent - self._held

    def samples_left(self) -> int | None:
        s = self._budget.samples
        return None if s is None else s - self._samples

    # -- writing ----------------------------------------------------------------------------
    def adopt(self, budget: Budget) -> None:
        """Run under ``budget`` from now on (the request's own stays in ``requested``)."""
        self._budget = budget

    def cut_by_deadline(self) -> None:
        self._cut = True

    def count_samples(self, n: int) -> None:
        self._samples += n

    def spend(self, tokens: int) -> None:
        """Charge ``tokens`` against the token budget (usage is booked separately)."""
        self._spent += tokens

    def hold(self, tokens: int) -> None:
        self._held += tokens

    def release(self, tokens: int) -> None:
        self._held = max(0, self._held - tokens)

    def reserve(self, tokens: int) -> bool:
        """Charge ``tokens`` up front if the budget has them; ``settle`` gives back the rest."""
        left = self.tokens_left()
        if left is not None and left < tokens:
            return False
        self._spent += tokens
        return True

    def settle(self, reserved: int, used: int) -> None:
        self._spent -= reserved - used

    def charge(
        self,
        model: str,
        *,
        prompt: int = 0,
        completion: int = 0,
        aborted: int = 0,
        requests: int = 0,
        budget_prompt: bool = True,
        budget_completion: bool = True,
        prefill: int | None = None,
        cached: int | None = None,
        decode: int | None = None,
    ) -> None:
        """Book tokens of ``model`` in usage and (unless told not to) against the budget.

        The engine's work defaults to the billed numbers: ``prefill`` (prompt tokens the engine
        requests read) to ``prompt``, ``decode`` to ``completion``; ``cached``: of ``prefill``, what
        the engine reported served from its prefix cache (None: not reported). Of the billed
        ``prompt``, the cached part is what the cache served beyond the ``prefill - prompt``
        leading tokens the bill leaves out (the prompt and chain a target re-reads to score a chunk)."""
        prefill = prompt if prefill is None else prefill
        cached_prompt = None if cached is None else min(prompt, max(0, cached - (prefill - prompt)))
        self._book(
            model,
            prompt=prompt,
            cached_prompt=cached_prompt,
            completion=completion,
            aborted=aborted,
            requests=requests,
            prefill=prefill,
            cached=cached,
            decode=completion if decode is None else decode,
        )
        self._spent += (prompt if budget_prompt else 0) + (completion if budget_completion else 0)

    def _book(
        self,
        model: str,
        *,
        prompt: int,
        cached_prompt: int | None,
        completion: int,
        aborted: int,
        requests: int,
        prefill: int,
        cached: int | None,
        decode: int,
    ) -> None:
        m = self.usage.of(model)
        m.prompt_tokens += prompt
        m.cached_prompt_tokens = _add(m.cached_prompt_tokens, cached_prompt)
        m.completion_tokens += completion
        m.aborted_tokens += aborted
        m.requests += requests
        m.prefill_tokens += prefill
        m.cached_prefill_tokens = _add(m.cached_prefill_tokens, cached)
        m.decode_tokens += decode

    def book_candidates(
        self,
        model: str,
        prompt_tokens: int,
        cands: Sequence[Candidate],
        *,
        budget: bool = False,
        budget_prompt: bool = False,
    ) -> None:
        """Usage of one fan-out: its prompt once (billed), every candidate's request reading it
        (prefill: :class:`~ttscale.engine.Prefill`), every candidate's tokens. ``budget``: charge
        the candidates' tokens too (a sampler charges its own as each candidate settles)."""
        pre = Prefill.of(prompt_tokens, cands)
        # tokens generated on a replica that was lost (the candidate was redrawn on another): spent,
        # thrown away, always charged (a sampler charges only each candidate's own tokens)
        lost = sum(c.lost_tokens for c in cands)
        redraws = sum(c.redraws for c in cands)
        completion = sum(c.num_tokens for c in cands)
        self._book(
            model,
            prompt=prompt_tokens,
            cached_prompt=pre.cached_once,
            completion=completion + lost,
            aborted=sum(c.num_tokens for c in cands if c.aborted) + lost,
            requests=len(cands) + redraws,
            prefill=pre.tokens + prompt_tokens * redraws,
            cached=pre.cached,
            decode=completion + lost,
        )
        if redraws:
            self.usage.of(model).redrawn += redraws
        self._spent += (prompt_tokens if budget_prompt else 0) + (completion if budget else 0) + lost

    def charge_read(
        self, model: str, tokens: int, result: Sequence[float] | None, *, sent: int | None = None, budget: bool = True
    ) -> None:
        """One engine read (a verifier's score, a target's prompt log-probs): ``tokens`` billed
        (and, with ``budget``, charged); the engine's work from ``result``, the adapter's
        :class:`~ttscale.engine.ReadResult`, where it reported it, else ``sent`` (the prompt tokens
        sent; default ``tokens``) read, nothing cached known. ``result`` None: the deadline cut the
        read after it was sent (its prompt may have been prefilled: it counts)."""
        read = result if isinstance(result, ReadResult) else None
        prefill = sent if sent is not None else tokens
        if read is not None and read.prefill_tokens is not None:
            prefill = read.prefill_tokens
        self.charge(
            model,
            prompt=tokens,
            requests=1,
            budget_prompt=budget,
            prefill=prefill,
            cached=None if read is None else read.cached_tokens,
            decode=0 if read is None else read.decode_tokens,
        )

    def charge_scoring(self, model: str, tokens: int, requests: int = 1, *, released: int = 0) -> None:
        """Tokens a scorer read (they count against the budget), releasing the ``released``
        tokens held back for this scoring (the engine's work as billed: see ``charge_read``)."""
        self.charge(model, prompt=tokens, requests=requests)
        self.release(released)


Progress = Callable[[dict[str, JSON]], Awaitable[None] | None]
Delta = Callable[[int, str, int], Awaitable[None]]


class RunContext:
    """One request, as strategies and scorers see it. Its numbers change only through
    ``ledger``; the rest is set when the request is admitted."""

    __slots__ = (
        "ledger",
        "model",
        "n",
        "on_delta",
        "on_progress",
        "pool",
        "profile",
        "prompt",
        "prompt_ids",
        "request_id",
        "routing",
        "settings",
        "started",
    )

    def __init__(
        self,
        *,
        pool: ModelPool,
        model: Engine,
        prompt: PromptInput,
        n: int,
        budget: Budget,
        request_id: str,
        settings: SamplingSettings | None = None,
        on_progress: Progress | None = None,
        on_delta: Delta | None = None,
        profile: Profile | None = None,
        prompt_ids: list[int] | None = None,
        usage: Usage | None = None,
        routing: Routing | None = None,
    ):
        self.pool = pool
        self.model = model
        self.prompt = prompt
        self.settings = settings if settings is not None else SamplingSettings()
        self.n = n
        self.request_id = request_id
        self.ledger = Ledger(budget, usage)
        self.on_progress = on_progress
        # Live token stream of candidate deltas: (candidate index, delta text, the candidate's
        # tokens so far). Set when the
        # client streams and the strategy can stream its answer as it is generated (``none``).
        self.on_delta = on_delta
        self.profile = profile  # the policy's budget profile, if any
        # ``prompt`` rendered by ``model`` (tokenised once, off the event loop, by the server);
        # fan-outs of ``model`` for ``prompt`` take these ids instead of rendering it again
        self.prompt_ids = prompt_ids
        # where the request's candidates may run, for replicated models (engines read it from
        # ``ROUTING``, which the strategy sets for its run)
        self.routing = routing if routing is not None else Routing(deadline=budget.deadline_ms is not None)
        self.started = time.monotonic()

    @property
    def budget(self) -> Budget:
        """The budget in effect (``ledger.requested`` is the request's own)."""
        return self.ledger.budget

    @property
    def usage(self) -> Usage:
        return self.ledger.usage

    @property
    def deadline(self) -> float | None:
        d = self.budget.deadline_s
        return None if d is None else self.started + d

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def by_deadline(self, work: Sequence[Awaitable[T]]) -> list[T | None]:
        """Run ``work`` concurrently; what has not finished by the request's deadline is cancelled
        (its engine requests aborted) and comes back as ``None``, and the ledger notes the cut.
        Errors of the work are raised (the rest is cancelled first)."""
        tasks = [asyncio.ensure_future(w) for w in work]
        if not tasks:
            return []
        left = self.time_left()
        try:
            if left is None:
                return list(await asyncio.gather(*tasks))
            done, pending = await asyncio.wait(tasks, timeout=max(left, 0.0), return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    raise exc
        finally:
            unfinished = [t for t in tasks if not t.done()]
            for t in unfinished:
                t.cancel()
            if unfinished:
                await asyncio.gather(*unfinished, return_exceptions=True)
        if pending:
            self.ledger.cut_by_deadline()
        return [t.result() if t in done else None for t in tasks]

    def tokens_left(self) -> int | None:
        return self.ledger.tokens_left()

    def samples_left(self) -> int | None:
        return self.ledger.samples_left()

    def prompt_tokens(self) -> int:
        """The policy's prompt length in tokens (0 where the policy cannot render)."""
        if self.prompt_ids is not None:
            return len(self.prompt_ids)
        return self.model.count_tokens(self.prompt) if self.model.can_render else 0

    async def progress(self, event: dict[str, JSON]) -> None:
        if self.on_progress is not None:
            r = self.on_progress(event)
            if asyncio.iscoroutine(r):
                await r


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    candidate: Candidate | None = None


@dataclass
class StrategyResult:
    """What a strategy returns; the server turns it into the OpenAI shapes in one place."""

    choices: list[Choice]
    candidates: list[Candidate]
    stop_reason: StopReason
    selected_index: int | None = None
    answer: str | None = None
    scores: list[float | None] | None = None  # per candidate; None: not scored
    per_sample: list[dict[str, JSON]] | None = None  # per candidate details (answer, cluster, ...)
    details: dict[str, JSON] = field(default_factory=dict)  # strategy-specific (votes, waves, ...)
    budget: Budget | None = None  # the budget in effect, where it differs from the request's
    streamed: bool = False  # the choices' text already went out live through on_delta
    answers: bool = True  # the strategy extracts answers (``answer`` is part of the result)

    @property
    def samples_used(self) -> int:
        return len(self.candidates)

    @property
    def info(self) -> dict[str, JSON]:
        """The result as the response's ``ttscale`` object carries it (without per-sample rows)."""
        out: dict[str, JSON] = {
            "samples_used": self.samples_used,
            "stop_reason": self.stop_reason.value,
            "selected_index": self.selected_index,
        }
        if self.answers:
            out["answer"] = self.answer
        if self.scores is not None:
            out["scores"] = list(self.scores)
        out.update(self.details)
        return out
