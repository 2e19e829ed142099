"""Schedules for llvm (CPU) targets: multi-threaded, vectorized kernels.

Stock TVM schedules nothing for llvm, so every kernel is a naive single-threaded loop nest.
`schedule_cpu` is a module pass over the TIR PrimFuncs after fusion (phase 4, not at O0); each
PrimFunc gets the first rule that applies:

* matmul (one sum reduction over a static K, optionally an elementwise epilogue): the q4
  dequantize-matmul and the plain float matmul. K is split into 8-lane vectors and
  rfactored, so each output keeps a vector accumulator; x and the packed weights are read
  contiguously along K and the 4-bit unpacking vectorizes (shift/and/convert per 8 lanes).
  Decode (one row): 8 output features per parallel task share each x vector. Prefill
  (symbolic rows): the dequantization is hoisted into its own block (`hoist_weight_expr`) and
  computed once per tile of 4 features; rows are padded to the tile (`pad_einsum`) and a
  4 rows x 4 features register tile runs without bounds checks.
* rows (RMSNorm, softmax, ...): parallel over rows, the last dimension vectorized.
* elementwise: one fused loop, vectorized inner part, parallel outer part.
* attention: TVM's CPU attention kernels are replaced by `cpu_attention`'s (at every opt
  level); a kernel it does not cover gets a parallel head loop and a row loop bounded by the
  real KV length (`parallel_attention`).

Kernels with little work stay single-threaded: a parallel launch costs microseconds, more
than a 576-element RMSNorm. Measurements behind each choice: bench/NOTES.md.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx

from mlc.compiler import cpu_attention

logger = logging.getLogger(__name__)

VECTOR_LANES = 8          # float32 lanes of one AVX2 register (AVX-512 measured slower here)
GEMV_ROWS = 8             # output features per decode task
GEMM_TILE_M = 4           # rows x features of the prefill register tile
GEMM_TILE_N = 4
PARALLEL_MIN_WORK = 1 << 15   # elements (times K for reductions) worth a parallel launch


# ------------------------------------------------------------------------------ analysis


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _iter_kinds(sch: s_tir.Schedule, block) -> str:
    """'S'/'R' per block iter var (anything else -> 'O')."""
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
    return "".join(kinds)


def _is_spatial(sch: s_tir.Schedule, block) -> bool:
    return set(_iter_kinds(sch, block)) <= {"S"}


def _blocks(sch: s_tir.Schedule):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return sch.get_child_blocks(root) if root is not None else []


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False


def _inline_spatial(sch: s_tir.Schedule) -> list:
    """Inline every spatial producer into its consumers, then spatial epilogues backwards
    into their producer where possible. Returns the remaining blocks in order."""
    changed = True
    while changed:
        changed = False
        blocks = _blocks(sch)
        for block in blocks[:-1]:
            if _is_spatial(sch, block):
                try:
                    sch.compute_inline(block)
                    changed = True
                    break
                except Exception:  # noqa: BLE001 - not inlinable: keep it
                    continue
    blocks = _blocks(sch)
    for block in reversed(blocks[1:]):
        if _is_spatial(sch, block):
            try:
                sch.reverse_compute_inline(block)
            except Exception:  # noqa: BLE001
                pass
    return _blocks(sch)


# ------------------------------------------------------------------------------ rewrites


def _rebuild(expr, var_map: dict):
    """`expr` with variables replaced (a small substitute for TIR's stmt functors, which
    this TVM does not expose to Python). Raises TypeError on nodes it does not know."""
    from tvm.ir import Call
    from tvm.ir.expr import TensorLoad
    from tvm.tirx import expr as E

    def go(e):
        if isinstance(e, E.Var):
            return var_map.get(e, e)
        if isinstance(e, (E.IntImm, E.FloatImm)):
            return e
        if isinstance(e, TensorLoad):
            return E.BufferLoad(e.source, [go(i) for i in e.indices])
        if isinstance(e, E.Cast):
            return E.Cast(_dtype(e), go(e.value))
        if isinstance(e, E.BinaryOpExpr):
            return type(e)(go(e.a), go(e.b))
        if isinstance(e, Call):
            return Call(_dtype(e), e.op, [go(a) for a in e.args])
        raise TypeError(f"cannot rebuild {type(e).__name__}")

    return go(expr)


def _dtype(expr) -> str:
    return str(expr.ty)


def _uses(expr, names: set) -> bool:
    """Whether `expr` mentions any of the variables (by identity) in `names`."""
    from tvm.ir import Call
    from tvm.ir.expr import TensorLoad
    from tvm.tirx import expr as E

    if isinstance(expr, E.Var):
        return any(expr.same_as(v) for v in names)
    if isinstance(expr, TensorLoad):
        return any(_uses(i, names) for i in expr.indices)
    if isinstance(expr, E.Cast):
        return _uses(expr.value, names)
    if isinstance(expr, E.BinaryOpExpr):
        return _uses(expr.a, names) or _uses(expr.b, names)
    if isinstance(expr, Call):
        return any(_uses(a, names) for a in expr.args)
    return False


def _is_plain_load(expr) -> bool:
    from tvm.ir.expr import TensorLoad
    from tvm.tirx import expr as E

    while isinstance(expr, E.Cast):
        expr = expr.value
    return isinstance(expr, TensorLoad)


def hoist_weight_expr(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Split `C[.., n] += X[.., k] * f(W)[n, k]` into a block computing D[n, k] = f(W) and
    the matmul reading D, when f is more than a load (a dequantization). Scheduling then
    places D per tile of output features, so each weight is unpacked once per tile instead
    of once per row. Returns None when the function has no such block."""
    from tvm.ir.expr import TensorLoad
    from tvm.s_tir import analysis
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    from tvm.tirx import expr as E

    root_realize = func.body
    if not isinstance(root_realize, SBlockRealize):
        return None
    root = root_realize.block
    nests = list(root.body) if isinstance(root.body, tirx.SeqStmt) else [root.body]
    for pos, nest in enumerate(nests):
        loops = []
        stmt = nest
        while isinstance(stmt, tirx.For):
            loops.append(stmt)
            stmt = stmt.body
        if not isinstance(stmt, SBlockRealize) or not loops:
            continue
        block = stmt.block
        kinds = "".join({0: "S", 2: "R"}.get(int(iv.iter_type), "O") for iv in block.iter_vars)
        if not (kinds.endswith("SR") and kinds.count("R") == 1 and "O" not in kinds):
            continue
        store = block.body
        if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, E.Add):
            continue
        acc, prod = store.value.a, store.value.b
        if not (isinstance(acc, TensorLoad) and acc.source.same_as(store.buffer)
                and isinstance(prod, E.Mul)):
            continue
        lead = {iv.var for iv in block.iter_vars[:-2]}
        vn, vk = block.iter_vars[-2], block.iter_vars[-1]
        if _uses(prod.a, lead) and not _uses(prod.b, lead):
            x_part, w_part = prod.a, prod.b
        elif _uses(prod.b, lead) and not _uses(prod.a, lead):
            x_part, w_part = prod.b, prod.a
        else:
            continue
        if _is_plain_load(w_part):
            return None
        n_ext, k_ext = vn.dom.extent, vk.dom.extent
        dq = tirx.decl_buffer((n_ext, k_ext), _dtype(w_part), name=f"{block.name_hint}_weight")
        buffers = {b: b for b in [*func.params, *root.alloc_buffers, dq]}
        n2 = tirx.Var("v_n", _dtype(vn.var))
        k2 = tirx.Var("v_k", _dtype(vk.var))
        body = tirx.BufferStore(dq, _rebuild(w_part, {vn.var: n2, vk.var: k2}), [n2, k2])
        iters = [tirx.IterVar(tvm.ir.Range(0, n_ext), n2, 0),
                 tirx.IterVar(tvm.ir.Range(0, k_ext), k2, 0)]
        draft = SBlock(iters, [], [], f"{block.name_hint}_weight", body)
        reads, writes = analysis.get_sblock_read_write_region(draft, buffers)
        dq_block = SBlock(iters, reads, writes, f"{block.name_hint}_weight", body)
        ln = tirx.Var("n", _dtype(vn.var))
        lk = tirx.Var("k", _dtype(vk.var))
        dq_nest = tirx.For(ln, 0, n_ext, tirx.ForKind.SERIAL, tirx.For(
            lk, 0, k_ext, tirx.ForKind.SERIAL, SBlockRealize([ln, lk], True, dq_block)))
        new_value = E.Add(acc, E.Mul(x_part, E.BufferLoad(dq, [vn.var, vk.var]))
                          if prod.a.same_as(x_part) else
                          E.Mul(E.BufferLoad(dq, [vn.var, vk.var]), x_part))
        new_store = tirx.BufferStore(store.buffer, new_value, store.indices)
        draft = SBlock(block.iter_vars, [], [], block.name_hint, new_store, block.init)
        reads, writes = analysis.get_sblock_read_write_region(draft, buffers)
        reads = [r for r in reads if not r.source.same_as(store.buffer)]
        new_block = SBlock(block.iter_vars, reads, block.writes, block.name_hint, new_store,
                           block.init, block.alloc_buffers, block.match_buffers,
                           block.annotations)
        new_inner = SBlockRealize(stmt.iter_values, stmt.predicate, new_block)
        for loop in reversed(loops):
            new_inner = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, new_inner,
                                 loop.thread_binding, loop.annotations)
        nests[pos:pos + 1] = [dq_nest, new_inner]
        new_root = SBlock(root.iter_vars, root.reads, root.writes, root.name_hint,
                          tirx.SeqStmt(nests), root.init, list(root.alloc_buffers) + [dq],
                          root.match_buffers, root.annotations)
        return func.with_body(SBlockRealize(root_realize.iter_values,
                                            root_realize.predicate, new_root))
    return None


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
        if _dtype(bound) != _dtype(loop.loop_var):
            bound = E.Cast(_dtype(loop.loop_var), bound)
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


