"""The device sampling path (the library's softmax / top-p-top-k / argmax / logit-bias
functions) on the CPU library of a tiny random Llama, and the engine on it: what GPU libraries
run, checked where there is no GPU. tests/gpu repeats these on CUDA."""

from __future__ import annotations

import asyncio

import pytest
import sampling_checks as checks
from helpers import load_model, tiny_llama_library

from mlc.errors import ModelLoadError
from mlc.runtime.engine import AsyncMLCEngine

PROMPTS = ["The quick brown fox", "A paged KV cache", "Numbers: 0 1 2 3", "def add(a, b):"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-sampling")
    _, mlc_dir, lib = tiny_llama_library(tmp)
    return mlc_dir, lib


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(*tiny)


def test_greedy_bias_masks_and_logprobs(model):
    checks.check_greedy_bias_masks_and_logprobs(model)


def test_distribution_and_top_p(model):
    checks.check_distribution_and_top_p(model)


def test_seeded_rows_do_not_depend_on_the_batch(model):
    checks.check_seeded_rows_do_not_depend_on_the_batch(model)


def seeded_alone_and_batched(engine) -> tuple[list[str], list[str]]:
    def args(prompt, seed):
        return dict(messages=[{"role": "user", "content": prompt}], temperature=1.0,
                    top_p=0.9, seed=seed, max_tokens=16, ignore_eos=True)

    async def main():
        alone = [(await engine.chat.completions.create(**args(p, i))).choices[0].message.content
                 for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(*[engine.chat.completions.create(**args(p, i))
                                          for i, p in enumerate(PROMPTS)])
        return alone, [r.choices[0].message.content for r in together]

    return asyncio.run(main())


@pytest.mark.parametrize("sampling", ["device", "host"])
def test_same_seed_same_output_alone_or_batched(tiny, sampling):
    mlc_dir, lib = tiny
    engine = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), sampling=sampling,
                            enable_tracing=True)
    try:
        assert engine.sampling_path == sampling
        alone, together = seeded_alone_and_batched(engine)
        assert together == alone and len(set(alone)) == len(alone)
        sizes = [e["args"]["batch_size"] for e in engine.tracer.events if e["ph"] == "C"]
        assert max(sizes) > 1                                     # they did share steps
    finally:
        engine.terminate()


def test_device_and_host_paths_agree_on_greedy(tiny):
    mlc_dir, lib = tiny
    texts = {}
    for sampling in ("device", "host"):
        engine = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), sampling=sampling)
        try:
            async def main(engine=engine):
                return [(await engine.completions.create(
                    prompt=p, max_tokens=12, temperature=0, ignore_eos=True,
                    logit_bias={7: 4.0}, presence_penalty=0.5)).choices[0].text for p in PROMPTS]
            texts[sampling] = asyncio.run(main())
        finally:
            engine.terminate()
    assert texts["device"] == texts["host"]


def test_unknown_sampling_path_is_refused(tiny):
    with pytest.raises(ModelLoadError) as e:
        AsyncMLCEngine(str(tiny[0]), "cpu", model_lib=str(tiny[1]), sampling="gpu")
    assert e.value.param == "sampling"
