"""Per-call profile of a model library on the GPU: the VM's instrumentation hook around every
call (kernel, CUDA graph launch, builtin), with a device sync on both sides so each call's time
includes its GPU work. Shows where a decode step and a prefill chunk spend their time.

    python bench/profile_gpu.py MODEL_DIR --model-lib LIB [--dummy] [--prefill 2048] [--batch 64]
"""

import argparse
import json
import time

import numpy as np

from mlc.benchmark.model_bench import profile_vm_calls
from mlc.runtime.model import KVCacheConfig, LoadedModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--model-lib", required=True)
    p.add_argument("--dummy", action="store_true")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences in the decode step")
    p.add_argument("--json")
    a = p.parse_args()
    m = LoadedModel(a.model, a.model_lib, "cuda", dummy=a.dummy)
    seqs = list(range(2, 2 + a.batch))
    m.create_kv_cache(KVCacheConfig(a.batch + 2, a.prefill + 640 * a.batch,
                                    m.metadata["prefill_chunk_size"]))
    rng = np.random.default_rng(0)
    for s in seqs:
        m.add_sequence(s)
        m.prefill([s], [rng.integers(0, m.vocab_size, 512).tolist()])
    ones = [1] * len(seqs)
    for _ in range(3):
        m.decode(seqs, ones)                   # warm up, CUDA graph capture
    t0 = time.perf_counter()
    for _ in range(20):
        m.decode(seqs, ones)
    plain = (time.perf_counter() - t0) / 20 * 1e3
    out = {"batch": a.batch, "decode_ms_uninstrumented": plain,
           "decode": profile_vm_calls(m, lambda: m.decode(seqs, ones), 5)}
    ids = rng.integers(0, m.vocab_size, a.prefill).tolist()

    def prefill():
        m.add_sequence(1)
        m.prefill([1], [ids])
        m.remove_sequence(1)

    prefill()
    out["prefill"] = profile_vm_calls(m, prefill, 1)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
