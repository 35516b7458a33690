"""fastbert.optimize / fastbert.restore: swap the hot paths of a HuggingFace BERT-family model for fastbert's
fused ops, in place, sharing every parameter.

How it plugs in (transformers 5.x):
- Attention: fastbert's attention function is registered in transformers' AttentionInterface under the name
  "fastbert", together with a matching AttentionMaskInterface function (without it transformers silently hands
  custom attention no padding mask). The mask function returns the [batch, seq] key-padding mask, or None when
  nothing is padded. The model's config then names "fastbert" as its attention implementation.
- Self-attention projections: in training BertSelfAttention (and its RoBERTa twins) run query / key / value as
  one GEMM over the concatenated weights (modules.fused_qkv: one cast of the input under autocast, one saved
  copy of it, one GEMM per gradient), then call the attention function directly; transformers' forward runs
  whenever that does not apply (a cache, another attention implementation, projections that are not plain
  Linears, e.g. LoRA).
- Residual + LayerNorm (BertSelfOutput, BertOutput and the RoBERTa twins): their forward becomes
  ``ops.add_layer_norm(dense(h), residual, ...)`` (dropout inside the kernel in training).
- BertIntermediate with a GELU activation: ``ops.linear_gelu``. In training it hands the pre-activation h it
  saves to the BertOutput that consumes its result y (an attribute of y, with y's version), whose dense layer
  then saves h instead of y and recomputes y = gelu(h) in the backward: one [tokens, intermediate] activation
  less per layer (about 1.2 GB for BERT-base at 32 x 512 in bf16). Anything in between that replaces or
  modifies y, or a forward hook on that dense layer, makes BertOutput use its Linear as it is.
- Masked-LM loss (BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM and their twins, _MLM_MODELS): when the
  call has labels, a forward pre-hook on the model takes them out of the call and hands them to the decoder
  Linear, which then computes logits and loss together (``ops.linear_cross_entropy``: a vocabulary padded for
  cuBLAS, a loss that keeps no fp32 [tokens, vocab] tensor), and a forward hook puts the loss (plus the
  next-sentence loss, computed as transformers does) back into the output. If anything between the decoder and
  the output changed the logits, the hook computes transformers' loss from the output's logits instead.
- Unpad once: when the batch has padding, the encoder packs the real tokens once before the first layer, every
  layer runs on [tokens, hidden] with ``ops.attention_varlen``, and the padded layout is restored at the end.
  Padding positions of the result are then zeros (transformers computes values nobody should read there). It
  runs the padded batch instead where that would show: a row whose position 0 is padding (the pooler reads it),
  chunk_size_feed_forward, a hook of the caller's inside the layers (_layers_take_tokens).
- Packed sequences: position_ids that restart within a row and no attention mask make transformers combine a
  block-diagonal rule into its mask function; mask_function then returns a ComposedMask, and the encoder runs
  the rows' sequences as one variable-length batch (anything else that meets it builds transformers' mask and
  runs transformers' eager attention).
- Every fused path uses a module's parameters only while it is the plain torch.nn module without hooks
  (modules.plain_linear, unhooked: the Linears, LayerNorm, dropout and activation it stands in for), checked on
  each call: a LoRA layer, a replaced LayerNorm or a hook installed after optimize runs as itself.

Modules are changed by swapping their class for a subclass that only overrides ``forward`` (no new parameters,
buffers or submodules), so state_dict keys and values are identical and ``restore`` swaps the classes back.
Anything that cannot be accelerated keeps transformers' code, and the summary says why.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.modules import fused_qkv, linear_after_gelu, plain_linear, tag_preact, unhooked
from fastbert.ops._attention import shared_key_bias
from fastbert.ops._linear_gelu import linear_gelu_with_preact

ATTN_NAME = "fastbert"
# Model types whose encoder modules are transformers' BERT modules under another name (generated copies of them:
# same source, prefix aside, checked against transformers 5.24 by tests/test_optimize.py)
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "data2vec-text")
# transformers' hidden_act names that have a fused form, and the GELU form each means
GELU_FORMS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
_ADD_LN_CLASSES = {"SelfOutput", "Output"}  # BertSelfOutput, BertOutput, RobertaSelfOutput, ...
_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "Electra", "Camembert", "Ernie", "Data2VecText")


@dataclasses.dataclass
class Summary:
    """What fastbert.optimize changed (``accelerated``: part -> count) and what it left alone, with why."""

    accelerated: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = ["fastbert.optimize:"]
        lines += [f"  accelerated {n} x {part}" for part, n in self.accelerated.items()]
        lines += [f"  kept {part}: {why}" for part, why in self.skipped.items()]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class VarlenBatch:
    """Stands in for the attention mask while the encoder runs on packed tokens (see _FastEncoder)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


