"""Multi-threaded, vectorized CPU attention kernels that replace TVM 0.27's.

TVM's CPU kernels are scalar and single-threaded, and its paged-prefill kernel
(`batch_prefill_paged_kv_cpu`, plain and `_sliding_window`) is wrong: when the first key it
visits is masked out, it rescales by `new_m`, a scratch value that was never written, so the
result depends on whatever the stack held (NaN on Intel Sapphire Rapids with LLVM's
`-mcpu=rocketlake`/`skylake-avx512`, harmless on AMD Zen 4; reproduction in bench/NOTES.md).
A sliding-window layer masks its oldest cached keys on every chunk after the first, so every
sliding-window model hit it. mlc therefore replaces all of them, at every opt level:

* `batch_decode_paged_kv_cpu[_sliding_window]`: one new token per sequence against its pages;
* `batch_prefill_paged_kv_cpu[_sliding_window]`: a prompt chunk against the cached keys before
  it (causal, or the sliding window's visible past);
* `batch_prefill_ragged_kv`: a prompt chunk against its own keys.

Each keeps TVM's signature exactly (the KV cache calls them by position), runs one task per
(query, head) on TVM's thread pool and walks keys 16 at a time (one page): scores for the
block (8-lane partial dot products), one rescale of the output per block, then the weighted
sum of values, 8 lanes at a time. Same math and conventions as TVM's (base-2 online softmax,
`lse = m + log2(d)`, starting from m = -5e4, d = 1, so a query that sees no key yields 0 with
lse -5e4 and vanishes in the merge), float32 inside.

RoPE is applied before attention in mlc's models (`RopeMode.NORMAL`; the runtime never asks
the cache for inline RoPE), so these kernels run only with rotary_mode == 0 and assert it.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

LOG2E = 1.4426950408889634
BLOCK = 16           # keys per block (= the page size the KV cache runs with)
LANES = 8
NO_SCORE = -50000.0  # TVM's starting running max (and the lse of a query that sees no key)


def _attention_macros(d: int, paged: bool):
    """The math every kernel shares, on float32 scratch buffers of one (query, head) task:
    `start` loads the scaled query and clears the state; `attend_block` folds one block of
    `rows` keys into the online softmax; `finish` writes out. Key r of a block is row
    loc[r, 0] of k/v [n, h_kv, d] (ragged), or slot loc[r, 1] of page loc[r, 0] of the
    pages [p, 2, h_kv, page, d] (paged; k and v are then both the pages)."""
    chunks, tail = d // LANES, d % LANES

    def key(k, row, slot, kv_head, i):
        if paged:
            return T.Cast("float32", k[row, 0, kv_head, slot, i])
        return T.Cast("float32", k[row, kv_head, i])

    def value(v, row, slot, kv_head, i):
        if paged:
            return T.Cast("float32", v[row, 1, kv_head, slot, i])
        return T.Cast("float32", v[row, kv_head, i])

    @T.macro
    def start(q_loc, o_loc, state, q_buf, q_row, q_head, scale):
        for i in range(d):
            q_loc[i] = T.Cast("float32", q_buf[q_row, q_head, i]) * scale
            o_loc[i] = T.float32(0)
        state[0] = T.float32(NO_SCORE)        # running max m
        state[1] = T.float32(1.0)             # running sum d

    @T.macro
    def attend_block(rows, k, v, loc, kv_head, q_loc, o_loc, part, score, state):
        state[2] = T.float32(NO_SCORE)        # this block's max
        for r in range(rows):
            row: T.let[T.int32] = loc[r, 0]
            slot: T.let[T.int32] = loc[r, 1]
            for lane in T.vectorized(LANES):
                part[lane] = T.float32(0)
            for c in range(chunks):
                for lane in T.vectorized(LANES):
                    part[lane] = part[lane] + q_loc[c * LANES + lane] * key(
                        k, row, slot, kv_head, c * LANES + lane)
            for i in range(tail):
                part[0] = part[0] + q_loc[chunks * LANES + i] * key(
                    k, row, slot, kv_head, chunks * LANES + i)
            score[r] = ((part[0] + part[1]) + (part[2] + part[3])) + (
                (part[4] + part[5]) + (part[6] + part[7]))
            state[2] = T.max(state[2], score[r])
        state[3] = T.max(state[0], state[2])  # the new running max
        state[1] = state[1] * T.exp2(state[0] - state[3])
        for i in T.vectorized(d):
            o_loc[i] = o_loc[i] * T.exp2(state[0] - state[3])
        state[0] = state[3]
        for r in range(rows):
            row: T.let[T.int32] = loc[r, 0]
            slot: T.let[T.int32] = loc[r, 1]
            state[3] = T.exp2(score[r] - state[0])
            state[1] = state[1] + state[3]
            for i in T.vectorized(d):
                o_loc[i] = o_loc[i] + state[3] * value(v, row, slot, kv_head, i)

    @T.macro
    def finish(o_loc, state, out_buf, lse_buf, row, head, dtype):
        for i in T.vectorized(d):
            out_buf[row, head, i] = T.Cast(dtype, o_loc[i] / state[1])
        lse_buf[row, head] = state[0] + T.log2(state[1])

    return start, attend_block, finish


@T.macro
def _locate_paged_block(loc, page_values, begin, first_key, rows, sink, offset, page_size):
    """loc[r] = (page, slot) of keys first_key + r of a sequence's view. Key i sits at
    position i before the attention sink and at i - sink + offset after it (the sliding
    window's start within its first page; both 0 without a window)."""
    for r in range(rows):
        key: T.let[T.int32] = first_key + r
        pos: T.let[T.int32] = T.if_then_else(key < sink, key, key - sink + offset)
        loc[r, 0] = page_values[begin + pos // page_size]
        loc[r, 1] = pos % page_size


def _length_info(sliding: bool):
    """Readers of the KV cache's length table: [b] (last page length) without a sliding
    window, [3, b] (last page length, window offset, sink length) with one."""
    if sliding:
        return ((lambda info, b: info[0, b]), (lambda info, b: info[1, b]),
                (lambda info, b: info[2, b]))
    return ((lambda info, b: info[b]), (lambda info, b: 0), (lambda info, b: 0))


def decode_kernel(h_q: int, h_kv: int, d: int, dtype: str, page_size: int = BLOCK,
                  sliding: bool = False):
    """`batch_decode_paged_kv_cpu[_sliding_window]`: one new token per sequence against its
    pages (the cache appends it before attention, and for a window keeps only its pages)."""
    group = h_q // h_kv
    start, attend_block, finish = _attention_macros(d, paged=True)
    last_len, window_offset, sink_len = _length_info(sliding)
    info_shape = (lambda b: (3, b)) if sliding else (lambda b: (b,))
    name = "batch_decode_paged_kv_cpu" + ("_sliding_window" if sliding else "")

    @T.prim_func(s_tir=True)
    def kernel(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
        rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": name})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, h_q, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32",
                                           elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32",
                                           elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32",  # noqa: F841 (the signature)
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32",  # noqa: F841 (the signature)
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, h_q, d), dtype)
        lse = T.match_buffer(lse_handle, (B, h_q), "float32")
        length_info = T.match_buffer(var_length_info, info_shape(B), "int32",
                                     elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "mlc's CPU decode attention expects RoPE applied before it"
        for task in T.parallel(B * h_q):
            with T.sblock("attn"):
                T.reads(Q[0:B, 0:h_q, 0:d], pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d],
                        page_table_indptr[0:B + 1], page_table_values[0:nnz_pages],
                        length_info[0:B] if not sliding else length_info[0:3, 0:B])
                T.writes(output[0:B, 0:h_q, 0:d], lse[0:B, 0:h_q])
                q_loc = T.sblock_alloc_buffer((d,), "float32")
                o_loc = T.sblock_alloc_buffer((d,), "float32")
                loc = T.sblock_alloc_buffer((BLOCK, 2), "int32")
                part = T.sblock_alloc_buffer((LANES,), "float32")
                score = T.sblock_alloc_buffer((BLOCK,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")   # m, sum, block max, p
                b: T.let[T.int32] = task // h_q
                h: T.let[T.int32] = task % h_q
                begin: T.let[T.int32] = page_table_indptr[b]
                n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                n_keys: T.let[T.int32] = T.if_then_else(
                    n_pages > 0, (n_pages - 1) * page_size + last_len(length_info, b)
                    - window_offset(length_info, b) + sink_len(length_info, b), 0)
                start(q_loc, o_loc, state, Q, b, h, sm_scale * T.float32(LOG2E))
                for blk in range((n_keys + BLOCK - 1) // BLOCK):
                    rows: T.let[T.int32] = T.min(BLOCK, n_keys - blk * BLOCK)
                    _locate_paged_block(loc, page_table_values, begin, blk * BLOCK, rows,
                                        sink_len(length_info, b), window_offset(length_info, b),
                                        page_size)
                    attend_block(rows, pages, pages, loc, h // group, q_loc, o_loc, part,
                                 score, state)
                finish(o_loc, state, output, lse, b, h, dtype)

    return kernel


@T.macro
def _find_sequence(seq, q_indptr, batch_size, row):
    """seq[0] = the sequence whose queries hold `row` (q_indptr is sorted)."""
    seq[0] = 0
    for bb in range(batch_size):
        if q_indptr[bb] <= row:
            seq[0] = bb


def _interleaved_row(t, n):
    """Task t's query row: early and late rows alternate, so threads get equal causal work."""
    return T.if_then_else(t % 2 == 0, t // 2, n - 1 - t // 2)


def prefill_paged_kernel(h_q: int, h_kv: int, d: int, dtype: str, page_size: int = BLOCK,
                         sliding_window: int = 0):
    """`batch_prefill_paged_kv_cpu[_sliding_window]`: prompt chunks against the cached keys
    of their sequences. Causal: query i of a chunk of n sees the first kv_len - n + i + 1
    keys; with a window W it sees the last W - i - 1 cached keys (the rest of its window is
    in its own chunk, which the ragged kernel covers)."""
    group = h_q // h_kv
    sliding = sliding_window > 0
    start, attend_block, finish = _attention_macros(d, paged=True)
    last_len, window_offset, sink_len = _length_info(sliding)
    info_shape = (lambda b: (3, b)) if sliding else (lambda b: (b,))
    name = "batch_prefill_paged_kv_cpu" + ("_sliding_window" if sliding else "")

    def visible(causal, kv_len, q_len, q_idx):
        """(first, end) of the cached keys a query sees."""
        if sliding:
            return (T.if_then_else(causal > 0,
                                   T.max(kv_len - T.max(sliding_window - q_idx - 1, 0), 0), 0),
                    kv_len)
        return 0, T.if_then_else(causal > 0, T.max(T.min(kv_len - q_len + q_idx + 1, kv_len), 0),
                                 kv_len)

    @T.prim_func(s_tir=True)
    def kernel(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": name})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                     elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32",
                                     elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841 (the signature)
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32",  # noqa: F841 (the signature)
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        length_info = T.match_buffer(var_length_info, info_shape(batch_size), "int32",
                                     elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "mlc's CPU prefill attention expects RoPE applied before it"
        for task in T.parallel(total_len * h_q):
            with T.sblock("attn"):
                T.reads(q[0:total_len, 0:h_q, 0:d],
                        pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d],
                        q_indptr[0:batch_size + 1], page_indptr[0:batch_size + 1],
                        page_values[0:nnz_pages],
                        length_info[0:batch_size] if not sliding else length_info[0:3, 0:batch_size])
                T.writes(output[0:total_len, 0:h_q, 0:d], lse[0:total_len, 0:h_q])
                q_loc = T.sblock_alloc_buffer((d,), "float32")
                o_loc = T.sblock_alloc_buffer((d,), "float32")
                loc = T.sblock_alloc_buffer((BLOCK, 2), "int32")
                part = T.sblock_alloc_buffer((LANES,), "float32")
                score = T.sblock_alloc_buffer((BLOCK,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = _interleaved_row(task // h_q, total_len)
                h: T.let[T.int32] = task % h_q
                _find_sequence(seq, q_indptr, batch_size, row)
                b: T.let[T.int32] = seq[0]
                q_idx: T.let[T.int32] = row - q_indptr[b]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                begin: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - begin
                kv_len: T.let[T.int32] = T.if_then_else(
                    n_pages > 0, (n_pages - 1) * page_size + last_len(length_info, b)
                    - window_offset(length_info, b) + sink_len(length_info, b), 0)
                first: T.let[T.int32] = visible(causal, kv_len, q_len, q_idx)[0]
                end: T.let[T.int32] = visible(causal, kv_len, q_len, q_idx)[1]
                start(q_loc, o_loc, state, q, row, h, sm_scale * T.float32(LOG2E))
                for blk in range((end - first + BLOCK - 1) // BLOCK):
                    rows: T.let[T.int32] = T.min(BLOCK, end - first - blk * BLOCK)
                    _locate_paged_block(loc, page_values, begin, first + blk * BLOCK, rows,
                                        sink_len(length_info, b), window_offset(length_info, b),
                                        page_size)
                    attend_block(rows, pages, pages, loc, h // group, q_loc, o_loc, part,
                                 score, state)
                finish(o_loc, state, output, lse, row, h, dtype)

    return kernel


def prefill_ragged_kernel(h_q: int, h_kv: int, d: int, dtype: str):
    """`batch_prefill_ragged_kv`: prompt chunks attending to their own keys (causal or not)."""
    group = h_q // h_kv
    start, attend_block, finish = _attention_macros(d, paged=False)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
        var_kv_indptr: T.handle, var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_prefill_ragged_kv"})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32",
                                  elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32",
                                   elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",  # noqa: F841 (the signature)
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841 (the signature)
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "mlc's CPU prefill attention expects RoPE applied before it"
        for task in T.parallel(qo_len * h_q):
            with T.sblock("attn"):
                T.reads(q[0:qo_len, 0:h_q, 0:d], k[0:kv_len, 0:h_kv, 0:d],
                        v[0:kv_len, 0:h_kv, 0:d], q_indptr[0:batch_size + 1],
                        kv_indptr[0:batch_size + 1])
                T.writes(output[0:qo_len, 0:h_q, 0:d], lse[0:qo_len, 0:h_q])
                q_loc = T.sblock_alloc_buffer((d,), "float32")
                o_loc = T.sblock_alloc_buffer((d,), "float32")
                loc = T.sblock_alloc_buffer((BLOCK, 2), "int32")
                part = T.sblock_alloc_buffer((LANES,), "float32")
                score = T.sblock_alloc_buffer((BLOCK,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = _interleaved_row(task // h_q, qo_len)
                h: T.let[T.int32] = task % h_q
                _find_sequence(seq, q_indptr, batch_size, row)
                b: T.let[T.int32] = seq[0]
                q_idx: T.let[T.int32] = row - q_indptr[b]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                kv_start: T.let[T.int32] = kv_indptr[b]
                kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_start
                n_keys: T.let[T.int32] = T.max(0, T.if_then_else(
                    causal > 0, T.min(kv_n - q_len + q_idx + 1, kv_n), kv_n))
                start(q_loc, o_loc, state, q, row, h, sm_scale * T.float32(LOG2E))
                for blk in range((n_keys + BLOCK - 1) // BLOCK):
                    rows: T.let[T.int32] = T.min(BLOCK, n_keys - blk * BLOCK)
                    for r in range(rows):
                        loc[r, 0] = kv_start + blk * BLOCK + r
                    attend_block(rows, k, v, loc, h // group, q_loc, o_loc, part, score, state)
                finish(o_loc, state, output, lse, row, h, dtype)

    return batch_prefill_ragged_kv


_KERNELS = {
    "batch_decode_paged_kv_cpu": "decode",
    "batch_decode_paged_kv_cpu_sliding_window": "decode",
    "batch_prefill_paged_kv_cpu": "paged",
    "batch_prefill_paged_kv_cpu_sliding_window": "paged",
    "batch_prefill_ragged_kv": "ragged",
}


def replacement(name: str, func, sliding_window: int = 0):
    """mlc's kernel for a TVM CPU attention PrimFunc (same signature), or None for one it
    does not replace (MLA's different value width, dtypes other than float32/float16)."""
    kind = _KERNELS.get(name)
    if kind is None:
        return None
    params = func.params      # buffers here (this TVM keeps the matched buffers as params)
    q = params[0]
    h_q, d, dtype = int(q.shape[1]), int(q.shape[2]), str(q.dtype)
    if kind == "ragged":
        k, v = params[2], params[3]
        h_kv = int(k.shape[1])
        if int(v.shape[2]) != d:                 # v_head_dim != qk_head_dim (MLA)
            return None
    else:
        pages = params[1] if kind == "decode" else params[2]
        h_kv, page_size = int(pages.shape[2]), int(pages.shape[3])
    if h_q % h_kv or dtype not in ("float32", "float16"):
        return None
    sliding = name.endswith("_sliding_window")
    if kind == "decode":
        return decode_kernel(h_q, h_kv, d, dtype, page_size, sliding=sliding)
    if kind == "paged":
        if sliding and sliding_window <= 0:
            raise ValueError(f"{name} needs the window its KV cache was built with")
        return prefill_paged_kernel(h_q, h_kv, d, dtype, page_size,
                                    sliding_window if sliding else 0)
    return prefill_ragged_kernel(h_q, h_kv, d, dtype)


def replace_attention(sliding_window: int = 0):
    """A module pass swapping TVM's CPU attention kernels for mlc's. It runs at every opt
    level: it fixes results (TVM's paged prefill reads uninitialized memory), not only speed."""

    @tvm.transform.module_pass(opt_level=0, name="mlc.ReplaceCPUAttention")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                new = replacement(gv.name_hint, func, sliding_window)
                if new is not None:
                    updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
