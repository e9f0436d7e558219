"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ttscale.engine import ModelPool
from ttscale.engine.replicas import ReplicaPool
from ttscale.run import StrategyResult, Usage

SAMPLE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, pool: ModelPool) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ttscale_requests", "Requests answered", ["endpoint", "strategy", "status"], registry=r)
        self.in_flight = Gauge("ttscale_requests_in_flight", "Requests being served", registry=r)
        self.queued = Gauge(
            "ttscale_requests_queued", "Requests waiting for a slot (--max-queued-requests)", registry=r
        )
        self.queue_time = Histogram(
            "ttscale_queue_seconds", "Time requests waited for a slot", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "ttscale_request_seconds", "Request latency", ["strategy"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.samples = Histogram(
            "ttscale_samples_per_request", "Samples drawn per request", ["strategy"], buckets=SAMPLE_BUCKETS, registry=r
        )
        self.tokens = Counter("ttscale_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.stops = Counter("ttscale_stop_reasons", "Why sampling ended", ["strategy", "reason"], registry=r)
        self.tokens_saved = Counter(
            "ttscale_tokens_saved", "Tokens adaptive budgets saved vs the fixed-K plan", ["strategy"], registry=r
        )
        self.disconnects = Counter("ttscale_client_disconnects", "Clients that left before the answer", registry=r)
        self.engine_running = Gauge(
            "ttscale_engine_requests_running", "Requests the engine holds, per model", ["model"], registry=r
        )
        self._pool = pool
        r.register(_ReplicaCollector(pool))

    def observe(self, strategy: str, result: StrategyResult, seconds: float) -> None:
        """A request answered in full."""
        self.latency.labels(strategy).observe(seconds)
        self.samples.labels(strategy).observe(result.samples_used)
        self.stops.labels(strategy, result.stop_reason.value).inc()
        saved = result.details.get("tokens_saved")
        if isinstance(saved, int) and saved > 0:
            self.tokens_saved.labels(strategy).inc(saved)

    def count_tokens(self, usage: Usage) -> None:
        """Every request's tokens, answered or not (a dropped client's tokens were spent too)."""
        for name, m in usage.models.items():
            self.tokens.labels(name, "prompt").inc(m.prompt_tokens)
            self.tokens.labels(name, "completion").inc(m.completion_tokens)
            self.tokens.labels(name, "aborted").inc(m.aborted_tokens)
            self.tokens.labels(name, "prefill").inc(m.prefill_tokens)
            self.tokens.labels(name, "cached_prefill").inc(m.cached_prefill_tokens or 0)
            self.tokens.labels(name, "decode").inc(m.decode_tokens)

    def render(self) -> bytes:
        for eng in self._pool:
            self.engine_running.labels(eng.name).set(eng.num_running)
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    """Per replica of each replicated model: up, load, candidates placed, ejections, redraws."""

    def __init__(self, pool: ModelPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "replica"]
        up = GaugeMetricFamily("ttscale_replica_up", "Replica admitted (1) or ejected (0)", labels=labels)
        load = GaugeMetricFamily("ttscale_replica_in_flight", "Candidates this server has open there", labels=labels)
        others = GaugeMetricFamily(
            "ttscale_replica_other_requests", "Requests other clients keep there (its /metrics)", labels=labels
        )
        cands = CounterMetricFamily("ttscale_replica_candidates", "Candidates started there", labels=labels)
        fails = CounterMetricFamily("ttscale_replica_ejections", "Times it was ejected", labels=labels)
        redrawn = CounterMetricFamily(
            "ttscale_replica_redrawn", "Candidates lost with it and redrawn on another", labels=labels
        )
        for eng in self._pool:
            if not isinstance(eng, ReplicaPool):
                continue
            for rep in eng.replicas:
                lv = [eng.name, rep.url]
                up.add_metric(lv, 1.0 if rep.up else 0.0)
                load.add_metric(lv, rep.in_flight)
                others.add_metric(lv, rep.others)
                cands.add_metric(lv, rep.candidates)
                fails.add_metric(lv, rep.failures)
                redrawn.add_metric(lv, rep.redrawn)
        yield from (up, load, others, cands, fails, redrawn)
