"""Checkpoints that are always whole, and a training run that survives preemption, full disks and diverging losses.

pre-training.py uses it; it is not run on its own:

    signals = StopSignals()                                  # SIGTERM/SIGINT: finish the step, checkpoint, exit 75
    verdict = agree_on_step(accelerator, step_loss, grad_norm, signals.received is not None)
    if verdict.apply_update: optimizer.step()                # a non-finite loss or gradient never reaches the weights
    if not verdict.finite: skip_step(run, write_metrics)    # counts it; rolls back or stops past the limits
    save_checkpoint(run, "step_100")                         # hidden folder, renamed into place when complete

Exit statuses of pre-training.py (listed in the README too): 0 done; 2 bad input, an output_dir that cannot be
written or cannot hold one checkpoint; 3 the loss kept diverging; 74 a checkpoint could not be written (disk
full, ...); 75 stopped by SIGTERM/SIGINT after saving a checkpoint: rerun with `resume_from_checkpoint: latest`.
A second signal ends the process at once by that signal (a shell shows 143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common import InputError

EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 74   # EX_IOERR in sysexits.h
EXIT_PREEMPTED = 75      # EX_TEMPFAIL in sysexits.h: try again later, which is what resuming does
# A checkpoint holds the fp32 weights twice (accelerate_state/ and the Hugging Face model.safetensors) and AdamW's
# two fp32 moments: 4 + 4 + 8 bytes per parameter; the tokenizer and the small JSON files are noise beside them.
CHECKPOINT_BYTES_PER_PARAMETER = 16
LEFTOVER = re.compile(r"\.(step_\d+|final-checkpoint)\.(tmp|old|deleting)")


@dataclass
class TrainState:
    """What a checkpoint must remember beyond the weights and the optimizer to continue exactly."""
    step: int = 0
    samples_consumed: int = 0        # data position; runs ahead of step x samples per step after a rollback
    tokens_seen: int = 0
    window_loss_sum: float = 0.0
    window_steps: int = 0
    recent_losses: list = field(default_factory=list)
    skipped_steps: int = 0           # optimizer steps whose non-finite loss or gradient was not applied
    skipped_in_a_row: int = 0
    rollbacks: int = 0


class StepVerdict(NamedTuple):
    finite: bool          # the loss and gradient norm of this optimizer step are finite on every process
    apply_update: bool    # call optimizer.step()
    stop: bool            # some process received a stop signal: checkpoint and exit after this step


# ----------------------------------------------------------------------------------------------------------------
# Finding and reading checkpoints

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


# ----------------------------------------------------------------------------------------------------------------
# Disk space and leftovers

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


# ----------------------------------------------------------------------------------------------------------------
# Saving

def save_checkpoint(run, name: str) -> Path:
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
        error = _agree(accelerator, _attempt(_write_model_and_state, run, staging, state_dict, name))
    if error is None and accelerator.is_main_process:
        error = _attempt(_publish, staging, final)
    error = _agree(accelerator, error)
    if error is not None:
        # Measured before the partial copy goes: torch's own message for a full disk does not say so.
        free = shutil.disk_usage(run.output_dir).free
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        last = f"the last complete checkpoint is {run.last_checkpoint}" if run.last_checkpoint else \
            "there is no earlier checkpoint"
        cause = " ".join(str(error).split()) or type(error).__name__
        stop_run(run, EXIT_WRITE_FAILED, f"error: could not write checkpoint {final} ({cause}; {human_bytes(free)} "
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


def _write_model_and_state(run, staging: Path, state_dict, name: str):
    accelerator = run.accelerator
    if accelerator.is_main_process:
        # Main process only: on the others save_pretrained would recreate the staging folder after its rename.
        accelerator.unwrap_model(run.model).save_pretrained(staging, state_dict=state_dict)
        run.tokenizer.save_pretrained(staging)
        (staging / "spec.yaml").write_text(run.spec.to_yaml(), encoding="utf-8")
        state = dict(run.state.__dict__, name=name, tokens_per_step=run.tokens_per_step)
        # Written last: latest_checkpoint() also asks for it, so a folder copied by hand half-way is not taken.
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _publish(staging: Path, final: Path):
    """fsync, then rename into place: after a power cut too, a folder named `final` is whole."""
    _fsync_tree(staging)
    retired = final.with_name(f".{final.name}.old")
    if final.exists():  # a second save of the same name: final-checkpoint, or a step redone after a resume
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
    staging.rename(final)
    _fsync_path(final.parent)
    shutil.rmtree(retired, ignore_errors=True)


def _fsync_tree(folder: Path):
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path):
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def stop_run(run, status: int, message: str):
    """End the run on every process with `status`, after one message from the main process."""
    if run.accelerator.is_main_process:
        print(message, file=sys.stdout if status == EXIT_PREEMPTED else sys.stderr, flush=True)
    run.accelerator.end_training()
    raise SystemExit(status)


# ----------------------------------------------------------------------------------------------------------------
# Preemption

class StopSignals:
    """The first SIGTERM or SIGINT asks the run to checkpoint and stop after the current optimizer step; a second
    ends the process at once, by that signal. A save it cuts short stays under its hidden name."""

    def __init__(self):
        self.received = None
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        if self.received is not None:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = signal.Signals(number).name
        # os.write, not print: printing from a handler while the main code prints raises a reentrancy error.
        os.write(2, f"\n{self.received} received: saving a checkpoint after this optimizer step, then stopping "
                    f"(send it again to stop at once without saving)\n".encode())


def stop_for_signal(run, signals: StopSignals):
    """Save step_N (unless the last checkpoint already holds this very state) and exit with EXIT_PREEMPTED."""
    state, folder = run.state, run.last_checkpoint
    saved = read_train_state(folder) if folder is not None else None
    if saved is None or (saved.step, saved.samples_consumed) != (state.step, state.samples_consumed):
        folder = save_checkpoint(run, f"step_{state.step}")
    cause = signals.received or "a stop signal sent to another process"
    stop_run(run, EXIT_PREEMPTED, f"stopped by {cause} after step {state.step}; checkpoint: {folder}; to continue, "
                                  f"rerun the same command with training_args.resume_from_checkpoint=latest")


def agree_on_step(accelerator, step_loss, grad_norm, stop_requested: bool) -> StepVerdict:
    """Whether this optimizer step is finite and whether to stop after it, the same answer on every process.

    Reading the flags is one host-device sync per optimizer step (see fit() for why that is the choice). Under
    fp16 a GradScaler already skips steps whose gradients overflow, and must see every step to tune its scale:
    the optimizer always steps and only a non-finite loss counts as a skipped step.
    """
    import torch

    finite = torch.isfinite(step_loss)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor, which collectives refuse
        grad_norm = grad_norm.full_tensor()
    if grad_norm is not None and accelerator.scaler is None:
        finite = finite & torch.isfinite(grad_norm)
    flags = torch.stack([(~finite).float(), finite.new_tensor(float(stop_requested), dtype=torch.float32)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="max")
    nonfinite, stop = flags.tolist()
    return StepVerdict(finite=not nonfinite, apply_update=not nonfinite or accelerator.scaler is not None,
                       stop=bool(stop))


# ----------------------------------------------------------------------------------------------------------------
# Divergence

def skip_step(run, log) -> bool:
    """Count an optimizer step that was not applied; after `max_skipped_steps` in a row, roll back (or stop).

    `log(run, record)` writes a metrics record of each event. Returns whether the run rolled back.
    """
    state = run.state
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    run.accelerator.print(f"step {state.step}: non-finite loss or gradient norm; update skipped "
                          f"({state.skipped_in_a_row} in a row, {state.skipped_steps} in all)")
    log(run, {"step": state.step, "tokens_seen": state.tokens_seen, "event": "skipped_step",
              "skipped_steps": state.skipped_steps, "skipped_in_a_row": state.skipped_in_a_row})
    if state.skipped_in_a_row < run.spec.training.max_skipped_steps:
        return False
    roll_back(run, log)
    return True


def roll_back(run, log):
    """Reload the last checkpoint's weights, optimizer, schedule and random state, keeping the data position.

    The batches consumed since that checkpoint are not replayed, so the ones that made the loss diverge are
    skipped. The metrics logged after the checkpoint are dropped, as when resuming.
    """
    state, t, accelerator = run.state, run.spec.training, run.accelerator
    target = run.last_checkpoint
    what = (f"training diverged: {state.skipped_in_a_row} optimizer steps in a row had a non-finite loss or "
            f"gradient norm (up to step {state.step})")
    if target is None or state.rollbacks >= t.max_rollbacks:
        log(run, {"step": state.step, "tokens_seen": state.tokens_seen, "event": "diverged",
                  "skipped_steps": state.skipped_steps, "rollbacks": state.rollbacks})
    if target is None:
        stop_run(run, EXIT_DIVERGED, f"error: {what} and there is no checkpoint to roll back to; lower "
                                     f"training_args.learning_rate or raise warmup_steps, and set "
                                     f"extra_args.checkpointing_steps so a run can roll back")
    if state.rollbacks >= t.max_rollbacks:
        stop_run(run, EXIT_DIVERGED, f"error: {what} after {state.rollbacks} rollback(s), the most "
                                     f"training_args.max_rollbacks allows; the last good checkpoint is {target}; "
                                     f"lower training_args.learning_rate or raise warmup_steps and resume from it")
    from_step, position = state.step, state.samples_consumed
    accelerator.load_state(str(target / "accelerate_state"))
    restored = read_train_state(target)
    samples_skipped = (from_step - restored.step) * run.tokens_per_step // run.spec.data.block_size
    restored.samples_consumed, restored.skipped_steps = position, state.skipped_steps
    restored.rollbacks, restored.skipped_in_a_row = state.rollbacks + 1, 0
    state.__dict__.update(restored.__dict__)
    if accelerator.is_main_process:
        truncate_metrics(run.output_dir / "metrics.jsonl", state.step)
    accelerator.print(f"rolled back from step {from_step} to {target} (step {state.step}), rollback {state.rollbacks} "
                      f"of at most {t.max_rollbacks}; the {samples_skipped} samples of steps {state.step + 1}-"
                      f"{from_step} are not replayed: training goes on from sample {position}")
    log(run, {"step": state.step, "tokens_seen": state.tokens_seen, "event": "rollback",
              "rolled_back_from_step": from_step, "rolled_back_to": target.name, "samples_skipped": samples_skipped,
              "data_position": position, "rollbacks": state.rollbacks, "skipped_steps": state.skipped_steps})
