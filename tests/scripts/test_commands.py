"""The commands the docs show work: every shell command in README.md and the pages of docs/ (```bash blocks and
inline `python ...`) and in the scripts' docstrings is run here, on the CPU, offline, each in a scratch folder laid
out like the repository (never in the repository itself): as written where that works here, otherwise with the
fewest overrides that make it small (a tiny model, a few steps, the committed sample) or with --dry-run. A command
that needs a GPU, several machines, the Hub or a program this machine lacks is listed with the reason it is not
run. A command added to the docs without an entry in COMMANDS fails
test_every_documented_command_is_run_or_listed.

The flags and spec fields of README.md and docs/ are checked both ways: each one they name exists, and every spec
field and every flag of the user-facing scripts is named in them.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from specifications import GROUPS, SHIPPED_SPECS, markdown_table, shipped_spec_texts
from tests.helpers.runs import OFFLINE_ENV, REPO, TINY_MODEL, free_port

# The docs: the README and every page of docs/ (a page added later is covered without an edit here).
DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
DOCUMENTED = [*DOCS, "pre-training.py", "train-sentencepiece.py", "quickstart.py",
              *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "Utilities").glob("*.py"))]


@dataclass(frozen=True)
class Run:
    """Run the command with each (old, new) of `changes` applied to its text and `extra` appended; it must exit 0,
    print every string of `expect` (stdout or stderr) and leave every path of `files` in its folder. `needs`: what
    its folder holds first, made by the session's fixtures: "my-tokenizer", "quickstart-output" (tokenizer and
    tokenized folder), "checkpoint" (output/ of a finished run)."""
    expect: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    changes: tuple[tuple[str, str], ...] = ()
    extra: str = ""
    needs: tuple[str, ...] = ()

    def command(self, documented: str) -> str:
        for old, new in self.changes:
            assert old in documented, (old, documented)
            documented = documented.replace(old, new)
        return f"{documented} {self.extra}".strip()


@dataclass(frozen=True)
class NotRun:
    reason: str


# pre-training.py with the shipped 160M spec made tiny: the test suite's model on the sample, two CPU steps.
TINY_RUN = " ".join([*TINY_MODEL, "model_args.tokenizer_name={tokenizer}", "data_args.folder_path={tokenized}",
                     "training_args.max_steps=2", "training_args.per_device_train_batch_size=2",
                     "training_args.gradient_accumulation_steps=1", "training_args.compile_model=false",
                     "extra_args.mixed_precision=no"])
SAMPLE = "data/sample/pt-sample.jsonl"
TOKENIZER_FILES = ("my-tokenizer/tokenizer.json", "my-tokenizer/tokenizer_report.json")
# The tokenizer benchmark keeps its corpora in the repository's runs/ unless told otherwise; its processes run in the
# repository, so the folder is given whole.
BENCH_DIR = '--work-dir "$PWD/bench"'
ONE_TOKENIZER_CLASS = "--tokenizer-classes PreTrainedTokenizerFast"  # not each of three, every one a full run

COMMANDS: dict[str, Run | NotRun] = {
    # --- set-up
    "pip install torch==2.13.0 && pip install -r requirements.txt && python quickstart.py":
        NotRun("installs packages from PyPI (.ci/run does it on a fresh machine); `python quickstart.py` runs below"),
    "pip install -r requirements-dev.txt && python -m pytest":
        NotRun("installs packages from PyPI, then runs the whole test suite, this file included"),
    "python -m pytest": NotRun("runs the whole test suite, this file included"),
    "python quickstart.py":
        Run(extra="training_args.max_steps=2", expect=("perplexity on the test split: ", "sample: A capital do Brasil"),
            files=("quickstart-output/model/final-checkpoint/model.safetensors",)),
    "python quickstart.py training_args.max_steps=50":
        Run(changes=(("max_steps=50", "max_steps=2"),), expect=("perplexity on the test split: ",),
            files=("quickstart-output/model/final-checkpoint/model.safetensors",)),
    "python quickstart.py --output-dir /tmp/qs":
        NotRun("tests/scripts/test_quickstart.py runs it (40 steps) and checks what it writes and prints"),
    # --- train-sentencepiece.py
    "python train-sentencepiece.py --dataset_name data/sample/pt-sample.jsonl --vocab_size 1024 "
    "--output_dir my-tokenizer":
        Run(expect=("saved my-tokenizer",), files=TOKENIZER_FILES),
    "python train-sentencepiece.py --dataset_name my-corpus.jsonl --vocab_size 32000 --output_dir my-tokenizer":
        Run(changes=(("my-corpus.jsonl", SAMPLE),), expect=("saved my-tokenizer",), files=TOKENIZER_FILES),
    "python train-sentencepiece.py --dataset_name nicholasKluge/Pt-Corpus-Instruct --dataset_split train --hub_token "
    "hf_... --reference_tokenizer meta-llama/Llama-2-7b-hf --num_samples 2000000 --vocab_size 32000 --output_dir "
    "my-tokenizer":
        NotRun("reads its corpus and reference tokenizer from the Hub"),
    # --- Utilities/tokenize-dataset.py
    "python Utilities/tokenize-dataset.py --dataset-name data/sample/pt-sample.jsonl --tokenizer-name my-tokenizer "
    "--block-size 128 --test-size 0.1 --output-dir data/my-corpus-tokenized":
        Run(needs=("my-tokenizer",), expect=("wrote 'data/my-corpus-tokenized'",),
            files=("data/my-corpus-tokenized/manifest.json", "data/my-corpus-tokenized/test/part-00000.parquet")),
    "python Utilities/tokenize-dataset.py --dataset-name my-corpus.jsonl --tokenizer-name my-tokenizer --block-size "
    "2048 --test-size 30000 --output-dir data/my-corpus-tokenized":
        Run(needs=("my-tokenizer",), changes=(("my-corpus.jsonl", SAMPLE), ("--block-size 2048", "--block-size 128"),
                                              ("--test-size 30000", "--test-size 2")),
            files=("data/my-corpus-tokenized/manifest.json",)),
    "python Utilities/tokenize-dataset.py --dataset-name nicholasKluge/Pt-Corpus --dataset-split train "
    "--tokenizer-name nicholasKluge/TeenyTinyLlama-460m --block-size 2048 --test-size 30000 --shuffle True --seed 42 "
    "--token hf_...":
        NotRun("reads its corpus and tokenizer from the Hub (test_tokenize_dataset.py runs it on a fake Hub)"),
    # --- pre-training.py
    "python pre-training.py --spec-file specs.yaml":
        Run(extra=TINY_RUN, expect=("final model: runs/TeenyTinyLlama-160m/final-checkpoint",),
            files=("runs/TeenyTinyLlama-160m/final-checkpoint/model.safetensors",
                   "runs/TeenyTinyLlama-160m/metrics.jsonl")),
    "python pre-training.py --spec-file specs.yaml extra_args.report_to=tensorboard":
        Run(extra=TINY_RUN, expect=("final model: runs/TeenyTinyLlama-160m/final-checkpoint",),
            files=("runs/TeenyTinyLlama-160m/tensorboard", "runs/TeenyTinyLlama-160m/metrics.jsonl")),
    "tensorboard --logdir runs/TeenyTinyLlama-160m":
        NotRun("starts a web server that runs until stopped; tests/scripts/test_tracking_runs.py reads a run's event "
               "files with TensorBoard's own reader"),
    "wandb sync runs/TeenyTinyLlama-160m/wandb/offline-run-20260101_120000-abc12345":
        NotRun("uploads to W&B, which needs the network and an account; tests/scripts/test_tracking_runs.py checks the "
               "offline run and the sync line a run prints"),
    "hf upload me/my-model runs/TeenyTinyLlama-160m/step_2000 . --revision step-2000 --exclude 'accelerate_state/*'":
        NotRun("uploads to the Hub; tests/scripts/test_tracking_runs.py checks that a run prints it for a checkpoint "
               "whose upload failed"),
    "python pre-training.py --spec-file specs.yaml --dry-run":
        Run(expect=("parameters: 162,417,408", "tokens per optimizer step: 131,072 (8 x 1 x 8 x 2048)")),
    'python pre-training.py --spec-file specs.yaml "data_args.mixture={data/web: 3, data/books: 1}" --dry-run':
        Run(expect=("data: a mixture of 2 folders by tokens (web 75.0%, books 25.0%), attention across documents",)),
    "python pre-training.py --spec-file specs.yaml training_args.lr_scheduler_type=warmup_stable_decay "
    "training_args.max_steps=100000 --dry-run":
        Run(expect=("schedule: warmup_stable_decay, warm-up over steps 1-1000, stable at 0.0006 until step 80000, then "
                    "1-sqrt decay over the last 20000 steps (80001-100000) to 0 (min_lr_ratio 0)",)),
    "python pre-training.py --spec-file specs.yaml training_args.output_dir=runs/long "
    "training_args.lr_scheduler_type=warmup_stable_decay training_args.max_steps=100000 "
    "training_args.decay_steps=20000":
        Run(changes=(("decay_steps=20000", "decay_steps=1"),), extra=f"{TINY_RUN} training_args.warmup_steps=0",
            expect=("final model: runs/long/final-checkpoint",),
            files=("runs/long/final-checkpoint/model.safetensors",)),
    "python pre-training.py --spec-file specs.yaml training_args.output_dir=runs/cooldown-24k "
    "training_args.lr_scheduler_type=warmup_stable_decay training_args.resume_from_checkpoint=runs/long/step_20000 "
    "training_args.max_steps=24000 training_args.decay_steps=4000":
        NotRun("needs the long run's step_20000; tests/scripts/test_branches.py branches a tiny run the same way and "
               "checks the branch's losses, history, record and the source left untouched"),
    "python Utilities/benchmark.py train --spec-file specs.yaml --variants ours --documents 600 "
    "data_args.document_attention=true":
        Run(changes=(("specs.yaml", "specs-tiny.yaml"), ("--documents 600", "--documents 50")),
            extra="--device cpu --warmup-steps 1 --timed-steps 1 --micro-batch 2",
            expect=('"document_attention": true',)),
    "python pre-training.py --spec-file specs.yaml training_args.max_steps=20 data_args.folder_path=/data/x":
        Run(extra="--dry-run", expect=("folder_path: /data/x", "steps: 20 optimizer steps",
                                       "the learning rate rises to at most 1.14e-05 by the last step")),
    "WORLD_SIZE=4 python pre-training.py --spec-file specs.yaml --dry-run training_args.gradient_accumulation_steps=2":
        Run(expect=("processes: 4", "tokens per optimizer step: 131,072 (8 x 4 x 2 x 2048)")),
    "python pre-training.py --spec-file specs-tiny.yaml --dry-run training_args.max_steps=3000":
        Run(needs=("quickstart-output",),
            expect=("passes (epochs) over the train split: ", "warning: the run reads its data more than 4 times")),
    "python pre-training.py --spec-file specs-tiny.yaml training_args.early_stopping_patience=3":
        Run(needs=("quickstart-output",),
            extra="training_args.max_steps=4 training_args.eval_steps=2 extra_args.checkpointing_steps=2 "
                  "extra_args.sample_every=null extra_args.track_energy=false",
            expect=("best eval loss: ",), files=("quickstart-output/model/best-checkpoint.json",)),
    "accelerate launch --num_processes=4 pre-training.py --spec-file specs.yaml":
        NotRun("needs 4 GPUs"),
    "accelerate launch --multi_gpu --num_processes 4 pre-training.py --spec-file specs.yaml "
    "training_args.gradient_accumulation_steps=2":
        NotRun("needs 4 GPUs"),
    "accelerate launch --config_file fsdp_config.yaml --num_processes 4 pre-training.py --spec-file specs.yaml":
        NotRun("needs 4 GPUs: accelerate shards with FSDP only on GPUs (test_distributed.py fakes that on the CPU)"),
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 --main_process_ip 10.0.0.1 "
    "--main_process_port 29500 pre-training.py --spec-file specs.yaml":
        NotRun("needs two machines of 8 GPUs (test_distributed.py runs two CPU launchers on one machine)"),
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pre-training.py --spec-file specs-tiny.yaml":
        Run(needs=("quickstart-output",),
            changes=(("--num_processes 2", "--num_processes 2 --main_process_port {port}"),),
            extra="training_args.max_steps=2", expect=("on 2 process(es)",),
            files=("quickstart-output/model/final-checkpoint/model.safetensors",)),
    "python pre-training.py --spec-file specs.yaml training_args.gradient_accumulation_steps=8 "
    "training_args.resume_from_checkpoint=runs/TeenyTinyLlama-160m/step_2000":
        NotRun("needs a checkpoint of a 4-GPU FSDP run; tests/scripts/test_resume_launches.py resumes checkpoints of "
               "one process, DDP and FSDP under each other launch and checks the losses"),
    "torchrun --nproc_per_node 4 pre-training.py --spec-file specs.yaml training_args.gradient_accumulation_steps=2":
        NotRun("needs 4 GPUs"),
    "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 pre-training.py --spec-file specs-tiny.yaml":
        Run(needs=("quickstart-output",),
            changes=(("--nproc_per_node 2", "--nproc_per_node 2 --master_port {port}"),),
            extra="training_args.max_steps=2", expect=("on 2 process(es)",),
            files=("quickstart-output/model/final-checkpoint/model.safetensors",)),
    "sbatch slurm/pretrain.sbatch --spec-file specs.yaml":
        NotRun("needs a Slurm cluster; tests/scripts/test_slurm.py runs the script with stand-ins for srun, scontrol "
               "and scancel on two loopback nodes: stopped, requeued and resumed to the losses of one process"),
    "sbatch --nodes 4 --export=ALL,PARALLEL=fsdp slurm/pretrain.sbatch --spec-file specs.yaml":
        NotRun("needs a Slurm cluster of GPU nodes; tests/scripts/test_slurm.py runs the script's FSDP launch on two "
               "loopback nodes with stand-ins for srun, scontrol and scancel"),
    "sbatch --export=ALL,LAUNCHER=torchrun slurm/pretrain.sbatch --spec-file specs.yaml":
        NotRun("needs a Slurm cluster; tests/scripts/test_slurm.py runs the script's torchrun launch on two loopback "
               "nodes with stand-ins for srun, scontrol and scancel"),
    # --- specifications.py
    "python specifications.py": Run(expect=(markdown_table(),)),
    "python specifications.py --write-specs": Run(expect=("wrote ",), files=tuple(SHIPPED_SPECS)),
    # --- using the model elsewhere
    "python Utilities/export-gguf.py output/final-checkpoint model.gguf":
        Run(needs=("checkpoint",), expect=("wrote 'model.gguf'",), files=("model.gguf",)),
    "python Utilities/export-gguf.py output/final-checkpoint model-f32.gguf --dtype f32 --overwrite":
        Run(needs=("checkpoint",), expect=("wrote 'model-f32.gguf'",), files=("model-f32.gguf",)),
    # --- docs/gguf.md: the quantized types, llama-quantize, Ollama, the size and perplexity of each type
    "python Utilities/export-gguf.py output/final-checkpoint q4/model-q4_0.gguf --dtype q4_0":
        Run(needs=("checkpoint",), expect=("wrote 'q4/model-q4_0.gguf'", "and 'q4/Modelfile'"),
            files=("q4/model-q4_0.gguf", "q4/Modelfile")),
    "llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M": NotRun("needs llama.cpp's tools, not installed here"),
    "cd q4 && ollama create teenytinyllama-q4 -f Modelfile": NotRun("needs Ollama, not installed here"),
    'ollama run teenytinyllama-q4 "A capital do Brasil é"': NotRun("needs Ollama, not installed here"),
    "python Utilities/benchmark.py gguf quickstart-output/model/final-checkpoint --data quickstart-output/tokenized":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("quickstart-output/model/final-checkpoint", "output/final-checkpoint"),),
            extra="--dtypes f32 q4_0 --max-blocks 2", expect=('"variant": "q4_0"', "| q4_0 | ")),
    "python quickstart.py --output-dir small-output --vocab-size 1024 model_args.hidden_size=256 "
    "model_args.intermediate_size=768 model_args.num_hidden_layers=4 model_args.num_attention_heads=8 "
    "model_args.num_key_value_heads=4":
        NotRun("trains a 4-layer model for minutes; test_quickstart.py runs quickstart.py, shortened"),
    "python Utilities/benchmark.py gguf small-output/model/final-checkpoint --data small-output/tokenized":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("small-output/model/final-checkpoint", "output/final-checkpoint"),
                     ("small-output/tokenized", "quickstart-output/tokenized")),
            extra="--dtypes f32 q4_0 --max-blocks 2", expect=('"variant": "q4_0"', "| q4_0 | ")),
    # --- Utilities/evaluate.py: the finished run has no step_N (it saves only its final checkpoint)
    "python Utilities/evaluate.py output --data data/pt-corpus-tokenized":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("data/pt-corpus-tokenized", "quickstart-output/tokenized"),),
            expect=("| final-checkpoint | 2 | 512 |",),
            files=("output/evaluation.csv", "output/evaluation.json", "output/perplexity.png")),
    "python Utilities/evaluate.py output/step_500 output/final-checkpoint --data data/pt-corpus-tokenized "
    "--batch-size 16":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("output/step_500 ", ""), ("data/pt-corpus-tokenized", "quickstart-output/tokenized")),
            expect=("| final-checkpoint | 2 | 512 |",), files=("evaluation.json",)),
    "python Utilities/evaluate.py user/model --revisions step-1000 main --data data/pt-corpus-tokenized":
        NotRun("reads its checkpoints from the Hub (test_evaluate.py runs it on a fake Hub)"),
    "python Utilities/evaluate.py output --data data/pt-corpus-tokenized --update-card "
    "output/final-checkpoint/README.md":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("data/pt-corpus-tokenized", "quickstart-output/tokenized"),),
            expect=("updated output/final-checkpoint/README.md",)),
    "lm_eval run --model hf --model_args pretrained=output/final-checkpoint,add_bos_token=True --tasks "
    "arc_pt,hellaswag_pt --batch_size 8":
        NotRun("its tasks' datasets come from the Hub (test_harness.py runs the harness's HFLM on local tasks)"),
    "lm_eval run --model hf --model_args pretrained=output/final-checkpoint,add_bos_token=False --tasks wikitext "
    "--batch_size 8":
        NotRun("its task's dataset comes from the Hub (test_harness.py runs the harness's HFLM on local tasks)"),
    # The tiny tasks' data files are relative to the repository root, which the command's folder links to.
    "python Utilities/evaluate.py quickstart-output/model --data quickstart-output/tokenized --tasks tiny_pt_choice "
    "tiny_pt_text --include-path tests/harness_tasks":
        Run(needs=("checkpoint", "quickstart-output"),
            changes=(("python Utilities/evaluate.py quickstart-output/model",
                      f"ln -s {REPO / 'tests'} tests && python Utilities/evaluate.py output"),),
            expect=("| tiny_pt_choice/acc | tiny_pt_choice/acc_norm | tiny_pt_text/word_perplexity |",),
            files=("output/evaluation.csv", "output/perplexity.png")),
    "python Utilities/evaluate.py output --data data/pt-corpus-tokenized --tasks portuguese --limit 100":
        NotRun("the preset's tasks need the Portuguese fork of the harness and their datasets from the Hub"),
    'llama-completion -m model.gguf -p "A capital do Brasil é" -n 30': NotRun("needs llama.cpp, not installed here"),
    "llama-perplexity -m model.gguf -f held-out.txt -c 2048": NotRun("needs llama.cpp, not installed here"),
    "llama-server -m model.gguf -c 2048": NotRun("needs llama.cpp, not installed here"),
    "printf 'FROM ./model.gguf\\nTEMPLATE \"{{ .Prompt }}\"\\nPARAMETER num_ctx 2048\\n' > Modelfile":
        Run(files=("Modelfile",)),
    'ollama create teenytinyllama -f Modelfile && ollama run teenytinyllama "A capital do Brasil é"':
        NotRun("needs Ollama, not installed here"),
    # --- Utilities/chinchilla-estimation.py
    "python Utilities/chinchilla-estimation.py --spec-file specs.yaml --tokens 6.2e9":
        Run(expect=("compute-optimal",)),
    "python Utilities/chinchilla-estimation.py --spec-file specs-460m.yaml training_args.max_steps=70000 --gpus 8 "
    "--tokens-per-second 400000 --gpu-watts 700":
        Run(expect=("compute-optimal",)),
    "python Utilities/chinchilla-estimation.py --parameters 460e6 --tokens 9.3e9": Run(expect=("compute-optimal",)),
    # --- Utilities/benchmark.py: corpora of a few hundred KB, synthetic folders of 100,000 tokens, the tiny model
    "python Utilities/benchmark.py tokenizer --help": Run(expect=("usage: benchmark.py tokenizer",)),
    "python Utilities/benchmark.py tokenize --help": Run(expect=("usage: benchmark.py tokenize",)),
    "python Utilities/benchmark.py data --help": Run(expect=("usage: benchmark.py data",)),
    "python Utilities/benchmark.py train --help": Run(expect=("usage: benchmark.py train",)),
    "python Utilities/benchmark.py gpu --help": Run(expect=("usage: benchmark.py gpu",)),
    "python Utilities/benchmark.py gguf --help": Run(expect=("usage: benchmark.py gguf",)),
    "python Utilities/benchmark.py optimizer --help": Run(expect=("usage: benchmark.py optimizer",)),
    "python Utilities/benchmark.py optimizer --work-dir runs/bench-optimizer":
        NotRun("trains eight small models for 150 steps each, most of an hour on two shared CPU cores; its --smoke "
               "form runs in tests/scripts/test_optimizer_runs.py"),
    # Each benchmark's documented sizes shrink to one small run (repeats at their default, 1), shared by the
    # commands that differ only in size.
    "python Utilities/benchmark.py tokenizer":
        Run(extra=f"--size-mb 0.2 {BENCH_DIR}", expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py tokenizer --size-mb 100":
        Run(changes=(("--size-mb 100", "--size-mb 0.2"),), extra=BENCH_DIR, expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py tokenizer --size-mb 530 1060 --vocab-size 8000":
        Run(changes=(("--size-mb 530 1060 --vocab-size 8000", "--size-mb 0.2 --vocab-size 400"),), extra=BENCH_DIR,
            expect=('"variant": "ours"',)),
    # A megabyte: the default 1% test split must hold one 2048-token block.
    "python Utilities/benchmark.py tokenize --corpus-mb 100":
        Run(changes=(("--corpus-mb 100", "--corpus-mb 1"),), extra=ONE_TOKENIZER_CLASS,
            expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py tokenize --corpus-mb 117 --repeat 3":
        Run(changes=(("--corpus-mb 117 --repeat 3", "--corpus-mb 1"),), extra=ONE_TOKENIZER_CLASS,
            expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py gpu --out gpu.jsonl":
        NotRun("needs a CUDA GPU (its --smoke form, every part tiny on the CPU, runs in test_gpu_benchmark.py)"),
    "python Utilities/benchmark.py data --tokens 1000000000":
        Run(changes=(("--tokens 1000000000", "--tokens 100000"),), expect=('"variant": "tokenized_data-ours"',)),
    "python Utilities/benchmark.py train --spec-file specs.yaml":
        Run(changes=(("specs.yaml", "specs-tiny.yaml"),), extra="--device cpu --warmup-steps 1 --timed-steps 2",
            expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py train --spec-file S --find-micro-batch":
        Run(changes=((" S ", " specs-tiny.yaml "),), expect=('"variant": "largest_micro_batch"',)),
    # --- docs/benchmarks.md: the measurements as they were taken, made small as above (the ones that shrink to the
    # same command line as an entry above run once)
    "python Utilities/benchmark.py NAME": NotRun("NAME stands for each benchmark, every one of which has its entry"),
    "python Utilities/benchmark.py tokenizer --size-mb 530 --vocab-size 8000":
        Run(changes=(("--size-mb 530 --vocab-size 8000", "--size-mb 0.2 --vocab-size 400"),), extra=BENCH_DIR,
            expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py tokenizer --size-mb 1060 --vocab-size 8000 --variants ours":
        Run(changes=(("--size-mb 1060 --vocab-size 8000", "--size-mb 0.2 --vocab-size 400"),), extra=BENCH_DIR,
            expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py tokenizer --size-mb 10 --vocab-size 8000 --repeats 2 --encode-mb 2":
        Run(changes=(("--size-mb 10 --vocab-size 8000 --repeats 2 --encode-mb 2",
                      "--size-mb 0.2 --vocab-size 400 --encode-mb 0.05"),), extra=BENCH_DIR,
            expect=('"variant": "original"', '"variant": "ours"')),
    "python Utilities/benchmark.py tokenize":
        Run(extra=f"--corpus-mb 1 {ONE_TOKENIZER_CLASS}", expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py tokenize --corpus-mb 10":
        Run(changes=(("--corpus-mb 10", "--corpus-mb 1"),), extra=ONE_TOKENIZER_CLASS,
            expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py tokenize --corpus-mb 117 --corpus synthetic --variants ours,encode --repeat 3":
        Run(changes=(("--corpus-mb 117", "--corpus-mb 1"), (" --repeat 3", "")), extra=ONE_TOKENIZER_CLASS,
            expect=('"variant": "ours"', '"variant": "encode"')),
    "python Utilities/benchmark.py data": Run(extra="--tokens 100000", expect=('"variant": "tokenized_data-ours"',)),
    "python Utilities/benchmark.py data --tokens 1000000000 --num-processes 1 8 --baseline":
        Run(changes=(("--tokens 1000000000", "--tokens 100000"), ("--num-processes 1 8", "--num-processes 1 2")),
            expect=('"variant": "tokenized_data-ours"', '"variant": "original-ours"')),
    "python Utilities/benchmark.py train --spec-file S":
        Run(changes=(("--spec-file S", "--spec-file specs-tiny.yaml"),),
            extra="--device cpu --warmup-steps 1 --timed-steps 2", expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py train --spec-file specs.yaml --find-micro-batch":
        Run(changes=(("specs.yaml", "specs-tiny.yaml"),), expect=('"variant": "largest_micro_batch"',)),
    "python Utilities/benchmark.py train --spec-file specs.yaml --micro-batch 16 --gradient-accumulation-steps 4 "
    "--variants ours":
        Run(changes=(("specs.yaml", "specs-tiny.yaml"),
                     ("--micro-batch 16", "--micro-batch 2"), ("accumulation-steps 4", "accumulation-steps 1")),
            extra="--device cpu --warmup-steps 1 --timed-steps 1", expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py train --spec-file specs.yaml --micro-batch 32 --gradient-accumulation-steps 2 "
    "--variants ours":
        Run(changes=(("specs.yaml", "specs-tiny.yaml"),
                     ("--micro-batch 32", "--micro-batch 2"), ("accumulation-steps 2", "accumulation-steps 1")),
            extra="--device cpu --warmup-steps 1 --timed-steps 1", expect=('"variant": "ours"',)),
    "python Utilities/benchmark.py train --spec-file specs-460m.yaml --micro-batch 4 --variants original":
        Run(changes=(("specs-460m.yaml", "specs-tiny.yaml"), ("--micro-batch 4", "--micro-batch 2")),
            extra="--device cpu --warmup-steps 1 --timed-steps 1", expect=('"variant": "original"',)),
    "python Utilities/benchmark.py train --spec-file specs-460m.yaml --micro-batch 8":
        Run(changes=(("specs-460m.yaml", "specs-tiny.yaml"), ("--micro-batch 8", "--micro-batch 2")),
            extra="--device cpu --warmup-steps 1 --timed-steps 1", expect=('"variant": "ratios"',)),
    "OMP_NUM_THREADS=1 python Utilities/benchmark.py train --spec-file specs-tiny.yaml --device cpu --warmup-steps 3 "
    "--timed-steps 20":
        Run(changes=(("--warmup-steps 3 --timed-steps 20", "--warmup-steps 1 --timed-steps 2"),),
            expect=('"variant": "ratios"',)),
    "python Utilities/benchmark.py train --spec-file S --device cpu --find-micro-batch "
    "[training_args.cross_entropy_chunk_tokens=null]":
        Run(changes=((" S ", " specs-tiny.yaml "), ("[training_args.cross_entropy_chunk_tokens=null]",
                                                     "training_args.cross_entropy_chunk_tokens=null")),
            expect=('"variant": "largest_micro_batch"',)),
    "python Utilities/benchmark.py gpu": NotRun("needs a CUDA GPU (test_gpu_benchmark.py runs its --smoke form)"),
    "python Utilities/benchmark.py gpu --smoke --out smoke.jsonl":
        NotRun("tests/scripts/test_gpu_benchmark.py runs it and checks the line of every part and the summary"),
    "python Utilities/benchmark.py gpu --out gpu-results.jsonl":
        NotRun("needs a CUDA GPU (its --smoke form, every part tiny on the CPU, runs in test_gpu_benchmark.py)"),
    "grep '\"summary\"' gpu-results.jsonl": NotRun("reads the file that the GPU measurement above writes"),
    "python Utilities/benchmark.py gpu --sdpa-backends flash,efficient,cudnn --compile-modes "
    "max-autotune-no-cudagraphs --losses full --out gpu-levers.jsonl":
        NotRun("needs a CUDA GPU: the attention kernels and compile modes it compares exist only there"),
    "python Utilities/benchmark.py gpu --micro-batches 8,16,32 --parts pretrain-160m-mb8,pretrain-160m-mb32 --out "
    "gpu-micro-batch.jsonl":
        NotRun("needs a CUDA GPU (test_gpu_benchmark.py checks how --micro-batches and --parts pick the parts)"),
}


# ----------------------------------------------------------------------------------------------------------------
# Collecting the documented commands

def joined_lines(lines):
    """Lines with the ones continued by a trailing backslash joined, whitespace collapsed, `# comments` dropped."""
    commands, current = [], []
    for line in lines:
        current.append(line.strip())
        if current[-1].endswith("\\"):
            current[-1] = current[-1][:-1]
            continue
        command = re.sub(r"\s+#\s.*$", "", " ".join(" ".join(current).split()))
        current = []
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


INLINE_COMMAND = re.compile(r"`((?:[A-Z_]+=\S+\s+)*python3? [^`]+)`")
DOCSTRING_COMMAND = re.compile(r"\s{4}(?:[A-Z_]+=\S+\s+)*(?:python3?|accelerate) ")


def markdown_commands(text: str) -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [c for block in blocks for c in joined_lines(block.splitlines())] + \
        [" ".join(c.split()) for c in INLINE_COMMAND.findall(prose)]


def docstring_commands(path: Path) -> list[str]:
    """The indented `python ...` / `accelerate ...` lines of a script's docstring, with their continuations."""
    lines = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=True) or "").splitlines()
    commands, index = [], 0
    while index < len(lines):
        if DOCSTRING_COMMAND.match(lines[index]):
            end = index
            while lines[end].rstrip().endswith("\\") and end + 1 < len(lines):
                end += 1
            commands += joined_lines(lines[index:end + 1])
            index = end
        index += 1
    return commands


