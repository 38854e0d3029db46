"""The spec: loading, normalizing, every problem reported at once, overrides, secrets, --dry-run."""

import dataclasses
import difflib
import re
import shutil

import pytest
import yaml

from pretrain.errors import run_main
from pretrain.model.optimizer import step_learning_rates, warmup_note
from specifications import (
    GROUPS,
    MASK,
    SHIPPED_SPECS,
    SpecError,
    load_spec,
    main,
    markdown_table,
    shipped_spec_texts,
    spec_yaml,
)
from tests.helpers.runs import REPO, run_script

# A spec in the style the original project's users wrote, spellings and all.
ORIGINAL_STYLE = """
model_args:
  model_to_train: "nicholasKluge/TeenyTinyLlama-160m"
  tokenizer_name: "nicholasKluge/TeenyTinyLlama-160m"
  model_id: "TeenyTinyLlama-160m"
  train_from_scratch: true
  vocab_size: 32000
  hidden_size: 768
  intermediate_size: 3072
  max_position_embeddings: 2048
  num_attention_heads: 12
  num_hidden_layers: 12
  num_key_value_heads: 12
  output_hidden_states: false
  cache_dir: null
  use_fast_tokenizer: true
  model_revision: "main"
  trust_remote_code: false
  torch_dtype: "bf16"
  low_cpu_mem_usage: null
  use_cache: false
  attn_implementation: "flash_attention_2"
data_args:
  dataset_name: "nicholasKluge/Pt-Corpus-Instruct-tokenized-large"
  folder_path: "/data/Pt-Corpus-Instruct-tokenized-large"
  dataset_split: "train"
  block_size: 2048
  overwrite_cache: false
  preprocessing_num_workers: null
  sanity_check: false
training_args:
  output_dir: "checkpoints"
  do_train: true
  do_eval: true
  evaluation_strategy: "step"
  eval_steps: 100000
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 4
  gradient_accumulation_steps: 1
  learning_rate: 0.0006
  adam_epsilon: 0.00000001
  weight_decay: 0.01
  lr_scheduler_type: "cosine"
  warmup_steps: 10000
  max_steps: 400000
  num_train_epochs: 1
  gradient_checkpointing: false
  seed: 1337
  dataloader_pin_memory: true
  push_to_hub: false
  resume_from_checkpoint: null
  hub_model_id: "nicholasKluge/TeenyTinyLlama-160m"
  hub_token: null
extra_args:
  wandb_token: null
  logger_name: "TeenyTinyLlama"
  wandb_log_steps: 1
  with_tracking: true
  mixed_precision: "bf16"
  checkpointing_steps: 100000
  sample_every: 100000
  generation_seeds:
    - "O mundo é"
    - "A capital do Brasil"
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path, overrides=()):
    with pytest.raises(SpecError) as caught:
        load_spec(path, overrides)
    return caught.value.problems


def test_shipped_spec_is_the_160m_model():
    spec = load_spec(REPO / "specs.yaml")
    assert (spec.model.hidden_size, spec.model.num_hidden_layers, spec.model.vocab_size) == (768, 12, 32000)
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "parameters: 162,417,408" in result.stdout
    assert "tokens per optimizer step: 131,072" in result.stdout


def test_every_group_round_trips(tmp_path):
    spec = load_spec(REPO / "specs.yaml", ["training_args.hub_token=hf_x", "extra_args.sample_every=7"])
    dumped = yaml.safe_dump(spec.to_dict(mask_secrets=False), allow_unicode=True)
    again = load_spec(write(tmp_path, dumped))
    for group_name in GROUPS:
        assert dataclasses.asdict(again.groups()[group_name]) == dataclasses.asdict(spec.groups()[group_name])
    assert again.extra.sample_every == 7


def test_every_field_has_default_and_help():
    for cls in GROUPS.values():
        instance = cls()
        for f in dataclasses.fields(cls):
            assert hasattr(instance, f.name)
            help_text = f.metadata["help"]
            assert help_text and "\n" not in help_text, f.name


def test_original_style_spec_loads_and_normalizes(tmp_path):
    spec = load_spec(write(tmp_path, ORIGINAL_STYLE), environ={})
    assert spec.training.evaluation_strategy == "steps"
    assert spec.model.torch_dtype == "bfloat16"
    assert spec.model.low_cpu_mem_usage is False
    assert spec.model.attn_implementation == "flash_attention_2"
    assert spec.extra.checkpointing_steps == 100000
    assert spec.training.learning_rate == pytest.approx(6e-4)
    assert spec.training.adam_epsilon == pytest.approx(1e-8)
    assert spec.training.hub_token is None


def test_scientific_notation_and_null_max_steps(tmp_path):
    path = write(tmp_path, "training_args:\n  learning_rate: 6e-4\n  max_steps: null\n  eval_steps: 1e3\n")
    spec = load_spec(path)
    assert spec.training.learning_rate == pytest.approx(6e-4)
    assert spec.training.max_steps is None
    assert spec.training.eval_steps == 1000


BAD_VALUES = [
    ("training_args.max_step=3", "training_args.max_step", "did you mean 'max_steps'"),
    ("training_args.mixed_precision=bf16", "training_args.mixed_precision", "belongs in extra_args"),
    ("trainig_args.seed=1", "trainig_args", "did you mean 'training_args'"),
    ("training_args.learning_rate=fast", "training_args.learning_rate", "expected a number"),
    ("training_args.per_device_train_batch_size=0", "per_device_train_batch_size", "at least 1"),
    ("training_args.per_device_train_batch_size=2.5", "per_device_train_batch_size", "expected an integer"),
    ("training_args.do_train=maybe", "training_args.do_train", "true or false"),
    ("extra_args.mixed_precision=fp8", "extra_args.mixed_precision", "not one of no, fp16, bf16"),
    ("training_args.lr_scheduler_type=cosin", "lr_scheduler_type", "did you mean 'cosine'"),
    ("model_args.hidden_size=770", "hidden_size (770) must be divisible", "num_attention_heads"),
    ("model_args.num_key_value_heads=5", "num_attention_heads (12) must be divisible", "num_key_value_heads (5)"),
    ("extra_args.generation_seeds=[]", "generation_seeds is empty", "sample_every is set"),
    ("training_args.eval_steps=null", "needs training_args.eval_steps", "evaluation_strategy"),
    ("training_args.adam_beta2=1", "adam_beta1 and adam_beta2", "must be below 1"),
    ("training_args.lr_scheduler_type=polynomial training_args.learning_rate=1e-8",
     "learning_rate (1e-08) must be above 1e-07",
     "polynomial schedule decays to"),
    ("training_args.lr_scheduler_type=warmup_stable_decay training_args.max_steps=100 training_args.warmup_steps=90",
     "warmup_steps (90) and decay_steps (20, 20% of the run) add up to more than the run's 100", "lower"),
    ("training_args.lr_scheduler_type=warmup_stable_decay training_args.max_steps=100 training_args.warmup_steps=10 "
     "training_args.decay_steps=91", "warmup_steps (10) and decay_steps (91) add up", "raise max_steps"),
    ("training_args.decay_shape=sqrt", "training_args.decay_shape", "not one of 1-sqrt, linear, cosine"),
    ("training_args.min_lr_ratio=1.5", "min_lr_ratio (1.5) must be at most 1", "fraction of learning_rate"),
    ("training_args.push_to_hub=true", "push_to_hub needs", "hub_model_id"),
    ("model_args.train_from_scratch=false", "model_to_train is not set", "train_from_scratch"),
    ("model_args.vocab_size=null", "model_args.vocab_size", "must not be null"),
    ("training_args.learning_rate=0", "learning_rate", "greater than 0"),
    ("training_args.seed", "override 'training_args.seed'", "group.key=value"),
]


@pytest.mark.parametrize("override,where,hint", BAD_VALUES)
def test_bad_value_is_named(override, where, hint):
    problems = problems_of(REPO / "specs.yaml", override.split(" "))
    assert len(problems) == 1, problems
    assert where in problems[0] and hint in problems[0], problems[0]


# What works but is unusual, or is kept from older spec files and does nothing here: loaded, with one note each.
NOTES = [
    (["data_args.block_size=4096"], "warning: data_args.block_size (4096) is above "
     "model_args.max_position_embeddings (2048): the model trains on longer sequences"),
    (["training_args.lr_scheduler_type=constant"], "warning: training_args.lr_scheduler_type 'constant' has no "
     "warm-up, so warmup_steps (1000) is not used"),
    (["model_args.low_cpu_mem_usage=true"], "note: model_args.low_cpu_mem_usage has no effect: transformers 5"),
    (["data_args.overwrite_cache=true"], "note: data_args.overwrite_cache has no effect: the tokenized folder is "
     "read in place"),
    (["data_args.preprocessing_num_workers=4"], "note: data_args.preprocessing_num_workers has no effect: each "
     "training process reads the tokenized folder with one background thread"),
    (["training_args.decay_steps=100", "training_args.min_lr_ratio=0.1"], "note: training_args.decay_steps, "
     "min_lr_ratio have no effect with lr_scheduler_type 'cosine'"),
    (["training_args.lr_scheduler_type=cosine_with_min_lr", "training_args.decay_steps=100"],
     "note: training_args.decay_steps has no effect with lr_scheduler_type 'cosine_with_min_lr'"),
]


@pytest.mark.parametrize("overrides,note", NOTES)
def test_unusual_values_load_with_one_note(overrides, note):
    assert load_spec(REPO / "specs.yaml").notes == []
    notes = load_spec(REPO / "specs.yaml", overrides).notes
    assert len(notes) == 1 and notes[0].startswith(note) and "\n" not in notes[0], notes


def test_a_warmup_longer_than_the_run_is_noted_beside_the_schedule():
    # The note needs the schedule (and torch): the spec loads without it, and the dry run and the set-up, which know
    # the step count, print it.
    spec = load_spec(REPO / "specs.yaml", ["training_args.max_steps=20"])
    assert spec.notes == []
    assert warmup_note(spec, 20) == (
        "warning: training_args.warmup_steps (1000) is above the run's 20 optimizer steps: the learning rate rises "
        "to at most 1.14e-05 by the last step, never to learning_rate (0.0006); lower warmup_steps to reach it")


def test_an_original_style_spec_has_no_notes(tmp_path):
    assert load_spec(write(tmp_path, ORIGINAL_STYLE), environ={}).notes == []


@pytest.mark.parametrize("schedule,peak,warmup_steps,max_steps", [
    ("cosine", 6e-4, 1000, 20), ("linear", 1e-3, 50, 7), ("inverse_sqrt", 3e-3, 30, 29)])
def test_a_warmup_longer_than_the_run_says_how_high_the_rate_gets(schedule, peak, warmup_steps, max_steps):
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    rates = []
    for _ in range(max_steps):  # the rate each optimizer step runs with
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    spec = load_spec(REPO / "specs.yaml", [f"training_args.lr_scheduler_type={schedule}",
                                           f"training_args.learning_rate={peak}",
                                           f"training_args.warmup_steps={warmup_steps}",
                                           f"training_args.max_steps={max_steps}"])
    assert rates[-1] == max(rates) < peak
    assert f"the learning rate rises to at most {rates[-1]:.3g} by the last step" in warmup_note(spec, max_steps)
    assert step_learning_rates(spec, max_steps) == pytest.approx(rates)
    assert warmup_note(spec, warmup_steps) is None


def test_dry_run_prints_the_notes():
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run", "training_args.max_steps=20",
                        "data_args.overwrite_cache=true")
    assert result.returncode == 0, result.stderr
    warmup = "warning: training_args.warmup_steps (1000) is above the run's 20 optimizer steps"
    for note in (warmup, NOTES[3][1]):
        assert note in result.stdout
        assert result.stdout.index(note) < result.stdout.index("# plan")


def test_every_problem_is_reported_at_once(tmp_path):
    overrides = [bad[0] for bad in BAD_VALUES[:5] + BAD_VALUES[6:12]]  # one value per key
    assert len(problems_of(REPO / "specs.yaml", overrides)) == 11


def test_nothing_to_do_is_refused():
    problems = problems_of(REPO / "specs.yaml", ["training_args.do_train=false", "training_args.do_eval=false"])
    assert any("nothing to do" in p for p in problems)


@pytest.mark.parametrize("text,expected", [
    ("model_args: [1, 2\n", "is not valid YAML (line"),
    ("- just\n- a list\n", "must be a mapping"),
    ("model_args: 5\n", "model_args: must be a mapping"),
])
def test_malformed_files(tmp_path, text, expected, capsys):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as caught:
        run_main(lambda: load_spec(path))
    assert caught.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_exit_status_and_no_traceback(tmp_path):
    result = run_script("pre-training.py", "--spec-file", tmp_path / "missing.yaml", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: spec file") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run", "training_args.max_step=3",
                        "model_args.hidden_size=770")
    assert result.returncode == 2
    assert "2 problems" in result.stderr and "max_steps" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_overrides_beat_the_file(tmp_path):
    path = write(tmp_path, "training_args:\n  max_steps: 500\n  warmup_steps: 10\ndata_args:\n  folder_path: a\n")
    spec = load_spec(path, ["training_args.max_steps=20", "data_args.folder_path=/data/x",
                            "extra_args.generation_seeds=[um, dois]"])
    assert spec.training.max_steps == 20
    assert spec.data.folder_path == "/data/x"
    assert spec.extra.generation_seeds == ["um", "dois"]
    result = run_script("pre-training.py", "--spec-file", path, "--dry-run", "training_args.max_steps=20")
    assert "max_steps: 20" in result.stdout and "steps: 20 optimizer steps" in result.stdout


def test_secrets_come_from_environment_and_are_never_printed(tmp_path):
    path = write(tmp_path, ORIGINAL_STYLE.replace("wandb_token: null", "wandb_token: wandb-file-secret-42"))
    spec = load_spec(path, environ={"HF_TOKEN": "hf_env_secret_17"})
    assert spec.training.hub_token == "hf_env_secret_17"
    assert spec.extra.wandb_token == "wandb-file-secret-42"
    assert "secret" not in spec.to_yaml() and spec.to_dict()["training_args"]["hub_token"] == MASK
    result = run_script("pre-training.py", "--spec-file", path, "--dry-run",
                        env={"HF_TOKEN": "hf_env_secret_17", "WANDB_API_KEY": "other-secret"})
    assert result.returncode == 0, result.stderr
    for secret in ("hf_env_secret_17", "wandb-file-secret-42", "other-secret"):
        assert secret not in result.stdout + result.stderr
    assert f"hub_token: '{MASK}'" in result.stdout


def test_dry_run_writes_nothing(tmp_path):
    output_dir = tmp_path / "never-created"
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run",
                        f"training_args.output_dir={output_dir}", "data_args.folder_path=/does/not/exist",
                        "training_args.max_steps=2000", env={"WORLD_SIZE": "4"})
    assert result.returncode == 0, result.stderr
    assert not output_dir.exists()
    assert "processes: 4" in result.stdout
    assert "tokens: 1,048,576,000" in result.stdout  # 8 x 4 x 8 x 2048 x 2000


def test_unquoted_no_means_the_choice_no(tmp_path):
    path = write(tmp_path, "training_args:\n  evaluation_strategy: no\nextra_args:\n  mixed_precision: no\n")
    spec = load_spec(path, ["extra_args.mixed_precision=no"])
    assert (spec.training.evaluation_strategy, spec.extra.mixed_precision) == ("no", "no")


def test_secret_overrides_are_masked_in_the_command_line():
    from specifications import mask_secret_overrides

    arguments = ["--spec-file", "specs.yaml", "training_args.hub_token=hf_abc", "extra_args.wandb_token=w-123",
                 "training_args.max_steps=20", "--dry-run"]
    assert mask_secret_overrides(arguments) == ["--spec-file", "specs.yaml", f"training_args.hub_token={MASK}",
                                                f"extra_args.wandb_token={MASK}", "training_args.max_steps=20",
                                                "--dry-run"]


# Every value the shipped spec files train with: specs.yaml in full, the others as their changes to it.
SPECS_YAML = {
    "model_args": {"model_to_train": None, "tokenizer_name": "new-llama-tokenizer", "model_id": "TeenyTinyLlama-160m",
                   "train_from_scratch": True, "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                   "max_position_embeddings": 2048, "num_attention_heads": 12, "num_hidden_layers": 12,
                   "num_key_value_heads": 12, "output_hidden_states": False, "cache_dir": None,
                   "use_fast_tokenizer": True, "model_revision": "main", "trust_remote_code": False,
                   "torch_dtype": None, "low_cpu_mem_usage": False, "use_cache": False, "attn_implementation": "sdpa"},
    "data_args": {"dataset_name": "Pt-Corpus-Instruct", "folder_path": "data/pt-corpus-tokenized",
                  "mixture": None, "document_attention": False, "dataset_split": "train", "block_size": 2048,
                  "overwrite_cache": False,
                  "preprocessing_num_workers": None, "sanity_check": False},
    "training_args": {"output_dir": "runs/TeenyTinyLlama-160m", "do_train": True, "do_eval": True,
                      "evaluation_strategy": "steps", "eval_steps": 5000, "per_device_train_batch_size": 8,
                      "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 8, "learning_rate": 6e-4,
                      "adam_epsilon": 1e-8, "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.01,
                      "max_grad_norm": 1.0, "lr_scheduler_type": "cosine", "warmup_steps": 1000,
                      "decay_steps": None, "decay_shape": "1-sqrt", "min_lr_ratio": None, "max_steps": None,
                      "num_train_epochs": 1.0, "gradient_checkpointing": False, "seed": 42,
                      "dataloader_pin_memory": True, "compile_model": True, "fused_optimizer": True,
                      "cross_entropy_chunk_tokens": 4096, "allow_tf32": True, "mfu_peak_tflops": None,
                      "push_to_hub": False, "resume_from_checkpoint": None, "max_skipped_steps": 5,
                      "spike_sigma": 6.0, "spike_window": 128, "optimizer": "adamw",
                      "max_rollbacks": 3, "early_stopping_patience": None, "early_stopping_threshold": 0.0,
                      "hub_model_id": None, "hub_token": None},
    "extra_args": {"wandb_token": None, "logger_name": "TeenyTinyLlama", "wandb_log_steps": 10, "with_tracking": True,
                   "report_to": None, "mixed_precision": "bf16", "checkpointing_steps": 5000,
                   "keep_last_checkpoints": 0,
                   "sample_every": 5000,
                   "generation_seeds": ["A capital do Brasil é", "Era uma vez uma menina que",
                                        "A receita de pão de queijo leva", "O rio Amazonas", "Em 1822, o Brasil"],
                   "track_energy": True, "energy_country_iso_code": "BRA", "energy_region": None,
                   "language": "pt", "license": "apache-2.0", "eval_tasks": None, "eval_task_limit": None,
                   "eval_include_path": None},
}
VARIANT_VALUES = {
    "specs-460m.yaml": {
        "model_args.model_id": "TeenyTinyLlama-460m", "model_args.hidden_size": 1024,
        "model_args.intermediate_size": 4096, "model_args.num_attention_heads": 16, "model_args.num_hidden_layers": 24,
        "model_args.num_key_value_heads": 16, "training_args.output_dir": "runs/TeenyTinyLlama-460m",
        "training_args.learning_rate": 3e-4},
    "specs-tiny.yaml": {
        "model_args.tokenizer_name": "quickstart-output/tokenizer", "model_args.model_id": "TeenyTinyLlama-tiny",
        "model_args.vocab_size": 512, "model_args.hidden_size": 128, "model_args.intermediate_size": 512,
        "model_args.max_position_embeddings": 128, "model_args.num_attention_heads": 4,
        "model_args.num_hidden_layers": 2, "model_args.num_key_value_heads": 2,
        "data_args.dataset_name": "data/sample/pt-sample.jsonl", "data_args.folder_path": "quickstart-output/tokenized",
        "data_args.block_size": 128, "training_args.output_dir": "quickstart-output/model",
        "training_args.eval_steps": 100, "training_args.gradient_accumulation_steps": 1,
        "training_args.learning_rate": 3e-3, "training_args.warmup_steps": 30, "training_args.max_steps": 300,
        "training_args.compile_model": False, "extra_args.mixed_precision": "no",
        "extra_args.checkpointing_steps": 100, "extra_args.sample_every": 100},
}
REGENERATE = "python specifications.py --write-specs"


def flat_values(path) -> dict:
    spec = load_spec(path, environ={})
    return {f"{group}.{key}": value for group, values in spec.to_dict(mask_secrets=False).items()
            for key, value in values.items()}


def test_shipped_spec_files_hold_their_values():
    base = flat_values(REPO / "specs.yaml")
    assert base == {f"{group}.{key}": value for group, values in SPECS_YAML.items() for key, value in values.items()}
    assert set(VARIANT_VALUES) | {"specs.yaml"} == set(SHIPPED_SPECS)
    for name, changed in VARIANT_VALUES.items():
        assert flat_values(REPO / name) == {**base, **changed}, name


def test_each_variant_changes_exactly_the_fields_it_lists():
    base = flat_values(REPO / "specs.yaml")
    for name, shipped in SHIPPED_SPECS.items():
        variant = flat_values(REPO / name)
        changed = [key for key in base if variant[key] != base[key]]
        assert changed == [change.partition("=")[0] for change in shipped.changes], name


def test_shipped_spec_files_are_what_the_generator_writes():
    for name, expected in shipped_spec_texts(REPO).items():
        shipped = (REPO / name).read_bytes()
        diff = difflib.unified_diff(shipped.decode("utf-8", "replace").splitlines(keepends=True),
                                    expected.splitlines(keepends=True), f"{name} (shipped)", f"{name} (generated)")
        assert shipped == expected.encode("utf-8"), (
            f"{name} is stale: run `{REGENERATE}`. It takes the values of specs.yaml, a variant's changes from "
            f"SHIPPED_SPECS in specifications.py and the comments from the help texts; a value edited by hand in "
            f"another spec file belongs in SHIPPED_SPECS.\n" + "".join(list(diff)[:40]))


def fields_and_comments(text: str) -> list[tuple[str, str, str]]:
    """(group, field, the comment lines right above the field joined into one line) for every field of a file."""
    found, group, comment = [], None, []
    for line in text.splitlines():
        if line.startswith("  # "):
            comment.append(line[4:])
        elif match := re.fullmatch(r"(\w+):", line):
            group, comment = match.group(1), []
        elif match := re.match(r"  (\w+):", line):
            found.append((group, match.group(1), " ".join(comment)))
            comment = []
        elif not line.strip():
            comment = []
    return found


def test_every_field_of_every_shipped_file_sits_under_its_help_text():
    expected = [(group, f.name, f.metadata["help"]) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    for name in SHIPPED_SPECS:
        assert fields_and_comments((REPO / name).read_text(encoding="utf-8")) == expected, (
            f"{name}'s comments are not the help texts: run `{REGENERATE}`")


@pytest.mark.parametrize("name", list(SHIPPED_SPECS))
def test_header_says_what_the_dry_run_prints(name):
    lines = (REPO / name).read_text(encoding="utf-8").splitlines()
    header = " ".join(line.lstrip("# ") for line in lines[:lines.index("")])
    assert f"--spec-file {name} " in header
    parameters = re.search(r"([\d,]+) parameters", header).group(1)
    tokens = re.search(r"([\d,]+) tokens per optimizer step", header).group(1)
    result = run_script("pre-training.py", "--spec-file", name, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"parameters: {parameters} " in result.stdout
    assert f"tokens per optimizer step: {tokens} " in result.stdout


def test_spec_yaml_writes_any_spec_back_as_it_loads(tmp_path):
    spec = load_spec(REPO / "specs.yaml", ["extra_args.generation_seeds=[]", "extra_args.sample_every=null",
                                           "training_args.adam_epsilon=1e-12", "model_args.torch_dtype=bf16"],
                     environ={})
    spec.data.dataset_name = 'a "quoted" name: with # and é\nand a second line'
    spec.model.tokenizer_name = "no"
    text = spec_yaml(spec, "A header\n\nin two paragraphs")
    assert text.startswith("# A header\n#\n# in two paragraphs\n\nmodel_args:\n")
    assert "  generation_seeds: []\n" in text
    again = load_spec(write(tmp_path, text), environ={})
    assert again.to_dict(mask_secrets=False) == spec.to_dict(mask_secrets=False)


def test_write_specs_writes_every_shipped_file(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "specs.yaml", tmp_path / "specs.yaml")
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret_17")
    main(["--write-specs"], tmp_path)
    for name in SHIPPED_SPECS:
        assert (tmp_path / name).read_bytes() == (REPO / name).read_bytes(), name
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / name}" for name in SHIPPED_SPECS]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(SHIPPED_SPECS)


@pytest.mark.parametrize("old,new,expected", [
    ("  hub_token: null", "  hub_token: hf_file_secret_42", "holds a secret (training_args.hub_token)"),
    ("  max_steps: null", "  max_step: 3", "did you mean 'max_steps'"),
])
def test_write_specs_refuses_a_bad_specs_yaml_and_writes_nothing(tmp_path, monkeypatch, capsys, old, new, expected):
    text = (REPO / "specs.yaml").read_text(encoding="utf-8")
    assert old in text
    write(tmp_path, text.replace(old, new), "specs.yaml")
    with pytest.raises(SystemExit) as caught:
        run_main(lambda: main(["--write-specs"], tmp_path))
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert expected in error and "hf_file_secret_42" not in error
    assert [path.name for path in tmp_path.iterdir()] == ["specs.yaml"]
    assert (tmp_path / "specs.yaml").read_text(encoding="utf-8") == text.replace(old, new)


def test_without_arguments_it_prints_the_docs_table(capsys):
    main([])
    assert capsys.readouterr().out == markdown_table() + "\n"
