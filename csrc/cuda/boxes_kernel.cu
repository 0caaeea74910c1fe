// CUDA kernels of cam_boxes, otsu_threshold and cam_to_boxes: one block per sample. The full-resolution map is
// never stored: each thread interpolates the pixels it visits from the tiny h x w map (cam_common.cuh).
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
  if (H >= 1 && W >= 1) return true;
  if (threadIdx.x == 0) deferred::record(errors, deferred::kSize, op, b, H < 1 ? H : W, 1);
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    cam_boxes_kernel(const scalar_t* __restrict__ cams, int64_t height, int64_t width, SampleSizes sizes,
                     const scalar_t* __restrict__ thresholds, scalar_t threshold, int64_t* __restrict__ boxes,
                     deferred::Report* errors) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t b = blockIdx.x;
  int64_t H, W;
  if (!sample_size(sizes, b, deferred::kCamBoxes, errors, H, W)) return empty_box(boxes + 4 * b);
  cam_cuda::block_box<scalar_t, acc_t>(cams + b * height * width, height, width, H, W,
                                       static_cast<acc_t>(fixed_threshold(thresholds, threshold, b)), boxes + 4 * b);
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
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "cam_boxes_cuda", [&] {
    cam_boxes_kernel<scalar_t><<<batch, kBlock, 0, stream>>>(
        cams_c.const_data_ptr<scalar_t>(), height, width, device_sizes(hw), device_thresholds<scalar_t>(thr),
        static_cast<scalar_t>(thr.value), boxes.data_ptr<int64_t>(), deferred::report());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Dynamic shared memory: [histogram (Otsu, if it fits)][normalised map (if it fits)]; what does not fit is in
// the global scratch buffers.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    cam_to_boxes_kernel(const scalar_t* __restrict__ fmaps, const scalar_t* __restrict__ weight,
                        const int64_t* __restrict__ labels, int64_t classes, int64_t channels, int64_t height,
                        int64_t width, bool channels_last, SampleSizes sizes, const scalar_t* __restrict__ thresholds,
                        scalar_t threshold, int64_t bins, scalar_t* __restrict__ global_maps,
                        Counter* __restrict__ global_hist, int64_t* __restrict__ boxes, deferred::Report* errors) {
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
  const bool otsu = bins > 0;
  const size_t hist_bytes = otsu && global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  Counter* hist = global_hist != nullptr ? global_hist + b * bins : reinterpret_cast<Counter*>(shared_bytes);
  scalar_t* map = global_maps != nullptr ? global_maps + b * pixels
                                         : reinterpret_cast<scalar_t*>(shared_bytes + hist_bytes);
  cam_cuda::block_raw_cam(fmaps + b * channels * pixels, weight + label * channels, channels, pixels, channels_last,
                          map, partial);
  cam_cuda::block_normalize<scalar_t, acc_t>(map, pixels);
  const acc_t cut =
      otsu ? static_cast<acc_t>(cam_cuda::otsu_value<scalar_t>(
                 cam_cuda::block_otsu<scalar_t, acc_t>(map, height, width, H, W, bins, hist), bins))
           : static_cast<acc_t>(fixed_threshold(thresholds, threshold, b));
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
  const int64_t pixels = height * width;
  const int64_t map_bytes = pixels * static_cast<int64_t>(fmaps.element_size());
  auto map_scratch = map_bytes > cam_cuda::kSharedMapBytes ? at::empty({batch, pixels}, fmaps.options()) : at::Tensor();
  auto hist = otsu ? hist_scratch(batch, bins, fmaps.options()) : at::Tensor();
  Counter* global_hist = hist.defined() ? reinterpret_cast<Counter*>(hist.data_ptr<int64_t>()) : nullptr;
  const size_t hist_bytes = otsu && global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  const size_t shared = hist_bytes + (map_scratch.defined() ? 0 : static_cast<size_t>(map_bytes));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_to_boxes_cuda", [&] {
    cam_to_boxes_kernel<scalar_t><<<batch, kBlock, shared, stream>>>(
        layout.fmaps.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(),
        labels_c.const_data_ptr<int64_t>(), weight.size(0), channels, height, width, layout.channels_last,
        device_sizes(hw), device_thresholds<scalar_t>(thr), static_cast<scalar_t>(thr.value), otsu ? bins : 0,
        map_scratch.defined() ? map_scratch.data_ptr<scalar_t>() : nullptr, global_hist, boxes.data_ptr<int64_t>(),
        deferred::report());
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
