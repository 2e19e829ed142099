"""`mlc_llm.protocol` and `mlc_llm.testing`: the names MLC-LLM's serve tests import, with
MLC-LLM's documented fields and defaults, and the types the engine really returns."""

from __future__ import annotations

import inspect

import pytest
from pydantic import ValidationError

from mlc.errors import BadRequestError
from mlc_llm.protocol import debug_protocol, error_protocol, generation_config
from mlc_llm.protocol import openai_api_protocol as oai

MESSAGES = [{"role": "user", "content": "Hello"}]


def test_top_logprobs_limits_are_the_ones_enforced():
    assert (oai.CHAT_COMPLETION_MAX_TOP_LOGPROBS, oai.COMPLETION_MAX_TOP_LOGPROBS) == (20, 5)
    n = oai.CHAT_COMPLETION_MAX_TOP_LOGPROBS
    oai.ChatCompletionRequest(messages=MESSAGES, logprobs=True, top_logprobs=n)
    with pytest.raises(BadRequestError):
        oai.ChatCompletionRequest(messages=MESSAGES, logprobs=True, top_logprobs=n + 1)
    n = oai.COMPLETION_MAX_TOP_LOGPROBS
    oai.CompletionRequest(prompt="Hi", logprobs=n)
    with pytest.raises(BadRequestError):
        oai.CompletionRequest(prompt="Hi", logprobs=n + 1)


def test_request_types_under_mlc_llm_names():
    req = oai.ChatCompletionRequest(
        messages=[oai.ChatCompletionMessage(role="system", content="Be brief."),
                  oai.ChatCompletionMessage(role="user", content="Hi")],
        tools=[oai.ChatTool(type="function", function=oai.ChatFunction(
            name="get_weather", parameters={"type": "object"}))],
        stream=True, stream_options=oai.StreamOptions(include_usage=True),
        response_format=oai.RequestResponseFormat(type="json_object"))
    assert req.messages[1].text() == "Hi" and req.tools[0].function.name == "get_weather"
    assert req.to_generation_config().response_format == {"type": "json_object"}
    call = oai.ChatToolCall(function=oai.ChatFunctionCall(name="f", arguments={"x": 1}))
    assert call.function.arguments == '{"x": 1}'          # OpenAI's JSON string
    assert oai.CompletionRequest(prompt=[1, 2, 3], echo=True).prompt == [1, 2, 3]


def test_model_list_types():
    card = oai.ModelResponse(id="m")
    assert (card.object, card.owned_by) == ("model", "MLC-LLM") and card.created > 0
    assert oai.ListResponse(data=[card]).model_dump()["object"] == "list"


def test_debug_config_fields_and_defaults():
    cfg = debug_protocol.DebugConfig()
    assert cfg.model_dump() == {"ignore_eos": False, "pinned_system_prompt": False,
                                "special_request": None, "grammar_execution_mode":
                                "jump_forward", "disagg_config": None}
    assert debug_protocol.DebugConfig(special_request="query_engine_metrics").special_request
    with pytest.raises(ValidationError):
        debug_protocol.DebugConfig(grammar_execution_mode="fast")
    disagg = debug_protocol.DisaggConfig(kind="remote_send", kv_window_begin=0,
                                         kv_window_end=-1)
    assert debug_protocol.DebugConfig(disagg_config=disagg).disagg_config.kind == "remote_send"


