"""slurm/pretrain.sbatch run as Slurm would run it, on this machine: two loopback "nodes" of one process each.

srun, scontrol and scancel are the stand-ins of tests/slurm_on_loopback/ (srun starts the command once per node with
the node's SLURM_* variables; scancel signals every process of the step; scontrol prints host names and records a
requeue). The job gets SIGTERM as `--signal=B:TERM@120` sends it, saves a checkpoint, requeues itself, and its next
run resumes; the losses are those of one process with the same tokens per step.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.runs import REPO, TINY_MODEL, free_port
from tests.scripts.test_distributed import FSDP_ON_CPU_ENV, TIMEOUT_S, launch_env, train_records

STEPS = 12
ARGS = [*TINY_MODEL, f"training_args.max_steps={STEPS}", "extra_args.checkpointing_steps=null",
        "training_args.do_eval=false", "extra_args.sample_every=null", "extra_args.wandb_log_steps=1",
        "training_args.learning_rate=0.005", "training_args.warmup_steps=2",
        "training_args.gradient_accumulation_steps=1"]
JOB_ID = "4242"
SCRIPT = REPO / "slurm" / "pretrain.sbatch"


def spec_args(tokenizer, data, output_dir, per_device_batch):
    return ["--spec-file", "specs-tiny.yaml", *ARGS, f"model_args.tokenizer_name={tokenizer}",
            f"data_args.folder_path={data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={per_device_batch}"]


def slurm_env(tmp_path, restart: int, **variables):
    """What Slurm sets for the batch script of a two-node job, and the stand-ins first on PATH."""
    stand_ins = tmp_path / "slurm-state"
    stand_ins.mkdir(exist_ok=True)
    (stand_ins / "tasks").write_text("")
    # The launchers on PATH come from this interpreter's environment, as on a cluster they come from the job's.
    path = os.pathsep.join([str(REPO / "tests" / "slurm_on_loopback"), os.path.dirname(sys.executable),
                            os.environ["PATH"]])
    env = launch_env(tmp_path, PATH=path, SLURM_ON_LOOPBACK=str(stand_ins), SLURM_JOB_ID=JOB_ID,
                     SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2",
                     SLURM_CPUS_PER_TASK="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_SUBMIT_DIR=str(REPO),
                     SLURM_RESTART_COUNT=str(restart), PROCESSES_PER_NODE="1", MAIN_PORT=str(free_port()),
                     **variables)
    return env


def run_job(env, args, log, stop_after_step=None, output_dir=None):
    """Run the batch script; with `stop_after_step`, send it SIGTERM (as Slurm does before the time limit) once
    metrics.jsonl shows that step."""
    with open(log, "w+", encoding="utf-8") as handle:
        job = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=REPO, env=env, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while stop_after_step is not None and job.poll() is None and time.monotonic() < deadline:
                if max(train_steps(output_dir), default=0) >= stop_after_step:
                    job.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.05)
            job.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
        handle.seek(0)
        return job.returncode, handle.read()


def train_steps(output_dir):
    metrics = output_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sample_tokenizer, sample_tokenized):
    output_dir = tmp_path_factory.mktemp("one") / "out"
    args = [*spec_args(sample_tokenizer, sample_tokenized, output_dir, 2 * 2)]
    result = subprocess.run([sys.executable, "pre-training.py", *args], cwd=REPO, capture_output=True, text=True,
                            env=launch_env(output_dir.parent, ACCELERATE_USE_CPU=None), timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def test_a_job_stopped_before_its_time_limit_requeues_and_resumes_to_the_losses_of_one_process(
        one_process, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir = tmp_path / "out"
    args = spec_args(sample_tokenizer, sample_tokenized, output_dir, 2)
    requeued = tmp_path / "slurm-state" / "requeued"

    # First run: accelerate launch, DDP; stopped after a step or two, as by --signal=B:TERM@120.
    status, log = run_job(slurm_env(tmp_path, 0), args, tmp_path / "run0.log", stop_after_step=1,
                          output_dir=output_dir)
    assert status == 0, log[-4000:]
    assert "accelerate, ddp, 2 node(s) x 1 process(es), rendezvous at 127.0.0.1:" in log
    assert "SIGTERM before the time limit" in log and f"requeued job {JOB_ID}" in log
    stopped_at = max(train_steps(output_dir))
    assert stopped_at < STEPS, "the run ended before the signal reached it"
    assert f"stopped by SIGTERM after step {stopped_at}; checkpoint: {output_dir / f'step_{stopped_at}'}" in log
    assert requeued.read_text() == f"requeue {JOB_ID}\n"

    # The requeued job: FSDP this time, stopped again a step after it resumed.
    status, log = run_job(slurm_env(tmp_path, 1, PARALLEL="fsdp", **FSDP_ON_CPU_ENV), args, tmp_path / "run1.log",
                          stop_after_step=stopped_at + 1, output_dir=output_dir)
    assert status == 0, log[-4000:]
    assert f"resumed from {output_dir / f'step_{stopped_at}'} at step {stopped_at}" in log
    second_stop = max(train_steps(output_dir))
    assert stopped_at < second_stop < STEPS, "the run ended before the signal reached it"
    assert requeued.read_text() == f"requeue {JOB_ID}\n" * 2

    # Requeued again, under torchrun: it runs to the end and is not requeued.
    status, log = run_job(slurm_env(tmp_path, 2, LAUNCHER="torchrun"), args, tmp_path / "run2.log")
    assert status == 0, log[-4000:]
    assert f"resumed from {output_dir / f'step_{second_stop}'} at step {second_stop}" in log
    assert "SIGTERM" not in log and requeued.read_text() == f"requeue {JOB_ID}\n" * 2
    got, expected = train_records(output_dir), train_records(one_process)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["tokens_seen"] == expected[step]["tokens_seen"], step
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step
    assert (output_dir / "final-checkpoint" / "model.safetensors").is_file()


def test_fsdp_under_torchrun_is_refused_before_anything_runs(tmp_path, sample_tokenizer, sample_tokenized):
    output_dir = tmp_path / "out"
    env = slurm_env(tmp_path, 0, LAUNCHER="torchrun", PARALLEL="fsdp")
    status, log = run_job(env, spec_args(sample_tokenizer, sample_tokenized, output_dir, 2), tmp_path / "run.log")
    assert status == 2
    assert log.startswith("error: PARALLEL=fsdp takes its settings from fsdp_config.yaml, which only accelerate "
                          "launch reads")
    assert (tmp_path / "slurm-state" / "tasks").read_text() == "" and not output_dir.exists()
