// mlc's CUDA kernels for quantized and half-precision linear layers, linked into CUDA model
// libraries and registered as TVM FFI global functions (called with call_dps_packed):
//
//   mlc.cuda.q4_matmul(x[M,K] f16, q_weight[N,K/8] u32, q_scale[N,K/32] f16, out[M,N] f16|f32)
//   mlc.cuda.f16_matmul(x[M,K] f16, weight[N,K] f16, out[M,N] f16|f32)
//   mlc.cuda.q4_set_paths(mma_min_m, mma_max_m)      (M range of the fused tensor-core kernel)
//   mlc.cuda.q4_set_mma_config(split_k, blocks_per_sm)   (0, 0: automatic; for benchmarks)
//
// y = x W^T with float32 accumulation. q4 weights: groups of 32 along K, value = (nibble - 7) *
// scale, eight nibbles per uint32, the first in the lowest bits (MLC-LLM's q4f16_1).
// Paths of q4_matmul, by M (rows of x):
//   mma_min_m <= M <= mma_max_m (default 2..128; K % 64 == 0): a fused dequantize + tensor-core
//     kernel (mma.sync m16n8k16, weights as the A operand), split-K across blocks;
//   otherwise M <= 8: a fused dequantize-GEMV that reads each 4-bit weight once (128-bit loads);
//   otherwise: dequantize to a float16 workspace, then cuBLAS on the tensor cores.
// MLC_Q4_MMA=0 in the environment turns the tensor-core kernel off, MLC_Q4_GEMV_ROWS=0 the
// unrolled one-row GEMV. MLC_BATCH_INVARIANT=1 sends every M through the tensor-core kernel with
// kInvariantSplits K splits: a row's sums then run in the same order whatever M is. cuBLAS is opened with dlopen
// at first use, so a library loads on machines without it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <string>
#include <unordered_map>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "cuda_check.h"

namespace mlc {
namespace {

using tvm::ffi::TensorView;

constexpr int kGroup = 32;
constexpr int kMaxGemvRows = 8;    // rows handled by one pass of the fused GEMV
constexpr int kGemvMaxM = 8;       // up to this, the fused GEMV; above, dequantize + cuBLAS

// Eight q4 values of one 32-bit word (value = nibble - 7, element e in bits 4e..4e+3) as four
// half2 pairs (e0 e1, e2 e3, e4 e5, e6 e7), exact: each nibble pair is placed in the mantissas
// of two halves with exponent 2^10 (1024 + n), then 1031 is subtracted.
__device__ __forceinline__ void dequant_word(uint32_t w, half2 out[4]) {
  const uint32_t lo = 0x000f000fu, magic = 0x64006400u;
  const half2 bias = __halves2half2(__ushort_as_half(0x6407), __ushort_as_half(0x6407));
  uint32_t t0 = (w & lo) | magic, t1 = ((w >> 4) & lo) | magic;      // (e0, e4), (e1, e5)
  uint32_t t2 = ((w >> 8) & lo) | magic, t3 = ((w >> 12) & lo) | magic;  // (e2, e6), (e3, e7)
  const half2 a = __hsub2(*reinterpret_cast<half2*>(&t0), bias);
  const half2 b = __hsub2(*reinterpret_cast<half2*>(&t1), bias);
  const half2 c = __hsub2(*reinterpret_cast<half2*>(&t2), bias);
  const half2 d = __hsub2(*reinterpret_cast<half2*>(&t3), bias);
  out[0] = __lows2half2(a, b);
  out[1] = __lows2half2(c, d);
  out[2] = __highs2half2(a, b);
  out[3] = __highs2half2(c, d);
}

// The dot product of one 32-value group of q4 weights (16 bytes) with 32 halves of x, in float.
__device__ __forceinline__ float group_dot(const uint4 w, const half* __restrict__ xg) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  const uint4* xv = reinterpret_cast<const uint4*>(xg);
  float part = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 xx = __ldg(xv + i);
    const half2* h = reinterpret_cast<const half2*>(&xx);
    half2 q[4];
    dequant_word(words[i], q);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 a = __half22float2(h[j]), b = __half22float2(q[j]);
      part = fmaf(a.x, b.x, fmaf(a.y, b.y, part));
    }
  }
  return part;
}

// ---------------------------------------------------------------------------------------------
// Fused dequantize + GEMV for few rows. A block of 4 warps covers 4*FEAT output features; the
// rows of x are staged in shared memory one K-tile (32 groups) at a time, and each lane owns one
// group (16 bytes of weights) of every feature of its warp, so each 4-bit weight is read once.
// ---------------------------------------------------------------------------------------------
constexpr int kGemvWarps = 4;
constexpr int kTileGroups = 32;                 // one group per lane per tile
constexpr int kTileK = kTileGroups * kGroup;    // 1024 values of K per tile

