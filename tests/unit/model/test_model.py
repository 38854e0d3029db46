"""pretrain/model/build.py's speed settings: fused AdamW, torch.compile, TF32 and the chunked loss, each only where it
can run and only when the spec asks for it."""

import torch

from pretrain.model import build as model_module
from pretrain.model import loss
from pretrain.model import optimizer as optimizer_module
from specifications import load_spec
from tests.helpers.models import tiny_llama
from tests.helpers.runs import REPO

PLAIN = ["training_args.compile_model=false", "training_args.fused_optimizer=false",
         "training_args.cross_entropy_chunk_tokens=null"]


def test_fused_adamw_where_the_device_has_it_and_torch_default_otherwise():
    model = tiny_llama()
    fused = optimizer_module.build_optimizer(model, load_spec(REPO / "specs.yaml"), None)
    assert fused.defaults["fused"] is True and optimizer_module.fused_adamw_supported(torch.device("cpu"))
    unfused = load_spec(REPO / "specs.yaml", ["training_args.fused_optimizer=false"])
    plain = optimizer_module.build_optimizer(model, unfused, None)
    assert not plain.defaults["fused"]
    assert not optimizer_module.fused_adamw_supported(torch.device("meta"))
    meta = optimizer_module.build_optimizer(model, load_spec(REPO / "specs.yaml"), torch.device("meta"))
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


def test_prepare_model_installs_only_what_the_spec_asks():
    said = []
    spec = load_spec(REPO / "specs.yaml", ["training_args.compile_model=false"])
    model = tiny_llama()
    model_module.prepare_model(model, spec.training, torch.device("cpu"), sharded=False, say=said.append)
    assert loss.fast_loss_of(model) == loss.FastLoss(4096, None)
    assert said == ["speed: compile off, cross-entropy in chunks of 4,096 tokens, AdamW fused, TF32 off",
                    "MFU: not computed on cpu (no GPU peak to compare with)"]
    plain = load_spec(REPO / "specs.yaml", PLAIN)
    model = tiny_llama()
    model_module.prepare_model(model, plain.training, torch.device("cpu"), sharded=False, say=said.append)
    assert loss.fast_loss_of(model) is None
    assert said[-2] == "speed: compile off, cross-entropy full logits, AdamW foreach, TF32 off"
