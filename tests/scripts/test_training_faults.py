"""pre-training.py under faults, with real processes and real signals: preemption (one process and two), a SIGKILL in
the middle of a save, a full disk, a read-only or too small output_dir, and losses that go non-finite (an absurd
learning rate; a model whose embedding rows for two tokens are NaN, so only the batches holding them diverge).

The runs are independent, so a module fixture starts them all at once, each in its own thread that drives its
process (signals are sent when a hidden `.step_N.tmp` folder shows that a save is under way), and the tests then
check what each left behind. Every comparison is with one uninterrupted reference run.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain import errors
from pretrain.training import checkpoints
from tests.helpers.runs import OFFLINE_ENV, REPO, TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, TINY_MODEL, launch_command

TINY = [*TINY_MODEL, "training_args.per_device_eval_batch_size=8",
        "training_args.gradient_accumulation_steps=2", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=3", "training_args.do_eval=false", "extra_args.sample_every=null"]
# 12 steps, checkpoints at 4 and 8, a metrics line every 3 steps: a stop at step 5 falls inside a logging window.
RUN = ["training_args.max_steps=12", "extra_args.checkpointing_steps=4", "extra_args.wandb_log_steps=3"]
SAMPLES_PER_STEP = 4 * 2
DIVERGING = ["training_args.learning_rate=1e6", "training_args.max_skipped_steps=2", "extra_args.wandb_log_steps=1"]
COMPARED = ("step", "tokens_seen", "loss", "learning_rate", "grad_norm")
TIMEOUT_S = 400
MiB = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Driving real runs

def start(ctx, name, *overrides, processes=1, output_dir=None, wrapper=()):
    """Start pre-training.py (under `accelerate launch` when processes > 1) in its own session, output to a log file."""
    output_dir = output_dir or ctx.root / name
    args = ["--spec-file", "specs-tiny.yaml", *TINY, f"model_args.tokenizer_name={ctx.tokenizer}",
            f"data_args.folder_path={ctx.data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={4 // processes}", *overrides]
    command = launch_command(REPO / "pre-training.py", args, processes)
    # One thread per process: the runs share two cores. A private HF_HOME keeps this machine's accelerate config out.
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "HF_HOME": str(ctx.root / "hf")}
    log = ctx.root / f"{name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([*wrapper, *command], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    ctx.processes.append(process)
    return SimpleNamespace(name=name, process=process, output_dir=output_dir, log=log)


def finish(launch):
    launch.process.wait(timeout=TIMEOUT_S)
    output = launch.log.read_text(errors="replace")
    return SimpleNamespace(returncode=launch.process.returncode, output=output, output_dir=launch.output_dir)


def wait_until(launch, condition):
    """Poll `condition` every millisecond (a save lasts a fraction of a second); False if the process ended first."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        if launch.process.poll() is not None:
            return condition()
        time.sleep(0.001)
    raise TimeoutError(f"{launch.name}: condition not met in {TIMEOUT_S} s")


def saving(folder, name):
    """True once the save of `name` has begun (its hidden folder exists) or has ended (the folder is in place)."""
    return lambda: (folder / f".{name}.tmp").exists() or (folder / name).exists()


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(output_dir):
    return [{key: r[key] for key in COMPARED} for r in records(output_dir) if "loss" in r]


def complete(folder):
    names = {p.name for p in folder.iterdir()}
    return {"config.json", "model.safetensors", "tokenizer.json", "spec.yaml", "trainer_state.json",
            "accelerate_state"} <= names and (folder / "accelerate_state" / "model_and_optimizer" /
                                              ".metadata").is_file()


def step_dirs(output_dir):
    return sorted(p.name for p in output_dir.glob("step_*"))


