"""Fused attention (FlashAttention-2): ``out = dropout(softmax(q kᵀ · scale, masked)) · v`` without materialising
the [seq_q, seq_k] score matrix.

One kernel family serves two layouts:
- padded: q, k, v [batch, heads, seq, head_dim] with arbitrary strides (transformers' transposed views are read
  in place), plus an optional key-padding mask given as a key bias (key_bias(): fp32 [batch, seq_k rounded up to
  KEY_BIAS_BLOCK, plus a block], 0 = attend, -inf = masked or past seq_k), read once per key block, so any mask
  works (left or right padding, holes); each row's last element counts its leading attended keys, whose whole
  blocks run without the bias, like an unmasked row's;
- varlen: packed q, k, v [total_tokens, heads, head_dim] with cu_seqlens [batch + 1] (int32); sequence b holds
  tokens cu_seqlens[b]:cu_seqlens[b + 1]. The grid covers cdiv(max_seqlen, BLOCK_M) query blocks per (batch,
  head); programs past their sequence's end exit at once.

Forward, per block of queries (online softmax, fp32, base 2 with scale · log2(e) folded into the scores):

    s = q kᵀ · scale · log2(e);   m' = max(m, rowmax(s));   p = 2^(s - m')
    l = l · 2^(m - m') + rowsum(p);   acc = acc · 2^(m - m') + dropout(p) · v;   out = acc / l
    lse = m + log2(l)     (saved, fp32, base 2; +inf for a query whose keys are all masked: its p is then 0)

Masking costs nothing per score where it can: key blocks that are whole and unmasked (no padding mask) run a loop
without any (scale and row max meet in one fma), the others add a 0 / -inf key bias inside the scale's fma
(_key_bias: the padded mask's bias as loaded, else -inf past the sequence's end); the forward and dq do the
whole blocks first, then the rest. A select on a key predicate instead cost ~300 integer instructions of
predicate bookkeeping per iteration in the SASS, more than the float work, and an int8 mask another ~100 (byte
extraction, compares, bounds) that the fp32 bias, padded to whole blocks, does not need.

The backward's kernels (dq, dk, dv, FlashAttention-2) are in fastbert.kernels.attention_bwd, the dropout mask's
Philox stream in fastbert.kernels.attention_dropout. This module holds what they share: the tile tables of all
three kernels (_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS, chosen from by _Tiles), the launchers' _Layout, the jit
helpers (_sequence, _d_ok, _key_bias, _attended_prefix, _dot) and the compile gate's table_cases.

Row id of query i of (b, h), the index of its lse and its row of the dropout mask, is ``(b·heads + h)·seq_q + i``
padded and ``h·total_tokens + token`` varlen; rows are seq_k long (seq_k = max_seqlen for varlen).

Memory: eager attention writes and reads the [B, H, S, S] scores and probabilities several times (fwd + bwd);
this reads q, k, v once per query/key block and stores out and lse (O(S) per head).

Limits: head_dim in {32, 64, 80, 96, 128} (80 and 96 run in a 128-wide block with a mask on d; 32, 64 and 128
fill their block and run without one, EVEN_D); fp16, bf16, fp32 (fp32 uses IEEE dots: exact but slow, small
tiles); q, k, v read in place when 16-byte aligned with a unit head_dim stride and other strides multiples of 16
elements, as transformers' views and packed tensors are (anything else is copied first, see _aligned: the tiles
then load 16 bytes a thread); offsets within one (batch, head) slice below 2^31 elements (ValueError otherwise).
Mask, varlen and the sizes are runtime arguments; dropout is a compile-time flag (its Philox code would
otherwise cost registers when unused).
"""

from __future__ import annotations

import itertools
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fastbert.kernels.attention_dropout import DROPOUT_BITS, _dropout_keep
from fastbert.kernels.common import (
    FP_FUSION,
    SM90_SHARED_TWO_BLOCKS,
    GateCase,
    aligned_base,
    autotune_pinned,
    cdiv,
    dropout_threshold,
    empty,
    interpreting,
    load_seed,
    next_power_of_2,
    placeholder,
    seed_arg,
)

