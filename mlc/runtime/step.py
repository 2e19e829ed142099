"""Step actions: a `ScheduledBatch` becomes calls on the `ModelRunner`.

Each action runs the model for its batch and returns a `StepResult`: the logits (on the
device) and which row each sampling sequence draws from: prefill, decode, and verify (a
decode that also checks draft tokens, `mlc.runtime.speculation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mlc.runtime.model_runner import ModelRunner
from mlc.runtime.request import Sequence, StepCounters, TokenLogprob
from mlc.runtime.sampler import log_softmax
from mlc.runtime.scheduler import ScheduledBatch, Scheduler, StepKind
from mlc.runtime.tracing import Tracer


class FeatureSink(Protocol):
    """Takes the target's final hidden states of each step (EAGLE drafting reads them)."""

    def record(self, seq: Sequence, start: int, rows: np.ndarray) -> None:
        """`rows` [n, h]: the hidden states at positions start .. start + n - 1 of `seq`."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` starts as a copy of `parent` (n > 1 choices after the prompt)."""


def record_features(features: FeatureSink | None, runner: ModelRunner, seqs: list[Sequence],
                    chunks: list[list[int]], starts: list[int]) -> None:
    """Hand each sequence's rows of the last forward's hidden states to `features`."""
    if features is None:
        return
    hidden, offset = runner.last_hidden, 0
    for seq, chunk, start in zip(seqs, chunks, starts):
        features.record(seq, start, hidden[offset: offset + len(chunk)])
        offset += len(chunk)


@dataclass
class StepResult:
    """The model's output for a step: `seqs[i]` samples from row `rows[i]` of `logits`."""

    logits: Any                 # [rows, vocab] on the device (None when nothing ran)
    rows: list[int]
    seqs: list[Sequence]


class PrefillAction:
    """Append prompt chunks; a sequence whose prompt is complete samples its first token
    (and a request with n > 1 forks its other choices off the prompt's pages first)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, counters: StepCounters,
                 tracer: Tracer, features: FeatureSink | None = None):
        self.runner, self.scheduler = runner, scheduler
        self.counters, self.tracer, self.features = counters, tracer, features

    def run(self, batch: ScheduledBatch) -> StepResult:
        seq_ids = [s.seq_id for s in batch.seqs]
        scored = [s.config.prompt_logprobs for s in batch.seqs]
        if any(scored):
            logits, first_rows = self.runner.prefill_scored_logits(seq_ids, batch.chunks, scored)
            last_rows = [first + (len(chunk) - 1 if score else 0)
                         for first, chunk, score in zip(first_rows, batch.chunks, scored)]
            score_prompts(logits.numpy(), batch, first_rows, scored)
        else:
            logits = self.runner.prefill_logits(seq_ids, batch.chunks)
            last_rows = list(range(len(batch.seqs)))
        self.counters.prefill_tokens += sum(len(c) for c in batch.chunks)
        record_features(self.features, self.runner, batch.seqs, batch.chunks,
                        [s.num_cached for s in batch.seqs])
        rows, seqs = [], []
        for row, seq, chunk in zip(last_rows, batch.seqs, batch.chunks):
            seq.num_cached += len(chunk)
            self.tracer.event(seq.request.request_id, "prefill_chunk", tokens=len(chunk))
            if seq.pending:
                continue                                    # more of the prompt to come
            if seq.index == 0 and seq.request.config.n > 1 and not seq.request.forked:
                for child in self.scheduler.fork_choices(seq):
                    if self.features is not None:
                        self.features.fork(seq, child)
                    rows.append(row)
                    seqs.append(child)
            rows.append(row)
            seqs.append(seq)
        return StepResult(logits, rows, seqs)


def score_prompts(logits: np.ndarray, batch: ScheduledBatch, first_rows: list[int],
                  scored: list[bool]) -> None:
    """Record the logprob of each prompt token that a scored chunk's positions predict (the
    row of position p scores token p + 1), with the request's top_logprobs alternatives."""
    for seq, chunk, first, score in zip(batch.seqs, batch.chunks, first_rows, scored):
        if not score:
            continue
        req = seq.request
        prompt = req.prompt_ids
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None] * len(prompt)
        start = seq.num_cached                        # the chunk's first position
        n = min(len(chunk), len(prompt) - 1 - start)  # positions that predict a prompt token
        if n <= 0:
            continue
        lp = log_softmax(logits[first:first + n])
        top_k = seq.config.top_logprobs
        for k in range(n):
            target = prompt[start + k + 1]
            top = []
            if top_k:
                ids = np.argpartition(-lp[k], top_k - 1)[:top_k]
                ids = ids[np.argsort(-lp[k][ids], kind="stable")]
                top = [(int(t), float(lp[k][t])) for t in ids]
            req.prompt_logprobs[start + k + 1] = TokenLogprob(target, float(lp[k][target]),
                                                              top)


