// Deferred argument errors of the CUDA kernels. A value check (a label outside [0, K), a box outside its image)
// would need a host sync before the launch, and a device assert would kill the CUDA context. Instead a kernel that
// meets a bad value writes a defined result for that sample (zeros) and records the first bad value in a report
// that lives in mapped (zero-copy) host memory. Every cim_ext CUDA host function calls raise_deferred_errors() on
// entry, which reads that report without waiting for the device and raises a ValueError naming the argument;
// cim_ext.check_errors() waits for the device first. A bad value therefore surfaces at the next cim_ext call.
#pragma once

#include <cstdint>

namespace cim_ext {
namespace deferred {

enum Code : int { kNone = 0, kLabel = 1, kSize = 2, kBox = 3, kCrops = 4 };
enum Op : int { kCam = 0, kCamBackward = 1, kCamBoxes = 2, kOtsuThreshold = 3, kCamToBoxes = 4, kCompress = 5,
                kUncompress = 6 };

struct Report {
  int code;  // kNone, -1 while a kernel writes the fields below, then the Code
  int op;
  long long index;  // sample (row) of the bad value
  long long value;  // the bad value (a label, a size, the box coordinate out of range, the crop values needed)
  long long limit;  // what it must be below (labels: K; boxes: the image height or width), or crops given
};

// The process-wide report, usable from any device (allocated on first use).
Report* report();

// Raises the recorded error, if a kernel finished writing one, and clears it. Waits for the device first when
// `synchronize` (current stream of the current device).
void raise_deferred_errors(bool synchronize = false);

#ifdef __CUDACC__
// Records the first bad value of any kernel; later ones (until the report is raised) are dropped.
__device__ inline void record(Report* r, Code code, Op op, int64_t index, int64_t value, int64_t limit) {
  if (atomicCAS(&r->code, 0, -1) != 0) return;
  r->op = op;
  r->index = index;
  r->value = value;
  r->limit = limit;
  __threadfence_system();
  atomicExch(&r->code, static_cast<int>(code));
}
#endif

}  // namespace deferred
}  // namespace cim_ext
