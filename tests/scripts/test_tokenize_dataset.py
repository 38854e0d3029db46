"""Utilities/tokenize-dataset.py: packed blocks that decode back to the documents, exact counts, reproducible
files, the Hub push (with the FakeHub of tests/helpers/fake_hub.py), and one-line refusals of bad input. The manifest's
own tests are in test_manifest.py."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.cli import tokenize_dataset
from pretrain.data import corpus, packing
from pretrain.data import manifest as manifest_module
from pretrain.errors import InputError
from pretrain.tokenizer import folder as tokenizer_folder
from tests.helpers.runs import SAMPLE, TEST_BLOCK_SIZE, run_script
from tests.helpers.texts import read_sample_texts, write_sample_as

SCRIPT = "Utilities/tokenize-dataset.py"
BOS_ID, EOS_ID = 1, 2


def tokenize(*args, check=True):
    return run_script(SCRIPT, *args, check=check)


def tokenize_here(*args):
    """Run the script's main() in this process: the same code without paying for the imports again."""
    tokenize_dataset.main([str(a) for a in args])


def run_main_expecting(argv, message):
    with pytest.raises(InputError, match=message):
        tokenize_dataset.main([str(a) for a in argv])


def split_stream(folder: Path, split: str) -> np.ndarray:
    """The split's blocks, in file and row order, as one token stream."""
    files = sorted((folder / split).glob("*.parquet"))
    return np.concatenate([pq.read_table(f).column("input_ids").combine_chunks().flatten().to_numpy() for f in files])


