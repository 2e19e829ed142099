"""mlc's CUDA attention kernels (cuda_kernels/attention.cu) against a numpy reference written from
TVM's definitions: scores q.k * sm_scale * log2(e), causal mask col < kv_len - qo_len + row + 1,
GQA head h -> kv head h // (h_q / h_kv), lse = m + log2(sum exp2(s - m)) in log2 units, and a row
that sees no key gets output 0 and lse -5e4 (TVM's kernels give that for a sequence without keys;
TVM's merge then gives it no weight).

Inputs are random fp16; outputs and lse start as NaN so an unwritten element fails; unused page
slots (past last_page_len, spare pages) are NaN so a read of one poisons the result; int32 index
arrays are passed as views with a non-zero byte_offset, as the KV cache passes them.
"""

import zlib

import numpy as np
import pytest

LOG2E = 1.4426950408889634
EMPTY_LSE = -5e4
PAGE = 16
# head_dim, h_q, h_kv: SmolLM2-like, Llama-3-8B-like, and a 32-head group (two decode head chunks)
LAYOUTS = {"d64": (64, 9, 3), "d128": (128, 32, 8), "g32": (64, 32, 1)}
OUT_TOL = 2e-3      # max abs error relative to max |ref|
LSE_TOL = 1e-3      # abs, log2 units

# (qo_len, kv_len) per sequence; kv_len >= qo_len, kv past qo is a prefix the causal mask offsets
RAGGED_CASES = {
    "1": [(1, 1)],
    "5": [(5, 5)],
    "64": [(64, 64)],
    "100-1-37": [(100, 100), (1, 1), (37, 37)],
    "300-129": [(300, 300), (129, 129)],
    "prefix5": [(5, 40)],
    "prefix-mixed": [(100, 164), (1, 30), (0, 10), (37, 37)],
    "empty-seqs": [(17, 81), (0, 0), (65, 65)],
    "no-queries": [(0, 5), (0, 0)],
}
# (qo_len, kv_len from the pages); kv 0 = a sequence without pages (output 0, lse -5e4)
PAGED_CASES = {
    "1": [(1, 1)],
    "5-37": [(5, 37)],
    "64": [(64, 64)],
    "mixed": [(100, 300), (1, 16), (37, 40), (3, 0)],
    "129-500": [(129, 500), (0, 33)],
    "pages": [(7, 20), (16, 16), (50, 129), (5, 2)],   # causal (5, 2): rows 0-2 see nothing
}
DECODE_CASES = {
    "b0": [],
    "b1-1": [1],
    "b1-17": [17],
    "b1-3000": [3000],
    "b3": [1, 2047, 640],
    "b3-empty": [0, 1500, 16],
    "b64": [0 if i == 5 else int(x)
            for i, x in enumerate(np.random.default_rng(64).integers(1, 600, 64))],
}


# ------------------------------------------------------------------------------------------
# reference and problem builders (numpy only)
# ------------------------------------------------------------------------------------------
def attend(q, k, v, causal, sm_scale):
    """One sequence: q [L, h_q, d], k/v [S, h_kv, d] -> out [L, h_q, d], lse [L, h_q]."""
    q, k, v = (x.astype("float32") for x in (q, k, v))
    n_q, h_q, d = q.shape
    n_kv, h_kv = k.shape[:2]
    if n_q == 0:
        return np.zeros((0, h_q, d), "float32"), np.zeros((0, h_q), "float32")
    if n_kv == 0:
        return np.zeros((n_q, h_q, d), "float32"), np.full((n_q, h_q), EMPTY_LSE, "float32")
    group = h_q // h_kv
    kk = np.repeat(k, group, axis=1).transpose(1, 2, 0)          # [h_q, d, S]
    vv = np.repeat(v, group, axis=1).transpose(1, 0, 2)          # [h_q, S, d]
    s = (q.transpose(1, 0, 2) @ kk) * np.float32(sm_scale * LOG2E)  # [h_q, L, S]
    if causal:
        rows = np.arange(n_q)[:, None]
        cols = np.arange(n_kv)[None, :]
        s = np.where(cols < n_kv - n_q + rows + 1, s, -np.inf)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m)
    m = np.where(seen, m, 0.0)
    p = np.exp2(s - m)
    total = p.sum(-1, keepdims=True)
    out = (p @ vv) / np.where(total > 0, total, 1.0)
    lse = np.where(total > 0, m + np.log2(np.maximum(total, 1e-30)), EMPTY_LSE)[..., 0]
    return out.transpose(1, 0, 2), lse.T


