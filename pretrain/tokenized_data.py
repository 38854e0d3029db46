"""Reading a tokenized folder in place: validation, a seeded resumable train stream, and padded eval batches.

    from pretrain.tokenized_data import open_tokenized_folder, TrainBatches, eval_batches
    train, test = open_tokenized_folder("data/pt-corpus-tokenized", block_size=2048, vocab_size=32000)
    batches = TrainBatches(train, micro_batch_size=8, process_index=0, num_processes=1, seed=42)
    input_ids = next(batches)                    # LongTensor [8, 2048]
    for input_ids, weight in eval_batches(test, batch_size=8, process_index=0, num_processes=1): ...

The folder holds `train/*.parquet`, `test/*.parquet` and, when Utilities/tokenize-dataset.py wrote it,
`manifest.json` (see pretrain/manifest.py). Two layouts are read: ours (`input_ids` as list<int32>) and the published
Pt-Corpus-tokenized one (`input_ids`, `attention_mask`, `labels`, all int64). Only `input_ids` is read: the
blocks are packed, so every mask is all ones and the labels are the inputs themselves (the model shifts them).

Files are read where they lie (pyarrow, memory-mapped): no converted copy, no cache on disk, nothing held in
Python lists. Opening reads only the parquet footers and the manifest, so it takes the same time at any corpus
size; block counts come from the footers. It refuses, with one line naming the problem and the fix: a missing
or empty folder, a needed split without parquet files, no `input_ids` column, rows that are not `block_size`
long (the footers' value counts for every row group, plus a decoded sample), token ids outside
[0, vocab_size) (the footers' min/max statistics for every row group, a decoded sample, and the manifest's
vocabulary size), and a manifest whose block size, tokenizer hash or block counts disagree. Every row decoded
later is checked the same way, so a bad row anywhere stops training with a clear message instead of a crash.

The train order. Parquet is read by whole pages, so picking single rows from random places would decode a
row group for each row. Instead, for epoch `e` (a pure function of `seed` and `e`):
  1. the split's row groups are permuted (NumPy PCG64 seeded with (seed, e));
  2. their rows, in that order, form the epoch's sequence, which is cut into windows of `window_blocks`
     consecutive rows (about 16M tokens, 64 MiB as int32; the last window may be shorter);
  3. the rows inside each window are permuted (seeded with (seed, e, window)).
The stream is the concatenation of the epochs; global sample `g` is row `g % num_blocks` of epoch
`g // num_blocks`. Global micro-batch `k` is samples [k*G, (k+1)*G), G = micro_batch_size * num_processes, and
process `r` takes the `r`-th slice of `micro_batch_size` of them, so any number of processes sees exactly what
one process with the whole global batch sees. A stream started at `start_sample` decodes only the window(s) it
needs (plus the skipped start of at most one row group), so resuming costs the same at any position.
Row groups are decoded as a stream of 1,024-row pieces, so memory stays bounded whatever their size: per
process, at most three decoded windows (the current one, the one a micro-batch straddles, the next one decoded
ahead while the queue is full) plus one piece. Every process decodes each window whole (parquet cannot skip
rows inside a page) and keeps the rows it takes. The order depends on the folder's row groups: the same tokens
written with other row groups are another order. Rows of a row group larger than a window are shuffled only
among themselves, so write row groups of at most a few thousand rows (tokenize-dataset.py does).
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.errors import InputError, first_line
from pretrain.manifest import read_manifest

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


# -------------------------------------------------------------------------------------------------- the train stream

def default_window_blocks(block_size: int) -> int:
    return max(1, WINDOW_TOKENS // block_size)


class _EpochOrder:
    """Where each sample of the stream lies: the epoch's row-group permutation and each window's row permutation."""

    def __init__(self, split: TokenizedSplit, seed, window_blocks: int):
        self.split, self.window_blocks = split, window_blocks
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        self.num_windows = -(-split.num_blocks // window_blocks)
        self._epochs = collections.OrderedDict()

    def group_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The permuted row groups of `epoch` and where each starts in the epoch's sequence."""
        if epoch not in self._epochs:
            order = np.random.default_rng([*self.seed, epoch, 0]).permutation(len(self.split.row_groups))
            rows = np.array([self.split.row_groups[g].num_rows for g in order], dtype=np.int64)
            self._epochs[epoch] = order, np.concatenate([[0], np.cumsum(rows)])
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def window_rows(self, epoch: int, window: int) -> np.ndarray:
        """Permutation of the rows of `window`; entry q is the window row that sample q of the window gets."""
        length = min(self.window_blocks, self.split.num_blocks - window * self.window_blocks)
        return np.random.default_rng([*self.seed, epoch, 1, window]).permutation(length)

    def read_window(self, reader: _RowGroupReader, epoch: int, window: int) -> np.ndarray:
        """The rows of `window` in sequence order, int32 [rows, block_size], decoded through `reader`."""
        order, starts = self.group_order(epoch)
        first = window * self.window_blocks
        stop = min(first + self.window_blocks, self.split.num_blocks)
        pieces = []
        position = int(np.searchsorted(starts, first, side="right")) - 1
        while first < stop:
            local_start = first - starts[position]
            local_stop = min(stop, starts[position + 1]) - starts[position]
            pieces.append(reader.read(int(order[position]), int(local_start), int(local_stop)))
            first += local_stop - local_start
            position += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()

    def locate(self, samples: np.ndarray):
        """(epoch, window, position in window) of sample numbers of this split's stream."""
        epoch, row = np.divmod(samples, self.split.num_blocks)
        window, position = np.divmod(row, self.window_blocks)
        return epoch, window, position


