"""Downstream benchmarks with lm-evaluation-harness, run on a model already in memory, with exactly one `<s>` before
every document and context, as the model saw at the start of every document in training.

    tasks = resolve_tasks(["portuguese"], include_path=None)            # names checked, presets expanded, data loaded
    results = run_benchmarks(model, tokenizer, tasks, limit=50, batch_size=8, max_length=2048)
    results.metrics   # {"benchmark/arc_pt/acc": 0.29, "benchmark/arc_pt/acc_norm": 0.31, ...}

`benchmark_on_main_process` is what Utilities/evaluate.py and pre-training.py call: every process calls it, the
main process runs the harness while the others wait, and all of them get the same results. Task names are the
harness's (its own tasks, and YAML task folders given as `include_path`), or one of PRESETS, the Portuguese suites
the original TeenyTinyLlama was evaluated on, each task with the original's few-shot count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import InputError, first_line

INSTALL = "pip install 'lm_eval>=0.4.10,<0.5'"
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
PORTUGUESE_FORK = "https://github.com/eduagarcia/lm-evaluation-harness-pt"
PREFIX = "benchmark/"

# The original's suites, task -> few-shot examples. The translated ARC, HellaSwag, MMLU and TruthfulQA (Okapi's
# translations, in the harness itself) with the Open LLM Leaderboard's shots, which the original compared with; the
# Portuguese exams and classification sets of the Open Portuguese LLM Leaderboard, which live in its fork of the
# harness (PORTUGUESE_FORK).
PRESETS = {
    "portuguese_translated": {"arc_pt": 25, "hellaswag_pt": 10, "m_mmlu_pt": 5, "truthfulqa_pt_mc2": 0},
    "portuguese_leaderboard": {"assin2_rte": 15, "assin2_sts": 15, "bluex": 3, "enem_challenge": 3,
                               "faquad_nli": 15, "hatebr_offensive": 25, "oab_exams": 3},
}
PRESETS["portuguese"] = {**PRESETS["portuguese_translated"], **PRESETS["portuguese_leaderboard"]}


@dataclass(frozen=True)
class Tasks:
    """Benchmark tasks, checked: harness names with their few-shot count (None: the task's own)."""
    shots: tuple[tuple[str, int | None], ...]
    include_path: tuple[str, ...] = ()
    defaults: bool = True  # whether the harness's own tasks are needed beside include_path's

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.shots]


@dataclass
class BenchmarkResults:
    """What one run of the harness measured: flat metrics, and per reported task how it was measured."""
    metrics: dict[str, float] = field(default_factory=dict)  # "benchmark/<task>/<metric>" -> value
    tasks: dict[str, dict] = field(default_factory=dict)     # task -> num_fewshot, examples, total, dataset, split
    harness_version: str | None = None

    def summary(self) -> str:
        return ", ".join(f"{display_name(key)} {value:.4f}" for key, value in self.metrics.items())


def metric_key(task: str, metric: str) -> str:
    return f"{PREFIX}{task}/{metric}"


def display_name(key: str) -> str:
    """`benchmark/task/metric` as `task/metric`, for tables and plots."""
    return key[len(PREFIX):]


def benchmark_keys(records: list[dict]) -> list[str]:
    """The benchmark metrics that `records` (metrics.jsonl lines, result rows) hold, in the order first seen."""
    return list(dict.fromkeys(key for record in records for key in record if key.startswith(PREFIX)))


# ----------------------------------------------------------------------------------------------------------------
# Which tasks: names checked against the harness, presets expanded, data loaded once

def split_names(names) -> list[str]:
    """Task names given as one string or a list, each entry comma or space separated; repeats dropped."""
    if isinstance(names, str):
        names = [names]
    return list(dict.fromkeys(part for entry in names or () for part in re.split(r"[,\s]+", entry) if part))


def require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(f"benchmarks need lm-evaluation-harness, which is not installed; install it: "
                         f"{INSTALL}") from None


def resolve_tasks(names, include_path=None, num_fewshot: int | None = None, *,
                  include_option: str = "--include-path") -> Tasks:
    """Check benchmark task names and that each task's data loads; raise InputError naming the first problem.

    `include_option` is how the user gives task folders, for the messages."""
    require_harness()
    folders = tuple(str(Path(p).expanduser().absolute()) for p in split_names(include_path))
    for folder in folders:
        if not Path(folder).is_dir():
            raise InputError(f"{include_option} '{folder}' is not a folder; give the folder of your task YAML files")
    requested = split_names(names)
    if not requested:
        raise InputError("no benchmark task named; give harness task names or a preset "
                         f"({', '.join(PRESETS)})")
    return _resolve(tuple(requested), folders, num_fewshot, include_option)


