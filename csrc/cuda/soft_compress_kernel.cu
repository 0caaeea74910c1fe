// soft_compress on CUDA: hybrid = up * x + (1 - up) * down_up(x), up = bilinear(cams -> (H, W)), and its exact
// first-order backward. down_up is the gather of compress (NearestAxis in cpu/resample.h); up is evaluated per pixel
// from the 2 x 2 cam taps, in the op-math type (float for half types), and rounded to the image dtype as the
// reference's upsampled map is. Every kernel gathers; nothing uses atomics, so the backward is deterministic:
// - grad_images[p, q] = grad[p, q] * up[p, q] + sum of (1 - up) * grad over the output pixels whose down_up source
//   is (p, q). The row and column maps are monotone, so those pixels form a rectangle, found by binary search once
//   per row / column (preimage_ranges_kernel).
// - grad_cams: G = sum_c grad * (x - down_up(x)) per pixel (op-math type, one pass), then one block per cam cell
//   sums w_y * w_x * G over the pixels whose taps touch the cell (a rectangle too) and reduces in a fixed tree.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "cam_args.h"
#include "cuda/deferred_errors.cuh"
#include "cpu/resample.h"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

// Sizes of one call, passed by value to every kernel.
struct Geometry {
  int64_t batch, channels, height, width, cam_h, cam_w;
};

template <typename acc_t>
__device__ __forceinline__ LinearTap<acc_t> row_tap(const Geometry& g, int64_t y) {
  return linear_tap<acc_t>(y, g.cam_h, g.height, /*fused=*/true);
}

template <typename acc_t>
__device__ __forceinline__ LinearTap<acc_t> col_tap(const Geometry& g, int64_t x) {
  return linear_tap<acc_t>(x, g.cam_w, g.width, /*fused=*/true);
}

// up at one pixel of sample b, rounded to scalar_t like the reference's upsampled map, returned in acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t up_at(
    const scalar_t* __restrict__ cams, const Geometry& g, int64_t b, const LinearTap<acc_t>& ty,
    const LinearTap<acc_t>& tx) {
  const scalar_t* cam = cams + b * g.cam_h * g.cam_w;
  const acc_t top = tx.w0 * static_cast<acc_t>(cam[ty.i0 * g.cam_w + tx.i0]) +
      tx.w1 * static_cast<acc_t>(cam[ty.i0 * g.cam_w + tx.i1]);
  const acc_t bottom = tx.w0 * static_cast<acc_t>(cam[ty.i1 * g.cam_w + tx.i0]) +
      tx.w1 * static_cast<acc_t>(cam[ty.i1 * g.cam_w + tx.i1]);
  return static_cast<acc_t>(static_cast<scalar_t>(ty.w0 * top + ty.w1 * bottom));
}

// Weight of cam index `i` in a tap (both taps may be i at the border).
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(const LinearTap<acc_t>& tap, int64_t i) {
  return (tap.i0 == i ? tap.w0 : acc_t(0)) + (tap.i1 == i ? tap.w1 : acc_t(0));
}

template <typename scalar_t>
__global__ void soft_compress_kernel(
    const scalar_t* __restrict__ images, const scalar_t* __restrict__ cams, scalar_t* __restrict__ output, Geometry g,
    NearestAxis rows, NearestAxis cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= g.width) {
    return;
  }
  const auto tx = col_tap<acc_t>(g, x);
  const int64_t src_x = cols.down_up(x);
  const int64_t plane = g.height * g.width;
  for (int64_t b = blockIdx.z; b < g.batch; b += gridDim.z) {
    for (int64_t y = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; y < g.height; y += (int64_t)gridDim.y * blockDim.y) {
      const acc_t u = up_at(cams, g, b, row_tap<acc_t>(g, y), tx);
      const int64_t src_y = rows.down_up(y);
      for (int64_t c = 0; c < g.channels; ++c) {
        const scalar_t* source = images + (b * g.channels + c) * plane;
        const acc_t kept = static_cast<acc_t>(source[y * g.width + x]);
        const acc_t background = static_cast<acc_t>(source[src_y * g.width + src_x]);
        output[(b * g.channels + c) * plane + y * g.width + x] =
            static_cast<scalar_t>(u * kept + (acc_t(1) - u) * background);
      }
    }
  }
}

