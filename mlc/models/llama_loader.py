"""Llama: how Hugging Face (and GGUF) parameter names map onto mlc's Llama parameters."""

from __future__ import annotations

import numpy as np

from mlc.models.registry import ParamMap
from mlc.models.sharding import ShardSpec


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def param_mapping(config) -> list[ParamMap]:
    """HF `LlamaForCausalLM` names -> mlc names (qkv and gate/up fused as MLC-LLM does)."""
    maps = [ParamMap("model.embed_tokens.weight", ("model.embed_tokens.weight",), quantize=True)]
    for i in range(config.num_hidden_layers):
        hf, mlc = f"model.layers.{i}", f"model.layers.{i}"
        maps += [
            ParamMap(f"{mlc}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",)),
            ParamMap(f"{mlc}.self_attn.qkv_proj.weight",
                     tuple(f"{hf}.self_attn.{p}_proj.weight" for p in "qkv"),
                     _concat_rows, quantize=True),
            ParamMap(f"{mlc}.self_attn.o_proj.weight", (f"{hf}.self_attn.o_proj.weight",),
                     quantize=True),
            ParamMap(f"{mlc}.post_attention_layernorm.weight",
                     (f"{hf}.post_attention_layernorm.weight",)),
            ParamMap(f"{mlc}.mlp.gate_up_proj.weight",
                     (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
                     _concat_rows, quantize=True),
            ParamMap(f"{mlc}.mlp.down_proj.weight", (f"{hf}.mlp.down_proj.weight",),
                     quantize=True),
        ]
    maps.append(ParamMap("model.norm.weight", ("model.norm.weight",)))
    if not config.tie_word_embeddings:
        maps.append(ParamMap("lm_head.weight", ("lm_head.weight",), quantize=True))
    return maps


def shard_specs(config) -> dict[str, ShardSpec]:
    """mlc name -> how it splits over `tensor_parallel_shards` (unlisted: replicated).

    Column-parallel qkv (per-shard [q, k, v]) and gate_up (per-shard [gate, up]); row-parallel
    o_proj and down_proj. See `mlc.compiler.tensor_parallel` for the layout.
    """
    d, hq, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    qkv = ShardSpec(0, (hq * d, hkv * d, hkv * d))
    gate_up = ShardSpec(0, (config.intermediate_size, config.intermediate_size))
    rows_in = ShardSpec(1)
    specs = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        specs[f"{p}.self_attn.qkv_proj.weight"] = qkv
        specs[f"{p}.self_attn.o_proj.weight"] = rows_in
        specs[f"{p}.mlp.gate_up_proj.weight"] = gate_up
        specs[f"{p}.mlp.down_proj.weight"] = rows_in
    return specs


# llama.cpp's names; its converter permutes the rows of q and k (see `unpermute_qk`).
_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_names(config) -> dict[str, str]:
    """GGUF tensor name (without `.weight`) -> HF tensor name (without `.weight`)."""
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head"}
    for i in range(config.num_hidden_layers):
        for g, h in _GGUF_LAYER.items():
            names[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
    return names


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary halves in q/k rows (HF layout back)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensor(hf_name: str, array: np.ndarray, config) -> np.ndarray:
    """llama.cpp interleaves the rotary halves of Llama's q and k rows; undo it (HF layout)."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return unpermute_qk(array, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return unpermute_qk(array, config.num_key_value_heads)
    return array
