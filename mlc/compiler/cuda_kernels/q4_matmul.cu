// mlc's CUDA kernels for quantized and half-precision linear layers, linked into CUDA model
// libraries and registered as TVM FFI global functions (called with call_dps_packed):
//
//   mlc.cuda.q4_matmul(x[M,K] f16, q_weight[N,K/8] u32, q_scale[N,K/32] f16, out[M,N] f16|f32)
//   mlc.cuda.f16_matmul(x[M,K] f16, weight[N,K] f16, out[M,N] f16|f32)
//   mlc.cuda.fill_random(tensor, seed, lo, hi)       (dummy weights made on the device)
//
// y = x W^T with float32 accumulation. q4 weights: groups of 32 along K, value = (nibble - 7) *
// scale, eight nibbles per uint32, the first in the lowest bits (MLC-LLM's q4f16_1).
// Few rows (decode): a fused dequantize-GEMV reads each 4-bit weight once with 128-bit loads.
// Many rows (prefill): dequantize to a float16 workspace, then cuBLAS on the tensor cores.
// cuBLAS is opened with dlopen at first use, so a library loads on machines without it.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdint>
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <string>
#include <unordered_map>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

namespace mlc {
namespace {

using tvm::ffi::TensorView;

constexpr int kGroup = 32;
constexpr int kMaxGemvRows = 8;    // rows handled by one pass of the fused GEMV
constexpr int kGemvMaxM = 8;       // up to this, the fused GEMV; above, dequantize + cuBLAS

#define MLC_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    TVM_FFI_ICHECK(err_ == cudaSuccess) << "CUDA error: " << cudaGetErrorString(err_); \
  } while (0)

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

// One row (batch-1 decode): a warp per output feature, lanes striding over groups; no shared
// memory and no barriers, so many independent 16-byte loads are in flight.
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
  if (lane == 0) out[n] = OutT(acc);
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
    q4_gemv1_kernel<OutT><<<(N + 3) / 4, 128, 0, stream>>>(x, w, qs, out, N, K);
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

// ---------------------------------------------------------------------------------------------
// Random weights generated on the device (`mlc bench --dummy`): a counter-based hash, so the
// same seed gives the same tensor. uint32 tensors get random bits; float tensors a uniform
// value in [lo, hi).
// ---------------------------------------------------------------------------------------------
__device__ inline uint32_t mix32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

template <typename T>
__global__ void fill_random_kernel(T* out, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t r = mix32(seed * 0x9e3779b97f4a7c15ULL + i);
    if constexpr (std::is_same_v<T, uint32_t>) {
      out[i] = r;
    } else {
      out[i] = T(lo + (hi - lo) * (r * (1.0f / 4294967296.0f)));
    }
  }
}

void FillRandom(TensorView t, int64_t seed, double lo, double hi) {
  const int64_t n = t.numel();
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t.device().device_id));
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535));
  const DLDataType dt = t.dtype();
  if (n == 0) return;
  if (dt.code == kDLUInt && dt.bits == 32) {
    fill_random_kernel<<<blocks, 256, 0, stream>>>(static_cast<uint32_t*>(t.data_ptr()), n, seed,
                                                   0.f, 0.f);
  } else if (dt.code == kDLFloat && dt.bits == 16) {
    fill_random_kernel<<<blocks, 256, 0, stream>>>(static_cast<half*>(t.data_ptr()), n, seed,
                                                   float(lo), float(hi));
  } else if (dt.code == kDLFloat && dt.bits == 32) {
    fill_random_kernel<<<blocks, 256, 0, stream>>>(static_cast<float*>(t.data_ptr()), n, seed,
                                                   float(lo), float(hi));
  } else {
    TVM_FFI_THROW(ValueError) << "fill_random: unsupported dtype";
  }
  MLC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace
}  // namespace mlc

// Every CUDA model library carries these kernels: the library loaded last provides them
// (override), so loading two models in one process does not fail on a duplicate name.
TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  Function::SetGlobal("mlc.cuda.q4_matmul", Function::FromTyped(mlc::Q4Matmul), true);
  Function::SetGlobal("mlc.cuda.f16_matmul", Function::FromTyped(mlc::F16Matmul), true);
  Function::SetGlobal("mlc.cuda.fill_random", Function::FromTyped(mlc::FillRandom), true);
}