HEAD_DIMS = (32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------- tuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages, dtypes, block_d values) a config applies to. BLOCK_M is the query
# block, BLOCK_N the key block, in all three kernels. Kept short: every entry is compiled by the gate for each
# dtype and head-dim block it applies to. Each (dtype, head-dim block, dropout) call matches one or more entries
# of each table, in table order: the first is its default, chosen from the compile (registers, instructions per
# score); the others are alternates, which _Tiles times against the default on a GPU, once per bucket of
# sequence length and of batch x heads (tests/test_launch_spec.py checks that every call has a default).
_HALF = ("fp16", "bf16")
# An optional 7th field limits an entry to calls with (True) or without (False) dropout: the forward's Philox
# state costs registers, and the larger tiles spill with it (the compile gate showed it). With dropout the loops
# are bound by instruction issue, not by the MMAs (Philox, selects: ~30 instructions a thread per score against
# ~9 without, benchmarks/sass_loops.py), so the dropout entries are the spill-free tiles with the fewest
# instructions per score: 64-row tiles on 8 warps, for one, needed ~40.
#
# Stages: with num_stages=2, Triton issues the next iteration's key and value copies (cp.async) at the end of an
# iteration and waits for all of them (cp.async.wait_group 0) at the top of the next, so every iteration waits
# out a whole L2 / HBM round trip; with 3 the copies are issued an iteration earlier and the wait leaves the
# newest in flight (wait_group 2). In the sm_90 compile 3 stages cost the 16-bit forward and dq at head_dim 32 / 64
# no instruction in their loops and keep them at <= 128 registers (two 8-warp blocks an SM) under Triton 3.9 and
# 3.6 (one exception under 3.6, the device's: dq at head_dim 64 without dropout takes 147, one block an SM), for
# 8-16 KB more shared memory a block; on sm_80 their loops grow 3-8%. dk/dv stays at 2: with 3, Triton
# 3.6's masked loops grew 12-26% (with dropout it runs 1: see its table). At head_dim 128, 2 stages take the
# forward past 128 registers (and spill on sm_80), so it keeps 1; dq and the dropout dk/dv are better with 2 in
# both Tritons (dq: 126-171 registers from 164-252, 3-8% fewer instructions). Chosen from the compile
# (2026-12-02), not yet timed on a GPU.
_FWD_CONFIGS = (
    (128, 64, 8, 3, _HALF, (32, 64), False),
    (128, 32, 8, 3, _HALF, (32, 64), True),  # (128 x 64 spilled on sm_80 at head_dim 32)
    (128, 32, 8, 1, _HALF, (128,)),  # (with dropout, 64 x 32 spilled on sm_80 and took ~1.9x the instructions a score)
    # (with dropout this was 16 x 32, which spilled on sm_90 under Triton 3.9 once the kernel took bh_offset; 32 x 32
    # takes 96 / 90 registers on sm_80 / sm_90 there, 96 / 86 under Triton 3.6)
    (32, 32, 4, 1, ("fp32",), (32,)),
    (32, 32, 8, 1, ("fp32",), (64,)),
    (16, 32, 8, 1, ("fp32",), (128,)),
    # Alternate: 64-row tiles on 4 warps, twice the programs of the default's, for grids that leave SMs idle
    # (short sequences, small batches: batch 1 x 12 heads x 128 tokens is 12 programs of 128 rows on 132 SMs).
    # 128 / 125 registers on sm_90 without / with dropout, spill-free on sm_80 (the 64 x 64 dropout tile spilled
    # there); not yet timed.
    (64, 64, 4, 3, _HALF, (32, 64), False),
    (64, 32, 4, 2, _HALF, (32, 64), True),
)
# dk/dv holds two [BLOCK_N, BLOCK_D] fp32 accumulators and transposed tiles: smaller query blocks than dq.
# Entries split by dropout where Triton 3.6's or 3.9's register allocation spilled one of the variants (the
# compile gate runs with CI's Triton; the Triton 3.6 results were checked with the same gate, see the notes).
_DKDV_CONFIGS = (
    (32, 128, 8, 2, _HALF, (32, 64), False),
    # (reading the packed dropout mask, 2 stages spilled on sm_80 at 255 registers; with 1 the sm_90 loop is shorter
    # too: 272 / 394 instructions from 307 / 414, fp16 head_dim 64)
    (32, 128, 8, 1, _HALF, (32, 64), True),
    (16, 64, 8, 1, _HALF, (128,), False),
    (32, 32, 8, 2, _HALF, (128,), True),  # (chosen 2026-12-02: spill-free under Triton 3.9 and 3.6)
    (16, 32, 8, 1, ("fp32",), (32, 128)),  # (32 x 32 spilled on sm_80 under Triton 3.6 with dropout)
    (16, 32, 4, 1, ("fp32",), (64,), False),
    (32, 32, 8, 1, ("fp32",), (64,), True),
    # Alternates: 64-key blocks on 4 warps, twice the programs (the default's 128-key blocks make one a (batch,
    # head) at 128 tokens). 150 / 233 registers on sm_90 without / with dropout, spill-free on sm_80 (with dropout
    # only at 1 stage); not yet timed.
    (32, 64, 4, 2, _HALF, (32, 64), False),
    (32, 64, 4, 1, _HALF, (32, 64), True),
)
# With dropout dq reads the backward's packed mask (attention_bwd._bits_keep); the dropout tiles below were
# re-chosen for it on 2026-12-02 where the previous ones spilled on sm_80 (ptxas held them to 80-128 registers).
_DQ_CONFIGS = (
    (128, 64, 8, 3, _HALF, (64,), False),
    (64, 64, 4, 3, _HALF, (32,), False),
    (128, 32, 8, 3, _HALF, (32, 64), True),
    (32, 64, 8, 2, _HALF, (128,), False),
    (64, 64, 8, 2, _HALF, (128,), True),  # (32 x 64: 45 instructions a score on sm_90, here 32-39)
    (32, 32, 4, 1, ("fp32",), (32,), False),
    (16, 32, 4, 1, ("fp32",), (32,), True),
    (16, 16, 4, 1, ("fp32",), (64,), False),
    (32, 32, 8, 1, ("fp32",), (64, 128), True),
    (16, 16, 8, 1, ("fp32",), (128,), False),
    # Alternates: at head_dim 64, 64-row tiles on 4 warps (twice the programs, as for the forward); at 32, the
    # other way round, head_dim 64's 128-row tile. With dropout, 64 x 32 on 4 warps. Spill-free in the gate; not
    # yet timed.
    (64, 64, 4, 2, _HALF, (64,), False),
    # At head_dim 64 also the 32-key tile: under Triton 3.6 (the device's) the default takes 147 registers on sm_90
    # (one block an SM; 128 under 3.9) and the 64-row alternate 153; this one 114 under both, for 27-34% more
    # instructions a score (sm_90 loop of 157 instructions for 16 scores a thread under 3.6, against the default's
    # 247 for 32; 186 against 277 under 3.9). Which wins is the timer's to say.
    (128, 32, 8, 3, _HALF, (64,), False),
    (128, 64, 8, 3, _HALF, (32,), False),
    (64, 32, 4, 2, _HALF, (32, 64), True),
)
_INTERPRETER_CONFIG = (32, 32, 4, 1)


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[t.dtype]


