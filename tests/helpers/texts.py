"""Texts the tests feed the tokenizer and the corpus reader: round-trip cases, edge cases, the committed sample
in every format the reader takes."""

import json

from tests.helpers.runs import SAMPLE

# Texts whose decode(encode(text)) must give them back exactly: accents, spaces, tabs, code, numbers, emoji, unseen.
ROUND_TRIPS = [
    "Ação, coração, informação: a educação é a base da nação.",
    "Você já comeu pão de queijo em São João del-Rei? Não? Então vá à padaria!",
    "Maçã, açúcar, caçula, pêssego, avó, avô, órgão, põe, mãe, irmã.",
    "  dois espaços no início",
    " um espaço no início e no fim ",
    "\nlinha nova no início\n\ne duas no meio\n",
    "espaços   repetidos     aqui\t\ttabs\te mais\t",
    "def soma(a, b):\n    return a + b  # 42\n\n\tprint(soma(1, 2))",
    "R$ 12,50; 3,14159; 2024-01-31 às 14h30; +55 (11) 98765-4321; 100%",
    "emoji 🦙😀👍🏽 e sinais → ≠ ∑ ½",
    "nunca visto: 汉字 Ελληνικά ẞ ᚠᛇᚻ \u0000\u007f",
    "",
    " ",
    "a",
]


def read_sample_texts():
    with open(SAMPLE, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


# Texts whose ids every form of the tokenizer must agree on, beside the sample's own: spaces, tabs, line breaks,
# digits, emoji, characters never seen in training. None spells a special token ("<s>"), which transformers
# reads as that token and sentencepiece and llama.cpp read as text.
EDGE_TEXTS = ["", " ", "  ", "   três espaços antes", " leading", "trailing ", "a  b   c    d", "\t",
              "\ttab\tdentro\t", "tab\t\t\tvárias", "\n", "\n\n\n", "linha\r\nnova\r\n", " \n ", "a \n b",
              "  \n\n  x", "2024", "R$ 1.234.567,89", "3,14159 e 0,5%", "x1y22z333", "😀", "emoji 😉😀🎉 no meio",
              "汉字 ẞ Ω ﷽", "e\u0301 ǅ", "\u00a0não-separável\u00a0", "\u3000ideográfico", "zero\u200blargura",
              "<0x41> parece um byte", "a" * 300, "ab" * 100, " " * 40 + "x", "\x00\x01 controle",
              "\u2581 espaço visível"]


def tokenizer_test_texts():
    """Over 1,000 texts: the sample's documents, their paragraphs and sentences, variations of every fourth
    sentence (upper case, leading and doubled spaces, tabs, line breaks and numbers), and EDGE_TEXTS."""
    import re

    documents = read_sample_texts()
    paragraphs = [p for document in documents for p in document.split("\n") if p.strip()]
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if s.strip()]
    varied = []
    for i, sentence in enumerate(sentences[::4]):
        varied += [sentence.upper(), "  " + sentence, sentence.replace(" ", "  "), sentence.replace(" ", "\t", 2),
                   f"{sentence}\n\n{i * 37}"]
    return documents + paragraphs + sentences + varied + EDGE_TEXTS


def write_sample_as(folder, kind):
    """The committed sample as a .jsonl, .txt (one document per line), .parquet, .csv or save_to_disk folder."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def written(folder, name, text):
        (folder / name).write_bytes(text.encode("utf-8"))
        return folder / name

    texts = read_sample_texts()
    folder.mkdir(exist_ok=True)
    if kind == "jsonl":
        return written(folder, "sample.jsonl", SAMPLE.read_text(encoding="utf-8"))
    if kind == "txt":
        return written(folder, "sample.txt", "\n\n".join(" ".join(t.split()) for t in texts) + "\n")
    if kind == "parquet":
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), folder / "sample.parquet",
                       row_group_size=50)
        return folder / "sample.parquet"
    if kind == "csv":
        with open(folder / "sample.csv", "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["id", "text"], *enumerate(texts)])
        return folder / "sample.csv"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}),
                          "test": datasets.Dataset.from_dict({"id": [0], "text": ["x"]})}).save_to_disk(
        str(folder / "saved"))
    return folder / "saved"
