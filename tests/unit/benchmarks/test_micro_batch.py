"""pretrain/benchmarks/micro_batch.py: the largest micro-batch found by doubling, and the activation estimate."""

import pytest
import torch

from pretrain.benchmarks import micro_batch
from tests.helpers.models import tiny_llama


def fits_below(limit):
    """A trial that runs out of GPU memory from micro-batch `limit` on."""
    def trial(size):
        if size >= limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"peak_memory_gib": size * 4.0}
    return trial


def test_largest_micro_batch_doubles_until_out_of_memory():
    seen = []
    assert micro_batch.find_largest_micro_batch(fits_below(16), 256, lambda m, r: seen.append((m, r["fits"]))) == 8
    assert seen == [(1, True), (2, True), (4, True), (8, True), (16, False)]
    seen.clear()
    assert micro_batch.find_largest_micro_batch(fits_below(16), 4, lambda m, r: seen.append(m)) == 4
    assert seen == [1, 2, 4]
    assert micro_batch.find_largest_micro_batch(lambda m: {"fits": False}, 64, lambda m, r: None) is None


def test_doubling_can_start_above_one():
    seen = []
    found = micro_batch.find_largest_micro_batch(fits_below(64), 256, lambda m, r: seen.append((m, r["fits"])), start=8)
    assert found == 32
    assert seen == [(8, True), (16, True), (32, True), (64, False)]
    assert micro_batch.find_largest_micro_batch(fits_below(64), 256, lambda m, r: None, start=64) is None


def test_activation_estimate_grows_with_the_batch_and_chunking_saves_the_logits():
    config = tiny_llama(vocab_size=2048).config
    chunked = micro_batch.activation_profile(config, 64, 64, None)
    full = micro_batch.activation_profile(config, 64, None, None)
    assert chunked["layer_bytes_per_token"] == pytest.approx(full["layer_bytes_per_token"])
    # The full loss keeps float32 log-probabilities of every token (4 bytes x 2,048); the chunked one a gradient of
    # the hidden state (4 bytes x 32).
    assert full["base_bytes_per_token"] - chunked["base_bytes_per_token"] >= 4 * 2048 - 4 * 32
    sizes = [micro_batch.estimated_memory_gib(config, chunked, block_size=64, micro_batch=m, chunk_tokens=64,
                                             mixed_precision=False) for m in (1, 2, 4)]
    assert sizes[0] < sizes[1] < sizes[2]
