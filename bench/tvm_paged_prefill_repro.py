"""Minimal reproduction of TVM 0.27's CPU paged-prefill bug (the Intel NaN of issue #14).

    python bench/tvm_paged_prefill_repro.py [--mcpu rocketlake]

Runs TVM's own `batch_prefill_paged_kv_cpu` (plain and `_sliding_window`) and mlc's
replacement on the cases of `tests/test_cpu_schedules.py::test_prefill_paged_attention_
matches_numpy` (three sequences, scattered pages, queries whose first cached keys are masked
out, queries that see none), built for this host's CPU or --mcpu, against the numpy
reference. TVM's kernel reads `new_m` before writing it whenever the first key it visits is
masked, and `scale_O[d]` past its single element, so its output depends on stack contents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tvm
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cpu_schedules import PAGED_CASES, _paged_reference  # noqa: E402

from mlc.compiler.cpu_attention import prefill_paged_kernel  # noqa: E402
from mlc.compiler.target import parse_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mcpu", default="", help="LLVM CPU name (default: this host's)")
    args = ap.parse_args()
    target = parse_device(f"cpu:{args.mcpu}" if args.mcpu else "cpu").tvm_target()
    print(f"target: {target}")
    for case, spec in PAGED_CASES.items():
        window, info = spec["window"], spec["info"]
        rng = np.random.RandomState(2)
        page_values = rng.permutation(8).astype("int32")[:5]
        page_indptr = np.array([0, 3, 4, 4 if case == "plain" else 5], "int32")
        q_indptr = np.array([0, 5, 45, 48], "int32")
        q = rng.randn(48, 9, 64).astype("float32")
        pages = rng.randn(8, 2, 3, 16, 64).astype("float32")
        for causal in (1, 0):
            ref, _ = _paged_reference(q, q_indptr, pages, page_indptr, page_values, info,
                                      causal, 0.125, window)
            for who, func in (
                    ("TVM", _attention_prefill_cpu(3, 9, 64, "float32", window > 0, {},
                                                   sliding_window_size=window or 1024)),
                    ("mlc", prefill_paged_kernel(9, 3, 64, "float32", sliding_window=window))):
                lib = tvm.tirx.build(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}),
                                     target=target)["k"]
                arrays = [q, q_indptr, pages, page_indptr, page_values[:page_indptr[-1]], info,
                          np.zeros(3, "int32"), np.zeros(48, "int32"),
                          np.zeros((48, 9, 64), "float32"), np.zeros((48, 9), "float32")]
                tensors = [tvm.runtime.tensor(a) for a in arrays]
                lib(*tensors, causal, 0, 1.0, 10000.0, 0.125)
                got = tensors[-2].numpy()
                print(f"{case:9s} causal={causal} {who}: NaN={bool(np.isnan(got).any())!s:5s} "
                      f"max |err| = {np.nanmax(np.abs(got - ref)):.3g}")


if __name__ == "__main__":
    main()
