"""Train a Llama 2-style SentencePiece BPE tokenizer (byte fallback, ids <unk>=0 <s>=1 </s>=2 <pad>=3).

The command line and flow of train-sentencepiece.py; its docstring shows how to run it.
"""


from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pretrain.atomic_write import atomic_dir
from pretrain.data.corpus import open_corpus
from pretrain.errors import InputError
from pretrain.tokenizer.conventions import BYTE_TOKENS, MIN_VOCAB_SIZE, SPACE, SPECIAL_TOKENS
from pretrain.tokenizer.training import (
    check_round_trip,
    measure,
    print_summary,
    reference_settings,
    sample_documents,
    save,
    train,
    training_batches,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset_name", required=True, help="local file/folder or Hub dataset name")
    parser.add_argument("--dataset_split", default="train", help="split to read (Hub datasets, DatasetDict folders)")
    parser.add_argument("--text_column", default="text", help="column holding the documents; others are ignored")
    parser.add_argument("--hub_token", default=os.environ.get("HF_TOKEN"),
                        help="Hub token for private or gated data (default: $HF_TOKEN); never printed or saved")
    parser.add_argument("--reference_tokenizer", default=None,
                        help="tokenizer whose pipeline settings to copy (local folder or Hub name); default: "
                             "the built-in Llama 2 settings")
    parser.add_argument("--num_samples", type=int, default=2_000_000, help="documents to train on")
    parser.add_argument("--vocab_size", type=int, default=32000, help="tokens in the vocabulary, specials included")
    parser.add_argument("--output_dir", default="new-llama-tokenizer", help="folder to write the tokenizer to")
    parser.add_argument("--seed", type=int, default=42, help="seed of the document sample")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    return parser.parse_args(argv)


def validate(args) -> None:
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise InputError(f"--vocab_size {args.vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                         f"({len(SPECIAL_TOKENS)} special tokens, {len(BYTE_TOKENS)} byte tokens and '{SPACE}'); "
                         f"pass a larger value")
    if args.num_samples <= 0:
        raise InputError(f"--num_samples must be positive (got {args.num_samples}); pass the number of documents "
                         f"to train on")
    if Path(args.output_dir).exists() and not args.overwrite:
        raise InputError(f"'{args.output_dir}' already exists; remove it, choose another --output_dir or pass "
                         f"--overwrite")


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    validate(args)
    settings = reference_settings(args.reference_tokenizer, args.hub_token)
    with open_corpus(args.dataset_name, args.dataset_split, args.text_column, args.hub_token, "--text_column",
                     shuffle_seed=args.seed) as corpus:
        sample = sample_documents(corpus, args.num_samples, args.seed)
        totals = {"documents": 0, "characters": 0}
        training_started = time.perf_counter()
        tokenizer = train(settings, training_batches(sample.training_texts(), totals), args.vocab_size,
                          show_progress=sys.stderr.isatty())
        training_seconds = time.perf_counter() - training_started
        if totals["characters"] == 0:
            raise InputError(f"column '{args.text_column}' of '{args.dataset_name}' holds no text; give documents "
                             f"that are not empty")
        check_round_trip(tokenizer, settings)
        measured_texts, on_held_out = sample.measured_texts()
    report = {
        "dataset_name": args.dataset_name, "dataset_split": args.dataset_split, "text_column": args.text_column,
        "seed": args.seed, "settings_from": settings["source"],
        "vocab_size_requested": args.vocab_size, "vocab_size": tokenizer.get_vocab_size(),
        "documents_trained": totals["documents"], "characters_trained": totals["characters"],
        "documents_measured": len(measured_texts), "measured_on_held_out": on_held_out,
        **measure(tokenizer, measured_texts),
        "seconds_training": round(training_seconds, 3),
    }
    with atomic_dir(args.output_dir, overwrite=args.overwrite) as folder:
        save(tokenizer, folder)
        report["seconds_total"] = round(time.perf_counter() - started, 3)
        (folder / "tokenizer_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    print_summary(report, args.output_dir)
