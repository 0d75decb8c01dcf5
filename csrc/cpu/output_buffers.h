// Large CPU outputs from a small cache of buffers (see output_buffers.cpp for why).
#pragma once

#include <ATen/ATen.h>

namespace fastattn {
namespace cpu {

// at::empty(sizes, options) for an op's output, contiguous. Tensors of other devices are plain
// at::empty (the cache holds host memory). CPU buffers of at least
// kCachedOutputMinBytes come from a cache of buffers that earlier outputs of the same size
// released, so the memory is already mapped: a fresh allocation of that size costs first-touch
// page faults (the kernel zeroing every page) that take longer than a memory-bound kernel
// itself. FASTATTN_CPU_OUTPUT_CACHE=0 turns the cache off.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Buffers held by the cache now (for tests and diagnostics): count and bytes.
struct OutputCacheStats {
  int64_t buffers = 0;
  int64_t bytes = 0;
};
OutputCacheStats output_cache_stats();

}  // namespace cpu
}  // namespace fastattn
