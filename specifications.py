"""The spec of a pre-training run: four typed groups loaded from a YAML file, checked all at once.

    from specifications import load_spec
    spec = load_spec("specs.yaml", ["training_args.max_steps=20"])
    spec.training.max_steps  # 20

A spec file has the groups `model_args`, `data_args`, `training_args` and `extra_args`. Every problem found (unknown
key, wrong type, bad value, fields that contradict each other) is reported in one message: `SpecError`, which the
scripts print as one block and exit with status 2. What works but is unusual or has no effect here (a warm-up longer
than the run, a field kept only for older spec files) is no error: `spec.notes` holds it as one-line warnings, which
pre-training.py prints at the start of a run and in --dry-run. Spec files written for the original TeenyTinyLlama
scripts load unchanged: their spellings (`evaluation_strategy: "step"`, `torch_dtype: "bf16"`,
`low_cpu_mem_usage: null`) are normalized here.

The help text of every field is the one source of the field's documentation: `python specifications.py` prints
the table README.md carries, and `python specifications.py --write-specs` rewrites the shipped spec files
(`SHIPPED_SPECS`) with the help texts as their comments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import shlex
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pretrain.errors import InputError, run_main

ROOT = Path(__file__).resolve().parent

SECRET_FIELDS = {"hub_token": "HF_TOKEN", "wandb_token": "WANDB_API_KEY"}
MASK = "***"

# Spellings used by older spec files, mapped to the one name the code uses.
ALIASES = {
    "evaluation_strategy": {"step": "steps", "none": "no", "false": "no"},
    "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"},
    "mixed_precision": {"none": "no", "fp32": "no", "false": "no", "bfloat16": "bf16", "float16": "fp16"},
}
# transformers' get_scheduler names; not warmup_stable_decay, which needs the length of its decay phase, a value the
# spec has no field for.
SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr"]
# The rate transformers' polynomial schedule decays to: a peak at or below it cannot decay.
POLYNOMIAL_LR_END = 1e-7
DEFAULT_PROMPTS = [
    "A capital do Brasil é",
    "Era uma vez uma menina que",
    "A receita de pão de queijo leva",
    "O rio Amazonas",
    "Em 1822, o Brasil",
]


def spec_field(default, help: str, *, choices=None, minimum=None, exclusive_minimum=None):
    """A spec field: its default, a one-line help text and the checks its values must pass."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "exclusive_minimum": exclusive_minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelArguments:
    model_to_train: str | None = spec_field(None, "Model to continue training, or whose config is the base when training from scratch: a local folder or a Hub name.")
    tokenizer_name: str = spec_field("new-llama-tokenizer", "Tokenizer to train with: a local folder (as written by train-sentencepiece.py) or a Hub name.")
    model_id: str = spec_field("TeenyTinyLlama-160m", "Name of this run's model: names the W&B run and the model card.")
    train_from_scratch: bool = spec_field(True, "Build a new, randomly initialized model (true) or continue training `model_to_train` (false).")
    vocab_size: int = spec_field(32000, "Vocabulary size; the tokenizer's own size wins if they differ.", minimum=1)
    hidden_size: int = spec_field(768, "Width of the model: size of the embeddings and of every hidden state.", minimum=1)
    intermediate_size: int = spec_field(3072, "Width of the MLP inside each transformer layer.", minimum=1)
    max_position_embeddings: int = spec_field(2048, "Longest sequence the model is built for (its context window).", minimum=1)
    num_attention_heads: int = spec_field(12, "Attention heads per layer.", minimum=1)
    num_hidden_layers: int = spec_field(12, "Transformer layers.", minimum=1)
    num_key_value_heads: int = spec_field(12, "Key/value heads per layer (fewer than the attention heads gives grouped-query attention).", minimum=1)
    output_hidden_states: bool = spec_field(False, "Have the model return every layer's hidden states (costs memory; rarely wanted in pre-training).")
    cache_dir: str | None = spec_field(None, "Folder where models and tokenizers fetched from the Hub are cached.")
    use_fast_tokenizer: bool = spec_field(True, "Use the fast (Rust) tokenizer.")
    model_revision: str = spec_field("main", "Branch, tag or commit of `model_to_train` to load from the Hub.")
    trust_remote_code: bool = spec_field(False, "Allow models from the Hub to run their own code.")
    torch_dtype: str | None = spec_field(None, "Dtype to load a pretrained model in: auto, float32, float16 or bfloat16 (null: float32).", choices=["auto", "float32", "float16", "bfloat16"])
    low_cpu_mem_usage: bool = spec_field(False, "Kept for older spec files, no effect: transformers 5 always loads a pretrained model without a full extra copy in CPU memory (a run set to true says so).")
    use_cache: bool = spec_field(False, "Keep the key/value cache during the forward pass (useless in training; generation turns it on by itself).")
    attn_implementation: str = spec_field("sdpa", "Attention kernel: sdpa, eager or flash_attention_2 (falls back to sdpa when flash-attn or CUDA is missing).", choices=["sdpa", "eager", "flash_attention_2", "flex_attention"])


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = spec_field(None, "Name of the corpus the tokenized folder came from (recorded with the checkpoints).")
    folder_path: str = spec_field("data/pt-corpus-tokenized", "Tokenized folder written by Utilities/tokenize-dataset.py: train/ and test/ of parquet files.")
    mixture: dict[str, float] | None = spec_field(None, "Train on several tokenized folders instead of `folder_path`: a mapping of folder to weight, its share of the train tokens (e.g. {data/web: 3, data/books: 1}); each is evaluated on its own test split too.")
    document_attention: bool = spec_field(False, "Let each token attend only to the tokens of its own document within a packed block: positions restart at each document and the target that starts a document is left out of the loss.")
    dataset_split: str = spec_field("train", "Split of `dataset_name` the corpus was made from (recorded with the checkpoints).")
    block_size: int = spec_field(2048, "Tokens per training sequence; must equal the tokenized folder's block size.", minimum=2)
    overwrite_cache: bool = spec_field(False, "Kept for older spec files, no effect: the tokenized folder is read in place, so there is no cache (a run set to true says so).")
    preprocessing_num_workers: int | None = spec_field(None, "Kept for older spec files, no effect: each training process reads the tokenized folder with one background thread, and tokenizing is Utilities/tokenize-dataset.py's work (--num-proc); a run with a value says so.", minimum=0)
    sanity_check: bool = spec_field(False, "Train on the first 1,000 train and 100 test blocks only, to try a set-up quickly.")


