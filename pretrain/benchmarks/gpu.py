"""The GPU measurement: every figure the throughput targets need, from one command that keeps to a time budget.

    python Utilities/benchmark.py gpu --out gpu-results.jsonl          # one CUDA GPU: 7.5 minutes at most
    python Utilities/benchmark.py gpu --smoke --out smoke.jsonl        # every part, tiny, on the CPU
    python Utilities/benchmark.py gpu --sdpa-backends flash,cudnn --compile-modes max-autotune-no-cudagraphs \\
        --losses full --out levers.jsonl                              # train-160m, then one part per lever
    python Utilities/benchmark.py gpu --micro-batches 8,16,32 --parts pretrain-160m-mb32 --out mb32.jsonl

Each part runs as a child process through the measured-child runner (pretrain/benchmarks/measure.py) under its
own time limit, cut to what is left of --budget-seconds; a part left less than MIN_PART_SECONDS (or its own
limit, when smaller) is skipped, and a part past its limit is killed with every process it started. Its results
are printed as JSON lines when it ends and appended to --out, so a run cut short still holds what it finished.
Each part ends with a "part" line (status ok, failed, timed_out or skipped), the run with a "summary" line (the
targets, and the two MFU conventions). The parts, in order (the ones the targets need first):

  folder             a tokenizer of the spec's vocabulary and a tokenized folder of random blocks, as
                     tokenize-dataset.py writes them (parquet + manifest.json)
  train-160m         the train benchmark (training_step.py) on --spec-160m: the original-style loop and ours from
                     the same initialization on the same tokens for --train-steps optimizer steps (of as many
                     tokens as pre-training.py's below): tokens/s, MFU, peak memory, the largest loss difference
  pretrain-160m-mbN  pre-training.py itself on the folder for --pretrain-steps steps at micro-batch N, the same
                     tokens per optimizer step at every N of --micro-batches, evaluation, samples, checkpoints,
                     tracking and energy metering off: its own metrics.jsonl tokens_per_second and mfu, without
                     the first logged window (compiling)
  train-460m         the original-style loop on --spec-460m, which its pre-training.py figure is compared with
  pretrain-460m-mbN  pre-training.py on --spec-460m for --pretrain-steps-460m steps at the first micro-batch
  micro-batch-160m   the largest micro-batch of ours on --spec-160m, doubling from the first of --micro-batches
                     until CUDA runs out of memory; eager, since compiling again at every size would not fit
  lever-KIND-VALUE   one part per value of --compile-modes, --sdpa-backends, --losses and --documents: ours on
                     --spec-160m with that one setting changed (--documents N: tokens cut into documents of about
                     N tokens, each attending only to itself); given levers, the run is train-160m and the levers
                     unless --parts says otherwise

--smoke runs every part with specs-tiny.yaml on the CPU, for a few steps. Nothing on this path imports `datasets`
or `wandb`, which the GPU machine may lack.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.benchmarks.measure import MIB, REPO, python_module, run_measured
from pretrain.benchmarks.training_step import document_length
from pretrain.errors import InputError

DEFAULT_BUDGET_SECONDS = 450  # 8 minutes, less the parent's own start and what a part may overrun when killed
MIN_PART_SECONDS = 20
TARGETS = {"160m": 400_000, "460m": 130_000}  # tokens/s of pre-training.py on one H200
TARGET_OVER_ORIGINAL = 2.3
LOSSES = ("chunked", "full")
DEFAULT_CHUNK_TOKENS = 4096

# What each mode runs: the GPU measurement, and the tiny one that checks every part on the CPU.
MODES = {
    "gpu": {"spec_160m": "specs.yaml", "spec_460m": "specs-460m.yaml", "device": "cuda", "folder_blocks": 2048,
            "train_steps": 200, "warmup_steps": 5, "original_460m_steps": 20,
            "micro_batches": "8,16", "pretrain_steps": 150, "pretrain_steps_460m": 60, "log_every": 10,
            "lever_steps": 30, "find_options": [],
            "limits": {"folder": 60, "train-160m": 180, "pretrain-160m": 120, "train-460m": 90,
                       "pretrain-460m": 200, "micro-batch-160m": 90, "lever": 120}},
    "smoke": {"spec_160m": "specs-tiny.yaml", "spec_460m": "specs-tiny.yaml", "device": "cpu", "folder_blocks": 200,
              "train_steps": 4, "warmup_steps": 1, "original_460m_steps": 2,
              "micro_batches": "2", "pretrain_steps": 6, "pretrain_steps_460m": 4, "log_every": 2,
              "lever_steps": 2, "find_options": ["--memory-gib", "0.1"],
              "limits": {"folder": 120, "train-160m": 120, "pretrain-160m": 120, "train-460m": 120,
                         "pretrain-460m": 120, "micro-batch-160m": 120, "lever": 120}},
}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="gpu-results.jsonl", help="JSON lines file the results are appended to")
    parser.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU (a check, not a figure)")
    parser.add_argument("--budget-seconds", type=float, default=DEFAULT_BUDGET_SECONDS,
                        help="the whole run stops within this (later parts are skipped)")
    parser.add_argument("--parts", default=None, help="comma-separated subset of the parts (default: all)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="a part's own time limit (repeatable)")
    parser.add_argument("--spec-160m", default=None, help="spec of the 160M parts (default: specs.yaml)")
    parser.add_argument("--spec-460m", default=None, help="spec of the 460M parts (default: specs-460m.yaml)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of train-160m, losses compared (200)")
    parser.add_argument("--micro-batches", default=None, help="pre-training.py's micro-batch sizes (8,16)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="optimizer steps of pretrain-160m (150)")
    parser.add_argument("--pretrain-steps-460m", type=int, default=None, help="optimizer steps of pretrain-460m (60)")
    parser.add_argument("--compile-modes", default="", help="levers: torch.compile modes, comma-separated")
    parser.add_argument("--sdpa-backends", default="", help="levers: SDPA kernels (flash, efficient, cudnn, math)")
    parser.add_argument("--losses", default="", help=f"levers: {' or '.join(LOSSES)} cross-entropy")
    parser.add_argument("--documents", default="",
                        help="levers: document attention over documents of about these many tokens (e.g. 600)")
    parser.add_argument("--work-dir", default=None, help="where the folder and runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and pre-training.py's output")


@dataclass
class Part:
    name: str
    limit_seconds: float
    command: list[str]
    collect: object = None          # (part, measured) -> result lines; None: the child's own JSON lines
    needs_folder: bool = False
    info: dict = field(default_factory=dict)


def run(args) -> None:
    from pretrain.spec.loading import load_spec

    started = time.perf_counter()  # the budget counts from here: the checks below import torch
    mode = MODES["smoke" if args.smoke else "gpu"]
    settings = resolve(args, mode)
    specs = {role: load_spec(settings[f"spec_{role}"]) for role in ("160m", "460m")}
    check_specs(specs)
    if not args.smoke:
        require_cuda()
    # Absolute: the children run in the suite's root.
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        parts = select_parts(plan_parts(settings, specs, work, mode), args.parts)
        apply_limits(parts, args.limit)
        with open_out(args.out) as out:
            run_parts(parts, args, settings, started, lambda line: emit(line, out))
    finally:
        if not args.work_dir and (not args.keep or not any(work.iterdir())):
            shutil.rmtree(work, ignore_errors=True)


def resolve(args, mode: dict) -> dict:
    """The mode's settings with the command line's values over them, checked."""
    settings = dict(mode)
    for key in ("train_steps", "micro_batches", "pretrain_steps", "pretrain_steps_460m"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key in ("spec_160m", "spec_460m"):  # absolute: the children run in the suite's root
        settings[key] = str(Path(getattr(args, key)).resolve()) if getattr(args, key) else str(REPO / mode[key])
    try:
        sizes = [int(size) for size in str(settings["micro_batches"]).split(",") if size]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or any(max(sizes) % size for size in sizes):
        raise InputError(f"--micro-batches '{settings['micro_batches']}': give sizes of at least 1 that each divide "
                         f"the largest (the same tokens per optimizer step at every size), e.g. 8,16")
    settings["micro_batches"] = sizes
    if settings["train_steps"] <= settings["warmup_steps"] or min(settings["pretrain_steps"],
                                                                  settings["pretrain_steps_460m"]) < 1:
        raise InputError(f"--train-steps must be above {settings['warmup_steps']} (the untimed first steps) and "
                         f"--pretrain-steps, --pretrain-steps-460m at least 1")
    if args.budget_seconds <= 0:
        raise InputError("--budget-seconds must be positive")
    settings["levers"] = parse_levers(args)
    return settings


def parse_levers(args) -> list[tuple[str, str]]:
    from pretrain.benchmarks.training_step import COMPILE_MODES, SDPA_BACKENDS

    levers = []
    for kind, flag, given, choices in (("compile", "--compile-modes", args.compile_modes, COMPILE_MODES),
                                       ("sdpa", "--sdpa-backends", args.sdpa_backends, list(SDPA_BACKENDS)),
                                       ("loss", "--losses", args.losses, LOSSES)):
        for value in (v for v in given.split(",") if v):
            if value not in choices:
                raise InputError(f"{flag} '{given}': choose from {', '.join(choices)}")
            levers.append((kind, value))
    for value in (v for v in args.documents.split(",") if v):
        try:
            document_length(value)
        except argparse.ArgumentTypeError:
            raise InputError(f"--documents '{args.documents}': give document lengths in tokens, at least 2 each") \
                from None
        levers.append(("documents", value))
    return levers


def check_specs(specs: dict) -> None:
    small, large = specs["160m"], specs["460m"]
    if (small.model.vocab_size, small.data.block_size) != (large.model.vocab_size, large.data.block_size):
        raise InputError("--spec-160m and --spec-460m need the same vocab_size and block_size: both read one "
                         "synthetic folder")


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise InputError("this machine has no CUDA GPU; run with --smoke to check every part on the CPU")


def open_out(path: str):
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot write --out '{path}' ({error.strerror}); choose a writable file") from None


def emit(line: dict, out) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    out.write(text + "\n")
    out.flush()


# ----------------------------------------------------------------------------------------------------------------
# The parts

def plan_parts(settings: dict, specs: dict, work: Path, mode: dict) -> list[Part]:
    limits, sizes = mode["limits"], settings["micro_batches"]
    warmup, small = settings["warmup_steps"], settings["spec_160m"]
    folder_config = {"work_dir": str(work), "blocks": settings["folder_blocks"],
                     "vocab_size": specs["160m"].model.vocab_size, "block_size": specs["160m"].data.block_size}
    parts = [Part("folder", limits["folder"], python_module("pretrain.benchmarks.gpu", json.dumps(folder_config)))]
    # The train benchmark's steps hold as many tokens as pre-training.py's, so the optimizer weighs alike in both.
    step_batches = ["--micro-batch", sizes[0], "--gradient-accumulation-steps", max(sizes) // sizes[0]]
    parts.append(Part("train-160m", limits["train-160m"], train_command(
        settings, small, *step_batches, "--warmup-steps", warmup, "--timed-steps", settings["train_steps"] - warmup)))
    pretrain = [pretrain_part("160m", size, settings, specs, work, limits) for size in sizes]
    parts.append(pretrain[0])
    parts.append(Part("train-460m", limits["train-460m"], train_command(
        settings, settings["spec_460m"], "--variants", "original", *step_batches, "--warmup-steps", warmup,
        "--timed-steps", settings["original_460m_steps"])))
    parts.append(pretrain_part("460m", sizes[0], settings, specs, work, limits))
    parts.append(Part("micro-batch-160m", limits["micro-batch-160m"], train_command(
        settings, small, "--find-micro-batch", "--start-micro-batch", sizes[0], *mode["find_options"],
        "training_args.compile_model=false")))
    parts += pretrain[1:]
    for kind, value in settings["levers"]:
        parts.append(Part(f"lever-{kind}-{value}", limits["lever"], train_command(
            settings, small, "--variants", "ours", *step_batches, "--warmup-steps", warmup,
            "--timed-steps", settings["lever_steps"], *lever_options(kind, value, specs["160m"]))))
    return parts


def train_command(settings: dict, spec_file: str, *options) -> list[str]:
    return [sys.executable, str(REPO / "Utilities" / "benchmark.py"), "train", "--spec-file", str(spec_file),
            "--device", settings["device"], *map(str, options)]


def lever_options(kind: str, value: str, spec) -> list[str]:
    if kind == "compile":
        return ["--compile-mode", value]
    if kind == "sdpa":
        return ["--sdpa-backend", value]
    if kind == "documents":
        return ["--documents", value, "data_args.document_attention=true"]
    chunk = "null" if value == "full" else spec.training.cross_entropy_chunk_tokens or DEFAULT_CHUNK_TOKENS
    return [f"training_args.cross_entropy_chunk_tokens={chunk}"]


def pretrain_part(role: str, micro_batch: int, settings: dict, specs: dict, work: Path, limits: dict) -> Part:
    """pre-training.py at one micro-batch, with as many micro-batches per step as the largest size takes one."""
    name = f"pretrain-{role}-mb{micro_batch}"
    accumulation = max(settings["micro_batches"]) // micro_batch
    steps = settings["pretrain_steps" if role == "160m" else "pretrain_steps_460m"]
    output_dir = work / name
    overrides = [f"model_args.tokenizer_name={work / 'tokenizer'}", f"data_args.folder_path={work / 'tokenized'}",
                 f"training_args.output_dir={output_dir}", f"training_args.per_device_train_batch_size={micro_batch}",
                 f"training_args.gradient_accumulation_steps={accumulation}", f"training_args.max_steps={steps}",
                 f"training_args.warmup_steps={max(1, steps // 10)}", "training_args.do_eval=false",
                 "training_args.evaluation_strategy=no", "extra_args.sample_every=null",
                 "extra_args.checkpointing_steps=null", "extra_args.with_tracking=false",
                 "extra_args.track_energy=false", f"extra_args.wandb_log_steps={settings['log_every']}"]
    command = [sys.executable, str(REPO / "pre-training.py"), "--spec-file", str(settings[f"spec_{role}"]),
               *overrides]
    info = {"micro_batch": micro_batch, "gradient_accumulation_steps": accumulation, "steps": steps,
            "output_dir": output_dir, "spec": specs[role], "spec_file": Path(settings[f"spec_{role}"]).name}
    return Part(name, limits[f"pretrain-{role}"], command, collect=pretrain_result, needs_folder=True, info=info)


def select_parts(parts: list[Part], wanted: str | None) -> list[Part]:
    """The parts --parts names; by default all of them, or train-160m (what a lever is compared with) and the
    levers when there are levers."""
    if wanted is None:
        levers = [part for part in parts if part.name.startswith("lever-")]
        return [part for part in parts if part.name == "train-160m"] + levers if levers else parts
    names = [name for name in wanted.split(",") if name]
    known = [part.name for part in parts]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise InputError(f"--parts '{wanted}': choose from {', '.join(known)}")
    # pre-training.py reads the synthetic folder, so the folder part comes along with any of its parts.
    folder = any(part.needs_folder for part in parts if part.name in names)
    return [part for part in parts if part.name in names or (part.name == "folder" and folder)]


def apply_limits(parts: list[Part], limits: list[str]) -> None:
    by_name = {part.name: part for part in parts}
    for given in limits:
        name, _, seconds = given.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = 0
        if name not in by_name or value <= 0:
            raise InputError(f"--limit '{given}': give PART=SECONDS with a positive number of seconds and one of "
                             f"{', '.join(by_name)}")
        by_name[name].limit_seconds = value


# ----------------------------------------------------------------------------------------------------------------
# Running them

def run_parts(parts: list[Part], args, settings: dict, started: float, emit_line) -> None:
    """Each part in turn under its limit, cut to what is left of the budget counted from `started`."""
    statuses, results = {}, []
    env = {"WANDB_MODE": "disabled", **({"CUDA_VISIBLE_DEVICES": ""} if args.smoke else {})}
    for part in parts:
        left = args.budget_seconds - (time.perf_counter() - started)
        limit = min(part.limit_seconds, left)
        if part.needs_folder and statuses.get("folder") != "ok":
            statuses[part.name] = end_line(part, "skipped", emit_line, reason="the folder part did not finish")
            continue
        if limit < min(MIN_PART_SECONDS, part.limit_seconds):
            statuses[part.name] = end_line(part, "skipped", emit_line,
                                           reason=f"{max(left, 0):.0f} s of the {args.budget_seconds:g} s budget left")
            continue
        measured = run_measured(part.command, env=env, timeout_seconds=limit)
        lines = (part.collect or child_lines)(part, measured)
        for line in lines:
            emit_line(line)
        results += lines
        status = "timed_out" if measured.timed_out else "ok" if measured.returncode == 0 else "failed"
        error = (measured.stderr.strip().splitlines() or [""])[-1] if status == "failed" else None
        statuses[part.name] = end_line(part, status, emit_line, seconds=round(measured.seconds, 1),
                                       limit_seconds=round(limit, 1), returncode=measured.returncode,
                                       peak_rss_mib=round(measured.peak_rss_bytes / MIB, 1), error=error)
        if part.collect is pretrain_result and not args.keep:
            shutil.rmtree(part.info["output_dir"], ignore_errors=True)
    emit_line(summary(statuses, results, settings, time.perf_counter() - started, args))


def end_line(part: Part, status: str, emit_line, **fields) -> str:
    emit_line({"benchmark": "gpu", "part": part.name, "variant": "part", "status": status,
               **{key: value for key, value in fields.items() if value is not None}})
    return status


def child_lines(part: Part, measured) -> list[dict]:
    """The JSON lines a child printed (all of them, when it was cut short), as lines of this part."""
    return [{"benchmark": "gpu", "part": part.name, **{k: v for k, v in line.items() if k != "benchmark"}}
            for line in measured.json_lines()]


def pretrain_result(part: Part, measured) -> list[dict]:
    """pre-training.py's own figures from its metrics.jsonl: the median over the logged windows after the first,
    which holds compiling (all of them when there is only one)."""
    metrics = part.info["output_dir"] / "metrics.jsonl"
    windows = [record for record in read_records(metrics) if "tokens_per_second" in record]
    if not windows:
        return []
    steady = windows[1:] or windows
    spec = part.info["spec"]
    mfus = [window["mfu"] for window in steady if window.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else None
    peaks = [window["gpu_peak_memory_gib"] for window in windows if window.get("gpu_peak_memory_gib") is not None]
    return [{"benchmark": "gpu", "part": part.name, "variant": "pre-training.py", "spec": part.info["spec_file"],
             "micro_batch": part.info["micro_batch"],
             "gradient_accumulation_steps": part.info["gradient_accumulation_steps"],
             "block_size": spec.data.block_size, "steps_planned": part.info["steps"],
             "steps_logged": windows[-1]["step"], "complete": measured.returncode == 0 and not measured.timed_out,
             "tokens_per_second": round(statistics.median(w["tokens_per_second"] for w in steady), 1),
             "mfu": round(mfu, 4) if mfu is not None else None,
             "mfu_without_input_embedding": round(mfu * embedding_share(spec), 4) if mfu is not None else None,
             "window_tokens_per_second": [round(w["tokens_per_second"]) for w in windows],
             "first_window_left_out": len(windows) > 1, "peak_memory_gib": max(peaks) if peaks else None,
             "first_loss": round(windows[0]["loss"], 4), "last_loss": round(windows[-1]["loss"], 4)}]


def read_records(path: Path) -> list[dict]:
    """The whole JSON lines of a metrics file; a run killed while writing may leave its last line cut."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def embedding_share(spec) -> float:
    """MFU without the input embedding over MFU with it: the two conventions' FLOPs per token."""
    from pretrain.training.telemetry import flops_per_token

    # The spec's model group has the config's field names, which is all the count reads.
    block = spec.data.block_size
    return flops_per_token(spec.model, block, input_embedding=False) / flops_per_token(spec.model, block)


