"""Loading a spec: read the YAML, apply dotted overrides, convert and check every field, report every problem
at once (`SpecError`), fill secrets from the environment; and the command line the training scripts share."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from pretrain.errors import InputError
from pretrain.spec.fields import (
    ALIASES,
    COSINE_MIN_LR_RATIO,
    DEFAULT_DECAY_FRACTION,
    GROUPS,
    MASK,
    POLYNOMIAL_LR_END,
    SECRET_FIELDS,
    TRACKERS,
    Spec,
    SpecError,
)


def load_spec(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (), *,
              environ: typing.Mapping[str, str] | None = None) -> Spec:
    """Read, merge, normalize and check a spec; raise SpecError listing every problem."""
    source = str(path) if path is not None else "the spec"
    raw = read_spec_file(path) if path is not None else {}
    problems: list[str] = []
    apply_overrides(raw, overrides, problems)
    groups = {}
    for group_name, cls in GROUPS.items():
        values = raw.pop(group_name, None) or {}
        if not isinstance(values, dict):
            problems.append(f"{group_name}: must be a mapping of keys to values, not {type(values).__name__}")
            values = {}
        groups[group_name] = build_group(group_name, cls, values, problems)
    for unknown in raw:
        problems.append(f"{unknown}: unknown group{did_you_mean(str(unknown), GROUPS)}")
    spec = Spec(groups["model_args"], groups["data_args"], groups["training_args"], groups["extra_args"])
    fill_secrets(spec, os.environ if environ is None else environ)
    refused, spec.notes = cross_checks(spec)
    problems.extend(refused)
    if problems:
        raise SpecError(source, problems)
    return spec


def read_spec_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spec file '{path}' does not exist; pass the path of a YAML spec such as specs.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise InputError(f"spec file '{path}' is not valid YAML{line}; fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"spec file '{path}' must be a mapping with the groups {', '.join(GROUPS)}, "
                         f"not a {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: typing.Sequence[str], problems: list[str]) -> None:
    """`group.key=value` pairs, values read as YAML scalars, written over the file's values."""
    for override in overrides:
        dotted, sep, text = override.partition("=")
        group_name, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            problems.append(f"override '{override}': write it as group.key=value, e.g. training_args.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        group = raw.setdefault(group_name, {})
        if isinstance(group, dict):
            group[key] = value


def build_group(group_name: str, cls, values: dict, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    accepted = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{group_name}.{key}: unknown key{suggest_key(str(key), group_name)}")
            continue
        ok, converted = convert(value, hints[key], fields[key], f"{group_name}.{key}", problems)
        if ok:
            accepted[key] = converted
    return cls(**accepted)


def convert(value, annotation, spec: dataclasses.Field, where: str, problems: list[str]):
    """Coerce one value to its field's type and check its choices and range; report and return (False, None) if bad."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    optional = union and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if union else annotation
    if value is None:
        if optional:
            return True, None
        if base is bool:  # older spec files write `null` for "off"
            return True, False
        problems.append(f"{where}: must not be null; give a {type_name(base)}")
        return False, None
    if base is str and value is False and "no" in (spec.metadata.get("choices") or ()):
        value = "no"  # YAML 1.1 reads an unquoted `no` as false
    converted = coerce(value, base)
    if converted is None:
        problems.append(f"{where}: expected {type_name(base)}, got {value!r}")
        return False, None
    meta = spec.metadata
    if isinstance(converted, str) and where.rsplit(".", 1)[-1] in ALIASES:
        converted = ALIASES[where.rsplit(".", 1)[-1]].get(converted.lower(), converted.lower())
    if meta.get("choices") and converted not in meta["choices"]:
        problems.append(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}"
                        f"{did_you_mean(str(value), meta['choices'])}")
        return False, None
    if meta.get("minimum") is not None and converted < meta["minimum"]:
        problems.append(f"{where}: must be at least {meta['minimum']}, got {value!r}")
        return False, None
    if meta.get("exclusive_minimum") is not None and converted <= meta["exclusive_minimum"]:
        problems.append(f"{where}: must be greater than {meta['exclusive_minimum']}, got {value!r}")
        return False, None
    return True, converted


def coerce(value, base):
    """The value as `base`, or None when it cannot honestly be read as one."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no"}:
            return value.lower() in {"true", "yes"}
        return None
    if base is int:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        number = as_float(value)
        return int(number) if number is not None and number.is_integer() else None
    if base is float:
        if isinstance(value, bool):
            return None
        number = as_float(value)
        return number if number is not None and math.isfinite(number) else None
    if base is str:
        return value if isinstance(value, str) else None
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
    if typing.get_origin(base) is dict:
        if not isinstance(value, dict) or not value:
            return None
        numbers = {str(key): as_float(number) if not isinstance(number, bool) else None
                   for key, number in value.items()}
        return numbers if all(n is not None and math.isfinite(n) for n in numbers.values()) else None
    return value


def as_float(value):
    # PyYAML reads `6e-4` (no dot) as a string, so numbers may arrive as text.
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def type_name(base) -> str:
    if typing.get_origin(base) is list:
        return "list of strings"
    if typing.get_origin(base) is dict:
        return "a mapping of folder to weight"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def suggest_key(key: str, group_name: str) -> str:
    """Point to the closest key in the same group, or to the group where the key really lives."""
    for other_name, cls in GROUPS.items():
        if other_name != group_name and key in {f.name for f in dataclasses.fields(cls)}:
            return f" (it belongs in {other_name})"
    return did_you_mean(key, [f.name for f in dataclasses.fields(GROUPS[group_name])])


def fill_secrets(spec: Spec, environ: typing.Mapping[str, str]) -> None:
    if not spec.training.hub_token and environ.get("HF_TOKEN"):
        spec.training.hub_token = environ["HF_TOKEN"]
    if not spec.extra.wandb_token and environ.get("WANDB_API_KEY"):
        spec.extra.wandb_token = environ["WANDB_API_KEY"]


def cross_checks(spec: Spec) -> tuple[list[str], list[str]]:
    """Checks that involve more than one field, or a field this code cannot honour: (problems, notes).

    A problem is what cannot work (the run would crash, or could not do what the spec asks), and stops the run; a
    note is what works but is unusual or has no effect, and is printed at the start of the run and by --dry-run.
    """
    m, d, t, e = spec.model, spec.data, spec.training, spec.extra
    problems, notes = [], []
    if m.hidden_size % m.num_attention_heads:
        problems.append(f"model_args.hidden_size ({m.hidden_size}) must be divisible by "
                        f"model_args.num_attention_heads ({m.num_attention_heads})")
    if m.num_attention_heads % m.num_key_value_heads:
        problems.append(f"model_args.num_attention_heads ({m.num_attention_heads}) must be divisible by "
                        f"model_args.num_key_value_heads ({m.num_key_value_heads})")
    if d.block_size > m.max_position_embeddings:
        # Rotary positions have no table to run past, so this trains; but the saved config claims less context.
        notes.append(f"warning: data_args.block_size ({d.block_size}) is above model_args.max_position_embeddings "
                     f"({m.max_position_embeddings}): the model trains on longer sequences than its config says it "
                     f"handles; raise max_position_embeddings to block_size")
    if d.mixture is not None:
        problems += [f"data_args.mixture: the weight of '{folder}' must be greater than 0, got {weight:g}"
                     for folder, weight in d.mixture.items() if weight <= 0]
    if not t.do_train and not t.do_eval:
        problems.append("training_args.do_train and training_args.do_eval are both false: nothing to do")
    if t.do_eval and t.evaluation_strategy == "steps" and not t.eval_steps:
        problems.append("training_args.do_eval with evaluation_strategy 'steps' needs training_args.eval_steps "
                        "(or set evaluation_strategy: no to evaluate only at the end)")
    if t.early_stopping_patience is not None:
        problems += early_stopping_problems(t)
    if t.lr_scheduler_type == "polynomial" and t.learning_rate <= POLYNOMIAL_LR_END:
        problems.append(f"training_args.learning_rate ({t.learning_rate:g}) must be above {POLYNOMIAL_LR_END:g}, the "
                        f"rate the polynomial schedule decays to; raise it or choose another lr_scheduler_type")
    elif t.lr_scheduler_type == "constant" and t.warmup_steps:
        notes.append(f"warning: training_args.lr_scheduler_type 'constant' has no warm-up, so warmup_steps "
                     f"({t.warmup_steps}) is not used; choose constant_with_warmup to warm up")
    problems += schedule_problems(t, t.max_steps)
    notes += schedule_notes(t)
    if t.push_to_hub and not t.hub_model_id:
        problems.append("training_args.push_to_hub needs training_args.hub_model_id (user/name)")
    if not m.train_from_scratch and not m.model_to_train:
        problems.append("model_args.train_from_scratch is false but model_args.model_to_train is not set: "
                        "name the model to continue training")
    if e.sample_every and not e.generation_seeds:
        problems.append("extra_args.sample_every is set but extra_args.generation_seeds is empty")
    if e.eval_tasks and not t.do_eval:
        problems.append("extra_args.eval_tasks run with the evaluations, but training_args.do_eval is false: set "
                        "do_eval true or drop eval_tasks")
    elif not e.eval_tasks and (e.eval_task_limit is not None or e.eval_include_path is not None):
        notes.append("note: extra_args.eval_task_limit and eval_include_path have no effect without "
                     "extra_args.eval_tasks")
    problems += [f"extra_args.report_to: {name!r} is not one of {', '.join(TRACKERS)}{did_you_mean(name, TRACKERS)}"
                 for name in e.report_to or [] if name not in TRACKERS]
    if e.report_to and not e.with_tracking:
        notes.append("note: extra_args.report_to has no effect while extra_args.with_tracking is false")
    if t.adam_beta1 >= 1 or t.adam_beta2 >= 1:
        problems.append("training_args.adam_beta1 and adam_beta2 must be below 1")
    # Accepted so that older spec files load, but nothing here can act on them.
    if m.low_cpu_mem_usage:
        notes.append("note: model_args.low_cpu_mem_usage has no effect: transformers 5 always loads a pretrained "
                     "model without a full extra copy in CPU memory")
    if d.overwrite_cache:
        notes.append("note: data_args.overwrite_cache has no effect: the tokenized folder is read in place, so there "
                     "is no cache to overwrite")
    if d.preprocessing_num_workers is not None:
        notes.append("note: data_args.preprocessing_num_workers has no effect: each training process reads the "
                     "tokenized folder with one background thread, and tokenizing is done beforehand by "
                     "Utilities/tokenize-dataset.py (its --num-proc)")
    return problems, notes


def decay_steps_of(t, max_steps: int) -> int:
    """The last optimizer steps of a warmup_stable_decay run of `max_steps` steps, over which its rate decays."""
    return t.decay_steps if t.decay_steps is not None else max(1, round(max_steps * DEFAULT_DECAY_FRACTION))


def min_lr_ratio_of(t) -> float:
    """The final rate as a fraction of learning_rate; null keeps each schedule's former floor (cosine_with_min_lr
    ended at a tenth of the peak before the field existed)."""
    if t.min_lr_ratio is not None:
        return t.min_lr_ratio
    return COSINE_MIN_LR_RATIO if t.lr_scheduler_type == "cosine_with_min_lr" else 0.0


def schedule_problems(t, max_steps: int | None) -> list[str]:
    """What makes the schedule impossible; the phases of warmup_stable_decay are checked once `max_steps` is known
    (at set-up when the run is counted in epochs)."""
    problems = []
    if t.min_lr_ratio is not None and t.min_lr_ratio > 1:
        problems.append(f"training_args.min_lr_ratio ({t.min_lr_ratio:g}) must be at most 1: it is the final rate "
                        f"as a fraction of learning_rate")
    if t.lr_scheduler_type == "warmup_stable_decay" and max_steps is not None:
        decay = decay_steps_of(t, max_steps)
        if t.warmup_steps + decay > max_steps:
            share = "" if t.decay_steps is not None else ", 20% of the run"
            problems.append(f"training_args.warmup_steps ({t.warmup_steps}) and decay_steps ({decay}{share}) add up "
                            f"to more than the run's {max_steps} optimizer steps: warmup_stable_decay warms up, holds, "
                            f"then decays over the last decay_steps; lower warmup_steps or decay_steps, or raise "
                            f"max_steps")
    return problems


def early_stopping_problems(t) -> list[str]:
    """Early stopping counts the evaluations made during the run: a run without any cannot honour it."""
    if not t.do_train:
        return ["training_args.early_stopping_patience is set but training_args.do_train is false: there is no "
                "training to stop; drop early_stopping_patience"]
    if not t.do_eval or t.evaluation_strategy != "steps":
        return ["training_args.early_stopping_patience needs evaluations during the run: set do_eval true and "
                "evaluation_strategy steps (with eval_steps), or drop early_stopping_patience"]
    if t.eval_steps and t.max_steps is not None and t.eval_steps >= t.max_steps:
        return [f"training_args.early_stopping_patience needs evaluations during the run, but eval_steps "
                f"({t.eval_steps}) is not below max_steps ({t.max_steps}): lower eval_steps or drop "
                f"early_stopping_patience"]
    return []


def schedule_notes(t) -> list[str]:
    wsd = t.lr_scheduler_type == "warmup_stable_decay"
    unused = [name for name, value in (("decay_steps", t.decay_steps), ("min_lr_ratio", t.min_lr_ratio))
              if value is not None and not wsd and not (name == "min_lr_ratio"
                                                        and t.lr_scheduler_type == "cosine_with_min_lr")]
    return [f"note: training_args.{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with "
            f"lr_scheduler_type '{t.lr_scheduler_type}'"] if unused else []


def parse_cli(argv: typing.Sequence[str] | None, description: str):
    """Parse `--spec-file S [--dry-run] [group.key=value ...]` for a script; return (spec, args)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec-file", "--spec_file", dest="spec_file", default="specs.yaml",
                        help="YAML spec file (default: specs.yaml)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="check the spec, print it and the plan, and exit without reading data or writing")
    parser.add_argument("overrides", nargs="*", metavar="group.key=value",
                        help="values that override the spec file, e.g. training_args.max_steps=20")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec_file, args.overrides)
    if argv is None:
        # Libraries record the command line (W&B keeps it in the run's metadata): a token given as an override
        # must not travel with it.
        sys.argv[1:] = mask_secret_overrides(sys.argv[1:])
    return spec, args


def mask_secret_overrides(arguments: typing.Sequence[str]) -> list[str]:
    """The arguments with the value of every `group.<secret field>=value` override replaced by the mask."""
    masked = []
    for argument in arguments:
        dotted, sep, _ = argument.partition("=")
        secret = sep and dotted.strip().rpartition(".")[2] in SECRET_FIELDS
        masked.append(f"{dotted}={MASK}" if secret else argument)
    return masked
