"""Packing: documents tokenized as BOS + text + EOS, streamed in order into blocks of exactly `block_size`
tokens, written as parquet shards of the train and test splits.

    plan = plan_documents(corpus.document_bytes(), args, permute=corpus.random_access)
    splits = tokenize_and_pack(corpus, tokenizer, plan, folder, args)   # the counts the manifest records
"""

from __future__ import annotations

import gc
import os
from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.data.manifest import BOS_EOS_POLICY, MANIFEST_NAME, read_manifest
from pretrain.errors import InputError
from pretrain.tokenizer.folder import text_backend

# Text per encode call: large enough for the tokenizer's threads to stay busy, small enough that the
# in-flight batches (their Encoding objects cost ~100 bytes per token) stay far below a gigabyte.
BATCH_BYTES = 1 << 20
SHARD_TOKENS = 1 << 26       # ~256 MB of int32 per shard before compression (~100-170 MB on disk)
ROW_GROUP_TOKENS = 1 << 20   # 4 MB row groups: a reader can fetch any block without reading its whole shard
BLOCK_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])


@dataclass
class Plan:
    order: np.ndarray             # corpus positions in the order they are tokenized; empty documents left out
    batch_edges: np.ndarray       # batch i is order[batch_edges[i]:batch_edges[i + 1]]
    test_documents: int | None    # the first this many documents form the test split, or …
    test_tokens: int | None       # … the first documents until the test split holds this many tokens
    batch_bytes: np.ndarray       # UTF-8 bytes of each batch, for the progress bar
    empty_documents: int
    text_bytes: int


def plan_documents(byte_counts: np.ndarray, args, permute: bool = True) -> Plan:
    """Order the documents, cut them into batches of ~BATCH_BYTES and decide where the test split ends.

    --shuffle permutes them with the seed; with `permute` False (a stream, which comes shuffled with the seed
    already) they keep the corpus's order.
    """
    order = np.flatnonzero(byte_counts)
    if not len(order):
        raise InputError(f"dataset '{args.dataset_name}' holds only empty documents; give one with text")
    if args.shuffle and permute:
        order = np.random.default_rng(args.seed).permutation(order)
    ends = np.cumsum(byte_counts[order])
    cuts = np.searchsorted(ends, np.arange(BATCH_BYTES, ends[-1], BATCH_BYTES), side="right")
    batch_edges = np.unique(np.concatenate(([0], cuts, [len(order)])))
    test_documents = test_tokens = None
    if args.test_size == 0:
        test_documents = 0
    elif isinstance(args.test_size, float):
        if len(order) < 2:
            raise InputError(f"dataset '{args.dataset_name}' has a single document, which cannot be split into "
                             f"train and test; pass --test-size 0 or give more documents")
        # A fraction of the text in bytes, rounded up to whole documents, and never every document.
        test_documents = min(int(np.searchsorted(ends, args.test_size * ends[-1])) + 1, len(order) - 1)
    else:
        test_tokens = args.test_size * args.block_size
    batch_bytes = np.diff(np.concatenate(([0], ends))[batch_edges])
    return Plan(order, batch_edges, test_documents, test_tokens, batch_bytes,
                int(len(byte_counts) - len(order)), int(ends[-1]))


