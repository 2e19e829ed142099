"""`mlc_llm.serve.PopenServer`: a real `mlc serve` subprocess on the tiny model, started
with MLC-LLM's constructor arguments and spoken to with the `openai` client."""

from __future__ import annotations

import socket
import urllib.request
from types import SimpleNamespace

import openai
import pytest

from mlc_llm.serve import EngineConfig, PopenServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_serves_openai_clients_and_stops(tiny):
    port = free_port()
    server = PopenServer(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib), port=port,
                         engine_config=EngineConfig(max_batch_size=2,
                                                    max_total_sequence_length=256))
    assert server.openai_v1_base_url == f"http://127.0.0.1:{port}/v1"
    with server:
        client = openai.OpenAI(base_url=server.openai_v1_base_url, api_key="none",
                               max_retries=0, timeout=120)
        [card] = client.models.list().data
        assert card.id == tiny.mlc_dir.name          # the directory's name, never a path
        resp = client.chat.completions.create(model=card.id, messages=[
            {"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
        assert resp.choices[0].message.role == "assistant"
        # MLC-LLM's tests send the model path they started the server with: it is served too
        by_path = client.chat.completions.create(model=str(tiny.mlc_dir), messages=[
            {"role": "user", "content": "Hello"}], max_tokens=2, temperature=0)
        assert by_path.choices[0].message.role == "assistant"
        assert resp.usage.completion_tokens == 4 and resp.choices[0].finish_reason == "length"
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model=card.id, messages=[
                               {"role": "user", "content": "Hello"}], max_tokens=4,
                               temperature=0, stream=True) if c.choices)
        assert streamed == resp.choices[0].message.content
        comp = client.completions.create(model=card.id, prompt="The quick brown", max_tokens=3)
        assert comp.usage.completion_tokens <= 3
        log = server.log_path.read_text()
        assert "--max-batch-size 2 --max-total-seq-length 256" in log     # engine_config
        assert "max_batch_size 2" in log
        pid = server._proc.pid
    assert server._proc is None and port_is_free(port)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)
    server.terminate()                                     # idempotent


def test_a_server_that_cannot_start_says_why(tmp_path):
    server = PopenServer(str(tmp_path / "no-model"), "cpu", port=free_port(),
                         startup_timeout=300)
    try:
        with pytest.raises(RuntimeError) as err:
            server.start()
    finally:
        server.terminate()
    message = str(err.value)
    assert "exited with code" in message and "no-model" in message
    assert server._proc is None


def test_an_unsupported_option_stops_the_server_with_its_message(tiny):
    cfg = SimpleNamespace(speculative_mode="medusa", additional_models=[])
    server = PopenServer(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib), port=free_port(),
                         engine_config=cfg, startup_timeout=300)
    try:
        with pytest.raises(RuntimeError, match="--speculative-mode medusa"):
            server.start()
    finally:
        server.terminate()


def test_a_busy_port_is_refused_before_starting(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="pass another port"):
            PopenServer(str(tiny.mlc_dir), "cpu", port=port).start()


def test_engine_config_to_command_line():
    """MLC-LLM's EngineConfig fields (or mlc's) become `mlc_llm serve` options; defaults add
    nothing."""
    cfg = SimpleNamespace(max_num_sequence=8, max_total_sequence_length=4096,
                          prefill_chunk_size=512, gpu_memory_utilization=0.5,
                          prefix_cache_mode="disable", speculative_mode="disable",
                          spec_draft_length=0, additional_models=["draft,lib.so"])
    cmd = PopenServer("m", "cuda", model_lib="l.so", mode="server", engine_config=cfg,
                      enable_tracing=True, port=9).command()
    assert cmd[1:] == [
        "-m", "mlc_llm", "serve", "m", "--device", "cuda", "--mode", "server", "--host",
        "127.0.0.1", "--port", "9", "--model-lib", "l.so", "--additional-models",
        "draft,lib.so", "--prefix-cache-mode", "disable", "--overrides",
        "max_num_sequence=8;max_total_seq_length=4096;prefill_chunk_size=512;"
        "gpu_memory_utilization=0.5", "--enable-debug", "--enable-tracing"]
    cmd = PopenServer("m", engine_config=EngineConfig(), enable_debug=False).command()
    assert cmd[3:] == ["serve", "m", "--device", "auto", "--mode", "local", "--host",
                       "127.0.0.1", "--port", "8082"]


def test_server_answers_over_plain_http(tiny):
    """MLC-LLM's server tests use `requests`; any HTTP client works."""
    port = free_port()
    with PopenServer(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib), port=port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:
            assert r.status == 200
