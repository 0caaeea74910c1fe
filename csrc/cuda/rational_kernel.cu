// Rational activation (see rational.h), CUDA kernels: the forward (one read, one write) and one fused backward pass
// that reads grad and x, writes dx and reduces the coefficient gradients per chunk of rational::kChunk elements into
// a partials buffer, then a one-block-per-coefficient kernel that adds the chunk partials in the fixed order of
// rational.h (deterministic, no atomics, independent of the grid). Half types are loaded and stored as such and
// computed in float32; float64 stays float64.
//
// Loads are 16-byte packs (4 floats, 8 halves, 2 doubles) when every operand is 16-byte aligned, single elements
// otherwise (a view with a storage offset), with several packs in flight per thread. Grids hold exactly the blocks
// the device keeps resident (SMs x occupancy) and loop over the work. The coefficients sit in shared memory; the
// default degrees (5, 4) get a kernel with the counts known at compile time, any other counts (up to
// kMaxCoefficients each) the same code unrolled over the maxima and guarded by the runtime counts, so every index is
// a compile-time constant and nothing lives in local memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/deferred_errors.cuh"
#include "cuda/helpers.cuh"
#include "rational.h"

namespace cim_ext {
namespace {

using rational::kChunk;
using rational::kLanes;
using rational::kMaxCoefficients;

constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;
// Packs in flight per thread in the forward; the backward has two (one of grad, one of x): more would cost
// registers, as it keeps the coefficient-gradient sums in registers too.
constexpr int kForwardUnroll = 4;
static_assert(kLanes == kThreads, "the final pass runs one lane per thread");

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// The shape of a kernel: kNum, kDen coefficients exactly (kExact) or at most.
template <int kNum_, int kDen_, bool kExact_>
struct Degrees {
  static constexpr int kNum = kNum_;
  static constexpr int kDen = kDen_;
  static constexpr bool kExact = kExact_;
};
using DefaultDegrees = Degrees<6, 4, true>;
using AnyDegrees = Degrees<kMaxCoefficients, kMaxCoefficients, false>;

// Resident blocks per SM the register budget is sized for: 64 registers a thread for the default degrees in float,
// twice that for double values or for the kernels unrolled over kMaxCoefficients.
template <typename scalar_t, typename D>
constexpr int kMinBlocks = (D::kExact ? 4 : 2) / (int)(sizeof(at::opmath_type<scalar_t>) / sizeof(float));

// a_j, |b_k| and (k + 1) |b_k| in shared memory, filled by the first threads of the block.
template <typename acc_t>
struct Coefficients {
  acc_t a[kMaxCoefficients];
  acc_t abs_b[kMaxCoefficients];
  acc_t k_abs_b[kMaxCoefficients];

  __device__ __forceinline__ void load(const acc_t* __restrict__ numerator, const acc_t* __restrict__ denominator,
                                       int m, int n) {
    const int i = threadIdx.x;
    if (i < m) a[i] = numerator[i];
    if (i < n) {
      abs_b[i] = abs_of(denominator[i]);
      k_abs_b[i] = acc_t(i + 1) * abs_b[i];
    }
    __syncthreads();
  }

