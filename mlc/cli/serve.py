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
    "log_level": "uvicorn log level.",
    "verbose": "Log the engine configuration and memory plan.",
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
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help=HELP["log_level"])
@click.option("--verbose", is_flag=True, help=HELP["verbose"])
def serve(model: str, model_lib: str | None, device: str, mode: str, host: str, port: int,
          api_key: str | None, max_batch_size: int | None, max_total_seq_length: int | None,
          prefill_chunk_size: int | None, max_waiting_requests: int | None,
          max_body_bytes: int | None, log_level: str, verbose: bool) -> None:
    """Serve MODEL over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    MODEL: an MLC model dir, HF://org/repo, or SmolLM2-135M-Instruct.
    """
    from mlc.runtime.engine import AsyncMLCEngine
    from mlc.serve.app import create_app
    from mlc.serve.server import run_server

    engine = AsyncMLCEngine(model, device, model_lib=model_lib, mode=mode,
                            max_batch_size=max_batch_size,
                            max_total_sequence_length=max_total_seq_length,
                            prefill_chunk_size=prefill_chunk_size, verbose=verbose)
    limits = {k: v for k, v in (("max_waiting_requests", max_waiting_requests),
                                ("max_body_bytes", max_body_bytes)) if v is not None}
    app = create_app(engine, api_key=api_key, **limits)
    click.echo(f"Serving {engine.model_name} on http://{host}:{port}/v1 "
               f"(device {engine.model.device_kind}, max_batch_size "
               f"{engine.plan.max_batch_size}, context {engine.plan.context_window_size})")
    try:
        run_server(app, host, port, log_level=log_level)
    finally:
        engine.terminate()
