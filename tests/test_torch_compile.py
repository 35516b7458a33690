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


def test_no_hidden_tensor_inputs_without_dropout():
    # Without dropout the ops hand their custom ops no seed tensor at all (None): a module-level CPU tensor there
    # became an extra graph input on the CPU, which makes torch.compile(mode="reduce-overhead") skip CUDA graphs
    # ("cpu device"). Dynamo lifts every tensor the traced code touches to a graph input: only the user's remain.
    seen = []

    def backend(gm, example_inputs):
        seen.append(len(example_inputs))
        return gm

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], device=DEVICE, dtype=torch.bool)
    qkv = [_rand(2, 2, 4, 32) for _ in range(3)]
    x, r, w, b = _rand(3, 32), _rand(3, 32), _rand(32), _rand(32)
    for fn, inputs in [
        (lambda q, k, v, m: ops.attention(q, k, v, m), [*qkv, mask]),
        (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b), [x, r, w, b]),
        (lambda x, w, b: ops.linear_gelu(x, w, b), [_rand(5, 16), _rand(24, 16), _rand(24)]),
        (
            lambda x, w, b, y: ops.linear_cross_entropy(x, w, b, y)[0],
            [_rand(5, 16), _rand(24, 16), _rand(24), torch.tensor([1, -100, 3, 0, 23], device=DEVICE)],
        ),
    ]:
        torch._dynamo.reset()
        seen.clear()
        torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
        assert seen == [len(inputs)]


@pytest.mark.gpu
def test_reduce_overhead_captures_a_cuda_graph_gpu():
    from torch._dynamo.utils import counters

    mask = torch.ones(2, 128, device=DEVICE, dtype=torch.bool)
    mask[1, 100:] = False
    q, k, v = (torch.randn(2, 4, 128, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    x, r = (torch.randn(256, 64, device=DEVICE, dtype=torch.float16) for _ in range(2))
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)

    def fn(q, k, v, m, x, r, w, b):
        return ops.attention(q, k, v, m), ops.add_layer_norm(x, r, w.half(), b.half())

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(q, k, v, mask, x, r, w, b)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    torch.testing.assert_close(out[0], ops.attention(q, k, v, mask), rtol=0, atol=0)
