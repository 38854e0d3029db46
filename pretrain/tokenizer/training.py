"""Training a Llama 2-style BPE tokenizer: the pipeline settings, the trainer, the checks and the saved folder.

    settings = reference_settings(None, token=None)         # Llama 2's built-in pipeline
    tokenizer = train(settings, batches_of_texts, vocab_size=32000)
    check_round_trip(tokenizer, settings); save(tokenizer, folder)

Ids: <unk>=0 <s>=1 </s>=2 <pad>=3, then the 256 byte tokens <0x00>..<0xFF>, then the learned pieces.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import chain, islice
from pathlib import Path

from pretrain.errors import InputError, first_line
from pretrain.hub import hub_reachable, looks_local
from pretrain.tokenizer.conventions import (
    BOS,
    BYTE_TOKENS,
    EOS,
    FIRST_BYTE_ID,
    MIN_VOCAB_SIZE,
    SPACE,
    SPECIAL_TOKENS,
    UNK_ID,
    WORD_SPLIT,
    llama2_settings,
    pipeline_settings,
    special_token_flags,
)

MAX_ALPHABET = 1000
HELD_OUT_DOCUMENTS = 1000
BATCH_DOCUMENTS = 1000     # texts handed to the trainer at a time
# What must come back unchanged from decode(encode(text)); a reference whose settings fail this is refused.
ROUND_TRIP_PROBE = ("  Ação, coração e pão: São Paulo à noite!\n\tdef f(x):\n        return x  # 42\n"
                    "R$ 12,50 — 3,5%   espaços 😀 汉字 ẞ Ω\n")






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
            print(f"note: could not read tokenizer.json of '{name}' from the Hub ({first_line(error)}); "
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


def sample_documents(corpus, num_samples: int, seed: int):
    """The documents of `corpus` to train on and to measure on: a PositionSample, or a StreamSample for a stream."""
    return PositionSample(corpus, num_samples, seed) if corpus.random_access else StreamSample(corpus, num_samples)


class PositionSample:
    """The positions choose_documents draws with the seed; the training documents are read in file order."""

    def __init__(self, corpus, num_samples: int, seed: int):
        self.corpus = corpus
        self.train_positions, self.held_out_positions = choose_documents(corpus.num_documents, num_samples, seed)
        if len(self.train_positions) < num_samples:
            note_fewer_documents(corpus.name, corpus.num_documents, num_samples, len(self.train_positions),
                                 len(self.held_out_positions))

    def training_texts(self):
        import numpy as np

        count = len(self.train_positions)
        edges = np.append(np.arange(0, count, BATCH_DOCUMENTS), count)
        return self.corpus.read_batches(self.train_positions, edges)

    def measured_texts(self) -> tuple[list[str], bool]:
        """The held-out documents, or the first training ones when there are too few to hold any out."""
        held_out = bool(len(self.held_out_positions))
        positions = self.held_out_positions if held_out else self.train_positions[:HELD_OUT_DOCUMENTS]
        return [text or "" for text in self.corpus.texts(positions)], held_out


class StreamSample:
    """A stream, already shuffled with the seed: its first documents are held out, as many as choose_documents
    holds out of a corpus of its size (known once 10 x HELD_OUT_DOCUMENTS are buffered, or the stream ends before),
    and the next num_samples are trained on."""

    def __init__(self, corpus, num_samples: int):
        self.corpus, self.num_samples = corpus, num_samples
        self.held_out, self.first_trained = [], []

    def training_texts(self):
        documents = self.corpus.documents()
        head = list(islice(documents, 10 * HELD_OUT_DOCUMENTS))
        held_out = min(HELD_OUT_DOCUMENTS, len(head) // 10)
        self.held_out, self.first_trained = head[:held_out], head[held_out:held_out + HELD_OUT_DOCUMENTS]
        training, trained = islice(chain(head[held_out:], documents), self.num_samples), 0
        while batch := list(islice(training, BATCH_DOCUMENTS)):
            trained += len(batch)
            yield batch
        if trained < self.num_samples:
            note_fewer_documents(self.corpus.name, held_out + trained, self.num_samples, trained, held_out)

    def measured_texts(self) -> tuple[list[str], bool]:
        return [text or "" for text in self.held_out or self.first_trained], bool(self.held_out)


def note_fewer_documents(name: str, documents: int, num_samples: int, trained: int, held_out: int) -> None:
    held_out_note = f" and holding {held_out} out for the report" if held_out else ""
    print(f"note: '{name}' has {documents} documents, fewer than --num_samples {num_samples}; training on "
          f"{trained} of them{held_out_note}")


def training_batches(batches, totals: dict):
    """The non-empty texts of each batch, counted into `totals`; memory stays one batch."""
    for texts in batches:
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
    """Write the folder AutoTokenizer, sentencepiece and llama.cpp load, without importing transformers (tens of MB
    for a few small files)."""
    from pretrain.tokenizer.files import write_tokenizer_files

    special_tokens = dict(zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS))
    skipped = write_tokenizer_files(folder, tokenizer.to_str(), special_tokens)
    if skipped:
        print(f"note: no tokenizer.model written: sentencepiece cannot encode as this tokenizer does ({skipped}); "
              f"transformers needs only tokenizer.json")


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
