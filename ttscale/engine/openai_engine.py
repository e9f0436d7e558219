"""Adapter for any OpenAI-compatible HTTP upstream (e.g. a separate ``vllm serve``).

Each candidate is its own streaming request (``n=1``, seed ``seed + i``), so aborting a
candidate closes its stream and the upstream stops generating it; candidates the caller stops
only all at once (``together``) and that differ only in their seeds go as one request with
``n=k`` (choice i gets ``seed + i`` there too, so the draws are the same): the upstream renders
and tokenizes the prompt once, and one stream carries them. Token counts come from the upstream's ``usage``
(``stream_options.include_usage``; per choice, ``continuous_usage_stats``, which vLLM and
ttscale report). Scoring uses vLLM's ``/classify`` endpoint, prompt log-probabilities vLLM's
``prompt_logprobs`` extension.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import httpx

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
from ttscale.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    ModelRoleError,
    UpstreamError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class OpenAIEngine(Engine):
    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        role: Literal["generate", "score"] = "generate",
        timeout_s: float = 600.0,
        tokenizer_path: str | None = None,
        max_connections: int = 100,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.upstream_model = upstream_model or name
        self.role = role
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout_s
        # streams open at once to this upstream (one per candidate apart, one per n=k group); the
        # rest wait for a connection in order, as long as it takes: only connecting and reading time out
        self.max_connections = max_connections
        self._client: httpx.AsyncClient | None = None
        self._tokenizer_path = tokenizer_path
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._open_streams = 0
        self.takes_n = True  # False once the upstream was seen to ignore n (one request each then)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(self._timeout, connect=10.0, pool=None),
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
        )
        try:
            r = await self._client.get(f"{self.base_url}/models")
            r.raise_for_status()
            cards = {m["id"]: m for m in r.json().get("data", [])}
        except (httpx.HTTPError, ValueError) as e:
            raise EngineUnavailableError(f"upstream {self.base_url} is not reachable: {e}") from e
        if self.upstream_model not in cards:
            raise EngineUnavailableError(
                f"upstream {self.base_url} does not serve {self.upstream_model!r} (it serves {list(cards)})"
            )
        self.max_model_len = cards[self.upstream_model].get("max_model_len")
        if self._tokenizer_path:
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._tokenizer_path)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineUnavailableError(f"model {self.name!r} is not connected")
        return self._client

    @property
    def num_running(self) -> int:
        return self._open_streams

    @property
    def alive(self) -> bool:
        return self._client is not None

    @property
    def can_render(self) -> bool:
        return self._tokenizer is not None

    def render(
        self, prompt: PromptInput, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        if self._tokenizer is None:
            raise ModelRoleError(f"model {self.name!r} has no local tokenizer", param="model")
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt))
        if is_token_ids(prompt):
            return list(prompt)
        text = self._tokenizer.apply_chat_template(
            prompt,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        return list(self._tokenizer.encode(text, add_special_tokens=False))

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
        settings = list(settings)
        groups = split_groups(settings) if together and self.takes_n else [[i] for i in range(len(settings))]
        fo = _HTTPFanout(self, prompt, settings, groups, request_id or new_request_id())
        fo.together = together
        return fo

    async def _post(self, path: str, body: dict[str, Any], *, base: str | None = None) -> dict[str, Any]:
        try:
            r = await self.client.post(f"{base or self.base_url}{path}", json=body)
        except httpx.HTTPError as e:
            raise EngineUnavailableError(f"upstream {self.base_url} failed: {e}") from e
        if r.status_code >= 400:
            raise _upstream_error(r.status_code, r.text)
        data: dict[str, Any] = r.json()
        return data

    async def score(self, prompts: Sequence[PromptInput], *, request_id: str | None = None) -> list[float]:
        if self.role != "score":
            raise ModelRoleError(f"model {self.name!r} is not a scoring model", param="model")
        root = self.base_url[: -len("/v1")]
        out: list[float] = []
        for p in prompts:
            body: dict[str, Any] = {"model": self.upstream_model}
            if isinstance(p, str):
                body["input"] = p
            else:
                body["messages"] = p
            data = await self._post("/classify", body, base=root)
            out.append(float(data["data"][0]["probs"][0]))
        return out

    async def prompt_logprobs(
        self, prompt: PromptInput, *, start: int = 0, request_id: str | None = None
    ) -> list[float]:
        ids = (
            self.render(prompt, add_generation_prompt=False, continue_final_message=True)
            if not is_token_ids(prompt)
            else prompt
        )
        data = await self._post(
            "/completions",
            {"model": self.upstream_model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
        )
        plp = data["choices"][0].get("prompt_logprobs") or []
        res = []
        for pos in range(max(start, 1), len(ids)):
            entry = plp[pos] if pos < len(plp) else None
            key = str(ids[pos])
            res.append(float(entry[key]["logprob"]) if entry and key in entry else float("-inf"))
        u = data.get("usage") or {}
        decoded = int(u.get("completion_tokens") or 0)
        return ReadResult(res, prefill_tokens=len(ids), cached_tokens=cached_tokens(u), decode_tokens=decoded)


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """``prompt_tokens_details.cached_tokens`` of an upstream's usage, where it reports it (vLLM
    does with ``--enable-prompt-tokens-details``, and only where it is not 0)."""
    details = usage.get("prompt_tokens_details") or {}
    n = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(n) if isinstance(n, int | float) else None


def _upstream_error(status: int, text: str) -> Exception:
    try:
        err = json.loads(text).get("error", {})
        msg, param = err.get("message", text), err.get("param")
    except (ValueError, AttributeError):
        msg, param = text, None
    if status in (400, 422):
        return InvalidRequestError(f"upstream rejected the request: {msg}", param=param)
    e = UpstreamError(f"upstream answered {status}: {msg}", status=502, param=param)
    e.upstream_status = status
    return e


def is_chat(prompt: PromptInput) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def request_body(upstream_model: str, prompt: PromptInput, s: SamplingSettings) -> dict[str, Any]:
    """The streaming OpenAI request of one candidate (``n=1``)."""
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_tokens,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.min_tokens:
        body["min_tokens"] = s.min_tokens
    if s.ignore_eos:
        body["ignore_eos"] = True
    if is_chat(prompt):
        body["messages"] = prompt
        if s.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = s.logprobs
    else:
        body["prompt"] = prompt
        if s.logprobs is not None:
            body["logprobs"] = max(s.logprobs, 1) if s.logprobs else 0
    return body


class SSE:
    """The JSON chunks of an OpenAI server-sent event stream; ``done`` once ``data: [DONE]``
    came (a stream that ends without it broke off)."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.done = False

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        async for line in self.response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                self.done = True
                return
            yield json.loads(payload)


