"""Reading a tokenizer folder for packing: its Rust tokenizer and the BOS/EOS ids, as transformers reads them.

    tokenizer, record = load_tokenizer("my-tokenizer", token=None)   # record: what the manifest keeps of it
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.data.manifest import sha256_file
from pretrain.errors import InputError, first_line
from pretrain.hub import download_tokenizer, looks_local

GENERIC_CLASS = "PreTrainedTokenizerFast"
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
LLAMA_SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}  # the class's defaults
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_SPECIAL_TOKEN_KEYS = ("additional_special_tokens", "extra_special_tokens")
# The tokenizer_config.json keys (besides its special tokens, `*_token`) that leave transformers 5's LlamaTokenizer
# encoding as read_llama_tokenizer rebuilds it; a folder with any other key (other tokenizer files, remote code)
# goes through transformers instead.
LLAMA_CONFIG_KEYS = {"tokenizer_class", "legacy", "add_prefix_space", "added_tokens_decoder", "split_special_tokens",
                     "clean_up_tokenization_spaces", "spaces_between_special_tokens", "padding_side",
                     "truncation_side", "model_max_length", "model_input_names", "sp_model_kwargs",
                     "use_default_system_prompt", "chat_template", *EXTRA_SPECIAL_TOKEN_KEYS}
ADDED_TOKEN_FIELDS = {"content", "single_word", "lstrip", "rstrip", "normalized", "special"}
# The transformers releases whose LlamaTokenizer builds what read_llama_tokenizer rebuilds, each checked with
# tests/unit/test_tokenizer_folder.py; 5.0-5.2 built other pipelines and later releases are unchecked, so with those
# transformers reads Llama folders itself.
LLAMA_REBUILD_RELEASES = ((5, 3), (5, 24))


class NotReproduced(Exception):
    """The folder holds something that the readers here may not read as transformers does: transformers reads it."""


@dataclass
class PackingTokenizer:
    """What packing needs of a tokenizer folder: its Rust tokenizer and the ids that separate documents."""
    backend: object          # tokenizers.Tokenizer, set to encode text that looks like `</s>` as text
    bos_token_id: int
    eos_token_id: int
    vocab_size: int          # with the added tokens, as len() of the transformers tokenizer counts it


def load_tokenizer(name: str, token: str | None) -> tuple[PackingTokenizer, dict]:
    """The tokenizer, and what the manifest records about it (path, sha256 of tokenizer.json, vocabulary size).

    The ids must be the ones pre-training and inference will see, those of `AutoTokenizer.from_pretrained(folder)`,
    but importing transformers, and torch behind it, would add seconds to every run. So a folder whose config names
    the generic PreTrainedTokenizerFast (train-sentencepiece.py writes those) is read with the `tokenizers` library
    alone, as transformers uses its tokenizer.json; one of class LlamaTokenizer(Fast) (the published TeenyTinyLlama
    tokenizers) gets, also without transformers, the pipeline that transformers rebuilds it with. Any other class,
    and a folder holding something these readers do not cover, goes through transformers itself.
    """
    folder = Path(name).expanduser()
    local = folder.exists()
    if not local:
        if looks_local(name):
            raise InputError(f"tokenizer '{name}' does not exist; check the path")
        folder = download_tokenizer(name, token)
    if not folder.is_dir():
        raise InputError(f"tokenizer '{name}' is a file; give the folder that holds its tokenizer.json")
    if not (folder / "tokenizer.json").is_file():
        raise unusable_tokenizer(f"tokenizer '{name}' is not a fast tokenizer with a tokenizer.json")
    config = read_json_config(folder / "tokenizer_config.json", name)
    tokenizer_class = config.get("tokenizer_class", GENERIC_CLASS)
    tokenizer = None
    if tokenizer_class == GENERIC_CLASS:
        tokenizer = read_generic_tokenizer(folder, name, config)
    elif tokenizer_class in LLAMA_CLASSES:
        tokenizer = read_llama_tokenizer(folder, name, config)
    tokenizer = tokenizer or read_with_transformers(folder, name)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer '{name}' lacks a BOS or EOS token, which separate the packed documents; "
                         f"give a tokenizer that defines both")
    return tokenizer, {"path": str(folder.resolve()) if local else name,
                       "tokenizer_json_sha256": sha256_file(folder / "tokenizer.json"),
                       "vocab_size": tokenizer.vocab_size}


def read_generic_tokenizer(folder: Path, name: str, config: dict) -> PackingTokenizer | None:
    """tokenizer.json as it is, or None where the config adds tokens to it (transformers then gives them ids) or
    gives one in a form not read here."""
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8", errors="replace")
    try:
        backend = text_backend(tokenizer_json)
    except Exception as error:  # the Rust parser's message names the offending field
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({first_line(error)})") from None
    vocabulary = backend.get_vocab(with_added_tokens=True)
    try:
        special = special_tokens(folder, name, config, defaults={})
        check_inert_tokens(list((config.get("added_tokens_decoder") or {}).items()), special, vocabulary)
    except (NotReproduced, TypeError, AttributeError, KeyError, ValueError):  # transformers then reads the folder
        return None
    return packing_tokenizer(backend, vocabulary, special)


def packing_tokenizer(backend, vocabulary: dict, special: dict) -> PackingTokenizer:
    bos, eos = (vocabulary[special[key]] if special.get(key) else None for key in ("bos_token", "eos_token"))
    return PackingTokenizer(backend, bos, eos, backend.get_vocab_size(with_added_tokens=True))


def read_with_transformers(folder: Path, name: str) -> PackingTokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # transformers raises many kinds for a folder that is not a tokenizer
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({first_line(error)})") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise unusable_tokenizer(f"tokenizer '{name}' is not a fast tokenizer with a tokenizer.json")
    return PackingTokenizer(text_backend(tokenizer.backend_tokenizer.to_str()), tokenizer.bos_token_id,
                            tokenizer.eos_token_id, len(tokenizer))


def read_llama_tokenizer(folder: Path, name: str, config: dict) -> PackingTokenizer | None:
    """The tokenizer transformers 5's LlamaTokenizer makes of this folder, or None where this rebuild of it may differ.

    That class keeps only the vocabulary and merges of tokenizer.json, in a BPE of its own settings (byte fallback,
    no unknown token), with no normalizer and a Metaspace pre-tokenizer that does not split words; its special
    tokens default to Llama's. Covered: the folders whose every added and special token is a special token of the
    vocabulary, which then changes neither the ids of text (`encode_special_tokens`) nor the vocabulary's size.
    """
    try:
        other_keys = {key for key in config if not key.endswith("_token")} - LLAMA_CONFIG_KEYS
        if not rebuilt_as_installed_transformers() or other_keys:
            raise NotReproduced
        if (folder / "added_tokens.json").exists():
            raise NotReproduced
        # A model config of another type can make AutoTokenizer pick another class than the tokenizer config's.
        if (folder / "config.json").exists() and \
                read_json_config(folder / "config.json", name).get("model_type") != "llama":
            raise NotReproduced
        tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8", errors="replace")
        if '"ByteLevel"' in tokenizer_json:  # transformers keeps the file's pipeline for those (Llama 3 style)
            raise NotReproduced
        return llama_tokenizer(json.loads(tokenizer_json), folder, name, config)
    except (NotReproduced, ValueError, TypeError, AttributeError, KeyError):  # transformers then reads the folder
        return None


def llama_tokenizer(tokenizer_json: dict, folder: Path, name: str, config: dict) -> PackingTokenizer:
    """LlamaTokenizer's pipeline over the vocabulary and merges of `tokenizer_json` (the parsed tokenizer.json)."""
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    if model["type"] != "BPE" or not isinstance(vocab, dict) or len(vocab) > 100000:  # transformers patches those
        raise NotReproduced
    merges = [merge.split(" ") if isinstance(merge, str) else list(merge) for merge in model.get("merges", [])]
    if any(len(merge) != 2 for merge in merges):
        raise NotReproduced
    added = [(token["id"], token) for token in tokenizer_json.get("added_tokens") or []]
    added += list((config.get("added_tokens_decoder") or {}).items())
    special = special_tokens(folder, name, config, LLAMA_SPECIAL_TOKENS)
    check_inert_tokens(added, special, vocab)
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = add_prefix_space if add_prefix_space is not None else True
    prepend_scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tokenizer_json["normalizer"] = None
    tokenizer_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend_scheme,
                                       "split": False}
    tokenizer_json["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                               "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                               "ignore_merges": False, "vocab": vocab, "merges": merges}
    try:
        backend = text_backend(json.dumps(tokenizer_json))
    except Exception:  # the Rust parser refused it; transformers gives the message
        raise NotReproduced from None
    return packing_tokenizer(backend, vocab, special)


