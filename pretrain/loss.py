"""The training loss: next-token cross-entropy over packed blocks, optionally a chunk of tokens at a time.

    loss = causal_lm_loss(model, input_ids)             # mean over every predicted token
    sums = causal_lm_token_losses(model, input_ids)     # summed per sequence, float32 (evaluation)
    install_fast_loss(model, chunk_tokens=4096, compile_loss=True)   # before accelerator.prepare

The chunked head never holds a whole batch's logits; installed, it runs inside the model's own forward, so DDP and
FSDP hooks see the whole computation.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never holding more than one chunk's logits.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are at hand: the
    backward pass only scales them. That costs no extra matmul, unlike recomputing the logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, compute_dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight_cast = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens].to(compute_dtype)
            chunk_targets = targets[start:start + chunk_tokens, None]
            logits = (chunk @ weight_cast.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            total = total + (log_norm - logits.gather(1, chunk_targets)).sum()
            # d(loss)/d(logits) = softmax - one_hot(target), built in place over the float logits.
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits.scatter_add_(1, chunk_targets, torch.full_like(log_norm, -1.0))
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight_cast
            grad_weight += (grad_logits.t() @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype), \
            None, None, None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmul in, so the chunked head matches the model's own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _plain_linear_weight(head) -> torch.Tensor | None:
    """The head's full weight when it is a bias-free nn.Linear; None when it is wrapped or sharded on its own."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.shape != (head.out_features,
                                                                                   head.in_features):
        return None
    return weight


def _module_chunk_losses(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def head_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None,
                       per_token: bool) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `targets` ([tokens, d] and [tokens]), as a float32 sum or per token.

    chunk_tokens None: the head over every token at once (full logits). A head that is not a plain nn.Linear
    (e.g. sharded by its own FSDP unit) is called as a module per chunk, recomputed in backward."""
    if not chunk_tokens:
        losses = _module_chunk_losses(head, hidden, targets)
        return losses if per_token else losses.sum()
    weight = _plain_linear_weight(head)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    if weight is not None and needs_grad and not per_token:
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, _compute_dtype(hidden))
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if needs_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(_module_chunk_losses, head, chunk, chunk_targets,
                                                            use_reentrant=False))
        else:
            pieces.append(_module_chunk_losses(head, chunk, chunk_targets))
    losses = torch.cat(pieces)
    return losses if per_token else losses.sum()


@dataclass
class FastLoss:
    chunk_tokens: int | None
    compiled: object = None  # torch.compile of `causal_lm_losses`, used while gradients are recorded


def causal_lm_losses(model, input_ids: torch.Tensor, reduction: str, chunk_tokens: int | None) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: "mean" over every predicted token, or "per_sequence" sums [batch]."""
    hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    losses = head_cross_entropy(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                                targets.reshape(-1), chunk_tokens, per_token=reduction == "per_sequence")
    if reduction == "per_sequence":
        return losses.view(targets.shape).sum(dim=1)
    return losses / targets.numel()


def install_fast_loss(model, chunk_tokens: int | None, compile_loss: bool) -> None:
    """Let `model(input_ids=..., token_loss="mean"|"per_sequence")` return the loss computed by this module.

    Only this instance's forward changes (as accelerate's autocast does it): the weights, their names and the class
    stay, so checkpoints load as before, and every other call, generation included, reaches the model's own
    forward, whose signature is kept for the callers that inspect it."""
    own_forward = type(model).forward
    compiled = torch.compile(causal_lm_losses, dynamic=False) if compile_loss else None

    @functools.wraps(own_forward)
    def forward(self, *args, token_loss: str | None = None, **kwargs):
        if token_loss is None:
            return own_forward(self, *args, **kwargs)
        run = compiled if compiled is not None and torch.is_grad_enabled() else causal_lm_losses
        return run(self, kwargs["input_ids"], token_loss, chunk_tokens)

    model._fast_loss = FastLoss(chunk_tokens, compiled)
    model.forward = types.MethodType(forward, model)


def fast_loss_of(model) -> FastLoss | None:
    """The installed settings, looked up through DDP/FSDP wrappers (their `.module`)."""
    for _ in range(4):
        if model is None:
            return None
        settings = vars(model).get("_fast_loss")
        if settings is not None:
            return settings
        model = getattr(model, "module", None)
    return None


def fast_loss(model, input_ids: torch.Tensor, reduction: str) -> torch.Tensor:
    """Call the top-level (possibly wrapped) model, so its distributed hooks see the whole computation."""
    return model(input_ids=input_ids, token_loss=reduction)


def causal_lm_loss(model, input_ids):
    """Mean next-token cross-entropy over every position of the packed blocks."""
    if fast_loss_of(model) is not None:  # chunked and/or compiled, inside the model's own forward
        return fast_loss(model, input_ids, "mean")
    per_sequence = causal_lm_token_losses(model, input_ids)
    return per_sequence.sum() / per_sequence.new_tensor(per_sequence.numel() * (input_ids.shape[1] - 1))


def causal_lm_token_losses(model, input_ids):
    """Summed next-token cross-entropy of each sequence (shape [batch]), computed in float32."""
    if fast_loss_of(model) is not None:
        return fast_loss(model, input_ids, "per_sequence")
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).sum(dim=1)
