"""Phi-2, Qwen2/2.5, Qwen3 and Gemma 3 (text): tiny random checkpoints written by transformers,
converted and compiled for the CPU, against transformers (CPU, float32) on the same weights.

Per architecture: prefill in chunks and greedy decode (past the sliding window where there is
one), ragged batches, greedy agreement after a q4f16_1 round trip, GGUF input (Qwen2, Qwen3,
Gemma 3) from files written here with the `gguf` package, and the config errors. Then the
seed's example: a tiny Phi-2 converted into models/phi-2, compiled into models/phi-2/lib.so
and run with `MLCEngine(model, model_lib=model_lib)` unchanged.

Tolerance: |mlc - transformers|max / (logit range) < 1e-5 in float32.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    CHATML_TEMPLATE,
    build_lib,
    dequantized_hf_model,
    hf_greedy,
    hf_logits,
    load_model,
    make_tiny,
    max_rel_diff,
    write_mlc_dir,
)

from mlc.errors import ConvertError

F32_TOL = 1e-5          # float32 library vs transformers float32, relative to the logit range
F16_TOL = 5e-3          # q4f16_1 (float16 activations) vs its dequantized float32 reference

# name -> (arch, quantization, HF config overrides)
SPECS = {
    "phi": ("phi", "q0f32", {}),
    "qwen2": ("qwen2", "q0f32", {}),
    # tied embeddings, and Qwen2's sliding window on the layers from max_window_layers on:
    # one plain and one sliding layer, RoPE still applied by the KV cache
    "qwen2_sliding": ("qwen2", "q0f32", dict(tie_word_embeddings=True, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=1)),
    "qwen3": ("qwen3", "q0f32", {}),
    "gemma3": ("gemma3", "q0f32", {}),                     # window 8: below a page
    # a window above a page, and the global layers' RoPE with "linear" scaling
    "gemma3_w24": ("gemma3", "q0f32", dict(sliding_window=24, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "phi_q4": ("phi", "q4f16_1", {}),
    "qwen2_q4": ("qwen2", "q4f16_1", {}),
    "qwen3_q4": ("qwen3", "q4f16_1", {}),
    "gemma3_q4": ("gemma3", "q4f16_1", {}),
}
F32_NAMES = ["phi", "qwen2", "qwen2_sliding", "qwen3", "gemma3", "gemma3_w24"]


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.RandomState(seed).randint(3, 300, size=n)]


class Built:
    """One tiny model: the HF reference, its MLC dir and (built on first use) its library."""

    def __init__(self, hf, hf_dir, mlc_dir):
        self.hf, self.hf_dir, self.mlc_dir = hf, hf_dir, mlc_dir

    @functools.cached_property
    def lib(self):
        return build_lib(self.mlc_dir)

    def load(self, **kv):
        return load_model(self.mlc_dir, self.lib, **kv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A factory of built tiny models, each made once per module: tiny(name)."""
    made: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in made:
            arch, quantization, overrides = SPECS[name]
            root = tmp_path_factory.mktemp(name)
            hf, hf_dir = make_tiny(root, arch, **overrides)
            mlc_dir = write_mlc_dir(hf, root / "mlc", quantization, hf_dir=hf_dir,
                                    prefill_chunk_size=64, max_batch_size=8)
            made[name] = Built(hf, hf_dir, mlc_dir)
        return made[name]

    return get


def _run(model, seq_id: int, prompt: list[int], chunk: int, steps: int):
    """Prefill `prompt` in chunks, then greedy decode: (logits of the last prompt position
    and of every step [steps + 1, v], generated tokens)."""
    model.add_sequence(seq_id)
    for start in range(0, len(prompt), chunk):
        last = model.prefill([seq_id], [prompt[start:start + chunk]])[0]
        assert np.isfinite(last).all(), f"non-finite logits after the chunk at {start}"
    logits, tokens = [last], []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.decode([seq_id], [tokens[-1]])[0])
    return np.stack(logits), tokens


