"""EAGLE speculative decoding on CUDA (float16 hidden states between the target and the head,
mlc's CUDA kernels in `get_logits` and the head's layers): greedy output identical to the plain
engine on the same GPU, and an exact head (for a context-free target) with its drafts accepted.

Assets: `python tests/gpu/eagle_assets.py $MLC_GPU_ASSETS` on a machine with the full TVM and
nvcc; the tests skip when they are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlc.runtime.engine import MLCEngine

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b\n",
           "Numbers: 0 1 2 3 4 5", "Hello"]


def _assets(prefix: str, quant: str) -> tuple[Path, Path, Path, Path]:
    root = Path(os.environ.get("MLC_GPU_ASSETS", "/nonexistent"))
    target, head = root / f"{prefix}-target-{quant}", root / f"{prefix}-head-{quant}"
    if not (head / "mlc-chat-config.json").is_file():
        pytest.skip(f"no {head.name} among the GPU assets (tests/gpu/eagle_assets.py)")
    return target, root / f"{target.name}-cuda.so", head, root / f"{head.name}-cuda.so"


def _greedy(engine: MLCEngine, prompts: list[str], n: int = 40) -> list[str]:
    streams = [engine.completions.create(prompt=p, temperature=0, max_tokens=n,
                                         ignore_eos=True, stream=True) for p in prompts]
    texts = []
    for s in streams:
        texts.append("".join(c.choices[0].text for c in s if c.choices))
    return texts


def _pair(prefix: str, quant: str, **kwargs):
    target, lib, head, head_lib = _assets(prefix, quant)
    plain = MLCEngine(str(target), "cuda", model_lib=str(lib))
    eagle = MLCEngine(str(target), "cuda", model_lib=str(lib), speculative_mode="eagle",
                      additional_models=[(str(head), str(head_lib))], **kwargs)
    return plain, eagle


@pytest.mark.parametrize("quant", ["q4f16_1", "q0f16"])
def test_eagle_greedy_output_is_the_plain_engines_on_cuda(quant):
    plain, eagle = _pair("eagle", quant, spec_draft_length=4)
    try:
        assert _greedy(eagle, PROMPTS) == _greedy(plain, PROMPTS)
        assert eagle.stats().draft_tokens > 0
        assert eagle.memory_plan.draft is not None
    finally:
        eagle.terminate()
        plain.terminate()


def test_an_exact_head_is_accepted_on_cuda():
    plain, eagle = _pair("eagle-exact", "q0f16", spec_draft_length=4)
    try:
        assert _greedy(eagle, PROMPTS[:2]) == _greedy(plain, PROMPTS[:2])
        # float16 logits may break a near tie between the head's ranking and the target's
        assert eagle.stats().acceptance_rate > 0.9
    finally:
        eagle.terminate()
        plain.terminate()
