// mlc's CUDA attention kernels for TVM's paged KV cache, linked into CUDA model libraries and
// registered as TVM FFI global functions. They take EXACTLY the arguments the KV cache passes to
// its TIR kernels (tvm/src/runtime/vm/attn_backend.h: TIRRaggedPrefillFunc, TIRPagedPrefillFunc,
// TIRPagedDecodeFunc), so `cuda_attention.use_mlc_attention` can swap the functions:
//
//   mlc.cuda.attn_prefill_ragged(q, q_indptr, k, v, kv_indptr, q_rope_position,
//       k_rope_pos_offset, output, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale)
//   mlc.cuda.attn_prefill_paged(q, qo_indptr, pages, page_indptr, page_indices, length_info,
//       k_rope_pos_offset, q_rope_position, output, lse, causal, rotary_mode, rope_scale,
//       rope_theta, sm_scale)
//   mlc.cuda.attn_decode_paged(q, pages, page_indptr, page_indices, length_info,
//       k_rope_pos_offset, q_rope_position, output, lse, rotary_mode, rope_scale, rope_theta,
//       sm_scale)
//
// Shapes: q/output [n, h_q, d] f16, lse [n, h_q] f32, k/v [n_kv, h_kv, d] f16, pages
// [num_pages, 2 (k, v), h_kv, 16, d] f16, index arrays int32 (views with a byte_offset are fine).
// d is 64 or 128, h_q a multiple of h_kv; q head h reads kv head h / (h_q / h_kv).
//
// Semantics (TVM's, so results merge with TVM's `merge_state_inplace`): scores s = q.k * sm_scale
// * log2(e); the causal mask of sequence b keeps key `col` for query row `row` (both counted
// within the sequence) iff col < kv_len - qo_len + row + 1; softmax with exp2; lse = m + log2(l)
// in log2 units. A query row that sees no key (kv_len 0) gets output 0 and lse -5e4, as TVM's
// kernels give. A paged sequence has kv_len = (pages - 1) * 16 + last_page_len (0 if no pages).
// RoPE must already be applied (rotary_mode 0); the rope arguments are not read.
//
// Prefill (both): FlashAttention-2 on tensor cores (mma.sync m16n8k16, f16 in, f32 accumulate).
// Query rows are packed as TVM does, row = token * group + head_in_group, so the heads that share
// a kv head share each K/V tile. A block (4 warps, 16 rows each) takes 64 packed rows of one
// sequence for one kv head and walks 64-key K/V tiles (cp.async, double-buffered, ldmatrix),
// online softmax in registers; causal tiles past the diagonal are skipped and only tiles that
// cross it are masked. The grid is one block per (tile slot, kv head) with an upper bound on the
// number of tiles; each block finds its (sequence, tile) from q_indptr on the device (a warp scan
// over the batch), so nothing is computed on the host and no host sync is needed.
//
// Decode: split-KV (flash-decoding) on tensor cores: one block per (split, kv head, 16-head chunk,
// sequence); its 4 warps take alternate 16-key pages of the split (cp.async per warp, 2 stages)
// with all q heads of the group as the 16 mma rows, then merge in shared memory. With one split
// the block writes the output; otherwise it writes a partial (O, lse) to a per-device workspace
// and the last block of the (sequence, kv head) to finish (atomic ticket) merges the partials:
// a single launch either way.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <set>
#include <unordered_map>
#include <utility>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "cuda_check.h"

namespace mlc {
namespace attn {
namespace {

using tvm::ffi::TensorView;

constexpr int kPageSize = 16;      // TVM's KV cache page size
constexpr int kThreads = 128;      // 4 warps per block, both kernels
constexpr int kWarps = kThreads / 32;
constexpr int kBlockM = 64;        // packed query rows per prefill block (16 per warp)
constexpr int kBlockN = 64;        // keys per prefill K/V tile
constexpr int kDecodeStages = 2;   // pages in flight per decode warp
constexpr int kMaxSplits = 32;     // decode KV splits per sequence
constexpr int kInvariantSplits = 16;  // under MLC_BATCH_INVARIANT: fixed, whatever the batch
constexpr float kEmptyLse = -5e4f; // TVM's lse of a row that attends to nothing
constexpr double kLog2e = 1.4426950408889634;

// ------------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
               "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// c[16x8] += a[16x16] (row) * b[16x8] (col), f16 inputs, f32 accumulators.
// Fragments (g = lane / 4, t = lane % 4): a = {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..)}; b = {(k 2t..2t+1, n g), (k 2t+8.., n g)}; c = {(g, 2t), (g, 2t+1), (g+8, 2t),
// (g+8, 2t+1)}.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {   // exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);   // lo in the low 16 bits
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One online-softmax step for a thread's two rows (g and g+8) over NB n-blocks of 8 keys held in
// mma accumulator layout (already scaled to log2 units and masked with -inf). Updates the running
// max m and the thread's partial sum l, rescales O (DB n-blocks), and returns P as the f16 A
// fragments of the following P @ V (NB / 2 k-chunks of 16 keys).
template <int NB, int DB>
__device__ __forceinline__ void online_softmax(float (&s)[NB][4], float (&o)[DB][4], float& mA,
                                               float& mB, float& lA, float& lB,
                                               uint32_t (&pf)[NB / 2][4]) {
  float mxA = mA, mxB = mB;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    mxA = fmaxf(mxA, fmaxf(s[nb][0], s[nb][1]));
    mxB = fmaxf(mxB, fmaxf(s[nb][2], s[nb][3]));
  }
  mxA = quad_max(mxA);
  mxB = quad_max(mxB);
  // a row that has seen only masked keys keeps m = -inf: subtract 0 instead (exp2(-inf) = 0)
  const float baseA = mxA == -INFINITY ? 0.f : mxA;
  const float baseB = mxB == -INFINITY ? 0.f : mxB;
  const float alphaA = fast_exp2(mA - baseA), alphaB = fast_exp2(mB - baseB);
  mA = mxA;
  mB = mxB;
  lA *= alphaA;
  lB *= alphaB;
#pragma unroll
  for (int db = 0; db < DB; ++db) {
    o[db][0] *= alphaA;
    o[db][1] *= alphaA;
    o[db][2] *= alphaB;
    o[db][3] *= alphaB;
  }
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
    const float p0 = fast_exp2(s[nb][0] - baseA), p1 = fast_exp2(s[nb][1] - baseA);
    const float p2 = fast_exp2(s[nb][2] - baseB), p3 = fast_exp2(s[nb][3] - baseB);
    lA += p0 + p1;
    lB += p2 + p3;
    // C layout of n-block nb -> A layout of k-chunk nb / 2 (a0/a1 from even nb, a2/a3 from odd)
    pf[nb / 2][(nb & 1) * 2 + 0] = pack_half2(p0, p1);
    pf[nb / 2][(nb & 1) * 2 + 1] = pack_half2(p2, p3);
  }
}

// ------------------------------------------------------------------------------------------------
// Prefill (ragged K/V or paged K/V)
// ------------------------------------------------------------------------------------------------
struct PrefillParams {
  const half* q;               // [n_q, h_q, D]
  const int* q_indptr;         // [batch + 1]
  const half* k;               // ragged: [n_kv, h_kv, D]
  const half* v;               // ragged: [n_kv, h_kv, D]
  const int* kv_indptr;        // ragged: [batch + 1]
  const half* pages;           // paged: [num_pages, 2, h_kv, 16, D]
  const int* page_indptr;      // paged: [batch + 1]
  const int* page_indices;     // paged: [nnz_pages]
  const int* last_page_len;    // paged: [batch]
  half* out;                   // [n_q, h_q, D]
  float* lse;                  // [n_q, h_q]
  int batch, h_q, h_kv, group, causal;
  float scale_log2;            // sm_scale * log2(e)
};

template <int D>
__host__ __device__ constexpr int prefill_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * (D + 8) * static_cast<int>(sizeof(half));  // Q, 2x K, 2x V
}

