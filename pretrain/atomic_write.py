"""Folders that appear whole or not at all: written under a hidden name, fsynced, then renamed into place.

    with atomic_dir("my-tokenizer", overwrite=False) as folder:   # a hidden sibling while it is written
        (folder / "tokenizer.json").write_text(...)
    # here my-tokenizer/ exists, complete, even after a power cut; an exception leaves nothing behind

Checkpoints, tokenizer folders and tokenized folders are all published this way, so a reader sees either the
previous folder or the complete new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from pretrain.errors import InputError


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it is published as `final`, on failure it vanishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if final.exists() and not overwrite:
            raise InputError(f"'{final}' already exists; remove it or ask to overwrite it")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, final)


def publish(staging: Path, final: Path, retired: Path | None = None) -> None:
    """fsync `staging`, then rename it to `final`, replacing what was there: after a power cut too, a folder named
    `final` is whole. The old copy waits under `retired` (default `.NAME.old-PID`) between the two renames."""
    fsync_tree(staging)
    retired = retired or final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(retired, ignore_errors=True)
        final.rename(retired)
    staging.rename(final)
    _fsync_path(final.parent)
    shutil.rmtree(retired, ignore_errors=True)


def remove_whole(folder: Path) -> None:
    """Delete `folder` so that it is gone whole or still whole: renamed to `.NAME.deleting` first, then removed, so a
    kill during the deletion leaves only a hidden folder, never a half-deleted one under its name."""
    hidden = folder.with_name(f".{folder.name}.deleting")
    folder.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