def documented_commands() -> dict[str, list[str]]:
    """Every documented command and the files that show it."""
    found = {}
    for name in DOCUMENTED:
        path = REPO / name
        commands = markdown_commands(path.read_text(encoding="utf-8")) if name.endswith(".md") else \
            docstring_commands(path)
        for command in commands:
            found.setdefault(command, []).append(name)
    return found


def test_every_documented_command_is_run_or_listed():
    documented = documented_commands()
    missing = [f"{command}   ({', '.join(where)})" for command, where in documented.items() if command not in COMMANDS]
    assert not missing, "commands shown in the docs with no entry in COMMANDS (run it, or list why not):\n" + \
        "\n".join(missing)
    stale = [command for command in COMMANDS if command not in documented]
    assert not stale, f"entries of COMMANDS that no doc shows any more: {stale}"


def test_every_docs_page_is_read():
    pages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert pages and set(pages) <= set(DOCUMENTED)
    assert "docs/spec.md" in documented_commands()["python specifications.py --write-specs"]


def test_the_collector_reads_blocks_inline_commands_and_docstrings(tmp_path):
    text = ("Run `python a.py --x 1`, or `WORLD_SIZE=2 python b.py`; not `accelerate launch --cpu`.\n"
            "```bash\n# a comment\npython c.py --long \\\n   --lines 2   # why\n\nls\n```\n"
            "```python\nprint('python d.py')\n```\n")
    assert markdown_commands(text) == ["python c.py --long --lines 2", "ls", "python a.py --x 1",
                                     "WORLD_SIZE=2 python b.py"]
    script = tmp_path / "s.py"
    script.write_text('"""Does it.\n\n    python s.py --a \\\n        --b   # the b\n    accelerate launch s.py\n\n'
                      'python not-indented.py\n"""\n', encoding="utf-8")
    assert docstring_commands(script) == ["python s.py --a --b", "accelerate launch s.py"]


