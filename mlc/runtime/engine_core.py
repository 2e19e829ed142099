"""The engine loop: one thread owns the model, its KV cache and the three parts of a step.

    step() = schedule (Scheduler) -> run (a step action on the ModelRunner)
             -> postprocess (OutputProcessor, then finish and deliver)

Other threads talk to the loop only through `submit`, `submit_embedding`, `abort`, `shutdown`
and the read-only `stats()` / `metrics()`. Every output of a step reaches its request's sink
once per step. Embedding work (`mlc.runtime.embeddings`) runs between steps, one batch each.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from mlc.errors import EngineTerminatedError, MLCError
from mlc.runtime.embeddings import EmbeddingJob, EmbeddingQueue
from mlc.runtime.metrics import EngineStats, MetricsSnapshot, RequestMetrics
from mlc.runtime.model_runner import ModelRunner
from mlc.runtime.output_processor import OutputProcessor
from mlc.runtime.request import ChoiceDelta, EngineLimits, Request, RequestOutput, StepCounters
from mlc.runtime.scheduler import Scheduler, StepKind
from mlc.runtime.step import make_actions
from mlc.runtime.tracing import Tracer

logger = logging.getLogger(__name__)


class EngineCore:
    """Continuous batching over a `ModelRunner` in a background thread."""

    def __init__(self, runner: ModelRunner, limits: EngineLimits, sampler,
                 tracer: Tracer | None = None, model_name: str = "",
                 prefix_cache: bool = True,
                 speculation: tuple[Any, int] | None = None):
        """`speculation`: (drafter, draft length) (`mlc.runtime.speculation`), or None."""
        self.limits = limits
        self.model_name = model_name
        self.tracer = tracer or Tracer(enabled=False)
        self.counters = StepCounters()
        drafter, k = (speculation or (None, 0))
        self.scheduler = Scheduler(runner, limits, self.counters, self.tracer,
                                   prefix_cache=prefix_cache, drafter=drafter,
                                   spec_draft_length=k)
        self.actions = make_actions(runner, self.scheduler, self.counters, self.tracer,
                                    features=getattr(drafter, "features", None))
        self.outputs = OutputProcessor(sampler, limits, self.tracer)
        self.embeddings = EmbeddingQueue(runner, self.scheduler, limits.max_batch_size,
                                         limits.prefill_chunk_size, runner.hidden_size)
        self.request_metrics = RequestMetrics()
        # On an asynchronous device, a step's outputs are handed on once the next step was
        # launched: the consumers (an event loop: SSE, JSON) then share the GIL with the
        # device's time instead of with this thread's launches. On the CPU the model call
        # is the compute itself, and with speculation the next step first runs the drafter
        # (in `schedule`), so there they go at once.
        self.deliver_after_launch = runner.device_kind != "cpu" and drafter is None
        self._unflushed: dict[Any, None] = {}     # sinks' flush callables, in order
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlc-engine", daemon=True)
        self._thread.start()

    # -- for other threads -----------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self._stop.is_set():
            raise EngineTerminatedError("The engine has been terminated; create a new one.")
        self._inbox.put(("add", request))

    def submit_embedding(self, job: EmbeddingJob) -> None:
        """Queue embedding work; its results (or error) arrive on `job.future`."""
        if self._stop.is_set():
            raise EngineTerminatedError("The engine has been terminated; create a new one.")
        self._inbox.put(("embed", job))

    def abort(self, request_id: str) -> None:
        if not self._stop.is_set():
            self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._inbox.put(("wake", None))
            self._thread.join(timeout=60)

    def is_alive(self) -> bool:
        return not self._stop.is_set() and self._thread.is_alive()

    def stats(self) -> EngineStats:
        s, c = self.scheduler, self.counters
        queued = sum(1 for kind, _ in list(self._inbox.queue) if kind == "add")
        return EngineStats(
            running_requests=len(s.running), waiting_requests=len(s.waiting) + queued,
            kv_pages_total=s.kv.total_pages, kv_pages_free=s.free_pages,
            kv_cache_utilization=s.kv_cache_utilization(), prefill_tokens=c.prefill_tokens,
            prefill_seconds=c.prefill_seconds, decode_tokens=c.decode_tokens,
            decode_steps=c.decode_steps, decode_seconds=c.decode_seconds,
            preemptions=c.preemptions, finished_requests=dict(c.finished_requests),
            prefix_cache_pages=s.cached_pages, prefix_cached_tokens=c.prefix_cached_tokens,
            prefix_evictions=c.prefix_evictions, draft_tokens=c.draft_tokens,
            accepted_draft_tokens=c.accepted_draft_tokens,
            acceptance_rate=c.accepted_draft_tokens / c.draft_tokens if c.draft_tokens else 0.0)

    def metrics(self) -> MetricsSnapshot:
        st, m = self.stats(), self.request_metrics
        with m.lock:
            return MetricsSnapshot(
                self.model_name, dict(m.finished), m.prompt_tokens, m.generation_tokens,
                st.preemptions, st.running_requests, st.waiting_requests,
                st.kv_cache_utilization, m.ttft.snapshot(), m.itl.snapshot(), m.e2e.snapshot(),
                prefix_cached_tokens=st.prefix_cached_tokens, draft_tokens=st.draft_tokens,
                accepted_draft_tokens=st.accepted_draft_tokens)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox(block=not (self.scheduler.has_work()
                                         or self.embeddings.has_work()))
            if self._stop.is_set():
                break
            self.embeddings.step()      # fails only its own inputs' requests
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - one failing step must not kill the engine
                logger.exception("engine step failed")
                for req in list(self.scheduler.running):
                    self._fail(req, e)
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(req, EngineTerminatedError("The engine was terminated."))
        self.embeddings.fail_all(EngineTerminatedError("The engine was terminated."))
        while not self._inbox.empty():      # submitted after the loop's last look
            kind, payload = self._inbox.get_nowait()
            if kind == "embed":
                payload.fail(EngineTerminatedError("The engine was terminated."))
            elif kind == "add":
                self._fail(payload, EngineTerminatedError("The engine was terminated."))

    def _drain_inbox(self, block: bool) -> None:
        if block:
            self._flush()                   # nothing to step: hand on what is pending first
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self.scheduler.add(payload)
            elif kind == "embed":
                self.embeddings.add(payload)
            elif kind == "abort":
                req = self.scheduler.abort(payload)
                if req is not None:
                    self._finish_request(req, [ChoiceDelta(i, "", [], None, "abort")
                                               for i in _unfinished_indices(req)])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One engine step: schedule, run, postprocess."""
        batch = self.scheduler.schedule()
        if batch is None:
            self._flush()
            return
        t0 = time.perf_counter()
        action = self.actions[batch.kind]
        result = action.run(batch)
        self._flush()                       # the last step's outputs (see __init__)
        if batch.kind is StepKind.VERIFY:
            deltas = self.outputs.process_verify(result)
            action.commit(result)           # pop rejected drafts before choices end
            deltas += [(s, self.outputs.final_delta(s, "length")) for s in batch.ended]
        else:
            deltas = self.outputs.process(result, batch.ended)
        if batch.kind is StepKind.PREFILL:
            self.counters.prefill_seconds += time.perf_counter() - t0
        else:
            self.counters.decode_seconds += time.perf_counter() - t0
        self._postprocess(deltas)
        if not self.deliver_after_launch:
            self._flush()

    def _postprocess(self, deltas) -> None:
        """End finished choices (freeing their pages), record metrics, hand each request its
        step's deltas in one output, and drop finished requests."""
        now = time.monotonic()
        self.request_metrics.record_step([(s, len(d.token_ids)) for s, d in deltas], now)
        by_request: dict[str, tuple[Request, list[ChoiceDelta]]] = {}
        for seq, delta in deltas:
            if delta.finish_reason:
                self.scheduler.finish(seq, delta.finish_reason)
            by_request.setdefault(seq.request.request_id, (seq.request, []))[1].append(delta)
        for req in self.scheduler.release_finished():
            self._record_finished(req, now)
        for req, ds in by_request.values():
            self._deliver(req, req.output(ds))

    # -- ending requests -------------------------------------------------------------------
    def _record_finished(self, req: Request, now: float) -> None:
        reason = next((s.finish_reason for s in req.seqs if s.finish_reason), "abort")
        self.counters.finished_requests[reason] = \
            self.counters.finished_requests.get(reason, 0) + 1
        self.request_metrics.record_finished(req, reason, now)

    def _finish_request(self, req: Request, deltas: list[ChoiceDelta]) -> None:
        """Deliver the final output of a request the scheduler already removed."""
        self._record_finished(req, time.monotonic())
        out = RequestOutput(req.request_id, deltas, True, len(req.prompt_ids), req.num_generated,
                            cached_tokens=req.cached_tokens)
        self._deliver(req, out)

    def _fail(self, req: Request, error: Exception) -> None:
        try:
            self.scheduler.remove(req, "abort")
        except Exception:  # noqa: BLE001 - the cache may be the thing that failed
            for seq in req.seqs:
                seq.in_cache = False
        err = error if isinstance(error, MLCError) else MLCError(
            f"Internal engine error while running the request: {error!r}")
        self._deliver(req, RequestOutput(req.request_id, [], True, error=err))
        self._flush()                       # (errors go out at once)

    def _deliver(self, req: Request, out: RequestOutput) -> None:
        try:
            req.sink(out)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the loop
            logger.exception("output sink of %s failed", req.request_id)
        flush = getattr(req.sink, "flush", None)
        if flush is not None:
            self._unflushed[flush] = None

    def _flush(self) -> None:
        """Let the sinks hand on what this thread gave them (`OutputSink.flush`)."""
        while self._unflushed:
            flush = next(iter(self._unflushed))
            del self._unflushed[flush]
            try:
                flush()
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the loop
                logger.exception("flushing an output sink failed")


def _unfinished_indices(req: Request) -> list[int]:
    """The choices an abort ends: those it found unfinished, and all n choices of a request
    whose other choices were not forked yet."""
    if not req.forked:
        return list(range(req.config.n))
    return [s.index for s in req.seqs if s.finish_reason == "abort"]


__all__ = ["EngineCore", "EngineLimits", "Request", "RequestOutput"]
