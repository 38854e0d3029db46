"""Tokenizer training: train-sentencepiece.py against the original's approach, on the same corpus.

    python Utilities/benchmark.py tokenizer                        # 530 MB of the repeated sample, vocabulary 8000
    python Utilities/benchmark.py tokenizer --size-mb 530 1060     # and at twice the size
    python Utilities/benchmark.py tokenizer --corpus synthetic --size-mb 100 --vocab-size 32000 --repeats 2
    python Utilities/benchmark.py tokenizer --size-mb 0.3 --vocab-size 400 --encode-mb 0.05   # seconds, a check

The corpus (pretrain/benchmarks/corpora.py: the committed sample repeated, or recombined with new words) is built
under --work-dir and reused by later runs of the same kind and size. Each variant runs in its own process, timed
from start to exit, with its own empty datasets cache:
  original  the original's approach (pretrain/benchmarks/baselines.py): load_dataset, shuffle, the whole text
            column as one Python list into SentencePieceBPETokenizer.train_from_iterator;
  ours      train-sentencepiece.py on every document (a few are held out for its report).
Reported per variant: seconds, the peak RSS summed over the process and its children (and its anonymous part),
the bytes left in its datasets cache, and, measured in this process afterwards, how fast the saved tokenizer
encodes (encode_batch_fast, MB/s over the first --encode-mb of the corpus, as they are and joined into documents
of about 256 KB) and its characters per token. --repeats alternates the variants and keeps the best time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from pretrain.benchmarks.corpora import KINDS, SAMPLE, build_corpus, count_documents, read_texts
from pretrain.benchmarks.measure import REPO, peak_memory_mib, python_module, run_measured
from pretrain.errors import InputError

VARIANTS = ("original", "ours")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=float, nargs="+", default=[530.0],
                        help="corpus sizes to measure, in MB of JSON lines")
    parser.add_argument("--corpus", choices=KINDS, default="repeated",
                        help="repeated: the sample over and over (real text); synthetic: recombined, with new words")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary both variants train")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--sample", default=str(SAMPLE), help="JSON lines corpus (field 'text') to build from")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-tokenizer"),
                        help="where the corpora are kept and the tokenizers are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternated; best time kept")
    parser.add_argument("--encode-mb", type=float, default=10.0, help="MB of the corpus to time encoding on")


def run(args) -> None:
    if min(args.size_mb) <= 0 or args.repeats < 1:
        raise InputError("--size-mb must be positive and --repeats at least 1")
    requested = [v for v in args.variants.split(",") if v]
    variants = [v for v in VARIANTS if v in requested]
    if not variants or set(requested) - set(VARIANTS):
        raise InputError(f"--variants '{args.variants}': choose from {', '.join(VARIANTS)}")
    work_dir = Path(args.work_dir).resolve()  # its commands run in the repository, not here
    for size_mb in args.size_mb:
        corpus = build_corpus(args.corpus, Path(args.sample), size_mb, args.seed, work_dir)
        results = measure_size(corpus, variants, work_dir, args)
        if len(results) == 2:
            original, ours = results["original"], results["ours"]
            print(f"ours against the original at {original['corpus_mb']} MB: "
                  f"{ours['seconds'] / original['seconds']:.2f}x the time, "
                  f"{original['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x less peak memory, "
                  f"{ours['encode_mb_per_second'] / original['encode_mb_per_second']:.2f}x the encoding speed")


def measure_size(corpus: Path, variants: list[str], work_dir: Path, args) -> dict:
    """Train with each variant on `corpus`, print and return one result line each."""
    commands = {
        "original": python_module("pretrain.benchmarks.baselines", "tokenizer", corpus, args.vocab_size,
                                  work_dir / "original"),
        "ours": [sys.executable, str(REPO / "train-sentencepiece.py"), "--dataset_name", str(corpus),
                 "--vocab_size", str(args.vocab_size), "--num_samples", str(2 ** 62), "--output_dir",
                 str(work_dir / "ours"), "--overwrite"],
    }
    runs = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            shutil.rmtree(work_dir / name, ignore_errors=True)
            runs[name].append(run_measured(commands[name], datasets_cache=work_dir / f"datasets-cache-{name}")
                              .check(f"the {name} tokenizer training"))
    texts = read_texts(corpus, args.encode_mb)
    files = {name: work_dir / name / "tokenizer.json" for name in variants}
    # Long documents too: that is where BPE over whole unsplit documents slows down.
    speeds, long_speeds = encoding_speeds(files, texts), encoding_speeds(files, join_documents(texts, 256_000))
    results = {}
    for name in variants:
        results[name] = {
            "benchmark": "tokenizer", "variant": name, "corpus": args.corpus,
            "corpus_mb": round(corpus.stat().st_size / 1e6, 1), "documents": documents_trained(name, corpus, work_dir),
            "vocab_size": args.vocab_size, "seconds": round(min(r.seconds for r in runs[name]), 2),
            **peak_memory_mib(runs[name]),
            "datasets_cache_bytes": max(r.datasets_cache_bytes for r in runs[name]),
            **speeds[name], "encode_256kb_documents_mb_per_second": long_speeds[name]["encode_mb_per_second"],
        }
        print(json.dumps(results[name]), flush=True)
    return results


def join_documents(texts: list[str], chars_per_document: int) -> list[str]:
    """The texts joined, in order, into documents of at least `chars_per_document` (the last may be shorter)."""
    documents, group, size = [], [], 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= chars_per_document:
            documents.append("\n\n".join(group))
            group, size = [], 0
    return documents + (["\n\n".join(group)] if group else [])


def encoding_speeds(tokenizer_files: dict, texts: list[str], rounds: int = 3) -> dict:
    """MB/s of encode_batch_fast (best round) and characters per token, for each tokenizer on the same texts.

    Rounds alternate between the tokenizers so that load from other jobs falls on both alike.
    """
    from tokenizers import Tokenizer

    tokenizers = {name: Tokenizer.from_file(str(path)) for name, path in tokenizer_files.items()}
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    best_seconds, num_tokens = dict.fromkeys(tokenizers, float("inf")), {}
    for _ in range(rounds):
        for name, tokenizer in tokenizers.items():
            started = time.perf_counter()
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            best_seconds[name] = min(best_seconds[name], time.perf_counter() - started)
            num_tokens[name] = sum(len(encoding.ids) for encoding in encodings)
    return {name: {"encode_mb_per_second": round(megabytes / best_seconds[name], 2),
                   "characters_per_token": round(sum(map(len, texts)) / max(num_tokens[name], 1), 3)}
            for name in tokenizers}


def documents_trained(name: str, corpus: Path, work_dir: Path) -> int:
    if name == "ours":  # a few documents are held out for its report
        return json.loads((work_dir / "ours" / "tokenizer_report.json").read_text())["documents_trained"]
    return count_documents(corpus)
