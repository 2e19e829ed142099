"""Group quantization (q4f16_1 / q4f32_1) against hand-worked values and MLC-LLM's rules."""

from __future__ import annotations

import numpy as np
import pytest

from mlc.compiler.quantization import (
    QUANTIZATIONS,
    dequantize_weight,
    get_quantization,
    group_quant,
    quantize_weight,
    quantized_param_names,
)
from mlc.errors import ConvertError

Q4F16 = get_quantization("q4f16_1")
Q4F32 = get_quantization("q4f32_1")


def _unpack(q_weight: np.ndarray) -> np.ndarray:
    """uint32 words -> their eight 4-bit values, lowest nibble first (by hand, not the lib)."""
    out = np.zeros((*q_weight.shape[:-1], q_weight.shape[-1] * 8), dtype=np.int64)
    for j in range(8):
        out[..., j::8] = (q_weight.astype(np.int64) >> (4 * j)) & 0xF
    return out


def _bound(w: np.ndarray, scale: np.ndarray, q) -> np.ndarray:
    """Per-element error bound: half a step, plus the model dtype's own rounding."""
    eps = np.finfo(np.dtype(q.model_dtype)).eps
    step = np.repeat(scale.astype(np.float64), q.group_size, axis=-1)[..., : w.shape[-1]]
    return step * (0.5 + 8 * eps) + np.abs(w) * 2 * eps


def test_registry_and_names():
    assert set(QUANTIZATIONS) == {"q0f32", "q0f16", "q4f16_1", "q4f32_1"}
    assert Q4F16.kind == "group-quant" and Q4F16.model_dtype == "float16"
    assert (Q4F16.bits, Q4F16.group_size, Q4F16.storage) == (4, 32, "uint32")
    assert get_quantization("q0f16").kind == "no-quant"
    assert quantized_param_names("model.layers.0.mlp.down_proj.weight") == (
        "model.layers.0.mlp.down_proj.q_weight", "model.layers.0.mlp.down_proj.q_scale")


def test_unknown_quantization_lists_valid_names():
    with pytest.raises(ConvertError) as e:
        get_quantization("q3f99")
    for name in QUANTIZATIONS:
        assert name in str(e.value)


def test_packing_order_by_hand():
    # One group whose max |w| is 7, so scale = 1 and stored = w + 7 exactly.
    w = np.array([[-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 0] * 2],
                 dtype=np.float32)
    q_weight, q_scale = quantize_weight(w, Q4F16)
    assert q_weight.shape == (1, 4) and q_weight.dtype == np.uint32
    assert q_scale.shape == (1, 1) and q_scale.dtype == np.float16 and q_scale[0, 0] == 1.0
    stored = (w[0] + 7).astype(np.uint32)
    # first element in the lowest nibble: word 0 = 0x76543210 for stored 0..7
    assert q_weight[0, 0] == 0x76543210
    for word in range(4):
        expect = sum(int(stored[word * 8 + j]) << (4 * j) for j in range(8))
        assert int(q_weight[0, word]) == expect
    np.testing.assert_array_equal(dequantize_weight(q_weight, q_scale, Q4F16), w)


@pytest.mark.parametrize("q", [Q4F16, Q4F32], ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(8, 32), (16, 256), (3, 5, 64), (300, 64)])
def test_round_trip_error_within_half_step(q, shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    q_weight, q_scale = quantize_weight(w, q)
    assert q_weight.shape == (*shape[:-1], shape[-1] // 8)
    assert q_scale.shape == (*shape[:-1], shape[-1] // 32)
    assert q_scale.dtype == np.dtype(q.model_dtype)
    w_model = w.astype(q.model_dtype).astype(np.float64)
    deq = dequantize_weight(q_weight, q_scale, q, shape[-1]).astype(np.float64)
    assert np.all(np.abs(deq - w_model) <= _bound(w_model, q_scale, q))
    # scale = max|w| / 7 per group, in the model dtype
    groups = w.astype(q.model_dtype).reshape(*shape[:-1], -1, 32)
    expect = (np.abs(groups).max(-1) / np.dtype(q.model_dtype).type(7)).astype(q.model_dtype)
    np.testing.assert_array_equal(q_scale, expect)


def test_random_inputs_never_quantize_to_zeros():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    q_weight, q_scale = quantize_weight(w, Q4F16)
    vals = _unpack(q_weight).reshape(64, 4, 32)
    assert np.all(q_scale > 0) and np.any(q_weight != 0)
    assert vals.min() >= 0 and vals.max() <= 14
    # the element with the largest |w| of each group lands exactly on 0 or 14
    assert np.all((vals == 0).any(-1) | (vals == 14).any(-1))
    assert np.abs(dequantize_weight(q_weight, q_scale, Q4F16)).max() > 0


def test_zero_group_stores_zero_like_mlc():
    # MLC-LLM computes 0 / 0 = NaN for an all-zero group, which its clamp turns into 0.
    w = np.zeros((2, 64), dtype=np.float32)
    w[1, 32:] = np.linspace(-1, 1, 32)
    q_weight, q_scale = quantize_weight(w, Q4F16)
    assert q_scale[0].tolist() == [0, 0] and q_scale[1, 0] == 0 and q_scale[1, 1] > 0
    vals = _unpack(q_weight)
    assert np.all(vals[0] == 0) and np.all(vals[1, :32] == 0)
    deq = dequantize_weight(q_weight, q_scale, Q4F16)
    assert np.all(deq[0] == 0) and np.all(deq[1, :32] == 0)


def test_input_dim_not_multiple_of_group_is_padded():
    # MLC-LLM: ceil(k / 32) groups; the padding is ignored by the max and packed as 0.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 70)).astype(np.float32)
    w[:, 64:] *= 0.01                                   # a last group of small values
    q_weight, q_scale = quantize_weight(w, Q4F16)
    assert q_weight.shape == (4, 12) and q_scale.shape == (4, 3)
    expect_last = (np.abs(w[:, 64:].astype(np.float16)).max(-1) / np.float16(7))
    np.testing.assert_array_equal(q_scale[:, 2], expect_last.astype(np.float16))
    assert np.all(_unpack(q_weight)[:, 70:] == 0)
    deq = dequantize_weight(q_weight, q_scale, Q4F16, in_features=70)
    assert deq.shape == (4, 70)
    w16 = w.astype(np.float16).astype(np.float64)
    assert np.all(np.abs(deq - w16) <= _bound(w16, q_scale, Q4F16))


def test_float16_arithmetic_and_half_even_rounding_match_tvm():
    # scale = 14 / 7 = 2. w / 2 = -0.49951171875 exactly; + 7 rounds in float16 to 6.5, and
    # round-half-to-even gives 6 (float64 arithmetic would give 7). Checked against a TVM
    # (llvm) kernel doing MLC-LLM's float16 expression.
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, :3] = [14.0, -0.9990234375, 0.9990234375]
    q_weight, q_scale = quantize_weight(w, Q4F16)
    assert q_scale[0, 0] == 2.0
    assert _unpack(q_weight)[0, :3].tolist() == [14, 6, 8]


def test_blocked_rows_equal_one_block(monkeypatch):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 96)).astype(np.float32)
    whole = quantize_weight(w, Q4F16)
    monkeypatch.setattr(group_quant, "_BLOCK_ELEMS", 96 * 5)      # 5 rows per block
    blocked = quantize_weight(w, Q4F16)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])
