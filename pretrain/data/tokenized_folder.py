"""Reading a tokenized folder in place and checking it (pretrain/data/batches.py streams batches from it).

    from pretrain.data.tokenized_folder import open_tokenized_folder
    train, test = open_tokenized_folder("data/pt-corpus-tokenized", block_size=2048, vocab_size=32000)

The folder holds `train/*.parquet`, `test/*.parquet` and, when Utilities/tokenize-dataset.py wrote it,
`manifest.json` (see pretrain/data/manifest.py). Two layouts are read: ours (`input_ids` as list<int32>) and the
published Pt-Corpus-tokenized one (`input_ids`, `attention_mask`, `labels`, all int64). Only `input_ids` is read: the
blocks are packed, so every mask is all ones and the labels are the inputs themselves (the model shifts them).

Files are read where they lie (pyarrow, memory-mapped): no converted copy, no cache on disk, nothing held in
Python lists. Opening reads only the parquet footers and the manifest, so it takes the same time at any corpus
size; block counts come from the footers. It refuses, with one line naming the problem and the fix: a missing
or empty folder, a needed split without parquet files, no `input_ids` column, rows that are not `block_size`
long (the footers' value counts for every row group, plus a decoded sample), token ids outside
[0, vocab_size) (the footers' min/max statistics for every row group, a decoded sample, and the manifest's
vocabulary size), and a manifest whose block size, tokenizer hash or block counts disagree. Every row decoded
later is checked the same way, so a bad row anywhere stops training with a clear message instead of a crash.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.data.manifest import read_manifest
from pretrain.errors import InputError, first_line

WINDOW_TOKENS = 1 << 24              # tokens shuffled together; 64 MiB per decoded window as int32
PIECE_ROWS = 1024                    # rows decoded at a time from a row group: bounds memory for huge row groups
SANITY_BLOCKS = {"train": 1000, "test": 100}
SAMPLE_ROW_GROUPS, SAMPLE_ROWS = 4, 16
COLUMN = "input_ids"
RETOKENIZE = "re-run Utilities/tokenize-dataset.py"


@dataclass(frozen=True)
class _RowGroup:
    file: Path
    metadata: pq.FileMetaData        # kept so reading never parses a footer twice
    index: int                       # row group inside the file
    num_rows: int                    # rows used (fewer than stored under sanity_check)


class TokenizedSplit:
    """One split of a tokenized folder: `num_blocks` rows of `block_size` token ids, read on demand."""

    def __init__(self, name: str, row_groups: list[_RowGroup], block_size: int, vocab_size: int):
        self.name, self.block_size, self.vocab_size = name, block_size, vocab_size
        self.row_groups = row_groups
        self.row_group_starts = np.cumsum([0] + [g.num_rows for g in row_groups], dtype=np.int64)
        self.num_blocks = int(self.row_group_starts[-1])
        self._reader_lock = threading.Lock()
        self._reader = _RowGroupReader(self)

    def __repr__(self):
        return f"TokenizedSplit({self.name!r}, num_blocks={self.num_blocks}, block_size={self.block_size})"

    def read_blocks(self, indices) -> np.ndarray:
        """Rows `indices` (in file order, 0 <= i < num_blocks) as int64 [len(indices), block_size], in the order asked.

        Contiguous indices read best: each row group touched is decoded from its start up to the last row asked.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_blocks):
            raise IndexError(f"block index out of range for the {self.name} split of {self.num_blocks} blocks")
        out = np.empty((indices.size, self.block_size), dtype=np.int64)
        groups = np.searchsorted(self.row_group_starts, indices, side="right") - 1
        with self._reader_lock:
            for group in np.unique(groups):
                mask = groups == group
                local = indices[mask] - self.row_group_starts[group]
                first = int(local.min())
                rows = self._reader.read(int(group), first, int(local.max()) + 1)
                out[mask] = rows[local - first]
        return out


