"""Utilities/export-gguf.py: the GGUF read back with the gguf package holds the checkpoint's tensors in the types
llama.cpp chooses and a tokenizer that llama.cpp's sentencepiece algorithm turns into transformers' ids; the
Modelfile beside it. test_gguf_llama_cpp.py runs the files in llama.cpp itself."""

import heapq
import json
import shutil

import numpy as np
import pytest

from pretrain.errors import InputError
from pretrain.export.gguf import main
from tests.helpers.runs import TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, run_script
from tests.helpers.texts import tokenizer_test_texts

LLAMA_CPP_NAMES = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
    f"blk.{layer}.{name}.weight" for layer in range(2) for name in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}


def export(checkpoint, output, *flags):
    main([str(checkpoint), str(output), *flags])
    import gguf

    return gguf.GGUFReader(str(output))


def field(reader, name):
    return reader.fields[name].contents()


def hf_weights(checkpoint):
    from safetensors.numpy import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def unpermute(weights, heads):
    """The inverse of llama.cpp's reordering of query/key rows."""
    return weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def llama_cpp_encode(text, token_ids, scores, add_space_prefix):
    """llama.cpp's sentencepiece tokenizer (llm_tokenizer_spm): from single characters, merge the neighbours whose
    concatenation is a token, highest score first (leftmost on ties); what is no token is spelled in bytes."""
    if not text:
        return []
    text = ((" " if add_space_prefix else "") + text).replace(" ", "\u2581")
    symbols, sizes = list(text), [len(c.encode()) for c in text]
    before, after = list(range(-1, len(text) - 1)), list(range(1, len(text))) + [-1]
    queue = []

    def push(left, right):
        if left >= 0 and right >= 0 and symbols[left] + symbols[right] in token_ids:
            token = token_ids[symbols[left] + symbols[right]]
            heapq.heappush(queue, (-scores[token], left, right, sizes[left] + sizes[right]))

    for right in range(1, len(text)):
        push(right - 1, right)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if sizes[left] == 0 or sizes[right] == 0 or sizes[left] + sizes[right] != size:
            continue  # one of them was merged since
        symbols[left], sizes[left], sizes[right] = symbols[left] + symbols[right], size, 0
        after[left] = after[right]
        if after[right] >= 0:
            before[after[right]] = left
        push(before[left], left)
        push(left, after[left])
    ids, at = [], 0
    while at != -1:
        piece = symbols[at]
        ids += [token_ids[piece]] if piece in token_ids else [token_ids[f"<0x{b:02X}>"] for b in piece.encode()]
        at = after[at]
    return ids


@pytest.fixture(scope="module")
def f32_export(tmp_path_factory, tiny_checkpoint):
    output = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    return export(tiny_checkpoint, output, "--dtype", "f32")


def test_the_tensors_are_the_checkpoints_exactly(f32_export, tiny_checkpoint):
    import gguf

    tensors = {tensor.name: tensor for tensor in f32_export.tensors}
    assert set(tensors) == LLAMA_CPP_NAMES
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf_name, weights in hf_weights(tiny_checkpoint).items():
        tensor = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        data = np.asarray(tensor.data).reshape(weights.shape)
        if hf_name.endswith("q_proj.weight"):
            data = unpermute(data, 4)
        elif hf_name.endswith("k_proj.weight"):
            data = unpermute(data, 2)
            assert not np.array_equal(np.asarray(tensor.data).reshape(weights.shape), weights)
        assert np.array_equal(data, weights), hf_name


def test_the_llama_settings_are_the_checkpoints(f32_export):
    expected = {"general.architecture": "llama", "general.name": "final-checkpoint", "general.file_type": 0,
                "llama.context_length": TEST_BLOCK_SIZE, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.attention.key_length": 16, "llama.vocab_size": TEST_VOCAB_SIZE,
                "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 3,
                "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
                "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.remove_extra_whitespaces": False}
    assert {name: field(f32_export, name) for name in expected} == expected
    assert field(f32_export, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)


