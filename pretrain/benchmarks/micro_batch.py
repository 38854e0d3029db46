"""Micro-batch guidance for the training benchmark: measured by doubling on a GPU, or estimated from the
activations a forward pass saves."""

from __future__ import annotations

import torch

from pretrain.model.loss import causal_lm_losses
from pretrain.training.telemetry import GIB, parameter_count


def find_largest_micro_batch(trial, max_micro_batch: int, report, start: int = 1) -> int | None:
    """Double the micro-batch from `start` while `trial(micro_batch)` fits, up to `max_micro_batch`.

    A trial returns a dict of what it measured, with "fits": False when it did not fit; running out of GPU memory
    counts as not fitting. `report(micro_batch, result)` is told each outcome. Returns the largest that fitted (None:
    not even `start`)."""
    largest, micro_batch = None, start
    while micro_batch <= max_micro_batch:
        try:
            result = {"fits": True, **trial(micro_batch)}
        except torch.OutOfMemoryError:
            result = {"fits": False, "error": "out of memory"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed trial held must not count against the next attempt
        report(micro_batch, result)
        if not result["fits"]:
            break
        largest, micro_batch = micro_batch, micro_batch * 2
    return largest


def saved_activation_bytes(model, input_ids: torch.Tensor, loss_fn, autocast_dtype) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward pass (weights excluded), each storage
    counted once."""
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    device_type = input_ids.device.type
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = loss_fn(model, input_ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def activation_profile(config, block_size: int, chunk_tokens: int | None, autocast_dtype) -> dict:
    """Saved bytes per token: for the embedding, final norm, head and loss ("base"), and for each layer.

    Measured on the CPU with eager models of 1 and 2 layers and batches of 1 and 2 sequences: the differences
    cancel everything that does not grow with tokens or layers (such as autocast's weight copies)."""
    import copy

    from transformers import AutoModelForCausalLM

    def loss_fn(model, input_ids):
        if chunk_tokens:
            return causal_lm_losses(model, input_ids, "mean", chunk_tokens)
        return model(input_ids=input_ids, labels=input_ids).loss

    saved = {}
    for layers in (1, 2):
        small = copy.deepcopy(config)
        small.num_hidden_layers = layers
        model = AutoModelForCausalLM.from_config(small, attn_implementation="sdpa")
        for batch in (1, 2):
            input_ids = torch.randint(small.vocab_size, (batch, block_size), generator=torch.Generator().manual_seed(0))
            saved[layers, batch] = saved_activation_bytes(model, input_ids, loss_fn, autocast_dtype)
        del model
    per_layer = (saved[2, 2] - saved[2, 1] - saved[1, 2] + saved[1, 1]) / block_size
    base = (saved[1, 2] - saved[1, 1]) / block_size - per_layer
    return {"base_bytes_per_token": base, "layer_bytes_per_token": per_layer}


def estimated_memory_gib(config, profile: dict, *, block_size: int, micro_batch: int, chunk_tokens: int | None,
                         mixed_precision: bool) -> float:
    """Peak memory of one training step: fp32 weights, gradients and AdamW moments (16 bytes a parameter), bf16
    weight copies under autocast, saved activations, and the loss's transient buffers in backward."""
    parameters = parameter_count(config)
    static = parameters * (18 if mixed_precision else 16)
    tokens = micro_batch * block_size
    activations = tokens * (profile["base_bytes_per_token"]
                            + config.num_hidden_layers * profile["layer_bytes_per_token"])
    # Backward of a full-logits loss holds float32 and bf16 gradients of every logit; the chunked loss only one
    # chunk's float32 logits, their gradient and its cast.
    transient = (10 * min(chunk_tokens, tokens) if chunk_tokens else 6 * tokens) * config.vocab_size
    return (static + activations + transient) / GIB
