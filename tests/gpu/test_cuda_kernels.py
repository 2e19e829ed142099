"""mlc's CUDA kernels (fused q4 GEMV, dequantize + cuBLAS) against numpy, on random inputs."""

import numpy as np
import pytest

from mlc.compiler.quantization import dequantize_weight, get_quantization, quantize_weight

ROWS = [1, 2, 3, 5, 8, 9, 13, 17, 64, 100, 256, 257, 300]


@pytest.fixture(scope="module")
def funcs(gpu_assets):
    import tvm

    from mlc.runtime.device import parse_runtime_device
    from mlc.runtime.model import _load_module

    parse_runtime_device("cuda")
    _load_module(gpu_assets / "smol-q4f16_1-cuda.so")     # registers mlc.cuda.*
    return tvm.get_global_func("mlc.cuda.q4_matmul"), tvm.get_global_func("mlc.cuda.f16_matmul")


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_q4_matmul(funcs, m, out_dtype):
    import tvm

    rng = np.random.default_rng(m)
    n, k = 392, 1536
    q = get_quantization("q4f16_1")
    w = rng.standard_normal((n, k)).astype("float32")
    qw, qs = quantize_weight(w, q)
    deq = dequantize_weight(qw, qs, q, k).astype("float32")
    x = rng.standard_normal((m, k)).astype("float16")
    ref = x.astype("float32") @ deq.T
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.full((m, n), np.nan, out_dtype), dev)   # poisoned
    funcs[0](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev),
             out)
    got = out.numpy().astype("float32")
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all() and rel < 2e-3, rel


@pytest.mark.parametrize("m", [1, 7, 33, 256])
def test_f16_matmul(funcs, m):
    import tvm

    rng = np.random.default_rng(100 + m)
    n, k = 320, 576
    x = rng.standard_normal((m, k)).astype("float16")
    w = (rng.standard_normal((n, k)) * 0.05).astype("float16")
    ref = x.astype("float32") @ w.astype("float32").T
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.full((m, n), np.nan, "float32"), dev)
    funcs[1](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), out)
    rel = np.linalg.norm(out.numpy() - ref) / np.linalg.norm(ref)
    assert rel < 2e-3, rel
