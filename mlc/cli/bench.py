"""`mlc bench`: throughput of a model library, optionally beside transformers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def preset_model_dir(preset: str, quantization: str, dest: Path) -> Path:
    """An MLC model dir without weights (for --dummy): just its mlc-chat-config.json."""
    from mlc.models.presets import get_preset
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig

    hf = get_preset(preset)
    config = get_model(hf["model_type"]).config_from_hf(hf)
    dest.mkdir(parents=True, exist_ok=True)
    ChatConfig(model_type=hf["model_type"], quantization=quantization,
               model_config=config.to_dict(), vocab_size=config.vocab_size,
               context_window_size=config.context_window_size,
               prefill_chunk_size=config.prefill_chunk_size,
               sliding_window_size=config.sliding_window_size,
               source=f"preset:{preset}").save(dest)
    return dest


@click.command("bench")
@click.argument("model", required=False)
@click.option("--model-config", help="A preset architecture (e.g. llama-3-8b) for --dummy.")
@click.option("--quantization", "-q", default="q4f16_1", show_default=True)
@click.option("--dummy", is_flag=True, help="Random weights of the right shapes.")
@click.option("--device", default="auto", show_default=True)
@click.option("--model-lib", help="A compiled library (else compiled on demand and cached).")
@click.option("--prompts", default="128,512,2048", show_default=True)
@click.option("--batches", default="1,8,32,64", show_default=True)
@click.option("--decode-tokens", default=256, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--prefill-chunk", type=int, help="Prefill in chunks of this many tokens.")
@click.option("--decode-context", default=16, show_default=True,
              help="Tokens already in each sequence's KV cache while decode is timed.")
@click.option("--compare-transformers", is_flag=True, help="Run transformers fp16 too.")
@click.option("--json", "json_out", type=click.Path(), help="Write the results here.")
def bench(model, model_config, quantization, dummy, device, model_lib, prompts, batches,
          decode_tokens, runs, prefill_chunk, decode_context, compare_transformers, json_out):
    """Prefill tok/s, TTFT, and decode tok/s at several batch sizes (medians of runs)."""
    from mlc.benchmark.model_bench import bench_model, format_table, load_and_warm_up, save_results
    from mlc.errors import MLCError
    from mlc.runtime.device import parse_runtime_device
    from mlc.support.memory import reset_peak_rss, resident_set_mib

    if not model and not model_config:
        raise MLCError("Give a MODEL dir or --model-config PRESET (with --dummy).")
    if model_config and not dummy:
        raise MLCError("--model-config needs --dummy (no weights can be fetched for a preset).")
    name = model_config or Path(model).name
    if model_config:
        model = preset_model_dir(model_config, quantization,
                                 Path(tempfile.mkdtemp(prefix="mlc-bench-")))
    if model_lib is None:
        from mlc.runtime.jit import find_or_build_library

        kind, dev = parse_runtime_device(device)
        model_lib = find_or_build_library(Path(model), kind, dev)
    from tvm.runtime import vm  # noqa: F401 - TVM's code counts in "before load"

    reset_peak_rss()           # the peak from here on: not the compile that may have run
    base = resident_set_mib().get("rss")
    loaded, load = load_and_warm_up(model, model_lib, device, dummy)
    results = [bench_model(loaded, name, _ints(prompts), decode_tokens, _ints(batches), runs,
                           prefill_chunk=prefill_chunk, decode_context=decode_context)]
    results[0].load_seconds = load["load_seconds"]
    results[0].cuda_compile_seconds = load["cuda_compile_seconds"]
    results[0].cuda_kernels_precompiled = load["cuda_kernels_precompiled"]
    if base is not None:
        results[0].rss_mib["base"] = base
    del loaded
    if compare_transformers:
        from mlc.benchmark.transformers_bench import bench_transformers
        from mlc.support.chat_config import ChatConfig

        chat = ChatConfig.load(model)
        hf = {"model_type": chat.model_type, **_hf_fields(chat.model_config)}
        results.append(bench_transformers(hf, name, _ints(prompts), decode_tokens,
                                          _ints(batches), runs, decode_context=decode_context))
    click.echo(format_table(results))
    if json_out:
        save_results(results, json_out)
        click.echo(f"wrote {json_out}")


def _hf_fields(cfg: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
            "tie_word_embeddings", "head_dim")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    out["max_position_embeddings"] = cfg.get("context_window_size", 4096)
    return out


__all__ = ["bench", "json"]
