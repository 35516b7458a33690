"""Eager PyTorch definitions of every fastbert op: the ground truth the kernels are tested against, and the CPU
fallback when Triton cannot run (CPU tensors without ``TRITON_INTERPRET=1``, or no Triton installed).

Same names and signatures as fastbert.ops. Dropout here uses PyTorch's RNG; the tests that compare against a
kernel's dropout pass the kernel's keep-mask explicitly (``keep=`` arguments), so both apply the same mask.
Compute in whatever dtype the inputs have: call with float64 inputs to get the reference of the test suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _dropout(x: torch.Tensor, p: float, keep: torch.Tensor | None, training: bool = True) -> torch.Tensor:
    if keep is not None:
        return x * keep.to(x.dtype) / (1.0 - p)
    return F.dropout(x, p, training=training) if p > 0.0 else x


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    *,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``layer_norm(dropout(x) + residual)`` over the last dimension (BertSelfOutput / BertOutput)."""
    s = _dropout(x, dropout_p, keep) + residual
    if weight.dtype != s.dtype:
        # Half activations with fp32 parameters: normalise in fp32, return the activations' dtype (what the
        # kernel does; CUDA's layer_norm rejects the mix).
        return F.layer_norm(s.float(), (s.shape[-1],), weight.float(), bias.float(), eps).to(s.dtype)
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, approximate: str = "none"
) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)``; approximate="none" is the exact erf GELU, "tanh" the tanh form."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) · v for q, k, v [batch, heads, seq, head_dim]; ``attention_mask`` [batch, seq_k]
    is a key-padding mask (1/True = attend). A query whose keys are all masked gets zeros, not NaN.
    ``keep`` [batch, heads, seq_q, seq_k] is an explicit dropout keep-mask on the probabilities."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_mask is not None:
        allowed = attention_mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if attention_mask is not None:  # a query whose keys are all masked: zeros (softmax of all -inf is NaN)
        probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    probs = _dropout(probs, dropout_p, keep)
    return torch.matmul(probs, v)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence: q, k, v [total_tokens, heads, head_dim]; sequence i holds tokens
    cu_seqlens[i]:cu_seqlens[i+1]. Returns [total_tokens, heads, head_dim]."""
    out = q.new_empty(q.shape)  # contiguous, as the kernel's
    bounds = cu_seqlens.tolist()
    if bounds[-1] == bounds[0]:  # no token: still a result autograd connects to q, k, v
        return out.zero_() + 0.0 * (q.sum() + k.sum() + v.sum())
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out[start:end] = attention(qs, ks, vs, dropout_p=dropout_p, scale=scale)[0].transpose(0, 1)
    return out


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss): ``logits = F.linear(x, weight, bias)`` and the mean cross-entropy of its rows against
    ``labels`` (one per row; ``ignore_index`` rows left out), as transformers' masked-LM heads compute them."""
    logits = F.linear(x, weight, bias)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
    return logits, loss
