// A cache of large CPU output buffers.
//
// A memory-bound op such as rotary writes its output once. When that output is large (tens of
// MiB and up), glibc hands out fresh mmap'ed memory every call and returns it to the OS on
// free, so each call pays a page fault per page and the kernel's zeroing of every page: on a
// 2-core EPYC VM that is more time than the rotary kernel (128 MiB: ~18 ms of faults against
// ~14 ms of work). Training loops call the op with the same shapes step after step, so
// keeping a few released buffers and handing them out again removes that cost, as PyTorch's
// CUDA caching allocator does on the GPU.
//
// Outputs are ordinary tensors whose storage has this file's allocator: the storage is
// resizable (resize_, out=), and when it is freed (or resized) its buffer comes back here. A
// buffer is only reused after the storage that owned it released it, so no two live tensors
// ever share memory. Contents of a reused buffer are stale: only ops that write every element
// of their output use this.
//
// What the cache holds is bounded, since memory it holds is memory the process cannot use
// otherwise:
//  - buffer sizes are rounded up to 2 MiB, and a request takes a released buffer of its rounded
//    size, the most recently released first;
//  - at most kMaxBuffers buffers and cap_bytes() bytes: twice the largest buffer asked for in
//    the last 64 to 128 requests, at least 256 MiB and at most 1 GiB (a training step's
//    outputs and gradients of one shape fit; sizes no longer asked for stop counting). Past
//    that the least recently released buffers are freed;
//  - a buffer not reused within kMaxIdleRequests later requests or kMaxIdleSeconds is freed
//    (checked whenever the cache is used);
//  - fastattn.empty_cache() frees everything it holds.
#include "cpu/output_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/checks.h"

namespace fastattn {
namespace cpu {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kCachedOutputMinBytes = 8 * kMiB;  // smaller outputs fault cheaply
constexpr size_t kGranularity = 2 * kMiB;           // buffer sizes are rounded up to this
constexpr size_t kMaxBuffers = 8;
constexpr size_t kMinCapBytes = 256 * kMiB;
constexpr size_t kMaxCapBytes = 1024 * kMiB;
constexpr uint64_t kRecentRequests = 64;     // the window over which "recent" sizes count
constexpr uint64_t kMaxIdleRequests = 256;
constexpr double kMaxIdleSeconds = 10.0;
constexpr size_t kAlignment = 64;

struct FreeBuffer {
  void* ptr;
  size_t bytes;
  uint64_t released_at_request;  // the request count when it was released
  Clock::time_point released_at;
};

struct Cache {
  std::mutex mutex;
  std::vector<FreeBuffer> free_buffers;  // in release order: least recently released first
  size_t bytes = 0;
  uint64_t requests = 0;
  size_t window_max = 0;       // the largest buffer asked for in the current window
  size_t last_window_max = 0;  // ... and in the one before

  size_t cap_bytes() const {
    const size_t recent = std::max(window_max, last_window_max);
    return std::clamp(2 * recent, kMinCapBytes, kMaxCapBytes);
  }

