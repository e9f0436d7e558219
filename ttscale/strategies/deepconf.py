"""``deepconf``: DeepConf online (Fu, Wang, Tian, Zhao, 2025; arXiv 2508.15260), the policy's own
confidence as the early-stopping signal; no verifier.

1. **Warm-up**: ``warmup`` traces (N_init = 16) run to the end; each one's lowest group confidence
   (the minimum over sliding windows of ``window`` tokens of the per-token confidence
   ``C_i = -mean(top-k log-probs)``, k = 20) is computed.
2. **Threshold** ``s`` = the ``100·(1−keep)``-th percentile of the warm-up values: ``keep`` = 0.1
   is DeepConf-low (aggressive), 0.9 DeepConf-high (conservative).
3. **Final phase**: the remaining traces of the budget start at once. Each one is watched token by
   token; once its window is full and the window's mean falls below ``s`` it is aborted in the
   engine. As each trace finishes, the consensus ``β = V(top answer) / Σ V`` of the
   confidence-weighted vote is updated; at ``β ≥ consensus`` (τ = 0.95) every trace still running
   is aborted. No trace starts once the consensus holds, so a warm-up that agrees ends the run
   there; a consensus needs two voters at least (one trace agreeing with itself is none).
4. **Vote**: warm-up traces with lowest group confidence ≥ ``s`` and final traces that were not
   stopped, each weighted by its lowest group confidence.

``keep`` defaults to DeepConf-high (0.9): on the embedded model DeepConf-low kept one warm-up trace
in four and lost a third of the accuracy (`bench/results/adaptive.json`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import numpy as np
from pydantic import Field

from ttscale import selection as S
from ttscale.engine import Candidate, CandidateEvent
from ttscale.run import JSON, RunContext, StopReason, StrategyResult
from ttscale.selection import vote
from ttscale.strategies import register
from ttscale.strategies.base import Sampler
from ttscale.strategies.parallel import AnswerTracker, ParallelOptions, ParallelStrategy, Pool


class DeepConfOptions(ParallelOptions):
    samples: int = Field(default=64, ge=1, le=4096, description="the trace budget B (when the budget sets none)")
    warmup: int = Field(default=16, ge=1, le=4096, description="N_init: warm-up traces that set the threshold")
    keep: float = Field(
        default=0.9, gt=0.0, lt=1.0, description="η, the share of traces kept: 0.9 DeepConf-high, 0.1 DeepConf-low"
    )
    window: int = Field(default=2048, ge=1, le=1 << 20, description="group-confidence window (tokens)")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="k of the token confidence")
    consensus: float = Field(
        default=0.95, gt=0.5, le=1.0, description="τ: stop at this weighted vote share (1: never stop early)"
    )


class _Watch:
    """The sliding window of one running trace's token confidences."""

    __slots__ = ("buf", "k", "seen", "total", "window")

    def __init__(self, window: int, k: int):
        self.window, self.k = window, k
        self.buf: deque[float] = deque()
        self.total = 0.0
        self.seen = 0

    def low(self, c: Candidate, threshold: float) -> bool:
        """Read the tokens ``c`` has added since the last call; True once a full window's mean
        is below ``threshold``."""
        rows = c.top_logprobs or []
        low = False
        while self.seen < len(rows):
            vals = [lp for _, lp in rows[self.seen][: self.k] if math.isfinite(lp)]
            ci = -sum(vals) / len(vals) if vals else 0.0
            self.seen += 1
            self.buf.append(ci)
            self.total += ci
            if len(self.buf) > self.window:
                self.total -= self.buf.popleft()
            if len(self.buf) == self.window and self.total / self.window < threshold:
                low = True
        return low


def lowest_group(c: Candidate, window: int, k: int) -> float:
    """DeepConf's ``min_conf`` of a trace (0 without log-probs)."""
    if not c.top_logprobs:
        return 0.0
    return S.lowest_group_confidence(S.candidate_confidence(c.top_logprobs, k=k), window)


class _Vote:
    """The confidence-weighted vote as traces join it (answers clustered incrementally)."""

    def __init__(self) -> None:
        self.tracker = AnswerTracker()
        self.members: list[Candidate] = []
        self.weights: list[float] = []

    async def add(self, c: Candidate, weight: float) -> None:
        await self.tracker.add(c)
        self.members.append(c)
        self.weights.append(max(weight, 0.0))

    def share(self) -> float:
        """β: the top answer's share of all weight (answerless traces hold none)."""
        by: dict[int, float] = {}
        for cid, w in zip(self.tracker.clusters.ids(), self.weights):
            if cid is not None:
                by[cid] = by.get(cid, 0.0) + w
        total = sum(by.values())
        return max(by.values()) / total if total > 0 else 0.0


