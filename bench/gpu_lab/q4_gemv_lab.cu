// Standalone lab for the batch-1 q4 GEMV (y = W x, q4f16_1 weights): variants of the kernel on
// Llama-3-8B shapes, checked against a float64 CPU reference and timed with CUDA events over
// rotating weight copies (each shape's copies total > 5x the 50 MB L2). No TVM needed:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o q4_gemv_lab q4_gemv_lab.cu && ./q4_gemv_lab
// Prints GB/s of weight + scale bytes per variant and shape.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <random>
#include <vector>

#define CHECK(x)                                                                         \
  do {                                                                                   \
    cudaError_t e = (x);                                                                 \
    if (e != cudaSuccess) {                                                              \
      printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);     \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

constexpr int kGroup = 32;

// ---- v0: the kernel in q4_matmul.cu today (a warp per feature, lanes striding over groups)
__global__ void gemv_v0(const half* __restrict__ x, const uint4* __restrict__ qw,
                        const half* __restrict__ qs, float* __restrict__ out, int N, int K) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int groups = K / kGroup;
  const uint4* wrow = qw + static_cast<int64_t>(n) * groups;
  const half* srow = qs + static_cast<int64_t>(n) * groups;
  float acc = 0.f;
  for (int g = lane; g < groups; g += 32) {
    const uint4 w = __ldg(wrow + g);
    const float s = __half2float(srow[g]);
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
    const uint4* xv = reinterpret_cast<const uint4*>(x + g * kGroup);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 xx = __ldg(xv + i);
      const half2* h = reinterpret_cast<const half2*>(&xx);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(h[j]);
        part = fmaf(f.x, float((words[i] >> (8 * j)) & 15u) - 7.f, part);
        part = fmaf(f.y, float((words[i] >> (8 * j + 4)) & 15u) - 7.f, part);
      }
    }
    acc = fmaf(part, s, acc);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) out[n] = acc;
}

// Nibbles j and j+4 of each byte... of one 32-bit word as 4 half2 (exact small integers
// n - 7): the 0x6400 exponent trick (1024 + n as a half), then subtract 1031.
__device__ __forceinline__ void dequant_word(uint32_t w, half2 out[4]) {
  const uint32_t lo = 0x000f000fu, magic = 0x64006400u;
  const half2 bias = __halves2half2(__ushort_as_half(0x6407), __ushort_as_half(0x6407));
  // out[j] = (nibble 2j, nibble 2j+1): the bytes' low and high nibbles in order k = 0..7
  // word bits: k0 = [0:4), k1 = [4:8), k2 = [8:12) ... : byte j holds k 2j (low) and 2j+1.
  uint32_t t0 = (w & lo) | magic;               // k0 (bits 0-3) and k4 (bits 16-19)
  uint32_t t1 = ((w >> 4) & lo) | magic;        // k1, k5
  uint32_t t2 = ((w >> 8) & lo) | magic;        // k2, k6
  uint32_t t3 = ((w >> 12) & lo) | magic;       // k3, k7
  half2 a = __hsub2(*reinterpret_cast<half2*>(&t0), bias);
  half2 b = __hsub2(*reinterpret_cast<half2*>(&t1), bias);
  half2 c = __hsub2(*reinterpret_cast<half2*>(&t2), bias);
  half2 d = __hsub2(*reinterpret_cast<half2*>(&t3), bias);
  out[0] = __lows2half2(a, b);    // k0, k1
  out[1] = __lows2half2(c, d);    // k2, k3
  out[2] = __highs2half2(a, b);   // k4, k5
  out[3] = __highs2half2(c, d);   // k6, k7
}

// ---- v1/v2: a warp owns F whole rows (G = 32 U groups: lane l holds groups l + 32u), all
// F*U weight loads issued before any math; x read per group from L1. ACC_H: accumulate each
// group's 32 products in half2 (else float).
template <int F, int U, bool ACC_H>
__global__ void __launch_bounds__(128) gemv_rows(const half* __restrict__ x,
                                                  const uint4* __restrict__ qw,
                                                  const half* __restrict__ qs,
                                                  float* __restrict__ out, int N, int K) {
  const int warp = blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = warp * F;
  if (row0 >= N) return;
  const int groups = 32 * U;
  uint4 w[F][U];
  half s[F][U];
#pragma unroll
  for (int f = 0; f < F; ++f)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t off = static_cast<int64_t>(row0 + f) * groups + lane + 32 * u;
      w[f][u] = __ldg(qw + off);
      s[f][u] = qs[off];
    }
  float acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint4* xv = reinterpret_cast<const uint4*>(x + (lane + 32 * u) * kGroup);
    uint4 xx[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xx[i] = __ldg(xv + i);
    const half2* xh = reinterpret_cast<const half2*>(xx);    // 16 half2 = 32 k
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const uint32_t words[4] = {w[f][u].x, w[f][u].y, w[f][u].z, w[f][u].w};
      if (ACC_H) {
        half2 p = __float2half2_rn(0.f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          half2 d[4];
          dequant_word(words[i], d);
#pragma unroll
          for (int j = 0; j < 4; ++j) p = __hfma2(xh[4 * i + j], d[j], p);
        }
        const float2 pf = __half22float2(p);
        acc[f] = fmaf(pf.x + pf.y, __half2float(s[f][u]), acc[f]);
      } else {
        float p = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          half2 d[4];
          dequant_word(words[i], d);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 a = __half22float2(xh[4 * i + j]);
            const float2 b = __half22float2(d[j]);
            p = fmaf(a.x, b.x, fmaf(a.y, b.y, p));
          }
        }
        acc[f] = fmaf(p, __half2float(s[f][u]), acc[f]);
      }
    }
  }
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[f] += __shfl_xor_sync(0xffffffffu, acc[f], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int f = 0; f < F; ++f)
      if (row0 + f < N) out[row0 + f] = acc[f];
  }
}

