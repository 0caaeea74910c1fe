"""Register and spill report of every CUDA kernel, from ``ptxas -v`` (needs nvcc, not a GPU).

    python -m bench.registers [--arch sm_90] [--out bench/results/registers-<arch>-<date>.json] [files...]

Each csrc/cuda/*.cu is compiled (host and device code, so it doubles as a compile check of one file) with the
extension's own flags plus ``-Xptxas -v``; the report lists, per
kernel (demangled), registers, spill stores/loads in bytes, stack frame, shared memory and constant memory.
"""
import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_FUNCTION = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(.*)")


def _flags():
    """Include paths and defines the extension build uses for .cu files."""
    sys.path.insert(0, ROOT)
    import torch
    from torch.utils import cpp_extension

    includes = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths()
    for site in sys.path:
        wheel = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel):
            includes.append(wheel)
            break
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    defines = [
        "-DCIM_EXT_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ]
    return [f"-I{p}" for p in includes] + defines + ["-std=c++20", "-O3", "--expt-relaxed-constexpr"]


def _demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text):
    """Kernels in ``ptxas -v`` output -> list of dicts (mangled names)."""
    kernels, current = [], None
    for line in text.splitlines():
        match = _FUNCTION.search(line)
        if match:
            current = {"kernel": match.group(1), "arch": match.group(2)}
            kernels.append(current)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current.update(stack_frame_bytes=int(frame.group(1)), spill_store_bytes=int(frame.group(2)),
                           spill_load_bytes=int(frame.group(3)))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            for amount, space in re.findall(r"(\d+) bytes (smem|cmem\[\d+\])", used.group(2)):
                key = "shared_bytes" if space == "smem" else "constant_bytes"
                current[key] = current.get(key, 0) + int(amount)
    return kernels


def report(files, arch):
    flags = _flags()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in files:
            obj = os.path.join(tmp, os.path.basename(source) + ".o")
            cmd = ["nvcc", "-c", f"-arch={arch}", "-Xptxas", "-v", *flags, source, "-o", obj]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stdout + done.stderr)
                raise SystemExit(f"nvcc failed on {source}")
            for kernel in parse(done.stdout + done.stderr):
                kernel["file"] = os.path.relpath(source, ROOT)
                rows.append(kernel)
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="CUDA sources (default: every csrc/cuda/*.cu)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--out", help="JSON path (default: bench/results/registers-<arch>-<date>.json)")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    rows = report(files, args.arch)
    out = args.out or os.path.join(HERE, "results", f"registers-{args.arch}-{datetime.date.today().isoformat()}.json")
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with open(out, "w") as f:
        json.dump({"arch": args.arch, "nvcc": nvcc, "kernels": rows}, f, indent=1)
    for row in rows:
        print(f"{row['registers']:4d} regs  spill {row.get('spill_store_bytes', 0):4d}/{row.get('spill_load_bytes', 0):4d} B"
              f"  stack {row.get('stack_frame_bytes', 0):4d} B  {row['file']}: {row['kernel'][:110]}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
