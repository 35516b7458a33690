"""fastbert.optimize on small random HuggingFace models: same answers as transformers (outputs and gradients, padded
and unpadded batches), state_dict unchanged, restore, idempotence, fallbacks with reasons, bad input, and the
public modules. Interpreter-sized configs (2 layers, hidden 64); GPU-only checks at the end."""

import copy
import importlib
import inspect
import warnings

import pytest
import torch
from torch import nn

import fastbert
from conftest import DEVICE, HAS_CUDA
from fastbert import modules
from numerics import assert_matches_reference

transformers = pytest.importorskip("transformers")


def bert_config(**kw):
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertConfig(**(base | kw))


def roberta_config(**kw):
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                pad_token_id=1)  # fmt: skip
    return transformers.RobertaConfig(**(base | kw))


# The BERT twins fastbert.optimize also takes: model type -> (config class, class-name prefix, its BERT / RoBERTa
# original). ELECTRA's embeddings (32) are narrower than its encoder (64), as in its small checkpoints.
TWINS = {
    "electra": ("ElectraConfig", "Electra", "Bert", dict(embedding_size=32)),
    "camembert": ("CamembertConfig", "Camembert", "Roberta", dict(pad_token_id=1)),
    "ernie": ("ErnieConfig", "Ernie", "Bert", dict(use_task_id=True, task_type_vocab_size=3)),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecText", "Roberta", dict(pad_token_id=1)),
}


def twin_config(model_type, **kw):
    name, _, _, extra = TWINS[model_type]
    return getattr(transformers, name)(**(bert_config().to_dict() | extra | kw))


def config_for(cls: str):
    for model_type, (_, prefix, _, _) in TWINS.items():
        if cls.startswith(prefix):
            return twin_config(model_type)
    return roberta_config() if cls.startswith(("Roberta", "XLMRoberta")) else bert_config()


def batch(B=3, S=12, lengths=(12, 7, 1), vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.to(DEVICE), mask.to(DEVICE)


def pair(cls, cfg, seed=0):
    torch.manual_seed(seed)
    ref = cls(cfg).to(DEVICE).eval()
    ref.set_attn_implementation("eager")
    fast = fastbert.optimize(copy.deepcopy(ref))
    return ref, fast


def test_bert_model_padded_and_full():
    ref, fast = pair(transformers.BertModel, bert_config())
    s = fastbert.summary(fast)
    assert s.accelerated and not s.skipped, str(s)
    assert type(fast.encoder).__name__ == "FastbertBertEncoder"
    assert fast.config._attn_implementation == "fastbert"
    for lengths in ((12, 7, 1), (12, 12, 12)):
        ids, mask = batch(lengths=lengths)
        with torch.no_grad():
            a = fast(input_ids=ids, attention_mask=mask)
            b = ref(input_ids=ids, attention_mask=mask)
        valid = mask.bool()
        torch.testing.assert_close(a.last_hidden_state[valid], b.last_hidden_state[valid], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=1e-4, atol=1e-4)
        if lengths[1] < 12:  # unpadded run: padding positions are zeros, documented
            assert (a.last_hidden_state[~valid] == 0).all()


def test_padded_encoder_makes_the_key_bias_once_per_forward(monkeypatch):
    """When the encoder runs padded (here: hidden states recorded; also under CUDA-graph capture), its layers share
    one key bias made from the mask (not one a layer), and the outputs match transformers'."""
    from fastbert import hf
    from fastbert.kernels import attention as kernels

    ref, fast = pair(transformers.BertModel, bert_config())
    made = []
    real = kernels.key_bias
    monkeypatch.setattr(kernels, "key_bias", lambda mask, seq_k: made.append(seq_k) or real(mask, seq_k))
    monkeypatch.setattr(hf, "_capturing", lambda kind: kind == "hidden_states")
    ids, mask = batch(lengths=(12, 7, 1))
    valid = mask.bool()
    for _ in range(2):
        with torch.no_grad():
            a = fast(input_ids=ids, attention_mask=mask).last_hidden_state
            b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    assert made == [12, 12]  # once per forward, for both layers


def test_pretraining_loss_and_gradients_match():
    """BertForPreTraining (MLM + NSP) in training mode (dropout 0 so the two runs compare): loss and every
    parameter gradient."""
    ref, fast = pair(transformers.BertForPreTraining, bert_config())
    ref.train(), fast.train()
    ids, mask = batch()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    nsp = torch.tensor([0, 1, 0], device=DEVICE)
    losses = []
    for m in (ref, fast):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        g, fg = p.grad, fast_params[name].grad
        assert fg is not None, name
        torch.testing.assert_close(fg, g, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _mlm_args(cls, ids, mask):
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, ::3] = -100  # unlabelled real tokens too, as in masked-LM batches
    pretraining = cls.endswith("ForPreTraining")
    extra = {"next_sentence_label": torch.tensor([0, 1, 0], device=DEVICE)} if pretraining else {}
    return labels, extra


@pytest.mark.parametrize("cls", ["BertForPreTraining", "BertForMaskedLM", "RobertaForMaskedLM", "ElectraForMaskedLM",
                                 "CamembertForMaskedLM", "ErnieForPreTraining", "ErnieForMaskedLM",
                                 "Data2VecTextForMaskedLM"])  # fmt: skip
def test_masked_lm_loss_is_fused_and_matches(cls):
    """With labels, the decoder and the loss run as ops.linear_cross_entropy (its logits have the padded row
    stride): the loss, every output field and every gradient match transformers', also for a tuple output
    (return_dict=False) and labels passed positionally."""
    ref, fast = pair(getattr(transformers, cls), config_for(cls))
    assert "masked-LM decoder + loss (fused Linear + cross-entropy)" in fastbert.summary(fast).accelerated
    ref.train(), fast.train()
    ids, mask = batch()
    labels, extra = _mlm_args(cls, ids, mask)
    outs = []
    for m in (ref, fast):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
        outs.append(out)
    assert list(outs[1].keys()) == list(outs[0].keys())
    logits = outs[1][1]
    assert logits.stride(-2) == 320, "the fused decoder did not run"  # vocabulary 300 padded to 320
    valid = mask.bool()  # per-token outputs at padding positions differ after unpadding (documented)
    for key in outs[0]:
        a, b = outs[1][key], outs[0][key]
        a, b = (a[valid], b[valid]) if a.dim() == 3 else (a, b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
    with torch.no_grad():
        as_tuple = fast(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False, **extra)
        names = list(inspect.signature(type(fast).forward).parameters)[1:]
        positional = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        args = [positional.get(n) for n in names[: max(names.index(k) for k in positional) + 1]]
        by_position = fast(*args)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(outs[0])
    for a, b in zip(as_tuple, outs[0].values(), strict=True):
        a, b = (a[valid], b[valid]) if a.dim() == 3 else (a, b)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(by_position.loss, outs[0].loss, rtol=1e-5, atol=1e-6)


def test_masked_lm_loss_follows_transformers_when_logits_change():
    """A forward hook that replaces the decoder's logits (scaled here): the loss is transformers', computed from
    the logits the model returns; without next_sentence_label BertForPreTraining returns no loss, as
    transformers; a forward that raises leaves nothing behind."""
    ref, fast = pair(transformers.BertForPreTraining, bert_config())
    for m in (ref, fast):
        m.cls.predictions.decoder.register_forward_hook(lambda mod, args, out: 2 * out)
    ids, mask = batch()
    labels, extra = _mlm_args("BertForPreTraining", ids, mask)
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask, labels=labels, **extra) for m in (fast, ref))
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        assert fast(input_ids=ids, attention_mask=mask, labels=labels).loss is None
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for a bad input
            fast(input_ids=ids[:, :5], attention_mask=mask, labels=labels, **extra)
        assert fast._fastbert_mlm.pending is None
        assert "_fastbert_pending" not in fast.cls.predictions.decoder.__dict__
        valid = mask.bool()
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).prediction_logits[valid],
                                   b.prediction_logits[valid], rtol=1e-4, atol=1e-5)  # fmt: skip


