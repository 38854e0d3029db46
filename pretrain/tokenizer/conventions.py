"""Llama 2's tokenizer conventions, shared by the trainer, the folder writer and the GGUF export: the special
tokens and their ids, the 256 byte tokens, sentencepiece's visible space, the word split, and the pipeline
settings (normalizer, pre-tokenizer, post-processor, decoder) of Llama 2's own tokenizer.json.

Ids: <unk>=0 <s>=1 </s>=2 <pad>=3, then the 256 byte tokens <0x00>..<0xFF>, then the learned pieces.
"""

from __future__ import annotations

import json

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS, EOS = 0, "<s>", "</s>"
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
SPACE = "\u2581"  # "▁", sentencepiece's visible space
# The space piece must be a token of its own: the decoder turns "▁" back into " " before it reassembles bytes,
# so a "▁" spelled in byte tokens would come back as "▁".
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 1
# Cuts the normalized text into pieces and never changes it: words (with the run of "▁" before them, as
# sentencepiece keeps it), single digits (Llama 2 splits every number into digits), and runs of "▁" or of other
# whitespace (line breaks, tabs). Training needs it: a document is otherwise one "word" (slow, and merges cross
# spaces), and words glued across line breaks would fill the trainer's table with one-off combinations. Encoding
# works, and caches, piece by piece, which keeps long documents fast.
WORD_SPLIT = {"type": "Split", "pattern": {"Regex": f"{SPACE}*[^{SPACE}\\s\\d]+|\\d|{SPACE}+|\\s+"},
              "behavior": "Isolated", "invert": False}


def llama2_settings() -> dict:
    """Llama 2's pipeline as its Hub tokenizer.json spells it (legacy sentencepiece behaviour)."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return pipeline_settings(json.loads(tokenizer.to_str()), "built-in Llama 2 settings")


def pipeline_settings(tokenizer_json: dict, source: str) -> dict:
    """The parts of a tokenizer.json that the original copied from its reference tokenizer."""
    model = tokenizer_json.get("model") or {}
    return {"source": source, "normalizer": tokenizer_json.get("normalizer"),
            "pre_tokenizer": tokenizer_json.get("pre_tokenizer"),
            "post_processor": tokenizer_json.get("post_processor"), "decoder": tokenizer_json.get("decoder"),
            "byte_fallback": bool(model.get("byte_fallback", False)), "fuse_unk": bool(model.get("fuse_unk", False))}


def special_token_flags(post_processor: dict | None) -> tuple[bool, bool]:
    """Whether the reference's template puts <s> before and </s> after a single sequence."""
    if post_processor and post_processor.get("type") == "Sequence":
        post_processor = next((p for p in post_processor.get("processors", [])
                               if p.get("type") == "TemplateProcessing"), None)
    if not post_processor or post_processor.get("type") != "TemplateProcessing":
        return False, False
    pieces = [next(iter(piece.items())) for piece in post_processor["single"]]
    kinds = [kind for kind, _ in pieces]
    sequence_at = kinds.index("Sequence") if "Sequence" in kinds else len(kinds)
    before = {value["id"] for kind, value in pieces[:sequence_at] if kind == "SpecialToken"}
    after = {value["id"] for kind, value in pieces[sequence_at + 1:] if kind == "SpecialToken"}
    return BOS in before, EOS in after
