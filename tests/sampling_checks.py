"""Checks of the device sampling path, shared by the CPU tests (the CPU library exports the
same sampling functions) and the GPU tests: `model` is a `LoadedModel` of either device."""

from __future__ import annotations

import numpy as np

from mlc.runtime.device_sampler import DeviceSampler
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.logit_processor import LogitProcessor
from mlc.runtime.penalties import LogitBiasProcessor
from mlc.runtime.request import Request, Sequence
from mlc.runtime.sampler import HostSampler, token_logprobs


class Allow(LogitProcessor):
    """A mask-only processor (what a grammar is): only `allowed` may come next."""

    def __init__(self, vocab: int, allowed):
        self.mask = np.zeros(vocab, dtype=bool)
        self.mask[list(allowed)] = True

    def token_mask(self):
        return self.mask


def seq(processors=(), seed=None, index=0, **cfg) -> Sequence:
    config = GenerationConfig(seed=seed, **cfg).with_defaults({})
    req = Request("r", [1, 2, 3], config, None, set(), lambda out: None)
    return Sequence(index, index, req, list(processors))


def masks(seqs):
    from mlc.runtime.output_processor import OutputProcessor

    return [OutputProcessor.token_mask(s) for s in seqs]


def random_logits(vocab: int, rows: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * 3).astype(np.float32)


def check_greedy_bias_masks_and_logprobs(model) -> None:
    """Greedy rows, host-edited rows (logit_bias), device-masked rows and logprobs give what
    the host path gives on the same logits."""
    v = model.vocab_size
    x = random_logits(v, 4, seed=1)
    top = int(np.argmax(x[1]))
    allowed = [int(t) for t in np.argsort(x[3])[:5]]      # the five least likely tokens
    seqs = [seq(temperature=0, logprobs=True, top_logprobs=3),
            seq([LogitBiasProcessor({top: -100.0})], temperature=0),
            seq(temperature=0.9, top_k=1, seed=3),
            seq([Allow(v, allowed)], temperature=0),
            seq([Allow(v, allowed)], temperature=1.0, seed=4)]
    rows = [0, 1, 2, 3, 3]                                # row 3 sampled twice (n > 1)
    got = DeviceSampler(model).sample(model.upload(x), rows, seqs, masks(seqs))
    assert got[0].token_id == int(np.argmax(x[0]))
    lp, tops = token_logprobs(x[0], got[0].token_id, 3)
    assert abs(got[0].logprob - lp) < 1e-5 and [t for t, _ in got[0].top_logprobs] == \
        [t for t, _ in tops]
    assert got[1].token_id == int(np.argsort(-x[1])[1])  # the best was biased away
    assert got[2].token_id == int(np.argmax(x[2]))       # top_k 1 is greedy
    assert got[3].token_id == max(allowed, key=lambda t: x[3, t])
    assert got[4].token_id in allowed
    host = HostSampler().sample(x, rows[:4], seqs[:4], masks(seqs[:4]))
    assert [t.token_id for t in host] == [t.token_id for t in got[:4]]


def check_distribution_and_top_p(model) -> None:
    """Draws follow softmax(logits / T); top_p keeps the smallest set reaching p."""
    v = model.vocab_size
    row = np.full(v, -30.0, dtype=np.float32)
    live = np.arange(8) * 3
    row[live] = np.random.default_rng(10).standard_normal(8).astype(np.float32)
    x = np.repeat(row[None], 50, axis=0)         # (the library plans for <= max_batch_size rows)
    sampler = DeviceSampler(model)
    counts = np.zeros(v)
    for k in range(60):
        seqs = [seq(temperature=0.8, seed=1000 * k + i) for i in range(50)]
        for t in sampler.sample(model.upload(x), list(range(50)), seqs, [None] * 50):
            counts[t.token_id] += 1
    p = np.exp(row[live] / 0.8)
    p /= p.sum()
    np.testing.assert_allclose(counts[live] / 3000, p, atol=0.03)
    assert counts.sum() == counts[live].sum() == 3000
    order = live[np.argsort(-row[live])]
    probs = np.exp(row[order] - row[order].max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), 0.6)) + 1
    seqs = [seq(temperature=1.0, top_p=0.6, seed=i) for i in range(50)]
    seen = {t.token_id for t in sampler.sample(model.upload(x), list(range(50)), seqs,
                                               [None] * 50)}
    assert seen == set(int(t) for t in order[:keep])


def check_seeded_rows_do_not_depend_on_the_batch(model) -> None:
    """A seeded row draws the same token alone or among other rows."""
    v = model.vocab_size
    x = random_logits(v, 6, seed=5) / 3                    # flat: many plausible tokens
    sampler = DeviceSampler(model)
    alone = [sampler.sample(model.upload(x[i:i + 1]), [0], [seq(temperature=1.0, seed=i)],
                            [None])[0].token_id for i in range(6)]
    together = sampler.sample(model.upload(x), list(range(6)),
                              [seq(temperature=1.0, seed=i) for i in range(6)], [None] * 6)
    assert [t.token_id for t in together] == alone
