"""Tool calling (mlc.runtime.tool_calls) on the real SmolLM2 tokenizer and chat template:
tools reach the prompt, forced tool_choice grammars only produce valid calls, and the
streaming parser agrees with the whole-output parser however the text is split."""

from __future__ import annotations

import itertools
import json
import time

import jsonschema
import numpy as np
import pytest
from grammar_walk import closer_tokens, random_walk

from mlc.errors import BadRequestError
from mlc.runtime import grammar as G
from mlc.runtime import tool_calls as T
from mlc.runtime.chat_template import jinja_tool_support, render_chat
from mlc.runtime.detokenizer import IncrementalDetokenizer

EOS = [2]
VOCAB = 49152

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_flight", "description": "Book a flight.",
        "parameters": {
            "$defs": {"airport": {"type": "string", "pattern": "^[A-Z]{3}$"},
                      "passenger": {"type": "object", "properties": {
                          "name": {"type": "string", "maxLength": 10},
                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                          "required": ["name", "age"], "additionalProperties": False}},
            "type": "object", "properties": {
                "from": {"$ref": "#/$defs/airport"}, "to": {"$ref": "#/$defs/airport"},
                "passengers": {"type": "array", "items": {"$ref": "#/$defs/passenger"},
                               "minItems": 1, "maxItems": 2},
                "class": {"enum": ["economy", "business"]}},
            "required": ["from", "to", "passengers"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now."}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "number", "minimum": -1000, "maximum": 1000},
            "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "note": {"type": "string", "maxLength": 8}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or
            {"type": "object", "properties": {}, "additionalProperties": False} for t in TOOLS}


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return G.grammar_compiler(smollm2_tokenizer, VOCAB, EOS)


@pytest.fixture(scope="module")
def closers(smollm2_tokenizer):
    return closer_tokens(smollm2_tokenizer, VOCAB)


def _ids():
    """Deterministic call ids: call_0000, call_0001, ..."""
    n = itertools.count()
    return lambda: f"call_{next(n):04d}"


# ---------------------------------------------------------------------------------------------
# Prompt rendering


def _smol(template):
    return {"chat_template": template}


def test_smollm2_template_has_no_tool_support(smollm2_chat_template):
    assert jinja_tool_support(smollm2_chat_template) == T.ToolSupport(False, False, False)


def test_tools_reach_the_smollm2_prompt(smollm2_chat_template, smollm2_tokenizer):
    """SmolLM2's template ignores `tools`: the default instruction carries them."""
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    plain = render_chat(_smol(smollm2_chat_template), msgs)
    with_tools = render_chat(_smol(smollm2_chat_template), msgs, tools=TOOLS)
    assert plain.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    system = with_tools.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in system
    assert "<tool_call>" in system and with_tools.endswith(plain.split("<|im_end|>\n", 1)[1])
    n_plain = len(smollm2_tokenizer.encode(plain).ids)
    n_tools = len(smollm2_tokenizer.encode(with_tools).ids)
    assert n_tools > n_plain + 200

    # an existing system message keeps its text, the instruction follows it
    out = render_chat(_smol(smollm2_chat_template),
                      [{"role": "system", "content": "Be brief."}] + msgs, tools=TOOLS[:1])
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")


def test_tool_history_in_the_default_format(smollm2_chat_template):
    msgs = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
            {"id": "call_2", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "9 C, rain"},
    ]
    out = render_chat(_smol(smollm2_chat_template), msgs, tools=TOOLS[:1])
    assert ("<|im_start|>assistant\nChecking.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            "</tool_call>\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
            "</tool_call><|im_end|>\n") in out
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\n9 C, rain\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n") in out
    # a history rendered without tools (tool_choice "none") still shows the calls
    assert "<tool_call>" in render_chat(_smol(smollm2_chat_template), msgs)
    # the rendered history parses back to the same calls
    assistant = out.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = T.parse_tool_calls(assistant, TOOLS[:1])
    assert parsed.content == "Checking."
    assert [json.loads(c["function"]["arguments"])["city"] for c in parsed.tool_calls] == \
        ["Paris", "Oslo"]


# A template with its own tool support (written for this test): passed through untouched.
NATIVE = """{%- if tools %}<|im_start|>system
TOOLS {% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if m.tool_calls %}{% for c in m.tool_calls %} CALL {{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}
{%- else %}
{{ m.content }}{% endif %}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_native_template_support_is_used():
    assert jinja_tool_support(NATIVE) == T.ToolSupport(True, True, True)
    out = render_chat(_smol(NATIVE), [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "noon"}], tools=TOOLS)
    assert out.startswith("<|im_start|>system\nTOOLS get_weather;book_flight;get_time;add;")
    assert "CALL get_time{}" in out and "<|im_start|>toolnoon" in out
    assert "# Tools" not in out and "<tool_response>" not in out


# ---------------------------------------------------------------------------------------------
# tool_choice


@pytest.mark.parametrize("tools,choice,param", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([], "required", "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
    (TOOLS + [TOOLS[0]], "required", "tools[4].function.name"),
    ([{"type": "function", "function": {"description": "no name"}}], "required",
     "tools[0].function.name"),
])
def test_bad_tool_choices_are_400s(tools, choice, param):
    with pytest.raises(BadRequestError) as e:
        T.tool_call_grammar(tools, choice)
    assert e.value.param == param and e.value.status_code == 400


def test_no_grammar_for_auto_and_none():
    for choice in (None, "auto", "none"):
        assert T.tool_call_grammar(TOOLS, choice) is None


def test_parameter_schema_that_cannot_be_enforced(compiler):
    tools = TOOLS[:1] + [{"type": "function", "function": {
        "name": "tags", "parameters": {"type": "object", "properties": {
            "t": {"type": "array", "uniqueItems": True}}}}}]
    with pytest.raises(BadRequestError) as e:
        T.compile_tool_choice(compiler, tools, "required")
    assert e.value.param == "tools[1].function.parameters"
    assert "uniqueItems" in e.value.message
    # a named choice of the other function does not need the bad schema
    assert T.compile_tool_choice(compiler, tools, {"type": "function", "function": {
        "name": "get_weather"}}) is not None


def _check_calls(text, names):
    parsed = T.parse_tool_calls(text, TOOLS)
    assert parsed.content is None, text
    assert parsed.finish_reason == "tool_calls"
    assert parsed.tool_calls
    for call in parsed.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in names
        assert isinstance(call["function"]["arguments"], str)
        jsonschema.validate(json.loads(call["function"]["arguments"]), _SCHEMAS[name])
    return parsed


@pytest.mark.parametrize("choice,parallel", [
    ("required", False), ("required", True),
    ({"type": "function", "function": {"name": "book_flight"}}, True),
    ({"type": "function", "function": {"name": "get_time"}}, False),
    ({"type": "function", "function": {"name": "add"}}, False),
])
def test_forced_calls_validate(choice, parallel, compiler, closers, smollm2_tokenizer):
    """Sampling under a forced tool_choice always yields calls of the allowed functions whose
    arguments validate against their parameter schemas."""
    compiled = T.compile_tool_choice(compiler, TOOLS, choice, parallel_tool_calls=parallel)
    names = ({choice["function"]["name"]} if isinstance(choice, dict)
             else {t["function"]["name"] for t in TOOLS})
    rng = np.random.default_rng(len(str(choice)) * 7 + parallel)
    counts = []
    for _ in range(8):
        walk = random_walk(compiled.processor(), rng, EOS, closers, max_steps=800)
        text = smollm2_tokenizer.decode(walk.ids, skip_special_tokens=False)
        parsed = _check_calls(text, names)
        counts.append(len(parsed.tool_calls))
        if not parallel:
            assert walk.ended_by == "finished" and len(parsed.tool_calls) == 1
    if parallel:
        assert max(counts) >= 1
    if choice == "required":
        seen = set()
        for _ in range(30):
            walk = random_walk(compiled.processor(), rng, EOS, closers, max_steps=800)
            text = smollm2_tokenizer.decode(walk.ids, skip_special_tokens=False)
            seen |= {c["function"]["name"] for c in _check_calls(text, names).tool_calls}
        assert len(seen) >= 3           # the walks reach most of the functions


def test_parallel_calls_are_reached(compiler, smollm2_tokenizer):
    """Two calls back to back are valid under parallel_tool_calls, not without it."""
    text = ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1.5, "b": null}}\n</tool_call>')
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False).ids
    for parallel, ok in ((True, True), (False, False)):
        proc = T.compile_tool_choice(compiler, TOOLS, "required", parallel).processor()
        accepted = 0
        for tok in ids:
            if not proc.token_mask()[tok]:
                break
            proc.accept(tok)
            accepted += 1
        assert (accepted == len(ids)) == ok
    assert len(_check_calls(text, {"get_time", "add"}).tool_calls) == 2


# ---------------------------------------------------------------------------------------------
# Parsing: whole outputs and streams


SAMPLES = [
    # plain text, untouched (trailing whitespace too)
    ("The weather is nice.  \n", "The weather is nice.  \n", []),
    # Hermes blocks with text before, two calls, a tag inside a string argument
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Köln </tool_call>", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "get_time", "arguments": {}}\n</tool_call>\n', "Let me check.",
     [("get_weather", '{"city": "Köln </tool_call>", "unit": "celsius"}'),
      ("get_time", "{}")]),
    # a bare JSON call (no tags), "parameters" spelling, no arguments at all
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", '{"a": 1, "b": 2}')]),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    # max_tokens cut the output inside the closing tag: no "</tool_" content
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_', None, [("get_time", "{}")]),
    # arguments given as a JSON string, and before the name
    ('<tool_call>{"arguments": "{\\"a\\": 3, \\"b\\": null}", "name": "add"}</tool_call>', None,
     [("add", '{"a": 3, "b": null}')]),
    ('<tool_call>{"arguments": {"a": [1, {"x": "}"}], "b": 0}, "name": "add"}</tool_call>',
     None, [("add", '{"a": [1, {"x": "}"}], "b": 0}')]),
    # not calls: unknown function, non-JSON block, JSON content that is no call
    ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),
    ("A <tool_call>nope</tool_call> B", "A <tool_call>nope</tool_call> B", []),
    ('{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ('  {"answer": 42}', '  {"answer": 42}', []),
    # one valid call among text and a rejected block
    ('Hi <tool_call>{"name": "x"}</tool_call><tool_call>{"name": "get_time", '
     '"arguments": {}}</tool_call> bye', 'Hi <tool_call>{"name": "x"}</tool_call>bye',
     [("get_time", "{}")]),
    # cut off mid-arguments (max_tokens): the call keeps what was written
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', None,
     [("get_weather", '{"city": "Pa')]),
    # a partial tag at the very end is text
    ("Answer: 4 <tool_ca", "Answer: 4 <tool_ca", []),
    ("", "", []),
]


def _assemble(deltas):
    """Content and calls from parser deltas, checking OpenAI's streamed shape on the way."""
    content, calls = "", []
    for delta in deltas:
        content += delta.content
        for piece in delta.tool_calls:
            wire = piece.to_openai()
            if piece.index == len(calls):            # a new call: id, type and name first
                assert set(wire) == {"index", "id", "type", "function"}
                assert wire["type"] == "function" and wire["id"].startswith("call_")
                calls.append({"id": wire["id"], "name": wire["function"]["name"],
                              "arguments": wire["function"]["arguments"]})
            else:
                assert piece.index == len(calls) - 1 and set(wire) == {"index", "function"}
                assert set(wire["function"]) == {"arguments"}
                calls[-1]["arguments"] += wire["function"]["arguments"]
    return content, calls


def _stream(text, cuts, tools=TOOLS):
    parser = T.ToolCallStreamParser(tools, _ids())
    bounds = [0, *cuts, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    deltas.append(parser.finish())
    return _assemble(deltas)


@pytest.mark.parametrize("text,content,calls", SAMPLES)
def test_whole_output_parse(text, content, calls):
    parsed = T.parse_tool_calls(text, TOOLS, _ids())
    assert parsed.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] \
        == calls
    assert parsed.finish_reason == ("tool_calls" if calls else None)
    assert [c["id"] for c in parsed.tool_calls] == [f"call_{i:04d}" for i in range(len(calls))]


@pytest.mark.parametrize("text,content,calls", SAMPLES)
def test_stream_split_anywhere_matches_whole(text, content, calls):
    """Every split into two deltas, and random splits into many, give the same content and the
    same calls, with argument fragments that concatenate to the whole arguments."""
    expected = (content or "",
                [{"id": f"call_{i:04d}", "name": n, "arguments": a}
                 for i, (n, a) in enumerate(calls)])
    for cut in range(len(text) + 1):
        assert _stream(text, [cut]) == expected, cut
    rng = np.random.default_rng(len(text))
    for _ in range(40):
        k = int(rng.integers(0, max(1, len(text))))
        cuts = sorted(rng.choice(len(text) + 1, size=min(k, len(text) + 1), replace=False))
        assert _stream(text, [int(c) for c in cuts]) == expected
    assert _stream(text, list(range(1, len(text)))) == expected      # one char per delta


def test_streamed_sampled_calls_in_multi_token_deltas(compiler, closers, smollm2_tokenizer):
    """Outputs sampled under the required grammar, detokenized incrementally and fed several
    tokens per delta, parse exactly like the whole text."""
    compiled = T.compile_tool_choice(compiler, TOOLS, "required", parallel_tool_calls=True)
    rng = np.random.default_rng(2024)
    for _ in range(12):
        walk = random_walk(compiled.processor(), rng, EOS, closers, max_steps=800)
        detok = IncrementalDetokenizer(smollm2_tokenizer, skip_special_tokens=False)
        pieces, i = [], 0
        while i < len(walk.ids):
            n = int(rng.integers(1, 6))
            pieces.append(detok.put_many(walk.ids[i:i + n]))
            i += n
        pieces.append(detok.flush())
        text = "".join(pieces)
        assert text == smollm2_tokenizer.decode(walk.ids, skip_special_tokens=False)
        whole = T.parse_tool_calls(text, TOOLS, _ids())
        parser = T.ToolCallStreamParser(TOOLS, _ids())
        content, calls = _assemble([parser.feed(p) for p in pieces] + [parser.finish()])
        assert content == "" and whole.content is None
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls]
        for c in calls:
            jsonschema.validate(json.loads(c["arguments"]), _SCHEMAS[c["name"]])


