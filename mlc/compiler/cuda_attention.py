"""mlc's CUDA attention kernels in place of TVM's TIR ones inside the paged KV cache.

TVM 0.27's paged KV cache receives its attention kernels as ("tirx", function) pairs when it is
created (`vm.builtin.paged_attention_kv_cache_create`). Its CUDA prefill kernels run on CUDA
cores: a 2048-token Llama-3-8B prefill spends ~70% of its time there. This pass swaps the pairs
for the ragged prefill, paged prefill and paged decode kernels for mlc's tensor-core kernels
(`cuda_kernels/attention.cu`, linked into the library and called with the same arguments); the
KV cache keeps TVM's kernels for everything else (sliding-window layers, tree attention, merge,
page copies). The replaced TIR functions are removed.
"""

from __future__ import annotations

import os

from mlc.compiler.cuda_support import kernel_function

# TVM's kernel (its name in the module) -> mlc's kernel (`cuda_support.kernel_function`)
REPLACED = {
    "batch_prefill_ragged_kv": "attn_prefill_ragged",
    "batch_prefill_paged_kv": "attn_prefill_paged",
    "batch_decode_paged_kv": "attn_decode_paged",
}
HEAD_DIMS = (64, 128)


def attention_enabled(dtype: str, head_dim: int, sliding_window: int | None) -> bool:
    """Whether a model's attention can run on mlc's kernels: float16, head_dim 64 or 128, and no
    sliding window (its caches pass a [3, batch] length table the kernels do not read);
    MLC_CUDA_ATTENTION=0 keeps TVM's kernels (for comparisons)."""
    if os.environ.get("MLC_CUDA_ATTENTION", "1") == "0":
        return False
    return dtype == "float16" and head_dim in HEAD_DIMS and not (sliding_window or 0) > 0


def use_mlc_attention():
    """A module pass: in every Relax function, ("tirx", GlobalVar) tuples naming a replaced TIR
    kernel become ("tirx", ExternFunc(mlc kernel)), then unused functions are removed."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Swap(relax.PyExprMutator):
        def visit_tuple_(self, op: relax.Tuple):
            op = super().visit_tuple_(op)
            fields = list(op.fields)
            if (len(fields) == 2 and isinstance(fields[0], tvm.ir.StringImm)
                    and fields[0].value == "tirx" and isinstance(fields[1], tvm.ir.GlobalVar)
                    and fields[1].name_hint in REPLACED):
                name = kernel_function(REPLACED[fields[1].name_hint])
                return relax.Tuple([fields[0], relax.ExternFunc(name)])
            return op

    @tvm.transform.module_pass(opt_level=0, name="mlc_use_cuda_attention")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = _Swap(mod).visit_expr(func)
        # the TIR kernels carry a global symbol, so dead-code elimination keeps them: drop the
        # replaced ones that nothing references any more
        used = {v.name_hint for f in mod.functions.values() if isinstance(f, relax.Function)
                for v in relax.analysis.all_global_vars(f)}
        for gv in list(mod.get_global_vars()):
            if gv.name_hint in REPLACED and gv.name_hint not in used:
                del mod[gv]
        return mod

    return _pass
