"""Build fastattn's CPU kernels with AddressSanitizer, as a library of their own.

    python tests/fuzz/build_asan.py [-v]      # builds (or finds the cached build), prints its path

The library is compiled from the same sources with the same flags as the packaged build
(python/fastattn/_build_config.py: csrc/fastattn.cpp, csrc/common/*.cpp, csrc/cpu/*.cpp) plus
-fsanitize=address -fno-omit-frame-pointer -g, through torch.utils.cpp_extension, into torch's
extensions cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), never into the
repository; ninja rebuilds only what changed. Honours MAX_JOBS like any torch extension build.

A process can only load it with the ASan runtime preloaded, and must then not load the normal
fastattn._C (both register torch.ops.fastattn):

    LD_PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \\
        FASTATTN_LIBRARY=<path printed above> python -c "import fastattn"

`build()` compiles in such a subprocess (loading the result there proves it loads) and returns
the path without loading it into the calling process; `unavailable_reason()` says why it cannot
be built here (None when it should work).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]  # tests/fuzz -> tests -> repository root
NAME = "fastattn_asan_cpu"
SANITIZE_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
# ASan's options for a process that runs the library: leaks are not what we look for (torch
# keeps caches for the life of the process); a failed allocation must come back as NULL, as
# without ASan, so that torch raises its out-of-memory error instead of ASan aborting.
ASAN_OPTIONS = "detect_leaks=0:allocator_may_return_null=1"


def _build_config():
    """The checkout's python/fastattn/_build_config.py, loaded by path (as setup.py does), so
    that an installed fastattn of another version cannot change the flags."""
    spec = importlib.util.spec_from_file_location(
        "fastattn_build_config_asan", REPO_ROOT / "python" / "fastattn" / "_build_config.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    return cfg


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def asan_runtime() -> Optional[str]:
    """The compiler's ASan runtime (the file to LD_PRELOAD), or None when it has none."""
    cxx = shutil.which(_compiler())
    if cxx is None:
        return None
    try:
        out = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # Without the library the compiler prints the bare name back.
    return out if os.path.isabs(out) and os.path.exists(out) else None


def preload() -> str:
    """LD_PRELOAD for a process that loads the library: the ASan runtime, and the C++ runtime
    after it. (ASan looks up the real __cxa_throw when it starts; in a Python that has not
    loaded libstdc++ yet it finds none, and the first C++ exception then aborts the process
    with "CHECK failed: ... real___cxa_throw".)"""
    runtime = asan_runtime()
    assert runtime is not None, unavailable_reason()
    libs = [runtime]
    try:
        cxx_runtime = subprocess.run([shutil.which(_compiler()), "-print-file-name=libstdc++.so"],
                                     capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        cxx_runtime = ""
    if os.path.isabs(cxx_runtime) and os.path.exists(cxx_runtime):
        libs.append(os.path.realpath(cxx_runtime))
    return " ".join(libs)


def asan_environment(library: Optional[str] = None) -> dict:
    """The environment of a process that runs the sanitized library (os.environ plus the
    preloaded runtimes, ASAN_OPTIONS and, when given, FASTATTN_LIBRARY)."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = preload()
    env["ASAN_OPTIONS"] = ASAN_OPTIONS + (":" + os.environ["ASAN_OPTIONS"] if os.environ.get("ASAN_OPTIONS") else "")
    if library is not None:
        env["FASTATTN_LIBRARY"] = library
    return env


def unavailable_reason() -> Optional[str]:
    """Why the sanitized library cannot be built on this machine (None if it should build)."""
    if not sys.platform.startswith("linux"):
        return f"the AddressSanitizer build is set up for Linux only (this is {sys.platform})"
    try:
        from torch.utils import cpp_extension
    except Exception as err:  # pragma: no cover
        return f"torch.utils.cpp_extension unavailable: {err}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it)"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler ({_compiler()!r} not found on PATH)"
    if asan_runtime() is None:
        return f"the compiler {_compiler()!r} has no AddressSanitizer runtime (libasan.so)"
    return None


def _compile_and_load(verbose: bool = False) -> str:
    """Compile (or reuse) and load into this process, which must have the ASan runtime
    preloaded. Returns the library's path."""
    from torch.utils import cpp_extension

    # The compiler and ninja run without the preloaded runtime (this process keeps it).
    os.environ.pop("LD_PRELOAD", None)
    cfg = _build_config()
    sources = [s for s in cfg.sources(False, str(REPO_ROOT)) if not s.endswith("python_module.cpp")]
    cxx_flags = cfg.compile_args(False)["cxx"] + SANITIZE_FLAGS + ["-g"]
    path = cpp_extension.load(name=NAME, sources=sources, extra_cflags=cxx_flags,
                              extra_include_paths=cfg.include_dirs(), extra_ldflags=SANITIZE_FLAGS,
                              with_cuda=False, is_python_module=False, verbose=verbose)
    return str(path)


def build(verbose: bool = False, timeout: Optional[float] = None) -> str:
    """Build (or reuse the cached build) in a subprocess with the ASan runtime preloaded, and
    return the library's path. Raises RuntimeError with the compiler's output on failure."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastattn ASan build unavailable: {reason}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process"] + (["-v"] if verbose else [])
    proc = subprocess.run(cmd, env=asan_environment(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"fastattn ASan build failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    if verbose:
        sys.stderr.write(proc.stderr)
    return proc.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    import time

    t0 = time.time()
    verbose = "-v" in sys.argv[1:]
    if "--in-process" in sys.argv[1:]:
        print(_compile_and_load(verbose=verbose))
    else:
        print(build(verbose=verbose))
        print(f"built/found in {time.time() - t0:.1f} s", file=sys.stderr)
