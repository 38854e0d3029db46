"""pretrain/training/telemetry.py: parameter and FLOP counts against real models, GPU peaks, MFU, memory and the
progress bar."""

import pytest
import torch

from pretrain.model import build as model_module
from pretrain.training import telemetry
from specifications import load_spec
from tests.helpers.models import tiny_llama
from tests.helpers.runs import REPO

GIB = 1 << 30


def stored_parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


@pytest.mark.parametrize("spec_file, parameters", [("specs.yaml", 162_417_408), ("specs-460m.yaml", 468_239_360)])
def test_parameter_count_and_flops_per_token_of_the_shipped_specs(spec_file, parameters):
    spec = load_spec(REPO / spec_file)
    ids = type("Ids", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    config = model_module.llama_config(spec, ids, spec.model.vocab_size)
    assert telemetry.parameter_count(config) == stored_parameters(config) == parameters
    m = spec.model
    expected = 6 * parameters + 12 * m.num_hidden_layers * m.hidden_size * spec.data.block_size
    assert telemetry.flops_per_token(config, spec.data.block_size) == expected


def small_config(**options):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, **{"num_key_value_heads": 2, **options})


@pytest.mark.parametrize("options", [{}, {"attention_bias": True}, {"mlp_bias": True}, {"head_dim": 32}])
def test_parameter_count_follows_biases_and_head_dim(options):
    config = small_config(**options)
    assert telemetry.parameter_count(config) == stored_parameters(config)


def test_a_config_without_kv_heads_has_as_many_as_attention_heads():
    config = small_config(num_key_value_heads=4)
    expected = stored_parameters(config)
    config.num_key_value_heads = None
    assert telemetry.parameter_count(config) == expected


def test_tied_head_is_counted_and_unknown_configs_give_none():
    model = tiny_llama(tie=True)
    stored = sum(p.numel() for p in model.parameters())
    assert telemetry.parameter_count(model.config) == stored + 256 * 32  # the head's matmul still runs
    assert telemetry.flops_per_token(object(), 2048) is None
    assert telemetry.model_flops_utilization(1e5, None, 989.4, 1) is None
    assert telemetry.model_flops_utilization(1e5, 10 ** 9, None, 1) is None


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
    assert telemetry.peak_tflops(torch.device("cpu"), 800.0) == (800.0, "800 TFLOP/s (training_args.mfu_peak_tflops)")
    flops = 6 * 162_417_408 + 12 * 12 * 768 * 2048
    mfu = telemetry.model_flops_utilization(400_000, flops, 989.4, 1)
    assert mfu == pytest.approx(400_000 * flops / 989.4e12) and 0.48 < mfu < 0.49
    assert telemetry.model_flops_utilization(800_000, flops, 989.4, 2) == pytest.approx(mfu)


def test_gpu_memory_is_read_from_the_allocator_and_the_peak_reset_on_request(monkeypatch):
    reset = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: int(1.23456 * GIB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 41 * GIB + GIB // 4)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: reset.append(device))
    cuda = torch.device("cuda", 0)
    assert telemetry.device_memory_gib(cuda, reset_peak=False) == {"gpu_memory_gib": 1.235,
                                                                   "gpu_peak_memory_gib": 41.25}
    assert reset == []
    assert telemetry.device_memory_gib(cuda)["gpu_peak_memory_gib"] == 41.25 and reset == [cuda]
    assert telemetry.device_memory_gib(torch.device("cpu")) == {"gpu_memory_gib": None, "gpu_peak_memory_gib": None}
    assert reset == [cuda]


def test_telemetry_and_progress_bar_show_only_what_the_device_has():
    model = tiny_llama()
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
    assert "kwh" not in telemetry.progress_postfix(record)
    record.update(energy_kwh=0.012345)
    assert telemetry.progress_postfix(record)["kwh"] == "0.0123"
