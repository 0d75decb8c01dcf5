// A small CPU emulator of CUDA thread blocks, for running fastattn's CUDA attention kernels
// on a machine without a GPU (development aid; not part of any build).
//
// Included by csrc/cuda/attention_utils.cuh when FASTATTN_CUDA_EMULATION is defined and the
// kernel headers (and attention_api.cu) are compiled by a host C++ compiler. Each CUDA thread
// of a block is a user-level fiber (ucontext); __syncthreads / __syncwarp are barriers of a
// cooperative scheduler (deadlocks, e.g. a divergent barrier, abort with a message);
// __shfl_xor_sync and mma.sync.m16n8k16 exchange registers through per-warp buffers, the mma
// using the fragment layout of the PTX ISA. Shared memory is filled with NaN bytes before each
// block, so reads of unwritten shared memory show up as NaN; cp.async copies complete at the
// cp.async.wait_group that covers their group, and their destination reads as NaN until then. Fibers run in ascending,
// descending or random order between barriers (FASTATTN_EMU_SCHEDULE=0/1/2), which exposes
// missing barriers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <ucontext.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace fastattn_emulation {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// One 16-byte cp.async in flight: its destination holds NaN bytes until the copy completes.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;  // null: zero fill (src-size 0)
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  int waiting = 0;  // 0: runnable, 1: at a block barrier, 2: at a warp barrier
  uint64_t wait_gen = 0;
  bool done = false;
  std::vector<AsyncCopy> open_copies;              // issued since the last commit
  std::deque<std::vector<AsyncCopy>> copy_groups;  // committed, oldest first
};

struct BlockState {
  int nthreads = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  int vote_pending = 0;  // __syncthreads_or: the OR so far of this barrier's predicates
  int vote_result = 0;   // and of the last one completed
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<std::array<uint64_t, 32>> shfl;
  std::vector<std::array<std::array<uint32_t, 6>, 32>> mma;
  std::function<void()> body;
};

inline BlockState g_block;
inline std::vector<unsigned char> g_smem;
inline Dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;
inline int64_t g_barriers = 0;

inline unsigned char* dynamic_smem() { return g_smem.data(); }

inline void yield() {
  BlockState& B = g_block;
  swapcontext(&B.fibers[B.current].ctx, &B.scheduler);
}

// A block barrier that also ORs a predicate over the block (__syncthreads_or). The last thread
// to arrive publishes the result before any thread resumes, and every thread reads it as soon
// as it resumes (a fiber only switches at barriers), so the next vote cannot overwrite it first.
inline int block_vote_or(int predicate) {
  BlockState& B = g_block;
  Fiber& f = B.fibers[B.current];
  B.vote_pending |= predicate != 0 ? 1 : 0;
  f.waiting = 1;
  f.wait_gen = B.block_gen;
  ++g_barriers;
  if (++B.block_arrived == B.nthreads) {
    B.block_arrived = 0;
    ++B.block_gen;
    B.vote_result = B.vote_pending;
    B.vote_pending = 0;
  }
  yield();
  return B.vote_result;
}

// __syncthreads: a vote whose answer nobody reads.
inline void block_barrier() { block_vote_or(0); }

inline void warp_barrier() {
  BlockState& B = g_block;
  const int w = B.current / 32;
  Fiber& f = B.fibers[B.current];
  f.waiting = 2;
  f.wait_gen = B.warp_gen[w];
  if (++B.warp_arrived[w] == 32) {
    B.warp_arrived[w] = 0;
    ++B.warp_gen[w];
  }
  yield();
}

// cp.async as the PTX ISA defines it, per thread: a copy is issued into the open group,
// cp.async.commit_group closes that group, cp.async.wait_group N completes every committed group
// but the newest N. Until its copy completes, a destination holds NaN bytes, so a read that
// comes too early (no wait, or no barrier after another thread's wait) and a copy issued into a
// buffer that other threads still read (no barrier before the issue) both show up as NaN.
// Copies still in flight when a thread exits complete then.
inline void complete_copies(const std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& c : copies) {
    if (c.src != nullptr) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
}
inline void cp_async_16(void* dst, const void* src, bool valid) {
  Fiber& f = g_block.fibers[g_block.current];
  std::memset(dst, 0xff, 16);
  f.open_copies.push_back({static_cast<unsigned char*>(dst), valid ? static_cast<const unsigned char*>(src) : nullptr});
}
inline void cp_async_commit() {
  Fiber& f = g_block.fibers[g_block.current];
  f.copy_groups.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}
