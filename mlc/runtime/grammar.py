"""Grammar-constrained decoding with llguidance: a request's `response_format` (or a tool
choice, see `tool_calls.py`) becomes a grammar, and each sequence gets a `GrammarProcessor`,
the `LogitProcessor` that says which tokens may come next.

The engine's side, in order:

    compiler = grammar_compiler(tokenizer, model.vocab_size, eos_token_ids)   # cached per engine
    spec = grammar_from_response_format(response_format)   # GrammarSpec | None; 400 if malformed
    compiled = compiler.compile(spec)                       # 400 if it does not compile
    processor = compiled.processor()          # one per sequence; processor.fork() for n > 1

Every problem of the request surfaces as `mlc.errors.BadRequestError` with `param`, before the
request is admitted: a schema or grammar that does not compile is never answered with free text.

Supported `response_format` shapes:
  * `{"type": "text"}` (or None): no constraint;
  * `{"type": "json_object"}`: any JSON object (OpenAI);
  * `{"type": "json_object", "schema": {...} | "<JSON text>"}`: MLC-LLM's schema form;
  * `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: OpenAI's;
  * `{"type": "regex", "regex" | "pattern": "..."}`: the whole output matches the regex
    (Rust regex syntax);
  * `{"type": "grammar", "grammar": "..."}`: a Lark grammar (llguidance's dialect, with
    `%json {...}` for embedded schemas) or a GBNF/EBNF one (`root ::= ...`).
vLLM's and SGLang's request-level extensions (`structured_outputs`, `guided_json`,
`guided_regex`, `guided_grammar`, `guided_choice`, SGLang's `regex`, `ebnf`, `json_schema`)
map onto these shapes with `response_format_from_extensions`.

JSON is written in one canonical layout, like Python's `json.dumps`: `{"a": 1, "b": [2, 3]}`
(", " between items, ": " after keys, no other whitespace). Free whitespace would let a model
pad an answer with newlines until max_tokens; one layout keeps outputs short and still parses
everywhere. Schema keywords that llguidance cannot enforce (uniqueItems, not, if/then,
contains, dependentRequired ...) are a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import llguidance as llg
import numpy as np

from mlc.errors import BadRequestError
from mlc.runtime.generation_config import RESPONSE_FORMAT_TYPES
from mlc.runtime.logit_processor import LogitProcessor

logger = logging.getLogger(__name__)

#: llguidance's JSON compile options for every schema mlc compiles (see the module docstring).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                                "key_separator": ": "}
#: Applied after a schema's own "x-guidance" options: unenforceable keywords stay errors.
_JSON_OVERRIDES: dict[str, Any] = {"lenient": False}

_MAX_ERROR_CHARS = 800


# ---------------------------------------------------------------------------------------------
# Request shapes -> llguidance grammar strings (no tokenizer needed)


def _bad(param: str, message: str) -> BadRequestError:
    return BadRequestError(f"Invalid '{param}': {message}", param=param)


def _as_dict(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True)
    return value


def _load_schema(schema: Any, param: str) -> dict[str, Any] | bool:
    """A JSON schema given as a dict, a bool, or JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _bad(param, f"the schema is not valid JSON ({e.msg} at line {e.lineno} "
                              f"column {e.colno}); send it as a JSON object.") from None
    if not isinstance(schema, (dict, bool)):
        raise _bad(param, f"a JSON schema must be an object, got {type(schema).__name__}.")
    return schema


def json_schema_grammar(schema: Any, param: str = "response_format") -> str:
    """The llguidance grammar for JSON values valid against `schema` (a dict, bool or JSON
    text), in mlc's canonical layout (`JSON_OPTIONS`)."""
    schema = _load_schema(schema, param)
    if schema is True:
        schema = {}
    elif schema is False:
        raise _bad(param, "the schema `false` accepts no value at all.")
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS,
                                                      overrides=_JSON_OVERRIDES)
    except (ValueError, TypeError) as e:
        raise _bad(param, f"the schema cannot be read: {e}") from None


def regex_grammar(regex: Any, param: str = "response_format") -> str:
    """The llguidance grammar for outputs that match `regex` as a whole."""
    if not isinstance(regex, str) or not regex:
        raise _bad(param, "a regex response format needs a non-empty 'regex' (or 'pattern') "
                          "string.")
    return llg.LLMatcher.grammar_from_regex(regex)


