"""Speculative decoding with n-gram prompt lookup (`speculative_mode="ngram"`).

- the draft proposer on its own;
- the acceptance rule on its own: with fixed logits and a fixed draft, the tokens the
  OutputProcessor emits follow the target's distribution at each position (chi-square);
- the engine on the tiny random Llama: greedy and seeded-sampling outputs equal the plain
  engine's token for token (also with n > 1, penalties, stop strings, prefix caching and
  preemption), and the acceptance rate reaches `stats()` and `/metrics`.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    build_lib,
    make_tiny_llama,
    tiny_llama_library,
    write_mlc_dir,
    write_tiny_tokenizer,
)
from test_engine import LONG_PROMPT, OTHER_PROMPTS, assert_idle_and_freed, make_engine

from mlc.errors import ModelLoadError
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.output_processor import OutputProcessor
from mlc.runtime.request import EngineLimits, Request, Sequence
from mlc.runtime.sampler import HostSampler
from mlc.runtime.speculation import ngram_draft
from mlc.runtime.step import VerifyResult

REPEATING = ("def add(a, b): return a + b\ndef sub(a, b): return a - b\n"
             "def add(a, b): return a + b\ndef sub(a, b): return a - b\ndef")


# ------------------------------------------------------------------------------ the proposer


def test_ngram_draft_follows_the_latest_longest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]   # latest 3-gram
    assert ngram_draft([5, 6, 1, 2, 7, 2], 3) == [7, 2]                        # 1-gram
    assert ngram_draft([1, 2, 3, 4], 3) == []                                   # no repeat
    assert ngram_draft([4, 4], 3) == [4]
    assert ngram_draft([1, 2, 1], 0) == []


# ------------------------------------------------------------------------------ acceptance


def test_verify_acceptance_keeps_the_targets_distribution(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    vocab, draft = 8, [3, 5]
    logits = (np.random.default_rng(0).standard_normal((3, vocab)) * 1.2).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    out = OutputProcessor(HostSampler(), EngineLimits(4, 256, 64, 256))
    first, second, trials = np.zeros(vocab), np.zeros(vocab), 6000
    for t in range(trials):
        cfg = GenerationConfig(temperature=1.0, seed=t, max_tokens=10).with_defaults({})
        req = Request("r", [1, 2], cfg, tok, set(), lambda o: None)
        seq = Sequence(0, 0, req, [])
        result = VerifyResult(logits, [0], [seq], [[2] + draft], [1])
        (s, delta), = out.process_verify(result)
        ids = delta.token_ids
        assert 1 <= len(ids) <= 3 and ids[:len(ids) - 1] == draft[:len(ids) - 1]
        first[ids[0]] += 1
        if ids[0] == draft[0]:
            second[ids[1]] += 1
    # position 0 follows p0; position 1, given the draft's first token was taken, follows p1
    for counts, p in ((first, probs[0]), (second, probs[1])):
        n = counts.sum()
        chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
        assert chi2 < 24.3, (chi2, counts / n, p)      # 7 degrees of freedom, p = 0.001


# ------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-spec")
    return tiny_llama_library(tmp)


@pytest.fixture(scope="module")
def plain(tiny):
    eng = make_engine(tiny, prefix_cache_mode="disable")
    yield eng
    eng.terminate()


@pytest.fixture(scope="module")
def ngram(tiny):
    eng = make_engine(tiny, speculative_mode="ngram", spec_draft_length=4)
    yield eng
    eng.terminate()


def ids(engine, prompt, **kwargs) -> list[list[int]]:
    args = dict(temperature=0, max_tokens=40, ignore_eos=True)
    args.update(kwargs)
    per_choice: dict[int, list[int]] = {}
    for out in engine.generate(prompt, **args):
        for d in out.deltas:
            per_choice.setdefault(d.index, []).extend(d.token_ids)
    return [per_choice[i] for i in sorted(per_choice)]


def stream_text(chunks) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] = out.get(c.index, "") + c.text
    return out


def test_modes_without_a_draft_are_refused(tiny):
    for mode in ("small_draft", "eagle"):       # (eagle itself: tests/test_eagle.py)
        with pytest.raises(ModelLoadError, match="additional_models"):
            make_engine(tiny, speculative_mode=mode)
    with pytest.raises(ModelLoadError, match="speculative_mode must be one of"):
        make_engine(tiny, speculative_mode="medusa")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Another random Llama with the same vocabulary (1 layer, other weights)."""
    tmp = tmp_path_factory.mktemp("tiny-draft")
    hf_model, hf_dir = make_tiny_llama(tmp, seed=5, num_hidden_layers=1)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    return mlc_dir, build_lib(mlc_dir)


