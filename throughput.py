"""Training speed: a cross-entropy that never holds a whole batch's logits, torch.compile of the loss, fused
AdamW, TF32, and the telemetry that shows what they buy (tokens/s, model FLOPs utilization, GPU memory).

    import throughput
    throughput.prepare_model(model, spec.training, device, sharded=False, say=print)  # before accelerator.prepare
    loss = throughput.fast_loss(model, input_ids, "mean")   # through DDP/FSDP wrappers, when installed
    throughput.step_telemetry(model.config, block_size=2048, tokens_per_second=3e5, num_processes=1,
                              device=device, peak_override=None)   # {"mfu": ..., "gpu_memory_gib": ...}

pre-training.py and Utilities/bench_train.py use it; BENCHMARKS.md ("Training throughput") has the figures.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GIB = 1024 ** 3

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s. The first pattern found in
# torch.cuda.get_device_name() wins, so specific names come before the general ones they contain. None: the chip
# has no published bf16 figure we trust; set training_args.mfu_peak_tflops for it.
GPU_PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("A10G", None),
    ("A10", 125.0), ("A30", 165.0), ("A40", 149.7), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0),
]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and MFU

def parameter_count(config) -> int | None:
    """Parameters of a Llama-shaped causal LM from its config, always counting the output head (tied or not)."""
    try:
        d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        intermediate = config.intermediate_size
    except AttributeError:
        return None
    head_dim = getattr(config, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    if getattr(config, "attention_bias", False):
        attention += (heads + 2 * kv_heads) * head_dim + d
    mlp = 3 * d * intermediate + (2 * intermediate + d if getattr(config, "mlp_bias", False) else 0)
    return vocab * d * 2 + layers * (attention + mlp + 2 * d) + d


def flops_per_token(config, block_size: int) -> int | None:
    """Training FLOPs per token: 6N for the matmuls forward and backward plus 12·L·d·T for attention scores."""
    parameters = parameter_count(config)
    if parameters is None:
        return None
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * block_size


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """The bf16 peak MFU is measured against, and where it came from (printed once at the start)."""
    if override:
        return override, f"{override:g} TFLOP/s (training_args.mfu_peak_tflops)"
    if device.type != "cuda":
        return None, f"not computed on {device.type} (no GPU peak to compare with)"
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in GPU_PEAK_BF16_TFLOPS:
        if pattern in name:
            if tflops is None:
                break
            return tflops, f"{tflops:g} TFLOP/s, the dense bf16 peak of {name}"
    return None, f"not computed: {name} is not in the peak table; set training_args.mfu_peak_tflops"


def model_flops_utilization(tokens_per_second: float, flops: int | None, peak: float | None,
                            num_devices: int) -> float | None:
    if not flops or not peak:
        return None
    return tokens_per_second * flops / (peak * 1e12 * num_devices)


def device_memory_gib(device: torch.device, reset_peak: bool = True) -> dict:
    """Allocated and peak-allocated GPU memory since the last reset; None off CUDA. Host-side counters: no sync."""
    if device.type != "cuda":
        return {"gpu_memory_gib": None, "gpu_peak_memory_gib": None}
    result = {"gpu_memory_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
              "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3)}
    if reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    return result


def step_telemetry(config, *, block_size: int, tokens_per_second: float, num_processes: int,
                   device: torch.device, peak_override: float | None) -> dict:
    """The throughput fields of one logged training step."""
    peak, _ = peak_tflops(device, peak_override)
    mfu = model_flops_utilization(tokens_per_second, flops_per_token(config, block_size), peak, num_processes)
    return {"mfu": round(mfu, 4) if mfu is not None else None, **device_memory_gib(device)}


def progress_postfix(record: dict) -> dict:
    """What the progress bar shows of a logged step: only the fields this device has."""
    shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['learning_rate']:.2e}",
             "tok_s": f"{record['tokens_per_second']:,.0f}"}
    if record.get("mfu") is not None:
        shown["mfu"] = f"{record['mfu']:.1%}"
    if record.get("gpu_peak_memory_gib") is not None:
        shown["mem_gib"] = f"{record['gpu_peak_memory_gib']:.1f}"
    return shown


# ----------------------------------------------------------------------------------------------------------------
# Cross-entropy over the output head, a chunk of tokens at a time

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


# ----------------------------------------------------------------------------------------------------------------
# The model's loss forward: head and cross-entropy inside the top-level forward, so DDP and FSDP hooks run

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


def compile_possible(device: torch.device, sharded: bool, say) -> bool:
    if sharded:
        say("note: compile_model is not applied under FSDP here; the model runs eager")
        return False
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        say("note: compile_model needs a C++ compiler on the CPU and none was found; the model runs eager")
        return False
    return True


def fused_adamw_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: only CUDA had the fused kernel
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def enable_tf32(device: torch.device) -> bool:
    """TF32 tensor cores for the float32 matmuls left outside autocast. Only on CUDA: on some CPUs the same switch
    lowers float32 matmuls to bfloat16."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def prepare_model(model, training_args, device: torch.device, *, sharded: bool, say) -> None:
    """Apply the speed settings of the spec to a freshly built model (before accelerator.prepare) and say which."""
    t = training_args
    tf32 = t.allow_tf32 and enable_tf32(device)
    compile_loss = t.compile_model and compile_possible(device, sharded, say)
    if t.cross_entropy_chunk_tokens or compile_loss:
        install_fast_loss(model, t.cross_entropy_chunk_tokens, compile_loss)
    fused = t.fused_optimizer and fused_adamw_supported(device)
    chunks = f"in chunks of {t.cross_entropy_chunk_tokens:,} tokens" if t.cross_entropy_chunk_tokens else "full logits"
    say(f"speed: compile {'on' if compile_loss else 'off'}, cross-entropy {chunks}, AdamW "
        f"{'fused' if fused else 'foreach'}, TF32 {'on' if tf32 else 'off'}")
    say(f"MFU: {peak_tflops(device, t.mfu_peak_tflops)[1]}")


def adamw(groups, *, lr: float, betas: tuple, eps: float, fused: bool, device: torch.device):
    """AdamW with the fused kernel where this torch has it for `device`; torch's own default otherwise."""
    if fused and fused_adamw_supported(device):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Micro-batch guidance: measured by doubling on a GPU, or estimated from the activations a forward pass saves

def find_largest_micro_batch(trial, max_micro_batch: int, report) -> int | None:
    """Double the micro-batch from 1 while `trial(micro_batch)` fits, up to `max_micro_batch`.

    A trial returns a dict of what it measured, with "fits": False when it did not fit; running out of GPU memory
    counts as not fitting. `report(micro_batch, result)` is told each outcome. Returns the largest that fitted (None:
    not even 1)."""
    largest, micro_batch = None, 1
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
