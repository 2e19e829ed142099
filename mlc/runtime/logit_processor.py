"""The per-request logit-processor hook: what a request adds between the model's logits and
the sampler (a grammar's token mask, logit_bias, penalties).

The OutputProcessor keeps one processor list per sequence and, each step:

1. asks every processor for `token_mask()` (which tokens may come next). A processor that
   constrains nothing returns None; a request whose processors all return None and have
   `edits_logits` False pays nothing: its row never leaves the fast path (device sampling on
   GPUs). Masks are asked for right after the previous step's `accept`, so a grammar can
   compute the next mask while the device runs the next forward pass;
2. gives the row to `apply(logits)` of processors with `edits_logits` True (host, in place);
3. applies the masks (disallowed tokens get -inf; on the device for GPU libraries), samples;
4. calls `accept(token_id)` for each token the step accepted (several under speculation);
   a processor that reports `is_finished()` ends the sequence with finish_reason "stop";
5. under speculation, `rollback(n)` forgets the last n accepted tokens.

Masks are bool arrays of the model's vocabulary size (the tokenizer's may be smaller: pad
with False). A processor raises `mlc.errors.MLCError` for a bad request at construction,
before the request is admitted, never during decoding.
"""

from __future__ import annotations

import numpy as np


class LogitProcessor:
    """One request's hook on one sequence (n > 1 forks: `fork()` copies the state)."""

    #: True when `apply` must see this sequence's logits on the host (bias, penalties).
    edits_logits: bool = False

    def token_mask(self) -> np.ndarray | None:
        """bool[vocab]: the tokens allowed next, or None for no constraint."""
        return None

    def apply(self, logits: np.ndarray) -> None:
        """Adjust one row of float32 logits [vocab] in place (only when `edits_logits`)."""

    def accept(self, token_id: int) -> None:
        """Record a token the sequence took."""

    def is_finished(self) -> bool:
        """True when the constraint is complete (a grammar reached its end)."""
        return False

    def rollback(self, n: int) -> None:
        """Forget the last `n` accepted tokens (speculative tokens the target rejected)."""
        if n:
            raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    def fork(self) -> LogitProcessor:
        """An independent copy for a forked sequence (n > 1 choices)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork")
