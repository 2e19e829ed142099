"""OpenAI protocol types: validation errors name the field; responses act like openai's."""

import json
import logging

import pytest

from mlc.errors import BadRequestError
from mlc.runtime.generation_config import GenerationConfig
from mlc.runtime.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatCompletionTokenLogprob,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    Delta,
    Function,
    TopLogprob,
    parse_chat_request,
    parse_completion_request,
)

MSGS = [{"role": "user", "content": "Hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_minimal_request_leaves_sampling_unset():
    req = parse_chat_request(messages=MSGS, model="m")
    cfg = req.to_generation_config()
    assert isinstance(cfg, GenerationConfig)
    assert cfg.temperature is None and cfg.top_p is None and cfg.n == 1
    assert cfg.stop_strs == [] and cfg.logit_bias == {}


def test_full_request_to_generation_config():
    req = parse_chat_request(
        {"messages": MSGS, "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": "###",
         "logit_bias": {"42": -100, 7: 5}, "logprobs": True, "top_logprobs": 3,
         "max_tokens": 10, "max_completion_tokens": 20, "seed": 1, "presence_penalty": 0.5,
         "frequency_penalty": -0.5, "top_k": 40, "repetition_penalty": 1.1,
         "stop_token_ids": [5], "ignore_eos": True,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    cfg = req.to_generation_config()
    assert cfg.logit_bias == {42: -100.0, 7: 5.0}
    assert cfg.stop_strs == ["###"] and cfg.stop_token_ids == [5]
    assert cfg.max_tokens == 20  # max_completion_tokens wins
    assert (cfg.logprobs, cfg.top_logprobs, cfg.top_k, cfg.seed) == (True, 3, 40, 1)
    assert cfg.response_format["json_schema"]["schema"] == {"type": "object"}
    assert cfg.ignore_eos and cfg.repetition_penalty == 1.1


def test_none_kwargs_mean_unset():
    req = parse_chat_request(messages=MSGS, stream=None, temperature=None, n=None)
    assert req.stream is False and req.n == 1


def test_developer_role_and_text_parts():
    req = parse_chat_request(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]}])
    assert req.messages[0].role == "system"
    assert req.messages[1].text() == "a\nb"


def test_assistant_tool_calls_and_tool_message():
    req = parse_chat_request(messages=MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = req.messages[1].tool_calls[0]
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert req.messages[2].tool_call_id == "call_1"


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": MSGS + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSGS, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": MSGS, "temperature": -0.1}, "temperature"),
    ({"messages": MSGS, "temperature": 2.5}, "temperature"),
    ({"messages": MSGS, "top_p": 0.0}, "top_p"),
    ({"messages": MSGS, "top_p": 1.5}, "top_p"),
    ({"messages": MSGS, "n": 0}, "n"),
    ({"messages": MSGS, "n": 129}, "n"),
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MSGS, "presence_penalty": 2.1}, "presence_penalty"),
    ({"messages": MSGS, "frequency_penalty": -2.1}, "frequency_penalty"),
    ({"messages": MSGS, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": MSGS, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": MSGS, "logit_bias": {"hello": 1}}, "logit_bias"),
    ({"messages": MSGS, "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ({"messages": MSGS, "stop": [1, 2]}, "stop"),
    ({"messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": MSGS, "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": MSGS, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"messages": MSGS, "response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_chat_validation_errors(kwargs, param):
    with pytest.raises(BadRequestError) as info:
        parse_chat_request(**kwargs)
    assert info.value.param == param
    assert param.split("[")[0].split(".")[0] in info.value.message
    assert info.value.to_openai()["error"]["param"] == param


def test_unsupported_content_part_is_named():
    with pytest.raises(BadRequestError, match="image_url") as info:
        parse_chat_request(messages=[{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert info.value.param == "messages[0].content"


def test_direct_construction_raises_bad_request():
    with pytest.raises(BadRequestError):
        ChatCompletionRequest(messages=MSGS, temperature=5)
    with pytest.raises(BadRequestError):
        ChatCompletionRequest.model_validate({"messages": MSGS, "n": 0})


def test_unknown_fields_warn_not_fail(caplog):
    with caplog.at_level(logging.WARNING, logger="mlc.runtime.protocol"):
        req = parse_chat_request(messages=MSGS, frobnicate=1)
    assert "frobnicate" in caplog.text
    assert not hasattr(req, "frobnicate")


def test_stop_up_to_16_ok():
    req = parse_chat_request(messages=MSGS, stop=[f"s{i}" for i in range(16)])
    assert len(req.to_generation_config().stop_strs) == 16


def test_completion_request_prompt_forms():
    assert parse_completion_request(prompt="hi").prompt == "hi"
    assert parse_completion_request(prompt=["hi"]).prompt == "hi"
    assert parse_completion_request(prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert parse_completion_request(prompt=[[1, 2, 3]]).prompt == [1, 2, 3]  # (lm_eval's)
    cfg = parse_completion_request(prompt="hi", logprobs=3, echo=True).to_generation_config()
    assert cfg.logprobs and cfg.top_logprobs == 3
    cfg = parse_completion_request(prompt="hi", logprobs=0).to_generation_config()
    assert cfg.logprobs and cfg.top_logprobs == 0
    assert not parse_completion_request(prompt="hi").to_generation_config().logprobs
    assert parse_completion_request(prompt="hi", n=2, best_of=2).n == 2


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": [["a"]]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [[1, "a"]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logit_bias": {"1": -200}}, "logit_bias"),
])
def test_completion_validation_errors(kwargs, param):
    with pytest.raises(BadRequestError) as info:
        CompletionRequest(**kwargs)
    assert info.value.param == param


def test_chat_completion_response_shape():
    resp = ChatCompletion(
        model="m",
        choices=[Choice(finish_reason="tool_calls", message=ChatCompletionMessage(
            content=None, tool_calls=[ChatCompletionMessageToolCall(function=Function(
                name="f", arguments='{"a": 1}'))]),
            logprobs=ChoiceLogprobs(content=[ChatCompletionTokenLogprob(
                token="x", logprob=-0.1, bytes=[120],
                top_logprobs=[TopLogprob(token="x", logprob=-0.1, bytes=[120])])]))],
        usage=CompletionUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5))
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.tool_calls[0].id.startswith("call_")
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.total_tokens == 5
    data = json.loads(resp.model_dump_json())
    assert data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert data["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "x"
    assert resp.model_dump()["created"] == resp.created


def test_chunk_and_completion_shape():
    chunk = ChatCompletionChunk(model="m", choices=[ChunkChoice(delta=Delta(
        role="assistant", content="He"))])
    assert chunk.choices[0].delta.content == "He" and chunk.object == "chat.completion.chunk"
    usage_chunk = ChatCompletionChunk(model="m", choices=[], usage=CompletionUsage(
        prompt_tokens=1, completion_tokens=1, total_tokens=2, extra={"ttft_s": 0.1}))
    assert usage_chunk.usage.extra["ttft_s"] == 0.1
    comp = Completion(model="m", choices=[CompletionChoice(
        text="hi", finish_reason="length", logprobs=CompletionLogprobs(
            tokens=["hi"], token_logprobs=[-0.5], top_logprobs=[{"hi": -0.5}], text_offset=[0]))])
    assert comp.id.startswith("cmpl-") and comp.object == "text_completion"
    assert json.loads(comp.model_dump_json())["choices"][0]["logprobs"]["tokens"] == ["hi"]


def test_model_validate_json_raises_bad_request():
    req = ChatCompletionRequest.model_validate_json(json.dumps({"messages": MSGS}))
    assert req.messages[0].text() == "Hello"
    with pytest.raises(BadRequestError) as info:
        ChatCompletionRequest.model_validate_json('{"messages": [], "n": 1}')
    assert info.value.param == "messages"


def test_generation_config_with_defaults():
    from mlc.support.chat_config import ChatConfig
    req = parse_chat_request(messages=MSGS, temperature=0.0)
    cfg = req.to_generation_config().with_defaults({"temperature": 0.6, "top_p": 0.9,
                                                     "repetition_penalty": 1.05})
    assert cfg.temperature == 0.0  # set by the request: kept
    assert (cfg.top_p, cfg.repetition_penalty) == (0.9, 1.05)
    assert (cfg.top_k, cfg.presence_penalty, cfg.frequency_penalty) == (0, 0.0, 0.0)
    chat_config = ChatConfig(model_type="llama", quantization="q0f32", model_config={},
                             vocab_size=10, context_window_size=8, prefill_chunk_size=8,
                             temperature=0.3, top_k=20)
    cfg = GenerationConfig().with_defaults(chat_config)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.3, 20, 1.0)
    assert GenerationConfig().with_defaults(None).temperature == 1.0


@pytest.mark.parametrize("kwargs, param", [
    ({"logit_bias": {10: 1.0}}, "logit_bias"),      # outside a vocabulary of 10
    ({"stop_token_ids": [99]}, "stop_token_ids"),
])
def test_generation_config_checks_against_the_model(kwargs, param):
    with pytest.raises(BadRequestError) as info:
        GenerationConfig(**kwargs).check_for_model(vocab_size=10)
    assert info.value.param == param
    GenerationConfig(**kwargs).check_for_model(vocab_size=100)


@pytest.mark.parametrize("kwargs, param", [
    ({"stop": ""}, "stop"), ({"stop": ["a", ""]}, "stop"), ({"stop_token_ids": [3, -1]},
                                                            "stop_token_ids"),
])
def test_protocol_is_the_one_validation(kwargs, param):
    with pytest.raises(BadRequestError) as info:
        parse_chat_request(messages=MSGS, **kwargs)
    assert info.value.param == param


def test_request_ids_are_given_once_by_the_protocol():
    a, b = parse_chat_request(messages=MSGS), parse_chat_request(messages=MSGS)
    assert a.request_id.startswith("chatcmpl-") and a.request_id != b.request_id
    assert parse_chat_request(messages=MSGS, request_id="mine").request_id == "mine"
    assert parse_completion_request(prompt="x").request_id.startswith("cmpl-")
    assert parse_chat_request(a) is a                  # a parsed request is not re-validated
