"""A `ModelRunner` without a model, to measure and test the host path of the engine and server.

`FakeRunner` answers every forward call at once, and its sampling functions return
deterministic pseudo-random token ids: the device-sampling path's shape, where only token ids
reach the host. With `step_s`, it keeps a GPU's timing: a forward call only launches the step,
and reading the sampled ids back (`.numpy()`) waits, without the GIL, until `step_s` after the
launch; like a TVM call, every call into the fake releases the GIL once. Everything else is
the real engine: Scheduler, step actions, DeviceSampler, OutputProcessor with the model dir's
real tokenizer, delivery, and the HTTP server on top. So with `step_s=0` the engine's rate is
its host ceiling, and the server's rate the server's.

Nothing in the normal path imports this module. An engine runs over a `FakeRunner` only when
it is built as one of the classes below, which override the engine's one seam for this,
`_EngineBase._load_runner`; no model name, option or environment variable reaches it.

    engine = FakeAsyncMLCEngine(model_dir, step_s=0.008)   # ~an H200's SmolLM2 batch-64 step

Which token comes next: a greedy sequence takes `fake_token(last token)`; a sampling sequence
`fake_draw(u)` from the uniform number its own seeded generator drew for the step (so a
seeded request is reproducible, as on a real device). Both avoid the first `FIRST_TEXT_ID`
ids (the special tokens of the usual vocabularies).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mlc.runtime.device import parse_runtime_device
from mlc.runtime.engine import AsyncMLCEngine, MLCEngine
from mlc.runtime.model import SAMPLING_FUNCTIONS
from mlc.support.chat_config import ChatConfig

FIRST_TEXT_ID = 256         # ids below are left alone (special tokens of the usual vocabularies)
PAGE_SIZE = 16


def fake_token(last: int, vocab: int) -> int:
    """The greedy next token after `last` (a fixed permutation-like walk over text ids)."""
    span = vocab - FIRST_TEXT_ID
    return FIRST_TEXT_ID + (int(last) * 7919 + 104729) % span


def fake_draw(u: float, vocab: int) -> int:
    """The sampled token for uniform number `u` in [0, 1)."""
    span = vocab - FIRST_TEXT_ID
    return FIRST_TEXT_ID + min(int(u * span), span - 1)


class FakeTensor:
    """Logits or sampling outputs of the fake: `ids` [rows] are the greedy tokens; `.numpy()`
    materializes float32 logits [rows, vocab] with a peak at each id (only a request asking
    for logprobs, penalties or a bias reads them), and a row edited through `row()` changes
    its argmax."""

    def __init__(self, ids: np.ndarray, vocab: int, dense: np.ndarray | None = None):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.vocab = vocab
        self.shape = (len(self.ids), vocab)
        self.dtype = "float32"
        self._dense = dense

    def dense(self) -> np.ndarray:
        if self._dense is None:
            self._dense = np.zeros(self.shape, dtype=np.float32)
            self._dense[np.arange(len(self.ids)), self.ids] = 10.0
        return self._dense

    def numpy(self) -> np.ndarray:
        return self.dense().copy()

    def argmax(self) -> np.ndarray:
        return self.ids if self._dense is None else self._dense.argmax(axis=1)


def _release_gil(until: float = 0.0) -> None:
    """Let other threads run, as a TVM call does (`time.sleep` drops the GIL), until the
    monotonic time `until` if it is ahead."""
    time.sleep(max(0.0, until - time.monotonic()))


class FakeIds:
    """A sampling function's output: token ids [rows]; `.numpy()` copies them to the host
    once the step's "device work" is done (at monotonic time `ready_at`)."""

    def __init__(self, ids, ready_at: float = 0.0):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.ready_at = ready_at

    def numpy(self) -> np.ndarray:
        _release_gil(self.ready_at)
        return self.ids.copy()


class FakeRow:
    """Row `i` of a `FakeTensor` as a [1, vocab] view (`numpy`, `copyfrom`)."""

    def __init__(self, parent: FakeTensor, i: int):
        self.parent, self.i = parent, i
        self.shape = (1, parent.vocab)

    def numpy(self) -> np.ndarray:
        return self.parent.dense()[self.i:self.i + 1].copy()

    def copyfrom(self, source) -> None:
        rows = source.numpy() if hasattr(source, "numpy") else np.asarray(source)
        self.parent.dense()[self.i] = rows.reshape(-1)


