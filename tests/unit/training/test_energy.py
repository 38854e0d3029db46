"""pretrain/training/energy.py: energy and CO2 measured by CodeCarbon during a run, one tracker per machine, cumulative
across resumes and rollbacks. The launches with several processes and machines are in test_distributed.py."""

import csv
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.training import compute_plan, energy
from pretrain.training.state import TrainState
from tests.helpers.runs import TINY_MODEL, run_script

TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4", "training_args.gradient_accumulation_steps=1",
        "training_args.learning_rate=0.005", "training_args.warmup_steps=2", "training_args.max_steps=6",
        "training_args.evaluation_strategy=no", "extra_args.checkpointing_steps=3", "extra_args.sample_every=null",
        "extra_args.wandb_log_steps=1", "extra_args.mixed_precision=no", "extra_args.track_energy=true"]
DESCRIBED = "energy: one CodeCarbon tracker on this machine: "


def train(tokenizer, data, output_dir, *overrides):
    result = run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                        f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                        f"training_args.output_dir={output_dir}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_records(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def trainer_state(folder):
    return json.loads((folder / "trainer_state.json").read_text())


def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def brazil_kg_per_kwh():
    from codecarbon.input import DataSource

    return DataSource().get_global_energy_mix_data()["BRA"]["carbon_intensity"] / 1000


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """6 steps on one process, a checkpoint at step 3, energy logged every step."""
    output_dir = tmp_path_factory.mktemp("energy") / "out"
    return output_dir, train(sample_tokenizer, sample_tokenized, output_dir)


