"""The Scheduler: request queues, admission, preemption and the KV-page budget.

Each `schedule()` admits waiting requests that fit (batch slots and KV pages), then picks the
next step: a prefill of prompt chunks (several sequences' chunks together, up to
`prefill_chunk_size` tokens) or a decode of every running sequence, alternating when both
wait so neither starves. When the KV cache cannot hold the step, the newest request is
preempted (its pages freed, its tokens kept, recomputed later). The page size is the
library's (`KVCacheManager.page_size`, from its metadata). The prefix tree lands here later.

The Scheduler owns which sequences are in the KV cache: every page is freed by `finish`
(a choice ends: stop, length, abort) or `preempt`, nowhere else.
"""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field

from mlc.runtime.model_runner import KVCacheManager
from mlc.runtime.request import EngineLimits, Request, Sequence, StepCounters
from mlc.runtime.tracing import Tracer


class StepKind(enum.Enum):
    """What a scheduled step runs (draft and verify join these with speculation)."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class ScheduledBatch:
    """One step's work: `chunks[i]` are the tokens `seqs[i]` appends to the KV cache."""

    kind: StepKind
    seqs: list[Sequence]
    chunks: list[list[int]]
    ended: list[Sequence] = field(default_factory=list)
    """Choices the scheduler ended with "length" (the KV cache had no page left for them)."""


