"""The model registry: `model_type` -> config class, module and HF -> MLC parameter mapping.

Adding an architecture is one new file under `mlc/models/` plus one entry here. Modules are
imported lazily so that the runtime never loads the TVM compiler through them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from mlc.errors import ConvertError


@dataclass(frozen=True)
class ParamMap:
    """One MLC parameter made from one or more source (HF-named) tensors.

    `combine` joins the source arrays (e.g. concatenating q, k, v rows); `quantize` says whether
    group quantization applies to it (linear weights and the embedding).
    """

    mlc_name: str
    source_names: tuple[str, ...]
    combine: Callable[[list[Any]], Any] | None = None
    quantize: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one architecture.

    `module` holds the config dataclass (`Config`, a `ModelConfig`) and the nn.Module
    (`ForCausalLM`); `loader` (default: `module`) the name mapping: `param_mapping(config)`
    and, for GGUF input, `gguf_names(config)` plus optionally `gguf_tensor(hf_name, array,
    config)` (llama.cpp's layout -> HF's, e.g. Llama's q/k row permutation) and
    `gguf_hf_config(cfg, meta)` (architecture metadata -> HF config fields); for tensor
    parallelism `shard_specs(config)`. A module may also set `DEFAULT_CHAT_TEMPLATE` (used
    when a source carries none) and `EXTRA_EOS_TOKENS` (token strings that also end a turn).
    """

    model_type: str
    module: str
    loader: str | None = None
    gguf_archs: tuple[str, ...] = ()   # llama.cpp's `general.architecture` names
    config_class: str = "Config"
    model_class: str = "ForCausalLM"

    def _mod(self):
        return importlib.import_module(self.module)

    def _loader(self):
        return importlib.import_module(self.loader or self.module)

    def config_from_hf(self, hf_config: dict[str, Any], **overrides: Any):
        """The architecture config dataclass from an HF config.json dict."""
        return getattr(self._mod(), self.config_class).from_hf(hf_config, **overrides)

    def config_from_dict(self, data: dict[str, Any]):
        """The architecture config dataclass from its own saved dict (mlc-chat-config.json)."""
        return getattr(self._mod(), self.config_class).from_dict(data)

    def param_mapping(self, config) -> list[ParamMap]:
        """The HF -> MLC parameter mapping for this config."""
        return self._loader().param_mapping(config)

    def gguf_names(self, config) -> dict[str, str]:
        """GGUF tensor name (without `.weight`/`.bias`) -> HF name, for this config."""
        loader = self._loader()
        if not self.gguf_archs or not hasattr(loader, "gguf_names"):
            raise ConvertError(f"model_type={self.model_type} cannot be read from GGUF yet; "
                               "convert its Hugging Face checkpoint instead.", param="source")
        return loader.gguf_names(config)

    def gguf_tensor(self, hf_name: str, array, config):
        """A GGUF tensor (already renamed to `hf_name`) in HF's layout and convention."""
        fix = getattr(self._loader(), "gguf_tensor", None)
        return fix(hf_name, array, config) if fix else array

    def gguf_hf_config(self, cfg: dict[str, Any], meta: Callable[[str], Any]) -> dict[str, Any]:
        """Architecture-specific HF config fields from GGUF metadata (`meta(key)` reads
        `<arch>.<key>`), on top of the fields every architecture shares."""
        hook = getattr(self._loader(), "gguf_hf_config", None)
        return hook(cfg, meta) if hook else cfg

    def shard_specs(self, config):
        """mlc name -> ShardSpec for tensor parallelism, or None when unsupported."""
        fn = getattr(self._loader(), "shard_specs", None)
        return fn(config) if fn else None

    def default_chat_template(self) -> str | None:
        """The chat template to use when the source carries none."""
        return getattr(self._mod(), "DEFAULT_CHAT_TEMPLATE", None)

    def extra_eos_tokens(self) -> tuple[str, ...]:
        """Token strings (besides the tokenizer's eos) that end a turn."""
        return tuple(getattr(self._mod(), "EXTRA_EOS_TOKENS", ()))

    def build(self, config, quantization):
        """The nn.Module for this config, quantized as asked."""
        return getattr(self._mod(), self.model_class)(config, quantization)


MODELS: dict[str, ModelInfo] = {
    # Llama 2/3/3.1, SmolLM2, TinyLlama and Mistral share one architecture file.
    "llama": ModelInfo("llama", "mlc.models.llama", "mlc.models.llama_loader", ("llama",)),
    "mistral": ModelInfo("mistral", "mlc.models.llama", "mlc.models.llama_loader",
                         ("mistral",)),
    "phi": ModelInfo("phi", "mlc.models.phi"),                          # Phi-1, 1.5, 2
    "qwen2": ModelInfo("qwen2", "mlc.models.qwen2", gguf_archs=("qwen2",)),  # Qwen2, 2.5
    "qwen3": ModelInfo("qwen3", "mlc.models.qwen3", gguf_archs=("qwen3",)),
    "gemma3_text": ModelInfo("gemma3_text", "mlc.models.gemma3", gguf_archs=("gemma3",)),
    # An EAGLE-1/2 draft head for speculative decoding (its config.json says "llama").
    "eagle": ModelInfo("eagle", "mlc.models.eagle", model_class="EagleHead"),
}


# Architectures users bring that mlc does not run, and what to do instead.
NOT_SUPPORTED = {
    "gemma3": "multimodal Gemma 3 (4B, 12B, 27B: vision + text) is not supported; mlc runs "
              "the text-only gemma3_text checkpoints (270M, 1B)",
    "phi3": "Phi-3 is not supported yet (phi runs Phi-1, 1.5 and 2)",
}


def model_type_of(hf_config: dict[str, Any], tensor_names: list[str]) -> str | None:
    """The registry's model_type for a Hugging Face checkpoint: its config's, except for an
    EAGLE draft head, whose config says "llama" but whose weights are a head's (`fc.*` and
    top-level `layers.*`, no `model.` prefix)."""
    if not any(n.startswith("model.") for n in tensor_names) and \
            any(n.startswith(("fc.", "layers.")) for n in tensor_names):
        return "eagle"
    return hf_config.get("model_type")


def get_model(model_type: str) -> ModelInfo:
    """Look up an architecture, or raise an error listing the supported ones."""
    try:
        return MODELS[model_type]
    except KeyError:
        hint = f"{NOT_SUPPORTED[model_type]}. " if model_type in NOT_SUPPORTED else ""
        raise ConvertError(
            f"Unsupported architecture model_type={model_type!r}: {hint}"
            f"Supported: {', '.join(sorted(MODELS))}.", param="model_type") from None


def model_for_gguf(arch: str) -> ModelInfo:
    """The architecture of a GGUF file's `general.architecture`, or an error listing those
    mlc reads from GGUF."""
    for info in MODELS.values():
        if arch in info.gguf_archs:
            return info
    known = sorted(a for info in MODELS.values() for a in info.gguf_archs)
    raise ConvertError(f"GGUF architecture {arch!r} is not supported; mlc reads GGUF files of "
                       f"{', '.join(known)}.", param="source")