@dataclasses.dataclass
class ComposedMask:
    """Stands in for the attention mask when transformers' mask is more than key padding: several sequences packed
    into each row (position_ids that restart, no attention mask, as DataCollatorWithFlattening makes them), or
    another pattern combined into its mask function. It holds the mask-interface call, so that transformers' own
    (eager, additive 4-D) mask is made where it is needed; the encoder runs packed sequences as a variable-length
    batch instead (_encoder_forward)."""

    call: dict
    _dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            from transformers.masking_utils import eager_mask

            self._dense = eager_mask(**self.call)
        return self._dense


def _capturing(kind: str) -> bool:
    """True when transformers is recording per-layer outputs of this kind ("attentions", "hidden_states") for
    the current forward (output_attentions / output_hidden_states)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older layout: look in utils.generic
        try:
            from transformers.utils.generic import _active_collector
        except ImportError:
            return True  # unknown: assume recording, which only ever costs speed
    collected = _active_collector.get()
    return bool(collected) and kind in collected


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function ("fastbert"): q, k, v [batch, heads, seq, head_dim] (transposed views),
    attention_mask None or the [batch, seq] padding mask from mask_function, a VarlenBatch (packed
    [tokens, ...] layout), or a ComposedMask (run as transformers' eager attention with its mask). Returns
    (out [batch, seq, heads, head_dim] or [tokens, heads, head_dim], None)."""
    if isinstance(attention_mask, ComposedMask):
        attention_mask = attention_mask.dense()
    if _capturing("attentions") or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2):
        # output_attentions=True: the probabilities must exist, which the fused kernel never materialises; or a
        # mask the caller built (4-D, additive or bool), which eager attention applies as given.
        from transformers.models.bert.modeling_bert import eager_attention_forward

        return eager_attention_forward(module, query, key, value, _as_4d(attention_mask, query), dropout=dropout,
                                       scaling=scaling, **kwargs)  # fmt: skip
    if isinstance(attention_mask, VarlenBatch):
        # The layer viewed [tokens, hidden] as [tokens, heads, head_dim] and transposed: undo the transpose.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = ops.attention_varlen(q, k, v, attention_mask.cu_seqlens, attention_mask.max_seqlen, dropout_p=dropout,
                                   scale=scaling, validate=False)  # fmt: skip
        return out, None
    out = ops.attention(query, key, value, attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2), None


def _as_4d(mask, query):
    """The additive 4D mask eager attention expects, from a [batch, seq] padding mask (None, and a mask the caller
    built, not 2-D, stay as they are)."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() != 2):
        return mask
    if isinstance(mask, VarlenBatch):
        raise RuntimeError("fastbert: per-layer attentions requested inside a packed encoder run")
    neg = torch.finfo(query.dtype).min
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask.bool(), neg)[
        :, None, None, :
    ]


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):  # fmt: skip
    """transformers AttentionMaskInterface function ("fastbert"): the [batch, kv_length] bool padding mask, or
    None when no token is padded (checked on the host unless tracing or capturing a CUDA graph). When
    transformers' mask_function is more than bidirectional attention over the padding mask (packed sequences found
    in position_ids, or another pattern), a ComposedMask; under torch.compile, its eager 4-D mask."""
    from transformers import masking_utils

    plain = getattr(masking_utils, "bidirectional_mask_function", None)
    if mask_function is not None and mask_function is not plain:
        composed = ComposedMask(dict(kwargs, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                     attention_mask=attention_mask, allow_is_bidirectional_skip=False))  # fmt: skip
        return composed.dense() if torch.compiler.is_compiling() else composed
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:  # the caller's own (4-D) mask: attention_forward hands it to eager attention
        return attention_mask
    attention_mask = attention_mask[:, -kv_length:].bool()
    if torch.compiler.is_compiling() or (attention_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask


def register() -> None:
    """Register "fastbert" in transformers' attention and attention-mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, mask_function)


