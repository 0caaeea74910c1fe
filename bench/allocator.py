"""CPU memory in the benchmarks: outputs from memory the process already holds, the load of other processes, and
the cost of a fresh output measured on its own.

    python -m bench.allocator [--megabytes 38.5] [--rounds 20] [--reclaimed-gb 4]

PyTorch has no caching allocator on CPU. glibc serves every allocation above its mmap threshold (at most 32 MiB) with
a fresh ``mmap`` and returns it with ``munmap`` when freed, so each call of an op with a B = 256 image batch output
(38.5 MB) page-faults all of its output in again. On this repository's build box (a Firecracker VM whose
virtio-balloon reports free guest pages to the host at order 9, i.e. 2 MiB blocks) a fresh huge page can be one
the host has already taken back, and faulting it in then costs a host fault per 4 KiB: a 38.5 MB first write took
89-107 ms right after the process freed 4 GB, against 4.3 ms when it reused pages it had just freed (and 12 ms with
4 KiB pages, either way). Which case a call hits depends on what was freed how long before, so timings of fresh
outputs wander by 10x between runs of the same build.

The benchmarks therefore run with :func:`resident_env`: glibc never maps or unmaps (``glibc.malloc.mmap_max=0``,
no trimming), so freed outputs stay in the process and the next call's output reuses them, with no page fault. What
a fresh output costs is the ``fresh_output`` line of ``bench/test_kernels.py``, which writes once into a fresh
mapping; this module's ``main`` measures those cases in isolation (``--reclaimed-gb`` frees that much memory first and
waits, so that the host may take it back).
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
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


def fresh_write(nbytes: int, *, huge_pages: bool) -> None:
    """Map ``nbytes`` of fresh anonymous memory, write every byte once, unmap it: what a fresh output adds to an
    out-of-place op (page faults, the kernel's zeroing, the unmap), beside the write itself."""
    import torch

    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge_pages:
            region.madvise(mmap.MADV_HUGEPAGE)
        view = torch.frombuffer(region, dtype=torch.uint8)
        view.fill_(1)
        del view
    finally:
        region.close()


def _reported_kib():
    try:
        with open(PAGE_REPORTING) as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


def _times(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    """Print the cost of writing a block of memory: resident, fresh with 4 KiB pages, fresh with huge pages, and
    fresh with huge pages right after the process freed a large block (``--reclaimed-gb``)."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.allocator", description=main.__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=256 * 3 * 224 * 224 / 1e6,
                        help="block size in MB (default: a B = 256 uint8 image batch, 38.5 MB)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--reclaimed-gb", type=float, default=4.0,
                        help="GB freed before each round of the last case (0: skip it)")
    parser.add_argument("--wait", type=float, default=4.0, help="seconds waited after freeing them")
    args = parser.parse_args(argv)
    for name in ("megabytes", "rounds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}: expected a positive number, got {getattr(args, name)}")
    if args.reclaimed_gb < 0 or args.wait < 0:
        parser.error("--reclaimed-gb, --wait: expected numbers >= 0")

    nbytes = int(args.megabytes * 1e6)
    resident = torch.empty(nbytes, dtype=torch.uint8)
    resident.fill_(0)
    cases = {
        "resident": lambda: resident.fill_(1),
        "fresh, 4 KiB pages": lambda: fresh_write(nbytes, huge_pages=False),
        "fresh, huge pages": lambda: fresh_write(nbytes, huge_pages=True),
    }
    print(f"writing {nbytes / 1e6:.1f} MB, {args.rounds} rounds, {torch.get_num_threads()} threads")
    with OtherLoad() as load:
        for name, fn in cases.items():
            fn()
            times = _times(fn, args.rounds)
            print(f"  {name:32s} median {statistics.median(times) * 1e3:8.2f} ms  min {min(times) * 1e3:8.2f}  "
                  f"max {max(times) * 1e3:8.2f}")
        if args.reclaimed_gb:
            times, reported = [], 0
            for _ in range(min(args.rounds, 4)):
                block = torch.empty(int(args.reclaimed_gb * 1e9), dtype=torch.uint8)
                block.fill_(1)
                del block
                before = _reported_kib()
                time.sleep(args.wait)
                after = _reported_kib()
                reported += (after - before) if before is not None and after is not None else 0
                times += _times(cases["fresh, huge pages"], 1)
            note = f"; {reported / 2**20:.2f} GiB reported free to the host meanwhile" if _reported_kib() else ""
            print(f"  {'fresh, huge pages, after a free':32s} median {statistics.median(times) * 1e3:8.2f} ms  "
                  f"min {min(times) * 1e3:8.2f}  max {max(times) * 1e3:8.2f}{note}")
    if load.fraction is not None:
        print(f"other processes used {load.fraction:.0%} of the {os.cpu_count()} cores meanwhile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
