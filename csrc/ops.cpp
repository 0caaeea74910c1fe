// Schemas of every cim_ext operator. Kernels, with their argument checks, register per device in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; autograd, autocast and fake (meta) kernels live in cim_ext/_registrations.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing cim_ext._C from Python runs the static registrations below; no Python bindings are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#if CIM_EXT_WITH_CUDA
#include "cuda/deferred_errors.cuh"
#endif

namespace {
bool cuda_compiled() { return CIM_EXT_WITH_CUDA != 0; }

void raise_deferred_errors(bool synchronize) {
#if CIM_EXT_WITH_CUDA
  cim_ext::deferred::raise_deferred_errors(synchronize);
#endif
}
}  // namespace

TORCH_LIBRARY(cim_ext, m) {
  // Whether this build carries the CUDA kernels.
  m.def("_cuda_compiled() -> bool", &cuda_compiled);
  // Raises a value error a CUDA kernel recorded (csrc/cuda/deferred_errors.cuh); waits for the device first when
  // `synchronize`.
  m.def("_raise_deferred_errors(bool synchronize) -> ()", &raise_deferred_errors);
  // Class activation maps: cam[b] = sum_c weight[labels[b], c] * fmaps[b, c], optionally min-max normalised.
  m.def("cam(Tensor fmaps, Tensor weight, Tensor labels, bool normalize) -> Tensor");
  m.def(
      "_cam_backward(Tensor grad, Tensor fmaps, Tensor weight, Tensor labels, bool normalize, "
      "bool need_fmaps, bool need_weight) -> (Tensor, Tensor)");
  // Target sizes are one (H, W) for the batch (`size`) or an int64 tensor [B, 2] (`sizes`), exactly one of them;
  // fixed thresholds are a float or, when `thresholds` is given, a float tensor [B].
  // Tight half-open boxes (y0, y1, x0, x1) of bilinear(cams -> (H, W)) > threshold.
  m.def("cam_boxes(Tensor cams, SymInt[]? size, Tensor? sizes, float threshold, Tensor? thresholds) -> Tensor");
  // Otsu threshold of the bilinearly upsampled map, (k + 1) / bins.
  m.def("otsu_threshold(Tensor cams, SymInt[]? size, Tensor? sizes, int bins) -> Tensor");
  // cam (normalised) + cam_boxes in one pass; bins > 0 selects Otsu thresholds (the fixed ones are then ignored).
  m.def(
      "cam_to_boxes(Tensor fmaps, Tensor weight, Tensor labels, SymInt[]? size, Tensor? sizes, float threshold, "
      "Tensor? thresholds, int bins) -> Tensor");
  // Outside the box: nearest-exact down to (int(H / sqrt(ratio)), int(W / sqrt(ratio))) and back up.
  m.def("compress(Tensor images, Tensor boxes, float ratio) -> Tensor");
  // Rebuild full images from the stored parts of compressed exemplars: the downsampled images and the
  // concatenated, flattened full-resolution box crops (sample b's crop is C x (y1-y0) x (x1-x0), row-major).
  m.def("uncompress(Tensor small, Tensor crops, Tensor boxes, SymInt height, SymInt width) -> Tensor");
  // hybrid = up * x + (1 - up) * down_up(x), up = bilinear(cams -> (H, W)).
  m.def("soft_compress(Tensor images, Tensor cams, float ratio) -> Tensor");
  m.def(
      "_soft_compress_backward(Tensor grad, Tensor images, Tensor cams, float ratio, "
      "bool need_images, bool need_cams) -> (Tensor, Tensor)");
  // Rational activation, version A: P(x) / (1 + sum_k |b_k x^k|).
  m.def("rational(Tensor x, Tensor numerator, Tensor denominator) -> Tensor");
  m.def(
      "_rational_backward(Tensor grad, Tensor x, Tensor numerator, Tensor denominator, "
      "bool need_x, bool need_coefficients) -> (Tensor, Tensor, Tensor)");
}

// Ops without a gradient (integer boxes, piecewise-constant thresholds) skip autograd: their outputs never require
// grad, and no autograd fallback runs on each call.
TORCH_LIBRARY_IMPL(cim_ext, Autograd, m) {
  m.impl("cam_boxes", torch::CppFunction::makeFallthrough());
  m.impl("otsu_threshold", torch::CppFunction::makeFallthrough());
  m.impl("cam_to_boxes", torch::CppFunction::makeFallthrough());
}
