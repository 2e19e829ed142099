"""Grammar-constrained decoding (mlc.runtime.grammar) on the real SmolLM2 tokenizer: every
output sampled under the masks parses and validates; bad schemas and grammars are 400s."""

from __future__ import annotations

import json
import re
import zlib
from typing import Literal, Optional

import jsonschema
import numpy as np
import pydantic
import pytest
from grammar_walk import closer_tokens, random_walk

from mlc.errors import BadRequestError
from mlc.runtime import grammar as G

EOS = [2]                 # SmolLM2's <|im_end|>
VOCAB = 49152


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return G.grammar_compiler(smollm2_tokenizer, VOCAB, EOS)


@pytest.fixture(scope="module")
def closers(smollm2_tokenizer):
    return closer_tokens(smollm2_tokenizer, VOCAB)


def _decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


class _Address(pydantic.BaseModel):
    street: str
    city: str
    country: Literal["FR", "DE", "JP"]


class _Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=0, le=150)
    email: Optional[str] = None
    addresses: list[_Address] = pydantic.Field(max_length=2)


_TREE = {"$defs": {"node": {
    "type": "object",
    "properties": {"value": {"type": "integer"},
                   "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                "maxItems": 2}},
    "required": ["value", "children"], "additionalProperties": False}},
    "$ref": "#/$defs/node"}

# (name, schema): at least 20 schemas covering nested objects, bounded arrays, enums, bounded
# numbers, patterns, anyOf/oneOf/allOf, $defs/$ref (recursive too), additionalProperties,
# required/optional, formats, tuples and a pydantic-generated schema.
SCHEMAS = [
    ("flat", {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("nested", {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False}),
    ("int_array_bounds", {"type": "object", "properties": {
        "values": {"type": "array", "items": {"type": "integer", "minimum": -50,
                                              "maximum": 50},
                   "minItems": 2, "maxItems": 4}},
        "required": ["values"], "additionalProperties": False}),
    ("enum", {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False}),
    ("exclusive_number_bounds", {"type": "object", "properties": {
        "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "t": {"type": "number", "minimum": -273.15, "exclusiveMaximum": 1000}},
        "required": ["p", "t"], "additionalProperties": False}),
    ("pattern", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
        "required": ["code", "hex"], "additionalProperties": False}),
    ("any_of", {"type": "object", "properties": {
        "v": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"},
                        {"type": "null"}]}},
        "required": ["v"], "additionalProperties": False}),
    ("defs_ref", {"$defs": {"item": {
        "type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
        "required": ["id", "tags"], "additionalProperties": False}},
        "type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1,
                      "maxItems": 3}},
        "required": ["items"], "additionalProperties": False}),
    ("recursive_ref", _TREE),
    ("optional_fields", {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "boolean"},
        "d": {"type": "number"}},
        "required": ["a"], "additionalProperties": False}),
    ("bool_null", {"type": "object", "properties": {
        "flag": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["flag", "nothing"], "additionalProperties": False}),
    ("const", {"type": "object", "properties": {
        "version": {"const": 2}, "kind": {"const": "event"}, "payload": {"type": "string"}},
        "required": ["version", "kind", "payload"], "additionalProperties": False}),
    ("array_of_objects", {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"], "additionalProperties": False}}),
    ("string_lengths", {"type": "object", "properties": {
        "short": {"type": "string", "minLength": 2, "maxLength": 4},
        "word": {"type": "string", "pattern": "^[a-z]+$", "minLength": 3, "maxLength": 8}},
        "required": ["short", "word"], "additionalProperties": False}),
    ("multiple_of", {"type": "object", "properties": {
        "n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
        "required": ["n"], "additionalProperties": False}),
    ("one_of_disjoint", {"type": "object", "properties": {
        "id": {"oneOf": [{"type": "string", "pattern": "^u[0-9]{3}$"},
                         {"type": "integer", "minimum": 0}]}},
        "required": ["id"], "additionalProperties": False}),
    ("all_of", {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}},
         "required": ["b"]}]}),
    ("top_level_array", {"type": "array", "items": {"type": "string", "maxLength": 6},
                         "maxItems": 5}),
    ("matrix", {"type": "object", "properties": {
        "m": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}}},
        "required": ["m"], "additionalProperties": False}),
    ("mixed_enum", {"type": "object", "properties": {"v": {"enum": [1, "two", None, True,
                                                                   [3]]}},
                    "required": ["v"], "additionalProperties": False}),
    ("formats", {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"},
        "id": {"type": "string", "format": "uuid"}},
        "required": ["day", "id"], "additionalProperties": False}),
    ("additional_properties_schema", {"type": "object",
                                      "additionalProperties": {"type": "integer"},
                                      "properties": {"name": {"type": "string"}},
                                      "required": ["name"]}),
    ("tuple", {"type": "array", "prefixItems": [
        {"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False, "minItems": 3}),
    ("open_object", {"type": "object", "properties": {"k": {"type": "string"}},
                     "required": ["k"]}),
    ("pydantic", _Person.model_json_schema()),
]


def _validator(schema):
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("name,schema", SCHEMAS, ids=[n for n, _ in SCHEMAS])
def test_sampled_outputs_validate(name, schema, compiler, closers, smollm2_tokenizer):
    """Random walks under the masks always end in JSON that validates against the schema."""
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                 "strict": True}}
    compiled = compiler.compile(G.grammar_from_response_format(rf))
    validator = _validator(schema)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for _ in range(6):
        walk = random_walk(compiled.processor(), rng, EOS, closers)
        text = _decode(smollm2_tokenizer, walk.ids)
        value = json.loads(text)
        validator.validate(value)
        # the canonical layout: what json.dumps writes, up to number and escape spelling
        assert not text[:1].isspace() and not text[-1:].isspace()
        assert "\n" not in text.replace("\\n", "")


def test_json_object_and_mlc_llm_schema_forms(compiler, closers, smollm2_tokenizer):
    """{"type": "json_object"} gives any object; MLC-LLM's top-level schema (dict or JSON
    text) constrains like json_schema."""
    rng = np.random.default_rng(7)
    compiled = compiler.compile(G.grammar_from_response_format({"type": "json_object"}))
    for _ in range(8):
        walk = random_walk(compiled.processor(), rng, EOS, closers)
        assert isinstance(json.loads(_decode(smollm2_tokenizer, walk.ids)), dict)
    schema = SCHEMAS[0][1]
    for form in (schema, json.dumps(schema)):
        g = G.grammar_from_response_format({"type": "json_object", "schema": form})
        assert g.grammar == G.grammar_from_response_format(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).grammar
        walk = random_walk(compiler.compile(g).processor(), rng, EOS, closers)
        jsonschema.validate(json.loads(_decode(smollm2_tokenizer, walk.ids)), schema)


def test_pydantic_response_format_objects(compiler):
    """The protocol's pydantic ResponseFormat is accepted as well as a dict."""
    from mlc.runtime.protocol import ResponseFormat

    rf = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {
        "name": "p", "schema": SCHEMAS[0][1]}})
    assert G.grammar_from_response_format(rf) == G.grammar_from_response_format(
        {"type": "json_schema", "json_schema": {"schema": SCHEMAS[0][1]}})
    assert G.grammar_from_response_format(ResponseFormat()) is None
    assert G.grammar_from_response_format(None) is None


