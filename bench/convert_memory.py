"""Peak memory of `mlc convert` on a multi-GB checkpoint: it must stream.

Generates a random float16 Llama checkpoint (default: hidden 4096, 8 layers, intermediate
8192, vocab 128256, tied embeddings: about 3.3 GB in sharded safetensors) in a temp dir, runs
`mlc convert -q q4f16_1` on it in a subprocess and reads that process's peak RSS (wait4's
ru_maxrss). The bound: 2 x the largest tensor + one shard (32 MiB) + the RSS of a process that
has only imported what convert imports (measured the same way). Writes
bench/convert_memory.json.

Linux counts a child's RSS before exec in its ru_maxrss, so the checkpoint is generated in
its own process and this one stays small while it starts the measured ones.

    python bench/convert_memory.py [--layers 8] [--workdir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARD_CAP = 32 * 1024 * 1024
_IMPORTS = ("import mlc.compiler.convert, mlc.compiler.sources.hf_dir, mlc.models.llama, "
            "mlc.models.llama_loader, mlc.cli.convert, safetensors, tqdm.auto")


def _tensors(a) -> dict[str, tuple[int, ...]]:
    h, kv = a.hidden, a.kv_heads * (a.hidden // a.heads)
    shapes = {"model.embed_tokens.weight": (a.vocab, h), "model.norm.weight": (h,)}
    for i in range(a.layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (a.intermediate, h),
            f"{p}.mlp.up_proj.weight": (a.intermediate, h),
            f"{p}.mlp.down_proj.weight": (h, a.intermediate),
        })
    return shapes


def make_checkpoint(directory: Path, a) -> dict[str, int]:
    """Write a random fp16 HF checkpoint in ~1 GB safetensors shards; return tensor sizes."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes, weight_map, shard, shard_bytes, n = {}, {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(directory / name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for name, shape in _tensors(a).items():
        rows = []
        for r0 in range(0, shape[0], 8192):    # generate in slices: bounded float32 scratch
            part = rng.standard_normal((min(8192, shape[0] - r0), *shape[1:]), np.float32)
            rows.append((part * 0.02).astype(np.float16))
        value = np.concatenate(rows)
        sizes[name] = value.nbytes
        if shard_bytes + value.nbytes > 1 << 30:
            flush()
        shard[name] = value
        shard_bytes += value.nbytes
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": a.hidden, "intermediate_size": a.intermediate,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "num_hidden_layers": a.layers, "vocab_size": a.vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "torch_dtype": "float16"}))
    return sizes


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """Run `cmd`; return (its peak RSS in bytes, seconds, its output)."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
    return usage.ru_maxrss * 1024, time.time() - start, output   # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--quantization", default="q4f16_1")
    parser.add_argument("--workdir", default=None, help="where the temp checkpoint goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--output", default=str(REPO / "bench" / "convert_memory.json"))
    parser.add_argument("--generate-only", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.generate_only:
        sizes = make_checkpoint(Path(a.generate_only), a)
        (Path(a.generate_only) / "sizes.json").write_text(json.dumps(sizes))
        return

    work = Path(tempfile.mkdtemp(prefix="mlc-convert-mem-", dir=a.workdir))
    try:
        t0 = time.time()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--generate-only",
                        str(work / "hf")], check=True)
        sizes = json.loads((work / "hf" / "sizes.json").read_text())
        gen_s = time.time() - t0
        baseline, _, _ = peak_rss([sys.executable, "-c", _IMPORTS])
        cmd = [sys.executable, "-m", "mlc", "convert", str(work / "hf"), "-q", a.quantization,
               "-o", str(work / "out"), "--quiet"]
        peak, seconds, output = peak_rss(cmd)
        largest = max(sizes.values())
        bound = 2 * largest + SHARD_CAP + baseline
        meta = json.loads((work / "out" / "tensor-cache.json").read_text())["metadata"]
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(),
                        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
            "command": " ".join(["mlc", *cmd[3:]]),
            "checkpoint": {"hidden": a.hidden, "intermediate": a.intermediate,
                           "layers": a.layers, "vocab": a.vocab, "dtype": "float16",
                           "tensors": len(sizes), "bytes": sum(sizes.values()),
                           "generate_seconds": round(gen_s, 1)},
            "largest_tensor_bytes": largest,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "bound_bytes": bound,
            "peak_minus_baseline_over_largest": round((peak - baseline) / largest, 3),
            "convert_seconds": round(seconds, 1),
            "output": {"tensors": meta["ParamSize"], "bytes": meta["ParamBytes"],
                       "bits_per_param": round(meta["BitsPerParam"], 3)},
            "ok": peak <= bound,
            "cli_output": output.strip().splitlines()[-1:],
        }
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
        gib = 1 << 30
        print(f"checkpoint {sum(sizes.values()) / gib:.2f} GiB, largest tensor "
              f"{largest / gib:.2f} GiB; baseline {baseline / gib:.2f} GiB; peak RSS "
              f"{peak / gib:.2f} GiB <= bound {bound / gib:.2f} GiB: {result['ok']} "
              f"({seconds:.0f} s)")
        if not result["ok"]:
            raise SystemExit("peak RSS over the bound: convert does not stream")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
