"""The model card of a final checkpoint: `README.md` with Hub metadata, the training set-up, results and CO2.

    write_model_card(folder, spec, state, result, hardware="1 x NVIDIA H100 80GB HBM3", loss_plot=Path("loss.png"))
    add_results_table(Path("final-checkpoint/README.md"), table, benchmarks)   # Utilities/evaluate.py --update-card

The metadata is huggingface_hub's ModelCardData: language and license from the spec, the dataset when it is a Hub
name, a model-index with the final perplexity and loss and the benchmark results (lm-evaluation-harness, when the
run had extra_args.eval_tasks), and `co2_eq_emissions` from the energy totals CodeCarbon recorded. The body names
the hyperparameters, the tokens seen, the hardware and the time, the benchmarks, and shows the loss plot.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pretrain.errors import InputError, first_line
from pretrain.hub import looks_local

RESULTS_START, RESULTS_END = "<!-- evaluation-results -->", "<!-- end: evaluation-results -->"


def card_data(spec, state, result: dict | None, hardware: str):
    """The card's YAML metadata."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = spec.data.dataset_name
    # A local corpus path is no Hub dataset id: the body names it instead.
    hub_dataset = dataset if dataset and not looks_local(dataset) else None
    extra = {}
    if state.co2_kg > 0:
        extra["co2_eq_emissions"] = {"emissions": state.co2_kg * 1000, "source": "CodeCarbon",
                                     "training_type": "pre-training",
                                     "geographical_location": spec.extra.energy_country_iso_code,
                                     "hardware_used": hardware}
    eval_results = None
    if result is not None:
        where = dict(task_type="text-generation", task_name="Causal language modeling",
                     dataset_type=hub_dataset or "custom", dataset_name=dataset or spec.data.folder_path,
                     dataset_split="test")
        eval_results = [EvalResult(metric_type="perplexity", metric_name="Perplexity",
                                   metric_value=round(result["perplexity"], 4), **where),
                        EvalResult(metric_type="loss", metric_name="Eval loss (nats/token)",
                                   metric_value=round(result["eval_loss"], 6), **where)]
    if result is not None and result.get("benchmarks") is not None:
        eval_results = (eval_results or []) + benchmark_eval_results(result["benchmarks"])
    return ModelCardData(language=spec.extra.language, license=spec.extra.license,
                         datasets=[hub_dataset] if hub_dataset else None, library_name="transformers",
                         pipeline_tag="text-generation", model_name=spec.model.model_id,
                         tags=["pre-training", "llama"], eval_results=eval_results, **extra)


def card_text(spec, state, result: dict | None, hardware: str, parameters: int, loss_plot: bool) -> str:
    """The card's Markdown body."""
    m, t, e = spec.model, spec.training, spec.extra
    hours = state.run_seconds / 3600
    lines = [f"# {m.model_id}", "",
             f"A Llama model of {parameters:,} parameters pre-trained from scratch by causal language modeling"
             f" on {spec.data.dataset_name or spec.data.folder_path} (language: {e.language}).", "",
             "## Training", "",
             f"- Tokens seen: {state.tokens_seen:,} in {state.step:,} optimizer steps",
             f"- Hardware: {hardware}",
             f"- Time: {hours:.3g} hours of wall-clock (start-up, evaluation and checkpoints included)"]
    if getattr(state, "branched_from", None):
        source = state.branched_from
        lines.append(f"- Branched from the run in {source['run']} at step {source['step']:,} (checkpoint "
                     f"{source['checkpoint']}): the steps up to there are that run's")
    if getattr(state, "stopped_early", False):
        lines.append(f"- Stopped early at step {state.step:,}: {state.evaluations_without_improvement} evaluations in "
                     f"a row without a new best eval loss (early_stopping_patience {t.early_stopping_patience})")
    if state.energy_kwh > 0:
        lines.append(f"- Energy: {state.energy_kwh:.4g} kWh, {state.co2_kg:.4g} kg CO2eq (CodeCarbon, electricity "
                     f"mix of {e.energy_country_iso_code})")
    lines += ["", "| Hyperparameter | Value |", "|---|---|"]
    for name, value in hyperparameters(spec, parameters):
        lines.append(f"| {name} | {value} |")
    if result is not None:
        lines += ["", "## Evaluation", "",
                  f"On the test split of the tokenized corpus ({result.get('eval_tokens', 0):,} tokens): eval loss "
                  f"{result['eval_loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}."]
        lines += best_lines(spec, state)
        if result.get("benchmarks") is not None:
            lines += ["", *benchmark_lines(result["benchmarks"])]
    if loss_plot:
        lines += ["", "![Training and eval loss against tokens seen](loss.png)"]
    lines += ["", "## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("MODEL")',
              'model = AutoModelForCausalLM.from_pretrained("MODEL")',
              f'inputs = tokenizer({e.generation_seeds[0]!r}, return_tensors="pt")' if e.generation_seeds else
              'inputs = tokenizer("...", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0], skip_special_tokens=True))",
              "```", ""]
    return "\n".join(lines).replace("MODEL", t.hub_model_id or m.model_id)


