"""Gemma 3, the text model (`model_type` "gemma3_text": 270M, 1B; the language model of the
larger ones), as a TVM Relax nn.Module.

What sets it apart from Llama:
  * the embedding is scaled by sqrt(hidden_size), and tied to the output projection;
  * RMSNorm multiplies by (1 + w); mlc stores 1 + w at conversion (as MLC-LLM does), so the
    network uses plain RMSNorm. Four norms per block: before and after attention, before and
    after the MLP (the "sandwich");
  * q and k get an RMSNorm over each head (`q_norm`, `k_norm`) before RoPE, and the scores
    are scaled by query_pre_attn_scalar ** -0.5;
  * layers interleave sliding-window attention (`sliding_window`) and global attention
    (`layer_types`: five sliding, one global in the releases), and each kind has its own RoPE
    theta (10k sliding, 1M global, the global one possibly with "linear" scaling). TVM's KV
    cache rotates with one theta for all layers, so this model rotates q and k itself
    (`apply_rope`) and builds its cache with RopeMode.NONE;
  * the MLP is GeGLU (gelu_pytorch_tanh(gate) * up);
  * the residual stream and every RMSNorm are float32 whatever the model dtype: Gemma 3's
    activations reach ~1e5, beyond float16 (q4f16_1 gave NaN otherwise);
  * logits are soft-capped (cap * tanh(logits / cap)) when `final_logit_softcapping` is set.
    Attention-score soft-capping (Gemma 2's) cannot be expressed in TVM's attention kernels;
    no Gemma 3 checkpoint uses it, and a config that asks for it is refused.

Reads top to bottom: the config, the HF/GGUF -> MLC name mapping, the network. Parameter
names are MLC-LLM's (`language_model.model.layers.N.self_attn.q_proj`, `mlp.gate_up_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlc.errors import CompileError, ConvertError
from mlc.models.config import (
    FULL,
    SLIDING,
    ModelConfig,
    build,
    context_window,
    layer_types,
    require,
    rope_params,
)
from mlc.models.registry import ParamMap

# Gemma's chat format: turns between <start_of_turn>ROLE and <end_of_turn>, the assistant's
# role named "model", a system message folded into the first user turn. Used when the source
# carries no chat template (the GGUF files of the base models do not).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] ~ '\\n\\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' ~ (system if loop.first else '')"
    " ~ (message['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# A model turn ends with <end_of_turn>, not the tokenizer's <eos>.
EXTRA_EOS_TOKENS = ("<end_of_turn>",)
ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": None}


@dataclass
class Config(ModelConfig):
    """The Gemma 3 text config, resolved from HF config.json fields."""

    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0            # global layers
    rope_local_theta: float = 10000.0        # sliding layers
    rope_scaling_factor: float = 1.0         # "linear" scaling of the global layers' RoPE
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = True

    def attention_kinds(self) -> list[str]:
        types = self.layer_types or [FULL] * self.num_hidden_layers
        return ["mha_sliding" if t == SLIDING else "mha" for t in types]

    def activation_bytes_per_token(self) -> int:
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        return 2 * qkv + 3 * self.intermediate_size + 4 * self.hidden_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> Config:
        """Resolve HF aliases (transformers 4 and 5 configs); raise naming what is missing or
        not supported."""
        if isinstance(hf.get("text_config"), dict):
            raise ConvertError("This is a multimodal Gemma 3 checkpoint (model_type gemma3); "
                               "mlc runs the text-only gemma3_text models (270M, 1B).",
                               param="source")
        require(hf, ["hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "vocab_size"], "Gemma 3")
        n = hf["num_hidden_layers"]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        problems = []
        if act not in ACTIVATIONS:
            problems.append(f"hidden_activation={act!r} (supported: {', '.join(ACTIVATIONS)})")
        if hf.get("attn_logit_softcapping") is not None:
            problems.append("attn_logit_softcapping (TVM's attention kernels cannot cap "
                            "scores)")
        if hf.get("attention_bias"):
            problems.append("attention_bias=true")
        if hf.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=true")
        if hf.get("tie_word_embeddings") is False:
            problems.append("tie_word_embeddings=false")
        full, local = rope_params(hf, FULL), rope_params(hf, SLIDING)
        for kind, params in (("global", full), ("sliding", local)):
            if params["rope_type"] not in ("default", "linear"):
                problems.append(f"{kind} rope_type={params['rope_type']!r} (supported: "
                                "default, linear)")
        if problems:
            raise ConvertError(f"Gemma 3 config not supported: {'; '.join(problems)}.",
                               param="source")
        types = layer_types(hf, n)
        if types is None:                    # transformers 4: one global layer in N
            every = hf.get("sliding_window_pattern") or 6
            types = [SLIDING if (i + 1) % every else FULL for i in range(n)]
        window = hf.get("sliding_window")
        if SLIDING in types and not window:
            raise ConvertError("config.json has sliding layers but no sliding_window.",
                               param="source")
        head_dim = hf.get("head_dim") or 256                    # transformers' default
        ctx = context_window(hf, 32768)
        fields = dict(
            hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_attention_heads=hf["num_attention_heads"], num_hidden_layers=n,
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=full.get("rope_theta", 1000000.0),
            rope_local_theta=local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)),
            rope_scaling_factor=float(full.get("factor", 1.0))
            if full["rope_type"] == "linear" else 1.0,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") or 256,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            hidden_activation=act, layer_types=types, tie_word_embeddings=True,
            context_window_size=ctx, prefill_chunk_size=min(2048, ctx),
            sliding_window_size=window if SLIDING in types else -1,
        )
        return build(cls, fields, overrides)


# ---------------------------------------------------------------------------------------------
# Names: Hugging Face (and GGUF) -> MLC. Quantized: every linear weight and the embedding.
# ---------------------------------------------------------------------------------------------
PREFIX = "language_model."       # MLC-LLM's Gemma 3 parameters all start with it
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def _plus_one(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] + np.asarray(1, arrays[0].dtype)       # Gemma's (1 + w) RMSNorm weight


def _concat_rows(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays, axis=0)


def param_mapping(config: Config) -> list[ParamMap]:
    """HF `Gemma3ForCausalLM` names -> MLC-LLM's Gemma 3 names (norm weights stored + 1)."""
    maps = [ParamMap(PREFIX + "model.embed_tokens.weight", ("model.embed_tokens.weight",),
                     quantize=True)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        maps += [ParamMap(f"{PREFIX}{p}.self_attn.{x}_proj.weight",
                          (f"{p}.self_attn.{x}_proj.weight",), quantize=True) for x in "qkvo"]
        maps += [ParamMap(f"{PREFIX}{p}.{n}.weight", (f"{p}.{n}.weight",), _plus_one)
                 for n in NORMS]
        maps += [
            ParamMap(f"{PREFIX}{p}.mlp.gate_up_proj.weight",
                     (f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"), _concat_rows,
                     quantize=True),
            ParamMap(f"{PREFIX}{p}.mlp.down_proj.weight", (f"{p}.mlp.down_proj.weight",),
                     quantize=True),
        ]
    maps.append(ParamMap(PREFIX + "model.norm.weight", ("model.norm.weight",), _plus_one))
    return maps


# llama.cpp's names. Its converter stores Gemma's norm weights as 1 + w (see `gguf_tensor`)
# and keeps HF's q/k row order.
GGUF_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_names(config: Config) -> dict[str, str]:
    """GGUF tensor name (without `.weight`) -> HF name (without it)."""
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
    for i in range(config.num_hidden_layers):
        for g, h in GGUF_LAYER.items():
            names[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
    return names


def gguf_tensor(hf_name: str, array: np.ndarray, config: Config) -> np.ndarray:
    """llama.cpp stores Gemma's norm weights as 1 + w; HF's convention is w."""
    return array - np.asarray(1, array.dtype) if hf_name.endswith("norm.weight") else array


def gguf_hf_config(cfg: dict[str, Any], meta) -> dict[str, Any]:
    """Gemma 3's own GGUF metadata -> HF config fields (llama.cpp writes the global RoPE
    theta as `rope.freq_base`, the sliding one, when it differs from 10k, as
    `rope.freq_base_swa`; the layer pattern as `attention.sliding_window_pattern`)."""
    cfg = dict(cfg)
    cfg["model_type"] = "gemma3_text"
    local = meta("rope.freq_base_swa")
    if local is not None:
        cfg["rope_local_base_freq"] = local
    pattern = meta("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == cfg.get("num_hidden_layers"):
        cfg["layer_types"] = [SLIDING if p else FULL for p in pattern]
    elif isinstance(pattern, int) and pattern > 0:
        cfg["sliding_window_pattern"] = pattern
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta(key) is not None:
            cfg[key] = meta(key)
    # llama.cpp scales scores by 1 / sqrt(head_dim), except for the 27B model (62 layers):
    # 1 / sqrt(hidden / heads). Both equal query_pre_attn_scalar in the released configs.
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"]
                                    if cfg.get("num_hidden_layers") == 62 else cfg["head_dim"])
    return cfg


# ---------------------------------------------------------------------------------------------
# The network. Everything below needs the TVM compiler (tvm.relax).
# ---------------------------------------------------------------------------------------------
from tvm.relax.frontend import nn  # noqa: E402
from tvm.relax.frontend.nn import Tensor, op  # noqa: E402

from mlc.models.common import CausalLMBase, RopeMode, apply_rope  # noqa: E402
from mlc.models.layers import make_embedding, make_linear  # noqa: E402


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the model dtype, as transformers computes Gemma's,
    returning `out_dtype` (default: the input's). The weight holds Gemma's 1 + w (added at
    conversion)."""

    def __init__(self, size: int, config: Config, quantization):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter((size,), quantization.model_dtype)

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        out_dtype = out_dtype or x.dtype
        x32 = x if x.dtype == "float32" else x.astype("float32")
        y = op.rms_norm(x32, self.weight.astype("float32"), axes=-1, epsilon=self.eps)
        return y if out_dtype == "float32" else y.astype(out_dtype)


class Attention(nn.Module):
    def __init__(self, config: Config, quantization, sliding: bool):
        super().__init__()
        self.num_q_heads = hq = config.num_attention_heads
        self.num_kv_heads = hkv = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.q_proj = make_linear(config.hidden_size, hq * d, quantization)
        self.k_proj = make_linear(config.hidden_size, hkv * d, quantization)
        self.v_proj = make_linear(config.hidden_size, hkv * d, quantization)
        self.o_proj = make_linear(hq * d, config.hidden_size, quantization)
        self.q_norm = RMSNorm(d, config, quantization)
        self.k_norm = RMSNorm(d, config, quantization)
        self.scale = config.query_pre_attn_scalar ** -0.5
        # each kind of layer rotates with its own theta (the KV cache does not rotate)
        self.theta = config.rope_local_theta if sliding else config.rope_theta
        self.position_scale = 1.0 if sliding else config.rope_scaling_factor

    def forward(self, x: Tensor, positions: Tensor, kv_cache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        hq, hkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(op.reshape(self.q_proj(x), (b, s, hq, d)))
        k = self.k_norm(op.reshape(self.k_proj(x), (b, s, hkv, d)))
        v = op.reshape(self.v_proj(x), (b, s, hkv, d))
        q = apply_rope(q, positions, self.theta, position_scale=self.position_scale)
        k = apply_rope(k, positions, self.theta, position_scale=self.position_scale)
        out = kv_cache.attention_with_fused_qkv(
            layer_id, op.concat([q, k, v], dim=2), hq, sm_scale=self.scale)
        return self.o_proj(op.reshape(out, (b, s, hq * d)))


class MLP(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.approximate = ACTIVATIONS[config.hidden_activation]
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size,
                                        quantization)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size,
                                     quantization)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(op.gelu(gate, approximate=self.approximate) * up)


class DecoderLayer(nn.Module):
    """The sandwich: norm, attention, norm, add; norm, MLP, norm, add. The residual stream x
    is float32 whatever the model dtype: Gemma 3's reaches ~1e5 (Gemma 3 270M, a short chat
    prompt), beyond float16 (q4f16_1 gave NaN). Attention and the MLP run in the model dtype
    on normalized inputs, and their outputs are normalized again before they are added."""

    def __init__(self, config: Config, quantization, sliding: bool):
        super().__init__()
        h = config.hidden_size
        self.dtype = quantization.model_dtype
        self.input_layernorm = RMSNorm(h, config, quantization)
        self.self_attn = Attention(config, quantization, sliding)
        self.post_attention_layernorm = RMSNorm(h, config, quantization)
        self.pre_feedforward_layernorm = RMSNorm(h, config, quantization)
        self.mlp = MLP(config, quantization)
        self.post_feedforward_layernorm = RMSNorm(h, config, quantization)

    def forward(self, x: Tensor, positions: Tensor, kv_cache, layer_id: int) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x, self.dtype), positions, kv_cache,
                              layer_id)
        x = x + self.post_attention_layernorm(attn, "float32")
        mlp = self.mlp(self.pre_feedforward_layernorm(x, self.dtype))
        return x + self.post_feedforward_layernorm(mlp, "float32")


class TextModel(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.dtype = quantization.model_dtype
        self.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, quantization)
        self.layers = nn.ModuleList([DecoderLayer(config, quantization, k == "mha_sliding")
                                     for k in config.attention_kinds()])
        self.norm = RMSNorm(config.hidden_size, config, quantization)

    def forward(self, x: Tensor, kv_cache) -> Tensor:
        b, s, _ = x.shape
        positions = kv_cache.get_query_positions(b * s)   # each token's place in its sequence
        if x.dtype != "float32":
            x = x.astype("float32")                        # the residual stream: float32
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, positions, kv_cache, layer_id)
        return self.norm(x, self.dtype)


class LanguageModel(nn.Module):
    def __init__(self, config: Config, quantization):
        super().__init__()
        self.model = TextModel(config, quantization)


class ForCausalLM(CausalLMBase):
    """Gemma 3 with the library contract of `CausalLMBase` (embed, prefill, decode, ...)."""

    def __init__(self, config: Config, quantization):
        if config.tensor_parallel_shards != 1:
            raise CompileError("Gemma 3 has no tensor-parallel build yet; use "
                               "tensor_parallel_shards=1.", param="tensor_parallel_shards")
        super().__init__(config, quantization)
        self.language_model = LanguageModel(config, quantization)

    def embed(self, input_ids: Tensor) -> Tensor:
        # transformers scales in the weights' dtype: sqrt(hidden) rounded to it
        scale = float(np.asarray(self.config.hidden_size ** 0.5, self.dtype))
        return self.language_model.model.embed_tokens(input_ids) * scale

    def body(self, input_embeds: Tensor, kv_cache) -> Tensor:
        return self.language_model.model(input_embeds, kv_cache)

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.language_model.model.embed_tokens.lm_head(hidden, "float32")
        cap = self.config.final_logit_softcapping
        if cap:
            logits = op.tanh(logits / cap) * cap
        return logits

    def kv_cache_layout(self) -> dict:
        c = self.config
        return dict(num_q_heads=c.num_attention_heads,
                    num_kv_heads=c.num_key_value_heads,
                    head_dim=c.head_dim,
                    attention_kinds=c.attention_kinds(),
                    sliding_window=c.sliding_window_size,
                    rope_mode=RopeMode.NONE)
