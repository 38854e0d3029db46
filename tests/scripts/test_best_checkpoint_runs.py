"""A small corpus read many times over: the tiny model memorises two dozen documents of the sample, its eval loss
turns up, and the run keeps and names its best checkpoint through pruning, stops early at the evaluation its
patience allows (and again at the same one after a resume), warns about the passes, and pushes and names the best
on the (fake) Hub; Utilities/evaluate.py marks the best checkpoint too.

The run goes in this process, so that the fake Hub of tests/helpers/fake_hub.py stands in for the real one; the
resumed run and the dry run are the real script.
"""

import contextlib
import io
import json
import math
import shutil
from types import SimpleNamespace

import pytest

from tests.helpers.fake_hub import install_fake_hub
from tests.helpers.runs import REPO, SAMPLE, TEST_BLOCK_SIZE, TINY_MODEL, run_script

DOCUMENTS = 24           # the first documents of the sample: a corpus small enough to memorise in a few dozen steps
PATIENCE, EVAL_STEPS, CHECKPOINT_STEPS, MAX_STEPS, BATCH = 3, 5, 10, 60, 8
# A constant rate after warm-up, so that the steps up to any point do not depend on max_steps.
OVERFIT = [*TINY_MODEL, "model_args.hidden_size=128", "model_args.intermediate_size=256",
           f"training_args.per_device_train_batch_size={BATCH}", "training_args.gradient_accumulation_steps=1",
           "training_args.learning_rate=0.01", "training_args.lr_scheduler_type=constant_with_warmup",
           "training_args.warmup_steps=5", f"training_args.max_steps={MAX_STEPS}",
           f"training_args.eval_steps={EVAL_STEPS}", f"extra_args.checkpointing_steps={CHECKPOINT_STEPS}",
           "extra_args.keep_last_checkpoints=1", "extra_args.sample_every=null", "extra_args.wandb_log_steps=5",
           "extra_args.mixed_precision=no", f"training_args.early_stopping_patience={PATIENCE}"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, sample_tokenizer):
    root = tmp_path_factory.mktemp("small")
    text = root / "small.jsonl"
    text.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:DOCUMENTS]),
                    encoding="utf-8")
    out = root / "tokenized"
    run_script("Utilities/tokenize-dataset.py", "--dataset-name", text, "--tokenizer-name", sample_tokenizer,
               "--block-size", TEST_BLOCK_SIZE, "--test-size", 0.25, "--output-dir", out, check=True)
    return out


def options(tokenizer, data, output_dir):
    return [*OVERFIT, f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
            f"training_args.output_dir={output_dir}"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, sample_tokenizer, small_corpus):
    """The overfitting run, pushing to a fake Hub, in this process."""
    import transformers  # noqa: F401  (before the fake Hub: transformers' annotations use the real HfApi class)

    from pretrain.spec.loading import load_spec
    from pretrain.training import loop

    root = tmp_path_factory.mktemp("stopped")
    output_dir = root / "out"
    spec = load_spec(REPO / "specs-tiny.yaml", [*options(sample_tokenizer, small_corpus, output_dir),
                                                "training_args.push_to_hub=true", "training_args.hub_model_id=me/tiny",
                                                "training_args.hub_token=hf_x"])
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub, undo = install_fake_hub(monkeypatch, root / "hub-cache")
        with contextlib.redirect_stdout(printed):
            run, sources, max_steps = loop.setup(spec)
            loop.fit(run, sources, max_steps)
            loop.finish(run, sources)
        undo()
    evals = [r for r in records(output_dir) if "eval_loss" in r]
    return SimpleNamespace(output_dir=output_dir, stdout=printed.getvalue(), hub=hub, evals=evals,
                           expected=expected_course([(r["step"], r["eval_loss"]) for r in evals]))


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def expected_course(evals):
    """From the logged eval losses alone: the steps that set a new best, the best, and where patience runs out."""
    best, count, new_bests, stop = math.inf, 0, [], None
    for step, loss in evals:
        if loss < best:
            best, count = loss, 0
            new_bests.append(step)
        else:
            count += 1
        if count == PATIENCE:
            stop = step
            break
    return SimpleNamespace(best_step=new_bests[-1], best_loss=best, new_bests=new_bests, stop=stop)


