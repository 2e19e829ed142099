"""MLCEngine behaviour on a tiny random Llama (real BPE tokenizer, ChatML template).

The model is random, so its text is noise: tests compare outputs with other outputs of the
same engine (greedy runs alone vs. batched, chunked vs. not, ...), with transformers' logits,
and with what the OpenAI surface promises (shapes, usage, finish reasons, errors).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import numpy as np
import pytest
from helpers import hf_logits, tiny_llama_library

from mlc.errors import (
    BadRequestError,
    ContextWindowExceededError,
    EngineTerminatedError,
    ModelLoadError,
)
from mlc.runtime.engine import EngineConfig, MLCEngine

PROMPT = "Hello, world! How are you today?"
LONG_PROMPT = ("The quick brown fox jumps over the lazy dog. Machine learning compilers turn "
               "models into fast kernels. A paged KV cache stores keys and values in fixed-size "
               "pages. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024. def add(a, b): return a + b")
OTHER_PROMPTS = ["The quick brown fox", "A paged KV cache", "Numbers: 0 1 2 3", "def add(a, b):"]
EOS_ID = 2   # <|im_end|> of the tiny tokenizer


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, mlc_dir, lib) of the tiny random Llama, float32 weights."""
    tmp = tmp_path_factory.mktemp("tiny-engine")
    return tiny_llama_library(tmp)


def make_engine(tiny, **kwargs) -> MLCEngine:
    _, mlc_dir, lib = tiny
    return MLCEngine(str(mlc_dir), "cpu", model_lib=str(lib), **kwargs)


@pytest.fixture(scope="module")
def engine(tiny):
    """The shared engine (local mode: 4 sequences, 256-token context and chunk)."""
    eng = make_engine(tiny)
    eng.initial_free_pages = eng.stats().kv_pages_free
    yield eng
    eng.terminate()


# ------------------------------------------------------------------------------ helpers


def msgs(content=PROMPT):
    return [{"role": "user", "content": content}]


def chat(engine, content=PROMPT, **kwargs):
    """A greedy, EOS-ignoring chat request (any argument may be overridden)."""
    args = dict(messages=msgs(content), temperature=0, max_tokens=16, ignore_eos=True)
    args.update(kwargs)
    return engine.chat.completions.create(**args)


def content(response, index=0) -> str:
    return response.choices[index].message.content


def stream_text(chunks) -> dict[int, str]:
    """Concatenated delta content per choice index."""
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] = out.get(c.index, "") + (c.delta.content or "")
    return out


def generated_ids(engine, prompt, **kwargs) -> list[int]:
    """The token ids a completion request generates (the OpenAI shapes carry only strings,
    so this reads the engine's own outputs)."""
    args = dict(temperature=0, max_tokens=16, ignore_eos=True)
    args.update(kwargs)
    return [t for out in engine.generate(prompt, **args) for d in out.deltas
            for t in d.token_ids]


