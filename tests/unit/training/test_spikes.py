"""Loss and gradient-norm spikes (pretrain/training/faults.py): the window they are judged against, the verdict that
skips them, its one host sync, and the skip record. tests/scripts/test_loss_spikes.py runs them end to end."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pretrain.training import faults
from pretrain.training.state import TrainState
from tests.helpers.runs import REPO, TINY_MODEL
from tests.unit.training.test_faults import FakeAccelerator, logger, make_run

PLAIN = SimpleNamespace(scaler=None, num_processes=1)


def window(sigma=6.0, size=4, values=()):
    spikes = faults.SpikeWindow(sigma, size, torch.device("cpu"), TrainState())
    for loss, norm in values:
        spikes.record(torch.tensor([loss, norm]))
    return spikes


def verdict(spikes, loss, norm, accelerator=PLAIN):
    return faults.agree_on_step(accelerator, torch.tensor(loss), None if norm is None else torch.tensor(norm), False,
                                spikes)


# ---------------------------------------------------------------------------------------------------- the window

def test_no_limit_before_the_window_is_full_then_mean_plus_sigma_std():
    spikes = window(values=[(2.0, 1.0), (2.2, 1.1), (2.4, 1.2)])
    assert spikes.limits().tolist() == [math.inf, math.inf]
    spikes.record(torch.tensor([2.6, 1.3]))
    losses, norms = torch.tensor([2.0, 2.2, 2.4, 2.6]), torch.tensor([1.0, 1.1, 1.2, 1.3])
    expected = [losses.mean() + 6 * losses.std(), norms.mean() + 6 * norms.std()]
    assert spikes.limits().tolist() == pytest.approx([float(v) for v in expected])
    spikes.record(torch.tensor([9.0, 9.0]))  # in place of the oldest
    assert spikes.values[:, 0].tolist() == [9.0, 9.0] and spikes.recorded == 5


def test_the_window_survives_a_checkpoint_exactly_and_one_of_another_size_starts_empty():
    spikes = window(values=[(2.0 + i / 7, 1.0 + i / 9) for i in range(6)])
    state = TrainState()
    spikes.store(state)
    assert state.spike_window_recorded == 6 and len(state.spike_window[0]) == 4
    again = faults.SpikeWindow(6.0, 4, torch.device("cpu"), state)
    assert torch.equal(again.values, spikes.values) and again.recorded == 6
    assert torch.equal(again.limits(), spikes.limits())
    other = faults.SpikeWindow(6.0, 8, torch.device("cpu"), state)
    assert other.recorded == 0 and other.limits().tolist() == [math.inf, math.inf]


# ---------------------------------------------------------------------------------------------------- the verdict

STEADY = [(2.0, 1.0), (2.1, 1.1), (2.0, 1.0), (2.1, 1.1)]


def test_a_loss_above_the_limit_skips_the_update_with_its_reason_and_values():
    spikes = window(values=STEADY)
    limits = spikes.limits().tolist()
    result = verdict(spikes, 5.0, 1.05)
    assert (result.finite, result.apply_update, result.stop, result.skipped) == (True, False, False, True)
    assert result.spike == {"reason": "loss spike", "step_loss": 5.0, "loss_limit": pytest.approx(limits[0]),
                            "step_grad_norm": pytest.approx(1.05), "grad_norm_limit": pytest.approx(limits[1])}
    # The spike enters the window too: a lasting change of level stops being one.
    assert spikes.recorded == 5 and 5.0 in spikes.values[0].tolist()


def test_a_gradient_norm_above_the_limit_is_a_spike_and_both_together_say_so():
    assert verdict(window(values=STEADY), 2.05, 3.0).spike["reason"] == "gradient norm spike"
    assert verdict(window(values=STEADY), 5.0, 3.0).spike["reason"] == "loss and gradient norm spike"
    ordinary = verdict(window(values=STEADY), 2.05, 1.05)
    assert ordinary == (True, True, False, None) and not ordinary.skipped


def test_no_spike_before_the_window_fills_or_with_sigma_null():
    assert verdict(window(values=STEADY[:3]), 50.0, 30.0) == (True, True, False, None)
    off = window(sigma=None, values=STEADY)
    assert verdict(off, 50.0, 30.0) == (True, True, False, None) and off.recorded == 5


def test_a_non_finite_step_is_not_a_spike_and_stays_out_of_the_window():
    spikes = window(values=STEADY)
    for loss, norm in ((math.nan, 1.0), (2.0, math.inf)):
        assert verdict(spikes, loss, norm) == (False, False, False, None)
    assert spikes.recorded == 4


def test_without_a_gradient_norm_only_the_loss_is_judged():
    spikes = window(values=STEADY)
    assert verdict(spikes, 2.05, None) == (True, True, False, None)
    limit = spikes.limits()[0].item()
    assert verdict(spikes, 9.0, None).spike == {"reason": "loss spike", "step_loss": 9.0,
                                                "loss_limit": pytest.approx(limit)}


def test_under_a_grad_scaler_a_spike_is_skipped_but_an_overflow_is_left_to_the_scaler():
    scaled = SimpleNamespace(scaler=object(), num_processes=1)
    assert verdict(window(values=STEADY), 2.05, math.inf, scaled) == (True, True, False, None)
    assert verdict(window(values=STEADY), 5.0, 1.0, scaled).apply_update is False


def test_two_processes_judge_the_mean_of_their_losses_and_agree():
    # This process's loss is ordinary; the other's is ten times it, so their mean is a spike for both.
    others = torch.tensor([20.5, 0.0, 0.0, 0.0])
    result = verdict(window(values=STEADY), 2.05, 1.05, FakeAccelerator(others=others))
    assert result.spike["reason"] == "loss spike" and result.spike["step_loss"] == pytest.approx((2.05 + 20.5) / 2)
    calm = verdict(window(values=STEADY), 2.05, 1.05, FakeAccelerator(others=torch.tensor([2.05, 0.0, 0.0, 0.0])))
    assert calm.spike is None


def test_a_skipped_spike_leaves_weights_and_moments_alone_and_ends_the_grad_scalers_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    accelerator = SimpleNamespace(scaler=scaler)
    skip = faults.StepVerdict(True, False, False, {"reason": "loss spike"})
    for _ in range(2):  # the second unscale_ raises unless the skipped step was ended with update()
        scaler.scale((weight * 2).sum()).backward()
        scaler.unscale_(optimizer)  # as clipping does
        faults.apply_step(accelerator, optimizer, skip)
        assert weight.tolist() == [1.0, 1.0, 1.0] and optimizer.state == {} and weight.grad is None
    plain = SimpleNamespace(scaler=None)
    (weight * 2).sum().backward()
    faults.apply_step(plain, optimizer, faults.StepVerdict(True, True, False))
    assert weight.tolist() != [1.0, 1.0, 1.0] and weight.grad is None


# ---------------------------------------------------------------------------------------------------- the record

def test_a_skipped_spike_is_counted_logged_and_printed_with_its_values(tmp_path):
    records, log = logger()
    run = make_run(tmp_path, step=12, tokens_seen=768)
    spike = {"reason": "loss spike", "step_loss": 9.5, "loss_limit": 4.25, "step_grad_norm": 1.0,
             "grad_norm_limit": 2.0}
    assert faults.skip_step(run, log, spike) is False
    assert (run.state.skipped_steps, run.state.skipped_spikes, run.state.skipped_in_a_row) == (1, 1, 1)
    assert records == [{"step": 12, "tokens_seen": 768, "event": "skipped_step", "reason": "loss spike",
                        "step_loss": 9.5, "loss_limit": 4.25, "step_grad_norm": 1.0, "grad_norm_limit": 2.0,
                        "skipped_steps": 1, "skipped_in_a_row": 1}]
    assert run.accelerator.printed == ["step 12: loss spike, loss 9.5 above 4.25; update skipped (1 in a row, "
                                       "1 in all)"]


def test_spikes_in_a_row_past_the_limit_stop_a_run_without_checkpoint_with_their_reason(tmp_path, capsys):
    records, log = logger()
    run = make_run(tmp_path, max_skipped_steps=1, step=3)
    with pytest.raises(SystemExit) as caught:
        faults.skip_step(run, log, {"reason": "gradient norm spike", "step_loss": 2.0, "loss_limit": 3.0})
    assert caught.value.code == 3 and records[-1]["event"] == "diverged"
    assert capsys.readouterr().err.startswith("error: training diverged: 1 optimizer steps in a row had a gradient "
                                              "norm spike (up to step 3) and there is no checkpoint")


# ----------------------------------------------------------------------------------------- one host sync a step

SYNC_COUNTER = """
import json, sys, torch
from pretrain.training import loop
from specifications import load_spec
calls = [0]
def counted(name):
    original = getattr(torch.Tensor, name)
    def wrapper(self, *args, **kwargs):
        if "/pretrain/" in sys._getframe(1).f_code.co_filename:
            calls[0] += 1
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, wrapper)
for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
    counted(name)