def _applicable(table, dtype: str, block_d: int, dropout: bool) -> list[tuple[int, int, int, int]]:
    return [
        entry[:4]
        for entry in table
        if dtype in entry[4] and block_d in entry[5] and (len(entry) < 7 or entry[6] == dropout)
    ]


def _as_meta(entry) -> dict:
    bm, bn, nw, ns = entry
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns}


_INTERPRETER_META = _as_meta(_INTERPRETER_CONFIG)
# Tunings are kept per bucket: the next power of two of the sequence length (max_seqlen for varlen) and of batch
# x heads, capped where larger grids fill the GPU alike.
_SEQ_BUCKET_MAX, _BH_BUCKET_MAX = 8192, 1024
# An alternate replaces the default only when it takes at most this fraction of the default's time (at least 3%
# faster), so that timing noise does not flip the choice from one run to the next.
_TUNE_MARGIN = 0.97


def _bucket(n: int, cap: int) -> int:
    return min(next_power_of_2(n), cap)


def _on_gpu(q: torch.Tensor) -> bool:
    return q.is_cuda


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _time(launch, meta: dict) -> float:
    """Median milliseconds of launch(meta) (CUDA events; Triton flushes the L2 cache between repeats)."""
    return triton.testing.do_bench(lambda: launch(meta), warmup=10, rep=40, return_mode="median")


class _Tiles:
    """The tile choice of one attention kernel: its table's default for the call's (dtype, head-dim block,
    dropout), or, on a GPU, the fastest of the default and its alternates, timed on the first call of each
    (sequence bucket, batch x heads bucket) and kept for the process. A dictionary lookup a launch, not
    triton.autotune, whose per-launch bookkeeping doubled these launchers' host time (benchmarks/host_overhead.py).

    Nothing is timed, and the default runs, off a GPU and while tuning is pinned (common.autotune_pinned:
    FASTBERT_AUTOTUNE=0 or torch.use_deterministic_algorithms(True); tiles sum in different orders, so a timed
    choice can change a result's last bits from one process to the next). Nothing is timed during CUDA-graph
    capture either: a bucket already timed keeps its tile, one not yet timed runs the default and is timed at its
    first call outside capture. The interpreter runs its own small tile."""

    def __init__(self, table):
        self.table = table
        self.candidates: dict[tuple, tuple[dict, ...]] = {}
        self.chosen: dict[tuple, dict] = {}

    def pick(self, lay: _Layout, q: torch.Tensor, dropout: bool, seq: int, launch) -> dict:
        """The meta-parameters for this call; launch(meta) runs the kernel with them (timed if a bucket is new)."""
        if interpreting():
            return _INTERPRETER_META
        dtype = _dtype_name(q)
        key = (dtype, lay.block_d, dropout)
        metas = self.candidates.get(key)
        if metas is None:
            metas = self.candidates[key] = tuple(_as_meta(e) for e in _applicable(self.table, *key))
        if len(metas) == 1 or not _on_gpu(q) or autotune_pinned():
            return metas[0]
        key += (_bucket(seq, _SEQ_BUCKET_MAX), _bucket(lay.batch * lay.heads, _BH_BUCKET_MAX), q.device.index)
        meta = self.chosen.get(key)
        if meta is None:
            meta = None if _capturing() else _fastest(metas, launch)
            if meta is None:  # (capturing, or out of memory for the timing: the default, timed at a later call)
                return metas[0]
            self.chosen[key] = meta
        return meta


