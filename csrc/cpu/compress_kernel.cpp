// compress and uncompress on CPU: nearest-exact down/up of the background composed into one gather per pixel,
// with the box pixels copied (compress) or pasted from the stored crops (uncompress).
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/resample.h"

namespace cim_ext {

bool cpu_upsample_index_fused() {
  static const bool fused = [] {
    // Resizing 2 -> 141 pixels puts output 70 exactly on the boundary between sources 0 and 1 (70.5 * 2 / 141 = 1).
    // With the float scale the unfused product lands just below 1 and the fused one on it. A 1 x 141 output
    // (1 + 141 > 128) goes through the generic kernel. Called directly, not through the dispatcher.
    at::Tensor probe = at::detail::empty_cpu({1, 1, 1, 2}, at::kFloat, false, std::nullopt);
    probe.mutable_data_ptr<float>()[0] = 0.0f;
    probe.mutable_data_ptr<float>()[1] = 1.0f;
    const auto up = at::cpu::_upsample_nearest_exact2d(probe, {1, 141});
    return up.contiguous().const_data_ptr<float>()[70] == 1.0f;
  }();
  return fused;
}

namespace {

// Writes the rows of a [B, C, H, W] output whose background is a gather through (rows, cols) of a source plane.
// Consecutive output rows with the same source row repeat the previous row instead of gathering again.
template <typename scalar_t>
class RowGatherer {
 public:
  RowGatherer(const std::vector<int64_t>& cols, int64_t width) : cols_(cols.data()), width_(width) {}

  // Fills `dst` with src_row[cols[x]]; `key` identifies (plane, source row) so that a repeat is a copy.
  void gather(scalar_t* dst, const scalar_t* src_row, int64_t key) {
    if (key == last_key_ && last_row_ != nullptr) {
      std::memcpy(dst, last_row_, sizeof(scalar_t) * width_);
      return;
    }
    for (int64_t x = 0; x < width_; ++x) {
      dst[x] = src_row[cols_[x]];
    }
    last_key_ = key;
    last_row_ = dst;
  }

  // The last gathered row is about to get box pixels pasted in: stop reusing it.
  void forget() { last_row_ = nullptr; }

 private:
  const int64_t* cols_;
  int64_t width_;
  int64_t last_key_ = -1;
  const scalar_t* last_row_ = nullptr;
};

void check_images_dtype(const at::Tensor& tensor, const char* op, const char* name) {
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(
      dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble,
      op, ": ", name, " must be uint8, float32 or float64 on CPU, got ", dtype);
}

void check_boxes(const at::Tensor& boxes, int64_t batch, int64_t height, int64_t width, const char* op) {
  TORCH_CHECK(
      boxes.scalar_type() == at::kLong && boxes.dim() == 2 && boxes.size(0) == batch && boxes.size(1) == 4,
      op, ": boxes must be an int64 tensor of shape [", batch, ", 4] = (y0, y1, x0, x1), got ", boxes.scalar_type(),
      " ", boxes.sizes());
  TORCH_CHECK(boxes.device().is_cpu(), op, ": boxes must be on the CPU like the images, got ", boxes.device());
  const auto acc = boxes.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t y0 = acc[b][0], y1 = acc[b][1], x0 = acc[b][2], x1 = acc[b][3];
    TORCH_CHECK(
        0 <= y0 && y0 <= y1 && y1 <= height && 0 <= x0 && x0 <= x1 && x1 <= width,
        op, ": boxes[", b, "] = (", y0, ", ", y1, ", ", x0, ", ", x1, ") must satisfy 0 <= y0 <= y1 <= ", height,
        " and 0 <= x0 <= x1 <= ", width);
  }
}

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, width)); }

template <typename scalar_t>
void compress_kernel_impl(
    const scalar_t* input, const int64_t* boxes, scalar_t* output, int64_t batch, int64_t channels, int64_t height,
    int64_t width, const ResampleMaps& maps) {
  at::parallel_for(0, batch * channels * height, row_grain(width), [&](int64_t begin, int64_t end) {
    RowGatherer<scalar_t> gatherer(maps.cols, width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % height;
      const int64_t plane = row / height;
      const int64_t* box = boxes + 4 * (plane / channels);
      const scalar_t* source = input + plane * height * width;
      scalar_t* dst = output + row * width;
      const int64_t src_y = maps.rows[y];
      gatherer.gather(dst, source + src_y * width, plane * height + src_y);
      if (box[0] <= y && y < box[1] && box[2] < box[3]) {
        gatherer.forget();
        std::memcpy(dst + box[2], source + y * width + box[2], sizeof(scalar_t) * (box[3] - box[2]));
      }
    }
  });
}

