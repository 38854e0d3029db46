"""The GPU measurement (`Utilities/benchmark.py gpu`): its smoke mode end to end on the CPU without `datasets` or
`wandb`, its time limits and budget, its plan for the GPU, its pieces (the timeout of the measured-child runner,
the levers, pre-training.py's figures), and MFU counted both ways."""

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pretrain.benchmarks import gpu, training_step
from pretrain.benchmarks.measure import Measured, run_measured
from pretrain.model.build import llama_config
from pretrain.training import telemetry
from specifications import load_spec
from tests.helpers.runs import REPO, run_script

SMOKE_PARTS = ["folder", "train-160m", "pretrain-160m-mb2", "train-460m", "pretrain-460m-mb2", "micro-batch-160m"]
# A package that cannot be imported, as on the GPU machine, which has neither `datasets` nor `wandb`.
MISSING = "raise ImportError('{name} is not installed on the GPU machine')\n"


def gpu_lines(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def part_lines(lines, name):
    return {line["variant"]: line for line in lines if line["part"] == name}


# --- smoke mode, end to end --------------------------------------------------------------------------------------

def test_smoke_runs_every_part_on_the_cpu_without_datasets_or_wandb(tmp_path):
    stubs = tmp_path / "stubs"
    for name in ("datasets", "wandb"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(MISSING.format(name=name))
    env = {"PYTHONPATH": str(stubs), "TMPDIR": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import datasets"], env={**env, "PATH": ""}, capture_output=True,
                             text=True)
    assert "datasets is not installed on the GPU machine" in blocked.stderr   # the stubs do block the import
    out = tmp_path / "results" / "gpu.jsonl"
    started = time.perf_counter()
    lines = gpu_lines(run_script("Utilities/benchmark.py", "gpu", "--smoke", "--out", out, env=env))
    assert time.perf_counter() - started < 240
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines   # every line is in the file too
    ends = [line for line in lines if line["variant"] == "part"]
    assert [(line["part"], line["status"]) for line in ends] == [(name, "ok") for name in SMOKE_PARTS]
    assert all(0 < line["seconds"] <= line["limit_seconds"] and line["peak_rss_mib"] > 50 for line in ends)

    folder = part_lines(lines, "folder")["folder"]
    assert (folder["vocab_size"], folder["block_size"]) == (512, 128)
    assert folder["train_blocks"] + folder["test_blocks"] == 200

    train = part_lines(lines, "train-160m")
    original, ours, ratios = train["original"], train["ours"], train["ratios"]
    for line in (original, ours):
        assert line["device"] == "cpu" and line["mixed_precision"] == "no" and len(line["losses"]) == 4
        assert line["tokens_per_second"] > 0 and line["peak_memory_gib"] > 0
        assert line["mfu"] is None and line["mfu_without_input_embedding"] is None   # no GPU peak on the CPU
        assert line["flops_per_token_without_input_embedding"] == line["flops_per_token"] - 6 * 512 * 128
    assert ours["levers"] == {"compile_mode": "default", "sdpa_backend": "auto", "document_attention": False} \
        and "levers" not in original
    assert ratios["compared_steps"] == 4 and math.isfinite(ratios["max_abs_loss_difference"])
    assert ratios["max_abs_loss_difference"] < 1e-3                        # fp32 on the CPU: the same losses
    assert part_lines(lines, "train-460m").keys() == {"original", "part"}

    for name, steps in (("pretrain-160m-mb2", 6), ("pretrain-460m-mb2", 4)):
        run = part_lines(lines, name)["pre-training.py"]
        windows = run["window_tokens_per_second"]
        assert run["spec"] == "specs-tiny.yaml" and run["micro_batch"] == 2 and run["gradient_accumulation_steps"] == 1
        assert run["steps_logged"] == run["steps_planned"] == steps and run["complete"] and len(windows) == steps // 2
        assert run["first_window_left_out"]
        assert run["tokens_per_second"] == pytest.approx(statistics.median(windows[1:]), abs=1)
        assert run["mfu"] is None and run["peak_memory_gib"] is None and math.isfinite(run["last_loss"])

    search = [line for line in lines if line["part"] == "micro-batch-160m" and line["variant"] == "micro_batch"]
    verdict = part_lines(lines, "micro-batch-160m")["largest_micro_batch"]
    assert [line["micro_batch"] for line in search] == [2 * 2 ** i for i in range(len(search))]
    assert verdict["start_micro_batch"] == 2 and verdict["settings"]["compile_model"] is False
    assert verdict["largest_micro_batch"] == search[-2]["micro_batch"] and not search[-1]["fits"]

    summary = lines[-1]
    assert summary["part"] == "summary" and summary["smoke"] and summary["statuses"] == dict.fromkeys(SMOKE_PARTS, "ok")
    small = summary["targets"]["160m"]
    assert small["pre_training_tokens_per_second"] == part_lines(lines, "pretrain-160m-mb2")["pre-training.py"][
        "tokens_per_second"]
    assert small["original_tokens_per_second"] == original["tokens_per_second"]
    assert small["over_original"] == pytest.approx(small["pre_training_tokens_per_second"]
                                                   / original["tokens_per_second"], rel=1e-2)
    assert small["target_tokens_per_second"] == 400_000 and summary["targets"]["460m"]["target_tokens_per_second"] \
        == 130_000
    assert set(summary["mfu_conventions"]) == {"mfu", "mfu_without_input_embedding"}
    assert not list(tmp_path.glob("bench-gpu-*"))                          # its work dir is removed


def test_levers_each_print_their_own_line_and_a_kernel_that_cannot_run_fails_alone(tmp_path):
    out = tmp_path / "levers.jsonl"
    lines = gpu_lines(run_script("Utilities/benchmark.py", "gpu", "--smoke", "--out", out, "--sdpa-backends", "cudnn",
                                 "--losses", "full", "--parts", "lever-sdpa-cudnn,lever-loss-full"))
    ends = {line["part"]: line for line in lines if line["variant"] == "part"}
    # The CPU has no cuDNN attention: forcing it is refused by torch, so the lever really reaches the attention.
    assert ends["lever-sdpa-cudnn"]["status"] == "failed" and "No viable backend" in ends["lever-sdpa-cudnn"]["error"]
    assert ends["lever-loss-full"]["status"] == "ok"
    full = part_lines(lines, "lever-loss-full")["ours"]
    assert full["settings"]["cross_entropy_chunk_tokens"] is None and full["tokens_per_second"] > 0
    assert "original" not in part_lines(lines, "lever-loss-full")
    assert lines[-1]["statuses"] == {"lever-sdpa-cudnn": "failed", "lever-loss-full": "ok"}
    assert len(out.read_text().splitlines()) == len(lines)


def test_a_part_past_its_limit_is_timed_out_and_the_budget_skips_what_no_longer_fits(tmp_path):
    out = tmp_path / "limits.jsonl"
    lines = gpu_lines(run_script("Utilities/benchmark.py", "gpu", "--smoke", "--out", out, "--parts",
                                 "train-160m,train-460m", "--limit", "train-160m=1"))
    ends = [line for line in lines if line["variant"] == "part"]
    assert [(line["part"], line["status"]) for line in ends] == [("train-160m", "timed_out"), ("train-460m", "ok")]
    assert 1 <= ends[0]["seconds"] < 5 and ends[0]["limit_seconds"] == 1
    assert "original" in part_lines(lines, "train-460m")                  # the next part still ran, and finished
    assert lines[-1]["statuses"] == {"train-160m": "timed_out", "train-460m": "ok"}

    written = len(lines)
    lines = gpu_lines(run_script("Utilities/benchmark.py", "gpu", "--smoke", "--out", out, "--parts",
                                 "train-160m,train-460m", "--limit", "train-160m=2", "--budget-seconds", 21))
    ends = [line for line in lines if line["variant"] == "part"]
    assert [(line["part"], line["status"]) for line in ends] == [("train-160m", "timed_out"), ("train-460m", "skipped")]
    assert ends[1]["reason"].endswith("s of the 21 s budget left") and lines[-1]["seconds"] < 10
    assert len(out.read_text().splitlines()) == written + len(lines)       # appended to what the first run wrote


@pytest.mark.parametrize("flags, message", [
    (["--smoke", "--parts", "nonsense"], "--parts 'nonsense': choose from folder, train-160m, pretrain-160m-mb2"),
    (["--smoke", "--limit", "train-160m"], "--limit 'train-160m': give PART=SECONDS"),
    (["--smoke", "--micro-batches", "8,12"], "--micro-batches '8,12': give sizes of at least 1 that each divide"),
    (["--smoke", "--sdpa-backends", "fastest"], "--sdpa-backends 'fastest': choose from auto, flash, efficient"),
    (["--smoke", "--documents", "600,x"], "--documents '600,x': give document lengths in tokens"),
    (["--smoke", "--train-steps", "1"], "--train-steps must be above 1"),
    (["--smoke", "--spec-460m", "specs.yaml"], "need the same vocab_size and block_size"),
    ([], "this machine has no CUDA GPU; run with --smoke"),
])
def test_bad_input_exits_2_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "out.jsonl"
    result = run_script("Utilities/benchmark.py", "gpu", "--out", out, *flags, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_the_train_benchmark_refuses_a_search_that_starts_past_its_end():
    result = run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device", "cpu",
                        "--find-micro-batch", "--start-micro-batch", 64, "--max-micro-batch", 32)
    assert result.returncode == 2 and "--max-micro-batch at least --start-micro-batch" in result.stderr


# --- the plan on the GPU ------------------------------------------------------------------------------------------

def gpu_plan(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(list(argv))
    settings = gpu.resolve(args, gpu.MODES["gpu"])
    specs = {role: load_spec(settings[f"spec_{role}"]) for role in ("160m", "460m")}
    parts = gpu.plan_parts(settings, specs, tmp_path, gpu.MODES["gpu"])
    return args, gpu.select_parts(parts, args.parts)


def option(command, flag):
    return command[command.index(flag) + 1]


def override(command, key):
    return next(word.split("=", 1)[1] for word in command if word.startswith(key + "="))


def test_the_gpu_plan_puts_the_targets_first_and_keeps_tokens_per_step(tmp_path):
    _, parts = gpu_plan(tmp_path, "--micro-batches", "8,16,32")
    assert [part.name for part in parts] == ["folder", "train-160m", "pretrain-160m-mb8", "train-460m",
                                             "pretrain-460m-mb8", "micro-batch-160m", "pretrain-160m-mb16",
                                             "pretrain-160m-mb32"]
    levers = ["--compile-modes", "max-autotune-no-cudagraphs", "--losses", "full"]
    _, with_levers = gpu_plan(tmp_path, "--micro-batches", "8,16,32", *levers)
    assert [part.name for part in with_levers] == ["train-160m", "lever-compile-max-autotune-no-cudagraphs",
                                                   "lever-loss-full"]   # levers alone: with what they change
    _, everything = gpu_plan(tmp_path, "--micro-batches", "8,16,32", *levers, "--parts",
                             ",".join(part.name for part in parts + with_levers[1:]))
    by_name = {part.name: part for part in everything}
    assert list(by_name) == [part.name for part in parts + with_levers[1:]]
    assert json.loads(by_name["folder"].command[-1])["vocab_size"] == 32000
    train = by_name["train-160m"].command
    assert (option(train, "--spec-file"), option(train, "--device"), option(train, "--micro-batch")) == (
        str(REPO / "specs.yaml"), "cuda", "8")
    assert option(train, "--gradient-accumulation-steps") == "4"          # 32 sequences a step, as pre-training
    assert option(by_name["pretrain-460m-mb8"].command, "--spec-file") == str(REPO / "specs-460m.yaml")
    assert int(option(train, "--warmup-steps")) + int(option(train, "--timed-steps")) == 200
    assert option(by_name["train-460m"].command, "--variants") == "original"
    # 32 sequences per optimizer step at every micro-batch; 150 steps of the 160M, 60 of the 460M.
    for name, accumulation, steps in (("pretrain-160m-mb8", "4", "150"), ("pretrain-160m-mb16", "2", "150"),
                                      ("pretrain-160m-mb32", "1", "150"), ("pretrain-460m-mb8", "4", "60")):
        command = by_name[name].command
        assert override(command, "training_args.gradient_accumulation_steps") == accumulation
        assert override(command, "training_args.max_steps") == steps
        assert override(command, "training_args.do_eval") == "false" and override(command, "extra_args.sample_every") \
            == "null" and override(command, "extra_args.checkpointing_steps") == "null"
    assert override(by_name["pretrain-460m-mb8"].command, "model_args.tokenizer_name") == str(tmp_path / "tokenizer")
    search = by_name["micro-batch-160m"].command
    assert option(search, "--start-micro-batch") == "8" and "training_args.compile_model=false" in search
    assert option(by_name["lever-compile-max-autotune-no-cudagraphs"].command, "--compile-mode") == \
        "max-autotune-no-cudagraphs"
    assert "training_args.cross_entropy_chunk_tokens=null" in by_name["lever-loss-full"].command


def test_parts_chosen_bring_the_folder_pre_training_needs(tmp_path):
    _, parts = gpu_plan(tmp_path, "--parts", "pretrain-160m-mb16")
    assert [part.name for part in parts] == ["folder", "pretrain-160m-mb16"]
    _, parts = gpu_plan(tmp_path, "--parts", "train-460m", "--losses", "chunked")
    assert [part.name for part in parts] == ["train-460m"]
    _, parts = gpu_plan(tmp_path, "--losses", "chunked", "--parts", "lever-loss-chunked")
    assert "training_args.cross_entropy_chunk_tokens=4096" in parts[0].command
    _, parts = gpu_plan(tmp_path, "--documents", "600")
    assert [part.name for part in parts] == ["train-160m", "lever-documents-600"]
    assert option(parts[1].command, "--documents") == "600" and "data_args.document_attention=true" in parts[1].command


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_runner_kills_a_command_and_its_children_at_its_limit():
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); print('{\"child\": %d}' % child.pid, flush=True); time.sleep(60)")
    measured = run_measured([sys.executable, "-c", script], timeout_seconds=2)
    assert measured.timed_out and measured.returncode == -9 and 2 <= measured.seconds < 10
    child = measured.json_lines()[0]["child"]
    time.sleep(0.5)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(RuntimeError, match="the sleeper was stopped at its time limit after 2 s"):
        measured.check("the sleeper")
    quick = run_measured([sys.executable, "-c", "print('done')"], timeout_seconds=60)
    assert not quick.timed_out and quick.returncode == 0 and quick.stdout == "done\n"


def test_pre_training_figures_leave_out_the_first_window_and_say_when_cut_short(tmp_path):
    spec = load_spec(REPO / "specs.yaml")
    part = gpu.Part("pretrain-160m-mb8", 60, [], info={"output_dir": tmp_path, "spec": spec, "spec_file": "specs.yaml",
                                                        "micro_batch": 8, "gradient_accumulation_steps": 2,
                                                        "steps": 150})
    cut = Measured([], -9, 60.0, 0, None, "", "", None, timed_out=True)
    assert gpu.pretrain_result(part, cut) == []                            # killed before its first window
    windows = [(10, 90_000.0, 0.1), (20, 410_000.0, 0.45), (30, 430_000.0, 0.47), (40, 420_000.0, 0.46)]
    records = [{"step": s, "loss": 10.4, "tokens_per_second": t, "mfu": m, "gpu_peak_memory_gib": s / 2}
               for s, t, m in windows]
    records.insert(2, {"step": 20, "eval_loss": 10.3})                    # not a training window
    # Killed while writing its next line: the cut line is not a record.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 50, "lo')
    [line] = gpu.pretrain_result(part, cut)
    assert line["tokens_per_second"] == 420_000.0 and line["mfu"] == 0.46 and line["steps_logged"] == 40
    assert line["window_tokens_per_second"] == [90_000, 410_000, 430_000, 420_000] and not line["complete"]
    assert line["mfu_without_input_embedding"] == round(0.46 * (6 * 137_841_408 + 12 * 12 * 768 * 2048)
                                                        / (6 * 162_417_408 + 12 * 12 * 768 * 2048), 4)
    assert line["peak_memory_gib"] == 20.0
    finished = Measured([], 0, 50.0, 0, None, "", "", None)
    assert gpu.pretrain_result(part, finished)[0]["complete"]


def test_levers_are_in_effect_only_inside_their_context():
    import torch._inductor.config as inductor

    levers = argparse.Namespace(compile_mode="max-autotune-no-cudagraphs", sdpa_backend="math")
    assert not inductor.max_autotune and torch.backends.cuda.flash_sdp_enabled()
    with training_step.speed_levers(levers):
        assert inductor.max_autotune and inductor.coordinate_descent_tuning
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert not inductor.max_autotune and torch.backends.cuda.flash_sdp_enabled()
    with training_step.speed_levers(argparse.Namespace(compile_mode="default", sdpa_backend="auto")):
        assert not inductor.max_autotune and torch.backends.cuda.flash_sdp_enabled()


# --- MFU both ways ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec_file, parameters", [("specs.yaml", 162_417_408), ("specs-460m.yaml", 468_239_360)])
def test_flops_per_token_with_and_without_the_input_embedding(spec_file, parameters):
    spec = load_spec(REPO / spec_file)
    m, block = spec.model, spec.data.block_size
    attention = 12 * m.num_hidden_layers * m.hidden_size * block
    embedding = m.vocab_size * m.hidden_size
    ids = type("Ids", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    config = llama_config(spec, ids, m.vocab_size)
    assert telemetry.parameter_count(config, input_embedding=False) == parameters - embedding
    assert telemetry.flops_per_token(config, block) == 6 * parameters + attention
    assert telemetry.flops_per_token(config, block, input_embedding=False) == 6 * (parameters - embedding) + attention
    # The benchmark counts from the spec's model group, whose field names are the config's.
    assert telemetry.flops_per_token(spec.model, block, input_embedding=False) == \
        telemetry.flops_per_token(config, block, input_embedding=False)
    tokens_per_second, peak = 400_000, 989.4
    with_embedding = telemetry.model_flops_utilization(tokens_per_second, telemetry.flops_per_token(config, block),
                                                       peak, 1)
    without = telemetry.model_flops_utilization(
        tokens_per_second, telemetry.flops_per_token(config, block, input_embedding=False), peak, 1)
    assert without == pytest.approx(tokens_per_second * (6 * (parameters - embedding) + attention) / 989.4e12)
    assert without < with_embedding