def state_of(folder):
    return json.loads((folder / "trainer_state.json").read_text())


def test_the_run_overfits_and_stops_at_the_evaluation_patience_allows(stopped_run):
    out, expected = stopped_run.output_dir, stopped_run.expected
    # The course the test is about: the eval loss stopped falling while the train loss kept falling.
    assert expected.stop is not None and expected.best_step < expected.stop < MAX_STEPS, stopped_run.evals
    train = [r["loss"] for r in records(out) if "loss" in r]
    assert train[-1] < min(train[:-1])
    assert [r["step"] for r in stopped_run.evals] == list(range(EVAL_STEPS, expected.stop + 1, EVAL_STEPS))
    assert (f"stopping early at step {expected.stop} of {MAX_STEPS}: {PATIENCE} evaluations in a row without "
            f"improvement (early_stopping_patience {PATIENCE}); the eval loss has not fallen below the best, "
            f"{expected.best_loss:.4f} at step {expected.best_step}; finishing as at max_steps") in stopped_run.stdout
    # Finished as at max_steps: the last steps logged, the final checkpoint at the stop, one evaluation there.
    assert max(r["step"] for r in records(out) if "loss" in r) == expected.stop
    final = state_of(out / "final-checkpoint")
    assert (final["step"], final["stopped_early"], final["evaluations_without_improvement"]) == (
        expected.stop, True, PATIENCE)
    assert (out / "loss.png").is_file()
    assert stopped_run.evals[-1]["evaluations_without_improvement"] == PATIENCE
    assert stopped_run.evals[-1]["best_step"] == expected.best_step


def test_the_best_checkpoint_is_kept_through_pruning_and_named(stopped_run):
    out, expected = stopped_run.output_dir, stopped_run.expected
    best = f"step_{expected.best_step}"
    newest = (expected.stop - 1) // CHECKPOINT_STEPS * CHECKPOINT_STEPS
    # keep_last_checkpoints=1 keeps the newest; the best stays beside it; the bests it replaced are gone.
    assert sorted({p.name for p in out.glob("step_*")}) == sorted({best, f"step_{newest}"})
    assert newest != expected.best_step
    assert json.loads((out / "best-checkpoint.json").read_text()) == {
        "step": expected.best_step, "checkpoint": best, "eval_loss": pytest.approx(expected.best_loss),
        "perplexity": pytest.approx(math.exp(expected.best_loss)), "hub_repository": "me/tiny",
        "hub_revision": f"step-{expected.best_step}"}
    assert state_of(out / best)["step"] == expected.best_step
    assert state_of(out / "final-checkpoint")["best_checkpoint"] == best
    assert (f"best eval loss: {expected.best_loss:.4f} (perplexity {math.exp(expected.best_loss):.2f}) at step "
            f"{expected.best_step}, in {out / best}") in stopped_run.stdout


