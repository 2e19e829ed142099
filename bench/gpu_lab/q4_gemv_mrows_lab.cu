// Standalone lab for the few-row q4 GEMV (y = x W^T, x with M = 1..8 rows, q4f16_1 weights):
// does reading each weight once for M rows keep the one-row kernel's bandwidth? Variants on
// Llama-3-8B shapes, checked against a float64 CPU reference, timed with CUDA events over
// rotating weight copies (> 5x the L2). No TVM needed:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o q4_gemv_mrows_lab q4_gemv_mrows_lab.cu && ./q4_gemv_mrows_lab
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


// A warp owns F whole rows of W (K = 1024 U: lane l holds groups l + 32u), all F*U 16-byte
// weight loads issued first; each word is dequantized once and multiplied with the matching
// 8 values of every one of the M rows of x (read from L1), products and sums in float.
template <int M, int F, int U>
__global__ void __launch_bounds__(128) gemv_mrows(const half* __restrict__ x,
                                                   const uint4* __restrict__ qw,
                                                   const half* __restrict__ qs,
                                                   float* __restrict__ out, int N) {
  constexpr int G = 32 * U, K = G * kGroup;
  const int row0 = (blockIdx.x * 4 + threadIdx.x / 32) * F;
  const int lane = threadIdx.x % 32;
  if (row0 >= N) return;
  uint4 w[F][U];
  half s[F][U];
#pragma unroll
  for (int f = 0; f < F; ++f)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t off = static_cast<int64_t>(min(row0 + f, N - 1)) * G + lane + 32 * u;
      w[f][u] = __ldg(qw + off);
      s[f][u] = qs[off];
    }
  float acc[M][F];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int f = 0; f < F; ++f) acc[m][f] = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float p[M][F];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int f = 0; f < F; ++f) p[m][f] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 b[F][4];
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const uint32_t word = i == 0 ? w[f][u].x : i == 1 ? w[f][u].y : i == 2 ? w[f][u].z : w[f][u].w;
        half2 d[4];
        dequant_word(word, d);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[f][j] = __half22float2(d[j]);
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xx = __ldg(reinterpret_cast<const uint4*>(
            x + static_cast<int64_t>(m) * K + (lane + 32 * u) * kGroup) + i);
        const half2* xh = reinterpret_cast<const half2*>(&xx);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 a = __half22float2(xh[j]);
#pragma unroll
          for (int f = 0; f < F; ++f) p[m][f] = fmaf(a.x, b[f][j].x, fmaf(a.y, b[f][j].y, p[m][f]));
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int f = 0; f < F; ++f) acc[m][f] = fmaf(p[m][f], __half2float(s[f][u]), acc[m][f]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int f = 0; f < F; ++f) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        acc[m][f] += __shfl_xor_sync(0xffffffffu, acc[m][f], off);
      if (lane == 0 && row0 + f < N) out[static_cast<int64_t>(m) * N + row0 + f] = acc[m][f];
    }
}

struct Shape { const char* name; int N, K; };

template <typename Launch>
void run(const char* variant, const Shape& sh, int M, Launch launch, int copies,
         const std::vector<uint4*>& W, const std::vector<half*>& S, const half* x, float* out,
         const std::vector<double>& ref) {
  CHECK(cudaMemset(out, 0xff, static_cast<size_t>(M) * sh.N * sizeof(float)));
  launch(x, W[0], S[0], out);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> got(static_cast<size_t>(M) * sh.N);
  CHECK(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (size_t n = 0; n < got.size(); ++n) {
    num += (got[n] - ref[n]) * (got[n] - ref[n]);
    den += ref[n] * ref[n];
  }
  const double rel = std::sqrt(num / den);
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
  printf("%-8s M=%d %-8s N=%6d K=%6d  %8.2f us  %7.0f GB/s  rel.err %.2e%s\n", sh.name, M,
         variant, sh.N, sh.K, t * 1e6, bytes / t / 1e9, rel, rel < 2e-3 ? "" : "  <-- WRONG");
}

int main() {
  const Shape shapes[] = {{"qkv", 6144, 4096}, {"o_proj", 4096, 4096},
                          {"gate_up", 28672, 4096}, {"down", 4096, 14336},
                          {"lm_head", 128256, 4096}};
  constexpr int kMaxM = 8;
  std::mt19937 rng(0);
  for (const Shape& sh : shapes) {
    const int64_t G = sh.K / 32;
    const int64_t wbytes = sh.N * G * 16, sbytes = sh.N * G * 2;
    const int copies = std::max<int64_t>(2, (300ll << 20) / (wbytes + sbytes));
    std::vector<uint32_t> hw(sh.N * G * 4);
    std::vector<half> hs(sh.N * G);
    std::vector<half> hx(static_cast<size_t>(kMaxM) * sh.K);
    for (auto& v : hw) v = rng();
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& v : hs) v = __float2half(0.02f * std::fabs(nd(rng)) + 0.001f);
    for (auto& v : hx) v = __float2half(nd(rng));
    std::vector<double> ref(static_cast<size_t>(kMaxM) * sh.N);
    std::vector<double> wd(sh.K);
    for (int n = 0; n < sh.N; ++n) {
      for (int k = 0; k < sh.K; ++k) {
        const uint32_t word = hw[(n * G + k / 32) * 4 + (k % 32) / 8];
        wd[k] = (((word >> (4 * (k % 8))) & 15) - 7.0) * double(__half2float(hs[n * G + k / 32]));
      }
      for (int m = 0; m < kMaxM; ++m) {
        double acc = 0;
        for (int k = 0; k < sh.K; ++k) acc += double(__half2float(hx[m * sh.K + k])) * wd[k];
        ref[static_cast<size_t>(m) * sh.N + n] = acc;
      }
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
    CHECK(cudaMalloc(&x, hx.size() * 2));
    CHECK(cudaMalloc(&out, ref.size() * 4));
    CHECK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    const int N = sh.N;
#define MROWS(M, F, U)                                                                    \
    run("F" #F, sh, M, [&](const half* xx, uint4* w, half* s, float* o) {                \
      gemv_mrows<M, F, U><<<(N / F + 3) / 4, 128>>>(xx, w, s, o, N); }, copies, W, S, x, out, ref);
    if (sh.K == 4096) {
      MROWS(1, 2, 4) MROWS(2, 2, 4) MROWS(2, 4, 4) MROWS(3, 2, 4) MROWS(3, 4, 4)
      MROWS(4, 2, 4) MROWS(4, 4, 4) MROWS(6, 2, 4) MROWS(8, 2, 4) MROWS(8, 4, 4)
    } else {
      MROWS(1, 2, 14) MROWS(2, 2, 14) MROWS(3, 2, 14) MROWS(4, 2, 14) MROWS(4, 1, 14)
      MROWS(8, 1, 14) MROWS(8, 2, 14)
    }
    for (int c = 0; c < copies; ++c) {
      CHECK(cudaFree(W[c]));
      CHECK(cudaFree(S[c]));
    }
    CHECK(cudaFree(x));
    CHECK(cudaFree(out));
  }
  return 0;
}
