"""Shared test utilities: tiny random HF models, MLC dirs written straight from them, and
device libraries built once and cached by content.

    hf_model, hf_dir = make_tiny_llama(tmp_path, tie_word_embeddings=True)
    mlc_dir = write_mlc_dir(hf_model, tmp_path / "mlc", "q4f16_1", hf_dir=hf_dir)
    lib = build_lib(mlc_dir)                       # cached under TEST_CACHE_DIR
    model = LoadedModel(mlc_dir, lib, device="cpu")

`write_mlc_dir` goes through the registry mapping, the quantizer and `TensorCacheWriter`
directly, so compile tests do not depend on `mlc convert`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE_DIR = Path(os.environ.get("MLC_TEST_CACHE", REPO / ".cache" / "tests"))

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")   # ids 0, 1, 2
EOS_TOKEN = "<|im_end|>"
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Machine learning compilers turn models into fast kernels.",
    "A paged KV cache stores keys and values in fixed-size pages.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024.",
]

# The tiny architecture of the compile/runtime tests (GQA: 4 query heads, 2 KV heads).
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False,
)


# ------------------------------------------------------------------------------ tokenizer


def write_tiny_tokenizer(directory: str | Path, vocab_size: int = 300) -> int:
    """A real byte-level BPE (trained on a few sentences) with ChatML specials; returns its
    vocabulary size. Writes tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE,
        "bos_token": None, "eos_token": EOS_TOKEN, "pad_token": "<|endoftext|>",
        "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": 2048, "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


# ------------------------------------------------------------------------------ HF models


# Tiny configs of the other architectures (2 layers, hidden 64): the features each is about,
# in miniature. Overrides go on top, as for TINY_LLAMA.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": TINY_LLAMA,
    "mistral": TINY_LLAMA,
    "qwen2": dict(TINY_LLAMA, rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen3": dict(TINY_LLAMA, rms_norm_eps=1e-6, rope_theta=10000.0, head_dim=32),
    "phi": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_hidden_layers=2, vocab_size=320, max_position_embeddings=256,
                layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.4,
                resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                tie_word_embeddings=False),
    "gemma3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=320,
                   max_position_embeddings=256, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   final_logit_softcapping=30.0),
}


def _hf_classes(arch: str):
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi": (transformers.PhiConfig, transformers.PhiForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]


def make_tiny(tmp_path: str | Path, arch: str = "llama", seed: int = 0, std: float = 0.2,
              **config_overrides: Any):
    """A random transformers model of `arch` (see TINY_ARCHS) saved with `save_pretrained`
    plus a tiny real tokenizer. Returns (hf_model in eval mode, hf_dir).

    Weights are normal(0, std), biases too; other 1-d weights (norms) normal(1, std), so
    logits are far from flat. `config_overrides` replace fields of the tiny config or add HF
    config fields (`sliding_window`, `rope_scaling`, `head_dim` ...).
    """
    import torch

    cls_config, cls_model = _hf_classes(arch)
    hf_dir = Path(tmp_path) / f"hf-{arch}-{seed}"
    n_tokens = write_tiny_tokenizer(hf_dir)
    fields = {**TINY_ARCHS[arch], **config_overrides}
    assert fields["vocab_size"] >= n_tokens, "the model vocabulary must cover the tokenizer"
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = cls_config(**fields, bos_token_id=None, eos_token_id=ids[EOS_TOKEN],
                        pad_token_id=ids["<|endoftext|>"])
    config._attn_implementation = "eager"   # the plainest reference (sliding windows too)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if p.ndim == 1 and not name.endswith(".bias") else 0.0
            p.normal_(mean, std)                               # norm weights around 1
        if config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(hf_dir)
    return model, hf_dir


def make_tiny_llama(tmp_path: str | Path, arch: str = "llama", seed: int = 0, std: float = 0.2,
                    **config_overrides: Any):
    """A random `LlamaForCausalLM` (arch="mistral": `MistralForCausalLM`); see `make_tiny`."""
    return make_tiny(tmp_path, arch, seed, std, **config_overrides)


def hf_state_dict(hf_model) -> dict[str, np.ndarray]:
    """The HF model's tensors as float32 numpy arrays (tied lm_head included once per name)."""
    return {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}


