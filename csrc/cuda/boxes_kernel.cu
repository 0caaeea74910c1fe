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

// More bins than this cannot be resolved by a float32 map and would only cost memory.
constexpr int64_t kMaxBins = int64_t(1) << 20;

bool is_cuda_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_maps(const char* op, const at::Tensor& cams) {
  TORCH_CHECK(cams.dim() == 3, op, ": cams must be a 3-D tensor [B, h, w], got shape ", cams.sizes());
  TORCH_CHECK(is_cuda_float(cams.scalar_type()), op,
              ": cams must be float32, float64, float16 or bfloat16 on CUDA, got ", cams.scalar_type());
  TORCH_CHECK(cams.is_cuda(), op, ": cams must be on a CUDA device, got ", cams.device());
  TORCH_CHECK(cams.size(0) == 0 || (cams.size(1) > 0 && cams.size(2) > 0), op,
              ": cams must be maps of at least 1x1, got shape ", cams.sizes());
}

// Sizes are not checked for positivity here (that would need a device sync); a non-positive size gives an
// empty box. cim_ext.ops checks them.
void check_sizes(const char* op, const at::Tensor& sizes, int64_t batch, const at::Device& device) {
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == batch && sizes.size(1) == 2, op, ": sizes must be [", batch,
              ", 2] (H, W per sample), got shape ", sizes.sizes());
  TORCH_CHECK(sizes.scalar_type() == at::kLong, op, ": sizes must be int64, got ", sizes.scalar_type());
  TORCH_CHECK(sizes.device() == device, op, ": sizes must be on ", device, " like the maps, got ", sizes.device());
}

void check_thresholds(const char* op, const at::Tensor& thresholds, int64_t batch, at::ScalarType dtype,
                      const at::Device& device) {
  TORCH_CHECK(thresholds.dim() == 1 && thresholds.size(0) == batch, op, ": thresholds must be [", batch,
              "], got shape ", thresholds.sizes());
  TORCH_CHECK(thresholds.scalar_type() == dtype, op, ": thresholds must have dtype ", dtype, " like the maps, got ",
              thresholds.scalar_type());
  TORCH_CHECK(thresholds.device() == device, op, ": thresholds must be on ", device, ", got ", thresholds.device());
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    cam_boxes_kernel(const scalar_t* __restrict__ cams, int64_t height, int64_t width,
                     const int64_t* __restrict__ sizes, const scalar_t* __restrict__ thresholds,
                     int64_t* __restrict__ boxes) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t b = blockIdx.x;
  cam_cuda::block_box<scalar_t, acc_t>(cams + b * height * width, height, width, sizes[2 * b], sizes[2 * b + 1],
                                       static_cast<acc_t>(thresholds[b]), boxes + 4 * b);
}