def chatml_ids(engine, messages) -> list[int]:
    """The prompt written out by hand (not through the engine's template code)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return engine.tokenizer.encode(text + "<|im_start|>assistant\n",
                                   add_special_tokens=False).ids


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def idle(engine) -> bool:
    stats = engine.stats()
    return stats.running_requests == 0 and stats.waiting_requests == 0


def assert_idle_and_freed(engine, initial_pages: int) -> None:
    """Every request is gone from the loop and every KV page is free again."""
    wait_until(lambda: idle(engine), what="the engine to go idle")
    wait_until(lambda: engine.stats().kv_pages_free == initial_pages,
               what=f"KV pages to be freed ({engine.stats().kv_pages_free} != {initial_pages})")


# ------------------------------------------------------------------------------ API shapes


def test_mlc_llm_alias_exports_the_engines():
    import mlc_llm
    from mlc.runtime.engine import AsyncMLCEngine
    from mlc_llm import MLCEngine as AliasEngine
    from mlc_llm.serve import AsyncMLCEngine as AliasAsync
    from mlc_llm.serve import EngineConfig as AliasConfig
    from mlc_llm.serve.config import EngineConfig as ConfigModule
    assert AliasEngine is MLCEngine and AliasAsync is AsyncMLCEngine
    assert AliasConfig is EngineConfig and mlc_llm.MLCEngine is MLCEngine
    assert ConfigModule is EngineConfig


def test_non_stream_response_has_openai_shape(engine):
    from openai.types.chat import ChatCompletion

    r = chat(engine, max_tokens=5)
    parsed = ChatCompletion.model_validate(r.model_dump())   # the openai package's own type
    assert parsed.id == r.id and r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion" and isinstance(r.created, int)
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].message.role == "assistant"
    assert isinstance(content(r), str) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert json.loads(r.model_dump_json())["choices"][0]["message"]["content"] == content(r)


def test_stream_chunks_have_openai_shape(engine):
    from openai.types.chat import ChatCompletionChunk

    chunks = list(chat(engine, max_tokens=8, stream=True))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for c in chunk.choices:
            assert isinstance(c.delta.content, str)   # MLC-LLM's examples concatenate them
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    # the role in every chunk, as MLC-LLM sends it (OpenAI's clients accept either)
    assert all(c.delta.role == "assistant" for ch in chunks for c in ch.choices)
    reasons = [c.finish_reason for ch in chunks for c in ch.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert stream_text(chunks)[0] == content(chat(engine, max_tokens=8))


def test_stream_include_usage_adds_a_final_usage_chunk(engine):
    chunks = list(chat(engine, max_tokens=6, stream=True,
                       stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    whole = chat(engine, max_tokens=6)
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert last.usage.completion_tokens == 6


def test_completions_api_shapes(engine):
    from openai.types import Completion

    r = engine.completions.create(prompt="The quick brown fox", max_tokens=6, temperature=0,
                                  ignore_eos=True)
    Completion.model_validate(r.model_dump())
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chunks = list(engine.completions.create(prompt="The quick brown fox", max_tokens=6,
                                            temperature=0, ignore_eos=True, stream=True))
    # (openai's Completion type insists on a finish_reason, which mid-stream chunks lack)
    Completion.model_validate(chunks[-1].model_dump())
    assert all(set(c.model_dump()) == set(r.model_dump()) for c in chunks)
    assert "".join(c.text for ch in chunks for c in ch.choices) == r.choices[0].text


def test_model_id_is_the_dir_name_or_the_served_name(tiny, engine):
    _, mlc_dir, _ = tiny
    assert engine.model_id == mlc_dir.name and "/" not in engine.model_id
    assert chat(engine, max_tokens=1).model == mlc_dir.name
    for name in (mlc_dir.name, str(mlc_dir), None):
        assert engine.serves_model(name)
    assert not engine.serves_model("gpt-4o")
    named = make_engine(tiny, served_model_name="tiny-chat")
    try:
        r = chat(named, max_tokens=1, model="tiny-chat")
        assert named.model_id == r.model == "tiny-chat"
        with pytest.raises(BadRequestError) as e:
            chat(named, max_tokens=1, model="other")
        assert e.value.code == "model_not_found" and "tiny-chat" in e.value.message
    finally:
        named.terminate()


def test_request_ids(engine):
    r = chat(engine, max_tokens=2, request_id="my-request-1")
    assert r.id == "my-request-1"
    chunks = list(chat(engine, max_tokens=2, stream=True, request_id="my-request-2"))
    assert {c.id for c in chunks} == {"my-request-2"}
    a, b = chat(engine, max_tokens=1), chat(engine, max_tokens=1)
    assert a.id != b.id and a.id.startswith("chatcmpl-")


def test_usage_counts(engine):
    r = chat(engine, max_tokens=7)
    assert r.usage.prompt_tokens == len(chatml_ids(engine, msgs()))
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (7, r.usage.prompt_tokens + 7)
    ids = [5, 17, 42, 99, 120, 7]
    c = engine.completions.create(prompt=ids, max_tokens=3, temperature=0, ignore_eos=True)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (6, 3, 9)
    n3 = chat(engine, max_tokens=4, n=3)
    assert n3.usage.completion_tokens == 12   # every choice counts


# ------------------------------------------------------------------------------ messages


def test_string_and_text_part_content_are_the_same_prompt(engine):
    parts = [{"type": "text", "text": "Hello, world!"}, {"type": "text", "text": "How are you?"}]
    a = chat(engine, content=parts)
    b = chat(engine, content="Hello, world!\nHow are you?")
    assert content(a) == content(b) and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_all_roles_are_rendered(engine):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "Calling add."},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks!"},
    ]
    r = engine.chat.completions.create(messages=messages, temperature=0, max_tokens=4,
                                       ignore_eos=True)
    # SmolLM2's template has no tool role: a tool result goes in the default tool format, a
    # user turn holding <tool_response> (mlc.runtime.tool_calls)
    by_hand = messages[:3] + [{"role": "user", "content": "<tool_response>\n5\n</tool_response>"},
                              messages[4]]
    assert r.usage.prompt_tokens == len(chatml_ids(engine, by_hand))
    assert r.usage.prompt_tokens > chat(engine, content="Thanks!", max_tokens=1).usage.prompt_tokens
    # An assistant turn that only carries tool calls is accepted too.
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]
    messages[2] = {"role": "assistant", "content": None, "tool_calls": calls}
    r = engine.chat.completions.create(messages=messages, temperature=0, max_tokens=2,
                                       ignore_eos=True)
    assert r.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------ sampling


def test_greedy_is_deterministic_and_top_k_1_or_tiny_top_p_is_greedy(engine):
    greedy = content(chat(engine, max_tokens=24))
    assert content(chat(engine, max_tokens=24)) == greedy
    hot = dict(temperature=1.0, seed=11, max_tokens=24)
    assert content(chat(engine, top_k=1, **hot)) == greedy
    assert content(chat(engine, top_p=1e-6, **hot)) == greedy
    assert content(chat(engine, **hot)) != greedy
    assert content(chat(engine, top_k=3, **hot)) != content(chat(engine, top_k=0, **hot))
    assert content(chat(engine, top_p=0.5, **hot)) != content(chat(engine, top_p=1.0, **hot))


def test_temperature_changes_the_distribution(engine):
    """Low temperature concentrates on the greedy token, high temperature spreads out."""
    greedy = generated_ids(engine, PROMPT, max_tokens=1)[0]

    def hits(temperature):
        return sum(generated_ids(engine, PROMPT, max_tokens=1, temperature=temperature,
                                 seed=seed)[0] == greedy for seed in range(30))

    low, high = hits(0.05), hits(2.0)
    assert low >= 27 and high <= 15, (low, high)


def test_seed_determinism(engine):
    hot = dict(temperature=1.0, max_tokens=24)
    a = content(chat(engine, seed=1234, **hot))
    assert content(chat(engine, seed=1234, **hot)) == a
    assert content(chat(engine, seed=1235, **hot)) != a
    # Through the streaming path too, and per choice for n > 1.
    assert stream_text(chat(engine, seed=1234, stream=True, **hot))[0] == a
    two = chat(engine, seed=99, n=2, **hot)
    assert stream_text(chat(engine, seed=99, n=2, stream=True, **hot)) == \
        {0: content(two, 0), 1: content(two, 1)}


def test_n_choices(engine):
    r = chat(engine, n=3, temperature=1.0, seed=5, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3
    g = chat(engine, n=3, max_tokens=16)
    assert [c.message.content for c in g.choices] == [content(chat(engine, max_tokens=16))] * 3
    assert all(c.finish_reason == "length" for c in g.choices)


def test_penalties_change_outputs(engine):
    base_ids = generated_ids(engine, PROMPT, max_tokens=48)
    assert len(set(base_ids)) < len(base_ids), "needs a greedy output that repeats a token"
    for penalty in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0),
                    dict(repetition_penalty=1.5)):
        ids = generated_ids(engine, PROMPT, max_tokens=48, **penalty)
        assert ids != base_ids, penalty
    # A strong presence penalty makes repeats rarer.
    ids = generated_ids(engine, PROMPT, max_tokens=48, presence_penalty=2.0)
    assert len(set(ids)) > len(set(base_ids))


def test_logit_bias(engine):
    first = generated_ids(engine, PROMPT, max_tokens=1)[0]
    banned = generated_ids(engine, PROMPT, max_tokens=1, logit_bias={first: -100})
    assert banned[0] != first
    forced = 200
    assert generated_ids(engine, PROMPT, max_tokens=6, logit_bias={forced: 100}) == [forced] * 6
    r = chat(engine, max_tokens=6, logit_bias={str(forced): 100})   # JSON-style string keys
    assert content(r) == engine.tokenizer.decode([forced] * 6)


def test_chat_logprobs_are_sorted_and_consistent(engine):
    r = chat(engine, max_tokens=12, logprobs=True, top_logprobs=5)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 12
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e.logprob <= 0 and sum(math.exp(v) for v in tops) <= 1 + 1e-5
        # greedy: the chosen token is the most likely one
        assert (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
        assert e.bytes == list(e.token.encode())
    assert "".join(e.token for e in entries) == content(r)
    sampled = chat(engine, max_tokens=12, logprobs=True, top_logprobs=3, temperature=1.5,
                   seed=3).choices[0].logprobs.content
    for e in sampled:
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6
        if e.logprob >= e.top_logprobs[-1].logprob - 1e-6:
            assert any(t.token == e.token and abs(t.logprob - e.logprob) < 1e-5
                       for t in e.top_logprobs)
    assert chat(engine, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_match_transformers(engine, tiny):
    hf_model = tiny[0]
    prompt = [10, 50, 120, 7, 33, 250]
    ids = generated_ids(engine, prompt, max_tokens=8)
    r = engine.completions.create(prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    logits = hf_logits(hf_model, prompt + ids)[len(prompt) - 1: -1].astype(np.float64)
    m = logits.max(-1, keepdims=True)                                     # [8, vocab]
    ref = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))   # log-softmax
    assert ids == [int(i) for i in ref.argmax(-1)]
    np.testing.assert_allclose(lp.token_logprobs, ref[np.arange(8), ids], atol=2e-3)
    assert lp.tokens == [engine.tokenizer.decode([i]) for i in ids]
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


# ------------------------------------------------------------------------------ stopping


def _split_stop_string(engine, prompt):
    """(stop string spanning two generated tokens, position of its first occurrence, index of
    the token that completes it, full greedy text), from the engine's own greedy output."""
    r = engine.completions.create(prompt=prompt, max_tokens=40, temperature=0, ignore_eos=True,
                                  logprobs=0)
    full, toks = r.choices[0].text, r.choices[0].logprobs.tokens
    for i in range(1, len(toks)):
        left, right = toks[i - 1], toks[i]
        if not left or not right or "\ufffd" in left + right:
            continue
        before = "".join(toks[:i])
        if not full.startswith(before + right):
            continue
        stop = left[-2:] + right[:2]
        pos = len(before) - len(left[-2:])
        if full.find(stop) == pos:
            return stop, pos, i, full
    pytest.fail(f"no clean token boundary in the greedy output {toks}")


