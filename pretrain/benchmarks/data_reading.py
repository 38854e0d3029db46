"""Reading tokenized folders: time to the first batch, extra disk, peak memory and loader tokens/s, per layout.

    python Utilities/benchmark.py data --tokens 1000000000
    python Utilities/benchmark.py data --tokens 20000000 --num-processes 1 8 --baseline --keep --dir /tmp/bench

Writes a synthetic tokenized folder of --tokens tokens (uniform random ids: the hardest case for parquet's
dictionary encoding) in each layout, ours (list<int32> + manifest.json) and the published one (int64
`input_ids`, `attention_mask`, `labels`), streaming the write. Each measurement runs in a fresh process: the
reader opens the folder, validates it and yields the first micro-batch (from sample 0 and from the middle of
epoch 2, as a resume would), then streams micro-batches as fast as it can (--steady-tokens of them, prefetch
thread on, nothing consuming them), then one pass of eval batches; its peak RSS (and the anonymous part, without
the pages of the memory-mapped files) is summed over it and its children, sampled from outside. Reported against
what one GPU consumes (--target-tokens-per-second, 400k tokens/s for the 160M model on an H100). --baseline adds
the original scripts' approach (pretrain/benchmarks/baselines.py) on the same folder:
`datasets.load_dataset("parquet")` (which writes an Arrow copy into the cache) with a shuffling DataLoader.
Synthetic folders are deleted afterwards unless --keep.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pretrain.benchmarks import baselines
from pretrain.benchmarks.measure import disk_bytes, peak_memory_mib, python_module, run_measured

TARGET_TOKENS_PER_SECOND = 400_000
# How each layout's writer cuts files: tokenize-dataset.py (zstd, 2^20-token row groups, 2^26-token shards), and
# `datasets` for the published sets (snappy, 1,000-row groups, shards of about 500 MB in memory).
LAYOUTS = {"ours": {"compression": "zstd", "row_group_tokens": 1 << 20, "file_tokens": 1 << 26},
           "published": {"compression": "snappy", "row_group_rows": 1000, "file_bytes": 500_000_000}}


def add_arguments(parser):
    parser.add_argument("--tokens", type=int, default=100_000_000, help="tokens in the synthetic folder")
    parser.add_argument("--published-tokens", type=int, default=None,
                        help="tokens for the published (int64) layout (default: --tokens)")
    parser.add_argument("--layouts", nargs="+", default=["ours", "published"], choices=["ours", "published"])
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--num-processes", type=int, nargs="+", default=[1],
                        help="process counts to measure (the reader of process 0 of each)")
    parser.add_argument("--row-group-rows", type=int, default=None,
                        help="blocks per parquet row group (default: as each layout's writer does)")
    parser.add_argument("--file-blocks", type=int, default=None,
                        help="blocks per parquet file (default: as each layout's writer does)")
    parser.add_argument("--steady-tokens", type=int, default=200_000_000,
                        help="tokens this process reads for the throughput figure (capped at the train split)")
    parser.add_argument("--target-tokens-per-second", type=int, default=TARGET_TOKENS_PER_SECOND)
    parser.add_argument("--baseline", action="store_true",
                        help="also measure datasets.load_dataset + DataLoader(shuffle=True), as the original did")
    parser.add_argument("--dir", default=None, help="where to write the synthetic folders (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic folders")


def run(args):
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-data-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for layout in args.layouts:
            tokens = args.published_tokens if layout == "published" and args.published_tokens else args.tokens
            folder = root / f"{layout}-{tokens}"
            started = time.perf_counter()
            if not (folder / "train").is_dir():
                write_folder(folder, layout, tokens, args)
            group_rows, file_rows = layout_rows(layout, args)
            written = {"layout": layout, "tokens": tokens, "write_seconds": round(time.perf_counter() - started, 1),
                       "folder_mib": round(disk_bytes(folder) / 2**20, 1), "row_group_blocks": group_rows,
                       "file_blocks": file_rows}
            variants = [("tokenized_data", p) for p in args.num_processes]
            variants += [("original", 1)] if args.baseline else []
            for reader, processes in variants:
                result = measure(root, folder, reader, processes, args)
                print(json.dumps({"benchmark": "data", "variant": f"{reader}-{layout}", **written, **result}),
                      flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the synthetic folder

def write_folder(folder: Path, layout: str, tokens: int, args, tokenizer: dict | None = None):
    """Train and test (1% of blocks) parquet files, written a row group at a time so memory stays flat.

    `tokenizer`: the manifest's tokenizer record (path, tokenizer_json_sha256, vocab_size), for a folder that
    pre-training.py reads with that tokenizer; by default one that names no real tokenizer."""
    import numpy as np

    from pretrain.data.manifest import write_manifest

    num_blocks = tokens // args.block_size
    counts = {"test": max(1, num_blocks // 100)}
    counts["train"] = num_blocks - counts["test"]
    group_rows, file_rows = layout_rows(layout, args)
    rng = np.random.default_rng(0)
    shards = {}
    for split, count in counts.items():
        shards[split] = []
        for number, first in enumerate(range(0, count, file_rows)):
            rows = min(file_rows, count - first)
            name = f"{split}/part-{number:05d}.parquet"
            write_file(folder / name, rows, layout, group_rows, rng, args)
            shards[split].append({"file": name, "blocks": rows})
    if layout == "ours":
        splits = {split: {"documents": count, "tokens": count * args.block_size, "blocks": count,
                          "dropped_tokens": 0, "shards": shards[split]} for split, count in counts.items()}
        write_manifest(folder, {
            "tokenizer": tokenizer or {"path": "synthetic", "tokenizer_json_sha256": "0" * 64,
                                       "vocab_size": args.vocab_size},
            "block_size": args.block_size, "column": "input_ids", "dtype": "int32",
            "special_tokens": {"policy": "bos+eos", "bos_token_id": 1, "eos_token_id": 2},
            "source": {"dataset": "synthetic"}, "splits": splits})


def layout_rows(layout: str, args) -> tuple[int, int]:
    """Blocks per row group and per file for `layout`, unless given on the command line."""
    spec = LAYOUTS[layout]
    group_rows = spec.get("row_group_rows") or max(1, spec["row_group_tokens"] // args.block_size)
    file_rows = spec.get("file_tokens", 0) // args.block_size or spec.get("file_bytes", 0) // (24 * args.block_size)
    return args.row_group_rows or group_rows, args.file_blocks or max(1, file_rows)


def write_file(path: Path, num_rows: int, layout: str, group_rows: int, rng, args):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int32 if layout == "ours" else np.int64
    writer = None
    for first in range(0, num_rows, group_rows):
        rows = min(group_rows, num_rows - first)
        offsets = pa.array(np.arange(0, (rows + 1) * args.block_size, args.block_size, dtype=np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(
            rng.integers(0, args.vocab_size, size=rows * args.block_size, dtype=dtype)))
        columns = {"input_ids": ids}
        if layout == "published":
            ones = pa.array(np.ones(rows * args.block_size, dtype=np.int64))
            columns.update(attention_mask=pa.ListArray.from_arrays(offsets, ones), labels=ids)
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema, compression=LAYOUTS[layout]["compression"])
        writer.write_table(table)
    writer.close()


# ------------------------------------------------------------------------------------------------------ measuring

def measure(root: Path, folder: Path, reader: str, processes: int, args) -> dict:
    """Run one reader in a fresh process; add its peak memory and the disk it left behind in the folder and in its
    own temp dir and Hugging Face caches (pointed into `scratch`: the shared ~/.cache is written by other programs
    too)."""
    scratch = root / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "tmp").mkdir(parents=True)
    watched = [folder, scratch]
    before = [disk_bytes(p) for p in watched]
    files_before = {p for w in watched for p in w.rglob("*")}
    env = {"TMPDIR": str(scratch / "tmp"), "HF_HOME": str(scratch / "hf-home"),
           "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}
    config = {"folder": str(folder), "reader": reader, "processes": processes, "block_size": args.block_size,
              "vocab_size": args.vocab_size, "micro_batch_size": args.micro_batch_size,
              "steady_tokens": args.steady_tokens, "cache_dir": str(scratch / "hf-datasets")}
    completed = run_measured(python_module("pretrain.benchmarks.data_reading", json.dumps(config)), env=env)
    result = completed.check(f"the {reader} reader").json_lines()[-1]
    result.update(processes=processes, micro_batch_size=args.micro_batch_size, **peak_memory_mib([completed]))
    result["extra_disk_bytes"] = sum(disk_bytes(p) - b for p, b in zip(watched, before))
    result["new_files"] = sorted(str(p) for w in watched for p in w.rglob("*") if p not in files_before)[:5]
    result["target_tokens_per_second"] = args.target_tokens_per_second
    result["ratio_to_target"] = round(result["tokens_per_second"] / args.target_tokens_per_second, 1)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def child(config: dict) -> dict:
    """The reader's figures, measured in this process; its memory is measured from outside."""
    import numpy as np  # noqa: F401  (imported before timing starts, as the training script has it loaded)
    import torch  # noqa: F401

    rss_after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measure_reader = measure_ours if config["reader"] == "tokenized_data" else measure_original
    return {**measure_reader(config), "rss_after_imports_mib": round(rss_after_imports, 1)}


