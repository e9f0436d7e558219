"""What every strategy shares: the run context, usage accounting, the budget-keeping sampler.

A strategy asks the :class:`Sampler` for candidates. The sampler launches them as one
fan-out when the budget allows, reserves each candidate's ``max_tokens`` against the token
budget (so the budget is never exceeded), counts the samples, aborts everything still
running at the deadline, and books every token in :class:`Usage`.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ttscale.budget import Budget
from ttscale.engine import Candidate, CandidateEvent, Engine, Fanout, ModelPool, PromptInput, SamplingSettings
from ttscale.errors import BudgetError, InvalidRequestError


class StrategyOptions(BaseModel):
    """Base of every strategy's options: frozen, unknown keys rejected."""

    # NaN / infinity are no option's value (they would poison votes and the response's JSON)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@dataclass
class ModelUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    aborted_tokens: int = 0
    requests: int = 0


@dataclass
class Usage:
    """Every token a request cost, per model."""

    models: dict[str, ModelUsage] = field(default_factory=dict)

    def of(self, model: str) -> ModelUsage:
        return self.models.setdefault(model, ModelUsage())

    def add_candidates(self, model: str, prompt_tokens: int, cands: Sequence[Candidate]) -> None:
        m = self.of(model)
        m.prompt_tokens += prompt_tokens
        m.requests += len(cands)
        for c in cands:
            m.completion_tokens += c.num_tokens
            if c.aborted:
                m.aborted_tokens += c.num_tokens

    def add_scored(self, model: str, tokens: int, requests: int = 1) -> None:
        m = self.of(model)
        m.prompt_tokens += tokens
        m.requests += requests

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

    def openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}

    def detail(self) -> dict[str, Any]:
        return {"aborted_tokens": self.aborted_tokens,
                "models": {k: vars(v) for k, v in self.models.items()}}


Progress = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass
class RunContext:
    """One request, as a strategy sees it."""

    pool: ModelPool
    model: Engine
    prompt: PromptInput
    settings: SamplingSettings  # the request's sampling (temperature, seed, max_tokens, ...)
    n: int
    budget: Budget
    request_id: str
    usage: Usage = field(default_factory=Usage)
    on_progress: Progress | None = None
    # Live token stream of candidate deltas: (candidate index, delta text). Set when the client
    # streams and the strategy can stream its answer as it is generated (strategy ``none``).
    on_delta: Callable[[int, str], Awaitable[None]] | None = None
    profile: Any = None  # the policy's budget profile (ttscale.adaptive.Profile), if any
    # ``prompt`` rendered by ``model`` (tokenised once, off the event loop, by the server);
    # fan-outs of ``model`` for ``prompt`` take these ids instead of rendering it again
    prompt_ids: list[int] | None = None
    started: float = field(default_factory=time.monotonic)
    budget_tokens_used: int = 0  # tokens charged against budget.tokens so far
    pending_scoring: int = 0  # tokens held back for scoring finished candidates
    samples_used: int = 0

    @property
    def deadline(self) -> float | None:
        d = self.budget.deadline_s
        return None if d is None else self.started + d

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def tokens_left(self) -> int | None:
        t = self.budget.tokens
        return None if t is None else t - self.budget_tokens_used - self.pending_scoring

    def samples_left(self) -> int | None:
        s = self.budget.samples
        return None if s is None else s - self.samples_used

    async def progress(self, event: dict[str, Any]) -> None:
        if self.on_progress is not None:
            r = self.on_progress(event)
            if asyncio.iscoroutine(r):
                await r

    def charge_scoring(self, model: str, tokens: int, requests: int = 1, *, released: int = 0) -> None:
        """Book tokens a scorer read (they count against the token budget too), releasing the
        ``released`` tokens the sampler held back for this scoring."""
        self.usage.add_scored(model, tokens, requests)
        self.budget_tokens_used += tokens
        self.pending_scoring = max(0, self.pending_scoring - released)

    def charge_generation(self, model: str, prompt_tokens: int, cands: Sequence[Candidate],
                          *, prompt_counts: bool = False) -> None:
        """Book a scorer's / judge's own generation (judge prompts count against the budget)."""
        self.usage.add_candidates(model, prompt_tokens, cands)
        self.budget_tokens_used += sum(c.num_tokens for c in cands) + (prompt_tokens if prompt_counts else 0)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    candidate: Candidate | None = None


