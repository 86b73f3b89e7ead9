"""QLoRA (Dettmers et al. 2023): a frozen 4-bit NF4 base with a trainable LoRA adapter,
and one round's local work on it: start from the round's base adapter, take K AdamW
steps on local blocks, return the delta.

The inner optimizer is fresh every round, as in DiLoCo's inner loop: only the adapter
crosses the round boundary, so every trainer starts a round from the same state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from training.adapter import adapter_vector, load_adapter_vector
from training.delta import LocalUpdate, check_hyperparameters, check_loss, compute_delta
from training.errors import TrainingUsageError
from training.model import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRASettings:
    """LoRA hyper-parameters; the defaults are the usual ones for Llama attention."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0  # LoRA A is drawn at random: the seed makes round 0 identical everywhere

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise TrainingUsageError(f"bad LoRA settings r={self.r} alpha={self.alpha} "
                                     f"dropout={self.dropout}", reason="bad_hyperparameter")
        if not self.target_modules:
            raise TrainingUsageError("LoRA needs at least one target module",
                                     reason="bad_hyperparameter")


def attach_lora(base: BaseModel, settings: LoRASettings = LoRASettings()) -> torch.nn.Module:
    """Wrap the base model in a peft LoRA model; only the adapter requires grad."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in base.model.named_modules()}
    unknown = [m for m in settings.target_modules if m not in names]
    if unknown:
        raise TrainingUsageError(f"target modules {unknown} not in this model; its modules "
                                 f"include {sorted(n for n in names if 'proj' in n)[:8]}",
                                 reason="bad_target_modules")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return get_peft_model(base.model, config)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.requires_grad)


def local_train(model: torch.nn.Module, base_adapter: np.ndarray, blocks: torch.Tensor, *,
                steps: int, lr: float, batch_size: int, seed: int,
                max_grad_norm: float = 1.0) -> LocalUpdate:
    """K steps from `base_adapter` on `blocks` ([n, block_len] token ids); the model is
    left holding the trained adapter."""
    check_hyperparameters(steps=steps, lr=lr, batch_size=batch_size)
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise TrainingUsageError(f"blocks must be a non-empty [n, block_len] tensor, got "
                                 f"{tuple(blocks.shape)}", reason="not_enough_data")
    load_adapter_vector(model, base_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sampler = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    # fork_rng: LoRA dropout draws from the global RNG; seed it without leaking
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for step in range(steps):
            rows = torch.randint(blocks.shape[0], (batch_size,), generator=sampler)
            batch = blocks[rows].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(check_loss(loss.item(), step))
    model.eval()
    seconds = time.perf_counter() - started
    delta = compute_delta(base_adapter, adapter_vector(model))
    log.info("local round: %d steps in %.2fs, loss %.4f -> %.4f", steps, seconds,
             losses[0], losses[-1])
    return LocalUpdate(delta, float(np.mean(losses)), losses[0], losses[-1], steps, seconds)
