// CUDA kernels of cam_boxes, otsu_threshold and cam_to_boxes: fixed-threshold boxes over several blocks per sample,
// Otsu thresholds one block per sample. The full-resolution map is never stored: each thread interpolates the pixels
// it visits from the tiny h x w map (cam_common.cuh).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cam_common.cuh"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

using cam_cuda::kBlock;
using Counter = unsigned long long;

// Target size of each sample: per-sample sizes [B, 2] on the device, or one (height, width) for the batch.
struct SampleSizes {
  const int64_t* per_sample;
  int64_t height, width;
};

SampleSizes device_sizes(const Sizes& sizes) {
  return {sizes.per_sample.defined() ? sizes.per_sample.const_data_ptr<int64_t>() : nullptr, sizes.height,
          sizes.width};
}

// (H, W) of sample b; false (and the first such sample recorded as a deferred error) when not positive.
__device__ inline bool sample_size(const SampleSizes& sizes, int64_t b, deferred::Op op, deferred::Report* errors,
                                   int64_t& H, int64_t& W) {
  H = sizes.per_sample ? sizes.per_sample[2 * b] : sizes.height;
  W = sizes.per_sample ? sizes.per_sample[2 * b + 1] : sizes.width;
  if (H >= 1 && W >= 1 && H <= INT32_MAX && W <= INT32_MAX) return true;
  if (threadIdx.x == 0) deferred::record(errors, deferred::kSize, op, b, H < 1 || H > INT32_MAX ? H : W, 1);
  return false;
}

__device__ inline void empty_box(int64_t* box) {
  if (threadIdx.x == 0) box[0] = box[1] = box[2] = box[3] = 0;
}

// Fixed threshold of sample b: per-sample thresholds [B] on the device, or `value` for the batch.
template <typename scalar_t>
__device__ inline scalar_t fixed_threshold(const scalar_t* per_sample, scalar_t value, int64_t b) {
  return per_sample ? per_sample[b] : value;
}

template <typename scalar_t>
const scalar_t* device_thresholds(const Thresholds& thresholds) {
  return thresholds.per_sample.defined() ? thresholds.per_sample.const_data_ptr<scalar_t>() : nullptr;
}

// Fixed-threshold boxes, kSlices blocks per sample (grid B x slices). Each block holds the sample's normalised map
// (cam_to_boxes: rebuilt with the same fixed-order sums as cam, so the boxes equal cam followed by cam_boxes) and a
// table of the column taps (the same `linear` values the scan would recompute per pixel), scans its band of rows,
// and folds its partial box into `partial` [B, 5] with atomicMax on fields encoded so that 0 means "nothing found":
// (H - y0, y1 + 1, W - x0, x1 + 1). Max is order-independent, so the result is deterministic. The last block of a
// sample (ticket in field 4, after a fence) writes the int64 box.
constexpr int kSlices = 4;
constexpr int64_t kTableBytes = 32768;  // column taps beyond this are computed per pixel

template <typename acc_t>
struct Tap {
  int i0, step;
  acc_t l0, l1;
};