@functools.cache
def _resolve(requested: tuple[str, ...], folders: tuple[str, ...], num_fewshot: int | None,
             include_option: str) -> Tasks:
    # Cached: a training run checks its tasks at set-up and looks them up again at every evaluation.
    from pretrain.spec.loading import did_you_mean

    shots = {}
    for name in requested:
        for task, count in (PRESETS[name].items() if name in PRESETS else [(name, None)]):
            shots.setdefault(task, count if num_fewshot is None else num_fewshot)
    # Indexing the harness's own thousands of task files takes seconds: tasks that all come from the folders given
    # are looked up there alone.
    local = task_manager(folders, False) if folders else None
    defaults = local is None or not set(shots) <= set(local.all_tasks)
    manager = task_manager(folders, True) if defaults else local
    known = set(manager.all_tasks)
    for name in requested:
        if name in PRESETS and (missing := [task for task in PRESETS[name] if task not in known]):
            raise InputError(f"the preset '{name}' needs tasks that the installed lm-evaluation-harness lacks: "
                             f"{', '.join(missing)}; they are defined in the Portuguese fork {PORTUGUESE_FORK} "
                             f"(clone it and give its lm_eval/tasks folder with {include_option})")
        if name not in PRESETS and name not in known:
            raise InputError(f"unknown benchmark task '{name}'{did_you_mean(name, [*known, *PRESETS])}; "
                             f"list the harness's tasks with `lm_eval ls "
                             f"tasks`, name a preset ({', '.join(PRESETS)}), or give the folder of your own task "
                             f"YAML files with {include_option}")
    tasks = Tasks(tuple(shots.items()), folders, defaults)
    try:
        for task in shots:
            load_task(tasks, task)
    except InputError:
        if defaults:
            raise
        # A task of the folders may be built from the harness's own (a group of them): look again with those.
        tasks = Tasks(tasks.shots, folders, True)
        for task in shots:
            load_task(tasks, task)
    return tasks


@functools.cache
def task_manager(folders: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=defaults)


def load_task(tasks: Tasks, name: str):
    """Build one task as the harness does, which loads its dataset; InputError naming the task when it cannot."""
    from lm_eval.tasks import get_task_dict

    try:
        with warnings.catch_warnings(), quiet_harness():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in later 0.4 releases, not removed
            return get_task_dict([name], task_manager(tasks.include_path, tasks.defaults))
    except Exception as error:  # an unreachable Hub, a missing data file, a broken task file
        raise InputError(f"benchmark task '{name}' cannot load its data ({first_line(error)}); run once where "
                         f"the Hugging Face Hub can be reached so that the datasets library caches it, or give "
                         f"the task local data files") from None


