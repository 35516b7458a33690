"""Hopper (sm_90) forward of linear_gelu: ``y = gelu(x @ weight.T + bias)`` as a persistent GEMM whose x and
weight tiles arrive through the tensor memory accelerator (TMA).

Same math, dtypes and epilogue (bias, GELU, optional pre-activation store, column halves for wide tiles) as the
portable kernel in fastbert.kernels.linear_gelu; what differs is how the operands reach shared memory. The
portable kernel has every thread compute addresses and issue cp.async copies; here one descriptor per operand
(built on the host) lets the copy engine move whole [BLOCK, BLOCK_K] tiles, zero-filling rows and columns past
the end (so the main loop has no masks), and one or two programs per SM (PROGRAMS_PER_SM, per config) walk the
output tiles (a persistent grid, the tile loop flattened with the K loop so the pipeline runs across tile
boundaries). That is how GEMMs approach cuBLAS on Hopper; whether it beats the portable kernel at BERT's shapes
is for the GPU to say: fastbert.kernels.linear_gelu times both once per shape and keeps the faster (see its
launcher).

16-bit inputs only (fp32 keeps the portable kernel). Descriptors need 16-byte aligned bases and row strides,
which the launcher's alignment rule already guarantees.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastbert.kernels.common import (
    FP_FUSION,
    SM90_SHARED_TWO_BLOCKS,
    GateCase,
    cdiv,
    interpreting,
    launch_untimed,
    pointer_args,
    sm_count,
)
from fastbert.kernels.linear_gelu import _APPROX, _multiple_of_8, _tile_coords, store_tile


def _config(bm, bn, bk, warps, stages, per_sm=1, maxnreg=None, halves=None):
    halves = bn >= 256 if halves is None else halves
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE_HALVES": halves,
              "PROGRAMS_PER_SM": per_sm}  # fmt: skip
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg, pre_hook=_set_block_shapes)


def _set_block_shapes(nargs):
    """Each config reads tiles of its own shape: the descriptors' block shapes follow the config."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


# Candidates for the autotuner, all spill-free in the compile gate (sm_90 only: TMA is a Hopper feature).
# One program an SM runs its epilogue (bias, GELU, stores: ~27 instructions an element for the erf form) with the
# tensor cores idle: at K = 768 that is about a third of a tile's time, the gap to cuBLAS the H100 measured on
# 2026-11-25 (456 against 611 TFLOP/s). With two programs an SM (PROGRAMS_PER_SM, at most 113 KiB of shared
# memory and 128 registers a thread for 8 warps: the gate holds them to it), one's main loop can run while the
# other's epilogue does, as two blocks of a non-persistent grid would. Not yet timed: the autotuner decides.
CONFIGS = (
    _config(128, 128, 64, 8, 4),
    _config(128, 256, 64, 8, 3),
    _config(128, 128, 64, 8, 3, per_sm=2, maxnreg=128, halves=True),
    _config(128, 64, 64, 4, 3, per_sm=2),
)
INTERPRETER_CONFIGS = (_config(32, 32, 32, 4, 1),)


def default_config() -> triton.Config:
    """The config the autotuner keeps while tuning is pinned (see _prune)."""
    return (INTERPRETER_CONFIGS if interpreting() else CONFIGS)[0]


def _prune(configs, named_args, **kwargs):
    """The pinned key (M_BUCKET 0, linear_gelu.m_bucket) keeps the first config, the default."""
    return configs[:1] if named_args["M_BUCKET"] == 0 else configs


@triton.autotune(
    configs=list(INTERPRETER_CONFIGS if interpreting() else CONFIGS),
    key=["M_BUCKET", "N", "K", "STORE_PREACT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M", "N", "K", "M_BUCKET"])
def _linear_gelu_fwd_sm90_kernel(
    x_desc,  # TMA descriptor of x [M, K], block [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of weight [N, K], block [BLOCK_N, BLOCK_K]
    b_ptr,  # [N]
    y_ptr,  # [M, N] out, contiguous
    h_ptr,  # [M, N] out, contiguous: the pre-activation (written only when STORE_PREACT)
    M,
    N,
    K,
    M_BUCKET,  # autotune key only (linear_gelu.m_bucket; 0: pinned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    APPROX: tl.constexpr,  # 0: exact erf GELU, 1: tanh form
    STORE_PREACT: tl.constexpr,
    EPILOGUE_HALVES: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # the grid's programs an SM (the launcher's; unused here)
):
    N = _multiple_of_8(N)
    K = _multiple_of_8(K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([pid_m * BLOCK_M, k0])
            b = w_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc)
        store_tile(acc, pid_m, pid_n, b_ptr, y_ptr, h_ptr, M, N, BLOCK_M, BLOCK_N, APPROX, STORE_PREACT,
                   EPILOGUE_HALVES)  # fmt: skip


