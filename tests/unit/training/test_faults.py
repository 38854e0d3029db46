"""pretrain/training/faults.py without a training run: the step verdict, stop signals (real ones, to this process),
skipped steps and rollbacks against a small fake accelerator. tests/scripts/test_training_faults.py runs the same paths
end to
end."""
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pretrain.errors import EXIT_DIVERGED, EXIT_PREEMPTED
from pretrain.training import faults
from pretrain.training.state import Run, TrainState
from tests.helpers.runs import REPO

TOKENS_PER_STEP, BLOCK_SIZE = 64, 8      # 8 samples per optimizer step


class FakeAccelerator:
    """What faults.py asks of accelerate's Accelerator, recording what it is told. `others`: what the other
    process brings to the step's all-reduce (its loss, non-finite loss and norm flags, stop request), if any."""

    def __init__(self, scaler=None, others=None, is_main_process=True):
        self.scaler, self.others, self.is_main_process = scaler, others, is_main_process
        self.num_processes = 1 if others is None else 2
        self.device = torch.device("cpu")
        self.printed, self.loaded, self.ended = [], [], False

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.others

    def print(self, text):
        self.printed.append(text)

    def end_training(self):
        self.ended = True


@pytest.fixture(autouse=True)
def reloads_recorded(monkeypatch):
    """A rollback's reload of the resumable state, recorded on the fake accelerator instead of read from disk."""
    monkeypatch.setattr(faults, "load_resumable_state",
                        lambda accelerator, model, optimizer, scheduler, folder: accelerator.loaded.append(str(folder)))


def make_run(tmp_path, accelerator=None, last_checkpoint=None, max_skipped_steps=2, max_rollbacks=1, **state):
    spec = SimpleNamespace(training=SimpleNamespace(max_skipped_steps=max_skipped_steps, max_rollbacks=max_rollbacks),
                           data=SimpleNamespace(block_size=BLOCK_SIZE))
    return Run(spec=spec, accelerator=accelerator or FakeAccelerator(), model=None, optimizer=None, scheduler=None,
               tokenizer=None, output_dir=tmp_path, hub=None, state=TrainState(**state),
               tokens_per_step=TOKENS_PER_STEP, last_checkpoint=last_checkpoint)


def saved_checkpoint(folder, **state):
    (folder / "accelerate_state").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({**TrainState(**state).__dict__, "name": folder.name}))
    return folder


def logger():
    records = []
    return records, lambda run, record: records.append(record)


# ---------------------------------------------------------------------------------------------------- the verdict

def test_under_a_grad_scaler_only_a_non_finite_loss_counts_and_the_optimizer_always_steps():
    plain = SimpleNamespace(scaler=None, num_processes=1)
    scaled = SimpleNamespace(scaler=object(), num_processes=1)
    finite, inf = torch.tensor(2.0), torch.tensor(float("inf"))
    assert faults.agree_on_step(plain, finite, inf, False) == (False, False, False, None)
    assert faults.agree_on_step(plain, finite, None, True) == (True, True, True, None)
    # fp16: the scaler skips overflowing gradients itself and must see every step to adjust its scale.
    assert faults.agree_on_step(scaled, finite, inf, False) == (True, True, False, None)
    assert faults.agree_on_step(scaled, torch.tensor(float("nan")), finite, False) == (False, True, False, None)
    verdicts = (faults.StepVerdict(True, True, False), faults.StepVerdict(False, True, False),
                faults.StepVerdict(True, False, False, {"reason": "loss spike"}))
    assert [v.skipped for v in verdicts] == [False, True, True]


@pytest.mark.parametrize("others, expected", [
    ([2.0, 0.0, 0.0, 0.0], (True, True, False)),
    ([float("nan"), 1.0, 0.0, 0.0], (False, False, False)),   # another process's loss was not finite
    ([2.0, 0.0, 1.0, 0.0], (False, False, False)),            # nor its gradient norm
    ([2.0, 0.0, 0.0, 1.0], (True, True, True)),               # another process received the stop signal
])
def test_every_process_gets_the_verdict_of_all(others, expected):
    accelerator = FakeAccelerator(others=torch.tensor(others))
    verdict = faults.agree_on_step(accelerator, torch.tensor(2.0), torch.tensor(0.5), False)
    assert verdict == (*expected, None) and verdict.finite is expected[0] and verdict.stop is expected[2]


