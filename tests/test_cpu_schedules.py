"""The CPU schedules (mlc/compiler/cpu_schedules.py) change speed, not results: scheduled
kernels and libraries match unscheduled ones (opt O0) on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import build_lib, load_model, make_tiny_llama, max_rel_diff, write_mlc_dir

TOL = 1e-4


# ------------------------------------------------------------------------------ kernels


def _q4_func(rows, n, k):
    from tvm import te, tirx

    from mlc.models.layers import _q4_matmul_nt

    m = tirx.Var("seq_len", "int64") if rows is None else rows
    x = te.placeholder((1, m, k), "float32", name="x")
    w = te.placeholder((n, k // 8), "uint32", name="w")
    s = te.placeholder((n, k // 32), "float32", name="s")
    b = te.placeholder((1, m, n), "float32", name="b")
    y = _q4_matmul_nt(x, w, s, k, "float32")
    out = te.compute(y.shape, lambda *i: y(*i) + b(*i), name="add")   # a fused epilogue
    return te.create_prim_func([x, w, s, b, out])


def _run(func, rows, n, k, seed=0):
    import tvm

    from mlc.compiler.target import parse_device

    target = parse_device("cpu").tvm_target()
    lib = tvm.tirx.build(func, target=target)
    rng = np.random.RandomState(seed)
    args = [rng.randn(1, rows, k).astype("float32"),
            rng.randint(0, 2**32, size=(n, k // 8), dtype="uint64").astype("uint32"),
            (rng.rand(n, k // 32) * 0.1).astype("float32"),
            rng.randn(1, rows, n).astype("float32"), np.zeros((1, rows, n), "float32")]
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib(*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("rows,n,k", [(1, 960, 576),      # SmolLM2 decode qkv
                                      (1, 576, 1536),     # decode down_proj
                                      (None, 576, 1536),  # prefill, symbolic rows
                                      (None, 3072, 576)])
@pytest.mark.parametrize("device", ["cpu", "cpu:x86-64-v3"])   # 16 / 8 GEMV lanes here
def test_q4_matmul_kernel_matches_unscheduled(rows, n, k, device):
    from mlc.compiler.cpu_schedules import schedule_func
    from mlc.compiler.target import parse_device

    func = _q4_func(rows, n, k)
    scheduled = schedule_func(func, parse_device(device).tvm_target())
    assert scheduled is not None, "the matmul rule must apply"
    assert "T.parallel" in scheduled.script() and "T.vectorized" in scheduled.script()
    for r in ([1] if rows == 1 else [1, 7, 64]):       # 7: not a multiple of the row tile
        ref, ours = _run(func, r, n, k), _run(scheduled, r, n, k)
        assert max_rel_diff(ours, ref) < TOL


def test_attention_kernels_made_parallel():
    """The CPU prefill attention kernels get a parallel loop and a tight row loop."""
    from mlc.compiler import cpu_schedules as cs
    from mlc.compiler.quantization import get_quantization
    from mlc.compiler.target import parse_device
    from mlc.models.registry import get_model

    info = get_model("llama")
    config = info.config_from_dict(dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=64, prefill_chunk_size=32, context_window_size=64))
    model = info.build(config, get_quantization("q0f32"))
    with parse_device("cpu").tvm_target():
        mod, _ = model.export_tvm(spec=model.get_default_spec("llvm"))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items()}
    for name in ("batch_prefill_ragged_kv", "batch_prefill_paged_kv_cpu"):
        new = cs.parallel_attention(name, funcs[name])
        assert new is not None and "T.parallel" in new.script(), name
    paged = cs.parallel_attention("batch_prefill_paged_kv_cpu",
                                  funcs["batch_prefill_paged_kv_cpu"]).script()
    assert "max_num_pages * 16" not in paged


def _build(func, name):
    import tvm

    from mlc.compiler.target import parse_device

    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    return tvm.tirx.build(mod, target=parse_device("cpu").tvm_target())[name]


def _tensors(*arrays):
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("dtype,tol", [("float32", TOL), ("float16", 2e-3)])
def test_decode_attention_matches_tvm_kernel(dtype, tol):
    """mlc's decode kernel against TVM's, SmolLM2 heads (9 query, 3 KV, dim 64), two
    sequences with 37 and 16 cached tokens in scattered pages."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from mlc.compiler.cpu_attention import decode_kernel

    rng = np.random.RandomState(0)
    order = rng.permutation(8).astype("int32")
    indptr = np.array([0, 3, 4], "int32")
    values = order[:4].copy()
    last = np.array([37 - 32, 16], "int32")
    pages = rng.randn(8, 2, 3, 16, 64).astype(dtype)
    q = rng.randn(2, 9, 64).astype(dtype)
    zeros = np.zeros(2, "int32")
    outs = []
    for func in (_attention_decode_cpu(3, 9, 64, dtype, False, {}),
                 decode_kernel(9, 3, 64, dtype)):
        out, lse = np.zeros((2, 9, 64), dtype), np.zeros((2, 9), "float32")
        args = _tensors(q, pages, indptr, values, last, zeros, zeros, out, lse)
        _build(func, "batch_decode_paged_kv_cpu")(*args, 0, 1.0, 10000.0, 0.125)
        outs.append((args[-2].numpy(), args[-1].numpy()))
    (ref_o, ref_l), (o, lse) = outs
    assert max_rel_diff(o, ref_o) < tol and max_rel_diff(lse, ref_l) < tol