def test_energy_grows_step_by_step_and_co2_follows_the_country(measured_run):
    output_dir, result = measured_run
    records = train_records(output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    energies = [r["energy_kwh"] for r in records]
    # Never down; flat only between two readings a few milliseconds apart, which CodeCarbon does not re-measure.
    assert energies[0] > 0 and all(b >= a for a, b in zip(energies, energies[1:])) and energies[-1] > energies[0]
    for record in records:
        assert record["co2_kg"] == pytest.approx(record["energy_kwh"] * brazil_kg_per_kwh(), rel=1e-6)
    # Said once, by the one tracker: what is measured and what is estimated on this machine.
    assert result.stdout.count(DESCRIBED) == 1
    described = next(line for line in result.stdout.splitlines() if line.startswith(DESCRIBED))
    assert "RAM estimated from its size" in described and "electricity mix of Brazil" in described
    if not torch.cuda.is_available():
        assert "no GPU" in described


def test_checkpoints_carry_the_totals_and_the_trackers_file(measured_run):
    output_dir, _ = measured_run
    records = {r["step"]: r for r in train_records(output_dir)}
    step_3 = trainer_state(output_dir / "step_3")
    # Saved after step 3's log line and before step 4's.
    assert records[3]["energy_kwh"] <= step_3["energy_kwh"] <= records[4]["energy_kwh"]
    assert step_3["run_seconds"] > 0
    for folder in ("step_3", "final-checkpoint"):
        [row] = csv_rows(output_dir / folder / "emissions.csv")
        state = trainer_state(output_dir / folder)
        # The file beside the checkpoint is the tracker's row as of that checkpoint's totals.
        assert float(row["energy_consumed"]) == pytest.approx(state["energy_kwh"], rel=1e-12)
        assert float(row["emissions"]) == pytest.approx(state["co2_kg"], rel=1e-12)
        assert (row["country_iso_code"], row["tracking_mode"]) == ("BRA", "machine")
    # The tracker's own file in output_dir has its last row, written when it stopped after the final checkpoint.
    [last] = csv_rows(output_dir / "emissions.csv")
    assert float(last["energy_consumed"]) >= trainer_state(output_dir / "final-checkpoint")["energy_kwh"]


def test_the_summary_puts_the_plan_beside_the_result(measured_run):
    output_dir, result = measured_run
    final = trainer_state(output_dir / "final-checkpoint")
    summary = result.stdout[result.stdout.index("# plan and result"):].splitlines()
    assert summary[1].startswith("tokens: 3,072 trained, 3,072 planned (")
    assert summary[2].startswith(f"time: {final['run_seconds'] / 3600:.4g} hours of wall-clock")
    assert summary[3] == (f"energy: {final['energy_kwh']:.6g} kWh, {final['co2_kg']:.6g} kg CO2eq (CodeCarbon, "
                          f"1 machine(s) this run, every run of this training included)")
    evaluation = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    config = json.loads((output_dir / "final-checkpoint" / "config.json").read_text())
    parameters = compute_plan.telemetry.parameter_count(SimpleNamespace(**config))
    # A tiny model on a few thousand tokens lies far outside the range the law was fitted on: no prediction.
    assert compute_plan.outside_fit(parameters, 3072)
    assert summary[4] == (f"final eval loss: {evaluation['eval_loss']:.4f} (perplexity "
                          f"{math.exp(evaluation['eval_loss']):.2f}); {compute_plan.outside_fit(parameters, 3072)}")


def test_a_resumed_run_continues_from_the_checkpoints_total(measured_run, sample_tokenizer, sample_tokenized,
                                                            tmp_path):
    output_dir, _ = measured_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "step_3", resumed_dir / "step_3")
    train(sample_tokenizer, sample_tokenized, resumed_dir, "training_args.resume_from_checkpoint=latest")
    saved = trainer_state(resumed_dir / "step_3")
    records = train_records(resumed_dir)
    assert [r["step"] for r in records] == [4, 5, 6]
    energies = [r["energy_kwh"] for r in records]
    assert energies[0] > saved["energy_kwh"] and all(b >= a for a, b in zip(energies, energies[1:]))
    final = trainer_state(resumed_dir / "final-checkpoint")
    assert final["run_seconds"] > saved["run_seconds"]
    # The machine's file went on from the checkpoint's: one row per run, adding up to the total.
    rows = csv_rows(resumed_dir / "final-checkpoint" / "emissions.csv")
    assert len(rows) == 2 and rows[0]["run_id"] == csv_rows(output_dir / "step_3" / "emissions.csv")[0]["run_id"]
    assert sum(float(r["energy_consumed"]) for r in rows) == pytest.approx(final["energy_kwh"], rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# The meter, with a stand-in for CodeCarbon's tracker

class StandInTracker:
    """Writes the CSV row CodeCarbon writes on flush(), its energy growing by 1 kWh per flush."""

    def __init__(self, path: Path):
        self.path, self.run_id, self.flushes, self.stopped = path, "run-1", 0, 0

    def flush(self):
        self.flushes += 1
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["run_id", "energy_consumed", "emissions"])
            writer.writeheader()
            writer.writerow({"run_id": self.run_id, "energy_consumed": self.flushes, "emissions": self.flushes / 10})
        return self.flushes / 10

    def stop(self):
        self.stopped += 1


def one_process():
    return SimpleNamespace(num_processes=1, is_main_process=True, is_local_main_process=True, process_index=0,
                           device=torch.device("cpu"))


def test_a_rollback_never_takes_energy_back(tmp_path):
    state = TrainState(step=10, energy_kwh=5.0, co2_kg=0.5)  # as resumed from a checkpoint
    tracker = StandInTracker(tmp_path / "emissions.csv")
    meter = energy.EnergyMeter(one_process(), tmp_path, state, tracker, tmp_path / "emissions.csv")
    assert meter.update(state) == {"energy_kwh": 6.0, "co2_kg": 0.6}
    assert meter.update(state) == {"energy_kwh": 7.0, "co2_kg": pytest.approx(0.7)}
    state.__dict__.update(TrainState(step=10, energy_kwh=5.5, co2_kg=0.55).__dict__)  # what roll_back does
    assert meter.update(state) == {"energy_kwh": 8.0, "co2_kg": pytest.approx(0.8)}
    assert (state.energy_kwh, meter.machines) == (8.0, 1)
    meter.stop()
    meter.stop()
    assert tracker.stopped == 1
    # A stopped tracker still counts what it measured.
    assert meter.update(state) == {"energy_kwh": 8.0, "co2_kg": pytest.approx(0.8)} and tracker.flushes == 3