class Scheduler:
    """Queues, admission, preemption and the page budget over a `KVCacheManager`."""

    def __init__(self, kv: KVCacheManager, limits: EngineLimits,
                 counters: StepCounters | None = None, tracer: Tracer | None = None):
        self.kv = kv
        self.limits = limits
        self.counters = counters or StepCounters()
        self.tracer = tracer or Tracer(enabled=False)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_pages = kv.free_pages()   # as of the end of the last call (other threads read)
        self._seq_ids = itertools.count()
        self._last_was_prefill = False

    # -- queues ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request (admitted by a later `schedule`)."""
        self.waiting.append(req)
        self.tracer.event(req.request_id, "queued")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pages_for(self, tokens: int) -> int:
        """KV pages that hold `tokens` tokens."""
        return -(-tokens // self.kv.page_size)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Admit what fits, then the next step's batch (None when nothing can run)."""
        self._admit()
        prefill, decode = [], []
        for req in self.running:
            for s in req.seqs:
                if s.finish_reason or not s.in_cache:
                    continue
                if s.pending > 1 or (s.pending == 1 and s.num_cached == 0):
                    prefill.append(s)
                elif s.pending == 1:
                    decode.append(s)
        batch = None
        if prefill and not (decode and self._last_was_prefill):
            batch = self._prefill_batch(prefill)
        decode = [s for s in decode if s.in_cache]          # (a prefill may have preempted)
        if batch is None and decode:
            batch = self._decode_batch(decode[: self.limits.max_batch_size])
        self._last_was_prefill = batch is not None and batch.kind is StepKind.PREFILL
        self.free_pages = self.kv.free_pages()
        return batch

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            live = [s for s in req.seqs if not s.finish_reason]  # (preempted: some may be done)
            n = len(live) if req.seqs else req.config.n
            in_cache = sum(1 for r in self.running for s in r.seqs if s.in_cache)
            if in_cache + n > self.limits.max_batch_size:
                return
            lengths = [len(s.tokens) for s in live] or [len(req.prompt_ids)] * n
            need = sum(self.pages_for(t + 1) for t in lengths)
            if need > self.kv.free_pages() and self.running:
                return                          # wait until running requests free pages
            self.waiting.popleft()
            if not req.seqs:                    # first admission: one choice, forked later
                req.seqs = [Sequence(next(self._seq_ids), 0, req, req.first_processors)]
            for seq in live or req.seqs:
                self.kv.add_sequence(seq.seq_id)
                seq.in_cache, seq.num_cached = True, 0
            self.running.append(req)
            self.tracer.event(req.request_id, "admitted")

    def _prefill_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        budget, batch, chunks = self.limits.prefill_chunk_size, [], []
        for seq in seqs:
            if budget <= 0 or len(batch) >= self.limits.max_batch_size:
                break
            take = min(seq.pending, budget)
            batch.append(seq)
            chunks.append(seq.tokens[seq.num_cached: seq.num_cached + take])
            budget -= take
        while self.kv.free_pages() < sum(self.pages_for(len(c)) + 1 for c in chunks):
            if not self.preempt_newest():
                break
            keep = [i for i, s in enumerate(batch) if s.in_cache]
            batch, chunks = [batch[i] for i in keep], [chunks[i] for i in keep]
        return ScheduledBatch(StepKind.PREFILL, batch, chunks) if batch else None

    def _decode_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        def need(batch):            # a sequence whose last page is full needs a new one
            return sum(1 for s in batch if s.num_cached % self.kv.page_size == 0)

        while need(seqs) > self.kv.free_pages() and self.preempt_newest():
            seqs = [s for s in seqs if s.in_cache]
        ended = []
        if need(seqs) > self.kv.free_pages():
            # Nothing left to preempt, yet one request's n choices outgrow the cache: the
            # choices that need a page the cache does not have end with "length", as at the
            # context window.
            spare, keep = self.kv.free_pages(), []
            for s in seqs:
                if s.num_cached % self.kv.page_size != 0 or spare > 0:
                    spare -= s.num_cached % self.kv.page_size == 0
                    keep.append(s)
                else:
                    self.finish(s, "length")
                    ended.append(s)
            seqs = keep
        if not seqs and not ended:
            return None
        return ScheduledBatch(StepKind.DECODE, seqs, [[s.tokens[-1]] for s in seqs], ended)

    # -- choices and pages -----------------------------------------------------------------
    def fork_choices(self, parent: Sequence) -> list[Sequence]:
        """After the prompt's prefill, the request's other n - 1 choices share its pages."""
        req = parent.request
        children = []
        for index in range(1, req.config.n):
            child = parent.fork(next(self._seq_ids), index)
            self.kv.fork_sequence(parent.seq_id, child.seq_id)
            child.in_cache = True
            children.append(child)
        req.seqs.extend(children)
        req.forked = True
        return children

    def preempt_newest(self) -> bool:
        """Free the KV pages of the newest running request and requeue it (its tokens are
        kept and recomputed). False when only one request runs."""
        if len(self.running) <= 1:
            return False
        victim = self.running.pop()
        for seq in victim.seqs:
            if seq.in_cache:
                self.kv.remove_sequence(seq.seq_id)
                seq.in_cache, seq.num_cached = False, 0
        # Each existing choice is re-prefilled on its own; a request preempted before its first
        # prefill finished has no children yet (forked stays False) and forks later.
        self.waiting.appendleft(victim)
        self.counters.preemptions += 1
        self.tracer.event(victim.request_id, "preempted")
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a choice and free its KV pages (the one place pages are released)."""
        seq.finish_reason = seq.finish_reason or reason
        if seq.in_cache:
            seq.in_cache = False
            self.kv.remove_sequence(seq.seq_id)

    def release_finished(self) -> list[Request]:
        """Drop finished requests from the running set; returns them."""
        done = [r for r in self.running if r.finished]
        if done:
            self.running = [r for r in self.running if not r.finished]
            for r in done:
                reasons = [s.finish_reason for s in r.seqs]
                self.tracer.event(r.request_id, "finished", reasons=reasons)
        self.free_pages = self.kv.free_pages()
        return done

    def abort(self, request_id: str) -> Request | None:
        """End every choice of a request with "abort" and drop it from the queues."""
        for req in itertools.chain(self.waiting, self.running):
            if req.request_id == request_id:
                self.remove(req, "abort")
                self.tracer.event(request_id, "aborted")
                return req
        return None

    def remove(self, req: Request, reason: str) -> None:
        """Finish a request's remaining choices with `reason` and forget it."""
        for seq in req.seqs:
            if not seq.finish_reason:
                self.finish(seq, reason)
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.free_pages = self.kv.free_pages()

    def kv_cache_utilization(self) -> float:
        """The share of KV pages in use, 0..1 (as of the last step)."""
        total = self.kv.total_pages
        return 0.0 if not total else 1.0 - self.free_pages / total
