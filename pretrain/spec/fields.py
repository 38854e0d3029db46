"""The spec's four groups as dataclasses, every field with its default and one-line help text: the one source
of the fields' documentation (the shipped spec files' comments and the field table of docs/spec.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from pretrain.errors import InputError

SECRET_FIELDS = {"hub_token": "HF_TOKEN", "wandb_token": "WANDB_API_KEY"}
MASK = "***"

# Spellings used by older spec files, mapped to the one name the code uses.
ALIASES = {
    "evaluation_strategy": {"step": "steps", "none": "no", "false": "no"},
    "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"},
    "mixed_precision": {"none": "no", "fp32": "no", "false": "no", "bfloat16": "bf16", "float16": "fp16"},
}
# transformers' get_scheduler names; warmup_stable_decay takes its decay phase from decay_steps and decay_shape.
SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
DECAY_SHAPES = ["1-sqrt", "linear", "cosine"]
# The share of a warmup_stable_decay run its decay takes when decay_steps is null (Hägele et al., 2024).
DEFAULT_DECAY_FRACTION = 0.2
# The final rate of cosine_with_min_lr, as a fraction of learning_rate, when min_lr_ratio is null.
COSINE_MIN_LR_RATIO = 0.1
# What extra_args.report_to may name: the trackers of accelerate that pretrain/training/tracking.py sets up.
TRACKERS = ["wandb", "tensorboard"]
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
    optimizer: str = spec_field("adamw", "adamw, or muon: torch.optim.Muon (torch 2.9 or newer) for the matrices of the decoder layers, AdamW for embeddings, output head and norms, with the same learning rate and weight decay.", choices=["adamw", "muon"])
    adam_epsilon: float = spec_field(1e-8, "AdamW epsilon.", exclusive_minimum=0)
    adam_beta1: float = spec_field(0.9, "AdamW beta1.", minimum=0)
    adam_beta2: float = spec_field(0.95, "AdamW beta2.", minimum=0)
    weight_decay: float = spec_field(0.01, "AdamW weight decay, applied to the 2-D weights only (not to biases or norms).", minimum=0)
    max_grad_norm: float | None = spec_field(1.0, "Clip the gradient norm to this value (null: no clipping).", exclusive_minimum=0)
    lr_scheduler_type: str = spec_field("cosine", "Learning-rate schedule after warm-up.", choices=SCHEDULERS)
    warmup_steps: int = spec_field(1000, "Optimizer steps of linear warm-up (longer than the run: the rate never reaches learning_rate, and a warning says how high it gets).", minimum=0)
    decay_steps: int | None = spec_field(None, "warmup_stable_decay: the last optimizer steps of the run, over which the rate decays from learning_rate (null: 20% of the run).", minimum=1)
    decay_shape: str = spec_field("1-sqrt", "warmup_stable_decay: shape of the decay: 1-sqrt, linear or cosine.", choices=DECAY_SHAPES)
    min_lr_ratio: float | None = spec_field(None, "Final rate of warmup_stable_decay and cosine_with_min_lr as a fraction of learning_rate (null: 0 for warmup_stable_decay, 0.1 for cosine_with_min_lr).", minimum=0)
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
    max_skipped_steps: int = spec_field(5, "Optimizer steps in a row skipped (a non-finite loss or gradient norm, or a spike) before rolling back to the last checkpoint.", minimum=1)
    spike_sigma: float | None = spec_field(6.0, "Skip an optimizer step whose loss or gradient norm is more than this many standard deviations above the mean of the last `spike_window` steps (null: skip only non-finite ones).", exclusive_minimum=0)
    spike_window: int = spec_field(128, "Optimizer steps whose losses and gradient norms `spike_sigma` is measured against; no step is judged a spike before the window has filled.", minimum=2)
    max_rollbacks: int = spec_field(3, "Rollbacks to the last checkpoint allowed before a diverging run stops.", minimum=0)
    early_stopping_patience: int | None = spec_field(None, "Stop after this many evaluations in a row without a new best eval loss (lower by more than early_stopping_threshold); the run then ends as at max_steps (null: never stop early).", minimum=1)
    early_stopping_threshold: float = spec_field(0.0, "The least fall of the eval loss, in nats per token, below the best so far that counts as an improvement for early_stopping_patience.", minimum=0)
    hub_model_id: str | None = spec_field(None, "Hub repository to push to, as user/name.")
    hub_token: str | None = spec_field(None, "Hub token (secret; falls back to HF_TOKEN). Never printed or saved.")


@dataclass
class ExtraArguments:
    wandb_token: str | None = spec_field(None, "Weights & Biases API key (secret; falls back to WANDB_API_KEY). Never printed or saved.")
    logger_name: str = spec_field("TeenyTinyLlama", "Name of the W&B project and of the run's logger.")
    wandb_log_steps: int = spec_field(10, "Optimizer steps between logged metrics, for metrics.jsonl and W&B alike.", minimum=1)
    with_tracking: bool = spec_field(True, "Log to the trackers of report_to (false: to none of them, whatever report_to says).")
    report_to: list[str] | None = spec_field(None, "Trackers beside metrics.jsonl: wandb, tensorboard, both, or [] for none; null: W&B alone, when a key is given or WANDB_MODE is set.")
    mixed_precision: str = spec_field("no", "Mixed precision: no, fp16 or bf16.", choices=["no", "fp16", "bf16"])
    checkpointing_steps: int | None = spec_field(1000, "Optimizer steps between checkpoints (null: only the final one).", minimum=1)
    keep_last_checkpoints: int = spec_field(0, "Keep only the newest k step_N checkpoints (0: keep all); the final one, the best one (lowest eval loss) and the one a run resumed from are always kept.", minimum=0)
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
