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

`implied`: with a per-token acceptance rate a (drafts accepted independently), one verify
step yields E(k) = (1 - a^(k+1)) / (1 - a) tokens and costs verify(k) + k * draft_step, so the
speedup over plain decode is E(k) * decode / (verify(k) + k * draft_step); n-gram drafts cost
nothing on the device (draft_step = 0), a draft model costs `--draft-step-ratio` x decode per
drafted token.
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
                entry["acceptance_rate"] = accepted / drafted if drafted else None
                entry["draft_tokens"] = drafted
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
    out = {"verify_file": a.verify, "engine_file": a.engine, "implied": {}}
    for name, entry in rates["modes"].items():
        acc = entry.get("acceptance_rate")
        if not acc or name == "disable":
            continue
        k = int(name.rsplit("-k", 1)[1])
        ratio = verify["verify_over_decode"].get(str(k)) or verify["verify_over_decode"].get(k)
        if ratio is None:
            continue
        # the engine's rate is accepted / drafted over whole steps, not the per-position rate
        # (a rejection ends a step): take the a whose expected accepted fraction is that rate
        a_pos = _per_position_rate(acc, k)
        expected = (1 - a_pos ** (k + 1)) / (1 - a_pos) if a_pos < 1 else k + 1
        draft = 0.0 if name.startswith("ngram") else a.draft_step_ratio * k
        out["implied"][name] = {"acceptance_rate": acc, "per_position_rate": a_pos,
                                "tokens_per_step": expected,
                                "speedup": expected / (ratio + draft)}
    print(json.dumps(out, indent=1))
    return out


def _per_position_rate(acc: float, k: int) -> float:
    """The per-position acceptance a whose expected accepted fraction of k drafts is `acc`
    (accepted drafts per step / k = a (1 - a^k) / ((1 - a) k)), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        frac = mid * (1 - mid ** k) / ((1 - mid) * k) if mid < 1 else 1.0
        lo, hi = (mid, hi) if frac < acc else (lo, mid)
    return (lo + hi) / 2


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
