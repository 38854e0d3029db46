"""Training a Llama 2-style BPE tokenizer: the pipeline settings, the trainer, the checks and the saved folder.

    settings = reference_settings(None, token=None)         # Llama 2's built-in pipeline
    tokenizer = train(settings, batches_of_texts, vocab_size=32000)
    check_round_trip(tokenizer, settings); save(tokenizer, folder)

Ids: <unk>=0 <s>=1 </s>=2 <pad>=3, then the 256 byte tokens <0x00>..<0xFF>, then the learned pieces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pretrain.corpus import read_arrow_files
from pretrain.errors import InputError
from pretrain.hub import hub_reachable, looks_local

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS, EOS = 0, "<s>", "</s>"
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
SPACE = "\u2581"  # "▁", sentencepiece's visible space
# The space piece must be a token of its own: the decoder turns "▁" back into " " before it reassembles bytes,
# so a "▁" spelled in byte tokens would come back as "▁".
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 1
MAX_ALPHABET = 1000
HELD_OUT_DOCUMENTS = 1000
# sys.path[0] is the working directory under -c: replaced, so a json.py lying there cannot shadow a real module.
REPO = Path(__file__).resolve().parent.parent
CORPUS_CHILD = "import sys; sys.path[0] = sys.argv[1]; from pretrain.corpus import text_corpus_child; " \
               "text_corpus_child(sys.argv[2])"
# Cuts the normalized text into pieces and never changes it: words (with the run of "▁" before them, as
# sentencepiece keeps it), single digits (Llama 2 splits every number into digits), and runs of "▁" or of other
# whitespace (line breaks, tabs). Training needs it: a document is otherwise one "word" (slow, and merges cross
# spaces), and words glued across line breaks would fill the trainer's table with one-off combinations. Encoding
# works, and caches, piece by piece, which keeps long documents fast.
WORD_SPLIT = {"type": "Split", "pattern": {"Regex": f"{SPACE}*[^{SPACE}\\s\\d]+|\\d|{SPACE}+|\\s+"},
              "behavior": "Isolated", "invert": False}
# What must come back unchanged from decode(encode(text)); a reference whose settings fail this is refused.
ROUND_TRIP_PROBE = ("  Ação, coração e pão: São Paulo à noite!\n\tdef f(x):\n        return x  # 42\n"
                    "R$ 12,50 — 3,5%   espaços 😀 汉字 ẞ Ω\n")


def locate_corpus(args, scratch: Path) -> dict:
    """The dataset as Arrow files to read with pyarrow and its number of documents, found by a child process.

    Loading goes through the datasets library, whose imports (pandas, an HTTP stack: about 70 MB) would otherwise
    stay in this process all through training, beside the trainer's table of words. The child exits once the
    corpus is on disk as Arrow; the token reaches it through its environment, never its command line.
    """
    request = scratch / "request.json"
    request.write_text(json.dumps({"name": args.dataset_name, "split": args.dataset_split,
                                   "text_column": args.text_column, "scratch": str(scratch)}), encoding="utf-8")
    environment = dict(os.environ, **({"HF_TOKEN": args.hub_token} if args.hub_token else {}))
    child = subprocess.run([sys.executable, "-c", CORPUS_CHILD, str(REPO), str(request)], env=environment)
    answer_file = scratch / "answer.json"
    answer = json.loads(answer_file.read_text(encoding="utf-8")) if answer_file.is_file() else {}
    if "error" in answer:
        raise InputError(answer["error"])
    if child.returncode != 0 or "files" not in answer:
        how = f"killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0 else \
            f"exit status {child.returncode}"
        raise SystemExit(f"error: reading dataset '{args.dataset_name}' failed ({how}); see the messages above")
    return answer


def file_rows(corpus: dict, positions):
    """The rows of the corpus files that hold the documents at sorted `positions` (the same rows, unless the
    documents are a subset of the rows)."""
    import numpy as np

    return np.load(corpus["rows"], mmap_mode="r")[positions] if "rows" in corpus else positions


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


def reference_settings(name: str | None, token: str | None) -> dict:
    """Settings read from `name` (a local folder or tokenizer.json, or a Hub name), or Llama 2's built-in ones."""
    if not name:
        return llama2_settings()
    path = Path(name).expanduser()
    if path.exists():
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise InputError(f"reference tokenizer '{name}' has no tokenizer.json; give the folder of a fast "
                             f"tokenizer or leave out --reference_tokenizer")
    elif looks_local(name):
        raise InputError(f"reference tokenizer '{name}' does not exist; check the path or leave out "
                         f"--reference_tokenizer to use the built-in Llama 2 settings")
    elif not hub_reachable():
        print(f"note: reference tokenizer '{name}' is not a local path and the Hub cannot be reached; "
              f"using the built-in Llama 2 settings")
        return llama2_settings()
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(name, "tokenizer.json", token=token))
        except Exception as error:  # gated, missing, rate-limited...: the built-in settings serve the same purpose
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"note: could not read tokenizer.json of '{name}' from the Hub ({reason}); "
                  f"using the built-in Llama 2 settings")
            return llama2_settings()
    try:
        return pipeline_settings(json.loads(file.read_text(encoding="utf-8")), f"reference tokenizer {name}")
    except (ValueError, AttributeError):
        raise InputError(f"'{file}' is not a tokenizer.json; give the folder of a fast tokenizer") from None


