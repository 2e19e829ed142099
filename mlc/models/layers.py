"""The linear and embedding layers every model file builds, plain or group-quantized.

A model asks `make_linear` / `make_embedding` for a layer and the quantization scheme decides
which: `Linear`/`Embedding` (weights in the model dtype) or `GroupQuantLinear`/
`GroupQuantEmbedding`, whose parameters carry MLC-LLM's names (`q_weight`, `q_scale`; a bias
stays unquantized as `bias`). Dequantization and the matmul are ONE tensor-expression compute,
so a single kernel reads each 4-bit weight once (stock TVM does not fuse a separate dequantize
op into a matmul).

On CUDA, float16 linears can call mlc's own kernels (`mlc.cuda.*`, linked into the library
by the compiler). Only the compiler knows whether it can build them: it says so with
`extern_cuda_kernels(kernel_function)` around the export, and this module never imports the compiler.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

GROUP_SIZE = 32
ELEMS_PER_WORD = 8  # eight 4-bit values in one uint32, first in the lowest nibble


def _dequant(q_weight, q_scale, row, col, dtype):
    """The float value of element (row, col) of a q4 group-quantized [out, in] weight."""
    word = q_weight[row, col // ELEMS_PER_WORD]
    shift = ((col % ELEMS_PER_WORD) * 4).astype("uint32")
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(15, "uint32"))
    return (nibble.astype(dtype) - tirx.const(7, dtype)) * q_scale[row, col // GROUP_SIZE]


def _q4_matmul_nt(x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor, in_features: int,
                  out_dtype: str) -> te.Tensor:
    """y[..., n] = sum_k x[..., k] * W[n, k], W dequantized on the fly, accumulated in float32."""
    out_features = q_weight.shape[0]
    k = te.reduce_axis((0, in_features), name="k")
    lead = list(x.shape[:-1])

    def body(*idx):
        *batch, n = idx
        w = _dequant(q_weight, q_scale, n, k, q_scale.dtype)
        return te.sum(x[(*batch, k)].astype("float32") * w.astype("float32"), axis=k)

    acc = te.compute((*lead, out_features), body, name="q4_matmul")
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(out_dtype), name="q4_matmul_cast")


def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """y + bias, the bias cast to y's dtype (float32 logits get a float32 bias)."""
    if bias is None:
        return y
    return op.add(y, bias if bias.dtype == y.dtype else bias.astype(y.dtype))


class GroupQuantLinear(nn.Module):
    """`y = x W^T (+ b)` with W stored as q4 groups of 32 along the input dimension."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        words = (in_features + ELEMS_PER_WORD - 1) // ELEMS_PER_WORD
        groups = (in_features + GROUP_SIZE - 1) // GROUP_SIZE
        self.q_weight = nn.Parameter((out_features, words), "uint32")
        self.q_scale = nn.Parameter((out_features, groups), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        y = q4_linear(x, self.q_weight, self.q_scale, self.in_features, out_dtype or x.dtype)
        return _add_bias(y, self.bias)


# The global-function name of each of mlc's CUDA kernels linked into the library being
# exported (short name -> full name), or None when they are not linked in.
_EXTERN_CUDA: contextvars.ContextVar = contextvars.ContextVar("mlc_extern_cuda_kernels",
                                                              default=None)


@contextlib.contextmanager
def extern_cuda_kernels(kernel_name: Callable[[str], str] | None):
    """While the compiler exports a model: how to name mlc's CUDA kernels (the compiler's
    `cuda_support.kernel_function`), or None when they are not linked in."""
    token = _EXTERN_CUDA.set(kernel_name)
    try:
        yield
    finally:
        _EXTERN_CUDA.reset(token)


def _use_mlc_cuda_kernels(x: Tensor) -> bool:
    """On CUDA, float16 linears call mlc's kernels (fused q4 GEMV / cuBLAS) when built in."""
    from tvm.target import Target

    target = Target.current(allow_none=True)
    return (target is not None and target.kind.name == "cuda" and x.dtype == "float16"
            and _EXTERN_CUDA.get() is not None)


