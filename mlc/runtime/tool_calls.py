"""Tool calling: tools into the prompt, `tool_choice` into a grammar, calls out of the text.

**The default tool format** (Hermes-style, as Qwen2.5, Hermes and other engines use it) is
what mlc uses when a model's chat template has no tool support of its own:

  * the tools are listed in the system message (`default_tool_instruction`): their OpenAI
    definitions as JSON lines inside `<tools></tools>`, and the instruction to answer a call
    with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
  * an assistant message of the history that carries `tool_calls` is rendered as those
    `<tool_call>` blocks (after its text, if any);
  * a `tool` message becomes a user turn holding `<tool_response>...</tool_response>`
    (consecutive tool messages share one turn).

Each piece applies only where the template lacks it: a template that renders `tools`, an
assistant's `tool_calls` or the `tool` role is used as it is (`ToolSupport`, probed once per
template by `chat_template.template_tool_support`).

**tool_choice**: "none" and "auto" add no constraint ("auto" output is parsed for calls);
"required" and `{"type": "function", "function": {"name": ...}}` compile to a grammar
(`tool_call_grammar`) that admits only `<tool_call>` blocks calling a declared function (the
named one) with arguments valid against its `parameters` schema; `parallel_tool_calls` (default
true) allows several blocks, separated by a newline.

**Parsing**: `ToolCallStreamParser` turns text deltas of any size into content deltas and
OpenAI's streamed tool-call deltas (first `index`, `id`, `type` and the function `name` with
`arguments: ""`, then argument fragments whose concatenation is the arguments JSON text);
`parse_tool_calls` runs the same parser over a whole output, so streamed and whole results
agree exactly. A block is a call when its JSON object names a declared function; anything else
stays content. A model that writes a bare JSON call without tags at the start of its answer
is understood too.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mlc.errors import BadRequestError
from mlc.runtime.grammar import JSON_OPTIONS, GrammarSpec, json_schema_grammar

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_ARGUMENT_KEYS = ("arguments", "parameters")


# ---------------------------------------------------------------------------------------------
# Tool definitions


def normalize_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """OpenAI tool definitions (dicts or pydantic `Tool`s) as plain dicts
    `{"type": "function", "function": {"name", "description"?, "parameters"?}}`; raises
    `BadRequestError` for a missing or repeated function name."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if hasattr(tool, "model_dump"):
            tool = tool.model_dump(exclude_none=True)
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"Invalid 'tools[{i}]': a tool needs "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                                  param=f"tools[{i}].function.name")
        if name in seen:
            raise BadRequestError(f"Invalid 'tools[{i}].function.name': {name!r} is declared "
                                  "twice; function names must be unique.",
                                  param=f"tools[{i}].function.name")
        seen.add(name)
        out.append({"type": "function", "function": dict(function)})
    return out


def _names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


# ---------------------------------------------------------------------------------------------
# Prompt rendering in the default format


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template renders by itself."""

    tools: bool = False        # the `tools` definitions
    tool_calls: bool = False   # assistant messages' `tool_calls`
    tool_role: bool = False    # `tool` messages (with their content)


def default_tool_instruction(tools: Sequence[dict[str, Any]]) -> str:
    """The system-message text that presents `tools` in the default format."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in normalize_tools(tools))
    return (
        "# Tools\n\n"
        "You may call one or more functions to help with the user's request. The functions "
        "you can call are described by these JSON schemas:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "To call a function, reply with a JSON object holding its name and its arguments "
        "inside <tool_call></tool_call> tags, one block per call:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}'
        f"\n{TOOL_CALL_CLOSE}")


def format_tool_call(name: str, arguments: Any) -> str:
    """One call as a `<tool_call>` block; `arguments` is a dict or a JSON string."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass                    # keep the text the model wrote
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def apply_default_tool_format(messages: list[dict[str, Any]], tools: list[dict] | None,
                              support: ToolSupport) -> tuple[list[dict[str, Any]], list | None]:
    """Rewrite normalized chat messages so that what the template cannot render is in the
    default format. Returns the messages and the tools to hand to the template (None when
    the instruction went into the system message)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls") and not support.tool_calls:
            blocks = [format_tool_call(c["function"].get("name"),
                                       c["function"].get("arguments", {}))
                      for c in message["tool_calls"]]
            text = message.get("content") or ""
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(([text] if text else []) + blocks)
        elif role == "tool" and not support.tool_role:
            response = f"<tool_response>\n{message.get('content', '')}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
                continue
            message = {"role": "user", "content": response, "_tool_responses": True}
        out.append(message)
    for message in out:
        message.pop("_tool_responses", None)
    if not tools or support.tools:
        return out, tools or None
    instruction = default_tool_instruction(tools)
    if out and out[0].get("role") == "system":
        system = out[0].get("content") or ""
        out[0] = {**out[0], "content": f"{system}\n\n{instruction}" if system else instruction}
    else:
        out.insert(0, {"role": "system", "content": instruction})
    return out, None


