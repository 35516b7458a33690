"""benchmarks/host_overhead.py, the host-time diagnostic that runs without a GPU: it leans on Triton internals (the
active driver, the autotuner's timing hook, the compiled kernel's launcher), so a Triton upgrade that moves them
must fail here rather than leave the tool broken. Runs in a subprocess: the test session's TRITON_INTERPRET=1
would replace the compiled launch path the tool measures."""

import re

from conftest import run_benchmark_script


def test_measures_an_op_through_the_compiled_launch_path():
    out = run_benchmark_script("host_overhead.py", "--only", "add_layer_norm,attention,linear_cross_entropy")
    rows = {
        m[1]: tuple(float(g) for g in m.groups()[1:])
        for m in re.finditer(r"^(\S+)\s+fwd\s+([\d.]+)\s+fwd\+bwd\s+([\d.]+)\s+launches (\d+) / (\d+)", out, re.M)
    }
    assert set(rows) == {"add_layer_norm", "attention", "linear_cross_entropy"}, out
    for fwd_us, fwd_bwd_us, fwd_launches, fwd_bwd_launches in rows.values():
        # the kernels really went through Triton's launch path (timings are not compared: CI's machine is busy)
        assert fwd_us > 0 and fwd_bwd_us > 0, out
        assert 1 <= fwd_launches < fwd_bwd_launches, out


def test_measures_a_bert_training_step():
    out = run_benchmark_script("host_overhead.py", "--bert", "--layers", "2")
    steps = dict(re.findall(r"^bert train step (\S+)\s+fwd\+bwd\s+([\d.]+) ms", out, re.M))
    assert set(steps) == {"sdpa", "fastbert"}, out
    assert all(float(ms) > 0 for ms in steps.values()), out
