// compress and uncompress on CPU, and the argument checks shared with CUDA (compress_checks.h).
//
// The background of an output row is one gather from a source row: nearest-exact down and back up composes into a
// source row and a source column per output pixel (resample.h). The kernels work on bytes, so one code path serves
// every dtype and both layouts: a "unit" is what one column holds, an element (NCHW) or a pixel of C elements
// (channels-last). Each row's gather follows a plan computed once per call: 16-byte chunks of the output row, each
// assembled from at most two 16-byte windows of the source row with a byte shuffle (pshufb). Two windows suffice
// because the column map is monotone and moves no pixel much farther than one down-sampled pixel; where they do not
// (or a row is shorter than 16 bytes) the plan falls back to a byte-by-byte gather. Source rows are prefetched (they
// skip input rows). The box span of a row is then copied from the source row (compress) or the stored crop
// (uncompress).
#include <ATen/ATen.h>
#include <ATen/CPUFunctions.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "compress_checks.h"
#include "cpu/resample.h"

namespace cim_ext {

bool cpu_upsample_index_fused() {
  static const bool fused = [] {
    // Resizing 2 -> 141 pixels puts output 70 exactly on the boundary between sources 0 and 1 (70.5 * 2 / 141 = 1).
    // With the float scale the unfused product lands just below 1 and the fused one on it. A 1 x 141 output
    // (1 + 141 > 128) goes through the generic kernel. Called directly, not through the dispatcher.
    at::Tensor probe = at::detail::empty_cpu({1, 1, 1, 2}, at::kFloat, false, std::nullopt);
    probe.mutable_data_ptr<float>()[0] = 0.0f;
    probe.mutable_data_ptr<float>()[1] = 1.0f;
    const auto up = at::cpu::_upsample_nearest_exact2d(probe, {1, 141});
    return up.contiguous().const_data_ptr<float>()[70] == 1.0f;
  }();
  return fused;
}

// ------------------------------------------------------------------------------------------------ argument checks
namespace {

void check_images(const at::Tensor& tensor, const char* name) {
  const auto dtype = tensor.scalar_type();
  const bool cuda = tensor.is_cuda();
  const bool ok = dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble ||
                  (cuda && (dtype == at::kHalf || dtype == at::kBFloat16));
  CIM_CHECK_ARG(ok, name,
                cuda ? "dtype uint8, float32, float64, float16 or bfloat16"
                     : "dtype uint8, float32 or float64 (on this device)",
                dtype);
  check_dim(tensor, name, 4, "[B, C, H, W]");
}

void check_boxes(const at::Tensor& boxes, const at::Tensor& like, const char* like_name, int64_t height, int64_t width) {
  const int64_t batch = like.size(0);
  CIM_CHECK_ARG(
      boxes.scalar_type() == at::kLong && boxes.dim() == 2 && boxes.size(0) == batch && boxes.size(1) == 4, "boxes",
      c10::str("an int64 tensor of shape (", batch, ", 4) = (y0, y1, x0, x1)"),
      c10::str(boxes.scalar_type(), " ", boxes.sizes()));
  check_same_device(boxes, "boxes", like, like_name);
  if (!boxes.is_cpu()) {
    return;
  }
  const auto acc = boxes.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t y0 = acc[b][0], y1 = acc[b][1], x0 = acc[b][2], x1 = acc[b][3];
    CIM_CHECK_ARG(
        0 <= y0 && y0 <= y1 && y1 <= height && 0 <= x0 && x0 <= x1 && x1 <= width, "boxes",
        c10::str("0 <= y0 <= y1 <= ", height, " and 0 <= x0 <= x1 <= ", width),
        c10::str("(", y0, ", ", y1, ", ", x0, ", ", x1, ") at row ", b));
  }
}

// Values of sample b's crop: C * box area.
int64_t crop_size(const int64_t* box, int64_t channels) { return channels * (box[1] - box[0]) * (box[3] - box[2]); }

}  // namespace

