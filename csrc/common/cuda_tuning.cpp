// The CUDA kernels' tuning switches (cuda_tuning.h): the environment, read once.
#include "common/cuda_tuning.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <tuple>

namespace fastattn {
namespace {

CudaTuning from_environment() {
  CudaTuning t;
  if (const char* s = std::getenv("FASTATTN_CUDA_KV_SPLITS"); s != nullptr) {
    t.kv_splits = std::max<int64_t>(0, std::strtoll(s, nullptr, 10));
  }
  if (const char* s = std::getenv("FASTATTN_CUDA_RESCALE_SLACK"); s != nullptr && s[0] != '\0') {
    t.rescale_slack = std::strtod(s, nullptr);
  }
  if (const char* s = std::getenv("FASTATTN_CUDA_UNORDERED_DQ"); s != nullptr) {
    t.unordered_dq = s[0] != '\0' && s[0] != '0';
  }
  return t;
}

CudaTuning clamped(CudaTuning t) {
  t.kv_splits = std::max<int64_t>(0, t.kv_splits);
  t.rescale_slack = std::min(8.0, std::max(0.0, t.rescale_slack));
  return t;
}

std::mutex& tuning_mutex() {
  static std::mutex m;
  return m;
}

CudaTuning& tuning_state() {
  static CudaTuning state = clamped(from_environment());
  return state;
}

}  // namespace

CudaTuning cuda_tuning() {
  std::lock_guard<std::mutex> lock(tuning_mutex());
  return tuning_state();
}

void set_cuda_tuning(const CudaTuning& tuning) {
  std::lock_guard<std::mutex> lock(tuning_mutex());
  tuning_state() = clamped(tuning);
}

void define_cuda_tuning_ops(torch::Library& m) {
  m.def("_cuda_tuning() -> (int, float, bool)", [] {
    const CudaTuning t = cuda_tuning();
    return std::make_tuple(t.kv_splits, t.rescale_slack, t.unordered_dq);
  });
  m.def("_set_cuda_tuning(int kv_splits, float rescale_slack, bool unordered_dq) -> ()",
        [](int64_t kv_splits, double rescale_slack, bool unordered_dq) {
          set_cuda_tuning(CudaTuning{kv_splits, rescale_slack, unordered_dq});
        });
}

}  // namespace fastattn
