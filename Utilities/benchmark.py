"""Benchmarks of the suite, each against the approach of the original scripts, on the same input in one run.

    python Utilities/benchmark.py tokenizer --help   # train-sentencepiece.py vs the original's list-based training
    python Utilities/benchmark.py tokenize --help    # tokenize-dataset.py vs datasets.map + group_texts, and the
                                                     # tokenizer's own batch encode
    python Utilities/benchmark.py data --help        # reading tokenized folders: first step, disk, RSS, tokens/s
    python Utilities/benchmark.py train --help       # the training step: original-style loop vs ours
    python Utilities/benchmark.py gpu --help         # every figure the GPU targets need, within 8 minutes
    python Utilities/benchmark.py gguf --help        # each GGUF type: size on disk, perplexity in llama.cpp
    python Utilities/benchmark.py optimizer --help   # Muon against AdamW at equal tokens, a learning-rate sweep each

Each prints one JSON line per variant measured, so results can be collected with `grep '^{'`. The benchmarks live
in pretrain/benchmarks/ (the original approaches in baselines.py, the measuring in measure.py); docs/benchmarks.md has
the figures.
"""

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

# Each benchmark lives in its own module exposing `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {
    "tokenizer": "pretrain.benchmarks.sentencepiece_training",
    "tokenize": "pretrain.benchmarks.tokenization",
    "data": "pretrain.benchmarks.data_reading",
    "train": "pretrain.benchmarks.training_step",
    "gpu": "pretrain.benchmarks.gpu",
    "gguf": "pretrain.benchmarks.gguf_types",
    "optimizer": "pretrain.benchmarks.optimizer_comparison",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for command, module_name in BENCHMARKS.items():
        modules[command] = importlib.import_module(module_name)
        sub = commands.add_parser(command, help=modules[command].__doc__.strip().split("\n")[0])
        modules[command].add_arguments(sub)
    args = parser.parse_args(argv)
    modules[args.command].run(args)


if __name__ == "__main__":
    from pretrain.errors import run_main

    run_main(main)
