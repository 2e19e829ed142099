"""tensor-cache.json + params_shard_N.bin: round trips, sharding, md5 checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mlc.errors import ModelLoadError
from mlc.support.tensor_cache import (
    LEGACY_CACHE_NAME,
    TENSOR_CACHE_NAME,
    TensorCache,
    TensorCacheWriter,
    f32_to_bf16_bits,
    iter_tensor_cache,
    load_tensor_cache,
)

DTYPES = ["float32", "float16", "bfloat16", "uint32", "int32", "int8", "uint8", "float64",
          "int64", "bool"]


def _array(dtype: str, shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "bfloat16":
        return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def test_round_trip_all_dtypes(tmp_path):
    arrays = {f"t.{d}": _array(d, (3, 5), i) for i, d in enumerate(DTYPES)}
    arrays["scalar"] = np.array(3.5, dtype=np.float32)
    arrays["empty"] = np.zeros((0, 4), dtype=np.float16)
    with TensorCacheWriter(tmp_path) as writer:
        for name, a in arrays.items():
            writer.add(name, a)
        content = writer.finish()
    loaded = load_tensor_cache(tmp_path, verify=True)
    assert list(loaded) == list(arrays)
    for name, a in arrays.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape, name
        np.testing.assert_array_equal(loaded[name].reshape(-1).view(np.uint8),
                                      a.reshape(-1).view(np.uint8))
    rec = {r["name"]: r for r in content["records"][0]["records"]}
    assert rec["t.bfloat16"]["dtype"] == "bfloat16" and rec["t.bool"]["dtype"] == "bool"
    assert rec["t.float16"]["format"] == "raw"


def test_f32_to_bf16_records(tmp_path):
    a = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    a[0, :3] = [1e38, -3.4e38, 0.0]       # beyond bfloat16's max: clipped, not inf
    with TensorCacheWriter(tmp_path) as writer:
        writer.add("w", a, encode_format="f32-to-bf16")
        writer.add("ids", np.arange(5, dtype=np.int32), encode_format="f32-to-bf16")
        content = writer.finish()
    recs = content["records"][0]["records"]
    assert recs[0]["format"] == "f32-to-bf16" and recs[0]["dtype"] == "float32"
    assert recs[0]["nbytes"] == a.size * 2
    assert recs[1]["format"] == "raw"                       # only float32 is encoded
    out = TensorCache(tmp_path).get("w")
    assert out.dtype == np.float32
    expect = a[1:].astype(ml_dtypes.bfloat16).astype(np.float32)   # round to nearest even
    np.testing.assert_array_equal(out[1:], expect)
    assert np.all(np.isfinite(out[0])) and out[0, 2] == 0
    np.testing.assert_array_equal(TensorCache(tmp_path).get("ids"), np.arange(5))
    assert f32_to_bf16_bits(np.array([1.0], np.float32))[0] == 0x3F80


def test_sharding_boundaries(tmp_path):
    cap = 1000
    sizes = [400, 400, 200, 100, 1500, 300, 1000, 8]   # bytes, as uint8 tensors
    with TensorCacheWriter(tmp_path, shard_cap_bytes=cap) as writer:
        for i, n in enumerate(sizes):
            writer.add(f"t{i}", np.full(n, i, dtype=np.uint8))
        content = writer.finish()
    shards = content["records"]
    layout = [[r["name"] for r in s["records"]] for s in shards]
    # 400 + 400 + 200 fill a shard exactly; 1500 and 1000 are alone; order is preserved
    assert layout == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5"], ["t6"], ["t7"]]
    for i, shard in enumerate(shards):
        path = tmp_path / shard["dataPath"]
        assert shard["dataPath"] == f"params_shard_{i}.bin" and shard["format"] == "raw-shard"
        assert path.stat().st_size == shard["nbytes"]
        assert shard["nbytes"] <= cap or len(shard["records"]) == 1
        assert hashlib.md5(path.read_bytes()).hexdigest() == shard["md5sum"]
        offset = 0
        for rec in shard["records"]:
            assert rec["byteOffset"] == offset
            offset += rec["nbytes"]
    assert content["metadata"] == {"ParamSize": 8, "ParamBytes": sum(sizes),
                                   "BitsPerParam": 8.0}
    for name, a in iter_tensor_cache(tmp_path):
        i = int(name[1:])
        assert a.shape == (sizes[i],) and np.all(a == i)


def test_metadata_bits_per_param(tmp_path):
    with TensorCacheWriter(tmp_path) as writer:
        writer.add("q", np.zeros(10, np.uint32))
        meta = writer.finish(param_count=80)["metadata"]
    assert meta == {"ParamSize": 1, "ParamBytes": 40, "BitsPerParam": 4.0}
    on_disk = json.loads((tmp_path / TENSOR_CACHE_NAME).read_text())
    assert on_disk["metadata"] == meta


def test_md5_corruption_detected(tmp_path):
    with TensorCacheWriter(tmp_path, shard_cap_bytes=64) as writer:
        writer.add("a", np.arange(16, dtype=np.float32))
        writer.add("b", np.arange(16, dtype=np.float32))
        writer.finish()
    TensorCache(tmp_path, verify=True)
    shard = tmp_path / "params_shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    TensorCache(tmp_path)                     # verification is optional
    with pytest.raises(ModelLoadError, match="params_shard_1.bin"):
        TensorCache(tmp_path, verify=True)
    shard.write_bytes(bytes(data[:10]))       # truncated
    with pytest.raises(ModelLoadError, match="params_shard_1.bin"):
        TensorCache(tmp_path, verify=True)
    with pytest.raises(ModelLoadError, match="truncated"):
        TensorCache(tmp_path).get("b")


def test_legacy_name_and_errors(tmp_path):
    with TensorCacheWriter(tmp_path) as writer:
        writer.add("x", np.ones((2, 2), np.float16))
        writer.finish()
    (tmp_path / TENSOR_CACHE_NAME).rename(tmp_path / LEGACY_CACHE_NAME)
    cache = TensorCache(tmp_path)
    assert "x" in cache and len(cache) == 1 and cache.names() == ["x"]
    with pytest.raises(ModelLoadError, match="'y'"):
        cache.get("y")
    with pytest.raises(ModelLoadError, match="mlc convert"):
        TensorCache(tmp_path / "nowhere")
    (tmp_path / LEGACY_CACHE_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed"):
        TensorCache(tmp_path)


def test_duplicate_name_rejected(tmp_path):
    with TensorCacheWriter(tmp_path) as writer:
        writer.add("x", np.ones(2, np.float32))
        with pytest.raises(ValueError, match="duplicate"):
            writer.add("x", np.ones(2, np.float32))


def test_reader_does_not_import_tvm():
    code = ("import sys, mlc.support.tensor_cache as t; "
            "assert not any(m == 'tvm' or m.startswith('tvm.') for m in sys.modules), 'tvm'")
    subprocess.run([sys.executable, "-c", code], check=True)
