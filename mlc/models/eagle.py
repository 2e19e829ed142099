"""An EAGLE-1/EAGLE-2 draft head (speculative decoding) for a Llama-family target.

The head drafts from the target's features: at head position j it reads the target's final
hidden state f_j (after the last norm, what the LM head reads) and the embedding of the next
token x_{j+1}, and returns g_j, which the *target's* LM head turns into logits for x_{j+2}:

    g_j = layers(fc(concat(embed(x_{j+1}), f_j)))      (no final norm: the target's LM head
                                                         reads g_j as it reads f_j)

Later draft steps feed the head its own output in place of the target's feature. The layers
are Llama decoder layers, except that layer 0 has no input norm (the fc output goes straight
into attention). The head has its own paged KV cache.

The published layout (EAGLE's `cnets.py`; e.g. yuhuili/EAGLE-llama2-chat-7B,
yuhuili/EAGLE-LLaMA3-Instruct-8B): a Llama-style config.json (`"bias"`: whether `fc` has a
bias, default true) and weights named `embed_tokens.weight` (a copy of the target's),
`fc.weight`, `fc.bias`, `layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`layers.{i}.mlp.{gate,up,down}_proj.weight`, `layers.{i}.input_layernorm.weight` (i > 0) and
`layers.{i}.post_attention_layernorm.weight`. mlc's names follow MLC-LLM's for the same head
(no `model.` prefix; qkv and gate/up fused). EAGLE-3 heads (several target layers' features,
a draft vocabulary) are a different architecture and are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc.models import llama
from mlc.models.config import build
from mlc.models.registry import ParamMap


@dataclass
class Config(llama.Config):
    """The head's config: a Llama config (its own layers) plus whether `fc` has a bias."""

    bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        base = llama.Config.from_hf(hf).to_dict()
        base["bias"] = bool(hf.get("bias", True))
        base["tie_word_embeddings"] = False        # the head has no LM head of its own
        return build(cls, base, overrides)


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def param_mapping(config: Config) -> list[ParamMap]:
    """The published EAGLE names -> mlc's (qkv and gate/up fused as for Llama)."""
    maps = [ParamMap("embed_tokens.weight", ("embed_tokens.weight",), quantize=True),
            ParamMap("fc.weight", ("fc.weight",), quantize=True)]
    if config.bias:
        maps.append(ParamMap("fc.bias", ("fc.bias",)))
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}"
        if i > 0:
            maps.append(ParamMap(f"{p}.input_layernorm.weight", (f"{p}.input_layernorm.weight",)))
        maps += [
            ParamMap(f"{p}.self_attn.qkv_proj.weight",
                     tuple(f"{p}.self_attn.{x}_proj.weight" for x in "qkv"), _concat_rows,
                     quantize=True),
            ParamMap(f"{p}.self_attn.o_proj.weight", (f"{p}.self_attn.o_proj.weight",),
                     quantize=True),
            ParamMap(f"{p}.post_attention_layernorm.weight",
                     (f"{p}.post_attention_layernorm.weight",)),
            ParamMap(f"{p}.mlp.gate_up_proj.weight",
                     (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"), _concat_rows,
                     quantize=True),
            ParamMap(f"{p}.mlp.down_proj.weight", (f"{p}.mlp.down_proj.weight",),
                     quantize=True),
        ]
    return maps


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402
from tvm.relax.frontend.nn.llm import kv_cache as kv_mod  # noqa: E402

from mlc.models.common import PagedKVCacheOwner  # noqa: E402
from mlc.models.layers import make_embedding, make_linear  # noqa: E402


class HeadLayer(nn.Module):
    """A Llama decoder layer; layer 0 has no input norm (EAGLE's layout)."""

    def __init__(self, config: Config, quantization, index: int):
        super().__init__()
        dtype = quantization.model_dtype
        if index > 0:
            self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                              bias=False, dtype=dtype)
        self.self_attn = llama.Attention(config, quantization)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                                   bias=False, dtype=dtype)
        self.mlp = llama.MLP(config, quantization)
        self.index = index

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        normed = self.input_layernorm(x) if self.index > 0 else x
        x = x + self.self_attn(normed, kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleHead(PagedKVCacheOwner):
    """The head's library: embed, the two drafting forwards, its KV cache."""

    def __init__(self, config: Config, quantization):
        super().__init__()
        if config.tensor_parallel_shards != 1:
            from mlc.errors import CompileError

            raise CompileError("An EAGLE head runs on one device: tensor_parallel_shards=1.",
                               param="tensor_parallel_shards")
        self.config = config
        self.quantization = quantization
        self.dtype = quantization.model_dtype
        h = config.hidden_size
        self.embed_tokens = make_embedding(config.vocab_size, h, quantization)
        self.fc = make_linear(2 * h, h, quantization, bias=config.bias)
        self.layers = nn.ModuleList(
            [HeadLayer(config, quantization, i) for i in range(config.num_hidden_layers)])

    def embed(self, input_ids: Tensor) -> Tensor:           # [n] -> [n, h]
        return self.embed_tokens(input_ids)

    def _forward(self, input_embeds: Tensor, hidden_states: Tensor, kv_cache) -> Tensor:
        x = self.fc(op.concat([input_embeds, hidden_states], dim=-1))   # [b, s, 2h] -> [b, s, h]
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return x

    def batch_prefill_to_last_hidden_states(self, input_embeds: Tensor, hidden_states: Tensor,
                                            logit_positions: Tensor, paged_kv_cache):
        """Ragged chunks: token embeddings [1, s, h] + the target's features [1, s, h] -> the
        head's outputs at `logit_positions` [b] -> [1, b, h]."""
        x = self._forward(input_embeds, hidden_states, paged_kv_cache)
        return op.take(x, logit_positions, axis=1), paged_kv_cache

    def batch_decode_to_last_hidden_states(self, input_embeds: Tensor, hidden_states: Tensor,
                                           paged_kv_cache):
        """One draft step for b sequences: [b, 1, h] + [b, 1, h] -> [b, 1, h]."""
        return self._forward(input_embeds, hidden_states, paged_kv_cache), paged_kv_cache

    def kv_cache_layout(self) -> dict:
        c = self.config
        return dict(num_q_heads=c.num_attention_heads,
                    num_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim,
                    attention_kinds=["mha"] * c.num_hidden_layers,
                    rope_theta=c.rope_theta,
                    rope_scaling=c.rope_scaling)

    def get_default_spec(self, target_kind: str):
        """The head library's functions (see `mlc.runtime.model.LoadedHead`)."""
        h = self.config.hidden_size
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        kv = nn.spec.Object(object_type=kv_mod.PagedKVCache)
        ragged = nn.spec.Tensor([1, "seq_len", h], self.dtype)
        batch = nn.spec.Tensor(["batch_size", 1, h], self.dtype)
        return {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **packed},
            "batch_prefill_to_last_hidden_states": {
                "input_embeds": ragged, "hidden_states": ragged,
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv, **packed},
            "batch_decode_to_last_hidden_states": {
                "input_embeds": batch, "hidden_states": batch, "paged_kv_cache": kv, **packed},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"}},
        }
