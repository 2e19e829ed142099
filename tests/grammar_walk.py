"""Drive a `GrammarProcessor` the way the engine will: sample only tokens its mask allows.

Sampling is a seeded random choice over the allowed tokens, biased toward ending so walks
terminate: EOS is taken half the time it is allowed, and, more often as the walk goes on, the
choice is restricted to allowed tokens that contain a closing character (`"`, `}`, `]`, `>`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

CLOSING_CHARS = '"}]>'


def closer_tokens(tokenizer, vocab_size: int) -> np.ndarray:
    """bool[vocab_size]: tokens whose text contains a closing character."""
    out = np.zeros(vocab_size, np.bool_)
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        out[i] = any(c in text for c in CLOSING_CHARS)
    return out


@dataclass
class Walk:
    ids: list[int]                  # the tokens taken, EOS excluded
    ended_by: str                   # "finished" (grammar complete) or "eos"
    mask_us: list[float] = field(default_factory=list)


def random_walk(processor, rng: np.random.Generator, eos_ids, closers: np.ndarray,
                max_steps: int = 600, ramp: int = 40) -> Walk:
    """Sample under the processor's masks until it is finished or EOS is taken."""
    eos_ids = list(eos_ids)
    ids: list[int] = []
    mask_us: list[float] = []
    for step in range(max_steps):
        if processor.is_finished():
            return Walk(ids, "finished", mask_us)
        t0 = time.perf_counter()
        mask = processor.token_mask()
        mask_us.append((time.perf_counter() - t0) * 1e6)
        allowed = np.flatnonzero(mask)
        assert allowed.size, f"empty mask after {ids}"
        eos = [e for e in eos_ids if mask[e]]
        others = np.setdiff1d(allowed, eos_ids)
        if eos and (not others.size or rng.random() < 0.5):
            processor.accept(eos[0])
            return Walk(ids, "eos", mask_us)
        closing = others[closers[others]]
        if closing.size and rng.random() < min(0.95, 0.15 + step / ramp):
            token = int(rng.choice(closing))
        else:
            token = int(rng.choice(others))
        processor.accept(token)
        ids.append(token)
    raise AssertionError(f"the walk did not end in {max_steps} steps: {ids}")