def test_regex_response_format(compiler, closers, smollm2_tokenizer):
    pattern = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
    rng = np.random.default_rng(3)
    for key in ("regex", "pattern"):
        compiled = compiler.compile(G.grammar_from_response_format({"type": "regex",
                                                                    key: pattern}))
        for _ in range(5):
            walk = random_walk(compiled.processor(), rng, EOS, closers)
            assert re.fullmatch(pattern, _decode(smollm2_tokenizer, walk.ids))


def test_lark_and_gbnf_grammars(compiler, closers, smollm2_tokenizer):
    lark = 'start: expr\nexpr: NUM ((" + " | " - ") NUM)*\nNUM: /[1-9][0-9]{0,2}/\n'
    rng = np.random.default_rng(11)
    compiled = compiler.compile(G.grammar_from_response_format({"type": "grammar",
                                                                "grammar": lark}))
    for _ in range(5):
        text = _decode(smollm2_tokenizer, random_walk(compiled.processor(), rng, EOS,
                                                      closers).ids)
        assert re.fullmatch(r"[1-9][0-9]{0,2}( [+-] [1-9][0-9]{0,2})*", text), text
    gbnf = 'root ::= answer "."\nanswer ::= "yes" | "no"\n'
    compiled = compiler.compile(G.grammar_from_response_format({"type": "grammar",
                                                                "grammar": gbnf}))
    seen = set()
    for _ in range(12):
        seen.add(_decode(smollm2_tokenizer, random_walk(compiled.processor(), rng, EOS,
                                                        closers).ids))
    assert seen == {"yes.", "no."}


