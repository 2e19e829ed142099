"""The Scheduler: request queues, admission, preemption and the KV-page budget.

Each `schedule()` admits waiting requests that fit (batch slots and KV pages), then picks the
next step: a prefill of prompt chunks (several sequences' chunks together, up to
`prefill_chunk_size` tokens) or a decode of every running sequence, alternating when both
wait so neither starves. When the KV cache cannot hold the step, the newest request is
preempted (its pages freed, its tokens kept, recomputed later). The page size is the
library's (`KVCacheManager.page_size`, from its metadata).

Prefix caching (`PrefixCache`, on unless the engine turns it off): a choice that ends, or a
request that is preempted, does not free its KV sequence; the sequence is kept as a cached
prefix. A sequence being admitted looks for the longest common prefix of its tokens among the
cached prefixes and the live sequences, and starts as a fork of that sequence at that length
(TVM's `fork_sequence` shares the pages copy-on-write: whole pages are shared, a partly
matching page is copied), so only the rest of its prompt is prefilled. Cached prefixes are
evicted least recently used first whenever a step or an admission needs pages, before any
running request is preempted. Eviction only drops the cache's own reference: pages a running
sequence shares stay (TVM counts references per block).

The Scheduler owns which sequences are in the KV cache: every page is freed by `finish`
(a choice ends: stop, length, abort), `preempt` or a prefix-cache eviction, nowhere else.
"""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field

import numpy as np

from mlc.runtime.model_runner import KVCacheManager
from mlc.runtime.request import EngineLimits, Request, Sequence, StepCounters
from mlc.runtime.tracing import Tracer


class StepKind(enum.Enum):
    """What a scheduled step runs (draft and verify join these with speculation)."""

    PREFILL = "prefill"
    DECODE = "decode"
    VERIFY = "verify"       # a decode step that also checks each sequence's draft tokens


@dataclass
class ScheduledBatch:
    """One step's work: `chunks[i]` are the tokens `seqs[i]` appends to the KV cache (for
    VERIFY: its last token, then its draft tokens)."""

    kind: StepKind
    seqs: list[Sequence]
    chunks: list[list[int]]
    ended: list[Sequence] = field(default_factory=list)
    """Choices the scheduler ended with "length" (the KV cache had no page left for them)."""


@dataclass
class _CachedPrefix:
    seq_id: int                 # a KV-cache sequence owned by the prefix cache
    tokens: np.ndarray          # the tokens its KV entries hold (int64)
    last_used: int


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """KV sequences kept after their choice ended, matched by longest common prefix.

    Entries never hold the same tokens twice: an entry whose tokens are a prefix of a newer
    one is dropped (the newer one shares its pages), and a new entry that is a prefix of an
    existing one is not kept. At most `max_entries` are kept (the least recently used go).
    """

    def __init__(self, kv: KVCacheManager, max_entries: int):
        self.kv = kv
        self.max_entries = max_entries
        self.entries: dict[int, _CachedPrefix] = {}
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, tokens: list[int], live: list[Sequence]) -> tuple[int | None, int]:
        """(KV sequence id, length) of the longest prefix of `tokens` held by a cached entry
        or a live sequence; (None, 0) when nothing matches."""
        want = np.asarray(tokens, dtype=np.int64)
        best, best_len, best_entry = None, 0, None
        for e in self.entries.values():
            n = _common_prefix(e.tokens, want)
            if n > best_len:
                best, best_len, best_entry = e.seq_id, n, e
        for s in live:
            if s.num_cached > best_len:
                n = _common_prefix(np.asarray(s.tokens[: s.num_cached], dtype=np.int64), want)
                if n > best_len:
                    best, best_len, best_entry = s.seq_id, n, None
        if best_entry is not None:
            best_entry.last_used = next(self._clock)
        return best, best_len

    def insert(self, seq_id: int, tokens: list[int]) -> None:
        """Take over KV sequence `seq_id`, which holds `tokens`."""
        new = np.asarray(tokens, dtype=np.int64)
        for e in list(self.entries.values()):
            n = _common_prefix(e.tokens, new)
            if n == len(new):                       # already held (by e): keep e only
                e.last_used = next(self._clock)
                self.kv.remove_sequence(seq_id)
                return
            if n == len(e.tokens):                  # e is a prefix of the new entry
                self._drop(e.seq_id)
        self.entries[seq_id] = _CachedPrefix(seq_id, new, next(self._clock))
        while len(self.entries) > self.max_entries:
            self.evict_lru()

    def evict_lru(self, keep: set[int] = frozenset()) -> bool:
        """Drop the least recently used entry not in `keep`; False when there is none."""
        candidates = [e for e in self.entries.values() if e.seq_id not in keep]
        if not candidates:
            return False
        self._drop(min(candidates, key=lambda e: e.last_used).seq_id)
        return True

    def clear(self) -> None:
        for seq_id in list(self.entries):
            self._drop(seq_id)

    def _drop(self, seq_id: int) -> None:
        del self.entries[seq_id]
        self.kv.remove_sequence(seq_id)


