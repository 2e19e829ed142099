"""AsyncMLCEngine on the tiny random Llama: concurrency, batching, abort, cancel, terminate."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import tiny_llama_library

from mlc.errors import BadRequestError, EngineTerminatedError
from mlc.runtime.engine import AsyncMLCEngine

PROMPTS = ["The quick brown fox", "A paged KV cache", "Numbers: 0 1 2 3", "def add(a, b):",
           "Hello, world!", "Machine learning compilers"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-async")
    _, mlc_dir, lib = tiny_llama_library(tmp)
    return mlc_dir, lib


def make_engine(tiny, **kwargs) -> AsyncMLCEngine:
    mlc_dir, lib = tiny
    return AsyncMLCEngine(model=str(mlc_dir), device="cpu", model_lib=str(lib), **kwargs)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = make_engine(tiny, max_batch_size=8, max_total_sequence_length=2048,
                      enable_tracing=True)
    eng.initial_free_pages = eng.stats().kv_pages_free
    yield eng
    eng.terminate()


def args(prompt, **kwargs):
    out = dict(messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16,
               ignore_eos=True)
    out.update(kwargs)
    return out


async def stream_text(engine, **kwargs) -> tuple[str, str | None]:
    """(concatenated content, last finish_reason) of one streamed chat request."""
    text, reason = "", None
    async for chunk in await engine.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


async def wait_idle_and_freed(engine, initial_pages, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.running_requests, stats.waiting_requests, stats.kv_pages_free) == \
                (0, 0, initial_pages):
            return
        assert time.monotonic() < deadline, f"engine not idle: {stats}, {initial_pages} pages"
        await asyncio.sleep(0.01)


def test_concurrent_requests_are_batched_and_match_running_alone(engine):
    async def main():
        alone = []
        steps0 = engine.stats().decode_steps
        for p in PROMPTS:
            r = await engine.chat.completions.create(**args(p, max_tokens=24))
            alone.append(r.choices[0].message.content)
        sequential_steps = engine.stats().decode_steps - steps0
        n_events = len(engine.tracer.events)
        steps1 = engine.stats().decode_steps
        together = await asyncio.gather(*[stream_text(engine, **args(p, max_tokens=24))
                                          for p in PROMPTS])
        concurrent_steps = engine.stats().decode_steps - steps1
        return alone, sequential_steps, together, concurrent_steps, n_events

    alone, sequential_steps, together, concurrent_steps, n_events = asyncio.run(main())
    assert [t for t, _ in together] == alone
    assert all(reason == "length" for _, reason in together)
    assert sequential_steps == len(PROMPTS) * 23
    assert concurrent_steps < sequential_steps / 3, (concurrent_steps, sequential_steps)
    sizes = [e["args"]["batch_size"] for e in engine.tracer.events[n_events:]
             if e["ph"] == "C" and e["name"] == "decode"]
    # (each prompt ran alone first, so the prefix cache holds all but its last token, which
    # is computed by a one-token decode step that samples the first token: 24 steps each)
    assert max(sizes) == len(PROMPTS) and sum(sizes) == len(PROMPTS) * 24
    assert engine.stats().preemptions == 0


def test_async_response_shapes(engine):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    async def main():
        r = await engine.chat.completions.create(**args("Hello, world!", max_tokens=5, n=2))
        chunks = [c async for c in await engine.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **args("Hello, world!"))]
        c = await engine.completions.create(prompt="The quick", max_tokens=4, temperature=0,
                                            ignore_eos=True)
        return r, chunks, c

    r, chunks, c = asyncio.run(main())
    ChatCompletion.model_validate(r.model_dump())
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == 10
    for chunk in chunks[:-1]:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        assert chunk.usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 4


def test_async_abort_mid_stream(engine, slow_decode):
    async def main():
        other_alone = (await engine.chat.completions.create(**args("A paged KV cache",
                                                                   max_tokens=30)))
        slow_decode(engine)
        other = asyncio.create_task(engine.chat.completions.create(
            **args("A paged KV cache", max_tokens=30)))
        reasons, n_chunks = [], 0
        async for chunk in await engine.chat.completions.create(
                stream=True, request_id="async-abort", **args("Hello", max_tokens=200)):
            n_chunks += 1
            if n_chunks == 3:
                engine.abort("async-abort")
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        other = await other
        await wait_idle_and_freed(engine, engine.initial_free_pages)
        return other_alone, other, reasons, n_chunks

    other_alone, other, reasons, n_chunks = asyncio.run(main())
    assert reasons == ["abort"] and n_chunks < 100
    assert other.choices[0].message.content == other_alone.choices[0].message.content


def test_cancelling_a_request_task_aborts_it(engine, slow_decode):
    slow_decode(engine)

    async def main():
        task = asyncio.create_task(engine.chat.completions.create(
            **args("Hello", max_tokens=200, request_id="cancelled")))
        while not engine.stats().running_requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle_and_freed(engine, engine.initial_free_pages)
        # Leaving a stream early (aclose) aborts it as well.
        stream = await engine.chat.completions.create(stream=True,
                                                      **args("Hi", max_tokens=200))
        async for _ in stream:
            break
        await stream.aclose()
        await wait_idle_and_freed(engine, engine.initial_free_pages)

    asyncio.run(main())
    assert engine.stats().decode_tokens > 0


def test_bad_request_fails_before_work_while_others_run(engine, slow_decode):
    async def main():
        alone = (await engine.chat.completions.create(**args("Hello", max_tokens=30)))
        slow_decode(engine, 0.005)
        running = asyncio.create_task(stream_text(engine, **args("Hello", max_tokens=30)))
        await asyncio.sleep(0.02)
        queued = sum(e["name"] == "queued" for e in engine.tracer.events)
        errors = []
        for bad in (dict(messages=[]), args("x", temperature=-1), args("x", top_p=2.0),
                    args("x", n=0), args("x", max_tokens=0), args("x", model="other"),
                    args("x", response_format={"type": "json_schema", "json_schema": {
                        "name": "x", "schema": {"type": "array", "uniqueItems": True}}})):
            for stream in (False, True):
                with pytest.raises(BadRequestError) as e:
                    await engine.chat.completions.create(stream=stream, **bad)
                errors.append(e.value.param)
        assert sum(e["name"] == "queued" for e in engine.tracer.events) == queued
        text, reason = await running
        return alone, text, reason, errors

    alone, text, reason, errors = asyncio.run(main())
    assert text == alone.choices[0].message.content and reason == "length"
    assert errors == [p for p in ("messages", "temperature", "top_p", "n", "max_tokens",
                                  "model", "response_format.json_schema.schema")
                      for _ in range(2)]


def test_async_terminate(tiny, slow_decode):
    eng = make_engine(tiny)
    slow_decode(eng)

    async def main():
        stream = await eng.chat.completions.create(stream=True, **args("Hi", max_tokens=200))
        await stream.__anext__()
        eng.terminate()
        with pytest.raises(EngineTerminatedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineTerminatedError):
            await eng.chat.completions.create(**args("Hi"))
        with pytest.raises(EngineTerminatedError):
            await eng.completions.create(prompt="Hi", max_tokens=1)

    asyncio.run(main())