template <int ROWS, int FEAT, typename OutT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    q4_gemv_kernel(const half* __restrict__ x, const uint4* __restrict__ qw,
                   const half* __restrict__ qs, OutT* __restrict__ out, int M, int N, int K,
                   int row0) {
  __shared__ uint4 xs[ROWS][kTileK / 8];        // ROWS x 1024 halves
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * FEAT;
  const int groups = K / kGroup;
  float acc[FEAT][ROWS];
#pragma unroll
  for (int f = 0; f < FEAT; ++f)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[f][r] = 0.f;

  for (int k0 = 0; k0 < K; k0 += kTileK) {
    const int tile = min(kTileK, K - k0);
    for (int i = threadIdx.x; i < ROWS * (kTileK / 8); i += blockDim.x) {
      const int r = i / (kTileK / 8), c = i % (kTileK / 8);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row0 + r < M && c * 8 < tile)
        v = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row0 + r) * K + k0 + c * 8);
      xs[r][c] = v;
    }
    __syncthreads();
    const int g = k0 / kGroup + lane;
    if (lane * kGroup < tile) {
      uint4 w[FEAT];
      float s[FEAT];
#pragma unroll
      for (int f = 0; f < FEAT; ++f) {           // issue all weight loads first
        const int n = min(n0 + f, N - 1);
        w[f] = __ldg(qw + static_cast<int64_t>(n) * groups + g);
        s[f] = __half2float(qs[static_cast<int64_t>(n) * groups + g]);
      }
#pragma unroll
      for (int f = 0; f < FEAT; ++f) {
        float vals[32];
        const uint32_t words[4] = {w[f].x, w[f].y, w[f].z, w[f].w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) vals[i * 8 + j] = float((words[i] >> (4 * j)) & 15u) - 7.f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float part = 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 xx = xs[r][lane * 4 + i];
            const half2* h = reinterpret_cast<const half2*>(&xx);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float2 v = __half22float2(h[j]);
              part = fmaf(v.x, vals[i * 8 + 2 * j], part);
              part = fmaf(v.y, vals[i * 8 + 2 * j + 1], part);
            }
          }
          acc[f][r] = fmaf(part, s[f], acc[f][r]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < FEAT; ++f) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float v = acc[f][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && n0 + f < N && row0 + r < M)
        out[static_cast<int64_t>(row0 + r) * N + n0 + f] = OutT(v);
    }
  }
}

// One row (batch-1 decode), general K: a warp per output feature, lanes striding over groups; no
// shared memory and no barriers.
template <typename OutT>
__global__ void q4_gemv1_kernel(const half* __restrict__ x, const uint4* __restrict__ qw,
                                const half* __restrict__ qs, OutT* __restrict__ out, int N,
                                int K) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int groups = K / kGroup;
  const uint4* wrow = qw + static_cast<int64_t>(n) * groups;
  const half* srow = qs + static_cast<int64_t>(n) * groups;
  float acc = 0.f;
  for (int g = lane; g < groups; g += 32) {
    acc = fmaf(group_dot(__ldg(wrow + g), x + g * kGroup), __half2float(srow[g]), acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) out[n] = OutT(acc);
}

// One row, K = 1024 * U (Llama-3-8B: U = 4 and 14): a warp owns kGemv1Rows whole rows and lane l
// holds groups l + 32u of each; all kGemv1Rows * U 16-byte weight loads are issued before any
// math, so a warp keeps 256 * U bytes in flight (the old kernel: one 16-byte load per lane at a
// time). H200, bench/gpu_lab/q4_gemv_lab.cu (2026-12-02): gate_up 1,744 -> 2,508 GB/s, lm_head
// 1,994 -> 3,004, down 1,501 -> 1,853, o_proj 1,077 -> 1,315 (small matrices are bound by launch
// and first-load latency, not bandwidth).
constexpr int kGemv1Rows = 2;

template <int U, typename OutT>
__global__ void __launch_bounds__(128) q4_gemv1_rows_kernel(const half* __restrict__ x,
                                                             const uint4* __restrict__ qw,
                                                             const half* __restrict__ qs,
                                                             OutT* __restrict__ out, int N) {
  const int row0 = (blockIdx.x * 4 + threadIdx.x / 32) * kGemv1Rows;
  const int lane = threadIdx.x % 32;
  if (row0 >= N) return;
  constexpr int groups = 32 * U;
  uint4 w[kGemv1Rows][U];
  half s[kGemv1Rows][U];
#pragma unroll
  for (int f = 0; f < kGemv1Rows; ++f)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t off = static_cast<int64_t>(min(row0 + f, N - 1)) * groups + lane + 32 * u;
      w[f][u] = __ldg(qw + off);
      s[f][u] = qs[off];
    }
  float acc[kGemv1Rows] = {};
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int f = 0; f < kGemv1Rows; ++f) {
      acc[f] = fmaf(group_dot(w[f][u], x + (lane + 32 * u) * kGroup), __half2float(s[f][u]),
                    acc[f]);
    }
  }
#pragma unroll
  for (int f = 0; f < kGemv1Rows; ++f) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[f] += __shfl_xor_sync(0xffffffffu, acc[f], off);
    if (lane == 0 && row0 + f < N) out[row0 + f] = OutT(acc[f]);
  }
}

// MLC_Q4_GEMV_ROWS=0 keeps the general one-row kernel (for same-library comparisons).
bool gemv_rows_env_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("MLC_Q4_GEMV_ROWS");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

template <typename OutT>
bool launch_gemv1_rows(const half* x, const uint4* w, const half* qs, OutT* out, int N, int K,
                       cudaStream_t stream) {
  if (K % (32 * kGroup) || !gemv_rows_env_enabled()) return false;
  const dim3 grid((N + 4 * kGemv1Rows - 1) / (4 * kGemv1Rows));
  switch (K / (32 * kGroup)) {
#define MLC_GEMV1_CASE(U) \
    case U: q4_gemv1_rows_kernel<U, OutT><<<grid, 128, 0, stream>>>(x, w, qs, out, N); return true;
    MLC_GEMV1_CASE(1) MLC_GEMV1_CASE(2) MLC_GEMV1_CASE(3) MLC_GEMV1_CASE(4) MLC_GEMV1_CASE(5)
    MLC_GEMV1_CASE(6) MLC_GEMV1_CASE(7) MLC_GEMV1_CASE(8) MLC_GEMV1_CASE(14) MLC_GEMV1_CASE(16)
#undef MLC_GEMV1_CASE
    default: return false;
  }
}

template <int ROWS, typename OutT>
void launch_gemv_rows(const half* x, const uint4* w, const half* qs, OutT* out, int M, int N,
                      int K, int row0, cudaStream_t stream) {
  constexpr int kFeat = ROWS <= 2 ? 4 : 2;
  const dim3 grid((N + kGemvWarps * kFeat - 1) / (kGemvWarps * kFeat));
  q4_gemv_kernel<ROWS, kFeat, OutT><<<grid, kGemvWarps * 32, 0, stream>>>(x, w, qs, out, M, N,
                                                                          K, row0);
}

