"""train-sentencepiece.py, run for real on the committed Portuguese sample, offline."""

import json
import os
import subprocess
import sys

import pytest

from pretrain.data import corpus
from pretrain.tokenizer import training as tokenizer_training
from tests.helpers.runs import REPO, SAMPLE, TEST_VOCAB_SIZE, run_script
from tests.helpers.texts import ROUND_TRIPS, read_sample_texts, write_sample_as

SCRIPT = "train-sentencepiece.py"
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
BYTE_IDS = range(4, 260)
UNSEEN = "汉字 ᚠᛇᚻ 🦙"


@pytest.fixture(scope="module")
def script():
    return tokenizer_training


@pytest.fixture(scope="module")
def auto_tokenizer(sample_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(sample_tokenizer))


def train(tmp_path, *args, dataset=SAMPLE, output="tok", env=None):
    return run_script(SCRIPT, "--dataset_name", dataset, "--vocab_size", TEST_VOCAB_SIZE, "--num_samples", 100000,
                      "--output_dir", tmp_path / output, *args, env=env)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def llama_reference(tmp_path, sample_tokenizer, **changes):
    """A reference tokenizer folder: the sample tokenizer's tokenizer.json with some parts replaced."""
    spec = json.loads((sample_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    spec.update(changes)
    folder = tmp_path / "reference"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


# --- the saved folder --------------------------------------------------------------------------------------------

def test_saved_folder_has_llama2_layout(sample_tokenizer):
    spec = json.loads((sample_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    assert len(vocab) == TEST_VOCAB_SIZE
    assert {token: vocab[token] for token in SPECIALS} == SPECIALS
    assert [vocab[f"<0x{value:02X}>"] for value in range(256)] == list(BYTE_IDS)
    assert "\u2581" in vocab
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] and spec["model"]["fuse_unk"]
    assert spec["model"]["unk_token"] == "<unk>"
    assert spec["normalizer"]["normalizers"] == [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    assert [d["type"] for d in spec["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    # Only the four specials are "special": byte tokens must survive decode(skip_special_tokens=True).
    assert sorted(t["id"] for t in spec["added_tokens"]) == [0, 1, 2, 3]
    config = json.loads((sample_tokenizer / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["padding_side"] == "right" and config["clean_up_tokenization_spaces"] is False


def test_autotokenizer_adds_bos_not_eos_and_pads_right_with_id_3(auto_tokenizer):
    tokenizer = auto_tokenizer
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (0, 1, 2, 3)
    ids = tokenizer("Olá, mundo!")["input_ids"]
    assert ids[0] == 1 and 2 not in ids
    assert tokenizer("")["input_ids"] == [1]
    batch = tokenizer(["uma frase bem mais longa que a outra", "curta"], padding=True)
    long_ids, short_ids = batch["input_ids"]
    short_length = len(tokenizer("curta")["input_ids"])
    assert len(long_ids) == len(short_ids) > short_length
    assert short_ids[short_length:] == [3] * (len(short_ids) - short_length)
    assert batch["attention_mask"][1] == [1] * short_length + [0] * (len(short_ids) - short_length)
    assert 3 not in long_ids


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_autotokenizer_round_trips_text(auto_tokenizer, text):
    ids = auto_tokenizer(text)["input_ids"]
    assert 0 not in ids, "no character may become <unk>"
    assert auto_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unseen_characters_come_back_through_byte_tokens(auto_tokenizer):
    ids = auto_tokenizer(UNSEEN, add_special_tokens=False)["input_ids"]
    assert sum(i in BYTE_IDS for i in ids) >= len("汉字ᚠᛇᚻ".encode("utf-8"))
    assert 0 not in ids
    assert auto_tokenizer.decode(ids) == UNSEEN


def test_every_sample_document_round_trips(auto_tokenizer):
    texts = read_sample_texts()
    encoded = auto_tokenizer(texts)["input_ids"]
    assert auto_tokenizer.batch_decode(encoded, skip_special_tokens=True) == texts


def test_report_matches_what_the_tokenizer_does(sample_tokenizer, script):
    from tokenizers import Tokenizer

    report = json.loads((sample_tokenizer / "tokenizer_report.json").read_text())
    texts = read_sample_texts()
    trained, held_out = script.choose_documents(len(texts), 100000, 42)
    assert len(held_out) == len(texts) // 10 and not set(trained) & set(held_out)
    assert report["documents_trained"] == len(trained) == len(texts) - len(held_out)
    assert report["documents_measured"] == len(held_out) and report["measured_on_held_out"] is True
    held_out_texts = [texts[i] for i in held_out]
    assert report["characters_trained"] == sum(len(texts[i]) for i in trained)
    assert report["characters_measured"] == sum(map(len, held_out_texts))
    tokenizer = Tokenizer.from_file(str(sample_tokenizer / "tokenizer.json"))
    num_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in held_out_texts)
    num_words = sum(len(t.split()) for t in held_out_texts)
    assert report["characters_per_token"] == round(report["characters_measured"] / num_tokens, 4)
    assert report["tokens_per_word"] == round(num_tokens / num_words, 4)
    assert report["vocab_size"] == report["vocab_size_requested"] == TEST_VOCAB_SIZE
    assert report["unknown_token_rate"] == 0 and report["round_trip_exact_share"] == 1
    assert 0 <= report["byte_fallback_word_share"] < 0.05
    assert report["settings_from"] == "built-in Llama 2 settings"
    assert 0 < report["seconds_training"] <= report["seconds_total"]


# --- determinism, reference tokenizers, secrets ------------------------------------------------------------------

def test_same_input_and_seed_give_identical_tokenizer_json(tmp_path, sample_tokenizer):
    # Threads on here, off in the fixture: the result must not depend on them. (run_script cannot override
    # TOKENIZERS_PARALLELISM, hence subprocess.)
    result = subprocess.run([sys.executable, str(REPO / SCRIPT), "--dataset_name", str(SAMPLE), "--vocab_size",
                             str(TEST_VOCAB_SIZE), "--num_samples", "100000", "--output_dir", str(tmp_path / "tok")],
                            capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="true"),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (sample_tokenizer / "tokenizer.json").read_bytes()
    assert "trained on 126 documents" in result.stdout and "measured on 13 held-out documents" in result.stdout


def test_unreachable_reference_falls_back_and_the_token_stays_secret(tmp_path, sample_tokenizer):
    secret, env_secret = "hf_NotARealTokenButSecret123", "hf_AnotherSecretFromTheEnv456"
    result = train(tmp_path, "--reference_tokenizer", "meta-llama/Llama-2-7b-hf", "--hub_token", secret,
                   env={"HF_TOKEN": env_secret})
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "meta-llama/Llama-2-7b-hf" in line]
    assert len(notes) == 1 and "built-in Llama 2 settings" in notes[0]
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (sample_tokenizer / "tokenizer.json").read_bytes()
    # tokenizer.model is binary: read as text with its bytes that are not UTF-8 replaced.
    for text in [result.stdout, result.stderr] + [p.read_bytes().decode(errors="replace")
                                                  for p in (tmp_path / "tok").iterdir()]:
        assert secret not in text and env_secret not in text


def test_a_hub_dataset_is_streamed_with_the_token_and_its_first_documents_held_out(tmp_path, monkeypatch, capsys):
    import datasets

    from pretrain import hub
    from pretrain.cli import train_sentencepiece

    texts, secret, calls = read_sample_texts(), "hf_SecretForTheStreamOnly789", []

    def load_dataset(name, split=None, streaming=False, token=None):
        calls.append((name, split, streaming, token))
        return datasets.IterableDataset.from_generator(lambda: ({"text": text} for text in texts))

    def no_child(*args, **kwargs):
        raise AssertionError("no process may be started: the token would be in its command line or environment")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(subprocess, "Popen", no_child)
    shuffled = [row["text"] for row in datasets.IterableDataset.from_generator(
        lambda: ({"text": text} for text in texts)).shuffle(seed=3, buffer_size=corpus.SHUFFLE_BUFFER)]
    held_out = len(texts) // 10
    for num_samples, output in ((100000, "all"), (20, "twenty")):
        train_sentencepiece.main(["--dataset_name", "someone/corpus", "--vocab_size", str(TEST_VOCAB_SIZE),
                                  "--num_samples", str(num_samples), "--seed", "3", "--hub_token", secret,
                                  "--output_dir", str(tmp_path / output)])
        report = json.loads((tmp_path / output / "tokenizer_report.json").read_text())
        trained = shuffled[held_out:held_out + num_samples]
        assert report["documents_trained"] == len(trained) and report["documents_measured"] == held_out
        assert report["characters_trained"] == sum(map(len, trained))
        assert report["characters_measured"] == sum(map(len, shuffled[:held_out]))
    assert calls == [("someone/corpus", "train", True, secret)] * 2
    out = capsys.readouterr()
    assert out.out.count("note: 'someone/corpus' has 139 documents, fewer than --num_samples 100000; training "
                         "on 126 of them and holding 13 out for the report\n") == 1
    files = [path.read_bytes().decode(errors="replace") for path in tmp_path.rglob("*") if path.is_file()]
    assert not any(secret in text for text in [out.out, out.err, *files])


def test_a_stream_sample_holds_out_as_many_documents_as_choose_documents(script, capsys):
    class Stream:
        name, random_access = "someone/corpus", False

        def __init__(self, count):
            self.count = count

        def documents(self):
            return (f"documento {i}" for i in range(self.count))

    for count, num_samples in ((3, 10), (139, 100000), (12_345, 2000)):
        sample = script.sample_documents(Stream(count), num_samples, seed=0)
        batches = list(sample.training_texts())
        trained_positions, held_out_positions = script.choose_documents(count, num_samples, 0)
        held_out = len(held_out_positions)
        trained = [f"documento {i}" for i in range(held_out, held_out + len(trained_positions))]
        assert [text for batch in batches for text in batch] == trained
        assert max(map(len, batches)) <= script.BATCH_DOCUMENTS
        measured = [f"documento {i}" for i in range(held_out)] if held_out else trained[:script.HELD_OUT_DOCUMENTS]
        assert sample.measured_texts() == (measured, bool(held_out))
    notes = capsys.readouterr().out.splitlines()
    assert notes == ["note: 'someone/corpus' has 3 documents, fewer than --num_samples 10; training on 3 of them",
                     "note: 'someone/corpus' has 139 documents, fewer than --num_samples 100000; training on 126 of "
                     "them and holding 13 out for the report"]


def test_a_dataset_that_fails_to_load_gives_one_error_line(tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    result = run_script(SCRIPT, "--dataset_name", folder, "--vocab_size", TEST_VOCAB_SIZE, "--output_dir",
                        tmp_path / "tok", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: could not read '{folder / 'data-00000-of-00001.arrow'}' as Arrow: ")
    assert not (tmp_path / "tok").exists()


def test_local_reference_settings_are_copied(tmp_path, sample_tokenizer):
    reference = llama_reference(tmp_path, sample_tokenizer, post_processor={
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "</s>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}})
    result = train(tmp_path, "--reference_tokenizer", reference)
    assert result.returncode == 0, result.stderr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tokenizer("Olá, mundo!")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    report = json.loads((tmp_path / "tok" / "tokenizer_report.json").read_text())
    assert report["settings_from"] == f"reference tokenizer {reference}"


def test_reference_that_does_not_round_trip_is_refused(tmp_path, sample_tokenizer):
    spec = json.loads((sample_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    lowercasing = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, *spec["normalizer"]["normalizers"]]}
    reference = llama_reference(tmp_path, sample_tokenizer, normalizer=lowercasing)
    result = train(tmp_path, "--reference_tokenizer", reference / "tokenizer.json")
    assert result.returncode == 2
    assert "do not give text back unchanged" in result.stderr and "leave out --reference_tokenizer" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference"]


@pytest.mark.parametrize("make_reference, message", [
    (lambda tmp: tmp / "no-such-tokenizer" / "here", "does not exist"),
    (lambda tmp: (tmp / "empty-folder").mkdir() or tmp / "empty-folder", "has no tokenizer.json"),
    (lambda tmp: (tmp / "bad.json").write_text("[1, 2]") and tmp / "bad.json", "is not a tokenizer.json"),
])
def test_bad_local_reference_is_refused(tmp_path, make_reference, message):
    result = train(tmp_path, "--reference_tokenizer", make_reference(tmp_path))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "tok").exists()


def test_reachable_hub_reference_is_read_and_a_failed_download_falls_back(tmp_path, sample_tokenizer, script,
                                                                          monkeypatch, capsys):
    import huggingface_hub

    reference = llama_reference(tmp_path, sample_tokenizer, decoder=None)
    monkeypatch.setattr(script, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, token=None: str(
        reference / filename) if (repo, token) == ("org/llama-like", "hf_x") else None)
    settings = script.reference_settings("org/llama-like", "hf_x")
    assert settings["source"] == "reference tokenizer org/llama-like" and settings["decoder"] is None

    def gated(*args, **kwargs):
        raise OSError("401 Client Error: access to model org/gated is restricted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    assert script.reference_settings("org/gated", None) == script.llama2_settings()
    assert "401 Client Error" in capsys.readouterr().out


# --- inputs -------------------------------------------------------------------------------------------------------

def test_text_file_and_jsonl_give_the_same_tokenizer(tmp_path):
    """A .txt with blank lines gives the documents of its other lines, JSON lines the documents as they are."""
    documents = [" ".join(text.split()) for text in read_sample_texts()]
    text_file = tmp_path / "sample.txt"
    text_file.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "sample.jsonl", [{"text": d} for d in documents])
    for source in (text_file, jsonl):
        with corpus.open_corpus(str(source)) as opened:
            assert opened.texts(range(len(documents))) == documents
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    for name, source in [("from-txt", text_file), ("from-jsonl", jsonl)]:
        result = train(tmp_path, dataset=source, output=name, env={"TMPDIR": str(scratch_parent)})
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-txt" / "tokenizer.json").read_bytes() == \
        (tmp_path / "from-jsonl" / "tokenizer.json").read_bytes()
    assert not list(scratch_parent.iterdir())  # nothing written beside the corpus


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "csv", "saved"])
def test_every_local_format_is_read_in_place_leaving_the_datasets_cache_empty(tmp_path, sample_tokenizer, kind):

    cache = tmp_path / "cache"
    cache.mkdir()
    result = train(tmp_path, dataset=write_sample_as(tmp_path / "input", kind), env={"HF_DATASETS_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert not list(cache.iterdir())
    assert "trained on 126 documents" in result.stdout
    if kind != "txt":  # the .txt copy has its documents' line breaks turned into spaces
        assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == \
            (sample_tokenizer / "tokenizer.json").read_bytes()


def test_save_to_disk_folder_with_other_columns(tmp_path, sample_tokenizer):
    import datasets

    texts = read_sample_texts()
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}),
                          "test": datasets.Dataset.from_dict({"id": [0], "text": ["x"]})}).save_to_disk(str(folder))
    result = train(tmp_path, "--dataset_split", "train", dataset=folder)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (sample_tokenizer / "tokenizer.json").read_bytes()


def test_other_text_column_and_a_tiny_corpus(tmp_path):
    rows = [{"body": "Bom dia! Tudo bem com você?", "id": 1}, {"body": "Olá, mundo.", "id": 2},
            {"body": "Até amanhã, São Paulo.", "id": 3}]
    result = train(tmp_path, "--text_column", "body", dataset=write_jsonl(tmp_path / "tiny.jsonl", rows))
    assert result.returncode == 0, result.stderr
    assert "has 3 documents, fewer than --num_samples 100000; training on 3 of them\n" in result.stdout
    assert "too few repeated pairs" in result.stdout
    assert "measured on 3 training documents (too few to hold any out)" in result.stdout
    report = json.loads((tmp_path / "tok" / "tokenizer_report.json").read_text())
    assert report["documents_trained"] == 3 and report["measured_on_held_out"] is False
    assert 261 <= report["vocab_size"] < TEST_VOCAB_SIZE
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(spec["model"]["vocab"]) == report["vocab_size"]


def test_num_samples_limits_the_documents(tmp_path):
    result = run_script(SCRIPT, "--dataset_name", SAMPLE, "--vocab_size", 300, "--num_samples", 20,
                        "--seed", 7, "--output_dir", tmp_path / "tok")
    assert result.returncode == 0, result.stderr
    assert "fewer than" not in result.stdout
    report = json.loads((tmp_path / "tok" / "tokenizer_report.json").read_text())
    assert report["documents_trained"] == 20 and report["documents_measured"] == 13 and report["seed"] == 7
    assert report["vocab_size"] == 300


def bad_input_cases(tmp_path):
    return {
        "missing file": (["--dataset_name", tmp_path / "missing.jsonl"], "does not exist"),
        "empty file": (["--dataset_name", write_jsonl(tmp_path / "empty.jsonl", [])], "is empty"),
        "vocabulary too small": (["--vocab_size", 260], "must be at least 261"),
        "no samples": (["--num_samples", 0], "--num_samples must be positive"),
        "unreachable hub dataset": (["--dataset_name", "someone/some-dataset"], "cannot be reached"),
        "missing column": (["--dataset_name", write_jsonl(tmp_path / "body.jsonl", [{"body": "x"}])],
                           "has no column 'text' (columns: body)"),
        "only empty texts": (["--dataset_name", write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 3)],
                             "holds no text"),
        "numbers, not text": (["--dataset_name", write_jsonl(tmp_path / "numbers.jsonl", [{"text": 5}] * 3)],
                              "holds int64 values, not text; pass --text_column"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "vocabulary too small", "no samples",
                                  "unreachable hub dataset", "missing column", "only empty texts",
                                  "numbers, not text"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    extra, message = bad_input_cases(tmp_path)[case]
    before = set(tmp_path.iterdir())
    result = run_script(SCRIPT, "--dataset_name", SAMPLE, "--vocab_size", TEST_VOCAB_SIZE, "--output_dir",
                        tmp_path / "tok", *extra)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert set(tmp_path.iterdir()) == before, "nothing may be written next to or into --output_dir"


def test_existing_output_dir_is_kept_unless_overwrite(tmp_path):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "Bom dia, Brasil."}, {"text": "Boa noite."}])
    output = tmp_path / "tok"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = train(tmp_path, dataset=corpus)
    assert result.returncode == 2 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (output / "keep.txt").read_text() == "mine"
    result = train(tmp_path, "--overwrite", dataset=corpus)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.iterdir()) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                       "tokenizer_report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.jsonl", "tok"]

