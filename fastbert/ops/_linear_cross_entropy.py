"""ops.linear_cross_entropy: validation, dispatch, autograd and the torch.library custom ops around
fastbert.kernels.linear_cross_entropy (the masked-LM head's decoder Linear and its cross-entropy loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import reference
from fastbert.ops._common import (
    autocast_dtype,
    call,
    check_float,
    check_linear,
    check_same_device,
    eager_function,
    use_triton,
)

# Kept here (not imported from the kernel module) so that importing fastbert never imports Triton.
VOCAB_ALIGN = 64


def _kernels():
    from fastbert.kernels import linear_cross_entropy as k

    assert k.VOCAB_ALIGN == VOCAB_ALIGN
    return k


def _padded(t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """t ([V, ...]) cast to dtype, with zero rows appended up to ``rows``: one copy (none when nothing changes)."""
    if t.shape[0] == rows:
        return t.to(dtype).contiguous()
    out = torch.empty((rows, *t.shape[1:]), device=t.device, dtype=dtype)
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].zero_()
    return out


def _fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    v = weight.shape[0]
    vp = -(-v // VOCAB_ALIGN) * VOCAB_ALIGN
    # The GEMM over a vocabulary padded to a multiple of 64: cuBLAS runs its sm_80 kernels for an odd leading
    # dimension (BERT's 30522), at about half the speed. The padding rows are zero and never read as logits.
    logits = F.linear(x, _padded(weight, vp, x.dtype), None if bias is None else _padded(bias, vp, x.dtype))
    loss, lse, inv_count = _kernels().cross_entropy_fwd(logits, v, labels, ignore_index)
    return logits, loss, lse, inv_count


_fwd = torch.library.custom_op("fastbert::linear_cross_entropy_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, weight, bias, labels, ignore_index):
    vp = -(-weight.shape[0] // VOCAB_ALIGN) * VOCAB_ALIGN
    m = x.shape[0]
    f32 = dict(dtype=torch.float32)
    return x.new_empty((m, vp)), x.new_empty((), **f32), x.new_empty((m,), **f32), x.new_empty((1,), **f32)


def _bwd_impl(
    dlogits_in: torch.Tensor | None,
    dloss: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    inv_count: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v, vp = weight.shape[0], logits.shape[1]
    rows = None
    if dloss is not None and dlogits_in is None and not (logits.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Only the labelled rows have a gradient (a masked-LM batch labels ~15% of its tokens): the backward's
        # GEMMs then run over those rows alone. Their number is needed on the host, which costs one device sync.
        rows = (labels != ignore_index).nonzero().squeeze(1)
        if rows.numel() == labels.numel():
            rows = None
    if dloss is not None:
        dlogits = _kernels().cross_entropy_bwd(dloss.float(), logits, v, labels, lse, inv_count, ignore_index,
                                               rows)  # fmt: skip
        if dlogits_in is not None:  # the logits were used elsewhere too
            dlogits += dlogits_in
    else:
        dlogits = dlogits_in.contiguous()
    w = _padded(weight, vp, x.dtype)
    if rows is None:
        dx = dlogits @ w
        dweight = (dlogits.t() @ x)[:v].to(weight.dtype)
    else:
        dx = torch.zeros_like(x).index_copy_(0, rows, dlogits @ w)
        dweight = (dlogits.t() @ x.index_select(0, rows))[:v].to(weight.dtype)
    # (PyTorch's Linear backward sums the bias gradient in the GEMM's dtype; an fp32 sum is at least as exact)
    dbias = dlogits.sum(0, dtype=torch.float32)[:v].to(weight.dtype) if has_bias else weight.new_empty((0,))
    return dx, dweight, dbias


_bwd = torch.library.custom_op("fastbert::linear_cross_entropy_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dlogits_in, dloss, logits, labels, lse, inv_count, x, weight, has_bias, ignore_index):
    dbias = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,))
    return x.new_empty(x.shape), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, labels, ignore_index = inputs
    # lse and inv_count are outputs only so they can be saved; their incoming gradients are ignored.
    logits, _, lse, inv_count = output
    ctx.save_for_backward(x, weight, labels, logits, lse, inv_count)
    ctx.has_bias, ctx.ignore_index = bias is not None, ignore_index
    ctx.bias_dtype = None if bias is None else bias.dtype
    # An unused output (the logits, in a plain loss.backward()) brings None, not a zero [tokens, vocab] tensor.
    ctx.set_materialize_grads(False)


def _backward_with(bwd):
    def backward(ctx, dlogits, dloss, _dlse, _dinv):
        x, weight, labels, logits, lse, inv_count = ctx.saved_tensors
        if dlogits is None and dloss is None:
            return None, None, None, None, None
        dx, dweight, dbias = bwd(dlogits, dloss, logits, labels, lse, inv_count, x, weight, ctx.has_bias,
                                 ctx.ignore_index)  # fmt: skip
        return dx, dweight, (dbias.to(ctx.bias_dtype) if ctx.has_bias else None), None, None

    return backward


_fwd.register_autograd(_backward_with(_bwd), setup_context=_setup_context)
_eager = eager_function("linear_cross_entropy", _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def _validate(x, weight, bias, labels, autocast: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("labels", labels)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if name != "labels":
            check_float(name, t)
    check_same_device(x=x, weight=weight, bias=bias, labels=labels)
    _, h = check_linear(x, weight, bias, autocast, "vocab", "hidden size")
    if 0 in weight.shape:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers (class indices), got {labels.dtype}")
    rows = x.numel() // h
    if labels.numel() != rows:
        raise ValueError(f"labels must hold one class index per row of x: x {tuple(x.shape)} has {rows} rows, "
                         f"labels {tuple(labels.shape)}")  # fmt: skip


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits = x @ weight.T + bias`` and ``F.cross_entropy(logits.view(-1, vocab), labels.view(-1),
    ignore_index=ignore_index)`` (the mean over the labelled rows), the masked-LM head's decoder and loss.

    x: [..., hidden]; weight: [vocab, hidden] (nn.Linear layout); bias: [vocab] or None; labels: integers (any
    integer dtype and strides), one per row of x (``ignore_index`` marks an unlabelled row); one float dtype, or
    under ``torch.autocast`` any (cast as F.linear casts). Returns ``(logits, loss)``: logits [..., vocab] in the
    compute dtype, as F.linear gives them, but a view whose row stride is the vocabulary padded to a multiple of 64
    (``logits.view(-1, vocab)`` works; a flat ``view(-1)`` needs ``reshape``); loss a scalar, float32 under autocast
    (as eager autocast), else x's dtype. With no labelled row the loss is NaN, as in PyTorch. A label outside [0,
    vocab) that is not ignore_index gives a NaN loss (and NaN gradients) on the kernel path, where PyTorch raises.

    The loss reads the logits as they are and keeps only a logsumexp per row for the backward, which writes the
    logits' gradient in their dtype: none of eager autocast's fp32 copies of [tokens, vocab]. That backward reads
    the logits again, so modifying them in place before it raises autograd's in-place error (eager's would not).
    CPU tensors run the eager reference unless TRITON_INTERPRET=1.
    """
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    _validate(x, weight, bias, labels, autocast)
    if isinstance(ignore_index, bool) or int(ignore_index) != ignore_index:
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    labels = labels.long()  # (F.cross_entropy takes int64 class indices; a no-op for them)
    v, h = weight.shape
    if autocast:
        x = x.to(autocast_dtype(x.device.type))  # weight and bias are cast inside, with the padding
    if not use_triton(x):
        if autocast:
            # as eager autocast: logits from the half GEMM, the cross-entropy (an fp32 op there) of their fp32 copy
            with torch.autocast(x.device.type, enabled=False):
                dtype = x.dtype
                logits = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
                loss = F.cross_entropy(logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=ignore_index)
                return logits, loss
        return reference.linear_cross_entropy(x, weight, bias, labels, ignore_index=ignore_index)

    x2 = x.reshape(-1, h)
    labels2 = labels.reshape(-1).contiguous()  # the kernels read one label a row, contiguous
    logits, loss, _, _ = call(_fwd, _eager, x2, weight, bias, labels2, int(ignore_index))
    logits = logits[:, :v].view(*x.shape[:-1], v)
    return logits, (loss if autocast else loss.to(x.dtype))
