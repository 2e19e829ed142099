"""Sampling on the GPU (the library's softmax / top-p-top-k / argmax / logit-bias kernels):
the same checks as tests/test_device_sampling.py on the CPU library, then the engine, which
samples on the device for CUDA libraries, with seeds alone and batched."""

from __future__ import annotations

import asyncio

import pytest
import sampling_checks as checks

from mlc.runtime.model import KVCacheConfig, LoadedModel

PROMPTS = ["Count to five.", "Name a color.", "Write a haiku about rain.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def model(gpu_assets):
    m = LoadedModel(gpu_assets / "smol-q4f16_1", gpu_assets / "smol-q4f16_1-cuda.so", "cuda")
    m.create_kv_cache(KVCacheConfig(64, 4096, 1024))
    return m


def test_gpu_library_has_the_sampling_functions(model):
    from mlc.runtime.model import SAMPLING_FUNCTIONS

    assert all(f in model.sampling for f in SAMPLING_FUNCTIONS)


def test_gpu_greedy_bias_masks_and_logprobs(model):
    checks.check_greedy_bias_masks_and_logprobs(model)


def test_gpu_distribution_and_top_p(model):
    checks.check_distribution_and_top_p(model)


def test_gpu_seeded_rows_do_not_depend_on_the_batch(model):
    checks.check_seeded_rows_do_not_depend_on_the_batch(model)


@pytest.fixture(scope="module")
def engine(gpu_assets):
    from mlc import AsyncMLCEngine

    # No prefix cache here: a repeated prompt would run its last token through the one-row
    # GEMV instead of the prefill kernels, whose fp16 rounding differs, and a seeded draw near
    # a CDF boundary could split (H200, 2026-12-02: it did). Reproducibility is checked for
    # the same kernels; the cache's own correctness is tests/test_prefix_cache.py's.
    eng = AsyncMLCEngine(str(gpu_assets / "smol-q4f16_1"), device="cuda",
                         model_lib=str(gpu_assets / "smol-q4f16_1-cuda.so"), mode="server",
                         max_total_sequence_length=16384, prefix_cache_mode="disable")
    yield eng
    eng.terminate()


def run(engine, seeds, together: bool, **extra) -> list[str]:
    def args(prompt, seed):
        return dict(messages=[{"role": "user", "content": prompt}], temperature=0.8,
                    top_p=0.95, seed=seed, max_tokens=24, ignore_eos=True, **extra)

    async def main():
        if together:
            rs = await asyncio.gather(*[engine.chat.completions.create(**args(p, s))
                                        for p, s in zip(PROMPTS, seeds)])
        else:
            rs = [await engine.chat.completions.create(**args(p, s))
                  for p, s in zip(PROMPTS, seeds)]
        return [r.choices[0].message.content for r in rs]

    return asyncio.run(main())


def test_gpu_engine_samples_on_the_device_and_seeds_reproduce(engine):
    assert engine.sampling_path == "device"
    seeds = [11, 22, 33, 44]
    alone, alone_again = run(engine, seeds, False), run(engine, seeds, False)
    together, together_again = run(engine, seeds, True), run(engine, seeds, True)
    assert alone == alone_again and together == together_again      # exact, each way
    assert len(set(alone)) == len(alone)
    assert run(engine, [12, 22, 33, 44], False)[0] != alone[0]      # the seed matters


@pytest.mark.xfail(strict=False, reason=(
    "H200, 2026-12-02: 2 of 4 seeded outputs equal alone and batched (every one shares its "
    "first tokens). Batch 1 and batch 4 run different fp16 matmul kernels (the one-row GEMV "
    "vs the tensor-core kernel), so a draw near a CDF boundary splits. MLC_BATCH_INVARIANT=1 "
    "gives equality (the next test)"))
def test_gpu_seeded_outputs_alone_equal_batched(engine):
    """Each draw uses the same uniform number alone or batched: most outputs should match
    exactly and every one share its first tokens."""
    seeds = [11, 22, 33, 44]
    alone, together = run(engine, seeds, False), run(engine, seeds, True)
    same = sum(a == t for a, t in zip(alone, together))
    assert same >= 3, (alone, together)
    assert all(a[:8] == t[:8] for a, t in zip(alone, together)), (alone, together)


def test_gpu_engine_logit_bias_and_logprobs_on_the_device_path(engine):
    async def main():
        forced = [t async for out in await engine.generate(
            "Hello", max_tokens=4, temperature=0.9, seed=1, logit_bias={1000: 100},
            ignore_eos=True) for d in out.deltas for t in d.token_ids]
        lp = await engine.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
            logprobs=True, top_logprobs=3)
        return forced, lp

    forced, lp = asyncio.run(main())
    assert forced == [1000] * 4
    for e in lp.choices[0].logprobs.content:
        assert e.token == e.top_logprobs[0].token and e.logprob <= 0


