"""Tensor parallelism: how weights are split across `tensor_parallel_shards` GPUs.

The model (Megatron-style, as MLC-LLM does it)
-----------------------------------------------
With N shards every worker runs the whole network on the whole (replicated) hidden state, but
holds only 1/N of each attention and MLP block:

- column-parallel (split the output rows): `qkv_proj` and `gate_up_proj`. A worker gets
  num_attention_heads/N query heads and num_key_value_heads/N KV heads, and
  intermediate_size/N MLP channels;
- row-parallel (split the input columns): `o_proj` and `down_proj`. Each worker's product is
  a partial sum of the full output, so an all-reduce (sum) follows the attention and the MLP
  (`tvm.relax.frontend.nn.op.ccl_allreduce`), and the residual stream stays replicated;
- replicated: the embedding, `lm_head`, the norms, and each worker's KV cache holds its own
  heads only.

Both head counts and intermediate_size must be multiples of N (`check_shards`).

The weight layout (MLC-LLM's "presharded" layout)
-------------------------------------------------
A sharded parameter `NAME` is stored as N separate tensors named `NAME_shard-0` ...
`NAME_shard-{N-1}` (MLC-LLM's `preshard` naming), each with the per-shard shape the library
is compiled for; worker i loads the `_shard-i` tensors plus every unsharded tensor under
its own name. A quantized weight is sharded *before* quantization, so its `q_weight` and
`q_scale` become `...q_weight_shard-i` / `...q_scale_shard-i`, exactly what the per-shard
`GroupQuantLinear` expects (and, when the per-shard input size is a multiple of the group
size, the shards put side by side equal the unsharded quantized tensors bit for bit).

A `ShardSpec(dim, segments)` says how: the tensor is cut along `dim` into `segments` (sizes
that add up to the full extent; one segment when None) and every segment is split evenly
into N parts; shard i is the concatenation of part i of each segment. So the fused
`qkv_proj` [(hq + 2 hkv) d, h] with segments (hq d, hkv d, hkv d) gives shard i =
[q rows of heads i*hq/N.., k rows of its kv heads, v rows of its kv heads] -- not a plain
row split of the fused matrix, which would hand shard 0 all the queries. `gate_up_proj` is
[gate part i, up part i] the same way.

The library does not change its parameter *names*: `_metadata` lists `NAME` with the
per-shard shape and `tensor_parallel_shards`; the loader adds the `_shard-i` suffix.

The collective library (decision)
---------------------------------
TVM's Disco (in the PyPI wheel's `libtvm_runtime_extra.so`) runs one worker per GPU and
dispatches `ccl.allreduce` to `runtime.disco.<ccl>.allreduce`, but the wheel carries no
backend: `init_ccl("nccl")` fails. We use NCCL (the only backend MLC-LLM ships for CUDA),
built as a small plugin from the source the wheel ships
(`tvm/src/runtime/extra/disco/nccl/nccl.cc`) against NCCL from PyPI (`nvidia-nccl-cu13`).
Tried here (g++ 13, CUDA 13.0, nvidia-nccl-cu13 2.32.3): it compiles and links with no
undefined symbols, and once loaded (`ctypes.CDLL(..., RTLD_GLOBAL)` after libnccl.so.2)
registers `runtime.disco.nccl.init_ccl` / `allreduce` / `broadcast_from_worker0` ... The
only obstacles are three headers the wheel omits, none of which nccl.cc needs:
`src/support/process_id.h` (included, unused: an empty file will do) and
`tvm/support/io.h` + `tvm/support/serializer.h` (pulled in by the public
`tvm/runtime/tensor.h` for Tensor::Save/Load: a declaration of `support::Stream` with
Read/Write/ReadArray/WriteArray is enough, since nothing calls them)::

    g++ -std=c++17 -O2 -fPIC -shared -DTVM_NCCL_RCCL_SWITCH=0 -Ishim \\
        -I$TVM/include -I$TVM_FFI/include -I$CUDA/include -I$NCCL/include \\
        $TVM/src/runtime/extra/disco/nccl/nccl.cc -o libmlc_nccl.so \\
        -L$NCCL/lib -l:libnccl.so.2 -L$TVM/lib -ltvm_runtime -ltvm_runtime_extra \\
        -L$TVM_FFI/lib -ltvm_ffi -L$CUDA/lib64 -lcudart

(`-Ishim` holds the three stand-in headers; the source is compiled from a copy whose
`src/support/process_id.h` exists). Running it needs several GPUs; not yet done.
"""

from __future__ import annotations

import numpy as np

# What a model file declares about its shards lives with the models (imports go downward).
from mlc.models.sharding import ShardSpec, check_shards

__all__ = ["ShardSpec", "check_shards", "shard", "shard_name", "unshard"]


def shard_name(name: str, shard: int) -> str:
    """The stored name of shard `shard` of parameter `name` (MLC-LLM's preshard naming)."""
    return f"{name}_shard-{shard}"


def shard(array: np.ndarray, spec: ShardSpec, shards: int) -> list[np.ndarray]:
    """Cut a full parameter into its `shards` per-worker pieces (see the module docstring)."""
    segs = spec._segments(array.shape[spec.dim])
    if any(s % shards for s in segs):
        raise ValueError(f"segments {segs} are not multiples of {shards} shards")
    bounds = np.cumsum((0,) + segs)
    out = []
    for i in range(shards):
        parts = []
        for start, size in zip(bounds[:-1], segs):
            step = size // shards
            index = [slice(None)] * array.ndim
            index[spec.dim] = slice(start + i * step, start + (i + 1) * step)
            parts.append(array[tuple(index)])
        out.append(np.ascontiguousarray(np.concatenate(parts, axis=spec.dim)))
    return out


def unshard(pieces: list[np.ndarray], spec: ShardSpec, full_segments: tuple[int, ...] | None
            = None) -> np.ndarray:
    """The inverse of `shard`: the full parameter from its per-worker pieces."""
    n = len(pieces)
    extent = sum(p.shape[spec.dim] for p in pieces)
    segs = (full_segments or spec.segments or (extent,))
    bounds = np.cumsum((0,) + tuple(s // n for s in segs))
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        for p in pieces:
            index = [slice(None)] * p.ndim
            index[spec.dim] = slice(start, end)
            parts.append(p[tuple(index)])
    return np.concatenate(parts, axis=spec.dim)
