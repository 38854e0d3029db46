"""The tokenizer files of every folder we write, in the forms each tool that loads a Llama tokenizer reads.

    skipped = write_tokenizer_files(folder, tokenizer.to_str(), special_tokens, model_max_length=2048)
    proto = sentencepiece_model(json.loads(tokenizer.to_str()), special_tokens)   # a sentencepiece ModelProto

- tokenizer.json with its merges spelled "a b", the form tokenizers < 0.20 (transformers 4.40-4.44) reads too;
- tokenizer_config.json naming the generic PreTrainedTokenizerFast, which transformers 4.x and 5.x both read and
  which keeps tokenizer.json's pipeline as it is; no loader arguments, only input_ids and attention_mask;
- tokenizer.model, the same vocabulary as a sentencepiece BPE model, for sentencepiece, the slow LlamaTokenizer and
  llama.cpp. Written when sentencepiece can encode as tokenizer.json does: the built-in pipeline (see `obstacle`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.tokenizer.conventions import BYTE_TOKENS, WORD_SPLIT, llama2_settings

SPECIAL_TOKEN_NAMES = ("unk_token", "bos_token", "eos_token", "pad_token")


def special_tokens_of(tokenizer) -> dict:
    """The special tokens a transformers tokenizer has, by their tokenizer_config.json names."""
    return {name: str(getattr(tokenizer, name)) for name in SPECIAL_TOKEN_NAMES
            if getattr(tokenizer, name, None) is not None}


def write_tokenizer_files(folder: Path, tokenizer_json: str, special_tokens: dict,
                          model_max_length: int | None = None) -> str | None:
    """Write tokenizer.json, tokenizer_config.json and (where it can be made) tokenizer.model into `folder`.

    `tokenizer_json` is a tokenizer's to_str(); `model_max_length` the block size trained with, for a checkpoint.
    Returns why tokenizer.model was not written, or None when it was.
    """
    spec = json.loads(tokenizer_json)
    (folder / "tokenizer.json").write_text(json.dumps(portable(spec), indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(special_tokens, model_max_length), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
    reason = obstacle(spec, special_tokens)
    if reason is None:
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(spec, special_tokens).SerializeToString())
    return reason


def portable(spec: dict) -> dict:
    """tokenizer.json with its merges as "a b" strings, which every tokenizers release reads; lists (what
    tokenizers >= 0.20 writes) are kept only where a piece holds a space, which the string form cannot spell."""
    merges = (spec.get("model") or {}).get("merges") or []
    if any(isinstance(merge, list) and " " in "".join(merge) for merge in merges):
        return spec
    model = dict(spec["model"], merges=[" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    return dict(spec, model=model)


def tokenizer_config(special_tokens: dict, model_max_length: int | None) -> dict:
    # "PreTrainedTokenizerFast" rather than "LlamaTokenizerFast": transformers 5 rebuilds a Llama tokenizer with
    # its own unsplit Metaspace pre-tokenizer, which drops one of two leading spaces and encodes more slowly; the
    # generic class keeps tokenizer.json's pipeline. BOS/EOS are decided by tokenizer.json's post-processor.
    # Without model_input_names, transformers 4.x also returns token_type_ids, which LlamaForCausalLM refuses.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"],
              **{name: special_tokens[name] for name in SPECIAL_TOKEN_NAMES if name in special_tokens},
              "padding_side": "right", "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def merge_ranks(spec: dict) -> dict:
    """Each piece a merge makes, with the rank of the first merge that makes it."""
    ranks = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        ranks.setdefault(left + right, rank)
    return ranks


def obstacle(spec: dict, special_tokens: dict) -> str | None:
    """Why sentencepiece could not encode as this tokenizer.json does, or None.

    sentencepiece's BPE has no pre-tokenizer: it merges, by score, any two neighbours whose concatenation is a
    piece. With scores that follow the merge order that is tokenizer.json's BPE, provided no piece could span a cut
    of the pre-tokenizer: true of the built-in word split, whose cuts (before digits, runs of "▁" and other
    whitespace, and after them) no piece it was trained on crosses.
    """
    llama2 = llama2_settings()
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("dropout") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        return "its model is not a plain byte-fallback BPE"
    if spec.get("normalizer") != llama2["normalizer"] or spec.get("decoder") != llama2["decoder"]:
        return "its normalizer or decoder is not Llama 2's"
    if spec.get("pre_tokenizer") != WORD_SPLIT:
        return "its pre-tokenizer is not the built-in word split"
    if any(token not in vocab for token in BYTE_TOKENS):
        return "some of the 256 byte tokens are missing"
    if any(not added.get("special") for added in spec.get("added_tokens") or []):
        return "it has added tokens that are not special"
    if special_tokens.get("unk_token") not in vocab:
        return "it has no unknown token"
    special = {added["content"] for added in spec.get("added_tokens") or []}
    made = merge_ranks(spec)
    if any(len(token) > 1 and token not in made for token in vocab if token not in special | set(BYTE_TOKENS)):
        return "it has pieces that no merge makes"
    return None


def sentencepiece_model(spec: dict, special_tokens: dict):
    """tokenizer.json's vocabulary as a sentencepiece BPE ModelProto with the same ids (see `obstacle` first)."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    Piece = sp.ModelProto.SentencePiece
    vocab, ranks = spec["model"]["vocab"], merge_ranks(spec)
    special = {added["content"] for added in spec.get("added_tokens") or []}
    unk = special_tokens["unk_token"]
    proto = sp.ModelProto()
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        piece = proto.pieces.add(piece=token, score=0.0)
        if token == unk:
            piece.type = Piece.UNKNOWN
        elif token in special:
            piece.type = Piece.CONTROL
        elif token in BYTE_TOKENS:
            piece.type = Piece.BYTE
        else:
            # Only a merge's result is ever a candidate, so single characters need no order among themselves.
            piece.type, piece.score = Piece.NORMAL, -float(ranks.get(token, len(ranks)))
    trainer = proto.trainer_spec
    trainer.model_type = sp.TrainerSpec.BPE
    trainer.vocab_size = len(vocab)
    trainer.byte_fallback = True
    # What retraining with sentencepiece would need to cut as the word split does; encoding does not read these.
    trainer.split_digits = trainer.split_by_whitespace = trainer.allow_whitespace_only_pieces = True
    trainer.split_by_number, trainer.split_by_unicode_script = True, False
    trainer.treat_whitespace_as_suffix = False
    trainer.max_sentencepiece_length = max(len(token) for token in vocab)
    for name in ("unk", "bos", "eos", "pad"):
        token = special_tokens.get(f"{name}_token")
        setattr(trainer, f"{name}_id", vocab[token] if token in vocab else -1)
        if token in vocab:
            setattr(trainer, f"{name}_piece", token)
    normalizer = proto.normalizer_spec
    # Llama 2's normalizer: a "▁" before the text and every space as "▁", nothing else (no NFKC, spaces kept).
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = normalizer.escape_whitespaces = True
    normalizer.remove_extra_whitespaces = False
    normalizer.precompiled_charsmap = b""
    return proto
