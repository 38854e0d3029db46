"""pretrain/training/compute_plan.py and Utilities/chinchilla-estimation.py: FLOPs, Hoffmann et al.'s law, time, energy,
the same plan in `pre-training.py --dry-run`, and the plan beside a run's result."""

import math

import numpy as np
import pytest

from pretrain.errors import InputError
from pretrain.model.build import llama_config
from pretrain.training import compute_plan, telemetry
from pretrain.training.compute_plan import ComputePlan, chinchilla_loss, compute_optimal, compute_optimal_tokens
from pretrain.training.state import TrainState
from specifications import load_spec
from tests.helpers.runs import REPO, run_script


def test_counts_are_written_short():
    assert [compute_plan.sci(x) for x in (7.4512e18, 1_460_000, 512, 2.5e-3)] == ["7.45e18", "1.46e6", "512",
                                                                                 "0.0025"]


def test_the_law_gives_chinchillas_own_prediction():
    # Chinchilla, 70B parameters on 1.4T tokens: the paper's fit puts it at about 1.94 nats.
    assert chinchilla_loss(70e9, 1.4e12) == pytest.approx(1.937, abs=1e-3)
    assert chinchilla_loss(1e30, 1e30) == pytest.approx(compute_plan.E)


@pytest.mark.parametrize("flops", [1e17, 6e18, 1e21, 5.76e23])
def test_the_compute_optimal_size_is_the_minimum_of_the_law_at_that_compute(flops):
    sizes = np.logspace(5, 13, 200_001)
    losses = compute_plan.E + compute_plan.A / sizes ** compute_plan.ALPHA + \
        compute_plan.B / (flops / (6 * sizes)) ** compute_plan.BETA
    scanned = sizes[np.argmin(losses)]
    parameters, tokens = compute_optimal(flops)
    assert parameters == pytest.approx(scanned, rel=0.01)
    assert 6 * parameters * tokens == pytest.approx(flops)
    # The tokens for which that size is optimal are that budget's tokens.
    assert compute_optimal_tokens(parameters) == pytest.approx(tokens, rel=1e-9)


def plan_of(spec_file="specs.yaml", *overrides, processes=1, **throughput):
    spec = load_spec(REPO / spec_file, overrides)
    return spec, compute_plan.plan_for_spec(spec, processes, **throughput)


def test_a_spec_plan_counts_flops_as_telemetry_does():
    spec, plan = plan_of("specs.yaml", "training_args.max_steps=1000", processes=8)
    ids = compute_plan.SPECIAL_IDS
    config = llama_config(spec, ids, spec.model.vocab_size)
    assert plan.parameters == 162_417_408 == telemetry.parameter_count(config)
    assert plan.tokens == 1000 * 8 * 8 * 8 * 2048
    assert plan.flops_per_token == telemetry.flops_per_token(config, 2048)
    assert compute_plan.plan_for_spec(spec, 8, tokens=123).tokens == 123  # given tokens win over max_steps


def test_plan_lines_for_a_spec_with_time_and_energy():
    _, plan = plan_of("specs.yaml", tokens=6_200_000_000, tokens_per_second=100_000, gpu_watts=700, gpus=2)
    lines = compute_plan.plan_lines(plan)
    n, d = 162_417_408, 6_200_000_000
    loss = chinchilla_loss(n, d)
    best_n, best_d = compute_optimal(6 * n * d)
    assert lines[0] == "parameters (N): 162,417,408"
    assert lines[1] == "tokens (D): 6,200,000,000 (38.2 tokens per parameter)"
    assert lines[2] == (f"training FLOPs: {compute_plan.sci(d * plan.flops_per_token)} ({plan.flops_per_token:,} = "
                        f"6N + 12·L·d·T per token, as MFU counts them)")
    assert f"  predicted loss for this N and D: {loss:.3f} (perplexity {math.exp(loss):.1f})" in lines
    assert (f"  compute-optimal size for this budget (6·N·D = {compute_plan.sci(6 * n * d)} FLOPs): {best_n:,.0f} "
            f"parameters on {compute_plan.sci(best_d)} tokens") in "\n".join(lines)
    assert any("not ours" in line for line in lines)
    hours = d / 100_000 / 3600
    assert lines[-2] == f"wall-clock: {hours:,.2f} hours at 100,000 tokens/s"
    assert lines[-1].startswith(f"energy: {0.7 * 2 * hours:,.2f} kWh for 2 GPU(s) at 700 W (the GPUs alone")


