"""The one description of how fastattn's C++/CUDA library is built.

Used by setup.py (loaded by file path, before fastattn is installed) and by fastattn.jit, so
the packaged build and the JIT build compile the same sources with the same flags.
Only the standard library and torch are imported here.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

DEFAULT_CUDA_ARCHS = "80;90"


def repo_root() -> str:
    """The directory that holds csrc/ (the source checkout)."""
    return os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_toolkit_home():
    """The CUDA toolkit torch.utils.cpp_extension would use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def want_cuda() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why (for the build log and build_info)."""
    import torch

    if _env_flag("FASTATTN_FORCE_CPU"):
        return False, "FASTATTN_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cuda_toolkit_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {cuda_toolkit_home()}"


def cuda_archs() -> list[str]:
    """FASTATTN_CUDA_ARCHS, e.g. "80;90" or "90a" -> ["80", "90"]."""
    raw = os.environ.get("FASTATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").replace(" ", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs:
        raise ValueError(f"FASTATTN_CUDA_ARCHS={raw!r} names no architecture (expected e.g. '80;90')")
    return archs


def sources(with_cuda: bool, root: str | None = None) -> list[str]:
    """The C++/CUDA sources under root (default: the checkout this file sits in)."""
    root = root or repo_root()
    srcs = [os.path.join(root, "csrc", "fastattn.cpp"), os.path.join(root, "csrc", "python_module.cpp")]
    srcs += sorted(glob.glob(os.path.join(root, "csrc", "common", "*.cpp")))
    srcs += sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    if with_cuda:
        srcs += sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    return srcs


def _cpu_isa_flags() -> list[str]:
    """Vector ISA flags for the CPU kernels.

    at::vec::Vectorized picks its AVX2 implementation only when CPU_CAPABILITY_AVX2 is
    defined, so we define it (and compile for AVX2/FMA/F16C) when the build machine has
    AVX2. FASTATTN_CPU_ISA=generic turns this off (portable build).
    """
    isa = os.environ.get("FASTATTN_CPU_ISA", "auto").lower()
    if isa == "generic":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if isa == "auto":
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
        except OSError:
            return []
        if not all(flag in info.split() for flag in ("avx2", "fma", "f16c")):
            return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def include_dirs() -> list[str]:
    dirs = [os.path.join(repo_root(), "csrc")]
    # pip's CUDA toolkit wheels (nvidia-*-cu13) put cuBLAS/cuSPARSE headers, which torch's
    # CUDA headers include, under site-packages/nvidia/cu13/include.
    try:
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        for cand in sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include"))):
            dirs.append(cand)
    except ImportError:
        pass
    return dirs


def library_dirs(with_cuda: bool) -> list[str]:
    """Where the linker finds libcudart.so.

    torch derives CUDA_HOME from nvcc's location; when nvcc sits in /usr/local/bin that is
    /usr/local, whose lib/ may not hold the CUDA runtime. Add the first toolkit library folder
    that does.
    """
    if not with_cuda:
        return []
    home = cuda_toolkit_home() or "/usr/local/cuda"
    for cand in (os.path.join(home, "lib64"), os.path.join(home, "lib"),
                 os.path.join(home, "cuda", "lib64"), "/usr/local/cuda/lib64"):
        if os.path.exists(os.path.join(cand, "libcudart.so")):
            return [cand]
    return []


def _openmp_flags() -> list[str]:
    """-fopenmp when torch's CPU parallelism is OpenMP (at::parallel_for is inline there)."""
    import torch

    if sys.platform == "darwin" or "OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["-fopenmp"]


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 up to
    # torch 2.9, C++20 after).
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch builds that use OpenMP (the
    # Linux wheels); compiled without it, every CPU kernel silently runs on one thread. Only
    # compiled with it, not linked: the GOMP symbols resolve to the OpenMP runtime torch has
    # already loaded, so the process keeps a single thread pool.
    cxx = ["-O3", "-fvisibility=hidden"] + _openmp_flags() + _cpu_isa_flags()
    args = {"cxx": cxx}
    if with_cuda:
        archs = cuda_archs()
        arch_tag = "_".join(archs)
        cxx += ["-DFASTATTN_WITH_CUDA", f"-DFASTATTN_CUDA_ARCH_LIST={arch_tag}"]
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                "-DFASTATTN_WITH_CUDA", f"-DFASTATTN_CUDA_ARCH_LIST={arch_tag}",
                # torch's headers disable half operators for extensions by default; our
                # kernels convert explicitly and want the operators.
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
        for a in archs:
            nvcc.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        newest = max(archs, key=lambda a: int("".join(ch for ch in a if ch.isdigit())))
        nvcc.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
        threads = os.environ.get("NVCC_THREADS")
        if threads:
            nvcc.append(f"--threads={int(threads)}")
        args["nvcc"] = nvcc
    return args


def describe() -> str:
    cuda, why = want_cuda()
    kind = "CUDA + CPU kernels" if cuda else "CPU kernels only"
    extra = f", archs {';'.join(cuda_archs())}" if cuda else ""
    return f"fastattn: building {kind}{extra} ({why}); python {sys.version.split()[0]}"