template <typename OutT>
void launch_q4_gemv(const half* x, const uint32_t* qw, const half* qs, OutT* out, int M, int N,
                    int K, cudaStream_t stream) {
  const uint4* w = reinterpret_cast<const uint4*>(qw);
  if (M == 1) {
    if (!launch_gemv1_rows(x, w, qs, out, N, K, stream)) {
      q4_gemv1_kernel<OutT><<<(N + 3) / 4, 128, 0, stream>>>(x, w, qs, out, N, K);
    }
    MLC_CUDA_CHECK(cudaGetLastError());
    return;
  }
  for (int row0 = 0; row0 < M; row0 += kMaxGemvRows) {
    const int rows = M - row0;
    if (rows == 1) {
      launch_gemv_rows<1>(x, w, qs, out, M, N, K, row0, stream);
    } else if (rows == 2) {
      launch_gemv_rows<2>(x, w, qs, out, M, N, K, row0, stream);
    } else if (rows <= 4) {
      launch_gemv_rows<4>(x, w, qs, out, M, N, K, row0, stream);
    } else {
      launch_gemv_rows<8>(x, w, qs, out, M, N, K, row0, stream);
    }
  }
  MLC_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// Dequantize q4 -> float16 [N, K] (one thread per 32-value group, 16-byte loads and stores).
// ---------------------------------------------------------------------------------------------
__global__ void q4_dequant_kernel(const uint4* __restrict__ qw, const half* __restrict__ qs,
                                  half* __restrict__ w, int64_t num_groups) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= num_groups) return;
  const uint4 q = qw[g];
  const half s = qs[g];
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  uint4* dst = reinterpret_cast<uint4*>(w + g * kGroup);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    half2 h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const half lo = __hmul(__int2half_rn(int((words[i] >> (8 * j)) & 15u) - 7), s);
      const half hi = __hmul(__int2half_rn(int((words[i] >> (8 * j + 4)) & 15u) - 7), s);
      h[j] = __halves2half2(lo, hi);
    }
    dst[i] = *reinterpret_cast<uint4*>(h);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused dequantize + tensor-core matmul for 2 <= M <= ~128 (batched decode, small prefill).
//
// "Swap AB": each warp computes Y^T tiles [16 features x 8 tokens] = W[16 x K] . X^T with
// mma.sync.m16n8k16 (A = dequantized weights, row-major 16x16; B = x^T, 16x8; f32 accumulate),
// NT token tiles (M padded to 8*NT with zero rows) reusing every dequantized A fragment.
// Lane = 4g + t. A regs: a0 = A[g][2t,2t+1], a1 = A[g+8][2t,2t+1], a2 = A[g][2t+8,2t+9],
// a3 = A[g+8][2t+8,2t+9]; B regs: b0 = B[2t,2t+1][g], b1 = B[2t+8,2t+9][g]; C: c0,c1 =
// C[g][2t,2t+1], c2,c3 = C[g+8][2t,2t+1].
//
// The dot product over k does not care how k is ordered, as long as A and B agree, and the k
// that a slot stands for depends only on t (not on g): per 128-wide K block, lane (g, t) owns the
// 32 k of quant group t of the block (uint4 t of the block in rows g and g+8 of its 16 rows, one
// scale per row), i.e. words w = 0..3 (k = 32t + 8w + i, nibble i at bits 4i). Word w feeds mmas
// 2w (h = 0) and 2w+1 (h = 1): (w >> 8h) & 0x000f000f gives the nibble pair (2h, 2h+4) -> slots
// 2t,2t+1 (a0/a1); (w >> 8h+4) the pair (2h+1, 2h+5) -> slots 2t+8,2t+9 (a2/a3). The B regs hold
// the same k of token g: (x[2h], x[2h+4]) and (x[2h+1], x[2h+5]) of the word's 8 x values, made
// with one byte_perm each. OR-ing a nibble into 0x6400 (1024.0 in float16) gives 1024 + n;
// subtracting 1031 is exact, and the product with the scale is one rounding, as in
// q4_dequant_kernel.
//
// A block is 8 warps of FT 16-feature A tiles each: FT = 1 (NT <= 3: 128 features) or FT = 2
// (NT >= 4: 256 features; each B fragment read from shared memory feeds both A tiles). The
// block's K range is streamed through a cp.async pipeline of 128-wide K stages (weights 8 KB
// per 128 features, scales, and x rows in shared memory, x swizzled so the 16-byte fragment
// loads are conflict-free). gridDim = (N / (128 FT), splits, M chunks of 8*NT rows). With
// splits > 1, each block writes its partial tile (in fragment order, float4 per lane) to a
// workspace; the last block of a tile to arrive (a counter per tile, reset by that block) sums
// the partials in split order (deterministic) and writes the output.
// ---------------------------------------------------------------------------------------------
constexpr int kMmaWarps = 8;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaBK = 128;              // K per pipeline stage: 4 quant groups
constexpr int kMmaMaxNT = 16;            // up to 128 rows of x per block

