"""Drop-in torch.nn modules built on fastbert.ops, for people with their own PyTorch BERT (fastbert.optimize uses
the same ops on HuggingFace models).

Each module is constructible like its torch.nn counterpart, or from an existing module with ``from_...``
classmethods that share (never copy) the parameters. A single-layer module (FusedAddLayerNorm, FusedLinearGELU)
has its counterpart's state_dict keys; the composite ones name their parts (FusedFeedForward: intermediate.*,
output.*, norm.*, where transformers has intermediate.dense.*, output.dense.*, output.LayerNorm.*), so load a
transformers state_dict into the transformers modules and build these from them:

- FusedAddLayerNorm(hidden, eps)           nn.LayerNorm that also takes the residual: LN(dropout(x) + residual)
- FusedLinearGELU(in, out, approximate)    nn.Linear followed by GELU, in one GEMM
- FusedSelfAttention(hidden, heads, p)     BERT self-attention (q/k/v projections + fused attention kernel)
- FusedFeedForward(hidden, inter, ...)     BERT's feed-forward block: LN(dropout(W2 · gelu(W1 x + b1) + b2) + x)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from fastbert import ops
from fastbert.ops._attention import HEAD_DIMS
from fastbert.ops._linear_gelu import APPROXIMATIONS, linear_gelu_with_preact, linear_of_gelu


def _checked_dropout(p: float) -> float:
    """p as a float, or ValueError at construction (not at the first forward) when it is no probability in [0, 1)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return p


def _checked_approximate(approximate: str) -> str:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return approximate