# ---------------------------------------------------------------------------------------------
# tool_choice -> grammar


def _tool_choice_name(tool_choice: Any) -> str | None:
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise BadRequestError("Invalid 'tool_choice': use \"none\", \"auto\", "
                                  "\"required\" or {\"type\": \"function\", \"function\": "
                                  "{\"name\": ...}}.", param="tool_choice")
        return name
    return None


def forced_functions(tools: Sequence[Any] | None, tool_choice: Any) -> list[int] | None:
    """Indices (into `tools`) of the functions a tool_choice forces the model to call from, or
    None when it forces nothing ("none", "auto", unset). Raises `BadRequestError` (param
    "tool_choice") for an unknown choice or function name."""
    tools = normalize_tools(tools)
    name = _tool_choice_name(tool_choice)
    if name is not None:
        if name not in _names(tools):
            raise BadRequestError(f"Invalid 'tool_choice': function {name!r} is not among the "
                                  f"declared tools {_names(tools)}.", param="tool_choice")
        return [_names(tools).index(name)]
    if tool_choice in (None, "none", "auto"):
        return None
    if tool_choice == "required":
        if not tools:
            raise BadRequestError("Invalid 'tool_choice': 'required' needs 'tools'.",
                                  param="tool_choice")
        return list(range(len(tools)))
    raise BadRequestError(f"Invalid 'tool_choice': {tool_choice!r}; use \"none\", \"auto\", "
                          "\"required\" or {\"type\": \"function\", \"function\": "
                          "{\"name\": ...}}.", param="tool_choice")


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call object `{"name": <this function>, "arguments": {...}}`:
    the function's `parameters` become the schema of `arguments`, with its `$defs` moved to the
    root and its local `$ref`s re-pointed, so references still resolve."""
    params = function.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    params = dict(params) if isinstance(params, dict) else params
    hoisted: dict[str, Any] = {}
    if isinstance(params, dict):
        for key in ("$defs", "definitions"):
            if key in params:
                hoisted[key] = params.pop(key)
        params.pop("$schema", None)
        params = _repoint_refs(params)
        hoisted = _repoint_refs(hoisted)
    schema = {"type": "object",
              "properties": {"name": {"const": function["name"]}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False}
    schema.update(hoisted)
    return schema


def _repoint_refs(node: Any) -> Any:
    """`#/...` refs into the parameters schema -> `#/properties/arguments/...` ($defs and
    definitions stay: they move to the root)."""
    if isinstance(node, list):
        return [_repoint_refs(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#") and not (
                value.startswith("#/$defs/") or value.startswith("#/definitions/")):
            value = "#/properties/arguments" + value[1:]
        out[key] = _repoint_refs(value)
    return out


def tool_call_grammar(tools: Sequence[Any] | None, tool_choice: Any,
                      parallel_tool_calls: bool | None = True) -> GrammarSpec | None:
    """The grammar that forces `tool_choice` ("required" or a named function): one
    `<tool_call>` block (several, newline-separated, when `parallel_tool_calls`) calling the
    allowed functions with arguments valid against their `parameters`. None for "none",
    "auto" or no tool_choice. Raises `BadRequestError` for a bad choice or an unreadable
    parameter schema (param `tools[i].function.parameters`)."""
    indices = forced_functions(tools, tool_choice)
    if indices is None:
        return None
    tools = normalize_tools(tools)
    rules = []
    for i in indices:
        param = f"tools[{i}].function.parameters"
        schema = call_schema(tools[i]["function"])
        json_schema_grammar(schema, param)          # reads it (a clear 400 if it cannot)
        schema["x-guidance"] = {**JSON_OPTIONS, "lenient": False}
        rules.append(f"fn_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    alternatives = " | ".join(f"fn_{i}" for i in indices)
    repeat = ' ("\\n" tool_call)*' if parallel_tool_calls in (None, True) else ""
    lark = "\n".join([
        f"start: tool_call{repeat}",
        f"tool_call: {json.dumps(TOOL_CALL_OPEN + chr(10))} ({alternatives}) "
        f"{json.dumps(chr(10) + TOOL_CALL_CLOSE)}",
        *rules, ""])
    from llguidance import LLMatcher

    return GrammarSpec(LLMatcher.grammar_from_lark(lark), "tools")


def compile_tool_choice(compiler: Any, tools: Sequence[Any] | None, tool_choice: Any,
                        parallel_tool_calls: bool | None = True) -> Any:
    """`tool_call_grammar` compiled with a `grammar.GrammarCompiler` (None when tool_choice
    forces nothing). Each forced function's parameter schema is compiled on its own first, so
    a schema llguidance cannot enforce is a 400 naming `tools[i].function.parameters`."""
    spec = tool_call_grammar(tools, tool_choice, parallel_tool_calls)
    if spec is None:
        return None
    normalized = normalize_tools(tools)
    for i in forced_functions(normalized, tool_choice) or []:
        compiler.compile(json_schema_grammar(call_schema(normalized[i]["function"])),
                         param=f"tools[{i}].function.parameters")
    return compiler.compile(spec)


# ---------------------------------------------------------------------------------------------
# Parsing calls out of model text (streamed or whole)


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallDelta:
    """A piece of one tool call: the first carries id and name, later ones only arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's streamed `choices[].delta.tool_calls[]` entry."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParserDelta:
    """What one `feed` (or `finish`) adds: content text and tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ParsedToolCalls:
    """A whole output: its content (None when it only made calls) and OpenAI `tool_calls`
    (`[{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}]`)."""

    content: str | None
    tool_calls: list[dict[str, Any]]

    @property
    def finish_reason(self) -> str | None:
        """"tool_calls" when the output made calls, else None (keep the engine's)."""
        return "tool_calls" if self.tool_calls else None


class _Reject(Exception):
    """The block being scanned is not a tool call."""


class _CallScanner:
    """Scans the JSON object of one call incrementally, char by char, tracking the top-level
    keys "name" and "arguments" (or "parameters") and where the arguments value lies."""

    def __init__(self, tagged: bool):
        self.tagged = tagged
        self.raw = ""            # the block text after <tool_call> (or from "{" if untagged)
        self.pos = 0             # next char of raw to scan
        self.state = "lead"      # lead, key_or_end, key, colon, value, in_value, comma_or_end,
        self.depth = 0           # after (JSON done, tagged: expect </tool_call>), done
        self.in_string = False
        self.escape = False
        self.key_start = 0
        self.key: str | None = None
        self.value_start = 0
        self.value_kind = ""     # container, string, scalar
        self.name: str | None = None
        self.args_key_seen = False
        self.args_start: int | None = None   # start of the arguments value in raw
        self.args_end: int | None = None     # end (exclusive) once complete
        self.args_is_string = False
        self.args_sent = 0       # chars of the arguments emitted; -1: all of them
        self.index: int | None = None    # the call's index once its header was sent
        self.broken = False      # malformed after its header was sent: skip the rest
        self.name_reported = False
        self.dropped_ws = ""     # whitespace before the opening tag (content if rejected)

    def scan(self, final: bool) -> bool:
        """Advance over raw; raises _Reject when the text cannot be a call. Returns True when
        it stopped early, right after the name's value (so the header goes out at the same
        point whatever the deltas were), and must be called again."""
        raw = self.raw
        while self.pos < len(raw) and self.state not in ("after", "done"):
            if self.name is not None and self.index is None and not self.name_reported:
                self.name_reported = True
                return True
            c = raw[self.pos]
            state = self.state
            if state == "lead":
                if c == "{":
                    self.state, self.depth = "key_or_end", 1
                elif not c.isspace():
                    raise _Reject
            elif state in ("key_or_end", "key_next"):
                if c == '"':
                    self.state, self.key_start = "key", self.pos
                elif c == "}" and state == "key_or_end":
                    self._end_object()
                elif not c.isspace():
                    raise _Reject
            elif state == "key":
                if self._string_char(c):
                    try:
                        self.key = json.loads(raw[self.key_start:self.pos + 1])
                    except json.JSONDecodeError:
                        raise _Reject from None
                    self.state = "colon"
            elif state == "colon":
                if c == ":":
                    self.state = "value"
                elif not c.isspace():
                    raise _Reject
            elif state == "value":
                if not c.isspace():
                    self._start_value(c)
            elif state == "in_value":
                self._value_char(c)
            elif state == "comma_or_end":
                if c == ",":
                    self.state = "key_next"
                elif c == "}":
                    self._end_object()
                elif not c.isspace():
                    raise _Reject
            self.pos += 1
        if final and self.state == "in_value" and self.value_kind == "scalar":
            self._end_value(len(raw))
        if self.name is not None and not self.name_reported:
            self.name_reported = True
            return True
        return False

    def _string_char(self, c: str) -> bool:
        """Feed one char inside a string; True at its closing quote."""
        if self.escape:
            self.escape = False
        elif c == "\\":
            self.escape = True
        elif c == '"':
            return True
        return False

    def _start_value(self, c: str) -> None:
        self.value_start = self.pos
        self.state = "in_value"
        if self.key in _ARGUMENT_KEYS and not self.args_key_seen:
            self.args_key_seen = True
            self.args_start = self.pos
            self.args_is_string = c == '"'
        if c in "{[":
            self.value_kind, self.depth = "container", 2
        elif c == '"':
            self.value_kind = "string"
        else:
            self.value_kind = "scalar"
            if c in ",}":
                raise _Reject

    def _value_char(self, c: str) -> None:
        kind = self.value_kind
        if kind == "string":
            if self._string_char(c):
                self._end_value(self.pos + 1)
        elif kind == "container":
            if self.in_string:
                if self._string_char(c):
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._end_value(self.pos + 1)
        elif c in ",}" or c.isspace():         # a scalar ends at its delimiter
            self._end_value(self.pos)
            self.pos -= 1                      # rescan the delimiter
            self.state = "comma_or_end"

    def _end_value(self, end: int) -> None:
        text = self.raw[self.value_start:end]
        if self.key == "name" and self.name is None:
            try:
                name = json.loads(text)
            except json.JSONDecodeError:
                raise _Reject from None
            if not isinstance(name, str) or not name:
                raise _Reject
            self.name = name
        if self.args_start == self.value_start and self.args_end is None:
            self.args_end = end
        self.state = "comma_or_end"

    def _end_object(self) -> None:
        self.depth = 0
        self.state = "after" if self.tagged else "done"

    @property
    def json_end(self) -> int:
        """End of the JSON object in raw (once state is after/done)."""
        return self.pos


class ToolCallStreamParser:
    """Incremental parser of model output into content and tool calls (see the module
    docstring). `feed(text)` takes any delta and returns a `ParserDelta`; `finish()` flushes
    what was held back. Whitespace around call blocks is not content. `tool_calls` holds the
    calls so far in OpenAI's (non-streamed) shape."""

    def __init__(self, tools: Sequence[Any] | None = None,
                 id_factory: Callable[[], str] = new_call_id):
        self._names = set(_names(normalize_tools(tools)))
        self._new_id = id_factory
        self._buf = ""
        self._call: _CallScanner | None = None
        self._pending_ws = ""          # whitespace held back in content
        self._drop_leading_ws = False  # right after a call block
        self._content_seen = False     # any non-whitespace content emitted
        self._out = ParserDelta()
        self.tool_calls: list[dict[str, Any]] = []

    # -- public ----------------------------------------------------------------------------
    def feed(self, text: str) -> ParserDelta:
        """Parse a text delta."""
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> ParserDelta:
        """The end of the output: flush held text; an unfinished call keeps what it sent."""
        self._run(final=True)
        while self._call is not None:
            call = self._call
            if call.index is not None:
                if not call.broken:
                    self._send_arguments(call, final=True)
                self._call = None
            else:
                self._reject_call()
                self._run(final=True)
        if not self.tool_calls and self._pending_ws:
            self._out.content += self._pending_ws
        self._pending_ws = ""
        return self._take()

    # -- text ------------------------------------------------------------------------------
    def _run(self, final: bool) -> None:
        while True:
            if self._call is not None:
                if not self._advance_call(final):
                    return
                continue
            buf = self._buf
            start = buf.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._emit_text(buf[:start])
                self._buf = ""
                self._call = _CallScanner(tagged=True)
                self._call.raw = buf[start + len(TOOL_CALL_OPEN):]
                self._call.dropped_ws, self._pending_ws = self._pending_ws, ""
                continue
            if not self._content_seen and self._names:
                stripped = buf.lstrip()
                if stripped.startswith("{"):
                    self._emit_text(buf[:len(buf) - len(stripped)])
                    self._buf = ""
                    self._call = _CallScanner(tagged=False)
                    self._call.raw = stripped
                    continue
                if not stripped:
                    self._emit_text(buf)
                    self._buf = ""
                    return
            keep = 0 if final else _partial_suffix(buf, TOOL_CALL_OPEN)
            self._emit_text(buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return

    def _emit_text(self, text: str) -> None:
        if self._drop_leading_ws:
            text = text.lstrip()
            if not text:
                return
            self._drop_leading_ws = False
        text = self._pending_ws + text
        body = text.rstrip()
        self._pending_ws = text[len(body):]
        if body:
            self._out.content += body
            self._content_seen = True

    # -- calls -----------------------------------------------------------------------------
    def _advance_call(self, final: bool) -> bool:
        """Scan the current call; True when it ended (parsing goes on in text mode)."""
        call = self._call
        call.raw += self._buf
        self._buf = ""
        if not call.broken:
            try:
                while call.scan(final):
                    if call.index is None:
                        if self._names and call.name not in self._names:
                            raise _Reject
                        self._send_header(call)
                if call.state in ("after", "done") and call.name is None:
                    raise _Reject
            except _Reject:
                if call.index is None:
                    self._reject_call()
                    return True
                self._send_arguments(call, final=False)
                call.broken = True      # already announced: it keeps what it sent
        if call.broken:                 # skip the rest of its block
            if not call.tagged:
                return self._end_call(call.raw[call.pos:])
            end = call.raw.find(TOOL_CALL_CLOSE, call.pos)
            if end >= 0:
                return self._end_call(call.raw[end + len(TOOL_CALL_CLOSE):])
            return self._end_call("") if final else False
        if call.index is not None:
            self._send_arguments(call, final=False)
        if call.state == "done":
            return self._end_call(call.raw[call.json_end:])
        if call.state == "after":
            rest = call.raw[call.json_end:]
            stripped = rest.lstrip()
            if stripped.startswith(TOOL_CALL_CLOSE):
                return self._end_call(stripped[len(TOOL_CALL_CLOSE):])
            if TOOL_CALL_CLOSE.startswith(stripped):
                if final:                     # output cut inside the closing tag
                    return self._end_call("")
                return False                  # the closing tag may still come
            return self._end_call(rest)       # no closing tag: the call ends with its JSON
        return False

    def _send_header(self, call: _CallScanner) -> None:
        call.index = len(self.tool_calls)
        call_id = self._new_id()
        self.tool_calls.append({"id": call_id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}})
        self._out.tool_calls.append(ToolCallDelta(call.index, call_id, call.name, ""))

    def _send_arguments(self, call: _CallScanner, final: bool) -> None:
        """Emit the arguments text scanned since the last emission."""
        if call.args_sent < 0:
            return
        if call.args_start is None:
            if call.state in ("after", "done"):        # no arguments key: a call without any
                self._append_arguments(call, "{}")
                call.args_sent = -1
            return
        if call.args_is_string:                        # arguments given as a JSON string
            if call.args_end is not None:
                text = call.raw[call.args_start:call.args_end]
                try:
                    text = json.loads(text)
                except json.JSONDecodeError:
                    pass
                self._append_arguments(call, text if isinstance(text, str) else json.dumps(text))
                call.args_sent = -1
            return
        if call.args_end is not None:
            end = call.args_end
        else:
            end = len(call.raw) if final else call.pos
        start = call.args_start + call.args_sent
        if end > start:
            self._append_arguments(call, call.raw[start:end])
            call.args_sent = end - call.args_start

    def _append_arguments(self, call: _CallScanner, text: str) -> None:
        self.tool_calls[call.index]["function"]["arguments"] += text
        last = self._out.tool_calls[-1] if self._out.tool_calls else None
        if last is not None and last.index == call.index:
            last.arguments += text
        else:
            self._out.tool_calls.append(ToolCallDelta(call.index, arguments=text))

    def _end_call(self, rest: str) -> bool:
        self._call = None
        self._buf = rest + self._buf
        self._drop_leading_ws = True
        self._pending_ws = ""
        return True

    def _reject_call(self) -> None:
        """Not a call: its text so far is content, and parsing resumes as text after the
        opening tag (or after the "{" of an untagged block)."""
        call = self._call
        self._call = None
        opener = TOOL_CALL_OPEN if call.tagged else call.raw[:1]
        rest = call.raw if call.tagged else call.raw[1:]
        self._drop_leading_ws = False
        self._pending_ws += call.dropped_ws
        self._emit_text(opener)
        self._buf = rest + self._buf

    def _take(self) -> ParserDelta:
        out, self._out = self._out, ParserDelta()
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may be completed later)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_calls(text: str, tools: Sequence[Any] | None,
                     id_factory: Callable[[], str] = new_call_id) -> ParsedToolCalls:
    """The content and tool calls of a whole output (the streaming parser over one delta)."""
    parser = ToolCallStreamParser(tools, id_factory)
    content = parser.feed(text).content + parser.finish().content
    if parser.tool_calls:
        return ParsedToolCalls(content or None, parser.tool_calls)
    return ParsedToolCalls(content, [])
