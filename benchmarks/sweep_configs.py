# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""Tile-config sweep of the GEMM and attention (forward; dk/dv and dq) kernels on a GPU (a tuning aid, not a
benchmark result): each candidate launched directly (bypassing the autotuner), timed with CUDA events, with its
registers and spills from the compiled kernel, beside the cuBLAS / SDPA floor where there is one.

    python benchmarks/sweep_configs.py
"""

from __future__ import annotations

import functools
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from fastbert.kernels.common import FP_FUSION  # noqa: E402  (what the launchers pass: the gate's compile)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_linear_gelu() -> None:
    """The portable kernel's tiles, then (on sm_90) the TMA kernel's, each launched directly; M = 128 too (BERT at
    batch 1: few tiles)."""
    import torch.nn.functional as F

    from fastbert.kernels import linear_gelu as lg
    from fastbert.kernels import linear_gelu_sm90 as lg90
    from fastbert.kernels.common import sm_count

    kern = lg._linear_gelu_fwd_kernel.fn
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, epilogue in halves); the shipped HALF_CONFIGS among them
    cands = [
        (128, 128, 64, 8, 4, False),
        (128, 128, 64, 4, 4, False),
        (128, 128, 64, 8, 3, False),
        (128, 128, 64, 8, 3, True),
        (128, 256, 64, 8, 3, True),
        (256, 128, 64, 8, 3, False),
        (128, 256, 64, 8, 4, True),
        (64, 256, 64, 4, 4, True),
        (128, 128, 32, 4, 5, False),
        (128, 64, 64, 4, 4, False),
        (64, 128, 64, 4, 4, False),
        (64, 64, 64, 4, 4, False),
        (128, 128, 64, 8, 5, False),
        (128, 256, 32, 8, 4, True),
    ]
    # TMA kernel: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, halves, programs an SM, maxnreg); the shipped first
    cands90 = [
        (
            c.kwargs["BLOCK_M"],
            c.kwargs["BLOCK_N"],
            c.kwargs["BLOCK_K"],
            c.num_warps,
            c.num_stages,
            c.kwargs["EPILOGUE_HALVES"],
            c.kwargs["PROGRAMS_PER_SM"],
            c.maxnreg,
        )
        for c in lg90.CONFIGS
    ]
    cands90 += [
        (128, 128, 64, 8, 2, True, 2, 128),
        (128, 128, 64, 8, 3, True, 1, None),
        (64, 128, 64, 4, 4, False, 2, None),
    ]
    hopper = torch.cuda.get_device_capability()[0] == 9
    sms = sm_count(torch.cuda.current_device())
    for M, K in ((16384, 768), (16384, 1024), (4096, 768), (128, 768)):
        N = 4 * K
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K**0.5
        b = torch.randn(N, device="cuda", dtype=torch.float16)
        y = torch.empty(M, N, device="cuda", dtype=torch.float16)
        floor = bench(lambda: F.linear(x, w, b))
        print(f"linear_gelu fp16 {M}x{K}->{N}: F.linear+bias {floor:.4f} ms "
              f"({2 * M * N * K / floor / 1e9:.0f} TFLOP/s)")  # fmt: skip

        def report(label, run, store):
            try:
                k = run()
                ms = bench(run)
                print(f"  {label} store={int(store)}  {ms:.4f} ms  {2 * M * N * K / ms / 1e9:5.0f} TFLOP/s  "
                      f"{ms / floor:5.2f}x floor  regs {k.n_regs} spills {k.n_spills}", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
                print(f"  {label}: {type(e).__name__}: {str(e)[:100]}")

        for bm, bn, bk, nw, ns, halves in cands:
            for store in (False, True):
                h = torch.empty_like(y)
                grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)

                run = functools.partial(
                    kern[grid], x, w, b, y, h, M, N, K, K, K, 8192, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                    APPROX=0, STORE_PREACT=store, INPUT_PRECISION="tf32", EPILOGUE_HALVES=halves, num_warps=nw,
                    num_stages=ns, enable_fp_fusion=FP_FUSION,
                )  # fmt: skip
                report(f"{bm:3d}x{bn:3d}x{bk:2d} w{nw} s{ns}{' halves' if halves else ''}", run, store)
        if not hopper:
            continue
        from triton.tools.tensor_descriptor import TensorDescriptor

        kern90 = lg90._linear_gelu_fwd_sm90_kernel.fn
        for bm, bn, bk, nw, ns, halves, per_sm, maxnreg in cands90:
            x_desc = TensorDescriptor(x, [M, K], [K, 1], [bm, bk])
            w_desc = TensorDescriptor(w, [N, K], [K, 1], [bn, bk])
            grid = (min(sms * per_sm, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
            for store in (False, True):
                h = torch.empty_like(y)

                run = functools.partial(
                    kern90[grid], x_desc, w_desc, b, y, h, M, N, K, 8192, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    GROUP_M=8, APPROX=0, STORE_PREACT=store, EPILOGUE_HALVES=halves, PROGRAMS_PER_SM=per_sm,
                    num_warps=nw, num_stages=ns, maxnreg=maxnreg, enable_fp_fusion=FP_FUSION,
                )  # fmt: skip

                label = f"sm90 {bm:3d}x{bn:3d}x{bk:2d} w{nw} s{ns}{' halves' if halves else ''} p{per_sm}"
                report(label + (f" maxnreg {maxnreg}" if maxnreg else ""), run, store)


# Tiles that compile without spills with dropout on sm_90 (fp16, head_dim 64; some alternatives spill on sm_80,
# e.g. dq 64x32 w4): the shipped choice first (fewest SASS instructions per score), then the alternatives. The
# sweep prints each one's registers and spills.
# (The shipped tiles before 2026-12-02's change to 3 stages run beside them: see attention._FWD_CONFIGS.)
DROPOUT_FWD_CANDIDATES = ((128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2))
# (dq and dk/dv read the backward's packed mask since 2026-12-02: dk/dv's shipped tile runs 1 stage)
DROPOUT_DKDV_CANDIDATES = ((32, 128, 8, 1), (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (32, 64, 4, 2))
DROPOUT_DQ_CANDIDATES = ((128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2))


def _dropout_args(p: float) -> tuple:
    """(threshold, scale, seed_ptr) the attention forward takes for dropout probability p: seed_ptr an int64 [1]
    CUDA tensor holding a dropout seed (kernels.common.seed_arg)."""
    from fastbert.kernels.attention_dropout import DROPOUT_BITS
    from fastbert.kernels.common import dropout_threshold, philox_seed

    seed = torch.full((1,), philox_seed(0), dtype=torch.int64, device="cuda")
    return dropout_threshold(p, DROPOUT_BITS.value), 1.0 / (1.0 - p), seed


def sweep_attention() -> None:
    import torch.nn.functional as F

    from fastbert.kernels import attention as at

    kern = at._attention_fwd_kernel
    B, H, D = 32, 12, 64
    cands = [
        (bm, bn, w, s)
        for bm, bn, w, s in (
            (128, 64, 8, 2),
            (128, 64, 4, 2),
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 32, 4, 3),
            (64, 32, 4, 2),
            (128, 64, 4, 4),
        )
    ]
    for S in (128, 512, 1024):
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(3))
        lens = torch.randint(S // 4, S + 1, (B,), device="cuda")
        mask = at.key_bias(torch.arange(S, device="cuda")[None, :] < lens[:, None], S)
        flops = 4 * B * H * S * S * D
        floor = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"attention fp16 B{B} H{H} S{S} D{D}: SDPA (no mask) {floor:.4f} ms ({flops / floor / 1e9:.0f} TFLOP/s)")
        o = torch.empty_like(q)
        lse = torch.empty(B * H * S, device="cuda", dtype=torch.float32)
        cu = torch.zeros(1, dtype=torch.int32, device="cuda")
        # Dropout (training: p = 0.1) only at 512, on the tiles that compile without spills with it.
        runs = [(c, masked, False) for c in cands for masked in (False, True)]
        if S == 512:
            runs += [(c, False, True) for c in DROPOUT_FWD_CANDIDATES]
        for (bm, bn, nw, ns), masked, drop in runs:

            def run(bm=bm, bn=bn, nw=nw, ns=ns, masked=masked, drop=drop):
                grid = (triton.cdiv(S, bm), B * H)
                return kern[grid](
                    q, k, v, o, lse, mask, cu, *at._strides(q), *at._strides(k), *at._strides(v),
                    *at._strides(o), mask.stride(0), S, S, H, D, D**-0.5 * at.LOG2E, 0, int(masked),
                    *_dropout_args(0.1 if drop else 0.0), BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_D=64, HAS_DROPOUT=drop, EVEN_D=True, num_warps=nw, num_stages=ns,
                    enable_fp_fusion=FP_FUSION)  # fmt: skip

            try:
                kk = run()
                ms = bench(run)
                print(f"  {bm:3d}x{bn:3d} w{nw} s{ns} mask={int(masked)} dropout={int(drop)}  {ms:.4f} ms  "
                      f"{flops / ms / 1e9:5.0f} TFLOP/s (all tokens)  regs {kk.n_regs} spills {kk.n_spills}",
                      flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                print(f"  {bm}x{bn} w{nw} s{ns}: {type(e).__name__}: {str(e)[:100]}")


def sweep_attention_bwd() -> None:
    """dk/dv and dq kernels of the backward, each config timed alone (BERT-base heads, fp16, with a padding mask),
    after the forward and the preprocess kernel made lse and delta."""
    from fastbert.kernels import attention as at
    from fastbert.kernels import attention_bwd as ab

    dkdv, dq = ab._attention_bwd_dkdv_kernel, ab._attention_bwd_dq_kernel
    B, H, D = 32, 12, 64
    dkdv_cands = ((32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                  (32, 128, 4, 3))  # fmt: skip
    dq_cands = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2))
    for S in (128, 512):
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(4))
        lens = torch.randint(S // 4, S + 1, (B,), device="cuda")
        mask = at.key_bias(torch.arange(S, device="cuda")[None, :] < lens[:, None], S)
        out, lse = at.attention_fwd(q, k, v, mask)
        _, _, _ = ab.attention_bwd(do, q, k, v, out, lse, mask)  # compiles and warms the shipped configs
        delta = torch.empty_like(lse)
        lay = at._Layout(q, k, None, 0, mask)
        ab._attention_bwd_preprocess_kernel[(triton.cdiv(S, ab._PREPROCESS_BLOCK_M), B * H)](
            out, do, delta, lay.cu, *at._strides(out), *at._strides(do), S, S, H, D, 0,
            BLOCK_M=ab._PREPROCESS_BLOCK_M, BLOCK_D=64, EVEN_D=True, num_warps=ab._PREPROCESS_WARPS,
            enable_fp_fusion=FP_FUSION)  # fmt: skip
        dq_t, dk_t, dv_t = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (*at._strides(q), *at._strides(k), *at._strides(v), *at._strides(do))
        print(f"attention bwd fp16 B{B} H{H} S{S} D{D}, with a padding mask")
        runs = [(name, kern, c, False) for name, kern, cands in (("dkdv", dkdv, dkdv_cands), ("dq", dq, dq_cands))
                for c in cands]  # fmt: skip
        if S == 512:  # dropout (p = 0.1), as in training: dq and dk/dv read the mask the backward packs first
            runs += [("dkdv", dkdv, c, True) for c in DROPOUT_DKDV_CANDIDATES]
            runs += [("dq", dq, c, True) for c in DROPOUT_DQ_CANDIDATES]
            threshold, _, seed = _dropout_args(0.1)
            bits = torch.empty((B * H, S, triton.cdiv(S, 32) * 4), device="cuda", dtype=torch.uint8)
            pack = lambda: ab.pack_dropout_mask(lay, bits, threshold, seed, 0, B * H)  # noqa: E731
            pack()
            print(f"  packed dropout mask ({bits.numel() / 2**20:.1f} MiB)  {bench(pack):.4f} ms", flush=True)
        for name, kern, (bm, bn, nw, ns), drop in runs:
            p = 0.1 if drop else 0.0
            flags = (*lay.bwd_flags(p, bits if drop else ab.placeholder(q.device, torch.uint8)), 0)

            def run(bm=bm, bn=bn, nw=nw, ns=ns, name=name, kern=kern, flags=flags, drop=drop):
                if name == "dkdv":
                    return kern[(triton.cdiv(S, bn), B * H)](
                        q, k, v, do, dk_t, dv_t, lse, delta, mask, lay.cu, *common, *at._strides(dk_t),
                        *at._strides(dv_t), mask.stride(0), S, S, H, D, D**-0.5, D**-0.5 * at.LOG2E, *flags,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, HAS_DROPOUT=drop, EVEN_D=True, num_warps=nw,
                        num_stages=ns, enable_fp_fusion=FP_FUSION)  # fmt: skip
                return kern[(triton.cdiv(S, bm), B * H)](
                    q, k, v, do, dq_t, lse, delta, mask, lay.cu, *common, *at._strides(dq_t), mask.stride(0),
                    S, S, H, D, D**-0.5, D**-0.5 * at.LOG2E, *flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64,
                    HAS_DROPOUT=drop, EVEN_D=True, num_warps=nw, num_stages=ns, enable_fp_fusion=FP_FUSION)  # fmt: skip

            try:
                kk = run()
                ms = bench(run)
                print(f"  {name:4s} {bm:3d}x{bn:3d} w{nw} s{ns} dropout={int(drop)}  {ms:.4f} ms  regs {kk.n_regs} "
                      f"spills {kk.n_spills}", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                print(f"  {name} {bm}x{bn} w{nw} s{ns}: {type(e).__name__}: {str(e)[:100]}")


if __name__ == "__main__":
    harness.no_cuda_exit("sweep_configs")
    print(harness.header())
    which = sys.argv[1:] or ["linear_gelu", "attention", "attention_bwd"]
    if "linear_gelu" in which:
        sweep_linear_gelu()
    if "attention" in which:
        sweep_attention()
    if "attention_bwd" in which:
        sweep_attention_bwd()
