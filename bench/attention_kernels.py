"""Times mlc's CUDA attention kernels (mlc/compiler/cuda_kernels/attention.cu) on the GPU.

Prefill: `mlc.cuda.attn_prefill_ragged` on one causal sequence of 512 / 2048 / 8192 tokens with
Llama-3-8B's attention shape (h_q 32, h_kv 8, head_dim 128), against
torch.nn.functional.scaled_dot_product_attention (is_causal, fp16, K/V expanded to 32 heads) in
the same run; TFLOP/s count causal FLOPs, 2 * 2 * L * L / 2 * d * h_q.
Decode: `mlc.cuda.attn_decode_paged` at batch 1 / 16 / 64 and context 512 / 4096 (same heads),
in us per call and GB/s of K/V read; each call reads a different set of pages from a pool larger
than L2, so the K/V come from DRAM as in a real decode step.

Times are medians of CUDA-event measurements on torch's current stream (where the kernels run),
with a sleep kernel queued ahead so that only GPU time is measured. `us` times one call;
`us_loop` is the mean over 50 back-to-back calls (consecutive kernels overlap their tails).

    python bench/attention_kernels.py --lib LIB.so [--json out.json]
"""

import argparse
import json
import statistics

H_Q, H_KV, D, PAGE = 32, 8, 128, 16


