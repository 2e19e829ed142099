"""`mlc serve MODEL`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import click

HELP = {
    "model": "An MLC model dir, HF://org/repo, or an embedded model (SmolLM2-135M-Instruct, "
             "gemma3-270m).",
    "model_lib": "The compiled model library (.so); compiled on demand and cached if omitted.",
    "device": 'Device: "auto", "cpu", "cuda", "cuda:1", ...',
    "mode": "Engine mode setting default limits: local, interactive or server.",
    "host": "Interface to listen on.",
    "port": "Port to listen on.",
    "api_key": "Require 'Authorization: Bearer KEY' on /v1 routes (env MLC_API_KEY).",
    "max_batch_size": "Most sequences decoded together (default: from the mode).",
    "max_total_seq_length": "KV cache capacity in tokens (default: from the mode and memory).",
    "prefill_chunk_size": "Most prompt tokens prefilled in one step (default: from the mode).",
    "max_waiting_requests": "Answer 429 when this many requests already wait for a slot.",
    "max_body_bytes": "Answer 413 to request bodies larger than this.",
    "served_model_name": "The model id clients see and send (default: the model dir's name).",
    "log_level": "uvicorn log level.",
    "verbose": "Log the engine configuration and memory plan.",
    "enable_tracing": "Record per-request events (Chrome trace; POST /debug/dump_event_trace).",
    "enable_debug": "Serve the /debug routes (POST /debug/dump_event_trace).",
    "embedding_pooling": "How /v1/embeddings pools the final hidden states: the last "
                         "token's, or the mean over tokens (a request's 'pooling' overrides).",
    "ray": "Serve replicas on Ray Serve (pip install 'mlc[ray]'); every option above holds "
           "per replica.",
    "replicas": "With --ray: the number of replicas (the minimum with --max-replicas).",
    "max_replicas": "With --ray: autoscale up to this many replicas on ongoing requests.",
    "replica_cpus": "With --ray: CPUs per replica, also its TVM_NUM_THREADS (default: a local "
                    "Ray's cores shared out among the replicas; 1 on a cluster).",
    "replica_gpus": "With --ray: GPUs per replica (default: 1 for --device cuda*, else 0).",
    "ray_address": "With --ray: join this Ray cluster (e.g. auto, or ray://host:10001) "
                   "instead of starting a local Ray.",
    "ray_temp_dir": "With --ray and no --ray-address: the local Ray's temp dir (default: a new "
                    "dir under /tmp, removed on exit).",
    "speculative_mode": "Speculative decoding: disable, ngram (prompt lookup), small_draft (a "
                        "draft model) or eagle (an EAGLE head); the last two need "
                        "--additional-models.",
    "spec_draft_length": "Most draft tokens verified per sequence and step (default 4).",
    "additional_models": "The draft model (small_draft) or EAGLE head (eagle): MODEL or "
                         "MODEL:LIB.",
    "prefix_cache_mode": "radix: reuse the KV entries of shared prompt prefixes; disable.",
}


@click.command("serve")
@click.argument("model")
@click.option("--model-lib", default=None, help=HELP["model_lib"])
@click.option("--device", default="auto", show_default=True, help=HELP["device"])
@click.option("--mode", default="server", show_default=True,
              type=click.Choice(["local", "interactive", "server"]), help=HELP["mode"])
@click.option("--host", default="127.0.0.1", show_default=True, help=HELP["host"])
@click.option("--port", default=8000, show_default=True, type=int, help=HELP["port"])
@click.option("--api-key", default=None, envvar="MLC_API_KEY", help=HELP["api_key"])
@click.option("--max-batch-size", type=int, default=None, help=HELP["max_batch_size"])
@click.option("--max-total-seq-length", type=int, default=None,
              help=HELP["max_total_seq_length"])
@click.option("--prefill-chunk-size", type=int, default=None, help=HELP["prefill_chunk_size"])
@click.option("--max-waiting-requests", type=int, default=None,
              help=HELP["max_waiting_requests"])
@click.option("--max-body-bytes", type=int, default=None, help=HELP["max_body_bytes"])
@click.option("--served-model-name", default=None, help=HELP["served_model_name"])
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help=HELP["log_level"])
@click.option("--verbose", is_flag=True, help=HELP["verbose"])
@click.option("--enable-tracing", is_flag=True, help=HELP["enable_tracing"])
@click.option("--enable-debug", is_flag=True, help=HELP["enable_debug"])
@click.option("--embedding-pooling", default="last", show_default=True,
              type=click.Choice(["last", "mean"]), help=HELP["embedding_pooling"])
@click.option("--ray", "use_ray", is_flag=True, help=HELP["ray"])
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help=HELP["replicas"])
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help=HELP["max_replicas"])
@click.option("--replica-cpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help=HELP["replica_cpus"])
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=None,
              help=HELP["replica_gpus"])
@click.option("--ray-address", default=None, help=HELP["ray_address"])
@click.option("--ray-temp-dir", default=None, help=HELP["ray_temp_dir"])
@click.option("--speculative-mode", default="disable", show_default=True,
              type=click.Choice(["disable", "ngram", "small_draft", "eagle"]),
              help=HELP["speculative_mode"])
@click.option("--spec-draft-length", type=int, default=None, help=HELP["spec_draft_length"])
@click.option("--additional-models", multiple=True, help=HELP["additional_models"])
@click.option("--prefix-cache-mode", default="radix", show_default=True,
              type=click.Choice(["radix", "disable"]), help=HELP["prefix_cache_mode"])
def serve(model: str, model_lib: str | None, device: str, mode: str, host: str, port: int,
          api_key: str | None, max_batch_size: int | None, max_total_seq_length: int | None,
          prefill_chunk_size: int | None, max_waiting_requests: int | None,
          max_body_bytes: int | None, served_model_name: str | None, log_level: str,
          verbose: bool, enable_tracing: bool, enable_debug: bool, embedding_pooling: str,
          use_ray: bool,
          replicas: int, max_replicas: int | None, replica_cpus: float | None,
          replica_gpus: float | None, ray_address: str | None, ray_temp_dir: str | None,
          speculative_mode: str, spec_draft_length: int | None,
          additional_models: tuple[str, ...], prefix_cache_mode: str) -> None:
    """Serve MODEL over OpenAI's HTTP API (/v1/chat/completions, /v1/completions,
    /v1/embeddings, /v1/models).

    MODEL: an MLC model dir, HF://org/repo, or SmolLM2-135M-Instruct.
    """
    engine_kwargs = dict(device=device, model_lib=model_lib, mode=mode,
                         max_batch_size=max_batch_size,
                         max_total_sequence_length=max_total_seq_length,
                         prefill_chunk_size=prefill_chunk_size, verbose=verbose,
                         served_model_name=served_model_name, enable_tracing=enable_tracing,
                         speculative_mode=speculative_mode, spec_draft_length=spec_draft_length,
                         additional_models=list(additional_models),
                         prefix_cache_mode=prefix_cache_mode,
                         embedding_pooling=embedding_pooling)
    limits = {k: v for k, v in (("max_waiting_requests", max_waiting_requests),
                                ("max_body_bytes", max_body_bytes)) if v is not None}
    limits["enable_debug"] = enable_debug          # create_app's options, per replica too
    if use_ray:
        from mlc.serve.ray import serve_on_ray

        serve_on_ray(model, engine_kwargs, limits, api_key=api_key, host=host, port=port,
                     replicas=replicas, max_replicas=max_replicas, replica_cpus=replica_cpus,
                     replica_gpus=replica_gpus, ray_address=ray_address,
                     ray_temp_dir=ray_temp_dir, log_level=log_level)
        return
    ray_only = [name for name, value in (
        ("--replicas", replicas != 1), ("--max-replicas", max_replicas),
        ("--replica-cpus", replica_cpus), ("--replica-gpus", replica_gpus),
        ("--ray-address", ray_address), ("--ray-temp-dir", ray_temp_dir)) if value]
    if ray_only:
        raise click.UsageError(f"{', '.join(ray_only)} only appl"
                               f"{'y' if len(ray_only) > 1 else 'ies'} with --ray.")
    from mlc.runtime.engine import AsyncMLCEngine
    from mlc.serve.app import create_app
    from mlc.serve.server import run_server

    engine = AsyncMLCEngine(model, **engine_kwargs)
    app = create_app(engine, api_key=api_key, **limits)
    click.echo(f"Serving {engine.model_id} on http://{host}:{port}/v1 "
               f"(device {engine.model.device_kind}, max_batch_size "
               f"{engine.limits.max_batch_size}, context {engine.limits.context_window_size})")
    try:
        run_server(app, host, port, log_level=log_level)
    finally:
        engine.terminate()