// First index i in [0, n) with axis.down_up(i) >= target (n if none); down_up is non-decreasing.
__device__ __forceinline__ int64_t first_at_least(const NearestAxis& axis, int64_t target) {
  int64_t lo = 0, hi = axis.full;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (axis.down_up(mid) < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ranges[2 * i], ranges[2 * i + 1]: the output rows (i < H) or columns (i = H + q) whose down_up source is i.
__global__ void preimage_ranges_kernel(int64_t* __restrict__ ranges, NearestAxis rows, NearestAxis cols) {
  CIM_EXT_KERNEL_LOOP(i, rows.full + cols.full) {
    const NearestAxis& axis = i < rows.full ? rows : cols;
    const int64_t p = i < rows.full ? i : i - rows.full;
    ranges[2 * i] = first_at_least(axis, p);
    ranges[2 * i + 1] = first_at_least(axis, p + 1);
  }
}

template <typename scalar_t>
__global__ void grad_images_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ cams, const int64_t* __restrict__ ranges,
    scalar_t* __restrict__ grad_images, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.height * g.width;
  CIM_EXT_KERNEL_LOOP(index, g.batch * g.channels * plane) {
    const int64_t q = index % g.width;
    const int64_t p = (index / g.width) % g.height;
    const int64_t bc = index / plane;
    const int64_t b = bc / g.channels;
    const scalar_t* g_plane = grad + bc * plane;
    acc_t sum = static_cast<acc_t>(g_plane[p * g.width + q]) * up_at(cams, g, b, row_tap<acc_t>(g, p), col_tap<acc_t>(g, q));
    const int64_t y_first = ranges[2 * p], y_last = ranges[2 * p + 1];
    const int64_t x_first = ranges[2 * (g.height + q)], x_last = ranges[2 * (g.height + q) + 1];
    for (int64_t y = y_first; y < y_last; ++y) {
      const auto ty = row_tap<acc_t>(g, y);
      for (int64_t x = x_first; x < x_last; ++x) {
        sum += (acc_t(1) - up_at(cams, g, b, ty, col_tap<acc_t>(g, x))) * static_cast<acc_t>(g_plane[y * g.width + x]);
      }
    }
    grad_images[index] = static_cast<scalar_t>(sum);
  }
}

// G[b, y, x] = sum_c grad * (x - down_up(x)), in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void cam_grad_map_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ images, acc_t* __restrict__ map, Geometry g,
    NearestAxis rows, NearestAxis cols) {
  const int64_t plane = g.height * g.width;
  CIM_EXT_KERNEL_LOOP(index, g.batch * plane) {
    const int64_t x = index % g.width;
    const int64_t y = (index / g.width) % g.height;
    const int64_t b = index / plane;
    const int64_t source = rows.down_up(y) * g.width + cols.down_up(x);
    acc_t sum = 0;
    for (int64_t c = 0; c < g.channels; ++c) {
      const int64_t offset = (b * g.channels + c) * plane;
      sum += static_cast<acc_t>(grad[offset + y * g.width + x]) *
          (static_cast<acc_t>(images[offset + y * g.width + x]) - static_cast<acc_t>(images[offset + source]));
    }
    map[index] = sum;
  }
}

// First output index whose tap i0 is >= target (taps i0 are non-decreasing).
template <typename acc_t>
__device__ __forceinline__ int64_t first_tap_at_least(int64_t target, int64_t cam_size, int64_t size) {
  int64_t lo = 0, hi = size;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (linear_tap<acc_t>(mid, cam_size, size, true).i0 < target) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// One block (kThreads threads) per cam cell: the cell's pixels are those whose i0 tap is the cell or the one before.
template <typename scalar_t, typename acc_t>
__global__ void grad_cams_kernel(const acc_t* __restrict__ map, scalar_t* __restrict__ grad_cams, Geometry g) {
  __shared__ acc_t partial[kThreads];
  const int64_t cells = g.batch * g.cam_h * g.cam_w;
  for (int64_t cell = blockIdx.x; cell < cells; cell += gridDim.x) {
    const int64_t j = cell % g.cam_w;
    const int64_t i = (cell / g.cam_w) % g.cam_h;
    const int64_t b = cell / (g.cam_h * g.cam_w);
    const int64_t y_first = first_tap_at_least<acc_t>(i - 1, g.cam_h, g.height);
    const int64_t y_last = first_tap_at_least<acc_t>(i + 1, g.cam_h, g.height);
    const int64_t x_first = first_tap_at_least<acc_t>(j - 1, g.cam_w, g.width);
    const int64_t x_last = first_tap_at_least<acc_t>(j + 1, g.cam_w, g.width);
    const int64_t span = x_last - x_first;
    const int64_t count = (y_last - y_first) * span;
    acc_t sum = 0;
    for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
      const int64_t y = y_first + k / span, x = x_first + k % span;
      const acc_t weight = tap_weight(row_tap<acc_t>(g, y), i) * tap_weight(col_tap<acc_t>(g, x), j);
      sum += weight * map[(b * g.height + y) * g.width + x];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) {
        partial[threadIdx.x] += partial[threadIdx.x + stride];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      grad_cams[cell] = static_cast<scalar_t>(partial[0]);
    }
    __syncthreads();  // partial is reused by the next cell
  }
}

