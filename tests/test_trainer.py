"""The HuggingFace Trainer trains an optimized model: a few steps of BertForSequenceClassification through
transformers.Trainer (on the GPU where there is one, else on CPU with Triton's interpreter running the kernels;
dropout off to keep the interpreter fast), the loss goes down, the weights change, and the saved checkpoint loads
back into a plain transformers model."""

import copy

import pytest
import torch

import fastbert
from conftest import HAS_CUDA

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


class Synthetic(torch.utils.data.Dataset):
    """Label 1 when token 5 occurs; padded to 12 tokens, lengths 1..12."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.rows = []
        for i in range(n):
            length = 1 + i % 12
            ids = torch.randint(6, 50, (12,), generator=g)
            label = i % 2
            if label and length > 1:
                ids[length - 1] = 5
            mask = (torch.arange(12) < length).long()
            self.rows.append(
                {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(label * (length > 1))}
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_trains_an_optimized_model(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = fastbert.optimize(transformers.BertForSequenceClassification(cfg))
    before = copy.deepcopy(model.state_dict())
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                                          num_train_epochs=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                                          report_to=[], use_cpu=not HAS_CUDA, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Synthetic())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert fastbert.summary(model).accelerated  # still optimized after training
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    trainer.save_model(str(tmp_path / "saved"))
    plain = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].cpu(), rtol=0, atol=0)


def test_trainer_masked_lm_loss_matches_transformers(tmp_path):
    """Trainer on BertForMaskedLM: it finds the label column through the model's own forward signature (the
    drop-in keeps transformers' class and forward: the fused masked-LM loss comes in through hooks), and the
    logged losses of two steps match an unoptimized model's."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)  # fmt: skip
    data = Synthetic(16)
    for row in data.rows:  # masked-LM labels: every other real token, -100 elsewhere
        row["labels"] = torch.where((row["attention_mask"] > 0) & (torch.arange(12) % 2 == 0), row["input_ids"], -100)
    losses = []
    for optimized in (False, True):
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(cfg)
        model = fastbert.optimize(model) if optimized else model
        args = transformers.TrainingArguments(output_dir=str(tmp_path / f"run{optimized}"),
                                              per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
                                              logging_steps=1, save_strategy="no", report_to=[],
                                              use_cpu=not HAS_CUDA, disable_tqdm=True, seed=0)  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[1]) == 2
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-4)
