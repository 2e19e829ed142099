"""The OpenAI HTTP server, end to end: a real uvicorn server on 127.0.0.1 over an
`AsyncMLCEngine` running SmolLM2-135M (q4f32_1, CPU), called with the `openai` client and
httpx. The model is slow on CPU, so every request asks for a handful of tokens, prompts are
short, and the fuzz test only sends requests that never reach generation.

A second server over a stub engine (no model) checks what the real one cannot show cheaply:
429 when too many requests wait, a 500 without a traceback, an error in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlc.errors import MLCError
from mlc.runtime import protocol as P
from mlc.serve.app import create_app
from mlc.serve.server import ServerThread

slow = pytest.mark.slow      # needs the SmolLM2 model (the stub-engine tests do not)
API_KEY = "sk-test-key"
SYSTEM = {"role": "system", "content": "Be brief."}
MAX_TOKENS = 4
# Short, distinct completion prompts: the concurrency test runs each alone and in a batch.
PROMPTS = ["The capital of France is", "1, 2, 3,", "Once upon a time", "Water is",
           "def add(a, b):", "The sky is", "Hello, my name is", "Cats and dogs"]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def engine(smol_engine_dir):
    from mlc import AsyncMLCEngine

    eng = AsyncMLCEngine(str(smol_engine_dir), device="cpu", max_batch_size=16,
                         max_total_sequence_length=2048, prefill_chunk_size=256)
    eng.idle_free_pages = eng.stats().kv_pages_free
    yield eng
    eng.terminate()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, api_key=API_KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def model_name(engine) -> str:
    return engine.model_id


@pytest.fixture(scope="module")
def greedy(client, model_name):
    """greedy(prompt) -> the completion of `prompt` run alone (temperature 0), memoized."""
    cache: dict[str, str] = {}

    def run(prompt: str) -> str:
        if prompt not in cache:
            out = client.completions.create(model=model_name, prompt=prompt,
                                            max_tokens=MAX_TOKENS, temperature=0)
            cache[prompt] = out.choices[0].text
        return cache[prompt]

    return run


def wait_idle(engine, timeout: float = 60.0) -> None:
    """Wait until the engine runs and queues nothing."""
    deadline = time.monotonic() + timeout
    while engine.stats().running_requests or engine.stats().waiting_requests:
        assert time.monotonic() < deadline, "the engine still holds requests"
        time.sleep(0.05)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# ---------------------------------------------------------------------------------------------
# Routes without generation


@slow
def test_models_health_and_schema(client, http, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]
    assert client.models.retrieve(model_name).id == model_name
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} \
        <= set(schema["paths"])
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]    # never a 422


@slow
def test_invalid_requests_are_openai_400s(client, http, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, max_tokens=2,
                                       messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[SYSTEM], temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:    # beyond the context window
        client.completions.create(model=model_name, prompt="Hi", max_tokens=10**6)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert_openai_error(http.post("/v1/completions", content=b"{not json"), 400)
    assert_openai_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    error = assert_openai_error(http.post("/v1/chat/completions", json={}), 400)
    assert error["param"] == "messages"


@slow
def test_api_key_is_required(server, http, model_name):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model_name, prompt="Hi", max_tokens=1)
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200      # health needs no key


@slow
def test_unknown_model_and_route_are_404(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[SYSTEM], max_tokens=1)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert_openai_error(http.get("/v1/nothing-here"), 404, "not_found")


@slow
def test_body_too_large_is_413(http):
    big = json.dumps({"prompt": "x" * (5 * 2**20), "max_tokens": 1}).encode()
    assert_openai_error(http.post("/v1/completions", content=big,
                                  headers={"Content-Type": "application/json"}), 413)


# ---------------------------------------------------------------------------------------------
# Generation


@slow
def test_chat_stream_matches_non_stream(client, model_name):
    messages = [SYSTEM, {"role": "user", "content": "Hi!"}]
    full = client.chat.completions.create(model=model_name, messages=messages,
                                          max_tokens=MAX_TOKENS, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert 0 < full.usage.completion_tokens <= MAX_TOKENS
    chunks = list(client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == choice.finish_reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


@slow
def test_completion_stream_matches_non_stream(client, model_name, greedy):
    expected = greedy(PROMPTS[0])
    assert expected
    chunks = list(client.completions.create(model=model_name, prompt=PROMPTS[0],
                                            max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


@slow
def test_n_choices(client, model_name):
    out = client.chat.completions.create(
        model=model_name, n=2, max_tokens=3, temperature=1.0, seed=7,
        messages=[SYSTEM, {"role": "user", "content": "Name a color."}])
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.message.content for c in out.choices)
    assert out.usage.completion_tokens <= 2 * 3


@slow
def test_stop_string(client, model_name, greedy):
    text = greedy(PROMPTS[0])
    stop = text[len(text) // 2:]
    out = client.completions.create(model=model_name, prompt=PROMPTS[0], stop=[stop],
                                    max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == text[:text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


@slow
def test_logprobs(client, model_name, greedy):
    out = client.chat.completions.create(
        model=model_name, messages=[SYSTEM, {"role": "user", "content": "Hi!"}],
        max_tokens=2, temperature=0, logprobs=True, top_logprobs=2)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for entry in entries:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    comp = client.completions.create(model=model_name, prompt=PROMPTS[0], logprobs=2,
                                      max_tokens=MAX_TOKENS, temperature=0)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text == greedy(PROMPTS[0])
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens)
    assert all(len(top) <= 2 for top in lp.top_logprobs)


@slow
def test_disconnect_aborts_and_frees_kv(server, http, engine, model_name):
    # far more tokens than the test waits for: only an abort can end these requests early
    body = {"model": model_name, "prompt": PROMPTS[2], "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    decoded_before = engine.stats().decode_tokens
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["text"] is not None
        assert engine.stats().running_requests        # still generating
    # the response is closed: the engine must drop the request and free its KV pages
    wait_idle(engine)
    assert engine.stats().kv_pages_free == engine.idle_free_pages
    # a non-streaming request whose client gives up is aborted as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(30, read=1.0))
    wait_idle(engine)
    assert engine.stats().kv_pages_free == engine.idle_free_pages
    assert engine.stats().decode_tokens - decoded_before < 2000
    assert server_state(server).open_requests == 0


def server_state(server):
    return server.app.state.mlc


@slow
def test_concurrent_streams_are_not_mixed(server, engine, greedy, model_name):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    expected = {p: greedy(p) for p in set(prompts)}
    stats_before = engine.stats()

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=model_name, prompt=prompt,
                                                 max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert results == [expected[p] for p in prompts]
    steps = engine.stats().decode_steps - stats_before.decode_steps
    tokens = engine.stats().decode_tokens - stats_before.decode_tokens
    assert tokens / steps > 2, "the concurrent requests were not batched"
    wait_idle(engine)


@slow
def test_x_request_id_header(http, model_name):
    body = {"model": model_name, "prompt": PROMPTS[1], "max_tokens": 1, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["x-request-id"] == r.json()["id"]
    assert r.json()["id"].startswith("cmpl-")
    r = http.post("/v1/completions", json=body, headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" == r.json()["id"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines()
                  if line.startswith("data: {")]
        assert stream.headers["x-request-id"] == events[0]["id"]


@slow
def test_context_overflow_is_openais_error(http, model_name, engine):
    ctx = engine.limits.context_window_size
    body = {"model": model_name, "prompt": [5] * 10, "max_tokens": ctx}
    error = assert_openai_error(http.post("/v1/completions", json=body), 400,
                                "context_length_exceeded")
    assert error["message"].startswith(
        f"This model's maximum context length is {ctx} tokens. However, you requested "
        f"{ctx + 10} tokens (10 in the prompt, {ctx} in the completion).")
    assert error["param"] == "max_tokens"


def scrape(http) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


@slow
def test_metrics_scrape_counts_what_ran(http, engine, model_name):
    wait_idle(engine)
    before = scrape(http)
    label = (("model_name", model_name),)
    usage = []
    for prompt in PROMPTS[:2]:
        r = http.post("/v1/completions", json={"model": model_name, "prompt": prompt,
                                               "max_tokens": 3, "ignore_eos": True,
                                               "temperature": 0})
        usage.append(r.json()["usage"])
    wait_idle(engine)
    after = scrape(http)
    delta = lambda name, labels=label: after[(name, labels)] - before.get((name, labels), 0)
    assert delta("mlc:generation_tokens_total") == 6
    assert delta("mlc:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    length = tuple(sorted((*label, ("finished_reason", "length"))))
    assert delta("mlc:request_success_total", length) == 2
    assert delta("mlc:time_to_first_token_seconds_count") == 2
    assert delta("mlc:e2e_request_latency_seconds_count") == 2
    assert delta("mlc:inter_token_latency_seconds_count") == 4      # 2 later tokens each
    e2e_sum = delta("mlc:e2e_request_latency_seconds_sum")
    assert 0 < delta("mlc:time_to_first_token_seconds_sum") < e2e_sum
    inf = tuple(sorted((*label, ("le", "+Inf"))))
    assert after[("mlc:e2e_request_latency_seconds_bucket", inf)] == \
        after[("mlc:e2e_request_latency_seconds_count", label)]
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "mlc:num_requests_waiting",
                 "mlc:kv_cache_usage_perc"):
        assert after[(name, label)] == 0, name                      # idle: nothing held


@slow
def test_metrics_gauges_while_busy(server, http, engine, model_name):
    body = {"model": model_name, "prompt": PROMPTS[3], "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    label = (("model_name", model_name),)
    with http.stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
        busy = scrape(http)
        stats = engine.stats()
    assert busy[("vllm:num_requests_running", label)] == 1
    kv = busy[("vllm:kv_cache_usage_perc", label)]
    pages = stats.kv_pages_total - stats.kv_pages_free
    assert 0 < kv < 1 and abs(kv - pages / stats.kv_pages_total) <= 2 / stats.kv_pages_total
    wait_idle(engine)


# ---------------------------------------------------------------------------------------------
# Fuzzing the request schema: no request may cause a 500


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                  st.floats(), st.text(max_size=8),
                  st.lists(st.integers(-5, 5), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _mostly(good: st.SearchStrategy, one_in: int = 5) -> st.SearchStrategy:
    """Junk once in `one_in` draws, `good` otherwise (so many requests pass validation)."""
    return st.integers(1, one_in).flatmap(lambda i: _JUNK if i == 1 else good)


_TEXT = st.text(max_size=12)
_MESSAGE = st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["system", "user", "assistant", "developer", "tool"]), 12),
     "content": _mostly(st.one_of(_TEXT, st.lists(st.fixed_dictionaries(
         {"type": _mostly(st.just("text"), 12), "text": _TEXT}), max_size=2)), 12)},
    optional={"name": _mostly(_TEXT, 12), "tool_call_id": _mostly(_TEXT, 12),
              "tool_calls": _mostly(st.none(), 12)})
_SAMPLING = {
    "temperature": _mostly(st.floats(0, 2)), "top_p": _mostly(st.floats(0.01, 1)),
    "top_k": _mostly(st.integers(-1, 50)), "n": _mostly(st.integers(1, 4)),
    "stop": _mostly(st.one_of(_TEXT, st.lists(_TEXT, max_size=5))),
    "seed": _mostly(st.integers(0, 2**63)), "stream": _mostly(st.booleans()),
    "stream_options": _mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": _mostly(st.dictionaries(st.integers(0, 60000).map(str),
                                          st.floats(-100, 100), max_size=3)),
    "presence_penalty": _mostly(st.floats(-2, 2)), "frequency_penalty": _mostly(st.floats(-2, 2)),
    "repetition_penalty": _mostly(st.floats(0.5, 2)), "ignore_eos": _mostly(st.booleans()),
    "stop_token_ids": _mostly(st.lists(st.integers(0, 60000), max_size=3)),
    "response_format": _mostly(st.fixed_dictionaries({"type": st.sampled_from(
        ["text", "json_object", "json_schema"])})),
    "model": st.one_of(st.none(), st.text(max_size=6)), "unknown_field": _JUNK, "self": _JUNK,
    "request_id": _mostly(_TEXT),
}
# Never a small valid max_tokens: a valid request ends at the context-window check (400), so
# the fuzz exercises validation and prompt building without paying for generation.
_MAX_TOKENS = st.one_of(st.just(10**6), st.integers(-5, 0),
                        st.sampled_from(["", "many", 2.5, [], {}]))
CHAT_BODY = st.fixed_dictionaries(
    {"messages": _mostly(st.lists(_MESSAGE, min_size=1, max_size=3)), "max_tokens": _MAX_TOKENS},
    optional={**_SAMPLING, "logprobs": _mostly(st.booleans()),
              "top_logprobs": _mostly(st.integers(0, 20)), "tools": _JUNK,
              "tool_choice": _mostly(st.sampled_from(["auto", "none"]))})
COMPLETION_BODY = st.fixed_dictionaries(
    {"prompt": _mostly(st.one_of(st.text(min_size=1, max_size=20),
                                 st.lists(st.integers(0, 49151), min_size=1, max_size=4),
                                 st.lists(st.text(max_size=5), max_size=2))),
     # (max_tokens 0 is valid for completions: it scores the prompt, generating nothing)
     "max_tokens": st.one_of(st.just(10**6), st.integers(-5, -1),
                             st.sampled_from(["", "many", 2.5, [], {}]))},
    optional={**_SAMPLING, "logprobs": _mostly(st.integers(0, 5)), "echo": _mostly(st.booleans()),
              "suffix": _JUNK, "best_of": _mostly(st.integers(1, 2))})


@slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(st.tuples(st.just("/v1/chat/completions"), CHAT_BODY),
                      st.tuples(st.just("/v1/completions"), COMPLETION_BODY)))
def test_fuzzed_requests_never_500(http, body):
    path, payload = body
    # json.dumps writes NaN and Infinity as such: the server must refuse them (not JSON)
    response = http.post(path, content=json.dumps(payload),
                         headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 404), (payload, response.text)
    assert_openai_error(response, response.status_code)


# ---------------------------------------------------------------------------------------------
# App behaviour the real engine cannot show cheaply: a stub engine


class StubEngine:
    """Answers completions by prompt: "slow" streams a chunk every 50 ms until aborted,
    "crash" raises a non-mlc error, "midway" fails after one chunk. It implements the public
    engine interface the app uses, and nothing else."""

    model_id = "stub-model"
    limits = SimpleNamespace(max_batch_size=1)

    def __init__(self):
        self.aborted: list[str] = []

    def serves_model(self, name) -> bool:
        return name in (None, "", self.model_id)

    def is_alive(self) -> bool:
        return True

    def metrics(self):
        from mlc.runtime.metrics import E2E_BUCKETS, Histogram, MetricsSnapshot

        h = Histogram(E2E_BUCKETS).snapshot()
        return MetricsSnapshot(self.model_id, {}, 0, 0, 0, 0, 0, 0.0, h, h, h)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def serve_request(self, req):
        if req.prompt == "crash":
            raise RuntimeError("secret internal detail")
        if not req.stream:
            return P.Completion(model=self.model_id,
                                choices=[P.CompletionChoice(text="ok", finish_reason="stop")])
        return self._chunks(req.prompt, req.request_id)

    async def _chunks(self, prompt, rid):
        for _ in range(2000 if prompt == "slow" else 1):
            await asyncio.sleep(0.05)
            yield P.Completion(id=rid, model=self.model_id,
                               choices=[P.CompletionChoice(text="tok")]).model_dump_json()
        if prompt == "midway":
            raise MLCError("the engine failed midway")


@pytest.fixture(scope="module")
def stub_server():
    stub = StubEngine()
    with ServerThread(create_app(stub, max_waiting_requests=0)) as srv:
        srv.stub = stub
        yield srv


def test_stub_too_many_waiting_is_429(stub_server):
    url = stub_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url, json={"prompt": "slow", "stream": True}) as held:
            lines = held.iter_lines()     # keep it referenced: dropping it closes the stream
            next(lines)                   # the one batch slot is taken
            assert_openai_error(c.post(url, json={"prompt": "hi"}), 429)
        deadline = time.monotonic() + 10
        while server_state(stub_server).open_requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.post(url, json={"prompt": "hi"}).json()["choices"][0]["text"] == "ok"
    assert stub_server.stub.aborted                   # the closed stream was aborted


def test_stub_internal_error_is_500_without_traceback(stub_server):
    response = httpx.post(stub_server.url + "/v1/completions", json={"prompt": "crash"})
    error = assert_openai_error(response, 500)
    assert "secret" not in error["message"] and "Traceback" not in response.text


def test_stub_error_midway_is_a_final_sse_event(stub_server):
    with httpx.stream("POST", stub_server.url + "/v1/completions",
                      json={"prompt": "midway", "stream": True}) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line]
    assert json.loads(events[0])["choices"][0]["text"] == "tok"
    assert json.loads(events[1])["error"]["message"] == "the engine failed midway"
    assert events[-1] == "[DONE]"
    client = openai.OpenAI(base_url=stub_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="failed midway"):
        list(client.completions.create(model="stub-model", prompt="midway", stream=True))


# ---------------------------------------------------------------------------------------------
# The `mlc serve` command


@slow
def test_mlc_serve_command(smol_engine_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlc", "serve", str(smol_engine_dir), "--device", "cpu",
         "--mode", "local", "--max-total-seq-length", "512", "--port", str(port),
         "--api-key", API_KEY, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mlc serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert models["data"][0]["id"] == smol_engine_dir.name     # never an absolute path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read()