counts = []
for steps in (6, 10):
    spec = load_spec("specs-tiny.yaml", [*sys.argv[2:], f"training_args.max_steps={steps}",
                                         f"training_args.output_dir={sys.argv[1]}-{steps}"])
    run, sources, max_steps = loop.setup(spec)
    calls[0] = 0
    loop.fit(run, sources, max_steps)
    counts.append(calls[0])
print(json.dumps(counts))
"""


def test_the_step_path_reads_the_device_once_per_optimizer_step(tmp_path, sample_tokenizer, sample_tokenized):
    """Every tensor-to-host read (item, tolist, bool, float, int, index, numpy) the package makes is counted over
    whole fit() calls of 6 and of 10 steps, with spike checks on and a full window from step 3, logging only at the
    last step: the 4 steps between them cost exactly 4 reads. (transformers' own forward reads a flag per
    micro-batch when it builds the causal mask; that read is outside the package and not counted.)"""
    overrides = [*TINY_MODEL, f"model_args.tokenizer_name={sample_tokenizer}",
                 f"data_args.folder_path={sample_tokenized}", "training_args.do_eval=false",
                 "extra_args.sample_every=null", "extra_args.wandb_log_steps=1000", "training_args.spike_sigma=6",
                 "training_args.spike_window=2", "training_args.gradient_accumulation_steps=2"]
    result = subprocess.run([sys.executable, "-c", SYNC_COUNTER, tmp_path / "out", *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    short, long = json.loads(result.stdout.strip().splitlines()[-1])
    assert long - short == 10 - 6, (short, long)


def test_a_rollback_takes_the_window_of_the_checkpoint_it_returns_to(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "load_resumable_state", lambda *args: None)
    saved = window(values=[(3.0 + i, 1.0 + i) for i in range(5)])
    at_checkpoint = TrainState(step=4)
    saved.store(at_checkpoint)
    folder = tmp_path / "step_4"
    (folder / "accelerate_state").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(at_checkpoint.__dict__))
    run = make_run(tmp_path, last_checkpoint=folder, max_skipped_steps=1, step=7)
    run.spikes = window(values=[(9.0, 9.0)] * 6)
    assert faults.skip_step(run, logger()[1], {"reason": "loss spike", "step_loss": 9.0, "loss_limit": 8.0}) is True
    assert run.state.step == 4 and run.spikes.recorded == 5 and torch.equal(run.spikes.values, saved.values)