class _RowGroupReader:
    """Streams rows of one row group at a time; reads that move forward in the same row group continue the stream."""

    def __init__(self, split: TokenizedSplit, piece_rows: int = PIECE_ROWS):
        self.split, self.piece_rows = split, piece_rows
        self.group = None
        self.parquet_file = self.pieces = None
        self.buffer = np.empty((0, split.block_size), dtype=np.int32)
        self.buffer_start = 0

    def read(self, group: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of row group `group` as int32 [stop - start, block_size] (a view: copy to keep)."""
        if group != self.group or start < self.buffer_start:
            self._open(group)
        pieces = []
        while start < stop:
            buffer_stop = self.buffer_start + len(self.buffer)
            if start >= buffer_stop:
                self.buffer_start, self.buffer = buffer_stop, self._next_piece()
                continue
            piece = self.buffer[start - self.buffer_start:stop - self.buffer_start]
            pieces.append(piece)
            start += len(piece)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _open(self, group: int):
        self.close()
        row_group = self.split.row_groups[group]
        # The footer parsed at open time is reused; closing the previous file unmaps it, releasing its pages.
        self.parquet_file = pq.ParquetFile(row_group.file, memory_map=True, metadata=row_group.metadata)
        self.pieces = self.parquet_file.iter_batches(batch_size=self.piece_rows, row_groups=[row_group.index],
                                                     columns=[COLUMN], use_threads=False)
        self.group, self.buffer_start = group, 0
        self.buffer = self.buffer[:0]

    def _next_piece(self) -> np.ndarray:
        row_group = self.split.row_groups[self.group]
        batch = next(self.pieces)
        where = f"'{row_group.file}' (row group {row_group.index})"
        return decode_rows(batch.column(0), self.split.block_size, self.split.vocab_size, where)

    def close(self):
        if self.parquet_file is not None:
            self.parquet_file.close()
        self.parquet_file = self.pieces = self.group = None


def decode_rows(column: pa.Array, block_size: int, vocab_size: int, where: str) -> np.ndarray:
    """An `input_ids` column as int32 [rows, block_size], refusing rows of another length and ids out of range."""
    values = column.flatten()
    if column.null_count or values.null_count:
        raise InputError(f"{where} has missing (null) rows or token ids; {RETOKENIZE}")
    if not pa.types.is_fixed_size_list(column.type):
        lengths = np.diff(_as_numpy(column.offsets))
        if lengths.size and (lengths != block_size).any():
            wrong = int(lengths[lengths != block_size][0])
            raise InputError(f"{where} has rows of {wrong} tokens but the block size is {block_size}; set "
                             f"data_args.block_size to the folder's block size or {RETOKENIZE}")
    values = _as_numpy(values)
    if values.size:
        _check_id_range(int(values.min()), int(values.max()), vocab_size, where)
    return values.astype(np.int32, copy=False).reshape(-1, block_size)


def _as_numpy(array: pa.Array) -> np.ndarray:
    """A null-free integer Arrow array as a NumPy view (Array.to_numpy imports pandas: 0.3 s on first use)."""
    dtype = np.dtype(str(array.type))
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _check_id_range(lowest: int, highest: int, vocab_size: int, where: str):
    if lowest < 0:
        raise InputError(f"{where} holds a negative token id ({lowest}); {RETOKENIZE}")
    if highest >= vocab_size:
        raise InputError(f"{where} holds token id {highest}, at or above the vocabulary size {vocab_size}; use the "
                         f"tokenizer the folder was made with or {RETOKENIZE} with this tokenizer")


# --------------------------------------------------------------------------------------------- opening a folder

def open_tokenized_folder(folder_path, *, block_size: int, vocab_size: int, tokenizer_sha256: str | None = None,
                          sanity_check: bool = False, need_train: bool = True, need_test: bool = True
                          ) -> tuple[TokenizedSplit | None, TokenizedSplit | None]:
    """Validate a tokenized folder and return its (train, test) splits; a split not needed is None when missing."""
    folder = Path(folder_path).expanduser()
    if not folder.exists():
        raise InputError(f"tokenized folder '{folder}' does not exist; set data_args.folder_path to the output of "
                         f"Utilities/tokenize-dataset.py")
    if not folder.is_dir():
        raise InputError(f"tokenized folder '{folder}' is not a folder; set data_args.folder_path to the folder "
                         f"written by Utilities/tokenize-dataset.py")
    if not any(folder.iterdir()):
        raise InputError(f"tokenized folder '{folder}' is empty; fill it with Utilities/tokenize-dataset.py")
    manifest = read_manifest(folder)
    if manifest is not None:
        _check_manifest(manifest, folder, block_size, vocab_size, tokenizer_sha256)
    splits = []
    for name, needed in (("train", need_train), ("test", need_test)):
        files = sorted(p for p in (folder / name).rglob("*.parquet") if p.is_file()) if (folder / name).is_dir() \
            else []
        if not files:
            if needed:
                raise InputError(f"tokenized folder '{folder}' has no parquet files in {name}/; write them with "
                                 f"Utilities/tokenize-dataset.py (a published set must be split into train/ and "
                                 f"test/ folders)")
            splits.append(None)
            continue
        row_groups = _read_footers(files, block_size, vocab_size)
        if manifest is not None and name in manifest["splits"]:
            _check_manifest_counts(manifest["splits"][name], folder, name, row_groups)
        if sum(g.num_rows for g in row_groups) == 0:
            raise InputError(f"the {name} split of '{folder}' holds no blocks; {RETOKENIZE} with more text")
        if sanity_check:
            row_groups = _first_rows(row_groups, SANITY_BLOCKS[name])
        split = TokenizedSplit(name, row_groups, block_size, vocab_size)
        _check_sample(split)
        splits.append(split)
    return splits[0], splits[1]


def _check_manifest(manifest: dict, folder: Path, block_size: int, vocab_size: int, tokenizer_sha256: str | None):
    where = f"'{folder / 'manifest.json'}'"
    if manifest["block_size"] != block_size:
        raise InputError(f"the tokenized folder has blocks of {manifest['block_size']} tokens ({where}) but "
                         f"data_args.block_size is {block_size}; set data_args.block_size={manifest['block_size']} "
                         f"or {RETOKENIZE} --block-size {block_size}")
    tokenizer = manifest["tokenizer"]
    if tokenizer_sha256 is not None and tokenizer["tokenizer_json_sha256"] != tokenizer_sha256:
        raise InputError(f"the tokenized folder was made with another tokenizer ({where} records tokenizer.json "
                         f"sha256 {tokenizer['tokenizer_json_sha256'][:12]}…, the given one is "
                         f"{tokenizer_sha256[:12]}…, from '{tokenizer['path']}'); use that tokenizer or {RETOKENIZE} "
                         f"with this one")
    if tokenizer["vocab_size"] > vocab_size:
        raise InputError(f"the tokenized folder's tokenizer has {tokenizer['vocab_size']} tokens ({where}) but the "
                         f"model's vocabulary is {vocab_size}, so token ids could reach past it; use a vocabulary "
                         f"of at least {tokenizer['vocab_size']} or {RETOKENIZE}")


def _check_manifest_counts(recorded: dict, folder: Path, name: str, row_groups: list[_RowGroup]):
    stored = sum(g.num_rows for g in row_groups)
    if recorded["blocks"] != stored:
        raise InputError(f"'{folder / 'manifest.json'}' records {recorded['blocks']} {name} blocks but {name}/ holds "
                         f"{stored}: the folder is incomplete or was changed; copy it again or {RETOKENIZE}")


def _read_footers(files: list[Path], block_size: int, vocab_size: int) -> list[_RowGroup]:
    """Every row group of `files`, checked from the footers alone: the column, its type, row lengths, id range."""
    row_groups = []
    for path in files:
        try:
            metadata = pq.ParquetFile(path, memory_map=True).metadata
        except (pa.ArrowException, OSError) as error:
            raise InputError(f"'{path}' is not a readable parquet file ({first_line(error)}); copy it "
                             f"again or {RETOKENIZE}") from None
        leaf = _input_ids_leaf(path, metadata, block_size)
        for index in range(metadata.num_row_groups):
            group = metadata.row_group(index)
            where = f"'{path}' (row group {index})"
            chunk = group.column(leaf)
            statistics = chunk.statistics if chunk.is_stats_set else None
            if statistics is not None and statistics.has_null_count and statistics.null_count:
                raise InputError(f"{where} has missing (null) rows or token ids; {RETOKENIZE}")
            if chunk.num_values != group.num_rows * block_size:
                tokens = chunk.num_values / max(group.num_rows, 1)
                raise InputError(f"{where} has rows of {tokens:g} tokens on average but the block size is "
                                 f"{block_size}; set data_args.block_size to the folder's block size or "
                                 f"{RETOKENIZE}")
            if statistics is not None and statistics.has_min_max:
                _check_id_range(int(statistics.min), int(statistics.max), vocab_size, where)
            if group.num_rows:              # empty row groups would only complicate the arithmetic of reads
                row_groups.append(_RowGroup(path, metadata, index, group.num_rows))
    return row_groups


def _input_ids_leaf(path: Path, metadata: pq.FileMetaData, block_size: int) -> int:
    """Index of the parquet leaf column holding the token ids, after checking the Arrow type of `input_ids`."""
    schema = metadata.schema.to_arrow_schema()
    if COLUMN not in schema.names:
        raise InputError(f"'{path}' has no '{COLUMN}' column (columns: {', '.join(schema.names) or 'none'}); "
                         f"give a folder written by Utilities/tokenize-dataset.py")
    kind = schema.field(COLUMN).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and pa.types.is_integer(kind.value_type)):
        raise InputError(f"'{path}' column '{COLUMN}' is {kind}, not a list of integer token ids; give a folder "
                         f"written by Utilities/tokenize-dataset.py")
    if pa.types.is_fixed_size_list(kind) and kind.list_size != block_size:
        raise InputError(f"'{path}' has rows of {kind.list_size} tokens but the block size is {block_size}; set "
                         f"data_args.block_size={kind.list_size} or {RETOKENIZE}")
    return next(i for i in range(metadata.num_columns) if metadata.schema.column(i).path.split(".")[0] == COLUMN)


def _first_rows(row_groups: list[_RowGroup], num_rows: int) -> list[_RowGroup]:
    kept = []
    for group in row_groups:
        if num_rows <= 0:
            break
        kept.append(_RowGroup(group.file, group.metadata, group.index, min(group.num_rows, num_rows)))
        num_rows -= kept[-1].num_rows
    return kept


def _check_sample(split: TokenizedSplit):
    """Decode the first rows of a few row groups spread over the split: lengths and ids of real rows, not footers."""
    reader = _RowGroupReader(split, piece_rows=SAMPLE_ROWS)
    try:
        count = len(split.row_groups)
        for group in sorted({round(i * (count - 1) / max(SAMPLE_ROW_GROUPS - 1, 1))
                             for i in range(min(SAMPLE_ROW_GROUPS, count))}):
            reader.read(group, 0, min(SAMPLE_ROWS, split.row_groups[group].num_rows))
    finally:
        reader.close()
