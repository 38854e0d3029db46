"""Checkpoints that are always whole: finding, reading, saving and pruning `output_dir/step_N/` folders.

    folder = save_checkpoint(run, "step_100")     # every process calls it; published whole or not at all
    resume_from = resolve_resume(spec, output_dir, say)
    state = read_train_state(resume_from)
    load_resumable_state(accelerator, model, optimizer, scheduler, resume_from / "accelerate_state")  # any launch

A checkpoint holds the Hugging Face model and tokenizer, the resumable state in accelerate_state/ (model and optimizer
in torch's distributed checkpoint format, scheduler, random states), the resolved spec with every secret removed, and
trainer_state.json (step, data position, losses).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path

from pretrain.atomic_write import publish, remove_whole
from pretrain.errors import EXIT_WRITE_FAILED, InputError
from pretrain.training import best_checkpoint
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
        remove_whole(folder)
    return doomed


def save_checkpoint(run: Run, name: str, write_extra=None) -> Path:
    """Write output_dir/<name>/ under a hidden name and rename it into place once complete (every process calls it).

    A kill at any moment leaves the previous checkpoints and at most a hidden partial folder. A write error (a full
    disk) removes the partial folder and stops the run with EXIT_WRITE_FAILED. Each phase ends with the processes
    agreeing on success, so they all publish or all stop and none waits forever at a later collective.
    """
    accelerator = run.accelerator
    if run.spikes is not None:  # the spike window lives on the device between checkpoints
        run.spikes.store(run.state)
    final, staging = run.output_dir / name, run.output_dir / f".{name}.tmp"
    error = _attempt(_fresh_folder, staging) if accelerator.is_main_process else None
    error = _agree(accelerator, error)
    if error is None:
        error = _agree(accelerator, _attempt(save_resumable_state, accelerator, run.model, run.optimizer,
                                             run.scheduler, staging / "accelerate_state"))
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
                              protected=(final, run.resumed_from, *best_checkpoint.protected(run)))
    if accelerator.is_main_process:
        best_checkpoint.after_save(run, name)
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


# ----------------------------------------------------------------------------------------------------------------
# The resumable state, readable under any launch
#
# accelerate's save_state writes the state in the shape of the launch that saved it (one full copy of the model and an
# optimizer state keyed by parameter position under DDP, FSDP's own shards under FSDP), and only the same kind of
# launch reads it back. Here the model and the optimizer go through torch's distributed checkpoint instead, keyed by
# each parameter's name: every process of any launch (one process, DDP or FSDP on any number of processes) asks for
# the tensors, or the slices of them, that it holds, and DCP reads them from whichever files hold them. The scheduler
# and the random states are small and saved as they are. The Hugging Face model.safetensors beside this folder stays
# the portable copy of the weights.

MODEL_AND_OPTIMIZER = "model_and_optimizer"


def save_resumable_state(accelerator, model, optimizer, scheduler, folder: Path):
    """Write the model, optimizer, scheduler and random states into `folder` (every process calls it)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = _state_dicts(model, optimizer)
    try:
        with _quiet_about_one_process():
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     checkpoint_id=str(folder / MODEL_AND_OPTIMIZER))
    except CheckpointException as error:  # a BaseException; the caller reports write errors that are OSErrors
        raise OSError(_first_failure(error)) from None
    torch.save(_random_states(), folder / f"random_states_{accelerator.process_index}.pkl")
    if accelerator.is_main_process:
        scaler = accelerator.scaler  # fp16's loss scale, tuned during the run
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                   folder / "scheduler.pt")


def load_resumable_state(accelerator, model, optimizer, scheduler, folder: Path):
    """Restore what save_resumable_state wrote, into the model and optimizer as this launch wraps and shards them."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (folder / MODEL_AND_OPTIMIZER).is_dir():
        _load_accelerate_state(accelerator, scheduler, folder)
        return
    model_state, optimizer_state = _state_dicts(model, optimizer)  # this launch's tensors, filled in place
    state = {"model": model_state, "optimizer": optimizer_state}
    with _quiet_about_one_process():
        dcp.load(state, checkpoint_id=str(folder / MODEL_AND_OPTIMIZER))
    set_state_dict(model, _torch_optimizer(optimizer), model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=_options())
    # Our own files, written by a run of this training: the pickled random states need weights_only off.
    saved = torch.load(folder / "scheduler.pt", weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    # A process the saving launch did not have starts from the main process's random state, as every process did at
    # the start of the run (one seed for all).
    mine = folder / f"random_states_{accelerator.process_index}.pkl"
    _set_random_states(torch.load(mine if mine.is_file() else folder / "random_states_0.pkl", weights_only=False))


def _load_accelerate_state(accelerator, scheduler, folder: Path):
    """A checkpoint of an earlier version of the suite, written by accelerate's save_state with the scheduler as its
    one registered object: it loads under the kind of launch that wrote it."""
    if not any(registered is scheduler for registered in accelerator._custom_objects):  # once, however many loads
        accelerator.register_for_checkpointing(scheduler)
    accelerator.load_state(str(folder))


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # A flat optimizer state ("state.<parameter>.exp_avg", "param_groups.<parameter>.lr"): every entry is named after
    # its parameter, so nothing depends on the order or grouping of parameters in the optimizer of the saving launch.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def _state_dicts(model, optimizer):
    """The model's and optimizer's state keyed by parameter name, each tensor as this process holds it (a shard under
    FSDP). On an optimizer that has not stepped yet, torch first creates its moments with a zero-rate step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, _torch_optimizer(optimizer), options=_options())


@contextlib.contextmanager
def _quiet_about_one_process():
    """Without a process group DCP warns on every call that it assumes one process, which is what a run of one
    process means: the warning would only be noise in its log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _first_failure(error) -> str:
    """The first process's own error, without the tracebacks DCP's message carries."""
    cause, _ = next(iter(error.failures.values()))
    return str(cause) or type(cause).__name__


def _random_states() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all()}


def _set_random_states(states: dict):
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    # A machine with fewer GPUs than the one that saved takes the states of those it has.
    torch.cuda.set_rng_state_all(states["cuda"][:torch.cuda.device_count()])
