"""pre-training.py with warmup_stable_decay: the rates a run logs, its dry run, and a schedule that cannot fit."""

import json

import pytest

from tests.helpers.runs import TINY_MODEL, run_script
from tests.unit.model.test_schedule import wsd_formula

PEAK = 0.01
TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4", "training_args.gradient_accumulation_steps=1",
        f"training_args.learning_rate={PEAK}", "training_args.warmup_steps=2", "extra_args.wandb_log_steps=1",
        "extra_args.mixed_precision=no", "training_args.do_eval=false", "extra_args.checkpointing_steps=null",
        "extra_args.sample_every=null", "training_args.lr_scheduler_type=warmup_stable_decay"]


def train(tokenizer, data, output_dir, *overrides):
    return run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                      f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                      f"training_args.output_dir={output_dir}", *overrides, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("shape,ratio", [("1-sqrt", 0.0), ("linear", 0.2), ("cosine", 0.1)])
def test_logged_rates_hold_the_peak_then_decay_in_the_chosen_shape(sample_tokenizer, sample_tokenized, tmp_path,
                                                                   shape, ratio):
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "out", "training_args.max_steps=10",
                   "training_args.decay_steps=4", f"training_args.decay_shape={shape}",
                   f"training_args.min_lr_ratio={ratio}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert rates == pytest.approx([wsd_formula(s, warmup=2, decay=4, max_steps=10, shape=shape, ratio=ratio)
                                   for s in range(1, 11)], abs=1e-12)
    assert rates[2:7] == [PEAK] * 5      # steps 3-7: the peak, step 7 being the decay's first
    assert rates[6] > rates[7] > rates[8] > rates[9] > PEAK * ratio


def test_dry_run_shows_the_phases():
    result = run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", "--dry-run",
                        "training_args.lr_scheduler_type=warmup_stable_decay", "training_args.decay_steps=60")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("schedule: warmup_stable_decay, warm-up over steps 1-30, stable at 0.003 until step 240, then 1-sqrt decay "
            "over the last 60 steps (241-300) to 0 (min_lr_ratio 0)") in result.stdout


def test_a_decay_that_cannot_fit_a_run_counted_in_epochs_is_refused(sample_tokenizer, sample_tokenized, tmp_path):
    manifest = json.loads((sample_tokenized / "manifest.json").read_text())
    steps = manifest["splits"]["train"]["blocks"] // 4
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "runs" / "out", "training_args.max_steps=null",
                   "training_args.num_train_epochs=1", f"training_args.decay_steps={steps}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"training_args.warmup_steps (2) and decay_steps ({steps}) add up to more than the run's {steps} "
            f"optimizer steps") in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