def best_lines(spec, state) -> list[str]:
    """Where the run's best checkpoint (lowest eval loss) is, when the card can name it."""
    import math

    if getattr(state, "best_step", None) is None:
        return []
    if state.best_checkpoint == "final-checkpoint":
        return ["", "This is the run's best checkpoint: no evaluation during training had a lower eval loss."]
    where = f"`{state.best_checkpoint}/` in the run's output folder"
    if spec.training.push_to_hub and spec.training.hub_model_id:
        revision = state.best_checkpoint.replace("_", "-")
        where += (f", and on the Hub as revision `{revision}` (`from_pretrained(\"{spec.training.hub_model_id}\", "
                  f"revision=\"{revision}\")`)")
    return ["", f"Best checkpoint: step {state.best_step:,}, with eval loss {state.best_eval_loss:.4f} (perplexity "
                f"{math.exp(state.best_eval_loss):.2f}), the lowest of the run; its weights are {where}."]


def benchmark_eval_results(benchmarks) -> list:
    """One model-index entry per benchmark metric: the harness task as task and dataset (its Hub dataset as the
    dataset's type when it has one), the few-shot count as the dataset's arguments."""
    from huggingface_hub import EvalResult

    from pretrain.evaluation.harness import HARNESS_URL, display_name

    results = []
    for key, value in benchmarks.metrics.items():
        task, metric = display_name(key).split("/", 1)
        info = benchmarks.tasks.get(task, {})
        dataset = info.get("dataset")
        shots = info.get("num_fewshot")
        results.append(EvalResult(
            task_type="text-generation", task_name=task,
            dataset_type=dataset if dataset and "/" in dataset and not looks_local(dataset) else task,
            dataset_name=task, dataset_config=info.get("dataset_config"), dataset_split=info.get("split"),
            dataset_args={"num_few_shot": shots} if shots is not None else None,
            metric_type=metric, metric_name=f"{metric}{examples_note(info)}", metric_value=round(value, 6),
            source_name="lm-evaluation-harness", source_url=HARNESS_URL))
    return results


def examples_note(info: dict) -> str:
    """' (first 20 of 1,172 examples)' for a task run on part of its examples (a limit), else ''."""
    examples, total = info.get("examples"), info.get("total")
    return f" (first {examples:,} of {total:,} examples)" if examples and total and examples < total else ""


def benchmark_lines(benchmarks) -> list[str]:
    """The card's table of benchmark results."""
    from pretrain.evaluation.harness import display_name

    lines = [f"Benchmarks of lm-evaluation-harness {benchmarks.harness_version or ''}".rstrip() +
             ", with one `<s>` before every document and context as in training:", "",
             "| task | shots | examples | metric | value |", "|---|---|---|---|---|"]
    for key, value in benchmarks.metrics.items():
        task, metric = display_name(key).split("/", 1)
        info = benchmarks.tasks.get(task, {})
        shots = "" if info.get("num_fewshot") is None else info["num_fewshot"]
        examples = "" if info.get("examples") is None else f"{info['examples']:,}"
        lines.append(f"| {task} | {shots} | {examples} | {metric} | {value:.4f} |")
    return lines


