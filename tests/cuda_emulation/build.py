"""Build (and load) the CPU emulator of fastattn's CUDA attention kernels.

    python tests/cuda_emulation/build.py [-v]      # from anywhere; prints the library path

`load()` compiles harness.cpp (which #includes csrc/cuda/attention_api.cu and, through it, the
real attention_{fwd,bwd}_kernel.cuh / attention_utils.cuh) with a host C++ compiler and
-DFASTATTN_CUDA_EMULATION, and loads the result, which registers
torch.ops.fastattn_emu.attention / attention_backward (CPU tensors stand in for device memory).
The build directory is torch's extensions cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), never the repository; ninja rebuilds only when a source or an
included header changed. Honours MAX_JOBS like any torch extension build.

Needs: Linux (ucontext fibers), a C++17 compiler, ninja, and the CUDA headers cuda_fp16.h /
cuda_bf16.h (only the headers: no nvcc, no GPU, no CUDA runtime). They are looked for in
$CUDA_HOME / $CUDA_PATH, torch.utils.cpp_extension.CUDA_HOME (and its cuda/ subfolder), the pip
CUDA wheels (site-packages/nvidia/*/include); the first folder that also has what they include,
crt/host_defines.h and nv/target (which e.g. nvidia/cu13/include alone lacks), is used.
`unavailable_reason()` says why a build is impossible here (None when it should work).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]              # tests/cuda_emulation -> tests -> repository root
CSRC = REPO_ROOT / "csrc"
NAME = "fastattn_cuda_emu"
OPS_NAMESPACE = "fastattn_emu"
# the harness (which includes the CUDA kernels' host code), and the attention op's shared
# argument struct, checks and autograd function
# (attention_varlen.cpp for the autograd function's varlen node, and the CPU output cache it
# allocates from)
SOURCES = [HERE / "harness.cpp"] + [CSRC / "common" / f for f in ("checks.cpp", "attention_args.cpp",
                                                               "attention_varlen.cpp", "autograd.cpp",
                                                               "cuda_tuning.cpp")] + [
    CSRC / "cpu" / "output_buffers.cpp"]
# The files the library is compiled from (for messages; ninja tracks the headers itself).
KERNEL_FILES = [CSRC / "cuda" / f for f in ("attention_api.cu", "attention_fwd_kernel.cuh",
                                             "attention_bwd_kernel.cuh", "attention_utils.cuh")]
_REQUIRED_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h", "crt/host_defines.h")
# cuda_fp16.h also includes <nv/target> (CCCL): in the include folder itself or in its cccl/.
_CCCL_HEADER = "nv/target"


def _candidate_include_dirs() -> list[Path]:
    """Where CUDA headers may be, most authoritative first."""
    roots: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(os.environ[var])
    try:
        from torch.utils import cpp_extension
        if cpp_extension.CUDA_HOME:
            roots.append(cpp_extension.CUDA_HOME)
            # torch derives CUDA_HOME from `which nvcc`; with an nvcc shim in e.g. /usr/local/bin
            # that is /usr/local, whose toolkit is the conventional /usr/local/cuda below it.
            roots.append(os.path.join(cpp_extension.CUDA_HOME, "cuda"))
    except Exception:
        pass
    dirs: list[Path] = []
    for root in roots:
        dirs += [Path(root) / "include", *map(Path, sorted(glob.glob(os.path.join(root, "targets", "*", "include"))))]
    # pip CUDA wheels: the `nvidia` namespace package (nvidia/cu13/include, nvidia/cuda_runtime/include, ...)
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += map(Path, sorted(glob.glob(os.path.join(base, "*", "include"))))
    seen, out = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def cuda_include_dirs() -> Optional[list[Path]]:
    """The include folders for the CUDA headers the kernels use (cuda_fp16.h, cuda_bf16.h and
    what they include: crt/..., nv/target), or None when no candidate has them all."""
    for d in _candidate_include_dirs():
        if all((d / h).is_file() for h in _REQUIRED_HEADERS):
            if (d / _CCCL_HEADER).is_file():
                return [d]
            if (d / "cccl" / _CCCL_HEADER).is_file():
                return [d, d / "cccl"]
    return None


def unavailable_reason() -> Optional[str]:
    """Why the emulator cannot be built on this machine (None if it should build)."""
    if not sys.platform.startswith("linux"):
        return f"the CUDA emulator uses ucontext fibers and is Linux-only (this is {sys.platform})"
    missing = [str(p.relative_to(REPO_ROOT)) for p in SOURCES + KERNEL_FILES if not p.is_file()]
    if missing:
        return f"emulator or kernel sources missing: {', '.join(missing)}"
    try:
        from torch.utils import cpp_extension
    except Exception as err:  # pragma: no cover
        return f"torch.utils.cpp_extension unavailable: {err}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it to build the emulator)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found on PATH)"
    if cuda_include_dirs() is None:
        looked = ", ".join(str(d) for d in _candidate_include_dirs()) or "nowhere (no CUDA_HOME, no pip nvidia package)"
        return ("no folder with the CUDA headers cuda_fp16.h, cuda_bf16.h, crt/host_defines.h and "
                "nv/target (a CUDA toolkit's include/); looked in " + looked +
                ". Set CUDA_HOME to a CUDA toolkit (only its headers are needed)")
    return None


# FASTATTN_EMU_ASAN=1 builds the emulator with AddressSanitizer (a separate library), so that a
# kernel's out-of-bounds global or shared memory access aborts with a report (written to
# log_path: pytest's output capture would swallow it). Run the tests with the runtime preloaded:
#   FASTATTN_EMU_ASAN=1 LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
#     ASAN_OPTIONS=detect_leaks=0:log_path=/tmp/asan python -m pytest tests/test_cuda_emulation.py
# (ASan warns once that it does not fully support swapcontext; the fibers' stacks are ordinary
# heap memory, and the whole emulated suite runs clean.)
ASAN = os.environ.get("FASTATTN_EMU_ASAN", "0") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []


def extra_cflags() -> list[str]:
    incs = cuda_include_dirs()
    assert incs is not None, unavailable_reason()
    return (["-O2", "-fno-strict-aliasing", "-DFASTATTN_CUDA_EMULATION",
             f"-I{CSRC}", f"-I{CSRC / 'cuda'}", f"-I{HERE}"] + [f"-I{d}" for d in incs] + ["-w"]
            + SANITIZE_FLAGS)


_loaded: Optional[str] = None


def load(verbose: bool = False) -> str:
    """Build if needed, load the library (registers torch.ops.fastattn_emu.*) and return its path."""
    global _loaded
    if _loaded is not None:
        return _loaded
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastattn CUDA emulator cannot be built here: {reason}")
    from torch.utils import cpp_extension
    path = cpp_extension.load(name=NAME + ("_asan" if ASAN else ""), sources=[str(s) for s in SOURCES],
                              extra_cflags=extra_cflags(), extra_ldflags=SANITIZE_FLAGS,
                              is_python_module=False, verbose=verbose)
    _loaded = path if isinstance(path, str) else str(path)
    return _loaded


if __name__ == "__main__":
    import time
    t0 = time.time()
    print(load(verbose="-v" in sys.argv[1:]))
    print(f"built/loaded in {time.time() - t0:.1f} s", file=sys.stderr)
