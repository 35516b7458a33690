"""Benchmark: fused dropout + residual add + LayerNorm (fastbert) vs eager (`x + r` then F.layer_norm) vs
torch.compile of the same, forward and forward+backward, on one GPU.

Bytes moved (e = element size; parameters are negligible):
  forward           read x, residual; write y                       3·M·N·e
  forward+backward  forward + read dy, x, residual; write dresidual   7·M·N·e   (dx == dresidual without dropout)
GB/s = bytes / time, and the fraction of the device's measured copy bandwidth (read + write).

    python benchmarks/bench_add_layer_norm.py [--quick] [--out DIR] [--no-compile] [--check]

H100 targets: forward >= 85% and forward+backward >= 70% of copy bandwidth at rows 16384 x hidden 768 fp16, and
not slower than torch.compile at any size. Without CUDA it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def eager(x, r, w, b):
    return F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="rows 16384 x hidden 768 only")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<gpu>/)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    harness.add_check_flag(parser)
    args = parser.parse_args()
    dev = harness.start("bench_add_layer_norm", args)
    from fastbert import ops

    check = harness.CHECK  # (no torch.compile; fp16 only: the interpreter holds bf16 as raw bits)
    copy_gbps = float("nan") if check else harness.copy_bandwidth_gbps()
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    compiled = None if args.no_compile or check else torch.compile(eager)
    shapes = [(16384, 768)] if args.quick else [(m, n) for m in (4096, 16384) for n in (384, 768, 1024, 4096)]
    shapes = [(130, 96)] if check else shapes
    rows = []
    for dtype in (torch.float16,) if check else (torch.float16, torch.bfloat16):
        for M, N in shapes:
            e = torch.finfo(dtype).bits // 8
            sets = 2 if check else harness.copies_for_rotation(3 * M * N * e)
            g = torch.Generator(device=dev).manual_seed(0)
            inputs = [tuple(torch.randn(M, N, device=dev, dtype=dtype, generator=g) for _ in range(2))
                      + ((1 + 0.1 * torch.randn(N, device=dev, generator=g)).to(dtype),
                         (0.1 * torch.randn(N, device=dev, generator=g)).to(dtype))
                      for _ in range(sets)]  # fmt: skip
            x, r, w, b = inputs[0]
            dy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
            ref = eager(*(t.double() for t in (x, r, w, b)))
            ok, err, eager_err = harness.check_close(ops.add_layer_norm(x, r, w, b), ref, eager(x, r, w, b))
            grads_ok = harness.TrainingReference(eager, (x, r, w, b), dy).check(ops.add_layer_norm, f"{M}x{N}")
            providers = {"fastbert": ops.add_layer_norm, "eager": eager}
            if compiled is not None:
                providers["torch.compile"] = compiled
            for mode, nbytes in (("fwd", 3 * M * N * e), ("fwd+bwd", 7 * M * N * e)):
                for name, fn in providers.items():
                    if mode == "fwd":
                        with torch.no_grad():
                            t = harness.time_ms(fn, args_list=inputs)
                    else:
                        leaves = [tuple(t.detach().requires_grad_(i < 2) for i, t in enumerate(s)) for s in inputs]

                        def step(*s, fn=fn, dy=dy):
                            fn(*s).backward(dy)

                        t = harness.time_ms(step, args_list=leaves,
                                            grad_to_none=[t for s in leaves for t in s[:2]])  # fmt: skip
                    gbps = nbytes / t["median_ms"] / 1e6
                    row = {"op": "add_layer_norm", "provider": name, "dtype": str(dtype).removeprefix("torch."),
                           "rows": M, "hidden": N, "mode": mode, **t, "gbps": gbps,
                           "frac_copy_bw": gbps / copy_gbps}  # fmt: skip
                    checked = ""
                    if name == "fastbert":
                        row |= {"check_ok": ok, "err": err, "eager_err": eager_err}
                        checked = "  check " + ("ok" if ok else "FAILED")
                        if mode == "fwd+bwd":
                            row["grad_check_ok"] = grads_ok
                            checked += ", gradients " + ("ok" if grads_ok else "FAILED")
                    rows.append(row)
                    print(f"{row['dtype']:9s} {M:6d}x{N:<5d} {mode:8s} {name:14s} {t['median_ms']:8.4f} ms "
                          f"{gbps:7.0f} GB/s  {100 * gbps / copy_gbps:5.1f}% of copy{checked}")  # fmt: skip
    cols = ["dtype", "rows", "hidden", "mode", "provider", "median_ms", "gbps", "frac_copy_bw", "check_ok",
            "grad_check_ok"]  # fmt: skip
    harness.write_results("add_layer_norm", rows, args.out, cols, {"copy_gbps": copy_gbps})
    targets(rows)
    return harness.exit_status(rows)


def targets(rows: list[dict]) -> None:
    """Print the issue's H100 targets beside what was measured."""

    def get(provider, mode, M=16384, N=768, dtype="float16"):
        return next((r for r in rows if (r["provider"], r["mode"], r["rows"], r["hidden"], r["dtype"]) ==
                     (provider, mode, M, N, dtype)), None)  # fmt: skip

    for mode, goal in (("fwd", 0.85), ("fwd+bwd", 0.70)):
        r = get("fastbert", mode)
        if r:
            verdict = "met" if r["frac_copy_bw"] >= goal else "MISSED"
            print(f"target {mode} 16384x768 fp16 >= {goal:.0%} of copy bandwidth: {r['frac_copy_bw']:.1%} ({verdict})")
    slower = [(r["dtype"], r["rows"], r["hidden"], r["mode"]) for r in rows if r["provider"] == "fastbert"
              and (c := get("torch.compile", r["mode"], r["rows"], r["hidden"], r["dtype"]))
              and r["median_ms"] > c["median_ms"]]  # fmt: skip
    if not any(r["provider"] == "torch.compile" for r in rows):
        print("target not slower than torch.compile anywhere: n/a (torch.compile not run)")
        return
    print("target not slower than torch.compile anywhere: " + ("met" if not slower else f"MISSED at {slower}"))


if __name__ == "__main__":
    sys.exit(main())
