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
    skipped_steps: int = 0           # optimizer steps whose non-finite loss or gradient was not applied
    skipped_in_a_row: int = 0
    rollbacks: int = 0
    # Totals of every run of this training (resumes included), all machines together; see energy.py.
    energy_kwh: float = 0.0
    co2_kg: float = 0.0
    run_seconds: float = 0.0         # wall-clock from set-up to the last update, summed over the runs


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

    def stop(self, status: int, message: str):
        """End the run on every process with `status`, after one message from the main process."""
        if self.accelerator.is_main_process:
            print(message, file=sys.stdout if status == EXIT_PREEMPTED else sys.stderr, flush=True)
        if self.energy is not None:
            self.energy.stop()
        self.accelerator.end_training()
        raise SystemExit(status)