def test_masked_lm_loss_keeps_no_float32_vocab_tensor():
    """Under autocast eager CrossEntropyLoss keeps an fp32 log-softmax of [tokens, vocab] for its backward; the
    fused loss keeps the half logits (row stride padded to 320) and one fp32 value per token."""
    cfg = bert_config()
    ref, fast = pair(transformers.BertForMaskedLM, cfg)
    ids, mask = batch()
    labels, _ = _mlm_args("BertForMaskedLM", ids, mask)
    tokens = ids.numel()
    kept = []
    for m in (ref, fast):
        m.train()
        shapes = []

        def pack(t, shapes=shapes):
            shapes.append((t.dtype, tuple(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(DEVICE.type, torch.float16):
            m(input_ids=ids, attention_mask=mask, labels=labels)
        kept.append([s for s in shapes if len(s[1]) == 2 and s[1][0] == tokens and s[1][1] >= cfg.vocab_size])
    assert (torch.float32, (tokens, cfg.vocab_size)) in kept[0]
    assert kept[1] == [(torch.float16, (tokens, 320))], kept[1]


def test_training_dropout_runs_and_is_seeded():
    cfg = bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    _, fast = pair(transformers.BertForMaskedLM, cfg)
    fast.train()
    ids, mask = batch()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(fast(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(4)
    assert not torch.equal(outs[0], fast(input_ids=ids, attention_mask=mask).logits)
    fast.eval()
    with torch.no_grad():
        assert torch.isfinite(fast(input_ids=ids, attention_mask=mask).logits).all()


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask).logits.sum()
    return sum(storages.values())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing(reentrant):
    """transformers' gradient checkpointing reruns each layer in the backward (under no_grad first, with the
    reentrant form): the fused paths that hand tensors between modules (the pre-activation, the packed batch)
    must still give transformers' gradients."""
    ref, fast = pair(transformers.BertForMaskedLM, bert_config())
    ids, mask = batch()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    grads = []
    for m in (ref, fast):
        m.train()
        if hasattr(m, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            assert m.is_activation_checkpointing
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert m.is_gradient_checkpointing
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_with_dropout_regenerates_the_masks(reentrant):
    """With dropout, a checkpointed layer's rerun in the backward must draw the masks its forward drew
    (torch.utils.checkpoint restores the RNG state the kernels draw their seeds from): loss and gradients equal
    those of the same model, same seed, without checkpointing; a different seed changes them."""
    cfg = bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, num_hidden_layers=1)
    _, fast = pair(transformers.BertForMaskedLM, cfg)
    fast.train()
    ids, mask = batch(B=2, S=8, lengths=(8, 5))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))

    def run(seed):
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = fast(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}

    plain = run(5)
    assert not torch.equal(run(6)[0], plain[0])  # the seed decides the masks
    if hasattr(fast, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        fast.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = run(5)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert checkpointed[1].keys() == plain[1].keys()
    for name, g in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


class _LinearSubclass(nn.Linear):
    """An nn.Linear in all but type: the fused paths, which use only a plain nn.Linear's weight, step aside."""


def test_training_saves_the_preactivation_not_the_gelu_output():
    """In training, each BertOutput's dense keeps the pre-activation BertIntermediate's backward saves anyway,
    not the GELU output: autograd keeps exactly one [tokens, intermediate] activation per layer less than with
    a plain Linear (forced here by a subclass of nn.Linear, which makes linear_after_gelu step aside; a hook
    would too, but it also keeps the encoder from unpadding)."""
    cfg = bert_config()
    _, fast = pair(transformers.BertForMaskedLM, cfg)
    fast.train()
    ids, mask = batch()
    lean = _saved_bytes(fast, ids, mask)
    for layer in fast.bert.encoder.layer:
        layer.output.dense.__class__ = _LinearSubclass
    plain = _saved_bytes(fast, ids, mask)
    tokens = int(mask.sum())  # the encoder runs on packed tokens
    assert plain - lean == cfg.num_hidden_layers * tokens * cfg.intermediate_size * 4


def test_fused_qkv_casts_and_keeps_the_input_once_under_autocast():
    """Under autocast the query / key / value GEMM casts the layer input once and autograd keeps that one half
    copy (three with three Linears, which an nn.Linear subclass as the query forces here): 2 x tokens x hidden x 2
    bytes less per layer. Loss and gradients match transformers' in both cases."""
    cfg = bert_config()
    ref, fast = pair(transformers.BertForMaskedLM, cfg)
    ref.train(), fast.train()
    ids, mask = batch()
    queries = [layer.attention.self.query for layer in fast.bert.encoder.layer]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        lean = _saved_bytes(fast, ids, mask)
        for query in queries:
            query.__class__ = _LinearSubclass
        plain = _saved_bytes(fast, ids, mask)
    tokens = int(mask.sum())
    assert plain - lean == cfg.num_hidden_layers * 2 * tokens * cfg.hidden_size * 2
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    for wrapped in (True, False):
        if not wrapped:
            for query in queries:
                query.__class__ = nn.Linear
        grads = []
        for m in (ref, fast):
            m.zero_grad()
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_qkv_steps_aside_for_wrapped_projections():
    """A projection that is not a plain Linear (as LoRA or quantisation would install) runs as itself."""

    class Doubled(nn.Linear):  # a Linear subclass with its own forward, as LoRA's layers are
        def forward(self, x):
            return 2 * super().forward(x)

    ref, fast = pair(transformers.BertModel, bert_config())
    for m in (ref, fast):
        for layer in m.encoder.layer:
            layer.attention.self.value.__class__ = Doubled
    ids, mask = batch()
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (fast, ref))
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    assert fastbert.summary(fast).accelerated["query / key / value projections (one GEMM)"] == 2


class _LoraLike(nn.Module):
    """What LoRA installs over a Linear: a module of its own (not an nn.Linear), whose ``weight`` is its base
    layer's alone, adding a low-rank term in its forward."""

    def __init__(self, base: nn.Linear, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.a = nn.Parameter(torch.randn(2, base.in_features, generator=g).to(DEVICE) * 0.1)
        self.b = nn.Parameter(torch.randn(base.out_features, 2, generator=g).to(DEVICE) * 0.1)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + x @ self.a.t() @ self.b.t()


def test_feed_forward_linears_wrapped_after_optimize_run_as_themselves():
    """A LoRA-like wrapper installed over BertIntermediate's and BertOutput's dense after optimize: the fused
    GEMMs step aside (they would read the base weight alone) and outputs and gradients match."""
    ref, fast = pair(transformers.BertModel, bert_config())
    for m in (ref, fast):
        for i, layer in enumerate(m.encoder.layer):
            layer.intermediate.dense = _LoraLike(layer.intermediate.dense, seed=i)
            layer.output.dense = _LoraLike(layer.output.dense, seed=10 + i)
        m.train()
    _train_step_matches(ref, fast, *batch())


@pytest.mark.parametrize(
    "cls",
    ["BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
     "BertForNextSentencePrediction", "BertForMultipleChoice"],
)  # fmt: skip
def test_bert_heads(cls):
    ref, fast = pair(getattr(transformers, cls), bert_config())
    ids, mask = batch()
    if cls == "BertForMultipleChoice":
        ids, mask = ids[None].repeat(2, 1, 1), mask[None].repeat(2, 1, 1)
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask)
        b = ref(input_ids=ids, attention_mask=mask)
    key = "start_logits" if cls == "BertForQuestionAnswering" else "logits"
    # token-level heads: padding positions hold zeros-derived values after unpadding (documented)
    valid = mask.bool() if cls in ("BertForTokenClassification", "BertForQuestionAnswering") else slice(None)
    torch.testing.assert_close(a[key][valid], b[key][valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", ["RobertaModel", "RobertaForMaskedLM", "XLMRobertaModel"])
def test_roberta_family(cls):
    cfg = roberta_config() if "XLM" not in cls else transformers.XLMRobertaConfig(**roberta_config().to_dict())
    ref, fast = pair(getattr(transformers, cls), cfg)
    assert not fastbert.summary(fast).skipped
    ids, mask = batch()
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask)[0] for m in (fast, ref))
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", list(TWINS))
def test_bert_twins_modules_are_berts(model_type):
    """The twins' encoder modules are transformers' BERT (or RoBERTa) modules under another name, which is why
    fastbert.optimize swaps them like BERT's: same source, the prefix and comments aside (a transformers release
    that changes one of them fails here)."""
    _, prefix, original, _ = TWINS[model_type]
    module = importlib.import_module(type(transformers.AutoModel.from_config(twin_config(model_type))).__module__)
    base = importlib.import_module(f"transformers.models.{original.lower()}.modeling_{original.lower()}")

    def code(mod, name, p):
        lines = inspect.getsource(getattr(mod, p + name)).replace(p, "X").splitlines()
        return [line for line in lines if not line.strip().startswith("#")]

    for name in ("SelfAttention", "Attention", "SelfOutput", "Intermediate", "Output", "Layer", "Encoder"):
        assert code(module, name, prefix) == code(base, name, original), f"{prefix}{name} differs from {original}'s"


@pytest.mark.parametrize("model_type", list(TWINS))
def test_bert_twins(model_type):
    """ELECTRA, CamemBERT, ERNIE, Data2VecText: every part accelerated; padded inference and, in training mode
    (dropout 0), a token-classification loss's every gradient match transformers'."""
    prefix = TWINS[model_type][1]
    ref, fast = pair(getattr(transformers, f"{prefix}Model"), twin_config(model_type))
    s = fastbert.summary(fast)
    assert not s.skipped and s.accelerated["self-attention (fused, padding mask / varlen)"] == 2, str(s)
    ids, mask = batch()
    valid = mask.bool()
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (fast, ref))
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)

    ref, fast = pair(getattr(transformers, f"{prefix}ForTokenClassification"), twin_config(model_type, num_labels=3))
    labels = torch.where(valid, ids % 3, torch.full_like(ids, -100))
    for m in (ref, fast):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        assert fast_params[name].grad is not None, name
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_pickle_and_torch_save_round_trip(tmp_path):
    """An optimized model pickles (torch.save of the whole model): it loads optimized, with the same answers, and
    restores to transformers' classes."""
    ref, fast = pair(transformers.BertForMaskedLM, bert_config())
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.bert.encoder).__name__ == "FastbertBertEncoder" and fastbert.summary(loaded) is not None
    ids, mask = batch()
    valid = mask.bool()
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (loaded, ref))
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    fastbert.restore(loaded)
    assert not any(type(m).__name__.startswith("Fastbert") for m in loaded.modules())


