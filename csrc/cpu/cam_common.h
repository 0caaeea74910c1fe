// Per-sample building blocks shared by the CPU kernels of cam, _cam_backward, cam_boxes, otsu_threshold and
// cam_to_boxes. cam_to_boxes must reproduce cam followed by cam_boxes bit for bit, so both paths call these.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace cim_ext {
namespace cam_cpu {

// sum_p a[p] * b[p] with eight fixed partial sums (vectorisable without reassociating a single chain).
template <typename scalar_t>
scalar_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) part[k] += a[i] * b[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// raw[p] = sum_c w[c] * f[c, p] of one sample, rounded to scalar_t as the reference's tensor is. The order of
// the sum is fixed so forward, backward and cam_to_boxes see identical maps (and identical argmin/argmax).
template <typename scalar_t>
void raw_cam(const scalar_t* f, const scalar_t* w, int64_t channels, int64_t pixels, bool channels_last,
             scalar_t* raw) {
  if (channels_last) {
    // f[p * C + c]: a dot product per pixel.
    for (int64_t p = 0; p < pixels; ++p) raw[p] = dot(w, f + p * channels, channels);
    return;
  }
  // f[c * P + p]: four channels per sweep over the map, vectorised over p.
  scalar_t* __restrict__ out = raw;
  std::fill(out, out + pixels, scalar_t(0));
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) {
    const scalar_t* __restrict__ f0 = f + c * pixels;
    const scalar_t* __restrict__ f1 = f0 + pixels;
    const scalar_t* __restrict__ f2 = f1 + pixels;
    const scalar_t* __restrict__ f3 = f2 + pixels;
    const scalar_t w0 = w[c], w1 = w[c + 1], w2 = w[c + 2], w3 = w[c + 3];
    for (int64_t p = 0; p < pixels; ++p) out[p] += (w0 * f0[p] + w1 * f1[p]) + (w2 * f2[p] + w3 * f3[p]);
  }
  for (; c < channels; ++c) {
    const scalar_t* __restrict__ fc = f + c * pixels;
    const scalar_t wc = w[c];
    for (int64_t p = 0; p < pixels; ++p) out[p] += wc * fc[p];
  }
}

struct MinMax {
  double low, high;
};

template <typename scalar_t>
MinMax min_max(const scalar_t* raw, int64_t pixels) {
  scalar_t low = raw[0], high = raw[0];
  for (int64_t p = 1; p < pixels; ++p) {
    low = std::min(low, raw[p]);
    high = std::max(high, raw[p]);
  }
  return {static_cast<double>(low), static_cast<double>(high)};
}

// In place: (raw - min) / (max - min), all zeros for a constant map; the same operations as the reference.
template <typename scalar_t>
void normalize(scalar_t* map, int64_t pixels) {
  if (pixels == 0) return;
  const MinMax mm = min_max(map, pixels);
  const scalar_t low = static_cast<scalar_t>(mm.low);
  const scalar_t span = static_cast<scalar_t>(mm.high) - low;
  if (span > scalar_t(0)) {
    for (int64_t p = 0; p < pixels; ++p) map[p] = (map[p] - low) / span;
  } else {
    std::fill(map, map + pixels, scalar_t(0));
  }
}

// Linear interpolation along one axis, as ATen's CPU bilinear kernel computes it (UpSample.h:
// area_pixel_compute_scale, area_pixel_compute_source_index and compute_source_index_and_lambda with
// align_corners=False and no scale factor).
template <typename scalar_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<scalar_t> l0, l1;

  void build(int64_t in, int64_t out) {
    i0.resize(out);
    i1.resize(out);
    l0.resize(out);
    l1.resize(out);
    const scalar_t scale = static_cast<scalar_t>(in) / out;
    for (int64_t o = 0; o < out; ++o) {
      if (in == out) {
        i0[o] = i1[o] = o;
        l0[o] = scalar_t(1);
        l1[o] = scalar_t(0);
        continue;
      }
      scalar_t real = scale * (o + static_cast<scalar_t>(0.5)) - static_cast<scalar_t>(0.5);
      if (real < scalar_t(0)) real = scalar_t(0);
      // floorf, not floor, also for double: that is what ATen calls.
      const int64_t index = std::min(static_cast<int64_t>(floorf(static_cast<float>(real))), in - 1);
      const scalar_t lambda = std::min(std::max(real - index, scalar_t(0)), scalar_t(1));
      i0[o] = index;
      i1[o] = index + (index < in - 1 ? 1 : 0);
      l1[o] = lambda;
      l0[o] = scalar_t(1) - lambda;
    }
  }
};

