"""CPU memory in the benchmarks: outputs from memory the process already holds, the load of other processes, and
the cost of a fresh output measured on its own.

    python -m bench.allocator [--gigabytes 2] [--wait 6]

PyTorch has no caching allocator on CPU. glibc serves every allocation above its mmap threshold (at most 32 MiB) with
a fresh ``mmap`` and returns it with ``munmap`` when freed, so each call of an op with a B = 256 image batch output
(38.5 MB) page-faults all of its output in again. On this repository's build box (a Firecracker VM whose
virtio-balloon reports free guest memory to the host in 2 MiB blocks, ``page_reporting_order`` 9) a fresh huge page
is often one the host has taken back, and faulting it in then stalls for the host's own faults. Measured with this
module (one thread, per second of its CPU time, so the load of other processes does not enter): huge pages fresh
from the system 0.38 GB/s (101 ms per 38.5 MB), just freed by the process 6.5 GB/s (6 ms), freed 6 s before 0.66
GB/s (58 ms); 4 KiB pages 3.1 GB/s (12 ms) in all three cases; rewriting resident memory 8.8 GB/s (4.4 ms). Which
case a call hits depends on what was freed how long before, so timings of fresh huge-page outputs wander by 10x
between runs of the same build, and 4 KiB pages cost a steady 12 ms, three times the compress kernel.

The benchmarks therefore run with :func:`resident_env`: glibc never maps or unmaps (``glibc.malloc.mmap_max=0``,
no trimming), so freed outputs stay in the process and the next call's output reuses them, with no page fault. What
a fresh output costs is the ``fresh_output`` line of ``bench/test_kernels.py``, which writes once into a fresh
mapping (4 KiB pages, and huge pages).
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import time

#: glibc tunables of a process whose freed memory stays mapped and is reused: no mmap-served allocations (so none is
#: unmapped when freed) and no trimming of the heap's top.
RESIDENT_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"

PAGE_REPORTING = "/sys/module/page_reporting/parameters/reported_kib"


def resident_env(env: dict, *, huge_pages: bool = True) -> dict:
    """``env`` for a benchmark subprocess whose outputs come from memory it already holds (:data:`RESIDENT_TUNABLES`
    appended to any ``GLIBC_TUNABLES``), backed by transparent huge pages unless ``huge_pages`` is false
    (``THP_MEM_ALLOC_ENABLE=1``, unless ``env`` sets it already)."""
    env = dict(env)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), RESIDENT_TUNABLES]))
    if huge_pages:
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return env


def _busy_ticks():
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


class OtherLoad:
    """Context manager: the CPU time other processes used during the block, as a fraction of all cores
    (``fraction``; None where /proc/stat is missing). This process and its reaped children are not counted."""

    fraction: float | None = None

    def __enter__(self):
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        end = self._sample()
        if self._start is not None and end is not None:
            busy = (end[0] - self._start[0]) / os.sysconf("SC_CLK_TCK")
            own, wall = end[1] - self._start[1], end[2] - self._start[2]
            self.fraction = max(0.0, (busy - own) / wall / (os.cpu_count() or 1)) if wall > 0 else None
        return False

    @staticmethod
    def _sample():
        try:
            ticks = _busy_ticks()
        except (OSError, ValueError, IndexError):
            return None
        times = os.times()
        return ticks, times.user + times.system + times.children_user + times.children_system, time.monotonic()


def fresh_write(nbytes: int, *, huge_pages: bool) -> float:
    """Map ``nbytes`` of fresh anonymous memory, write every byte once, unmap it: what a fresh output adds to an
    out-of-place op (page faults, the kernel's zeroing, the unmap), beside the write itself. Returns the CPU time
    of this thread for the write, in seconds (all of it with one torch thread; unlike wall time, the load of other
    processes does not enter it, while the host's faults do, since they stall the thread)."""
    import torch

    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge_pages:
            region.madvise(mmap.MADV_HUGEPAGE)
        view = torch.frombuffer(region, dtype=torch.uint8)
        start = time.thread_time()
        view.fill_(1)
        seconds = time.thread_time() - start
        del view
    finally:
        region.close()
    return seconds


def _reported_kib():
    try:
        with open(PAGE_REPORTING) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    """Print the first-write rate of fresh memory, one thread: with huge pages and 4 KiB pages, each fresh from the
    system, just freed by this process, and freed ``--wait`` seconds before; and the rate of rewriting resident
    memory. A 38.5 MB output (B = 256 uint8 images) costs its size over the rate."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.allocator", description=main.__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="memory written per case (default 2)")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds between freeing and the last case")
    args = parser.parse_args(argv)
    if not args.gigabytes > 0:
        parser.error(f"--gigabytes: expected a positive number, got {args.gigabytes}")
    if args.wait < 0:
        parser.error(f"--wait: expected seconds >= 0, got {args.wait}")
    torch.set_num_threads(1)
    nbytes, batch = int(args.gigabytes * 1e9), 256 * 3 * 224 * 224

    def show(label, rate, note=""):
        print(f"  {label:42s} {rate / 1e9:6.2f} GB/s  ({batch / rate * 1e3:6.1f} ms per 38.5 MB){note}", flush=True)

    print(f"first write of {nbytes / 1e9:.1f} GB of fresh memory, one thread, per second of its CPU time")
    for huge in (True, False):
        pages = "huge pages" if huge else "4 KiB pages"
        show(f"{pages}, fresh from the system", nbytes / fresh_write(nbytes, huge_pages=huge))
        show(f"{pages}, just freed by this process", nbytes / fresh_write(nbytes, huge_pages=huge))
        time.sleep(args.wait)
        show(f"{pages}, freed {args.wait:g} s before", nbytes / fresh_write(nbytes, huge_pages=huge))
    resident = torch.empty(nbytes, dtype=torch.uint8)
    resident.fill_(0)
    start = time.thread_time()
    resident.fill_(1)
    show("resident memory, rewritten", nbytes / (time.thread_time() - start))
    if _reported_kib() is not None:
        print(f"free memory the guest has reported to the host since boot: {_reported_kib() / 2**20:.1f} GiB "
              f"({PAGE_REPORTING})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
