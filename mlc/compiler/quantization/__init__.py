"""Quantization schemes by name (MLC-LLM's names and rules).

A scheme says the dtype the model runs in and, for group quantization, how linear and
embedding weights are packed. Models only declare which parameters may be quantized
(`ParamMap.quantize`); the scheme decides how.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlc.compiler.quantization.group_quant import (
    dequantize_weight,
    quantize_weight,
    quantized_param_names,
)
from mlc.errors import ConvertError


@dataclass(frozen=True)
class Quantization:
    """One named quantization scheme.

    kind: "no-quant" (weights in `model_dtype`) or "group-quant" (`bits`-bit integers packed
    into `storage` words, one `model_dtype` scale per `group_size` inputs).
    """

    name: str
    kind: str
    model_dtype: str
    bits: int = 4
    group_size: int = 32
    storage: str = "uint32"

    @property
    def elems_per_storage(self) -> int:
        """How many quantized values one storage word holds (8 for 4-bit in uint32)."""
        return 32 // self.bits

    @property
    def max_int(self) -> int:
        """The largest signed value (7 for 4 bits); stored values are offset by it."""
        return 2 ** (self.bits - 1) - 1

    @property
    def is_quantized(self) -> bool:
        return self.kind == "group-quant"


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q for q in (
        Quantization("q0f32", "no-quant", "float32"),
        Quantization("q0f16", "no-quant", "float16"),
        Quantization("q4f16_1", "group-quant", "float16"),
        Quantization("q4f32_1", "group-quant", "float32"),
    )
}


def get_quantization(name: str) -> Quantization:
    """Look up a scheme by name, or raise ConvertError listing the valid names."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ConvertError(
            f"Unknown quantization {name!r}. Valid: {', '.join(QUANTIZATIONS)}.",
            param="quantization") from None

__all__ = ["Quantization", "QUANTIZATIONS", "get_quantization", "quantize_weight",
           "dequantize_weight", "quantized_param_names"]
