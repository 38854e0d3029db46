"""Utilities/evaluate.py: checkpoints evaluated afterwards give the numbers pre-training.py logged for them."""

import csv
import json
import shutil

import pytest

from tests.helpers.runs import REPO, TINY_MODEL, run_script


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """A 4-step run (checkpoint and evaluation at step 2, final at 4), then evaluate.py over its output_dir."""
    # Imported before any test installs the fake Hub: transformers' annotations use the real HfApi class.
    import transformers  # noqa: F401

    output_dir = tmp_path_factory.mktemp("evaluated") / "out"
    run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY_MODEL,
               f"model_args.tokenizer_name={sample_tokenizer}", f"data_args.folder_path={sample_tokenized}",
               f"training_args.output_dir={output_dir}", "training_args.max_steps=4",
               "training_args.per_device_train_batch_size=4", "extra_args.checkpointing_steps=2",
               "training_args.eval_steps=2", "extra_args.sample_every=null", check=True)
    result = run_script("Utilities/evaluate.py", output_dir, "--data", sample_tokenized, "--batch-size", 3,
                        check=True)
    return output_dir, result


def logged_evals(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


def test_every_checkpoint_gets_the_perplexity_training_logged(evaluated_run):
    output_dir, result = evaluated_run
    rows = json.loads((output_dir / "evaluation.json").read_text())
    assert [(r["checkpoint"], r["step"], r["tokens_seen"]) for r in rows] == [
        ("step_2", 2, 2 * 4 * 128), ("final-checkpoint", 4, 4 * 4 * 128)]
    logged = logged_evals(output_dir)
    assert sorted(logged) == [2, 4]
    for row in rows:
        # Another batch size than training's (3, not 8): the token-weighted mean does not depend on it.
        assert row["eval_loss"] == pytest.approx(logged[row["step"]]["eval_loss"], rel=1e-5)
        assert row["perplexity"] == pytest.approx(logged[row["step"]]["perplexity"], rel=1e-5)
        assert row["eval_tokens"] == logged[row["step"]]["eval_tokens"]
        assert row["energy_kwh"] is None and row["co2_kg"] is None  # energy tracking was off
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert "| checkpoint | step | tokens seen | eval loss | perplexity |" in result.stdout
    assert f"| final-checkpoint | 4 | 2,048 | {rows[1]['eval_loss']:.4f} | {rows[1]['perplexity']:.2f} |" in \
        result.stdout


def test_results_are_written_as_csv_json_and_a_plot(evaluated_run):
    output_dir, result = evaluated_run
    with open(output_dir / "evaluation.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    rows = json.loads((output_dir / "evaluation.json").read_text())
    assert [r["checkpoint"] for r in table] == ["step_2", "final-checkpoint"]
    assert [float(r["perplexity"]) for r in table] == [r["perplexity"] for r in rows]
    assert table[0]["energy_kwh"] == ""
    assert (output_dir / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output_dir.glob(".*tmp*"))
    assert f"wrote {output_dir / 'evaluation.csv'}" in result.stdout


def test_named_folders_with_energy_and_the_card_updated(evaluated_run, sample_tokenized, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from pretrain.cli.evaluate_checkpoints import main

    output_dir, _ = evaluated_run
    final = tmp_path / "final-checkpoint"
    shutil.copytree(output_dir / "final-checkpoint", final, ignore=shutil.ignore_patterns("accelerate_state"))
    state = json.loads((final / "trainer_state.json").read_text())
    (final / "trainer_state.json").write_text(json.dumps({**state, "energy_kwh": 0.25, "co2_kg": 0.0245}))
    card_before = ModelCard.load(final / "README.md").data.to_dict()
    main([str(final), "--data", str(sample_tokenized), "--output-dir", str(tmp_path / "results"),
          "--update-card", str(final / "README.md")])
    rows = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert [(r["checkpoint"], r["energy_kwh"], r["co2_kg"]) for r in rows] == [("final-checkpoint", 0.25, 0.0245)]
    assert rows[0]["perplexity"] == pytest.approx(logged_evals(output_dir)[4]["perplexity"], rel=1e-5)
    card = ModelCard.load(final / "README.md")
    assert card.data.to_dict() == card_before
    line = (f"| final-checkpoint | 4 | 2,048 | {rows[0]['eval_loss']:.4f} | {rows[0]['perplexity']:.2f} | 0.25 "
            f"| 0.0245 |")
    assert line in card.text and line in capsys.readouterr().out
    assert "## Evaluation of the checkpoints" in card.text


def test_hub_revisions_are_downloaded_and_evaluated(evaluated_run, sample_tokenized, tmp_path, fake_hub):
    from pretrain.cli.evaluate_checkpoints import main
    from pretrain.errors import InputError

    output_dir, _ = evaluated_run
    fake_hub.repos["me/tiny"] = output_dir / "step_2"
    main(["me/tiny", "--revisions", "step-2", "main", "--data", str(sample_tokenized), "--output-dir",
          str(tmp_path / "results"), "--token", "hf_x"])
    rows = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert [r["checkpoint"] for r in rows] == ["me/tiny@step-2", "me/tiny@main"]
    assert rows[0]["perplexity"] == pytest.approx(logged_evals(output_dir)[2]["perplexity"], rel=1e-5)
    calls = fake_hub.calls_to("snapshot_download")
    assert [(c["repo_id"], c["revision"], c["token"]) for c in calls] == [("me/tiny", "step-2", "hf_x"),
                                                                          ("me/tiny", "main", "hf_x")]
    assert all(c["ignore_patterns"] == ["accelerate_state/*"] for c in calls)
    fake_hub.fail("snapshot_download", OSError("404 Revision Not Found"), revision="step-9")
    with pytest.raises(InputError, match="could not download revision 'step-9' of 'me/tiny' from the Hub "
                                         r"\(404 Revision Not Found\); check the name and --revisions"):
        main(["me/tiny", "--revisions", "step-9", "--data", str(sample_tokenized), "--output-dir",
              str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("arguments, message", [
    (["{missing}"], "checkpoint '{missing}' does not exist; give a checkpoint folder"),
    (["{data}"], "is neither a checkpoint (no config.json) nor a run's output_dir"),
    (["someone/model"], "checkpoint 'someone/model' is not a local path and the Hugging Face Hub cannot be "
                        "reached; pass a local path instead"),
    (["{run}", "--revisions", "main"], "--revisions is for a Hub repository"),
    (["{run}", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["{run}", "--update-card", "{missing}"], "is not a file; give the README.md of a checkpoint"),
    (["{run}/step_2", "--data", "{missing}"], "tokenized folder '{missing}' does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(evaluated_run, sample_tokenized, tmp_path, arguments, message):
    output_dir, _ = evaluated_run
    names = {"missing": tmp_path / "missing", "data": sample_tokenized, "run": output_dir}
    arguments = [a.format(**names) for a in arguments]
    if "--data" not in arguments:
        arguments += ["--data", str(sample_tokenized)]
    result = run_script("Utilities/evaluate.py", *arguments, "--output-dir", tmp_path / "results")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.format(**names) in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_checkpoints_without_spec_or_model_or_of_two_precisions(evaluated_run, sample_tokenized, tmp_path,
                                                               fake_hub):
    from pretrain.cli.evaluate_checkpoints import main
    from pretrain.errors import InputError

    output_dir, _ = evaluated_run
    bare = tmp_path / "bare"
    shutil.copytree(output_dir / "step_2", bare, ignore=shutil.ignore_patterns("accelerate_state", "spec.yaml"))
    main([str(bare), "--data", str(sample_tokenized), "--output-dir", str(tmp_path / "results")])
    rows = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert rows[0]["perplexity"] == pytest.approx(logged_evals(output_dir)[2]["perplexity"], rel=1e-5)
    no_manifest = tmp_path / "no-manifest"
    shutil.copytree(sample_tokenized, no_manifest, ignore=shutil.ignore_patterns("manifest.json"))
    with pytest.raises(InputError, match="has no spec.yaml and '.*no-manifest' no manifest.json"):
        main([str(bare), "--data", str(no_manifest), "--output-dir", str(tmp_path / "nothing")])
    bf16 = tmp_path / "bf16"
    shutil.copytree(output_dir / "step_2", bf16, ignore=shutil.ignore_patterns("accelerate_state"))
    spec = (bf16 / "spec.yaml").read_text()
    assert "mixed_precision: 'no'" in spec
    (bf16 / "spec.yaml").write_text(spec.replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    with pytest.raises(InputError, match=r"trained in different mixed precision \(bf16, no\)"):
        main([str(bf16), str(output_dir / "step_2"), "--data", str(sample_tokenized), "--output-dir",
              str(tmp_path / "nothing")])
    # A Hub repository that holds no model.
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    fake_hub.repos["me/notes"] = tmp_path / "not-a-model"
    with pytest.raises(InputError, match="has no readable model config"):
        main(["me/notes", "--data", str(sample_tokenized), "--output-dir", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("options, message", [
    (["--limit", "5"], "--limit is for the benchmarks of --tasks; add --tasks or drop --limit"),
    (["--include-path", "tests/harness_tasks"], "--include-path is for the benchmarks of --tasks; add --tasks"),
    (["--tasks", "tiny_pt_choice", "--limit", "0"], "--limit must be at least 1, not 0"),
    (["--tasks", "tiny_pt_choice", "--num-fewshot", "-1"], "--num-fewshot must be at least 0, not -1"),
    (["--tasks", "tiny_pt_choice,tiny_pt_choise", "--include-path", "tests/harness_tasks"],
     "unknown benchmark task 'tiny_pt_choise' (did you mean 'tiny_pt_choice'?)"),
])
def test_bad_benchmark_options_stop_before_any_work(evaluated_run, sample_tokenized, tmp_path, monkeypatch, options,
                                                    message):
    from pretrain.cli.evaluate_checkpoints import main
    from pretrain.errors import InputError

    monkeypatch.chdir(REPO)  # the tasks' data files are relative to the repository root
    output_dir, _ = evaluated_run
    with pytest.raises(InputError) as refused:
        main([str(output_dir), "--data", str(sample_tokenized), "--output-dir", str(tmp_path / "results"), *options])
    assert message in str(refused.value)
    assert not (tmp_path / "results").exists()


def test_benchmarks_need_the_checkpoints_tokenizer(evaluated_run, sample_tokenized, tmp_path, monkeypatch):
    from pretrain.cli.evaluate_checkpoints import main
    from pretrain.errors import InputError

    monkeypatch.chdir(REPO)
    output_dir, _ = evaluated_run
    bare = tmp_path / "bare"
    shutil.copytree(output_dir / "step_2", bare, ignore=shutil.ignore_patterns("accelerate_state", "tokenizer*",
                                                                              "special_tokens_map.json"))
    with pytest.raises(InputError, match="checkpoint '.*bare' has no readable tokenizer .*, which the benchmarks "
                                         "need"):
        main([str(bare), "--data", str(sample_tokenized), "--tasks", "tiny_pt_choice", "--include-path",
              "tests/harness_tasks", "--output-dir", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()
