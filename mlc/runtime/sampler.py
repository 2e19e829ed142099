"""Sampling one step of a batch on the host (numpy, float32 logits).

`Sampler.sample` is the numpy core: per row, greedy argmax when temperature == 0 or top_k == 1,
else temperature, top-k, softmax, top-p (nucleus, at least one token kept) and a draw from the
row's own `numpy.random.Generator`; logprobs are the log-softmax of the row as given (after the
logit processors, before temperature/top-k/top-p). `HostSampler` is the engine's host path:
it copies the step's logits to the host, runs each sequence's logit processors and masks, then
`Sampler.sample`. (`mlc.runtime.device_sampler` is the device path.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mlc.runtime.generation_config import GenerationConfig


def make_generator(seed: int | None, index: int = 0) -> np.random.Generator:
    """The random generator of choice `index` of a request: reproducible when seeded.

    Different choices of one seeded request get different (but reproducible) streams.
    """
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, index])


@dataclass
class SampledToken:
    """The result for one row: the token, and its logprobs when requested."""

    token_id: int
    logprob: float | None = None
    """Log probability of `token_id` under the processed distribution (None if not asked)."""
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """The `top_logprobs` most likely (token id, logprob), most likely first."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [batch, vocab] logits (float32 in, float32 out)."""
    return (logits - _logsumexp(logits)[:, None]).astype(np.float32)


def _top_k_mask(scaled: np.ndarray, k: int) -> None:
    """Set all but the k largest entries of a 1-D row to -inf, in place."""
    if 0 < k < scaled.shape[0]:
        kth = np.partition(scaled, scaled.shape[0] - k)[scaled.shape[0] - k]
        scaled[scaled < kth] = -np.inf


