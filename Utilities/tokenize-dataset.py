"""Tokenize a text corpus and pack it into fixed-length blocks, the folder that pre-training.py trains on.

    python Utilities/tokenize-dataset.py --dataset-name data/sample/pt-sample.jsonl --tokenizer-name my-tokenizer \
        --block-size 2048 --test-size 0.01 --output-dir data/my-corpus-tokenized

Every document becomes BOS + its tokens + EOS; documents are (by default) shuffled, the first ones go to the test
split (a fraction of the text, or enough documents for a number of blocks), and each split's token stream is cut
into rows of exactly --block-size tokens: `output-dir/{train,test}/part-NNNNN.parquet` (column `input_ids`) plus
`manifest.json` (see manifest.py). Only the last partial block of each split is left out; the manifest counts it.
The corpus is streamed in batches, so memory stays flat however large it is.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import InputError, atomic_dir, hub_reachable, load_text_dataset, looks_local, require_hub, \
    run_main, sha256_file  # noqa: E402
from manifest import BOS_EOS_POLICY, MANIFEST_NAME, read_manifest, write_manifest  # noqa: E402

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
GENERIC_CLASS = "PreTrainedTokenizerFast"
# Text per encode call: large enough for the tokenizer's threads to stay busy, small enough that the
# in-flight batches (their Encoding objects cost ~100 bytes per token) stay far below a gigabyte.
BATCH_BYTES = 1 << 20
SHARD_TOKENS = 1 << 26       # ~256 MB of int32 per shard before compression (~100-170 MB on disk)
ROW_GROUP_TOKENS = 1 << 20   # 4 MB row groups: a reader can fetch any block without reading its whole shard
GATHER_DOCUMENTS = 64       # documents read between two hand-backs of the corpus pages (see read_texts)
PROC_MAPS = Path("/proc/self/maps")
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
BLOCK_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS | FALSE_WORDS:
        return text.lower() in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no), not '{text}'")


def parse_test_size(text: str) -> int | float:
    """A number of blocks (an integer >= 1), a fraction of the text (0 < f < 1), or 0 for no test split."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a number of blocks (e.g. 30000), a fraction below 1 "
                                         f"(e.g. 0.01) or 0, not '{text}'")
    return int(value) if value >= 1 or value == 0 else value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-name", required=True,
                        help="local .txt/.jsonl/.parquet/.csv file or folder, save_to_disk folder, or Hub dataset")
    parser.add_argument("--dataset-split", default="train",
                        help="split of a Hub or save_to_disk dataset (default: train)")
    parser.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    parser.add_argument("--tokenizer-name", required=True, help="tokenizer folder (or a Hub name when online)")
    parser.add_argument("--block-size", type=int, default=2048,
                        help="tokens per row, the model's context (default: 2048)")
    parser.add_argument("--test-size", type=parse_test_size, default=0.01,
                        help="blocks for the test split (e.g. 30000), a fraction of the text (default: 0.01), or 0")
    parser.add_argument("--shuffle", type=parse_bool, default=True,
                        help="shuffle the documents: true/false, 1/0, yes/no (default: true)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffle (default: 42)")
    parser.add_argument("--output-dir", required=True, help="folder to write (train/, test/, manifest.json)")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="tokenizer processes (default: 1, which already uses every core; more help on many cores)")
    parser.add_argument("--blocks-per-shard", type=int, default=None,
                        help=f"rows per parquet file (default: {SHARD_TOKENS:,} tokens' worth, ~100-250 MB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tokenized dataset that --output-dir holds")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also upload the finished folder as this Hub dataset repository")
    parser.add_argument("--token", default=None, help="Hugging Face token; never printed or saved (default: $HF_TOKEN)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_arguments(args)
    token = args.token or os.environ.get("HF_TOKEN") or None
    if args.push_to_hub:
        check_hub_for_push(args.push_to_hub, token)
    started = time.perf_counter()
    tokenizer, tokenizer_record = load_tokenizer(args.tokenizer_name, token)
    dataset = load_text_dataset(args.dataset_name, args.dataset_split, args.text_column, token=token,
                                text_column_flag="--text-column")
    plan = plan_documents(document_bytes(dataset), args)
    request = describe_request(args, tokenizer, tokenizer_record, plan)
    output_dir = Path(args.output_dir)
    if output_state(output_dir, request, args.overwrite) == "done":
        print(f"'{output_dir}' already holds this dataset; nothing to do (pass --overwrite to rebuild it)")
    else:
        with atomic_dir(output_dir, overwrite=output_dir.exists()) as folder:
            splits = tokenize_and_pack(dataset, tokenizer, plan, folder, args)
            write_manifest(folder, {**request, "splits": splits})
        report(output_dir, splits, args, plan, time.perf_counter() - started)
    if args.push_to_hub:
        push_folder(output_dir, args.push_to_hub, token)


def check_arguments(args) -> None:
    if args.block_size < 2:
        raise InputError(f"--block-size must be at least 2 (got {args.block_size}); the model's context, e.g. 2048")
    if args.num_proc < 1:
        raise InputError(f"--num-proc must be at least 1 (got {args.num_proc})")
    if args.blocks_per_shard is not None and args.blocks_per_shard < 1:
        raise InputError(f"--blocks-per-shard must be at least 1 (got {args.blocks_per_shard})")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output-dir '{args.output_dir}' is a file; give a folder")


def check_hub_for_push(repo_id: str, token: str | None) -> None:
    """Fail before any work when the upload at the end could not happen."""
    if not hub_reachable():
        raise InputError(f"--push-to-hub {repo_id}: the Hugging Face Hub cannot be reached; connect to it, or "
                         f"drop --push-to-hub and upload the folder later")
    from huggingface_hub import HfApi

    try:
        HfApi(token=token).whoami()
    except Exception as error:  # no token, a revoked one, a proxy page: the user needs the gist
        raise InputError(f"--push-to-hub {repo_id}: the Hub does not accept the token ({_first_line(error)}); "
                         f"pass --token or set HF_TOKEN") from None


@dataclass
class PackingTokenizer:
    """What packing needs of a tokenizer folder: its Rust tokenizer and the ids that separate documents."""
    backend: object          # tokenizers.Tokenizer, set to encode text that looks like `</s>` as text
    bos_token_id: int
    eos_token_id: int
    vocab_size: int          # with the added tokens, as len() of the transformers tokenizer counts it


def load_tokenizer(name: str, token: str | None) -> tuple[PackingTokenizer, dict]:
    """The tokenizer, and what the manifest records about it (path, sha256 of tokenizer.json, vocabulary size).

    A folder whose config names the generic PreTrainedTokenizerFast (train-sentencepiece.py writes those) is read
    with the `tokenizers` library alone, as transformers would use it: importing transformers, and torch behind it,
    would add seconds to every run. Any other class goes through transformers, which rebuilds some tokenizers
    (Llama's among them) with a pipeline of its own: the ids must be the ones pre-training and inference will see.
    """
    folder = Path(name).expanduser()
    local = folder.exists()
    if not local:
        if looks_local(name):
            raise InputError(f"tokenizer '{name}' does not exist; check the path")
        folder = download_tokenizer(name, token)
    if not folder.is_dir():
        raise InputError(f"tokenizer '{name}' is a file; give the folder that holds its tokenizer.json")
    if not (folder / "tokenizer.json").is_file():
        raise unusable_tokenizer(f"tokenizer '{name}' is not a fast tokenizer with a tokenizer.json")
    config = read_json_config(folder / "tokenizer_config.json", name)
    if config.get("tokenizer_class", GENERIC_CLASS) == GENERIC_CLASS:
        tokenizer = read_generic_tokenizer(folder, name, config)
    else:
        tokenizer = read_with_transformers(folder, name)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer '{name}' lacks a BOS or EOS token, which separate the packed documents; "
                         f"give a tokenizer that defines both")
    return tokenizer, {"path": str(folder.resolve()) if local else name,
                       "tokenizer_json_sha256": sha256_file(folder / "tokenizer.json"),
                       "vocab_size": tokenizer.vocab_size}


