"""pretrain/data/manifest.py: writing and reading a tokenized folder's manifest, its refusals, and sha256_file."""

import hashlib
import json

import pytest

from pretrain.data import manifest as manifest_module
from pretrain.errors import InputError


def valid_manifest():
    return {"tokenizer": {"path": "t", "tokenizer_json_sha256": "0" * 64, "vocab_size": 1024}, "block_size": 4,
            "column": "input_ids", "dtype": "int32",
            "special_tokens": {"policy": "bos+eos", "bos_token_id": 1, "eos_token_id": 2}, "source": {},
            "splits": {"train": {"documents": 2, "tokens": 11, "blocks": 2, "dropped_tokens": 3,
                                 "shards": [{"file": "train/part-00000.parquet", "blocks": 2}]}}}


def test_manifest_round_trip_and_absence(tmp_path):
    assert manifest_module.read_manifest(tmp_path) is None
    manifest_module.write_manifest(tmp_path, valid_manifest())
    assert manifest_module.read_manifest(tmp_path) == {"format": 1, **valid_manifest()}
    with pytest.raises(ValueError, match="malformed"):
        manifest_module.write_manifest(tmp_path, {**valid_manifest(), "block_size": 1})


def test_write_sets_the_format_keeps_text_readable_and_refuses_another_format(tmp_path):
    manifest = valid_manifest()
    manifest["tokenizer"]["path"] = "/dados/tokenizador-ação"
    path = manifest_module.write_manifest(tmp_path, manifest)
    assert path == tmp_path / "manifest.json"
    text = path.read_text(encoding="utf-8")
    assert json.loads(text)["format"] == manifest_module.FORMAT_VERSION and "tokenizador-ação" in text
    assert text.endswith("}\n")
    with pytest.raises(ValueError, match="format 2 is not the supported format 1"):
        manifest_module.write_manifest(tmp_path / "other", {**valid_manifest(), "format": 2})
    assert not (tmp_path / "other" / "manifest.json").exists()


def broken(path, value):
    manifest = {"format": 1, **valid_manifest()}
    *parents, last = path
    target = manifest
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return manifest


@pytest.mark.parametrize("manifest, message", [
    ([1, 2], "not a JSON object"),
    (broken(["format"], 2), "format 2 is not the supported format 1"),
    (broken(["format"], None), "'format' is missing"),
    (broken(["block_size"], "4"), "'block_size' should be int, not str"),
    (broken(["block_size"], True), "'block_size' should be int, not bool"),
    (broken(["tokenizer", "vocab_size"], None), "'tokenizer.vocab_size' is missing"),
    (broken(["special_tokens", "eos_token_id"], 2.0), "'special_tokens.eos_token_id' should be int"),
    (broken(["splits"], {"test": valid_manifest()["splits"]["train"]}), "no 'train' split"),
    (broken(["splits", "train"], []), "splits.train is not an object"),
    (broken(["splits", "train", "shards"], [{"file": "x"}]), "must be a list of"),
    (broken(["splits", "train", "blocks"], 3), "do not add up to 3"),
    (broken(["splits", "train", "dropped_tokens"], 4), "tokens != blocks"),
    (broken(["block_size"], 1), "block_size 1 is below 2"),
])
def test_malformed_manifests_raise_input_error(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message) as caught:
        manifest_module.read_manifest(tmp_path)
    assert "rebuild the folder with Utilities/tokenize-dataset.py" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_manifest_that_is_not_json(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xff{")
    with pytest.raises(InputError, match="is not valid JSON"):
        manifest_module.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{\"format\": 1,")
    with pytest.raises(InputError, match="is not valid JSON .*rebuild the folder"):
        manifest_module.read_manifest(tmp_path)


def test_manifest_problem_accepts_the_valid_one_and_a_test_split():
    assert manifest_module.manifest_problem({"format": 1, **valid_manifest()}) is None
    with_test = broken(["splits", "test"], {"documents": 1, "tokens": 4, "blocks": 1, "dropped_tokens": 0,
                                            "shards": [{"file": "test/part-00000.parquet", "blocks": 1}]})
    assert manifest_module.manifest_problem(with_test) is None
    with_test["splits"]["test"]["shards"][0]["blocks"] = True  # a bool is not a block count
    assert "splits.test.shards must be a list of" in manifest_module.manifest_problem(with_test)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 10_000])
def test_sha256_file_reads_in_chunks_and_matches_hashlib(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert manifest_module.sha256_file(path) == expected
    assert manifest_module.sha256_file(str(path), chunk_bytes=4096) == expected
    assert manifest_module.sha256_file(path, chunk_bytes=7) == expected