class _SourceStream:
    """One split's endless stream of shuffled epochs, read a window at a time; samples are numbered in the split's
    own stream (for a mixture, the samples drawn from this source so far)."""

    def __init__(self, split: TokenizedSplit, seed, window_blocks: int):
        self.split = split
        self.order = _EpochOrder(split, seed, window_blocks)
        self.reader = _RowGroupReader(split)
        self.windows = collections.OrderedDict()

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """The rows of `samples` (ascending), int32 [len(samples), block_size]."""
        epochs, windows, positions = self.order.locate(samples)
        out = np.empty((len(samples), self.split.block_size), dtype=np.int32)
        keys = epochs * self.order.num_windows + windows
        for key in np.unique(keys):     # ascending: the stream's order, so the reader moves forward
            mask = keys == key
            rows, permutation = self.window(*divmod(int(key), self.order.num_windows))
            out[mask] = rows[permutation[positions[mask]]]
        return out

    def window(self, epoch: int, window: int):
        key = (epoch, window)
        if key in self.windows:
            self.windows.move_to_end(key)
        else:
            self.windows[key] = (self.order.read_window(self.reader, epoch, window),
                                 self.order.window_rows(epoch, window))
            # Three windows: the one a micro-batch straddles, the current one, and the next decoded ahead.
            while len(self.windows) > 3:
                self.windows.popitem(last=False)
        return self.windows[key]

    def decode_after(self, sample: int):
        """Decode the window after the one holding `sample`."""
        epoch, window, _ = self.order.locate(np.array([sample]))
        epoch, window = int(epoch[0]), int(window[0]) + 1
        if window == self.order.num_windows:
            epoch, window = epoch + 1, 0
        self.window(epoch, window)

    def close(self):
        self.reader.close()
        self.windows.clear()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TrainBatches:
    """This process's micro-batches (LongTensor [micro_batch_size, block_size]), an endless stream over epochs.

    `splits` is one TokenizedSplit, or several with `weights` (a mixture: see pretrain/mixture.py), each source
    then shuffled in its own seeded order and drawn from as the mixture's schedule says.
    `samples_consumed` is the global sample count after the batches taken so far, and `source_samples` how many of
    them came from each source; a new TrainBatches with `start_sample=samples_consumed` (and, for a mixture,
    `start_source_samples=source_samples`) continues exactly where this one stopped, with any number of processes.
    With `prefetch` > 0 a background thread prepares that many batches ahead (pyarrow decodes without the GIL);
    `close()` stops it.
    """

    def __init__(self, splits, *, micro_batch_size: int, process_index: int, num_processes: int,
                 seed: int, start_sample: int = 0, pin_memory: bool = False, prefetch: int = 2,
                 window_blocks: int | None = None, weights=None, start_source_samples=None):
        import torch

        from pretrain.mixture import MixtureSchedule

        if micro_batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= process_index < num_processes, got "
                             f"{micro_batch_size}, {process_index}, {num_processes}")
        if seed < 0 or start_sample < 0 or prefetch < 0 or (window_blocks is not None and window_blocks < 1):
            raise ValueError("seed, start_sample and prefetch must be >= 0 and window_blocks >= 1")
        self._thread = None
        mixture = isinstance(splits, (list, tuple))
        splits = list(splits) if mixture else [splits]
        if mixture and (weights is None or len(weights) != len(splits)):
            raise ValueError("a mixture needs one weight per split")
        self.block_size = splits[0].block_size
        self.micro_batch_size = micro_batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.global_micro_batch = micro_batch_size * num_processes
        self.start_sample = self.samples_consumed = start_sample
        # Decoded windows are kept per source; splitting the window between them keeps memory as for one folder.
        window = window_blocks or max(1, default_window_blocks(self.block_size) // len(splits))
        # A single folder keeps its order from before mixtures existed: seeded with the seed alone.
        self._streams = [_SourceStream(split, (seed, index) if mixture else seed, window)
                         for index, split in enumerate(splits)]
        self._schedule = MixtureSchedule(weights) if mixture else None
        if start_source_samples is None:
            if mixture and start_sample:
                raise ValueError("a mixture resumed past its start needs start_source_samples")
            start_source_samples = [start_sample] if not mixture else [0] * len(splits)
        if len(start_source_samples) != len(splits) or sum(start_source_samples) != start_sample:
            raise ValueError(f"start_source_samples {list(start_source_samples)} must give one count per source, "
                             f"adding up to start_sample {start_sample}")
        self.source_samples = list(start_source_samples)
        self._next_counts = list(start_source_samples)   # where the next micro-batch to be made starts
        self._pin = pin_memory and torch.cuda.is_available()
        self._batches_taken = 0
        self._closed = False
        self._thread = None
        if prefetch:
            self._queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="train-batches", daemon=True)
            self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        if self._thread is None:
            item = self._make(self._batches_taken)
        else:
            item = self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                raise item.error
        batch, self.source_samples = item
        self._batches_taken += 1
        self.samples_consumed = self.start_sample + self._batches_taken * self.global_micro_batch
        return batch

    def close(self):
        """Stop the background thread and release the decoded windows; the stream ends."""
        self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        for stream in self._streams:
            stream.close()

    def __del__(self):
        if getattr(self, "_streams", None) is not None:
            self.close()

    def samples_of(self, index: int) -> np.ndarray:
        """Global sample numbers of this process's micro-batch `index` (counted from start_sample)."""
        first = self.start_sample + index * self.global_micro_batch + self.process_index * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number within the source) of each sample of this process's micro-batch `index`; micro-
        batches are drawn in order, so the schedule's counts move forward with them."""
        samples = self.samples_of(index)
        if self._schedule is None:
            self._next_counts[0] = self.start_sample + (index + 1) * self.global_micro_batch
            return np.zeros(len(samples), dtype=np.int64), samples
        before = list(self._next_counts)
        first = self.start_sample + index * self.global_micro_batch
        sources = self._schedule.assign(self._next_counts, first, self.global_micro_batch)
        local = np.empty(len(sources), dtype=np.int64)
        for position, source in enumerate(sources):
            local[position] = before[source]
            before[source] += 1
        mine = slice(self.process_index * self.micro_batch_size, (self.process_index + 1) * self.micro_batch_size)
        return sources[mine], local[mine]

    def _make(self, index: int):
        import torch

        sources, local = self._draw(index)
        out = np.empty((self.micro_batch_size, self.block_size), dtype=np.int64)
        for source in np.unique(sources):
            mask = sources == source
            out[mask] = self._streams[source].rows(local[mask])
        batch = torch.from_numpy(out)
        return (batch.pin_memory() if self._pin else batch), list(self._next_counts)

    def _decode_ahead(self):
        """Decode, for each source, the window after the one its latest sample came from, while the consumer is
        still busy."""
        for stream, count in zip(self._streams, self._next_counts):
            if count:
                stream.decode_after(count - 1)

    def _produce(self):
        index = 0
        try:
            while not self._stop.is_set():
                item = self._make(index)
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    # Idle time: decoding the next window now keeps its cost off the consumer's critical path.
                    self._decode_ahead()
                    self._put(item)
                index += 1
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            self._put(_Failure(error))

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def eval_batches(split: TokenizedSplit, *, batch_size: int, process_index: int, num_processes: int):
    """Yield (input_ids LongTensor [batch_size, block_size], weight FloatTensor [batch_size]) for this process.

    Process r reads the r-th contiguous slice of ceil(num_blocks / num_processes) rows. Every process yields
    the same number of batches, so collective forward passes never wait on a process that has finished; rows
    that only pad a batch are zeros with weight 0, and across processes every row appears once with weight 1.
    """
    import torch

    if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"need batch_size >= 1 and 0 <= process_index < num_processes, got "
                         f"{batch_size}, {process_index}, {num_processes}")
    per_process = -(-split.num_blocks // num_processes)
    first = min(process_index * per_process, split.num_blocks)
    stop = min(first + per_process, split.num_blocks)
    for batch in range(-(-per_process // batch_size)):
        low = min(first + batch * batch_size, stop)
        high = min(low + batch_size, stop)
        input_ids = np.zeros((batch_size, split.block_size), dtype=np.int64)
        weight = np.zeros(batch_size, dtype=np.float32)
        if high > low:
            input_ids[:high - low] = split.read_blocks(np.arange(low, high))
            weight[:high - low] = 1.0
        yield torch.from_numpy(input_ids), torch.from_numpy(weight)
