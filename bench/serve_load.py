"""The server's rate against the engine's own, in one run: N concurrent streaming chat
clients on `mlc serve`, and the same N requests on the engine alone.

    python bench/serve_load.py MODEL_DIR --model-lib LIB --device cuda --clients 64 --json out.json

- Engine alone: a subprocess loads `AsyncMLCEngine` with the server's settings; each round
  is N concurrent requests (the chat prompt of each client through `generate`: the engine's
  own outputs, no HTTP, no response objects).
- Server: `mlc serve` as a subprocess; each round is N concurrent streaming HTTP clients
  (stdlib http.client, one thread each; ignore_eos, fixed max_tokens).
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


def engine_worker(a) -> None:
    """The engine-alone process: load, warm up, print READY, then one round of N concurrent
    requests per "run" line on stdin (printing ROUND <json>), until "quit"."""
    import asyncio

    from mlc import AsyncMLCEngine

    engine = AsyncMLCEngine(a.model, a.device, model_lib=a.model_lib, mode="server",
                            max_batch_size=a.clients, max_total_sequence_length=a.kv_tokens)

    async def one(i: int, max_tokens: int) -> int:
        ids = engine.encode_chat(messages(i))
        tokens = 0
        async for out in await engine.generate(ids, **sampling(i, max_tokens)):
            tokens += sum(len(d.token_ids) for d in out.deltas)
        return tokens

    async def one_round() -> dict:
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*[one(i, a.max_tokens) for i in range(a.clients)]))
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": tokens, "output_tok_s": tokens / wall}

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


def start_server(a) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlc.cli.main", "serve", a.model, "--device", a.device,
           "--port", str(port), "--mode", "server", "--max-batch-size", str(a.clients),
           "--max-total-seq-length", str(a.kv_tokens), "--log-level", "warning"]
    if a.model_lib:
        cmd += ["--model-lib", a.model_lib]
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


def server_round(port: int, a) -> dict:
    results: dict = {}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(port, i, a.max_tokens, results))
               for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round_summary(results, time.perf_counter() - t0, a)


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
    p.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.kv_tokens = a.kv_tokens or a.clients * (a.max_tokens + 128)
    if a.engine_worker:
        engine_worker(a)
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
            server_rounds.append(server_round(port, a))
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
        "sampling": engine["sampling"], "server_rounds": server,
        "all_done": all(r["all_done"] for r in server),
        "one_id_per_stream": all(r["one_id_per_stream"] for r in server),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "machine": platform.node(), "cpu": _cpu_name(), "load_average": os.getloadavg(),
    }
    print(json.dumps(summary, indent=1))
    print(f"engine alone {engine_rate:,.0f} tok/s, server {server_rate:,.0f} tok/s: "
          f"{server_rate / engine_rate:.2f}x (median of per-round ratios "
          f"{summary['server_over_engine_per_pair_median']:.2f}x)")
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
