"""Multi-threaded, vectorized replacements for TVM 0.27's CPU attention kernels.

TVM's `batch_decode_paged_kv_cpu` and `batch_prefill_ragged_kv` (the kernels a decode step
and a fresh prompt chunk run) are scalar and single-threaded; the ragged one also scores every
masked key. The kernels below keep their signatures exactly (the KV cache calls them by
position), run one task per (query, head) on TVM's thread pool and walk keys 16 at a time
(one page): scores for the block (8-lane partial dot products), one rescale of the output per
block, then the weighted sum of values, 8 lanes at a time. Same math as TVM's (base-2 online
softmax, `lse = m + log2(d)`, starting from m = -5e4, d = 1), float32 inside.

RoPE is applied before attention in mlc's models (`RopeMode.NORMAL`), so these kernels run
only with rotary_mode == 0 and assert it.
"""

from __future__ import annotations

from tvm.script import tirx as T

LOG2E = 1.4426950408889634
BLOCK = 16          # keys per block (= the page size the KV cache runs with)
LANES = 8


def decode_kernel(h_q: int, h_kv: int, d: int, dtype: str, page_size: int = 16):
    """`batch_decode_paged_kv_cpu`: one new token per sequence against its pages."""
    group = h_q // h_kv
    chunks = d // LANES

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle, q_rope_position_handle: T.handle,
        output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
        rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu"})
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
        length_info = T.match_buffer(var_length_info, (B,), "int32",
                                     elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "mlc's CPU decode attention expects RoPE applied before it"
        for task in T.parallel(B * h_q):
            with T.sblock("attn"):
                T.reads(Q[0:B, 0:h_q, 0:d], pages[0:max_num_pages, 0:2, 0:h_kv, 0:page_size, 0:d],
                        page_table_indptr[0:B + 1], page_table_values[0:nnz_pages],
                        length_info[0:B])
                T.writes(output[0:B, 0:h_q, 0:d], lse[0:B, 0:h_q])
                q_loc = T.sblock_alloc_buffer((d,), "float32")
                o_loc = T.sblock_alloc_buffer((d,), "float32")
                part = T.sblock_alloc_buffer((LANES,), "float32")
                score = T.sblock_alloc_buffer((page_size,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")   # m, sum, block max, p
                b: T.let[T.int32] = task // h_q
                h: T.let[T.int32] = task % h_q
                begin: T.let[T.int32] = page_table_indptr[b]
                n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                for i in T.vectorized(d):
                    q_loc[i] = T.Cast("float32", Q[b, h, i]) * (sm_scale * T.float32(LOG2E))
                    o_loc[i] = T.float32(0)
                state[0] = T.float32(-50000.0)
                state[1] = T.float32(1.0)
                for p in range(n_pages):
                    page: T.let[T.int32] = page_table_values[begin + p]
                    rows: T.let[T.int32] = T.if_then_else(p == n_pages - 1, length_info[b],
                                                          page_size)
                    state[2] = T.float32(-50000.0)
                    for r in range(rows):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.float32(0)
                        for c in range(chunks):
                            for lane in T.vectorized(LANES):
                                part[lane] = part[lane] + q_loc[c * LANES + lane] * T.Cast(
                                    "float32", pages[page, 0, h // group, r, c * LANES + lane])
                        score[r] = ((part[0] + part[1]) + (part[2] + part[3])) + (
                            (part[4] + part[5]) + (part[6] + part[7]))
                        state[2] = T.max(state[2], score[r])
                    state[3] = T.max(state[0], state[2])          # the new running max
                    state[1] = state[1] * T.exp2(state[0] - state[3])
                    for i in T.vectorized(d):
                        o_loc[i] = o_loc[i] * T.exp2(state[0] - state[3])
                    state[0] = state[3]
                    for r in range(rows):
                        state[3] = T.exp2(score[r] - state[0])
                        state[1] = state[1] + state[3]
                        for i in T.vectorized(d):
                            o_loc[i] = o_loc[i] + state[3] * T.Cast(
                                "float32", pages[page, 1, h // group, r, i])
                for i in T.vectorized(d):
                    output[b, h, i] = T.Cast(dtype, o_loc[i] / state[1])
                lse[b, h] = state[0] + T.log2(state[1])

    return batch_decode_paged_kv_cpu


def prefill_ragged_kernel(h_q: int, h_kv: int, d: int, dtype: str):
    """`batch_prefill_ragged_kv`: prompt chunks attending to their own keys (causal or not).
    Tasks interleave early and late queries so both threads get equal causal work."""
    group = h_q // h_kv
    chunks = d // LANES

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
                part = T.sblock_alloc_buffer((LANES,), "float32")
                score = T.sblock_alloc_buffer((BLOCK,), "float32")
                state = T.sblock_alloc_buffer((4,), "float32")   # m, sum, block max, p
                seq = T.sblock_alloc_buffer((1,), "int32")
                t: T.let[T.int32] = task // h_q
                h: T.let[T.int32] = task % h_q
                row: T.let[T.int32] = T.if_then_else(t % 2 == 0, t // 2, qo_len - 1 - t // 2)
                seq[0] = 0
                for bb in range(batch_size):
                    if q_indptr[bb] <= row:
                        seq[0] = bb
                b: T.let[T.int32] = seq[0]
                q_idx: T.let[T.int32] = row - q_indptr[b]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                kv_start: T.let[T.int32] = kv_indptr[b]
                kv_n: T.let[T.int32] = kv_indptr[b + 1] - kv_start
                n_keys: T.let[T.int32] = T.max(0, T.if_then_else(
                    causal > 0, T.min(kv_n - q_len + q_idx + 1, kv_n), kv_n))
                for i in T.vectorized(d):
                    q_loc[i] = T.Cast("float32", q[row, h, i]) * (sm_scale * T.float32(LOG2E))
                    o_loc[i] = T.float32(0)
                state[0] = T.float32(-50000.0)
                state[1] = T.float32(1.0)
                for blk in range((n_keys + BLOCK - 1) // BLOCK):
                    rows: T.let[T.int32] = T.min(BLOCK, n_keys - blk * BLOCK)
                    state[2] = T.float32(-50000.0)
                    for r in range(rows):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.float32(0)
                        for c in range(chunks):
                            for lane in T.vectorized(LANES):
                                part[lane] = part[lane] + q_loc[c * LANES + lane] * T.Cast(
                                    "float32",
                                    k[kv_start + blk * BLOCK + r, h // group, c * LANES + lane])
                        score[r] = ((part[0] + part[1]) + (part[2] + part[3])) + (
                            (part[4] + part[5]) + (part[6] + part[7]))
                        state[2] = T.max(state[2], score[r])
                    state[3] = T.max(state[0], state[2])
                    state[1] = state[1] * T.exp2(state[0] - state[3])
                    for i in T.vectorized(d):
                        o_loc[i] = o_loc[i] * T.exp2(state[0] - state[3])
                    state[0] = state[3]
                    for r in range(rows):
                        state[3] = T.exp2(score[r] - state[0])
                        state[1] = state[1] + state[3]
                        for i in T.vectorized(d):
                            o_loc[i] = o_loc[i] + state[3] * T.Cast(
                                "float32", v[kv_start + blk * BLOCK + r, h // group, i])
                for i in T.vectorized(d):
                    output[row, h, i] = T.Cast(dtype, o_loc[i] / state[1])
                lse[row, h] = state[0] + T.log2(state[1])

    return batch_prefill_ragged_kv


def replacement(name: str, func):
    """The replacement kernel for a TVM CPU attention PrimFunc (same signature), or None."""
    try:
        if name == "batch_decode_paged_kv_cpu":
            q, pages = func.params[0], func.params[1]
            if len(q.shape) != 3 or int(pages.shape[3]) != BLOCK:
                return None
            h_q, d, h_kv, dtype = int(q.shape[1]), int(q.shape[2]), int(pages.shape[2]), q.dtype
            make = decode_kernel
        elif name == "batch_prefill_ragged_kv":
            q, k = func.params[0], func.params[2]
            h_q, d, h_kv, dtype = int(q.shape[1]), int(q.shape[2]), int(k.shape[1]), q.dtype
            if int(func.params[3].shape[2]) != d:       # v_head_dim != qk_head_dim (MLA)
                return None
            make = prefill_ragged_kernel
        else:
            return None
    except (TypeError, ValueError, IndexError):
        return None
    if d % LANES or h_q % h_kv or str(dtype) not in ("float32", "float16"):
        return None
    return make(h_q, h_kv, d, str(dtype))
