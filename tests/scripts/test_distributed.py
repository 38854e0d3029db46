"""pre-training.py under `accelerate launch` on the CPU (gloo): the same training whatever the process count.

One process with micro-batch 2b is the reference; two processes with micro-batch b (one launcher, two launchers as
two "machines", FSDP, a resumed run) must log the same losses, grad norms, evals and samples step for step.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests.helpers.runs import OFFLINE_ENV, REPO, TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, TINY_MODEL, free_port

TINY = [*TINY_MODEL, "training_args.per_device_eval_batch_size=8",
        "training_args.gradient_accumulation_steps=2", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=3", "training_args.max_steps=6", "training_args.eval_steps=3",
        "extra_args.checkpointing_steps=3", "extra_args.sample_every=3", "extra_args.wandb_log_steps=1"]
GLOBAL_MICRO_BATCH = 4
# FSDP launches put tests/fsdp_on_cpu/ on the processes' path: its sitecustomize lets accelerate shard on the CPU.
FSDP_ON_CPU_ENV = {"PYTHONPATH": str(REPO / "tests" / "fsdp_on_cpu")}
STEPS = [1, 2, 3, 4, 5, 6]
# The runs that compare energy across process and machine counts measure it; the others leave CodeCarbon off.
ENERGY = "extra_args.track_energy=true"
TIMEOUT_S = 300


def launch_env(tmp_path, **extra):
    # Launches run on the CPU with gloo, one thread each (two processes share two cores), with a private HF_HOME so
    # no accelerate config of this machine's user changes what the launcher does.
    env = dict(os.environ, **OFFLINE_ENV, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def script_args(tokenizer, data, output_dir, per_device_batch, *overrides):
    return ["--spec-file", "specs-tiny.yaml", *TINY, f"model_args.tokenizer_name={tokenizer}",
            f"data_args.folder_path={data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={per_device_batch}", *overrides]


def accelerate_launch(launch_options, script, args, env, log_dir):
    """Start `accelerate launch` in a session of its own, its output going to files (a pipe could fill and stall)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_options, script, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    handles = [open(log_dir / name, "w+", encoding="utf-8") for name in ("stdout", "stderr")]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handles[0], stderr=handles[1],
                               start_new_session=True)
    process.logs = handles
    return process


def read_and_close(handle) -> str:
    handle.seek(0)
    text = handle.read()
    handle.close()
    return text


