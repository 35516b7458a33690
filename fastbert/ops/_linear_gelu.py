"""ops.linear_gelu: validation, dispatch, autograd and the torch.library custom ops around
fastbert.kernels.linear_gelu."""

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
    first_order_only,
    rows_view,
    use_triton,
)

APPROXIMATIONS = ("none", "tanh")


def _kernels():
    from fastbert.kernels import linear_gelu as k

    return k


def _fwd_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str, store_preact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _kernels().linear_gelu_fwd(x, weight, bias, approximate, store_preact)
    # Without store_preact an empty h says so (a custom op returns tensors, not None).
    return y, (x.new_empty((0,)) if h is None else h)


_fwd = torch.library.custom_op("fastbert::linear_gelu_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(x, weight, bias, approximate, store_preact):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), (x.new_empty((M, N)) if store_preact else x.new_empty((0,)))


def _bwd_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, has_bias: bool, approximate: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The incoming gradient may have any strides (even an expanded one): the kernel needs unit column stride.
    dy = rows_view(dy, dy.shape[-1])
    dx, dweight, dbias = _kernels().linear_gelu_bwd(dy, x, weight, h, has_bias, approximate)
    return dx, dweight, (weight.new_empty((0,)) if dbias is None else dbias)


_bwd = torch.library.custom_op("fastbert::linear_gelu_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _(dy, x, weight, h, has_bias, approximate):
    dbias = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, store_preact = inputs
    # h is an output only so it can be saved; the public op never returns it and its gradient is ignored.
    _, h = output
    ctx.save_for_backward(x, weight, bias, h)
    ctx.approximate = approximate
    ctx.has_bias = bias is not None
    # h's (unused) gradient is None, not a zero [tokens, out_features] tensor filled by a kernel every backward.
    ctx.set_materialize_grads(False)


def _backward_with(bwd):
    def backward(ctx, dy, _dh):
        if dy is None:
            return None, None, None, None, None
        x, weight, bias, h = ctx.saved_tensors
        if h.numel() != x.shape[0] * weight.shape[0]:
            # Called without store_preact (only a direct caller of the custom op can do that): recompute h.
            h = F.linear(x, weight, bias).contiguous()
        dx, dweight, dbias = bwd(dy, x, weight, h, ctx.has_bias, ctx.approximate)
        return dx, dweight, (dbias if ctx.has_bias else None), None, None

    return backward


_fwd.register_autograd(_backward_with(_bwd), setup_context=_setup_context)
_eager = eager_function("linear_gelu", _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def _validate(x, weight, bias, approximate, autocast: bool) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        check_float(name, t)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    check_same_device(x=x, weight=weight, bias=bias)
    n, k = check_linear(x, weight, bias, autocast, "out_features", "in_features")
    if k % 8 or n % 8 or k == 0 or n == 0:
        raise ValueError(f"in_features and out_features must be nonzero multiples of 8, got weight "
                         f"{tuple(weight.shape)}")  # fmt: skip


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none"
) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` in one fused GEMM (BertIntermediate).

    x: [..., in_features], any strides; weight: [out_features, in_features] (nn.Linear layout); bias:
    [out_features] or None; one dtype (fp16, bf16 or fp32), in and out features multiples of 8.
    ``approximate`` is "none" (exact erf GELU) or "tanh". Under ``torch.autocast`` it follows eager F.linear: the
    inputs are cast to the autocast dtype and so is the result. Returns [..., out_features] in x's dtype (the
    autocast dtype under autocast). CPU tensors run the eager reference unless TRITON_INTERPRET=1.
    """
    return linear_gelu_with_preact(x, weight, bias, approximate=approximate)[0]


def linear_gelu_with_preact(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear_gelu, plus the pre-activation ``h = x @ weight.T + bias`` [rows, out_features] (contiguous,
    detached) that its backward saves, when the call records a gradient through the fused kernel; None
    otherwise (inference, the eager reference, torch.compile tracing). For linear_of_gelu."""
    autocast = isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type)
    _validate(x, weight, bias, approximate, autocast)
    if autocast:
        dtype = autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if not use_triton(x):
        if autocast:
            with torch.autocast(x.device.type, enabled=False):
                return reference.linear_gelu(x, weight, bias, approximate=approximate), None
        return reference.linear_gelu(x, weight, bias, approximate=approximate), None

    n, k = weight.shape
    x2 = rows_view(x, k)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )  # fmt: skip
    y, h = call(_fwd, _eager, x2, weight, bias, approximate, needs_grad)
    preact = h.detach() if needs_grad and not torch.compiler.is_compiling() else None
    return y.view(*x.shape[:-1], n), preact


# ----------------------------------------------------------------------------------------------- linear_of_gelu
def _linear_of_gelu_backward(ctx, dout):
    h, weight = ctx.saved_tensors
    d2 = dout.reshape(-1, weight.shape[0])
    dy = dweight = dbias = None
    if ctx.needs_input_grad[0]:
        dy = (d2 @ weight).view(ctx.y_shape)
    if ctx.needs_input_grad[2]:
        # eager GELU of the saved (rounded) pre-activation: the y eager PyTorch's Linear would have saved
        dweight = d2.t() @ F.gelu(h, approximate=ctx.approximate)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        dbias = d2.sum(0)
    return dy, None, dweight, dbias, None


class _LinearOfGelu(torch.autograd.Function):
    """F.linear(y, weight, bias) for y = gelu(h), saving h instead of y: the backward recomputes y from h (a
    detached h: its dependence on the input is not recorded, so the backward is first-order only)."""

    @staticmethod
    def forward(ctx, y, h, weight, bias, approximate):
        ctx.save_for_backward(h, weight)
        ctx.approximate, ctx.has_bias, ctx.y_shape = approximate, bias is not None, y.shape
        return F.linear(y, weight, bias)

    backward = staticmethod(first_order_only("linear_of_gelu (the Linear after linear_gelu)", _linear_of_gelu_backward))


def linear_of_gelu(
    y: torch.Tensor,
    preact: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
) -> torch.Tensor:
    """``F.linear(y, weight, bias)`` where y (and preact) came from linear_gelu_with_preact, e.g. BertOutput's
    dense after BertIntermediate. Autograd then keeps only the pre-activation, which linear_gelu's backward saves
    anyway, instead of also keeping y (as big: [rows, intermediate]); the backward recomputes y = gelu(h) (one
    elementwise pass), as eager PyTorch's GELU would have computed it from h. With preact None, or one that does
    not match y, it is plain F.linear. Autocast as F.linear."""
    usable = (
        preact is not None
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and y.shape[-1] == preact.shape[-1]
        and y.numel() == preact.numel()
        and y.device == preact.device
    )
    if not usable:
        return F.linear(y, weight, bias)
    if torch.is_autocast_enabled(y.device.type):
        dtype = autocast_dtype(y.device.type)
        y, weight = y.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if preact.dtype != y.dtype or weight.dtype != y.dtype or (bias is not None and bias.dtype != y.dtype):
        return F.linear(y, weight, bias)
    return _LinearOfGelu.apply(y, preact, weight, bias, approximate)
