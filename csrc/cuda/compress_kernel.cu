// compress and uncompress on CUDA: one kernel body for both. The background of output pixel (y, x) is one gather:
// nearest-exact down and back up (compress) or up (uncompress) gives source row rows(y) and column cols(x), computed
// with the float arithmetic of ATen's CUDA upsample kernels (NearestAxis in cpu/resample.h), so the result is
// bit-exact with F.interpolate on CUDA for every dtype. Box pixels come from the images (compress) or from the
// stored crops (uncompress).
//
// Layout: the output is `planes` planes (B * C for NCHW, B for channels-last) of H rows of row_elems elements (W or
// W * C). One 256-thread block fills a band of kBand rows of one plane: it first writes the source element of every
// element of a row segment into a shared-memory table, then each thread assembles kV consecutive elements (16
// bytes when rows allow) and stores them at once; chunks wholly inside the box of compress are one 16-byte load when
// the input is aligned. In-plane indices are 32-bit (the host checks the plane size). Nothing is read back to the
// host, so box values are checked by the kernel: a box outside the image is clamped into it and recorded as a
// deferred error (cuda/deferred_errors.cuh), raised at the next cim_ext call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "compress_checks.h"
#include "cpu/resample.h"
#include "cuda/deferred_errors.cuh"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

constexpr int kBand = 16;     // rows per block
constexpr int kTable = 2048;  // row elements per shared-memory table segment (8 KB)
constexpr int64_t kMaxRebuildBlocks = 1 << 20;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct RebuildArgs {
  const void* background;  // compress: the images; uncompress: small (NCHW)
  const void* keep;        // compress: the images; uncompress: the flat crops
  void* out;
  const int64_t* boxes;
  const int64_t* crop_ends;  // uncompress: inclusive prefix sum over samples of C * box area
  int64_t crops_size;
  int64_t planes;
  int planes_per_sample;  // C (NCHW) or 1 (channels-last)
  int unit_elems;         // elements per column: 1 (NCHW) or C (channels-last)
  int height;
  int width;
  int src_height;
  int src_width;
  bool keep_aligned;  // the images start on a 16-byte boundary (compress)
  NearestAxis rows;
  NearestAxis cols;
  deferred::Report* errors;
  deferred::Op op;
};

struct Box {
  int y0, y1, x0, x1;
};

__device__ __forceinline__ int clamp_to(int64_t value, int low, int high) {
  return static_cast<int>(value < low ? low : (value > high ? high : value));
}

// The box of `sample`, clamped: y0 into [0, H], y1 into [y0, H], x alike. When `reporter` (one thread per sample),
// the first coordinate that had to move is recorded as a deferred error.
__device__ Box load_box(const RebuildArgs& a, int64_t sample, bool reporter) {
  const int64_t* raw = a.boxes + 4 * sample;
  Box box;
  box.y0 = clamp_to(raw[0], 0, a.height);
  box.y1 = clamp_to(raw[1], box.y0, a.height);
  box.x0 = clamp_to(raw[2], 0, a.width);
  box.x1 = clamp_to(raw[3], box.x0, a.width);
  if (reporter) {
    if (box.y0 != raw[0] || box.y1 != raw[1]) {
      deferred::record(a.errors, deferred::kBox, a.op, sample, box.y0 != raw[0] ? raw[0] : raw[1], a.height);
    } else if (box.x0 != raw[2] || box.x1 != raw[3]) {
      deferred::record(a.errors, deferred::kBox, a.op, sample, box.x0 != raw[2] ? raw[2] : raw[3], a.width);
    }
  }
  return box;
}

// Where the table keeps the source of segment element i. Element k of every chunk is stored in one run, so that the
// warp's reads of element k of consecutive chunks hit consecutive banks.
template <int kV>
__device__ __forceinline__ int table_slot(int i) {
  return (i % kV) * (kTable / kV) + i / kV;
}

