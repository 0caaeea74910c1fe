// CPU kernels of cam_boxes, otsu_threshold and cam_to_boxes. Each sample is upsampled row by row into a small
// table (see cam_cpu::Upsampler); the full-resolution map is never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/cam_common.h"

namespace cim_ext {
namespace {

// More bins than this cannot be resolved by a float32 map and would only cost memory.
constexpr int64_t kMaxBins = int64_t(1) << 20;

void check_maps(const char* op, const at::Tensor& cams) {
  TORCH_CHECK(cams.dim() == 3, op, ": cams must be a 3-D tensor [B, h, w], got shape ", cams.sizes());
  TORCH_CHECK(cams.scalar_type() == at::kFloat || cams.scalar_type() == at::kDouble, op,
              ": cams must be float32 or float64 on CPU, got ", cams.scalar_type());
  TORCH_CHECK(cams.device().is_cpu(), op, ": cams must be on the CPU, got ", cams.device());
  TORCH_CHECK(cams.size(0) == 0 || (cams.size(1) > 0 && cams.size(2) > 0), op,
              ": cams must be maps of at least 1x1, got shape ", cams.sizes());
}

at::Tensor checked_sizes(const char* op, const at::Tensor& sizes, int64_t batch) {
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == batch && sizes.size(1) == 2, op, ": sizes must be [", batch,
              ", 2] (H, W per sample), got shape ", sizes.sizes());
  TORCH_CHECK(sizes.scalar_type() == at::kLong, op, ": sizes must be int64, got ", sizes.scalar_type());
  TORCH_CHECK(sizes.device().is_cpu(), op, ": sizes must be on the CPU like the maps, got ", sizes.device());
  auto out = sizes.contiguous();
  const int64_t* hw = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * batch; ++i) {
    TORCH_CHECK(hw[i] >= 1, op, ": sizes must be positive, got ", hw[i], " for sample ", i / 2);
  }
  return out;
}

at::Tensor checked_thresholds(const char* op, const at::Tensor& thresholds, int64_t batch, at::ScalarType dtype) {
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == batch, op, ": thresholds must be [", batch,
              "], got shape ", thresholds.sizes());
  TORCH_CHECK(thresholds.scalar_type() == dtype, op, ": thresholds must have dtype ", dtype, " like the maps, got ",
              thresholds.scalar_type());
  TORCH_CHECK(thresholds.device().is_cpu(), op, ": thresholds must be on the CPU, got ", thresholds.device());
  return thresholds.contiguous();
}

at::Tensor cam_boxes_cpu(const at::Tensor& cams, const at::Tensor& sizes, const at::Tensor& thresholds) {
  check_maps("cam_boxes", cams);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const auto sizes_c = checked_sizes("cam_boxes", sizes, batch);
  const auto thresholds_c = checked_thresholds("cam_boxes", thresholds, batch, cams.scalar_type());
  auto boxes = at::zeros({batch, 4}, cams.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto cams_c = cams.contiguous();
  const int64_t* hw = sizes_c.data_ptr<int64_t>();
  int64_t* out = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(cams.scalar_type(), "cam_boxes_cpu", [&] {
    const scalar_t* maps = cams_c.data_ptr<scalar_t>();
    const scalar_t* thr = thresholds_c.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cam_cpu::tight_box(maps + b * height * width, height, width, hw[2 * b], hw[2 * b + 1], thr[b], out + 4 * b);
      }
    });
  });
  return boxes;
}

at::Tensor otsu_threshold_cpu(const at::Tensor& cams, const at::Tensor& sizes, int64_t bins) {
  check_maps("otsu_threshold", cams);
  TORCH_CHECK(bins >= 1 && bins <= kMaxBins, "otsu_threshold: bins must be in [1, ", kMaxBins, "], got ", bins);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const auto sizes_c = checked_sizes("otsu_threshold", sizes, batch);
  auto out = at::empty({batch}, cams.options());
  if (batch == 0) return out;
  const auto cams_c = cams.contiguous();
  const int64_t* hw = sizes_c.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(cams.scalar_type(), "otsu_threshold_cpu", [&] {
    const scalar_t* maps = cams_c.data_ptr<scalar_t>();
    scalar_t* thr = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> hist;
      std::vector<int32_t> row_bins;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t k = cam_cpu::otsu_split(maps + b * height * width, height, width, hw[2 * b], hw[2 * b + 1],
                                              bins, hist, row_bins);
        thr[b] = cam_cpu::otsu_value<scalar_t>(k, bins);
      }
    });
  });
  return out;
}

at::Tensor cam_to_boxes_cpu(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels,
                            const at::Tensor& sizes, const at::Tensor& thresholds, int64_t bins) {
  cam_cpu::check_cam_inputs("cam_to_boxes", fmaps, weight, labels);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  TORCH_CHECK(batch == 0 || (height > 0 && width > 0), "cam_to_boxes: fmaps must be maps of at least 1x1, got shape ",
              fmaps.sizes());
  const auto sizes_c = checked_sizes("cam_to_boxes", sizes, batch);
  TORCH_CHECK(bins <= kMaxBins, "cam_to_boxes: bins must be <= ", kMaxBins, ", got ", bins);
  // With Otsu (bins > 0) the thresholds argument is ignored.
  const auto thresholds_c =
      bins > 0 ? at::Tensor() : checked_thresholds("cam_to_boxes", thresholds, batch, fmaps.scalar_type());
  auto boxes = at::zeros({batch, 4}, fmaps.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto layout = cam_cpu::fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  const auto labels_c = labels.contiguous();
  const int64_t* hw = sizes_c.data_ptr<int64_t>();
  const int64_t* lab = labels_c.data_ptr<int64_t>();
  const int64_t pixels = height * width;
  int64_t* out = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(fmaps.scalar_type(), "cam_to_boxes_cpu", [&] {
    const scalar_t* f = layout.fmaps.data_ptr<scalar_t>();
    const scalar_t* w = weight_c.data_ptr<scalar_t>();
    const scalar_t* thr = bins > 0 ? nullptr : thresholds_c.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> map(pixels);
      std::vector<int64_t> hist;
      std::vector<int32_t> row_bins;
      for (int64_t b = begin; b < end; ++b) {
        cam_cpu::raw_cam(f + b * channels * pixels, w + lab[b] * channels, channels, pixels, layout.channels_last,
                         map.data());
        cam_cpu::normalize(map.data(), pixels);
        const int64_t H = hw[2 * b], W = hw[2 * b + 1];
        const scalar_t threshold =
            bins > 0 ? cam_cpu::otsu_value<scalar_t>(
                           cam_cpu::otsu_split(map.data(), height, width, H, W, bins, hist, row_bins), bins)
                     : thr[b];
        cam_cpu::tight_box(map.data(), height, width, H, W, threshold, out + 4 * b);
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
