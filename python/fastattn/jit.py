"""Build fastattn's C++/CUDA library just in time, from a source checkout.

`import fastattn` falls back to this when no compiled fastattn._C is installed (a notebook
with the checkout's python/ on sys.path). It compiles the same sources with the same flags as
setup.py (see _build_config.py) through torch.utils.cpp_extension.load; torch caches the
build (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) and recompiles only what
changed.

Environment: FASTATTN_FORCE_CPU=1, FASTATTN_CUDA_ARCHS, MAX_JOBS as for setup.py.
FASTATTN_JIT_ONLY=name[,name] compiles only csrc files whose names contain one of the names
(plus the schema file and csrc/common): a development aid for working on one kernel family.
"""
from __future__ import annotations

import os

from . import _build_config as cfg

_loaded_path = None


def _selected_sources(with_cuda: bool, root: str | None = None) -> list[str]:
    srcs = [s for s in cfg.sources(with_cuda, root) if not s.endswith("python_module.cpp")]
    only = [n for n in os.environ.get("FASTATTN_JIT_ONLY", "").split(",") if n]
    if only:
        shared = os.sep + "common" + os.sep  # checks etc.: every family needs them
        srcs = [s for s in srcs if s.endswith(("fastattn.cpp", "output_buffers.cpp")) or shared in s
                or any(n in os.path.basename(s) for n in only)]
    return srcs


def load(verbose: bool = False) -> str:
    """Compile (or reuse the cached build of) the library and load it; returns its path.

    Registers the torch.ops.fastattn.* kernels. Raises RuntimeError when a fastattn library is
    already loaded in this process (an installed fastattn._C or an earlier load()).
    """
    global _loaded_path
    import torch
    from torch.utils import cpp_extension

    if _loaded_path is not None:
        return _loaded_path
    if hasattr(torch.ops.fastattn, "build_info") and _ops_have_kernels():
        raise RuntimeError("fastattn.jit.load: a fastattn library is already loaded in this process")
    with_cuda, why = cfg.want_cuda()
    args = cfg.compile_args(with_cuda)
    only = os.environ.get("FASTATTN_JIT_ONLY", "")
    name = "fastattn_jit" + ("_cuda" if with_cuda else "_cpu") + (f"_{only.replace(',', '_')}" if only else "")
    if verbose:
        print(cfg.describe(), flush=True)
    cpp_extension.load(
        name=name,
        sources=_selected_sources(with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc", []),
        extra_include_paths=cfg.include_dirs(),
        extra_ldflags=[f"-L{d}" for d in cfg.library_dirs(with_cuda)],
        is_python_module=False,
        verbose=verbose,
    )
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    _loaded_path = os.path.join(build_dir, f"{name}.so")
    return _loaded_path


def _ops_have_kernels() -> bool:
    import torch

    try:
        torch.ops.fastattn.build_info()
        return True
    except Exception:
        return False
