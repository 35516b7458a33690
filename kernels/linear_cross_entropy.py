"""Cross-entropy over the rows of a logits matrix, for the masked-LM head's ``F.linear`` + ``F.cross_entropy``.

BERT's pretraining (and masked-LM fine-tuning) ends in ``logits = h @ W.T + b`` over the whole vocabulary (30522
words for BERT, 250002 for XLM-R), then ``cross_entropy(logits, labels, ignore_index=-100)``, the mean over the
labelled tokens. For BERT-base at 32 x 512 tokens the logits are 16384 x 30522: 1 GB in bf16. Under autocast eager
PyTorch then makes an fp32 copy (2 GB), a saved fp32 log-softmax (2 GB) and, in the backward, two more fp32
[tokens, vocab] tensors and a cast back: about 20 GB of memory traffic and 4-5 GB more peak memory than the logits
themselves. The kernels here read the logits as they are (any float dtype, math in fp32):

    forward, per row:   lse = log(sum_j exp(x_j)),   loss_row = lse - x_label   (0 for an ignored row)
    mean:               loss = sum(loss_row) / n_labelled     (0 / 0 = NaN when nothing is labelled, as PyTorch)
    backward, per row:  dx_j = g · (exp(x_j - lse) - [j == label]),   g = dloss / n_labelled (0 if ignored)

so the forward reads the logits once and keeps only lse (4 bytes a row), and the backward reads them once more and
writes their gradient in their own dtype. Rows whose label is ignored have a zero gradient (in real masked-LM
batches ~85% of the rows): the backward can compute the labelled rows' alone, compactly (gather, rows listed by
index), so that the decoder's gradient GEMMs run over those rows only; otherwise ignored rows skip their loads.
``gather`` is a runtime argument, not a constexpr: both forms are one compiled kernel, so a CUDA graph captured
after an eager warm-up that ran the other form (the graph cannot count the labelled rows: it takes every row)
finds the kernel loaded; loading a module during capture fails.

The logits have a padded row stride (a multiple of 64; fastbert.ops.linear_cross_entropy pads the vocabulary of
its GEMM so: cuBLAS takes its slower sm_80 kernels for an odd leading dimension such as 30522). Columns past the
vocabulary are never read as logits, and their gradient is written as zero.

A label outside [0, vocab) other than ignore_index makes its row's loss NaN, and its row's gradient NaN (PyTorch
raises instead; checking on the host would cost a device sync every step).

Specialisation: no integer argument is specialised (do_not_specialize); the launchers pass 16-byte aligned
pointers and row strides that are multiples of 64, which the kernels tell the compiler, so each dtype compiles
exactly the variant the compile gate checks, loading 16 bytes a thread.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastbert.kernels.common import FP_FUSION, GateCase, aligned_base, empty, pointer_args

# The padded vocabulary of the logits: a multiple of this (also what the row strides are).
VOCAB_ALIGN = 64
# Columns a program handles per loop trip (16 fp32 values a thread on 8 warps), and the warps.
BLOCK_V = 4096
NUM_WARPS = 8
# Rows the mean kernel sums per loop trip (one program).
BLOCK_MEAN = 1024
_LOG2E = tl.constexpr(1.4426950408889634)

_RUNTIME_ARGS = ["stride_row", "M", "V", "ignore_index", "gather"]


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _cross_entropy_fwd_kernel(
    logits_ptr,  # [M, stride_row] (the first V columns are the logits), unit column stride
    labels_ptr,  # [M] int64
    loss_ptr,  # [M] out, fp32: lse - logit[label]; 0 for an ignored row, NaN for a label out of range
    lse_ptr,  # [M] out, fp32
    stride_row,  # a multiple of VOCAB_ALIGN (the launcher checks it)
    M,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    # The launcher guarantees both: written so, the compiler knows them and every load moves 16 bytes a thread.
    stride_row = (stride_row // 64) * 64
    v16 = tl.cdiv(V, 16) * 16  # within the padded row; columns in [V, v16) are loaded, then masked to -inf
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    # the label's logit, picked up on the way (a gather of one element would be a lone 2-byte load)
    x_label = 0.0
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptr + c, mask=c < v16, other=0.0).to(tl.float32)
        x = tl.where(c < V, x, -float("inf"))
        x_label += tl.sum(tl.where(c == label, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((x - m_new) * _LOG2E), axis=0)
        m = m_new
    lse = m + tl.log(s)

    labelled = label != ignore_index
    in_range = (label >= 0) & (label < V)
    loss = tl.where(labelled, tl.where(in_range, lse - x_label, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["M", "ignore_index"])
def _cross_entropy_mean_kernel(
    row_loss_ptr,  # [M] fp32, from the forward kernel
    labels_ptr,  # [M] int64
    loss_ptr,  # [] out, fp32: sum(row_loss) / n_labelled
    inv_count_ptr,  # [1] out, fp32: 1 / n_labelled (inf when nothing is labelled), for the backward
    M,
    ignore_index,
    BLOCK: tl.constexpr,
):
    # One program, a fixed order: the loss is deterministic.
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, M, BLOCK):
        r = start + offs
        ok = r < M
        total += tl.load(row_loss_ptr + r, mask=ok, other=0.0)
        count += (tl.load(labels_ptr + r, mask=ok, other=ignore_index) != ignore_index).to(tl.int32)
    n = tl.sum(count, axis=0).to(tl.float32)
    tl.store(loss_ptr, tl.math.div_rn(tl.sum(total, axis=0), n))
    tl.store(inv_count_ptr, tl.math.div_rn(1.0, n))


@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _cross_entropy_bwd_kernel(
    logits_ptr,  # [M, stride_row], as in the forward
    labels_ptr,  # [M] int64
    lse_ptr,  # [M] fp32, from the forward
    dloss_ptr,  # [1]: the gradient of the mean loss
    inv_count_ptr,  # [1] fp32, from the mean kernel
    dlogits_ptr,  # [programs, stride_row] out, logits' dtype: every column written (zeros past V)
    rows_ptr,  # [programs] int64 with gather: the row of the logits each program's output row is the gradient of
    stride_row,
    M,
    V,
    ignore_index,
    gather,  # nonzero: the gradient of the rows in rows_ptr only (compact); 0: of every row (rows_ptr not read)
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    if gather != 0:
        row = tl.load(rows_ptr + pid)
    else:
        row = pid.to(tl.int64)
    stride_row = (stride_row // 64) * 64
    v16 = tl.cdiv(V, 16) * 16
    offset = row * stride_row
    out_offset = pid.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    labelled = label != ignore_index
    in_range = (label >= 0) & (label < V)
    g = tl.load(dloss_ptr).to(tl.float32) * tl.load(inv_count_ptr)
    g = tl.where(labelled, tl.where(in_range, g, float("nan")), 0.0)
    lse = tl.load(lse_ptr + row)
    # an ignored row loads nothing (its loads' bound is 0): exp(-inf) = 0 gives its zero gradient
    load_end = tl.where(labelled, v16, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, stride_row, BLOCK_V):
        c = start + cols
        x = tl.load(logits_ptr + offset + c, mask=c < load_end, other=-float("inf")).to(tl.float32)
        x = tl.where(c < V, x, -float("inf"))
        d = g * tl.exp2((x - lse) * _LOG2E) - tl.where(c == label, g, 0.0)
        tl.store(dlogits_ptr + out_offset + c, d.to(dlogits_ptr.dtype.element_ty), mask=c < stride_row)


# ----------------------------------------------------------------------------------------------- launchers
def _check_layout(logits: torch.Tensor, v: int) -> None:
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [M, stride] with unit column stride"
    assert logits.stride(0) % VOCAB_ALIGN == 0 and logits.stride(0) >= v, "logits' row stride must be padded"
    assert logits.data_ptr() % 16 == 0, "logits must start 16-byte aligned"


def cross_entropy_fwd(
    logits: torch.Tensor, v: int, labels: torch.Tensor, ignore_index: int, block_v: int = BLOCK_V
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [M, Vp] with Vp a multiple of VOCAB_ALIGN and the first v columns the logits; labels: [M] int64.
    Returns (loss [] fp32, lse [M] fp32, inv_count [1] fp32). ``block_v`` is for tests (the gate compiles the
    default)."""
    _check_layout(logits, v)
    M = logits.shape[0]
    labels = aligned_base(labels)
    row_loss = empty((M,), device=logits.device, dtype=torch.float32)
    lse = empty((M,), device=logits.device, dtype=torch.float32)
    loss = empty((), device=logits.device, dtype=torch.float32)  # 0-d itself: a view would refuse in-place ops
    inv_count = empty((1,), device=logits.device, dtype=torch.float32)
    if M > 0:
        _cross_entropy_fwd_kernel[(M,)](
            logits, labels, row_loss, lse, logits.stride(0), M, v, ignore_index, BLOCK_V=block_v, num_warps=NUM_WARPS,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    _cross_entropy_mean_kernel[(1,)](row_loss, labels, loss, inv_count, M, ignore_index, BLOCK=BLOCK_MEAN,
                                     num_warps=4, enable_fp_fusion=FP_FUSION)  # fmt: skip
    return loss, lse, inv_count


def cross_entropy_bwd(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    v: int,
    labels: torch.Tensor,
    lse: torch.Tensor,
    inv_count: torch.Tensor,
    ignore_index: int,
    rows: torch.Tensor | None = None,
    block_v: int = BLOCK_V,
) -> torch.Tensor:
    """The gradient of cross_entropy_fwd's mean loss with respect to the padded logits: [M, Vp] contiguous in
    logits' dtype, zero in the columns past v; with ``rows`` (int64 row indices) only those rows' gradients, as
    [len(rows), Vp] (the other rows of a mean over labelled rows are zero when rows lists the labelled ones).
    dloss: the loss's gradient (a one-element tensor, read on the device: no sync)."""
    _check_layout(logits, v)
    M, vp = logits.shape[0], logits.stride(0)
    labels = aligned_base(labels)
    gather = rows is not None
    programs = rows.numel() if gather else M
    dlogits = empty((programs, vp), device=logits.device, dtype=logits.dtype)
    if programs > 0:
        dloss = aligned_base(dloss.reshape(1))
        rows = aligned_base(rows) if gather else labels  # (labels: an int64 stand-in, not read)
        _cross_entropy_bwd_kernel[(programs,)](
            logits, labels, lse, dloss, inv_count, dlogits, rows, vp, M, v, ignore_index, int(gather),
            BLOCK_V=block_v, num_warps=NUM_WARPS, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return dlogits


# ----------------------------------------------------------------------------------------------- compile gate
def gate_cases() -> list[GateCase]:
    """Every compilation the launchers may request: the forward and backward for each logits dtype (the
    incoming loss gradient is fp32: the op's loss is fp32 until it leaves the op), and the mean kernel. Every
    pointer is 16-byte aligned; no integer is specialised."""
    cases = []
    for dt in ("fp32", "fp16", "bf16"):
        cases.append(GateCase(
            f"cross_entropy_fwd-{dt}", _cross_entropy_fwd_kernel,
            {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
             "stride_row": "i32", "M": "i32", "V": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr"},
            {"BLOCK_V": BLOCK_V}, NUM_WARPS, vector_loads=True,
        ))  # fmt: skip
        cases.append(GateCase(
            f"cross_entropy_bwd-{dt}", _cross_entropy_bwd_kernel,
            {"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp32", "dloss_ptr": "*fp32",
             "inv_count_ptr": "*fp32", "dlogits_ptr": f"*{dt}", "rows_ptr": "*i64", "stride_row": "i32",
             "M": "i32", "V": "i32", "ignore_index": "i32", "gather": "i32", "BLOCK_V": "constexpr"},
            {"BLOCK_V": BLOCK_V}, NUM_WARPS, vector_loads=True,
        ))  # fmt: skip
    cases.append(GateCase(
        "cross_entropy_mean", _cross_entropy_mean_kernel,
        {"row_loss_ptr": "*fp32", "labels_ptr": "*i64", "loss_ptr": "*fp32", "inv_count_ptr": "*fp32", "M": "i32",
         "ignore_index": "i32", "BLOCK": "constexpr"},
        {"BLOCK": BLOCK_MEAN}, 4,
    ))  # fmt: skip
    return [dataclasses.replace(c, divisible=pointer_args(c.signature)) for c in cases]
