"""The training step: a loop like the original scripts' against pre-training.py's, on the same synthetic tokens.

    python Utilities/benchmark.py train --spec-file specs.yaml                    # 160M on the GPU (if there is one)
    python Utilities/benchmark.py train --spec-file specs-460m.yaml --micro-batch 8
    python Utilities/benchmark.py train --spec-file specs-tiny.yaml --device cpu --timed-steps 5
    python Utilities/benchmark.py train --spec-file specs.yaml training_args.compile_model=false   # spec overrides
    python Utilities/benchmark.py train --spec-file specs.yaml --find-micro-batch  # GPU: doubling; CPU: estimate
    python Utilities/benchmark.py train --spec-file specs.yaml --variants ours --sdpa-backend flash \
        --compile-mode max-autotune-no-cudagraphs                                 # levers of ours
    python Utilities/benchmark.py train --spec-file specs.yaml --variants ours --documents 600 \
        data_args.document_attention=true                                         # documents kept apart

Both variants start from the same initialization, see the same tokens and run at the spec's mixed_precision:
  original  the original loop's setup (pretrain/benchmarks/baselines.py): fp32 weights with autocast, foreach
            AdamW, the model's own loss (model(input_ids, labels=...)), eager, batches copied from pageable memory;
  ours      the spec's speed settings applied by pre-training.py's own functions (pretrain.model.build.prepare_model,
            build_optimizer, pretrain.model.loss.causal_lm_loss), batches copied from pinned memory without blocking.
Each runs --warmup-steps optimizer steps (compiling happens there), then --timed-steps timed ones of
gradient_accumulation_steps micro-batches, with the spec's gradient clipping and no host sync inside the timed steps.
One JSON line per variant (tokens/s, MFU both ways (pretrain.training.telemetry.MFU_CONVENTIONS) and the peak it is
measured against, peak memory, losses), then a "ratios" line. Peak memory is torch's allocator peak on a GPU; on
the CPU, the RSS of this process and its children (compile workers) sampled while the variant runs. The synthetic
tokens are mostly "previous token + 1", so the loss falls and the two curves can be compared.

Levers of `ours`, for comparing one setting at a time: --compile-mode (torch.compile's modes, applied as the
inductor options that mode stands for, since pre-training.py compiles with the default one) and --sdpa-backend
(the one attention kernel allowed, through torch.nn.attention.sdpa_kernel; a kernel that cannot run the model's
attention fails the run with torch's message). The loss lever is a spec override:
training_args.cross_entropy_chunk_tokens=null for the full logits. --documents N cuts the synthetic tokens into
documents of about N tokens, BOS ... EOS, as packed data holds them; with data_args.document_attention=true, `ours`
keeps them apart (pretrain/model/document_attention.py), so the same command without the override gives the cost of
doing so.
--find-micro-batch: on a GPU, doubles the micro-batch of `ours` from --start-micro-batch (default 1) until it runs
out of memory (measured; with compile on, every new micro-batch compiles again: several minutes in all); on the
CPU, estimates each micro-batch's peak from the activations an eager forward pass saves, against --memory-gib (an
estimate: compile and the allocator change the real figure).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from pretrain.benchmarks import baselines
from pretrain.benchmarks.measure import REPO, TreeMemorySampler
from pretrain.errors import InputError

VARIANTS = ("original", "ours")
HEADROOM = 0.9  # the share of a GPU's memory an estimate may fill: the allocator fragments and CUDA holds some
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def document_length(text: str) -> int:
    """A --documents value: tokens per synthetic document, at least 2 (its BOS and EOS)."""
    import argparse

    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"give a document length in tokens, at least 2, not '{text}'")
    return int(text)


def add_arguments(parser) -> None:
    parser.add_argument("--spec-file", default=str(REPO / "specs.yaml"), help="spec whose model and settings to run")
    parser.add_argument("overrides", nargs="*", metavar="group.key=value", help="spec overrides, as pre-training.py")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: the GPU when there is one")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default: the spec's)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None, help="default: the spec's")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps first (compiling)")
    parser.add_argument("--timed-steps", type=int, default=10, help="optimizer steps timed")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the tokens")
    parser.add_argument("--find-micro-batch", action="store_true",
                        help="find the largest micro-batch that fits instead (GPU: measured; CPU: estimated)")
    parser.add_argument("--start-micro-batch", type=int, default=1, help="where --find-micro-batch starts doubling")
    parser.add_argument("--max-micro-batch", type=int, default=256, help="where --find-micro-batch stops doubling")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode for ours (when the spec compiles)")
    parser.add_argument("--sdpa-backend", choices=list(SDPA_BACKENDS), default="auto",
                        help="the attention kernel ours may use (auto: torch chooses)")
    parser.add_argument("--documents", type=document_length, default=None, metavar="TOKENS",
                        help="cut the synthetic tokens into documents of about this many tokens (default: none)")
    parser.add_argument("--memory-gib", type=float, default=80.0,
                        help="GPU memory the CPU estimate of --find-micro-batch is made for")


def run(args) -> None:
    import torch

    from pretrain.spec.loading import load_spec

    spec = load_spec(args.spec_file, args.overrides)
    if spec.extra.mixed_precision == "fp16":
        raise InputError("the benchmark runs bf16 or float32 (fp16 needs a gradient scaler it does not model); "
                         "add extra_args.mixed_precision=bf16")
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS) or not variants:
        raise InputError(f"--variants '{args.variants}': choose from {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    micro_batch = args.micro_batch or spec.training.per_device_train_batch_size
    accumulation = args.gradient_accumulation_steps or spec.training.gradient_accumulation_steps
    if min(micro_batch, accumulation, args.timed_steps, args.start_micro_batch) < 1 or args.warmup_steps < 0 \
            or args.max_micro_batch < args.start_micro_batch:
        raise InputError("--micro-batch, --gradient-accumulation-steps, --timed-steps and --start-micro-batch must "
                         "be at least 1, --max-micro-batch at least --start-micro-batch, --warmup-steps at least 0")
    if args.find_micro_batch:
        with speed_levers(args):
            find_micro_batch(spec, device, args)
        return
    results = {}
    for variant in [v for v in VARIANTS if v in variants]:  # original first: ours switches TF32 on for the process
        with speed_levers(args) if variant == "ours" else contextlib.nullcontext():
            results[variant] = measure(spec, variant, device, micro_batch, accumulation, args)
        print(json.dumps(results[variant]), flush=True)
    if len(results) == 2:
        print(json.dumps(ratios(results)), flush=True)


def speed_levers(args) -> contextlib.ExitStack:
    """The levers of --compile-mode and --sdpa-backend, in effect while the returned context is open."""
    stack = contextlib.ExitStack()
    if SDPA_BACKENDS[args.sdpa_backend] is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[args.sdpa_backend])]))
    if args.compile_mode != "default":
        # torch.compile(mode=M) compiles with these inductor options; pre-training.py's compile call takes none.
        import torch._inductor

        stack.enter_context(torch._inductor.config.patch(torch._inductor.list_mode_options(args.compile_mode)))
    return stack


def build(spec, variant: str, device, seed: int):
    """The spec's model on `device` (same initialization for every variant), its optimizer and its loss function."""
    import torch
    from transformers import AutoModelForCausalLM

    from pretrain.model.build import attention_implementation, prepare_model
    from pretrain.model.loss import causal_lm_loss
    from pretrain.model.optimizer import build_optimizer

    quiet = lambda message: None  # noqa: E731 - the JSON lines are the output
    config = model_config(spec)
    torch.manual_seed(seed)
    attention = attention_implementation(spec.model.attn_implementation, quiet)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(device)
    if variant == "original":
        return (model, *baselines.training_setup(model, spec))
    prepare_model(model, spec.training, device, sharded=False, say=quiet)
    if spec.data.document_attention:
        from pretrain.model.document_attention import document_layout

        def documents_apart(model, input_ids):
            return causal_lm_loss(model, input_ids, document_layout(input_ids, config.bos_token_id,
                                                                    config.eos_token_id))

        return model, build_optimizer(model, spec, device), documents_apart
    return model, build_optimizer(model, spec, device), causal_lm_loss


