"""The training loop: set-up (every check on bad input before any training), the loop itself, evaluation and
samples during it, and the end of a run (final evaluation, checkpoint, plot, push).

    run, sources, max_steps = setup(spec)
    fit(run, sources, max_steps)
    finish(run, sources)

Reads `data_args.folder_path`/train and /test (written by Utilities/tokenize-dataset.py), or every folder of
`data_args.mixture` (one pretrain.data.mixture.Source each, drawn from by weight), trains with AdamW (or Muon) and a
warm-up schedule counted in optimizer steps, evaluates perplexity over the whole test split, samples text, writes
resumable checkpoints to `output_dir/step_N/` and `output_dir/final-checkpoint/`, and logs every
`wandb_log_steps` steps to `output_dir/metrics.jsonl` (and to the trackers of tracking.py: W&B, TensorBoard).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.data.manifest import sha256_file
from pretrain.errors import InputError
from pretrain.evaluation.harness import benchmarks_in_training, check_training_tasks, plot_with_benchmarks
from pretrain.evaluation.perplexity import evaluate, loss_result
from pretrain.export.model_card import hardware_description, write_model_card
from pretrain.hub import open_model_repo
from pretrain.model.build import (
    build_model,
    count_parameters,
    llama_config,
    load_tokenizer,
    prepare_model,
    reconcile_vocab_size,
    tokens_per_step,
)
from pretrain.model.document_attention import document_layout
from pretrain.model.loss import causal_lm_loss
from pretrain.model.optimizer import align_schedule, build_optimizer, build_scheduler, schedule_line, warmup_note
from pretrain.training import best_checkpoint, compute_plan, telemetry, tracking
from pretrain.training.checkpoints import (
    check_free_space,
    latest_checkpoint,
    load_resumable_state,
    read_train_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
    truncate_metrics,
)
from pretrain.training.energy import start_energy_meter
from pretrain.training.faults import SpikeWindow, StopSignals, agree_on_step, apply_step, skip_step, stop_for_signal
from pretrain.training.resuming import batch_change_note, branch_record, carry_history, check_resume_fits, is_branch
from pretrain.training.state import Run, TrainState

if TYPE_CHECKING:
    from pretrain.spec.fields import Spec

RECENT_LOSSES = 20


# ----------------------------------------------------------------------------------------------------------------
# Set-up: everything that can fail on bad input fails here, before any training.

def setup(spec: Spec):
    """Check every input, build the model, optimizer and schedule, resume if asked: (run, sources, max_steps)."""
    import torch
    from accelerate.utils import DistributedType, set_seed


    trackers = tracking.chosen_trackers(spec)
    accelerator = make_accelerator(spec, trackers)
    say = accelerator.print
    for note in spec.notes:
        say(note)
    # Every input is checked before anything is written, so a refused run leaves nothing behind, not even output_dir.
    tokenizer = refuse_together(accelerator, lambda: load_tokenizer(spec))
    vocab_size = reconcile_vocab_size(spec, len(tokenizer), say)
    sources = refuse_together(accelerator, lambda: open_data(spec, tokenizer, vocab_size))
    refuse_together(accelerator, lambda: check_training_tasks(spec, accelerator))  # benchmark tasks, their data
    output_dir, resume = Path(spec.training.output_dir), spec.training.resume_from_checkpoint
    resume_from = refuse_together(accelerator, lambda: resolve_resume(spec, output_dir, say)) \
        if resume != "latest" else None

    set_seed(spec.training.seed)
    model = refuse_together(accelerator, lambda: build_model(spec, tokenizer, vocab_size, say))
    # Compared before anything is written; for 'latest', with the newest checkpoint there now.
    checked = resume_from or (latest_checkpoint(output_dir) if resume == "latest" else None)
    if checked is not None:
        check_resume(accelerator, spec, checked, model.config, say)
    # Before prepare(), so the chunked loss and compile sit inside the forward that DDP and FSDP wrap.
    prepare_model(model, spec.training, accelerator.device,
                  sharded=accelerator.distributed_type == DistributedType.FSDP, say=say)
    optimizer = refuse_together(accelerator, lambda: build_optimizer(
        model, spec, torch.device("cuda") if torch.cuda.is_available() else None))
    max_steps = refuse_together(accelerator, lambda: plan_max_steps(spec, sources, accelerator.num_processes)) \
        if spec.training.do_train else 0
    if spec.training.do_train and spec.training.max_steps is None:  # the spec's checks could not count the steps
        refuse_together(accelerator, lambda: check_schedule(spec, max_steps))
    if spec.training.do_train and (note := warmup_note(spec, max_steps)):
        say(note)
    # Seconds, not W&B's own minutes, to find its server unreachable; a key it refuses stops the run here.
    wandb_mode = refuse_together(accelerator, lambda: tracking.plan_wandb(spec, trackers)
                                 if accelerator.is_main_process else None)
    created = refuse_together(accelerator, lambda: check_output_dir(output_dir))
    undo = functools.partial(remove_created, output_dir, created)
    refuse_together(accelerator, lambda: check_free_space(output_dir, count_parameters(model), spec, max_steps, say),
                    undo=undo)
    # Last, so that nothing is created on the Hub for a run refused here.
    hub = refuse_together(accelerator, lambda: open_model_repo(spec), undo=undo) if spec.training.push_to_hub else None
    if accelerator.is_main_process:
        remove_leftovers(output_dir)
    accelerator.wait_for_everyone()
    if resume == "latest":  # looked up once the leftovers are tidied: one may be a checkpoint put back in place
        resume_from = resolve_resume(spec, output_dir, say)
        if resume_from is not None and resume_from != checked:
            check_resume(accelerator, spec, resume_from, accelerator.unwrap_model(model).config, say)
    if resume_from is not None:
        refuse_together(accelerator, lambda: check_resumed_sources(spec, read_train_state(resume_from), sources,
                                                                   resume_from))
    scheduler = build_scheduler(optimizer, spec, max_steps)
    planned_rates = list(scheduler.base_lrs)  # this run's peaks, before a checkpoint puts back those of its run
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler stays unprepared so it steps once per optimizer step, whatever the process count; checkpoints
    # save it with the model and optimizer (save_resumable_state).

    state = TrainState()
    if resume_from is not None:
        # Whatever launch saved it: one process, DDP or FSDP, on any number of processes.
        load_resumable_state(accelerator, model, optimizer, scheduler, resume_from / "accelerate_state")
        state = read_train_state(resume_from)
        say(f"resumed from {resume_from} at step {state.step}")
        follow_this_schedule(scheduler, planned_rates, spec, max_steps, state.step, say)
        if is_branch(resume_from, output_dir):
            state.branched_from = branch_record(resume_from, state.step)
            say(f"branching from {resume_from.parent} at step {state.step}: {resume_from.parent} is only read, and "
                f"{output_dir}'s metrics start with its history up to step {state.step}")
            if accelerator.is_main_process:
                carry_history(resume_from, output_dir, state.step)
    if accelerator.is_main_process:
        truncate_metrics(output_dir / "metrics.jsonl", state.step)
        truncate_metrics(output_dir / "samples.jsonl", state.step)
    tracking.start_trackers(accelerator, spec, wandb_mode, say=say)
    # After every refusal, so a refused run writes no emissions file; each machine's tracker speaks for itself.
    energy = start_energy_meter(spec, accelerator, output_dir, state, resume_from, say=print)
    run = Run(spec, accelerator, model, optimizer, scheduler, tokenizer, output_dir, hub, state,
              tokens_per_step(spec, accelerator.num_processes), last_checkpoint=resume_from, resumed_from=resume_from,
              max_steps=max_steps, energy=energy)
    return run, sources, max_steps


def check_resume(accelerator, spec: Spec, checkpoint: Path, config, say):
    """Refuse a checkpoint this run's model cannot take; say in one line when its batch was another."""
    refuse_together(accelerator, lambda: check_resume_fits(checkpoint, config, spec.data.block_size))
    if note := batch_change_note(checkpoint, tokens_per_step(spec, accelerator.num_processes), spec,
                                 accelerator.num_processes):
        say(note)