BATCH_INVARIANT_SCRIPT = r'''
import asyncio, json, sys
import numpy as np
from mlc import AsyncMLCEngine
from mlc.runtime.model import KVCacheConfig, LoadedModel
assets = sys.argv[1]
PROMPTS = ["Count to five.", "Name a color.", "Write a haiku about rain.", "What is 2 + 2?"]
model = LoadedModel(f"{assets}/smol-q4f16_1", f"{assets}/smol-q4f16_1-cuda.so", "cuda")
model.create_kv_cache(KVCacheConfig(8, 4096, 1024))
rng = np.random.default_rng(0)
prompts = [rng.integers(0, model.vocab_size, size=n).tolist() for n in (13, 70, 210, 5)]
steps = rng.integers(0, model.vocab_size, size=(6, 4)).tolist()
rows = []
for ids in ([0], [0, 1, 2, 3]):
    for s in ids:
        model.add_sequence(s)
    out = [model.prefill(ids, [prompts[s] for s in ids])[0]]
    out += [model.decode(ids, [st[s] for s in ids])[0] for st in steps]
    for s in ids:
        model.remove_sequence(s)
    rows.append(out)
same_bits = all(np.array_equal(a, b) for a, b in zip(*rows))
cpu = LoadedModel(f"{assets}/smol-q4f16_1", f"{assets}/smol-q4f16_1-cpu.so", "cpu")
cpu.create_kv_cache(KVCacheConfig(1, 4096, 1024))
cpu.add_sequence(0)
ref = cpu.prefill([0], [prompts[0]])[0]
vs_cpu = float(np.abs(rows[0][0] - ref).max() / (ref.max() - ref.min()))
del model, cpu
eng = AsyncMLCEngine(f"{assets}/smol-q4f16_1", device="cuda",
                     model_lib=f"{assets}/smol-q4f16_1-cuda.so", mode="server",
                     max_total_sequence_length=16384, prefix_cache_mode="disable")
def req(p, s):
    return eng.chat.completions.create(messages=[{"role": "user", "content": p}],
        temperature=0.9, top_p=0.95, seed=s, max_tokens=24, ignore_eos=True)
async def run(together):
    if together:
        rs = await asyncio.gather(*[req(p, s) for p, s in zip(PROMPTS, [11, 22, 33, 44])])
    else:
        rs = [await req(p, s) for p, s in zip(PROMPTS, [11, 22, 33, 44])]
    return [r.choices[0].message.content for r in rs]
alone, together = asyncio.run(run(False)), asyncio.run(run(True))
eng.terminate()
print(json.dumps({"same_bits": same_bits, "vs_cpu": vs_cpu, "alone": alone,
                  "together": together}))
'''


def test_gpu_batch_invariant_mode_gives_seeded_outputs_alone_equal_batched(gpu_assets):
    """MLC_BATCH_INVARIANT=1 (read once per process, hence a child process): every logit row
    of a batched prefill and decode equals the one computed alone, bit for bit, and seeded
    requests sample the same text alone or batched."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLC_BATCH_INVARIANT": "1"}
    out = subprocess.run([sys.executable, "-c", BATCH_INVARIANT_SCRIPT, str(gpu_assets)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["same_bits"], res
    assert res["vs_cpu"] < 0.01, res          # the tensor-core path at one row is still right
    assert res["alone"] == res["together"], res
    assert len(set(res["alone"])) == len(res["alone"])