# ------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", F32_NAMES)
def test_prefill_chunks_and_decode_match_transformers(tiny, name):
    """One prompt whole, then a longer one in chunks; greedy decode. With a sliding window:
    the prompt is five windows long and decode goes two windows past it."""
    b = tiny(name)
    model = b.load()
    window = model.metadata["sliding_window_size"]
    chunk = model.metadata["prefill_chunk_size"]
    if window > 0:
        assert chunk < window               # see ModelConfig: a chunk stays below the window
    # a short prompt, in as few chunks as the library allows
    ours, tokens = _run(model, 0, _prompt(12), chunk, 16)
    ref = hf_logits(b.hf, _prompt(12) + tokens)[11:]
    assert max_rel_diff(ours, ref) < F32_TOL
    assert tokens == hf_greedy(b.hf, _prompt(12), 16)
    # a long prompt in chunks (7 tokens: not a page, not a window)
    prompt = _prompt(5 * window - 3 if window > 0 else 45, seed=1)
    steps = 2 * window if window > 0 else 12
    ours, tokens = _run(model, 1, prompt, min(7, chunk), steps)
    ref = hf_logits(b.hf, prompt + tokens)[len(prompt) - 1:]
    assert max_rel_diff(ours, ref) < F32_TOL
    if window > 0:                          # the window matters: without it, other logits
        no_window = copy.deepcopy(b.hf)
        no_window.config.sliding_window = 10_000
        full = hf_logits(no_window, prompt + tokens)[len(prompt) - 1:]
        assert max_rel_diff(full, ref) > 100 * F32_TOL