// The block's (sequence, tile) for tile slot `slot`, tiles numbered sequence by sequence, with
// ceil(qo_len * group / 64) tiles per sequence. Every warp computes it (the same result).
__device__ __forceinline__ bool find_tile(const int* __restrict__ q_indptr, int batch, int group,
                                          int slot, int& seq, int& tile) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int b0 = 0; b0 < batch; b0 += 32) {
    const int b = b0 + lane;
    int n = 0;
    if (b < batch) n = (max(q_indptr[b + 1] - q_indptr[b], 0) * group + kBlockM - 1) / kBlockM;
    int incl = n;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int x = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += x;
    }
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    if (slot < base + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, base + incl > slot);
      const int l = __ffs(hit) - 1;
      seq = b0 + l;
      tile = slot - base - __shfl_sync(0xffffffffu, incl - n, l);
      return true;
    }
    base += total;
  }
  return false;
}

template <int D, bool PAGED>
__global__ void __launch_bounds__(kThreads, 2) prefill_kernel(const PrefillParams p) {
  constexpr int LD = D + 8;                       // padded smem row (halves): no ldmatrix conflicts
  constexpr int CHUNKS = D / 8;                   // 16-byte chunks per row
  constexpr int ROWS_PER_PASS = kThreads / CHUNKS;
  constexpr int PASSES = kBlockN / ROWS_PER_PASS; // kBlockM == kBlockN
  static_assert(kBlockM == kBlockN, "Q and K/V tiles share the load mapping");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  half* sQ = reinterpret_cast<half*>(smem_raw);   // [kBlockM][LD]
  half* sK = sQ + kBlockM * LD;                   // [2][kBlockN][LD]
  half* sV = sK + 2 * kBlockN * LD;               // [2][kBlockN][LD]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int G = p.group;
  const int kvh = blockIdx.x % p.h_kv;
  // heaviest (last, under the causal mask) tiles first
  const int slot = static_cast<int>(gridDim.x / p.h_kv) - 1 - static_cast<int>(blockIdx.x / p.h_kv);
  int b, tile;
  if (!find_tile(p.q_indptr, p.batch, G, slot, b, tile)) return;

  const int q_start = p.q_indptr[b];
  const int qo_len = p.q_indptr[b + 1] - q_start;
  int kv_len, kv_base = 0, page_begin = 0;
  if constexpr (PAGED) {
    page_begin = p.page_indptr[b];
    const int num_pages = p.page_indptr[b + 1] - page_begin;
    kv_len = num_pages > 0 ? (num_pages - 1) * kPageSize + p.last_page_len[b] : 0;
  } else {
    kv_base = p.kv_indptr[b];
    kv_len = p.kv_indptr[b + 1] - kv_base;
  }
  kv_len = max(kv_len, 0);
  const int rows = qo_len * G;                    // packed rows of the sequence
  const int row0 = tile * kBlockM;
  const int t_lo = row0 / G;                      // first and last token of the tile
  const int t_hi = (min(row0 + kBlockM, rows) - 1) / G;
  const int diag = kv_len - qo_len;               // causal: token t sees keys < diag + t + 1
  const int kv_end = p.causal ? min(kv_len, diag + t_hi + 1) : kv_len;
  const int free_end = p.causal ? min(kv_len, diag + t_lo + 1) : kv_len;  // seen by all rows
  const int n_tiles = kv_end > 0 ? (kv_end + kBlockN - 1) / kBlockN : 0;

  const int ld_row = tid / CHUNKS, ld_col = (tid % CHUNKS) * 8;
  // Q tile: packed row r -> token (row0 + r) / G, head kvh * G + (row0 + r) % G; zeros past the end
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int r = ld_row + i * ROWS_PER_PASS;
    const int pr = row0 + r;
    const bool valid = pr < rows;
    const half* src = p.q;
    if (valid) {
      src = p.q + (static_cast<int64_t>(q_start + pr / G) * p.h_q + kvh * G + pr % G) * D + ld_col;
    }
    cp_async_16(sQ + r * LD + ld_col, src, valid);
  }

  const half* fallback = PAGED ? p.pages : p.k;   // a valid address for zero-filled copies
  auto load_kv = [&](int j, int buf) {
    half* dK = sK + buf * kBlockN * LD;
    half* dV = sV + buf * kBlockN * LD;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int r = ld_row + i * ROWS_PER_PASS;
      const int key = j * kBlockN + r;
      const bool valid = key < kv_len;             // rows past the end are zero-filled
      const half* srcK = fallback;
      const half* srcV = fallback;
      if (valid) {
        if constexpr (PAGED) {
          const int page = p.page_indices[page_begin + key / kPageSize];
          srcK = p.pages + ((static_cast<int64_t>(page) * 2 * p.h_kv + kvh) * kPageSize +
                            key % kPageSize) * D + ld_col;
          srcV = srcK + static_cast<int64_t>(p.h_kv) * kPageSize * D;
        } else {
          const int64_t off = (static_cast<int64_t>(kv_base + key) * p.h_kv + kvh) * D + ld_col;
          srcK = p.k + off;
          srcV = p.v + off;
        }
      }
      cp_async_16(dK + r * LD + ld_col, srcK, valid);
      cp_async_16(dV + r * LD + ld_col, srcV, valid);
    }
  };

  // visibility limit of this thread's two rows (warp rows g and g + 8)
  const int rA = row0 + warp * 16 + g, rB = rA + 8;
  const int limA = p.causal ? min(kv_len, diag + rA / G + 1) : kv_len;
  const int limB = p.causal ? min(kv_len, diag + rB / G + 1) : kv_len;

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;

  cp_async_commit();                               // group: Q
  if (n_tiles > 0) load_kv(0, 0);
  cp_async_commit();                               // group: K/V tile 0 (empty if no tiles)
  cp_async_wait<1>();                              // Q has landed
  __syncthreads();
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    ldmatrix_x4(qf[kc], sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kc * 16 +
                            (lane >> 4) * 8);
  }
  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_kv(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();                          // tile j has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const half* cK = sK + (j & 1) * kBlockN * LD;
    const half* cV = sV + (j & 1) * kBlockN * LD;

    // S = Q K^T: 16 rows x 64 keys per warp
    float s[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, cK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kc * 16 +
                            ((lane >> 3) & 1) * 8);
        mma_16816(s[2 * np], qf[kc], bk[0], bk[1]);
        mma_16816(s[2 * np + 1], qf[kc], bk[2], bk[3]);
      }
    }
    const int n0 = j * kBlockN;