def test_the_gguf_tokenizer_gives_transformers_ids(f32_export, tiny_checkpoint):
    from transformers import AutoTokenizer

    tokens, scores = field(f32_export, "tokenizer.ggml.tokens"), field(f32_export, "tokenizer.ggml.scores")
    types = field(f32_export, "tokenizer.ggml.token_type")
    assert len(tokens) == TEST_VOCAB_SIZE and tokens[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert types[:4] == [2, 3, 3, 3] and set(types[4:260]) == {6} and set(types[260:]) == {1}
    token_ids = {token: i for i, token in enumerate(tokens)}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    texts = tokenizer_test_texts()
    assert len(texts) >= 1000
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    got = [llama_cpp_encode(text, token_ids, scores, field(f32_export, "tokenizer.ggml.add_space_prefix"))
           for text in texts]
    assert [text for text, a, b in zip(texts, expected, got) if a != b] == []


def test_f16_is_the_default_and_keeps_the_norms_in_f32(tmp_path, tiny_checkpoint):
    import gguf

    reader = export(tiny_checkpoint, tmp_path / "model.gguf")
    assert field(reader, "general.file_type") == 1
    weights = hf_weights(tiny_checkpoint)
    for tensor in reader.tensors:
        if tensor.name.endswith("norm.weight"):
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F16, tensor.name
    embeddings = np.asarray(next(t for t in reader.tensors if t.name == "token_embd.weight").data)
    reference = weights["model.embed_tokens.weight"]
    assert np.allclose(embeddings.astype(np.float32).reshape(reference.shape), reference, rtol=1e-3, atol=1e-6)


def copy_checkpoint(tiny_checkpoint, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy, ignore=shutil.ignore_patterns("accelerate_state"))
    return copy


def test_a_checkpoint_without_tokenizer_model_gets_the_same_vocabulary(tmp_path, tiny_checkpoint, f32_export):
    old = copy_checkpoint(tiny_checkpoint, tmp_path)
    (old / "tokenizer.model").unlink()
    reader = export(old, tmp_path / "old.gguf", "--dtype", "f32")
    for name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert field(reader, name) == field(f32_export, name), name


def test_tied_embeddings_leave_the_output_matrix_out(tmp_path, tiny_checkpoint):
    from safetensors.numpy import save_file

    tied = copy_checkpoint(tiny_checkpoint, tmp_path)
    weights = hf_weights(tiny_checkpoint)
    del weights["lm_head.weight"]
    save_file(weights, str(tied / "model.safetensors"))
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    names = {tensor.name for tensor in export(tied, tmp_path / "tied.gguf").tensors}
    assert names == LLAMA_CPP_NAMES - {"output.weight"}


def set_config(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return change


def add_tensor(folder):
    from safetensors.numpy import save_file

    weights = hf_weights(folder)
    save_file({**weights, "model.extra.weight": np.zeros(3, np.float32)}, str(folder / "model.safetensors"))


def untrainable_tokenizer_json(folder):
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer.model").unlink()


def one_piece_short(folder):
    """A tokenizer.model one piece short of the embedding rows."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto.FromString((folder / "tokenizer.model").read_bytes())
    del proto.pieces[-1]
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(),
     "'{f}' is not a checkpoint folder (no config.json); give output_dir/final-checkpoint or a step_N folder"),
    (set_config(model_type="mistral"), "'{f}' holds a 'mistral' model; only Llama checkpoints are exported"),
    (set_config(attention_bias=True, rope_parameters={"rope_type": "yarn", "factor": 2.0}),
     "'{f}' uses attention_bias, rope_type yarn, which this exporter does not write; use llama.cpp's "
     "convert_hf_to_gguf.py for it"),
    (lambda f: (f / "tokenizer.json").unlink(),
     "'{f}' has no tokenizer.json; give a checkpoint folder written by pre-training.py"),
    (untrainable_tokenizer_json,
     "'{f}' has no tokenizer.model and its tokenizer.json cannot be written as one (its pre-tokenizer is not the "
     "built-in word split); llama.cpp's convert_hf_to_gguf.py reads such tokenizers as BPE"),
    (lambda f: (f / "model.safetensors").unlink(),
     "'{f}' has no model.safetensors; give a checkpoint folder written by pre-training.py"),
    (add_tensor, "the checkpoint has a tensor 'model.extra.weight' that a Llama does not have; export a checkpoint "
                 "written by pre-training.py"),
    (one_piece_short,
     "'{f}' has 1024 embedding rows but its tokenizer has 1023 pieces; export a checkpoint whose "
     "model_args.vocab_size is the tokenizer's size"),
])
def test_bad_checkpoints_are_refused_and_nothing_is_written(tmp_path, tiny_checkpoint, damage, message):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path)
    damage(folder)
    with pytest.raises(InputError) as caught:
        main([str(folder), str(tmp_path / "out" / "model.gguf")])
    assert str(caught.value) == message.format(f=folder)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_script_exits_2_with_one_line_and_keeps_an_existing_file(tmp_path, tiny_checkpoint):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"keep me")
    result = run_script("Utilities/export-gguf.py", tiny_checkpoint, output)
    assert result.returncode == 2 and output.read_bytes() == b"keep me"
    assert result.stderr.splitlines() == [f"error: '{output}' already exists; remove it, choose another output "
                                          f"folder or pass --overwrite"]
    result = run_script("Utilities/export-gguf.py", tiny_checkpoint, output, "--overwrite", check=True)
    assert result.stdout.startswith(f"wrote '{output}' (") and output.read_bytes()[:4] == b"GGUF"
    assert result.stdout.rstrip().endswith(f" and '{tmp_path / 'Modelfile'}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model.gguf"]


def test_a_failed_write_leaves_no_file(tmp_path, tiny_checkpoint, monkeypatch):
    import gguf

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(InputError) as caught:
        main([str(tiny_checkpoint), str(tmp_path / "model.gguf")])
    assert str(caught.value) == (f"could not write '{tmp_path / 'model.gguf'}' ([Errno 28] No space left on "
                                 f"device); free some space or choose another output file")
    assert list(tmp_path.iterdir()) == []


MATRICES = sorted(LLAMA_CPP_NAMES - {"output.weight", "token_embd.weight", "output_norm.weight"} -
                  {f"blk.{layer}.{name}.weight" for layer in range(2) for name in ("attn_norm", "ffn_norm")})


@pytest.mark.parametrize("dtype, matrices, head", [
    ("bf16", "BF16", "BF16"), ("q8_0", "Q8_0", "Q8_0"), ("q5_1", "Q5_1", "Q8_0"), ("q5_0", "Q5_0", "Q8_0"),
    ("q4_1", "Q4_1", "Q8_0"), ("q4_0", "Q4_0", "Q8_0")])
def test_quantized_types_keep_norms_f32_and_the_output_matrix_in_q8_0(tmp_path, tiny_checkpoint, dtype, matrices,
                                                                      head):
    import gguf

    reader = export(tiny_checkpoint, tmp_path / "model.gguf", "--dtype", dtype)
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types == {**{name: "F32" for name in LLAMA_CPP_NAMES if name.endswith("norm.weight")},
                     **{name: matrices for name in [*MATRICES, "token_embd.weight"]}, "output.weight": head}
    assert field(reader, "general.file_type") == gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"]
    # Each weight within its block's rounding step of the checkpoint's: a step is the block's range over the
    # 2^bits - 1 levels, so no error exceeds 2 / (2^bits - 1) of the block's largest magnitude.
    bits = {"BF16": 8, "Q8_0": 8, "Q5_1": 5, "Q5_0": 5, "Q4_1": 4, "Q4_0": 4}
    weights = {gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(name, try_suffixes=(".weight",)): array
               for name, array in hf_weights(tiny_checkpoint).items() if "norm" not in name}
    for tensor in reader.tensors:
        if tensor.name not in weights or "attn_q" in tensor.name or "attn_k" in tensor.name:
            continue  # the norms are exact (above), query and key rows reordered (test_the_tensors_are_...)
        original = weights[tensor.name]
        restored = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(original.shape)
        blocks = np.abs(original).reshape(-1, 32).max(-1, keepdims=True)
        error = np.abs(restored - original).reshape(-1, 32)
        assert (error <= blocks * 2 / (2 ** bits[tensor.tensor_type.name] - 1)).all(), tensor.name
        assert error.max() > 0, tensor.name


def test_tied_embeddings_are_quantized_as_the_output_matrix(tmp_path, tiny_checkpoint):
    from safetensors.numpy import save_file

    tied = copy_checkpoint(tiny_checkpoint, tmp_path)
    weights = hf_weights(tiny_checkpoint)
    del weights["lm_head.weight"]
    save_file(weights, str(tied / "model.safetensors"))
    set_config(tie_word_embeddings=True)(tied)
    types = {t.name: t.tensor_type.name for t in export(tied, tmp_path / "tied.gguf", "--dtype", "q4_0").tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert {types[name] for name in MATRICES} == {"Q4_0"}


def narrow_feed_forward(folder, width):
    """The checkpoint in `folder` with its feed-forward layers cut to `width`: ffn_down's rows are `width` long."""
    from safetensors.numpy import save_file

    weights = hf_weights(folder)
    for name, array in weights.items():
        if "gate_proj" in name or "up_proj" in name:
            weights[name] = array[:width]
        elif "down_proj" in name:
            weights[name] = np.ascontiguousarray(array[:, :width])
    save_file(weights, str(folder / "model.safetensors"))
    set_config(intermediate_size=width)(folder)


def test_rows_that_do_not_split_into_blocks_stay_f16(tmp_path, tiny_checkpoint, capsys):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path)
    narrow_feed_forward(folder, 100)
    for dtype, matrices in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        reader = export(folder, tmp_path / dtype / "model.gguf", "--dtype", dtype)
        types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
        assert {name for name, qtype in types.items() if qtype == "F16"} == \
            {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
        assert types["blk.0.ffn_up.weight"] == types["blk.1.attn_q.weight"] == matrices
        assert field(reader, "llama.feed_forward_length") == 100
        assert capsys.readouterr().out.startswith(
            f"note: 2 matrices stay f16, their rows not splitting into {dtype}'s blocks: blk.0.ffn_down.weight, "
            f"blk.1.ffn_down.weight\nwrote ")


def test_a_type_no_matrix_can_take_is_refused_and_nothing_is_written(tmp_path, tiny_checkpoint):
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = copy_checkpoint(tiny_checkpoint, tmp_path)
    config = LlamaConfig.from_pretrained(str(folder))
    config.hidden_size, config.intermediate_size, config.head_dim = 48, 100, 12  # every row 48 or 100 values long
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    with pytest.raises(InputError) as caught:
        main([str(folder), str(tmp_path / "out" / "model.gguf"), "--dtype", "q4_1"])
    assert str(caught.value) == ("--dtype q4_1 stores matrices in blocks of 32 values per row, and no matrix of this "
                                 "model has such rows; export it as f16, bf16 or f32")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert field(export(folder, tmp_path / "out" / "model.gguf"), "llama.embedding_length") == 48


def test_the_modelfile_runs_the_gguf_beside_it_with_the_checkpoints_sampling(tmp_path, tiny_checkpoint):
    export(tiny_checkpoint, tmp_path / "out" / "tiny.gguf", "--dtype", "q8_0")
    assert (tmp_path / "out" / "Modelfile").read_text(encoding="utf-8") == (
        "FROM ./tiny.gguf\n\n"
        "# A base model: the prompt goes in as it is, and the model continues it.\n"
        'TEMPLATE "{{ .Prompt }}"\n'
        "# Beyond the length trained with, the rotary positions are ones the model never saw.\n"
        f"PARAMETER num_ctx {TEST_BLOCK_SIZE}\n"
        "# Sampling as the checkpoint's generation_config.json sets it for its training samples.\n"
        "PARAMETER temperature 1.0\nPARAMETER top_k 50\nPARAMETER top_p 0.95\nPARAMETER repeat_penalty 1.2\n"
        "PARAMETER num_predict 48\nPARAMETER repeat_last_n -1\n")


def test_a_checkpoint_without_sampling_settings_gets_ollamas_and_greedy_stays_greedy(tmp_path, tiny_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path)
    (folder / "generation_config.json").unlink()
    export(folder, tmp_path / "plain" / "model.gguf")
    lines = (tmp_path / "plain" / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if line.startswith(("FROM", "TEMPLATE", "PARAMETER"))] == [
        "FROM ./model.gguf", 'TEMPLATE "{{ .Prompt }}"', f"PARAMETER num_ctx {TEST_BLOCK_SIZE}"]
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 20}))
    export(folder, tmp_path / "greedy" / "model.gguf")
    lines = (tmp_path / "greedy" / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if line.startswith("PARAMETER")][1:] == [
        "PARAMETER temperature 0", "PARAMETER num_predict 20"]


def test_an_existing_modelfile_is_kept_unless_overwrite(tmp_path, tiny_checkpoint):
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    with pytest.raises(InputError) as caught:
        main([str(tiny_checkpoint), str(tmp_path / "model.gguf"), "--dtype", "q4_0"])
    assert str(caught.value) == (f"'{tmp_path / 'Modelfile'}' already exists; remove it, choose another output "
                                 f"folder or pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]
    main([str(tiny_checkpoint), str(tmp_path / "model.gguf"), "--dtype", "q4_0", "--overwrite"])
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
