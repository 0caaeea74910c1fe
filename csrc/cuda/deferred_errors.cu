// Host side of the deferred CUDA argument errors (see deferred_errors.cuh).
#include "cuda/deferred_errors.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <string>

namespace cim_ext {
namespace deferred {
namespace {

const char* op_name(int op) {
  static const char* names[] = {"cam", "_cam_backward", "cam_boxes", "otsu_threshold", "cam_to_boxes", "compress",
                                "uncompress"};
  return op >= 0 && op < static_cast<int>(sizeof(names) / sizeof(names[0])) ? names[op] : "a cim_ext op";
}

std::string message(const Report& r) {
  const std::string where = std::string(op_name(r.op)) + " (found by its CUDA kernel; reported at the next cim_ext "
                            "call, since checking values before the launch would wait for the device): ";
  switch (r.code) {
    case kLabel:
      return where + "labels: expected values in [0, " + std::to_string(r.limit) + ") (rows of weight), got " +
             std::to_string(r.value) + " at index " + std::to_string(r.index);
    case kSize:
      return where + "sizes: expected positive heights and widths (below 2^31 on CUDA), got " +
             std::to_string(r.value) + " for sample " +
             std::to_string(r.index);
    case kBox:
      return where + "boxes: expected 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W, got row " +
             std::to_string(r.index) + " with a coordinate " + std::to_string(r.value) +
             " out of order or outside [0, " + std::to_string(r.limit) + "]";
    case kCrops:
      return where + "crops: expected " + std::to_string(r.value) +
             " values (C * box area summed over the batch), got " + std::to_string(r.limit);
    default:
      return where + "unknown error code " + std::to_string(r.code);
  }
}

std::atomic<Report*> allocated{nullptr};

}  // namespace

Report* report() {
  static std::once_flag once;
  std::call_once(once, [] {
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(Report), cudaHostAllocMapped | cudaHostAllocPortable));
    auto* r = static_cast<Report*>(host);
    *r = Report{kNone, 0, 0, 0, 0};
    void* device = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&device, host, 0));
    // With unified addressing (every 64-bit platform CUDA 13 supports) the host pointer is valid on the device.
    TORCH_INTERNAL_ASSERT(device == host, "cim_ext: mapped host memory needs unified virtual addressing");
    allocated.store(r);
  });
  return allocated.load();
}

void raise_deferred_errors(bool synchronize) {
  volatile Report* r = allocated.load();
  if (r == nullptr) return;  // no kernel that reports has run
  if (synchronize) C10_CUDA_CHECK(cudaDeviceSynchronize());
  if (r->code <= 0) return;
  const Report seen{r->code, r->op, r->index, r->value, r->limit};
  r->code = kNone;
  TORCH_CHECK_VALUE(false, message(seen));
}

}  // namespace deferred
}  // namespace cim_ext