def check_schedule(spec: Spec, max_steps: int):
    from pretrain.spec.loading import schedule_problems

    if problems := schedule_problems(spec.training, max_steps):
        raise InputError(problems[0])


def follow_this_schedule(scheduler, planned_rates: list, spec: Spec, max_steps: int, step: int, say):
    """Run the steps after a resume with this run's schedule and learning_rate, saying so when the next step's rate
    differs from what the checkpoint's run would have given it (another max_steps, decay or peak)."""
    scheduler.base_lrs = planned_rates
    if changed := align_schedule(scheduler):
        before, now = changed[0]
        say(f"note: the learning rate follows this run's schedule ({spec.training.lr_scheduler_type} over "
            f"{max_steps} steps, peak {spec.training.learning_rate:g}): step {step + 1} runs at {now:.3g} where the "
            f"checkpoint's run had {before:.3g}")


def refuse_together(accelerator, check, undo=None):
    """Run a start-up check on every process and return its result; if it fails on any, all of them stop with its
    message, each first calling `undo` (when given) to take back what it did.

    Processes may see different disks; one refusing alone would leave the others waiting forever at the next
    collective operation.
    """
    problem, result = None, None
    try:
        result = check()
    except InputError as error:
        problem = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        problem = next((p for p in gather_object([problem]) if p), None)
    if problem is not None:
        if undo is not None:
            undo()
        accelerator.end_training()
        raise InputError(problem)
    return result


