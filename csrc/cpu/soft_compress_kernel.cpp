// soft_compress on CPU: hybrid = up * x + (1 - up) * down_up(x), up = bilinear(cams -> (H, W)), and its exact
// first-order backward. down_up is the same composed nearest-exact gather as compress (see resample.h).
//
// Backward, deterministic and without atomics:
// - grad_images[p, q] = grad[p, q] * up[p, q] + sum over the output pixels (y, x) whose down_up source is (p, q)
//   of (1 - up[y, x]) * grad[y, x]. The row (column) map is monotone, so the rows reading source row p form one
//   contiguous range; each input pixel gathers its range instead of the output scattering into it.
// - grad_cams = bilinear backward of G = sum_c grad * (x - down_up(x)): per output row, G is first reduced onto
//   the cam columns (parallel over rows), then every sample sums its rows in a fixed order (parallel over samples).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cam_args.h"
#include "cpu/resample.h"

// The forward must round like the reference's separate eager ops: no contraction of a * b + c into an FMA where a
// target has one by default (the explicitly fused paths below call std::fma).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace cim_ext {
namespace {

template <typename scalar_t>
using Taps = std::vector<LinearTap<scalar_t>>;

template <typename scalar_t>
Taps<scalar_t> linear_taps(int64_t in_size, int64_t out_size) {
  const bool fused = cpu_upsample_index_fused();
  Taps<scalar_t> taps(out_size);
  for (int64_t i = 0; i < out_size; ++i) {
    taps[i] = linear_tap<scalar_t>(i, in_size, out_size, fused);
  }
  return taps;
}

// [first, last) of the output indices whose source under the monotone `map` is each input index.
std::vector<std::pair<int64_t, int64_t>> preimage_ranges(const std::vector<int64_t>& map, int64_t in_size) {
  std::vector<std::pair<int64_t, int64_t>> ranges(in_size, {0, 0});
  const int64_t out_size = static_cast<int64_t>(map.size());
  for (int64_t i = 0; i < out_size;) {
    int64_t j = i;
    while (j < out_size && map[j] == map[i]) {
      ++j;
    }
    ranges[map[i]] = {i, j};
    i = j;
  }
  return ranges;
}

struct Geometry {
  int64_t batch, channels, height, width, cam_h, cam_w;
};

// Rows of up[b] = bilinear(cams[b] -> H x W) with the arithmetic of the ATen CPU kernel that F.interpolate picks
// for a [B, 1, h, w] input, so that `up` matches the reference bit for bit:
// - H + W > 128, generic kernel: interpolate along x within each source row, then combine the two rows. The
//   x-interpolated cam rows are shared by many output rows, so they are computed once per sample.
// - H + W <= 128, channels-last kernel: one weighted sum of the four taps with weights w_y * w_x.
// The vectorised ATen builds evaluate a * b + c * d as fma(a, b, c * d) and fold further terms in with FMAs
// (cpu_upsample_index_fused says whether this process runs them); the fused variants spell those FMAs out and
// are compiled for FMA hardware, which a process running ATen's FMA kernels has.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CIM_EXT_TARGET_FMA __attribute__((target("fma")))
#else
#define CIM_EXT_TARGET_FMA
#endif

template <typename scalar_t>
CIM_EXT_TARGET_FMA void lerp_taps_fused(const scalar_t* src, const Taps<scalar_t>& taps, scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = std::fma(src[taps[x].i0], taps[x].w0, src[taps[x].i1] * taps[x].w1);
  }
}

template <typename scalar_t>
void lerp_taps_unfused(const scalar_t* src, const Taps<scalar_t>& taps, scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = src[taps[x].i0] * taps[x].w0 + src[taps[x].i1] * taps[x].w1;
  }
}

template <typename scalar_t>
CIM_EXT_TARGET_FMA void lerp_rows_fused(
    const scalar_t* upper, const scalar_t* lower, scalar_t w0, scalar_t w1, scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = std::fma(upper[x], w0, lower[x] * w1);
  }
}

template <typename scalar_t>
void lerp_rows_unfused(
    const scalar_t* upper, const scalar_t* lower, scalar_t w0, scalar_t w1, scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    dst[x] = upper[x] * w0 + lower[x] * w1;
  }
}

template <typename scalar_t>
CIM_EXT_TARGET_FMA void four_taps_fused(
    const scalar_t* top, const scalar_t* bottom, const LinearTap<scalar_t>& ty, const Taps<scalar_t>& xtaps,
    scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const auto& tx = xtaps[x];
    const scalar_t w00 = ty.w0 * tx.w0, w01 = ty.w0 * tx.w1, w10 = ty.w1 * tx.w0, w11 = ty.w1 * tx.w1;
    dst[x] = std::fma(bottom[tx.i1], w11, std::fma(bottom[tx.i0], w10, std::fma(top[tx.i0], w00, top[tx.i1] * w01)));
  }
}