  static __device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
  static __device__ __forceinline__ double abs_of(double v) { return fabs(v); }
};

// Q = 1 + sum_k |b_k| |x|^k, which is the reference's 1 + sum_k |b_k x^k| (|x|^k = |x^k|).
template <typename D, typename acc_t>
__device__ __forceinline__ acc_t rational_value(acc_t x, const Coefficients<acc_t>& c, int m, int n) {
  if (D::kExact) {
    m = D::kNum;
    n = D::kDen;
  }
  acc_t p = c.a[m - 1];
#pragma unroll
  for (int j = D::kNum - 2; j >= 0; --j) {
    if (j < m - 1) p = p * x + c.a[j];
  }
  const acc_t t = Coefficients<acc_t>::abs_of(x);
  acc_t q = acc_t(1);
  acc_t power = acc_t(1);
#pragma unroll
  for (int k = 0; k < D::kDen; ++k) {
    if (k < n) {
      power *= t;
      q += c.abs_b[k] * power;
    }
  }
  return p / q;
}

// Returns dL/dx of one element; with need_coefficients adds g x^j / Q to acc[j] and g y / Q |x|^k to
// acc[kNum + k] (the denominator gradient is -sign(b_k) times the latter sum: the sign is applied once, after the
// reduction, since |b_k x^k| = |b_k| |x|^k).
template <typename D, typename acc_t>
__device__ __forceinline__ acc_t rational_grad(acc_t x, acc_t g, const Coefficients<acc_t>& c, int m, int n,
                                               acc_t (&acc)[D::kNum + D::kDen], bool need_coefficients) {
  if (D::kExact) {
    m = D::kNum;
    n = D::kDen;
  }
  // P and P' by Horner.
  acc_t p = c.a[m - 1];
  acc_t dp = acc_t(0);
#pragma unroll
  for (int j = D::kNum - 2; j >= 0; --j) {
    if (j < m - 1) {
      dp = dp * x + p;
      p = p * x + c.a[j];
    }
  }
  // Q and dQ/d|x| = sum_k k |b_k| |x|^(k-1); dQ/dx = sign(x) dQ/d|x| with sign(0) = 0 like torch.abs.
  const acc_t t = Coefficients<acc_t>::abs_of(x);
  acc_t q = acc_t(1);
  acc_t dq = acc_t(0);
  acc_t power = acc_t(1);
#pragma unroll
  for (int k = 0; k < D::kDen; ++k) {
    if (k < n) {
      dq += c.k_abs_b[k] * power;
      power *= t;
      q += c.abs_b[k] * power;
    }
  }
  const acc_t y = p / q;
  const acc_t g_over_q = g / q;
  if (need_coefficients) {
    power = acc_t(1);
#pragma unroll
    for (int j = 0; j < D::kNum; ++j) {
      if (j < m) {
        acc[j] += g_over_q * power;
        power *= x;
      }
    }
    const acc_t w = g_over_q * y;
    power = acc_t(1);
#pragma unroll
    for (int k = 0; k < D::kDen; ++k) {
      if (k < n) {
        power *= t;
        acc[D::kNum + k] += w * power;
      }
    }
  }
  const acc_t sign = static_cast<acc_t>(x > acc_t(0)) - static_cast<acc_t>(x < acc_t(0));
  return g_over_q * (dp - y * (sign * dq));
}

template <typename scalar_t, int kVec, typename D>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, D>)
    rational_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                            const at::opmath_type<scalar_t>* __restrict__ numerator,
                            const at::opmath_type<scalar_t>* __restrict__ denominator, int m, int n, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  __shared__ Coefficients<acc_t> c;
  c.load(numerator, denominator, m, n);
  const int64_t packs = numel / kVec;
  const int64_t stride = (int64_t)gridDim.x * kThreads * kForwardUnroll;
  for (int64_t base = (int64_t)blockIdx.x * kThreads * kForwardUnroll + threadIdx.x; base < packs; base += stride) {
    pack_t in[kForwardUnroll];
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < packs) in[u] = reinterpret_cast<const pack_t*>(x)[i];
    }
#pragma unroll
    for (int u = 0; u < kForwardUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < packs) {
        pack_t out;
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          out.v[v] = static_cast<scalar_t>(rational_value<D>(static_cast<acc_t>(in[u].v[v]), c, m, n));
        }
        reinterpret_cast<pack_t*>(y)[i] = out;
      }
    }
  }
  // The last numel % kVec elements, one per thread of the first block.
  const int64_t tail = packs * kVec + threadIdx.x;
  if (blockIdx.x == 0 && tail < numel) {
    y[tail] = static_cast<scalar_t>(rational_value<D>(static_cast<acc_t>(x[tail]), c, m, n));
  }
}

// Sums acc over the block into out[0, kCount) in a fixed order. Every thread of the block must call it; it ends
// with a barrier, so it can be called again at once.
template <typename acc_t, int kCount>
__device__ __forceinline__ void block_sum(const acc_t (&acc)[kCount], acc_t* __restrict__ out) {
  __shared__ acc_t warp_sums[kWarps][kCount];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    acc_t v = acc[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][i] = v;
  }
  __syncthreads();
  if (threadIdx.x < kCount) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    out[threadIdx.x] = sum;
  }
  __syncthreads();
}

