// Rational activation, version A: y = P(x) / Q(x), P(x) = a0 + a1 x + ... + am x^m (Horner),
// Q(x) = 1 + |b1 x| + ... + |bn x^n|. CUDA kernels: the forward (one read, one write) and one fused backward pass
// that reads grad and x, writes dx and reduces the coefficient gradients: per-thread sums, a block reduction into a
// per-block partials buffer, then a second tiny kernel that adds the partials in a fixed order (deterministic, no
// atomics). Half types are loaded and stored as such and computed in float32; float64 stays float64.
//
// Every thread moves 16 bytes per load (4 floats, 8 halves, 2 doubles). The default degrees (5, 4) get a kernel with
// the coefficient counts known at compile time; any other counts (up to kMaxCoefficients each) use the same code
// with runtime bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda/helpers.cuh"

namespace cim_ext {
namespace {

constexpr int kMaxCoefficients = 16;
constexpr int kWarps = kThreads / 32;
constexpr int kPackBytes = 16;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

__device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_of(double v) { return fabs(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t sign_of(acc_t v) {
  // sign(0) = 0, as in the derivative torch.abs uses.
  return static_cast<acc_t>(v > acc_t(0)) - static_cast<acc_t>(v < acc_t(0));
}

// The coefficients, held in registers. With kExact the counts are kNum and kDen; otherwise those are maxima and m, n
// the runtime counts (every loop below is unrolled over the maxima and guarded by the runtime count).
template <typename acc_t, int kNum, int kDen, bool kExact>
struct Coefficients {
  acc_t a[kNum];
  acc_t b[kDen];
  int m;
  int n;

  __device__ __forceinline__ Coefficients(const acc_t* __restrict__ numerator, const acc_t* __restrict__ denominator,
                                          int num_count, int den_count)
      : m(kExact ? kNum : num_count), n(kExact ? kDen : den_count) {
#pragma unroll
    for (int j = 0; j < kNum; ++j) a[j] = j < m ? numerator[j] : acc_t(0);
#pragma unroll
    for (int k = 0; k < kDen; ++k) b[k] = k < n ? denominator[k] : acc_t(0);
  }
};

template <typename acc_t, int kNum, int kDen, bool kExact>
__device__ __forceinline__ acc_t rational_value(acc_t x, const Coefficients<acc_t, kNum, kDen, kExact>& c) {
  acc_t p = acc_t(0);
#pragma unroll
  for (int j = kNum - 1; j >= 0; --j) {
    if (j == c.m - 1) {
      p = c.a[j];
    } else if (j < c.m - 1) {
      p = p * x + c.a[j];
    }
  }
  acc_t q = acc_t(1);
  acc_t power = acc_t(1);
#pragma unroll
  for (int k = 0; k < kDen; ++k) {
    if (k < c.n) {
      power *= x;
      q += abs_of(c.b[k] * power);
    }
  }
  return p / q;
}

// Returns dL/dx for one element and adds its terms of the coefficient gradients to acc (numerator terms at [0, kNum),
// denominator terms at [kNum, kNum + kDen)).
template <typename acc_t, int kNum, int kDen, bool kExact>
__device__ __forceinline__ acc_t rational_grad(acc_t x, acc_t grad, const Coefficients<acc_t, kNum, kDen, kExact>& c,
                                               acc_t (&acc)[kNum + kDen], bool need_coefficients) {
  // P and P' by Horner.
  acc_t p = acc_t(0);
  acc_t dp = acc_t(0);
#pragma unroll
  for (int j = kNum - 1; j >= 0; --j) {
    if (j == c.m - 1) {
      p = c.a[j];
    } else if (j < c.m - 1) {
      dp = dp * x + p;
      p = p * x + c.a[j];
    }
  }
  // Q and Q', with d|b_k x^k|/dx = sign(b_k x^k) k b_k x^(k-1).
  acc_t q = acc_t(1);
  acc_t dq = acc_t(0);
  acc_t power = acc_t(1);
  acc_t signed_power[kDen];  // sign(b_k x^k) x^k
#pragma unroll
  for (int k = 0; k < kDen; ++k) {
    signed_power[k] = acc_t(0);
    if (k < c.n) {
      const acc_t next = power * x;
      const acc_t term = c.b[k] * next;
      const acc_t sign = sign_of(term);
      q += abs_of(term);
      dq += sign * acc_t(k + 1) * c.b[k] * power;
      signed_power[k] = sign * next;
      power = next;
    }
  }
  const acc_t inv = acc_t(1) / q;
  const acc_t y = p * inv;
  const acc_t grad_over_q = grad * inv;
  if (need_coefficients) {
    // dy/da_j = x^j / Q; dy/db_k = -y / Q * sign(b_k x^k) x^k.
    power = acc_t(1);
#pragma unroll
    for (int j = 0; j < kNum; ++j) {
      if (j < c.m) {
        acc[j] += grad_over_q * power;
        power *= x;
      }
    }
    const acc_t grad_y_over_q = -grad_over_q * y;
#pragma unroll
    for (int k = 0; k < kDen; ++k) {
      if (k < c.n) acc[kNum + k] += grad_y_over_q * signed_power[k];
    }
  }
  return grad_over_q * (dp - y * dq);
}

template <typename scalar_t, typename acc_t, int kNum, int kDen, bool kExact>
__global__ void __launch_bounds__(kThreads)
    rational_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                            const acc_t* __restrict__ numerator, const acc_t* __restrict__ denominator, int m, int n,
                            int64_t numel) {
  constexpr int kVec = kPackBytes / sizeof(scalar_t);
  using pack_t = Pack<scalar_t, kVec>;
  const Coefficients<acc_t, kNum, kDen, kExact> c(numerator, denominator, m, n);
  const int64_t packs = numel / kVec;
  CIM_EXT_KERNEL_LOOP(i, packs) {
    const pack_t in = reinterpret_cast<const pack_t*>(x)[i];
    pack_t out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) out.v[v] = static_cast<scalar_t>(rational_value(static_cast<acc_t>(in.v[v]), c));
    reinterpret_cast<pack_t*>(y)[i] = out;
  }
  // The last numel % kVec elements, one per thread of the first block.
  const int64_t tail = packs * kVec + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (tail < numel) y[tail] = static_cast<scalar_t>(rational_value(static_cast<acc_t>(x[tail]), c));
}

// Sums acc over the block into out[0, kCount) in a fixed order. Every thread of the block must call it.
template <typename acc_t, int kCount>
__device__ __forceinline__ void block_sum(const acc_t (&acc)[kCount], acc_t* __restrict__ out) {
  __shared__ acc_t warp_sums[kWarps][kCount];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kCount; ++c) {
    acc_t v = acc[c];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][c] = v;
  }
  __syncthreads();
  if (threadIdx.x < kCount) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
    out[threadIdx.x] = sum;
  }
}

