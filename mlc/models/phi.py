"""Phi-2 (and Phi-1/1.5: `model_type` "phi") as a TVM Relax nn.Module.

Each block runs attention and the MLP in parallel on the same LayerNorm output and adds both
to the residual: x + attn(ln(x)) + mlp(ln(x)). RoPE covers only the first
`partial_rotary_factor` of each head (32 of 80 features in Phi-2; the KV cache rotates them,
`rotary_dim`); every linear has a bias; the MLP is fc1 -> gelu_new -> fc2; the untied
`lm_head` (a LayerNorm, then a linear with a bias) follows the last block.

Reads top to bottom: the config, the HF -> MLC name mapping, the network. Parameter names are
MLC-LLM's (`transformer.h.N.mixer.Wqkv` = q, k, v rows fused; `lm_head.ln`, `lm_head.linear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc.errors import CompileError, ConvertError
from mlc.models.config import ModelConfig, build, context_window, require, rope_params
from mlc.models.registry import ParamMap

# transformers' activation names -> the GELU TVM computes ("tanh": the tanh approximation)
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
               "gelu": None}


@dataclass
class Config(ModelConfig):
    """The Phi architecture config, resolved from HF config.json fields."""

    layer_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_new"

    @property
    def rotary_dim(self) -> int:
        """How many features of each head RoPE rotates (transformers' `rotary_ndims`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases; raise naming the missing keys or what is not supported."""
        require(hf, ["hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "vocab_size"], "Phi")
        act = hf.get("hidden_act", "gelu_new")
        if act not in ACTIVATIONS:
            raise ConvertError(f"Phi with hidden_act={act!r} is not supported; mlc runs "
                               f"{', '.join(ACTIVATIONS)}.", param="source")
        if hf.get("qk_layernorm"):
            raise ConvertError("Phi with qk_layernorm=true is not supported (no released "
                               "Phi-1/1.5/2 checkpoint uses it).", param="source")
        rope = rope_params(hf)
        if rope["rope_type"] != "default":
            raise ConvertError(f"Phi with rope_type={rope['rope_type']!r} is not supported; "
                               "only plain RoPE is.", param="source")
        # transformers >= 5 keeps partial_rotary_factor in rope_parameters; older configs at
        # the top level (its default there is 0.5)
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        ctx = context_window(hf, 2048)
        fields = dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], head_dim=hf.get("head_dim") or 0,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5), partial_rotary_factor=factor,
            rope_theta=rope.get("rope_theta", 10000.0), hidden_act=act,
            context_window_size=ctx, prefill_chunk_size=min(2048, ctx),
        )
        return build(cls, fields, overrides)

    def activation_bytes_per_token(self) -> int:
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        return qkv + 2 * self.intermediate_size + 4 * self.hidden_size


