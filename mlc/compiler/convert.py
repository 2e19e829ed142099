"""`mlc convert`: a source model -> an MLC model dir (quantized weights + mlc-chat-config.json
+ tokenizer files).

Streaming: one parameter is loaded (its source tensors, then their combination), cast,
quantized and written before the next, and shards go to disk as they fill, so the peak memory
is about twice the largest parameter plus one shard. Everything is written into a temporary
dir beside the output and renamed into place at the end: a failed or interrupted convert
never leaves a half-written model.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlc.compiler.quantization import Quantization, get_quantization, quantize_weight
from mlc.compiler.quantization.group_quant import quantized_param_names
from mlc.compiler.sources import SourceModel, open_source
from mlc.errors import ConvertError
from mlc.models.registry import ParamMap, get_model, model_type_of
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCacheWriter

logger = logging.getLogger(__name__)

# generation_config.json fields copied into mlc-chat-config.json as generation defaults.
_GENERATION_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


@dataclass
class ConvertStats:
    """What a conversion wrote (also in tensor-cache.json's metadata)."""

    param_count: int        # parameters before quantization
    tensor_count: int       # tensors written
    total_bytes: int
    bits_per_param: float
    seconds: float


def parse_overrides(overrides: str | dict[str, Any] | None) -> dict[str, Any]:
    """`"context_window_size=4096;prefill_chunk_size=1024"` -> a dict with typed values."""
    if overrides is None or isinstance(overrides, dict):
        return dict(overrides or {})
    result: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in overrides.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConvertError(f"Bad override {item!r}: expected KEY=VALUE (separated by ';').",
                               param="overrides")
        try:
            result[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            result[key.strip()] = value.strip()
    return result


def convert(source: str, quantization: str = "q4f16_1", output: str | Path | None = None,
            overwrite: bool = False, quiet: bool = False,
            overrides: str | dict[str, Any] | None = None) -> Path:
    """Convert `source` with `quantization` into the MLC model dir `output`; return its path."""
    quant = get_quantization(quantization)
    if output is None:
        raise ConvertError("No output dir given (-o/--output).", param="output")
    output = Path(output).expanduser().absolute()
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ConvertError(f"Output {output} already exists; pass --overwrite to replace it.",
                               param="output")
        if not output.is_dir():
            raise ConvertError(f"Output {output} exists and is not a directory.", param="output")
    overrides = parse_overrides(overrides)
    start = time.time()
    with open_source(source, quiet=quiet) as src:
        model_type = model_type_of(src.hf_config, src.tensor_names())
        if not model_type:
            raise ConvertError(f"{source}: config has no model_type; cannot tell the "
                               "architecture.", param="source")
        info = get_model(model_type)
        config = info.config_from_hf(src.hf_config, **overrides)
        mapping = info.param_mapping(config)
        _check_tensors(src, mapping, source, model_type)
        shard_specs = _shard_specs(info, config)
        tmp = None
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
            tmp.chmod(0o777 & ~_umask())         # mkdtemp makes it private (0700)
            stats = _write_params(src, mapping, quant, tmp, quiet, shard_specs,
                                  config.tensor_parallel_shards)
            names = _write_tokenizer(src, tmp)
            _chat_config(src, info, quant, config, names).save(tmp)
            _install(tmp, output, overwrite)
        except BaseException as e:    # incl. KeyboardInterrupt: never leave a partial dir
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise _os_error(e, output) from e
            raise
    stats.seconds = time.time() - start
    logger.info("converted %s -> %s: %d params, %d bytes, %.2f bits/param, %.1f s", source,
                output, stats.param_count, stats.total_bytes, stats.bits_per_param,
                stats.seconds)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(e: OSError, output: Path) -> ConvertError:
    if e.errno == errno.ENOSPC:
        return ConvertError(f"No space left on the device while writing {output}; nothing was "
                            "written. Free some space or choose another output dir.",
                            param="output")
    return ConvertError(f"Converting into {output} failed: {e}", param="output")


def _check_tensors(src: SourceModel, mapping: list[ParamMap], source: str, model_type: str):
    # Fail before writing anything: a missing tensor found at the end wastes the whole run.
    have = set(src.tensor_names())
    missing = [n for pm in mapping for n in pm.source_names if n not in have]
    if missing:
        raise ConvertError(
            f"{source} lacks {len(missing)} tensor(s) that model_type={model_type} needs, "
            f"e.g. {missing[:5]}.", param="source")


def _shard_specs(info, config) -> dict[str, Any] | None:
    """Which parameters split how over `tensor_parallel_shards` (None: no sharding)."""
    from mlc.compiler.tensor_parallel import check_shards

    if config.tensor_parallel_shards == 1:
        return None
    check_shards(config, ConvertError)
    specs = info.shard_specs(config)
    if specs is None:
        raise ConvertError(f"model_type={info.model_type} does not support tensor parallelism "
                           "yet; use tensor_parallel_shards=1.", param="tensor_parallel_shards")
    return specs


def _write_params(src: SourceModel, mapping: list[ParamMap], quant: Quantization, directory: Path,
                  quiet: bool, shard_specs: dict[str, Any] | None = None,
                  shards: int = 1) -> ConvertStats:
    """Write every parameter; with `shard_specs`, a listed one as its `NAME_shard-i` pieces
    (split before quantization; layout in `mlc.compiler.tensor_parallel`)."""
    from tqdm.auto import tqdm

    from mlc.compiler.tensor_parallel import shard, shard_name

    dtype = np.dtype(quant.model_dtype)
    param_count = 0
    with TensorCacheWriter(directory) as writer:
        for pm in tqdm(mapping, desc="Converting", unit="param", disable=quiet, leave=False):
            # Cast on load: the source converts bf16/f32 straight to the model dtype.
            arrays = [src.get(name, dtype=dtype) for name in pm.source_names]
            weight = pm.combine(arrays) if pm.combine else arrays[0]
            del arrays                                      # keep only the combined tensor
            weight = np.ascontiguousarray(weight, dtype=dtype)
            param_count += int(weight.size)
            spec = shard_specs.get(pm.mlc_name) if shard_specs else None
            if spec is None:
                _add_param(writer, pm, weight, quant)
            else:
                pieces = shard(weight, spec, shards)
                for i, piece in enumerate(pieces):
                    _add_param(writer, pm, piece, quant, suffix=shard_name("", i))
                del pieces
            del weight
        content = writer.finish(param_count=param_count)
    meta = content["metadata"]
    return ConvertStats(param_count, meta["ParamSize"], meta["ParamBytes"], meta["BitsPerParam"],
                        0.0)


def _add_param(writer: TensorCacheWriter, pm: ParamMap, weight: np.ndarray, quant: Quantization,
               suffix: str = "") -> None:
    """Quantize (when `pm` asks and `quant` does) and write one parameter as NAME + suffix."""
    if pm.quantize and quant.is_quantized:
        q_weight, q_scale = quantize_weight(weight, quant)
        w_name, s_name = quantized_param_names(pm.mlc_name)
        writer.add(w_name + suffix, q_weight)
        writer.add(s_name + suffix, q_scale)
    else:
        writer.add(pm.mlc_name + suffix, weight)


def _write_tokenizer(src: SourceModel, directory: Path) -> list[str]:
    names = []
    for name, content in src.tokenizer_files.items():
        if isinstance(content, (bytes, bytearray)):
            (directory / name).write_bytes(content)
        else:
            shutil.copyfile(content, directory / name)
        names.append(name)
    return names


def _chat_config(src: SourceModel, info, quant: Quantization, config,
                 tokenizer_files: list[str]) -> ChatConfig:
    toks = src.special_tokens
    gen = {k: src.generation_config[k] for k in _GENERATION_FIELDS
           if src.generation_config.get(k) is not None}
    chat_template = src.chat_template
    if chat_template is None and src.conv_template is None:
        chat_template = info.default_chat_template()   # the architecture's own format
    eos = list(toks.eos_token_ids)
    for token in info.extra_eos_tokens():             # e.g. Gemma's <end_of_turn>
        token_id = _token_id(src, token)
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    return ChatConfig(
        model_type=info.model_type, quantization=quant.name, model_config=config.to_dict(),
        vocab_size=config.vocab_size, context_window_size=config.context_window_size,
        prefill_chunk_size=config.prefill_chunk_size,
        sliding_window_size=config.sliding_window_size,
        tensor_parallel_shards=config.tensor_parallel_shards,
        tokenizer_files=tokenizer_files, chat_template=chat_template,
        conv_template=src.conv_template, bos_token_id=toks.bos_token_id,
        eos_token_id=eos, pad_token_id=toks.pad_token_id,
        bos_token=toks.bos_token, eos_token=toks.eos_token, add_bos_token=toks.add_bos_token,
        source=src.name, **gen)


def _token_id(src: SourceModel, token: str) -> int | None:
    """The id of `token` in the source's tokenizer.json, if it has one."""
    content = src.tokenizer_files.get("tokenizer.json")
    if content is None:
        return None
    from tokenizers import Tokenizer

    if isinstance(content, (bytes, bytearray)):
        tok = Tokenizer.from_str(content.decode("utf-8"))
    else:
        tok = Tokenizer.from_file(str(content))
    return tok.token_to_id(token)


def _install(tmp: Path, output: Path, overwrite: bool) -> None:
    # Swap in the new dir with renames only; an old output is removed after the swap.
    old = None
    if output.exists():
        if not overwrite:                    # appeared while converting (a concurrent run)
            raise ConvertError(f"Output {output} already exists; pass --overwrite to replace "
                               "it.", param="output")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.rename(output, old / "model")
    try:
        os.rename(tmp, output)
    except OSError:
        if old is not None:                  # put the old model back
            os.rename(old / "model", output)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_stats(output: str | Path) -> dict[str, Any]:
    """The metadata of a converted dir's tensor-cache.json (ParamSize, ParamBytes ...)."""
    from mlc.support.tensor_cache import find_tensor_cache

    index = find_tensor_cache(output)
    return json.loads(index.read_text())["metadata"] if index else {}
