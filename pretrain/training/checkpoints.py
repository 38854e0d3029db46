"""Checkpoints that are always whole: finding, reading, saving and pruning `output_dir/step_N/` folders.

    folder = save_checkpoint(run, "step_100")     # every process calls it; published whole or not at all
    resume_from = resolve_resume(spec, output_dir, say)
    state = read_train_state(resume_from)

A checkpoint holds the Hugging Face model and tokenizer, accelerate's resumable state (model, optimizer, scheduler,
RNG), the resolved spec with every secret removed, and trainer_state.json (step, data position, losses).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pretrain.atomic_write import publish
from pretrain.errors import EXIT_WRITE_FAILED, InputError
from pretrain.training.state import Run, TrainState

# A checkpoint holds the fp32 weights twice (accelerate_state/ and the Hugging Face model.safetensors) and AdamW's
# two fp32 moments: 4 + 4 + 8 bytes per parameter; the tokenizer and the small JSON files are noise beside them.
CHECKPOINT_BYTES_PER_PARAMETER = 16
LEFTOVER = re.compile(r"\.(step_\d+|final-checkpoint)\.(tmp|old|deleting)")


def resolve_resume(spec, output_dir: Path, say) -> Path | None:
    wanted = spec.training.resume_from_checkpoint
    if not wanted:
        return None
    if wanted == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            say(f"note: resume_from_checkpoint is 'latest' but {output_dir} holds no checkpoint; starting fresh")
        return found
    path = Path(wanted)
    if not (path / "trainer_state.json").is_file() or not (path / "accelerate_state").is_dir():
        raise InputError(f"training_args.resume_from_checkpoint '{wanted}' is not a complete checkpoint folder "
                         f"(no trainer_state.json or accelerate_state/); give output_dir/step_N or 'latest'")
    return path


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The highest complete step_N folder; folders still being written carry a dot prefix and are ignored."""
    steps = step_folders(output_dir)
    return steps[-1][1] if steps else None


def step_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete step_N folders, oldest first."""
    found = []
    for folder in output_dir.glob("step_*"):
        suffix = folder.name.removeprefix("step_")
        if suffix.isdigit() and (folder / "trainer_state.json").is_file():
            found.append((int(suffix), folder))
    return sorted(found)


def read_train_state(folder: Path) -> TrainState:
    saved = json.loads((folder / "trainer_state.json").read_text())
    return TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})


def truncate_metrics(path: Path, step: int):
    """Drop lines logged after `step`, so a resumed run continues the file as if never stopped."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def check_free_space(output_dir: Path, num_parameters: int, spec, max_steps: int, say):
    """Refuse a folder that cannot hold one checkpoint; warn when it cannot hold what this run will keep."""
    one = num_parameters * CHECKPOINT_BYTES_PER_PARAMETER
    free = shutil.disk_usage(output_dir).free
    if free < one:
        raise InputError(f"training_args.output_dir '{output_dir}' has {human_bytes(free)} free but one checkpoint "
                         f"of this model takes about {human_bytes(one)}; free some space or choose another folder")
    every, keep = spec.extra.checkpointing_steps, spec.extra.keep_last_checkpoints
    step_checkpoints = (max_steps - 1) // every if every and max_steps else 0
    kept = min(step_checkpoints, keep) if keep else step_checkpoints
    # The newest checkpoints stay while the next one is written, and the final one comes on top.
    peak = (kept + 1) * one
    if free < peak:
        say(f"warning: training_args.output_dir '{output_dir}' has {human_bytes(free)} free but this run keeps up "
            f"to {kept + 1} checkpoints of about {human_bytes(one)} ({human_bytes(peak)}); the run will stop when "
            f"the disk is full: free space or set extra_args.keep_last_checkpoints")


def human_bytes(count: float) -> str:
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"


