"""Utilities/export-gguf.py checked by llama.cpp itself, through its Python binding (llama-cpp-python): every type
it writes loads and tokenizes as transformers does, gives transformers' logits (f32, f16, bf16) or close to its
perplexity (the quantized types), continues a prompt greedily as transformers does, and holds exactly what
llama.cpp's own llama-quantize makes of the f32 file."""

import shutil

import numpy as np
import pytest

from pretrain.export.gguf import DTYPES, main
from tests.helpers.texts import tokenizer_test_texts
from tests.unit.export.test_gguf_export import narrow_feed_forward

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama.cpp's Python binding is not installed: pip install llama-cpp-python")

HELD_OUT_BLOCKS = 8
TRAINING_STEPS = 40
PROMPT = "A capital do Brasil é"
PROMPTS = [PROMPT, "O rio", "Em 1822, o", "A educação", "Os cientistas descobriram que"]


def held_out_blocks(tokenized):
    import pyarrow.parquet as pq

    files = sorted((tokenized / "test").glob("*.parquet"))
    rows = [row for file in files for row in pq.read_table(file).column("input_ids").to_pylist()]
    return np.array(rows[:HELD_OUT_BLOCKS], dtype=np.int64)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_checkpoint, sample_tokenized):
    """The tiny checkpoint trained a few more steps on the sample's training blocks: after two steps its
    predictions are nearly uniform, and a quantized copy of a model that predicts nothing is as good as any."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    rows = [row for file in sorted((sample_tokenized / "train").glob("*.parquet"))
            for row in pq.read_table(file).column("input_ids").to_pylist()]
    blocks = torch.tensor(rows, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(TRAINING_STEPS):
        batch = blocks[torch.randint(len(blocks), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained") / "checkpoint"
    shutil.copytree(tiny_checkpoint, out, ignore=shutil.ignore_patterns("accelerate_state", "model.safetensors"))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, trained_checkpoint):
    """Every --dtype of the trained checkpoint, each in a folder of its own (each has its Modelfile)."""
    root = tmp_path_factory.mktemp("exports")
    for dtype in DTYPES:
        main([str(trained_checkpoint), str(root / dtype / f"model-{dtype}.gguf"), "--dtype", dtype])
    return {dtype: root / dtype / f"model-{dtype}.gguf" for dtype in DTYPES}


def load(path, **settings):
    # The KV cache in f32: llama.cpp keeps it in f16 by default, which alone moves f32 logits by about 1e-2.
    # One thread: the suite runs tests in parallel processes already.
    return llama_cpp.Llama(str(path), n_ctx=settings.pop("n_ctx", 128), n_batch=128, n_threads=1, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **settings)


def llama_cpp_log_probs(path, blocks):
    model = load(path, logits_all=True)
    logits = []
    for block in blocks:
        model.reset()
        model.eval(block.tolist())
        logits.append(np.array(model.scores[:len(block)], dtype=np.float64))
    model.close()
    return log_softmax(np.stack(logits))


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(log_probs, blocks):
    """exp of the mean loss of every token but each block's first, as training's evaluation counts it."""
    picked = np.take_along_axis(log_probs[:, :-1], blocks[:, 1:, None], axis=-1)
    return float(np.exp(-picked.mean()))


@pytest.fixture(scope="module")
def held_out(sample_tokenized):
    return held_out_blocks(sample_tokenized)


@pytest.fixture(scope="module")
def reference(trained_checkpoint, held_out):
    """transformers' log-probabilities on the held-out blocks, from the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained_checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(held_out)).logits.double().numpy()
    return log_softmax(logits)


@pytest.fixture(scope="module")
def log_probs(exports, held_out):
    return {dtype: llama_cpp_log_probs(path, held_out) for dtype, path in exports.items()}


def test_llama_cpp_tokenizes_every_text_as_transformers(exports, trained_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained_checkpoint))
    vocabulary = load(exports["q4_0"], vocab_only=True)
    texts = tokenizer_test_texts()
    assert len(texts) >= 1000
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    got = [vocabulary.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in texts]
    assert [text for text, a, b in zip(texts, expected, got) if a != b] == []
    # <s> before the text, as the checkpoint's tokenizer adds it, and no </s>.
    assert vocabulary.tokenize(PROMPT.encode("utf-8")) == tokenizer(PROMPT)["input_ids"]
    assert vocabulary.token_bos() == 1 and vocabulary.token_eos() == 2
    vocabulary.close()


def test_f32_and_16_bit_logits_are_transformers(reference, log_probs, held_out):
    # f32 holds the checkpoint's exact weights: what differs is the order of float32 sums, relative 1e-7 per
    # operation, far below 1e-4 on log-probabilities of a few units. f16 and bf16 round every weight to 11 and 8
    # significant bits (relative 2^-11 and 2^-8), and ggml's CPU matrix products round the activations to the same
    # type: those errors mostly cancel in the sums, leaving the average log-probability within one such unit of
    # their spread; a single one can gather several along the layers, hence 32 units for the largest.
    spread = reference.std()
    assert np.abs(log_probs["f32"] - reference).max() < 1e-4
    for dtype, unit in (("f16", 2 ** -11), ("bf16", 2 ** -8)):
        error = np.abs(log_probs[dtype] - reference)
        assert error.mean() < unit * spread, dtype
        assert error.max() < 32 * unit * spread, dtype
        agree = (log_probs[dtype].argmax(-1) == reference.argmax(-1)).mean()
        assert agree > 0.99, (dtype, agree)


