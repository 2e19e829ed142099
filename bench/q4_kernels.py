"""Micro-benchmark of mlc.cuda.q4_matmul paths on Llama-3-8B shapes (run on the GPU machine).

    python bench/q4_kernels.py --lib smol-q4f16_1-cuda.so [--json out.json]
        [--ms 1,2,4,8] [--runs 50] [--splits 0,1,4,8] [--blocks-per-sm 0]

Any CUDA model library built by `mlc compile` carries the kernels (they register mlc.cuda.*).
For each (N, K) of a Llama-3-8B layer and each M, each path is forced with
mlc.cuda.q4_set_paths and timed per call with CUDA events (median of --runs calls):

    gemv    the fused GEMV (old path, M <= 8)
    mma     the fused dequantize + tensor-core kernel (mma.sync), automatic split-K;
            with --splits, one column per forced split-K value (mma/s4, ...; 0 = automatic)
    cublas  dequantize to float16 + cuBLAS (old path, M > 8)

Weights are random q4 (mlc.bench.fill_random, bench/cuda_fill.py), with enough copies of each layer in rotation that
they do not stay in the 50 MB L2 between calls (as in a decode step, where every layer's weights
come from HBM). GB/s counts the q4 weight and scale bytes; TFLOP/s is 2 M N K / time. The
per-M summary adds the four shapes x 32 layers: the matmul time of one decode step (without the
lm_head). Outputs of all paths are compared with the first one (max relative difference).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import numpy as np

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]   # qkv, o, gate_up, down
LAYERS = 32
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
L2_BYTES = 50 << 20
DEFAULT_PATHS = (2, 128)


class Timer:
    """CUDA events through the driver API (on the legacy default stream, which TVM uses unless
    a stream was set), or wall clock around a device sync where that fails.

    A call from Python takes longer to issue than a small kernel takes to run, so the GPU would
    wait for the CPU between calls and the events would time the CPU. The timed calls are
    therefore queued behind `busy` (device work of a known duration: mlc.bench.fill_random on a scratch
    buffer) long enough for all of them to be issued before the GPU reaches them."""

    def __init__(self, dev, busy, busy_us):
        self.dev = dev
        self.busy, self.busy_us = busy, busy_us
        self.cu = None
        try:
            cu = ctypes.CDLL("libcuda.so.1")
            for name in ("cuEventCreate", "cuEventRecord", "cuEventSynchronize",
                         "cuEventElapsedTime", "cuEventDestroy_v2"):
                getattr(cu, name)
            self.cu = cu
            a, b = self._event(), self._event()
            self._record(a)
            self._record(b)
            self.cu.cuEventSynchronize(b)
            self._elapsed(a, b)
        except (OSError, AttributeError, RuntimeError) as e:
            print(f"CUDA events unavailable ({e}); timing with device syncs")
            self.cu = None

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUresult {rc}")

    def _event(self):
        ev = ctypes.c_void_p()
        self._check(self.cu.cuEventCreate(ctypes.byref(ev), 0), "cuEventCreate")
        return ev

    def _record(self, ev):
        self._check(self.cu.cuEventRecord(ev, ctypes.c_void_p(0)), "cuEventRecord")

    def _elapsed(self, a, b):
        ms = ctypes.c_float()
        self._check(self.cu.cuEventElapsedTime(ctypes.byref(ms), a, b), "cuEventElapsedTime")
        return ms.value

    def time_calls(self, calls, warmup=5):
        """Median microseconds of the callables, each timed on its own, run back to back."""
        t0 = time.perf_counter()
        for c in calls[:warmup]:
            c()
        issue_us = (time.perf_counter() - t0) / warmup * 1e6   # upper bound: includes GPU time
        self.dev.sync()
        if self.cu is None:
            times = []
            for c in calls:
                t0 = time.perf_counter()
                c()
                self.dev.sync()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        events = [self._event() for _ in range(len(calls) + 1)]
        for _ in range(min(200, int(2 * len(calls) * (issue_us + 5) / self.busy_us) + 1)):
            self.busy()
        self._record(events[0])
        for c, ev in zip(calls, events[1:]):
            c()
            self._record(ev)
        self._check(self.cu.cuEventSynchronize(events[-1]), "cuEventSynchronize")
        times = [self._elapsed(a, b) * 1e3 for a, b in zip(events, events[1:])]
        for ev in events:
            self.cu.cuEventDestroy_v2(ev)
        return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", required=True, help="a CUDA model library (.so) built by mlc")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--ms", default=",".join(map(str, MS)), help="row counts M")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--splits", default="0",
                   help="split-K values for the mma path (0 = automatic), e.g. 0,1,2,4,8")
    p.add_argument("--blocks-per-sm", type=int, default=0,
                   help="automatic split-K target (0 = the kernel's default)")
    p.add_argument("--no-check", action="store_true", help="skip comparing path outputs")
    a = p.parse_args()

    import tvm

    from mlc.runtime.device import parse_runtime_device
    from mlc.runtime.model import _load_module

    _, dev = parse_runtime_device("cuda")
    _load_module(a.lib)                          # registers mlc.cuda.*
    g = tvm.get_global_func
    from cuda_fill import load_fill_random

    from mlc.support.cuda_arch import arch_for_compute_capability

    fill = load_fill_random(arch_for_compute_capability(dev.compute_version))
    q4_matmul = g("mlc.cuda.q4_matmul")
    set_paths, set_config = g("mlc.cuda.q4_set_paths"), g("mlc.cuda.q4_set_mma_config")
    ms = [int(v) for v in a.ms.split(",")]
    splits = [int(v) for v in a.splits.split(",")]
    scratch = tvm.runtime.empty((32 << 20,), "float32", dev)     # 128 MB
    busy = lambda: fill(scratch, 7, 0.0, 1.0)
    busy()
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(10):
        busy()
    dev.sync()
    busy_us = (time.perf_counter() - t0) / 10 * 1e6
    timer = Timer(dev, busy, busy_us)

    paths = {"gemv": ((0, 0), 0)}
    for s in splits:
        paths["mma" if s == 0 and len(splits) == 1 else f"mma/s{s}"] = ((1, 1 << 40), s)
    paths["cublas"] = ((0, 0), 0)

    def applicable(path, m):
        return (m <= 8) if path == "gemv" else (m > 8) if path == "cublas" else True

    rng = np.random.default_rng(0)
    results = []
    try:
        for n, k in SHAPES:
            wbytes = n * k // 2 + n * (k // 32) * 2
            copies = max(2, -(-3 * L2_BYTES // wbytes))
            weights = []
            for c in range(copies):
                qw = tvm.runtime.empty((n, k // 8), "uint32", dev)
                qs = tvm.runtime.empty((n, k // 32), "float16", dev)
                fill(qw, 1000 + 2 * c, 0.0, 0.0)
                fill(qs, 1001 + 2 * c, 0.001, 0.01)
                weights.append((qw, qs))
            for m in ms:
                x = tvm.runtime.tensor(rng.uniform(-1, 1, (m, k)).astype("float16"), dev)
                out = tvm.runtime.empty((m, n), "float16", dev)
                row = {"n": n, "k": k, "m": m, "weight_bytes": wbytes, "paths": {}}
                ref = None
                for path, ((lo, hi), split) in paths.items():
                    if not applicable(path, m):
                        continue
                    set_paths(lo, hi)
                    set_config(split, a.blocks_per_sm)
                    calls = [lambda w=weights[i % copies]: q4_matmul(x, w[0], w[1], out)
                             for i in range(a.runs + 5)]
                    us = timer.time_calls(calls)
                    entry = {"us": us, "gb_s": wbytes / us / 1e3,
                             "tflop_s": 2 * m * n * k / us / 1e6}
                    if not a.no_check:
                        q4_matmul(x, weights[0][0], weights[0][1], out)
                        got = out.numpy().astype("float32")
                        if ref is None:
                            ref = got
                        entry["max_rel_diff"] = float(
                            np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
                        if not np.isfinite(got).all():
                            entry["max_rel_diff"] = float("inf")
                    row["paths"][path] = entry
                results.append(row)
                print(f"N={n:6d} K={k:6d} M={m:4d}  " + "  ".join(
                    f"{pa}: {e['us']:8.1f} us {e['gb_s']:6.0f} GB/s {e['tflop_s']:6.1f} TF"
                    + (f" d={e['max_rel_diff']:.1e}" if "max_rel_diff" in e else "")
                    for pa, e in row["paths"].items()), flush=True)
            del weights
    finally:
        set_paths(*DEFAULT_PATHS)
        set_config(0, 0)

    # per M: one decode step's matmul time (4 shapes x 32 layers), per path and the best path
    print(f"\nsum over {len(SHAPES)} shapes x {LAYERS} layers (ms; the step's matmuls, no lm_head)")
    names = list(paths)
    print(f"{'M':>5} " + " ".join(f"{nm:>10}" for nm in names) + f" {'best':>10}  GB/s(best)")
    summary = []
    total_bytes = sum(n * k // 2 + n * (k // 32) * 2 for n, k in SHAPES) * LAYERS
    for m in ms:
        rows = [r for r in results if r["m"] == m]
        line = {"m": m}
        for nm in names:
            if all(nm in r["paths"] for r in rows):
                line[nm] = sum(r["paths"][nm]["us"] for r in rows) * LAYERS / 1e3
        line["best"] = sum(min(e["us"] for e in r["paths"].values()) for r in rows) * LAYERS / 1e3
        summary.append(line)
        print(f"{m:5d} " + " ".join(f"{line[nm]:10.3f}" if nm in line else f"{'-':>10}"
                                    for nm in names)
              + f" {line['best']:10.3f}  {total_bytes / line['best'] / 1e6:8.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": dev.device_name, "runs": a.runs, "layers": LAYERS,
                       "blocks_per_sm": a.blocks_per_sm, "results": results,
                       "summary": summary}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
