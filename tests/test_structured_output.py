"""Structured output and tool calls through the clients applications use, against `mlc serve`
(a real uvicorn server over the embedded SmolLM2-135M, CPU): openai's `parse()` and tools,
LangChain's `with_structured_output` and `bind_tools`, instructor. Every output must parse and
validate against its schema; the grammar ends the output, so no test needs many tokens. Schemas
keep strings short (maxLength) because SmolLM2 likes long strings and CPU decoding is slow.
"""

from __future__ import annotations

import json
import threading
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
import test_serve
from pydantic import BaseModel, ConfigDict, Field
from test_serve import API_KEY

# test_serve's server over the embedded SmolLM2 (module-scoped: started once for this module)
engine, server, client, http = test_serve.engine, test_serve.server, test_serve.client, \
    test_serve.http
model_name, greedy = test_serve.model_name, test_serve.greedy

pytestmark = pytest.mark.slow
MAX_TOKENS = 60


class Person(BaseModel):
    """A person."""

    # additionalProperties: false (non-strict tool schemas otherwise let SmolLM2 add keys)
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


class Weather(BaseModel):
    """Get the weather of a city."""

    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=10)
    unit: Literal["C", "F"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {
        "tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["tz"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_calls(calls, names=None) -> None:
    """Every call names a declared function and its arguments JSON validates."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments),
                            SCHEMAS[call.function.name])


# ---------------------------------------------------------------------------------------------
# openai


def test_openai_parse_with_a_pydantic_model(client, model_name):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    out = parse(model=model_name, messages=ask("Invent a person."), response_format=Person,
                max_tokens=MAX_TOKENS, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())


def test_openai_tools_required_named_and_streamed(client, model_name):
    tools = [WEATHER, TIME]
    required = client.chat.completions.create(
        model=model_name, messages=ask("Weather in Paris?"), tools=tools,
        tool_choice="required", max_tokens=MAX_TOKENS, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)

    named = dict(model=model_name, messages=ask("What time is it?"), tools=tools,
                 tool_choice={"type": "function", "function": {"name": "get_time"}},
                 parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0)
    whole = client.chat.completions.create(**named).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert [c.function.name for c in whole.message.tool_calls] == ["get_time"]
    check_calls(whole.message.tool_calls)

    # the stream: index, id, type and name first, then argument fragments
    headers, arguments, reasons = [], {}, []
    for chunk in client.chat.completions.create(**named, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for tc in c.delta.tool_calls or []:
                if tc.id is not None:
                    assert tc.type == "function" and tc.function.name and \
                        tc.function.arguments == "" and tc.index not in arguments
                    headers.append((tc.index, tc.function.name))
                    arguments[tc.index] = ""
                else:
                    assert tc.function.name is None
                    arguments[tc.index] += tc.function.arguments
    assert headers == [(0, "get_time")] and reasons[-1] == "tool_calls"
    assert arguments[0] == whole.message.tool_calls[0].function.arguments   # same greedy call
    jsonschema.validate(json.loads(arguments[0]), SCHEMAS["get_time"])


def test_openai_accumulated_stream_and_tool_none(client, model_name):
    """openai's `chat.completions.stream` helper rebuilds the calls from the deltas; with
    tool_choice "none" the tools are not rendered and the answer is plain text."""
    stream_api = getattr(client.chat.completions, "stream", None) \
        or client.beta.chat.completions.stream
    with stream_api(model=model_name, messages=ask("Weather in Oslo?"),
                    tools=[openai.pydantic_function_tool(Weather, name="get_weather")],
                    tool_choice="required", max_tokens=MAX_TOKENS, temperature=0) as s:
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)
    with stream_api(model=model_name, messages=ask("Invent a person."), response_format=Person,
                    max_tokens=MAX_TOKENS, temperature=0) as s:
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)
    assert final.choices[0].finish_reason == "stop"

    none = client.chat.completions.create(
        model=model_name, messages=ask("Hi"), tools=[WEATHER], tool_choice="none",
        max_tokens=4, temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens == client.chat.completions.create(
        model=model_name, messages=ask("Hi"), max_tokens=1).usage.prompt_tokens


@pytest.mark.parametrize("seed", range(3))
def test_tool_call_stream_with_several_tokens_per_delta(engine, seed):
    """The engine's stream adapter (what `mlc serve` sends) given deltas of several tokens
    each, as speculative decoding produces them: the streamed calls, put together, are the
    non-streamed ones (same content, names and arguments), in OpenAI's delta shape."""
    import random

    from mlc.runtime import protocol as P
    from mlc.runtime.engine import _ChunkJSON, _StreamState
    from mlc.runtime.request import ChoiceDelta, RequestOutput

    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"tz": "CET"}}\n</tool_call>')
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(ids)), 6))
    pieces = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
    req = P.parse_chat_request(messages=ask("x"), tools=[WEATHER, TIME], stream=True)
    state, render = _StreamState(), _ChunkJSON("id", 0, "m", "chat.completion.chunk")
    deltas = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out = RequestOutput("id", [ChoiceDelta(0, engine.tokenizer.decode(piece), piece,
                                               finish_reason="stop" if last else None)],
                            final=last)
        for chunk in engine._chat_chunks_json(req, out, state, True, render):
            deltas += [c["delta"] | {"finish_reason": c["finish_reason"]}
                       for c in json.loads(chunk)["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls") or []:
            if "id" in tc:
                # (the header may already carry the first fragment of a multi-token delta)
                assert tc["index"] not in calls and tc["type"] == "function"
                calls[tc["index"]] = dict(tc["function"])
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert deltas[-1]["finish_reason"] == "tool_calls" and content == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"tz": "CET"})]