// Bilinear upsampling of one h x w map to H x W, produced one output row at a time. The horizontal pass of every
// source row is tabulated once (h x W values), so an output pixel costs two multiplies and an add, in ATen's
// order: (horizontal of row y0) * ly0 + (horizontal of row y1) * ly1.
template <typename scalar_t>
class Upsampler {
 public:
  Upsampler(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W) : width_(W) {
    rows_.build(h, H);
    Axis<scalar_t> cols;
    cols.build(w, W);
    horizontal_.resize(h * W);
    for (int64_t y = 0; y < h; ++y) {
      const scalar_t* src = map + y * w;
      scalar_t* dst = horizontal_.data() + y * W;
      for (int64_t x = 0; x < W; ++x) {
        dst[x] = src[cols.i0[x]] * cols.l0[x] + src[cols.i1[x]] * cols.l1[x];
      }
    }
  }

  // Output row y: row[x] is the upsampled value at (y, x).
  struct Row {
    const scalar_t* top;
    const scalar_t* bottom;
    scalar_t w_top, w_bottom;
    scalar_t operator[](int64_t x) const { return top[x] * w_top + bottom[x] * w_bottom; }
  };

  Row row(int64_t y) const {
    return {horizontal_.data() + rows_.i0[y] * width_, horizontal_.data() + rows_.i1[y] * width_, rows_.l0[y],
            rows_.l1[y]};
  }

 private:
  int64_t width_;
  Axis<scalar_t> rows_;
  std::vector<scalar_t> horizontal_;
};

// Tight half-open box (y0, y1, x0, x1) of upsample(map) > threshold, or zeros. Finds the first and last
// non-empty rows, then only widens the column range on the rows in between, so a typical box costs a few rows.
template <typename scalar_t>
void tight_box(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W, scalar_t threshold,
               int64_t* box) {
  box[0] = box[1] = box[2] = box[3] = 0;
  if (H <= 0 || W <= 0) return;
  const Upsampler<scalar_t> up(map, h, w, H, W);
  // First hit from the left within [from, to), or -1.
  auto first_hit = [&](const typename Upsampler<scalar_t>::Row& row, int64_t from, int64_t to) -> int64_t {
    for (int64_t x = from; x < to; ++x) {
      if (row[x] > threshold) return x;
    }
    return -1;
  };
  // Last hit within [from, to), or -1.
  auto last_hit = [&](const typename Upsampler<scalar_t>::Row& row, int64_t from, int64_t to) -> int64_t {
    for (int64_t x = to - 1; x >= from; --x) {
      if (row[x] > threshold) return x;
    }
    return -1;
  };
  int64_t y0 = -1, x0 = 0, x1 = 0;  // x1 inclusive while scanning
  for (int64_t y = 0; y < H; ++y) {
    const auto row = up.row(y);
    const int64_t first = first_hit(row, 0, W);
    if (first >= 0) {
      y0 = y;
      x0 = first;
      x1 = last_hit(row, first, W);
      break;
    }
  }
  if (y0 < 0) return;
  int64_t y1 = y0 + 1;
  for (int64_t y = H - 1; y > y0; --y) {
    const auto row = up.row(y);
    const int64_t first = first_hit(row, 0, W);
    if (first >= 0) {
      y1 = y + 1;
      x0 = std::min(x0, first);
      x1 = std::max(x1, last_hit(row, first, W));
      break;
    }
  }
  for (int64_t y = y0 + 1; y < y1 - 1; ++y) {
    if (x0 == 0 && x1 == W - 1) break;
    const auto row = up.row(y);
    const int64_t left = first_hit(row, 0, x0);
    if (left >= 0) x0 = left;
    const int64_t right = last_hit(row, x1 + 1, W);
    if (right >= 0) x1 = right;
  }
  box[0] = y0;
  box[1] = y1;
  box[2] = x0;
  box[3] = x1 + 1;
}