#pragma unroll
    for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nb][e] *= p.scale_log2;
    }
    if (n0 + kBlockN > free_end) {                 // tile crosses the diagonal or the end
#pragma unroll
      for (int nb = 0; nb < kBlockN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + nb * 8 + 2 * tig + (e & 1);
          if (key >= (e < 2 ? limA : limB)) s[nb][e] = -INFINITY;
        }
      }
    }
    uint32_t pf[kBlockN / 16][4];
    online_softmax<kBlockN / 8, D / 8>(s, o, mA, mB, lA, lB, pf);

    // O += P V
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, cV + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 +
                                  (lane >> 4) * 8);
        mma_16816(o[2 * dp], pf[kc], bv[0], bv[1]);
        mma_16816(o[2 * dp + 1], pf[kc], bv[2], bv[3]);
      }
    }
    __syncthreads();                               // before the next loads overwrite this buffer
  }
  cp_async_wait<0>();
  __syncwarp();

  // epilogue: normalize, stage the warp's 16 rows (f16) in its own rows of sQ (only this warp
  // read them, into qf), then 16-byte stores
  lA = quad_sum(lA);
  lB = quad_sum(lB);
  const float invA = lA > 0.f ? 1.f / lA : 0.f;
  const float invB = lB > 0.f ? 1.f / lB : 0.f;
  half* sO = sQ + warp * 16 * LD;
#pragma unroll
  for (int db = 0; db < D / 8; ++db) {
    *reinterpret_cast<uint32_t*>(sO + g * LD + db * 8 + 2 * tig) =
        pack_half2(o[db][0] * invA, o[db][1] * invA);
    *reinterpret_cast<uint32_t*>(sO + (g + 8) * LD + db * 8 + 2 * tig) =
        pack_half2(o[db][2] * invB, o[db][3] * invB);
  }
  if (tig == 0) {
    if (rA < rows) {
      p.lse[static_cast<int64_t>(q_start + rA / G) * p.h_q + kvh * G + rA % G] =
          lA > 0.f ? mA + log2f(lA) : kEmptyLse;
    }
    if (rB < rows) {
      p.lse[static_cast<int64_t>(q_start + rB / G) * p.h_q + kvh * G + rB % G] =
          lB > 0.f ? mB + log2f(lB) : kEmptyLse;
    }
  }
  __syncwarp();
#pragma unroll
  for (int c = lane; c < 16 * CHUNKS; c += 32) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    const int pr = row0 + warp * 16 + r;
    if (pr < rows) {
      half* dst = p.out + (static_cast<int64_t>(q_start + pr / G) * p.h_q + kvh * G + pr % G) * D + col;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sO + r * LD + col);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Decode (one query token per sequence), split-KV
