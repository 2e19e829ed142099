"""mlc replicas on Ray Serve: the `mlc serve` FastAPI app, one `AsyncMLCEngine` per replica.

    pip install 'mlc[ray]'
    mlc serve MODEL --ray --replicas 2                 # a local Ray of its own
    mlc serve MODEL --ray --ray-address auto ...       # join a running cluster

or from Python, on a Ray cluster you already run:

    from ray import serve
    from mlc.serve.ray import ReplicaOptions, build_app
    serve.run(build_app("dist/model", ReplicaOptions(num_replicas=2, num_cpus=4)))

Each replica is a Ray actor that loads the model and serves the app that
`mlc.serve.app.create_app` builds (through `@serve.ingress`, late-bound: the app is made
after the engine, in the replica). Serve's proxy routes each request to a replica with its
power-of-two-choices router (the less busy of two random replicas).

Ray 2.60's prefix-aware router (`ray.serve.llm.request_router.PrefixCacheAffinityRouter`)
does not apply here: it reads the prompt from the handle call's arguments (`.prompt` or
`.messages`), and an HTTP-ingress deployment gets the raw ASGI request instead.
`ReplicaOptions.request_router_class` passes any other router class through.

Failures. When a replica process dies, Serve's proxy answers a plain-text 500 (or, for a
stream already under way, just closes it). `proxy_middlewares` is a proxy callback (Ray reads
its import path from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` when the proxy starts; `mlc
serve --ray` sets it for the Ray it starts) whose middleware, on the `/v1/` routes:

- retries a request that got no response at all from a replica (the replica died before
  answering, or no replica was up), with a short backoff, then answers OpenAI's error shape
  (503, `Retry-After`) instead of Serve's plain text;
- ends an event stream that a dying replica cut with an error event and `data: [DONE]`.

Every response from a replica carries an `x-mlc-replica` header (the Serve replica id), and
one that the middleware had to send more than once an `x-mlc-attempts` header (the tries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

PROXY_CALLBACK = "mlc.serve.ray.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REPLICA_HEADER = "x-mlc-replica"
ATTEMPTS_HEADER = "x-mlc-attempts"     # on a response that needed more than one try


def _require_ray():
    try:
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ImportError("Ray Serve is not installed: pip install 'mlc[ray]' "
                          "(or pip install 'ray[serve]').") from e


@dataclass
class ReplicaOptions:
    """How many replicas, what each one gets, and how Serve routes to them.

    num_replicas: a fixed count; or set `max_replicas` to autoscale between `num_replicas`
        (at least 1) and `max_replicas` on ongoing requests per replica
        (`target_ongoing_requests`, default: the engine's max_batch_size or 8).
    num_cpus / num_gpus: Ray resources per replica; `tvm_threads` (default: num_cpus rounded
        down, at least 1) becomes TVM_NUM_THREADS in the replica's runtime_env.
    max_ongoing_requests: requests Serve sends one replica at once (the rest queue in the
        proxy); default: max_batch_size (or 32) plus max_waiting_requests (or 64).
    """

    num_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    tvm_threads: int | None = None
    max_ongoing_requests: int | None = None
    request_router_class: str | None = None
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    name: str = "mlc"
    env_vars: dict[str, str] = field(default_factory=dict)


def _deployment_class():
    from ray import serve

    from mlc.serve.app import create_app

    @serve.ingress()
    class MLCReplica:
        """One replica: an AsyncMLCEngine and the `mlc serve` app over it."""

        def __init__(self, model: str, engine_kwargs: dict[str, Any],
                     app_kwargs: dict[str, Any]):
            from mlc.runtime.engine import AsyncMLCEngine

            self.engine = AsyncMLCEngine(model, **engine_kwargs)
            self.app_kwargs = app_kwargs
            try:
                self.replica_id = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a Serve replica (never in practice)
                self.replica_id = str(os.getpid())

        def __serve_build_asgi_app__(self):
            app = create_app(self.engine, **self.app_kwargs)
            app.add_middleware(_ReplicaHeader, value=self.replica_id)
            return app

        async def check_health(self) -> None:
            if not self.engine.is_alive():
                raise RuntimeError("the engine has stopped")

        async def __del__(self):      # Serve awaits it when it stops the replica
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.terminate()
            parent = getattr(super(), "__del__", None)   # the ASGI wrapper's lifespan end
            if parent is not None:
                await parent()

    return MLCReplica


class _ReplicaHeader:
    """Adds `x-mlc-replica: <replica id>` to every HTTP response."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def build_app(model: str, options: ReplicaOptions | None = None, *,
              engine_kwargs: dict[str, Any] | None = None, api_key: str | None = None,
              max_body_bytes: int | None = None, max_waiting_requests: int | None = None,
              enable_debug: bool = False):
    """A Ray Serve application (`serve.run` it) of replicas serving `model`.

    engine_kwargs go to each replica's `AsyncMLCEngine(model, **engine_kwargs)` (device,
    model_lib, mode, max_batch_size, ...); api_key, max_body_bytes, max_waiting_requests and
    enable_debug to each replica's `create_app`: every option means per replica what it means
    to one `mlc serve`.
    """
    _require_ray()
    from ray import serve

    options = options or ReplicaOptions()
    engine_kwargs = dict(engine_kwargs or {})
    app_kwargs: dict[str, Any] = {"api_key": api_key}
    if enable_debug:
        app_kwargs["enable_debug"] = True
    if max_body_bytes is not None:
        app_kwargs["max_body_bytes"] = max_body_bytes
    if max_waiting_requests is not None:
        app_kwargs["max_waiting_requests"] = max_waiting_requests
    return serve.deployment(_deployment_class(), **deployment_options(
        options, engine_kwargs, max_waiting_requests)).bind(model, engine_kwargs, app_kwargs)


