"""Tokenize a text corpus and pack it into fixed-length blocks, the folder that pre-training.py trains on.

    python Utilities/tokenize-dataset.py --dataset-name data/sample/pt-sample.jsonl --tokenizer-name my-tokenizer \
        --block-size 128 --test-size 0.1 --output-dir data/my-corpus-tokenized

Every document becomes BOS + its tokens + EOS; documents are (by default) shuffled, the first ones go to the test
split (a fraction of the text, or enough documents for a number of blocks), and each split's token stream is cut
into rows of exactly --block-size tokens: `output-dir/{train,test}/part-NNNNN.parquet` (column `input_ids`) plus
`manifest.json` (see pretrain/data/manifest.py). Only the last partial block of each split is left out; the manifest
counts it. The corpus is streamed in batches, so memory stays flat however large it is.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the suite's root, where pretrain/ lies

from pretrain.cli.tokenize_dataset import main  # noqa: E402
from pretrain.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
