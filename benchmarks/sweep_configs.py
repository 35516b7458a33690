# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""Tile-config sweep of the GEMM and attention (forward; dk/dv and dq) kernels on a GPU (a tuning aid, not a
benchmark result): each candidate launched directly (bypassing the autotuner), its output checked against the
shipped launcher's (or eager PyTorch's) first, then timed with CUDA events, with its registers and spills from
the compiled kernel, beside the cuBLAS / SDPA floor where there is one.

    python benchmarks/sweep_configs.py [linear_gelu] [attention] [attention_bwd]
    python benchmarks/sweep_configs.py --check    # no GPU: every candidate's launch, at small shapes, in Triton's
                                                  # interpreter, checked and not timed (CI runs it)

A candidate that computes a wrong result prints WRONG and is not timed (under --check it fails the run): the
launches here pass every kernel argument by hand, and a kernel's signature may move on without them.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys

CHECK = "--check" in sys.argv
if CHECK:  # before Triton and the kernels are imported: they choose the interpreter then
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from fastbert.kernels.common import FP_FUSION  # noqa: E402  (what the launchers pass: the gate's compile)

DEVICE = "cpu" if CHECK else "cuda"


def bench(fn) -> float:
    if CHECK:
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def wrong(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-2) -> str:
    """'' when got matches want (to tol of want's largest magnitude: tiles differ in summation order only), else
    what is wrong; got was poisoned with NaN before the launch, so an unwritten element shows."""
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if err <= tol * scale + 1e-3:  # (NaN compares false)
        return ""
    return f"WRONG: max error {err:.3g} against a largest value of {scale:.3g}"


def poison(*outputs: torch.Tensor):
    """A function that fills the outputs with NaN (before a candidate's checked run; never inside a timed one)."""
    return lambda: [t.fill_(float("nan")) for t in outputs]