def test_the_card_names_the_best_step_and_the_early_stop(stopped_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(stopped_run.output_dir / "final-checkpoint" / "README.md").text
    best = stopped_run.expected.best_step
    assert f"Best checkpoint: step {best}, with eval loss {stopped_run.expected.best_loss:.4f}" in card
    assert f'from_pretrained("me/tiny", revision="step-{best}")' in card
    assert f"- Stopped early at step {stopped_run.expected.stop}: {PATIENCE} evaluations in a row" in card


def test_the_hub_gets_every_best_and_scheduled_checkpoint_then_the_final_one(stopped_run):
    expected = stopped_run.expected
    scheduled = set(range(CHECKPOINT_STEPS, expected.stop, CHECKPOINT_STEPS))
    saved = sorted(scheduled | set(expected.new_bests))
    uploads = stopped_run.hub.calls_to("upload_folder")
    assert [c["revision"] for c in uploads] == [f"step-{step}" for step in saved] + [None]
    assert uploads[-1]["folder_path"].endswith("final-checkpoint") and "README.md" in uploads[-1]["files"]
    assert {call.token for call in stopped_run.hub.calls} == {"hf_x"}


def test_the_passes_are_counted_and_warned_about(stopped_run, small_corpus):
    blocks = json.loads((small_corpus / "manifest.json").read_text())["splits"]["train"]["blocks"]
    passes = MAX_STEPS * BATCH / blocks
    assert passes > 4
    assert (f"passes (epochs) over the train split: {passes:.2f} of its {blocks * TEST_BLOCK_SIZE:,} tokens"
            in stopped_run.stdout)
    assert (f"warning: the run reads its data more than 4 times ({passes:.1f} passes over tokenized's "
            f"{blocks * TEST_BLOCK_SIZE:,} tokens); Muennighoff et al. (2023") in stopped_run.stdout
    logged = [r for r in records(stopped_run.output_dir) if "loss" in r]
    assert logged[-1]["passes"] == pytest.approx(logged[-1]["step"] * BATCH / blocks)


def test_a_resumed_run_keeps_its_best_and_its_count(stopped_run, sample_tokenizer, small_corpus, tmp_path):
    out, expected = stopped_run.output_dir, stopped_run.expected
    newest = (expected.stop - 1) // CHECKPOINT_STEPS * CHECKPOINT_STEPS
    counted = state_of(out / f"step_{newest}")["evaluations_without_improvement"]
    assert counted >= 1          # counted afresh, the resumed run would stop later than the first did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in {f"step_{expected.best_step}", f"step_{newest}"}:
        shutil.copytree(out / name, resumed / name)
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    result = run_script("pre-training.py", "--spec-file", "specs-tiny.yaml",
                        *options(sample_tokenizer, small_corpus, resumed),
                        "training_args.resume_from_checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resumed / f'step_{newest}'} at step {newest}" in result.stdout
    assert f"stopping early at step {expected.stop} of {MAX_STEPS}" in result.stdout
    again = [r for r in records(resumed) if "eval_loss" in r]
    assert [r["step"] for r in again] == [r["step"] for r in stopped_run.evals]
    assert [r["eval_loss"] for r in again] == pytest.approx([r["eval_loss"] for r in stopped_run.evals], rel=1e-4)
    assert (resumed / f"step_{expected.best_step}").is_dir()
    marker = json.loads((resumed / "best-checkpoint.json").read_text())
    assert (marker["step"], marker["checkpoint"]) == (expected.best_step, f"step_{expected.best_step}")


def test_the_dry_run_counts_the_passes_and_stays_quiet_up_to_four(small_corpus, sample_tokenizer, tmp_path):
    blocks = json.loads((small_corpus / "manifest.json").read_text())["splits"]["train"]["blocks"]
    steps = 4 * blocks // BATCH     # at most 4 passes (the run above, past them, was warned)
    result = run_script("pre-training.py", "--spec-file", "specs-tiny.yaml",
                        *options(sample_tokenizer, small_corpus, tmp_path / "never"),
                        f"training_args.max_steps={steps}", "--dry-run", check=True)
    assert (f"passes (epochs) over the train split: {steps * BATCH / blocks:.2f} of its "
            f"{blocks * TEST_BLOCK_SIZE:,} tokens") in result.stdout
    assert "warning: the run reads its data more than 4 times" not in result.stdout
    assert not (tmp_path / "never").exists()


def test_evaluate_marks_the_best_checkpoint(stopped_run, small_corpus, tmp_path, capsys):
    from pretrain.cli.evaluate_checkpoints import main

    main([str(stopped_run.output_dir), "--data", str(small_corpus), "--output-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "evaluation.json").read_text())
    lowest = min(rows, key=lambda row: row["eval_loss"])
    assert [row["best"] for row in rows] == [row is lowest for row in rows]
    assert lowest["checkpoint"] == f"step_{stopped_run.expected.best_step}"
    table = capsys.readouterr().out
    assert table.splitlines()[0].endswith("| best |")
    assert [line.endswith("| yes |") for line in table.splitlines()[2:2 + len(rows)]] == [row["best"] for row in rows]
    assert (tmp_path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
