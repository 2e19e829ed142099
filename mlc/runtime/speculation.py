"""Speculative decoding: drafters that propose tokens for the target model to verify.

- `NgramDrafter` (`speculative_mode="ngram"`, no draft model): a sequence's draft is what
  followed the most recent earlier occurrence of its last n tokens (n = 3, then 2, then 1) in
  its own tokens (prompt and generated text): summaries, code edits and RAG answers repeat
  long spans of their input.
- `ModelDrafter` (`speculative_mode="small_draft"`): a smaller model with the same vocabulary
  proposes its greedy continuation. It keeps its own KV cache: each sequence's draft KV is
  synced lazily before drafting (entries past the tokens the target accepted are popped, the
  missing ones prefilled), and freed when the sequence leaves the target's cache.

The Scheduler asks the drafter for every decode sequence's draft (`propose`); the target
checks the drafts of the whole batch in one `batch_verify` call (`step.VerifyAction`), and
the OutputProcessor accepts them (`OutputProcessor.process_verify`).

Acceptance: at each draft position the target's token is sampled exactly as a plain decode
step would sample it (same processors, same random stream); the draft token is accepted when
it is the token drawn, and the first token that differs ends the step. Both drafters propose
one token per position (a point mass q = 1 at d), and for such a proposal this *is* the
rejection-sampling rule (accept d with probability min(1, p(d) / q(d)) = p(d); on rejection
draw from max(0, p - q) renormalised = p without d), so the output distribution is the
target's, and a seeded request draws the same tokens as without speculation. Greedy output
is identical token for token.
"""

from __future__ import annotations

import numpy as np

from mlc.runtime.logit_processor import LogitProcessor

MAX_NGRAM = 3


def ngram_draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix
    n-gram (n <= max_ngram) of `tokens`; [] when no suffix recurs."""
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)   # [L - n, n]
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start: start + k].tolist()
    return []


class NgramDrafter:
    """Prompt lookup: drafts from each sequence's own tokens."""

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        return [ngram_draft(s.tokens, k) for s, k in zip(seqs, ks)]

    def release(self, seq) -> None:
        pass


class ModelDrafter:
    """A draft model's greedy tokens, over its own `ModelRunner` and KV cache."""

    def __init__(self, runner, prefill_chunk_size: int):
        self.runner = runner
        self.chunk = prefill_chunk_size
        self.cached: dict[int, tuple[int, list[int]]] = {}   # id(seq) -> (draft seq id, tokens)
        self._ids = 0

    def release(self, seq) -> None:
        entry = self.cached.pop(id(seq), None)
        if entry is not None:
            self.runner.remove_sequence(entry[0])

    def _sync(self, seq) -> tuple[int, list[int]] | None:
        """Make the draft cache hold seq.tokens[:-1]; returns (draft id, tokens still to
        feed: at least the last token). None when the draft cache has no room."""
        entry = self.cached.get(id(seq))
        if entry is None:
            self._ids += 1
            entry = (self._ids, [])
            self.runner.add_sequence(entry[0])
            self.cached[id(seq)] = entry
        sid, held = entry
        keep = 0
        while keep < len(held) and keep < len(seq.tokens) - 1 and held[keep] == seq.tokens[keep]:
            keep += 1
        if len(held) > keep:
            self.runner.popn(sid, len(held) - keep)
            del held[keep:]
        return sid, list(seq.tokens[keep:])

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        work = []                                   # (index, draft id, tokens to feed)
        page = self.runner.page_size
        free = self.runner.free_pages()
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            sid, feed = self._sync(seq)
            held = self.cached[id(seq)][1]
            need = -(-(len(held) + len(feed) + k) // page) - (-(-len(held) // page))
            if need > free:
                continue                            # no room in the draft cache: no draft
            free -= need
            work.append((i, sid, feed))
        if not work:
            return drafts
        # catch up (prefill the tokens the draft has not seen, in chunks), first draft token
        last_logits: dict[int, int] = {}
        pending = {i: feed for i, _, feed in work}
        ids = {i: sid for i, sid, _ in work}
        while pending:
            batch, budget = [], self.chunk
            for i, feed in list(pending.items()):
                if budget <= 0:
                    break
                take = feed[:budget]
                batch.append((i, take))
                budget -= len(take)
            logits = self.runner.prefill_logits([ids[i] for i, _ in batch],
                                                [t for _, t in batch]).numpy()
            for row, (i, take) in enumerate(batch):
                self.cached[id(seqs[i])][1].extend(take)
                rest = pending[i][len(take):]
                if rest:
                    pending[i] = rest
                else:
                    del pending[i]
                    last_logits[i] = int(np.argmax(logits[row]))
        for i in last_logits:
            drafts[i].append(last_logits[i])
        # k - 1 greedy decode steps for the sequences that want more
        while True:
            step = [i for i, _, _ in work if len(drafts[i]) < ks[i]]
            if not step:
                break
            logits = self.runner.decode_logits([ids[i] for i in step],
                                               [drafts[i][-1] for i in step]).numpy()
            for row, i in enumerate(step):
                self.cached[id(seqs[i])][1].append(drafts[i][-1])
                drafts[i].append(int(np.argmax(logits[row])))
        return drafts


def can_speculate(processors: list[LogitProcessor]) -> bool:
    """Whether every processor of a sequence can roll back rejected tokens."""
    return all(type(p).rollback is not LogitProcessor.rollback for p in processors)
