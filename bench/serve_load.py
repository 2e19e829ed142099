"""Load an `mlc serve` server with N concurrent streaming chat clients (stdlib only).

    python bench/serve_load.py MODEL_DIR --model-lib LIB --device cuda --clients 64 --json out.json

Starts the server as a subprocess, waits for /health, sends one round of N concurrent streaming
requests (ignore_eos, fixed max_tokens), and reports TTFT and per-request latency percentiles,
total output tok/s, and whether any stream was cut short or mixed up.
"""

import argparse
import http.client
import json
import os
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


def one_client(port: int, i: int, max_tokens: int, out: dict) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": f"Client {i}: tell me a story."}],
                       "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 0.7, "seed": i,
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--model-lib")
    p.add_argument("--device", default="auto")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "mlc.cli.main", "serve", a.model, "--device", a.device,
           "--port", str(port), "--mode", "server", "--max-batch-size", "64"]
    if a.model_lib:
        cmd += ["--model-lib", a.model_lib]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        one_client(port, -1, 8, {})                  # warm up
        results: dict = {}
        t0 = time.perf_counter()
        threads = [threading.Thread(target=one_client, args=(port, i, a.max_tokens, results))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
    ttfts = sorted(r["ttft_s"] for r in results.values() if r["ttft_s"] is not None)
    lats = sorted(r["latency_s"] for r in results.values())
    tokens = sum(r["tokens"] for r in results.values())
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    summary = {
        "clients": a.clients, "max_tokens": a.max_tokens, "wall_s": wall,
        "output_tok_s": tokens / wall, "completion_tokens": tokens,
        "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": pct(ttfts, 0.9),
        "latency_p50_s": statistics.median(lats), "latency_p90_s": pct(lats, 0.9),
        "all_done": all(r["done"] and r["tokens"] == a.max_tokens for r in results.values()),
        "one_id_per_stream": all(r["ids"] == 1 for r in results.values()),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
    }
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
