"""Batch sampling of an evaluation run: K samples per problem, drawn once, recorded per problem.

Problems run concurrently (``concurrency`` at a time); a problem's K samples are one fan-out
(``stream=False``), or ``batch``-sized fan-outs one after another for large K. Sample i of
problem p is drawn with seed ``problem_seed(run seed, p) + i``, so a resumed run draws exactly
what an uninterrupted one would, and a raw engine request with ``n=K, seed=problem_seed``
draws the same samples. vLLM is imported only when an engine starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ttscale.eval.data import KNOWN_SETS, Dataset, extract, grade, load_dataset
from ttscale.eval.prompts import PromptFormat, resolve_prompt
from ttscale.eval.store import RunStore, load_run

if TYPE_CHECKING:
    from ttscale.engine import Candidate, Engine


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "arith500"
    model: str = "ttscale-arith"
    verifier: str | None = None
    k: int = 16
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 512
    batch: int | None = None  # samples per fan-out (None: all K at once)
    concurrency: int = 8  # problems in flight
    keep_text: bool = True
    limit: int | None = None
    data_dir: str | None = None
    kv_cache_gib: float | None = None
    max_num_seqs: int | None = None
    # user-message template (a preset name of ttscale.eval.prompts, or a template holding
    # {problem}; None: the dataset's default) and system prompt (None: none)
    prompt_template: str | None = None
    system_prompt: str | None = None
    # vLLM engine options of the in-process models, by field name (``ttscale eval run ...
    # --gpu-memory-utilization 0.45 --tensor-parallel-size 2``); recorded, not part of the config
    # a resume must match (a run may continue on other hardware)
    engine: tuple[tuple[str, Any], ...] = ()

    def prompt(self, dataset: str) -> PromptFormat:
        """The run's prompt format on ``dataset`` (ValueError naming the option on bad input)."""
        return resolve_prompt(dataset, self.prompt_template, self.system_prompt)

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "logprobs": 0}


