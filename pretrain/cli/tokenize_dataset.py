"""Tokenize a text corpus and pack it into fixed-length blocks, the folder that pre-training.py trains on.

The command line and flow of Utilities/tokenize-dataset.py; its docstring shows how to run it.
"""


from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from pretrain.atomic_write import atomic_dir
from pretrain.data.corpus import open_corpus
from pretrain.data.manifest import write_manifest
from pretrain.data.packing import (
    SHARD_TOKENS,
    describe_request,
    output_state,
    plan_documents,
    report,
    tokenize_and_pack,
)
from pretrain.errors import InputError
from pretrain.hub import TEXT_SUFFIXES, check_push_access, upload_dataset_folder
from pretrain.tokenizer.folder import load_tokenizer

TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS | FALSE_WORDS:
        return text.lower() in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no), not '{text}'")


def parse_test_size(text: str) -> int | float:
    """A number of blocks (an integer >= 1), a fraction of the text (0 < f < 1), or 0 for no test split."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a number of blocks (e.g. 30000), a fraction below 1 "
                                         f"(e.g. 0.01) or 0, not '{text}'")
    return int(value) if value >= 1 or value == 0 else value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-name", required=True,
                        help="local .txt/.jsonl/.parquet/.csv file or folder, save_to_disk folder, or Hub dataset")
    parser.add_argument("--dataset-split", default="train",
                        help="split of a Hub or save_to_disk dataset (default: train)")
    parser.add_argument("--text-column", default="text", help="column holding the documents (default: text)")
    parser.add_argument("--tokenizer-name", required=True, help="tokenizer folder (or a Hub name when online)")
    parser.add_argument("--block-size", type=int, default=2048,
                        help="tokens per row, the model's context (default: 2048)")
    parser.add_argument("--test-size", type=parse_test_size, default=0.01,
                        help="blocks for the test split (e.g. 30000), a fraction of the text (default: 0.01), or 0")
    parser.add_argument("--shuffle", type=parse_bool, default=True,
                        help="shuffle the documents: true/false, 1/0, yes/no (default: true)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the shuffle (default: 42)")
    parser.add_argument("--output-dir", default=None,
                        help="folder to write (train/, test/, manifest.json); default: the dataset name without its "
                             "file suffix + '-tokenized-' + the block size, e.g. "
                              "nicholasKluge/Pt-Corpus-tokenized-2048, "
                             "the name the original script pushed to the Hub")
    parser.add_argument("--num-proc", type=int, default=1,
                        help="tokenizer processes (default: 1, which already uses every core; more help on many cores)")
    parser.add_argument("--blocks-per-shard", type=int, default=None,
                        help=f"rows per parquet file (default: {SHARD_TOKENS:,} tokens' worth, ~100-250 MB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the tokenized dataset that --output-dir holds")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also upload the finished folder as this Hub dataset repository")
    parser.add_argument("--token", default=None, help="Hugging Face token; never printed or saved (default: $HF_TOKEN)")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(default_output_dir(args.dataset_name, args.block_size))
    return args


def default_output_dir(dataset_name: str, block_size: int) -> Path:
    """`<dataset>-tokenized-<block size>`, as the original script named what it pushed to the Hub: beside a local
    corpus (its file suffix dropped), or a relative folder named like the Hub repository."""
    path = Path(dataset_name)
    if path.name in ("", ".", ".."):
        path = path.resolve()
    if path.suffix.lower() in TEXT_SUFFIXES:
        path = path.with_suffix("")
    return path.with_name(f"{path.name}-tokenized-{block_size}")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_arguments(args)
    token = args.token or os.environ.get("HF_TOKEN") or None
    if args.push_to_hub:
        check_push_access(args.push_to_hub, token)
    started = time.perf_counter()
    tokenizer, tokenizer_record = load_tokenizer(args.tokenizer_name, token)
    with open_corpus(args.dataset_name, args.dataset_split, args.text_column, token, "--text-column",
                     shuffle_seed=args.seed if args.shuffle else None) as corpus:
        plan = plan_documents(corpus.document_bytes(), args, permute=corpus.random_access)
        request = describe_request(args, tokenizer, tokenizer_record, plan)
        output_dir = Path(args.output_dir)
        if output_state(output_dir, request, args.overwrite) == "done":
            print(f"'{output_dir}' already holds this dataset; nothing to do (pass --overwrite to rebuild it)")
        else:
            with atomic_dir(output_dir, overwrite=output_dir.exists()) as folder:
                splits = tokenize_and_pack(corpus, tokenizer, plan, folder, args)
                write_manifest(folder, {**request, "splits": splits})
            report(output_dir, splits, args, plan, time.perf_counter() - started)
    if args.push_to_hub:
        upload_dataset_folder(output_dir, args.push_to_hub, token)


def check_arguments(args) -> None:
    if args.block_size < 2:
        raise InputError(f"--block-size must be at least 2 (got {args.block_size}); the model's context, e.g. 2048")
    if args.num_proc < 1:
        raise InputError(f"--num-proc must be at least 1 (got {args.num_proc})")
    if args.blocks_per_shard is not None and args.blocks_per_shard < 1:
        raise InputError(f"--blocks-per-shard must be at least 1 (got {args.blocks_per_shard})")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output-dir '{args.output_dir}' is a file; give a folder")
