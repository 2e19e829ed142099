"""Cost of grammar token masks (mlc.runtime.grammar) on SmolLM2's 49152-token vocabulary.

Each case walks a `GrammarProcessor` along the tokens of a valid output (JSON in the layout
the grammar enforces, or a forced tool call) and times, per step: `token_bitmask()` (the packed
int32 mask llguidance writes), `token_mask()` (the bool[vocab] the OutputProcessor receives,
bitmask + unpack) and `accept()`. It also times `fill_token_bitmasks` for 16 sequences at once
(llguidance's thread pool), and grammar compilation (first compile of a schema, then a cache
hit, and a new processor). Prints a table; `--json PATH` writes it with machine and date.

    python bench/grammar_masks.py [--repeat 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "emails": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 3},
    "address": {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"},
        "country": {"enum": ["FR", "DE", "JP", "US"]}},
        "required": ["street", "city", "country"], "additionalProperties": False}},
    "required": ["name", "age", "emails", "address"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "emails": ["ada@example.org"],
            "address": {"street": "12 St James's Square", "city": "London", "country": "US"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time"}}]
CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>')


def _tokenizer():
    from tokenizers import Tokenizer

    from mlc.compiler.sources.embedded import embedded_gguf_path
    from mlc.compiler.sources.gguf_file import GGUFSource

    source = GGUFSource(embedded_gguf_path(quiet=True))
    return Tokenizer.from_str(source.tokenizer_files["tokenizer.json"].decode())


def _us(samples):
    samples = sorted(samples)
    return {"median": round(statistics.median(samples), 1),
            "p90": round(samples[int(0.9 * (len(samples) - 1))], 1),
            "max": round(samples[-1], 1)}


def _walk(compiled, ids, repeat):
    times = {"token_bitmask": [], "token_mask": [], "accept": []}
    for _ in range(repeat):
        a, b = compiled.processor(), compiled.processor()
        for tok in ids:
            t0 = time.perf_counter()
            a.token_bitmask()
            t1 = time.perf_counter()
            mask = b.token_mask()
            t2 = time.perf_counter()
            assert mask[tok]
            a.accept(tok)
            t3 = time.perf_counter()
            b.accept(tok)
            times["token_bitmask"].append((t1 - t0) * 1e6)
            times["token_mask"].append((t2 - t1) * 1e6)
            times["accept"].append((t3 - t2) * 1e6)
    return {k: _us(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import numpy as np

    from mlc.runtime import grammar as G
    from mlc.runtime import tool_calls as T

    tok = _tokenizer()
    t0 = time.perf_counter()
    compiler = G.GrammarCompiler(tok, 49152, [2])
    results = {"tokenizer_build_ms": round((time.perf_counter() - t0) * 1e3, 1)}

    t0 = time.perf_counter()
    schema = compiler.compile(G.json_schema_grammar(SCHEMA))
    results["compile_schema_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    t0 = time.perf_counter()
    compiler.compile(G.json_schema_grammar(SCHEMA))
    results["compile_cached_us"] = round((time.perf_counter() - t0) * 1e6, 1)
    t0 = time.perf_counter()
    schema.processor()
    results["new_processor_us"] = round((time.perf_counter() - t0) * 1e6, 1)

    text = json.dumps(INSTANCE, ensure_ascii=False)
    results["json_schema"] = _walk(schema, tok.encode(text, add_special_tokens=False).ids,
                                   args.repeat)
    anyjson = compiler.compile(G.grammar_from_response_format({"type": "json_object"}))
    results["json_object"] = _walk(anyjson, tok.encode(text, add_special_tokens=False).ids,
                                   args.repeat)
    tools = T.compile_tool_choice(compiler, TOOLS, "required")
    results["tool_call_required"] = _walk(tools, tok.encode(CALL, add_special_tokens=False).ids,
                                          args.repeat)

    # 16 sequences at different positions of the same schema, masks filled at once
    ids = tok.encode(text, add_special_tokens=False).ids
    batch = []
    for i in range(16):
        p = schema.processor()
        for t in ids[:i * len(ids) // 16]:
            p.accept(t)
        batch.append(p)
    out = np.empty((16, compiler.mask_words), np.int32)
    times = []
    for _ in range(args.repeat * 5):
        for p in batch:
            p._bits_valid = False
        t0 = time.perf_counter()
        G.fill_token_bitmasks(batch, out)
        times.append((time.perf_counter() - t0) * 1e6)
    results["batch16_fill_token_bitmasks"] = _us(times)

    print(json.dumps(results, indent=2))
    if args.json:
        record = {"machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "command": "python bench/grammar_masks.py", "results": results}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