def test_batch_without_tokens_and_a_4d_mask():
    """A mask with no token at all (zeros out, as the padding positions of any batch), and a caller's own 4-D
    additive mask (transformers' eager attention applies it: same answers)."""
    ref, fast = pair(transformers.BertModel, bert_config())
    ids, mask = batch()
    with torch.no_grad():
        out = fast(input_ids=ids, attention_mask=torch.zeros_like(mask)).last_hidden_state
        assert out.shape == (*ids.shape, 64) and (out == 0).all()
        additive = (1.0 - mask[:, None, None, :].float()) * -1e9
        a, b = (m(input_ids=ids, attention_mask=additive).last_hidden_state for m in (fast, ref))
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-4, atol=1e-4)


def test_question_answering_runs_padded_and_matches_on_padded_batches():
    """Question answering's loss is a softmax over every position, padding included: its encoder does not unpad,
    so loss and gradients match transformers' on a padded batch."""
    ref, fast = pair(transformers.BertForQuestionAnswering, bert_config())
    assert "encoder unpadding" in fastbert.summary(fast).skipped
    ids, mask = batch()
    starts, ends = torch.tensor([3, 2, 0], device=DEVICE), torch.tensor([5, 6, 0], device=DEVICE)
    for m in (ref, fast):
        m.train()
        out = m(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends)
        out.loss.backward()
        m.loss_value = out.loss.detach()
    torch.testing.assert_close(fast.loss_value, ref.loss_value, rtol=1e-5, atol=1e-5)
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_state_dict_shared_restore_and_idempotent(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(bert_config()).to(DEVICE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert fastbert.optimize(model) is model
    summary = fastbert.summary(model)
    assert fastbert.optimize(model) is model and fastbert.summary(model) is summary  # no-op the second time
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].data_ptr() == ptrs[k] for k in before)
    model.save_pretrained(tmp_path)
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path).to(DEVICE)
    assert all(torch.equal(loaded.state_dict()[k], before[k]) for k in before)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["BertForMaskedLM"]
    fastbert.restore(model)
    assert fastbert.summary(model) is None
    assert not any(type(m).__name__.startswith("Fastbert") for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks and not hasattr(model, "_fastbert_mlm")
    assert model.config._attn_implementation != "fastbert"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_output_attentions_and_hidden_states_fall_back(grad):
    """With a gradient the fused q / k / v GEMM runs too (it hands the eager attention its views)."""
    ref, fast = pair(transformers.BertModel, bert_config())
    ids, mask = batch()
    with torch.set_grad_enabled(grad):
        a = fast(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        b = ref(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(a.attentions) == 2 and a.attentions[0].shape == b.attentions[0].shape
    valid = mask.bool()
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x[valid], y[valid], rtol=1e-4, atol=1e-4)
    for x, y in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    if grad:
        for out in (a, b):
            (out.last_hidden_state[valid].sum() + sum(t.sum() for t in out.attentions)).backward()
        fast_params = dict(fast.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda msg, n=name: f"{n}: {msg}")  # fmt: skip


def _grads_match(fast, ref):
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda msg, n=name: f"{n}: {msg}")  # fmt: skip


def _train_step_matches(ref, fast, ids, mask):
    """One forward + backward of each (a fixed linear loss over the real tokens): outputs and gradients match."""
    valid = mask.bool()
    outs = []
    for m in (ref, fast):
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (out[valid] * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum().backward()
        outs.append(out[valid])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    _grads_match(fast, ref)


def _count(monkeypatch, module, name) -> list:
    """Calls of module.name from here on (each appends its first argument's shape)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k))
    return calls


def test_sequences_packed_by_position_ids_run_as_varlen_and_match(monkeypatch):
    """Several examples packed into each row, told apart by position_ids that restart and no attention mask
    (DataCollatorWithFlattening): transformers attends within each example (a block-diagonal mask), and so does the
    optimized model, running the examples as one variable-length batch (no unpadding, no dense mask); where the
    encoder cannot (hidden states recorded) it runs transformers' own mask. Outputs and gradients match."""
    from fastbert import ops

    ref, fast = pair(transformers.BertModel, bert_config())
    ids, _ = batch(B=2, S=12)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1], list(range(12))], device=DEVICE)
    with torch.no_grad():
        alone = ref(input_ids=ids[:1, 6:10], position_ids=pos[:1, 6:10]).last_hidden_state
        packed = ref(input_ids=ids, position_ids=pos).last_hidden_state
    packs = torch.allclose(packed[:1, 6:10], alone, rtol=1e-5, atol=1e-5)  # this transformers reads the packing
    varlen, unpad = _count(monkeypatch, ops, "attention_varlen"), _count(monkeypatch, ops, "unpad")
    outs = []
    for m in (ref, fast):
        m.train()
        out = m(input_ids=ids, position_ids=pos)
        (out.last_hidden_state * torch.linspace(-1, 1, 64, device=DEVICE)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].last_hidden_state, outs[0].last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1].pooler_output, outs[0].pooler_output, rtol=1e-4, atol=1e-4)
    _grads_match(fast, ref)
    assert not unpad
    assert varlen == ([(24, 2, 32)] * 2 if packs else [])  # both layers on the 24 tokens, all real
    with torch.no_grad():
        a = fast(input_ids=ids, position_ids=pos, output_hidden_states=True)
        b = ref(input_ids=ids, position_ids=pos, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", ["BertModel", "BertForSequenceClassification", "RobertaForSequenceClassification"])
def test_left_padding_runs_padded_so_position_zero_matches(monkeypatch, cls):
    """The pooler and RoBERTa's classifier read position 0 of each row. Where that is padding (left padding),
    transformers' value there is what they read, so the encoder runs the padded batch instead of unpadding, and
    the pooled output, logits and gradients match; a right-padded batch still unpads."""
    from fastbert import ops

    ref, fast = pair(getattr(transformers, cls), config_for(cls))
    ids, mask = batch(lengths=(12, 7, 1))
    left = mask.flip(1)
    unpad = _count(monkeypatch, ops, "unpad")
    key = "pooler_output" if cls == "BertModel" else "logits"
    outs = []
    for m in (ref, fast):
        m.train()
        out = m(input_ids=ids, attention_mask=left)
        out[key].square().sum().backward()
        outs.append(out[key])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    _grads_match(fast, ref)
    assert not unpad
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask)[key],
                                   ref(input_ids=ids, attention_mask=mask)[key], rtol=1e-4, atol=1e-5)  # fmt: skip
    assert len(unpad) == 1


