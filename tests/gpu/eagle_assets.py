"""Build the assets of `tests/gpu/test_eagle_gpu.py` on a machine with the full TVM and nvcc:

    python tests/gpu/eagle_assets.py $MLC_GPU_ASSETS

Writes, for q4f16_1 and q0f16, `eagle-target-Q/` (a tiny random Llama) and `eagle-head-Q/`
(a random EAGLE head for it, converted by `mlc convert` from the published layout), and for
q0f16 `eagle-exact-target-q0f16/` + `eagle-exact-head-q0f16/` (a context-free target and a
head that drafts it exactly, see tests/helpers.py), each with its `-cuda.so` for sm_90a.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def build(out: Path, device: str = "cuda:sm_90a") -> None:
    sys.path.insert(0, str(TESTS))
    from helpers import (
        make_context_free_llama,
        make_exact_eagle_head,
        make_tiny_eagle_head,
        make_tiny_llama,
        write_mlc_dir,
    )

    from mlc.compiler.compile import compile_model
    from mlc.compiler.convert import convert

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        random_pair = make_tiny_llama(tmp / "random")
        random_head = make_tiny_eagle_head(tmp / "random", random_pair[0])
        exact_pair = make_context_free_llama(tmp / "exact")
        exact_head = make_exact_eagle_head(tmp / "exact", exact_pair[0])
        jobs = [("eagle", random_pair, random_head, q) for q in ("q4f16_1", "q0f16")]
        jobs.append(("eagle-exact", exact_pair, exact_head, "q0f16"))
        for prefix, (hf, hf_dir), head_hf, quant in jobs:
            target, head = out / f"{prefix}-target-{quant}", out / f"{prefix}-head-{quant}"
            for path in (target, head):
                shutil.rmtree(path, ignore_errors=True)
            write_mlc_dir(hf, target, quant, hf_dir=hf_dir, prefill_chunk_size=128)
            convert(str(head_hf), quant, head, quiet=True)
            for path in (target, head):
                compile_model(path, device, out / f"{path.name}-cuda.so", quiet=True)
                print(f"wrote {path}, {path.name}-cuda.so", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT_DIR")
    build(Path(sys.argv[1]))