// One block per chunk of kChunk elements (looping over chunks); partials: [chunks, kNum + kDen] sums of each chunk,
// or nullptr when the coefficient gradients are not needed; grad_x: nullptr when not needed. Within a chunk thread
// t takes packs t, t + kThreads, ... in order, so the partials do not depend on the grid.
template <typename scalar_t, int kVec, typename D>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, D>)
    rational_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ grad_x, const at::opmath_type<scalar_t>* __restrict__ numerator,
                             const at::opmath_type<scalar_t>* __restrict__ denominator, int m, int n, int64_t numel,
                             at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kCount = D::kNum + D::kDen;
  static_assert(kChunk % kVec == 0, "chunks start on a pack");
  __shared__ Coefficients<acc_t> c;
  c.load(numerator, denominator, m, n);
  const bool need_coefficients = partials != nullptr;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    acc_t acc[kCount];
#pragma unroll
    for (int i = 0; i < kCount; ++i) acc[i] = acc_t(0);
    const int64_t start = chunk * kChunk;
    const int len = (int)(numel - start < kChunk ? numel - start : kChunk);
    const int packs = len / kVec;
    const pack_t* grad_packs = reinterpret_cast<const pack_t*>(grad + start);
    const pack_t* x_packs = reinterpret_cast<const pack_t*>(x + start);
    pack_t* out_packs = grad_x == nullptr ? nullptr : reinterpret_cast<pack_t*>(grad_x + start);
    for (int i = threadIdx.x; i < packs; i += kThreads) {
      const pack_t g = grad_packs[i];
      const pack_t in = x_packs[i];
      pack_t out;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        out.v[v] = static_cast<scalar_t>(rational_grad<D>(static_cast<acc_t>(in.v[v]), static_cast<acc_t>(g.v[v]), c,
                                                          m, n, acc, need_coefficients));
      }
      if (out_packs != nullptr) out_packs[i] = out;
    }
    // The last len % kVec elements of the chunk (only the last chunk has any).
    const int tail = packs * kVec + threadIdx.x;
    if (tail < len) {
      const acc_t out = rational_grad<D>(static_cast<acc_t>(x[start + tail]), static_cast<acc_t>(grad[start + tail]),
                                         c, m, n, acc, need_coefficients);
      if (grad_x != nullptr) grad_x[start + tail] = static_cast<scalar_t>(out);
    }
    if (need_coefficients) block_sum(acc, partials + chunk * kCount);
  }
}

// One block per coefficient (m numerator ones, then n denominator ones): adds its column of the chunk partials in the
// order rational.h fixes (the CPU follows the same order): lane t sums chunks t, t + kLanes, ... in double, then a
// pairwise tree over the lanes. Writes zeros when there are no chunks.
template <typename acc_t>
__global__ void __launch_bounds__(kLanes)
    rational_sum_partials_kernel(const acc_t* __restrict__ partials, int64_t chunks, int columns, int num_columns,
                                 int m, const acc_t* __restrict__ denominator, acc_t* __restrict__ grad_numerator,
                                 acc_t* __restrict__ grad_denominator) {
  __shared__ double lanes[kLanes];
  const int slot = blockIdx.x;
  const int column = slot < m ? slot : num_columns + (slot - m);
  double sum = 0;
  for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += kLanes) sum += partials[chunk * columns + column];
  lanes[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kLanes / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) lanes[threadIdx.x] += lanes[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (slot < m) {
      grad_numerator[slot] = static_cast<acc_t>(lanes[0]);
    } else {
      // d|b_k x^k| / db_k = sign(b_k) |x|^k, with sign(0) = 0 like torch.abs.
      const acc_t b = denominator[slot - m];
      const acc_t sign = static_cast<acc_t>(b > acc_t(0)) - static_cast<acc_t>(b < acc_t(0));
      grad_denominator[slot - m] = static_cast<acc_t>(-sign * lanes[0]);
    }
  }
}

// Blocks that fill the device once (SMs x occupancy of the kernel, computed once per kernel), at most `work` and at
// least one.
template <auto kernel>
unsigned int resident_grid(int64_t work) {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  const int64_t resident = (int64_t)at::cuda::getCurrentDeviceProperties()->multiProcessorCount * per_sm;
  return (unsigned int)std::max<int64_t>(1, std::min(work, resident));
}