at::Tensor cam_boxes_cuda(const at::Tensor& cams, const at::Tensor& sizes, const at::Tensor& thresholds) {
  check_maps("cam_boxes", cams);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  check_sizes("cam_boxes", sizes, batch, cams.device());
  check_thresholds("cam_boxes", thresholds, batch, cams.scalar_type(), cams.device());
  c10::cuda::CUDAGuard guard(cams.device());
  auto boxes = at::zeros({batch, 4}, cams.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto cams_c = cams.contiguous();
  const auto sizes_c = sizes.contiguous();
  const auto thresholds_c = thresholds.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "cam_boxes_cuda", [&] {
    cam_boxes_kernel<scalar_t><<<batch, kBlock, 0, stream>>>(cams_c.data_ptr<scalar_t>(), height, width,
                                                             sizes_c.data_ptr<int64_t>(),
                                                             thresholds_c.data_ptr<scalar_t>(),
                                                             boxes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return boxes;
}

// Histograms of up to kSharedBins bins live in dynamic shared memory; larger ones in `global_hist` [B, bins].
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    otsu_threshold_kernel(const scalar_t* __restrict__ cams, int64_t height, int64_t width,
                          const int64_t* __restrict__ sizes, int64_t bins, Counter* __restrict__ global_hist,
                          scalar_t* __restrict__ out) {
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x;
  Counter* hist = global_hist != nullptr ? global_hist + b * bins : reinterpret_cast<Counter*>(shared_bytes);
  const int64_t k = cam_cuda::block_otsu<scalar_t, acc_t>(cams + b * height * width, height, width, sizes[2 * b],
                                                          sizes[2 * b + 1], bins, hist);
  if (threadIdx.x == 0) out[b] = cam_cuda::otsu_value<scalar_t>(k, bins);
}

// Global histogram scratch when bins is too large for shared memory (undefined tensor otherwise).
at::Tensor hist_scratch(int64_t batch, int64_t bins, const at::TensorOptions& options) {
  if (bins <= cam_cuda::kSharedBins) return at::Tensor();
  return at::empty({batch, bins}, options.dtype(at::kLong));
}

at::Tensor otsu_threshold_cuda(const at::Tensor& cams, const at::Tensor& sizes, int64_t bins) {
  check_maps("otsu_threshold", cams);
  TORCH_CHECK(bins >= 1 && bins <= kMaxBins, "otsu_threshold: bins must be in [1, ", kMaxBins, "], got ", bins);
  const int64_t batch = cams.size(0), height = cams.size(1), width = cams.size(2);
  check_sizes("otsu_threshold", sizes, batch, cams.device());
  c10::cuda::CUDAGuard guard(cams.device());
  auto out = at::empty({batch}, cams.options());
  if (batch == 0) return out;
  const auto cams_c = cams.contiguous();
  const auto sizes_c = sizes.contiguous();
  auto scratch = hist_scratch(batch, bins, cams.options());
  Counter* global_hist = scratch.defined() ? reinterpret_cast<Counter*>(scratch.data_ptr<int64_t>()) : nullptr;
  const size_t shared = global_hist != nullptr ? 0 : static_cast<size_t>(bins) * sizeof(Counter);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cams.scalar_type(), "otsu_threshold_cuda", [&] {
    otsu_threshold_kernel<scalar_t><<<batch, kBlock, shared, stream>>>(
        cams_c.data_ptr<scalar_t>(), height, width, sizes_c.data_ptr<int64_t>(), bins, global_hist,
        out.data_ptr<scalar_t>());
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
                        int64_t width, bool channels_last, const int64_t* __restrict__ sizes,
                        const scalar_t* __restrict__ thresholds, int64_t bins, scalar_t* __restrict__ global_maps,
                        Counter* __restrict__ global_hist, int64_t* __restrict__ boxes) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t partial[kBlock];
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t b = blockIdx.x;
  const int64_t pixels = height * width;
  const bool otsu = bins > 0;
  const size_t hist_bytes = otsu && global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  Counter* hist = global_hist != nullptr ? global_hist + b * bins : reinterpret_cast<Counter*>(shared_bytes);
  scalar_t* map = global_maps != nullptr ? global_maps + b * pixels
                                         : reinterpret_cast<scalar_t*>(shared_bytes + hist_bytes);
  const int64_t label = labels[b];
  CUDA_KERNEL_ASSERT(label >= 0 && label < classes);
  cam_cuda::block_raw_cam(fmaps + b * channels * pixels, weight + label * channels, channels, pixels, channels_last,
                          map, partial);
  cam_cuda::block_normalize<scalar_t, acc_t>(map, pixels);
  const int64_t H = sizes[2 * b], W = sizes[2 * b + 1];
  const acc_t threshold =
      otsu ? static_cast<acc_t>(cam_cuda::otsu_value<scalar_t>(
                 cam_cuda::block_otsu<scalar_t, acc_t>(map, height, width, H, W, bins, hist), bins))
           : static_cast<acc_t>(thresholds[b]);
  cam_cuda::block_box<scalar_t, acc_t>(map, height, width, H, W, threshold, boxes + 4 * b);
}

at::Tensor cam_to_boxes_cuda(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels,
                             const at::Tensor& sizes, const at::Tensor& thresholds, int64_t bins) {
  cam_cuda::check_cam_inputs("cam_to_boxes", fmaps, weight, labels);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  TORCH_CHECK(batch == 0 || (height > 0 && width > 0), "cam_to_boxes: fmaps must be maps of at least 1x1, got shape ",
              fmaps.sizes());
  TORCH_CHECK(bins <= kMaxBins, "cam_to_boxes: bins must be <= ", kMaxBins, ", got ", bins);
  check_sizes("cam_to_boxes", sizes, batch, fmaps.device());
  // With Otsu (bins > 0) the thresholds argument is ignored.
  if (bins <= 0) check_thresholds("cam_to_boxes", thresholds, batch, fmaps.scalar_type(), fmaps.device());
  c10::cuda::CUDAGuard guard(fmaps.device());
  auto boxes = at::zeros({batch, 4}, fmaps.options().dtype(at::kLong));
  if (batch == 0) return boxes;
  const auto layout = cam_cuda::fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  const auto labels_c = labels.contiguous();
  const auto sizes_c = sizes.contiguous();
  const auto thresholds_c = bins > 0 ? at::Tensor() : thresholds.contiguous();
  const int64_t pixels = height * width;
  const int64_t map_bytes = pixels * static_cast<int64_t>(fmaps.element_size());
  auto map_scratch = map_bytes > cam_cuda::kSharedMapBytes ? at::empty({batch, pixels}, fmaps.options()) : at::Tensor();
  auto hist = bins > 0 ? hist_scratch(batch, bins, fmaps.options()) : at::Tensor();
  Counter* global_hist = hist.defined() ? reinterpret_cast<Counter*>(hist.data_ptr<int64_t>()) : nullptr;
  const size_t hist_bytes = bins > 0 && global_hist == nullptr ? static_cast<size_t>(bins) * sizeof(Counter) : 0;
  const size_t shared = hist_bytes + (map_scratch.defined() ? 0 : static_cast<size_t>(map_bytes));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_to_boxes_cuda", [&] {
    cam_to_boxes_kernel<scalar_t><<<batch, kBlock, shared, stream>>>(
        layout.fmaps.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(),
        weight.size(0), channels, height, width, layout.channels_last, sizes_c.data_ptr<int64_t>(),
        bins > 0 ? nullptr : thresholds_c.data_ptr<scalar_t>(), bins,
        map_scratch.defined() ? map_scratch.data_ptr<scalar_t>() : nullptr, global_hist, boxes.data_ptr<int64_t>());
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