def hidden(output_dir):
    return sorted(p.name for p in output_dir.glob(".*"))


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def mount_tmpfs(folder: Path, size_bytes: int, *options):
    """Mount a tmpfs of `size_bytes` at `folder`; None when mounting is not permitted here (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_bytes}", *options]), "tmpfs",
                             str(folder)], capture_output=True, text=True)
    return None if result.returncode == 0 else f"cannot mount a tmpfs here: {result.stderr.strip()}"


# ----------------------------------------------------------------------------------------------------------------
# The scenarios, each run in its own thread

def reference(ctx):
    return finish(start(ctx, "reference", *RUN))


def preempted(ctx):
    """SIGTERM while step 4 is being saved: the flag is seen at step 5, which is saved and the run exits 75."""
    first = start(ctx, "preempted", *RUN)
    assert wait_until(first, saving(first.output_dir, "step_4")), "the run ended before saving step_4"
    first.process.send_signal(signal.SIGTERM)
    stopped = finish(first)
    listing = step_dirs(first.output_dir)
    resumed = finish(start(ctx, "preempted-resumed", *RUN, "training_args.resume_from_checkpoint=latest",
                           "extra_args.keep_last_checkpoints=1", output_dir=first.output_dir))
    return SimpleNamespace(stopped=stopped, steps_when_stopped=listing, resumed=resumed)


def killed(ctx):
    """SIGKILL to the whole process group while a checkpoint after step_4 is being written."""
    first = start(ctx, "killed", *RUN)
    caught = []

    def save_in_progress():
        caught[:] = [name for name in (".step_8.tmp", ".final-checkpoint.tmp") if (first.output_dir / name).exists()]
        return bool(caught)

    wait_until(first, save_in_progress)
    os.killpg(first.process.pid, signal.SIGKILL)
    stopped = finish(first)
    after_kill = SimpleNamespace(steps=step_dirs(first.output_dir), hidden=hidden(first.output_dir),
                                 complete={n: complete(first.output_dir / n) for n in step_dirs(first.output_dir)},
                                 latest=checkpoints.latest_checkpoint(first.output_dir))
    resumed = finish(start(ctx, "killed-resumed", *RUN, "training_args.resume_from_checkpoint=latest",
                           output_dir=first.output_dir))
    return SimpleNamespace(caught=caught, stopped=stopped, after_kill=after_kill, resumed=resumed)


def signalled_twice(ctx):
    """Ctrl-C twice: the first SIGINT asks for a checkpoint; the second, while it is being written, ends the run."""
    launch = start(ctx, "twice", *RUN)
    assert wait_until(launch, saving(launch.output_dir, "step_4")), "the run ended before saving step_4"
    launch.process.send_signal(signal.SIGINT)
    caught = wait_until(launch, lambda: (launch.output_dir / ".step_5.tmp").exists())
    launch.process.send_signal(signal.SIGINT)
    return SimpleNamespace(caught=caught, result=finish(launch))


def two_processes(ctx):
    """Under accelerate launch, SIGTERM to the rank-1 worker only: both processes stop at the same step. With a
    checkpoint every step, the stop comes right after a regular save, which serves as the preemption checkpoint."""
    import psutil

    every_step = ["extra_args.checkpointing_steps=1", "extra_args.keep_last_checkpoints=2"]
    first = start(ctx, "two", *RUN, *every_step, processes=2)
    assert wait_until(first, saving(first.output_dir, "step_4")), "the run ended before saving step_4"
    workers = [p for p in psutil.Process(first.process.pid).children(recursive=True)
               if "pre-training.py" in " ".join(p.cmdline())]
    rank_one = [p for p in workers if p.environ().get("RANK") == "1"]
    assert len(workers) == 2 and len(rank_one) == 1, [(p.pid, p.cmdline()) for p in workers]
    rank_one[0].send_signal(signal.SIGTERM)
    stopped = finish(first)
    listing = step_dirs(first.output_dir)
    resumed = finish(start(ctx, "two-resumed", *RUN, "extra_args.keep_last_checkpoints=2",
                           "training_args.resume_from_checkpoint=latest", processes=2, output_dir=first.output_dir))
    return SimpleNamespace(stopped=stopped, steps_when_stopped=listing, resumed=resumed)


def diverging(ctx):
    return finish(start(ctx, "diverging", *DIVERGING, "training_args.max_steps=30", "extra_args.checkpointing_steps=2",
                        "training_args.max_rollbacks=2"))


def diverging_without_checkpoint(ctx):
    return finish(start(ctx, "no-checkpoint", *DIVERGING, "training_args.max_steps=30",
                        "extra_args.checkpointing_steps=null"))


def poisoned(ctx, reference_future):
    """Continue the reference's final model with NaN embedding rows for a token found in two consecutive steps of
    data and one found in a single later step: the first makes a rollback, the second one skipped step."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = poison_plan(ctx.data)
    reference_future.result()
    model = AutoModelForCausalLM.from_pretrained(ctx.root / "reference" / "final-checkpoint")
    with torch.no_grad():
        model.get_input_embeddings().weight[[plan.pair_token, plan.single_token]] = float("nan")
    model.save_pretrained(ctx.root / "poisoned-model")
    result = finish(start(ctx, "poisoned", "training_args.max_steps=10", "extra_args.checkpointing_steps=2",
                          "extra_args.wandb_log_steps=1", "training_args.max_skipped_steps=2",
                          "training_args.max_rollbacks=1", "model_args.train_from_scratch=false",
                          f"model_args.model_to_train={ctx.root / 'poisoned-model'}"))
    return SimpleNamespace(plan=plan, result=result)


