// A cache of large CPU output buffers.
//
// A memory-bound op such as rotary writes its output once. When that output is large (tens of
// MiB and up), glibc hands out fresh mmap'ed memory every call and returns it to the OS on
// free, so each call pays a page fault per page and the kernel's zeroing of every page: on a
// 2-core EPYC VM that is more time than the rotary kernel (128 MiB: ~18 ms of faults against
// ~14 ms of work). Training loops call the op with the same shapes step after step, so
// keeping a few released buffers of each size and handing them out again removes that cost, as
// PyTorch's CUDA caching allocator does on the GPU.
//
// A buffer is only reused after the tensor that owned it is destroyed (the tensor's deleter
// returns it), so no two live tensors ever share memory. The cache is bounded (kMaxBuffers,
// kMaxBytes); past that, released buffers are freed. Contents of a reused buffer are stale:
// only ops that write every element of their output use this.
#include "cpu/output_buffers.h"

#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/checks.h"

namespace fastattn {
namespace cpu {
namespace {

constexpr size_t kCachedOutputMinBytes = size_t{8} << 20;  // smaller outputs fault cheaply
constexpr size_t kMaxBytes = size_t{2} << 30;
constexpr size_t kMaxBuffers = 8;
constexpr size_t kAlignment = 64;

struct Cache {
  std::mutex mutex;
  std::multimap<size_t, void*> free_buffers;  // size in bytes -> buffer
  size_t bytes = 0;
};

// Never destroyed: tensors released during interpreter shutdown still call release().
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

bool cache_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTATTN_CPU_OUTPUT_CACHE");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

// Transparent huge pages for the buffer's 2 MiB-aligned interior where Linux makes them
// opt-in: 512x fewer first-touch faults the first time a buffer is written. Only a hint.
void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)nbytes;
#endif
}

void* acquire(size_t nbytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free_buffers.find(nbytes);
    if (it != c.free_buffers.end()) {
      void* ptr = it->second;
      c.free_buffers.erase(it);
      c.bytes -= nbytes;
      return ptr;
    }
  }
  void* ptr = nullptr;
  FA_CHECK(posix_memalign(&ptr, kAlignment, nbytes) == 0 && ptr != nullptr,
           "fastattn: could not allocate ", nbytes, " bytes for an output");
  advise_huge_pages(ptr, nbytes);
  return ptr;
}

void release(void* ptr, size_t nbytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.free_buffers.size() < kMaxBuffers && c.bytes + nbytes <= kMaxBytes) {
      c.free_buffers.emplace(nbytes, ptr);
      c.bytes += nbytes;
      return;
    }
  }
  std::free(ptr);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Only CPU outputs: a CUDA kernel handed a host buffer faults (an illegal address).
  if (options.device().type() != at::kCPU) return at::empty(sizes, options);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kCachedOutputMinBytes) return at::empty(sizes, options);
  if (!cache_enabled()) {
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out.data_ptr(), nbytes);  // fewer first-touch faults at least
    return out;
  }
  void* ptr = acquire(nbytes);
  return at::from_blob(ptr, sizes, [nbytes](void* p) { release(p, nbytes); },
                       options.device(at::kCPU));
}

OutputCacheStats output_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.free_buffers.size()), static_cast<int64_t>(c.bytes)};
}

}  // namespace cpu
}  // namespace fastattn