def test_generation_config_defaults_and_mlc_conversion():
    G = generation_config.GenerationConfig
    cfg = G()
    assert (cfg.n, cfg.max_tokens, cfg.top_logprobs, cfg.logprobs, cfg.debug_config) == \
        (1, -1, 0, False, None)
    mlc = cfg.to_mlc()
    assert mlc.max_tokens is None and mlc.stop_strs == [] and mlc.logit_bias == {}
    mlc = G(n=2, temperature=0.5, top_p=0.9, max_tokens=16, seed=7, stop_strs=["\n"],
            stop_token_ids=[2], logit_bias={5: -100}, logprobs=True, top_logprobs=3,
            response_format={"type": "json_object"},
            debug_config={"ignore_eos": True, "grammar_execution_mode": "constraint"}).to_mlc()
    assert (mlc.n, mlc.temperature, mlc.top_p, mlc.max_tokens, mlc.seed) == (2, 0.5, 0.9, 16, 7)
    assert (mlc.stop_strs, mlc.stop_token_ids, mlc.logit_bias) == (["\n"], [2], {5: -100.0})
    assert (mlc.logprobs, mlc.top_logprobs, mlc.ignore_eos) == (True, 3, True)
    assert mlc.response_format == {"type": "json_object"}
    with pytest.raises(BadRequestError, match="temperature"):
        G(temperature=3).to_mlc()
    with pytest.raises(BadRequestError) as err:
        G(debug_config={"pinned_system_prompt": True}).to_mlc()
    assert err.value.param == "debug_config.pinned_system_prompt"
    with pytest.raises(BadRequestError, match="special_request"):
        G(debug_config={"special_request": "query_engine_metrics"}).to_mlc()


def test_bad_request_error_is_mlcs():
    assert error_protocol.BadRequestError is BadRequestError
    assert issubclass(BadRequestError, ValueError)       # as MLC-LLM's


def test_engine_returns_the_mlc_llm_types(tiny):
    from mlc_llm import MLCEngine

    engine = MLCEngine(str(tiny.mlc_dir), "cpu", model_lib=str(tiny.lib))
    try:
        resp = engine.chat.completions.create(messages=MESSAGES, max_tokens=3)
        assert isinstance(resp, oai.ChatCompletionResponse)
        assert isinstance(resp.choices[0], oai.ChatCompletionResponseChoice)
        assert isinstance(resp.usage, oai.CompletionUsage)
        chunks = list(engine.chat.completions.create(messages=MESSAGES, max_tokens=3,
                                                     stream=True, logprobs=True,
                                                     top_logprobs=2))
        assert all(isinstance(c, oai.ChatCompletionStreamResponse) for c in chunks)
        choice = next(c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs)
        assert isinstance(choice, oai.ChatCompletionStreamResponseChoice)
        assert isinstance(choice.logprobs, oai.LogProbs)
        assert isinstance(choice.logprobs.content[0], oai.LogProbsContent)
        assert isinstance(choice.logprobs.content[0].top_logprobs[0], oai.TopLogProbs)
        comp = engine.completions.create(prompt="Hello", max_tokens=2, logprobs=1)
        assert isinstance(comp, oai.CompletionResponse)
        assert isinstance(comp.choices[0], oai.CompletionResponseChoice)
        assert isinstance(comp.choices[0].logprobs, oai.CompletionLogProbs)
    finally:
        engine.terminate()


# ---------------------------------------------------------------------------------------------
# mlc_llm.testing


def test_require_test_model(tiny, tmp_path, monkeypatch):
    from mlc_llm.testing import find_test_model, require_test_model

    (tmp_path / "Tiny-MLC").symlink_to(tiny.mlc_dir)
    monkeypatch.setenv("MLC_LLM_TEST_MODEL_PATH", str(tmp_path))
    assert find_test_model("Tiny-MLC") == tmp_path / "Tiny-MLC"
    assert find_test_model(str(tiny.mlc_dir)) == tiny.mlc_dir       # a dir is used as it is

    @require_test_model("Tiny-MLC", str(tiny.mlc_dir))
    def test_two(model_a, model_b, some_fixture):
        return model_a, model_b, some_fixture

    # pytest sees only the test's own arguments, and the models come first
    assert list(inspect.signature(test_two).parameters) == ["some_fixture"]
    assert test_two(some_fixture=1) == (str(tmp_path / "Tiny-MLC"), str(tiny.mlc_dir), 1)
    [mark] = test_two.pytestmark
    assert mark.name == "skipif" and mark.args == (False,)

    @require_test_model("Llama-2-7b-chat-hf-q0f16-MLC")
    async def test_missing(model):
        return model

    [mark] = test_missing.pytestmark
    assert mark.args == (True,) and "MLC_LLM_TEST_MODEL_PATH" in mark.kwargs["reason"]
    assert inspect.iscoroutinefunction(test_missing)