def deployment_options(options: ReplicaOptions, engine_kwargs: dict[str, Any],
                       max_waiting_requests: int | None = None) -> dict[str, Any]:
    """The `serve.deployment` options for `options` (replicas, resources, routing)."""
    from mlc.serve.app import DEFAULT_MAX_WAITING_REQUESTS

    if options.num_cpus <= 0:
        raise ValueError(f"num_cpus per replica must be positive, not {options.num_cpus}")
    batch = engine_kwargs.get("max_batch_size")
    threads = options.tvm_threads or max(1, int(options.num_cpus))
    env_vars = {"TVM_NUM_THREADS": str(threads), **options.env_vars}
    out: dict[str, Any] = {
        "name": options.name,
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                              "runtime_env": {"env_vars": env_vars}},
        "max_ongoing_requests": options.max_ongoing_requests or (
            (batch or 32) + (max_waiting_requests or DEFAULT_MAX_WAITING_REQUESTS)),
        "health_check_period_s": options.health_check_period_s,
        "health_check_timeout_s": options.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 10,
        # A replica that cannot load the model (a wrong path, too little memory) fails the
        # deployment after a few tries instead of Serve's default of 20 per replica.
        "max_constructor_retry_count": 3,
    }
    if options.max_replicas is not None:
        low = max(1, options.num_replicas)
        if options.max_replicas < low:
            raise ValueError(f"max_replicas ({options.max_replicas}) is below the minimum "
                             f"replica count ({low})")
        out["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": options.max_replicas, "initial_replicas": low,
            "target_ongoing_requests": options.target_ongoing_requests or (batch or 8)}
    else:
        if options.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, not {options.num_replicas}")
        out["num_replicas"] = options.num_replicas
    if options.request_router_class:
        out["request_router_config"] = {"request_router_class": options.request_router_class}
    return out


# What `app_builder` accepts, and how to read each (Serve's CLI passes strings).
_REPLICA_ARGS = {"replicas": int, "max_replicas": int, "replica_cpus": float,
                 "replica_gpus": float, "tvm_threads": int, "target_ongoing_requests": float,
                 "max_ongoing_requests": int, "request_router_class": str}
_APP_ARGS = {"api_key": str, "max_body_bytes": int, "max_waiting_requests": int}
_ENGINE_ARGS = {"device": str, "model_lib": str, "mode": str, "max_batch_size": int,
                "max_total_sequence_length": int, "prefill_chunk_size": int,
                "served_model_name": str}


