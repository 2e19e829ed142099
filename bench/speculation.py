"""Speculative decoding figures: what a verify call costs, what drafts get accepted, and the
batch-1 speedup these imply beside the one measured.

    # the target's cost of checking k drafted tokens in one call, against one decode step
    python bench/speculation.py verify-cost MODEL_DIR --model-lib LIB --device cuda [--dummy]
        [--context 512] [--ks 1,2,3,4,5,6,7,8] [--runs 5] [--out FILE]

    # greedy batch-1 decode through the engine, per mode, on real prompts
    python bench/speculation.py engine MODEL_DIR --model-lib LIB --device D
        [--draft DRAFT_DIR:DRAFT_LIB] [--modes disable,ngram,small_draft] [--ks 4]
        [--tokens 128] [--runs 3] [--out FILE]

    # the speedup a verify-cost file and an acceptance file imply
    python bench/speculation.py implied VERIFY.json ENGINE.json [--draft-step-ratio R]

verify-cost times `LoadedModel.decode` (1 token) and `LoadedModel.verify` (k + 1 tokens: the
last accepted token and k drafts) on one sequence of `--context` tokens, logits copied to the
host in both, each the median of `--runs` x 32 calls; the KV entries a call appends are popped
so the context stays fixed. `engine` runs each prompt greedily (ignore_eos) with each mode and
reports tok/s (median of --runs), the acceptance rate (`engine.stats()`) and whether every
mode's tokens equal the plain engine's.

`implied`: an engine run counts, per target step, the tokens produced (T) and the tokens
drafted (d); on a model whose verify call costs verify(d) decode steps (the verify-cost file,
interpolated at d) a step then costs verify(d) + d * draft_step, so the speedup over plain
decode is T / (verify(d) + d * draft_step). n-gram drafts cost nothing on the device
(draft_step = 0); a draft model costs `--draft-step-ratio` decode steps of the target per
drafted token. Every step is counted as a verify call (an upper bound on the cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = {
    "rewrite": (
        "The paged KV cache stores the keys and values of every sequence in fixed-size pages. "
        "A sequence that shares a prompt prefix with another can share its pages, and only the "
        "rest of its prompt has to be computed. Speculative decoding lets a cheap proposer "
        "guess several tokens, which the target model checks in one forward pass; the accepted "
        "tokens cost one step instead of several.\n\nRewrite the text above in plain words, "
        "keeping every point."),
    "explain": "Explain how a CPU cache works, with an example of a cache miss.",
    "code": "Write a Python function that merges two sorted lists, with a docstring and tests.",
}


def machine() -> dict:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(sys.argv)}
    try:
        import subprocess

        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def verify_cost(a) -> dict:
    from mlc.runtime.model import KVCacheConfig, LoadedModel

    model = LoadedModel(a.model, a.model_lib, a.device, dummy=a.dummy)
    ks = [int(k) for k in a.ks.split(",")]
    model.create_kv_cache(KVCacheConfig(1, a.context + 64 * (max(ks) + 2), 512))
    rng = np.random.default_rng(0)
    vocab = model.vocab_size
    model.add_sequence(0)
    prompt = rng.integers(0, vocab, size=a.context).tolist()
    for start in range(0, a.context, 512):
        model.prefill([0], [prompt[start:start + 512]])

    def timed(call, n_tokens: int) -> float:
        call()
        model.popn(0, n_tokens)                                  # warm up (graphs, modules)
        runs = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            for _ in range(32):
                call()
                model.popn(0, n_tokens)
            runs.append((time.perf_counter() - t0) / 32)
        return statistics.median(runs) * 1e3

    tok = int(rng.integers(0, vocab))
    decode_ms = timed(lambda: model.decode([0], [tok]), 1)
    res = {"machine": machine(), "model": Path(a.model).name, "context": a.context,
           "decode_ms": decode_ms, "verify_ms": {}, "verify_over_decode": {}}
    for k in ks:
        toks = rng.integers(0, vocab, size=k + 1).tolist()
        ms = timed(lambda: model.verify([0], [toks]), k + 1)
        res["verify_ms"][k] = ms
        res["verify_over_decode"][k] = ms / decode_ms
        print(f"k={k}: verify {ms:.3f} ms = {ms / decode_ms:.2f}x decode ({decode_ms:.3f} ms)",
              flush=True)
    return res


def run_prompt(engine, prompt: str, tokens: int) -> tuple[float, list[int]]:
    ids: list[int] = []
    t0 = time.perf_counter()
    for out in engine.generate(engine.encode_chat([{"role": "user", "content": prompt}]),
                               temperature=0, max_tokens=tokens, ignore_eos=True):
        for d in out.deltas:
            ids.extend(d.token_ids)
    return len(ids) / (time.perf_counter() - t0), ids


def engine_rates(a) -> dict:
    from mlc.runtime.engine import MLCEngine

    res = {"machine": machine(), "model": Path(a.model).name, "device": a.device,
           "draft": a.draft, "tokens": a.tokens, "modes": {}}
    outputs: dict = {}
    for mode in a.modes.split(","):
        for k in ([0] if mode == "disable" else [int(x) for x in a.ks.split(",")]):
            kwargs = dict(model_lib=a.model_lib, speculative_mode=mode,
                          prefix_cache_mode="disable", max_batch_size=4)
            if mode != "disable":
                kwargs["spec_draft_length"] = k
            if mode == "small_draft":
                kwargs["additional_models"] = [a.draft]
            engine = MLCEngine(a.model, a.device, **kwargs)
            name = mode if mode == "disable" else f"{mode}-k{k}"
            try:
                run_prompt(engine, "Hello", 16)                           # warm up
                before = engine.stats()
                entry = {}
                for label, prompt in PROMPTS.items():
                    rates = []
                    for _ in range(a.runs):
                        rate, ids = run_prompt(engine, prompt, a.tokens)
                        rates.append(rate)
                    outputs.setdefault(label, {})[name] = ids
                    entry[label] = {"tok_s": statistics.median(rates)}
                after = engine.stats()
                drafted = after.draft_tokens - before.draft_tokens
                accepted = after.accepted_draft_tokens - before.accepted_draft_tokens
                steps = after.decode_steps - before.decode_steps
                entry["acceptance_rate"] = accepted / drafted if drafted else None
                entry["draft_tokens"] = drafted
                entry["target_steps"] = steps
                entry["tokens_per_step"] = (after.decode_tokens - before.decode_tokens) / steps
                entry["drafted_per_step"] = drafted / steps
            finally:
                engine.terminate()
            res["modes"][name] = entry
            print(name, json.dumps(entry), flush=True)
    res["outputs_equal_plain"] = {
        label: {m: ids == by_mode.get("disable") for m, ids in by_mode.items()}
        for label, by_mode in outputs.items()}
    return res


def implied(a) -> dict:
    verify = json.loads(Path(a.verify).read_text())
    rates = json.loads(Path(a.engine).read_text())
    ratios = {int(k): v for k, v in verify["verify_over_decode"].items()}
    out = {"verify_file": a.verify, "engine_file": a.engine,
           "draft_step_ratio": a.draft_step_ratio, "implied": {}}
    for name, entry in rates["modes"].items():
        if name == "disable" or not entry.get("target_steps"):
            continue
        drafted = entry["drafted_per_step"]
        verify_cost = _interpolate(ratios, max(1.0, drafted))
        draft_cost = 0.0 if name.startswith("ngram") else a.draft_step_ratio * drafted
        out["implied"][name] = {"tokens_per_step": entry["tokens_per_step"],
                                "drafted_per_step": drafted,
                                "acceptance_rate": entry["acceptance_rate"],
                                "verify_over_decode": verify_cost,
                                "speedup": entry["tokens_per_step"] / (verify_cost + draft_cost)}
    print(json.dumps(out, indent=1))
    return out


def _interpolate(table: dict[int, float], x: float) -> float:
    """Linear interpolation of a {k: value} table at x (clamped to its ends)."""
    ks = sorted(table)
    if x <= ks[0]:
        return table[ks[0]]
    for lo, hi in zip(ks, ks[1:]):
        if x <= hi:
            return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)
    return table[ks[-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify-cost")
    e = sub.add_parser("engine")
    for p in (v, e):
        p.add_argument("model")
        p.add_argument("--model-lib", required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--runs", type=int, default=3)
        p.add_argument("--out")
    v.add_argument("--dummy", action="store_true")
    v.add_argument("--context", type=int, default=512)
    v.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    e.add_argument("--draft", help="DRAFT_DIR:DRAFT_LIB for small_draft")
    e.add_argument("--modes", default="disable,ngram,small_draft")
    e.add_argument("--ks", default="4")
    e.add_argument("--tokens", type=int, default=128)
    i = sub.add_parser("implied")
    i.add_argument("verify")
    i.add_argument("engine")
    i.add_argument("--draft-step-ratio", type=float, default=0.1,
                   help="one draft decode step / one target decode step")
    i.add_argument("--out")
    a = ap.parse_args()
    res = {"verify-cost": verify_cost, "engine": engine_rates, "implied": implied}[a.cmd](a)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
