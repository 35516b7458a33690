"""Fused dropout + residual add + LayerNorm: ``y = LayerNorm(dropout(x) + residual) * weight + bias``.

What BERT's ``BertSelfOutput`` / ``BertOutput`` do after their dense layer, in one pass over each row:

    s    = dropout_p(x) + residual                 (dropout keep-mask from Philox(seed, row * N + col))
    mean = sum(s) / N,  rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)     (fp32)
    y    = (s - mean) * rstd * weight + bias

Eager PyTorch reads and writes the [M, N] activations once for the dropout, once for the add and once for the
LayerNorm (about 8·M·N elements moved); the fused forward reads x and residual and writes y (3·M·N).

Backward, with x̂ = (s - mean) · rstd and g = weight · dy:

    ds        = rstd · (g - mean(g) - x̂ · mean(g · x̂))      (row means over N)
    dresidual = ds,   dx = ds · keep / (1 - p)
    dweight   = Σ_rows dy · x̂,   dbias = Σ_rows dy

The backward recomputes s from x and residual (and the dropout mask from the seed) instead of storing it when
both have one dtype: in a model x is then kept only for this backward and residual is kept anyway (it is the
next Linear's saved input), so storing s would take as much memory and an extra write. Under autocast x is half
and residual the fp32 residual stream, which nothing else keeps (the Linears keep their half casts): there the
training forward also writes s in fp32 (STORE_SUM) and the backward reads it alone (SAVED_SUM), 4 bytes an
element kept instead of 6, and exactly the s that the forward normalised.
dweight / dbias are reduced deterministically: each persistent program sums its rows into its own fp32 row of a
partial buffer, and the launcher sums the partials (no atomics).

Limits: the row must fit in one block (N <= MAX_HIDDEN); statistics are fp32 whatever the input dtype.

Specialisation: no integer argument is specialised by Triton's launcher (do_not_specialize), and every pointer
is 16-byte aligned (fresh outputs; inputs copied otherwise), so each launch compiles one of exactly two
variants per block config, both in the compile gate: ALIGNED (N and the row strides multiples of 16, as every
BERT width: the kernel then tells the compiler so, and rows load 16 bytes a thread) or not (any N).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import triton
import triton.language as tl

from fastbert.kernels.common import (
    FP_FUSION,
    GateCase,
    aligned_base,
    cdiv,
    dropout_keep,
    dropout_threshold,
    empty,
    load_seed,
    next_power_of_2,
    num_programs_for,
    philox_seed,
    placeholder,
    pointer_args,
    seed_arg,
)

MAX_HIDDEN = 8192
# Past this width the backward kernel runs out of registers if it also holds the dropout mask or the dweight /
# dbias accumulators: wider rows take their dropout from PyTorch (in fastbert.ops) and their dweight / dbias
# from a PyTorch reduction over the recomputed x̂ (in add_layer_norm_bwd). BERT-family models stay below it.
MAX_HIDDEN_DROPOUT = 4096
_MIN_BLOCK_N = 16


# ----------------------------------------------------------------------------------------------- tuning
def fwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernel: whole rows, ~2K elements and 8 per thread a program
    (more spills once Philox is live), up to 16 per thread for the widest rows."""
    block_n = max(_MIN_BLOCK_N, next_power_of_2(n))
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = min(16, max(4, block_m * block_n // 256))
    return block_m, block_n, num_warps


def bwd_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward kernel: more live values per element than the forward (two
    fp32 accumulator rows besides), so smaller tiles: about 4-8 elements per thread (16 for the widest rows,
    which hold no accumulators). Chosen so that the compile gate sees no spill on sm_80 or sm_90: rows of 2048
    and 4096 (the widest that keep accumulators) take 4 elements a thread, as 8 spilled on sm_90 with dropout
    (Triton 3.9's ptxas; 2048 in the unaligned variant)."""
    block_n = max(_MIN_BLOCK_N, next_power_of_2(n))
    block_m = max(1, min(4, 1024 // block_n))
    num_warps = min(16, max(4, block_m * block_n // 256))
    if block_n in (2048, MAX_HIDDEN_DROPOUT):
        num_warps = block_n // 128
    return block_m, block_n, num_warps


# ----------------------------------------------------------------------------------------------- kernels
# Integer arguments stay unspecialised: one compilation per (block config, dtypes, flags, ALIGNED), whatever M,
# N or the strides are (Triton would otherwise compile variants for values equal to 1 or divisible by 16 that
# the compile gate never sees). ALIGNED restores the divisibility where the launcher has checked it.
_RUNTIME_ARGS = ["stride_x_row", "stride_residual_row", "stride_y_row", "stride_dy_row", "M", "N",
                 "tiles_per_program", "dropout_threshold"]  # fmt: skip


@triton.jit
def _multiple_of_16(n, ALIGNED: tl.constexpr):
    """n itself; with ALIGNED (the launcher checked n % 16 == 0) written so that the compiler knows the
    divisibility: then `cols < N` is constant over 16 columns and row starts are 16-element aligned, so loads and
    stores vectorise."""
    if ALIGNED:
        return (n // 16) * 16
    else:
        return n


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _add_layer_norm_fwd_kernel(
    x_ptr,  # [M, N], row stride stride_x_row, unit column stride
    residual_ptr,  # [M, N]; its dtype may differ from x's (autocast: x half, residual fp32)
    weight_ptr,  # [N]
    bias_ptr,  # [N]
    y_ptr,  # [M, N] out, dtype of residual
    mean_ptr,  # [M] out, fp32
    rstd_ptr,  # [M] out, fp32
    s_ptr,  # [M, N] out (contiguous), dtype of residual: s, written iff STORE_SUM
    stride_x_row,
    stride_residual_row,
    stride_y_row,
    M,
    N,
    eps,
    dropout_threshold,  # threshold of the keep-mask's 32-bit draws (see common.dropout_threshold)
    dropout_scale,  # 1 / (1 - p)
    seed_ptr,  # [1] int64, the dropout seed (common.seed_arg), read iff HAS_DROPOUT
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_SUM: tl.constexpr,  # write s for the backward (autocast training, see the module docstring)
    ALIGNED: tl.constexpr,  # N and the row strides are multiples of 16
):
    N = _multiple_of_16(N, ALIGNED)
    stride_x_row = _multiple_of_16(stride_x_row, ALIGNED)
    stride_residual_row = _multiple_of_16(stride_residual_row, ALIGNED)
    stride_y_row = _multiple_of_16(stride_y_row, ALIGNED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + rows64[:, None] * stride_residual_row + cols[None, :], mask=mask, other=0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(load_seed(seed_ptr, HAS_DROPOUT), rows, N, 0, dropout_threshold, BLOCK_M, BLOCK_N)
        x = tl.where(keep, x * dropout_scale, 0.0)
    s = x + r.to(tl.float32)
    if STORE_SUM:
        tl.store(s_ptr + rows64[:, None] * N + cols[None, :], s.to(s_ptr.dtype.element_ty), mask=mask)

    # Correctly rounded divisions (Triton's fp32 `/` is approximate): with a near-zero variance rstd is huge
    # and magnifies any error in a mean; at N = 1 an approximate mean gave dx != 0 on a GPU.
    mean = tl.math.div_rn(tl.sum(s, axis=1), N * 1.0)
    centered = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.math.div_rn(tl.sum(centered * centered, axis=1), N * 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _add_layer_norm_bwd_kernel(
    dy_ptr,  # [M, N] incoming gradient
    x_ptr,  # [M, N] saved input; not read with SAVED_SUM
    residual_ptr,  # [M, N] saved residual; not read with SAVED_SUM
    s_ptr,  # [M, N] (contiguous) s saved by the forward; read iff SAVED_SUM
    weight_ptr,  # [N]
    mean_ptr,  # [M] fp32
    rstd_ptr,  # [M] fp32
    dresidual_ptr,  # [M, N] out (contiguous)
    dx_ptr,  # [M, N] out (contiguous); only written with dropout, otherwise dx == dresidual
    dweight_partial_ptr,  # [num_programs, N] out, fp32
    dbias_partial_ptr,  # [num_programs, N] out, fp32
    stride_dy_row,
    stride_x_row,
    stride_residual_row,
    M,
    N,
    tiles_per_program,
    dropout_threshold,
    dropout_scale,
    seed_ptr,  # [1] int64, the dropout seed, read iff HAS_DROPOUT
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PARAM_GRADS: tl.constexpr,  # accumulate dweight / dbias partials (rows up to MAX_HIDDEN_DROPOUT wide)
    SAVED_SUM: tl.constexpr,  # read s from s_ptr instead of recomputing it from x and residual
    ALIGNED: tl.constexpr,  # N and the row strides are multiples of 16
):
    N = _multiple_of_16(N, ALIGNED)
    stride_dy_row = _multiple_of_16(stride_dy_row, ALIGNED)
    stride_x_row = _multiple_of_16(stride_x_row, ALIGNED)
    stride_residual_row = _multiple_of_16(stride_residual_row, ALIGNED)
    pid = tl.program_id(0)
    seed = load_seed(seed_ptr, HAS_DROPOUT)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # Each program owns a contiguous run of row tiles (tiles past the end are fully masked).
    for i in range(tiles_per_program):
        rows = (pid * tiles_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)

        if SAVED_SUM:
            s = tl.load(s_ptr + rows64[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rows, N, 0, dropout_threshold, BLOCK_M, BLOCK_N)
        else:
            x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            r = tl.load(residual_ptr + rows64[:, None] * stride_residual_row + cols[None, :], mask=mask, other=0.0)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rows, N, 0, dropout_threshold, BLOCK_M, BLOCK_N)
                x = tl.where(keep, x * dropout_scale, 0.0)
            s = x + r.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)

        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        # weight is re-read per tile (it stays in L1/L2) rather than held: at N = 8192 registers are the limit.
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        if BLOCK_N == 16:  # _MIN_BLOCK_N
            # Rows of up to 16: the select keeps dy * w rounded before its row mean is subtracted, as in eager
            # PyTorch. Otherwise the compiler fuses (dy * w - mean_g) into one fma, whose unrounded product rstd
            # (1 / sqrt(eps) = 1e6 for a constant row) magnifies: over a hidden size of 1, where dx is exactly 0
            # (and eager's is), a GPU gave 0.014. Wider rows keep the fma: for them eager's own rounding is
            # magnified alike (the 2x-eager rule covers both), and the unfused product spilled in six variants.
            g = tl.where(mask, g, 0.0)
        mean_g = tl.math.div_rn(tl.sum(g, axis=1), N * 1.0)
        mean_gx = tl.math.div_rn(tl.sum(g * xhat, axis=1), N * 1.0)
        ds = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]

        out_offs = rows64[:, None] * N + cols[None, :]
        tl.store(dresidual_ptr + out_offs, ds.to(dresidual_ptr.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dx = tl.where(keep, ds * dropout_scale, 0.0)
            tl.store(dx_ptr + out_offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if PARAM_GRADS:
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)

    if PARAM_GRADS:
        tl.store(dweight_partial_ptr + pid * N + cols, dw_acc, mask=col_ok)
        tl.store(dbias_partial_ptr + pid * N + cols, db_acc, mask=col_ok)


@triton.jit
def _add_layer_norm_keep_mask_kernel(
    keep_ptr,  # [M, N] out, int8: the dropout keep-mask the kernels above use for this seed
    M,
    N,
    dropout_threshold,
    seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    keep = dropout_keep(seed, rows, N, tl.program_id(1) * BLOCK_N, dropout_threshold, BLOCK_M, BLOCK_N)
    tl.store(keep_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers
def _is_aligned(n: int, *rows: torch.Tensor) -> bool:
    """The ALIGNED flag: N and every row stride a multiple of 16 elements."""
    return n % 16 == 0 and all(r.stride(0) % 16 == 0 for r in rows)


def add_layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    store_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, residual: [M, N] with unit column stride (their dtypes may differ: each is read as it is and the sum is
    fp32). Returns (y [M, N] contiguous in residual's dtype, mean [M] fp32, rstd [M] fp32, s): s = dropout(x) +
    residual [M, N] contiguous in residual's dtype with store_sum (for add_layer_norm_bwd), else None."""
    M, N = x.shape
    y = empty((M, N), device=x.device, dtype=residual.dtype)
    mean = empty((M,), device=x.device, dtype=torch.float32)
    rstd = empty((M,), device=x.device, dtype=torch.float32)
    s = empty((M, N), device=x.device, dtype=residual.dtype) if store_sum else None
    if M == 0:
        return y, mean, rstd, s
    block_m, block_n, num_warps = fwd_config(N)
    x, residual, weight, bias = (aligned_base(t) for t in (x, residual, weight, bias))
    _add_layer_norm_fwd_kernel[(cdiv(M, block_m),)](
        x, residual, weight, bias, y, mean, rstd, y if s is None else s,
        x.stride(0), residual.stride(0), y.stride(0),
        M, N, eps, dropout_threshold(dropout_p, 32), 1.0 / (1.0 - dropout_p),
        seed_arg(seed if dropout_p > 0.0 else None, x.device),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_DROPOUT=dropout_p > 0.0, STORE_SUM=store_sum,
        ALIGNED=_is_aligned(N, x, residual), num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return y, mean, rstd, s


def add_layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of add_layer_norm_fwd. With s (the forward's store_sum result) the kernel reads s alone, and x
    and residual only give the dtypes (they may be empty). Returns (dx, dresidual, dweight, dbias); dx is None
    when there is no dropout, because then it equals dresidual (up to dtype). dx has x's dtype, dresidual
    residual's, dweight and dbias weight's."""
    M, N = (x if s is None else s).shape
    has_dropout = dropout_p > 0.0
    dresidual = empty((M, N), device=x.device, dtype=residual.dtype)
    dx = empty((M, N), device=x.device, dtype=x.dtype) if has_dropout else None
    if M == 0:  # no rows: nothing to launch, zero parameter gradients
        zeros = torch.zeros(N, device=x.device, dtype=weight.dtype)
        return dx, dresidual, zeros, zeros.clone()
    block_m, block_n, num_warps = bwd_config(N)
    tiles = cdiv(M, block_m)
    tiles_per_program = cdiv(tiles, max(1, min(num_programs_for(x.device), tiles)))
    programs = max(1, cdiv(tiles, tiles_per_program))
    param_grads = N <= MAX_HIDDEN_DROPOUT
    dw_partial = empty((programs if param_grads else 1, N), device=x.device, dtype=torch.float32)
    db_partial = empty((programs if param_grads else 1, N), device=x.device, dtype=torch.float32)
    if s is None:
        dy, x, residual, weight = (aligned_base(t) for t in (dy, x, residual, weight))
        aligned = _is_aligned(N, dy, x, residual)
    else:
        # x and residual are not read: only their dtypes matter (the gate's), so placeholders stand in for them
        x, residual = (placeholder(t.device, t.dtype) for t in (x, residual))
        dy, s, weight = (aligned_base(t) for t in (dy, s, weight))
        aligned = _is_aligned(N, dy, s)
    # Without dropout dx is not written; x stands in for it, so that the pointer keeps x's dtype (the gate's).
    _add_layer_norm_bwd_kernel[(programs,)](
        dy, x, residual, residual if s is None else s, weight, mean, rstd,
        dresidual, dx if has_dropout else x, dw_partial, db_partial,
        dy.stride(0), N if s is not None else x.stride(0), N if s is not None else residual.stride(0),
        M, N, tiles_per_program, dropout_threshold(dropout_p, 32), 1.0 / (1.0 - dropout_p),
        seed_arg(seed if has_dropout else None, x.device),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_DROPOUT=has_dropout, PARAM_GRADS=param_grads,
        SAVED_SUM=s is not None, ALIGNED=aligned, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    if not param_grads:
        # Wide rows (see MAX_HIDDEN_DROPOUT): x̂ recomputed and reduced by PyTorch, in fp32, deterministically.
        s32 = x.float() + residual.float() if s is None else s.float()
        xhat = (s32 - mean[:, None]) * rstd[:, None]
        dw_partial, db_partial = (dy.float() * xhat).sum(0, keepdim=True), dy.float().sum(0, keepdim=True)
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype)
    return dx, dresidual, dweight, dbias


def dropout_keep_mask(seed: int, M: int, N: int, dropout_p: float, device: torch.device) -> torch.Tensor:
    """The [M, N] bool keep-mask add_layer_norm applies to x for this seed and p (for tests and debugging)."""
    keep = torch.empty((M, N), device=device, dtype=torch.int8)
    _add_layer_norm_keep_mask_kernel[(cdiv(M, 16), cdiv(N, 64))](
        keep, M, N, dropout_threshold(dropout_p, 32), philox_seed(seed), BLOCK_M=16, BLOCK_N=64,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return keep.bool()


# ----------------------------------------------------------------------------------------------- compile gate
# (x, residual, weight) dtypes compiled by the gate; y has residual's dtype. The public op passes one dtype
# throughout, half activations with fp32 parameters, or autocast's mix (half x from a Linear, fp32 residual stream
# and parameters). fp16 compiles to the same code as bf16 but for the conversion instructions, so the gate
# compiles bf16 and lets it stand for fp16 (GATE_DTYPE_STANDIN, which tests/test_launch_spec.py applies): fp16
# cases would add about a minute to CI's cold gate on 2 cores.
DTYPE_COMBOS = (
    ("fp32", "fp32", "fp32"),
    ("bf16", "bf16", "bf16"),
    ("bf16", "fp32", "fp32"),
    ("bf16", "bf16", "fp32"),
)
GATE_DTYPE_STANDIN = {"*fp16": "*bf16"}


# From this row block up, every 16-bit load of an ALIGNED launch must be a vector load (the gate checks it); in
# narrower blocks some loads (the weight row spread over the program's threads, tiny tiles) have fewer than two
# elements a thread and are legitimately scalar.
_VECTOR_LOADS_FROM = 512


def _widening(xt: str, rt: str) -> bool:
    """Whether the residual's dtype is wider than x's (autocast's half x and fp32 residual): then the training
    forward stores s and the backward reads it (STORE_SUM / SAVED_SUM, see the module docstring)."""
    return xt != "fp32" and rt == "fp32"


def gate_cases() -> list[GateCase]:
    """Every compilation the launchers above may request: each block size up to MAX_HIDDEN, dtypes, dropout,
    ALIGNED or not, and for the widening dtype combination s stored or not. Every pointer is 16-byte aligned
    (see the launchers); no integer is specialised."""
    cases = []
    block_n = _MIN_BLOCK_N
    while block_n <= MAX_HIDDEN:
        for (xt, rt, wt), aligned in itertools.product(DTYPE_COMBOS, (True, False)):
            drops = (False, True) if block_n <= MAX_HIDDEN_DROPOUT else (False,)
            sums = (False, True) if _widening(xt, rt) else (False,)
            for drop, with_sum in itertools.product(drops, sums):
                tag = (f"n{block_n}-{xt}-{rt}-{wt}-drop{int(drop)}{'-sum' if with_sum else ''}"
                       f"{'' if aligned else '-unaligned'}")  # fmt: skip
                bm, bn, nw = fwd_config(block_n)
                cases.append(GateCase(
                    f"add_layer_norm_fwd-{tag}", _add_layer_norm_fwd_kernel,
                    {"x_ptr": f"*{xt}", "residual_ptr": f"*{rt}", "weight_ptr": f"*{wt}", "bias_ptr": f"*{wt}",
                     "y_ptr": f"*{rt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "s_ptr": f"*{rt}",
                     "stride_x_row": "i32", "stride_residual_row": "i32", "stride_y_row": "i32", "M": "i32",
                     "N": "i32", "eps": "fp32", "dropout_threshold": "i32", "dropout_scale": "fp32", "seed_ptr": "*i64",
                     "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HAS_DROPOUT": "constexpr",
                     "STORE_SUM": "constexpr", "ALIGNED": "constexpr"},
                    {"BLOCK_M": bm, "BLOCK_N": bn, "HAS_DROPOUT": drop, "STORE_SUM": with_sum, "ALIGNED": aligned},
                    nw, vector_loads=aligned and block_n >= _VECTOR_LOADS_FROM,
                ))  # fmt: skip
                bm, bn, nw = bwd_config(block_n)
                cases.append(GateCase(
                    f"add_layer_norm_bwd-{tag}", _add_layer_norm_bwd_kernel,
                    {"dy_ptr": f"*{rt}", "x_ptr": f"*{xt}", "residual_ptr": f"*{rt}", "s_ptr": f"*{rt}",
                     "weight_ptr": f"*{wt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dresidual_ptr": f"*{rt}",
                     "dx_ptr": f"*{xt}", "dweight_partial_ptr": "*fp32", "dbias_partial_ptr": "*fp32",
                     "stride_dy_row": "i32", "stride_x_row": "i32", "stride_residual_row": "i32", "M": "i32",
                     "N": "i32", "tiles_per_program": "i32", "dropout_threshold": "i32", "dropout_scale": "fp32",
                     "seed_ptr": "*i64", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "HAS_DROPOUT": "constexpr",
                     "PARAM_GRADS": "constexpr", "SAVED_SUM": "constexpr", "ALIGNED": "constexpr"},
                    {"BLOCK_M": bm, "BLOCK_N": bn, "HAS_DROPOUT": drop, "PARAM_GRADS": bn <= MAX_HIDDEN_DROPOUT,
                     "SAVED_SUM": with_sum, "ALIGNED": aligned}, nw,
                    vector_loads=aligned and block_n >= _VECTOR_LOADS_FROM,
                ))  # fmt: skip
        block_n *= 2
    return [dataclasses.replace(c, divisible=pointer_args(c.signature)) for c in cases]