bool aligned(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % kPackBytes == 0;
}

// Calls f(std::integral_constant<int, kVec>, Degrees) for the kernel variant that fits the operands: packed loads
// for the default degrees when every operand is aligned; single elements otherwise (the code unrolled over
// kMaxCoefficients, run for a whole pack at once, would spill registers).
template <typename scalar_t, typename F>
void dispatch_variant(bool aligned_operands, const at::Tensor& numerator, const at::Tensor& denominator, const F& f) {
  if (numerator.numel() != DefaultDegrees::kNum || denominator.numel() != DefaultDegrees::kDen) {
    f(std::integral_constant<int, 1>{}, AnyDegrees{});
  } else if (aligned_operands) {
    f(std::integral_constant<int, kPackBytes / sizeof(scalar_t)>{}, DefaultDegrees{});
  } else {
    f(std::integral_constant<int, 1>{}, DefaultDegrees{});
  }
}

struct CudaKernels {
  static void forward(const at::Tensor& x, at::Tensor& y, const at::Tensor& numerator, const at::Tensor& denominator) {
    c10::cuda::CUDAGuard guard(x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_variant<scalar_t>(aligned(x) && aligned(y), numerator, denominator, [&](auto vec, auto degrees) {
        constexpr int kVec = decltype(vec)::value;
        constexpr auto kernel = rational_forward_kernel<scalar_t, kVec, decltype(degrees)>;
        const int64_t numel = x.numel();
        const unsigned int grid = resident_grid<kernel>(ceil_div(numel / kVec, (int64_t)kThreads * kForwardUnroll));
        kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), numerator.const_data_ptr<acc_t>(),
            denominator.const_data_ptr<acc_t>(), (int)numerator.numel(), (int)denominator.numel(), numel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& numerator,
                       const at::Tensor& denominator, at::Tensor& grad_x, at::Tensor& grad_numerator,
                       at::Tensor& grad_denominator) {
    c10::cuda::CUDAGuard guard(x.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const bool packed = aligned(grad) && aligned(x) && aligned(grad_x);
      dispatch_variant<scalar_t>(packed, numerator, denominator, [&](auto vec, auto degrees) {
        using D = decltype(degrees);
        constexpr int kCount = D::kNum + D::kDen;
        constexpr auto kernel = rational_backward_kernel<scalar_t, decltype(vec)::value, D>;
        const int64_t numel = x.numel();
        const int64_t chunks = ceil_div(numel, kChunk);
        const int m = (int)numerator.numel();
        const int n = (int)denominator.numel();
        auto stream = at::cuda::getCurrentCUDAStream();
        at::Tensor partials;
        if (grad_numerator.defined()) partials = at::empty({chunks, kCount}, numerator.options());
        if (numel > 0) {
          kernel<<<resident_grid<kernel>(chunks), kThreads, 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
              grad_x.defined() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, numerator.const_data_ptr<acc_t>(),
              denominator.const_data_ptr<acc_t>(), m, n, numel,
              partials.defined() ? partials.mutable_data_ptr<acc_t>() : nullptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (!partials.defined()) return;
        rational_sum_partials_kernel<acc_t><<<m + n, kLanes, 0, stream>>>(
            partials.const_data_ptr<acc_t>(), chunks, kCount, D::kNum, m, denominator.const_data_ptr<acc_t>(),
            grad_numerator.mutable_data_ptr<acc_t>(), grad_denominator.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

// Entry points: like every cim_ext CUDA op, first raise a value error an earlier kernel recorded.
at::Tensor rational_cuda(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  deferred::raise_deferred_errors();
  return rational::forward<CudaKernels>(x, numerator, denominator);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& numerator,
                                                                      const at::Tensor& denominator, bool need_x,
                                                                      bool need_coefficients) {
  deferred::raise_deferred_errors();
  return rational::backward<CudaKernels>(grad, x, numerator, denominator, need_x, need_coefficients);
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("rational", &rational_cuda);
  m.impl("_rational_backward", &rational_backward_cuda);
}

}  // namespace cim_ext
