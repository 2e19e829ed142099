"""Group quantization in numpy, bit-exact with MLC-LLM's `q4f16_1` / `q4f32_1`.

For a weight [*lead, k] (k = the input dimension, the last axis):
  - groups of `group_size` (32) along k; the last group is padded when k is not a multiple
    (num_groups = ceil(k / 32)), the padding ignored by the max and stored as 0;
  - scale = max|w| / 7, computed in the model dtype;
  - stored = clamp(round(w / scale + 7), 0, 14), with every step in the model dtype (float16
    arithmetic rounds w / scale and the + 7) and round-half-to-even, as TVM's `round` is on CPU;
  - eight 4-bit values per uint32, the first element in the lowest nibble:
    q_weight uint32 [*lead, num_groups * 4], q_scale [*lead, num_groups] in the model dtype.
A group of zeros has scale 0; MLC-LLM's 0 / 0 = NaN then clamps to 0 (so dequantized 0 too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mlc.compiler.quantization import Quantization

# Rows are quantized in blocks of about this many elements: the float temporaries stay small
# (a few times the block) whatever the size of the weight.
_BLOCK_ELEMS = 1 << 22


def quantized_param_names(name: str) -> tuple[str, str]:
    """`X.weight` -> (`X.q_weight`, `X.q_scale`), MLC-LLM's parameter names."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return f"{base}.q_weight", f"{base}.q_scale"


def quantize_weight(w: np.ndarray, q: Quantization) -> tuple[np.ndarray, np.ndarray]:
    """Group-quantize `w` [*lead, k] along its last axis; return (q_weight, q_scale)."""
    dtype = np.dtype(q.model_dtype)
    w = np.asarray(w)
    *lead, k = w.shape
    rows = int(np.prod(lead, dtype=np.int64))
    gs, per = q.group_size, q.elems_per_storage
    groups = -(-k // gs)
    w2 = w.reshape(rows, k)
    q_weight = np.empty((rows, groups * gs // per), dtype=np.uint32)
    q_scale = np.empty((rows, groups), dtype=dtype)
    block = max(1, _BLOCK_ELEMS // max(k, 1))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        q_weight[r0:r1], q_scale[r0:r1] = _quantize_rows(w2[r0:r1], q, dtype, groups)
    return q_weight.reshape(*lead, -1), q_scale.reshape(*lead, groups)


def _quantize_rows(w: np.ndarray, q: Quantization, dtype: np.dtype, groups: int):
    rows, k = w.shape
    gs, max_int = q.group_size, dtype.type(q.max_int)
    w = w.astype(dtype, copy=False)              # MLC casts the model to its dtype first
    if groups * gs != k:
        w = np.pad(w, ((0, 0), (0, groups * gs - k)))  # zeros never raise a group's max|w|
    g = w.reshape(rows, groups, gs)
    scale = (np.abs(g).max(axis=-1) / max_int).astype(dtype)          # [rows, groups]
    # The arithmetic runs in float32, rounding to the model dtype after each step as MLC-LLM's
    # float16 kernel does (for float16 operands one float32 operation then one rounding is
    # exactly float16 arithmetic), which is much faster than numpy's float16 loops.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = (g.astype(np.float32) / scale.astype(np.float32)[..., None]).astype(dtype)
        x = np.rint((x.astype(np.float32) + np.float32(q.max_int)).astype(dtype))
    # max(x, 0) then min(x, 14) as TVM lowers them (a select): NaN (0 / 0) becomes 0.
    x = np.where(x > 0, x, 0)
    x = np.where(x < 2 * max_int, x, 2 * max_int)
    vals = x.astype(np.uint32).reshape(rows, groups * gs)
    if groups * gs != k:
        vals[:, k:] = 0                          # MLC-LLM packs zeros past the input dim
    vals = vals.reshape(rows, -1, q.elems_per_storage)
    shifts = (np.arange(q.elems_per_storage, dtype=np.uint32) * q.bits)
    packed = np.bitwise_or.reduce(vals << shifts, axis=-1).astype(np.uint32)
    return packed, scale


def dequantize_weight(q_weight: np.ndarray, q_scale: np.ndarray, q: Quantization,
                      in_features: int | None = None) -> np.ndarray:
    """Unpack and rescale: (stored - 7) * scale in the model dtype, cut to `in_features`."""
    dtype = np.dtype(q.model_dtype)
    *lead, n_storage = q_weight.shape
    per, gs = q.elems_per_storage, q.group_size
    shifts = np.arange(per, dtype=np.uint32) * q.bits
    mask = np.uint32((1 << q.bits) - 1)
    vals = ((q_weight[..., None] >> shifts) & mask).astype(np.int8)  # [*lead, n_storage, per]
    vals = vals.reshape(*lead, n_storage * per) - np.int8(q.max_int)
    scale = np.repeat(q_scale.astype(np.float32), gs, axis=-1)[..., : n_storage * per]
    # (stored - 7) * scale: a small int times a float16 is exact in float32, so one rounding
    # to the model dtype gives the float16 product.
    out = (vals * scale).astype(dtype)
    return out if in_features is None else out[..., :in_features]
