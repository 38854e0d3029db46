"""Tokenizer training: train-sentencepiece.py against the original's approach, on the same synthetic corpus.

    python Utilities/benchmark.py tokenizer                    # 100 MB corpus, vocabulary 32000
    python Utilities/benchmark.py tokenizer --size-mb 300 --repeats 2

The corpus is built offline and deterministically from data/sample/pt-sample.jsonl: its sentences recombined, with
redrawn numbers and a share of the words swapped for made-up ones of Zipf-like frequencies (so that, as in real
text, new words keep coming as the corpus grows), into documents of one to four paragraphs, saved with
`save_to_disk` under --work-dir and reused by later runs of the same size and seed. The original approach loads it,
shuffles, and hands the whole text column as one Python list to `SentencePieceBPETokenizer.train_from_iterator`;
ours runs train-sentencepiece.py. Each variant runs in its own process, timed from start to exit; its peak memory
counts its child processes too: the larger of the kernel's max RSS and the RSS summed over the process tree
(sampled every 20 ms on Linux), plus the peak of the heap alone (RssAnon, without mapped files), summed likewise.
Also measured, in this process: how fast each saved tokenizer encodes
(encode_batch_fast, MB/s over the first --encode-mb of the corpus, as they are and joined into documents of about
256 KB) and its characters per token.
"""

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import InputError, atomic_dir  # noqa: E402

NUMBER = re.compile(r"\d+")
WORD = re.compile(r"[^\W\d_]+")
VOWELS = "aeiouáéíóúâêôãõàü"
SYLLABLE = re.compile(f"[^{VOWELS}]*[{VOWELS}]+")
NEW_WORD_SHARE = 0.2   # of the sample's words, replaced by made-up ones
ZIPF_TAIL = 0.2        # rank r drawn with P(rank >= r) = r^-0.2
MAX_RANK = 10 ** 9
CORPUS_VERSION = 2     # in the corpus folder's name: a changed generator never reuses an old corpus
SENTENCE_END = re.compile(r"(?<=[.!?:;])[ ]+|\n+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the synthetic corpus, in MB of UTF-8")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary both variants train")
    parser.add_argument("--sample", default=str(REPO / "data" / "sample" / "pt-sample.jsonl"),
                        help="JSON lines corpus (field 'text') the synthetic corpus is recombined from")
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-tokenizer"),
                        help="where the corpus is kept and the tokenizers are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternated; best time kept")
    parser.add_argument("--encode-mb", type=float, default=10.0, help="MB of the corpus to time encoding on")


def run(args) -> None:
    if args.size_mb <= 0 or args.repeats < 1:
        raise InputError("--size-mb must be positive and --repeats at least 1")
    work_dir = Path(args.work_dir)
    corpus = build_corpus(Path(args.sample), args.size_mb, args.seed, work_dir)
    commands = {
        "original": [sys.executable, __file__, "original", str(corpus), str(args.vocab_size),
                     str(work_dir / "original")],
        "ours": [sys.executable, str(REPO / "train-sentencepiece.py"), "--dataset_name", str(corpus),
                 "--vocab_size", str(args.vocab_size), "--num_samples", str(2**62), "--output_dir",
                 str(work_dir / "ours"), "--overwrite"],
    }
    runs = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            runs[name].append(run_measured(command, work_dir / f"{name}.log"))
    texts, files = corpus_head(corpus, args.encode_mb), {name: work_dir / name / "tokenizer.json" for name in commands}
    # Long documents too: that is where BPE over whole unsplit documents slows down.
    speeds, long_speeds = encoding_speeds(files, texts), encoding_speeds(files, join_documents(texts, 256_000))
    corpus_mb = sum(path.stat().st_size for path in corpus.glob("data-*.arrow")) / 1e6
    results = {}
    for name in commands:
        results[name] = {
            "benchmark": "tokenizer", "variant": name, "corpus_mb": round(corpus_mb, 1),
            "documents": documents_trained(name, corpus, work_dir), "vocab_size": args.vocab_size,
            "seconds": round(min(r["seconds"] for r in runs[name]), 2),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs[name]), 1),
            "peak_anon_mib": max((round(r["peak_anon_mib"], 1) for r in runs[name] if r["peak_anon_mib"]),
                                 default=None),
            **speeds[name],
            "encode_256kb_documents_mb_per_second": long_speeds[name]["encode_mb_per_second"],
        }
        print(json.dumps(results[name]), flush=True)
    original, ours = results["original"], results["ours"]
    print(f"ours against the original: {ours['seconds'] / original['seconds']:.2f}x the time, "
          f"{original['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x less peak memory, "
          f"{ours['encode_mb_per_second'] / original['encode_mb_per_second']:.2f}x the encoding speed")


