"""pre-training.py with `training_args.optimizer: muon`: it trains, checkpoints and resumes exactly on one process and
on two; a launch under FSDP is refused before anything is written; and the optimizer benchmark's smoke run.

The runs are independent, so a module fixture starts them at once.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.helpers.runs import OFFLINE_ENV, REPO, TINY_MODEL, launch_command

TINY = [*TINY_MODEL, "training_args.optimizer=muon", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=3", "training_args.do_eval=false", "extra_args.sample_every=null",
        "extra_args.wandb_log_steps=2", "training_args.max_steps=12", "extra_args.checkpointing_steps=6"]
COMPARED = ("step", "tokens_seen", "loss", "learning_rate", "grad_norm")
TIMEOUT_S = 600


def launch(ctx, name, *overrides, processes=1, output_dir=None, env=None):
    output_dir = output_dir or ctx.root / name
    args = ["--spec-file", "specs-tiny.yaml", *TINY, f"model_args.tokenizer_name={ctx.tokenizer}",
            f"data_args.folder_path={ctx.data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={4 // processes}", *overrides]
    command = launch_command(REPO / "pre-training.py", args, processes)
    full_env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
                "HF_HOME": str(ctx.root / "hf"), **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return SimpleNamespace(returncode=result.returncode, output=result.stdout + result.stderr, output_dir=output_dir)


def resumed(ctx, reference, processes):
    """The reference's folder as it was at step 6, resumed from step_6 to the end."""
    copy = ctx.root / f"{reference.output_dir.name}-resumed"
    shutil.copytree(reference.output_dir, copy)
    shutil.rmtree(copy / "final-checkpoint")
    return launch(ctx, copy.name, f"training_args.resume_from_checkpoint={copy / 'step_6'}", processes=processes,
                  output_dir=copy)


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(output_dir):
    return [{key: r[key] for key in COMPARED} for r in records(output_dir) if "loss" in r]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_tokenizer, sample_tokenized):
    ctx = SimpleNamespace(root=tmp_path_factory.mktemp("muon"), tokenizer=sample_tokenizer, data=sample_tokenized)
    with ThreadPoolExecutor(3) as pool:
        one = pool.submit(launch, ctx, "one")
        two = pool.submit(launch, ctx, "two", processes=2)
        fsdp = pool.submit(launch, ctx, "fsdp", env={"ACCELERATE_USE_FSDP": "true"})
        one_resumed = pool.submit(lambda: resumed(ctx, one.result(), 1))
        two_resumed = pool.submit(lambda: resumed(ctx, two.result(), 2))
        yield SimpleNamespace(one=one.result(), two=two.result(), fsdp=fsdp.result(), one_resumed=one_resumed.result(),
                              two_resumed=two_resumed.result())


@pytest.mark.parametrize("processes", [1, 2])
def test_muon_trains_checkpoints_and_resumes_exactly(runs, processes):
    reference, resumed_run = (runs.one, runs.one_resumed) if processes == 1 else (runs.two, runs.two_resumed)
    assert reference.returncode == 0, reference.output[-4000:]
    assert resumed_run.returncode == 0, resumed_run.output[-4000:]
    losses = [r["loss"] for r in train_records(reference.output_dir)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # it learns
    assert "at step 6" in resumed_run.output
    assert train_records(resumed_run.output_dir) == train_records(reference.output_dir)
    final, expected = (weights(run.output_dir / "final-checkpoint") for run in (resumed_run, reference))
    assert all((final[name] == expected[name]).all() for name in expected)


def test_one_and_two_processes_train_the_same_muon_run_up_to_rounding(runs):
    one, two = train_records(runs.one.output_dir), train_records(runs.two.output_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4, 6, 8, 10, 12]
    for mine, theirs in zip(two, one):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_muon_under_fsdp_is_refused_before_anything_is_written(runs):
    fsdp = runs.fsdp
    assert fsdp.returncode == 2, fsdp.output[-3000:]
    assert ("training_args.optimizer 'muon' is not supported under FSDP: Muon needs each weight matrix whole on the "
            "process that updates it; launch without the FSDP config (data parallel) or set "
            "training_args.optimizer=adamw") in fsdp.output
    assert "Traceback" not in fsdp.output and not fsdp.output_dir.exists()


def test_the_optimizer_benchmark_smoke_run_compares_both(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "Utilities" / "benchmark.py"), "optimizer", "--smoke",
                             "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, **OFFLINE_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    runs_, summary = lines[:2], lines[2:]
    assert [(r["optimizer"], r["learning_rate"], r["tokens"]) for r in runs_] == [("adamw", 0.003, 1536),
                                                                                   ("muon", 0.003, 1536)]
    assert all(len(r["eval_curve"]) == 2 and r["eval_curve"][-1][1] == r["final_eval_loss"] < 7 for r in runs_)
    adamw, muon = summary
    assert adamw["tokens_to_adamw_final_loss"] == 1536 and adamw["share_of_adamw_tokens"] == 1.0
    assert muon["final_eval_loss"] == runs_[1]["final_eval_loss"]
    assert "| optimizer | learning rate | final eval loss | tokens to AdamW's final loss |" in result.stdout
