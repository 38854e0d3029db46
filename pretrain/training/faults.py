"""A training run that survives preemption and diverging losses: stop signals, step verdicts, loss and gradient
spikes, skips, rollbacks.

    signals = StopSignals()                                  # SIGTERM/SIGINT: finish the step, checkpoint, exit 75
    spikes = SpikeWindow(sigma, size, device, state)         # recent losses and gradient norms, on the device
    verdict = agree_on_step(accelerator, step_loss, grad_norm, signals.received is not None, spikes)
    apply_step(accelerator, optimizer, verdict)              # a non-finite or spiking step never reaches the weights
    if verdict.skipped: skip_step(run, write_metrics, verdict.spike)  # counts it; rolls back or stops past limits

The exit statuses are in errors.py.
"""

from __future__ import annotations

import math
import os
import signal
from typing import NamedTuple

from pretrain.errors import EXIT_DIVERGED, EXIT_PREEMPTED
from pretrain.training.checkpoints import load_resumable_state, read_train_state, save_checkpoint, truncate_metrics
from pretrain.training.state import Run, TrainState

NON_FINITE = "non-finite loss or gradient norm"


class StepVerdict(NamedTuple):
    finite: bool          # the loss and gradient norm of this optimizer step are finite on every process
    apply_update: bool    # call optimizer.step()
    stop: bool            # some process received a stop signal: checkpoint and exit after this step
    spike: dict | None = None  # a finite step skipped as a spike: the reason, the values and the limits they passed

    @property
    def skipped(self) -> bool:
        """The step counts as skipped: its loss or gradient norm was non-finite or a spike."""
        return not self.finite or self.spike is not None


class SpikeWindow:
    """The mean loss and the gradient norm of the last `size` optimizer steps whose both values were finite, on the
    device. Once it is full, a step whose loss or gradient norm is more than `sigma` standard deviations above the
    window's mean is a spike (`sigma` None: never). Spikes enter the window too, as in OLMo-core: a lasting change
    of level stops counting as a spike after a step or two instead of skipping until a rollback.
    """

    def __init__(self, sigma: float | None, size: int, device, state: TrainState):
        import torch

        self.sigma, self.size = sigma, size
        self.values = torch.zeros(2, size, device=device)
        self.recorded = 0
        self.load(state)

    def load(self, state: TrainState):
        """Take the window a checkpoint saved; one saved with another `size` is dropped and the window fills again."""
        import torch

        saved = state.spike_window
        if len(saved) == 2 and len(saved[0]) == self.size:
            self.values.copy_(torch.tensor(saved, dtype=torch.float32))
            self.recorded = state.spike_window_recorded
        else:
            self.values.zero_()
            self.recorded = 0

    def store(self, state: TrainState):
        """Copy the window into `state` for a checkpoint (a host sync, at checkpoints only)."""
        state.spike_window = self.values.tolist()
        state.spike_window_recorded = self.recorded

    def limits(self):
        """The loss and gradient norm above which a step is a spike, as a device tensor (infinite until full)."""
        import torch

        if self.sigma is None or self.recorded < self.size:
            return torch.full((2,), math.inf, device=self.values.device)
        std, mean = torch.std_mean(self.values, dim=1)
        return mean + self.sigma * std

    def record(self, values):
        """Add a step's (loss, gradient norm) device tensor, in place of the oldest: no host sync."""
        self.values[:, self.recorded % self.size] = values
        self.recorded += 1


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


def agree_on_step(accelerator, step_loss, grad_norm, stop_requested: bool, spikes: SpikeWindow | None = None
                  ) -> StepVerdict:
    """Whether this optimizer step is finite, whether it is a spike (`step_loss`: this process's mean loss of the
    step, judged as the mean over the processes) and whether to stop after it, the same answer on every process;
    records the step in `spikes`.

    One all-reduce carries the flags and the loss, and reading the verdict is the one host-device sync per
    optimizer step (see fit() for why that is the choice). Under fp16 a GradScaler already skips steps whose
    gradients overflow, and must see every step to tune its scale: a non-finite gradient norm is left to it, and
    only a non-finite loss counts as a skipped step (the optimizer steps all the same).
    """
    import torch

    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor, which collectives refuse
        grad_norm = grad_norm.full_tensor()
    loss = step_loss.detach().float().reshape(())
    norm = grad_norm.detach().float().reshape(()) if grad_norm is not None else torch.zeros_like(loss)
    # Summed over the processes, a flag above 0 means "on some process" and the losses add up to their mean's n.
    shared = torch.stack([loss, (~torch.isfinite(loss)).float(), (~torch.isfinite(norm)).float(),
                          torch.full_like(loss, float(stop_requested))])  # a fill, not a copy from the host
    if accelerator.num_processes > 1:
        shared = accelerator.reduce(shared, reduction="sum")
    values = torch.stack([shared[0] / accelerator.num_processes, norm])
    limits = spikes.limits() if spikes is not None else torch.full_like(values, math.inf)
    spiking = (torch.isfinite(values) & (values > limits)).float()
    readout = torch.cat([shared[1:], spiking, values, limits]).tolist()  # the step's one host sync
    bad_loss, bad_norm, stop, loss_spike, norm_spike, step_loss_value, norm_value, loss_limit, norm_limit = readout
    judge_norm = grad_norm is not None and accelerator.scaler is None
    finite = not bad_loss and not (bad_norm and judge_norm)
    spike = None
    if finite and (loss_spike or (norm_spike and judge_norm)):
        spike = {"reason": " and ".join(name for name, flag in (("loss", loss_spike), ("gradient norm", norm_spike))
                                        if flag) + " spike",
                 "step_loss": step_loss_value, "loss_limit": loss_limit}
        if grad_norm is not None:
            spike.update(step_grad_norm=norm_value, grad_norm_limit=norm_limit)
    if spikes is not None and not bad_loss and not bad_norm:
        spikes.record(values)
    return StepVerdict(finite=finite, apply_update=spike is None and (finite or accelerator.scaler is not None),
                       stop=bool(stop), spike=spike)