at::MemoryFormat compress_output_format(const at::Tensor& images) {
  return channels_last_only(images) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_compress_args(const at::Tensor& images, const at::Tensor& boxes, double ratio) {
  check_images(images, "images");
  check_ratio(ratio);
  check_boxes(boxes, images, "images", images.size(2), images.size(3));
}

void check_uncompress_args(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, int64_t height, int64_t width) {
  check_images(small, "small");
  check_same_dtype(crops, "crops", small, "small");
  check_same_device(crops, "crops", small, "small");
  check_dim(crops, "crops", 1, "(the flattened crops)");
  CIM_CHECK_ARG(height >= 1, "height", "a size >= 1", height);
  CIM_CHECK_ARG(width >= 1, "width", "a size >= 1", width);
  CIM_CHECK_ARG(
      small.numel() > 0 || small.size(0) == 0 || small.size(1) == 0, "small", "at least 1x1 pixels per image",
      c10::str("shape ", small.sizes()));
  check_boxes(boxes, small, "small", height, width);
  if (!boxes.is_cpu()) {
    return;  // counted by the kernel (offsets), which stays inside crops
  }
  const auto boxes_c = boxes.contiguous();
  int64_t needed = 0;
  for (int64_t b = 0; b < small.size(0); ++b) {
    needed += crop_size(boxes_c.const_data_ptr<int64_t>() + 4 * b, small.size(1));
  }
  CIM_CHECK_ARG(
      crops.numel() == needed, "crops", c10::str(needed, " values (C * box area summed over the batch)"),
      crops.numel());
}

// --------------------------------------------------------------------------------------------------------- kernels
namespace {

constexpr int64_t kChunk = 16;
constexpr uint8_t kOther = 0x80;  // shuffle index that yields 0: the byte comes from the other window

// 16 output bytes: out[i] = lo_window[mask_lo[i]] | hi_window[mask_hi[i]], where exactly one mask selects.
struct Chunk {
  int64_t dst;  // first output byte; the last chunk of a row overlaps the one before when 16 does not divide it
  int64_t lo;   // window starts in the source row
  int64_t hi;
  std::array<uint8_t, kChunk> mask_lo;
  std::array<uint8_t, kChunk> mask_hi;
};

// How to fill one output row of `dst_bytes` from a source row of `src_bytes`: chunks, or, when some chunk needs
// more than two windows or a row is shorter than a chunk, the source byte of every output byte.
struct RowPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> bytes;
};

// cols: source unit of each output unit; unit: bytes per unit.
RowPlan make_row_plan(const std::vector<int64_t>& cols, int64_t unit, int64_t src_bytes) {
  const int64_t dst_bytes = static_cast<int64_t>(cols.size()) * unit;
  const auto source = [&](int64_t byte) { return cols[byte / unit] * unit + byte % unit; };
  RowPlan plan;
  if (dst_bytes >= kChunk && src_bytes >= kChunk) {
    for (int64_t start = 0; start < dst_bytes; start += kChunk) {
      Chunk chunk;
      chunk.dst = std::min(start, dst_bytes - kChunk);
      int64_t low = std::numeric_limits<int64_t>::max(), high = low;
      for (int64_t i = 0; i < kChunk; ++i) {
        low = std::min(low, source(chunk.dst + i));
      }
      for (int64_t i = 0; i < kChunk; ++i) {
        if (source(chunk.dst + i) >= low + kChunk) {
          high = std::min(high, source(chunk.dst + i));
        }
      }
      // Windows end inside the source row; a window moved left still covers its bytes (none lie beyond the row).
      chunk.lo = std::min(low, src_bytes - kChunk);
      chunk.hi = high == std::numeric_limits<int64_t>::max() ? chunk.lo : std::min(high, src_bytes - kChunk);
      bool fits = true;
      for (int64_t i = 0; i < kChunk; ++i) {
        const int64_t s = source(chunk.dst + i);
        const bool in_lo = s < low + kChunk;
        fits = fits && (in_lo || s - chunk.hi < kChunk);
        chunk.mask_lo[i] = in_lo ? static_cast<uint8_t>(s - chunk.lo) : kOther;
        chunk.mask_hi[i] = in_lo ? kOther : static_cast<uint8_t>(s - chunk.hi);
      }
      if (!fits) {
        plan.chunks.clear();
        break;
      }
      plan.chunks.push_back(chunk);
    }
    if (!plan.chunks.empty()) {
      return plan;
    }
  }
  plan.bytes.resize(dst_bytes);
  for (int64_t i = 0; i < dst_bytes; ++i) {
    plan.bytes[i] = source(i);
  }
  return plan;
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("ssse3"))) void shuffle_chunks_ssse3(
    const Chunk* begin, const Chunk* end, const uint8_t* src, uint8_t* dst) {
  for (const Chunk* c = begin; c != end; ++c) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c->lo));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c->hi));
    const __m128i mask_lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c->mask_lo.data()));
    const __m128i mask_hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c->mask_hi.data()));
    const __m128i out = _mm_or_si128(_mm_shuffle_epi8(lo, mask_lo), _mm_shuffle_epi8(hi, mask_hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c->dst), out);
  }
}

bool has_ssse3() {
  static const bool supported = __builtin_cpu_supports("ssse3");
  return supported;
}
#endif

