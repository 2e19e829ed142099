"""Prefix caching: outputs are the same with and without it, a shared prompt prefix is not
computed twice, and eviction under memory pressure never harms a running request.

The tiny random Llama of test_engine.py (float32, CPU) runs two engines: the default one
(prefix_cache_mode="radix") and one with prefix_cache_mode="disable" as the reference.
"""

from __future__ import annotations

import pytest
from helpers import tiny_llama_library
from test_engine import (
    LONG_PROMPT,
    OTHER_PROMPTS,
    assert_idle_and_freed,
    make_engine,
    stream_text,
)

from mlc.errors import ModelLoadError

SYSTEM = LONG_PROMPT[:150]     # a shared system prompt (~75 tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-prefix")
    return tiny_llama_library(tmp)


@pytest.fixture(scope="module")
def plain(tiny):
    eng = make_engine(tiny, prefix_cache_mode="disable")
    yield eng
    eng.terminate()


def with_system(user, **kwargs):
    return dict(messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": user}], **kwargs)


def run(engine, user, **kwargs):
    args = dict(temperature=0, max_tokens=12, ignore_eos=True)
    args.update(kwargs)
    return engine.chat.completions.create(**with_system(user, **args))


def texts(response):
    return [c.message.content for c in response.choices]


def test_unknown_prefix_cache_mode_is_refused(tiny):
    with pytest.raises(ModelLoadError, match="prefix_cache_mode"):
        make_engine(tiny, prefix_cache_mode="hash")


def test_shared_system_prompt_is_computed_once_and_outputs_match(tiny, plain):
    eng = make_engine(tiny)         # prefix caching is on by default
    try:
        initial = eng.stats().kv_pages_free
        first = run(eng, "The quick brown fox")
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        before = eng.stats().prefill_tokens
        second = run(eng, "A paged KV cache")
        computed = eng.stats().prefill_tokens - before
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 50                                    # the system prompt's tokens
        assert computed == second.usage.prompt_tokens - cached
        assert eng.stats().prefix_cached_tokens >= cached
        for user in ("The quick brown fox", "A paged KV cache"):
            assert texts(run(eng, user)) == texts(run(plain, user))
        # the same prompt again: all but its last token come from the cache
        again = run(eng, "A paged KV cache")
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert texts(again) == texts(second)
        # pages held only by cached prefixes count as free (they are evicted on demand)
        assert_idle_and_freed(eng, initial)
        assert eng.stats().prefix_cache_pages > 0
    finally:
        eng.terminate()


def test_multi_turn_chat_reuses_the_history(tiny, plain):
    eng = make_engine(tiny)
    try:
        history = [{"role": "system", "content": SYSTEM}]
        for turn in ("Hello there", "Tell me more", "And then?"):
            history.append({"role": "user", "content": turn})
            args = dict(messages=history, temperature=0, max_tokens=8, ignore_eos=True)
            got, want = eng.chat.completions.create(**args), plain.chat.completions.create(**args)
            assert texts(got) == texts(want)
            history.append({"role": "assistant", "content": texts(got)[0]})
        assert got.usage.prompt_tokens_details.cached_tokens > got.usage.prompt_tokens // 2
    finally:
        eng.terminate()


def test_n_choices_sampling_and_concurrency_match_the_plain_engine(tiny, plain):
    eng = make_engine(tiny)
    try:
        run(eng, "warm the cache")
        reqs = [dict(user=p, max_tokens=10) for p in OTHER_PROMPTS] + \
            [dict(user="Numbers: 0 1 2 3", n=3, temperature=1.0, seed=7, max_tokens=10)]
        want = [texts(run(plain, **r)) for r in reqs]
        streams = [eng.chat.completions.create(**with_system(
            r["user"], stream=True, ignore_eos=True,
            **{"temperature": 0, **{k: v for k, v in r.items() if k != "user"}}))
            for r in reqs]
        got = [stream_text(s) for s in streams]
        assert [[g[i] for i in sorted(g)] for g in got] == want
    finally:
        eng.terminate()


def test_eviction_under_memory_pressure_never_corrupts_a_running_request(tiny, plain):
    # 256 tokens = 16 pages, a request ~9: every request fills half the cache, so each admission and
    # step evicts cached prefixes (and preempts) while others run from shared pages.
    eng = make_engine(tiny, max_total_sequence_length=256)
    try:
        initial = eng.stats().kv_pages_free
        users = [p for p in OTHER_PROMPTS] + ["The quick brown fox jumps"]
        want = [texts(run(plain, u, max_tokens=40)) for u in users]
        for _ in range(2):
            streams = [eng.chat.completions.create(**with_system(
                u, stream=True, temperature=0, max_tokens=40, ignore_eos=True)) for u in users]
            got = [stream_text(s)[0] for s in streams]
            assert got == [w[0] for w in want]
        st = eng.stats()
        assert st.prefix_evictions > 0 and st.prefix_cached_tokens > 0
        assert_idle_and_freed(eng, initial)
    finally:
        eng.terminate()


def test_prompt_logprobs_are_computed_even_when_the_prompt_is_cached(tiny):
    eng = make_engine(tiny)
    try:
        prompt = SYSTEM + " The quick brown fox"
        plain_run = eng.completions.create(prompt=prompt, max_tokens=2, temperature=0)
        assert plain_run.usage.prompt_tokens_details.cached_tokens == 0
        scored = eng.completions.create(prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        lp = scored.choices[0].logprobs.token_logprobs
        assert lp[0] is None and all(v is not None for v in lp[1:])
        assert scored.usage.prompt_tokens_details.cached_tokens == 0
        assert eng.completions.create(prompt=prompt, max_tokens=2, temperature=0) \
            .usage.prompt_tokens_details.cached_tokens == plain_run.usage.prompt_tokens - 1
    finally:
        eng.terminate()
