"""The OutputProcessor: logit processors -> sampler -> stop checks -> detokenizer -> deltas.

It accepts any number of tokens per sequence per step (speculation accepts several): each
token goes to the sequence's processors (`accept`), then the stop checks run in order (a stop
token id, a processor that `is_finished`, max_tokens, the context window), the step's new
tokens of every sequence are detokenized in one batch call, and the stop strings are matched
on the text (also across token boundaries; text that may begin a stop string is held back).
A stop string completed by an earlier token of a multi-token step drops the later tokens
(and rolls the processors back).

It never touches the KV cache: a delta with a finish_reason tells the engine core to end the
choice through the Scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlc.runtime.detokenizer import detokenize_step
from mlc.runtime.grammar import GrammarProcessor, prefetch_token_bitmasks
from mlc.runtime.request import ChoiceDelta, EngineLimits, Sequence, TokenLogprob
from mlc.runtime.sampler import SampledToken
from mlc.runtime.step import StepResult
from mlc.runtime.tracing import Tracer


@dataclass
class _Accepted:
    """A sequence's tokens of this step after the token-level stop checks."""

    seq: Sequence
    tokens: list[SampledToken]     # every token the sequence took (counts as generated)
    text_ids: list[int]            # those that become text (not a stop token id)
    finish: str | None
    replay: tuple | None           # (detok, stop) state before the step, to replay one by one