@pytest.mark.parametrize("body,expected", [
    ({"guided_json": {"type": "object"}},
     {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
    ({"structured_outputs": {"regex": "a+"}}, {"type": "regex", "regex": "a+"}),
    ({"guided_regex": "a+"}, {"type": "regex", "regex": "a+"}),
    ({"ebnf": 'root ::= "x"'}, {"type": "grammar", "grammar": 'root ::= "x"'}),
    ({"structured_outputs": {"grammar": "start: \"x\""}},
     {"type": "grammar", "grammar": "start: \"x\""}),
    ({"json_schema": '{"type": "integer"}'},
     {"type": "json_schema", "json_schema": {"schema": '{"type": "integer"}'}}),
    ({"structured_outputs": {"json_object": True}}, {"type": "json_object"}),
    ({"temperature": 0.5}, None),
])
def test_vllm_and_sglang_extensions(body, expected):
    assert G.response_format_from_extensions(body) == expected


def test_choice_extension(compiler, closers, smollm2_tokenizer):
    rng = np.random.default_rng(5)
    choices = ["positive", "negative", "neutral \"quoted\""]
    for body in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        rf = G.response_format_from_extensions(body)
        compiled = compiler.compile(G.grammar_from_response_format(rf))
        seen = {_decode(smollm2_tokenizer, random_walk(compiled.processor(), rng, EOS,
                                                       closers).ids) for _ in range(20)}
        assert seen == set(choices)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "a", "guided_json": {}}, "guided_regex"),
    ({"structured_outputs": "a+"}, "structured_outputs"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice"),
])
def test_bad_extensions(body, param):
    with pytest.raises(BadRequestError) as e:
        G.response_format_from_extensions(body)
    assert e.value.param == param


@pytest.mark.parametrize("rf,param,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema", "objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {
        "type": "string", "pattern": "(["}}}, "response_format.json_schema.schema", "regex"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema.schema", "missing"),
    ({"type": "json_schema", "json_schema": {"schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}},
     "response_format.json_schema.schema", "minimum"),
    ({"type": "json_schema", "json_schema": {"schema": {
        "type": "array", "uniqueItems": True}}}, "response_format.json_schema.schema",
     "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}},
     "response_format.json_schema.schema", "not"),
    ({"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
        "additionalProperties": False, "x-guidance": {"lenient": True},
        "if": {"required": ["a"]}}}}, "response_format.json_schema.schema", "if"),
    ({"type": "json_schema", "json_schema": {"schema": False}},
     "response_format.json_schema.schema", "false"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}},
     "response_format.json_schema.schema", "object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}},
     "response_format.json_schema", "schema"),
    ({"type": "json_object", "schema": "{not json"}, "response_format.schema", "JSON"),
    ({"type": "regex", "regex": "a(b"}, "response_format.regex", "regex"),
    ({"type": "regex"}, "response_format.regex", "regex"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "response_format.grammar",
     "undefined_rule"),
    ({"type": "grammar", "grammar": "   "}, "response_format.grammar", "grammar"),
    ({"type": "grammar", "grammar": "root ::= (("}, "response_format.grammar", "grammar"),
    ({"type": "yaml"}, "response_format.type", "yaml"),
    ("json", "response_format", "object"),
])
def test_bad_formats_are_400s(rf, param, words, compiler):
    """Bad shapes fail in grammar_from_response_format, non-compiling grammars in compile;
    both name the parameter and the problem."""
    with pytest.raises(BadRequestError) as e:
        compiler.compile(G.grammar_from_response_format(rf))
    assert e.value.param == param
    assert e.value.status_code == 400
    assert words.lower() in e.value.message.lower()
    body = e.value.to_openai()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"


def test_compile_errors_are_cached_and_repeat(compiler):
    g = G.grammar_from_response_format({"type": "regex", "regex": "[z-a]"})
    for _ in range(2):
        with pytest.raises(BadRequestError, match="cannot be enforced"):
            compiler.compile(g, param="tools[0].function.parameters")


