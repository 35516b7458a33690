"""Attention dropout's mask: which probabilities the kernels keep for a seed (fastbert.kernels.attention).

Element (row, col) of the [rows, seq_k] mask keeps iff the 16-bit half ``col % 2`` (low, high) of word
``(col % 32) // 8`` of the Philox-4x32-10 evaluation at counter ``row · 4·cdiv(seq_k, 32) + 4·(col // 32) +
(col % 8) // 2`` (64-bit, the seed in the upper 64 bits of the counter, key common.DROPOUT_KEY) is at least the
threshold (common.dropout_threshold of p at DROPOUT_BITS). Rows are the attention kernels' query rows (the
index of their lse, see fastbert.kernels.attention). That order follows the MMA accumulators: a thread holds
columns 2t, 2t + 1, 2t + 8, ... of its rows, so one evaluation's eight draws are one thread's eight elements of a
row in a 32-key block, and the forward applies the mask where it is drawn. The backward draws the same mask
once and packs it (fastbert.kernels.attention_bwd).

The jit helpers that draw it (_dropout_draws, _keep_tile, _dropout_keep) serve the forward and the backward's
packing kernel. dropout_keep_mask() returns the mask for tests (its kernel is test-only, so not in the compile
gate); tests/test_attention.py recomputes the stream with an independent Philox in numpy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels.common import FP_FUSION, cdiv, dropout_threshold, philox_seed, philox_words

# Width of each dropout draw: 16-bit draws, eight per Philox evaluation, so that dropout costs the issue-bound
# loops half the Philox work of 32-bit ones; p is then honoured to within 2^-17. _dropout_keep is written for this
# width (its halves and 32-key groups); the launchers turn p into its threshold with it.
DROPOUT_BITS = tl.constexpr(16)


@triton.jit
def _dropout_draws(seed, rows, row_length, groups, threshold):
    """The keep decisions of the dropout mask's Philox evaluations (row ``rows``, 32-key group ``groups``, t < 4),
    in the order the module docstring gives: eight bool [rows, groups, 4] tensors, the low (a) and high (b) 16-bit
    halves of words 0-3, for the columns 32g + 8j + 2t + (0 for a, 1 for b) of word j."""
    per_row = tl.cdiv(row_length, 32) * 4
    counters = (rows.to(tl.int64)[:, None, None] * per_row + (groups * 4)[None, :, None]
                + tl.arange(0, 4)[None, None, :])  # fmt: skip
    r0, r1, r2, r3 = philox_words(seed, counters)
    return ((r0 & 0xFFFF).to(tl.int32) >= threshold, (r0 >> 16).to(tl.int32) >= threshold,
            (r1 & 0xFFFF).to(tl.int32) >= threshold, (r1 >> 16).to(tl.int32) >= threshold,
            (r2 & 0xFFFF).to(tl.int32) >= threshold, (r2 >> 16).to(tl.int32) >= threshold,
            (r3 & 0xFFFF).to(tl.int32) >= threshold, (r3 >> 16).to(tl.int32) >= threshold)  # fmt: skip


@triton.jit
def _keep_tile(a0, b0, a1, b1, a2, b2, a3, b3, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] keep-mask tile of _dropout_draws' eight [m, g, 4] decisions."""
    # [m, g, t, e, b, a] holding word j = 2b + a (the inner joins pair words 0 / 2 and 1 / 3 along b)
    keep = tl.join(tl.join(tl.join(a0, b0), tl.join(a2, b2)), tl.join(tl.join(a1, b1), tl.join(a3, b3)))
    keep = tl.permute(keep, (0, 1, 4, 5, 2, 3))  # [m, g, b, a, t, e]: column 32g + 8(2b + a) + 2t + e
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def _dropout_keep(seed, rows, row_length, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_N] of a tile of the [rows, row_length] dropout mask (rows ``rows``, columns
    col_start + 0 .. BLOCK_N - 1; col_start and BLOCK_N multiples of 32), in the order the module docstring gives:
    one Philox evaluation per (row, 32-key group g, t < 4), its words j < 4 and halves e < 2 to the columns
    32g + 8j + 2t + e. In the forward's orientation Triton then lays the mask out like the scores, and no data
    moves between threads (with eight neighbouring columns per evaluation, the sm_90 compile moved the mask
    through shared memory in every iteration: ~90 instructions an iteration more)."""
    G: tl.constexpr = BLOCK_N // 32
    # (the tensor first: in the interpreter an int column start // a constexpr is a constexpr, which does not add
    # a tensor to itself)
    groups = tl.arange(0, G) + col_start // 32
    a0, b0, a1, b1, a2, b2, a3, b3 = _dropout_draws(seed, rows, row_length, groups, threshold)
    return _keep_tile(a0, b0, a1, b1, a2, b2, a3, b3, BLOCK_M, BLOCK_N)


@triton.jit
def _attention_keep_mask_kernel(
    keep_ptr,  # [B·H·Sq, Sk] int8 out
    seq_q, seq_k, dropout_threshold, seed,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, rows, seq_k, tl.program_id(1) * BLOCK_N, dropout_threshold, BLOCK_M, BLOCK_N)
    tl.store(keep_ptr + rows.to(tl.int64)[:, None] * seq_k + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < seq_q) & (cols[None, :] < seq_k))  # fmt: skip


def dropout_keep_mask(
    seed: int, batch: int, heads: int, seq_q: int, seq_k: int, p: float, device: torch.device, block_n: int = 64
) -> torch.Tensor:
    """The bool keep-mask [batch, heads, seq_q, seq_k] padded attention applies to its probabilities for this seed
    and p (for tests). For varlen, sequence b's mask is rows ``h·total + token`` of the [heads·total, max_seqlen]
    mask this returns for (batch=1, heads, seq_q=total, seq_k=max_seqlen), columns 0:len_b. ``block_n``: the key
    tile it is drawn in (32, 64, 128: a multiple of 32; the mask must not depend on it, which the tests check)."""
    if block_n % 32:
        raise ValueError(f"block_n must be a multiple of 32 (dropout draws 32-key groups), got {block_n}")
    rows = batch * heads * seq_q
    keep = torch.empty((rows, seq_k), device=device, dtype=torch.int8)
    _attention_keep_mask_kernel[(cdiv(rows, 16), cdiv(seq_k, block_n))](
        keep, rows, seq_k, dropout_threshold(p, DROPOUT_BITS.value), philox_seed(seed), BLOCK_M=16, BLOCK_N=block_n,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return keep.bool().view(batch, heads, seq_q, seq_k)
