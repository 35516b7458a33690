"""Fine-tuning BertForSequenceClassification with dropout on: an optimized model learns a small synthetic task as
well as the eager model does, from the same initial weights and the same batches.

The task needs attention that depends on queries and keys: the label says which of two marker tokens comes
first (padded batches of mixed lengths, a length-1 sequence among them). An untrained model sits at chance
(~50%); a model whose backward were wrong would not learn it. Dropout masks differ between the two runs
(fastbert draws its own), so the trajectories differ and the comparison is of held-out accuracy, with a margin
for that noise.

On GPU: the real kernels, BERT-base width (hidden 768, 12 heads of 64) with 4 layers under bf16 autocast.
On CPU: a tiny config with the ops' eager fallback (TRITON_INTERPRET=0 for this test): Triton's interpreter
needs ~10 s a step here (Philox dropout and per-program overhead), too slow for 300 steps in CI, so on CPU this
checks fastbert's model plumbing (unpad-once encoder, varlen attention, fused blocks, dropout, autograd) rather
than the kernels, whose dropout and gradients the op tests check in the interpreter."""

import copy

import pytest
import torch

import fastbert
from conftest import DEVICE, HAS_CUDA

transformers = pytest.importorskip("transformers")

VOCAB, FIRST, SECOND, SEQ = 64, 5, 6, 16
STEPS, BATCH = 300, 16


def make_batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[CLS] + random tokens with two markers at distinct random places; label 1 when FIRST comes before SECOND.
    Order is invisible to attention that does not depend on queries and keys (a uniform average of token +
    position embeddings is the same either way), so a wrong dq / dk cannot learn it. Row 0 is a length-1
    sequence ([CLS] alone, label 0)."""
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    lengths[0] = 1
    ids = torch.randint(SECOND + 1, VOCAB, (n, SEQ), generator=g)
    ids[:, 0] = 2  # [CLS]
    # two distinct positions in 1 .. length-1
    a = (torch.rand(n, generator=g) * (lengths - 1)).long() + 1
    b = (torch.rand(n, generator=g) * (lengths - 2).clamp(min=1)).long() + 1
    b = torch.where(b >= a, b + 1, b)
    rows = torch.arange(1, n)
    ids[rows, a[1:]] = FIRST
    ids[rows, b[1:]] = SECOND
    labels = (a < b) & (lengths > 1)
    mask = torch.arange(SEQ)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    return ids.to(DEVICE), mask.long().to(DEVICE), labels.long().to(DEVICE)


def config():
    common = dict(vocab_size=VOCAB, max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, pad_token_id=0)  # fmt: skip
    if HAS_CUDA:
        return transformers.BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                       intermediate_size=3072, **common)  # fmt: skip
    return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, **common)  # fmt: skip


def fine_tune(model, seed: int) -> float:
    """STEPS of AdamW on fresh batches (the same ones for every model: seeded), then held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if not HAS_CUDA else 1e-4)
    model.train()
    for _ in range(STEPS):
        ids, mask, labels = make_batch(g, BATCH)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=HAS_CUDA):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return accuracy(model)


def accuracy(model) -> float:
    """On 512 held-out rows (a generator seed the training batches never use)."""
    model.eval()
    ids, mask, labels = make_batch(torch.Generator().manual_seed(10_000), 512)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=HAS_CUDA):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return (logits.argmax(-1) == labels).float().mean().item()


def test_fine_tuning_reaches_eager_accuracy(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    eager = transformers.BertForSequenceClassification(config()).to(DEVICE)
    eager.set_attn_implementation("eager")
    fast = fastbert.optimize(copy.deepcopy(eager))
    assert fastbert.summary(fast).accelerated
    acc_init = accuracy(fast)
    acc_eager = fine_tune(eager, seed=1)
    acc_fast = fine_tune(fast, seed=1)
    # Not learnable without training, learnt by eager, and as well by fastbert up to dropout noise.
    assert acc_init <= 0.7, f"the untrained model already scores {acc_init:.3f}: the task is too easy"
    assert acc_eager >= 0.9, f"eager itself did not learn the task ({acc_eager:.3f}): the test is not informative"
    assert acc_fast >= acc_eager - 0.05, f"fastbert {acc_fast:.3f} vs eager {acc_eager:.3f}"
