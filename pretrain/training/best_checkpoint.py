"""The best checkpoint of a run, and stopping early once the evaluations stop improving.

    new_best = record_evaluation(run, eval_loss, "step_500")     # at every evaluation, before its checkpoint
    after_save(run, "step_500")                                  # once output_dir/step_500/ is published
    if stop_early(run): ...                                      # patience spent: finish as at max_steps

The best is the evaluation with the lowest eval loss (for a mixture, the token-weighted loss over every source's
test split, as metrics.jsonl logs it). Its weights are saved as a checkpoint at that evaluation, scheduled or not,
so that it exists whatever checkpointing_steps says: one saved only for being the best (off the schedule) is
deleted once another evaluation is better; a scheduled one then goes back to keep_last_checkpoints' care, which
never prunes the best. `output_dir/best-checkpoint.json` names it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pretrain.atomic_write import remove_whole
from pretrain.training.state import Run

BEST_MARKER = "best-checkpoint.json"


def record_evaluation(run: Run, eval_loss: float, checkpoint: str) -> bool:
    """Count one evaluation at the run's current step; True when it is a new best, whose weights `checkpoint`
    (step_N or final-checkpoint) is to hold.

    Any fall below the best makes a new best; only a fall by more than early_stopping_threshold resets the count
    of evaluations without improvement. A non-finite loss is never a best.
    """
    state = run.state
    previous = state.best_eval_loss
    new_best = math.isfinite(eval_loss) and (previous is None or eval_loss < previous)
    improved = new_best and (previous is None or eval_loss < previous - run.spec.training.early_stopping_threshold)
    state.evaluations_without_improvement = 0 if improved else state.evaluations_without_improvement + 1
    if new_best:
        if state.best_off_schedule and state.best_checkpoint not in (None, checkpoint):
            run.superseded_best = state.best_checkpoint
        state.best_step, state.best_eval_loss, state.best_checkpoint = state.step, eval_loss, checkpoint
        state.best_off_schedule = checkpoint != "final-checkpoint" and not on_schedule(run, state.step)
    return new_best


def on_schedule(run: Run, step: int) -> bool:
    every = run.spec.extra.checkpointing_steps
    return bool(every) and step % every == 0


def metrics_fields(run: Run) -> dict:
    """What an evaluation's line in metrics.jsonl says of the best so far."""
    state = run.state
    return {"best_step": state.best_step, "best_eval_loss": state.best_eval_loss,
            "evaluations_without_improvement": state.evaluations_without_improvement}


def protected(run: Run) -> list[Path]:
    """The folders keep_last_checkpoints must not prune for the best's sake."""
    return [run.output_dir / run.state.best_checkpoint] if run.state.best_checkpoint else []


def after_save(run: Run, name: str):
    """Once `name` is published: when it holds the best, name it in best-checkpoint.json and delete the off-schedule
    best it replaces; the final checkpoint names the best wherever it is (a resumed run may have found none
    better). Main process only."""
    best = run.state.best_checkpoint
    if best is None or name not in (best, "final-checkpoint"):
        return
    write_marker(run)
    if name != best:
        return
    superseded, run.superseded_best = run.superseded_best, None
    if superseded is None or superseded == name:
        return
    folder = run.output_dir / superseded
    # The folder a run resumed from stays, as pruning leaves it.
    resumed = run.resumed_from is not None and folder.resolve() == Path(run.resumed_from).resolve()
    if folder.is_dir() and not resumed:
        remove_whole(folder)


def marker(run: Run) -> dict:
    """What best-checkpoint.json holds: the step, its eval loss and perplexity, the folder, and where on the Hub."""
    state, t = run.state, run.spec.training
    record = {"step": state.best_step, "checkpoint": state.best_checkpoint, "eval_loss": state.best_eval_loss,
              "perplexity": math.exp(state.best_eval_loss)}
    if t.push_to_hub and t.hub_model_id:
        record["hub_repository"] = t.hub_model_id
        record["hub_revision"] = hub_revision(state.best_checkpoint)
    return record


def hub_revision(checkpoint: str) -> str:
    """The Hub branch a checkpoint is pushed to: step-N for step_N, main for final-checkpoint."""
    return "main" if checkpoint == "final-checkpoint" else checkpoint.replace("_", "-")


def write_marker(run: Run) -> Path:
    """Write output_dir/best-checkpoint.json whole: a reader sees the previous one or the new one, never a part."""
    path = run.output_dir / BEST_MARKER
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(marker(run), indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path


def stop_early(run: Run) -> bool:
    """True (after one line saying why) when early_stopping_patience evaluations in a row brought no improvement."""
    t, state = run.spec.training, run.state
    if t.early_stopping_patience is None or state.evaluations_without_improvement < t.early_stopping_patience:
        return False
    state.stopped_early = True
    by = f" by more than {t.early_stopping_threshold:g}" if t.early_stopping_threshold else ""
    run.accelerator.print(f"stopping early at step {state.step} of {run.max_steps}: {stopped_reason(run)}; "
                          f"the eval loss has not fallen{by} below the best, {state.best_eval_loss:.4f} at step "
                          f"{state.best_step}; finishing as at max_steps")
    return True


def stopped_reason(run: Run) -> str:
    t = run.spec.training
    return f"{run.state.evaluations_without_improvement} evaluations in a row without improvement " \
           f"(early_stopping_patience {t.early_stopping_patience})"


def summary_lines(run: Run) -> list[str]:
    """The end-of-run summary's lines about the best checkpoint and early stopping."""
    state = run.state
    lines = []
    if state.best_step is not None:
        lines.append(f"best eval loss: {state.best_eval_loss:.4f} (perplexity {math.exp(state.best_eval_loss):.2f}) "
                     f"at step {state.best_step}, in {run.output_dir / state.best_checkpoint} (named in "
                     f"{run.output_dir / BEST_MARKER})")
    if state.stopped_early:
        lines.append(f"stopped early at step {state.step} of {run.max_steps}: {stopped_reason(run)}")
    return lines
