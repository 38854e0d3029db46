"""pretrain/tokenizer/folder.py: a generic or Llama-class tokenizer folder read without transformers gives the ids,
BOS/EOS and vocabulary size of AutoTokenizer; the folders those readers do not cover go through transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.errors import InputError
from pretrain.tokenizer import folder as tokenizer_folder
from tests.helpers.runs import REPO
from tests.helpers.texts import ROUND_TRIPS, read_sample_texts

# With the sample's documents: leading spaces, special-looking text, the metaspace and byte tokens written out.
TEXTS = ROUND_TRIPS + ["</s> não é o fim <s> nem <unk> nem <pad>", "   três espaços", "\t\ttabs",
                       "▁ já ▁▁ marcado", "<0x41> não é um byte", "olá ção açãoção", " </s>", "plugh xyzzy"]
# Whether the installed transformers builds the Llama pipeline that tokenizer_folder rebuilds (the releases checked).
REBUILT = tokenizer_folder.rebuilt_as_installed_transformers()
SPECIAL = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
# tokenizer_config.json as the published TeenyTinyLlama tokenizers have it (saved by transformers 4.x).
PUBLISHED_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
    "added_tokens_decoder": {str(i): {"content": token, **SPECIAL}
                             for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>"])},
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "right",
    "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
    "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "use_default_system_prompt": False}


def no_pre_tokenizer(tokenizer_json):  # a sentencepiece model converted by transformers has none
    tokenizer_json["pre_tokenizer"] = None


def byte_level(tokenizer_json):
    tokenizer_json["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                       "use_regex": True}


def truncated_and_padded(tokenizer_json):  # settings a call of the transformers tokenizer overrides
    tokenizer_json["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    tokenizer_json["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 3, "pad_type_id": 0, "pad_token": "<pad>"}


def plain_added_token(tokenizer_json):  # matched in the text, with a new id
    tokenizer_json["added_tokens"].append({"id": 1024, "content": "xyzzy", **SPECIAL, "special": False})


def three_part_merge(tokenizer_json):
    tokenizer_json["model"]["merges"][0] = "a b c"


def merge_outside_vocabulary(tokenizer_json):
    tokenizer_json["model"]["merges"][0] = ["zzq", "qzz"]


def sample_folder(tmp_path: Path, sample_tokenizer, config=None, edit=None, files=None) -> Path:
    """The sample tokenizer's folder (a tokenizer.model beside tokenizer.json, as in the published ones), marked
    LlamaTokenizerFast unless `config` says otherwise: `config` replaces keys of its tokenizer_config.json (a value
    of None drops the key), `edit` changes its tokenizer.json, `files` adds files."""
    folder = tmp_path / "tokenizer-folder"
    shutil.copytree(sample_tokenizer, folder)
    tokenizer_json = json.loads((Path(sample_tokenizer) / "tokenizer.json").read_text(encoding="utf-8"))
    if edit:
        edit(tokenizer_json)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    values = json.loads((Path(sample_tokenizer) / "tokenizer_config.json").read_text(encoding="utf-8"))
    values = {**values, "tokenizer_class": "LlamaTokenizerFast", **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    for file_name, content in (files or {}).items():
        (folder / file_name).write_text(json.dumps(content))
    return folder


@pytest.fixture
def transformers_reads(monkeypatch):
    """The folders that load_tokenizer hands to transformers."""
    folders = []
    read = tokenizer_folder.read_with_transformers

    def recording(folder, name):
        folders.append(folder)
        return read(folder, name)

    monkeypatch.setattr(tokenizer_folder, "read_with_transformers", recording)
    return folders


def assert_reads_as_transformers(folder: Path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    packing, record = tokenizer_folder.load_tokenizer(str(folder), None)
    assert (packing.bos_token_id, packing.eos_token_id, packing.vocab_size, record["vocab_size"]) == \
        (reference.bos_token_id, reference.eos_token_id, len(reference), len(reference))
    texts = read_sample_texts() + TEXTS
    expected = reference(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert [encoding.ids for encoding in packing.backend.encode_batch_fast(texts, add_special_tokens=False)] == expected
    return packing, reference


@pytest.mark.parametrize("config, edit, files, bos_eos", [
    ({}, None, {}, (1, 2)),
    ({"tokenizer_class": None, **PUBLISHED_CONFIG}, no_pre_tokenizer, {}, (1, 2)),
    ({"legacy": True}, None, {}, (1, 2)),
    ({"add_prefix_space": False, "legacy": True}, no_pre_tokenizer, {}, (1, 2)),
    ({"tokenizer_class": "LlamaTokenizer", "bos_token": None, "eos_token": None, "unk_token": None,
      "pad_token": None}, None, {}, (1, 2)),  # Llama's own defaults
    ({"bos_token": {"__type": "AddedToken", "content": "</s>", **SPECIAL}, "extra_special_tokens": ["<pad>"]},
     None, {}, (2, 2)),
    ({}, None, {"special_tokens_map.json": {"eos_token": {"content": "<pad>", **SPECIAL},
                                            "additional_special_tokens": ["<unk>"]}}, (1, 3)),
    ({}, None, {"config.json": {"model_type": "llama"}}, (1, 2)),
    ({}, truncated_and_padded, {}, (1, 2)),
    ({"eot_token": "</s>", "add_bos_token": True}, None, {}, (1, 2)),  # a model-specific special token
], ids=["sample-marked-llama", "published", "legacy", "no-prefix-space", "llama-defaults", "added-token-values",
        "special-tokens-map", "model-config", "truncated-and-padded", "model-specific-token"])
def test_llama_folders_are_rebuilt_without_transformers(tmp_path, sample_tokenizer, transformers_reads, config, edit,
                                                        files, bos_eos):
    folder = sample_folder(tmp_path, sample_tokenizer, config, edit, files)
    packing, reference = assert_reads_as_transformers(folder)
    assert transformers_reads == ([] if REBUILT else [folder])
    assert (packing.bos_token_id, packing.eos_token_id) == bos_eos
    ours, theirs = json.loads(packing.backend.to_str()), json.loads(reference.backend_tokenizer.to_str())
    assert [ours[part] for part in ("normalizer", "pre_tokenizer", "model")] == \
        [theirs[part] for part in ("normalizer", "pre_tokenizer", "model")]


@pytest.mark.parametrize("config, edit, through_transformers", [
    ({}, truncated_and_padded, False),
    ({"pad_token": "<mask>"}, None, True),                   # transformers adds it, with a new id
    ({"added_tokens_decoder": {"3": {"content": "<pad>", **SPECIAL, "special": False}}}, None, True),
], ids=["truncated-and-padded", "token-outside-vocabulary", "plain-added-token"])
def test_generic_folders_are_read_as_transformers_reads_them(tmp_path, sample_tokenizer, transformers_reads, config,
                                                             edit, through_transformers):
    folder = sample_folder(tmp_path, sample_tokenizer, {"tokenizer_class": "PreTrainedTokenizerFast", **config}, edit)
    assert_reads_as_transformers(folder)
    assert transformers_reads == ([folder] if through_transformers else [])


def test_no_prefix_space_changes_the_ids(tmp_path, sample_tokenizer):
    default = tokenizer_folder.load_tokenizer(str(sample_folder(tmp_path / "a", sample_tokenizer)), None)[0]
    never = sample_folder(tmp_path / "b", sample_tokenizer, {"add_prefix_space": False})
    never = tokenizer_folder.load_tokenizer(str(never), None)[0]
    assert default.backend.encode("olá", add_special_tokens=False).ids != \
        never.backend.encode("olá", add_special_tokens=False).ids


@pytest.mark.parametrize("config, edit, files", [
    ({"do_lower_case": True}, None, {}),                     # a key the rebuild does not know
    ({"mask_token": "<mask>"}, None, {}),                    # a special token outside the vocabulary: a new id
    ({}, plain_added_token, {}),
    ({}, byte_level, {}),
    ({}, None, {"added_tokens.json": {"<pad>": 3}}),
    ({}, None, {"special_tokens_map.json": {"sep_token": "</s>", "chat_template": "{{ messages }}"}}),
    ({}, None, {"config.json": {"model_type": "gpt2"}}),
], ids=["unknown-config-key", "token-outside-vocabulary", "plain-added-token", "byte-level",
        "added-tokens-file", "unknown-special-tokens-map-key", "other-model-config"])
def test_other_llama_folders_go_through_transformers(tmp_path, sample_tokenizer, transformers_reads, config, edit,
                                                     files):
    folder = sample_folder(tmp_path, sample_tokenizer, config, edit, files)
    assert_reads_as_transformers(folder)
    assert transformers_reads == [folder]


def test_a_plain_added_token_is_matched_in_the_text(tmp_path, sample_tokenizer):
    packing, _ = tokenizer_folder.load_tokenizer(str(sample_folder(tmp_path, sample_tokenizer, edit=plain_added_token)),
                                                 None)
    assert packing.vocab_size == 1025 and 1024 in packing.backend.encode("plugh xyzzy", add_special_tokens=False).ids


@pytest.mark.parametrize("release", ["5.2.0", "5.25.0.dev0", "6.0.0", "unknown"])
def test_other_transformers_releases_read_llama_folders_themselves(tmp_path, sample_tokenizer, transformers_reads,
                                                                    monkeypatch, release):
    import importlib.metadata

    def version(name):
        if name == "transformers" and release == "unknown":
            raise importlib.metadata.PackageNotFoundError(name)
        return release if name == "transformers" else importlib.metadata.distribution(name).version

    folder = sample_folder(tmp_path, sample_tokenizer)
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert_reads_as_transformers(folder)
    assert transformers_reads == [folder]


@pytest.mark.parametrize("config, edit", [
    ({}, three_part_merge),
    ({}, merge_outside_vocabulary),
    ({"bos_token": {"content": "<s>", **SPECIAL}}, None),   # an AddedToken not marked as one
    ({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"content": "<s>", **SPECIAL}}, None),
], ids=["three-part-merge", "merge-outside-vocabulary", "unmarked-added-token", "generic-unmarked-added-token"])
def test_folders_transformers_refuses_are_refused(tmp_path, sample_tokenizer, transformers_reads, config, edit):
    from transformers import AutoTokenizer

    folder = sample_folder(tmp_path, sample_tokenizer, config, edit)
    with pytest.raises(Exception):
        AutoTokenizer.from_pretrained(folder)
    with pytest.raises(InputError, match="could not load a tokenizer from"):
        tokenizer_folder.load_tokenizer(str(folder), None)
    assert transformers_reads == [folder]


def test_llama_folder_without_bos_is_refused_as_transformers_has_none(tmp_path, sample_tokenizer):
    from transformers import AutoTokenizer

    folder = sample_folder(tmp_path, sample_tokenizer, {"tokenizer_class": "LlamaTokenizer"})
    values = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**values, "bos_token": None}))
    assert AutoTokenizer.from_pretrained(folder).bos_token_id is None
    with pytest.raises(InputError, match="lacks a BOS or EOS token"):
        tokenizer_folder.load_tokenizer(str(folder), None)


@pytest.mark.skipif(not REBUILT, reason="the installed transformers rebuilds Llama folders otherwise")
def test_reading_a_llama_folder_imports_neither_transformers_nor_torch(tmp_path, sample_tokenizer):
    folder = sample_folder(tmp_path, sample_tokenizer, {"tokenizer_class": None, **PUBLISHED_CONFIG})
    code = ("import sys; from pretrain.tokenizer.folder import load_tokenizer; "
            f"tokenizer, _ = load_tokenizer({str(folder)!r}, None); "
            "print(tokenizer.bos_token_id, tokenizer.eos_token_id, 'transformers' in sys.modules, "
            "'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    # Outside the releases the rebuild was checked against, transformers reads the folder itself.
    through_transformers = str(not tokenizer_folder.rebuilt_as_installed_transformers())
    assert result.stdout.split() == ["1", "2", through_transformers, through_transformers]
