"""pretrain/data/corpus.py: every format read in place gives the rows datasets reads, in any order, with exact sizes;
Hub streams (a local IterableDataset standing in); one-line refusals; nothing written to the datasets cache."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain import hub
from pretrain.data import corpus
from pretrain.data.corpus import open_corpus
from pretrain.errors import InputError
from tests.helpers.runs import REPO
from tests.helpers.texts import read_sample_texts, write_sample_as

ASCII_SPACE = " \t\n\r\x0b\x0c"
# Documents with what formats find hard: quotes, commas and line breaks (CSV), non-ASCII, a "</s>", long text.
DOCUMENTS = [*read_sample_texts()[:40], 'aspas "duplas", vírgulas, e\nlinhas\r\nnovas', "</s> não é o fim 😀",
             "x" * 300_000, "   espaços à frente", "NA é texto aqui? não: é um valor ausente no CSV"]


def written(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def with_datasets(kind, files, tmp_path):
    """What datasets.load_dataset reads from `files`, with a cache of its own under tmp_path."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(tmp_path / "datasets-cache"))


def check_reads(source, expected, **kwargs):
    """Every document of `source` read back shuffled, in batches and in order equals `expected`, sizes exact."""
    with open_corpus(str(source), **kwargs) as opened:
        assert opened.num_documents == len(expected)
        order = np.random.default_rng(0).permutation(len(expected))
        assert opened.texts(order) == [expected[i] for i in order]
        edges = np.array([0, 1, 7, len(expected) // 2, len(expected)])
        assert list(opened.read_batches(order, edges)) == [[expected[i] for i in order[a:b]]
                                                            for a, b in zip(edges[:-1], edges[1:])]
        assert opened.texts(np.arange(len(expected))) == expected
        assert [t for batch in opened.read_batches(np.arange(len(expected)), edges) for t in batch] == expected
        assert opened.texts([3, 3, 0]) == [expected[3], expected[3], expected[0]]
        assert opened.document_bytes().tolist() == [len(t.encode("utf-8")) if t else 0 for t in expected]
        assert opened.document_bytes() is opened.document_bytes()  # measured once
        return type(opened).__name__


# --- every format reads the rows datasets reads ------------------------------------------------------------------

def test_text_file_lines_as_datasets_reads_them_blank_lines_skipped(tmp_path, monkeypatch):
    lines = [" ".join(d.split()) for d in DOCUMENTS]
    # \r\n and a lone \r end lines too; blank lines of ASCII whitespace are skipped, a no-break space line is text.
    text = "\r\n".join(lines[:10]) + "\n\n  \t\n" + "\r".join(lines[10:20]) + "\n\u00a0\n" + "\n".join(lines[20:])
    path = written(tmp_path, "corpus.txt", text)
    rows = with_datasets("text", [path], tmp_path)["text"]
    expected = [row for row in rows if row.strip(ASCII_SPACE)]
    assert "\u00a0" in expected and len(expected) == len(lines) + 1
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 4096)  # chunks cut between \r and \n, lines longer than a chunk
    assert check_reads(path, expected) == "IndexedCorpus"


def test_random_text_files_keep_every_line_with_more_than_ascii_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)
    rng = np.random.default_rng(0)
    pieces = ["a", "é", " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\u00a0", "\x00", "ab" * 40]
    path = tmp_path / "random.txt"
    for _ in range(300):
        text = "".join(pieces[i] for i in rng.integers(len(pieces), size=rng.integers(1, 60)))
        path.write_bytes(text.encode("utf-8"))
        expected = [line for line in re.split("[\r\n]", text) if line.strip(" \t\x0b\x0c")]
        if not expected:
            continue
        with open_corpus(str(path)) as opened:
            assert opened.texts(np.arange(opened.num_documents)) == expected, text


