"""The `ModelRunner` interface: what the engine core needs from a model.

`LoadedModel` (one device, `mlc.runtime.model`) is today's runner; a Disco runner for tensor
parallelism is another. The Scheduler uses the KV-cache half, the step actions the forward
half, and the OutputProcessor the sampling half (device sampling when `sampling` holds the
library's functions).
"""

from __future__ import annotations

from typing import Any, Protocol


class KVCacheManager(Protocol):
    """The paged KV cache as the Scheduler sees it."""

    page_size: int          # tokens per page, from the library's metadata
    total_pages: int        # pages of the whole cache

    def free_pages(self) -> int: ...
    def add_sequence(self, seq_id: int) -> None: ...
    def remove_sequence(self, seq_id: int) -> None: ...
    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None: ...


class ModelRunner(KVCacheManager, Protocol):
    """Forward calls return logits on the device ([rows, vocab], with `.numpy()`)."""

    vocab_size: int
    device_kind: str
    sampling: dict[str, Any]   # the library's sampling functions by name (may be empty)

    def prefill_logits(self, seq_ids: list[int], token_lists: list[list[int]]) -> Any: ...
    def prefill_scored_logits(self, seq_ids: list[int], token_lists: list[list[int]],
                              scored: list[bool]) -> tuple[Any, list[int]]: ...
    def decode_logits(self, seq_ids: list[int], tokens: list[int]) -> Any: ...
    def verify_logits(self, seq_ids: list[int], token_lists: list[list[int]]) -> Any: ...
    def popn(self, seq_id: int, n: int) -> None: ...

    # EAGLE drafting (after `enable_hidden_states()`): the final hidden states of the last
    # forward's tokens on the host, and the LM head on given hidden states
    last_hidden: Any
    def enable_hidden_states(self) -> None: ...
    def hidden_logits(self, hidden, positions) -> Any: ...

    # device tensors for the device sampler
    def upload(self, array) -> Any: ...
    def empty(self, shape: tuple[int, ...], dtype: str = "float32") -> Any: ...
    def reshape(self, tensor, shape: tuple[int, ...]) -> Any: ...
    def row(self, tensor, i: int) -> Any: ...
