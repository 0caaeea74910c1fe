// CPU kernels of cam and _cam_backward: class activation maps and their gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cam_args.h"
#include "cpu/cam_common.h"

namespace cim_ext {
namespace {

template <typename scalar_t>
void cam_kernel_impl(const scalar_t* fmaps, const scalar_t* weight, const int64_t* labels, int64_t batch,
                     int64_t channels, int64_t pixels, bool channels_last, bool normalize, scalar_t* out) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* map = out + b * pixels;
      cam_cpu::raw_cam(fmaps + b * channels * pixels, weight + labels[b] * channels, channels, pixels,
                       channels_last, map);
      if (normalize) cam_cpu::normalize(map, pixels);
    }
  });
}

at::Tensor cam_forward_cpu(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels, bool normalize) {
  const auto labels_c = checked_labels(fmaps, weight, labels);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  auto out = at::empty({batch, height, width}, fmaps.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto layout = fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(fmaps.scalar_type(), "cam_cpu", [&] {
    cam_kernel_impl<scalar_t>(layout.fmaps.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(),
                              labels_c.data_ptr<int64_t>(), batch, channels, height * width, layout.channels_last,
                              normalize, out.data_ptr<scalar_t>());
  });
  return out;
}

// Gradient of the loss with respect to the raw map of one sample. With normalisation, out = (raw - low) / span
// gives d/d raw = grad / span plus the min and max terms, which (like torch.amin/amax) go to the argmin/argmax
// elements, split evenly among ties. A constant map has zero gradient.
template <typename scalar_t>
void raw_grad(const scalar_t* g, const scalar_t* fmaps, const scalar_t* weight, int64_t channels, int64_t pixels,
              bool channels_last, bool normalize, scalar_t* raw, scalar_t* out) {
  if (!normalize) {
    std::copy(g, g + pixels, out);
    return;
  }
  cam_cpu::raw_cam(fmaps, weight, channels, pixels, channels_last, raw);
  const auto mm = cam_cpu::min_max(raw, pixels);
  const scalar_t low = static_cast<scalar_t>(mm.low), high = static_cast<scalar_t>(mm.high);
  const scalar_t span = high - low;
  if (!(span > scalar_t(0))) {
    std::fill(out, out + pixels, scalar_t(0));
    return;
  }
  int64_t n_low = 0, n_high = 0;
  double sum_g = 0, sum_gd = 0;
  for (int64_t p = 0; p < pixels; ++p) {
    n_low += raw[p] == low;
    n_high += raw[p] == high;
    sum_g += static_cast<double>(g[p]);
    sum_gd += static_cast<double>(g[p]) * static_cast<double>(raw[p] - low);
  }
  const double s = static_cast<double>(span);
  const double d_high = -sum_gd / (s * s);
  const double d_low = -sum_g / s - d_high;
  const double share_low = d_low / n_low, share_high = d_high / n_high;
  for (int64_t p = 0; p < pixels; ++p) {
    double v = static_cast<double>(g[p]) / s;
    if (raw[p] == low) v += share_low;
    if (raw[p] == high) v += share_high;
    out[p] = static_cast<scalar_t>(v);
  }
}

// One pass over each sample's feature maps (in cache): raw-map gradient, grad_fmaps and the per-channel dot
// products dots[b, c]. The weight rows then gather dots in batch order, so grad_weight is deterministic.
template <typename scalar_t>
void cam_backward_impl(const scalar_t* grad, const scalar_t* fmaps, const scalar_t* weight, const int64_t* labels,
                       int64_t batch, int64_t channels, int64_t pixels, bool channels_last, bool normalize,
                       scalar_t* grad_fmaps, scalar_t* grad_weight) {
  std::vector<scalar_t> dots(grad_weight != nullptr ? batch * channels : 0);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> raw(pixels), graw(pixels);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* f = fmaps + b * channels * pixels;
      const scalar_t* w = weight + labels[b] * channels;
      raw_grad(grad + b * pixels, f, w, channels, pixels, channels_last, normalize, raw.data(), graw.data());
      const scalar_t* g = graw.data();
      scalar_t* d = grad_weight != nullptr ? dots.data() + b * channels : nullptr;
      if (d != nullptr && channels_last) {
        std::fill(d, d + channels, scalar_t(0));
        for (int64_t p = 0; p < pixels; ++p) {
          const scalar_t* __restrict__ fp = f + p * channels;
          const scalar_t gp = g[p];
          for (int64_t c = 0; c < channels; ++c) d[c] += fp[c] * gp;
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        if (grad_fmaps != nullptr) {
          scalar_t* __restrict__ dst = grad_fmaps + (b * channels + c) * pixels;
          const scalar_t wc = w[c];
          for (int64_t p = 0; p < pixels; ++p) dst[p] = wc * g[p];
        }
        if (d != nullptr && !channels_last) d[c] = cam_cpu::dot(f + c * pixels, g, pixels);
      }
    }
  });
  if (grad_weight != nullptr) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, batch));
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < batch; ++b) {
        scalar_t* row = grad_weight + labels[b] * channels;
        const scalar_t* d = dots.data() + b * channels;
        for (int64_t c = begin; c < end; ++c) row[c] += d[c];
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> cam_backward_cpu(const at::Tensor& grad, const at::Tensor& fmaps,
                                                    const at::Tensor& weight, const at::Tensor& labels,
                                                    bool normalize, bool need_fmaps, bool need_weight) {
  const auto labels_c = checked_labels(fmaps, weight, labels);
  check_cam_grad(grad, fmaps);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  auto grad_fmaps = need_fmaps ? at::empty(fmaps.sizes(), fmaps.options().memory_format(at::MemoryFormat::Contiguous))
                               : fmaps.new_empty({0});
  auto grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options()) : weight.new_empty({0});
  const int64_t pixels = height * width;
  if ((!need_fmaps && !need_weight) || batch * channels * pixels == 0) return {grad_fmaps, grad_weight};
  const auto layout = fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  const auto grad_c = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES(fmaps.scalar_type(), "cam_backward_cpu", [&] {
    cam_backward_impl<scalar_t>(grad_c.data_ptr<scalar_t>(), layout.fmaps.data_ptr<scalar_t>(),
                                weight_c.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(), batch, channels, pixels,
                                layout.channels_last, normalize,
                                need_fmaps ? grad_fmaps.data_ptr<scalar_t>() : nullptr,
                                need_weight ? grad_weight.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_fmaps, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("cam", &cam_forward_cpu);
  m.impl("_cam_backward", &cam_backward_cpu);
}

}  // namespace cim_ext
