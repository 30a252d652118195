"""The optimizer and learning-rate schedule shared by every training loop in llmopt (the builtin model's
build in models/builtin.py, distillation in distill/trainer.py): AdamW without decay on 1-D parameters,
and a linear warm-up followed by a cosine decay to a floor."""

from __future__ import annotations

import math

import torch

LR_FLOOR = 0.1  # the cosine ends at 10% of the peak: late steps of a short run still learn


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `steps`: linear warm-up to 1
    over `warmup` steps, then cosine decay to LR_FLOOR at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on norms and biases (1-D parameters), as is usual for
    transformers."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule of lr_factor, stepped once per optimizer step by the caller."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, steps, warmup))