def model_config(spec):
    """The model's config as pre-training.py builds it, with the special ids its tokenizers have."""
    from pretrain.model.build import llama_config

    class SpecialIds:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    return llama_config(spec, SpecialIds, spec.model.vocab_size)


def synthetic_batches(vocab_size: int, micro_batch: int, block_size: int, count: int, seed: int, pin: bool,
                      document_tokens: int | None = None):
    """`count` micro-batches in which each token is the previous one plus 1 nine times in ten, random otherwise;
    with `document_tokens`, cut into documents of that mean length (exponentially distributed), each BOS (1) ...
    EOS (2), the special ids 0-3 appearing nowhere else."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = (count, micro_batch, block_size)
    jumps = torch.where(torch.rand(shape, generator=generator) < 0.9, 1,
                        torch.randint(vocab_size, shape, generator=generator))
    batches = torch.cumsum(jumps, dim=-1) % vocab_size
    if document_tokens:
        batches = 4 + batches % (vocab_size - 4)
        starts = torch.rand(shape, generator=generator) < 1 / document_tokens
        batches[starts] = 1
        batches[..., :-1][starts[..., 1:]] = 2
    return [b.pin_memory() if pin else b for b in batches.unbind(0)]


def train_steps(model, optimizer, loss_fn, batches, steps: int, accumulation: int, spec, device, non_blocking: bool):
    """`steps` optimizer steps as pre-training.py takes them; returns the step losses still on the device."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.extra.mixed_precision)
    max_grad_norm = spec.training.max_grad_norm
    losses = []
    for step in range(steps):
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            input_ids = batches[(step * accumulation + micro) % len(batches)].to(device, non_blocking=non_blocking)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model, input_ids)
            (loss / accumulation).backward()
            step_loss += loss.detach()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / accumulation)
    return losses


