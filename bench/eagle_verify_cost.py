"""How a target's verify step costs with the number of tokens it checks per sequence (the
question behind tree drafts: a tree of n nodes is verified as n tokens), on the CPU.

    python bench/eagle_verify_cost.py MLC_DIR LIB [--batch 1] [--context 200]

For k = 1, 2, 4, 8, 16 tokens per sequence it times `verify_logits` (the hidden-state path
EAGLE uses) on sequences holding `--context` tokens, popping the tokens again after each run;
prints the median milliseconds and the cost relative to k = 1, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from mlc.runtime.model import KVCacheConfig, LoadedModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mlc_dir")
    ap.add_argument("lib")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model = LoadedModel(args.mlc_dir, args.lib, "cpu")
    model.create_kv_cache(KVCacheConfig(max(4, args.batch), 4096, 256))
    model.enable_hidden_states()
    rng = np.random.default_rng(0)
    ids = list(range(args.batch))
    for i in ids:
        model.add_sequence(i)
        model.prefill_logits([i], [rng.integers(100, 10000, args.context).tolist()])
    base = None
    for k in (1, 2, 4, 8, 16):
        times = []
        for _ in range(args.repeats):
            chunks = [rng.integers(100, 10000, k).tolist() for _ in ids]
            t0 = time.perf_counter()
            model.verify_logits(ids, chunks).numpy()
            times.append(time.perf_counter() - t0)
            for i in ids:
                model.popn(i, k)
        ms = statistics.median(times) * 1e3
        base = base or ms
        print(json.dumps({"batch": args.batch, "tokens_per_seq": k, "ms": round(ms, 2),
                          "relative_to_k1": round(ms / base, 2)}), flush=True)


if __name__ == "__main__":
    main()
