// Switches of the CUDA attention kernels, for tests and profiling only: read from the
// environment once per process, in one place (cuda_tuning.cpp), and changeable at run time
// through the ops `_cuda_tuning` / `_set_cuda_tuning` (fastattn.tuning.cuda_tuning in Python).
//   FASTATTN_CUDA_KV_SPLITS=N        the forward's split-KV part count: 0 (unset) the host's
//                                    choice, 1 no split, N > 1 N parts whatever the grid
//   FASTATTN_CUDA_RESCALE_SLACK=S    the forward's lazy-rescale slack, base 2, in [0, 8]
//                                    (default 8; 0 rescales whenever a row's max grows)
//   FASTATTN_CUDA_UNORDERED_DQ=1     the backward's key blocks add their dQ shares without
//                                    waiting for their turns (not bitwise reproducible), to
//                                    put a number on what the fixed order costs
#pragma once

#include <torch/library.h>

#include <cstdint>

namespace fastattn {

struct CudaTuning {
  int64_t kv_splits = 0;
  double rescale_slack = 8.0;
  bool unordered_dq = false;
};

CudaTuning cuda_tuning();
void set_cuda_tuning(const CudaTuning& tuning);

// Defines `_cuda_tuning() -> (int, float, bool)` and `_set_cuda_tuning(int kv_splits,
// float rescale_slack, bool unordered_dq) -> ()` in a library (fastattn, the emulator's).
void define_cuda_tuning_ops(torch::Library& m);

}  // namespace fastattn
