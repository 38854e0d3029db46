"""Train a Llama 2-style SentencePiece BPE tokenizer (byte fallback, ids <unk>=0 <s>=1 </s>=2 <pad>=3).

    python train-sentencepiece.py --dataset_name data/sample/pt-sample.jsonl --vocab_size 1024 \
        --output_dir my-tokenizer
    python train-sentencepiece.py --dataset_name nicholasKluge/Pt-Corpus-Instruct --dataset_split train \
        --hub_token hf_... --reference_tokenizer meta-llama/Llama-2-7b-hf --num_samples 2000000 \
        --vocab_size 32000 --output_dir my-tokenizer

`--dataset_name` is a local .txt/.jsonl/.parquet/.csv file, a folder of them, a `save_to_disk` folder, or a Hub
dataset. Llama 2's conventions are built in; `--reference_tokenizer` (a local folder or a Hub name) is optional.
The output folder loads offline with `AutoTokenizer.from_pretrained(output_dir)`; `tokenizer_report.json` inside
it holds figures measured on documents held out from training.
"""

from pretrain.cli.train_sentencepiece import main
from pretrain.errors import run_main

if __name__ == "__main__":
    run_main(main)