def lark_grammar(grammar: Any, param: str = "response_format") -> str:
    """The llguidance grammar for a Lark grammar, or a GBNF/EBNF one (`root ::= ...`)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise _bad(param, "a grammar response format needs a non-empty 'grammar' string "
                          "(Lark, or GBNF with `root ::= ...`).")
    try:
        return llg.grammar_from("grammar", grammar)
    except ValueError as e:
        raise _bad(param, f"the grammar cannot be read: {e}") from None


@dataclass(frozen=True)
class GrammarSpec:
    """An llguidance grammar and the request field it came from (compile errors name it)."""

    grammar: str
    param: str


def grammar_from_response_format(response_format: Any,
                                 param: str = "response_format") -> GrammarSpec | None:
    """The grammar a `response_format` asks for (None for text / no constraint).

    Accepts a dict or a pydantic model in any of the shapes listed in the module docstring.
    Raises `BadRequestError` for an unknown type or a missing/ill-typed field; whether the
    grammar compiles is checked by `GrammarCompiler.compile`.
    """
    rf = _as_dict(response_format)
    if rf is None:
        return None
    if not isinstance(rf, Mapping):
        raise _bad(param, f"must be an object, got {type(rf).__name__}.")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")
        if schema is None:
            return GrammarSpec(json_schema_grammar({"type": "object"}, param), param)
        return _spec(json_schema_grammar, schema, f"{param}.schema")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping) or spec.get("schema") is None:
            raise _bad(f"{param}.json_schema", "type 'json_schema' needs a 'json_schema' "
                       "object with a 'schema', e.g. {\"name\": \"answer\", \"schema\": "
                       "{\"type\": \"object\", ...}}.")
        return _spec(json_schema_grammar, spec["schema"], f"{param}.json_schema.schema")
    if kind == "regex":
        return _spec(regex_grammar, rf.get("regex", rf.get("pattern")), f"{param}.regex")
    if kind == "grammar":
        return _spec(lark_grammar, rf.get("grammar"), f"{param}.grammar")
    raise _bad(f"{param}.type", f"must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
                                f"got {kind!r}.")


def _spec(build, value: Any, param: str) -> GrammarSpec:
    return GrammarSpec(build(value, param), param)


#: Request-level structured-output fields of other servers -> response_format builders.
_EXTENSION_FIELDS = {
    "guided_json": lambda v: {"type": "json_schema", "json_schema": {"schema": v}},  # vLLM<0.12
    "guided_regex": lambda v: {"type": "regex", "regex": v},
    "guided_grammar": lambda v: {"type": "grammar", "grammar": v},
    "guided_choice": lambda v: {"type": "choice", "choice": v},
    "regex": lambda v: {"type": "regex", "regex": v},                           # SGLang
    "ebnf": lambda v: {"type": "grammar", "grammar": v},
    "json_schema": lambda v: {"type": "json_schema", "json_schema": {"schema": v}},
}
_STRUCTURED_OUTPUTS_FIELDS = {                                                  # vLLM >= 0.12
    "json": _EXTENSION_FIELDS["guided_json"], "regex": _EXTENSION_FIELDS["regex"],
    "grammar": _EXTENSION_FIELDS["ebnf"], "choice": _EXTENSION_FIELDS["guided_choice"],
    "json_object": lambda v: {"type": "json_object"} if v else None,
}


def response_format_from_extensions(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The response_format that vLLM's or SGLang's structured-output request fields ask for,
    or None when the request has none of them.

    vLLM: `structured_outputs: {json | regex | grammar | choice | json_object}` and the older
    `guided_json`, `guided_regex`, `guided_grammar`, `guided_choice`; SGLang: `json_schema`,
    `regex`, `ebnf`. A choice list becomes `{"type": "grammar"}` over the literal strings. More
    than one constraint in one request is a `BadRequestError`.
    """
    found: list[tuple[str, dict[str, Any]]] = []
    for name, build in _EXTENSION_FIELDS.items():
        if body.get(name) is not None:
            found.append((name, build(body[name])))
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, Mapping):
            raise _bad("structured_outputs", "must be an object such as {\"json\": {...}}.")
        for name, build in _STRUCTURED_OUTPUTS_FIELDS.items():
            if structured.get(name) is not None and (rf := build(structured[name])):
                found.append((f"structured_outputs.{name}", rf))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise BadRequestError(f"Only one structured-output constraint is allowed per request, "
                              f"got {names}.", param=found[1][0])
    name, rf = found[0]
    if rf["type"] == "choice":
        return {"type": "grammar", "grammar": _choice_lark(rf["choice"], name)}
    return rf


def _choice_lark(choices: Any, param: str) -> str:
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise _bad(param, "must be a non-empty list of non-empty strings.")
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# ---------------------------------------------------------------------------------------------
# Compiling (needs the model's tokenizer)


