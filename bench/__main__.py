"""Run the benchmark suite and write ``bench/results/<device>-<date>.json``.

    python -m bench [--quick] [--device cpu|cuda] [-k EXPR] [--time-limit S] [--merge JSON] [--fresh-outputs]

Timings come from pytest-benchmark; this script adds, per op, the speed-up of the cim_ext kernel over every other
implementation measured in the same run, the achieved bandwidth (bytes that must move / median time) and its
fraction of the measured device copy bandwidth (the roofline of these memory-bound kernels), and the environment,
with the share of the cores other processes used during the run (``other_load``).

On CPU the cases run with outputs served from memory the process already holds (``bench.allocator``): the timings
are the kernels', not the page allocator's; the ``fresh_output`` line is what a fresh output adds. Every case is
recorded as it finishes, so ``--time-limit`` (the cases stop there) keeps what ran; ``--merge`` adds this run's
entries to an earlier result file of the same device (e.g. the torch.compile baselines, run last: ``-k compiled``).
"""
import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import torch

from .allocator import OtherLoad, resident_env

HERE = os.path.dirname(os.path.abspath(__file__))


def copy_bandwidth(device, megabytes=256, repeats=10):
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    numel = megabytes * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def environment(device):
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    if device == "cuda":
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


def summarise(records, bandwidth):
    """Group the case records (``{"extra_info", "stats"}``, as ``bench/test_kernels.py`` writes them) by op."""
    ops = {}
    for record in records:
        extra = record["extra_info"]
        median = record["stats"]["median"]
        entry = {"median_s": median, "min_s": record["stats"]["min"], "bytes": extra["bytes"], "batch": extra["batch"]}
        entry["bandwidth_GBps"] = extra["bytes"] / median / 1e9
        entry["roofline_fraction"] = extra["bytes"] / median / bandwidth
        # On a shared or virtual machine, scheduling stalls inflate some rounds: the fastest round is the kernel's
        # own cost.
        entry["roofline_fraction_min"] = extra["bytes"] / entry["min_s"] / bandwidth
        if "event_median_s" in extra:  # CUDA: kernel time from events, cold L2
            events = extra["event_median_s"]
            entry["event_median_s"] = events
            entry["event_roofline_fraction"] = extra["bytes"] / events / bandwidth
        ops.setdefault(extra["op"], {})[extra["impl"]] = entry
    return add_ratios(ops)


def add_ratios(ops):
    """Add to every entry of an op its median (and fastest-round, and events) time over the kernel's."""
    for impls in ops.values():
        kernel = impls.get("kernel")
        if kernel:
            for name, entry in impls.items():
                if name != "kernel":
                    entry["kernel_speedup"] = entry["median_s"] / kernel["median_s"]
                    entry["kernel_speedup_min"] = entry["min_s"] / kernel["min_s"]
                    if "event_median_s" in entry and "event_median_s" in kernel:
                        entry["event_kernel_speedup"] = entry["event_median_s"] / kernel["event_median_s"]
    return ops


def run_cases(cmd, env, cwd, time_limit):
    """Run the pytest command, killing its process group at ``time_limit`` seconds; (exit code, cut short)."""
    process = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    try:
        return process.wait(timeout=time_limit), False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None, True


def read_records(path):
    """The case records written so far (one JSON object per line; a line cut by a kill is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def print_table(ops):
    print(f"{'op':34s} {'impl':10s} {'median ms':>10s} {'min ms':>8s} {'kernel x':>9s} {'x (min)':>8s} "
          f"{'roofline':>8s} {'(min)':>7s}")
    for op, impls in ops.items():
        for name, entry in impls.items():
            speedup = f"{entry['kernel_speedup']:.2f}" if "kernel_speedup" in entry else "-"
            speedup_min = f"{entry['kernel_speedup_min']:.2f}" if "kernel_speedup_min" in entry else "-"
            print(
                f"{op:34s} {name:10s} {entry['median_s'] * 1e3:10.3f} {entry['min_s'] * 1e3:8.3f} {speedup:>9s} "
                f"{speedup_min:>8s} {entry['roofline_fraction']:8.1%} {entry['roofline_fraction_min']:7.1%}"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-k", default=None, help="pytest -k expression to select benchmarks")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the cases; those not finished by then are left out (recorded as cut)")
    parser.add_argument("--merge", metavar="JSON",
                        help="add this run's entries to this earlier result file (same device) and write it there")
    parser.add_argument("--fresh-outputs", action="store_true",
                        help="CPU: every large output a fresh mapping, as without the benchmark (page faults timed)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="CPU: 4 KiB pages (no THP_MEM_ALLOC_ENABLE=1)")
    parser.add_argument("--out", default=None, help="output JSON path (default bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.time_limit is not None and not args.time_limit > 0:
        parser.error(f"--time-limit: expected a positive number of seconds, got {args.time_limit}")
    merged = None
    if args.merge:
        try:
            with open(args.merge) as f:
                merged = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"--merge: cannot read {args.merge}: {error}")
        if merged.get("environment", {}).get("device") != args.device:
            parser.error(f"--merge: {args.merge} holds {merged.get('environment', {}).get('device')!r} results, "
                         f"not {args.device!r}")

    env = dict(os.environ, CIM_BENCH_QUICK="1" if args.quick else "0", CIM_BENCH_DEVICE=args.device)
    if args.device == "cpu" and not args.fresh_outputs:
        env = resident_env(env, huge_pages=not args.no_huge_pages)
    elif args.device == "cpu" and not args.no_huge_pages:
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        env["CIM_BENCH_RECORDS"] = records_path = os.path.join(tmp, "records.jsonl")
        cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_kernels.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-disable-gc", "-o", "addopts="]
        if args.k:
            cmd += ["-k", args.k]
        with OtherLoad() as load:
            code, cut = run_cases(cmd, env, os.path.dirname(HERE), args.time_limit)
        records = read_records(records_path)
    if not records:
        print("no case finished" + (f" within --time-limit {args.time_limit:g} s" if cut else ""))
        return code or 1
    info = environment(args.device)
    bandwidth = copy_bandwidth(args.device)
    info.update(copy_bandwidth_GBps=bandwidth / 1e9, quick=args.quick,
                THP_MEM_ALLOC_ENABLE=env.get("THP_MEM_ALLOC_ENABLE"), other_load=load.fraction, cases=len(records),
                time_limit_s=args.time_limit, cut_by_time_limit=cut, pytest_exit_code=code)
    if args.device == "cpu":
        info["outputs"] = "fresh mappings" if args.fresh_outputs else "resident (bench.allocator.RESIDENT_TUNABLES)"
    ops = summarise(records, bandwidth)
    if merged is not None:
        for op, impls in ops.items():
            merged["ops"].setdefault(op, {}).update(impls)
        ops = add_ratios(merged["ops"])
        merged["environment"].setdefault("merged_runs", []).append(info)
        info = merged["environment"]
    print_table(ops)
    if load.fraction is not None:
        print(f"other processes used {load.fraction:.0%} of the {os.cpu_count()} cores during the run"
              + ("; timings under load" if load.fraction > 0.1 else ""))
    if cut:
        print(f"cut at --time-limit {args.time_limit:g} s after {len(records)} cases")
    name = f"{args.device}{'-quick' if args.quick else ''}-{info['date']}.json"
    out = args.out or args.merge or os.path.join(HERE, "results", name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": info, "ops": ops}, f, indent=2)
    print(f"wrote {out}")
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
