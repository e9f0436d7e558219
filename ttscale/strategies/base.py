"""What every strategy shares: the strategy base class and the budget-keeping sampler (the run's
context, ledger and result types live in :mod:`ttscale.run`).

A strategy asks the :class:`Sampler` for candidates. The sampler launches them as one
fan-out when the budget allows, reserves each candidate's ``max_tokens`` against the token
budget (so the budget is never exceeded), counts the samples, aborts everything still
running at the deadline, and books every token in :class:`Usage`.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar, cast

from pydantic import ValidationError

from ttscale.budget import Budget
from ttscale.engine import Candidate, CandidateEvent, Engine, Fanout, PromptInput, SamplingSettings
from ttscale.engine.base import ROUTING
from ttscale.errors import BudgetError, InvalidRequestError
from ttscale.run import (
    RunContext,
    StopReason,
    StrategyOptions,
    StrategyResult,
)

OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


class Strategy(abc.ABC, Generic[OptionsT]):
    """A test-time-scaling method. Subclasses set ``name`` and ``Options`` (the class their
    type parameter names) and implement ``run``."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    supports_auto: ClassVar[bool] = False  # takes "budget": "auto" / {"target_accuracy": ...}
    # Same request, same seed, same answer. False only where the method is asynchronous by
    # design and its decisions depend on the order in which candidates arrive.
    deterministic: ClassVar[bool] = True
    # The options' keys that are not strategy options but request-level ttscale fields.
    summary: ClassVar[str] = ""

    def __init__(self, options: OptionsT):
        self.options: OptionsT = options

    @classmethod
    def from_request(cls, raw: dict[str, Any], *, param: str = "ttscale") -> Strategy[Any]:
        try:
            return cls(cast(OptionsT, cls.Options(**raw)))
        except ValidationError as e:
            err = e.errors()[0]
            parts = [str(x) for x in err["loc"]]
            if parts[-2:] == ["scorer", "name"]:  # a scorer is named by the `scorer` field itself
                parts = parts[:-1]
            loc = ".".join(parts)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown option for strategy {cls.name!r}"
            raise InvalidRequestError(f"{param}.{loc}: {msg}", param=f"{param}.{loc}") from None

    def check_budget(self, budget: Budget) -> None:
        if (budget.auto or budget.target_accuracy is not None) and not self.supports_auto:
            raise InvalidRequestError(
                f"strategy {self.name!r} takes no automatic budget; use majority, weighted_majority, "
                "best_of_n, perplexity_consistency or auto",
                param="ttscale.budget",
            )

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> StrategyResult: ...

    async def execute(self, ctx: RunContext) -> StrategyResult:
        """``run`` for a request: the result names the budget it ran under."""
        ROUTING.set(ctx.routing)  # this task's (and its children's) fan-outs are placed by it
        result = await self.run(ctx)
        result.budget = ctx.ledger.budget
        if ctx.ledger.deadline_cut:  # sampling or scoring was cut: the answer is what existed then
            result.stop_reason = StopReason.DEADLINE
        return result


class DeadlineReached(Exception):
    """Internal: the request's deadline passed."""