def reset_candidate(c: Candidate) -> None:
    """Empty ``c`` for a fresh draw (its settings and index stay)."""
    c.text, c.token_ids, c.token_count = "", [], 0
    c.finish_reason = c.stop_reason = c.cached_tokens = None
    c.logprobs = [] if c.settings.logprobs is not None else None
    c.top_logprobs = [] if c.settings.logprobs else None


async def stream_candidate(
    eng: OpenAIEngine,
    prompt: PromptInput,
    c: Candidate,
    emit: Callable[[CandidateEvent], None],
    *,
    headers: dict[str, str] | None = None,
) -> int:
    """Stream candidate ``c`` from ``eng`` into ``c``, emitting a delta event per chunk (the
    final event is the caller's). Returns the prompt tokens the upstream reported.

    Raises ``InvalidRequestError`` / ``UpstreamError`` for an upstream's error answer and
    ``EngineUnavailableError`` when the connection fails or breaks off.
    """
    chat = is_chat(prompt)
    path = "/chat/completions" if chat else "/completions"
    reset_candidate(c)
    prompt_tokens = 0
    eng._open_streams += 1
    try:
        body = request_body(eng.upstream_model, prompt, c.settings)
        async with eng.client.stream("POST", f"{eng.base_url}{path}", json=body, headers=headers) as r:
            if r.status_code >= 400:
                raise _upstream_error(r.status_code, (await r.aread()).decode())
            events = SSE(r)
            async for chunk in events:
                if chunk.get("usage"):
                    u = chunk["usage"]
                    prompt_tokens = int(u.get("prompt_tokens") or 0)
                    c.token_count = int(u.get("completion_tokens") or c.token_count)
                    c.cached_tokens = cached_tokens(u)
                for ch in chunk.get("choices") or []:
                    delta = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    delta = delta or ""
                    ntok = _absorb_logprobs(chat, c, ch.get("logprobs"))
                    c.text += delta
                    c.token_count += ntok if ntok else (1 if delta else 0)
                    if ch.get("finish_reason"):
                        c.finish_reason = "length" if ch["finish_reason"] == "length" else "stop"
                    emit(CandidateEvent(c, delta, ntok or (1 if delta else 0), False))
            if not events.done and c.finish_reason is None:
                raise EngineUnavailableError(f"upstream {eng.base_url} ended the stream before the answer")
    except httpx.HTTPError as e:
        raise EngineUnavailableError(f"upstream {eng.base_url} failed: {e}") from e
    finally:
        eng._open_streams -= 1
    return prompt_tokens