def test_chunked_feed_forward_runs_padded(monkeypatch):
    """config.chunk_size_feed_forward splits the feed-forward along the sequence (dim 1 of [batch, seq, hidden]),
    which packed [tokens, hidden] states do not have: such a model runs the padded batch."""
    from fastbert import ops

    ref, fast = pair(transformers.BertModel, bert_config(chunk_size_feed_forward=4))
    ids, mask = batch(lengths=(12, 7, 1))
    unpad = _count(monkeypatch, ops, "unpad")
    with torch.no_grad():
        a = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    assert not unpad


@pytest.mark.parametrize("where", ["layer", "feed_forward_dense", "backward", "global"])
def test_hooks_inside_the_encoder_see_the_padded_layout(monkeypatch, where):
    """A hook of the caller's on an encoder layer or anything in it sees [batch, seq, hidden] tensors, as without
    fastbert (the encoder then runs padded); once removed, the encoder unpads again. transformers' own
    output-capturing hooks (installed on the layers by an output_hidden_states call) do not count."""
    from fastbert import ops

    ref, fast = pair(transformers.BertModel, bert_config())
    ids, mask = batch(lengths=(12, 7, 1))
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    unpad = _count(monkeypatch, ops, "unpad")
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert len(unpad) == 1
    shapes = []
    hook = lambda module, args, out: shapes.append(tuple((out[0] if isinstance(out, tuple) else out).shape))  # noqa: E731
    if where == "layer":
        handle = fast.encoder.layer[1].register_forward_hook(hook)
    elif where == "feed_forward_dense":
        handle = fast.encoder.layer[0].intermediate.dense.register_forward_hook(hook)
    elif where == "backward":
        handle = fast.encoder.layer[0].register_full_backward_hook(lambda m, gi, go: shapes.append(go[0].shape))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: shapes.append(tuple(o.shape)) if m is fast.encoder.layer[1] else None)  # fmt: skip
    named = {
        "layer": "forward hook (.*) on encoder.layer.1",
        "backward": "backward hook (.*) on encoder.layer.0",
        "feed_forward_dense": "encoder.layer.0.intermediate.dense",
        "global": "global module hook .*",
    }[where]
    try:
        fast.train()
        with pytest.warns(UserWarning, match=f"{named} keeps this encoder's batches padded"):
            out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        out.sum().backward()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fastbert: .* keeps this encoder's batches padded")  # once
            with torch.no_grad():
                fast(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()
    assert len(unpad) == 1  # not again while hooked
    assert shapes and all(shape[:2] == (3, 12) for shape in shapes), shapes
    valid = mask.bool()
    torch.testing.assert_close(out[valid], b[valid], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert len(unpad) == 2


@pytest.mark.parametrize(
    "part",
    ["intermediate.dense", "intermediate.intermediate_act_fn", "output.dense", "output.LayerNorm",
     "attention.output.LayerNorm", "output.dropout"],
)  # fmt: skip
def test_a_hook_on_a_module_a_fused_path_stands_in_for_runs_and_its_change_holds(part):
    """The fused paths call no submodule: they read the Linears' and LayerNorm's parameters. A forward hook
    registered after optimize on one of those submodules (here one that changes the output) makes that path run
    transformers' code, so the hook runs and what it returns is used, in training as in eval."""
    ref, fast = pair(transformers.BertModel, bert_config())
    ids, mask = batch(lengths=(12, 7, 1))
    calls = {"ref": 0, "fast": 0}

    def hook(name):
        def scale(module, args, out):
            calls[name] += 1
            return out * 0.5 + 0.25

        return scale

    for name, m in (("ref", ref), ("fast", fast)):
        for layer in m.encoder.layer:
            layer.get_submodule(part).register_forward_hook(hook(name))
        m.train()
    _train_step_matches(ref, fast, ids, mask)
    assert calls["fast"] == calls["ref"] == 2


def test_unfused_activation_and_head_dim_are_reported():
    _, fast = pair(transformers.BertModel, bert_config(hidden_act="relu"))
    s = fastbert.summary(fast)
    assert "BertIntermediate" in s.skipped and "relu" in s.skipped["BertIntermediate"]
    _, fast = pair(transformers.BertModel, bert_config(hidden_size=48, num_attention_heads=1))
    s = fastbert.summary(fast)
    assert "self-attention" in s.skipped and "head_dim" in s.skipped["self-attention"], str(s)
    assert fast.config._attn_implementation == "eager"
    ids, mask = batch()
    with torch.no_grad():
        assert torch.isfinite(fast(input_ids=ids, attention_mask=mask).last_hidden_state).all()


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="bert"):
        fastbert.optimize(nn.Linear(4, 4))
    gpt = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model types"):
        fastbert.optimize(gpt)


def test_sentence_transformers_style_wrapper():
    class Transformer(nn.Module):  # the shape of sentence_transformers.models.Transformer
        def __init__(self, auto_model):
            super().__init__()
            self.auto_model = auto_model

    torch.manual_seed(0)
    st = nn.Sequential(Transformer(transformers.BertModel(bert_config()).to(DEVICE)))
    assert fastbert.optimize(st) is st
    assert fastbert.summary(st).accelerated
    assert fastbert.summary(st[0].auto_model) is fastbert.summary(st)


def test_torch_compile_of_optimized_model():
    ref, fast = pair(transformers.BertModel, bert_config())
    ids, mask = batch()
    torch._dynamo.reset()
    compiled = torch.compile(fast, backend="aot_eager")
    with torch.no_grad():
        a = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)