def test_a_spec_without_max_steps_plans_what_it_can():
    _, plan = plan_of("specs.yaml")
    assert plan.tokens is None and plan.hours is None and plan.gpu_kwh is None
    lines = compute_plan.plan_lines(plan)
    assert lines[1].startswith("tokens (D): set by the data (num_train_epochs)")
    assert not any(line.startswith("training FLOPs") or "predicted loss" in line for line in lines)
    assert any(line.startswith("  compute-optimal tokens for this size:") for line in lines)


def test_the_estimator_from_parameters_and_tokens():
    result = run_script("Utilities/chinchilla-estimation.py", "--parameters", "460e6", "--tokens", "9.3e9")
    assert result.returncode == 0, result.stderr
    loss = chinchilla_loss(460e6, 9.3e9)
    lines = result.stdout.splitlines()
    assert lines[:3] == ["parameters (N): 460,000,000", "tokens (D): 9,300,000,000 (20.2 tokens per parameter)",
                         "training FLOPs: 2.57e19 (2,760,000,000 = 6N per token; the 12·L·d·T attention term needs "
                         "the model's shape: give a spec)"]
    # A loss in nats: its perplexity is e^L, not the 2^L the original printed.
    assert f"  predicted loss for this N and D: {loss:.3f} (perplexity {math.exp(loss):.1f})" in lines


def test_the_estimator_from_a_spec_with_overrides(capsys):
    compute_plan.main(["--spec-file", str(REPO / "specs-460m.yaml"), "training_args.max_steps=100", "--gpus", "4",
                       "--tokens-per-second", "50000"])
    out = capsys.readouterr().out
    tokens = 100 * 8 * 4 * 8 * 2048
    assert "parameters (N): 468,239,360" in out
    assert f"tokens (D): {tokens:,}" in out
    assert f"wall-clock: {tokens / 50000 / 3600:,.2f} hours at 50,000 tokens/s" in out
    assert "energy:" not in out  # no GPU power given