# ----------------------------------------------------------------------------------------------------------------
# Running them

class Runner:
    """Runs documented commands, each in a fresh folder laid out like the repository: the scripts, Utilities/ and
    pretrain/ linked, the spec files and specifications.py copied (so --write-specs rewrites the copies), data/sample
    linked under a data/ of its own. Each distinct command line runs once."""

    def __init__(self, tmp_path_factory, sample_tokenizer, sample_tokenized):
        self.tmp_path_factory = tmp_path_factory
        self.fixtures = {"tokenizer": sample_tokenizer, "tokenized": sample_tokenized}
        self.done = {}
        bin_dir = tmp_path_factory.mktemp("bin")
        # `python` and `accelerate` in the commands are this interpreter and its accelerate. A wrapper that execs
        # it, not a link to it: a virtualenv's interpreter started through a link outside the venv does not find
        # the venv's pyvenv.cfg, and runs as the base interpreter without the venv's packages.
        (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / "python").chmod(0o755)
        (bin_dir / "accelerate").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m accelerate.commands.accelerate_cli '
                                            f'"$@"\n')
        (bin_dir / "accelerate").chmod(0o755)
        (bin_dir / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
        (bin_dir / "torchrun").chmod(0o755)
        self.env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "HF_HOME": str(tmp_path_factory.mktemp("hf-home"))}
        self.env.pop("WORLD_SIZE", None)

    def folder(self, needs) -> Path:
        folder = self.tmp_path_factory.mktemp("command")
        for name in ("pre-training.py", "train-sentencepiece.py", "quickstart.py", "fsdp_config.yaml", "Utilities",
                     "pretrain", "requirements.txt", "requirements-dev.txt"):
            (folder / name).symlink_to(REPO / name)
        for name in ("specifications.py", *SHIPPED_SPECS):
            (folder / name).write_bytes((REPO / name).read_bytes())
        (folder / "data").mkdir()
        (folder / "data" / "sample").symlink_to(REPO / "data" / "sample")
        if "my-tokenizer" in needs:
            (folder / "my-tokenizer").symlink_to(self.fixtures["tokenizer"])
        if "quickstart-output" in needs:
            (folder / "quickstart-output").mkdir()
            (folder / "quickstart-output" / "tokenizer").symlink_to(self.fixtures["tokenizer"])
            (folder / "quickstart-output" / "tokenized").symlink_to(self.fixtures["tokenized"])
        if "checkpoint" in needs:
            trained = self.run("python pre-training.py --spec-file specs.yaml")
            (folder / "output").symlink_to(trained.folder / "runs" / "TeenyTinyLlama-160m")
        return folder

    def run(self, documented: str):
        how = COMMANDS[documented]
        command = how.command(documented)
        for name, value in {"port": free_port(), **self.fixtures}.items():
            command = command.replace(f"{{{name}}}", str(value))
        if command not in self.done:
            folder = self.folder(how.needs)
            result = subprocess.run(["bash", "-c", command], cwd=folder, env=self.env, capture_output=True, text=True,
                                    timeout=600)
            result.folder, result.command = folder, command
            self.done[command] = result
        return self.done[command]