def test_torch_compile_of_optimized_model_training():
    """torch.compile of an optimized model in training: the fused q/k/v forward traces, the pre-activation
    hand-over steps aside while compiling, and the gradients match transformers'."""
    ref, fast = pair(transformers.BertModel, bert_config())
    ref.train(), fast.train()
    ids, mask = batch()
    valid = mask.bool()
    torch._dynamo.reset()
    grads = []
    for m in (torch.compile(fast, backend="aot_eager"), ref):
        m(input_ids=ids, attention_mask=mask).last_hidden_state[valid].sum().backward()
    fast_params = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            grads.append(name)
            torch.testing.assert_close(fast_params[name].grad, p.grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda msg, n=name: f"{n}: {msg}")  # fmt: skip
    assert any("attention.self.query" in n for n in grads)


def test_torch_compile_of_optimized_masked_lm_with_labels():
    """Under torch.compile the masked-LM hooks step aside (the loss is transformers', compiled): same loss and
    decoder gradient as transformers'."""
    ref, fast = pair(transformers.BertForMaskedLM, bert_config())
    ids, mask = batch()
    labels, _ = _mlm_args("BertForMaskedLM", ids, mask)
    torch._dynamo.reset()
    losses = []
    for m in (torch.compile(fast, backend="aot_eager"), ref):
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    name = "cls.predictions.transform.dense.weight"
    torch.testing.assert_close(dict(fast.named_parameters())[name].grad, dict(ref.named_parameters())[name].grad,
                               rtol=1e-3, atol=1e-5)  # fmt: skip