// FT: 16-feature A tiles per warp. With NT >= 4 token tiles the kernel is bound by shared
// memory reads of the x (B) fragments and by dequantization; FT = 2 makes each B fragment feed
// 2 A tiles (half the B traffic per mma) at the same dequantization work per mma. A block is
// then 8 warps x 32 = 256 features (warp w: block rows 32w .. 32w+31, A tile f: rows 32w + 16f).
template <int NT>
struct MmaCfg {
  static constexpr int kFT = NT >= 4 ? 2 : 1;
  static constexpr int kBN = kMmaWarps * 16 * kFT;        // features per block
  static constexpr int kStages = kFT == 1 ? (NT <= 8 ? 4 : 3) : 3;
  static constexpr int kMinBlocks = NT <= 8 ? 2 : 1;
  static constexpr int kWStage = kBN * kMmaBK / 32;       // uint4 of weights per stage
  static constexpr int kXStage = NT * 8 * kMmaBK / 8;     // uint4 of x per stage (16 per row)
  static constexpr int kSStage = kBN * 2;                 // uint32 (2 scales) per stage
  static constexpr int kSmem = kStages * (kWStage * 16 + kXStage * 16 + kSStage * 4);
  static constexpr int kTileF4 = kMmaWarps * kFT * NT * 32;   // float4 of a partial tile
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, zero-filled when !valid (src is then not read); the L2 fetches the
// whole 128-byte line (the next K stage of a weight row is its other half).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two nibbles of `w` (at bits shift and shift + 16) -> half2((n_lo - 7) * s, (n_hi - 7) * s).
__device__ __forceinline__ uint32_t dq2(uint32_t w, int shift, uint32_t scale2) {
  uint32_t v = ((w >> shift) & 0x000f000fu) | 0x64006400u;
  asm("sub.rn.f16x2 %0, %0, %1;\n" : "+r"(v) : "r"(0x64076407u));   // 1031 = 1024 + 7
  asm("mul.rn.f16x2 %0, %0, %1;\n" : "+r"(v) : "r"(scale2));
  return v;
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// x in shared memory: row r (token) of 16 uint4 chunks (chunk c = k 8c..8c+7 of the stage),
// stored at chunk c ^ ((c >> 3) << 1) ^ (r & 1). A fragment load of lanes 0-7 (g = 0,1,
// t = 0..3, fixed word w; c = 4t + w) then touches 8 distinct 16-byte bank groups.
__device__ __forceinline__ int x_swizzle(int r, int c) { return c ^ ((c >> 3) << 1) ^ (r & 1); }

template <int NT, typename OutT>
__global__ void __launch_bounds__(kMmaThreads, MmaCfg<NT>::kMinBlocks)
    q4_mma_kernel(const half* __restrict__ x, const uint4* __restrict__ qw,
                  const half* __restrict__ qs, OutT* __restrict__ out, float4* __restrict__ part,
                  int* __restrict__ counters, int M, int N, int K, int splits) {
  using Cfg = MmaCfg<NT>;
  constexpr int kStages = Cfg::kStages, kWStage = Cfg::kWStage, kXStage = Cfg::kXStage,
                kSStage = Cfg::kSStage, FT = Cfg::kFT, kBN = Cfg::kBN;
  extern __shared__ uint4 smem[];
  uint4* sw = smem;                                           // [stage][kBN rows][4]
  uint4* sx = sw + kStages * kWStage;                         // [stage][8*NT rows][16]
  uint32_t* ss = reinterpret_cast<uint32_t*>(sx + kStages * kXStage);   // [stage][kBN][2]
  __shared__ int s_last;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kBN;
  const int m0 = blockIdx.z * (NT * 8);
  const int split = blockIdx.y;
  const int groups = K / kGroup;                // uint4 (and scales) per weight row
  const int kblocks = (K + kMmaBK - 1) / kMmaBK;
  const int kb0 = static_cast<int>(static_cast<int64_t>(split) * kblocks / splits);
  const int kb1 = static_cast<int>(static_cast<int64_t>(split + 1) * kblocks / splits);
  const int nkb = kb1 - kb0;

  auto load_stage = [&](int slot, int kb) {
    uint4* dw = sw + slot * kWStage;
#pragma unroll
    for (int j = 0; j < kWStage / kMmaThreads; ++j) {
      const int i = tid + j * kMmaThreads, r = i >> 2, c = i & 3;
      const int n = n0 + r, gi = kb * 4 + c;
      const bool ok = n < N && gi < groups;
      cp_async16(smem_addr(dw + i), ok ? qw + static_cast<int64_t>(n) * groups + gi : qw, ok);
    }
    uint4* dx = sx + slot * kXStage;
#pragma unroll
    for (int j = 0; j < (kXStage + kMmaThreads - 1) / kMmaThreads; ++j) {
      const int i = tid + j * kMmaThreads;
      if (kXStage % kMmaThreads == 0 || i < kXStage) {
        const int r = i >> 4, c = i & 15;
        const int m = m0 + r, k = kb * kMmaBK + c * 8;
        const bool ok = m < M && k < K;
        cp_async16(smem_addr(dx + r * 16 + x_swizzle(r, c)),
                   ok ? x + static_cast<int64_t>(m) * K + k : x, ok);
      }
    }
    uint32_t* ds = ss + slot * kSStage;
    static_assert(kSStage == FT * kMmaThreads, "FT scale pairs per thread");
#pragma unroll
    for (int j = 0; j < FT; ++j) {
      const int i = tid + j * kMmaThreads, r = i >> 1, c = i & 1;
      const int n = n0 + r, gi = kb * 4 + c * 2;    // groups is even: gi < groups => gi + 1 too
      const bool ok = n < N && gi < groups;
      cp_async4(smem_addr(ds + i), ok ? qs + static_cast<int64_t>(n) * groups + gi : qs, ok);
    }
  };

  float acc[FT][NT][4];
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[f][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkb) load_stage(s, kb0 + s);
    cp_async_commit();
  }

  const int rg = warp * 16 * FT + g;             // block row of A tile f's row g: rg + 16f
  int slot = 0, next_slot = kStages - 1;
  for (int it = 0; it < nkb; ++it) {
    cp_async_wait<kStages - 2>();                // stage `it` has landed (this thread's part)
    __syncthreads();                             // ... everyone's; and slot it-1 is free
    if (it + kStages - 1 < nkb) load_stage(next_slot, kb0 + it + kStages - 1);
    cp_async_commit();
    next_slot = next_slot + 1 == kStages ? 0 : next_slot + 1;

    const unsigned short* sh = reinterpret_cast<const unsigned short*>(ss + slot * kSStage);
    const uint4* xs = sx + slot * kXStage;
    if constexpr (FT == 1) {
      const uint4 wg = sw[slot * kWStage + rg * 4 + t];
      const uint4 w8 = sw[slot * kWStage + (rg + 8) * 4 + t];
      const uint32_t sg = sh[rg * 4 + t], s8 = sh[(rg + 8) * 4 + t];
      const uint32_t sg2 = sg | (sg << 16), s82 = s8 | (s8 << 16);
      const uint32_t wgw[4] = {wg.x, wg.y, wg.z, wg.w};
      const uint32_t w8w[4] = {w8.x, w8.y, w8.z, w8.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t a00 = dq2(wgw[w], 0, sg2), a01 = dq2(w8w[w], 0, s82);
        const uint32_t a02 = dq2(wgw[w], 4, sg2), a03 = dq2(w8w[w], 4, s82);
        const uint32_t a10 = dq2(wgw[w], 8, sg2), a11 = dq2(w8w[w], 8, s82);
        const uint32_t a12 = dq2(wgw[w], 12, sg2), a13 = dq2(w8w[w], 12, s82);
        const int pc = x_swizzle(g, 4 * t + w);    // row nt*8 + g has the parity of g
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 xv = xs[(nt * 8 + g) * 16 + pc];
          mma16816(acc[0][nt], a00, a01, a02, a03, __byte_perm(xv.x, xv.z, 0x5410),
                   __byte_perm(xv.x, xv.z, 0x7632));
          mma16816(acc[0][nt], a10, a11, a12, a13, __byte_perm(xv.y, xv.w, 0x5410),
                   __byte_perm(xv.y, xv.w, 0x7632));
        }
      }
    } else {
      // Two A tiles. The words of the weights are read kW at a time (16-, 8- or 4-byte loads);
      // where kW < 4 the loop over them is not unrolled, which keeps the live registers (and
      // the B loads the compiler hoists) within the 128 of 2 blocks per SM (NT = 8).
      constexpr int kW = NT == 8 ? 1 : 4;       // 128 registers for NT = 8: one word a load
      uint32_t sg2[FT], s82[FT];
#pragma unroll
      for (int f = 0; f < FT; ++f) {
        const int r = rg + 16 * f;
        const uint32_t sg = sh[r * 4 + t], s8 = sh[(r + 8) * 4 + t];
        sg2[f] = sg | (sg << 16);
        s82[f] = s8 | (s8 << 16);
      }
      const uint32_t* swu = reinterpret_cast<const uint32_t*>(sw + slot * kWStage);
#pragma unroll 1
      for (int p = 0; p < 4 / kW; ++p) {
        uint32_t wgp[FT][kW], w8p[FT][kW];
#pragma unroll
        for (int f = 0; f < FT; ++f) {
          const int ig = ((rg + 16 * f) * 4 + t) * 4 + p * kW;   // word index in the stage
          const int i8 = ig + 8 * 16;                            // row + 8
          if constexpr (kW == 4) {
            const uint4 vg = *reinterpret_cast<const uint4*>(swu + ig);
            const uint4 v8 = *reinterpret_cast<const uint4*>(swu + i8);
            wgp[f][0] = vg.x; wgp[f][1] = vg.y; wgp[f][2] = vg.z; wgp[f][3] = vg.w;
            w8p[f][0] = v8.x; w8p[f][1] = v8.y; w8p[f][2] = v8.z; w8p[f][3] = v8.w;
          } else if constexpr (kW == 2) {
            const uint2 vg = *reinterpret_cast<const uint2*>(swu + ig);
            const uint2 v8 = *reinterpret_cast<const uint2*>(swu + i8);
            wgp[f][0] = vg.x; wgp[f][1] = vg.y;
            w8p[f][0] = v8.x; w8p[f][1] = v8.y;
          } else {
            wgp[f][0] = swu[ig];
            w8p[f][0] = swu[i8];
          }
        }
#pragma unroll
        for (int wi = 0; wi < kW; ++wi) {
          const int w = p * kW + wi;
          uint32_t a[FT][2][4];
#pragma unroll
          for (int f = 0; f < FT; ++f) {
            const uint32_t wg = wgp[f][wi], w8 = w8p[f][wi];
            a[f][0][0] = dq2(wg, 0, sg2[f]);
            a[f][0][1] = dq2(w8, 0, s82[f]);
            a[f][0][2] = dq2(wg, 4, sg2[f]);
            a[f][0][3] = dq2(w8, 4, s82[f]);
            a[f][1][0] = dq2(wg, 8, sg2[f]);
            a[f][1][1] = dq2(w8, 8, s82[f]);
            a[f][1][2] = dq2(wg, 12, sg2[f]);
            a[f][1][3] = dq2(w8, 12, s82[f]);
          }
          const int pc = x_swizzle(g, 4 * t + w);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 xv = xs[(nt * 8 + g) * 16 + pc];
            const uint32_t b00 = __byte_perm(xv.x, xv.z, 0x5410);
            const uint32_t b01 = __byte_perm(xv.x, xv.z, 0x7632);
            const uint32_t b10 = __byte_perm(xv.y, xv.w, 0x5410);
            const uint32_t b11 = __byte_perm(xv.y, xv.w, 0x7632);
#pragma unroll
            for (int f = 0; f < FT; ++f) {
              mma16816(acc[f][nt], a[f][0][0], a[f][0][1], a[f][0][2], a[f][0][3], b00, b01);
              mma16816(acc[f][nt], a[f][1][0], a[f][1][1], a[f][1][2], a[f][1][3], b10, b11);
            }
          }
        }
      }
    }
    slot = slot + 1 == kStages ? 0 : slot + 1;
  }
  cp_async_wait<0>();

  // features of A tile f: c0,c1 (f0) and c2,c3 (f0 + 8), f0 = n0 + rg + 16f
  auto store = [&](int f, int nt, const float4& v) {
    const int f0 = n0 + rg + 16 * f;
    const int m = m0 + nt * 8 + 2 * t;
    if (m < M) {
      if (f0 < N) out[static_cast<int64_t>(m) * N + f0] = OutT(v.x);
      if (f0 + 8 < N) out[static_cast<int64_t>(m) * N + f0 + 8] = OutT(v.z);
    }
    if (m + 1 < M) {
      if (f0 < N) out[static_cast<int64_t>(m + 1) * N + f0] = OutT(v.y);
      if (f0 + 8 < N) out[static_cast<int64_t>(m + 1) * N + f0 + 8] = OutT(v.w);
    }
  };
  if (splits == 1) {
#pragma unroll
    for (int f = 0; f < FT; ++f)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        store(f, nt, make_float4(acc[f][nt][0], acc[f][nt][1], acc[f][nt][2], acc[f][nt][3]));
    return;
  }

  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  float4* tile_part = part + static_cast<int64_t>(tile) * splits * Cfg::kTileF4;
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      __stcg(tile_part + static_cast<int64_t>(split) * Cfg::kTileF4 +
                 ((warp * FT + f) * NT + nt) * 32 + lane,
             make_float4(acc[f][nt][0], acc[f][nt][1], acc[f][nt][2], acc[f][nt][3]));
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(counters + tile, 1) == splits - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Sum the partials in split order (the same sums every run), this block's own included (it
  // is read back from the workspace, so acc can hold the sums). Tiles are summed kC at a time,
  // kU splits per pass: kC * kU independent loads in flight (32 registers), not one chain.
  constexpr int kTiles = FT * NT;
  constexpr int kC = kTiles < 4 ? kTiles : 4;
  constexpr int kU = 8 / kC > 2 ? 8 / kC : 2;
  static_assert(kTiles % kC == 0, "tiles in whole chunks");
  float* accf = &acc[0][0][0];                    // tile i (= f * NT + nt): accf[4i .. 4i+3]