@pytest.fixture(scope="module")
def runner(tmp_path_factory, sample_tokenizer, sample_tokenized):
    # What the commands write relative to their folder must never land in the repository instead.
    before = set(os.listdir(REPO))
    runner = Runner(tmp_path_factory, sample_tokenizer, sample_tokenized)
    yield runner
    written = {name for result in runner.done.values() for name in os.listdir(result.folder)}
    assert not (set(os.listdir(REPO)) - before) & written, "a command wrote into the repository"


RUN = [command for command, how in COMMANDS.items() if isinstance(how, Run)]


@pytest.mark.parametrize("documented", RUN)
def test_documented_command_works(runner, documented):
    how = COMMANDS[documented]
    result = runner.run(documented)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{result.command}\nexited {result.returncode}:\n{output[-3000:]}"
    for expected in how.expect:
        assert expected in output, f"{result.command}\ndid not print {expected!r}"
    for path in how.files:
        assert (result.folder / path).exists(), f"{result.command}\ndid not write {path}"


def test_write_specs_writes_the_shipped_files_into_its_own_folder(runner):
    result = runner.run("python specifications.py --write-specs")
    assert result.stdout.splitlines() == [f"wrote {result.folder / name}" for name in SHIPPED_SPECS]
    for name, text in shipped_spec_texts(REPO).items():
        assert (result.folder / name).read_text(encoding="utf-8") == text


