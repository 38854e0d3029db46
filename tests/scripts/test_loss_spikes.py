"""pre-training.py with finite loss spikes: a step whose loss is multiplied before the backward pass (on one process
of two, or on the only one) is skipped and logged with its reason, its weights never change, a run resumed from a
checkpoint before or after the skip equals the uninterrupted one, and a smooth run of 1,000 steps skips nothing.

The spike comes from tests/helpers/spike_injection.py, which wraps the loop's loss function; the package has no
hook for it. The runs are independent, so a module fixture starts them at once.
"""

import json
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.helpers.runs import OFFLINE_ENV, REPO, TINY_MODEL, launch_command

INJECTOR = REPO / "tests" / "helpers" / "spike_injection.py"
TINY = [*TINY_MODEL, "training_args.per_device_eval_batch_size=8", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=3", "training_args.do_eval=false", "extra_args.sample_every=null",
        "extra_args.wandb_log_steps=1"]
SPIKE_STEP, WINDOW = 16, 8
SPIKY = ["training_args.max_steps=20", f"training_args.spike_window={WINDOW}", "training_args.spike_sigma=6"]
COMPARED = ("step", "tokens_seen", "loss", "learning_rate", "grad_norm")
TIMEOUT_S = 600
SMOOTH_TIMEOUT_S = 1800  # about a minute of CPU time, but the machine may be shared


def launch(ctx, name, *overrides, processes=1, spike_rank=None, output_dir=None, timeout=TIMEOUT_S):
    """pre-training.py (through the injector when `spike_rank` is given), under accelerate launch for 2 processes."""
    output_dir = output_dir or ctx.root / name
    script = INJECTOR if spike_rank is not None else REPO / "pre-training.py"
    args = ["--spec-file", "specs-tiny.yaml", *TINY, f"model_args.tokenizer_name={ctx.tokenizer}",
            f"data_args.folder_path={ctx.data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={4 // processes}", *overrides]
    command = launch_command(script, args, processes)
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "HF_HOME": str(ctx.root / "hf"), "SPIKE_STEP": str(SPIKE_STEP), "SPIKE_FACTOR": "50",
           "SPIKE_RANK": str(spike_rank or 0)}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return SimpleNamespace(returncode=result.returncode, output=result.stdout + result.stderr, output_dir=output_dir,
                           seconds=time.perf_counter() - started)


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_records(output_dir):
    return [{key: r[key] for key in COMPARED} for r in records(output_dir) if "loss" in r]


def skips(output_dir):
    return [r for r in records(output_dir) if r.get("event") == "skipped_step"]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def resumed_from(ctx, reference, step):
    """A copy of the reference run's folder as it was at `step`, resumed from its step_<step> to the end."""
    copy = ctx.root / f"resumed-{step}"
    shutil.copytree(reference.output_dir, copy)
    for folder in [*copy.glob("step_*"), copy / "final-checkpoint"]:
        if folder.name != "final-checkpoint" and int(folder.name.removeprefix("step_")) <= step:
            continue
        shutil.rmtree(folder)
    return launch(ctx, f"resumed-{step}", *SPIKY, "extra_args.checkpointing_steps=1",
                  "extra_args.keep_last_checkpoints=0", f"training_args.resume_from_checkpoint={copy / f'step_{step}'}",
                  spike_rank=0, output_dir=copy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_tokenizer, sample_tokenized):
    ctx = SimpleNamespace(root=tmp_path_factory.mktemp("spikes"), tokenizer=sample_tokenizer, data=sample_tokenized)
    with ThreadPoolExecutor(3) as pool:
        reference = pool.submit(launch, ctx, "spiked", *SPIKY, "extra_args.checkpointing_steps=1",
                                "extra_args.keep_last_checkpoints=0", spike_rank=0)
        two = pool.submit(launch, ctx, "spiked-two", *SPIKY, processes=2, spike_rank=1)
        # The tiny spec's own batch and learning rate, and its spike defaults.
        smooth = pool.submit(launch, ctx, "smooth", "training_args.max_steps=1000", "extra_args.wandb_log_steps=100",
                             "training_args.per_device_train_batch_size=8", "training_args.learning_rate=0.003",
                             timeout=SMOOTH_TIMEOUT_S)
        before = pool.submit(lambda: resumed_from(ctx, reference.result(), 12))
        after = pool.submit(lambda: resumed_from(ctx, reference.result(), 18))
        # Each test waits for the runs it reads, so one that fails or times out fails only its own tests.
        yield SimpleNamespace(**{name: future for name, future in (("reference", reference), ("two", two),
                                                                    ("smooth", smooth), ("before", before),
                                                                    ("after", after))})