@contextlib.contextmanager
def quiet_harness():
    """Keep the harness to errors: run on a model in memory, it warns about arguments it cannot apply to one
    (and logs every task it builds), which says nothing about our results."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# Running the harness

def benchmark_on_main_process(accelerator, model, tokenizer, tasks: Tasks, *, limit: int | None, batch_size: int,
                              max_length: int) -> BenchmarkResults:
    """Run the benchmarks on the main process and give every process its results.

    Every process must call it; `model` matters on the main process only (None elsewhere). The others wait in a
    broadcast of the results, so the harness's many small forward passes stay off any distributed model, and no
    process leaves before the others. A failure on the main process is raised on every process, so none waits
    forever.
    """
    outcome, failure = [None], None
    if accelerator.is_main_process:
        try:
            with accelerator.autocast():
                outcome[0] = run_benchmarks(model, tokenizer, tasks, limit=limit, batch_size=batch_size,
                                            max_length=max_length)
        except BaseException as error:
            failure, outcome[0] = error, f"{type(error).__name__}: {first_line(error)}"
    if accelerator.num_processes > 1:
        import torch.distributed

        torch.distributed.broadcast_object_list(outcome, src=0, group=waiting_group())
    if failure is not None:
        raise failure
    if isinstance(outcome[0], str):
        raise RuntimeError(f"the benchmarks failed on the main process ({outcome[0]})")
    return outcome[0]


@functools.cache
def waiting_group():
    """A gloo group of every process, with a day's timeout, for the others to wait in while the main process runs
    the harness: a pass over large suites can outlast the default group's timeout (10 minutes under NCCL).
    Created once, by every process at its first benchmarks."""
    import datetime

    import torch.distributed

    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))


def run_benchmarks(model, tokenizer, tasks: Tasks, *, limit: int | None, batch_size: int,
                   max_length: int) -> BenchmarkResults:
    """The harness's results for `tasks` on `model`, one simple_evaluate per few-shot count.

    The model's mode (train/eval) and the global random states (Python, NumPy, torch) are what they were before:
    the harness puts the model in eval mode and seeds all three, which would change what training draws next.
    """
    import torch
    from lm_eval import simple_evaluate

    if tokenizer.bos_token_id is None:
        raise InputError("the tokenizer has no <s> (bos_token); the benchmarks put it before every document as "
                         "training did: give a checkpoint whose tokenizer pre-training.py saved")
    manager = task_manager(tasks.include_path, tasks.defaults)
    results = BenchmarkResults()
    by_shots = {}
    for name, shots in tasks.shots:
        by_shots.setdefault(shots, []).append(name)
    was_training = model.training
    try:
        with preserved_random_state(model.device), torch.no_grad(), quiet_harness():
            lm = one_bos_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                    max_length=max_length, prefix_token_id=tokenizer.bos_token_id)
            for shots, names in by_shots.items():
                output = simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=limit,
                                         task_manager=manager, bootstrap_iters=0, log_samples=False)
                collect(output, results)
    finally:
        model.train(was_training)
    # In the order the tasks were asked for, whatever order the harness reports them in.
    order = {name: index for index, name in enumerate(tasks.names)}
    results.metrics = dict(sorted(results.metrics.items(),
                                  key=lambda item: order.get(display_name(item[0]).split("/")[0], len(order))))
    return results


def collect(output: dict, results: BenchmarkResults):
    """Add simple_evaluate's results to `results`: the tasks asked for (a group's aggregate rather than its
    members; the members of a group without one), each task's metrics under its first filter only."""
    scores, subtasks = output["results"], output.get("group_subtasks", {})
    results.harness_version = output.get("lm_eval_version")
    members = {child for children in subtasks.values() for child in children}

    def reported(name):
        numbers = {key: value for key, value in scores[name].items()
                   if "," in key and "_stderr," not in key and isinstance(value, (int, float))}
        if not numbers:  # a group without an aggregate: its members speak for it
            return [entry for child in subtasks.get(name, []) if child in scores for entry in reported(child)]
        return [(name, numbers)]

    for name in [name for name in scores if name not in members]:
        for task, numbers in reported(name):
            # Forks of the harness split a score by exam under filters of their own; the first is the task's.
            first = next(iter(numbers)).split(",", 1)[1]
            for key, value in numbers.items():
                metric, filter_name = key.split(",", 1)
                if filter_name == first:
                    results.metrics[metric_key(task, metric)] = float(value)
            config = output.get("configs", {}).get(task, {})
            samples = output.get("n-samples", {}).get(task, {})
            results.tasks[task] = {"num_fewshot": output.get("n-shot", {}).get(task),
                                   "examples": samples.get("effective"), "total": samples.get("original"),
                                   "dataset": config.get("dataset_path"), "dataset_config": config.get("dataset_name"),
                                   "split": config.get("test_split") or config.get("validation_split"),
                                   "filter": first}


@contextlib.contextmanager
def preserved_random_state(device):
    import random

    import numpy
    import torch

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)