// ------------------------------------------------------------------------------------------------
struct DecodeParams {
  const half* q;               // [batch, h_q, D]
  const half* pages;           // [num_pages, 2, h_kv, 16, D]
  const int* page_indptr;      // [batch + 1]
  const int* page_indices;     // [nnz_pages]
  const int* last_page_len;    // [batch]
  half* out;                   // [batch, h_q, D]
  float* lse;                  // [batch, h_q]
  float* part_o;               // splits > 1: [batch, h_q, splits, D]
  float* part_lse;             // splits > 1: [batch, h_q, splits]
  int* counters;               // splits > 1: [batch, h_kv, head_chunks], zero between launches
  int batch, h_q, h_kv, group, head_chunks, splits;
  float scale_log2;
};

template <int D>
__host__ __device__ constexpr int decode_smem_bytes() {
  return kWarps * kDecodeStages * 2 * kPageSize * (D + 8) * static_cast<int>(sizeof(half));
}

template <int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  constexpr int LD = D + 8;
  constexpr int CHUNKS = D / 8;
  constexpr int PER_LANE = kPageSize * CHUNKS / 32;   // 16-byte chunks per lane per K (or V) page
  constexpr int STAGE = 2 * kPageSize * LD;           // halves per stage: K page, V page
  static_assert((kWarps * 16 * (D + 1) + 2 * kWarps * 16) * 4 <= decode_smem_bytes<D>(),
                "the warp merge area fits in the stage buffers");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float s_w[16][kMaxSplits];
  __shared__ float s_lse[16];
  __shared__ int s_last;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks, hc = blockIdx.y % p.head_chunks;
  const int b = blockIdx.z;
  const int n_rows = min(16, p.group - hc * 16);      // q heads of this block (mma rows)
  const int head0 = kvh * p.group + hc * 16;          // its first q head

  // Q as mma A fragments straight from global memory (row r = head head0 + r; zero past n_rows)
  uint32_t qf[D / 16][4];
  {
    const uint32_t* qA =
        reinterpret_cast<const uint32_t*>(p.q + (static_cast<int64_t>(b) * p.h_q + head0 + g) * D);
    const uint32_t* qB = qA + 8 * D / 2;
    const bool vA = g < n_rows, vB = g + 8 < n_rows;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      qf[kc][0] = vA ? qA[kc * 8 + tig] : 0u;
      qf[kc][1] = vB ? qB[kc * 8 + tig] : 0u;
      qf[kc][2] = vA ? qA[kc * 8 + 4 + tig] : 0u;
      qf[kc][3] = vB ? qB[kc * 8 + 4 + tig] : 0u;
    }
  }

  const int page_begin = p.page_indptr[b];
  const int num_pages = max(p.page_indptr[b + 1] - page_begin, 0);
  const int kv_len = num_pages > 0 ? (num_pages - 1) * kPageSize + p.last_page_len[b] : 0;
  const int p_lo = static_cast<int>(static_cast<int64_t>(split) * num_pages / p.splits);
  const int p_hi = static_cast<int>(static_cast<int64_t>(split + 1) * num_pages / p.splits);
  const int first = p_lo + warp;                      // this warp: pages first, first + 4, ...
  const int n_my = first < p_hi ? (p_hi - first + kWarps - 1) / kWarps : 0;

  half* sKV = reinterpret_cast<half*>(smem_raw) + warp * kDecodeStages * STAGE;
  auto load_page = [&](int i, int stage) {
    const int j = first + i * kWarps;                 // page slot within the sequence
    const int page = p.page_indices[page_begin + j];
    const int n_valid = min(max(kv_len - j * kPageSize, 0), kPageSize);
    const half* srcK = p.pages + (static_cast<int64_t>(page) * 2 * p.h_kv + kvh) * kPageSize * D;
    const half* srcV = srcK + static_cast<int64_t>(p.h_kv) * kPageSize * D;
    half* dK = sKV + stage * STAGE;
    half* dV = dK + kPageSize * LD;
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
      const int idx = lane + c * 32;
      const int r = idx / CHUNKS, col = (idx % CHUNKS) * 8;
      const bool valid = r < n_valid;                 // slots past the end are zero-filled
      cp_async_16(dK + r * LD + col, valid ? srcK + r * D + col : p.pages, valid);
      cp_async_16(dV + r * LD + col, valid ? srcV + r * D + col : p.pages, valid);
    }
  };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.f, lB = 0.f;

  if (n_my > 0) load_page(0, 0);
  cp_async_commit();
  for (int i = 0; i < n_my; ++i) {
    if (i + 1 < n_my) {
      load_page(i + 1, (i + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
    const half* cK = sKV + (i & 1) * STAGE;
    const half* cV = cK + kPageSize * LD;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t bk[4];
      ldmatrix_x4(bk, cK + ((lane & 7) + (lane >> 4) * 8) * LD + kc * 16 + ((lane >> 3) & 1) * 8);
      mma_16816(s[0], qf[kc], bk[0], bk[1]);
      mma_16816(s[1], qf[kc], bk[2], bk[3]);
    }
    const int n_valid = min(max(kv_len - (first + i * kWarps) * kPageSize, 0), kPageSize);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nb][e] *= p.scale_log2;
        if (nb * 8 + 2 * tig + (e & 1) >= n_valid) s[nb][e] = -INFINITY;
      }
    }
    uint32_t pf[1][4];
    online_softmax<2, D / 8>(s, o, mA, mB, lA, lB, pf);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, cV + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
      mma_16816(o[2 * dp], pf[0], bv[0], bv[1]);
      mma_16816(o[2 * dp + 1], pf[0], bv[2], bv[3]);
    }
    __syncwarp();                                     // before the next load reuses this stage
  }
  cp_async_wait<0>();
  lA = quad_sum(lA);
  lB = quad_sum(lB);
  __syncthreads();                                    // all warps done with their stages

  // merge the 4 warps: sO [warp][16][D + 1] f32 (padded row), sM / sL [warp][16]
  float* sO = reinterpret_cast<float*>(smem_raw);
  float* sM = sO + kWarps * 16 * (D + 1);
  float* sL = sM + kWarps * 16;
  {
    float* wO = sO + warp * 16 * (D + 1);
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
      wO[g * (D + 1) + db * 8 + 2 * tig] = o[db][0];
      wO[g * (D + 1) + db * 8 + 2 * tig + 1] = o[db][1];
      wO[(g + 8) * (D + 1) + db * 8 + 2 * tig] = o[db][2];
      wO[(g + 8) * (D + 1) + db * 8 + 2 * tig + 1] = o[db][3];
    }
    if (tig == 0) {
      sM[warp * 16 + g] = mA;
      sM[warp * 16 + g + 8] = mB;
      sL[warp * 16 + g] = lA;
      sL[warp * 16 + g + 8] = lB;
    }
  }
  __syncthreads();
  for (int it = tid; it < n_rows * D; it += kThreads) {
    const int r = it / D, d = it % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sM[w * 16 + r]);
    float L = 0.f, acc = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float e = fast_exp2(sM[w * 16 + r] - M);   // a warp without keys: exp2(-inf) = 0
        L += e * sL[w * 16 + r];
        acc += e * sO[(w * 16 + r) * (D + 1) + d];
      }
    }
    const float val = L > 0.f ? acc / L : 0.f;
    const int head = head0 + r;
    if (p.splits == 1) {
      p.out[(static_cast<int64_t>(b) * p.h_q + head) * D + d] = __float2half_rn(val);
      if (d == 0) p.lse[static_cast<int64_t>(b) * p.h_q + head] = L > 0.f ? M + log2f(L) : kEmptyLse;
    } else {
      const int64_t idx = (static_cast<int64_t>(b) * p.h_q + head) * p.splits + split;
      p.part_o[idx * D + d] = val;
      if (d == 0) p.part_lse[idx] = L > 0.f ? M + log2f(L) : -INFINITY;
    }
  }
  if (p.splits == 1) return;

  // the last block of this (sequence, kv head, head chunk) to finish merges the splits
  __threadfence();
  __syncthreads();
  int* counter = p.counters + (static_cast<int64_t>(b) * p.h_kv + kvh) * p.head_chunks + hc;
  if (tid == 0) {
    const int ticket = atomicAdd(counter, 1);
    __threadfence();
    s_last = ticket == p.splits - 1;
  }
  __syncthreads();
  if (!s_last) return;
  if (tid < n_rows) {
    const float* plse = p.part_lse + (static_cast<int64_t>(b) * p.h_q + head0 + tid) * p.splits;
    float M = -INFINITY;
    for (int s = 0; s < p.splits; ++s) M = fmaxf(M, __ldcg(plse + s));
    float L = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float w = M == -INFINITY ? 0.f : fast_exp2(__ldcg(plse + s) - M);
      s_w[tid][s] = w;
      L += w;
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int s = 0; s < p.splits; ++s) s_w[tid][s] *= inv;
    s_lse[tid] = L > 0.f ? M + log2f(L) : kEmptyLse;
  }
  __syncthreads();
  for (int it = tid; it < n_rows * (D / 4); it += kThreads) {
    const int r = it / (D / 4), d = (it % (D / 4)) * 4;
    const int head = head0 + r;
    const float* po = p.part_o + (static_cast<int64_t>(b) * p.h_q + head) * p.splits * D + d;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < p.splits; ++s) {
      const float w = s_w[r][s];
      if (w > 0.f) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(po + static_cast<int64_t>(s) * D));
        acc.x += w * x.x;
        acc.y += w * x.y;
        acc.z += w * x.z;
        acc.w += w * x.w;
      }
    }
    uint2 packed;
    packed.x = pack_half2(acc.x, acc.y);
    packed.y = pack_half2(acc.z, acc.w);
    *reinterpret_cast<uint2*>(p.out + (static_cast<int64_t>(b) * p.h_q + head) * D + d) = packed;
    if (d == 0) p.lse[static_cast<int64_t>(b) * p.h_q + head] = s_lse[r];
  }
  if (tid == 0) *counter = 0;                         // ready for the next launch
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
template <typename T>
T* data_of(const TensorView& t) {   // data_ptr() does not include the DLPack byte_offset
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

bool is_dtype(const TensorView& t, DLDataTypeCode code, int bits) {
  const DLDataType dt = t.dtype();
  return dt.code == code && dt.bits == bits && dt.lanes == 1;
}

void check_tensor(const TensorView& t, const char* fn, const char* name, int ndim,
                  DLDataTypeCode code, int bits, int device) {
  TVM_FFI_ICHECK_EQ(t.ndim(), ndim) << fn << ": " << name << " must be " << ndim << "-D, got "
                                    << t.ndim() << "-D";
  TVM_FFI_ICHECK(is_dtype(t, code, bits))
      << fn << ": " << name << " must be "
      << (code == kDLFloat ? (bits == 16 ? "float16" : "float32") : "int32") << ", got code "
      << static_cast<int>(t.dtype().code) << " bits " << static_cast<int>(t.dtype().bits);
  TVM_FFI_ICHECK(t.device().device_type == kDLCUDA && t.device().device_id == device)
      << fn << ": " << name << " must be on cuda:" << device;
  TVM_FFI_ICHECK(t.IsContiguous()) << fn << ": " << name << " must be contiguous";
  if (code == kDLFloat) {
    TVM_FFI_ICHECK_EQ(reinterpret_cast<uintptr_t>(data_of<char>(t)) % 16, 0)
        << fn << ": " << name << " must be 16-byte aligned";
  }
}

void check_rope(const char* fn, int64_t rotary_mode) {
  if (rotary_mode != 0) {
    TVM_FFI_THROW(ValueError) << fn << ": rotary_mode " << rotary_mode
                              << " (RoPE inside attention) is not supported by mlc's CUDA "
                                 "attention kernels; apply RoPE before attention (rotary_mode 0)";
  }
}

int head_dim_of(const TensorView& q, const char* fn) {
  const int64_t d = q.size(2);
  if (d != 64 && d != 128) {
    TVM_FFI_THROW(ValueError) << fn << ": head_dim " << d << " is not supported (64 or 128)";
  }
  return static_cast<int>(d);
}

int checked_int(int64_t v, const char* what) {
  TVM_FFI_ICHECK(v >= 0 && v <= INT_MAX) << what << " " << v << " does not fit in int32";
  return static_cast<int>(v);
}

// q [rows, h_q, d], output of q's shape, lse [rows, h_q]; returns d.
int check_q_output_lse(const char* fn, const TensorView& q, const TensorView& output,
                       const TensorView& lse, int device) {
  check_tensor(q, fn, "q [rows, h_q, d]", 3, kDLFloat, 16, device);
  const int D = head_dim_of(q, fn);
  check_tensor(output, fn, "output [rows, h_q, d]", 3, kDLFloat, 16, device);
  check_tensor(lse, fn, "lse [rows, h_q]", 2, kDLFloat, 32, device);
  const int64_t rows = q.size(0), h_q = q.size(1);
  TVM_FFI_ICHECK(output.size(0) == rows && output.size(1) == h_q && output.size(2) == D)
      << fn << ": output must have q's shape";
  TVM_FFI_ICHECK(lse.size(0) == rows && lse.size(1) == h_q) << fn << ": lse must be [rows, h_q]";
  return D;
}

void check_group(const char* fn, int64_t h_q, int64_t h_kv) {
  TVM_FFI_ICHECK(h_kv > 0 && h_q % h_kv == 0)
      << fn << ": h_q (" << h_q << ") must be a multiple of h_kv (" << h_kv << ")";
}

// The fields both prefill kernels share; the caller adds k/v (ragged) or the pages (paged).
PrefillParams prefill_params(const TensorView& q, const TensorView& q_indptr,
                             const TensorView& output, const TensorView& lse, int batch,
                             int64_t h_kv, int64_t causal, double sm_scale) {
  PrefillParams prm{};
  prm.q = data_of<const half>(q);
  prm.q_indptr = data_of<const int>(q_indptr);
  prm.out = data_of<half>(output);
  prm.lse = data_of<float>(lse);
  prm.batch = batch;
  prm.h_q = checked_int(q.size(1), "h_q");
  prm.h_kv = checked_int(h_kv, "h_kv");
  prm.group = prm.h_q / prm.h_kv;
  prm.causal = causal != 0;
  prm.scale_log2 = static_cast<float>(sm_scale * kLog2e);
  checked_int(q.size(0) * q.size(1), "n * h_q");
  return prm;
}

struct DeviceGuard {   // launch on the tensors' device; restore the caller's current device
  int prev = -1;
  explicit DeviceGuard(int device) {
    int cur = 0;
    MLC_CUDA_CHECK(cudaGetDevice(&cur));
    if (cur != device) {
      MLC_CUDA_CHECK(cudaSetDevice(device));
      prev = cur;
    }
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

// Opt a kernel into more than 48 KB of dynamic shared memory, once per device.
void allow_smem(const void* kernel, int device, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, device})) return;
  MLC_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.insert({kernel, device});
}

