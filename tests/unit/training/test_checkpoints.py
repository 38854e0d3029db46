"""pretrain/training/checkpoints.py without a training run: finding, reading, sizing, tidying and pruning step_N
folders."""

import json
import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest

from pretrain.errors import InputError
from pretrain.training import checkpoints
from pretrain.training.state import TrainState

MiB = 1 << 20


def checkpoint(folder, step=None, **state):
    """A folder that counts as a complete checkpoint: trainer_state.json and accelerate_state/."""
    (folder / "accelerate_state").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
    return folder


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def spec(checkpointing_steps=None, keep_last_checkpoints=None, resume_from_checkpoint=None):
    return SimpleNamespace(extra=SimpleNamespace(checkpointing_steps=checkpointing_steps,
                                                 keep_last_checkpoints=keep_last_checkpoints),
                           training=SimpleNamespace(resume_from_checkpoint=resume_from_checkpoint))


# ------------------------------------------------------------------------------------------------ finding checkpoints

def test_step_folders_are_the_complete_ones_in_numeric_order(tmp_path):
    assert checkpoints.step_folders(tmp_path) == [] and checkpoints.latest_checkpoint(tmp_path) is None
    for step in (2, 10, 3):
        checkpoint(tmp_path / f"step_{step}", step)
    (tmp_path / "step_11").mkdir()                      # still being copied: no trainer_state.json yet
    checkpoint(tmp_path / ".step_12.tmp", 12)           # still being saved
    checkpoint(tmp_path / "step_final", 0)
    checkpoint(tmp_path / "final-checkpoint", 20)
    assert checkpoints.step_folders(tmp_path) == [(2, tmp_path / "step_2"), (3, tmp_path / "step_3"),
                                                  (10, tmp_path / "step_10")]
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "step_10"


def test_read_train_state_takes_the_known_fields_and_defaults_the_rest(tmp_path):
    folder = checkpoint(tmp_path / "step_5", 5, samples_consumed=40, tokens_seen=5120, recent_losses=[3.5, 3.25],
                        name="step_5", tokens_per_step=1024)
    assert checkpoints.read_train_state(folder) == TrainState(step=5, samples_consumed=40, tokens_seen=5120,
                                                              recent_losses=[3.5, 3.25])


def test_resolve_resume(tmp_path):
    said = []
    assert checkpoints.resolve_resume(spec(), tmp_path, said.append) is None
    assert checkpoints.resolve_resume(spec(resume_from_checkpoint="latest"), tmp_path, said.append) is None
    assert said == [f"note: resume_from_checkpoint is 'latest' but {tmp_path} holds no checkpoint; starting fresh"]
    checkpoint(tmp_path / "step_4", 4)
    checkpoint(tmp_path / "step_8", 8)
    assert checkpoints.resolve_resume(spec(resume_from_checkpoint="latest"), tmp_path, said.append) == \
        tmp_path / "step_8"
    assert checkpoints.resolve_resume(spec(resume_from_checkpoint=str(tmp_path / "step_4")), tmp_path,
                                      said.append) == tmp_path / "step_4"
    assert len(said) == 1


@pytest.mark.parametrize("make", [
    lambda folder: None,                                                      # nowhere
    lambda folder: (folder / "accelerate_state").mkdir(parents=True),        # no trainer_state.json
    lambda folder: folder.mkdir() or (folder / "trainer_state.json").write_text("{}"),  # no accelerate_state/
])
def test_resume_from_an_incomplete_folder_is_refused(tmp_path, make):
    folder = tmp_path / "step_4"
    make(folder)
    with pytest.raises(InputError) as caught:
        checkpoints.resolve_resume(spec(resume_from_checkpoint=str(folder)), tmp_path, print)
    assert str(caught.value) == (f"training_args.resume_from_checkpoint '{folder}' is not a complete checkpoint "
                                 f"folder (no trainer_state.json or accelerate_state/); give output_dir/step_N or "
                                 f"'latest'")


def test_truncate_metrics_keeps_what_was_logged_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    checkpoints.truncate_metrics(path, 3)
    assert not path.exists()
    lines = [{"step": 1, "loss": 4.0}, {"note": "no step"}, {"step": 3, "eval_loss": 3.0}, {"step": 4, "loss": 2.0},
             {"step": 6, "loss": 1.0}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    checkpoints.truncate_metrics(path, 3)
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(line) + "\n" for line in lines[:3])
    checkpoints.truncate_metrics(path, 0)
    assert path.read_text(encoding="utf-8") == json.dumps({"note": "no step"}) + "\n"


# ---------------------------------------------------------------------------------------------------- disk space

@pytest.fixture
def free_bytes(monkeypatch):
    """Set the free space shutil.disk_usage reports: free_bytes(n)."""
    usage = namedtuple("usage", "total used free")
    asked = []

    def set_free(free):
        def disk_usage(path):
            asked.append(path)
            return usage(10 * free + 1, 9 * free + 1, free)

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return asked

    return set_free