@dataclass
class TrainingArguments:
    output_dir: str = spec_field("runs/TeenyTinyLlama-160m", "Folder for checkpoints, metrics.jsonl and the loss plot.")
    do_train: bool = spec_field(True, "Train.")
    do_eval: bool = spec_field(True, "Evaluate on the test split (every `eval_steps` when `evaluation_strategy` is steps, and at the end).")
    evaluation_strategy: str = spec_field("steps", "When to evaluate during training: steps (every `eval_steps`) or no (only at the end).", choices=["steps", "no"])
    eval_steps: int | None = spec_field(5000, "Optimizer steps between evaluations.", minimum=1)
    per_device_train_batch_size: int = spec_field(8, "Sequences per micro-batch on each device.", minimum=1)
    per_device_eval_batch_size: int = spec_field(8, "Sequences per evaluation batch on each device.", minimum=1)
    gradient_accumulation_steps: int = spec_field(8, "Micro-batches accumulated into one optimizer step.", minimum=1)
    learning_rate: float = spec_field(6e-4, "Peak learning rate (reached at the end of warm-up).", exclusive_minimum=0)
    adam_epsilon: float = spec_field(1e-8, "AdamW epsilon.", exclusive_minimum=0)
    adam_beta1: float = spec_field(0.9, "AdamW beta1.", minimum=0)
    adam_beta2: float = spec_field(0.95, "AdamW beta2.", minimum=0)
    weight_decay: float = spec_field(0.01, "AdamW weight decay, applied to the 2-D weights only (not to biases or norms).", minimum=0)
    max_grad_norm: float | None = spec_field(1.0, "Clip the gradient norm to this value (null: no clipping).", exclusive_minimum=0)
    lr_scheduler_type: str = spec_field("cosine", "Learning-rate schedule after warm-up.", choices=SCHEDULERS)
    warmup_steps: int = spec_field(1000, "Optimizer steps of linear warm-up (longer than the run: the rate never reaches learning_rate, and a warning says how high it gets).", minimum=0)
    max_steps: int | None = spec_field(None, "Optimizer steps to train for; null: `num_train_epochs` epochs.", minimum=1)
    num_train_epochs: float = spec_field(1, "Passes over the train split when `max_steps` is null.", exclusive_minimum=0)
    gradient_checkpointing: bool = spec_field(False, "Recompute activations in the backward pass: less memory, about 30% slower.")
    seed: int = spec_field(42, "Seed for the model's initialization, the data order and sampling.", minimum=0)
    dataloader_pin_memory: bool = spec_field(True, "Pin host memory for faster, asynchronous copies to the GPU.")
    compile_model: bool = spec_field(True, "torch.compile the model's training forward and backward (the first step takes a minute or more longer; on the CPU it needs a C++ compiler).")
    fused_optimizer: bool = spec_field(True, "Use the fused AdamW kernel where this torch has one for the device (torch's default AdamW otherwise).")
    cross_entropy_chunk_tokens: int | None = spec_field(4096, "Compute the output head and cross-entropy this many tokens at a time, so the whole batch's logits never exist at once (null: the model's full logits).", minimum=1)
    allow_tf32: bool = spec_field(True, "Let float32 matmuls outside autocast use TF32 tensor cores (CUDA only).")
    mfu_peak_tflops: float | None = spec_field(None, "Peak bf16 TFLOP/s of one device that MFU is reported against (null: looked up from the GPU's name).", exclusive_minimum=0)
    push_to_hub: bool = spec_field(False, "Push checkpoints (branch step-N) and the final model (main) to `hub_model_id`.")
    resume_from_checkpoint: str | None = spec_field(None, "Resume from a checkpoint folder (output_dir/step_N) or `latest`.")
    max_skipped_steps: int = spec_field(5, "Optimizer steps in a row with a non-finite loss or gradient norm that are skipped before rolling back to the last checkpoint.", minimum=1)
    max_rollbacks: int = spec_field(3, "Rollbacks to the last checkpoint allowed before a diverging run stops.", minimum=0)
    hub_model_id: str | None = spec_field(None, "Hub repository to push to, as user/name.")
    hub_token: str | None = spec_field(None, "Hub token (secret; falls back to HF_TOKEN). Never printed or saved.")