def measure(spec, variant: str, device, micro_batch: int, accumulation: int, args) -> dict:
    import torch

    from pretrain.training import telemetry

    model, optimizer, loss_fn = build(spec, variant, device, args.seed)
    pinned = variant == "ours" and spec.training.dataloader_pin_memory and device.type == "cuda"
    batches = synthetic_batches(model.config.vocab_size, micro_batch, spec.data.block_size, 2 * accumulation,
                                args.seed, pinned, args.documents)
    with PeakMemory(device) as memory:
        losses = train_steps(model, optimizer, loss_fn, batches, args.warmup_steps, accumulation, spec, device,
                             pinned)
        synchronize(device)
        started = time.perf_counter()
        losses += train_steps(model, optimizer, loss_fn, batches, args.timed_steps, accumulation, spec, device, pinned)
        synchronize(device)
        seconds = time.perf_counter() - started
    tokens_per_second = args.timed_steps * accumulation * micro_batch * spec.data.block_size / seconds
    peak, peak_source = telemetry.peak_tflops(device, spec.training.mfu_peak_tflops)
    flops = telemetry.flops_per_token(model.config, spec.data.block_size)
    flops_without_embedding = telemetry.flops_per_token(model.config, spec.data.block_size, input_embedding=False)
    mfu = telemetry.model_flops_utilization(tokens_per_second, flops, peak, 1)
    mfu_without_embedding = telemetry.model_flops_utilization(tokens_per_second, flops_without_embedding, peak, 1)
    result = {"benchmark": "train", "variant": variant, "spec": Path(args.spec_file).name, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "parameters": telemetry.parameter_count(model.config),
              "micro_batch": micro_batch, "gradient_accumulation_steps": accumulation,
              "block_size": spec.data.block_size, "mixed_precision": spec.extra.mixed_precision,
              "settings": settings_of(spec, variant, device), "warmup_steps": args.warmup_steps,
              "timed_steps": args.timed_steps, "seconds": round(seconds, 3),
              "tokens_per_second": round(tokens_per_second, 1), "flops_per_token": flops,
              "mfu": round(mfu, 4) if mfu is not None else None,
              "flops_per_token_without_input_embedding": flops_without_embedding,
              "mfu_without_input_embedding": round(mfu_without_embedding, 4) if mfu is not None else None,
              "peak_tflops": peak, "peak_source": peak_source,
              "peak_memory_gib": memory.peak_gib, "memory_kind": memory.kind,
              "losses": [round(float(loss), 5) for loss in losses]}
    if variant == "ours":
        result["levers"] = {"compile_mode": args.compile_mode, "sdpa_backend": args.sdpa_backend,
                            "document_attention": spec.data.document_attention}
    result["documents"] = args.documents
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def settings_of(spec, variant: str, device) -> dict:
    """The speed settings in effect (TF32 and pinned copies exist only on CUDA)."""
    from pretrain.model.optimizer import fused_adamw_supported

    cuda = device.type == "cuda"
    if variant == "original":
        return dict(baselines.TRAINING_SETTINGS)
    t = spec.training
    return {"compile_model": t.compile_model, "fused_optimizer": t.fused_optimizer and
            fused_adamw_supported(device), "cross_entropy_chunk_tokens": t.cross_entropy_chunk_tokens,
            "allow_tf32": t.allow_tf32 and cuda, "pinned_non_blocking": t.dataloader_pin_memory and cuda}