template <typename scalar_t>
void four_taps_unfused(
    const scalar_t* top, const scalar_t* bottom, const LinearTap<scalar_t>& ty, const Taps<scalar_t>& xtaps,
    scalar_t* dst, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const auto& tx = xtaps[x];
    const scalar_t w00 = ty.w0 * tx.w0, w01 = ty.w0 * tx.w1, w10 = ty.w1 * tx.w0, w11 = ty.w1 * tx.w1;
    dst[x] = top[tx.i0] * w00 + top[tx.i1] * w01 + bottom[tx.i0] * w10 + bottom[tx.i1] * w11;
  }
}

// Writes rows of up; one instance per thread (it caches the x-interpolated cam rows of the last sample).
template <typename scalar_t>
class CamUpsampler {
 public:
  CamUpsampler(const scalar_t* cams, const Geometry& g, const Taps<scalar_t>& ytaps, const Taps<scalar_t>& xtaps)
      : cams_(cams), g_(g), ytaps_(ytaps), xtaps_(xtaps), fused_(cpu_upsample_index_fused()),
        generic_(g.height + g.width > 128) {}

  void row(int64_t b, int64_t y, scalar_t* dst) {
    const auto& ty = ytaps_[y];
    const scalar_t* cam = cams_ + b * g_.cam_h * g_.cam_w;
    if (!generic_) {
      const scalar_t* top = cam + ty.i0 * g_.cam_w;
      const scalar_t* bottom = cam + ty.i1 * g_.cam_w;
      fused_ ? four_taps_fused(top, bottom, ty, xtaps_, dst, g_.width)
             : four_taps_unfused(top, bottom, ty, xtaps_, dst, g_.width);
      return;
    }
    if (b != cached_sample_) {
      xrows_.resize(g_.cam_h * g_.width);
      for (int64_t i = 0; i < g_.cam_h; ++i) {
        fused_ ? lerp_taps_fused(cam + i * g_.cam_w, xtaps_, xrows_.data() + i * g_.width, g_.width)
               : lerp_taps_unfused(cam + i * g_.cam_w, xtaps_, xrows_.data() + i * g_.width, g_.width);
      }
      cached_sample_ = b;
    }
    const scalar_t* upper = xrows_.data() + ty.i0 * g_.width;
    const scalar_t* lower = xrows_.data() + ty.i1 * g_.width;
    fused_ ? lerp_rows_fused(upper, lower, ty.w0, ty.w1, dst, g_.width)
           : lerp_rows_unfused(upper, lower, ty.w0, ty.w1, dst, g_.width);
  }

 private:
  const scalar_t* cams_;
  const Geometry& g_;
  const Taps<scalar_t>& ytaps_;
  const Taps<scalar_t>& xtaps_;
  bool fused_;
  bool generic_;
  int64_t cached_sample_ = -1;
  std::vector<scalar_t> xrows_;
};

Geometry geometry_of(const at::Tensor& images, const at::Tensor& cams) {
  return {images.size(0), images.size(1), images.size(2), images.size(3), cams.size(1), cams.size(2)};
}

int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_row));
}

template <typename scalar_t>
void soft_compress_kernel_impl(
    const scalar_t* images, const scalar_t* cams, scalar_t* output, const Geometry& g, const ResampleMaps& maps) {
  const auto ytaps = linear_taps<scalar_t>(g.cam_h, g.height);
  const auto xtaps = linear_taps<scalar_t>(g.cam_w, g.width);
  const int64_t plane = g.height * g.width;
  at::parallel_for(0, g.batch * g.height, row_grain(g.width * g.channels), [&](int64_t begin, int64_t end) {
    CamUpsampler<scalar_t> upsampler(cams, g, ytaps, xtaps);
    std::vector<scalar_t> up(g.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height;
      upsampler.row(b, y, up.data());
      for (int64_t c = 0; c < g.channels; ++c) {
        const scalar_t* source = images + (b * g.channels + c) * plane;
        const scalar_t* x_row = source + y * g.width;
        const scalar_t* d_row = source + maps.rows[y] * g.width;
        scalar_t* dst = output + (b * g.channels + c) * plane + y * g.width;
        for (int64_t x = 0; x < g.width; ++x) {
          const scalar_t u = up[x];
          // Same operations, in the same precision and order, as the reference's eager expression.
          dst[x] = u * x_row[x] + (scalar_t(1) - u) * d_row[maps.cols[x]];
        }
      }
    }
  });
}

