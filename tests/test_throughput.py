"""Training speed: the chunked cross-entropy, compile, fused AdamW, MFU and memory telemetry, the train benchmark.

The tuned loop must train like the plain one: same losses step for step on the same data (compile included).
"""

from types import SimpleNamespace
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_MODEL, run_script

from pretrain import loss, model as model_module, telemetry
from pretrain.benchmarks import micro_batch
from specifications import load_spec

TINY = [*TINY_MODEL, "training_args.per_device_train_batch_size=4",
        "training_args.gradient_accumulation_steps=2", "training_args.learning_rate=0.005",
        "training_args.warmup_steps=2", "training_args.max_steps=6", "training_args.evaluation_strategy=no",
        "extra_args.checkpointing_steps=null", "extra_args.sample_every=6", "extra_args.wandb_log_steps=1",
        "extra_args.mixed_precision=no"]
PLAIN = ["training_args.compile_model=false", "training_args.fused_optimizer=false",
         "training_args.cross_entropy_chunk_tokens=null"]
# Two equal chunks per micro-batch of 4 x 127 predicted tokens: the chunk loop runs under compile, and equal
# shapes let the compiled kernels be shared, which keeps compiling short.
TUNED = ["training_args.compile_model=true", "training_args.fused_optimizer=true",
         "training_args.cross_entropy_chunk_tokens=254"]


def tiny_model(vocab_size=256, tie=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def token_batch(vocab_size=256, shape=(3, 40)):
    return torch.randint(4, vocab_size, shape, generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(got, expected, rtol=1e-4, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def load_pre_training():
    return SimpleNamespace(causal_lm_loss=loss.causal_lm_loss, causal_lm_token_losses=loss.causal_lm_token_losses,
                           llama_config=model_module.llama_config, build_optimizer=model_module.build_optimizer)


# ----------------------------------------------------------------------------------------------------------------
# The loss

@pytest.mark.parametrize("chunk_tokens", [None, 7, 50, 100000])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(chunk_tokens):
    model, input_ids = tiny_model(), token_batch()
    expected, expected_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    got, grads = loss_and_grads(model, lambda: loss.causal_lm_losses(model, input_ids, "mean", chunk_tokens))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, expected_grads)


def test_per_sequence_sums_keep_their_meaning():
    model, input_ids = tiny_model(), token_batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                                   reduction="none").view(3, 39).sum(dim=1)
        got = loss.causal_lm_losses(model, input_ids, "per_sequence", 16)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_a_head_that_is_not_a_plain_linear_is_called_as_a_module_per_chunk():
    class WrappedHead(torch.nn.Linear):  # what FSDP makes of a head sharded in its own unit
        calls = 0

        def forward(self, hidden):
            WrappedHead.calls += 1
            return super().forward(hidden)

    model, input_ids = tiny_model(), token_batch()
    expected, expected_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    head = WrappedHead(32, 256, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    assert loss._plain_linear_weight(head) is None
    got, grads = loss_and_grads(model, lambda: loss.causal_lm_losses(model, input_ids, "mean", 50))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, expected_grads)
    assert WrappedHead.calls == 2 * 3  # 3 chunks of the 117 tokens, each recomputed in backward
    with torch.no_grad():
        per_sequence = loss.causal_lm_losses(model, input_ids, "per_sequence", 50)
    torch.testing.assert_close(per_sequence.sum() / (3 * 39), expected, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_loss_matches_the_models_own():
    model, input_ids = tiny_model(), token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
        got, grads = loss_and_grads(model, lambda: loss.causal_lm_losses(model, input_ids, "mean", 50))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    for name in expected_grads:  # bf16 rounds the logit gradients in both, at different places
        scale = expected_grads[name].abs().max()
        assert (grads[name] - expected_grads[name]).abs().max() <= 0.02 * scale, name


def test_installed_forward_leaves_everything_else_as_it_was(tmp_path):
    import inspect

    from transformers import AutoModelForCausalLM

    model, input_ids = tiny_model(tie=True), token_batch()
    with torch.no_grad():
        logits_before = model(input_ids=input_ids).logits
    names_before = sorted(model.state_dict())
    loss.install_fast_loss(model, 50, compile_loss=False)
    assert loss.fast_loss_of(model).chunk_tokens == 50
    assert "logits_to_keep" in inspect.signature(model.forward).parameters  # generate() inspects it
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, logits_before)
        loss = model(input_ids=input_ids, token_loss="mean")
    assert loss.shape == () and math.isfinite(float(loss))
    output = model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 9)
    assert sorted(model.state_dict()) == names_before
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loss.fast_loss_of(reloaded) is None


