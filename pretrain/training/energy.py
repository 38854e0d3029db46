"""Energy and CO2 of a training run, measured offline by CodeCarbon: one tracker per machine, totals summed over
the machines and carried across resumes and rollbacks.

    meter = start_energy_meter(spec, accelerator, output_dir, state)  # every process; local main processes track
    fields = meter.update(state)     # every process (a collective): {"energy_kwh": ..., "co2_kg": ...} and state
    meter.copy_into(folder)          # the main process, while saving: the trackers' CSV files into a checkpoint
    meter.stop()

The local main process of each machine runs that machine's one tracker, in CodeCarbon's machine mode: the machine's
GPUs, CPU and RAM are counted once however many processes train on it. Each tracker writes its own CSV in
output_dir (`emissions.csv` for the machine of process 0, `emissions-process<N>.csv` for the machine whose first
process is N), one row per run, rewritten at every update(). The totals a run reports are the checkpoint's totals
it started from plus what every machine measured since.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from pathlib import Path

import psutil

from pretrain.errors import first_line

INSTALL = "pip install 'codecarbon>=2.8,<4'"
MEASURED_CPU_MODES = {"intel_rapl": "RAPL", "windows_emi": "the Energy Meter Interface",
                      "intel_power_gadget": "Intel Power Gadget"}


class EnergyMeter:
    """This machine's tracker (on its local main process only; None elsewhere) and the run's running totals."""

    def __init__(self, accelerator, output_dir: Path, state, tracker=None, csv_path: Path | None = None,
                 enabled: bool = True):
        self.accelerator, self.output_dir, self.enabled = accelerator, output_dir, enabled
        self.tracker, self.csv_path = tracker, csv_path
        # What earlier runs of this training measured: a rollback reloads an older TrainState, but the energy it
        # spent since that checkpoint was spent all the same.
        self.base_kwh, self.base_co2_kg, self.base_seconds = state.energy_kwh, state.co2_kg, state.run_seconds
        # The process's own start: imports and set-up hold the machine too.
        self.started = psutil.Process().create_time()
        self.machines: int | None = None   # trackers that ran this run, summed over machines at each update()
        self.last, self.stopped = (0.0, 0.0), False

    def update(self, state) -> dict:
        """Every process calls it: the trackers flush, their figures are summed over the machines, and `state`
        gets the totals. Returns the fields of a metrics record ({} when energy tracking is off)."""
        state.run_seconds = self.base_seconds + time.time() - self.started
        if not self.enabled:
            return {}
        kwh, co2_kg = self.read_tracker()
        machines = 1.0 if self.tracker is not None else 0.0
        if self.accelerator.num_processes > 1:
            import torch

            totals = torch.tensor([kwh, co2_kg, machines], dtype=torch.float64, device=self.accelerator.device)
            kwh, co2_kg, machines = self.accelerator.reduce(totals, reduction="sum").tolist()
        self.machines = int(machines)
        state.energy_kwh, state.co2_kg = self.base_kwh + kwh, self.base_co2_kg + co2_kg
        return {"energy_kwh": state.energy_kwh, "co2_kg": state.co2_kg}

    def read_tracker(self) -> tuple[float, float]:
        """(kWh, kg CO2eq) this machine's tracker measured in this run, as its CSV row has them; (0, 0) without
        one. A failed flush keeps the last figures, which are never larger than the truth."""
        if self.tracker is None:
            return 0.0, 0.0
        if self.stopped:
            return self.last
        try:
            self.tracker.flush()
            row = own_row(self.csv_path, str(self.tracker.run_id))
            if row is not None:
                self.last = (float(row["energy_consumed"]), float(row["emissions"]))
        except Exception:  # noqa: BLE001 - the tracker is a bystander: nothing it raises may end a run
            pass
        return self.last

    def copy_into(self, folder: Path, say=print):
        """Copy every tracker CSV in output_dir into a checkpoint folder being written (main process only). The
        other processes are then waiting at the save's next collective, so no tracker rewrites its file meanwhile."""
        for path in sorted(self.output_dir.glob("emissions*.csv")):
            try:
                shutil.copy2(path, folder / path.name)
            except OSError as error:
                say(f"warning: could not copy {path.name} into {folder} ({error.strerror or first_line(error)})")

    def stop(self):
        """Stop this machine's tracker, which writes its last row; safe to call more than once."""
        if self.tracker is not None and not self.stopped:
            self.stopped = True
            try:
                self.tracker.stop()
            except Exception:  # noqa: BLE001 - see read_tracker
                pass