def test_small_draft_greedy_outputs_are_identical(tiny, plain, other_draft):
    _, mlc_dir, lib = tiny
    prompts = [REPEATING, LONG_PROMPT[:80], "Hello"]
    # (seeded sampling is compared with ngram above; here the target's verify logits and the
    # plain engine's decode logits, computed by other kernels, may differ in the last bits)
    kws = (dict(temperature=0), dict(temperature=0, n=2),
           dict(temperature=0, frequency_penalty=0.5))
    want = [[ids(plain, p, **kw) for kw in kws] for p in prompts]
    # the target as its own draft: greedy drafts are all accepted
    eng = make_engine(tiny, speculative_mode="small_draft", spec_draft_length=3,
                      additional_models=[f"{mlc_dir}:{lib}"])
    try:
        for p, wp in zip(prompts, want):
            for kw, w in zip(kws, wp):
                assert ids(eng, p, **kw) == w, (p, kw)
        before = eng.stats()
        ids(eng, REPEATING)
        st = eng.stats()
        drafted = st.draft_tokens - before.draft_tokens
        assert drafted > 0 and st.accepted_draft_tokens - before.accepted_draft_tokens == drafted
    finally:
        eng.terminate()
    # another model as the draft (a tuple (path, lib) works too): batched streams
    d_dir, d_lib = other_draft
    eng = make_engine(tiny, speculative_mode="small_draft", spec_draft_length=4,
                      additional_models=[(str(d_dir), str(d_lib))])
    try:
        streams = [eng.completions.create(prompt=p, temperature=0, max_tokens=40,
                                          ignore_eos=True, stream=True) for p in prompts]
        got = [stream_text(s)[0] for s in streams]
        assert got == [plain.tokenizer.decode(w[0][0]) for w in want]
        for p, wp in zip(prompts, want):
            for kw, w in zip(kws, wp):
                assert ids(eng, p, **kw) == w, (p, kw)
        st = eng.stats()
        assert st.draft_tokens > 0 and 0 <= st.acceptance_rate < 1
    finally:
        eng.terminate()


def test_greedy_output_is_identical_and_drafts_are_accepted(plain, ngram):
    before = ngram.stats()
    for prompt in (REPEATING, LONG_PROMPT, "Hello"):
        assert ids(ngram, prompt) == ids(plain, prompt)
    st = ngram.stats()
    assert st.draft_tokens > before.draft_tokens
    assert st.accepted_draft_tokens > before.accepted_draft_tokens
    assert 0 < st.acceptance_rate <= 1
    # fewer steps than tokens: several tokens were accepted per verify
    assert st.decode_steps - before.decode_steps < st.decode_tokens - before.decode_tokens


def test_seeded_sampling_n_choices_and_penalties_are_identical(plain, ngram):
    for kw in (dict(temperature=1.0, seed=3, n=2), dict(temperature=0.7, top_p=0.9, seed=1),
               dict(temperature=0, frequency_penalty=0.5, presence_penalty=0.3),
               dict(temperature=0, logit_bias={"5": 3.0})):
        assert ids(ngram, REPEATING, **kw) == ids(plain, REPEATING, **kw), kw


def test_batched_stop_strings_and_max_tokens_match(plain, ngram):
    prompts = [REPEATING, LONG_PROMPT] + OTHER_PROMPTS
    want = [plain.completions.create(prompt=p, temperature=0, max_tokens=25, ignore_eos=True,
                                      stop=["a +", "zz"]).choices[0].text for p in prompts]
    streams = [ngram.completions.create(prompt=p, temperature=0, max_tokens=25, stream=True,
                                        ignore_eos=True, stop=["a +", "zz"]) for p in prompts]
    got = [stream_text(s)[0] for s in streams]
    assert got == want


def test_preemption_and_prefix_cache_with_speculation(tiny, plain):
    eng = make_engine(tiny, speculative_mode="ngram", spec_draft_length=6,
                      max_total_sequence_length=160)
    try:
        initial = eng.stats().kv_pages_free
        prompts = [REPEATING, REPEATING + " add", LONG_PROMPT[:120], REPEATING[:60]]
        want = [ids(plain, p, max_tokens=50) for p in prompts]
        for _ in range(2):
            streams = [eng.completions.create(prompt=p, temperature=0, max_tokens=50,
                                              ignore_eos=True, stream=True) for p in prompts]
            got = [stream_text(s)[0] for s in streams]
            assert got == [plain.tokenizer.decode(w[0]) for w in want]
        st = eng.stats()
        assert st.preemptions > 0 and st.accepted_draft_tokens > 0
        assert_idle_and_freed(eng, initial)
    finally:
        eng.terminate()


def test_acceptance_rate_is_exported_on_metrics(ngram):
    from mlc.serve.metrics import EngineCollector

    ids(ngram, REPEATING)
    families = {f.name: f for f in EngineCollector(ngram.metrics).collect()}
    rate = families["mlc:spec_decode_draft_acceptance_rate"].samples[0].value
    assert rate == pytest.approx(ngram.stats().acceptance_rate)
    assert families["mlc:spec_decode_num_accepted_tokens"].samples[0].value > 0
