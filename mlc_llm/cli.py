"""The `mlc_llm` command: MLC-LLM's verbs and arguments, run by mlc.

    mlc_llm convert_weight HF_DIR --quantization q4f16_1 -o OUT     -> mlc convert
    mlc_llm gen_config HF_DIR --quantization q4f16_1 [--conv-template chatml] -o OUT
    mlc_llm compile OUT --device cpu -o OUT/lib.so                   -> mlc compile
    mlc_llm serve OUT [--model-lib LIB] [--overrides "max_num_sequence=8"]   -> mlc serve
    mlc_llm serve OUT --speculative-mode eagle --additional-models HEAD[,HEAD_LIB] \
        --overrides "spec_draft_length=4"       -> mlc serve ... --additional-models HEAD:LIB
    mlc_llm chat OUT                                                 -> mlc chat
    mlc_llm bench OUT [--generate-length 256]                        -> mlc bench

MLC-LLM writes weights (`convert_weight`) and the chat config (`gen_config`) in two steps, in
either order, into one output dir; mlc's convert writes both at once. Here each step writes
its part: `convert_weight` keeps a chat config that `gen_config` wrote before (after checking
that it describes the same model), and `gen_config` builds the chat config exactly as
`mlc convert` does (same code), then applies its options. An MLC-LLM option mlc does not
support stops the command with a message saying so and what to do instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from mlc.errors import MLCError

# Model-config keys that size buffers and caches rather than describe the architecture: two
# chat configs of one model may differ in them.
_SIZING_KEYS = ("context_window_size", "prefill_chunk_size", "sliding_window_size",
                "max_batch_size", "tensor_parallel_shards")

# MLC-LLM verbs mlc has no counterpart for, with what to do instead.
UNSUPPORTED_VERBS = {
    "package": "mlc builds no iOS/Android packages; compile a library per device with "
               "`mlc_llm compile MODEL --device DEVICE -o LIB`.",
    "calibrate": "mlc has no calibration-based quantization; use q4f16_1, q4f32_1, q0f16 or "
                 "q0f32 with `mlc_llm convert_weight`.",
    "router": "mlc has no multi-engine router; run one `mlc_llm serve` per model.",
    "worker": "mlc has no disaggregated workers; use `mlc_llm serve`.",
}


class _Verbs(click.Group):
    """MLC-LLM's verbs; its verbs that mlc lacks answer with what to do instead."""

    def get_command(self, ctx, name):
        if name in UNSUPPORTED_VERBS:
            @click.command(name, context_settings={"ignore_unknown_options": True,
                                                   "allow_extra_args": True})
            def unsupported():
                raise click.UsageError(f"`mlc_llm {name}` is not supported: "
                                       f"{UNSUPPORTED_VERBS[name]}")
            return unsupported
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MLCError as e:
            click.echo(f"error: {e.message}", err=True)
            sys.exit(2)