def test_stop_string_split_across_tokens_never_leaks(engine):
    stop, pos, token_index, full = _split_stop_string(engine, "The quick brown fox")
    args = dict(prompt="The quick brown fox", max_tokens=40, temperature=0, ignore_eos=True,
                stop=["zzz-never", stop])
    r = engine.completions.create(**args)
    assert r.choices[0].text == full[:pos] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == token_index + 1
    deltas = [c.text for ch in engine.completions.create(stream=True, **args) for c in ch.choices]
    assert "".join(deltas) == full[:pos]
    assert not any(stop in d for d in deltas)


def test_stop_string_in_chat_stream(engine):
    greedy = content(chat(engine, max_tokens=24))
    clean = [i for i in range(1, len(greedy) - 3) if "\ufffd" not in greedy[i:i + 3]]
    start = clean[len(clean) // 2]
    stop = greedy[start:start + 3]
    first = greedy.find(stop)
    chunks = list(chat(engine, max_tokens=24, stream=True, stop=stop))
    assert stream_text(chunks)[0] == greedy[:first]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert content(chat(engine, max_tokens=24, stop=stop)) == greedy[:first]


def test_stop_token_ids(engine):
    ids = generated_ids(engine, PROMPT, max_tokens=16)
    k = next(k for k in range(3, 16) if ids[k] not in ids[:k])
    r = engine.completions.create(prompt=PROMPT, max_tokens=16, temperature=0, ignore_eos=True,
                                  stop_token_ids=[ids[k]])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == engine.tokenizer.decode(ids[:k])
    assert r.usage.completion_tokens == k + 1       # the stop token was generated


def test_eos_and_ignore_eos(engine):
    forced_eos = {EOS_ID: 100}
    r = chat(engine, max_tokens=8, ignore_eos=False, logit_bias=forced_eos)
    assert r.choices[0].finish_reason == "stop" and content(r) == ""
    assert r.usage.completion_tokens == 1
    r = chat(engine, max_tokens=8, ignore_eos=True, logit_bias=forced_eos)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


def test_max_tokens_and_max_completion_tokens(engine):
    for kwargs, expected in ((dict(max_tokens=5), 5), (dict(max_completion_tokens=7), 7),
                             (dict(max_tokens=5, max_completion_tokens=3), 3)):
        args = dict(messages=msgs(), temperature=0, ignore_eos=True, **kwargs)
        r = engine.chat.completions.create(**args)
        assert r.usage.completion_tokens == expected, kwargs
        assert r.choices[0].finish_reason == "length"
    # Without a limit, generation ends at the context window with "length".
    r = engine.chat.completions.create(messages=msgs(), temperature=0, ignore_eos=True)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == engine.limits.context_window_size


def test_incremental_detokenization_never_splits_utf8(engine):
    """Bias the model towards the two byte tokens of "é" (C3 A9): random mixes of them hold
    complete characters and stray bytes; streamed deltas must add up to the full decode."""
    byte_ids = [engine.tokenizer.token_to_id(c) for c in ("Ã", "©")]   # bytes C3, A9
    bias = {i: 100 for i in byte_ids}
    for seed in range(3):
        args = dict(max_tokens=40, temperature=1.0, seed=seed, logit_bias=bias)
        ids = generated_ids(engine, chatml_ids(engine, msgs()), **args)   # the chat prompt
        assert set(ids) == set(byte_ids)
        full = engine.tokenizer.decode(ids)
        assert "é" in full
        deltas = [c.delta.content for ch in chat(engine, stream=True, **args)
                  for c in ch.choices]
        assert all(isinstance(d, str) for d in deltas)
        assert "".join(deltas) == full   # a naive per-token decode gives "\ufffd\ufffd"


# ------------------------------------------------------------------------------ batching


def test_concurrent_requests_batch_and_match_running_alone(engine):
    prompts = OTHER_PROMPTS
    alone = [content(chat(engine, content=p, max_tokens=20)) for p in prompts]
    steps_before = engine.stats().decode_steps
    streams = [chat(engine, content=p, max_tokens=20, stream=True) for p in prompts]
    together = [stream_text(s)[0] for s in streams]       # all submitted before reading
    assert together == alone
    steps = engine.stats().decode_steps - steps_before
    assert steps < 2 * 19, f"{steps} decode steps for 4 x 19 tokens: not batched"
    assert_idle_and_freed(engine, engine.initial_free_pages)


def test_chunked_prefill_matches_one_chunk(tiny, engine):
    whole = content(chat(engine, content=LONG_PROMPT, max_tokens=24))
    small = make_engine(tiny, prefill_chunk_size=16, enable_tracing=True)
    try:
        assert small.limits.prefill_chunk_size == 16
        r = chat(small, content=LONG_PROMPT, max_tokens=24, request_id="long")
        assert content(r) == whole
        chunks = [e["args"]["tokens"] for e in small.tracer.request_events("long")
                  if e["name"] == "prefill_chunk"]
        assert sum(chunks) == r.usage.prompt_tokens and max(chunks) == 16
        assert len(chunks) == math.ceil(r.usage.prompt_tokens / 16)
        # Two prompts prefilled in shared chunks (batch_prefill) still match.
        streams = [chat(small, content=p, max_tokens=12, stream=True)
                   for p in (LONG_PROMPT, PROMPT)]
        texts = [stream_text(s)[0] for s in streams]
        assert texts == [content(chat(engine, content=p, max_tokens=12))
                         for p in (LONG_PROMPT, PROMPT)]
    finally:
        small.terminate()


def test_kv_cache_full_preempts_and_still_completes_correctly(tiny):
    eng = make_engine(tiny, max_total_sequence_length=128)
    try:
        initial = eng.stats().kv_pages_free
        requests = [dict(content=p, max_tokens=60) for p in OTHER_PROMPTS] + \
            [dict(content=PROMPT, max_tokens=20, n=2, temperature=1.0, seed=4)]
        # (each request fits alone, also the n=2 one after a preemption, when its two
        # choices are recomputed without sharing the prompt's pages: 2 x 61 tokens)
        alone = [{i: c.message.content for i, c in enumerate(chat(eng, **r).choices)}
                 for r in requests]
        assert eng.stats().preemptions == 0
        streams = [chat(eng, stream=True, **r) for r in requests]
        together = [stream_text(s) for s in streams]
        assert eng.stats().preemptions > 0
        assert together == alone
        assert_idle_and_freed(eng, initial)
    finally:
        eng.terminate()


def test_choices_of_one_request_outgrowing_the_cache_end_with_length(tiny, engine):
    full = content(chat(engine, max_tokens=80))
    eng = make_engine(tiny, max_total_sequence_length=128)
    try:
        initial = eng.stats().kv_pages_free
        r = chat(eng, max_tokens=80, n=3)   # 3 x 121 tokens do not fit 128 (nothing to preempt)
        assert [c.finish_reason for c in r.choices] == ["length"] * 3
        assert r.usage.completion_tokens < 3 * 80
        for c in r.choices:
            assert full.startswith(c.message.content)
        assert_idle_and_freed(eng, initial)
        assert content(chat(eng, max_tokens=4)) == full[:len(content(chat(eng, max_tokens=4)))]
    finally:
        eng.terminate()


# ------------------------------------------------------------------------------ abort / terminate


def test_abort_mid_stream_frees_pages_and_spares_others(engine, slow_decode):
    other_alone = content(chat(engine, content="The quick brown fox", max_tokens=30))
    slow_decode(engine)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "other", chat(engine, content="The quick brown fox", max_tokens=30)))
    stream = chat(engine, max_tokens=200, stream=True, request_id="to-abort")
    worker.start()
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            engine.abort("to-abort")
    worker.join(30)
    reasons = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert reasons == ["abort"] and len(chunks) < 100
    assert content(result["other"]) == other_alone
    assert result["other"].choices[0].finish_reason == "length"
    assert_idle_and_freed(engine, engine.initial_free_pages)


