"""`mlc bench`: the figures it reports besides throughput (load time, the decode context)."""

import json

import pytest
from click.testing import CliRunner
from helpers import tiny_llama_library

from mlc.benchmark.model_bench import bench_model, load_and_warm_up
from mlc.cli.main import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    _, mlc_dir, lib = tiny_llama_library(tmp, "q4f32_1")
    return mlc_dir, lib


def test_bench_reports_load_time_and_decode_context(tiny, tmp_path):
    mlc_dir, lib = tiny
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, [
        "bench", str(mlc_dir), "--model-lib", str(lib), "--device", "cpu", "--prompts", "8",
        "--batches", "1,2", "--decode-tokens", "4", "--runs", "1", "--decode-context", "40",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "load s (to the first token)" in result.output
    assert "decode batch 2 tok/s (context 40)" in result.output
    (res,) = json.loads(out.read_text())
    assert res["load_seconds"] > 0 and res["decode_context"] == 40
    assert res["cuda_compile_seconds"] is None and res["cuda_kernels_precompiled"] is None
    assert set(res["decode_tok_s"]) == {"1", "2"}


def test_decode_is_timed_with_the_asked_context_in_the_cache(tiny):
    mlc_dir, lib = tiny
    model, load = load_and_warm_up(mlc_dir, lib, "cpu")
    assert load["load_seconds"] > 0
    prefilled: dict[int, int] = {}
    prefill = model.prefill

    def spy(seq_ids, token_lists):
        for s, tokens in zip(seq_ids, token_lists):
            prefilled[s] = prefilled.get(s, 0) + len(tokens)
        return prefill(seq_ids, token_lists)

    model.prefill = spy
    bench_model(model, "tiny", prompt_lengths=(8,), decode_tokens=4, batches=(1, 2), runs=2,
                decode_context=70, prefill_chunk=32)
    # the decoding sequences (ids from 100) hold 70 tokens, prefilled in chunks of 32
    assert {s: n for s, n in prefilled.items() if s >= 100} == {100: 140, 101: 70}
