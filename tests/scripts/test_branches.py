"""Runs that change shape: a cooldown branch from another run's checkpoint, a resume with another batch, and the
checkpoints a run refuses (another model shape, vocabulary or block size)."""

import hashlib
import json
import shutil

import pytest

from tests.helpers.runs import TINY_MODEL, run_script
from tests.unit.model.test_schedule import wsd_formula

PEAK = 0.01
# 4 sequences x 2 micro-batches x 128 tokens: 1,024 tokens per optimizer step.
TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4", "training_args.gradient_accumulation_steps=2",
        "training_args.per_device_eval_batch_size=8", f"training_args.learning_rate={PEAK}",
        "training_args.warmup_steps=3", "extra_args.wandb_log_steps=1", "extra_args.mixed_precision=no",
        "training_args.lr_scheduler_type=warmup_stable_decay"]


def train(tokenizer, data, output_dir, *overrides):
    # One thread: the branch's first loss is compared with the source's.
    return run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                      f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                      f"training_args.output_dir={output_dir}", *overrides, env={"OMP_NUM_THREADS": "1"})


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def hashes(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """The long run: 16 steps of warmup_stable_decay whose decay covers the last 6 (steps 11-16), checkpoint,
    evaluation and sample at step 8."""
    output_dir = tmp_path_factory.mktemp("source") / "long"
    result = train(sample_tokenizer, sample_tokenized, output_dir, "training_args.max_steps=16",
                   "training_args.decay_steps=6", "extra_args.checkpointing_steps=8", "training_args.eval_steps=8",
                   "extra_args.sample_every=8")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_a_branch_anneals_from_the_checkpoint_into_its_own_folder(source_run, sample_tokenizer, sample_tokenized,
                                                                  tmp_path):
    before = hashes(source_run)
    branch = tmp_path / "cooldown-12"
    result = train(sample_tokenizer, sample_tokenized, branch, "training_args.max_steps=12",
                   "training_args.decay_steps=4", "extra_args.checkpointing_steps=8", "training_args.eval_steps=8",
                   "extra_args.sample_every=8", f"training_args.resume_from_checkpoint={source_run / 'step_8'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"branching from {source_run} at step 8" in result.stdout
    assert hashes(source_run) == before                      # the source's folder is only read
    source, branched = records(source_run), records(branch)
    # The branch's curve is whole: the source's history up to step 8, then its own.
    assert [r for r in branched if r["step"] <= 8] == [r for r in source if r["step"] <= 8]
    assert [r["step"] for r in branched if "loss" in r] == list(range(1, 13))
    source_loss = {r["step"]: r["loss"] for r in source if "loss" in r}
    branch_loss = {r["step"]: r["loss"] for r in branched if "loss" in r}
    # Step 9 runs at the peak in both (the source holds it until step 11, the branch starts its decay at 1), so
    # steps 9 and 10 see the same weights; step 10's lower rate in the branch shows from step 11 on.
    assert branch_loss[9] == pytest.approx(source_loss[9], rel=1e-6)
    assert branch_loss[10] == pytest.approx(source_loss[10], rel=1e-6)
    assert branch_loss[11] != pytest.approx(source_loss[11], rel=1e-6)
    rates = {r["step"]: r["learning_rate"] for r in branched if "learning_rate" in r}
    assert [rates[s] for s in range(9, 13)] == pytest.approx(
        [wsd_formula(s, warmup=3, decay=4, max_steps=12, shape="1-sqrt", ratio=0.0) for s in range(9, 13)])
    samples = [json.loads(line)["step"] for line in (branch / "samples.jsonl").read_text().splitlines()]
    assert samples == [8]
    state = json.loads((branch / "final-checkpoint" / "trainer_state.json").read_text())
    assert state["branched_from"] == {"run": str(source_run), "checkpoint": str(source_run / "step_8"), "step": 8}
    assert state["step"] == 12 and state["samples_consumed"] == 12 * 8
    card = (branch / "final-checkpoint" / "README.md").read_text()
    assert f"- Branched from the run in {source_run} at step 8 (checkpoint {source_run / 'step_8'})" in card
    assert (branch / "loss.png").is_file() and not (branch / "step_8").exists()


def test_another_batch_on_resume_is_said_and_counted(source_run, sample_tokenizer, sample_tokenized, tmp_path):
    from pretrain.data.batches import TrainBatches
    from pretrain.data.tokenized_folder import open_tokenized_folder

    checkpoint = source_run / "step_8"
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "bigger", "training_args.max_steps=12",
                   "training_args.gradient_accumulation_steps=4", "training_args.lr_scheduler_type=cosine",
                   "training_args.do_eval=false", "extra_args.sample_every=null",
                   f"training_args.resume_from_checkpoint={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    note = (f"note: this run takes 2,048 tokens per optimizer step, checkpoint '{checkpoint}' took 1,024: the steps "
            f"after it are of the new size and the data goes on from the next unread sample; "
            f"gradient_accumulation_steps=2 would match it")
    assert result.stdout.count("tokens per optimizer step, checkpoint") == 1 and note + "\n" in result.stdout
    # The cosine schedule of this run, not the source's stable phase, gives step 9 its rate, and says so.
    assert "note: the learning rate follows this run's schedule (cosine over 12 steps, peak 0.01): step 9 runs at" \
        in result.stdout
    state = json.loads((tmp_path / "bigger" / "final-checkpoint" / "trainer_state.json").read_text())
    assert state["samples_consumed"] == 8 * 8 + 4 * 16 and state["tokens_seen"] == (8 * 8 + 4 * 16) * 128
    assert "tokens: 16,384 trained, 16,384 planned" in result.stdout
    # The resumed stream starts at the first sample the checkpoint had not read: the two runs' micro-batches
    # together are one unbroken stream, nothing skipped or read twice.
    train_split, _ = open_tokenized_folder(sample_tokenized, block_size=128, vocab_size=1024, need_test=False)

    def micro_batches(start_sample, count):
        stream = TrainBatches(train_split, micro_batch_size=4, process_index=0, num_processes=1, seed=42,
                              start_sample=start_sample, prefetch=0)
        rows = [next(stream) for _ in range(count)]
        stream.close()
        return rows

    import torch

    resumed_at = json.loads((checkpoint / "trainer_state.json").read_text())["samples_consumed"]
    assert resumed_at == 64
    joined = torch.cat(micro_batches(0, 8 * 2) + micro_batches(resumed_at, 4 * 4))
    assert torch.equal(joined, torch.cat(micro_batches(0, 8 * 2 + 4 * 4)))


@pytest.mark.parametrize("change,message", [
    ("hidden_size", "model_args.hidden_size 64 (this run: 128)"),
    ("vocab_size", "model_args.vocab_size 2048 (this run: 1024)"),
    ("block_size", "data_args.block_size 256 (this run: 128)"),
])
def test_a_checkpoint_of_another_shape_is_refused_before_anything_is_written(source_run, sample_tokenizer,
                                                                             sample_tokenized, tmp_path, change,
                                                                             message):
    checkpoint, overrides = source_run / "step_8", []
    if change == "hidden_size":
        overrides = ["model_args.hidden_size=128"]
    else:  # a checkpoint trained with another vocabulary or block size: its saved config or spec says so
        checkpoint = shutil.copytree(checkpoint, tmp_path / "other" / "step_8")
        name, old, new = (("config.json", '"vocab_size": 1024', '"vocab_size": 2048') if change == "vocab_size" else
                          ("spec.yaml", "block_size: 128", "block_size: 256"))
        text = (checkpoint / name).read_text()
        assert old in text
        (checkpoint / name).write_text(text.replace(old, new))
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "runs" / "out", "training_args.max_steps=12",
                   f"training_args.resume_from_checkpoint={checkpoint}", *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"checkpoint '{checkpoint}' was trained with {message}; resume with the values" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
