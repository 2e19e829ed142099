"""TIR analysis and rewrites shared by the CPU schedule rules (`cpu_rules`).

Block kinds, the inlining every rule starts from, and `hoist_weight_expr`, which splits a
dequantize-matmul so a prefill tile can unpack each weight once.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx


def loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """'S'/'R' per block iter var (anything else -> 'O')."""
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
    return "".join(kinds)


def is_spatial(sch: s_tir.Schedule, block) -> bool:
    return set(iter_kinds(sch, block)) <= {"S"}


def child_blocks(sch: s_tir.Schedule):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return sch.get_child_blocks(root) if root is not None else []


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False


def inline_spatial(sch: s_tir.Schedule) -> list:
    """Inline every spatial producer into its consumers, then spatial epilogues backwards
    into their producer where possible. Returns the remaining blocks in order."""
    changed = True
    while changed:
        changed = False
        blocks = child_blocks(sch)
        for block in blocks[:-1]:
            if is_spatial(sch, block):
                try:
                    sch.compute_inline(block)
                    changed = True
                    break
                except Exception:  # noqa: BLE001 - not inlinable: keep it
                    continue
    blocks = child_blocks(sch)
    for block in reversed(blocks[1:]):
        if is_spatial(sch, block):
            try:
                sch.reverse_compute_inline(block)
            except Exception:  # noqa: BLE001
                pass
    return child_blocks(sch)


def is_one_row(sch: s_tir.Schedule, blocks: list) -> bool:
    """Whether the first reduction block has static leading extents multiplying to 1."""
    for block in blocks:
        if "R" in iter_kinds(sch, block):
            ext = [loop_extent(sch, lp) for lp in sch.get_loops(block)[:-2]]
            return all(e is not None for e in ext) and math.prod(ext) == 1
    return False


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
            return E.Cast(dtype_of(e), go(e.value))
        if isinstance(e, E.BinaryOpExpr):
            return type(e)(go(e.a), go(e.b))
        if isinstance(e, Call):
            return Call(dtype_of(e), e.op, [go(a) for a in e.args])
        raise TypeError(f"cannot rebuild {type(e).__name__}")

    return go(expr)


def dtype_of(expr) -> str:
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
        dq = tirx.decl_buffer((n_ext, k_ext), dtype_of(w_part), name=f"{block.name_hint}_weight")
        buffers = {b: b for b in [*func.params, *root.alloc_buffers, dq]}
        n2 = tirx.Var("v_n", dtype_of(vn.var))
        k2 = tirx.Var("v_k", dtype_of(vk.var))
        body = tirx.BufferStore(dq, _rebuild(w_part, {vn.var: n2, vk.var: k2}), [n2, k2])
        iters = [tirx.IterVar(tvm.ir.Range(0, n_ext), n2, 0),
                 tirx.IterVar(tvm.ir.Range(0, k_ext), k2, 0)]
        draft = SBlock(iters, [], [], f"{block.name_hint}_weight", body)
        reads, writes = analysis.get_sblock_read_write_region(draft, buffers)
        dq_block = SBlock(iters, reads, writes, f"{block.name_hint}_weight", body)
        ln = tirx.Var("n", dtype_of(vn.var))
        lk = tirx.Var("k", dtype_of(vk.var))
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
