"""The fused ops under pytest-benchmark, for people who prefer that tool (a GPU is needed; skipped otherwise):

    pytest benchmarks --benchmark-only

pytest-benchmark times with the host clock, so each round synchronizes the device; the scripts beside this file
(and ``fastbert bench``) are the reference numbers (CUDA events, rotated inputs, correctness checked first).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timing needs a CUDA GPU")


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(params=[torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def dtype(request):
    return request.param


def test_add_layer_norm(benchmark, dtype):
    from fastbert import ops

    x, r = (torch.randn(16384, 768, device="cuda", dtype=dtype) for _ in range(2))
    w, b = torch.ones(768, device="cuda", dtype=dtype), torch.zeros(768, device="cuda", dtype=dtype)
    benchmark(_sync(lambda: ops.add_layer_norm(x, r, w, b)))


def test_linear_gelu(benchmark, dtype):
    from fastbert import ops

    x = torch.randn(16384, 768, device="cuda", dtype=dtype)
    w, b = torch.randn(3072, 768, device="cuda", dtype=dtype) / 28, torch.randn(3072, device="cuda", dtype=dtype)
    benchmark(_sync(lambda: ops.linear_gelu(x, w, b)))


@pytest.mark.parametrize("seq", [128, 512])
def test_attention_masked(benchmark, dtype, seq):
    from fastbert import ops

    q, k, v = (torch.randn(32, seq, 12, 64, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(3))
    mask = torch.arange(seq, device="cuda")[None, :] < torch.randint(seq // 4, seq + 1, (32, 1), device="cuda")
    benchmark(_sync(lambda: ops.attention(q, k, v, mask)))


def test_linear_cross_entropy(benchmark, dtype):
    """The masked-LM decoder + loss of BERT-base at 32 x 512 tokens, forward and backward."""
    from fastbert import ops

    x = torch.randn(16384, 768, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(30522, 768, device="cuda") / 14).to(dtype).requires_grad_()
    labels = torch.randint(0, 30522, (16384,), device="cuda")

    def step():
        ops.linear_cross_entropy(x, w, None, labels)[1].backward()
        x.grad = w.grad = None

    benchmark(_sync(step))
