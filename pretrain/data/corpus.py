"""Reading a text corpus where it lies, as documents: a local file or folder, a save_to_disk folder, or a Hub stream.

    with open_corpus("data/sample/pt-sample.jsonl", "train", "text") as corpus:
        sizes = corpus.document_bytes()                        # UTF-8 bytes of every document, 0 when missing
        for texts in corpus.read_batches(positions, edges):    # the documents at positions[edges[i]:edges[i + 1]]
            ...

Local corpora are read in place, without the datasets library and without a converted copy anywhere:
- .txt/.text: one document per line. Lines end at "\\n", "\\r\\n" or "\\r" (Python's universal newlines); a line of
  ASCII whitespace only (spaces, tabs, \\v, \\f) is blank and skipped, while a line whose only characters are other
  whitespace (a no-break space, U+2028, \\x1c...) is kept as a document. The file must be UTF-8.
- .jsonl/.json: JSON Lines, one object per line, blank lines skipped; the column's values are strings or null.
  Records are parsed many at a time by pyarrow's JSON reader where it reads them as json.loads does, and one by
  one by json.loads otherwise, which then names a bad record.
- .csv: a header, then one record per row (quoted fields may hold line breaks); an empty field or one of pandas'
  missing-value words (NA, null, NaN...) is a missing document, as datasets' CSV reader gave it.
- .parquet, and a folder of files of one of these types (read in sorted order, subfolders included).
- a save_to_disk folder: its Arrow files, as its state.json lists them; a DatasetDict is indexed by the split.
The column's type is checked where the format records it (the schema; CSV and JSON Lines: the first
SCHEMA_RECORDS records, as datasets infers types from its first block); a later record holding no text is refused
when it is read.

Memory stays flat in the size of the corpus. For text, JSON Lines, CSV and Arrow, an index keeps one 8-byte offset
per document (where its record, or for Arrow its text, starts in its file), and documents are fetched with plain
reads, neighbours in one read; nothing stays mapped, so no page of the corpus stays in the process's memory. (An
Arrow file is mapped just long enough to read its batches' headers and text offsets.) Parquet's pages are
compressed, so a parquet corpus is decoded one record batch at a time, skipping row groups that hold no wanted
document: positions in increasing order take one pass, and others (a shuffled order) one pass per WINDOW_BYTES of
text gathered.

A Hub dataset (a name that is not a local path) is streamed with `datasets.load_dataset(..., streaming=True)`, so
nothing is written to disk; a stream has an order but no positions, and is shuffled by datasets (its shards, then a
buffer of SHUFFLE_BUFFER documents) when a seed is given:
- train-sentencepiece.py reads the stream shuffled with its seed: its first documents are held out for the report,
  as many as it would hold out of a local corpus of that size, and the next --num_samples are trained on.
- tokenize-dataset.py reads the stream twice in the same order (shuffled with its seed unless --shuffle is false):
  first for every document's size, which plans the batches and the test split, then for the text, which must come
  back with the same sizes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from array import array
from collections import deque
from itertools import islice
from pathlib import Path

import numpy as np

from pretrain.errors import InputError, first_line
from pretrain.hub import TEXT_SUFFIXES, looks_local, require_hub

CHUNK_BYTES = 1 << 24         # read at a time when a text or JSON Lines file is indexed
READ_GAP = 1 << 13            # sorted documents this close share one read (copying a gap beats another read) ...
READ_SPAN = 1 << 22           # ... which never crosses a multiple of this offset, to bound its size
SIZE_BATCH = 1 << 14          # documents decoded at a time when their sizes are measured
BULK_BYTES = 1 << 23          # JSON Lines records parsed at once by pyarrow
BULK_BLOCK_BYTES = 1 << 20    # ... in blocks of about this size, in parallel
SCAN_BYTES = 1 << 23          # parquet text decoded at a time
WINDOW_BYTES = 1 << 26        # parquet text gathered per pass when documents are wanted out of order
SCHEMA_RECORDS = 1000         # CSV and JSON Lines records whose values decide the column's type
SHUFFLE_BUFFER = 10_000       # documents datasets shuffles a stream within
OPEN_FILES = 16               # file descriptors kept open by one corpus
CSV_FIELD_LIMIT = (1 << 31) - 1
# pandas' missing-value words: datasets read CSV with pandas, which made these fields missing.
CSV_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                         "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
TEXT_DTYPES = ("string", "large_string")
ARROW_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}  # datasets' names for them
JSON_DTYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}
ASCII_SPACE = np.zeros(256, bool)
ASCII_SPACE[list(b" \t\n\r\x0b\x0c")] = True
VALUE_END = np.zeros(256, bool)  # the bytes that may follow a JSON value
VALUE_END[list(b" \t\n\r,]}")] = True


class NotText(ValueError):
    """A value of the text column that is not text; `dtype` names its type as datasets does (None: nested)."""

    def __init__(self, dtype: str | None):
        super().__init__(dtype)
        self.dtype = dtype


def open_corpus(name: str, split: str = "train", text_column: str = "text", token: str | None = None,
                text_column_flag: str = "--text_column", shuffle_seed: int | None = None) -> "Corpus":
    """The corpus `name`: a local file or folder, a save_to_disk folder (a DatasetDict indexed by `split`) or, when
    it is not a local path, a Hub dataset streamed (shuffled with `shuffle_seed` unless it is None).

    `text_column_flag` is the calling script's spelling of its text-column option, named in the messages about it.
    """
    path = Path(name).expanduser()
    if path.exists():
        corpus = _open_local(path, name, split, text_column, text_column_flag)
    elif looks_local(name):
        raise InputError(f"dataset '{name}' does not exist; check the path")
    else:
        require_hub("dataset", name)
        corpus = StreamedCorpus.open(name, split, text_column, text_column_flag, token, shuffle_seed)
    if corpus.num_documents == 0:
        corpus.close()
        raise InputError(f"dataset '{name}' is empty; give a dataset with at least one document")
    return corpus


class Corpus:
    """What both scripts read: `num_documents` documents, addressed by position (0 .. num_documents - 1)."""

    random_access = True  # False for a stream, whose documents come in its order only

    def __init__(self, name: str, column: str, flag: str):
        self.name, self.column, self.flag = name, column, flag
        self.num_documents = 0
        self._sizes = None

    def check_column(self, columns: list[str], dtype: str | None) -> None:
        if self.column not in columns:
            raise InputError(f"dataset '{self.name}' has no column '{self.column}' (columns: "
                             f"{', '.join(columns) or 'none'}); pass {self.flag} with one of them")
        if dtype not in TEXT_DTYPES:
            raise self.not_text(dtype)

    def not_text(self, dtype: str | None) -> InputError:
        return InputError(f"column '{self.column}' of '{self.name}' holds {dtype or 'non-text'} values, not text; "
                          f"pass {self.flag} with the column of documents")

    def read_batches(self, positions: np.ndarray, edges: np.ndarray):
        """Lists of the documents (str, or None when missing) at positions[edges[i]:edges[i + 1]], in that order."""
        raise NotImplementedError

    def texts(self, positions) -> list:
        positions = np.asarray(positions, np.int64)
        return next(self.read_batches(positions, np.array([0, len(positions)])))

    def document_bytes(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# --- local files -------------------------------------------------------------------------------------------------

def _open_local(path: Path, name: str, split: str, column: str, flag: str) -> Corpus:
    if path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
        return _open_saved(path, name, split, column, flag)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()) \
        if path.is_dir() else [path]
    kinds = {TEXT_SUFFIXES.get(p.suffix.lower()) for p in files}
    if not files or None in kinds:
        raise InputError(f"'{path}' holds no readable text files; give .txt, .jsonl, .parquet or .csv files "
                         f"or a save_to_disk folder")
    if len(kinds) > 1:
        raise InputError(f"'{path}' mixes file types ({', '.join(sorted(kinds))}); keep one type per folder")
    opener = {"text": _open_text, "json": _open_json, "csv": _open_csv, "parquet": ParquetCorpus}[kinds.pop()]
    return opener(name, column, flag, files)


def _open_text(name: str, column: str, flag: str, files: list[Path]) -> "IndexedCorpus":
    corpus = IndexedCorpus(name, column, flag, files, TextLines(),
                           [(number, _line_starts(path, utf8=True)) for number, path in enumerate(files)])
    corpus.check_column(["text"], "string")
    return corpus


def _open_json(name: str, column: str, flag: str, files: list[Path]) -> "IndexedCorpus":
    corpus = IndexedCorpus(name, column, flag, files, JsonLines(column),
                           [(number, _line_starts(path, utf8=False)) for number, path in enumerate(files)])
    columns, values = {}, []
    for record in corpus.records(np.arange(min(SCHEMA_RECORDS, corpus.num_documents))):
        columns.update(dict.fromkeys(record))
        values.append(record.get(column))
    if columns:  # a column of nothing but nulls so far says nothing of its type: it is read as text
        corpus.check_column(list(columns), JSON_DTYPES.get(type(next((v for v in values if v is not None), ""))))
    return corpus


def _open_csv(name: str, column: str, flag: str, files: list[Path]) -> "IndexedCorpus":
    indexes, segments, corpus = [], [], Corpus(name, column, flag)
    for number, path in enumerate(files):
        header, ends, head = _csv_records(path)
        # As datasets did, the first file's first records decide the column's type.
        dtype = _csv_dtype(head, header.index(column)) if number == 0 and column in header else "string"
        corpus.check_column(header, dtype)
        indexes.append(header.index(column))
        segments.append((number, ends))
    return IndexedCorpus(name, column, flag, files, CsvRecords(indexes), segments)


def _open_saved(path: Path, name: str, split: str, column: str, flag: str) -> "IndexedCorpus":
    """A save_to_disk folder, read from the Arrow files its state.json lists."""
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            if split not in splits:
                raise InputError(f"'{path}' has no split '{split}' (splits: {', '.join(splits)}); "
                                 f"pass one of them as the split")
            path = path / split
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"could not read '{path}' as a save_to_disk folder: {first_line(error)}") from None
    corpus = Corpus(name, column, flag)
    segments, nulls, documents = [], [], 0
    for number, file in enumerate(files):
        for bounds, null_rows in _arrow_batches(file, corpus):
            segments.append((number, bounds))
            nulls.append(documents + null_rows)
            documents += len(bounds) - 1
    return IndexedCorpus(name, column, flag, files, ArrowTexts(), segments,
                         np.concatenate(nulls) if nulls else None)


def _line_starts(path: Path, utf8: bool) -> np.ndarray:
    """Where each line of `path` with more than ASCII whitespace starts, then the file's size.

    Every "\\r" and "\\n" ends a line: "\\r\\n" leaves an empty line between the two, which is skipped like any
    blank one. With `utf8`, the file is checked to be UTF-8 on the way.
    """
    parts, offset, pieces = [], 0, []
    try:
        with open(path, "rb") as handle:
            while True:
                data = handle.read(CHUNK_BYTES)
                cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1 if data else 0
                if data and not cut:  # a line longer than a chunk: keep reading
                    pieces.append(data)
                    continue
                chunk, pieces = b"".join((*pieces, memoryview(data)[:cut])), [data[cut:]]
                if utf8:
                    _check_utf8(chunk, offset, path)
                parts.append(offset + _content_line_starts(chunk))
                offset += len(chunk)
                if not data:
                    break
    except OSError as error:
        raise InputError(f"could not read '{path}': {first_line(error)}") from None
    return np.concatenate(parts + [np.array([offset], np.int64)])


def _content_line_starts(chunk: bytes) -> np.ndarray:
    if not chunk:
        return np.zeros(0, np.int64)
    data = np.frombuffer(chunk, np.uint8)
    breaks = data == 10
    if b"\r" in chunk:
        breaks |= data == 13
    breaks = np.flatnonzero(breaks)
    starts = np.concatenate(([0], breaks + 1))
    starts = starts[starts < len(data)]
    # A line holding any byte but ASCII whitespace (\t \n \v \f \r and the space) is a document. Its first byte
    # tells for most lines; an empty line (one that starts at a break) is blank. Only where some line starts with a
    # space, \t, \v or \f are the chunk's bytes read, all at once.
    first = data[starts]
    content = ~ASCII_SPACE[first]
    indented = np.flatnonzero(ASCII_SPACE[first] & (first != 10) & (first != 13))
    if len(indented):
        content[indented] = np.logical_or.reduceat(~ASCII_SPACE[data], starts)[indented]
    return starts[content].astype(np.int64)


def _check_utf8(chunk: bytes, offset: int, path: Path) -> None:
    if _is_utf8(chunk):
        return
    try:  # decoding finds where the first bad byte is
        chunk.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"could not read '{path}' as text: byte {offset + error.start} is not UTF-8; give UTF-8 "
                         f"text") from None


def _csv_records(path: Path) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """The header of a CSV file, where it and each record after it end, and its first SCHEMA_RECORDS records."""
    csv.field_size_limit(CSV_FIELD_LIMIT)  # documents are long fields; the default limit is 128 KB
    ends, head, position = array("q"), [], 0
    try:
        with open(path, "rb") as handle:
            def lines():
                nonlocal position
                for line in handle:
                    position += len(line)
                    yield line.decode("utf-8")

            records = csv.reader(lines())
            header = next((row for row in records if row), [])
            ends.append(position)
            for row in records:  # the reader asks for no line beyond the record it returns
                if row:
                    ends.append(position)
                    if len(head) < SCHEMA_RECORDS:
                        head.append(row)
    except (OSError, ValueError, csv.Error) as error:
        raise InputError(f"could not read '{path}' as csv: {first_line(error)}") from None
    return header, np.frombuffer(ends, np.int64).copy(), head


def _csv_dtype(records: list[list[str]], index: int) -> str:
    """The type pandas would give the column from these records: int64 or float64 when every value is a number."""
    values = [row[index] for row in records if index < len(row) and row[index] not in CSV_MISSING]
    for dtype, parse in (("int64", int), ("float64", float)):
        if values and all(_is_number(value, parse) for value in values):
            return dtype
    return "string"


def _is_number(value: str, parse) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return "_" not in value  # Python reads 1_000 as a number, pandas does not


def _arrow_batches(path: Path, corpus: Corpus):
    """(text offsets in the file, null rows) of each record batch of a save_to_disk Arrow file.

    The file is mapped only while its batches' headers and offsets are read: the text itself is never touched here.
    """
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            whole = source.read_buffer()
            reader = pa.ipc.open_stream(whole)
            column_type = reader.schema.field(corpus.column).type if corpus.column in reader.schema.names else None
            corpus.check_column(reader.schema.names, _arrow_dtype(column_type))
            for batch in reader:
                text = batch.column(corpus.column)
                data = text.buffers()[2]
                base = 0
                if data is not None and data.size:
                    base = data.address - whole.address
                    if not 0 <= base <= whole.size - data.size:  # decompressed or copied elsewhere by pyarrow
                        raise InputError(f"could not read '{path}' as Arrow in place: its batches are compressed; "
                                         f"save the dataset again with save_to_disk")
                offsets, nulls = _offsets_and_nulls(text)
                yield base + offsets, nulls
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"could not read '{path}' as Arrow: {first_line(error)}") from None


def _offsets_and_nulls(text) -> tuple[np.ndarray, np.ndarray]:
    """A string array's len + 1 offsets and its null rows, read from its buffers: pyarrow's own conversions import
    pandas, which would then stay in memory all through training."""
    import pyarrow as pa

    if not len(text):
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    validity, offsets = text.buffers()[:2]
    width = np.int64 if pa.types.is_large_string(text.type) else np.int32
    starts = np.frombuffer(offsets, width)[text.offset:text.offset + len(text) + 1].astype(np.int64)
    nulls = np.zeros(0, np.int64)
    if text.null_count:
        valid = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
        nulls = np.flatnonzero(valid[text.offset:text.offset + len(text)] == 0)
    return starts, nulls


def _arrow_dtype(arrow_type) -> str | None:
    import pyarrow as pa

    if arrow_type is None or pa.types.is_nested(arrow_type):
        return None
    return ARROW_DTYPES.get(str(arrow_type), str(arrow_type))


# --- how a record's bytes become its document ---------------------------------------------------------------------

class RecordFormat:
    kind = ""
    exact_ranges = False  # True: a document's byte range is its UTF-8 text, so sizes need no reading
    in_bulk = False       # True: bulk_column reads many records at once

    def decode(self, raw: bytes, file: int) -> str | None:
        raise NotImplementedError

    def bulk_column(self, data: bytes, starts: np.ndarray, ends: np.ndarray, checked: bool = False):
        """The documents of the records data[starts[i]:ends[i]] as an Arrow string array, or None where they are to
        be read one by one. `checked`: every record was read in bulk before, so it is known to be fit for it."""
        return None

    def size(self, raw: bytes, file: int) -> int:
        text = self.decode(raw, file)
        return len(text.encode("utf-8")) if text else 0


class TextLines(RecordFormat):
    kind = "text"

    def decode(self, raw: bytes, file: int) -> str:
        return raw.splitlines()[0].decode("utf-8")  # a document's range runs on over the blank lines after it

    def size(self, raw: bytes, file: int) -> int:
        return len(raw.splitlines()[0])


class JsonLines(RecordFormat):
    """A record is read with json.loads, which defines what the corpus holds and names a bad record. Many records
    are parsed at once by pyarrow's JSON reader, as fast as the tokenizer needs them, where they are plain enough
    that it reads them as json.loads does (see _plain_json_lines); the others go one by one."""

    kind, in_bulk = "json", True

    def __init__(self, column: str):
        self.column = column

    def record(self, raw: bytes) -> dict:
        record = json.loads(raw.splitlines()[0])
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        return record

    def decode(self, raw: bytes, file: int) -> str | None:
        value = self.record(raw).get(self.column)
        if value is None or isinstance(value, str):
            return value
        raise NotText(JSON_DTYPES.get(type(value)))

    def bulk_column(self, data: bytes, starts: np.ndarray, ends: np.ndarray, checked: bool = False):
        import pyarrow as pa
        import pyarrow.json as pa_json

        if not len(starts) or not (checked or _plain_json_lines(data, starts, ends)):
            return None
        # pyarrow refuses a record that does not fit in a block.
        block_bytes = max(BULK_BLOCK_BYTES, int((ends - starts).max()) + 1)
        try:
            table = pa_json.read_json(
                pa.BufferReader(data), read_options=pa_json.ReadOptions(block_size=block_bytes),
                parse_options=pa_json.ParseOptions(explicit_schema=pa.schema([(self.column, pa.string())]),
                                                   unexpected_field_behavior="ignore"))
        except (pa.ArrowException, ValueError, OverflowError):  # json.loads then says what is wrong, if anything
            return None
        if table.num_rows != len(starts):  # a line holds two objects
            return None
        return table.column(0).combine_chunks()


def _plain_json_lines(data: bytes, starts: np.ndarray, ends: np.ndarray) -> bool:
    """Whether pyarrow.json reads the JSON lines data[starts[i]:ends[i]] as json.loads reads each.

    Both parse the JSON grammar and refuse what breaks it, except where pyarrow is more lenient: it copies bytes
    that are not UTF-8 into its strings, takes the numbers Inf, -Inf and -NaN, and reads any number of objects from
    any number of lines. So the bytes must be UTF-8 with no NUL (json.loads reads some of those as UTF-16), hold no
    such number, and each record must start with "{" and end with "}" before its line break: an object cannot then
    go on past its line (after a "}" inside an object or array, another "{" is an error, and strings hold no line
    break), so as many objects as lines means one object per line.
    """
    view = np.frombuffer(data, np.uint8)
    if b"\x00" in data or _lenient_number(data, view) or not _is_utf8(data):
        return False
    if not np.all(view[starts] == ord("{")):
        return False
    length = ends - starts
    closed = (length >= 3) & (view[ends - 1] == ord("\n")) & (view[ends - 2] == ord("}"))
    closed |= (length >= 4) & (view[ends - 1] == ord("\n")) & (view[ends - 2] == ord("\r")) & \
        (view[ends - 3] == ord("}"))
    # The others: a last record with no line break, or blank lines after a record.
    return all(data[start:end].rstrip(b" \t\r\n").endswith(b"}")
               for start, end in zip(starts[~closed].tolist(), ends[~closed].tolist()))


def _lenient_number(data: bytes, view: np.ndarray) -> bool:
    """Whether `data` may hold -NaN, or Inf or -Inf where a JSON value goes: between a ":", "," or "[" and what may
    follow a value (json refuses them; NaN and Infinity both read). Words such as "Informação" are neither."""
    minus = np.flatnonzero(view[:-3] == ord("-"))
    if np.any((view[minus + 1] == ord("N")) & (view[minus + 2] == ord("a")) & (view[minus + 3] == ord("N"))):
        return True
    capital = np.flatnonzero(view[:-2] == ord("I"))
    capital = capital[(view[capital + 1] == ord("n")) & (view[capital + 2] == ord("f"))]
    ends = capital + 3
    after = np.where(ends < len(view), view[np.minimum(ends, len(view) - 1)], ord(" "))
    for at in capital[VALUE_END[after]].tolist():
        before = at - 1
        while before >= 0 and data[before] in b" \t\r\n-":
            before -= 1
        if before < 0 or data[before] in b":,[":
            return True
    return False


def _is_utf8(data: bytes) -> bool:
    import pyarrow as pa

    text = pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(data)], np.int64)), pa.py_buffer(data))
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


class CsvRecords(RecordFormat):
    kind = "csv"

    def __init__(self, indexes: list[int]):
        self.indexes = indexes  # the column's place in each file's header

    def decode(self, raw: bytes, file: int) -> str | None:
        # A record's range starts after the record before it, so blank lines before it come first.
        record = next(row for row in csv.reader(io.StringIO(raw.decode("utf-8"), newline="\n")) if row)
        index = self.indexes[file]
        value = record[index] if index < len(record) else None
        return None if value is None or value in CSV_MISSING else value


class ArrowTexts(RecordFormat):
    kind, exact_ranges = "Arrow", True

    def decode(self, raw: bytes, file: int) -> str:
        return raw.decode("utf-8")


class IndexedCorpus(Corpus):
    """Documents at known byte ranges of local files, fetched with plain reads.

    The files are cut into segments (a file, or an Arrow record batch), each a run of documents whose ranges follow
    one another: segment s holds documents first[s] .. first[s + 1] - 1, and its document first[s] + j spans
    bounds[first[s] + s + j] .. bounds[first[s] + s + j + 1] of file segment_files[s].
    """

    def __init__(self, name: str, column: str, flag: str, files: list[Path], form: RecordFormat,
                 segments: list[tuple[int, np.ndarray]], nulls: np.ndarray | None = None):
        super().__init__(name, column, flag)
        self.files, self.form = [str(file) for file in files], form
        segments = [(file, bounds) for file, bounds in segments if len(bounds) > 1]
        self.segment_files = np.array([file for file, _ in segments], np.int64)
        self.first = np.concatenate(([0], np.cumsum([len(bounds) - 1 for _, bounds in segments]))).astype(np.int64)
        self.bounds = np.concatenate([bounds for _, bounds in segments]) if segments else np.zeros(1, np.int64)
        self.nulls = nulls if nulls is not None and len(nulls) else None  # sorted positions of missing documents
        self.num_documents = int(self.first[-1])
        self._descriptors = {}
        self._unchecked = None  # edges of the runs of documents that _bulk_sizes left to json.loads, once it ran

    def read_batches(self, positions: np.ndarray, edges: np.ndarray):
        for start, stop in zip(edges[:-1], edges[1:]):
            yield self.texts(positions[start:stop])

    def texts(self, positions) -> list:
        positions = np.asarray(positions, np.int64)
        if self.form.in_bulk:
            texts = [None] * len(positions)
            for indices, raws in self._groups(positions):
                # What a record holds is checked when the sizes are measured; it need not be checked again.
                checked = self._unchecked is not None and \
                    not np.any(np.searchsorted(self._unchecked, positions[indices], side="right") % 2)
                column = self.form.bulk_column(*_joined(raws), checked=checked)
                values = self._decoded(positions[indices], self.form.decode, [None] * len(indices)) \
                    if column is None else column.to_pylist()
                for index, value in zip(indices, values):
                    texts[index] = value
        else:
            texts = self._decoded(positions, self.form.decode, [None] * len(positions))
        if self.nulls is not None:
            for index in np.flatnonzero(np.isin(positions, self.nulls)).tolist():
                texts[index] = None
        return texts

    def document_bytes(self) -> np.ndarray:
        if self._sizes is None:
            everything = np.arange(self.num_documents)
            if self.form.exact_ranges:
                ranges = everything + np.searchsorted(self.first, everything, side="right") - 1
                sizes = self.bounds[ranges + 1] - self.bounds[ranges]
            elif self.form.in_bulk:
                sizes = self._bulk_sizes()
            else:
                sizes = np.zeros(self.num_documents, np.int64)
                for first in range(0, self.num_documents, SIZE_BATCH):
                    batch = everything[first:first + SIZE_BATCH]
                    sizes[batch] = self._decoded(batch, self.form.size, [0] * len(batch))
            if self.nulls is not None:
                sizes[self.nulls] = 0
            self._sizes = sizes
        return self._sizes

    def _bulk_sizes(self) -> np.ndarray:
        """document_bytes, the records parsed BULK_BYTES at a time in file order, two such runs at once (one is
        checked while pyarrow parses the other)."""
        from concurrent.futures import ThreadPoolExecutor

        sizes, unchecked, pending = np.zeros(self.num_documents, np.int64), [], deque()

        def measure(documents: np.ndarray, parsed) -> None:
            column = parsed.result()
            if column is None:
                sizes[documents] = self._decoded(documents, self.form.size, [0] * len(documents))
                unchecked.extend((documents[0], documents[-1] + 1))
            else:
                offsets, nulls = _offsets_and_nulls(column)
                sizes[documents] = np.diff(offsets)
                sizes[documents[nulls]] = 0

        with ThreadPoolExecutor(2) as pool:
            for segment, file in enumerate(self.segment_files.tolist()):
                first, count = int(self.first[segment]), int(self.first[segment + 1] - self.first[segment])
                bounds = self.bounds[first + segment:first + segment + count + 1]
                begin = 0
                while begin < count:
                    end = max(begin + 1, int(np.searchsorted(bounds, bounds[begin] + BULK_BYTES, side="right")) - 1)
                    data = self._read(file, int(bounds[begin]), int(bounds[end]))
                    pending.append((np.arange(first + begin, first + end), pool.submit(
                        self.form.bulk_column, data, bounds[begin:end] - bounds[begin],
                        bounds[begin + 1:end + 1] - bounds[begin])))
                    if len(pending) == 2:
                        measure(*pending.popleft())
                    begin = end
            while pending:
                measure(*pending.popleft())
        self._unchecked = np.array(unchecked, np.int64)
        return sizes

    def _groups(self, positions: np.ndarray):
        """(indices into positions, records) of the documents at `positions` in file order, a group of reads of
        about BULK_BYTES at a time."""
        order, files, starts, stops, reads = self._plan_reads(positions)
        ends = np.append(reads[1:], len(order))
        bases, tops = starts[reads], stops[ends - 1]
        before = np.cumsum(tops - bases) - (tops - bases)
        groups = np.append(np.flatnonzero(np.diff(before // BULK_BYTES, prepend=-1)), len(reads))
        for low, high in zip(groups[:-1].tolist(), groups[1:].tolist()):
            read = self._read
            data = [read(file, base, top) for file, base, top in
                    zip(files[reads[low:high]].tolist(), bases[low:high].tolist(), tops[low:high].tolist())]
            first, last, counts = reads[low], ends[high - 1], ends[low:high] - reads[low:high]
            if np.any(counts > 1):  # reads of several documents: cut them apart
                which = np.repeat(np.arange(high - low), counts)
                offsets = bases[low:high][which]
                data = [data[i][a:b] for i, a, b in zip(which.tolist(), (starts[first:last] - offsets).tolist(),
                                                        (stops[first:last] - offsets).tolist())]
            yield order[first:last].tolist(), data

    def records(self, positions: np.ndarray) -> list[dict]:
        """The JSON objects of the JSON Lines records at `positions`."""
        return self._decoded(positions, lambda raw, file: self.form.record(raw), [None] * len(positions))

    def _decoded(self, positions: np.ndarray, decode, out: list) -> list:
        """`out` with decode(raw, file) of each document at `positions` put in its place."""
        index = -1
        try:
            for index, file, raw in self._raw(positions):
                out[index] = decode(raw, file)
        except NotText as error:
            raise self.not_text(error.dtype) from None
        except (ValueError, csv.Error) as error:
            position = int(positions[index])
            segment = np.searchsorted(self.first, position, side="right") - 1
            path = self.files[self.segment_files[segment]]
            raise InputError(f"could not read '{path}' as {self.form.kind}: record {position - self.first[segment] + 1}"
                             f" ({first_line(error)}); fix or remove it") from None
        return out

    def _raw(self, positions: np.ndarray):
        """(index in `positions`, file, bytes) of each document, in file order: neighbours share one read."""
        order, files, starts, stops, reads = self._plan_reads(positions)
        order, files, starts, stops = order.tolist(), files.tolist(), starts.tolist(), stops.tolist()
        reads = reads.tolist() + [len(order)]
        for first, end in zip(reads[:-1], reads[1:]):
            base = starts[first]
            data = self._read(files[first], base, stops[end - 1])
            for k in range(first, end):
                yield order[k], files[k], data[starts[k] - base:stops[k] - base]

    def _plan_reads(self, positions: np.ndarray):
        """The documents at `positions` in file order (their indices in `positions`, files, start and stop
        offsets), and where each read starts among them: neighbours share one read."""
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        segment = np.searchsorted(self.first, ordered, side="right") - 1
        starts, stops = self.bounds[ordered + segment], self.bounds[ordered + segment + 1]
        files = self.segment_files[segment]
        new_read = np.ones(len(ordered), bool)
        new_read[1:] = (files[1:] != files[:-1]) | (starts[1:] > stops[:-1] + READ_GAP) | \
            (starts[1:] // READ_SPAN != starts[:-1] // READ_SPAN)
        return order, files, starts, stops, np.flatnonzero(new_read)

    def _read(self, file: int, start: int, stop: int) -> bytes:
        try:
            if file not in self._descriptors:
                if len(self._descriptors) >= OPEN_FILES:
                    os.close(self._descriptors.pop(next(iter(self._descriptors))))
                self._descriptors[file] = os.open(self.files[file], os.O_RDONLY)
            data = os.pread(self._descriptors[file], stop - start, start)
        except OSError as error:
            raise InputError(f"could not read '{self.files[file]}': {first_line(error)}") from None
        if len(data) != stop - start:
            raise InputError(f"'{self.files[file]}' changed while it was read; read it again once it is complete")
        return data

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def _joined(raws: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The records one after another, each on lines of its own, and where each starts and ends."""
    lengths = np.fromiter(map(len, raws), np.int64, len(raws))
    ends = np.cumsum(lengths + 1) - 1
    return b"\n".join(raws), ends - lengths, ends