def ratios(results: dict) -> dict:
    original, ours = results["original"], results["ours"]
    out = {"benchmark": "train", "variant": "ratios",
           "ours_over_original_tokens_per_second": round(ours["tokens_per_second"] / original["tokens_per_second"], 3),
           "max_abs_loss_difference": round(max(abs(a - b) for a, b in zip(original["losses"], ours["losses"])), 5),
           "compared_steps": len(ours["losses"])}
    if original["peak_memory_gib"] and ours["peak_memory_gib"]:
        out["ours_over_original_peak_memory"] = round(ours["peak_memory_gib"] / original["peak_memory_gib"], 3)
    return out


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak on a GPU (torch's own counter), the RSS of this
    process and its children, sampled, on the CPU."""

    def __init__(self, device):
        self.device, self.peak_gib = device, None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss_sampled"
        self._sampler = None if device.type == "cuda" else TreeMemorySampler()

    def __enter__(self):
        from pretrain.training.telemetry import device_memory_gib

        if self._sampler is None:
            device_memory_gib(self.device, reset_peak=True)
        else:
            self._sampler.__enter__()
        return self

    def __exit__(self, *exc):
        from pretrain.training.telemetry import device_memory_gib

        if self._sampler is None:
            self.peak_gib = device_memory_gib(self.device)["gpu_peak_memory_gib"]
        else:
            self._sampler.__exit__(*exc)
            self.peak_gib = round(self._sampler.peak_rss_bytes / 1024 ** 3, 3)
        return False


# ----------------------------------------------------------------------------------------------------------------
# --find-micro-batch

def find_micro_batch(spec, device, args) -> None:
    from pretrain.benchmarks.micro_batch import find_largest_micro_batch

    report = micro_batch_reporter(spec, device, args)
    if device.type == "cuda":
        largest = find_largest_micro_batch(cuda_trial(spec, device, args), args.max_micro_batch, report,
                                           args.start_micro_batch)
        method = "measured: doubling on this GPU until out of memory"
    else:
        largest = find_largest_micro_batch(estimate_trial(spec, args), args.max_micro_batch, report,
                                           args.start_micro_batch)
        method = f"estimated for {args.memory_gib:g} GiB from the activations an eager forward pass saves on the CPU"
    print(json.dumps({"benchmark": "train", "variant": "largest_micro_batch", "spec": Path(args.spec_file).name,
                      "largest_micro_batch": largest, "method": method, "start_micro_batch": args.start_micro_batch,
                      "settings": settings_of(spec, "ours", device),
                      "limited_by_max_micro_batch": largest is not None and largest * 2 > args.max_micro_batch}),
          flush=True)


def micro_batch_reporter(spec, device, args):
    def report(micro_batch: int, result: dict):
        print(json.dumps({"benchmark": "train", "variant": "micro_batch", "spec": Path(args.spec_file).name,
                          "device": device.type, "micro_batch": micro_batch, **result}), flush=True)
    return report


def cuda_trial(spec, device, args):
    """A trial runs two optimizer steps of `ours` at one micro-batch (the second with the optimizer's state), the
    model built once and reused; its seconds include compiling for the new shape."""
    built = {}

    def trial(micro_batch: int) -> dict:
        if not built:
            built["model"], built["optimizer"], built["loss_fn"] = build(spec, "ours", device, args.seed)
        model, optimizer = built["model"], built["optimizer"]
        batches = synthetic_batches(model.config.vocab_size, micro_batch, spec.data.block_size, 1, args.seed, False)
        started = time.perf_counter()
        try:
            with PeakMemory(device) as memory:
                train_steps(model, optimizer, built["loss_fn"], batches, 2, 1, spec, device, False)
                synchronize(device)
        finally:
            optimizer.zero_grad(set_to_none=True)
        return {"peak_memory_gib": memory.peak_gib, "seconds": round(time.perf_counter() - started, 2)}
    return trial


def estimate_trial(spec, args):
    """A trial that estimates instead of running: fits when the estimate leaves HEADROOM of --memory-gib."""
    import torch

    from pretrain.benchmarks.micro_batch import activation_profile, estimated_memory_gib

    config = model_config(spec)
    chunk = spec.training.cross_entropy_chunk_tokens
    mixed = spec.extra.mixed_precision == "bf16"
    profile = activation_profile(config, spec.data.block_size, chunk, torch.bfloat16 if mixed else None)
    profile = {key: round(value, 1) for key, value in profile.items()}

    def trial(micro_batch: int) -> dict:
        gib = estimated_memory_gib(config, profile, block_size=spec.data.block_size, micro_batch=micro_batch,
                                   chunk_tokens=chunk, mixed_precision=mixed)
        return {"fits": gib <= HEADROOM * args.memory_gib, "estimated_peak_gib": round(gib, 4), **profile}
    return trial