template <typename scalar_t, int kV, bool kCompress>
__global__ void __launch_bounds__(kThreads) rebuild_kernel(const RebuildArgs a) {
  __shared__ int table[kTable];
  const auto* background = static_cast<const scalar_t*>(a.background);
  const auto* keep = static_cast<const scalar_t*>(a.keep);
  auto* out = static_cast<scalar_t*>(a.out);
  const int row_elems = a.width * a.unit_elems;
  const int src_row_elems = a.src_width * a.unit_elems;
  const int bands = (a.height + kBand - 1) / kBand;
  for (int64_t block = blockIdx.x; block < a.planes * bands; block += gridDim.x) {
    const int64_t plane = block / bands;
    const int y_begin = static_cast<int>(block % bands) * kBand;
    const int band_rows = min(kBand, a.height - y_begin);
    const int64_t sample = plane / a.planes_per_sample;
    const Box box = load_box(a, sample, threadIdx.x == 0 && y_begin == 0 && plane % a.planes_per_sample == 0);
    if (!kCompress && threadIdx.x == 0 && y_begin == 0 && plane == a.planes - 1 &&
        a.crop_ends[sample] != a.crops_size) {
      deferred::record(a.errors, deferred::kCrops, a.op, sample, a.crop_ends[sample], a.crops_size);
    }
    const int box_e0 = box.x0 * a.unit_elems, box_e1 = box.x1 * a.unit_elems;  // the box columns, in elements
    const scalar_t* src_plane = background + plane * a.src_height * src_row_elems;
    const scalar_t* keep_plane = kCompress ? keep + plane * a.height * row_elems : keep;
    scalar_t* out_plane = out + plane * a.height * row_elems;
    int64_t crop_start = 0;  // uncompress: where this plane's crop starts
    const int box_h = box.y1 - box.y0, box_w = box.x1 - box.x0;
    if (!kCompress) {
      const int64_t channels = a.planes_per_sample;
      crop_start = a.crop_ends[sample] - channels * box_h * box_w + (plane % channels) * box_h * box_w;
    }
    for (int e0 = 0; e0 < row_elems; e0 += kTable) {
      const int segment = min(kTable, row_elems - e0);
      __syncthreads();  // the previous segment's readers are done with the table
      for (int i = threadIdx.x; i < segment; i += kThreads) {
        const int x = (e0 + i) / a.unit_elems;
        const int src_x = static_cast<int>(kCompress ? a.cols.down_up(x) : a.cols.up(x));
        table[table_slot<kV>(i)] = src_x * a.unit_elems + (e0 + i - x * a.unit_elems);
      }
      __syncthreads();
      const int chunks = (segment + kV - 1) / kV;  // kV > 1 only when kV divides row_elems (and kTable)
      for (int item = threadIdx.x; item < band_rows * chunks; item += kThreads) {
        const int y = y_begin + item / chunks;
        const int i = (item % chunks) * kV;  // in the segment
        const int e = e0 + i;                // in the row
        const int src_y = static_cast<int>(kCompress ? a.rows.down_up(y) : a.rows.up(y));
        const scalar_t* src_row = src_plane + src_y * src_row_elems;
        const bool row_in_box = box.y0 <= y && y < box.y1;
        Pack<scalar_t, kV> pack;
        if (kCompress && kV > 1 && a.keep_aligned && row_in_box && box_e0 <= e && e + kV <= box_e1) {
          pack = *reinterpret_cast<const Pack<scalar_t, kV>*>(keep_plane + y * row_elems + e);
        } else {
#pragma unroll
          for (int k = 0; k < kV; ++k) {
            if (row_in_box && box_e0 <= e + k && e + k < box_e1) {
              if (kCompress) {
                pack.v[k] = keep_plane[y * row_elems + e + k];
              } else {
                // A wrong crop count (not checked on CUDA: it needs the box values) cannot read outside crops.
                const int64_t index = crop_start + static_cast<int64_t>(y - box.y0) * box_w + (e + k - box_e0);
                pack.v[k] = 0 <= index && index < a.crops_size ? keep[index] : scalar_t(0);
              }
            } else {
              pack.v[k] = src_row[table[table_slot<kV>(i + k)]];
            }
          }
        }
        *reinterpret_cast<Pack<scalar_t, kV>*>(out_plane + y * row_elems + e) = pack;
      }
    }
  }
}