def test_eos_only_where_the_grammar_may_end(compiler, smollm2_tokenizer):
    """EOS is masked until the output is complete; a grammar that cannot go on finishes."""
    proc = compiler.compile(G.grammar_from_response_format(
        {"type": "regex", "regex": "ab+"})).processor()
    assert not proc.token_mask()[EOS].any()
    for tok in smollm2_tokenizer.encode("ab", add_special_tokens=False).ids:
        proc.accept(tok)
    mask = proc.token_mask()
    assert mask[EOS].all() and not proc.is_finished()
    b = smollm2_tokenizer.token_to_id("b")
    assert mask[b]
    proc.accept(EOS[0])
    assert proc.is_finished()

    proc = compiler.compile(G.grammar_from_response_format(
        {"type": "json_object"})).processor()
    for tok in smollm2_tokenizer.encode('{"a": [1]}', add_special_tokens=False).ids:
        assert not proc.is_finished()
        assert not proc.token_mask()[EOS].any()
        proc.accept(tok)
    assert proc.is_finished()


def test_special_tokens_never_allowed_inside(compiler, smollm2_tokenizer):
    """Control tokens (<|im_start|> ...) are not text: no grammar position allows them."""
    proc = compiler.compile(G.grammar_from_response_format({"type": "json_object"})).processor()
    for tok in smollm2_tokenizer.encode('{"k": "', add_special_tokens=False).ids:
        proc.accept(tok)
    mask = proc.token_mask()
    assert mask.sum() > 40000               # almost any text inside a string
    assert not mask[[0, 1, 2]].any()        # <|endoftext|>, <|im_start|>, <|im_end|>


def test_mask_is_padded_to_the_model_vocab(smollm2_tokenizer):
    """A model vocab larger than the tokenizer's: the extra ids are never allowed."""
    big = G.grammar_compiler(smollm2_tokenizer, VOCAB + 77, EOS)
    assert big is not G.grammar_compiler(smollm2_tokenizer, VOCAB, EOS)
    proc = big.compile(G.grammar_from_response_format({"type": "json_object"})).processor()
    for tok in smollm2_tokenizer.encode('{"k": "', add_special_tokens=False).ids:
        proc.accept(tok)
    mask = proc.token_mask()
    assert mask.shape == (VOCAB + 77,) and mask.dtype == np.bool_
    assert mask[:VOCAB].sum() > 40000 and not mask[VOCAB:].any()


def test_rollback_and_fork(compiler, closers, smollm2_tokenizer):
    compiled = compiler.compile(G.grammar_from_response_format(
        {"type": "json_schema", "json_schema": {"schema": SCHEMAS[7][1]}}))
    rng = np.random.default_rng(21)
    walk = random_walk(compiled.processor(), rng, EOS, closers)
    ids = walk.ids
    assert len(ids) > 6
    proc = compiled.processor()
    masks = []
    for tok in ids:
        masks.append(proc.token_mask().copy())
        proc.accept(tok)
    for n in (1, 3, len(ids) // 2):
        proc.rollback(n)
        np.testing.assert_array_equal(proc.token_mask(), masks[len(ids) - n])
        for tok in ids[len(ids) - n:]:
            proc.accept(tok)
    assert proc.is_finished() or proc.is_accepting()
    with pytest.raises(G.GrammarStateError):
        proc.rollback(len(ids) + 1)

    # a fork follows its own path; the original is untouched
    base = compiled.processor()
    for tok in ids[:3]:
        base.accept(tok)
    before = base.token_mask().copy()
    twin = base.fork()
    for tok in ids[3:]:
        twin.accept(tok)
    np.testing.assert_array_equal(base.token_mask(), before)
    assert twin.num_accepted == len(ids) and base.num_accepted == 3


def test_forbidden_token_raises(compiler, smollm2_tokenizer):
    proc = compiler.compile(G.grammar_from_response_format({"type": "json_object"})).processor()
    letter = smollm2_tokenizer.token_to_id("x")
    assert not proc.token_mask()[letter]
    with pytest.raises(G.GrammarStateError, match="violates"):
        proc.accept(letter)


def test_batched_bitmasks_match_single(compiler, closers, smollm2_tokenizer):
    rng = np.random.default_rng(9)
    procs = []
    for name, schema in SCHEMAS[:6]:
        compiled = compiler.compile(G.json_schema_grammar(schema))
        walk = random_walk(compiled.processor(), rng, EOS, closers)
        proc = compiled.processor()
        for tok in walk.ids[:rng.integers(0, len(walk.ids))]:
            proc.accept(tok)
        procs.append(proc)
    expected = np.stack([p.fork().token_bitmask().copy() for p in procs])
    got = G.fill_token_bitmasks(procs)
    np.testing.assert_array_equal(got, expected)
    for p, row in zip(procs, expected):      # the processors reuse the batched result
        np.testing.assert_array_equal(p.token_bitmask(), row)
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB].astype(bool)
        np.testing.assert_array_equal(p.token_mask(), bits)


