"""The optimizer and its schedule: AdamW with weight decay on the matrices (the fused kernel where this torch has
it), or Muon for the decoder layers' matrices with AdamW for the rest; the learning-rate schedule counted in
optimizer steps, and the rate each step runs with.

    optimizer = build_optimizer(model, spec, device)     # one torch Optimizer either way
    scheduler = build_scheduler(optimizer, spec, max_steps)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.errors import InputError

if TYPE_CHECKING:
    from pretrain.spec.fields import Spec


def build_optimizer(model, spec: Spec, device=None):
    """AdamW with weight decay on the matrices (embeddings included), none on norm weights or biases; the fused
    kernel when `fused_optimizer` is on and this torch has it for `device` (None: the CPU). With `optimizer: muon`,
    the matrices of the decoder layers go to torch.optim.Muon instead, with the same rate and weight decay."""
    t = spec.training
    trained = [p for p in model.parameters() if p.requires_grad]
    muon = muon_parameters(model) if t.optimizer == "muon" else []
    if muon and not hasattr(torch.optim, "Muon"):
        raise InputError(f"training_args.optimizer 'muon' needs torch.optim.Muon (torch 2.9 or newer) and this torch "
                         f"is {torch.__version__}; upgrade torch or set training_args.optimizer=adamw")
    decay = [p for p in trained if p.ndim >= 2 and not any(p is m for m in muon)]
    no_decay = [p for p in trained if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    rest = adamw(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                 fused=t.fused_optimizer, device=device or torch.device("cpu"))
    if not muon:
        return rest
    # match_rms_adamw scales each matrix's orthogonalized update to the size of an AdamW update, so that AdamW's
    # learning rate and weight decay carry over (Moonshot's "Muon is Scalable for LLM Training").
    return MuonWithAdamW(torch.optim.Muon(muon, lr=t.learning_rate, weight_decay=t.weight_decay,
                                          adjust_lr_fn="match_rms_adamw"), rest)


def muon_parameters(model) -> list:
    """The 2-D weights of the hidden layers: every trained matrix but the input embeddings and the output head,
    which Muon's authors leave to AdamW."""
    outside = {id(p) for module in (model.get_input_embeddings(), model.get_output_embeddings()) if module is not None
               for p in module.parameters()}
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in outside]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for the rest, as one torch Optimizer: its param_groups are Muon's
    followed by AdamW's (the same dicts, so one schedule sets the rate of both) and its state is one table both
    write into, so accelerate prepares, clips, scales and checkpoints it as any single optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.inner = (muon, adamw)
        self.muon_groups = len(muon.param_groups)
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._share()

    def _share(self):
        """Point the inner optimizers at this one's groups and state, which load_state_dict replaces."""
        muon, adamw = self.inner
        muon.param_groups, adamw.param_groups = (self.param_groups[:self.muon_groups],
                                                 self.param_groups[self.muon_groups:])
        muon.state = adamw.state = self.state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.inner:
            optimizer.step()
        return loss


def build_scheduler(optimizer, spec: Spec, max_steps: int):
    from transformers import get_scheduler

    from pretrain.spec.loading import decay_steps_of, min_lr_ratio_of

    t = spec.training
    extra = None
    if t.lr_scheduler_type == "cosine_with_min_lr":
        extra = {"min_lr_rate": min_lr_ratio_of(t)}
    elif t.lr_scheduler_type == "warmup_stable_decay":
        extra = {"num_decay_steps": decay_steps_of(t, max_steps), "decay_type": t.decay_shape,
                 "min_lr_ratio": min_lr_ratio_of(t)}
    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max(max_steps, 1), scheduler_specific_kwargs=extra)


def schedule_line(spec: Spec, max_steps: int) -> str:
    """The schedule's phases in a run of `max_steps` optimizer steps, for the dry run."""
    from pretrain.spec.loading import decay_steps_of, min_lr_ratio_of

    t = spec.training
    warmup = f"warm-up over steps 1-{t.warmup_steps}" if t.warmup_steps else "no warm-up"
    if t.lr_scheduler_type != "warmup_stable_decay":
        return f"schedule: {t.lr_scheduler_type}, {warmup} to learning_rate {t.learning_rate:g}, {max_steps} steps"
    decay = decay_steps_of(t, max_steps)
    final = t.learning_rate * min_lr_ratio_of(t)
    return (f"schedule: warmup_stable_decay, {warmup}, stable at {t.learning_rate:g} until step "
            f"{max_steps - decay}, then {t.decay_shape} decay over the last {decay} steps "
            f"({max_steps - decay + 1}-{max_steps}) to {final:g} (min_lr_ratio {min_lr_ratio_of(t):g})")


def align_schedule(scheduler) -> list[tuple[float, float]]:
    """Set the optimizer's rates to what this run's schedule gives at the step a checkpoint was loaded at; return
    (loaded, now) for each group that changed.

    A checkpoint restores the scheduler's step and the optimizer's rates of the run that saved it, but the schedule
    is this run's: without this, the first step after a resume with another length or decay would run with the old
    schedule's rate."""
    changed = []
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        rate = base * factor(scheduler.last_epoch)
        if rate != group["lr"]:
            changed.append((group["lr"], rate))
            group["lr"] = rate
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return changed


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

