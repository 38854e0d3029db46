"""The training loss: next-token cross-entropy over packed blocks, optionally a chunk of tokens at a time.

    loss = causal_lm_loss(model, input_ids)             # mean over every predicted token
    sums = causal_lm_token_losses(model, input_ids)     # summed per sequence, float32 (evaluation)
    install_fast_loss(model, chunk_tokens=4096, compile_loss=True)   # before accelerator.prepare
    loss = causal_lm_loss(model, input_ids, layout)     # documents apart (pretrain/model/document_attention.py)

The chunked head never holds a whole batch's logits; installed, it runs inside the model's own forward, so DDP and
FSDP hooks see the whole computation. With a document layout, each document attends only to itself and the targets
that start a document are left out: the mean is over the targets that count.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.model.document_attention import DocumentLayout, flat_for_varlen


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, never holding more than one chunk's logits.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are at hand: the
    backward pass only scales them. That costs no extra matmul, unlike recomputing the logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, chunk_tokens: int, compute_dtype):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight_cast = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_tokens):
            chunk = hidden[start:start + chunk_tokens].to(compute_dtype)
            chunk_targets = targets[start:start + chunk_tokens, None]
            logits = (chunk @ weight_cast.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            token_losses = log_norm - logits.gather(1, chunk_targets)
            # d(loss)/d(logits) = softmax - one_hot(target), built in place over the float logits.
            grad_logits = logits.sub_(log_norm).exp_()
            grad_logits.scatter_add_(1, chunk_targets, torch.full_like(log_norm, -1.0))
            if target_weights is not None:
                chunk_weights = target_weights[start:start + chunk_tokens, None]
                token_losses = token_losses * chunk_weights
                grad_logits.mul_(chunk_weights)
            total = total + token_losses.sum()
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight_cast
            grad_weight += (grad_logits.t() @ chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight * grad_total.to(grad_weight.dtype), \
            None, None, None, None


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
                       per_token: bool, target_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `targets` ([tokens, d] and [tokens]), as a float32 sum or per token,
    each token's loss multiplied by `target_weights` [tokens] when given.

    chunk_tokens None: the head over every token at once (full logits). A head that is not a plain nn.Linear
    (e.g. sharded by its own FSDP unit) is called as a module per chunk, recomputed in backward."""
    if not chunk_tokens:
        losses = _weighted(_module_chunk_losses(head, hidden, targets), target_weights)
        return losses if per_token else losses.sum()
    weight = _plain_linear_weight(head)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    if weight is not None and needs_grad and not per_token:
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, target_weights, chunk_tokens,
                                                _compute_dtype(hidden))
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if needs_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(_module_chunk_losses, head, chunk, chunk_targets,
                                                            use_reentrant=False))
        else:
            pieces.append(_module_chunk_losses(head, chunk, chunk_targets))
    losses = _weighted(torch.cat(pieces), target_weights)
    return losses if per_token else losses.sum()


def _weighted(losses: torch.Tensor, target_weights: torch.Tensor | None) -> torch.Tensor:
    return losses if target_weights is None else losses * target_weights


@dataclass
class FastLoss:
    chunk_tokens: int | None
    compiled: object = None  # torch.compile of `causal_lm_losses`, used while gradients are recorded


