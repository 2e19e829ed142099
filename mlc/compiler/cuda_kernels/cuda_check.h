// What every mlc CUDA kernel source shares. cuda_support.py compiles each .cu file on its own;
// a change here rebuilds them all (the headers are part of each object's cache key).
#pragma once

#include <cstdlib>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <string>

#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

// The digest of the kernel sources this object was built from (cuda_support.py passes it).
#ifndef MLC_KERNEL_DIGEST
#define MLC_KERNEL_DIGEST "dev"
#endif

// A failed CUDA runtime call becomes a TVM error naming the CUDA error.
#define MLC_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    TVM_FFI_ICHECK(err_ == cudaSuccess) << "CUDA error: " << cudaGetErrorString(err_); \
  } while (0)

// Registration of a kernel as process-global functions. Every CUDA model library links these
// kernels in, and several libraries (a target and its draft model) load into one process:
// - the library calls `mlc.cuda.<digest>.<name>`, the digest naming the kernel sources, so two
//   libraries built from different kernel code each call their own; libraries with identical
//   code share the first registration (a second one is skipped, never overridden);
// - `mlc.cuda.<name>` (for benchmarks and tests) is the first library's, never replaced;
// - a library that registers anything stays loaded for the life of the process
//   (RTLD_NODELETE), so no registered function ever points into unloaded code.
namespace mlc {
namespace {
int pin_anchor = 0;

// MLC_BATCH_INVARIANT=1 (read once per process): kernels pick their path and work split
// without looking at how many rows or sequences share a call, so a row's result is the same
// bits alone or batched (a seeded request then samples the same tokens either way), at some
// cost in speed (batch 1 leaves the one-row GEMV for the tensor-core kernel).
inline bool BatchInvariant() {
  static const bool on = [] {
    const char* env = std::getenv("MLC_BATCH_INVARIANT");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}

inline void PinThisLibrary() {
  Dl_info info;
  if (dladdr(&pin_anchor, &info) && info.dli_fname != nullptr) {
    dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
}

inline void RegisterKernel(const char* name, tvm::ffi::Function f) {
  using tvm::ffi::Function;
  bool registered = false;
  for (const std::string& full : {std::string("mlc.cuda." MLC_KERNEL_DIGEST ".") + name,
                                  std::string("mlc.cuda.") + name}) {
    if (!Function::GetGlobal(full).has_value()) {
      Function::SetGlobal(full, f, /*can_override=*/false);
      registered = true;
    }
  }
  if (registered) PinThisLibrary();
}
}  // namespace
}  // namespace mlc