def app_builder(args: dict[str, Any]):
    """The application builder for Serve's config files and CLI, and for KubeRay's
    RayService (`import_path: mlc.serve.ray:app_builder`):

        serve run mlc.serve.ray:app_builder model=dist/model device=cpu replicas=2

    `model` is required; the other keys are `mlc serve`'s options with underscores
    (replicas, max_replicas, replica_cpus, replica_gpus, device, model_lib, mode,
    max_batch_size, max_total_sequence_length, prefill_chunk_size, served_model_name,
    api_key, max_body_bytes, max_waiting_requests), plus tvm_threads,
    target_ongoing_requests, max_ongoing_requests and request_router_class."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("mlc.serve.ray:app_builder needs a `model` argument (model=DIR).")
    model = str(args.pop("model"))
    known = {**_REPLICA_ARGS, **_APP_ARGS, **_ENGINE_ARGS}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"Unknown mlc.serve.ray:app_builder arguments {unknown}; known: "
                         f"model, {', '.join(sorted(known))}.")
    values = {}
    for key, value in args.items():
        try:
            values[key] = None if value is None else known[key](value)
        except (TypeError, ValueError):
            raise ValueError(f"mlc.serve.ray:app_builder: {key}={value!r} is not of type "
                             f"{known[key].__name__}.") from None
    device = values.get("device") or "auto"
    gpus = values.get("replica_gpus")
    options = ReplicaOptions(
        num_replicas=values.get("replicas", 1), max_replicas=values.get("max_replicas"),
        num_cpus=values.get("replica_cpus", 1.0),
        num_gpus=gpus if gpus is not None else (1.0 if device.startswith("cuda") else 0.0),
        tvm_threads=values.get("tvm_threads"),
        target_ongoing_requests=values.get("target_ongoing_requests"),
        max_ongoing_requests=values.get("max_ongoing_requests"),
        request_router_class=values.get("request_router_class"))
    return build_app(model, options,
                     engine_kwargs={k: v for k, v in values.items() if k in _ENGINE_ARGS},
                     **{k: v for k, v in values.items() if k in _APP_ARGS})


# ---------------------------------------------------------------------------------------------
# `mlc serve --ray`


def serve_on_ray(model: str, engine_kwargs: dict[str, Any], limits: dict[str, Any], *,
                 api_key: str | None, host: str, port: int, replicas: int,
                 max_replicas: int | None, replica_cpus: float | None,
                 replica_gpus: float | None, ray_address: str | None,
                 ray_temp_dir: str | None, log_level: str = "info") -> None:
    """`mlc serve --ray`: start a local Ray (its own temp dir) or join `ray_address`, run the
    replicas behind Serve's proxy on host:port, and stay in the foreground until Ctrl-C or
    SIGTERM; then delete the app (and stop the local Ray)."""
    import shutil
    import signal
    import tempfile
    import threading
    from pathlib import Path

    import click

    _require_ray()
    import ray
    from ray import serve

    import mlc

    own = ray_address is None
    made_temp = own and ray_temp_dir is None
    temp_dir = (tempfile.mkdtemp(prefix="mlc-ray-") if made_temp else ray_temp_dir)
    count = max_replicas or replicas
    if own:
        # The Ray started here (raylet, workers, Serve's proxy) inherits this environment:
        # the proxy's failure middleware, and the same mlc source tree as this process.
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        src = str(Path(mlc.__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p)
        cores = os.cpu_count() or 1
        ray.init(address="local", _temp_dir=str(Path(temp_dir).resolve()), num_cpus=cores,
                 include_dashboard=False, object_store_memory=256 * 2**20,
                 logging_level=log_level.upper(), log_to_driver=log_level in ("info", "debug"))
        cpus = replica_cpus or max(cores / count, 0.01)
    else:
        ray.init(address=ray_address, logging_level=log_level.upper())
        cpus = replica_cpus or 1.0
    device = engine_kwargs.get("device") or "auto"
    gpus = replica_gpus if replica_gpus is not None else (
        1.0 if device.startswith("cuda") else 0.0)
    options = ReplicaOptions(num_replicas=replicas, max_replicas=max_replicas, num_cpus=cpus,
                             num_gpus=gpus)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(model, options, engine_kwargs=engine_kwargs, api_key=api_key,
                        **limits)
        try:
            serve.run(app, name=options.name, route_prefix="/", blocking=False)
        except RuntimeError as e:
            raise click.ClickException(
                f"The replicas did not start: {_deploy_failure(options.name) or e}") from None
        scale = (f"{replicas}-{max_replicas} replicas (autoscaling)" if max_replicas
                 else f"{replicas} replica{'s' if replicas > 1 else ''}")
        click.echo(f"Serving {model} on http://{host}:{port}/v1 with {scale} on Ray "
                   f"{ray.__version__} ({'local, ' + temp_dir if own else ray_address}); "
                   f"per replica {cpus:g} CPU, {gpus:g} GPU, device {device}", err=False)
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            if own:
                serve.shutdown()
            else:
                serve.delete(options.name)
        finally:
            ray.shutdown()
            if made_temp:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _deploy_failure(app_name: str) -> str | None:
    """The last error line of the failed deployment's status message (the replica's own
    exception, e.g. mlc.errors.ModelLoadError: ...), if Serve has one."""
    import re

    from ray import serve

    try:
        status = serve.status().applications[app_name]
    except Exception:  # noqa: BLE001 - no status to add
        return None
    for deployment in status.deployments.values():
        lines = [ln.strip() for ln in (deployment.message or "").splitlines()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
        if errors:
            return errors[-1]
    return status.message or None


# ---------------------------------------------------------------------------------------------
# The proxy side: OpenAI-shaped answers when a replica dies


def proxy_middlewares() -> list:
    """The Serve proxy callback (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureMiddleware)]


