"""benchmarks/sweep_configs.py launches every tile candidate by hand, passing each kernel argument itself, and only
runs on a GPU, whose sessions are short and rare: a kernel signature that moved on without it would waste one. Its
--check mode runs every candidate's launch in Triton's interpreter at small shapes and checks each result against
the shipped launcher's (or eager PyTorch's); this runs it."""

import re

from conftest import run_benchmark_script


def test_every_sweep_candidate_launches_and_matches():
    out = run_benchmark_script("sweep_configs.py", "--check")
    checked = re.findall(r"^  (.+?)  ok \(checked, not timed\)$", out, re.M)
    sections = ("linear_gelu fp16", "attention fp16", "attention bwd fp16")
    assert all(s in out for s in sections), out
    # every candidate list ran: the portable and TMA GEMM tiles (with and without the stored pre-activation),
    # the forward's tiles with and without a mask and with dropout, dk/dv and dq with and without dropout
    assert sum(c.startswith("sm90") for c in checked) >= 10, out
    assert sum("dropout=1" in c and "mask=0" in c for c in checked) >= 3, out
    assert sum(c.startswith("dkdv") and "dropout=1" in c for c in checked) >= 3, out
    assert sum(c.startswith("dq") and "dropout=0" in c for c in checked) >= 3, out
    assert len(checked) >= 90, out  # 92 on 2026-12-03