# ------------------------------------------------------------------------------ rules


def _sched_matmul(sch: s_tir.Schedule, blocks: list) -> bool:
    """One sum reduction [lead..., n, k] (+ an elementwise epilogue, + a hoisted weight block
    in front, see `hoist_weight_expr`): rfactor-vectorized along k."""
    weight = None
    if len(blocks) >= 2 and _is_spatial(sch, blocks[0]) and "R" in _iter_kinds(sch, blocks[1]):
        weight, blocks = blocks[0], blocks[1:]
    if len(blocks) not in (1, 2):
        return False
    block = blocks[0]
    epilogue = blocks[1] if len(blocks) == 2 else None
    kinds = _iter_kinds(sch, block)
    if not (kinds.endswith("SR") and kinds.count("R") == 1 and "O" not in kinds):
        return False
    if epilogue is not None and not _is_spatial(sch, epilogue):
        return False
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        return False
    k_ext, n_ext = _extent(sch, loops[-1]), _extent(sch, loops[-2])
    if k_ext is None or n_ext is None or k_ext % VECTOR_LANES or k_ext < 4 * VECTOR_LANES:
        return False
    lead = loops[:-2]
    lead_ext = [_extent(sch, lp) for lp in lead]
    rows = None if any(e is None for e in lead_ext) else _prod(lead_ext)
    if weight is not None and rows == 1:
        sch.compute_inline(weight)     # one row: unpack in registers, never store
        weight = None
    tail = None
    if rows is None and GEMM_TILE_M > 1:
        # Symbolic rows: pad them to the tile so the register tile has no bounds check (a
        # guarded tile ran 2-3x slower). The padded input copy and the output copy are cheap.
        pad = [GEMM_TILE_M if e is None else 1 for e in lead_ext] + [1, 1]
        sch.pad_einsum(block, pad)
        after = _blocks(sch)
        i = [sch.get(b).name_hint for b in after].index(sch.get(block).name_hint)
        for producer in after[:i]:
            if weight is None or sch.get(producer).name_hint != sch.get(weight).name_hint:
                _sched_spatial(sch, producer)
        tail = after[i + 1]                       # copies the padded result out
        if epilogue is not None:
            sch.compute_inline(tail)
            tail = None
        loops = sch.get_loops(block)
        lead = loops[:-2]

    ko, kv = sch.split(loops[-1], [None, VECTOR_LANES])
    rf = sch.rfactor(kv, factor_axis=len(kinds) - 1)
    loops = sch.get_loops(rf)            # lead..., n, ko, kv
    lead, n, ko, kv = loops[:-3], loops[-3], loops[-2], loops[-1]
    m = sch.fuse(*lead) if len(lead) > 1 else (lead[0] if lead else None)
    if rows == 1:
        tile_n = GEMV_ROWS if n_ext % GEMV_ROWS == 0 else 1
        no, ni = sch.split(n, [None, tile_n])
        sch.reorder(no, ko, ni, kv)
        outer = sch.fuse(m, no) if m is not None else no
        sch.reverse_compute_at(block, outer)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, outer)
        if n_ext * k_ext >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
        sch.unroll(ni)
    else:
        tile_n = GEMM_TILE_N if n_ext % GEMM_TILE_N == 0 else 1
        mo, mi = sch.split(m, [None, GEMM_TILE_M])
        no, ni = sch.split(n, [None, tile_n])
        sch.reorder(no, mo, ko, ni, mi, kv)
        # Features outermost: a task unpacks its weight rows once and keeps them in L1 for
        # all row tiles. (Fusing no with a symbolic mo makes the bindings non-affine, which
        # `parallel` refuses.)
        sch.reverse_compute_at(block, mo)
        for consumer in (tail, epilogue):
            if consumer is not None:
                sch.reverse_compute_at(consumer, mo)
        if weight is not None:
            sch.compute_at(weight, no)
            _vectorize_inner(sch, sch.get_loops(weight)[-1])
        sch.parallel(no)
        sch.unroll(ni)
        sch.unroll(mi)
    sch.vectorize(kv)
    sch.decompose_reduction(rf, ko)
    return True


