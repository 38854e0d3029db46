"""The original scripts' approaches, re-created so that the benchmarks measure ours against them on the same input.

    python -m pretrain.benchmarks.baselines tokenizer CORPUS.jsonl VOCAB_SIZE OUTPUT_DIR
    python -m pretrain.benchmarks.baselines tokenize CORPUS.jsonl TOKENIZER_DIR BLOCK_SIZE TEST_SIZE OUTPUT_DIR

The two commands run as measured children of the tokenizer and tokenize benchmarks. The data-loading and training
baselines are functions the data and train benchmarks call in their own processes. Only the upload to the Hub is
left out, and local files stand in for Hub datasets: everything else is done the way the original did it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# ------------------------------------------------------------------------------------------ tokenizer training

def train_tokenizer(corpus: str, vocab_size: int, output_dir: str) -> None:
    """The original train-sentencepiece.py: load the dataset, shuffle it, take every text as one Python list, train a
    `SentencePieceBPETokenizer` on it, copy Llama 2's pipeline in, save through transformers."""
    import datasets
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from pretrain.tokenizer.conventions import llama2_settings

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("json", data_files=[corpus], split="train")
    dataset = dataset.shuffle(seed=42).select(range(dataset.num_rows))
    texts = list(dataset["text"])  # the list datasets < 4 returned for dataset['text'] (4+ returns a lazy Column)
    tokenizer = SentencePieceBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    settings = llama2_settings()
    spec = json.loads(tokenizer._tokenizer.to_str())
    spec.update({key: settings[key] for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder")})
    spec["model"].update(byte_fallback=settings["byte_fallback"], fuse_unk=settings["fuse_unk"])
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tokenizer_file = Path(output_dir) / "tokenizer.json"
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", padding_side="right").save_pretrained(output_dir)


# ---------------------------------------------------------------------------------------- tokenizing and packing

def tokenize(corpus: str, tokenizer_name: str, block_size: int, test_size: float | int, output_dir: str) -> None:
    """The original tokenize-dataset.py: datasets.map with the tokenizer (BOS added, no EOS), its Python
    group_texts (which drops the last token of every map batch and each batch's tail), labels = input_ids,
    train_test_split, then parquet instead of the upload."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
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
        split.to_parquet(f"{output_dir}/{name}/data.parquet")


# ------------------------------------------------------------------------------------------------ data loading

def train_loader(folder: str, micro_batch_size: int, cache_dir: str):
    """The original pre-training.py's data: load_dataset("parquet") (an Arrow copy of the files in the cache),
    with_format("torch"), a shuffling DataLoader with the default collator. Returns the loader and its row count."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    datasets.disable_progress_bars()
    dataset = datasets.load_dataset("parquet", data_files={"train": f"{folder}/train/*.parquet",
                                                           "test": f"{folder}/test/*.parquet"}, cache_dir=cache_dir)
    train = dataset["train"].with_format("torch")
    return DataLoader(train, shuffle=True, batch_size=micro_batch_size, collate_fn=default_data_collator), len(train)


# ---------------------------------------------------------------------------------------------- the training step

# What the original pre-training.py ran with, in the terms of our spec's speed settings.
TRAINING_SETTINGS = {"compile_model": False, "fused_optimizer": False, "cross_entropy_chunk_tokens": None,
                     "allow_tf32": False, "pinned_non_blocking": False}


def training_setup(model, spec):
    """The original loop's optimizer and loss: torch's default (foreach) AdamW with decay on the matrices, the
    model's own loss (which holds the float32 logits of the whole micro-batch), TF32 left off as torch has it.
    Mixed precision is autocast over fp32 weights, as Accelerate does it; the loop applies it."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    t = spec.training
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                                  foreach=True)
    return optimizer, lambda m, input_ids: m(input_ids=input_ids, labels=input_ids).loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run one of the original approaches (a benchmark's child)")
    commands = parser.add_subparsers(dest="command", required=True)
    tokenizer = commands.add_parser("tokenizer")
    tokenizer.add_argument("corpus")
    tokenizer.add_argument("vocab_size", type=int)
    tokenizer.add_argument("output_dir")
    packing = commands.add_parser("tokenize")
    packing.add_argument("corpus")
    packing.add_argument("tokenizer_name")
    packing.add_argument("block_size", type=int)
    packing.add_argument("test_size", type=lambda text: int(float(text)) if float(text) >= 1 else float(text),
                         help="a count of rows (1 or more) or a fraction, as train_test_split takes it")
    packing.add_argument("output_dir")
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        train_tokenizer(args.corpus, args.vocab_size, args.output_dir)
    else:
        tokenize(args.corpus, args.tokenizer_name, args.block_size, args.test_size, args.output_dir)


if __name__ == "__main__":
    main()