@click.group(cls=_Verbs, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MLC-LLM's command line (convert_weight, gen_config, compile, serve, chat, bench),
    run by mlc. `mlc --help` lists mlc's own commands."""


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _unsupported(option: str, reason: str) -> click.UsageError:
    return click.UsageError(f"{option} is not supported by mlc: {reason}")


def _mlc_command(name: str) -> click.Command:
    from mlc.cli.main import cli as mlc_cli

    return mlc_cli.get_command(click.Context(mlc_cli), name)


def _has_option(command: click.Command, option: str) -> bool:
    return any(option in p.opts for p in command.params)


def _run_mlc(name: str, argv: list[str]) -> None:
    """Run `mlc NAME ARGV...` in this process."""
    command = _mlc_command(name)
    click.echo(f"(running: mlc {name} {' '.join(argv)})", err=True)
    command.main(argv, prog_name=f"mlc {name}", standalone_mode=False)


def _explicit(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option `name` (rather than it keeping its default)."""
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _parse_pairs(text: str, option: str) -> dict[str, str]:
    """MLC-LLM's `"KEY=VALUE;KEY=VALUE"` override strings."""
    pairs = {}
    for item in filter(None, (s.strip() for s in (text or "").split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"Bad {option} item {item!r}: expected KEY=VALUE, "
                                   "separated by ';'.")
        pairs[key.strip()] = value.strip()
    return pairs


def _map_overrides(text: str, table: dict[str, str | None], command: click.Command,
                   verb: str) -> list[str]:
    """Turn MLC-LLM `--overrides` into options of mlc's `command`: `table` maps each key
    MLC-LLM documents to the mlc option that does the same (None: mlc has none)."""
    argv: list[str] = []
    for key, value in _parse_pairs(text, "--overrides").items():
        if key not in table:
            raise click.UsageError(f"Unknown --overrides key {key!r}; MLC-LLM's keys for "
                                   f"{verb} are {', '.join(table)}.")
        option = table[key]
        if value in ("", "None"):
            continue
        if option is None or not _has_option(command, option):
            usable = [k for k, o in table.items() if o and _has_option(command, o)]
            raise _unsupported(f"--overrides {key}", f"`mlc {command.name}` has no such "
                               f"setting (usable keys: {', '.join(usable) or 'none'}).")
        argv += [option, value]
    return argv


def _model_dir_of(path: str) -> Path:
    """MLC-LLM takes a model dir or the mlc-chat-config.json inside it."""
    p = Path(path).expanduser()
    return p.parent if p.is_file() and p.suffix == ".json" else p


def _check_model_type(given: str, actual: str | None, where: str) -> None:
    if given != "auto" and actual is not None and given != actual:
        raise click.UsageError(f"--model-type {given} disagrees with {where}, which says "
                               f"model_type={actual}; mlc reads the architecture from there "
                               "(drop --model-type).")


# ---------------------------------------------------------------------------------------------
# convert_weight and gen_config: one MLC model dir, written in two steps


def _source_of(config: str, source: str) -> str:
    """The mlc convert SOURCE for MLC-LLM's CONFIG (config.json or its dir) and --source."""
    path = Path(config).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    src = str(path) if path.exists() else config         # HF://org/repo, a .gguf, a name
    if source != "auto" and Path(source).expanduser().resolve() != Path(src).resolve():
        raise _unsupported("--source", "mlc reads the config and the weights from one place. "
                           "Pass the dir holding config.json and the *.safetensors (or a .gguf "
                           "file, or HF://org/repo) as CONFIG, without --source.")
    return src


def _hf_model_type(source: str) -> str | None:
    """The model_type mlc converts a local HF dir as (an EAGLE head's config says "llama":
    its weights tell, see `mlc.models.registry.model_type_of`)."""
    import json

    from mlc.models.registry import model_type_of

    config = Path(source, "config.json")
    if not config.is_file():
        return None
    hf = json.loads(config.read_text(encoding="utf-8"))
    try:
        from mlc.compiler.sources.hf_dir import HFDirSource

        with HFDirSource(source) as src:
            return model_type_of(hf, src.tensor_names())
    except MLCError:
        return hf.get("model_type")     # no weights here (yet): the config's word


def _architecture(chat) -> dict[str, Any]:
    return {k: v for k, v in chat.model_config.items() if k not in _SIZING_KEYS}


def _check_same_model(existing, new, out: Path, redo: str) -> None:
    """Refuse to pair weights and a chat config of different models or quantizations."""
    problems = []
    for name in ("model_type", "quantization", "tensor_parallel_shards"):
        if getattr(existing, name) != getattr(new, name):
            problems.append(f"{name} {getattr(existing, name)} there, {getattr(new, name)} here")
    if not problems and _architecture(existing) != _architecture(new):
        problems.append("the architecture configs differ (another model)")
    if problems:
        from mlc.errors import ConvertError

        raise ConvertError(
            f"{out} already holds a model that does not match this one ({'; '.join(problems)}). "
            f"{redo}, or write into an empty output dir.")


_WEIGHT_INDEXES = ("tensor-cache.json", "ndarray-cache.json")


@cli.command("convert_weight")
@click.argument("config")
@click.option("--quantization", required=True,
              help="q0f32, q0f16, q4f16_1 or q4f32_1 (MLC-LLM's names and rules).")
@click.option("--model-type", default="auto", show_default=True,
              help="Architecture; mlc reads it from config.json (auto).")
@click.option("--device", default="auto", show_default=True,
              help="Accepted for MLC-LLM's sake: mlc quantizes on the CPU.")
@click.option("--source", default="auto", show_default=True,
              help="Where the weights are: mlc reads them next to config.json.")
@click.option("--source-format", default="auto", show_default=True,
              type=click.Choice(["auto", "huggingface-torch", "huggingface-safetensor",
                                 "awq"]))
@click.option("--output", "-o", required=True, help="The MLC model dir to write into.")
@click.option("--lora-adapter", default=None, help="Not supported by mlc.")
def convert_weight(config: str, quantization: str, model_type: str, device: str, source: str,
                   source_format: str, output: str, lora_adapter: str | None) -> None:
    """Quantize the weights of CONFIG (an HF dir or its config.json; also a .gguf file or
    HF://org/repo) into the MLC model dir OUTPUT (`mlc convert`)."""
    from mlc.compiler.convert import convert
    from mlc.support.chat_config import CHAT_CONFIG_NAME, ChatConfig

    if lora_adapter:
        raise _unsupported("--lora-adapter", "merge the adapter into the base model first "
                           "(peft's merge_and_unload, then save_pretrained) and convert that.")
    if source_format == "awq":
        raise _unsupported("--source-format awq", "convert the unquantized HF weights with "
                           "--quantization q4f16_1 instead.")
    if device not in ("auto", "cpu"):
        click.echo(f"note: --device {device} is ignored: mlc quantizes on the CPU.", err=True)
    src = _source_of(config, source)
    _check_model_type(model_type, _hf_model_type(src), f"{src}/config.json")
    out = Path(output).expanduser().absolute()
    existing = ChatConfig.load(out) if (out / CHAT_CONFIG_NAME).is_file() else None
    overrides = {"tensor_parallel_shards": existing.tensor_parallel_shards} if existing else None
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert_weight-", dir=out))
    try:
        converted = convert(src, quantization, work / "model", overrides=overrides)
        new = ChatConfig.load(converted)
        if existing is not None:
            _check_same_model(existing, new, out, "Run gen_config again with the same CONFIG "
                              "and --quantization")
            (converted / CHAT_CONFIG_NAME).unlink()     # keep the one gen_config wrote
        for name in _WEIGHT_INDEXES:
            (out / name).unlink(missing_ok=True)
        for shard in out.glob("params_shard_*.bin"):
            shard.unlink()
        for item in converted.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept = " (kept the existing mlc-chat-config.json)" if existing else ""
    click.echo(f"Converted {src} -> {out} ({quantization}){kept}")


@cli.command("gen_config")
@click.argument("config")
@click.option("--quantization", required=True, help="The quantization the weights use.")
@click.option("--model-type", default="auto", show_default=True,
              help="Architecture; mlc reads it from config.json (auto).")
@click.option("--conv-template", default=None,
              help="Prompt format. Built into mlc: chatml, llama-2, llama-3. Without it (or "
                   "with a name mlc lacks) the model's own HF chat_template is used.")
@click.option("--context-window-size", type=int, default=None)
@click.option("--sliding-window-size", type=int, default=None)
@click.option("--prefill-chunk-size", type=int, default=None)
@click.option("--attention-sink-size", type=int, default=None, help="Only 0 (mlc has none).")
@click.option("--tensor-parallel-shards", type=int, default=None)
@click.option("--pipeline-parallel-stages", type=int, default=None, help="Only 1.")
@click.option("--disaggregation", type=bool, default=None, help="Only false.")
@click.option("--max-batch-size", type=int, default=None,
              help="Most sequences a compiled library batches (mlc's default: 64).")
@click.option("--output", "-o", required=True, help="The MLC model dir to write into.")
def gen_config(config: str, quantization: str, model_type: str, conv_template: str | None,
               context_window_size: int | None, sliding_window_size: int | None,
               prefill_chunk_size: int | None, attention_sink_size: int | None,
               tensor_parallel_shards: int | None, pipeline_parallel_stages: int | None,
               disaggregation: bool | None, max_batch_size: int | None, output: str) -> None:
    """Write OUTPUT/mlc-chat-config.json (and the tokenizer files) for the model CONFIG, as
    `mlc convert` writes it, with these options applied."""
    from mlc.support.chat_config import CHAT_CONFIG_NAME, ChatConfig

    if attention_sink_size:
        raise _unsupported("--attention-sink-size", "mlc has no attention sinks; use a sliding "
                           "window alone (--sliding-window-size).")
    if pipeline_parallel_stages not in (None, 1):
        raise _unsupported("--pipeline-parallel-stages", "use --tensor-parallel-shards to "
                           "spread a model over GPUs.")
    if disaggregation:
        raise _unsupported("--disaggregation", "mlc has no disaggregated prefill/decode.")
    src = _source_of(config, "auto")
    _check_model_type(model_type, _hf_model_type(src), f"{src}/config.json")
    sizes = {"context_window_size": context_window_size,
             "prefill_chunk_size": prefill_chunk_size,
             "sliding_window_size": sliding_window_size, "max_batch_size": max_batch_size,
             "tensor_parallel_shards": tensor_parallel_shards}
    out = Path(output).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gen_config-", dir=out))
    try:
        chat = build_chat_config(src, quantization, work,
                                 {k: v for k, v in sizes.items() if v is not None})
        _apply_conv_template(chat, conv_template)
        if any((out / name).is_file() for name in _WEIGHT_INDEXES):
            if (out / CHAT_CONFIG_NAME).is_file():
                _check_same_model(ChatConfig.load(out), chat, out, "Run convert_weight again "
                                  "after gen_config")
        chat.save(work)
        for item in work.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"Wrote {out / CHAT_CONFIG_NAME}: {chat.model_type} {chat.quantization}, "
               f"context {chat.context_window_size}, prefill chunk {chat.prefill_chunk_size}, "
               f"prompt format {_prompt_format(chat)}")


def build_chat_config(source: str, quantization: str, tokenizer_dir: Path,
                      overrides: dict[str, Any]):
    """The ChatConfig `mlc convert SOURCE --quantization Q --overrides ...` writes, built by
    the same code (weights are not read); the tokenizer files go into `tokenizer_dir`."""
    from mlc.compiler import convert as mlc_convert
    from mlc.compiler.quantization import get_quantization
    from mlc.compiler.sources import open_source
    from mlc.errors import ConvertError
    from mlc.models.registry import get_model, model_type_of

    quant = get_quantization(quantization)
    with open_source(source, quiet=True) as src:
        model_type = model_type_of(src.hf_config, src.tensor_names())
        if not model_type:
            raise ConvertError(f"{source}: config has no model_type; cannot tell the "
                               "architecture.", param="source")
        info = get_model(model_type)
        config = info.config_from_hf(src.hf_config, **overrides)
        if "prefill_chunk_size" not in overrides \
                and config.prefill_chunk_size > config.context_window_size:
            # the default chunk follows the HF context; a smaller context must bound it
            config = info.config_from_hf(src.hf_config, **overrides,
                                         prefill_chunk_size=config.context_window_size)
        names = mlc_convert._write_tokenizer(src, tokenizer_dir)
        return mlc_convert._chat_config(src, info, quant, config, names)


def _apply_conv_template(chat, name: str | None) -> None:
    """An MLC-LLM conv template mlc knows replaces the HF chat_template; one it does not
    know is recorded while the HF chat_template stays in use (an error if there is none)."""
    from mlc.runtime.chat_template import BUILTIN_CONV_TEMPLATES

    if name is None:
        return
    known = sorted(BUILTIN_CONV_TEMPLATES)
    if name in BUILTIN_CONV_TEMPLATES:
        if chat.chat_template:
            click.echo(f"note: --conv-template {name} replaces the model's HF chat_template "
                       "(omit --conv-template to keep it).", err=True)
        chat.conv_template, chat.chat_template = name, None
        return
    if not chat.chat_template:
        raise click.UsageError(f"--conv-template {name} is not built into mlc (built in: "
                               f"{', '.join(known)}), and the model has no HF chat_template "
                               "to use instead. Pick a built-in one.")
    click.echo(f"note: mlc has no built-in conv template {name!r} (built in: "
               f"{', '.join(known)}); the model's own HF chat_template is used.", err=True)
    chat.conv_template = name


def _prompt_format(chat) -> str:
    return "HF chat_template" if chat.chat_template else f"conv_template {chat.conv_template}"


# ---------------------------------------------------------------------------------------------
# compile


# MLC-LLM's compile overrides mlc lacks, with the values that mean "off".
COMPILE_UNSUPPORTED = {"attention_sink_size": ("0",), "pipeline_parallel_stages": ("1",),
                       "disaggregation": ("0", "false", "False")}


@cli.command("compile")
@click.argument("model")
@click.option("--quantization", default=None,
              help="Check the weights use it (default: from mlc-chat-config.json).")
@click.option("--model-type", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:sm_XX, opencl, webgpu (`mlc compile --help`).")
@click.option("--host", default="auto", show_default=True, help="Only auto.")
@click.option("--opt", default="O2", show_default=True, help="O0, O1, O2 or O3.")
@click.option("--system-lib-prefix", default="auto", show_default=True, help="Only auto.")
@click.option("--output", "-o", required=True, help="The library to write (.so).")
@click.option("--overrides", default="", help='e.g. "context_window_size=4096;max_batch_size=8"')
@click.option("--debug-dump", default=None, help="Write the IR after each phase to this dir.")
def compile_(model: str, quantization: str | None, model_type: str, device: str, host: str,
             opt: str, system_lib_prefix: str, output: str, overrides: str,
             debug_dump: str | None) -> None:
    """Compile MODEL (an MLC model dir or its mlc-chat-config.json) into a library
    (`mlc compile`)."""
    from mlc.support.chat_config import ChatConfig

    if host != "auto":
        raise _unsupported("--host", "mlc picks the host of each target itself; use "
                           "--device cpu:MCPU for another CPU.")
    if system_lib_prefix not in ("auto", ""):
        raise _unsupported("--system-lib-prefix", "mlc builds no system libraries "
                           "(iOS/Android static libs).")
    if "=" in opt:
        raise _unsupported(f"--opt {opt}", "mlc's levels are O0, O1, O2 and O3 (no "
                           "flashinfer/cublas_gemm/cudagraph knobs).")
    for key, value in _parse_pairs(overrides, "--overrides").items():
        if key in COMPILE_UNSUPPORTED and value not in COMPILE_UNSUPPORTED[key]:
            raise _unsupported(f"--overrides {key}={value}", "mlc has no attention sinks, "
                               "pipeline stages or disaggregation.")
    model_dir = _model_dir_of(model)
    _check_model_type(model_type, ChatConfig.load(model_dir).model_type,
                      f"{model_dir}/mlc-chat-config.json")
    argv = [str(model_dir), "--device", device, "-o", output, "--opt", opt]
    if quantization:
        argv += ["--quantization", quantization]
    if overrides:
        argv += ["--overrides", overrides]
    previous = os.environ.get("MLC_DUMP_IR")
    if debug_dump:
        os.environ["MLC_DUMP_IR"] = debug_dump          # mlc's dump of every phase
    try:
        _run_mlc("compile", argv)
    finally:
        if debug_dump:
            if previous is None:
                os.environ.pop("MLC_DUMP_IR", None)
            else:
                os.environ["MLC_DUMP_IR"] = previous


# ---------------------------------------------------------------------------------------------
# serve, chat, bench

# MLC-LLM's `serve --overrides` keys -> `mlc serve` options (None: mlc has no equivalent).
SERVE_OVERRIDES: dict[str, str | None] = {
    "max_num_sequence": "--max-batch-size",
    "max_total_seq_length": "--max-total-seq-length",
    "prefill_chunk_size": "--prefill-chunk-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_history_size": None, "spec_draft_length": "--spec-draft-length",
    "spec_tree_width": None,
    "prefix_cache_mode": None, "prefix_cache_max_num_recycling_seqs": None,
    "prefill_mode": None, "context_window_size": None, "sliding_window_size": None,
    "attention_sink_size": None, "tensor_parallel_shards": None,
    "pipeline_parallel_stages": None, "opt": None,
}
# MLC-LLM's `chat --overrides` keys (the model config ones).
CHAT_OVERRIDES: dict[str, str | None] = {
    "spec_draft_length": "--spec-draft-length",
    "context_window_size": None, "sliding_window_size": None,
    "prefill_chunk_size": "--prefill-chunk-size", "attention_sink_size": None,
    "tensor_parallel_shards": None, "pipeline_parallel_stages": None, "opt": None,
}
BENCH_OVERRIDES: dict[str, str | None] = {**CHAT_OVERRIDES, "prefill_chunk_size": "--prefill-chunk",
                                          "spec_draft_length": None}


def _json_list(_ctx, _param, value):
    import json

    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise click.BadParameter(f"expected a JSON list such as '[\"*\"]', got {value!r}.")


def _pass_flag(command: click.Command, flag: str, what: str) -> list[str]:
    """`flag` for mlc's `command` if it has it; else say it has no effect yet."""
    if _has_option(command, flag):
        return [flag]
    click.echo(f"note: `mlc {command.name}` has no {flag} yet; {what}", err=True)
    return []


@cli.command("serve")
@click.argument("model")
@click.option("--device", default="auto", show_default=True)
@click.option("--model-lib", default=None)
@click.option("--mode", default="local", show_default=True,
              type=click.Choice(["local", "interactive", "server"]))
@click.option("--enable-debug", is_flag=True, help="Debug endpoints and debug_config.")
@click.option("--additional-models", multiple=True,
              help="The draft model or EAGLE head: MODEL or MODEL,MODEL_LIB (one).")
@click.option("--embedding-model", default=None, help="Not supported by mlc yet.")
@click.option("--embedding-model-lib", default=None, help="Not supported by mlc yet.")
@click.option("--speculative-mode", default="disable", show_default=True,
              type=click.Choice(["disable", "small_draft", "eagle", "medusa"]))
@click.option("--prefix-cache-mode", default="radix", show_default=True,
              type=click.Choice(["disable", "radix"]))
@click.option("--prefill-mode", default="hybrid", show_default=True,
              type=click.Choice(["hybrid", "chunked"]))
@click.option("--overrides", default="",
              help='e.g. "max_num_sequence=8;max_total_seq_length=4096;prefill_chunk_size=512"')
@click.option("--enable-tracing", is_flag=True, help="Record request events.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--allow-credentials", is_flag=True, help="Not supported by mlc.")
@click.option("--allow-origins", default=None, callback=_json_list, help="Not supported by mlc.")
@click.option("--allow-methods", default=None, callback=_json_list, help="Not supported by mlc.")
@click.option("--allow-headers", default=None, callback=_json_list, help="Not supported by mlc.")
@click.pass_context
def serve(ctx: click.Context, model: str, device: str, model_lib: str | None, mode: str,
          enable_debug: bool, additional_models: tuple[str, ...], embedding_model: str | None,
          embedding_model_lib: str | None, speculative_mode: str, prefix_cache_mode: str,
          prefill_mode: str, overrides: str, enable_tracing: bool, host: str, port: int,
          allow_credentials: bool, allow_origins, allow_methods, allow_headers) -> None:
    """Serve MODEL over OpenAI's HTTP API (`mlc serve`)."""
    command = _mlc_command("serve")
    if embedding_model or embedding_model_lib:
        raise _unsupported("--embedding-model", "/v1/embeddings is not served by mlc yet.")
    if allow_credentials or any(v is not None for v in (allow_origins, allow_methods,
                                                        allow_headers)):
        raise _unsupported("--allow-credentials/--allow-origins/--allow-methods/"
                           "--allow-headers", "`mlc serve` sends no CORS headers; put a proxy "
                           "that adds them in front of it.")
    if _explicit(ctx, "prefill_mode") and prefill_mode == "hybrid":
        click.echo("note: mlc prefills in chunks (--prefill-mode chunked).", err=True)
    argv = [model, "--device", device, "--mode", mode, "--host", host, "--port", str(port)]
    if model_lib:
        argv += ["--model-lib", model_lib]
    argv += _map_overrides(overrides, SERVE_OVERRIDES, command, "serve")
    argv += _speculation_args(speculative_mode, additional_models)
    if prefix_cache_mode != "radix":
        argv += ["--prefix-cache-mode", prefix_cache_mode]
    if enable_debug:
        argv += _pass_flag(command, "--enable-debug", "requests' debug_config is not applied "
                           "and there are no /debug endpoints.")
    if enable_tracing:
        argv += _pass_flag(command, "--enable-tracing", "no request events are recorded.")
    _run_mlc("serve", argv)


def _speculation_args(mode: str, additional_models: tuple[str, ...]) -> list[str]:
    """MLC-LLM's `--speculative-mode` and `--additional-models MODEL[,MODEL_LIB]` as `mlc`
    options (`--additional-models MODEL[:MODEL_LIB]`)."""
    if mode == "medusa":
        raise _unsupported("--speculative-mode medusa", "mlc drafts with small_draft (a draft "
                           "model) or eagle (an EAGLE head), or ngram without a draft.")
    if len(additional_models) > 1:
        raise _unsupported("several --additional-models", "mlc speculates with one draft "
                           "model or head; give one.")
    if additional_models and mode == "disable":
        raise click.UsageError("--additional-models is the draft of speculative decoding: "
                               "add --speculative-mode small_draft (a draft model) or eagle "
                               "(an EAGLE head).")
    argv = ["--speculative-mode", mode] if mode != "disable" else []
    for spec in additional_models:
        path, _, lib = spec.partition(",")
        argv += ["--additional-models", f"{path}:{lib}" if lib else path]
    return argv


@cli.command("chat")
@click.argument("model")
@click.option("--device", default="auto", show_default=True)
@click.option("--model-lib", default=None)
@click.option("--additional-models", multiple=True,
              help="The draft model or EAGLE head: MODEL or MODEL,MODEL_LIB (one).")
@click.option("--speculative-mode", default="disable", show_default=True,
              type=click.Choice(["disable", "small_draft", "eagle", "medusa"]))
@click.option("--overrides", default="",
              help='e.g. "prefill_chunk_size=512;spec_draft_length=4"')
def chat(model: str, device: str, model_lib: str | None, additional_models: tuple[str, ...],
         speculative_mode: str, overrides: str) -> None:
    """Chat with MODEL in the terminal (`mlc chat`)."""
    command = _mlc_command("chat")
    argv = [model, "--device", device]
    if model_lib:
        argv += ["--model-lib", model_lib]
    argv += _map_overrides(overrides, CHAT_OVERRIDES, command, "chat")
    argv += _speculation_args(speculative_mode, additional_models)
    _run_mlc("chat", argv)


@cli.command("bench")
@click.argument("model")
@click.option("--prompt", default="What is the meaning of life?", show_default=True)
@click.option("--opt", default="O2", show_default=True, help="Only O2 (mlc's JIT level).")
@click.option("--device", default="auto", show_default=True)
@click.option("--overrides", default="", help='e.g. "prefill_chunk_size=512"')
@click.option("--generate-length", default=256, show_default=True, type=int)
@click.option("--model-lib", default=None)
def bench(model: str, prompt: str, opt: str, device: str, overrides: str,
          generate_length: int, model_lib: str | None) -> None:
    """Prefill and decode speed of MODEL on one prompt (`mlc bench`, batch 1)."""
    command = _mlc_command("bench")
    if opt.upper() != "O2":
        raise _unsupported(f"--opt {opt}", "mlc bench compiles on demand at O2; compile with "
                           f"`mlc_llm compile MODEL --opt {opt} -o LIB` and pass --model-lib.")
    model_dir = _model_dir_of(model)
    argv = [str(model_dir), "--device", device, "--prompts", str(_count_tokens(model_dir,
                                                                                prompt)),
            "--batches", "1", "--decode-tokens", str(generate_length)]
    if model_lib:
        argv += ["--model-lib", model_lib]
    argv += _map_overrides(overrides, BENCH_OVERRIDES, command, "bench")
    _run_mlc("bench", argv)


def _count_tokens(model_dir: Path, prompt: str) -> int:
    """How many tokens `prompt` is for the model (mlc bench takes prompt lengths)."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise click.UsageError(f"{model_dir} has no tokenizer.json: give an MLC model dir "
                               "(`mlc_llm convert_weight` + `mlc_llm gen_config` output).")
    return max(1, len(Tokenizer.from_file(str(path)).encode(prompt,
                                                            add_special_tokens=False).ids))


__all__ = ["cli", "build_chat_config", "UNSUPPORTED_VERBS"]
