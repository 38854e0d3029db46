"""Tokenizing and packing a corpus: the original's datasets.map + group_texts against tokenize-dataset.py.

    python Utilities/benchmark.py tokenize                        # 100 MB corpus, a tokenizer trained on the sample
    python Utilities/benchmark.py tokenize --corpus-mb 100 200 --tokenizer-name path/to/tokenizer

On one synthesized corpus (the committed sample's sentences recombined into documents, deterministically, until
the file reaches --corpus-mb), each variant runs in its own subprocess, timed from start to exit, with the peak
RSS of that process and its children sampled every 20 ms (and the peak of its anonymous part, RSS less the
pages of mapped files, which the kernel can take back at any time):
  original  the original script's approach: datasets.map(tokenizer), its Python group_texts, train_test_split,
            written to parquet;
  ours      Utilities/tokenize-dataset.py, end to end;
  encode    the fast tokenizer alone encoding the documents (encode_batch_fast over batches of the texts,
            already in memory): the floor; its seconds count the encoding only.
Each subprocess gets a fresh datasets cache, so both pipelines pay for reading the JSON lines. The ratios line
compares the fastest run of each variant (--repeat runs them interleaved, so load from elsewhere on the machine
falls on all of them alike). The sample holds few distinct words, so the tokenizer's word cache makes it encode
this corpus faster than real text, and fixed start-up costs weigh more here than on a real corpus.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "pt-sample.jsonl"
VARIANTS = ("original", "ours", "encode")


def add_arguments(parser) -> None:
    parser.add_argument("--corpus-mb", type=float, nargs="+", default=[100.0],
                        help="corpus sizes to measure, in MB of JSON lines (several show how memory scales)")
    parser.add_argument("--tokenizer-name", default=None,
                        help="tokenizer folder (default: train one on the sample with train-sentencepiece.py)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--test-size", default="0.01", help="as tokenize-dataset.py takes it")
    parser.add_argument("--num-proc", type=int, default=1, help="passed to tokenize-dataset.py")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per variant, interleaved; the fastest counts (other load on the machine only slows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus synthesis")
    parser.add_argument("--work-dir", default=None, help="where corpora and outputs go (default: a temporary "
                                                         "folder, removed at the end)")


def run(args) -> None:
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        from common import InputError

        raise InputError(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = args.tokenizer_name or train_tokenizer(work / "tokenizer", args.vocab_size)
        for corpus_mb in args.corpus_mb:
            corpus = synthesize_corpus(work / f"corpus-{corpus_mb:g}mb.jsonl", corpus_mb, args.seed)
            runs = {variant: [] for variant in variants}
            for _ in range(args.repeat):
                for variant in variants:
                    runs[variant].append(measure_variant(variant, corpus, tokenizer, work, args))
            results = {variant: min(measured, key=lambda m: m["seconds"]) for variant, measured in runs.items()}
            for variant, result in results.items():
                print(json.dumps({"benchmark": "tokenize", "variant": variant, "corpus_mb": corpus_mb,
                                  "cpus": len(os.sched_getaffinity(0)), **result,
                                  "peak_rss_mb": max(m["peak_rss_mb"] for m in runs[variant]),
                                  "peak_anonymous_mb": max(m["peak_anonymous_mb"] for m in runs[variant])}),
                      flush=True)
            print(json.dumps({"benchmark": "tokenize", "variant": "ratios", "corpus_mb": corpus_mb,
                              **ratios(results)}), flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def ratios(results: dict) -> dict:
    seconds = {variant: result["seconds"] for variant, result in results.items()}
    out = {}
    if "original" in seconds and "ours" in seconds:
        out["original_over_ours"] = round(seconds["original"] / seconds["ours"], 2)
    if "ours" in seconds and "encode" in seconds:
        out["ours_over_encode"] = round(seconds["ours"] / seconds["encode"], 2)
        # The encode process whole (start-up, imports, reading the JSON lines, encoding), as ours is timed.
        out["ours_over_encode_process"] = round(seconds["ours"] / results["encode"]["wall_seconds"], 2)
    return out


def train_tokenizer(folder: Path, vocab_size: int) -> str:
    command = [sys.executable, str(REPO / "train-sentencepiece.py"), "--dataset_name", str(SAMPLE),
               "--vocab_size", str(vocab_size), "--output_dir", str(folder), "--overwrite"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training the benchmark's tokenizer failed:\n{result.stderr[-2000:]}")
    return str(folder)


def synthesize_corpus(path: Path, corpus_mb: float, seed: int) -> Path:
    """JSON lines of documents made of the sample's sentences, drawn with a seeded generator: same size, same file."""
    if path.exists():
        return path
    sentences = []
    with open(SAMPLE, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                sentences += [s for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]) if s.strip()]
    rng = random.Random(seed)
    target_bytes, written = int(corpus_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_bytes:
            # Documents of 2 to 60 sentences (~200 B to ~8 KB) with paragraph breaks, like web text and articles.
            parts = [rng.choice(sentences) + ("\n\n" if rng.random() < 0.15 else " ")
                     for _ in range(rng.randint(2, 60))]
            line = json.dumps({"text": "".join(parts).strip()}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
    return path


def measure_variant(variant: str, corpus: Path, tokenizer: str, work: Path, args) -> dict:
    output = work / f"out-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    cache = Path(tempfile.mkdtemp(prefix="datasets-cache-", dir=work))
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    if variant == "ours":
        command = [sys.executable, str(REPO / "Utilities" / "tokenize-dataset.py"), "--dataset-name", str(corpus),
                   "--tokenizer-name", tokenizer, "--block-size", str(args.block_size), "--test-size",
                   args.test_size, "--num-proc", str(args.num_proc), "--output-dir", str(output)]
    else:
        command = [sys.executable, __file__, variant, str(corpus), tokenizer, str(args.block_size), args.test_size,
                   str(output)]
    try:
        result = run_measured(command, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if result["returncode"] != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result['stderr'][-3000:]}")
    reported = [json.loads(line) for line in result["stdout"].splitlines() if line.startswith("{")]
    seconds = reported[-1]["seconds"] if reported else result["seconds"]
    measured = {"seconds": round(seconds, 2), "wall_seconds": round(result["seconds"], 2),
                "mb_per_s": round(corpus.stat().st_size / 1e6 / seconds, 2),
                "peak_rss_mb": round(result["peak_rss_bytes"] / 1e6, 1),
                "peak_anonymous_mb": round(result["peak_anonymous_bytes"] / 1e6, 1)}
    if output.exists():
        measured["output_mb"] = round(sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) / 1e6, 3)
        shutil.rmtree(output, ignore_errors=True)
    return measured


def run_measured(command: list[str], env: dict) -> dict:
    """Run `command`; its wall time, exit status, output and the peak RSS summed over it and its children (with
    the peak of their anonymous part: RSS less the pages of mapped files such as the Arrow cache, which the kernel
    can drop)."""
    import threading

    from bench_tokenizer import sample_tree_memory

    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=REPO, text=True)
        peaks = {"rss_kib": 0, "anon_kib": None}
        sampler = threading.Thread(target=sample_tree_memory, args=(process.pid, peaks), daemon=True)
        sampler.start()
        process.wait()
        seconds = time.perf_counter() - started
        sampler.join()
        stdout.seek(0)
        stderr.seek(0)
        return {"returncode": process.returncode, "seconds": seconds, "peak_rss_bytes": peaks["rss_kib"] * 1024,
                "peak_anonymous_bytes": (peaks["anon_kib"] or 0) * 1024,
                "stdout": stdout.read(), "stderr": stderr.read()}


