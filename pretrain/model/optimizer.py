"""The optimizer and its schedule: AdamW with weight decay on the matrices (the fused kernel where this torch has
it), the learning-rate schedule counted in optimizer steps, and the rate each step runs with.

    optimizer = build_optimizer(model, spec, device)
    scheduler = build_scheduler(optimizer, spec, max_steps)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pretrain.spec.fields import Spec


def build_optimizer(model, spec: Spec, device=None):
    """AdamW with weight decay on the matrices (embeddings included), none on norm weights or biases; the fused
    kernel when `fused_optimizer` is on and this torch has it for `device` (None: the CPU)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    t = spec.training
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                            fused=t.fused_optimizer, device=device or torch.device("cpu"))


def build_scheduler(optimizer, spec: Spec, max_steps: int):
    from transformers import get_scheduler

    t = spec.training
    extra = {"min_lr_rate": 0.1} if t.lr_scheduler_type == "cosine_with_min_lr" else None
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max(max_steps, 1), scheduler_specific_kwargs=extra)


def fused_adamw_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: only CUDA had the fused kernel
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def adamw(groups, *, lr: float, betas: tuple, eps: float, fused: bool, device: torch.device):
    """AdamW with the fused kernel where this torch has it for `device`; torch's own default otherwise."""
    if fused and fused_adamw_supported(device):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
def warmup_note(spec: Spec, max_steps: int) -> str | None:
    """The warning for a warm-up longer than a run of `max_steps` optimizer steps, with the highest rate any step
    runs with, read from the schedule the run builds; None when the warm-up fits."""
    t = spec.training
    if t.warmup_steps <= max_steps:
        return None
    highest = max(step_learning_rates(spec, max_steps))
    return (f"warning: training_args.warmup_steps ({t.warmup_steps}) is above the run's {max_steps} optimizer "
            f"steps: the learning rate rises to at most {highest:.3g} by the last step, never to learning_rate "
            f"({t.learning_rate:g}); lower warmup_steps to reach it")


def step_learning_rates(spec: Spec, max_steps: int) -> list[float]:
    """The learning rate each optimizer step 1..max_steps of a run of `spec` runs with."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.training.learning_rate)
    scheduler = build_scheduler(optimizer, spec, max_steps)
    # transformers' schedules are LambdaLR: the factor of the scheduler's step s is the rate of optimizer step s+1.
    factor = scheduler.lr_lambdas[0]
    return [spec.training.learning_rate * factor(step) for step in range(max_steps)]

