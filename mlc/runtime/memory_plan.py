"""Engine limits from the mode, the library, and the memory the device has.

The plan is printed term by term (`verbose=True`) so a user can see why a size was chosen,
and it never refuses to start when a smaller KV cache would fit: it shrinks, and says so.

With speculative decoding by a draft model or an EAGLE head (`DraftNeeds`), the draft's
weights and activations come out of the budget too, and its KV cache holds as many tokens as
the target's: each KV token costs the target's bytes plus the draft's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlc.errors import ModelLoadError

MODES = ("local", "interactive", "server")
GiB = 1 << 30


@dataclass(frozen=True)
class DraftNeeds:
    """What a draft model (small_draft) or an EAGLE head takes from the device budget."""

    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int = 0

    @classmethod
    def of(cls, metadata: dict, weight_bytes: int) -> DraftNeeds:
        """From the draft library's metadata and its loaded weights."""
        return cls(weight_bytes, kv_bytes_per_token(metadata),
                   metadata.get("activation_bytes", 0))


@dataclass
class MemoryPlan:
    mode: str
    device_bytes: int
    utilization: float
    weight_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int
    max_batch_size: int
    max_total_sequence_length: int
    prefill_chunk_size: int
    context_window_size: int
    draft: DraftNeeds | None = None

    @property
    def kv_bytes(self) -> int:
        """The target's KV cache."""
        return self.kv_bytes_per_token * self.max_total_sequence_length

    @property
    def draft_kv_bytes(self) -> int:
        """The draft's KV cache (as many tokens as the target's)."""
        return self.draft.kv_bytes_per_token * self.max_total_sequence_length if self.draft \
            else 0

    @property
    def used_bytes(self) -> int:
        """Everything the plan places on the device."""
        d = self.draft
        return (self.weight_bytes + self.activation_bytes + self.kv_bytes
                + (d.weight_bytes + d.activation_bytes + self.draft_kv_bytes if d else 0))

    def describe(self) -> str:
        budget = int(self.device_bytes * self.utilization)
        lines = [
            f"memory plan (mode={self.mode}):",
            f"  device memory            {self.device_bytes / GiB:8.2f} GiB",
            f"  x utilization {self.utilization:.2f}      = {budget / GiB:8.2f} GiB budget",
            f"  - weights                {self.weight_bytes / GiB:8.2f} GiB",
            f"  - activations (estimate) {self.activation_bytes / GiB:8.2f} GiB",
            f"  - KV cache               {self.kv_bytes / GiB:8.2f} GiB "
            f"({self.max_total_sequence_length} tokens x {self.kv_bytes_per_token} B/token)",
            *self._draft_lines(),
            f"  = headroom               {(budget - self.used_bytes) / GiB:8.2f} GiB",
            f"  max_batch_size={self.max_batch_size} prefill_chunk_size={self.prefill_chunk_size}"
            f" context_window_size={self.context_window_size}",
        ]
        return "\n".join(lines)

    def _draft_lines(self) -> list[str]:
        d = self.draft
        if d is None:
            return []
        return [f"  - draft weights          {d.weight_bytes / GiB:8.2f} GiB",
                f"  - draft activations      {d.activation_bytes / GiB:8.2f} GiB",
                f"  - draft KV cache         {self.draft_kv_bytes / GiB:8.2f} GiB "
                f"({self.max_total_sequence_length} tokens x {d.kv_bytes_per_token} B/token)"]


def host_memory_bytes() -> int:
    """Available host memory (the CPU device's budget)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemTotal", 8 * GiB))
    except OSError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device) -> int:
    """Total memory of a TVM device (host memory for the CPU)."""
    if device.dlpack_device_type() == 1:  # kDLCPU
        return host_memory_bytes()
    try:
        return int(device.total_global_memory)
    except Exception:  # noqa: BLE001 - older runtimes lack the attribute
        return 16 * GiB


def kv_bytes_per_token(metadata: dict) -> int:
    kv = metadata["kv_cache"]
    dtype_bytes = 2 if kv["dtype"] == "float16" else 4
    return 2 * kv["num_hidden_layers"] * kv["num_key_value_heads"] * kv["head_dim"] * dtype_bytes


def plan_memory(metadata: dict, weight_bytes: int, device, mode: str,
                max_batch_size: int | None, max_total_sequence_length: int | None,
                prefill_chunk_size: int | None, gpu_memory_utilization: float | None,
                draft: DraftNeeds | None = None) -> MemoryPlan:
    """Decide the engine limits: mode defaults, then explicit arguments, then memory (with
    `draft`, what a draft model or EAGLE head needs beside the target)."""
    if mode not in MODES:
        raise ModelLoadError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.",
                             param="mode")
    util = 0.85 if gpu_memory_utilization is None else gpu_memory_utilization
    if not 0 < util <= 1:
        raise ModelLoadError(f"gpu_memory_utilization must be in (0, 1], got {util}.",
                             param="gpu_memory_utilization")
    ctx = metadata["context_window_size"]
    lib_batch, lib_chunk = metadata["max_batch_size"], metadata["prefill_chunk_size"]
    per_token = kv_bytes_per_token(metadata)
    device_bytes = device_memory_bytes(device)
    budget = int(device_bytes * util) - weight_bytes - metadata.get("activation_bytes", 0)
    if draft is not None:
        budget -= draft.weight_bytes + draft.activation_bytes
    kv_capacity = max(budget // (per_token + (draft.kv_bytes_per_token if draft else 0)), 0)

    defaults = {"local": (4, ctx, ctx), "interactive": (1, ctx, ctx)}
    if mode in defaults:
        batch, total, chunk = defaults[mode]
    else:  # server: as many tokens as the budget allows, up to a full context per sequence
        batch, total, chunk = lib_batch, min(kv_capacity, lib_batch * ctx), lib_chunk
    batch = max_batch_size or batch
    total = max_total_sequence_length or total
    chunk = prefill_chunk_size or chunk
    if batch > lib_batch:
        raise ModelLoadError(
            f"max_batch_size={batch} exceeds the {lib_batch} the library was compiled for; "
            f"recompile with --overrides max_batch_size={batch}.", param="max_batch_size")
    chunk = min(chunk, lib_chunk)
    if total > kv_capacity and max_total_sequence_length is None:
        total = kv_capacity          # shrink to what fits instead of refusing to start
    if total < min(ctx, 4 * metadata["kv_cache"]["page_size"]):   # a few pages at least
        raise ModelLoadError(
            f"Only {kv_capacity} KV-cache tokens fit in {device_bytes / GiB:.1f} GiB x {util} "
            f"after {weight_bytes / GiB:.2f} GiB of weights"
            f"{f' and {draft.weight_bytes / GiB:.2f} GiB of draft weights' if draft else ''}: "
            "raise gpu_memory_utilization, "
            "lower prefill_chunk_size, or use a smaller quantization.",
            param="max_total_sequence_length")
    return MemoryPlan(mode, device_bytes, util, weight_bytes,
                      metadata.get("activation_bytes", 0), per_token, batch, total,
                      chunk, min(ctx, total), draft)