def _events_ms(torch, fn, reps, calls=1, warmup=3):
    """Median GPU time per call: a sleep kernel queued first keeps the GPU busy while the host
    enqueues the events and calls, so host launch overhead is not timed."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(1_000_000 + 100_000 * calls)   # covers the host enqueue time
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bench_prefill(torch, tvm_ffi, f_ragged, lengths, reps):
    import torch.nn.functional as F

    rows = []
    for L in lengths:
        g = torch.Generator(device="cuda").manual_seed(L)
        q = torch.randn(L, H_Q, D, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(L, H_KV, D, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(L, H_KV, D, device="cuda", dtype=torch.float16, generator=g)
        indptr = torch.tensor([0, L], device="cuda", dtype=torch.int32)
        out = torch.empty(L, H_Q, D, device="cuda", dtype=torch.float16)
        lse = torch.empty(L, H_Q, device="cuda", dtype=torch.float32)
        zeros_q = torch.zeros(L, device="cuda", dtype=torch.int32)
        zeros_b = torch.zeros(1, device="cuda", dtype=torch.int32)
        args = [tvm_ffi.from_dlpack(t) for t in (q, indptr, k, v, indptr, zeros_q, zeros_b, out,
                                                  lse)]
        scale = D ** -0.5

        def mlc():
            f_ragged(*args, 1, 0, 1.0, 10000.0, scale)

        # torch: [1, h, L, d] with K/V expanded to the 32 query heads (outside the timing)
        tq = q.transpose(0, 1).unsqueeze(0).contiguous()
        tk = k.repeat_interleave(H_Q // H_KV, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
        tv = v.repeat_interleave(H_Q // H_KV, dim=1).transpose(0, 1).unsqueeze(0).contiguous()

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)

        mlc_ms = _events_ms(torch, mlc, reps)
        sdpa_ms = _events_ms(torch, sdpa, reps)
        ref = sdpa()[0].transpose(0, 1).float()
        diff = (out.float() - ref).abs().max().item()
        flops = 2 * 2 * L * L / 2 * D * H_Q
        row = {"tokens": L, "mlc_ms": round(mlc_ms, 4), "mlc_tflops": round(flops / mlc_ms / 1e9, 1),
               "sdpa_ms": round(sdpa_ms, 4), "sdpa_tflops": round(flops / sdpa_ms / 1e9, 1),
               "max_abs_diff_vs_sdpa": round(diff, 5)}
        print(f"prefill L={L:5d}: mlc {mlc_ms:8.3f} ms {row['mlc_tflops']:6.1f} TFLOP/s | "
              f"sdpa {sdpa_ms:8.3f} ms {row['sdpa_tflops']:6.1f} TFLOP/s | max|diff| {diff:.2e}",
              flush=True)
        rows.append(row)
    return rows


def bench_decode(torch, tvm_ffi, f_decode, batches, contexts, reps):
    page_bytes = 2 * H_KV * PAGE * D * 2
    rows = []
    for ctx in contexts:
        for B in batches:
            per_seq = (ctx + PAGE - 1) // PAGE
            needed = B * per_seq
            pool = max(needed, (512 << 20) // page_bytes)      # >= 512 MB: K/V come from DRAM
            g = torch.Generator(device="cuda").manual_seed(B * 100000 + ctx)
            pages = torch.randn(pool, 2, H_KV, PAGE, D, device="cuda", dtype=torch.float16,
                                generator=g)
            q = torch.randn(B, H_Q, D, device="cuda", dtype=torch.float16, generator=g)
            indptr = torch.arange(0, needed + 1, per_seq, device="cuda", dtype=torch.int32)
            last = torch.full((B,), ctx - (per_seq - 1) * PAGE, device="cuda", dtype=torch.int32)
            zeros = torch.zeros(B, device="cuda", dtype=torch.int32)
            out = torch.empty(B, H_Q, D, device="cuda", dtype=torch.float16)
            lse = torch.empty(B, H_Q, device="cuda", dtype=torch.float32)
            n_sets = max(1, min(16, pool // needed))
            perm = torch.randperm(pool, device="cuda", generator=g).to(torch.int32)
            index_sets = [tvm_ffi.from_dlpack(perm[i * needed:(i + 1) * needed].contiguous())
                          for i in range(n_sets)]
            fixed = [tvm_ffi.from_dlpack(t) for t in (q, pages, indptr)]
            tail = [tvm_ffi.from_dlpack(t) for t in (last, zeros, zeros, out, lse)]
            state = {"i": 0}

            def call():
                idx = index_sets[state["i"] % n_sets]
                state["i"] += 1
                f_decode(*fixed, idx, *tail, 0, 1.0, 10000.0, D ** -0.5)

            us = _events_ms(torch, call, reps) * 1e3
            us_loop = _events_ms(torch, call, max(3, reps // 10), calls=50) * 1e3
            kv_bytes = B * ctx * H_KV * D * 2 * 2
            row = {"batch": B, "context": ctx, "us": round(us, 2), "us_loop": round(us_loop, 2),
                   "gbps": round(kv_bytes / (us * 1e-6) / 1e9, 1),
                   "gbps_loop": round(kv_bytes / (us_loop * 1e-6) / 1e9, 1)}
            print(f"decode B={B:3d} ctx={ctx:5d}: {us:8.2f} us ({row['gbps']:7.1f} GB/s), "
                  f"loop {us_loop:8.2f} us ({row['gbps_loop']:7.1f} GB/s)", flush=True)
            rows.append(row)
            del pages
            torch.cuda.empty_cache()
    return rows


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", required=True, help="a CUDA model library with mlc's kernels linked in")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--prefill", default="512,2048,8192")
    p.add_argument("--decode-batch", default="1,16,64")
    p.add_argument("--decode-context", default="512,4096")
    a = p.parse_args()

    import torch
    import tvm
    import tvm_ffi

    from mlc.runtime.device import parse_runtime_device
    from mlc.runtime.model import _load_module

    parse_runtime_device("cuda")
    lib = _load_module(a.lib)      # registers mlc.cuda.*; keep the module alive
    f_ragged = tvm.get_global_func("mlc.cuda.attn_prefill_ragged")
    f_decode = tvm.get_global_func("mlc.cuda.attn_decode_paged")
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"h_q": H_Q, "h_kv": H_KV, "head_dim": D},
        "prefill": bench_prefill(torch, tvm_ffi, f_ragged, _ints(a.prefill), a.reps),
        "decode": bench_decode(torch, tvm_ffi, f_decode, _ints(a.decode_batch),
                               _ints(a.decode_context), a.reps),
    }
    del lib
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
