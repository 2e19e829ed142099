"""MLC_BATCH_INVARIANT=1: a row computed in a batch has the same bits as alone, so a seeded
request samples the same tokens alone or batched with others.

On CUDA the variable also switches mlc's kernels (one q4 path and a fixed split for every row
count, a fixed KV split for decode attention: `cuda_kernels/cuda_check.h`); that half is
tested in tests/gpu/test_device_sampling_gpu.py. On the CPU, TVM's kernels compute a row the
same way whatever the batch, but a single sequence's own functions (`prefill`, `decode`,
compiled for a batch of one) are scheduled differently from the batched ones (the decode
GEMV's vector width), so rows differ in the last bits unless the variable sends single
sequences through the batched functions."""

import asyncio

import numpy as np
import pytest
from helpers import tiny_llama_library

from mlc.runtime.engine import AsyncMLCEngine
from mlc.runtime.model import KVCacheConfig, LoadedModel

PROMPTS = ["Count to five.", "Name a color.", "Write a haiku about rain.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("invariant")
    _, mlc_dir, lib = tiny_llama_library(tmp, "q4f32_1")
    return mlc_dir, lib


def logits_alone_and_batched(model: LoadedModel, rng) -> tuple[list, list]:
    """Prefill + 4 decode steps of sequence 0, alone and then beside three others."""
    prompts = [rng.integers(0, model.vocab_size, size=n).tolist() for n in (13, 7, 21, 5)]
    steps = rng.integers(0, model.vocab_size, size=(4, 4)).tolist()
    runs = []
    for ids in ([0], [0, 1, 2, 3]):
        for s in ids:
            model.add_sequence(s)
        out = [model.prefill(ids, [prompts[s] for s in ids])[0]]
        for step in steps:
            out.append(model.decode(ids, [step[s] for s in ids])[0])
        for s in ids:
            model.remove_sequence(s)
        runs.append(out)
    return runs[0], runs[1]


def test_rows_are_the_same_bits_alone_or_batched(tiny_q4, monkeypatch):
    monkeypatch.setenv("MLC_BATCH_INVARIANT", "1")
    mlc_dir, lib = tiny_q4
    model = LoadedModel(mlc_dir, lib, "cpu")
    assert model.batch_invariant
    model.create_kv_cache(KVCacheConfig(4, 512, 128))
    alone, batched = logits_alone_and_batched(model, np.random.default_rng(0))
    for a, b in zip(alone, batched):
        np.testing.assert_array_equal(a, b)
    assert np.abs(alone[0]).max() > 0 and not np.array_equal(alone[0], alone[1])


def test_without_the_variable_single_sequences_use_their_own_functions(tiny_q4, monkeypatch):
    """The default keeps the faster batch-of-one functions: same tokens, not the same bits."""
    monkeypatch.setenv("MLC_BATCH_INVARIANT", "0")
    mlc_dir, lib = tiny_q4
    model = LoadedModel(mlc_dir, lib, "cpu")
    assert not model.batch_invariant
    model.create_kv_cache(KVCacheConfig(4, 512, 128))
    alone, batched = logits_alone_and_batched(model, np.random.default_rng(0))
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert a.argmax() == b.argmax()


def test_seeded_requests_sample_the_same_tokens_alone_or_batched(tiny_q4, monkeypatch):
    monkeypatch.setenv("MLC_BATCH_INVARIANT", "1")
    mlc_dir, lib = tiny_q4
    engine = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), prefix_cache_mode="disable")

    def request(prompt, seed):
        return engine.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], temperature=1.0, top_p=0.95,
            seed=seed, max_tokens=24, extra_body={"debug_config": {"ignore_eos": True}})

    async def run(together: bool):
        if together:
            rs = await asyncio.gather(*[request(p, s) for s, p in enumerate(PROMPTS, 11)])
        else:
            rs = [await request(p, s) for s, p in enumerate(PROMPTS, 11)]
        return [r.choices[0].message.content for r in rs]

    try:
        alone, together = asyncio.run(run(False)), asyncio.run(run(True))
    finally:
        engine.terminate()
    assert alone == together
    assert len(set(alone)) == len(alone)