def make_ragged(rng, lens, h_q, h_kv, d):
    """Concatenated q/k/v for sequences with (qo_len, kv_len) and their indptr arrays."""
    q_indptr = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype("int32")
    kv_indptr = np.concatenate([[0], np.cumsum([b for _, b in lens])]).astype("int32")
    q = (rng.standard_normal((q_indptr[-1], h_q, d)) * 1.5).astype("float16")
    k = rng.standard_normal((kv_indptr[-1], h_kv, d)).astype("float16")
    v = rng.standard_normal((kv_indptr[-1], h_kv, d)).astype("float16")
    return q, k, v, q_indptr, kv_indptr


def ragged_reference(q, k, v, q_indptr, kv_indptr, causal, sm_scale):
    outs, lses = [], []
    for b in range(len(q_indptr) - 1):
        o, s = attend(q[q_indptr[b]:q_indptr[b + 1]], k[kv_indptr[b]:kv_indptr[b + 1]],
                      v[kv_indptr[b]:kv_indptr[b + 1]], causal, sm_scale)
        outs.append(o)
        lses.append(s)
    return _cat(outs, (0, q.shape[1], q.shape[2])), _cat(lses, (0, q.shape[1]))


def _cat(parts, empty_shape):
    return np.concatenate(parts) if parts else np.zeros(empty_shape, "float32")


def make_pages(rng, kv_lens, h_kv, d, spare=3):
    """A paged cache [num_pages, 2, h_kv, 16, d] holding random K/V for each sequence in shuffled
    pages; every slot not holding a key (spare pages, the tail of last pages) is NaN."""
    counts = [(n + PAGE - 1) // PAGE for n in kv_lens]
    total = sum(counts) + spare
    pages = np.full((total, 2, h_kv, PAGE, d), np.nan, "float16")
    page_indptr = np.concatenate([[0], np.cumsum(counts)]).astype("int32")
    page_indices = rng.permutation(total)[: sum(counts)].astype("int32")
    last_page_len = np.array([n - (c - 1) * PAGE if c else 0 for n, c in zip(kv_lens, counts)],
                             "int32")
    ks, vs = [], []
    for b, n in enumerate(kv_lens):
        k = rng.standard_normal((n, h_kv, d)).astype("float16")
        v = rng.standard_normal((n, h_kv, d)).astype("float16")
        for j in range(counts[b]):
            page = page_indices[page_indptr[b] + j]
            rows = slice(j * PAGE, min(n, (j + 1) * PAGE))
            pages[page, 0, :, : rows.stop - rows.start] = k[rows].transpose(1, 0, 2)
            pages[page, 1, :, : rows.stop - rows.start] = v[rows].transpose(1, 0, 2)
        ks.append(k)
        vs.append(v)
    return pages, page_indptr, page_indices, last_page_len, ks, vs


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def check(out, lse, ref_out, ref_lse):
    out = out.astype("float32")
    assert np.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned elements)"
    assert np.isfinite(lse).all(), "lse has NaN/inf (unwritten elements)"
    scale = max(float(np.abs(ref_out).max(initial=0.0)), 1e-3)
    err = float(np.abs(out - ref_out).max(initial=0.0))
    assert err <= OUT_TOL * scale, f"output max abs error {err:.3g} > {OUT_TOL} * {scale:.3g}"
    lse_err = float(np.abs(lse - ref_lse).max(initial=0.0))
    assert lse_err <= LSE_TOL, f"lse max abs error {lse_err:.3g}"


