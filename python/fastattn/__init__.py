"""fastattn: fused attention kernels for PyTorch.

    import fastattn
    out = fastattn.attention(q, k, v, causal=True, rel_bias=table)
    out = fastattn.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)  # packed
    q = fastattn.rotary(q, inv_freq=inv_freq)

See fastattn.functional for the public functions, fastattn.reference for their pure-PyTorch
twins, and fastattn.nn for modules.
"""
from __future__ import annotations

__version__ = "0.1.0"


def _load_library() -> str:
    """Load the compiled ops: the library FASTATTN_LIBRARY names, else the installed
    fastattn._C, else a JIT build from the checkout.

    FASTATTN_LIBRARY=/path/to/lib.so loads that build of the ops instead of fastattn._C (which
    is then not loaded at all), e.g. the AddressSanitizer build of tests/fuzz/build_asan.py."""
    import os

    import torch  # noqa: F401  (loads libtorch, which the extension links against)

    library = os.environ.get("FASTATTN_LIBRARY")
    if library:
        torch.ops.load_library(library)
        return library
    try:
        from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

        return "installed"
    except ImportError as err:
        here = os.path.dirname(os.path.abspath(__file__))
        if not os.path.isdir(os.path.join(here, "..", "..", "csrc")):
            raise ImportError(
                "fastattn: the compiled extension fastattn._C is missing and this is not a "
                f"source checkout to JIT-build from ({err}); reinstall with "
                "`pip install --no-build-isolation .`") from err
        from . import jit

        print("fastattn: no compiled extension found, JIT-compiling the C++/CUDA sources "
              "(cached after the first time)...", flush=True)
        jit.load()
        return "jit"


_library_source = _load_library()

from . import ops  # noqa: E402  (fake kernels and autograd for the ops)
from . import reference  # noqa: E402
from .functional import attention, attention_varlen, attention_weights, pad, rotary, unpad  # noqa: E402
from . import functional  # noqa: E402
from . import nn  # noqa: E402
from . import tuning  # noqa: E402


OP_NAMES = ("rotary", "rotary_", "rotary_backward", "attention", "attention_backward", "attention_varlen",
            "attention_varlen_backward")


def empty_cache() -> None:
    """Free the CPU output buffers that fastattn holds for reuse.

    Large CPU outputs (8 MiB and more) come from a small cache of buffers that earlier outputs
    released, which saves the page faults of fresh memory. The cache is bounded (a few buffers,
    at most twice the largest recent output and never over 1 GiB; unused buffers are dropped
    after a while), and this frees what it holds now, e.g. before a phase that needs the memory.
    Live tensors are not affected. CUDA memory is torch.cuda.empty_cache()'s.
    """
    import torch

    torch.ops.fastattn._empty_cpu_cache()


def build_info() -> dict:
    """How this fastattn was built: versions, vector ISA, CUDA archs, and for each op the
    devices that have a kernel registered."""
    import torch

    info = {"fastattn": __version__, "torch": torch.__version__, "library": _library_source}
    info.update(ops.build_info())
    info["ops"] = {
        name: [dev for dev in ("CPU", "CUDA")
               if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{name}", dev)]
        for name in OP_NAMES
    }
    return info


__all__ = ["attention", "attention_varlen", "attention_weights", "rotary", "unpad", "pad", "functional", "reference", "nn", "ops", "tuning", "build_info", "empty_cache"]
