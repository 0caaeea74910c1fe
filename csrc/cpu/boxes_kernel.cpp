// CPU kernels of cam_boxes, otsu_threshold and cam_to_boxes. Each sample is upsampled row by row into a small
// table (see cam_cpu::Upsampler); the full-resolution map is never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "cam_args.h"
#include "cpu/cam_common.h"

namespace cim_ext {
namespace {

// Per-sample (H, W) of the resolved sizes (kept alive here: they may be a converted copy of the argument).
struct HostSizes {
  explicit HostSizes(Sizes resolved)
      : sizes(std::move(resolved)),
        hw(sizes.per_sample.defined() ? sizes.per_sample.const_data_ptr<int64_t>() : nullptr) {}
  int64_t H(int64_t b) const { return hw ? hw[2 * b] : sizes.height; }
  int64_t W(int64_t b) const { return hw ? hw[2 * b + 1] : sizes.width; }
  Sizes sizes;
  const int64_t* hw;
};

template <typename scalar_t>
scalar_t threshold_of(const Thresholds& thresholds, const scalar_t* per_sample, int64_t b) {
  return per_sample ? per_sample[b] : static_cast<scalar_t>(thresholds.value);
}

at::Tensor cam_boxes_cpu(const at::Tensor& cams, at::OptionalIntArrayRef size, const std::optional<at::Tensor>& sizes,
                         double threshold, const std::optional<at::Tensor>& thresholds) {
  check_maps(cams);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const HostSizes hs(resolve_sizes(size, sizes, batch, cams, "cams"));
  const auto thr = resolve_thresholds(threshold, thresholds, batch, cams, cams.scalar_type());
  auto boxes = at::empty({batch, 4}, cams.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto cams_c = cams.contiguous();
  int64_t* out = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(cams.scalar_type(), "cam_boxes_cpu", [&] {
    const scalar_t* maps = cams_c.const_data_ptr<scalar_t>();
    const scalar_t* per_sample = thr.per_sample.defined() ? thr.per_sample.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cam_cpu::tight_box(maps + b * height * width, height, width, hs.H(b), hs.W(b),
                           threshold_of(thr, per_sample, b), out + 4 * b);
      }
    });
  });
  return boxes;
}

at::Tensor otsu_threshold_cpu(const at::Tensor& cams, at::OptionalIntArrayRef size,
                              const std::optional<at::Tensor>& sizes, int64_t bins) {
  check_maps(cams);
  check_bins(bins);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const HostSizes hs(resolve_sizes(size, sizes, batch, cams, "cams"));
  auto out = at::empty({batch}, cams.options());
  if (batch == 0) return out;
  const auto cams_c = cams.contiguous();
  AT_DISPATCH_FLOATING_TYPES(cams.scalar_type(), "otsu_threshold_cpu", [&] {
    const scalar_t* maps = cams_c.const_data_ptr<scalar_t>();
    scalar_t* thr = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> hist;
      std::vector<int32_t> row_bins;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t k = cam_cpu::otsu_split(maps + b * height * width, height, width, hs.H(b), hs.W(b), bins, hist,
                                              row_bins);
        thr[b] = cam_cpu::otsu_value<scalar_t>(k, bins);
      }
    });
  });
  return out;
}

at::Tensor cam_to_boxes_cpu(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels,
                            at::OptionalIntArrayRef size, const std::optional<at::Tensor>& sizes, double threshold,
                            const std::optional<at::Tensor>& thresholds, int64_t bins) {
  const auto labels_c = checked_labels(fmaps, weight, labels);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  CIM_CHECK_ARG(height >= 1 && width >= 1, "fmaps", "maps of at least 1x1", c10::str("shape ", fmaps.sizes()));
  const HostSizes hs(resolve_sizes(size, sizes, batch, fmaps, "fmaps"));
  // bins > 0 selects Otsu thresholds; the fixed threshold arguments are then ignored.
  const bool otsu = bins != 0;
  if (otsu) check_bins(bins);
  const auto thr = otsu ? Thresholds{} : resolve_thresholds(threshold, thresholds, batch, fmaps, fmaps.scalar_type());
  auto boxes = at::empty({batch, 4}, fmaps.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto layout = fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  const int64_t* lab = labels_c.const_data_ptr<int64_t>();
  const int64_t pixels = height * width;
  int64_t* out = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(fmaps.scalar_type(), "cam_to_boxes_cpu", [&] {
    const scalar_t* f = layout.fmaps.const_data_ptr<scalar_t>();
    const scalar_t* w = weight_c.const_data_ptr<scalar_t>();
    const scalar_t* per_sample = thr.per_sample.defined() ? thr.per_sample.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> map(pixels);
      std::vector<int64_t> hist;
      std::vector<int32_t> row_bins;
      for (int64_t b = begin; b < end; ++b) {
        cam_cpu::raw_cam(f + b * channels * pixels, w + lab[b] * channels, channels, pixels, layout.channels_last,
                         map.data());
        cam_cpu::normalize(map.data(), pixels);
        const int64_t H = hs.H(b), W = hs.W(b);
        const scalar_t cut =
            otsu ? cam_cpu::otsu_value<scalar_t>(
                       cam_cpu::otsu_split(map.data(), height, width, H, W, bins, hist, row_bins), bins)
                 : threshold_of(thr, per_sample, b);
        cam_cpu::tight_box(map.data(), height, width, H, W, cut, out + 4 * b);
      }
    });
  });
  return boxes;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("cam_boxes", &cam_boxes_cpu);
  m.impl("otsu_threshold", &otsu_threshold_cpu);
  m.impl("cam_to_boxes", &cam_to_boxes_cpu);
}

}  // namespace cim_ext