def poison_plan(data_folder, max_data_steps=14):
    """Tokens that occur, in the data order of the run (seed 42, 8 samples a step), in exactly data steps
    {a, a+1} (a >= 3) and exactly {b} (b >= a + 4), and in no other of the first `max_data_steps` steps."""
    import numpy as np

    from pretrain.data.batches import TrainBatches
    from pretrain.data.tokenized_folder import open_tokenized_folder

    train, _ = open_tokenized_folder(data_folder, block_size=TEST_BLOCK_SIZE, vocab_size=TEST_VOCAB_SIZE,
                                     need_train=True, need_test=False)
    batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=42, prefetch=0)
    present = [set(np.unique(np.concatenate([next(batches).numpy() for _ in range(2)])).tolist())
               for _ in range(max_data_steps)]
    batches.close()
    steps_of = {token: tuple(s + 1 for s, tokens in enumerate(present) if token in tokens)
                for token in range(TEST_VOCAB_SIZE)}
    pairs = sorted((steps[0], token) for token, steps in steps_of.items()
                   if len(steps) == 2 and steps[1] == steps[0] + 1 and steps[0] >= 3)
    for first, pair_token in pairs:
        singles = sorted((steps[0], token) for token, steps in steps_of.items()
                         if len(steps) == 1 and first + 4 <= steps[0] <= 11)
        if singles:
            return SimpleNamespace(pair_token=pair_token, pair_first_step=first, single_token=singles[0][1],
                                   single_step=singles[0][0])
    pytest.fail("the tokenized sample has no token pattern to poison; see poison_plan()")


def full_disk(ctx, reference_future):
    """An output_dir on a tmpfs that holds about 2.5 checkpoints: the third save fails."""
    reference_future.result()
    checkpoint_bytes = sum(p.stat().st_size for p in (ctx.root / "reference" / "step_4").rglob("*") if p.is_file())
    mount = ctx.root / "full"
    problem = mount_tmpfs(mount, int(2.5 * checkpoint_bytes))
    if problem:
        return SimpleNamespace(skip=problem)
    try:
        result = finish(start(ctx, "full", "training_args.max_steps=12", "extra_args.checkpointing_steps=2",
                              output_dir=mount / "out"))
        out = mount / "out"
        state = SimpleNamespace(steps=step_dirs(out), hidden=hidden(out),
                                complete={n: complete(out / n) for n in step_dirs(out)},
                                finite=all(bool(t.isfinite().all()) for t in weights(out / "step_4").values()),
                                latest=checkpoints.latest_checkpoint(out))
        return SimpleNamespace(skip=None, result=result, state=state, checkpoint_bytes=checkpoint_bytes)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def refused_at_start(ctx):
    """A tmpfs smaller than one checkpoint, and a read-only tmpfs: both refused before training."""
    outcomes = {}
    for name, size, options in (("tiny", 1 * MiB, ()), ("readonly", 1 * MiB, ("ro",))):
        mount = ctx.root / name
        problem = mount_tmpfs(mount, size, *options)
        if problem:
            return SimpleNamespace(skip=problem)
        try:
            outcomes[name] = finish(start(ctx, name, *RUN, output_dir=mount / "out"))
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    return SimpleNamespace(skip=None, **outcomes)