def _fastest(metas: tuple[dict, ...], launch) -> dict | None:
    """The default (metas[0]) unless an alternate runs in at most _TUNE_MARGIN of its time; None (run the default,
    time the bucket later) when the timing itself runs out of memory (do_bench allocates a 256 MB buffer to flush
    the L2 cache, which a call near the memory's limit may not have to spare). An alternate that needs more than
    the GPU has (OutOfResources: shared memory, on a GPU with less than the gate's targets) is passed over, with
    a warning; any other failure propagates, the default's as an alternate's."""
    try:
        best, best_ms = metas[0], _time(launch, metas[0]) * _TUNE_MARGIN
        for meta in metas[1:]:
            try:
                ms = _time(launch, meta)
            except OutOfResources as e:
                warnings.warn(f"attention: tile {meta} does not fit this GPU ({e}); it is not timed", stacklevel=2)
                continue
            if ms <= best_ms:
                best, best_ms = meta, ms
    except torch.cuda.OutOfMemoryError:
        return None
    return best


_FWD_TILES, _DKDV_TILES, _DQ_TILES = _Tiles(_FWD_CONFIGS), _Tiles(_DKDV_CONFIGS), _Tiles(_DQ_CONFIGS)


def tuned_tiles() -> list[dict]:
    """What this process's timing chose so far, one dict per kernel and bucket (for benchmark records): kernel,
    dtype, block_d, dropout, seq_bucket, bh_bucket, device (its CUDA index), the tile (BLOCK_M, BLOCK_N,
    num_warps, num_stages) and whether it is the default."""
    rows = []
    for kernel, tiles in (("fwd", _FWD_TILES), ("dkdv", _DKDV_TILES), ("dq", _DQ_TILES)):
        for (dtype, block_d, dropout, seq_bucket, bh_bucket, device), meta in tiles.chosen.items():
            rows.append({"kernel": kernel, "dtype": dtype, "block_d": block_d, "dropout": dropout,
                         "seq_bucket": seq_bucket, "bh_bucket": bh_bucket, "device": device, **meta,
                         "default": meta is tiles.candidates[dtype, block_d, dropout][0]})  # fmt: skip
    return rows


# Runtime flags and sizes stay runtime (not constexpr) so that one compilation serves masked, varlen and dropout
# calls of any length; do_not_specialize keeps Triton from compiling a variant for each value equal to 1 or
# divisible by 16 (variants the compile gate would not see). What stays specialised: the pointers, the
# q/k/v/out strides and head_dim, which are always 16-byte aligned / multiples of 16 (fresh allocations,
# _aligned, HEAD_DIMS), so every launch compiles to the variant the gate checks, with vectorised loads.
_RUNTIME_ARGS = ["is_varlen", "has_mask", "seq_q", "seq_k", "heads", "stride_bias_b",
                 "dropout_threshold", "bits_len", "bh_offset"]  # fmt: skip


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b):
    # fp32 inputs: IEEE products (TF32 would miss the fp32 tolerance); half inputs: tensor cores, fp32 accumulate.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _d_ok(offs_d, head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Which of the BLOCK_D columns are real head-dim columns. With EVEN_D (head_dim == BLOCK_D) the mask is a
    compile-time constant, so loads along d vectorise (16 bytes a thread) and pipeline (cp.async); a runtime
    `offs_d < head_dim` makes every column's predicate differ, and Triton then loads element by element (2-byte
    loads, no cp.async: seen in the PTX)."""
    if EVEN_D:
        return offs_d < BLOCK_D
    else:
        # head_dim 80 or 96: Triton specialises it as a multiple of 16, so the mask is constant over 16 columns and
        # the loads still vectorise.
        return offs_d < head_dim


@triton.jit
def _sequence(cu_seqlens_ptr, b, seq_q, seq_k, is_varlen):
    """(first token, query length, key length) of sequence b."""
    start = 0
    len_q = seq_q
    len_k = seq_k
    if is_varlen:
        start = tl.load(cu_seqlens_ptr + b)
        len_q = tl.load(cu_seqlens_ptr + b + 1) - start
        len_k = len_q
    return start, len_q, len_k


@triton.jit
def _key_bias(bias_row_ptr, offs_n, n_ok, has_mask):
    """0.0 for each key that may be attended, -inf for the others, added to the scores (inside one fma with the
    scale) instead of a select: a select needs a predicate per key column held across the softmax, more than the
    7 predicate registers a thread has (the SASS then packed and unpacked predicate bits, ~300 integer
    instructions per loop iteration). With a padding mask the bias row is loaded as is: key_bias() padded it with
    -inf to a whole number of KEY_BIAS_BLOCK columns, so no bounds mask is needed; without one, keys past the
    sequence's end get -inf."""
    if has_mask:
        bias = tl.load(bias_row_ptr + offs_n)
    else:
        bias = tl.where(n_ok, 0.0, float("-inf"))
    return bias


