# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""Where the time of each fused op goes on a GPU: kernel time (from the profiler) vs wall time (CUDA events) vs
host time per call, plus the host functions that cost most (cProfile). A diagnostic, not a benchmark result.

    python benchmarks/profile_ops.py [--only add_layer_norm,linear_gelu,attention,attention_varlen]

Prints one table row per (op, shape, mode):  events ms | kernels ms | host ms/call | kernels launched. When
host ms/call is close to the events time, the op is bound by Python/launch overhead, not by its kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402


def cases(only: set[str]):
    from fastbert import ops

    dev, dt = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g).requires_grad_(grad)

    if "add_layer_norm" in only:
        for M, N in ((4096, 768), (16384, 1024)):
            x, r = rnd(M, N), rnd(M, N)
            w, b = rnd(N), rnd(N)
            yield f"add_layer_norm {M}x{N}", lambda x=x, r=r, w=w, b=b: ops.add_layer_norm(x, r, w, b), (x, r, w, b)
            yield (
                f"add_layer_norm {M}x{N} p0.1",
                lambda x=x, r=r, w=w, b=b: ops.add_layer_norm(x, r, w, b, dropout_p=0.1),
                (x, r, w, b),
            )
    if "linear_gelu" in only:
        for M, K in ((4096, 768), (16384, 768)):
            x, w, b = rnd(M, K), rnd(4 * K, K), rnd(4 * K)
            yield f"linear_gelu {M}x{K}", lambda x=x, w=w, b=b: ops.linear_gelu(x, w, b), (x, w, b)
    if "attention" in only or "attention_varlen" in only:
        for S in (128, 512):
            B, H, D = 32, 12, 64
            q, k, v = (rnd(B, S, H, D).detach().transpose(1, 2).requires_grad_() for _ in range(3))
            lens = torch.randint(S // 4, S + 1, (B,), device=dev, generator=g)
            mask = torch.arange(S, device=dev)[None, :] < lens[:, None]
            if "attention" in only:
                yield f"attention B{B} S{S} mask", lambda q=q, k=k, v=v, m=mask: ops.attention(q, k, v, m), (q, k, v)
            if "attention_varlen" in only:
                h = rnd(B, S, H * D)
                packed, idx, cu, mx = ops.unpad(h.detach(), mask)
                pq, pk, pv = (packed.view(-1, H, D).clone().requires_grad_() for _ in range(3))
                yield (
                    f"attention_varlen B{B} S{S}",
                    lambda q=pq, k=pk, v=pv, cu=cu, mx=mx: ops.attention_varlen(q, k, v, cu, mx, validate=False),
                    (pq, pk, pv),
                )
                yield (
                    f"unpad+pad B{B} S{S}",
                    lambda h=h, m=mask: ops.pad(ops.unpad(h, m)[0], ops.unpad(h, m)[1], B, S),
                    (h,),
                )


def kernel_ms(fn, iters: int = 10) -> tuple[float, int]:
    """GPU time of the kernels one call launches (sum over the profiler's device events) and their count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_us = sum(e.device_time for e in evs if hasattr(e, "device_time")) or sum(e.cuda_time for e in evs)
    return total_us / iters / 1e3, len(evs) // iters


def host_ms(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t) / iters * 1e3
    torch.cuda.synchronize()
    return host


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="add_layer_norm,linear_gelu,attention,attention_varlen")
    p.add_argument("--cprofile", action="store_true", help="also print the top host functions of each fwd+bwd")
    args = p.parse_args()
    harness.no_cuda_exit("profile_ops")
    print(harness.header())
    rows = []
    for name, fwd, leaves in cases(set(args.only.split(","))):
        fb = harness.forward_backward(fwd, leaves)
        for mode, fn in (("fwd", lambda fwd=fwd: fwd()), ("fwd+bwd", fb)):
            ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
            with ctx:
                fn()
                ev = harness.time_ms(fn)["median_ms"]
                kms, nk = kernel_ms(fn)
                hms = host_ms(fn)
            rows.append((name, mode, ev, kms, hms, nk))
            print(f"{name:32s} {mode:8s} events {ev:8.4f} ms  kernels {kms:8.4f} ms  host {hms:8.4f} ms/call  "
                  f"{nk} kernels", flush=True)  # fmt: skip
            if args.cprofile and mode == "fwd+bwd":
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(20):
                    fn()
                pr.disable()
                torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
                print("\n".join(s.getvalue().splitlines()[4:26]))


if __name__ == "__main__":
    main()