def test_n_choices_and_ignore_eos_stay_valid(client, model_name):
    """n > 1 forks the grammar state per choice; with ignore_eos the grammar still ends the
    output (EOS is the only token left once the value is complete)."""
    out = client.chat.completions.create(
        model=model_name, messages=ask("Invent a person."), n=3, temperature=1.0, seed=3,
        max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
            "name": "p", "schema": Person.model_json_schema()}},
        extra_body={"ignore_eos": True})
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        Person.model_validate_json(choice.message.content)


def test_invalid_schemas_are_400s_with_param(client, http, model_name):
    bad = {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=ask("x"), response_format=bad)
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "uniqueItems" in e.value.body["message"]
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "x",
                                           "response_format": {"type": "regex", "regex": "("}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.regex"
    r = http.post("/v1/chat/completions", json={
        "model": model_name, "messages": ask("x"), "tool_choice": "required",
        "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "not": {"type": "null"}}}}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools[0].function.parameters"


def test_vllm_and_sglang_fields(http, model_name):
    """The structured-output fields of vLLM and SGLang requests are enforced too."""
    def post(path, **body):
        r = http.post(path, json={"model": model_name, "max_tokens": 20, **body})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    choice = post("/v1/completions", prompt="Is water wet? Answer:",
                  guided_choice=["yes", "no"])
    assert choice["text"] in ("yes", "no") and choice["finish_reason"] == "stop"
    choice = post("/v1/chat/completions", messages=ask("A year?"),
                  structured_outputs={"regex": "(19|20)[0-9]{2}"})
    assert len(choice["message"]["content"]) == 4 and choice["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    choice = post("/v1/chat/completions", messages=ask("JSON"), json_schema=json.dumps(schema))
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "x",
                                           "guided_regex": "a", "regex": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex"


def test_mixed_batch_and_completions(client, server, model_name, greedy):
    """Constrained and free requests decode in the same batch: the free ones are exactly what
    they are alone, the constrained ones validate (chat and completions, streamed or not)."""
    free_prompts = ["The sky is", "1, 2, 3,"]
    expected = {p: greedy(p) for p in free_prompts}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    results: dict[str, object] = {}

    def free(p):
        results[p] = client.completions.create(model=model_name, prompt=p, max_tokens=4,
                                               temperature=0).choices[0].text

    def constrained_chat():
        out = client.chat.completions.create(
            model=model_name, messages=ask("Answer in JSON."), max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "a", "schema": schema, "strict": True}})
        results["chat"] = out.choices[0]

    def constrained_completion_stream():
        text, reason = "", None
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": model_name, "prompt": "JSON:", "stream": True,
                                "max_tokens": MAX_TOKENS,
                                "response_format": {"type": "json_object",
                                                    "schema": schema}}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    c = json.loads(line[6:])["choices"]
                    if c:
                        text += c[0]["text"]
                        reason = c[0]["finish_reason"] or reason
        results["completion"] = (text, reason)

    threads = [threading.Thread(target=f, args=a) for f, a in
               [(free, (p,)) for p in free_prompts]
               + [(constrained_chat, ()), (constrained_completion_stream, ())]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p: results[p] for p in free_prompts} == expected
    chat = results["chat"]
    assert chat.finish_reason == "stop"
    jsonschema.validate(json.loads(chat.message.content), schema)
    text, reason = results["completion"]
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)


