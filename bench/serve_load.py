"""The server's rate against the engine's own, in one run: N concurrent streaming chat
clients on `mlc serve`, and the same N requests on the engine alone.

    python bench/serve_load.py MODEL_DIR --model-lib LIB --device cuda --clients 64 --json out.json

- Engine alone: a subprocess loads `AsyncMLCEngine` with the server's settings; each round
  is N concurrent requests (the chat prompt of each client through `generate`: the engine's
  own outputs, no HTTP, no response objects).
- Server: `mlc serve` as a subprocess; each round is N concurrent streaming HTTP clients
  (ignore_eos, fixed max_tokens): stdlib http.client, one thread each, or with
  `--client asyncio` all on one asyncio loop in this process (a lighter load generator).
With `--fake-model` both run over `mlc.runtime.fake_runner.FakeRunner` instead of the model
(MODEL is then only read for its chat config and tokenizer): only token ids reach the host,
and each step takes `--fake-step-ms` of "device" time as on a GPU (the forward call only
launches it; reading the sampled ids back waits for it without the GIL). Everything else is real (scheduler, device-sampling path, detokenizer, the app and uvicorn,
started by this script as `mlc serve` would), so at 0 ms the engine's rate is its host ceiling
and the server's rate the server's; `--fake-step-ms 8` imitates SmolLM2's batch-64 step on an
H200. Each round also reports the CPU seconds per output token of the engine process, the
server process and this client process (all threads), which a busy shared machine disturbs
less than wall time.
Both are loaded at once (each with a KV cache of `--kv-tokens`) and their rounds alternate,
engine then server, `--runs` times, so a machine whose load changes over the run (a shared
CPU box) weighs on both alike; the idle one waits without using the machine. Reports output
tok/s per round and the medians, server / engine, TTFT and latency percentiles, and whether
any stream was cut short or mixed up.
"""

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Client {i}: tell me a story."}]


def sampling(i: int, max_tokens: int) -> dict:
    return {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7, "seed": i}