@pytest.mark.parametrize("causal,dtype,tol", [(1, "float32", TOL), (0, "float32", TOL),
                                              (1, "float16", 2e-3)])
def test_prefill_ragged_attention_matches_tvm_kernel(causal, dtype, tol):
    """mlc's ragged prefill kernel against TVM's: a batch of two chunks (5 queries on 21
    keys, 40 queries on 40 keys), SmolLM2 heads."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from mlc.compiler.cpu_attention import prefill_ragged_kernel

    rng = np.random.RandomState(1)
    q_indptr, kv_indptr = np.array([0, 5, 45], "int32"), np.array([0, 21, 61], "int32")
    q = rng.randn(45, 9, 64).astype(dtype)
    k, v = rng.randn(61, 3, 64).astype(dtype), rng.randn(61, 3, 64).astype(dtype)
    pos, off = np.zeros(45, "int32"), np.zeros(2, "int32")
    outs = []
    for func in (_attention_prefill_ragged_cpu(3, 9, 64, 64, dtype, {}),
                 prefill_ragged_kernel(9, 3, 64, dtype)):
        out, lse = np.zeros((45, 9, 64), dtype), np.zeros((45, 9), "float32")
        args = _tensors(q, q_indptr, k, v, kv_indptr, pos, off, out, lse)
        _build(func, "batch_prefill_ragged_kv")(*args, causal, 0, 1.0, 10000.0, 0.125)
        outs.append((args[-2].numpy(), args[-1].numpy()))
    (ref_o, ref_l), (o, lse) = outs
    assert max_rel_diff(o, ref_o) < tol and max_rel_diff(lse, ref_l) < tol


def _paged_reference(q, q_indptr, pages, page_indptr, page_values, info, causal, sm_scale,
                     window=0):
    """numpy paged attention with the KV cache's conventions: a sequence's key i sits at
    position i (or i - sink + offset with a window's [3, b] length table) of its pages; a
    query sees the keys its mask allows; one that sees none gives 0 and lse -5e4."""
    h_q, h_kv = q.shape[1], pages.shape[2]
    out = np.zeros(q.shape, "float64")
    lse = np.full(q.shape[:2], -5e4)
    for b in range(len(q_indptr) - 1):
        pg = page_values[page_indptr[b]:page_indptr[b + 1]]
        last, offset, sink = (info[:, b] if window else (info[b], 0, 0))
        kv_len = (len(pg) - 1) * 16 + last - offset + sink if len(pg) else 0
        pos = [i if i < sink else i - sink + offset for i in range(kv_len)]
        k = np.array([pages[pg[p // 16], 0, :, p % 16] for p in pos], "float64")
        v = np.array([pages[pg[p // 16], 1, :, p % 16] for p in pos], "float64")
        q_len = q_indptr[b + 1] - q_indptr[b]
        for i in range(q_len):
            first, end = 0, kv_len
            if causal and window:
                first = max(kv_len - max(window - i - 1, 0), 0)
            elif causal:
                end = max(min(kv_len - q_len + i + 1, kv_len), 0)
            if end <= first:
                continue
            row = q_indptr[b] + i
            for h in range(h_q):
                s = k[first:end, h // (h_q // h_kv)] @ q[row, h].astype("float64") * sm_scale
                p = np.exp(s - s.max())
                out[row, h] = p @ v[first:end, h // (h_q // h_kv)] / p.sum()
                lse[row, h] = (s.max() + np.log(p.sum())) / np.log(2)
    return out, lse


PAGED_CASES = {
    # three sequences: 37 cached keys (3 pages) with a 5-query chunk, 16 cached keys with 40
    # queries, 0 cached keys with 3 queries; pages scattered
    "plain": dict(window=0, info=np.array([5, 16, 0], "int32")),
    # a window of 24: length table (last page length, window offset, sink), the window
    # starting 7 keys into its first page; early queries see some cached keys, late ones none
    "window24": dict(window=24, info=np.array([[5, 16, 0], [7, 0, 0], [0, 0, 0]], "int32")),
}


@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("causal,dtype,tol", [(1, "float32", TOL), (0, "float32", TOL),
                                              (1, "float16", 2e-3)])
def test_prefill_paged_attention_matches_numpy(case, causal, dtype, tol):
    """mlc's paged-prefill kernel against numpy, with keys masked before the visible ones
    (the case TVM 0.27's kernel read an unwritten scratch value for: NaN on some CPUs)."""
    from mlc.compiler.cpu_attention import prefill_paged_kernel

    window, info = PAGED_CASES[case]["window"], PAGED_CASES[case]["info"]
    rng = np.random.RandomState(2)
    page_values = rng.permutation(8).astype("int32")[:5]
    page_indptr = np.array([0, 3, 4, 5], "int32")
    q_indptr = np.array([0, 5, 45, 48], "int32")
    q = rng.randn(48, 9, 64).astype(dtype)
    pages = rng.randn(8, 2, 3, 16, 64).astype(dtype)
    if case == "plain":
        info = np.array([5, 16, 0], "int32")
        page_indptr = np.array([0, 3, 4, 4], "int32")
    pos, off = np.zeros(48, "int32"), np.zeros(3, "int32")
    out, lse = np.zeros((48, 9, 64), dtype), np.zeros((48, 9), "float32")
    args = _tensors(q, q_indptr, pages, page_indptr, page_values[:page_indptr[-1]], info, off,
                    pos, out, lse)
    name = "batch_prefill_paged_kv_cpu" + ("_sliding_window" if window else "")
    _build(prefill_paged_kernel(9, 3, 64, dtype, sliding_window=window), name)(
        *args, causal, 0, 1.0, 10000.0, 0.125)
    ref_o, ref_l = _paged_reference(q, q_indptr, pages, page_indptr, page_values, info, causal,
                                    0.125, window)
    o, got_lse = args[-2].numpy(), args[-1].numpy()
    assert np.isfinite(o).all() and np.isfinite(got_lse).all()
    assert max_rel_diff(o, ref_o) < tol
    assert np.abs(got_lse - ref_l).max() < 1e-3 * np.abs(ref_l[ref_l > -5e4]).max()
    if window:       # late queries of the long chunk see no cached key at all
        assert (ref_l == -5e4).any()


def test_sliding_window_decode_attention_matches_numpy():
    """The sliding-window decode kernel reads the [3, b] length table: the window's keys
    only, starting part-way into the first page."""
    from mlc.compiler.cpu_attention import decode_kernel

    rng = np.random.RandomState(3)
    page_values = rng.permutation(8).astype("int32")[:4]
    page_indptr = np.array([0, 3, 4], "int32")
    info = np.array([[5, 9], [7, 2], [0, 0]], "int32")
    q = rng.randn(2, 9, 64).astype("float32")
    pages = rng.randn(8, 2, 3, 16, 64).astype("float32")
    zeros = np.zeros(2, "int32")
    out, lse = np.zeros((2, 9, 64), "float32"), np.zeros((2, 9), "float32")
    args = _tensors(q, pages, page_indptr, page_values, info, zeros, zeros, out, lse)
    _build(decode_kernel(9, 3, 64, "float32", sliding=True),
           "batch_decode_paged_kv_cpu_sliding_window")(*args, 0, 1.0, 10000.0, 0.125)
    ref_o, ref_l = _paged_reference(q, np.array([0, 1, 2], "int32"), pages, page_indptr,
                                    page_values, info, 0, 0.125, window=1)
    assert max_rel_diff(args[-2].numpy(), ref_o) < TOL
    assert np.abs(args[-1].numpy() - ref_l).max() < 1e-4 * np.abs(ref_l).max()


# ------------------------------------------------------------------------------ libraries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu-sched")
    hf_model, hf_dir = make_tiny_llama(tmp)
    return hf_model, hf_dir, tmp


def _logits(mlc_dir, lib, prompt, steps):
    """Prefill in two chunks (the second sees a KV history), decode `steps` tokens, and a
    batch of two sequences (batch_prefill + batch_decode)."""
    model = load_model(mlc_dir, lib, prefill_chunk_size=64)
    out = []
    model.add_sequence(0)
    out.append(model.prefill([0], [prompt[:13]]))
    out.append(model.prefill([0], [prompt[13:]]))
    tok = int(out[-1][0].argmax())
    for _ in range(steps):
        out.append(model.decode([0], [tok]))
        tok = int(out[-1][0].argmax())
    model.add_sequence(1)
    model.add_sequence(2)
    out.append(model.prefill([1, 2], [prompt[:9], prompt[3:20]]))
    out.append(model.decode([1, 2], [5, 7]))
    return np.concatenate([o.reshape(-1, o.shape[-1]) for o in out])


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_scheduled_library_matches_O0(tiny, quantization):
    hf_model, hf_dir, tmp = tiny
    mlc_dir = write_mlc_dir(hf_model, tmp / quantization, quantization, hf_dir=hf_dir,
                            prefill_chunk_size=64)
    prompt = np.random.RandomState(1).randint(3, 300, size=37).tolist()
    ref = _logits(mlc_dir, build_lib(mlc_dir, opt="O0"), prompt, steps=5)
    ours = _logits(mlc_dir, build_lib(mlc_dir, opt="O2"), prompt, steps=5)
    assert np.isfinite(ours).all()
    assert max_rel_diff(ours, ref) < TOL


# ------------------------------------------------------------------------------ rules


# TVM's sort and scan kernels (the library's sampling helpers, outside the forward pass)
# come already lowered to loops with their own structure: no CPU rule's pattern.
UNSCHEDULED_OK = {"argsort", "cumsum", "sort", "topk"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi": "phi",
               "gemma3": "gemma3_text"}


@pytest.mark.parametrize("quantization", ["q0f32", "q4f16_1"])
@pytest.mark.parametrize("arch", list(MODEL_TYPES))
def test_rules_schedule_every_architecture(arch, quantization):
    """The CPU rules are chosen by pattern: every architecture's kernels are scheduled by
    the same four rules (no architecture-specific schedule code), none is left a naive loop
    nest but TVM's sorting kernels."""
    from helpers import TINY_ARCHS

    from mlc.compiler.compile import build_pipeline, export_module
    from mlc.compiler.cpu_schedules import schedule_summary
    from mlc.compiler.quantization import get_quantization
    from mlc.compiler.target import parse_device
    from mlc.models.common import kv_cache_window
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig

    model_type = MODEL_TYPES[arch]
    info = get_model(model_type)
    config = info.config_from_hf({"model_type": model_type, **TINY_ARCHS[arch]})
    chat = ChatConfig(model_type=model_type, quantization=quantization,
                      model_config=config.to_dict(), vocab_size=config.vocab_size,
                      context_window_size=config.context_window_size,
                      prefill_chunk_size=config.prefill_chunk_size,
                      sliding_window_size=config.sliding_window_size)
    dev = parse_device("cpu")
    mod, _ = export_module(info, config, chat, get_quantization(quantization), dev, "O2")
    mod = build_pipeline(dev, "O2", kv_cache_window(config.sliding_window_size),
                         last_phase=4)(mod)
    summary = schedule_summary(mod)
    unscheduled = {name for name, rule in summary.items() if rule is None}
    assert unscheduled <= UNSCHEDULED_OK, unscheduled
    counts = {rule: sum(r == rule for r in summary.values())
              for rule in ("gemv", "gemm", "rows", "elementwise", "kernel")}
    # decode: qkv, o, gate/up (+ down), lm_head as GEMVs; prefill: the same as GEMMs
    assert counts["gemv"] >= 4 and counts["gemm"] >= 4, counts
    assert counts["rows"] >= 2 and counts["elementwise"] >= 1, counts
    assert counts["kernel"] >= 3, counts            # mlc's attention kernels
    names = {n for n, r in summary.items() if r in ("gemv", "gemm")}
    assert any("q4_matmul" in n for n in names) == (quantization == "q4f16_1"), names