def test_a_sharded_gradient_norm_is_gathered_before_it_is_judged():
    class ShardedNorm:  # FSDP2 returns the norm as a DTensor
        def full_tensor(self):
            return torch.tensor(float("nan"))

    assert faults.agree_on_step(FakeAccelerator(), torch.tensor(2.0), ShardedNorm(), False) == \
        (False, False, False, None)


# ------------------------------------------------------------------------------------------------------- signals

@pytest.fixture
def own_handlers():
    """StopSignals replaces this process's SIGTERM and SIGINT handlers: put pytest's back afterwards."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_the_run_to_stop_after_the_step(own_handlers, capfd, number):
    signals = faults.StopSignals()
    assert signals.received is None
    os.kill(os.getpid(), number)
    name = signal.Signals(number).name
    assert signals.received == name
    assert capfd.readouterr().err == (f"\n{name} received: saving a checkpoint after this optimizer step, then "
                                      f"stopping (send it again to stop at once without saving)\n")


def test_restore_puts_the_previous_handlers_back(own_handlers):
    def before(number, frame):
        pass

    signal.signal(signal.SIGTERM, before)
    signals = faults.StopSignals()
    assert signal.getsignal(signal.SIGTERM) == signals._handle
    signals.restore()
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_ends_the_process_at_once_by_that_signal():
    child = ("import os, signal, time\n"
             "from pretrain.training.faults import StopSignals\n"
             "signals = StopSignals()\n"
             "os.kill(os.getpid(), signal.SIGINT)\n"
             "print(signals.received, flush=True)\n"
             "os.kill(os.getpid(), signal.SIGINT)\n"
             "time.sleep(30)\n"
             "print('still running')\n")
    result = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGINT
    assert result.stdout == "SIGINT\n" and "KeyboardInterrupt" not in result.stderr


def test_a_stop_saves_the_step_unless_the_last_checkpoint_holds_it(tmp_path, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(faults, "save_checkpoint", lambda run, name: saved.append(name) or tmp_path / name)
    signals = SimpleNamespace(received="SIGTERM")
    folder = saved_checkpoint(tmp_path / "step_5", step=5, samples_consumed=40)
    run = make_run(tmp_path, last_checkpoint=folder, step=5, samples_consumed=40)
    with pytest.raises(SystemExit) as caught:
        faults.stop_for_signal(run, signals)
    assert caught.value.code == EXIT_PREEMPTED and saved == [] and run.accelerator.ended
    assert capsys.readouterr().out == (f"stopped by SIGTERM after step 5; checkpoint: {folder}; to continue, rerun "
                                       f"the same command with training_args.resume_from_checkpoint=latest\n")
    run = make_run(tmp_path, last_checkpoint=folder, step=6, samples_consumed=48)
    with pytest.raises(SystemExit):
        faults.stop_for_signal(run, SimpleNamespace(received=None))
    assert saved == ["step_6"]
    assert capsys.readouterr().out.startswith(f"stopped by a stop signal sent to another process after step 6; "
                                              f"checkpoint: {tmp_path / 'step_6'};")
    with pytest.raises(SystemExit):
        faults.stop_for_signal(make_run(tmp_path, step=2), signals)
    assert saved == ["step_6", "step_2"]


# --------------------------------------------------------------------------------------------- skips and rollbacks

def test_a_skipped_step_is_counted_and_logged(tmp_path):
    records, log = logger()
    run = make_run(tmp_path, step=7, tokens_seen=448)
    assert faults.skip_step(run, log) is False
    assert (run.state.skipped_steps, run.state.skipped_in_a_row) == (1, 1)
    assert records == [{"step": 7, "tokens_seen": 448, "event": "skipped_step",
                        "reason": "non-finite loss or gradient norm", "skipped_steps": 1, "skipped_in_a_row": 1}]
    assert run.accelerator.printed == [
        "step 7: non-finite loss or gradient norm; update skipped (1 in a row, 1 in all)"]
    assert run.accelerator.loaded == [] and not run.accelerator.ended


def test_too_many_skips_in_a_row_roll_back_to_the_last_checkpoint_keeping_the_data_position(tmp_path):
    folder = saved_checkpoint(tmp_path / "step_4", step=4, samples_consumed=32, tokens_seen=256,
                              recent_losses=[3.0], window_loss_sum=3.0, window_steps=1)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 8)))
    records, log = logger()
    run = make_run(tmp_path, last_checkpoint=folder, step=7, samples_consumed=56, tokens_seen=448, skipped_steps=3,
                   skipped_in_a_row=1)
    assert faults.skip_step(run, log) is True
    assert run.accelerator.loaded == [str(folder / "accelerate_state")]
    assert run.state == TrainState(step=4, samples_consumed=56, tokens_seen=256, window_loss_sum=3.0, window_steps=1,
                                   recent_losses=[3.0], skipped_steps=4, skipped_in_a_row=0, rollbacks=1)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert records[-1] == {"step": 4, "tokens_seen": 256, "event": "rollback", "rolled_back_from_step": 7,
                           "rolled_back_to": "step_4", "samples_skipped": 24, "data_position": 56, "rollbacks": 1,
                           "skipped_steps": 4}
    assert [r["event"] for r in records] == ["skipped_step", "rollback"]
    assert run.accelerator.printed[-1] == (f"rolled back from step 7 to {folder} (step 4), rollback 1 of at most 1; "
                                           f"the 24 samples of steps 5-7 are not replayed: training goes on from "
                                           f"sample 56")


def test_diverging_with_no_checkpoint_stops_with_3(tmp_path, capsys):
    records, log = logger()
    run = make_run(tmp_path, max_skipped_steps=1, step=3, tokens_seen=192)
    with pytest.raises(SystemExit) as caught:
        faults.skip_step(run, log)
    assert caught.value.code == EXIT_DIVERGED and run.accelerator.ended and run.accelerator.loaded == []
    assert records[-1] == {"step": 3, "tokens_seen": 192, "event": "diverged", "skipped_steps": 1, "rollbacks": 0}
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged: 1 optimizer steps in a row had a non-finite loss or gradient "
                          "norm (up to step 3) and there is no checkpoint to roll back to;")
    assert "set extra_args.checkpointing_steps" in err


def test_diverging_past_max_rollbacks_stops_with_3_and_names_the_last_good_checkpoint(tmp_path, capsys):
    folder = saved_checkpoint(tmp_path / "step_4", step=4)
    records, log = logger()
    run = make_run(tmp_path, last_checkpoint=folder, max_skipped_steps=1, max_rollbacks=2, step=9, rollbacks=2)
    with pytest.raises(SystemExit) as caught:
        faults.skip_step(run, log)
    assert caught.value.code == EXIT_DIVERGED and run.accelerator.loaded == [] and run.state.step == 9
    assert records[-1]["event"] == "diverged" and records[-1]["rollbacks"] == 2
    assert (f"after 2 rollback(s), the most training_args.max_rollbacks allows; the last good checkpoint is "
            f"{folder}; lower training_args.learning_rate") in capsys.readouterr().err


def test_only_the_main_process_reports_a_stop(tmp_path, capsys):
    run = make_run(tmp_path, accelerator=FakeAccelerator(is_main_process=False), max_skipped_steps=1)
    with pytest.raises(SystemExit) as caught:
        faults.skip_step(run, lambda run, record: None)
    assert caught.value.code == EXIT_DIVERGED and run.accelerator.ended
    assert capsys.readouterr() == ("", "")
