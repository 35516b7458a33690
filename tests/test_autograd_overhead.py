"""What the ops' backward costs besides its kernels. Each op's autograd node has outputs nobody differentiates (the
statistics and saved activations it returns only so that they can be saved: add_layer_norm's mean, rstd and
stored sum, attention's lse, linear_gelu's pre-activation, linear_cross_entropy's lse). Autograd would hand
their backward a zero tensor each, one fill kernel apiece, for add_layer_norm's sum and linear_gelu's
pre-activation as big as the activations (a BERT-base training step: ~100 fills, ~2.4 GB written); they must
arrive as None instead."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastbert import ops

# what autograd materialises an absent gradient with (the test suite's poisoning of kernel outputs fills with
# fill_, not counted); none of these ops' backward makes a zero tensor of its own on these inputs (every
# linear_cross_entropy row is labelled: its compact path would zero the unlabelled rows of dx)
_FILLS = ("aten.zeros", "aten.zeros_like", "aten.new_zeros")


class _Fills(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in _FILLS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _leaf(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


def _autocast(device, fn):
    def run():
        with torch.autocast(torch.device(device).type, dtype=torch.float16):
            return fn()

    return run


def _cases(device):
    x, r = _leaf(24, 32, device=device), _leaf(24, 32, device=device)
    w, b = _leaf(32, device=device), _leaf(32, device=device)
    xh = torch.randn(24, 32, device=device, dtype=torch.float16).requires_grad_()
    W, B = _leaf(64, 32, device=device), _leaf(64, device=device)
    q, k, v = (torch.randn(2, 17, 2, 32, device=device).transpose(1, 2).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 17, dtype=torch.bool, device=device)
    mask[1, 9:] = False
    D, labels = _leaf(70, 32, device=device), torch.randint(0, 70, (24,), device=device)
    return {
        "add_layer_norm": lambda: ops.add_layer_norm(x, r, w, b),
        "add_layer_norm dropout": lambda: ops.add_layer_norm(x, r, w, b, dropout_p=0.2),
        # autocast's half x and fp32 residual: the training forward stores the fp32 sum, an output as big as x
        "add_layer_norm stored sum": _autocast(device, lambda: ops.add_layer_norm(xh, r, w, b, dropout_p=0.2)),
        "linear_gelu": lambda: ops.linear_gelu(x, W, B),
        "attention": lambda: ops.attention(q, k, v, mask),
        "attention dropout": lambda: ops.attention(q, k, v, dropout_p=0.2),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(x, D, None, labels)[1],
    }


@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_backward_fills_no_zero_gradients(name, device):
    out = _cases(device)[name]()
    dy = torch.randn_like(out)
    fills = _Fills()
    with fills:
        out.backward(dy)
    assert fills.seen == [], f"{name}: the backward made zero-filled tensors: {fills.seen}"