def encode_documents(tokenizer, texts) -> np.ndarray:
    """What a split built from `texts` must hold before its tail is dropped: BOS, text, EOS for each document."""
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # "</s>" written in a document is text, not an end of document
    ids = [[BOS_ID, *e.ids, EOS_ID] for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return np.array([t for doc in ids for t in doc], dtype=np.int64)


def decode_documents(tokenizer, stream: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Cut a stream at EOS: the complete documents decoded, and the unfinished rest."""
    ends = np.flatnonzero(stream == EOS_ID)
    starts = np.concatenate(([0], ends[:-1] + 1))
    documents = []
    for start, end in zip(starts, ends):
        assert stream[start] == BOS_ID and not np.isin(stream[start + 1:end], [BOS_ID, EOS_ID]).any()
        documents.append(tokenizer.decode(stream[start + 1:end].tolist()))
    return documents, stream[ends[-1] + 1 if len(ends) else 0:]


def expected_files(texts, tokenizer, block_size, test_fraction, blocks_per_shard, row_group_blocks, seed=42):
    """The parquet files and split counts tokenize-dataset.py must write for `texts`, made here apart from it: each
    non-empty document encoded by the tokenizer itself as BOS, text, EOS; the documents shuffled with the seed; the
    first of them, up to the fraction of the text's bytes (whole documents, never all), as the test split; each
    split's tokens cut into rows of block_size (the partial last one left out), row_group_blocks rows to a row group
    and blocks_per_shard to a file, written with pyarrow's own writer, zstd-compressed."""
    sizes = np.array([len(text.encode("utf-8")) if text else 0 for text in texts])
    order = np.random.default_rng(seed).permutation(np.flatnonzero(sizes))
    ends = np.cumsum(sizes[order])
    test_documents = min(int(np.searchsorted(ends, test_fraction * ends[-1])) + 1, len(order) - 1)
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32()))])
    files, splits = {}, {}
    for split, documents in (("train", order[test_documents:]), ("test", order[:test_documents])):
        stream = encode_documents(tokenizer, [texts[i] for i in documents])
        blocks = stream[:len(stream) // block_size * block_size].reshape(-1, block_size).astype(np.int32)
        shards = []
        for first in range(0, len(blocks), blocks_per_shard):
            rows, sink = blocks[first:first + blocks_per_shard], pa.BufferOutputStream()
            with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
                for start in range(0, len(rows), row_group_blocks):
                    group = rows[start:start + row_group_blocks]
                    writer.write_table(pa.table({"input_ids": pa.array(list(group), pa.list_(pa.int32()))}))
            shards.append({"file": f"{split}/part-{len(shards):05d}.parquet", "blocks": len(rows)})
            files[shards[-1]["file"]] = sink.getvalue().to_pybytes()
        splits[split] = {"documents": len(documents), "tokens": len(stream), "blocks": len(blocks),
                         "dropped_tokens": len(stream) % block_size, "shards": shards}
    return files, splits


def written_files(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*.parquet")}


@pytest.fixture(scope="module")
def tokenizer(sample_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sample_tokenizer)


@pytest.fixture(scope="module")
def unshuffled(tmp_path_factory, sample_tokenizer):
    out = tmp_path_factory.mktemp("unshuffled") / "out"
    result = tokenize("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size",
                      TEST_BLOCK_SIZE, "--test-size", 0.1, "--shuffle", "FALSE", "--output-dir", out)
    return out, result


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# --- the folder and its manifest -------------------------------------------------------------------------------

def test_folder_matches_its_manifest(sample_tokenized, sample_tokenizer, tokenizer):
    manifest = manifest_module.read_manifest(sample_tokenized)
    assert manifest["format"] == 1 and manifest["block_size"] == TEST_BLOCK_SIZE and manifest["dtype"] == "int32"
    assert manifest["tokenizer"] == {
        "path": str(Path(sample_tokenizer).resolve()),
        "tokenizer_json_sha256": hashlib.sha256((Path(sample_tokenizer) / "tokenizer.json").read_bytes()).hexdigest(),
        "vocab_size": len(tokenizer)}
    assert manifest["special_tokens"] == {"policy": "bos+eos", "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    texts = read_sample_texts()
    assert manifest["source"]["documents"] == len(texts) and manifest["source"]["shuffle"] is True
    assert sum(s["documents"] for s in manifest["splits"].values()) == len(texts)
    listed = set()
    for name, split in manifest["splits"].items():
        for shard in split["shards"]:
            listed.add(shard["file"])
            table = pq.read_table(sample_tokenized / shard["file"])
            assert table.schema.field("input_ids").type == pa.list_(pa.int32())
            assert table.num_rows == shard["blocks"]
            assert set(pc_list_lengths(table)) == {TEST_BLOCK_SIZE}
        stream = split_stream(sample_tokenized, name)
        assert len(stream) == split["blocks"] * TEST_BLOCK_SIZE
        assert split["tokens"] == split["blocks"] * TEST_BLOCK_SIZE + split["dropped_tokens"]
        assert stream.min() >= 0 and stream.max() < len(tokenizer)
    assert listed == {str(p.relative_to(sample_tokenized)) for p in sample_tokenized.rglob("*.parquet")}
    # 10% of the text, in whole documents: the test split is near a tenth of all tokens.
    tokens = {name: split["tokens"] for name, split in manifest["splits"].items()}
    assert 0.05 < tokens["test"] / (tokens["test"] + tokens["train"]) < 0.2


def pc_list_lengths(table):
    import pyarrow.compute as pc

    return pc.list_value_length(table.column("input_ids")).to_pylist()


def test_unshuffled_splits_decode_to_the_documents_in_order(unshuffled, tokenizer):
    out, result = unshuffled
    manifest = manifest_module.read_manifest(out)
    texts = read_sample_texts()
    test_documents = manifest["splits"]["test"]["documents"]
    # The test split is the first documents, until a tenth of the text's bytes; no document straddles the two.
    sizes = np.cumsum([len(t.encode("utf-8")) for t in texts])
    assert sizes[test_documents - 2] < 0.1 * sizes[-1] <= sizes[test_documents - 1]
    for name, documents in (("test", texts[:test_documents]), ("train", texts[test_documents:])):
        split = manifest["splits"][name]
        expected = encode_documents(tokenizer, documents)
        assert split["documents"] == len(documents) and split["tokens"] == len(expected)
        assert split["dropped_tokens"] == len(expected) % TEST_BLOCK_SIZE
        stream = split_stream(out, name)
        assert np.array_equal(stream, expected[:len(expected) - split["dropped_tokens"]])
        decoded, rest = decode_documents(tokenizer, stream)
        # Every document comes back exactly, in order; only the dropped tail is missing from the last one.
        assert decoded == documents[:len(decoded)]
        assert len(rest) + split["dropped_tokens"] == len(encode_documents(tokenizer, documents[len(decoded):]))
    assert f"the last {manifest['splits']['train']['dropped_tokens']} tokens" in result.stdout


def test_shuffled_splits_partition_the_documents(sample_tokenized, tokenizer):
    manifest = manifest_module.read_manifest(sample_tokenized)
    texts = read_sample_texts()
    seen = {}
    for name in ("train", "test"):
        decoded, _ = decode_documents(tokenizer, split_stream(sample_tokenized, name))
        unfinished = manifest["splits"][name]["documents"] - len(decoded)
        dropped = manifest["splits"][name]["dropped_tokens"]
        # The tail ends one document (at least its EOS) and may hold whole ones (BOS, a token, EOS at least).
        assert unfinished == 0 if dropped == 0 else 1 <= unfinished <= 1 + (dropped - 1) // 3
        seen[name] = [texts.index(text) for text in decoded]
    assert not set(seen["train"]) & set(seen["test"])
    assert seen["train"] != sorted(seen["train"])  # shuffled, not in corpus order


def test_same_input_same_files_and_processes_change_nothing(sample_tokenized, sample_tokenizer, tmp_path):
    again = tmp_path / "again"
    tokenize("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", TEST_BLOCK_SIZE,
             "--test-size", "0.1", "--num-proc", 2, "--output-dir", again)
    files = sorted(p.relative_to(sample_tokenized) for p in sample_tokenized.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((sample_tokenized / f).read_bytes() == (again / f).read_bytes() for f in files)
    other_seed = tmp_path / "other-seed"
    tokenize_here("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", TEST_BLOCK_SIZE,
             "--test-size", "0.1", "--seed", 7, "--output-dir", other_seed)
    assert (other_seed / "train/part-00000.parquet").read_bytes() != \
        (sample_tokenized / "train/part-00000.parquet").read_bytes()


def test_test_size_as_blocks_and_small_shards(tmp_path, sample_tokenizer, tokenizer):
    out = tmp_path / "out"
    tokenize_here("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", 64, "--test-size", 20,
             "--shuffle", "no", "--blocks-per-shard", 7, "--output-dir", out)
    manifest = manifest_module.read_manifest(out)
    texts = read_sample_texts()
    test = manifest["splits"]["test"]
    # The fewest whole documents that fill 20 blocks.
    assert test["blocks"] >= 20
    assert len(encode_documents(tokenizer, texts[:test["documents"] - 1])) < 20 * 64 <= test["tokens"]
    for split in manifest["splits"].values():
        blocks = [shard["blocks"] for shard in split["shards"]]
        assert blocks[:-1] == [7] * (len(blocks) - 1) and 1 <= blocks[-1] <= 7
        for shard in split["shards"]:
            metadata = pq.ParquetFile(out / shard["file"]).metadata
            assert metadata.num_rows == shard["blocks"]


def test_no_test_split_says_do_eval_needs_one(tmp_path, sample_tokenizer, capsys):
    out = tmp_path / "out"
    tokenize_here("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", 256,
                  "--test-size", 0, "--output-dir", out)
    assert "do_eval" in capsys.readouterr().out
    assert not (out / "test").exists()
    assert list(manifest_module.read_manifest(out)["splits"]) == ["train"]


def test_special_looking_text_empty_documents_and_txt_input(tmp_path, sample_tokenizer, tokenizer):
    documents = ["Fim de frase </s> e <s> no meio.", "  dois espaços à frente 😀", "Ação!\n\nOutro parágrafo."] * 3
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": documents[0]}, {"text": ""}, {"text": None},
                                                     *({"text": d} for d in documents[1:])])
    out = tmp_path / "out"
    tokenize_here("--dataset-name", corpus, "--tokenizer-name", sample_tokenizer, "--block-size", 16, "--test-size", 0,
             "--shuffle", "0", "--output-dir", out)
    manifest = manifest_module.read_manifest(out)
    assert manifest["source"]["empty_documents"] == 2 and manifest["splits"]["train"]["documents"] == len(documents)
    stream = split_stream(out, "train")
    expected = encode_documents(tokenizer, documents)
    assert np.array_equal(stream, expected[:len(stream)]) and len(expected) - len(stream) < 16
    decoded, _ = decode_documents(tokenizer, stream)
    assert decoded == documents[:len(decoded)] and len(decoded) >= len(documents) - 1
    # A .txt file: one document per line, blank lines skipped.
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n\n".join(d.replace("\n", " ") for d in documents) + "\n", encoding="utf-8")
    tokenize_here("--dataset-name", text_file, "--tokenizer-name", sample_tokenizer, "--block-size", 16, "--test-size",
             0, "--shuffle", "false", "--output-dir", tmp_path / "from-txt")
    decoded, _ = decode_documents(tokenizer, split_stream(tmp_path / "from-txt", "train"))
    assert decoded == [d.replace("\n", " ") for d in documents][:len(decoded)] and len(decoded) >= len(documents) - 1


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "csv", "saved"])
def test_every_local_format_is_read_in_place_leaving_the_datasets_cache_empty(tmp_path, sample_tokenizer, tokenizer,
                                                                               kind):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    result = run_script(SCRIPT, "--dataset-name", write_sample_as(tmp_path / "input", kind), "--tokenizer-name",
                        sample_tokenizer, "--block-size", TEST_BLOCK_SIZE, "--test-size", 0.1, "--output-dir", out,
                        env={"HF_DATASETS_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert not list(cache.iterdir())
    manifest = manifest_module.read_manifest(out)
    texts = read_sample_texts()
    assert manifest["source"]["documents"] == len(texts)
    if kind == "txt":  # the .txt copy has its documents' line breaks turned into spaces
        texts = [" ".join(text.split()) for text in texts]
    files, splits = expected_files(texts, tokenizer, TEST_BLOCK_SIZE, 0.1,
                                   blocks_per_shard=packing.SHARD_TOKENS // TEST_BLOCK_SIZE,
                                   row_group_blocks=packing.ROW_GROUP_TOKENS // TEST_BLOCK_SIZE)
    assert written_files(out) == files and manifest["splits"] == splits


def test_blocks_fill_row_groups_and_shards_as_the_format_says(tmp_path, sample_tokenizer, tokenizer, monkeypatch):
    """Shards of 12 rows, in row groups of 5 (the last of a shard shorter): a reference writer gives the same bytes."""
    monkeypatch.setattr(packing, "ROW_GROUP_TOKENS", 5 * 16)
    monkeypatch.setattr(packing, "BATCH_BYTES", 2000)  # many batches, some cut across the test split's end
    texts = [*read_sample_texts(), "", None, "Fim </s> de <s> frase 😀", "  dois espaços"]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts])
    out = tmp_path / "out"
    tokenize_here("--dataset-name", corpus, "--tokenizer-name", sample_tokenizer, "--block-size", 16,
                  "--test-size", 0.05, "--blocks-per-shard", 12, "--output-dir", out)
    files, splits = expected_files(texts, tokenizer, 16, 0.05, blocks_per_shard=12, row_group_blocks=5)
    assert written_files(out) == files and manifest_module.read_manifest(out)["splits"] == splits
    metadata = pq.ParquetFile(out / "train/part-00000.parquet").metadata
    assert len(files) > 10 and [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [5, 5, 2]


def test_a_hub_dataset_is_streamed_twice_in_its_seeded_order(tmp_path, sample_tokenizer, tokenizer, monkeypatch):
    import datasets

    from pretrain import hub

    texts, calls = read_sample_texts(), []

    def rows():
        return datasets.IterableDataset.from_generator(lambda: ({"text": text} for text in texts))

    def load_dataset(name, split=None, streaming=False, token=None):
        calls.append((name, split, streaming, token))
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    shuffled = [row["text"] for row in rows().shuffle(seed=3, buffer_size=corpus.SHUFFLE_BUFFER)]
    assert shuffled != texts
    for shuffle, expected in (("true", shuffled), ("false", texts)):
        out = tmp_path / shuffle
        tokenize_here("--dataset-name", "someone/corpus", "--dataset-split", "all", "--tokenizer-name",
                      sample_tokenizer, "--block-size", 64, "--test-size", 0, "--shuffle", shuffle, "--seed", 3,
                      "--token", "hf_x", "--output-dir", out)
        manifest = manifest_module.read_manifest(out)
        assert manifest["source"]["dataset"] == "someone/corpus" and manifest["source"]["documents"] == len(texts)
        stream = split_stream(out, "train")
        assert np.array_equal(stream, encode_documents(tokenizer, expected)[:len(stream)])
    assert calls == [("someone/corpus", "all", True, "hf_x")] * 2


# --- the output folder: rerun, refuse, overwrite -----------------------------------------------------------------

def test_rerun_skips_and_a_different_dataset_is_refused_unless_overwrite(tmp_path, sample_tokenizer, capsys):
    out = tmp_path / "out"
    common_args = ["--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--test-size", 0,
                   "--output-dir", out]
    tokenize_here(*common_args, "--block-size", 256)
    before = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    tokenize_here(*common_args, "--block-size", 256)
    assert "nothing to do" in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns == before
    run_main_expecting([*common_args, "--block-size", 128], "different tokenized dataset \\(differs in block_size\\)")
    assert manifest_module.read_manifest(out)["block_size"] == 256
    tokenize_here(*common_args, "--block-size", 128, "--overwrite")
    assert manifest_module.read_manifest(out)["block_size"] == 128
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_output_folder_with_other_content_is_refused(tmp_path, sample_tokenizer):
    args = ["--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", 128]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run_main_expecting([*args, "--output-dir", other], "not a tokenized dataset and will not be replaced")
    run_main_expecting([*args, "--output-dir", other, "--overwrite"], "not a tokenized dataset")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    run_main_expecting([*args, "--output-dir", broken], "different tokenized dataset")
    assert (other / "notes.txt").read_text() == "mine" and (broken / "manifest.json").read_text() == "{"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    run_main_expecting([*args, "--output-dir", a_file], "is a file")


# --- bad input: exit 2, one line, nothing written -----------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--block-size", 1], "--block-size must be at least 2"),
    (["--dataset-name", "data/missing.jsonl"], "does not exist"),
    (["--tokenizer-name", "someone/missing-tokenizer"], "cannot be reached; pass a local path"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, sample_tokenizer, extra, message):
    out = tmp_path / "out"
    args = {"--dataset-name": SAMPLE, "--tokenizer-name": sample_tokenizer, "--block-size": 128, "--output-dir": out}
    args.update(dict(zip(extra[::2], extra[1::2])))
    result = tokenize(*[x for pair in args.items() for x in pair], check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--shuffle", "maybe"), ("--test-size", "1.5"), ("--test-size", "-1"),
                                         ("--test-size", "abc")])
def test_bad_flag_values_exit_2(tmp_path, flag, value):
    result = tokenize("--dataset-name", SAMPLE, "--tokenizer-name", "t", flag, value, "--output-dir", tmp_path / "o",
                      check=False)
    assert result.returncode == 2 and f"argument {flag}" in result.stderr


def test_flag_parsers():
    words = ("True", "YES", "1", "false", "No", "0")
    assert [tokenize_dataset.parse_bool(w) for w in words] == [True] * 3 + [False] * 3
    sizes = [tokenize_dataset.parse_test_size(text) for text in ("30000", "0.01", "0", "2.0")]
    assert sizes == [30000, 0.01, 0, 2]
    assert isinstance(tokenize_dataset.parse_test_size("30000"), int)


def bad_tokenizer(tmp_path, kind: str) -> Path:
    folder = tmp_path / f"tokenizer-{kind}"
    folder.mkdir()
    if kind == "garbage":
        (folder / "tokenizer.json").write_text("not json")
        (folder / "tokenizer_config.json").write_text("{}")
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(read_sample_texts(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                                         show_progress=False))
    if kind == "no-eos":
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    else:  # "no-json": only the legacy vocab.json + merges.txt, which transformers converts on load
        backend.model.save(str(folder))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "bos_token": "<unk>", "eos_token": "<unk>", "unk_token": "<unk>"}))
    return folder