Geometry geometry_of(const at::Tensor& images, const at::Tensor& cams) {
  return {images.size(0), images.size(1), images.size(2), images.size(3), cams.size(1), cams.size(2)};
}

at::Tensor soft_compress_cuda(const at::Tensor& images, const at::Tensor& cams, double ratio) {
  deferred::raise_deferred_errors();
  check_soft_compress_inputs(images, cams, ratio);
  c10::cuda::CUDAGuard guard(images.device());
  auto output = at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto images_c = images.contiguous();
  const auto cams_c = cams.contiguous();
  const auto g = geometry_of(images, cams);
  const auto rows = NearestAxis::make(g.height, down_extent(g.height, ratio));
  const auto cols = NearestAxis::make(g.width, down_extent(g.width, ratio));
  const auto tiles = row_tiles(g.batch, g.height, g.width);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images_c.scalar_type(), "soft_compress_cuda", [&] {
    soft_compress_kernel<scalar_t><<<tiles.grid, tiles.block, 0, stream>>>(
        images_c.const_data_ptr<scalar_t>(), cams_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), g,
        rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> soft_compress_backward_cuda(
    const at::Tensor& grad, const at::Tensor& images, const at::Tensor& cams, double ratio, bool need_images,
    bool need_cams) {
  deferred::raise_deferred_errors();
  check_soft_compress_inputs(images, cams, ratio, grad);
  c10::cuda::CUDAGuard guard(images.device());
  auto grad_images = need_images ? at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous))
                                 : images.new_empty({0});
  auto grad_cams = need_cams ? at::empty(cams.sizes(), cams.options().memory_format(at::MemoryFormat::Contiguous))
                             : cams.new_empty({0});
  if (images.numel() == 0) {
    grad_images.zero_();
    grad_cams.zero_();
    return {grad_images, grad_cams};
  }
  const auto images_c = images.contiguous();
  const auto cams_c = cams.contiguous();
  const auto grad_c = grad.contiguous();
  const auto g = geometry_of(images, cams);
  const auto rows = NearestAxis::make(g.height, down_extent(g.height, ratio));
  const auto cols = NearestAxis::make(g.width, down_extent(g.width, ratio));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images_c.scalar_type(), "soft_compress_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (need_images) {
      auto ranges = at::empty({2 * (g.height + g.width)}, images.options().dtype(at::kLong));
      preimage_ranges_kernel<<<blocks_for(g.height + g.width), kThreads, 0, stream>>>(
          ranges.mutable_data_ptr<int64_t>(), rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_images_kernel<scalar_t><<<blocks_for(grad_images.numel()), kThreads, 0, stream>>>(
          grad_c.const_data_ptr<scalar_t>(), cams_c.const_data_ptr<scalar_t>(), ranges.const_data_ptr<int64_t>(),
          grad_images.mutable_data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_cams) {
      auto map = at::empty({g.batch, g.height, g.width}, images.options().dtype(at::toOpMathType(images.scalar_type())));
      cam_grad_map_kernel<scalar_t, acc_t><<<blocks_for(map.numel()), kThreads, 0, stream>>>(
          grad_c.const_data_ptr<scalar_t>(), images_c.const_data_ptr<scalar_t>(), map.mutable_data_ptr<acc_t>(), g,
          rows, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t cells = grad_cams.numel();
      const auto blocks = static_cast<unsigned>(std::min<int64_t>(cells, 65535));
      grad_cams_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          map.const_data_ptr<acc_t>(), grad_cams.mutable_data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_images, grad_cams};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("soft_compress", &soft_compress_cuda);
  m.impl("_soft_compress_backward", &soft_compress_backward_cuda);
}

}  // namespace cim_ext
