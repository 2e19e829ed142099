"""SmolLM2 on CUDA: the same greedy tokens as the CPU library, batching and abort."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlc.runtime.model import KVCacheConfig, LoadedModel
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache, TensorCacheWriter

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain what a neural network is.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
]
STEPS = 32


def make_q0f16_dir(q4_dir: Path, q0_config: Path, out: Path) -> Path:
    """A q0f16 dir whose fp16 weights are the q4f16_1 weights dequantized: the 270 MB q0f16
    conversion cannot travel to the GPU machine, the 72 MB q4f16_1 one can."""
    from mlc.compiler.quantization import dequantize_weight, get_quantization

    if (out / "tensor-cache.json").is_file():
        return out
    q = get_quantization("q4f16_1")
    cache = TensorCache(q4_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = TensorCacheWriter(tmp)
    for name in cache.names():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            base = name[: -len(".q_weight")]
            scale = cache.get(base + ".q_scale")
            w = dequantize_weight(cache.get(name), scale, q, scale.shape[1] * 32)
            writer.add(base + ".weight", w.astype("float16"))
        else:
            writer.add(name, cache.get(name))
    writer.finish()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (q4_dir / f).exists():
            shutil.copy(q4_dir / f, tmp / f)
    shutil.copy(q0_config, tmp / "mlc-chat-config.json")
    tmp.rename(out)
    return out


def greedy(model: LoadedModel, ids: list[int], steps: int = STEPS):
    """Greedy tokens and the logits each was chosen from."""
    model.add_sequence(0)
    logits = model.prefill([0], [ids])
    rows, out = [], []
    for _ in range(steps):
        rows.append(logits[0].copy())
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        logits = model.decode([0], [tok])
    model.remove_sequence(0)
    return out, rows


NEAR_TIE = 0.1  # logits: a fp16 rounding difference can flip a choice this close, not more


@pytest.fixture(scope="module")
def tokenizer(gpu_assets):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(gpu_assets / "smol-q4f16_1" / "tokenizer.json"))


@pytest.fixture(scope="module", params=["q4f16_1", "q0f16"])
def model_pair(request, gpu_assets, tmp_path_factory):
    quant = request.param
    model_dir = gpu_assets / "smol-q4f16_1"
    if quant == "q0f16":
        model_dir = make_q0f16_dir(model_dir, gpu_assets / "smol-q0f16" / "mlc-chat-config.json",
                                   tmp_path_factory.mktemp("q0f16") / "smol-q0f16")
    cfg = KVCacheConfig(8, 4096, 1024)
    gpu = LoadedModel(model_dir, gpu_assets / f"smol-{quant}-cuda.so", "cuda")
    cpu = LoadedModel(model_dir, gpu_assets / f"smol-{quant}-cpu.so", "cpu")
    gpu.create_kv_cache(cfg)
    cpu.create_kv_cache(cfg)
    return quant, gpu, cpu


def test_greedy_tokens_match_cpu(model_pair, tokenizer, gpu_assets):
    quant, gpu, cpu = model_pair
    report = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        g, g_rows = greedy(gpu, ids)
        c, c_rows = greedy(cpu, ids)
        diff = float(np.abs(g_rows[0] - c_rows[0]).max())
        rng = float(c_rows[0].max() - c_rows[0].min())
        # Equal tokens, except that the sequences may part at a near-tie of the CPU's own
        # logits (the two top candidates within NEAR_TIE), after which they are unrelated.
        split = next((i for i, (a, b) in enumerate(zip(g, c)) if a != b), None)
        margin = None if split is None else float(c_rows[split][c[split]] -
                                                  c_rows[split][g[split]])
        report.append({"prompt": prompt, "gpu": g, "cpu": c, "prefill_logit_max_abs_diff": diff,
                       "logit_range": rng, "split_at": split, "cpu_margin_at_split": margin,
                       "text": tokenizer.decode(g)})
        assert diff < 0.02 * rng, f"{quant}: prefill logits differ by {diff} (range {rng})"
        assert split is None or (split >= 4 and margin < NEAR_TIE), \
            f"{quant}: GPU {g} != CPU {c} at {split} (CPU margin {margin}) for {prompt!r}"
    out = Path(gpu_assets, f"gpu-vs-cpu-{quant}.json")
    out.write_text(json.dumps(report, indent=1))


def test_batch_decode_equals_single(model_pair, tokenizer):
    quant, gpu, _ = model_pair
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS[:3]]
    alone = [greedy(gpu, ids, 8)[0] for ids in prompts]
    seqs = [10, 11, 12]
    for s in seqs:
        gpu.add_sequence(s)
    logits = gpu.prefill(seqs, prompts)                  # ragged batch prefill
    outs = [[] for _ in seqs]
    for _ in range(8):
        toks = [int(np.argmax(row)) for row in logits]
        for o, t in zip(outs, toks):
            o.append(t)
        logits = gpu.decode(seqs, toks)
    for s in seqs:
        gpu.remove_sequence(s)
    assert outs == alone


def test_engine_batching_and_abort_on_gpu(gpu_assets):
    from mlc import MLCEngine

    engine = MLCEngine(str(gpu_assets / "smol-q4f16_1"), device="cuda",
                       model_lib=str(gpu_assets / "smol-q4f16_1-cuda.so"), mode="server",
                       max_total_sequence_length=16384, enable_tracing=True)
    try:
        free0 = engine.stats().kv_pages_free
        import threading

        results = {}

        def run(i):
            r = engine.chat.completions.create(
                messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                max_tokens=24, temperature=0)
            results[i] = r.choices[0].message.content

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 6 and all(results.values())
        batches = [e["args"]["batch_size"] for e in engine.tracer.events if e["ph"] == "C"]
        assert max(batches) > 1, "concurrent requests were not batched"
        stream = engine.chat.completions.create(
            messages=[{"role": "user", "content": "Tell me a long story."}], stream=True,
            max_tokens=200, request_id="to-abort")
        reasons = []
        for i, chunk in enumerate(stream):
            if i == 3:
                engine.abort("to-abort")
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        assert reasons == ["abort"]
        # finished requests' pages stay as prefix cache; stats() counts them as free
        assert engine.stats().kv_pages_free == free0
    finally:
        engine.terminate()


def hf_model_from_mlc(model_dir: Path):
    """transformers' LlamaForCausalLM (float32) holding the MLC dir's weights, q4 dequantized:
    the exact float32 reference of what the library computes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlc.compiler.quantization import dequantize_weight, get_quantization

    chat = ChatConfig.load(model_dir)
    c = chat.model_config
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        num_hidden_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"],
        rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"], head_dim=c["head_dim"],
        tie_word_embeddings=c["tie_word_embeddings"], max_position_embeddings=4096))
    cache, q = TensorCache(model_dir), get_quantization("q4f16_1")

    def weight(base: str) -> np.ndarray:
        if base + ".weight" in cache:
            return cache.get(base + ".weight").astype("float32")
        scale = cache.get(base + ".q_scale")
        return dequantize_weight(cache.get(base + ".q_weight"), scale, q,
                                 scale.shape[1] * 32).astype("float32")

    d, hq, hkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    sd = {"model.embed_tokens.weight": weight("model.embed_tokens"),
          "model.norm.weight": weight("model.norm")}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        qkv = weight(f"{p}.self_attn.qkv_proj")
        sd[f"{p}.self_attn.q_proj.weight"] = qkv[: hq * d]
        sd[f"{p}.self_attn.k_proj.weight"] = qkv[hq * d: (hq + hkv) * d]
        sd[f"{p}.self_attn.v_proj.weight"] = qkv[(hq + hkv) * d:]
        sd[f"{p}.self_attn.o_proj.weight"] = weight(f"{p}.self_attn.o_proj")
        gate, up = np.split(weight(f"{p}.mlp.gate_up_proj"), 2)
        sd[f"{p}.mlp.gate_proj.weight"], sd[f"{p}.mlp.up_proj.weight"] = gate, up
        sd[f"{p}.mlp.down_proj.weight"] = weight(f"{p}.mlp.down_proj")
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{n}.weight"] = weight(f"{p}.{n}")
    if not c["tie_word_embeddings"]:
        sd["lm_head.weight"] = weight("lm_head")
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                       strict=False)
    return hf.eval()


