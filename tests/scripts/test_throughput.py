"""Training speed end to end: the tuned loop (compile, fused AdamW, chunked cross-entropy) must train like the
plain one, the same losses step for step on the same data. The pieces have their own unit tests: test_loss.py,
test_telemetry.py, test_model.py.
"""

import json

import pytest
import torch

from conftest import TINY_MODEL, run_script, tiny_llama

from pretrain.benchmarks import micro_batch

TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4",
        "training_args.gradient_accumulation_steps=2", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=2", "training_args.max_steps=6", "training_args.evaluation_strategy=no",
        "extra_args.checkpointing_steps=null", "extra_args.sample_every=6", "extra_args.wandb_log_steps=1",
        "extra_args.mixed_precision=no"]
PLAIN = ["training_args.compile_model=false", "training_args.fused_optimizer=false",
         "training_args.cross_entropy_chunk_tokens=null"]
# Two equal chunks per micro-batch of 4 x 127 predicted tokens: the chunk loop runs under compile, and equal
# shapes let the compiled kernels be shared, which keeps compiling short.
TUNED = ["training_args.compile_model=true", "training_args.fused_optimizer=true",
         "training_args.cross_entropy_chunk_tokens=254"]


# ----------------------------------------------------------------------------------------------------------------
# Micro-batch guidance

def test_largest_micro_batch_doubles_until_out_of_memory():
    def trial(micro_batch):
        if micro_batch >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"peak_memory_gib": micro_batch * 4.0}

    seen = []
    assert micro_batch.find_largest_micro_batch(trial, 256, lambda m, r: seen.append((m, r["fits"]))) == 8
    assert seen == [(1, True), (2, True), (4, True), (8, True), (16, False)]
    seen.clear()
    assert micro_batch.find_largest_micro_batch(trial, 4, lambda m, r: seen.append(m)) == 4
    assert seen == [1, 2, 4]
    assert micro_batch.find_largest_micro_batch(lambda m: {"fits": False}, 64, lambda m, r: None) is None


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


# ----------------------------------------------------------------------------------------------------------------
# The scripts, end to end

def train(tokenizer, data, output_dir, *overrides):
    return run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                      f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                      f"training_args.output_dir={output_dir}", *overrides)


def logged(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_tuned_loop_trains_like_the_plain_loop(sample_tokenizer, sample_tokenized, tmp_path):
    from safetensors import safe_open

    plain = train(sample_tokenizer, sample_tokenized, tmp_path / "plain", *PLAIN)
    assert plain.returncode == 0, plain.stderr[-3000:]
    tuned = train(sample_tokenizer, sample_tokenized, tmp_path / "tuned", *TUNED)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "speed: compile off, cross-entropy full logits, AdamW foreach, TF32 off" in plain.stdout
    assert "speed: compile on, cross-entropy in chunks of 254 tokens, AdamW fused, TF32 off" in tuned.stdout
    assert "MFU: not computed on cpu" in tuned.stdout
    plain_log, tuned_log = logged(tmp_path / "plain"), logged(tmp_path / "tuned")
    plain_losses = {r["step"]: r["loss"] for r in plain_log if "loss" in r}
    tuned_losses = {r["step"]: r["loss"] for r in tuned_log if "loss" in r}
    assert sorted(tuned_losses) == list(range(1, 7))
    assert plain_losses[6] < plain_losses[1] - 0.2  # it learns, so agreeing is not trivial
    for step, loss in plain_losses.items():
        assert tuned_losses[step] == pytest.approx(loss, rel=1e-4), step
    plain_eval = [r["eval_loss"] for r in plain_log if "eval_loss" in r]
    tuned_eval = [r["eval_loss"] for r in tuned_log if "eval_loss" in r]
    assert len(tuned_eval) == 1 and tuned_eval == pytest.approx(plain_eval, rel=1e-4)
    for record in tuned_log:
        if "loss" in record:
            assert record["mfu"] is None and record["gpu_peak_memory_gib"] is None
            assert record["tokens_per_second"] > 0
    samples = [json.loads(line) for line in (tmp_path / "tuned" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6] and len(samples[0]["text"]) > len(samples[0]["prompt"])
    final = tmp_path / "tuned" / "final-checkpoint"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    keys = {}
    for name in ("plain", "tuned"):
        with safe_open(tmp_path / name / "final-checkpoint" / "model.safetensors", "pt") as handle:
            keys[name] = sorted(handle.keys())
    assert keys["tuned"] == keys["plain"]

