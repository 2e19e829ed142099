"""Llama (Llama 2, Llama 3/3.1, SmolLM2, TinyLlama, Mistral) as a TVM Relax nn.Module.

Reads top to bottom: the config, the layers, the causal LM and its export spec.
Parameter names follow MLC-LLM's (`qkv_proj`, `gate_up_proj`), see `llama_loader.py`.
With `tensor_parallel_shards` N > 1 each module is one worker's 1/N (its heads and MLP
channels) followed by an all-reduce; see `mlc.compiler.tensor_parallel`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from mlc.errors import CompileError, ConvertError

logger = logging.getLogger(__name__)


@dataclass
class Config:
    """The Llama architecture config, resolved from HF config.json fields."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    head_dim: int = 0
    tie_word_embeddings: bool = False
    context_window_size: int = 4096
    prefill_chunk_size: int = 2048
    sliding_window_size: int = -1
    max_batch_size: int = 64
    tensor_parallel_shards: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConvertError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}.")
        if self.sliding_window_size > 0:
            # A chunk must fit in the window: attention within a chunk (the ragged kernel)
            # applies no window. One below it keeps every query seeing at least one cached
            # key, a case TVM 0.27's GPU sliding-window kernel gets wrong.
            self.prefill_chunk_size = min(self.prefill_chunk_size, self.sliding_window_size - 1)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases; raise naming the missing keys."""
        required = ["hidden_size", "intermediate_size", "num_attention_heads",
                    "num_hidden_layers", "vocab_size"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConvertError(f"config.json lacks the Llama fields {missing}.")
        ctx = hf.get("max_position_embeddings") or hf.get("max_sequence_length") or 4096
        if "max_position_embeddings" not in hf:
            logger.info("config.json has no max_position_embeddings; using %d", ctx)
        sliding = hf.get("sliding_window") or -1
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside) for both.
        rope_params = hf.get("rope_parameters") or {}
        rope_scaling = hf.get("rope_scaling") or {
            k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
                "default", None):
            rope_scaling = None
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling or None,
            head_dim=hf.get("head_dim") or 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            context_window_size=ctx, prefill_chunk_size=min(2048, ctx),
            sliding_window_size=sliding,
        )
        for key, value in overrides.items():
            if key not in known:
                raise ConvertError(f"Unknown override {key!r}; valid: {sorted(known)}.")
            if value is not None:
                cfg[key] = value
        return cls(**cfg)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402

from mlc.models.common import CausalLMBase, create_kv_cache  # noqa: E402
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

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size,
                              page_size, support_sliding_window):
        c = self.config
        return create_kv_cache(
            self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
            support_sliding_window, num_layers=c.num_hidden_layers,
            num_q_heads=c.num_attention_heads // c.tensor_parallel_shards,
            num_kv_heads=c.num_key_value_heads // c.tensor_parallel_shards,
            head_dim=c.head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling or {},
            sliding_window=c.sliding_window_size)
