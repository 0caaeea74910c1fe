// Rational activation (see rational.h), CPU kernels: the forward and one fused backward pass that writes dx and
// reduces the coefficient gradients.
//
// Elements are processed a few SIMD vectors at a time (GCC vector extensions, 64 bytes a vector) with every
// intermediate in registers, whatever the runtime number of coefficients. On x86-64 with GCC the element loops are
// compiled for AVX-512, AVX2 and baseline SSE2 and picked at load time (target_clones), since the extension itself
// is built for the baseline. The clones with FMA contract multiply-adds, so results can differ in the last bit
// between CPUs with and without AVX2 (never between runs or thread counts). float16/bfloat16 are computed in float32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "rational.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CIM_EXT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CIM_EXT_FLOAT16 1
// The 64-byte vector helpers below are always inlined, so no vector crosses a call boundary: the ABI note is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define CIM_EXT_SIMD_CLONES
#define CIM_EXT_FLOAT16 0
#endif

namespace cim_ext {
namespace {

using rational::kChunk;
using rational::kLanes;
using rational::kMaxCoefficients;

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename acc_t>
constexpr int64_t kWidth = 64 / sizeof(acc_t);

template <typename acc_t, typename scalar_t>
inline __attribute__((always_inline)) Vec<acc_t> load(const scalar_t* src) {
  acc_t values[kWidth<acc_t>];
  for (int64_t l = 0; l < kWidth<acc_t>; ++l) values[l] = static_cast<acc_t>(src[l]);
  Vec<acc_t> v;
  std::memcpy(&v, values, sizeof(v));
  return v;
}

template <typename acc_t, typename scalar_t>
inline __attribute__((always_inline)) void store(scalar_t* dst, Vec<acc_t> v) {
  acc_t values[kWidth<acc_t>];
  std::memcpy(values, &v, sizeof(v));
  for (int64_t l = 0; l < kWidth<acc_t>; ++l) dst[l] = static_cast<scalar_t>(values[l]);
}

// Half types convert whole vectors: c10's element conversions are bit tricks with branches that the vectoriser
// leaves scalar. bfloat16 is the upper half of a float32 and rounds to nearest even with NaN -> 0x7FC0, as
// c10::BFloat16(float); float16 goes through _Float16 with GCC on x86-64 (F16C instructions in the AVX2 and AVX-512
// clones, IEEE round to nearest even either way).
typedef uint32_t Bits __attribute__((vector_size(64)));
typedef uint16_t Words __attribute__((vector_size(32)));

template <>
inline __attribute__((always_inline)) Vec<float> load<float, c10::BFloat16>(const c10::BFloat16* src) {
  Words words;
  std::memcpy(&words, src, sizeof(words));
  const Bits bits = __builtin_convertvector(words, Bits) << 16;
  Vec<float> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <>
inline __attribute__((always_inline)) void store<float, c10::BFloat16>(c10::BFloat16* dst, Vec<float> v) {
  Bits bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Bits rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  const Words out = __builtin_convertvector(v != v ? Bits{} + UINT32_C(0x7FC0) : rounded, Words);
  std::memcpy(dst, &out, sizeof(out));
}

#if CIM_EXT_FLOAT16
typedef _Float16 Halves __attribute__((vector_size(32)));

template <>
inline __attribute__((always_inline)) Vec<float> load<float, c10::Half>(const c10::Half* src) {
  Halves halves;
  std::memcpy(&halves, src, sizeof(halves));
  return __builtin_convertvector(halves, Vec<float>);
}

template <>
inline __attribute__((always_inline)) void store<float, c10::Half>(c10::Half* dst, Vec<float> v) {
  const Halves out = __builtin_convertvector(v, Halves);
  std::memcpy(dst, &out, sizeof(out));
}
#endif

template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> splat(acc_t value) {
  return Vec<acc_t>{} + value;
}

template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> abs_of(Vec<acc_t> v) {
  return v < acc_t(0) ? -v : v;
}

// sign(0) = 0, as in the derivative torch.abs uses.
template <typename acc_t>
inline __attribute__((always_inline)) Vec<acc_t> sign_of(Vec<acc_t> v) {
  return v > acc_t(0) ? splat(acc_t(1)) : (v < acc_t(0) ? splat(acc_t(-1)) : Vec<acc_t>{});
}

// The coefficients in the compute type, with |b_k|, (k + 1) |b_k| and sign(b_k) precomputed.
template <typename acc_t>
struct Coefficients {
  acc_t a[kMaxCoefficients], abs_b[kMaxCoefficients], k_abs_b[kMaxCoefficients], sign_b[kMaxCoefficients];
  int64_t m, n;

  Coefficients(const acc_t* numerator, int64_t m_, const acc_t* denominator, int64_t n_) : m(m_), n(n_) {
    for (int64_t j = 0; j < m; ++j) a[j] = numerator[j];
    for (int64_t k = 0; k < n; ++k) {
      abs_b[k] = std::abs(denominator[k]);
      k_abs_b[k] = acc_t(k + 1) * abs_b[k];
      // d|b_k x^k| / db_k = sign(b_k) |x|^k, with sign(0) = 0 like torch.abs.
      sign_b[k] = static_cast<acc_t>(denominator[k] > acc_t(0)) - static_cast<acc_t>(denominator[k] < acc_t(0));
    }
  }
};

// Q = 1 + sum_k |b_k| |x|^k is bitwise the reference's 1 + sum_k |b_k x^k| (abs is exact and |x|^k = |x^k|).
constexpr int64_t kForwardVectors = 4;

template <typename scalar_t>
CIM_EXT_SIMD_CLONES void forward_span(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len,
                                      const Coefficients<at::opmath_type<scalar_t>>& c) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kBlock = kForwardVectors * kWidth<acc_t>;
  const auto block = [&](const scalar_t* xb, scalar_t* yb) __attribute__((always_inline)) {
    V xv[kForwardVectors], p[kForwardVectors], q[kForwardVectors], t[kForwardVectors], power[kForwardVectors];
    for (int u = 0; u < kForwardVectors; ++u) {
      xv[u] = load<acc_t>(xb + u * kWidth<acc_t>);
      p[u] = splat(c.a[c.m - 1]);
      t[u] = abs_of<acc_t>(xv[u]);
      q[u] = splat(acc_t(1));
      power[u] = q[u];
    }
    for (int64_t j = c.m - 2; j >= 0; --j) {
      for (int u = 0; u < kForwardVectors; ++u) p[u] = p[u] * xv[u] + c.a[j];
    }
    for (int64_t k = 0; k < c.n; ++k) {
      for (int u = 0; u < kForwardVectors; ++u) {
        power[u] *= t[u];
        q[u] += c.abs_b[k] * power[u];
      }
    }
    for (int u = 0; u < kForwardVectors; ++u) store<acc_t>(yb + u * kWidth<acc_t>, p[u] / q[u]);
  };
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) block(x + i, y + i);
  if (i < len) {  // the tail, through a zero-padded block
    scalar_t xs[kBlock] = {}, ys[kBlock];
    std::copy(x + i, x + len, xs);
    block(xs, ys);
    std::copy(ys, ys + (len - i), y + i);
  }
}

constexpr int64_t kBackwardVectors = 2;

// One chunk of the backward: writes grad_x (unless nullptr) and, unless partial is nullptr, the chunk's sums
// partial[0, m) of g x^j / Q and partial[m, m + n) of g y / Q |x|^k (the denominator gradient is
// -sign(b_k) times that; the sign is applied after the reduction). Each vector lane accumulates its own elements;
// the lanes are added in order at the end.
template <typename scalar_t>
CIM_EXT_SIMD_CLONES void backward_chunk(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                        scalar_t* __restrict__ grad_x, int64_t len,
                                        const Coefficients<at::opmath_type<scalar_t>>& c,
                                        at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t kBlock = kBackwardVectors * kWidth<acc_t>;
  V acc[2 * kMaxCoefficients];
  const int64_t count = c.m + c.n;
  for (int64_t i = 0; i < count; ++i) acc[i] = V{};
  const auto block = [&](const scalar_t* gb, const scalar_t* xb, scalar_t* outb) __attribute__((always_inline)) {
    V xv[kBackwardVectors], p[kBackwardVectors], dp[kBackwardVectors], q[kBackwardVectors], dq[kBackwardVectors],
        t[kBackwardVectors], power[kBackwardVectors], g_over_q[kBackwardVectors], w[kBackwardVectors];
    for (int u = 0; u < kBackwardVectors; ++u) {
      xv[u] = load<acc_t>(xb + u * kWidth<acc_t>);
      p[u] = splat(c.a[c.m - 1]);
      dp[u] = V{};
      t[u] = abs_of<acc_t>(xv[u]);
      q[u] = splat(acc_t(1));
      dq[u] = V{};
      power[u] = q[u];
    }
    for (int64_t j = c.m - 2; j >= 0; --j) {
      for (int u = 0; u < kBackwardVectors; ++u) {
        dp[u] = dp[u] * xv[u] + p[u];
        p[u] = p[u] * xv[u] + c.a[j];
      }
    }
    // dQ/d|x| = sum_k k |b_k| |x|^(k-1); dQ/dx = sign(x) dQ/d|x|.
    for (int64_t k = 0; k < c.n; ++k) {
      for (int u = 0; u < kBackwardVectors; ++u) {
        dq[u] += c.k_abs_b[k] * power[u];
        power[u] *= t[u];
        q[u] += c.abs_b[k] * power[u];
      }
    }
    for (int u = 0; u < kBackwardVectors; ++u) {
      const V y = p[u] / q[u];
      g_over_q[u] = load<acc_t>(gb + u * kWidth<acc_t>) / q[u];
      w[u] = g_over_q[u] * y;
      if (outb != nullptr) {
        store<acc_t>(outb + u * kWidth<acc_t>, g_over_q[u] * (dp[u] - y * (sign_of<acc_t>(xv[u]) * dq[u])));
      }
    }
    if (partial == nullptr) return;
    for (int u = 0; u < kBackwardVectors; ++u) power[u] = splat(acc_t(1));
    for (int64_t j = 0; j < c.m; ++j) {
      for (int u = 0; u < kBackwardVectors; ++u) {
        acc[j] += g_over_q[u] * power[u];
        power[u] *= xv[u];
      }
    }
    for (int u = 0; u < kBackwardVectors; ++u) power[u] = splat(acc_t(1));
    for (int64_t k = 0; k < c.n; ++k) {
      for (int u = 0; u < kBackwardVectors; ++u) {
        power[u] *= t[u];
        acc[c.m + k] += w[u] * power[u];
      }
    }
  };
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) block(grad + i, x + i, grad_x == nullptr ? nullptr : grad_x + i);
  if (i < len) {  // the tail, through a zero-padded block (grad 0: no contribution to the sums)
    scalar_t gs[kBlock] = {}, xs[kBlock] = {}, outs[kBlock];
    std::copy(grad + i, grad + len, gs);
    std::copy(x + i, x + len, xs);
    block(gs, xs, grad_x == nullptr ? nullptr : outs);
    if (grad_x != nullptr) std::copy(outs, outs + (len - i), grad_x + i);
  }
  if (partial == nullptr) return;
  for (int64_t i = 0; i < count; ++i) {
    acc_t lanes[kWidth<acc_t>];
    std::memcpy(lanes, &acc[i], sizeof(lanes));
    acc_t sum = acc_t(0);
    for (int64_t l = 0; l < kWidth<acc_t>; ++l) sum += lanes[l];
    partial[i] = sum;
  }
}

