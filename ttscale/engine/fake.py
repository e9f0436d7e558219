"""A deterministic in-memory engine for fast unit tests of selection logic.

Characters are tokens. ``respond(prompt_text, settings)`` decides each candidate's text;
log-probs come from ``logprob(prompt_text, text, position)``. Candidates advance one token
per tick, so aborts, deadlines and token budgets behave as with a real engine.

Prefix caching is simulated as vLLM's works: a generation request's prompt is read in blocks
of ``block_size`` tokens; a full block whose whole prefix an earlier request (a sibling of the
same fan-out included) read is served from the cache, never the prompt's last token. Scoring
reads and prompt-log-prob reads use no cache (vLLM's pooling engines run without one here, and
prompt log-probs skip it). Every read reports its numbers (``cached_tokens``, ``ReadResult``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Literal

from ttscale.engine.base import (
    Candidate,
    CandidateEvent,
    Engine,
    Fanout,
    FinishReason,
    PromptInput,
    ReadResult,
    SamplingSettings,
    is_token_ids,
    new_request_id,
)
from ttscale.errors import ModelRoleError


def _text_of(prompt: PromptInput) -> str:
    if isinstance(prompt, str):
        return prompt
    if is_token_ids(prompt):
        return "".join(chr(t) for t in prompt)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt)


def _default_respond(prompt: str, s: SamplingSettings) -> str:
    h = hashlib.sha256(f"{prompt}|{s.seed}|{s.temperature}".encode()).digest()
    return f"The answer is \\boxed{{{h[0] % 4}}}."


def _default_logprob(prompt: str, text: str, pos: int) -> float:
    h = hashlib.sha256(f"{text}|{pos}".encode()).digest()
    return -(h[0] / 255.0) * 2.0


class FakeEngine(Engine):
    def __init__(
        self,
        name: str = "fake",
        *,
        role: Literal["generate", "score"] = "generate",
        respond: Callable[[str, SamplingSettings], str] = _default_respond,
        logprob: Callable[[str, str, int], float] = _default_logprob,
        scorer: Callable[[str], float] | None = None,
        tick_s: float = 0.0,
        max_model_len: int = 4096,
        prefix_cache: bool = True,
        block_size: int = 16,
    ):
        self.name = name
        self.role = role
        self.respond = respond
        self.logprob = logprob
        self.scorer = scorer or (lambda text: (hashlib.sha256(text.encode()).digest()[0]) / 255.0)
        self.tick_s = tick_s
        self.max_model_len = max_model_len
        self.max_token_chars = 1  # characters are tokens
        self.requests_started = 0
        self._live: set[str] = set()
        self.prefix_cache = prefix_cache
        self.block_size = block_size
        self._blocks: set[bytes] = set()  # the cached blocks, each by the hash of its whole prefix

    def read_prompt(self, prompt: str) -> int:
        """Read ``prompt`` as a generation request's prefill: the tokens served from the cache."""
        if not self.prefix_cache:
            return 0
        b, h, hit, missed = self.block_size, b"", 0, False
        for end in range(b, len(prompt) + 1, b):
            h = hashlib.sha256(h + prompt[end - b : end].encode("utf-8", "surrogatepass")).digest()
            if not missed and end < len(prompt) and h in self._blocks:
                hit = end
            else:
                missed = True
            self._blocks.add(h)
        return hit

    def render(
        self, prompt: PromptInput, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        return [ord(ch) for ch in _text_of(prompt)]

    @property
    def num_running(self) -> int:
        return len(self._live)

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
        if self.role != "generate":
            raise ModelRoleError(f"model {self.name!r} cannot generate", param="model")
        self.requests_started += len(settings)
        fo = _FakeFanout(self, _text_of(prompt), list(settings), request_id or new_request_id(), stream)
        fo.together = together  # for tests: what the caller allowed (this engine runs each apart)
        return fo

    async def score(self, prompts: Sequence[PromptInput], *, request_id: str | None = None) -> list[float]:
        if self.role != "score":
            raise ModelRoleError(f"model {self.name!r} is not a scoring model", param="model")
        texts = [_text_of(p) for p in prompts]
        return ReadResult([float(self.scorer(t)) for t in texts], prefill_tokens=sum(map(len, texts)), cached_tokens=0)

    async def prompt_logprobs(
        self, prompt: PromptInput, *, start: int = 0, request_id: str | None = None
    ) -> list[float]:
        text = _text_of(prompt)
        values = [self.logprob("", text, i) for i in range(max(start, 1), len(text))]
        return ReadResult(values, prefill_tokens=len(text), cached_tokens=0)


class _FakeFanout(Fanout):
    def __init__(
        self, engine: FakeEngine, prompt: str, settings: list[SamplingSettings], request_id: str, stream: bool = True
    ):
        super().__init__([Candidate(i, s) for i, s in enumerate(settings)], len(prompt), request_id)
        self._stream = stream
        self._engine = engine
        self._prompt = prompt
        self._aborted: set[int] = set()
        self._rids = [f"{request_id}-{i}" for i in range(len(settings))]
        engine._live.update(self._rids)
        for c in self.candidates:  # one engine request each, in order: siblings find the blocks cached
            c.cached_tokens = engine.read_prompt(prompt)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        texts = [self._engine.respond(self._prompt, c.settings) for c in self.candidates]
        for c in self.candidates:
            c.started_at = time.perf_counter()
            if c.settings.logprobs is not None:
                c.logprobs = []
                if c.settings.logprobs:
                    c.top_logprobs = []
        step = 0
        while any(not c.finished for c in self.candidates):
            for c, full in zip(self.candidates, texts):
                if c.finished:
                    continue
                if c.index in self._aborted:
                    self._finish(c, "abort")
                    continue
                limit = min(len(full), c.settings.max_tokens)
                for stop in c.settings.stop:
                    at = full.find(stop)
                    if at >= 0:
                        limit = min(limit, at)
                if step >= limit:
                    self._finish(c, "length" if step >= c.settings.max_tokens else "stop")
                    continue
                ch = full[step]
                c.text += ch
                c.token_ids.append(ord(ch))
                c.token_count += 1
                if c.logprobs is not None:
                    lp = self._engine.logprob(self._prompt, full, step)
                    c.logprobs.append(lp)
                    if c.top_logprobs is not None:
                        k = c.settings.logprobs or 0
                        c.top_logprobs.append(((ord(ch), lp), *((j, lp - 1.0 - j) for j in range(k - 1))))
                if self._stream:
                    self._emit(CandidateEvent(c, ch, 1, False))
            step += 1
            await asyncio.sleep(self._engine.tick_s)

    def _finish(self, c: Candidate, reason: FinishReason) -> None:
        c.finish_reason = reason
        c.finished_at = time.perf_counter()
        self._engine._live.discard(self._rids[c.index])
        if self._stream:
            self._emit(CandidateEvent(c, "", 0, True))
        else:
            self._emit(CandidateEvent(c, c.text, c.num_tokens, True))

    async def abort(self, index: int) -> None:
        if not self.candidates[index].finished:
            self._aborted.add(index)

    async def aclose(self) -> None:
        for c in self.candidates:
            if not c.finished:
                self._aborted.add(c.index)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in self.candidates:
            if not c.finished:
                c.finish_reason = "abort"
                c.finished_at = time.perf_counter()
                self._engine._live.discard(self._rids[c.index])