def test_openai_client_accumulates_the_stream():
    """The openai package's own stream accumulator turns our deltas into the same calls."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    text = SAMPLES[1][0]
    parser = T.ToolCallStreamParser(TOOLS, _ids())
    state = ChatCompletionStreamState(input_tools=TOOLS)
    created = int(time.time())

    def chunk(delta, finish=None):
        return ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
            "model": "smollm2", "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish}]})

    list(state.handle_chunk(chunk({"role": "assistant", "content": ""})))
    for i in range(0, len(text), 3):
        d = parser.feed(text[i:i + 3])
        wire = {"content": d.content or None,
                "tool_calls": [t.to_openai() for t in d.tool_calls] or None}
        list(state.handle_chunk(chunk({k: v for k, v in wire.items() if v is not None})))
    d = parser.finish()
    assert not d.content and not d.tool_calls
    list(state.handle_chunk(chunk({}, "tool_calls")))
    final = state.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [(c.id, c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls] == [
        ("call_0000", "get_weather", {"city": "Köln </tool_call>", "unit": "celsius"}),
        ("call_0001", "get_time", {})]


def test_parsed_requests_drive_the_grammar(compiler, smollm2_tokenizer):
    """pydantic tools / tool_choice from a parsed request, with parallel_tool_calls."""
    from mlc.runtime.protocol import parse_chat_request

    req = parse_chat_request(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                             tool_choice={"type": "function", "function": {"name": "add"}},
                             parallel_tool_calls=False)
    assert req.parallel_tool_calls is False
    spec = T.tool_call_grammar(req.tools, req.tool_choice, req.parallel_tool_calls)
    assert spec == T.tool_call_grammar(TOOLS, {"type": "function", "function": {
        "name": "add"}}, False)
    proc = T.compile_tool_choice(compiler, req.tools, req.tool_choice,
                                 req.parallel_tool_calls).processor()
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    for tok in smollm2_tokenizer.encode(text, add_special_tokens=False).ids:
        assert proc.token_mask()[tok]
        proc.accept(tok)
    assert proc.is_finished()
