"""Evaluate saved checkpoints on a tokenized folder's test split (eval loss and perplexity as pre-training.py logs
them) and on lm-evaluation-harness benchmarks.

    python Utilities/evaluate.py output --data data/pt-corpus-tokenized
    python Utilities/evaluate.py output/step_500 output/final-checkpoint --data data/pt-corpus-tokenized --batch-size 16
    python Utilities/evaluate.py user/model --revisions step-1000 main --data data/pt-corpus-tokenized
    python Utilities/evaluate.py output --data data/pt-corpus-tokenized --update-card output/final-checkpoint/README.md
    python Utilities/evaluate.py output --data data/pt-corpus-tokenized --tasks portuguese --limit 100

A run's output_dir stands for every complete step_N and its final-checkpoint. --tasks names harness tasks (comma or
space separated) or a preset (portuguese, portuguese_translated, portuguese_leaderboard); --include-path adds
folders of your own task YAML files, --limit caps the examples per task, --num-fewshot sets the shots of every
task. Prints a Markdown table and writes evaluation.csv, evaluation.json and perplexity.png to --output-dir
(default: the run folder, else the current folder).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

from pretrain.cli.evaluate_checkpoints import main  # noqa: E402
from pretrain.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