# The largest perplexity change allowed, relative to transformers' on the same blocks. The 4-bit types hold each
# weight to 1 part in 15 of its block's range, the 5-bit ones 1 in 31, q8_0 1 in 255. On this small model the
# changes are far below the 25% one might fear of 4 bits: these bounds are several times what they are here, which
# leaves room for another platform's training and still fails an export that puts one matrix in the wrong type.
PERPLEXITY_CHANGE = {"bf16": 0.001, "q8_0": 0.002, "q5_1": 0.01, "q5_0": 0.01, "q4_1": 0.02, "q4_0": 0.02}


@pytest.mark.parametrize("dtype", PERPLEXITY_CHANGE)
def test_quantized_perplexity_is_transformers_within_bounds(reference, log_probs, held_out, trained_checkpoint,
                                                            dtype):
    expected = perplexity(reference, held_out)
    vocab_size = reference.shape[-1]
    assert expected < 0.6 * vocab_size  # the model predicts something: far better than guessing uniformly
    assert perplexity(log_probs["f32"], held_out) == pytest.approx(expected, rel=1e-5)
    got = perplexity(log_probs[dtype], held_out)
    assert abs(got / expected - 1) < PERPLEXITY_CHANGE[dtype], (dtype, got, expected)


def test_the_logit_error_grows_as_the_bits_shrink(reference, log_probs):
    error = {dtype: float(np.sqrt(((log_probs[dtype] - reference) ** 2).mean())) for dtype in DTYPES}
    chain = [error["f32"], error["f16"], error["bf16"], error["q8_0"], min(error["q5_0"], error["q5_1"])]
    assert chain == sorted(chain), error
    # The same scheme with one bit less: twice the rounding step.
    assert error["q5_0"] < error["q4_0"] and error["q5_1"] < error["q4_1"], error


def test_greedy_continuation_of_f32_is_transformers(exports, trained_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained_checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(trained_checkpoint), dtype=torch.float32).eval()
    llm = load(exports["f32"])
    new_tokens, seen = 30, set()
    for text in PROMPTS:
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(prompt, do_sample=False, max_new_tokens=new_tokens,
                                      repetition_penalty=1.0)[0, prompt.shape[1]:].tolist()
        got = []
        for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == new_tokens or token == llm.token_eos():
                break
        assert got == expected, text
        seen.update(got)
    llm.close()
    # A model this small soon falls into a loop of a few tokens; the loops still differ from one token repeated.
    assert len(seen) > 3


def test_every_type_is_what_llama_quantize_makes_of_the_f32_file(exports, tmp_path):
    """llama.cpp's llama_model_quantize, run on our f32 file, writes each type: the same tensor types (norms f32, the
    output matrix q8_0 under the 4- and 5-bit types, since its rows of 64 do not split into q6_K's blocks of 256)
    and the same bytes, which also checks gguf's quantizers against ggml's."""
    for dtype in DTYPES:
        if dtype != "f32":
            assert_llama_quantize_makes(exports["f32"], exports[dtype], dtype, tmp_path)


def test_matrices_whose_rows_do_not_split_into_blocks_stay_f16_as_llama_quantize_keeps_them(tmp_path, tiny_checkpoint):
    folder = tmp_path / "narrow"
    shutil.copytree(tiny_checkpoint, folder, ignore=shutil.ignore_patterns("accelerate_state"))
    narrow_feed_forward(folder, 100)
    main([str(folder), str(tmp_path / "f32" / "model.gguf"), "--dtype", "f32"])
    for dtype in ("q8_0", "q5_1", "q4_0"):
        main([str(folder), str(tmp_path / dtype / "model.gguf"), "--dtype", dtype])
        assert_llama_quantize_makes(tmp_path / "f32" / "model.gguf", tmp_path / dtype / "model.gguf", dtype, tmp_path)


def assert_llama_quantize_makes(f32_path, our_path, dtype, tmp_path):
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType[DTYPES[dtype][1]]), 1
    theirs_path = tmp_path / f"llama-quantize-{dtype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32_path).encode(), str(theirs_path).encode(), params) == 0
    ours, theirs = gguf.GGUFReader(str(our_path)), gguf.GGUFReader(str(theirs_path))
    assert ours.fields["general.file_type"].contents() == theirs.fields["general.file_type"].contents()
    their_tensors = {tensor.name: tensor for tensor in theirs.tensors}
    assert {t.name: t.tensor_type.name for t in ours.tensors} == \
        {name: t.tensor_type.name for name, t in their_tensors.items()}, dtype
    for tensor in ours.tensors:
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8),
                              np.asarray(their_tensors[tensor.name].data).view(np.uint8)), (dtype, tensor.name)
