"""pretrain/training/resuming.py on hand-made checkpoint folders: the batch note, the shape check, the history a
branch carries over (tests/scripts/test_branches.py runs them in real runs)."""

import json
from types import SimpleNamespace

import pytest

from pretrain.errors import InputError
from pretrain.training.resuming import batch_change_note, carry_history, check_resume_fits, is_branch
from specifications import load_spec
from tests.helpers.runs import REPO

SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def checkpoint(folder, tokens_per_step=None, config=None, block_size=None):
    folder.mkdir(parents=True)
    state = {"step": 8} if tokens_per_step is None else {"step": 8, "tokens_per_step": tokens_per_step}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if block_size is not None:
        (folder / "spec.yaml").write_text(f"data_args:\n  block_size: {block_size}\n")
    return folder


def spec(*overrides):
    return load_spec(REPO / "specs.yaml", ["data_args.block_size=128", "training_args.per_device_train_batch_size=4",
                                           *overrides])


def test_the_batch_note_names_both_sizes_and_the_accumulation_that_matches(tmp_path):
    saved = checkpoint(tmp_path / "run" / "step_8", tokens_per_step=4 * 3 * 128)
    note = batch_change_note(saved, 4 * 8 * 128, spec(), 1)
    assert note == (f"note: this run takes 4,096 tokens per optimizer step, checkpoint '{saved}' took 1,536: the steps "
                    f"after it are of the new size and the data goes on from the next unread sample; "
                    f"gradient_accumulation_steps=3 would match it")
    odd = batch_change_note(saved, 8 * 128 * 2, spec("training_args.per_device_train_batch_size=8"), 1)
    assert odd.endswith("no gradient_accumulation_steps matches it with per_device_train_batch_size 8 on 1 "
                        "process(es)")
    assert batch_change_note(saved, 1536, spec(), 1) is None                 # the same batch: nothing to say
    older = checkpoint(tmp_path / "old" / "step_8")                          # from before the size was recorded
    assert batch_change_note(older, 4096, spec(), 1) is None


def test_the_shape_check_names_every_field_that_differs(tmp_path):
    config = SimpleNamespace(**SHAPE)
    same = checkpoint(tmp_path / "a" / "step_8", config=SHAPE, block_size=128)
    check_resume_fits(same, config, 128)
    check_resume_fits(checkpoint(tmp_path / "bare" / "step_8"), config, 128)  # nothing recorded: nothing to compare
    other = checkpoint(tmp_path / "b" / "step_8", config={**SHAPE, "num_hidden_layers": 4, "vocab_size": 512},
                       block_size=256)
    with pytest.raises(InputError) as refused:
        check_resume_fits(other, config, 128)
    assert str(refused.value) == (
        f"checkpoint '{other}' was trained with model_args.vocab_size 512 (this run: 1024), "
        f"model_args.num_hidden_layers 4 (this run: 2), data_args.block_size 256 (this run: 128); resume with the "
        f"values it was trained with, or start a new run without training_args.resume_from_checkpoint")


def test_a_branch_carries_its_sources_history_up_to_the_step_and_reads_only(tmp_path):
    source = checkpoint(tmp_path / "long" / "step_8")
    lines = [json.dumps({"step": step, "loss": 10 - step}) for step in (4, 8, 12)]
    (source.parent / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    branch = tmp_path / "branch"
    branch.mkdir()
    (branch / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")  # an older run's, replaced
    assert is_branch(source, branch) and not is_branch(source, source.parent)
    carry_history(source, branch, 8)
    assert (branch / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert not (branch / "samples.jsonl").exists()                           # the source had none
    assert (source.parent / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"