def check_inert_tokens(added: list[tuple], special: dict, vocabulary: dict) -> None:
    """NotReproduced unless every added token (id, serialized AddedToken) and special token is a special token of
    the vocabulary: one that is not special would be matched in the text, one not in it would get a new id."""
    for index, token in added:
        if not set(token) - {"id"} <= ADDED_TOKEN_FIELDS or not token.get("special") or \
                vocabulary.get(token["content"]) != int(index):
            raise NotReproduced
    if any(token not in vocabulary for token in special.values() if token is not None):
        raise NotReproduced


def special_tokens(folder: Path, name: str, config: dict, defaults: dict) -> dict[str, str | None]:
    """Every special token transformers 5 sets for the folder, by key (extra ones as `extra_special_tokens.N`): the
    class's `defaults`, then tokenizer_config.json's (model-specific `*_token` keys among them), then the legacy
    special_tokens_map.json's unless the config lists its added tokens itself. NotReproduced for a value in a form
    not read here."""
    found = dict(defaults)
    sources = [(config, True)]
    if "added_tokens_decoder" not in config:
        sources.append((read_json_config(folder / "special_tokens_map.json", name), False))
    for values, in_config in sources:
        for key, value in values.items():
            if key in EXTRA_SPECIAL_TOKEN_KEYS:
                extra = value.values() if isinstance(value, dict) else value or []
                found.update({f"{key}.{i}": token_content(token, in_config) for i, token in enumerate(extra)})
            elif key in SPECIAL_TOKEN_KEYS or (key.endswith("_token") and not isinstance(value, (bool, int))):
                found[key] = token_content(value, in_config)
            elif not in_config:
                raise NotReproduced
    return found


