"""The text corpora the tokenizer benchmarks run on, built offline from the committed sample, once per size.

    corpus = build_corpus("repeated", SAMPLE, size_mb=530, seed=0, work_dir=Path("runs/bench"))
    # runs/bench/repeated-v1-530mb/corpus.jsonl, JSON lines with a "text" field; reused by later runs

Two kinds, both deterministic:
  repeated   the sample's documents, whole and in order, over and over until the file reaches the size: real
             text, but no new words after the first copy;
  synthetic  the sample's sentences recombined into documents of one to four paragraphs, with a fifth of them
             renumbered and a fifth of the words swapped for made-up ones of Zipf-like frequencies, so that, as in
             real text, new words keep coming as the corpus grows (about 350,000 distinct words in 100 MB).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pretrain.atomic_write import atomic_dir
from pretrain.benchmarks.measure import REPO
from pretrain.errors import InputError

SAMPLE = REPO / "data" / "sample" / "pt-sample.jsonl"
KINDS = ("repeated", "synthetic")
CORPUS_VERSION = 1     # in the folder's name: a changed generator never reuses an old corpus
NUMBER = re.compile(r"\d+")
WORD = re.compile(r"[^\W\d_]+")
VOWELS = "aeiouáéíóúâêôãõàü"
SYLLABLE = re.compile(f"[^{VOWELS}]*[{VOWELS}]+")
NEW_WORD_SHARE = 0.2   # of the sample's words, replaced by made-up ones
ZIPF_TAIL = 0.2        # rank r drawn with P(rank >= r) = r^-0.2
MAX_RANK = 10 ** 9
SENTENCE_END = re.compile(r"(?<=[.!?:;])[ ]+|\n+")


def build_corpus(kind: str, sample: Path, size_mb: float, seed: int, work_dir: Path) -> Path:
    """The corpus file of this kind (one of KINDS), size (MB of JSON lines) and seed, built under `work_dir` unless
    it is there already."""
    name = f"{kind}-v{CORPUS_VERSION}-{size_mb:g}mb" + (f"-seed{seed}" if kind == "synthetic" else "")
    path = Path(work_dir) / name / "corpus.jsonl"
    if path.is_file():
        return path
    documents = repeated_documents(sample) if kind == "repeated" else synthetic_documents(*load_pieces(sample), seed)
    with atomic_dir(path.parent) as folder, open(folder / path.name, "w", encoding="utf-8") as handle:
        written, target = 0, int(size_mb * 1e6)
        while written < target:
            line = json.dumps({"text": next(documents)}, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
    return path


def read_sample(sample: Path) -> list[str]:
    if not Path(sample).is_file():
        raise InputError(f"sample corpus '{sample}' does not exist; pass --sample with a JSON lines file")
    with open(sample, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def read_texts(corpus: Path, megabytes: float | None = None) -> list[str]:
    """The documents of a corpus file, all of them or the first `megabytes` of text."""
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode("utf-8"))
            if megabytes is not None and size >= megabytes * 1e6:
                break
    return texts


def count_documents(corpus: Path) -> int:
    with open(corpus, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def repeated_documents(sample: Path):
    texts = read_sample(sample)
    while True:
        yield from texts


def load_pieces(sample: Path) -> tuple[list[str], list[str]]:
    """Sentences and syllables of the sample, in a fixed order."""
    sentences = [s for text in read_sample(sample) for s in SENTENCE_END.split(text) if s.strip()]
    words = {word for sentence in sentences for word in WORD.findall(sentence.lower())}
    syllables = sorted({syllable for word in words for syllable in SYLLABLE.findall(word)})
    random.Random(0).shuffle(syllables)  # so that the most frequent made-up words do not all start with "a"
    return sentences, syllables


def lexicon_word(rank: int, syllables: list[str]) -> str:
    """The word of this rank in an unbounded made-up lexicon: rank written in base len(syllables), 2+ syllables."""
    rank, parts = rank + len(syllables), []
    while rank:
        rank, digit = divmod(rank, len(syllables))
        parts.append(syllables[digit])
    return "".join(parts)


def synthetic_documents(sentences: list[str], syllables: list[str], seed: int):
    """Documents of recombined sentences, without end; the same sequence for the same seed.

    Real text keeps meeting new words (names, rare words, typos) as it grows, which is what fills a BPE trainer's
    table; the sample alone has a few thousand. So a share of the words is replaced by words drawn from an
    unbounded made-up lexicon with Zipf-like frequencies (rank r with probability ~ r^-1.2), and some numbers
    are redrawn.
    """
    rng = random.Random(seed)

    def renumber(match):
        return str(rng.randrange(10 ** len(match.group())))

    def rare_word(word: str) -> str:
        rank = int((rng.random() or 1.0) ** (-1 / ZIPF_TAIL)) if rng.random() < NEW_WORD_SHARE else 0
        if not rank or rank > MAX_RANK:
            return word
        made_up = lexicon_word(rank, syllables)
        return made_up.capitalize() if word[:1].isupper() else made_up

    while True:
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            parts = []
            for _ in range(rng.randint(1, 6)):
                sentence = rng.choice(sentences)
                if rng.random() < 0.2:
                    sentence = NUMBER.sub(renumber, sentence)
                parts.append(WORD.sub(lambda match: rare_word(match.group()), sentence))
            paragraphs.append(" ".join(parts))
        yield "\n\n".join(paragraphs)
