"""What CPU this is and what a CPU library was compiled for (recorded in the library's
metadata, printed by `mlc compile`, written by bench/cpu.py)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The x86 features that decide which vector code LLVM may emit (a subset of LLVM's names).
NOTABLE_FEATURES = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                    "avx512vnni", "avx512bf16", "avx512fp16", "avxvnni", "amx-tile", "amx-int8",
                    "amx-bf16", "neon", "sve", "dotprod", "i8mm")


def cpu_model() -> str:
    """The host CPU's marketing name ("Intel(R) Xeon(R) ..."), or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_flags() -> list[str]:
    """The host's CPU flags as the kernel reports them (Linux), else []."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


# LLVM's feature names -> the kernel's /proc/cpuinfo flag names, where they differ.
_KERNEL_FLAG = {"sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
                "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
                "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "neon": "asimd",
                "dotprod": "asimddp"}


def host_features() -> list[str]:
    """The notable features (LLVM's names) this CPU has, read from /proc/cpuinfo: what a CPU
    library's recorded `features` must be a subset of. Works without TVM's compiler."""
    flags = set(host_flags())
    return [f for f in NOTABLE_FEATURES if _KERNEL_FLAG.get(f, f) in flags]


def target_features(target) -> list[str]:
    """The notable features an llvm Target's code may use (LLVM's view of its -mcpu/-mattr)."""
    from tvm.target import codegen

    features = set(codegen.llvm_get_cpu_features(target))
    return [f for f in NOTABLE_FEATURES if f in features]


def describe_cpu_target(target) -> dict:
    """The record kept with a CPU library: host model and core count, -mcpu, features."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "mcpu": str(target.attrs.get("mcpu", "")), "features": target_features(target)}