def test_json_lines_with_nulls_other_columns_and_blank_lines(tmp_path, monkeypatch):
    rows = [{"id": i, "text": d, "meta": {"n": i}} for i, d in enumerate(DOCUMENTS)]
    rows[5]["text"] = None
    rows[9]["text"] = ""
    path = written(tmp_path, "corpus.jsonl", "".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" + "\n" * (i == 3)
                                                    for i, r in enumerate(rows)))
    expected = with_datasets("json", [path], tmp_path)["text"]
    assert expected[5] is None and expected[9] == ""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 4096)
    assert check_reads(path, expected) == "IndexedCorpus"


def test_csv_with_quoted_line_breaks_and_missing_values(tmp_path, monkeypatch):
    path = tmp_path / "corpus.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "score"])
        for i, document in enumerate(DOCUMENTS):
            writer.writerow([i, "NA" if i == 4 else "" if i == 6 else document, i / 2])
            if i == 8:
                handle.write("\r\n")  # a blank line between records
    expected = with_datasets("csv", [path], tmp_path)["text"]
    assert expected[4] is None and expected[6] is None and "\r\n" in expected[len(DOCUMENTS) - 5]
    monkeypatch.setattr(corpus, "SCHEMA_RECORDS", 3)  # the type is decided by the first records
    assert check_reads(path, expected) == "IndexedCorpus"


def test_parquet_read_by_row_group_in_any_order(tmp_path, monkeypatch):
    path = tmp_path / "corpus.parquet"
    texts = [None if i == 2 else d for i, d in enumerate(DOCUMENTS)]
    pq.write_table(pa.table({"n": list(range(len(texts))), "text": texts}), path, row_group_size=7)
    expected = with_datasets("parquet", [path], tmp_path)["text"]
    # Small record batches and windows: shuffled reads then take several passes, each batch several row groups.
    monkeypatch.setattr(corpus, "SCAN_BYTES", 2000)
    monkeypatch.setattr(corpus, "WINDOW_BYTES", 5_000)
    assert check_reads(path, expected) == "ParquetCorpus"
    scans = []
    with open_corpus(str(path)) as opened:
        original = opened._scan
        monkeypatch.setattr(opened, "_scan", lambda wanted: scans.append(len(wanted)) or original(wanted))
        order = np.random.default_rng(1).permutation(len(texts))
        edges = np.arange(0, len(texts) + 1)
        assert [t for batch in opened.read_batches(order, edges) for t in batch] == [expected[i] for i in order]
    assert len(scans) > 3 and sum(scans) == len(texts)  # one pass per window, each document gathered once


def test_folder_of_parquet_files_some_empty(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    schema = pa.schema([pa.field("text", pa.string())])
    pq.write_table(pa.table({"text": DOCUMENTS[:9]}), folder / "a.parquet", row_group_size=4)
    pq.write_table(schema.empty_table(), folder / "b.parquet")
    with pq.ParquetWriter(folder / "c.parquet", schema) as writer:
        writer.write_table(schema.empty_table())
        writer.write_table(pa.table({"text": DOCUMENTS[9:]}, schema=schema))
    assert pq.ParquetFile(folder / "c.parquet").metadata.row_group(0).num_rows == 0
    check_reads(folder, DOCUMENTS)


def test_folder_of_files_in_sorted_order(tmp_path):
    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    (folder / "not-a-file.jsonl").mkdir()
    parts = {"b/part-0.jsonl": DOCUMENTS[:5], "a.jsonl": DOCUMENTS[5:12], "c.jsonl": [], "d.jsonl": DOCUMENTS[12:]}
    for name, texts in parts.items():
        written(folder, name, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    files = sorted(p for p in folder.rglob("*.jsonl") if p.is_file())
    expected = with_datasets("json", files, tmp_path)["text"]
    assert expected == DOCUMENTS[5:12] + DOCUMENTS[:5] + DOCUMENTS[12:]
    check_reads(folder, expected)


def test_save_to_disk_folder_is_read_from_its_arrow_files(tmp_path):
    import datasets

    texts = [None if i == 3 else d for i, d in enumerate(DOCUMENTS)]
    train = datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts})
    # A filtered dataset is saved as its rows alone.
    datasets.DatasetDict({"train": train, "kept": train.filter(lambda row: row["id"] % 3 == 0)}).save_to_disk(
        str(tmp_path / "saved"), max_shard_size="20KB")
    assert len(list((tmp_path / "saved" / "train").glob("*.arrow"))) > 1
    check_reads(tmp_path / "saved", texts, split="train")
    check_reads(tmp_path / "saved", texts[::3], split="kept")
    train.save_to_disk(str(tmp_path / "single"))
    with open_corpus(str(tmp_path / "single"), "any split") as opened:
        assert opened.texts([0, 1, 5, 40, len(texts) - 1]) == [texts[i] for i in (0, 1, 5, 40, len(texts) - 1)]


