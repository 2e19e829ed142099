"""CPU benchmark: SmolLM2-135M prefill (64 and 512 tokens) and decode tok/s.

    python bench/cpu.py [--gguf PATH] [--quant q4f32_1,q4f16_1] [--threads 2] [--runs 5]
                        [--prefill 64,512] [--device cpu|cpu:x86-64-v3]
                        [--profile] [--opt O2] [--skip-hf] [--skip-llama-cpp]
                        [--memory [--context 2048]] [--out bench/cpu-results.json]

Compares, in one run and one process: mlc (each quantization, converted from the GGUF and
compiled for this CPU), transformers float32 (loaded from the same GGUF, torch threads =
--threads) and llama.cpp through llama-cpp-python when it is importable (skipped otherwise).
The engines take turns round by round (one warm-up round, then --runs rounds, each timing
every figure once), so a change of load on a shared machine hits them all alike; each figure
is the median of its rounds. Decode is timed over 32 steps after a 64-token prompt. `--profile` adds a per-kernel breakdown of one mlc prefill and decode step (VM
instrumentation; the attention kernels run inside the KV-cache builtin). `--memory` adds the
resident set of an mlc engine (MLCEngine) and of llama.cpp, each in a fresh process of its
own serving the same work at the same context size. Results are printed as a table and
written as JSON with the machine, command and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))     # the mlc of this checkout, not another one installed
CACHE = Path(os.environ.get("MLC_BENCH_CACHE", REPO / ".cache" / "bench"))
PREFILL_LENS = (64, 512)
DECODE_STEPS = 32


def _prompt(n: int, vocab: int = 49152, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.RandomState(seed).randint(100, min(vocab, 40000), size=n).tolist()


def _record(out: dict, name: str, rates: list[float]) -> None:
    """The median rate (the figure), and the best one: on a shared machine the best run is
    the closer estimate of what the code does on an idle one."""
    out[f"{name}_tok_s"] = statistics.median(rates)
    out[f"{name}_best_tok_s"] = max(rates)


def _gguf_default() -> Path:
    from mlc.compiler.sources import embedded_gguf_path

    return Path(embedded_gguf_path(quiet=True))


# ------------------------------------------------------------------------------ mlc


def prepare_mlc(gguf: Path, quantization: str, opt: str, device: str = "cpu"
                ) -> tuple[Path, Path]:
    """Convert the GGUF (once) and compile it for `device` (this CPU, or e.g.
    cpu:x86-64-v3 for plain AVX2 code); (dir, lib)."""
    from mlc.compiler.compile import compile_model
    from mlc.compiler.convert import convert

    model_dir = CACHE / f"smollm2-{quantization}"
    if not (model_dir / "mlc-chat-config.json").exists():
        convert(str(gguf), quantization, model_dir, overwrite=model_dir.exists(), quiet=True)
    lib = CACHE / f"smollm2-{quantization}-{device.replace(':', '-')}-{opt}.so"
    compile_model(model_dir, device, lib, opt=opt, quiet=True)
    return model_dir, lib


class MlcRunner:
    """The low-level runtime (`LoadedModel`) of one library; `round()` times each figure once."""

    def __init__(self, model_dir: Path, lib: Path):
        from mlc.runtime.model import KVCacheConfig, LoadedModel

        self.model = LoadedModel(model_dir, lib, device="cpu")
        self.model.create_kv_cache(KVCacheConfig(1, 4096, 512))
        self.seq = 0

    def fresh(self) -> int:
        self.seq += 1
        self.model.add_sequence(self.seq)
        return self.seq

    def round(self) -> dict[str, float]:
        out = {}
        for n in PREFILL_LENS:
            s = self.fresh()
            t = time.perf_counter()
            self.model.prefill([s], [_prompt(n)])
            out[f"prefill_{n}"] = n / (time.perf_counter() - t)
            self.model.remove_sequence(s)
        s = self.fresh()
        tok = int(self.model.prefill([s], [_prompt(64)])[0].argmax())
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            tok = int(self.model.decode([s], [tok])[0].argmax())
        out["decode"] = DECODE_STEPS / (time.perf_counter() - t)
        self.model.remove_sequence(s)
        return out


def profile_mlc(model, fresh) -> dict:
    """Milliseconds per VM call symbol for one 64-token prefill and one decode step."""
    from mlc.benchmark.model_bench import profile_vm_calls

    result = {}
    for phase in ("prefill_64", "decode"):
        s = fresh()
        if phase == "decode":
            model.prefill([s], [_prompt(64)])
            run, steps = (lambda: model.decode([s], [5])), 8
        else:
            run, steps = (lambda: model.prefill([s], [_prompt(64)])), 1
        result[phase] = profile_vm_calls(model, run, steps, top=12)
        model.remove_sequence(s)
    return result


# ------------------------------------------------------------------------------ references


class TransformersRunner:
    """transformers float32 (dequantized from the GGUF), greedy decode with its KV cache."""

    def __init__(self, gguf: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()

    def round(self) -> dict[str, float]:
        torch, model, out = self.torch, self.model, {}
        with torch.inference_mode():
            for n in PREFILL_LENS:
                t = time.perf_counter()
                model(torch.tensor([_prompt(n)]), use_cache=True)
                out[f"prefill_{n}"] = n / (time.perf_counter() - t)
            res = model(torch.tensor([_prompt(64)]), use_cache=True)
            past, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(DECODE_STEPS):
                res = model(tok, past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
            out["decode"] = DECODE_STEPS / (time.perf_counter() - t)
        return out


def _llama_next_token(llm) -> int:
    """Greedy next token after `llm.eval`. (`llm.scores` is only filled with logits_all=True
    in llama-cpp-python 0.3.x: reading it gave token 0 at every step.)"""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the same GGUF."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_batch=512,
                         verbose=False)

    def round(self) -> dict[str, float]:
        llm, out = self.llm, {}
        for n in PREFILL_LENS:
            llm.reset()
            t = time.perf_counter()
            llm.eval(_prompt(n))
            out[f"prefill_{n}"] = n / (time.perf_counter() - t)
        llm.reset()
        llm.eval(_prompt(64))
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            llm.eval([_llama_next_token(llm)])
        out["decode"] = DECODE_STEPS / (time.perf_counter() - t)
        return out


def run_alternating(runners: dict, runs: int) -> dict[str, dict]:
    """Each engine's figures, the engines taking turns round by round (one warm-up round,
    then `runs`), so a change of the machine's load hits them all alike; medians."""
    rates: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    for r in range(runs + 1):
        for name, runner in runners.items():
            for key, rate in runner.round().items():
                if r:
                    rates[name].setdefault(key, []).append(rate)
    out: dict[str, dict] = {}
    for name, figures in rates.items():
        out[name] = {}
        for key, values in figures.items():
            _record(out[name], key, values)
    return out