def finish(*processes):
    """Wait for launches; once one fails or time runs out, end the others, which would wait for it forever."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        if any(p.returncode not in (None, 0) for p in processes):
            # A moment for the others to fail on their own and say why.
            deadline = min(deadline, time.monotonic() + 5)
        time.sleep(0.2)
    results = []
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        stdout, stderr = (read_and_close(handle) for handle in process.logs)
        results.append(SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr))
    return results


def two_processes(tokenizer, data, output_dir, tmp_path, *overrides, launcher=("--multi_gpu",), env=None):
    options = [*launcher, "--num_processes", "2", "--main_process_port", str(free_port())]
    args = script_args(tokenizer, data, output_dir, GLOBAL_MICRO_BATCH // 2, *overrides)
    env = env or launch_env(tmp_path, **FSDP_ON_CPU_ENV if "fsdp_config.yaml" in launcher else {})
    [result] = finish(accelerate_launch(options, "pre-training.py", args, env, output_dir.parent / "logs"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def records(output_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (output_dir / name).read_text().splitlines()]


def train_records(output_dir):
    return {r["step"]: r for r in records(output_dir) if "loss" in r}


def eval_records(output_dir):
    return {r["step"]: r for r in records(output_dir) if "eval_loss" in r}


def assert_same_training(got_dir, expected_dir, steps=STEPS):
    got, expected = train_records(got_dir), train_records(expected_dir)
    assert sorted(got) == steps
    for step in steps:
        assert got[step]["tokens_seen"] == expected[step]["tokens_seen"], step
        assert got[step]["learning_rate"] == pytest.approx(expected[step]["learning_rate"], rel=1e-12), step
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step
    got_evals, expected_evals = eval_records(got_dir), eval_records(expected_dir)
    assert sorted(got_evals) == [s for s in sorted(expected_evals) if s >= steps[0]]
    for step, record in got_evals.items():
        assert record["eval_tokens"] == expected_evals[step]["eval_tokens"]
        assert record["eval_loss"] == pytest.approx(expected_evals[step]["eval_loss"], rel=1e-5), step


def assert_same_weights(got_folder, expected_folder):
    from safetensors.torch import load_file

    got, expected = load_file(got_folder / "model.safetensors"), load_file(expected_folder / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        assert (got[name] - expected[name]).abs().max() < 1e-4, name


# ----------------------------------------------------------------------------------------------------------------
# The runs, each made once and shared by the tests

@pytest.fixture(scope="module")
def single(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """The reference: one process, micro-batch 4, no launcher."""
    output_dir = tmp_path_factory.mktemp("single") / "out"
    args = script_args(sample_tokenizer, sample_tokenized, output_dir, GLOBAL_MICRO_BATCH, ENERGY)
    result = subprocess.run([sys.executable, "pre-training.py", *args], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1"), timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """Two processes from one launcher, micro-batch 2 each."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    result = two_processes(sample_tokenizer, sample_tokenized, tmp_path / "out", tmp_path, ENERGY)
    return tmp_path / "out", result


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """Two processes sharding the model with fsdp_config.yaml (see tests/fsdp_on_cpu/ for why a shim)."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    result = two_processes(sample_tokenizer, sample_tokenized, tmp_path / "out", tmp_path,
                           launcher=("--config_file", "fsdp_config.yaml"))
    return tmp_path / "out", result


# ----------------------------------------------------------------------------------------------------------------
# Data parallel on one machine

def test_two_processes_train_like_one_with_twice_the_batch(single, ddp):
    output_dir, result = ddp
    assert "for 6 optimizer steps of 1,024 tokens on 2 process(es)" in result.stdout
    assert_same_training(output_dir, single)
    assert_same_weights(output_dir / "final-checkpoint", single / "final-checkpoint")


def test_two_processes_on_one_machine_run_one_tracker(ddp):
    output_dir, result = ddp
    # One tracker: one file, one run's row, one line saying what it measures, one machine in the total.
    assert sorted(p.name for p in output_dir.glob("emissions*.csv")) == ["emissions.csv"]
    assert len(csv_rows(output_dir / "emissions.csv")) == 1
    assert result.stdout.count("energy: one CodeCarbon tracker on this machine") == 1
    assert "CodeCarbon, 1 machine(s) this run" in result.stdout
    energies = [r["energy_kwh"] for r in train_records(output_dir).values()]
    assert energies[0] > 0 and all(b >= a for a, b in zip(energies, energies[1:])) and energies[-1] > energies[0]


def test_eval_of_two_processes_covers_the_whole_test_split(ddp, sample_tokenized):
    output_dir, _ = ddp
    manifest = json.loads((sample_tokenized / "manifest.json").read_text())
    test_blocks = manifest["splits"]["test"]["blocks"]
    # With 8 rows per eval batch, some shares end in padding rows; the token count shows none was counted.
    assert test_blocks % (2 * 8)
    assert [r["eval_tokens"] for r in eval_records(output_dir).values()] == [test_blocks * (TEST_BLOCK_SIZE - 1)] * 2


def test_names_logs_and_samples_do_not_depend_on_process_count(single, ddp):
    output_dir, result = ddp
    # Only the main process writes: every record and every sample appears once, as with one process.
    assert [(r["step"], sorted(r)) for r in records(output_dir)] == [(r["step"], sorted(r)) for r in records(single)]
    assert records(output_dir, "samples.jsonl") == records(single, "samples.jsonl")
    assert result.stdout.count("step 3 sample:") == 1
    assert (output_dir / "loss.png").stat().st_size > 5000
    names = sorted(p.name for p in output_dir.iterdir())
    assert names == sorted(p.name for p in single.iterdir())
    assert {"step_3", "final-checkpoint"} <= set(names) and not [n for n in names if n.startswith(".")]
    for folder in ("step_3", "final-checkpoint"):
        got = json.loads((output_dir / folder / "trainer_state.json").read_text())
        expected = json.loads((single / folder / "trainer_state.json").read_text())
        keys = ("step", "samples_consumed", "tokens_seen", "tokens_per_step")
        assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}
    # The resumable state holds one random state per process.
    assert sorted(p.name for p in (output_dir / "step_3" / "accelerate_state").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]


def resume_from_step_3(output_dir, sample_tokenizer, sample_tokenized, tmp_path, **launch):
    """A fresh output_dir holding only the uninterrupted run's step_3, resumed from `latest` under 2 processes."""
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "step_3", resumed_dir / "step_3")
    result = two_processes(sample_tokenizer, sample_tokenized, resumed_dir, tmp_path,
                           "training_args.resume_from_checkpoint=latest", **launch)
    return resumed_dir, result