template <typename scalar_t, bool kFromFmaps>
__global__ void __launch_bounds__(kBlock)
    sliced_box_kernel(const scalar_t* __restrict__ source, const scalar_t* __restrict__ weight,
                      const int64_t* __restrict__ labels, int64_t classes, int64_t channels, int64_t height,
                      int64_t width, bool channels_last, SampleSizes sizes, const scalar_t* __restrict__ thresholds,
                      scalar_t threshold, int64_t table_capacity, scalar_t* __restrict__ global_maps,
                      unsigned* __restrict__ partial,
                      int64_t* __restrict__ boxes, deferred::Report* errors, deferred::Op op) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t scratch[kBlock];
  __shared__ bool last;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x;
  const int slice = blockIdx.y, slices = gridDim.y;
  const int64_t pixels = height * width;
  int64_t H, W;
  const bool ok = (!kFromFmaps || cam_cuda::label_ok(labels[b], classes, b, op, errors)) &&
                  sample_size(sizes, b, op, errors, H, W);
  if (!ok) {
    if (slice == 0) empty_box(boxes + 4 * b);
    return;
  }
  // Shared memory: [table_capacity column taps][map (cam_to_boxes, if it fits)].
  const bool tabled = W <= table_capacity;
  Tap<acc_t>* taps = reinterpret_cast<Tap<acc_t>*>(shared_bytes);
  const scalar_t* map = source + b * pixels;
  if (kFromFmaps) {
    scalar_t* own = global_maps != nullptr
                        ? global_maps + (b * slices + slice) * pixels
                        : reinterpret_cast<scalar_t*>(shared_bytes + table_capacity * sizeof(Tap<acc_t>));
    cam_cuda::block_raw_cam(source + b * channels * pixels, weight + labels[b] * channels, channels, pixels,
                            channels_last, own, scratch);
    cam_cuda::block_normalize<scalar_t, acc_t>(own, pixels);
    map = own;
  }
  const acc_t scale_y = static_cast<acc_t>(height) / H;
  const acc_t scale_x = static_cast<acc_t>(width) / W;
  if (tabled) {
    for (int64_t x = threadIdx.x; x < W; x += kBlock) {
      const auto lx = cam_cuda::linear(scale_x, x, width);
      taps[x] = {static_cast<int>(lx.i0), static_cast<int>(lx.step), lx.l0, lx.l1};
    }
    __syncthreads();
  }
  const acc_t cut = static_cast<acc_t>(fixed_threshold(thresholds, threshold, b));
  const int64_t rows = (H + slices - 1) / slices;
  const int64_t row_end = H < (slice + 1) * rows ? H : (slice + 1) * rows;
  int64_t y0 = INT64_MAX, y1 = -1, x0 = INT64_MAX, x1 = -1;
  for (int64_t y = slice * rows + (threadIdx.x >> 5); y < row_end; y += cam_cuda::kWarps) {
    const auto ly = cam_cuda::linear(scale_y, y, height);
    for (int64_t x = threadIdx.x & 31; x < W; x += 32) {
      cam_cuda::Linear<acc_t> lx;
      if (tabled) {
        const Tap<acc_t> t = taps[x];
        lx = {t.i0, t.step, t.l0, t.l1};
      } else {
        lx = cam_cuda::linear(scale_x, x, width);
      }
      if (cam_cuda::upsampled<scalar_t, acc_t>(map, width, ly, lx) > cut) {
        y0 = y < y0 ? y : y0;
        y1 = y > y1 ? y : y1;
        x0 = x < x0 ? x : x0;
        x1 = x > x1 ? x : x1;
      }
    }
  }
  y0 = cam_cuda::block_reduce(y0, cam_cuda::Min());
  y1 = cam_cuda::block_reduce(y1, cam_cuda::Max());
  x0 = cam_cuda::block_reduce(x0, cam_cuda::Min());
  x1 = cam_cuda::block_reduce(x1, cam_cuda::Max());
  unsigned* fields = partial + 5 * b;
  if (threadIdx.x == 0) {
    if (y1 >= 0) {
      atomicMax(fields + 0, static_cast<unsigned>(H - y0));
      atomicMax(fields + 1, static_cast<unsigned>(y1 + 1));
      atomicMax(fields + 2, static_cast<unsigned>(W - x0));
      atomicMax(fields + 3, static_cast<unsigned>(x1 + 1));
    }
    __threadfence();
    last = atomicAdd(fields + 4, 1u) == static_cast<unsigned>(slices - 1);
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    const unsigned top = atomicAdd(fields + 0, 0u), bottom = atomicAdd(fields + 1, 0u);
    const unsigned left = atomicAdd(fields + 2, 0u), right = atomicAdd(fields + 3, 0u);
    int64_t* box = boxes + 4 * b;
    const bool empty = bottom == 0;
    box[0] = empty ? 0 : H - top;
    box[1] = empty ? 0 : bottom;
    box[2] = empty ? 0 : W - left;
    box[3] = empty ? 0 : right;
  }
}

