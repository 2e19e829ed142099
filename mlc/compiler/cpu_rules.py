"""The CPU schedules as TVM dlight rules, chosen by the pattern of a PrimFunc.

Each rule is a `tvm.s_tir.dlight.ScheduleRule`: `apply(func, target, tunable)` returns a
schedule, or None when the PrimFunc is not its pattern. `CPU_RULES` goes to dlight's own
`ApplyDefaultSchedule` pass, which gives every unscheduled PrimFunc the first rule that
applies. Nothing looks at a function's name or at a model's shapes, so a new architecture's
kernels are scheduled by the same four rules:

* `DecodeGEMV`: one sum reduction `[rows..., n, k]` over a static k whose leading extents
  multiply to 1 (a decode matmul, q4-dequantizing or float), plus an elementwise epilogue.
  k is split into 8-lane vectors and rfactored, so each output keeps a vector accumulator;
  x and the packed weights are read contiguously along k and the 4-bit unpacking vectorizes.
  8 output features per parallel task share each x vector.
* `PrefillGEMM`: the same reduction over symbolic (or several) rows. The dequantization is
  hoisted into its own block (`cpu_tir.hoist_weight_expr`) and computed once per tile of 4
  features; rows are padded to the tile and a 4 rows x 4 features register tile runs
  without bounds checks.
* `RowReduction`: reductions and elementwise blocks over the same rows (RMSNorm, softmax,
  ...): parallel over rows, each row's blocks computed at the row, inner loops vectorized.
* `Elementwise`: spatial blocks only (one, or the outputs of a split): each one fused loop,
  vectorized inner part, parallel outer part.

Kernels with little work stay single-threaded: a parallel launch costs microseconds, more
than a 576-element RMSNorm. The rule that scheduled a PrimFunc is kept in its `mlc.cpu_rule`
attribute (`scheduled_by`). Measurements behind each choice: bench/NOTES.md.
"""

from __future__ import annotations

import logging
import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import Target

from mlc.compiler.cpu_tir import (
    child_blocks,
    hoist_weight_expr,
    inline_spatial,
    is_one_row,
    is_spatial,
    iter_kinds,
    loop_extent,
)

logger = logging.getLogger(__name__)

VECTOR_LANES = 8          # float32 lanes of one AVX2 register (AVX-512 measured slower here)
GEMV_ROWS = 8             # output features per decode task
GEMM_TILE_M = 4           # rows x features of the prefill register tile
GEMM_TILE_N = 4
PARALLEL_MIN_WORK = 1 << 15   # elements (times K for reductions) worth a parallel launch
RULE_ATTR = "mlc.cpu_rule"


# ------------------------------------------------------------------------------ primitives


def gemv_lanes(target: Target) -> int:
    """float32 lanes per vector of the decode GEMV: 16 (one AVX-512 register) on Intel CPUs
    with AVX-512, 8 elsewhere. On the Sapphire Rapids Xeon 16 lanes decoded SmolLM2 7% faster
    (alternating A/B runs), on Zen 4 (which splits 512-bit ops) slower (bench/NOTES.md)."""
    from mlc.support.cpu_info import target_features

    mcpu = str(target.attrs.get("mcpu", ""))
    if "avx512f" in target_features(target) and not mcpu.startswith("znver"):
        return 2 * VECTOR_LANES
    return VECTOR_LANES


def _sched_matmul(sch: s_tir.Schedule, blocks: list, row_lanes: int = VECTOR_LANES) -> bool:
    """One sum reduction [lead..., n, k] (+ an elementwise epilogue, + a hoisted weight block
    in front, see `hoist_weight_expr`): rfactor-vectorized along k."""
    weight = None
    if len(blocks) >= 2 and is_spatial(sch, blocks[0]) and "R" in iter_kinds(sch, blocks[1]):
        weight, blocks = blocks[0], blocks[1:]
    if len(blocks) not in (1, 2):
        return False
    block = blocks[0]
    epilogue = blocks[1] if len(blocks) == 2 else None
    kinds = iter_kinds(sch, block)
    if not (kinds.endswith("SR") and kinds.count("R") == 1 and "O" not in kinds):
        return False
    if epilogue is not None and not is_spatial(sch, epilogue):
        return False
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        return False
    k_ext, n_ext = loop_extent(sch, loops[-1]), loop_extent(sch, loops[-2])
    lead = loops[:-2]
    lead_ext = [loop_extent(sch, lp) for lp in lead]
    rows = None if any(e is None for e in lead_ext) else math.prod(lead_ext)
    lanes = row_lanes if rows == 1 else VECTOR_LANES
    if k_ext is None or n_ext is None or k_ext % lanes or k_ext < 4 * lanes:
        return False
    if weight is not None and rows == 1:
        sch.compute_inline(weight)     # one row: unpack in registers, never store
        weight = None
    tail = None
    if rows is None and GEMM_TILE_M > 1:
        # Symbolic rows: pad them to the tile so the register tile has no bounds check (a
        # guarded tile ran 2-3x slower). The padded input copy and the output copy are cheap.
        pad = [GEMM_TILE_M if e is None else 1 for e in lead_ext] + [1, 1]
        sch.pad_einsum(block, pad)
        after = child_blocks(sch)
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

    ko, kv = sch.split(loops[-1], [None, lanes])
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
    if not is_spatial(sch, last):
        return False
    loops = sch.get_loops(last)
    if len(loops) < 2:
        return False
    for block in blocks[:-1]:
        kinds = iter_kinds(sch, block)
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
        if is_spatial(sch, block):
            _vectorize_inner(sch, sch.get_loops(block)[-1])
    rows = loop_extent(sch, row)
    width = loop_extent(sch, sch.get_loops(last)[-1]) or 1
    if rows is None or rows * width * len(blocks) >= PARALLEL_MIN_WORK:
        sch.parallel(row)
    return True