def summary(statuses: dict, results: list[dict], settings: dict, seconds: float, args) -> dict:
    """Each spec's best pre-training.py figure against its target and against the original-style loop."""
    from pretrain.training.telemetry import MFU_CONVENTIONS

    targets = {}
    for role, target in TARGETS.items():
        runs = [r for r in results
                if r.get("variant") == "pre-training.py" and r["part"].startswith(f"pretrain-{role}-")]
        best = max(runs, key=lambda r: r["tokens_per_second"], default=None)
        original = next((r for r in results if r["part"] == f"train-{role}" and r.get("variant") == "original"), None)
        ours = best["tokens_per_second"] if best else None
        over = round(ours / original["tokens_per_second"], 3) if best and original else None
        targets[role] = {"spec": Path(settings[f"spec_{role}"]).name, "pre_training_tokens_per_second": ours,
                         "at_micro_batch": best["micro_batch"] if best else None,
                         "target_tokens_per_second": target,
                         "original_tokens_per_second": original["tokens_per_second"] if original else None,
                         "over_original": over, "target_over_original": TARGET_OVER_ORIGINAL,
                         "meets_targets": None if over is None else ours >= target and over >= TARGET_OVER_ORIGINAL}
    return {"benchmark": "gpu", "part": "summary", "variant": "summary", "smoke": args.smoke,
            "seconds": round(seconds, 1), "budget_seconds": args.budget_seconds, "statuses": statuses,
            "targets": targets, "mfu_conventions": MFU_CONVENTIONS}


