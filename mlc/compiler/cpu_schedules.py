"""Scheduling for llvm (CPU) targets: multi-threaded, vectorized kernels.

Stock TVM schedules nothing for llvm, so every kernel is a naive single-threaded loop nest.
Phase 4 of the pipeline (not at O0) runs, in order:

* `cpu_attention.replace_attention` (every opt level): TVM's CPU attention kernels are
  replaced by mlc's (TVM's are scalar and single-threaded, and one is wrong, see there);
* `parallel_attention`: a TVM attention kernel mlc does not replace gets a parallel head loop
  and a row loop bounded by the real KV length. These are TVM's own kernels, known by name:
  a rewrite of their TIR, not a schedule;
* dlight's `ApplyDefaultSchedule` with `cpu_rules.CPU_RULES`: every other PrimFunc gets the
  first rule whose pattern it has (decode GEMV, prefill GEMM, row reduction, elementwise).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import dlight

from mlc.compiler import cpu_attention
from mlc.compiler.cpu_rules import CPU_RULES, schedule_func, scheduled_by
from mlc.compiler.cpu_tir import dtype_of

__all__ = ["passes", "parallel_attention", "schedule_func", "scheduled_by", "schedule_summary"]


# ------------------------------------------------------------------------------ attention


def _rebuild_stmt(stmt, on_for):
    """Rebuild a statement tree bottom-up, replacing each For by `on_for(new_for)` (which
    returns it unchanged or a replacement). Leaves (stores, binds, evaluates) are kept."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    def go(st):
        if isinstance(st, tirx.For):
            new = tirx.For(st.loop_var, st.min, st.extent, st.kind, go(st.body),
                           st.thread_binding, st.annotations)
            return on_for(new)
        if isinstance(st, tirx.SeqStmt):
            return tirx.SeqStmt([go(x) for x in st])
        if isinstance(st, tirx.IfThenElse):
            return tirx.IfThenElse(st.condition, go(st.then_case),
                                   go(st.else_case) if st.else_case is not None else None)
        if isinstance(st, tirx.AttrStmt):
            return tirx.AttrStmt(st.node, st.attr_key, st.value, go(st.body))
        if isinstance(st, SBlockRealize):
            b = st.block
            block = SBlock(b.iter_vars, b.reads, b.writes, b.name_hint, go(b.body), b.init,
                           b.alloc_buffers, b.match_buffers, b.annotations)
            return SBlockRealize(st.iter_values, st.predicate, block)
        return st

    return go(stmt)


def _stored_buffers(stmt) -> list:
    """Buffers written anywhere in a statement."""
    from tvm.s_tir.stmt import SBlockRealize

    out = []

    def go(st):
        if isinstance(st, tirx.BufferStore):
            out.append(st.buffer)
        elif isinstance(st, tirx.For):
            go(st.body)
        elif isinstance(st, tirx.SeqStmt):
            for x in st:
                go(x)
        elif isinstance(st, tirx.IfThenElse):
            go(st.then_case)
            if st.else_case is not None:
                go(st.else_case)
        elif isinstance(st, tirx.AttrStmt):
            go(st.body)
        elif isinstance(st, SBlockRealize):
            go(st.block.body)

    go(stmt)
    return out


def _tight_loop(loop):
    """`for i in range(big): if i < n: body` -> `for i in range(n): body` (TVM's CPU paged
    prefill loops over the whole page pool, max_num_pages * 16 rows, for every query)."""
    from tvm.tirx import expr as E

    body = loop.body
    if (isinstance(body, tirx.IfThenElse) and body.else_case is None
            and isinstance(body.condition, E.LT) and body.condition.a.same_as(loop.loop_var)
            and isinstance(loop.min, E.IntImm) and int(loop.min) == 0):
        bound = body.condition.b
        if dtype_of(bound) != dtype_of(loop.loop_var):
            bound = E.Cast(dtype_of(loop.loop_var), bound)
        return tirx.For(loop.loop_var, loop.min, bound, loop.kind, body.then_case,
                        loop.thread_binding, loop.annotations)
    return loop


