"""A checkpoint as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it: the command line
and flow of Utilities/export-gguf.py.

    python Utilities/export-gguf.py output/final-checkpoint model.gguf            # 16-bit weights
    python Utilities/export-gguf.py output/final-checkpoint model-q8_0.gguf --dtype q8_0

The file holds what llama.cpp's own converter writes for a Llama: the "llama" architecture and its settings, the
weights under llama.cpp's tensor names (query and key rows reordered for its rotary embedding), and the tokenizer
as a "llama" (sentencepiece) vocabulary read from the checkpoint's tokenizer.model: pieces, scores and types.
The quantized types are those the gguf package quantizes itself (its K-quants only dequantize), with the tensors
llama.cpp keeps in higher precision kept so (see tensor_type).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pretrain.errors import InputError

# --dtype: the type of the matrices and the file type llama.cpp records for it. Each is one gguf.quants writes
# bit for bit as ggml does; gguf 0.19 has no quantizer for the K-quants (Q4_K, Q6_K, ...), which llama.cpp's
# llama-quantize makes from the f16 or f32 file.
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
          "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
FLOAT_TYPES = ("F32", "F16", "BF16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write a checkpoint as one GGUF file for llama.cpp and Ollama.")
    parser.add_argument("checkpoint", help="checkpoint folder (output_dir/final-checkpoint or a step_N folder)")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16",
                        help="type of the matrices: f32, f16, bf16, or quantized q8_0, q5_1, q5_0, q4_1, q4_0 (norms "
                             "stay f32, and the 4- and 5-bit types keep the output matrix in q8_0, as llama.cpp "
                             "does); default: f16")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output file and the Modelfile beside it if they exist")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    folder, output = Path(args.checkpoint), Path(args.output)
    modelfile = output.with_name("Modelfile")
    for path in (output, modelfile):
        if path.exists() and not args.overwrite:
            raise InputError(f"'{path}' already exists; remove it, choose another output folder or pass --overwrite")
    config = read_config(folder)
    proto, flags = read_tokenizer(folder)
    tensors = gguf_tensors(read_weights(folder), config)
    rows = tensors["token_embd.weight"].shape[0]
    if rows != len(proto.pieces):
        raise InputError(f"'{folder}' has {rows} embedding rows but its tokenizer has {len(proto.pieces)} pieces; "
                         f"export a checkpoint whose model_args.vocab_size is the tokenizer's size")
    types = tensor_types(tensors, args.dtype)
    write_gguf(output, folder.resolve().name, config, tensors, types, proto, flags, args.dtype,
               modelfile_text(output.name, config, read_generation_config(folder)))
    print(f"wrote '{output}' ({output.stat().st_size / 2**20:.1f} MiB, {len(tensors)} tensors, {args.dtype}, "
          f"vocabulary {rows:,}) and '{modelfile}'")


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


def tensor_types(tensors: dict, dtype: str) -> dict:
    """Each tensor's ggml type for --dtype; an InputError when no matrix can take a quantized type."""
    import gguf

    matrices = gguf.GGMLQuantizationType[DTYPES[dtype][0]]
    # With tied embeddings token_embd is also the output matrix, and llama-quantize treats it as one.
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    types = {name: tensor_type(name, array.ndim, matrices, head) for name, array in tensors.items()}
    # A matrix whose rows do not split into the type's blocks stays f16, as llama.cpp's converter (for q8_0) and
    # llama-quantize (for every type of 32-value blocks) keep it.
    fallen = [name for name, qtype in types.items() if tensors[name].shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]]
    types.update(dict.fromkeys(fallen, gguf.GGMLQuantizationType.F16))
    if fallen and not any(qtype not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
                          for qtype in types.values()):
        block_size = gguf.GGML_QUANT_SIZES[matrices][0]
        raise InputError(f"--dtype {dtype} stores matrices in blocks of {block_size} values per row, and no matrix "
                         f"of this model has such rows; export it as f16, bf16 or f32")
    if fallen:
        print(f"note: {len(fallen)} matrices stay f16, their rows not splitting into {dtype}'s blocks: "
              f"{', '.join(fallen)}")
    return types