@triton.jit
def _attended_prefix(bias_row_ptr, stride_bias_b, len_k, has_mask):
    """How many leading keys of this row are all attended, so that their whole blocks can run without the key
    bias: len_k without a padding mask; with one, the count key_bias() keeps in the bias row's last element
    (capped at len_k). A full row of a mask (a CUDA graph always passes the mask) then runs as if unmasked, and
    a right-padded one runs unmasked up to its length's last whole block."""
    counted = tl.load(bias_row_ptr + stride_bias_b - 1, mask=has_mask != 0, other=0.0)
    return tl.where(has_mask != 0, tl.minimum(counted.to(tl.int32), len_k), len_k)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, rows, offs_d, d_ok, start, lo, hi, len_k,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, has_mask, dropout_threshold, dropout_scale, seed, seq_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks starting at lo, lo + BLOCK_N, ... < hi; returns (acc, l_i, m_i).

    Unmasked (every key of every block attended; qk_scale >= 0): the row max is taken on the unscaled scores and
    scale and max meet in one fma, ``p = 2^(s·scale - m)``. Masked: ``s = s·scale + bias`` (bias -inf for keys
    past the end or masked out, _key_bias), then ``p = 2^(s - m)``, where a row with no key so far has m = -inf
    and subtracts 0 instead (p = 0 rather than NaN)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        tok_n = start + offs_n
        n_ok = offs_n < len_k
        if MASKED:
            kt_ok = n_ok[None, :] & d_ok[:, None]
        else:
            kt_ok = d_ok[:, None]  # whole blocks: no mask along the keys
        kt = tl.load(k_base + tok_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kt_ok, other=0.0)
        if MASKED:
            s = tl.fma(_dot(q, kt), qk_scale, _key_bias(bias_row_ptr, offs_n, n_ok, has_mask)[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
        else:
            s = _dot(q, kt)
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, seq_k, start_n, dropout_threshold, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * dropout_scale, 0.0)
        if MASKED:
            v_ok = n_ok[:, None] & d_ok[None, :]
        else:
            v_ok = d_ok[None, :]
        v = tl.load(v_base + tok_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=v_ok, other=0.0)
        acc += _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _attention_fwd_kernel(
    q_ptr,  # [B, H, Sq, D] (padded) or [total, H, D] (varlen: stride_qb = 0), any strides
    k_ptr,  # [B, H, Sk, D] or [total, H, D]
    v_ptr,  # like k
    o_ptr,  # like q, out
    lse_ptr,  # [B·H·Sq] (padded) or [H·total] (varlen), fp32 out, base 2
    bias_ptr,  # [B, >= Sk] fp32 key bias (0 = attend, -inf = not), key_bias(); read iff has_mask
    cu_seqlens_ptr,  # [B + 1] int32, read iff is_varlen
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_bias_b,
    seq_q,  # padded: Sq; varlen: total tokens
    seq_k,  # padded: Sk; varlen: max_seqlen
    heads,
    head_dim,
    qk_scale,  # scale · log2(e)
    is_varlen,
    has_mask,
    dropout_threshold,
    dropout_scale,  # 1 / (1 - p)
    seed_ptr,  # [1] int64, the dropout seed (common.seed_arg), read iff HAS_DROPOUT
    bh_offset,  # (batch, head) of the grid's first row: launches come in chunks of at most MAX_GRID_Y
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
    seed = load_seed(seed_ptr, HAS_DROPOUT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = _d_ok(offs_d, head_dim, BLOCK_D, EVEN_D)
    tok_m = start + offs_m

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + tok_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    # lse index doubles as the dropout row id (see the module docstring). Without dropout this is dead code: the
    # lse store computes it anew after the loops (held across them, even its scalar part cost 7 registers a thread
    # in the fp16 head_dim 64 variant, past the 128 that let two blocks share an SM)
    rows = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start + offs_m

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Key blocks that need no masking (whole blocks, no padding mask) first, then the rest: the unmasked loop
    # spends one fma per score on scale and max, the masked one also adds the key bias (see _fwd_blocks).
    bias_row_ptr = bias_ptr + b.to(tl.int64) * stride_bias_b
    n_full = (_attended_prefix(bias_row_ptr, stride_bias_b, len_k, has_mask) // BLOCK_N) * BLOCK_N
    # The unmasked loop takes the row max of unscaled scores, which needs a non-negative scale: a negative one
    # (legal, never seen in a model) runs every block in the masked loop instead. Negating q for it instead, a
    # branch over the q tile, cost 9-18 registers a thread in every variant (the compile gate's counts).
    n_full = tl.where(qk_scale < 0, 0, n_full)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, rows, offs_d, d_ok, start, 0,
                                n_full, len_k, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, has_mask,
                                dropout_threshold, dropout_scale, seed, seq_k, BLOCK_M, BLOCK_N, HAS_DROPOUT,
                                False)  # fmt: skip
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, bias_row_ptr, rows, offs_d, d_ok, start,
                                n_full, len_k, len_k, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                                has_mask, dropout_threshold, dropout_scale, seed, seq_k, BLOCK_M, BLOCK_N,
                                HAS_DROPOUT, True)  # fmt: skip

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + tok_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])  # fmt: skip
    lse = tl.where(empty_row, float("inf"), m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i)))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.where(is_varlen != 0, h, bh).to(tl.int64) * seq_q + start + offs_m
    tl.store(lse_ptr + rows, lse, mask=offs_m < len_q)


