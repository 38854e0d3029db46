"""Shared fixtures: the real scripts, run tiny, offline, on the committed Portuguese sample; a tiny Llama; a fake
Hugging Face Hub for the code that talks to it."""

import fnmatch
import inspect
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "pt-sample.jsonl"
TEST_VOCAB_SIZE = 1024
TEST_BLOCK_SIZE = 128
# The tiny Llama the training tests share: 2 layers, hidden 64, grouped-query attention, on the sample's blocks;
# energy tracking off, since CodeCarbon takes seconds to start (the tests about energy turn it back on).
TINY_MODEL = ["model_args.hidden_size=64", "model_args.intermediate_size=128", "model_args.num_hidden_layers=2",
              "model_args.num_attention_heads=4", "model_args.num_key_value_heads=2",
              f"model_args.max_position_embeddings={TEST_BLOCK_SIZE}", f"model_args.vocab_size={TEST_VOCAB_SIZE}",
              f"data_args.block_size={TEST_BLOCK_SIZE}", "extra_args.track_energy=false"]

# No test may reach the network: the Hub is "unreachable" and trackers stay offline.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(OFFLINE_ENV)
for secret in ("HF_TOKEN", "WANDB_API_KEY", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(secret, None)


def run_script(script, *args, env=None, cwd=None, timeout=600, check=False):
    """Run one of the project's scripts (path relative to the repo) with this Python; return CompletedProcess."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                            env=full_env, cwd=cwd or REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


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


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory):
    """A tokenizer trained by train-sentencepiece.py on the committed sample (vocabulary TEST_VOCAB_SIZE)."""
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    run_script("train-sentencepiece.py", "--dataset_name", SAMPLE, "--vocab_size", TEST_VOCAB_SIZE,
               "--num_samples", 100000, "--output_dir", out, check=True)
    return out


@pytest.fixture(scope="session")
def sample_tokenized(tmp_path_factory, sample_tokenizer):
    """The sample tokenized and packed by tokenize-dataset.py into blocks of TEST_BLOCK_SIZE, 10% of blocks as test."""
    out = tmp_path_factory.mktemp("tokenized") / "sample-tokenized"
    run_script("Utilities/tokenize-dataset.py", "--dataset-name", SAMPLE, "--tokenizer-name", sample_tokenizer,
               "--block-size", TEST_BLOCK_SIZE, "--test-size", 0.1, "--output-dir", out, check=True)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sample_tokenizer, sample_tokenized):
    """final-checkpoint/ of a 2-step pre-training.py run of the tiny Llama on the tokenized sample."""
    out = tmp_path_factory.mktemp("checkpoint") / "out"
    run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY_MODEL,
               f"model_args.tokenizer_name={sample_tokenizer}", f"data_args.folder_path={sample_tokenized}",
               f"training_args.output_dir={out}", "training_args.max_steps=2", "training_args.do_eval=false",
               check=True)
    return out / "final-checkpoint"


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


def tiny_llama(vocab_size=256, tie=False):
    """A Llama of 2 layers, hidden 32, grouped-query attention, seeded: the unit tests' model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# ----------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub, faked

@dataclass
class HubCall:
    name: str          # "whoami", "create_repo", "create_branch", "upload_folder", "snapshot_download", ...
    token: object      # the token the call carried (the HfApi's own unless the call passed one)
    arguments: dict    # the arguments as passed, by parameter name; upload_folder adds "files", the files sent


class FakeHub:
    """The Hub as the code under test sees it: HfApi calls and downloads, checked against huggingface_hub's own
    signatures and recorded; downloads are served from local folders; any call can be made to fail.

        fake_hub.repos["someone/tokenizer"] = folder       # what snapshot_download and hf_hub_download serve
        fake_hub.fail("upload_folder", ConnectionError("Hub is down"), revision="step-200")
        [call.name for call in fake_hub.calls]             # ["whoami", "create_repo", "upload_folder"]

    As in huggingface_hub, an upload with run_as_future=True returns a Future that holds its failure.
    """

    def __init__(self, cache: Path):
        import huggingface_hub

        self.cache = cache
        # Taken before the fake replaces them: every call is checked against the real signature.
        self.signatures = {name: inspect.signature(getattr(huggingface_hub.HfApi, name))
                           for name in ("__init__", "whoami", "create_repo", "create_branch", "upload_folder")}
        self.signatures.update({name: inspect.signature(getattr(huggingface_hub, name))
                                for name in ("snapshot_download", "hf_hub_download")})
        self.calls: list[HubCall] = []
        self.repos: dict[str, Path] = {}
        self.failures = []

    def fail(self, name: str, error: BaseException, **when):
        """Make the calls to `name` whose arguments include `when` raise `error`; `failures.clear()` undoes it."""
        self.failures.append((name, when, error))

    def calls_to(self, name: str) -> list[dict]:
        return [call.arguments for call in self.calls if call.name == name]

    def api(self, *args, **kwargs):
        """Stands in for the class huggingface_hub.HfApi."""
        options = self.bind("__init__", None, *args, **kwargs)
        return _FakeHfApi(self, options.get("token"))

    def snapshot_download(self, *args, **kwargs) -> str:
        arguments = self._record("snapshot_download", None, self.bind("snapshot_download", *args, **kwargs))
        source, target = self._repo(arguments["repo_id"]), self.cache / arguments["repo_id"]
        for name in _files(source, allow=arguments.get("allow_patterns")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    def hf_hub_download(self, *args, **kwargs) -> str:
        arguments = self._record("hf_hub_download", None, self.bind("hf_hub_download", *args, **kwargs))
        repo_id, filename = arguments["repo_id"], arguments["filename"]
        source, target = self._repo(repo_id) / filename, self.cache / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def bind(self, name: str, *args, **kwargs) -> dict:
        """The arguments by parameter name, or the TypeError the real function would raise; `self` left out."""
        arguments = dict(self.signatures[name].bind(*args, **kwargs).arguments)
        arguments.pop("self", None)
        return arguments

    def _record(self, name: str, token, arguments: dict) -> dict:
        self.calls.append(HubCall(name, arguments.get("token") or token, arguments))
        for failing, when, error in self.failures:
            if failing == name and all(arguments.get(key) == value for key, value in when.items()):
                raise error
        return arguments

    def _repo(self, repo_id: str) -> Path:
        if repo_id not in self.repos:
            raise OSError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/api/models/"
                          f"{repo_id}")
        return Path(self.repos[repo_id])


class _FakeHfApi:
    def __init__(self, hub: FakeHub, token):
        self.hub, self.token = hub, token

    def _call(self, name: str, args, kwargs) -> dict:
        arguments = self.hub.bind(name, self, *args, **kwargs)
        return self.hub._record(name, self.token, arguments)

    def whoami(self, *args, **kwargs):
        self._call("whoami", args, kwargs)
        return {"type": "user", "name": "someone"}

    def create_repo(self, *args, **kwargs):
        arguments = self._call("create_repo", args, kwargs)
        return f"https://huggingface.co/{arguments['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._call("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        arguments = self.hub.bind("upload_folder", self, *args, **kwargs)
        arguments["files"] = _files(Path(arguments["folder_path"]), ignore=arguments.get("ignore_patterns"))
        future = Future()
        try:
            self.hub._record("upload_folder", self.token, arguments)
            future.set_result(f"https://huggingface.co/{arguments['repo_id']}/commit/0")
        except Exception as error:
            if not arguments.get("run_as_future"):
                raise
            future.set_exception(error)
        return future if arguments.get("run_as_future") else future.result()


def _files(folder: Path, allow=None, ignore=None) -> list[str]:
    """The files under `folder` (relative, sorted) that huggingface_hub's allow/ignore patterns would select."""
    allow, ignore = ([p] if isinstance(p, str) else list(p or []) for p in (allow, ignore))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [name for name in names if (not allow or any(fnmatch.fnmatch(name, p) for p in allow))
            and not any(fnmatch.fnmatch(name, p) for p in ignore)]


def _always_reachable(timeout: float = 3.0) -> bool:
    return True


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Install a FakeHub in place of huggingface_hub.HfApi, snapshot_download and hf_hub_download, and make the
    Hub reachable: pretrain.hub.hub_reachable, and each pretrain module's own name for it, return True."""
    import huggingface_hub

    from pretrain import hub

    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    real = hub.hub_reachable
    for module in _pretrain_modules_holding(real):
        monkeypatch.setattr(module, "hub_reachable", _always_reachable)
    yield fake
    # A module first imported during the test took the fake by name: it gets the real check back.
    for module in _pretrain_modules_holding(_always_reachable):
        module.hub_reachable = real


def _pretrain_modules_holding(function):
    return [module for name, module in list(sys.modules.items())
            if name.split(".")[0] == "pretrain" and getattr(module, "hub_reachable", None) is function]


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