def test_not_run_commands_say_why():
    for command, how in COMMANDS.items():
        assert isinstance(how, Run) or len(how.reason) > 10, command


# ----------------------------------------------------------------------------------------------------------------
# Flags and spec fields

# The user-facing programs: every flag of each is named in the docs.
PROGRAMS = ["train-sentencepiece.py", "Utilities/tokenize-dataset.py", "pre-training.py", "quickstart.py",
            "specifications.py", "Utilities/chinchilla-estimation.py", "Utilities/export-gguf.py"]
# Flags of other programs that the docs name.
EXTERNAL_FLAGS = {"--signal": "sbatch (SLURM)", "--model": "lm_eval", "--model_args": "lm_eval", "--tasks": "lm_eval",
                  "--batch_size": "lm_eval", "--nodes": "sbatch (SLURM)", "--export": "sbatch (SLURM)",
                  "--nproc_per_node": "torchrun", "--signals_to_handle": "torchrun", "--logdir": "tensorboard",
                  "--revision": "hf upload", "--exclude": "hf upload"}


def option_groups(help_text: str) -> list[set[str]]:
    """The long options of an argparse --help, one set of spellings per option."""
    groups = []
    for line in help_text.splitlines():
        if re.match(r"  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            spellings = {part.split()[0] for part in invocation.split(", ") if part.startswith("--")}
            if spellings:
                groups.append(spellings)
    return groups


@pytest.fixture(scope="module")
def program_options():
    """{program: its long options}, for our scripts (and each benchmark) and for `accelerate launch`."""
    from accelerate.commands.launch import launch_command_parser

    env = {**os.environ, **OFFLINE_ENV}
    options = {}
    scripts = sorted({*PROGRAMS, *(p.relative_to(REPO).as_posix() for p in (REPO / "Utilities").glob("*.py"))})
    helps = {name: [sys.executable, str(REPO / name), "--help"] for name in scripts}
    for name, argv in list(helps.items()):
        text = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120).stdout
        options[name] = option_groups(text)
        commands = re.search(r"^positional arguments:\n\s+\{([\w,-]+)\}", text, re.M)
        for sub in commands.group(1).split(",") if commands else ():
            text = subprocess.run([*argv[:-1], sub, "--help"], capture_output=True, text=True, env=env,
                                  timeout=120).stdout
            options[f"{name} {sub}"] = option_groups(text)
    options["accelerate launch"] = [set(a.option_strings) for a in launch_command_parser()._actions
                                    if any(o.startswith("--") for o in a.option_strings)]
    return {name: set().union(*groups) for name, groups in options.items()}, options


