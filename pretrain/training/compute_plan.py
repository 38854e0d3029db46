"""What a run will cost and what its size and token count buy, by Hoffmann et al. (2022)'s fitted law.

    plan = plan_for_spec(spec, num_processes=8)           # or ComputePlan(parameters, tokens, flops_per_token)
    print("\n".join(plan_lines(plan)))                    # FLOPs, tokens per parameter, compute-optimal N and D
    print("\n".join(result_lines(plan, state, eval_loss, machines)))   # at the end of a run: plan beside result

The law is L(N, D) = E + A/N^α + B/D^β in nats per token, N counting every parameter (embeddings included) and
D the training tokens; its compute budget is C = 6·N·D. Training FLOPs are counted as MFU counts them
(pretrain/training/telemetry.py: 6N + 12·L·d·T per token). The command line of Utilities/chinchilla-estimation.py is
`main()` here.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import SimpleNamespace

from pretrain.errors import InputError
from pretrain.model.build import llama_config, tokens_per_step
from pretrain.training import telemetry

# Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models": the fit of their approach 3.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
LAW = f"L(N, D) = {E} + {A}/N^{ALPHA} + {B}/D^{BETA}"
LAW_CAVEAT = ("the law's constants were fitted to Hoffmann et al.'s models, their MassiveText data and their "
              "tokenizer, not ours: read its losses as a trend, not as a target for ours")
# The range of the models and data the law was fitted on (about 400 runs): outside it a prediction is an
# extrapolation the paper does not support, and at a few hundred thousand parameters it is off by orders of magnitude.
FIT_PARAMETERS, FIT_TOKENS = (70e6, 16e9), (5e9, 500e9)
# Only the ids matter to llama_config here, not their values: a spec alone has no tokenizer.
SPECIAL_IDS = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=3)


def sci(value: float) -> str:
    """A count in three significant digits, its exponent without padding: 7.45e18, 1.46e6, 512."""
    mantissa, _, exponent = f"{value:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def chinchilla_loss(parameters: float, tokens: float) -> float:
    """The law's loss, in nats per token, for N parameters trained on D tokens."""
    return E + A / parameters ** ALPHA + B / tokens ** BETA


def outside_fit(parameters: float, tokens: float | None) -> str | None:
    """Why the law cannot be read for N parameters on D tokens (None: both lie in the range it was fitted on)."""
    low_n, high_n = FIT_PARAMETERS
    low_d, high_d = FIT_TOKENS
    if low_n <= parameters <= high_n and (tokens is None or low_d <= tokens <= high_d):
        return None
    return (f"no prediction: Hoffmann et al. fitted their law on models of {sci(low_n)} to {sci(high_n)} parameters "
            f"and {sci(low_d)} to {sci(high_d)} tokens, and this run ({sci(parameters)} parameters"
            + (f", {sci(tokens)} tokens" if tokens is not None else "") + ") lies outside that range")


def compute_optimal(flops: float) -> tuple[float, float]:
    """(N, D) that minimize the law's loss for a budget of C = 6·N·D FLOPs (the closed form of the paper)."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    parameters = g * (flops / 6) ** (BETA / (ALPHA + BETA))
    return parameters, flops / (6 * parameters)


def compute_optimal_tokens(parameters: float) -> float:
    """The tokens D for which a model of N parameters is the compute-optimal size of its budget 6·N·D."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    return (parameters / g) ** ((ALPHA + BETA) / BETA) / parameters


@dataclass
class ComputePlan:
    """A run's size and length, and (when given) its throughput and GPU power, for the estimates."""
    parameters: int
    tokens: int | None                       # None: the run's length is set by the data (epochs)
    flops_per_token: int
    attention_counted: bool = True            # False when only N is known: FLOPs are 6N per token
    tokens_per_second: float | None = None    # all devices together
    gpu_watts: float | None = None            # one GPU's board power
    gpus: int = 1
    # Passes over each train split by name, with its train tokens; or why they are unknown (no manifest yet).
    passes: dict[str, tuple[float, int]] | str | None = None

    @property
    def hours(self) -> float | None:
        if self.tokens is None or not self.tokens_per_second:
            return None
        return self.tokens / self.tokens_per_second / 3600

    @property
    def gpu_kwh(self) -> float | None:
        if self.hours is None or self.gpu_watts is None:
            return None
        return self.gpu_watts * self.gpus * self.hours / 1000