inline void cp_async_wait(int pending) {
  Fiber& f = g_block.fibers[g_block.current];
  while (static_cast<int>(f.copy_groups.size()) > pending) {
    complete_copies(f.copy_groups.front());
    f.copy_groups.pop_front();
  }
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  const unsigned short u = static_cast<unsigned short>(bits & 0xffffu);
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the documented fragment layout.
inline int64_t g_mmas = 0;  // warp-wide tensor-core products run (a work count for tests)

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  BlockState& B = g_block;
  const int w = B.current / 32, lane = B.current % 32;
  if (lane == 0) ++g_mmas;
  auto& slot = B.mma[w][lane];
  for (int r = 0; r < 4; ++r) slot[r] = a[r];
  slot[4] = b[0];
  slot[5] = b[1];
  warp_barrier();
  float A[16][16], Bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const auto& s = B.mma[w][l];
    auto lo = [&](uint32_t v) { return half_bits_to_float(v, bf16); };
    auto hi = [&](uint32_t v) { return half_bits_to_float(v >> 16, bf16); };
    A[g][2 * t] = lo(s[0]);
    A[g][2 * t + 1] = hi(s[0]);
    A[g + 8][2 * t] = lo(s[1]);
    A[g + 8][2 * t + 1] = hi(s[1]);
    A[g][2 * t + 8] = lo(s[2]);
    A[g][2 * t + 9] = hi(s[2]);
    A[g + 8][2 * t + 8] = lo(s[3]);
    A[g + 8][2 * t + 9] = hi(s[3]);
    Bm[2 * t][g] = lo(s[4]);
    Bm[2 * t + 1][g] = hi(s[4]);
    Bm[2 * t + 8][g] = lo(s[5]);
    Bm[2 * t + 9][g] = hi(s[5]);
  }
  warp_barrier();  // every lane has read the fragments before they are overwritten
  const int g = lane / 4, t = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + (r % 2);
    float acc = d[r];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * Bm[k][col];
    d[r] = acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8m..8m+7 address the rows of matrix
// m; lane 4g+t receives (g, 2t), (g, 2t+1) of each matrix, or (2t, g), (2t+1, g) with .trans.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  BlockState& B = g_block;
  const int w = B.current / 32, lane = B.current % 32;
  B.shfl[w][lane] = reinterpret_cast<uint64_t>(row_addr);
  warp_barrier();
  const int g = lane / 4, t = lane % 4;
  for (int m = 0; m < 4; ++m) {
    auto row = [&](int i) { return reinterpret_cast<const uint16_t*>(B.shfl[w][8 * m + i]); };
    const uint16_t lo = trans ? row(2 * t)[g] : row(g)[2 * t];
    const uint16_t hi = trans ? row(2 * t + 1)[g] : row(g)[2 * t + 1];
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_barrier();  // every lane has read the addresses before they are overwritten
}

// The backward's ordered dQ accumulation (wait_for_turn in attention_utils.cuh): blocks run
// one after the other here, and take their work in that order (tickets), so every earlier
// block has passed its turn already and the counter must equal the turn exactly; anything
// else is a wrong turn number.
inline void check_turn(int counter, int turn) {
  if (counter != turn) {
    std::fprintf(stderr, "fastattn emulator: block %u waits for turn %d but the counter is at %d\n",
                 g_block_idx.x, turn, counter);
    std::abort();
  }
}

inline void fiber_entry() {
  BlockState& B = g_block;
  B.body();
  Fiber& f = B.fibers[B.current];
  for (const auto& group : f.copy_groups) complete_copies(group);
  complete_copies(f.open_copies);
  f.copy_groups.clear();
  f.open_copies.clear();
  f.done = true;
  // returning switches to uc_link (the scheduler)
}

inline int schedule_mode() {
  const char* s = std::getenv("FASTATTN_EMU_SCHEDULE");
  return s ? std::atoi(s) : 0;
}

// Runs `body` as one block of `threads` threads.
inline void run_block(int threads, const std::function<void()>& body, std::mt19937& rng) {
  BlockState& B = g_block;
  B.nthreads = threads;
  B.fibers.resize(threads);
  B.body = body;
  B.block_arrived = 0;
  B.block_gen = 0;
  const int warps = (threads + 31) / 32;
  B.warp_arrived.assign(warps, 0);
  B.warp_gen.assign(warps, 0);
  B.shfl.resize(warps);
  B.mma.resize(warps);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = B.fibers[i];
    f.stack.resize(512 * 1024);
    f.waiting = 0;
    f.done = false;
    f.open_copies.clear();
    f.copy_groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &B.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int mode = schedule_mode();
  std::vector<int> order(threads);
  for (;;) {
    for (int i = 0; i < threads; ++i) order[i] = mode == 1 ? threads - 1 - i : i;
    if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
    bool any_ran = false, all_done = true;
    for (int i : order) {
      Fiber& f = B.fibers[i];
      if (f.done) continue;
      all_done = false;
      bool runnable = f.waiting == 0 || (f.waiting == 1 && B.block_gen != f.wait_gen) ||
                      (f.waiting == 2 && B.warp_gen[i / 32] != f.wait_gen);
      if (!runnable) continue;
      f.waiting = 0;
      B.current = i;
      g_thread_idx.x = i;
      swapcontext(&B.scheduler, &f.ctx);
      any_ran = true;
    }
    if (all_done) break;
    if (!any_ran) {
      std::fprintf(stderr, "fastattn emulator: deadlock in block %u\n", g_block_idx.x);
      for (int i = 0; i < threads; ++i) {
        std::fprintf(stderr, "  thread %d: done=%d waiting=%d\n", i, (int)B.fibers[i].done,
                     B.fibers[i].waiting);
      }
      std::abort();
    }
  }
}

