"""Host memory of this process: its resident set, and handing freed heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Return the free pages of the C heap to the OS (glibc `malloc_trim`). Loading leaves
    tens of MiB of freed but resident heap behind (tokenizer JSON parsing, weights read
    through numpy before they were copied into TVM tensors: ~28 MiB for SmolLM2, see
    bench/NOTES.md). False where the C library has no `malloc_trim` (musl, macOS)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True


def resident_set_mib() -> dict[str, float]:
    """This process's resident set now ("rss") and its peak ("peak"), in MiB, from
    /proc/self/status (VmRSS, VmHWM); elsewhere the peak alone from getrusage."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        kib = {k: float(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
        return {"rss": kib["VmRSS"] / 1024, "peak": kib["VmHWM"] / 1024}
    except (OSError, KeyError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
        return {"peak": peak}


def reset_peak_rss() -> bool:
    """Restart the peak (VmHWM) from the current resident set, so that a compile that ran
    earlier in this process is not counted as the model's peak (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