def measure_ours(config: dict) -> dict:
    from pretrain.data.batches import TrainBatches, eval_batches
    from pretrain.data.tokenized_folder import open_tokenized_folder

    batch, processes = config["micro_batch_size"], config["processes"]
    started = time.perf_counter()
    train, test = open_tokenized_folder(config["folder"], block_size=config["block_size"],
                                        vocab_size=config["vocab_size"], tokenizer_sha256="0" * 64)
    opened = time.perf_counter()
    options = {"micro_batch_size": batch, "process_index": 0, "num_processes": processes, "seed": 0}
    batches = TrainBatches(train, **options)
    next(batches)
    first_batch = time.perf_counter()
    batches.close()
    global_batch = batch * processes
    resume_at = train.num_blocks * 5 // 2 // global_batch * global_batch
    started_resume = time.perf_counter()
    batches = TrainBatches(train, start_sample=resume_at, **options)
    next(batches)
    resumed = time.perf_counter() - started_resume
    batches.close()
    num_batches = max(1, min(config["steady_tokens"], train.num_blocks * train.block_size // processes)
                      // (batch * train.block_size))
    batches = TrainBatches(train, **options)
    next(batches)
    started_steady = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    steady = time.perf_counter() - started_steady
    batches.close()
    started_eval = time.perf_counter()
    eval_rows = sum(int(w.sum()) for _, w in eval_batches(test, batch_size=batch, process_index=0,
                                                           num_processes=processes))
    evaluated = time.perf_counter() - started_eval
    return {"num_blocks": train.num_blocks, "open_seconds": round(opened - started, 3),
            "first_batch_seconds": round(first_batch - started, 3), "resume_first_batch_seconds": round(resumed, 3),
            "tokens_per_second": round(num_batches * batch * train.block_size / steady),
            "eval_tokens_per_second": round(eval_rows * test.block_size / evaluated)}


def measure_original(config: dict) -> dict:
    """The original scripts' loader (pretrain/benchmarks/baselines.py), timed the same way."""
    batch, block_size = config["micro_batch_size"], config["block_size"]
    started = time.perf_counter()
    loader, num_rows = baselines.train_loader(config["folder"], batch, config["cache_dir"])
    batches = iter(loader)
    next(batches)
    first_batch = time.perf_counter()
    num_batches = max(1, min(config["steady_tokens"], num_rows * block_size) // (batch * block_size))
    started_steady = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    steady = time.perf_counter() - started_steady
    return {"num_blocks": num_rows, "first_batch_seconds": round(first_batch - started, 3),
            "tokens_per_second": round(num_batches * batch * block_size / steady)}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
