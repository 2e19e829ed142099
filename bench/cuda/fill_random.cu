// Random tensors generated on the GPU, for the benchmark scripts in bench/ (not part of mlc's
// libraries): a counter-based hash, so the same seed gives the same tensor. uint32 tensors get
// random bits; float tensors a uniform value in [lo, hi). Built and loaded by
// bench/cuda_fill.py, which registers
//
//   mlc.bench.fill_random(tensor, seed, lo, hi)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include "cuda_check.h"

namespace mlc_bench {
namespace {
using tvm::ffi::TensorView;

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
}  // namespace mlc_bench

TVM_FFI_STATIC_INIT_BLOCK() {
  using tvm::ffi::Function;
  Function::SetGlobal("mlc.bench.fill_random", Function::FromTyped(mlc_bench::FillRandom),
                      true);
}
