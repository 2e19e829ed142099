"""The `mlc_llm` command: MLC-LLM's verbs and documented arguments, on a tiny random Llama.

convert_weight + gen_config (in either order) must give the model dir `mlc convert` gives,
compile/chat/bench run for real, and serve's option mapping is checked without a server
(tests/compat/test_popen_server.py starts real ones). MLC-LLM options mlc lacks must stop
with a message that says so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import REPO

import mlc_llm.cli as mlc_llm_cli
from mlc.compiler.convert import convert
from mlc.runtime.model import read_library_metadata
from mlc.support.chat_config import ChatConfig

cli = mlc_llm_cli.cli


def run(*args, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def ok(*args, input: str | None = None):
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def refused(*args, match: str):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert match in result.output, result.output
    return result.output


def chat_dict(model_dir: Path) -> dict:
    data = json.loads((model_dir / "mlc-chat-config.json").read_text())
    data.pop("source")
    return data


def records(model_dir: Path) -> list:
    return json.loads((model_dir / "tensor-cache.json").read_text())["records"]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """What `mlc convert` writes for the tiny model with a 128-token context."""
    out = tmp_path_factory.mktemp("reference") / "model"
    return convert(str(tiny.hf_dir), "q4f32_1", out, quiet=True,
                   overrides="context_window_size=128;prefill_chunk_size=128")


@pytest.fixture(scope="module")
def two_step(tiny, tmp_path_factory) -> Path:
    """MLC-LLM's documented flow: gen_config, then convert_weight, into one dir."""
    out = tmp_path_factory.mktemp("two-step") / "model"
    ok("gen_config", tiny.hf_dir, "--quantization", "q4f32_1", "--context-window-size", 128,
       "-o", out)
    ok("convert_weight", tiny.hf_dir / "config.json", "--quantization", "q4f32_1", "-o", out)
    return out


# ---------------------------------------------------------------------------------------------
# convert_weight and gen_config


def test_two_steps_give_what_mlc_convert_gives(tiny, reference, two_step, tmp_path):
    assert chat_dict(two_step) == chat_dict(reference)
    assert records(two_step) == records(reference)
    assert sorted(p.name for p in two_step.iterdir()) == sorted(p.name
                                                                for p in reference.iterdir())
    # the other order: weights first, then the chat config
    out = tmp_path / "model"
    result = ok("convert_weight", tiny.hf_dir, "--quantization", "q4f32_1", "-o", out)
    assert "kept the existing" not in result.output
    ok("gen_config", tiny.hf_dir, "--quantization", "q4f32_1", "--context-window-size", 128,
       "-o", out)
    assert chat_dict(out) == chat_dict(reference)
    assert records(out) == records(reference)
    assert not list(out.glob(".*")), "no temporary dirs are left behind"


def test_gen_config_options(tiny, tmp_path):
    ok("gen_config", tiny.hf_dir, "--quantization", "q4f16_1", "--context-window-size", 200,
       "--prefill-chunk-size", 50, "--sliding-window-size", 64, "--max-batch-size", 8,
       "--tensor-parallel-shards", 2, "-o", tmp_path)
    chat = ChatConfig.load(tmp_path)
    assert (chat.quantization, chat.context_window_size, chat.tensor_parallel_shards) == \
        ("q4f16_1", 200, 2)
    assert chat.model_config["max_batch_size"] == 8
    assert chat.sliding_window_size == 64 and chat.prefill_chunk_size == 50
    assert (tmp_path / "tokenizer.json").is_file()


