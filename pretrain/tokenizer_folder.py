"""Reading a tokenizer folder for packing: its Rust tokenizer and the BOS/EOS ids, as transformers reads them.

    tokenizer, record = load_tokenizer("my-tokenizer", token=None)   # record: what the manifest keeps of it
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import InputError, first_line
from pretrain.hub import download_tokenizer, looks_local
from pretrain.manifest import sha256_file

GENERIC_CLASS = "PreTrainedTokenizerFast"


@dataclass
class PackingTokenizer:
    """What packing needs of a tokenizer folder: its Rust tokenizer and the ids that separate documents."""
    backend: object          # tokenizers.Tokenizer, set to encode text that looks like `</s>` as text
    bos_token_id: int
    eos_token_id: int
    vocab_size: int          # with the added tokens, as len() of the transformers tokenizer counts it


def load_tokenizer(name: str, token: str | None) -> tuple[PackingTokenizer, dict]:
    """The tokenizer, and what the manifest records about it (path, sha256 of tokenizer.json, vocabulary size).

    A folder whose config names the generic PreTrainedTokenizerFast (train-sentencepiece.py writes those) is read
    with the `tokenizers` library alone, as transformers would use it: importing transformers, and torch behind it,
    would add seconds to every run. Any other class goes through transformers, which rebuilds some tokenizers
    (Llama's among them) with a pipeline of its own: the ids must be the ones pre-training and inference will see.
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
    if config.get("tokenizer_class", GENERIC_CLASS) == GENERIC_CLASS:
        tokenizer = read_generic_tokenizer(folder, name, config)
    else:
        tokenizer = read_with_transformers(folder, name)
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer '{name}' lacks a BOS or EOS token, which separate the packed documents; "
                         f"give a tokenizer that defines both")
    return tokenizer, {"path": str(folder.resolve()) if local else name,
                       "tokenizer_json_sha256": sha256_file(folder / "tokenizer.json"),
                       "vocab_size": tokenizer.vocab_size}


def read_generic_tokenizer(folder: Path, name: str, config: dict) -> PackingTokenizer:
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8", errors="replace")
    try:
        backend = text_backend(tokenizer_json)
    except Exception as error:  # the Rust parser's message names the offending field
        raise unusable_tokenizer(f"could not load a tokenizer from '{name}' ({first_line(error)})") from None
    special = special_tokens(folder, name, config)
    ids = {role: backend.token_to_id(special[role]) if special.get(role) else None for role in ("bos", "eos")}
    return PackingTokenizer(backend, ids["bos"], ids["eos"], backend.get_vocab_size(with_added_tokens=True))


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


def special_tokens(folder: Path, name: str, config: dict) -> dict[str, str]:
    """The BOS and EOS token strings, as transformers 5 finds them: in tokenizer_config.json, overridden by the
    legacy special_tokens_map.json unless the config lists its added tokens itself."""
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(read_json_config(folder / "special_tokens_map.json", name))
    found = {}
    for values in sources:
        for role in ("bos", "eos"):
            value = values.get(f"{role}_token")
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str) and value:
                found[role] = value
    return found


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
    """The Rust tokenizer, set so text that looks like `</s>` is encoded as text: EOS then marks ends only."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = True
    return backend
