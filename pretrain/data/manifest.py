"""The manifest of a tokenized folder: what Utilities/tokenize-dataset.py wrote, and what a reader must check.

A tokenized folder holds `train/*.parquet`, `test/*.parquet` (absent when there is no test split) and
`manifest.json`:

    {
      "format": 1,
      "tokenizer": {"path": "/abs/tokenizer-folder or hub/name", "tokenizer_json_sha256": "…", "vocab_size": 32000},
      "block_size": 2048,
      "column": "input_ids",
      "dtype": "int32",
      "special_tokens": {"policy": "bos+eos", "bos_token_id": 1, "eos_token_id": 2},
      "source": {"dataset": "…", "dataset_split": "train", "text_column": "text", "shuffle": true, "seed": 42,
                 "test_size": 0.01, "documents": 123, "empty_documents": 0, "text_bytes": 456},
      "splits": {
        "train": {"documents": 110, "tokens": 250000, "blocks": 122, "dropped_tokens": 144,
                  "shards": [{"file": "train/part-00000.parquet", "blocks": 122}]},
        "test": {…}
      }
    }

Policy "bos+eos": every document is stored as BOS, its tokens, EOS, and documents follow each other in the
split's stream, which is cut into rows of exactly `block_size` tokens. Text that merely looks like a special
token is encoded as ordinary text, so EOS marks document ends and nothing else. Per split,
`tokens` = `blocks` * `block_size` + `dropped_tokens`: the stream's last `dropped_tokens` tokens (fewer than
one block) did not fill a row and are not stored. Shard paths are relative to the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pretrain.errors import InputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BOS_EOS_POLICY = "bos+eos"

# Required keys and the JSON types they must hold; `source` is informative and free-form beyond being a dict.
_TOP_KEYS = {"format": int, "tokenizer": dict, "block_size": int, "column": str, "dtype": str,
             "special_tokens": dict, "source": dict, "splits": dict}
_TOKENIZER_KEYS = {"path": str, "tokenizer_json_sha256": str, "vocab_size": int}
_SPECIAL_KEYS = {"policy": str, "bos_token_id": int, "eos_token_id": int}
_SPLIT_KEYS = {"documents": int, "tokens": int, "blocks": int, "dropped_tokens": int, "shards": list}


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write `manifest` (with `"format"` set) as `folder/manifest.json`, checked as a reader would check it."""
    manifest = {"format": FORMAT_VERSION, **manifest}
    problem = manifest_problem(manifest)
    if problem:
        raise ValueError(f"refusing to write a malformed manifest: {problem}")
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a tokenized folder; None when it has none; InputError when it is malformed."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"'{path}' is not valid JSON ({error}); rebuild the folder with "
                         f"Utilities/tokenize-dataset.py") from None
    problem = manifest_problem(manifest)
    if problem:
        raise InputError(f"'{path}' is malformed: {problem}; rebuild the folder with Utilities/tokenize-dataset.py")
    return manifest


def manifest_problem(manifest) -> str | None:
    """The first thing wrong with a manifest, or None when it is well formed."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    if isinstance(manifest.get("format"), int) and manifest["format"] != FORMAT_VERSION:
        return (f"format {manifest['format']} is not the supported format {FORMAT_VERSION} "
                f"(written by another version of the suite)")
    problem = _missing_or_mistyped(manifest, _TOP_KEYS, "") or \
        _missing_or_mistyped(manifest["tokenizer"], _TOKENIZER_KEYS, "tokenizer.") or \
        _missing_or_mistyped(manifest["special_tokens"], _SPECIAL_KEYS, "special_tokens.")
    if problem:
        return problem
    if manifest["block_size"] < 2:
        return f"block_size {manifest['block_size']} is below 2"
    if "train" not in manifest["splits"]:
        return "it has no 'train' split"
    for name, split in manifest["splits"].items():
        problem = _split_problem(name, split, manifest["block_size"])
        if problem:
            return problem
    return None


def _split_problem(name: str, split, block_size: int) -> str | None:
    if not isinstance(split, dict):
        return f"splits.{name} is not an object"
    problem = _missing_or_mistyped(split, _SPLIT_KEYS, f"splits.{name}.")
    if problem:
        return problem
    shards = split["shards"]
    if not all(isinstance(s, dict) and isinstance(s.get("file"), str) and _is_int(s.get("blocks")) for s in shards):
        return f"splits.{name}.shards must be a list of {{\"file\": str, \"blocks\": int}}"
    if sum(s["blocks"] for s in shards) != split["blocks"]:
        return f"splits.{name}: the shards' blocks do not add up to {split['blocks']}"
    if not 0 <= split["dropped_tokens"] < block_size or \
            split["tokens"] != split["blocks"] * block_size + split["dropped_tokens"]:
        return f"splits.{name}: tokens != blocks * block_size + dropped_tokens (with 0 <= dropped_tokens < block_size)"
    return None


def _missing_or_mistyped(mapping, keys: dict, prefix: str) -> str | None:
    for key, kind in keys.items():
        if key not in mapping:
            return f"'{prefix}{key}' is missing"
        value = mapping[key]
        if not (_is_int(value) if kind is int else isinstance(value, kind)):
            return f"'{prefix}{key}' should be {kind.__name__}, not {type(value).__name__}"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The hex SHA-256 of a file (the manifest records the tokenizer.json it was packed with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
