"""`mlc compile MODEL_DIR --device D -o LIB.so`: build the device library of a model dir."""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from pathlib import Path

import click

from mlc.compiler.compile import OPT_LEVELS, OVERRIDABLE, compile_model
from mlc.compiler.target import UNSUPPORTED

DEVICES = {
    "auto": "cuda:sm_XX of the local GPU, else cpu (default)",
    "cpu": "this machine's CPU (llvm, host arch)",
    "cpu:MCPU": "another x86/Arm CPU by LLVM name: cpu:x86-64-v3 runs on any AVX2 CPU, "
                "cpu:x86-64-v4 on any AVX-512 CPU; also cpu:znver4, cpu:sapphirerapids, ...",
    "cuda:sm_XX": "NVIDIA, e.g. cuda:sm_90a (H100), cuda:sm_80 (A100); plain `cuda` needs a "
                  "local GPU to read the arch from",
    "opencl": "OpenCL GPUs (kernels as OpenCL C inside the .so)",
    "webgpu": "browsers: -o NAME.tar (wasm32 objects + WGSL), or NAME.wasm with emscripten",
}


def _help_table(rows: dict[str, str]) -> str:
    width = max(map(len, rows))
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows.items())


EPILOG = (
    "\b\nDevices:\n" + _help_table(DEVICES) + "\n"
    + f"  (not buildable with the PyPI TVM wheel: {', '.join(UNSUPPORTED)})\n\n"
    + "\b\nOptimization levels (--opt):\n" + _help_table(OPT_LEVELS) + "\n\n"
    + "\b\nOverrides (--overrides \"KEY=INT;KEY=INT\"):\n  " + ", ".join(OVERRIDABLE) + "\n\n"
    + "\b\nExample:\n  mlc compile ./SmolLM2-q4f16_1-MLC --device cuda:sm_90a -o smollm2-cuda.so"
)


@contextlib.contextmanager
def _progress(message: str, quiet: bool):
    """A spinner with the elapsed time on a terminal's stderr; one line when not a terminal."""
    if quiet:
        yield
        return
    if not sys.stderr.isatty():
        click.echo(f"{message} ...", err=True)
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def spin():
        for frame in itertools.cycle("|/-\\"):
            click.echo(f"\r{frame} {message} {time.perf_counter() - start:5.1f} s", err=True,
                       nl=False)
            if done.wait(0.1):
                break
        click.echo("\r\033[K", err=True, nl=False)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@click.command("compile", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--device", "-d", default="auto", show_default=True,
              help="Target device: auto, cpu, cuda, cuda:sm_XX, opencl, webgpu (see below).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The library to write (.so; .tar or .wasm for webgpu).")
@click.option("--quantization", default=None,
              help="Check that MODEL_DIR holds weights of this quantization (e.g. q4f16_1).")
@click.option("--opt", default="O2", show_default=True,
              help=f"Optimization level: {', '.join(OPT_LEVELS)} (see below).")
@click.option("--overrides", default=None, metavar="KEY=INT;...",
              help="Override build sizes, e.g. \"context_window_size=4096;max_batch_size=8\".")
@click.option("--quiet", "-q", is_flag=True, help="No progress output; print only the result.")
def compile_cmd(model_dir: Path, device: str, output: Path, quantization: str | None, opt: str,
                overrides: str | None, quiet: bool) -> None:
    """Compile the MLC model dir MODEL_DIR (from `mlc convert`) into a device library."""
    with _progress(f"compiling {model_dir.name} for {device}", quiet):
        result = compile_model(model_dir, device, output, quantization=quantization,
                               opt=opt.upper(), overrides=overrides, quiet=True)
    meta = result.metadata
    click.echo(f"compiled {meta.get('model_type')} {meta.get('quantization')} for "
               f"{result.device} ({opt.upper()}) in {result.seconds:.1f} s: {result.path}")
    if "cpu" in meta:               # which CPU the code is for: it may not run on another
        cpu = meta["cpu"]
        click.echo(f"  host CPU: {cpu['cpu_model']}; code for -mcpu={cpu['mcpu']} "
                   f"({' '.join(cpu['features']) or 'baseline x86-64'})")
