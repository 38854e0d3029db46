"""Reading a text corpus: a local file or folder, a save_to_disk folder, or a Hub dataset, as documents.

    dataset = load_text_dataset("data/sample/pt-sample.jsonl", "train", "text")
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from pretrain.errors import InputError, first_line
from pretrain.hub import TEXT_SUFFIXES, looks_local, require_hub

BATCH_DOCUMENTS = 1000
GATHER_DOCUMENTS = 64       # documents read between two hand-backs of the corpus pages (see read_texts)
PROC_MAPS = Path("/proc/self/maps")
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

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
                             f"{first_line(error)}") from None
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
        raise InputError(f"could not read '{path}' as {kind}: {first_line(error)}") from None
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


def read_arrow_files(files: list[str], column: str, positions):
    """The texts at sorted `positions` of the concatenated `files`, read one record batch at a time."""
    import pyarrow as pa

    start = taken = 0
    for path in files:
        with pa.OSFile(path) as source:
            for record_batch in pa.ipc.open_stream(source):
                end = start + record_batch.num_rows
                stop = int(np.searchsorted(positions, end))
                for first in range(taken, stop, BATCH_DOCUMENTS):
                    rows = positions[first:min(stop, first + BATCH_DOCUMENTS)] - start
                    yield record_batch.column(column).take(pa.array(rows)).to_pylist()
                taken, start = stop, end


def document_bytes(dataset) -> np.ndarray:
    """UTF-8 size of every document (0 when missing), read from Arrow's offsets without decoding the text."""
    corpus_maps = mapped_file_ranges(".arrow")
    parts = []
    for batch in dataset.with_format("arrow").iter(batch_size=1 << 16):
        parts.append(pc.fill_null(pc.binary_length(batch.column(0)), 0).to_numpy())
        drop_mapped_pages(corpus_maps)  # see read_texts
    return np.concatenate(parts).astype(np.int64)


def read_texts(texts_by_row, rows: np.ndarray, corpus_maps: list[tuple[int, int]]) -> list[str]:
    """The documents at `rows`, as Python strings, read without letting RSS count the corpus.

    datasets reads the corpus through a memory map, and every page a read touches (with its neighbours: the page
    cache holds the file in folios of up to a few hundred KB) stays counted in RSS until the kernel wants it back;
    shuffled reads would soon count the whole corpus. The strings are copies, so the pages are handed back after
    every GATHER_DOCUMENTS documents; a page read again is simply mapped again from the page cache.
    """
    texts = []
    for first in range(0, len(rows), GATHER_DOCUMENTS):
        texts += texts_by_row[rows[first:first + GATHER_DOCUMENTS]].column(0).to_pylist()
        drop_mapped_pages(corpus_maps)
    return texts


def mapped_file_ranges(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's read-only mappings of files named *suffix (Linux; elsewhere none)."""
    if not PROC_MAPS.exists():
        return []
    ranges = []
    for line in PROC_MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        # Only read-only file mappings: their pages can always be dropped, as nothing in them can be lost.
        if len(fields) == 6 and fields[5].endswith(suffix) and "w" not in fields[1]:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_mapped_pages(ranges: list[tuple[int, int]]) -> None:
    for start, end in ranges:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
