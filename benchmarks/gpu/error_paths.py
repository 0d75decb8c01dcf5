"""Calls that must raise a Python error (not crash) on CUDA; each runs in its own process, so a
crash is reported per case:  python benchmarks/gpu/error_paths.py"""
import subprocess
import sys

CASES = {
    "attention head dim 264": "q = torch.randn(1, 2, 8, 264, device='cuda', dtype=torch.bfloat16); fastattn.attention(q, q, q)",
    "op head dim 264": "q = torch.randn(1, 2, 8, 264, device='cuda', dtype=torch.bfloat16); torch.ops.fastattn.attention(q, q, q, 1.0, None, False, -1, -1, None, None, None, 32.0, 0, None)",
    "op rank 3": "q = torch.randn(2, 8, 64, device='cuda', dtype=torch.bfloat16); torch.ops.fastattn.attention(q, q, q, 1.0, None, False, -1, -1, None, None, None, 32.0, 0, None)",
    "op float64": "q = torch.randn(1, 2, 8, 64, device='cuda', dtype=torch.float64); torch.ops.fastattn.attention(q, q, q, 1.0, None, False, -1, -1, None, None, None, 32.0, 0, None)",
    "rotary float64": "x = torch.randn(1, 1, 2, 4, dtype=torch.float64, device='cuda'); fastattn.rotary(x, inv_freq=torch.rand(2, dtype=torch.float64, device='cuda'))",
}
bad = 0
for name, code in CASES.items():
    src = f"import torch, fastattn\ntry:\n    {code}\n    print('NO ERROR')\nexcept (RuntimeError, ValueError) as e:\n    print('raised:', str(e).splitlines()[0][:150])\n"
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True)
    ok = r.returncode == 0 and "raised:" in r.stdout
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} {name}: rc={r.returncode} {r.stdout.strip()[:200]} {r.stderr.strip()[-300:] if not ok else ''}")
sys.exit(1 if bad else 0)
