"""The spec: loading, normalizing, every problem reported at once, overrides, secrets, --dry-run."""

import dataclasses
import sys

import pytest
import yaml

from conftest import REPO, run_script

sys.path.insert(0, str(REPO))
from common import run_main  # noqa: E402
from specifications import GROUPS, MASK, SpecError, load_spec  # noqa: E402

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
    ("data_args.block_size=4096", "block_size (4096) is above", "max_position_embeddings"),
    ("training_args.eval_steps=null", "needs training_args.eval_steps", "evaluation_strategy"),
    ("training_args.max_steps=10", "warmup_steps (1000) is above", "max_steps (10)"),
    ("training_args.push_to_hub=true", "push_to_hub needs", "hub_model_id"),
    ("model_args.train_from_scratch=false", "model_to_train is not set", "train_from_scratch"),
    ("model_args.vocab_size=null", "model_args.vocab_size", "must not be null"),
    ("training_args.learning_rate=0", "learning_rate", "greater than 0"),
    ("training_args.seed", "override 'training_args.seed'", "group.key=value"),
]


@pytest.mark.parametrize("override,where,hint", BAD_VALUES)
def test_bad_value_is_named(override, where, hint):
    problems = problems_of(REPO / "specs.yaml", [override])
    assert len(problems) == 1, problems
    assert where in problems[0] and hint in problems[0], problems[0]


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
