"""Qwen2 and Qwen2.5 (`model_type` "qwen2") as a TVM Relax nn.Module.

Llama's block with a bias on the q/k/v projections, RoPE theta 1e6 by default, and (when
`use_sliding_window` is set) sliding-window attention on the layers from `max_window_layers`
on. Tied (0.5B-3B) or untied (7B+) embeddings.

Reads top to bottom: the config, the HF/GGUF -> MLC name mapping, the network. Parameter
names are MLC-LLM's (`self_attn.c_attn` = q, k, v rows fused, with its bias;
`mlp.gate_up_proj`), so MLC-LLM's Qwen2 weight repos load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc.errors import CompileError
from mlc.models.config import (
    FULL,
    SLIDING,
    ModelConfig,
    build,
    context_window,
    layer_types,
    require,
    rope_params,
    rope_scaling_of,
)
from mlc.models.registry import ParamMap


@dataclass
class Config(ModelConfig):
    """The Qwen2 architecture config, resolved from HF config.json fields."""

    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict[str, Any] | None = None
    layer_types: list[str] | None = None      # per layer FULL or SLIDING; None: all FULL

    def attention_kinds(self) -> list[str]:
        types = self.layer_types or [FULL] * self.num_hidden_layers
        return ["mha_sliding" if t == SLIDING else "mha" for t in types]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases; raise naming the missing keys."""
        return build(cls, cls.hf_fields(hf), overrides)

    @classmethod
    def hf_fields(cls, hf: dict[str, Any], arch: str = "Qwen2") -> dict[str, Any]:
        """The dataclass fields from an HF config (shared with Qwen3)."""
        require(hf, ["hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "vocab_size"], arch)
        n = hf["num_hidden_layers"]
        types = _sliding_layers(hf, n)
        ctx = context_window(hf, 32768)
        rope = rope_params(hf)
        return dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"], num_hidden_layers=n,
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", 1000000.0), rope_scaling=rope_scaling_of(rope, arch),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            context_window_size=ctx, prefill_chunk_size=min(2048, ctx),
            sliding_window_size=hf["sliding_window"] if SLIDING in types else -1,
            layer_types=types if SLIDING in types else None,
        )


def _sliding_layers(hf: dict[str, Any], n: int) -> list[str]:
    """Which layers slide: HF's `layer_types` when written, else (older configs) the layers
    from `max_window_layers` on when `use_sliding_window` is set. Released Qwen2/2.5 configs
    carry a `sliding_window` value with use_sliding_window false: no layer slides then."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return [FULL] * n
    types = layer_types(hf, n)
    if types is None:
        first = hf.get("max_window_layers", n)
        types = [SLIDING if i >= first else FULL for i in range(n)]
    return types


# ---------------------------------------------------------------------------------------------
# Names: Hugging Face (and GGUF) -> MLC. Quantized: every linear weight and the embedding.
# ---------------------------------------------------------------------------------------------


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def param_mapping(config: Config) -> list[ParamMap]:
    """HF `Qwen2ForCausalLM` names -> mlc names (q, k, v fused as MLC-LLM's `c_attn`)."""
    maps = [ParamMap("model.embed_tokens.weight", ("model.embed_tokens.weight",), quantize=True)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = f"{p}.self_attn"
        maps += [
            ParamMap(f"{p}.input_layernorm.weight", (f"{p}.input_layernorm.weight",)),
            ParamMap(f"{attn}.c_attn.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"),
                     _concat_rows, quantize=True),
            ParamMap(f"{attn}.c_attn.bias", tuple(f"{attn}.{x}_proj.bias" for x in "qkv"),
                     _concat_rows),
            ParamMap(f"{attn}.o_proj.weight", (f"{attn}.o_proj.weight",), quantize=True),
            ParamMap(f"{p}.post_attention_layernorm.weight",
                     (f"{p}.post_attention_layernorm.weight",)),
            ParamMap(f"{p}.mlp.gate_up_proj.weight",
                     (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"),
                     _concat_rows, quantize=True),
            ParamMap(f"{p}.mlp.down_proj.weight", (f"{p}.mlp.down_proj.weight",), quantize=True),
        ]
    maps.append(ParamMap("model.norm.weight", ("model.norm.weight",)))
    if not config.tie_word_embeddings:
        maps.append(ParamMap("lm_head.weight", ("lm_head.weight",), quantize=True))
    return maps


# llama.cpp's names (its Qwen2 converter keeps HF's q/k row order: no permutation).
GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_names(config: Config) -> dict[str, str]:
    """GGUF tensor name (without `.weight`/`.bias`) -> HF name (without them)."""
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head"}
    for i in range(config.num_hidden_layers):
        for g, h in GGUF_LAYER.items():
            names[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
    return names


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402

from mlc.models.common import CausalLMBase  # noqa: E402
from mlc.models.layers import make_embedding, make_linear  # noqa: E402


class Attention(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_rows = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.c_attn = make_linear(config.hidden_size, qkv_rows, quantization, bias=True)
        self.o_proj = make_linear(self.num_q_heads * self.head_dim, config.hidden_size,
                                  quantization)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.c_attn(x),                        # [b, s, hq + 2 hkv, d]
                         (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(                # RoPE is applied inside
            layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim ** -0.5)
        return self.o_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size,
                                        quantization)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size,
                                     quantization)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Config, quantization, attention: type = Attention):
        super().__init__()
        dtype = quantization.model_dtype
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                          bias=False, dtype=dtype)
        self.self_attn = attention(config, quantization)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps,
                                                   bias=False, dtype=dtype)
        self.mlp = MLP(config, quantization)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, config: Config, quantization, attention: type = Attention):
        super().__init__()
        self.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, quantization)
        self.layers = nn.ModuleList([DecoderLayer(config, quantization, attention)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False,
                               dtype=quantization.model_dtype)

    def forward(self, x: Tensor, kv_cache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


class ForCausalLM(CausalLMBase):
    """Qwen2 with the library contract of `CausalLMBase` (embed, prefill, decode, ...)."""

    name = "Qwen2"
    attention: type = Attention                 # Qwen3 swaps in its q/k-norm attention

    def __init__(self, config: Config, quantization):
        if config.tensor_parallel_shards != 1:
            raise CompileError(f"{self.name} has no tensor-parallel build yet; "
                               "use tensor_parallel_shards=1.", param="tensor_parallel_shards")
        super().__init__(config, quantization)
        self.model = Model(config, quantization, self.attention)
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
        return dict(num_q_heads=c.num_attention_heads,
                    num_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim,
                    attention_kinds=c.attention_kinds(),
                    sliding_window=c.sliding_window_size,
                    rope_theta=c.rope_theta,
                    rope_scaling=c.rope_scaling)
