"""Fused Linear + GELU: ``y = gelu(x @ weight.T + bias)``, what BERT's ``BertIntermediate`` does.

x [M, K], weight [N, K] (nn.Linear layout), bias [N]. Forward, one tiled GEMM with fp32 accumulation (tl.dot:
tensor cores for fp16 / bf16, TF32 or IEEE fp32 for float32 as PyTorch's fp32 matmuls: tf32_matmul) whose
epilogue adds the bias and applies GELU before a single store:

    h = x @ weight.T + bias                                   (fp32 accumulator)
    y = h · Φ(h) = 0.5 · h · (1 + erf(h / √2))                approximate="none"
    y = h · σ(2u),  u = √(2/π) · (h + 0.044715 h³)            approximate="tanh"  (0.5 (1 + tanh u) = σ(2u))

Eager writes h (M·N) and reads it back for the GELU (another M·N read and write): the fused forward saves two
of those three M·N passes, about a third of the traffic of a BERT intermediate layer's output.

Backward, with h saved by the forward (STORE_PREACT, in the input dtype, like eager's saved Linear output):

    dh = dy · gelu'(h)         gelu'(h) = Φ(h) + h · φ(h)   or   σ + 2 h σ (1 - σ) u'   (tanh form, σ = σ(2u))
    dx = dh @ weight,  dweight = dhᵀ @ x,  dbias = Σ_rows dh

dh and per-tile fp32 column sums of it come from one elementwise Triton kernel; the launcher sums the partials
(deterministic, no atomics) and hands the two GEMMs to PyTorch (cuBLAS).

On Hopper, 16-bit forwards have a second kernel, fastbert.kernels.linear_gelu_sm90 (TMA tile loads, persistent
grid, the same epilogue); the launcher times both once per shape and keeps the faster (see _use_sm90).

Save or recompute h: storing it in the forward epilogue costs one M·N write there and one M·N read in the
backward, while recomputing it costs a whole extra GEMM (2·M·N·K FLOPs, a third of the backward's GEMM work) for
the same M·N read of its result. Saving wins, but only when a backward will run: the launcher stores h only when
asked (STORE_PREACT=False at inference, so the forward writes y alone).

A missing bias is a zero vector (one N-element read) rather than a second compiled variant of every GEMM.
Limits: K and N multiples of 8. The kernels state that alignment to the compiler themselves (16-byte aligned
bases, row strides, N and K multiples of 8 elements: vectorised, pipelined loads and stores), so the launchers
copy an input whose base is not 16-byte aligned or whose row stride is not a multiple of 8 elements. No integer
argument is specialised by Triton's launcher (do_not_specialize): every launch compiles one variant per config,
the one the compile gate checks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastbert.kernels.common import (
    FP_FUSION,
    SM90_SHARED_TWO_BLOCKS,
    GateCase,
    aligned_base,
    autotune_pinned,
    cdiv,
    empty,
    interpreting,
    launch_untimed,
    next_power_of_2,
    pointer_args,
)

_APPROX = {"none": 0, "tanh": 1}
_MAX_M_BUCKET = 8192  # rows beyond this tune alike: the grid is large enough either way


# ----------------------------------------------------------------------------------------------- tuning
def _config(bm, bn, bk, warps, stages, group_m=8, halves=None):
    halves = bn >= 256 if halves is None else halves
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "EPILOGUE_HALVES": halves}
    return triton.Config(kwargs,
                         num_warps=warps, num_stages=stages)  # fmt: skip


# fp16 / bf16 on Ampere and Hopper: 64 fp32 accumulators a thread leave room for the GELU epilogue; with 128 a
# thread (128x256 tiles on 8 warps) the whole-tile epilogue spilled once the erf was live, hence the halves.
# Two blocks an SM on sm_90 (at most 113 KiB of shared memory and 128 registers a thread for 8 warps; the gate
# holds them to it): one block's main loop can run while the other's epilogue does (see linear_gelu_sm90).
TWO_BLOCKS_SM90 = (_config(128, 128, 64, 8, 3, halves=True),)
HALF_CONFIGS = (
    _config(128, 128, 64, 8, 4),
    _config(64, 128, 64, 4, 4),
    # The tile Triton's matmul tutorial uses on Hopper, with the epilogue in column halves (whole, it spilled);
    # 230-255 registers in the gate: a candidate for the autotuner to time, not a certain win (not yet measured).
    _config(128, 256, 64, 8, 3),
    # Few rows (BERT at batch 1: 128 tokens): 96 blocks at 3072 features where 128x128 tiles make 24.
    _config(64, 64, 64, 4, 4),
    *TWO_BLOCKS_SM90,
)
# float32 (TF32 or IEEE): not BERT's training dtype; one moderate tile that fits registers in IEEE mode.
FP32_CONFIGS = (_config(64, 64, 32, 4, 3),)
# The interpreter: one small config (autotuning several needs a GPU driver). Blocks >= 16, as GPUs require.
INTERPRETER_CONFIGS = (_config(32, 32, 32, 4, 1, group_m=2),)


def _prune(configs, named_args, **kwargs):
    """fp32 inputs tune over FP32_CONFIGS, half inputs over HALF_CONFIGS; the pinned key (M_BUCKET 0, see
    m_bucket) keeps the first, the default."""
    if interpreting():
        return configs
    half = named_args["x_ptr"].dtype != torch.float32
    wanted = HALF_CONFIGS if half else FP32_CONFIGS
    keep = [c for c in configs if any(c.kwargs == w.kwargs and c.num_warps == w.num_warps for w in wanted)]
    keep = keep or configs
    return keep[:1] if named_args["M_BUCKET"] == 0 else keep


def m_bucket(m: int) -> int:
    """The autotune key for the row count: the next power of two, capped, so varying batch sizes reuse tunings.
    0 while tuning is pinned (common.autotune_pinned): a key of its own, whose autotuners keep their default
    config (the first; their prune functions), so that a shape tuned before is not reused either."""
    if autotune_pinned():
        return 0
    return min(next_power_of_2(max(m, 1)), _MAX_M_BUCKET)


def bwd_config() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the elementwise backward kernel: 16 elements per thread (32 spilled a
    register for fp32 with the tanh form on sm_90)."""
    return 64, 64, 8


