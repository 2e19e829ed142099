"""`mlc bench`: prefill, decode and batched-decode throughput of a model library.

Times the model's own calls (embedding, forward, logits copied to the host) through
`LoadedModel`, so the figures are the engine's per-step cost without sampling. Every figure is
the median of several runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mlc.runtime.model import KVCacheConfig, LoadedModel
from mlc.support.memory import resident_set_mib


@dataclass
class BenchResult:
    model: str
    quantization: str
    device: str
    engine: str = "mlc"
    prefill_tok_s: dict[int, float] = field(default_factory=dict)
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tok_s: dict[int, float] = field(default_factory=dict)     # batch -> total tok/s
    decode_step_ms: dict[int, float] = field(default_factory=dict)
    decode_context: int = 16                      # tokens in each sequence's cache at decode
    peak_memory_gib: float | None = None
    # the process's resident set (host memory, MiB): before the model was loaded, once the
    # weights and KV cache were in place, at the end, and the peak since the load began
    rss_mib: dict[str, float] = field(default_factory=dict)
    load_seconds: float | None = None             # library + weights + first call of each kind
    cuda_compile_seconds: float | None = None     # of which: compiling TVM's CUDA source (NVRTC)
    cuda_kernels_precompiled: bool | None = None  # the library carried a cubin of it instead
    runs: int = 0
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))


def gpu_memory_used_gib() -> float | None:
    """Used memory of GPU 0 as nvidia-smi sees it (None without a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=10).stdout
        return float(out.strip().splitlines()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def load_and_warm_up(model_dir, model_lib, device: str, dummy: bool = False):
    """Load a model and make one tiny prefill and decode call, so every lazily loaded piece
    (the library, its CUDA modules, the weights) is counted. Returns (model, load figures)."""
    from mlc.runtime import device as rt_device

    before = dict(rt_device.CUDA_LOAD_STATS)
    t0 = time.perf_counter()
    model = LoadedModel(model_dir, model_lib, device, dummy=dummy)
    model.create_kv_cache(KVCacheConfig(1, 64, 16))
    model.add_sequence(0)
    model.prefill([0], [[1, 2, 3, 4]])
    model.decode([0], [5])
    model.remove_sequence(0)
    model.device.sync()
    seconds = time.perf_counter() - t0
    stats = rt_device.CUDA_LOAD_STATS
    cuda = model.device_kind == "cuda"
    return model, {
        "load_seconds": seconds,
        "cuda_compile_seconds": (stats["compile_seconds"] - before["compile_seconds"]
                                 if cuda else None),
        "cuda_kernels_precompiled": (stats["precompiled"] > before["precompiled"]
                                     if cuda else None)}


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_vm_calls(model: LoadedModel, run, steps: int, top: int = 25) -> dict:
    """Milliseconds per VM call symbol (kernel, CUDA graph launch, builtin) per step of
    `run()`, through the VM's instrumentation hook, with a device sync on both sides of each
    call so its time includes its device work. Sorted by total time."""
    stats: dict = {}
    start: dict = {}

    def instrument(_func, symbol, before, _ret, *_args):
        model.device.sync()
        if before:
            start[symbol] = time.perf_counter()
        else:
            calls, seconds = stats.get(symbol, (0, 0.0))
            stats[symbol] = (calls + 1, seconds + time.perf_counter() - start[symbol])
        return 0

    model.vm.set_instrument(instrument)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            run()
    finally:
        model.vm.set_instrument(lambda *a: 0)
    total = (time.perf_counter() - t0) / steps
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][1])[:top]
    return {"total_ms": total * 1e3,
            "calls": {s: {"calls": c // steps, "ms": t / steps * 1e3} for s, (c, t) in ranked}}


def bench_model(model: LoadedModel, name: str, prompt_lengths=(128, 512, 2048),
                decode_tokens: int = 256, batches=(1, 8, 32, 64), runs: int = 5,
                seed: int = 0, prefill_chunk: int | None = None,
                decode_context: int = 16) -> BenchResult:
    """Measure prefill tok/s and TTFT per prompt length and decode tok/s per batch size, with
    `decode_context` tokens in each sequence's KV cache while decoding."""
    rng = np.random.default_rng(seed)
    vocab = model.vocab_size
    meta = model.metadata
    max_batch = min(max(batches), meta["max_batch_size"])
    chunk = min(prefill_chunk or meta["prefill_chunk_size"], meta["prefill_chunk_size"])
    total = max(max(prompt_lengths) + 16, max_batch * (decode_context + decode_tokens + 32))
    total = min(total, max(meta["context_window_size"], max(prompt_lengths) + 16) * max_batch)
    model.create_kv_cache(KVCacheConfig(max_batch, total, chunk))
    res = BenchResult(name, meta["quantization"], model.device_kind, runs=runs,
                      decode_context=decode_context)
    res.rss_mib["loaded"] = resident_set_mib().get("rss", 0.0)
    peak = gpu_memory_used_gib()

    def prefill(n: int):
        model.add_sequence(0)
        ids = rng.integers(0, vocab, size=n).tolist()
        for start in range(0, n, chunk):
            model.prefill([0], [ids[start:start + chunk]])
        model.remove_sequence(0)

    for n in prompt_lengths:
        prefill(n)                                    # warm up (and CUDA module load)
        t = _median_time(lambda: prefill(n), runs)
        res.prefill_tok_s[n] = n / t
        res.ttft_ms[n] = t * 1000
    for b in batches:
        if b > max_batch:
            continue
        steps = decode_tokens if b == 1 else max(16, decode_tokens // 4)
        seqs = list(range(100, 100 + b))
        for s in seqs:
            model.add_sequence(s)
            context = rng.integers(0, vocab, size=decode_context).tolist()
            for start in range(0, decode_context, chunk):
                model.prefill([s], [context[start:start + chunk]])
        toks = rng.integers(0, vocab, size=b).tolist()
        model.decode(seqs, toks)                      # warm up
        step_times = []
        for _ in range(max(1, runs // 2)):
            t0 = time.perf_counter()
            for _ in range(steps):
                model.decode(seqs, toks)
            step_times.append((time.perf_counter() - t0) / steps)
            for s in seqs:
                model.popn(s, steps)                  # keep the context length fixed
        step = statistics.median(step_times)
        res.decode_step_ms[b] = step * 1000
        res.decode_tok_s[b] = b / step
        for s in seqs:
            model.remove_sequence(s)
        used = gpu_memory_used_gib()
        peak = max(peak or 0, used or 0) or None
    res.peak_memory_gib = peak
    res.rss_mib["end"] = resident_set_mib().get("rss", 0.0)
    res.rss_mib["peak"] = resident_set_mib()["peak"]
    return res


def format_table(results: list[BenchResult]) -> str:
    """A markdown table; with two results, the second column is the ratio mlc / other."""
    lines = ["| figure | " + " | ".join(f"{r.engine} ({r.quantization})" for r in results) +
             (" | ratio |" if len(results) == 2 else " |"),
             "|---|" + "---|" * (len(results) + (1 if len(results) == 2 else 0))]

    def row(label, values):
        cells = [f"{v:,.1f}" if v is not None else "-" for v in values]
        ratio = ""
        if len(values) == 2:
            ratio = f" {values[0] / values[1]:.2f}x |" if values[0] and values[1] else " - |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)

    keys = sorted({k for r in results for k in r.prefill_tok_s})
    for n in keys:
        row(f"prefill {n} tok/s", [r.prefill_tok_s.get(n) for r in results])
    for n in keys:
        row(f"TTFT {n} ms", [r.ttft_ms.get(n) for r in results])
    for b in sorted({k for r in results for k in r.decode_tok_s}):
        ctx = results[0].decode_context
        row(f"decode batch {b} tok/s" + (f" (context {ctx})" if ctx != 16 else ""),
            [r.decode_tok_s.get(b) for r in results])
    row("peak memory GiB", [r.peak_memory_gib for r in results])
    row("load s (to the first token)", [r.load_seconds for r in results])
    if any(r.cuda_compile_seconds is not None for r in results):
        row("of which compiling CUDA source s", [r.cuda_compile_seconds for r in results])
    for key, label in (("base", "before load"), ("loaded", "loaded"), ("end", "at the end"),
                       ("peak", "peak")):
        if any(key in r.rss_mib for r in results):
            row(f"resident set MiB, {label}", [r.rss_mib.get(key) for r in results])
    return "\n".join(lines)


def save_results(results: list[BenchResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return path
