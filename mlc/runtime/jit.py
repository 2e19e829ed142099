"""Finding or building the model library when the user gives none (`model_lib=None`).

Order: a library next to the weights that fits the device, then the cache (keyed by a hash of
the weights' config, quantization, device, compiler version and overrides), then an on-demand
compile into the cache. `MLC_JIT_POLICY` chooses: ON (default), OFF (never compile), REDO
(always recompile), READONLY (use the cache, never write it). Concurrent processes serialize
on a lock file, and the library appears by atomic rename, so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from mlc.errors import ModelLoadError
from mlc.support.chat_config import ChatConfig
from mlc.support.cuda_arch import arch_for_compute_capability
from mlc.support.paths import cache_root
from mlc.support.versions import LIBRARY_VERSION

POLICIES = ("ON", "OFF", "REDO", "READONLY")


def jit_policy() -> str:
    policy = os.environ.get("MLC_JIT_POLICY", "ON").upper()
    if policy not in POLICIES:
        raise ModelLoadError(f"MLC_JIT_POLICY={policy!r} is not one of {', '.join(POLICIES)}.")
    return policy


def compile_device_for(device_kind: str, device) -> str:
    """The `mlc compile --device` string for a runtime device."""
    if device_kind == "cuda":
        return "cuda:" + arch_for_compute_capability(device.compute_version)
    return "cpu"


def library_key(chat: ChatConfig, compile_device: str, overrides: dict) -> str:
    payload = json.dumps({"model_config": chat.model_config, "quantization": chat.quantization,
                          "model_type": chat.model_type, "device": compile_device,
                          "context_window_size": chat.context_window_size,
                          "prefill_chunk_size": chat.prefill_chunk_size,
                          "version": LIBRARY_VERSION, "overrides": overrides},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def library_next_to_weights(model_dir: Path, compile_device: str) -> Path | None:
    """A library shipped in the model dir for this device (lib-cuda-sm_90a.so, lib-cpu.so)."""
    kind = compile_device.split(":")[0]
    for name in (f"lib-{compile_device.replace(':', '-')}.so", f"lib-{kind}.so"):
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def cached_library_path(chat: ChatConfig, compile_device: str,
                        overrides: dict | None = None) -> Path:
    """Where the on-demand library of a model for `compile_device` lives in the cache."""
    overrides = overrides or {}
    return cache_root() / "lib" / f"{chat.model_type}-{chat.quantization}-" \
        f"{compile_device.replace(':', '-')}-{library_key(chat, compile_device, overrides)}.so"


def find_or_build_library(model_dir: Path, device_kind: str, device,
                          overrides: dict | None = None, quiet: bool = False) -> Path:
    """The library to use for `model_dir` on `device`, compiling it if the policy allows."""
    chat = ChatConfig.load(model_dir)
    target = compile_device_for(device_kind, device)
    overrides = overrides or {}
    policy = jit_policy()
    if policy != "REDO" and not overrides:
        local = library_next_to_weights(model_dir, target)
        if local:
            return local
    path = cached_library_path(chat, target, overrides)
    if path.is_file() and policy != "REDO":
        return path
    if policy in ("OFF", "READONLY"):
        raise ModelLoadError(
            f"No model library for {model_dir} on {target} (looked next to the weights and in "
            f"{path.parent}), and MLC_JIT_POLICY={policy} forbids compiling one. Build it with "
            f"`mlc compile {model_dir} --device {target} -o {model_dir}/lib-{target.split(':')[0]}.so`"
            " or set MLC_JIT_POLICY=ON.", param="model_lib")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # a second process waits, then reuses
        if path.is_file() and policy != "REDO":
            return path
        try:
            from mlc.compiler.compile import compile_model
        except ImportError as e:
            raise ModelLoadError(
                "Compiling a model library needs the full apache-tvm package (this TVM is "
                "runtime-only). Compile on another machine with `mlc compile` and pass "
                "model_lib=...") from e
        compile_model(model_dir, target, path, overrides=overrides, quiet=quiet)
    return path
