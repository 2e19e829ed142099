"""logit_bias and the repetition / presence / frequency penalties, as `LogitProcessor`s.

They edit a sequence's logits on the host (`edits_logits`), in the order HF and vLLM use:
repetition penalty (CTRL/HF) over prompt and output tokens, then presence and frequency
penalties (OpenAI) over output tokens, then logit_bias. A request that sets none of them gets
no processor and stays on the fast path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.logit_processor import LogitProcessor


class PenaltyProcessor(LogitProcessor):
    """Repetition, presence and frequency penalties over one sequence's tokens."""

    edits_logits = True

    def __init__(self, prompt_ids: Sequence[int], repetition: float = 1.0,
                 presence: float = 0.0, frequency: float = 0.0):
        self.repetition = float(repetition)
        self.presence = np.float32(presence)
        self.frequency = np.float32(frequency)
        self.prompt_ids = set(int(t) for t in prompt_ids)
        self.output_ids: list[int] = []
        self.counts: dict[int, int] = {}

    def apply(self, logits: np.ndarray) -> None:
        vocab = logits.shape[-1]
        if self.repetition != 1.0:
            seen = self.prompt_ids.union(self.counts)
            ids = np.fromiter(seen, dtype=np.int64, count=len(seen))
            ids = ids[ids < vocab]
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / self.repetition, vals * self.repetition)
        if (self.presence != 0 or self.frequency != 0) and self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            keep = ids < vocab
            logits[ids[keep]] -= self.frequency * counts[keep] + self.presence

    def accept(self, token_id: int) -> None:
        token_id = int(token_id)
        self.output_ids.append(token_id)
        self.counts[token_id] = self.counts.get(token_id, 0) + 1

    def rollback(self, n: int) -> None:
        for _ in range(n):
            token_id = self.output_ids.pop()
            self.counts[token_id] -= 1
            if not self.counts[token_id]:
                del self.counts[token_id]

    def fork(self) -> PenaltyProcessor:
        other = PenaltyProcessor((), self.repetition, self.presence, self.frequency)
        other.prompt_ids = self.prompt_ids            # never changes: shared
        other.output_ids, other.counts = list(self.output_ids), dict(self.counts)
        return other


class LogitBiasProcessor(LogitProcessor):
    """OpenAI's logit_bias: token id -> value added to its logit (stateless)."""

    edits_logits = True

    def __init__(self, bias: dict[int, float]):
        self.ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def apply(self, logits: np.ndarray) -> None:
        keep = self.ids < logits.shape[-1]
        logits[self.ids[keep]] += self.values[keep]

    def rollback(self, n: int) -> None:
        pass

    def fork(self) -> LogitBiasProcessor:
        return self


def builtin_processor_factories(cfg: GenerationConfig,
                                ) -> list[Callable[[list[int]], LogitProcessor]]:
    """The processors a request's own settings ask for (none for plain sampling)."""
    factories: list[Callable[[list[int]], LogitProcessor]] = []
    rep = cfg.repetition_penalty if cfg.repetition_penalty is not None else 1.0
    pres, freq = cfg.presence_penalty or 0.0, cfg.frequency_penalty or 0.0
    if rep != 1.0 or pres != 0.0 or freq != 0.0:
        factories.append(lambda prompt: PenaltyProcessor(prompt, rep, pres, freq))
    if cfg.logit_bias:
        bias = dict(cfg.logit_bias)
        factories.append(lambda prompt: LogitBiasProcessor(bias))
    return factories