def test_sorted_neighbours_share_reads_and_shuffled_ones_do_not(tmp_path, monkeypatch):
    texts = [f"documento número {i}" for i in range(20_000)]
    path = written(tmp_path, "many.txt", "\n".join(texts) + "\n")
    monkeypatch.setattr(corpus, "READ_SPAN", 1 << 16)
    with open_corpus(str(path)) as opened:
        reads = []
        original = opened._read
        monkeypatch.setattr(opened, "_read", lambda *args: reads.append(args) or original(*args))
        assert opened.texts(np.arange(0, 20_000, 2)) == texts[::2]
        assert 5 <= len(reads) <= 10  # 480 KB in reads of at most about 64 KB
        assert all(stop - start <= (1 << 16) + 100 for _, start, stop in reads)
        reads.clear()
        monkeypatch.setattr(corpus, "READ_GAP", 0)
        order = np.random.default_rng(0).permutation(20_000)[:50]
        assert opened.texts(order) == [texts[i] for i in order] and len(reads) == 50


def test_reading_leaves_no_page_of_the_corpus_in_memory(tmp_path):
    """Plain reads only: after reading a 60 MB corpus twice over, shuffled, the process maps none of it."""
    import datasets

    texts = [f"{i:08d}" * 125 for i in range(60_000)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    written(tmp_path, "corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    for source in (tmp_path / "saved", tmp_path / "corpus.jsonl"):
        with open_corpus(str(source)) as opened:
            opened.texts([0, 1])  # libraries' lazily loaded code is not the corpus
            before = rss_kib("RssFile")
            for seed in range(2):
                order = np.random.default_rng(seed).permutation(len(texts))
                for first, batch in zip(range(0, len(texts), 1000),
                                        opened.read_batches(order, np.arange(0, len(texts) + 1, 1000))):
                    assert batch == [texts[i] for i in order[first:first + 1000]]
            assert rss_kib("RssFile") - before < 5_000
            assert not [line for line in open("/proc/self/maps") if str(source) in line]


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


def test_nothing_is_written_to_the_datasets_cache_and_datasets_is_not_imported(tmp_path):
    import datasets

    folder = tmp_path / "inputs"
    folder.mkdir()
    written(folder, "c.txt", "um\ndois\n")
    written(folder, "c.jsonl", '{"text": "um"}\n')
    written(folder, "c.csv", "text\num\n")
    pq.write_table(pa.table({"text": ["um"]}), folder / "c.parquet")
    datasets.Dataset.from_dict({"text": ["um"]}).save_to_disk(str(folder / "saved"))
    cache = tmp_path / "cache"
    cache.mkdir()
    program = ("import sys; from pretrain.data.corpus import open_corpus\n"
               "for name in sys.argv[1:]:\n"
               "    with open_corpus(name) as c: assert c.texts([0]) == ['um'] and c.document_bytes()[0] == 2\n"
               "print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))")
    sources = [str(folder / name) for name in ("c.txt", "c.jsonl", "c.csv", "c.parquet", "saved")]
    result = subprocess.run([sys.executable, "-c", program, *sources], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not list(cache.iterdir()) and not (tmp_path / "home").exists()


# --- Hub streams ---------------------------------------------------------------------------------------------------

def stand_in_hub(monkeypatch, rows, calls=None):
    """datasets.load_dataset answering with a local IterableDataset of `rows`, and the Hub reachable."""
    import datasets

    def load_dataset(name, split=None, streaming=False, token=None):
        if calls is not None:
            calls.append({"name": name, "split": split, "streaming": streaming, "token": token})
        if name == "someone/missing":
            raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub\nmore detail")
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)


def test_a_hub_dataset_is_streamed_shuffled_with_the_seed_and_read_twice_in_one_order(monkeypatch):
    import datasets

    rows = [{"text": d if i != 4 else None, "id": i} for i, d in enumerate(DOCUMENTS)]
    calls = []
    stand_in_hub(monkeypatch, rows, calls)
    shuffled = [row["text"] for row in datasets.IterableDataset.from_generator(lambda: iter(rows)).shuffle(
        seed=5, buffer_size=corpus.SHUFFLE_BUFFER)]
    assert shuffled != [row["text"] for row in rows]
    with open_corpus("someone/corpus", "train", token="hf_secret", shuffle_seed=5) as stream:
        assert calls == [{"name": "someone/corpus", "split": "train", "streaming": True, "token": "hf_secret"}]
        assert not stream.random_access and stream.num_documents is None
        assert list(stream.documents()) == shuffled
        sizes = stream.document_bytes()
        assert stream.num_documents == len(rows)
        assert sizes.tolist() == [len(t.encode("utf-8")) if t else 0 for t in shuffled]
        wanted = np.flatnonzero(sizes)
        batches = list(stream.read_batches(wanted, np.array([0, 3, len(wanted)])))
        assert batches == [[shuffled[i] for i in wanted[:3]], [shuffled[i] for i in wanted[3:]]]
        with pytest.raises(ValueError, match="positions must increase"):
            next(stream.read_batches(np.array([2, 1]), np.array([0, 2])))
    with open_corpus("someone/corpus") as stream:
        assert list(stream.documents()) == [row["text"] for row in rows]


def test_a_stream_that_changes_between_readings_is_refused(monkeypatch):
    rows = [{"text": "um"}, {"text": "dois"}]
    stand_in_hub(monkeypatch, rows)
    with open_corpus("someone/corpus") as stream:
        stream.document_bytes()
        rows[1]["text"] = "outro"
        with pytest.raises(InputError, match="gave other documents on a second reading \\(document 1\\)"):
            list(stream.read_batches(np.array([0, 1]), np.array([0, 2])))
        del rows[1]
        with pytest.raises(InputError, match="gave fewer documents on a second reading"):
            list(stream.read_batches(np.array([0, 1]), np.array([0, 2])))


@pytest.mark.parametrize("rows, kwargs, message", [
    ([], {}, "dataset 'someone/corpus' is empty"),
    ([{"body": "x"}], {}, "has no column 'text' \\(columns: body\\); pass --text-column"),
    ([{"text": 5}], {}, "holds int64 values, not text; pass --text-column"),
    ([{"text": "x"}, {"text": [1]}], {"read": True}, "holds non-text values, not text"),
    ([{"text": "x"}], {"name": "someone/missing"},
     "could not load dataset 'someone/missing' split 'train' from the Hub: Dataset 'someone/missing' doesn't exist"),
])
def test_bad_streams_are_refused_in_one_line(monkeypatch, rows, kwargs, message):
    stand_in_hub(monkeypatch, rows)
    with pytest.raises(InputError, match=message) as raised:
        with open_corpus(kwargs.get("name", "someone/corpus"), text_column_flag="--text-column") as stream:
            list(stream.documents())
    assert "\n" not in str(raised.value)


def test_a_stream_that_fails_while_it_is_read_gives_one_line(monkeypatch):
    import datasets

    def rows():
        yield {"text": "um"}
        raise ConnectionError("Connection reset by peer\nretries exhausted")

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.IterableDataset.from_generator(rows))
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    with open_corpus("someone/corpus") as stream:
        with pytest.raises(InputError, match="^could not read dataset 'someone/corpus' from the Hub: Connection "
                                             "reset by peer$"):
            list(stream.documents())


def test_an_unreachable_hub_is_named(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(InputError, match="'someone/corpus' is not a local path and the Hugging Face Hub cannot"):
        open_corpus("someone/corpus")


# --- refusals ---------------------------------------------------------------------------------------------------

def arrow_stream(path, table, **options):
    path.mkdir()
    (path / "dataset_info.json").write_text("{}")
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))
    with pa.OSFile(str(path / "data.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return path


def bad_corpus(tmp_path, case):
    if case == "missing":
        return tmp_path / "missing.jsonl"
    if case == "mixed":
        written(tmp_path, "a.jsonl", '{"text": "x"}\n')
        written(tmp_path, "b.txt", "x\n")
        return tmp_path
    if case == "no text files":
        written(tmp_path, "notes.md", "x\n")
        return tmp_path
    if case == "unknown suffix":
        return written(tmp_path, "corpus.xml", "<text/>")
    files = {
        "empty jsonl": ("e.jsonl", ""), "blank txt": ("b.txt", "\n \n\t\n"), "header-only csv": ("h.csv", "text\n"),
        "missing column": ("m.jsonl", '{"body": "x", "id": 1}\n'),
        "missing csv column": ("m.csv", "body,id\nx,1\n"),
        "numbers": ("n.jsonl", '{"text": 5}\n'), "nested": ("l.jsonl", '{"text": ["a"]}\n'),
        "csv numbers": ("n.csv", "text\n1\n2\n"), "csv floats": ("f.csv", "text\n1.5\nNA\n"),
        "not utf-8 txt": ("u.txt", None), "not json": ("j.jsonl", '{"text": "ok"}\n{"text": \n'),
        "json array": ("a.json", '[{"text": "x"}]\n'), "not csv": ("q.csv", None),
        "not parquet": ("p.parquet", "not parquet at all"),
    }
    if case == "parquet without the column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
        return tmp_path / "b.parquet"
    if case == "unopenable":
        return written(tmp_path, "locked.txt", "x\n")
    name, text = files[case]
    if text is None:
        (tmp_path / name).write_bytes(b"text\nbom dia\n\xff\xfe quebrado\n")
        return tmp_path / name
    return written(tmp_path, name, text)


@pytest.mark.parametrize("case, message", [
    ("missing", "dataset '{path}' does not exist; check the path"),
    ("mixed", "'{path}' mixes file types (json, text); keep one type per folder"),
    ("no text files", "'{path}' holds no readable text files; give .txt, .jsonl, .parquet or .csv files"),
    ("unknown suffix", "'{path}' holds no readable text files"),
    ("empty jsonl", "dataset '{path}' is empty; give a dataset with at least one document"),
    ("blank txt", "dataset '{path}' is empty"),
    ("header-only csv", "dataset '{path}' is empty"),
    ("missing column", "dataset '{path}' has no column 'text' (columns: body, id); pass --text-column with one"),
    ("missing csv column", "has no column 'text' (columns: body, id); pass --text-column"),
    ("numbers", "column 'text' of '{path}' holds int64 values, not text; pass --text-column with the column"),
    ("nested", "holds non-text values, not text"),
    ("csv numbers", "holds int64 values, not text"),
    ("csv floats", "holds float64 values, not text"),
    ("not utf-8 txt", "could not read '{path}' as text: byte 13 is not UTF-8; give UTF-8 text"),
    ("not json", "could not read '{path}' as json: record 2 (Expecting value: line 1 column 10 (char 9)); fix or"),
    ("json array", "could not read '{path}' as json: record 1 (a JSON list, not an object)"),
    ("not csv", "could not read '{path}' as csv: 'utf-8' codec can't decode byte 0xff"),
    ("not parquet", "could not read '{path}' as parquet: "),
    ("parquet without the column", "has no column 'text' (columns: body); pass --text-column"),
    ("unopenable", "could not read '{path}': [Errno 13] Permission denied"),
])
def test_bad_local_corpora_are_refused_in_one_line(tmp_path, monkeypatch, case, message):
    path = bad_corpus(tmp_path, case)
    if case == "unopenable":  # as root, no file mode keeps a file from being read
        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(corpus, "open", denied, raising=False)
    with pytest.raises(InputError) as raised:
        with open_corpus(str(path), text_column_flag="--text-column") as opened:
            opened.texts(np.arange(opened.num_documents))
    assert message.format(path=path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_record_with_no_text_after_the_first_ones_is_refused_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SCHEMA_RECORDS", 2)
    path = written(tmp_path, "late.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": 3.5}\n')
    with open_corpus(str(path)) as opened:
        assert opened.texts([0, 1]) == ["a", "b"]
        with pytest.raises(InputError, match="holds float64 values, not text; pass --text_column"):
            opened.texts([2])
        with pytest.raises(InputError, match="holds float64 values"):
            opened.document_bytes()


def test_save_to_disk_refusals(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"], "n": [1]}),
                          "test": datasets.Dataset.from_dict({"text": ["y"], "n": [2]})}).save_to_disk(
        str(tmp_path / "saved"))
    with pytest.raises(InputError, match="'.*saved' has no split 'validation' \\(splits: train, test\\); pass one "):
        open_corpus(str(tmp_path / "saved"), "validation")
    with pytest.raises(InputError, match="column 'n' of '.*' holds int64 values, not text; pass --text_column"):
        open_corpus(str(tmp_path / "saved"), "train", "n")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "dataset_info.json").write_text("{}")
    (damaged / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (damaged / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match="^could not read '.*data-00000-of-00001.arrow' as Arrow: "):
        open_corpus(str(damaged))
    (damaged / "state.json").write_text("{}")
    with pytest.raises(InputError, match="^could not read '.*damaged' as a save_to_disk folder: '_data_files'$"):
        open_corpus(str(damaged))
    compressed = arrow_stream(tmp_path / "compressed", pa.table({"text": ["um texto"] * 100}), compression="zstd")
    with pytest.raises(InputError, match="as Arrow in place: its batches are compressed; save the dataset again"):
        open_corpus(str(compressed))
    nested = arrow_stream(tmp_path / "nested", pa.table({"text": [["um"]], "body": ["x"]}))
    with pytest.raises(InputError, match="holds non-text values, not text"):
        open_corpus(str(nested))
    with pytest.raises(InputError, match="has no column 'texts' \\(columns: text, body\\); pass --text_column"):
        open_corpus(str(nested), text_column="texts")


def test_arrow_batches_of_large_strings_empty_ones_and_none(tmp_path):
    schema = pa.schema([pa.field("text", pa.large_string())])
    batches = [pa.record_batch([pa.array(texts, pa.large_string())], schema=schema)
               for texts in (["um", None, "três"], [], ["", ""], ["quatro"])]
    folder = arrow_stream(tmp_path / "wide", pa.Table.from_batches(batches))
    with open_corpus(str(folder)) as opened:
        assert opened.texts([5, 2, 1, 0, 4, 3]) == ["quatro", "três", None, "um", "", ""]
        assert opened.document_bytes().tolist() == [2, 0, 5, 0, 0, 6]


def test_a_file_that_shrinks_while_it_is_read_is_refused(tmp_path):
    path = written(tmp_path, "corpus.txt", "um\ndois\ntrês\n")
    with open_corpus(str(path)) as opened:
        path.write_text("um\n")
        with pytest.raises(InputError, match="changed while it was read"):
            opened.texts([2])
        path.unlink()
        opened.close()
        with pytest.raises(InputError, match="^could not read '.*corpus.txt': \\[Errno 2\\] No such file"):
            opened.texts([0])




# --- JSON Lines parsed in bulk --------------------------------------------------------------------------------

def read_everything(path):
    """Reading `path`: its documents' sizes, its texts shuffled and in order; or the refusal's message."""
    try:
        with open_corpus(str(path)) as opened:
            order = np.random.default_rng(0).permutation(opened.num_documents)
            return (opened.document_bytes().tolist(), opened.texts(order),
                    opened.texts(np.arange(opened.num_documents)))
    except InputError as error:
        return str(error)


def read_with_json_loads(path, monkeypatch):
    """read_everything with every record read by json.loads, one by one: the reference."""
    with monkeypatch.context() as patched:
        patched.setattr(corpus.JsonLines, "in_bulk", False)
        return read_everything(path)


def count_bulk_reads(monkeypatch) -> dict:
    """How many calls of JsonLines.bulk_column read their records, and how many left them to json.loads."""
    counts = {"read": 0, "declined": 0}
    original = corpus.JsonLines.bulk_column

    def counted(self, *args, **kwargs):
        column = original(self, *args, **kwargs)
        counts["declined" if column is None else "read"] += 1
        return column

    monkeypatch.setattr(corpus.JsonLines, "bulk_column", counted)
    return counts


PLAIN = ['{"text": "um documento"}', '{"id": 7, "text": "Informação: Inf, NaN, -Inf e Infinity são palavras [Inf]"}']
# Lines pyarrow's JSON reader takes otherwise than json.loads (or crashes on: a line "null"), and lines both read.
HAZARDS = [
    '{"text": "a", "x": Inf}', '{"text": "a", "x": -Inf}', '{"text": "a", "x": [1, Inf]}', '{"text": "a", "x": -NaN}',
    '{"text": "a", "x": NaN}', '{"text": "a", "x": -Infinity}', '{"text": NaN}', '{"text": Infinity}',
    "null", "[1]", '"text"', "5", '  {"text": "indented"}', '{"text": "trailing spaces"}  ',
    '{"text": "a"} {"text": "b"}', '{"text": "a", "x": [\n{"y": 1}]}', '{"text": "a",\n"x": 1}',
    '{"text": "dup", "text": "last wins"}', '{"text": "dup", "text": null}', '{"text": "dup", "text": 1}',
    '{"text": "dup", "te\\u0078t": "escaped, last wins"}',
    '{"te\\u0078t": "escaped key"}', '{"text": "\\ud83d\\ude00 \\u00e9 \\/ \\n"}', '{"text": "\\ud800"}',
    '{"text": "\\udc00x"}', '{"text": 5}', '{"text": true}', '{"text": ["a"]}', '{"text": {"a": 1}}',
    '{"text": null}', "{}", '{"text": ""}', '{"text": "a\\u0000b"}', '{"text": "tab\there"}',
    '{"text": "a", "x": 1e400}',
    '{"text": "a", "x": 01}', '{"text": "a",}', '{"text": "a"}}', "{'text': 'a'}", '\ufeff{"text": "bom"}',
    '\u00a0{"text": "no-break space"}', '{"text": "a"}\x0c', '{"text": "a\x00b"}', '{"text": "a"}\x00',
]
BYTE_HAZARDS = [b'{"text": "\xff"}', b'{"text": "a", "x": "\xc0\xaf"}', b'{"text": "\xed\xa0\x80"}',
                "ação".encode("utf-16-le"), b'{\x00"text": "a"}']


@pytest.mark.parametrize("hazard", [line.encode("utf-8") for line in HAZARDS] + BYTE_HAZARDS)
def test_json_lines_in_bulk_read_as_json_loads_reads_them(tmp_path, monkeypatch, hazard):
    monkeypatch.setattr(corpus, "SCHEMA_RECORDS", 1)  # so that the records after the first are met when read
    counts = count_bulk_reads(monkeypatch)
    plain = "".join(line + "\n" for line in PLAIN).encode("utf-8")
    for name, data in (("first", hazard + b"\n" + plain), ("later", plain * 3 + hazard + b"\n" + plain),
                       ("last", plain + hazard)):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        assert read_everything(path) == read_with_json_loads(path, monkeypatch), data
    assert counts["read"] + counts["declined"] >= 2


def test_plain_json_lines_are_read_in_bulk(tmp_path, monkeypatch):
    rows = [{"id": i, "text": d, "meta": {"n": [i, 1.5, None, True]}} for i, d in enumerate(DOCUMENTS)]
    rows[3]["text"], rows[8]["text"] = None, ""
    path = written(tmp_path, "corpus.jsonl", "\r\n".join(json.dumps(r, ensure_ascii=i % 2 == 0)
                                                         for i, r in enumerate(rows)) + "\n\n \t\n")
    counts = count_bulk_reads(monkeypatch)
    monkeypatch.setattr(corpus, "BULK_BYTES", 50_000)  # several calls, one of them for a record longer than that
    monkeypatch.setattr(corpus, "BULK_BLOCK_BYTES", 1000)  # records longer than pyarrow's block: it is widened
    assert check_reads(path, [r["text"] for r in rows]) == "IndexedCorpus"
    assert counts["read"] > 10 and counts["declined"] == 0


@pytest.mark.parametrize("column", ["a/b", "a.b", "é", ""])
def test_json_lines_in_bulk_under_any_column_name(tmp_path, monkeypatch, column):
    rows = [{column: f"documento {i}", "a": {"b": "aninhado"}, "x": i} for i in range(5)] + [{"a": {"b": "só"}}]
    path = written(tmp_path, "corpus.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    counts = count_bulk_reads(monkeypatch)
    with open_corpus(str(path), text_column=column) as opened:
        assert opened.texts(np.arange(6)) == [f"documento {i}" for i in range(5)] + [None]
        assert opened.document_bytes().tolist() == [11] * 5 + [0]
    assert counts == {"read": 2, "declined": 0}


def fuzzed_json_lines(rng) -> bytes:
    """A few JSON lines, each a random object, about half of them then broken or bent with the pieces pyarrow's
    reader and json.loads may disagree on."""
    pieces = ["{", "}", "[", "]", ":", ",", '"', "\\", "\\u", "\\ud800", "\\ud83d\\ude00", " ", "\t", "-", "0",
              "1e999", "NaN", "-NaN", "Inf", "-Inf", "Infinity", "null", "true", '"text"', '"text": ', '"x": ', "é",
              "\x00", "\x0b", "\r", "\ufeff", "\n", '{"text": 1}', "} {"]
    values = ["texto", "", None, "Inf", "a\nb", "😀 é", 3, 2.5, True, ["x"], {"text": "dentro"}]
    lines = []
    for _ in range(rng.integers(1, 5)):
        record = {key: values[rng.integers(len(values))] for key in rng.choice(["text", "x", "y"], rng.integers(0, 4))}
        line = json.dumps(record, ensure_ascii=bool(rng.integers(2)))
        for _ in range(rng.integers(0, 3) * rng.integers(0, 2)):
            at = int(rng.integers(len(line) + 1))
            line = line[:at] + pieces[rng.integers(len(pieces))] + line[at + int(rng.integers(0, 2)):]
        not_utf8 = [b"", b"\xff", b"\xed\xa0\x80"][rng.integers(3) // 2 * rng.integers(3)]  # now and then
        lines.append(line.encode("utf-8", "surrogatepass") + not_utf8)
    ends = [b"\n", b"\r\n", b"\r", b"\n\n", b"\n \n", b"\n\x0b\n"]
    return b"".join(line + ends[rng.integers(len(ends))] for line in lines)[:None if rng.integers(3) else -1]


def test_fuzzed_json_lines_read_in_bulk_as_json_loads_reads_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(corpus, "SCHEMA_RECORDS", 1)
    counts = count_bulk_reads(monkeypatch)
    path = tmp_path / "fuzzed.jsonl"
    for _ in range(400):
        path.write_bytes(fuzzed_json_lines(rng))
        assert read_everything(path) == read_with_json_loads(path, monkeypatch), path.read_bytes()
    assert counts["read"] > 50 and counts["declined"] > 50  # both ways were taken, many times


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "csv", "saved"])
def test_the_sample_in_every_format_reads_as_its_documents(tmp_path, kind):
    texts = read_sample_texts()
    expected = [" ".join(t.split()) for t in texts] if kind == "txt" else texts
    check_reads(write_sample_as(tmp_path, kind), expected)


def test_csv_numbers_spelled_as_python_alone_reads_them_are_text(tmp_path):
    path = written(tmp_path, "ids.csv", "text\n1_000\n2\n")
    with open_corpus(str(path)) as opened:
        assert opened.texts([0, 1]) == ["1_000", "2"]