@dataclass
class StrategyResult:
    choices: list[Choice]
    info: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    streamed: bool = False  # the choices' text already went out live through on_delta


class Strategy(abc.ABC):
    """A test-time-scaling method. Subclasses set ``name`` and ``Options`` and implement run."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    supports_auto: ClassVar[bool] = False  # takes "budget": "auto" / {"target_accuracy": ...}
    # Same request, same seed, same answer. False only where the method is asynchronous by
    # design and its decisions depend on the order in which candidates arrive.
    deterministic: ClassVar[bool] = True
    # The options' keys that are not strategy options but request-level ttscale fields.
    summary: ClassVar[str] = ""

    def __init__(self, options: StrategyOptions):
        self.options = options

    @classmethod
    def from_request(cls, raw: dict[str, Any], *, param: str = "ttscale") -> Strategy:
        try:
            return cls(cls.Options(**raw))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown option for strategy {cls.name!r}"
            raise InvalidRequestError(f"{param}.{loc}: {msg}", param=f"{param}.{loc}") from None

    def check_budget(self, budget: Budget) -> None:
        if (budget.auto or budget.target_accuracy is not None) and not self.supports_auto:
            raise InvalidRequestError(
                f"strategy {self.name!r} takes no automatic budget; use majority, weighted_majority, "
                "best_of_n, perplexity_consistency or auto", param="ttscale.budget")

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> StrategyResult:
        ...


class DeadlineReached(Exception):
    """Internal: the request's deadline passed."""


