"""Where mlc keeps what it builds and downloads: one cache root, below runtime and compiler
alike (the runtime's library cache and the compiler's kernel objects both live here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MLC_CACHE_DIR`, default `~/.cache/mlc`."""
    return Path(os.environ.get("MLC_CACHE_DIR", Path.home() / ".cache" / "mlc"))
