"""Mixtures of tokenized folders: which source each sample of the train stream comes from, and the sources opened
and checked together.

    sources = open_sources({"data/web": 3, "data/books": 1}, block_size=2048, vocab_size=32000)
    schedule = MixtureSchedule([s.weight for s in sources])
    counts = [0, 0]
    schedule.assign(counts, 0, 8)        # -> array of 8 source indices; counts now [6, 2]

Weights are by tokens; every block holds `block_size` tokens, so they are shares of blocks. The schedule is
Tijdeman's solution of the chairman assignment problem: after any number n of samples, each source s has given
c_s(n) samples with |c_s(n) - w_s * n| <= 1 - 1/(2k - 2) for k sources, so the share of each source is within one
block of its weight at every sample, not only on average. It is deterministic and depends only on the counts so
far, so a run resumed from its saved counts continues exactly, and every process computes the same global stream.
Inside a source, samples follow that folder's own seeded, windowed shuffle (pretrain/data/tokenized_folder.py); a source
that runs out starts another pass in a new order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.manifest import read_manifest
from pretrain.errors import InputError


class MixtureSchedule:
    def __init__(self, weights):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or not len(weights) or not (weights > 0).all() or not np.isfinite(weights).all():
            raise ValueError(f"mixture weights must be positive and finite, got {weights.tolist()}")
        self.weights = (weights / weights.sum()).tolist()
        self.slack = 1.0 / (2 * len(weights) - 2) if len(weights) > 1 else 0.0

    def assign(self, counts: list[int], start: int, count: int) -> np.ndarray:
        """Sources of samples start, ..., start + count - 1, given `counts` (samples per source before `start`,
        summing to it), which are updated in place."""
        if sum(counts) != start:
            raise ValueError(f"the source counts {counts} do not add up to the stream position {start}")
        out = np.empty(count, dtype=np.int64)
        weights, slack = self.weights, self.slack
        for i in range(count):
            n = start + i + 1
            # Among the sources at least `slack` behind their share, the one whose deadline (when it would fall a
            # whole sample behind, less the slack) comes first.
            best, best_deadline = 0, float("inf")
            for s, w in enumerate(weights):
                if w * n - counts[s] >= slack - 1e-12:
                    deadline = (counts[s] + 1 - slack) / w
                    if deadline < best_deadline:
                        best, best_deadline = s, deadline
            counts[best] += 1
            out[i] = best
        return out


@dataclass(frozen=True)
class Source:
    name: str
    path: Path
    weight: float                    # share of the train blocks, normalized over the mixture
    train: object                    # TokenizedSplit or None
    test: object


def source_names(paths: list[str]) -> list[str]:
    """Each folder's name, or its path as given where two folders share a name."""
    names = [Path(p).expanduser().name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def open_sources(mixture: dict[str, float], *, block_size: int, vocab_size: int, tokenizer_sha256: str | None = None,
                 sanity_check: bool = False, need_train: bool = True, need_test: bool = True) -> list[Source]:
    """Open and check every folder of a mixture (each against its manifest, and all against each other)."""
    from pretrain.data.tokenized_folder import open_tokenized_folder

    check_agreement(list(mixture))
    total = sum(mixture.values())
    sources = []
    for name, (path, weight) in zip(source_names(list(mixture)), mixture.items()):
        train, test = open_tokenized_folder(path, block_size=block_size, vocab_size=vocab_size,
                                            tokenizer_sha256=tokenizer_sha256, sanity_check=sanity_check,
                                            need_train=need_train, need_test=need_test)
        sources.append(Source(name, Path(path), weight / total, train, test))
    return sources


def check_agreement(paths: list[str]):
    """Refuse folders whose manifests disagree on the tokenizer, vocabulary, block size or special tokens, naming
    the first folder that differs from the first one. Folders without a manifest are checked by their contents only."""
    described = [(path, manifest) for path in paths
                 if Path(path).expanduser().is_dir() and (manifest := read_manifest(Path(path).expanduser()))]
    if len(described) < 2:
        return
    (first_path, first), others = described[0], described[1:]
    for path, manifest in others:
        for what, key in (("tokenizer (tokenizer.json sha256)", lambda m: m["tokenizer"]["tokenizer_json_sha256"]),
                          ("vocabulary size", lambda m: m["tokenizer"]["vocab_size"]),
                          ("block size", lambda m: m["block_size"]),
                          ("special tokens", lambda m: m.get("special_tokens"))):
            if key(manifest) != key(first):
                shown = [str(key(m))[:12] for m in (first, manifest)]
                raise InputError(f"mixture folder '{path}' has another {what} than '{first_path}' ({shown[1]} against "
                                 f"{shown[0]}, from their manifest.json): every folder of data_args.mixture must be "
                                 f"tokenized with the same tokenizer and block size; re-run "
                                 f"Utilities/tokenize-dataset.py on it with the others' tokenizer")
