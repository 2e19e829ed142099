"""MLC-LLM's request extension and server behaviour on mlc: `debug_config` (in a body and in
the engine's `extra_body=`), the role in every streamed chat chunk, `owned_by`, and
`POST /debug/dump_event_trace` with `mlc serve --enable-tracing --enable-debug`. A real
uvicorn server over the tiny random Llama (CPU), spoken to with the `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from click.testing import CliRunner

from mlc.errors import BadRequestError
from mlc.serve.app import create_app
from mlc.serve.server import ServerThread

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(tiny):
    from mlc import AsyncMLCEngine

    eng = AsyncMLCEngine(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib), max_batch_size=4,
                         max_total_sequence_length=512, enable_tracing=True)
    yield eng
    eng.terminate()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, enable_debug=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def eos(tiny) -> int:
    return json.loads((tiny.mlc_dir / "mlc-chat-config.json").read_text())["eos_token_id"][0]


def test_debug_config_ignore_eos_through_extra_body(client, engine, eos):
    """With EOS forced by logit_bias, a request stops at once; with debug_config.ignore_eos
    it runs to max_tokens, in the server's body and in the engine's `extra_body=`."""
    args = dict(model=engine.model_id, messages=MESSAGES, max_tokens=5, temperature=0,
                logit_bias={str(eos): 100})
    plain = client.chat.completions.create(**args)
    assert plain.usage.completion_tokens == 1 and plain.choices[0].finish_reason == "stop"
    forced = client.chat.completions.create(**args, extra_body={
        "debug_config": {"ignore_eos": True}})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "length"
    comp = client.completions.create(model=engine.model_id, prompt="Hi", max_tokens=4,
                                     temperature=0, logit_bias={str(eos): 100},
                                     extra_body={"debug_config": {"ignore_eos": True}})
    assert comp.usage.completion_tokens == 4


def test_engine_create_accepts_extra_body(tiny, eos):
    from mlc import MLCEngine

    with MLCEngine(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib), max_batch_size=1,
                   max_total_sequence_length=256) as eng:
        args = dict(messages=MESSAGES, max_tokens=3, temperature=0, logit_bias={eos: 100})
        assert eng.chat.completions.create(**args).usage.completion_tokens == 1
        resp = eng.chat.completions.create(**args, extra_body={"debug_config":
                                                               {"ignore_eos": True}})
        assert resp.usage.completion_tokens == 3
        chunks = list(eng.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True},
            extra_body={"debug_config": {"ignore_eos": True}}))
        assert chunks[-1].usage.completion_tokens == 3
        with pytest.raises(BadRequestError) as err:
            eng.chat.completions.create(**args, extra_body={"debug_config": {
                "pinned_system_prompt": True}})
        assert err.value.param == "debug_config.pinned_system_prompt"
        with pytest.raises(BadRequestError, match="extra_body"):
            eng.chat.completions.create(**args, extra_body=["debug_config"])


def test_unsupported_debug_option_is_an_openai_400(client, engine):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=engine.model_id, messages=MESSAGES, max_tokens=2,
                                       extra_body={"debug_config": {
                                           "special_request": "query_engine_metrics"}})
    assert err.value.param == "debug_config.special_request"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=engine.model_id, messages=MESSAGES, max_tokens=2,
                                       extra_body={"debug_config": {
                                           "grammar_execution_mode": "fast"}})
    assert err.value.param == "debug_config.grammar_execution_mode"


def test_role_in_every_stream_chunk(client, engine):
    chunks = [c for c in client.chat.completions.create(
        model=engine.model_id, messages=MESSAGES, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 2      # the first and the last (finish_reason) at least
    assert all(c.choices[0].delta.role == "assistant" for c in with_choices)
    assert chunks[-1].usage.completion_tokens == 4


def test_models_are_owned_by_mlc_llm(client):
    [card] = client.models.list().data
    assert card.owned_by == "MLC-LLM"


def test_dump_event_trace(server, engine, client):
    client.completions.create(model=engine.model_id, prompt="Hi", max_tokens=2)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/debug/dump_event_trace", json={"model": engine.model_id})
        assert r.status_code == 200
        names = {e["name"] for e in r.json()["traceEvents"]}
        assert {"thread_name", "decode"} <= names
        r = http.post("/debug/dump_event_trace", json={})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = http.post("/debug/dump_event_trace", json={"model": "other"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with ServerThread(create_app(engine)) as plain, httpx.Client(base_url=plain.url) as http:
        assert http.post("/debug/dump_event_trace",
                         json={"model": engine.model_id}).status_code == 404


def test_serve_command_has_mlc_llms_flags():
    from mlc.cli.serve import serve

    out = CliRunner().invoke(serve, ["--help"]).output
    assert "--enable-tracing" in out and "--enable-debug" in out
