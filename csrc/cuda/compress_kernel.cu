// compress and uncompress on CUDA. The background of output pixel (y, x) is one gather: nearest-exact down and
// back up composes into source row sd(su(y)) and column sd(su(x)), each computed on the fly with the float
// arithmetic of ATen's CUDA upsample kernels (cpu/resample.h), so the result is bit-exact with F.interpolate on
// CUDA for every dtype.
//
// Launch layout (both ops): a thread owns kVec consecutive columns of one row of one sample and walks the C
// channels; its column indices and box-column tests are computed once. Threads along x are consecutive in memory,
// so loads and stores coalesce; rows and samples stride over grid.y and grid.z. When W is a multiple of 4 every
// thread stores 4 values at once (the output is a fresh allocation, so its rows are aligned). Nothing is read back
// to the host: uncompress computes its per-sample crop offsets on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu/resample.h"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

constexpr int kVec = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int kWidth>
__global__ void compress_kernel(
    const scalar_t* __restrict__ input, const int64_t* __restrict__ boxes, scalar_t* __restrict__ output,
    int64_t batch, int64_t channels, int64_t height, int64_t width, NearestAxis rows, NearestAxis cols) {
  const int64_t x_first = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (x_first >= width) {
    return;
  }
  // kWidth > 1 only when kWidth divides W, so the chunk is whole.
  int64_t src_x[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    src_x[k] = cols.down_up(x_first + k);
  }
  const int64_t plane = height * width;
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const int64_t y0 = boxes[4 * b], y1 = boxes[4 * b + 1], x0 = boxes[4 * b + 2], x1 = boxes[4 * b + 3];
    bool in_cols[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      in_cols[k] = x0 <= x_first + k && x_first + k < x1;
    }
    for (int64_t y = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; y < height; y += (int64_t)gridDim.y * blockDim.y) {
      const bool in_rows = y0 <= y && y < y1;
      const int64_t src_y = rows.down_up(y);
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* source = input + (b * channels + c) * plane;
        const scalar_t* keep = source + y * width;
        const scalar_t* background = source + src_y * width;
        Pack<scalar_t, kWidth> pack;
#pragma unroll
        for (int k = 0; k < kWidth; ++k) {
          pack.v[k] = (in_rows && in_cols[k]) ? keep[x_first + k] : background[src_x[k]];
        }
        *reinterpret_cast<Pack<scalar_t, kWidth>*>(output + (b * channels + c) * plane + y * width + x_first) = pack;
      }
    }
  }
}

template <typename scalar_t, int kWidth>
__global__ void uncompress_kernel(
    const scalar_t* __restrict__ small, const scalar_t* __restrict__ crops, int64_t crops_size,
    const int64_t* __restrict__ boxes, const int64_t* __restrict__ offsets, scalar_t* __restrict__ output,
    int64_t batch, int64_t channels, int64_t height, int64_t width, NearestAxis rows, NearestAxis cols) {
  const int64_t x_first = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (x_first >= width) {
    return;
  }
  int64_t src_x[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    src_x[k] = cols.up(x_first + k);
  }
  const int64_t small_plane = rows.small * cols.small;
  const int64_t plane = height * width;
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const int64_t y0 = boxes[4 * b], y1 = boxes[4 * b + 1], x0 = boxes[4 * b + 2], x1 = boxes[4 * b + 3];
    const int64_t box_h = y1 - y0, box_w = x1 - x0, offset = offsets[b];
    bool in_cols[kWidth];
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      in_cols[k] = x0 <= x_first + k && x_first + k < x1;
    }
    for (int64_t y = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; y < height; y += (int64_t)gridDim.y * blockDim.y) {
      const bool in_rows = y0 <= y && y < y1;
      const int64_t src_y = rows.up(y);
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* background = small + (b * channels + c) * small_plane + src_y * cols.small;
        const int64_t crop_row = offset + (c * box_h + (y - y0)) * box_w - x0;
        Pack<scalar_t, kWidth> pack;
#pragma unroll
        for (int k = 0; k < kWidth; ++k) {
          if (in_rows && in_cols[k]) {
            // The wrapper checks that crops holds C * area values per sample; stay in bounds regardless.
            const int64_t index = crop_row + x_first + k;
            pack.v[k] = (index >= 0 && index < crops_size) ? crops[index] : scalar_t(0);
          } else {
            pack.v[k] = background[src_x[k]];
          }
        }
        *reinterpret_cast<Pack<scalar_t, kWidth>*>(output + (b * channels + c) * plane + y * width + x_first) = pack;
      }
    }
  }
}

