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
    """What the registry knows about one architecture."""

    model_type: str
    module: str                 # python module with the config dataclass and the nn.Module
    loader: str                 # python module with the HF -> MLC parameter mapping
    config_class: str = "Config"
    model_class: str = "ForCausalLM"

    def _mod(self):
        return importlib.import_module(self.module)

    def config_from_hf(self, hf_config: dict[str, Any], **overrides: Any):
        """The architecture config dataclass from an HF config.json dict."""
        return getattr(self._mod(), self.config_class).from_hf(hf_config, **overrides)

    def config_from_dict(self, data: dict[str, Any]):
        """The architecture config dataclass from its own saved dict (mlc-chat-config.json)."""
        return getattr(self._mod(), self.config_class).from_dict(data)

    def param_mapping(self, config) -> list[ParamMap]:
        """The HF -> MLC parameter mapping for this config."""
        return importlib.import_module(self.loader).param_mapping(config)

    def gguf_names(self, config) -> dict[str, str]:
        """GGUF tensor name -> HF tensor name for this config."""
        return importlib.import_module(self.loader).gguf_names(config)

    def build(self, config, quantization):
        """The nn.Module for this config, quantized as asked."""
        return getattr(self._mod(), self.model_class)(config, quantization)


MODELS: dict[str, ModelInfo] = {
    # Llama 2/3/3.1, SmolLM2, TinyLlama and Mistral share one architecture file.
    "llama": ModelInfo("llama", "mlc.models.llama", "mlc.models.llama_loader"),
    "mistral": ModelInfo("mistral", "mlc.models.llama", "mlc.models.llama_loader"),
}


def get_model(model_type: str) -> ModelInfo:
    """Look up an architecture, or raise an error listing the supported ones."""
    try:
        return MODELS[model_type]
    except KeyError:
        raise ConvertError(
            f"Unsupported architecture model_type={model_type!r}. "
            f"Supported: {', '.join(sorted(MODELS))}.", param="model_type") from None
