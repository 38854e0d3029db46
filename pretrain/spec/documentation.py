"""The spec written out for people: the Markdown field table of docs/spec.md and the shipped spec files, whose
comments are the fields' help texts (`python specifications.py --write-specs`)."""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from pretrain.errors import InputError
from pretrain.spec.fields import GROUPS, SECRET_FIELDS, Spec
from pretrain.spec.loading import load_spec


def yaml_scalar(value, *, quote_strings: bool = True) -> str:
    """A value as YAML writes it on one line; strings double-quoted unless asked otherwise."""
    style = '"' if quote_strings and isinstance(value, str) else None
    text = yaml.safe_dump(value, default_style=style, allow_unicode=True, width=math.inf)
    return text.strip().removesuffix("\n...")


def markdown_table() -> str:
    """Every spec field with its default and help text, as the Markdown table docs/spec.md carries."""
    lines = ["| Group | Field | Default | Meaning |", "|---|---|---|---|"]
    for group_name, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "…" if isinstance(default, list) else yaml_scalar(default, quote_strings=False)
            lines.append(f"| `{group_name}` | `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(lines)


COMMENT_WIDTH = 118


def comment_lines(text: str, indent: str = "") -> list[str]:
    """`text` as YAML comment lines of at most COMMENT_WIDTH characters; a line that opens with spaces keeps them
    on every line it wraps to, and an empty line stays a bare `#`."""
    lines = []
    for paragraph in text.split("\n"):
        lead = paragraph[:len(paragraph) - len(paragraph.lstrip())]
        wrapped = textwrap.wrap(paragraph, COMMENT_WIDTH - len(indent) - 2, subsequent_indent=lead,
                                break_long_words=False, break_on_hyphens=False)
        lines += [f"{indent}# {line}" for line in wrapped] or [f"{indent}#"]
    return lines


def spec_yaml(spec: Spec, header: str) -> str:
    """A spec file for `spec`: `header` as its opening comment, then every field of every group in order, each
    under its help text."""
    lines = comment_lines(header) + [""]
    for group_name, group in spec.groups().items():
        lines.append(f"{group_name}:")
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            lines += comment_lines(f.metadata["help"], "  ")
            if isinstance(value, list) and value:
                lines += [f"  {f.name}:"] + [f"    - {yaml_scalar(item)}" for item in value]
            elif isinstance(value, dict):
                lines += [f"  {f.name}:"] + [f"    {yaml_scalar(k)}: {yaml_scalar(v)}" for k, v in value.items()]
            else:
                lines.append(f"  {f.name}: {yaml_scalar(value)}")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


@dataclass(frozen=True)
class ShippedSpec:
    """A spec file shipped beside this module: what it is, and the `group.key=value` changes that make it from
    specs.yaml (none for specs.yaml itself)."""
    about: str
    changes: tuple[str, ...] = ()


SHIPPED_SPECS = {
    "specs.yaml": ShippedSpec(
        "TeenyTinyLlama-160m: 162,417,408 parameters at a 32,000-token vocabulary, 2048-token context.\n"
        "Single-GPU defaults, 131,072 tokens per optimizer step (8 x 8 x 2048); see docs/distributed.md for what to "
        "change for several GPUs or nodes."),
    "specs-460m.yaml": ShippedSpec(
        "TeenyTinyLlama-460m: 468,239,360 parameters at a 32,000-token vocabulary, 2048-token context.\n"
        "The 160M model of specs.yaml widened and deepened, with half its learning rate (wider models want smaller "
        "steps); single-GPU defaults, the same 131,072 tokens per optimizer step.",
        ("model_args.model_id=TeenyTinyLlama-460m", "model_args.hidden_size=1024", "model_args.intermediate_size=4096",
         "model_args.num_attention_heads=16", "model_args.num_hidden_layers=24", "model_args.num_key_value_heads=16",
         "training_args.output_dir=runs/TeenyTinyLlama-460m", "training_args.learning_rate=3.0e-4")),
    "specs-tiny.yaml": ShippedSpec(
        "A tiny Llama (623,232 parameters at a 512-token vocabulary) that trains in under a minute on a laptop CPU, "
        "1,024 tokens per optimizer step.\n"
        "It is what quickstart.py runs on the embedded Portuguese sample: the tokenizer and tokenized folder "
        "quickstart.py writes, a 300-step run with a learning rate to match the small model (evaluating, "
        "checkpointing and sampling every 100 steps), no torch.compile (compiling takes longer on the CPU than the "
        "whole run) and no bf16 autocast (slow on most CPUs).",
        ("model_args.tokenizer_name=quickstart-output/tokenizer", "model_args.model_id=TeenyTinyLlama-tiny",
         "model_args.vocab_size=512", "model_args.hidden_size=128", "model_args.intermediate_size=512",
         "model_args.max_position_embeddings=128", "model_args.num_attention_heads=4",
         "model_args.num_hidden_layers=2", "model_args.num_key_value_heads=2",
         "data_args.dataset_name=data/sample/pt-sample.jsonl", "data_args.folder_path=quickstart-output/tokenized",
         "data_args.block_size=128", "training_args.output_dir=quickstart-output/model",
         "training_args.eval_steps=100", "training_args.gradient_accumulation_steps=1",
         "training_args.learning_rate=3.0e-3", "training_args.warmup_steps=30", "training_args.max_steps=300",
         "training_args.compile_model=false", "extra_args.mixed_precision=no", "extra_args.checkpointing_steps=100",
         "extra_args.sample_every=100")),
}
WRITE_SPECS = "python specifications.py --write-specs"


def shipped_spec_header(name: str, shipped: ShippedSpec) -> str:
    """The opening comment of a shipped spec file: what it is, how to run it, and how it is written."""
    run = f"Run: python pre-training.py --spec-file {name} [group.key=value ...]   (add --dry-run to only check it)"
    if not shipped.changes:
        made_from = [f"`{WRITE_SPECS}` writes this file and the spec files made from it "
                     f"({', '.join(other for other in SHIPPED_SPECS if other != name)}) from this file's values, with "
                     f"the help texts in pretrain/spec/fields.py as the comments: run it after changing a value here."]
    else:
        made_from = ["It is specs.yaml with these fields changed, the same as giving specs.yaml these overrides:",
                     "  " + " ".join(shlex.quote(change) for change in shipped.changes),
                     f"`{WRITE_SPECS}` writes it from specs.yaml and these changes (SHIPPED_SPECS in "
                     f"pretrain/spec/documentation.py), with the help texts of pretrain/spec/fields.py as the "
                     f"comments."]
    return "\n".join([shipped.about, run, "", *made_from])


def shipped_spec_texts(folder: str | os.PathLike) -> dict[str, str]:
    """The text of every shipped spec file, made from `folder`/specs.yaml's values and each file's changes."""
    base = Path(folder) / "specs.yaml"
    texts = {}
    for name, shipped in SHIPPED_SPECS.items():
        # No environment: a token there must never end up in a file.
        spec = load_spec(base, shipped.changes, environ={})
        held = [f"{group_name}.{key}" for group_name, values in spec.to_dict(mask_secrets=False).items()
                for key in SECRET_FIELDS if values.get(key)]
        if held:
            raise InputError(f"{base} holds a secret ({', '.join(held)}), which would be copied into every shipped "
                             f"spec file; set it to null and give it as {' or '.join(SECRET_FIELDS.values())} instead")
        texts[name] = spec_yaml(spec, shipped_spec_header(name, shipped))
    return texts


def write_specs(folder: str | os.PathLike) -> list[Path]:
    """Write every shipped spec file into `folder`; nothing is written unless all of them could be made."""
    written = []
    for name, text in shipped_spec_texts(folder).items():
        path = Path(folder) / name
        staging = path.with_name(f".{name}.tmp")
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
        written.append(path)
    return written


def main(argv: typing.Sequence[str] | None = None, folder: str | os.PathLike = ".") -> None:
    """`python specifications.py [--write-specs]`; the shipped spec files are the ones in `folder`, beside the
    specifications.py that was run."""
    import argparse

    parser = argparse.ArgumentParser(description="Print the spec field table docs/spec.md carries, or rewrite the "
                                                 "shipped spec files from specs.yaml's values and the help texts.")
    parser.add_argument("--write-specs", action="store_true",
                        help=f"rewrite {', '.join(SHIPPED_SPECS)} (their comments are the help texts)")
    args = parser.parse_args(argv)
    if not args.write_specs:
        print(markdown_table())
        return
    for path in write_specs(folder):
        print(f"wrote {path}")