// ---- v3: general K (any multiple of 32): a warp owns F rows; lane l takes groups l + 32u in
// chunks of UC, the next chunk's weights loaded before the current chunk's math (so 2*F*UC
// 16-byte loads can be in flight); products x*w in half2 (exact-ish: one rounding per
// product, w is a small integer), sums in float.
template <int F, int UC>
__device__ __forceinline__ void load_chunk(const uint4* __restrict__ qw, const half* __restrict__ qs,
                                           int row0, int N, int G, int g0, uint4 (&w)[F][UC],
                                           half (&s)[F][UC]) {
#pragma unroll
  for (int f = 0; f < F; ++f)
#pragma unroll
    for (int u = 0; u < UC; ++u) {
      const int g = g0 + 32 * u;
      const bool ok = g < G && row0 + f < N;
      const int64_t off = static_cast<int64_t>(row0 + f) * G + g;
      w[f][u] = ok ? __ldg(qw + off) : make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);
      s[f][u] = ok ? qs[off] : __float2half(0.f);
    }
}

template <int F, int UC, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) gemv_gen(const half* __restrict__ x,
                                                        const uint4* __restrict__ qw,
                                                        const half* __restrict__ qs,
                                                        float* __restrict__ out, int N, int K) {
  const int warp = blockIdx.x * WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = warp * F;
  if (row0 >= N) return;
  const int G = K / kGroup;
  float acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = 0.f;
  uint4 w[F][UC], wn[F][UC];
  half s[F][UC], sn[F][UC];
  load_chunk<F, UC>(qw, qs, row0, N, G, lane, w, s);
  for (int c0 = 0; c0 < G; c0 += 32 * UC) {
    const bool more = c0 + 32 * UC < G;
    if (more) load_chunk<F, UC>(qw, qs, row0, N, G, c0 + 32 * UC + lane, wn, sn);
#pragma unroll
    for (int u = 0; u < UC; ++u) {
      const int g = c0 + lane + 32 * u;
      if (g >= G) break;
      const uint4* xv = reinterpret_cast<const uint4*>(x + g * kGroup);
      uint4 xx[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) xx[i] = __ldg(xv + i);
      const half2* xh = reinterpret_cast<const half2*>(xx);
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const uint32_t words[4] = {w[f][u].x, w[f][u].y, w[f][u].z, w[f][u].w};
        float2 p = make_float2(0.f, 0.f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          half2 d[4];
          dequant_word(words[i], d);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 m = __half22float2(__hmul2(xh[4 * i + j], d[j]));
            p.x += m.x;
            p.y += m.y;
          }
        }
        acc[f] = fmaf(p.x + p.y, __half2float(s[f][u]), acc[f]);
      }
    }
    if (more) {
#pragma unroll
      for (int f = 0; f < F; ++f)
#pragma unroll
        for (int u = 0; u < UC; ++u) {
          w[f][u] = wn[f][u];
          s[f][u] = sn[f][u];
        }
    }
  }
#pragma unroll
  for (int f = 0; f < F; ++f) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[f] += __shfl_xor_sync(0xffffffffu, acc[f], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int f = 0; f < F; ++f)
      if (row0 + f < N) out[row0 + f] = acc[f];
  }
}

struct Shape { const char* name; int N, K; };

