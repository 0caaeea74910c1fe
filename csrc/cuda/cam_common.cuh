// Block-per-sample building blocks shared by the CUDA kernels of cam, _cam_backward, cam_boxes, otsu_threshold
// and cam_to_boxes. Every kernel runs kBlock threads per sample and sums a CAM in the same fixed order, so
// cam_to_boxes reproduces cam followed by cam_boxes exactly, and the backward sees the forward's argmin/argmax.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cam_args.h"
#include "cuda/deferred_errors.cuh"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace cam_cuda {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Maps up to this many bytes live in shared memory in cam_to_boxes; larger ones go to a global scratch buffer.
constexpr int64_t kSharedMapBytes = 8192;
// Histograms up to this many bins live in shared memory; larger ones go to a global scratch buffer.
constexpr int64_t kSharedBins = 4096;

// Whether a sample's label indexes a row of the weight; the first bad one is recorded as a deferred error.
__device__ inline bool label_ok(int64_t label, int64_t classes, int64_t b, deferred::Op op,
                                deferred::Report* errors) {
  if (label >= 0 && label < classes) return true;
  if (threadIdx.x == 0) deferred::record(errors, deferred::kLabel, op, b, label, classes);
  return false;
}

struct Min {
  template <typename T>
  __device__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? b : a; }
};
struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// Sum over a warp; every lane receives the same value.
template <typename T>
__device__ T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Reduction over the block; every thread receives the same value (the butterfly only combines operands
// commutatively, and all threads fold the per-warp results in the same order).
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T per_warp[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(kFullMask, value, offset));
  __syncthreads();  // per_warp may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x >> 5] = value;
  __syncthreads();
  T result = per_warp[0];
  for (int i = 1; i < kWarps; ++i) result = op(result, per_warp[i]);
  return result;
}

// Raw CAM of one sample, raw[p] = scalar_t(sum_c w[c] * f[c, p]), written into `raw` (shared or global memory).
// `partial` is shared scratch of kBlock acc_t. Ends with a barrier, so every thread may read all of raw.
template <typename scalar_t, typename acc_t>
__device__ void block_raw_cam(const scalar_t* __restrict__ f, const scalar_t* __restrict__ w, int64_t channels,
                              int64_t pixels, bool channels_last, scalar_t* raw, acc_t* partial) {
  const int t = threadIdx.x;
  if (channels_last) {
    // f[p * C + c]: a warp per pixel, lanes over channels (coalesced), then a fixed shuffle tree.
    const int lane = t & 31;
    for (int64_t p = t >> 5; p < pixels; p += kWarps) {
      const scalar_t* fp = f + p * channels;
      acc_t sum = 0;
      for (int64_t c = lane; c < channels; c += 32) {
        sum += static_cast<acc_t>(w[c]) * static_cast<acc_t>(fp[c]);
      }
      for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(kFullMask, sum, offset);
      if (lane == 0) raw[p] = static_cast<scalar_t>(sum);
    }
  } else if (pixels >= kBlock) {
    // f[c * P + p]: a thread per pixel; consecutive threads read consecutive pixels.
    for (int64_t p = t; p < pixels; p += kBlock) {
      acc_t sum = 0;
#pragma unroll 4
      for (int64_t c = 0; c < channels; ++c) {
        sum += static_cast<acc_t>(w[c]) * static_cast<acc_t>(f[c * pixels + p]);
      }
      raw[p] = static_cast<scalar_t>(sum);
    }
  } else {
    // Small maps (7x7): kBlock / P groups of P threads split the channels; at step i the block reads the
    // contiguous run f[i * groups * P, (i + 1) * groups * P). The group sums are then added in group order.
    const int groups = kBlock / static_cast<int>(pixels);
    const int group = t / static_cast<int>(pixels);
    const int p = t % static_cast<int>(pixels);
    acc_t sum = 0;
    if (group < groups) {
#pragma unroll 4
      for (int64_t c = group; c < channels; c += groups) {
        sum += static_cast<acc_t>(w[c]) * static_cast<acc_t>(f[c * pixels + p]);
      }
    }
    partial[t] = sum;
    __syncthreads();
    if (t < pixels) {
      acc_t total = 0;
      for (int i = 0; i < groups; ++i) total += partial[i * pixels + t];
      raw[t] = static_cast<scalar_t>(total);
    }
  }
  __syncthreads();
}

template <typename acc_t>
struct MinMax {
  acc_t low, high;
};

template <typename scalar_t, typename acc_t>
__device__ MinMax<acc_t> block_min_max(const scalar_t* map, int64_t pixels) {
  acc_t low = static_cast<acc_t>(map[0]), high = low;
  for (int64_t p = threadIdx.x; p < pixels; p += kBlock) {
    const acc_t v = static_cast<acc_t>(map[p]);
    low = v < low ? v : low;
    high = high < v ? v : high;
  }
  return {block_reduce(low, Min()), block_reduce(high, Max())};
}

// In place: (map - min) / (max - min), zeros for a constant map. Each step is rounded to scalar_t like the
// reference's tensor operations (a no-op for float and double). Ends with a barrier.
template <typename scalar_t, typename acc_t>
__device__ void block_normalize(scalar_t* map, int64_t pixels) {
  const MinMax<acc_t> mm = block_min_max<scalar_t, acc_t>(map, pixels);
  const acc_t span = static_cast<acc_t>(static_cast<scalar_t>(mm.high - mm.low));
  for (int64_t p = threadIdx.x; p < pixels; p += kBlock) {
    const acc_t shifted = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(map[p]) - mm.low));
    map[p] = span > acc_t(0) ? static_cast<scalar_t>(shifted / span) : static_cast<scalar_t>(0);
  }
  __syncthreads();
}

// One axis of ATen's CUDA bilinear kernel (upsample_bilinear2d_out_frame, align_corners=False): source index
// i0, step to the second source index (0 at the border) and the two weights.
template <typename acc_t>
struct Linear {
  int64_t i0, step;
  acc_t l0, l1;
};

template <typename acc_t>
__device__ __forceinline__ Linear<acc_t> linear(acc_t scale, int64_t dst, int64_t in) {
  acc_t real = scale * (dst + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  real = real < acc_t(0) ? acc_t(0) : real;
  const int64_t i0 = static_cast<int64_t>(real);
  Linear<acc_t> out;
  out.i0 = i0;
  out.step = i0 < in - 1 ? 1 : 0;
  out.l1 = real - i0;
  out.l0 = static_cast<acc_t>(1) - out.l1;
  return out;
}

// Upsampled value at (y, x) given the row interpolation ly, rounded to scalar_t as F.interpolate stores it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t upsampled(const scalar_t* map, int64_t w, const Linear<acc_t>& ly,
                                           const Linear<acc_t>& lx) {
  const scalar_t* r0 = map + ly.i0 * w + lx.i0;
  const scalar_t* r1 = r0 + ly.step * w;
  const acc_t val = ly.l0 * (lx.l0 * static_cast<acc_t>(r0[0]) + lx.l1 * static_cast<acc_t>(r0[lx.step])) +
                    ly.l1 * (lx.l0 * static_cast<acc_t>(r1[0]) + lx.l1 * static_cast<acc_t>(r1[lx.step]));
  return static_cast<acc_t>(static_cast<scalar_t>(val));
}

// Calls fn(y, x, value) for every pixel of the H x W bilinear upsampling of the h x w map: warps over rows,
// lanes over columns (coalesced for the caller's per-pixel work, the map itself is tiny and cached).
template <typename scalar_t, typename acc_t, typename Fn>
__device__ void for_each_upsampled(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W, Fn fn) {
  const acc_t scale_y = static_cast<acc_t>(h) / H;
  const acc_t scale_x = static_cast<acc_t>(w) / W;
  for (int64_t y = threadIdx.x >> 5; y < H; y += kWarps) {
    const Linear<acc_t> ly = linear(scale_y, y, h);
    for (int64_t x = threadIdx.x & 31; x < W; x += 32) {
      fn(y, x, upsampled<scalar_t, acc_t>(map, w, ly, linear(scale_x, x, w)));
    }
  }
}

// Tight half-open box (y0, y1, x0, x1) of upsample(map) > threshold, zeros for an empty mask; written by
// thread 0.
template <typename scalar_t, typename acc_t>
__device__ void block_box(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W, acc_t threshold,
                          int64_t* box) {
  int64_t y0 = INT64_MAX, y1 = -1, x0 = INT64_MAX, x1 = -1;
  for_each_upsampled<scalar_t, acc_t>(map, h, w, H, W, [&](int64_t y, int64_t x, acc_t v) {
    if (v > threshold) {
      y0 = y < y0 ? y : y0;
      y1 = y > y1 ? y : y1;
      x0 = x < x0 ? x : x0;
      x1 = x > x1 ? x : x1;
    }
  });
  y0 = block_reduce(y0, Min());
  y1 = block_reduce(y1, Max());
  x0 = block_reduce(x0, Min());
  x1 = block_reduce(x1, Max());
  if (threadIdx.x == 0) {
    const bool empty = y1 < 0;
    box[0] = empty ? 0 : y0;
    box[1] = empty ? 0 : y1 + 1;
    box[2] = empty ? 0 : x0;
    box[3] = empty ? 0 : x1 + 1;
  }
}