# ----------------------------------------------------------------------------------------------- kernels
# Unspecialised integers (see the module docstring): Triton would otherwise compile a variant for each value
# equal to 1 (M = 1, say) or divisible by 16, variants the compile gate never sees.
_RUNTIME_ARGS = ["M", "N", "K", "stride_x_row", "stride_w_row", "stride_dy_row", "M_BUCKET"]


@triton.jit
def _multiple_of_8(n):
    """n itself (the launcher checked n % 8 == 0), written so that the compiler knows the divisibility."""
    return (n // 8) * 8


# Chebyshev fit of erfc (Numerical Recipes, 2nd ed., section 6.2, "erfcc"): for z >= 0,
# erfc(z) = t · exp(-z² + P(t)), t = 1 / (1 + z/2), P a degree-9 polynomial, with a relative error below 1.2e-7
# everywhere (1.04e-7 at most against math.erfc in fp64; tests/test_linear_gelu.py checks the kernel's GELU).
# Coefficients of P from t⁹ down to t⁰.
ERFC_FIT = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
            1.00002368, -1.26551223)  # fmt: skip
_LOG2E = 1.4426950408889634


def erfc_kernel_constants() -> tuple[float, ...]:
    """The literals _half_erfc_parts uses, in its order: W_SCALE, D_SCALE, then Q9 down to Q0.

    The kernel evaluates erfc(z) / 2 = t · 2^(-z²·log2(e) + Q(t)), Q = P·log2(e) - 1: the exponential is an exp2
    (MUFU.EX2) and the ½ rides in Q's constant term, two multiplications less an element. The argument scales
    fold alike: w = |h| · (1/√2) · √log2(e) gives w² = z²·log2(e), and d = 1 + z/2 = 1 + |h| / (2√2).
    They are literals in the kernel, not tl.constexpr globals: Triton compares every global a kernel reads with
    its value at compile time on each launch (~0.35 us each on the development machine; these 13 cost
    linear_gelu's forward ~20% of its host time a call). tests/test_linear_gelu.py checks the literals against this."""
    q = tuple(c * _LOG2E - (1.0 if i == len(ERFC_FIT) - 1 else 0.0) for i, c in enumerate(ERFC_FIT))
    return (0.7071067811865476 * _LOG2E**0.5, 0.5 * 0.7071067811865476, *q)


