"""GPU tests: skipped unless a CUDA GPU is visible and the assets are given.

MLC_GPU_ASSETS names a folder with `smol-q4f16_1/` (an MLC dir of the embedded SmolLM2),
`smol-q0f16/mlc-chat-config.json`, and libraries `smol-{q4f16_1,q0f16}-{cuda,cpu}.so`, all
built on a machine with the full TVM (`mlc compile --device cuda:sm_90a` / `--device cpu`).
"""

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    from mlc.runtime.device import cuda_available

    if not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "tests/gpu" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_assets() -> Path:
    path = os.environ.get("MLC_GPU_ASSETS")
    if not path or not Path(path, "smol-q4f16_1", "mlc-chat-config.json").is_file():
        pytest.skip("MLC_GPU_ASSETS does not hold the SmolLM2 assets")
    return Path(path)
