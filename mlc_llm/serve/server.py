"""`mlc_llm.serve.PopenServer`: `mlc serve` in a subprocess, for tests and notebooks.

    with PopenServer(model_dir, model_lib=lib, device="cpu", port=8082) as server:
        client = openai.OpenAI(base_url=server.openai_v1_base_url, api_key="none")

The constructor takes MLC-LLM's arguments. The server runs `python -m mlc_llm serve ...` (so
MLC-LLM's options go through the same checks as on the command line) with the same mlc as
the caller; its output goes to `log_path`, and a server that fails to start raises with the
end of that log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # holds mlc/ and mlc_llm/


class PopenServer:
    """An `mlc serve` process, ready when `start()` returns; `terminate()` stops it."""

    def __init__(self, model: str, device: str = "auto", *, model_lib: str | None = None,
                 mode: str = "local", engine_config: Any = None, enable_debug: bool = True,
                 enable_tracing: bool = False, host: str = "127.0.0.1", port: int = 8082,
                 startup_timeout: float = 600.0):
        self.model = str(model)
        self.device = str(device)
        self.model_lib = None if model_lib is None else str(model_lib)
        self.mode = mode
        self.engine_config = engine_config
        self.enable_debug = enable_debug
        self.enable_tracing = enable_tracing
        self.host = host
        self.port = int(port)
        self.startup_timeout = startup_timeout
        self.base_url = f"http://{host}:{self.port}"
        self.openai_v1_base_url = f"{self.base_url}/v1"
        self.log_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        """The command line `start()` runs."""
        cmd = [sys.executable, "-m", "mlc_llm", "serve", self.model, "--device", self.device,
               "--mode", self.mode, "--host", self.host, "--port", str(self.port)]
        if self.model_lib is not None:
            cmd += ["--model-lib", self.model_lib]
        cmd += _engine_config_args(self.engine_config)
        if self.enable_debug:
            cmd.append("--enable-debug")
        if self.enable_tracing:
            cmd.append("--enable-tracing")
        return cmd

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        """Launch the server and wait until `GET /v1/models` answers 200."""
        if self._proc is not None:
            raise RuntimeError(f"This PopenServer already runs on {self.base_url}.")
        _check_port_free(self.host, self.port)
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT),
                                                          env.get("PYTHONPATH")]))
        fd, log = tempfile.mkstemp(prefix="mlc-serve-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "wb")
        # its own session, so that terminate() stops the server and anything it started
        self._proc = subprocess.Popen(self.command(), env=env, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            code = self._proc.poll()
            if code is not None:
                self.terminate()
                raise RuntimeError(f"The server exited with code {code} while starting. Its "
                                   f"log ({self.log_path}) ends with:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.terminate()
                raise RuntimeError(f"The server did not answer on {self.base_url} within "
                                   f"{self.startup_timeout:.0f} s (startup_timeout=). Its log "
                                   f"({self.log_path}) ends with:\n{self._log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.openai_v1_base_url}/models", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and wait for it."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PopenServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


def _engine_config_args(cfg: Any) -> list[str]:
    """`mlc_llm serve` options for the settings of an EngineConfig (MLC-LLM's or mlc's)."""
    if cfg is None:
        return []
    get = lambda name, default=None: getattr(cfg, name, default)
    args: list[str] = []
    for model in get("additional_models") or []:
        args += ["--additional-models",
                 model if isinstance(model, str) else ",".join(map(str, model))]
    if get("speculative_mode", "disable") != "disable":
        args += ["--speculative-mode", get("speculative_mode")]
    if get("prefix_cache_mode", "radix") != "radix":
        args += ["--prefix-cache-mode", get("prefix_cache_mode")]
    overrides = {
        "max_num_sequence": get("max_num_sequence", get("max_batch_size")),
        "max_total_seq_length": get("max_total_sequence_length"),
        "prefill_chunk_size": get("prefill_chunk_size"),
        "gpu_memory_utilization": get("gpu_memory_utilization"),
        "max_history_size": get("max_history_size"),
        "context_window_size": get("max_single_sequence_length"),
        "spec_draft_length": get("spec_draft_length") or None,   # 0: adaptive (the default)
    }
    text = ";".join(f"{k}={v}" for k, v in overrides.items() if v is not None)
    return args + (["--overrides", text] if text else [])


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"Cannot serve on {host}:{port}: {e.strerror}. Another server "
                               "probably uses the port; pass another port=.") from None


__all__ = ["PopenServer"]