def read_generic_tokenizer(folder: Path, name: str, config: dict) -> PackingTokenizer:
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8", errors="replace")
    try:
        backend = text_backend(tokenizer_json)
    except Exception as error:  # the Rust parser's message names the offending field
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({_first_line(error)})") from None
    special = special_tokens(folder, name, config)
    ids = {role: backend.token_to_id(special[role]) if special.get(role) else None for role in ("bos", "eos")}
    return PackingTokenizer(backend, ids["bos"], ids["eos"], backend.get_vocab_size(with_added_tokens=True))


def read_with_transformers(folder: Path, name: str) -> PackingTokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many kinds for a folder that is not a tokenizer
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({_first_line(error)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise unusable_tokenizer(f"tokenizer '{name}' is not a fast tokenizer with a tokenizer.json")
    return PackingTokenizer(text_backend(tokenizer.backend_tokenizer.to_str()), tokenizer.bos_token_id,
                            tokenizer.eos_token_id, len(tokenizer))


def special_tokens(folder: Path, name: str, config: dict) -> dict[str, str]:
    """The BOS and EOS token strings, as transformers 5 finds them: in tokenizer_config.json, overridden by the
    legacy special_tokens_map.json unless the config lists its added tokens itself."""
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(read_json_config(folder / "special_tokens_map.json", name))
    found = {}
    for values in sources:
        for role in ("bos", "eos"):
            value = values.get(f"{role}_token")
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and value:
                found[role] = value
    return found


def read_json_config(path: Path, name: str) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({path.name}: "
                                 f"{_first_line(error)})") from None
    return values if isinstance(values, dict) else {}


def unusable_tokenizer(problem: str) -> InputError:
    return InputError(f"{problem}; give a folder written by train-sentencepiece.py")


def download_tokenizer(name: str, token: str | None) -> Path:
    require_hub("tokenizer", name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES, token=token))
    except Exception as error:  # unknown repo, gated, no permission
        raise InputError(f"could not download tokenizer '{name}' from the Hub ({_first_line(error)}); "
                         f"check the name, or pass a local folder") from None


def document_bytes(dataset) -> np.ndarray:
    """UTF-8 size of every document (0 when missing), read from Arrow's offsets without decoding the text."""
    corpus_maps = mapped_file_ranges(".arrow")
    parts = []
    for batch in dataset.with_format("arrow").iter(batch_size=1 << 16):
        parts.append(pc.fill_null(pc.binary_length(batch.column(0)), 0).to_numpy())
        drop_mapped_pages(corpus_maps)  # see read_texts
    return np.concatenate(parts).astype(np.int64)


@dataclass
class Plan:
    order: np.ndarray             # dataset rows in the order they are tokenized; empty documents left out
    batch_edges: np.ndarray       # batch i is order[batch_edges[i]:batch_edges[i + 1]]
    test_documents: int | None    # the first this many documents form the test split, or …
    test_tokens: int | None       # … the first documents until the test split holds this many tokens
    batch_bytes: np.ndarray       # UTF-8 bytes of each batch, for the progress bar
    empty_documents: int
    text_bytes: int


def plan_documents(byte_counts: np.ndarray, args) -> Plan:
    """Order the documents, cut them into batches of ~BATCH_BYTES and decide where the test split ends."""
    order = np.flatnonzero(byte_counts)
    if not len(order):
        raise InputError(f"dataset '{args.dataset_name}' holds only empty documents; give one with text")
    if args.shuffle:
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


def text_backend(tokenizer_json: str):
    """The Rust tokenizer, set so text that looks like `</s>` is encoded as text: EOS then marks ends only."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = True
    return backend


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


def encoded_batches(dataset, plan: Plan, executor, encode, in_flight: int):
    """Yield (stream, document_tokens) per batch in order, with a few batches always in flight."""
    texts_by_row = dataset.with_format("arrow")
    corpus_maps = mapped_file_ranges(".arrow")
    pending = deque()
    for start, stop in zip(plan.batch_edges[:-1], plan.batch_edges[1:]):
        pending.append(executor.submit(encode, read_texts(texts_by_row, plan.order[start:stop], corpus_maps)))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
        rows = pa.ListArray.from_arrays(offsets, self.buffer[:blocks * self.block_size])
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


def tokenize_and_pack(dataset, tokenizer, plan: Plan, folder: Path, args) -> dict:
    """Stream every batch through the tokenizer into the test and train writers; return the splits' counts."""
    from tqdm import tqdm

    test = SplitWriter(folder, "test", args.block_size, blocks_per_shard(args))
    train = SplitWriter(folder, "train", args.block_size, blocks_per_shard(args))
    executor, encode = make_executor(tokenizer, args.num_proc)
    progress = tqdm(total=plan.text_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)
    try:
        batches = encoded_batches(dataset, plan, executor, encode, in_flight=2 * args.num_proc + 2)
        for (stream, document_tokens), batch_bytes in zip(batches, plan.batch_bytes):
            to_test = test_share(plan, test.documents, test.tokens, document_tokens)
            cut = int(document_tokens[:to_test].sum())
            test.add(stream[:cut], to_test)
            train.add(stream[cut:], len(document_tokens) - to_test)
            progress.update(int(batch_bytes))
    finally:
        progress.close()
        executor.shutdown(cancel_futures=True)
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


def push_folder(folder: Path, repo_id: str, token: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                          commit_message="Upload tokenized dataset")
    except Exception as error:  # network, permissions, quota: the local folder is fine either way
        raise InputError(f"'{folder}' is complete, but uploading it to '{repo_id}' failed ({_first_line(error)}); "
                         f"rerun the same command to retry the upload") from None
    print(f"uploaded '{folder}' to https://huggingface.co/datasets/{repo_id}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    run_main(main)
