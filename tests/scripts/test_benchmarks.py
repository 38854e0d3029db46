"""The benchmarks (pretrain/benchmarks/, run by Utilities/benchmark.py): the memory sampler and the measured-child
runner on processes of known size, the corpora, and every benchmark's tiny CPU mode with the figures it prints."""

import collections
import json
import sys
import time
from itertools import islice

import psutil
import pytest

from pretrain.benchmarks import corpora, sentencepiece_training, tokenization
from pretrain.benchmarks.measure import Measured, TreeMemorySampler, peak_memory_mib, python_module, run_measured
from pretrain.errors import InputError
from tests.helpers.runs import SAMPLE, run_script
from tests.helpers.texts import read_sample_texts

MIB = 2 ** 20
# A parent holding ~60 MiB while its child holds ~120 MiB: the sum is what the machine had to give, and more than
# either process held alone.
CHILD = "import time; b = bytearray(120 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
PARENT = (f"import subprocess, sys; a = bytearray(60 << 20); a[::4096] = b'x' * len(a[::4096]); "
          f"subprocess.run([sys.executable, '-c', {CHILD!r}])")


def json_lines(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# --- measuring: the sampler and the runner ----------------------------------------------------------------------

def test_tree_memory_sums_a_parent_and_its_child():
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", PARENT])
    with TreeMemorySampler(process.pid) as memory:
        process.wait()
        time.sleep(0.2)
        # The process is gone: the sampler stops by itself.
        assert not memory._thread.is_alive()
    assert memory.peak_rss_bytes > 180 * MIB and memory.peak_anonymous_bytes > 180 * MIB
    assert memory.peak_anonymous_bytes <= memory.peak_rss_bytes


def test_runner_reports_time_tree_memory_status_and_output(tmp_path):
    measured = run_measured([sys.executable, "-c", PARENT + "; print('done')"]).check("the parent")
    assert measured.returncode == 0 and measured.stdout == "done\n" and measured.seconds > 1.5
    assert measured.peak_rss_bytes > 180 * MIB and 180 * MIB < measured.peak_anonymous_bytes
    assert measured.datasets_cache_bytes is None
    failed = run_measured([sys.executable, "-c", "import sys; print('{\"a\": 1}'); sys.exit('went wrong')"])
    assert failed.returncode == 1 and failed.stderr == "went wrong\n" and failed.json_lines() == [{"a": 1}]
    with pytest.raises(RuntimeError, match="the failing step failed \\(exit status 1\\).*\n.*went wrong"):
        failed.check("the failing step")


def test_runner_gives_each_run_its_own_datasets_cache_and_the_package(tmp_path):
    cache = tmp_path / "cache"
    (cache / "stale").mkdir(parents=True)
    (cache / "stale" / "old.arrow").write_bytes(b"x" * 100_000)
    write = ("import os, pathlib, pretrain.benchmarks.measure; folder = pathlib.Path(os.environ['HF_DATASETS_CACHE']);"
             " print(sorted(p.name for p in folder.iterdir()), os.environ['HF_HUB_OFFLINE']); "
             "(folder / 'data.arrow').write_bytes(b'y' * 3_000_000)")
    measured = run_measured([sys.executable, "-c", write], cwd=tmp_path, datasets_cache=cache).check("writing")
    assert measured.stdout == "[] 1\n"                   # empty when it starts, offline, the package importable
    assert 3_000_000 <= measured.datasets_cache_bytes < 3_200_000 and not cache.exists()
    assert python_module("pretrain.benchmarks.baselines", "tokenizer", 5) == [
        sys.executable, "-m", "pretrain.benchmarks.baselines", "tokenizer", "5"]


def test_peaks_over_runs_and_platforms_without_an_anonymous_figure(monkeypatch):
    def run(rss, anonymous):
        return Measured([], 0, 1.0, rss, anonymous, "", "", None)

    assert peak_memory_mib([run(100 * MIB, 60 * MIB), run(150 * MIB, 40 * MIB)]) == {
        "peak_rss_mib": 150.0, "peak_anonymous_mib": 60.0}
    assert peak_memory_mib([run(100 * MIB, None)]) == {"peak_rss_mib": 100.0, "peak_anonymous_mib": None}
    # Where memory_info has no `shared` (macOS), only RSS is summed.
    without_shared = collections.namedtuple("pmem", "rss vms")
    real = psutil.Process.memory_info
    monkeypatch.setattr(psutil.Process, "memory_info", lambda self: without_shared(*real(self)[:2]))
    with TreeMemorySampler() as memory:
        time.sleep(0.1)
    assert memory.peak_rss_bytes > 10 * MIB and memory.peak_anonymous_bytes is None


# --- corpora ----------------------------------------------------------------------------------------------------

def test_synthetic_corpus_is_deterministic_and_varied():
    sentences, syllables = corpora.load_pieces(SAMPLE)
    first = list(islice(corpora.synthetic_documents(sentences, syllables, seed=3), 40))
    assert first == list(islice(corpora.synthetic_documents(sentences, syllables, seed=3), 40))
    assert first != list(islice(corpora.synthetic_documents(sentences, syllables, seed=4), 40))
    sample_sentences = set(sentences)
    changed = [s for d in first for s in corpora.SENTENCE_END.split(d) if s.strip() and s not in sample_sentences]
    assert len(changed) > len(first)


def test_corpora_are_built_once_to_size(tmp_path):
    corpus = corpora.build_corpus("synthetic", SAMPLE, 0.05, 5, tmp_path)
    assert corpus.stat().st_size >= 50_000
    folder = corpus.parent
    written = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    assert corpora.build_corpus("synthetic", SAMPLE, 0.05, 5, tmp_path) == corpus  # built once, then reused
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == written
    repeated = corpora.build_corpus("repeated", SAMPLE, 0.2, 5, tmp_path)
    texts, sample = corpora.read_texts(repeated), read_sample_texts()
    assert repeated.stat().st_size >= 200_000 and len(texts) > 2 * len(sample)
    assert texts == (sample * 3)[:len(texts)] and corpora.count_documents(repeated) == len(texts)
    assert sum(len(t.encode("utf-8")) for t in corpora.read_texts(repeated, 0.05)) >= 50_000
    with pytest.raises(InputError, match="does not exist"):
        corpora.load_pieces(tmp_path / "missing.jsonl")


# --- tokenizer training -----------------------------------------------------------------------------------------

def test_tokenizer_benchmark_helpers_and_bad_input(tmp_path):
    assert sentencepiece_training.join_documents(["aa", "bb", "cc"], 3) == ["aa\n\nbb", "cc"]
    assert sentencepiece_training.join_documents(["aaa", "bb"], 3) == ["aaa", "bb"]
    result = run_script("Utilities/benchmark.py", "tokenizer", "--size-mb", 0, "--work-dir", tmp_path)
    assert result.returncode == 2 and "--size-mb must be positive" in result.stderr
    result = run_script("Utilities/benchmark.py", "tokenizer", "--variants", "fast", "--work-dir", tmp_path)
    assert result.returncode == 2 and "--variants 'fast': choose from original, ours" in result.stderr
    result = run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--documents", "1")
    assert result.returncode == 2 and "give a document length in tokens, at least 2, not '1'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_benchmark_runs_both_variants(tmp_path):
    result = run_script("Utilities/benchmark.py", "tokenizer", "--size-mb", 0.3, "--vocab-size", 400,
                        "--work-dir", tmp_path, "--encode-mb", 0.05)
    lines = json_lines(result)
    assert [line["variant"] for line in lines] == ["original", "ours"]
    for line in lines:
        assert line["benchmark"] == "tokenizer" and line["vocab_size"] == 400 and line["corpus_mb"] >= 0.3
        # A floor: the interpreter with the tokenizers library loaded.
        assert line["corpus"] == "repeated" and line["seconds"] > 0 and line["peak_rss_mib"] > 20
        assert line["encode_mb_per_second"] > 0 and line["encode_256kb_documents_mb_per_second"] > 0
        assert 1 < line["characters_per_token"] < 10 and line["datasets_cache_bytes"] >= 0
        if sys.platform == "linux":
            assert 10 < line["peak_anonymous_mib"] <= line["peak_rss_mib"]
    original, ours = lines
    assert ours["documents"] == original["documents"] - min(1000, original["documents"] // 10)
    assert original["documents"] == corpora.count_documents(tmp_path / "repeated-v1-0.3mb" / "corpus.jsonl")
    assert original["datasets_cache_bytes"] > 0  # load_dataset's Arrow copy of the JSON lines
    assert "ours against the original at 0.3 MB" in result.stdout
    assert json.loads((tmp_path / "ours" / "tokenizer_report.json").read_text())["vocab_size"] == 400
    assert not list(tmp_path.glob("datasets-cache-*"))  # each run's cache is removed after it was measured


def test_tokenizer_benchmark_one_variant_several_sizes_synthetic(tmp_path):
    result = run_script("Utilities/benchmark.py", "tokenizer", "--size-mb", 0.1, 0.2, "--vocab-size", 300,
                        "--variants", "ours", "--corpus", "synthetic", "--work-dir", tmp_path, "--encode-mb", 0.02)
    lines = json_lines(result)
    assert [(line["variant"], line["corpus"]) for line in lines] == [("ours", "synthetic")] * 2
    assert 0.1 <= lines[0]["corpus_mb"] < lines[1]["corpus_mb"] and "against the original" not in result.stdout
    assert not (tmp_path / "original").exists()


# --- tokenizing and packing -------------------------------------------------------------------------------------

def test_tokenize_benchmark_measures_every_variant_on_one_corpus(tmp_path):
    lines = json_lines(run_script("Utilities/benchmark.py", "tokenize", "--corpus-mb", 0.2, "--block-size", 128,
                                  "--vocab-size", 512, "--tokenizer-classes", "PreTrainedTokenizerFast",
                                  "--work-dir", tmp_path))
    assert [line["variant"] for line in lines] == ["original", "ours", "encode", "ratios"]
    original, ours, encode, ratios = lines
    for line in lines[:3]:
        assert line["seconds"] > 0 and line["peak_rss_mib"] > line["peak_anonymous_mib"] > 0
        assert line["tokenizer_class"] == "PreTrainedTokenizerFast" and line["datasets_cache_bytes"] >= 0
    assert original["output_mb"] > 0 and ours["output_mb"] > 0
    assert original["datasets_cache_bytes"] > 0 and encode["datasets_cache_bytes"] == 0
    # The encode variant's seconds leave out the imports, loading the tokenizer and reading the corpus.
    assert encode["wall_seconds"] > encode["seconds"] and encode["tokens"] > 20_000
    assert ours["seconds"] == ours["wall_seconds"] and original["seconds"] == original["wall_seconds"]
    assert set(ratios) >= {"original_over_ours", "ours_over_encode", "ours_over_encode_process"}
    assert ratios["ours_over_encode_process"] == pytest.approx(ours["seconds"] / encode["wall_seconds"], abs=0.02)
    # CPU time: the whole process for ours, the encoding alone for encode (every thread of it).
    assert ours["cpu_seconds"] == ours["process_cpu_seconds"] > 0.1
    assert encode["process_cpu_seconds"] > encode["cpu_seconds"] > 0
    assert ratios["ours_over_encode_cpu"] == pytest.approx(ours["cpu_seconds"] / encode["cpu_seconds"], abs=0.02)
    assert [line["runs_seconds"] for line in lines[:3]] == [[line["seconds"]] for line in lines[:3]]
    assert ratios["ours_over_encode_per_repeat"] == [ratios["ours_over_encode"]]
    assert ratios["ours_over_encode_median_repeat"] == ratios["ours_over_encode"]
    corpus = tmp_path / "repeated-v1-0.2mb" / "corpus.jsonl"
    assert corpus.stat().st_size >= 200_000 and (tmp_path / "tokenizer" / "tokenizer.json").exists()
    again = corpora.build_corpus("repeated", SAMPLE, 0.2, 0, tmp_path / "again")
    assert again.read_bytes() == corpus.read_bytes()  # deterministic: the same corpus for every run

    # The same tokenizer under Llama's classes, which tokenize-dataset.py reads through transformers.
    lines = json_lines(run_script("Utilities/benchmark.py", "tokenize", "--corpus-mb", 0.2, "--block-size", 128,
                                  "--tokenizer-name", tmp_path / "tokenizer", "--variants", "ours,encode",
                                  "--tokenizer-classes", "LlamaTokenizerFast,LlamaTokenizer", "--work-dir", tmp_path))
    assert [(line["tokenizer_class"], line["variant"]) for line in lines] == [
        ("LlamaTokenizerFast", "ours"), ("LlamaTokenizerFast", "encode"), ("LlamaTokenizerFast", "ratios"),
        ("LlamaTokenizer", "ours"), ("LlamaTokenizer", "encode"), ("LlamaTokenizer", "ratios")]
    assert all(line["ours_over_encode"] > 0 for line in lines if line["variant"] == "ratios")
    assert "original_over_ours" not in lines[2]
    for name in ("LlamaTokenizerFast", "LlamaTokenizer"):
        config = json.loads((tmp_path / f"tokenizer-{name}" / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == name and config["eos_token"] == "</s>"


def test_tokenize_ratios_per_repeat_pair_the_runs_of_each_round():
    runs = {variant: [({"seconds": seconds, "cpu_seconds": cpu}, None) for seconds, cpu in measured]
            for variant, measured in {"ours": [(12.0, 20.0), (10.0, 18.0), (11.0, 19.0)],
                                      "encode": [(8.0, 16.0), (9.0, 15.0), (10.0, 19.0)]}.items()}
    assert tokenization.ratios_per_repeat(runs) == {"ours_over_encode_per_repeat": [1.5, 1.11, 1.1],
                                                    "ours_over_encode_median_repeat": 1.11,
                                                    "ours_over_encode_cpu_per_repeat": [1.25, 1.2, 1.0]}
    assert tokenization.ratios_per_repeat({"ours": runs["ours"]}) == {}


@pytest.mark.parametrize("flags, message", [
    (["--variants", "fast"], "--variants 'fast': choose from original, ours, encode"),
    (["--tokenizer-classes", ","], "--tokenizer-classes is empty"),
    (["--corpus-mb", "0"], "--corpus-mb must be positive"),
    (["--tokenizer-name", "."], "has no tokenizer.json; give a folder from train-sentencepiece.py"),
])
def test_tokenize_benchmark_refuses_bad_input(tmp_path, flags, message):
    result = run_script("Utilities/benchmark.py", "tokenize", *flags, "--work-dir", tmp_path / "work")
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- reading tokenized folders ----------------------------------------------------------------------------------

def test_data_benchmark_measures_both_layouts_and_the_original_way(tmp_path):
    lines = json_lines(run_script("Utilities/benchmark.py", "data", "--tokens", 300_000, "--block-size", 128,
                                  "--vocab-size", 500, "--num-processes", 2, "--steady-tokens", 20_000, "--baseline",
                                  "--dir", tmp_path / "bench"))
    assert [(r["variant"], r["processes"]) for r in lines] == [
        ("tokenized_data-ours", 2), ("original-ours", 1), ("tokenized_data-published", 2), ("original-published", 1)]
    for record in lines:
        assert record["num_blocks"] == 300_000 // 128 - 23 and record["tokens_per_second"] > 0
        assert record["ratio_to_target"] == round(record["tokens_per_second"] / 400_000, 1)
        # Ours reads in place; the original converts the folder into an Arrow copy in the cache.
        assert (record["extra_disk_bytes"] > 0) == record["variant"].startswith("original")
        assert record["peak_rss_mib"] > record["rss_after_imports_mib"] > 50
        assert 0 < record["peak_anonymous_mib"] < record["peak_rss_mib"]
    assert list((tmp_path / "bench").iterdir()) == []            # the synthetic folders are deleted


# --- the training step ------------------------------------------------------------------------------------------

def test_train_benchmark_runs_both_loops_on_the_cpu():
    lines = json_lines(run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device",
                                  "cpu", "--warmup-steps", "1", "--timed-steps", "2", "--micro-batch", "2"))
    original, ours, ratios = lines
    assert [original["variant"], ours["variant"], ratios["variant"]] == ["original", "ours", "ratios"]
    for result in (original, ours):
        assert result["device"] == "cpu" and result["micro_batch"] == 2 and result["block_size"] == 128
        assert result["tokens_per_second"] > 0 and result["mfu"] is None and result["peak_tflops"] is None
        assert result["peak_memory_gib"] > 0 and result["memory_kind"] == "process_rss_sampled"
        assert len(result["losses"]) == 3
    assert original["settings"] == {"compile_model": False, "fused_optimizer": False,
                                    "cross_entropy_chunk_tokens": None, "allow_tf32": False,
                                    "pinned_non_blocking": False}
    assert ours["settings"] == {"compile_model": False, "fused_optimizer": True, "cross_entropy_chunk_tokens": 4096,
                                "allow_tf32": False, "pinned_non_blocking": False}
    assert ratios["ours_over_original_tokens_per_second"] == pytest.approx(
        ours["tokens_per_second"] / original["tokens_per_second"], rel=1e-2)
    assert ratios["max_abs_loss_difference"] < 1e-3 and original["losses"][-1] < original["losses"][0]


def test_synthetic_documents_are_delimited_as_packed_data_is():
    from pretrain.benchmarks.training_step import synthetic_batches

    [plain] = synthetic_batches(1000, 4, 256, 1, seed=0, pin=False)
    [cut] = synthetic_batches(1000, 4, 256, 1, seed=0, pin=False, document_tokens=32)
    starts = cut == 1
    assert 4 * 256 / 32 / 2 < int(starts.sum()) < 4 * 256 / 32 * 2     # about one document per 32 tokens
    assert ((cut == 2)[:, :-1] == starts[:, 1:]).all() and not (cut == 2)[:, -1].any()   # EOS just before BOS
    assert int(((cut == 0) | (cut == 3)).sum()) == 0 and int((plain == 1).sum()) != int(starts.sum())


def test_train_benchmark_keeps_documents_apart_when_asked():
    lines = json_lines(run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device",
                                  "cpu", "--warmup-steps", "1", "--timed-steps", "2", "--micro-batch", "2",
                                  "--documents", "24", "data_args.document_attention=true"))
    original, ours, ratios = lines
    assert ours["levers"]["document_attention"] is True and ours["documents"] == original["documents"] == 24
    assert ours["tokens_per_second"] > 0 and all(loss == loss for loss in ours["losses"])
    # The original loop lets every token see the documents before it, ours does not: the losses part.
    assert ratios["max_abs_loss_difference"] > 1e-3


def test_micro_batch_finder_estimates_on_the_cpu():
    lines = json_lines(run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device",
                                  "cpu", "--find-micro-batch", "--memory-gib", "0.1"))
    trials, verdict = lines[:-1], lines[-1]
    assert [t["micro_batch"] for t in trials] == [2 ** i for i in range(len(trials))]
    assert [t["fits"] for t in trials] == [True] * (len(trials) - 1) + [False]
    assert all(a["estimated_peak_gib"] < b["estimated_peak_gib"] for a, b in zip(trials, trials[1:]))
    assert trials[-2]["estimated_peak_gib"] <= 0.09 < trials[-1]["estimated_peak_gib"]
    assert verdict["largest_micro_batch"] == trials[-2]["micro_batch"] and verdict["method"].startswith("estimated")


def test_bad_benchmark_and_spec_input_exit_2():
    result = run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--variants", "fast")
    assert result.returncode == 2 and "--variants 'fast': choose from original, ours" in result.stderr
    result = run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--documents", "1")
    assert result.returncode == 2 and "give a document length in tokens, at least 2, not '1'" in result.stderr
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run",
                        "training_args.cross_entropy_chunk_tokens=0")
    assert result.returncode == 2 and "training_args.cross_entropy_chunk_tokens: must be at least 1" in result.stderr
