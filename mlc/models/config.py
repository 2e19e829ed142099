"""What every architecture's config has, and the helpers that read it from HF config.json.

An architecture's `Config` subclasses `ModelConfig`, adds its own fields (all with defaults)
and writes `from_hf`. The compiler, the converter and the runtime read only the fields
defined here, never an architecture's own names.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from mlc.errors import ConvertError

logger = logging.getLogger(__name__)

SLIDING = "sliding_attention"     # HF's `layer_types` names
FULL = "full_attention"


@dataclass
class ModelConfig:
    """The fields every architecture resolves (HF names where HF has them)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    context_window_size: int = 4096
    prefill_chunk_size: int = 2048
    sliding_window_size: int = -1        # the window of the sliding layers; -1: none
    max_batch_size: int = 64
    tensor_parallel_shards: int = 1

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConvertError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}.")
        if self.sliding_window_size > 0 and any(k == "mha_sliding"
                                                for k in self.attention_kinds()):
            # A chunk must fit in the window: attention within a chunk (the ragged kernel)
            # applies no window. One below it keeps every query seeing at least one cached
            # key, a case TVM 0.27's GPU sliding-window kernel gets wrong.
            self.prefill_chunk_size = min(self.prefill_chunk_size, self.sliding_window_size - 1)

    def attention_kinds(self) -> list[str]:
        """Per layer, the KV cache's attention kind: "mha" or "mha_sliding" (all layers slide
        when there is a window, unless an architecture says otherwise)."""
        kind = "mha_sliding" if self.sliding_window_size > 0 else "mha"
        return [kind] * self.num_hidden_layers

    def activation_bytes_per_token(self) -> int:
        """Elements live per prefill token at the widest point (qkv, the MLP, residuals): a
        planning estimate. Architectures with other shapes override it."""
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        return qkv + 3 * self.intermediate_size + 4 * self.hidden_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """From its own saved dict (mlc-chat-config.json's model_config); unknown keys ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ HF helpers


def require(hf: dict[str, Any], keys: list[str], arch: str) -> None:
    """Raise ConvertError naming the HF fields `arch` needs that config.json lacks."""
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConvertError(f"config.json lacks the {arch} fields {missing}; a {arch} "
                           "checkpoint's config.json has them (re-download or fix it).",
                           param="source")


def context_window(hf: dict[str, Any], default: int = 4096) -> int:
    """max_position_embeddings (or an older alias), logging the fallback used."""
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if hf.get(key):
            if key != "max_position_embeddings":
                logger.info("config.json has no max_position_embeddings; using %s=%d", key,
                            hf[key])
            return int(hf[key])
    logger.info("config.json gives no context length; using %d", default)
    return default


def rope_params(hf: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE parameters: transformers >= 5 writes `rope_parameters` ({rope_theta,
    rope_type, ...}, per layer type for models with several), older configs `rope_theta` and
    `rope_scaling`. Returns {"rope_theta": ..., "rope_type": ..., other scaling fields}."""
    params = hf.get("rope_parameters") or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif layer_type is not None and any(isinstance(v, dict) for v in params.values()):
        params = {}
    out = {k: v for k, v in params.items() if not isinstance(v, dict)}
    legacy = hf.get("rope_scaling") if layer_type in (None, FULL) else None
    if isinstance(legacy, dict):
        out.update({k: v for k, v in legacy.items() if k != "type"})
        out.setdefault("rope_type", legacy.get("type"))
    if "rope_theta" not in out and hf.get("rope_theta") is not None and layer_type != SLIDING:
        out["rope_theta"] = hf["rope_theta"]
    out["rope_type"] = out.get("rope_type") or "default"
    return out


# RoPE variants mlc lets TVM 0.27's KV cache compute (`switch_rope_freq_func`), those tested
# against transformers. The cache also has yarn and longrope, untested here (longrope needs
# extension factors mlc does not pass).
KV_CACHE_ROPE_TYPES = ("default", "llama3")


def rope_scaling_of(params: dict[str, Any], arch: str = "this architecture") -> dict | None:
    """The scaling part of `rope_params` (None for plain RoPE), as TVM's KV cache takes it;
    a variant the cache cannot compute is a ConvertError naming those it can."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in KV_CACHE_ROPE_TYPES:
        raise ConvertError(f"{arch} with rope_type={rope_type!r} is not supported; the KV "
                           f"cache computes {', '.join(KV_CACHE_ROPE_TYPES)}.", param="source")
    if rope_type == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def layer_types(hf: dict[str, Any], num_layers: int) -> list[str] | None:
    """HF's per-layer `layer_types` ("full_attention" / "sliding_attention"), checked."""
    types = hf.get("layer_types")
    if types is None:
        return None
    if len(types) != num_layers or any(t not in (FULL, SLIDING) for t in types):
        raise ConvertError(f"config.json's layer_types {types!r} is not one of "
                           f"{FULL!r}/{SLIDING!r} per layer for {num_layers} layers.",
                           param="source")
    return list(types)


def build(cls, fields: dict[str, Any], overrides: dict[str, Any]):
    """`cls(**fields)` after applying `overrides` (unknown override keys are an error)."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in overrides.items():
        if key not in known:
            raise ConvertError(f"Unknown override {key!r}; valid: {sorted(known)}.",
                               param="overrides")
        if value is not None:
            fields[key] = value
    return cls(**fields)