#pragma unroll
  for (int c0 = 0; c0 < kTiles; c0 += kC) {
    auto idx = [&](int i) { return ((warp * FT + (c0 + i) / NT) * NT + (c0 + i) % NT) * 32 + lane; };
#pragma unroll
    for (int i = 0; i < kC; ++i) {
      const float4 p = __ldcg(tile_part + idx(i));
      float* v = accf + 4 * (c0 + i);
      v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
    }
    for (int s = 1; s < splits; s += kU) {
      float4 p[kU][kC];
#pragma unroll
      for (int u = 0; u < kU; ++u)
#pragma unroll
        for (int i = 0; i < kC; ++i)
          p[u][i] = s + u < splits
                        ? __ldcg(tile_part + static_cast<int64_t>(s + u) * Cfg::kTileF4 + idx(i))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (s + u < splits) {
#pragma unroll
          for (int i = 0; i < kC; ++i) {
            float* v = accf + 4 * (c0 + i);
            v[0] += p[u][i].x; v[1] += p[u][i].y; v[2] += p[u][i].z; v[3] += p[u][i].w;
          }
        }
      }
    }
  }
#pragma unroll
  for (int f = 0; f < FT; ++f)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      store(f, nt, make_float4(acc[f][nt][0], acc[f][nt][1], acc[f][nt][2], acc[f][nt][3]));
  if (tid == 0) counters[tile] = 0;               // ready for the next launch
}