def program_of(words: list[str], options: dict) -> tuple[str | None, list[str]]:
    """The program a command line runs (as named in `options`) and the arguments it gets."""
    if words[:1] == ["python"] and len(words) > 1:
        name = words[1]
        if len(words) > 2 and f"{name} {words[2]}" in options:
            return f"{name} {words[2]}", words[3:]
        return name, words[2:]
    return None, words


def test_every_flag_of_a_run_command_is_one_its_program_takes(program_options):
    flags, _ = program_options
    unknown = []
    for documented in documented_commands():
        for part in documented.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words[:2] == ["accelerate", "launch"]:
                script = next(i for i, w in enumerate(words) if w.endswith(".py"))
                launch, words = words[2:script], ["python", *words[script:]]
                unknown += [(documented, f) for f in flag_names(launch) if f not in flags["accelerate launch"]]
            program, arguments = program_of(words, flags)
            if program in flags:
                unknown += [(documented, f) for f in flag_names(arguments) if f not in flags[program]]
    assert not unknown, unknown


def flag_names(words) -> list[str]:
    return [w.split("=", 1)[0] for w in words if re.match(r"--[a-zA-Z]", w)]


def docs_text() -> str:
    """README.md and every page of docs/, one after the other."""
    return "\n".join((REPO / name).read_text(encoding="utf-8") for name in DOCS)