def _nucleus(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the smallest most-likely set with mass >= top_p.

    probs: [vocab], unnormalized. Only tokens with p >= (1 - top_p) * total / vocab can be in
    the set (all smaller ones together hold less than 1 - top_p of the mass), so only those
    are sorted.
    """
    total = probs.sum()
    candidates = np.flatnonzero(probs >= (1.0 - top_p) * total / probs.shape[0])
    ids = candidates[np.argsort(-probs[candidates])]  # most likely first
    cum = np.cumsum(probs[ids])
    n_keep = min(int(np.searchsorted(cum, top_p * total, side="left")) + 1, len(ids))
    return ids[:n_keep], probs[ids[:n_keep]]


_DRAW_BLOCK = 256


def _draw_rows(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws, one per row of unnormalized probabilities [n, vocab], for uniforms in
    (0, 1]: block sums first, then a cumulative sum inside the chosen block only (exact, and
    several times faster than a full-row cumsum per row). Never picks a zero-probability id."""
    n, vocab = probs.shape
    n_blocks = -(-vocab // _DRAW_BLOCK)
    if n_blocks * _DRAW_BLOCK != vocab:
        probs = np.pad(probs, ((0, 0), (0, n_blocks * _DRAW_BLOCK - vocab)))
    blocks = probs.reshape(n, n_blocks, _DRAW_BLOCK)
    block_cdf = np.cumsum(blocks.sum(axis=2, dtype=np.float64), axis=1)  # [n, n_blocks]
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        target = uniforms[i] * block_cdf[i, -1]
        b = min(int(np.searchsorted(block_cdf[i], target, side="left")), n_blocks - 1)
        row = blocks[i, b]
        nonzero = np.flatnonzero(row)
        inner = np.cumsum(row[nonzero], dtype=np.float64) + (block_cdf[i, b - 1] if b else 0.0)
        j = min(int(np.searchsorted(inner, target, side="left")), len(nonzero) - 1)
        out[i] = b * _DRAW_BLOCK + nonzero[j]
    return out


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn from unnormalized probabilities; never one with probability zero."""
    cdf = np.cumsum(probs, dtype=np.float64)
    u = 1.0 - rng.random()  # in (0, 1]
    return int(np.searchsorted(cdf, u * cdf[-1], side="left"))


class Sampler:
    """Samples one token per row of a batch of logits with per-row settings."""

    def __init__(self, seed: int | None = None):
        self._rng = np.random.default_rng(seed)  # for rows that bring no generator

    def sample(self, logits: np.ndarray, configs: Sequence[GenerationConfig],
               generators: Sequence[np.random.Generator | None] | None = None,
               copy: bool = True) -> list[SampledToken]:
        """Sample the next token of every row.

        logits: [batch, vocab] float32 (modified only when copy=False). `configs` should have
        defaults filled (`GenerationConfig.with_defaults`); None fields are treated as neutral.
        `generators` are the per-choice random streams (see `make_generator`). Returns one
        `SampledToken` per row.
        """
        batch = logits.shape[0]
        if len(configs) != batch:
            raise ValueError(f"{len(configs)} configs for {batch} rows of logits")
        generators = generators if generators is not None else [None] * batch
        x = np.array(logits, dtype=np.float32, copy=True) if copy else logits  # [batch, vocab]

        sample_rows = [r for r, c in enumerate(configs) if not c.is_greedy]
        lp_rows = [r for r, c in enumerate(configs) if c.logprobs]
        token_ids = np.argmax(x, axis=-1)  # [batch]; greedy rows keep this
        if sample_rows:
            rows = np.asarray(sample_rows)
            temps = np.asarray([configs[r].temperature or 1.0 for r in sample_rows],
                               dtype=np.float32)
            scaled = x[rows] / temps[:, None]  # [n_sample, vocab]
            for i, r in enumerate(sample_rows):
                _top_k_mask(scaled[i], configs[r].top_k or 0)
            scaled -= scaled.max(axis=-1, keepdims=True)
            probs = np.exp(scaled, out=scaled)  # [n_sample, vocab], unnormalized
            plain, uniforms = [], []
            for i, r in enumerate(sample_rows):
                rng = generators[r] or self._rng
                top_p = configs[r].top_p
                if top_p is not None and top_p < 1.0:
                    ids, kept = _nucleus(probs[i], top_p)
                    token_ids[r] = ids[_draw(kept, rng)]
                else:
                    plain.append(i)
                    uniforms.append(1.0 - rng.random())  # in (0, 1]
            if plain:
                picks = _draw_rows(probs[plain], np.asarray(uniforms))
                token_ids[[sample_rows[i] for i in plain]] = picks

        results = [SampledToken(int(t)) for t in token_ids]
        if lp_rows:
            for r in lp_rows:
                results[r].logprob, results[r].top_logprobs = token_logprobs(
                    x[r], int(token_ids[r]), configs[r].top_logprobs)
        return results


def token_logprobs(row: np.ndarray, token_id: int, top: int,
                   ) -> tuple[float, list[tuple[int, float]]]:
    """(logprob of `token_id`, the `top` most likely (id, logprob)) under log-softmax(row)."""
    lse = float(_logsumexp(row[None])[0])
    return (float(row[token_id]) - lse,
            [(t, float(v - lse)) for t, v in _top_entries(row, top)])


class HostSampler:
    """The engine's host path: logits to the host, processors and masks, numpy sampling."""

    def __init__(self, seed: int | None = None):
        self.sampler = Sampler(seed)

    def sample(self, logits, rows: list[int], seqs: list, masks: list[np.ndarray | None],
               ) -> list[SampledToken]:
        """One token per sequence; `seqs[i]` samples from logits row `rows[i]` under
        `masks[i]` (bool[vocab] of allowed tokens, or None)."""
        host = logits if isinstance(logits, np.ndarray) else logits.numpy()
        x = host[rows]                                           # [m, vocab], a copy
        for i, seq in enumerate(seqs):
            for p in seq.processors:
                if p.edits_logits:
                    p.apply(x[i])
            if masks[i] is not None:
                np.putmask(x[i], ~masks[i], -np.inf)    # 6x faster than x[i, ~m] = ...
        return self.sampler.sample(x, [s.config for s in seqs], [s.rng for s in seqs],
                                   copy=False)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(x))) of [batch, vocab] float32, accumulated in float64."""
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=-1, dtype=np.float64))


_BLOCK = 128


def _top_entries(values: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k largest (id, value) of a 1-D row, largest first.

    The k largest values all lie in the k blocks (of _BLOCK entries) with the largest
    maxima, so only those blocks are searched.
    """
    vocab = values.shape[0]
    k = min(k, vocab)
    if k <= 0:
        return []
    candidates = np.arange(vocab)
    n_blocks = -(-vocab // _BLOCK)
    if n_blocks > 4 * k:
        padded = np.full(n_blocks * _BLOCK, -np.inf, dtype=values.dtype)
        padded[:vocab] = values
        block_max = padded.reshape(n_blocks, _BLOCK).max(axis=1)
        blocks = np.argpartition(block_max, n_blocks - k)[n_blocks - k:]
        candidates = (blocks[:, None] * _BLOCK + np.arange(_BLOCK)).ravel()
        candidates = candidates[candidates < vocab]
    n = candidates.shape[0]
    ids = candidates[np.argpartition(values[candidates], n - k)[n - k:]]
    ids = ids[np.lexsort((ids, -values[ids]))]
    return [(int(i), float(values[i])) for i in ids]
