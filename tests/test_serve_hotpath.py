"""The server's hot path over the fake model (`mlc.runtime.fake_runner`): every token of
every concurrent stream arrives, in order, in its own stream (engine and HTTP, with the
`openai` client); the text chunk template writes what pydantic writes; `ChunkStream` batches
what a slow consumer missed; a step's outputs wake the event loop after the next step was
launched on a device (at once on the CPU); and the fake cannot be reached by accident.

The fake model needs only a model dir's chat config and tokenizer (SmolLM2's, converted once
in the test cache); no library is built or run, so these tests take seconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

from mlc.runtime import protocol as P
from mlc.runtime.engine import ChunkStream, _ChunkJSON
from mlc.runtime.fake_runner import (
    FakeAsyncMLCEngine,
    FakeMLCEngine,
    FakeRunner,
    fake_draw,
    fake_token,
)
from mlc.runtime.sampler import make_generator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(smollm2_dir) -> Path:
    return smollm2_dir("q4f16_1")


def expected_ids(engine, prompt_ids: list[int], n: int, temperature: float, seed: int) -> list[int]:
    """The tokens the fake model gives a request: greedy walks `fake_token` from the last
    prompt token; sampling maps the uniform numbers of the request's own generator."""
    vocab = engine.model.vocab_size
    if temperature == 0:
        out, last = [], prompt_ids[-1]
        for _ in range(n):
            last = fake_token(last, vocab)
            out.append(last)
        return out
    rng = make_generator(seed, 0)
    return [fake_draw(rng.random(), vocab) for _ in range(n)]


def request_mix(count: int, seed: int = 0) -> list[dict]:
    """Requests of different lengths, half greedy, half seeded sampling."""
    rng = random.Random(seed)
    return [{"prompt": f"Stream {i}: {rng.random():.6f}", "max_tokens": rng.randint(1, 48),
             "temperature": 0.0 if i % 2 else 0.8, "seed": 1000 + i} for i in range(count)]


def test_every_stream_gets_its_tokens_in_order_under_concurrency(model_dir):
    """40 concurrent requests on a GPU-timed fake (outputs handed on after the next launch),
    consumers that fall behind at random: each stream's token ids are exactly its own
    sequence, its text is their decoding, and it ends with one final output."""
    engine = FakeAsyncMLCEngine(str(model_dir), step_s=0.002, max_batch_size=16,
                                max_total_sequence_length=16 * 128)
    reqs = request_mix(40)

    async def one(i: int, req: dict) -> tuple[list[int], str, list[bool]]:
        rng = random.Random(i)
        ids, text, finals = [], "", []
        stream = await engine.generate(req["prompt"], max_tokens=req["max_tokens"],
                                       temperature=req["temperature"], seed=req["seed"],
                                       ignore_eos=True)
        async for out in stream:
            for d in out.deltas:
                ids += d.token_ids
                text += d.text
            finals.append(out.final)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() * 0.01)     # fall behind a few steps
        return ids, text, finals

    async def run_all():
        return await asyncio.gather(*[one(i, r) for i, r in enumerate(reqs)])

    try:
        results = asyncio.run(run_all())
        for req, (ids, text, finals) in zip(reqs, results):
            prompt = engine.tokenizer.encode(req["prompt"], add_special_tokens=False).ids
            want = expected_ids(engine, prompt, req["max_tokens"], req["temperature"],
                                req["seed"])
            assert ids == want
            assert text == engine.tokenizer.decode(want)
            assert finals[-1] and not any(finals[:-1])
    finally:
        engine.terminate()