// Launches sliced_box_kernel: `fmaps`/`weight`/`labels` given for cam_to_boxes, `cams` alone for cam_boxes.
template <typename scalar_t, bool kFromFmaps>
void launch_sliced_boxes(const at::Tensor& source, const at::Tensor& weight, const at::Tensor& labels,
                         bool channels_last, int64_t height, int64_t width, const Sizes& hw, const Thresholds& thr,
                         const at::Tensor& boxes, deferred::Op op) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t batch = boxes.size(0);
  // Enough rows for every slice: the largest target height is only known on the device for per-sample sizes, so
  // slices without rows simply find nothing.
  const int slices = hw.per_sample.defined() ? kSlices : static_cast<int>(std::min<int64_t>(kSlices, hw.height));
  const int64_t pixels = height * width;
  // Room for the column taps of the known width, or of any width up to kTableBytes with per-sample sizes.
  const int64_t most = kTableBytes / static_cast<int64_t>(sizeof(Tap<acc_t>));
  const int64_t table_capacity = hw.per_sample.defined() ? most : (hw.width <= most ? hw.width : 0);
  const size_t table = static_cast<size_t>(table_capacity) * sizeof(Tap<acc_t>);
  const int64_t map_bytes = kFromFmaps ? pixels * static_cast<int64_t>(sizeof(scalar_t)) : 0;
  const bool map_in_shared = map_bytes <= cam_cuda::kSharedMapBytes;
  auto map_scratch = map_in_shared ? at::Tensor() : at::empty({batch * slices, pixels}, source.options());
  auto partial = at::zeros({batch, 5}, source.options().dtype(at::kInt));
  const size_t shared = table + (map_in_shared ? static_cast<size_t>(map_bytes) : 0);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(slices));
  sliced_box_kernel<scalar_t, kFromFmaps><<<grid, kBlock, shared, at::cuda::getCurrentCUDAStream()>>>(
      source.const_data_ptr<scalar_t>(), kFromFmaps ? weight.const_data_ptr<scalar_t>() : nullptr,
      kFromFmaps ? labels.const_data_ptr<int64_t>() : nullptr, kFromFmaps ? weight.size(0) : 0,
      kFromFmaps ? source.size(1) : 0, height, width, channels_last, device_sizes(hw),
      device_thresholds<scalar_t>(thr), static_cast<scalar_t>(thr.value), table_capacity,
      map_scratch.defined() ? map_scratch.data_ptr<scalar_t>() : nullptr,
      reinterpret_cast<unsigned*>(partial.data_ptr<int>()), boxes.data_ptr<int64_t>(), deferred::report(), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor cam_boxes_cuda(const at::Tensor& cams, at::OptionalIntArrayRef size, const std::optional<at::Tensor>& sizes,
                          double threshold, const std::optional<at::Tensor>& thresholds) {
  deferred::raise_deferred_errors();
  check_maps(cams);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const auto hw = resolve_sizes(size, sizes, batch, cams, "cams");
  const auto thr = resolve_thresholds(threshold, thresholds, batch, cams, cams.scalar_type());
  c10::cuda::CUDAGuard guard(cams.device());
  auto boxes = at::empty({batch, 4}, cams.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto cams_c = cams.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "cam_boxes_cuda", [&] {
    launch_sliced_boxes<scalar_t, false>(cams_c, at::Tensor(), at::Tensor(), false, height, width, hw, thr, boxes,
                                         deferred::kCamBoxes);
  });
  return boxes;
}

// Histograms of up to kSharedBins bins live in dynamic shared memory; larger ones in `global_hist` [B, bins].
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    otsu_threshold_kernel(const scalar_t* __restrict__ cams, int64_t height, int64_t width, SampleSizes sizes,
                          int64_t bins, Counter* __restrict__ global_hist, scalar_t* __restrict__ out,
                          deferred::Report* errors) {
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x;
  int64_t H, W;
  if (!sample_size(sizes, b, deferred::kOtsuThreshold, errors, H, W)) {
    if (threadIdx.x == 0) out[b] = scalar_t(0);
    return;
  }
  Counter* hist = global_hist != nullptr ? global_hist + b * bins : reinterpret_cast<Counter*>(shared_bytes);
  const int64_t k = cam_cuda::block_otsu<scalar_t, acc_t>(cams + b * height * width, height, width, H, W, bins, hist);
  if (threadIdx.x == 0) out[b] = cam_cuda::otsu_value<scalar_t>(k, bins);
}

// Global histogram scratch when bins is too large for shared memory (undefined tensor otherwise).
at::Tensor hist_scratch(int64_t batch, int64_t bins, const at::TensorOptions& options) {
  if (bins <= cam_cuda::kSharedBins) return at::Tensor();
  return at::empty({batch, bins}, options.dtype(at::kLong));
}

at::Tensor otsu_threshold_cuda(const at::Tensor& cams, at::OptionalIntArrayRef size,
                               const std::optional<at::Tensor>& sizes, int64_t bins) {
  deferred::raise_deferred_errors();
  check_maps(cams);
  check_bins(bins);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  const auto hw = resolve_sizes(size, sizes, batch, cams, "cams");
  c10::cuda::CUDAGuard guard(cams.device());
  auto out = at::empty({batch}, cams.options());
  if (batch == 0) return out;
  const auto cams_c = cams.contiguous();
  auto scratch = hist_scratch(batch, bins, cams.options());
  Counter* global_hist = scratch.defined() ? reinterpret_cast<Counter*>(scratch.data_ptr<int64_t>()) : nullptr;
  const size_t shared = global_hist != nullptr ? 0 : static_cast<size_t>(bins) * sizeof(Counter);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "otsu_threshold_cuda", [&] {
    otsu_threshold_kernel<scalar_t><<<batch, kBlock, shared, stream>>>(
        cams_c.const_data_ptr<scalar_t>(), height, width, device_sizes(hw), bins, global_hist,
        out.data_ptr<scalar_t>(), deferred::report());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Otsu boxes, one block per sample (the threshold needs the whole histogram). Dynamic shared memory:
// [histogram (if it fits)][normalised map (if it fits)]; what does not fit is in the global scratch buffers.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    otsu_boxes_kernel(const scalar_t* __restrict__ fmaps, const scalar_t* __restrict__ weight,
                      const int64_t* __restrict__ labels, int64_t classes, int64_t channels, int64_t height,
                      int64_t width, bool channels_last, SampleSizes sizes, int64_t bins,
                      scalar_t* __restrict__ global_maps, Counter* __restrict__ global_hist,
                      int64_t* __restrict__ boxes, deferred::Report* errors) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t partial[kBlock];
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x;
  const int64_t label = labels[b];
  int64_t H, W;
  if (!cam_cuda::label_ok(label, classes, b, deferred::kCamToBoxes, errors) ||
      !sample_size(sizes, b, deferred::kCamToBoxes, errors, H, W)) {
    return empty_box(boxes + 4 * b);
  }
  const int64_t pixels = height * width;
  const size_t hist_bytes = global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  Counter* hist = global_hist != nullptr ? global_hist + b * bins : reinterpret_cast<Counter*>(shared_bytes);
  scalar_t* map = global_maps != nullptr ? global_maps + b * pixels
                                         : reinterpret_cast<scalar_t*>(shared_bytes + hist_bytes);
  cam_cuda::block_raw_cam(fmaps + b * channels * pixels, weight + label * channels, channels, pixels, channels_last,
                          map, partial);
  cam_cuda::block_normalize<scalar_t, acc_t>(map, pixels);
  const int64_t k = cam_cuda::block_otsu<scalar_t, acc_t>(map, height, width, H, W, bins, hist);
  const acc_t cut = static_cast<acc_t>(cam_cuda::otsu_value<scalar_t>(k, bins));
  cam_cuda::block_box<scalar_t, acc_t>(map, height, width, H, W, cut, boxes + 4 * b);
}

at::Tensor cam_to_boxes_cuda(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels,
                             at::OptionalIntArrayRef size, const std::optional<at::Tensor>& sizes, double threshold,
                             const std::optional<at::Tensor>& thresholds, int64_t bins) {
  deferred::raise_deferred_errors();
  const auto labels_c = checked_labels(fmaps, weight, labels);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  CIM_CHECK_ARG(height >= 1 && width >= 1, "fmaps", "maps of at least 1x1", c10::str("shape ", fmaps.sizes()));
  const auto hw = resolve_sizes(size, sizes, batch, fmaps, "fmaps");
  // bins > 0 selects Otsu thresholds; the fixed threshold arguments are then ignored.
  const bool otsu = bins != 0;
  if (otsu) check_bins(bins);
  const auto thr = otsu ? Thresholds{} : resolve_thresholds(threshold, thresholds, batch, fmaps, fmaps.scalar_type());
  c10::cuda::CUDAGuard guard(fmaps.device());
  auto boxes = at::empty({batch, 4}, fmaps.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto layout = fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  if (!otsu) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_to_boxes_cuda", [&] {
      launch_sliced_boxes<scalar_t, true>(layout.fmaps, weight_c, labels_c, layout.channels_last, height, width, hw,
                                          thr, boxes, deferred::kCamToBoxes);
    });
    return boxes;
  }
  const int64_t pixels = height * width;
  const int64_t map_bytes = pixels * static_cast<int64_t>(fmaps.element_size());
  auto map_scratch = map_bytes > cam_cuda::kSharedMapBytes ? at::empty({batch, pixels}, fmaps.options()) : at::Tensor();
  auto hist = hist_scratch(batch, bins, fmaps.options());
  Counter* global_hist = hist.defined() ? reinterpret_cast<Counter*>(hist.data_ptr<int64_t>()) : nullptr;
  const size_t hist_bytes = global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  const size_t shared = hist_bytes + (map_scratch.defined() ? 0 : static_cast<size_t>(map_bytes));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_to_boxes_cuda", [&] {
    otsu_boxes_kernel<scalar_t><<<batch, kBlock, shared, at::cuda::getCurrentCUDAStream()>>>(
        layout.fmaps.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(),
        labels_c.const_data_ptr<int64_t>(), weight.size(0), channels, height, width, layout.channels_last,
        device_sizes(hw), bins, map_scratch.defined() ? map_scratch.data_ptr<scalar_t>() : nullptr, global_hist,
        boxes.data_ptr<int64_t>(), deferred::report());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return boxes;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("cam_boxes", &cam_boxes_cuda);
  m.impl("otsu_threshold", &otsu_threshold_cuda);
  m.impl("cam_to_boxes", &cam_to_boxes_cuda);
}

}  // namespace cim_ext