class Sampler:
    """Launches candidates under the request's budget and collects them.

    ``stop()`` ends the run early (e.g. a vote is decided): everything still running is
    aborted. ``abort(c)`` aborts one candidate. ``stop_reason`` says why sampling ended:
    ``complete``, ``early_stop``, ``deadline``, ``token_budget`` or ``sample_budget``.
    """

    def __init__(self, ctx: RunContext, engine: Engine | None = None, prompt: PromptInput | None = None,
                 *, scoring_cost: Callable[[int], int] | None = None):
        """``scoring_cost(t)``: an upper bound of the tokens scoring a candidate of ``t`` tokens
        will cost; reserved with each candidate so that scoring never breaks the token budget."""
        self.ctx = ctx
        self.scoring_cost = scoring_cost
        self.engine = engine or ctx.model
        if prompt is None:
            same = self.engine is ctx.model and ctx.prompt_ids is not None and self.engine.takes_token_ids
            prompt = ctx.prompt_ids if same else ctx.prompt
        self.prompt = prompt
        self.candidates: list[Candidate] = []
        self.stop_reason: str = "complete"
        self._fanouts: list[Fanout] = []
        self._owner: dict[int, tuple[Fanout, int]] = {}
        self._stopped = False
        self._reserved: dict[int, int] = {}  # candidate id -> reserved tokens still unaccounted

    def stop(self, reason: str = "early_stop") -> None:
        if not self._stopped:
            self._stopped = True
            self.stop_reason = reason

    async def abort(self, cand: Candidate) -> None:
        fo, i = self._owner[id(cand)]
        await fo.abort(i)

    def _fit(self, settings: Sequence[SamplingSettings]) -> list[SamplingSettings]:
        """The prefix of ``settings`` the budget allows now, max_tokens clipped to what is left."""
        out: list[SamplingSettings] = []
        samples_left = self.ctx.samples_left()
        if samples_left is not None:
            settings = settings[:max(samples_left, 0)]
            if not settings:
                self.stop("sample_budget")
        tokens_left = self.ctx.tokens_left()
        for s in settings:
            if tokens_left is None:
                out.append(s)
                continue
            free = tokens_left - sum(self._reserved.values()) - sum(self._cost(x.max_tokens) for x in out)
            if free >= self._cost(s.max_tokens):
                out.append(s)
            elif not out and not self._reserved:
                from dataclasses import replace

                # the last sample gets what is left (after its own scoring)
                t = max(t for t in range(0, s.max_tokens + 1) if self._cost(t) <= free) \
                    if self._cost(1) <= free else 0
                if t > 0:
                    out.append(replace(s, max_tokens=t))
                break
            else:
                break
        return out

    def _cost(self, max_tokens: int) -> int:
        return max_tokens + (self.scoring_cost(max_tokens) if self.scoring_cost else 0)

    async def run(self, settings: Sequence[SamplingSettings],
                  on_event: Callable[[CandidateEvent], Awaitable[None] | None] | None = None,
                  *, stream: bool = False) -> list[Candidate]:
        """Run candidates with ``settings`` (in order) until done, stopped or out of budget.

        ``on_event`` sees every event: with ``stream`` each candidate's tokens as they come,
        without only each candidate's end (far cheaper; enough for votes and early exits).
        """
        pending = list(settings)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        pumps: list[asyncio.Task] = []
        live = 0

        async def pump(fo: Fanout) -> None:
            try:
                async for ev in fo:
                    await queue.put(("event", ev))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put(("error", e))
            finally:
                await queue.put(("done", fo))

        booked: set[int] = set()

        def book(fo: Fanout) -> None:
            if id(fo) not in booked:
                booked.add(id(fo))
                self.ctx.usage.add_candidates(self.engine.name, fo.prompt_tokens, fo.candidates)

        def launch() -> int:
            nonlocal pending
            if self._stopped or not pending:
                return 0
            batch = self._fit(pending)
            if not batch:
                left = self.ctx.tokens_left()
                if not self._reserved and left is not None and left <= 0:
                    self.stop("token_budget")
                return 0
            pending = pending[len(batch):]
            fo = self.engine.fanout(self.prompt, batch, stream=stream,
                                    request_id=f"{self.ctx.request_id}-{len(self._fanouts)}")
            for c in fo.candidates:  # c.index stays the position inside its fan-out
                self._owner[id(c)] = (fo, c.index)
                self._reserved[id(c)] = self._cost(c.settings.max_tokens)
            self.candidates.extend(fo.candidates)
            self.ctx.samples_used += len(batch)
            self._fanouts.append(fo)
            pumps.append(asyncio.create_task(pump(fo)))
            return 1

        aborted_all = False
        try:
            async with _deadline(self.ctx.time_left()):
                live += launch()
                if not live and not self._stopped:
                    raise BudgetError("the budget does not allow a single sample",
                                      param="ttscale.budget")
                while live:
                    kind, item = await queue.get()
                    if kind == "error":
                        raise item
                    if kind == "done":
                        live -= 1
                        book(item)
                        live += launch()
                        continue
                    ev: CandidateEvent = item
                    if ev.finished:
                        self._settle(ev.candidate)
                        live += launch()
                    if on_event is not None:
                        r = on_event(ev)
                        if asyncio.iscoroutine(r):
                            await r
                    if self._stopped and not aborted_all:
                        aborted_all = True
                        for fo in self._fanouts:
                            await fo.abort_all()
        except DeadlineReached:
            self.stop("deadline")
        finally:
            for fo in self._fanouts:
                await fo.aclose()
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for fo in self._fanouts:
                book(fo)
            for c in self.candidates:
                self._settle(c)
        if pending and self.stop_reason == "complete":
            self.stop_reason = "token_budget" if self.ctx.tokens_left() is not None else "sample_budget"
        return self.candidates

    def _settle(self, c: Candidate) -> None:
        r = self._reserved.pop(id(c), None)
        if r is not None:
            self.ctx.budget_tokens_used += c.num_tokens
            if self.scoring_cost is not None:
                self.ctx.pending_scoring += self.scoring_cost(c.num_tokens)


class _deadline:
    """``async with _deadline(seconds)``: raise DeadlineReached when the time is up (None: never)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._cm = None

    async def __aenter__(self):
        if self.seconds is None:
            return self
        if self.seconds <= 0:
            raise DeadlineReached
        self._cm = asyncio.timeout(self.seconds)
        await self._cm.__aenter__()
        return self

    async def __aexit__(self, et, ev, tb):
        if self._cm is None:
            return False
        try:
            await self._cm.__aexit__(et, ev, tb)
        except TimeoutError:
            raise DeadlineReached from None
        return False
