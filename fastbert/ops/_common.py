"""Shared plumbing of the public ops: where an op runs, input checks, dropout seeds."""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os
import warnings

import torch

_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule of every op: CUDA tensors run the Triton kernels; CPU tensors run them in Triton's
    interpreter when TRITON_INTERPRET=1, and otherwise the eager reference in fastbert.reference."""
    if t.device.type == "cuda":
        if not _TRITON:
            raise RuntimeError("fastbert needs Triton for CUDA tensors: pip install triton")
        return True
    run = t.device.type == "cpu" and _TRITON and interpreting()
    if run and t.dtype == torch.bfloat16:
        _warn_bf16_interpreted()
    return run


@functools.cache
def _warn_bf16_interpreted() -> None:
    warnings.warn("fastbert: bfloat16 kernels under TRITON_INTERPRET=1 give wrong numbers (Triton's interpreter "
                  "holds bfloat16 as raw bits); use float16 or float32 in the interpreter, or a GPU",
                  RuntimeWarning, stacklevel=3)  # fmt: skip


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{k}: {d}' for k, d in devices.items())}")
    return first


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype torch.autocast casts to on this device type (the API moved in torch 2.4)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_linear(x, weight, bias, autocast: bool, out_name: str, in_name: str) -> tuple[int, int]:
    """The shape and dtype checks of ``F.linear(x, weight, bias)`` with weight in nn.Linear layout
    [out_name, in_name] (the names the messages use); x, weight and bias must share a dtype unless autocast casts
    them. Returns (out, in)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [{out_name}, {in_name}], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x's last dimension must equal weight's {in_name} {k}: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},) for weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) > 1 and not autocast:
        raise ValueError(f"x, weight and bias must have one dtype, got {', '.join(map(str, dtypes))}")
    return n, k


def number(name: str, value, kind: type = float):
    """value as a float (or an int), else ValueError naming the argument (where float(None) raises TypeError).
    Takes Python and NumPy numbers, one-element tensors, and torch.compile's symbolic sizes as they are."""
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (kind is int and not (math.isfinite(value) and value == int(value)))
    ):
        raise ValueError(f"{name} must be a{'n integer' if kind is int else ' real number'}, got {value!r}")
    return kind(value)


def check_dropout_p(p: float) -> float:
    p = number("dropout_p", p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed: an int64 [1] tensor on the op's device holding a value in [2^62, 2^63), drawn from PyTorch's
    generator of that device, so ``torch.manual_seed`` makes kernel dropout reproducible. The kernels read it on
    the device (kernels.common.seed_arg) and the backward reuses the forward's, so no host sync.

    CUDA graphs: the draw is an ordinary CUDA random op, which a graph captures as one: every replay writes a
    new seed (PyTorch advances the captured generator's offset per replay) and the kernels read it, so each
    replay drops different elements, like dropout. torch.compile traces it as a random op too."""
    return torch.randint(2**62, 2**63 - 1, (1,), dtype=torch.int64, device=device)


def rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit column stride, as a view when the layout allows (no copy for contiguous
    tensors or row-strided slices), else a contiguous copy."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def first_order_only(name: str, backward):
    """``backward`` of an autograd.Function whose backward is not itself differentiable (it runs Triton kernels,
    or takes saved tensors detached): raises, naming the op, when autograd records it for a second derivative
    (``create_graph=True``: a gradient penalty, a Hessian-vector product) instead of returning gradients whose
    own gradient would be silently wrong."""

    def first_order_backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"fastbert: {name} has no double backward (create_graph=True, e.g. a gradient penalty): its "
                "backward runs fused kernels that autograd cannot differentiate. Compute that part without fastbert "
                "(fastbert.restore(model), or PyTorch's own ops)"
            )
        return backward(ctx, *grads)

    return first_order_backward


def eager_function(name: str, forward, setup_context, backward):
    """An autograd.Function apply() running ``forward`` (a custom op's implementation) directly; ``name`` is the
    op's, for the error first_order_only raises.

    Each op is a ``torch.library`` custom op (so torch.compile sees one opaque node with a fake implementation),
    but calling a custom op in eager mode costs hundreds of microseconds of host time per call on the device we
    measured (torch 2.11: more than the kernels themselves at BERT sizes). Eager calls therefore go through this
    Function, which runs the same implementation and the same backward formula without the custom-op dispatch;
    ``call`` picks the custom op only while torch.compile traces.
    """

    # The ctx-first form of forward: with a separate setup_context, Function.apply binds the arguments through
    # inspect.signature on every call (~45 us of host time here).
    def forward_with_ctx(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    fn = type(
        f"Eager_{forward.__name__}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward_with_ctx), "backward": staticmethod(first_order_only(name, backward))},
    )

    def run(*args):
        # Without a gradient to record (inference, torch.no_grad) the implementation runs directly: Function.apply
        # costs ~15% of an op's host time even then.
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return fn.apply(*args)
        return forward(*args)

    return run


def call(custom_op, eager, *args):
    """Run an op: its custom op under torch.compile tracing, else its eager Function (see eager_function)."""
    if torch.compiler.is_compiling():
        return custom_op(*args)
    return eager(*args)