def test_resume_under_two_processes_equals_the_uninterrupted_run(ddp, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir, _ = ddp
    resumed_dir, result = resume_from_step_3(output_dir, sample_tokenizer, sample_tokenized, tmp_path)
    assert "at step 3" in result.stdout
    assert_same_training(resumed_dir, output_dir, steps=[4, 5, 6])
    assert records(resumed_dir, "samples.jsonl") == [s for s in records(output_dir, "samples.jsonl") if s["step"] > 3]


# ----------------------------------------------------------------------------------------------------------------
# Two machines: two launchers, one process each, meeting at the main one's address

def test_two_nodes_train_like_one_process(single, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir = tmp_path / "out"
    port = str(free_port())
    args = script_args(sample_tokenizer, sample_tokenized, output_dir, GLOBAL_MICRO_BATCH // 2, ENERGY)
    env = launch_env(tmp_path, WANDB_MODE="offline")
    nodes = [accelerate_launch(["--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                                "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                "--main_process_port", port], "pre-training.py", args, env, tmp_path / f"node{rank}")
             for rank in (0, 1)]
    results = finish(*nodes)
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-4000:])
    assert_same_training(output_dir, single)
    assert records(output_dir, "samples.jsonl") == records(single, "samples.jsonl")
    # The second machine's process never writes: one W&B run, one sample line per step (its console has none).
    assert len(list((output_dir / "wandb").glob("offline-run-*"))) == 1
    assert "sample:" in results[0].stdout and "sample:" not in results[1].stdout
    # One tracker per machine, each with its own file; the run's total is the sum of the two.
    assert sorted(p.name for p in output_dir.glob("emissions*.csv")) == ["emissions-process1.csv", "emissions.csv"]
    assert all(result.stdout.count("energy: one CodeCarbon tracker on this machine") == 1 for result in results)
    final = output_dir / "final-checkpoint"
    machines = [float(row["energy_consumed"]) for name in ("emissions.csv", "emissions-process1.csv")
                for row in csv_rows(final / name)]
    assert len(machines) == 2 and min(machines) > 0
    total = json.loads((final / "trainer_state.json").read_text())["energy_kwh"]
    assert total == pytest.approx(sum(machines), rel=1e-9)
    assert "CodeCarbon, 2 machine(s) this run" in results[0].stdout


# ----------------------------------------------------------------------------------------------------------------
# FSDP

def test_fsdp_trains_like_one_process_and_saves_a_loadable_model(single, fsdp):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, _ = fsdp
    assert_same_training(output_dir, single)
    # Generation under FSDP finished on every process and sampled the same text as one process.
    assert records(output_dir, "samples.jsonl") == records(single, "samples.jsonl")
    # The resumable state holds each weight as one shard per process: the run really was FSDP.
    from torch.distributed.checkpoint import FileSystemReader

    state = output_dir / "final-checkpoint" / "accelerate_state" / "model_and_optimizer"
    chunks = FileSystemReader(str(state)).read_metadata().state_dict_metadata["model.model.embed_tokens.weight"].chunks
    assert len(chunks) == 2
    final = output_dir / "final-checkpoint"
    assert_same_weights(final, single / "final-checkpoint")
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.architectures == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer("A capital do Brasil", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 8


def test_fsdp_in_bf16_keeps_float32_losses_and_gradient_reductions(single, sample_tokenizer, sample_tokenized,
                                                                  tmp_path):
    import torch

    two_processes(sample_tokenizer, sample_tokenized, tmp_path / "out", tmp_path, "extra_args.mixed_precision=bf16",
                  "training_args.max_steps=3", "training_args.do_eval=false", "extra_args.checkpointing_steps=null",
                  "extra_args.sample_every=null", launcher=("--config_file", "fsdp_config.yaml"))
    got, expected = train_records(tmp_path / "out"), train_records(single)
    assert sorted(got) == [1, 2, 3]
    for step, record in got.items():
        # accelerate's own FSDP2 policy casts the loss to bf16 (3 significant digits, 4e-4 off at step 1 here).
        assert float(torch.tensor(record["loss"]).bfloat16()) != record["loss"], step
        assert record["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4), step
        assert record["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-2), step


def test_fsdp_resume_equals_the_uninterrupted_run(fsdp, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir, _ = fsdp
    resumed_dir, result = resume_from_step_3(output_dir, sample_tokenizer, sample_tokenized, tmp_path,
                                             launcher=("--config_file", "fsdp_config.yaml"))
    assert "at step 3" in result.stdout
    assert_same_training(resumed_dir, output_dir, steps=[4, 5, 6])


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: every row once, whatever the process count and the padding of the last batch

class OneOfSeveralProcesses:
    """What evaluate() uses of an Accelerator, as process `index` of `count`; reduce() keeps what it was sent."""

    def __init__(self, index: int, count: int):
        import torch

        self.device, self.process_index, self.num_processes = torch.device("cpu"), index, count
        self.sent = []

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.sent.append(tensor.clone())
        return tensor


def test_eval_counts_every_row_once_for_any_process_count_and_padding(sample_tokenized):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.data.tokenized_folder import open_tokenized_folder
    from pretrain.evaluation.perplexity import evaluate

    _, test_split = open_tokenized_folder(sample_tokenized, block_size=TEST_BLOCK_SIZE, vocab_size=TEST_VOCAB_SIZE,
                                          need_train=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=TEST_VOCAB_SIZE,
                                         max_position_embeddings=TEST_BLOCK_SIZE))
    blocks = torch.from_numpy(test_split.read_blocks(np.arange(test_split.num_blocks)).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        expected = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    num_tokens = test_split.num_blocks * (TEST_BLOCK_SIZE - 1)
    num_blocks = test_split.num_blocks
    # Shares that end in a padded batch, a batch larger than a share, and (the last) a process with no row at all.
    count_for_an_empty_share = next(c for c in range(2, num_blocks) if -(-num_blocks // c) * (c - 1) >= num_blocks)
    cases = [(1, 7), (2, 8), (3, 4), (4, num_blocks + 5), (count_for_an_empty_share, 3)]
    for count, batch_size in cases:
        ranks = [OneOfSeveralProcesses(index, count) for index in range(count)]
        for accelerator in ranks:
            evaluate(accelerator, model, test_split, batch_size)
        totals = sum(accelerator.sent[0] for accelerator in ranks)
        assert int(totals[1]) == num_tokens, (count, batch_size)
        assert float(totals[0] / totals[1]) == pytest.approx(float(expected), rel=1e-6), (count, batch_size)
    assert model.training  # evaluate() hands the model back in training mode


# ----------------------------------------------------------------------------------------------------------------
# Launches that accelerate would quietly run as something else are refused

@pytest.mark.parametrize("launcher,env_change,message", [
    (["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": None},
     "2 processes were launched but each sees only itself: there is no GPU"),
    (["--cpu", "--num_processes", "2"], {}, "'accelerate launch --cpu' starts a single process"),
    (["--config_file", "fsdp_config.yaml", "--num_processes", "2"], {},
     "an FSDP launch config was given but accelerate runs MULTI_CPU here"),
], ids=["no-gpu-without-use-cpu", "cpu-flag", "fsdp-on-cpu"])
def test_launches_that_would_run_differently_are_refused(sample_tokenizer, sample_tokenized, tmp_path, launcher,
                                                          env_change, message):
    output_dir = tmp_path / "out"
    args = script_args(sample_tokenizer, sample_tokenized, output_dir, 2)
    [result] = finish(accelerate_launch([*launcher, "--main_process_port", str(free_port())], "pre-training.py", args,
                                        launch_env(tmp_path, **env_change), tmp_path / "logs"))
    assert result.returncode != 0
    assert message in result.stderr
    assert not (output_dir / "metrics.jsonl").exists() and not list(output_dir.glob("step_*"))