// The final pass over the chunk partials in the order rational.h fixes (the CUDA kernel follows the same order).
template <typename acc_t>
void sum_chunk_partials(const acc_t* partials, int64_t chunks, const Coefficients<acc_t>& c, acc_t* grad_numerator,
                        acc_t* grad_denominator) {
  const int64_t count = c.m + c.n;
  for (int64_t slot = 0; slot < count; ++slot) {
    double lanes[kLanes] = {};
    for (int64_t chunk = 0; chunk < chunks; ++chunk) lanes[chunk % kLanes] += partials[chunk * count + slot];
    for (int stride = kLanes / 2; stride > 0; stride /= 2) {
      for (int l = 0; l < stride; ++l) lanes[l] += lanes[l + stride];
    }
    if (slot < c.m) {
      grad_numerator[slot] = static_cast<acc_t>(lanes[0]);
    } else {
      grad_denominator[slot - c.m] = static_cast<acc_t>(-c.sign_b[slot - c.m] * lanes[0]);
    }
  }
}

struct CpuKernels {
  static void forward(const at::Tensor& x, at::Tensor& y, const at::Tensor& numerator, const at::Tensor& denominator) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_forward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Coefficients<acc_t> c(numerator.const_data_ptr<acc_t>(), numerator.numel(),
                                  denominator.const_data_ptr<acc_t>(), denominator.numel());
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      scalar_t* out = y.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
        forward_span<scalar_t>(in + begin, out + begin, end - begin, c);
      });
    });
  }

  static void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& numerator,
                       const at::Tensor& denominator, at::Tensor& grad_x, at::Tensor& grad_numerator,
                       at::Tensor& grad_denominator) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rational_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Coefficients<acc_t> c(numerator.const_data_ptr<acc_t>(), numerator.numel(),
                                  denominator.const_data_ptr<acc_t>(), denominator.numel());
      const int64_t numel = x.numel();
      const int64_t chunks = at::divup(numel, kChunk);
      const int64_t count = c.m + c.n;
      std::vector<acc_t> partials(grad_numerator.defined() ? chunks * count : 0);
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* in = x.const_data_ptr<scalar_t>();
      scalar_t* out = grad_x.defined() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t start = chunk * kChunk;
          backward_chunk<scalar_t>(g + start, in + start, out == nullptr ? nullptr : out + start,
                                   std::min(kChunk, numel - start), c,
                                   partials.empty() ? nullptr : partials.data() + chunk * count);
        }
      });
      if (grad_numerator.defined()) {
        sum_chunk_partials(partials.data(), chunks, c, grad_numerator.mutable_data_ptr<acc_t>(),
                           grad_denominator.mutable_data_ptr<acc_t>());
      }
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("rational", &rational::forward<CpuKernels>);
  m.impl("_rational_backward", &rational::backward<CpuKernels>);
}

}  // namespace cim_ext