def problem_seed(run_seed: int, problem_id: str) -> int:
    """Base seed of a problem: a 30-bit hash of (run seed, problem id); sample i uses base + i."""
    h = hashlib.blake2b(f"{run_seed}\x00{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 34


def sample_seed(run_seed: int, problem_id: str, i: int) -> int:
    return problem_seed(run_seed, problem_id) + i


def manifest_for(cfg: RunConfig, ds: Dataset) -> dict[str, Any]:
    import ttscale

    return {
        "version": 1,
        "ttscale_version": ttscale.__version__,
        "dataset": ds.name,
        "dataset_source": ds.source,
        "dataset_fingerprint": ds.fingerprint(),
        "n_problems": len(ds.problems),
        "has_levels": ds.has_levels,
        "model": cfg.model,
        "verifier": cfg.verifier,
        "k": cfg.k,
        "seed": cfg.seed,
        "sampling": cfg.sampling(),
        "prompt": cfg.prompt(ds.name).to_dict(),
        "batch": cfg.batch,
        "concurrency": cfg.concurrency,
        "keep_text": cfg.keep_text,
        "limit": cfg.limit,
        "engine": _jsonable(dict(cfg.engine)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def chat_prompt(problem: str, prompt: PromptFormat | None = None) -> list[dict[str, str]]:
    """The chat messages of ``problem`` in ``prompt``'s format (default: the problem alone)."""
    return (prompt or PromptFormat()).messages(problem)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as JSON values (vLLM's parser may return enums or other objects, also inside
    lists and dicts: those become their ``str``)."""
    out: dict[str, Any] = json.loads(json.dumps(options, default=str))
    return out


def _engine_opts(kv_cache_gib: float | None, max_num_seqs: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if kv_cache_gib:
        opts["kv_cache_gib"] = kv_cache_gib
    if max_num_seqs:
        opts["max_num_seqs"] = max_num_seqs
    return opts


def _build(
    arg: str, opts: dict[str, Any], engine: dict[str, Any], role: Literal["generate", "score"] | None = None
) -> Engine:
    """The engine of model argument ``arg``; ``engine`` (vLLM options) applies when it runs in-process."""
    from ttscale.engine import build_engine, parse_model_arg, with_engine_options

    spec = parse_model_arg(arg)
    if role:
        spec = replace(spec, role=role)
    if engine and not spec.is_upstream:
        spec = replace(with_engine_options(spec, engine), name=spec.name, aliases=spec.aliases)
    return build_engine(spec, **opts)


def check_engine_options(models: list[str | None], engine: dict[str, Any]) -> None:
    """ValueError when vLLM engine options are given but every model is an HTTP upstream."""
    from ttscale.engine import parse_model_arg

    if engine and all(parse_model_arg(m).is_upstream for m in models if m):
        raise ValueError(
            f"vLLM engine options ({', '.join('--' + k.replace('_', '-') for k in engine)}) apply to models "
            "run in-process; every model of this run is an HTTP upstream, which has its own"
        )


def build_engines(cfg: RunConfig) -> tuple[Engine, Engine | None]:
    """(policy, verifier or None) for the configured models; not started."""
    opts = _engine_opts(cfg.kv_cache_gib, cfg.max_num_seqs)
    engine = dict(cfg.engine)
    policy = _build(cfg.model, opts, engine)
    verifier = _build(cfg.verifier, opts, engine, role="score") if cfg.verifier else None
    return policy, verifier


class EvalRunner:
    """Draws and records the samples of one run (engines started by the caller or by :meth:`run`)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        policy: Engine | None = None,
        verifier: Engine | None = None,
        dataset: Dataset | None = None,
        progress: bool | None = None,
        force: bool = False,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ds = dataset or load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.limit)
        self.prompt = cfg.prompt(self.ds.name)
        self.policy = policy
        self.verifier = verifier
        self.force = force
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.tokens = 0  # decode: the samples' tokens
        self.prefill_tokens = 0
        self.cached_prefill_tokens = 0
        self.samples = 0
        self.recorded = 0

    def _samples(self, cands: Sequence[Candidate], scores: Sequence[float | None], gold: str) -> list[dict[str, Any]]:
        cfg = self.cfg
        samples = []
        for i, (c, s) in enumerate(zip(cands, scores)):
            ans = extract(c.text, self.ds.kind)
            rec: dict[str, Any] = {"i": i, "seed": c.settings.seed}
            if cfg.keep_text:
                rec["text"] = c.text
            mlp = c.mean_logprob
            slp = c.sum_logprob
            rec.update(
                {
                    "answer": ans,
                    "correct": grade(ans, gold),
                    "tokens": c.num_tokens,
                    "finish": c.finish_reason,
                    "mean_logprob": None if mlp is None else round(mlp, 6),
                    "sum_logprob": None if slp is None else round(slp, 4),
                    "latency_s": round((c.finished_at or 0.0) - (c.started_at or 0.0), 4),
                }
            )
            if s is not None:
                rec["score"] = round(float(s), 6)
            samples.append(rec)
        return samples

    async def solve(self, p: dict[str, Any]) -> dict[str, Any]:
        from ttscale.engine import SamplingSettings
        from ttscale.scorers import with_answer

        cfg = self.cfg
        policy = self.policy
        assert policy is not None, "run() builds the engines"
        prompt = chat_prompt(p["problem"], self.prompt)
        base = SamplingSettings(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            seed=problem_seed(cfg.seed, p["id"]),
            logprobs=0,
        )
        settings = base.replicate(cfg.k)
        step = cfg.batch or cfg.k
        t0 = time.perf_counter()
        cands: list[Candidate] = []
        prompt_tokens = prefill = 0
        cached: int | None = None  # None: the engine reported no prefix-cache hits
        for lo in range(0, cfg.k, step):
            async with policy.fanout(prompt, settings[lo : lo + step], stream=False, together=True) as fo:
                await fo.wait()
            cands.extend(fo.candidates)
            prompt_tokens = fo.prompt_tokens
            pre = fo.prefill
            prefill += pre.tokens
            if pre.cached is not None:
                cached = (cached or 0) + pre.cached
        scores: Sequence[float | None] = [None] * len(cands)
        if self.verifier is not None:
            scores = await self.verifier.score([with_answer(prompt, policy, c.text) for c in cands])
        # Grading (math-verify) is CPU work: off the event loop, so the engine keeps being fed.
        samples = await asyncio.to_thread(self._samples, cands, scores, p["answer"])
        out: dict[str, Any] = {"id": p["id"]}
        for key in ("level", "subject"):
            if key in p:
                out[key] = p[key]
        out.update(
            {
                "gold": p["answer"],
                "prompt_tokens": prompt_tokens,
                "prefill_tokens": prefill,
                "cached_prefill_tokens": cached,
                "wall_s": round(time.perf_counter() - t0, 4),
                "finished_at": round(time.time(), 3),  # with wall_s: when the engine had this problem
                "samples": samples,
            }
        )
        return out

    async def run(self) -> dict[str, Any]:
        """Sample every unfinished problem; returns a short summary."""
        if self.policy is None:
            check_engine_options([self.cfg.model, self.cfg.verifier], dict(self.cfg.engine))
        store = RunStore(self.out_dir)
        done = store.open(manifest_for(self.cfg, self.ds), force=self.force)
        todo = [p for p in self.ds.problems if p["id"] not in done]
        own = self.policy is None
        if own:
            from ttscale.engine import ModelPool

            self.policy, self.verifier = build_engines(self.cfg)
            # through the pool: on a GPU the policy and its verifier split the device by the plan
            await ModelPool([e for e in (self.policy, self.verifier) if e is not None]).start()
        t0 = time.perf_counter()
        try:
            with _Progress(self.progress, len(self.ds.problems), len(done), self.cfg.k) as bar:
                queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
                for p in todo:
                    queue.put_nowait(p)

                async def worker() -> None:
                    while not queue.empty():
                        p = queue.get_nowait()
                        rec = await self.solve(p)
                        store.append(rec)
                        toks = sum(s["tokens"] for s in rec["samples"])
                        self.tokens += toks
                        self.prefill_tokens += rec["prefill_tokens"]
                        self.cached_prefill_tokens += rec["cached_prefill_tokens"] or 0
                        self.samples += len(rec["samples"])
                        self.recorded += 1
                        bar.advance(len(rec["samples"]), toks)

                await asyncio.gather(*(worker() for _ in range(max(1, self.cfg.concurrency))))
        finally:
            store.close()
            if own:
                if self.verifier is not None:
                    await self.verifier.close()
                if self.policy is not None:  # built above
                    await self.policy.close()
        wall = time.perf_counter() - t0
        return {
            "run_dir": str(self.out_dir),
            "problems": len(self.ds.problems),
            "resumed_with": len(done),
            "recorded": self.recorded,
            "samples": self.samples,
            "tokens": self.tokens,
            "prefill_tokens": self.prefill_tokens,
            "cached_prefill_tokens": self.cached_prefill_tokens,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(self.tokens / wall, 1) if wall > 0 else 0.0,
        }


class _Progress:
    """Problems and samples bars with tokens/s and ETA (rich), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, k: int):
        self.enabled = enabled
        self.total, self.done, self.k = total, done, k
        self.t0 = time.perf_counter()
        self.tokens = 0

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar.__enter__()
        self.t_prob = self.bar.add_task("problems", total=self.total, completed=self.done, rate="")
        self.t_samp = self.bar.add_task("samples", total=self.total * self.k, completed=self.done * self.k, rate="")
        return self

    def advance(self, samples: int, tokens: int) -> None:
        if not self.enabled:
            return
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.update(self.t_prob, advance=1, rate="")
        self.bar.update(self.t_samp, advance=samples, rate=f"{rate:,.0f} tok/s")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)


def run_sync(cfg: RunConfig, out_dir: str | Path, **kw: Any) -> dict[str, Any]:
    return asyncio.run(EvalRunner(cfg, out_dir, **kw).run())


async def rescore(
    src: str | Path,
    out_dir: str | Path,
    verifier: str,
    *,
    data_dir: str | None = None,
    concurrency: int = 4,
    kv_cache_gib: float | None = None,
    max_num_seqs: int | None = None,
    engine: Engine | None = None,
    engine_options: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score the recorded samples of run ``src`` with another ``verifier`` into ``out_dir``.

    The samples (texts, answers, grades, tokens) are copied; only ``score`` is new, read by
    the verifier exactly as ``run --verifier`` would have read it.  No sample is redrawn, so
    verifiers can be compared on the same samples.  Resumable like ``run``.  ``engine_options``:
    vLLM engine options of an in-process verifier.
    """
    from ttscale.scorers import with_answer

    check_engine_options([verifier], engine_options or {})

    src, out_dir = Path(src), Path(out_dir)
    if src.resolve() == out_dir.resolve():
        raise ValueError("rescore writes a new run directory: --out must differ from the source run")
    manifest, records = load_run(src)
    if not manifest.get("keep_text", True) or any("text" not in s for r in records for s in r["samples"]):
        raise ValueError(f"{src} was recorded without completion texts (--no-text): nothing to score")
    name = manifest["dataset"]
    spec = name if name in KNOWN_SETS or name.startswith("hf:") else manifest.get("dataset_source") or name
    ds = load_dataset(spec, data_dir=data_dir, limit=manifest.get("limit"))
    if ds.fingerprint() != manifest.get("dataset_fingerprint"):
        raise ValueError(f"dataset {manifest['dataset']!r} differs from the one {src} was drawn on")
    problems = {p["id"]: p["problem"] for p in ds.problems}
    fmt = PromptFormat.from_dict(manifest.get("prompt"))  # the verifier reads what the run's policy read
    new = {
        **manifest,
        "verifier": verifier,
        "rescored_from": str(src),
        "engine": _jsonable(dict(engine_options or {})),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    store = RunStore(out_dir)
    done = store.open(new, force=force)
    todo = [r for r in records if r["id"] not in done]
    own = engine is None
    if engine is None:
        engine = _build(verifier, _engine_opts(kv_cache_gib, max_num_seqs), dict(engine_options or {}), role="score")
        await engine.start()
    scorer: Engine = engine
    t0 = time.perf_counter()
    n_samples = 0
    try:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for r in todo:
            queue.put_nowait(r)

        async def worker() -> None:
            nonlocal n_samples
            while not queue.empty():
                r = queue.get_nowait()
                prompt = chat_prompt(problems[r["id"]], fmt)
                # a chat prompt: with_answer needs no policy tokenizer, any engine will do
                scores = await scorer.score([with_answer(prompt, scorer, s["text"]) for s in r["samples"]])
                store.append(
                    {**r, "samples": [{**s, "score": round(float(x), 6)} for s, x in zip(r["samples"], scores)]}
                )
                n_samples += len(scores)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        store.close()
        if own:
            await scorer.close()
    return {
        "run_dir": str(out_dir),
        "source": str(src),
        "problems": len(records),
        "resumed_with": len(done),
        "rescored": len(todo),
        "samples": n_samples,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def rescore_sync(src: str | Path, out_dir: str | Path, verifier: str, **kw: Any) -> dict[str, Any]:
    return asyncio.run(rescore(src, out_dir, verifier, **kw))


__all__ = ["EvalRunner", "RunConfig", "asdict", "problem_seed", "rescore", "rescore_sync", "run_sync", "sample_seed"]
