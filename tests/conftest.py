"""Shared fixtures: the real scripts, run tiny, offline, on the committed Portuguese sample; a fake Hugging Face
Hub for the code that talks to it. The helpers they use live in tests/helpers/."""

import os

import pytest

from tests.helpers.fake_hub import install_fake_hub
from tests.helpers.runs import OFFLINE_ENV, SAMPLE, TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, TINY_MODEL, run_script

os.environ.update(OFFLINE_ENV)
for secret in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(secret, None)


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """final-checkpoint/ of a 2-step pre-training.py run of the tiny Llama on the tokenized sample."""
    out = tmp_path_factory.mktemp("checkpoint") / "out"
    run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY_MODEL,
               f"model_args.tokenizer_name={sample_tokenizer}", f"data_args.folder_path={sample_tokenized}",
               f"training_args.output_dir={out}", "training_args.max_steps=2", "training_args.do_eval=false",
               check=True)
    return out / "final-checkpoint"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub in place of the real one for the test (tests/helpers/fake_hub.py)."""
    fake, undo = install_fake_hub(monkeypatch, tmp_path / "hub-cache")
    yield fake
    undo()
