"""Tokenizing and packing a corpus: tokenize-dataset.py against the original's approach and the bare tokenizer.

    python Utilities/benchmark.py tokenize                      # 117 MB of the repeated sample, three classes
    python Utilities/benchmark.py tokenize --corpus-mb 117 300 --repeat 3 --tokenizer-name path/to/tokenizer
    python Utilities/benchmark.py tokenize --tokenizer-classes LlamaTokenizerFast --variants ours,encode

The corpus (pretrain/benchmarks/corpora.py) is built under --work-dir. The tokenizer (--tokenizer-name, or one
train-sentencepiece.py trains on the sample) is copied once per --tokenizer-classes entry with that class in its
tokenizer_config.json: tokenize-dataset.py reads the generic PreTrainedTokenizerFast with the tokenizers library
alone, and LlamaTokenizer(Fast) also without transformers, with the pipeline transformers rebuilds it with. For each
class, each variant runs in its own process with its own empty datasets cache, timed from start to exit:
  original  the original's approach (pretrain/benchmarks/baselines.py): datasets.map(tokenizer), its Python
            group_texts, train_test_split, parquet;
  ours      Utilities/tokenize-dataset.py, end to end;
  encode    the fast tokenizer's own batch encode of the same text: AutoTokenizer on the same folder, its Rust
            tokenizer's encode_batch_fast over the whole corpus in batches of 1,000 documents. `seconds` is the
            encoding alone (imports, loading the tokenizer and reading the JSON lines excluded, the texts already
            in memory); `wall_seconds` is the whole process, imports included, timed as the others are.
`cpu_seconds` is the CPU time (user and system, every thread) of what `seconds` times, `process_cpu_seconds` that
of the whole process: on a machine others share, CPU time swings less than wall time.
Each line has the peak RSS summed over the process and its children (and its anonymous part) and the bytes left
in its datasets cache. A "ratios" line per class compares the fastest run of each variant: ours_over_encode
against the encoding alone, ours_over_encode_process against the whole encode process, ours_over_encode_cpu in CPU
time against the encoding alone; the *_per_repeat lists give the ratios within each round, and
ours_over_encode_median_repeat the median of those. --repeat interleaves
the runs, so that load from elsewhere on the machine falls on all of them alike; runs_seconds lists every run of a
variant.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pretrain.benchmarks.corpora import KINDS, SAMPLE, build_corpus, read_texts
from pretrain.benchmarks.measure import REPO, Measured, peak_memory_mib, python_module, run_measured
from pretrain.errors import InputError

VARIANTS = ("original", "ours", "encode")
TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "LlamaTokenizerFast", "LlamaTokenizer")
ENCODE_BATCH_DOCUMENTS = 1000


def add_arguments(parser) -> None:
    parser.add_argument("--corpus-mb", type=float, nargs="+", default=[117.0],
                        help="corpus sizes to measure, in MB of JSON lines (several show how memory scales)")
    parser.add_argument("--corpus", choices=KINDS, default="repeated",
                        help="repeated: the sample over and over (real text); synthetic: recombined, with new words")
    parser.add_argument("--sample", default=str(SAMPLE), help="JSON lines corpus (field 'text') to build from")
    parser.add_argument("--tokenizer-name", default=None,
                        help="tokenizer folder (default: train one on the sample with train-sentencepiece.py)")
    parser.add_argument("--tokenizer-classes", default=",".join(TOKENIZER_CLASSES),
                        help="comma-separated tokenizer_class values to measure the tokenizer under")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--block-size", type=int, default=2048)
    parser.add_argument("--test-size", default="0.01", help="as tokenize-dataset.py takes it")
    parser.add_argument("--num-proc", type=int, default=1, help="passed to tokenize-dataset.py")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per variant, interleaved; the fastest counts (other load on the machine only slows)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--work-dir", default=None, help="where corpora and outputs go (default: a temporary "
                                                         "folder, removed at the end)")


def run(args) -> None:
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise InputError(f"--variants '{args.variants}': choose from {', '.join(VARIANTS)}")
    classes = [c for c in args.tokenizer_classes.split(",") if c]
    if not classes:
        raise InputError("--tokenizer-classes is empty; give at least one, such as PreTrainedTokenizerFast")
    if min(args.corpus_mb) <= 0 or args.repeat < 1:
        raise InputError("--corpus-mb must be positive and --repeat at least 1")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-tokenize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = Path(args.tokenizer_name) if args.tokenizer_name else train_tokenizer(work / "tokenizer",
                                                                                       args.vocab_size)
        folders = {name: tokenizer_with_class(base, name, work) for name in classes}
        for corpus_mb in args.corpus_mb:
            corpus = build_corpus(args.corpus, Path(args.sample), corpus_mb, args.seed, work)
            for name, folder in folders.items():
                measure_class(corpus, name, folder, variants, work, args)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def measure_class(corpus: Path, tokenizer_class: str, folder: Path, variants: list[str], work: Path, args) -> None:
    runs = {variant: [] for variant in variants}
    for _ in range(args.repeat):
        for variant in variants:
            runs[variant].append(measure_variant(variant, corpus, folder, work, args))
    results = {variant: min((r for r, _ in measured), key=lambda r: r["seconds"]) for variant, measured in runs.items()}
    common = {"benchmark": "tokenize", "tokenizer_class": tokenizer_class, "corpus": args.corpus,
              "corpus_mb": round(corpus.stat().st_size / 1e6, 3)}
    for variant, result in results.items():
        print(json.dumps({**common, "variant": variant, "cpus": len(os.sched_getaffinity(0)), **result,
                          "runs_seconds": [r["seconds"] for r, _ in runs[variant]],
                          **peak_memory_mib([m for _, m in runs[variant]])}), flush=True)
    print(json.dumps({**common, "variant": "ratios", **ratios(results), **ratios_per_repeat(runs)}), flush=True)


def ratios(results: dict) -> dict:
    seconds = {variant: result["seconds"] for variant, result in results.items()}
    out = {}
    if "original" in seconds and "ours" in seconds:
        out["original_over_ours"] = round(seconds["original"] / seconds["ours"], 2)
    if "ours" in seconds and "encode" in seconds:
        out["ours_over_encode"] = round(seconds["ours"] / seconds["encode"], 2)
        out["ours_over_encode_process"] = round(seconds["ours"] / results["encode"]["wall_seconds"], 2)
        out["ours_over_encode_cpu"] = round(results["ours"]["cpu_seconds"] / results["encode"]["cpu_seconds"], 2)
    return out


def ratios_per_repeat(runs: dict) -> dict:
    """ours_over_encode of each repeat, from the runs of one interleaved round, which share the machine's load, and
    their median: on a shared machine the fastest encode and the fastest ours rarely meet the same quiet spell, so
    the ratio of the fastest runs swings more than the ratio within a round."""
    if "ours" not in runs or "encode" not in runs:
        return {}
    rounds = list(zip(runs["ours"], runs["encode"]))
    per_round = [ours["seconds"] / encode["seconds"] for (ours, _), (encode, _) in rounds]
    return {"ours_over_encode_per_repeat": [round(ratio, 2) for ratio in per_round],
            "ours_over_encode_median_repeat": round(statistics.median(per_round), 2),
            "ours_over_encode_cpu_per_repeat": [round(ours["cpu_seconds"] / encode["cpu_seconds"], 2)
                                                for (ours, _), (encode, _) in rounds]}


def train_tokenizer(folder: Path, vocab_size: int) -> Path:
    command = [sys.executable, str(REPO / "train-sentencepiece.py"), "--dataset_name", str(SAMPLE),
               "--vocab_size", str(vocab_size), "--output_dir", str(folder), "--overwrite"]
    run_measured(command).check("training the benchmark's tokenizer")
    return folder


def tokenizer_with_class(base: Path, tokenizer_class: str, work: Path) -> Path:
    """A copy of the tokenizer folder whose tokenizer_config.json names `tokenizer_class`."""
    if not (base / "tokenizer.json").is_file():
        raise InputError(f"--tokenizer-name '{base}' has no tokenizer.json; give a folder from train-sentencepiece.py")
    folder = work / f"tokenizer-{tokenizer_class}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config_path.write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}, indent=2) + "\n",
                           encoding="utf-8")
    return folder


def measure_variant(variant: str, corpus: Path, tokenizer: Path, work: Path, args) -> tuple[dict, Measured]:
    """One run of `variant`: its figures other than memory, and the run itself."""
    output = work / f"out-{variant}"
    shutil.rmtree(output, ignore_errors=True)
    if variant == "ours":
        command = [sys.executable, str(REPO / "Utilities" / "tokenize-dataset.py"), "--dataset-name", str(corpus),
                   "--tokenizer-name", str(tokenizer), "--block-size", str(args.block_size), "--test-size",
                   args.test_size, "--num-proc", str(args.num_proc), "--output-dir", str(output)]
    elif variant == "original":
        command = python_module("pretrain.benchmarks.baselines", "tokenize", corpus, tokenizer, args.block_size,
                                args.test_size, output)
    else:
        command = python_module("pretrain.benchmarks.tokenization", corpus, tokenizer)
    result = run_measured(command, env={"TOKENIZERS_PARALLELISM": "true"},
                          datasets_cache=work / "datasets-cache").check(f"the {variant} variant")
    process_cpu = result.cpu_seconds
    reported = result.json_lines()
    seconds = reported[-1]["seconds"] if variant == "encode" else result.seconds
    cpu_seconds = reported[-1]["cpu_seconds"] if variant == "encode" else process_cpu
    measured = {"seconds": round(seconds, 2), "wall_seconds": round(result.seconds, 2),
                "cpu_seconds": round(cpu_seconds, 2), "process_cpu_seconds": round(process_cpu, 2),
                "mb_per_s": round(corpus.stat().st_size / 1e6 / seconds, 2),
                "datasets_cache_bytes": result.datasets_cache_bytes}
    if variant == "encode":
        measured["tokens"] = reported[-1]["tokens"]
    else:
        measured["output_mb"] = round(sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) / 1e6, 3)
        shutil.rmtree(output, ignore_errors=True)
    return measured, result


def encode_only(corpus: str, tokenizer_name: str) -> dict:
    """Seconds the fast tokenizer AutoTokenizer loads from the folder takes to encode every document, in batches of
    ENCODE_BATCH_DOCUMENTS, without special tokens as tokenize-dataset.py asks (it adds BOS and EOS around the ids),
    and the tokens it made."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(tokenizer_name).backend_tokenizer
    texts = read_texts(Path(corpus))
    started, cpu_started, tokens = time.perf_counter(), time.process_time(), 0
    for start in range(0, len(texts), ENCODE_BATCH_DOCUMENTS):
        encodings = backend.encode_batch_fast(texts[start:start + ENCODE_BATCH_DOCUMENTS], add_special_tokens=False)
        tokens += sum(map(len, encodings))
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "tokens": tokens}


if __name__ == "__main__":
    print(json.dumps(encode_only(*sys.argv[1:])))
