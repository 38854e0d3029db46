"""The whole pipeline on the embedded Portuguese sample, offline, in a few minutes on a laptop CPU.

    python quickstart.py                                   # tokenizer -> tokenized blocks -> tiny Llama -> text
    python quickstart.py training_args.max_steps=50        # any spec override is passed to pre-training.py
    python quickstart.py --output-dir /tmp/qs              # somewhere else than quickstart-output/

It trains a tokenizer on data/sample/pt-sample.jsonl (train-sentencepiece.py), tokenizes and packs the sample with a
test split (Utilities/tokenize-dataset.py), pre-trains the tiny model of specs-tiny.yaml (pre-training.py), then
loads `final-checkpoint` with transformers, prints the perplexity, where the model is, and a generated text.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
SAMPLE = REPO / "data" / "sample" / "pt-sample.jsonl"
PROMPT = "A capital do Brasil é"


def step(title: str, command: list[str]):
    """Run one stage with its output streaming through, so progress stays visible; stop on failure."""
    print(f"\n==> {title}\n    {' '.join(map(str, command))}", flush=True)
    started = time.perf_counter()
    status = subprocess.call([sys.executable, *map(str, command)], cwd=REPO)
    if status != 0:
        print(f"quickstart: '{title}' failed with exit status {status}", file=sys.stderr)
        sys.exit(status)
    print(f"    done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="quickstart-output", help="where everything is written")
    parser.add_argument("--vocab-size", type=int, default=512,
                        help="tokenizer vocabulary size (80 KB of text is too little for a larger one)")
    parser.add_argument("overrides", nargs="*", metavar="group.key=value", help="overrides for specs-tiny.yaml")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()

    tokenizer, tokenized, model_dir = out / "tokenizer", out / "tokenized", out / "model"
    step("1/3 train a tokenizer", ["train-sentencepiece.py", "--dataset_name", SAMPLE, "--vocab_size",
                                   args.vocab_size, "--output_dir", tokenizer, "--overwrite"])
    step("2/3 tokenize and pack the sample", ["Utilities/tokenize-dataset.py", "--dataset-name", SAMPLE,
                                             "--tokenizer-name", tokenizer, "--block-size", 128, "--test-size",
                                             0.1, "--output-dir", tokenized, "--overwrite"])
    step("3/3 pre-train the tiny Llama", ["pre-training.py", "--spec-file", "specs-tiny.yaml",
                                          f"model_args.tokenizer_name={tokenizer}",
                                          f"model_args.vocab_size={args.vocab_size}",
                                          f"data_args.folder_path={tokenized}",
                                          f"training_args.output_dir={model_dir}", *args.overrides])
    report(model_dir, time.perf_counter() - started)


def report(model_dir: Path, seconds: float):
    """Load the final checkpoint the way a user would and show what it learned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = model_dir / "final-checkpoint"
    evals = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    torch.manual_seed(0)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=40, top_p=0.95,
                            repetition_penalty=1.2)
    print("\n==> result")
    if evals:
        print(f"perplexity on the test split: {evals[-1]['perplexity']:.2f} (eval loss {evals[-1]['eval_loss']:.4f})")
    print(f"model: {final}")
    print(f"sample: {tokenizer.decode(output[0], skip_special_tokens=True)}")
    print(f"total time: {seconds:.0f} s")


if __name__ == "__main__":
    main()