def hf_logits(hf_model, tokens: list[int]) -> np.ndarray:
    """transformers' float32 logits for every position of one sequence: [len, vocab]."""
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([list(tokens)])).logits[0].float().numpy()


def hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation (full recompute each step: no HF cache involved)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(hf_logits(hf_model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def dequantized_hf_model(hf_model, mlc_dir: str | Path, exact_float32: bool = False):
    """A copy of `hf_model` whose weights are read back (dequantized, as float32) from an MLC
    dir: the exact reference for a quantized library. A parameter stored transformed (Gemma's
    1 + w norms) keeps the HF value: it is unquantized, rounded to float16 at most.
    `exact_float32`: dequantize float16 groups in float32 ((q - 7) * scale not rounded to
    float16), as a CPU library of a q4f16_1 model computes."""
    import copy
    import dataclasses

    import torch

    from mlc.compiler.quantization import (
        dequantize_weight,
        get_quantization,
        quantized_param_names,
    )
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig
    from mlc.support.tensor_cache import TensorCache

    chat = ChatConfig.load(mlc_dir)
    q = get_quantization(chat.quantization)
    if exact_float32:
        q = dataclasses.replace(q, model_dtype="float32")
    info = get_model(chat.model_type)
    config = info.config_from_dict(chat.model_config)
    cache = TensorCache(mlc_dir)
    sd = hf_state_dict(hf_model)
    out = {}
    for m in info.param_mapping(config):
        if q.is_quantized and m.quantize:
            qw, qs = quantized_param_names(m.mlc_name)
            in_features = sd[m.source_names[0]].shape[-1]
            w = dequantize_weight(cache.get(qw), cache.get(qs), q, in_features)
        elif m.combine is not None and len(m.source_names) == 1:
            continue                         # a transformed tensor (Gemma's 1 + w): keep HF's
        else:
            w = cache.get(m.mlc_name)
        w = w.astype(np.float32)
        # split fused rows back into the HF tensors they came from
        offset = 0
        for name in m.source_names:
            rows = sd[name].shape[0]
            out[name] = w[offset:offset + rows]
            offset += rows
    ref = copy.deepcopy(hf_model)
    state = ref.state_dict()
    with torch.no_grad():
        for name, value in out.items():
            state[name].copy_(torch.from_numpy(value))
    if config.tie_word_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return ref.eval()


# ------------------------------------------------------------------------------ MLC dirs


def write_mlc_dir(hf_model, out_dir: str | Path, quantization: str = "q0f32",
                  hf_dir: str | Path | None = None, **config_overrides: Any) -> Path:
    """Write an MLC model dir from an HF model's state dict (registry mapping, quantizer,
    TensorCacheWriter, ChatConfig); tokenizer files are copied from `hf_dir` when given.
    `config_overrides` go to the architecture config (e.g. prefill_chunk_size=64)."""
    from mlc.compiler.quantization import get_quantization, quantize_weight, quantized_param_names
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig
    from mlc.support.tensor_cache import TensorCacheWriter

    out_dir = Path(out_dir)
    hf_config = hf_model.config.to_dict()
    info = get_model(hf_config["model_type"])
    config = info.config_from_hf(hf_config, **config_overrides)
    q = get_quantization(quantization)
    sd = hf_state_dict(hf_model)
    with TensorCacheWriter(out_dir) as writer:
        n_source = 0
        for m in info.param_mapping(config):
            arrays = [sd[name] for name in m.source_names]
            n_source += sum(a.size for a in arrays)
            w = m.combine(arrays) if m.combine else arrays[0]
            if q.is_quantized and m.quantize:
                for name, value in zip(quantized_param_names(m.mlc_name), quantize_weight(w, q)):
                    writer.add(name, value)
            else:
                writer.add(m.mlc_name, w.astype(q.model_dtype))
        writer.finish(param_count=n_source)
    tokenizer_files = []
    chat_template = None
    if hf_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if Path(hf_dir, name).exists():
                shutil.copy(Path(hf_dir, name), out_dir / name)
                tokenizer_files.append(name)
        tok_cfg = Path(hf_dir, "tokenizer_config.json")
        if tok_cfg.exists():
            chat_template = json.loads(tok_cfg.read_text()).get("chat_template")
    eos = hf_config.get("eos_token_id")
    ChatConfig(
        model_type=hf_config["model_type"], quantization=q.name, model_config=config.to_dict(),
        vocab_size=config.vocab_size, context_window_size=config.context_window_size,
        prefill_chunk_size=config.prefill_chunk_size,
        sliding_window_size=config.sliding_window_size, tokenizer_files=tokenizer_files,
        chat_template=chat_template, eos_token_id=[eos] if isinstance(eos, int) else (eos or []),
        pad_token_id=hf_config.get("pad_token_id"), eos_token=EOS_TOKEN if hf_dir else None,
        source="tests/helpers.py",
    ).save(out_dir)
    return out_dir


# ------------------------------------------------------------------------------ libraries


# The code that decides what a library contains: a change here rebuilds cached libraries.
_LIBRARY_SOURCES = ("mlc/compiler/compile.py", "mlc/compiler/target.py",
                    "mlc/compiler/schedules.py", "mlc/compiler/cpu_schedules.py",
                    "mlc/compiler/cpu_rules.py", "mlc/compiler/cpu_tir.py",
                    "mlc/compiler/cpu_attention.py", "mlc/compiler/cuda_support.py",
                    "mlc/compiler/cuda_attention.py", "mlc/compiler/quantization",
                    "mlc/compiler/passes",
                    "mlc/compiler/cuda_kernels", "mlc/models", "mlc/support/versions.py")


def _source_digest() -> str:
    """A digest of the library-generating sources and the TVM version."""
    import tvm

    h = hashlib.sha256(tvm.__version__.encode())
    for entry in _LIBRARY_SOURCES:
        path = REPO / entry
        files = (sorted(f for f in path.rglob("*") if f.is_file() and f.suffix != ".pyc")
                 if path.is_dir() else [path] if path.exists() else [])
        for file in files:
            h.update(str(file.relative_to(REPO)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def library_key(mlc_dir: str | Path, device: str = "cpu", overrides: str | None = None,
                opt: str = "O2") -> str:
    """The content key of a library: chat config, device, options and compiler sources."""
    h = hashlib.sha256()
    chat = json.loads(Path(mlc_dir, "mlc-chat-config.json").read_text())
    chat.pop("source", None)
    for part in (json.dumps(chat, sort_keys=True), device, overrides or "", opt,
                 _source_digest()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def host_mcpu() -> str:
    """LLVM's name for this machine's CPU (what a plain `cpu` library is built for), or
    "host" where TVM is the runtime-only build (no LLVM)."""
    from tvm.target import codegen

    try:
        return codegen.llvm_get_system_cpu()
    except AttributeError:
        return "host"


def build_lib(mlc_dir: str | Path, device: str = "cpu", overrides: str | None = None,
              opt: str = "O2") -> Path:
    """Compile `mlc_dir` for `device` (once: cached by content under TEST_CACHE_DIR); the
    library path (a .tar for webgpu)."""
    from mlc.compiler.compile import compile_model

    key = library_key(mlc_dir, device, overrides, opt)
    suffix = ".tar" if device.startswith("webgpu") else ".so"   # wasm objects, unlinked
    path = TEST_CACHE_DIR / "libs" / f"{device.replace(':', '-')}-{key}{suffix}"
    if not path.exists():
        compile_model(mlc_dir, device, path, opt=opt, overrides=overrides, quiet=True)
    return path


def load_model(mlc_dir: str | Path, lib: str | Path, max_batch_size: int = 4,
               max_total_sequence_length: int = 256, prefill_chunk_size: int | None = None):
    """A CPU `LoadedModel` with its KV cache created."""
    from mlc.runtime.model import KVCacheConfig, LoadedModel
    from mlc.support.chat_config import ChatConfig

    model = LoadedModel(mlc_dir, lib, device="cpu")
    chunk = prefill_chunk_size or ChatConfig.load(mlc_dir).prefill_chunk_size
    model.create_kv_cache(KVCacheConfig(max_batch_size, max_total_sequence_length, chunk))
    return model


def tiny_llama_library(tmp_path: str | Path, quantization: str = "q0f32", **overrides):
    """The tiny random Llama most engine tests run on: (hf_model, mlc_dir, its CPU library)."""
    tmp_path = Path(tmp_path)
    hf_model, hf_dir = make_tiny_llama(tmp_path, **overrides)
    mlc_dir = write_mlc_dir(hf_model, tmp_path / "mlc", quantization, hf_dir=hf_dir)
    return hf_model, mlc_dir, build_lib(mlc_dir)


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| divided by the range of ref (the tolerance unit of these tests)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / (ref.max() - ref.min()))


# ------------------------------------------------------------------------------ EAGLE heads


def make_tiny_eagle_head(tmp_path: str | Path, target, seed: int = 7, std: float = 0.2,
                         num_hidden_layers: int = 2, bias: bool = True,
                         drop: tuple[str, ...] = (), **config_overrides: Any) -> Path:
    """A randomly initialised EAGLE-1/2 head for the HF model `target`, written as the
    published heads are (EAGLE's `cnets.py` layout): a Llama config.json (+ "bias") and a
    `pytorch_model.bin` with top-level names (`fc.*`, `layers.{i}.*`, no input norm in layer
    0, `embed_tokens.weight` copied from the target). `drop` leaves tensors out."""
    import torch

    tc = target.config
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", bias=bias,
               hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
               num_attention_heads=tc.num_attention_heads,
               num_key_value_heads=tc.num_key_value_heads, num_hidden_layers=num_hidden_layers,
               vocab_size=tc.vocab_size, rms_norm_eps=tc.rms_norm_eps,
               max_position_embeddings=tc.max_position_embeddings,
               rope_theta=getattr(tc, "rope_theta", 10000.0), hidden_act="silu",
               torch_dtype="float32")
    cfg.update(config_overrides)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, mean=0.0: (torch.randn(*shape, generator=g) * std + mean)
    sd = {"embed_tokens.weight": target.model.embed_tokens.weight.detach().clone(),
          "fc.weight": rand(h, 2 * h)}
    if bias:
        sd["fc.bias"] = rand(h)
    for i in range(num_hidden_layers):
        p = f"layers.{i}"
        if i > 0:
            sd[f"{p}.input_layernorm.weight"] = rand(h, mean=1.0)
        sd.update({f"{p}.self_attn.q_proj.weight": rand(h, h),
                   f"{p}.self_attn.k_proj.weight": rand(kv, h),
                   f"{p}.self_attn.v_proj.weight": rand(kv, h),
                   f"{p}.self_attn.o_proj.weight": rand(h, h),
                   f"{p}.post_attention_layernorm.weight": rand(h, mean=1.0),
                   f"{p}.mlp.gate_proj.weight": rand(inter, h),
                   f"{p}.mlp.up_proj.weight": rand(inter, h),
                   f"{p}.mlp.down_proj.weight": rand(h, inter)})
    for name in drop:
        sd.pop(name)
    head_dir = Path(tmp_path) / f"eagle-head-{seed}"
    head_dir.mkdir(parents=True, exist_ok=True)
    (head_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(sd, head_dir / "pytorch_model.bin")
    return head_dir


def make_context_free_llama(tmp_path: str | Path, seed: int = 0):
    """A tiny random Llama made a bigram model: attention and MLP outputs zeroed (o_proj,
    down_proj), final norm weight 1, so its next token depends on the last token only.
    Returns (hf_model, hf_dir); `make_exact_eagle_head` drafts it exactly."""
    import torch

    hf_model, hf_dir = make_tiny_llama(tmp_path, seed=seed)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf_model.model.norm.weight.fill_(1.0)
    return hf_model, hf_dir


def make_exact_eagle_head(tmp_path: str | Path, target) -> Path:
    """An EAGLE head (published layout) that is exact for a `make_context_free_llama` target:
    fc passes the next token's embedding through and its layers add nothing, so the target's
    LM head on its output ranks tokens as the target does after that token (the target's
    final norm only rescales)."""
    import torch

    head_hf = make_tiny_eagle_head(tmp_path, target, seed=11, bias=False)
    sd = torch.load(head_hf / "pytorch_model.bin", weights_only=True)
    h = target.config.hidden_size
    sd["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], 1)
    for name in list(sd):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name] = torch.zeros_like(sd[name])
    torch.save(sd, head_hf / "pytorch_model.bin")
    return head_hf
