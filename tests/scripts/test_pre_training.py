"""pre-training.py end to end on the CPU: a tiny Llama on the tokenized sample."""

import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest

from tests.helpers.runs import OFFLINE_ENV, REPO, TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, TINY_MODEL, free_port, run_script

TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4",
        "training_args.per_device_eval_batch_size=8", "training_args.gradient_accumulation_steps=2",
        "training_args.learning_rate=0.005", "training_args.warmup_steps=3", "extra_args.wandb_log_steps=1",
        "extra_args.mixed_precision=no"]


def load_module():
    from pretrain import hub
    from pretrain.model import build, optimizer

    return SimpleNamespace(build_optimizer=optimizer.build_optimizer, HubPusher=hub.HubPusher,
                           enable_activation_checkpointing=build.enable_activation_checkpointing)


def train(tokenizer, data, output_dir, *overrides, env=None):
    return run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                      f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                      f"training_args.output_dir={output_dir}", *overrides, env=env)


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir):
    return {r["step"]: r["loss"] for r in metrics(output_dir) if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """12 steps with checkpoints every 4, evaluation every 6 and samples every 6."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = train(sample_tokenizer, sample_tokenized, output_dir, "training_args.max_steps=12",
                   "extra_args.checkpointing_steps=4", "training_args.eval_steps=6", "extra_args.sample_every=6")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def test_loss_falls_and_perplexity_is_finite(finished_run):
    output_dir, result = finished_run
    losses = train_losses(output_dir)
    assert sorted(losses) == list(range(1, 13))
    assert losses[1] == pytest.approx(math.log(TEST_VOCAB_SIZE), rel=0.1)  # a fresh model guesses uniformly
    assert losses[12] < losses[1] - 0.4
    evals = [r for r in metrics(output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert 1 < evals[-1]["perplexity"] < TEST_VOCAB_SIZE
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert f"perplexity {evals[-1]['perplexity']:.2f}" in result.stdout


def test_metrics_have_every_field_and_tokens_count_up(finished_run):
    output_dir, _ = finished_run
    records = [r for r in metrics(output_dir) if "loss" in r]
    for record in records:
        assert set(record) >= {"step", "tokens_seen", "loss", "learning_rate", "grad_norm", "tokens_per_second"}
        assert record["tokens_seen"] == record["step"] * 4 * 2 * TEST_BLOCK_SIZE
        assert record["grad_norm"] > 0 and record["tokens_per_second"] > 0
    assert (output_dir / "loss.png").stat().st_size > 5000


def test_checkpoints_are_complete_and_final_model_generates(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir, _ = finished_run
    assert sorted(p.name for p in output_dir.iterdir() if p.name.startswith("step_")) == ["step_4", "step_8"]
    assert not list(output_dir.glob(".*tmp*"))
    for folder in ("step_4", "step_8", "final-checkpoint"):
        names = {p.name for p in (output_dir / folder).iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "spec.yaml",
                "trainer_state.json", "accelerate_state"} <= names, (folder, names)
    state = json.loads((output_dir / "step_8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 8 * TEST_BLOCK_SIZE
    assert state["recent_losses"][-1] == pytest.approx(train_losses(output_dir)[8])
    final = output_dir / "final-checkpoint"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer)
    inputs = tokenizer("A capital do Brasil", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 8


def test_samples_are_generated_and_logged(finished_run):
    output_dir, result = finished_run
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6, 12]
    assert all(s["text"].startswith(s["prompt"][:5]) and len(s["text"]) > len(s["prompt"]) for s in samples)
    assert "step 6 sample:" in result.stdout


def test_resumed_run_equals_uninterrupted(finished_run, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir, _ = finished_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "step_4", resumed_dir / "step_4")
    # As if the run had gone on logging past step 4 before it died: those lines must not survive the resume.
    for name in ("metrics.jsonl", "samples.jsonl"):
        shutil.copy(output_dir / name, resumed_dir / name)
    result = train(sample_tokenizer, sample_tokenized, resumed_dir, "training_args.max_steps=12",
                   "extra_args.checkpointing_steps=4", "training_args.eval_steps=6", "extra_args.sample_every=6",
                   "training_args.resume_from_checkpoint=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    expected, got = train_losses(output_dir), train_losses(resumed_dir)
    assert [r["step"] for r in metrics(resumed_dir)] == [r["step"] for r in metrics(output_dir)]
    assert (resumed_dir / "samples.jsonl").read_text() == (output_dir / "samples.jsonl").read_text()
    assert sorted(got) == list(range(1, 13))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    expected_eval = [r["eval_loss"] for r in metrics(output_dir) if "eval_loss" in r]
    got_eval = [r["eval_loss"] for r in metrics(resumed_dir) if "eval_loss" in r]
    assert got_eval == pytest.approx(expected_eval, rel=1e-5)


def scheduled_rates(name, peak, warmup_steps, max_steps):
    """The rate each optimizer step 1..max_steps runs with, straight from transformers' get_scheduler."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    rates = {}
    for step in range(1, max_steps + 1):
        rates[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    return rates


def trainer_logged_rates(output_dir, name, peak, warmup_steps, max_steps):
    """The learning_rate transformers' Trainer logs at each step for the same schedule (on a one-weight model)."""
    import torch
    from transformers import Trainer, TrainingArguments

    class OneWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return {"loss": ((self.weight - x) ** 2).mean()}

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, warmup_steps=warmup_steps,
                             lr_scheduler_type=name, learning_rate=peak, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, per_device_train_batch_size=2, disable_tqdm=True)
    trainer = Trainer(model=OneWeight(), args=args, train_dataset=[{"x": torch.ones(1)}] * (2 * max_steps))
    trainer.train()
    return {r["step"]: r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r}


def test_schedule_counts_optimizer_steps(sample_tokenizer, sample_tokenized, tmp_path):
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "out", "training_args.max_steps=8",
                   "training_args.warmup_steps=3", "training_args.lr_scheduler_type=linear",
                   "training_args.gradient_accumulation_steps=3", "training_args.do_eval=false",
                   "extra_args.checkpointing_steps=null", "extra_args.sample_every=null")
    assert result.returncode == 0, result.stderr[-3000:]
    rates = {r["step"]: r["learning_rate"] for r in metrics(tmp_path / "out") if "learning_rate" in r}
    peak = 0.005
    # The rate optimizer step s ran with: warm-up from 0 over steps 1..3, peak at step 4, then linear decay that
    # would reach 0 at step 9.
    expected = {s: peak * (s - 1) / 3 if s <= 3 else peak * (8 - (s - 1)) / 5 for s in range(1, 9)}
    assert rates == pytest.approx(expected)
    assert rates == pytest.approx(scheduled_rates("linear", peak, 3, 8))
    assert rates == pytest.approx(trainer_logged_rates(tmp_path / "trainer", "linear", peak, 3, 8))