@pytest.mark.parametrize("kind, message", [("garbage", "could not load a tokenizer"),
                                           ("no-eos", "lacks a BOS or EOS token"),
                                           ("no-json", "not a fast tokenizer with a tokenizer.json")])
def test_unusable_tokenizers_are_refused(tmp_path, kind, message):
    out = tmp_path / "out"
    run_main_expecting(["--dataset-name", SAMPLE, "--tokenizer-name", bad_tokenizer(tmp_path, kind),
                        "--output-dir", out], message)
    assert not out.exists()


def test_tokenizer_is_read_without_transformers_as_transformers_reads_it(tmp_path, sample_tokenizer, tokenizer):
    folder = tmp_path / "older-folder"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((Path(sample_tokenizer) / "tokenizer.json").read_bytes())
    # Older folders keep the special tokens in special_tokens_map.json, as serialized AddedTokens; its tokens win
    # over tokenizer_config.json's unless the config lists its added tokens, as in transformers 5.
    added = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>", **added},
                                                                "eos_token": {"content": "<unk>", **added}}))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    packing, record = tokenizer_folder.load_tokenizer(str(folder), None)
    assert (packing.bos_token_id, packing.eos_token_id) == (reference.bos_token_id, reference.eos_token_id) == (1, 0)
    config["added_tokens_decoder"] = {str(i): {"content": t, **added} for i, t in enumerate(["<unk>", "<s>", "</s>",
                                                                                             "<pad>"])}
    config["bos_token"] = "</s>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(folder)
    packing, record = tokenizer_folder.load_tokenizer(str(folder), None)
    assert (packing.bos_token_id, packing.eos_token_id) == (reference.bos_token_id, reference.eos_token_id) == (2, 3)
    assert packing.vocab_size == record["vocab_size"] == len(reference) == len(tokenizer)
    text = "  Olá, mundo!\n\tação </s> 2024 😀"
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # "</s>" in a document is text, as packing reads it
    assert packing.backend.encode(text, add_special_tokens=False).ids == \
        backend.encode(text, add_special_tokens=False).ids


