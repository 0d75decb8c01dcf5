// Large CPU outputs from a small cache of buffers (see output_buffers.cpp for why).
#pragma once

#include <ATen/ATen.h>

namespace fastattn {
namespace cpu {

// at::empty(sizes, options) for an op's output, contiguous. Tensors of other devices are plain
// at::empty (the cache holds host memory). CPU buffers of at least 8 MiB come from a cache of
// buffers that earlier outputs released, so the memory is already mapped: a fresh allocation
// of that size costs first-touch page faults (the kernel zeroing every page) that take longer
// than a memory-bound kernel itself. The tensor's storage is an ordinary resizable one (resize_,
// out=): growing it takes a new buffer the same way and returns the old one to the cache.
// FASTATTN_CPU_OUTPUT_CACHE=0 turns the cache off.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Buffers held by the cache now, and the most it may hold now (for tests and diagnostics).
struct OutputCacheStats {
  int64_t buffers = 0;
  int64_t bytes = 0;
  int64_t cap_bytes = 0;
};
OutputCacheStats output_cache_stats();

// Frees every buffer the cache holds (fastattn.empty_cache()). Live outputs are not affected;
// their buffers return to the cache when they are released.
void empty_output_cache();

}  // namespace cpu
}  // namespace fastattn