def test_an_injected_spike_is_skipped_logged_with_its_reason_and_leaves_the_weights_alone(runs):
    ref = runs.reference.result()
    assert ref.returncode == 0, ref.output[-3000:]
    skipped = skips(ref.output_dir)
    assert [(r["step"], r["skipped_in_a_row"]) for r in skipped] == [(SPIKE_STEP, 1)]
    assert skipped[0]["reason"] in {"loss spike", "loss and gradient norm spike"}
    assert skipped[0]["step_loss"] > skipped[0]["loss_limit"] > 0
    assert f"step {SPIKE_STEP}: {skipped[0]['reason']}, loss" in ref.output
    assert [r["step"] for r in train_records(ref.output_dir)] == [s for s in range(1, 21) if s != SPIKE_STEP]
    state = json.loads((ref.output_dir / "final-checkpoint" / "trainer_state.json").read_text())
    assert (state["skipped_steps"], state["skipped_spikes"], state["spike_window_recorded"]) == (1, 1, 20)
    before, after = (weights(ref.output_dir / f"step_{s}") for s in (SPIKE_STEP - 1, SPIKE_STEP))
    assert all((before[name] == after[name]).all() for name in before)  # the skipped update never happened
    moved = weights(ref.output_dir / f"step_{SPIKE_STEP + 1}")
    assert any(not (after[name] == moved[name]).all() for name in after)  # the next step's did


def test_a_spike_on_one_process_of_two_is_skipped_by_both(runs):
    two = runs.two.result()
    assert two.returncode == 0, two.output[-4000:]
    skipped = skips(two.output_dir)
    assert [r["step"] for r in skipped] == [SPIKE_STEP]
    assert skipped[0]["reason"] in {"loss spike", "loss and gradient norm spike"}
    # The loss judged is the mean of the two processes', one of them fifty times its usual size.
    logged = {r["step"]: r["loss"] for r in records(two.output_dir) if "loss" in r}
    assert skipped[0]["step_loss"] > 10 * logged[SPIKE_STEP - 1]
    state = json.loads((two.output_dir / "final-checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["skipped_steps"], state["skipped_spikes"]) == (20, 1, 1)


@pytest.mark.parametrize("step", [12, 18])
def test_a_run_resumed_before_or_after_the_skip_equals_the_uninterrupted_one(runs, step):
    """From step 12 the spike still lies ahead: only a restored window, full since step 8, can judge it."""
    resumed = (runs.before if step == 12 else runs.after).result()
    reference = runs.reference.result()
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {resumed.output_dir / f'step_{step}'} at step {step}" in resumed.output
    assert train_records(resumed.output_dir) == train_records(reference.output_dir)
    assert skips(resumed.output_dir) == skips(reference.output_dir)
    final = weights(resumed.output_dir / "final-checkpoint")
    expected = weights(reference.output_dir / "final-checkpoint")
    assert all((final[name] == expected[name]).all() for name in expected)


def test_a_smooth_run_of_a_thousand_steps_skips_nothing(runs):
    smooth = runs.smooth.result()
    assert smooth.returncode == 0, smooth.output[-3000:]
    state = json.loads((smooth.output_dir / "final-checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1000 and state["skipped_steps"] == 0 and skips(smooth.output_dir) == []
    assert state["spike_window_recorded"] == 1000 and state["tokens_seen"] == 1000 * 8 * 128
    print(f"1,000 smooth steps took {smooth.seconds:.0f} s")
