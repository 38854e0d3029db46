"""train-sentencepiece.py and its benchmark, run for real on the committed Portuguese sample, offline."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE, TEST_VOCAB_SIZE, read_sample_texts, run_script

from pretrain import corpus, tokenizer_training

SCRIPT = "train-sentencepiece.py"
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
BYTE_IDS = range(4, 260)
ROUND_TRIPS = [
    "Ação, coração, informação: a educação é a base da nação.",
    "Você já comeu pão de queijo em São João del-Rei? Não? Então vá à padaria!",
    "Maçã, açúcar, caçula, pêssego, avó, avô, órgão, põe, mãe, irmã.",
    "  dois espaços no início",
    " um espaço no início e no fim ",
    "\nlinha nova no início\n\ne duas no meio\n",
    "espaços   repetidos     aqui\t\ttabs\te mais\t",
    "def soma(a, b):\n    return a + b  # 42\n\n\tprint(soma(1, 2))",
    "R$ 12,50; 3,14159; 2024-01-31 às 14h30; +55 (11) 98765-4321; 100%",
    "emoji 🦙😀👍🏽 e sinais → ≠ ∑ ½",
    "nunca visto: 汉字 Ελληνικά ẞ ᚠᛇᚻ \u0000\u007f",
    "",
    " ",
    "a",
]
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
    for text in [result.stdout, result.stderr] + [p.read_text() for p in (tmp_path / "tok").iterdir()]:
        assert secret not in text and env_secret not in text


def test_corpus_is_located_by_a_child_that_gets_the_token_in_its_environment(tmp_path, script, monkeypatch):
    import argparse

    args = argparse.Namespace(dataset_name="org/data", dataset_split="train", text_column="text",
                              hub_token="hf_SecretForTheChildOnly789")
    # A stand-in child that answers with what it was given.
    monkeypatch.setattr(script, "CORPUS_CHILD", (
        "import json, os, sys; from pathlib import Path; request = json.loads(Path(sys.argv[2]).read_text()); "
        "Path(request['scratch'], 'answer.json').write_text(json.dumps({'files': [], 'num_rows': 7, "
        "'token': os.environ.get('HF_TOKEN'), 'argv': sys.argv}))"))
    answer = script.locate_corpus(args, tmp_path)
    assert answer["num_rows"] == 7 and answer["token"] == args.hub_token
    assert not any(args.hub_token in argument for argument in answer["argv"])
    assert args.hub_token not in (tmp_path / "request.json").read_text()
    (tmp_path / "answer.json").unlink()
    monkeypatch.setattr(script, "CORPUS_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(SystemExit, match="error: reading dataset 'org/data' failed \\(killed by SIGKILL\\)"):
        script.locate_corpus(args, tmp_path)


def test_a_dataset_that_fails_to_load_gives_one_error_line_after_its_traceback(tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    (tmp_path / "json.py").write_text("raise SystemExit('a json.py in the working directory was imported')")
    result = run_script(SCRIPT, "--dataset_name", folder, "--vocab_size", TEST_VOCAB_SIZE, "--output_dir",
                        tmp_path / "tok", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: reading dataset '{folder}' failed (exit status 1); see the messages above"
    assert "json.py in the working directory" not in result.stderr and not (tmp_path / "tok").exists()


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
    """A .txt with blank lines is read in place through the row numbers of its other lines, JSON lines as they are."""
    import numpy as np

    documents = [" ".join(text.split()) for text in read_sample_texts()]
    text_file = tmp_path / "sample.txt"
    text_file.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "sample.jsonl", [{"text": d} for d in documents])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    corpus = corpus.corpus_files(corpus.load_text_dataset(str(text_file)), "text", str(scratch))
    assert corpus["num_rows"] == len(documents) and "corpus.arrow" not in str(corpus["files"])
    assert np.load(corpus["rows"]).tolist() == list(range(0, 2 * len(documents), 2))  # every other line
    corpus = corpus.corpus_files(corpus.load_text_dataset(str(jsonl)), "text", str(scratch))
    assert corpus["num_rows"] == len(documents) and "rows" not in corpus
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    for name, source in [("from-txt", text_file), ("from-jsonl", jsonl)]:
        result = train(tmp_path, dataset=source, output=name, env={"TMPDIR": str(scratch_parent)})
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-txt" / "tokenizer.json").read_bytes() == \
        (tmp_path / "from-jsonl" / "tokenizer.json").read_bytes()
    assert not list(scratch_parent.iterdir())  # the scratch folder is gone


def test_corpus_files_read_in_place_or_copy_and_give_the_rows(tmp_path, script):
    import types

    import datasets
    import numpy as np
    import pyarrow as pa
    from pretrain.corpus import arrow_data_files, corpus_files

    texts = read_sample_texts()
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(tmp_path / "d"))
    dataset = datasets.load_from_disk(str(tmp_path / "d"))

    def documents(corpus, positions):
        rows = script.file_rows(corpus, np.array(positions))
        return [t for b in corpus.read_arrow_files(corpus["files"], "text", rows) for t in b]

    in_place = corpus_files(dataset, "text", str(tmp_path))
    assert in_place == {"files": arrow_data_files(dataset, "text"), "num_rows": len(texts)}
    assert documents(in_place, [0, 1, 5, 77, len(texts) - 1]) == [texts[i] for i in [0, 1, 5, 77, len(texts) - 1]]
    kept = dataset.filter(lambda row: row["n"] % 3 == 0)
    mapped = corpus_files(kept, "text", str(tmp_path))
    assert mapped["files"] == in_place["files"] and mapped["num_rows"] == len(kept)
    assert documents(mapped, [0, 2, len(kept) - 1]) == [texts[0], texts[6], kept[-1]["text"]]
    # Held in memory, a slice of its file, rows out of order: copied to the scratch folder, 1,000 rows a batch.
    many = [f"documento {i}" for i in range(2500)]
    (tmp_path / "copy").mkdir()
    for other, expected in [(datasets.Dataset.from_dict({"text": many}), many), (dataset.select(range(5)), texts[:5]),
                            (dataset.select([3, 1, 2]), [texts[i] for i in (3, 1, 2)])]:
        corpus = corpus_files(other, "text", str(tmp_path / "copy"))
        assert corpus == {"files": [str(tmp_path / "copy" / "corpus.arrow")], "num_rows": len(expected)}
        assert documents(corpus, list(range(len(expected)))) == expected
    with pa.OSFile(str(tmp_path / "copy" / "corpus.arrow")) as source:
        assert [batch.num_rows for batch in pa.ipc.open_stream(source)] == [3]
    copied = corpus_files(datasets.Dataset.from_dict({"text": many}), "text", str(tmp_path / "copy"))["files"][0]
    with pa.OSFile(copied) as source:
        assert [batch.num_rows for batch in pa.ipc.open_stream(source)] == [1000, 1000, 500]
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    junk = types.SimpleNamespace(num_rows=1, data=types.SimpleNamespace(num_rows=1),
                                 cache_files=[{"filename": str(tmp_path / "junk.arrow")}])
    assert arrow_data_files(junk, "text") is None


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
    assert sorted(p.name for p in output.iterdir()) == ["tokenizer.json", "tokenizer_config.json",
                                                       "tokenizer_report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.jsonl", "tok"]


# --- the benchmark ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    return load_module("bench_tokenizer", REPO / "Utilities" / "bench_tokenizer.py")


def test_synthetic_corpus_is_deterministic_and_varied(bench):
    sentences, words = bench.load_pieces(SAMPLE)
    first = list(bench.synthetic_documents(sentences, words, 50_000, seed=3))
    assert first == list(bench.synthetic_documents(sentences, words, 50_000, seed=3))
    assert first != list(bench.synthetic_documents(sentences, words, 50_000, seed=4))
    assert sum(len(d.encode("utf-8")) for d in first) >= 50_000
    sample_sentences = set(sentences)
    changed = [s for d in first for s in bench.SENTENCE_END.split(d) if s.strip() and s not in sample_sentences]
    assert len(changed) > len(first)


def test_benchmark_helpers(bench, tmp_path):
    assert bench.join_documents(["aa", "bb", "cc"], 3) == ["aa\n\nbb", "cc"]
    assert bench.join_documents(["aaa", "bb"], 3) == ["aaa", "bb"]
    folder = bench.build_corpus(SAMPLE, 0.02, 5, tmp_path)
    written = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    assert bench.build_corpus(SAMPLE, 0.02, 5, tmp_path) == folder  # built once, then reused
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == written
    with pytest.raises(bench.InputError, match="does not exist"):
        bench.load_pieces(tmp_path / "missing.jsonl")
    result = run_script("Utilities/benchmark.py", "tokenizer", "--size-mb", 0, "--work-dir", tmp_path)
    assert result.returncode == 2 and "--size-mb must be positive" in result.stderr


def test_tree_memory_sums_a_parent_and_its_child_and_reports_nothing_without_proc(bench, monkeypatch):
    import threading

    def sample(command, path_class=None):
        process = subprocess.Popen(command)
        peaks = {"rss_kib": 0, "anon_kib": None}
        if path_class:
            monkeypatch.setattr(bench, "Path", path_class)
        sampler = threading.Thread(target=bench.sample_tree_memory, args=(process.pid, peaks), daemon=True)
        sampler.start()
        process.wait()
        sampler.join(timeout=10)
        monkeypatch.undo()
        assert not sampler.is_alive()
        return peaks

    # A parent holding ~60 MB while its child holds ~120 MB: the sum is what the machine had to give.
    child = "import time; b = bytearray(120 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = (f"import subprocess, sys, time; a = bytearray(60 << 20); a[::4096] = b'x' * len(a[::4096]); "
              f"subprocess.run([sys.executable, '-c', {child!r}])")
    peaks = sample([sys.executable, "-c", parent])
    assert peaks["rss_kib"] > 180 << 10 and peaks["anon_kib"] > 180 << 10

    class NoProc(type(bench.Path())):
        def read_text(self, *args, **kwargs):
            raise OSError("no /proc here")

    assert sample([sys.executable, "-c", "import time; time.sleep(0.3)"], NoProc) == {"rss_kib": 0, "anon_kib": None}


def test_benchmark_runs_both_variants(tmp_path):
    result = run_script("Utilities/benchmark.py", "tokenizer", "--size-mb", 0.3, "--vocab-size", 400,
                        "--work-dir", tmp_path, "--encode-mb", 0.05)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["variant"] for line in lines] == ["original", "ours"]
    for line in lines:
        assert line["benchmark"] == "tokenizer" and line["vocab_size"] == 400 and line["corpus_mb"] >= 0.3
        assert line["seconds"] > 0 and line["peak_rss_mib"] > 50
        assert line["encode_mb_per_second"] > 0 and line["encode_256kb_documents_mb_per_second"] > 0
        if sys.platform == "linux":
            assert 10 < line["peak_anon_mib"] <= line["peak_rss_mib"]
    original, ours = lines
    assert ours["documents"] == original["documents"] - min(1000, original["documents"] // 10)
    assert "ours against the original" in result.stdout
    assert json.loads((tmp_path / "ours" / "tokenizer_report.json").read_text())["vocab_size"] == 400
