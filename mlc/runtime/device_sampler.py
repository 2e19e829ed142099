"""Sampling on the device with the library's own functions: only the chosen token ids (and the
rows of requests that asked for logprobs) cross to the host.

Per step, for a batch of m sequences over logits [b, v] on the device:
1. the rows the step samples are gathered (prefill chunks that end mid-prompt sample nothing;
   n > 1 choices share their prompt's row) into [m, v];
2. a sequence whose processors edit logits (logit_bias, penalties) has its row copied to the
   host, edited, masked, and written back; a sequence with only masks (a grammar) gets them
   added on the device as a 0 / -inf bias row (`apply_logit_bias`);
3. greedy rows take `argmax`; the others `softmax_with_temperature`, then
   `sample_with_top_p_top_k` with one uniform number per row drawn from the sequence's own
   seeded generator, so a seeded request draws the same numbers alone or batched.

Logprobs are computed on the host from the processed row (log-softmax before temperature,
as on the host path).
"""

from __future__ import annotations

import numpy as np

from mlc.runtime.sampler import SampledToken, token_logprobs


class DeviceSampler:
    """The device path of the OutputProcessor, over a `ModelRunner` with sampling functions."""

    def __init__(self, runner):
        self.runner = runner
        self.fn = runner.sampling
        self.vocab = runner.vocab_size

    def sample(self, logits, rows: list[int], seqs: list, masks: list[np.ndarray | None],
               ) -> list[SampledToken]:
        """One token per sequence; `seqs[i]` samples from row `rows[i]` of `logits` [b, v]
        under `masks[i]` (bool[vocab] of allowed tokens, or None)."""
        runner, m = self.runner, len(seqs)
        x = self._gather(logits, rows)                                       # [m, v]
        host_rows: dict[int, np.ndarray] = {}
        for i, seq in enumerate(seqs):
            edits = [p for p in seq.processors if p.edits_logits]
            if edits or seq.config.logprobs:
                row = runner.row(x, i).numpy()[0]                           # [v]
                for p in edits:
                    p.apply(row)
                if masks[i] is not None:
                    np.putmask(row, ~masks[i], -np.inf)
                if edits or masks[i] is not None:
                    runner.row(x, i).copyfrom(row[None])
                host_rows[i] = row
            elif masks[i] is not None:
                # (the library's kernels take whole tensors, not row views: one-row scratch)
                bias = np.where(masks[i], np.float32(0), np.float32(-np.inf))[None]
                scratch = runner.empty((1, self.vocab))
                scratch.copyfrom(runner.row(x, i))
                runner.row(x, i).copyfrom(self.fn["apply_logit_bias"](scratch,
                                                                      runner.upload(bias)))
        configs = [s.config for s in seqs]
        greedy = np.array([c.is_greedy for c in configs])
        token_ids = np.empty(m, dtype=np.int64)
        if greedy.any():
            token_ids[:] = self.fn["argmax"](x).numpy()
        if not greedy.all():
            token_ids[~greedy] = self._draw(x, seqs, greedy)[~greedy]
        out = [SampledToken(int(t)) for t in token_ids]
        for i, row in host_rows.items():
            if configs[i].logprobs:
                out[i].logprob, out[i].top_logprobs = token_logprobs(
                    row, out[i].token_id, configs[i].top_logprobs)
        return out

    def _gather(self, logits, rows: list[int]):
        """The sampled rows of `logits` as their own contiguous [m, v] tensor (or `logits`
        itself when every row is sampled once, in order)."""
        if rows == list(range(int(logits.shape[0]))):
            return logits
        x = self.runner.empty((len(rows), self.vocab))
        for i, r in enumerate(rows):
            self.runner.row(x, i).copyfrom(self.runner.row(logits, r))
        return x

    def _draw(self, x, seqs: list, greedy: np.ndarray) -> np.ndarray:
        """Top-p/top-k draws for every row (greedy rows draw nothing from their generator)."""
        m = len(seqs)
        temps = np.ones(m, dtype=np.float32)
        top_p = np.ones(m, dtype=np.float32)
        top_k = np.full(m, self.vocab, dtype=np.int32)
        uniform = np.full(m, 0.5, dtype=np.float32)
        for i, seq in enumerate(seqs):
            if greedy[i]:
                continue
            cfg = seq.config
            temps[i] = cfg.temperature or 1.0
            top_p[i] = cfg.top_p or 1.0
            top_k[i] = cfg.top_k if cfg.top_k else self.vocab      # 0: no top-k
            uniform[i] = seq.rng.random()                           # [0, 1)
        up = self.runner.upload
        probs = self.fn["softmax_with_temperature"](self.runner.reshape(x, (m, 1, self.vocab)),
                                                    up(temps))
        probs = self.runner.reshape(probs, (m, self.vocab))
        return self.fn["sample_with_top_p_top_k"](probs, up(top_p), up(top_k),
                                                  up(uniform)).numpy().astype(np.int64)
