"""CPU speed of a small random model per architecture (llama, qwen2, qwen3, phi, gemma3).

    python bench/cpu_archs.py [--repo PATH] [--opt O2] [--threads 2] [--runs 5]

Each architecture at one small size (hidden 512, 4 layers, vocab 8192; random weights of
the library's shapes), q4f32_1, compiled for this CPU with the mlc of `--repo` (default:
this checkout; point it at another checkout to compare versions of the schedules), then
timed through `LoadedModel`: a 64-token prefill and 32 decode steps, medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZE = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
            num_key_value_heads=4, num_hidden_layers=4, vocab_size=8192,
            max_position_embeddings=1024, rope_theta=10000.0)
ARCHS = {
    "llama": ("llama", dict(rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(rms_norm_eps=1e-6)),
    "qwen3": ("qwen3", dict(rms_norm_eps=1e-6, head_dim=64)),
    "phi": ("phi", dict(num_key_value_heads=8, layer_norm_eps=1e-5, partial_rotary_factor=0.4,
                        tie_word_embeddings=False)),
    "gemma3": ("gemma3_text", dict(head_dim=64, rms_norm_eps=1e-6, query_pre_attn_scalar=64,
                                   sliding_window=128,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"])),
}


def model_dir(arch: str, dest: Path) -> Path:
    """An MLC model dir without weights (the benchmark draws them at random)."""
    from mlc.models.registry import get_model
    from mlc.support.chat_config import ChatConfig

    model_type, extra = ARCHS[arch]
    config = get_model(model_type).config_from_hf({"model_type": model_type, **SIZE, **extra})
    dest.mkdir(parents=True, exist_ok=True)
    ChatConfig(model_type=model_type, quantization="q4f32_1", model_config=config.to_dict(),
               vocab_size=config.vocab_size, context_window_size=1024, prefill_chunk_size=128,
               sliding_window_size=config.sliding_window_size).save(dest)
    return dest


def bench(arch: str, opt: str, runs: int, work: Path) -> dict:
    import numpy as np

    from mlc.compiler.compile import compile_model
    from mlc.runtime.model import KVCacheConfig, LoadedModel

    d = model_dir(arch, work / arch)
    lib = work / f"{arch}-{opt}.so"
    compile_model(d, "cpu", lib, opt=opt, quiet=True)
    model = LoadedModel(d, lib, device="cpu", dummy=True)
    model.create_kv_cache(KVCacheConfig(1, 1024, 128))
    prompt = np.random.RandomState(0).randint(0, 8192, size=64).tolist()
    prefill, decode = [], []
    for i in range(runs + 1):
        model.add_sequence(i)
        t = time.perf_counter()
        model.prefill([i], [prompt])
        t1 = time.perf_counter()
        for _ in range(32):
            model.decode([i], [7])
        t2 = time.perf_counter()
        model.remove_sequence(i)
        if i:                                             # the first run warms up
            prefill.append(64 / (t1 - t))
            decode.append(32 / (t2 - t1))
    return {"prefill_64_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--opt", default="O2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(args.repo.resolve()))
    out = {"repo": str(args.repo), "opt": args.opt, "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as work:
        for arch in args.archs.split(","):
            out[arch] = bench(arch, args.opt, args.runs, Path(work))
            print(arch, json.dumps(out[arch]), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
