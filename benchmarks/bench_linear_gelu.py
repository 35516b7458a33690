"""Benchmark: fused Linear + GELU (fastbert) vs eager (F.linear then F.gelu) vs torch.compile of the same vs bare
F.linear (the floor: the GEMM alone), forward and forward+backward, on one GPU.

FLOPs (the GELU and bias are negligible beside the GEMMs):
  forward           x @ weightᵀ                                  2·M·K·N
  forward+backward  forward + dx = dh @ weight + dweight = dhᵀ x  6·M·K·N
TFLOP/s = FLOPs / time.

    python benchmarks/bench_linear_gelu.py [--quick] [--out DIR] [--no-compile] [--check]

H100 targets (BERT intermediate layers, fp16 / bf16): forward >= 1.15x eager, >= 1.0x torch.compile and >= 90% of
bare F.linear's speed; forward+backward >= 1.1x eager. Without CUDA it says so in one line and exits 0 (--check:
benchmarks/harness.py). Each fastbert provider's output and gradients are checked against float64 first.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def eager(x, w, b):
    return F.gelu(F.linear(x, w, b))


def bare_linear(x, w, b):
    return F.linear(x, w, b)


def forced(fn, value: str):
    """fn with FASTBERT_LINEAR_GELU_SM90 set to value during the call: one forward kernel, not the timed choice."""
    import os

    from fastbert.kernels.linear_gelu import SM90_ENV

    def run(*args):
        saved = os.environ.get(SM90_ENV)
        os.environ[SM90_ENV] = value
        try:
            return fn(*args)
        finally:
            if saved is None:
                del os.environ[SM90_ENV]
            else:
                os.environ[SM90_ENV] = saved

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="M 16384, 768 -> 3072 only")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<gpu>/)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    harness.add_check_flag(parser)
    args = parser.parse_args()
    dev = harness.start("bench_linear_gelu", args)
    from fastbert import ops  # noqa: F401
    from fastbert.ops import linear_gelu

    check = harness.CHECK  # (no torch.compile; fp16 only: the interpreter holds bf16 as raw bits)
    compiled = None if args.no_compile or check else torch.compile(eager, mode="max-autotune-no-cudagraphs")
    shapes = [(16384, 768, 3072)] if args.quick else [(m, k, 4 * k) for m in (4096, 16384) for k in (768, 1024)]
    shapes = [(130, 64, 256)] if check else shapes
    rows = []
    for dtype in (torch.float16,) if check else (torch.float16, torch.bfloat16):
        for M, K, N in shapes:
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
            w = (torch.randn(N, K, device=dev, generator=g) / K**0.5).to(dtype)
            b = (0.1 * torch.randn(N, device=dev, generator=g)).to(dtype)
            dy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
            ref = eager(*(t.double() for t in (x, w, b)))
            providers = {"fastbert": linear_gelu, "eager": eager, "F.linear": bare_linear}
            if compiled is not None:
                providers["torch.compile"] = compiled
            if check or torch.cuda.get_device_capability()[0] == 9:  # (the interpreter runs the TMA kernel too)
                # Each forward kernel alone ("fastbert" runs whichever its first call timed faster).
                providers["fastbert-portable"] = forced(linear_gelu, "0")
                providers["fastbert-sm90"] = forced(linear_gelu, "1")
            checks = {
                name: harness.check_close(fn(x, w, b), ref, eager(x, w, b), f"{name} {M}x{K}x{N}")
                for name, fn in providers.items()
                if name.startswith("fastbert")
            }
            training = harness.TrainingReference(eager, (x, w, b), dy)
            grad_checks = {name: training.check(providers[name], f"{name} {M}x{K}x{N}") for name in checks}
            for mode, flops in (("fwd", 2 * M * K * N), ("fwd+bwd", 6 * M * K * N)):
                for name, fn in providers.items():
                    if mode == "fwd":
                        with torch.no_grad():
                            t = harness.time_ms(fn, args_list=[(x, w, b)])
                    else:
                        leaves = [t.detach().requires_grad_() for t in (x, w, b)]

                        def step(fn=fn, leaves=leaves, dy=dy):
                            fn(*leaves).backward(dy)

                        t = harness.time_ms(step, grad_to_none=leaves)
                    tflops = flops / t["median_ms"] / 1e9
                    row = {"op": "linear_gelu", "provider": name, "dtype": str(dtype).removeprefix("torch."),
                           "rows": M, "in": K, "out": N, "mode": mode, **t, "tflops": tflops}  # fmt: skip
                    if name in checks:
                        ok, err, eager_err = checks[name]
                        row |= {"check_ok": ok, "err": err, "eager_err": eager_err}
                        if mode == "fwd+bwd":
                            row["grad_check_ok"] = grad_checks[name]
                    rows.append(row)
                    checked = "" if "check_ok" not in row else "  check " + ("ok" if row["check_ok"] else "FAILED")
                    if "grad_check_ok" in row:
                        checked += ", gradients " + ("ok" if row["grad_check_ok"] else "FAILED")
                    print(f"{row['dtype']:9s} {M:6d}x{K:<5d}->{N:<5d} {mode:8s} {name:17s} "
                          f"{t['median_ms']:8.4f} ms {tflops:7.1f} TFLOP/s{checked}")  # fmt: skip
    cols = ["dtype", "rows", "in", "out", "mode", "provider", "median_ms", "tflops", "check_ok", "grad_check_ok"]
    harness.write_results("linear_gelu", rows, args.out, cols)
    targets(rows)
    return harness.exit_status(rows)


def targets(rows: list[dict]) -> None:
    """Print the issue's H100 targets beside the measured speed-ups (time of the other / time of fastbert)."""

    def get(provider, mode, key):
        return next((r for r in rows if (r["provider"], r["mode"], r["dtype"], r["rows"], r["in"]) == (provider, mode,
                     *key)), None)  # fmt: skip

    goals = [("fwd", "eager", 1.15), ("fwd", "torch.compile", 1.0), ("fwd", "F.linear", 0.90),
             ("fwd+bwd", "eager", 1.10)]  # fmt: skip
    for r in (r for r in rows if r["provider"] == "fastbert"):
        key = (r["dtype"], r["rows"], r["in"])
        for mode, other, goal in goals:
            o = get(other, mode, key)
            if r["mode"] != mode or o is None:
                continue
            ratio = o["median_ms"] / r["median_ms"]
            print(f"target {mode:8s} {key[0]:9s} {key[1]:6d}x{key[2]:<5d} vs {other:14s} >= {goal:.2f}x: "
                  f"{ratio:.2f}x ({'met' if ratio >= goal else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