class Sampler:
    """Launches candidates under the request's budget and collects them.

    ``stop()`` ends the run early (e.g. a vote is decided): everything still running is
    aborted. ``abort(c)`` aborts one candidate; a strategy that does so builds its sampler with
    ``aborts_each`` (else an upstream may run a fan-out's candidates as one ``n=k`` request,
    which goes on generating a candidate aborted alone). ``stop_reason`` says why sampling
    ended: ``complete``, ``early_stop``, ``deadline``, ``token_budget`` or ``sample_budget``.
    """

    def __init__(
        self,
        ctx: RunContext,
        engine: Engine | None = None,
        prompt: PromptInput | None = None,
        *,
        scoring_cost: Callable[[int], int] | None = None,
        counts_samples: bool = True,
        max_live: int | None = None,
        aborts_each: bool = False,
    ):
        """``scoring_cost(t)``: an upper bound of the tokens scoring a candidate of ``t`` tokens
        will cost; reserved with each candidate so that scoring never breaks the token budget.
        Without ``counts_samples`` its candidates are parts of samples counted elsewhere (chunks
        of a chain): they neither count as samples nor stop at the sample budget. ``max_live``
        caps the candidates running at once (the next starts as one finishes)."""
        self.ctx = ctx
        self.counts_samples = counts_samples
        self.max_live = max_live
        self.aborts_each = aborts_each
        self.scoring_cost = scoring_cost
        self.engine = engine or ctx.model
        if prompt is None:
            same = self.engine is ctx.model and ctx.prompt_ids is not None and self.engine.takes_token_ids
            prompt = ctx.prompt_ids if same and ctx.prompt_ids is not None else ctx.prompt
        self.prompt: PromptInput = prompt
        self.candidates: list[Candidate] = []
        self.stop_reason = StopReason.COMPLETE
        self._fanouts: list[Fanout] = []
        self._owner: dict[int, tuple[Fanout, int]] = {}
        self._stopped = False
        self._reserved: dict[int, int] = {}  # candidate id -> reserved tokens still unaccounted

    def stop(self, reason: StopReason = StopReason.EARLY_STOP) -> None:
        if not self._stopped:
            self._stopped = True
            self.stop_reason = StopReason(reason)

    async def abort(self, cand: Candidate) -> None:
        fo, i = self._owner[id(cand)]
        await fo.abort(i)

    def _fit(self, settings: Sequence[SamplingSettings]) -> list[SamplingSettings]:
        """The prefix of ``settings`` the budget allows now, max_tokens clipped to what is left."""
        out: list[SamplingSettings] = []
        samples_left = self.ctx.samples_left() if self.counts_samples else None
        if samples_left is not None:
            settings = settings[: max(samples_left, 0)]
            if not settings:
                self.stop(StopReason.SAMPLE_BUDGET)
        tokens_left = self.ctx.tokens_left()
        for s in settings:
            if tokens_left is None:
                out.append(s)
                continue
            # what this sampler (and any other of the request) reserved is held in the ledger
            free = tokens_left - sum(self._cost(x.max_tokens) for x in out)
            if free >= self._cost(s.max_tokens):
                out.append(s)
            elif not out and not self._reserved:
                from dataclasses import replace

                # the last sample gets what is left (after its own scoring)
                t = max(t for t in range(0, s.max_tokens + 1) if self._cost(t) <= free) if self._cost(1) <= free else 0
                if t > 0:
                    out.append(replace(s, max_tokens=t))
                break
            else:
                break
        return out

    def _cost(self, max_tokens: int) -> int:
        return max_tokens + (self.scoring_cost(max_tokens) if self.scoring_cost else 0)

    async def run(
        self,
        settings: Sequence[SamplingSettings],
        on_event: Callable[[CandidateEvent], Awaitable[None] | None] | None = None,
        *,
        stream: bool = False,
        text: bool = True,
    ) -> list[Candidate]:
        """Run candidates with ``settings`` (in order) until done, stopped or out of budget.

        ``on_event`` sees every event: with ``stream`` each candidate's tokens as they come,
        without only each candidate's end (far cheaper; enough for votes and early exits).
        ``text=False``: the events are watched for tokens and log-probs only; a running
        candidate's text may stay empty until it ends (see :meth:`Engine.fanout`).
        """
        pending = list(settings)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        pumps: list[asyncio.Task[None]] = []
        live = 0

        async def pump(fo: Fanout) -> None:
            try:
                async for ev in fo:
                    await queue.put(("event", ev))
            except BaseException as e:
                await queue.put(("error", e))
            finally:
                await queue.put(("done", fo))

        booked: set[int] = set()

        def book(fo: Fanout) -> None:
            if id(fo) not in booked:
                booked.add(id(fo))
                self.ctx.ledger.book_candidates(self.engine.name, fo.prompt_tokens, fo.candidates)

        def launch() -> int:
            nonlocal pending
            if self._stopped or not pending:
                return 0
            room = len(pending) if self.max_live is None else self.max_live - len(self._reserved)
            if room <= 0:
                return 0
            batch = self._fit(pending[:room])
            if not batch:
                left = self.ctx.tokens_left()
                if not self._reserved and left is not None and left <= 0:
                    self.stop(StopReason.TOKEN_BUDGET)
                return 0
            pending = pending[len(batch) :]
            fo = self.engine.fanout(
                self.prompt,
                batch,
                stream=stream,
                text=text,
                together=not self.aborts_each,
                request_id=f"{self.ctx.request_id}-{len(self._fanouts)}",
            )
            for c in fo.candidates:  # c.index stays the position inside its fan-out
                self._owner[id(c)] = (fo, c.index)
                self._reserved[id(c)] = self._cost(c.settings.max_tokens)
                self.ctx.ledger.hold(self._reserved[id(c)])
            self.candidates.extend(fo.candidates)
            if self.counts_samples:
                self.ctx.ledger.count_samples(len(batch))
            self._fanouts.append(fo)
            pumps.append(asyncio.create_task(pump(fo)))
            return 1

        aborted_all = False
        try:
            async with _deadline(self.ctx.time_left()):
                live += launch()
                if not live and not self._stopped:
                    raise BudgetError("the budget does not allow a single sample", param="ttscale.budget")
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
                    if on_event is not None:
                        r = on_event(ev)
                        if asyncio.iscoroutine(r):
                            await r
                    if ev.finished:  # after the listener: a stop it decides starts nothing more
                        live += launch()
                    if self._stopped and not aborted_all:
                        aborted_all = True
                        for fo in self._fanouts:
                            await fo.abort_all()
        except DeadlineReached:
            self.stop(StopReason.DEADLINE)
            self.ctx.ledger.cut_by_deadline()
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
        if pending and self.stop_reason == StopReason.COMPLETE:
            self.stop_reason = (
                StopReason.TOKEN_BUDGET if self.ctx.tokens_left() is not None else StopReason.SAMPLE_BUDGET
            )
        return self.candidates

    def _settle(self, c: Candidate) -> None:
        r = self._reserved.pop(id(c), None)
        if r is not None:
            self.ctx.ledger.release(r)
            self.ctx.ledger.spend(c.num_tokens)
            if self.scoring_cost is not None:
                self.ctx.ledger.hold(self.scoring_cost(c.num_tokens))


class _deadline:
    """``async with _deadline(seconds)``: raise DeadlineReached when the time is up (None: never)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._cm: asyncio.Timeout | None = None

    async def __aenter__(self) -> _deadline:
        if self.seconds is None:
            return self
        if self.seconds <= 0:
            raise DeadlineReached
        self._cm = asyncio.timeout(self.seconds)
        await self._cm.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._cm is None:
            return False
        try:
            await self._cm.__aexit__(et, ev, tb)
        except TimeoutError:
            raise DeadlineReached from None
        return False