def file_size_limit(ctx):
    """Writes capped at 1 MiB per file (RLIMIT_FSIZE; no root needed): the optimizer state cannot be written."""
    return finish(start(ctx, "fsize", "training_args.max_steps=4", "extra_args.checkpointing_steps=2",
                        wrapper=("prlimit", f"--fsize={MiB}")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_tokenizer, sample_tokenized):
    ctx = SimpleNamespace(root=tmp_path_factory.mktemp("faults"), tokenizer=sample_tokenizer, data=sample_tokenized,
                          processes=[])
    pool = ThreadPoolExecutor(max_workers=12)
    try:
        ref = pool.submit(reference, ctx)
        futures = {"reference": ref, "preempted": pool.submit(preempted, ctx), "killed": pool.submit(killed, ctx),
                   "twice": pool.submit(signalled_twice, ctx), "two": pool.submit(two_processes, ctx),
                   "diverging": pool.submit(diverging, ctx),
                   "no_checkpoint": pool.submit(diverging_without_checkpoint, ctx),
                   "poisoned": pool.submit(poisoned, ctx, ref), "full": pool.submit(full_disk, ctx, ref),
                   "refused": pool.submit(refused_at_start, ctx)}
        if shutil.which("prlimit"):
            futures["fsize"] = pool.submit(file_size_limit, ctx)
        yield SimpleNamespace(get=lambda name: futures[name].result(timeout=TIMEOUT_S * 3), futures=futures)
    finally:
        for process in ctx.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------------------------
# Preemption

def test_sigterm_saves_a_checkpoint_exits_75_and_the_resumed_run_equals_an_uninterrupted_one(runs):
    ref, run = runs.get("reference"), runs.get("preempted")
    assert ref.returncode == 0, ref.output[-3000:]
    stopped, resumed = run.stopped, run.resumed
    assert stopped.returncode == errors.EXIT_PREEMPTED == 75, stopped.output[-3000:]
    folder = stopped.output_dir / "step_5"
    assert f"stopped by SIGTERM after step 5; checkpoint: {folder}" in stopped.output
    assert "resume_from_checkpoint=latest" in stopped.output and "Traceback" not in stopped.output
    assert run.steps_when_stopped == ["step_4", "step_5"]
    # Step 5 sits inside the logging window 4-6: the window's losses travel with the checkpoint.
    saved = json.loads((folder / "trainer_state.json").read_text())
    assert saved["step"] == 5 and saved["window_steps"] == 2 and saved["window_loss_sum"] > 10
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {folder} at step 5" in resumed.output
    # The same file continues: the same lines as the uninterrupted run, bit for bit, none twice.
    assert train_records(resumed.output_dir) == train_records(ref.output_dir)
    assert [r["step"] for r in records(resumed.output_dir)] == [3, 6, 9, 12]


def test_keep_last_checkpoints_prunes_old_ones_but_never_the_one_resumed_from(runs):
    resumed = runs.get("preempted").resumed
    # keep_last_checkpoints=1: step_4 went; step_5 stays because the run resumed from it; final-checkpoint stays.
    assert step_dirs(resumed.output_dir) == ["step_5", "step_8"]
    assert complete(resumed.output_dir / "final-checkpoint")
    assert hidden(resumed.output_dir) == []


def test_a_second_ctrl_c_ends_the_run_at_once_and_leaves_no_half_written_checkpoint(runs):
    twice = runs.get("twice")
    result = twice.result
    assert twice.caught, "the second signal came after the preemption save had ended"
    # The first SIGINT started the preemption save of step 5, as SIGTERM does.
    assert "SIGINT received: saving a checkpoint after this optimizer step" in result.output
    assert result.returncode == -signal.SIGINT, result.output[-3000:]  # killed by the signal: no exit 75
    assert "KeyboardInterrupt" not in result.output
    assert "stopped by" not in result.output
    folders = step_dirs(result.output_dir)
    assert folders[0] == "step_4" and all(complete(result.output_dir / n) for n in folders)
    assert set(hidden(result.output_dir)) <= {".step_5.tmp"}
    assert checkpoints.latest_checkpoint(result.output_dir).name in {"step_4", "step_5"}


def test_under_accelerate_launch_a_signal_to_one_process_stops_both_at_the_same_step(runs):
    ref, two = runs.get("reference"), runs.get("two")
    stopped, resumed = two.stopped, two.resumed
    # The launcher turns a worker's non-zero status into its own failure, with each worker's status in its report.
    assert "exitcode  : 75" in stopped.output, stopped.output[-4000:]
    assert "SIGTERM received: saving a checkpoint" in stopped.output
    folder = stopped.output_dir / "step_5"
    assert f"stopped by a stop signal sent to another process after step 5; checkpoint: {folder}" in stopped.output
    assert two.steps_when_stopped == ["step_4", "step_5"]  # keep_last_checkpoints=2 pruned steps 1-3
    states = sorted(p.name for p in (stopped.output_dir / "step_5" / "accelerate_state").iterdir())
    assert {"random_states_0.pkl", "random_states_1.pkl", "model_and_optimizer"} <= set(states)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"resumed from {folder} at step 5" in resumed.output
    assert step_dirs(resumed.output_dir) == ["step_5", "step_8"]
    # Two processes of 2 sequences match one process of 4 up to float rounding in the gradient all-reduce.
    got, expected = train_records(resumed.output_dir), train_records(ref.output_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [3, 6, 9, 12]
    for mine, theirs in zip(got, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints

def test_sigkill_during_a_save_leaves_only_complete_checkpoints_and_resume_equals_uninterrupted(runs):
    ref, run = runs.get("reference"), runs.get("killed")
    assert run.caught, "no save was caught in progress"
    assert run.stopped.returncode == -signal.SIGKILL
    after = run.after_kill
    # Every folder named step_N is whole and `latest` is the newest of them; the save cut short stays hidden (unless
    # the kill landed in the instant after its rename, when it is whole too).
    assert after.steps and all(after.complete.values()), after
    assert after.latest.name == after.steps[-1]
    cut = run.caught[0].removeprefix(".").removesuffix(".tmp")
    if run.caught[0] in after.hidden:
        assert cut not in after.steps
    resumed = run.resumed
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {after.latest} at step {after.latest.name.removeprefix('step_')}" in resumed.output
    assert train_records(resumed.output_dir) == train_records(ref.output_dir)
    assert hidden(resumed.output_dir) == []  # the leftover of the killed save is gone
    assert step_dirs(resumed.output_dir) == ["step_4", "step_8"]


# ----------------------------------------------------------------------------------------------------------------
# Full disk and unwritable output_dir

def test_a_full_disk_at_save_time_stops_with_74_and_keeps_the_previous_checkpoints(runs):
    full = runs.get("full")
    if full.skip:
        pytest.skip(full.skip)
    result, state = full.result, full.state
    assert result.returncode == errors.EXIT_WRITE_FAILED == 74, result.output[-3000:]
    assert "warning: training_args.output_dir" in result.output
    assert "set extra_args.keep_last_checkpoints" in result.output
    out = result.output_dir
    assert f"error: could not write checkpoint {out / 'step_6'}" in result.output
    assert f"the last complete checkpoint is {out / 'step_4'}" in result.output
    assert "Traceback" not in result.output
    assert state.steps == ["step_2", "step_4"] and all(state.complete.values())
    assert state.hidden == [] and state.finite and state.latest.name == "step_4"


def test_an_output_dir_too_small_or_read_only_is_refused_before_training(runs):
    refused = runs.get("refused")
    if refused.skip:
        pytest.skip(refused.skip)
    tiny, readonly = refused.tiny, refused.readonly
    assert tiny.returncode == 2, tiny.output[-2000:]
    assert "has 1.0 MiB free but one checkpoint of this model takes about 3.1 MiB" in tiny.output
    assert "optimizer steps of" not in tiny.output and "Traceback" not in tiny.output  # refused before training
    assert readonly.returncode == 2, readonly.output[-2000:]
    assert "cannot write to training_args.output_dir" in readonly.output and "Read-only file system" in readonly.output


def test_a_write_error_on_the_first_save_removes_the_partial_copy(runs):
    if "fsize" not in runs.futures:
        pytest.skip("no prlimit command to cap file sizes")
    result = runs.get("fsize")
    assert result.returncode == 74, result.output[-3000:]
    out = result.output_dir
    assert f"error: could not write checkpoint {out / 'step_2'}" in result.output
    assert "there is no earlier checkpoint" in result.output and "Traceback" not in result.output
    assert step_dirs(out) == [] and hidden(out) == []


# ----------------------------------------------------------------------------------------------------------------
# Diverging losses

def test_a_diverging_run_rolls_back_then_stops_with_3(runs):
    result = runs.get("diverging")
    assert result.returncode == errors.EXIT_DIVERGED == 3, result.output[-3000:]
    out = result.output_dir
    assert "error: training diverged: 2 optimizer steps in a row had a non-finite loss or gradient norm" \
        in result.output
    assert "after 2 rollback(s), the most training_args.max_rollbacks allows" in result.output
    assert f"the last good checkpoint is {out / 'step_2'}" in result.output and "Traceback" not in result.output
    events = [r for r in records(out) if "event" in r]
    rollbacks = [r for r in events if r["event"] == "rollback"]
    assert [r["rollbacks"] for r in rollbacks] == [1, 2] and all(r["rolled_back_to"] == "step_2" for r in rollbacks)
    # Each rollback goes on from where the data was, never replaying the batches that diverged.
    assert [r["data_position"] for r in rollbacks] == [4 * SAMPLES_PER_STEP, 6 * SAMPLES_PER_STEP]
    assert events[-1]["event"] == "diverged" and events[-1]["rollbacks"] == 2
    assert step_dirs(out) == ["step_2"] and not (out / "final-checkpoint").exists()
    assert all(bool(t.isfinite().all()) for t in weights(out / "step_2").values())


def test_diverging_with_no_checkpoint_to_roll_back_to_stops_with_3(runs):
    result = runs.get("no_checkpoint")
    assert result.returncode == 3, result.output[-3000:]
    assert "and there is no checkpoint to roll back to" in result.output
    assert "set extra_args.checkpointing_steps" in result.output and "Traceback" not in result.output
    skipped = [r for r in records(result.output_dir) if r.get("event") == "skipped_step"]
    assert [r["skipped_in_a_row"] for r in skipped] == [1, 2]
    assert step_dirs(result.output_dir) == [] and not (result.output_dir / "final-checkpoint").exists()


def test_nan_batches_are_skipped_rolled_back_past_and_never_reach_the_weights(runs):
    run = runs.get("poisoned")
    plan, result = run.plan, run.result
    assert result.returncode == 0, result.output[-3000:]
    out = result.output_dir
    bad_first, bad_last = plan.pair_first_step, plan.pair_first_step + 1
    back_to = 2 * ((bad_last - 1) // 2)  # the checkpoint (every 2 steps) before the second bad step
    rollback = next(r for r in records(out) if r.get("event") == "rollback")
    assert (rollback["step"], rollback["rolled_back_from_step"], rollback["rolled_back_to"]) == \
        (back_to, bad_last, f"step_{back_to}")
    assert rollback["data_position"] == bad_last * SAMPLES_PER_STEP
    assert f"rolled back from step {bad_last} to {out / f'step_{back_to}'}" in result.output
    # After the rollback, run step s reads data step s + (bad_last - back_to): the single bad step is skipped.
    single_run_step = plan.single_step - (bad_last - back_to)
    skipped = [r for r in records(out) if r.get("event") == "skipped_step"]
    assert [(r["step"], r["skipped_in_a_row"]) for r in skipped] == [(single_run_step, 1)]
    # No train line for a step whose update was skipped, unless the rollback replaced it.
    missing = {single_run_step} | {s for s in (bad_first, bad_last) if s <= back_to}
    assert [r["step"] for r in records(out) if "loss" in r] == [s for s in range(1, 11) if s not in missing]
    assert all(math.isfinite(r["loss"]) for r in records(out) if "loss" in r)
    final = json.loads((out / "final-checkpoint" / "trainer_state.json").read_text())
    assert (final["step"], final["skipped_steps"], final["rollbacks"]) == (10, 3, 1)
    embeddings = weights(out / "final-checkpoint")["model.embed_tokens.weight"]
    poisoned_rows = [plan.pair_token, plan.single_token]
    assert embeddings[poisoned_rows].isnan().all()  # they are never updated, so they stay as given
    others = [w for name, w in weights(out / "final-checkpoint").items() if name != "model.embed_tokens.weight"]
    keep = [i for i in range(embeddings.shape[0]) if i not in poisoned_rows]
    assert embeddings[keep].isfinite().all() and all(bool(w.isfinite().all()) for w in others)