def hyperparameters(spec, parameters: int) -> list[tuple[str, str]]:
    m, d, t, e = spec.model, spec.data, spec.training, spec.extra
    return [("parameters", f"{parameters:,}"), ("layers", m.num_hidden_layers), ("hidden size", m.hidden_size),
            ("intermediate size", m.intermediate_size),
            ("attention heads (key/value)", f"{m.num_attention_heads} ({m.num_key_value_heads})"),
            ("vocabulary", f"{m.vocab_size:,}"), ("block size (tokens)", d.block_size),
            ("per-device batch size", t.per_device_train_batch_size),
            ("gradient accumulation steps", t.gradient_accumulation_steps),
            ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler_type}, {t.warmup_steps} warm-up steps)"),
            ("AdamW betas, epsilon", f"({t.adam_beta1}, {t.adam_beta2}), {t.adam_epsilon:g}"),
            ("weight decay", t.weight_decay), ("max grad norm", t.max_grad_norm),
            ("mixed precision", e.mixed_precision), ("seed", t.seed)]


def hardware_description(accelerator) -> str:
    import platform

    import torch

    count = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{count} {accelerator.device.type.upper()} process(es) ({platform.processor() or platform.machine()})"


def parameters_of(folder: Path) -> int:
    """Parameters of the checkpoint's model, counted from its config on the meta device (nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pretrain.model.build import count_parameters

    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)))


def write_model_card(folder: Path, spec, state, result: dict | None, *, hardware: str,
                     loss_plot: Path | None = None) -> Path:
    """Write folder/README.md (and a copy of the loss plot beside it); the card appears whole or not at all."""
    from huggingface_hub import ModelCard

    has_plot = loss_plot is not None and loss_plot.is_file()
    if has_plot:
        shutil.copyfile(loss_plot, folder / "loss.png")
    data = card_data(spec, state, result, hardware)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + card_text(spec, state, result, hardware,
                                                                  parameters_of(folder), has_plot))
    return _save(card, folder / "README.md")


def add_results_table(card_path: Path, table: str, benchmarks=None) -> Path:
    """Put `table` into the card's section of checkpoint results, replacing an earlier one; `benchmarks` (harness
    results) also go into the model-index, in place of earlier results of the same task, dataset and metric."""
    card = load_card(card_path)
    if benchmarks is not None and benchmarks.metrics:
        new = benchmark_eval_results(benchmarks)
        kept = [old for old in card.data.eval_results or [] if not any(old.is_equal_except_value(n) for n in new)]
        card.data.eval_results = kept + new
        card.data.model_name = card.data.model_name or card_path.parent.name
    section = f"{RESULTS_START}\n## Evaluation of the checkpoints\n\n{table}\n{RESULTS_END}"
    pattern = re.compile(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.S)
    if pattern.search(card.text):
        card.text = pattern.sub(lambda _: section, card.text)
    else:
        card.text = card.text.rstrip("\n") + "\n\n" + section + "\n"
    return _save(card, card_path)


def load_card(card_path: Path):
    from huggingface_hub import ModelCard

    if not card_path.is_file():
        raise InputError(f"--update-card '{card_path}' is not a file; give the README.md of a checkpoint "
                         f"(final-checkpoint/README.md)")
    try:
        return ModelCard.load(card_path)
    except Exception as error:  # a malformed YAML block, a file that is no text
        raise InputError(f"--update-card '{card_path}' is not a model card ({first_line(error)}); give the "
                         f"README.md that pre-training.py wrote") from None


def _save(card, path: Path) -> Path:
    staging = path.with_name(f".{path.name}.tmp")
    card.save(staging)
    os.replace(staging, path)
    return path
