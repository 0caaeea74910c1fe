// Rational activation, version A: y = P(x) / Q(x), P(x) = a0 + a1 x + ... + am x^m (Horner),
// Q(x) = 1 + |b1 x| + ... + |bn x^n|. CPU kernels: the forward and one fused backward pass that writes dx and
// reduces the coefficient gradients deterministically.
//
// Elements are evaluated kBlock at a time, one coefficient at a time, so every inner loop runs over a small local
// array and vectorises whatever the (runtime) number of coefficients.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <vector>

namespace cim_ext {
namespace {

constexpr int64_t kMaxCoefficients = 16;
constexpr int64_t kBlock = 64;
// Coefficient gradients are summed per fixed-size chunk and the chunk sums are added in order, so the result does
// not depend on how at::parallel_for splits the work (bitwise identical for any thread count).
constexpr int64_t kChunk = 1 << 14;
static_assert(kChunk % kBlock == 0, "a chunk is a whole number of blocks");

void check_coefficients(const char* op, const at::Tensor& x, const at::Tensor& numerator,
                        const at::Tensor& denominator) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(numerator.device().is_cpu(), op, ": numerator must be on x's device (cpu), got ",
              numerator.device());
  TORCH_CHECK(denominator.device().is_cpu(), op, ": denominator must be on x's device (cpu), got ",
              denominator.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64 on CPU, got ", x.scalar_type());
  TORCH_CHECK(numerator.scalar_type() == x.scalar_type(), op, ": numerator must have x's dtype ",
              x.scalar_type(), ", got ", numerator.scalar_type());
  TORCH_CHECK(denominator.scalar_type() == x.scalar_type(), op, ": denominator must have x's dtype ",
              x.scalar_type(), ", got ", denominator.scalar_type());
  TORCH_CHECK(numerator.dim() == 1 && numerator.numel() >= 1 && numerator.numel() <= kMaxCoefficients, op,
              ": numerator must be a 1-D tensor of 1 to ", kMaxCoefficients, " coefficients, got shape ",
              numerator.sizes());
  TORCH_CHECK(denominator.dim() == 1 && denominator.numel() <= kMaxCoefficients, op,
              ": denominator must be a 1-D tensor of at most ", kMaxCoefficients, " coefficients, got shape ",
              denominator.sizes());
}

template <typename scalar_t>
inline scalar_t sign_of(scalar_t v) {
  // sign(0) = 0, as in the derivative torch.abs uses. Written without branches so the loops vectorise.
  return static_cast<scalar_t>(v > scalar_t(0)) - static_cast<scalar_t>(v < scalar_t(0));
}

template <typename scalar_t>
void forward_block(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t len, const scalar_t* a,
                   int64_t m, const scalar_t* b, int64_t n) {
  scalar_t p[kBlock], q[kBlock], power[kBlock];
  for (int64_t i = 0; i < len; ++i) p[i] = a[m - 1];
  for (int64_t j = m - 2; j >= 0; --j) {
    const scalar_t aj = a[j];
    for (int64_t i = 0; i < len; ++i) p[i] = p[i] * x[i] + aj;
  }
  for (int64_t i = 0; i < len; ++i) {
    q[i] = scalar_t(1);
    power[i] = scalar_t(1);
  }
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t bk = b[k];
    for (int64_t i = 0; i < len; ++i) {
      power[i] *= x[i];
      q[i] += std::abs(bk * power[i]);
    }
  }
  for (int64_t i = 0; i < len; ++i) y[i] = p[i] / q[i];
}

template <typename scalar_t>
void rational_forward_impl(const scalar_t* x, scalar_t* y, int64_t numel, const scalar_t* a, int64_t m,
                           const scalar_t* b, int64_t n) {
  const int64_t grain = at::divup(at::internal::GRAIN_SIZE, kBlock);
  at::parallel_for(0, at::divup(numel, kBlock), grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t start = block * kBlock;
      forward_block(x + start, y + start, std::min(kBlock, numel - start), a, m, b, n);
    }
  });
}