def test_a_model_sharing_the_config_keeps_its_results():
    """optimize sets the attention implementation on the config, which transformers shares between models built
    from one config object (documented): the other model then runs fastbert's attention, with its results."""
    cfg = bert_config()
    torch.manual_seed(0)
    a, b = transformers.BertModel(cfg).to(DEVICE).eval(), transformers.BertModel(cfg).to(DEVICE).eval()
    ids, mask = batch()
    with torch.no_grad():
        before = b(input_ids=ids, attention_mask=mask).last_hidden_state
        fastbert.optimize(a)
        assert b.config._attn_implementation == "fastbert" and fastbert.summary(b) is None
        during = b(input_ids=ids, attention_mask=mask).last_hidden_state
        fastbert.restore(a)
        assert b.config._attn_implementation != "fastbert"
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)  # padding positions too: b is not unpadded


@pytest.mark.parametrize("order", ["a first", "b first"])
def test_two_optimized_models_sharing_a_config_restore_in_any_order(order):
    """Both models optimized, one config: restoring one leaves the other's attention fused (same results), and
    the implementation goes back when the last is restored, whichever that is."""
    import gc

    from fastbert import hf

    cfg = bert_config()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    a, b = transformers.BertModel(cfg).to(DEVICE).eval(), transformers.BertModel(cfg).to(DEVICE).eval()
    ids, mask = batch()
    valid = mask.bool()
    with torch.no_grad():
        before = b(input_ids=ids, attention_mask=mask).last_hidden_state
        fastbert.optimize(a), fastbert.optimize(b)
        first, last = (a, b) if order == "a first" else (b, a)
        fastbert.restore(first)
        assert cfg._attn_implementation == "fastbert" and fastbert.summary(last) is not None
        during = b(input_ids=ids, attention_mask=mask).last_hidden_state
        fastbert.restore(last)
    assert cfg._attn_implementation == "eager"
    torch.testing.assert_close(during[valid], before[valid], rtol=1e-4, atol=1e-5)
    # optimized and dropped without restore: fastbert keeps no entry for the dead config
    c = fastbert.optimize(transformers.BertModel(bert_config()).to(DEVICE)).config
    key = id(c)
    assert key in hf._CLAIMED_CONFIGS
    del c
    gc.collect()
    assert key not in hf._CLAIMED_CONFIGS