# ----------------------------------------------------------------------------------------------- module forwards
def _self_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs):
    """BertSelfAttention's forward with the query / key / value projections as one GEMM (modules.fused_qkv) and
    fastbert's attention; transformers' own forward for everything else (a cache, another attention
    implementation chosen since, projections that are not plain Linears)."""
    qkv = None
    if (
        not args
        and kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
        and self.config._attn_implementation == ATTN_NAME
    ):
        qkv = fused_qkv(self.query, self.key, self.value, hidden_states)
    if qkv is None:
        return super(type(self), self).forward(hidden_states, attention_mask, *args, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    # as transformers lays them out: [batch, heads, seq, head_dim] views (packed: [tokens, head_dim, heads])
    q, k, v = (t.view(*hidden_shape).transpose(1, 2) for t in qkv)
    for key in ("cache", "past_key_values"):
        kwargs.pop(key, None)
    out, weights = attention_forward(self, q, k, v, attention_mask, dropout=self.dropout.p if self.training else 0.0,
                                     scaling=self.scaling, **kwargs)  # fmt: skip
    return out.reshape(*input_shape, -1).contiguous(), weights


def _fused_qkv_applies(cls: type) -> bool:
    """Whether this transformers version's self-attention forward is the one _self_attention_forward stands in
    for: (hidden_states, attention_mask, cache or past_key_values, **kwargs), returning (output, weights), with
    query / key / value Linears and the attention-function registry (transformers 5)."""
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError, ValueError):
        return False
    names = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return (
        names[:3] == ["self", "hidden_states", "attention_mask"]
        and set(names[3:]) <= {"cache", "past_key_values"}
        and any(p.kind == p.VAR_KEYWORD for p in params.values())
        and "ALL_ATTENTION_FUNCTIONS" in source
    )


def _add_ln_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    ln = self.LayerNorm
    if type(ln) is not nn.LayerNorm or not unhooked(ln, self.dropout):  # replaced or hooked since optimize
        return super(type(self), self).forward(hidden_states, input_tensor)
    p = self.dropout.p if self.training else 0.0
    # BertOutput after a fused BertIntermediate: its dense saves the pre-activation instead of the GELU output
    dense = linear_after_gelu(self.dense, hidden_states)
    return ops.add_layer_norm(dense, input_tensor, ln.weight, ln.bias, ln.eps, dropout_p=p)


def _intermediate_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not plain_linear(self.dense) or not unhooked(self.intermediate_act_fn):  # wrapped (LoRA) or hooked since
        return super(type(self), self).forward(hidden_states)  # optimize: transformers' dense + GELU
    y, h = linear_gelu_with_preact(hidden_states, self.dense.weight, self.dense.bias, approximate=self._fastbert_gelu)
    return tag_preact(y, h, self._fastbert_gelu)


def _encoder_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                     encoder_attention_mask=None, **kwargs):  # fmt: skip
    """Unpad once: pack the real tokens, run every layer on them, restore the padded layout; sequences packed into
    rows by position_ids (a ComposedMask from mask_function) run as a variable-length batch as they are. The
    cache arrives as `past_key_values` (transformers < 5.24) or `cache` (later): both stay in kwargs, passed on
    untouched."""
    base = super(type(self), self).forward
    composed = isinstance(attention_mask, ComposedMask)
    position_ids = kwargs.get("position_ids")
    packable = (
        (
            (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
            or (composed and attention_mask.call.get("attention_mask") is None and position_ids is not None)
        )
        and encoder_hidden_states is None
        and kwargs.get("past_key_values") is None
        and kwargs.get("cache") is None
        and not torch.compiler.is_compiling()
        and not (hidden_states.is_cuda and torch.cuda.is_current_stream_capturing())
        and not _capturing("hidden_states")
        and not _capturing("attentions")
        and _layers_take_tokens(self)
    )
    # A head that reads position 0 of each row (the pooler, RoBERTa's classifier) must find transformers' value
    # there, which unpadding leaves at zero where position 0 is padding (left padding): such a batch runs padded.
    # (A row without any token gives zeros, as documented, and does not count.)
    if packable and not composed and not bool((attention_mask[:, 0] | ~attention_mask.any(1)).all()):
        packable = False
    if not packable:
        if composed:
            attention_mask = attention_mask.dense()
        # The layers then get the padding mask itself: its key bias is made once for all of them.
        with shared_key_bias():
            return base(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, **kwargs)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    B, S = hidden_states.shape[:2]
    if composed:
        packed, indices = hidden_states.reshape(B * S, hidden_states.shape[-1]), None
        cu_seqlens, max_seqlen = _sequences_of_positions(position_ids, B, S)
    else:
        packed, indices, cu_seqlens, max_seqlen = ops.unpad(hidden_states, attention_mask)
    batch = VarlenBatch(cu_seqlens, max_seqlen)
    # Per-token positions were consumed by the embeddings; the cache is None here and use_cache means nothing
    # to an encoder without one.
    for key in ("position_ids", "past_key_values", "cache", "use_cache"):
        kwargs.pop(key, None)
    if packed.shape[0]:  # (a batch without a single token: nothing to run, zeros at every position)
        for layer in self.layer:
            packed = layer(packed, batch, None, **kwargs)
    out = packed.view(B, S, -1) if indices is None else ops.pad(packed, indices, B, S)
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)


