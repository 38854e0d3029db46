"""pretrain/training/best_checkpoint.py and the passes of compute_plan.py without a training run: which evaluation is
the best, when patience runs out, what pruning keeps and deletes, best-checkpoint.json, the spec's refusals, the
passes and their warning."""

import json
import math
from types import SimpleNamespace

import pytest

from pretrain.export.model_card import best_lines
from pretrain.spec.fields import SpecError
from pretrain.training import best_checkpoint, checkpoints, compute_plan
from pretrain.training.state import TrainState
from specifications import load_spec
from tests.helpers.runs import REPO


def make_run(tmp_path, threshold=0.0, patience=None, checkpointing_steps=10, push=False, resumed_from=None):
    spec = SimpleNamespace(
        training=SimpleNamespace(early_stopping_threshold=threshold, early_stopping_patience=patience,
                                 push_to_hub=push, hub_model_id="me/tiny" if push else None),
        extra=SimpleNamespace(checkpointing_steps=checkpointing_steps, keep_last_checkpoints=1))
    printed = []
    accelerator = SimpleNamespace(print=printed.append)
    return SimpleNamespace(spec=spec, state=TrainState(), output_dir=tmp_path, accelerator=accelerator,
                           superseded_best=None, resumed_from=resumed_from, max_steps=100, printed=printed)


def evaluate(run, step, loss, checkpoint=None):
    run.state.step = step
    return best_checkpoint.record_evaluation(run, loss, checkpoint or f"step_{step}")


def folder(path, step):
    (path / "accelerate_state").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_the_lowest_loss_is_the_best_and_the_count_runs_until_one_falls_below_it(tmp_path):
    run = make_run(tmp_path)
    verdicts = [evaluate(run, step, loss) for step, loss in [(10, 5.0), (20, 4.5), (30, 4.6), (40, 4.5), (50, 4.4)]]
    assert verdicts == [True, True, False, False, True]
    assert (run.state.best_step, run.state.best_eval_loss, run.state.best_checkpoint) == (50, 4.4, "step_50")
    assert run.state.evaluations_without_improvement == 0
    evaluate(run, 60, math.nan)                    # a diverged evaluation is never the best
    assert run.state.best_step == 50 and run.state.evaluations_without_improvement == 1


def test_a_fall_within_the_threshold_is_a_new_best_but_not_an_improvement(tmp_path):
    run = make_run(tmp_path, threshold=0.05, patience=2)
    evaluate(run, 10, 5.0)
    assert evaluate(run, 20, 4.97) is True         # lower: kept as the best...
    assert run.state.evaluations_without_improvement == 1   # ...but by less than the threshold
    assert not best_checkpoint.stop_early(run)
    assert evaluate(run, 30, 4.90) is True and run.state.evaluations_without_improvement == 0
    evaluate(run, 40, 4.89)
    evaluate(run, 50, 4.95)
    assert run.state.evaluations_without_improvement == 2 and run.state.best_step == 40
    assert best_checkpoint.stop_early(run) and run.state.stopped_early
    assert run.printed == ["stopping early at step 50 of 100: 2 evaluations in a row without improvement "
                           "(early_stopping_patience 2); the eval loss has not fallen by more than 0.05 below the "
                           "best, 4.8900 at step 40; finishing as at max_steps"]


def test_without_patience_the_run_never_stops_early(tmp_path):
    run = make_run(tmp_path, patience=None)
    for step in range(1, 20):
        evaluate(run, step, 5.0 + step)
    assert run.state.evaluations_without_improvement == 18 and not best_checkpoint.stop_early(run)


def test_an_off_schedule_best_is_deleted_once_superseded_and_a_scheduled_one_is_left_to_pruning(tmp_path):
    run = make_run(tmp_path, checkpointing_steps=10)
    evaluate(run, 5, 5.0)
    assert run.state.best_off_schedule and run.superseded_best is None
    folder(tmp_path / "step_5", 5)
    best_checkpoint.after_save(run, "step_5")
    evaluate(run, 10, 4.0)                          # on the schedule: step_5 goes once step_10 is saved
    assert run.superseded_best == "step_5" and not run.state.best_off_schedule
    folder(tmp_path / "step_10", 10)
    best_checkpoint.after_save(run, "step_10")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10"]
    evaluate(run, 15, 3.0)                          # the scheduled step_10 is not deleted: pruning decides
    assert run.superseded_best is None
    folder(tmp_path / "step_15", 15)
    best_checkpoint.after_save(run, "step_15")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_10", "step_15"]
    assert json.loads((tmp_path / "best-checkpoint.json").read_text()) == {
        "step": 15, "checkpoint": "step_15", "eval_loss": 3.0, "perplexity": pytest.approx(math.exp(3.0))}
    assert not list(tmp_path.glob(".*"))           # no staging file left behind