# ----------------------------------------------------------------------------------------------------------------
# The folder part (this module run as a program)

def write_synthetic_folder(config: dict) -> dict:
    """A tokenizer of `vocab_size` tokens and a tokenized folder of random blocks made with it, under work_dir."""
    from types import SimpleNamespace

    from pretrain.benchmarks.data_reading import write_folder
    from pretrain.data.manifest import sha256_file
    from pretrain.tokenizer.conventions import BYTE_TOKENS, SPACE, SPECIAL_TOKENS, llama2_settings
    from pretrain.tokenizer.training import assemble, save

    started = time.perf_counter()
    work, vocab_size, block_size = Path(config["work_dir"]), config["vocab_size"], config["block_size"]
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, SPACE))}
    # Pieces no merge reaches: training needs the vocabulary's size, not its use, since the blocks are random ids.
    vocab.update({f"{SPACE}piece{index}": index for index in range(len(vocab), vocab_size)})
    save(assemble(llama2_settings(), vocab, [], add_bos=True), tokenizer_dir)
    record = {"path": str(tokenizer_dir), "tokenizer_json_sha256": sha256_file(tokenizer_dir / "tokenizer.json"),
              "vocab_size": vocab_size}
    layout = SimpleNamespace(block_size=block_size, vocab_size=vocab_size, row_group_rows=None, file_blocks=None)
    write_folder(work / "tokenized", "ours", config["blocks"] * block_size, layout, tokenizer=record)
    manifest = json.loads((work / "tokenized" / "manifest.json").read_text())
    return {"benchmark": "gpu", "variant": "folder", "vocab_size": vocab_size, "block_size": block_size,
            "train_blocks": manifest["splits"]["train"]["blocks"], "test_blocks": manifest["splits"]["test"]["blocks"],
            "seconds": round(time.perf_counter() - started, 2)}


if __name__ == "__main__":
    print(json.dumps(write_synthetic_folder(json.loads(sys.argv[1]))), flush=True)
