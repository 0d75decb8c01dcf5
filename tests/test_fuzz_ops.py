"""The fuzz target of the direct op calls (tests/fuzz/fuzz_ops.py) on a fixed short budget.

Every torch.ops.fastattn op is called with arguments drawn over their whole type range; each
call must return or raise ValueError, TypeError, RuntimeError, NotImplementedError or
IndexError, never crash, hang or run out of memory. The calls run in a subprocess (a crash
must not take pytest down), a fixed set (seeded), skipping calls that match a known open defect
(fuzz_ops.KNOWN).

CI runs them on the library as imported: building the AddressSanitizer library takes ~4.5 CPU
minutes, more than this budget. FASTATTN_FUZZ_ASAN=1 runs the same budget on the ASan build
(built into torch's extensions cache, reused after the first time). The long run:
    python tests/fuzz/fuzz_ops.py --examples 100000 --asan
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FUZZ = HERE / "fuzz" / "fuzz_ops.py"
sys.path.insert(0, str(HERE / "fuzz"))

import build_asan  # noqa: E402
import fuzz_ops  # noqa: E402

EXAMPLES = int(os.environ.get("FASTATTN_FUZZ_EXAMPLES", "1000"))


def _run_fuzzer(*extra: str, timeout: float = 600) -> str:
    cmd = [sys.executable, str(FUZZ), "--examples", str(EXAMPLES), "--seed", "0", "--skip-known",
           "--timeout", "60", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the fuzzer found something (exit {proc.returncode}):\n{out[-12000:]}"
    assert "findings: 0" in out, out[-12000:]
    return out


def test_every_argument_type_of_every_op_has_a_strategy():
    """Calls of every op, drawn from its schema alone, build: an argument of a new type makes
    the fuzzer fail here rather than skip it."""
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import fastattn

    call = fuzz_ops.strategies()
    seen = set()

    def draws_of(ops):
        # (each op on its own: one draw over all ops would leave an op out whenever the drawn
        # sequence happens to skip it)
        @settings(max_examples=20, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def draw(data):
            c = data.draw(call(ops))
            names = [a.name for a in getattr(torch.ops.fastattn, c.op).default._schema.arguments]
            assert list(c.args) == names, (c.op, list(c.args))
            assert eval(repr(c), vars(fuzz_ops)).args.keys() == c.args.keys()  # --replay reads it back
            seen.add(c.op)
        return draw

    for op in fastattn.OP_NAMES:
        draws_of([op])()
    assert seen == set(fastattn.OP_NAMES), seen


def test_fuzz_ops_fixed_budget():
    """The CI budget: EXAMPLES seeded calls on the library as imported, in a subprocess."""
    out = _run_fuzzer()
    assert "op calls" in out


@pytest.mark.skipif(os.environ.get("FASTATTN_FUZZ_ASAN", "0") in ("", "0"),
                    reason="set FASTATTN_FUZZ_ASAN=1 to run the fuzz budget on the AddressSanitizer build "
                           "(its first build takes ~4.5 CPU minutes)")
def test_fuzz_ops_fixed_budget_asan():
    """The same budget on the AddressSanitizer build of the CPU kernels: out-of-bounds reads
    and writes abort the worker with a report."""
    reason = build_asan.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    out = _run_fuzzer("--asan", timeout=1800)
    assert "library: ASan build" in out
