"""ops.attention, ops.attention_varlen, unpad and pad: validation, dispatch, autograd and the torch.library custom
ops around fastbert.kernels.attention and attention_bwd."""

from __future__ import annotations

import contextlib
import threading

import torch

from fastbert import reference
from fastbert.ops._common import (
    call,
    check_dropout_p,
    check_float,
    check_same_device,
    draw_seed,
    eager_function,
    number,
    use_triton,
)

# Kept here (not imported from the kernel module) so that importing fastbert never imports Triton.
HEAD_DIMS = (32, 64, 80, 96, 128)


def _kernels():
    from fastbert.kernels import attention as k

    assert k.HEAD_DIMS == HEAD_DIMS
    return k


def _bwd_kernels():
    from fastbert.kernels import attention_bwd

    return attention_bwd


# One op pair serves both layouts: padded (cu_seqlens None) and varlen (bias None). Optional tensors keep the
# schema single; max_seqlen is 0 for padded calls.
def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if cu_seqlens is None:
        # [B, S, H, D] storage returned as a [B, H, S, D] view: out.transpose(1, 2).reshape(B, S, H·D) is free.
        from fastbert.kernels.common import empty

        B, H, S, D = q.shape
        out = empty((B, S, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
        return _kernels().attention_fwd(q, k, v, bias, None, 0, scale, dropout_p, seed, out=out)
    return _kernels().attention_fwd(q, k, v, None, cu_seqlens, max_seqlen, scale, dropout_p, seed)


_fwd = torch.library.custom_op("fastbert::attention_fwd", _fwd_impl, mutates_args=())


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D)).transpose(1, 2)


def _lse_numel(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] * q.shape[1] * q.shape[2] if cu_seqlens is None else q.shape[0] * q.shape[1]


@_fwd.register_fake
def _(q, k, v, bias, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    out = _empty_out(q) if cu_seqlens is None else torch.empty_like(q)
    return out, q.new_empty((_lse_numel(q, cu_seqlens),), dtype=torch.float32)


def _bwd_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # do may have any strides (the kernels take all four); an expanded one (stride 0) is fine too.
    return _bwd_kernels().attention_bwd(do, q, k, v, out, lse, bias, cu_seqlens, max_seqlen, scale, dropout_p, seed)


_bwd = torch.library.custom_op("fastbert::attention_bwd", _bwd_impl, mutates_args=())


def _empty_grad(t: torch.Tensor) -> torch.Tensor:
    # the layout the kernels' launcher gives each gradient (fastbert.kernels.attention_bwd._grad_like)
    if t.dim() == 4 and t.stride(1) < t.stride(2):
        return _empty_out(t)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@_bwd.register_fake
def _(do, q, k, v, out, lse, bias, cu_seqlens, max_seqlen, scale, dropout_p, seed):
    return _empty_grad(q), _empty_grad(k), _empty_grad(v)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, cu_seqlens, max_seqlen, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_seqlens, seed)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p = max_seqlen, scale, dropout_p
    ctx.set_materialize_grads(False)  # lse's (unused) gradient is None, not a zero tensor filled by a kernel


def _backward_with(bwd):
    def backward(ctx, dout, _dlse):
        if dout is None:
            return None, None, None, None, None, None, None, None, None
        q, k, v, out, lse, bias, cu_seqlens, seed = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, bias, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None

    return backward


_fwd.register_autograd(_backward_with(_bwd), setup_context=_setup_context)
_eager = eager_function("attention", _fwd_impl, _setup_context, _backward_with(_bwd_impl))


# ----------------------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, dims: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        check_float(name, t)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    # (under torch.autocast all three are cast to its dtype, as scaled_dot_product_attention's are: see _autocast)
    if not q.dtype == k.dtype == v.dtype and not torch.is_autocast_enabled(q.device.type):
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} is unsupported: attention supports {HEAD_DIMS}")


