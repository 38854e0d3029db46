"""Small tokenized folders written by the tests: rows whose ids say where they came from, in our parquet layout or
the published one, with or without a manifest."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.data.manifest import write_manifest

BLOCK = 4
VOCAB = 100_000


def blocks(first: int, count: int, block_size: int = BLOCK) -> np.ndarray:
    """Rows whose ids say where they came from: row i holds i*block_size ... i*block_size + block_size - 1."""
    return np.arange(first * block_size, (first + count) * block_size, dtype=np.int64).reshape(count, block_size)


def ids_of(rows) -> list[int]:
    return [int(r) for r in np.asarray(rows)[:, 0] // BLOCK]


def list_column(rows: np.ndarray, dtype=pa.int32(), offsets=None) -> pa.Array:
    flat = pa.array(rows.reshape(-1), type=dtype)
    if offsets is None:
        offsets = np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), flat)


def write_file(path, rows, layout="ours", row_group_rows=10, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "ours":
        table = pa.table({"input_ids": list_column(rows)})
    else:  # the published layout: three int64 columns
        table = pa.table({"input_ids": list_column(rows, pa.int64()),
                          "attention_mask": list_column(np.ones_like(rows), pa.int64()),
                          "labels": list_column(rows, pa.int64())})
    pq.write_table(table, path, row_group_size=row_group_rows, **options)


def make_folder(root, num_train=57, num_test=13, layout="ours", row_group_rows=10, files=3, manifest=True,
                block_size=BLOCK):
    """A tokenized folder; train spread over `files` files of row groups of `row_group_rows` rows."""
    folder = root / "tokenized"
    bounds = np.linspace(0, num_train, files + 1).astype(int)
    for number, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
        write_file(folder / "train" / f"part-{number:05d}.parquet", blocks(low, high - low, block_size), layout,
                   row_group_rows)
    if num_test:
        write_file(folder / "test" / "part-00000.parquet", blocks(10_000, num_test, block_size), layout,
                   row_group_rows)
    if manifest:
        write_manifest(folder, manifest_for(folder, num_train, num_test, block_size))
    return folder


def manifest_for(folder, num_train, num_test, block_size=BLOCK, vocab_size=VOCAB, sha="a" * 64):
    def split(name, count):
        files = sorted((folder / name).glob("*.parquet"))
        shards = [{"file": f"{name}/{p.name}", "blocks": pq.ParquetFile(p).metadata.num_rows} for p in files]
        return {"documents": count, "tokens": count * block_size, "blocks": count, "dropped_tokens": 0,
                "shards": shards}

    splits = {"train": split("train", num_train)}
    if num_test:
        splits["test"] = split("test", num_test)
    return {"tokenizer": {"path": "tok", "tokenizer_json_sha256": sha, "vocab_size": vocab_size},
            "block_size": block_size, "column": "input_ids", "dtype": "int32",
            "special_tokens": {"policy": "bos+eos", "bos_token_id": 1, "eos_token_id": 2},
            "source": {}, "splits": splits}
