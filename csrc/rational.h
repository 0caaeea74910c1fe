// Rational activation, version A: y = P(x) / Q(x), P(x) = a0 + a1 x + ... + am x^m, Q(x) = 1 + |b1 x| + ... + |bn x^n|.
// Host code shared by the CPU and CUDA kernels: argument checks, operand layouts and output allocation, and the
// constants that fix the order of the coefficient-gradient reduction on both devices.
//
// Both devices compute in the accumulation type (float for float16/bfloat16/float32 x, double for float64 x): the
// coefficients are cast to it on entry and their gradients back to the coefficients' dtypes on exit.
//
// Layout: the op is elementwise, so an x whose elements fill their storage span (any dense non-overlapping layout:
// contiguous, channels_last, permuted) is walked linearly in storage order and the outputs get x's strides
// (at::empty_like); any other x (strided slices, expanded views) is first copied into at::empty_like(x), a dense
// tensor with x's dimension order. Either way the output has the strides torch.empty_like(x) gives, which is what
// the fake kernels return.
//
// Determinism of the coefficient gradients: each chunk of kChunk consecutive elements (storage order) is reduced to
// one partial per coefficient in the accumulation type, in an order fixed by the chunk alone; the chunk partials are
// then added in double by kLanes lanes (lane l takes chunks l, l + kLanes, l + 2 kLanes, ... in that order) and the
// lanes combined by a pairwise tree (lane l += lane l + s for s = kLanes / 2, ..., 1). Nothing depends on the thread
// count or the CUDA grid, so repeated calls are bitwise equal; both devices use the same chunking, accumulation types
// and final order (the order inside a chunk is each device's own).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

namespace cim_ext {
namespace rational {

constexpr int64_t kMaxCoefficients = 16;
constexpr int64_t kChunk = 16384;
constexpr int kLanes = 256;

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_coefficients(const at::Tensor& coefficients, const char* name, const at::Tensor& x) {
  check_float(coefficients, name, /*allow_half=*/true);
  check_same_device(coefficients, name, x, "x");
  CIM_CHECK_ARG(coefficients.dim() == 1 && coefficients.numel() >= 1 && coefficients.numel() <= kMaxCoefficients,
                name, c10::str("a 1-D tensor of 1 to ", kMaxCoefficients, " coefficients"),
                c10::str("shape ", coefficients.sizes()));
}

// The operands as the kernels read them: x in a dense layout, the coefficients contiguous in the compute dtype.
struct Operands {
  at::Tensor x, numerator, denominator;
};

inline Operands prepare(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  check_float(x, "x", /*allow_half=*/true);
  check_coefficients(numerator, "numerator", x);
  check_coefficients(denominator, "denominator", x);
  const auto dtype = compute_dtype(x);
  return {x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x),
          numerator.to(dtype).contiguous(), denominator.to(dtype).contiguous()};
}

// The ops, given a device's kernels: Kernels::forward(x, y, numerator, denominator) fills y (x's strides) for a
// non-empty x; Kernels::backward(grad, x, numerator, denominator, grad_x, grad_numerator, grad_denominator) writes
// grad_x when it is defined and the coefficient gradients (in the compute dtype, zeros for an empty x) when they are
// defined, and is called only when there is something to compute.
template <typename Kernels>
at::Tensor forward(const at::Tensor& x, const at::Tensor& numerator, const at::Tensor& denominator) {
  const auto in = prepare(x, numerator, denominator);
  auto y = at::empty_like(in.x);
  if (y.numel() > 0) Kernels::forward(in.x, y, in.numerator, in.denominator);
  return y;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& numerator, const at::Tensor& denominator,
                                                        bool need_x, bool need_coefficients) {
  const auto in = prepare(x, numerator, denominator);
  check_same_device(grad, "grad", x, "x");
  check_same_dtype(grad, "grad", x, "x");
  CIM_CHECK_ARG(grad.sizes() == x.sizes(), "grad", c10::str("shape ", x.sizes(), " like x"),
                c10::str("shape ", grad.sizes()));
  // Walked in x's storage order: grad must share x's strides.
  const auto grad_ = grad.strides() == in.x.strides() ? grad : at::empty_like(in.x).copy_(grad);
  at::Tensor grad_x, grad_numerator, grad_denominator;
  if (need_x) grad_x = at::empty_like(in.x);
  if (need_coefficients) {
    grad_numerator = at::empty_like(in.numerator);
    grad_denominator = at::empty_like(in.denominator);
  }
  if ((need_x && x.numel() > 0) || need_coefficients) {
    Kernels::backward(grad_, in.x, in.numerator, in.denominator, grad_x, grad_numerator, grad_denominator);
  }
  const auto or_empty = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {or_empty(grad_x, x), or_empty(grad_numerator, numerator), or_empty(grad_denominator, denominator)};
}

}  // namespace rational
}  // namespace cim_ext