# ---------------------------------------------------------------------------------------------
# LangChain and instructor


def test_langchain_structured_output_and_bind_tools(server, model_name):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model_name, base_url=server.url + "/v1", api_key=API_KEY,
                     max_tokens=MAX_TOKENS, temperature=0, max_retries=0, timeout=300)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(person, Person), method
    # strict: no properties beyond the schema (else SmolLM2 invents keys until max_tokens)
    msg = llm.bind_tools([Weather], tool_choice="required", strict=True).invoke(
        "Weather in Rome?")
    assert [c["name"] for c in msg.tool_calls][:1] == ["Weather"], repr(msg)
    for c in msg.tool_calls:
        Weather.model_validate(c["args"])


def test_instructor_tools_and_json_schema(client, model_name):
    import instructor

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        patched = instructor.from_openai(client, mode=mode)
        person = patched.chat.completions.create(
            model=model_name, response_model=Person, messages=ask("Invent a person."),
            max_tokens=MAX_TOKENS, temperature=0, max_retries=0)
        assert isinstance(person, Person), mode


# ---------------------------------------------------------------------------------------------
# With speculative decoding (drafts verified under the grammar, rolled back when rejected)


def test_grammar_under_ngram_speculation(smol_engine_dir):
    """n-gram drafts pass through the grammar's masks position by position; rejected drafts
    roll the matcher back. Greedy output is the same with and without speculation, and valid."""
    from mlc import MLCEngine

    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                  "minItems": 3, "maxItems": 6}},
        "required": ["items"], "additionalProperties": False}
    request = dict(messages=ask('List colors as {"items": [...]}: red, green, blue, red.'),
                   max_tokens=MAX_TOKENS, temperature=0, response_format={
                       "type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    outputs = {}
    for mode in ("disable", "ngram"):
        eng = MLCEngine(str(smol_engine_dir), device="cpu", max_batch_size=4,
                        max_total_sequence_length=2048, prefill_chunk_size=256,
                        speculative_mode=mode)
        try:
            choice = eng.chat.completions.create(**request).choices[0]
            outputs[mode] = (choice.message.content, choice.finish_reason)
            if mode == "ngram":
                assert eng.stats().draft_tokens > 0
                # a forced call streamed with several tokens per delta where drafts are taken
                call = dict(messages=ask("Weather in Paris, in C? Paris, C."), tools=[WEATHER],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                            parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0)
                whole = eng.chat.completions.create(**call).choices[0].message.tool_calls
                streamed = {}
                for chunk in eng.chat.completions.create(**call, stream=True):
                    for c in chunk.choices:
                        for tc in c.delta.tool_calls or []:
                            entry = streamed.setdefault(tc.index, {"name": None, "args": ""})
                            entry["name"] = entry["name"] or (tc.function.name if tc.id else None)
                            entry["args"] += tc.function.arguments or ""
                assert [(e["name"], e["args"]) for e in streamed.values()] == \
                    [(c.function.name, c.function.arguments) for c in whole]
                jsonschema.validate(json.loads(whole[0].function.arguments),
                                    SCHEMAS["get_weather"])
        finally:
            eng.terminate()
    assert outputs["ngram"] == outputs["disable"]
    assert outputs["ngram"][1] == "stop"
    jsonschema.validate(json.loads(outputs["ngram"][0]), schema)