template <typename scalar_t>
void grad_images_impl(
    const scalar_t* grad, const scalar_t* up, scalar_t* grad_images, const Geometry& g, const ResampleMaps& maps) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto row_ranges = preimage_ranges(maps.rows, g.height);
  const auto col_ranges = preimage_ranges(maps.cols, g.width);
  const int64_t plane = g.height * g.width;
  at::parallel_for(0, g.batch * g.channels * g.height, row_grain(2 * g.width), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> column_sums(g.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row % g.height, bc = row / g.height, b = bc / g.channels;
      const scalar_t* g_plane = grad + bc * plane;
      const scalar_t* u_plane = up + b * plane;
      scalar_t* dst = grad_images + row * g.width;
      for (int64_t q = 0; q < g.width; ++q) {
        dst[q] = g_plane[p * g.width + q] * u_plane[p * g.width + q];
      }
      const auto [y_first, y_last] = row_ranges[p];
      if (y_first == y_last) {
        continue;
      }
      std::fill(column_sums.begin(), column_sums.end(), opmath_t(0));
      for (int64_t y = y_first; y < y_last; ++y) {
        for (int64_t x = 0; x < g.width; ++x) {
          column_sums[x] += (opmath_t(1) - u_plane[y * g.width + x]) * g_plane[y * g.width + x];
        }
      }
      for (int64_t q = 0; q < g.width; ++q) {
        const auto [x_first, x_last] = col_ranges[q];
        if (x_first == x_last) {
          continue;
        }
        opmath_t sum = dst[q];
        for (int64_t x = x_first; x < x_last; ++x) {
          sum += column_sums[x];
        }
        dst[q] = static_cast<scalar_t>(sum);
      }
    }
  });
}

// For every cam column j, the output columns [first, last) whose bilinear taps touch j and the weight of j in each
// (the two taps of an output pixel may both land on j at the border).
template <typename acc_t>
struct Footprints {
  std::vector<int64_t> first, last, offset;
  std::vector<acc_t> weights;  // footprint of j at weights[offset[j] : offset[j] + last[j] - first[j]]
};

template <typename acc_t, typename scalar_t>
Footprints<acc_t> footprints(const Taps<scalar_t>& taps, int64_t cam_size) {
  const int64_t out_size = static_cast<int64_t>(taps.size());
  Footprints<acc_t> f;
  f.first.assign(cam_size, out_size);
  f.last.assign(cam_size, 0);
  for (int64_t x = 0; x < out_size; ++x) {
    for (const int64_t j : {taps[x].i0, taps[x].i1}) {
      f.first[j] = std::min(f.first[j], x);
      f.last[j] = std::max(f.last[j], x + 1);
    }
  }
  f.offset.assign(cam_size, 0);
  int64_t total = 0;
  for (int64_t j = 0; j < cam_size; ++j) {
    f.last[j] = std::max(f.last[j], f.first[j]);
    f.offset[j] = total;
    total += f.last[j] - f.first[j];
  }
  f.weights.assign(total, acc_t(0));
  for (int64_t x = 0; x < out_size; ++x) {
    const auto& tap = taps[x];
    f.weights[f.offset[tap.i0] + x - f.first[tap.i0]] += static_cast<acc_t>(tap.w0);
    f.weights[f.offset[tap.i1] + x - f.first[tap.i1]] += static_cast<acc_t>(tap.w1);
  }
  return f;
}