@register
class DeepConf(ParallelStrategy[DeepConfOptions]):
    name = "deepconf"
    summary = "DeepConf online: warm-up sets a confidence threshold; low-confidence traces are aborted; weighted vote"
    Options = DeepConfOptions
    supports_auto = False
    # the consensus stop depends on the order in which traces finish
    deterministic = False

    async def run(self, ctx: RunContext) -> StrategyResult:
        o = self.options
        budget = self.planned(ctx)
        warm_n = min(o.warmup, budget)  # a budget below N_init is all warm-up
        k = o.top_logprobs
        want = k if ctx.settings.logprobs is None else max(ctx.settings.logprobs, k)
        base = replace(ctx.settings, logprobs=want)

        # 1. warm-up: full traces
        warm_sampler = Sampler(ctx)
        warm = await warm_sampler.run(base.replicate(warm_n))
        finished_warm = [c for c in warm if not c.aborted]
        confs = {id(c): lowest_group(c, o.window, k) for c in warm}
        stop_reason = warm_sampler.stop_reason
        threshold = (
            float(np.percentile([confs[id(c)] for c in finished_warm], 100.0 * (1.0 - o.keep)))
            if finished_warm
            else math.inf
        )
        ballot = _Vote()
        for c in finished_warm:
            if confs[id(c)] >= threshold:
                await ballot.add(c, confs[id(c)])
        if not ballot.members:  # nothing cleared the threshold (e.g. a single warm-up trace): all vote
            for c in finished_warm:
                await ballot.add(c, confs[id(c)])

        # 2. final phase: the rest at once, each watched; consensus ends the run
        stopped: set[int] = set()
        final: list[Candidate] = []
        share = ballot.share()
        rest = budget - len(warm)
        consensus_at: int | None = None

        def reached(share: float) -> bool:
            return o.consensus < 1.0 and share >= o.consensus and len(ballot.members) >= 2

        if stop_reason == StopReason.COMPLETE and rest > 0 and not reached(share):
            sampler = Sampler(ctx, aborts_each=True)  # low-confidence traces stop one by one
            watches: dict[int, _Watch] = {}

            async def on_event(ev: CandidateEvent) -> None:
                nonlocal share, consensus_at
                c = ev.candidate
                if id(c) in stopped:
                    return
                if not ev.finished:
                    w = watches.setdefault(id(c), _Watch(o.window, k))
                    if w.low(c, threshold):
                        stopped.add(id(c))
                        await sampler.abort(c)
                        await ctx.progress(
                            {"type": "stopped", "tokens": c.num_tokens, "threshold": round(threshold, 6)}
                        )
                    return
                if c.aborted:
                    return
                conf = lowest_group(c, o.window, k)
                confs[id(c)] = conf
                await ballot.add(c, conf)
                share = ballot.share()
                await ctx.progress({"type": "sample", "voters": len(ballot.members), "share": round(share, 6)})
                if reached(share) and consensus_at is None:
                    consensus_at = len(ballot.members)
                    sampler.stop(StopReason.EARLY_STOP)

            final = await sampler.run(
                base.replicate(rest, first_index=len(warm)), on_event=on_event, stream=True, text=False
            )
            stop_reason = sampler.stop_reason
        elif stop_reason == StopReason.COMPLETE and rest > 0:
            stop_reason = StopReason.EARLY_STOP  # the warm-up alone holds the consensus

        cands = [*warm, *final]
        voters = {id(c) for c in ballot.members}
        pool = await Pool.build(cands, known=ballot.tracker.answers)
        weights = [confs.get(id(c), 0.0) if id(c) in voters else 0.0 for c in cands]
        clusters = [cl if id(c) in voters else None for c, cl in zip(cands, pool.clusters)]
        v = vote(clusters, weights, tie_scores=weights, finish_order=[c.finished_at or math.inf for c in cands])
        early = [c for c in final if id(c) in stopped]
        extra: dict[str, JSON] = {
            "threshold": round(threshold, 6) if math.isfinite(threshold) else None,
            "keep": o.keep,
            "warmup": len(warm),
            "voters": len(voters),
            "stopped_low_confidence": len(early),
            "tokens_of_stopped": sum(c.num_tokens for c in early),
            "consensus": round(share, 6),
            "consensus_at_voters": consensus_at,
            "confidences": [round(confs[id(c)], 6) if id(c) in confs else None for c in cands],
        }
        return self.result(pool, v.representative, stop_reason=stop_reason, cluster_scores=v.scores, extra=extra)