def plan_for_config(config, block_size: int, tokens: int | None, **throughput) -> ComputePlan:
    """The plan of a Llama-shaped model given its config (N and FLOPs as pretrain/training/telemetry.py counts them)."""
    return ComputePlan(parameters=telemetry.parameter_count(config), tokens=tokens,
                       flops_per_token=telemetry.flops_per_token(config, block_size), **throughput)


def plan_for_spec(spec, num_processes: int, tokens: int | None = None, **throughput) -> ComputePlan:
    """The plan of a spec on `num_processes` devices: its tokens are `tokens`, or max_steps' worth of steps."""
    if tokens is None and spec.training.max_steps is not None:
        tokens = spec.training.max_steps * tokens_per_step(spec, num_processes)
    config = llama_config(spec, SPECIAL_IDS, spec.model.vocab_size)
    plan = plan_for_config(config, spec.data.block_size, tokens, **throughput)
    plan.passes = spec_passes(spec, tokens)
    return plan


def plan_lines(plan: ComputePlan) -> list[str]:
    """The plan as the lines Utilities/chinchilla-estimation.py and `pre-training.py --dry-run` print."""
    n, d = plan.parameters, plan.tokens
    per_token = ("6N + 12·L·d·T per token, as MFU counts them" if plan.attention_counted else
                 "6N per token; the 12·L·d·T attention term needs the model's shape: give a spec")
    optimal_d = compute_optimal_tokens(n)
    lines = [f"parameters (N): {n:,}"]
    if d is None:
        lines.append("tokens (D): set by the data (num_train_epochs); set training_args.max_steps (or the "
                     "estimator's --tokens) for the FLOPs, the law's loss and the time")
    else:
        lines += [f"tokens (D): {d:,} ({d / n:.1f} tokens per parameter)",
                  f"training FLOPs: {sci(d * plan.flops_per_token)} ({plan.flops_per_token:,} = {per_token})"]
    if isinstance(plan.passes, str):
        lines.append(f"passes (epochs) over the train split: {plan.passes}")
    elif plan.passes:
        lines += passes_lines(plan.passes)
    lines.append(f"Hoffmann et al. (2022): {LAW}, in nats per token (perplexity = e^L)")
    if reason := outside_fit(n, d):
        lines.append(f"  {reason}")
    else:
        lines.append(f"  compute-optimal tokens for this size: {sci(optimal_d)} ({optimal_d / n:.1f} per parameter)")
    if d is not None and not reason:
        budget = 6 * n * d
        best_n, best_d = compute_optimal(budget)
        loss, best_loss = chinchilla_loss(n, d), chinchilla_loss(best_n, best_d)
        lines += [f"  predicted loss for this N and D: {loss:.3f} (perplexity {math.exp(loss):.1f})",
                  f"  compute-optimal size for this budget (6·N·D = {sci(budget)} FLOPs): {best_n:,.0f} parameters "
                  f"on {sci(best_d)} tokens, loss {best_loss:.3f} (perplexity {math.exp(best_loss):.1f})"]
    lines.append(f"  {LAW_CAVEAT}")
    if plan.hours is not None:
        lines.append(f"wall-clock: {plan.hours:,.2f} hours at {plan.tokens_per_second:,.0f} tokens/s")
    if plan.gpu_kwh is not None:
        lines.append(f"energy: {plan.gpu_kwh:,.2f} kWh for {plan.gpus} GPU(s) at {plan.gpu_watts:g} W (the GPUs "
                     f"alone; what a run measures adds the CPU and RAM)")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Passes over the data