void check_image_tensor(const at::Tensor& tensor, const char* op, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", tensor.device());
  TORCH_CHECK(tensor.dim() == 4, op, ": ", name, " must be a 4-D tensor [B, C, H, W], got shape ", tensor.sizes());
  const auto dtype = tensor.scalar_type();
  TORCH_CHECK(
      dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
          dtype == at::kBFloat16,
      op, ": ", name, " must be uint8, float32, float64, float16 or bfloat16 on CUDA, got ", dtype);
}

void check_boxes(const at::Tensor& boxes, int64_t batch, const at::Device& device, const char* op) {
  TORCH_CHECK(
      boxes.scalar_type() == at::kLong && boxes.dim() == 2 && boxes.size(0) == batch && boxes.size(1) == 4,
      op, ": boxes must be an int64 tensor of shape [", batch, ", 4] = (y0, y1, x0, x1), got ", boxes.scalar_type(),
      " ", boxes.sizes());
  TORCH_CHECK(boxes.device() == device, op, ": boxes must be on ", device, " like the images, got ", boxes.device());
}

at::Tensor compress_cuda(const at::Tensor& images, const at::Tensor& boxes, double ratio) {
  check_image_tensor(images, "compress", "images");
  TORCH_CHECK(std::isfinite(ratio) && ratio >= 1.0, "compress: ratio must be a finite number >= 1, got ", ratio);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  check_boxes(boxes, batch, images.device(), "compress");
  c10::cuda::CUDAGuard guard(images.device());
  auto output = at::empty(images.sizes(), images.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto input = images.contiguous();
  const auto boxes_c = boxes.contiguous();
  const auto rows = NearestAxis::make(height, down_extent(height, ratio));
  const auto cols = NearestAxis::make(width, down_extent(width, ratio));
  const bool vectorised = width % kVec == 0;
  const auto tiles = row_tiles(batch, height, vectorised ? width / kVec : width);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, input.scalar_type(), "compress_cuda", [&] {
    if (vectorised) {
      compress_kernel<scalar_t, kVec><<<tiles.grid, tiles.block, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), boxes_c.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
          batch, channels, height, width, rows, cols);
    } else {
      compress_kernel<scalar_t, 1><<<tiles.grid, tiles.block, 0, stream>>>(
          input.const_data_ptr<scalar_t>(), boxes_c.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
          batch, channels, height, width, rows, cols);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor uncompress_cuda(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, int64_t height, int64_t width) {
  check_image_tensor(small, "uncompress", "small");
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
  check_boxes(boxes, batch, small.device(), "uncompress");
  c10::cuda::CUDAGuard guard(small.device());
  auto output = at::empty({batch, channels, height, width}, small.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  const auto small_c = small.contiguous();
  const auto crops_c = crops.contiguous();
  const auto boxes_c = boxes.contiguous();
  // Exclusive prefix sum of C * box area: where each sample's crop starts in `crops`, without a host round trip.
  const auto areas = (boxes_c.select(1, 1) - boxes_c.select(1, 0)) * (boxes_c.select(1, 3) - boxes_c.select(1, 2)) * channels;
  const auto offsets = (at::cumsum(areas, 0) - areas).contiguous();
  const auto rows = NearestAxis::make(height, small.size(2));
  const auto cols = NearestAxis::make(width, small.size(3));
  const bool vectorised = width % kVec == 0;
  const auto tiles = row_tiles(batch, height, vectorised ? width / kVec : width);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, small_c.scalar_type(), "uncompress_cuda", [&] {
    if (vectorised) {
      uncompress_kernel<scalar_t, kVec><<<tiles.grid, tiles.block, 0, stream>>>(
          small_c.const_data_ptr<scalar_t>(), crops_c.const_data_ptr<scalar_t>(), crops_c.numel(),
          boxes_c.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
          batch, channels, height, width, rows, cols);
    } else {
      uncompress_kernel<scalar_t, 1><<<tiles.grid, tiles.block, 0, stream>>>(
          small_c.const_data_ptr<scalar_t>(), crops_c.const_data_ptr<scalar_t>(), crops_c.numel(),
          boxes_c.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), output.mutable_data_ptr<scalar_t>(),
          batch, channels, height, width, rows, cols);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("compress", &compress_cuda);
  m.impl("uncompress", &uncompress_cuda);
}

}  // namespace cim_ext
