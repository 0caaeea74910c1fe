// Host-side argument checks and argument resolution of cam, _cam_backward, cam_boxes, otsu_threshold, cam_to_boxes
// and soft_compress, shared by the CPU and CUDA host functions. Metadata is checked for every device; values
// (labels, sizes, NaN) are checked here only for CPU tensors, whose data the host can read for free. CUDA kernels
// check values themselves and report through csrc/cuda/deferred_errors.cuh, so no call waits for the device.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"

namespace cim_ext {

// More bins than this cannot be resolved by a float32 map and would only cost memory.
constexpr int64_t kMaxBins = int64_t(1) << 20;

// fmaps as the kernels read them: NCHW-contiguous, or NHWC-contiguous (channels_last) left as it is.
struct FmapsLayout {
  at::Tensor fmaps;
  bool channels_last;
};

inline FmapsLayout fmaps_layout(const at::Tensor& fmaps) {
  if (channels_last_only(fmaps)) return {fmaps, true};
  return {fmaps.contiguous(), false};
}

// Half precision is computed by the CUDA kernels; on the CPU it reaches the kernels only through autocast, which
// casts to float32 first.
inline void check_float_input(const at::Tensor& tensor, const char* name) {
  check_float(tensor, name, tensor.is_cuda());
}

// (fmaps, weight, labels) of the CAM ops; returns the labels as contiguous int64.
inline at::Tensor checked_labels(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels) {
  check_dim(fmaps, "fmaps", 4, "[B, C, h, w]");
  check_float_input(fmaps, "fmaps");
  check_dim(weight, "weight", 2, "[K, C]");
  check_same_device(weight, "weight", fmaps, "fmaps");
  check_same_dtype(weight, "weight", fmaps, "fmaps");
  CIM_CHECK_ARG(weight.size(1) == fmaps.size(1), "weight", c10::str("shape [K, ", fmaps.size(1), "] (C of fmaps)"),
                c10::str("shape ", weight.sizes()));
  CIM_CHECK_ARG(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), "labels", "an integer tensor",
                labels.scalar_type());
  CIM_CHECK_ARG(labels.dim() == 1 && labels.size(0) == fmaps.size(0), "labels",
                c10::str("shape (", fmaps.size(0), ",) (one label per sample)"), c10::str("shape ", labels.sizes()));
  check_same_device(labels, "labels", fmaps, "fmaps");
  auto out = labels.to(at::kLong).contiguous();
  if (out.is_cpu()) {
    const int64_t* lab = out.const_data_ptr<int64_t>();
    const int64_t classes = weight.size(0);
    for (int64_t b = 0; b < out.numel(); ++b) {
      CIM_CHECK_ARG(lab[b] >= 0 && lab[b] < classes, "labels",
                    c10::str("values in [0, ", classes, ") (rows of weight)"), c10::str(lab[b], " at index ", b));
    }
  }
  return out;
}

// The incoming gradient of _cam_backward: [B, h, w] like the maps cam returned.
inline void check_cam_grad(const at::Tensor& grad, const at::Tensor& fmaps) {
  CIM_CHECK_ARG(grad.dim() == 3 && grad.size(0) == fmaps.size(0) && grad.size(1) == fmaps.size(2) &&
                    grad.size(2) == fmaps.size(3),
                "grad", c10::str("shape (", fmaps.size(0), ", ", fmaps.size(2), ", ", fmaps.size(3), ")"),
                c10::str("shape ", grad.sizes()));
  check_same_device(grad, "grad", fmaps, "fmaps");
  check_same_dtype(grad, "grad", fmaps, "fmaps");
}

inline void check_no_nan(const at::Tensor& tensor, const char* name) {
  if (!tensor.is_cpu() || tensor.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor.scalar_type(), "check_no_nan", [&] {
    const auto flat = tensor.contiguous();
    const scalar_t* data = flat.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < flat.numel(); ++i) {
      CIM_CHECK_ARG(!std::isnan(static_cast<double>(data[i])), name, "no NaN", c10::str("NaN at flat index ", i));
    }
  });
}

// cams [B, h, w] of the box ops and soft_compress, h, w >= 1.
inline void check_maps(const at::Tensor& cams) {
  check_dim(cams, "cams", 3, "[B, h, w]");
  check_float_input(cams, "cams");
  CIM_CHECK_ARG(cams.size(1) >= 1 && cams.size(2) >= 1, "cams", "maps of at least 1x1",
                c10::str("shape ", cams.sizes()));
  check_no_nan(cams, "cams");
}