// Per-thread scratch of the backward: per-element values of one block and per-lane coefficient-gradient sums of
// one chunk (lane i accumulates the elements at offset i of each block, so the adds vectorise).
template <typename scalar_t>
struct BackwardScratch {
  scalar_t p[kBlock], dp[kBlock], q[kBlock], dq[kBlock], power[kBlock];
  scalar_t signed_power[kMaxCoefficients][kBlock];  // sign(b_k x^k) x^k
  scalar_t lanes[2 * kMaxCoefficients][kBlock];
};

template <typename scalar_t>
void backward_block(BackwardScratch<scalar_t>& s, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                    scalar_t* __restrict__ grad_x, int64_t len, const scalar_t* a, int64_t m, const scalar_t* b,
                    int64_t n, bool need_coefficients) {
  // P and P' by Horner.
  for (int64_t i = 0; i < len; ++i) {
    s.p[i] = a[m - 1];
    s.dp[i] = scalar_t(0);
  }
  for (int64_t j = m - 2; j >= 0; --j) {
    const scalar_t aj = a[j];
    for (int64_t i = 0; i < len; ++i) {
      s.dp[i] = s.dp[i] * x[i] + s.p[i];
      s.p[i] = s.p[i] * x[i] + aj;
    }
  }
  // Q and Q', with d|b_k x^k|/dx = sign(b_k x^k) k b_k x^(k-1).
  for (int64_t i = 0; i < len; ++i) {
    s.q[i] = scalar_t(1);
    s.dq[i] = scalar_t(0);
    s.power[i] = scalar_t(1);
  }
  for (int64_t k = 0; k < n; ++k) {
    const scalar_t bk = b[k];
    const scalar_t kbk = scalar_t(k + 1) * bk;
    scalar_t* signed_power = s.signed_power[k];
    for (int64_t i = 0; i < len; ++i) {
      const scalar_t next = s.power[i] * x[i];
      const scalar_t term = bk * next;
      const scalar_t sign = sign_of(term);
      s.q[i] += std::abs(term);
      s.dq[i] += sign * kbk * s.power[i];
      signed_power[i] = sign * next;
      s.power[i] = next;
    }
  }
  // dy/dx = (P' - y Q') / Q; reuse q for grad / Q and p for -grad * y / Q (the coefficient factors).
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t inv = scalar_t(1) / s.q[i];
    const scalar_t y = s.p[i] * inv;
    const scalar_t grad_over_q = grad[i] * inv;
    s.dq[i] = grad_over_q * (s.dp[i] - y * s.dq[i]);
    s.q[i] = grad_over_q;
    s.p[i] = -grad_over_q * y;
  }
  if (grad_x != nullptr) {
    for (int64_t i = 0; i < len; ++i) grad_x[i] = s.dq[i];
  }
  if (!need_coefficients) return;
  // dy/da_j = x^j / Q; dy/db_k = -y / Q * sign(b_k x^k) x^k.
  for (int64_t i = 0; i < len; ++i) s.power[i] = scalar_t(1);
  for (int64_t j = 0; j < m; ++j) {
    scalar_t* lane = s.lanes[j];
    for (int64_t i = 0; i < len; ++i) {
      lane[i] += s.q[i] * s.power[i];
      s.power[i] *= x[i];
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    scalar_t* lane = s.lanes[m + k];
    const scalar_t* signed_power = s.signed_power[k];
    for (int64_t i = 0; i < len; ++i) lane[i] += s.p[i] * signed_power[i];
  }
}