// The same shuffle one byte at a time, for CPUs without SSSE3.
void shuffle_chunks_scalar(const Chunk* begin, const Chunk* end, const uint8_t* src, uint8_t* dst) {
  for (const Chunk* c = begin; c != end; ++c) {
    for (int64_t i = 0; i < kChunk; ++i) {
      dst[c->dst + i] = c->mask_lo[i] != kOther ? src[c->lo + c->mask_lo[i]] : src[c->hi + c->mask_hi[i]];
    }
  }
}

void shuffle_chunks(const Chunk* begin, const Chunk* end, const uint8_t* src, uint8_t* dst) {
#if defined(__x86_64__) || defined(__i386__)
  if (has_ssse3()) {
    shuffle_chunks_ssse3(begin, end, src, dst);
    return;
  }
#endif
  shuffle_chunks_scalar(begin, end, src, dst);
}

// The background of one output row, except the bytes [skip_begin, skip_end) that the box will overwrite (chunks
// wholly inside that span are skipped; the others are written whole).
void gather_row(const RowPlan& plan, const uint8_t* src, uint8_t* dst, int64_t skip_begin, int64_t skip_end) {
  if (plan.chunks.empty()) {
    const int64_t size = static_cast<int64_t>(plan.bytes.size());
    for (int64_t i = 0; i < size; ++i) {
      if (i == skip_begin) i = std::max(skip_begin, skip_end);
      if (i < size) dst[i] = src[plan.bytes[i]];
    }
    return;
  }
  const Chunk* first = plan.chunks.data();
  const Chunk* last = first + plan.chunks.size();
  // Chunks are in output order: [first, inside) ends before the span, [inside, after) lie wholly inside it.
  const Chunk* inside = std::lower_bound(first, last, skip_begin, [](const Chunk& c, int64_t b) { return c.dst < b; });
  const Chunk* after = inside;
  while (after != last && after->dst + kChunk <= skip_end) ++after;
  shuffle_chunks(first, inside, src, dst);
  shuffle_chunks(after, last, src, dst);
}

// Geometry of a [B, C, H, W] tensor in the byte view of the kernels: `planes` planes of H rows of W units.
struct Planes {
  int64_t planes;             // B * C (NCHW) or B (channels-last)
  int64_t planes_per_sample;  // C or 1
  int64_t unit;               // bytes per column: element size, or C * element size
};

Planes planes_of(const at::Tensor& t, at::MemoryFormat format) {
  const int64_t batch = t.size(0), channels = t.size(1), element = t.element_size();
  if (format == at::MemoryFormat::ChannelsLast) {
    return {batch, 1, channels * element};
  }
  return {batch * channels, channels, element};
}

constexpr int64_t kPrefetchRows = 4;  // how far ahead fill_rows prefetches source rows
constexpr int64_t kCacheLine = 64;

// A row's box span in bytes, [begin, end); empty (begin == end) for a row outside the box.
struct Span {
  int64_t begin, end;
};

// Fills every row of an output of `planes` planes x `height` rows of `row_bytes`, in parallel: first the background
// outside the row's box span span_of(plane, y), gathered through `plan` from row rows[y] of the plane's source (or
// copied from the previous output row when that came from the same source row and holds no box), then, for a
// non-empty span, paste(plane, y, dst, span) writes the box pixels.
// The bytes of row y that box (y0, y1, x0, x1) covers, with `unit` bytes per column.
Span box_span(const int64_t* box, int64_t y, int64_t unit) {
  if (y < box[0] || y >= box[1] || box[2] == box[3]) return {0, 0};
  return {box[2] * unit, box[3] * unit};
}

template <typename SpanOf, typename Paste>
void fill_rows(
    const RowPlan& plan, const std::vector<int64_t>& rows, const uint8_t* src, int64_t src_row_bytes,
    int64_t src_rows, int64_t planes, int64_t height, int64_t row_bytes, uint8_t* out, const SpanOf& span_of,
    const Paste& paste) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / row_bytes);
  const auto source_of = [&](int64_t plane, int64_t y) { return src + (plane * src_rows + rows[y]) * src_row_bytes; };
  at::parallel_for(0, planes * height, grain, [&](int64_t begin, int64_t end) {
    int64_t plane = begin / height, y = begin % height;
    // Source rows skip input rows (every other one at ratio 4), which the hardware prefetchers do not follow: the
    // source row of output row + kPrefetchRows is prefetched, once.
    int64_t ahead = begin + kPrefetchRows, ahead_plane = ahead / height, ahead_y = ahead % height;
    const uint8_t* prefetched = nullptr;
    const uint8_t* background = nullptr;  // the last row holding only background, and its source row
    const uint8_t* background_source = nullptr;
    for (int64_t row = begin; row < end; ++row, ++ahead) {
      if (ahead < end && source_of(ahead_plane, ahead_y) != prefetched) {
        prefetched = source_of(ahead_plane, ahead_y);
        for (int64_t offset = 0; offset < src_row_bytes; offset += kCacheLine) {
          __builtin_prefetch(prefetched + offset);
        }
      }
      if (++ahead_y == height) {
        ahead_y = 0;
        ++ahead_plane;
      }
      uint8_t* dst = out + row * row_bytes;
      const uint8_t* source = source_of(plane, y);
      const Span span = span_of(plane, y);
      const bool boxed = span.end > span.begin;
      if (!boxed && source == background_source) {
        std::memcpy(dst, background, row_bytes);
      } else {
        gather_row(plan, source, dst, span.begin, span.end);
      }
      if (boxed) paste(plane, y, dst, span);
      background = boxed ? nullptr : dst;
      background_source = boxed ? nullptr : source;
      if (++y == height) {
        y = 0;
        ++plane;
      }
    }
  });
}

