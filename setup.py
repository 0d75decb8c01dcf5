"""Builds fastattn._C: CUDAExtension when torch is a CUDA build and a toolkit is found,
CppExtension otherwise. Options (environment variables): FASTATTN_CUDA_ARCHS ("80;90"),
FASTATTN_FORCE_CPU=1, FASTATTN_CPU_ISA=generic, MAX_JOBS, NVCC_THREADS."""
import importlib.util
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "fastattn_build_config", os.path.join(HERE, "python", "fastattn", "_build_config.py"))
cfg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg)

with_cuda, _why = cfg.want_cuda()
print(cfg.describe(), flush=True)

Extension = CUDAExtension if with_cuda else CppExtension
# Relative paths: setuptools requires them for sources inside the project.
sources = [os.path.relpath(s, HERE) for s in cfg.sources(with_cuda)]

# The built library is ABI-tied to the torch it was compiled against: require exactly it.
torch_public_version = torch.__version__.split("+")[0]

setup(
    name="fastattn",
    version="0.1.0",
    description="Fused attention kernels (relative bias, rotary, window/global/span) for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[
        Extension(
            name="fastattn._C",
            sources=sources,
            include_dirs=cfg.include_dirs(),
            library_dirs=cfg.library_dirs(with_cuda),
            extra_compile_args=cfg.compile_args(with_cuda),
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[f"torch=={torch_public_version}"],
    # fastattn.integrations.transformers (attn_implementation="fastattn"); tested with 5.24.0.
    extras_require={"transformers": ["transformers>=5.24,<6"]},
    python_requires=">=3.10",
    zip_safe=False,
)
