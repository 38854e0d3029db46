"""Muon against AdamW at equal tokens: a learning-rate sweep for each on a small Llama, then the best of each.

    python Utilities/benchmark.py optimizer --work-dir runs/bench-optimizer     # the figures in docs/benchmarks.md
    python Utilities/benchmark.py optimizer --smoke --work-dir /tmp/bench-opt    # a tiny run that checks it works

Builds a synthetic Portuguese corpus (pretrain/benchmarks/corpora.py), trains a tokenizer on it and tokenizes it
with the suite's own scripts, then trains the same model from the same seed through pre-training.py with each
optimizer and learning rate, for the same steps and tokens, evaluating on the test split every `--eval-steps`.
Prints one JSON line per run (final eval loss, eval curve, skipped steps, seconds), then one per optimizer: its
best learning rate, its final eval loss, and the tokens its best run took to reach AdamW's best final eval loss
(null: never), and last a Markdown table of the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrain.benchmarks.corpora import SAMPLE, build_corpus
from pretrain.benchmarks.measure import OFFLINE_ENV, REPO
from pretrain.errors import InputError

OPTIMIZERS = ("adamw", "muon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-optimizer"),
                        help="where the corpus, tokenizer, tokenized data and runs are written")
    parser.add_argument("--corpus-mb", type=float, default=3.0, help="MB of generated Portuguese-like text")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (and key-value heads)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    parser.add_argument("--warmup-steps", type=int, default=15, help="warm-up steps of every run")
    parser.add_argument("--eval-steps", type=int, default=25, help="steps between evaluations")
    parser.add_argument("--adamw-learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2],
                        help="peak learning rates tried with AdamW")
    parser.add_argument("--muon-learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2],
                        help="peak learning rates tried with Muon (scaled to match AdamW's update size)")
    parser.add_argument("--parallel", type=int, default=3, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus; the runs use the spec's seed")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny corpus, model and run, one learning rate each: checks that it works")


def run(args) -> None:
    if args.smoke:
        args.corpus_mb, args.vocab_size, args.block_size, args.hidden_size, args.layers = 0.1, 384, 64, 32, 2
        args.heads, args.batch_size, args.steps, args.warmup_steps, args.eval_steps = 2, 4, 6, 2, 3
        args.adamw_learning_rates, args.muon_learning_rates = [3e-3], [3e-3]
    if args.hidden_size % args.heads:
        raise InputError(f"--hidden-size ({args.hidden_size}) must be divisible by --heads ({args.heads})")
    work = Path(args.work_dir)
    tokenizer, data = prepare_data(args, work)
    planned = [(name, rate) for name in OPTIMIZERS for rate in getattr(args, f"{name}_learning_rates")]
    with ThreadPoolExecutor(max(args.parallel, 1)) as pool:
        results = list(pool.map(lambda job: train(args, work, tokenizer, data, *job), planned))
    for result in results:
        print(json.dumps(result), flush=True)
    summary = summarize(results)
    for line in summary:
        print(json.dumps(line), flush=True)
    print(markdown_table(summary, results))


def prepare_data(args, work: Path) -> tuple[Path, Path]:
    """The corpus, its tokenizer and its tokenized folder under `work`, each made once and reused."""
    corpus = build_corpus("synthetic", SAMPLE, size_mb=args.corpus_mb, seed=args.seed, work_dir=work)
    tokenizer = corpus.parent / f"tokenizer-{args.vocab_size}"
    if not (tokenizer / "tokenizer.json").is_file():
        script("train-sentencepiece.py", "--dataset_name", corpus, "--vocab_size", args.vocab_size,
               "--output_dir", tokenizer)
    data = corpus.parent / f"tokenized-{args.vocab_size}-{args.block_size}"
    if not (data / "manifest.json").is_file():
        script("Utilities/tokenize-dataset.py", "--dataset-name", corpus, "--tokenizer-name", tokenizer,
               "--block-size", args.block_size, "--test-size", 0.02, "--output-dir", data)
    return tokenizer, data


def script(path: str, *arguments, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / path), *map(str, arguments)], capture_output=True, text=True,
                            env={**os.environ, **OFFLINE_ENV, **(env or {})}, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{path} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def train(args, work: Path, tokenizer: Path, data: Path, optimizer: str, learning_rate: float) -> dict:
    """One pre-training.py run; its eval curve from metrics.jsonl."""
    output = work / "runs" / f"{optimizer}-lr{learning_rate:g}"
    overrides = [
        f"model_args.tokenizer_name={tokenizer}", f"model_args.vocab_size={args.vocab_size}",
        f"model_args.hidden_size={args.hidden_size}", f"model_args.intermediate_size={args.hidden_size * 8 // 3}",
        f"model_args.num_hidden_layers={args.layers}", f"model_args.num_attention_heads={args.heads}",
        f"model_args.num_key_value_heads={args.heads}", f"model_args.max_position_embeddings={args.block_size}",
        f"data_args.folder_path={data}", f"data_args.block_size={args.block_size}",
        f"training_args.output_dir={output}", f"training_args.optimizer={optimizer}",
        f"training_args.learning_rate={learning_rate}", f"training_args.max_steps={args.steps}",
        f"training_args.warmup_steps={args.warmup_steps}", f"training_args.eval_steps={args.eval_steps}",
        f"training_args.per_device_train_batch_size={args.batch_size}", "training_args.gradient_accumulation_steps=1",
        "training_args.per_device_eval_batch_size=32", "training_args.lr_scheduler_type=cosine",
        "training_args.do_eval=true", "training_args.compile_model=false", "extra_args.sample_every=null",
        "extra_args.checkpointing_steps=null", "extra_args.track_energy=false", "extra_args.wandb_log_steps=1",
    ]
    if (output / "final-checkpoint" / "trainer_state.json").is_file():
        seconds = None  # a finished run is read again, not repeated
    else:
        started = time.perf_counter()
        script("pre-training.py", "--spec-file", "specs-tiny.yaml", *overrides,
               env={"OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
        seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [[r["tokens_seen"], r["eval_loss"]] for r in records if "eval_loss" in r]
    state = json.loads((output / "final-checkpoint" / "trainer_state.json").read_text())
    return {"optimizer": optimizer, "learning_rate": learning_rate, "final_eval_loss": curve[-1][1],
            "tokens": state["tokens_seen"], "skipped_steps": state["skipped_steps"], "seconds": seconds,
            "eval_curve": curve, "output_dir": str(output)}


def tokens_to_reach(curve: list, target: float) -> float | None:
    """Tokens at which an eval curve first reaches `target`, interpolated between evaluations; None if never."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return tokens
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def summarize(results: list[dict]) -> list[dict]:
    """Per optimizer, its best run (lowest final eval loss) and the tokens that run took to reach AdamW's best."""
    best = {name: min((r for r in results if r["optimizer"] == name), key=lambda r: r["final_eval_loss"])
            for name in OPTIMIZERS if any(r["optimizer"] == name for r in results)}
    target = best["adamw"]["final_eval_loss"] if "adamw" in best else None
    lines = []
    for name, result in best.items():
        reached = tokens_to_reach(result["eval_curve"], target) if target is not None else None
        lines.append({"optimizer": name, "best_learning_rate": result["learning_rate"],
                      "final_eval_loss": result["final_eval_loss"], "tokens": result["tokens"],
                      "tokens_to_adamw_final_loss": reached,
                      "share_of_adamw_tokens": reached / best["adamw"]["tokens"] if reached is not None else None})
    return lines


def markdown_table(summary: list[dict], results: list[dict]) -> str:
    rows = ["| optimizer | learning rate | final eval loss | tokens to AdamW's final loss |", "|---|---|---|---|"]
    best_rates = {line["optimizer"]: line["best_learning_rate"] for line in summary}
    reached = {line["optimizer"]: line for line in summary}
    for result in results:
        mark = "**" if best_rates.get(result["optimizer"]) == result["learning_rate"] else ""
        line = reached[result["optimizer"]]
        to_target = "" if not mark else ("never" if line["tokens_to_adamw_final_loss"] is None else
                                         f"{line['tokens_to_adamw_final_loss']:,.0f} "
                                         f"({line['share_of_adamw_tokens']:.0%})")
        rows.append(f"| {result['optimizer']} | {result['learning_rate']:g} | {mark}{result['final_eval_loss']:.4f}"
                    f"{mark} | {to_target} |")
    return "\n".join(rows)
