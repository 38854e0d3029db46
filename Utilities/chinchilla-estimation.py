"""What a run will cost and what it buys: training FLOPs, tokens per parameter, the compute-optimal size and token
count by Hoffmann et al. (2022)'s fitted law, and (given a throughput and a GPU's power) wall-clock time and energy.

    python Utilities/chinchilla-estimation.py --spec-file specs.yaml --tokens 6.2e9
    python Utilities/chinchilla-estimation.py --spec-file specs-460m.yaml training_args.max_steps=70000 \
        --gpus 8 --tokens-per-second 400000 --gpu-watts 700
    python Utilities/chinchilla-estimation.py --parameters 460e6 --tokens 9.3e9

The law is L(N, D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 in nats per token (perplexity = e^L); its constants come
from Hoffmann et al.'s data and tokenizer, not ours. `pre-training.py --dry-run` prints the same plan for its spec.
The code is pretrain/training/compute_plan.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

from pretrain.errors import run_main  # noqa: E402
from pretrain.training.compute_plan import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