def test_closing_a_stream_early_aborts_it(engine, slow_decode):
    slow_decode(engine)
    stream = chat(engine, max_tokens=200, stream=True, request_id="closed-early")
    next(stream)
    stream.close()
    assert_idle_and_freed(engine, engine.initial_free_pages)
    assert engine.stats().decode_tokens > 0


def test_abort_of_unknown_or_finished_request_is_harmless(engine):
    r = chat(engine, max_tokens=3, request_id="done-already")
    engine.abort("done-already")
    engine.abort("never-existed")
    assert content(chat(engine, max_tokens=3)) == content(r)


def test_terminate(tiny, slow_decode):
    eng = make_engine(tiny)
    slow_decode(eng)
    stream = chat(eng, max_tokens=200, stream=True)
    next(stream)
    eng.terminate()
    with pytest.raises(EngineTerminatedError):
        for _ in stream:
            pass
    with pytest.raises(EngineTerminatedError):
        chat(eng)
    with pytest.raises(EngineTerminatedError):
        eng.completions.create(prompt="hi", max_tokens=1)
    eng.terminate()   # twice is fine
    with make_engine(tiny) as ctx:
        assert content(chat(ctx, max_tokens=2))
    with pytest.raises(EngineTerminatedError):
        chat(ctx, max_tokens=2)