def test_http_streams_under_concurrency_with_the_openai_client(model_dir):
    """32 concurrent streaming chat requests through uvicorn, read by the `openai` client:
    each stream has one id, the role in every chunk, content equal to the decoding of its
    own tokens, finish_reason "length" and the usage of its max_tokens."""
    from mlc.serve.app import create_app
    from mlc.serve.server import ServerThread

    engine = FakeAsyncMLCEngine(str(model_dir), step_s=0.001, max_batch_size=16,
                                max_total_sequence_length=16 * 256)
    reqs = request_mix(32, seed=1)
    results: dict[int, dict] = {}

    def client(i: int, req: dict, url: str) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": req["prompt"]}]
        stream = api.chat.completions.create(
            model=engine.model_id, messages=messages, stream=True,
            max_tokens=req["max_tokens"], temperature=req["temperature"], seed=req["seed"],
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        ids, content, roles, reasons, usage = set(), "", set(), [], None
        for chunk in stream:
            ids.add(chunk.id)
            for choice in chunk.choices:
                roles.add(choice.delta.role)
                content += choice.delta.content or ""
                reasons.append(choice.finish_reason)
            usage = chunk.usage or usage
        results[i] = {"ids": ids, "content": content, "roles": roles, "reasons": reasons,
                      "usage": usage, "prompt": engine.encode_chat(messages)}

    try:
        with ServerThread(create_app(engine)) as server:
            threads = [threading.Thread(target=client, args=(i, r, server.url))
                       for i, r in enumerate(reqs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        assert sorted(results) == list(range(len(reqs)))
        for i, req in enumerate(reqs):
            r = results[i]
            want = expected_ids(engine, r["prompt"], req["max_tokens"], req["temperature"],
                                req["seed"])
            assert len(r["ids"]) == 1
            assert r["roles"] == {"assistant"}
            assert r["content"] == engine.tokenizer.decode(want)
            assert r["reasons"][-1] == "length" and not any(r["reasons"][:-1])
            assert r["usage"].completion_tokens == req["max_tokens"]
    finally:
        engine.terminate()


TEXTS = ["", "plain", ' "quoted" \\ back\\slash', "line\nbreak\ttab\r", "\x00\x01\x1f ctl",
         "é ü 中文 😀", "\u2028\u2029 separators", "</script>", "\ud7ff\ue000"]


@pytest.mark.parametrize("reason", [None, "stop", "length", "abort"])
def test_text_chunk_template_writes_what_pydantic_writes(reason):
    """The template of a plain text chunk gives the bytes `model_dump_json()` gives, for
    chat and completion chunks, several choices, and text that JSON must escape."""
    rng = random.Random(0)
    texts = TEXTS + ["".join(chr(rng.randrange(0, 0x2FFF)) for _ in range(20))
                     for _ in range(20)]
    for k, text in enumerate(texts):
        index = k % 3
        chat = _ChunkJSON("chatcmpl-x\"y", 1700000000 + k, "Smol/Model \u00e9",
                          "chat.completion.chunk")
        got = chat.raw(",".join([chat.chat_text_choice(index, text, reason),
                                 chat.chat_text_choice(index + 1, text[::-1], None)]))
        want = P.ChatCompletionChunk(
            id=chat.rid, created=chat.created, model=chat.model, choices=[
                P.ChunkChoice(index=index, finish_reason=reason,
                              delta=P.Delta(role="assistant", content=text)),
                P.ChunkChoice(index=index + 1, finish_reason=None,
                              delta=P.Delta(role="assistant", content=text[::-1]))])
        assert json.loads(got) == json.loads(want.model_dump_json())
        assert got == want.model_dump_json()
        comp = _ChunkJSON("cmpl-1", 5, "m", "text_completion")
        got = comp.raw(comp.completion_text_choice(index, text, reason))
        want = P.Completion(id="cmpl-1", created=5, model="m", choices=[
            P.CompletionChoice(index=index, text=text, finish_reason=reason)])
        assert got == want.model_dump_json()


def test_chunk_stream_batches_what_a_slow_consumer_missed(model_dir):
    """A consumer that sleeps gets several steps' chunks in one batch, in order; the batches
    put together are the whole stream; closing the stream early aborts the request."""
    engine = FakeAsyncMLCEngine(str(model_dir), step_s=0.001)

    async def run():
        req = P.parse_completion_request(prompt="Batch me", max_tokens=40, temperature=0,
                                         ignore_eos=True, stream=True)
        stream = await engine.serve_request(req)
        assert isinstance(stream, ChunkStream)
        sizes, text = [], ""
        async for batch in stream.batches():
            sizes.append(len(batch))
            text += "".join(json.loads(c)["choices"][0]["text"] for c in batch)
            await asyncio.sleep(0.02)
        ids = engine.tokenizer.encode("Batch me", add_special_tokens=False).ids
        assert text == engine.tokenizer.decode(expected_ids(engine, ids, 40, 0, 0))
        assert max(sizes) > 1 and sum(sizes) <= 40

        req = P.parse_completion_request(prompt="Stop early", max_tokens=2000, temperature=0,
                                         ignore_eos=True, stream=True)
        stream = await engine.serve_request(req)
        async for _ in stream.batches():
            break
        await stream.aclose()
        for _ in range(200):
            if engine.stats().running_requests == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running_requests == 0
        assert engine.stats().finished_requests.get("abort") == 1

    try:
        asyncio.run(run())
    finally:
        engine.terminate()


def test_an_engine_error_ends_a_chunk_stream_after_the_chunks_before_it(model_dir):
    """Terminating the engine mid-stream: the chunks already made come out, then the
    engine's error."""
    from mlc.errors import EngineTerminatedError

    engine = FakeAsyncMLCEngine(str(model_dir), step_s=0.005)

    async def run():
        req = P.parse_chat_request(messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=1000, ignore_eos=True, stream=True)
        stream = await engine.serve_request(req)
        got = []
        with pytest.raises(EngineTerminatedError):
            async for chunk in stream:
                got.append(json.loads(chunk))
                if len(got) == 3:
                    threading.Thread(target=engine.terminate).start()
        assert len(got) >= 3 and all(c["choices"][0]["delta"]["role"] == "assistant"
                                     for c in got)

    asyncio.run(run())


class _RecordingSink:
    """An output sink with `flush`, recording the order of events."""

    def __init__(self, events: list):
        self.events, self.done = events, threading.Event()

    def __call__(self, out) -> None:
        self.events.append("out")
        if out.final:
            self.done.set()

    def flush(self) -> None:
        self.events.append("flush")


@pytest.mark.parametrize("device_kind", ["fake", "cpu"])
def test_outputs_wake_consumers_after_the_next_launch_on_a_device(model_dir, device_kind):
    """On a device (asynchronous launches), a step's outputs are flushed right after the next
    step's model call, so the consumers run while the device does; on the CPU right after
    the step. Either way every output is flushed, once per step."""
    from mlc.runtime.device_sampler import DeviceSampler
    from mlc.runtime.engine_core import EngineCore
    from mlc.runtime.generation_config import GenerationConfig
    from mlc.runtime.model import KVCacheConfig
    from mlc.runtime.request import EngineLimits, Request

    runner = FakeRunner(model_dir)
    runner.device_kind = device_kind
    runner.create_kv_cache(KVCacheConfig(4, 1024, 256))
    events: list[str] = []
    for name in ("prefill_logits", "decode_logits"):
        real = getattr(runner, name)

        def launch(*args, _real=real):
            events.append("launch")
            return _real(*args)
        setattr(runner, name, launch)
    core = EngineCore(runner, EngineLimits(4, 1024, 256, 1024), DeviceSampler(runner))
    sink = _RecordingSink(events)
    core.submit(Request("r", [300, 301, 302], GenerationConfig(max_tokens=5, temperature=0),
                        _tokenizer(model_dir), set(), sink))
    assert sink.done.wait(10)
    for _ in range(100):                  # (the last flush comes when the loop goes idle)
        if events[-1] == "flush":
            break
        threading.Event().wait(0.01)
    core.shutdown()
    assert events.count("out") == 5 and events.count("launch") == 5
    assert events.count("flush") == 5
    if device_kind == "cpu":
        assert all(events[i + 1] == "flush" for i, e in enumerate(events) if e == "out")
    else:
        # every flush but the last (the loop going idle) follows a launch
        flushes = [i for i, e in enumerate(events) if e == "flush"]
        assert all(events[i - 1] == "launch" for i in flushes[:-1])
        assert events[:3] == ["launch", "out", "launch"]


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_the_fake_model_is_not_reachable_from_the_public_api():
    """Nothing users import loads the fake runner, no option or environment variable names
    it, and the engines' model loading is the real one unless a Fake* class overrides it."""
    code = ("import sys, mlc, mlc_llm, mlc.runtime.engine, mlc.serve.app, mlc.serve.ray, "
            "mlc.cli.main; from mlc_llm.serve import AsyncMLCEngine; "
            "print('mlc.runtime.fake_runner' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    assert out[-1] == "False"
    users = [p.relative_to(REPO).as_posix() for p in (REPO / "mlc").rglob("*.py")
             if "fake_runner" in p.read_text() or "FakeRunner" in p.read_text()]
    assert sorted(users) == ["mlc/runtime/engine.py", "mlc/runtime/fake_runner.py"]
    assert "import" not in next(line for line in (REPO / "mlc/runtime/engine.py").read_text()
                                .splitlines() if "fake_runner" in line)
    from mlc.runtime.engine import AsyncMLCEngine, MLCEngine, _EngineBase

    assert AsyncMLCEngine._load_runner is MLCEngine._load_runner is _EngineBase._load_runner
    assert FakeMLCEngine._load_runner is not _EngineBase._load_runner
