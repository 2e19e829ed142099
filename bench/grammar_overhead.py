"""Decode throughput with and without a JSON schema (grammar-constrained decoding), at batch 1
and batch 16, in the same run on the same engine.

Each case submits `batch` concurrent completion requests of `--max-tokens` tokens (greedy,
ignore_eos) to one `AsyncMLCEngine`, free or with `response_format` json_schema (an array of
at least 64 small objects, so the grammar never ends the output before max_tokens), and reads
the engine's own decode counters (`stats().decode_tokens / decode_seconds`: the decode steps,
forward pass + masks + sampling + accept) and the wall-clock output tok/s. Cases alternate
(free, schema, free, schema ...) `--runs` times and the median is kept, so load drift on a
shared machine hits both alike. Prints a table; `--json PATH` writes it with machine and date.

    PYTHONPATH=. python bench/grammar_overhead.py MODEL [--model-lib LIB] [--device cpu]
        [--max-tokens 64] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import time

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                     "name": {"type": "string", "maxLength": 12}},
    "required": ["id", "name"], "additionalProperties": False}}
PROMPT = "A JSON list of users with ids and names:"


async def one_case(engine, batch: int, max_tokens: int, constrained: bool) -> dict:
    extra = {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "users", "schema": SCHEMA}}} \
        if constrained else {}

    async def one(i: int) -> tuple[int, str | None]:
        tokens, reason = 0, None
        async for out in await engine.generate(PROMPT, max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True, **extra):
            for d in out.deltas:
                tokens += len(d.token_ids)
                reason = d.finish_reason or reason
        return tokens, reason

    before = engine.stats()
    t0 = time.perf_counter()
    results = await asyncio.gather(*[one(i) for i in range(batch)])
    wall = time.perf_counter() - t0
    after = engine.stats()
    tokens = sum(t for t, _ in results)
    assert all(r == "length" for _, r in results), results       # no early grammar end
    decode_tokens = after.decode_tokens - before.decode_tokens
    decode_s = after.decode_seconds - before.decode_seconds
    return {"decode_tok_s": decode_tokens / decode_s, "output_tok_s": tokens / wall,
            "tokens": tokens, "wall_s": wall}


async def run(a) -> list[dict]:
    from mlc import AsyncMLCEngine

    engine = AsyncMLCEngine(a.model, a.device, model_lib=a.model_lib,
                            max_batch_size=max(a.batch), max_total_sequence_length=4096,
                            prefill_chunk_size=256)
    try:
        await one_case(engine, 1, 8, True)           # warm up (and build the grammar compiler)
        await one_case(engine, 1, 8, False)
        rows = []
        for batch in a.batch:
            samples: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(a.runs):
                for constrained in (False, True):
                    samples[constrained].append(
                        await one_case(engine, batch, a.max_tokens, constrained))
            med = {c: {k: statistics.median(s[k] for s in samples[c])
                       for k in ("decode_tok_s", "output_tok_s")} for c in samples}
            rows.append({"batch": batch, "free": med[False], "json_schema": med[True],
                         "decode_overhead_pct": 100 * (1 - med[True]["decode_tok_s"]
                                                       / med[False]["decode_tok_s"]),
                         "output_overhead_pct": 100 * (1 - med[True]["output_tok_s"]
                                                       / med[False]["output_tok_s"]),
                         "samples": {"free": samples[False], "json_schema": samples[True]}})
        return rows
    finally:
        engine.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="SmolLM2-135M-Instruct")
    p.add_argument("--model-lib")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args()
    rows = asyncio.run(run(a))
    print(f"{'batch':>5} | {'free decode tok/s':>17} | {'schema decode tok/s':>19} | "
          f"{'overhead':>8} | {'free out tok/s':>14} | {'schema out tok/s':>16} | overhead")
    for r in rows:
        print(f"{r['batch']:>5} | {r['free']['decode_tok_s']:>17.1f} | "
              f"{r['json_schema']['decode_tok_s']:>19.1f} | {r['decode_overhead_pct']:>7.1f}% | "
              f"{r['free']['output_tok_s']:>14.1f} | {r['json_schema']['output_tok_s']:>16.1f} | "
              f"{r['output_overhead_pct']:.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                       "args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