def test_epochs_decide_the_steps_when_max_steps_is_null(sample_tokenizer, sample_tokenized, tmp_path):
    manifest = json.loads((sample_tokenized / "manifest.json").read_text())
    train_blocks = manifest["splits"]["train"]["blocks"]
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "out", "training_args.max_steps=null",
                   "training_args.num_train_epochs=0.5", "training_args.do_eval=false",
                   "training_args.gradient_accumulation_steps=1", "training_args.per_device_train_batch_size=16",
                   "extra_args.checkpointing_steps=null", "extra_args.sample_every=null",
                   "extra_args.wandb_log_steps=1000", "training_args.warmup_steps=50")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = int(0.5 * train_blocks // 16)
    assert f"for {steps} optimizer steps" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "out")] == [steps]
    # The warm-up outlasts a run whose length is known only once the data is open: the warning comes then.
    highest = scheduled_rates("cosine", 0.005, 50, steps)[steps]
    assert (f"warning: training_args.warmup_steps (50) is above the run's {steps} optimizer steps: the learning "
            f"rate rises to at most {highest:.3g} by the last step") in result.stdout
    assert metrics(tmp_path / "out")[-1]["learning_rate"] == pytest.approx(highest)


def test_continue_training_a_final_checkpoint(finished_run, sample_tokenizer, sample_tokenized, tmp_path):
    output_dir, _ = finished_run
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "more", "training_args.max_steps=2",
                   "training_args.warmup_steps=0", "model_args.train_from_scratch=false",
                   f"model_args.model_to_train={output_dir / 'final-checkpoint'}", "training_args.do_eval=false",
                   "extra_args.checkpointing_steps=null", "extra_args.sample_every=null")
    assert result.returncode == 0, result.stderr[-3000:]
    # A model that already learned starts far below the uniform-guess loss of a fresh one.
    assert train_losses(tmp_path / "more")[1] < train_losses(output_dir)[1] - 0.4