// ---------------------------------------------------------------------------------------------
// cuBLAS through dlopen (the nvidia-cublas wheel or a system CUDA toolkit provides it).
// ---------------------------------------------------------------------------------------------
using cublasHandle_t = void*;
using CreateFn = int (*)(cublasHandle_t*);
using SetStreamFn = int (*)(cublasHandle_t, cudaStream_t);
using SetWorkspaceFn = int (*)(cublasHandle_t, void*, size_t);
using GemmExFn = int (*)(cublasHandle_t, int, int, int, int, int, const void*, const void*, int,
                         int, const void*, int, int, const void*, void*, int, int, int, int);

struct Cublas {
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  std::string error;
};

Cublas& cublas() {
  static Cublas lib;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("MLC_CUBLAS_PATH");
    const char* names[] = {env, "libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    void* handle = nullptr;
    for (const char* name : names) {
      if (name && (handle = dlopen(name, RTLD_NOW | RTLD_GLOBAL))) break;
    }
    if (!handle) {
      lib.error = "cuBLAS (libcublas.so.13) was not found: `pip install nvidia-cublas` (mlc "
                  "loads it from there) or set MLC_CUBLAS_PATH";
      return;
    }
    lib.create = reinterpret_cast<CreateFn>(dlsym(handle, "cublasCreate_v2"));
    lib.set_stream = reinterpret_cast<SetStreamFn>(dlsym(handle, "cublasSetStream_v2"));
    lib.gemm_ex = reinterpret_cast<GemmExFn>(dlsym(handle, "cublasGemmEx"));
    if (!lib.create || !lib.set_stream || !lib.gemm_ex) lib.error = "cuBLAS lacks cublasGemmEx";
  });
  TVM_FFI_ICHECK(lib.error.empty()) << lib.error;
  return lib;
}

cublasHandle_t cublas_handle(int device) {
  static std::mutex mu;
  static std::unordered_map<int, cublasHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasHandle_t h = nullptr;
  TVM_FFI_ICHECK_EQ(cublas().create(&h), 0) << "cublasCreate failed";
  handles[device] = h;
  return h;
}

// cuBLAS enums (stable ABI values)
constexpr int kOpN = 0, kOpT = 1, kR16F = 2, kR32F = 0, kCompute32F = 68, kGemmDefault = -1;

// out[M, N] = x[M, K] @ w[N, K]^T: column-major cuBLAS sees out^T = w x^T.
void gemm_nt(const half* x, const half* w, void* out, bool out_f32, int M, int N, int K,
             int device, cudaStream_t stream) {
  Cublas& lib = cublas();
  cublasHandle_t h = cublas_handle(device);
  TVM_FFI_ICHECK_EQ(lib.set_stream(h, stream), 0);
  const float alpha = 1.f, beta = 0.f;
  const int status = lib.gemm_ex(h, kOpT, kOpN, N, M, K, &alpha, w, kR16F, K, x, kR16F, K, &beta,
                                 out, out_f32 ? kR32F : kR16F, N, kCompute32F, kGemmDefault);
  TVM_FFI_ICHECK_EQ(status, 0) << "cublasGemmEx failed with status " << status;
}