class FakeRunner:
    """The `ModelRunner` interface over nothing: page bookkeeping for the Scheduler, instant
    (or GPU-timed, see `step_s`) forward calls, and the library's four sampling functions."""

    def __init__(self, model_dir: str | Path, step_s: float = 0.0):
        self.model_dir = Path(model_dir)
        self.chat_config = ChatConfig.load(self.model_dir)
        self.vocab_size = self.chat_config.vocab_size
        self.hidden_size = self.chat_config.model_config.get("hidden_size", 64)
        self.device_kind = "fake"
        self.lib_path = Path("<fake>")
        self.device = parse_runtime_device("cpu")[1]   # (for the memory plan: host memory)
        self.params: list = []
        self.step_s = step_s
        cfg = self.chat_config.model_config
        self.metadata = {
            "context_window_size": self.chat_config.context_window_size,
            "prefill_chunk_size": self.chat_config.prefill_chunk_size,
            "max_batch_size": cfg.get("max_batch_size", 128), "activation_bytes": 0,
            "vocab_size": self.vocab_size,
            "kv_cache": {"dtype": "float16", "page_size": PAGE_SIZE,
                         "num_hidden_layers": cfg.get("num_hidden_layers", 1),
                         "num_key_value_heads": cfg.get("num_key_value_heads", 1),
                         "head_dim": cfg.get("head_dim", 64)}}
        self.page_size = PAGE_SIZE
        self.total_pages = 0
        self.kv_cache = None
        self.lengths: dict[int, int] = {}
        self.ready_at = 0.0                 # when the last launched step "finishes"
        self.sampling = {"argmax": self._argmax, "apply_logit_bias": self._apply_logit_bias,
                         "softmax_with_temperature": self._softmax,
                         "sample_with_top_p_top_k": self._sample}
        assert set(self.sampling) == set(SAMPLING_FUNCTIONS)

    # -- KV cache: pages counted from each sequence's length ------------------------------
    def create_kv_cache(self, cfg) -> None:
        self.kv_cache = cfg
        self.total_pages = -(-cfg.max_total_sequence_length // PAGE_SIZE)
        self.lengths.clear()

    def free_pages(self) -> int:
        used = sum(-(-n // PAGE_SIZE) for n in self.lengths.values())
        return self.total_pages - used

    def add_sequence(self, seq_id: int) -> None:
        self.lengths[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        del self.lengths[seq_id]

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        self.lengths[child] = self.lengths[parent] if fork_pos < 0 else fork_pos

    def popn(self, seq_id: int, n: int) -> None:
        self.lengths[seq_id] -= n

    # -- forward ---------------------------------------------------------------------------
    def _forward(self, seq_ids: list[int], token_lists: list[list[int]],
                 all_rows: list[bool]) -> FakeTensor:
        """Append the tokens; logits rows for every position of a sequence whose `all_rows`
        is set, else for its last position only."""
        _release_gil()
        self.ready_at = time.monotonic() + self.step_s
        ids = []
        for seq_id, tokens, every in zip(seq_ids, token_lists, all_rows):
            self.lengths[seq_id] += len(tokens)
            ids += [fake_token(t, self.vocab_size) for t in (tokens if every else tokens[-1:])]
        return FakeTensor(np.array(ids, dtype=np.int64), self.vocab_size)

    def prefill_logits(self, seq_ids, token_lists):
        return self._forward(seq_ids, token_lists, [False] * len(seq_ids))

    def prefill_scored_logits(self, seq_ids, token_lists, scored):
        firsts, row = [], 0
        for tokens, score in zip(token_lists, scored):
            firsts.append(row)
            row += len(tokens) if score else 1
        return self._forward(seq_ids, token_lists, list(scored)), firsts

    def decode_logits(self, seq_ids, tokens):
        return self._forward(seq_ids, [[t] for t in tokens], [True] * len(seq_ids))

    def verify_logits(self, seq_ids, token_lists):
        return self._forward(seq_ids, token_lists, [True] * len(seq_ids))

    # -- device tensors ----------------------------------------------------------------
    def upload(self, array):
        _release_gil()
        return np.ascontiguousarray(array)

    def empty(self, shape, dtype: str = "float32"):
        return FakeTensor(np.zeros(shape[0], dtype=np.int64), shape[1])

    def reshape(self, tensor, shape):
        return tensor

    @staticmethod
    def row(tensor, i: int):
        return FakeRow(tensor, i)

    # -- the library's sampling functions -------------------------------------------------
    def _argmax(self, x: FakeTensor) -> FakeIds:
        _release_gil()
        return FakeIds(x.argmax(), self.ready_at)

    def _apply_logit_bias(self, x: FakeTensor, bias) -> FakeTensor:
        return FakeTensor(x.ids, self.vocab_size, x.dense() + np.asarray(bias))

    def _softmax(self, x: FakeTensor, temperatures) -> FakeTensor:
        _release_gil()
        return x

    def _sample(self, probs: FakeTensor, top_p, top_k, uniform) -> FakeIds:
        _release_gil()
        return FakeIds([fake_draw(u, self.vocab_size) for u in uniform], self.ready_at)


class _FakeModel:
    """The engine seam: run over a `FakeRunner` of the model dir (its chat config and
    tokenizer are real), each step taking `step_s` seconds of "device" time."""

    def __init__(self, model: str, device: str = "cpu", *, step_s: float = 0.0, **kwargs):
        self.fake_step_s = step_s
        super().__init__(model, device, **kwargs)

    def _load_runner(self, model_lib, device) -> FakeRunner:
        return FakeRunner(self.model_dir, self.fake_step_s)


class FakeMLCEngine(_FakeModel, MLCEngine):
    """`MLCEngine` over a `FakeRunner` (benchmarks and tests of the host path only)."""


class FakeAsyncMLCEngine(_FakeModel, AsyncMLCEngine):
    """`AsyncMLCEngine` over a `FakeRunner` (benchmarks and tests of the host path only)."""


__all__ = ["FakeRunner", "FakeMLCEngine", "FakeAsyncMLCEngine", "fake_token", "fake_draw"]