def _parallel_inside_block(block, loop_name: str):
    """Make the loop `loop_name` directly in `block`'s body parallel, giving each iteration
    its own copy of the block's scratch buffers (those not written before the loop)."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize

    body = block.body
    items = list(body) if isinstance(body, tirx.SeqStmt) else [body]
    idx = next((i for i, st in enumerate(items)
                if isinstance(st, tirx.For) and st.loop_var.name == loop_name), None)
    if idx is None:
        return None
    before = [b for st in items[:idx] for b in _stored_buffers(st)]
    keep = [b for b in block.alloc_buffers if any(b.same_as(x) for x in before)]
    move = [b for b in block.alloc_buffers if not any(b.same_as(x) for x in before)]
    loop = items[idx]
    inner = SBlock([], [], [], f"{block.name_hint}_{loop_name}", loop.body, None, move)
    items[idx] = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL,
                          SBlockRealize([], True, inner), loop.thread_binding,
                          loop.annotations)
    new_body = tirx.SeqStmt(items) if len(items) > 1 else items[0]
    return SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, new_body,
                  block.init, keep, block.match_buffers, block.annotations)


# Which loop of TVM 0.27's CPU attention kernels carries independent work (heads or queries).
# Not the decode kernels (`cpu_attention` replaces the float32 one): their head loop sits in
# the attention block after let-bindings, and TVM 0.27's LLVM codegen of that loop made
# parallel fails ("IntImm supports only int", in the analyzer's Bind).
_ATTENTION_PARALLEL_LOOP = {
    "batch_prefill_ragged_kv": ("block", "q_idx"),    # when cpu_attention has no replacement
    "batch_prefill_paged_kv_cpu": ("outer", "h_qo"),
    "batch_prefill_paged_kv_cpu_sliding_window": ("outer", "h_qo"),
}


def parallel_attention(name: str, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """TVM's CPU paged-attention kernels run one thread over all heads and queries; make
    their head (or query) loop parallel and bound the paged-prefill row loop by the real
    KV length. Returns None for functions it does not know."""
    from tvm.s_tir.stmt import SBlockRealize

    where = _ATTENTION_PARALLEL_LOOP.get(name)
    if where is None:
        return None
    kind, loop_name = where
    failed = []

    def on_for(loop):
        loop = _tight_loop(loop)
        if kind == "outer" and loop.loop_var.name == loop_name:
            return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL,
                            loop.body, loop.thread_binding, loop.annotations)
        if kind == "block" and isinstance(loop.body, SBlockRealize) \
                and loop.body.block.name_hint == "attn":
            new_block = _parallel_inside_block(loop.body.block, loop_name)
            if new_block is None:
                failed.append(loop_name)
                return loop
            return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind,
                            SBlockRealize(loop.body.iter_values, loop.body.predicate,
                                          new_block), loop.thread_binding, loop.annotations)
        return loop

    body = _rebuild_stmt(func.body, on_for)
    if failed or body.same_as(func.body):
        return None
    return func.with_body(body)


@tvm.transform.module_pass(opt_level=0, name="mlc.ParallelAttentionCPU")
def parallel_attention_pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """`parallel_attention` on every TVM attention kernel left in the module."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            new = parallel_attention(gv.name_hint, func)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def schedule_summary(mod: tvm.IRModule) -> dict[str, str | None]:
    """Per PrimFunc of a module after phase 4: the rule that scheduled it, "kernel" for
    kernels that came scheduled (mlc's attention, TVM's made parallel), None for the rest."""
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            out[gv.name_hint] = scheduled_by(func) or ("kernel" if _is_scheduled(func) else None)
    return out


def passes(opt: str, sliding_window: int = 0) -> list:
    """The CPU passes of an opt level. mlc's attention kernels replace TVM's at every level,
    O0 included: TVM's paged-prefill kernel gives wrong results (see `cpu_attention`)."""
    replace = cpu_attention.replace_attention(sliding_window)
    if opt == "O0":
        return [replace]
    return [replace, parallel_attention_pass, dlight.ApplyDefaultSchedule(*CPU_RULES)]
