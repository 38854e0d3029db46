"""pretrain/model/optimizer.py's Muon: which weights it takes, the one optimizer it makes with AdamW, its state through
a save and load, the schedule over both, and the refusal on a torch without it."""
import copy

import pytest
import torch

from pretrain.errors import InputError
from pretrain.model import optimizer as optimizer_module
from specifications import load_spec
from tests.helpers.models import tiny_llama
from tests.helpers.runs import REPO

MUON = ["training_args.optimizer=muon", "training_args.warmup_steps=2", "training_args.learning_rate=0.01"]


def names_of(model, params):
    ids = {id(p) for p in params}
    return sorted(name for name, p in model.named_parameters() if id(p) in ids)


@pytest.mark.parametrize("tie", [False, True])
def test_muon_takes_the_decoder_matrices_and_adamw_the_rest_with_todays_decay_groups(tie):
    model = tiny_llama(tie=tie)
    spec = load_spec(REPO / "specs.yaml", MUON)
    optimizer = optimizer_module.build_optimizer(model, spec)
    assert isinstance(optimizer, optimizer_module.MuonWithAdamW)
    muon_groups, adamw_groups = optimizer.param_groups[:1], optimizer.param_groups[1:]
    muon_names = names_of(model, muon_groups[0]["params"])
    assert muon_names and all(".layers." in n and n.endswith("proj.weight") for n in muon_names)
    assert len(muon_names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    decay, no_decay = (names_of(model, g["params"]) for g in adamw_groups)
    assert decay == (["model.embed_tokens.weight"] if tie else ["lm_head.weight", "model.embed_tokens.weight"])
    assert no_decay and all("norm" in n for n in no_decay)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01, 0.0]
    assert muon_groups[0]["adjust_lr_fn"] == "match_rms_adamw" and adamw_groups[0]["fused"] is True
    every = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert every == {id(p) for p in model.parameters()}


def test_adamw_stays_one_plain_adamw():
    optimizer = optimizer_module.build_optimizer(tiny_llama(), load_spec(REPO / "specs.yaml"))
    assert type(optimizer) is torch.optim.AdamW


def train(model, optimizer, scheduler, steps):
    batch = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_state_saved_and_loaded_continues_exactly_and_the_schedule_sets_both_rates():
    spec = load_spec(REPO / "specs.yaml", MUON)
    model = tiny_llama()
    optimizer = optimizer_module.build_optimizer(model, spec)
    scheduler = optimizer_module.build_scheduler(optimizer, spec, 10)
    train(model, optimizer, scheduler, 3)
    muon, adamw = optimizer.inner
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == pytest.approx(0.01 * scheduler.lr_lambdas[0](3))
    assert {"momentum_buffer"} == set(optimizer.state[muon.param_groups[0]["params"][0]])
    saved = copy.deepcopy(optimizer.state_dict())
    twin = copy.deepcopy(model)
    twin_optimizer = optimizer_module.build_optimizer(twin, spec)
    twin_scheduler = optimizer_module.build_scheduler(twin_optimizer, spec, 10)
    twin_scheduler.load_state_dict(scheduler.state_dict())
    twin_optimizer.load_state_dict(saved)
    twin_muon, twin_adamw = twin_optimizer.inner
    # After a load the inner optimizers work on the loaded groups and state, not on copies left behind.
    assert twin_muon.param_groups[0] is twin_optimizer.param_groups[0] and twin_adamw.state is twin_optimizer.state
    train(model, optimizer, scheduler, 2)
    train(twin, twin_optimizer, twin_scheduler, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_a_torch_without_muon_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(InputError) as caught:
        optimizer_module.build_optimizer(tiny_llama(), load_spec(REPO / "specs.yaml", MUON))
    assert str(caught.value) == (f"training_args.optimizer 'muon' needs torch.optim.Muon (torch 2.9 or newer) and "
                                 f"this torch is {torch.__version__}; upgrade torch or set "
                                 f"training_args.optimizer=adamw")
    # AdamW needs nothing new.
    assert optimizer_module.build_optimizer(tiny_llama(), load_spec(REPO / "specs.yaml")) is not None
