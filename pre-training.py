"""Pre-train a Llama language model on tokenized parquet folders, on one process or many.

    python pre-training.py --spec-file specs.yaml                       # one GPU (or the CPU)
    python pre-training.py --spec-file specs.yaml --dry-run             # check the spec, print the plan, exit
    python pre-training.py --spec-file specs.yaml training_args.max_steps=20 data_args.folder_path=/data/x
    accelerate launch --num_processes=4 pre-training.py --spec-file specs.yaml   # several GPUs

Reads `data_args.folder_path`/train and /test (written by Utilities/tokenize-dataset.py), or the folders of
`data_args.mixture` by weight, trains with AdamW and a warm-up schedule counted in optimizer steps, evaluates
perplexity over the whole test split, samples text, writes resumable checkpoints to `output_dir/step_N/` and
`output_dir/final-checkpoint/`, and logs every `wandb_log_steps` steps to `output_dir/metrics.jsonl` (and to W&B
when enabled). The loop is pretrain/training/loop.py.
"""

from pretrain.errors import run_main
from specifications import parse_cli


def main(argv=None):
    spec, args = parse_cli(argv, description=__doc__.split("\n")[0])
    # Imported once the command line is read: torch and transformers take seconds, which --help and a spec
    # refused for a typo do without.
    from pretrain.training import loop as training

    if args.dry_run:
        training.print_dry_run(spec)
        return
    run, sources, max_steps = training.setup(spec)
    if spec.training.do_train:
        training.fit(run, sources, max_steps)
    training.finish(run, sources)


if __name__ == "__main__":
    run_main(main)