# ------------------------------------------------------------------------------ tracing


def test_tracing_records_events_and_saves_chrome_trace(tiny, tmp_path):
    eng = make_engine(tiny, enable_tracing=True)
    try:
        streams = [chat(eng, content=p, max_tokens=8, stream=True, request_id=f"r{i}")
                   for i, p in enumerate(OTHER_PROMPTS[:3])]
        for s in streams:
            list(s)
        for i in range(3):
            names = [e["name"] for e in eng.tracer.request_events(f"r{i}")]
            assert names[0] == "queued" and names[-1] == "finished"
            for expected in ("admitted", "prefill_chunk", "first_token", "decode"):
                assert expected in names, (expected, names)
            assert names.index("prefill_chunk") < names.index("first_token") \
                < names.index("decode")
            assert names.count("decode") == 7
        sizes = [e["args"]["batch_size"] for e in eng.tracer.request_events("engine")
                 if e["name"] == "decode"]
        assert max(sizes) > 1 and sum(sizes) == 3 * 7
        path = eng.save_trace(tmp_path / "trace.json")
        trace = json.loads(path.read_text())
        events = trace["traceEvents"]
        assert len(events) == len(eng.tracer.events) > 0
        names = {}   # tid -> thread name, from the metadata events
        for e in events:
            assert isinstance(e["name"], str) and e["ph"] in ("i", "C", "M")
            assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
            if e["ph"] == "M":
                assert e["name"] == "thread_name" and e["tid"] not in names
                names[e["tid"]] = e["args"]["name"]
                continue
            assert e["tid"] in names                      # named before its first event
            assert isinstance(e["ts"], (int, float))
            assert e["ph"] != "C" or all(isinstance(v, (int, float))
                                         for v in e["args"].values())
        assert {"engine", "r0", "r1", "r2"} <= set(names.values())
        stamps = [e["ts"] for e in events if e["ph"] != "M"]
        assert stamps == sorted(stamps)
    finally:
        eng.terminate()
    off = make_engine(tiny)
    try:
        chat(off, max_tokens=2)
        assert off.tracer.events == []
    finally:
        off.terminate()


