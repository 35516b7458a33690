"""Double backward (create_graph=True: a gradient penalty, a Hessian-vector product) through the fused ops: their
backward runs kernels that autograd cannot differentiate, so recording it for a second derivative raises an error
naming the op, where it would otherwise return gradients whose own gradient is silently wrong (the kernels'
results carry no history; PyTorch ops around them would record only part of it). First-order gradients, with
and without create_graph elsewhere in the graph, are unaffected. The CPU fallback (eager PyTorch) differentiates
twice as PyTorch does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from fastbert import ops


def _inputs(*shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in shapes]


LABELS = torch.tensor([1, 3, -100, 0])
CASES = {
    "attention": (lambda q, k, v: ops.attention(q, k, v), [(1, 2, 5, 32)] * 3),
    "add_layer_norm": (lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, 1e-5), [(3, 16), (3, 16), (16,), (16,)]),
    "linear_gelu": (lambda x, w, b: ops.linear_gelu(x, w, b), [(4, 16), (8, 16), (8,)]),
    "linear_cross_entropy": (
        lambda x, w, b: ops.linear_cross_entropy(x, w, b, LABELS.to(DEVICE))[1],
        [(4, 16), (10, 16), (10,)],
    ),
}


@pytest.mark.parametrize("op", CASES)
def test_create_graph_through_a_fused_op_raises_naming_it(op):
    fn, shapes = CASES[op]
    inputs = _inputs(*shapes)
    out = fn(*inputs)
    # a first-order gradient is fine
    first = torch.autograd.grad(out.square().sum(), inputs)
    assert all(g is not None and torch.isfinite(g).all() for g in first)
    with pytest.raises(RuntimeError, match=f"{op} has no double backward"):
        torch.autograd.grad(fn(*inputs).square().sum(), inputs[0], create_graph=True)
    # also when the incoming gradient carries no history (out.sum(): its gradient is ones)
    with pytest.raises(RuntimeError, match=f"{op} has no double backward"):
        torch.autograd.grad(fn(*inputs).sum(), inputs[0], create_graph=True)


def test_the_eager_fallback_differentiates_twice(monkeypatch):
    """CPU tensors without the interpreter run eager PyTorch: a gradient penalty works there and matches."""
    from fastbert.ops import _linear_gelu

    monkeypatch.setattr(_linear_gelu, "use_triton", lambda t: False)
    x, w, b = _inputs((4, 16), (8, 16), (8,))
    (g,) = torch.autograd.grad(ops.linear_gelu(x, w, b).square().sum(), x, create_graph=True)
    (ref_g,) = torch.autograd.grad(F.gelu(F.linear(x, w, b)).square().sum(), x, create_graph=True)
    got, want = (torch.autograd.grad(t.square().sum(), w)[0] for t in (g, ref_g))
    torch.testing.assert_close(got, want)


def test_gradient_penalty_on_an_optimized_model_raises():
    """The drop-in: a gradient penalty on the embeddings of an optimized BERT raises (in the first fused op its
    backward meets) instead of training on a wrong penalty gradient; plain training still works."""
    transformers = pytest.importorskip("transformers")
    import fastbert

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = fastbert.optimize(copy.deepcopy(transformers.BertModel(cfg)).to(DEVICE)).train()
    ids = torch.randint(5, 100, (2, 8), device=DEVICE)
    embeds = model.embeddings.word_embeddings(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds).last_hidden_state
    with pytest.raises(RuntimeError, match="has no double backward"):
        torch.autograd.grad(out.square().sum(), embeds, create_graph=True)
    model(inputs_embeds=embeds).last_hidden_state.sum().backward()
    assert embeds.grad is not None and all(p.grad is not None for p in model.encoder.parameters())
