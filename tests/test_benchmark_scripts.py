"""The GPU-only benchmark scripts, run without a GPU in their --check mode: tiny shapes on the CPU with the kernels
in Triton's interpreter, every check they make on a GPU, nothing timed. GPU sessions are short and rare; a script
that would fail in one (a kernel signature that moved on, a renamed variable) must fail here first."""

import json
import re

import pytest

from conftest import interpreter_breaks_on_numpy, run_benchmark_script

# --check runs the kernels in Triton's interpreter, in a fresh process
pytestmark = pytest.mark.skipif(interpreter_breaks_on_numpy(), reason="Triton's interpreter fails with this numpy")

# each script's fastbert providers (the interpreter runs the TMA kernel too)
FASTBERT = {"attention": {"fastbert", "fastbert-varlen", "fastbert-varlen+pack"},
            "linear_gelu": {"fastbert", "fastbert-portable", "fastbert-sm90"},
            "add_layer_norm": {"fastbert"}, "linear_cross_entropy": {"fastbert"}}  # fmt: skip


@pytest.mark.parametrize("script, suite", [("bench_attention.py", "attention"), ("bench_linear_gelu.py", "linear_gelu"),
                                           ("bench_add_layer_norm.py", "add_layer_norm"),
                                           ("bench_linear_cross_entropy.py", "linear_cross_entropy")])  # fmt: skip
def test_op_benchmark_checks_every_fastbert_provider(tmp_path, script, suite):
    # (the script exits non-zero when a check fails: run_benchmark_script fails then)
    run_benchmark_script(script, "--check", "--out", str(tmp_path))
    (path,) = tmp_path.glob(f"{suite}-*.json")
    rows = json.loads(path.read_text())["rows"]
    ours = [r for r in rows if r["provider"].startswith("fastbert")]
    cases = {(r["provider"], r["mode"]) for r in ours}
    assert cases == {(p, m) for p in FASTBERT[suite] for m in ("fwd", "fwd+bwd")}, cases
    assert all(r["check_ok"] for r in ours), ours
    # the gradients of every fastbert provider that takes the padded inputs (attention's pre-packed one does not)
    graded = [r for r in ours if r["mode"] == "fwd+bwd" and r["provider"] != "fastbert-varlen"]
    assert graded and all(r["grad_check_ok"] for r in graded), graded


def test_every_sweep_candidate_launches_and_matches():
    """benchmarks/sweep_configs.py launches every tile candidate by hand, passing each kernel argument itself; its
    --check runs them all and compares each with the shipped launcher's (or eager PyTorch's) result."""
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