// A per-device float16 workspace for dequantized weights (grows to the largest layer). A
// smaller buffer it outgrew is kept, not freed: a captured CUDA graph may still point at it.
half* workspace(int device, size_t elems) {
  static std::mutex mu;
  static std::unordered_map<int, std::pair<half*, size_t>> spaces;
  std::lock_guard<std::mutex> lock(mu);
  auto& entry = spaces[device];
  if (entry.second < elems) {
    MLC_CUDA_CHECK(cudaMalloc(&entry.first, elems * sizeof(half)));
    entry.second = elems;
  }
  return entry.first;
}

// ---------------------------------------------------------------------------------------------
// Dispatch of the tensor-core kernel: the M range (mlc.cuda.q4_set_paths), split-K, workspace.
// ---------------------------------------------------------------------------------------------
std::atomic<int64_t> g_mma_min_m{2};
std::atomic<int64_t> g_mma_max_m{128};
std::atomic<int64_t> g_mma_split{0};           // 0: automatic
std::atomic<int64_t> g_mma_blocks_per_sm{0};   // split-K target blocks per SM (0: automatic)
constexpr int64_t kInvariantSplits = 8;        // split-K under MLC_BATCH_INVARIANT (K only)

bool mma_env_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("MLC_Q4_MMA");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

struct KernelInfo {
  bool checked = false;
  bool fits = false;       // false: the shared memory it needs is more than this GPU has
  int sms = 0;
  int blocks_per_sm = 0;   // occupancy at its shared memory size
};

// Raises the kernel's dynamic shared memory limit and reads its occupancy, once per device.
// (sm_86/89 have ~100 KB of shared memory per SM: the largest row tiles do not fit there, and
// those calls take the older paths.)
const KernelInfo& kernel_info(const void* kernel, int smem, int device) {
  static std::mutex mu;
  static std::unordered_map<const void*, std::unordered_map<int, KernelInfo>> infos;
  std::lock_guard<std::mutex> lock(mu);
  KernelInfo& info = infos[kernel][device];
  if (!info.checked) {
    info.checked = true;
    int optin = 0;
    MLC_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    MLC_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
    if (smem + 1024 > optin) return info;   // + the kernel's static shared memory
    MLC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        smem));
    MLC_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel,
                                                                 kMmaThreads, smem));
    info.fits = info.blocks_per_sm > 0;
  }
  return info;
}

// Split-K partial tiles and per-tile arrival counters (zeroed once, reset by the kernel). Like
// workspace(), a buffer that was outgrown is kept: a captured CUDA graph may still use it.
struct MmaWorkspace {
  float4* part = nullptr;
  size_t part_elems = 0;
  int* counters = nullptr;
  size_t num_counters = 0;
};

MmaWorkspace mma_workspace(int device, size_t part_elems, size_t num_counters,
                           cudaStream_t stream) {
  static std::mutex mu;
  static std::unordered_map<int, MmaWorkspace> spaces;
  std::lock_guard<std::mutex> lock(mu);
  MmaWorkspace& ws = spaces[device];
  if (ws.part_elems < part_elems) {
    const size_t elems = std::max(part_elems, std::max<size_t>(2 * ws.part_elems, 1 << 16));
    MLC_CUDA_CHECK(cudaMalloc(&ws.part, elems * sizeof(float4)));
    ws.part_elems = elems;
  }
  if (ws.num_counters < num_counters) {
    const size_t n = std::max(num_counters, std::max<size_t>(2 * ws.num_counters, 4096));
    MLC_CUDA_CHECK(cudaMalloc(&ws.counters, n * sizeof(int)));
    MLC_CUDA_CHECK(cudaMemsetAsync(ws.counters, 0, n * sizeof(int), stream));
    ws.num_counters = n;
  }
  return ws;
}

// Returns false (nothing launched) where the kernel does not fit this GPU.
template <int NT, typename OutT>
bool launch_q4_mma_nt(const half* x, const uint32_t* qw, const half* qs, OutT* out, int M, int N,
                      int K, int chunks, int device, cudaStream_t stream) {
  using Cfg = MmaCfg<NT>;
  const auto kernel = q4_mma_kernel<NT, OutT>;
  const KernelInfo& info = kernel_info(reinterpret_cast<const void*>(kernel), Cfg::kSmem, device);
  if (!info.fits) return false;
  const int col_blocks = (N + Cfg::kBN - 1) / Cfg::kBN;
  const int kblocks = (K + kMmaBK - 1) / kMmaBK;
  const int64_t tiles = static_cast<int64_t>(col_blocks) * chunks;
  int64_t splits = BatchInvariant() ? kInvariantSplits : g_mma_split.load();
  if (splits <= 0) {
    // Split K until the grid fills `per_sm` blocks per SM, never beyond (no partial second
    // wave) and keeping >= 2 K stages per block. Few rows are memory-bound: 2 blocks per SM
    // (of 4-5 resident) keep enough loads in flight, with less split-K traffic; more rows are
    // compute-bound: as many blocks as fit.
    // Two A tiles per warp (NT >= 4): one block per SM. (On the H100, at M = 32 and 64 with
    // N = 4096, ~1 block per SM beat 2: fewer, longer blocks and half the split-K partials.)
    int64_t per_sm = g_mma_blocks_per_sm.load();
    if (per_sm <= 0) per_sm = Cfg::kFT == 2 ? 1 : NT <= 4 ? 2 : info.blocks_per_sm;
    per_sm = std::max<int64_t>(1, std::min<int64_t>(per_sm, info.blocks_per_sm));
    splits = std::max<int64_t>(1, info.sms * per_sm / tiles);
    splits = std::min<int64_t>(splits, std::max(1, kblocks / 2));
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kblocks, 65535}));
  MmaWorkspace ws;
  if (splits > 1) ws = mma_workspace(device, tiles * splits * Cfg::kTileF4, tiles, stream);
  const dim3 grid(col_blocks, static_cast<unsigned>(splits), chunks);
  kernel<<<grid, kMmaThreads, Cfg::kSmem, stream>>>(x, reinterpret_cast<const uint4*>(qw), qs,
                                                     out, ws.part, ws.counters, M, N, K,
                                                     static_cast<int>(splits));
  MLC_CUDA_CHECK(cudaGetLastError());
  return true;
}

