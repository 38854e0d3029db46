"""Throughput telemetry: model FLOPs per token, the GPU peaks MFU is measured against, GPU memory.

    step_telemetry(model.config, block_size=2048, tokens_per_second=3e5, num_processes=1, device=device,
                   peak_override=None)   # {"mfu": ..., "gpu_memory_gib": ..., "gpu_peak_memory_gib": ...}
    flops_per_token(model.config, 2048, input_embedding=False)   # the other MFU convention (MFU_CONVENTIONS)

docs/benchmarks.md ("Training throughput") has the figures.
"""

from __future__ import annotations

import torch

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


# The two conventions MFU is reported in: the FLOPs per token counted as 6N + 12·L·d·T (L layers, d hidden size,
# T block size) with N every parameter (ours), or N without the input embedding, a lookup rather than a matmul,
# as nanoGPT and llm.c count N, so that figures compare with theirs (llm.c counts attention as 6·L·d·T).
MFU_CONVENTIONS = {
    "mfu": "6N + 12·L·d·T FLOPs per token, N = every parameter (the output head included)",
    "mfu_without_input_embedding": "6N + 12·L·d·T FLOPs per token, N = every parameter but the input embedding "
                                   "(as nanoGPT and llm.c count N)",
}


def parameter_count(config, input_embedding: bool = True) -> int | None:
    """Parameters of a Llama-shaped causal LM from its config, always counting the output head (tied or not);
    `input_embedding` False leaves out the vocab x d input embedding."""
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
    return vocab * d * (2 if input_embedding else 1) + layers * (attention + mlp + 2 * d) + d


def flops_per_token(config, block_size: int, input_embedding: bool = True) -> int | None:
    """Training FLOPs per token: 6N for the matmuls forward and backward plus 12·L·d·T for attention scores, N with
    or without the input embedding (MFU_CONVENTIONS)."""
    parameters = parameter_count(config, input_embedding)
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
    if record.get("energy_kwh") is not None:
        shown["kwh"] = f"{record['energy_kwh']:.3g}"
    # Passes over the train split; for a mixture, over the split read most often.
    passes = [value for key, value in record.items() if key == "passes" or key.startswith("passes/")]
    if passes:
        shown["passes"] = f"{max(passes):.2f}"
    return shown