def tensor_type(name: str, ndim: int, matrices, head: str):
    """llama.cpp's choice of type for one tensor: its converter's (convert_hf_to_gguf.py) for f32, f16, bf16 and
    q8_0, llama-quantize's (src/llama-quant.cpp) for the 4- and 5-bit types, which the converter does not write."""
    import gguf

    types = gguf.GGMLQuantizationType
    # Vectors and norms stay F32 in both: most of ggml's operations on 1-D tensors take F32 alone.
    if ndim < 2 or name.endswith("_norm.weight"):
        return types.F32
    # llama-quantize keeps the output matrix in Q6_K below Q8_0 (logits are the most sensitive to rounding), and in
    # Q8_0 when its rows do not split into Q6_K's 256-value blocks. gguf cannot write Q6_K, so Q8_0 it is: the
    # same file llama-quantize writes for rows such as 64 or 1000, and otherwise an output matrix of 8.5 bits per
    # weight where llama-quantize's has 6.5625.
    # The untied token embedding is quantized like every other matrix, as llama-quantize does.
    if name == head and matrices.name not in (*FLOAT_TYPES, "Q8_0"):
        return types.Q8_0
    return matrices


def read_generation_config(folder: Path) -> dict:
    """generation_config.json, or nothing when the checkpoint has none."""
    path = folder / "generation_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def modelfile_text(gguf_name: str, config: dict, generation: dict) -> str:
    """An Ollama Modelfile for the GGUF beside it: the prompt passed through as it is (a base model continues text;
    it has no chat template), the context trained with, and the checkpoint's own sampling settings."""
    lines = [f"FROM ./{gguf_name}", "",
             "# A base model: the prompt goes in as it is, and the model continues it.",
             'TEMPLATE "{{ .Prompt }}"',
             "# Beyond the length trained with, the rotary positions are ones the model never saw.",
             f"PARAMETER num_ctx {config['max_position_embeddings']}"]
    sampling = {}
    if generation:
        # transformers decodes greedily unless do_sample is set, which Ollama spells temperature 0.
        sampling["temperature"] = generation.get("temperature", 1.0) if generation.get("do_sample") else 0
    for ours, theirs in (("top_k", "top_k"), ("top_p", "top_p"), ("repeat_penalty", "repetition_penalty"),
                         ("num_predict", "max_new_tokens")):
        if generation.get(theirs) is not None:
            sampling[ours] = generation[theirs]
    if "repeat_penalty" in sampling:
        sampling["repeat_last_n"] = -1  # transformers penalises every token of the context, Ollama the last 64
    if sampling:
        lines.append("# Sampling as the checkpoint's generation_config.json sets it for its training samples.")
        lines += [f"PARAMETER {name} {value}" for name, value in sampling.items()]
    return "\n".join(lines) + "\n"


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


def write_gguf(output: Path, name: str, config: dict, tensors: dict, types: dict, proto,
               flags: tuple[bool, bool], dtype: str, modelfile: str) -> None:
    """Write the file and the Modelfile under temporary names and rename them into place, so a failed export
    leaves nothing."""
    import gguf

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    partial_modelfile = output.with_name(f".Modelfile.tmp-{os.getpid()}")
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
        writer.add_file_type(gguf.LlamaFileType[DTYPES[dtype][1]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, proto, flags)
        for tensor_name, array in tensors.items():
            qtype = types[tensor_name]
            writer.add_tensor(tensor_name, gguf.quants.quantize(np_float32(array), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial_modelfile.write_text(modelfile, encoding="utf-8")
        os.replace(partial, output)
        os.replace(partial_modelfile, output.with_name("Modelfile"))
    except BaseException as error:
        writer.close()
        partial.unlink(missing_ok=True)
        partial_modelfile.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise InputError(f"could not write '{output}' ({error}); free some space or choose another output "
                             f"file") from None
        raise


def np_float32(array):
    import numpy as np

    return np.ascontiguousarray(array, dtype=np.float32)


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
