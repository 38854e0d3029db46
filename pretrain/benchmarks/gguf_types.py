"""GGUF types: each --dtype of export-gguf.py on one checkpoint, its size on disk and its perplexity in llama.cpp
against transformers' perplexity on the same held-out blocks.

    python Utilities/benchmark.py gguf quickstart-output/model/final-checkpoint --data quickstart-output/tokenized
    python Utilities/benchmark.py gguf CHECKPOINT --data TOKENIZED --dtypes f16 q8_0 q4_0 --max-blocks 50

Each type is exported (pretrain/export/gguf.py, as Utilities/export-gguf.py does) into a temporary folder and run
by llama.cpp through its Python binding (pip install llama-cpp-python) on the test split of the tokenized folder,
one block at a time from an empty cache, the KV cache in f32 so that the weights alone make the difference. The
perplexity counts every token but each block's first, as training's evaluation does, and transformers' comes
from the same checkpoint on the same blocks. Prints one JSON line per type, then the table docs/gguf.md shows.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from pretrain.errors import InputError


def add_arguments(parser):
    from pretrain.export.gguf import DTYPES

    parser.add_argument("checkpoint", help="checkpoint folder (output_dir/final-checkpoint or a step_N folder)")
    parser.add_argument("--data", required=True,
                        help="tokenized folder (Utilities/tokenize-dataset.py) whose test split is the held-out text")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="the export types to measure (default: all)")
    parser.add_argument("--max-blocks", type=int, default=200, help="test blocks to read at most")


def run(args):
    try:
        import llama_cpp
    except ImportError:
        raise InputError("the gguf benchmark runs llama.cpp through its Python binding; pip install "
                         "llama-cpp-python") from None
    checkpoint = Path(args.checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")) \
        if (checkpoint / "config.json").is_file() else {}
    blocks = held_out_blocks(Path(args.data), config, args.max_blocks)
    expected = transformers_perplexity(checkpoint, blocks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-types-") as scratch:
        for dtype in args.dtypes:
            path = export(checkpoint, Path(scratch) / dtype, dtype)
            got = llama_cpp_perplexity(llama_cpp, path, blocks)
            row = {"variant": dtype, "size_mib": round(path.stat().st_size / 2 ** 20, 3),
                   "perplexity": round(got, 4), "transformers_perplexity": round(expected, 4),
                   "change_percent": round(100 * (got / expected - 1), 3) + 0.0, "blocks": len(blocks),
                   "tokens": int(blocks[:, 1:].size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print(markdown_table(rows))


def held_out_blocks(folder: Path, config: dict, max_blocks: int):
    """Up to max_blocks blocks of the folder's test split, checked against the checkpoint's vocabulary."""
    from pretrain.data.manifest import read_manifest
    from pretrain.data.tokenized_folder import open_tokenized_folder

    if "vocab_size" not in config:
        raise InputError("the checkpoint folder has no config.json with a vocab_size; give output_dir/"
                         "final-checkpoint or a step_N folder")
    manifest = read_manifest(folder) if folder.is_dir() else None
    block_size = (manifest or {}).get("block_size") or config.get("max_position_embeddings")
    _, test = open_tokenized_folder(folder, block_size=block_size, vocab_size=config["vocab_size"],
                                    need_train=False)
    return test.read_blocks(range(min(max_blocks, test.num_blocks)))


def export(checkpoint: Path, folder: Path, dtype: str) -> Path:
    from pretrain.export.gguf import main

    path = folder / f"model-{dtype}.gguf"
    main([str(checkpoint), str(path), "--dtype", dtype])
    return path


def transformers_perplexity(checkpoint: Path, blocks) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for block in blocks:
            ids = torch.from_numpy(block).unsqueeze(0)
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total -= log_probs.gather(-1, ids[0, 1:, None]).sum().item()
    return math.exp(total / blocks[:, 1:].size)


def llama_cpp_perplexity(llama_cpp, path: Path, blocks) -> float:
    import numpy as np

    model = llama_cpp.Llama(str(path), n_ctx=blocks.shape[1], n_batch=blocks.shape[1], logits_all=True,
                            verbose=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    total = 0.0
    try:
        for block in blocks:
            model.reset()
            model.eval(block.tolist())
            logits = np.array(model.scores[:len(block) - 1], dtype=np.float64)
            shifted = logits - logits.max(-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            total -= np.take_along_axis(log_probs, block[1:, None], axis=-1).sum()
    finally:
        model.close()
    return math.exp(total / blocks[:, 1:].size)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| --dtype | size (MiB) | perplexity, llama.cpp | perplexity, transformers | change |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['size_mib']:.2f} | {row['perplexity']:.3f} | "
                     f"{row['transformers_perplexity']:.3f} | {round(row['change_percent'], 2) + 0.0:+.2f}% |")
    return "\n".join(lines)