# Muennighoff et al. (2023), "Scaling Data-Constrained Language Models": up to about this many passes over the same
# data are worth nearly as much as fresh data; past it each further pass is worth quickly less.
USEFUL_PASSES = 4
DATA_CONSTRAINED = ('Muennighoff et al. (2023, "Scaling Data-Constrained Language Models") found that up to about '
                    f"{USEFUL_PASSES} passes over the same data are worth nearly as much as fresh data, and that the "
                    f"returns fall off quickly after that")


def data_passes(names: list[str], blocks: list[int], weights: list[float], block_size: int, tokens: int | None,
                epochs: float | None = None) -> dict[str, tuple[float, int]]:
    """{name: (passes, train tokens)} for each train split of `blocks` blocks that `tokens` training tokens make,
    drawn by `weights` (one folder: [1]); `epochs` epochs of them all when `tokens` is None."""
    total = sum(blocks)
    samples = tokens / block_size if tokens is not None else epochs * total
    return {name: (samples * weight / sum(weights) / count, count * block_size)
            for name, count, weight in zip(names, blocks, weights)}


def spec_passes(spec, tokens: int | None) -> dict[str, tuple[float, int]] | str:
    """The passes a spec's run makes over its train splits, counted from their manifests (no data read); the reason
    when a folder has no manifest to count from."""
    from pathlib import Path

    from pretrain.data.manifest import read_manifest
    from pretrain.data.mixture import source_names
    from pretrain.data.tokenized_folder import SANITY_BLOCKS

    d = spec.data
    folders = list(d.mixture) if d.mixture is not None else [d.folder_path]
    blocks = []
    for folder in folders:
        manifest = read_manifest(folder) if Path(folder).is_dir() else None
        if manifest is None:
            return f"not counted ('{folder}' has no manifest.json: it is not tokenized yet)"
        count = int(manifest["splits"]["train"]["blocks"])
        blocks.append(min(count, SANITY_BLOCKS["train"]) if d.sanity_check else count)
    names = source_names(folders) if d.mixture is not None else [Path(d.folder_path).name]
    weights = list(d.mixture.values()) if d.mixture is not None else [1.0]
    return data_passes(names, blocks, weights, d.block_size, tokens, spec.training.num_train_epochs)


def passes_lines(passes: dict[str, tuple[float, int]]) -> list[str]:
    """The passes over each train split, and a warning when one is read more than USEFUL_PASSES times."""
    if len(passes) == 1:
        (count, tokens), = passes.values()
        lines = [f"passes (epochs) over the train split: {count:.2f} of its {tokens:,} tokens"]
    else:
        lines = ["passes (epochs) over each train split: " + ", ".join(
            f"{name} {count:.2f} of {tokens:,} tokens" for name, (count, tokens) in passes.items())]
    many = {name: value for name, value in passes.items() if value[0] > USEFUL_PASSES}
    if many:
        which = ", ".join(f"{count:.1f} passes over {name}'s {tokens:,} tokens"
                          for name, (count, tokens) in many.items())
        lines.append(f"warning: the run reads its data more than {USEFUL_PASSES} times ({which}); "
                     f"{DATA_CONSTRAINED}: more text, fewer steps or a smaller model use the compute better, and "
                     f"training_args.early_stopping_patience keeps the best checkpoint and stops once the eval loss "
                     f"no longer falls")
    return lines


