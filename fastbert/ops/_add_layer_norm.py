"""ops.add_layer_norm: validation, dispatch, autograd and the torch.library custom op around
fastbert.kernels.add_layer_norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbert import reference
from fastbert.ops._common import (
    call,
    check_dropout_p,
    check_float,
    check_same_device,
    draw_seed,
    eager_function,
    number,
    rows_view,
    use_triton,
)

# Kept here (not imported from the kernel module) so that importing fastbert never imports Triton.
MAX_HIDDEN = 8192
MAX_HIDDEN_DROPOUT = 4096


def _kernels():
    from fastbert.kernels import add_layer_norm as k

    assert (k.MAX_HIDDEN, k.MAX_HIDDEN_DROPOUT) == (MAX_HIDDEN, MAX_HIDDEN_DROPOUT)
    return k


def _fwd_impl(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    store_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd, s = _kernels().add_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p,
                                                     seed if dropout_p > 0.0 else None, store_sum)  # fmt: skip
    # Without store_sum a 1-D empty s says so (a custom op returns tensors, not None); a stored s is 2-D.
    return y, mean, rstd, (residual.new_empty((0,)) if s is None else s)


_fwd = torch.library.custom_op("fastbert::add_layer_norm_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, store_sum):
    M, N = x.shape
    return (residual.new_empty((M, N)), x.new_empty((M,), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.float32), residual.new_empty((M, N) if store_sum else (0,)))  # fmt: skip


def _bwd_impl(
    dy: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    s: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # The incoming gradient may have any strides (even an expanded one): the kernel needs unit column stride.
    dy = rows_view(dy, dy.shape[-1])
    # A 2-D s is the forward's stored sum: x and residual are then empty and give only the dtypes.
    dx, dresidual, dweight, dbias = _kernels().add_layer_norm_bwd(
        dy, x, residual, weight, mean, rstd, dropout_p, seed if dropout_p > 0.0 else None, s if s.dim() == 2 else None
    )
    # Without dropout dx equals dresidual: the kernel writes it once, and an empty dx says so (a custom op may
    # not return one tensor twice).
    return (x.new_empty((0,)) if dx is None else dx), dresidual, dweight, dbias


_bwd = torch.library.custom_op("fastbert::add_layer_norm_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dy, x, residual, s, weight, mean, rstd, dropout_p, seed):
    shape = s.shape if s.dim() == 2 else x.shape
    dx = x.new_empty(shape) if dropout_p > 0.0 else x.new_empty((0,))
    return dx, residual.new_empty(shape), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, store_sum = inputs
    # mean, rstd and s are outputs only so they can be saved; the public op never returns them, and their
    # incoming gradients are ignored (not marked non-differentiable: AOTAutograd would then disagree with eager).
    _, mean, rstd, s = output
    if s.dim() == 2:
        # the stored sum replaces x and residual (kernels/add_layer_norm.py: STORE_SUM)
        ctx.save_for_backward(None, None, s, weight, mean, rstd, seed)
        ctx.x_dtype = x.dtype
    else:
        ctx.save_for_backward(x, residual, s, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    # The unused outputs bring None, not zeros: materialised, they cost a fill kernel each per backward (for s, a
    # [rows, hidden] fp32 one).
    ctx.set_materialize_grads(False)


def _backward_with(bwd):
    def backward(ctx, dy, _dmean, _drstd, _ds):
        if dy is None:
            return None, None, None, None, None, None, None, None
        x, residual, s, weight, mean, rstd, seed = ctx.saved_tensors
        if x is None:
            x, residual = s.new_empty((0,), dtype=ctx.x_dtype), s.new_empty((0,))
        dx, dresidual, dweight, dbias = bwd(dy, x, residual, s, weight, mean, rstd, ctx.dropout_p, seed)
        if ctx.dropout_p == 0.0:
            dx = dresidual.to(x.dtype)
        return dx, dresidual, dweight, dbias, None, None, None, None

    return backward


_fwd.register_autograd(_backward_with(_bwd), setup_context=_setup_context)
_eager = eager_function("add_layer_norm", _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def _validate(x, residual, weight, bias, autocast: bool) -> None:
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        check_float(name, t)
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if x.dim() == 0 or x.shape != residual.shape:
        raise ValueError(f"x and residual must have one shape [..., hidden], got {tuple(x.shape)} and "
                         f"{tuple(residual.shape)}")  # fmt: skip
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"weight and bias must have shape ({n},) for hidden size {n}, got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")  # fmt: skip
    if x.dtype != residual.dtype and not autocast:
        raise ValueError(f"x and residual must have one dtype, got {x.dtype} and {residual.dtype}")
    if weight.dtype != bias.dtype or weight.dtype not in (residual.dtype, torch.float32):
        raise ValueError(f"weight and bias must share a dtype, that of residual ({residual.dtype}) or float32; "
                         f"got {weight.dtype} and {bias.dtype}")  # fmt: skip
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} is beyond add_layer_norm's limit of {MAX_HIDDEN}")
    if n == 0:
        raise ValueError(f"the hidden size must not be 0, got x {tuple(x.shape)}")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``layer_norm(dropout(x) + residual) * weight + bias`` over the last dimension, in one fused kernel.

    x, residual: [..., hidden] of one shape and dtype (fp16, bf16 or fp32), any strides; weight, bias: [hidden] in
    that dtype or fp32, any strides. Statistics are computed in fp32. ``dropout_p`` > 0 applies dropout to ``x``
    inside the kernel (Philox, seeded from PyTorch's generator so ``torch.manual_seed`` reproduces it; 32-bit draws:
    the keep probability is 1 - p within 2^-33); pass 0 at inference. Under ``torch.autocast`` it follows PyTorch's
    autocast layer_norm: the result is float32, and x may be half while residual is float32 (read as they are: no
    cast copies). Returns [..., hidden] in residual's dtype. CPU tensors run the eager reference unless
    TRITON_INTERPRET=1.
    """
    dropout_p = check_dropout_p(dropout_p)
    eps = number("eps", eps)
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    _validate(x, residual, weight, bias, autocast)
    if autocast:
        residual = residual.float()  # no copy for the fp32 residual stream of an autocast model
        weight, bias = weight.float(), bias.float()
    if not use_triton(x):
        return reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p=dropout_p)

    n = x.shape[-1]
    x2, r2 = rows_view(x, n), rows_view(residual, n)
    # the kernels read weight and bias as contiguous vectors (a strided or expanded one is copied)
    weight, bias = weight.contiguous(), bias.contiguous()
    if dropout_p > 0.0 and n > MAX_HIDDEN_DROPOUT:
        # Documented fallback: the fused backward would spill with the mask live at this width.
        x2, dropout_p = F.dropout(x2, dropout_p), 0.0
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    # Autocast's half x and fp32 residual: in training the forward also stores s = dropout(x) + residual, which
    # the backward reads instead of keeping both (less memory: see kernels/add_layer_norm.py).
    store_sum = (
        r2.element_size() > x2.element_size()
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, residual, weight, bias))
    )
    y, _, _, _ = call(_fwd, _eager, x2, r2, weight, bias, eps, dropout_p, seed, store_sum)
    return y.view(residual.shape)