def load_pieces(sample: Path) -> tuple[list[str], list[str]]:
    """Sentences and syllables of the sample, in a fixed order."""
    if not sample.is_file():
        raise InputError(f"sample corpus '{sample}' does not exist; pass --sample with a JSON lines file")
    with open(sample, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    sentences = [s for text in texts for s in SENTENCE_END.split(text) if s.strip()]
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


def synthetic_documents(sentences: list[str], syllables: list[str], size_bytes: int, seed: int):
    """Documents of recombined sentences until `size_bytes` of UTF-8 are out; the same for the same seed.

    Real text keeps meeting new words (names, rare words, typos) as it grows, which is what fills a BPE trainer's
    table; the sample alone has a few thousand. So a share of the words is replaced by words drawn from an
    unbounded made-up lexicon with Zipf-like frequencies (rank r with probability ~ r^-1.2), which gives about
    350,000 distinct words in 100 MB and more with every MB, and some numbers are redrawn.
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

    written = 0
    while written < size_bytes:
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            parts = []
            for _ in range(rng.randint(1, 6)):
                sentence = rng.choice(sentences)
                if rng.random() < 0.2:
                    sentence = NUMBER.sub(renumber, sentence)
                parts.append(WORD.sub(lambda match: rare_word(match.group()), sentence))
            paragraphs.append(" ".join(parts))
        document = "\n\n".join(paragraphs)
        written += len(document.encode("utf-8"))
        yield document


def build_corpus(sample: Path, size_mb: float, seed: int, work_dir: Path) -> Path:
    """The synthetic corpus as a save_to_disk folder, built once per size and seed."""
    folder = work_dir / f"corpus-v{CORPUS_VERSION}-{size_mb:g}mb-seed{seed}"
    if (folder / "dataset_info.json").exists():
        return folder
    import datasets

    datasets.disable_progress_bars()
    sentences, syllables = load_pieces(sample)
    generator_cache = work_dir / ".generator-cache"

    def rows():
        for document in synthetic_documents(sentences, syllables, int(size_mb * 1e6), seed):
            yield {"text": document}

    with atomic_dir(folder) as temporary:
        dataset = datasets.Dataset.from_generator(rows, features=datasets.Features({"text": datasets.Value("string")}),
                                                  cache_dir=str(generator_cache))
        dataset.save_to_disk(str(temporary))
        del dataset
        shutil.rmtree(generator_cache, ignore_errors=True)
    return folder


def run_measured(command: list[str], log_path: Path) -> dict:
    """Run `command` to completion: its wall seconds, and the peak resident memory of it and its child processes.

    peak_rss_mib is the larger of the kernel's max RSS (of the process, or of a child it waited for, whichever was
    largest) and the RSS summed over the process tree, sampled every 20 ms where /proc exists, so that memory held
    by a parent and a child at the same time is counted together. peak_anon_mib is that sampled sum for the heap
    alone (RssAnon: RSS less mapped files).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        peaks = {"rss_kib": 0, "anon_kib": None}
        sampler = threading.Thread(target=sample_tree_memory, args=(process.pid, peaks), daemon=True)
        sampler.start()
        # wait4 gives this one child's rusage; RUSAGE_CHILDREN would mix the variants' peaks together.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return {"seconds": seconds, "peak_rss_mib": max(usage.ru_maxrss * rss_unit, peaks["rss_kib"] * 1024) / 2**20,
            "peak_anon_mib": None if peaks["anon_kib"] is None else peaks["anon_kib"] / 1024}


