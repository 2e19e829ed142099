"""`GET /metrics`: the engine's `metrics()` snapshot in Prometheus' text format.

Names use the `mlc:` prefix (vLLM's `vllm:` style). Three gauges are exported a second time
under the names the Kubernetes Gateway API Inference Extension's endpoint picker reads by
default (its model-server protocol asks for a queued-requests gauge and a KV-cache
utilization gauge, and names vLLM's): `vllm:num_requests_waiting`,
`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (0..1), so an InferencePool routes
to `mlc serve` without metric flags.

The collector reads one snapshot per scrape; nothing is recorded per token on the server.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mlc.runtime.metrics import HistogramSnapshot, MetricsSnapshot

FINISH_REASONS = ("stop", "length", "tool_calls", "abort")


class EngineCollector:
    """A Prometheus collector over `engine.metrics()`."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self.snapshot = snapshot

    def collect(self):
        m = self.snapshot()
        model = [m.model_name]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(model, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(model, value)
            return c

        for prefix in ("mlc", "vllm"):
            yield gauge(f"{prefix}:num_requests_running", "Requests in the running batch.",
                        m.running_requests)
            yield gauge(f"{prefix}:num_requests_waiting", "Requests queued for admission.",
                        m.waiting_requests)
            yield gauge(f"{prefix}:kv_cache_usage_perc",
                        "KV-cache utilization: the fraction of pages in use (0..1).",
                        m.kv_cache_utilization)
        finished = CounterMetricFamily("mlc:request_success", "Finished requests by reason.",
                                       labels=["model_name", "finished_reason"])
        for reason in sorted(set(FINISH_REASONS) | set(m.requests_finished)):
            finished.add_metric([m.model_name, reason], m.requests_finished.get(reason, 0))
        yield finished
        yield counter("mlc:prompt_tokens", "Prompt tokens of requests that started decoding.",
                      m.prompt_tokens)
        yield counter("mlc:generation_tokens", "Generated tokens.", m.generation_tokens)
        yield counter("mlc:num_preemptions", "Requests preempted for KV-cache room.",
                      m.preemptions)
        yield counter("mlc:prefix_cache_hit_tokens",
                      "Prompt tokens reused from the prefix cache instead of computed.",
                      m.prefix_cached_tokens)
        yield counter("mlc:spec_decode_num_draft_tokens", "Speculative tokens proposed.",
                      m.draft_tokens)
        yield counter("mlc:spec_decode_num_accepted_tokens",
                      "Speculative tokens the target model accepted.", m.accepted_draft_tokens)
        yield gauge("mlc:spec_decode_draft_acceptance_rate",
                    "Accepted / proposed speculative tokens (0 when none were proposed).",
                    m.accepted_draft_tokens / m.draft_tokens if m.draft_tokens else 0.0)
        yield _histogram("mlc:time_to_first_token_seconds",
                         "Time from arrival to the first generated token.", model,
                         m.time_to_first_token)
        yield _histogram("mlc:inter_token_latency_seconds",
                         "Time between consecutive tokens of a sequence.", model,
                         m.inter_token_latency)
        yield _histogram("mlc:e2e_request_latency_seconds",
                         "Time from arrival to the end of a request.", model,
                         m.e2e_request_latency)


def _histogram(name: str, doc: str, labels: list[str], h: HistogramSnapshot):
    family = HistogramMetricFamily(name, doc, labels=["model_name"])
    bounds = [*(f"{b:g}" for b in h.bounds), "+Inf"]
    family.add_metric(labels, list(zip(bounds, h.cumulative)), h.sum)
    return family


def metrics_registry(engine: Any) -> CollectorRegistry:
    """A registry of the engine's metrics only (one per app, not the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine.metrics))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