def _sequences_of_positions(position_ids: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) and the longest length of the sequences packed into the rows of [batch, seq] tokens: as
    transformers reads them (masking_utils.find_packed_sequence_indices), a sequence starts at each row's first
    token and wherever a position is not its predecessor's plus one."""
    pos = position_ids.expand(batch, seq)
    starts = torch.ones(batch, seq, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    begins = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([begins, begins.new_tensor([batch * seq])]).to(device=pos.device, dtype=torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


_CAPTURING_HOOKS = "transformers.utils.output_capturing"


def _foreign_hook(hooks) -> bool:
    # transformers' own output-capturing hooks (installed on the layers once, idle unless capturing: then the
    # encoder does not unpad anyway) are not the caller's
    for hook in hooks.values():
        if getattr(hook, "__module__", None) != _CAPTURING_HOOKS:
            return True
    return False


def _layers_take_tokens(encoder: nn.Module) -> bool:
    """Whether the layers may run on packed [tokens, hidden] states: no chunked feed-forward (it splits dim 1, the
    sequence of the padded layout), and no hook of the caller's on the layers or anything in them, which would
    see (and could change) packed tensors where it expects [batch, seq, hidden]. (A walk of the module tree on each
    forward: ~55 us for BERT-base's 216 modules on the 2-core development machine.) A hook that keeps the batch
    padded is named in a warning, once per encoder: frameworks hook modules too (FSDP, DeepSpeed ZeRO-3)."""
    from torch.nn.modules import module as nn_module

    if any(getattr(layer, "chunk_size_feed_forward", 0) for layer in encoder.layer):
        return False
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):  # fmt: skip
        if getattr(nn_module, name, None):
            _warn_padded(encoder, f"a global module hook (torch.nn.modules.module.{name})")
            return False
    stack = list(encoder.layer._modules.values())
    while stack:
        module = stack.pop()
        if module is None:
            continue
        d = module.__dict__
        if (
            d["_forward_pre_hooks"]
            or d["_backward_hooks"]
            or d["_backward_pre_hooks"]
            or (d["_forward_hooks"] and _foreign_hook(d["_forward_hooks"]))
        ):
            _warn_padded(encoder, module)
            return False
        stack.extend(d["_modules"].values())
    return True


def _warn_padded(encoder: nn.Module, where) -> None:
    """The one warning (per encoder) that a hook keeps its batches padded: correct, but the padding is computed.
    where: the module a hook is on, or words for a global hook."""
    if encoder.__dict__.get("_fastbert_warned_padded"):
        return
    encoder.__dict__["_fastbert_warned_padded"] = True
    if isinstance(where, nn.Module):
        name = next((n for n, m in encoder.layer.named_modules() if m is where), type(where).__name__)
        d = where.__dict__
        kind = next(k for k in ("_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks")
                    if d[k] and (k != "_forward_hooks" or _foreign_hook(d[k])))  # fmt: skip
        hooks = list(d[kind].values())
        hook = next((h for h in hooks if getattr(h, "__module__", None) != _CAPTURING_HOOKS), hooks[0])
        what = getattr(hook, "__qualname__", type(hook).__name__)
        where = f"a {kind.strip('_').replace('_', ' ')[:-1]} ({what}) on encoder.layer.{name}"
    warnings.warn(
        f"fastbert: {where} keeps this encoder's batches padded: while hooks that could see its layers' tensors "
        "are registered it does not unpad, so that they see [batch, seq, hidden] as without fastbert. Results are "
        "unchanged; the padding tokens are computed. (FSDP and DeepSpeed ZeRO-3 hook modules too.) Warned once "
        "per encoder.",
        UserWarning,
        stacklevel=2,
    )


# ----------------------------------------------------------------------------------------------- masked-LM loss
# Models whose forward computes CrossEntropyLoss()(prediction_scores.view(-1, vocab), labels.view(-1)) from the
# output embeddings' logits; True where the loss also adds the next-sentence loss (and needs its label).
_MLM_MODELS = {"BertForPreTraining": True, "BertForMaskedLM": False, "RobertaForMaskedLM": False,
               "XLMRobertaForMaskedLM": False, "ElectraForMaskedLM": False, "CamembertForMaskedLM": False,
               "ErnieForPreTraining": True, "ErnieForMaskedLM": False,
               "Data2VecTextForMaskedLM": False}  # fmt: skip


@dataclasses.dataclass
class _PendingLoss:
    """The labels of one call on their way from the model's pre-hook to its decoder, and what came back."""

    labels: torch.Tensor
    next_sentence_label: torch.Tensor | None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


@dataclasses.dataclass
class _MaskedLMState:
    decoder: nn.Linear
    names: list[str]  # the forward's parameters, in order (labels may come positionally)
    pretraining: bool
    pending: _PendingLoss | None = None


def _mlm_loss_blocker(hf: nn.Module) -> str | None:
    """Why the fused masked-LM loss cannot stand in for this model's, or None if it can."""
    import inspect

    pretraining = _MLM_MODELS[type(hf).__name__]
    try:
        source = inspect.getsource(type(hf).forward)
        names = list(inspect.signature(type(hf).forward).parameters)
    except (OSError, TypeError, ValueError):
        return "the model's forward cannot be inspected"
    expected = ["CrossEntropyLoss()", "prediction_scores.view(-1, self.config.vocab_size), labels.view(-1)"]
    if pretraining:
        expected += ["masked_lm_loss + next_sentence_loss", "seq_relationship_score.view(-1, 2)"]
    if not all(e in source for e in expected) or "labels" not in names:
        return "this transformers version's loss is not the one fastbert knows"
    decoder = hf.get_output_embeddings()
    if type(decoder) is not nn.Linear:
        return f"the decoder is a {type(decoder).__name__}, not a plain nn.Linear"
    return None


def _decoder_forward(self, input: torch.Tensor) -> torch.Tensor:
    """The masked-LM decoder: F.linear, or, with labels handed over by the model's pre-hook, logits and loss in
    one (ops.linear_cross_entropy)."""
    pending = self.__dict__.pop("_fastbert_pending", None)
    if pending is None or pending.labels.numel() * input.shape[-1] != input.numel():
        return F.linear(input, self.weight, self.bias)
    logits, loss = ops.linear_cross_entropy(input, self.weight, self.bias, pending.labels.to(input.device))
    pending.logits, pending.loss = logits, loss
    return logits


def _mlm_pre_hook(model, args, kwargs):
    """Forward pre-hook of a masked-LM model: take the labels out of the call (transformers then computes no
    loss) and hand them to the decoder."""
    state = model._fastbert_mlm
    state.pending = None
    state.decoder.__dict__.pop("_fastbert_pending", None)
    if torch.compiler.is_compiling():
        return None
    bound = dict(zip(state.names[1:], args, strict=False)) | kwargs
    labels, nsp = bound.get("labels"), bound.get("next_sentence_label")
    if not isinstance(labels, torch.Tensor) or (state.pretraining and nsp is None):
        return None  # no loss, or (pretraining without a next-sentence label) none that transformers computes
    kwargs = bound | {"labels": None}
    if state.pretraining:
        kwargs["next_sentence_label"] = None
    state.pending = _PendingLoss(labels, nsp if state.pretraining else None)
    state.decoder._fastbert_pending = state.pending
    return (), kwargs


def _mlm_post_hook(model, args, kwargs, output):
    """Forward hook (also on an exception): put the fused loss into the output, as transformers would have."""
    state = model._fastbert_mlm
    pending, state.pending = state.pending, None
    state.decoder.__dict__.pop("_fastbert_pending", None)
    if pending is None or output is None:
        return None
    as_tuple = isinstance(output, tuple)
    logits = output[0] if as_tuple else output[next(iter(output.keys()))]
    loss = pending.loss
    if loss is None or logits is not pending.logits:
        # something between the decoder and the output (a hook, another head) replaced the logits: the loss
        # transformers computes, from what the model returns
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), pending.labels.to(logits.device).reshape(-1))
    if pending.next_sentence_label is not None:
        seq_relationship = output[1] if as_tuple else output.seq_relationship_logits
        loss = loss + F.cross_entropy(seq_relationship.view(-1, 2), pending.next_sentence_label.view(-1))
    if as_tuple:
        return (loss, *output)
    return type(output)(loss=loss, **dict(output.items()))