at::Tensor compress_cpu(const at::Tensor& images, const at::Tensor& boxes, double ratio) {
  check_compress_args(images, boxes, ratio);
  const auto format = compress_output_format(images);
  auto output = at::empty(images.sizes(), images.options().memory_format(format));
  if (output.numel() == 0) {
    return output;
  }
  const int64_t height = images.size(2), width = images.size(3);
  const auto maps = cpu_down_up_maps(images, ratio);  // before contiguous(): the reference sees this layout
  const auto input = images.contiguous(format);
  const auto boxes_c = boxes.contiguous();
  const auto geometry = planes_of(input, format);
  const int64_t unit = geometry.unit, row_bytes = width * unit;
  const auto* in = static_cast<const uint8_t*>(input.const_data_ptr());
  const int64_t* box_data = boxes_c.const_data_ptr<int64_t>();
  fill_rows(
      make_row_plan(maps.cols, unit, row_bytes), maps.rows, in, row_bytes, height, geometry.planes, height, row_bytes,
      static_cast<uint8_t*>(output.mutable_data_ptr()),
      [&](int64_t plane, int64_t y) { return box_span(box_data + 4 * (plane / geometry.planes_per_sample), y, unit); },
      [&](int64_t plane, int64_t y, uint8_t* dst, Span span) {
        std::memcpy(dst + span.begin, in + (plane * height + y) * row_bytes + span.begin, span.end - span.begin);
      });
  return output;
}

at::Tensor uncompress_cpu(
    const at::Tensor& small, const at::Tensor& crops, const at::Tensor& boxes, c10::SymInt sym_height,
    c10::SymInt sym_width) {
  const int64_t height = sym_height.expect_int(), width = sym_width.expect_int();
  check_uncompress_args(small, crops, boxes, height, width);
  const int64_t batch = small.size(0), channels = small.size(1);
  auto output = at::empty({batch, channels, height, width}, small.options());
  if (output.numel() == 0) {
    return output;
  }
  const auto maps = cpu_up_maps(small, height, width);
  const auto small_c = small.contiguous();
  const auto crops_c = crops.contiguous();
  const auto boxes_c = boxes.contiguous();
  const int64_t* box_data = boxes_c.const_data_ptr<int64_t>();
  const int64_t unit = small.element_size(), row_bytes = width * unit, small_row_bytes = small.size(3) * unit;
  std::vector<int64_t> offsets(batch + 1, 0);  // in bytes
  for (int64_t b = 0; b < batch; ++b) {
    offsets[b + 1] = offsets[b] + crop_size(box_data + 4 * b, channels) * unit;
  }
  const auto* crop_bytes = static_cast<const uint8_t*>(crops_c.const_data_ptr());
  fill_rows(
      make_row_plan(maps.cols, unit, small_row_bytes), maps.rows, static_cast<const uint8_t*>(small_c.const_data_ptr()),
      small_row_bytes, small.size(2), batch * channels, height, row_bytes,
      static_cast<uint8_t*>(output.mutable_data_ptr()),
      [&](int64_t plane, int64_t y) { return box_span(box_data + 4 * (plane / channels), y, unit); },
      [&](int64_t plane, int64_t y, uint8_t* dst, Span span) {
        const int64_t b = plane / channels, c = plane % channels;
        const int64_t* box = box_data + 4 * b;
        const int64_t box_h = box[1] - box[0], span_bytes = span.end - span.begin;
        std::memcpy(dst + span.begin, crop_bytes + offsets[b] + (c * box_h + (y - box[0])) * span_bytes, span_bytes);
      });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(cim_ext, CPU, m) {
  m.impl("compress", &compress_cpu);
  m.impl("uncompress", &uncompress_cpu);
}

}  // namespace cim_ext
