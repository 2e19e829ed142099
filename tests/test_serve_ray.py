"""`mlc serve --ray`: two CPU replicas of the tiny random Llama behind a local Ray Serve (its
own temp dir, 127.0.0.1), driven with the `openai` client. One deployment for the module:
starting Ray and two replicas takes ~20 s on 2 cores.

The Ray processes are the `mlc serve` process's descendants; teardown stops it with SIGINT
(it stops Serve and its Ray) and then kills, by PID, whatever of them is left. Never
`ray stop`: it kills every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import REPO, build_lib, make_tiny_llama, write_mlc_dir

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'mlc[ray]'")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.ray
API_KEY = "sk-ray-test"
MODEL = "tiny-ray"
REQUEST_TIMEOUT = 120      # a request that takes longer than this is a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny Llama with a 2048-token context, so that a stream lasts a few seconds."""
    tmp = tmp_path_factory.mktemp("tiny-ray")
    hf_model, hf_dir = make_tiny_llama(tmp, max_position_embeddings=2048)
    mlc_dir = write_mlc_dir(hf_model, tmp / "mlc", "q0f32", hf_dir=hf_dir)
    return mlc_dir, build_lib(mlc_dir)


class RayServer:
    def __init__(self, proc: subprocess.Popen, port: int, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def replica_pids(self) -> list[int]:
        """PIDs of the Serve replica processes (Ray titles them ray::ServeReplica:...)."""
        pids = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "ServeReplica" in " ".join(p.cmdline()):
                    pids.append(p.pid)
            except psutil.Error:
                pass
        return pids

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0,
                             timeout=REQUEST_TIMEOUT)


@pytest.fixture(scope="module")
def ray_server(tiny_model, tmp_path_factory):
    mlc_dir, lib = tiny_model
    tmp = tmp_path_factory.mktemp("ray-serve")
    port = _free_port()
    log_path = tmp / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                         if p)}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlc", "serve", str(mlc_dir), "--model-lib", str(lib),
             "--device", "cpu", "--served-model-name", MODEL, "--max-batch-size", "16",
             "--max-total-seq-length", "32768", "--port", str(port), "--api-key", API_KEY,
             "--ray", "--replicas", "2", "--replica-cpus", "1",
             "--ray-temp-dir", str(tmp / "ray"), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = RayServer(proc, port, log_path)
    try:
        deadline = time.monotonic() + 240
        while "Serving " not in server.log():
            assert proc.poll() is None, f"mlc serve --ray exited:\n{server.log()}"
            assert time.monotonic() < deadline, f"mlc serve --ray did not start:\n{server.log()}"
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT `mlc serve` (it shuts Serve and its Ray down), then SIGKILL by PID whatever
    of its process tree is still there."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _complete(client: openai.OpenAI, prompt: str, max_tokens: int, stream: bool) -> dict:
    """Run one request; what it returned, or how it failed."""
    out: dict = {"stream": stream}
    try:
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=stream,
            extra_body={"ignore_eos": True})
        out["replica"] = raw.headers.get_list("x-mlc-replica")
        out["attempts"] = raw.headers.get("x-mlc-attempts")
        if not stream:
            c = raw.parse()
            out.update(ok=True, ids={c.id}, text=c.choices[0].text,
                       finish=c.choices[0].finish_reason)
            return out
        ids, text, finish = set(), "", None
        out.update(ids=ids)
        for chunk in raw.parse():
            ids.add(chunk.id)
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            out["chunks"] = out.get("chunks", 0) + 1
        out.update(ok=True, text=text, finish=finish)
    except openai.APIStatusError as e:
        out.update(ok=False, status=e.status_code, body=e.response.text)
    except openai.APIError as e:       # an error event in the stream
        out.update(ok=False, status=None, message=str(e))
    return out


def test_two_replicas_serve_concurrent_requests(ray_server):
    client = ray_server.client()
    assert len(ray_server.replica_pids()) == 2, ray_server.log()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    prompts = [f"The quick brown fox {i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_complete, client, p, 24, i % 2 == 0)
                   for i, p in enumerate(prompts)]
        results = [f.result(timeout=REQUEST_TIMEOUT) for f in futures]
    for r in results:
        assert r["ok"], r
        assert r["finish"] == "length" and len(r["ids"]) == 1 and len(r["replica"]) == 1, r
    assert len({r["replica"][0] for r in results}) == 2, "both replicas take traffic"
    # Same greedy prompt on either replica: the same text (the replicas are the same model).
    greedy = {client.completions.create(model=MODEL, prompt="Hello", max_tokens=8,
                                        temperature=0).choices[0].text for _ in range(4)}
    assert len(greedy) == 1


