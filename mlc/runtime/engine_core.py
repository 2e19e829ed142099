"""The engine loop: one thread owns the model and its KV cache.

Each `step()` is schedule -> run -> postprocess: admit waiting requests that fit, run one
prefill chunk (several sequences' chunks batched up to `prefill_chunk_size` tokens) or one
batched decode over every running sequence, sample, detokenize and hand each request's deltas
to its callback. Other threads only talk to the loop through its inbox.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mlc.errors import EngineTerminatedError, MLCError
from mlc.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.model import LoadedModel
from mlc.runtime.sampler import Sampler, TokenHistory, make_generator
from mlc.runtime.tracing import Tracer

logger = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceDelta:
    """What one choice produced in one step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One step's output for a request; `final` once every choice has finished."""

    request_id: str
    deltas: list[ChoiceDelta]
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


@dataclass
class EngineLimits:
    max_batch_size: int
    max_total_sequence_length: int
    prefill_chunk_size: int
    context_window_size: int


class Sequence:
    """One choice of a request: its tokens, KV state and decoding state."""

    def __init__(self, seq_id: int, index: int, prompt_ids: list[int], request: Request):
        self.seq_id = seq_id
        self.index = index
        self.request = request
        self.tokens = list(prompt_ids)     # everything that belongs in the KV cache
        self.num_cached = 0                # how many of `tokens` are in the KV cache
        self.in_cache = False              # whether the KV cache knows this sequence
        self.history = TokenHistory(prompt_ids)
        self.detok = IncrementalDetokenizer(request.tokenizer, prompt_ids)
        self.stop = StopStringMatcher(request.config.stop_strs)
        self.rng = make_generator(request.config.seed, index)
        self.finish_reason: str | None = None
        self.num_generated = 0

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_cached


class Request:
    """A submitted request: its prompt, config, choices and output callback."""

    def __init__(self, request_id: str, prompt_ids: list[int], config: GenerationConfig,
                 tokenizer, eos_ids: list[int], on_output: Callable[[RequestOutput], None]):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids = set(config.stop_token_ids) | (set() if config.ignore_eos
                                                      else set(eos_ids))
        self.on_output = on_output
        self.seqs: list[Sequence] = []
        self.forked = False                # children exist (n > 1 after the first prefill)
        self.arrival = time.monotonic()

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finish_reason for s in self.seqs)