def _add_mlm_loss(hf: nn.Module) -> None:
    import inspect

    decoder = hf.get_output_embeddings()
    _swap(decoder, _decoder_forward, "decoder")
    names = list(inspect.signature(type(hf).forward).parameters)
    hf._fastbert_mlm = _MaskedLMState(decoder, names, _MLM_MODELS[type(hf).__name__])
    hf.register_forward_pre_hook(_mlm_pre_hook, with_kwargs=True)
    hf.register_forward_hook(_mlm_post_hook, with_kwargs=True, always_call=True)


def _remove_mlm_loss(hf: nn.Module) -> None:
    """Remove the hooks _add_mlm_loss registered (found by function, so a deep copy's are found too)."""
    for hooks, ours in ((hf._forward_pre_hooks, _mlm_pre_hook), (hf._forward_hooks, _mlm_post_hook)):
        for key in [k for k, fn in hooks.items() if fn is ours]:
            del hooks[key]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                          "_forward_hooks_always_called"):  # fmt: skip
                getattr(hf, extra, {}).pop(key, None)
    hf.__dict__.pop("_fastbert_mlm", None)


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _swap(module: nn.Module, forward, tag: str) -> None:
    """Give module a subclass of its class whose forward is ``forward`` (cached per class)."""
    cls = type(module)
    key = (cls, tag)
    if key not in _SUBCLASSES:
        attrs = {"forward": forward, "_fastbert_base": cls, "_fastbert_tag": tag, "__reduce_ex__": _reduce_swapped}
        _SUBCLASSES[key] = type(f"Fastbert{cls.__name__}", (cls,), attrs)
    module.__class__ = _SUBCLASSES[key]