def _autocast(q, k, v):
    """Under torch.autocast, run in the autocast dtype, as scaled_dot_product_attention does."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _seed(dropout_p: float, device: torch.device) -> torch.Tensor | None:
    return draw_seed(device) if dropout_p > 0.0 else None


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    bounds = cu_seqlens.tolist()  # one sync
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens = {total}, got {bounds[:1]}..."
                         f"{bounds[-1:]} ({len(bounds)} entries)")  # fmt: skip
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing (monotone)")
    if int(max_seqlen) < max(lengths):
        raise ValueError(f"max_seqlen {max_seqlen} is below the longest sequence ({max(lengths)})")


_MEMO = threading.local()


@contextlib.contextmanager
def shared_key_bias():
    """Within this context (one model forward: fastbert's encoder enters it around its layers), attention calls
    given the same mask tensor, unchanged, share one key bias: a model hands one mask object to every layer, so
    the bias is made once instead of once a layer (two small kernels less a layer, of the ~11 a layer launches in
    a CUDA graph, where the encoder always runs the padded path). Scoped to the context,
    so a bias made in one capture or call is never read by another (whose mask may hold other values by then)."""
    previous = getattr(_MEMO, "biases", None)
    _MEMO.biases = {}
    try:
        yield
    finally:
        _MEMO.biases = previous


def _key_bias(mask: torch.Tensor, seq_k: int) -> torch.Tensor:
    biases = getattr(_MEMO, "biases", None)
    if biases is None or torch.compiler.is_compiling():
        return _kernels().key_bias(mask, seq_k)
    hit = biases.get((id(mask), seq_k))
    # (the entry holds the mask itself: its id cannot pass to another tensor while the entry lives)
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        return hit[2]
    bias = _kernels().key_bias(mask, seq_k)
    biases[(id(mask), seq_k)] = (mask, mask._version, bias)
    return bias


# ----------------------------------------------------------------------------------------------- public ops
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``dropout(softmax(q kᵀ · scale, masked)) · v`` in one fused FlashAttention-2 kernel.

    q: [batch, heads, seq_q, head_dim], k, v: [batch, heads, seq_k, head_dim], one dtype (fp16, bf16 or fp32), any
    strides (transposed views are read in place); head_dim in (32, 64, 80, 96, 128). ``attention_mask``: None or
    a [batch, seq_k] key-padding mask, bool or 0/1 integers, 1 = attend (any pattern, not only right padding); a
    query whose keys are all masked gets zeros (and zero gradients). ``scale`` defaults to head_dim ** -0.5.
    ``dropout_p`` > 0 drops probabilities inside the kernel (Philox, seeded from PyTorch's generator; 16-bit draws:
    the keep probability is 1 - p within 2^-17, kept values scaled by 1 / (1 - p)).

    Returns [batch, heads, seq_q, head_dim] in q's dtype, stored as [batch, seq_q, heads, head_dim]: the result
    is a transposed view, so ``out.transpose(1, 2).reshape(batch, seq_q, heads * head_dim)`` costs no copy.
    CPU tensors run the eager reference unless TRITON_INTERPRET=1.
    """
    dropout_p = check_dropout_p(dropout_p)
    _check_qkv(q, k, v, 4, "[batch, heads, seq, head_dim]")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree on batch, heads and head_dim")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, k.shape[2]):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"attention_mask must be [batch, seq_k] = {(B, k.shape[2])}, got {shape}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool or integer (1 = attend), got {attention_mask.dtype}")
        check_same_device(q=q, attention_mask=attention_mask)
    q, k, v = _autocast(q, k, v)
    scale = _scale(q, scale)
    if not use_triton(q):
        return reference.attention(q, k, v, attention_mask, dropout_p=dropout_p, scale=scale)
    # The padding mask as the kernels' fp32 key bias (0 / -inf, whole blocks): made once, shared by the backward.
    bias = None if attention_mask is None else _key_bias(attention_mask, k.shape[2])
    out, _ = call(_fwd, _eager, q, k, v, bias, None, 0, scale, dropout_p, _seed(dropout_p, q.device))
    return out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention within each packed sequence, no padding computed: q, k, v [total_tokens, heads, head_dim] (one
    dtype, any strides), cu_seqlens [batch + 1] int32 (0, then cumulative lengths), max_seqlen >= the longest
    length (as returned by unpad). Returns [total_tokens, heads, head_dim] contiguous. Dropout's keep-mask of
    token t, head h is row ``h · total_tokens + t`` (fastbert.kernels.attention_dropout.dropout_keep_mask).

    ``validate`` reads cu_seqlens on the host to check it and max_seqlen against it (one device sync). Pass False
    only for a cu_seqlens and max_seqlen built by ``unpad`` or from all the tokens as fastbert.optimize does, once
    per forward (its encoder, for unpadded batches and for sequences packed by position_ids): wrong
    offsets would read out of bounds, a max_seqlen below the longest length leaves rows unwritten. Under
    torch.compile the values are never read (that would break the graph)."""
    dropout_p = check_dropout_p(dropout_p)
    max_seqlen = number("max_seqlen", max_seqlen, int)
    _check_qkv(q, k, v, 3, "[total_tokens, heads, head_dim]")
    if q.shape != k.shape:
        raise ValueError(f"q, k and v must have one shape in varlen attention, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")  # fmt: skip
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [batch + 1], got {got}")
    check_same_device(q=q, cu_seqlens=cu_seqlens)
    # Reading the values would break a compiled graph: eager calls check them.
    if validate and not torch.compiler.is_compiling():
        _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    cu_seqlens = cu_seqlens.contiguous()  # the kernels read it as a contiguous vector (a no-op for unpad's)
    q, k, v = _autocast(q, k, v)
    scale = _scale(q, scale)
    if not use_triton(q):
        return reference.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p, scale=scale)
    out, _ = call(
        _fwd, _eager, q, k, v, None, cu_seqlens, int(max_seqlen), scale, dropout_p, _seed(dropout_p, q.device)
    )
    return out


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Pack the attended tokens of hidden [batch, seq, ...] (attention_mask [batch, seq], 1 = token) into
    [total_tokens, ...]. Returns (packed, indices [total] int64 into batch·seq, cu_seqlens [batch + 1] int32,
    max_seqlen int). Differentiable in hidden. Syncs once (max_seqlen)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"hidden and attention_mask must be tensors, got {type(hidden).__name__} and "
                         f"{type(attention_mask).__name__}")  # fmt: skip
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        # (an additive float mask, 0 = attend, would be read the other way round)
        raise ValueError(f"attention_mask must be bool or integer (1 = token), got {attention_mask.dtype}")
    check_same_device(hidden=hidden, attention_mask=attention_mask)
    if attention_mask.dim() != 2 or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"hidden [batch, seq, ...] {tuple(hidden.shape)} and attention_mask [batch, seq] "
                         f"{tuple(attention_mask.shape)} must agree")  # fmt: skip
    keep = attention_mask.reshape(-1) != 0
    indices = torch.nonzero(keep).flatten()
    lengths = (attention_mask != 0).sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max().item()) if lengths.numel() else 0
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of unpad: scatter packed [total, ...] back to [batch, seqlen, ...], zeros at padding.
    Differentiable in packed. indices: as unpad returns them (distinct, in [0, batch·seqlen); not checked, which
    would cost a device sync)."""
    if not isinstance(packed, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise ValueError(f"packed and indices must be tensors, got {type(packed).__name__} and "
                         f"{type(indices).__name__}")  # fmt: skip
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool or packed.dim() == 0:
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel() != packed.shape[0] or indices.numel() > batch * seqlen:
        raise ValueError(f"packed {tuple(packed.shape)} needs one index a row, at most batch · seqlen = "
                         f"{batch * seqlen}; got {indices.numel()} indices")  # fmt: skip
    check_same_device(packed=packed, indices=indices)
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    out = out.index_put((indices,), packed)
    return out.view(batch, seqlen, *packed.shape[1:])