# ------------------------------------------------------------------------------ modes and plan


def test_verbose_logs_the_memory_plan(tiny, caplog):
    with caplog.at_level(logging.INFO):
        eng = make_engine(tiny, verbose=True)
    eng.terminate()
    log = caplog.text
    for term in ("memory plan (mode=local)", "device memory", "utilization", "weights",
                 "activations", "KV cache", "B/token", "headroom", "max_batch_size=4",
                 "prefill_chunk_size=256", "context_window_size=256"):
        assert term in log, term


def test_modes_and_explicit_overrides(tiny):
    from mlc.runtime.memory_plan import host_memory_bytes

    def plan(**kwargs):
        eng = make_engine(tiny, **kwargs)
        eng.terminate()
        p = eng.memory_plan
        return p.max_batch_size, p.max_total_sequence_length, p.prefill_chunk_size, p

    ctx = 256   # the tiny model's context window (= its compiled prefill chunk)
    assert plan(mode="local")[:3] == (4, ctx, ctx)
    assert plan(mode="interactive")[:3] == (1, ctx, ctx)
    assert plan(mode="interactive", max_batch_size=2, max_total_sequence_length=128,
                prefill_chunk_size=32)[:3] == (2, 128, 32)
    assert plan(engine_config=EngineConfig(mode="interactive", max_batch_size=3))[:3] == \
        (3, ctx, ctx)
    # server: the library's batch bound, and as many KV tokens as the memory budget allows, up
    # to a full context window per sequence (64 x 256 = 16384 here); a utilization that leaves
    # room for about 64k tokens hits that cap, one for about 8k tokens does not.
    probe = plan(mode="interactive")[3]
    util = (probe.weight_bytes + probe.activation_bytes
            + 65536 * probe.kv_bytes_per_token) / host_memory_bytes()
    batch, total, chunk, p = plan(mode="server", gpu_memory_utilization=util)
    assert (batch, chunk) == (64, ctx) and total == 64 * ctx and p.context_window_size == ctx
    small = (probe.weight_bytes + probe.activation_bytes
             + 8192 * probe.kv_bytes_per_token) / host_memory_bytes()
    batch, total, chunk, p = plan(mode="server", gpu_memory_utilization=small)
    budget = int(p.device_bytes * small) - p.weight_bytes - p.activation_bytes
    assert total == budget // p.kv_bytes_per_token and 4000 < total < 16384


