"""The narrow async interface every strategy uses to reach a model.

One call, :meth:`Engine.fanout`, starts K candidates of one prompt together (prefix shared
in the engine) and returns a :class:`Fanout`: an async stream of per-candidate events with
per-candidate abort. Scoring models answer :meth:`Engine.score`; a target model scores a
span of a prompt with :meth:`Engine.prompt_logprobs`. Each adapter counts tokens exactly, and
reports how many prompt tokens its engine served from the prefix cache where the engine says
(``Candidate.cached_tokens``; a :class:`ReadResult` from ``score`` / ``prompt_logprobs``).
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from ttscale.errors import InvalidRequestError

if TYPE_CHECKING:
    from typing_extensions import TypeIs

Messages = list[dict[str, Any]]
# A prompt is raw text (sent as is), chat messages (rendered with the model's chat template),
# or token ids.
PromptInput = str | Messages | list[int]


def is_token_ids(prompt: PromptInput) -> TypeIs[list[int]]:
    """Whether ``prompt`` is token ids (a non-empty list of ints)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling for one candidate. ``seed`` makes a candidate reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    max_tokens: int = 256
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; 0: sampled token only; k: also top-k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    def replicate(self, n: int, *, first_index: int = 0) -> list[SamplingSettings]:
        """Settings for ``n`` candidates: candidate i gets ``seed + i`` (as vLLM's ``n`` does)."""
        if self.seed is None:
            return [self] * n
        return [replace(self, seed=self.seed + first_index + i) for i in range(n)]


@dataclass(eq=False)
class Candidate:
    """One sampled completion, updated in place while it runs."""

    index: int
    settings: SamplingSettings
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # log-prob of each sampled token
    # top-k (token, log-prob) pairs at each position, best first; token is an id, or a string
    # where an upstream reports strings. Rows are tuples: a tuple of numbers leaves the garbage
    # collector's tracking after its first passes, so the ~20 pairs per token of thousands of running
    # candidates do not make every full collection walk them (lists would, and at GPU speed
    # those collections cost the serving process more than the rest of its per-token work)
    top_logprobs: list[tuple[tuple[int | str, float], ...]] | None = None
    token_count: int = 0  # tokens generated so far (adapters without token ids count here too)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    # tokens generated on a replica that was lost before the candidate finished; the candidate
    # was then redrawn on another (``redraws`` times). They cost compute: usage counts them.
    lost_tokens: int = 0
    redraws: int = 0
    # of the prompt tokens of this candidate's engine request, those the engine served from its
    # prefix cache instead of computing them (None: the engine did not say)
    cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"

    @property
    def num_tokens(self) -> int:
        return self.token_count

    @property
    def sum_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(self.logprobs))

    @property
    def mean_logprob(self) -> float | None:
        if not self.logprobs:
            return None
        return float(sum(self.logprobs) / len(self.logprobs))


Placement = Literal["auto", "affinity", "spread", "round_robin"]
PLACEMENTS: tuple[Placement, ...] = ("auto", "affinity", "spread", "round_robin")


@dataclass(frozen=True)
class Routing:
    """Where a request's candidates may run, for engines with several replicas (or
    data-parallel ranks); other engines ignore it.

    ``key``: what places the request (a client's ``X-Session-ID``); None: the model and the
    prompt's prefix, so requests that share a prefix share a replica's prefix cache.
    ``placement``: ``affinity`` puts every candidate on the key's replica; ``spread`` splits
    them over the healthy replicas in the key's order; ``round_robin`` deals them out in turn,
    whatever the key; ``auto`` is affinity bounded by load (candidates overflow to the next
    replica in the key's order when the first is loaded beyond its share), and spread when the
    request has a deadline.
    """

    key: str | None = None
    placement: Placement = "auto"
    deadline: bool = False


# Set by whoever runs a request (the server per request, the eval runner per problem); read by
# engines when a fan-out starts. A context variable, so concurrent requests never mix.
DEFAULT_ROUTING = Routing()
ROUTING: contextvars.ContextVar[Routing] = contextvars.ContextVar("ttscale_routing", default=DEFAULT_ROUTING)