template <typename Launch>
void run(const char* variant, const Shape& sh, Launch launch, int copies,
         const std::vector<uint4*>& W, const std::vector<half*>& S, const half* x, float* out,
         const std::vector<double>& ref) {
  // correctness on copy 0
  CHECK(cudaMemset(out, 0xff, sh.N * sizeof(float)));
  launch(x, W[0], S[0], out);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> got(sh.N);
  CHECK(cudaMemcpy(got.data(), out, sh.N * sizeof(float), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int n = 0; n < sh.N; ++n) {
    num += (got[n] - ref[n]) * (got[n] - ref[n]);
    den += ref[n] * ref[n];
  }
  const double rel = std::sqrt(num / den);
  // timing: 20 passes over all copies, median of per-pass times
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int rep = 0; rep < 21; ++rep) {
    CHECK(cudaEventRecord(a));
    for (int c = 0; c < copies; ++c) launch(x, W[c], S[c], out);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (rep) ms.push_back(t / copies);
  }
  std::sort(ms.begin(), ms.end());
  const double t = ms[ms.size() / 2] * 1e-3;
  const double bytes = double(sh.N) * sh.K / 2 + double(sh.N) * (sh.K / 32) * 2;
  printf("%-10s %-12s N=%6d K=%6d  %8.2f us  %7.0f GB/s  rel.err %.2e%s\n", sh.name, variant,
         sh.N, sh.K, t * 1e6, bytes / t / 1e9, rel, rel < 2e-3 ? "" : "  <-- WRONG");
}

int main() {
  const Shape shapes[] = {{"qkv", 6144, 4096}, {"o_proj", 4096, 4096},
                          {"gate_up", 28672, 4096}, {"down", 4096, 14336},
                          {"lm_head", 128256, 4096}, {"odd", 2880, 2880}};
  std::mt19937 rng(0);
  for (const Shape& sh : shapes) {
    const int64_t G = sh.K / 32;
    const int64_t wbytes = sh.N * G * 16, sbytes = sh.N * G * 2;
    const int copies = std::max<int64_t>(2, (300ll << 20) / (wbytes + sbytes));
    std::vector<uint32_t> hw(sh.N * G * 4);
    std::vector<half> hs(sh.N * G);
    std::vector<half> hx(sh.K);
    for (auto& v : hw) v = rng();
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : hs) v = __float2half(0.02f * std::fabs(nd(rng)) + 0.001f);
    for (auto& v : hx) v = __float2half(nd(rng));
    std::vector<double> ref(sh.N);
    for (int n = 0; n < sh.N; ++n) {
      double acc = 0;
      for (int g = 0; g < G; ++g) {
        double part = 0;
        for (int i = 0; i < 32; ++i) {
          const uint32_t word = hw[(n * G + g) * 4 + i / 8];
          const int q = (word >> (4 * (i % 8))) & 15;
          part += double(__half2float(hx[g * 32 + i])) * (q - 7);
        }
        acc += part * double(__half2float(hs[n * G + g]));
      }
      ref[n] = acc;
    }
    std::vector<uint4*> W(copies);
    std::vector<half*> S(copies);
    for (int c = 0; c < copies; ++c) {
      CHECK(cudaMalloc(&W[c], wbytes));
      CHECK(cudaMalloc(&S[c], sbytes));
      CHECK(cudaMemcpy(W[c], hw.data(), wbytes, cudaMemcpyHostToDevice));
      CHECK(cudaMemcpy(S[c], hs.data(), sbytes, cudaMemcpyHostToDevice));
    }
    half* x;
    float* out;
    CHECK(cudaMalloc(&x, sh.K * 2));
    CHECK(cudaMalloc(&out, sh.N * 4));
    CHECK(cudaMemcpy(x, hx.data(), sh.K * 2, cudaMemcpyHostToDevice));
    const int N = sh.N, K = sh.K;
    run("v0", sh, [&](const half* xx, uint4* w, half* s, float* o) {
      gemv_v0<<<(N + 3) / 4, 128>>>(xx, w, s, o, N, K); }, copies, W, S, x, out, ref);
#define ROWS(F, U, H, label)                                                             \
    run(label, sh, [&](const half* xx, uint4* w, half* s, float* o) {                    \
      gemv_rows<F, U, H><<<(N / F + 3) / 4, 128>>>(xx, w, s, o, N, K); }, copies, W, S, x, out, ref);
    if (K == 4096) {
      ROWS(2, 4, false, "r2u4 f32");
      ROWS(2, 4, true, "r2u4 h16");
    } else if (K == 14336) {
      ROWS(2, 14, false, "r2u14 f32");
    }
#define GEN(F, UC, WP, label)                                                            \
    run(label, sh, [&](const half* xx, uint4* w, half* s, float* o) {                    \
      gemv_gen<F, UC, WP><<<(N + F * WP - 1) / (F * WP), WP * 32>>>(xx, w, s, o, N, K); }, copies, W, S, x, out, ref);
    GEN(2, 4, 4, "g2c4w4");
    GEN(2, 4, 8, "g2c4w8");
    GEN(2, 2, 4, "g2c2w4");
    GEN(4, 2, 4, "g4c2w4");
    GEN(4, 4, 4, "g4c4w4");
    GEN(1, 8, 4, "g1c8w4");
    for (int c = 0; c < copies; ++c) {
      CHECK(cudaFree(W[c]));
      CHECK(cudaFree(S[c]));
    }
    CHECK(cudaFree(x));
    CHECK(cudaFree(out));
  }
  return 0;
}
