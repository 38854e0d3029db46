"""pre-training.py with extra_args.eval_tasks: lm-evaluation-harness benchmarks at every evaluation and at the end,
the same numbers on one process and on two (FSDP on the CPU), in metrics.jsonl, the loss plot and the model card;
Utilities/evaluate.py gives the same numbers afterwards; an unknown task stops the run before anything is written."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from test_distributed import GLOBAL_MICRO_BATCH, TIMEOUT_S, eval_records, script_args, two_processes

from tests.helpers.runs import OFFLINE_ENV, REPO, run_script

TASKS = ["extra_args.eval_tasks=tiny_pt_choice,tiny_pt_text", "extra_args.eval_include_path=tests/harness_tasks"]
KEYS = ["benchmark/tiny_pt_choice/acc", "benchmark/tiny_pt_choice/acc_norm", "benchmark/tiny_pt_text/word_perplexity",
        "benchmark/tiny_pt_text/byte_perplexity", "benchmark/tiny_pt_text/bits_per_byte"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """One process, the benchmarks at steps 3 and 6 (the end)."""
    output_dir = tmp_path_factory.mktemp("single") / "out"
    args = script_args(sample_tokenizer, sample_tokenized, output_dir, GLOBAL_MICRO_BATCH, *TASKS)
    result = subprocess.run([sys.executable, "pre-training.py", *args], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1"),
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """Two processes sharding the model: the main one benchmarks a gathered copy while the other waits."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    result = two_processes(sample_tokenizer, sample_tokenized, tmp_path / "out", tmp_path, *TASKS,
                           launcher=("--config_file", "fsdp_config.yaml"))
    return tmp_path / "out", result


def test_benchmarks_are_logged_with_every_evaluation(single):
    output_dir, result = single
    evals = eval_records(output_dir)
    assert sorted(evals) == [3, 6]
    for step, record in evals.items():
        assert [key for key in record if key.startswith("benchmark/")] == KEYS, step
        assert 0 <= record["benchmark/tiny_pt_choice/acc"] <= 1 and record["benchmark/tiny_pt_text/bits_per_byte"] > 0
        assert f"step {step} benchmarks: tiny_pt_choice/acc {record['benchmark/tiny_pt_choice/acc']:.4f}, " in \
            result.stdout
    # Training moved the model: the numbers of the two evaluations differ.
    assert evals[6]["benchmark/tiny_pt_text/bits_per_byte"] != evals[3]["benchmark/tiny_pt_text/bits_per_byte"]


def test_two_processes_log_the_same_benchmarks_as_one(single, fsdp):
    (one, _), (two, result) = single, fsdp
    assert "on 2 process(es)" in result.stdout
    expected, got = eval_records(one), eval_records(two)
    assert sorted(got) == sorted(expected) == [3, 6]
    for step in expected:
        # Sharded training reaches the same weights up to float rounding; the harness scores them alike.
        assert got[step]["benchmark/tiny_pt_choice/acc"] == expected[step]["benchmark/tiny_pt_choice/acc"]
        assert got[step]["benchmark/tiny_pt_choice/acc_norm"] == expected[step]["benchmark/tiny_pt_choice/acc_norm"]
        for key in KEYS[2:]:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4), (step, key)


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_the_card_and_the_loss_plot_carry_the_benchmarks(single):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    output_dir, _ = single
    final = eval_records(output_dir)[6]
    card = ModelCard.load(output_dir / "final-checkpoint" / "README.md", ignore_metadata_errors=False)
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    benchmarks = {f"benchmark/{r.task_name}/{r.metric_type}": r.metric_value for r in results
                  if r.source_name == "lm-evaluation-harness"}
    assert benchmarks == {key: pytest.approx(final[key], abs=1e-6) for key in KEYS}
    assert f"| tiny_pt_choice | 0 | 12 | acc | {final['benchmark/tiny_pt_choice/acc']:.4f} |" in card.text
    # The losses beside one panel per benchmark metric: six panels, three to a row.
    assert png_size(output_dir / "loss.png") == (1500, 720)
    assert png_size(output_dir / "final-checkpoint" / "loss.png") == (1500, 720)


def test_evaluate_scores_the_checkpoints_as_training_did(single, sample_tokenized, tmp_path, monkeypatch, capsys):
    import csv

    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from pretrain.cli.evaluate_checkpoints import main

    output_dir, _ = single
    monkeypatch.chdir(REPO)  # the tasks' data files are relative to the repository root
    card = tmp_path / "README.md"
    shutil.copyfile(output_dir / "final-checkpoint" / "README.md", card)
    main([str(output_dir), "--data", str(sample_tokenized), "--tasks", "tiny_pt_choice", "tiny_pt_text",
          "--include-path", "tests/harness_tasks", "--output-dir", str(tmp_path / "results"), "--update-card",
          str(card)])
    rows = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    logged = eval_records(output_dir)
    assert [row["checkpoint"] for row in rows] == ["step_3", "final-checkpoint"]
    for row in rows:
        for key in KEYS:
            assert row[key] == pytest.approx(logged[row["step"]][key], rel=1e-5), (row["step"], key)
    with open(tmp_path / "results" / "evaluation.csv", newline="") as handle:
        assert csv.DictReader(handle).fieldnames[-5:] == KEYS
    out = capsys.readouterr().out
    assert "| tiny_pt_choice/acc | tiny_pt_choice/acc_norm | tiny_pt_text/word_perplexity |" in out
    assert png_size(tmp_path / "results" / "perplexity.png") == (1500, 720)
    _, results = model_index_to_eval_results(ModelCard.load(card).data.to_dict()["model-index"])
    benchmarks = [r for r in results if r.source_name == "lm-evaluation-harness"]
    assert len(benchmarks) == len(KEYS)  # replaced, not added beside the run's own
    assert {f"benchmark/{r.task_name}/{r.metric_type}": r.metric_value for r in benchmarks} == {
        key: pytest.approx(rows[-1][key], abs=1e-6) for key in KEYS}


def test_an_unknown_task_stops_the_run_before_anything_is_written(sample_tokenizer, sample_tokenized, tmp_path):
    output_dir = tmp_path / "new" / "out"
    args = script_args(sample_tokenizer, sample_tokenized, output_dir, GLOBAL_MICRO_BATCH,
                       "extra_args.eval_tasks=tiny_pt_choice,tiny_pt_txt", TASKS[1])
    result = run_script("pre-training.py", *args, timeout=TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown benchmark task 'tiny_pt_txt' (did you mean 'tiny_pt_text'?); list the harness's tasks with "
        "`lm_eval ls tasks`, name a preset (portuguese_translated, portuguese_leaderboard, portuguese), or give the "
        "folder of your own task YAML files with extra_args.eval_include_path")
    assert not (tmp_path / "new").exists()
