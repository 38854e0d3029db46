"""pretrain/atomic_write.py: folders that appear whole or not at all, fsynced before and after their rename."""

import os

import pytest

from pretrain import atomic_write as publish
from pretrain.errors import InputError


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync is called on, in order, read from each descriptor as it is synced."""
    paths = []
    fsync = os.fsync

    def recording(descriptor):
        paths.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    return paths


def test_atomic_dir_publishes_a_hidden_sibling_once_the_block_ends(tmp_path):
    final = tmp_path / "nested" / "tokenizer"
    with publish.atomic_dir(final) as folder:
        assert folder.parent == final.parent and folder.name == f".tokenizer.tmp-{os.getpid()}"
        (folder / "sub").mkdir()
        (folder / "sub" / "tokenizer.json").write_text("{}")
        assert not final.exists()
    assert listing(final) == ["sub", "sub/tokenizer.json"]
    assert (final / "sub" / "tokenizer.json").read_text() == "{}"
    assert [p.name for p in final.parent.iterdir()] == ["tokenizer"]  # nothing hidden left beside it


def test_atomic_dir_leaves_nothing_when_the_block_raises(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with publish.atomic_dir(final) as folder:
            (folder / "half-written.parquet").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_an_existing_folder_unless_asked_to_overwrite(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(InputError, match=f"'{final}' already exists; remove it or ask to overwrite it"):
        with publish.atomic_dir(final) as folder:
            (folder / "new.txt").write_text("new")
    assert listing(final) == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with publish.atomic_dir(final, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
    assert listing(final) == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_starts_from_an_empty_folder_after_a_crashed_attempt(tmp_path):
    stale = tmp_path / f".out.tmp-{os.getpid()}"  # a run of the same process id that was killed
    stale.mkdir()
    (stale / "stale.bin").write_bytes(b"x")
    with publish.atomic_dir(tmp_path / "out") as folder:
        assert list(folder.iterdir()) == []
        (folder / "fresh.bin").write_bytes(b"y")
    assert listing(tmp_path) == ["out", "out/fresh.bin"]


def test_publish_fsyncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, fsynced):
    staging, final = tmp_path / ".model.tmp", tmp_path / "model"
    (staging / "accelerate_state").mkdir(parents=True)
    (staging / "accelerate_state" / "optimizer.bin").write_bytes(b"o")
    (staging / "model.safetensors").write_bytes(b"m")
    publish.publish(staging, final)
    names = ["accelerate_state/optimizer.bin", "accelerate_state", "model.safetensors"]
    # The deepest first, then the folder itself, all under the staging name; the parent last, after the rename.
    assert fsynced[0] == str(staging / "accelerate_state" / "optimizer.bin")
    assert sorted(fsynced[:3]) == sorted(str(staging / name) for name in names)
    assert fsynced[3:] == [str(staging), str(tmp_path)]
    assert listing(final) == sorted(names) and listing(tmp_path) == ["model", *(f"model/{n}" for n in sorted(names))]


def test_publish_replaces_the_old_folder_whole(tmp_path, fsynced):
    staging, final, retired = tmp_path / ".step_4.tmp", tmp_path / "step_4", tmp_path / ".step_4.old"
    for folder, text in ((final, "old"), (staging, "new"), (retired, "leftover of a killed save")):
        folder.mkdir()
        (folder / "trainer_state.json").write_text(text)
    (final / "only-in-the-old-copy.txt").write_text("old")
    publish.publish(staging, final, retired)
    assert listing(final) == ["trainer_state.json"] and (final / "trainer_state.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["step_4"]
    assert fsynced[-1] == str(tmp_path)
    # Without a name for the old copy, it waits under .NAME.old-PID, which is gone afterwards too.
    (tmp_path / ".step_4.tmp").mkdir()
    (tmp_path / ".step_4.tmp" / "trainer_state.json").write_text("newer")
    publish.publish(tmp_path / ".step_4.tmp", final)
    assert (final / "trainer_state.json").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["step_4"]


def test_a_second_save_of_the_same_name_replaces_the_first_whole(tmp_path):
    final, staging = tmp_path / "final-checkpoint", tmp_path / ".final-checkpoint.tmp"
    for folder, text in ((final, "old"), (staging, "new")):
        (folder / "accelerate_state").mkdir(parents=True)
        (folder / "trainer_state.json").write_text(text)
    publish.publish(staging, final, final.with_name(".final-checkpoint.old"))
    assert (final / "trainer_state.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final-checkpoint"]