@functools.cache
def one_bos_lm_class():
    """HFLM with exactly one `<s>` before every document and context, whatever the harness release or tokenizer.

    The harness decides by itself whether to add `<s>`, and gets it wrong one way or the other for a model that,
    like ours, saw `<s>` at the start of every training document: since 0.4.10 it encodes with the tokenizer's
    defaults (ours adds `<s>`), and rolling perplexity then puts its own prefix token in front, so every document
    starts with two; with add_bos_token=False, multiple-choice and generation contexts get none (which is what
    releases before 0.4.10 did by default). Here text is always encoded without special tokens and `<s>` is
    added once: by us before contexts, by the harness (prefix_token_id) before rolling-perplexity documents.

    Generation decodes as the task asks (greedy unless it says otherwise): generate() would otherwise fill in what
    the task leaves unset from the sampling settings a checkpoint keeps for its training samples
    (generation_config.json: sampling, top-k, top-p, repetition penalty, max_new_tokens).
    """
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import GenerationConfig

    class OneBosLM(HFLM):
        _rolling = False

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            bos = self.tokenizer.bos_token_id
            # add_special_tokens=False is a continuation encoded apart from its context, which holds the <s>.
            if add_special_tokens is not False and not self._rolling and ids[:1] != [bos]:
                ids = [bos, *ids]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            rows = [self.tok_encode(text, left_truncate_len=left_truncate_len) for text in strings]
            width = max(map(len, rows))
            pad = self.tokenizer.pad_token_id
            ids, mask = [], []
            for row in rows:
                padding = [pad] * (width - len(row))
                ids.append(padding + row if padding_side == "left" else row + padding)
                ones, zeros = [1] * len(row), [0] * len(padding)
                mask.append(zeros + ones if padding_side == "left" else ones + zeros)
            return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            sampling = self.model.generation_config
            self.model.generation_config = GenerationConfig(bos_token_id=sampling.bos_token_id,
                                                            eos_token_id=sampling.eos_token_id,
                                                            pad_token_id=sampling.pad_token_id)
            try:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                self.model.generation_config = sampling

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            self._rolling = True  # the harness puts prefix_token_id (<s>) before each document itself
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._rolling = False

    return OneBosLM


# ----------------------------------------------------------------------------------------------------------------
# During training

def training_tasks(spec) -> Tasks | None:
    """The spec's extra_args.eval_tasks, checked (cached after the first call); None when it names none."""
    e = spec.extra
    if not split_names(e.eval_tasks):
        return None
    return resolve_tasks(e.eval_tasks, e.eval_include_path, include_option="extra_args.eval_include_path")


def check_training_tasks(spec, accelerator) -> None:
    """Set-up's check of the spec's tasks, on the main process, the one that runs them."""
    if accelerator.is_main_process:
        training_tasks(spec)


def benchmarks_in_training(run, gathered_model_copy) -> BenchmarkResults | None:
    """The spec's benchmarks on the model being trained, the same results on every process; None without tasks.

    Every process must call it. Under FSDP no process holds the whole model: all of them gather it and the main
    process benchmarks a plain copy (`gathered_model_copy(run)`, on its device); otherwise the main process
    benchmarks its own replica, unwrapped, and puts it back in train mode."""
    from accelerate.utils import DistributedType

    spec, accelerator = run.spec, run.accelerator
    if not split_names(spec.extra.eval_tasks):
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        model = gathered_model_copy(run)
        model = model.to(accelerator.device) if model is not None else None
    else:
        model = accelerator.unwrap_model(run.model) if accelerator.is_main_process else None
    tasks = training_tasks(spec) if accelerator.is_main_process else None
    return benchmark_on_main_process(accelerator, model, run.tokenizer, tasks, limit=spec.extra.eval_task_limit,
                                     batch_size=spec.training.per_device_eval_batch_size,
                                     max_length=spec.data.block_size)


# ----------------------------------------------------------------------------------------------------------------
# Plots

def plot_with_benchmarks(path: Path, records: list[dict], draw_main):
    """Save a figure: `draw_main(axes)` fills the first panel; then one panel per benchmark metric in `records`
    (dicts with tokens_seen), against tokens seen. Without benchmarks, the first panel alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = benchmark_keys(records)
    panels = 1 + len(keys)
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    size = (8, 5) if panels == 1 else (5 * columns, 3.6 * rows)
    figure, grid = plt.subplots(rows, columns, figsize=size, squeeze=False)
    draw_main(grid.flat[0])
    for axes, key in zip(grid.flat[1:], keys):
        points = sorted((r["tokens_seen"], r[key]) for r in records
                        if r.get("tokens_seen") is not None and r.get(key) is not None and math.isfinite(r[key]))
        if points:
            axes.plot(*zip(*points), "o-")
        axes.set_title(display_name(key), fontsize=10)
        axes.set_xlabel("tokens seen")
        axes.grid(alpha=0.3)
    for axes in grid.flat[panels:]:
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
