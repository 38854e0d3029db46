"""What the tests run: the repository, the committed sample, the tiny model's overrides, the offline
environment, and the project's scripts run with the interpreter that runs the tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
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


def run_script(script, *args, env=None, cwd=None, timeout=600, check=False):
    """Run one of the project's scripts (path relative to the repo) with this Python; return CompletedProcess."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                            env=full_env, cwd=cwd or REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(script, args, processes: int = 1) -> list[str]:
    """`script` with `args` under this interpreter: as it is for one process, under `accelerate launch` (data
    parallel, a free port) for several; the caller sets ACCELERATE_USE_CPU for CPU processes."""
    if processes == 1:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(free_port()), str(script), *map(str, args)]