def choose_documents(num_rows: int, num_samples: int, seed: int):
    """Sorted row positions to train on and to hold out for the report, drawn at random with `seed`.

    Positions are sorted because BPE counts do not depend on order and sorted reads go front to back.
    """
    import numpy as np

    held_out = min(HELD_OUT_DOCUMENTS, num_rows // 10)
    chosen = np.random.default_rng(seed).choice(num_rows, size=min(num_rows, held_out + num_samples), replace=False)
    return np.sort(chosen[held_out:]), np.sort(chosen[:held_out])


def training_batches(files: list[str], column: str, positions, totals: dict):
    """Lists of at most BATCH_DOCUMENTS texts at `positions`, counted into `totals`; memory stays one batch."""
    for texts in read_arrow_files(files, column, positions):
        texts = [text for text in texts if text]
        totals["documents"] += len(texts)
        totals["characters"] += sum(map(len, texts))
        yield texts


def assemble(settings: dict, vocab: dict, merges: list, add_bos: bool = False, add_eos: bool = False):
    """A tokenizers.Tokenizer: BPE over `vocab`/`merges` inside the pipeline of `settings` plus the word split."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=settings["byte_fallback"],
                              fuse_unk=settings["fuse_unk"]))
    spec = json.loads(tokenizer.to_str())
    reference_split = settings["pre_tokenizer"]
    spec.update(normalizer=settings["normalizer"], decoder=settings["decoder"],
                pre_tokenizer={"type": "Sequence", "pretokenizers": [reference_split, WORD_SPLIT]}
                if reference_split else WORD_SPLIT)
    spec["model"].update(vocab=vocab, merges=merges)
    spec["added_tokens"] = [{"id": vocab[token], "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for token in SPECIAL_TOKENS if token in vocab]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    if add_bos or add_eos:  # spelled as transformers spells it for add_bos_token/add_eos_token
        single = f"{BOS + ':0 ' if add_bos else ''}$A:0{' ' + EOS + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + BOS + ':1' if add_bos else ''} $B:1{' ' + EOS + ':1' if add_eos else ''}"
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t, on in ((BOS, add_bos), (EOS, add_eos))
                                                      if on])
    return tokenizer


def train(settings: dict, batches, vocab_size: int, show_progress: bool = False):
    """Train BPE on `batches`, then give the 256 byte tokens ids 4..259 as Llama 2 has them right after specials."""
    from tokenizers import trainers

    tokenizer = assemble(settings, vocab={}, merges=[])
    # Byte tokens are added afterwards rather than as trainer specials, which would make them "special": skipped
    # by decode(skip_special_tokens=True) and matched literally in text.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS), min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        limit_alphabet=min(MAX_ALPHABET, vocab_size - MIN_VOCAB_SIZE + 1), initial_alphabet=[SPACE],
        show_progress=show_progress)
    tokenizer.train_from_iterator(batches, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(token, len(vocab))
    add_bos, add_eos = special_token_flags(settings["post_processor"])
    return assemble(settings, vocab, model["merges"], add_bos, add_eos)


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


def check_round_trip(tokenizer, settings: dict) -> None:
    encoding = tokenizer.encode(ROUND_TRIP_PROBE, add_special_tokens=False)
    decoded = tokenizer.decode(encoding.ids, skip_special_tokens=False)
    if decoded != ROUND_TRIP_PROBE or UNK_ID in encoding.ids:
        raise InputError(f"the {settings['source']} do not give text back unchanged ({ROUND_TRIP_PROBE!r} came "
                         f"back as {decoded!r}); leave out --reference_tokenizer to use the built-in Llama 2 "
                         f"settings")


def measure(tokenizer, texts: list[str]) -> dict:
    """Compression and coverage on `texts`: what the next stages will see."""
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    num_tokens = sum(len(encoding.ids) for encoding in encodings)
    words = Counter(word for text in texts for word in text.split())
    word_encodings = tokenizer.encode_batch_fast(list(words), add_special_tokens=False)
    byte_ids = range(FIRST_BYTE_ID, FIRST_BYTE_ID + len(BYTE_TOKENS))
    byte_words = sum(count for count, encoding in zip(words.values(), word_encodings)
                     if any(token_id in byte_ids for token_id in encoding.ids))
    decoded = tokenizer.decode_batch([encoding.ids for encoding in encodings], skip_special_tokens=False)
    num_words, num_characters = sum(words.values()), sum(map(len, texts))
    return {
        "characters_measured": num_characters,
        "characters_per_token": round(num_characters / max(num_tokens, 1), 4),
        "tokens_per_word": round(num_tokens / max(num_words, 1), 4),
        "byte_fallback_word_share": round(byte_words / max(num_words, 1), 6),
        "unknown_token_rate": round(sum(e.ids.count(UNK_ID) for e in encodings) / max(num_tokens, 1), 6),
        "round_trip_exact_share": round(sum(a == b for a, b in zip(decoded, texts)) / max(len(texts), 1), 6),
    }


def save(tokenizer, folder: Path) -> None:
    """Write the folder AutoTokenizer loads, without importing transformers (tens of MB for two small files)."""
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    # "PreTrainedTokenizerFast" rather than "LlamaTokenizerFast": transformers 5 rebuilds a Llama tokenizer with
    # its own unsplit Metaspace pre-tokenizer, which drops one of two leading spaces and encodes more slowly; the
    # generic class keeps tokenizer.json's pipeline. BOS/EOS are decided by tokenizer.json's post-processor.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": BOS,
              "eos_token": EOS, "pad_token": "<pad>", "padding_side": "right", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def print_summary(report: dict, output_dir: str) -> None:
    print(f"trained on {report['documents_trained']:,} documents ({report['characters_trained']:,} characters) in "
          f"{report['seconds_training']:.1f} s; vocabulary {report['vocab_size']:,} of "
          f"{report['vocab_size_requested']:,} asked for")
    if report["vocab_size"] < report["vocab_size_requested"]:
        print(f"note: the corpus has too few repeated pairs to fill the vocabulary: it stops at "
              f"{report['vocab_size']:,} tokens; train on more text for a larger one")
    measured_on = "held-out documents" if report["measured_on_held_out"] else \
        "training documents (too few to hold any out)"
    print(f"measured on {report['documents_measured']:,} {measured_on}: {report['characters_per_token']:.2f} "
          f"characters/token, {report['tokens_per_word']:.2f} tokens/word, "
          f"{100 * report['byte_fallback_word_share']:.2f}% of words through byte fallback, "
          f"{100 * report['unknown_token_rate']:.2f}% unknown tokens")
    print(f"saved {output_dir} (report: {Path(output_dir) / 'tokenizer_report.json'}) in "
          f"{report['seconds_total']:.1f} s")
