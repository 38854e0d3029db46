"""pre-training.py on a mixture of two tokenized folders with document attention: per-source shares at every step,
per-source evaluation, an exact resume, two processes equal to one, and the refusals."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from test_distributed import TINY, assert_same_training, records, two_processes

from tests.helpers.runs import OFFLINE_ENV, REPO, SAMPLE, TEST_BLOCK_SIZE, run_script

WEIGHTS = {"web": 2, "books": 1}
MICRO_BATCH = 4                    # one process; two processes take 2 each
STEPS = [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """web: the tokenized sample; books: the sample again, another seed, nearly all of it test, so that its train
    split is small and repeats. Each source is named for its folder."""
    root = tmp_path_factory.mktemp("sources")
    web, books = root / "web", root / "books"
    shutil.copytree(sample_tokenized, web)
    run_script("Utilities/tokenize-dataset.py", "--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer,
               "--block-size", TEST_BLOCK_SIZE, "--test-size", 0.95, "--seed", 7, "--output-dir", books, check=True)
    return {"web": web, "books": books}


def mixture_overrides(folders, weights=WEIGHTS):
    pairs = ", ".join(f"{folders[name]}: {weight}" for name, weight in weights.items())
    return [f"data_args.mixture={{{pairs}}}", "data_args.document_attention=true"]


def run_one_process(tokenizer, folders, output_dir, *overrides):
    from test_distributed import script_args

    args = script_args(tokenizer, folders["web"], output_dir, MICRO_BATCH, *mixture_overrides(folders), *overrides)
    return subprocess.run([sys.executable, "pre-training.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1"), timeout=300)


@pytest.fixture(scope="module")
def single(tmp_path_factory, sample_tokenizer, folders):
    output_dir = tmp_path_factory.mktemp("mixture-single") / "out"
    result = run_one_process(sample_tokenizer, folders, output_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def manifest_blocks(folder, split="train"):
    return json.loads((folder / "manifest.json").read_text())["splits"][split]["blocks"]


def test_each_source_keeps_its_share_at_every_step_and_is_evaluated_apart(single, folders):
    train = [r for r in records(single) if "loss" in r]
    assert [r["step"] for r in train] == STEPS
    per_step = MICRO_BATCH * 2 * TEST_BLOCK_SIZE                # gradient_accumulation_steps=2
    for record in train:
        assert record["tokens_seen"] == record["step"] * per_step
        assert record["tokens_seen/web"] + record["tokens_seen/books"] == record["tokens_seen"]
        for name, weight in WEIGHTS.items():
            share = weight / sum(WEIGHTS.values()) * record["tokens_seen"]
            # Within one micro-batch's tokens of its weight (the schedule keeps it within one block).
            assert abs(record[f"tokens_seen/{name}"] - share) <= TEST_BLOCK_SIZE, (record["step"], name)
            blocks = record[f"tokens_seen/{name}"] / TEST_BLOCK_SIZE
            assert record[f"passes/{name}"] == pytest.approx(blocks / manifest_blocks(folders[name]))
    assert train[-1]["passes/books"] > 1 > train[-1]["passes/web"]   # the small source went round again
    evals = [r for r in records(single) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for record in evals:
        tokens = {name: record[f"eval_tokens/{name}"] for name in WEIGHTS}
        assert record["eval_tokens"] == sum(tokens.values())
        total = sum(record[f"eval_loss/{name}"] * tokens[name] for name in WEIGHTS) / record["eval_tokens"]
        assert record["eval_loss"] == pytest.approx(total, rel=1e-12)
        assert record["perplexity/books"] == pytest.approx(math.exp(record["eval_loss/books"]))
        # With documents apart, a document's first token is not a target: fewer than the blocks' 127 per row.
        for name in WEIGHTS:
            assert tokens[name] < manifest_blocks(folders[name], "test") * (TEST_BLOCK_SIZE - 1)
    state = json.loads((single / "final-checkpoint" / "trainer_state.json").read_text())
    assert sum(state["source_samples"]) == state["samples_consumed"] == 6 * MICRO_BATCH * 2


def test_two_processes_draw_the_same_mixture_as_one(single, sample_tokenizer, folders, tmp_path):
    output_dir = tmp_path / "out"
    two_processes(sample_tokenizer, folders["web"], output_dir, tmp_path, *mixture_overrides(folders))
    assert_same_training(output_dir, single)
    for got, expected in zip(records(output_dir), records(single)):
        for key in [k for k in expected if "/" in k]:
            assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_a_resumed_mixture_run_repeats_the_uninterrupted_one(single, sample_tokenizer, folders, tmp_path):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(single / "step_3", resumed / "step_3")
    result = run_one_process(sample_tokenizer, folders, resumed, "training_args.resume_from_checkpoint=latest")
    assert result.returncode == 0, result.stderr[-4000:]
    got = {r["step"]: r for r in records(resumed) if "loss" in r}
    expected = {r["step"]: r for r in records(single) if "loss" in r}
    assert sorted(got) == [4, 5, 6]
    for step in got:
        for key in ("loss", "grad_norm", "tokens_seen/web", "tokens_seen/books"):
            assert got[step][key] == expected[step][key], (step, key)
    # Resuming the mixture's checkpoint on one folder would read another stream: refused before any training.
    refused = subprocess.run([sys.executable, "pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                              f"model_args.tokenizer_name={sample_tokenizer}",
                              f"data_args.folder_path={folders['web']}", f"training_args.output_dir={resumed}",
                              f"training_args.resume_from_checkpoint={single / 'step_3'}"],
                             cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **OFFLINE_ENV))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "was trained on a mixture of 2 folders but this run reads one folder" in refused.stderr


def test_a_mixture_of_folders_from_two_tokenizers_is_refused(sample_tokenizer, folders, tmp_path):
    other_tokenizer, other = tmp_path / "other-tokenizer", tmp_path / "other"
    run_script("train-sentencepiece.py", "--dataset_name", SAMPLE, "--vocab_size", 512, "--num_samples", 100000,
               "--output_dir", other_tokenizer, check=True)
    run_script("Utilities/tokenize-dataset.py", "--dataset-name", SAMPLE, "--tokenizer-name", other_tokenizer,
               "--block-size", TEST_BLOCK_SIZE, "--output-dir", other, check=True)
    output_dir = tmp_path / "never"
    result = run_one_process(sample_tokenizer, {"web": folders["web"], "books": other}, output_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert f"mixture folder '{other}' has another tokenizer (tokenizer.json sha256)" in line
    assert f"than '{folders['web']}'" in line and "re-run Utilities/tokenize-dataset.py" in line
    assert not output_dir.exists()


@pytest.mark.parametrize("launch", ["compiled", "fsdp"])
def test_document_attention_trains_alike_compiled_and_sharded(single, sample_tokenizer, folders, tmp_path, launch):
    """The throughput settings (torch.compile over the chunked loss) and FSDP see the same documents and losses."""
    from test_distributed import FSDP_ON_CPU_ENV, launch_env
    from test_throughput import TUNED

    output_dir = tmp_path / "out"
    if launch == "compiled":
        result = run_one_process(sample_tokenizer, folders, output_dir, *TUNED)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "speed: compile on, cross-entropy in chunks of 254 tokens" in result.stdout
        tolerance = 1e-4
    else:
        two_processes(sample_tokenizer, folders["web"], output_dir, tmp_path, *mixture_overrides(folders),
                      launcher=("--config_file", "fsdp_config.yaml"), env=launch_env(tmp_path, **FSDP_ON_CPU_ENV))
        tolerance = 1e-5
    got = {r["step"]: r for r in records(output_dir) if "loss" in r}
    expected = {r["step"]: r for r in records(single) if "loss" in r}
    assert sorted(got) == STEPS
    for step in STEPS:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=tolerance), step
        assert got[step]["tokens_seen/books"] == expected[step]["tokens_seen/books"]
    evals = [r["eval_loss"] for r in records(output_dir) if "eval_loss" in r]
    assert evals == pytest.approx([r["eval_loss"] for r in records(single) if "eval_loss" in r], rel=tolerance)


def test_evaluate_reads_the_document_setting_and_gives_the_runs_own_numbers(single, folders, tmp_path):
    result = run_script("Utilities/evaluate.py", single, "--data", folders["books"], "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["checkpoint"]: row for row in json.loads((tmp_path / "evaluation.json").read_text())}
    logged = {r["step"]: r for r in records(single) if "eval_loss" in r}
    assert sorted(rows) == ["final-checkpoint", "step_3"]
    for name, step in (("step_3", 3), ("final-checkpoint", 6)):
        assert rows[name]["eval_tokens"] == logged[step]["eval_tokens/books"]
        assert rows[name]["eval_loss"] == pytest.approx(logged[step]["eval_loss/books"], rel=1e-5), name
