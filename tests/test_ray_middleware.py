"""The Serve-proxy middleware of `mlc.serve.ray` over fake inner apps (what Serve's proxy does
when a replica dies), without Ray: retries of requests no replica answered, OpenAI-shaped
503s instead of Serve's plain text, and cut event streams closed with an error event."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mlc.serve.ray import (
    ATTEMPTS_HEADER,
    ReplicaFailureMiddleware,
    ReplicaOptions,
    deployment_options,
)


class FakeProxy:
    """An inner ASGI app that plays `script[i]` on the i-th call: "silent" (returns without a
    response, as Serve's proxy does when the replica died), "plain500" (Serve's text 500),
    "json500" (the app's own OpenAI 500), "ok", or "cut" (an event stream that stops)."""

    def __init__(self, *script: str):
        self.script, self.calls, self.bodies = list(script), 0, []

    async def __call__(self, scope, receive, send):
        kind = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if kind == "silent":
            return
        if kind == "raise":
            raise RuntimeError("ActorDiedError: the replica died")
        if kind in ("plain500", "json500", "ok"):
            status, ctype, payload = {
                "plain500": (500, b"text/plain", b"Internal Server Error"),
                "json500": (500, b"application/json",
                            b'{"error": {"message": "boom", "type": "internal_server_error",'
                            b' "param": null, "code": null}}'),
                "ok": (200, b"application/json", b'{"echo": ' + body + b"}"),
            }[kind]
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", ctype)]})
            await send({"type": "http.response.body", "body": payload})
            return
        assert kind == "cut"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"x": 1}\n\n',
                    "more_body": True})
        raise RuntimeError("RayActorError: the actor died unexpectedly")


class client:
    """A sync facade over httpx's async ASGI transport, calling the middleware over `inner`."""

    def __init__(self, inner, retries: int = 2):
        self.app = ReplicaFailureMiddleware(inner, retries=retries, backoff_s=0.01)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                response = await c.request(method, path, **kwargs)
                await response.aread()
                return response
        return asyncio.run(go())

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)


def test_unanswered_request_is_retried_with_its_body():
    inner = FakeProxy("silent", "raise", "ok")
    r = client(inner).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and r.json() == {"echo": {"prompt": "hi"}}
    assert r.headers[ATTEMPTS_HEADER] == "3"
    assert inner.bodies == [b'{"prompt":"hi"}'] * 3


def test_serve_plain_500_becomes_an_openai_503():
    inner = FakeProxy("plain500")
    r = client(inner, retries=1).post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "replica_unavailable" and "Internal Server Error" in error["message"]
    assert inner.calls == 2


def test_app_errors_and_other_routes_pass_through():
    inner = FakeProxy("json500")
    r = client(inner).post("/v1/completions", json={})
    assert r.status_code == 500 and r.json()["error"]["message"] == "boom"
    assert inner.calls == 1                # the app answered: never retried
    inner = FakeProxy("silent")            # not an OpenAI route: left to Serve as it is
    sent = asyncio.run(_call(ReplicaFailureMiddleware(inner), "/-/healthz"))
    assert sent == [] and inner.calls == 1


def test_cut_stream_ends_with_an_error_event():
    inner = FakeProxy("cut", "ok")
    r = client(inner).post("/v1/completions", json={"stream": True})
    assert r.status_code == 200 and inner.calls == 1      # started: never sent again
    events = [line[len("data: "):] for line in r.text.splitlines() if line]
    assert json.loads(events[0]) == {"x": 1}
    error = json.loads(events[1])["error"]
    assert error["code"] == "replica_died" and "RayActorError" in error["message"]
    assert events[2:] == ["[DONE]"]


async def _call(app, path: str) -> list[dict]:
    """Call `app` directly: a POST with body {} and then a client disconnect; what it sent."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": False},
                {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
    return sent


def test_client_disconnect_is_not_retried():
    calls = []

    async def inner_reading_disconnect(scope, receive, send):
        calls.append(await receive())
        calls.append(await receive())      # the disconnect, as Serve's proxy reads it

    app = ReplicaFailureMiddleware(inner_reading_disconnect, backoff_s=0.01)
    sent = asyncio.run(_call(app, "/v1/completions"))
    assert len(calls) == 2 and calls[1]["type"] == "http.disconnect" and sent == []


def test_deployment_options():
    opts = deployment_options(ReplicaOptions(num_replicas=2, num_cpus=2.5, num_gpus=1),
                              {"max_batch_size": 8}, max_waiting_requests=10)
    assert opts["num_replicas"] == 2 and opts["max_ongoing_requests"] == 18
    actor = opts["ray_actor_options"]
    assert actor["num_cpus"] == 2.5 and actor["num_gpus"] == 1
    assert actor["runtime_env"]["env_vars"]["TVM_NUM_THREADS"] == "2"
    auto = deployment_options(ReplicaOptions(num_replicas=1, max_replicas=4), {})
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                          "initial_replicas": 1, "target_ongoing_requests": 8}
    with pytest.raises(ValueError, match="max_replicas"):
        deployment_options(ReplicaOptions(num_replicas=3, max_replicas=2), {})
    with pytest.raises(ValueError, match="num_cpus"):
        deployment_options(ReplicaOptions(num_cpus=0), {})


def test_app_builder_reads_serve_cli_strings():
    pytest.importorskip("ray.serve")
    from mlc.serve.ray import app_builder

    app = app_builder({"model": "dist/m", "device": "cpu", "replicas": "3",
                       "replica_cpus": "2", "max_batch_size": "4", "api_key": "k"})
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 2.0
    assert deployment.ray_actor_options["runtime_env"]["env_vars"]["TVM_NUM_THREADS"] == "2"
    assert app._bound_deployment.init_args == (
        "dist/m", {"device": "cpu", "max_batch_size": 4}, {"api_key": "k"})
    with pytest.raises(ValueError, match="Unknown .*'replica'"):
        app_builder({"model": "m", "replica": "2"})
    with pytest.raises(ValueError, match="replicas='two' is not of type int"):
        app_builder({"model": "m", "replicas": "two"})
    with pytest.raises(ValueError, match="needs a `model`"):
        app_builder({})
