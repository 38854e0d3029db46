"""pretrain/data/mixture.py and mixtures in the train stream: the schedule's bound at every sample, each source's share
of real batches, passes over a small source, resume, process shares, the spec field and the refusals."""

import numpy as np
import pytest

from pretrain.data.batches import TrainBatches
from pretrain.data.manifest import write_manifest
from pretrain.data.mixture import MixtureSchedule, check_agreement, open_sources, source_names
from pretrain.errors import InputError
from tests.helpers.tokenized import BLOCK, VOCAB, blocks, ids_of, manifest_for, write_file

# Source s holds rows numbered from s * 1_000: a row's ids say which source it came from and which row it is.
OFFSET = 1_000


def source_folder(root, name, index, num_train, num_test=5, sha="a" * 64):
    folder = root / name
    write_file(folder / "train" / "part-00000.parquet", blocks(index * OFFSET, num_train), row_group_rows=10)
    write_file(folder / "test" / "part-00000.parquet", blocks(index * OFFSET + 500, num_test), row_group_rows=10)
    write_manifest(folder, manifest_for(folder, num_train, num_test, sha=sha))
    return folder


def open_mixture(root, weights: dict, sizes: dict):
    folders = {str(source_folder(root, name, i, sizes[name])): weight
               for i, (name, weight) in enumerate(weights.items())}
    return open_sources(folders, block_size=BLOCK, vocab_size=VOCAB)


def mixture_batches(sources, **options):
    options = {"micro_batch_size": 4, "process_index": 0, "num_processes": 1, "seed": 5, "prefetch": 0, **options}
    return TrainBatches([s.train for s in sources], weights=[s.weight for s in sources], **options)


@pytest.mark.parametrize("weights", [[3, 1], [1, 1, 1], [0.7, 0.2, 0.05, 0.05], [5, 3, 1, 1, 0.5, 0.01]])
def test_every_source_stays_within_one_sample_of_its_share_after_every_sample(weights):
    schedule = MixtureSchedule(weights)
    shares = np.asarray(weights) / sum(weights)
    counts = [0] * len(weights)
    sources = schedule.assign(counts, 0, 20_000)
    drawn = np.cumsum(np.eye(len(weights), dtype=np.int64)[sources], axis=0)      # [n, sources]
    expected = np.arange(1, 20_001)[:, None] * shares[None, :]
    bound = 1 - 1 / (2 * len(weights) - 2)
    assert np.abs(drawn - expected).max() <= bound + 1e-9
    assert counts == drawn[-1].tolist()
    # It depends only on the counts so far: continued from any point, it goes on the same way.
    resumed = list(drawn[12_344])
    assert schedule.assign(resumed, 12_345, 7_655).tolist() == sources[12_345:].tolist()
    with pytest.raises(ValueError, match="do not add up"):
        schedule.assign([1, 1] + [0] * (len(weights) - 2), 3, 1)
    with pytest.raises(ValueError, match="positive"):
        MixtureSchedule([1, 0])


def test_a_mixture_of_one_folder_draws_every_sample_from_it():
    counts = [3]
    assert MixtureSchedule([2.0]).assign(counts, 3, 5).tolist() == [0] * 5
    assert counts == [8]