@dataclass
class ExtraArguments:
    wandb_token: str | None = spec_field(None, "Weights & Biases API key (secret; falls back to WANDB_API_KEY). Never printed or saved.")
    logger_name: str = spec_field("TeenyTinyLlama", "Name of the W&B project and of the run's logger.")
    wandb_log_steps: int = spec_field(10, "Optimizer steps between logged metrics, for metrics.jsonl and W&B alike.", minimum=1)
    with_tracking: bool = spec_field(True, "Log to W&B when a token is given or WANDB_MODE is set.")
    mixed_precision: str = spec_field("no", "Mixed precision: no, fp16 or bf16.", choices=["no", "fp16", "bf16"])
    checkpointing_steps: int | None = spec_field(1000, "Optimizer steps between checkpoints (null: only the final one).", minimum=1)
    keep_last_checkpoints: int = spec_field(0, "Keep only the newest k step_N checkpoints (0: keep all); the final one and the one a run resumed from are always kept.", minimum=0)
    sample_every: int | None = spec_field(1000, "Optimizer steps between generated samples (null: never).", minimum=1)
    generation_seeds: list[str] = spec_field(DEFAULT_PROMPTS, "Prompts to sample from during training, one chosen at random each time.")
    track_energy: bool = spec_field(True, "Measure energy and CO2 with CodeCarbon, offline, one tracker per machine: totals in metrics.jsonl, W&B, trainer_state.json and the final summary.")
    energy_country_iso_code: str = spec_field("BRA", "Country whose electricity mix turns the measured kWh into CO2, as a 3-letter ISO code (BRA, USA, FRA, ...).")
    energy_region: str | None = spec_field(None, "Region of that country with its own electricity mix in CodeCarbon (US states, Canadian provinces), e.g. california; null: the country's average.")
    language: str = spec_field("pt", "Language of the training text as an ISO 639-1 code, for the model card's metadata.")
    license: str = spec_field("apache-2.0", "License of the trained model as a Hub license id, for the model card's metadata.")
    eval_tasks: list[str] | None = spec_field(None, "Benchmarks of lm-evaluation-harness to run at every evaluation and at the end: harness task names or a preset (portuguese, portuguese_translated, portuguese_leaderboard); null: none.")
    eval_task_limit: int | None = spec_field(None, "Examples per benchmark task of eval_tasks (null: all); the other processes wait while the main process runs them.", minimum=1)
    eval_include_path: str | None = spec_field(None, "Folder of your own harness task YAML files that eval_tasks may name, beside the harness's own tasks.")


