"""The new architectures on CUDA: tiny random Gemma 3 (sliding and global layers with their own
RoPE thetas, q/k rotated by the model from the cache's positions, a float32 residual stream,
head_dim 256) and Qwen2 (q/k/v bias, mlc's attention kernels), q4f16_1 and q0f16, against
transformers float32 on the weights the library reads.

Assets: `python tests/gpu/arch_assets.py $MLC_GPU_ASSETS` on a machine with the full TVM and
nvcc (see that file); the tests skip when they are missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mlc.runtime.model import KVCacheConfig, LoadedModel

# max |mlc - transformers fp32| / logit range with float16 activations. The same MLC dirs
# built for the CPU reach 0.012 (gemma3 q4f16_1, 100 tokens + 40 steps; qwen2: 0.005): these
# random weights give large scores, head_dim 256 sums 256 float16 products.
TOLERANCE = 0.03
CASES = [(name, quant) for name in ("gemma3", "qwen2") for quant in ("q4f16_1", "q0f16")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    import torch
    from transformers import AutoModelForCausalLM

    name, quant = request.param
    root = Path(os.environ.get("MLC_GPU_ASSETS", "/nonexistent"))
    base = root / f"arch-{name}-{quant}"
    if not (base / "mlc-chat-config.json").is_file():
        pytest.skip(f"no {base.name} among the GPU assets (tests/gpu/arch_assets.py)")
    model = LoadedModel(base, root / f"{base.name}-cuda.so", "cuda")
    model.create_kv_cache(KVCacheConfig(4, 1024, model.metadata["prefill_chunk_size"]))
    hf = AutoModelForCausalLM.from_pretrained(root / f"{base.name}-hf", dtype=torch.float32)
    hf.config._attn_implementation = "eager"
    return name, quant, model, hf.eval(), root


def _hf_logits(hf, ids):
    import torch

    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / (ref.max() - ref.min()))


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


def test_chunked_prefill_and_decode_past_the_window(case):
    """Prompts longer than the window and the prefill chunk, then 40 greedy steps: every step's
    logits against transformers."""
    name, quant, model, hf, root = case
    chunk = model.metadata["prefill_chunk_size"]
    window = model.metadata["sliding_window_size"]
    if window > 0:
        assert chunk < window
    report = []
    for n in (5, 100, 300):
        ids = _prompt(n, n)
        model.add_sequence(0)
        for start in range(0, n, chunk):
            last = model.prefill([0], [ids[start:start + chunk]])[0]
        logits, tokens = [last], []
        for _ in range(40):
            tokens.append(int(logits[-1].argmax()))
            logits.append(model.decode([0], [tokens[-1]])[0])
        model.remove_sequence(0)
        ours = np.stack(logits)
        assert np.isfinite(ours).all()
        rel = _rel(ours, _hf_logits(hf, ids + tokens)[n - 1:])
        report.append({"prompt_tokens": n, "max_abs_diff_over_range": rel})
        assert rel < TOLERANCE, f"{name} {quant}, {n} tokens: {rel}"
    Path(root, f"arch-{name}-{quant}-gpu-vs-transformers.json").write_text(
        json.dumps(report, indent=1))


def test_ragged_batch_and_batch_decode(case):
    """Three sequences prefilled together and decoded together (batched CUDA graphs)."""
    name, quant, model, hf, _ = case
    prompts = [_prompt(7, 1), _prompt(30, 2), _prompt(50, 3)]
    per = model.metadata["prefill_chunk_size"] // 3     # tokens per sequence and round
    for i in range(3):
        model.add_sequence(i)
    done, last = [0, 0, 0], [None, None, None]
    while any(d < len(p) for d, p in zip(done, prompts)):   # ragged rounds
        ids = [i for i in range(3) if done[i] < len(prompts[i])]
        rows = model.prefill(ids, [prompts[i][done[i]:done[i] + per] for i in ids])
        for i, row in zip(ids, rows):
            done[i], last[i] = min(done[i] + per, len(prompts[i])), row
    logits, tokens = [np.stack(last)], [[], [], []]
    for _ in range(30):
        nxt = [int(row.argmax()) for row in logits[-1]]
        for seq, t in zip(tokens, nxt):
            seq.append(t)
        logits.append(model.decode([0, 1, 2], nxt))
    for i in range(3):
        model.remove_sequence(i)
    batched = np.stack(logits, axis=1)
    for i, p in enumerate(prompts):
        rel = _rel(batched[i], _hf_logits(hf, p + tokens[i])[len(p) - 1:])
        assert rel < TOLERANCE, f"{name} {quant}, sequence {i}: {rel}"


def test_hidden_states_for_embeddings(case):
    """`batch_prefill_hidden_states` (embeddings) on CUDA: two sequences, the longer one in
    chunks, against transformers' last hidden states; pooled vectors nearly parallel."""
    name, quant, model, hf, _ = case
    if not model.has_hidden_states:
        pytest.skip("the assets' libraries predate batch_prefill_hidden_states (lib-5): "
                    "rebuild them with tests/gpu/arch_assets.py")
    import torch

    chunk = model.metadata["prefill_chunk_size"]
    a, b = _prompt(chunk + 37, 4), _prompt(max(1, chunk // 3), 5)
    head = chunk - len(b)                       # a's first piece shares a call with b
    model.add_sequence(0)
    model.add_sequence(1)
    first = model.prefill_hidden_states([0, 1], [a[:head], b])
    rest = [model.prefill_hidden_states([0], [a[i:i + chunk]])
            for i in range(head, len(a), chunk)]
    model.remove_sequence(0)
    model.remove_sequence(1)
    ours = {"a": np.concatenate([first[:head], *rest]), "b": first[head:]}
    for key, ids in (("a", a), ("b", b)):
        with torch.no_grad():
            ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        ref = ref.numpy()
        assert np.isfinite(ours[key]).all()
        rel = _rel(ours[key], ref)
        assert rel < TOLERANCE, f"{name} {quant}, sequence {key}: {rel}"
        for pooled, want in ((ours[key][-1], ref[-1]), (ours[key].mean(0), ref.mean(0))):
            cos = float(pooled @ want / np.linalg.norm(pooled) / np.linalg.norm(want))
            assert cos > 0.999, f"{name} {quant}, sequence {key}: cosine {cos}"