# ------------------------------------------------------------------------------------------
# GPU tests
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def funcs(gpu_assets):
    import tvm

    from mlc.runtime.device import parse_runtime_device
    from mlc.runtime.model import _load_module

    parse_runtime_device("cuda")
    lib = _load_module(gpu_assets / "smol-q4f16_1-cuda.so")     # registers mlc.cuda.*
    funcs = {name: tvm.get_global_func(f"mlc.cuda.{name}")
             for name in ("attn_prefill_ragged", "attn_prefill_paged", "attn_decode_paged")}
    yield funcs
    del lib     # kept alive while the kernels run


def _dev():
    import tvm

    return tvm.cuda(0)


def _t(arr):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(arr), _dev())


def _i32(arr, offset):
    """An int32 device array; with offset > 0, a view at that element offset into a larger
    allocation whose leading elements are junk (DLPack byte_offset != 0)."""
    arr = np.asarray(arr, "int32")
    if offset == 0:
        return _t(arr)
    base = _t(np.concatenate([np.full(offset, -77777, "int32"), arr]))
    return base._create_view((arr.size,), "int32", relative_byte_offset=4 * offset)


def _poisoned(shape, dtype):
    return _t(np.full(shape, np.nan, dtype))


def _offset(case_index):
    return 3 if case_index % 2 else 0


@pytest.mark.parametrize("layout", ["d64", "d128"])
@pytest.mark.parametrize("case", list(RAGGED_CASES))
@pytest.mark.parametrize("causal", [0, 1])
def test_prefill_ragged(funcs, layout, case, causal):
    d, h_q, h_kv = LAYOUTS[layout]
    rng = np.random.default_rng(seed_of(layout, case, causal))
    q, k, v, q_indptr, kv_indptr = make_ragged(rng, RAGGED_CASES[case], h_q, h_kv, d)
    sm_scale = 0.9 / np.sqrt(d)
    off = _offset(list(RAGGED_CASES).index(case))
    n, b = q.shape[0], len(q_indptr) - 1
    out, lse = _poisoned((n, h_q, d), "float16"), _poisoned((n, h_q), "float32")
    funcs["attn_prefill_ragged"](_t(q), _i32(q_indptr, off), _t(k), _t(v), _i32(kv_indptr, off),
                                 _i32(np.zeros(n), off), _i32(np.zeros(b), off), out, lse,
                                 causal, 0, 1.0, 10000.0, sm_scale)
    check(out.numpy(), lse.numpy(), *ragged_reference(q, k, v, q_indptr, kv_indptr, causal,
                                                      sm_scale))


def test_prefill_ragged_large_group(funcs):
    d, h_q, h_kv = LAYOUTS["g32"]
    rng = np.random.default_rng(7)
    q, k, v, q_indptr, kv_indptr = make_ragged(rng, [(9, 40), (70, 70)], h_q, h_kv, d)
    n, b = q.shape[0], 2
    out, lse = _poisoned((n, h_q, d), "float16"), _poisoned((n, h_q), "float32")
    funcs["attn_prefill_ragged"](_t(q), _i32(q_indptr, 1), _t(k), _t(v), _i32(kv_indptr, 2),
                                 _i32(np.zeros(n), 0), _i32(np.zeros(b), 0), out, lse,
                                 1, 0, 1.0, 10000.0, 0.125)
    check(out.numpy(), lse.numpy(), *ragged_reference(q, k, v, q_indptr, kv_indptr, 1, 0.125))


