"""Chat templates (HF jinja and MLC-LLM conv templates); tool-call parsing is tested in
test_tool_calls.py."""

import json

import pytest

from mlc.errors import BadRequestError
from mlc.runtime.chat_template import (
    render_chat,
    resolve_conv_template,
)
from mlc.support.chat_config import ChatConfig

# A ChatML-style HF template written for this test, using the HF helpers.
JINJA_CHATML = """{{ bos_token }}
{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
{{- raise_exception('bad role ' + message['role']) }}
{%- endif %}
{%- if message.tool_calls %}
{{- '<|im_start|>assistant\\n' }}
{%- for call in message.tool_calls %}<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""

MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 日本"}]


def test_jinja_template_renders():
    cfg = {"chat_template": JINJA_CHATML, "bos_token": "<s>"}
    out = render_chat(cfg, MSGS)
    assert out == ("<s><|im_start|>system\nYou are terse.<|im_end|>\n"
                   "<|im_start|>user\nHi 日本<|im_end|>\n<|im_start|>assistant\n")
    assert not render_chat(cfg, MSGS, add_generation_prompt=False).endswith("assistant\n")


def test_jinja_with_chat_config_object_and_content_parts():
    cfg = ChatConfig(model_type="llama", quantization="q0f32", model_config={}, vocab_size=10,
                     context_window_size=8, prefill_chunk_size=8, chat_template=JINJA_CHATML)
    msgs = [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                              {"type": "text", "text": "b"}]},
            {"role": "user", "content": "q"}]
    assert render_chat(cfg, msgs).startswith("<|im_start|>system\na\nb<|im_end|>")


def test_jinja_tools_and_tool_calls_tojson_keeps_unicode():
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {}}}]
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "météo", "arguments": '{"ville": "Zürich"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = render_chat({"chat_template": JINJA_CHATML}, msgs, tools=tools)
    assert 'Tools: [{"type": "function", "function": {"name": "météo"' in out
    # arguments reach the template as a dict, so tojson does not double-encode them
    assert '<tool_call>{"name": "météo", "arguments": {"ville": "Zürich"}}</tool_call>' in out


def test_jinja_helpers():
    template = ("{{ strftime_now('%Y') }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|"
                "{{ eos_token }}")
    out = render_chat({"chat_template": template, "eos_token": "</s>"}, MSGS)
    year, dumped, eos = out.split("|")
    assert year.isdigit() and json.loads(dumped) == {"a": [1, 2]} and "\n  " in dumped
    assert eos == "</s>"


@pytest.mark.parametrize("template, match", [
    ("{{ raise_exception('Only user and assistant roles are supported') }}", "Only user"),
    ("{% for m in messages %}{{ m.content", "invalid"),
    ("{{ messages[0].content + 1 }}", "rejected"),
    ("{{ ''.__class__.__mro__ }}", "rejected"),
])
def test_jinja_errors_are_bad_requests(template, match):
    with pytest.raises(BadRequestError, match=match) as info:
        render_chat({"chat_template": template}, MSGS)
    assert info.value.param == "messages"


def test_unsupported_content_part_in_template():
    with pytest.raises(BadRequestError, match="image_url"):
        render_chat({"chat_template": JINJA_CHATML},
                    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_builtin_chatml_conv_template():
    out = render_chat({"conv_template": "chatml"}, MSGS + [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert out == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                   "<|im_start|>user\nHi 日本<|im_end|>\n"
                   "<|im_start|>assistant\nHello.<|im_end|>\n"
                   "<|im_start|>user\nBye<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_builtin_llama3_default_system_message():
    out = render_chat({"conv_template": "llama-3"}, [{"role": "user", "content": "Hi"}])
    assert out == ("<|start_header_id|>system<|end_header_id|>\n\n"
                   "You are a helpful, respectful and honest assistant.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    conv = resolve_conv_template({"conv_template": "llama-3"})
    assert conv["system_prefix_token_ids"] == [128000] and "<|eot_id|>" in conv["stop_str"]


def test_builtin_llama2_no_role_after_system():
    out = render_chat({"conv_template": "llama-2"}, [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q"}])
    assert out == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Q [/INST] "


def test_conv_template_dict_with_role_templates_and_functions():
    conv = {"system_template": "SYS:{system_message}|", "system_message": "default",
            "roles": {"user": "U", "assistant": "A", "tool": "T"},
            "role_templates": {"user": "<<{user_message}>> {function_string}"},
            "seps": ["\n"], "role_content_sep": ": ", "role_empty_sep": ":",
            "stop_str": ["\n"], "stop_token_ids": [7]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    out = render_chat({"conv_template": conv},
                      [{"role": "user", "content": "a"},
                       {"role": "tool", "tool_call_id": "c", "content": "r"}], tools=tools)
    assert out == 'SYS:default|U: <<a>> [{"name": "f"}]\nT: r\nA:'


def test_conv_template_without_placeholder_gets_tool_instructions():
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    out = render_chat({"conv_template": "chatml"}, [{"role": "user", "content": "x"}],
                      tools=tools)
    assert '"name": "lookup"' in out.split("<|im_end|>")[0]


def test_default_and_unknown_conv_templates():
    assert render_chat({}, [{"role": "user", "content": "x"}]).startswith("<|im_start|>system")
    with pytest.raises(BadRequestError, match="nope"):
        render_chat({"conv_template": "nope"}, MSGS)
    with pytest.raises(BadRequestError):
        render_chat({"conv_template": "chatml"}, [])


def test_render_parsed_request_messages():
    from mlc.runtime.protocol import parse_chat_request
    req = parse_chat_request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        tools=[{"type": "function", "function": {"name": "get_weather"}}])
    out = render_chat({"chat_template": JINJA_CHATML}, req.messages, tools=req.tools)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in out
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in out
    assert "<|im_start|>tool\nsunny<|im_end|>" in out
    conv_out = render_chat({"conv_template": "chatml"}, req.messages, tools=req.tools)
    # chatml has no tool role: the result goes back in the default format, in a user turn
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in conv_out