int num_sms(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int> sms;
  std::lock_guard<std::mutex> lock(mu);
  auto it = sms.find(device);
  if (it != sms.end()) return it->second;
  int n = 0;
  MLC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  sms[device] = n;
  return n;
}

template <bool PAGED>
void launch_prefill(const PrefillParams& prm, int head_dim, int64_t n_q, int device) {
  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  // an upper bound on sum_b ceil(qo_len_b * group / 64): blocks past the last tile exit at once
  const int64_t slots = (n_q * prm.group + kBlockM - 1) / kBlockM + prm.batch;
  const int64_t blocks = slots * prm.h_kv;
  TVM_FFI_ICHECK(blocks <= INT_MAX) << "attention prefill: too many query tiles (" << blocks << ")";
  if (head_dim == 64) {
    constexpr int smem = prefill_smem_bytes<64>();
    allow_smem(reinterpret_cast<const void*>(prefill_kernel<64, PAGED>), device, smem);
    prefill_kernel<64, PAGED><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(prm);
  } else {
    constexpr int smem = prefill_smem_bytes<128>();
    allow_smem(reinterpret_cast<const void*>(prefill_kernel<128, PAGED>), device, smem);
    prefill_kernel<128, PAGED><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(prm);
  }
  MLC_CUDA_CHECK(cudaGetLastError());
}