def token_content(value, in_config: bool) -> str | None:
    """A special token's text, as transformers reads the value: a string, or a serialized AddedToken (marked so
    in tokenizer_config.json)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("__type") == ("AddedToken" if in_config else None) and \
            set(value) - {"__type"} <= ADDED_TOKEN_FIELDS and isinstance(value.get("content"), str):
        return value["content"]
    raise NotReproduced


def rebuilt_as_installed_transformers() -> bool:
    """Whether the installed transformers is one of LLAMA_REBUILD_RELEASES, found without importing it."""
    try:
        release = tuple(int(part) for part in importlib.metadata.version("transformers").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return LLAMA_REBUILD_RELEASES[0] <= release <= LLAMA_REBUILD_RELEASES[1]


def read_json_config(path: Path, name: str) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({path.name}: "
                                 f"{first_line(error)})") from None
    return values if isinstance(values, dict) else {}


def unusable_tokenizer(problem: str) -> InputError:
    return InputError(f"{problem}; give a folder written by train-sentencepiece.py")


def text_backend(tokenizer_json: str):
    """The Rust tokenizer, set so text that looks like `</s>` is encoded as text (EOS then marks ends only), and
    documents are neither truncated nor padded, whatever tokenizer.json says, as a call of the transformers tokenizer
    leaves them."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend
