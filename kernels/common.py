"""Helpers shared by the Triton kernels: interpreter detection, block heuristics, in-kernel dropout, and the
record type the GPU compile gate uses (see fastbert.kernels.gate)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU with its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def empty(shape, *, device, dtype):
    """torch.empty for kernel outputs. Under FASTBERT_POISON=1 (set by the test suite) float outputs are filled
    with NaN first, so an element a kernel forgets to write fails the tests instead of passing by luck."""
    import torch

    out = torch.empty(shape, device=device, dtype=dtype)
    if out.is_floating_point() and os.environ.get("FASTBERT_POISON") == "1":
        out.fill_(float("nan"))
    return out


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for(device, per_sm: int = 4, interpreter: int = 4) -> int:
    """How many persistent programs to launch for a reduction over rows."""
    if device.type == "cuda":
        return per_sm * sm_count(device.index if device.index is not None else 0)
    return interpreter


def dropout_threshold(p: float) -> int:
    """The uint32 threshold of a dropout keep-mask: an element is kept iff its 32-bit random draw is >= it, so
    the keep probability is 1 - p to within 2^-32."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 4294967296.0), 4294967295)


@triton.jit
def dropout_keep(seed, row_ids, row_counters, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of a [BLOCK_M, BLOCK_N] tile, from Philox-4x32 keyed by ``seed``.

    Element (row, col) takes lane ``col % 4`` of the Philox draw at counter ``row * row_counters + col // 4``
    (64-bit counter, ``row_counters = cdiv(row_length, 4)``), so one Philox evaluation serves four elements and
    the mask is the same whatever the tiling, as long as ``col_start`` is a multiple of 4. Kept iff the 32-bit
    draw is >= ``threshold`` (see dropout_threshold). Forward and backward call this with the same arguments, so
    the mask is regenerated instead of stored.
    """
    counters = row_ids.to(tl.int64)[:, None] * row_counters + (col_start // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return draws.to(tl.int64) >= threshold


@dataclasses.dataclass(frozen=True)
class GateCase:
    """One kernel compilation the launchers may ask for: what the compile gate builds for sm_80 and sm_90."""

    name: str
    fn: Any  # a triton.JITFunction
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    # Only compile for these compute capabilities (None: all the gate covers).
    archs: tuple[int, ...] | None = None
    # On sm_90, require warp-group MMA (wgmma) in the TTGIR: tensor-core kernels must not fall back.
    expect_wgmma_sm90: bool = False


TORCH_TO_TRITON = {
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.float32": "fp32",
}
