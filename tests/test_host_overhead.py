"""benchmarks/host_overhead.py, the host-time diagnostic that runs without a GPU: it leans on Triton internals (the
active driver, the autotuner's timing hook, the compiled kernel's launcher), so a Triton upgrade that moves them
must fail here rather than leave the tool broken. Runs in a subprocess: the test session's TRITON_INTERPRET=1
would replace the compiled launch path the tool measures."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_measures_an_op_through_the_compiled_launch_path():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--only", "add_layer_norm,attention"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    ).stdout  # fmt: skip
    rows = {
        m[1]: tuple(float(g) for g in m.groups()[1:])
        for m in re.finditer(r"^(\S+)\s+fwd\s+([\d.]+)\s+fwd\+bwd\s+([\d.]+)\s+launches (\d+) / (\d+)", out, re.M)
    }
    assert set(rows) == {"add_layer_norm", "attention"}, out
    for fwd_us, fwd_bwd_us, fwd_launches, fwd_bwd_launches in rows.values():
        # the kernels really went through Triton's launch path (timings are not compared: CI's machine is busy)
        assert fwd_us > 0 and fwd_bwd_us > 0, out
        assert 1 <= fwd_launches < fwd_bwd_launches, out


def test_measures_a_bert_training_step():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--bert", "--layers", "2"],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    ).stdout  # fmt: skip
    steps = dict(re.findall(r"^bert train step (\S+)\s+fwd\+bwd\s+([\d.]+) ms", out, re.M))
    assert set(steps) == {"sdpa", "fastbert"}, out
    assert all(float(ms) > 0 for ms in steps.values()), out