// Otsu split k of the bins-bin histogram of upsample(map) (see cim_ext.reference.otsu_threshold): integer bin
// sums, between-class variance in float64, smallest k among ties.
template <typename scalar_t>
int64_t otsu_split(const scalar_t* map, int64_t h, int64_t w, int64_t H, int64_t W, int64_t bins,
                   std::vector<int64_t>& hist, std::vector<int32_t>& row_bins) {
  // Four interleaved histograms: neighbouring pixels mostly share a bin, and a single histogram would chain
  // every increment on the previous one.
  hist.assign(4 * bins, 0);
  if (H > 0 && W > 0) {
    const Upsampler<scalar_t> up(map, h, w, H, W);
    row_bins.resize(W);
    const scalar_t scaled_bins = static_cast<scalar_t>(bins);
    const scalar_t last = static_cast<scalar_t>(bins - 1);
    const int32_t last_bin = static_cast<int32_t>(bins - 1);
    int64_t* h0 = hist.data();
    int64_t* h1 = h0 + bins;
    int64_t* h2 = h1 + bins;
    int64_t* h3 = h2 + bins;
    for (int64_t y = 0; y < H; ++y) {
      const auto row = up.row(y);
      int32_t* __restrict__ out = row_bins.data();
      for (int64_t x = 0; x < W; ++x) {
        // clamp(floor(t), 0, bins - 1) without a libm call: for 0 < t < bins - 1 floor is truncation. NaN (only
        // from infinite inputs) lands in bin 0 rather than out of bounds.
        const scalar_t t = row[x] * scaled_bins;
        out[x] = t > scalar_t(0) ? (t < last ? static_cast<int32_t>(t) : last_bin) : 0;
      }
      int64_t x = 0;
      for (; x + 4 <= W; x += 4) {
        ++h0[out[x]];
        ++h1[out[x + 1]];
        ++h2[out[x + 2]];
        ++h3[out[x + 3]];
      }
      for (; x < W; ++x) ++h0[out[x]];
    }
    for (int64_t k = 0; k < bins; ++k) h0[k] += h1[k] + h2[k] + h3[k];
  }
  // Sums wrap like the reference's int64 tensors would; unsigned arithmetic keeps that well defined.
  uint64_t total = 0, total_sum = 0;
  for (int64_t k = 0; k < bins; ++k) {
    total += static_cast<uint64_t>(hist[k]);
    total_sum += static_cast<uint64_t>(hist[k]) * static_cast<uint64_t>(k);
  }
  uint64_t n0 = 0, s0 = 0;
  int64_t best_k = 0;
  double best = -1.0;
  for (int64_t k = 0; k < bins; ++k) {
    n0 += static_cast<uint64_t>(hist[k]);
    s0 += static_cast<uint64_t>(hist[k]) * static_cast<uint64_t>(k);
    const uint64_t n1 = total - n0;
    const double num = static_cast<double>(static_cast<int64_t>(s0 * total - total_sum * n0));
    const double prod = static_cast<double>(static_cast<int64_t>(n0 * n1));
    const double var = prod > 0 ? num * num / prod : 0.0;
    if (var > best) {
      best = var;
      best_k = k;
    }
  }
  return best_k;
}

template <typename scalar_t>
scalar_t otsu_value(int64_t k, int64_t bins) {
  return static_cast<scalar_t>(static_cast<double>(k + 1) / static_cast<double>(bins));
}

}  // namespace cam_cpu
}  // namespace cim_ext