# ---------------------------------------------------------------------------------------------
# Names: Hugging Face -> MLC. Quantized: every linear weight and the embedding (not biases).
# ---------------------------------------------------------------------------------------------


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def param_mapping(config: Config) -> list[ParamMap]:
    """HF `PhiForCausalLM` names -> MLC-LLM's Phi names."""
    maps = [ParamMap("transformer.embd.weight", ("model.embed_tokens.weight",), quantize=True)]
    for i in range(config.num_hidden_layers):
        hf, mlc = f"model.layers.{i}", f"transformer.h.{i}"
        attn = f"{hf}.self_attn"
        maps += [
            ParamMap(f"{mlc}.ln.weight", (f"{hf}.input_layernorm.weight",)),
            ParamMap(f"{mlc}.ln.bias", (f"{hf}.input_layernorm.bias",)),
            ParamMap(f"{mlc}.mixer.Wqkv.weight", tuple(f"{attn}.{x}_proj.weight" for x in "qkv"),
                     _concat_rows, quantize=True),
            ParamMap(f"{mlc}.mixer.Wqkv.bias", tuple(f"{attn}.{x}_proj.bias" for x in "qkv"),
                     _concat_rows),
            ParamMap(f"{mlc}.mixer.out_proj.weight", (f"{attn}.dense.weight",), quantize=True),
            ParamMap(f"{mlc}.mixer.out_proj.bias", (f"{attn}.dense.bias",)),
        ]
        for fc in ("fc1", "fc2"):
            maps += [ParamMap(f"{mlc}.mlp.{fc}.weight", (f"{hf}.mlp.{fc}.weight",),
                              quantize=True),
                     ParamMap(f"{mlc}.mlp.{fc}.bias", (f"{hf}.mlp.{fc}.bias",))]
    # a tied checkpoint stores no lm_head.weight: its output projection is the embedding
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    maps += [
        ParamMap("lm_head.ln.weight", ("model.final_layernorm.weight",)),
        ParamMap("lm_head.ln.bias", ("model.final_layernorm.bias",)),
        ParamMap("lm_head.linear.weight", (head,), quantize=True),
        ParamMap("lm_head.linear.bias", ("lm_head.bias",)),
    ]
    return maps


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
        self.Wqkv = make_linear(config.hidden_size, qkv_rows, quantization, bias=True)
        self.out_proj = make_linear(self.num_q_heads * self.head_dim, config.hidden_size,
                                    quantization, bias=True)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.Wqkv(x),                          # [b, s, hq + 2 hkv, d]
                         (b, s, self.num_q_heads + 2 * self.num_kv_heads, self.head_dim))
        out = kv_cache.attention_with_fused_qkv(                # partial RoPE applied inside
            layer_id, qkv, self.num_q_heads, sm_scale=self.head_dim ** -0.5)
        return self.out_proj(op.reshape(out, (b, s, self.num_q_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.approximate = ACTIVATIONS[config.hidden_act]
        self.fc1 = make_linear(config.hidden_size, config.intermediate_size, quantization,
                               bias=True)
        self.fc2 = make_linear(config.intermediate_size, config.hidden_size, quantization,
                               bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(op.gelu(self.fc1(x), approximate=self.approximate))


class ParallelBlock(nn.Module):
    """x + attention(ln(x)) + mlp(ln(x)): one LayerNorm feeds both branches."""

    def __init__(self, config: Config, quantization):
        super().__init__()
        self.ln = nn.LayerNorm(config.hidden_size, config.layer_norm_eps,
                               dtype=quantization.model_dtype)
        self.mixer = Attention(config, quantization)
        self.mlp = MLP(config, quantization)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        h = self.ln(x)
        return x + self.mixer(h, kv_cache, layer_id) + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.embd = make_embedding(config.vocab_size, config.hidden_size, quantization)
        self.h = nn.ModuleList(
            [ParallelBlock(config, quantization) for _ in range(config.num_hidden_layers)])

    def forward(self, x: Tensor, kv_cache) -> Tensor:
        for layer_id, block in enumerate(self.h):
            x = block(x, kv_cache, layer_id)
        return x


class LMHead(nn.Module):
    """The final LayerNorm and the output projection (with its bias)."""

    def __init__(self, config: Config, quantization):
        super().__init__()
        self.ln = nn.LayerNorm(config.hidden_size, config.layer_norm_eps,
                               dtype=quantization.model_dtype)
        self.linear = make_linear(config.hidden_size, config.vocab_size, quantization,
                                  bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.ln(x), "float32")


class ForCausalLM(CausalLMBase):
    """Phi with the library contract of `CausalLMBase` (embed, prefill, decode, ...)."""

    def __init__(self, config: Config, quantization):
        if config.tensor_parallel_shards != 1:
            raise CompileError("Phi has no tensor-parallel build yet; use "
                               "tensor_parallel_shards=1.", param="tensor_parallel_shards")
        super().__init__(config, quantization)
        self.transformer = Transformer(config, quantization)
        self.lm_head = LMHead(config, quantization)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.embd(input_ids)

    def body(self, input_embeds: Tensor, kv_cache) -> Tensor:
        return self.transformer(input_embeds, kv_cache)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.lm_head.ln(hidden)       # (MLC-LLM's layout: the norm sits in lm_head)

    def kv_cache_layout(self) -> dict:
        c = self.config
        return dict(num_q_heads=c.num_attention_heads,
                    num_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim,
                    attention_kinds=c.attention_kinds(),
                    rope_theta=c.rope_theta,
                    rotary_dim=c.rotary_dim)