def report(label: str, run, check, fill, flops: float | None = None, floor: float | None = None) -> None:
    """Poison the outputs (fill()), run a candidate once, check its output (check() returns '' or what is wrong),
    then time run() alone. A config that does not compile or launch is a result too (on a GPU); under --check
    every candidate must run and match."""
    try:
        fill()
        k = run()
        problem = check()
    except Exception as e:  # noqa: BLE001
        if CHECK:
            raise
        print(f"  {label}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return
    if problem:
        if CHECK:
            raise AssertionError(f"{label}: {problem}")
        print(f"  {label}: {problem} (not timed)", flush=True)
        return
    if CHECK:
        print(f"  {label}  ok (checked, not timed)", flush=True)
        return
    ms = bench(run)
    rate = f"  {flops / ms / 1e9:5.0f} TFLOP/s" if flops else ""
    vs = f"  {ms / floor:5.2f}x floor" if floor else ""
    regs = f"  regs {k.n_regs} spills {k.n_spills}" if hasattr(k, "n_regs") else ""
    print(f"  {label}  {ms:.4f} ms{rate}{vs}{regs}  ok", flush=True)


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
    # (the interpreter runs the TMA kernel too; --check: a small grid, so that programs loop over tiles)
    hopper = CHECK or torch.cuda.get_device_capability()[0] == 9
    sms = 2 if CHECK else sm_count(torch.cuda.current_device())
    # (--check: rows not a multiple of any block, two N tiles of the widest)
    shapes = ((130, 64),) if CHECK else ((16384, 768), (16384, 1024), (4096, 768), (128, 768))
    for M, K in shapes:
        N = 4 * K
        x = torch.randn(M, K, device=DEVICE, dtype=torch.float16)
        w = torch.randn(N, K, device=DEVICE, dtype=torch.float16) / K**0.5
        b = torch.randn(N, device=DEVICE, dtype=torch.float16)
        y = torch.empty(M, N, device=DEVICE, dtype=torch.float16)
        h = torch.empty_like(y)
        pre = F.linear(x.float(), w.float(), b.float())
        want = F.gelu(pre)
        floor = bench(lambda: F.linear(x, w, b))
        print(f"linear_gelu fp16 {M}x{K}->{N}: F.linear+bias {floor:.4f} ms "
              f"({2 * M * N * K / floor / 1e9:.0f} TFLOP/s)")  # fmt: skip

        def check(store):
            return wrong(y, want) or (wrong(h, pre) if store else "")

        def launch(run, store):
            return run, functools.partial(check, store), poison(y, h)

        for bm, bn, bk, nw, ns, halves in cands:
            for store in (False, True):
                grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)

                run = functools.partial(
                    kern[grid], x, w, b, y, h, M, N, K, K, K, 8192, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                    APPROX=0, STORE_PREACT=store, INPUT_PRECISION="tf32", EPILOGUE_HALVES=halves, num_warps=nw,
                    num_stages=ns, enable_fp_fusion=FP_FUSION,
                )  # fmt: skip
                label = f"{bm:3d}x{bn:3d}x{bk:2d} w{nw} s{ns}{' halves' if halves else ''} store={int(store)}"
                report(label, *launch(run, store), 2 * M * N * K, floor)
        if not hopper:
            continue
        from triton.tools.tensor_descriptor import TensorDescriptor

        kern90 = lg90._linear_gelu_fwd_sm90_kernel.fn
        for bm, bn, bk, nw, ns, halves, per_sm, maxnreg in cands90:
            x_desc = TensorDescriptor(x, [M, K], [K, 1], [bm, bk])
            w_desc = TensorDescriptor(w, [N, K], [K, 1], [bn, bk])
            grid = (min(sms * per_sm, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
            for store in (False, True):
                run = functools.partial(
                    kern90[grid], x_desc, w_desc, b, y, h, M, N, K, 8192, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    GROUP_M=8, APPROX=0, STORE_PREACT=store, EPILOGUE_HALVES=halves, PROGRAMS_PER_SM=per_sm,
                    num_warps=nw, num_stages=ns, maxnreg=maxnreg, enable_fp_fusion=FP_FUSION,
                )  # fmt: skip

                label = f"sm90 {bm:3d}x{bn:3d}x{bk:2d} w{nw} s{ns}{' halves' if halves else ''} p{per_sm}"
                label += (f" maxnreg {maxnreg}" if maxnreg else "") + f" store={int(store)}"
                report(label, *launch(run, store), 2 * M * N * K, floor)


# Tiles that compile without spills with dropout on sm_90 (fp16, head_dim 64; some alternatives spill on sm_80,
# e.g. dq 64x32 w4): the shipped choice first (fewest SASS instructions per score), then the alternatives. The
# sweep prints each one's registers and spills.
# (The shipped tiles before 2026-12-02's change to 3 stages run beside them: see attention._FWD_CONFIGS.)
DROPOUT_FWD_CANDIDATES = ((128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2))
# (dq and dk/dv read the backward's packed mask since 2026-12-02: dk/dv's shipped tile runs 1 stage)
DROPOUT_DKDV_CANDIDATES = ((32, 128, 8, 1), (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (32, 64, 4, 2))
DROPOUT_DQ_CANDIDATES = ((128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2))


def _dropout_args(p: float) -> tuple:
    """(threshold, scale, seed_ptr) the attention kernels take for dropout probability p: seed_ptr an int64 [1]
    tensor holding a dropout seed (kernels.common.seed_arg)."""
    from fastbert.kernels.attention_dropout import DROPOUT_BITS
    from fastbert.kernels.common import dropout_threshold, philox_seed

    seed = torch.full((1,), philox_seed(0), dtype=torch.int64, device=DEVICE)
    return dropout_threshold(p, DROPOUT_BITS.value), 1.0 / (1.0 - p), seed


# (batch, heads), the forward's and the backward's sequence lengths, and the length with dropout: BERT-base's heads
# (fp16, head_dim 64); --check: two of each (a swapped batch / head index shows) at a length that is no multiple
# of a block
ATTENTION_SHAPES = ((2, 2), (70,), (70,), 70) if CHECK else ((32, 12), (128, 512, 1024), (128, 512), 512)


def _attention_inputs(at, B, H, S, D):
    """q, k, v, do as transformers hands them ([B, H, S, D] views of [B, S, H, D]) and the key bias of a padding
    mask with lengths uniform in [S/4, S]."""
    q, k, v, do = (torch.randn(B, S, H, D, device=DEVICE, dtype=torch.float16).transpose(1, 2) for _ in range(4))
    lens = torch.randint(S // 4, S + 1, (B,), device=DEVICE)
    mask = at.key_bias(torch.arange(S, device=DEVICE)[None, :] < lens[:, None], S)
    return q, k, v, do, mask


def sweep_attention() -> None:
    import torch.nn.functional as F

    from fastbert.kernels import attention as at

    kern = at._attention_fwd_kernel
    (B, H), seqs, _, dropout_seq = ATTENTION_SHAPES
    D = 64
    cands = (
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
    for S in seqs:
        q, k, v, _, mask = _attention_inputs(at, B, H, S, D)
        flops = 4 * B * H * S * S * D
        floor = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"attention fp16 B{B} H{H} S{S} D{D}: SDPA (no mask) {floor:.4f} ms ({flops / floor / 1e9:.0f} TFLOP/s)")
        o = torch.empty_like(q)
        lse = torch.empty(B * H * S, device=DEVICE, dtype=torch.float32)
        cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        # Dropout (training: p = 0.1) at one length, on the tiles that compile without spills with it.
        runs = [(c, masked, False) for c in cands for masked in (False, True)]
        if S == dropout_seq:
            runs += [(c, False, True) for c in DROPOUT_FWD_CANDIDATES]
        # what each candidate must match: the shipped launcher's output for the same mask and dropout seed
        dropout = {False: _dropout_args(0.0), True: _dropout_args(0.1)}
        wants = {(masked, drop): at.attention_fwd(q, k, v, mask if masked else None, dropout_p=0.1 if drop else 0.0,
                                                  seed=dropout[True][2] if drop else None)  # fmt: skip
                 for masked, drop in {(masked, drop) for _, masked, drop in runs}}  # fmt: skip
        for (bm, bn, nw, ns), masked, drop in runs:

            def run(bm=bm, bn=bn, nw=nw, ns=ns, masked=masked, drop=drop):
                return kern[(triton.cdiv(S, bm), B * H)](
                    q, k, v, o, lse, mask, cu, *at._strides(q), *at._strides(k), *at._strides(v),
                    *at._strides(o), mask.stride(0), S, S, H, D, D**-0.5 * at.LOG2E, 0, int(masked), *dropout[drop], 0,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, HAS_DROPOUT=drop, EVEN_D=True, num_warps=nw,
                    num_stages=ns, enable_fp_fusion=FP_FUSION)  # fmt: skip

            def check(want=wants[masked, drop]):
                return wrong(o, want[0]) or wrong(lse, want[1], tol=1e-4)  # (lse: fp32 on both sides)

            label = f"{bm:3d}x{bn:3d} w{nw} s{ns} mask={int(masked)} dropout={int(drop)}"
            report(label, run, check, poison(o, lse), flops)  # (TFLOP/s over all tokens)


def sweep_attention_bwd() -> None:
    """dk/dv and dq kernels of the backward, each config timed alone (BERT-base heads, fp16, with a padding mask),
    after the forward and the preprocess kernel made lse and delta."""
    from fastbert.kernels import attention as at
    from fastbert.kernels import attention_bwd as ab

    dkdv, dq = ab._attention_bwd_dkdv_kernel, ab._attention_bwd_dq_kernel
    (B, H), _, seqs, dropout_seq = ATTENTION_SHAPES
    D = 64
    dkdv_cands = ((32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 1), (32, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                  (32, 128, 4, 3))  # fmt: skip
    dq_cands = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2))
    for S in seqs:
        q, k, v, do, mask = _attention_inputs(at, B, H, S, D)
        out, lse = at.attention_fwd(q, k, v, mask)
        threshold, scale, seed = _dropout_args(0.1)
        # what each candidate must match: the shipped backward's gradients, with and without dropout (the same out
        # and lse, so the same delta); this also compiles and warms the shipped configs
        wants = {drop: ab.attention_bwd(do, q, k, v, out, lse, mask, dropout_p=0.1 if drop else 0.0,
                                        seed=seed if drop else None) for drop in {False, S == dropout_seq}}  # fmt: skip
        delta = torch.empty_like(lse)
        lay = at._Layout(q, k, None, 0, mask)
        ab._attention_bwd_preprocess_kernel[(triton.cdiv(S, ab._PREPROCESS_BLOCK_M), B * H)](
            out, do, delta, lay.cu, *at._strides(out), *at._strides(do), S, S, H, D, 0, 0,
            BLOCK_M=ab._PREPROCESS_BLOCK_M, BLOCK_D=64, EVEN_D=True, num_warps=ab._PREPROCESS_WARPS,
            enable_fp_fusion=FP_FUSION)  # fmt: skip
        dq_t, dk_t, dv_t = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (*at._strides(q), *at._strides(k), *at._strides(v), *at._strides(do))
        print(f"attention bwd fp16 B{B} H{H} S{S} D{D}, with a padding mask")
        runs = [(name, kern, c, False) for name, kern, cands in (("dkdv", dkdv, dkdv_cands), ("dq", dq, dq_cands))
                for c in cands]  # fmt: skip
        bits = torch.empty((B * H, S, triton.cdiv(S, 32) * 4), device=DEVICE, dtype=torch.uint8)
        if S == dropout_seq:  # dropout (p = 0.1), as in training: dq and dk/dv read the mask the backward packs first
            runs += [("dkdv", dkdv, c, True) for c in DROPOUT_DKDV_CANDIDATES]
            runs += [("dq", dq, c, True) for c in DROPOUT_DQ_CANDIDATES]
            pack = lambda: ab.pack_dropout_mask(lay, bits, threshold, seed, 0, B * H)  # noqa: E731
            pack()
            print(f"  packed dropout mask ({bits.numel() / 2**20:.1f} MiB)  {bench(pack):.4f} ms", flush=True)
        for name, kern, (bm, bn, nw, ns), drop in runs:
            flags = (*lay.bwd_flags(0.1 if drop else 0.0, bits if drop else ab.placeholder(q.device, torch.uint8)), 0)

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

            def check(name=name, want=wants[drop]):
                if name == "dkdv":
                    return wrong(dk_t, want[1]) or wrong(dv_t, want[2])
                return wrong(dq_t, want[0])

            report(f"{name:4s} {bm:3d}x{bn:3d} w{nw} s{ns} dropout={int(drop)}", run, check, poison(dq_t, dk_t, dv_t))


if __name__ == "__main__":
    if not CHECK:
        harness.no_cuda_exit("sweep_configs")
    torch.manual_seed(0)  # (the inputs: a failure can be run again)
    print(harness.header())
    which = [a for a in sys.argv[1:] if a != "--check"] or ["linear_gelu", "attention", "attention_bwd"]
    if "linear_gelu" in which:
        sweep_linear_gelu()
    if "attention" in which:
        sweep_attention()
    if "attention_bwd" in which:
        sweep_attention_bwd()