# --- parquet ---------------------------------------------------------------------------------------------------

class ParquetCorpus(Corpus):
    """Parquet files, decoded a record batch of about SCAN_BYTES at a time, row group by row group."""

    def __init__(self, name: str, column: str, flag: str, files: list[Path]):
        import pyarrow.parquet as pq

        super().__init__(name, column, flag)
        self.files, self.groups, self._open = [str(file) for file in files], [], (None, None)
        for number, path in enumerate(self.files):
            try:
                with pq.ParquetFile(path) as parquet:
                    schema, metadata = parquet.schema_arrow, parquet.metadata
            except (OSError, ValueError) as error:  # pyarrow's errors are both
                raise InputError(f"could not read '{path}' as parquet: {first_line(error)}") from None
            self.check_column(schema.names, _arrow_dtype(schema.field(column).type) if column in schema.names
                              else None)
            leaf = next(i for i in range(metadata.num_columns) if metadata.schema.column(i).path == column)
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                text_bytes = metadata.row_group(group).column(leaf).total_uncompressed_size
                if rows:  # decoded about SCAN_BYTES of text at a time
                    self.groups.append((number, group, rows, max(1, SCAN_BYTES * rows // max(1, text_bytes))))
        self.first = np.concatenate(([0], np.cumsum([rows for _, _, rows, _ in self.groups]))).astype(np.int64)
        self.num_documents = int(self.first[-1])

    def read_batches(self, positions: np.ndarray, edges: np.ndarray):
        positions = np.asarray(positions, np.int64)
        if np.all(positions[1:] >= positions[:-1]):
            texts = self._scan(positions)
            for start, stop in zip(edges[:-1], edges[1:]):
                yield list(islice(texts, stop - start))
            return
        # Out of order: gather a window of batches at a time in one pass, then hand its batches out.
        before = np.concatenate(([0], np.cumsum(self.document_bytes()[positions])))[edges]
        window = 0
        while window < len(edges) - 1:
            end = max(window + 1, int(np.searchsorted(before, before[window] + WINDOW_BYTES, side="right")) - 1)
            wanted, where = np.unique(positions[edges[window]:edges[end]], return_inverse=True)
            gathered = np.empty(len(wanted), object)
            gathered[:] = list(self._scan(wanted))
            for start, stop in zip(edges[window:end], edges[window + 1:end + 1]):
                yield gathered[where[start - edges[window]:stop - edges[window]]].tolist()
            window = end

    def document_bytes(self) -> np.ndarray:
        if self._sizes is None:
            parts = []
            for group in range(len(self.groups)):
                for batch in self._batches(group):
                    offsets, nulls = _offsets_and_nulls(batch.column(0))
                    sizes = np.diff(offsets)
                    sizes[nulls] = 0
                    parts.append(sizes)
            self._sizes = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._sizes

    def _scan(self, wanted: np.ndarray):
        """The documents at sorted positions `wanted`, one by one; row groups that hold none are not read."""
        import pyarrow as pa

        groups = np.searchsorted(self.first, wanted, side="right") - 1
        cuts = np.flatnonzero(np.diff(groups)) + 1
        for rows, group in zip(np.split(wanted, cuts), groups[np.concatenate(([0], cuts))] if len(wanted) else []):
            rows, start = rows - self.first[group], 0
            for batch in self._batches(group):
                end = start + batch.num_rows
                low, high = np.searchsorted(rows, [start, end])
                if high > low:
                    taken = np.ascontiguousarray(rows[low:high] - start, np.int64)
                    indices = pa.Array.from_buffers(pa.int64(), len(taken), [None, pa.py_buffer(taken)])
                    yield from batch.column(0).take(indices).to_pylist()
                if high == len(rows):
                    break
                start = end

    def _batches(self, group: int):
        number, index, _, scan_rows = self.groups[group]
        return self._parquet(number).iter_batches(batch_size=scan_rows, row_groups=[index], columns=[self.column])

    def _parquet(self, number: int):
        import pyarrow.parquet as pq

        if self._open[0] != number:
            self.close()
            self._open = (number, pq.ParquetFile(self.files[number]))
        return self._open[1]

    def close(self) -> None:
        if self._open[1] is not None:
            self._open[1].close()
        self._open = (None, None)


# --- Hub streams -------------------------------------------------------------------------------------------------

class StreamedCorpus(Corpus):
    """A Hub dataset read as a stream: documents in its order only, counted once its sizes are measured."""

    random_access = False

    def __init__(self, name: str, column: str, flag: str, stream):
        super().__init__(name, column, flag)
        self.stream, self.num_documents = stream, None

    @classmethod
    def open(cls, name: str, split: str, column: str, flag: str, token: str | None, shuffle_seed: int | None):
        import datasets

        datasets.disable_progress_bars()
        try:
            stream = datasets.load_dataset(name, split=split, streaming=True, token=token)
        except Exception as error:  # the Hub's errors are many; the user needs the gist in one line
            raise InputError(f"could not load dataset '{name}' split '{split}' from the Hub: "
                             f"{first_line(error)}") from None
        if shuffle_seed is not None:
            stream = stream.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
        corpus = cls(name, column, flag, stream)
        first = next(corpus._rows(), None)
        if first is None:
            corpus.num_documents = 0
        else:
            features = stream.features
            dtype = getattr(features[column], "dtype", None) if features and column in features else \
                JSON_DTYPES.get(type(first.get(column)), "string" if first.get(column) is None else None)
            corpus.check_column(list(features or first), dtype)
        return corpus

    def documents(self):
        """Every document (str, or None when missing), in the stream's order."""
        for row in self._rows():
            value = row.get(self.column)
            if value is not None and not isinstance(value, str):
                raise self.not_text(JSON_DTYPES.get(type(value)))
            yield value

    def document_bytes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.fromiter((len(text.encode("utf-8")) if text else 0 for text in self.documents()),
                                      np.int64)
            self.num_documents = len(self._sizes)
        return self._sizes

    def read_batches(self, positions: np.ndarray, edges: np.ndarray):
        """As Corpus.read_batches, for increasing positions: the stream is read once more, from its start."""
        positions = np.asarray(positions, np.int64)
        if np.any(positions[1:] <= positions[:-1]):
            raise ValueError("a stream is read in its own order: positions must increase")
        wanted = iter(positions.tolist())
        documents = self._at(wanted, iter(enumerate(self.documents())))
        for start, stop in zip(edges[:-1], edges[1:]):
            yield list(islice(documents, stop - start))

    def _at(self, wanted, documents):
        for position in wanted:
            for index, text in documents:
                if index == position:
                    break
            else:
                raise InputError(f"dataset '{self.name}' gave fewer documents on a second reading; read it when "
                                 f"it is not changing")
            if self._sizes is not None and len(text.encode("utf-8") if text else b"") != self._sizes[position]:
                raise InputError(f"dataset '{self.name}' gave other documents on a second reading (document "
                                 f"{position}); read it when it is not changing")
            yield text

    def _rows(self):
        rows = iter(self.stream)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as error:  # network and Hub errors alike: the gist in one line
                raise InputError(f"could not read dataset '{self.name}' from the Hub: {first_line(error)}") from None
            yield row