class CompiledGrammar:
    """A grammar compiled for one tokenizer: a pristine matcher that each new sequence copies
    (copies share the compiled lexer, so a copy costs microseconds)."""

    def __init__(self, grammar: str, template: llg.LLMatcher, compiler: GrammarCompiler):
        self.grammar = grammar
        self._template = template
        self._compiler = compiler

    def processor(self) -> GrammarProcessor:
        """A fresh `GrammarProcessor` at the start of the grammar, for one sequence."""
        return GrammarProcessor(self._template.deep_copy(), self._compiler.vocab_size,
                                self._compiler.mask_words)


class GrammarCompiler:
    """Compiles grammars for one tokenizer (the llguidance tokenizer is built once, ~0.2 s for
    a 49k vocabulary) and keeps the last `cache_size` compiled grammars, so the same schema is
    compiled once. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 256):
        tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        #: The model's vocabulary: masks are bool[vocab_size].
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.ll_tokenizer = llg.LLTokenizer(
            _tokenizer_json(tokenizer), n_vocab=max(self.vocab_size, tok_vocab),
            eos_token=self.eos_token_ids or None)
        #: int32 words of a packed mask (bit i % 32 of word i // 32 is token i).
        self.mask_words = (self.ll_tokenizer.vocab_size + 31) // 32
        self._cache: collections.OrderedDict[str, CompiledGrammar | str] = \
            collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, grammar: GrammarSpec | str,
                param: str = "response_format") -> CompiledGrammar:
        """Compile a `GrammarSpec` (from `grammar_from_response_format`,
        `tool_calls.tool_call_grammar`) or an llguidance grammar string (`json_schema_grammar`
        ...). Raises `BadRequestError` naming the spec's param (else `param`) when it does not
        compile or admits no output."""
        if isinstance(grammar, GrammarSpec):
            grammar, param = grammar.grammar, grammar.param
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
        if hit is None:
            hit = self._compile(grammar)
            with self._lock:
                self._cache[grammar] = hit
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):     # a compile error, cached as its message
            raise _bad(param, hit)
        return hit

    def _compile(self, grammar: str) -> CompiledGrammar | str:
        matcher = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        error = matcher.get_error() if matcher.is_error() else ""
        if not error:
            # The first mask warms the lexer the copies share, and catches grammars that admit
            # nothing (an empty language or an unsatisfiable schema).
            bits = np.zeros(self.mask_words, np.int32)
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            if matcher.is_error():
                error = matcher.get_error()
            elif not bits.any() and not matcher.is_accepting():
                error = "the grammar admits no output at all"
        if error:
            if len(error) > _MAX_ERROR_CHARS:
                error = error[:_MAX_ERROR_CHARS] + " ..."
            return (f"it cannot be enforced: {error.strip()}. Fix or remove that part (mlc "
                    "refuses the request rather than answer unconstrained).")
        for warning in matcher.get_grammar_warnings():
            logger.warning("grammar warning: %s", warning)
        return CompiledGrammar(grammar, matcher, self)


def _tokenizer_json(tokenizer: Any) -> str:
    """The tokenizer's JSON without padding or truncation (llguidance tokenizes with it)."""
    data = json.loads(tokenizer.to_str())
    data["padding"] = None
    data["truncation"] = None
    return json.dumps(data, ensure_ascii=False)


_compilers: weakref.WeakKeyDictionary[Any, dict[tuple, GrammarCompiler]] = \
    weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer: Any, vocab_size: int,
                     eos_token_ids: Iterable[int]) -> GrammarCompiler:
    """The `GrammarCompiler` of a `tokenizers.Tokenizer` for a model's vocabulary size and EOS
    ids, built on first use and kept as long as the tokenizer lives (one per engine)."""
    key = (int(vocab_size), tuple(int(t) for t in eos_token_ids))
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        compiler = per_tokenizer.get(key)
        if compiler is None:
            compiler = per_tokenizer[key] = GrammarCompiler(tokenizer, *key)
    return compiler


# ---------------------------------------------------------------------------------------------
# The per-sequence processor


class GrammarStateError(RuntimeError):
    """A token the grammar forbids reached `accept` (an engine bug: masks were not applied).
    The engine ends that sequence; it never continues unconstrained."""