@pytest.mark.parametrize("argv,message", [
    ([], "give either --spec-file (a spec to plan) or --parameters (with --tokens), not neither"),
    (["--spec-file", "specs.yaml", "--parameters", "1e6"], "not both"),
    (["--parameters", "1e6"], "--parameters needs --tokens"),
    (["--parameters", "1e6", "--tokens", "1e9", "training_args.max_steps=3"],
     "overrides such as 'training_args.max_steps=3' need --spec-file"),
    (["--parameters", "1e6", "--tokens", "1e9", "--gpu-watts", "700"], "--gpu-watts needs --tokens-per-second"),
    (["--spec-file", "specs.yaml"], "has no training_args.max_steps"),
])
def test_the_estimator_refuses_what_it_cannot_plan(argv, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(InputError) as caught:
        compute_plan.main(argv)
    assert message in str(caught.value)


def test_the_estimator_rejects_bad_numbers_with_exit_2():
    result = run_script("Utilities/chinchilla-estimation.py", "--parameters", "-5", "--tokens", "1e9")
    assert result.returncode == 2
    assert "--parameters: expected a positive number (e.g. 460e6), not '-5'" in result.stderr
    result = run_script("Utilities/chinchilla-estimation.py", "--spec-file", "specs.yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: specs.yaml has no training_args.max_steps")


def test_dry_run_prints_the_same_plan():
    result = run_script("pre-training.py", "--spec-file", "specs-460m.yaml", "--dry-run",
                        "training_args.max_steps=2000", env={"WORLD_SIZE": "2"})
    assert result.returncode == 0, result.stderr
    _, plan = plan_of("specs-460m.yaml", "training_args.max_steps=2000", processes=2)
    expected = compute_plan.plan_lines(plan)
    assert plan.tokens == 2000 * 8 * 2 * 8 * 2048
    assert "\n".join(expected) in result.stdout


def test_the_result_sits_beside_the_plan():
    plan = ComputePlan(parameters=100_000_000, tokens=20_000_000_000, flops_per_token=600_000_000)
    state = TrainState(tokens_seen=10_000_000_000, energy_kwh=1.5, co2_kg=0.15, run_seconds=7200)
    lines = compute_plan.result_lines(plan, state, eval_loss=4.0, machines=2)
    law = chinchilla_loss(1e8, 1e10)
    assert lines[:4] == [
        "# plan and result",
        f"tokens: 10,000,000,000 trained, 20,000,000,000 planned (100.00 per parameter; compute-optimal for this "
        f"size: {compute_plan.sci(compute_optimal_tokens(1e8))})",
        "time: 2 hours of wall-clock (start-up, evaluation and checkpoints included), every run of this training "
        "included",
        "energy: 1.5 kWh, 0.15 kg CO2eq (CodeCarbon, 2 machine(s) this run, every run of this training included)"]
    assert lines[4].startswith(f"final eval loss: 4.0000 (perplexity {math.exp(4):.2f}); the law predicts {law:.3f}")
    assert compute_plan.result_lines(plan, state, None, None)[3:] == [
        "energy: not measured (extra_args.track_energy is false)",
        "final eval loss: not measured (training_args.do_eval is false)"]
    unmeasured = TrainState(tokens_seen=0)
    assert compute_plan.result_lines(plan, unmeasured, 6.0, 0)[3:] == [
        "energy: not measured (no machine could start its tracker; see the warnings above)",
        f"final eval loss: 6.0000 (perplexity {math.exp(6):.2f}); no tokens trained, so no prediction from the law"]


@pytest.mark.parametrize("parameters,tokens", [(623_232, 307_200), (162_417_408, 1_000_000), (50e9, 1e12)])
def test_outside_the_fitted_range_the_law_predicts_nothing(parameters, tokens):
    plan = ComputePlan(parameters=int(parameters), tokens=int(tokens), flops_per_token=6 * int(parameters))
    lines = compute_plan.plan_lines(plan)
    text = "\n".join(lines)
    assert "predicted loss" not in text and "compute-optimal size for this budget" not in text
    assert (f"  no prediction: Hoffmann et al. fitted their law on models of 7e7 to 1.6e10 parameters and 5e9 to "
            f"5e11 tokens, and this run ({compute_plan.sci(parameters)} parameters, {compute_plan.sci(tokens)} tokens) "
            f"lies outside that range") in lines
    state = TrainState(tokens_seen=int(tokens), run_seconds=60)
    result = compute_plan.result_lines(plan, state, eval_loss=4.0, machines=None)
    assert result[4].startswith(f"final eval loss: 4.0000 (perplexity {math.exp(4):.2f}); no prediction: ")
    assert "the law predicts" not in "\n".join(result)
    assert compute_plan.outside_fit(162_417_408, 6.2e9) is None


def test_the_quickstart_plan_makes_no_prediction():
    result = run_script("Utilities/chinchilla-estimation.py", "--spec-file", str(REPO / "specs-tiny.yaml"))
    assert result.returncode == 0, result.stderr
    assert "no prediction: Hoffmann et al. fitted their law" in result.stdout
    assert "predicted loss" not in result.stdout and "perplexity 6.462e+07" not in result.stdout