def original_approach(corpus: str, tokenizer_name: str, block_size: int, test_size: float, output: str) -> None:
    """The original script's pipeline (minus the upload): map(tokenizer), Python group_texts, split, parquet."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    dataset = datasets.load_dataset("json", data_files=[corpus], split="train")
    column_names = dataset.column_names
    dataset = dataset.map(lambda examples: tokenizer(examples["text"]), batched=True, remove_columns=column_names)
    if "token_type_ids" in dataset.column_names:
        dataset = dataset.remove_columns("token_type_ids")

    def group_texts(examples):
        concatenated = {k: [t for example in examples[k] for t in example] for k in examples.keys()}
        for k in concatenated.keys():
            concatenated[k] = concatenated[k][:-1]
        total_length = len(concatenated[list(examples.keys())[0]])
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    dataset = dataset.map(group_texts, batched=True)
    splits = dataset.train_test_split(test_size=test_size, shuffle=True, seed=42)
    for name, split in splits.items():
        split.to_parquet(f"{output}/{name}/data.parquet")


def encode_only(corpus: str, tokenizer_name: str) -> float:
    """Seconds the fast tokenizer takes to encode every document, in batches like a pipeline would use."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tokenizer_name).backend_tokenizer
    with open(corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    started = time.perf_counter()
    for start in range(0, len(texts), 1000):
        backend.encode_batch_fast(texts[start:start + 1000], add_special_tokens=False)
    return time.perf_counter() - started


def _child(argv: list[str]) -> None:
    variant, corpus, tokenizer_name, block_size, test_size, output = argv
    if variant == "original":
        size = float(test_size)
        original_approach(corpus, tokenizer_name, int(block_size), int(size) if size >= 1 else size, output)
    else:
        print(json.dumps({"seconds": encode_only(corpus, tokenizer_name)}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _child(sys.argv[1:])