def apply_step(accelerator, optimizer, verdict: StepVerdict):
    """Step the optimizer if the verdict says so, then clear the gradients."""
    if verdict.apply_update:
        optimizer.step()
    elif accelerator.scaler is not None:
        # Clipping unscaled this step's gradients: the scaler must end the step before it may unscale the next.
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def skip_step(run: Run, log, spike: dict | None = None) -> bool:
    """Count an optimizer step that was not applied (`spike`: the verdict's, for a finite spike; None: a non-finite
    step); after `max_skipped_steps` in a row, roll back (or stop).

    `log(run, record)` writes a metrics record of each event. Returns whether the run rolled back.
    """
    state = run.state
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    reason, detail = NON_FINITE, ""
    if spike is not None:
        state.skipped_spikes += 1
        reason = spike["reason"]
        detail = "".join(f", {name} {spike[value]:.4g} above {spike[limit]:.4g}"
                         for name, value, limit in (("loss", "step_loss", "loss_limit"),
                                                    ("gradient norm", "step_grad_norm", "grad_norm_limit"))
                         if spike.get(value, -math.inf) > spike.get(limit, math.inf))
    run.accelerator.print(f"step {state.step}: {reason}{detail}; update skipped "
                          f"({state.skipped_in_a_row} in a row, {state.skipped_steps} in all)")
    log(run, {"step": state.step, "tokens_seen": state.tokens_seen, "event": "skipped_step", "reason": reason,
              **{k: v for k, v in (spike or {}).items() if k != "reason"},
              "skipped_steps": state.skipped_steps, "skipped_in_a_row": state.skipped_in_a_row})
    if state.skipped_in_a_row < run.spec.training.max_skipped_steps:
        return False
    roll_back(run, log, reason)
    return True


def roll_back(run: Run, log, reason: str = NON_FINITE):
    """Reload the last checkpoint's weights, optimizer, schedule and random state, keeping the data position.

    The batches consumed since that checkpoint are not replayed, so the ones that made the loss diverge are
    skipped. The metrics logged after the checkpoint are dropped, as when resuming.
    """
    state, t, accelerator = run.state, run.spec.training, run.accelerator
    target = run.last_checkpoint
    what = f"training diverged: {state.skipped_in_a_row} optimizer steps in a row had a {reason} (up to step " \
           f"{state.step})"
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
    load_resumable_state(accelerator, run.model, run.optimizer, run.scheduler, target / "accelerate_state")
    restored = read_train_state(target)
    samples_skipped = (from_step - restored.step) * run.tokens_per_step // run.spec.data.block_size
    restored.samples_consumed, restored.skipped_steps = position, state.skipped_steps
    restored.source_samples = state.source_samples
    restored.rollbacks, restored.skipped_in_a_row = state.rollbacks + 1, 0
    state.__dict__.update(restored.__dict__)
    if run.spikes is not None:
        run.spikes.load(state)
    if accelerator.is_main_process:
        truncate_metrics(run.output_dir / "metrics.jsonl", state.step)
    accelerator.print(f"rolled back from step {from_step} to {target} (step {state.step}), rollback {state.rollbacks} "
                      f"of at most {t.max_rollbacks}; the {samples_skipped} samples of steps {state.step + 1}-"
                      f"{from_step} are not replayed: training goes on from sample {position}")
    log(run, {"step": state.step, "tokens_seen": state.tokens_seen, "event": "rollback",
              "rolled_back_from_step": from_step, "rolled_back_to": target.name, "samples_skipped": samples_skipped,
              "data_position": position, "rollbacks": state.rollbacks, "skipped_steps": state.skipped_steps})