# ----------------------------------------------------------------------------------------------- public modules
def test_public_modules_share_parameters_and_match():
    torch.manual_seed(0)
    ln, lin = nn.LayerNorm(32, eps=1e-12).to(DEVICE), nn.Linear(32, 64).to(DEVICE)
    fln, flin = modules.FusedAddLayerNorm.from_layer_norm(ln), modules.FusedLinearGELU.from_linear(lin)
    assert fln.weight is ln.weight and flin.weight is lin.weight
    x, r = torch.randn(5, 32, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    torch.testing.assert_close(fln(x, r), ln(x + r), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flin(x), torch.nn.functional.gelu(lin(x)), rtol=1e-5, atol=1e-5)
    assert set(fln.state_dict()) == set(ln.state_dict()) and set(flin.state_dict()) == set(lin.state_dict())
    fresh = modules.FusedFeedForward(32, 64).to(DEVICE)
    y = fresh(x)
    h = nn.functional.gelu(nn.functional.linear(x, fresh.intermediate.weight, fresh.intermediate.bias))
    expect = nn.functional.layer_norm(fresh.output(h) + x, (32,), fresh.norm.weight, fresh.norm.bias, 1e-12)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_add_layer_norm_module_dropout_is_keyword_only():
    # nn.LayerNorm's third positional argument is elementwise_affine: a positional True must not become dropout 1.0
    with pytest.raises(TypeError):
        modules.FusedAddLayerNorm(64, 1e-5, True)
    ln = modules.FusedAddLayerNorm(64, 1e-5, dropout=0.25)
    assert ln.dropout == 0.25 and ln.eps == 1e-5


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: modules.FusedAddLayerNorm(64, dropout=1.0), "dropout must be in"),
        (lambda: modules.FusedAddLayerNorm.from_layer_norm(nn.LayerNorm(64), dropout=-0.1), "dropout must be in"),
        (lambda: modules.FusedLinearGELU(16, 32, approximate="erf"), "approximate must be one of"),
        (lambda: modules.FusedLinearGELU.from_linear(nn.Linear(16, 32), approximate="gelu"), "approximate must be"),
        (lambda: modules.FusedSelfAttention(64, 2, dropout=float("nan")), "dropout must be in"),
        (lambda: modules.FusedSelfAttention(48, 1), r"head_dim 48 \(hidden_size / num_heads\) is unsupported"),
        (lambda: modules.FusedSelfAttention(64, 3), "not a multiple of num_heads"),
        (lambda: modules.FusedFeedForward(32, 64, dropout=1.5), "dropout must be in"),
        (lambda: modules.FusedFeedForward(32, 64, approximate="sigmoid"), "approximate must be one of"),
    ],
    ids=["ln", "ln-from", "gelu", "gelu-from", "attn-nan", "attn-head-dim", "attn-heads", "ffn-dropout", "ffn-gelu"],
)
def test_modules_reject_bad_arguments_at_construction(build, message):
    """A bad dropout, GELU form or head size raises ValueError when the module is built, not at its first forward
    (which, in a training script, may come minutes later)."""
    with pytest.raises(ValueError, match=message):
        build()


def test_fused_self_attention_from_bert_rejects_an_unsupported_head_dim():
    cfg = bert_config()
    cfg.hidden_size, cfg.num_attention_heads = 48, 1
    attn = transformers.BertModel(cfg).encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="head_dim 48"):
        modules.FusedSelfAttention.from_bert(attn)