def _absorb_logprobs(chat: bool, c: Candidate, lp: dict[str, Any] | None) -> int:
    if not lp or c.logprobs is None:
        return 0
    if chat:
        items = lp.get("content") or []
        for it in items:
            c.logprobs.append(float(it["logprob"]))
            if c.top_logprobs is not None:
                c.top_logprobs.append(
                    tuple(
                        sorted(
                            ((t["token"], float(t["logprob"])) for t in it.get("top_logprobs") or []),
                            key=lambda x: -x[1],
                        )
                    )
                )
        return len(items)
    vals = lp.get("token_logprobs") or []
    c.logprobs.extend(float(v) for v in vals)
    if c.top_logprobs is not None:
        for top in lp.get("top_logprobs") or []:
            c.top_logprobs.append(tuple(sorted(((t, float(v)) for t, v in (top or {}).items()), key=lambda x: -x[1])))
    return len(vals)


MAX_GROUP = 256  # the most candidates one n=k request carries (ttscale's own limit of n)


def split_groups(
    settings: Sequence[SamplingSettings], places: Sequence[object] | None = None, max_group: int = MAX_GROUP
) -> list[list[int]]:
    """The candidates (indices of ``settings``, in order) that can share one ``n=k`` request:
    runs of equal settings whose seeds are none, or consecutive (choice i of ``n=k`` with seed
    s gets s + i), and (with ``places``) of one place each."""
    groups: list[list[int]] = []
    for i, s in enumerate(settings):
        same_place = places is None or (bool(groups) and places[groups[-1][0]] is places[i])
        if groups and same_place and len(groups[-1]) < max_group:
            head = settings[groups[-1][0]]
            offset = len(groups[-1])
            if s == replace(head, seed=None if head.seed is None else head.seed + offset):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class GroupRefused(Exception):
    """An upstream did not take an ``n=k`` request: it answered 400/422 (``error``: it may
    refuse ``n`` or the request itself), or it ignored ``n`` (``error`` None). The candidates
    still open go one request each."""

    def __init__(self, error: Exception | None = None):
        super().__init__(str(error) if error else "the upstream ignores n")
        self.error = error


