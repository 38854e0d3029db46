"""The learning-rate schedules of pretrain/model/optimizer.py: warmup_stable_decay against its formula in each shape,
cosine_with_min_lr's floor, the dry run's description, and a resumed run following its own schedule."""

import math

import pytest
import torch

from pretrain.model.optimizer import align_schedule, build_scheduler, schedule_line, step_learning_rates
from specifications import load_spec
from tests.helpers.runs import REPO

PEAK = 0.01
SHAPES = {"1-sqrt": lambda p: 1 - math.sqrt(p), "linear": lambda p: 1 - p,
          "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}


def wsd_spec(*overrides):
    return load_spec(REPO / "specs.yaml", ["training_args.lr_scheduler_type=warmup_stable_decay",
                                           f"training_args.learning_rate={PEAK}", "training_args.warmup_steps=4",
                                           *overrides])


def wsd_formula(step: int, *, warmup: int, decay: int, max_steps: int, shape: str, ratio: float) -> float:
    """The rate optimizer step `step` (1-based) runs with: linear warm-up from ratio x peak, the peak until the decay,
    then the shape over the last `decay` steps, from the peak towards ratio x peak."""
    index = step - 1  # the scheduler's count of steps taken before this one
    if index < warmup:
        return PEAK * (ratio + (1 - ratio) * index / warmup)
    if index < max_steps - decay:
        return PEAK
    progress = (index - (max_steps - decay)) / decay
    return PEAK * (ratio + (1 - ratio) * SHAPES[shape](progress))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_warmup_stable_decay_holds_the_peak_then_decays_in_its_shape(shape, ratio):
    spec = wsd_spec("training_args.decay_steps=10", f"training_args.decay_shape={shape}",
                    f"training_args.min_lr_ratio={ratio}")
    rates = step_learning_rates(spec, 40)
    expected = [wsd_formula(s, warmup=4, decay=10, max_steps=40, shape=shape, ratio=ratio) for s in range(1, 41)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[4:31] == [PEAK] * 27                  # steps 5-31: the stable phase (step 31 starts the decay at 1)
    assert all(a > b for a, b in zip(rates[30:], rates[31:]))   # falls at every step of the decay
    assert rates[-1] > PEAK * ratio and rates[-1] < PEAK * (ratio + 0.35 * (1 - ratio))


def test_decay_steps_null_is_a_fifth_of_the_run():
    rates = step_learning_rates(wsd_spec(), 50)
    assert rates == pytest.approx([wsd_formula(s, warmup=4, decay=10, max_steps=50, shape="1-sqrt", ratio=0.0)
                                   for s in range(1, 51)], abs=1e-12)


def test_cosine_with_min_lr_keeps_its_floor_of_a_tenth_unless_min_lr_ratio_says_otherwise():
    from transformers import get_scheduler

    def library_rates(min_lr_rate):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=PEAK)
        scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=4, num_training_steps=30,
                                  scheduler_specific_kwargs={"min_lr_rate": min_lr_rate})
        return [PEAK * scheduler.lr_lambdas[0](index) for index in range(30)]

    base = ["training_args.lr_scheduler_type=cosine_with_min_lr", f"training_args.learning_rate={PEAK}",
            "training_args.warmup_steps=4"]
    assert step_learning_rates(load_spec(REPO / "specs.yaml", base), 30) == pytest.approx(library_rates(0.1))
    lower = load_spec(REPO / "specs.yaml", [*base, "training_args.min_lr_ratio=0.02"])
    assert step_learning_rates(lower, 30) == pytest.approx(library_rates(0.02))
    assert library_rates(0.02) != pytest.approx(library_rates(0.1))


def test_the_dry_run_line_names_the_phases():
    spec = wsd_spec("training_args.decay_steps=10", "training_args.min_lr_ratio=0.1",
                    "training_args.decay_shape=linear")
    assert schedule_line(spec, 40) == ("schedule: warmup_stable_decay, warm-up over steps 1-4, stable at 0.01 until "
                                       "step 30, then linear decay over the last 10 steps (31-40) to 0.001 "
                                       "(min_lr_ratio 0.1)")
    assert schedule_line(load_spec(REPO / "specs.yaml", ["training_args.warmup_steps=0"]), 40) == (
        "schedule: cosine, no warm-up to learning_rate 0.0006, 40 steps")


def test_a_resumed_scheduler_runs_the_next_step_with_this_runs_schedule():
    """A checkpoint brings back the step count and the rates of the run that saved it; the run that loads it goes on
    with its own schedule from the next step."""
    def scheduler_for(max_steps, peak=PEAK):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
        spec = load_spec(REPO / "specs.yaml", ["training_args.warmup_steps=4", f"training_args.learning_rate={peak}"])
        return build_scheduler(optimizer, spec, max_steps)

    saved = scheduler_for(40)
    for _ in range(20):
        saved.optimizer.step()
        saved.step()
    resumed = scheduler_for(30, peak=2 * PEAK)
    planned = list(resumed.base_lrs)
    resumed.optimizer.load_state_dict(saved.optimizer.state_dict())
    resumed.load_state_dict(saved.state_dict())
    assert resumed.get_last_lr() == saved.get_last_lr()       # the saving run's rate for step 21
    resumed.base_lrs = planned
    [(before, now)] = align_schedule(resumed)
    assert before == saved.get_last_lr()[0]
    assert now == pytest.approx(2 * PEAK * resumed.lr_lambdas[0](20))
    assert resumed.get_last_lr() == [now] and resumed.optimizer.param_groups[0]["lr"] == now
    assert align_schedule(resumed) == []                      # already following it: nothing changes