// Target sizes of the box ops: one (H, W) for the batch, or an integer tensor [B, 2] (`per_sample`, as int64, on the
// maps' device). Exactly one of `size` and `sizes` is given.
struct Sizes {
  at::Tensor per_sample;
  int64_t height = 0, width = 0;
};

inline Sizes resolve_sizes(at::OptionalIntArrayRef size, const std::optional<at::Tensor>& sizes, int64_t batch,
                           const at::Tensor& like, const char* like_name) {
  CIM_CHECK_ARG(size.has_value() != sizes.has_value(), "sizes", "a pair (H, W) or a tensor [B, 2], exactly one",
                size.has_value() ? "both" : "neither");
  Sizes out;
  if (size.has_value()) {
    CIM_CHECK_ARG(size->size() == 2, "sizes", "a pair of ints (H, W)", c10::str(*size));
    out.height = (*size)[0];
    out.width = (*size)[1];
    CIM_CHECK_ARG(out.height >= 1 && out.width >= 1, "sizes", "positive heights and widths", c10::str(*size));
    return out;
  }
  const auto& per_sample = *sizes;
  CIM_CHECK_ARG(at::isIntegralType(per_sample.scalar_type(), /*includeBool=*/false), "sizes",
                "an integer tensor [B, 2] or a pair (H, W)", per_sample.scalar_type());
  CIM_CHECK_ARG(per_sample.dim() == 2 && per_sample.size(0) == batch && per_sample.size(1) == 2, "sizes",
                c10::str("shape (", batch, ", 2)"), c10::str("shape ", per_sample.sizes()));
  check_same_device(per_sample, "sizes", like, like_name);
  out.per_sample = per_sample.to(at::kLong).contiguous();
  if (out.per_sample.is_cpu()) {
    const int64_t* hw = out.per_sample.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < 2 * batch; ++i) {
      CIM_CHECK_ARG(hw[i] >= 1, "sizes", "positive heights and widths", c10::str(hw[i], " for sample ", i / 2));
    }
  }
  return out;
}

// Fixed thresholds of the box ops: one float for the batch, or a float tensor [B] (`per_sample`, cast to `dtype`).
struct Thresholds {
  at::Tensor per_sample;
  double value = 0;
};

inline Thresholds resolve_thresholds(double threshold, const std::optional<at::Tensor>& thresholds, int64_t batch,
                                     const at::Tensor& like, at::ScalarType dtype) {
  Thresholds out;
  if (!thresholds.has_value()) {
    CIM_CHECK_ARG(!std::isnan(threshold), "threshold", "a float, a float tensor [B] or 'otsu'", threshold);
    out.value = threshold;
    return out;
  }
  const auto& given = *thresholds;
  CIM_CHECK_ARG(at::isFloatingType(given.scalar_type()), "threshold", "a float or a float tensor of shape (B,)",
                given.scalar_type());
  CIM_CHECK_ARG(given.dim() <= 1 && given.numel() == (given.dim() == 0 ? 1 : batch), "threshold",
                c10::str("a float or a float tensor of shape (", batch, ",)"), c10::str("shape ", given.sizes()));
  check_same_device(given, "threshold", like, "the maps");
  check_no_nan(given, "threshold");
  out.per_sample = given.to(dtype).expand({batch}).contiguous();
  return out;
}

// (images, cams, ratio) of soft_compress and its backward (`grad`, when defined, is the incoming gradient).
inline void check_soft_compress_inputs(const at::Tensor& images, const at::Tensor& cams, double ratio,
                                       const at::Tensor& grad = at::Tensor()) {
  check_dim(images, "images", 4, "[B, C, H, W]");
  check_float_input(images, "images");
  check_maps(cams);
  check_same_device(cams, "cams", images, "images");
  check_same_dtype(cams, "cams", images, "images");
  CIM_CHECK_ARG(cams.size(0) == images.size(0), "cams", c10::str("batch size ", images.size(0), " like images"),
                cams.size(0));
  check_ratio(ratio);
  if (!grad.defined()) return;
  CIM_CHECK_ARG(grad.sizes() == images.sizes(), "grad", c10::str("shape ", images.sizes(), " like images"),
                c10::str("shape ", grad.sizes()));
  check_same_device(grad, "grad", images, "images");
  check_same_dtype(grad, "grad", images, "images");
}

inline void check_bins(int64_t bins) {
  CIM_CHECK_ARG(bins >= 2 && bins <= kMaxBins, "bins", c10::str("an int in [2, ", kMaxBins, "]"), bins);
}

}  // namespace cim_ext