@triton.jit
def _half_erfc_parts(a):
    """(t, e) with t · e = erfc(a / √2) / 2 = Φ(-a) in fp32, for a = |h| >= 0 (inf gives 0), from the fit above: a
    reciprocal, an exp2 and a dozen fmas, where libdevice's erff selects between two polynomials per element
    (their coefficients moved in by ~14 MOVs each). The fit keeps Φ's relative accuracy in the lower tail (no
    cancellation in 1 + erf). The reciprocal is rsqrt(d²), one MUFU.RSQ: 1 / d compiles to div.full.f32, whose
    range fix-ups cost four more instructions (d >= 1 here; d² = inf gives t = 0, the right limit). exp2 is
    flush-to-zero: no denormal fix-ups, which tl.exp compiles to."""
    w = a * 0.8493218002880191  # W_SCALE
    d = tl.fma(a, 0.3535533905932738, 1.0)  # D_SCALE
    t = tl.math.rsqrt(d * d)
    # Horner with explicit fmas (not left to FP contraction, which Triton plans to turn off by default)
    q = tl.fma(t, 0.24651729790196045, -1.1861149450768025)
    q = tl.fma(q, t, 2.147474463933521)
    q = tl.fma(q, t, -1.637753152343414)
    q = tl.fma(q, t, 0.40232158165127635)
    q = tl.fma(q, t, -0.2687568603388257)
    q = tl.fma(q, t, 0.1396300565225048)
    q = tl.fma(q, t, 0.5397006155284324)
    q = tl.fma(q, t, 1.4427292039075317)
    q = tl.fma(q, t, -2.825748218405333)
    return t, tl.math.exp2(tl.fma(-w, w, q))


@triton.jit
def _gelu_erf(h):
    """h · Φ(h), written as max(h, 0) - |h| · Φ(-|h|) (equal for either sign of h), which saves the select
    between Φ(-|h|) and 1 - Φ(-|h|) and the final product: ~27 instructions an element of the epilogue where
    h · Φ(h) took ~29 (SASS for sm_90, 128x128 TMA tile). |h| is capped at the largest float so that h = inf
    gives inf, not inf · 0; the cap keeps a NaN (PTX min.NaN), which the max then drops but the product carries."""
    a = tl.minimum(tl.abs(h), 3.4028234663852886e38, propagate_nan=tl.PropagateNan.ALL)
    t, e = _half_erfc_parts(a)
    return tl.fma(-(a * t), e, tl.maximum(h, 0.0))


