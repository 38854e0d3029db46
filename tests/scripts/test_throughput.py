"""Training speed end to end: the tuned loop (compile, fused AdamW, chunked cross-entropy) must train like the
plain one, the same losses step for step on the same data. The pieces have their own unit tests in tests/unit/:
test_loss.py, test_telemetry.py, test_model.py, test_micro_batch.py.
"""

import json

import pytest

from tests.helpers.runs import TINY_MODEL, run_script

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

