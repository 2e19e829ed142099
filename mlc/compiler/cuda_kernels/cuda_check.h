// What every mlc CUDA kernel source shares. cuda_support.py compiles each .cu file on its own;
// a change here rebuilds them all (the headers are part of each object's cache key).
#pragma once

#include <cuda_runtime.h>

#include <tvm/ffi/error.h>

// A failed CUDA runtime call becomes a TVM error naming the CUDA error.
#define MLC_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    TVM_FFI_ICHECK(err_ == cudaSuccess) << "CUDA error: " << cudaGetErrorString(err_); \
  } while (0)
