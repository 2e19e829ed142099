"""mlc's CUDA kernels (fused q4 GEMV, fused q4 tensor-core kernel, dequantize + cuBLAS) against
numpy, on random inputs."""

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


@pytest.mark.parametrize("n,k", [(392, 4096), (130, 14336), (7, 1024), (2050, 2048)])
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_q4_gemv_one_row_whole_rows_per_warp(funcs, n, k, out_dtype):
    """K a multiple of 1024: the one-row kernel that holds whole rows per warp (odd N: the
    last warp's second row is past the end)."""
    import tvm

    rng = np.random.default_rng(n + k)
    q = get_quantization("q4f16_1")
    qw, qs = quantize_weight(rng.standard_normal((n, k)).astype("float32"), q)
    deq = dequantize_weight(qw, qs, q, k).astype("float32")
    x = rng.standard_normal((1, k)).astype("float16")
    ref = x.astype("float32") @ deq.T
    dev = tvm.cuda(0)
    out = tvm.runtime.tensor(np.full((1, n), np.nan, out_dtype), dev)   # poisoned
    funcs[0](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev),
             out)
    got = out.numpy().astype("float32")
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all() and rel < 2e-3, rel


# (n, k): n not a multiple of 16 or of the 128-feature block; k with a half 128-wide K block
# (576, SmolLM2) and k not a multiple of 64 (160: the tensor-core kernel declines, old paths run)
PATH_SHAPES = [(392, 1536), (200, 576), (576, 576), (136, 640), (256, 4096), (72, 160)]
PATH_ROWS = [2, 3, 7, 8, 9, 16, 17, 25, 31, 40, 57, 64, 96, 100, 128]
DEFAULT_PATHS = (2, 128)
# path -> (q4_set_paths range, q4_set_mma_config(split_k, blocks_per_sm))
PATHS = {
    "mma": ((1, 1 << 40), (0, 0)),          # automatic split-K
    "mma-split1": ((1, 1 << 40), (1, 0)),   # one block per tile: no reduction
    "mma-split3": ((1, 1 << 40), (3, 0)),   # uneven K ranges, last-block reduction
    "old": ((0, 0), (0, 0)),                # GEMV for M <= 8, dequantize + cuBLAS above
}
_WEIGHTS: dict = {}


def _q4_weights(n, k):
    if (n, k) not in _WEIGHTS:
        rng = np.random.default_rng(n * 7919 + k)
        q = get_quantization("q4f16_1")
        qw, qs = quantize_weight(rng.standard_normal((n, k)).astype("float32"), q)
        _WEIGHTS[(n, k)] = qw, qs, dequantize_weight(qw, qs, q, k).astype("float32")
    return _WEIGHTS[(n, k)]


@pytest.fixture
def q4_paths(funcs):
    import tvm

    set_paths = tvm.get_global_func("mlc.cuda.q4_set_paths")
    set_config = tvm.get_global_func("mlc.cuda.q4_set_mma_config")

    def use(path):
        (lo, hi), (split, per_sm) = PATHS[path]
        set_paths(lo, hi)
        set_config(split, per_sm)

    yield use
    set_paths(*DEFAULT_PATHS)
    set_config(0, 0)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("n,k", PATH_SHAPES)
def test_q4_matmul_paths(funcs, q4_paths, n, k, path):
    """Each path forced, for every row count, both output dtypes, against numpy."""
    import tvm

    q4_paths(path)
    qw, qs, deq = _q4_weights(n, k)
    dev = tvm.cuda(0)
    qw_d, qs_d = tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev)
    rng = np.random.default_rng(k + n)
    for m in PATH_ROWS:
        x = rng.standard_normal((m, k)).astype("float16")
        ref = x.astype("float32") @ deq.T
        x_d = tvm.runtime.tensor(x, dev)
        for out_dtype in ("float16", "float32"):
            out = tvm.runtime.tensor(np.full((m, n), np.nan, out_dtype), dev)   # poisoned
            funcs[0](x_d, qw_d, qs_d, out)
            got = out.numpy().astype("float32")
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert np.isfinite(got).all() and rel < 2e-3, (m, out_dtype, rel)


@pytest.mark.parametrize("m", [17, 64])   # one and two 16-feature tiles per warp
def test_q4_matmul_repeatable(funcs, q4_paths, m):
    """Split-K sums its partials in a fixed order: the same bits every call (and the per-tile
    counters are reset between calls)."""
    import tvm

    q4_paths("mma-split3")
    qw, qs, _ = _q4_weights(392, 1536)
    dev = tvm.cuda(0)
    x = tvm.runtime.tensor(np.random.default_rng(5).standard_normal((m, 1536)).astype("float16"),
                           dev)
    args = (tvm.runtime.tensor(qw, dev), tvm.runtime.tensor(qs, dev))
    outs = []
    for _ in range(3):
        out = tvm.runtime.empty((m, 392), "float32", dev)
        funcs[0](x, *args, out)
        outs.append(out.numpy())
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


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
