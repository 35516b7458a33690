"""`fastbert bench` end to end without a GPU: --dry-run builds a tiny BERT, checks every provider against eager
and writes the result files (timings on CPU mean nothing and are not looked at); without --dry-run and without
CUDA it says so and exits cleanly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import interpreter_breaks_on_numpy
from fastbert import cli

pytest.importorskip("transformers")


@pytest.mark.skipif(interpreter_breaks_on_numpy(), reason="Triton's interpreter fails with this numpy (conftest)")
def test_dry_run_writes_results(tmp_path):
    # A fresh process, as a user runs it: the dry run needs Triton's interpreter, which Triton picks when the
    # kernels are first imported (on a GPU machine this test process has compiled kernels already). Started in the
    # checkout's root, as `python -m fastbert` from there: the root, first on sys.path, must not hide HuggingFace's
    # hub-kernels from transformers (fastbert/_shadow.py).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"} | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "fastbert", "bench", "--dry-run", "--out", str(tmp_path)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1, sorted(p.name for p in tmp_path.iterdir())
    doc = json.loads(results[0].read_text())
    rows = doc["rows"]
    providers = {(r["suite"], r["provider"]) for r in rows}
    assert ("infer", "fastbert") in providers and ("infer", "eager") in providers
    assert ("train", "fastbert") in providers
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert results[0].with_suffix(".md").exists()
    for key in ("device", "torch", "triton", "commit"):
        assert key in doc["header"], key


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_without_cuda_explains_and_exits_cleanly(capsys):
    assert cli.main(["bench", "--quick"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_quick_batch1_run_leaves_out_only_max_autotune_compile():
    import argparse

    from fastbert import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for given, expect in ((None, [p for p in bench.INFER_PROVIDERS if p != "torch.compile"]),
                          ("sdpa,torch.compile,fastbert+cudagraph", ["sdpa", "fastbert+cudagraph"])):  # fmt: skip
        args = parser.parse_args(["--quick"] + ([] if given is None else ["--providers", given]))
        one = bench.quick_batch1_args(args)
        assert (one.batch, one.seq, one.lengths) == ("1", "128", "full")
        assert one.providers.split(",") == expect
        assert args.providers == given  # the batch-32 run keeps every provider


def test_unknown_provider_is_refused_before_anything_runs(capsys):
    assert cli.main(["bench", "--providers", "sdpa,fastbert+cudagrph"]) == 2
    out = capsys.readouterr().out
    assert "unknown provider(s) fastbert+cudagrph" in out and "sdpa+cudagraph" in out


def test_each_suite_runs_only_its_own_providers():
    import argparse

    from fastbert import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--providers", "sdpa,sdpa+cudagraph,torch.compile"])
    assert bench.suite_providers(args, bench.INFER_PROVIDERS) == ["sdpa", "torch.compile"]
    assert bench.suite_providers(args, bench.TRAIN_PROVIDERS) == ["sdpa", "sdpa+cudagraph"]
    assert bench.suite_providers(parser.parse_args([]), bench.TRAIN_PROVIDERS) == list(bench.TRAIN_PROVIDERS)