def test_other_tokenizer_classes_pack_the_ids_transformers_gives(tmp_path, sample_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    folder = tmp_path / "llama-class"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((Path(sample_tokenizer) / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    reference = AutoTokenizer.from_pretrained(folder)
    packing, record = tokenizer_folder.load_tokenizer(str(folder), None)
    assert (packing.bos_token_id, packing.eos_token_id, packing.vocab_size) == \
        (reference.bos_token_id, reference.eos_token_id, len(reference)) == (1, 2, record["vocab_size"])
    text = "  dois espaços no início, e   três no meio\n"
    packed = packing.backend.encode(text, add_special_tokens=False).ids
    assert packed == reference.backend_tokenizer.encode(text, add_special_tokens=False).ids
    from tokenizers import Tokenizer  # transformers rebuilds a Llama-class pipeline: tokenizer.json alone differs

    assert packed != Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    (folder / "tokenizer.json").write_text("not json")
    with pytest.raises(InputError, match="could not load a tokenizer"):
        tokenizer_folder.load_tokenizer(str(folder), None)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: object())  # a slow tokenizer
    with pytest.raises(InputError, match="not a fast tokenizer"):
        tokenizer_folder.load_tokenizer(str(folder), None)


def test_tokenizer_file_or_broken_config_is_refused(tmp_path, sample_tokenizer):
    out = tmp_path / "out"
    tokenizer_file = Path(sample_tokenizer) / "tokenizer.json"
    run_main_expecting(["--dataset-name", SAMPLE, "--tokenizer-name", tokenizer_file, "--output-dir", out],
                       "is a file; give the folder")
    broken = tmp_path / "broken-config"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (broken / "tokenizer_config.json").write_text("{'bos_token': '<s>'")
    run_main_expecting(["--dataset-name", SAMPLE, "--tokenizer-name", broken, "--output-dir", out],
                       "could not load a tokenizer .*tokenizer_config.json")
    assert not out.exists()


@pytest.mark.parametrize("rows, extra, message", [
    ([], [], "is empty"),
    ([{"text": ""}, {"text": None}], [], "only empty documents"),
    ([{"body": "texto"}], [], "no column 'text'.*--text-column"),
    ([{"text": 5}], [], "holds int64 values, not text"),
    ([{"text": "um só documento"}], ["--test-size", "0.1"], "single document"),
    (None, ["--test-size", 100000], "--test-size 100000 blocks needs more text"),
    (None, ["--block-size", 1000000, "--test-size", 0], "train split holds .* less than one block"),
    (None, ["--block-size", 4096, "--test-size", 0.001], "test split holds .* less than one block"),
    ("someone/corpus", [], "dataset 'someone/corpus' is not a local path and the Hugging Face Hub cannot be reached"),
    (None, ["--num-proc", 0], "--num-proc must be at least 1"),
    (None, ["--blocks-per-shard", 0], "--blocks-per-shard must be at least 1"),
])
def test_bad_datasets_and_sizes_write_nothing(tmp_path, sample_tokenizer, rows, extra, message):
    dataset = SAMPLE if rows is None else rows if isinstance(rows, str) else write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    run_main_expecting(["--dataset-name", dataset, "--tokenizer-name", sample_tokenizer, "--block-size", 64,
                        *extra, "--output-dir", out], message)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- the Hub, with a fake client ---------------------------------------------------------------------------------

def test_push_uploads_the_finished_folder_with_the_token(fake_hub, tmp_path, sample_tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_from_env")
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is as good as none
    tokenize_dataset.main(["--dataset-name", str(SAMPLE), "--tokenizer-name", str(sample_tokenizer), "--block-size",
                           "128", "--output-dir", str(out), "--push-to-hub", "someone/corpus-tokenized"])
    assert [call.name for call in fake_hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert all(call.token == "hf_secret_from_env" for call in fake_hub.calls)
    upload = fake_hub.calls_to("upload_folder")[0]
    assert upload["repo_id"] == "someone/corpus-tokenized" and upload["repo_type"] == "dataset"
    assert Path(upload["folder_path"]) == out and "manifest.json" in upload["files"]
    assert "train/part-00000.parquet" in upload["files"] and "test/part-00000.parquet" in upload["files"]
    everything = capsys.readouterr()
    assert "hf_secret" not in everything.out + everything.err + (out / "manifest.json").read_text()


def test_push_failures(fake_hub, tmp_path, sample_tokenizer):
    out = tmp_path / "out"
    args = ["--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--block-size", 128, "--output-dir", out,
            "--push-to-hub", "someone/corpus", "--token", "hf_x"]
    fake_hub.fail("whoami", RuntimeError("401 Unauthorized\nsecond line"))  # a bad token stops everything first
    run_main_expecting(args, "does not accept the token \\(401 Unauthorized\\)")
    assert not out.exists()
    fake_hub.failures.clear()
    fake_hub.fail("upload_folder", RuntimeError("upload_folder refused\nsecond line"))
    # The folder stays complete; rerunning the command retries the upload.
    run_main_expecting(args, "is complete, but uploading it to 'someone/corpus' failed \\(upload_folder refused\\)")
    assert manifest_module.read_manifest(out) is not None
    fake_hub.failures.clear()
    tokenize_dataset.main([str(a) for a in args])
    assert [call.name for call in fake_hub.calls][-2:] == ["create_repo", "upload_folder"]
    assert "manifest.json" in fake_hub.calls_to("upload_folder")[-1]["files"]


def test_push_with_the_hub_unreachable_fails_before_the_work(tmp_path, sample_tokenizer):
    out = tmp_path / "out"
    result = tokenize("--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer, "--output-dir", out,
                      "--push-to-hub", "someone/corpus", check=False)
    assert result.returncode == 2 and "Hub cannot be reached" in result.stderr and "--push-to-hub" in result.stderr
    assert not out.exists()


def test_tokenizer_from_the_hub_is_downloaded_then_loaded(fake_hub, sample_tokenizer):
    fake_hub.repos["someone/tokenizer"] = sample_tokenizer
    tokenizer, record = tokenizer_folder.load_tokenizer("someone/tokenizer", "hf_x")
    assert [(call.name, call.arguments["repo_id"], call.token) for call in fake_hub.calls] == [
        ("snapshot_download", "someone/tokenizer", "hf_x")]
    assert record["path"] == "someone/tokenizer" and tokenizer.vocab_size == record["vocab_size"]
    assert record["tokenizer_json_sha256"] == manifest_module.sha256_file(Path(sample_tokenizer) / "tokenizer.json")
    with pytest.raises(InputError, match="could not download tokenizer 'someone/missing'.*Repository Not Found"):
        tokenizer_folder.load_tokenizer("someone/missing", None)



# --- the original script's command line --------------------------------------------------------------------------

ORIGINAL_COMMAND = ["--dataset-name", "nicholasKluge/Pt-Corpus", "--dataset-split", "train", "--tokenizer-name",
                    "nicholasKluge/TeenyTinyLlama-460m", "--block-size", "2048", "--test-size", "30000", "--shuffle",
                    "True", "--seed", "42", "--token", "hf_..."]


def test_the_original_command_line_works_without_output_dir(fake_hub, tmp_path, sample_tokenizer, monkeypatch,
                                                             capsys):
    import datasets

    args = tokenize_dataset.parse_args(ORIGINAL_COMMAND)
    # The name the original pushed to the Hub, as a folder here.
    assert args.output_dir == "nicholasKluge/Pt-Corpus-tokenized-2048"
    assert (args.test_size, args.shuffle, args.seed, args.token) == (30000, True, 42, "hf_...")
    # The same command end to end, the Hub serving the sample and our tokenizer; only the sizes shrink to the
    # sample's (30,000 test blocks of 2,048 tokens are 61M tokens).
    fake_hub.repos["nicholasKluge/TeenyTinyLlama-460m"] = sample_tokenizer
    texts = read_sample_texts()
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, streaming=False, token=None:
                        datasets.IterableDataset.from_generator(lambda: ({"text": text} for text in texts)))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    small = [{"2048": "64", "30000": "2"}.get(a, a) for a in ORIGINAL_COMMAND]
    tokenize_here(*small)
    folder = work / "nicholasKluge" / "Pt-Corpus-tokenized-64"
    manifest = manifest_module.read_manifest(folder)
    assert manifest["block_size"] == 64 and manifest["splits"]["test"]["blocks"] >= 2
    assert manifest["source"]["dataset"] == "nicholasKluge/Pt-Corpus"
    assert f"wrote '{Path('nicholasKluge/Pt-Corpus-tokenized-64')}'" in capsys.readouterr().out
    assert [p.relative_to(work).as_posix() for p in work.glob("*/*")] == ["nicholasKluge/Pt-Corpus-tokenized-64"]


@pytest.mark.parametrize("dataset_name,expected", [
    ("nicholasKluge/Pt-Corpus", "nicholasKluge/Pt-Corpus-tokenized-128"),
    ("data/sample/pt-sample.jsonl", "data/sample/pt-sample-tokenized-128"),
    ("corpora/web/", "corpora/web-tokenized-128"),
    ("corpus.v2", "corpus.v2-tokenized-128"),
])
def test_default_output_dir_is_named_after_the_dataset(dataset_name, expected):
    assert tokenize_dataset.default_output_dir(dataset_name, 128) == Path(expected)
    assert tokenize_dataset.parse_args(["--dataset-name", dataset_name, "--tokenizer-name", "t", "--block-size",
                                        "128"]).output_dir == expected