def test_ddp_wrapped_model_reaches_the_installed_loss(tmp_path):
    import torch.distributed as dist

    pre_training = load_pre_training()
    model, input_ids = tiny_model(), token_batch()
    expected = pre_training.causal_lm_loss(model, input_ids)  # nothing installed: the plain path
    expected_sums = pre_training.causal_lm_token_losses(model, input_ids)
    loss.install_fast_loss(model, 50, compile_loss=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert loss.fast_loss_of(wrapped) is loss.fast_loss_of(model)
        loss = pre_training.causal_lm_loss(wrapped, input_ids)
        loss.backward()
        with torch.no_grad():
            sums = pre_training.causal_lm_token_losses(wrapped, input_ids)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums, expected_sums.detach(), rtol=1e-6, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, MFU, telemetry

@pytest.mark.parametrize("spec_file, parameters", [("specs.yaml", 162_417_408), ("specs-460m.yaml", 468_239_360)])
def test_parameter_count_and_flops_per_token_of_the_shipped_specs(spec_file, parameters):
    from transformers import AutoModelForCausalLM

    spec = load_spec(REPO / spec_file)
    config = load_pre_training().llama_config(spec, type("Ids", (), {"bos_token_id": 1, "eos_token_id": 2,
                                                                     "pad_token_id": 3}), spec.model.vocab_size)
    with torch.device("meta"):
        counted = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert telemetry.parameter_count(config) == counted == parameters
    m = spec.model
    expected = 6 * parameters + 12 * m.num_hidden_layers * m.hidden_size * spec.data.block_size
    assert telemetry.flops_per_token(config, spec.data.block_size) == expected


def test_tied_head_is_counted_and_unknown_configs_give_none():
    model = tiny_model(tie=True)
    stored = sum(p.numel() for p in model.parameters())
    assert telemetry.parameter_count(model.config) == stored + 256 * 32  # the head's matmul still runs
    assert telemetry.flops_per_token(object(), 2048) is None
    assert telemetry.model_flops_utilization(1e5, None, 989.4, 1) is None


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
                                        ("NVIDIA L4", 121.0), ("NVIDIA A10G", None), ("Tesla T4", None)])
def test_peak_is_looked_up_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found, source = telemetry.peak_tflops(torch.device("cuda"))
    assert found == peak
    assert (name in source) and (("set training_args.mfu_peak_tflops" in source) == (peak is None))


def test_mfu_arithmetic_override_and_cpu():
    assert telemetry.peak_tflops(torch.device("cpu")) == (None, "not computed on cpu (no GPU peak to compare "
                                                                 "with)")
    assert telemetry.peak_tflops(torch.device("cpu"), 800.0)[0] == 800.0
    flops = 6 * 162_417_408 + 12 * 12 * 768 * 2048
    mfu = telemetry.model_flops_utilization(400_000, flops, 989.4, 1)
    assert mfu == pytest.approx(400_000 * flops / 989.4e12) and 0.48 < mfu < 0.49
    assert telemetry.model_flops_utilization(800_000, flops, 989.4, 2) == pytest.approx(mfu)


def test_telemetry_and_progress_bar_show_only_what_the_device_has():
    model = tiny_model()
    fields = telemetry.step_telemetry(model.config, block_size=64, tokens_per_second=1000.0, num_processes=1,
                                       device=torch.device("cpu"), peak_override=None)
    assert fields == {"mfu": None, "gpu_memory_gib": None, "gpu_peak_memory_gib": None}
    with_peak = telemetry.step_telemetry(model.config, block_size=64, tokens_per_second=1e9, num_processes=1,
                                          device=torch.device("cpu"), peak_override=100.0)
    assert with_peak["mfu"] == round(1e9 * telemetry.flops_per_token(model.config, 64) / 100e12, 4)
    record = {"loss": 2.5, "learning_rate": 3e-4, "tokens_per_second": 123456.0, **fields}
    assert telemetry.progress_postfix(record) == {"loss": "2.5000", "lr": "3.00e-04", "tok_s": "123,456"}
    record.update(mfu=0.4312, gpu_peak_memory_gib=41.26)
    assert telemetry.progress_postfix(record)["mfu"] == "43.1%"
    assert telemetry.progress_postfix(record)["mem_gib"] == "41.3"


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, compile and TF32 switches