template <typename OutT>
bool launch_q4_mma(const half* x, const uint32_t* qw, const half* qs, OutT* out, int M, int N,
                   int K, int device, cudaStream_t stream) {
  // rows of x per block: 8 * NT, NT in {1,2,3,4,6,8,12,16}; above 128 rows, gridDim.z chunks
  const int tiles8 = (M + 7) / 8;
  const int chunks = (tiles8 + kMmaMaxNT - 1) / kMmaMaxNT;
  if (chunks > 65535) return false;
  const int need = (tiles8 + chunks - 1) / chunks;
  if (need <= 1) return launch_q4_mma_nt<1>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 2) return launch_q4_mma_nt<2>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 3) return launch_q4_mma_nt<3>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 4) return launch_q4_mma_nt<4>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 6) return launch_q4_mma_nt<6>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 8) return launch_q4_mma_nt<8>(x, qw, qs, out, M, N, K, chunks, device, stream);
  if (need <= 12) return launch_q4_mma_nt<12>(x, qw, qs, out, M, N, K, chunks, device, stream);
  return launch_q4_mma_nt<16>(x, qw, qs, out, M, N, K, chunks, device, stream);
}

bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

void Q4SetPaths(int64_t mma_min_m, int64_t mma_max_m) {
  g_mma_min_m.store(mma_min_m);
  g_mma_max_m.store(mma_max_m);
}

void Q4SetMmaConfig(int64_t split_k, int64_t blocks_per_sm) {
  g_mma_split.store(std::max<int64_t>(0, split_k));
  g_mma_blocks_per_sm.store(std::max<int64_t>(0, blocks_per_sm));
}

void check_args(const TensorView& x, const TensorView& out, int64_t N, int64_t K) {
  TVM_FFI_ICHECK_EQ(x.ndim(), 2) << "x must be [M, K]";
  TVM_FFI_ICHECK_EQ(out.ndim(), 2) << "out must be [M, N]";
  TVM_FFI_ICHECK_EQ(x.size(1), K);
  TVM_FFI_ICHECK_EQ(out.size(0), x.size(0));
  TVM_FFI_ICHECK_EQ(out.size(1), N);
  TVM_FFI_ICHECK(x.dtype().code == kDLFloat && x.dtype().bits == 16) << "x must be float16";
}

void Q4Matmul(TensorView x, TensorView qw, TensorView qs, TensorView out) {
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  check_args(x, out, N, K);
  TVM_FFI_ICHECK_EQ(K % kGroup, 0) << "K must be a multiple of 32";
  TVM_FFI_ICHECK_EQ(qw.size(1) * 8, K);
  const bool out_f32 = out.dtype().bits == 32;
  const int device = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const auto* xp = static_cast<const half*>(x.data_ptr());
  const auto* wp = static_cast<const uint32_t*>(qw.data_ptr());
  const auto* sp = static_cast<const half*>(qs.data_ptr());
  if (M == 0) return;
  const bool mma_rows = BatchInvariant() || (M >= g_mma_min_m.load() && M <= g_mma_max_m.load());
  if (mma_rows && K % 64 == 0 && mma_env_enabled() &&
      aligned(xp, 16) && aligned(wp, 16) && aligned(sp, 4) && M < (1 << 30) && N < (1 << 30) &&
      K < (1 << 30)) {
    const bool done =
        out_f32 ? launch_q4_mma(xp, wp, sp, static_cast<float*>(out.data_ptr()), M, N, K, device,
                                stream)
                : launch_q4_mma(xp, wp, sp, static_cast<half*>(out.data_ptr()), M, N, K, device,
                                stream);
    if (done) return;
  }
  if (M <= kGemvMaxM) {
    if (out_f32) {
      launch_q4_gemv(xp, wp, sp, static_cast<float*>(out.data_ptr()), M, N, K, stream);
    } else {
      launch_q4_gemv(xp, wp, sp, static_cast<half*>(out.data_ptr()), M, N, K, stream);
    }
    return;
  }
  half* w = workspace(device, static_cast<size_t>(N) * K);
  const int64_t groups = N * K / kGroup;
  q4_dequant_kernel<<<(groups + 255) / 256, 256, 0, stream>>>(
      reinterpret_cast<const uint4*>(wp), sp, w, groups);
  MLC_CUDA_CHECK(cudaGetLastError());
  gemm_nt(xp, w, out.data_ptr(), out_f32, M, N, K, device, stream);
}

void F16Matmul(TensorView x, TensorView w, TensorView out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_args(x, out, N, K);
  if (M == 0) return;
  const int device = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  gemm_nt(static_cast<const half*>(x.data_ptr()), static_cast<const half*>(w.data_ptr()),
          out.data_ptr(), out.dtype().bits == 32, M, N, K, device, stream);
}

}  // namespace
}  // namespace mlc

// Every CUDA model library carries these kernels (see RegisterKernel in cuda_check.h).
TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  mlc::RegisterKernel("q4_matmul", Function::FromTyped(mlc::Q4Matmul));
  mlc::RegisterKernel("f16_matmul", Function::FromTyped(mlc::F16Matmul));
  mlc::RegisterKernel("q4_set_paths", Function::FromTyped(mlc::Q4SetPaths));
  mlc::RegisterKernel("q4_set_mma_config", Function::FromTyped(mlc::Q4SetMmaConfig));
}