PREFILL_TOLERANCE = 0.01   # max |mlc - transformers fp32| / logit range, float16 on the GPU


def test_prefill_logits_match_transformers_fp32(model_pair, tokenizer, gpu_assets):
    import torch

    quant, gpu, _ = model_pair
    hf = hf_model_from_mlc(gpu.model_dir)
    report = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        gpu.add_sequence(0)
        ours = gpu.prefill([0], [ids])[0]
        gpu.remove_sequence(0)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
        rel = float(np.abs(ours - ref).max() / (ref.max() - ref.min()))
        report.append({"prompt": prompt, "max_abs_diff_over_range": rel,
                       "argmax_equal": int(ours.argmax()) == int(ref.argmax())})
        assert rel < PREFILL_TOLERANCE, f"{quant}: {rel}"
    Path(gpu_assets, f"gpu-vs-transformers-{quant}.json").write_text(json.dumps(report, indent=1))


@pytest.mark.parametrize("quant", ["q4f16_1", "q0f16"])
def test_tiny_random_model_prefill_matches_transformers_fp32(gpu_assets, quant):
    """A tiny random Llama (untied, GQA) on CUDA against transformers float32 on its weights."""
    import torch

    model_dir = gpu_assets / f"tiny-{quant}"
    if not model_dir.is_dir():
        pytest.skip("no tiny model among the GPU assets")
    model = LoadedModel(model_dir, gpu_assets / f"tiny-{quant}-cuda.so", "cuda")
    model.create_kv_cache(KVCacheConfig(4, 512, 128))
    hf = hf_model_from_mlc(model_dir)
    rng = np.random.default_rng(1)
    report = []
    for n in (3, 17, 100):
        ids = rng.integers(0, model.vocab_size, n).tolist()
        model.add_sequence(0)
        ours = model.prefill([0], [ids])[0]
        model.remove_sequence(0)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
        rel = float(np.abs(ours - ref).max() / (ref.max() - ref.min()))
        report.append({"prompt_tokens": n, "max_abs_diff_over_range": rel})
        assert rel < PREFILL_TOLERANCE, f"tiny {quant}, {n} tokens: {rel}"
    Path(gpu_assets, f"tiny-gpu-vs-transformers-{quant}.json").write_text(
        json.dumps(report, indent=1))


def test_cuda_library_loads_its_precompiled_cubin(gpu_assets):
    """A library built with nvcc carries the cubin of TVM's kernels: loading it compiles no
    CUDA source (NVRTC took seconds per load before), in a fresh process."""
    import subprocess
    import sys

    code = (
        "import json, time; t0 = time.perf_counter()\n"
        "from mlc.benchmark.model_bench import load_and_warm_up\n"
        f"m, load = load_and_warm_up({str(gpu_assets / 'smol-q4f16_1')!r}, "
        f"{str(gpu_assets / 'smol-q4f16_1-cuda.so')!r}, 'cuda')\n"
        "from mlc.runtime.device import CUDA_LOAD_STATS\n"
        "print(json.dumps({**load, **CUDA_LOAD_STATS, 'total': time.perf_counter() - t0}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(stats)
    assert stats["precompiled"] >= 1 and stats["compiled"] == 0, stats
    assert stats["cuda_kernels_precompiled"] is True and stats["cuda_compile_seconds"] == 0