def test_fused_adamw_where_the_device_has_it_and_torch_default_otherwise():
    pre_training = load_pre_training()
    model = tiny_model()
    fused = pre_training.build_optimizer(model, load_spec(REPO / "specs.yaml"), None)
    assert fused.defaults["fused"] is True and model_module.fused_adamw_supported(torch.device("cpu"))
    plain = pre_training.build_optimizer(model, load_spec(REPO / "specs.yaml", ["training_args.fused_optimizer=false"]),
                                         None)
    assert not plain.defaults["fused"]
    assert not model_module.fused_adamw_supported(torch.device("meta"))
    meta = pre_training.build_optimizer(model, load_spec(REPO / "specs.yaml"), torch.device("meta"))
    assert not meta.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.01, 0.0]


def test_compile_is_skipped_where_it_cannot_run(monkeypatch):
    said = []
    assert model_module.compile_possible(torch.device("cpu"), False, said.append)
    assert not model_module.compile_possible(torch.device("cuda"), True, said.append)
    monkeypatch.setattr(model_module.shutil, "which", lambda name: None)
    assert not model_module.compile_possible(torch.device("cpu"), False, said.append)
    assert said == ["note: compile_model is not applied under FSDP here; the model runs eager",
                    "note: compile_model needs a C++ compiler on the CPU and none was found; the model runs eager"]


def test_tf32_is_left_alone_off_cuda():
    before = torch.backends.cuda.matmul.allow_tf32
    assert model_module.enable_tf32(torch.device("cpu")) is False
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_prepare_model_installs_only_what_the_spec_asks(monkeypatch):
    said = []
    spec = load_spec(REPO / "specs.yaml", ["training_args.compile_model=false"])
    model = tiny_model()
    model_module.prepare_model(model, spec.training, torch.device("cpu"), sharded=False, say=said.append)
    assert loss.fast_loss_of(model) == loss.FastLoss(4096, None)
    assert said == ["speed: compile off, cross-entropy in chunks of 4,096 tokens, AdamW fused, TF32 off",
                    "MFU: not computed on cpu (no GPU peak to compare with)"]
    plain = load_spec(REPO / "specs.yaml", PLAIN)
    model = tiny_model()
    model_module.prepare_model(model, plain.training, torch.device("cpu"), sharded=False, say=said.append)
    assert loss.fast_loss_of(model) is None
    assert said[-2] == "speed: compile off, cross-entropy full logits, AdamW foreach, TF32 off"


# ----------------------------------------------------------------------------------------------------------------
# Micro-batch guidance

def test_largest_micro_batch_doubles_until_out_of_memory():
    def trial(micro_batch):
        if micro_batch >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"peak_memory_gib": micro_batch * 4.0}

    seen = []
    assert micro_batch.find_largest_micro_batch(trial, 256, lambda m, r: seen.append((m, r["fits"]))) == 8
    assert seen == [(1, True), (2, True), (4, True), (8, True), (16, False)]
    seen.clear()
    assert micro_batch.find_largest_micro_batch(trial, 4, lambda m, r: seen.append(m)) == 4
    assert seen == [1, 2, 4]
    assert micro_batch.find_largest_micro_batch(lambda m: {"fits": False}, 64, lambda m, r: None) is None


def test_activation_estimate_grows_with_the_batch_and_chunking_saves_the_logits():
    config = tiny_model(vocab_size=2048).config
    chunked = micro_batch.activation_profile(config, 64, 64, None)
    full = micro_batch.activation_profile(config, 64, None, None)
    assert chunked["layer_bytes_per_token"] == pytest.approx(full["layer_bytes_per_token"])
    # The full loss keeps float32 log-probabilities of every token (4 bytes x 2,048); the chunked one a gradient of
    # the hidden state (4 bytes x 32).
    assert full["base_bytes_per_token"] - chunked["base_bytes_per_token"] >= 4 * 2048 - 4 * 32
    sizes = [micro_batch.estimated_memory_gib(config, chunked, block_size=64, micro_batch=m, chunk_tokens=64,
                                             mixed_precision=False) for m in (1, 2, 4)]
    assert sizes[0] < sizes[1] < sizes[2]


# ----------------------------------------------------------------------------------------------------------------
# The scripts, end to end

def train(tokenizer, data, output_dir, *overrides):
    return run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY,
                      f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                      f"training_args.output_dir={output_dir}", *overrides)


