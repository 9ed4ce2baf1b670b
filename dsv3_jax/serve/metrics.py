"""Prometheus metrics of the HTTP server and its engine (GET /metrics, prometheus_client text).

Counters and histograms are updated as requests come and go; the engine's gauges (queue depth,
running slots, speculative acceptance, prefix cache hits) are read from `engine.stats()` at
scrape time. Each server has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "dsv3"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Gauges read from the engine when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, key, doc in (("queue_depth", "queued", "requests waiting for a slot"),
                               ("running_slots", "active", "engine slots holding a request"),
                               ("prefilling_slots", "prefilling", "slots still prefilling"),
                               ("speculative_acceptance_rate", "acceptance_rate",
                                "accepted / drafted MTP tokens since start")):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(f"{PREFIX}_engine_healthy", "1 when the engine can step",
                                value=float(self.engine.healthy))
        for key, doc in (("decode_steps", "decode steps run"), ("prefills", "prefill calls run"),
                         ("prefix_cache_hit_tokens", "prompt tokens served from the prefix cache"),
                         ("prefix_cache_query_tokens", "prompt tokens looked up in the prefix cache")):
            if key in s:
                yield CounterMetricFamily(f"{PREFIX}_{key}", doc, value=float(s[key]))


class Metrics:
    """The server's metrics in their own registry."""

    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "submission to first generated token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "mean time between a request's generated tokens after the first",
                              buckets=_LATENCY, registry=r)
        r.register(_EngineCollector(engine))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def submitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def finished(self, request) -> None:
        """A request's generated tokens and latencies, once it ended."""
        n = len(request.tokens)
        self.generated_tokens.inc(n)
        if request.first_token_at is None:
            return
        self.ttft.observe(request.first_token_at - request.submitted_at)
        if n > 1 and request.finished_at is not None:
            self.tpot.observe((request.finished_at - request.first_token_at) / (n - 1))

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
