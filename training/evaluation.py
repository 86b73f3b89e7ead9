"""Held-out evaluation of a causal LM with its adapter: token-weighted loss, perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.errors import TrainingUsageError


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, heldout: torch.Tensor, *, batch_size: int = 32) -> EvalResult:
    """Loss over every predicted token of `heldout` ([n, block_len] ids), in eval mode."""
    if heldout.ndim != 2 or heldout.shape[0] == 0 or heldout.shape[1] < 2:
        raise TrainingUsageError(f"heldout must be a non-empty [n, block_len>=2] tensor, got "
                                 f"{tuple(heldout.shape)}", reason="not_enough_data")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, heldout.shape[0], batch_size):
        batch = heldout[start:start + batch_size].to(device)
        predicted = batch.numel() - batch.shape[0]  # the first token of a block has no target
        total += model(input_ids=batch, labels=batch).loss.item() * predicted
        tokens += predicted
    model.train(was_training)
    loss = total / tokens
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens)
