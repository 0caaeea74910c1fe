// Schemas of every cim_ext operator. Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// autograd, fake (meta) kernels and argument checking live in cim_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing cim_ext._C from Python runs the static registrations below; no Python bindings are needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
bool cuda_compiled() { return CIM_EXT_WITH_CUDA != 0; }
}  // namespace

TORCH_LIBRARY(cim_ext, m) {
  // Whether this build carries the CUDA kernels.
  m.def("_cuda_compiled() -> bool", &cuda_compiled);
  // Class activation maps: cam[b] = sum_c weight[labels[b], c] * fmaps[b, c], optionally min-max normalised.
  m.def("cam(Tensor fmaps, Tensor weight, Tensor labels, bool normalize) -> Tensor");
  m.def(
      "_cam_backward(Tensor grad, Tensor fmaps, Tensor weight, Tensor labels, bool normalize, "
      "bool need_fmaps, bool need_weight) -> (Tensor, Tensor)");
  // Tight half-open boxes (y0, y1, x0, x1) of bilinear(cams -> sizes[b]) > thresholds[b].
  m.def("cam_boxes(Tensor cams, Tensor sizes, Tensor thresholds) -> Tensor");
  // Otsu threshold of the bilinearly upsampled map, (k + 1) / bins.
  m.def("otsu_threshold(Tensor cams, Tensor sizes, int bins) -> Tensor");
  // cam (normalised) + cam_boxes in one pass; bins > 0 selects Otsu thresholds and ignores `thresholds`.
  m.def("cam_to_boxes(Tensor fmaps, Tensor weight, Tensor labels, Tensor sizes, Tensor thresholds, int bins) -> Tensor");
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