def causal_lm_losses(model, input_ids: torch.Tensor, reduction: str, chunk_tokens: int | None,
                     position_ids: torch.Tensor | None = None, target_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: "mean" over every predicted token, "sum" of the ones that count, or
    "per_sequence" sums [batch]. `position_ids` and `target_mask` come from a DocumentLayout
    (pretrain/model/document_attention.py)."""
    base = getattr(model, model.base_model_prefix)
    hidden = _unflat(base(**_model_inputs(model, input_ids, position_ids)).last_hidden_state, input_ids)[:, :-1]
    targets = input_ids[:, 1:]
    weights = None if target_mask is None else target_mask.reshape(-1).to(torch.float32)
    losses = head_cross_entropy(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                                targets.reshape(-1), chunk_tokens, per_token=reduction == "per_sequence",
                                target_weights=weights)
    if reduction == "per_sequence":
        return losses.view(targets.shape).sum(dim=1)
    return losses if reduction == "sum" else losses / targets.numel()


def _model_inputs(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> dict:
    """The model's inputs; with documents, their position ids, as one row for flash-attention's varlen kernel."""
    if position_ids is None:
        return {"input_ids": input_ids}
    if uses_varlen_kernel(model):
        input_ids, position_ids = flat_for_varlen(input_ids, position_ids)
    # transformers finds the documents in the position ids only when no key/value cache is being filled.
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


def uses_varlen_kernel(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "flash_attention_2"


def _unflat(output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return output.view(*input_ids.shape, output.shape[-1])


def install_fast_loss(model, chunk_tokens: int | None, compile_loss: bool) -> None:
    """Let `model(input_ids=..., token_loss="mean"|"per_sequence")` return the loss computed by this module.

    Only this instance's forward changes (as accelerate's autocast does it): the weights, their names and the class
    stay, so checkpoints load as before, and every other call, generation included, reaches the model's own
    forward, whose signature is kept for the callers that inspect it."""
    own_forward = type(model).forward
    compiled = torch.compile(causal_lm_losses, dynamic=False) if compile_loss else None

    @functools.wraps(own_forward)
    def forward(self, *args, token_loss: str | None = None, target_mask: torch.Tensor | None = None, **kwargs):
        if token_loss is None:
            return own_forward(self, *args, **kwargs)
        run = compiled if compiled is not None and torch.is_grad_enabled() else causal_lm_losses
        return run(self, kwargs["input_ids"], token_loss, chunk_tokens, kwargs.get("position_ids"), target_mask)

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


def fast_loss(model, input_ids: torch.Tensor, reduction: str, layout: DocumentLayout | None = None) -> torch.Tensor:
    """Call the top-level (possibly wrapped) model, so its distributed hooks see the whole computation."""
    if layout is None:
        return model(input_ids=input_ids, token_loss=reduction)
    return model(input_ids=input_ids, token_loss=reduction, position_ids=layout.position_ids,
                 target_mask=layout.target_mask)


def causal_lm_loss(model, input_ids, layout: DocumentLayout | None = None, num_targets: torch.Tensor | None = None):
    """Mean next-token cross-entropy over every position of the packed blocks; with `layout`, the sum over every
    target inside a document divided by `num_targets` (default: how many there are)."""
    if layout is not None:
        total = fast_loss(model, input_ids, "sum", layout) if fast_loss_of(model) is not None \
            else causal_lm_token_losses(model, input_ids, layout).sum()
        return total / (layout.target_mask.sum().clamp(min=1) if num_targets is None else num_targets)
    if fast_loss_of(model) is not None:  # chunked and/or compiled, inside the model's own forward
        return fast_loss(model, input_ids, "mean")
    per_sequence = causal_lm_token_losses(model, input_ids)
    return per_sequence.sum() / per_sequence.new_tensor(per_sequence.numel() * (input_ids.shape[1] - 1))


def causal_lm_token_losses(model, input_ids, layout: DocumentLayout | None = None):
    """Summed next-token cross-entropy of each sequence (shape [batch]), computed in float32; with `layout`, of
    the targets it keeps (layout.targets_per_sequence() of them)."""
    if fast_loss_of(model) is not None:
        return fast_loss(model, input_ids, "per_sequence", layout)
    position_ids = None if layout is None else layout.position_ids
    logits = _unflat(model(**_model_inputs(model, input_ids, position_ids)).logits, input_ids)[:, :-1]
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if layout is not None:
        losses = losses * layout.target_mask.reshape(-1)
    return losses.view(targets.shape).sum(dim=1)
