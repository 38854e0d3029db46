"""Shared fixtures: the real scripts, run tiny, offline, on the committed Portuguese sample."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "pt-sample.jsonl"
TEST_VOCAB_SIZE = 1024
TEST_BLOCK_SIZE = 128
# The tiny Llama the training tests share: 2 layers, hidden 64, grouped-query attention, on the sample's blocks.
TINY_MODEL = ["model_args.hidden_size=64", "model_args.intermediate_size=128", "model_args.num_hidden_layers=2",
              "model_args.num_attention_heads=4", "model_args.num_key_value_heads=2",
              f"model_args.max_position_embeddings={TEST_BLOCK_SIZE}", f"model_args.vocab_size={TEST_VOCAB_SIZE}",
              f"data_args.block_size={TEST_BLOCK_SIZE}"]

# No test may reach the network: the Hub is "unreachable" and trackers stay offline.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE_ENV)
for secret in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(secret, None)


def run_script(script, *args, env=None, cwd=None, timeout=600, check=False):
    """Run one of the project's scripts (path relative to the repo) with this Python; return CompletedProcess."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                            env=full_env, cwd=cwd or REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def read_sample_texts():
    with open(SAMPLE, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory):
    """A tokenizer trained by train-sentencepiece.py on the committed sample (vocabulary TEST_VOCAB_SIZE)."""
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    run_script("train-sentencepiece.py", "--dataset_name", SAMPLE, "--vocab_size", TEST_VOCAB_SIZE,
               "--num_samples", 100000, "--output_dir", out, check=True)
    return out


@pytest.fixture(scope="session")
def sample_tokenized(tmp_path_factory, sample_tokenizer):
    """The sample tokenized and packed by tokenize-dataset.py into blocks of TEST_BLOCK_SIZE, 10% of blocks as test."""
    out = tmp_path_factory.mktemp("tokenized") / "sample-tokenized"
    run_script("Utilities/tokenize-dataset.py", "--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer,
               "--block-size", TEST_BLOCK_SIZE, "--test-size", 0.1, "--output-dir", out, check=True)
    return out
