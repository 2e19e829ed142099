"""Speculative decoding without a draft model: n-gram prompt lookup (`speculative_mode="ngram"`).

A sequence's draft is what followed the most recent earlier occurrence of its last n tokens
(n = 3, then 2, then 1) in its own tokens (prompt and generated text): summaries, code edits
and RAG answers repeat long spans of their input. The target model checks the drafts of the
whole decode batch in one `batch_verify` call (`step.VerifyAction`), and the OutputProcessor
accepts them (`OutputProcessor.process_verify`).

Acceptance: at each draft position the target's token is sampled exactly as a plain decode
step would sample it (same processors, same random stream); the draft token is accepted when
it is the token drawn, and the first token that differs ends the step. For a draft that is a
single proposed token (a point mass, as here) this *is* the rejection-sampling rule (accept d
with probability p(d); on rejection draw from p without d, renormalised), so the output
distribution is the target's, and a seeded request draws the same tokens as without
speculation. Greedy output is identical token for token.
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


def can_speculate(processors: list[LogitProcessor]) -> bool:
    """Whether every processor of a sequence can roll back rejected tokens."""
    return all(type(p).rollback is not LogitProcessor.rollback for p in processors)
