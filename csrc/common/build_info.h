// What this build of fastattn was compiled with, as "key=value;..." (read by
// fastattn.build_info()).
#pragma once

#define FASTATTN_STR2(x) #x
#define FASTATTN_STR(x) FASTATTN_STR2(x)

#ifndef FASTATTN_CUDA_ARCH_LIST
#define FASTATTN_CUDA_ARCH_LIST none
#endif

namespace fastattn {

inline const char* build_info_string() {
  return "cuda="
#ifdef FASTATTN_WITH_CUDA
         "1"
#else
         "0"
#endif
         ";cuda_archs=" FASTATTN_STR(FASTATTN_CUDA_ARCH_LIST)
         ";cpu_isa="
#if defined(__AVX512F__)
         "avx512"
#elif defined(__AVX2__)
         "avx2"
#elif defined(__ARM_NEON) || defined(__aarch64__)
         "neon"
#else
         "generic"
#endif
         ";compiler="
#if defined(__clang__)
         "clang-" __clang_version__
#elif defined(__GNUC__)
         "gcc-" FASTATTN_STR(__GNUC__) "." FASTATTN_STR(__GNUC_MINOR__)
#else
         "unknown"
#endif
      ;
}

}  // namespace fastattn
