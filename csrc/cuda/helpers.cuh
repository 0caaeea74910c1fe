// Shared CUDA helpers: capped grid-stride loops and launch geometry.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cim_ext {

#define CIM_EXT_KERNEL_LOOP(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  return (unsigned int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), kMaxBlocks));
}

}  // namespace cim_ext