def supported(x2d: torch.Tensor) -> bool:
    """Whether this kernel can run the call: 16-bit inputs on a Hopper GPU (or in the interpreter, for tests)."""
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        return False
    if interpreting():
        return True
    return x2d.is_cuda and _is_hopper(x2d.device.index if x2d.device.index is not None else 0)


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def linear_gelu_fwd_sm90(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    approximate: str,
    store_preact: bool,
    m_bucket: int,
    config: triton.Config | None = None,
) -> None:
    """Writes y (and h when store_preact) for x2d [M, K] and weight [N, K], both with 16-byte aligned bases and
    row strides that are multiples of 8 elements; bias [N] (zeros when the layer has none). config: launched with
    this one, past the autotuner (see linear_gelu.linear_gelu_fwd); None: the autotuner's."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x2d.shape
    N = weight.shape[0]
    # Block shapes are placeholders: each config's pre_hook sets its own.
    x_desc = TensorDescriptor(x2d, [M, K], [x2d.stride(0), 1], [1, 1])
    w_desc = TensorDescriptor(weight, [N, K], [weight.stride(0), 1], [1, 1])
    if interpreting():
        sms = 3  # a few persistent programs, so that each walks several tiles
    else:
        sms = sm_count(x2d.device.index if x2d.device.index is not None else 0)

    def grid(meta):
        return (min(sms * meta["PROGRAMS_PER_SM"], cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)

    if config is None:
        launch = _linear_gelu_fwd_sm90_kernel[grid]
    else:
        launch = lambda *args, **kwargs: launch_untimed(_linear_gelu_fwd_sm90_kernel, grid, config, *args, **kwargs)
    launch(
        x_desc, w_desc, bias, y, h, M, N, K, m_bucket,
        APPROX=_APPROX[approximate], STORE_PREACT=store_preact, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- compile gate
def gate_cases() -> list[GateCase]:
    """Every config x 16-bit dtype x GELU form x pre-activation store, for sm_90 (the only target)."""
    cases = []
    for dt in ("fp16", "bf16"):
        for cfg in CONFIGS:
            kw = dict(cfg.kwargs)
            for approx_name, approx in _APPROX.items():
                for store in (False, True):
                    signature = {
                        "x_desc": f"tensordesc<{dt}[{kw['BLOCK_M']}, {kw['BLOCK_K']}]>",
                        "w_desc": f"tensordesc<{dt}[{kw['BLOCK_N']}, {kw['BLOCK_K']}]>",
                        "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "h_ptr": f"*{dt}",
                        "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
                    } | {name: "constexpr" for name in (*kw, "APPROX", "STORE_PREACT")}  # fmt: skip
                    tag = f"m{kw['BLOCK_M']}n{kw['BLOCK_N']}k{kw['BLOCK_K']}w{cfg.num_warps}s{cfg.num_stages}"
                    tag += f"p{kw['PROGRAMS_PER_SM']}" if kw["PROGRAMS_PER_SM"] > 1 else ""
                    two = kw["PROGRAMS_PER_SM"] == 2
                    cases.append(GateCase(
                        f"linear_gelu_fwd_sm90-{tag}-{dt}-{approx_name}-preact{int(store)}",
                        _linear_gelu_fwd_sm90_kernel.fn, signature,
                        kw | {"APPROX": approx, "STORE_PREACT": store}, cfg.num_warps, cfg.num_stages,
                        archs=(90,), expect_wgmma_sm90=True, divisible=pointer_args(signature),
                        vector_loads=True, maxnreg=cfg.maxnreg,
                        # two programs an SM: each within half the registers and shared memory
                        max_registers_sm90=65536 // (2 * 32 * cfg.num_warps) if two else None,
                        max_shared_sm90=SM90_SHARED_TWO_BLOCKS if two else None,
                    ))  # fmt: skip
    return cases