class ReadResult(list[float]):
    """What ``score`` and ``prompt_logprobs`` return where the adapter knows what its engine read:
    the values, plus the prompt tokens its engine requests read (``prefill_tokens``), how many of
    them the engine's prefix cache served (``cached_tokens``; None: not reported) and the tokens
    it generated on the way (``decode_tokens``: a prompt-log-prob read samples one). An adapter
    that knows none of it returns a plain list."""

    def __init__(
        self,
        values: Sequence[float] = (),
        *,
        prefill_tokens: int | None = None,
        cached_tokens: int | None = None,
        decode_tokens: int = 0,
    ):
        super().__init__(values)
        self.prefill_tokens = prefill_tokens
        self.cached_tokens = cached_tokens
        self.decode_tokens = decode_tokens


@dataclass(frozen=True)
class Prefill:
    """The prompt tokens one fan-out made its engine read (README, "Usage").

    ``tokens``: every engine request's prompt: K candidates of one prompt are K requests, K times
    its length. ``cached``: of those, the tokens the engine's prefix cache served instead of
    computing them. ``cached_once``: of the prompt counted once (the fan-out's ``prompt_tokens``),
    the leading tokens that no request of the fan-out computed: the least any candidate had
    served from the cache (a cache hit is always a prefix). None: no candidate's engine said.
    """

    tokens: int
    cached: int | None = None
    cached_once: int | None = None

    @classmethod
    def of(cls, prompt_tokens: int, cands: Sequence[Candidate]) -> Prefill:
        hits = [c.cached_tokens for c in cands if c.cached_tokens is not None]
        if not hits:
            return cls(prompt_tokens * len(cands))
        return cls(prompt_tokens * len(cands), sum(hits), min(hits))


@dataclass(frozen=True)
class CandidateEvent:
    """A candidate produced tokens (``delta_tokens`` of them) or finished."""

    candidate: Candidate
    delta_text: str
    delta_tokens: int
    finished: bool


