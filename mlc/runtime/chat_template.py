"""Chat messages -> prompt text (tool calls are parsed out of model text by
`mlc.runtime.tool_calls`).

A model's prompt format comes from its `mlc-chat-config.json`:
  * `chat_template`: a Hugging Face jinja2 template (preferred when present), rendered in a
    sandbox with HF's helpers (`raise_exception`, `strftime_now`, `tojson`, bos/eos tokens);
  * else `conv_template`: MLC-LLM's conversation protocol, either a dict (system_template,
    system_message, roles, role_templates, seps, role_content_sep, role_empty_sep, stop_str,
    stop_token_ids, system_prefix_token_ids, add_role_after_system_message, function_string)
    or the name of a built-in one ("chatml", "llama-2", "llama-3");
  * else ChatML.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from mlc.errors import BadRequestError
from mlc.runtime.tool_calls import ToolSupport, apply_default_tool_format

logger = logging.getLogger(__name__)

SYSTEM_PLACEHOLDER = "{system_message}"
FUNCTION_PLACEHOLDER = "{function_string}"
_MESSAGE_PLACEHOLDERS = {"user": "{user_message}", "assistant": "{assistant_message}",
                         "tool": "{tool_message}"}

# Built-in conversation templates, in MLC-LLM's conv_template format.
BUILTIN_CONV_TEMPLATES: dict[str, dict[str, Any]] = {
    "chatml": {
        "name": "chatml",
        "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
        "system_message": "A conversation between a user and an LLM-based AI assistant. "
                          "The assistant gives helpful and honest answers.",
        "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>"],
        "stop_token_ids": [],
    },
    "llama-3": {
        "name": "llama-3",
        "system_template": "<|start_header_id|>system<|end_header_id|>\n\n"
                           "{system_message}<|eot_id|>",
        "system_message": "You are a helpful, respectful and honest assistant.",
        "roles": {"user": "<|start_header_id|>user",
                  "assistant": "<|start_header_id|>assistant",
                  "tool": "<|start_header_id|>ipython"},
        "seps": ["<|eot_id|>"],
        "role_content_sep": "<|end_header_id|>\n\n",
        "role_empty_sep": "<|end_header_id|>\n\n",
        "stop_str": ["<|end_of_text|>", "<|eot_id|>"],
        "stop_token_ids": [128001, 128009],
        "system_prefix_token_ids": [128000],
    },
    "llama-2": {
        "name": "llama-2",
        "system_template": "[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
        "system_message": "You are a helpful, respectful and honest assistant.",
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]", "tool": "[INST]"},
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": " ",
        "stop_str": ["[INST]"],
        "stop_token_ids": [2],
        "system_prefix_token_ids": [1],
        "add_role_after_system_message": False,
    },
}

_CONV_DEFAULTS: dict[str, Any] = {
    "system_template": SYSTEM_PLACEHOLDER, "system_message": "", "role_templates": {},
    "role_content_sep": "", "role_empty_sep": "", "stop_str": [], "stop_token_ids": [],
    "system_prefix_token_ids": None, "add_role_after_system_message": True,
    "function_string": "",
}

def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


# ---------------------------------------------------------------------------------------------
# Messages


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Messages as plain dicts for templates: "developer" -> "system", text parts joined into
    one string, None content -> "", tool-call arguments parsed from JSON into dicts."""
    out = []
    for i, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        if not isinstance(message, dict):
            raise BadRequestError(f"Invalid 'messages[{i}]': must be an object.",
                                  param=f"messages[{i}]")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        message["content"] = _content_text(message.get("content"), i)
        if message.get("tool_calls"):
            message["tool_calls"] = [_template_tool_call(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequestError(
                    f"Invalid 'messages[{index}].content': content part type {kind!r} is not "
                    "supported; only 'text' parts are.", param=f"messages[{index}].content")
            texts.append(part.get("text", ""))
        return "\n".join(texts)
    raise BadRequestError(f"Invalid 'messages[{index}].content': must be a string or a list "
                          "of text parts.", param=f"messages[{index}].content")


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    call = dict(call)
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # leave the string as the model wrote it
    call["function"] = function
    return call


# ---------------------------------------------------------------------------------------------
# Jinja (Hugging Face chat templates)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps (no HTML escaping), non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_jinja(template: str, messages: list[dict[str, Any]], tools: list | None = None,
                 add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                 **kwargs: Any) -> str:
    """Render a Hugging Face chat template; template errors become `BadRequestError`."""
    try:
        return _compile_template(template).render(
            messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise BadRequestError(f"The model's chat template is invalid: {e.message} "
                              f"(line {e.lineno}).", param="messages") from None
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError) as e:
        raise BadRequestError(f"The model's chat template rejected the messages: {e}",
                              param="messages") from None


# ---------------------------------------------------------------------------------------------
# MLC-LLM conversation templates


def resolve_conv_template(chat_config: Any) -> dict[str, Any] | None:
    """The conversation template a model uses, with defaults filled; None if it has a jinja
    chat_template. The engine reads `stop_str`, `stop_token_ids` and
    `system_prefix_token_ids` (token ids to put before the prompt) from it."""
    if _get(chat_config, "chat_template"):
        return None
    conv = _get(chat_config, "conv_template")
    if conv is None:
        logger.warning("model has neither chat_template nor conv_template; using ChatML")
        conv = "chatml"
    if isinstance(conv, str):
        if conv not in BUILTIN_CONV_TEMPLATES:
            raise BadRequestError(
                f"Unknown conv_template {conv!r}; built-in ones are "
                f"{sorted(BUILTIN_CONV_TEMPLATES)}. Put the template itself (a dict) or a jinja "
                "chat_template in mlc-chat-config.json.", param="messages")
        conv = BUILTIN_CONV_TEMPLATES[conv]
    if not isinstance(conv, dict) or "roles" not in conv or not conv.get("seps"):
        raise BadRequestError("The model's conv_template needs at least 'roles' and 'seps'.",
                              param="messages")
    return {**_CONV_DEFAULTS, **conv}


def render_conv_template(conv: dict[str, Any], messages: list[dict[str, Any]],
                         tools: list | None = None, add_generation_prompt: bool = True) -> str:
    """Render normalized messages with an MLC-LLM conversation template (see
    `resolve_conv_template`): system messages replace the default system message."""
    system_parts = [m["content"] for m in messages if m["role"] == "system"]
    system_message = "\n".join(system_parts) if system_parts else conv["system_message"]
    function_string = conv.get("function_string") or ""
    if tools:   # only templates with a {function_string} get tools (see conv_tool_support)
        function_string = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
    system_text = conv["system_template"].replace(SYSTEM_PLACEHOLDER, system_message)

    roles, seps = conv["roles"], list(conv["seps"])
    role_templates = {r: _MESSAGE_PLACEHOLDERS[r] for r in _MESSAGE_PLACEHOLDERS}
    role_templates.update(conv.get("role_templates") or {})
    parts = [system_text] if system_text else []
    turns = [m for m in messages if m["role"] != "system"]
    for i, message in enumerate(turns):
        role = message["role"]
        if role not in roles and role == "tool" and "user" in roles:
            role_prefix_name, template_role = "user", "tool"
        elif role in roles:
            role_prefix_name, template_role = role, role
        else:
            raise BadRequestError(f"Invalid 'messages': role {role!r} is not supported by the "
                                  f"model's conversation template ({sorted(roles)}).",
                                  param="messages")
        content = message["content"]
        if role == "assistant" and not content and message.get("tool_calls"):
            content = json.dumps([{"name": c["function"].get("name"),
                                   "arguments": c["function"].get("arguments", {})}
                                  for c in message["tool_calls"]], ensure_ascii=False)
        if not conv["add_role_after_system_message"] and system_text and i == 0:
            prefix = ""
        else:
            prefix = roles[role_prefix_name] + conv["role_content_sep"]
        body = role_templates.get(template_role, _MESSAGE_PLACEHOLDERS[template_role])
        body = body.replace(_MESSAGE_PLACEHOLDERS[template_role], content)
        parts.append(prefix + body + seps[min(int(role == "assistant"), len(seps) - 1)])
    if add_generation_prompt:
        parts.append(roles["assistant"] + conv["role_empty_sep"])
    prompt = "".join(parts)
    # The last function placeholder gets the tools; any others are removed.
    head, sep, tail = prompt.rpartition(FUNCTION_PLACEHOLDER)
    if sep:
        prompt = (head.replace(FUNCTION_PLACEHOLDER, "") + function_string + tail)
    return prompt


# ---------------------------------------------------------------------------------------------
# Tool support of a template (what it renders by itself; the rest uses tool_calls' default)

_PROBE = "mlc_probe_7c1e"


@functools.lru_cache(maxsize=32)
def jinja_tool_support(template: str) -> ToolSupport:
    """Which tool features a jinja template renders, found by rendering probe messages once:
    tool definitions, an assistant's tool_calls, a tool message's content (the last two only
    count for templates that render tool definitions)."""
    def renders(marker: str, messages: list, tools: list | None = None) -> bool:
        try:
            out = _compile_template(template).render(
                messages=messages, tools=tools, add_generation_prompt=True,
                bos_token="", eos_token="")
        except Exception:  # noqa: BLE001 - a template that cannot render it lacks it
            return False
        return marker in out

    user = {"role": "user", "content": "hi"}
    call = {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": _PROBE + "_call", "arguments": {"x": 1}}}]}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": _PROBE + "_result"}
    definition = {"type": "function", "function": {
        "name": _PROBE + "_tool", "description": "d",
        "parameters": {"type": "object", "properties": {}}}}
    if not renders(_PROBE + "_tool", [user], [definition]):
        # A template that never shows tools knows no tool convention, even if it prints any
        # role generically: the whole conversation uses the default format.
        return ToolSupport()
    return ToolSupport(tools=True, tool_calls=renders(_PROBE + "_call", [user, call]),
                       tool_role=renders(_PROBE + "_result", [user, call, tool]))


def conv_tool_support(conv: dict[str, Any]) -> ToolSupport:
    """A conv template renders tools and calls itself only through a {function_string}."""
    native = FUNCTION_PLACEHOLDER in json.dumps(conv)
    return ToolSupport(tools=native, tool_calls=native,
                       tool_role=native or "tool" in conv["roles"])


# ---------------------------------------------------------------------------------------------
# Entry point


def render_chat(chat_config: Any, messages: Sequence[Any], tools: list | None = None,
                add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """Render chat messages into the model's prompt text.

    `chat_config` is a `ChatConfig` or a dict with chat_template / conv_template / bos_token /
    eos_token. `messages` are dicts or pydantic messages; `tools` are OpenAI tool dicts.
    What the template cannot render of tools, assistant tool_calls and tool messages is put
    in the default tool format (`mlc.runtime.tool_calls`). Extra keyword arguments are passed
    to jinja templates. Raises `BadRequestError` when the template cannot render the messages.
    """
    if not messages:
        raise BadRequestError("Invalid 'messages': must contain at least one message.",
                              param="messages")
    normalized = normalize_messages(messages)
    tool_dicts = [t.model_dump(exclude_none=True) if hasattr(t, "model_dump") else dict(t)
                  for t in tools or []]
    template = _get(chat_config, "chat_template")
    conv = None if template else resolve_conv_template(chat_config)
    if tool_dicts or any(m.get("tool_calls") or m["role"] == "tool" for m in normalized):
        support = jinja_tool_support(template) if template else conv_tool_support(conv)
        normalized, tool_dicts = apply_default_tool_format(normalized, tool_dicts or None,
                                                           support)
    if template:
        return render_jinja(template, normalized, tool_dicts or None, add_generation_prompt,
                            bos_token=_get(chat_config, "bos_token") or "",
                            eos_token=_get(chat_config, "eos_token") or "", **template_kwargs)
    return render_conv_template(conv, normalized, tool_dicts or None, add_generation_prompt)