def make_accelerator(spec: Spec, trackers: list[str]):
    """The Accelerator for this launch; refuses a launch that accelerate would quietly run as something else."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, parse_flag_from_env

    accelerator = Accelerator(mixed_precision=spec.extra.mixed_precision,
                              gradient_accumulation_steps=spec.training.gradient_accumulation_steps,
                              log_with=tracking.make_trackers(spec, trackers) or None,
                              fsdp_plugin=fsdp2_plugin(spec))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    problem = None
    if launched > 1 and accelerator.num_processes != launched:
        # Without a GPU and without ACCELERATE_USE_CPU, accelerate gives every process a run of its own: each
        # would train alone on its shard and all would write the same output_dir.
        problem = (f"{launched} processes were launched but each sees only itself: there is no GPU; to train on the "
                   f"CPU set ACCELERATE_USE_CPU=1 in the launcher's environment")
    elif (accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ
          and parse_flag_from_env("ACCELERATE_USE_CPU")):
        problem = ("'accelerate launch --cpu' starts a single process (several need its --mpirun_hostfile); for N "
                   "processes on the CPU run: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
                   "pre-training.py ...")
    elif parse_flag_from_env("ACCELERATE_USE_FSDP") and spec.training.optimizer == "muon":
        # torch.optim.Muon orthogonalizes whole matrices; FSDP hands each process a shard of every one.
        problem = ("training_args.optimizer 'muon' is not supported under FSDP: Muon needs each weight matrix whole "
                   "on the process that updates it; launch without the FSDP config (data parallel) or set "
                   "training_args.optimizer=adamw")
    elif parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        problem = (f"an FSDP launch config was given but accelerate runs {accelerator.distributed_type.value} here: "
                   f"accelerate shards with FSDP only on GPUs (and similar devices); on the CPU launch without the "
                   f"FSDP config")
    if problem is not None:
        accelerator.end_training()  # a process leaving with its process group alive can abort instead of exiting 2
        raise InputError(problem)
    return accelerator


def fsdp2_plugin(spec: Spec):
    """For an FSDP2 launch in bf16 or fp16: weights gathered and used in that dtype, but gradients reduced in float32
    and outputs left in the dtype they were computed in, as data parallel with autocast does. None otherwise, which
    leaves everything to accelerate and the launch config."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.extra.mixed_precision)
    if half is None or not parse_flag_from_env("ACCELERATE_USE_FSDP") or os.environ.get("FSDP_VERSION") != "2":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # accelerate's own policy reduces gradients in half precision and casts the model's outputs to it, so a loss
    # computed inside the forward (the chunked loss) would be logged with three significant digits.
    return FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy(param_dtype=half,
                                                                                      reduce_dtype=torch.float32))


def check_output_dir(output_dir: Path) -> Path | None:
    """Make output_dir and check that it can be written; return the topmost folder this made (None: it existed)."""
    import platform

    created = next((folder for folder in [*reversed(output_dir.parents), output_dir] if not folder.exists()), None)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Every process of every machine probes; on a shared folder, containers on two machines can share a pid.
        probe = output_dir / f".write-probe-{platform.node()}-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        remove_created(output_dir, created)
        raise InputError(f"cannot write to training_args.output_dir '{output_dir}' ({error.strerror}); "
                         f"choose a writable folder") from None
    return created