class Fanout(abc.ABC):
    """K candidates of one prompt running together.

    Iterate it for events; ``abort(i)`` stops candidate i in the engine (its tokens so far
    stay counted); ``aclose()`` aborts whatever still runs. Use it as an async context
    manager so nothing outlives its owner.
    """

    def __init__(self, candidates: list[Candidate], prompt_tokens: int, request_id: str):
        self.candidates = candidates
        self.prompt_tokens = prompt_tokens
        self.request_id = request_id
        self._events: asyncio.Queue[CandidateEvent | BaseException | None] = asyncio.Queue()
        self._open = len(candidates)
        self.together = False  # whether the caller allowed one engine request for several

    # -- producer side (adapters) ------------------------------------------------------
    def _emit(self, event: CandidateEvent) -> None:
        self._events.put_nowait(event)

    def _fail(self, exc: BaseException) -> None:
        self._events.put_nowait(exc)

    # -- consumer side --------------------------------------------------------------------
    @property
    def running(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.finished]

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.candidates)

    @property
    def prefill(self) -> Prefill:
        return Prefill.of(self.prompt_tokens, self.candidates)

    def __aiter__(self) -> AsyncIterator[CandidateEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[CandidateEvent]:
        while self._open > 0:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                continue
            if item.finished:
                self._open -= 1
            yield item

    async def wait(self) -> list[Candidate]:
        """Run every candidate to the end (or its abort) and return them."""
        async for _ in self:
            pass
        return self.candidates

    @abc.abstractmethod
    async def abort(self, index: int) -> None:
        """Stop candidate ``index`` in the engine; it finishes with ``finish_reason='abort'``."""

    async def abort_all(self) -> None:
        for c in self.running:
            await self.abort(c.index)

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Abort what still runs and release the adapter's tasks."""

    async def __aenter__(self) -> Fanout:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Engine(abc.ABC):
    """One served model. ``role`` is ``generate`` (policy, draft, judge) or ``score``."""

    name: str
    role: Literal["generate", "score"] = "generate"
    max_model_len: int | None = None
    # sequences the engine runs in one batch (vLLM's max_num_seqs); None: not known here
    max_num_seqs: int | None = None
    # the most characters one token of the tokenizer spells (a prompt of more than
    # max_model_len × this many characters cannot fit, whatever it says); None: unknown
    max_token_chars: int | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    @abc.abstractmethod
    def fanout(
        self,
        prompt: PromptInput,
        settings: Sequence[SamplingSettings],
        *,
        request_id: str | None = None,
        stream: bool = True,
        text: bool = True,
        together: bool = False,
    ) -> Fanout:
        """Start ``len(settings)`` candidates of ``prompt`` together, candidate i with settings[i].

        With ``stream`` each candidate reports its tokens as they come; without, it reports once
        when it finishes (or is aborted, with the tokens it had): much less per-token work.
        ``text=False`` (with ``stream``): the caller watches tokens and log-probs only, so an
        adapter may leave a running candidate's text empty and write it when the candidate ends
        (vLLM in-process then detokenizes nothing per token); the others stream text anyway.
        ``together``: the caller aborts these candidates only all at once (or lets them end), so
        an adapter may run candidates of like settings as one engine request (an upstream's
        ``n=k`` call: the prompt rendered once, one stream); aborting only some of such a group stops
        them for the caller, while the engine finishes them (their tokens stay counted).
        """

    async def generate(
        self, prompt: PromptInput, settings: Sequence[SamplingSettings], *, request_id: str | None = None
    ) -> tuple[list[Candidate], int]:
        """Run a fan-out to completion; returns (candidates, prompt_tokens)."""
        async with self.fanout(prompt, settings, request_id=request_id, stream=False, together=True) as fo:
            await fo.wait()
        return fo.candidates, fo.prompt_tokens

    async def score(self, prompts: Sequence[PromptInput], *, request_id: str | None = None) -> list[float]:
        """Scores from a classification / reward model (one float per prompt); a
        :class:`ReadResult` where the adapter knows what its engine read."""
        from ttscale.errors import ModelRoleError

        raise ModelRoleError(f"model {self.name!r} cannot score", param="model")

    async def prompt_logprobs(
        self, prompt: PromptInput, *, start: int = 0, request_id: str | None = None
    ) -> list[float]:
        """Log-probability of each prompt token from position ``start`` on (prefill only); a
        :class:`ReadResult` where the adapter knows what its engine read."""
        from ttscale.errors import ModelRoleError

        raise ModelRoleError(f"model {self.name!r} cannot score prompt log-probabilities", param="model")

    @abc.abstractmethod
    def render(
        self, prompt: PromptInput, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        """Token ids the engine would see for ``prompt``."""

    @property
    def can_render(self) -> bool:
        """Whether :meth:`render` works here (an upstream without a local tokenizer cannot)."""
        return True

    def count_tokens(self, prompt: PromptInput) -> int:
        return len(self.render(prompt))

    @property
    def num_running(self) -> int:
        """Requests the engine itself still holds (0 once everything finished or aborted)."""
        return 0

    @property
    def alive(self) -> bool:
        """Ready to serve (an in-process engine: started, its process not dead)."""
        return True

    # Whether a prompt of token ids from :meth:`render` can be sent as it is (no re-rendering).
    takes_token_ids: bool = False


def new_request_id(prefix: str = "ttscale") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def perplexity(logprobs: Sequence[float]) -> float:
    """exp(−mean log p); inf for an empty span."""
    if not logprobs:
        return math.inf
    return math.exp(-sum(logprobs) / len(logprobs))


def prompt_chars(prompt: PromptInput) -> int:
    """The characters of a prompt's text (0 for token ids)."""
    if isinstance(prompt, str):
        return len(prompt)
    if prompt and isinstance(prompt[0], dict):
        return sum(len(str(m.get("content") or "")) for m in prompt)
    return 0


def check_encodable(prompt: PromptInput) -> None:
    """Text a tokenizer cannot take (a lone UTF-16 surrogate is no Unicode scalar) is the
    request's fault: a 400 naming the parameter, not a tokenizer TypeError."""
    if isinstance(prompt, str):
        texts, param = [prompt], "prompt"
    elif prompt and isinstance(prompt[0], dict):
        texts, param = [str(m.get("content") or "") for m in prompt], "messages"
    else:
        return
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"{param} holds text that is not valid Unicode (position {e.start}: {e.reason})", param=param
            ) from None