void AttnPrefillRagged(TensorView q, TensorView q_indptr, TensorView k, TensorView v,
                       TensorView kv_indptr, TensorView q_rope_position,
                       TensorView k_rope_pos_offset, TensorView output, TensorView lse,
                       int64_t causal, int64_t rotary_mode, double rope_scale, double rope_theta,
                       double sm_scale) {
  constexpr const char* fn = "mlc.cuda.attn_prefill_ragged";
  check_rope(fn, rotary_mode);
  const int device = q.device().device_id;
  const int D = check_q_output_lse(fn, q, output, lse, device);
  check_tensor(k, fn, "k [n_kv, h_kv, d]", 3, kDLFloat, 16, device);
  check_tensor(v, fn, "v [n_kv, h_kv, d]", 3, kDLFloat, 16, device);
  const int64_t h_kv = k.size(1);
  check_group(fn, q.size(1), h_kv);
  check_tensor(q_indptr, fn, "q_indptr [batch + 1]", 1, kDLInt, 32, device);
  check_tensor(kv_indptr, fn, "kv_indptr [batch + 1]", 1, kDLInt, 32, device);
  TVM_FFI_ICHECK(k.size(2) == D && v.size(0) == k.size(0) && v.size(1) == h_kv && v.size(2) == D)
      << fn << ": k and v must both be [n_kv, h_kv, " << D << "]";
  TVM_FFI_ICHECK_GE(q_indptr.size(0), 1) << fn << ": q_indptr must have batch + 1 entries";
  TVM_FFI_ICHECK_EQ(kv_indptr.size(0), q_indptr.size(0))
      << fn << ": q_indptr and kv_indptr must both have batch + 1 entries";
  const int batch = checked_int(q_indptr.size(0) - 1, "batch");
  if (q.size(0) == 0 || batch == 0) return;

  PrefillParams prm = prefill_params(q, q_indptr, output, lse, batch, h_kv, causal, sm_scale);
  prm.k = data_of<const half>(k);
  prm.v = data_of<const half>(v);
  prm.kv_indptr = data_of<const int>(kv_indptr);
  launch_prefill<false>(prm, D, q.size(0), device);
}

