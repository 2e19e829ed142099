"""Fixtures of the MLC-LLM compatibility tests: a tiny random Llama as an HF dir, as an MLC
model dir, and its CPU library (built once, cached under $MLC_TEST_CACHE)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import build_lib, make_tiny_llama, write_mlc_dir


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """hf_dir (config.json + safetensors + tokenizer), mlc_dir (q4f32_1) and lib (CPU)."""
    tmp = tmp_path_factory.mktemp("compat-tiny")
    hf_model, hf_dir = make_tiny_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q4f32_1", hf_dir=hf_dir)
    return SimpleNamespace(hf_model=hf_model, hf_dir=hf_dir, mlc_dir=mlc_dir,
                           lib=build_lib(mlc_dir))