def sample_tree_memory(pid: int, peaks: dict) -> None:
    """Keep in `peaks` the largest VmRSS and RssAnon (KiB) summed over `pid` and its descendants, until it ends."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while True:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss = anon = read = 0
        for member in tree:
            try:
                fields = dict(line.split(":", 1) for line in
                              Path(f"/proc/{member.pid}/status").read_text().splitlines() if ":" in line)
            except (OSError, ValueError):
                continue
            if member.pid == pid and "RssAnon" not in fields:  # a zombie waiting to be reaped: its memory is gone
                return
            rss += int(fields.get("VmRSS", "0 kB").split()[0])
            anon += int(fields.get("RssAnon", "0 kB").split()[0])
            read += 1
        if read:  # without /proc (macOS) only the kernel's max RSS is known
            peaks["rss_kib"] = max(peaks["rss_kib"], rss)
            peaks["anon_kib"] = max(peaks["anon_kib"] or 0, anon)
        time.sleep(0.02)


def corpus_head(corpus: Path, megabytes: float) -> list[str]:
    import datasets

    texts, size = [], 0
    for batch in datasets.load_from_disk(str(corpus)).iter(batch_size=1000):
        for text in batch["text"]:
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= megabytes * 1e6:
                return texts
    return texts


def join_documents(texts: list[str], chars_per_document: int) -> list[str]:
    """The texts joined, in order, into documents of at least `chars_per_document` (the last may be shorter)."""
    documents, group, size = [], [], 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= chars_per_document:
            documents.append("\n\n".join(group))
            group, size = [], 0
    return documents + (["\n\n".join(group)] if group else [])


def encoding_speeds(tokenizer_files: dict, texts: list[str], rounds: int = 3) -> dict:
    """MB/s of encode_batch_fast (best round) and characters per token, for each tokenizer on the same texts.

    Rounds alternate between the tokenizers so that load from other jobs falls on both alike.
    """
    from tokenizers import Tokenizer

    tokenizers = {name: Tokenizer.from_file(str(path)) for name, path in tokenizer_files.items()}
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    best_seconds, num_tokens = dict.fromkeys(tokenizers, float("inf")), {}
    for _ in range(rounds):
        for name, tokenizer in tokenizers.items():
            started = time.perf_counter()
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            best_seconds[name] = min(best_seconds[name], time.perf_counter() - started)
            num_tokens[name] = sum(len(encoding.ids) for encoding in encodings)
    return {name: {"encode_mb_per_second": round(megabytes / best_seconds[name], 2),
                   "characters_per_token": round(sum(map(len, texts)) / max(num_tokens[name], 1), 3)}
            for name in tokenizers}


def documents_trained(name: str, corpus: Path, work_dir: Path) -> int:
    if name == "ours":  # a few documents are held out for its report
        return json.loads((work_dir / "ours" / "tokenizer_report.json").read_text())["documents_trained"]
    import datasets

    return datasets.load_from_disk(str(corpus)).num_rows


def train_like_original(corpus: str, vocab_size: int, output_dir: str) -> None:
    """The original script's steps, on a local corpus: list of every text, SentencePieceBPETokenizer, Llama 2's
    pipeline copied into the result, saved through transformers."""
    import datasets
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    dataset = datasets.load_from_disk(corpus)
    dataset = dataset.shuffle(seed=42).select(range(dataset.num_rows))
    texts = list(dataset["text"])  # the list datasets < 4 returned for dataset['text'] (4+ returns a lazy Column)
    tokenizer = SentencePieceBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    settings = load_train_sentencepiece().llama2_settings()
    spec = json.loads(tokenizer._tokenizer.to_str())
    spec.update({key: settings[key] for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder")})
    spec["model"].update(byte_fallback=settings["byte_fallback"], fuse_unk=settings["fuse_unk"])
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tokenizer_file = Path(output_dir) / "tokenizer.json"
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", padding_side="right").save_pretrained(output_dir)


def load_train_sentencepiece():
    spec = importlib.util.spec_from_file_location("train_sentencepiece", REPO / "train-sentencepiece.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__" and sys.argv[1:2] == ["original"]:
    train_like_original(sys.argv[2], int(sys.argv[3]), sys.argv[4])
