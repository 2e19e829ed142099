"""Host-side sampler (greedy, seeds, top-k/top-p, logprobs, distribution) and the built-in
logit processors (penalties, logit_bias) against direct computations."""

import numpy as np
import pytest

from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.penalties import (
    LogitBiasProcessor,
    PenaltyProcessor,
    builtin_processor_factories,
)
from mlc.runtime.sampler import Sampler, log_softmax, make_generator

VOCAB = 49152


def _logits(batch=4, vocab=VOCAB, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _cfg(**kw):
    return GenerationConfig(**kw).with_defaults({})


def _processed(logits, cfgs, prompts=None, outputs=None):
    """The logits after each row's built-in processors (as the engine runs them)."""
    x = logits.copy()
    for row, cfg in enumerate(cfgs):
        for make in builtin_processor_factories(cfg):
            proc = make(list(prompts[row]) if prompts else [])
            for t in outputs[row] if outputs else []:
                proc.accept(t)
            proc.apply(x[row])
    return x


def test_greedy_is_argmax():
    logits = _logits()
    out = Sampler().sample(logits, [_cfg(temperature=0.0)] * 4)
    assert [o.token_id for o in out] == list(np.argmax(logits, axis=-1))


def test_top_k_one_equals_greedy():
    logits = _logits(seed=1)
    out = Sampler().sample(logits, [_cfg(temperature=1.5, top_k=1)] * 4,
                           generators=[make_generator(None) for _ in range(4)])
    assert [o.token_id for o in out] == list(np.argmax(logits, axis=-1))


def test_tiny_top_p_is_argmax():
    logits = _logits(seed=2)
    out = Sampler().sample(logits, [_cfg(temperature=1.0, top_p=1e-6)] * 4)
    assert [o.token_id for o in out] == list(np.argmax(logits, axis=-1))


def test_same_seed_same_tokens_and_no_seed_varies():
    logits = _logits(batch=8, seed=3, scale=0.5)  # flat: many plausible tokens
    cfgs = [_cfg(temperature=1.0, top_p=0.95, seed=1234)] * 8

    def run(seed):
        gens = [make_generator(seed, i) for i in range(8)]
        return [[o.token_id for o in Sampler().sample(logits, cfgs, generators=gens)]
                for _ in range(3)]
    assert run(1234) == run(1234)
    assert run(1234) != run(4321)
    unseeded = {tuple(t) for t in run(None)}
    assert len(unseeded) > 1


def test_choices_of_one_seeded_request_differ():
    logits = np.repeat(_logits(batch=1, seed=4, scale=0.1), 4, axis=0)
    gens = [make_generator(7, i) for i in range(4)]
    tokens = [o.token_id for o in Sampler().sample(logits, [_cfg(seed=7)] * 4, generators=gens)]
    assert len(set(tokens)) > 1


def _reference_penalties(logits, cfg, prompt, output):
    x = logits.astype(np.float32).copy()
    seen = sorted(set(prompt) | set(output))
    for t in seen:
        if cfg.repetition_penalty != 1.0:
            x[t] = x[t] / cfg.repetition_penalty if x[t] > 0 else x[t] * cfg.repetition_penalty
    for t in set(output):
        x[t] -= cfg.frequency_penalty * output.count(t) + cfg.presence_penalty
    for t, b in cfg.logit_bias.items():
        x[t] += b
    return x


def test_penalties_match_direct_computation():
    rng = np.random.default_rng(5)
    vocab = 1000
    logits = _logits(batch=3, vocab=vocab, seed=5)
    cfgs = [_cfg(repetition_penalty=1.3),
            _cfg(presence_penalty=0.8, frequency_penalty=0.6, logit_bias={3: 5.0, 9: -2.0}),
            _cfg(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=1.5)]
    prompts, outputs, refs = [], [], []
    for row, cfg in enumerate(cfgs):
        prompt = [int(t) for t in rng.integers(0, vocab, 30)]
        output = [int(t) for t in rng.integers(0, vocab, 20)] + [prompt[0]] * 3
        prompts.append(prompt)
        outputs.append(output)
        refs.append(_reference_penalties(logits[row], cfg, prompt, output))
    got = _processed(logits, cfgs, prompts, outputs)
    np.testing.assert_allclose(got, np.stack(refs), rtol=1e-6, atol=1e-5)
    # Only the penalized tokens changed.
    changed = np.nonzero(got[0] != logits[0])[0]
    assert set(changed) <= set(prompts[0]) | set(outputs[0])


def test_requests_without_penalties_or_bias_get_no_processor():
    assert builtin_processor_factories(_cfg(temperature=0.7, top_p=0.9)) == []
    assert len(builtin_processor_factories(_cfg(logit_bias={1: 2.0}))) == 1
    assert len(builtin_processor_factories(_cfg(presence_penalty=0.5))) == 1


def test_penalty_processor_fork_and_rollback():
    rng = np.random.default_rng(13)
    row = rng.standard_normal(200).astype(np.float32)
    proc = PenaltyProcessor([1, 2, 3], repetition=1.2, presence=0.5, frequency=0.3)
    for t in (5, 6, 5):
        proc.accept(t)
    child = proc.fork()
    child.accept(7)
    a, b = row.copy(), row.copy()
    proc.apply(a)
    child.apply(b)
    assert a[7] == row[7] and b[7] != row[7]      # the child's token only penalizes the child
    child.rollback(1)                              # forgetting it makes them equal again
    c = row.copy()
    child.apply(c)
    np.testing.assert_array_equal(a, c)
    proc.rollback(2)                               # back to having taken only token 5 once
    ref = PenaltyProcessor([1, 2, 3], repetition=1.2, presence=0.5, frequency=0.3)
    ref.accept(5)
    d, e = row.copy(), row.copy()
    proc.apply(d)
    ref.apply(e)
    np.testing.assert_array_equal(d, e)
    bias = LogitBiasProcessor({4: 3.0, 500: 1.0})            # ids beyond the vocab are ignored
    f = row.copy()
    bias.fork().apply(f)
    assert f[4] == row[4] + 3.0 and np.count_nonzero(f != row) == 1


def test_presence_penalty_ignores_prompt_tokens():
    logits = _logits(batch=1, vocab=100, seed=6)
    got = _processed(logits, [_cfg(presence_penalty=2.0)], [[1, 2, 3]])
    np.testing.assert_array_equal(got, logits)


def test_logit_bias_minus_100_bans_token():
    logits = _logits(batch=1, vocab=50, seed=7, scale=0.5)
    best = int(np.argmax(logits[0]))
    sampler = Sampler()
    greedy_cfg = _cfg(temperature=0, logit_bias={best: -100.0})
    greedy = sampler.sample(_processed(logits, [greedy_cfg]), [greedy_cfg])
    assert greedy[0].token_id != best
    gen = make_generator(0)
    cfg = _cfg(temperature=1.0, logit_bias={best: -100.0})
    biased = _processed(logits, [cfg])
    drawn = {sampler.sample(biased, [cfg], generators=[gen])[0].token_id for _ in range(2000)}
    assert best not in drawn and len(drawn) > 10


def test_logit_bias_plus_100_forces_token():
    logits = _logits(batch=1, vocab=500, seed=8)
    cfg = _cfg(temperature=1.0, logit_bias={123: 100.0})
    gen = make_generator(1)
    biased = _processed(logits, [cfg])
    assert {Sampler().sample(biased, [cfg], generators=[gen])[0].token_id
            for _ in range(50)} == {123}


def test_logprobs_are_log_softmax_of_processed_logits():
    logits = _logits(batch=3, seed=9)
    cfgs = [_cfg(temperature=0.5, top_p=0.5, logprobs=True, top_logprobs=5,
                 logit_bias={11: 3.0}),
            _cfg(temperature=0, logprobs=True, top_logprobs=0),
            _cfg(temperature=1.0)]
    processed = _processed(logits, cfgs)
    out = Sampler().sample(processed, cfgs, generators=[make_generator(i) for i in range(3)])
    full = log_softmax(processed)
    np.testing.assert_allclose(np.exp(full.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)
    for row in (0, 1):
        assert out[row].logprob == pytest.approx(full[row, out[row].token_id], abs=1e-5)
    top = out[0].top_logprobs
    assert len(top) == 5 and [t for t, _ in top] == list(np.argsort(-full[0])[:5])
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    assert out[1].top_logprobs == [] and out[2].logprob is None


def test_sampling_distribution_matches_softmax():
    vocab = 8
    logits = np.random.default_rng(10).standard_normal((1, vocab)).astype(np.float32)
    temperature = 0.8
    cfg = _cfg(temperature=temperature)
    gen = make_generator(42)
    sampler = Sampler()
    # Batch the draws: the same row repeated, each draw from the same generator.
    draws = 20000
    batch = np.repeat(logits, 100, axis=0)
    counts = np.zeros(vocab)
    for _ in range(draws // 100):
        for o in sampler.sample(batch, [cfg] * 100, generators=[gen] * 100):
            counts[o.token_id] += 1
    p = np.exp(logits[0] / temperature)
    p /= p.sum()
    np.testing.assert_allclose(counts / draws, p, atol=0.015)


def test_top_k_and_top_p_restrict_support():
    vocab = 16
    logits = np.random.default_rng(11).standard_normal((1, vocab)).astype(np.float32) * 2
    order = np.argsort(-logits[0])
    gen = make_generator(3)
    sampler = Sampler()
    cfg_k = _cfg(temperature=1.0, top_k=3)
    seen_k = {sampler.sample(logits, [cfg_k], generators=[gen])[0].token_id for _ in range(500)}
    assert seen_k == set(order[:3])
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.7)) + 1
    cfg_p = _cfg(temperature=1.0, top_p=0.7)
    seen_p = {sampler.sample(logits, [cfg_p], generators=[gen])[0].token_id for _ in range(800)}
    assert seen_p == set(order[:n_keep])


def test_mixed_batch_full_vocab_is_fast_enough():
    logits = _logits(batch=64, seed=12)
    cfgs = [_cfg(temperature=0) if i % 3 == 0 else
            _cfg(temperature=0.7, top_p=0.9, top_k=50 if i % 2 else 0, logprobs=True,
                 top_logprobs=2, repetition_penalty=1.1) for i in range(64)]
    out = Sampler(seed=0).sample(_processed(logits, cfgs, [range(i, i + 100) for i in range(64)]),
                                 cfgs)
    assert len(out) == 64 and all(0 <= o.token_id < VOCAB for o in out)