// length_info is last_page_len [batch] for caches without a sliding window (the only kind the
// compiler routes here); the sliding-window form is [3, batch].
void check_paged(const char* fn, const TensorView& pages, const TensorView& page_indptr,
                 const TensorView& page_indices, const TensorView& length_info, int D,
                 int64_t batch_plus_1, int device) {
  check_tensor(pages, fn, "pages [num_pages, 2, h_kv, 16, d]", 5, kDLFloat, 16, device);
  TVM_FFI_ICHECK(pages.size(1) == 2 && pages.size(3) == kPageSize && pages.size(4) == D)
      << fn << ": pages must be [num_pages, 2, h_kv, 16, " << D << "], got ["
      << pages.size(0) << ", " << pages.size(1) << ", " << pages.size(2) << ", "
      << pages.size(3) << ", " << pages.size(4) << "]";
  check_tensor(page_indptr, fn, "page_indptr [batch + 1]", 1, kDLInt, 32, device);
  check_tensor(page_indices, fn, "page_indices [nnz_pages]", 1, kDLInt, 32, device);
  if (length_info.ndim() != 1) {
    TVM_FFI_THROW(ValueError) << fn << ": length_info must be last_page_len [batch]; the "
                              << "sliding-window form [3, batch] is not supported";
  }
  check_tensor(length_info, fn, "length_info [batch]", 1, kDLInt, 32, device);
  TVM_FFI_ICHECK_EQ(page_indptr.size(0), batch_plus_1)
      << fn << ": page_indptr must have batch + 1 entries";
  TVM_FFI_ICHECK_EQ(length_info.size(0), batch_plus_1 - 1)
      << fn << ": length_info must have batch entries";
}

void AttnPrefillPaged(TensorView q, TensorView qo_indptr, TensorView pages, TensorView page_indptr,
                      TensorView page_indices, TensorView length_info,
                      TensorView k_rope_pos_offset, TensorView q_rope_position, TensorView output,
                      TensorView lse, int64_t causal, int64_t rotary_mode, double rope_scale,
                      double rope_theta, double sm_scale) {
  constexpr const char* fn = "mlc.cuda.attn_prefill_paged";
  check_rope(fn, rotary_mode);
  const int device = q.device().device_id;
  const int D = check_q_output_lse(fn, q, output, lse, device);
  check_tensor(qo_indptr, fn, "qo_indptr [batch + 1]", 1, kDLInt, 32, device);
  TVM_FFI_ICHECK_GE(qo_indptr.size(0), 1) << fn << ": qo_indptr must have batch + 1 entries";
  check_paged(fn, pages, page_indptr, page_indices, length_info, D, qo_indptr.size(0), device);
  const int64_t h_kv = pages.size(2);
  check_group(fn, q.size(1), h_kv);
  const int batch = checked_int(qo_indptr.size(0) - 1, "batch");
  if (q.size(0) == 0 || batch == 0) return;

  PrefillParams prm = prefill_params(q, qo_indptr, output, lse, batch, h_kv, causal, sm_scale);
  prm.pages = data_of<const half>(pages);
  prm.page_indptr = data_of<const int>(page_indptr);
  prm.page_indices = data_of<const int>(page_indices);
  prm.last_page_len = data_of<const int>(length_info);
  launch_prefill<true>(prm, D, q.size(0), device);
}

// Per-device decode workspace: split counters (kept at zero between launches), partial lse and
// partial O. It grows and is never freed (a captured CUDA graph may still point at an old one).
struct DecodeWorkspace {
  int* counters;
  float* part_lse;
  float* part_o;
};

