"""The spec of a pre-training run: four typed groups loaded from a YAML file, checked all at once.

    from specifications import load_spec
    spec = load_spec("specs.yaml", ["training_args.max_steps=20"])
    spec.training.max_steps  # 20

A spec file has the groups `model_args`, `data_args`, `training_args` and `extra_args`. Every problem found (unknown
key, wrong type, bad value, fields that contradict each other) is reported in one message: `SpecError`, which the
scripts print as one block and exit with status 2. What works but is unusual or has no effect here (a warm-up longer
than the run, a field kept only for older spec files) is no error: `spec.notes` holds it as one-line warnings, which
pre-training.py prints at the start of a run and in --dry-run. Spec files written for the original TeenyTinyLlama
scripts load unchanged: their spellings (`evaluation_strategy: "step"`, `torch_dtype: "bf16"`,
`low_cpu_mem_usage: null`) are normalized here.

The help text of every field is the one source of the field's documentation: `python specifications.py` prints
the table docs/spec.md carries, and `python specifications.py --write-specs` rewrites the shipped spec files
(`SHIPPED_SPECS`) with the help texts as their comments.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pretrain.errors import run_main
from pretrain.spec.documentation import (
    SHIPPED_SPECS,
    WRITE_SPECS,
    ShippedSpec,
    main,
    markdown_table,
    shipped_spec_texts,
    spec_yaml,
    write_specs,
)
from pretrain.spec.fields import (
    GROUPS,
    MASK,
    SECRET_FIELDS,
    DataTrainingArguments,
    ExtraArguments,
    ModelArguments,
    Spec,
    SpecError,
    TrainingArguments,
)
from pretrain.spec.loading import did_you_mean, load_spec, mask_secret_overrides, parse_cli

# The spec's types, loading and checks live in pretrain/spec/; this script is the user's entry to them.
__all__ = ["GROUPS", "MASK", "SECRET_FIELDS", "SHIPPED_SPECS", "WRITE_SPECS", "DataTrainingArguments",
           "ExtraArguments", "ModelArguments", "ShippedSpec", "Spec", "SpecError", "TrainingArguments", "did_you_mean",
           "load_spec", "main", "markdown_table", "mask_secret_overrides", "parse_cli", "shipped_spec_texts",
           "spec_yaml", "write_specs"]

if __name__ == "__main__":
    run_main(functools.partial(main, None, Path(__file__).resolve().parent))
