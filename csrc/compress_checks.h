// Argument checks of compress and uncompress, written once for their CPU and CUDA host functions (defined in
// cpu/compress_kernel.cpp). They raise ValueError "<argument>: expected ..., got ..." and read tensor metadata only,
// except where the values are host data: on CPU they also check the box ranges and the crop count. On CUDA that
// would need a host sync, so the kernels clamp bad boxes and record them as deferred errors instead
// (cuda/compress_kernel.cu, cuda/deferred_errors.cuh).
#pragma once

#include <ATen/ATen.h>

namespace cim_ext {

// Layout of compress's output: channels-last for a channels-last input (read in place), NCHW otherwise.
at::MemoryFormat compress_output_format(const at::Tensor& images);

void check_compress_args(const at::Tensor& images, const at::Tensor& boxes, double ratio);

void check_uncompress_args(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, int64_t height, int64_t width);

}  // namespace cim_ext