def fused_qkv(query: nn.Module, key: nn.Module, value: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``(query(x), key(x), value(x))`` by one GEMM over the three weights concatenated (on every call, so the
    parameters stay the modules' own): three [..., out] views of one [..., 3 · out] result. Under autocast x is
    then cast once, and autograd keeps one half copy of it instead of three; the backward runs one GEMM per
    gradient instead of three and sums nothing. None (the caller runs the modules as they are) when nothing
    records a gradient (then the concatenation would only add host time: ~15 us a call here, against three
    Linears' ~27), or unless all three are plain nn.Linear of one shape and dtype without hooks: a LoRA-wrapped,
    quantised or hooked projection must run as itself."""
    lins = (query, key, value)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(m.weight.requires_grad for m in lins)):
        return None
    if not all(plain_linear(m) for m in lins):
        return None
    if len({(m.weight.shape, m.weight.dtype, m.weight.device, m.bias is None) for m in lins}) != 1:
        return None
    weight = torch.cat([m.weight for m in lins])
    bias = None if query.bias is None else torch.cat([m.bias for m in lins])
    return F.linear(x, weight, bias).split(query.out_features, dim=-1)


def unhooked(*modules: nn.Module) -> bool:
    """Whether no forward hook would run on any of these modules (none of their own, no global one): a fused path
    that stands in for a module's call, reading its parameters, must not skip a hook or lose what it changes."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    return not any(isinstance(m, nn.Module) and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def plain_linear(m: nn.Module) -> bool:
    """Whether ``m(x)`` is ``F.linear(x, m.weight, m.bias)`` and nothing else: an nn.Linear itself (not a wrapper
    such as a LoRA layer, whose weight may be its base layer's alone) with no forward hook (unhooked)."""
    return type(m) is nn.Linear and unhooked(m)


def tag_preact(y: torch.Tensor, preact: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """y (a linear_gelu result), carrying the pre-activation that linear_gelu's backward saves (when there is
    one) and y's version, for linear_after_gelu. Returns y."""
    if preact is not None:
        y._fastbert_preact = (preact, y._version, approximate)
    return y


def linear_after_gelu(linear: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """``linear(y)``. When y came tagged from tag_preact, unchanged since, and the Linear has no hooks: through
    ops' linear_of_gelu, so that autograd keeps the pre-activation linear_gelu saves anyway instead of y as well
    (one [tokens, intermediate] activation less per BERT layer in training)."""
    preact = None if torch.compiler.is_compiling() else getattr(y, "_fastbert_preact", None)
    if preact is None or preact[1] != y._version or not plain_linear(linear):
        return linear(y)
    return linear_of_gelu(y, preact[0], linear.weight, linear.bias, approximate=preact[2])


class FusedAddLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward adds a residual first, with optional dropout on ``x``:
    ``forward(x, residual) = layer_norm(dropout(x) + residual)``, one kernel (forward and backward).
    ``dropout`` (keyword-only: nn.LayerNorm's third positional argument is elementwise_affine) applies in
    training mode only, like ``nn.Dropout``. Same parameters (weight, bias) and state_dict as nn.LayerNorm, always
    affine with a bias; eps defaults to BERT's 1e-12 (nn.LayerNorm's is 1e-5)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-12, *, dropout: float = 0.0, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"FusedAddLayerNorm normalises the last dimension only, got {self.normalized_shape}")
        self.dropout = _checked_dropout(dropout)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, dropout: float = 0.0) -> FusedAddLayerNorm:
        """A FusedAddLayerNorm sharing ``ln``'s weight and bias."""
        if not ln.elementwise_affine or ln.bias is None or len(ln.normalized_shape) != 1:
            raise ValueError("from_layer_norm needs a LayerNorm over the last dimension with weight and bias")
        dropout = _checked_dropout(dropout)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = ln.normalized_shape, ln.eps, True
        new.weight, new.bias = ln.weight, ln.bias
        new.dropout = dropout
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = self.dropout if self.training else 0.0
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, dropout_p=p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


class FusedLinearGELU(nn.Linear):
    """``gelu(linear(x))`` in one GEMM with a fused epilogue; ``approximate`` "none" (exact erf, BERT's "gelu") or
    "tanh" ("gelu_new", "gelu_pytorch_tanh"). Same parameters and state_dict as nn.Linear. In training its result
    carries the pre-activation (tag_preact) for a following linear_after_gelu (as in FusedFeedForward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
                 device=None, dtype=None):  # fmt: skip
        _checked_approximate(approximate)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate

    @classmethod
    def from_linear(cls, linear: nn.Linear, approximate: str = "none") -> FusedLinearGELU:
        """A FusedLinearGELU sharing ``linear``'s weight and bias."""
        _checked_approximate(approximate)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.approximate = approximate
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = linear_gelu_with_preact(x, self.weight, self.bias, approximate=self.approximate)
        return tag_preact(y, h, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


def _check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} (hidden_size / num_heads) is unsupported: attention supports {HEAD_DIMS}"
        )


class FusedSelfAttention(nn.Module):
    """BERT self-attention: ``query``/``key``/``value`` projections (nn.Linear, as in BertSelfAttention, so
    the state_dict matches), then the fused attention kernel with an optional [batch, seq] key-padding mask
    (1 = attend) and attention-probability dropout in training. ``forward(hidden [batch, seq, hidden],
    attention_mask=None) -> [batch, seq, hidden]`` (the context, before BERT's output projection)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        _check_head_dim(hidden_size // num_heads)
        self.num_heads, self.head_dim, self.dropout = num_heads, hidden_size // num_heads, _checked_dropout(dropout)
        self.query = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)
        self.key = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)
        self.value = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)

    @classmethod
    def from_bert(cls, attn: nn.Module) -> FusedSelfAttention:
        """From a transformers BertSelfAttention / RobertaSelfAttention (shares query, key and value)."""
        _check_head_dim(attn.attention_head_size)
        dropout = _checked_dropout(attn.dropout.p)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_attention_heads, attn.attention_head_size
        new.dropout = dropout
        new.query, new.key, new.value = attn.query, attn.key, attn.value
        return new

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = hidden.shape
        lins = (self.query, self.key, self.value)
        qkv = fused_qkv(*lins, hidden) or [lin(hidden) for lin in lins]  # one GEMM when the three are plain Linears
        q, k, v = (t.view(B, S, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv)
        p = self.dropout if self.training else 0.0
        out = ops.attention(q, k, v, attention_mask, dropout_p=p)  # [B, H, S, D] view of [B, S, H, D] storage
        return out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)


class FusedFeedForward(nn.Module):
    """BERT's feed-forward block (BertIntermediate + BertOutput): ``LN(dropout(W2 · gelu(W1 x + b1) + b2) + x)``
    with the GELU fused into the first GEMM and dropout + residual + LayerNorm fused after the second. In
    training the second GEMM's backward recomputes gelu(h) from the pre-activation h the first one saves, so
    the [tokens, intermediate] GELU output is not kept as well.
    Submodules ``intermediate`` (FusedLinearGELU), ``output`` (nn.Linear) and ``norm`` (FusedAddLayerNorm)."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float = 1e-12, dropout: float = 0.0,
                 approximate: str = "none", device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.intermediate = FusedLinearGELU(hidden_size, intermediate_size, approximate=approximate, device=device,
                                            dtype=dtype)  # fmt: skip
        self.output = nn.Linear(intermediate_size, hidden_size, device=device, dtype=dtype)
        self.norm = FusedAddLayerNorm(hidden_size, eps=eps, dropout=dropout, device=device, dtype=dtype)

    @classmethod
    def from_bert(cls, intermediate: nn.Module, output: nn.Module, approximate: str = "none") -> FusedFeedForward:
        """From a transformers BertIntermediate + BertOutput pair (shares every parameter)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.intermediate = FusedLinearGELU.from_linear(intermediate.dense, approximate)
        new.output = output.dense
        new.norm = FusedAddLayerNorm.from_layer_norm(output.LayerNorm, dropout=output.dropout.p)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(linear_after_gelu(self.output, self.intermediate(x)), x)