class Scheduler:
    """Queues, admission, preemption and the page budget over a `KVCacheManager`."""

    def __init__(self, kv: KVCacheManager, limits: EngineLimits,
                 counters: StepCounters | None = None, tracer: Tracer | None = None,
                 prefix_cache: bool = False, prefix_cache_max_entries: int | None = None,
                 drafter=None,
                 spec_draft_length: int = 0):
        self.kv = kv
        self.limits = limits
        self.counters = counters or StepCounters()
        self.tracer = tracer or Tracer(enabled=False)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.prefix = (PrefixCache(kv, prefix_cache_max_entries or 4 * limits.max_batch_size)
                       if prefix_cache else None)
        self.drafter, self.spec_draft_length = drafter, spec_draft_length
        self._seq_ids = itertools.count()
        self._last_was_prefill = False
        self.free_pages = kv.free_pages()   # as of the end of the last call (other threads read)
        self.cached_pages = 0               # of those, held only by the prefix cache (estimate)

    # -- queues ----------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request (admitted by a later `schedule`)."""
        self.waiting.append(req)
        self.tracer.event(req.request_id, "queued")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def new_seq_id(self) -> int:
        """A KV-cache sequence id no other sequence uses (for work outside the scheduler's
        requests, such as embeddings, that adds and removes its own sequences)."""
        return next(self._seq_ids)

    def reserve_pages(self, pages: int) -> bool:
        """Whether `pages` KV pages are free now, after evicting cached prefixes (least
        recently used first) to free them; running requests keep theirs."""
        while self.kv.free_pages() < pages and self.prefix is not None \
                and self.prefix.evict_lru():
            self.counters.prefix_evictions += 1
        return self.kv.free_pages() >= pages

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
                # (a first choice whose prompt the prefix cache left one token of still
                # prefills it: it forks the request's n - 1 other choices there)
                if s.pending > 1 or (s.pending == 1 and (s.num_cached == 0 or (
                        s.request.config.n > 1 and not s.request.forked))):
                    prefill.append(s)
                elif s.pending == 1:
                    decode.append(s)
        batch = None
        if prefill and not (decode and self._last_was_prefill):
            batch = self._prefill_batch(prefill)
        decode = [s for s in decode if s.in_cache]          # (a prefill may have preempted)
        if batch is None and decode:
            batch = self._decode_batch(decode[: self.limits.max_batch_size])
            if batch is not None and self.drafter is not None and batch.seqs:
                batch = self._with_drafts(batch)
        self._last_was_prefill = batch is not None and batch.kind is StepKind.PREFILL
        self._update_page_counts()
        return batch

    def _live_sequences(self) -> list[Sequence]:
        return [s for r in self.running for s in r.seqs if s.in_cache and not s.finish_reason]

    def _make_room(self, keep: set[int] = frozenset()) -> bool:
        """Free some pages: evict the least recently used cached prefix (not in `keep`), or
        else preempt the newest request. False when neither is possible."""
        if self.prefix is not None and self.prefix.evict_lru(keep):
            self.counters.prefix_evictions += 1
            return True
        return self.preempt_newest()

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            live = [s for s in req.seqs if not s.finish_reason]  # (preempted: some may be done)
            n = len(live) if req.seqs else req.config.n
            in_cache = sum(1 for r in self.running for s in r.seqs if s.in_cache)
            if in_cache + n > self.limits.max_batch_size:
                return
            token_lists = [s.tokens for s in live] or [req.prompt_ids]
            # Where each sequence starts: a fork of the longest matching cached prefix or live
            # sequence (at least one token is always computed: its logits are sampled).
            # (a request scoring its prompt, prompt_logprobs, computes it all the first time)
            use_cache = self.prefix is not None and not (not req.seqs
                                                         and req.config.prompt_logprobs)
            sources = [self.prefix.match(t[:-1], self._live_sequences())
                       if use_cache else (None, 0) for t in token_lists]
            lengths = [len(s.tokens) for s in live] or [len(req.prompt_ids)] * n
            reused = [m for _, m in sources] + [0] * (len(lengths) - len(sources))
            need = sum(self.pages_for(t + 1) - m // self.kv.page_size
                       for t, m in zip(lengths, reused))
            keep = {src for src, _ in sources if src is not None}
            while need > self.kv.free_pages() and self.prefix is not None \
                    and self.prefix.evict_lru(keep):
                self.counters.prefix_evictions += 1
            if need > self.kv.free_pages() and self.running:
                return                          # wait until running requests free pages
            self.waiting.popleft()
            first = not req.seqs
            if first:                           # first admission: one choice, forked later
                req.seqs = [Sequence(next(self._seq_ids), 0, req, req.first_processors)]
            for seq, (src, m) in zip(live or req.seqs, sources):
                if not first:       # its old KV sequence may live on as a cached prefix
                    seq.seq_id = next(self._seq_ids)
                if src is not None and m > 0:
                    self.kv.fork_sequence(src, seq.seq_id, m)
                    self.counters.prefix_cached_tokens += m
                else:
                    self.kv.add_sequence(seq.seq_id)
                    m = 0
                seq.in_cache, seq.num_cached = True, m
                if first:
                    req.cached_tokens = m
            self.running.append(req)
            self.tracer.event(req.request_id, "admitted", cached_tokens=reused[0])

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
            if not self._make_room():
                break
            keep = [i for i, s in enumerate(batch) if s.in_cache]
            batch, chunks = [batch[i] for i in keep], [chunks[i] for i in keep]
        return ScheduledBatch(StepKind.PREFILL, batch, chunks) if batch else None

    def _decode_batch(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        def need(batch):            # a sequence whose last page is full needs a new one
            return sum(1 for s in batch if s.num_cached % self.kv.page_size == 0)

        while need(seqs) > self.kv.free_pages() and self._make_room():
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

    def _with_drafts(self, batch: ScheduledBatch) -> ScheduledBatch:
        """A decode batch as a VERIFY batch: each sequence's draft (at most
        `spec_draft_length` tokens, none past its max_tokens or the context window, all of
        them within one prefill chunk) follows its last token. Without room for the drafts'
        pages (after evicting cached prefixes), or without any draft, the decode stays."""
        from mlc.runtime.speculation import can_speculate

        budget = self.limits.prefill_chunk_size - len(batch.seqs)
        ks = []
        for seq in batch.seqs:
            k = min(self.spec_draft_length, budget,
                    self.limits.context_window_size - len(seq.tokens) - 1)
            if seq.config.max_tokens is not None:
                k = min(k, seq.config.max_tokens - seq.num_generated - 1)
            k = max(0, k) if can_speculate(seq.processors) else 0
            budget -= k
            ks.append(k)
        drafts = self.drafter.propose(batch.seqs, ks)
        chunks, extra = [], 0
        for seq, chunk, draft, k in zip(batch.seqs, batch.chunks, drafts, ks):
            draft = draft[:k]
            chunks.append(chunk + draft)
            extra += (self.pages_for(seq.num_cached + 1 + len(draft))
                      - self.pages_for(seq.num_cached + 1))
        if all(len(c) == 1 for c in chunks):
            return batch
        while extra > self.kv.free_pages() - self._decode_need(batch.seqs) \
                and self.prefix is not None and self.prefix.evict_lru():
            self.counters.prefix_evictions += 1
        if extra > self.kv.free_pages() - self._decode_need(batch.seqs):
            return batch
        return ScheduledBatch(StepKind.VERIFY, batch.seqs, chunks, batch.ended)

    def _decode_need(self, seqs: list[Sequence]) -> int:
        """Pages a one-token step of `seqs` takes (a full last page needs a new one)."""
        return sum(1 for s in seqs if s.num_cached % self.kv.page_size == 0)

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
                self._release(seq)
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
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """A sequence leaves the KV cache: its entries become a cached prefix (when caching
        and it holds any), else its pages are freed."""
        if self.drafter is not None:
            self.drafter.release(seq)
        if self.prefix is not None and seq.num_cached > 0:
            self.prefix.insert(seq.seq_id, seq.tokens[: seq.num_cached])
        else:
            self.kv.remove_sequence(seq.seq_id)

    def release_finished(self) -> list[Request]:
        """Drop finished requests from the running set; returns them."""
        done = [r for r in self.running if r.finished]
        if done:
            self.running = [r for r in self.running if not r.finished]
            for r in done:
                reasons = [s.finish_reason for s in r.seqs]
                self.tracer.event(r.request_id, "finished", reasons=reasons)
        self._update_page_counts()
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
        self._update_page_counts()

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (their pages return unless a running sequence shares
        them)."""
        if self.prefix is not None:
            self.prefix.clear()
        self._update_page_counts()

    def _update_page_counts(self) -> None:
        """`free_pages`: pages free now or held only by the prefix cache (evicted on demand);
        `cached_pages`: the latter, estimated as every used page no running sequence needs
        (exact when nothing runs; running choices that share pages make it an underestimate)."""
        free = self.kv.free_pages()
        cached = 0
        if self.prefix is not None and len(self.prefix):
            running = sum(self.pages_for(s.num_cached) for s in self._live_sequences())
            cached = max(0, self.kv.total_pages - free - running)
        self.cached_pages = cached
        self.free_pages = free + cached

    def kv_cache_utilization(self) -> float:
        """The share of KV pages in use by running requests, 0..1 (as of the last step)."""
        total = self.kv.total_pages
        return 0.0 if not total else 1.0 - self.free_pages / total