async def stream_group(
    eng: OpenAIEngine,
    prompt: PromptInput,
    cands: Sequence[Candidate],
    emit: Callable[[CandidateEvent], None],
    finish: Callable[[Candidate], None],
    *,
    on_prompt_tokens: Callable[[int], None] | None = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Stream ``cands`` (settings :func:`split_groups` put together) as one upstream request
    with ``n=len(cands)``, choice i into ``cands[i]``: a delta event per chunk, ``finish(c)``
    when c's choice ends (the last one when the stream does, once the request's usage is in);
    ``on_prompt_tokens`` hears the prompt's tokens as soon as the upstream says them. A
    candidate the caller aborted meanwhile takes no more text, but the tokens the upstream goes
    on spending on it are counted, and once only such candidates run the stream is closed (the
    upstream stops the request). Returns the prompt tokens the upstream reported; raises
    :class:`GroupRefused` when the upstream does not take ``n``, else as
    :func:`stream_candidate` (the candidates not finished are the ones the failure lost)."""
    chat = is_chat(prompt)
    path = "/chat/completions" if chat else "/completions"
    for c in cands:
        if not c.finished:  # one the caller aborted before the request went out stays so
            reset_candidate(c)
    body = request_body(eng.upstream_model, prompt, cands[0].settings)
    body["n"] = len(cands)
    body["stream_options"]["continuous_usage_stats"] = True
    per_choice = [False] * len(cands)  # the upstream reported this choice's own token count
    ended = [False] * len(cands)  # the upstream finished this choice
    seen = [False] * len(cands)  # the upstream sent this choice anything
    last: tuple[Candidate, FinishReason] | None = None  # the last to end: it ends with the stream
    prompt_tokens, total, told = 0, None, 0

    def waiting(c: Candidate) -> bool:
        return not c.finished and (last is None or last[0] is not c)

    def tell(n: int) -> None:
        nonlocal told
        if on_prompt_tokens is not None and n and n != told:
            told = n
            on_prompt_tokens(n)

    def end_last() -> None:
        if last is not None and not last[0].finished:
            last[0].finish_reason = last[1]
            finish(last[0])

    eng._open_streams += len(cands)
    events: SSE | None = None
    try:
        async with eng.client.stream("POST", f"{eng.base_url}{path}", json=body, headers=headers) as r:
            if r.status_code in (400, 422):
                raise GroupRefused(_upstream_error(r.status_code, (await r.aread()).decode()))
            if r.status_code >= 400:
                raise _upstream_error(r.status_code, (await r.aread()).decode())
            events = SSE(r)
            async for chunk in events:
                choices = chunk.get("choices") or []
                u = chunk.get("usage")
                if u and not choices:  # the request's usage, at the end
                    prompt_tokens = int(u.get("prompt_tokens") or 0)
                    total = int(u.get("completion_tokens") or 0)
                    cached = cached_tokens(u)
                    if cached is not None:  # the engine said it of the request: its first choice
                        cands[0].cached_tokens = cached
                elif u:
                    prompt_tokens = int(u.get("prompt_tokens") or prompt_tokens)
                tell(prompt_tokens)
                for ch in choices:
                    i = ch.get("index", 0)
                    if not isinstance(i, int) or not 0 <= i < len(cands):
                        raise UpstreamError(f"upstream {eng.base_url} answered choice {i!r} of n={len(cands)}")
                    seen[i] = True
                    c = cands[i]
                    delta = ((ch.get("delta") or {}).get("content") if chat else ch.get("text")) or ""
                    live = waiting(c)
                    ntok = _absorb_logprobs(chat, c, ch.get("logprobs")) if live else 0
                    step = ntok or (1 if delta else 0)
                    if u and len(choices) == 1:
                        per_choice[i] = True
                        c.token_count = int(u.get("completion_tokens") or 0)
                    elif not per_choice[i]:
                        c.token_count += step
                    if not live:
                        continue
                    c.text += delta
                    emit(CandidateEvent(c, delta, step, False))
                    if ch.get("finish_reason"):
                        ended[i] = True
                        reason: FinishReason = "length" if ch["finish_reason"] == "length" else "stop"
                        if any(waiting(x) for x in cands if x is not c):
                            c.finish_reason = reason
                            finish(c)
                        else:
                            last = (c, reason)
                if not any(waiting(x) for x in cands) and not all(ended):
                    break  # only candidates the caller aborted still run: closing the stream stops them
    except httpx.HTTPError as e:
        if any(waiting(x) for x in cands):
            raise EngineUnavailableError(f"upstream {eng.base_url} failed: {e}") from e
    except asyncio.CancelledError:
        end_last()  # its answer is whole: the cut (an abort, a deadline) came after it
        raise
    except (ValueError, TypeError, AttributeError) as e:  # a chunk that is not what the API says
        raise UpstreamError(f"upstream {eng.base_url} sent a malformed stream: {e}") from e
    finally:
        eng._open_streams -= len(cands)
    if any(waiting(x) for x in cands):
        if events is not None and events.done and not all(seen[1:]):
            raise GroupRefused()  # it answered, but not n choices
        raise EngineUnavailableError(f"upstream {eng.base_url} ended the stream before the answer")
    if total is not None:
        if not all(per_choice):
            _reconcile(cands, per_choice, total)
        elif total > sum(c.token_count for c in cands):
            # the upstream spent more than its choices show (its own redraws): counted as lost
            cands[0].lost_tokens += total - sum(c.token_count for c in cands)
    tell(prompt_tokens)
    end_last()
    return prompt_tokens


def _reconcile(cands: Sequence[Candidate], per_choice: Sequence[bool], total: int) -> None:
    """Make the candidates' token counts add up to the request's ``total`` where the upstream
    did not count each choice: the difference is shared in proportion to the counted tokens."""
    free = [i for i, known in enumerate(per_choice) if not known]
    diff = total - sum(c.token_count for c in cands)
    if not diff or not free:
        return
    weights = [max(cands[i].token_count, 1) for i in free]
    shares = [diff * w // sum(weights) for w in weights]
    shares[-1] += diff - sum(shares)
    for i, d in zip(free, shares, strict=True):
        cands[i].token_count = max(0, cands[i].token_count + d)


class StreamsFanout(Fanout):
    """A fan-out whose candidates run on HTTP streams: one per candidate, or one per group of
    candidates (``n=k``), each run by a task (``_task_of[i]``: candidate i's). Aborting a
    candidate that runs alone, or the last running one of its group, closes its stream, so its
    upstream stops generating it."""

    _task_of: dict[int, asyncio.Task[None]]
    _all_tasks: list[asyncio.Task[None]]

    def _spawn(self, indices: Sequence[int], coro: Any) -> asyncio.Task[None]:
        t = asyncio.create_task(coro)
        self._all_tasks.append(t)
        for i in indices:
            self._task_of[i] = t
        return t

    def _set_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens = self.prompt_tokens or n

    def _end(self, c: Candidate) -> None:
        c.finish_reason = c.finish_reason or "stop"
        c.finished_at = time.perf_counter()
        self._emit(CandidateEvent(c, "", 0, True))

    async def abort(self, index: int) -> None:
        c = self.candidates[index]
        if c.finished:
            return
        t = self._task_of[index]
        others = [j for j, u in self._task_of.items() if u is t and j != index and not self.candidates[j].finished]
        if not others and not t.done():
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if not c.finished:
            c.finish_reason = "abort"
            c.finished_at = time.perf_counter()
            self._emit(CandidateEvent(c, "", 0, True))

    async def aclose(self) -> None:
        for t in self._all_tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*self._all_tasks, return_exceptions=True)
        for c in self.candidates:
            if not c.finished:
                c.finish_reason = "abort"
                c.finished_at = time.perf_counter()


class _HTTPFanout(StreamsFanout):
    def __init__(
        self,
        engine: OpenAIEngine,
        prompt: PromptInput,
        settings: list[SamplingSettings],
        groups: list[list[int]],
        request_id: str,
    ):
        super().__init__([Candidate(i, s) for i, s in enumerate(settings)], 0, request_id)
        self._engine = engine
        self._prompt = prompt
        self._task_of, self._all_tasks = {}, []
        for g in groups:
            self._spawn(g, self._run(g))

    async def _run(self, group: list[int]) -> None:
        cands = [self.candidates[i] for i in group]
        for c in cands:
            c.started_at = time.perf_counter()
        try:
            if len(cands) == 1:
                self.prompt_tokens = await stream_candidate(self._engine, self._prompt, cands[0], self._emit)
                self._end(cands[0])
                return
            # each candidate ends (``_end``) as its choice does
            await stream_group(
                self._engine, self._prompt, cands, self._emit, self._end, on_prompt_tokens=self._set_prompt_tokens
            )
        except GroupRefused as e:
            if e.error is None:
                self._engine.takes_n = False
            for i, c in zip(group, cands, strict=True):
                if not c.finished:
                    c.lost_tokens += c.token_count
                    reset_candidate(c)
                    self._spawn([i], self._run([i]))
        except (InvalidRequestError, UpstreamError, EngineUnavailableError) as e:
            self._fail(e)
        except (ValueError, TypeError, AttributeError) as e:  # a malformed answer: never a hang
            self._fail(UpstreamError(f"upstream {self._engine.base_url} sent a malformed stream: {e}"))
