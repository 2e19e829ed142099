"""Host vs device sampling time per step for the same logits (median of 15 calls).

    python bench/sampling_paths.py MODEL_DIR [--lib LIB] [--device cpu] [--batches 1,4,16]

The device path runs the library's own functions (softmax_with_temperature,
sample_with_top_p_top_k, argmax); the host path copies the logits and samples with numpy.
The engine picks the device path for GPU libraries and the host path on the CPU (see
bench/NOTES.md, "Sampling on the CPU").
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sampling_checks import seq  # noqa: E402

from mlc.runtime.device_sampler import DeviceSampler  # noqa: E402
from mlc.runtime.model import KVCacheConfig, LoadedModel  # noqa: E402
from mlc.runtime.sampler import HostSampler  # noqa: E402

CASES = {"greedy": dict(temperature=0), "T0.7 top_p0.9": dict(temperature=0.7, top_p=0.9),
         "T1.0": dict(temperature=1.0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--lib", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", default="1,4,16")
    a = p.parse_args()
    lib = a.lib or str(Path(a.model) / f"lib-{a.device.split(':')[0]}.so")
    batches = [int(b) for b in a.batches.split(",")]
    model = LoadedModel(a.model, lib, a.device)
    model.create_kv_cache(KVCacheConfig(max(batches), 1024, 256))
    v, rng = model.vocab_size, np.random.default_rng(0)
    samplers = {"host": HostSampler(), "device": DeviceSampler(model)}
    for b in batches:
        logits = model.upload((rng.standard_normal((b, v)) * 3).astype(np.float32))
        for name, cfg in CASES.items():
            ms = {}
            for label, sampler in samplers.items():
                times = []
                for _ in range(15):
                    seqs = [seq(seed=i, **cfg) for i in range(b)]
                    t0 = time.perf_counter()
                    sampler.sample(logits, list(range(b)), seqs, [None] * b)
                    times.append(time.perf_counter() - t0)
                ms[label] = statistics.median(times) * 1e3
            print(f"batch {b:3d} {name:14s} host {ms['host']:8.2f} ms  "
                  f"device {ms['device']:8.2f} ms")


if __name__ == "__main__":
    main()
