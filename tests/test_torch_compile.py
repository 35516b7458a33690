"""torch.compile over the public ops: one graph (fullgraph=True, so a graph break fails), the custom ops'
fake implementations and autograd formulas traced by AOTAutograd, results and gradients equal to eager calls.
Eager calls take a lighter path than the custom ops (fastbert.ops._common.eager_function): this checks that
both paths agree."""

import pytest
import torch

from conftest import DEVICE
from fastbert import ops


def _compare(fn, inputs):
    def run(f):
        torch.manual_seed(0)  # the same dropout seeds for both runs
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = f(*leaves)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves if t.is_floating_point()]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, grads = run(fn)
    c_out, c_grads = run(compiled)
    torch.testing.assert_close(c_out, out, rtol=0, atol=0)
    for g, cg in zip(grads, c_grads, strict=True):
        torch.testing.assert_close(cg, g, rtol=0, atol=0)


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def test_add_layer_norm():
    _compare(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b) * 2, [_rand(3, 32), _rand(3, 32), _rand(32), _rand(32)])


def test_add_layer_norm_autocast_mix():
    # half x and fp32 residual (autocast's mix): the forward stores s for the backward (the custom op's extra
    # output and its fake), with and without dropout (_compare seeds both runs alike)
    def fn(x, r, w, b):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return ops.add_layer_norm(x.half(), r, w, b, dropout_p=0.25) + ops.add_layer_norm(x.half(), r, w, b)

    _compare(fn, [_rand(3, 32), _rand(3, 32), _rand(32), _rand(32)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu(approximate):
    _compare(lambda x, w, b: ops.linear_gelu(x, w, b, approximate=approximate), [_rand(5, 16), _rand(24, 16),
                                                                                  _rand(24)])  # fmt: skip


def test_attention_masked():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], device=DEVICE, dtype=torch.bool)
    _compare(lambda q, k, v: ops.attention(q, k, v, mask), [_rand(2, 2, 4, 32) for _ in range(3)])


def test_attention_varlen():
    cu = torch.tensor([0, 3, 5], device=DEVICE, dtype=torch.int32)
    _compare(lambda q, k, v: ops.attention_varlen(q, k, v, cu, 3), [_rand(5, 2, 32) for _ in range(3)])