def test_conv_template(tiny, tmp_path):
    # a template mlc has replaces the HF one (MLC-LLM's prompts are what its users expect)
    result = ok("gen_config", tiny.hf_dir, "--quantization", "q0f32", "--conv-template",
                "llama-2", "-o", tmp_path / "a")
    chat = ChatConfig.load(tmp_path / "a")
    assert (chat.conv_template, chat.chat_template) == ("llama-2", None)
    assert "replaces the model's HF chat_template" in result.output
    # a template mlc lacks: the HF chat_template stays in use, and the user is told
    result = ok("gen_config", tiny.hf_dir, "--quantization", "q0f32", "--conv-template",
                "redpajama_chat", "-o", tmp_path / "b")
    chat = ChatConfig.load(tmp_path / "b")
    assert chat.chat_template and "HF chat_template is used" in result.output
    # ... which is an error when there is no HF chat_template to fall back on
    hf = tmp_path / "hf"
    shutil.copytree(tiny.hf_dir, hf)
    tok_cfg = json.loads((hf / "tokenizer_config.json").read_text())
    del tok_cfg["chat_template"]
    (hf / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    refused("gen_config", hf, "--quantization", "q0f32", "--conv-template", "redpajama_chat",
            "-o", tmp_path / "c", match="chatml, llama-2, llama-3")


def test_mismatched_steps_are_refused(tiny, two_step, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(two_step, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused("convert_weight", tiny.hf_dir, "--quantization", "q0f32", "-o", out,
            match="quantization q4f32_1 there, q0f32 here")
    refused("gen_config", tiny.hf_dir, "--quantization", "q0f32", "-o", out,
            match="Run convert_weight again after gen_config")
    refused("gen_config", tiny.hf_dir, "--quantization", "q4f32_1",
            "--tensor-parallel-shards", 2, "-o", out, match="tensor_parallel_shards 1 there")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unsupported_convert_and_gen_config_options(tiny, tmp_path):
    out = tmp_path / "out"
    common = [tiny.hf_dir, "--quantization", "q4f32_1", "-o", out]
    refused("convert_weight", *common, "--lora-adapter", tmp_path, match="merge the adapter")
    refused("convert_weight", *common, "--source-format", "awq", match="--source-format awq")
    refused("convert_weight", *common, "--source", tmp_path, match="from one place")
    refused("convert_weight", *common, "--model-type", "mistral", match="model_type=llama")
    refused("convert_weight", tiny.hf_dir, "--quantization", "q3f16_0", "-o", out,
            match="q4f16_1")
    refused("gen_config", *common, "--attention-sink-size", 4, match="no attention sinks")
    refused("gen_config", *common, "--pipeline-parallel-stages", 2, match="tensor-parallel")
    refused("gen_config", *common, "--disaggregation", "true", match="disaggregated")
    result = run("convert_weight", tiny.hf_dir, "-o", out)
    assert result.exit_code == 2 and "--quantization" in result.output


# ---------------------------------------------------------------------------------------------
# compile, chat, bench


@pytest.fixture(scope="module")
def compiled(two_step, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled")
    lib = out / "tiny-cpu.so"
    ok("compile", two_step / "mlc-chat-config.json", "--device", "cpu", "-o", lib,
       "--quantization", "q4f32_1", "--overrides", "prefill_chunk_size=64;max_batch_size=4",
       "--debug-dump", out / "dump")
    return lib


def test_compile(compiled, two_step):
    meta = read_library_metadata(compiled)
    assert (meta["model_type"], meta["quantization"], meta["device"]) == \
        ("llama", "q4f32_1", "cpu")
    assert (meta["prefill_chunk_size"], meta["max_batch_size"]) == (64, 4)
    assert (compiled.parent / "dump" / "phase1.py").is_file()       # --debug-dump
    from mlc.cli.doctor import Report, check_model

    report = Report()
    check_model(report, two_step, compiled, gpu_usable=False)
    assert report.problems == []


def test_unsupported_compile_options(two_step, tmp_path):
    common = [two_step, "--device", "cpu", "-o", tmp_path / "x.so"]
    refused("compile", *common, "--host", "x86_64-linux-gnu", match="--host")
    refused("compile", *common, "--system-lib-prefix", "tiny_", match="system libraries")
    refused("compile", *common, "--opt", "flashinfer=1;cudagraph=0", match="O0, O1, O2")
    refused("compile", *common, "--overrides", "attention_sink_size=4", match="attention sinks")
    refused("compile", *common, "--model-type", "mistral", match="model_type=llama")
    refused("compile", *common, "--quantization", "q0f32", match="holds q4f32_1 weights")
    assert not (tmp_path / "x.so").exists()


def test_chat(two_step, compiled):
    result = ok("chat", two_step, "--device", "cpu", "--model-lib", compiled,
                input="Hello\n/stats\n/exit\n")
    assert result.output.count(">>> ") == 3 and "decode:" in result.output
    refused("chat", two_step, "--overrides", "context_window_size=64",
            match="`mlc chat` has no such setting")
    refused("chat", two_step, "--overrides", "temperature=0", match="Unknown --overrides key")


def test_bench(two_step, compiled, monkeypatch):
    result = ok("bench", two_step, "--device", "cpu", "--model-lib", compiled,
                "--generate-length", 16, "--prompt", "Hello, world!",
                "--overrides", "prefill_chunk_size=32")
    assert "decode batch 1 tok/s" in result.output
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(two_step / "tokenizer.json")).encode(
        "Hello, world!", add_special_tokens=False).ids)
    assert f"--prompts {n} --batches 1 --decode-tokens 16" in result.output
    assert "--prefill-chunk 32" in result.output
    refused("bench", two_step, "--opt", "O3", match="--opt O3")


# ---------------------------------------------------------------------------------------------
# serve (the mapping; real servers in test_popen_server.py)


def serve_argv(monkeypatch, *args) -> list[str]:
    calls = []
    monkeypatch.setattr(mlc_llm_cli, "_run_mlc", lambda name, argv: calls.append((name, argv)))
    ok("serve", *args)
    [(name, argv)] = calls
    assert name == "serve"
    return argv


def test_serve_maps_mlc_llm_arguments(monkeypatch, two_step):
    argv = serve_argv(monkeypatch, two_step, "--model-lib", "lib.so", "--device", "cpu",
                      "--overrides", "max_num_sequence=8;max_total_seq_length=4096;"
                      "prefill_chunk_size=512", "--host", "0.0.0.0", "--port", 9000)
    assert argv == [str(two_step), "--device", "cpu", "--mode", "local", "--host", "0.0.0.0",
                    "--port", "9000", "--model-lib", "lib.so", "--max-batch-size", "8",
                    "--max-total-seq-length", "4096", "--prefill-chunk-size", "512"]
    # MLC-LLM's defaults: mode local, 127.0.0.1:8000
    assert serve_argv(monkeypatch, two_step)[:8] == [
        str(two_step), "--device", "auto", "--mode", "local", "--host", "127.0.0.1", "--port"]


def test_serve_debug_and_tracing_flags(monkeypatch, two_step):
    """Passed on when `mlc serve` has them; until then a note says they have no effect."""
    from mlc_llm.cli import _has_option, _mlc_command

    serve = _mlc_command("serve")
    result = CliRunner()
    calls = []
    monkeypatch.setattr(mlc_llm_cli, "_run_mlc", lambda name, argv: calls.append(argv))
    out = result.invoke(cli, ["serve", str(two_step), "--enable-debug", "--enable-tracing"])
    assert out.exit_code == 0
    for flag in ("--enable-debug", "--enable-tracing"):
        if _has_option(serve, flag):
            assert flag in calls[0]
        else:
            assert flag not in calls[0] and f"has no {flag} yet" in out.output


def test_serve_and_chat_map_speculative_decoding(monkeypatch, two_step):
    """MLC-LLM's `--speculative-mode`, `--additional-models MODEL[,LIB]` and
    `spec_draft_length` override become mlc's options (MODEL:LIB)."""
    spec = ("--speculative-mode", "eagle", "--additional-models", "/m/head,/m/head.so",
            "--overrides", "spec_draft_length=3", "--prefix-cache-mode", "disable")
    argv = serve_argv(monkeypatch, two_step, *spec)
    assert argv[9:] == ["--spec-draft-length", "3", "--speculative-mode", "eagle",
                        "--additional-models", "/m/head:/m/head.so",
                        "--prefix-cache-mode", "disable"]
    argv = serve_argv(monkeypatch, two_step, "--speculative-mode", "small_draft",
                      "--additional-models", "/m/draft")
    assert argv[9:] == ["--speculative-mode", "small_draft", "--additional-models", "/m/draft"]
    calls = []
    monkeypatch.setattr(mlc_llm_cli, "_run_mlc", lambda name, argv: calls.append((name, argv)))
    ok("chat", two_step, *spec[:6])
    assert calls == [("chat", [str(two_step), "--device", "auto", "--spec-draft-length", "3",
                               "--speculative-mode", "eagle", "--additional-models",
                               "/m/head:/m/head.so"])]


def test_unsupported_serve_options(two_step, monkeypatch):
    monkeypatch.setattr(mlc_llm_cli, "_run_mlc", lambda name, argv: pytest.fail("ran"))
    refused("serve", two_step, "--speculative-mode", "medusa", match="--speculative-mode medusa")
    refused("serve", two_step, "--additional-models", "draft", match="--speculative-mode")
    refused("serve", two_step, "--speculative-mode", "eagle", "--additional-models", "a",
            "--additional-models", "b", match="several --additional-models")
    refused("serve", two_step, "--embedding-model", "emb", match="/v1/embeddings")
    refused("serve", two_step, "--allow-origins", '["*"]', match="CORS")
    refused("serve", two_step, "--overrides", "spec_tree_width=4",
            match="`mlc serve` has no such setting")
    refused("serve", two_step, "--overrides", "max_num_seq=4", match="max_num_sequence")
    refused("serve", two_step, "--overrides", "max_num_sequence", match="KEY=VALUE")


# ---------------------------------------------------------------------------------------------
# the command itself


def test_python_m_mlc_llm_and_unsupported_verbs():
    proc = subprocess.run([sys.executable, "-m", "mlc_llm", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for verb in ("convert_weight", "gen_config", "compile", "serve", "chat", "bench"):
        assert verb in proc.stdout
    refused("package", "--device", "iphone", match="`mlc_llm package` is not supported")
    assert run("no_such_verb").exit_code == 2


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")             # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["mlc_llm"].partition(":")
    assert module == "mlc_llm.__main__" and callable(getattr(
        __import__(module, fromlist=[func]), func))
