"""`Utilities/benchmark.py gguf` (pretrain/benchmarks/gguf_types.py) on the tiny checkpoint: one JSON line per type
with its size and its perplexity in llama.cpp beside transformers', then the table docs/gguf.md shows."""

import argparse
import json
import sys

import pytest

from pretrain.benchmarks import gguf_types
from pretrain.errors import InputError
from tests.helpers.runs import run_script


def test_each_type_reports_its_size_and_perplexity(tiny_checkpoint, sample_tokenized):
    pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding is not installed: pip install "
                                            "llama-cpp-python")
    result = run_script("Utilities/benchmark.py", "gguf", tiny_checkpoint, "--data", sample_tokenized,
                        "--dtypes", "f32", "q8_0", "q4_0", "--max-blocks", 3, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in map(json.loads, filter(lambda line: line.startswith("{"),
                                                                  result.stdout.splitlines()))}
    assert list(rows) == ["f32", "q8_0", "q4_0"]
    expected = rows["f32"]["transformers_perplexity"]
    assert {row["transformers_perplexity"] for row in rows.values()} == {expected}
    assert {(row["blocks"], row["tokens"]) for row in rows.values()} == {(3, 3 * 127)}
    # f32 is the checkpoint's own weights; the quantized types change the perplexity a little, not nothing.
    assert rows["f32"]["perplexity"] == pytest.approx(expected, rel=1e-5) and rows["f32"]["change_percent"] == 0
    assert 0 < abs(rows["q4_0"]["change_percent"]) < 2
    # Bytes per weight: 4 (f32), 34/32 (q8_0), 18/32 (q4_0, its output matrix in q8_0); the vocabulary is the same.
    assert rows["f32"]["size_mib"] > 3 * rows["q8_0"]["size_mib"] > 3 * rows["q4_0"]["size_mib"]
    table = result.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0] == "| --dtype | size (MiB) | perplexity, llama.cpp | perplexity, transformers | change |"
    assert table[2] == (f"| f32 | {rows['f32']['size_mib']:.2f} | {rows['f32']['perplexity']:.3f} | "
                        f"{expected:.3f} | +0.00% |")
    assert len(table) == 5


def test_without_llama_cpp_it_says_how_to_install_it(monkeypatch, tiny_checkpoint, sample_tokenized):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    parser = argparse.ArgumentParser()
    gguf_types.add_arguments(parser)
    with pytest.raises(InputError) as caught:
        gguf_types.run(parser.parse_args([str(tiny_checkpoint), "--data", str(sample_tokenized)]))
    assert str(caught.value) == ("the gguf benchmark runs llama.cpp through its Python binding; pip install "
                                 "llama-cpp-python")


def test_a_folder_without_config_is_refused(tmp_path, sample_tokenized):
    pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding is not installed: pip install "
                                            "llama-cpp-python")
    result = run_script("Utilities/benchmark.py", "gguf", tmp_path, "--data", sample_tokenized)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: the checkpoint folder has no config.json with a vocab_size; give "
                                          "output_dir/final-checkpoint or a step_N folder"]
