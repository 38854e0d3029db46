"""A checkpoint as one GGUF file for llama.cpp and Ollama: the command line and flow of Utilities/export-gguf.py.

    python Utilities/export-gguf.py output/final-checkpoint model.gguf            # 16-bit weights
    python Utilities/export-gguf.py output/final-checkpoint model-f32.gguf --dtype f32

The file holds what llama.cpp's own converter writes for a Llama: the "llama" architecture and its settings, the
weights under llama.cpp's tensor names (query and key rows reordered for its rotary embedding), and the tokenizer
as a "llama" (sentencepiece) vocabulary read from the checkpoint's tokenizer.model: pieces, scores and types.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pretrain.errors import InputError

DTYPES = ("f16", "f32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write a checkpoint as one GGUF file for llama.cpp and Ollama.")
    parser.add_argument("checkpoint", help="checkpoint folder (output_dir/final-checkpoint or a step_N folder)")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16",
                        help="type of the matrices (norms stay f32, as llama.cpp keeps them); default: f16")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    folder, output = Path(args.checkpoint), Path(args.output)
    if output.exists() and not args.overwrite:
        raise InputError(f"'{output}' already exists; remove it, choose another output file or pass --overwrite")
    config = read_config(folder)
    proto, flags = read_tokenizer(folder)
    tensors = gguf_tensors(read_weights(folder), config)
    rows = tensors["token_embd.weight"].shape[0]
    if rows != len(proto.pieces):
        raise InputError(f"'{folder}' has {rows} embedding rows but its tokenizer has {len(proto.pieces)} pieces; "
                         f"export a checkpoint whose model_args.vocab_size is the tokenizer's size")
    write_gguf(output, folder.resolve().name, config, tensors, proto, flags, args.dtype)
    print(f"wrote '{output}' ({output.stat().st_size / 2**20:.1f} MiB, {len(tensors)} tensors, {args.dtype}, "
          f"vocabulary {rows:,})")


def read_config(folder: Path) -> dict:
    """config.json, checked to be a Llama this exporter writes as llama.cpp reads it."""
    if not (folder / "config.json").is_file():
        raise InputError(f"'{folder}' is not a checkpoint folder (no config.json); give output_dir/final-checkpoint "
                         f"or a step_N folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise InputError(f"'{folder}' holds a {config.get('model_type')!r} model; only Llama checkpoints are "
                         f"exported")
    # transformers 5 keeps rope_theta inside rope_parameters, 4.x beside the other fields.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported = [name for name in ("attention_bias", "mlp_bias") if config.get(name)]
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope_type {rope.get('rope_type', rope.get('type'))}")
    if unsupported:
        raise InputError(f"'{folder}' uses {', '.join(unsupported)}, which this exporter does not write; use "
                         f"llama.cpp's convert_hf_to_gguf.py for it")
    heads = config["num_attention_heads"]
    return {**config, "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
            "num_key_value_heads": config.get("num_key_value_heads") or heads}


def read_weights(folder: Path) -> dict:
    """The checkpoint's tensors as float32 numpy arrays (through torch, which also reads bfloat16)."""
    from safetensors import safe_open

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise InputError(f"'{folder}' has no model.safetensors; give a checkpoint folder written by pre-training.py")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                weights[name] = handle.get_tensor(name).float().numpy()
    return weights


def permute(weights, heads: int):
    """llama.cpp's reordering of query/key rows: transformers rotates the two halves of each head's vector, ggml
    rotates neighbouring pairs."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def gguf_tensors(weights: dict, config: dict) -> dict:
    """The weights under llama.cpp's names; a tied output matrix is left out (llama.cpp then reuses token_embd)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tensors = {}
    for name, array in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"the checkpoint has a tensor '{name}' that a Llama does not have; export a checkpoint "
                             f"written by pre-training.py")
        if name.endswith("q_proj.weight"):
            array = permute(array, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            array = permute(array, config["num_key_value_heads"])
        tensors[gguf_name] = array
    return tensors


def read_tokenizer(folder: Path):
    """The checkpoint's tokenizer.model (or, for a folder written before checkpoints carried one, the same model
    made from its tokenizer.json), and whether the tokenizer adds <s> before and </s> after a text."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    from pretrain.tokenizer.conventions import special_token_flags
    from pretrain.tokenizer.files import obstacle, sentencepiece_model

    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"'{folder}' has no tokenizer.json; give a checkpoint folder written by pre-training.py")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    flags = special_token_flags(spec.get("post_processor"))
    if (folder / "tokenizer.model").is_file():
        return sp.ModelProto.FromString((folder / "tokenizer.model").read_bytes()), flags
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    special_tokens = {name: value for name, value in config.items() if name.endswith("_token")
                      and isinstance(value, str)}
    reason = obstacle(spec, special_tokens)
    if reason:
        raise InputError(f"'{folder}' has no tokenizer.model and its tokenizer.json cannot be written as one "
                         f"({reason}); llama.cpp's convert_hf_to_gguf.py reads such tokenizers as BPE")
    return sentencepiece_model(spec, special_tokens), flags


def write_gguf(output: Path, name: str, config: dict, tensors: dict, proto, flags: tuple[bool, bool],
               dtype: str) -> None:
    """Write the file under a temporary name and rename it into place, so a failed export leaves nothing."""
    import gguf
    import numpy as np

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(name)
        writer.add_vocab_size(len(proto.pieces))
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_rope_dimension_count(config["head_dim"])
        writer.add_rope_freq_base(float(config["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, proto, flags)
        for tensor_name, array in tensors.items():
            # Vectors (the norms) stay float32, as llama.cpp's converter keeps them.
            wanted = np.float16 if dtype == "f16" and array.ndim > 1 else np.float32
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=wanted))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    except BaseException as error:
        writer.close()
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise InputError(f"could not write '{output}' ({error}); free some space or choose another output "
                             f"file") from None
        raise


def add_tokenizer(writer, proto, flags: tuple[bool, bool]) -> None:
    """The vocabulary as llama.cpp's sentencepiece tokenizer reads it (its piece types are sentencepiece's)."""
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece.piece for piece in proto.pieces])
    writer.add_token_scores([piece.score for piece in proto.pieces])
    writer.add_token_types([int(piece.type) for piece in proto.pieces])
    for add, token_id in ((writer.add_unk_token_id, trainer.unk_id), (writer.add_bos_token_id, trainer.bos_id),
                          (writer.add_eos_token_id, trainer.eos_id), (writer.add_pad_token_id, trainer.pad_id)):
        if token_id >= 0:
            add(token_id)
    writer.add_add_bos_token(flags[0])
    writer.add_add_eos_token(flags[1])
    writer.add_add_space_prefix(normalizer.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(normalizer.remove_extra_whitespaces)
