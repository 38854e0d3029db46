"""pretrain/data/tokenized_folder.py and pretrain/data/batches.py on small parquet folders written here: counts,
order, resume, process shares, refusals."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pretrain.data import batches as batches_module
from pretrain.data import tokenized_folder
from pretrain.data.batches import TrainBatches, eval_batches
from pretrain.data.manifest import sha256_file
from pretrain.data.tokenized_folder import open_tokenized_folder
from pretrain.errors import InputError
from tests.helpers.runs import TEST_BLOCK_SIZE, TEST_VOCAB_SIZE
from tests.helpers.tokenized import BLOCK, VOCAB, blocks, ids_of, list_column, make_folder, write_file


def open_folder(folder, **options):
    options = {"block_size": BLOCK, "vocab_size": VOCAB, **options}
    return open_tokenized_folder(folder, **options)


@pytest.fixture
def decoded_rows(monkeypatch):
    """(where, rows) of every piece decoded from parquet from now on, by every reader of every split."""
    pieces = []
    decode = tokenized_folder.decode_rows

    def counted(column, block_size, vocab_size, where):
        rows = decode(column, block_size, vocab_size, where)
        pieces.append((where, len(rows)))
        return rows

    monkeypatch.setattr(tokenized_folder, "decode_rows", counted)
    return pieces


def rows_decoded(pieces, split="train"):
    return sum(rows for where, rows in pieces if f"/{split}/" in where)


def take(batches, count):
    return [next(batches) for _ in range(count)]


def stream_ids(split, count, **options):
    batches = TrainBatches(split, **{"micro_batch_size": 4, "process_index": 0, "num_processes": 1, "seed": 7,
                                     "window_blocks": 16, **options})
    try:
        return [ids_of(b) for b in take(batches, count)]
    finally:
        batches.close()


# ------------------------------------------------------------------------------------------------ opening, reading

@pytest.mark.parametrize("layout", ["ours", "published"])
def test_counts_come_from_footers_and_rows_read_back_in_order(tmp_path, layout, decoded_rows):
    folder = make_folder(tmp_path, layout=layout, manifest=False)
    train, test = open_folder(folder)
    assert (train.num_blocks, test.num_blocks, train.block_size) == (57, 13, BLOCK)
    assert (train.name, test.name) == ("train", "test")
    assert repr(train) == "TokenizedSplit('train', num_blocks=57, block_size=4)"
    # Opening decodes only a sample (first rows of a few row groups), never the data.
    assert 0 < rows_decoded(decoded_rows) <= tokenized_folder.SAMPLE_ROW_GROUPS * 10
    rows = train.read_blocks([56, 3, 30, 3, 0])
    assert rows.dtype == np.int64 and rows.shape == (5, BLOCK)
    np.testing.assert_array_equal(rows, blocks(0, 57)[[56, 3, 30, 3, 0]])
    assert ids_of(test.read_blocks(range(13))) == list(range(10_000, 10_013))
    with pytest.raises(IndexError):
        train.read_blocks([57])


def test_reads_what_tokenize_dataset_wrote(sample_tokenized, sample_tokenizer):
    sha256 = sha256_file(sample_tokenizer / "tokenizer.json")
    train, test = open_tokenized_folder(sample_tokenized, block_size=TEST_BLOCK_SIZE, vocab_size=TEST_VOCAB_SIZE,
                                        tokenizer_sha256=sha256)
    manifest = json.loads((sample_tokenized / "manifest.json").read_text())
    assert (train.num_blocks, test.num_blocks) == (manifest["splits"]["train"]["blocks"],
                                                   manifest["splits"]["test"]["blocks"])
    everything = train.read_blocks(range(train.num_blocks))
    batches = TrainBatches(train, micro_batch_size=1, process_index=0, num_processes=1, seed=0, window_blocks=8)
    epoch = torch.cat(take(batches, train.num_blocks)).numpy()
    batches.close()
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, everything))
    with pytest.raises(InputError, match="made with another tokenizer"):
        open_tokenized_folder(sample_tokenized, block_size=TEST_BLOCK_SIZE, vocab_size=TEST_VOCAB_SIZE,
                              tokenizer_sha256="0" * 64)


def test_sanity_check_keeps_the_first_blocks(tmp_path):
    folder = make_folder(tmp_path, num_train=1234, num_test=150, row_group_rows=300, files=2, manifest=False)
    train, test = open_folder(folder, sanity_check=True)
    assert (train.num_blocks, test.num_blocks) == (1000, 100)
    assert ids_of(train.read_blocks(range(1000))) == list(range(1000))
    assert sorted(sum(stream_ids(train, 250, micro_batch_size=4), [])) == list(range(1000))
    small = make_folder(tmp_path / "small", num_train=57, num_test=13, manifest=False)
    assert [s.num_blocks for s in open_folder(small, sanity_check=True)] == [57, 13]


def test_split_not_needed_may_be_missing(tmp_path):
    folder = make_folder(tmp_path, num_test=0, manifest=False)
    train, test = open_folder(folder, need_test=False)
    assert train.num_blocks == 57 and test is None
    (folder / "train").rename(folder / "elsewhere")
    train, test = open_folder(folder, need_train=False, need_test=False)
    assert train is None and test is None


def test_reading_writes_nothing(tmp_path):
    folder = make_folder(tmp_path)
    before = sorted((p.relative_to(tmp_path), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    train, test = open_folder(folder)
    stream_ids(train, 40)
    list(eval_batches(test, batch_size=4, process_index=0, num_processes=1))
    after = sorted((p.relative_to(tmp_path), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert before == after


def test_empty_files_and_row_groups_are_skipped(tmp_path):
    folder = tmp_path / "gaps"
    write_file(folder / "train" / "a.parquet", blocks(0, 5))
    with pq.ParquetWriter(folder / "train" / "b.parquet", pa.schema([("input_ids", pa.list_(pa.int32()))])) as writer:
        writer.write_table(pa.table({"input_ids": list_column(blocks(5, 3))}))
        writer.write_table(pa.table({"input_ids": list_column(blocks(0, 0))}))
        writer.write_table(pa.table({"input_ids": list_column(blocks(8, 4))}))
    write_file(folder / "train" / "c.parquet", blocks(0, 0))
    assert pq.ParquetFile(folder / "train" / "b.parquet").metadata.row_group(1).num_rows == 0
    train, _ = open_folder(folder, need_test=False)
    assert train.num_blocks == 12 and len(train.row_groups) == 3
    assert sorted(sum(stream_ids(train, 3, window_blocks=5), [])) == list(range(12))


def test_huge_row_groups_are_streamed_in_pieces(tmp_path, decoded_rows):
    """A row group larger than a piece and than a window: read in pieces, each row decoded once per epoch."""
    folder = tmp_path / "big"
    write_file(folder / "train" / "a.parquet", blocks(0, 2500), row_group_rows=100_000)
    write_file(folder / "train" / "b.parquet", blocks(2500, 700), row_group_rows=100_000)
    train, _ = open_folder(folder, need_test=False)
    assert len(train.row_groups) == 2 and train.num_blocks == 3200
    np.testing.assert_array_equal(train.read_blocks(range(1000, 2600)), blocks(1000, 1600))
    decoded_rows.clear()
    batches = TrainBatches(train, micro_batch_size=50, process_index=0, num_processes=1, seed=3,
                           window_blocks=600, prefetch=0)
    epoch = sum((ids_of(b) for b in take(batches, 64)), [])
    assert sorted(epoch) == list(range(3200)) and epoch != list(range(3200))
    assert rows_decoded(decoded_rows) == 3200
    assert max(rows for _, rows in decoded_rows) == tokenized_folder.PIECE_ROWS
    batches.close()


# ------------------------------------------------------------------------------------------------------ the order

def test_same_seed_same_order_other_seed_other_order(tmp_path):
    train, _ = open_folder(make_folder(tmp_path))
    assert stream_ids(train, 30) == stream_ids(train, 30)
    assert stream_ids(train, 30) != stream_ids(train, 30, seed=8)


def test_each_epoch_is_a_permutation_of_all_blocks(tmp_path):
    train, _ = open_folder(make_folder(tmp_path))          # 57 blocks: epochs end inside micro-batches
    stream = sum(stream_ids(train, 3 * 57 // 4 + 1), [])
    epochs = [stream[e * 57:(e + 1) * 57] for e in range(3)]
    assert all(sorted(epoch) == list(range(57)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(57))


def test_windows_hold_consecutive_rows_of_the_permuted_row_groups(tmp_path):
    train, _ = open_folder(make_folder(tmp_path))
    epoch = sum(stream_ids(train, 57 // 4 + 1, window_blocks=16), [])[:57]
    order, _ = batches_module._EpochOrder(train, 7, 16).group_order(0)
    sequence = sum((list(range(train.row_group_starts[g], train.row_group_starts[g + 1])) for g in order), [])
    assert [sorted(epoch[w:w + 16]) for w in range(0, 57, 16)] == [sorted(sequence[w:w + 16]) for w in range(0, 57, 16)]


@pytest.mark.parametrize("start_batch", [1, 9, 40])
def test_resume_gives_the_tail_of_the_stream(tmp_path, start_batch):
    train, _ = open_folder(make_folder(tmp_path))
    full = stream_ids(train, start_batch + 10)
    assert stream_ids(train, 10, start_sample=start_batch * 4) == full[start_batch:]


def test_resume_reads_only_what_it_needs(tmp_path, decoded_rows):
    folder = make_folder(tmp_path, num_train=2000, row_group_rows=50, files=4)
    train, _ = open_folder(folder)
    decoded_rows.clear()
    start = 7 * 2000 + 1500                                 # deep in epoch 7
    batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=1,
                           start_sample=start, window_blocks=100, prefetch=0)
    first = next(batches)
    # One window (100 rows) plus the skipped start of at most one row group on each side of it.
    assert 100 <= rows_decoded(decoded_rows) <= 100 + 2 * 50
    uninterrupted = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=1,
                                 window_blocks=100, prefetch=0)
    batches_before = start // 4
    for _ in range(batches_before):
        next(uninterrupted)
    np.testing.assert_array_equal(next(uninterrupted), first)
    assert batches.samples_consumed == start + 4 and uninterrupted.samples_consumed == start + 4


@pytest.mark.parametrize("num_processes", [2, 3])
def test_process_shares_split_the_single_process_stream(tmp_path, num_processes):
    train, _ = open_folder(make_folder(tmp_path))
    single = stream_ids(train, 20, micro_batch_size=2 * num_processes)
    shares = [stream_ids(train, 20, micro_batch_size=2, process_index=r, num_processes=num_processes)
              for r in range(num_processes)]
    for k in range(20):
        assert sum((share[k] for share in shares), []) == single[k]


def test_resume_with_another_number_of_processes(tmp_path):
    train, _ = open_folder(make_folder(tmp_path))
    single = sum(stream_ids(train, 30, micro_batch_size=4), [])
    # 10 micro-batches of 4 were taken on one process; continue on 3 processes of 2 (40 is not a multiple of 6).
    shares = [stream_ids(train, 5, micro_batch_size=2, process_index=r, num_processes=3, start_sample=40)
              for r in range(3)]
    assert sum((shares[r][k] for k in range(5) for r in range(3)), []) == single[40:70]


def test_prefetch_thread_gives_the_same_batches_and_stops(tmp_path):
    train, _ = open_folder(make_folder(tmp_path))
    assert stream_ids(train, 25, prefetch=0) == stream_ids(train, 25, prefetch=3)
    batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=7, prefetch=1,
                           window_blocks=16)
    thread = batches._thread
    time.sleep(0.3)                       # a full queue: the thread waits, retrying, until a batch is taken
    assert [ids_of(b) for _, b in zip(range(3), batches)] == stream_ids(train, 3) and thread.is_alive()
    batches.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(batches)
    # What the thread decodes ahead while the queue is full: the next window, or the next epoch's first one.
    ahead = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=7, prefetch=0,
                         window_blocks=16)
    ahead._make(0)
    ahead._decode_ahead()
    assert list(ahead._streams[0].windows) == [(0, 0), (0, 1)]
    ahead._make(13)                             # samples 52-55: the last of the epoch's four windows
    ahead._decode_ahead()
    assert list(ahead._streams[0].windows) == [(0, 1), (0, 3), (1, 0)]
    assert batches.samples_consumed == 12


def test_pin_memory_pins_only_with_cuda(tmp_path, monkeypatch):
    train, _ = open_folder(make_folder(tmp_path))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(True) or self)
    batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=0, pin_memory=True,
                           prefetch=0)
    next(batches)
    assert pinned == [] if not torch.cuda.is_available() else pinned == [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=0, pin_memory=True,
                           prefetch=0)
    assert next(batches).dtype == torch.int64 and pinned[-1:] == [True]


def test_bad_rows_found_while_training_stop_the_stream(tmp_path):
    """Ids out of range in a row group with no statistics, past the sample: the consumer gets the InputError."""
    folder = tmp_path / "late"
    for number in range(6):
        rows = blocks(number * 10, 10)
        if number == 1:
            rows[5, 1] = VOCAB + 5
        write_file(folder / "train" / f"{number}.parquet", rows, write_statistics=False)
    train, _ = open_folder(folder, need_test=False)
    for prefetch in (0, 2):
        batches = TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=0,
                               prefetch=prefetch)
        with pytest.raises(InputError, match=f"1.parquet.*token id {VOCAB + 5}"):
            take(batches, 20)
        batches.close()


def test_eval_batches_cover_every_row_once_on_any_number_of_processes(tmp_path):
    _, test = open_folder(make_folder(tmp_path, num_test=13))
    for num_processes in (1, 2, 3, 4, 5, 14, 16):
        for batch_size in (1, 3, 4, 8):
            per_process = [list(eval_batches(test, batch_size=batch_size, process_index=r,
                                             num_processes=num_processes)) for r in range(num_processes)]
            assert len({len(batches) for batches in per_process}) == 1
            weighted = []
            for batches in per_process:
                for input_ids, weight in batches:
                    assert input_ids.shape == (batch_size, BLOCK) and input_ids.dtype == torch.int64
                    assert weight.dtype == torch.float32 and set(weight.tolist()) <= {0.0, 1.0}
                    weighted += ids_of(input_ids[weight == 1])
                    assert (input_ids[weight == 0] == 0).all()
            assert sorted(weighted) == list(range(10_000, 10_013)), (num_processes, batch_size)


def test_arguments_are_checked(tmp_path):
    train, test = open_folder(make_folder(tmp_path))
    with pytest.raises(ValueError):
        TrainBatches(train, micro_batch_size=4, process_index=2, num_processes=2, seed=0)
    with pytest.raises(ValueError):
        TrainBatches(train, micro_batch_size=4, process_index=0, num_processes=1, seed=-1)
    with pytest.raises(ValueError):
        next(eval_batches(test, batch_size=0, process_index=0, num_processes=1))


# ------------------------------------------------------------------------------------------------------ refusals

def refused(folder, match, **options):
    with pytest.raises(InputError, match=match) as caught:
        open_folder(folder, **options)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_refuses_missing_empty_and_partial_folders(tmp_path):
    refused(tmp_path / "nowhere", "does not exist")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "is not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is empty")
    folder = make_folder(tmp_path, num_test=0, manifest=False)
    refused(folder, r"no parquet files in test/")
    (folder / "train" / "notes.txt").write_text("x")
    for p in (folder / "train").glob("*.parquet"):
        p.unlink()
    refused(folder, r"no parquet files in train/", need_test=False)


def test_refuses_files_that_are_not_token_blocks(tmp_path):
    folder = tmp_path / "columns"
    (folder / "train").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a", "b"]}), folder / "train" / "a.parquet")
    assert "columns: text" in refused(folder, "no 'input_ids' column", need_test=False)
    pq.write_table(pa.table({"input_ids": ["a", "b"]}), folder / "train" / "a.parquet")
    refused(folder, "not a list of integer token ids", need_test=False)
    (folder / "train" / "a.parquet").write_bytes(b"not parquet at all")
    refused(folder, "not a readable parquet file", need_test=False)
    pq.write_table(pa.table({"input_ids": list_column(blocks(0, 0))}), folder / "train" / "a.parquet")
    refused(folder, "holds no blocks", need_test=False)
    column = list_column(blocks(0, 3))
    with_null = pa.ListArray.from_arrays(column.offsets, column.values, mask=pa.array([False, True, False]))
    pq.write_table(pa.table({"input_ids": with_null}), folder / "train" / "a.parquet")
    refused(folder, r"missing \(null\) rows", need_test=False)          # seen in the footer's statistics
    null_id = pa.ListArray.from_arrays(column.offsets, pa.array([0, None] + list(range(2, 12)), type=pa.int32()))
    pq.write_table(pa.table({"input_ids": null_id}), folder / "train" / "a.parquet", write_statistics=False)
    refused(folder, r"missing \(null\) rows or token ids", need_test=False)   # seen when decoding the sample


def test_refuses_rows_of_another_length(tmp_path):
    folder = make_folder(tmp_path, block_size=6, manifest=False)
    assert "rows of 6 tokens" in refused(folder, "block size is 4")
    uneven = tmp_path / "uneven"       # same total as 4-token rows, so only decoding the rows finds it
    offsets = np.array([0, 3, 8, 12, 16], dtype=np.int32)
    write_file(uneven / "train" / "a.parquet", blocks(0, 4))
    pq.write_table(pa.table({"input_ids": list_column(blocks(0, 4), offsets=offsets)}),
                   uneven / "train" / "a.parquet")
    refused(uneven, "rows of 3 tokens but the block size is 4", need_test=False)
    fixed = tmp_path / "fixed"
    (fixed / "train").mkdir(parents=True)
    values = pa.array(np.arange(30, dtype=np.int32))
    pq.write_table(pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, 5)}), fixed / "train" / "a.parquet")
    refused(fixed, "rows of 5 tokens but the block size is 4", need_test=False)
    train, _ = open_folder(fixed, block_size=5, need_test=False)
    np.testing.assert_array_equal(train.read_blocks([1, 0]), np.arange(30).reshape(6, 5)[[1, 0]])


def test_refuses_token_ids_outside_the_vocabulary(tmp_path):
    folder = make_folder(tmp_path, manifest=False)                 # test's first row group reaches 10_009 * 4 + 3
    assert "token id 40039" in refused(folder, "at or above the vocabulary size 40000", vocab_size=40_000)
    no_statistics = tmp_path / "no-statistics"                      # found by decoding the sample instead
    write_file(no_statistics / "train" / "a.parquet", blocks(0, 30), write_statistics=False)
    refused(no_statistics, r"\(row group 1\) holds token id 79, at or above the vocabulary size 50", vocab_size=50,
            need_test=False)
    negative = tmp_path / "negative"
    write_file(negative / "train" / "a.parquet", -blocks(1, 3))
    refused(negative, "negative token id", need_test=False)


def test_refuses_a_manifest_that_disagrees(tmp_path):
    folder = make_folder(tmp_path)
    train, test = open_folder(folder, tokenizer_sha256="a" * 64)
    assert train.num_blocks == 57
    refused(folder, "blocks of 4 tokens .* data_args.block_size is 8", block_size=8)
    refused(folder, "made with another tokenizer", tokenizer_sha256="b" * 64)
    refused(folder, f"tokenizer has {VOCAB} tokens .* vocabulary is {VOCAB - 1}", vocab_size=VOCAB - 1)
    record = json.loads((folder / "manifest.json").read_text())
    record["splits"]["train"]["blocks"] += 1
    record["splits"]["train"]["tokens"] += BLOCK
    record["splits"]["train"]["shards"][0]["blocks"] += 1
    (folder / "manifest.json").write_text(json.dumps(record))
    refused(folder, "records 58 train blocks but train/ holds 57")

