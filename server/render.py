"""The one place where a :class:`~ttscale.run.StrategyResult` becomes the OpenAI wire format:
a JSON body (``response``) or server-sent events (:class:`StreamWriter`). An
:class:`Endpoint` knows its own shapes (chat or text completions), so nothing else branches
on which one it serves."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttscale.engine import Candidate, Engine
from ttscale.run import RunContext, StrategyResult

STREAM_PIECE_CHARS = 24  # selected answers stream in pieces of this many characters


class Endpoint:
    """Shapes of one completions endpoint."""

    name: str  # metrics label
    id_prefix: str
    object: str
    chunk_object: str

    def choice(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str, echo: str | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs(self, engine: Engine, cand: Candidate) -> dict[str, Any]:
        raise NotImplementedError

    # text a stream's framing chunks carry (chat: none; completions: the empty string)
    empty_text: str | None = None


class ChatEndpoint(Endpoint):
    name, id_prefix, object, chunk_object = "chat", "chatcmpl-", "chat.completion", "chat.completion.chunk"
    empty_text = None

    def choice(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str, echo: str | None
    ) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def delta(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if text is not None:
            d["content"] = text
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}

    def logprobs(self, engine: Engine, cand: Candidate) -> dict[str, Any]:
        toks = token_strings(engine, cand.token_ids)
        tops = cand.top_logprobs or [() for _ in cand.logprobs or []]
        return {
            "content": [
                {
                    "token": t,
                    "logprob": lp,
                    "bytes": list(t.encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": v, "bytes": list(s.encode())}
                        for s, v in zip(token_strings(engine, [i for i, _ in top]), [v for _, v in top])
                    ],
                }
                for t, lp, top in zip(toks, cand.logprobs or [], tops)
            ]
        }


class CompletionsEndpoint(Endpoint):
    name, id_prefix, object, chunk_object = "completions", "cmpl-", "text_completion", "text_completion"
    empty_text = ""

    def choice(
        self, index: int, text: str, logprobs: dict[str, Any] | None, finish: str, echo: str | None
    ) -> dict[str, Any]:
        return {"index": index, "text": (echo or "") + text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def logprobs(self, engine: Engine, cand: Candidate) -> dict[str, Any]:
        tops = cand.top_logprobs
        return {
            "tokens": token_strings(engine, cand.token_ids),
            "token_logprobs": cand.logprobs,
            "top_logprobs": [dict(zip(token_strings(engine, [i for i, _ in top]), [v for _, v in top])) for top in tops]
            if tops is not None
            else None,
            "text_offset": None,
        }


CHAT = ChatEndpoint()
COMPLETIONS = CompletionsEndpoint()


@dataclass(frozen=True)
class Reply:
    """How one request is answered (besides its result)."""

    endpoint: Endpoint
    id: str
    model: str
    strategy: str
    engine: Engine
    logprobs: bool = False  # the request asked for log-probs
    return_samples: bool = False
    echo: str | None = None  # completions: the prompt to put before each text
    created: int = field(default_factory=lambda: int(time.time()))


def token_strings(engine: Engine, ids: Sequence[int | str]) -> list[str]:
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return [i if isinstance(i, str) else tok.decode([i]) for i in ids]


def ttscale_object(result: StrategyResult, ctx: RunContext, reply: Reply, seconds: float) -> dict[str, Any]:
    info: dict[str, Any] = {"strategy": reply.strategy, **result.info}
    info["budget"] = ctx.ledger.requested.model_dump(exclude_none=True, exclude_defaults=True)
    if result.budget is not None and result.budget != ctx.ledger.requested:
        info["budget_in_effect"] = result.budget.model_dump(exclude_none=True, exclude_defaults=True)
    info["usage"] = ctx.usage.detail()
    info["elapsed_ms"] = round(seconds * 1000.0, 1)
    if reply.return_samples:
        per = result.per_sample or [{} for _ in result.candidates]
        info["samples"] = [
            {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "tokens": c.num_tokens,
                "mean_logprob": c.mean_logprob,
                **extra,
            }
            for i, (c, extra) in enumerate(zip(result.candidates, per))
        ]
    return info


def response(result: StrategyResult, ctx: RunContext, reply: Reply, seconds: float) -> dict[str, Any]:
    ep = reply.endpoint
    choices = []
    for ch in result.choices:
        # only when the request asked: strategies draw log-probs for their own use (tie-breaks)
        lp = (
            ep.logprobs(reply.engine, ch.candidate)
            if reply.logprobs and ch.candidate is not None and ch.candidate.logprobs is not None
            else None
        )
        choices.append(ep.choice(ch.index, ch.text, lp, ch.finish_reason, reply.echo))
    return {
        "id": reply.id,
        "object": ep.object,
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": ctx.usage.openai(),
        "ttscale": ttscale_object(result, ctx, reply, seconds),
    }


def dumps(obj: dict[str, Any]) -> bytes:
    """Strict JSON: a non-finite number (a -inf log-prob of a token the sampler had masked, a
    NaN a model computed) goes out as null, never as a token JSON parsers refuse."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate in some text: escaped, as ASCII JSON
        return json.dumps(_finite(obj), allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # rare: walk the object once
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


class StreamWriter:
    """The server-sent events of one streamed request."""

    def __init__(self, reply: Reply, n: int, *, continuous_usage: bool = False, prompt_tokens: int | None = None):
        """``continuous_usage`` (vLLM's ``stream_options.continuous_usage_stats``): each chunk of
        a choice carries that choice's usage so far (its candidate's tokens), the closing one
        its whole count; ``prompt_tokens``: the prompt's, where the server rendered it."""
        self.reply = reply
        self.n = n
        self.continuous_usage = continuous_usage
        self.prompt_tokens = prompt_tokens
        ep = reply.endpoint
        self.head = {"id": reply.id, "object": ep.chunk_object, "created": reply.created, "model": reply.model}

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> bytes:
        return sse({**self.head, "choices": [choice], **extra})

    def opening(self) -> Iterator[bytes]:
        ep = self.reply.endpoint
        for i in range(self.n):
            yield self._chunk(ep.delta(i, "" if ep.empty_text is None else None, role=True))
        if self.reply.echo is not None:
            for i in range(self.n):
                yield self._chunk(ep.delta(i, self.reply.echo))

    def _usage(self, tokens: int, prompt_tokens: int | None = None) -> dict[str, Any]:
        if not self.continuous_usage:
            return {}
        p = prompt_tokens if prompt_tokens is not None else (self.prompt_tokens or 0)
        return {"usage": {"prompt_tokens": p, "completion_tokens": tokens, "total_tokens": p + tokens}}

    def delta(self, index: int, text: str, tokens: int | None = None) -> bytes:
        extra = self._usage(tokens) if tokens is not None else {}
        return self._chunk(self.reply.endpoint.delta(index, text), **extra)

    def progress(self, event: dict[str, Any]) -> bytes:
        return self._chunk(self.reply.endpoint.delta(0, self.reply.endpoint.empty_text), ttscale={"progress": event})

    def error(self, body: dict[str, Any]) -> Iterator[bytes]:
        yield sse(body)
        yield DONE

    def closing(self, result: StrategyResult, ctx: RunContext, seconds: float, include_usage: bool) -> Iterator[bytes]:
        ep = self.reply.endpoint
        if not result.streamed:
            for ch in result.choices:
                for k in range(0, len(ch.text), STREAM_PIECE_CHARS):
                    yield self.delta(ch.index, ch.text[k : k + STREAM_PIECE_CHARS])
        info = ttscale_object(result, ctx, self.reply, seconds)
        last = result.choices[-1].index if result.choices else None
        prompt = ctx.usage.prompt_tokens or self.prompt_tokens
        for ch in result.choices:
            tokens = ch.candidate.num_tokens if ch.candidate is not None else 0
            yield self._chunk(
                ep.delta(ch.index, ep.empty_text, finish=ch.finish_reason),
                ttscale=info if ch.index == last else None,
                **self._usage(tokens, prompt),
            )
        if include_usage:
            yield sse({**self.head, "choices": [], "usage": ctx.usage.openai()})
        yield DONE
