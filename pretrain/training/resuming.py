"""What a resume checks against its checkpoint before anything is written, and what a branch carries over.

    check_resume_fits(checkpoint, model.config, block_size)          # InputError: another shape, vocabulary, block
    note = batch_change_note(checkpoint, tokens_per_step, spec, num_processes)  # None when the batch is the same
    carry_history(checkpoint, output_dir, step)                      # a branch starts with its source's curve

A branch is a run resumed from a checkpoint of another output_dir (`resume_from_checkpoint=RUN/step_N`): it reads the
source's folder and never writes there, and its metrics.jsonl and samples.jsonl start with the source's lines up to
step N, so its loss curve is whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pretrain.errors import InputError

# What the shape of the weights depends on: a checkpoint whose values differ cannot be loaded into this run's model.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
HISTORY_FILES = ("metrics.jsonl", "samples.jsonl")


def saved_block_size(checkpoint: Path) -> int | None:
    """The block size the checkpoint's run trained on, from the resolved spec saved with it (None: not recorded)."""
    try:
        saved = yaml.safe_load((checkpoint / "spec.yaml").read_text(encoding="utf-8"))
        return int(saved["data_args"]["block_size"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def check_resume_fits(checkpoint: Path, config, block_size: int):
    """Refuse a checkpoint whose model has another shape or vocabulary than `config`, or that trained on another
    block size than `block_size`, naming both values of each field that differs."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    differ = [f"model_args.{name} {saved[name]} (this run: {getattr(config, name, None)})"
              for name in SHAPE_FIELDS if name in saved and saved[name] != getattr(config, name, None)]
    saved_block = saved_block_size(checkpoint)
    if saved_block is not None and saved_block != block_size:
        differ.append(f"data_args.block_size {saved_block} (this run: {block_size})")
    if differ:
        raise InputError(f"checkpoint '{checkpoint}' was trained with {', '.join(differ)}; resume with the values it "
                         f"was trained with, or start a new run without training_args.resume_from_checkpoint")


def batch_change_note(checkpoint: Path, tokens_per_step: int, spec, num_processes: int) -> str | None:
    """The one line that says this run takes another number of tokens per optimizer step than the checkpoint's run,
    with the gradient_accumulation_steps that would match; None when they are the same (or it was not recorded)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("tokens_per_step")
    if not saved or saved == tokens_per_step:
        return None
    t = spec.training
    per_micro_step = t.per_device_train_batch_size * num_processes * spec.data.block_size
    matching = (f"gradient_accumulation_steps={saved // per_micro_step} would match it"
                if saved % per_micro_step == 0 else
                f"no gradient_accumulation_steps matches it with per_device_train_batch_size "
                f"{t.per_device_train_batch_size} on {num_processes} process(es)")
    return (f"note: this run takes {tokens_per_step:,} tokens per optimizer step, checkpoint '{checkpoint}' took "
            f"{saved:,}: the steps after it are of the new size and the data goes on from the next unread sample; "
            f"{matching}")


def is_branch(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` lies outside `output_dir`: the run branches from another run's checkpoint."""
    return checkpoint.resolve().parent != output_dir.resolve()


def carry_history(checkpoint: Path, output_dir: Path, step: int):
    """Start output_dir's metrics.jsonl and samples.jsonl with the lines of the checkpoint's run up to `step` (the
    files beside the checkpoint), replacing what output_dir held; the source's files are only read."""
    for name in HISTORY_FILES:
        source, target = checkpoint.parent / name, output_dir / name
        lines = source.read_text(encoding="utf-8").splitlines() if source.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if kept or target.exists():
            target.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def branch_record(checkpoint: Path, step: int) -> dict:
    """What trainer_state.json and the model card record of the run a branch started from."""
    return {"run": str(checkpoint.parent), "checkpoint": str(checkpoint), "step": step}
