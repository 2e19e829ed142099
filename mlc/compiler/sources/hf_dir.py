"""A local Hugging Face model dir: config.json + *.safetensors (single or sharded) + tokenizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from mlc.compiler.sources.base import (
    TOKENIZER_FILE_NAMES,
    SourceModel,
    normalize_hf_config,
    read_chat_template,
    resolve_special_tokens,
)
from mlc.errors import ConvertError
from mlc.support.chat_config import CHAT_CONFIG_NAME
from mlc.support.tensor_cache import find_tensor_cache

INDEX_NAME = "model.safetensors.index.json"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
_CHUNK_ELEMS = 1 << 22     # casts are done in chunks of this many elements
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
           "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def is_mlc_dir(directory: Path) -> bool:
    """Whether a dir is already a converted MLC model (chat config + tensor cache)."""
    return (directory / CHAT_CONFIG_NAME).is_file() and find_tensor_cache(directory) is not None


def already_mlc_error(source: str) -> ConvertError:
    return ConvertError(
        f"{source} is already in MLC format (mlc-chat-config.json + tensor-cache.json): "
        "it needs no conversion, the engine loads it directly, e.g. "
        f"`MLCEngine({source!r})` or `mlc compile {source}`.", param="source")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path} does not hold a JSON object.")
    return data


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index} has no weight_map.")
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{directory} lacks the weight files {missing} listed in "
                               f"{INDEX_NAME}.")
        return files
    files = sorted(directory.glob("*.safetensors"))
    # Mistral repos ship the same weights twice; `consolidated` uses other names.
    if len(files) > 1:
        files = [f for f in files if not f.name.startswith("consolidated")] or files
    if not files:
        files = _torch_weight_files(directory)
    if not files:
        others = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth",
                                                                            ".gguf"))
        hint = (f" Found {others}: only safetensors and pytorch_model*.bin are read from a dir "
                "(pass a .gguf file path directly)." if others else "")
        raise ConvertError(f"{directory} has no *.safetensors weights.{hint}", param="source")
    return files


def _torch_weight_files(directory: Path) -> list[Path]:
    """PyTorch checkpoints (`pytorch_model.bin`, or shards listed in its index): how some
    published checkpoints ship, e.g. EAGLE draft heads."""
    index = directory / TORCH_INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    return sorted(directory.glob("pytorch_model*.bin"))


def _load_torch(path: Path) -> dict[str, Any]:
    """A PyTorch state dict, memory-mapped, tensors only (`weights_only`: no code runs)."""
    try:
        import torch
    except ImportError as e:
        raise ConvertError(f"{path} is a PyTorch checkpoint: reading it needs torch "
                           "(pip install 'mlc[torch]'), or convert it to safetensors.") from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ConvertError(f"Corrupt PyTorch checkpoint {path}: {e}") from e
    if not isinstance(state, dict):
        raise ConvertError(f"{path} does not hold a state dict (name -> tensor).")
    return state


class HFDirSource(SourceModel):
    """Weights, config and tokenizer from a local HF dir, read one tensor at a time."""

    def __init__(self, directory: str | Path, name: str | None = None):
        super().__init__(name or str(directory))
        self.directory = d = Path(directory)
        if not d.is_dir():
            raise ConvertError(f"{d} is not a directory.", param="source")
        if is_mlc_dir(d):
            raise already_mlc_error(self.name)
        if not (d / "config.json").is_file():
            raise ConvertError(
                f"{d} has no config.json: not a Hugging Face model dir "
                f"(found: {sorted(p.name for p in d.iterdir())[:12]}).", param="source")
        self.hf_config = normalize_hf_config(_read_json(d / "config.json"))
        files = _weight_files(d)
        self._where: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._torch: dict[Path, dict[str, Any]] = {}
        for f in files:
            if f.suffix == ".bin":
                self._torch[f] = _load_torch(f)
                self._where.update(dict.fromkeys(self._torch[f], f))
                continue
            # safetensors validates the header and the file size; the data is read by _read.
            try:
                with safe_open(str(f), framework="numpy") as handle:
                    keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConvertError(f"Corrupt safetensors file {f}: {e}") from e
            for key in keys:
                self._where[key] = f
        gen = d / "generation_config.json"
        self.generation_config = _read_json(gen) if gen.is_file() else {}
        self._read_tokenizer(d)
        mlc_cfg = d / CHAT_CONFIG_NAME
        if mlc_cfg.is_file():
            self.conv_template = _read_json(mlc_cfg).get("conv_template")

    def _read_tokenizer(self, d: Path) -> None:
        for fname in TOKENIZER_FILE_NAMES:
            if (d / fname).is_file():
                self.tokenizer_files[fname] = d / fname
        tok_cfg_path = d / "tokenizer_config.json"
        tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
        tok_json_path = d / "tokenizer.json"
        tok_json = _read_json(tok_json_path) if tok_json_path.is_file() else None
        self.chat_template = read_chat_template(d, tok_cfg)
        self.special_tokens = resolve_special_tokens(self.hf_config, self.generation_config,
                                                     tok_cfg, tok_json)

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, dtype: Any = None) -> np.ndarray:
        try:
            path = self._where[name]
        except KeyError:
            raise ConvertError(f"Tensor {name!r} is not in {self.directory}.") from None
        if path in self._torch:
            return _torch_array(self._torch[path][name], dtype)
        try:
            return self._read(path, name, dtype)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"Corrupt safetensors file {path} (tensor {name}): {e}") from e

    def _read(self, path: Path, name: str, dtype: Any) -> np.ndarray:
        # Plain reads at the offsets of the header, not safetensors' mmap: mapped pages stay
        # in the RSS after the copy (2x the tensor, and the whole file by the end). A cast is
        # done chunk by chunk, so no full-size temporary is made besides the result.
        if path not in self._headers:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        start, header = self._headers[path]
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ConvertError(f"{path}: tensor {name} has dtype {info['dtype']}, which mlc "
                               f"cannot read (supported: {', '.join(_DTYPES)}).")
        stored = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        begin, end = info["data_offsets"]
        if end - begin != count * stored.itemsize:
            raise ValueError(f"byte range {begin}..{end} does not fit shape {list(shape)}")
        out_dtype = np.dtype(dtype) if dtype is not None else (
            np.dtype(np.float32) if info["dtype"] == "BF16" else stored)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if out_dtype == stored:
                out = np.fromfile(f, dtype=stored, count=count)
                if out.size != count:
                    raise ValueError("file is truncated")
                return out.reshape(shape)
            out = np.empty(count, dtype=out_dtype)
            for i in range(0, count, _CHUNK_ELEMS):
                part = np.fromfile(f, dtype=stored, count=min(_CHUNK_ELEMS, count - i))
                if part.size != min(_CHUNK_ELEMS, count - i):
                    raise ValueError("file is truncated")
                out[i:i + part.size] = part
        return out.reshape(shape)

    def close(self) -> None:
        self._headers.clear()
        self._torch.clear()


def _torch_array(tensor, dtype: Any) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 through float32), cast to `dtype`."""
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    out = tensor.detach().cpu().numpy()
    return out.astype(dtype) if dtype is not None else out