def test_max_batch_size_above_library_bound_is_refused(tiny):
    with pytest.raises(ModelLoadError) as e:
        make_engine(tiny, max_batch_size=65)
    assert e.value.param == "max_batch_size" and "64" in e.value.message
    with pytest.raises(ModelLoadError) as e:
        make_engine(tiny, mode="turbo")
    assert e.value.param == "mode"


# ------------------------------------------------------------------------------ bad input


BAD_REQUESTS = [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": 123}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content"),
    (dict(messages=msgs("hello " * 300)), "messages"),
    (dict(messages=msgs(), max_tokens=0), "max_tokens"),
    (dict(messages=msgs(), max_tokens=250), "max_tokens"),
    (dict(messages=msgs(), temperature=-0.5), "temperature"),
    (dict(messages=msgs(), top_p=0), "top_p"),
    (dict(messages=msgs(), top_p=1.5), "top_p"),
    (dict(messages=msgs(), n=0), "n"),
    (dict(messages=msgs(), n=5), "n"),   # more choices than max_batch_size: never admitted
    (dict(messages=msgs(), model="gpt-4o"), "model"),
    # a grammar that cannot be enforced is refused, never answered with free text
    (dict(messages=msgs(), response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}),
     "response_format.json_schema.schema"),
    (dict(messages=msgs(), response_format={"type": "json_object", "schema": "{oops"}),
     "response_format.schema"),
    (dict(messages=msgs(), response_format={"type": "regex", "regex": "(unclosed"}),
     "response_format.regex"),
    (dict(messages=msgs(), logit_bias={"999": 5}), "logit_bias"),
    (dict(messages=msgs(), stream_options={"include_usage": True}), "stream_options"),
]


