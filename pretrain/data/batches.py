"""Batches from an opened tokenized folder: the seeded, resumable train stream (one folder or a mixture) and
padded eval batches.

    from pretrain.data.batches import TrainBatches, eval_batches
    batches = TrainBatches(train, micro_batch_size=8, process_index=0, num_processes=1, seed=42)
    input_ids = next(batches)                    # LongTensor [8, 2048]
    for input_ids, weight in eval_batches(test, batch_size=8, process_index=0, num_processes=1): ...

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

import numpy as np

from pretrain.data.tokenized_folder import WINDOW_TOKENS, TokenizedSplit, _RowGroupReader


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

    `splits` is one TokenizedSplit, or several with `weights` (a mixture: see pretrain/data/mixture.py), each source
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

        from pretrain.data.mixture import MixtureSchedule

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