# What each _swap tag's forward is: a swapped module pickles as its transformers class, its tag and its state.
_FORWARDS = {"attention": _self_attention_forward, "add_ln": _add_ln_forward, "intermediate": _intermediate_forward,
             "encoder": _encoder_forward, "decoder": _decoder_forward}  # fmt: skip


def _reduce_swapped(self, protocol):
    """pickle / copy of a swapped module: the subclasses are made at run time, so pickle could not find them by
    name (torch.save(model) failed); it rebuilds the transformers class, swaps it again and sets the state."""
    return _rebuild_swapped, (type(self)._fastbert_base, type(self)._fastbert_tag), self.__getstate__()


def _rebuild_swapped(base: type, tag: str) -> nn.Module:
    register()  # (a new process: the optimized config names the "fastbert" attention implementation)
    module = base.__new__(base)
    _swap(module, _FORWARDS[tag], tag)
    return module


def _is_swapped(module: nn.Module) -> bool:
    return "_fastbert_base" in type(module).__dict__


# ----------------------------------------------------------------------------------------------- optimize
def _find_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``: itself, or a sentence-transformers model's first module's."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return model
    first = next(iter(model.children()), None) if isinstance(model, nn.Sequential) else None
    inner = getattr(first, "auto_model", None)
    if inner is not None and hasattr(getattr(inner, "config", None), "model_type"):
        return inner
    raise ValueError(f"fastbert.optimize supports transformers models of type {', '.join(SUPPORTED_MODEL_TYPES)} "
                     f"(BertModel, BertFor*, their RoBERTa, XLM-R, ELECTRA, CamemBERT, ERNIE and Data2VecText twins) "
                     f"and sentence-transformers models wrapping one; got {type(model).__name__}")  # fmt: skip


