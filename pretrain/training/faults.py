"""A training run that survives preemption and diverging losses: stop signals, step verdicts, skips, rollbacks.

    signals = StopSignals()                                  # SIGTERM/SIGINT: finish the step, checkpoint, exit 75
    verdict = agree_on_step(accelerator, step_loss, grad_norm, signals.received is not None)
    if verdict.apply_update: optimizer.step()                # a non-finite loss or gradient never reaches the weights
    if not verdict.finite: skip_step(run, write_metrics)    # counts it; rolls back or stops past the limits

The exit statuses are in errors.py.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

from pretrain.errors import EXIT_DIVERGED, EXIT_PREEMPTED
from pretrain.training.checkpoints import read_train_state, save_checkpoint, truncate_metrics
from pretrain.training.state import Run


class StepVerdict(NamedTuple):
    finite: bool          # the loss and gradient norm of this optimizer step are finite on every process
    apply_update: bool    # call optimizer.step()
    stop: bool            # some process received a stop signal: checkpoint and exit after this step


class StopSignals:
    """The first SIGTERM or SIGINT asks the run to checkpoint and stop after the current optimizer step; a second
    ends the process at once, by that signal. A save it cuts short stays under its hidden name."""

    def __init__(self):
        self.received = None
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Put back the handlers that were there before, so code after the loop gets Ctrl-C as usual."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        if self.received is not None:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = signal.Signals(number).name
        # os.write, not print: printing from a handler while the main code prints raises a reentrancy error.
        os.write(2, f"\n{self.received} received: saving a checkpoint after this optimizer step, then stopping "
                    f"(send it again to stop at once without saving)\n".encode())


def stop_for_signal(run: Run, signals: StopSignals):
    """Save step_N (unless the last checkpoint already holds this very state) and exit with EXIT_PREEMPTED."""
    state, folder = run.state, run.last_checkpoint
    saved = read_train_state(folder) if folder is not None else None
    if saved is None or (saved.step, saved.samples_consumed) != (state.step, state.samples_consumed):
        folder = save_checkpoint(run, f"step_{state.step}")
    cause = signals.received or "a stop signal sent to another process"
    run.stop(EXIT_PREEMPTED, f"stopped by {cause} after step {state.step}; checkpoint: {folder}; to continue, "
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


def skip_step(run: Run, log) -> bool:
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


def roll_back(run: Run, log):
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
        run.stop(EXIT_DIVERGED, f"error: {what} and there is no checkpoint to roll back to; lower "
                                     f"training_args.learning_rate or raise warmup_steps, and set "
                                     f"extra_args.checkpointing_steps so a run can roll back")
    if state.rollbacks >= t.max_rollbacks:
        run.stop(EXIT_DIVERGED, f"error: {what} after {state.rollbacks} rollback(s), the most "
                                     f"training_args.max_rollbacks allows; the last good checkpoint is {target}; "
                                     f"lower training_args.learning_rate or raise warmup_steps and resume from it")
    from_step, position = state.step, state.samples_consumed
    accelerator.load_state(str(target / "accelerate_state"))
    restored = read_train_state(target)
    samples_skipped = (from_step - restored.step) * run.tokens_per_step // run.spec.data.block_size
    restored.samples_consumed, restored.skipped_steps = position, state.skipped_steps
    restored.source_samples = state.source_samples
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