def test_bad_requests_fail_before_any_work_and_spare_running_requests(engine, slow_decode):
    other_alone = content(chat(engine, max_tokens=40))
    slow_decode(engine, 0.02)
    running = chat(engine, max_tokens=40, stream=True)
    first = next(running)
    for request, param in BAD_REQUESTS:
        # (streams first: a request the engine wrongly accepts then fails fast, not hangs)
        for stream in (True, False) if param != "stream_options" else (False,):
            with pytest.raises(BadRequestError) as e:
                engine.chat.completions.create(stream=stream, **request)
            err = e.value
            assert err.param == param, (request, err.param, err.message)
            assert err.message and param.split("[")[0].split(".")[0] in err.message \
                or isinstance(err, ContextWindowExceededError), err.message
            body = err.to_openai()["error"]
            assert body["type"] == "invalid_request_error" and body["param"] == param
            stats = engine.stats()       # nothing queued; the good one is still going
            assert (stats.running_requests, stats.waiting_requests) == (1, 0), request
    rest = stream_text(running)[0]
    assert (first.choices[0].delta.content or "") + rest == other_alone
    assert_idle_and_freed(engine, engine.initial_free_pages)


def test_context_window_error_is_openai_shaped(engine):
    with pytest.raises(ContextWindowExceededError) as e:
        chat(engine, content="hello " * 300)
    prompt = len(chatml_ids(engine, msgs("hello " * 300)))
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert e.value.message == (   # OpenAI's wording, which LiteLLM and LangChain recognise
        f"This model's maximum context length is 256 tokens. However, you requested "
        f"{prompt + 16} tokens ({prompt} in the messages, 16 in the completion). Please reduce "
        "the length of the messages or completion.")
    with pytest.raises(ContextWindowExceededError) as e:
        engine.completions.create(prompt=[5] * 200, max_tokens=100)
    assert e.value.param == "max_tokens" and "you requested 300 tokens (200 in the prompt, " \
        "100 in the completion)" in e.value.message
    with pytest.raises(BadRequestError) as e:
        engine.completions.create(prompt=[1000], max_tokens=1)
    assert e.value.param == "prompt"


def test_unknown_request_fields_are_ignored_with_a_warning(engine, caplog):
    with caplog.at_level(logging.WARNING):
        r = chat(engine, max_tokens=2, frobnicate=True)
    assert r.choices[0].finish_reason == "length" and "frobnicate" in caplog.text