class EngineCore:
    """Continuous batching over a `LoadedModel` in a background thread."""

    def __init__(self, model: LoadedModel, limits: EngineLimits, tracer: Tracer | None = None):
        self.model = model
        self.limits = limits
        self.tracer = tracer or Tracer(enabled=False)
        self.sampler = Sampler()
        self.eos_ids = list(model.chat_config.eos_token_id or [])
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._inbox: queue.Queue = queue.Queue()
        self._seq_ids = itertools.count()
        self._stop = threading.Event()
        self._last_was_prefill = False
        self.stats = collections.Counter()
        self._thread = threading.Thread(target=self._loop, name="mlc-engine", daemon=True)
        self._thread.start()

    # -- API for other threads -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self._stop.is_set():
            raise EngineTerminatedError("The engine has been terminated; create a new one.")
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        if not self._stop.is_set():
            self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._inbox.put(("wake", None))
            self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return not self._stop.is_set()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self.waiting and not self.running
            self._drain_inbox(block=idle)
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - one failing step must not kill the engine
                logger.exception("engine step failed")
                for req in list(self.running):
                    self._fail(req, e)
        for req in list(self.running) + list(self.waiting):
            self._fail(req, EngineTerminatedError("The engine was terminated."))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self.waiting.append(payload)
                self.tracer.event(payload.request_id, "queued")
            elif kind == "abort":
                self._abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One engine step: admit, then a prefill chunk or a batched decode."""
        self._admit()
        prefill = [s for r in self.running for s in r.seqs if not s.finish_reason
                   and (s.pending > 1 or (s.pending == 1 and s.num_cached == 0))]
        decode = [s for r in self.running for s in r.seqs
                  if not s.finish_reason and s.pending == 1 and s.num_cached > 0]
        if prefill and not (decode and self._last_was_prefill):
            self._prefill_step(prefill)
            self._last_was_prefill = True
        elif decode:
            self._decode_step(decode[: self.limits.max_batch_size])
            self._last_was_prefill = False

    # -- scheduling ------------------------------------------------------------------------
    def _num_seqs(self) -> int:
        return sum(1 for r in self.running for s in r.seqs if s.in_cache)

    def _pages_needed(self, tokens: int) -> int:
        return -(-tokens // 16)

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            live = [s for s in req.seqs if not s.finish_reason]  # (preempted: some may be done)
            n = len(live) if req.seqs else req.config.n
            if self._num_seqs() + n > self.limits.max_batch_size:
                return
            tokens = [len(s.tokens) for s in live] or [len(req.prompt_ids)] * n
            need = sum(self._pages_needed(t + 1) for t in tokens)
            if need > self.model.free_pages() and self.running:
                return                          # wait until running requests free pages
            self.waiting.popleft()
            if not req.seqs:                    # first admission: one sequence, forked later
                req.seqs = [Sequence(next(self._seq_ids), 0, req.prompt_ids, req)]
            for seq in req.seqs:
                if seq.finish_reason:           # finished choices stay out of the cache
                    continue
                self.model.add_sequence(seq.seq_id)
                seq.in_cache, seq.num_cached = True, 0
            self.running.append(req)
            self.tracer.event(req.request_id, "admitted")

    def _preempt_one(self) -> bool:
        """Free the KV pages of the newest request and requeue it (it will be recomputed)."""
        if len(self.running) <= 1:
            return False
        victim = self.running.pop()
        for seq in victim.seqs:
            if seq.in_cache:
                self.model.remove_sequence(seq.seq_id)
                seq.in_cache, seq.num_cached = False, 0
        # Each existing choice is re-prefilled on its own; a request preempted before its
        # first prefill finished has no children yet (forked stays False) and forks later.
        self.waiting.appendleft(victim)
        self.stats["preemptions"] += 1
        self.tracer.event(victim.request_id, "preempted")
        return True

    # -- running the model -----------------------------------------------------------------
    def _prefill_step(self, seqs: list[Sequence]) -> None:
        budget = self.limits.prefill_chunk_size
        batch, chunks = [], []
        for seq in seqs:
            if budget <= 0 or len(batch) >= self.limits.max_batch_size:
                break
            take = min(seq.pending, budget)
            batch.append(seq)
            chunks.append(seq.tokens[seq.num_cached: seq.num_cached + take])
            budget -= take
        while self.model.free_pages() < sum(self._pages_needed(len(c)) + 1 for c in chunks):
            if not self._preempt_one():
                break
            keep = [i for i, s in enumerate(batch) if s.in_cache]
            batch, chunks = [batch[i] for i in keep], [chunks[i] for i in keep]
            if not batch:
                return
        t0 = time.perf_counter()
        logits = self.model.prefill([s.seq_id for s in batch], chunks)
        self.stats["prefill_tokens"] += sum(len(c) for c in chunks)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        done_rows, done_seqs = [], []
        for row, (seq, chunk) in enumerate(zip(batch, chunks)):
            seq.num_cached += len(chunk)
            self.tracer.event(self._request_of(seq).request_id, "prefill_chunk",
                              tokens=len(chunk))
            if seq.pending == 0:
                done_rows.append(row)
                done_seqs.append(seq)
        if done_seqs:
            self._sample_and_emit(done_seqs, logits[done_rows], after_prefill=True)

    def _decode_step(self, seqs: list[Sequence]) -> None:
        need = sum(1 for s in seqs if s.num_cached % 16 == 0)
        while need > self.model.free_pages():
            if not self._preempt_one():
                break
            seqs = [s for s in seqs if s.in_cache]
            need = sum(1 for s in seqs if s.num_cached % 16 == 0)
        if need > self.model.free_pages():
            seqs = self._end_choices_that_cannot_grow(seqs)
        if not seqs:
            return
        t0 = time.perf_counter()
        logits = self.model.decode([s.seq_id for s in seqs], [s.tokens[-1] for s in seqs])
        self.stats["decode_tokens"] += len(seqs)
        self.stats["decode_steps"] += 1
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.tracer.batch("decode", len(seqs), {self._request_of(s).request_id for s in seqs})
        for seq in seqs:
            seq.num_cached += 1
        self._sample_and_emit(seqs, logits, after_prefill=False)

    def _end_choices_that_cannot_grow(self, seqs: list[Sequence]) -> list[Sequence]:
        """Nothing is left to preempt, yet the n choices of one request outgrow the KV cache:
        the choices that need a page the cache does not have end with "length", as at the
        context window. Returns the sequences that still decode."""
        spare, keep = self.model.free_pages(), []
        for seq in seqs:
            if seq.num_cached % 16 != 0 or spare > 0:
                spare -= seq.num_cached % 16 == 0
                keep.append(seq)
                continue
            text = "" if seq.stop.stopped else (seq.stop.put(seq.detok.flush())[0]
                                                + seq.stop.flush())
            self._finish_seq(seq, "length")
            self._deliver(seq.request, [ChoiceDelta(seq.index, text, [], None, "length")])
        return keep

    @staticmethod
    def _request_of(seq: Sequence) -> Request:
        return seq.request

    # -- sampling and output ---------------------------------------------------------------
    def _fork_children(self, req: Request, parent: Sequence) -> None:
        """After the prompt's prefill, the other n-1 choices share its KV pages."""
        for index in range(1, req.config.n):
            child = Sequence(next(self._seq_ids), index, req.prompt_ids, req)
            self.model.fork_sequence(parent.seq_id, child.seq_id)
            child.in_cache, child.num_cached = True, parent.num_cached
            req.seqs.append(child)
        req.forked = True

    def _sample_and_emit(self, seqs: list[Sequence], logits: np.ndarray,
                         after_prefill: bool) -> None:
        rows, row_seqs = [], []
        for row, seq in enumerate(seqs):
            req = self._request_of(seq)
            if after_prefill and not req.forked and req.config.n > 1 and seq.index == 0:
                self._fork_children(req, seq)
                for child in req.seqs[1:]:
                    rows.append(row)
                    row_seqs.append(child)
            rows.append(row)
            row_seqs.append(seq)
        picked = logits[rows]
        configs = [self._request_of(s).config for s in row_seqs]
        sampled = self.sampler.sample(picked, configs, [s.history for s in row_seqs],
                                      [s.rng for s in row_seqs])
        outputs: dict[str, list[ChoiceDelta]] = collections.defaultdict(list)
        for seq, tok in zip(row_seqs, sampled):
            req = self._request_of(seq)
            if seq.num_generated == 0:
                self.tracer.event(req.request_id, "first_token", index=seq.index)
            outputs[req.request_id].append(self._advance(req, seq, tok))
        for req in list(self.running):
            if req.request_id in outputs:
                self._deliver(req, outputs[req.request_id])

    def _advance(self, req: Request, seq: Sequence, tok) -> ChoiceDelta:
        """Append a sampled token; decide whether the choice stops; return its delta."""
        cfg = req.config
        token_id = tok.token_id
        seq.num_generated += 1
        seq.history.append(token_id)
        logprobs = ([TokenLogprob(token_id, tok.logprob, tok.top_logprobs)]
                    if cfg.logprobs else None)
        text, finish = "", None
        if token_id in req.stop_ids:
            finish = "stop"
        else:
            seq.tokens.append(token_id)
            text, hit = seq.stop.put(seq.detok.put(token_id))
            if hit:
                finish = "stop"
            elif cfg.max_tokens is not None and seq.num_generated >= cfg.max_tokens:
                finish = "length"
            elif len(seq.tokens) >= self.limits.context_window_size:
                finish = "length"
        if finish:
            if not seq.stop.stopped:
                text += seq.stop.put(seq.detok.flush())[0] + seq.stop.flush()
            self._finish_seq(seq, finish)
        return ChoiceDelta(seq.index, text, [token_id], logprobs, finish)

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.in_cache:
            self.model.remove_sequence(seq.seq_id)
            seq.in_cache = False

    def _deliver(self, req: Request, deltas: list[ChoiceDelta]) -> None:
        final = req.finished
        out = RequestOutput(req.request_id, deltas, final, len(req.prompt_ids),
                            sum(s.num_generated for s in req.seqs))
        if final:
            self.running.remove(req)
            self.tracer.event(req.request_id, "finished",
                              reasons=[s.finish_reason for s in req.seqs])
        self._safe_callback(req, out)

    def _safe_callback(self, req: Request, out: RequestOutput) -> None:
        try:
            req.on_output(out)
        except Exception:  # noqa: BLE001 - a consumer's bug must not stop the loop
            logger.exception("output callback of %s failed", req.request_id)

    def _abort(self, request_id: str) -> None:
        for req in list(self.waiting) + list(self.running):
            if req.request_id != request_id:
                continue
            if req in self.waiting:
                self.waiting.remove(req)
            deltas = []
            for seq in req.seqs or []:
                if not seq.finish_reason:
                    self._finish_seq(seq, "abort")
                    deltas.append(ChoiceDelta(seq.index, "", [], None, "abort"))
            if not req.seqs:
                deltas = [ChoiceDelta(i, "", [], None, "abort") for i in range(req.config.n)]
            if req in self.running:
                self.running.remove(req)
            self.tracer.event(request_id, "aborted")
            self._safe_callback(req, RequestOutput(
                request_id, deltas, True, len(req.prompt_ids),
                sum(s.num_generated for s in req.seqs)))

    def _fail(self, req: Request, error: Exception) -> None:
        for seq in req.seqs:
            if not seq.finish_reason:
                try:
                    self._finish_seq(seq, "abort")
                except Exception:  # noqa: BLE001 - the cache may be the thing that failed
                    seq.in_cache = False
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        err = error if isinstance(error, MLCError) else MLCError(
            f"Internal engine error while running the request: {error!r}")
        self._safe_callback(req, RequestOutput(req.request_id, [], True, error=err))
