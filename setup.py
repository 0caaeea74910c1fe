"""Build script for cim-ext: CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch are present.

Environment:
  CIM_EXT_CUDA=0/1       force the CUDA kernels off / on (default: on when nvcc and torch.version.cuda are found)
  CUDA_HOME              CUDA toolkit root (the folder holding include/cuda_runtime.h); guessed when unset
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0"
  NVCC_FLAGS, CXX_FLAGS  extra flags, split with shlex
  DEBUG=1                -O0 -g
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import shlex
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root():
    """Return a CUDA toolkit root containing include/cuda_runtime.h, or None.

    nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one), which makes torch's own
    guess (the parent of nvcc's folder) wrong, so each candidate is checked for the runtime header.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _want_cuda(toolkit, torch_cuda):
    flag = os.environ.get("CIM_EXT_CUDA")
    if flag is not None and flag not in ("0", "1"):
        sys.exit(f"CIM_EXT_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    available = toolkit is not None and torch_cuda is not None
    if flag == "1" and not available:
        sys.exit(
            "CIM_EXT_CUDA=1 but the CUDA kernels cannot be built: "
            f"toolkit root={toolkit!r} (set CUDA_HOME to the folder with include/cuda_runtime.h), "
            f"torch.version.cuda={torch_cuda!r} (install a CUDA build of torch)"
        )
    return available


def _extension():
    toolkit = _toolkit_root()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # before cpp_extension reads it at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    use_cuda = _want_cuda(toolkit, torch.version.cuda)
    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"] + shlex.split(os.environ.get("CXX_FLAGS", ""))
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    kind = CppExtension
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr"] + shlex.split(os.environ.get("NVCC_FLAGS", ""))
        extra["nvcc"] = nvcc
        # cuBLAS/cuSPARSE headers that ATen's CUDA headers include ship with the torch wheels.
        for site in sys.path:
            wheel_include = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(wheel_include):
                include_dirs.append(wheel_include)
                break
        kind = CUDAExtension
    print(
        "cim_ext build: "
        f"cuda={'yes' if use_cuda else 'no'} toolkit={toolkit} torch={torch.__version__} "
        f"torch.version.cuda={torch.version.cuda} arch={os.environ.get('TORCH_CUDA_ARCH_LIST') if use_cuda else '-'} "
        f"debug={debug} max_jobs={os.environ.get('MAX_JOBS', 'default')} sources={len(sources)}",
        flush=True,
    )
    macros = [("CIM_EXT_WITH_CUDA", "1" if use_cuda else "0"), ("Py_LIMITED_API", "0x03090000")]
    return kind(
        "cim_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=extra,
        py_limited_api=True,
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True)


setup(
    packages=find_packages(include=["cim_ext", "cim_ext.*", "training", "training.*", "bench", "bench.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
)