# ------------------------------------------------------------------------------ memory
# Each engine's resident set is measured in a process of its own (a fresh interpreter: the
# other engine's libraries and buffers are not in it), serving the same work: a context of
# --context tokens, a 512-token prompt, then 64 generated tokens. torch is kept out of both
# (it is not a dependency of either, but tvm_ffi imports it whenever it is installed, +210
# MiB). mlc is measured twice: with TVM's runtime-only library (what a process that serves a
# compiled library needs) and with the full TVM (+ the 260 MB compiler library).
MEMORY_PROMPT, MEMORY_TOKENS = 512, 64


def memory_child(kind: str, args) -> dict:
    """In a child process: load one engine, serve the work, report its resident set (MiB)."""
    sys.modules["torch"] = None          # an ImportError for tvm_ffi's optional import
    from mlc.support.memory import reset_peak_rss, resident_set_mib

    prompt = _prompt(MEMORY_PROMPT)
    out = {"python": resident_set_mib()["rss"]}           # the interpreter and numpy
    if kind == "mlc":
        from tvm.runtime import vm  # noqa: F401 - what the engine loads, counted in "base"

        import mlc.runtime.engine  # noqa: F401
        from mlc import MLCEngine
    else:
        from llama_cpp import Llama
    reset_peak_rss()
    out["base"] = resident_set_mib()["rss"]               # + the engine's code
    if kind == "mlc":
        engine = MLCEngine(str(args.model_dir), "cpu", model_lib=str(args.lib),
                           mode="interactive", max_batch_size=1,
                           max_total_sequence_length=args.context, prefill_chunk_size=512)
        out["loaded"] = resident_set_mib()["rss"]
        engine.completions.create(prompt=prompt, max_tokens=MEMORY_TOKENS, temperature=0,
                                  ignore_eos=True)
        out["end"] = resident_set_mib()["rss"]
        engine.terminate()
    else:
        llm = Llama(model_path=str(args.gguf), n_ctx=args.context, n_threads=args.threads,
                    n_batch=512, verbose=False)
        out["loaded"] = resident_set_mib()["rss"]
        llm.eval(prompt)
        for _ in range(MEMORY_TOKENS):
            llm.eval([_llama_next_token(llm)])
        out["end"] = resident_set_mib()["rss"]
    out["peak"] = resident_set_mib()["peak"]
    return out