def remove_leftovers(output_dir: Path):
    """Tidy what a killed save or deletion left behind: hidden folders that would only take disk space.

    `.NAME.old` is the previous copy of a checkpoint being replaced; if the kill came between the two renames,
    NAME is missing and the old copy goes back into place.
    """
    for folder in output_dir.glob(".*"):
        match = LEFTOVER.fullmatch(folder.name)
        if not match or not folder.is_dir():
            continue
        original = output_dir / match.group(1)
        if match.group(2) == "old" and not original.exists():
            folder.rename(original)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoints(output_dir: Path, keep_last: int, protected) -> list[Path]:
    """Delete all but the newest `keep_last` step_N folders (0: keep all), never those in `protected`."""
    if keep_last <= 0:
        return []
    protected = {Path(p).resolve() for p in protected if p is not None}
    doomed = [folder for _, folder in step_folders(output_dir)[:-keep_last] if folder.resolve() not in protected]
    for folder in doomed:
        # Renamed first, so a kill during the deletion never leaves a half-deleted folder named step_N.
        hidden = folder.with_name(f".{folder.name}.deleting")
        folder.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def save_checkpoint(run: Run, name: str, write_extra=None) -> Path:
    """Write output_dir/<name>/ under a hidden name and rename it into place once complete (every process calls it).

    A kill at any moment leaves the previous checkpoints and at most a hidden partial folder. A write error (a full
    disk) removes the partial folder and stops the run with EXIT_WRITE_FAILED. Each phase ends with the processes
    agreeing on success, so they all publish or all stop and none waits forever at a later collective.
    """
    accelerator = run.accelerator
    final, staging = run.output_dir / name, run.output_dir / f".{name}.tmp"
    error = _attempt(_fresh_folder, staging) if accelerator.is_main_process else None
    error = _agree(accelerator, error)
    if error is None:
        error = _agree(accelerator, _attempt(accelerator.save_state, str(staging / "accelerate_state")))
    if error is None:
        state_dict = accelerator.get_state_dict(run.model)  # every process takes part under FSDP
        error = _agree(accelerator, _attempt(_write_model_and_state, run, staging, state_dict, name, write_extra))
    if error is None and accelerator.is_main_process:
        error = _attempt(publish, staging, final, final.with_name(f".{final.name}.old"))
    error = _agree(accelerator, error)
    if error is not None:
        # Measured before the partial copy goes: torch's own message for a full disk does not say so.
        free = shutil.disk_usage(run.output_dir).free
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        last = f"the last complete checkpoint is {run.last_checkpoint}" if run.last_checkpoint else \
            "there is no earlier checkpoint"
        cause = " ".join(str(error).split()) or type(error).__name__
        run.stop(EXIT_WRITE_FAILED, f"error: could not write checkpoint {final} ({cause}; {human_bytes(free)} "
                                         f"free there); the partial copy was removed and {last}; free space or fix "
                                         f"training_args.output_dir, then rerun with "
                                         f"training_args.resume_from_checkpoint=latest")
    if name.startswith("step_"):
        run.last_checkpoint = final
        if accelerator.is_main_process:
            prune_checkpoints(run.output_dir, run.spec.extra.keep_last_checkpoints,
                              protected=(final, run.resumed_from))
    accelerator.wait_for_everyone()
    return final


def _attempt(function, *args):
    """Run a write; return the error it raised (a full disk, a folder gone read-only), or None.

    Not only OSError: torch.save reports a full disk as a RuntimeError and safetensors as a SafetensorError.
    """
    from safetensors import SafetensorError

    try:
        function(*args)
    except (OSError, RuntimeError, SafetensorError) as error:
        return error
    return None


def _agree(accelerator, error):
    """This process's error, or one standing for another process's, so every process takes the same branch."""
    if accelerator.num_processes == 1:
        return error
    import torch

    failed = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device), reduction="max")
    if error is None and failed.item():
        return OSError("a write failed on another process")
    return error


def _fresh_folder(folder: Path):
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _write_model_and_state(run: Run, staging: Path, state_dict, name: str, write_extra=None):
    from pretrain.tokenizer.files import special_tokens_of, write_tokenizer_files

    accelerator = run.accelerator
    if accelerator.is_main_process:
        # Main process only: on the others save_pretrained would recreate the staging folder after its rename.
        accelerator.unwrap_model(run.model).save_pretrained(staging, state_dict=state_dict)
        # Not save_pretrained: transformers 5 writes a tokenizer class and loader arguments that 4.x cannot read.
        write_tokenizer_files(staging, run.tokenizer.backend_tokenizer.to_str(), special_tokens_of(run.tokenizer),
                              model_max_length=run.spec.data.block_size)
        (staging / "spec.yaml").write_text(run.spec.to_yaml(), encoding="utf-8")
        if run.energy is not None:
            run.energy.copy_into(staging)
        if write_extra is not None:  # files of this checkpoint only (the final one's model card), published with it
            write_extra(staging)
        state = dict(run.state.__dict__, name=name, tokens_per_step=run.tokens_per_step)
        # Written last: latest_checkpoint() also asks for it, so a folder copied by hand half-way is not taken.
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