@pytest.mark.parametrize("name", ["phi", "qwen2_sliding", "qwen3", "gemma3"])
def test_ragged_batches_match_transformers(tiny, name):
    """Three sequences prefilled together in rounds (ragged chunks of a few tokens each, the
    sequences finishing in different rounds), then decoded together: each matches
    transformers (Gemma 3 rotates q/k itself from the cache's query positions, Phi rotates
    a part of each head)."""
    b = tiny(name)
    prompts = [_prompt(5, 1), _prompt(11, 2), _prompt(13, 3)]
    steps = 6
    model = b.load()
    per = max(1, min(model.metadata["prefill_chunk_size"], 18) // 3)  # tokens per sequence
    for i in range(3):
        model.add_sequence(i)
    done, last = [0, 0, 0], [None, None, None]
    while min(d - len(p) for d, p in zip(done, prompts)) < 0:
        ids = [i for i in range(3) if done[i] < len(prompts[i])]
        rows = model.prefill(ids, [prompts[i][done[i]:done[i] + per] for i in ids])
        for i, row in zip(ids, rows):
            done[i] = min(done[i] + per, len(prompts[i]))
            last[i] = row
    logits, tokens = [np.stack(last)], [[], [], []]
    for _ in range(steps):
        nxt = [int(row.argmax()) for row in logits[-1]]
        for seq, t in zip(tokens, nxt):
            seq.append(t)
        logits.append(model.decode([0, 1, 2], nxt))
    batched = np.stack(logits, axis=1)                       # [3, steps + 1, v]
    for i, prompt in enumerate(prompts):
        ref = hf_logits(b.hf, prompt + tokens[i])[len(prompt) - 1:]
        assert max_rel_diff(batched[i], ref) < F32_TOL, i
        assert tokens[i] == hf_greedy(b.hf, prompt, steps), i


def _clear_greedy_prompt(ref_model, steps: int, min_margin: float, length: int = 12) -> list[int]:
    """A prompt whose greedy continuation never has a near tie between the top two logits,
    so float16 rounding cannot flip a token."""
    for seed in range(100):
        prompt = _prompt(length, seed)
        tokens = hf_greedy(ref_model, prompt, steps)
        top2 = np.sort(hf_logits(ref_model, prompt + tokens)[length - 1:], axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > min_margin:
            return prompt
    raise AssertionError("no prompt without near ties")


@pytest.mark.parametrize("name", ["phi_q4", "qwen2_q4", "qwen3_q4", "gemma3_q4"])
def test_q4f16_1_greedy_agrees(tiny, name):
    """After a q4f16_1 round trip the library decodes what transformers decodes on the
    dequantized weights; 4 bits are really in use (the original weights give other logits)."""
    b = tiny(name)
    ref_model = dequantized_hf_model(b.hf, b.mlc_dir)
    steps = 12
    prompt = _clear_greedy_prompt(ref_model, steps, min_margin=0.1)
    model = b.load()
    ours, tokens = _run(model, 0, prompt, model.metadata["prefill_chunk_size"], steps)
    assert tokens == hf_greedy(ref_model, prompt, steps)
    ref = hf_logits(ref_model, prompt + tokens)[len(prompt) - 1:]
    assert max_rel_diff(ours, ref) < F16_TOL
    assert max_rel_diff(hf_logits(b.hf, prompt + tokens)[len(prompt) - 1:], ref) > 0.02


# ------------------------------------------------------------------------------------ GGUF


def write_gguf(path: Path, hf_model, hf_dir: Path, arch: str) -> dict[str, np.ndarray]:
    """`hf_model` as llama.cpp's converter writes it for `arch` (qwen2, qwen3, gemma3): its
    tensor names, Gemma's norms stored as 1 + w, the embedding in Q8_0 and one weight in F16,
    the rest F32, a byte-level BPE vocabulary. Returns the tensors a reader must give back
    (by HF name)."""
    import gguf

    from mlc.models.registry import model_for_gguf

    cfg = hf_model.config
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    vocab = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    vocab += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(vocab))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3 if i in specials else 1 for i in range(len(vocab))])
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHATML_TEMPLATE)
    info = model_for_gguf(arch)
    names = {v: k for k, v in info.gguf_names(info.config_from_hf(cfg.to_dict())).items()}
    expect = {}
    for hf_name, value in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gname = f"{names[base]}.{suffix}"
        value = value.float().numpy()
        expect[hf_name] = value
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            value = value + 1                 # llama.cpp's Gemma convention
        if gname == "token_embd.weight":
            qt = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(value, qt)
            expect[hf_name] = gguf.quants.dequantize(data, qt)
            w.add_tensor(gname, data, raw_dtype=qt)
        elif gname == "blk.0.ffn_down.weight":
            w.add_tensor(gname, value.astype(np.float16))
            expect[hf_name] = value.astype(np.float16).astype(np.float32)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


# arch -> HF config overrides. What a GGUF file leaves out (or transformers does not read from
# it), the tiny model takes as transformers assumes it: Qwen3's head_dim 128; for Gemma 3 no
# logit soft-capping, one global layer in six (6 layers here), query_pre_attn_scalar =
# head_dim = 256.
GGUF_ARCHS = {"qwen2": {}, "qwen3": dict(head_dim=128),
              "gemma3": dict(final_logit_softcapping=None, num_hidden_layers=6,
                             layer_types=None, head_dim=256, query_pre_attn_scalar=256)}