def test_every_flag_the_docs_name_exists(program_options):
    flags, _ = program_options
    known = set().union(*flags.values()) | set(EXTERNAL_FLAGS)
    named = set(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", docs_text()))
    assert not named - known, f"flags the docs name that no program has: {sorted(named - known)}"


def test_every_flag_of_the_user_facing_scripts_is_named_in_the_docs(program_options):
    _, groups = program_options
    text = docs_text()
    unnamed = [f"{program}: {' / '.join(sorted(spellings))}" for program in PROGRAMS for spellings in groups[program]
               if spellings != {"--help"} and not any(re.search(rf"{re.escape(s)}(?![\w-])", text) for s in spellings)]
    assert not unnamed, f"flags the docs do not name: {unnamed}"


FIELDS = {group: {f.name for f in dataclasses.fields(cls)} for group, cls in GROUPS.items()}


def test_every_spec_field_the_docs_name_exists():
    text = docs_text()
    dotted = re.findall(r"\b(model_args|data_args|training_args|extra_args)\.(\w+)", text)
    assert dotted and [f"{g}.{k}" for g, k in dotted if k not in FIELDS[g]] == []
    every_field = set().union(*FIELDS.values())
    # `key: value` spans, as a spec file writes them, and the first column of tables headed "Field".
    spans = re.findall(r"`([a-z][a-z0-9_]*): (?:\"[^\"`]*\"|[\w.+-]+)`", text)
    field_tables = re.findall(r"^\| Field \|.*?\n\|[-|]+\n((?:\|.*\n)+)", text, re.M)
    table_fields = [row.split("|")[1].strip().strip("`") for table in field_tables for row in table.splitlines()]
    assert spans and table_fields
    assert [name for name in spans + table_fields if name not in every_field] == []


def test_every_spec_field_is_named_in_the_docs():
    text = docs_text()
    assert [f"{g}.{name}" for g, names in FIELDS.items() for name in names
            if f"| `{g}` | `{name}` |" not in text] == []
