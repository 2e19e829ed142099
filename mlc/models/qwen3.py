"""Qwen3 dense (`model_type` "qwen3") as a TVM Relax nn.Module.

Qwen2's block (see `qwen2.py`) with an RMSNorm over each head of q and of k before RoPE
(`q_norm`, `k_norm`), no q/k/v bias unless `attention_bias`, and a head_dim of its own
(128 in every release, whatever hidden_size / num_attention_heads is).

Parameter names are MLC-LLM's (`self_attn.c_attn` = q, k, v rows fused; `q_norm`, `k_norm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlc.models import qwen2
from mlc.models.config import build
from mlc.models.registry import ParamMap


@dataclass
class Config(qwen2.Config):
    """The Qwen3 architecture config: Qwen2's plus `attention_bias`."""

    attention_bias: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases; raise naming the missing keys."""
        fields = cls.hf_fields(hf, "Qwen3")
        fields["head_dim"] = hf.get("head_dim") or 128          # transformers' default
        fields["attention_bias"] = bool(hf.get("attention_bias", False))
        return build(cls, fields, overrides)


# ---------------------------------------------------------------------------------------------
# Names: Hugging Face (and GGUF) -> MLC. Quantized: every linear weight and the embedding.
# ---------------------------------------------------------------------------------------------


def param_mapping(config: Config) -> list[ParamMap]:
    """HF `Qwen3ForCausalLM` names -> mlc names: Qwen2's, with the q/k norms, and the q/k/v
    bias only when the config has one."""
    maps = []
    for pm in qwen2.param_mapping(config):
        if pm.mlc_name.endswith("c_attn.bias") and not config.attention_bias:
            continue
        maps.append(pm)
        if pm.mlc_name.endswith("self_attn.o_proj.weight"):
            attn = pm.mlc_name[: -len(".o_proj.weight")]
            maps += [ParamMap(f"{attn}.q_norm.weight", (f"{attn}.q_norm.weight",)),
                     ParamMap(f"{attn}.k_norm.weight", (f"{attn}.k_norm.weight",))]
    return maps


def gguf_names(config: Config) -> dict[str, str]:
    """GGUF tensor name -> HF name: Qwen2's plus llama.cpp's `attn_q_norm`/`attn_k_norm`."""
    names = qwen2.gguf_names(config)
    for i in range(config.num_hidden_layers):
        names[f"blk.{i}.attn_q_norm"] = f"model.layers.{i}.self_attn.q_norm"
        names[f"blk.{i}.attn_k_norm"] = f"model.layers.{i}.self_attn.k_norm"
    return names


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402

from mlc.models.layers import make_linear  # noqa: E402


class Attention(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        dtype = quantization.model_dtype
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_rows = (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        self.c_attn = make_linear(config.hidden_size, qkv_rows, quantization,
                                  bias=config.attention_bias)
        self.o_proj = make_linear(self.num_q_heads * self.head_dim, config.hidden_size,
                                  quantization)
        self.q_norm = nn.RMSNorm(self.head_dim, -1, config.rms_norm_eps, bias=False,
                                 dtype=dtype)
        self.k_norm = nn.RMSNorm(self.head_dim, -1, config.rms_norm_eps, bias=False,
                                 dtype=dtype)

    def forward(self, x: Tensor, kv_cache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        qkv = op.reshape(self.c_attn(x), (b, s, hq + 2 * hkv, d))
        q, k, v = op.split(qkv, [hq, hq + hkv], axis=2)
        qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)   # norm, then RoPE
        out = kv_cache.attention_with_fused_qkv(                # RoPE is applied inside
            layer_id, qkv, hq, sm_scale=d ** -0.5)
        return self.o_proj(op.reshape(out, (b, s, hq * d)))


class ForCausalLM(qwen2.ForCausalLM):
    """Qwen3: Qwen2's causal LM with the q/k-norm attention."""

    name = "Qwen3"
    attention = Attention