def _error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}).encode()


class ReplicaFailureMiddleware:
    """Serve proxy middleware for the OpenAI routes (`/v1/...`): a request that no replica
    answered is retried (`retries` times, after `backoff_s`, 2x, ...) and then answered with
    OpenAI's error shape (503 + Retry-After); an event stream that its replica cut ends with
    an error event and `[DONE]`. Responses a replica did start are never retried, so a
    client never sees two replicas' output in one response."""

    def __init__(self, app, retries: int = 3, backoff_s: float = 0.5,
                 max_replay_bytes: int = 8 * 2**20):
        self.app, self.retries, self.backoff_s = app, retries, backoff_s
        self.max_replay_bytes = max_replay_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        body: list[dict] = []
        size = 0
        while True:            # the whole body, so that it can be sent again
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body") or size > self.max_replay_bytes:
                break
        replayable = not body[-1].get("more_body")
        for attempt in range(self.retries + 1):
            run = _Attempt(send, body, receive, attempt + 1)
            try:
                await self.app(scope, run.receive, run.send)
            except Exception as e:  # noqa: BLE001 - judged below by what reached the client
                run.error = e
            if run.started:
                if not run.finished:
                    await run.end_cut_stream()
                return
            if run.disconnected:
                return
            if not replayable or attempt == self.retries:
                break
            logger.warning("no replica answered %s %s (%s); retrying", scope["method"],
                           scope["path"], run.reason())
            await asyncio.sleep(self.backoff_s * 2**attempt)
        status = 503
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": _error_body(
            f"No replica could serve the request ({run.reason()}); retry later.",
            "service_unavailable", "replica_unavailable")})


class _Attempt:
    """One try of a request: replays its body, and holds back a Serve error response
    (a 5xx that is neither JSON nor an event stream) so that it can be retried."""

    def __init__(self, send, body: list[dict], receive, number: int):
        self._send, self._body, self._receive = send, list(body), receive
        self.number = number
        self.started = self.finished = self.sse = self.disconnected = False
        self.held_status: int | None = None
        self.held_text = b""
        self.error: BaseException | None = None

    async def receive(self):
        if self._body:
            return self._body.pop(0)
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def send(self, message):
        if message["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            ctype = headers.get(b"content-type", b"")
            if message["status"] >= 500 and not ctype.startswith(
                    (b"application/json", b"text/event-stream")):
                self.held_status = message["status"]      # Serve's own plain-text error
                return
            self.sse = ctype.startswith(b"text/event-stream")
            self.started = True
            if self.number > 1:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (ATTEMPTS_HEADER.encode(),
                                                   str(self.number).encode())]}
        elif message["type"] == "http.response.body":
            if self.held_status is not None:
                self.held_text += message.get("body", b"")
                return
            if not message.get("more_body"):
                self.finished = True
        await self._send(message)

    def reason(self) -> str:
        if self.held_status is not None:
            text = self.held_text.decode(errors="replace").strip()[:200]
            return f"Serve answered {self.held_status}: {text}" if text else \
                f"Serve answered {self.held_status}"
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        return "the replica ended the connection without a response"

    async def end_cut_stream(self) -> None:
        """The replica stopped mid-response: close an event stream with an error event."""
        if not self.sse:
            return          # a JSON body is sent whole; nothing sensible to add
        event = _error_body("The replica serving this stream stopped (" + self.reason() +
                            "); the output is incomplete.", "server_error", "replica_died")
        try:
            await self._send({"type": "http.response.body", "more_body": False,
                              "body": b"data: " + event + b"\n\ndata: [DONE]\n\n"})
        except Exception:  # noqa: BLE001 - the client went away too
            pass


__all__ = ["ReplicaOptions", "build_app", "app_builder", "serve_on_ray", "deployment_options", "proxy_middlewares",
           "ReplicaFailureMiddleware", "PROXY_CALLBACK", "PROXY_CALLBACK_ENV", "REPLICA_HEADER",
           "ATTEMPTS_HEADER"]
