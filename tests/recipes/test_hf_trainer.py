"""Hugging Face Trainer with RMDA, both ways it takes a custom optimizer."""
from __future__ import annotations

import pytest
import torch

import rmda_fused

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (extra 'recipes')")
transformers = pytest.importorskip("transformers", reason="the recipe is for transformers' Trainer (extra 'recipes')")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

STEPS = 3


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def tiny_dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [dict(input_ids=torch.randint(64, (8,), generator=gen), labels=torch.tensor(i % 2))
            for i in range(4 * STEPS)]


def training_args(tmp_path) -> TrainingArguments:
    # weight_decay stays at its default, 0: RMDA refuses any other (lam replaces it)
    return TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)


def test_trainer_with_an_rmda_instance(tmp_path, watch):
    model = tiny_bert()
    watched = watch(model)
    optimizer = rmda_fused.RMDA(rmda_fused.param_groups(model, lam=0.1), lr=0.1, momentum=0.1)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(),
                      optimizers=(optimizer, None))
    trainer.train()
    watched.assert_rmda_trained(optimizer, STEPS)


def test_trainer_with_rmda_class_and_kwargs(tmp_path, watch):
    model = tiny_bert()
    watched = watch(model)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=tiny_dataset(),
                      optimizer_cls_and_kwargs=(rmda_fused.RMDA, dict(lr=0.1, momentum=0.1, lam=0.1)))
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around the RMDA the Trainer made
    watched.assert_rmda_trained(optimizer, STEPS)
    # the Trainer builds its own groups (decay / no decay by name), each with weight_decay=0
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