def test_a_meter_that_is_off_or_has_no_tracker(tmp_path):
    state = TrainState(energy_kwh=2.0, run_seconds=100.0)
    off = energy.EnergyMeter(one_process(), tmp_path, state, enabled=False)
    assert off.update(state) == {} and state.energy_kwh == 2.0 and state.run_seconds > 100.0
    untracked = energy.EnergyMeter(one_process(), tmp_path, state)
    assert untracked.update(state) == {"energy_kwh": 2.0, "co2_kg": 0.0} and untracked.machines == 0


def test_copies_into_a_checkpoint_every_trackers_file(tmp_path):
    for name in ("emissions.csv", "emissions-process8.csv", "metrics.jsonl"):
        (tmp_path / name).write_text(name)
    folder = tmp_path / "step_3"
    folder.mkdir()
    meter = energy.EnergyMeter(one_process(), tmp_path, TrainState(), enabled=False)
    meter.copy_into(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["emissions-process8.csv", "emissions.csv"]
    messages = []
    meter.copy_into(tmp_path / "gone", say=messages.append)
    assert messages and messages[0].startswith("warning: could not copy emissions-process8.csv into")


# ----------------------------------------------------------------------------------------------------------------
# A tracker that cannot start is a warning, never the end of a run

def spec_with(**extra):
    fields = {"track_energy": True, "energy_country_iso_code": "BRA", "energy_region": None, **extra}
    return SimpleNamespace(extra=SimpleNamespace(**fields), model=SimpleNamespace(model_id="tiny"))


def test_without_codecarbon_a_run_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # what `import codecarbon` sees when it is not installed
    messages = []
    meter = energy.start_energy_meter(spec_with(), one_process(), tmp_path, TrainState(), say=messages.append)
    assert meter.tracker is None and len(messages) == 1
    assert messages[0].startswith("warning: energy and CO2 are not measured: codecarbon cannot be imported (")
    assert messages[0].endswith("pip install 'codecarbon>=2.8,<4', or set extra_args.track_energy=false")
    assert meter.update(TrainState()) == {"energy_kwh": 0.0, "co2_kg": 0.0} and meter.machines == 0


class FailingTracker:
    def __init__(self, how, **options):
        self.how, self.options = how, options

    def start(self):
        if self.how == "raises":
            raise RuntimeError("NVML Shared Library Not Found\nmore detail")

    def flush(self):
        return None  # what a tracker whose start() swallowed its error answers


@pytest.mark.parametrize("how,message", [
    ("raises", "warning: energy and CO2 are not measured on this machine: codecarbon's tracker failed to start "
               "(NVML Shared Library Not Found); set extra_args.track_energy=false to silence this"),
    ("silent", "warning: energy and CO2 are not measured on this machine: codecarbon's tracker did not start; set "
               "extra_args.track_energy=false to silence this"),
])
def test_a_tracker_that_fails_to_start_is_a_warning(tmp_path, monkeypatch, how, message):
    import codecarbon

    made = []
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker",
                        lambda **options: made.append(FailingTracker(how, **options)) or made[-1])
    messages = []
    assert energy.start_tracker(tmp_path / "emissions.csv", "bra", None, "tiny", say=messages.append) is None
    assert messages == [message]
    options = made[0].options
    assert (options["country_iso_code"], options["tracking_mode"], options["output_file"]) == \
        ("BRA", "machine", "emissions.csv")
    assert options["allow_multiple_runs"] is True  # codecarbon's lock would install its own signal handlers


def test_an_unknown_country_falls_back_on_the_world_average():
    assert energy.carbon_source("BRA", None) == (f"the electricity mix of Brazil "
                                                 f"({brazil_kg_per_kwh() * 1000:.0f} gCO2eq/kWh)")
    assert energy.carbon_source("USA", "california") == "the electricity mix of california, United States"
    assert energy.carbon_source("XYZ", None).startswith("codecarbon's world average: it has no electricity mix for "
                                                        "'XYZ'")


def test_off_means_no_tracker_and_no_file(tmp_path):
    meter = energy.start_energy_meter(spec_with(track_energy=False), one_process(), tmp_path, TrainState())
    assert not meter.enabled and meter.tracker is None and not list(tmp_path.iterdir())
