"""The package itself: what was built, the JIT source list, and `python -m fastattn`."""
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _build_config, jit


def test_build_info_reports_versions_and_kernels():
    info = fastattn.build_info()
    assert info["fastattn"] == fastattn.__version__
    assert info["torch"] == torch.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "neon", "generic")
    assert info["cuda"] in ("0", "1")
    for name in fastattn.OP_NAMES:
        assert "CPU" in info["ops"][name], f"{name} has no CPU kernel"
        if info["cuda"] == "1":
            assert "CUDA" in info["ops"][name], f"{name} has no CUDA kernel in a CUDA build"


def test_jit_compiles_the_same_sources_as_setup():
    # The JIT build must compile exactly setup.py's sources, less the Python module stub.
    # (Sources of this checkout: the package under test may be an installed copy.)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for with_cuda in (False, True):
        setup_sources = set(_build_config.sources(with_cuda, root))
        jit_sources = set(jit._selected_sources(with_cuda, root))
        assert jit_sources == {s for s in setup_sources if not s.endswith("python_module.cpp")}
        assert os.path.join(root, "csrc", "fastattn.cpp") in jit_sources
        assert any(s.endswith("rotary.cpp") for s in jit_sources)
        assert any(s.endswith("attention_forward.cpp") for s in jit_sources)
        assert any(s.endswith("attention_backward.cpp") for s in jit_sources)
    assert any(s.endswith(".cu") for s in _build_config.sources(True, root))
    assert not any(s.endswith(".cu") for s in _build_config.sources(False, root))


def test_cuda_arch_option_is_parsed(monkeypatch):
    monkeypatch.setenv("FASTATTN_CUDA_ARCHS", "80; 9.0")
    assert _build_config.cuda_archs() == ["80", "90"]
    args = _build_config.compile_args(with_cuda=True)["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in args
    assert "-gencode=arch=compute_90,code=compute_90" in args  # PTX for the newest
    monkeypatch.setenv("FASTATTN_CUDA_ARCHS", " ; ")
    with pytest.raises(ValueError, match="FASTATTN_CUDA_ARCHS"):
        _build_config.cuda_archs()


def test_force_cpu_option(monkeypatch):
    monkeypatch.setenv("FASTATTN_FORCE_CPU", "1")
    with_cuda, why = _build_config.want_cuda()
    assert not with_cuda and "FASTATTN_FORCE_CPU" in why


def test_main_job_self_check_passes():
    # `python -m fastattn` without the benchmark: build info + self-check, exit code 0.
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "fastattn", "--no-bench", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== build" in proc.stdout and "FAIL" not in proc.stdout
    assert proc.stdout.count("PASS") == 6 and "PASS  attention_varlen" in proc.stdout


def test_main_job_benchmark_table_and_chart(tmp_path):
    # `python -m fastattn --quick --plot`: the benchmark table has a time for every row (a row
    # whose call raised would say "failed" and show nan) and the chart is written.
    chart = tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "fastattn", "--quick", "--device", "cpu", "--plot", str(chart)],
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("  | ") and "implementation" not in line]
    ops = {line.split("|")[1].strip() for line in rows}
    assert {"rotary fwd+bwd", "attention+rel_bias fwd+bwd", "attention decode step, GQA 32/4"} <= ops, proc.stdout
    for line in rows:
        ms = float(line.split("|")[3])
        assert ms == ms and ms > 0 and "failed" not in line, line
    assert chart.stat().st_size > 0


def test_transformers_extra_pins_the_range_ci_installs():
    # setup.py's "transformers" extra and requirements-hf.txt (what CI installs) name one range.
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        extra = re.search(r'extras_require=\{"transformers": \["([^"]+)"\]\}', f.read())
    with open(os.path.join(root, "requirements-hf.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert extra is not None and lines == [extra.group(1)]
    with open(os.path.join(root, ".ci", "run")) as f:
        assert "pip install -q -r requirements-hf.txt" in f.read()