@pytest.mark.parametrize("arch", list(GGUF_ARCHS))
def test_gguf_input_matches_transformers(tmp_path, arch):
    """A GGUF file of the tiny model converts to the weights transformers reads from that file
    (and to the HF model's own, Q8_0/F16 rounding aside), with the same config; the library
    built from it matches transformers reading the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlc.compiler.convert import convert
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig
    from mlc.support.tensor_cache import TensorCache

    hf, hf_dir = make_tiny(tmp_path, arch, **GGUF_ARCHS[arch])
    path = tmp_path / f"tiny-{arch}.gguf"
    expect = write_gguf(path, hf, hf_dir, arch)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32).eval()
    ref.config._attn_implementation = "eager"
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    for name, value in expect.items():   # the file follows llama.cpp's conventions
        np.testing.assert_allclose(ref_sd[name], value, rtol=0, atol=1e-6, err_msg=name)

    out = convert(str(path), "q0f32", tmp_path / "mlc", quiet=True)
    chat = ChatConfig.load(out)
    info = get_model(chat.model_type)
    config = info.config_from_dict(chat.model_config)
    want = info.config_from_hf(hf.config.to_dict(), prefill_chunk_size=config.prefill_chunk_size)
    for key in ("num_hidden_layers", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "tie_word_embeddings", "sliding_window_size", "layer_types",
                "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
        assert getattr(config, key, None) == getattr(want, key, None), key
    cache = TensorCache(out)
    for pm in info.param_mapping(config):
        got = cache.get(pm.mlc_name)
        arrays = [ref_sd[n] for n in pm.source_names]
        np.testing.assert_allclose(got, pm.combine(arrays) if pm.combine else arrays[0],
                                   rtol=0, atol=1e-6, err_msg=pm.mlc_name)
    assert chat.chat_template == CHATML_TEMPLATE and chat.eos_token_id == [2]

    model = load_model(out, build_lib(out))
    prompt = _prompt(20)
    ours, tokens = _run(model, 0, prompt, 7, 10)
    assert max_rel_diff(ours, hf_logits(ref, prompt + tokens)[len(prompt) - 1:]) < F32_TOL


def test_gemma3_gguf_norms_and_qwen_q_rows_are_not_permuted(tmp_path):
    """Llama's q/k un-permutation belongs to Llama: a Qwen2 GGUF's q rows come back as
    written; Gemma's norms come back as HF's w (llama.cpp stores 1 + w)."""
    from mlc.compiler.sources.gguf_file import GGUFSource

    for arch in ("qwen2", "gemma3"):
        hf, hf_dir = make_tiny(tmp_path / arch, arch, **GGUF_ARCHS[arch])
        path = tmp_path / f"{arch}.gguf"
        write_gguf(path, hf, hf_dir, arch)
        sd = {k: v.numpy() for k, v in hf.state_dict().items()}
        with GGUFSource(path) as src:
            for name in ("model.layers.0.self_attn.q_proj.weight",
                         "model.layers.1.self_attn.k_proj.weight"):
                np.testing.assert_array_equal(src.get(name), sd[name], err_msg=name)
            norm = "model.layers.0.input_layernorm.weight"      # (1 + w) - 1 in float32
            np.testing.assert_allclose(src.get(norm), sd[norm], rtol=0, atol=3e-7)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("model_type", ["phi", "qwen2", "qwen3", "gemma3_text"])
def test_config_names_the_missing_fields(model_type):
    from mlc.models.registry import get_model

    hf = {"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=r"intermediate_size.*num_hidden_layers.*vocab_size"):
        get_model(model_type).config_from_hf(hf)


def test_config_refusals_and_aliases():
    from mlc.models import gemma3, phi, qwen2
    from mlc.models.registry import get_model

    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_hidden_layers=6, vocab_size=320)
    with pytest.raises(ConvertError, match="attn_logit_softcapping"):
        gemma3.Config.from_hf({**base, "attn_logit_softcapping": 50.0})
    with pytest.raises(ConvertError, match="multimodal"):
        gemma3.Config.from_hf({"model_type": "gemma3", "text_config": base})
    with pytest.raises(ConvertError, match="multimodal Gemma 3.*gemma3_text"):
        get_model("gemma3")
    with pytest.raises(ConvertError, match="qk_layernorm"):
        phi.Config.from_hf({**base, "qk_layernorm": True})
    with pytest.raises(ConvertError, match="hidden_act"):
        phi.Config.from_hf({**base, "hidden_act": "relu"})
    # transformers 4 Gemma 3 configs: rope_theta / rope_local_base_freq / rope_scaling and a
    # sliding_window_pattern (one global layer in six)
    old = gemma3.Config.from_hf({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                 "sliding_window": 512, "sliding_window_pattern": 6})
    assert old.attention_kinds() == ["mha_sliding"] * 5 + ["mha"]
    assert (old.rope_theta, old.rope_local_theta, old.rope_scaling_factor) == (1e6, 1e4, 8.0)
    assert old.prefill_chunk_size == 511                 # below the window
    # released Qwen2.5 configs carry sliding_window with use_sliding_window false: no window
    q = qwen2.Config.from_hf({**base, "sliding_window": 131072, "use_sliding_window": False})
    assert q.sliding_window_size == -1 and q.attention_kinds() == ["mha"] * 6
    # Phi: partial_rotary_factor at the top level (older configs) or in rope_parameters
    assert phi.Config.from_hf({**base, "partial_rotary_factor": 0.4}).rotary_dim == 6
    assert phi.Config.from_hf({**base, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}}).rotary_dim == 4


# ----------------------------------------------------------------------- the seed's example


SEED_EXAMPLE = '''
from mlc_llm import MLCEngine

# Create engine
model = "models/phi-2"
model_lib = "models/phi-2/lib.so"
engine = MLCEngine(model, model_lib=model_lib)

# Run chat completion in OpenAI API.
for response in engine.chat.completions.create(
    messages=[{"role": "user", "content": "What is the meaning of life?"}],
    model=model,
    stream=True,
):
    for choice in response.choices:
        print(choice.delta.content, end="", flush=True)
print("\\n")

engine.terminate()
'''


def test_seed_example_phi2(tmp_path, monkeypatch, capsys):
    """MLC-LLM's "Deploy Your Own Model" with Phi-2, tiny and random: `mlc convert` into
    models/phi-2, `mlc compile` into models/phi-2/lib.so, then the seed's code unchanged.
    Greedy requests to the same engine decode what transformers decodes."""
    from click.testing import CliRunner

    from mlc.cli.main import cli

    hf, hf_dir = make_tiny(tmp_path, "phi")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(hf_dir), "--quantization", "q4f16_1",
                                 "-o", "models/phi-2", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["compile", "models/phi-2", "--device", "cpu",
                                 "-o", "models/phi-2/lib.so"])
    assert result.exit_code == 0, result.output
    assert Path("models/phi-2/lib.so").is_file()

    exec(compile(SEED_EXAMPLE, "seed_example.py", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.endswith("\n\n") and len(printed) > 2     # streamed text, then "\n"

    from mlc_llm import MLCEngine

    ref_model = dequantized_hf_model(hf, Path("models/phi-2"))
    with MLCEngine("models/phi-2", model_lib="models/phi-2/lib.so") as engine:
        prompt = _clear_greedy_prompt(ref_model, 8, min_margin=0.1)
        out = engine.completions.create(prompt=prompt, max_tokens=8, temperature=0)
        made = out.usage.completion_tokens
        ref = hf_greedy(ref_model, prompt, 8)
        assert made == 8 or out.choices[0].finish_reason == "stop"
        assert out.choices[0].text == engine.tokenizer.decode(ref[:made])


def test_presets_resolve_to_their_architecture():
    """`mlc bench --model-config NAME --dummy` presets: each resolves through its own file."""
    from mlc.models.presets import PRESETS
    from mlc.models.registry import get_model

    for name, hf in PRESETS.items():
        config = get_model(hf["model_type"]).config_from_hf(hf)
        assert config.vocab_size == hf["vocab_size"], name
    assert get_model("gemma3_text").config_from_hf(PRESETS["gemma3-1b"]).attention_kinds() \
        == (["mha_sliding"] * 5 + ["mha"]) * 4 + ["mha_sliding"] * 2