@triton.jit
def _normal_cdf(h):
    """Φ(h) in fp32 (the backward's GELU derivative): Φ(-|h|) from _half_erfc_parts, or 1 minus it."""
    t, e = _half_erfc_parts(tl.abs(h))
    half_erfc = t * e
    return tl.where(h >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _gelu_and_grad(h, APPROX: tl.constexpr, WANT_GRAD: tl.constexpr):
    """(gelu(h), gelu'(h)) in fp32; the derivative only when WANT_GRAD (else 0)."""
    if APPROX == 0:
        if WANT_GRAD:
            cdf = _normal_cdf(h)
            y = h * cdf
            grad = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
        else:
            y = _gelu_erf(h)
            grad = 0.0
    else:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        # σ(2u) = 1 / (1 + e^(-2u)): e^(-2u) overflows to inf for very negative u and σ goes to 0, never NaN.
        # exp2 and rsqrt(d²) for the reciprocal, as in _half_erfc_parts (d >= 1).
        d = 1.0 + tl.math.exp2(inner * -2.8853900817779268)  # -2 log2(e)
        sig = tl.math.rsqrt(d * d)
        y = h * sig
        if WANT_GRAD:
            d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
            grad = sig + 2.0 * h * sig * (1.0 - sig) * d_inner
        else:
            grad = 0.0
    return y, grad


@triton.autotune(
    configs=list(INTERPRETER_CONFIGS if interpreting() else HALF_CONFIGS + FP32_CONFIGS),
    key=["M_BUCKET", "N", "K", "INPUT_PRECISION", "STORE_PREACT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _linear_gelu_fwd_kernel(
    x_ptr,  # [M, K], row stride stride_x_row, unit column stride
    w_ptr,  # [N, K], row stride stride_w_row, unit column stride
    b_ptr,  # [N]
    y_ptr,  # [M, N] out, contiguous
    h_ptr,  # [M, N] out, contiguous: the pre-activation (written only when STORE_PREACT)
    M,
    N,
    K,
    stride_x_row,
    stride_w_row,
    M_BUCKET,  # autotune key only (see m_bucket; 0: pinned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    APPROX: tl.constexpr,  # 0: exact erf GELU, 1: tanh form
    STORE_PREACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot's for fp32 inputs: "tf32" or "ieee" (ignored for 16-bit inputs)
    EPILOGUE_HALVES: tl.constexpr,  # the epilogue in two column halves (wide tiles: fewer live registers)
):
    N = _multiple_of_8(N)
    K = _multiple_of_8(K)
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows and columns past the end are wrapped to valid ones (their results are never stored), so
    # the loads need a mask along K only: fewer live predicates in the main loop.
    x_rows = tl.multiple_of((rows % M).to(tl.int64) * stride_x_row, 8)
    w_rows = tl.multiple_of((cols % N).to(tl.int64) * stride_w_row, 8)
    # The launcher guarantees 16-byte aligned bases and row strides that are multiples of 8 elements (it copies
    # other layouts): said here, so that the loads vectorise and pipeline whatever the call specialises on.
    x_ptrs = tl.multiple_of(x_ptr + x_rows[:, None] + ks[None, :], [16, 16])  # [BLOCK_M, BLOCK_K]
    w_ptrs = tl.multiple_of(w_ptr + w_rows[None, :] + ks[:, None], [16, 16])  # [BLOCK_K, BLOCK_N] = weightᵀ tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # K is a multiple of 8, so this equals (k0 + ks) < K, and shows the mask constant over 8 elements.
        k_ok = (k0 + ks) // 8 < K // 8
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    store_tile(acc, pid_m, pid_n, b_ptr, y_ptr, h_ptr, M, N, BLOCK_M, BLOCK_N, APPROX, STORE_PREACT, EPILOGUE_HALVES)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile number `tile`, in grouped order: GROUP_M row tiles sweep the column
    tiles together, so weight tiles are reused from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (tile // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def store_tile(acc, pid_m, pid_n, b_ptr, y_ptr, h_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               APPROX: tl.constexpr, STORE_PREACT: tl.constexpr, EPILOGUE_HALVES: tl.constexpr):  # fmt: skip
    """The epilogue of an output tile: bias, GELU, store y (and h when STORE_PREACT). Shared with the Hopper
    kernel (fastbert.kernels.linear_gelu_sm90)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # 64-bit tile base, 32-bit offsets within the tile: half the registers of 64-bit offsets per element.
    tile_base = (pid_m * BLOCK_M).to(tl.int64) * N
    if EPILOGUE_HALVES:
        # Wide tiles: bias + GELU + store one column half at a time, so the GELU's temporaries cover half the
        # accumulator (the whole-tile epilogue spilled at 128x256 on sm_90).
        acc_left, acc_right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        half = tl.arange(0, BLOCK_N // 2)
        _epilogue(acc_left, rows, pid_n * BLOCK_N + half, tile_base, b_ptr, y_ptr, h_ptr, M, N,
                  BLOCK_M, APPROX, STORE_PREACT)  # fmt: skip
        _epilogue(acc_right, rows, pid_n * BLOCK_N + BLOCK_N // 2 + half, tile_base, b_ptr, y_ptr, h_ptr, M, N,
                  BLOCK_M, APPROX, STORE_PREACT)  # fmt: skip
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, rows, cols, tile_base, b_ptr, y_ptr, h_ptr, M, N, BLOCK_M, APPROX, STORE_PREACT)


@triton.jit
def _epilogue(acc, rows, cols, tile_base, b_ptr, y_ptr, h_ptr, M, N, BLOCK_M: tl.constexpr, APPROX: tl.constexpr,
              STORE_PREACT: tl.constexpr):  # fmt: skip
    """h = acc + bias, y = gelu(h); store y (and h when STORE_PREACT) for these rows and columns."""
    col_ok = cols < N
    h = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_grad(h, APPROX, False)
    out_offs = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & col_ok[None, :]
    tl.store(y_ptr + tile_base + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_PREACT:
        tl.store(h_ptr + tile_base + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _linear_gelu_bwd_kernel(
    dy_ptr,  # [M, N], row stride stride_dy_row, unit column stride
    h_ptr,  # [M, N] contiguous: the saved pre-activation
    dh_ptr,  # [M, N] out, contiguous, in h's dtype
    dbias_partial_ptr,  # [cdiv(M, BLOCK_M), N] out, fp32: column sums of dh per row tile
    M,
    N,
    stride_dy_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    APPROX: tl.constexpr,
):
    N = _multiple_of_8(N)
    stride_dy_row = _multiple_of_8(stride_dy_row)
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + rows64[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _, grad = _gelu_and_grad(h, APPROX, True)
    dh = tl.where(mask, dy * grad, 0.0)
    tl.store(dh_ptr + rows64[:, None] * N + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_partial_ptr + pid_m * N + cols, tl.sum(dh, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------- launchers
def _input_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # 16-bit inputs ignore it; one value, so one compiled variant (the gate's)
    if interpreting():
        return "ieee"  # the interpreter computes fp32 dots exactly either way
    return "tf32" if tf32_matmul() else "ieee"


def tf32_matmul() -> bool:
    """Whether PyTorch's fp32 matmuls on CUDA use TF32. torch >= 2.9 has fp32_precision, which reflects the legacy
    flag too, and after the new API was used the legacy allow_tf32 raises on reading ("mix of the legacy and new
    APIs"); "none" at the matmul level defers to torch.backends' own."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernel's alignment hints hold for it (16-byte aligned base, unit column stride, row
    stride a multiple of 8 elements), else a contiguous copy."""
    if t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0:
        return t
    return t.contiguous() if not t.is_contiguous() else t.clone()


def linear_gelu_fwd(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str, store_preact: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x2d [M, K] with unit column stride, weight [N, K] with unit column stride, bias [N] or None, one dtype.
    Returns (y [M, N] contiguous, h [M, N] contiguous pre-activation when store_preact, else None)."""
    M, K = x2d.shape
    N = weight.shape[0]
    assert K % 8 == 0 and N % 8 == 0 and weight.shape[1] == K, (x2d.shape, weight.shape)
    y = empty((M, N), device=x2d.device, dtype=x2d.dtype)
    h = empty((M, N), device=x2d.device, dtype=x2d.dtype) if store_preact else None
    if M == 0:
        return y, h
    x2d, weight = _aligned(x2d), _aligned(weight)
    if bias is None:
        bias = torch.zeros(N, device=x2d.device, dtype=x2d.dtype)
    else:
        bias = aligned_base(bias.contiguous())
    h_out = h if store_preact else y  # not written without STORE_PREACT
    bucket = m_bucket(M)
    key = (bucket, N, K, x2d.dtype, approximate, store_preact, x2d.device)
    fp32 = x2d.dtype == torch.float32

    def portable(config=None):
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        if config is None:
            launch = _linear_gelu_fwd_kernel[grid]
        else:
            launch = lambda *args, **kwargs: launch_untimed(_linear_gelu_fwd_kernel, grid, config, *args, **kwargs)
        launch(
            x2d, weight, bias, y, h_out, M, N, K, x2d.stride(0), weight.stride(0), bucket,
            APPROX=_APPROX[approximate], STORE_PREACT=store_preact, INPUT_PRECISION=_input_precision(x2d.dtype),
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip

    def hopper(config=None):
        from fastbert.kernels import linear_gelu_sm90

        linear_gelu_sm90.linear_gelu_fwd_sm90(x2d, weight, bias, y, h_out, approximate, store_preact, bucket,
                                              config)  # fmt: skip

    sm90 = _use_sm90(x2d, key, hopper, portable)
    # Launched past the autotuners, untimed: while tuning is pinned (bucket 0) and for fp32 (one config, which
    # Triton 3.6 would time all the same), their default; for a shape first met while a CUDA graph is captured
    # (timing cannot run then), the config this kernel last ran at the same features (loaded: a kernel must not be
    # loaded during capture either), else the default.
    config = None
    if bucket == 0 or fp32:
        config = _default_config(fp32, sm90)
    elif (key, sm90) not in _TUNED:
        if _capturing(x2d):
            config = _RAN.get((key[1:], sm90)) or _default_config(fp32, sm90)
        else:
            (hopper if sm90 else portable)()
            _tuned(key, sm90)
            return y, h
    (hopper if sm90 else portable)(config)
    return y, h


# Which autotuner (sm90 or not) has timed its configs for which call shape (linear_gelu_fwd's keys), and the config
# each last ran at a shape's features (the key without its row bucket).
_TUNED: set[tuple] = set()
_RAN: dict[tuple, triton.Config] = {}


def _tuned(key: tuple, sm90: bool) -> None:
    """Record that the autotuner of one kernel (the TMA one when sm90) has just run at this key."""
    from fastbert.kernels import linear_gelu_sm90

    _TUNED.add((key, sm90))
    autotuner = linear_gelu_sm90._linear_gelu_fwd_sm90_kernel if sm90 else _linear_gelu_fwd_kernel
    _RAN[(key[1:], sm90)] = autotuner.best_config


def _default_config(fp32: bool, sm90: bool) -> triton.Config:
    """The config the autotuner of the kernel (the TMA one when sm90) keeps while tuning is pinned."""
    if sm90:
        from fastbert.kernels import linear_gelu_sm90

        return linear_gelu_sm90.default_config()
    return INTERPRETER_CONFIGS[0] if interpreting() else (FP32_CONFIGS if fp32 else HALF_CONFIGS)[0]


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# Forward kernel per call shape on Hopper: True for the TMA kernel (fastbert.kernels.linear_gelu_sm90), False
# for the portable one; decided once per key by timing both (each after its own autotuning).
_SM90_CHOICE: dict[tuple, bool] = {}
SM90_ENV = "FASTBERT_LINEAR_GELU_SM90"


def _use_sm90(x2d: torch.Tensor, key: tuple, hopper, portable) -> bool:
    """Whether this call runs the Hopper TMA kernel. FASTBERT_LINEAR_GELU_SM90=1 / 0 forces it on (where it
    applies: 16-bit inputs on sm_90, or the interpreter) / off; unset, a Hopper GPU times both kernels on the
    first call of each shape and keeps the faster (the portable kernel, untimed, while tuning is pinned). During
    CUDA-graph capture nothing can be timed: an untimed shape runs the portable kernel (and is timed at its first
    call outside capture)."""
    from fastbert.kernels import linear_gelu_sm90

    forced = os.environ.get(SM90_ENV)
    if forced in ("0", "1"):
        return forced == "1" and linear_gelu_sm90.supported(x2d)
    if interpreting() or not linear_gelu_sm90.supported(x2d) or key[0] == 0:  # (M_BUCKET 0: pinned, untimed)
        return False
    if key not in _SM90_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return False
        hopper_ms = triton.testing.do_bench(hopper, warmup=10, rep=40)
        _tuned(key, True)
        portable_ms = triton.testing.do_bench(portable, warmup=10, rep=40)
        _tuned(key, False)
        _SM90_CHOICE[key] = hopper_ms < portable_ms
    return _SM90_CHOICE[key]


def linear_gelu_bwd(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, has_bias: bool, approximate: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of linear_gelu_fwd from its saved pre-activation h [M, N] (contiguous). dy [M, N] with unit
    column stride. Returns (dx [M, K], dweight [N, K], dbias [N] or None), in x2d's dtype."""
    M, K = x2d.shape
    N = weight.shape[0]
    block_m, block_n, num_warps = bwd_config()
    dy = _aligned(dy)
    tiles_m = cdiv(M, block_m)
    dh = empty((M, N), device=x2d.device, dtype=h.dtype)
    db_partial = empty((max(tiles_m, 1), N), device=x2d.device, dtype=torch.float32)
    if M == 0:
        db_partial.zero_()
    else:
        _linear_gelu_bwd_kernel[(tiles_m, cdiv(N, block_n))](
            dy, h, dh, db_partial, M, N, dy.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, APPROX=_APPROX[approximate], num_warps=num_warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    # cuBLAS GEMMs with fp32 accumulation, as eager's Linear backward.
    dx = torch.mm(dh, weight)
    dweight = torch.mm(dh.t(), x2d)
    dbias = db_partial.sum(0).to(weight.dtype) if has_bias else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------- compile gate
def _fwd_signature(dt: str) -> dict[str, str]:
    return {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "h_ptr": f"*{dt}",
            "M": "i32", "N": "i32", "K": "i32", "stride_x_row": "i32", "stride_w_row": "i32", "M_BUCKET": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
            "APPROX": "constexpr", "STORE_PREACT": "constexpr", "INPUT_PRECISION": "constexpr",
            "EPILOGUE_HALVES": "constexpr"}  # fmt: skip


# Both 16-bit dtypes (with fp32's, 96 forward compilations for sm_80 and sm_90). Should CI's budget tighten, fp16
# can go: it compiles to the same tiles, shared memory and registers as bf16 but for the MMA and conversion
# instructions.
GATE_HALF_DTYPES = ("fp16", "bf16")


def gate_cases() -> list[GateCase]:
    """Every compilation the launchers may request: each autotune config of each dtype (fp32 in TF32 and IEEE
    modes; fp16 and bf16), both GELU forms, with and without the pre-activation
    store; the backward kernel per dtype and form."""
    cases = []
    fwd_variants = [(dt, "tf32", c) for dt in GATE_HALF_DTYPES for c in HALF_CONFIGS]
    fwd_variants += [("fp32", p, c) for p in ("tf32", "ieee") for c in FP32_CONFIGS]
    for dt, precision, cfg in fwd_variants:
        kw = cfg.kwargs
        for approx_name, approx in _APPROX.items():
            for store in (False, True):
                tag = (f"m{kw['BLOCK_M']}n{kw['BLOCK_N']}k{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}-{dt}"
                       f"{'-' + precision if dt == 'fp32' else ''}-{approx_name}-preact{int(store)}")  # fmt: skip
                cases.append(GateCase(
                    f"linear_gelu_fwd-{tag}", _linear_gelu_fwd_kernel.fn, _fwd_signature(dt),
                    dict(kw, APPROX=approx, STORE_PREACT=store, INPUT_PRECISION=precision),
                    cfg.num_warps, cfg.num_stages, expect_wgmma_sm90=dt != "fp32",
                    divisible=pointer_args(_fwd_signature(dt)),
                    # With 4 warps the epilogue loads the bias row one element a thread: one lone 2-byte load
                    # the check would count (the gate's PTX shows the tiles as 16-byte cp.async there too).
                    vector_loads=cfg.num_warps >= 8,
                    max_registers_sm90=65536 // (2 * 32 * cfg.num_warps) if cfg in TWO_BLOCKS_SM90 else None,
                    max_shared_sm90=SM90_SHARED_TWO_BLOCKS if cfg in TWO_BLOCKS_SM90 else None,
                ))  # fmt: skip
    block_m, block_n, num_warps = bwd_config()
    for dt in ("fp32", *GATE_HALF_DTYPES):
        for approx_name, approx in _APPROX.items():
            cases.append(GateCase(
                f"linear_gelu_bwd-{dt}-{approx_name}", _linear_gelu_bwd_kernel,
                {"dy_ptr": f"*{dt}", "h_ptr": f"*{dt}", "dh_ptr": f"*{dt}", "dbias_partial_ptr": "*fp32",
                 "M": "i32", "N": "i32", "stride_dy_row": "i32",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "APPROX": "constexpr"},
                {"BLOCK_M": block_m, "BLOCK_N": block_n, "APPROX": approx}, num_warps,
                divisible=("dy_ptr", "h_ptr", "dh_ptr", "dbias_partial_ptr"), vector_loads=True,
            ))  # fmt: skip
    return cases