GROUPS = {"model_args": ModelArguments, "data_args": DataTrainingArguments,
          "training_args": TrainingArguments, "extra_args": ExtraArguments}


@dataclass
class Spec:
    model: ModelArguments
    data: DataTrainingArguments
    training: TrainingArguments
    extra: ExtraArguments
    # One-line warnings about values that work but do not do what they may seem to; the scripts print them at the
    # start of a run and in --dry-run. Not part of the spec itself: never saved.
    notes: list[str] = field(default_factory=list)

    def groups(self) -> dict:
        return {"model_args": self.model, "data_args": self.data, "training_args": self.training,
                "extra_args": self.extra}

    def to_dict(self, mask_secrets: bool = True) -> dict:
        """The resolved spec as plain data; secrets replaced by a mask unless asked otherwise."""
        result = {}
        for group_name, group in self.groups().items():
            values = dataclasses.asdict(group)
            if mask_secrets:
                values.update({name: MASK for name in SECRET_FIELDS if values.get(name)})
            result[group_name] = values
        return result

    def to_yaml(self) -> str:
        """The resolved spec as YAML, secrets masked: what is printed and saved beside checkpoints."""
        return yaml.safe_dump(self.to_dict(mask_secrets=True), sort_keys=False, allow_unicode=True)


class SpecError(InputError):
    """Every problem found in a spec, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n"
                         + "\n".join(f"  - {p}" for p in problems))


def load_spec(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (), *,
              environ: typing.Mapping[str, str] | None = None) -> Spec:
    """Read, merge, normalize and check a spec; raise SpecError listing every problem."""
    source = str(path) if path is not None else "the spec"
    raw = read_spec_file(path) if path is not None else {}
    problems: list[str] = []
    apply_overrides(raw, overrides, problems)
    groups = {}
    for group_name, cls in GROUPS.items():
        values = raw.pop(group_name, None) or {}
        if not isinstance(values, dict):
            problems.append(f"{group_name}: must be a mapping of keys to values, not {type(values).__name__}")
            values = {}
        groups[group_name] = build_group(group_name, cls, values, problems)
    for unknown in raw:
        problems.append(f"{unknown}: unknown group{did_you_mean(str(unknown), GROUPS)}")
    spec = Spec(groups["model_args"], groups["data_args"], groups["training_args"], groups["extra_args"])
    fill_secrets(spec, os.environ if environ is None else environ)
    refused, spec.notes = cross_checks(spec)
    problems.extend(refused)
    if problems:
        raise SpecError(source, problems)
    return spec


def read_spec_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spec file '{path}' does not exist; pass the path of a YAML spec such as specs.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise InputError(f"spec file '{path}' is not valid YAML{line}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"spec file '{path}' must be a mapping with the groups {', '.join(GROUPS)}, "
                         f"not a {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: typing.Sequence[str], problems: list[str]) -> None:
    """`group.key=value` pairs, values read as YAML scalars, written over the file's values."""
    for override in overrides:
        dotted, sep, text = override.partition("=")
        group_name, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            problems.append(f"override '{override}': write it as group.key=value, e.g. training_args.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        group = raw.setdefault(group_name, {})
        if isinstance(group, dict):
            group[key] = value


def build_group(group_name: str, cls, values: dict, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    accepted = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{group_name}.{key}: unknown key{suggest_key(str(key), group_name)}")
            continue
        ok, converted = convert(value, hints[key], fields[key], f"{group_name}.{key}", problems)
        if ok:
            accepted[key] = converted
    return cls(**accepted)


def convert(value, annotation, spec: dataclasses.Field, where: str, problems: list[str]):
    """Coerce one value to its field's type and check its choices and range; report and return (False, None) if bad."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    optional = union and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if union else annotation
    if value is None:
        if optional:
            return True, None
        if base is bool:  # older spec files write `null` for "off"
            return True, False
        problems.append(f"{where}: must not be null; give a {type_name(base)}")
        return False, None
    if base is str and value is False and "no" in (spec.metadata.get("choices") or ()):
        value = "no"  # YAML 1.1 reads an unquoted `no` as false
    converted = coerce(value, base)
    if converted is None:
        problems.append(f"{where}: expected {type_name(base)}, got {value!r}")
        return False, None
    meta = spec.metadata
    if isinstance(converted, str) and where.rsplit(".", 1)[-1] in ALIASES:
        converted = ALIASES[where.rsplit(".", 1)[-1]].get(converted.lower(), converted.lower())
    if meta.get("choices") and converted not in meta["choices"]:
        problems.append(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}"
                        f"{did_you_mean(str(value), meta['choices'])}")
        return False, None
    if meta.get("minimum") is not None and converted < meta["minimum"]:
        problems.append(f"{where}: must be at least {meta['minimum']}, got {value!r}")
        return False, None
    if meta.get("exclusive_minimum") is not None and converted <= meta["exclusive_minimum"]:
        problems.append(f"{where}: must be greater than {meta['exclusive_minimum']}, got {value!r}")
        return False, None
    return True, converted


def coerce(value, base):
    """The value as `base`, or None when it cannot honestly be read as one."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no"}:
            return value.lower() in {"true", "yes"}
        return None
    if base is int:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        number = as_float(value)
        return int(number) if number is not None and number.is_integer() else None
    if base is float:
        if isinstance(value, bool):
            return None
        number = as_float(value)
        return number if number is not None and math.isfinite(number) else None
    if base is str:
        return value if isinstance(value, str) else None
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    if typing.get_origin(base) is dict:
        if not isinstance(value, dict) or not value:
            return None
        numbers = {str(key): as_float(number) if not isinstance(number, bool) else None
                   for key, number in value.items()}
        return numbers if all(n is not None and math.isfinite(n) for n in numbers.values()) else None
    return value


def as_float(value):
    # PyYAML reads `6e-4` (no dot) as a string, so numbers may arrive as text.
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def type_name(base) -> str:
    if typing.get_origin(base) is list:
        return "list of strings"
    if typing.get_origin(base) is dict:
        return "a mapping of folder to weight"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def suggest_key(key: str, group_name: str) -> str:
    """Point to the closest key in the same group, or to the group where the key really lives."""
    for other_name, cls in GROUPS.items():
        if other_name != group_name and key in {f.name for f in dataclasses.fields(cls)}:
            return f" (it belongs in {other_name})"
    return did_you_mean(key, [f.name for f in dataclasses.fields(GROUPS[group_name])])


def fill_secrets(spec: Spec, environ: typing.Mapping[str, str]) -> None:
    if not spec.training.hub_token and environ.get("HF_TOKEN"):
        spec.training.hub_token = environ["HF_TOKEN"]
    if not spec.extra.wandb_token and environ.get("WANDB_API_KEY"):
        spec.extra.wandb_token = environ["WANDB_API_KEY"]


def cross_checks(spec: Spec) -> tuple[list[str], list[str]]:
    """Checks that involve more than one field, or a field this code cannot honour: (problems, notes).

    A problem is what cannot work (the run would crash, or could not do what the spec asks), and stops the run; a
    note is what works but is unusual or has no effect, and is printed at the start of the run and by --dry-run.
    """
    m, d, t, e = spec.model, spec.data, spec.training, spec.extra
    problems, notes = [], []
    if m.hidden_size % m.num_attention_heads:
        problems.append(f"model_args.hidden_size ({m.hidden_size}) must be divisible by "
                        f"model_args.num_attention_heads ({m.num_attention_heads})")
    if m.num_attention_heads % m.num_key_value_heads:
        problems.append(f"model_args.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                        f"model_args.num_key_value_heads ({m.num_key_value_heads})")
    if d.block_size > m.max_position_embeddings:
        # Rotary positions have no table to run past, so this trains; but the saved config claims less context.
        notes.append(f"warning: data_args.block_size ({d.block_size}) is above model_args.max_position_embeddings "
                     f"({m.max_position_embeddings}): the model trains on longer sequences than its config says it "
                     f"handles; raise max_position_embeddings to block_size")
    if d.mixture is not None:
        problems += [f"data_args.mixture: the weight of '{folder}' must be greater than 0, got {weight:g}"
                     for folder, weight in d.mixture.items() if weight <= 0]
    if not t.do_train and not t.do_eval:
        problems.append("training_args.do_train and training_args.do_eval are both false: nothing to do")
    if t.do_eval and t.evaluation_strategy == "steps" and not t.eval_steps:
        problems.append("training_args.do_eval with evaluation_strategy 'steps' needs training_args.eval_steps "
                        "(or set evaluation_strategy: no to evaluate only at the end)")
    if t.lr_scheduler_type == "polynomial" and t.learning_rate <= POLYNOMIAL_LR_END:
        problems.append(f"training_args.learning_rate ({t.learning_rate:g}) must be above {POLYNOMIAL_LR_END:g}, the "
                        f"rate the polynomial schedule decays to; raise it or choose another lr_scheduler_type")
    elif t.lr_scheduler_type == "constant" and t.warmup_steps:
        notes.append(f"warning: training_args.lr_scheduler_type 'constant' has no warm-up, so warmup_steps "
                     f"({t.warmup_steps}) is not used; choose constant_with_warmup to warm up")
    elif t.max_steps is not None and (note := warmup_note(spec, t.max_steps)):
        notes.append(note)
    if t.push_to_hub and not t.hub_model_id:
        problems.append("training_args.push_to_hub needs training_args.hub_model_id (user/name)")
    if not m.train_from_scratch and not m.model_to_train:
        problems.append("model_args.train_from_scratch is false but model_args.model_to_train is not set: "
                        "name the model to continue training")
    if e.sample_every and not e.generation_seeds:
        problems.append("extra_args.sample_every is set but extra_args.generation_seeds is empty")
    if e.eval_tasks and not t.do_eval:
        problems.append("extra_args.eval_tasks run with the evaluations, but training_args.do_eval is false: set "
                        "do_eval true or drop eval_tasks")
    elif not e.eval_tasks and (e.eval_task_limit is not None or e.eval_include_path is not None):
        notes.append("note: extra_args.eval_task_limit and eval_include_path have no effect without "
                     "extra_args.eval_tasks")
    if t.adam_beta1 >= 1 or t.adam_beta2 >= 1:
        problems.append("training_args.adam_beta1 and adam_beta2 must be below 1")
    # Accepted so that older spec files load, but nothing here can act on them.
    if m.low_cpu_mem_usage:
        notes.append("note: model_args.low_cpu_mem_usage has no effect: transformers 5 always loads a pretrained "
                     "model without a full extra copy in CPU memory")
    if d.overwrite_cache:
        notes.append("note: data_args.overwrite_cache has no effect: the tokenized folder is read in place, so there "
                     "is no cache to overwrite")
    if d.preprocessing_num_workers is not None:
        notes.append("note: data_args.preprocessing_num_workers has no effect: each training process reads the "
                     "tokenized folder with one background thread, and tokenizing is done beforehand by "
                     "Utilities/tokenize-dataset.py (its --num-proc)")
    return problems, notes


def warmup_note(spec: Spec, max_steps: int) -> str | None:
    """The warning for a warm-up longer than a run of `max_steps` optimizer steps, with the highest rate any step
    runs with, read from the schedule the run builds; None when the warm-up fits."""
    t = spec.training
    if t.warmup_steps <= max_steps:
        return None
    highest = max(step_learning_rates(spec, max_steps))
    return (f"warning: training_args.warmup_steps ({t.warmup_steps}) is above the run's {max_steps} optimizer "
            f"steps: the learning rate rises to at most {highest:.3g} by the last step, never to learning_rate "
            f"({t.learning_rate:g}); lower warmup_steps to reach it")


def step_learning_rates(spec: Spec, max_steps: int) -> list[float]:
    """The learning rate each optimizer step 1..max_steps of a run of `spec` runs with."""
    import torch

    from pretrain.model import build_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.training.learning_rate)
    scheduler = build_scheduler(optimizer, spec, max_steps)
    # transformers' schedules are LambdaLR: the factor of the scheduler's step s is the rate of optimizer step s+1.
    factor = scheduler.lr_lambdas[0]
    return [spec.training.learning_rate * factor(step) for step in range(max_steps)]


def parse_cli(argv: typing.Sequence[str] | None, description: str):
    """Parse `--spec-file S [--dry-run] [group.key=value ...]` for a script; return (spec, args)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec-file", "--spec_file", dest="spec_file", default="specs.yaml",
                        help="YAML spec file (default: specs.yaml)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="check the spec, print it and the plan, and exit without reading data or writing")
    parser.add_argument("overrides", nargs="*", metavar="group.key=value",
                        help="values that override the spec file, e.g. training_args.max_steps=20")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec_file, args.overrides)
    if argv is None:
        # Libraries record the command line (W&B keeps it in the run's metadata): a token given as an override
        # must not travel with it.
        sys.argv[1:] = mask_secret_overrides(sys.argv[1:])
    return spec, args


def mask_secret_overrides(arguments: typing.Sequence[str]) -> list[str]:
    """The arguments with the value of every `group.<secret field>=value` override replaced by the mask."""
    masked = []
    for argument in arguments:
        dotted, sep, _ = argument.partition("=")
        secret = sep and dotted.strip().rpartition(".")[2] in SECRET_FIELDS
        masked.append(f"{dotted}={MASK}" if secret else argument)
    return masked


def yaml_scalar(value, *, quote_strings: bool = True) -> str:
    """A value as YAML writes it on one line; strings double-quoted unless asked otherwise."""
    style = '"' if quote_strings and isinstance(value, str) else None
    text = yaml.safe_dump(value, default_style=style, allow_unicode=True, width=math.inf)
    return text.strip().removesuffix("\n...")


def markdown_table() -> str:
    """Every spec field with its default and help text, as the Markdown table the README carries."""
    lines = ["| Group | Field | Default | Meaning |", "|---|---|---|---|"]
    for group_name, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "…" if isinstance(default, list) else yaml_scalar(default, quote_strings=False)
            lines.append(f"| `{group_name}` | `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(lines)


COMMENT_WIDTH = 118


def comment_lines(text: str, indent: str = "") -> list[str]:
    """`text` as YAML comment lines of at most COMMENT_WIDTH characters; a line that opens with spaces keeps them
    on every line it wraps to, and an empty line stays a bare `#`."""
    lines = []
    for paragraph in text.split("\n"):
        lead = paragraph[:len(paragraph) - len(paragraph.lstrip())]
        wrapped = textwrap.wrap(paragraph, COMMENT_WIDTH - len(indent) - 2, subsequent_indent=lead,
                                break_long_words=False, break_on_hyphens=False)
        lines += [f"{indent}# {line}" for line in wrapped] or [f"{indent}#"]
    return lines


def spec_yaml(spec: Spec, header: str) -> str:
    """A spec file for `spec`: `header` as its opening comment, then every field of every group in order, each
    under its help text."""
    lines = comment_lines(header) + [""]
    for group_name, group in spec.groups().items():
        lines.append(f"{group_name}:")
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            lines += comment_lines(f.metadata["help"], "  ")
            if isinstance(value, list) and value:
                lines += [f"  {f.name}:"] + [f"    - {yaml_scalar(item)}" for item in value]
            elif isinstance(value, dict):
                lines += [f"  {f.name}:"] + [f"    {yaml_scalar(k)}: {yaml_scalar(v)}" for k, v in value.items()]
            else:
                lines.append(f"  {f.name}: {yaml_scalar(value)}")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class ShippedSpec:
    """A spec file shipped beside this module: what it is, and the `group.key=value` changes that make it from
    specs.yaml (none for specs.yaml itself)."""
    about: str
    changes: tuple[str, ...] = ()


SHIPPED_SPECS = {
    "specs.yaml": ShippedSpec(
        "TeenyTinyLlama-160m: 162,417,408 parameters at a 32,000-token vocabulary, 2048-token context.\n"
        "Single-GPU defaults, 131,072 tokens per optimizer step (8 x 8 x 2048); see README.md for what to change for "
        "several GPUs or nodes."),
    "specs-460m.yaml": ShippedSpec(
        "TeenyTinyLlama-460m: 468,239,360 parameters at a 32,000-token vocabulary, 2048-token context.\n"
        "The 160M model of specs.yaml widened and deepened, with half its learning rate (wider models want smaller "
        "steps); single-GPU defaults, the same 131,072 tokens per optimizer step.",
        ("model_args.model_id=TeenyTinyLlama-460m", "model_args.hidden_size=1024", "model_args.intermediate_size=4096",
         "model_args.num_attention_heads=16", "model_args.num_hidden_layers=24", "model_args.num_key_value_heads=16",
         "training_args.output_dir=runs/TeenyTinyLlama-460m", "training_args.learning_rate=3.0e-4")),
    "specs-tiny.yaml": ShippedSpec(
        "A tiny Llama (623,232 parameters at a 512-token vocabulary) that trains in under a minute on a laptop CPU, "
        "1,024 tokens per optimizer step.\n"
        "It is what quickstart.py runs on the embedded Portuguese sample: the tokenizer and tokenized folder "
        "quickstart.py writes, a 300-step run with a learning rate to match the small model (evaluating, "
        "checkpointing and sampling every 100 steps), no torch.compile (compiling takes longer on the CPU than the "
        "whole run) and no bf16 autocast (slow on most CPUs).",
        ("model_args.tokenizer_name=quickstart-output/tokenizer", "model_args.model_id=TeenyTinyLlama-tiny",
         "model_args.vocab_size=512", "model_args.hidden_size=128", "model_args.intermediate_size=512",
         "model_args.max_position_embeddings=128", "model_args.num_attention_heads=4",
         "model_args.num_hidden_layers=2", "model_args.num_key_value_heads=2",
         "data_args.dataset_name=data/sample/pt-sample.jsonl", "data_args.folder_path=quickstart-output/tokenized",
         "data_args.block_size=128", "training_args.output_dir=quickstart-output/model",
         "training_args.eval_steps=100", "training_args.gradient_accumulation_steps=1",
         "training_args.learning_rate=3.0e-3", "training_args.warmup_steps=30", "training_args.max_steps=300",
         "training_args.compile_model=false", "extra_args.mixed_precision=no", "extra_args.checkpointing_steps=100",
         "extra_args.sample_every=100")),
}
WRITE_SPECS = "python specifications.py --write-specs"


def shipped_spec_header(name: str, shipped: ShippedSpec) -> str:
    """The opening comment of a shipped spec file: what it is, how to run it, and how it is written."""
    run = f"Run: python pre-training.py --spec-file {name} [group.key=value ...]   (add --dry-run to only check it)"
    if not shipped.changes:
        made_from = [f"`{WRITE_SPECS}` writes this file and the spec files made from it "
                     f"({', '.join(other for other in SHIPPED_SPECS if other != name)}) from this file's values, with "
                     f"the help texts in specifications.py as the comments: run it after changing a value here."]
    else:
        made_from = ["It is specs.yaml with these fields changed, the same as giving specs.yaml these overrides:",
                     "  " + " ".join(shlex.quote(change) for change in shipped.changes),
                     f"`{WRITE_SPECS}` writes it from specs.yaml and these changes (SHIPPED_SPECS in "
                     f"specifications.py), with the help texts there as the comments."]
    return "\n".join([shipped.about, run, "", *made_from])


def shipped_spec_texts(folder: str | os.PathLike) -> dict[str, str]:
    """The text of every shipped spec file, made from `folder`/specs.yaml's values and each file's changes."""
    base = Path(folder) / "specs.yaml"
    texts = {}
    for name, shipped in SHIPPED_SPECS.items():
        # No environment: a token there must never end up in a file.
        spec = load_spec(base, shipped.changes, environ={})
        held = [f"{group_name}.{key}" for group_name, values in spec.to_dict(mask_secrets=False).items()
                for key in SECRET_FIELDS if values.get(key)]
        if held:
            raise InputError(f"{base} holds a secret ({', '.join(held)}), which would be copied into every shipped "
                             f"spec file; set it to null and give it as {' or '.join(SECRET_FIELDS.values())} instead")
        texts[name] = spec_yaml(spec, shipped_spec_header(name, shipped))
    return texts


def write_specs(folder: str | os.PathLike) -> list[Path]:
    """Write every shipped spec file into `folder`; nothing is written unless all of them could be made."""
    written = []
    for name, text in shipped_spec_texts(folder).items():
        path = Path(folder) / name
        staging = path.with_name(f".{name}.tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
        written.append(path)
    return written


def main(argv: typing.Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Print the spec field table README.md carries, or rewrite the "
                                                 "shipped spec files from specs.yaml's values and the help texts.")
    parser.add_argument("--write-specs", action="store_true",
                        help=f"rewrite {', '.join(SHIPPED_SPECS)} (their comments are the help texts)")
    args = parser.parse_args(argv)
    if not args.write_specs:
        print(markdown_table())
        return
    for path in write_specs(ROOT):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