def test_fused_self_attention_from_bert():
    torch.manual_seed(0)
    cfg = bert_config()
    bert = transformers.BertModel(cfg).to(DEVICE).eval()
    bert.set_attn_implementation("eager")
    attn = bert.encoder.layer[0].attention.self
    fused = modules.FusedSelfAttention.from_bert(attn)
    assert fused.query is attn.query
    x = torch.randn(2, 6, 64, device=DEVICE)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], device=DEVICE)
    add = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        expect, _ = attn(x, attention_mask=add)
        got = fused(x, mask)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_bert_base_half_and_autocast(dtype):
    """A BERT-base-sized model in half precision: optimized vs transformers in the same dtype vs fp32 (the
    project's rule: error at most 2x eager's, plus a small atol), and an autocast training step."""
    cfg = transformers.BertConfig(num_hidden_layers=2)
    torch.manual_seed(0)
    ref32 = transformers.BertModel(cfg).cuda().eval()
    half = copy.deepcopy(ref32).to(dtype)
    fast = fastbert.optimize(copy.deepcopy(half))
    ids, mask = batch(B=4, S=128, lengths=(128, 77, 5, 128), vocab=cfg.vocab_size)
    valid = mask.bool()
    with torch.no_grad():
        ref = ref32(input_ids=ids, attention_mask=mask).last_hidden_state[valid].double()
        eager = half(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state[valid]
    assert_matches_reference(out, ref, eager, name="last_hidden_state")

    model = fastbert.optimize(transformers.BertForPreTraining(cfg).cuda().train())
    with torch.autocast("cuda", dtype=dtype):
        labels = torch.where(valid, ids, torch.full_like(ids, -100))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels,
                     next_sentence_label=torch.zeros(4, dtype=torch.long, device="cuda")).loss  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_padded_inference_in_a_cuda_graph_matches():
    """An optimized model's forward captured in a CUDA graph after an eager warm-up, as fastbert bench's
    fastbert+cudagraph provider does (fastbert.bench._graphed): the warm-up unpads (116 tokens), the graph runs
    the padded batch with its mask (256 rows), so linear_gelu meets a row count it has not tuned, during capture
    (where nothing may be timed, and no kernel compiled: a feature width of this test's own keeps the shapes
    new). The replay matches the eager model on every real token."""
    from fastbert.bench import _graphed

    cfg = bert_config(hidden_size=64, intermediate_size=328, max_position_embeddings=64)
    ref, fast = pair(transformers.BertModel, cfg)
    ref, fast = ref.half(), fast.half()
    ids, mask = batch(B=4, S=64, lengths=(64, 40, 9, 3), vocab=300)
    replay = _graphed(fast, ids, mask)
    out = replay().clone()
    with torch.no_grad():
        expected = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        eager = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = ref.float()(input_ids=ids, attention_mask=mask).last_hidden_state.double()  # (the half weights)
    valid = mask.bool()
    assert_matches_reference(out[valid], exact[valid], eager[valid], name="graph replay")
    assert_matches_reference(expected[valid], exact[valid], eager[valid], name="eager fastbert")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_training_step_in_a_cuda_graph():
    """A whole BertForPreTraining training step of an optimized model (forward with the fused masked-LM loss,
    backward, AdamW) captured in one CUDA graph, as fastbert bench's fastbert+cudagraph provider does
    (fastbert.bench._graphed_train_step). Without dropout a replay computes what the same eager step computes
    (loss and updated parameters); with dropout each replay draws new keep-masks (different losses on the same
    batch and weights: lr 0)."""
    from fastbert.bench import _graphed_train_step

    ids, mask = batch(B=4, S=64, lengths=(64, 40, 9, 64), vocab=300)

    def setup(p, lr):
        torch.manual_seed(0)
        cfg = bert_config(hidden_dropout_prob=p, attention_probs_dropout_prob=p, max_position_embeddings=64)
        model = fastbert.optimize(transformers.BertForPreTraining(cfg).cuda().train())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)

        def body(i, m):
            labels = torch.where(m.bool(), i, torch.full_like(i, -100))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=i, attention_mask=m, labels=labels,
                             next_sentence_label=torch.zeros(4, dtype=torch.long, device="cuda")).loss  # fmt: skip
            loss.backward()
            opt.step()
            return loss

        return model, opt, body

    # no dropout, lr 0: a replay's loss and gradients are the eager step's (up to the bf16 GEMMs' rounding: the
    # eager backward runs the masked-LM GEMMs over the labelled rows only, the graph over all of them)
    model, opt, body = setup(0.0, 0.0)
    replay, first = _graphed_train_step(body, opt, (ids, mask))
    graphed_loss = replay(ids, mask).item()
    graphed_grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    eager_loss = body(ids, mask).item()
    for loss in (first, graphed_loss):
        assert abs(loss - eager_loss) <= 1e-3 * abs(eager_loss), (loss, eager_loss)
    for g, p in zip(graphed_grads, model.parameters(), strict=True):
        e = p.grad.detach()
        assert torch.isfinite(g).all() and abs(g.norm() - e.norm()) <= 0.01 * e.norm() + 1e-6
        if e.norm() > 0:
            assert torch.nn.functional.cosine_similarity(g.flatten().double(), e.flatten().double(), dim=0) > 0.999
    # the optimizer step is in the graph: every replay moves the parameters
    model, opt, body = setup(0.0, 1e-3)
    replay, _ = _graphed_train_step(body, opt, (ids, mask))
    before = [p.detach().clone() for p in model.parameters()]
    replay(ids, mask)
    torch.cuda.synchronize()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True) if p.grad.norm() > 0)
    # dropout: fresh masks on every replay (same batch, same weights)
    model, opt, body = setup(0.1, 0.0)
    replay, _ = _graphed_train_step(body, opt, (ids, mask))
    losses = [replay(ids, mask).item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3, losses