# ----------------------------------------------------------------------------------------------- launchers
def _is_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(s % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can read it in place: unit head_dim stride, other strides multiples of 16
    elements, 16-byte aligned base; so transformers' transposed [B, H, S, D] views and packed [total, H, D]
    tensors are not copied. Anything else (a strided or offset view; rare) becomes a fresh contiguous copy, whose
    strides are products of sizes that include head_dim (a multiple of 16). Triton then always specialises the
    launch on 16-divisible strides and aligned pointers: the variant the compile gate compiles, with 16-byte
    vector loads."""
    if _is_aligned(t):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _check_offsets(*tensors: torch.Tensor) -> None:
    """Offsets inside one (batch, head) slice are int32 (fewer registers than int64 tiles of offsets); the slice
    base is int64. Say so rather than wrap around."""
    for t in tensors:
        token_dim = 2 if t.dim() == 4 else 0
        if t.shape[token_dim] * abs(t.stride(token_dim)) + t.shape[-1] >= 2**31:
            raise ValueError(f"attention: a tensor of shape {tuple(t.shape)} and strides {t.stride()} spans more "
                             "than 2^31 elements within one head; split the batch")  # fmt: skip


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, token, d) strides: [B, H, S, D] as is, packed [total, H, D] with batch stride 0."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, t.stride(1), t.stride(0), t.stride(2)


class _Layout:
    """Sizes shared by the launchers: padded [B, H, S, D] or packed [total, H, D] + cu_seqlens."""

    def __init__(self, q, k, cu_seqlens, max_seqlen, bias):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.batch, self.heads, self.head_dim = cu_seqlens.numel() - 1, q.shape[1], q.shape[2]
            self.seq_q, self.seq_k, self.max_q = q.shape[0], max_seqlen, max_seqlen
            self.cu = aligned_base(cu_seqlens)
        else:
            self.batch, self.heads, self.seq_q, self.head_dim = q.shape
            self.seq_k, self.max_q = k.shape[2], q.shape[2]
            self.cu = placeholder(q.device, torch.int32)
        self.has_mask = bias is not None
        if bias is not None:
            ok = bias.dtype == torch.float32 and bias.dim() == 2 and bias.shape[0] == self.batch
            ok = ok and bias.is_contiguous() and bias.shape[1] % KEY_BIAS_BLOCK == 0
            ok = ok and bias.shape[1] >= cdiv(max(self.seq_k, 1), KEY_BIAS_BLOCK) * KEY_BIAS_BLOCK + KEY_BIAS_BLOCK
            if not ok:  # the kernels read whole blocks of it without bounds checks, and its rows' last elements
                got = f"{bias.dtype} {tuple(bias.shape)}"
                raise ValueError("attention: the key bias must come from key_bias() (fp32 [batch, seq_k rounded up "
                                 f"to {KEY_BIAS_BLOCK}, plus {KEY_BIAS_BLOCK}], contiguous), got {got}")  # fmt: skip
        self.bias = aligned_base(bias) if bias is not None else placeholder(q.device, torch.float32).view(1, 1)
        self.block_d = max(32, next_power_of_2(self.head_dim))
        self.even_d = self.block_d == self.head_dim
        self.lse_shape = (self.heads * self.seq_q,) if self.varlen else (self.batch * self.heads * self.seq_q,)

    def bwd_flags(self, dropout_p: float, bits: torch.Tensor) -> tuple:
        """dq's and dk/dv's (is_varlen, has_mask, dropout_scale, bits_ptr, bits_len); bh_offset follows."""
        return int(self.varlen), int(self.has_mask), 1.0 / (1.0 - dropout_p), bits, self.max_q

    def flags(self, dropout_p: float, seed: torch.Tensor | None, device: torch.device) -> tuple:
        return (int(self.varlen), int(self.has_mask), dropout_threshold(dropout_p, DROPOUT_BITS.value),
                1.0 / (1.0 - dropout_p), seed_arg(seed if dropout_p > 0.0 else None, device))  # fmt: skip


# CUDA's limit on a grid's second dimension, which counts (batch, head) pairs in every attention kernel: more of
# them (e.g. 5462 sequences of 12 heads) launch in chunks, each kernel adding its chunk's bh_offset.
MAX_GRID_Y = 65535

# Columns of the key bias come in whole blocks of this many, at least the largest BLOCK_N of any config, so that
# every key block a kernel reads lies inside the row (the kernels load it without a bounds mask).
KEY_BIAS_BLOCK = 128
assert all(entry[1] <= KEY_BIAS_BLOCK and KEY_BIAS_BLOCK % entry[1] == 0
           for entry in (*_FWD_CONFIGS, *_DKDV_CONFIGS, *_DQ_CONFIGS, _INTERPRETER_CONFIG))  # fmt: skip
# Dropout draws its mask in groups of 32 keys (_dropout_keep): every config that may run with dropout takes key
# blocks of a multiple of 32.
assert all(entry[1] % 32 == 0 for entry in (*_FWD_CONFIGS, *_DKDV_CONFIGS, *_DQ_CONFIGS, _INTERPRETER_CONFIG)
           if len(entry) < 7 or entry[6])  # fmt: skip


def key_bias(mask: torch.Tensor, seq_k: int) -> torch.Tensor:
    """The kernels' form of a [batch, seq_k] key-padding mask (nonzero / True = attend): fp32 [batch, seq_k
    rounded up to KEY_BIAS_BLOCK, plus one block], 0.0 where attended, -inf where masked and past seq_k; the
    row's last element holds how many leading keys are all attended (the kernels run those whole blocks without
    the bias: _attended_prefix). Made once per call and shared by the forward and the backward."""
    padded = cdiv(max(seq_k, 1), KEY_BIAS_BLOCK) * KEY_BIAS_BLOCK
    bias = torch.full((mask.shape[0], padded + KEY_BIAS_BLOCK), float("-inf"), device=mask.device,
                      dtype=torch.float32)  # fmt: skip
    attend = mask != 0
    bias[:, :seq_k].masked_fill_(attend, 0.0)
    bias[:, -1] = attend.to(torch.int32).cumprod(dim=1).sum(dim=1)  # exact in fp32 up to 2^24 keys
    return bias


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded: q [B, H, Sq, D], k, v [B, H, Sk, D] (any strides), bias None (no mask) or key_bias(mask, Sk).
    Varlen: q, k, v [total, H, D], cu_seqlens [B + 1] int32, max_seqlen. ``out`` (optional, written
    in place) may have any strides. Returns (out, lse fp32 base 2, indexed as described in the module docstring)."""
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    assert out is None or _is_aligned(out), "out must have a unit last stride, other strides multiples of 16"
    _check_offsets(q, k, v, *([] if out is None else [out]))
    lay = _Layout(q, k, cu_seqlens, max_seqlen, bias)
    scale = lay.head_dim**-0.5 if scale is None else scale
    if out is None:
        out = empty(q.shape, device=q.device, dtype=q.dtype)
    lse = empty(lay.lse_shape, device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return out, lse
    flags = lay.flags(dropout_p, seed, q.device)

    n_bh = lay.batch * lay.heads

    def launch(meta, bh0=0):
        _attention_fwd_kernel[(cdiv(lay.max_q, meta["BLOCK_M"]), min(n_bh - bh0, MAX_GRID_Y))](
            q, k, v, out, lse, lay.bias, lay.cu,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), lay.bias.stride(0),
            lay.seq_q, lay.seq_k, lay.heads, lay.head_dim, scale * LOG2E, *flags, bh0,
            BLOCK_D=lay.block_d, HAS_DROPOUT=dropout_p > 0.0, EVEN_D=lay.even_d, enable_fp_fusion=FP_FUSION, **meta,
        )  # fmt: skip

    meta = _FWD_TILES.pick(lay, q, dropout_p > 0.0, lay.max_q, launch)  # (timed on the first chunk)
    for bh0 in range(0, n_bh, MAX_GRID_Y):
        launch(meta, bh0)
    return out, lse