def _sched_rows(sch: s_tir.Schedule, blocks: list) -> bool:
    """Reductions and elementwise blocks over the same leading rows: parallel over rows, the
    blocks computed per row, spatial innermost loops vectorized."""
    last = blocks[-1]
    if not _is_spatial(sch, last):
        return False
    loops = sch.get_loops(last)
    if len(loops) < 2:
        return False
    for block in blocks[:-1]:
        kinds = _iter_kinds(sch, block)
        if "O" in kinds:
            return False
    # rows = all loops of the last block but the innermost
    row_loops = loops[:-1]
    row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
    for block in reversed(blocks[:-1]):
        try:
            sch.compute_at(block, row, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - a block that does not fit per row: give up
            return False
    inner = sch.get_loops(last)[-1]
    _vectorize_inner(sch, inner)
    for block in blocks[:-1]:
        if _is_spatial(sch, block):
            _vectorize_inner(sch, sch.get_loops(block)[-1])
    rows = _extent(sch, row)
    width = _extent(sch, sch.get_loops(last)[-1]) or 1
    if rows is None or rows * width * len(blocks) >= PARALLEL_MIN_WORK:
        sch.parallel(row)
    return True


def _vectorize_inner(sch: s_tir.Schedule, loop) -> None:
    ext = _extent(sch, loop)
    if ext is not None and ext >= VECTOR_LANES and ext % VECTOR_LANES == 0:
        _, vec = sch.split(loop, [None, VECTOR_LANES])
        try:
            sch.vectorize(vec)
        except Exception:  # noqa: BLE001 - e.g. an inner reduction: leave it scalar
            pass


def _sched_spatial(sch: s_tir.Schedule, block) -> None:
    """A lone spatial block among others: fused, vectorized where the width allows, and
    parallel."""
    loops = sch.get_loops(block)
    inner_ext = _extent(sch, loops[-1])
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if inner_ext is not None and inner_ext % VECTOR_LANES == 0:
        fused, vec = sch.split(fused, [None, VECTOR_LANES])
        sch.vectorize(vec)
    sch.parallel(fused)


def _sched_elementwise(sch: s_tir.Schedule, blocks: list) -> bool:
    """One spatial block: fuse all loops, vectorize 8 lanes, parallelize the rest."""
    if len(blocks) != 1 or not _is_spatial(sch, blocks[0]):
        return False
    block = blocks[0]
    loops = sch.get_loops(block)
    if not loops:
        return False
    inner_ext = _extent(sch, loops[-1])
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = _extent(sch, fused)
    if inner_ext is not None and inner_ext % VECTOR_LANES == 0:
        outer, vec = sch.split(fused, [None, VECTOR_LANES])
        sch.vectorize(vec)
    else:
        outer = fused
    if total is None or total >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    return True


RULES = (_sched_matmul, _sched_rows, _sched_elementwise)


def _one_row(sch: s_tir.Schedule, blocks: list) -> bool:
    """Whether the first reduction block has static leading extents multiplying to 1."""
    for block in blocks:
        if "R" in _iter_kinds(sch, block):
            ext = [_extent(sch, lp) for lp in sch.get_loops(block)[:-2]]
            return all(e is not None for e in ext) and _prod(ext) == 1
    return False


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The scheduled PrimFunc, or None when no rule applies."""
    for rule in RULES:
        sch = s_tir.Schedule(func)
        try:
            blocks = _inline_spatial(sch)
            if rule is _sched_matmul:
                hoisted = None if _one_row(sch, blocks) else hoist_weight_expr(sch.mod["main"])
                if hoisted is not None:
                    sch = s_tir.Schedule(hoisted)
                    blocks = _blocks(sch)
            if blocks and rule(sch, blocks):
                return sch.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception as e:  # noqa: BLE001 - a rule that fails halfway: try the next one
            logger.debug("rule %s failed: %s", rule.__name__, e)
    return None


@tvm.transform.module_pass(opt_level=0, name="mlc.ScheduleCPU")
def schedule_cpu(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Schedule every unscheduled TIR PrimFunc of a module for the CPU."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None:
            continue
        if func.attrs.get("tirx.is_scheduled", False):   # mlc's attention kernels, say
            continue
        attention = parallel_attention(gv.name_hint, func)
        if attention is not None:
            updates[gv] = attention
            continue
        scheduled = schedule_func(func)
        if scheduled is not None:
            updates[gv] = scheduled
        else:
            logger.debug("no CPU schedule for %s", gv.name_hint)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def passes(opt: str, sliding_window: int = 0) -> list:
    """The CPU passes of an opt level. mlc's attention kernels replace TVM's at every level,
    O0 included: TVM's paged-prefill kernel gives wrong results (see `cpu_attention`)."""
    replace = cpu_attention.replace_attention(sliding_window)
    return [replace] if opt == "O0" else [replace, schedule_cpu]