class GrammarProcessor(LogitProcessor):
    """One sequence's grammar state (an llguidance matcher).

    `token_mask()` is bool[vocab_size] (False past the tokenizer's vocabulary; EOS only where
    the grammar may end); `token_bitmask()` is the same packed in int32 words for device-side
    masking. The mask is computed once per state (llguidance releases the GIL meanwhile, so a
    thread can compute it while the device runs) and reused until `accept` or `rollback`.
    `is_finished()` turns True once the grammar admits nothing more: the engine ends the
    sequence with finish_reason "stop".
    """

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, mask_words: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros(mask_words, np.int32)
        self._bits_valid = False
        self._job: Any = None        # a `prefetch_token_bitmasks` computing this mask
        self.num_accepted = 0

    def _sync(self) -> None:
        """Wait for a prefetched mask still being computed (its error surfaces here)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def token_bitmask(self) -> np.ndarray:
        """int32[ceil(tokenizer vocab / 32)]: bit (i % 32) of word (i // 32) allows token i.
        The array is the processor's own buffer: copy it to keep it past the next accept."""
        self._sync()
        if not self._bits_valid:
            self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._check()
            self._bits_valid = True
        return self._bits

    def token_mask(self) -> np.ndarray:
        """bool[vocab_size]: the tokens allowed next."""
        bits = self.token_bitmask().view(np.uint8)
        # The packed mask covers max(model vocab, tokenizer vocab) tokens.
        return np.unpackbits(bits, bitorder="little", count=self.vocab_size).view(np.bool_)

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; raises `GrammarStateError` if the grammar forbids it."""
        self._sync()
        if not self._matcher.consume_token(int(token_id)):
            raise GrammarStateError(
                f"token {token_id} violates the grammar: {self._matcher.get_error()}")
        self.num_accepted += 1
        self._bits_valid = False

    def is_finished(self) -> bool:
        """True once the grammar admits no further token (EOS aside)."""
        self._sync()
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the output so far is complete (it may still be extended)."""
        self._sync()
        return self._matcher.is_accepting()

    def rollback(self, n: int) -> None:
        """Forget the last `n` accepted tokens."""
        if n <= 0:
            return
        self._sync()
        if n > self.num_accepted or not self._matcher.rollback(n):
            raise GrammarStateError(f"cannot roll back {n} tokens: "
                                    f"{self._matcher.get_error() or 'too many'}")
        self.num_accepted -= n
        self._bits_valid = False

    def fork(self) -> GrammarProcessor:
        """An independent copy (for n > 1 choices)."""
        self._sync()
        twin = GrammarProcessor(self._matcher.deep_copy(), self.vocab_size, self._bits.shape[0])
        twin.num_accepted = self.num_accepted
        return twin

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarStateError(f"grammar matcher failed: {self._matcher.get_error()}")


_executor: llg.LLExecutor | None = None


def fill_token_bitmasks(processors: Sequence[GrammarProcessor],
                        out: np.ndarray | None = None) -> np.ndarray:
    """The packed masks of several sequences at once, computed in parallel by llguidance's
    thread pool: int32[len(processors), mask words]; row i belongs to processors[i]."""
    global _executor
    if not processors:
        raise ValueError("no processors")
    words = processors[0]._bits.shape[0]
    if out is None:
        out = np.empty((len(processors), words), np.int32)
    if out.shape != (len(processors), words) or out.dtype != np.int32 \
            or not out.flags["C_CONTIGUOUS"]:
        raise ValueError(f"out must be a C-contiguous int32[{len(processors)}, {words}]")
    if _executor is None:
        _executor = llg.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(p._matcher, i) for i, p in enumerate(processors)],
                                      out.ctypes.data, words * 4, len(processors))
    for i, p in enumerate(processors):
        p._check()
        p._bits[:] = out[i]
        p._bits_valid = True
    return out


_prefetcher: Any = None
_prefetcher_lock = threading.Lock()


def prefetch_token_bitmasks(processors: Sequence[GrammarProcessor]) -> None:
    """Start computing the next masks of `processors` (`fill_token_bitmasks`, one batch) on a
    background thread and return at once: llguidance releases the GIL, so the masks are
    computed while the engine runs the next forward pass. Every method of a processor waits
    for its pending mask first, so callers need no other synchronization."""
    global _prefetcher
    todo = [p for p in processors if not p._bits_valid and p._job is None
            and not p._matcher.is_stopped()]
    if not todo:
        return
    if _prefetcher is None:
        with _prefetcher_lock:
            if _prefetcher is None:
                from concurrent.futures import ThreadPoolExecutor

                _prefetcher = ThreadPoolExecutor(1, thread_name_prefix="mlc-grammar-masks")
    job = _prefetcher.submit(fill_token_bitmasks, todo)
    for p in todo:
        p._job = job