def logged(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_tuned_loop_trains_like_the_plain_loop(sample_tokenizer, sample_tokenized, tmp_path):
    from safetensors import safe_open

    plain = train(sample_tokenizer, sample_tokenized, tmp_path / "plain", *PLAIN)
    assert plain.returncode == 0, plain.stderr[-3000:]
    tuned = train(sample_tokenizer, sample_tokenized, tmp_path / "tuned", *TUNED)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "speed: compile off, cross-entropy full logits, AdamW foreach, TF32 off" in plain.stdout
    assert "speed: compile on, cross-entropy in chunks of 254 tokens, AdamW fused, TF32 off" in tuned.stdout
    assert "MFU: not computed on cpu" in tuned.stdout
    plain_log, tuned_log = logged(tmp_path / "plain"), logged(tmp_path / "tuned")
    plain_losses = {r["step"]: r["loss"] for r in plain_log if "loss" in r}
    tuned_losses = {r["step"]: r["loss"] for r in tuned_log if "loss" in r}
    assert sorted(tuned_losses) == list(range(1, 7))
    assert plain_losses[6] < plain_losses[1] - 0.2  # it learns, so agreeing is not trivial
    for step, loss in plain_losses.items():
        assert tuned_losses[step] == pytest.approx(loss, rel=1e-4), step
    plain_eval = [r["eval_loss"] for r in plain_log if "eval_loss" in r]
    tuned_eval = [r["eval_loss"] for r in tuned_log if "eval_loss" in r]
    assert len(tuned_eval) == 1 and tuned_eval == pytest.approx(plain_eval, rel=1e-4)
    for record in tuned_log:
        if "loss" in record:
            assert record["mfu"] is None and record["gpu_peak_memory_gib"] is None
            assert record["tokens_per_second"] > 0
    samples = [json.loads(line) for line in (tmp_path / "tuned" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [6] and len(samples[0]["text"]) > len(samples[0]["prompt"])
    final = tmp_path / "tuned" / "final-checkpoint"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    keys = {}
    for name in ("plain", "tuned"):
        with safe_open(tmp_path / name / "final-checkpoint" / "model.safetensors", "pt") as handle:
            keys[name] = sorted(handle.keys())
    assert keys["tuned"] == keys["plain"]


def bench_lines(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_train_benchmark_runs_both_loops_on_the_cpu():
    lines = bench_lines(run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device",
                                   "cpu", "--warmup-steps", "1", "--timed-steps", "2", "--micro-batch", "2"))
    original, ours, ratios = lines
    assert [original["variant"], ours["variant"], ratios["variant"]] == ["original", "ours", "ratios"]
    for result in (original, ours):
        assert result["device"] == "cpu" and result["micro_batch"] == 2 and result["block_size"] == 128
        assert result["tokens_per_second"] > 0 and result["mfu"] is None and result["peak_tflops"] is None
        assert result["peak_memory_gib"] > 0 and result["memory_kind"] == "process_rss_sampled"
        assert len(result["losses"]) == 3
    assert original["settings"] == {"compile_model": False, "fused_optimizer": False,
                                    "cross_entropy_chunk_tokens": None, "allow_tf32": False,
                                    "pinned_non_blocking": False}
    assert ours["settings"] == {"compile_model": False, "fused_optimizer": True, "cross_entropy_chunk_tokens": 4096,
                                "allow_tf32": False, "pinned_non_blocking": False}
    assert ratios["ours_over_original_tokens_per_second"] == pytest.approx(
        ours["tokens_per_second"] / original["tokens_per_second"], rel=1e-2)
    assert ratios["max_abs_loss_difference"] < 1e-3 and original["losses"][-1] < original["losses"][0]


def test_micro_batch_finder_estimates_on_the_cpu():
    lines = bench_lines(run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--device",
                                   "cpu", "--find-micro-batch", "--memory-gib", "0.1"))
    trials, verdict = lines[:-1], lines[-1]
    assert [t["micro_batch"] for t in trials] == [2 ** i for i in range(len(trials))]
    assert [t["fits"] for t in trials] == [True] * (len(trials) - 1) + [False]
    assert all(a["estimated_peak_gib"] < b["estimated_peak_gib"] for a, b in zip(trials, trials[1:]))
    assert trials[-2]["estimated_peak_gib"] <= 0.09 < trials[-1]["estimated_peak_gib"]
    assert verdict["largest_micro_batch"] == trials[-2]["micro_batch"] and verdict["method"].startswith("estimated")


def test_bad_benchmark_and_spec_input_exit_2():
    result = run_script("Utilities/benchmark.py", "train", "--spec-file", "specs-tiny.yaml", "--variants", "fast")
    assert result.returncode == 2 and "--variants 'fast': choose from original, ours" in result.stderr
    result = run_script("pre-training.py", "--spec-file", "specs.yaml", "--dry-run",
                        "training_args.cross_entropy_chunk_tokens=0")
    assert result.returncode == 2 and "training_args.cross_entropy_chunk_tokens: must be at least 1" in result.stderr
