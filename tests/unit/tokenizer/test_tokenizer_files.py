"""pretrain/tokenizer/files.py: the tokenizer folder that train-sentencepiece.py and every checkpoint write loads
as transformers 4.x and 5.x read it, and its tokenizer.model gives sentencepiece the same ids."""

import json

import pytest

from pretrain.tokenizer.files import obstacle, portable, sentencepiece_model, special_tokens_of, write_tokenizer_files
from tests.helpers.runs import SAMPLE, TEST_BLOCK_SIZE, TEST_VOCAB_SIZE, run_script
from tests.helpers.texts import tokenizer_test_texts

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# Keys transformers 5's save_pretrained adds that 4.x cannot read or that pin a loader's arguments.
LOADER_KEYS = {"is_local", "local_files_only", "backend", "name_or_path", "tokenizer_file", "auto_map"}
VISIBLE_SPACE_TEXT = "\u2581 espaço visível"   # "▁" typed in the text decodes as a space, in sentencepiece too


@pytest.fixture(scope="module")
def texts():
    texts = tokenizer_test_texts()
    assert len(texts) >= 1000 and len(set(texts)) > 1000
    return texts


@pytest.fixture(scope="module")
def tokenizer_json(sample_tokenizer):
    return json.loads((sample_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))


def config_of(folder):
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


def rust_ids(folder, texts):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


# --- tokenizer_config.json ------------------------------------------------------------------------------------

def test_the_trained_folder_names_the_generic_class_and_no_loader_arguments(sample_tokenizer):
    config = config_of(sample_tokenizer)
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast",
                      "model_input_names": ["input_ids", "attention_mask"], **SPECIAL_TOKENS,
                      "padding_side": "right", "clean_up_tokenization_spaces": False}
    assert not LOADER_KEYS & set(config)


def test_a_checkpoint_carries_the_same_tokenizer_with_the_block_size(sample_tokenizer, tiny_checkpoint):
    from transformers import AutoTokenizer

    assert config_of(tiny_checkpoint) == {**config_of(sample_tokenizer), "model_max_length": TEST_BLOCK_SIZE}
    # Byte for byte: a checkpoint's tokenizer.json keeps the sha256 the tokenized folder's manifest records.
    for name in ("tokenizer.json", "tokenizer.model"):
        assert (tiny_checkpoint / name).read_bytes() == (sample_tokenizer / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    assert tokenizer.model_max_length == TEST_BLOCK_SIZE and len(tokenizer) == TEST_VOCAB_SIZE
    assert set(tokenizer(["Olá, mundo", "a"], padding=True)) == {"input_ids", "attention_mask"}


def test_special_tokens_of_a_transformers_tokenizer(sample_tokenizer):
    from transformers import AutoTokenizer

    assert special_tokens_of(AutoTokenizer.from_pretrained(str(sample_tokenizer))) == SPECIAL_TOKENS


# --- tokenizer.json ---------------------------------------------------------------------------------------------

def test_merges_are_spelled_as_every_tokenizers_release_reads_them(sample_tokenizer, tokenizer_json):
    merges = tokenizer_json["model"]["merges"]
    assert merges and all(isinstance(merge, str) and merge.count(" ") == 1 for merge in merges)
    assert merges[0] == "\u2581 d"


def test_merges_holding_a_space_stay_lists():
    spec = {"model": {"type": "BPE", "merges": [["a", "b"], ["x y", "z"]]}}
    assert portable(spec) is spec
    assert portable({"model": {"type": "BPE", "merges": [["a", "b"], "ab c"]}})["model"]["merges"] == ["a b", "ab c"]


# --- tokenizer.model --------------------------------------------------------------------------------------------

def test_tokenizer_model_gives_tokenizer_json_ids_and_the_text_back(sample_tokenizer, texts):
    import sentencepiece
    from transformers import AutoTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sample_tokenizer / "tokenizer.model"))
    expected = rust_ids(sample_tokenizer, texts)
    assert processor.encode(texts) == expected
    transformers_tokenizer = AutoTokenizer.from_pretrained(str(sample_tokenizer))
    assert [transformers_tokenizer(text)["input_ids"] for text in texts] == [[1] + ids for ids in expected]
    decoded = processor.decode(expected)
    assert [text for text, back in zip(texts, decoded) if text != back] == [VISIBLE_SPACE_TEXT]
    assert processor.get_piece_size() == TEST_VOCAB_SIZE
    assert [processor.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, 3)
    assert all(processor.is_byte(i) for i in range(4, 260)) and processor.is_control(1) and processor.is_unknown(0)