// Otsu split k of the bins-bin histogram of upsample(map) (see cim_ext.reference.otsu_threshold); every thread
// receives k. `hist` holds bins counters (shared or global memory). The bin of a value is computed like the
// reference's floor(up * bins).clamp(0, bins - 1), with the product rounded to scalar_t.
template <typename scalar_t, typename acc_t>
__device__ int64_t block_otsu(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W, int64_t bins,
                              unsigned long long* hist) {
  __shared__ int64_t split;
  for (int64_t k = threadIdx.x; k < bins; k += kBlock) hist[k] = 0;
  __syncthreads();
  const acc_t scaled = static_cast<acc_t>(bins);
  const acc_t last = static_cast<acc_t>(bins - 1);
  for_each_upsampled<scalar_t, acc_t>(map, h, w, H, W, [&](int64_t, int64_t, acc_t v) {
    const acc_t t = static_cast<acc_t>(static_cast<scalar_t>(v * scaled));
    // For 0 < t < bins - 1 floor is truncation; NaN (only from infinite inputs) goes to bin 0.
    const long long bin = t > acc_t(0) ? (t < last ? static_cast<long long>(t) : bins - 1) : 0;
    // Neighbouring pixels (one warp = 32 adjacent columns) mostly share a bin: one atomic per distinct bin.
    const unsigned same = __match_any_sync(__activemask(), bin);
    if ((threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(hist + bin, static_cast<unsigned long long>(__popc(same)));
  });
  __syncthreads();
  if (threadIdx.x < 32) {
    // One warp: totals, then 32 bins at a time an inclusive scan of (count, index * count), the between-class
    // variance of each split in float64, and the best split (smallest k among ties). Integer sums wrap like the
    // reference's int64 tensors.
    const int lane = threadIdx.x;
    unsigned long long total = 0, total_sum = 0;
    for (int64_t k = lane; k < bins; k += 32) {
      total += hist[k];
      total_sum += hist[k] * static_cast<unsigned long long>(k);
    }
    total = warp_sum(total);
    total_sum = warp_sum(total_sum);
    unsigned long long carry_n = 0, carry_s = 0;
    double best = -1.0;
    int64_t best_k = 0;
    for (int64_t base = 0; base < bins; base += 32) {
      const int64_t k = base + lane;
      unsigned long long n = k < bins ? hist[k] : 0ull;
      unsigned long long s = n * static_cast<unsigned long long>(k);
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned long long up_n = __shfl_up_sync(kFullMask, n, offset);
        const unsigned long long up_s = __shfl_up_sync(kFullMask, s, offset);
        if (lane >= offset) {
          n += up_n;
          s += up_s;
        }
      }
      const unsigned long long n0 = carry_n + n, s0 = carry_s + s;
      double var = -1.0;
      if (k < bins) {
        const double num = static_cast<double>(static_cast<long long>(s0 * total - total_sum * n0));
        const double prod = static_cast<double>(static_cast<long long>(n0 * (total - n0)));
        var = prod > 0 ? num * num / prod : 0.0;
      }
      int64_t var_k = k;
      for (int offset = 16; offset > 0; offset >>= 1) {
        const double other = __shfl_xor_sync(kFullMask, var, offset);
        const int64_t other_k = __shfl_xor_sync(kFullMask, var_k, offset);
        if (other > var || (other == var && other_k < var_k)) {
          var = other;
          var_k = other_k;
        }
      }
      if (var > best) {
        best = var;
        best_k = var_k;
      }
      carry_n = __shfl_sync(kFullMask, n0, 31);
      carry_s = __shfl_sync(kFullMask, s0, 31);
    }
    if (lane == 0) split = best_k;
  }
  __syncthreads();
  return split;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t otsu_value(int64_t k, int64_t bins) {
  return static_cast<scalar_t>(static_cast<double>(k + 1) / static_cast<double>(bins));
}

}  // namespace cam_cuda
}  // namespace cim_ext