// FASTATTN_EMU_BLOCK_ORDER=reverse runs the blocks of a grid from the last index down (CUDA
// promises no order): kernels must not depend on blockIdx order.
inline bool reverse_block_order() {
  const char* s = std::getenv("FASTATTN_EMU_BLOCK_ORDER");
  return s != nullptr && std::strcmp(s, "reverse") == 0;
}

inline void run_grid(int64_t blocks, int threads, size_t smem_bytes, const std::function<void()>& body) {
  std::mt19937 rng(1234);
  g_grid_dim.x = static_cast<unsigned>(blocks);
  g_block_dim.x = threads;
  const bool reverse = reverse_block_order();
  for (int64_t n = 0; n < blocks; ++n) {
    const int64_t blk = reverse ? blocks - 1 - n : n;
    g_smem.assign(smem_bytes + 16, 0xff);  // NaN bytes: reads of unwritten smem become NaN
    g_block_idx.x = static_cast<unsigned>(blk);
    run_block(threads, body, rng);
  }
}

}  // namespace fastattn_emulation

// CUDA built-ins used by the kernels.
#define threadIdx fastattn_emulation::g_thread_idx
#define blockIdx fastattn_emulation::g_block_idx
#define blockDim fastattn_emulation::g_block_dim
#define gridDim fastattn_emulation::g_grid_dim

inline void __syncthreads() { fastattn_emulation::block_barrier(); }
inline int __syncthreads_or(int predicate) { return fastattn_emulation::block_vote_or(predicate); }
inline void __syncwarp(unsigned int = 0xffffffffu) { fastattn_emulation::warp_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned int, T value, int lane_mask) {
  using namespace fastattn_emulation;
  static_assert(sizeof(T) <= 8, "shfl of at most 8 bytes");
  BlockState& B = g_block;
  const int w = B.current / 32, lane = B.current % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  B.shfl[w][lane] = bits;
  warp_barrier();
  const uint64_t other = B.shfl[w][lane ^ lane_mask];
  warp_barrier();
  T result;
  std::memcpy(&result, &other, sizeof(T));
  return result;
}

// Whether any lane of the warp passes a nonzero predicate (every lane gets the same answer).
inline int __any_sync(unsigned int, int predicate) {
  using namespace fastattn_emulation;
  BlockState& B = g_block;
  const int w = B.current / 32, lane = B.current % 32;
  B.shfl[w][lane] = predicate != 0 ? 1 : 0;
  warp_barrier();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= static_cast<int>(B.shfl[w][l]);
  warp_barrier();
  return any;
}

// The host side of attention_api.cu: device context and kernel launch.
namespace fastattn {
namespace cuda_attn {

class DeviceContext {
 public:
  explicit DeviceContext(const at::Tensor&) {}
  int stream() const { return 0; }
  int major() const { return 9; }
  int minor() const { return 0; }
  // FASTATTN_EMU_SMS: the SM count the host code sizes grids for (default 132, an H100; the
  // emulator's small test grids then split GQA groups over blocks).
  int64_t multiprocessors() const {
    const char* s = std::getenv("FASTATTN_EMU_SMS");
    return s ? std::strtoll(s, nullptr, 10) : 132;
  }
  size_t max_smem_per_block() const {
    const char* s = std::getenv("FASTATTN_EMU_MAX_SMEM");
    return s ? std::strtoull(s, nullptr, 10) : 232448;  // H100
  }
};

inline int64_t g_launches = 0;
inline int64_t g_blocks = 0;  // thread blocks run, over all launches

template <typename Args>
void launch(void (*kernel)(Args), int64_t blocks, int threads, size_t smem_bytes,
            const DeviceContext& ctx, const Args& args, const char* name) {
  if (blocks == 0) return;
  // FA_CHECK (common/checks.h), as the library's own messages: no iostream number formatting.
  FA_CHECK(smem_bytes <= ctx.max_smem_per_block(), "fastattn: ", name, " needs ", smem_bytes,
           " bytes of shared memory per block and this GPU allows ", ctx.max_smem_per_block());
  ++g_launches;
  g_blocks += blocks;
  fastattn_emulation::run_grid(blocks, threads, smem_bytes, [&] { kernel(args); });
}

}  // namespace cuda_attn
}  // namespace fastattn
