"""pretrain/model/loss.py: the chunked cross-entropy equals the model's own loss and gradients, and the installed
forward changes nothing else about the model."""

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import loss
from tests.helpers.models import tiny_llama


def token_batch(vocab_size=256, shape=(3, 40)):
    return torch.randint(4, vocab_size, shape, generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    value = loss_fn()
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(got, expected, rtol=1e-4, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def own_per_sequence_sums(model, input_ids):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                           reduction="none").view(input_ids.shape[0], -1).sum(dim=1)


@pytest.mark.parametrize("chunk_tokens", [None, 7, 50, 100000])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(chunk_tokens):
    model, input_ids = tiny_llama(), token_batch()
    expected, expected_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    got, grads = loss_and_grads(model, lambda: loss.causal_lm_losses(model, input_ids, "mean", chunk_tokens))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert_same_grads(grads, expected_grads)


def test_per_sequence_sums_keep_their_meaning():
    model, input_ids = tiny_llama(), token_batch()
    with torch.no_grad():
        expected = own_per_sequence_sums(model, input_ids)
        got = loss.causal_lm_losses(model, input_ids, "per_sequence", 16)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_a_head_that_is_not_a_plain_linear_is_called_as_a_module_per_chunk():
    class WrappedHead(torch.nn.Linear):  # what FSDP makes of a head sharded in its own unit
        calls = 0

        def forward(self, hidden):
            WrappedHead.calls += 1
            return super().forward(hidden)

    model, input_ids = tiny_llama(), token_batch()
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


def test_only_a_bias_free_full_linear_head_takes_the_fused_path():
    assert loss._plain_linear_weight(torch.nn.Linear(4, 8, bias=False)) is not None
    assert loss._plain_linear_weight(torch.nn.Linear(4, 8, bias=True)) is None
    sharded = torch.nn.Linear(4, 8, bias=False)
    sharded.weight = torch.nn.Parameter(torch.zeros(4, 4))  # a shard: not the head's full shape
    assert loss._plain_linear_weight(sharded) is None


def test_per_token_losses_in_chunks_equal_the_full_logits():
    torch.manual_seed(0)
    head, hidden, targets = torch.nn.Linear(8, 20, bias=False), torch.randn(23, 8), torch.randint(0, 20, (23,))
    full = loss.head_cross_entropy(head, hidden, targets, None, per_token=True)
    assert full.shape == (23,)
    with torch.no_grad():
        torch.testing.assert_close(loss.head_cross_entropy(head, hidden, targets, 5, per_token=True), full)
        torch.testing.assert_close(loss.head_cross_entropy(head, hidden, targets, 5, per_token=False), full.sum())


def test_bf16_autocast_loss_matches_the_models_own():
    model, input_ids = tiny_llama(), token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss._compute_dtype(torch.zeros(1)) == torch.bfloat16
        expected, expected_grads = loss_and_grads(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
        got, grads = loss_and_grads(model, lambda: loss.causal_lm_losses(model, input_ids, "mean", 50))
    assert loss._compute_dtype(torch.zeros(1)) == torch.float32
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    for name in expected_grads:  # bf16 rounds the logit gradients in both, at different places
        scale = expected_grads[name].abs().max()
        assert (grads[name] - expected_grads[name]).abs().max() <= 0.02 * scale, name


def test_without_an_installed_loss_the_models_own_logits_give_it():
    model, input_ids = tiny_llama(), token_batch()
    assert loss.fast_loss_of(model) is None
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=input_ids).loss
        torch.testing.assert_close(loss.causal_lm_loss(model, input_ids), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loss.causal_lm_token_losses(model, input_ids),
                                   own_per_sequence_sums(model, input_ids))


def test_installed_forward_leaves_everything_else_as_it_was(tmp_path):
    from transformers import AutoModelForCausalLM

    model, input_ids = tiny_llama(tie=True), token_batch()
    with torch.no_grad():
        logits_before = model(input_ids=input_ids).logits
        expected = model(input_ids=input_ids, labels=input_ids).loss
    names_before = sorted(model.state_dict())
    loss.install_fast_loss(model, 50, compile_loss=False)
    assert loss.fast_loss_of(model).chunk_tokens == 50
    assert "logits_to_keep" in inspect.signature(model.forward).parameters  # generate() inspects it
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, logits_before)
        value = model(input_ids=input_ids, token_loss="mean")
    assert value.shape == () and math.isfinite(float(value))
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    output = model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 9)
    assert sorted(model.state_dict()) == names_before
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loss.fast_loss_of(reloaded) is None


def test_the_compiled_loss_runs_only_while_gradients_are_recorded(monkeypatch):
    compiled_calls = []

    def fake_compile(function, dynamic):
        assert function is loss.causal_lm_losses and dynamic is False
        return lambda *args: compiled_calls.append(args[2:4]) or function(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, input_ids = tiny_llama(), token_batch()
    loss.install_fast_loss(model, 64, compile_loss=True)
    assert loss.fast_loss_of(model).compiled is not None
    with torch.no_grad():
        loss.causal_lm_token_losses(model, input_ids)         # evaluation: the eager path
    assert compiled_calls == []
    loss.causal_lm_loss(model, input_ids).backward()
    assert compiled_calls == [("mean", 64)]


def test_installed_settings_are_found_through_wrappers():
    model = tiny_llama()
    loss.install_fast_loss(model, None, compile_loss=False)
    settings = loss.fast_loss_of(model)
    assert settings == loss.FastLoss(None, None)
    wrapper = torch.nn.Module()
    wrapper.module = torch.nn.Module()
    wrapper.module.module = model
    assert loss.fast_loss_of(wrapper) is settings
    assert loss.fast_loss_of(torch.nn.Module()) is None and loss.fast_loss_of(None) is None


def test_ddp_wrapped_model_reaches_the_installed_loss(tmp_path):
    import torch.distributed as dist

    model, input_ids = tiny_llama(), token_batch()
    expected = loss.causal_lm_loss(model, input_ids)  # nothing installed: the plain path
    expected_sums = loss.causal_lm_token_losses(model, input_ids)
    loss.install_fast_loss(model, 50, compile_loss=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert loss.fast_loss_of(wrapped) is loss.fast_loss_of(model)
        value = loss.causal_lm_loss(wrapped, input_ids)
        value.backward()
        with torch.no_grad():
            sums = loss.causal_lm_token_losses(wrapped, input_ids)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums, expected_sums.detach(), rtol=1e-6, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