def load_engine(a):
    """The AsyncMLCEngine both processes serve (over the fake runner with --fake-model)."""
    kwargs = dict(mode="server", max_batch_size=a.clients, max_total_sequence_length=a.kv_tokens)
    if a.fake_model:
        from mlc.runtime.fake_runner import FakeAsyncMLCEngine

        return FakeAsyncMLCEngine(a.model, step_s=a.fake_step_ms / 1000, **kwargs)
    from mlc import AsyncMLCEngine

    return AsyncMLCEngine(a.model, a.device, model_lib=a.model_lib, **kwargs)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process so far, all its threads (this one's by default)."""
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_worker(a) -> None:
    """The server process of --fake-model: the app over the fake engine, served by uvicorn as
    `mlc serve` does (`mlc.cli.serve`)."""
    from mlc.serve.app import create_app
    from mlc.serve.server import run_server

    engine = load_engine(a)
    try:
        if a.uvicorn_loop == "auto":        # what `mlc serve` runs (uvloop when installed)
            run_server(create_app(engine), "127.0.0.1", a.port, log_level="warning")
        else:
            import uvicorn

            uvicorn.run(create_app(engine), host="127.0.0.1", port=a.port,
                        log_level="warning", loop=a.uvicorn_loop)
    finally:
        engine.terminate()


def engine_worker(a) -> None:
    """The engine-alone process: load, warm up, print READY, then one round of N concurrent
    requests per "run" line on stdin (printing ROUND <json>), until "quit"."""
    import asyncio

    engine = load_engine(a)

    async def one(i: int, max_tokens: int) -> tuple[int, float | None]:
        t0 = time.perf_counter()
        ids = engine.encode_chat(messages(i))
        tokens, ttft = 0, None
        async for out in await engine.generate(ids, **sampling(i, max_tokens)):
            tokens += sum(len(d.token_ids) for d in out.deltas)
            ttft = ttft or time.perf_counter() - t0
        return tokens, ttft

    async def one_round() -> dict:
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        results = await asyncio.gather(*[one(i, a.max_tokens) for i in range(a.clients)])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        tokens = sum(n for n, _ in results)
        return {"wall_s": wall, "tokens": tokens, "output_tok_s": tokens / wall,
                "ttft_p50_s": statistics.median(t for _, t in results),
                "cpu_us_per_token": 1e6 * cpu / tokens}

    try:
        asyncio.run(one(-1, 8))                               # warm up
        print("READY", engine.sampling_path, flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            print("ROUND " + json.dumps(asyncio.run(one_round())), flush=True)
    finally:
        engine.terminate()


def one_client(port: int, i: int, max_tokens: int, out: dict) -> None:
    body = json.dumps({"messages": messages(i), "stream": True, **sampling(i, max_tokens),
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    ttft, chunks, ids, done, tokens = None, 0, set(), False, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        ids.add(chunk["id"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = ttft or time.perf_counter() - t0
            chunks += 1
    out[i] = {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "chunks": chunks,
              "tokens": tokens, "ids": len(ids), "done": done}


async def one_client_async(port: int, i: int, max_tokens: int, out: dict) -> None:
    """`one_client` on one asyncio connection: HTTP/1.1 with its chunked body decoded by
    hand, so 64 clients cost one thread a few microseconds per event (the threaded clients
    share their process's GIL, which delays their reads)."""
    import asyncio

    body = json.dumps({"messages": messages(i), "stream": True, **sampling(i, max_tokens),
                       "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    status = await reader.readline()
    headers = []
    while (line := await reader.readline()) not in (b"\r\n", b""):
        headers.append(line.lower())
    if b" 200 " not in status or b"transfer-encoding: chunked\r\n" not in headers:
        raise RuntimeError(f"client {i}: unexpected response {status!r} {headers}")
    ttft, chunks, ids, done, tokens, pending = None, 0, set(), False, 0, b""
    while not done and (size := int((await reader.readline()).strip(), 16)):
        pending += (await reader.readexactly(size + 2))[:-2]
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if event == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(event[len(b"data: "):])
            ids.add(chunk["id"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - t0
                chunks += 1
    writer.close()
    out[i] = {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "chunks": chunks,
              "tokens": tokens, "ids": len(ids), "done": done}


def start_server(a) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlc.cli.main", "serve", a.model, "--device", a.device,
           "--port", str(port), "--mode", "server", "--max-batch-size", str(a.clients),
           "--max-total-seq-length", str(a.kv_tokens), "--log-level", "warning"]
    if a.model_lib:
        cmd += ["--model-lib", a.model_lib]
    if a.fake_model:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--server-worker", "--port", str(port)]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    for _ in range(1200):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.5)
    one_client(port, -1, 8, {})                       # warm up
    return server, port


def server_round(port: int, pid: int, a) -> dict:
    results: dict = {}
    t0, server_cpu0, client_cpu0 = time.perf_counter(), cpu_seconds(pid), cpu_seconds()
    if a.client == "asyncio":
        import asyncio

        async def clients():
            await asyncio.gather(*[one_client_async(port, i, a.max_tokens, results)
                                   for i in range(a.clients)])
        asyncio.run(clients())
    else:
        threads = [threading.Thread(target=one_client, args=(port, i, a.max_tokens, results))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    summary = round_summary(results, time.perf_counter() - t0, a)
    tokens = max(summary["tokens"], 1)
    summary["cpu_us_per_token"] = 1e6 * (cpu_seconds(pid) - server_cpu0) / tokens
    summary["client_cpu_us_per_token"] = 1e6 * (cpu_seconds() - client_cpu0) / tokens
    return summary


def round_summary(results: dict, wall: float, a) -> dict:
    ttfts = sorted(r["ttft_s"] for r in results.values() if r["ttft_s"] is not None)
    lats = sorted(r["latency_s"] for r in results.values())
    tokens = sum(r["tokens"] for r in results.values())
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {
        "wall_s": wall, "tokens": tokens, "output_tok_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": pct(ttfts, 0.9),
        "latency_p50_s": statistics.median(lats), "latency_p90_s": pct(lats, 0.9),
        "all_done": all(r["done"] and r["tokens"] == a.max_tokens for r in results.values()),
        "one_id_per_stream": all(r["ids"] == 1 for r in results.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--model-lib")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--kv-tokens", type=int, default=0,
                   help="KV-cache tokens of each process (default: clients x (max_tokens + 128))")
    p.add_argument("--client", choices=("threads", "asyncio"), default="threads",
                   help="the streaming clients: one http.client thread each (as every figure "
                        "recorded before this option), or all on one asyncio loop (lighter)")
    p.add_argument("--fake-model", action="store_true",
                   help="run both over the fake runner (mlc.runtime.fake_runner): host costs only")
    p.add_argument("--fake-step-ms", type=float, default=0.0,
                   help="with --fake-model: device milliseconds per step (0: host costs only)")
    p.add_argument("--uvicorn-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="with --fake-model: the server's event loop (auto: as `mlc serve`)")
    p.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.kv_tokens = a.kv_tokens or a.clients * (a.max_tokens + 128)
    if a.engine_worker:
        engine_worker(a)
        return
    if a.server_worker:
        server_worker(a)
        return
    worker = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--engine-worker"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy())
    server = None
    try:
        ready = []
        for line in worker.stdout:                    # (loading may print first)
            if line.startswith("READY"):
                ready = line.split()
                break
        if not ready:
            sys.exit("the engine-alone process failed to start")
        server, port = start_server(a)
        engine_rounds, server_rounds = [], []
        for _ in range(a.runs):
            worker.stdin.write("run\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line.startswith("ROUND "):
                sys.exit(f"the engine-alone round failed: {line!r}")
            engine_rounds.append(json.loads(line[len("ROUND "):]))
            server_rounds.append(server_round(port, server.pid, a))
        worker.stdin.write("quit\n")
        worker.stdin.flush()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        worker.wait(timeout=60)
    engine = {"rounds": engine_rounds, "sampling": ready[1]}
    server = server_rounds
    engine_rate = statistics.median(r["output_tok_s"] for r in engine["rounds"])
    server_rate = statistics.median(r["output_tok_s"] for r in server)
    summary = {
        "clients": a.clients, "max_tokens": a.max_tokens, "runs": a.runs,
        "engine_tok_s": engine_rate, "server_tok_s": server_rate,
        "server_over_engine": server_rate / engine_rate,
        "server_over_engine_per_pair_median": statistics.median(
            s["output_tok_s"] / e["output_tok_s"] for s, e in zip(server, engine["rounds"])),
        "engine_rounds_tok_s": [r["output_tok_s"] for r in engine["rounds"]],
        "server_rounds_tok_s": [r["output_tok_s"] for r in server],
        "engine_ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in engine["rounds"]),
        "server_ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in server),
        "engine_cpu_us_per_token": statistics.median(
            r["cpu_us_per_token"] for r in engine["rounds"]),
        "server_cpu_us_per_token": statistics.median(r["cpu_us_per_token"] for r in server),
        "client_cpu_us_per_token": statistics.median(
            r["client_cpu_us_per_token"] for r in server),
        "client": a.client, "fake_model": a.fake_model, "fake_step_ms": a.fake_step_ms if a.fake_model else None,
        "sampling": engine["sampling"], "server_rounds": server,
        "all_done": all(r["all_done"] for r in server),
        "one_id_per_stream": all(r["one_id_per_stream"] for r in server),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "machine": platform.node(), "cpu": _cpu_name(), "load_average": os.getloadavg(),
    }
    print(json.dumps(summary, indent=1))
    print(f"engine alone {engine_rate:,.0f} tok/s, server {server_rate:,.0f} tok/s: "
          f"{server_rate / engine_rate:.2f}x (median of per-round ratios "
          f"{summary['server_over_engine_per_pair_median']:.2f}x); CPU per token: engine "
          f"{summary['engine_cpu_us_per_token']:.0f} us, server "
          f"{summary['server_cpu_us_per_token']:.0f} us, clients "
          f"{summary['client_cpu_us_per_token']:.0f} us; TTFT p50: engine "
          f"{summary['engine_ttft_p50_s'] * 1e3:.0f} ms, server "
          f"{summary['server_ttft_p50_s'] * 1e3:.0f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