def remove_created(output_dir: Path, created: Path | None):
    """Remove the folders check_output_dir made, output_dir up to `created`, while they are empty; a folder that
    existed before, or that something else wrote into meanwhile, stays."""
    if created is None:
        return
    for folder in [output_dir, *output_dir.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def open_data(spec: Spec, tokenizer, vocab_size: int) -> list:
    """The run's sources: the one folder of `data_args.folder_path`, or every folder of `data_args.mixture`."""
    from pretrain.data.mixture import Source, open_sources
    from pretrain.data.tokenized_folder import open_tokenized_folder

    tokenizer_file = Path(spec.model.tokenizer_name) / "tokenizer.json"
    options = dict(block_size=spec.data.block_size, vocab_size=vocab_size,
                   tokenizer_sha256=sha256_file(tokenizer_file) if tokenizer_file.is_file() else None,
                   sanity_check=spec.data.sanity_check, need_train=spec.training.do_train,
                   need_test=spec.training.do_eval)
    if spec.data.mixture is not None:
        return open_sources(spec.data.mixture, **options)
    path = Path(spec.data.folder_path)
    return [Source(path.name, path, 1.0, *open_tokenized_folder(path, **options))]


def check_resumed_sources(spec: Spec, state: TrainState, sources: list, checkpoint: Path):
    """A resumed run must draw from the sources its checkpoint counted, or its data position means nothing."""
    drawn = len(state.source_samples) if state.source_samples else None
    wanted = len(sources) if spec.data.mixture is not None else None
    if state.samples_consumed and drawn != wanted:
        had = f"a mixture of {drawn} folders" if drawn else "one folder (data_args.folder_path)"
        has = f"a mixture of {wanted}" if wanted else "one folder"
        raise InputError(f"checkpoint '{checkpoint}' was trained on {had} but this run reads {has}; resume with the "
                         f"data_args the checkpoint was trained with, or start a new run (without "
                         f"resume_from_checkpoint) to train it on other data")


def plan_max_steps(spec: Spec, sources: list, num_processes: int) -> int:
    """Optimizer steps for the run: `max_steps`, or as many whole steps as `num_train_epochs` epochs hold (an epoch
    of a mixture: as many blocks as its train splits hold together)."""
    t = spec.training
    if t.max_steps is not None:
        return t.max_steps
    samples_per_step = t.per_device_train_batch_size * num_processes * t.gradient_accumulation_steps
    num_blocks = sum(source.train.num_blocks for source in sources)
    steps = int(t.num_train_epochs * num_blocks // samples_per_step)
    if steps < 1:
        raise InputError(f"the train split has {num_blocks} blocks, fewer than one optimizer step needs "
                         f"({samples_per_step}); lower the batch size or gradient_accumulation_steps, or set "
                         f"training_args.max_steps")
    return steps


# ----------------------------------------------------------------------------------------------------------------
# The loop

def fit(run: Run, sources: list, max_steps: int):
    import torch
    from tqdm.auto import tqdm

    from pretrain.data.batches import TrainBatches

    if max_steps:
        run.accelerator.print(f"training {count_parameters(run.accelerator.unwrap_model(run.model)):,} parameters for "
                              f"{max_steps} optimizer steps of {run.tokens_per_step:,} tokens on "
                              f"{run.accelerator.num_processes} process(es)")
        run.accelerator.print("\n".join(compute_plan.passes_lines(run_passes(run, sources, max_steps))))

    spec, accelerator, model, state = run.spec, run.accelerator, run.model, run.state
    t, e = spec.training, spec.extra
    mixture = spec.data.mixture is not None
    batches = TrainBatches([s.train for s in sources] if mixture else sources[0].train,
                           weights=[s.weight for s in sources] if mixture else None,
                           start_source_samples=(state.source_samples or None) if mixture else None,
                           micro_batch_size=t.per_device_train_batch_size,
                           process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                           seed=t.seed, start_sample=state.samples_consumed,
                           pin_memory=t.dataloader_pin_memory and torch.cuda.is_available())
    documents = document_ids(run)
    samples_per_step = t.per_device_train_batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    step_tokens = samples_per_step * spec.data.block_size
    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    unit="step", dynamic_ncols=True)
    # Losses stay on the device between logging steps: reading them is a host sync that stalls the GPU.
    window_loss = torch.tensor(state.window_loss_sum, device=accelerator.device)
    window_start, window_tokens = time.perf_counter(), 0
    grad_norm = None
    signals = StopSignals()
    run.spikes = SpikeWindow(t.spike_sigma, t.spike_window, accelerator.device, state)
    model.train()
    try:
        while state.step < max_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(t.gradient_accumulation_steps):
                input_ids = next(batches).to(accelerator.device, non_blocking=True)
                layout = document_layout(input_ids, *documents) if documents else None
                with accelerator.accumulate(model):
                    loss = causal_lm_loss(model, input_ids, layout, targets_per_process(accelerator, layout))
                    accelerator.backward(loss)
                    step_loss += loss.detach()
                    if accelerator.sync_gradients:
                        # Without clipping, an infinite threshold still returns the norm to check.
                        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
                        # Deciding whether to apply the update reads the verdict on the host: one sync per optimizer
                        # step (and one tiny all-reduce across processes, which carries the non-finite flags, the
                        # loss the spike window judges and the stop request).
                        # Measured at 30-50 us a step on the CPU; on a GPU the host waits for the backward pass
                        # before queuing the optimizer step, a bubble of a few kernel launches. Skipping on the
                        # device instead needs a fused optimizer's found_inf or a copy of the weights.
                        verdict = agree_on_step(accelerator, step_loss / t.gradient_accumulation_steps, norm,
                                                signals.received is not None, run.spikes)
                        apply_step(accelerator, run.optimizer, verdict)
            # A skipped step still consumes its batches and advances the step and the schedule; only the
            # weights and the optimizer's moments stay as they were. The rate logged is the one this step ran with.
            learning_rate = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            state.step += 1
            state.samples_consumed += samples_per_step
            if mixture:
                state.source_samples = batches.source_samples
            state.tokens_seen += step_tokens
            window_tokens += step_tokens
            progress.update(1)
            if not verdict.skipped:
                window_loss += step_loss / t.gradient_accumulation_steps
                state.window_steps += 1
                state.skipped_in_a_row = 0
                grad_norm = norm
            # Past the limits skip_step rolls back to the last checkpoint, or stops.
            elif skip_step(run, write_metrics, verdict.spike):
                window_loss.fill_(state.window_loss_sum)
                progress.n = state.step
                continue
            if (state.step % e.wandb_log_steps == 0 or state.step == max_steps) and state.window_steps:
                record = log_train_step(run, window_loss, grad_norm, learning_rate,
                                        window_tokens / (time.perf_counter() - window_start), sources)
                progress.set_postfix(telemetry.progress_postfix(record))
                window_loss.zero_()
                window_start, window_tokens = time.perf_counter(), 0
            pause_started = time.perf_counter()  # evaluation, samples and checkpoints are not training time
            evaluated = (t.do_eval and t.evaluation_strategy == "steps" and state.step % t.eval_steps == 0
                         and state.step < max_steps)
            if evaluated:
                evaluate_and_log(run, sources, f"step_{state.step}")
            if e.sample_every and state.step % e.sample_every == 0:
                sample_and_log(run)
            if evaluated and best_checkpoint.stop_early(run):
                if state.window_steps:  # the steps since the last logged line, as the last step of a run logs them
                    log_train_step(run, window_loss, grad_norm, learning_rate,
                                   window_tokens / (time.perf_counter() - window_start), sources)
                break
            # A new best is saved at its evaluation, on the checkpointing schedule or not, so that it is kept.
            new_best = evaluated and state.best_step == state.step
            if ((e.checkpointing_steps and state.step % e.checkpointing_steps == 0 or new_best)
                    and state.step < max_steps):
                # Each process sums its own losses; the checkpoint keeps their mean, which is what the next
                # logged loss averages, so every process resumes with the same, right share.
                state.window_loss_sum = float(accelerator.reduce(window_loss, reduction="mean"))
                checkpoint(run, f"step_{state.step}", f"step-{state.step}")
            if verdict.stop:
                state.window_loss_sum = float(accelerator.reduce(window_loss, reduction="mean"))
                run.energy.update(state)  # every process: the checkpoint it saves carries the totals
                stop_for_signal(run, signals)
            window_start += time.perf_counter() - pause_started
    finally:
        signals.restore()
        batches.close()
        progress.close()


def targets_per_process(accelerator, layout):
    """With documents apart, the micro-batch's targets that count, averaged over the processes. Each process divides
    its summed loss by this rather than by its own count, so the gradients the processes average are those of one
    process holding the whole global micro-batch. A device-side all-reduce: no host sync."""
    if layout is None:
        return None
    count = layout.target_mask.sum().float()
    return accelerator.reduce(count, reduction="mean") if accelerator.num_processes > 1 else count


def log_train_step(run: Run, window_loss, grad_norm, learning_rate: float, tokens_per_second: float,
                   sources: list) -> dict:
    state, accelerator = run.state, run.accelerator
    mean_loss = accelerator.reduce(window_loss.detach().clone(), reduction="mean") / max(state.window_steps, 1)
    record = {"step": state.step, "tokens_seen": state.tokens_seen, "loss": float(mean_loss),
              "learning_rate": learning_rate,
              "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "tokens_per_second": tokens_per_second,
              **throughput_telemetry(run, tokens_per_second), **run.energy.update(state),
              **source_telemetry(run, sources)}
    state.recent_losses = (state.recent_losses + [record["loss"]])[-RECENT_LOSSES:]
    state.window_steps = 0
    state.window_loss_sum = 0.0
    write_metrics(run, record)
    return record


def source_telemetry(run: Run, sources: list) -> dict:
    """For a mixture, the tokens drawn from each source and how many passes over its train split they make."""
    if run.spec.data.mixture is None:  # one folder: its passes only
        return {"passes": run.state.samples_consumed / sources[0].train.num_blocks}
    record = {}
    for source, count in zip(sources, run.state.source_samples):
        record[f"tokens_seen/{source.name}"] = count * run.spec.data.block_size
        record[f"passes/{source.name}"] = count / source.train.num_blocks
    return record


def throughput_telemetry(run: Run, tokens_per_second: float) -> dict:
    """MFU and GPU memory of the window just logged; reads host-side counters only, so adds no device sync."""
    accelerator, spec = run.accelerator, run.spec
    return telemetry.step_telemetry(accelerator.unwrap_model(run.model).config, block_size=spec.data.block_size,
                                     tokens_per_second=tokens_per_second, num_processes=accelerator.num_processes,
                                     device=accelerator.device, peak_override=spec.training.mfu_peak_tflops)


def write_metrics(run: Run, record: dict):
    if run.accelerator.is_main_process:
        with open(run.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    tracking.log(run.accelerator, {k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])


def document_ids(run: Run) -> tuple[int | None, int | None] | None:
    """(BOS, EOS) ids that delimit documents when data_args.document_attention is on; None when it is off."""
    if not run.spec.data.document_attention:
        return None
    return run.tokenizer.bos_token_id, run.tokenizer.eos_token_id


def evaluate_sources(run: Run, sources: list) -> dict:
    """Eval loss and perplexity on the test split; for a mixture, on each source's (`eval_loss/<name>`, ...) and
    over all of them, weighted by tokens."""
    batch_size, documents = run.spec.training.per_device_eval_batch_size, document_ids(run)
    results = [evaluate(run.accelerator, run.model, s.test, batch_size, documents=documents) for s in sources]
    if run.spec.data.mixture is None:
        return results[0]
    tokens = sum(r["eval_tokens"] for r in results)
    loss = sum(r["eval_loss"] * r["eval_tokens"] for r in results) / tokens
    combined = loss_result(loss, tokens)
    for source, result in zip(sources, results):
        combined.update({f"{key}/{source.name}": value for key, value in result.items()})
    return combined


def evaluate_and_log(run: Run, sources: list, checkpoint: str) -> dict:
    """Evaluate, log, and count the evaluation for the best checkpoint, whose weights `checkpoint` will hold."""
    result = evaluate_sources(run, sources)
    best_checkpoint.record_evaluation(run, result["eval_loss"], checkpoint)
    # The harness's benchmarks (extra_args.eval_tasks), in the same record; every process takes part and gets the
    # same numbers. None without tasks.
    benchmarks = benchmarks_in_training(run, gathered_model_copy)
    record = {"step": run.state.step, "tokens_seen": run.state.tokens_seen, **result,
              **(benchmarks.metrics if benchmarks else {}), **best_checkpoint.metrics_fields(run)}
    write_metrics(run, record)
    run.accelerator.print(f"step {run.state.step}: eval loss {result['eval_loss']:.4f}, "
                          f"perplexity {result['perplexity']:.2f}")
    if benchmarks is not None:
        run.accelerator.print(f"step {run.state.step} benchmarks: {benchmarks.summary()}")
        result = {**result, "benchmarks": benchmarks}  # for the model card
    run.last_evaluation = result
    return result


def sample_and_log(run: Run) -> str | None:
    """Generate from one of the prompts on the main process (None on the others), then return to training mode.

    Every process must call it: under FSDP no process holds the whole model, so all of them gather the weights
    and the main process samples from a plain copy; otherwise the main process samples from its own replica.
    """
    import contextlib

    import torch
    from accelerate.utils import DistributedType

    spec, accelerator, step = run.spec, run.accelerator, run.state.step
    if accelerator.distributed_type == DistributedType.FSDP:
        model, autocast = gathered_model_copy(run), contextlib.nullcontext()
    else:
        model = accelerator.unwrap_model(run.model) if accelerator.is_main_process else None
        autocast = accelerator.autocast()
    if model is None:
        return None
    prompt = random.Random(spec.training.seed + step).choice(spec.extra.generation_seeds)
    inputs = run.tokenizer(prompt, return_tensors="pt").to(model.device)
    model.eval()
    # A private RNG stream: sampling neither depends on nor disturbs the training's random state.
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
        torch.manual_seed(spec.training.seed + step)
        output = model.generate(**inputs, use_cache=True)
    model.train()
    text = run.tokenizer.decode(output[0], skip_special_tokens=True)
    run.samples.append([step, prompt, text])
    with open(run.output_dir / "samples.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "prompt": prompt, "text": text}, ensure_ascii=False) + "\n")
    accelerator.print(f"step {step} sample: {text!r}")
    tracking.log_sample(accelerator, run.samples, step)
    return text


def gathered_model_copy(run: Run):
    """The FSDP-sharded model as a plain copy in the main process's CPU memory; None on the other processes.

    Every process must call it (gathering the shards is a collective). Sampling from the copy keeps generation off
    the sharded model, whose every forward would be a collective that all processes must repeat in lockstep.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    accelerator = run.accelerator
    state_dict = accelerator.get_state_dict(run.model)  # full tensors on the main process's CPU, empty elsewhere
    if not accelerator.is_main_process:
        return None
    original = accelerator.unwrap_model(run.model)
    with init_empty_weights():  # no time spent initialising weights that are replaced at once
        copy = AutoModelForCausalLM.from_config(original.config)
    copy.load_state_dict(state_dict, assign=True)
    copy.tie_weights()
    copy.generation_config = original.generation_config
    return copy


# ----------------------------------------------------------------------------------------------------------------
# The end of a run: final evaluation, checkpoint, plot, push

def finish(run: Run, sources: list):
    accelerator = run.accelerator
    result = final_evaluation(run, sources) if run.spec.training.do_eval else None
    run.energy.update(run.state)

    def card_and_plot(staging: Path):  # in the folder before it is published, so it is whole with it, and pushed
        plot_losses(run.output_dir / "metrics.jsonl", run.output_dir / "loss.png")
        write_model_card(staging, run.spec, run.state, result, hardware=hardware_description(accelerator),
                         loss_plot=run.output_dir / "loss.png")

    folder = save_checkpoint(run, "final-checkpoint", write_extra=card_and_plot)
    push_checkpoint(run, folder, None)
    if run.hub is not None:
        run.hub.wait()
    run.energy.stop()
    tracking.finish_trackers(accelerator, say=accelerator.print)
    accelerator.end_training()
    if result is not None:
        accelerator.print(f"final eval loss {result['eval_loss']:.4f}, perplexity {result['perplexity']:.2f}")
    accelerator.print(f"final model: {folder}")
    accelerator.print("\n".join(plan_and_result(run, result) + best_checkpoint.summary_lines(run)))


def final_evaluation(run: Run, sources: list) -> dict:
    """The evaluation of the final checkpoint; a run stopped early has just evaluated these weights."""
    state = run.state
    if not (state.stopped_early and run.last_evaluation is not None):
        return evaluate_and_log(run, sources, "final-checkpoint")
    if state.best_step == state.step:  # its step_N was not saved: the final checkpoint holds these weights
        state.best_checkpoint, state.best_off_schedule = "final-checkpoint", False
    return run.last_evaluation


def run_passes(run: Run, sources: list, max_steps: int) -> dict:
    """The passes over each train split that the run's max_steps make."""
    return compute_plan.data_passes([s.name for s in sources], [s.train.num_blocks for s in sources],
                                    [s.weight for s in sources], run.spec.data.block_size,
                                    max_steps * run.tokens_per_step)


def plan_and_result(run: Run, result: dict | None) -> list[str]:
    """The end-of-run summary: what was planned beside what happened."""
    config = run.accelerator.unwrap_model(run.model).config
    plan = compute_plan.plan_for_config(config, run.spec.data.block_size, planned_tokens(run) or None)
    return compute_plan.result_lines(plan, run.state, result["eval_loss"] if result else None,
                                     run.energy.machines if run.energy.enabled else None)


def planned_tokens(run: Run) -> int:
    """The tokens the training planned to reach: those of the checkpoint it resumed from, which may have taken
    another number per step, then this run's steps at its own size."""
    start = read_train_state(run.resumed_from) if run.resumed_from is not None else TrainState()
    return start.tokens_seen + max(run.max_steps - start.step, 0) * run.tokens_per_step


def plot_losses(metrics_path: Path, image_path: Path):
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    train = [(r["tokens_seen"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["tokens_seen"], r["eval_loss"]) for r in records if "eval_loss" in r]

    def draw_losses(axes):
        for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
            if points:
                axes.plot(*zip(*points), style, label=label)
        axes.set_xlabel("tokens seen")
        axes.set_ylabel("cross-entropy (nats/token)")
        axes.legend()
        axes.grid(alpha=0.3)

    # Beside the losses, a panel for each benchmark metric the evaluations logged.
    plot_with_benchmarks(image_path, records, draw_losses)


def checkpoint(run: Run, name: str, branch: str | None) -> Path:
    """Save output_dir/<name>/ with the energy totals up to now (and the trackers' CSVs), then push it. Every
    process calls it."""
    run.energy.update(run.state)
    folder = save_checkpoint(run, name)
    push_checkpoint(run, folder, branch)
    return folder


def push_checkpoint(run: Run, folder: Path, branch: str | None):
    if run.hub is not None and run.accelerator.is_main_process:
        run.hub.push(folder, branch)


# ----------------------------------------------------------------------------------------------------------------
# --dry-run

def data_line(spec: Spec) -> str:
    from pretrain.data.mixture import source_names

    d = spec.data
    documents = "each document attending only to itself" if d.document_attention else "attention across documents"
    if d.mixture is None:
        return f"data: {d.folder_path}, {documents}"
    total = sum(d.mixture.values())
    shares = ", ".join(f"{name} {weight / total:.1%}"
                       for name, weight in zip(source_names(list(d.mixture)), d.mixture.values()))
    return f"data: a mixture of {len(d.mixture)} folders by tokens ({shares}), {documents}"


def print_dry_run(spec: Spec):
    """The resolved spec (secrets masked) and the plan, from the spec alone: no data read, nothing written."""
    import torch
    from transformers import AutoModelForCausalLM

    class SpecialIds:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = llama_config(spec, SpecialIds, spec.model.vocab_size)
    with torch.device("meta"):
        parameters = count_parameters(AutoModelForCausalLM.from_config(config))
    t = spec.training
    steps = (f"{t.max_steps:,} optimizer steps" if t.max_steps is not None else
             f"{t.num_train_epochs:g} epoch(s) of the train split (steps counted when the data is opened)")
    print("# resolved spec (secrets masked)")
    print(spec.to_yaml())
    for note in spec.notes:
        print(note)
    if t.max_steps is not None and (note := warmup_note(spec, t.max_steps)):
        print(note)
    print("# plan")
    print(f"parameters: {parameters:,} (vocabulary {spec.model.vocab_size:,}; the tokenizer's size is used if "
          f"it differs)")
    print(f"processes: {world_size}")
    print(f"tokens per optimizer step: {tokens_per_step(spec, world_size):,} "
          f"({t.per_device_train_batch_size} x {world_size} x {t.gradient_accumulation_steps} x "
          f"{spec.data.block_size})")
    print(f"steps: {steps}")
    print(data_line(spec))
    if t.max_steps is not None:
        print(f"tokens: {t.max_steps * tokens_per_step(spec, world_size):,}")
        print(schedule_line(spec, t.max_steps))
    print("\n".join(compute_plan.plan_lines(compute_plan.plan_for_spec(spec, world_size))))