def test_unseen_characters_become_the_same_byte_tokens(sample_tokenizer):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sample_tokenizer / "tokenizer.model"))
    text = "\u2603 \U0001F9EA"  # a snowman and a test tube: in no training document
    ids = processor.encode(text)
    assert ids == rust_ids(sample_tokenizer, [text])[0]
    assert [processor.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAA>"]


def test_model_proto_fields(tokenizer_json):
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sentencepiece_model(tokenizer_json, SPECIAL_TOKENS)
    Piece = sp.ModelProto.SentencePiece
    assert proto.trainer_spec.model_type == sp.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    assert proto.trainer_spec.split_digits and proto.trainer_spec.allow_whitespace_only_pieces
    normalizer = proto.normalizer_spec
    assert (normalizer.name, normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces,
            normalizer.escape_whitespaces, normalizer.precompiled_charsmap) == ("identity", True, False, True, b"")
    types = [piece.type for piece in proto.pieces]
    assert types[:4] == [Piece.UNKNOWN, Piece.CONTROL, Piece.CONTROL, Piece.CONTROL]
    assert set(types[4:260]) == {Piece.BYTE} and set(types[260:]) == {Piece.NORMAL}
    # Scores follow the merge order: the piece the first merge makes scores highest.
    score = {piece.piece: piece.score for piece in proto.pieces}
    made = [merge.replace(" ", "") for merge in tokenizer_json["model"]["merges"]]
    assert [score[piece] for piece in made] == [-float(rank) for rank in range(len(made))]


def mutated(spec, change):
    spec = json.loads(json.dumps(spec))
    change(spec)
    return spec


@pytest.mark.parametrize("change, reason", [
    (lambda s: s["model"].update(byte_fallback=False), "its model is not a plain byte-fallback BPE"),
    (lambda s: s.update(normalizer=None), "its normalizer or decoder is not Llama 2's"),
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                       "split": False}), "its pre-tokenizer is not the built-in word split"),
    (lambda s: s["model"]["vocab"].pop("<0x41>"), "some of the 256 byte tokens are missing"),
    (lambda s: s["added_tokens"].append({"id": 5, "content": "<0x01>", "special": False}),
     "it has added tokens that are not special"),
    (lambda s: s["model"]["merges"].pop(), "it has pieces that no merge makes"),
])
def test_pipelines_sentencepiece_cannot_follow_are_named(tokenizer_json, change, reason):
    assert obstacle(tokenizer_json, SPECIAL_TOKENS) is None
    assert obstacle(mutated(tokenizer_json, change), SPECIAL_TOKENS) == reason


def test_a_tokenizer_without_unknown_token_gets_no_model(tmp_path, tokenizer_json):
    special = {key: value for key, value in SPECIAL_TOKENS.items() if key != "unk_token"}
    assert write_tokenizer_files(tmp_path, json.dumps(tokenizer_json), special) == "it has no unknown token"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert "unk_token" not in config_of(tmp_path)


def test_a_reference_pipeline_sentencepiece_cannot_follow_skips_tokenizer_model_with_one_note(
        tmp_path, sample_tokenizer, tokenizer_json):
    reference = tmp_path / "reference"
    reference.mkdir()
    digits = mutated(tokenizer_json, lambda s: s.update(pre_tokenizer={"type": "Digits", "individual_digits": True}))
    (reference / "tokenizer.json").write_text(json.dumps(digits, ensure_ascii=False), encoding="utf-8")
    result = run_script("train-sentencepiece.py", "--dataset_name", SAMPLE, "--vocab_size", TEST_VOCAB_SIZE,
                        "--reference_tokenizer", reference, "--output_dir", tmp_path / "tok", check=True)
    notes = [line for line in result.stdout.splitlines() if "tokenizer.model" in line]
    assert notes == ["note: no tokenizer.model written: sentencepiece cannot encode as this tokenizer does (its "
                     "pre-tokenizer is not the built-in word split); transformers needs only tokenizer.json"]
    assert not (tmp_path / "tok" / "tokenizer.model").exists()
    assert config_of(tmp_path / "tok") == config_of(sample_tokenizer)


def test_a_folder_written_twice_is_byte_identical(tmp_path, sample_tokenizer):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(sample_tokenizer / "tokenizer.json"))
    assert write_tokenizer_files(tmp_path, tokenizer.to_str(), SPECIAL_TOKENS) is None
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (sample_tokenizer / name).read_bytes(), name
