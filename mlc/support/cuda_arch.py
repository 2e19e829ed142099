"""CUDA facts shared by compile targets and the runtime: the arch string for a compute
capability, and the key a library's precompiled cubin of TVM's kernels is stored under."""

import hashlib


def arch_for_compute_capability(version: str) -> str:
    """"9.0" -> "sm_90a" (Hopper's arch-specific features), "8.0" -> "sm_80"."""
    major, minor = version.strip().split(".")
    return f"sm_{major}{minor}" + ("a" if major == "9" else "")


def precompiled_cubin_key(arch: str, code: str) -> str:
    """"sm_90a:<digest of the CUDA source>": what `mlc compile` stores a cubin under and what
    the runtime's compile callback looks it up by."""
    return f"{arch}:{hashlib.sha256(code.encode()).hexdigest()[:32]}"