def _extern_linear(func: str, x: Tensor, weights: list[Tensor], out_features: int,
                   out_dtype: str) -> Tensor:
    """y = x W^T through mlc's CUDA kernel `func` on [rows, K] views of x and y."""
    kernel_function = _EXTERN_CUDA.get()
    *lead, k = x.shape
    rows = 1
    for d in lead:
        rows = rows * d
    x2 = op.reshape(x, (rows, k))
    out_dtype = "float32" if out_dtype == "float32" else "float16"
    y = Tensor(_expr=rx.BlockBuilder.current().emit(rx.call_dps_packed(
        kernel_function(func), [x2._expr, *[w._expr for w in weights]],
        out_ty=rx.TensorType((rows, out_features), out_dtype))))
    return op.reshape(y, (*lead, out_features))


def q4_linear(x: Tensor, q_weight: Tensor, q_scale: Tensor, in_features: int,
              out_dtype: str) -> Tensor:
    """The fused dequantize-matmul as one Relax op (also used for tied lm_heads)."""
    if _use_mlc_cuda_kernels(x) and in_features % GROUP_SIZE == 0:
        return _extern_linear("q4_matmul", x, [q_weight, q_scale],
                              q_weight.shape[0], out_dtype)
    return op.tensor_expr_op(
        lambda a, w, s: _q4_matmul_nt(a, w, s, in_features, out_dtype),
        "q4_matmul", [x, q_weight, q_scale])


class GroupQuantEmbedding(nn.Module):
    """An embedding table stored as q4 groups; rows are dequantized as they are gathered."""

    def __init__(self, num: int, dim: int, dtype: str):
        super().__init__()
        self.num, self.dim, self.dtype = num, dim, dtype
        self.q_weight = nn.Parameter((num, (dim + ELEMS_PER_WORD - 1) // ELEMS_PER_WORD),
                                     "uint32")
        self.q_scale = nn.Parameter((num, (dim + GROUP_SIZE - 1) // GROUP_SIZE), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        def gather(qw, qs, idx):
            return te.compute((*idx.shape, self.dim),
                              lambda *i: _dequant(qw, qs, idx[i[:-1]], i[-1], self.dtype),
                              name="q4_embedding")
        return op.tensor_expr_op(gather, "q4_embedding", [self.q_weight, self.q_scale, ids])

    def lm_head(self, x: Tensor, out_dtype: str = "float32") -> Tensor:
        """Tied output projection: logits = x E^T."""
        return q4_linear(x, self.q_weight, self.q_scale, self.dim, out_dtype)


class Linear(nn.Module):
    """Unquantized `y = x W^T (+ b)`, accumulating in float32 (float16 sums drift, see
    TVM-NOTES)."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        out_dtype = out_dtype or x.dtype
        if _use_mlc_cuda_kernels(x):
            y = _extern_linear("f16_matmul", x, [self.weight], self.out_features,
                               out_dtype)
            return _add_bias(y, self.bias)
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        y = _add_bias(y, self.bias)                 # in float32, before the cast
        return y if out_dtype == "float32" else y.astype(out_dtype)


class Embedding(nn.Module):
    """Unquantized embedding table with a tied-output helper."""

    def __init__(self, num: int, dim: int, dtype: str):
        super().__init__()
        self.num, self.dim, self.dtype = num, dim, dtype
        self.weight = nn.Parameter((num, dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return op.take(self.weight, ids, axis=0)

    def lm_head(self, x: Tensor, out_dtype: str = "float32") -> Tensor:
        if _use_mlc_cuda_kernels(x):
            return _extern_linear("f16_matmul", x, [self.weight], self.num, out_dtype)
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        return y if out_dtype == "float32" else y.astype(out_dtype)


def make_linear(in_features: int, out_features: int, quantization,
                bias: bool = False) -> nn.Module:
    """The linear layer a quantization scheme asks for (with a `bias` parameter if asked)."""
    if quantization.kind == "group-quant":
        return GroupQuantLinear(in_features, out_features, quantization.model_dtype, bias)
    return Linear(in_features, out_features, quantization.model_dtype, bias)


def make_embedding(num: int, dim: int, quantization) -> nn.Module:
    """The embedding layer a quantization scheme asks for."""
    if quantization.kind == "group-quant":
        return GroupQuantEmbedding(num, dim, quantization.model_dtype)
    return Embedding(num, dim, quantization.model_dtype)
