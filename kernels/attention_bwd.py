"""Backward of fused attention (fastbert.kernels.attention), FlashAttention-2: recomputes p from the forward's
lse instead of storing it, with delta = rowsum(dout · out) from a preprocess kernel:

    dv = dropout(p)ᵀ dout,   dp = dropout'(dout vᵀ),   ds = p · (dp - delta),   dk = dsᵀ q · scale,   dq = ds k · scale

dk/dv come from one kernel looping over query blocks for a key block, dq from another looping over key blocks:
no atomics, deterministic gradients. With dropout, the forward's mask (fastbert.kernels.attention_dropout) is
drawn again at the start of the backward, packed one bit a score (_attention_dropout_bits_kernel), and read by
dq and dk/dv. The packed mask keeps the draws' order (byte 4g + t of a row: its evaluation (g, t); bit 2j + e:
word j, half e), so dq unpacks it in place; dk/dv, whose tile is transposed, gathers its bits in its own layout
(drawn there, the mask had to move between threads). pack_dropout_mask writes it; past _DROPOUT_BITS_BUDGET
(long sequences) attention_bwd packs it and runs dq and dk/dv for a chunk of (batch, head) pairs at a time.

The tile tables and the helpers shared with the forward are in fastbert.kernels.attention; gate_cases() here
covers dk/dv, dq, the preprocess kernel and the mask's packing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastbert.kernels.attention import (
    _DKDV_CONFIGS,
    _DKDV_TILES,
    _DQ_CONFIGS,
    _DQ_TILES,
    _RUNTIME_ARGS,
    _STRIDES,
    LOG2E,
    MAX_GRID_Y,
    _aligned,
    _attended_prefix,
    _check_offsets,
    _d_ok,
    _divisible,
    _dot,
    _even_d_values,
    _key_bias,
    _Layout,
    _sequence,
    _signature,
    _strides,
    _unit_strides,
    table_cases,
)
from fastbert.kernels.attention_dropout import DROPOUT_BITS, _dropout_draws, _keep_tile
from fastbert.kernels.common import FP_FUSION, GateCase, cdiv, dropout_threshold, empty, placeholder, seed_arg

_PREPROCESS_BLOCK_M = 64
_PREPROCESS_WARPS = 8  # 4 spilled one register for fp32 d128 on sm_80 (Triton 3.6's gate)
# The backward's packed dropout mask (_attention_dropout_bits_kernel): a program draws BLOCK_M rows x BLOCK_G
# 32-key groups; the mask of at most this many bytes at a time (B·H·S²/8 in all: 12.6 MB for BERT-base's
# 32 x 12 heads x 512; beyond the budget dq and dk/dv run in chunks of (batch, head)).
_BITS_BLOCK_M, _BITS_BLOCK_G, _BITS_WARPS = 64, 4, 4  # (107 instructions an evaluation; 32 rows: 118)
_DROPOUT_BITS_BUDGET = 256 * 2**20


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _bits_keep(bits_base, row_off, col_start, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr):  # fmt: skip
    """_dropout_keep's tile read from the backward's packed mask (_attention_dropout_bits_kernel: byte 4g + t of a
    row holds its evaluation (g, t), bit 2j + e column 32g + 8j + 2t + e) instead of drawn: one byte load per eight
    elements. Row i starts at byte ``bits_base + row_off[i]`` (int32 offsets: a 64-bit pointer a row, held across
    the loop, cost registers; rows past the sequence point at its last row). MASKED: groups past len_k are not
    read (their keep is False, never used)."""
    G: tl.constexpr = BLOCK_N // 32
    groups = tl.arange(0, G) + col_start // 32
    # one 32-bit word a (row, group): its byte t is evaluation (g, t) (row_off and the base are multiples of 4)
    ptrs = bits_base.to(tl.pointer_type(tl.int32)) + (row_off // 4)[:, None] + groups[None, :]
    if MASKED:
        word = tl.load(ptrs, mask=(groups * 32 < len_k)[None, :], other=0)
    else:
        word = tl.load(ptrs)
    byte = (word[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
    return _keep_tile((byte & 1) != 0, (byte & 2) != 0, (byte & 4) != 0, (byte & 8) != 0, (byte & 16) != 0,
                      (byte & 32) != 0, (byte & 64) != 0, (byte & 128) != 0, BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attention_bwd_preprocess_kernel(
    o_ptr,  # like q
    do_ptr,  # like q
    delta_ptr,  # like lse, fp32 out: rowsum(do · o)
    cu_seqlens_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    seq_q,
    seq_k,
    heads,
    head_dim,
    is_varlen,
    bh_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1) + bh_offset
    b = bh // heads
    h = bh % heads
    start, len_q, len_k = _sequence(cu_seqlens_ptr, b, seq_q, seq_k, is_varlen)
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < len_q)[:, None] & _d_ok(offs_d, head_dim, BLOCK_D, EVEN_D)[None, :]
    tok_m = start + offs_m
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + tok_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)  # fmt: skip
    do = tl.load(do_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + tok_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    rows = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start + offs_m
    tl.store(delta_ptr + rows, delta, mask=offs_m < len_q)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, bias, q_base, do_base, lse_ptr, delta_ptr, row_base, offs_d, d_ok, start, lo, hi, len_q,
    stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, dropout_scale, bits_base, byte_n, bit_n, n_ok, per_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """dk, dv over the query blocks lo, lo + BLOCK_M, ... < hi, in transposed tiles [BLOCK_N, BLOCK_M] (key rows,
    query columns). Unmasked (whole query blocks of a whole key block without padding mask): p = 2^(s·scale -
    lse), one fma per score, loads without a mask. Masked: p = 2^(s·scale + bias - lse) (-inf bias: p = 0), and
    the loads past the sequence's end are masked: their lse is +inf (p = 0), their delta 0. Dropout: the keep of
    (key n, query m) is bit bit_n of byte bits_base + byte_n + m·per_row of the packed mask
    (_attention_dropout_bits_kernel),
    gathered in the transposed tile's own layout."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        tok_m = start + offs_m
        rows = row_base + offs_m
        q_ptrs = q_base + tok_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = do_base + tok_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        if MASKED:
            m_ok = offs_m < len_q
            md_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptrs, mask=md_mask, other=0.0)
            do = tl.load(do_ptrs, mask=md_mask, other=0.0)
            # lse is +inf for queries past the end and for those whose keys are all masked: p = 0, never NaN (lse
            # is never -inf).
            lse = tl.load(lse_ptr + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=m_ok, other=0.0)
            pt = tl.math.exp2(tl.fma(_dot(k, tl.trans(q)), qk_scale, bias[:, None]) - lse[None, :])
        else:
            q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
            pt = tl.math.exp2(tl.fma(_dot(k, tl.trans(q)), qk_scale, -lse[None, :]))
        dpt = _dot(v, tl.trans(do))
        pt_drop = pt
        if HAS_DROPOUT:
            # (drawn here, the mask had to move between threads into the transposed tile: 505 instructions an
            # iteration against 272 reading it, sm_90 fp16 head_dim 64)
            ptrs = bits_base + (byte_n[:, None] + (offs_m * per_row)[None, :])
            if MASKED:
                byte = tl.load(ptrs, mask=n_ok[:, None] & (offs_m < len_q)[None, :], other=0)
            else:
                byte = tl.load(ptrs)
            keep_t = tl.where(((byte.to(tl.int32) >> bit_n[:, None]) & 1) != 0, dropout_scale, 0.0)
            pt_drop = pt * keep_t
            dpt = dpt * keep_t
        dv += _dot(pt_drop.to(do.dtype), do)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # like the forward's q, k, v, o
    dk_ptr, dv_ptr,  # like k, v, out
    lse_ptr, delta_ptr,  # fp32, indexed like the forward's lse
    bias_ptr, cu_seqlens_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bias_b,
    seq_q, seq_k, heads, head_dim,
    sm_scale,  # scale (dk = dsᵀ q · scale)
    qk_scale,  # scale · log2(e)
    is_varlen, has_mask, dropout_scale, bits_ptr, bits_len, bh_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no mask along d
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1) + bh_offset
    b = bh // heads
    h = bh % heads
    start, len_q, len_k = _sequence(cu_seqlens_ptr, b, seq_q, seq_k, is_varlen)
    if pid_n * BLOCK_N >= len_k:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < len_k
    d_ok = _d_ok(offs_d, head_dim, BLOCK_D, EVEN_D)
    tok_n = start + offs_n
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b64 * stride_kb + h64 * stride_kh + tok_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=nd_mask, other=0.0)  # fmt: skip
    v = tl.load(v_ptr + b64 * stride_vb + h64 * stride_vh + tok_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=nd_mask, other=0.0)  # fmt: skip
    bias = _key_bias(bias_ptr + b64 * stride_bias_b, offs_n, n_ok, has_mask)

    q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
    do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
    row_base = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Dropout: byte (n // 32)·4 + (n % 8) // 2, bit ((n % 32) // 8)·2 + n % 2 of query m's row in the packed mask
    per_row = tl.cdiv(seq_k, 32) * 4
    bits_base = bits_ptr + (bh - bh_offset).to(tl.int64) * bits_len * per_row
    byte_n = (offs_n // 32) * 4 + (offs_n % 8) // 2
    bit_n = ((offs_n % 32) // 8) * 2 + offs_n % 2
    # While this key block is whole and has no padding mask, its whole query blocks need no key bias and no query
    # mask (one fma per score for p); the rest, including the last, partial query block, take both (see
    # _dkdv_blocks). A third loop for whole query blocks under a key bias spilled on sm_80 (Triton 3.6), and
    # choosing between the loops with an if/else made ptxas serialise the warp-group MMAs (the compile gate checks).
    prefix = _attended_prefix(bias_ptr + b64 * stride_bias_b, stride_bias_b, len_k, has_mask)
    m_plain = tl.where(start_n + BLOCK_N <= prefix, (len_q // BLOCK_M) * BLOCK_M, 0)
    dk, dv = _dkdv_blocks(dk, dv, k, v, bias, q_base, do_base, lse_ptr, delta_ptr, row_base, offs_d, d_ok, start,
                          0, m_plain, len_q, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, dropout_scale,
                          bits_base, byte_n, bit_n, n_ok, per_row, BLOCK_M, BLOCK_N, HAS_DROPOUT, False)  # fmt: skip
    dk, dv = _dkdv_blocks(dk, dv, k, v, bias, q_base, do_base, lse_ptr, delta_ptr, row_base, offs_d, d_ok, start,
                          m_plain, len_q, len_q, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, dropout_scale,
                          bits_base, byte_n, bit_n, n_ok, per_row, BLOCK_M, BLOCK_N, HAS_DROPOUT, True)  # fmt: skip

    dk = dk * sm_scale
    tl.store(dk_ptr + b64 * stride_dkb + h64 * stride_dkh + tok_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=nd_mask)  # fmt: skip
    tl.store(dv_ptr + b64 * stride_dvb + h64 * stride_dvh + tok_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=nd_mask)  # fmt: skip


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, bits_base, bits_off, k_base, v_base, bias_row_ptr, offs_d, d_ok, start, lo, hi, len_k,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, has_mask, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """dq over the key blocks lo, lo + BLOCK_N, ... < hi. p = 2^(s·scale - lse), one fma per score; masked blocks
    add the key bias inside the fma and subtract lse after (-inf bias: p = 0; lse = +inf for queries past the
    end or with no key: p = 0; never -inf, so no NaN)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < len_k
        tok_n = start + offs_n
        if MASKED:
            k_ok = n_ok[:, None] & d_ok[None, :]
            vt_ok = n_ok[None, :] & d_ok[:, None]
        else:
            k_ok = d_ok[None, :]  # whole blocks: no mask along the keys
            vt_ok = d_ok[:, None]
        k = tl.load(k_base + tok_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=k_ok, other=0.0)
        vt = tl.load(v_base + tok_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=vt_ok, other=0.0)
        if MASKED:
            bias = _key_bias(bias_row_ptr, offs_n, n_ok, has_mask)
            p = tl.math.exp2(tl.fma(_dot(q, tl.trans(k)), qk_scale, bias[None, :]) - lse[:, None])
        else:
            p = tl.math.exp2(tl.fma(_dot(q, tl.trans(k)), qk_scale, -lse[:, None]))
        dp = _dot(do, vt)
        if HAS_DROPOUT:
            keep = _bits_keep(bits_base, bits_off, start_n, len_k, BLOCK_M, BLOCK_N, MASKED)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,
    dq_ptr,  # like q, out
    lse_ptr, delta_ptr,
    bias_ptr, cu_seqlens_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_bias_b,
    seq_q, seq_k, heads, head_dim,
    sm_scale, qk_scale,
    is_varlen, has_mask, dropout_scale, bits_ptr, bits_len, bh_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr,  # head_dim == BLOCK_D: no mask along d
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1) + bh_offset
    b = bh // heads
    h = bh % heads
    start, len_q, len_k = _sequence(cu_seqlens_ptr, b, seq_q, seq_k, is_varlen)
    if pid_m * BLOCK_M >= len_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = _d_ok(offs_d, head_dim, BLOCK_D, EVEN_D)
    tok_m = start + offs_m
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + tok_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=md_mask, other=0.0)  # fmt: skip
    do = tl.load(do_ptr + b64 * stride_dob + h64 * stride_doh + tok_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)  # fmt: skip
    rows = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start + offs_m
    lse = tl.load(lse_ptr + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + rows, mask=m_ok, other=0.0)

    k_base = k_ptr + b64 * stride_kb + h64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + h64 * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Whole key blocks without a padding mask first (no key bias), then the rest, as in the forward.
    bias_row_ptr = bias_ptr + b64 * stride_bias_b
    n_full = (_attended_prefix(bias_row_ptr, stride_bias_b, len_k, has_mask) // BLOCK_N) * BLOCK_N
    # Dropout: the rows of this block in the packed mask (_attention_dropout_bits_kernel)
    per_row = tl.cdiv(seq_k, 32) * 4
    bits_base = bits_ptr + (bh - bh_offset).to(tl.int64) * bits_len * per_row
    # (rows past the sequence read its last row, written and in bounds; their p is 0)
    bits_off = tl.minimum(offs_m, len_q - 1) * per_row
    dq = _dq_blocks(dq, q, do, lse, delta, bits_base, bits_off, k_base, v_base, bias_row_ptr, offs_d, d_ok, start, 0,
                    n_full, len_k, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, has_mask, dropout_scale,
                    BLOCK_M, BLOCK_N, HAS_DROPOUT, False)  # fmt: skip
    dq = _dq_blocks(dq, q, do, lse, delta, bits_base, bits_off, k_base, v_base, bias_row_ptr, offs_d, d_ok, start,
                    n_full, len_k, len_k, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, has_mask,
                    dropout_scale, BLOCK_M, BLOCK_N, HAS_DROPOUT, True)  # fmt: skip

    dq = dq * sm_scale
    tl.store(dq_ptr + b64 * stride_dqb + h64 * stride_dqh + tok_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=md_mask)  # fmt: skip


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attention_dropout_bits_kernel(
    bits_ptr,  # [chunk, bits_len, 4·cdiv(seq_k, 32)] uint8 out: (b, h) = bh_offset + chunk index
    cu_seqlens_ptr,
    seq_q, seq_k, heads, is_varlen, dropout_threshold,
    seed_ptr,  # [1] int64, the forward's seed
    bits_len,  # rows per (b, h): seq_q padded, max_seqlen varlen
    bh_offset,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,  # 32-key groups a program draws per row
):  # fmt: skip
    """The backward's dropout mask, packed: the forward's Philox draws (_dropout_draws, the same counters and
    threshold) for every (query, 32-key group) of the sequence, eight keep bits per evaluation in one byte (bit
    2j + e: word j, half e), so dq and dk/dv read the mask instead of drawing it again; dk/dv, whose tile is
    transposed, would otherwise also move it between threads. 1 bit a score, B·H·S²/8 bytes, freed after the
    backward (the launcher works in chunks of (b, h) beyond _DROPOUT_BITS_BUDGET)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1) + bh_offset
    g0 = tl.program_id(2) * BLOCK_G
    b = bh // heads
    h = bh % heads
    start, len_q, len_k = _sequence(cu_seqlens_ptr, b, seq_q, seq_k, is_varlen)
    if pid_m * BLOCK_M >= len_q or g0 * 32 >= len_k:
        return
    seed = tl.load(seed_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    groups = g0 + tl.arange(0, BLOCK_G)
    rows = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start + offs_m
    a0, b0, a1, b1, a2, b2, a3, b3 = _dropout_draws(seed, rows, seq_k, groups, dropout_threshold)
    byte = (
        a0.to(tl.int32)
        | (b0.to(tl.int32) << 1)
        | (a1.to(tl.int32) << 2)
        | (b1.to(tl.int32) << 3)
        | (a2.to(tl.int32) << 4)
        | (b2.to(tl.int32) << 5)
        | (a3.to(tl.int32) << 6)
        | (b3.to(tl.int32) << 7)
    )
    local = ((bh - bh_offset).to(tl.int64) * bits_len + offs_m) * (tl.cdiv(seq_k, 32) * 4)
    ptrs = bits_ptr + local[:, None, None] + (groups * 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
    ok = (offs_m < len_q)[:, None, None] & (groups * 32 < len_k)[None, :, None]
    tl.store(ptrs, byte.to(tl.uint8), mask=ok)


# ----------------------------------------------------------------------------------------------- launchers
def _grad_like(t: torch.Tensor) -> torch.Tensor:
    """An empty gradient for t: a [B, H, S, D] view of [B, S, H, D] storage when t is one (transformers'
    projections), else contiguous. ops' fake implementation of the backward follows the same rule."""
    if t.dim() == 4 and t.stride(1) < t.stride(2):
        B, H, S, D = t.shape
        return empty((B, S, H, D), device=t.device, dtype=t.dtype).transpose(1, 2)
    return empty(t.shape, device=t.device, dtype=t.dtype)


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention_fwd (same arguments, plus do like out and the saved out and lse). Returns
    (dq, dk, dv) in the inputs' shapes and dtype, each in its input's layout (_grad_like): for transformers'
    [B, H, S, D] views of [B, S, H·D] projections, views of [B, S, H, D] storage, which go back through the
    transpose and view without copies; otherwise contiguous."""
    do, q, k, v, out = _aligned(do), _aligned(q), _aligned(k), _aligned(v), _aligned(out)
    _check_offsets(do, q, k, v, out)
    lay = _Layout(q, k, cu_seqlens, max_seqlen, bias)
    scale = lay.head_dim**-0.5 if scale is None else scale
    dq, dk, dv = (_grad_like(t) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = empty(lay.lse_shape, device=q.device, dtype=torch.float32)
    n_bh = lay.batch * lay.heads
    for bh0 in range(0, n_bh, MAX_GRID_Y):
        _attention_bwd_preprocess_kernel[(cdiv(lay.max_q, _PREPROCESS_BLOCK_M), min(n_bh - bh0, MAX_GRID_Y))](
            out, do, delta, lay.cu, *_strides(out), *_strides(do),
            lay.seq_q, lay.seq_k, lay.heads, lay.head_dim, int(lay.varlen), bh0,
            BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=lay.block_d, EVEN_D=lay.even_d, num_warps=_PREPROCESS_WARPS,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    max_k = lay.max_q if lay.varlen else lay.seq_k
    chunk, bits = min(n_bh, MAX_GRID_Y), placeholder(q.device, torch.uint8)
    if dropout_p > 0.0:
        # The forward's mask, drawn once and packed (1 bit a score) for dq and dk/dv to read: in chunks of (b, h)
        # when it would pass _DROPOUT_BITS_BUDGET (long sequences).
        head_bytes = lay.max_q * cdiv(lay.seq_k, 32) * 4  # one (batch, head)'s mask
        if head_bytes >= 2**31:  # the kernels' offsets within a (batch, head) are int32
            raise ValueError(f"attention dropout: sequences of {lay.max_q} x {lay.seq_k} are too long for the "
                             "backward's packed mask (at most 2^31 bytes a head)")  # fmt: skip
        chunk = max(1, min(chunk, _DROPOUT_BITS_BUDGET // max(head_bytes, 1)))
        bits = empty((chunk, lay.max_q, cdiv(lay.seq_k, 32) * 4), device=q.device, dtype=torch.uint8)
        threshold, seed = dropout_threshold(dropout_p, DROPOUT_BITS.value), seed_arg(seed, q.device)
    flags, dropout = lay.bwd_flags(dropout_p, bits), dropout_p > 0.0

    def dkdv_launch(meta, bh0, n):
        _attention_bwd_dkdv_kernel[(cdiv(max_k, meta["BLOCK_N"]), n)](
            q, k, v, do, dk, dv, lse, delta, lay.bias, lay.cu,
            *common, *_strides(dk), *_strides(dv), lay.bias.stride(0),
            lay.seq_q, lay.seq_k, lay.heads, lay.head_dim, scale, scale * LOG2E, *flags, bh0,
            BLOCK_D=lay.block_d, HAS_DROPOUT=dropout, EVEN_D=lay.even_d, enable_fp_fusion=FP_FUSION, **meta,
        )  # fmt: skip

    def dq_launch(meta, bh0, n):
        _attention_bwd_dq_kernel[(cdiv(lay.max_q, meta["BLOCK_M"]), n)](
            q, k, v, do, dq, lse, delta, lay.bias, lay.cu,
            *common, *_strides(dq), lay.bias.stride(0),
            lay.seq_q, lay.seq_k, lay.heads, lay.head_dim, scale, scale * LOG2E, *flags, bh0,
            BLOCK_D=lay.block_d, HAS_DROPOUT=dropout, EVEN_D=lay.even_d, enable_fp_fusion=FP_FUSION, **meta,
        )  # fmt: skip

    for bh0 in range(0, n_bh, chunk):
        n = min(chunk, n_bh - bh0)
        if dropout:
            pack_dropout_mask(lay, bits, threshold, seed, bh0, n)
        if bh0 == 0:  # (a new bucket is timed on the first chunk, whose dropout mask is packed now)
            dkdv_meta = _DKDV_TILES.pick(lay, q, dropout, max_k, lambda meta, n=n: dkdv_launch(meta, 0, n))
            dq_meta = _DQ_TILES.pick(lay, q, dropout, lay.max_q, lambda meta, n=n: dq_launch(meta, 0, n))
        dkdv_launch(dkdv_meta, bh0, n)
        dq_launch(dq_meta, bh0, n)
    return dq, dk, dv


def pack_dropout_mask(lay: _Layout, bits: torch.Tensor, threshold: int, seed: torch.Tensor, bh0: int, n: int) -> None:
    """Write the packed dropout mask of the (batch, head) pairs bh0 .. bh0 + n - 1 into bits [>= n, lay.max_q,
    4·cdiv(lay.seq_k, 32)] uint8 (_attention_dropout_bits_kernel): what attention_bwd's dq and dk/dv read."""
    grid = (cdiv(lay.max_q, _BITS_BLOCK_M), n, cdiv(cdiv(lay.seq_k, 32), _BITS_BLOCK_G))
    _attention_dropout_bits_kernel[grid](
        bits, lay.cu, lay.seq_q, lay.seq_k, lay.heads, int(lay.varlen), threshold, seed, lay.max_q, bh0,
        BLOCK_M=_BITS_BLOCK_M, BLOCK_G=_BITS_BLOCK_G, num_warps=_BITS_WARPS, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- compile gate
_BWD_FLAGS = "is_varlen:i has_mask:i dropout_scale:f bits_ptr:U bits_len:i bh_offset:i"
_BWD_COMMON = " ".join(_STRIDES.format(x, y) for x, y in (("q", "m"), ("k", "n"), ("v", "n"), ("do", "m")))
_DKDV_SIG = (
    "q_ptr:T k_ptr:T v_ptr:T do_ptr:T dk_ptr:T dv_ptr:T lse_ptr:F delta_ptr:F bias_ptr:F cu_seqlens_ptr:C "
    + _BWD_COMMON + " " + _STRIDES.format("dk", "n") + " " + _STRIDES.format("dv", "n")
    + " stride_bias_b:i seq_q:i seq_k:i heads:i head_dim:a sm_scale:f qk_scale:f " + _BWD_FLAGS
    + " BLOCK_M:c BLOCK_N:c BLOCK_D:c HAS_DROPOUT:c EVEN_D:c"
)  # fmt: skip
_DQ_SIG = (
    "q_ptr:T k_ptr:T v_ptr:T do_ptr:T dq_ptr:T lse_ptr:F delta_ptr:F bias_ptr:F cu_seqlens_ptr:C "
    + _BWD_COMMON + " " + _STRIDES.format("dq", "m")
    + " stride_bias_b:i seq_q:i seq_k:i heads:i head_dim:a sm_scale:f qk_scale:f " + _BWD_FLAGS
    + " BLOCK_M:c BLOCK_N:c BLOCK_D:c HAS_DROPOUT:c EVEN_D:c"
)  # fmt: skip
_BITS_SIG = ("bits_ptr:U cu_seqlens_ptr:C seq_q:i seq_k:i heads:i is_varlen:i dropout_threshold:i seed_ptr:L "
             "bits_len:i bh_offset:i BLOCK_M:c BLOCK_G:c")  # fmt: skip
_PRE_SIG = (
    "o_ptr:T do_ptr:T delta_ptr:F cu_seqlens_ptr:C " + _STRIDES.format("o", "m") + " " + _STRIDES.format("do", "m")
    + " seq_q:i seq_k:i heads:i head_dim:a is_varlen:i bh_offset:i BLOCK_M:c BLOCK_D:c EVEN_D:c"
)  # fmt: skip


def gate_cases() -> list[GateCase]:
    """Every compilation attention_bwd may request: dk/dv and dq (each applicable config x dtype x head-dim block x
    EVEN_D x dropout, attention.table_cases), the preprocess kernel and the dropout mask's packing."""
    cases = table_cases("dkdv", _attention_bwd_dkdv_kernel, _DKDV_CONFIGS, _DKDV_SIG)
    cases += table_cases("dq", _attention_bwd_dq_kernel, _DQ_CONFIGS, _DQ_SIG)
    for dtype in ("fp16", "bf16", "fp32"):
        for block_d in (32, 64, 128):
            for even_d in _even_d_values(block_d):
                d_tag = f"d{block_d}" if even_d else f"d{block_d}masked"
                cases.append(GateCase(
                    f"attention_bwd_preprocess-{dtype}-{d_tag}", _attention_bwd_preprocess_kernel,
                    _signature(_PRE_SIG, dtype),
                    {"BLOCK_M": _PREPROCESS_BLOCK_M, "BLOCK_D": block_d, "EVEN_D": even_d} | _unit_strides(_PRE_SIG),
                    _PREPROCESS_WARPS,
                    divisible=_divisible(_PRE_SIG), vector_loads=dtype != "fp32",
                ))  # fmt: skip
    cases.append(GateCase(
        "attention_dropout_bits", _attention_dropout_bits_kernel, _signature(_BITS_SIG, "fp16"),
        {"BLOCK_M": _BITS_BLOCK_M, "BLOCK_G": _BITS_BLOCK_G}, _BITS_WARPS, divisible=_divisible(_BITS_SIG),
    ))  # fmt: skip
    return cases
