"""A loaded model: library + weights + paged KV cache, with batched forward calls.

This is the only place that calls into the compiled library. It imports nothing from the
compiler, so it runs on TVM's runtime-only build. `LoadedModel` is the engine's `ModelRunner`
(`mlc.runtime.model_runner`): forward calls return the logits on the device, and the
library's sampling functions run there too.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlc.errors import ModelLoadError
from mlc.runtime.device import parse_runtime_device, prepare_library
from mlc.support.chat_config import ChatConfig
from mlc.support.tensor_cache import TensorCache

logger = logging.getLogger(__name__)

REQUIRED_FUNCTIONS = ("embed", "prefill", "decode", "batch_prefill", "batch_decode",
                      "batch_verify", "create_paged_kv_cache", "_metadata")


# What EAGLE speculative decoding needs from the target's library (libraries built before
# these existed lack them: recompile).
HIDDEN_STATE_FUNCTIONS = ("batch_prefill_to_last_hidden_states",
                          "batch_decode_to_last_hidden_states",
                          "batch_verify_to_last_hidden_states", "get_logits")
# Every position's final (normed) hidden state, for embeddings (libraries before lib-5 lack it).
EMBEDDING_HIDDEN_FUNCTION = "batch_prefill_hidden_states"

SAMPLING_FUNCTIONS = ("softmax_with_temperature", "sample_with_top_p_top_k", "argmax",
                      "apply_logit_bias")


@dataclass
class KVCacheConfig:
    max_batch_size: int
    max_total_sequence_length: int
    prefill_chunk_size: int


def read_library_metadata(lib_path: str | Path, device: str = "cpu") -> dict:
    """The `_metadata` JSON of a library, without loading any weights."""
    from tvm.runtime import vm as rvm

    _, dev = parse_runtime_device(device)
    lib = _load_module(lib_path)
    return json.loads(str(rvm.VirtualMachine(lib, dev)["_metadata"]()))


def batch_invariant_enabled() -> bool:
    """Whether MLC_BATCH_INVARIANT=1: every row of a batched call computed as if alone."""
    return os.environ.get("MLC_BATCH_INVARIANT", "0") == "1"


def _load_module(lib_path: str | Path):
    import tvm

    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise ModelLoadError(f"Model library {lib_path} not found. Build it with "
                             f"`mlc compile MODEL_DIR --device DEVICE -o {lib_path}`.")
    prepare_library(lib_path)
    try:
        return tvm.runtime.load_module(str(lib_path))
    except Exception as e:
        text = str(e).strip()
        for kind in ("cuda", "opencl", "vulkan", "metal", "rocm"):
            if "{" + kind + "}" in text:
                raise ModelLoadError(
                    f"{lib_path} is a {kind} library, and this machine cannot run {kind} code "
                    f"(no usable device or driver, or TVM's {kind} runtime is missing). Use a "
                    f"library built with `mlc compile MODEL_DIR --device cpu`, or run on a "
                    f"machine with that device.", param="model_lib") from e
        raise ModelLoadError(
            f"Cannot load model library {lib_path}: {text.splitlines()[-1][:300]}. A library "
            "built for another machine or TVM version must be rebuilt with `mlc compile`.",
            param="model_lib") from e


# (stored dtype, library dtype) pairs the loader converts once at load. A CPU library of a
# float16 group-quantized model (q4f16_1) computes in float32 (see
# `mlc.compiler.compile.compute_quantization`): its scales and norms are widened here, so
# the weight files stay MLC-LLM's.
WIDENED_AT_LOAD = {("float16", "float32"), ("bfloat16", "float32")}


def loads_as(stored: str, expected: str) -> bool:
    """Whether a tensor stored as `stored` can feed a library parameter of `expected`."""
    return stored == expected or (stored, expected) in WIDENED_AT_LOAD


def check_library_matches(metadata: dict, chat: ChatConfig, cache: TensorCache) -> None:
    """Refuse a library built for other weights, naming what differs and the fix."""
    problems = []
    if metadata.get("model_type") != chat.model_type:
        problems.append(f"model_type {metadata.get('model_type')} != {chat.model_type}")
    if metadata.get("quantization") != chat.quantization:
        problems.append(f"quantization {metadata.get('quantization')} != {chat.quantization}")
    for p in metadata.get("params", []):
        rec = cache.records.get(p["name"])
        if rec is None:
            problems.append(f"weights lack {p['name']}")
        elif list(rec.shape) != list(p["shape"]):
            problems.append(f"{p['name']} shape {list(rec.shape)} != {p['shape']}")
        elif not loads_as(rec.dtype, p.get("dtype", rec.dtype)):
            problems.append(f"weight {p['name']} is {rec.dtype} but the library expects "
                            f"{p['dtype']}")
        if len(problems) > 5:
            break
    # e.g. a tied-embedding library with untied weights would silently ignore lm_head
    unused = sorted(set(cache.records) - {p["name"] for p in metadata.get("params", [])})
    if unused:
        problems.append(f"the library does not use the weights {unused[:3]}")
    if problems:
        raise ModelLoadError(
            "The model library does not match the weights: " + "; ".join(problems) +
            ". Rebuild it with `mlc compile MODEL_DIR --device ...`, or pass the matching "
            "model_lib.", param="model_lib")


def random_range(spec: dict) -> tuple[float, float]:
    """The value range of a random parameter: small q4 scales, unit-ish norms, small weights,
    so activations stay finite through many layers (uint32 packed weights: any bits)."""
    if spec["name"].endswith("q_scale"):
        return 0.002, 0.006
    if spec["name"].endswith("norm.weight"):
        return 0.8, 1.2
    return -0.035, 0.035


_RANDOM_BLOCK = 1 << 22   # elements drawn per tensor; larger tensors repeat them


def random_param(spec: dict, seed: int = 0) -> np.ndarray:
    """A random tensor for a parameter spec (see `random_range`), for benchmarks of sizes
    whose weights cannot be fetched: at most 4M random elements per tensor, repeated to fill
    it, so an 8B model's weights take seconds, not minutes (the speed of a kernel does not
    depend on whether its weights repeat)."""
    rng = np.random.default_rng(seed)
    shape, dtype = tuple(spec["shape"]), spec["dtype"]
    count = int(np.prod(shape))
    n = min(count, _RANDOM_BLOCK)
    if dtype.startswith("uint"):
        block = np.frombuffer(rng.bytes(n * np.dtype(dtype).itemsize), dtype=dtype)
    else:
        lo, hi = random_range(spec)
        block = rng.uniform(lo, hi, size=n).astype(dtype)
    return np.resize(block, count).reshape(shape)


def _param_array(cache: TensorCache, spec: dict) -> np.ndarray:
    """A weight as the library takes it: read, and widened when the library computes in a
    wider dtype than the file stores (`WIDENED_AT_LOAD`)."""
    array = cache.get(spec["name"])
    dtype = spec.get("dtype", str(array.dtype))
    return array if str(array.dtype) == dtype else array.astype(dtype)


class LoadedModel:
    """Weights on a device plus the library's functions and one paged KV cache."""

    required_functions = REQUIRED_FUNCTIONS

    def __init__(self, model_dir: str | Path, lib_path: str | Path, device: str = "auto",
                 dummy: bool = False):
        import tvm
        from tvm.runtime import vm as rvm

        self.model_dir = Path(model_dir)
        self.chat_config = ChatConfig.load(self.model_dir)
        self.device_kind, self.device = parse_runtime_device(device)
        self.lib_path = Path(lib_path)
        self.vm = rvm.VirtualMachine(_load_module(lib_path), self.device)
        self._check_library(lib_path)
        self.metadata = json.loads(str(self.vm["_metadata"]()))
        if dummy:   # random weights of the right shapes (benchmarks of unreleased sizes)
            self.params = [self._random_param(p, i) for i, p in enumerate(self.metadata["params"])]
        else:
            cache = TensorCache(self.model_dir)
            check_library_matches(self.metadata, self.chat_config, cache)
            self.params = [tvm.runtime.tensor(_param_array(cache, p), self.device)
                           for p in self.metadata["params"]]
        self.hidden_size = self.metadata["hidden_size"]
        self.vocab_size = self.metadata["vocab_size"]
        self._fn = {name: self.vm[name] for name in self.required_functions}
        self._reshape = tvm.get_global_func("vm.builtin.reshape")
        g = lambda n: tvm.get_global_func(n)
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._remove_seq = g("vm.builtin.kv_state_remove_sequence")
        self._fork_seq = g("vm.builtin.kv_state_fork_sequence")
        self._popn = g("vm.builtin.kv_state_popn")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._free_pages = g("vm.builtin.attention_kv_cache_get_num_available_pages")
        self._total_len = g("vm.builtin.attention_kv_cache_get_total_sequence_length")
        self.page_size = int(self.metadata["kv_cache"]["page_size"])
        self.sampling = {f: self.vm[f] for f in SAMPLING_FUNCTIONS if self._has(f)}
        if self._has(EMBEDDING_HIDDEN_FUNCTION):
            self._fn[EMBEDDING_HIDDEN_FUNCTION] = self.vm[EMBEDDING_HIDDEN_FUNCTION]
        self.kv_cache = None
        self.kv_config: KVCacheConfig | None = None
        self.total_pages = 0
        # MLC_BATCH_INVARIANT=1: one sequence goes through the batched functions too (the
        # single-sequence ones are compiled for a static batch of 1 and may sum in another
        # order); mlc's CUDA kernels read the same variable (cuda_check.h)
        self.batch_invariant = batch_invariant_enabled()
        # EAGLE: forwards go through the hidden-state functions, and the final hidden states
        # of the last forward's tokens are kept on the host ([tokens, h], `last_hidden`)
        self.keep_hidden = False
        self.last_hidden: np.ndarray | None = None

    @staticmethod
    def peek_chat_config(model_dir: str | Path) -> ChatConfig:
        """A model dir's mlc-chat-config.json, without loading anything."""
        return ChatConfig.load(Path(model_dir))

    def _check_library(self, lib_path) -> None:
        missing = [f for f in self.required_functions if not self._has(f)]
        if missing:
            raise ModelLoadError(f"{lib_path} lacks the functions {missing}: it is not an mlc "
                                 "model library. Rebuild it with `mlc compile`.")

    def enable_hidden_states(self) -> None:
        """Keep the final hidden states of every forward (`last_hidden`), for an EAGLE head.
        A library compiled before mlc exported them is refused with the fix."""
        missing = [f for f in HIDDEN_STATE_FUNCTIONS if not self._has(f)]
        if missing:
            raise ModelLoadError(
                f"speculative_mode='eagle' needs the target library to export its hidden "
                f"states, and {self.lib_path} lacks {missing} (built by an older mlc). "
                f"Recompile it with `mlc compile {self.model_dir} --device "
                f"{self.device_kind} -o LIB`, or drop model_lib to compile on demand.",
                param="model_lib")
        self._fn.update({f: self.vm[f] for f in HIDDEN_STATE_FUNCTIONS})
        self.keep_hidden = True

    def _random_param(self, spec: dict, seed: int):
        """A random parameter made on the host and copied to the device (`random_param`)."""
        import tvm

        return tvm.runtime.tensor(random_param(spec, seed), self.device)

    def _has(self, name: str) -> bool:
        try:
            self.vm[name]
            return True
        except Exception:  # noqa: BLE001 - the VM raises a generic error for a missing name
            return False

    # -- KV cache --------------------------------------------------------------------------
    def create_kv_cache(self, cfg: KVCacheConfig) -> None:
        """Allocate the paged KV cache (frees a previous one)."""
        from tvm.runtime import ShapeTuple

        self.kv_cache = None
        self.kv_config = cfg
        self.kv_cache = self._fn["create_paged_kv_cache"](
            ShapeTuple([cfg.max_batch_size]), ShapeTuple([cfg.max_total_sequence_length]),
            ShapeTuple([cfg.prefill_chunk_size]), ShapeTuple([self.page_size]),
            # support_sliding_window stays 0 even for sliding-window models: their layers
            # carry the window ("mha_sliding"), and TVM turns this flag into inline RoPE
            # (keys rotated at every attention call, theta fixed at 10000), which mlc's
            # models and CPU kernels do not use.
            ShapeTuple([0]))
        self.total_pages = self.free_pages()

    def add_sequence(self, seq_id: int) -> None:
        self._add_seq(self.kv_cache, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._remove_seq(self.kv_cache, seq_id)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        self._fork_seq(self.kv_cache, parent, child, fork_pos)

    def popn(self, seq_id: int, n: int) -> None:
        self._popn(self.kv_cache, seq_id, n)

    def free_pages(self) -> int:
        return int(self._free_pages(self.kv_cache))

    # -- forward ---------------------------------------------------------------------------
    def _embed(self, token_ids: np.ndarray, shape: tuple[int, ...]):
        import tvm
        from tvm.runtime import ShapeTuple

        ids = tvm.runtime.tensor(np.ascontiguousarray(token_ids, dtype="int32"), self.device)
        return self._reshape(self._fn["embed"](ids, self.params), ShapeTuple(shape))

    def _forward(self, fn: str, seq_ids: list[int], lengths: list[int], *args):
        from tvm.runtime import ShapeTuple

        self._begin(self.kv_cache, ShapeTuple(seq_ids), ShapeTuple(lengths))
        try:
            out = self._fn[fn](*args, self.kv_cache, self.params)
        finally:
            self._end(self.kv_cache)
        logits = out[0] if not hasattr(out, "numpy") else out
        return logits

    def _as_rows(self, logits, rows: int):
        """Logits [..., v] on the device as a [rows, v] view."""
        from tvm.runtime import ShapeTuple

        return self._reshape(logits, ShapeTuple((rows, self.vocab_size)))

    def prefill_logits(self, seq_ids: list[int], token_lists: list[list[int]]):
        """Append prompt chunks to sequences; logits after each chunk's last token [b, v],
        on the device."""
        import tvm

        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype="int32") for t in token_lists])
        embeds = self._embed(flat, (1, len(flat), self.hidden_size))
        if self.keep_hidden:
            return self._hidden_logits("batch_prefill_to_last_hidden_states", seq_ids, lengths,
                                       embeds, np.cumsum(lengths) - 1)
        if len(seq_ids) == 1 and not self.batch_invariant:
            logits = self._forward("prefill", seq_ids, lengths, embeds)
        else:
            positions = np.cumsum(lengths, dtype="int32") - 1
            pos = tvm.runtime.tensor(positions, self.device)
            logits = self._forward("batch_prefill", seq_ids, lengths, embeds, pos)
        return self._as_rows(logits, len(seq_ids))

    def prefill_scored_logits(self, seq_ids: list[int], token_lists: list[list[int]],
                              scored: list[bool]):
        """`prefill_logits`, plus the logits of every position of the chunks marked in
        `scored` (through `batch_prefill`'s logit positions; no other library function).
        Returns (logits [rows, v] on the device, first row of each chunk); a chunk's rows are
        all its positions when scored, else its last one."""
        import tvm

        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype="int32") for t in token_lists])
        embeds = self._embed(flat, (1, len(flat), self.hidden_size))
        ends = np.cumsum(lengths)
        positions, first_rows = [], []
        for end, length, score in zip(ends, lengths, scored):
            first_rows.append(len(positions))
            positions.extend(range(end - length, end) if score else [end - 1])
        if self.keep_hidden:
            return self._hidden_logits("batch_prefill_to_last_hidden_states", seq_ids, lengths,
                                       embeds, positions), first_rows
        pos = tvm.runtime.tensor(np.asarray(positions, dtype="int32"), self.device)
        logits = self._forward("batch_prefill", seq_ids, lengths, embeds, pos)
        return self._as_rows(logits, len(positions)), first_rows

    def decode_logits(self, seq_ids: list[int], tokens: list[int]):
        """One new token for each sequence; logits [b, v] on the device."""
        b = len(seq_ids)
        embeds = self._embed(np.asarray(tokens, dtype="int32"), (b, 1, self.hidden_size))
        if self.keep_hidden:
            return self._hidden_logits("batch_decode_to_last_hidden_states", seq_ids, [1] * b,
                                       embeds, np.arange(b))
        fn = "decode" if b == 1 and not self.batch_invariant else "batch_decode"
        return self._as_rows(self._forward(fn, seq_ids, [1] * b, embeds), b)

    def verify_logits(self, seq_ids: list[int], token_lists: list[list[int]]):
        """Append draft tokens (chains); logits at every new position [n, v] on the device."""
        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype="int32") for t in token_lists])
        embeds = self._embed(flat, (1, len(flat), self.hidden_size))
        if self.keep_hidden:
            return self._hidden_logits("batch_verify_to_last_hidden_states", seq_ids, lengths,
                                       embeds, np.arange(len(flat)))
        return self._as_rows(self._forward("batch_verify", seq_ids, lengths, embeds), len(flat))

    def _hidden_logits(self, fn: str, seq_ids: list[int], lengths: list[int], embeds,
                       positions):
        """Run a hidden-state forward, keep its hidden states on the host (`last_hidden`,
        one row per token), return the logits of the rows `positions` [b, v]."""
        hidden = self.reshape(self._forward(fn, seq_ids, lengths, embeds),
                              (sum(lengths), self.hidden_size))
        self.last_hidden = hidden.numpy()
        return self.hidden_logits(hidden, positions)

    def hidden_logits(self, hidden, positions):
        """The LM head on rows `positions` of final hidden states [n, h] (a device tensor or
        a host array) -> logits [b, v] on the device."""
        if isinstance(hidden, np.ndarray):
            hidden = self.upload(hidden)
        pos = self.upload(np.asarray(positions, dtype="int32"))
        return self._fn["get_logits"](hidden, pos, self.params)

    @property
    def has_hidden_states(self) -> bool:
        """Whether the library returns hidden states (`prefill_hidden_states` works)."""
        return EMBEDDING_HIDDEN_FUNCTION in self._fn

    def check_hidden_states(self) -> None:
        """Raise a clear error when the library predates `batch_prefill_hidden_states`."""
        if not self.has_hidden_states:
            raise ModelLoadError(
                f"The model library {self.lib_path} has no {EMBEDDING_HIDDEN_FUNCTION} function "
                "(it was built by an older mlc), so it cannot compute embeddings. Rebuild it "
                f"with `mlc compile {self.model_dir} --device {self.device_kind} -o "
                f"{self.lib_path}`, or omit model_lib to compile one on demand.",
                param="model_lib")

    def prefill_hidden_states(self, seq_ids: list[int], token_lists: list[list[int]]
                              ) -> np.ndarray:
        """Append prompt chunks to sequences; the final (normed) hidden state of every
        position of every chunk, concatenated, on the host: [sum of lengths, hidden] float32."""
        self.check_hidden_states()
        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype="int32") for t in token_lists])
        embeds = self._embed(flat, (1, len(flat), self.hidden_size))
        hidden = self._forward(EMBEDDING_HIDDEN_FUNCTION, seq_ids, lengths, embeds)
        return hidden.numpy().reshape(len(flat), self.hidden_size)

    def prefill(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        """`prefill_logits`, copied to the host [b, v]."""
        return self.prefill_logits(seq_ids, token_lists).numpy()

    def decode(self, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
        """`decode_logits`, copied to the host [b, v]."""
        return self.decode_logits(seq_ids, tokens).numpy()

    def verify(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        """`verify_logits`, copied to the host [n, v]."""
        return self.verify_logits(seq_ids, token_lists).numpy()

    # -- device tensors for sampling ------------------------------------------------------
    def upload(self, array: np.ndarray):
        """A host array as a tensor on the model's device."""
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def empty(self, shape: tuple[int, ...], dtype: str = "float32"):
        import tvm

        return tvm.runtime.empty(shape, dtype, self.device)

    def reshape(self, tensor, shape: tuple[int, ...]):
        """A view of `tensor` with another shape (same element count)."""
        from tvm.runtime import ShapeTuple

        return self._reshape(tensor, ShapeTuple(shape))

    @staticmethod
    def row(tensor, i: int):
        """Row i of a contiguous [rows, n] device tensor, as a [1, n] view sharing memory."""
        n = int(tensor.shape[1])
        itemsize = np.dtype(str(tensor.dtype)).itemsize
        # TVM 0.27 offers views only through this (underscored) method of its Tensor.
        return tensor._create_view((1, n), str(tensor.dtype), relative_byte_offset=i * n * itemsize)


class LoadedHead(LoadedModel):
    """An EAGLE draft head's library and weights, with its own paged KV cache: it reads the
    target's final hidden states, and its outputs go through the target's LM head
    (`LoadedModel.hidden_logits`)."""

    required_functions = ("embed", "batch_prefill_to_last_hidden_states",
                          "batch_decode_to_last_hidden_states", "create_paged_kv_cache",
                          "_metadata")

    def _check_library(self, lib_path) -> None:
        missing = [f for f in self.required_functions if not self._has(f)]
        if missing:
            raise ModelLoadError(
                f"{lib_path} lacks the functions {missing}: it is not the library of an EAGLE "
                f"head (model_type eagle). Convert the head with `mlc convert HEAD_DIR -o OUT` "
                "and compile it with `mlc compile OUT`.", param="additional_models")

    def prefill_hidden(self, seq_ids: list[int], token_lists: list[list[int]],
                       features: np.ndarray) -> np.ndarray:
        """Append chunks: each token with the target feature it is paired with (`features`
        [tokens, h], in order); the head's outputs after each chunk's last token [b, h]."""
        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype="int32") for t in token_lists])
        embeds = self._embed(flat, (1, len(flat), self.hidden_size))
        feats = self.reshape(self.upload(features.astype(self.dtype_np)),
                             (1, len(flat), self.hidden_size))
        pos = self.upload((np.cumsum(lengths) - 1).astype("int32"))
        out = self._forward("batch_prefill_to_last_hidden_states", seq_ids, lengths, embeds,
                            feats, pos)
        return self.reshape(out, (len(seq_ids), self.hidden_size)).numpy()

    def decode_hidden(self, seq_ids: list[int], tokens: list[int],
                      features: np.ndarray) -> np.ndarray:
        """One draft step: each token with the head's previous output [b, h] -> [b, h]."""
        b = len(seq_ids)
        embeds = self._embed(np.asarray(tokens, dtype="int32"), (b, 1, self.hidden_size))
        feats = self.reshape(self.upload(features.astype(self.dtype_np)),
                             (b, 1, self.hidden_size))
        out = self._forward("batch_decode_to_last_hidden_states", seq_ids, [1] * b, embeds,
                            feats)
        return self.reshape(out, (b, self.hidden_size)).numpy()

    @property
    def dtype_np(self) -> str:
        return self.metadata["model_dtype"]