def describe_request(args, tokenizer, tokenizer_record: dict, plan: Plan) -> dict:
    """Everything in the manifest but the counts: two folders with equal requests hold the same dataset."""
    dataset = Path(args.dataset_name).expanduser()
    return {
        "tokenizer": tokenizer_record,
        "block_size": args.block_size,
        "column": "input_ids",
        "dtype": "int32",
        "special_tokens": {"policy": BOS_EOS_POLICY, "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id},
        "source": {"dataset": str(dataset.resolve()) if dataset.exists() else args.dataset_name,
                   "dataset_split": args.dataset_split, "text_column": args.text_column,
                   "shuffle": args.shuffle, "seed": args.seed if args.shuffle else None,
                   "test_size": args.test_size, "blocks_per_shard": args.blocks_per_shard,
                   "documents": len(plan.order), "empty_documents": plan.empty_documents,
                   "text_bytes": plan.text_bytes},
    }


def blocks_per_shard(args) -> int:
    return args.blocks_per_shard or max(1, SHARD_TOKENS // args.block_size)


def output_state(folder: Path, request: dict, overwrite: bool) -> str:
    """'write' when the folder may be (re)written, 'done' when it already holds this very dataset."""
    if not folder.exists() or not any(folder.iterdir()):
        return "write"
    # --overwrite replaces a tokenized dataset only: a mistyped --output-dir must never cost someone a folder.
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(f"--output-dir '{folder}' holds files but no {MANIFEST_NAME}, so it is not a tokenized "
                         f"dataset and will not be replaced; choose another folder")
    if overwrite:
        return "write"
    try:
        existing = read_manifest(folder)
    except InputError:
        existing = {}
    differences = _differences(request, existing)
    if differences:
        raise InputError(f"--output-dir '{folder}' already holds a different tokenized dataset (differs in "
                         f"{', '.join(differences)}); choose another folder or pass --overwrite to replace it")
    return "done"


def _differences(wanted: dict, found: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in wanted.items():
        other = found.get(key) if isinstance(found, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            keys += _differences(value, other, f"{prefix}{key}.")
        elif value != other:
            keys.append(f"{prefix}{key}")
    return keys


def encode_documents(backend, bos_id: int, eos_id: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One int32 stream BOS, doc, EOS, BOS, doc, EOS, … for `texts`, and the tokens of each document in it."""
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    document_tokens = np.fromiter(map(len, encodings), np.int64, len(encodings)) + 2
    pieces = chain.from_iterable(((bos_id,), encoding.ids, (eos_id,)) for encoding in encodings)
    stream = np.fromiter(chain.from_iterable(pieces), np.int32, int(document_tokens.sum()))
    return stream, document_tokens


_worker_encode = None


def _start_worker(tokenizer_json: str, bos_id: int, eos_id: int, threads: int) -> None:
    global _worker_encode
    # Each process gets its share of the cores, so the processes' tokenizer threads do not fight.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker_encode = partial(encode_documents, text_backend(tokenizer_json), bos_id, eos_id)


def _encode_in_worker(texts: list[str]):
    return _worker_encode(texts)


def make_executor(tokenizer, num_proc: int):
    """Where batches are encoded, and the function to submit there.

    One process: two threads, so one batch is turned into numpy while the tokenizer (which releases the GIL and
    uses every core) encodes the next. Several: spawned processes, each with cores/num_proc tokenizer threads.
    """
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from multiprocessing import get_context

    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    if num_proc == 1:
        return ThreadPoolExecutor(2), partial(encode_documents, tokenizer.backend, *ids)
    tokenizer_json = tokenizer.backend.to_str()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // num_proc)
    executor = ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_start_worker,
                                   initargs=(tokenizer_json, *ids, threads))
    return executor, _encode_in_worker


def encoded_batches(corpus, plan: Plan, executor, encode, in_flight: int):
    """Yield (stream, document_tokens) per batch in order, with a few batches always in flight."""
    pending = deque()
    for texts in corpus.read_batches(plan.order, plan.batch_edges):
        pending.append(executor.submit(encode, texts))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class SplitWriter:
    """Cuts one split's token stream into rows of exactly block_size tokens and writes them as parquet shards."""

    def __init__(self, folder: Path, split: str, block_size: int, blocks_per_shard: int):
        self.folder, self.split, self.block_size = folder, split, block_size
        self.blocks_per_shard = blocks_per_shard
        self.row_group_blocks = min(max(1, ROW_GROUP_TOKENS // block_size), blocks_per_shard)
        self.buffer = np.empty(self.row_group_blocks * block_size, np.int32)
        self.filled = 0  # tokens waiting in the buffer
        self.documents = self.tokens = 0
        self.shards = []
        self.writer = None
        self.shard_blocks = 0

    def add(self, stream: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += len(stream)
        position = 0
        while position < len(stream):
            # The buffer holds one row group, or less when the current shard has less room left.
            capacity = min(self.row_group_blocks, self.blocks_per_shard - self.shard_blocks) * self.block_size
            taken = min(capacity - self.filled, len(stream) - position)
            self.buffer[self.filled:self.filled + taken] = stream[position:position + taken]
            self.filled += taken
            position += taken
            if self.filled == capacity:
                self._write_blocks(capacity // self.block_size)

    def close(self) -> dict:
        """Write the last full blocks; the partial block after them is dropped. Return the split's counts."""
        dropped_tokens = self.filled % self.block_size
        if self.filled >= self.block_size:
            self._write_blocks(self.filled // self.block_size)
        if self.writer is not None:
            self._close_shard()
        return {"documents": self.documents, "tokens": self.tokens,
                "blocks": sum(shard["blocks"] for shard in self.shards), "dropped_tokens": dropped_tokens,
                "shards": self.shards}

    def _write_blocks(self, blocks: int) -> None:
        if self.writer is None:
            (self.folder / self.split).mkdir(exist_ok=True)
            name = f"{self.split}/part-{len(self.shards):05d}.parquet"
            self.shards.append({"file": name, "blocks": 0})
            self.writer = pq.ParquetWriter(self.folder / name, BLOCK_SCHEMA, compression="zstd")
        offsets = np.arange(0, (blocks + 1) * self.block_size, self.block_size, dtype=np.int32)
        # Arrays made from buffers: pyarrow's conversion of numpy arrays would import pandas, for nothing.
        rows = pa.ListArray.from_arrays(int32_array(offsets), int32_array(self.buffer[:blocks * self.block_size]))
        self.writer.write_table(pa.Table.from_arrays([rows], schema=BLOCK_SCHEMA))
        self.filled = 0
        self.shard_blocks += blocks
        self.shards[-1]["blocks"] = self.shard_blocks
        if self.shard_blocks == self.blocks_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        self.writer.close()
        self.writer = None
        self.shard_blocks = 0


def int32_array(values: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def tokenize_and_pack(corpus, tokenizer, plan: Plan, folder: Path, args) -> dict:
    """Stream every batch through the tokenizer into the test and train writers; return the splits' counts."""
    from tqdm import tqdm

    test = SplitWriter(folder, "test", args.block_size, blocks_per_shard(args))
    train = SplitWriter(folder, "train", args.block_size, blocks_per_shard(args))
    executor, encode = make_executor(tokenizer, args.num_proc)
    progress = tqdm(total=plan.text_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)
    # What each batch makes is freed by reference counting; the cycle collector would only walk the long-lived
    # objects over and over.
    collecting = gc.isenabled()
    gc.disable()
    try:
        batches = encoded_batches(corpus, plan, executor, encode, in_flight=2 * args.num_proc + 2)
        for (stream, document_tokens), batch_bytes in zip(batches, plan.batch_bytes):
            to_test = test_share(plan, test.documents, test.tokens, document_tokens)
            cut = int(document_tokens[:to_test].sum())
            test.add(stream[:cut], to_test)
            train.add(stream[cut:], len(document_tokens) - to_test)
            progress.update(int(batch_bytes))
    finally:
        progress.close()
        executor.shutdown(cancel_futures=True)
        if collecting:
            gc.enable()
    splits = {"train": train.close(), "test": test.close()}
    check_splits(splits, args)
    if not splits["test"]["documents"]:
        del splits["test"]
    return splits


def test_share(plan: Plan, test_documents: int, test_tokens: int, document_tokens: np.ndarray) -> int:
    """How many of this batch's documents, counted from its front, still belong to the test split."""
    if plan.test_documents is not None:
        return min(max(plan.test_documents - test_documents, 0), len(document_tokens))
    missing_tokens = plan.test_tokens - test_tokens
    if missing_tokens <= 0:
        return 0
    return min(int(np.searchsorted(np.cumsum(document_tokens), missing_tokens)) + 1, len(document_tokens))


def check_splits(splits: dict, args) -> None:
    train, test = splits["train"], splits["test"]
    if not train["documents"]:
        all_tokens = train["tokens"] + test["tokens"]
        raise InputError(f"--test-size {args.test_size} blocks needs more text than the corpus holds ({all_tokens:,} "
                         f"tokens, {all_tokens // args.block_size:,} blocks); lower it or give a fraction (e.g. 0.01)")
    if not train["blocks"]:
        raise InputError(f"the train split holds {train['tokens']:,} tokens, less than one block of "
                         f"{args.block_size}; lower --block-size or give more text")
    if test["documents"] and not test["blocks"]:
        raise InputError(f"the test split holds {test['tokens']:,} tokens, less than one block of {args.block_size}; "
                         f"raise --test-size, or pass --test-size 0 for no test split")


def report(folder: Path, splits: dict, args, plan: Plan, seconds: float) -> None:
    for name, split in splits.items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens -> {split['blocks']:,} blocks "
              f"of {args.block_size} in {len(split['shards'])} file(s); the last {split['dropped_tokens']:,} "
              f"tokens (under one block) are left out")
    print(f"wrote '{folder}' in {seconds:.1f} s ({plan.text_bytes:,} bytes of text, "
          f"{plan.text_bytes / 1e6 / seconds:.2f} MB/s)")
    if "test" not in splits:
        print("note: no test split (--test-size 0): pre-training with do_eval needs one; rerun with --test-size "
              "(e.g. 0.01) to hold some text out")