def result_lines(plan: ComputePlan, state, eval_loss: float | None, machines: int | None) -> list[str]:
    """What a run did beside its plan: tokens, hours, energy, the final eval loss beside the law's prediction.

    `machines`: how many machines measured energy this run (None: energy tracking is off).
    """
    planned = f", {plan.tokens:,} planned" if plan.tokens is not None else ""
    optimal = ("" if outside_fit(plan.parameters, None) else
               f"; compute-optimal for this size: {sci(compute_optimal_tokens(plan.parameters))}")
    lines = ["# plan and result",
             f"tokens: {state.tokens_seen:,} trained{planned} ({state.tokens_seen / plan.parameters:.2f} per "
             f"parameter{optimal})",
             f"time: {state.run_seconds / 3600:.4g} hours of wall-clock (start-up, evaluation and checkpoints "
             f"included), every run of this training included"]
    if machines is None:
        lines.append("energy: not measured (extra_args.track_energy is false)")
    elif machines == 0 and not state.energy_kwh:
        lines.append("energy: not measured (no machine could start its tracker; see the warnings above)")
    else:
        lines.append(f"energy: {state.energy_kwh:.6g} kWh, {state.co2_kg:.6g} kg CO2eq (CodeCarbon, {machines} "
                     f"machine(s) this run, every run of this training included)")
    if eval_loss is None:
        lines.append("final eval loss: not measured (training_args.do_eval is false)")
    elif state.tokens_seen and (reason := outside_fit(plan.parameters, state.tokens_seen)):
        lines.append(f"final eval loss: {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}); {reason}")
    elif state.tokens_seen:
        law = chinchilla_loss(plan.parameters, state.tokens_seen)
        lines.append(f"final eval loss: {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}); the law predicts "
                     f"{law:.3f} (perplexity {math.exp(law):.4g}) for this N and D, but {LAW_CAVEAT}")
    else:
        lines.append(f"final eval loss: {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}); no tokens trained, "
                     f"so no prediction from the law")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Utilities/chinchilla-estimation.py

def positive_number(text: str) -> float:
    try:
        value = float(text.replace("_", "").replace(",", ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number (e.g. 460e6), not '{text}'")
    return value


def positive_integer(text: str) -> int:
    value = positive_number(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, not '{text}'")
    return int(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training FLOPs, tokens per parameter, the compute-optimal size "
                                                 "and token count by Hoffmann et al. (2022), time and energy.")
    parser.add_argument("--spec-file", "--spec_file", dest="spec_file",
                        help="spec whose model and steps to plan (e.g. specs.yaml)")
    parser.add_argument("--parameters", type=positive_integer, help="parameters N, instead of a spec (e.g. 460e6)")
    parser.add_argument("--tokens", type=positive_integer,
                        help="training tokens D (default with a spec: max_steps x tokens per step)")
    parser.add_argument("--gpus", type=positive_integer, default=1,
                        help="GPUs training together: the processes of the run (default: 1)")
    parser.add_argument("--tokens-per-second", type=positive_number,
                        help="throughput of all GPUs together, as metrics.jsonl logs it: gives the wall-clock time")
    parser.add_argument("--gpu-watts", type=positive_number,
                        help="power of one GPU (its board power, e.g. 700 for an H100 SXM): gives the energy")
    parser.add_argument("overrides", nargs="*", metavar="group.key=value",
                        help="values that override the spec file, e.g. training_args.max_steps=20000")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if (args.spec_file is None) == (args.parameters is None):
        raise InputError("give either --spec-file (a spec to plan) or --parameters (with --tokens), not "
                         f"{'both' if args.spec_file else 'neither'}")
    if args.overrides and args.spec_file is None:
        raise InputError(f"overrides such as '{args.overrides[0]}' need --spec-file; with --parameters give "
                         f"--tokens instead")
    if args.gpu_watts is not None and args.tokens_per_second is None:
        raise InputError("--gpu-watts needs --tokens-per-second too: the energy is power times the time the "
                         "tokens take")
    throughput = dict(tokens_per_second=args.tokens_per_second, gpu_watts=args.gpu_watts, gpus=args.gpus)
    if args.spec_file is not None:
        from pretrain.spec.loading import load_spec

        spec = load_spec(args.spec_file, args.overrides)
        if args.tokens is None and spec.training.max_steps is None:
            raise InputError(f"{args.spec_file} has no training_args.max_steps (it trains num_train_epochs "
                             f"epochs of its data); pass --tokens, or set training_args.max_steps=N")
        plan = plan_for_spec(spec, args.gpus, args.tokens, **throughput)
    else:
        if args.tokens is None:
            raise InputError("--parameters needs --tokens (e.g. --tokens 9.3e9)")
        plan = ComputePlan(parameters=args.parameters, tokens=args.tokens, flops_per_token=6 * args.parameters,
                           attention_counted=False, **throughput)
    print("\n".join(plan_lines(plan)))
