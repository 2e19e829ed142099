"""The other APIs served over the chat path: OpenAI's Responses API (`POST /v1/responses`)
and Anthropic's Messages API (`POST /v1/messages`), spoken to with the `openai` and
`anthropic` packages.

Text, streaming, usage and limits run on the tiny random Llama (CPU) and are compared with
the chat completion of the same conversation. Tool calls come from a scripted engine whose
`chat.completions.create` answers with a fixed tool call, since a random model calls no
tools; the chat path's own tool-call parsing is tested in test_tool_calls.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from helpers import build_lib, make_tiny_llama, write_mlc_dir

from mlc.errors import MLCError
from mlc.runtime import protocol as P
from mlc.serve.app import create_app
from mlc.serve.responses import ResponsesRequest, chat_request
from mlc.serve.server import ServerThread

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CALL_ARGS = '{"city": "Paris"}'


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from mlc import AsyncMLCEngine

    tmp = tmp_path_factory.mktemp("apis-tiny")
    hf_model, hf_dir = make_tiny_llama(tmp)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q4f32_1", hf_dir=hf_dir)
    eng = AsyncMLCEngine(str(mlc_dir), "cpu", model_lib=str(build_lib(mlc_dir)),
                         max_batch_size=4, max_total_sequence_length=512)
    yield eng
    eng.terminate()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


class ScriptedEngine:
    """An engine without a model: every chat request with tools calls `get_weather` for
    Paris; without tools it answers "It is sunny." ("fail" as the last message: an engine
    error in the middle of the stream)."""

    model_id = "scripted"
    limits = SimpleNamespace(max_batch_size=4)

    def __init__(self):
        self.requests: list[P.ChatCompletionRequest] = []
        self.aborted: list[str] = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def serves_model(self, name) -> bool:
        return name in (None, "", self.model_id)

    def is_alive(self) -> bool:
        return True

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def metrics(self):
        from mlc.runtime.metrics import E2E_BUCKETS, Histogram, MetricsSnapshot

        h = Histogram(E2E_BUCKETS).snapshot()
        return MetricsSnapshot(self.model_id, {}, 0, 0, 0, 0, 0, 0.0, h, h, h)

    async def _create(self, req: P.ChatCompletionRequest):
        self.requests.append(req)
        usage = P.CompletionUsage(prompt_tokens=7, completion_tokens=5, total_tokens=12)
        call = P.ChatCompletionMessageToolCall(
            function=P.Function(name="get_weather", arguments=CALL_ARGS))
        if req.tools:
            message = P.ChatCompletionMessage(content=None, tool_calls=[call])
            reason = "tool_calls"
        else:
            message = P.ChatCompletionMessage(content="It is sunny.")
            reason = "stop"
        if not req.stream:
            return P.ChatCompletion(id=req.request_id, model=self.model_id, usage=usage,
                                    choices=[P.Choice(finish_reason=reason, message=message)])
        return self._chunks(req, message, reason, usage)

    async def _chunks(self, req, message, reason, usage):
        def chunk(delta, finish=None, u=None):
            return P.ChatCompletionChunk(id=req.request_id, model=self.model_id, usage=u,
                                         choices=[] if u else [P.ChunkChoice(
                                             delta=delta, finish_reason=finish)])
        for piece in (message.content or "").split(" "):
            await asyncio.sleep(0)
            if piece:
                yield chunk(P.Delta(role="assistant", content=piece + " "))
        if req.messages[-1].text() == "fail":
            raise MLCError("the engine failed midway")
        calls = [P.ChoiceDeltaToolCall(index=i, id=c.id, type="function",
                                       function=P.ChoiceDeltaFunctionCall(
                                           name=c.function.name, arguments=c.function.arguments))
                 for i, c in enumerate(message.tool_calls or [])] or None
        yield chunk(P.Delta(role="assistant", tool_calls=calls), reason)
        yield chunk(None, u=usage)


@pytest.fixture(scope="module")
def scripted():
    eng = ScriptedEngine()
    with ServerThread(create_app(eng)) as srv:
        srv.engine = eng
        yield srv


# ---------------------------------------------------------------------------------------------
# POST /v1/responses


def test_responses_create_matches_chat(client, engine):
    resp = client.responses.create(model=engine.model_id, input="Hello",
                                   instructions="Be brief.", max_output_tokens=6,
                                   temperature=0)
    chat = client.chat.completions.create(
        model=engine.model_id, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello"}])
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.output_text == chat.choices[0].message.content
    assert resp.output[0].type == "message" and resp.output[0].role == "assistant"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == chat.usage.total_tokens
    assert resp.instructions == "Be brief." and resp.max_output_tokens == 6
    assert resp.store is False
    if chat.choices[0].finish_reason == "length":
        assert resp.status == "incomplete"
        assert resp.incomplete_details.reason == "max_output_tokens"
    else:
        assert resp.status == "completed"


def test_responses_input_items_match_chat(client, engine):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": "More"}]
    resp = client.responses.create(model=engine.model_id, input=items, max_output_tokens=4,
                                   temperature=0)
    chat = client.chat.completions.create(
        model=engine.model_id, max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "More"}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_stream_events(client, engine):
    args = dict(model=engine.model_id, input="Hello", max_output_tokens=5, temperature=0)
    full = client.responses.create(**args)
    with client.responses.stream(**args) as stream:
        events = list(stream)
    # the openai helper's get_final_response() wants response.completed; a response cut by
    # max_output_tokens ends with response.incomplete, as OpenAI's does
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response." + (
                              "incomplete" if full.status == "incomplete" else "completed")]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == full.output_text == final.output_text
    assert final.usage.output_tokens == full.usage.output_tokens
    raw = list(client.responses.create(**args, stream=True))
    assert [e.type for e in raw] == kinds


def test_responses_errors_are_openai_400s(client, engine):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=engine.model_id, input="Hi",
                                previous_response_id="resp_123")
    assert err.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=engine.model_id, input="Hi",
                                tools=[{"type": "web_search"}])
    assert err.value.param == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=engine.model_id, input=[{"type": "image", "x": 1}])
    assert err.value.param == "input[0].type"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=engine.model_id, input="Hi", max_output_tokens=0)
    assert err.value.param == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other-model", input="Hi")


def test_responses_items_become_chat_messages():
    req = ResponsesRequest.model_validate({
        "input": [{"role": "user", "content": "Weather in Paris?"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                   "arguments": CALL_ARGS},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}],
        "instructions": "Be brief.", "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w",
                            "schema": {"type": "object"}}}})
    chat = chat_request(req, "resp_x")
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert chat.messages[2].tool_calls[0].id == "call_1"
    assert chat.messages[2].tool_calls[0].function.arguments == CALL_ARGS
    assert chat.messages[3].tool_call_id == "call_1" and chat.messages[3].text() == "sunny"
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    assert chat.request_id == "resp_x"


def test_responses_function_tools(scripted):
    client = openai.OpenAI(base_url=scripted.url + "/v1", api_key="x", max_retries=0)
    resp = client.responses.create(model="scripted", input="Weather in Paris?",
                                   tools=[WEATHER])
    [call] = resp.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    assert resp.tools[0].name == "get_weather" and resp.usage.total_tokens == 12
    sent = scripted.engine.requests[-1]
    assert sent.tools[0].function.parameters == WEATHER["parameters"]
    with client.responses.stream(model="scripted", input="Weather?", tools=[WEATHER]) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds
    assert final.output[0].type == "function_call" and final.output[0].arguments == CALL_ARGS
    assert kinds[-1] == "response.completed"


def test_responses_stream_error_midway_is_an_error_event(scripted):
    with httpx.stream("POST", scripted.url + "/v1/responses",
                      json={"input": "fail", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [(a[len("event: "):], json.loads(b[len("data: "):]))
              for a, b in zip(lines[::2], lines[1::2])]
    assert events[0][0] == "response.created"
    assert events[-1][0] == "error"
    assert events[-1][1]["message"] == "the engine failed midway"


# ---------------------------------------------------------------------------------------------
# POST /v1/messages (Anthropic)

ANTHROPIC_WEATHER = {"name": "get_weather", "description": "The weather in a city.",
                     "input_schema": WEATHER["parameters"]}


@pytest.fixture(scope="module")
def claude(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0,
                               timeout=120)


def test_messages_create_matches_chat(claude, client, engine):
    # the anthropic package no longer has sampling arguments; the API still takes them
    msg = claude.messages.create(model=engine.model_id, max_tokens=6,
                                 extra_body={"temperature": 0}, system="Be brief.",
                                 messages=[{"role": "user", "content": "Hello"}])
    chat = client.chat.completions.create(
        model=engine.model_id, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text"
    assert msg.content[0].text == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    assert msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[
        chat.choices[0].finish_reason]


def test_messages_stream_events(claude, engine):
    args = dict(model=engine.model_id, max_tokens=5, extra_body={"temperature": 0},
                messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    full = claude.messages.create(**args)
    with claude.messages.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert final.content[0].text == full.content[0].text
    assert final.usage.input_tokens == full.usage.input_tokens
    assert final.usage.output_tokens == full.usage.output_tokens
    assert final.stop_reason == full.stop_reason
    raw = [e.type for e in claude.messages.create(**args, stream=True)]
    assert raw[0] == "message_start" and raw[-1] == "message_stop"


def test_messages_errors_have_anthropics_shape(server, claude, engine):
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=engine.model_id, max_tokens=0,
                               messages=[{"role": "user", "content": "Hi"}])
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(model=engine.model_id, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="other-model", max_tokens=2,
                               messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["error"]["type"] == "not_found_error"


def test_messages_api_key_as_x_api_key(engine):
    import anthropic

    with ServerThread(create_app(engine, api_key="sk-k")) as srv:
        good = anthropic.Anthropic(base_url=srv.url, api_key="sk-k", max_retries=0)
        assert good.messages.create(model=engine.model_id, max_tokens=1, messages=[
            {"role": "user", "content": "Hi"}]).usage.output_tokens == 1
        bad = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as err:
            bad.messages.create(model=engine.model_id, max_tokens=1,
                                messages=[{"role": "user", "content": "Hi"}])
        assert err.value.body["error"]["type"] == "authentication_error"


def test_messages_tools(scripted):
    import anthropic

    claude = anthropic.Anthropic(base_url=scripted.url, api_key="x", max_retries=0)
    msg = claude.messages.create(model="scripted", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                 tool_choice={"type": "any"},
                                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "tool_use"
    [use] = msg.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    sent = scripted.engine.requests[-1]
    assert sent.tools[0].function.parameters == WEATHER["parameters"]
    assert sent.tool_choice == "required"
    # the conversation continues with the tool's result
    claude.messages.create(model="scripted", max_tokens=64, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id,
                                           "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]}])
    sent = scripted.engine.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert json.loads(sent.messages[1].tool_calls[0].function.arguments) == {"city": "Paris"}
    assert sent.messages[2].tool_call_id == use.id and sent.messages[2].text() == "sunny"
    with claude.messages.stream(model="scripted", max_tokens=64, tools=[ANTHROPIC_WEATHER],
                                messages=[{"role": "user", "content": "Weather?"}]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris"}
    with claude.messages.stream(model="scripted", max_tokens=64,
                                messages=[{"role": "user", "content": "Weather?"}]) as s:
        assert "".join(s.text_stream) == "It is sunny. "


def test_messages_stream_error_midway(scripted):
    with httpx.stream("POST", scripted.url + "/v1/messages", json={
            "model": "scripted", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "fail"}]}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == "event: message_start" and lines[-2] == "event: error"
    error = json.loads(lines[-1][len("data: "):])
    assert error["type"] == "error" and error["error"]["message"] == "the engine failed midway"
    assert error["error"]["type"] == "invalid_request_error"    # the MLCError's status, 400