@pytest.mark.parametrize("layout", ["d64", "d128"])
@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("causal", [0, 1])
def test_prefill_paged(funcs, layout, case, causal):
    d, h_q, h_kv = LAYOUTS[layout]
    lens = PAGED_CASES[case]
    rng = np.random.default_rng(seed_of(layout, case, causal, "paged"))
    pages, page_indptr, page_indices, last, ks, vs = make_pages(rng, [b for _, b in lens],
                                                                h_kv, d)
    qo_indptr = np.concatenate([[0], np.cumsum([a for a, _ in lens])]).astype("int32")
    n, b = int(qo_indptr[-1]), len(lens)
    q = (rng.standard_normal((n, h_q, d)) * 1.5).astype("float16")
    sm_scale = 1.0 / np.sqrt(d)
    off = _offset(list(PAGED_CASES).index(case) + 1)
    out, lse = _poisoned((n, h_q, d), "float16"), _poisoned((n, h_q), "float32")
    funcs["attn_prefill_paged"](_t(q), _i32(qo_indptr, off), _t(pages), _i32(page_indptr, off),
                                _i32(page_indices, off), _i32(last, off), _i32(np.zeros(b), off),
                                _i32(np.zeros(n), off), out, lse, causal, 0, 1.0, 10000.0,
                                sm_scale)
    refs = [attend(q[qo_indptr[i]:qo_indptr[i + 1]], ks[i], vs[i], causal, sm_scale)
            for i in range(b)]
    check(out.numpy(), lse.numpy(), _cat([r[0] for r in refs], (0, h_q, d)),
          _cat([r[1] for r in refs], (0, h_q)))


def _decode(funcs, layout, lens, seed, offset):
    d, h_q, h_kv = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    pages, page_indptr, page_indices, last, ks, vs = make_pages(rng, lens, h_kv, d)
    b = len(lens)
    q = (rng.standard_normal((b, h_q, d)) * 1.5).astype("float16")
    sm_scale = 1.0 / np.sqrt(d)
    args = [_t(q), _t(pages), _i32(page_indptr, offset), _i32(page_indices, offset),
            _i32(last, offset), _i32(np.zeros(b), offset), _i32(np.zeros(b), offset)]
    refs = [attend(q[i:i + 1], ks[i], vs[i], False, sm_scale) for i in range(b)]
    ref_out = _cat([r[0] for r in refs], (0, h_q, d))
    ref_lse = _cat([r[1] for r in refs], (0, h_q))
    results = []
    for _ in range(2):       # twice: the split path's counters must be back at zero
        out, lse = _poisoned((b, h_q, d), "float16"), _poisoned((b, h_q), "float32")
        funcs["attn_decode_paged"](*args, out, lse, 0, 1.0, 10000.0, sm_scale)
        check(out.numpy(), lse.numpy(), ref_out, ref_lse)
        results.append(out.numpy())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("layout", ["d64", "d128"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_paged(funcs, layout, case):
    i = list(DECODE_CASES).index(case)
    _decode(funcs, layout, DECODE_CASES[case], seed=1000 + i, offset=_offset(i))


@pytest.mark.parametrize("case", ["b1-3000", "b3"])
def test_decode_paged_large_group(funcs, case):
    _decode(funcs, "g32", DECODE_CASES[case], seed=2000, offset=2)


def test_rejects_rotary_and_head_dim(funcs):
    d, h_q, h_kv = 64, 4, 2
    rng = np.random.default_rng(0)
    q, k, v, q_indptr, kv_indptr = make_ragged(rng, [(4, 4)], h_q, h_kv, d)
    out, lse = _poisoned((4, h_q, d), "float16"), _poisoned((4, h_q), "float32")
    base = [_t(q), _i32(q_indptr, 0), _t(k), _t(v), _i32(kv_indptr, 0), _i32(np.zeros(4), 0),
            _i32(np.zeros(1), 0), out, lse, 1]
    with pytest.raises(ValueError, match="rotary_mode"):
        funcs["attn_prefill_ragged"](*base, 1, 1.0, 10000.0, 0.125)
    q96, k96, v96, _, _ = make_ragged(rng, [(4, 4)], h_q, h_kv, 96)
    out96 = _poisoned((4, h_q, 96), "float16")
    with pytest.raises(ValueError, match="head_dim"):
        funcs["attn_prefill_ragged"](_t(q96), _i32(q_indptr, 0), _t(k96), _t(v96),
                                     _i32(kv_indptr, 0), _i32(np.zeros(4), 0),
                                     _i32(np.zeros(1), 0), out96, lse, 1, 0, 1.0, 10000.0, 0.125)
