"""What the engine reports about itself: `engine.stats()` (counts for people and tests) and
`engine.metrics()` (the counters, gauges and histograms `GET /metrics` exports).

The loop thread records once per step; readers on other threads get snapshots.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# Bucket bounds in seconds (vLLM's, so existing dashboards read them alike).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class EngineStats:
    """A snapshot of the engine's queues, KV cache and cumulative work."""

    running_requests: int
    waiting_requests: int          # queued for admission (submitted, not yet running)
    kv_pages_total: int
    kv_pages_free: int
    kv_cache_utilization: float    # 0..1
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_steps: int
    decode_seconds: float
    preemptions: int
    finished_requests: dict[str, int]  # by finish reason
    prefix_cache_pages: int = 0        # of kv_pages_free: held by cached prefixes (estimate)
    prefix_cached_tokens: int = 0      # tokens admitted from the prefix cache (not computed)
    prefix_evictions: int = 0
    draft_tokens: int = 0              # speculative tokens proposed
    accepted_draft_tokens: int = 0     # of those, accepted by the target
    acceptance_rate: float = 0.0       # accepted_draft_tokens / draft_tokens


@dataclass
class HistogramSnapshot:
    """Cumulative bucket counts (one per bound, then +Inf), the sum and the count."""

    bounds: tuple[float, ...]
    cumulative: list[int]
    sum: float
    count: int


class Histogram:
    """Fixed-bucket histogram (no dependencies; the server turns it into Prometheus')."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def snapshot(self) -> HistogramSnapshot:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return HistogramSnapshot(self.bounds, cumulative, self.sum, total)


@dataclass
class MetricsSnapshot:
    """Everything `GET /metrics` exports, read at one moment."""

    model_name: str
    requests_finished: dict[str, int]       # by finish reason
    prompt_tokens: int
    generation_tokens: int
    preemptions: int
    running_requests: int
    waiting_requests: int
    kv_cache_utilization: float
    time_to_first_token: HistogramSnapshot
    inter_token_latency: HistogramSnapshot
    e2e_request_latency: HistogramSnapshot
    extra: dict[str, float] = field(default_factory=dict)
    prefix_cached_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


class RequestMetrics:
    """Latency histograms and token counters, recorded by the loop thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}

    def record_step(self, tokens: list[tuple[object, int]], now: float) -> None:
        """Each (sequence, tokens it took) of one step; TTFT at a request's first token."""
        with self.lock:
            for seq, n in tokens:
                if not n:
                    continue
                req = seq.request
                self.generation_tokens += n
                if req.first_token_time is None:
                    req.first_token_time = now
                    self.prompt_tokens += len(req.prompt_ids)
                    self.ttft.observe(now - req.arrival)
                elif seq.last_token_time is not None:
                    self.itl.observe((now - seq.last_token_time) / n, n)
                seq.last_token_time = now

    def record_finished(self, req, reason: str, now: float) -> None:
        """A request ended (its reason: the first choice's, or "abort")."""
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(now - req.arrival)
