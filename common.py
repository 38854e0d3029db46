"""Helpers shared by the suite's scripts: input errors, Hub-or-local sources, atomic output folders.

Every script reports bad input as one line on stderr and exits with status 2:

    from common import InputError, run_main
    def main(): ...; raise InputError("--vocab_size must be at least 260; pass a larger value")
    if __name__ == "__main__": run_main(main)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet", ".csv": "csv"}


class InputError(Exception):
    """A problem with what the user gave us: reported in one line, exit status 2, no traceback."""


def run_main(main) -> None:
    """Call `main()`, turning an InputError into a one-line message and exit status 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; honours HF_HUB_OFFLINE so tests never touch the network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_local(name: str) -> bool:
    """A path that exists, or one spelled like a path (so a typo is reported as a missing path, not a Hub miss)."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or \
        Path(name).suffix.lower() in TEXT_SUFFIXES


def require_hub(what: str, name: str) -> None:
    """Stop with a clear message when `name` is not local and the Hub cannot be reached."""
    if not hub_reachable():
        raise InputError(f"{what} '{name}' is not a local path and the Hugging Face Hub cannot be reached; "
                         f"pass a local path instead")


def load_text_dataset(name: str, split: str = "train", text_column: str = "text", token: str | None = None,
                      text_column_flag: str = "--text_column"):
    """Load a text dataset from a local file/folder or the Hub, as a `datasets.Dataset` with `text_column`.

    Local forms: a .txt file (one document per line, blank lines skipped), .jsonl/.json, .parquet, .csv, a folder of
    such files, or a folder written by `save_to_disk` (a DatasetDict is indexed by `split`). `text_column_flag` is
    the calling script's spelling of its text-column option, named in the message when the column is missing.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(name).expanduser()
    if path.exists():
        dataset = _load_local(path, split)
    elif looks_local(name):
        raise InputError(f"dataset '{name}' does not exist; check the path")
    else:
        require_hub("dataset", name)
        try:
            dataset = datasets.load_dataset(name, split=split, token=token)
        except Exception as error:  # the Hub's errors are many; the user needs the gist in one line
            raise InputError(f"could not load dataset '{name}' split '{split}' from the Hub: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    if text_column not in dataset.column_names:
        raise InputError(f"dataset '{name}' has no column '{text_column}' (columns: "
                         f"{', '.join(dataset.column_names) or 'none'}); pass {text_column_flag} with one of them")
    dtype = getattr(dataset.features[text_column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise InputError(f"column '{text_column}' of '{name}' holds {dtype or 'non-text'} values, not text; pass "
                         f"{text_column_flag} with the column of documents")
    dataset = dataset.select_columns([text_column])
    if dataset.num_rows == 0:
        raise InputError(f"dataset '{name}' is empty; give a dataset with at least one document")
    return dataset


def _load_local(path: Path, split: str):
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise InputError(f"'{path}' has no split '{split}' (splits: {', '.join(loaded)}); "
                                 f"pass one of them as the split")
            loaded = loaded[split]
        return loaded
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
    kinds = {TEXT_SUFFIXES.get(p.suffix.lower()) for p in files}
    if not files or None in kinds:
        raise InputError(f"'{path}' holds no readable text files; give .txt, .jsonl, .parquet or .csv files "
                         f"or a save_to_disk folder")
    if len(kinds) > 1:
        raise InputError(f"'{path}' mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    kind = kinds.pop()
    if any(p.stat().st_size == 0 for p in files) and all(p.stat().st_size == 0 for p in files):
        raise InputError(f"dataset '{path}' is empty; give a dataset with at least one document")
    try:
        dataset = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as error:
        raise InputError(f"could not read '{path}' as {kind}: {str(error).splitlines()[0]}") from None
    if kind == "text":
        dataset = dataset.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    return dataset


def arrow_data_files(dataset, column: str) -> list[str] | None:
    """The Arrow files under the dataset (below any indices mapping) when reading them front to back gives exactly
    the rows of its table, else None.

    Reading through datasets' memory map leaves every page touched resident in the reading process, so a pass over
    the corpus would grow resident memory by the corpus size; plain reads of one record batch at a time do not.
    """
    import pyarrow as pa

    files, rows = [], 0
    try:
        for entry in dataset.cache_files:
            # Mapped only to count rows: that reads batch headers, not the text, and the map is closed right after.
            with pa.memory_map(entry["filename"]) as source:
                reader = pa.ipc.open_stream(source)
                if column not in reader.schema.names:  # the indices file of a mapping
                    continue
                files.append(entry["filename"])
                rows += sum(batch.num_rows for batch in reader)
    except (OSError, pa.ArrowInvalid):
        return None
    return files if files and rows == dataset.data.num_rows else None


def corpus_files(dataset, column: str, scratch: str) -> dict:
    """Where to read the dataset's documents with plain Arrow reads: {"files", "num_rows"} and, when the documents
    are some of the files' rows (the blank lines of a .txt filtered out), "rows": a .npy in `scratch` of their row
    numbers, in increasing order. A dataset that is neither (held in memory, a slice, rows out of order) has its
    text column written to `scratch` first.
    """
    import numpy as np
    import pyarrow as pa

    files = arrow_data_files(dataset, column)
    indices = getattr(dataset, "_indices", None)  # datasets' mapping from the dataset's rows to its table's
    if files and indices is None:
        return {"files": files, "num_rows": dataset.num_rows}
    if files:
        rows = indices.column(0).to_numpy().astype(np.int64)
        if len(rows) and np.all(np.diff(rows) > 0):
            np.save(Path(scratch) / "rows.npy", rows)
            return {"files": files, "num_rows": len(rows), "rows": str(Path(scratch) / "rows.npy")}
    copy = str(Path(scratch) / "corpus.arrow")
    schema = pa.schema([pa.field(column, pa.large_string())])
    with pa.OSFile(copy, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in dataset.with_format("arrow").iter(batch_size=10_000):
            writer.write_table(batch.select([column]).cast(schema).combine_chunks(), max_chunksize=1000)
    return {"files": [copy], "num_rows": dataset.num_rows}


def text_corpus_child(request_file: str) -> None:
    """Entry point of the process that loads a text dataset for another: corpus_files of load_text_dataset.

    The request and the answer are JSON files in the scratch folder; the token comes from HF_TOKEN.
    """
    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    try:
        dataset = load_text_dataset(request["name"], request["split"], request["text_column"],
                                    os.environ.get("HF_TOKEN") or None)
        answer = corpus_files(dataset, request["text_column"], request["scratch"])
    except InputError as error:
        answer = {"error": str(error)}
    (Path(request["scratch"]) / "answer.json").write_text(json.dumps(answer), encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `final` in one rename, on failure it vanishes.

    Readers therefore see either the old folder or the complete new one, never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(temporary, ignore_errors=True)
            raise InputError(f"'{final}' already exists; remove it or ask to overwrite it")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(final)
