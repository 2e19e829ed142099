"""Build the assets of `tests/gpu/test_architectures_gpu.py` on a machine with the full TVM and
nvcc (the GPU machine has neither):

    python tests/gpu/arch_assets.py $MLC_GPU_ASSETS

For each tiny random model in ARCH_SPECS and each of q4f16_1 / q0f16 it writes into the folder
`arch-NAME-Q/` (an MLC dir), `arch-NAME-Q-cuda.so` (for sm_90a) and `arch-NAME-Q-hf/` (the
transformers model holding the weights the library reads, dequantized: the reference, stored
in float16, which holds those weights exactly, and run in float32). About 25 MB in all.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# name -> (arch, transformers config overrides of tests/helpers.TINY_ARCHS)
ARCH_SPECS = {
    # Gemma 3 as released: head_dim 256, one KV head, five sliding layers (window 24, above
    # a page) and one global, each kind with its own RoPE theta (the model rotates q/k)
    "gemma3": ("gemma3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                              query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                              sliding_window=24, final_logit_softcapping=None)),
    # Qwen2 with head_dim 64: q/k/v bias, mlc's CUDA attention kernels
    "qwen2": ("qwen2", dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                            num_key_value_heads=1)),
}
QUANTIZATIONS = ("q4f16_1", "q0f16")


def build(out: Path, device: str = "cuda:sm_90a") -> None:
    sys.path.insert(0, str(TESTS))
    from helpers import dequantized_hf_model, make_tiny, write_mlc_dir

    from mlc.compiler.compile import compile_model

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, overrides) in ARCH_SPECS.items():
            hf, hf_dir = make_tiny(Path(tmp) / name, arch, **overrides)
            for quant in QUANTIZATIONS:
                base = f"arch-{name}-{quant}"
                shutil.rmtree(out / base, ignore_errors=True)
                mlc_dir = write_mlc_dir(hf, out / base, quant, hf_dir=hf_dir,
                                        prefill_chunk_size=128, max_batch_size=8)
                compile_model(mlc_dir, device, out / f"{base}-cuda.so", quiet=True)
                ref = dequantized_hf_model(hf, mlc_dir)
                shutil.rmtree(out / f"{base}-hf", ignore_errors=True)
                ref.half().save_pretrained(out / f"{base}-hf")
                print(f"wrote {out / base}, {base}-cuda.so, {base}-hf", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR")
    build(Path(sys.argv[1]))