def test_the_off_schedule_best_a_run_resumed_from_stays(tmp_path):
    resumed = folder(tmp_path / "step_5", 5)
    run = make_run(tmp_path, resumed_from=resumed)
    run.state.best_step, run.state.best_eval_loss, run.state.best_checkpoint = 5, 5.0, "step_5"
    run.state.best_off_schedule = True
    evaluate(run, 10, 4.0)
    folder(tmp_path / "step_10", 10)
    best_checkpoint.after_save(run, "step_10")
    assert (tmp_path / "step_5").is_dir()


def test_saving_another_checkpoint_leaves_the_marker_alone(tmp_path):
    run = make_run(tmp_path)
    evaluate(run, 10, 4.0)
    best_checkpoint.after_save(run, "step_20")      # a checkpoint that is not the best (a preemption's)
    assert not (tmp_path / "best-checkpoint.json").exists()


def test_the_marker_names_the_hub_revision_when_pushing(tmp_path):
    run = make_run(tmp_path, push=True)
    evaluate(run, 30, 4.25)
    best_checkpoint.write_marker(run)
    marker = json.loads((tmp_path / "best-checkpoint.json").read_text())
    assert (marker["hub_repository"], marker["hub_revision"]) == ("me/tiny", "step-30")
    evaluate(run, 40, 4.0, "final-checkpoint")
    assert best_checkpoint.marker(run)["hub_revision"] == "main"


