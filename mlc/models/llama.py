"""Llama (Llama 2, Llama 3/3.1, SmolLM2, TinyLlama, Mistral) as a TVM Relax nn.Module.

Reads top to bottom: the config, the layers, the causal LM and its export spec.
Parameter names follow MLC-LLM's (`qkv_proj`, `gate_up_proj`), see `llama_loader.py`.
With `tensor_parallel_shards` N > 1 each module is one worker's 1/N (its heads and MLP
channels) followed by an all-reduce; see `mlc.compiler.tensor_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlc.errors import CompileError
from mlc.models.config import (
    ModelConfig,
    build,
    context_window,
    require,
    rope_params,
    rope_scaling_of,
)


@dataclass
class Config(ModelConfig):
    """The Llama architecture config, resolved from HF config.json fields."""

    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases; raise naming the missing keys."""
        require(hf, ["hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "vocab_size"], "Llama")
        ctx = context_window(hf)
        rope = rope_params(hf)
        fields = dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=rope_scaling_of(rope, "Llama"),
            head_dim=hf.get("head_dim") or 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            context_window_size=ctx, prefill_chunk_size=min(2048, ctx),
            sliding_window_size=hf.get("sliding_window") or -1,
        )
        return build(cls, fields, overrides)


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402

from mlc.models.common import CausalLMBase  # noqa: E402
from mlc.models.layers import make_embedding, make_linear  # noqa: E402
from mlc.models.sharding import check_shards  # noqa: E402


class Attention(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.shards = config.tensor_parallel_shards   # > 1: this worker's heads only
        self.num_q_heads = config.num_attention_heads // self.shards
        self.num_kv_heads = config.num_key_value_heads // self.shards
        self.head_dim = config.head_dim
        qkv_rows = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = make_linear(config.hidden_size, qkv_rows, quantization)
        self.o_proj = make_linear(self.num_q_heads * self.head_dim, config.hidden_size,
                                  quantization)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x),                      # [b, s, hq + 2 hkv, d]
                         (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(                # RoPE is applied inside
            layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim ** -0.5)
        out = self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))
        if self.shards > 1:                                     # sum the row-parallel parts
            out = op.ccl_allreduce(out, "sum")
        return out


class MLP(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.shards = config.tensor_parallel_shards   # > 1: this worker's channels only
        intermediate = config.intermediate_size // self.shards
        self.gate_up_proj = make_linear(config.hidden_size, 2 * intermediate, quantization)
        self.down_proj = make_linear(intermediate, config.hidden_size, quantization)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        out = self.down_proj(op.silu(gate) * up)
        if self.shards > 1:                                     # sum the row-parallel parts
            out = op.ccl_allreduce(out, "sum")
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        dtype = quantization.model_dtype
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                          bias=False, dtype=dtype)
        self.self_attn = Attention(config, quantization)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                                   bias=False, dtype=dtype)
        self.mlp = MLP(config, quantization)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        dtype = quantization.model_dtype
        self.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, quantization)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, quantization) for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False,
                               dtype=dtype)

    def forward(self, x: Tensor, kv_cache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class ForCausalLM(CausalLMBase):
    """Llama with the library contract of `CausalLMBase` (embed, prefill, decode, ...)."""

    def __init__(self, config: Config, quantization):
        check_shards(config, CompileError)
        super().__init__(config, quantization)
        self.model = Model(config, quantization)
        if not config.tie_word_embeddings:
            self.lm_head = make_linear(config.hidden_size, config.vocab_size, quantization)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def body(self, input_embeds: Tensor, kv_cache) -> Tensor:
        return self.model(input_embeds, kv_cache)

    def logits(self, hidden: Tensor) -> Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.lm_head(hidden, "float32")
        return self.lm_head(hidden, "float32")

    def kv_cache_layout(self) -> dict:
        c = self.config
        return dict(num_q_heads=c.num_attention_heads // c.tensor_parallel_shards,
                    num_kv_heads=c.num_key_value_heads // c.tensor_parallel_shards,
                    head_dim=c.head_dim,
                    attention_kinds=c.attention_kinds(),
                    sliding_window=c.sliding_window_size,
                    rope_theta=c.rope_theta,
                    rope_scaling=c.rope_scaling)
