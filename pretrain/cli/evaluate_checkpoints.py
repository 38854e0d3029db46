"""Utilities/evaluate.py: the eval loss and perplexity of saved checkpoints on a tokenized folder's test split, and
their downstream benchmarks with lm-evaluation-harness.

    main(["output", "--data", "data/pt-corpus-tokenized"])   # as `python Utilities/evaluate.py` does
    main(["output", "--data", "data/pt-corpus-tokenized", "--tasks", "portuguese", "--limit", "100"])

A run's output_dir stands for every complete step_N and its final-checkpoint. The numbers come from the function
pre-training.py evaluates with (pretrain/evaluation/perplexity.py), in the mixed precision the checkpoint was trained
with, so they equal what the run logged for the same checkpoint. --tasks adds the harness's benchmarks
(pretrain/evaluation/harness.py, the function pre-training.py runs them with), one column per metric. Results: a
Markdown table on stdout,
evaluation.csv, evaluation.json and perplexity.png (perplexity, and each benchmark metric, against tokens seen) in
--output-dir; --update-card adds the table to a model card, and the last checkpoint's benchmarks to its model-index.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path

import yaml

from pretrain.errors import InputError, first_line
from pretrain.evaluation.harness import PRESETS, benchmark_keys, display_name, plot_with_benchmarks, resolve_tasks
from pretrain.hub import looks_local, require_hub
from pretrain.training.checkpoints import step_folders

COLUMNS = ["checkpoint", "step", "tokens_seen", "eval_loss", "perplexity", "eval_tokens", "energy_kwh", "co2_kg",
           "best"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders, a run's output_dir, or a Hub repository")
    parser.add_argument("--data", required=True, help="tokenized folder (written by Utilities/tokenize-dataset.py) "
                                                      "whose test/ split is evaluated on")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per evaluation batch (default 8)")
    parser.add_argument("--revisions", nargs="+", default=None,
                        help="branches, tags or commits of a Hub repository to evaluate (default: main)")
    parser.add_argument("--output-dir", default=None,
                        help="where evaluation.csv/.json and perplexity.png go (default: the run folder when one "
                             "is given, else the current folder)")
    parser.add_argument("--update-card", default=None, metavar="CARD",
                        help="a model card (README.md) to add the results table to")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="Hub token (default: HF_TOKEN)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="lm-evaluation-harness tasks to benchmark each checkpoint on, comma or space separated, "
                             "or a preset: " + ", ".join(PRESETS))
    parser.add_argument("--include-path", nargs="+", default=None, metavar="FOLDER",
                        help="folders of your own harness task YAML files, beside the harness's own tasks")
    parser.add_argument("--limit", type=int, default=None, help="examples per benchmark task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples for every task (default: a preset's counts, else each task's own)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.update_card is not None:
        from pretrain.export.model_card import load_card

        load_card(Path(args.update_card))  # a card that cannot be updated stops the command before any work
    tasks = benchmark_tasks(args)
    checkpoints, run_folder = find_checkpoints(args.checkpoints, args.revisions, args.token)
    output_dir = Path(args.output_dir) if args.output_dir else run_folder or Path.cwd()
    rows, last_benchmarks = evaluate_checkpoints(checkpoints, Path(args.data), args.batch_size, tasks, args.limit)
    table = markdown_table(rows)
    print(table)
    for path in write_results(rows, output_dir):
        print(f"wrote {path}")
    if args.update_card is not None:
        from pretrain.export.model_card import add_results_table

        print(f"updated {add_results_table(Path(args.update_card), table, last_benchmarks)}")


def benchmark_tasks(args):
    """The checked --tasks (None without), every task's data loaded, before any checkpoint is looked at."""
    if args.tasks is None:
        given = [option for option, value in (("--include-path", args.include_path), ("--limit", args.limit),
                                              ("--num-fewshot", args.num_fewshot)) if value is not None]
        if given:
            raise InputError(f"{given[0]} is for the benchmarks of --tasks; add --tasks or drop {given[0]}")
        return None
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, not {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be at least 0, not {args.num_fewshot}")
    return resolve_tasks(args.tasks, args.include_path, args.num_fewshot)


# ----------------------------------------------------------------------------------------------------------------
# What to evaluate

def find_checkpoints(names: list[str], revisions: list[str] | None, token: str | None):
    """[(label, folder)] for every name given, and the run folder when exactly one run's output_dir was given."""
    found, runs = [], []
    for name in names:
        if not looks_local(name):
            found += download_revisions(name, revisions or ["main"], token)
            continue
        path = Path(name).expanduser()
        if revisions:
            raise InputError(f"--revisions is for a Hub repository, but '{name}' is a local path; drop --revisions")
        if (path / "config.json").is_file():
            found.append((path.name, path))
        elif path.is_dir() and (run := run_checkpoints(path)):
            found += run
            runs.append(path)
        elif not path.exists():
            raise InputError(f"checkpoint '{name}' does not exist; give a checkpoint folder (output_dir/step_N, "
                             f"output_dir/final-checkpoint), a run's output_dir or a Hub repository")
        else:
            raise InputError(f"'{name}' is neither a checkpoint (no config.json) nor a run's output_dir (no "
                             f"complete step_N or final-checkpoint in it); give one of those")
    return found, runs[0] if len(runs) == 1 and len(names) == 1 else None


def run_checkpoints(output_dir: Path) -> list[tuple[str, Path]]:
    """The complete checkpoints of a run, oldest first: step_N, then final-checkpoint."""
    found = [(folder.name, folder) for _, folder in step_folders(output_dir)]
    final = output_dir / "final-checkpoint"
    if (final / "trainer_state.json").is_file():
        found.append((final.name, final))
    return found


def download_revisions(repo_id: str, revisions: list[str], token: str | None) -> list[tuple[str, Path]]:
    require_hub("checkpoint", repo_id)
    from huggingface_hub import snapshot_download

    found = []
    for revision in revisions:
        try:
            folder = snapshot_download(repo_id, revision=revision, token=token, ignore_patterns=["accelerate_state/*"])
        except Exception as error:  # unknown repository or revision, gated, no permission
            raise InputError(f"could not download revision '{revision}' of '{repo_id}' from the Hub "
                             f"({first_line(error)}); check the name and --revisions, or pass a local folder") from None
        found.append((f"{repo_id}@{revision}", Path(folder)))
    return found


# ----------------------------------------------------------------------------------------------------------------
# Evaluating

def evaluate_checkpoints(checkpoints: list[tuple[str, Path]], data: Path, batch_size: int, tasks=None,
                         limit: int | None = None) -> tuple[list[dict], object]:
    """One row per checkpoint, in the order given (with `tasks`, its benchmark metrics in it), and the last
    checkpoint's BenchmarkResults for its model card (None without tasks); every input is checked before the first
    model is evaluated."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from pretrain.data.tokenized_folder import open_tokenized_folder
    from pretrain.evaluation.harness import benchmark_on_main_process
    from pretrain.evaluation.perplexity import evaluate

    specs = [saved_spec(folder) for _, folder in checkpoints]
    configs = [model_config(folder) for _, folder in checkpoints]
    tokenizers = [checkpoint_tokenizer(folder) if tasks else None for _, folder in checkpoints]
    block_size = specs[0].get("data_args", {}).get("block_size") or manifest_block_size(data)
    _, test_split = open_tokenized_folder(data, block_size=block_size,
                                          vocab_size=min(config.vocab_size for config in configs),
                                          need_train=False, need_test=True)
    precisions = sorted({spec.get("extra_args", {}).get("mixed_precision") or "no" for spec in specs})
    if len(precisions) > 1:
        # One Accelerator per process, so one autocast: a checkpoint evaluated in another precision than it trained
        # in would not reproduce the numbers its run logged.
        raise InputError(f"the checkpoints were trained in different mixed precision ({', '.join(precisions)}); "
                         f"evaluate the checkpoints of each precision in a call of their own")
    accelerator = Accelerator(mixed_precision=precisions[0])
    rows, benchmark = [], None
    for (label, folder), spec, tokenizer in tqdm(list(zip(checkpoints, specs, tokenizers)), desc="evaluating",
                                                 unit="checkpoint", disable=not accelerator.is_local_main_process):
        model = accelerator.prepare(load_model(folder, spec))
        documents = document_ids(spec, accelerator.unwrap_model(model).config)
        result = evaluate(accelerator, model, test_split, batch_size, documents=documents)
        rows.append(result_row(label, folder, result))
        if tasks:
            benchmark = benchmark_on_main_process(
                accelerator, accelerator.unwrap_model(model) if accelerator.is_main_process else None, tokenizer,
                tasks, limit=limit, batch_size=batch_size, max_length=block_size)
            rows[-1].update(benchmark.metrics)
        accelerator.free_memory(model)
    mark_best(rows)
    return rows, benchmark


def mark_best(rows: list[dict]):
    """Set `best` on the row with the lowest eval loss (the earliest of equals), False on the others."""
    finite = [row for row in rows if math.isfinite(row["eval_loss"])]
    best = min(finite, key=lambda row: row["eval_loss"]) if finite else None
    for row in rows:
        row["best"] = row is best


def document_ids(spec: dict, config) -> tuple[int | None, int | None] | None:
    """(BOS, EOS) when the checkpoint was trained with documents kept apart, so that it is evaluated as its run did."""
    if not spec.get("data_args", {}).get("document_attention"):
        return None
    return config.bos_token_id, config.eos_token_id


def saved_spec(folder: Path) -> dict:
    path = folder / "spec.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def model_config(folder: Path):
    from transformers import AutoConfig

    return from_checkpoint(AutoConfig, folder, "model config", "")


def checkpoint_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return from_checkpoint(AutoTokenizer, folder, "tokenizer", ", which the benchmarks need")


def from_checkpoint(auto_class, folder: Path, what: str, need: str):
    """auto_class.from_pretrained(folder), or the one-line error naming the part of the checkpoint that is missing."""
    try:
        return auto_class.from_pretrained(folder)
    except Exception as error:  # transformers raises many kinds for a folder it cannot read
        raise InputError(f"checkpoint '{folder}' has no readable {what} ({first_line(error)}){need}; give a folder "
                         f"that pre-training.py wrote") from None


def manifest_block_size(data: Path) -> int:
    from pretrain.data.manifest import read_manifest

    manifest = read_manifest(data) if data.is_dir() else None
    if manifest is None or not manifest.get("block_size"):
        raise InputError(f"the checkpoint has no spec.yaml and '{data}' no manifest.json, so the block size is "
                         f"unknown; give a tokenized folder written by Utilities/tokenize-dataset.py")
    return int(manifest["block_size"])


def load_model(folder: Path, spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from pretrain.model.build import attention_implementation

    attention = attention_implementation(spec.get("model_args", {}).get("attn_implementation") or "sdpa", print)
    # float32 as training holds its weights; autocast (from the Accelerator) lowers the matmuls as training did.
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)


def result_row(label: str, folder: Path, result: dict) -> dict:
    state_path = folder / "trainer_state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    row = {"checkpoint": label, "step": state.get("step"), "tokens_seen": state.get("tokens_seen"), **result}
    # Zero means nothing was measured (energy tracking off), not a free run.
    for key in ("energy_kwh", "co2_kg"):
        row[key] = state.get(key) or None
    return {column: row.get(column) for column in COLUMNS}


# ----------------------------------------------------------------------------------------------------------------
# Results

def markdown_table(rows: list[dict]) -> str:
    energy = any(row["energy_kwh"] for row in rows)
    benchmarks = benchmark_keys(rows)
    header = ["checkpoint", "step", "tokens seen", "eval loss", "perplexity"] + \
        (["energy (kWh)", "CO2 (kg)"] if energy else []) + [display_name(key) for key in benchmarks] + \
        ["best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["checkpoint"], _number(row["step"]), _number(row["tokens_seen"]), f"{row['eval_loss']:.4f}",
                 f"{row['perplexity']:.2f}"]
        if energy:
            cells += [_number(row["energy_kwh"], ".4g"), _number(row["co2_kg"], ".4g")]
        cells += [_number(row.get(key), ".4f") for key in benchmarks]
        cells.append("yes" if row.get("best") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, spec: str = ",") -> str:
    return "" if value is None else format(value, spec)


def write_results(rows: list[dict], output_dir: Path) -> list[Path]:
    """evaluation.csv, evaluation.json and perplexity.png, each written whole or not at all."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "evaluation.csv", output_dir / "evaluation.json", output_dir / "perplexity.png"]
    writers = [_write_csv, _write_json, _plot_perplexity]
    for path, write in zip(paths, writers):
        staging = path.with_name(f".{path.stem}.tmp{path.suffix}")
        write(rows, staging)
        os.replace(staging, path)
    return paths


def _write_csv(rows: list[dict], path: Path):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS + benchmark_keys(rows))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _write_json(rows: list[dict], path: Path):
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def _plot_perplexity(rows: list[dict], path: Path):
    points = sorted((row["tokens_seen"], row["perplexity"]) for row in rows
                    if row["tokens_seen"] is not None and math.isfinite(row["perplexity"]))
    best = next((row for row in rows if row.get("best") and row["tokens_seen"] is not None), None)

    def draw_perplexity(axes):
        if points:
            axes.plot(*zip(*points), "o-", label="test perplexity")
            if best is not None:
                axes.plot([best["tokens_seen"]], [best["perplexity"]], "*", markersize=16, color="tab:red",
                          label=f"best: {best['checkpoint']} (eval loss {best['eval_loss']:.4f})")
            axes.legend()
        axes.set_xlabel("tokens seen")
        axes.set_ylabel("perplexity")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)

    # Beside the perplexity, a panel for each benchmark metric.
    plot_with_benchmarks(path, rows, draw_perplexity)