template <typename scalar_t>
void uncompress_kernel_impl(
    const scalar_t* small, const scalar_t* crops, const int64_t* boxes, const int64_t* offsets, scalar_t* output,
    int64_t batch, int64_t channels, int64_t small_h, int64_t small_w, int64_t height, int64_t width,
    const ResampleMaps& maps) {
  at::parallel_for(0, batch * channels * height, row_grain(width), [&](int64_t begin, int64_t end) {
    RowGatherer<scalar_t> gatherer(maps.cols, width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % height;
      const int64_t plane = row / height;
      const int64_t b = plane / channels, c = plane % channels;
      const int64_t* box = boxes + 4 * b;
      scalar_t* dst = output + row * width;
      const int64_t src_y = maps.rows[y];
      gatherer.gather(dst, small + (plane * small_h + src_y) * small_w, plane * small_h + src_y);
      if (box[0] <= y && y < box[1] && box[2] < box[3]) {
        gatherer.forget();
        const int64_t box_h = box[1] - box[0], box_w = box[3] - box[2];
        const scalar_t* crop_row = crops + offsets[b] + (c * box_h + (y - box[0])) * box_w;
        std::memcpy(dst + box[2], crop_row, sizeof(scalar_t) * box_w);
      }
    }
  });
}

at::Tensor compress_cpu(const at::Tensor& images, const at::Tensor& boxes, double ratio) {
  TORCH_CHECK(images.dim() == 4, "compress: images must be a 4-D tensor [B, C, H, W], got shape ", images.sizes());
  check_images_dtype(images, "compress", "images");
  TORCH_CHECK(std::isfinite(ratio) && ratio >= 1.0, "compress: ratio must be a finite number >= 1, got ", ratio);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  check_boxes(boxes, batch, height, width, "compress");

  auto output = at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto maps = cpu_down_up_maps(images, ratio);  // before contiguous(): the reference sees this layout
  const auto input = images.contiguous();
  const auto boxes_c = boxes.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kByte, input.scalar_type(), "compress_cpu", [&] {
    compress_kernel_impl<scalar_t>(
        input.const_data_ptr<scalar_t>(), boxes_c.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
        batch, channels, height, width, maps);
  });
  return output;
}

at::Tensor uncompress_cpu(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, int64_t height, int64_t width) {
  TORCH_CHECK(small.dim() == 4, "uncompress: small must be a 4-D tensor [B, C, h, w], got shape ", small.sizes());
  check_images_dtype(small, "uncompress", "small");
  TORCH_CHECK(
      crops.scalar_type() == small.scalar_type() && crops.device() == small.device(),
      "uncompress: crops must be a ", small.scalar_type(), " tensor on ", small.device(), " like small, got ",
      crops.scalar_type(), " on ", crops.device());
  TORCH_CHECK(crops.dim() == 1, "uncompress: crops must be flat (1-D), got shape ", crops.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, "uncompress: height and width must be >= 1, got ", height, " x ", width);
  const int64_t batch = small.size(0), channels = small.size(1);
  TORCH_CHECK(
      batch == 0 || channels == 0 || (small.size(2) >= 1 && small.size(3) >= 1),
      "uncompress: small must have at least 1x1 pixels, got shape ", small.sizes());
  check_boxes(boxes, batch, height, width, "uncompress");

  const auto boxes_c = boxes.contiguous();
  std::vector<int64_t> offsets(batch + 1, 0);
  const int64_t* box = boxes_c.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    offsets[b + 1] = offsets[b] + channels * (box[4 * b + 1] - box[4 * b]) * (box[4 * b + 3] - box[4 * b + 2]);
  }
  TORCH_CHECK(
      crops.numel() == offsets[batch], "uncompress: crops must hold ", offsets[batch],
      " values (C * box area summed over the batch), got ", crops.numel());

  auto output = at::empty({batch, channels, height, width}, small.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto maps = cpu_up_maps(small, height, width);
  const auto small_c = small.contiguous();
  const auto crops_c = crops.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kByte, small_c.scalar_type(), "uncompress_cpu", [&] {
    uncompress_kernel_impl<scalar_t>(
        small_c.const_data_ptr<scalar_t>(), crops_c.const_data_ptr<scalar_t>(), box, offsets.data(),
        output.mutable_data_ptr<scalar_t>(), batch, channels, small.size(2), small.size(3), height, width, maps);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("compress", &compress_cpu);
  m.impl("uncompress", &uncompress_cpu);
}

}  // namespace cim_ext
