"""A checkpoint continues under any launch: one process, DDP or FSDP, on any number of processes.

Every launch trains with the same tokens per step (4 sequences: 4 x 1, 2 x 2 or 1 x 4), so a resumed run must log
the losses of the uninterrupted one-process run. The runs form a chain, each resuming from a checkpoint the one
before it wrote, so that every kind of launch both writes and reads:

    one process (the reference, steps 1-5) --step_1--> DDP 2 --step_2--> FSDP 2 --step_3--> one process
                                                          `--step_2--> one process    `--step_3--> FSDP 4
                                                                                      `--step_3--> DDP 2
"""

import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.helpers.runs import REPO, TINY_MODEL, free_port
from tests.scripts.test_distributed import (
    FSDP_ON_CPU_ENV,
    TIMEOUT_S,
    accelerate_launch,
    assert_same_weights,
    finish,
    launch_env,
    train_records,
)

STEPS = 5
SEQUENCES_PER_STEP = 4
ARGS = [*TINY_MODEL, f"training_args.max_steps={STEPS}", "extra_args.checkpointing_steps=1",
        "training_args.do_eval=false", "extra_args.sample_every=null", "extra_args.wandb_log_steps=1",
        "training_args.learning_rate=0.005", "training_args.warmup_steps=2",
        "training_args.gradient_accumulation_steps=1"]

ONE, DDP, FSDP = "one process", "DDP", "FSDP"


def train(kind, processes, tokenizer, data, output_dir, resume_from=None):
    """pre-training.py under `kind` on `processes` processes; with `resume_from`, that checkpoint alone is copied
    into a fresh output_dir and resumed as `latest`."""
    if resume_from is not None:
        output_dir.mkdir(parents=True)
        shutil.copytree(resume_from, output_dir / resume_from.name)
    args = ["--spec-file", "specs-tiny.yaml", *ARGS, f"model_args.tokenizer_name={tokenizer}",
            f"data_args.folder_path={data}", f"training_args.output_dir={output_dir}",
            f"training_args.per_device_train_batch_size={SEQUENCES_PER_STEP // processes}",
            *(["training_args.resume_from_checkpoint=latest"] if resume_from is not None else [])]
    if kind == ONE:
        result = subprocess.run([sys.executable, "pre-training.py", *args], cwd=REPO, capture_output=True, text=True,
                                env=launch_env(output_dir.parent, ACCELERATE_USE_CPU=None),
                                timeout=TIMEOUT_S)
    else:
        launcher = ["--multi_gpu"] if kind == DDP else ["--config_file", "fsdp_config.yaml"]
        env = launch_env(output_dir.parent, **(FSDP_ON_CPU_ENV if kind == FSDP else {}))
        [result] = finish(accelerate_launch([*launcher, "--num_processes", str(processes), "--main_process_port",
                                             str(free_port())], "pre-training.py", args, env,
                                            output_dir.parent / f"logs-{output_dir.name}"))
    assert result.returncode == 0, f"{kind} on {processes}: {result.stderr[-4000:]}"
    if resume_from is not None:
        step = int(resume_from.name.removeprefix("step_"))
        assert f"resumed from {output_dir / resume_from.name} at step {step}" in result.stdout
    return SimpleNamespace(output_dir=output_dir, stdout=result.stdout)


def saved_chunks(checkpoint, name="model.model.embed_tokens.weight") -> int:
    """How many pieces the saving launch wrote one weight in: one per process under FSDP, one whole copy otherwise."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint / "accelerate_state" / "model_and_optimizer")).read_metadata()
    return len(metadata.state_dict_metadata[name].chunks)


def assert_continues_the_reference(resumed, reference, from_step):
    got, expected = train_records(resumed.output_dir), train_records(reference.output_dir)
    steps = list(range(from_step + 1, STEPS + 1))
    assert sorted(got) == steps
    for step in steps:
        assert got[step]["tokens_seen"] == expected[step]["tokens_seen"], step
        assert got[step]["learning_rate"] == pytest.approx(expected[step]["learning_rate"], rel=1e-12), step
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step
    assert_same_weights(resumed.output_dir / "final-checkpoint", reference.output_dir / "final-checkpoint")


# ----------------------------------------------------------------------------------------------------------------
# The chain's links, each run once

@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_tokenizer, sample_tokenized):
    root = tmp_path_factory.mktemp("launches")

    def run(name, kind, processes, resume_from=None):
        return train(kind, processes, sample_tokenizer, sample_tokenized, root / name, resume_from)

    return run


@pytest.fixture(scope="module")
def reference(runs):
    """One process, uninterrupted, with a checkpoint after every step."""
    return runs("reference", ONE, 1)


@pytest.fixture(scope="module")
def ddp_from_one(runs, reference):
    return runs("ddp2-from-one", DDP, 2, reference.output_dir / "step_1")


@pytest.fixture(scope="module")
def fsdp_from_ddp(runs, ddp_from_one):
    return runs("fsdp2-from-ddp2", FSDP, 2, ddp_from_one.output_dir / "step_2")


# ----------------------------------------------------------------------------------------------------------------
# The transitions

def test_one_process_to_ddp_on_2(reference, ddp_from_one):
    assert "on 2 process(es)" in ddp_from_one.stdout
    assert saved_chunks(reference.output_dir / "step_1") == 1
    assert_continues_the_reference(ddp_from_one, reference, from_step=1)


def test_ddp_on_2_to_one_process(runs, reference, ddp_from_one):
    resumed = runs("one-from-ddp2", ONE, 1, ddp_from_one.output_dir / "step_2")
    assert_continues_the_reference(resumed, reference, from_step=2)


def test_ddp_on_2_to_fsdp_on_2(reference, fsdp_from_ddp):
    assert_continues_the_reference(fsdp_from_ddp, reference, from_step=2)
    # The checkpoints it wrote hold each weight as two shards: the run really was FSDP.
    assert saved_chunks(fsdp_from_ddp.output_dir / "step_3") == 2


def test_fsdp_on_2_to_one_process(runs, reference, fsdp_from_ddp):
    resumed = runs("one-from-fsdp2", ONE, 1, fsdp_from_ddp.output_dir / "step_3")
    assert_continues_the_reference(resumed, reference, from_step=3)


def test_fsdp_on_2_to_fsdp_on_4(runs, reference, fsdp_from_ddp):
    resumed = runs("fsdp4-from-fsdp2", FSDP, 4, fsdp_from_ddp.output_dir / "step_3")
    assert "on 4 process(es)" in resumed.stdout
    assert_continues_the_reference(resumed, reference, from_step=3)
    assert saved_chunks(resumed.output_dir / "step_4") == 4


def test_fsdp_on_2_to_ddp_on_2(runs, reference, fsdp_from_ddp):
    resumed = runs("ddp2-from-fsdp2", DDP, 2, fsdp_from_ddp.output_dir / "step_3")
    assert_continues_the_reference(resumed, reference, from_step=3)
    assert saved_chunks(resumed.output_dir / "step_4") == 1