def test_openai_errors_and_metrics_pass_through(ray_server):
    r = httpx.post(ray_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(ray_server.url + "/v1/completions", json={"model": "nope", "prompt": "x"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    metrics = httpx.get(ray_server.url + "/metrics").text
    assert "vllm:num_requests_waiting" in metrics and "vllm:kv_cache_usage_perc" in metrics


def test_sigkill_a_replica_mid_run(ray_server):
    """Kill one replica while both stream: every request completes or fails with a
    retriable error (a 5xx in OpenAI's shape, or a stream's final error event), none hangs,
    no stream mixes two replicas; Serve then replaces the replica and both serve again."""
    client = ray_server.client()
    before = ray_server.replica_pids()
    assert len(before) == 2, ray_server.log()
    seen_before = set()
    first_chunks = threading.Semaphore(0)
    n_streams, n_plain = 8, 6

    def stream(i: int) -> dict:
        out: dict = {"stream": True, "ids": set(), "text": "", "finish": None}
        try:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=f"Once upon a time {i}", max_tokens=1900, stream=True,
                extra_body={"ignore_eos": True})
            out["replica"] = raw.headers.get_list("x-mlc-replica")
            out["attempts"] = raw.headers.get("x-mlc-attempts")
            for n, chunk in enumerate(raw.parse()):
                if n == 0:
                    first_chunks.release()
                out["ids"].add(chunk.id)
                out["text"] += chunk.choices[0].text if chunk.choices else ""
                out["finish"] = (chunk.choices[0].finish_reason if chunk.choices else None) \
                    or out["finish"]
            out["ok"] = True
        except openai.APIStatusError as e:
            out.update(ok=False, status=e.status_code, body=e.response.text)
        except openai.APIError as e:
            out.update(ok=False, status=None, message=str(e))
        finally:
            first_chunks.release()      # a stream that failed before its first chunk
        return out

    with ThreadPoolExecutor(n_streams + n_plain) as pool:
        streams = [pool.submit(stream, i) for i in range(n_streams)]
        for _ in range(n_streams):
            assert first_chunks.acquire(timeout=REQUEST_TIMEOUT), "streams did not start"
        plain = [pool.submit(_complete, client, f"Water is {i}", 600, False)
                 for i in range(n_plain // 2)]
        time.sleep(0.3)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        plain += [pool.submit(_complete, client, f"Cats and dogs {i}", 32, False)
                  for i in range(n_plain - n_plain // 2)]
        results = [f.result(timeout=REQUEST_TIMEOUT) for f in streams + plain]

    cut = 0
    for r in results:
        if r.get("ok"):
            assert r["finish"] == "length", r
        elif r.get("status") is not None:
            assert r["status"] >= 500, r           # retriable
            error = json.loads(r["body"])["error"]
            assert set(error) == {"message", "type", "param", "code"}, r
        else:
            assert r["stream"] and "replica" in r["message"], r    # the final error event
            cut += 1
        assert len(r.get("ids", ())) <= 1 and len(r.get("replica", ())) <= 1, r  # not mixed
        seen_before.update(r.get("replica", ()))
    assert cut >= 1, f"no stream was cut by the kill: {results}"
    assert any(r.get("ok") for r in results if r["stream"]), "the other replica's streams"

    # Serve replaces the replica: a new replica id answers, and both take traffic again.
    deadline = t_kill + 90
    while True:
        assert time.monotonic() < deadline, f"the replica was not replaced:\n{ray_server.log()}"
        pids = ray_server.replica_pids()
        if len(pids) == 2 and victim not in pids:
            with ThreadPoolExecutor(8) as pool:
                rs = list(pool.map(lambda i: _complete(client, f"Hi {i}", 24, i % 2 == 1),
                                   range(8)))
            if all(r.get("ok") for r in rs) and len({r["replica"][0] for r in rs}) == 2 \
                    and {r["replica"][0] for r in rs} - seen_before:
                break
        time.sleep(1)
    retried = sum(1 for r in results if int(r.get("attempts") or 1) > 1)
    print(f"\nkill: {cut} streams cut, {retried} requests retried on the other replica, "
          f"{sum(1 for r in results if r.get('ok'))}/{len(results)} completed; replaced "
          f"and serving on both in {time.monotonic() - t_kill:.1f} s")