DecodeWorkspace decode_workspace(int device, size_t n_counters, size_t n_partials, int D,
                                 cudaStream_t stream) {
  struct Entry {
    char* base = nullptr;
    size_t counters = 0, lse = 0, o = 0;   // capacities in elements
    bool needs_zero = false;               // counters not yet zeroed outside a graph capture
  };
  static std::mutex mu;
  static std::unordered_map<int, Entry> spaces;
  std::lock_guard<std::mutex> lock(mu);
  Entry& e = spaces[device];
  auto round_up = [](size_t x) { return (x + 63) / 64 * 64; };   // keeps each part 256-B aligned
  const size_t need_c = round_up(n_counters), need_l = round_up(n_partials);
  const size_t need_o = round_up(n_partials * D);
  if (e.base == nullptr || e.counters < need_c || e.lse < need_l || e.o < need_o) {
    Entry n;
    n.counters = std::max(e.counters, need_c);
    n.lse = std::max(e.lse, need_l);
    n.o = std::max(e.o, need_o);
    MLC_CUDA_CHECK(cudaMalloc(&n.base, (n.counters + n.lse + n.o) * 4));
    n.needs_zero = true;
    e = n;
  }
  if (e.needs_zero) {
    // Zero the counters on the stream. Under graph capture the memset is recorded (and replays
    // with the graph), so repeat it at the first call outside a capture.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
      (void)cudaGetLastError();
      status = cudaStreamCaptureStatusActive;
    }
    MLC_CUDA_CHECK(cudaMemsetAsync(e.base, 0, e.counters * 4, stream));
    if (status == cudaStreamCaptureStatusNone) e.needs_zero = false;
  }
  int* counters = reinterpret_cast<int*>(e.base);
  float* part_lse = reinterpret_cast<float*>(e.base) + e.counters;
  return {counters, part_lse, part_lse + e.lse};
}

// KV splits per sequence: enough blocks for ~2 per SM, each split at least 4 pages (one per
// warp). The host knows only the page total, so it sizes by the average sequence.
int decode_splits(int blocks_per_split, int64_t nnz_pages, int batch, int sms) {
  const int64_t target = 2 * static_cast<int64_t>(sms);
  if (blocks_per_split >= target) return 1;
  const int64_t want = (target + blocks_per_split - 1) / blocks_per_split;
  const int64_t avg_pages = (nnz_pages + batch - 1) / batch;
  const int64_t cap = std::max<int64_t>(1, avg_pages / kWarps);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, cap, kMaxSplits})));
}

void AttnDecodePaged(TensorView q, TensorView pages, TensorView page_indptr,
                     TensorView page_indices, TensorView length_info,
                     TensorView k_rope_pos_offset, TensorView q_rope_position, TensorView output,
                     TensorView lse, int64_t rotary_mode, double rope_scale, double rope_theta,
                     double sm_scale) {
  constexpr const char* fn = "mlc.cuda.attn_decode_paged";
  check_rope(fn, rotary_mode);
  const int device = q.device().device_id;
  const int D = check_q_output_lse(fn, q, output, lse, device);
  const int64_t B = q.size(0), h_q = q.size(1);
  check_paged(fn, pages, page_indptr, page_indices, length_info, D, B + 1, device);
  const int64_t h_kv = pages.size(2);
  check_group(fn, h_q, h_kv);
  TVM_FFI_ICHECK_LE(B, 65535) << fn << ": batch " << B << " exceeds the grid limit (65535)";
  if (B == 0) return;

  DecodeParams prm{};
  prm.q = data_of<const half>(q);
  prm.pages = data_of<const half>(pages);
  prm.page_indptr = data_of<const int>(page_indptr);
  prm.page_indices = data_of<const int>(page_indices);
  prm.last_page_len = data_of<const int>(length_info);
  prm.out = data_of<half>(output);
  prm.lse = data_of<float>(lse);
  prm.batch = static_cast<int>(B);
  prm.h_q = checked_int(h_q, "h_q");
  prm.h_kv = checked_int(h_kv, "h_kv");
  prm.group = static_cast<int>(h_q / h_kv);
  prm.head_chunks = (prm.group + 15) / 16;
  prm.scale_log2 = static_cast<float>(sm_scale * kLog2e);
  TVM_FFI_ICHECK_LE(h_kv * prm.head_chunks, 65535) << fn << ": too many kv heads";

  DeviceGuard guard(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const int blocks_per_split = prm.batch * prm.h_kv * prm.head_chunks;
  // a sequence's split boundaries depend on its own length and the split count only: fixed under
  // MLC_BATCH_INVARIANT, else sized to fill the GPU for this batch
  prm.splits = BatchInvariant() ? kInvariantSplits
                                : decode_splits(blocks_per_split, page_indices.size(0), prm.batch,
                                                num_sms(device));
  if (prm.splits > 1) {
    DecodeWorkspace ws = decode_workspace(device, static_cast<size_t>(blocks_per_split),
                                          static_cast<size_t>(B * h_q * prm.splits), D, stream);
    prm.counters = ws.counters;
    prm.part_lse = ws.part_lse;
    prm.part_o = ws.part_o;
  }
  const dim3 grid(prm.splits, prm.h_kv * prm.head_chunks, prm.batch);
  if (D == 64) {
    constexpr int smem = decode_smem_bytes<64>();
    allow_smem(reinterpret_cast<const void*>(decode_kernel<64>), device, smem);
    decode_kernel<64><<<grid, kThreads, smem, stream>>>(prm);
  } else {
    constexpr int smem = decode_smem_bytes<128>();
    allow_smem(reinterpret_cast<const void*>(decode_kernel<128>), device, smem);
    decode_kernel<128><<<grid, kThreads, smem, stream>>>(prm);
  }
  MLC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace attn
}  // namespace mlc

// Every CUDA model library carries these kernels (see RegisterKernel in cuda_check.h).
TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  mlc::RegisterKernel("attn_prefill_ragged", Function::FromTyped(mlc::attn::AttnPrefillRagged));
  mlc::RegisterKernel("attn_prefill_paged", Function::FromTyped(mlc::attn::AttnPrefillPaged));
  mlc::RegisterKernel("attn_decode_paged", Function::FromTyped(mlc::attn::AttnDecodePaged));
}
