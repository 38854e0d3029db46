"""What one training run holds: the state a checkpoint saves, and the objects the loop and its helpers share.

The loop (training.py), checkpoints (checkpoints.py) and fault handling (faults.py) all take a `Run`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import EXIT_PREEMPTED


@dataclass
class TrainState:
    """What a checkpoint must remember beyond the weights and the optimizer to continue exactly."""
    step: int = 0
    samples_consumed: int = 0        # data position; runs ahead of step x samples per step after a rollback
    source_samples: list = field(default_factory=list)  # a mixture's samples drawn from each source, in all
    tokens_seen: int = 0
    window_loss_sum: float = 0.0
    window_steps: int = 0
    recent_losses: list = field(default_factory=list)
    skipped_steps: int = 0           # optimizer steps not applied: a non-finite loss or gradient norm, or a spike
    skipped_in_a_row: int = 0
    skipped_spikes: int = 0          # the skipped steps whose loss or gradient norm was a finite spike
    # The spike window (faults.SpikeWindow): its losses and gradient norms as they lie in its ring, and how many
    # steps it has recorded, so a resumed run judges the same steps spikes.
    spike_window: list = field(default_factory=list)
    spike_window_recorded: int = 0
    rollbacks: int = 0
    # Totals of every run of this training (resumes included), all machines together; see energy.py.
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    run_seconds: float = 0.0         # wall-clock from set-up to the last update, summed over the runs
    # The evaluation with the lowest eval loss so far and the checkpoint holding its weights (best_checkpoint.py).
    best_step: int | None = None
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None   # step_N or final-checkpoint, in output_dir
    best_off_schedule: bool = False      # saved only for being the best: deleted once another is better
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    branched_from: dict | None = None  # run, checkpoint and step this training branched from (resuming.py)


@dataclass(eq=False)
class Run:
    """The objects one training run needs, passed around as one."""
    spec: object                     # specifications.Spec
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    tokenizer: object
    output_dir: Path
    hub: object                      # hub.HubPusher, or None when not pushing
    state: TrainState
    tokens_per_step: int
    samples: list = field(default_factory=list)
    # The step_N folder a rollback returns to (the newest saved or resumed from), and the one never pruned.
    last_checkpoint: Path | None = None
    resumed_from: Path | None = None
    max_steps: int = 0
    energy: object = None            # energy.EnergyMeter
    last_evaluation: dict | None = None  # the latest evaluation's result, which an early stop finishes with
    superseded_best: str | None = None   # an off-schedule best to delete once the new best is saved
    spikes: object = None            # faults.SpikeWindow, or None when spike_sigma is null

    def stop(self, status: int, message: str):
        """End the run on every process with `status`, after one message from the main process."""
        if self.accelerator.is_main_process:
            print(message, file=sys.stdout if status == EXIT_PREEMPTED else sys.stderr, flush=True)
        if self.energy is not None:
            self.energy.stop()
        self.accelerator.end_training()
        raise SystemExit(status)
