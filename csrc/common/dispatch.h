// Static switches: turn runtime values into template parameters, so each kernel is compiled
// once per (dtype, flag) combination instead of branching in its inner loop.
#pragma once

#include <ATen/Dispatch.h>

// Run the lambda with `const bool NAME` as a constexpr.
#define FASTATTN_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool NAME = true;             \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool NAME = false;            \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// CPU kernels: float, double, half, bfloat16 (math in fp32, or fp64 for double).
#define FASTATTN_DISPATCH_CPU_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// CUDA kernels: float, half, bfloat16 (fp32 math). float64 is not supported on CUDA.
#define FASTATTN_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
