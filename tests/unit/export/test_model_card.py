"""The model card: written into final-checkpoint by pre-training.py, loadable by huggingface_hub, metadata valid."""

from types import SimpleNamespace

import pytest

from tests.helpers.models import tiny_llama
from tests.helpers.runs import TEST_VOCAB_SIZE


def load(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def model_index(card):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    return model_index_to_eval_results(card.data.to_dict()["model-index"])


@pytest.fixture
def checkpoint_folder(tmp_path):
    folder = tmp_path / "final-checkpoint"
    tiny_llama(vocab_size=TEST_VOCAB_SIZE).config.save_pretrained(folder)
    return folder


def spec_with(*overrides):
    from specifications import load_spec

    return load_spec("specs-tiny.yaml", list(overrides))


def test_final_checkpoint_of_a_run_carries_a_card(tiny_checkpoint):
    card = load(tiny_checkpoint / "README.md")
    data = card.data.to_dict()
    assert {k: data[k] for k in ("language", "license", "library_name", "pipeline_tag")} == {
        "language": "pt", "license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation"}
    # The run evaluated nothing (do_eval false) and measured no energy: no results, no emissions claimed.
    assert "model-index" not in data and "co2_eq_emissions" not in data
    # specs-tiny's corpus is a local file: named in the body, not claimed as a Hub dataset.
    assert "datasets" not in data and "data/sample/pt-sample.jsonl" in card.text
    assert "- Tokens seen: 2,048 in 2 optimizer steps" in card.text
    assert "| per-device batch size |" in card.text and "CPU process(es)" in card.text
    assert "![Training and eval loss against tokens seen](loss.png)" in card.text
    assert (tiny_checkpoint / "loss.png").read_bytes() == (tiny_checkpoint.parent / "loss.png").read_bytes()


def test_card_has_results_emissions_and_hub_dataset(checkpoint_folder):
    from pretrain.export.model_card import write_model_card
    from pretrain.training.state import TrainState

    spec = spec_with("data_args.dataset_name=nicholasKluge/Pt-Corpus", "extra_args.language=en",
                     "extra_args.license=mit", "training_args.hub_model_id=me/tiny")
    state = TrainState(step=300, tokens_seen=307_200, energy_kwh=0.5, co2_kg=0.049, run_seconds=5400)
    result = {"eval_loss": 3.25, "perplexity": 25.790339917193062, "eval_tokens": 12_700}
    write_model_card(checkpoint_folder, spec, state, result, hardware="8 x NVIDIA H100 80GB HBM3")
    card = load(checkpoint_folder / "README.md")
    data = card.data.to_dict()
    assert (data["language"], data["license"], data["datasets"]) == ("en", "mit", ["nicholasKluge/Pt-Corpus"])
    assert data["co2_eq_emissions"] == {"emissions": pytest.approx(49.0), "source": "CodeCarbon",
                                        "training_type": "pre-training", "geographical_location": "BRA",
                                        "hardware_used": "8 x NVIDIA H100 80GB HBM3"}
    name, results = model_index(card)
    assert name == "TeenyTinyLlama-tiny"
    assert {r.metric_type: r.metric_value for r in results} == {"perplexity": 25.7903, "loss": 3.25}
    assert {(r.dataset_type, r.dataset_split, r.task_type) for r in results} == {
        ("nicholasKluge/Pt-Corpus", "test", "text-generation")}
    assert "- Time: 1.5 hours" in card.text and "- Energy: 0.5 kWh, 0.049 kg CO2eq" in card.text
    assert "perplexity 25.79" in card.text and 'from_pretrained("me/tiny")' in card.text
    parameters = sum(p.numel() for p in tiny_llama(vocab_size=TEST_VOCAB_SIZE).parameters())
    assert f"| parameters | {parameters:,} |" in card.text
    assert "loss.png" not in card.text and not (checkpoint_folder / "loss.png").exists()
    assert sorted(p.name for p in checkpoint_folder.iterdir()) == ["README.md", "config.json"]


def test_results_table_is_added_once_and_replaced_on_rerun(checkpoint_folder):
    from pretrain.export.model_card import add_results_table, write_model_card
    from pretrain.training.state import TrainState

    write_model_card(checkpoint_folder, spec_with(), TrainState(step=2), None, hardware="1 CPU process(es)")
    path = checkpoint_folder / "README.md"
    before = load(path).data.to_dict()
    add_results_table(path, "| checkpoint |\n|---|\n| step_2 |")
    add_results_table(path, "| checkpoint |\n|---|\n| step_4 |")
    card = load(path)
    assert card.text.count("## Evaluation of the checkpoints") == 1
    assert "| step_4 |" in card.text and "| step_2 |" not in card.text
    assert card.data.to_dict() == before
    assert card.text.startswith("# TeenyTinyLlama-tiny")


def test_a_card_that_cannot_be_read_is_refused(tmp_path):
    from pretrain.errors import InputError
    from pretrain.export.model_card import add_results_table

    with pytest.raises(InputError, match="is not a file; give the README.md of a checkpoint"):
        add_results_table(tmp_path / "README.md", "| x |")
    bad = tmp_path / "bad.md"
    bad.write_text("---\n[not: a mapping\n---\ntext\n")
    with pytest.raises(InputError, match="is not a model card"):
        add_results_table(bad, "| x |")
    assert bad.read_text() == "---\n[not: a mapping\n---\ntext\n"


def test_hardware_names_the_gpu_or_the_cpu(monkeypatch):
    import torch

    from pretrain.export.model_card import hardware_description

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware_description(SimpleNamespace(num_processes=8, device=torch.device("cuda", 0))) == \
        "8 x NVIDIA H200"
    assert hardware_description(SimpleNamespace(num_processes=2, device=torch.device("cpu"))).startswith(
        "2 CPU process(es) (")


def benchmark_results(acc=0.2941):
    from pretrain.evaluation.harness import BenchmarkResults

    return BenchmarkResults(
        metrics={"benchmark/arc_pt/acc": acc, "benchmark/arc_pt/acc_norm": 0.3125,
                 "benchmark/tiny_pt_text/bits_per_byte": 2.834096356102729},
        tasks={"arc_pt": {"num_fewshot": 25, "examples": 20, "total": 1172, "dataset": "alexandrainst/m_arc",
                          "dataset_config": "pt", "split": "test", "filter": "none"},
               "tiny_pt_text": {"num_fewshot": 0, "examples": 8, "total": 8, "dataset": "json",
                                "dataset_config": None, "split": "test", "filter": "none"}},
        harness_version="0.4.13")


def test_card_carries_the_benchmarks_in_its_model_index(checkpoint_folder):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index

    from pretrain.export.model_card import write_model_card
    from pretrain.training.state import TrainState

    result = {"eval_loss": 3.25, "perplexity": 25.79, "eval_tokens": 12_700, "benchmarks": benchmark_results()}
    write_model_card(checkpoint_folder, spec_with(), TrainState(step=300, tokens_seen=307_200), result,
                     hardware="1 CPU process(es)")
    path = checkpoint_folder / "README.md"
    card = ModelCard.load(path, ignore_metadata_errors=False)
    name, results = model_index(card)
    # What huggingface_hub reads back it writes again unchanged: the metadata is a well-formed model-index.
    assert eval_results_to_model_index(name, results) == card.data.to_dict()["model-index"]
    found = {(r.task_name, r.metric_type): r for r in results}
    assert sorted(found) == [("Causal language modeling", "loss"), ("Causal language modeling", "perplexity"),
                             ("arc_pt", "acc"), ("arc_pt", "acc_norm"), ("tiny_pt_text", "bits_per_byte")]
    arc = found["arc_pt", "acc"]
    assert (arc.metric_value, arc.metric_name, arc.dataset_type, arc.dataset_name, arc.dataset_config,
            arc.dataset_split, arc.dataset_args, arc.task_type, arc.source_name) == (
        0.2941, "acc (first 20 of 1,172 examples)", "alexandrainst/m_arc", "arc_pt", "pt", "test",
        {"num_few_shot": 25}, "text-generation", "lm-evaluation-harness")
    local = found["tiny_pt_text", "bits_per_byte"]
    # A local data file is no Hub dataset: the task names the dataset; every example was run.
    assert (local.dataset_type, local.metric_name, local.metric_value) == ("tiny_pt_text", "bits_per_byte",
                                                                           2.834096)
    assert "Benchmarks of lm-evaluation-harness 0.4.13, with one `<s>` before every document" in card.text
    assert "| arc_pt | 25 | 20 | acc | 0.2941 |" in card.text
    assert "| tiny_pt_text | 0 | 8 | bits_per_byte | 2.8341 |" in card.text


def test_updated_benchmarks_replace_the_earlier_ones(checkpoint_folder, tmp_path):
    from huggingface_hub import ModelCard

    from pretrain.export.model_card import add_results_table, write_model_card
    from pretrain.training.state import TrainState

    result = {"eval_loss": 3.25, "perplexity": 25.79, "eval_tokens": 12_700, "benchmarks": benchmark_results()}
    write_model_card(checkpoint_folder, spec_with(), TrainState(step=300), result, hardware="1 CPU process(es)")
    path = checkpoint_folder / "README.md"
    add_results_table(path, "| checkpoint |\n|---|\n| final-checkpoint |", benchmark_results(acc=0.5))
    _, results = model_index(load(path))
    values = {(r.task_name, r.metric_type): r.metric_value for r in results}
    assert len(results) == len(values) == 5
    assert values["arc_pt", "acc"] == 0.5 and values["Causal language modeling", "perplexity"] == 25.79
    # A card with no model-index of its own gets one named after its folder.
    bare = tmp_path / "bare" / "README.md"
    bare.parent.mkdir()
    ModelCard("---\nlicense: mit\n---\n# A model\n").save(bare)
    add_results_table(bare, "| checkpoint |", benchmark_results())
    name, results = model_index(load(bare))
    assert name == "bare" and len(results) == 3 and "| checkpoint |" in load(bare).text