template <typename scalar_t>
void rational_backward_impl(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, scalar_t* grad_numerator,
                            scalar_t* grad_denominator, int64_t numel, const scalar_t* a, int64_t m,
                            const scalar_t* b, int64_t n) {
  const bool need_coefficients = grad_numerator != nullptr;
  const int64_t count = m + n;
  const int64_t chunks = at::divup(numel, kChunk);
  std::vector<double> partials(need_coefficients ? chunks * count : 0);
  at::parallel_for(0, chunks, at::divup(at::internal::GRAIN_SIZE, kChunk), [&](int64_t begin, int64_t end) {
    auto scratch = std::make_unique<BackwardScratch<scalar_t>>();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      if (need_coefficients) {
        for (int64_t c = 0; c < count; ++c) std::fill_n(scratch->lanes[c], kBlock, scalar_t(0));
      }
      const int64_t chunk_end = std::min(numel, (chunk + 1) * kChunk);
      for (int64_t start = chunk * kChunk; start < chunk_end; start += kBlock) {
        backward_block(*scratch, grad + start, x + start, grad_x == nullptr ? nullptr : grad_x + start,
                       std::min(kBlock, chunk_end - start), a, m, b, n, need_coefficients);
      }
      if (need_coefficients) {
        for (int64_t c = 0; c < count; ++c) {
          double sum = 0;
          for (int64_t i = 0; i < kBlock; ++i) sum += static_cast<double>(scratch->lanes[c][i]);
          partials[chunk * count + c] = sum;
        }
      }
    }
  });
  if (!need_coefficients) return;
  for (int64_t c = 0; c < count; ++c) {
    double sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * count + c];
    if (c < m) {
      grad_numerator[c] = static_cast<scalar_t>(sum);
    } else {
      grad_denominator[c - m] = static_cast<scalar_t>(sum);
    }
  }
}

at::Tensor rational_forward_kernel(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  check_coefficients("rational", x, numerator, denominator);
  auto y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const auto x_ = x.contiguous();
  const auto a = numerator.contiguous();
  const auto b = denominator.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rational_forward_cpu", [&] {
    rational_forward_impl<scalar_t>(x_.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x_.numel(),
                                    a.const_data_ptr<scalar_t>(), a.numel(), b.const_data_ptr<scalar_t>(),
                                    b.numel());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rational_backward_kernel(const at::Tensor& grad, const at::Tensor& x,
                                                                        const at::Tensor& numerator,
                                                                        const at::Tensor& denominator, bool need_x,
                                                                        bool need_coefficients) {
  check_coefficients("_rational_backward", x, numerator, denominator);
  TORCH_CHECK(grad.device().is_cpu(), "_rational_backward: grad must be on x's device (cpu), got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "_rational_backward: grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), "_rational_backward: grad must have x's shape ", x.sizes(), ", got ",
              grad.sizes());
  auto grad_x = need_x ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                       : at::empty({0}, x.options());
  auto grad_numerator = need_coefficients ? at::zeros_like(numerator, at::MemoryFormat::Contiguous)
                                          : at::empty({0}, numerator.options());
  auto grad_denominator = need_coefficients ? at::zeros_like(denominator, at::MemoryFormat::Contiguous)
                                            : at::empty({0}, denominator.options());
  if (x.numel() == 0 || (!need_x && !need_coefficients)) return {grad_x, grad_numerator, grad_denominator};
  const auto grad_ = grad.contiguous();
  const auto x_ = x.contiguous();
  const auto a = numerator.contiguous();
  const auto b = denominator.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rational_backward_cpu", [&] {
    rational_backward_impl<scalar_t>(
        grad_.const_data_ptr<scalar_t>(), x_.const_data_ptr<scalar_t>(),
        need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        need_coefficients ? grad_numerator.mutable_data_ptr<scalar_t>() : nullptr,
        need_coefficients ? grad_denominator.mutable_data_ptr<scalar_t>() : nullptr, x_.numel(),
        a.const_data_ptr<scalar_t>(), a.numel(), b.const_data_ptr<scalar_t>(), b.numel());
  });
  return {grad_x, grad_numerator, grad_denominator};
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("rational", &rational_forward_kernel);
  m.impl("_rational_backward", &rational_backward_kernel);
}

}  // namespace cim_ext
