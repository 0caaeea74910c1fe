// Resampling index arithmetic shared by the compress / uncompress / soft_compress kernels (CPU and CUDA).
//
// The kernels must reproduce F.interpolate bit for bit, so every formula here repeats PyTorch's own float
// arithmetic (aten/src/ATen/native/UpSample.h, cuda/UpSample.cuh, cpu/UpSampleKernel.cpp), including the
// precision of each intermediate value.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if !defined(__CUDACC__)
#include <ATen/core/Tensor.h>

#include <vector>
#endif

namespace cim_ext {

// Side length of the downsampled background: max(1, int(size / sqrt(ratio))), as cim_ext.reference.down_size
// computes it in Python (double division, truncation).
inline int64_t down_extent(int64_t size, double ratio) {
  const auto extent = static_cast<int64_t>(static_cast<double>(size) / std::sqrt(ratio));
  return extent < 1 ? 1 : extent;
}

// Scale of a nearest-exact resize from `in_size` to `out_size` pixels: float in / out (compute_scales_value<float>).
C10_HOST_DEVICE inline float nearest_exact_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

// Source index of output pixel `dst` as the CUDA kernels and the CPU channels-last kernel compute it
// (nearest_neighbor_exact_compute_source_index): floor((dst + 0.5) * scale) in float, clamped to the input.
// ATen's CPU variant multiplies in double and rounds the product to float; for dst < 2^24 both products are the
// correctly rounded float product of the same exact operands, so one formula serves both.
C10_HOST_DEVICE inline int64_t nearest_exact_index(float scale, int64_t dst, int64_t in_size) {
  // The floored value is at most about in_size: the 32-bit conversion is exact (and much cheaper on GPUs).
  const int64_t src = static_cast<int>(floorf((static_cast<float>(dst) + 0.5f) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

// One axis of the down-then-up gather, evaluated on the fly (CUDA; on CPU the maps depend on the ATen kernel, see
// below): up(i) is the source of output i in the nearest-exact resize small -> full, down_up(i) the source of i in
// full -> small -> full.
struct NearestAxis {
  float down_scale;  // full -> small
  float up_scale;    // small -> full
  int64_t full;
  int64_t small;

  static NearestAxis make(int64_t full_size, int64_t small_size) {
    return {nearest_exact_scale(full_size, small_size), nearest_exact_scale(small_size, full_size), full_size, small_size};
  }
  C10_HOST_DEVICE int64_t up(int64_t i) const { return nearest_exact_index(up_scale, i, small); }
  C10_HOST_DEVICE int64_t down_up(int64_t i) const { return nearest_exact_index(down_scale, up(i), full); }
};

// The two taps of a bilinear (align_corners=False) resize for output pixel `dst`, in the accumulation type acc_t
// (area_pixel_compute_source_index + compute_source_index_and_lambda): src = scale * (dst + 0.5) - 0.5 clamped at
// 0, i0 = floor(src), i1 = i0 + 1 unless at the border, w1 = src - i0, w0 = 1 - w1; equal sizes copy. `fused`:
// compute src with one FMA, as nvcc (always) and ATen's vectorised CPU builds (see below) do.
template <typename acc_t>
struct LinearTap {
  int64_t i0;
  int64_t i1;
  acc_t w0;
  acc_t w1;
};

template <typename acc_t>
C10_HOST_DEVICE inline LinearTap<acc_t> linear_tap(int64_t dst, int64_t in_size, int64_t out_size, bool fused) {
  LinearTap<acc_t> tap;
  if (in_size == out_size) {
    tap.i0 = dst;
    tap.i1 = dst;
    tap.w0 = acc_t(1);
    tap.w1 = acc_t(0);
    return tap;
  }
  const acc_t scale = static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
  const acc_t center = static_cast<acc_t>(dst) + acc_t(0.5);
  acc_t src;
  if (fused) {
#if defined(__CUDA_ARCH__)
    src = fma(scale, center, acc_t(-0.5));
#else
    src = std::fma(scale, center, acc_t(-0.5));
#endif
  } else if (sizeof(acc_t) == sizeof(float)) {
    // The double product of two floats is exact, so rounding it gives the float product without any chance of
    // the compiler fusing the subtraction.
    src = static_cast<acc_t>(static_cast<float>(static_cast<double>(scale) * static_cast<double>(center))) - acc_t(0.5);
  } else {
    src = scale * center - acc_t(0.5);
  }
  if (src < acc_t(0)) {
    src = acc_t(0);
  }
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) {
    i0 = in_size - 1;
  }
  acc_t w1 = src - static_cast<acc_t>(i0);
  w1 = w1 < acc_t(0) ? acc_t(0) : (w1 > acc_t(1) ? acc_t(1) : w1);
  tap.i0 = i0;
  tap.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  tap.w0 = acc_t(1) - w1;
  tap.w1 = w1;
  return tap;
}

#if defined(__CUDACC__)
// Launch layout of the row kernels: threads over (column chunk, row, sample), x fastest, kThreads per block; rows
// and samples beyond the grid limits are covered by grid-stride loops in the kernels.
struct Tiles {
  dim3 grid;
  dim3 block;
};

// With enough work each thread takes several rows, so that its per-column setup is amortised.
inline Tiles row_tiles(int64_t batch, int64_t height, int64_t chunks, int64_t threads = 256) {
  const int64_t tx = std::min<int64_t>(threads, std::max<int64_t>(32, (chunks + 31) / 32 * 32));
  const int64_t ty = threads / tx;
  const int64_t grid_x = (chunks + tx - 1) / tx;
  const int64_t grid_z = std::min<int64_t>(std::max<int64_t>(batch, 1), 65535);
  const int64_t row_blocks = (height + ty - 1) / ty;
  const int64_t rows_per_thread = grid_x * grid_z * row_blocks >= 16384 ? 4 : 1;
  Tiles tiles;
  tiles.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty), 1);
  tiles.grid = dim3(
      static_cast<unsigned>(grid_x),
      static_cast<unsigned>(std::min<int64_t>((row_blocks + rows_per_thread - 1) / rows_per_thread, 65535)),
      static_cast<unsigned>(grid_z));
  return tiles;
}
#endif  // defined(__CUDACC__)

#if !defined(__CUDACC__)
// ---------------------------------------------------------------------------------------------------- CPU only
// On CPU, ATen picks one of two nearest-exact kernels per F.interpolate call, and they round differently on exact
// ties ((dst + 0.5) * in / out an integer):
// - the "channels-last" kernel, used when the input is channels-last with more than 3 channels or when the output
//   is small (out_h + out_w <= 128), computes nearest_exact_index above;
// - the generic kernel computes src = scale * (dst + 0.5) - 0.5 in the op-math type (double for double tensors,
//   float otherwise, uint8 included), clamps it at 0 and takes floorf(src + 0.5). Its translation unit is built
//   per CPU capability, and the AVX2/AVX512 builds fuse the multiply-add into one FMA while the default build
//   does not, so the result depends on the capability ATen dispatches to at run time.

// Whether this process's ATen CPU kernels fuse the generic kernel's multiply-add (probed once; compress_kernel.cpp).
bool cpu_upsample_index_fused();

inline bool cpu_channels_last_kernel(bool channels_last_input, int64_t channels, int64_t out_h, int64_t out_w) {
  return (channels_last_input && channels > 3) || out_h + out_w <= 128;
}

template <typename opmath_t>
inline int64_t nearest_exact_index_generic(opmath_t scale, int64_t dst, int64_t in_size, bool fused) {
  const opmath_t center = static_cast<opmath_t>(dst) + opmath_t(0.5);
  opmath_t src;
  if (fused) {
    src = std::fma(scale, center, opmath_t(-0.5));
  } else if constexpr (sizeof(opmath_t) == sizeof(float)) {
    // The double product of two floats is exact, so rounding it gives the float product; going through double
    // also keeps this compiler from fusing the subtraction into an FMA.
    src = static_cast<float>(static_cast<double>(scale) * static_cast<double>(center)) - 0.5f;
  } else {
    src = scale * center - opmath_t(0.5);
  }
  if (src < opmath_t(0)) {
    src = opmath_t(0);
  }
  // ATen adds the double literal 0.5 and rounds the sum to float before floorf.
  const auto index = static_cast<int64_t>(std::floor(static_cast<float>(static_cast<double>(src) + 0.5)));
  return index < in_size - 1 ? index : in_size - 1;
}

// Source index of every output pixel of a nearest-exact resize in_size -> out_size as the chosen ATen CPU kernel
// computes it. `double_opmath`: the resized tensor is float64.
inline std::vector<int64_t> cpu_nearest_exact_map(
    int64_t in_size, int64_t out_size, bool channels_last_kernel, bool double_opmath) {
  std::vector<int64_t> map(out_size);
  if (channels_last_kernel) {
    const float scale = nearest_exact_scale(in_size, out_size);
    for (int64_t i = 0; i < out_size; ++i) {
      map[i] = nearest_exact_index(scale, i, in_size);
    }
    return map;
  }
  const bool fused = cpu_upsample_index_fused();
  for (int64_t i = 0; i < out_size; ++i) {
    map[i] = double_opmath
        ? nearest_exact_index_generic<double>(static_cast<double>(in_size) / static_cast<double>(out_size), i, in_size, fused)
        : nearest_exact_index_generic<float>(nearest_exact_scale(in_size, out_size), i, in_size, fused);
  }
  return map;
}

// Source row / column of every output pixel of a resize (row map over H, column map over W).
struct ResampleMaps {
  std::vector<int64_t> rows;
  std::vector<int64_t> cols;
};

// Maps of F.interpolate(small, size=(height, width), mode="nearest-exact") on CPU, small: [B, C, h, w].
inline ResampleMaps cpu_up_maps(const at::Tensor& small, int64_t height, int64_t width) {
  const bool double_opmath = small.scalar_type() == at::kDouble;
  const bool cl_kernel = cpu_channels_last_kernel(
      small.is_contiguous(at::MemoryFormat::ChannelsLast), small.size(1), height, width);
  return {cpu_nearest_exact_map(small.size(2), height, cl_kernel, double_opmath),
          cpu_nearest_exact_map(small.size(3), width, cl_kernel, double_opmath)};
}

// Maps of cim_ext.reference.down_up(images, ratio) on CPU: nearest-exact down to down_extent and back up,
// composed into one gather. Both F.interpolate calls see the memory format of `images` as the caller passed it.
inline ResampleMaps cpu_down_up_maps(const at::Tensor& images, double ratio) {
  const int64_t channels = images.size(1), height = images.size(2), width = images.size(3);
  const int64_t small_h = down_extent(height, ratio), small_w = down_extent(width, ratio);
  const bool double_opmath = images.scalar_type() == at::kDouble;
  // The first resize allocates its output in the input's suggested memory format; a 1x1 image is both formats.
  const bool small_channels_last =
      images.suggest_memory_format() == at::MemoryFormat::ChannelsLast || (small_h == 1 && small_w == 1);
  const bool down_cl = cpu_channels_last_kernel(
      images.is_contiguous(at::MemoryFormat::ChannelsLast), channels, small_h, small_w);
  const bool up_cl = cpu_channels_last_kernel(small_channels_last, channels, height, width);
  auto compose = [&](int64_t size, int64_t small) {
    const auto down = cpu_nearest_exact_map(size, small, down_cl, double_opmath);
    auto up = cpu_nearest_exact_map(small, size, up_cl, double_opmath);
    for (auto& index : up) {
      index = down[index];
    }
    return up;
  };
  return {compose(height, small_h), compose(width, small_w)};
}
#endif  // !defined(__CUDACC__)

}  // namespace cim_ext