  // Takes out of the cache (into `out`, to be freed without the lock) the buffers idle for too
  // long, then the least recently released ones while the cache is over its bounds.
  void evict(Clock::time_point now, std::vector<void*>& out) {
    const auto idle = [&](const FreeBuffer& b) {
      return requests - b.released_at_request > kMaxIdleRequests ||
             std::chrono::duration<double>(now - b.released_at).count() > kMaxIdleSeconds;
    };
    const size_t cap = cap_bytes();
    size_t kept = 0;
    for (size_t i = 0; i < free_buffers.size(); ++i) {
      FreeBuffer& b = free_buffers[i];
      const size_t count = kept + (free_buffers.size() - i);  // if this one stays
      if (idle(b) || bytes > cap || count > kMaxBuffers) {
        out.push_back(b.ptr);
        bytes -= b.bytes;
      } else {
        free_buffers[kept++] = b;
      }
    }
    free_buffers.resize(kept);
  }
};

// Never destroyed: tensors released during interpreter shutdown still call release().
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void free_all(const std::vector<void*>& buffers) {
  for (void* p : buffers) std::free(p);
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
  void* ptr = nullptr;
  std::vector<void*> evicted;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (++c.requests % kRecentRequests == 0) {
      c.last_window_max = c.window_max;
      c.window_max = 0;
    }
    c.window_max = std::max(c.window_max, nbytes);
    for (size_t i = c.free_buffers.size(); i-- > 0;) {
      if (c.free_buffers[i].bytes == nbytes) {
        ptr = c.free_buffers[i].ptr;
        c.free_buffers.erase(c.free_buffers.begin() + static_cast<std::ptrdiff_t>(i));
        c.bytes -= nbytes;
        break;
      }
    }
    c.evict(Clock::now(), evicted);
  }
  free_all(evicted);
  if (ptr != nullptr) return ptr;
  FA_CHECK(posix_memalign(&ptr, kAlignment, nbytes) == 0 && ptr != nullptr,
           "fastattn: could not allocate ", nbytes, " bytes for an output");
  advise_huge_pages(ptr, nbytes);
  return ptr;
}

void release(void* ptr, size_t nbytes) {
  std::vector<void*> evicted;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (nbytes > c.cap_bytes()) {
      evicted.push_back(ptr);  // never cached: it would push out everything else
    } else {
      c.free_buffers.push_back({ptr, nbytes, c.requests, Clock::now()});
      c.bytes += nbytes;
      c.evict(c.free_buffers.back().released_at, evicted);
    }
  }
  free_all(evicted);
}

// A DataPtr's context: the buffer and its (rounded) size, for release().
struct Buffer {
  void* ptr;
  size_t bytes;
};

void release_buffer(void* context) {
  std::unique_ptr<Buffer> b(static_cast<Buffer*>(context));
  release(b->ptr, b->bytes);
}

// The allocator of the outputs' storages: it hands out cached buffers, and is also what
// resize_ asks for a larger one.
class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kCachedOutputMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kGranularity - 1) / kGranularity * kGranularity;
    auto context = std::make_unique<Buffer>(Buffer{nullptr, bytes});
    context->ptr = acquire(bytes);
    void* data = context->ptr;
    return {data, context.release(), &release_buffer, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

OutputAllocator& output_allocator() {
  static OutputAllocator* a = new OutputAllocator();  // outlives every storage that uses it
  return *a;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Only CPU outputs: a CUDA kernel handed a host buffer faults (an illegal address).
  if (options.device().type() != at::kCPU) return at::empty(sizes, options);
  uint64_t numel = 1;
  const bool overflows = c10::safe_multiplies_u64(sizes, &numel);
  uint64_t nbytes = 0;
  if (overflows || c10::mul_overflows(numel, static_cast<uint64_t>(options.dtype().itemsize()),
                                      &nbytes)) {
    return at::empty(sizes, options);  // let ATen raise its own error
  }
  if (nbytes < kCachedOutputMinBytes) return at::empty(sizes, options);
  if (!cache_enabled()) {
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out.data_ptr(), nbytes);  // fewer first-touch faults at least
    return out;
  }
  return at::Tensor(at::detail::empty_generic(sizes, &output_allocator(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              options.dtype().toScalarType(), std::nullopt));
}

OutputCacheStats output_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.free_buffers.size()), static_cast<int64_t>(c.bytes),
          static_cast<int64_t>(c.cap_bytes())};
}

void empty_output_cache() {
  std::vector<void*> buffers;
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    for (const FreeBuffer& b : c.free_buffers) buffers.push_back(b.ptr);
    c.free_buffers.clear();
    c.bytes = 0;
  }
  free_all(buffers);
}

}  // namespace cpu
}  // namespace fastattn