def test_a_folder_that_cannot_hold_one_checkpoint_is_refused(tmp_path, free_bytes):
    asked = free_bytes(1 * MiB)
    parameters = 200_000                                    # 16 bytes each: about 3.1 MiB
    with pytest.raises(InputError) as caught:
        checkpoints.check_free_space(tmp_path, parameters, spec(4), 12, print)
    assert str(caught.value) == (f"training_args.output_dir '{tmp_path}' has 1.0 MiB free but one checkpoint of "
                                 f"this model takes about 3.1 MiB; free some space or choose another folder")
    assert asked == [tmp_path]


@pytest.mark.parametrize("every, keep, kept", [
    (4, None, 2),       # step_4 and step_8 stay beside the final one
    (4, 1, 1),          # keep_last_checkpoints bounds it
    (4, 0, 2),          # 0 keeps them all
])
def test_a_folder_that_cannot_hold_what_the_run_keeps_is_a_warning(tmp_path, free_bytes, every, keep, kept):
    parameters = 100 * MiB // checkpoints.CHECKPOINT_BYTES_PER_PARAMETER
    one, said = 100 * MiB, []
    free_bytes((kept + 1) * one - 1)
    checkpoints.check_free_space(tmp_path, parameters, spec(every, keep), 12, said.append)
    free, peak = checkpoints.human_bytes((kept + 1) * one - 1), checkpoints.human_bytes((kept + 1) * one)
    assert said == [f"warning: training_args.output_dir '{tmp_path}' has {free} free but this run keeps up to "
                    f"{kept + 1} checkpoints of about 100.0 MiB ({peak}); the run will stop when the disk is full: "
                    f"free space or set extra_args.keep_last_checkpoints"]
    said.clear()
    free_bytes((kept + 1) * one)
    checkpoints.check_free_space(tmp_path, parameters, spec(every, keep), 12, said.append)
    assert said == []


@pytest.mark.parametrize("every, max_steps", [(None, 12), (5, None), (20, 12)])
def test_room_for_one_checkpoint_is_enough_when_the_run_keeps_only_the_final_one(tmp_path, free_bytes, every,
                                                                                  max_steps):
    said = []
    free_bytes(checkpoints.CHECKPOINT_BYTES_PER_PARAMETER * 1000)
    checkpoints.check_free_space(tmp_path, 1000, spec(every), max_steps, said.append)
    assert said == []
    free_bytes(checkpoints.CHECKPOINT_BYTES_PER_PARAMETER * 1000 - 1)
    with pytest.raises(InputError, match="has 15.6 KiB free but one checkpoint of this model takes about 15.6 KiB"):
        checkpoints.check_free_space(tmp_path, 1000, spec(every), max_steps, said.append)


@pytest.mark.parametrize("count, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                         (3 * MiB + MiB // 10, "3.1 MiB"), (5 << 30, "5.0 GiB"),
                                         (5 << 40, "5.0 TiB"), (2048 << 40, "2048.0 TiB")])
def test_human_bytes(count, text):
    assert checkpoints.human_bytes(count) == text


# ------------------------------------------------------------------------------------------- leftovers and pruning

def test_leftovers_of_killed_saves_are_tidied_and_a_cut_replacement_is_put_back(tmp_path):
    for name in (".step_3.tmp", ".step_2.old", ".step_5.old", "step_5", ".step_1.deleting", ".cache", "step_7"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    checkpoints.remove_leftovers(tmp_path)
    # .step_2.old had lost its step_2 (killed between the two renames of a re-save): it goes back into place.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "step_2", "step_5", "step_7"]


def test_leftovers_of_the_final_checkpoint_and_what_is_not_a_leftover(tmp_path):
    checkpoint(tmp_path / ".final-checkpoint.old", 12)
    checkpoint(tmp_path / ".final-checkpoint.tmp", 12)
    checkpoint(tmp_path / "step_4", 4)
    checkpoint(tmp_path / ".step_4.old", 3)
    (tmp_path / ".step_9.tmp").write_text("a file, not a folder a save left")
    (tmp_path / ".step_9.tmp-old").mkdir()
    checkpoints.remove_leftovers(tmp_path)
    assert names(tmp_path) == [".step_9.tmp", ".step_9.tmp-old", "final-checkpoint", "step_4"]
    assert checkpoints.read_train_state(tmp_path / "step_4").step == 4   # the newer copy stays


def test_prune_keeps_the_newest_and_the_protected(tmp_path):
    for step in (1, 2, 3, 4, 5):
        checkpoint(tmp_path / f"step_{step}", step)
    (tmp_path / "step_0").mkdir()                       # incomplete: neither counted nor deleted
    assert checkpoints.prune_checkpoints(tmp_path, 0, protected=()) == []
    assert checkpoints.prune_checkpoints(tmp_path, 10, protected=()) == []
    assert names(tmp_path) == [f"step_{step}" for step in range(6)]
    deleted = checkpoints.prune_checkpoints(tmp_path, 2, protected=(None, tmp_path / "step_1"))
    assert deleted == [tmp_path / "step_2", tmp_path / "step_3"]
    assert names(tmp_path) == ["step_0", "step_1", "step_4", "step_5"]   # no hidden .deleting folder left
    assert checkpoints.prune_checkpoints(tmp_path, 1, protected=[str(tmp_path / "step_1")]) == [tmp_path / "step_4"]
    assert names(tmp_path) == ["step_0", "step_1", "step_5"]
