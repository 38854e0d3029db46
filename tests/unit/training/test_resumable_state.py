"""save_resumable_state / load_resumable_state in one process: everything a resumed run needs comes back exactly,
a failed write is an OSError that names its cause, and a checkpoint of an earlier version (accelerate's save_state)
still resumes. tests/scripts/test_resume_launches.py moves the state between launches (one process, DDP, FSDP)."""

import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pretrain.training import checkpoints
from tests.helpers.runs import REPO


def tiny_training(seed: int):
    """A model with a matrix and a bias, AdamW, a schedule and fp16's loss scaler, as the training loop holds them."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    accelerator = SimpleNamespace(process_index=0, is_main_process=True, scaler=torch.amp.GradScaler("cpu"))
    return accelerator, model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, accelerator, steps: int):
    for _ in range(steps):
        loss = model(torch.randn(3, 4)).square().mean()
        accelerator.scaler.scale(loss).backward()
        accelerator.scaler.step(optimizer)
        accelerator.scaler.update()
        optimizer.zero_grad()
        scheduler.step()


def test_model_optimizer_schedule_scaler_and_random_states_come_back_exactly(tmp_path):
    accelerator, model, optimizer, scheduler = tiny_training(seed=0)
    train_steps(model, optimizer, scheduler, accelerator, steps=3)
    accelerator.scaler.update(new_scale=1024.0)  # not the default: the loaded scaler must be the saved one
    checkpoints.save_resumable_state(accelerator, model, optimizer, scheduler, tmp_path / "state")
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    train_steps(model, optimizer, scheduler, accelerator, steps=2)
    expected = [p.detach().clone() for p in model.parameters()]

    # A fresh run with other weights and no optimizer state, as a resumed run starts.
    accelerator2, model2, optimizer2, scheduler2 = tiny_training(seed=1)
    checkpoints.load_resumable_state(accelerator2, model2, optimizer2, scheduler2, tmp_path / "state")
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    assert scheduler2.last_epoch == 3 and accelerator2.scaler.get_scale() == 1024.0
    assert optimizer2.state_dict()["state"][0]["step"] == 3
    train_steps(model2, optimizer2, scheduler2, accelerator2, steps=2)
    for got, want in zip(model2.parameters(), expected):
        assert torch.equal(got, want)


def test_a_process_the_saving_launch_did_not_have_takes_the_main_process_random_state(tmp_path):
    accelerator, model, optimizer, scheduler = tiny_training(seed=0)
    checkpoints.save_resumable_state(accelerator, model, optimizer, scheduler, tmp_path / "state")
    expected = random.random()
    second = SimpleNamespace(process_index=1, is_main_process=False, scaler=None)
    checkpoints.load_resumable_state(second, *tiny_training(seed=1)[1:], tmp_path / "state")
    assert random.random() == expected


def test_a_failed_write_is_an_os_error_with_its_cause(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full_disk)
    with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device$"):
        checkpoints.save_resumable_state(*tiny_training(seed=0), tmp_path / "state")


# An earlier version's checkpoint, written by accelerate's save_state (the scheduler registered as its one object),
# then resumed by this version: each in a process of its own, as accelerate's state is one per process.
EARLIER_LAYOUT = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from pretrain.training import checkpoints

folder, mode = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0 if mode == "save" else 1)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
model, optimizer = accelerator.prepare(model, optimizer)


def train(steps):
    torch.manual_seed(7)
    for _ in range(steps):
        accelerator.backward(model(torch.randn(3, 4)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


if mode == "save":
    accelerator.register_for_checkpointing(scheduler)
    train(3)
    accelerator.save_state(str(folder))
else:
    checkpoints.load_resumable_state(accelerator, model, optimizer, scheduler, folder)
    checkpoints.load_resumable_state(accelerator, model, optimizer, scheduler, folder)  # as a rollback would again
    assert scheduler.last_epoch == 3
train(2)
print(*[float(p.sum()) for p in model.parameters()])
"""


def test_a_checkpoint_of_accelerates_save_state_still_resumes(tmp_path):
    runs = [subprocess.run([sys.executable, "-c", EARLIER_LAYOUT, str(tmp_path / "state"), mode], cwd=REPO,
                           capture_output=True, text=True, timeout=120) for mode in ("save", "load")]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "state" / "optimizer.bin").is_file()
    assert runs[1].stdout.split() == runs[0].stdout.split()
