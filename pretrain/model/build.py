"""The model and its optimizer: a Llama built from the spec (or a pretrained one continued), AdamW, the schedule,
and the speed settings (chunked loss, torch.compile, fused AdamW, TF32).

    tokenizer = load_tokenizer(spec)
    model = build_model(spec, tokenizer, vocab_size, say)
    prepare_model(model, spec.training, device, sharded=False, say=say)   # before accelerator.prepare
    optimizer = build_optimizer(model, spec, device)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pretrain.errors import InputError, first_line
from pretrain.hub import hub_reachable, looks_local
from pretrain.model.loss import install_fast_loss
from pretrain.model.optimizer import fused_adamw_supported
from pretrain.training.telemetry import peak_tflops

if TYPE_CHECKING:
    from pretrain.spec.fields import Spec

SAMPLE_MAX_NEW_TOKENS = 48

def load_tokenizer(spec: Spec):
    from transformers import AutoTokenizer

    name = spec.model.tokenizer_name
    if not Path(name).exists():
        if looks_local(name) or not hub_reachable():
            raise InputError(f"tokenizer '{name}' is not a local folder and cannot be fetched from the Hub; set "
                             f"model_args.tokenizer_name to a local tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=spec.model.use_fast_tokenizer,
                                                  cache_dir=spec.model.cache_dir,
                                                  token=spec.training.hub_token)
    except (OSError, ValueError) as error:
        raise InputError(f"could not load tokenizer '{name}' ({first_line(error)}); set model_args.tokenizer_name "
                         f"to a folder written by train-sentencepiece.py") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reconcile_vocab_size(spec: Spec, tokenizer_size: int, say) -> int:
    if spec.model.vocab_size != tokenizer_size:
        say(f"warning: model_args.vocab_size is {spec.model.vocab_size} but the tokenizer has {tokenizer_size} "
            f"tokens; using {tokenizer_size}")
    return tokenizer_size


def attention_implementation(requested: str, say) -> str:
    import importlib.util

    if requested == "flash_attention_2" and not (importlib.util.find_spec("flash_attn")
                                                 and torch.cuda.is_available()):
        say("warning: flash_attention_2 needs the flash-attn package and a CUDA GPU; using sdpa")
        return "sdpa"
    return requested


def build_model(spec: Spec, tokenizer, vocab_size: int, say):
    from transformers import AutoModelForCausalLM

    m = spec.model
    attention = attention_implementation(m.attn_implementation, say)
    if m.train_from_scratch:
        config = llama_config(spec, tokenizer, vocab_size, base=load_base_config(m, say))
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    else:
        model = load_pretrained(m, attention)
        if model.get_input_embeddings().num_embeddings != vocab_size:
            say(f"resizing the embeddings from {model.get_input_embeddings().num_embeddings} to {vocab_size}")
            model.resize_token_embeddings(vocab_size)
    model.config.use_cache = m.use_cache
    configure_generation(model, tokenizer)
    if spec.training.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model):
    # Later transformers 5 releases renamed the method and deprecated the old name; earlier 5.x have only the old.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def llama_config(spec: Spec, tokenizer, vocab_size: int, base=None):
    from transformers import LlamaConfig

    m = spec.model
    fields = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                  max_position_embeddings=m.max_position_embeddings, num_attention_heads=m.num_attention_heads,
                  num_hidden_layers=m.num_hidden_layers, num_key_value_heads=m.num_key_value_heads,
                  output_hidden_states=m.output_hidden_states, use_cache=m.use_cache,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if base is None:
        return LlamaConfig(tie_word_embeddings=False, **fields)
    for key, value in fields.items():
        setattr(base, key, value)
    return base


def load_base_config(m, say):
    """The config of `model_to_train` when it can be read; None means: build from the spec alone."""
    from transformers import AutoConfig

    if not m.model_to_train:
        return None
    if not Path(m.model_to_train).exists() and not hub_reachable():
        say(f"note: the Hub cannot be reached, so '{m.model_to_train}' is not used as the base config; "
            f"building the model from the spec alone")
        return None
    try:
        return AutoConfig.from_pretrained(m.model_to_train, revision=m.model_revision, cache_dir=m.cache_dir,
                                          trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as error:
        raise InputError(f"could not read the config of model_args.model_to_train '{m.model_to_train}': "
                         f"{first_line(error)}") from None


def load_pretrained(m, attention: str):
    from transformers import AutoModelForCausalLM

    name = m.model_to_train
    if not Path(name).exists() and (looks_local(name) or not hub_reachable()):
        raise InputError(f"model_args.model_to_train '{name}' is not a local folder and cannot be fetched from "
                         f"the Hub; give a local model folder such as a previous final-checkpoint")
    try:
        return AutoModelForCausalLM.from_pretrained(name, revision=m.model_revision, cache_dir=m.cache_dir,
                                                    trust_remote_code=m.trust_remote_code,
                                                    dtype=m.torch_dtype or "float32", attn_implementation=attention)
    except (OSError, ValueError) as error:
        raise InputError(f"could not load model_args.model_to_train '{name}': {first_line(error)}") \
            from None


def configure_generation(model, tokenizer):
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample, generation.top_k, generation.top_p = True, 50, 0.95
    generation.repetition_penalty = 1.2
    generation.max_new_tokens = SAMPLE_MAX_NEW_TOKENS






def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens_per_step(spec: Spec, num_processes: int) -> int:
    t = spec.training
    return t.per_device_train_batch_size * num_processes * t.gradient_accumulation_steps * spec.data.block_size


def compile_possible(device: torch.device, sharded: bool, say) -> bool:
    if sharded:
        say("note: compile_model is not applied under FSDP here; the model runs eager")
        return False
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        say("note: compile_model needs a C++ compiler on the CPU and none was found; the model runs eager")
        return False
    return True




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