def test_prefetched_masks_match_and_every_method_waits(compiler, closers, smollm2_tokenizer):
    """The engine's prefetch (a background batch after accept) gives the masks a fresh
    computation gives; accept, fork and rollback right after a prefetch see a settled state."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        procs, walks = [], []
        for name, schema in SCHEMAS[:8]:
            compiled = compiler.compile(G.json_schema_grammar(schema))
            walk = random_walk(compiled.processor(), rng, EOS, closers)
            proc = compiled.processor()
            proc.accept(walk.ids[0])
            procs.append(proc)
            walks.append(walk)
        expected = np.stack([p.fork().token_mask() for p in procs])
        G.prefetch_token_bitmasks(procs)
        for i, (p, walk) in enumerate(zip(procs, walks)):
            if i % 3 == 0:
                np.testing.assert_array_equal(p.token_mask(), expected[i])
            elif i % 3 == 1 and len(walk.ids) > 1:
                p.accept(walk.ids[1])          # waits for the pending mask, then advances
                p.rollback(1)
                np.testing.assert_array_equal(p.token_mask(), expected[i])
            else:
                np.testing.assert_array_equal(p.fork().token_mask(), expected[i])
    G.prefetch_token_bitmasks([])               # nothing to do


def test_caches(smollm2_tokenizer, compiler):
    """One compiler per tokenizer (and vocab/EOS); one compiled grammar per grammar text."""
    assert G.grammar_compiler(smollm2_tokenizer, VOCAB, EOS) is compiler
    g = G.json_schema_grammar(SCHEMAS[1][1])
    assert compiler.compile(g) is compiler.compile(g)
    a, b = compiler.compile(g).processor(), compiler.compile(g).processor()
    tok = smollm2_tokenizer.encode('{"', add_special_tokens=False).ids[0]
    a.accept(tok)
    assert b.num_accepted == 0 and not np.array_equal(a.token_mask(), b.token_mask())


def test_mask_cost(compiler, closers, smollm2_tokenizer, capsys):
    """Report µs per mask (bool[49152]) over walks of all the schemas; bound it loosely."""
    rng = np.random.default_rng(1)
    times: list[float] = []
    for _, schema in SCHEMAS:
        compiled = compiler.compile(G.json_schema_grammar(schema))
        for _ in range(3):
            times += random_walk(compiled.processor(), rng, EOS, closers).mask_us
    t = np.array(times)
    with capsys.disabled():
        print(f"\nmask cost over {t.size} masks (SmolLM2, 49152 tokens): median "
              f"{np.median(t):.1f} us, p90 {np.percentile(t, 90):.1f} us, "
              f"p99 {np.percentile(t, 99):.1f} us, max {t.max():.0f} us")
    assert np.median(t) < 500


@pytest.mark.parametrize("rf", [
    {"type": "regex", "regex": "[0-9]{3}"}, {"type": "regex", "pattern": "[0-9]{3}"},
    {"type": "grammar", "grammar": 'start: "a" | "b"'},
    {"type": "json_object", "schema": '{"type": "object"}'},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"},
                                            "strict": True}},
])
def test_requests_carry_every_form_to_the_grammar(rf, compiler):
    """A chat or completion request keeps the response_format fields the grammar needs."""
    from mlc.runtime.protocol import parse_chat_request, parse_completion_request

    chat = parse_chat_request(messages=[{"role": "user", "content": "x"}], response_format=rf)
    completion = parse_completion_request(prompt="x", response_format=rf)
    for req in (chat, completion):
        spec = G.grammar_from_response_format(req.to_generation_config().response_format)
        assert spec == G.grammar_from_response_format(rf)
        compiler.compile(spec)
