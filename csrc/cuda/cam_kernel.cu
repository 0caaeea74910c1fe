// CUDA kernels of cam and _cam_backward: one block per sample for the map (see cam_common.cuh), elementwise
// kernels for the feature-map gradient and per-(sample, channel) dot products for the weight gradient.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/cam_common.cuh"
#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

using cam_cuda::kBlock;

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    cam_forward_kernel(const scalar_t* __restrict__ fmaps, const scalar_t* __restrict__ weight,
                       const int64_t* __restrict__ labels, int64_t classes, int64_t channels, int64_t pixels,
                       bool channels_last, bool normalize, scalar_t* __restrict__ out, deferred::Report* errors) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ acc_t partial[kBlock];
  const int64_t b = blockIdx.x;
  const int64_t label = labels[b];
  scalar_t* map = out + b * pixels;
  if (!cam_cuda::label_ok(label, classes, b, deferred::kCam, errors)) {
    for (int64_t p = threadIdx.x; p < pixels; p += kBlock) map[p] = scalar_t(0);
    return;
  }
  cam_cuda::block_raw_cam(fmaps + b * channels * pixels, weight + label * channels, channels, pixels, channels_last,
                          map, partial);
  if (normalize) cam_cuda::block_normalize<scalar_t, acc_t>(map, pixels);
}