// Launches rebuild_kernel over a.planes planes of a.height rows, 16 bytes per thread when rows are a whole number
// of 16-byte chunks (the output is a fresh allocation, so its rows are then aligned).
template <bool kCompress>
void launch_rebuild(const RebuildArgs& a, at::ScalarType dtype) {
  const int64_t work = a.planes * ceil_div(a.height, kBand);
  const auto blocks = static_cast<unsigned>(std::min(work, kMaxRebuildBlocks));
  const int64_t row_elems = static_cast<int64_t>(a.width) * a.unit_elems;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, dtype, "rebuild_cuda", [&] {
    constexpr int kV = 16 / sizeof(scalar_t);
    static_assert(kTable % kV == 0, "table segments must hold whole chunks");
    if (row_elems % kV == 0) {
      rebuild_kernel<scalar_t, kV, kCompress><<<blocks, kThreads, 0, stream>>>(a);
    } else {
      rebuild_kernel<scalar_t, 1, kCompress><<<blocks, kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The kernels index within a plane with 32-bit integers.
void check_plane_size(int64_t plane_elems, const char* name, const char* what) {
  CIM_CHECK_ARG(
      plane_elems <= std::numeric_limits<int>::max(), name, c10::str("fewer than 2^31 elements per ", what),
      plane_elems);
}

at::Tensor compress_cuda(const at::Tensor& images, const at::Tensor& boxes, double ratio) {
  deferred::raise_deferred_errors();
  check_compress_args(images, boxes, ratio);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const auto format = compress_output_format(images);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  check_plane_size(height * width * (channels_last ? channels : 1), "images", "image (per channel in NCHW)");
  c10::cuda::CUDAGuard guard(images.device());
  auto output = at::empty(images.sizes(), images.options().memory_format(format));
  if (output.numel() == 0) {
    return output;
  }
  const auto input = images.contiguous(format);
  const auto boxes_c = boxes.contiguous();
  RebuildArgs a{};
  a.background = input.const_data_ptr();
  a.keep = input.const_data_ptr();
  a.out = output.mutable_data_ptr();
  a.boxes = boxes_c.const_data_ptr<int64_t>();
  a.planes = channels_last ? batch : batch * channels;
  a.planes_per_sample = channels_last ? 1 : static_cast<int>(channels);
  a.unit_elems = channels_last ? static_cast<int>(channels) : 1;
  a.height = a.src_height = static_cast<int>(height);
  a.width = a.src_width = static_cast<int>(width);
  a.keep_aligned = reinterpret_cast<uintptr_t>(input.const_data_ptr()) % 16 == 0;
  a.rows = NearestAxis::make(height, down_extent(height, ratio));
  a.cols = NearestAxis::make(width, down_extent(width, ratio));
  a.errors = deferred::report();
  a.op = deferred::kCompress;
  launch_rebuild<true>(a, input.scalar_type());
  return output;
}

at::Tensor uncompress_cuda(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, c10::SymInt sym_height,
    c10::SymInt sym_width) {
  deferred::raise_deferred_errors();
  const int64_t height = sym_height.expect_int(), width = sym_width.expect_int();
  check_uncompress_args(small, crops, boxes, height, width);
  const int64_t batch = small.size(0), channels = small.size(1);
  check_plane_size(height * width, "height", "rebuilt image channel (height * width)");
  check_plane_size(small.size(2) * small.size(3), "small", "image channel");
  c10::cuda::CUDAGuard guard(small.device());
  auto output = at::empty({batch, channels, height, width}, small.options());
  if (output.numel() == 0) {
    return output;
  }
  const auto small_c = small.contiguous();
  const auto crops_c = crops.contiguous();
  const auto boxes_c = boxes.contiguous();
  // Where each sample's crop ends in `crops`, computed on the device (no host round trip).
  const auto areas = (boxes_c.select(1, 1) - boxes_c.select(1, 0)) * (boxes_c.select(1, 3) - boxes_c.select(1, 2));
  const auto crop_ends = at::cumsum(areas * channels, 0);
  RebuildArgs a{};
  a.background = small_c.const_data_ptr();
  a.keep = crops_c.const_data_ptr();
  a.out = output.mutable_data_ptr();
  a.boxes = boxes_c.const_data_ptr<int64_t>();
  a.crop_ends = crop_ends.const_data_ptr<int64_t>();
  a.crops_size = crops_c.numel();
  a.planes = batch * channels;
  a.planes_per_sample = static_cast<int>(channels);
  a.unit_elems = 1;
  a.height = static_cast<int>(height);
  a.width = static_cast<int>(width);
  a.src_height = static_cast<int>(small.size(2));
  a.src_width = static_cast<int>(small.size(3));
  a.rows = NearestAxis::make(height, small.size(2));
  a.cols = NearestAxis::make(width, small.size(3));
  a.errors = deferred::report();
  a.op = deferred::kUncompress;
  launch_rebuild<false>(a, small_c.scalar_type());
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("compress", &compress_cuda);
  m.impl("uncompress", &uncompress_cuda);
}

}  // namespace cim_ext