def test_fallbacks_are_announced(sample_tokenizer, sample_tokenized, tmp_path):
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "out", "training_args.max_steps=2",
                   "training_args.warmup_steps=0", "model_args.vocab_size=32000",
                   "model_args.attn_implementation=flash_attention_2",
                   "model_args.model_to_train=some-user/some-model", "training_args.gradient_checkpointing=true",
                   "extra_args.mixed_precision=bf16", "training_args.do_eval=false",
                   "extra_args.checkpointing_steps=null", "extra_args.sample_every=null",
                   "model_args.low_cpu_mem_usage=true", "data_args.overwrite_cache=true",
                   "data_args.preprocessing_num_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    # Fields older spec files carry that nothing here acts on: each says so once, at the start.
    for field in ("model_args.low_cpu_mem_usage", "data_args.overwrite_cache", "data_args.preprocessing_num_workers"):
        [line] = [line for line in result.stdout.splitlines() if line.startswith(f"note: {field} has no effect: ")]
        assert result.stdout.index(line) < result.stdout.index("speed: "), line
    assert f"vocab_size is 32000 but the tokenizer has {TEST_VOCAB_SIZE} tokens" in out
    assert "flash_attention_2 needs the flash-attn package and a CUDA GPU; using sdpa" in out
    assert "'some-user/some-model' is not used as the base config" in out
    config = json.loads((tmp_path / "out" / "final-checkpoint" / "config.json").read_text())
    assert config["vocab_size"] == TEST_VOCAB_SIZE and config["hidden_size"] == 64


