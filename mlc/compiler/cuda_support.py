"""CUDA specifics of building: ship compiled cubins rather than CUDA source."""

from __future__ import annotations

import contextlib

from mlc.compiler.target import DeviceTarget


@contextlib.contextmanager
def precompiled_cuda(dev: DeviceTarget):
    """Placeholder context for CUDA export; plain export for other devices."""
    yield