template <typename scalar_t>
void grad_cams_impl(
    const scalar_t* grad, const scalar_t* images, scalar_t* grad_cams, const Geometry& g, const ResampleMaps& maps) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const auto ytaps = linear_taps<scalar_t>(g.cam_h, g.height);
  const auto columns = footprints<acc_t>(linear_taps<scalar_t>(g.cam_w, g.width), g.cam_w);
  const int64_t plane = g.height * g.width;
  // Stage 1, parallel over output rows: G = sum_c grad * (x - down_up(x)) along the row, reduced onto the cam
  // columns (each cam column gathers its footprint, with two partial sums to shorten the dependency chain).
  std::vector<acc_t> row_partials(g.batch * g.height * g.cam_w, acc_t(0));
  at::parallel_for(0, g.batch * g.height, row_grain(g.width * g.channels), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> diff(g.width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.height, y = row % g.height;
      std::fill(diff.begin(), diff.end(), opmath_t(0));
      for (int64_t c = 0; c < g.channels; ++c) {
        const int64_t offset = (b * g.channels + c) * plane;
        const scalar_t* g_row = grad + offset + y * g.width;
        const scalar_t* x_row = images + offset + y * g.width;
        const scalar_t* d_row = images + offset + maps.rows[y] * g.width;
        for (int64_t x = 0; x < g.width; ++x) {
          diff[x] += static_cast<opmath_t>(g_row[x]) *
              (static_cast<opmath_t>(x_row[x]) - static_cast<opmath_t>(d_row[maps.cols[x]]));
        }
      }
      acc_t* partial = row_partials.data() + row * g.cam_w;
      for (int64_t j = 0; j < g.cam_w; ++j) {
        const acc_t* w = columns.weights.data() + columns.offset[j] - columns.first[j];
        acc_t even = 0, odd = 0;
        int64_t x = columns.first[j];
        for (; x + 1 < columns.last[j]; x += 2) {
          even += w[x] * static_cast<acc_t>(diff[x]);
          odd += w[x + 1] * static_cast<acc_t>(diff[x + 1]);
        }
        if (x < columns.last[j]) {
          even += w[x] * static_cast<acc_t>(diff[x]);
        }
        partial[j] = even + odd;
      }
    }
  });
  // Stage 2, parallel over samples: each sample sums its rows onto the cam rows, in row order.
  at::parallel_for(0, g.batch, row_grain(2 * g.height * g.cam_w), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(g.cam_h * g.cam_w);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t y = 0; y < g.height; ++y) {
        const auto& ty = ytaps[y];
        const acc_t* partial = row_partials.data() + (b * g.height + y) * g.cam_w;
        for (int64_t j = 0; j < g.cam_w; ++j) {
          sums[ty.i0 * g.cam_w + j] += static_cast<acc_t>(ty.w0) * partial[j];
          sums[ty.i1 * g.cam_w + j] += static_cast<acc_t>(ty.w1) * partial[j];
        }
      }
      std::copy(sums.begin(), sums.end(), grad_cams + b * g.cam_h * g.cam_w);
    }
  });
}

at::Tensor soft_compress_cpu(const at::Tensor& images, const at::Tensor& cams, double ratio) {
  check_soft_compress_inputs(images, cams, ratio);
  auto output = at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto maps = cpu_down_up_maps(images, ratio);  // before contiguous(): the reference sees this layout
  const auto images_c = images.contiguous();
  const auto cams_c = cams.contiguous();
  const auto g = geometry_of(images, cams);
  AT_DISPATCH_FLOATING_TYPES(images_c.scalar_type(), "soft_compress_cpu", [&] {
    soft_compress_kernel_impl<scalar_t>(
        images_c.const_data_ptr<scalar_t>(), cams_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
        g, maps);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> soft_compress_backward_cpu(
    const at::Tensor& grad, const at::Tensor& images, const at::Tensor& cams, double ratio, bool need_images,
    bool need_cams) {
  check_soft_compress_inputs(images, cams, ratio, grad);
  auto grad_images = need_images ? at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous))
                                 : images.new_empty({0});
  auto grad_cams = need_cams ? at::zeros(cams.sizes(), cams.options()) : cams.new_empty({0});
  if (images.numel() == 0 || !(need_images || need_cams)) {
    if (need_images) {
      grad_images.zero_();
    }
    return {grad_images, grad_cams};
  }
  const auto maps = cpu_down_up_maps(images, ratio);
  const auto images_c = images.contiguous();
  const auto cams_c = cams.contiguous();
  const auto grad_c = grad.contiguous();
  const auto g = geometry_of(images, cams);
  AT_DISPATCH_FLOATING_TYPES(images_c.scalar_type(), "soft_compress_backward_cpu", [&] {
    if (need_images) {
      auto up = at::empty({g.batch, g.height, g.width}, images.options());
      const auto ytaps = linear_taps<scalar_t>(g.cam_h, g.height);
      const auto xtaps = linear_taps<scalar_t>(g.cam_w, g.width);
      const scalar_t* cams_data = cams_c.const_data_ptr<scalar_t>();
      scalar_t* up_data = up.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.batch * g.height, row_grain(g.width), [&](int64_t begin, int64_t end) {
        CamUpsampler<scalar_t> upsampler(cams_data, g, ytaps, xtaps);
        for (int64_t row = begin; row < end; ++row) {
          upsampler.row(row / g.height, row % g.height, up_data + row * g.width);
        }
      });
      grad_images_impl<scalar_t>(
          grad_c.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), grad_images.mutable_data_ptr<scalar_t>(),
          g, maps);
    }
    if (need_cams) {
      grad_cams_impl<scalar_t>(
          grad_c.const_data_ptr<scalar_t>(), images_c.const_data_ptr<scalar_t>(),
          grad_cams.mutable_data_ptr<scalar_t>(), g, maps);
    }
  });
  return {grad_images, grad_cams};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("soft_compress", &soft_compress_cpu);
  m.impl("_soft_compress_backward", &soft_compress_backward_cpu);
}

}  // namespace cim_ext