def test_pruning_never_deletes_the_best(tmp_path):
    for step in (10, 20, 30, 40):
        folder(tmp_path / f"step_{step}", step)
    run = make_run(tmp_path)
    run.state.best_checkpoint = "step_20"
    deleted = checkpoints.prune_checkpoints(tmp_path, 1, protected=(tmp_path / "step_40",
                                                                    *best_checkpoint.protected(run)))
    assert sorted(p.name for p in deleted) == ["step_10", "step_30"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_20", "step_40"]


def test_the_summary_and_the_card_name_the_best(tmp_path):
    run = make_run(tmp_path, patience=3, push=True)
    evaluate(run, 20, 4.5)
    evaluate(run, 30, 4.75)
    run.state.step, run.state.stopped_early, run.state.evaluations_without_improvement = 50, True, 3
    assert best_checkpoint.summary_lines(run) == [
        f"best eval loss: 4.5000 (perplexity 90.02) at step 20, in {tmp_path / 'step_20'} (named in "
        f"{tmp_path / 'best-checkpoint.json'})",
        "stopped early at step 50 of 100: 3 evaluations in a row without improvement (early_stopping_patience 3)"]
    text = "\n".join(best_lines(run.spec, run.state))
    assert "Best checkpoint: step 20, with eval loss 4.5000 (perplexity 90.02)" in text
    assert 'from_pretrained("me/tiny", revision="step-20")' in text
    run.state.best_checkpoint = "final-checkpoint"
    assert "This is the run's best checkpoint" in "\n".join(best_lines(run.spec, run.state))
    assert best_lines(run.spec, TrainState()) == []


# ------------------------------------------------------------------------------------------------ the spec

@pytest.mark.parametrize("overrides, message", [
    (["training_args.evaluation_strategy=no"], "early_stopping_patience needs evaluations during the run"),
    (["training_args.do_eval=false"], "early_stopping_patience needs evaluations during the run"),
    (["training_args.max_steps=100", "training_args.eval_steps=100"],
     "eval_steps (100) is not below max_steps (100)"),
    (["training_args.do_train=false"], "there is no training to stop"),
])
def test_early_stopping_without_evaluations_during_the_run_is_refused(overrides, message):
    with pytest.raises(SpecError, match=r"early_stopping_patience") as error:
        load_spec(REPO / "specs-tiny.yaml", ["training_args.early_stopping_patience=3", *overrides])
    assert message in str(error.value) and len(error.value.problems) == 1


def test_early_stopping_fields_are_checked():
    spec = load_spec(REPO / "specs-tiny.yaml", ["training_args.early_stopping_patience=3",
                                                "training_args.early_stopping_threshold=0.01"])
    assert (spec.training.early_stopping_patience, spec.training.early_stopping_threshold) == (3, 0.01)
    with pytest.raises(SpecError) as error:
        load_spec(REPO / "specs-tiny.yaml", ["training_args.early_stopping_patience=0",
                                             "training_args.early_stopping_threshold=-1"])
    assert len(error.value.problems) == 2


# ------------------------------------------------------------------------------------------------ passes

def test_passes_of_one_folder_and_of_a_mixture():
    assert compute_plan.data_passes(["web"], [100], [1.0], 128, tokens=400 * 128) == {"web": (4.0, 12800)}
    assert compute_plan.data_passes(["web"], [100], [1.0], 128, tokens=None, epochs=2.5) == {"web": (2.5, 12800)}
    # A mixture draws by weight: 3/4 of 800 samples from web's 100 blocks, 1/4 from books' 20.
    passes = compute_plan.data_passes(["web", "books"], [100, 20], [3, 1], 128, tokens=800 * 128)
    assert passes == {"web": (6.0, 12800), "books": (10.0, 2560)}


def test_the_warning_starts_above_four_passes():
    assert compute_plan.passes_lines({"web": (4.0, 12800)}) == [
        "passes (epochs) over the train split: 4.00 of its 12,800 tokens"]
    lines = compute_plan.passes_lines({"web": (4.01, 12800)})
    assert len(lines) == 2 and lines[1].startswith("warning: the run reads its data more than 4 times (4.0 passes "
                                                   "over web's 12,800 tokens); Muennighoff et al. (2023")
    mixed = compute_plan.passes_lines({"web": (3.0, 12800), "books": (10.0, 2560)})
    assert mixed[0] == ("passes (epochs) over each train split: web 3.00 of 12,800 tokens, books 10.00 of 2,560 "
                        "tokens")
    assert "(10.0 passes over books's 2,560 tokens)" in mixed[1] and "web" not in mixed[1]


def test_a_spec_counts_its_passes_from_the_manifest(tmp_path, sample_tokenized):
    blocks = json.loads((sample_tokenized / "manifest.json").read_text())["splits"]["train"]["blocks"]
    spec = SimpleNamespace(data=SimpleNamespace(mixture=None, folder_path=str(sample_tokenized), sanity_check=False,
                                                block_size=128),
                           training=SimpleNamespace(num_train_epochs=1.0))
    assert compute_plan.spec_passes(spec, tokens=3 * blocks * 128) == {sample_tokenized.name: (3.0, blocks * 128)}
    spec.data.mixture = {str(sample_tokenized): 1.0, str(sample_tokenized) + "-again": 1.0}
    assert "-again' has no manifest.json" in compute_plan.spec_passes(spec, tokens=None)


def test_with_a_mixture_the_token_weighted_loss_decides(tmp_path, monkeypatch):
    from pretrain.training import loop

    # web alone is at its best at step 20, books alone at step 10; over both, weighted by tokens, at step 20.
    losses = {10: {"web": 4.0, "books": 3.0}, 20: {"web": 3.5, "books": 3.2}}
    tokens = {"web": 3000, "books": 1000}

    def evaluate_sources(run, sources):
        by_source = losses[run.state.step]
        combined = sum(by_source[n] * tokens[n] for n in tokens) / sum(tokens.values())
        return {"eval_loss": combined, "perplexity": math.exp(combined), "eval_tokens": sum(tokens.values()),
                **{f"eval_loss/{n}": by_source[n] for n in tokens}}

    written = []
    monkeypatch.setattr(loop, "evaluate_sources", evaluate_sources)
    monkeypatch.setattr(loop, "write_metrics", lambda run, record: written.append(record))
    run = make_run(tmp_path)
    run.spec.extra.eval_tasks = None
    for step in (10, 20):
        run.state.step = step
        loop.evaluate_and_log(run, [], f"step_{step}")
    assert (run.state.best_step, run.state.best_eval_loss) == (20, pytest.approx(3.425))
    assert [(r["step"], r["best_step"]) for r in written] == [(10, 10), (20, 20)]
    assert run.last_evaluation["eval_loss/books"] == 3.2


def test_the_progress_bar_shows_the_pass():
    from pretrain.training import telemetry

    record = {"loss": 2.5, "learning_rate": 3e-4, "tokens_per_second": 1000.0}
    assert "passes" not in telemetry.progress_postfix(record)
    assert telemetry.progress_postfix({**record, "passes": 3.456})["passes"] == "3.46"
    # A mixture: the split read most often.
    assert telemetry.progress_postfix({**record, "passes/web": 0.5, "passes/books": 2.25})["passes"] == "2.25"