def _part(module: nn.Module) -> str | None:
    """Which swappable part a module is, from its class name: "attention", "add_ln", "intermediate",
    "encoder", or None."""
    name = type(module).__name__
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if rest == "SelfAttention":
                return "attention"
            if rest in _ADD_LN_CLASSES:
                return "add_ln"
            if rest == "Intermediate":
                return "intermediate"
            if rest == "Encoder":
                return "encoder"
    return None


def _attention_blocker(hf: nn.Module, attn_modules: list[nn.Module]) -> str | None:
    cfg = hf.config
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "decoder / cross-attention configuration (fastbert accelerates bidirectional encoders)"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type={cfg.position_embedding_type!r} (relative positions) is not fused"
    if not attn_modules:
        return "no self-attention module found"
    head_dims = {m.attention_head_size for m in attn_modules}
    bad = head_dims - set(ops._attention.HEAD_DIMS)
    if bad:
        return f"head_dim {sorted(bad)} unsupported (fused attention takes {ops._attention.HEAD_DIMS})"
    return None


def optimize(model: nn.Module) -> nn.Module:
    """Accelerate a HuggingFace BERT-family model (SUPPORTED_MODEL_TYPES: BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT,
    ERNIE, Data2VecText; any head) or a sentence-transformers model wrapping one, in place; returns it. Parameters
    are shared, never copied. Idempotent; undo with fastbert.restore.
    ``model.fastbert_summary`` (also returned by ``fastbert.summary(model)``) says what was accelerated and what
    was kept, and why. The attention implementation is set on the config (transformers keeps it there): another
    model sharing that config object also calls fastbert's attention (padded, with its mask; same results)."""
    hf = _find_model(model)
    if getattr(hf, "fastbert_summary", None) is not None:
        return model
    if hf.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"fastbert.optimize supports model types {SUPPORTED_MODEL_TYPES}; got "
                         f"{hf.config.model_type!r} ({type(hf).__name__})")  # fmt: skip
    summary = Summary()
    parts: dict[str, list[nn.Module]] = {}
    for module in hf.modules():
        part = _part(module)
        if part is not None:
            parts.setdefault(part, []).append(module)

    # attention: through transformers' registries, for the whole model (the implementation is per config)
    attn_modules = parts.get("attention", [])
    blocker = _attention_blocker(hf, attn_modules)
    configs = {id(m.config): m.config for m in attn_modules} | {id(hf.config): hf.config}
    claimed = []  # (config, its implementation before fastbert): what restore gives back
    if blocker is None:
        register()
        claimed = [(c, _claim_attention(c)) for c in configs.values()]
        summary.accelerated["self-attention (fused, padding mask / varlen)"] = len(attn_modules)
        fusable = [m for m in attn_modules if _fused_qkv_applies(type(m))]
        for module in fusable:
            _swap(module, _self_attention_forward, "attention")
        if fusable:
            summary.accelerated["query / key / value projections (one GEMM)"] = len(fusable)
        if len(fusable) < len(attn_modules):
            summary.skipped["query / key / value projections"] = (
                "this transformers version's self-attention forward is not the one fastbert knows"
            )
    else:
        summary.skipped["self-attention"] = blocker

    for module in parts.get("add_ln", []):
        ln = getattr(module, "LayerNorm", None)
        dense = getattr(module, "dense", None)
        if not isinstance(ln, nn.LayerNorm) or ln.bias is None or not isinstance(dense, nn.Linear):
            summary.skipped[type(module).__name__] = "unexpected structure (no dense + LayerNorm with bias)"
            continue
        if ln.normalized_shape[0] > ops._add_layer_norm.MAX_HIDDEN:
            summary.skipped[type(module).__name__] = f"hidden size beyond {ops._add_layer_norm.MAX_HIDDEN}"
            continue
        _swap(module, _add_ln_forward, "add_ln")
        key = f"{type(module)._fastbert_base.__name__} (dropout + residual + LayerNorm)"
        summary.accelerated[key] = summary.accelerated.get(key, 0) + 1

    act = getattr(hf.config, "hidden_act", None)
    for module in parts.get("intermediate", []):
        name = type(module).__name__
        dense = getattr(module, "dense", None)
        if not isinstance(act, str) or act not in GELU_FORMS:
            summary.skipped[name] = f"activation {act!r} has no fused form (fused: {', '.join(GELU_FORMS)})"
            continue
        if not isinstance(dense, nn.Linear) or dense.in_features % 8 or dense.out_features % 8:
            summary.skipped[name] = "in/out features not multiples of 8"
            continue
        module._fastbert_gelu = GELU_FORMS[act]
        _swap(module, _intermediate_forward, "intermediate")
        key = f"{type(module)._fastbert_base.__name__} (Linear + bias + GELU)"
        summary.accelerated[key] = summary.accelerated.get(key, 0) + 1

    if blocker is None and not type(hf).__name__.endswith("ForQuestionAnswering"):
        for module in parts.get("encoder", []):
            _swap(module, _encoder_forward, "encoder")
            summary.accelerated["encoder (unpad once, varlen layers)"] = 1
    elif blocker is None:
        # Its loss takes a softmax over every position, padding included, whose scores transformers computes from
        # the padding tokens' hidden states: the encoder runs the padded batch (fused attention, padding mask).
        summary.skipped["encoder unpadding"] = "question answering scores every position, padding included"
    else:
        summary.skipped["encoder unpadding"] = "needs the fused attention"

    if type(hf).__name__ in _MLM_MODELS:
        why = _mlm_loss_blocker(hf)
        if why is None:
            _add_mlm_loss(hf)
            summary.accelerated["masked-LM decoder + loss (fused Linear + cross-entropy)"] = 1
        else:
            summary.skipped["masked-LM loss"] = why

    hf._fastbert_previous_attn = claimed
    hf.fastbert_summary = summary
    return model