at::Tensor cam_forward_cuda(const at::Tensor& fmaps, const at::Tensor& weight, const at::Tensor& labels,
                            bool normalize) {
  deferred::raise_deferred_errors();
  const auto labels_c = checked_labels(fmaps, weight, labels);
  c10::cuda::CUDAGuard guard(fmaps.device());
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  auto out = at::empty({batch, height, width}, fmaps.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const auto layout = fmaps_layout(fmaps);
  const auto weight_c = weight.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_cuda", [&] {
    cam_forward_kernel<scalar_t><<<batch, kBlock, 0, stream>>>(
        layout.fmaps.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(),
        weight.size(0), channels, height * width, layout.channels_last, normalize, out.data_ptr<scalar_t>(),
        deferred::report());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Gradient with respect to the raw map of each sample, graw[B, P] (see the CPU kernel for the formula): the
// min/max terms go to the argmin/argmax elements, split evenly among ties; a constant map gets zero.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    cam_raw_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ fmaps,
                        const scalar_t* __restrict__ weight, const int64_t* __restrict__ labels, int64_t classes,
                        int64_t channels, int64_t pixels, bool channels_last, bool normalize,
                        scalar_t* __restrict__ raw_maps, acc_t* __restrict__ graw, deferred::Report* errors) {
  __shared__ acc_t partial[kBlock];
  const int64_t b = blockIdx.x;
  const scalar_t* g = grad + b * pixels;
  acc_t* out = graw + b * pixels;
  const int64_t label = labels[b];
  if (!cam_cuda::label_ok(label, classes, b, deferred::kCamBackward, errors)) {
    for (int64_t p = threadIdx.x; p < pixels; p += kBlock) out[p] = acc_t(0);  // and no weight row is touched
    return;
  }
  if (!normalize) {
    for (int64_t p = threadIdx.x; p < pixels; p += kBlock) out[p] = static_cast<acc_t>(g[p]);
    return;
  }
  scalar_t* raw = raw_maps + b * pixels;
  cam_cuda::block_raw_cam(fmaps + b * channels * pixels, weight + label * channels, channels, pixels, channels_last,
                          raw, partial);
  const auto mm = cam_cuda::block_min_max<scalar_t, acc_t>(raw, pixels);
  const acc_t span = static_cast<acc_t>(static_cast<scalar_t>(mm.high - mm.low));
  if (!(span > acc_t(0))) {  // the same for every thread of the block
    for (int64_t p = threadIdx.x; p < pixels; p += kBlock) out[p] = acc_t(0);
    return;
  }
  int64_t n_low = 0, n_high = 0;
  acc_t sum_g = 0, sum_gd = 0;
  for (int64_t p = threadIdx.x; p < pixels; p += kBlock) {
    const acc_t v = static_cast<acc_t>(raw[p]);
    const acc_t gp = static_cast<acc_t>(g[p]);
    n_low += v == mm.low;
    n_high += v == mm.high;
    sum_g += gp;
    sum_gd += gp * static_cast<acc_t>(static_cast<scalar_t>(v - mm.low));
  }
  n_low = cam_cuda::block_reduce(n_low, cam_cuda::Sum());
  n_high = cam_cuda::block_reduce(n_high, cam_cuda::Sum());
  sum_g = cam_cuda::block_reduce(sum_g, cam_cuda::Sum());
  sum_gd = cam_cuda::block_reduce(sum_gd, cam_cuda::Sum());
  const acc_t d_high = -sum_gd / (span * span);
  const acc_t d_low = -sum_g / span - d_high;
  const acc_t share_low = d_low / static_cast<acc_t>(n_low);
  const acc_t share_high = d_high / static_cast<acc_t>(n_high);
  for (int64_t p = threadIdx.x; p < pixels; p += kBlock) {
    const acc_t v = static_cast<acc_t>(raw[p]);
    acc_t value = static_cast<acc_t>(g[p]) / span;
    if (v == mm.low) value += share_low;
    if (v == mm.high) value += share_high;
    out[p] = value;
  }
}

// grad_fmaps[b, c, p] = weight[labels[b], c] * graw[b, p], written NCHW-contiguous.
template <typename scalar_t, typename acc_t>
__global__ void cam_grad_fmaps_kernel(const acc_t* __restrict__ graw, const scalar_t* __restrict__ weight,
                                      const int64_t* __restrict__ labels, int64_t classes, int64_t channels,
                                      int64_t pixels, int64_t total, scalar_t* __restrict__ out) {
  CIM_EXT_KERNEL_LOOP(i, total) {
    const int64_t p = i % pixels;
    const int64_t bc = i / pixels;
    const int64_t c = bc % channels;
    const int64_t label = labels[bc / channels];
    const acc_t w = label >= 0 && label < classes ? static_cast<acc_t>(weight[label * channels + c]) : acc_t(0);
    out[i] = static_cast<scalar_t>(w * graw[(bc / channels) * pixels + p]);
  }
}

// grad_weight[labels[b], c] += sum_p fmaps[b, c, p] * graw[b, p]: a thread per (b, c), consecutive threads on
// consecutive channels, one atomic per thread into an acc_t buffer. Samples sharing a label add in a run-dependent
// order, so the host flags this kernel with alertNotDeterministic.
template <typename scalar_t, typename acc_t>
__global__ void cam_grad_weight_kernel(const acc_t* __restrict__ graw, const scalar_t* __restrict__ fmaps,
                                       const int64_t* __restrict__ labels, int64_t classes, int64_t channels,
                                       int64_t pixels, bool channels_last, int64_t total,
                                       acc_t* __restrict__ grad_weight) {
  CIM_EXT_KERNEL_LOOP(i, total) {
    const int64_t c = i % channels;
    const int64_t b = i / channels;
    if (labels[b] < 0 || labels[b] >= classes) continue;  // recorded by cam_raw_grad_kernel
    const scalar_t* f = fmaps + b * channels * pixels + (channels_last ? c : c * pixels);
    const int64_t stride = channels_last ? channels : 1;
    const acc_t* g = graw + b * pixels;
    acc_t sum = 0;
    for (int64_t p = 0; p < pixels; ++p) sum += static_cast<acc_t>(f[p * stride]) * g[p];
    atomicAdd(grad_weight + labels[b] * channels + c, sum);
  }
}

std::tuple<at::Tensor, at::Tensor> cam_backward_cuda(const at::Tensor& grad, const at::Tensor& fmaps,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     bool normalize, bool need_fmaps, bool need_weight) {
  deferred::raise_deferred_errors();
  const auto labels_c = checked_labels(fmaps, weight, labels);
  check_cam_grad(grad, fmaps);
  const int64_t batch = fmaps.size(0), channels = fmaps.size(1), height = fmaps.size(2), width = fmaps.size(3);
  if (need_weight) at::globalContext().alertNotDeterministic("cim_ext::_cam_backward (CUDA, weight gradient)");
  c10::cuda::CUDAGuard guard(fmaps.device());
  const auto acc_type = at::toAccumulateType(fmaps.scalar_type(), /*is_cuda=*/true);
  auto grad_fmaps = need_fmaps ? at::empty(fmaps.sizes(), fmaps.options().memory_format(at::MemoryFormat::Contiguous))
                               : fmaps.new_empty({0});
  auto grad_weight_acc = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(acc_type)) : at::Tensor();
  const int64_t pixels = height * width;
  if ((need_fmaps || need_weight) && batch * channels * pixels > 0) {
    const auto layout = fmaps_layout(fmaps);
    const auto weight_c = weight.contiguous();
    const auto grad_c = grad.contiguous();
    auto raw_maps = normalize ? at::empty({batch, pixels}, fmaps.options()) : at::Tensor();
    auto graw = at::empty({batch, pixels}, fmaps.options().dtype(acc_type));
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fmaps.scalar_type(), "cam_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, true>;
      cam_raw_grad_kernel<scalar_t, acc_t><<<batch, kBlock, 0, stream>>>(
          grad_c.data_ptr<scalar_t>(), layout.fmaps.data_ptr<scalar_t>(), weight_c.data_ptr<scalar_t>(),
          labels_c.data_ptr<int64_t>(), weight.size(0), channels, pixels, layout.channels_last, normalize,
          normalize ? raw_maps.data_ptr<scalar_t>() : nullptr, graw.data_ptr<acc_t>(), deferred::report());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_fmaps) {
        const int64_t total = batch * channels * pixels;
        cam_grad_fmaps_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            graw.data_ptr<acc_t>(), weight_c.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(), weight.size(0),
            channels, pixels, total, grad_fmaps.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_weight) {
        const int64_t total = batch * channels;
        cam_grad_weight_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            graw.data_ptr<acc_t>(), layout.fmaps.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(), weight.size(0),
            channels, pixels, layout.channels_last, total, grad_weight_acc.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  auto grad_weight = need_weight ? grad_weight_acc.to(weight.scalar_type()) : weight.new_empty({0});
  return {grad_fmaps, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("cam", &cam_forward_cuda);
  m.impl("_cam_backward", &cam_backward_cuda);
}

}  // namespace cim_ext
