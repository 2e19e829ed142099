"""MLC's weight format: `tensor-cache.json` plus raw `params_shard_N.bin` files.

Layout (the same as MLC-LLM's published weight repos)::

    {"metadata": {"ParamSize": n_tensors, "ParamBytes": total_bytes, "BitsPerParam": b},
     "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": ...,
                  "md5sum": "...", "records": [{"name", "shape", "dtype", "format": "raw",
                                                "nbytes", "byteOffset"}, ...]}, ...]}

A tensor record's `format` is `raw` (bytes as the dtype says, little endian) or `f32-to-bf16`
(a float32 tensor stored as bfloat16; read back as float32). The older file name
`ndarray-cache.json` is read too.

This module is imported by the runtime in TVM's runtime-only mode: it must not import tvm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np

from mlc.errors import ModelLoadError

TENSOR_CACHE_NAME = "tensor-cache.json"
LEGACY_CACHE_NAME = "ndarray-cache.json"
SHARD_CAP_BYTES = 32 * 1024 * 1024     # MLC-LLM's cap (32 MiB); larger tensors get a shard alone
SHARD_PREFIX = "params_shard"

_BF16 = np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: Any) -> str:
    """The TVM/MLC name of a numpy dtype ("float16", "bfloat16", "uint32", "bool" ...)."""
    dtype = np.dtype(dtype)
    return "bool" if dtype == np.bool_ else dtype.name


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for an MLC dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        return _BF16
    try:
        return np.dtype(name)
    except TypeError:
        raise ModelLoadError(f"Unsupported dtype {name!r} in the tensor cache.") from None


def f32_to_bf16_bits(value: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even.

    Values beyond bfloat16's largest finite number are truncated rather than rounded (so they
    clip to the limit instead of becoming inf), as MLC-LLM's writer does for attention masks.
    """
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    limit = np.float32(np.array([0x7F7F0000], dtype=np.uint32).view(np.float32)[0])
    in_range = np.abs(value) < limit
    bias = np.where(in_range, ((bits >> 16) & 1) + np.uint32(0x7FFF), np.uint32(0))
    return ((bits + bias.astype(np.uint32)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------- writer


class TensorCacheWriter:
    """Stream tensors into `params_shard_N.bin` files and write `tensor-cache.json` at the end.

    Each shard is written to disk as soon as a tensor no longer fits in it, so memory holds at
    most the tensor being added. Usage::

        with TensorCacheWriter(out_dir) as writer:
            writer.add("model.norm.weight", array)
            writer.finish(param_count=n_source_elements)
    """

    def __init__(self, directory: str | Path, shard_cap_bytes: int = SHARD_CAP_BYTES,
                 prefix: str = SHARD_PREFIX):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_cap_bytes = shard_cap_bytes
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._file = None          # the open shard, if any
        self._md5 = None
        self._records: list[dict[str, Any]] = []
        self._offset = 0
        self._elements = 0
        self._finished = False

    # A context manager so that an exception closes the open shard file.
    def __enter__(self) -> TensorCacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str, array: np.ndarray, encode_format: str = "raw") -> None:
        """Append one tensor; `encode_format="f32-to-bf16"` stores a float32 as bfloat16."""
        if self._finished:
            raise RuntimeError("TensorCacheWriter.add after finish()")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        array = np.asarray(array)
        if encode_format == "f32-to-bf16" and array.dtype == np.float32:
            payload = f32_to_bf16_bits(array)
        elif encode_format in ("raw", "f32-to-bf16"):
            encode_format = "raw"      # MLC-LLM only encodes float32; other dtypes stay raw
            payload = np.ascontiguousarray(array)
        else:
            raise ValueError(f"unknown tensor format {encode_format!r}")
        data = payload.reshape(-1).view(np.uint8)
        nbytes = int(data.nbytes)
        if self._file is not None and self._offset + nbytes > self.shard_cap_bytes:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        self._file.write(data)        # buffer protocol: no extra copy of the tensor
        self._md5.update(data)
        self._records.append({
            "name": name, "shape": [int(d) for d in array.shape],
            "dtype": dtype_name(array.dtype), "format": encode_format,
            "nbytes": nbytes, "byteOffset": self._offset,
        })
        self._names.add(name)
        self._offset += nbytes
        self._elements += int(array.size)
        if self._offset >= self.shard_cap_bytes:    # a tensor larger than a shard sits alone
            self._close_shard()

    def finish(self, param_count: int | None = None,
               extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the last shard and write `tensor-cache.json`; return its contents.

        `param_count` is the number of parameters before quantization (for BitsPerParam);
        it defaults to the number of elements written.
        """
        self._close_shard()
        total_bytes = sum(s["nbytes"] for s in self.shards)
        count = param_count if param_count else self._elements
        metadata = {
            "ParamSize": len(self._names),
            "ParamBytes": total_bytes,
            "BitsPerParam": total_bytes * 8.0 / count if count else 0.0,
            **(extra_metadata or {}),
        }
        content = {"metadata": metadata, "records": self.shards}
        path = self.directory / TENSOR_CACHE_NAME
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        self._finished = True
        return content

    def close(self) -> None:
        """Close the open shard file without writing the index (used on errors)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_shard(self) -> None:
        path = self.directory / f"{self.prefix}_{len(self.shards)}.bin"
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close_shard / close
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._records = []
        self._offset = 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.shards.append({
            "dataPath": f"{self.prefix}_{len(self.shards)}.bin", "format": "raw-shard",
            "nbytes": self._offset, "md5sum": self._md5.hexdigest(), "records": self._records,
        })


# ----------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives: its shard, byte range, shape, dtype and encoding."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    nbytes: int
    byte_offset: int
    data_path: str


def find_tensor_cache(directory: str | Path) -> Path | None:
    """The index file of a model dir (`tensor-cache.json` or `ndarray-cache.json`), if any."""
    for name in (TENSOR_CACHE_NAME, LEGACY_CACHE_NAME):
        path = Path(directory, name)
        if path.is_file():
            return path
    return None


class TensorCache:
    """A lazy view of a tensor cache: records are parsed up front, data is read on `get`."""

    def __init__(self, directory: str | Path, verify: bool = False):
        self.directory = Path(directory)
        index = find_tensor_cache(self.directory)
        if index is None:
            raise ModelLoadError(
                f"{self.directory} has no {TENSOR_CACHE_NAME} (nor {LEGACY_CACHE_NAME}); "
                "it is not a converted MLC model dir. Create one with `mlc convert`.")
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
            self.metadata: dict[str, Any] = content.get("metadata", {})
            self.shards: list[dict[str, Any]] = content["records"]
            self.records: dict[str, TensorRecord] = {}
            for shard in self.shards:
                for rec in shard["records"]:
                    self.records[rec["name"]] = TensorRecord(
                        rec["name"], tuple(int(d) for d in rec["shape"]), rec["dtype"],
                        rec.get("format", "raw"), int(rec["nbytes"]),
                        int(rec["byteOffset"]), shard["dataPath"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{index} is malformed ({e!r}); re-run `mlc convert`.") from e
        if verify:
            self.verify()

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def __len__(self) -> int:
        return len(self.records)

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.records)

    def verify(self) -> None:
        """Check each shard's size and md5; raise ModelLoadError naming a corrupt shard."""
        for shard in self.shards:
            path = self.directory / shard["dataPath"]
            if not path.is_file():
                raise ModelLoadError(f"Shard {path} is missing; re-download or re-convert.")
            size = path.stat().st_size
            if size != shard.get("nbytes", size):
                raise ModelLoadError(
                    f"Shard {path} is corrupt: {size} bytes, expected {shard['nbytes']}.")
            expected = shard.get("md5sum")
            if not expected:          # some writers leave it empty: nothing to check
                continue
            md5 = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    md5.update(chunk)
            if md5.hexdigest() != expected:
                raise ModelLoadError(
                    f"Shard {path} is corrupt: md5 {md5.hexdigest()} != {expected}. "
                    "Re-download or re-convert the model.")

    def get(self, name: str) -> np.ndarray:
        """Read one tensor (a fresh array; f32-to-bf16 records come back as float32)."""
        try:
            rec = self.records[name]
        except KeyError:
            raise ModelLoadError(f"Tensor {name!r} is not in {self.directory}.") from None
        path = self.directory / rec.data_path
        stored = np.uint16 if rec.format == "f32-to-bf16" else numpy_dtype(rec.dtype)
        count = int(np.prod(rec.shape, dtype=np.int64))
        if count * np.dtype(stored).itemsize != rec.nbytes:
            raise ModelLoadError(
                f"Tensor {name!r}: {rec.nbytes} bytes do not match shape {list(rec.shape)} "
                f"and dtype {rec.dtype} ({rec.format}).")
        try:
            data = np.fromfile(path, dtype=stored, count=count, offset=rec.byte_offset)
        except OSError as e:
            raise ModelLoadError(f"Cannot read shard {path}: {e}") from e
        if data.size != count:
            raise ModelLoadError(
                f"Shard {path} is truncated: tensor {name!r} needs bytes "
                f"{rec.byte_offset}..{rec.byte_offset + rec.nbytes}.")
        if rec.format == "f32-to-bf16":
            data = bf16_bits_to_f32(data) if rec.dtype == "float32" else data.view(_BF16)
        elif rec.format != "raw":
            raise ModelLoadError(f"Tensor {name!r} has unknown format {rec.format!r}.")
        return data.reshape(rec.shape)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.records:
            yield name, self.get(name)


def iter_tensor_cache(directory: str | Path, verify: bool = False
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for each tensor, one at a time."""
    yield from TensorCache(directory, verify=verify)


def load_tensor_cache(directory: str | Path, verify: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of a model dir into a dict."""
    return dict(iter_tensor_cache(directory, verify=verify))


def tensor_cache_exists(directory: str | Path) -> bool:
    """Whether a directory holds an MLC tensor cache index."""
    return find_tensor_cache(directory) is not None


__all__ = [
    "TENSOR_CACHE_NAME", "LEGACY_CACHE_NAME", "SHARD_CAP_BYTES", "TensorCacheWriter",
    "TensorCache", "TensorRecord", "iter_tensor_cache", "load_tensor_cache",
    "find_tensor_cache", "tensor_cache_exists", "dtype_name", "numpy_dtype",
    "f32_to_bf16_bits", "bf16_bits_to_f32",
]
