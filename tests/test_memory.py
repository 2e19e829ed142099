"""Host memory: the resident set `mlc bench` reports, and the heap an engine returns to the
OS after loading (`mlc.support.memory`)."""

from __future__ import annotations

import ctypes
import json
import sys

import pytest
from click.testing import CliRunner
from helpers import build_lib, make_tiny_llama, write_mlc_dir

from mlc.cli.main import cli
from mlc.support.memory import release_free_memory, resident_set_mib

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc")


RSS_SCRIPT = r"""
import json
import numpy as np
from mlc.support.memory import reset_peak_rss, resident_set_mib
before = resident_set_mib()
block = np.ones(64 << 20, dtype=np.uint8)          # 64 MiB, every page written
during = resident_set_mib()
del block
after = resident_set_mib()
reset = reset_peak_rss()
print(json.dumps({"before": before, "during": during, "after": after, "reset": reset,
                  "peak_after_reset": resident_set_mib()["peak"]}))
"""


@linux_only
def test_resident_set_follows_touched_memory():
    """In a fresh process (a long test process may hand numpy pages it already holds)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    before, during, after = r["before"], r["during"], r["after"]
    assert 56 < during["rss"] - before["rss"] < 80
    assert during["peak"] >= during["rss"]
    assert during["rss"] - after["rss"] > 56           # numpy's large blocks are unmapped
    assert after["peak"] > during["rss"] - 1          # the peak remembers
    assert r["reset"]
    assert r["peak_after_reset"] < during["rss"] - 32


@linux_only
def test_release_free_memory_returns_freed_heap():
    """Blocks under glibc's mmap threshold live on the heap; freed, they stay resident until
    malloc_trim, except the top of the heap (kept here by one live block)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 16 << 10, 3072                          # 48 MiB in 16 KiB blocks
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    keep = libc.malloc(size)                              # pins the heap's top
    ctypes.memset(keep, 1, size)
    for b in blocks:
        libc.free(b)
    freed = resident_set_mib()["rss"]
    assert release_free_memory()
    assert freed - resident_set_mib()["rss"] > 32
    libc.free(keep)


@linux_only
def test_mlc_bench_reports_resident_set(tmp_path):
    hf, hf_dir = make_tiny_llama(tmp_path)
    mlc_dir = write_mlc_dir(hf, tmp_path / "mlc", "q4f32_1", hf_dir=hf_dir)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, [
        "bench", str(mlc_dir), "--device", "cpu", "--model-lib", str(build_lib(mlc_dir)),
        "--prompts", "16", "--batches", "1", "--decode-tokens", "4", "--runs", "1",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    for label in ("before load", "loaded", "at the end", "peak"):
        assert f"resident set MiB, {label}" in result.output
    rss = json.loads(out.read_text())[0]["rss_mib"]
    assert set(rss) == {"base", "loaded", "end", "peak"}
    assert 0 < rss["base"] <= rss["peak"] and rss["loaded"] <= rss["peak"] + 1