def drawn_sources(batch) -> list[int]:
    return [row // OFFSET for row in ids_of(batch)]


def test_batches_follow_the_weights_and_a_small_source_repeats_in_a_new_order(tmp_path):
    sources = open_mixture(tmp_path, {"web": 3, "books": 1}, {"web": 200, "books": 7})
    assert [(s.name, s.weight) for s in sources] == [("web", 0.75), ("books", 0.25)]
    batches = mixture_batches(sources)
    counts, books_rows = np.zeros(2), []
    for number in range(1, 31):
        batch = next(batches)
        for row in ids_of(batch):
            counts[row // OFFSET] += 1
            if row // OFFSET == 1:
                books_rows.append(row - OFFSET)
        # After every micro-batch each source's share is within one micro-batch (here: within one block) of its weight.
        assert np.abs(counts - np.array([0.75, 0.25]) * 4 * number).max() <= 1
        assert batches.source_samples == counts.astype(int).tolist()
    assert batches.samples_consumed == 120 and counts.tolist() == [90, 30]
    # books holds 7 blocks: 30 draws are four whole passes and two blocks, each pass all 7 blocks in a new order.
    passes = [books_rows[i:i + 7] for i in range(0, 28, 7)]
    assert all(sorted(p) == list(range(7)) for p in passes)
    assert len({tuple(p) for p in passes}) == 4
    batches.close()


def stream(sources, count, **options):
    batches = mixture_batches(sources, **options)
    try:
        return [ids_of(next(batches)) for _ in range(count)], batches.source_samples
    finally:
        batches.close()


def test_a_resumed_mixture_stream_continues_exactly_and_processes_share_it(tmp_path):
    sources = open_mixture(tmp_path, {"web": 2, "books": 1, "code": 1}, {"web": 60, "books": 9, "code": 23})
    whole, counts = stream(sources, 25)
    head, head_counts = stream(sources, 10)
    tail, tail_counts = stream(sources, 15, start_sample=40, start_source_samples=head_counts)
    assert head + tail == whole and tail_counts == counts
    # Two processes with micro-batch 2 see, together, what one process with micro-batch 4 sees.
    shares = [stream(sources, 25, micro_batch_size=2, process_index=r, num_processes=2)[0] for r in range(2)]
    assert [a + b for a, b in zip(*shares)] == whole
    # The background thread changes nothing.
    assert stream(sources, 25, prefetch=2)[0] == whole
    # Another seed, another order within each source; the same seed, the same stream.
    assert stream(sources, 25, seed=6)[0] != whole and stream(sources, 25)[0] == whole
    with pytest.raises(ValueError, match="start_source_samples"):
        mixture_batches(sources, start_sample=40)


def test_a_single_folder_keeps_its_order(tmp_path):
    """A plain folder_path run reads the stream it read before mixtures existed: the one seeded with the seed."""
    sources = open_mixture(tmp_path, {"web": 1}, {"web": 50})
    plain = TrainBatches(sources[0].train, micro_batch_size=4, process_index=0, num_processes=1, seed=5, prefetch=0)
    order = np.random.default_rng([5, 0, 0]).permutation(len(sources[0].train.row_groups))
    batch = ids_of(next(plain))
    assert plain.source_samples == [4]
    window = np.random.default_rng([5, 0, 1, 0]).permutation(50)
    sequence = np.concatenate([np.arange(g * 10, g * 10 + 10) for g in order])
    assert batch == sequence[window[:4]].tolist()
    plain.close()


def test_folders_that_disagree_are_refused_naming_the_one_that_differs(tmp_path):
    web = source_folder(tmp_path, "web", 0, 20)
    other = source_folder(tmp_path, "other", 1, 20, sha="b" * 64)
    with pytest.raises(InputError, match=f"mixture folder '{other}' has another tokenizer .* than '{web}'"):
        check_agreement([str(web), str(other)])
    # A block size that differs from data_args.block_size is refused by each folder's own manifest check.
    with pytest.raises(InputError, match="blocks of 4 tokens"):
        open_sources({str(web): 1}, block_size=8, vocab_size=VOCAB)


def test_source_names_are_folder_names_unless_two_share_one():
    assert source_names(["data/web", "/x/books/"]) == ["web", "books"]
    assert source_names(["a/tokenized", "b/tokenized", "c/wiki"]) == ["a/tokenized", "b/tokenized", "wiki"]


def test_the_spec_reads_a_mixture_and_refuses_bad_weights(tmp_path):
    from specifications import load_spec

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("data_args:\n  mixture:\n    data/web: 3\n    data/books: 1\n  document_attention: true\n")
    spec = load_spec(spec_file)
    assert spec.data.mixture == {"data/web": 3.0, "data/books": 1.0} and spec.data.document_attention is True
    assert load_spec(spec_file, ["data_args.mixture={a: 1, b: 2.5}"]).data.mixture == {"a": 1.0, "b": 2.5}
    assert "data/web: 3.0" in spec.to_yaml()
    with pytest.raises(InputError) as refused:
        load_spec(spec_file, ["data_args.mixture={a: 0, b: 1}"])
    assert "data_args.mixture: the weight of 'a' must be greater than 0" in str(refused.value)
    with pytest.raises(InputError) as refused:
        load_spec(spec_file, ["data_args.mixture=[a, b]"])
    assert "data_args.mixture: expected a mapping of folder to weight" in str(refused.value)


def test_the_dry_run_names_the_sources_and_their_shares(tmp_path):
    from pretrain.training.loop import data_line
    from specifications import load_spec

    spec = load_spec(None, ["data_args.mixture={data/web: 3, data/books: 1}", "data_args.document_attention=true"])
    assert data_line(spec) == ("data: a mixture of 2 folders by tokens (web 75.0%, books 25.0%), each document "
                               "attending only to itself")
    assert data_line(load_spec(None, ["data_args.folder_path=data/x"])) == "data: data/x, attention across documents"