class DecodeAction:
    """One token for every sequence of the batch."""

    def __init__(self, runner: ModelRunner, counters: StepCounters, tracer: Tracer,
                 features: FeatureSink | None = None):
        self.runner, self.counters, self.tracer = runner, counters, tracer
        self.features = features

    def run(self, batch: ScheduledBatch) -> StepResult:
        if not batch.seqs:                                  # only choices that ended
            return StepResult(None, [], [])
        logits = self.runner.decode_logits([s.seq_id for s in batch.seqs],
                                           [c[0] for c in batch.chunks])
        record_features(self.features, self.runner, batch.seqs, batch.chunks,
                        [s.num_cached for s in batch.seqs])
        self.counters.decode_tokens += len(batch.seqs)
        self.counters.decode_steps += 1
        self.tracer.batch("decode", len(batch.seqs),
                          {s.request.request_id for s in batch.seqs})
        for seq in batch.seqs:
            seq.num_cached += 1
        return StepResult(logits, list(range(len(batch.seqs))), list(batch.seqs))


@dataclass
class VerifyResult(StepResult):
    """A verify step's output: `seqs[i]`'s last token and draft are `chunks[i]`, whose
    logits are rows `rows[i]`, `rows[i] + 1`, ... of `logits`."""

    chunks: list[list[int]]
    cached_before: list[int]            # each sequence's num_cached before the step


class VerifyAction:
    """A decode step that also checks drafts: the last token and the draft of every sequence
    go through `batch_verify` in one call (logits at every position); after the
    OutputProcessor accepted tokens, `commit` pops the KV entries of rejected ones."""

    def __init__(self, runner: ModelRunner, counters: StepCounters, tracer: Tracer,
                 features: FeatureSink | None = None):
        self.runner, self.counters, self.tracer = runner, counters, tracer
        self.features = features

    def run(self, batch: ScheduledBatch) -> VerifyResult:
        logits = self.runner.verify_logits([s.seq_id for s in batch.seqs], batch.chunks)
        # (rows past what the OutputProcessor accepts are overwritten by the next step's)
        record_features(self.features, self.runner, batch.seqs, batch.chunks,
                        [s.num_cached for s in batch.seqs])
        rows, offset = [], 0
        for chunk in batch.chunks:
            rows.append(offset)
            offset += len(chunk)
        self.counters.decode_steps += 1
        self.counters.draft_tokens += sum(len(c) - 1 for c in batch.chunks)
        self.tracer.batch("verify", len(batch.seqs),
                          {s.request.request_id for s in batch.seqs})
        before = [s.num_cached for s in batch.seqs]
        for seq, chunk in zip(batch.seqs, batch.chunks):
            seq.num_cached += len(chunk)
        return VerifyResult(logits, rows, list(batch.seqs), [list(c) for c in batch.chunks],
                            before)

    def commit(self, result: VerifyResult) -> None:
        """Keep the KV entries of the tokens each sequence took; pop the rest."""
        for seq, chunk, before in zip(result.seqs, result.chunks, result.cached_before):
            valid = 0
            while valid < len(chunk) and before + valid < len(seq.tokens) \
                    and seq.tokens[before + valid] == chunk[valid]:
                valid += 1
            if len(chunk) - valid:
                self.runner.popn(seq.seq_id, len(chunk) - valid)
            seq.num_cached = before + valid
            self.tracer.event(seq.request.request_id, "verify", drafted=len(chunk) - 1,
                              accepted=max(0, valid - 1))
            self.counters.decode_tokens += 1 + max(0, valid - 1)
            self.counters.accepted_draft_tokens += max(0, valid - 1)


def make_actions(runner: ModelRunner, scheduler: Scheduler, counters: StepCounters,
                 tracer: Tracer, features: FeatureSink | None = None) -> dict[StepKind, Any]:
    """The action of each step kind (`features`: where the target's hidden states go, for
    EAGLE drafting)."""
    return {StepKind.PREFILL: PrefillAction(runner, scheduler, counters, tracer, features),
            StepKind.DECODE: DecodeAction(runner, counters, tracer, features),
            StepKind.VERIFY: VerifyAction(runner, counters, tracer, features)}