// partials: [gridDim.x, kNum + kDen] coefficient-gradient sums of each block, or nullptr when not needed.
// grad_x: nullptr when not needed.
template <typename scalar_t, typename acc_t, int kNum, int kDen, bool kExact>
__global__ void __launch_bounds__(kThreads)
    rational_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ grad_x, const acc_t* __restrict__ numerator,
                             const acc_t* __restrict__ denominator, int m, int n, int64_t numel,
                             acc_t* __restrict__ partials) {
  constexpr int kVec = kPackBytes / sizeof(scalar_t);
  constexpr int kCount = kNum + kDen;
  using pack_t = Pack<scalar_t, kVec>;
  const Coefficients<acc_t, kNum, kDen, kExact> c(numerator, denominator, m, n);
  const bool need_coefficients = partials != nullptr;
  acc_t acc[kCount];
#pragma unroll
  for (int i = 0; i < kCount; ++i) acc[i] = acc_t(0);
  const int64_t packs = numel / kVec;
  CIM_EXT_KERNEL_LOOP(i, packs) {
    const pack_t g = reinterpret_cast<const pack_t*>(grad)[i];
    const pack_t in = reinterpret_cast<const pack_t*>(x)[i];
    pack_t out;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      out.v[v] = static_cast<scalar_t>(
          rational_grad(static_cast<acc_t>(in.v[v]), static_cast<acc_t>(g.v[v]), c, acc, need_coefficients));
    }
    if (grad_x != nullptr) reinterpret_cast<pack_t*>(grad_x)[i] = out;
  }
  const int64_t tail = packs * kVec + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (tail < numel) {
    const acc_t out =
        rational_grad(static_cast<acc_t>(x[tail]), static_cast<acc_t>(grad[tail]), c, acc, need_coefficients);
    if (grad_x != nullptr) grad_x[tail] = static_cast<scalar_t>(out);
  }
  if (need_coefficients) block_sum(acc, partials + (int64_t)blockIdx.x * kCount);
}

