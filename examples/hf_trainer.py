"""Hugging Face ``Trainer`` + gradcent on a tiny BERT built from a config (no downloads).

    python examples/hf_trainer.py [--way tuple|factory] [--steps 150]

Two ways to hand the Trainer a gradcent optimizer, both keeping its scheduler,
clipping (before GC) and mixed precision:

* ``--way tuple``: ``Trainer(optimizers=(opt, None))`` with ``opt`` built by
  :func:`gradcent.integrations.huggingface.build_optimizer` (the Trainer's
  decay / no-decay groups, planned on the model);
* ``--way factory``: ``Trainer(optimizer_cls_and_kwargs=...)`` with the factory
  from :func:`gradcent.integrations.huggingface.optimizer_cls_and_kwargs`.

The task is synthetic: label 1 when token 7 appears in the sequence.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import gradcent
from gradcent.integrations.huggingface import build_optimizer, optimizer_cls_and_kwargs


class TokenSeven(torch.utils.data.Dataset):
    """Random token ids; the label says whether token 7 occurs."""

    def __init__(self, n: int = 512, length: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(0, length, (n,), generator=g)
        self.ids[self.labels == 1, pos[self.labels == 1]] = 7

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert() -> transformers.BertForSequenceClassification:
    """Two layers, hidden size 32, vocabulary 100: trains in seconds on a CPU."""
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def main() -> None:
    """Train with the chosen way, then print the optimizer and held-out accuracy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--way", choices=["tuple", "factory"], default="factory")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    transformers.set_seed(0)
    model = tiny_bert()
    opt_kwargs = {"lr": 3e-3, "weight_decay": 0.01}
    extra = {}
    if args.way == "tuple":
        extra["optimizers"] = (build_optimizer(model, gradcent.AdamW, **opt_kwargs), None)
    else:
        extra["optimizer_cls_and_kwargs"] = optimizer_cls_and_kwargs(gradcent.AdamW, **opt_kwargs)
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            report_to=[],
            save_strategy="no",
            logging_steps=20,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=TokenSeven(), **extra)
        trainer.train()
    test = TokenSeven(n=256, seed=1)
    with torch.no_grad():
        logits = model(input_ids=test.ids, attention_mask=torch.ones_like(test.ids)).logits
    acc = (logits.argmax(1) == test.labels).float().mean().item()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    print(f"optimizer: {type(opt).__module__}.{type(opt).__name__}  held-out accuracy: {acc:.3f}")


if __name__ == "__main__":
    main()