class OutputProcessor:
    """Turns a step's logits into each sequence's delta."""

    def __init__(self, sampler, limits: EngineLimits, tracer: Tracer | None = None):
        self.sampler = sampler
        self.limits = limits
        self.tracer = tracer or Tracer(enabled=False)

    def process(self, result: StepResult, ended: list[Sequence] = ()
                ) -> list[tuple[Sequence, ChoiceDelta]]:
        """Sample one token per sequence of `result` and accept it; `ended` are choices the
        scheduler ended with "length" (their held-back text is flushed)."""
        out = []
        if result.seqs:
            masks = [self.token_mask(s) for s in result.seqs]
            sampled = self.sampler.sample(result.logits, result.rows, result.seqs, masks)
            out = self.accept([(s, [t]) for s, t in zip(result.seqs, sampled)])
        return out + [(s, self.final_delta(s, "length")) for s in ended]

    def process_verify(self, result) -> list[tuple[Sequence, ChoiceDelta]]:
        """Accept the tokens of a verify step (`step.VerifyResult`): at position j each
        sequence samples its token from row `rows[i] + j` as a decode step would; the draft
        token there is accepted when it is the token drawn, and the first that differs (or a
        stop token, or the end of the draft) ends the sequence's step."""
        seqs, taken = result.seqs, [[] for _ in result.seqs]
        active = list(range(len(seqs)))
        j = 0
        while active:
            act = [seqs[i] for i in active]
            masks = [self.token_mask(s) for s in act]
            sampled = self.sampler.sample(result.logits, [result.rows[i] + j for i in active],
                                          act, masks)
            still = []
            for i, tok in zip(active, sampled):
                taken[i].append(tok)
                for p in seqs[i].processors:      # (the next position's mask sees it)
                    p.accept(tok.token_id)
                draft = result.chunks[i][1:]
                if j < len(draft) and tok.token_id == draft[j] \
                        and tok.token_id not in seqs[i].request.stop_ids \
                        and not any(p.is_finished() for p in seqs[i].processors):
                    still.append(i)
            active, j = still, j + 1
        for seq, toks in zip(seqs, taken):
            for p in seq.processors:
                p.rollback(len(toks))
        return self.accept(list(zip(seqs, taken)))

    @staticmethod
    def token_mask(seq: Sequence) -> np.ndarray | None:
        """The tokens a sequence's processors allow next (None: no constraint)."""
        mask = None
        for p in seq.processors:
            m = p.token_mask()
            if m is not None:
                mask = m if mask is None else mask & m
        return mask

    def accept(self, accepted: list[tuple[Sequence, list[SampledToken]]]
               ) -> list[tuple[Sequence, ChoiceDelta]]:
        """Append each sequence's new tokens (one or more); return its delta."""
        plans = [self._check_tokens(seq, tokens) for seq, tokens in accepted]
        with_text = [p for p in plans if p.text_ids]
        texts = detokenize_step(with_text[0].seq.request.tokenizer,
                                [p.seq.detok for p in with_text],
                                [p.text_ids for p in with_text]) if with_text else []
        text_of = {id(p): t for p, t in zip(with_text, texts)}
        deltas = [(p.seq, self._delta(p, text_of.get(id(p), ""))) for p in plans]
        self._prefetch_masks(deltas)
        return deltas

    @staticmethod
    def _prefetch_masks(deltas: list[tuple[Sequence, ChoiceDelta]]) -> None:
        """Start the next grammar masks of the sequences that go on, as one batch on a
        background thread, so they are computed while the next forward pass runs (sequences
        without a grammar add nothing)."""
        grammars = [p for seq, d in deltas if d.finish_reason is None
                    for p in seq.processors if isinstance(p, GrammarProcessor)]
        if grammars:
            prefetch_token_bitmasks(grammars)

    def _check_tokens(self, seq: Sequence, tokens: list[SampledToken]) -> _Accepted:
        cfg, req = seq.config, seq.request
        if seq.num_generated == 0:
            self.tracer.event(req.request_id, "first_token", index=seq.index)
        replay = ((seq.detok.copy(), seq.stop.copy())
                  if len(tokens) > 1 and cfg.stop_strs else None)
        taken, text_ids, finish = [], [], None
        for tok in tokens:
            tid = tok.token_id
            taken.append(tok)
            seq.num_generated += 1
            for p in seq.processors:
                p.accept(tid)
            if tid in req.stop_ids:
                finish = "stop"
                break
            seq.tokens.append(tid)
            text_ids.append(tid)
            if any(p.is_finished() for p in seq.processors):
                finish = "stop"
            elif cfg.max_tokens is not None and seq.num_generated >= cfg.max_tokens:
                finish = "length"
            elif len(seq.tokens) >= self.limits.context_window_size:
                finish = "length"
            if finish:
                break
        return _Accepted(seq, taken, text_ids, finish, replay)

    def _delta(self, plan: _Accepted, text: str) -> ChoiceDelta:
        seq, finish, tokens = plan.seq, plan.finish, plan.tokens
        emit, hit = seq.stop.put(text)
        if hit:
            finish = "stop"
            if plan.replay is not None and len(plan.text_ids) > 1:
                emit, tokens = self._replay_to_stop(plan)
        if finish and not seq.stop.stopped:
            emit += seq.stop.put(seq.detok.flush())[0] + seq.stop.flush()
        logprobs = ([TokenLogprob(t.token_id, t.logprob, t.top_logprobs) for t in tokens]
                    if seq.config.logprobs else None)
        return ChoiceDelta(seq.index, emit, [t.token_id for t in tokens], logprobs, finish)

    @staticmethod
    def _replay_to_stop(plan: _Accepted) -> tuple[str, list[SampledToken]]:
        """A stop string ended a multi-token step: find the token that completed it, keep
        the tokens up to it and drop the rest (the processors forget them too)."""
        seq = plan.seq
        seq.detok, seq.stop = plan.replay
        emitted = ""
        for j, tid in enumerate(plan.text_ids):
            piece, hit = seq.stop.put(seq.detok.put(tid))
            emitted += piece
            if hit:
                break
        # text_ids are a prefix of the step's tokens (a stop token id can only end them)
        unused_text = len(plan.text_ids) - (j + 1)
        dropped = len(plan.tokens) - (j + 1)
        if unused_text:
            del seq.tokens[-unused_text:]
        if dropped:
            seq.num_generated -= dropped
            for p in seq.processors:
                p.rollback(dropped)
        return emitted, plan.tokens[: j + 1]

    @staticmethod
    def final_delta(seq: Sequence, reason: str) -> ChoiceDelta:
        """The last delta of a choice ended outside a step (held-back text flushed)."""
        text = "" if seq.stop.stopped else (seq.stop.put(seq.detok.flush())[0]
                                            + seq.stop.flush())
        return ChoiceDelta(seq.index, text, [], None, reason)
