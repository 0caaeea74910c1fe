// Argument checks shared by the CPU and CUDA host functions: each check is written once, reads only tensor metadata
// (never data on a device) and raises a Python ValueError "<argument>: expected <what>, got <what>".
#pragma once

#include <ATen/ATen.h>

#define CIM_CHECK_ARG(cond, name, expected, got) \
  TORCH_CHECK_VALUE(cond, name, ": expected ", expected, ", got ", got)

namespace cim_ext {

inline void check_dim(const at::Tensor& tensor, const char* name, int64_t dim, const char* layout) {
  CIM_CHECK_ARG(tensor.dim() == dim, name, "a " + std::to_string(dim) + "-D tensor " + layout,
                "shape " + c10::str(tensor.sizes()));
}

// float32 / float64, and float16 / bfloat16 where the kernel computes them (in float32).
inline void check_float(const at::Tensor& tensor, const char* name, bool allow_half) {
  const auto dtype = tensor.scalar_type();
  const bool ok = dtype == at::kFloat || dtype == at::kDouble ||
                  (allow_half && (dtype == at::kHalf || dtype == at::kBFloat16));
  CIM_CHECK_ARG(ok, name,
                allow_half ? "dtype float32, float64, float16 or bfloat16" : "dtype float32 or float64 (on this device)",
                dtype);
}

inline void check_same_dtype(const at::Tensor& tensor, const char* name, const at::Tensor& like, const char* like_name) {
  CIM_CHECK_ARG(tensor.scalar_type() == like.scalar_type(), name,
                c10::str("dtype ", like.scalar_type(), " like ", like_name, " (or both under autocast)"),
                tensor.scalar_type());
}

inline void check_same_device(const at::Tensor& tensor, const char* name, const at::Tensor& like, const char* like_name) {
  CIM_CHECK_ARG(tensor.device() == like.device(), name, c10::str("a tensor on ", like.device(), " like ", like_name),
                tensor.device());
}

// Whether a 4-D tensor is read in place as channels-last: NHWC-contiguous but not NCHW-contiguous (a tensor that is
// both, such as C = 1, is read as NCHW).
inline bool channels_last_only(const at::Tensor& tensor) {
  return !tensor.is_contiguous() && tensor.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_ratio(double ratio) {
  CIM_CHECK_ARG(std::isfinite(ratio) && ratio >= 1.0, "ratio", "a finite real number >= 1", ratio);
}

}  // namespace cim_ext