def start_energy_meter(spec, accelerator, output_dir: Path, state, resumed_from: Path | None = None,
                       say=print) -> EnergyMeter:
    """The run's meter; on each machine's local main process it starts that machine's tracker, when
    extra_args.track_energy is on. A tracker that cannot start is a warning and counts as 0.

    A run resumed into an output_dir without this machine's CSV starts from the checkpoint's copy, so the file
    keeps one row per run of the training.
    """
    e = spec.extra
    if not e.track_energy:
        return EnergyMeter(accelerator, output_dir, state, enabled=False)
    tracker = csv_path = None
    if accelerator.is_local_main_process:
        index = accelerator.process_index
        csv_path = output_dir / ("emissions.csv" if index == 0 else f"emissions-process{index}.csv")
        saved = resumed_from / csv_path.name if resumed_from is not None else None
        if saved is not None and saved.is_file() and not csv_path.exists():
            shutil.copy2(saved, csv_path)
        tracker = start_tracker(csv_path, e.energy_country_iso_code, e.energy_region, spec.model.model_id, say)
    return EnergyMeter(accelerator, output_dir, state, tracker, csv_path)


def start_tracker(csv_path: Path, country: str, region: str | None, project: str, say=print):
    """A started OfflineEmissionsTracker writing `csv_path`, or None after a one-line warning."""
    try:
        from codecarbon import OfflineEmissionsTracker
    except ImportError as error:
        say(f"warning: energy and CO2 are not measured: codecarbon cannot be imported ({first_line(error)}); "
            f"{INSTALL}, or set extra_args.track_energy=false")
        return None
    # Before the tracker exists: its constructor logs at info level before it applies log_level.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    try:
        tracker = OfflineEmissionsTracker(
            country_iso_code=country.upper(), region=region, output_dir=str(csv_path.parent),
            output_file=csv_path.name, project_name=project, tracking_mode="machine", log_level="error",
            # One tracker per machine is ours to guarantee; codecarbon's own guard is a lock file in /tmp plus
            # SIGINT/SIGTERM handlers that would exit before our own handlers save a checkpoint.
            allow_multiple_runs=True, on_csv_write="update")
        tracker.start()
        # start() swallows its errors; a first flush says whether it really started (None if not).
        started = tracker.flush() is not None
    except Exception as error:  # noqa: BLE001 - a library failing to measure must not end a run
        say(f"warning: energy and CO2 are not measured on this machine: codecarbon's tracker failed to start "
            f"({first_line(error)}); set extra_args.track_energy=false to silence this")
        return None
    if not started:
        say("warning: energy and CO2 are not measured on this machine: codecarbon's tracker did not start; set "
            "extra_args.track_energy=false to silence this")
        return None
    say(describe_estimates(tracker, country.upper(), region))
    return tracker


def describe_estimates(tracker, country: str, region: str | None) -> str:
    """One line saying what the tracker measures and what it estimates on this machine."""
    import torch

    hardware = {type(item).__name__: item for item in getattr(tracker, "_hardware", [])}
    detected = tracker.get_detected_hardware()
    if "GPU" in hardware:
        gpus = f"GPUs measured by NVML ({detected.get('gpu_model') or 'unnamed'})"
    elif torch.cuda.is_available():
        gpus = "GPUs NOT measured (NVML cannot read them), so the totals leave them out"
    else:
        gpus = "no GPU"
    mode = getattr(hardware.get("CPU"), "_mode", None)
    if mode in MEASURED_CPU_MODES:
        cpu = f"CPU measured by {MEASURED_CPU_MODES[mode]}"
    elif mode == "cpu_load":
        cpu = "CPU estimated from its load and its model's TDP (no RAPL counters readable)"
    elif mode == "constant":
        cpu = "CPU estimated as a constant TDP (no RAPL counters readable)"
    elif "AppleSiliconChip" in hardware:
        cpu = "CPU and GPU measured by powermetrics"
    else:
        cpu = "CPU not counted"
    return (f"energy: one CodeCarbon tracker on this machine: {gpus}; {cpu}; RAM estimated from its size; CO2 from "
            f"{carbon_source(country, region)}")


def carbon_source(country: str, region: str | None) -> str:
    """Which electricity mix turns kWh into CO2: the country's, or codecarbon's world average when it has none."""
    try:
        from codecarbon.input import DataSource

        mix = DataSource().get_global_energy_mix_data().get(country)
    except Exception:  # noqa: BLE001 - only the wording of the line depends on it
        mix = {"country_name": country}
    if mix is None:
        return (f"codecarbon's world average: it has no electricity mix for '{country}' (set "
                f"extra_args.energy_country_iso_code to a 3-letter ISO code such as BRA)")
    where = f"{region}, {mix.get('country_name', country)}" if region else mix.get("country_name", country)
    intensity = mix.get("carbon_intensity")
    return f"the electricity mix of {where}" + (f" ({intensity:.0f} gCO2eq/kWh)" if intensity and not region else "")


def own_row(path: Path, run_id: str) -> dict | None:
    """The last row of `run_id` in a CodeCarbon CSV (a resumed run adds its own row beside the earlier runs')."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("run_id") == run_id]
    return rows[-1] if rows else None