def bench_memory(kind: str, gguf: Path, context: int, threads: int,
                 model_dir: Path | None = None, lib: Path | None = None,
                 runtime_only: bool = False) -> dict | None:
    """Run `memory_child` in a fresh interpreter; None when that engine is unavailable."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", kind,
           "--gguf", str(gguf), "--context", str(context), "--threads", str(threads)]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir), "--lib", str(lib)]
    env = {**os.environ, "TVM_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
    env.pop("TVM_USE_RUNTIME_LIB", None)
    if runtime_only:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if "No module named 'llama_cpp'" in proc.stderr:
            return None
        raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_table(rows: dict, context: int) -> None:
    print(f"\nResident set (MiB), one process per engine: context {context} tokens, "
          f"a {MEMORY_PROMPT}-token prompt, {MEMORY_TOKENS} generated tokens")
    print("| engine | python + numpy | + engine code | loaded | after serving | peak | "
          "model (peak - code) |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        if m is None:
            print(f"| {name} | skipped (not installed) | | | | | |")
            continue
        print(f"| {name} | {m['python']:.0f} | {m['base']:.0f} | {m['loaded']:.0f} | "
              f"{m['end']:.0f} | {m['peak']:.0f} | {m['peak'] - m['base']:.0f} |")


# ------------------------------------------------------------------------------ main


def _machine(device: str = "cpu") -> dict:
    from mlc.compiler.target import parse_device
    from mlc.support.cpu_info import NOTABLE_FEATURES, cpu_model, describe_cpu_target, host_flags

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    flags = [f for f in host_flags() if f.replace("_", "") in
             {n.replace(".", "").replace("-", "") for n in NOTABLE_FEATURES}]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "host_flags": flags,
            "compiled_for": describe_cpu_target(parse_device(device).tvm_target()),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_start": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--quant", default="q4f32_1,q4f16_1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--opt", default="O2")
    ap.add_argument("--device", default="cpu",
                    help="what mlc compiles for: cpu (this CPU) or cpu:MCPU, e.g. cpu:x86-64-v3")
    ap.add_argument("--prefill", default="64,512", help="prompt lengths to time")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--memory", action="store_true",
                    help="also measure each engine's resident set, in separate processes")
    ap.add_argument("--context", type=int, default=2048, help="context size for --memory")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "cpu-results.json")
    ap.add_argument("--memory-child", choices=("mlc", "llama.cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--lib", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)   # read when TVM's pool starts
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return 0
    global PREFILL_LENS
    PREFILL_LENS = tuple(int(n) for n in args.prefill.split(","))
    gguf = args.gguf or _gguf_default()
    runners: dict = {}
    memory: dict[str, dict | None] = {}
    for q in filter(None, args.quant.split(",")):
        model_dir, lib = prepare_mlc(gguf, q, args.opt, args.device)
        tag = args.opt if args.device == "cpu" else f"{args.opt}, {args.device}"
        runners[f"mlc {q} ({tag})"] = MlcRunner(model_dir, lib)
        if args.memory:
            for runtime_only, tvm in ((True, "runtime-only TVM"), (False, "full TVM")):
                memory[f"mlc {q} engine, {tvm}"] = bench_memory(
                    "mlc", gguf, args.context, args.threads, model_dir, lib, runtime_only)
    if not args.skip_hf:
        runners["transformers float32"] = TransformersRunner(gguf, args.threads)
    llama_name = "llama.cpp (llama-cpp-python)"
    if not args.skip_llama_cpp:
        try:
            runners[llama_name] = LlamaCppRunner(gguf, args.threads)
        except ImportError:
            pass
        if args.memory:
            memory[llama_name] = bench_memory("llama.cpp", gguf, args.context, args.threads)
    rows: dict[str, dict | None] = run_alternating(runners, args.runs)
    if not args.skip_llama_cpp and llama_name not in rows:
        rows[llama_name] = None                          # not installed
    if args.profile:
        for name, runner in runners.items():
            if isinstance(runner, MlcRunner):
                rows[name]["profile"] = profile_mlc(runner.model, runner.fresh)
    cols = [f"prefill_{n}_tok_s" for n in PREFILL_LENS] + ["decode_tok_s"]
    print(f"\nSmolLM2-135M on {_machine()['cpu']}, {args.threads} threads, "
          f"median of {args.runs} alternating rounds (tok/s)")
    print(f"| engine | {' | '.join(c.replace('_tok_s', '') for c in cols)} |"
          "  (median; best run in parentheses)")
    print(f"|---|{'---|' * len(cols)}")
    for name, row in rows.items():
        cells = ["skipped (not installed)"] * len(cols) if row is None else \
            [f"{row[c]:.1f} ({row[c.replace('_tok_s', '_best_tok_s')]:.0f})" for c in cols]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.memory:
        _memory_table(memory, args.context)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": _machine(args.device), "threads": args.threads, "runs": args.runs,
              "gguf": str(gguf), "results": rows,
              **({"resident_set_mib": {"context": args.context, "prompt": MEMORY_PROMPT,
                                       "generated": MEMORY_TOKENS, "engines": memory}}
                 if args.memory else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