@pytest.mark.parametrize("token", [None, "wandb-secret-4242"])
def test_wandb_offline_writes_a_run(sample_tokenizer, sample_tokenized, tmp_path, token):
    with_token = [f"extra_args.wandb_token={token}"] if token else []
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "out", "training_args.max_steps=2",
                   "training_args.warmup_steps=0", "training_args.do_eval=false", "extra_args.sample_every=1",
                   "extra_args.checkpointing_steps=null", *with_token, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    if token:  # the key reaches wandb through the environment only: never the output, the config or any file
        assert token not in result.stdout + result.stderr
        for path in (tmp_path / "out").rglob("*"):
            assert not path.is_file() or token.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, sample_tokenized):
    """Inputs pre-training.py must refuse: tokenized folders broken in one way each, and a folder with no tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("bad-inputs")

    def broken_copy(name, rewrite):
        folder = root / name
        shutil.copytree(sample_tokenized, folder)
        for part in sorted(folder.glob("*/*.parquet")):
            rewrite(part)
        return folder

    def out_of_vocabulary(part):
        rows = pq.read_table(part).column("input_ids").to_pylist()
        rows[0][5] = TEST_VOCAB_SIZE + 7
        pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), part)
        (part.parents[1] / "manifest.json").unlink(missing_ok=True)  # it would be refused first, for its hash

    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "notes.txt").write_text("not a tokenizer")
    return {"wrong_column": broken_copy("wrong-column",
                                        lambda p: pq.write_table(pq.read_table(p).rename_columns(["tokens"]), p)),
            "corrupt": broken_copy("corrupt", lambda p: p.write_bytes(b"PAR1 but not parquet" * 8)),
            "out_of_vocabulary": broken_copy("out-of-vocabulary", out_of_vocabulary),
            "no_tokenizer": no_tokenizer}


@pytest.mark.parametrize("extra,message", [
    (["training_args.push_to_hub=true", "training_args.hub_model_id=me/model"],
     "push_to_hub is on but the Hugging Face Hub cannot be reached"),
    (["model_args.tokenizer_name=/nowhere/tokenizer"], "tokenizer '/nowhere/tokenizer' is not a local folder"),
    (["model_args.tokenizer_name={no_tokenizer}"], "could not load tokenizer '{no_tokenizer}'"),
    (["training_args.resume_from_checkpoint=/nowhere/step_4"], "is not a complete checkpoint folder"),
    (["model_args.train_from_scratch=false", "model_args.model_to_train=someone/missing"],
     "'someone/missing' is not a local folder and cannot be fetched"),
    (["data_args.folder_path=/nowhere/tokenized"], "tokenized folder '/nowhere/tokenized' does not exist"),
    (["data_args.block_size=64"], f"has blocks of {TEST_BLOCK_SIZE} tokens"),
    (["data_args.folder_path={wrong_column}"], "has no 'input_ids' column (columns: tokens)"),
    (["data_args.folder_path={corrupt}"], "is not a readable parquet file"),
    (["data_args.folder_path={out_of_vocabulary}"],
     f"holds token id {TEST_VOCAB_SIZE + 7}, at or above the vocabulary size {TEST_VOCAB_SIZE}"),
], ids=["hub", "missing-tokenizer", "not-a-tokenizer", "missing-resume", "missing-model", "missing-data",
        "block-size", "wrong-column", "corrupt-parquet", "ids-beyond-vocabulary"])
def test_refusals_before_training(sample_tokenizer, sample_tokenized, bad_inputs, tmp_path, extra, message):
    extra, message = [e.format(**bad_inputs) for e in extra], message.format(**bad_inputs)
    result = train(sample_tokenizer, sample_tokenized, tmp_path / "runs" / "out", "training_args.max_steps=2",
                   "training_args.warmup_steps=0", *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    # Checked before anything is written: not even output_dir, nor the folder above it that the run would make.
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_leaves_an_existing_output_dir_as_it_was(sample_tokenizer, sample_tokenized, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    result = train(sample_tokenizer, sample_tokenized, output_dir, "training_args.max_steps=2",
                   "data_args.folder_path=/nowhere/tokenized")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]


def test_two_processes_refuse_bad_input_together(sample_tokenizer, sample_tokenized, tmp_path):
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}
    output_dir = tmp_path / "runs" / "out"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(port), "pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
         f"model_args.tokenizer_name={sample_tokenizer}", "data_args.folder_path=/nowhere/tokenized",
         f"training_args.output_dir={output_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # Both processes stop with the message and status 2 (the launcher reports them); neither waits for the other.
    assert result.returncode != 0
    assert result.stderr.count("error: tokenized folder '/nowhere/tokenized' does not exist") == 2, result.stderr
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def test_refuse_together_takes_back_what_the_run_made(tmp_path):
    from pretrain.errors import InputError
    from pretrain.training.loop import check_output_dir, refuse_together, remove_created

    class OneProcess:
        num_processes = 1
        ended = False

        def end_training(self):
            self.ended = True

    def full_disk():
        raise InputError("no space left")

    output_dir = tmp_path / "a" / "b" / "out"
    created = refuse_together(OneProcess(), lambda: check_output_dir(output_dir))
    assert created == tmp_path / "a" and output_dir.is_dir() and list(output_dir.iterdir()) == []
    accelerator = OneProcess()
    with pytest.raises(InputError, match="no space left"):
        refuse_together(accelerator, full_disk, undo=lambda: remove_created(output_dir, created))
    assert accelerator.ended and list(tmp_path.iterdir()) == []
    # What existed before, or was written into meanwhile, stays.
    assert refuse_together(OneProcess(), lambda: check_output_dir(tmp_path)) is None
    output_dir.mkdir(parents=True)
    (tmp_path / "a" / "mine.txt").write_text("mine")
    remove_created(output_dir, tmp_path / "a")
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "mine.txt"]
    assert refuse_together(OneProcess(), lambda: 42) == 42


def test_unwritable_output_dir_is_refused(sample_tokenizer, sample_tokenized, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = train(sample_tokenizer, sample_tokenized, blocker / "out", "training_args.max_steps=2",
                   "training_args.warmup_steps=0")
    assert result.returncode == 2 and "cannot write to training_args.output_dir" in result.stderr


def test_weight_decay_skips_norms_and_biases():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    module = load_module()
    from specifications import load_spec

    spec = load_spec(REPO / "specs-tiny.yaml")
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    model.extra_bias = torch.nn.Parameter(torch.zeros(32))
    optimizer = module.build_optimizer(model, spec)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == spec.training.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in decayed and "lm_head.weight" in decayed
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight", "extra_bias"} <= plain
    assert not any("norm" in n for n in decayed)


def test_hub_pushes_a_branch_per_checkpoint_and_final_to_main(tmp_path, fake_hub):
    import huggingface_hub

    module = load_module()
    for name in ("step_100", "step_200", "step_300", "final-checkpoint"):
        (tmp_path / name / "accelerate_state").mkdir(parents=True)
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
        (tmp_path / name / "accelerate_state" / "optimizer.bin").write_bytes(b"optimizer state")
    fake_hub.fail("create_branch", PermissionError("403 Forbidden"), branch="step-300")
    fake_hub.fail("upload_folder", ConnectionError("Hub is down"), revision="step-200")
    messages = []
    hub = module.HubPusher(huggingface_hub.HfApi(token="hf_x"), "me/model", say=messages.append)
    hub.push(tmp_path / "step_100", "step-100")
    hub.push(tmp_path / "step_200", "step-200")
    hub.push(tmp_path / "step_300", "step-300")
    hub.push(tmp_path / "final-checkpoint", None)
    hub.wait()
    # A failed push is tried again with each later one and at the end (tests/unit/test_hub.py has the details).
    branches = [(c["repo_id"], c["branch"], c["exist_ok"]) for c in fake_hub.calls_to("create_branch")]
    assert branches[:3] == [("me/model", "step-100", True), ("me/model", "step-200", True),
                            ("me/model", "step-200", True)]
    assert set(branches) == {("me/model", "step-100", True), ("me/model", "step-200", True),
                             ("me/model", "step-300", True)}
    uploads = fake_hub.calls_to("upload_folder")
    assert [(c["repo_id"], c["folder_path"].rsplit("/", 1)[-1], c["revision"]) for c in uploads
            if c["revision"] != "step-200"] == [("me/model", "step_100", "step-100"),
                                                ("me/model", "final-checkpoint", None)]
    # The resumable state stays local: only the model is sent.
    assert all("accelerate_state/*" in c["ignore_patterns"] and c["files"] == ["model.safetensors"]
               for c in uploads)
    assert {call.token for call in fake_hub.calls} == {"hf_x"}
    assert [message.split(";")[0] for message in messages] == [
        "warning: could not push step_200 to me/model: Hub is down",
        "warning: could not push step_300 to me/model: 403 Forbidden",
        "not uploaded to me/model: step_200 (branch step-200), step_300 (branch step-300)"]
    assert hub.pending == []


def test_activation_checkpointing_uses_whichever_name_transformers_has():
    module = load_module()
    calls = []

    class NewName:
        def activation_checkpointing_enable(self, kwargs):
            calls.append(("new", kwargs))

    class OldName:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs):
            calls.append(("old", gradient_checkpointing_kwargs))

    module.enable_activation_checkpointing(NewName())
    module.enable_activation_checkpointing(OldName())
    assert calls == [("new", {"use_reentrant": False}), ("old", {"use_reentrant": False})]