# ----------------------------------------------------------------------------------------------- compile gate
def _signature(names: str, dtype: str) -> dict[str, str]:
    """Kernel signature from a compact spec: 'T' pointers get the input dtype, 'F' fp32 pointers, 'B' int8,
    'C' int32, 'L' int64 and 'U' uint8 pointers, 'i' i32, 'a' i32 divisible by 16 (the strides _aligned
    guarantees), 'l' i64, 'f' fp32 scalars, 'c' and '1' constexpr (the head_dim strides, always 1: see _aligned)."""
    kinds = {"T": f"*{dtype}", "F": "*fp32", "B": "*i8", "C": "*i32", "L": "*i64", "U": "*u8", "i": "i32",
             "a": "i32", "l": "i64", "f": "fp32", "c": "constexpr", "1": "constexpr"}  # fmt: skip
    return {name: kinds[kind] for name, kind in (item.split(":") for item in names.split())}


def _unit_strides(sig: str) -> dict[str, int]:
    return {item.split(":")[0]: 1 for item in sig.split() if item.endswith(":1")}


def _divisible(sig: str) -> tuple[str, ...]:
    """The arguments Triton specialises as divisible by 16 on every launch: all pointers (16-byte aligned: fresh
    allocations, or inputs _aligned / aligned_base checked) and the 'a' strides."""
    items = [item.split(":") for item in sig.split()]
    return tuple(name for name, kind in items if kind in "TFBCLUa")