// One block per coefficient slot: adds partials[:, slot] over the blocks of the backward in a fixed order. Slots
// [0, num_slots) are numerator coefficients, the rest denominator ones; slots past the real counts are unused.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    rational_sum_partials_kernel(const acc_t* __restrict__ partials, int64_t blocks, int count, int num_slots, int m,
                                 int n, acc_t* __restrict__ grad_numerator, acc_t* __restrict__ grad_denominator) {
  __shared__ acc_t sums[kThreads];
  const int slot = blockIdx.x;
  acc_t sum = acc_t(0);
  for (int64_t i = threadIdx.x; i < blocks; i += kThreads) sum += partials[i * count + slot];
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (slot < num_slots) {
      if (slot < m) grad_numerator[slot] = sums[0];
    } else if (slot - num_slots < n) {
      grad_denominator[slot - num_slots] = sums[0];
    }
  }
}

template <typename scalar_t>
int64_t pack_count(int64_t numel) {
  return numel / (kPackBytes / sizeof(scalar_t));
}

template <typename scalar_t, typename acc_t, int kNum, int kDen, bool kExact>
void launch_forward(const at::Tensor& x, at::Tensor& y, const at::Tensor& numerator, const at::Tensor& denominator) {
  const int64_t numel = x.numel();
  rational_forward_kernel<scalar_t, acc_t, kNum, kDen, kExact>
      <<<blocks_for(pack_count<scalar_t>(numel)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), numerator.const_data_ptr<acc_t>(),
          denominator.const_data_ptr<acc_t>(), (int)numerator.numel(), (int)denominator.numel(), numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int kNum, int kDen, bool kExact>
void launch_backward(const at::Tensor& grad, const at::Tensor& x, at::Tensor& grad_x, const at::Tensor& numerator,
                     const at::Tensor& denominator, bool need_x, bool need_coefficients, at::Tensor& grad_numerator,
                     at::Tensor& grad_denominator) {
  const int64_t numel = x.numel();
  const int m = (int)numerator.numel();
  const int n = (int)denominator.numel();
  constexpr int kCount = kNum + kDen;
  const unsigned int blocks = blocks_for(pack_count<scalar_t>(numel));
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  if (need_coefficients) partials = at::empty({(int64_t)blocks, kCount}, numerator.options());
  rational_backward_kernel<scalar_t, acc_t, kNum, kDen, kExact><<<blocks, kThreads, 0, stream>>>(
      grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
      need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr, numerator.const_data_ptr<acc_t>(),
      denominator.const_data_ptr<acc_t>(), m, n, numel,
      need_coefficients ? partials.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!need_coefficients) return;
  rational_sum_partials_kernel<acc_t><<<kCount, kThreads, 0, stream>>>(
      partials.const_data_ptr<acc_t>(), (int64_t)blocks, kCount, kNum, m, n,
      grad_numerator.mutable_data_ptr<acc_t>(), n > 0 ? grad_denominator.mutable_data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool is_default_degrees(const at::Tensor& numerator, const at::Tensor& denominator) {
  return numerator.numel() == 6 && denominator.numel() == 4;
}

// Contiguous, and 16-byte aligned so that the packed loads are legal (a view with a storage offset may not be).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  auto out = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(out.const_data_ptr()) % kPackBytes != 0) {
    out = out.clone(at::MemoryFormat::Contiguous);
  }
  return out;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(numerator.device() == x.device(), op, ": numerator must be on x's device ", x.device(), ", got ",
              numerator.device());
  TORCH_CHECK(denominator.device() == x.device(), op, ": denominator must be on x's device ", x.device(), ", got ",
              denominator.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16 on CUDA, got ", dtype);
  const auto coefficient_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(numerator.scalar_type() == coefficient_dtype, op, ": numerator must be ", coefficient_dtype,
              " for x of dtype ", dtype, ", got ", numerator.scalar_type());
  TORCH_CHECK(denominator.scalar_type() == coefficient_dtype, op, ": denominator must be ", coefficient_dtype,
              " for x of dtype ", dtype, ", got ", denominator.scalar_type());
  TORCH_CHECK(numerator.dim() == 1 && numerator.numel() >= 1 && numerator.numel() <= kMaxCoefficients, op,
              ": numerator must be a 1-D tensor of 1 to ", kMaxCoefficients, " coefficients, got shape ",
              numerator.sizes());
  TORCH_CHECK(denominator.dim() == 1 && denominator.numel() <= kMaxCoefficients, op,
              ": denominator must be a 1-D tensor of at most ", kMaxCoefficients, " coefficients, got shape ",
              denominator.sizes());
}

at::Tensor rational_forward_cuda(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  check_inputs("rational", x, numerator, denominator);
  c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const auto x_ = contiguous_aligned(x);
  const auto a = numerator.contiguous();
  const auto b = denominator.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (is_default_degrees(a, b)) {
      launch_forward<scalar_t, acc_t, 6, 4, true>(x_, y, a, b);
    } else {
      launch_forward<scalar_t, acc_t, kMaxCoefficients, kMaxCoefficients, false>(x_, y, a, b);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& numerator,
                                                                      const at::Tensor& denominator, bool need_x,
                                                                      bool need_coefficients) {
  check_inputs("_rational_backward", x, numerator, denominator);
  TORCH_CHECK(grad.device() == x.device(), "_rational_backward: grad must be on x's device ", x.device(), ", got ",
              grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "_rational_backward: grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "_rational_backward: grad must have x's shape ", x.sizes(), ", got ",
              grad.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = need_x ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                       : at::empty({0}, x.options());
  auto grad_numerator = need_coefficients ? at::zeros_like(numerator, at::MemoryFormat::Contiguous)
                                          : at::empty({0}, numerator.options());
  auto grad_denominator = need_coefficients ? at::zeros_like(denominator, at::MemoryFormat::Contiguous)
                                            : at::empty({0}, denominator.options());
  if (x.numel() == 0 || (!need_x && !need_coefficients)) return {grad_x, grad_numerator, grad_denominator};
  const auto grad_ = contiguous_aligned(grad);
  const auto x_ = contiguous_aligned(x);
  const auto a = numerator.contiguous();
  const auto b = denominator.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (is_default_degrees(a, b)) {
      launch_backward<scalar_t, acc_t, 6, 4, true>(grad_, x_, grad_x, a, b, need_x, need_coefficients,
                                                   grad_numerator, grad_denominator);
    } else {
      launch_backward<scalar_t, acc_t, kMaxCoefficients, kMaxCoefficients, false>(
          grad_, x_, grad_x, a, b, need_x, need_coefficients, grad_numerator, grad_denominator);
    }
  });
  return {grad_x, grad_numerator, grad_denominator};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CUDA, m) {
  m.impl("rational", &rational_forward_cuda);
  m.impl("_rational_backward", &rational_backward_cuda);
}

}  // namespace cim_ext