def _vectorize_inner(sch: s_tir.Schedule, loop) -> None:
    ext = loop_extent(sch, loop)
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
    inner_ext = loop_extent(sch, loops[-1])
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if inner_ext is not None and inner_ext % VECTOR_LANES == 0:
        fused, vec = sch.split(fused, [None, VECTOR_LANES])
        sch.vectorize(vec)
    sch.parallel(fused)


def _sched_elementwise(sch: s_tir.Schedule, blocks: list) -> bool:
    """Spatial blocks only (one, or several side by side such as the outputs of a split):
    each gets its loops fused, 8 lanes vectorized, the rest parallel when large enough."""
    if not blocks or not all(is_spatial(sch, b) for b in blocks):
        return False
    if any(not sch.get_loops(b) for b in blocks):
        return False
    for block in blocks:
        loops = sch.get_loops(block)
        inner_ext = loop_extent(sch, loops[-1])
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = loop_extent(sch, fused)
        if inner_ext is not None and inner_ext % VECTOR_LANES == 0:
            outer, vec = sch.split(fused, [None, VECTOR_LANES])
            sch.vectorize(vec)
        else:
            outer = fused
        if total is None or total >= PARALLEL_MIN_WORK:
            sch.parallel(outer)
    return True


# ------------------------------------------------------------------------------ rules


class CPURule(ScheduleRule):
    """A CPU rule: `schedule` returns a Schedule of the PrimFunc (tagged with the rule's name
    in `mlc.cpu_rule`), or None when the PrimFunc is not its pattern. A rule that fails
    halfway does not apply (dlight's pass would stop at an exception)."""

    name = "cpu"

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self.schedule(func.with_attr(RULE_ATTR, self.name), target)
        except Exception as e:  # noqa: BLE001 - TVM raises generic errors for a misfit
            logger.debug("rule %s does not apply: %s", self.name, e)
            return None

    def schedule(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class DecodeGEMV(CPURule):
    """A matmul with one row (decode): the dequantization unpacked in registers."""

    name = "gemv"

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        blocks = inline_spatial(sch)
        ok = (bool(blocks) and is_one_row(sch, blocks)
              and _sched_matmul(sch, blocks, gemv_lanes(target)))
        return sch if ok else None


class PrefillGEMM(CPURule):
    """A matmul with symbolic or several rows (prefill, batched decode)."""

    name = "gemm"

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        blocks = inline_spatial(sch)
        if not blocks or is_one_row(sch, blocks):
            return None
        hoisted = hoist_weight_expr(sch.mod["main"])
        if hoisted is not None:       # a Schedule cannot add blocks: restart from the rewrite
            sch = s_tir.Schedule(hoisted)
            blocks = child_blocks(sch)
        return sch if _sched_matmul(sch, blocks) else None


class RowReduction(CPURule):
    """Reductions over the last axis of rows, with their elementwise neighbours."""

    name = "rows"

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        blocks = inline_spatial(sch)
        return sch if blocks and _sched_rows(sch, blocks) else None


class Elementwise(CPURule):
    """Spatial blocks only."""

    name = "elementwise"

    def schedule(self, func, target):
        sch = s_tir.Schedule(func)
        blocks = inline_spatial(sch)
        return sch if blocks and _sched_elementwise(sch, blocks) else None


CPU_RULES = (DecodeGEMV(), PrefillGEMM(), RowReduction(), Elementwise())


def schedule_func(func: tirx.PrimFunc, target: Target | None = None) -> tirx.PrimFunc | None:
    """`func` scheduled by the first rule that applies (for `target`, by default the current
    one or plain llvm), or None: what `ApplyDefaultSchedule(*CPU_RULES)` does to one func."""
    target = target or Target.current(allow_none=True) or Target({"kind": "llvm"})
    for rule in CPU_RULES:
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


def scheduled_by(func: tirx.PrimFunc) -> str | None:
    """The name of the rule that scheduled `func` (None: no rule did)."""
    attrs = func.attrs
    return str(attrs[RULE_ATTR]) if attrs is not None and RULE_ATTR in attrs else None