_STRIDES = "stride_{0}b:a stride_{0}h:a stride_{0}{1}:a stride_{0}d:1"
_FLAGS = "is_varlen:i has_mask:i dropout_threshold:i dropout_scale:f seed_ptr:L bh_offset:i"
_FWD_SIG = (
    "q_ptr:T k_ptr:T v_ptr:T o_ptr:T lse_ptr:F bias_ptr:F cu_seqlens_ptr:C "
    + " ".join(_STRIDES.format(x, y) for x, y in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m")))
    + " stride_bias_b:i seq_q:i seq_k:i heads:i head_dim:a qk_scale:f " + _FLAGS
    + " BLOCK_M:c BLOCK_N:c BLOCK_D:c HAS_DROPOUT:c EVEN_D:c"
)  # fmt: skip


def _expect_wgmma(kind: str, dtype: str, bm: int, bn: int) -> bool:
    """Whether sm_90 must compile this case to warp-group MMA (wgmma), as the gate found: 16-bit dots whose M
    dimension (query block; key block for dk/dv) is at least 64. fp32 (IEEE) dots never use tensor cores."""
    return dtype != "fp32" and (bn if kind == "dkdv" else bm) >= 64


def _register_budget(kind: str, dtype: str, block_d: int, dropout: bool) -> int | None:
    """The sm_90 register budget a case is held to (GateCase.max_registers_sm90): 128 a thread, so that two blocks of 8
    warps share an SM, for the 16-bit forward and dq at head_dim 32 and 64 and both without dropout at 128 (dq there
    since it runs 2 stages: 126 registers, from 166 with 1). With one block an SM, the forward's two warp groups run
    their MMAs and their softmax roughly in step, with nothing to fill the tensor cores meanwhile (the fp16 head_dim
    64 forward took 139-142 registers, one block an SM, when it measured 148 TFLOP/s on the H100 on 2026-11-25,
    against cuDNN's 354). dk/dv (two accumulators) and both with dropout at head_dim 128 hold more state and get no
    budget."""
    if dtype == "fp32" or kind == "dkdv":
        return None
    if block_d <= 64 or not dropout:
        return 128
    return None


def _even_d_values(block_d: int) -> tuple[bool, ...]:
    """head_dim 32, 64 and 128 fill their block (EVEN_D); 80 and 96 run masked in the 128 block."""
    return (True, False) if block_d == 128 else (True,)


def table_cases(kind: str, fn, table, sig: str) -> list[GateCase]:
    """The gate cases of one attention kernel ("fwd", "dkdv", "dq"): each entry of its config table that applies,
    for every dtype x head-dim block x EVEN_D x dropout. Masks, varlen and the sizes are runtime arguments (not
    specialised), so one compilation covers them all. The 16-bit tiles must load 16 bytes at a time
    (vector_loads) wherever d is unmasked."""
    cases = []
    for dtype, block_d, drop in itertools.product(("fp16", "bf16", "fp32"), (32, 64, 128), (False, True)):
        budget = _register_budget(kind, dtype, block_d, drop)
        for even_d in _even_d_values(block_d):
            d_tag = f"d{block_d}" if even_d else f"d{block_d}masked"
            for i, (bm, bn, nw, ns) in enumerate(_applicable(table, dtype, block_d, drop)):
                # (the register budget holds the default to the occupancy it was chosen for; an alternate's shows
                # in its time, which _Tiles measures)
                held = budget if i == 0 else None
                constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "HAS_DROPOUT": drop,
                              "EVEN_D": even_d} | _unit_strides(sig)  # fmt: skip
                cases.append(GateCase(
                    f"attention_{kind}-{dtype}-{d_tag}-drop{int(drop)}-m{bm}n{bn}w{nw}s{ns}", fn,
                    _signature(sig, dtype), constexprs, nw, ns,
                    expect_wgmma_sm90=_expect_wgmma(kind, dtype, bm, bn),
                    divisible=_divisible(sig), vector_loads=dtype != "fp32",
                    max_registers_sm90=held,
                    # two blocks an SM need the shared memory too
                    max_shared_sm90=None if held is None else SM90_SHARED_TWO_BLOCKS,
                ))  # fmt: skip
    return cases


def gate_cases() -> list[GateCase]:
    """Every compilation attention_fwd may request (the backward's: fastbert.kernels.attention_bwd)."""
    return table_cases("fwd", _attention_fwd_kernel, _FWD_CONFIGS, _FWD_SIG)