# Configs whose attention implementation fastbert set, by id: [the config (weakly; its entry goes when it does),
# its implementation before, how many optimized models use it]. Models built from one config object share it
# (transformers keeps the implementation there), so it goes back only when the last of them is restored, in
# whichever order.
_CLAIMED_CONFIGS: dict[int, list] = {}


def _claim_attention(config) -> str:
    """Set fastbert's attention on config; returns the implementation it had before fastbert's first claim."""
    key = id(config)
    entry = _CLAIMED_CONFIGS.get(key)
    if entry is None:
        ref = weakref.ref(config, lambda _: _CLAIMED_CONFIGS.pop(key, None))
        entry = _CLAIMED_CONFIGS[key] = [ref, config._attn_implementation, 0]
    entry[2] += 1
    config._attn_implementation = ATTN_NAME
    return entry[1]


def _release_attention(config, previous: str) -> None:
    """restore's half of _claim_attention: the implementation goes back once no optimized model uses config. A
    config fastbert does not know (a deep copy of an optimized model has its own) gets ``previous`` back."""
    entry = _CLAIMED_CONFIGS.get(id(config))
    if entry is None:
        config._attn_implementation = previous
        return
    entry[2] -= 1
    if entry[2] == 0:
        config._attn_implementation = entry[1]
        del _CLAIMED_CONFIGS[id(config)]


def restore(model: nn.Module) -> nn.Module:
    """Undo fastbert.optimize in place (the classes and the attention implementation); returns the model."""
    hf = _find_model(model)
    if getattr(hf, "fastbert_summary", None) is None:
        return model
    for module in hf.modules():
        if _is_swapped(module):
            module.__class__ = type(module)._fastbert_base
            module.__dict__.pop("_fastbert_gelu", None)
    _remove_mlm_loss(hf)
    for config, impl in hf._fastbert_previous_attn:
        _release_attention(config, impl)
    del hf._fastbert_previous_attn
    del hf.fastbert_summary
    return model


def summary(model: nn.Module) -> Summary | None:
    """The Summary fastbert.optimize attached to ``model``, or None if it is not optimized (a model fastbert does
    not know, e.g. not a transformers model, raises ValueError as optimize does)."""
    return getattr(_find_model(model), "fastbert_summary", None)
