"""pretrain/evaluation/harness.py: lm-evaluation-harness benchmarks with one <s> before every document and context,
checked against transformers computing the same numbers directly and against the harness run on its own."""

import json
import math
import sys

import pytest

from tests.helpers.runs import REPO

TASKS = REPO / "tests" / "harness_tasks"
INCLUDE = "tests/harness_tasks"  # the tasks' data_files are relative to the repository root


def jsonl(name):
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    monkeypatch.chdir(REPO)


def tasks(*names, **options):
    from pretrain.evaluation.harness import resolve_tasks

    return resolve_tasks(list(names), INCLUDE, **options)


def run(model, tokenizer, names, limit=None, **options):
    from pretrain.evaluation.harness import run_benchmarks

    return run_benchmarks(model, tokenizer, tasks(*names, **options), limit=limit, batch_size=4, max_length=128)


def harness_alone(lm, names, **options):
    """simple_evaluate on an HFLM built here, the harness's own code path."""
    import lm_eval

    from pretrain.evaluation.harness import task_manager

    resolved = tasks(*names)
    return lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=task_manager(resolved.include_path,
                                                                                           resolved.defaults),
                                   bootstrap_iters=0, **options)


def token_nlls(model, sequences):
    """For each id list, the summed next-token negative log-likelihood of ids[1:] given what precedes each, in
    float64; one forward pass over them all, right-padded (a causal model never looks at the padding after)."""
    import torch

    width = max(map(len, sequences))
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in sequences])
    with torch.no_grad():
        logits = model(batch).logits[:, :-1].double()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return [float(losses[row, :len(ids) - 1].sum()) for row, ids in enumerate(sequences)]


def test_rolling_perplexity_puts_one_bos_before_each_document(model_and_tokenizer):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = model_and_tokenizer
    texts = [row["text"] for row in jsonl("tiny_pt_text.jsonl")]
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)] for text in texts]
    assert max(map(len, ids)) <= 128  # one window each: the direct sum below is the whole document
    nats = sum(token_nlls(model, ids))
    utf8_bytes = sum(len(text.encode("utf-8")) for text in texts)
    direct_bits_per_byte = nats / math.log(2) / utf8_bytes
    metrics = run(model, tokenizer, ["tiny_pt_text"]).metrics
    assert metrics["benchmark/tiny_pt_text/bits_per_byte"] == pytest.approx(direct_bits_per_byte, abs=1e-4)
    assert metrics["benchmark/tiny_pt_text/byte_perplexity"] == pytest.approx(2 ** direct_bits_per_byte, rel=1e-4)
    words = sum(len(text.split()) for text in texts)
    assert metrics["benchmark/tiny_pt_text/word_perplexity"] == pytest.approx(math.exp(nats / words), rel=1e-4)
    # The harness left to its defaults scores <s> <s> document: the extra <s> is predicted too, and counted.
    naive = harness_alone(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128), ["tiny_pt_text"])
    doubled = sum(token_nlls(model, [[tokenizer.bos_token_id, *row] for row in ids]))
    assert naive["results"]["tiny_pt_text"]["bits_per_byte,none"] == pytest.approx(
        doubled / math.log(2) / utf8_bytes, abs=1e-4)
    assert naive["results"]["tiny_pt_text"]["bits_per_byte,none"] > direct_bits_per_byte + 0.05


def test_multiple_choice_equals_the_harness_given_bos_and_a_direct_count(model_and_tokenizer):
    import numpy
    from lm_eval.models.huggingface import HFLM

    from pretrain.evaluation.harness import one_bos_lm_class

    model, tokenizer = model_and_tokenizer
    bos = tokenizer.bos_token_id
    right = plain = 0
    direct = []
    for row in jsonl("tiny_pt_choice.jsonl"):
        context = [bos, *tokenizer.encode(row["question"], add_special_tokens=False)]
        wholes = [[bos, *tokenizer.encode(f"{row['question']} {choice}", add_special_tokens=False)]
                  for choice in row["choices"]]
        assert all(whole[:len(context)] == context for whole in wholes)
        context_nll, *whole_nlls = token_nlls(model, [context, *wholes])
        scores = [context_nll - nll for nll in whole_nlls]  # log p(choice | <s> question)
        direct.append(scores)
        lengths = numpy.array([len(choice) for choice in row["choices"]], dtype=float)
        right += int(numpy.argmax(scores)) == row["answer"]
        plain += int(numpy.argmax(numpy.array(scores) / lengths)) == row["answer"]
    count = len(jsonl("tiny_pt_choice.jsonl"))
    ours = run(model, tokenizer, ["tiny_pt_choice"]).metrics
    assert ours == {"benchmark/tiny_pt_choice/acc": pytest.approx(right / count),
                    "benchmark/tiny_pt_choice/acc_norm": pytest.approx(plain / count)}
    # Each choice's loglikelihood as our HFLM scores it is the direct one.
    lm = one_bos_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128,
                            prefix_token_id=bos)
    samples = harness_alone(lm, ["tiny_pt_choice"], log_samples=True)["samples"]["tiny_pt_choice"]
    assert [[response[0] for response in sample["filtered_resps"]] for sample in samples] == \
        [[pytest.approx(score, abs=1e-4) for score in scores] for scores in direct]
    # Two-shot contexts, against the harness run on its own with add_bos_token: one <s>, before the examples.
    ours = run(model, tokenizer, ["tiny_pt_choice"], num_fewshot=2).metrics
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128, add_bos_token=True)
    alone = harness_alone(lm, ["tiny_pt_choice"], num_fewshot=2)["results"]["tiny_pt_choice"]
    assert ours == {"benchmark/tiny_pt_choice/acc": alone["acc,none"],
                    "benchmark/tiny_pt_choice/acc_norm": alone["acc_norm,none"]}


def greedy(model, tokenizer, prompt, new_tokens, stops):
    """Greedy decoding after <s> + prompt, one token at a time, cut at the first stop string."""
    import torch

    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    start = len(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if any(stop in tokenizer.decode(ids[start:]) for stop in stops):
                break
    text = tokenizer.decode(ids[start:])
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_generation_decodes_greedily_after_one_bos_whatever_the_checkpoint_samples_with(model_and_tokenizer):
    from pretrain.evaluation.harness import one_bos_lm_class

    model, tokenizer = model_and_tokenizer
    sampling = model.generation_config
    # A checkpoint keeps the settings its training samples use; the task's greedy decoding must not inherit them.
    assert sampling.do_sample and sampling.repetition_penalty != 1.0
    lm = one_bos_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=128,
                            prefix_token_id=tokenizer.bos_token_id)
    ids, mask = lm.tok_batch_encode(["Era uma vez", "a"])
    a = tokenizer.encode("a", add_special_tokens=False)
    assert ids[1].tolist()[-len(a) - 1:] == [tokenizer.bos_token_id, *a]
    assert mask[1].tolist() == [0] * (ids.shape[1] - len(a) - 1) + [1] * (len(a) + 1)
    assert ids[0, 0] == tokenizer.bos_token_id and mask[0].all()
    output = harness_alone(lm, ["tiny_pt_generate"], log_samples=True)
    generated = [sample["resps"][0][0] for sample in output["samples"]["tiny_pt_generate"]]
    prompts = [row["prompt"] for row in jsonl("tiny_pt_generate.jsonl")]
    # Three prompts per batch: some are left-padded, and must decode as they do alone.
    assert generated == [greedy(model, tokenizer, prompt, 8, ["\n", "."]) for prompt in prompts]
    assert model.generation_config is sampling


def test_results_name_every_metric_and_how_it_was_measured(model_and_tokenizer):
    from pretrain.evaluation.harness import run_benchmarks

    model, tokenizer = model_and_tokenizer
    resolved = tasks("tiny_pt_choice", "tiny_pt_text", "tiny_pt_generate", num_fewshot=1)
    assert resolved.shots == (("tiny_pt_choice", 1), ("tiny_pt_text", 1), ("tiny_pt_generate", 1))
    assert not resolved.defaults  # every task is in the folder: the harness's own were not indexed
    results = run_benchmarks(model, tokenizer, resolved, limit=3, batch_size=4, max_length=128)
    assert list(results.metrics) == [
        "benchmark/tiny_pt_choice/acc", "benchmark/tiny_pt_choice/acc_norm", "benchmark/tiny_pt_text/word_perplexity",
        "benchmark/tiny_pt_text/byte_perplexity", "benchmark/tiny_pt_text/bits_per_byte",
        "benchmark/tiny_pt_generate/exact_match"]
    assert results.tasks["tiny_pt_choice"] == {"num_fewshot": 1, "examples": 3, "total": 12, "dataset": "json",
                                               "dataset_config": None, "split": "test", "filter": "none"}
    assert results.tasks["tiny_pt_text"]["examples"] == 3 and results.tasks["tiny_pt_text"]["total"] == 8
    import lm_eval

    assert results.harness_version == lm_eval.__version__
    assert results.summary().startswith(f"tiny_pt_choice/acc {results.metrics['benchmark/tiny_pt_choice/acc']:.4f}, ")


def test_a_group_reports_its_aggregate_or_else_its_members(model_and_tokenizer, tmp_path):
    import shutil

    from pretrain.evaluation.harness import resolve_tasks, run_benchmarks

    model, tokenizer = model_and_tokenizer
    folder = tmp_path / "tasks"
    shutil.copytree(TASKS, folder)
    (folder / "group.yaml").write_text("group: tiny_pt_mean\ntask:\n  - tiny_pt_choice\naggregate_metric_list:\n"
                                       "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1.0\n")
    (folder / "plain.yaml").write_text("group: tiny_pt_plain\ntask:\n  - tiny_pt_text\nmetadata:\n  version: 1.0\n")
    resolved = resolve_tasks("tiny_pt_mean tiny_pt_plain", str(folder))
    results = run_benchmarks(model, tokenizer, resolved, limit=4, batch_size=4, max_length=128)
    alone = run(model, tokenizer, ["tiny_pt_choice", "tiny_pt_text"], limit=4).metrics
    # The group with an aggregate stands for its member; the one without is its member.
    assert results.metrics == {"benchmark/tiny_pt_mean/acc": alone["benchmark/tiny_pt_choice/acc"],
                               **{k: v for k, v in alone.items() if k.startswith("benchmark/tiny_pt_text/")}}
    assert results.tasks["tiny_pt_mean"]["dataset"] is None and results.tasks["tiny_pt_text"]["dataset"] == "json"


def test_the_model_mode_and_every_random_state_are_left_as_they_were(model_and_tokenizer):
    import random

    import numpy
    import torch

    model, tokenizer = model_and_tokenizer
    model.train()
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), numpy.random.rand(), torch.rand(1).item())
    random.seed(7), numpy.random.seed(7), torch.manual_seed(7)
    run(model, tokenizer, ["tiny_pt_choice"])
    assert (random.random(), numpy.random.rand(), torch.rand(1).item()) == expected
    assert model.training
    model.eval()


def test_names_are_split_on_commas_and_spaces_and_presets_carry_their_shots():
    from pretrain.evaluation.harness import PRESETS, split_names

    assert split_names(["a,b", "c  d,", "a"]) == ["a", "b", "c", "d"]
    assert split_names("x, y") == ["x", "y"] and split_names(None) == []
    assert PRESETS["portuguese_leaderboard"] == {"assin2_rte": 15, "assin2_sts": 15, "bluex": 3,
                                                 "enem_challenge": 3, "faquad_nli": 15, "hatebr_offensive": 25,
                                                 "oab_exams": 3}
    assert PRESETS["portuguese"] == {**PRESETS["portuguese_translated"], **PRESETS["portuguese_leaderboard"]}


def test_presets_are_the_harness_tasks_they_name_or_say_what_is_missing():
    from pretrain.errors import InputError
    from pretrain.evaluation.harness import PRESETS, resolve_tasks, task_manager

    known = set(task_manager((str(TASKS),), True).all_tasks)
    assert not set(PRESETS) & known  # a preset never hides a harness task of the same name
    assert set(PRESETS["portuguese_translated"]) <= known
    with pytest.raises(InputError) as refused:
        tasks("portuguese")
    message = str(refused.value)
    assert message == ("the preset 'portuguese' needs tasks that the installed lm-evaluation-harness lacks: bluex, "
                       "enem_challenge, faquad_nli, hatebr_offensive, oab_exams; they are defined in the Portuguese "
                       "fork https://github.com/eduagarcia/lm-evaluation-harness-pt (clone it and give its "
                       "lm_eval/tasks folder with --include-path)")
    # The message names the way its caller takes task folders.
    with pytest.raises(InputError, match="extra_args.eval_include_path"):
        resolve_tasks("portuguese_leaderboard", INCLUDE, include_option="extra_args.eval_include_path")


@pytest.mark.parametrize("names, message", [
    ("tiny_pt_choise", "unknown benchmark task 'tiny_pt_choise' (did you mean 'tiny_pt_choice'?); list the "
                       "harness's tasks with `lm_eval ls tasks`"),
    ("arc_ptt", "unknown benchmark task 'arc_ptt' (did you mean 'arc_pt'?)"),
    ("qqqqqqqq", "unknown benchmark task 'qqqqqqqq'; list the harness's tasks"),
    ("", "no benchmark task named"),
])
def test_unknown_tasks_are_refused_with_the_closest_name(names, message):
    from pretrain.errors import InputError

    with pytest.raises(InputError) as refused:
        tasks(names)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_tasks_whose_data_cannot_be_loaded_are_refused(tmp_path, monkeypatch):
    import datasets

    from pretrain.errors import InputError
    from pretrain.evaluation.harness import resolve_tasks

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "gone.yaml").write_text(
        (TASKS / "tiny_pt_text.yaml").read_text().replace("tiny_pt_text", "gone").replace(
            "tests/harness_tasks/gone.jsonl", str(tmp_path / "missing.jsonl")))
    (folder / "suite.yaml").write_text("group: my_suite\ntask:\n  - arc_pt\nmetadata:\n  version: 1.0\n")
    with pytest.raises(InputError, match="benchmark task 'gone' cannot load its data .*missing.jsonl.*; run once "
                                         "where the Hugging Face Hub can be reached"):
        resolve_tasks("gone", str(folder))
    # A group of the folder built from the harness's own tasks is looked up with those, whose data is on the Hub.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")  # nothing cached
    with pytest.raises(InputError, match=r"benchmark task 'my_suite' cannot load its data \(Couldn't reach "
                                         r"'alexandrainst/m_arc' on the Hub"):
        resolve_tasks("my_suite", str(folder))
    with pytest.raises(InputError, match="--include-path '.*nowhere' is not a folder"):
        resolve_tasks("gone", str(tmp_path / "nowhere"))


def test_without_the_harness_the_message_says_how_to_install_it(monkeypatch, tmp_path):
    from pretrain.cli.evaluate_checkpoints import main
    from pretrain.errors import InputError
    from pretrain.evaluation.harness import resolve_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    with pytest.raises(InputError) as refused:
        resolve_tasks("tiny_pt_choice")
    assert str(refused.value) == ("benchmarks need lm-evaluation-harness, which is not installed; install it: "
                                  "pip install 'lm_eval>=0.4.10,<0.5'")
    with pytest.raises(InputError, match="benchmarks need lm-evaluation-harness"):
        main([str(tmp_path), "--data", str(tmp_path), "--tasks", "tiny_pt_choice", "--output-dir",
              str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_bos_is_refused(model_and_tokenizer):
    import copy

    from pretrain.errors import InputError

    model, tokenizer = model_and_tokenizer
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    with pytest.raises(InputError, match=r"the tokenizer has no <s> \(bos_token\)"):
        run(model, no_bos, ["tiny_pt_choice"])


def test_the_spec_fields_are_checked_together():
    from specifications import SpecError, load_spec

    spec = load_spec("specs-tiny.yaml", ["extra_args.eval_tasks=tiny_pt_choice,tiny_pt_text",
                                         "extra_args.eval_task_limit=5"])
    assert (spec.extra.eval_tasks, spec.extra.eval_task_limit) == (["tiny_pt_choice,tiny_pt_text"], 5)
    with pytest.raises(SpecError, match="extra_args.eval_tasks run with the evaluations, but training_args.do_eval "
                                        "is false"):
        load_spec("specs-tiny.yaml", ["extra_args.eval_tasks=[arc_pt]", "training_args.do_eval=false"])
    with pytest.raises(SpecError, match="extra_args.eval_task_limit: must be at least 1"):
        load_spec("specs-tiny.yaml", ["extra_args.eval_tasks=[arc_pt]", "extra_args.eval_task_limit=0"])
    notes = load_spec("specs-tiny.yaml", ["extra_args.eval_include_path=tests/harness_tasks"]).notes
    assert ("note: extra_args.eval_task_limit and eval_include_path have no effect without "
            "extra_args.eval_tasks") in notes


def test_a_failure_on_the_main_process_stops_every_process(monkeypatch):
    import contextlib
    from types import SimpleNamespace

    import torch.distributed

    from pretrain.evaluation import harness

    sent = []

    def broadcast(objects, src, group):  # what the main process sends, the others receive
        assert (src, group) == (0, "waiting group")
        if sent:
            objects[0] = sent[0]
        else:
            sent.append(objects[0])

    def failing(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    monkeypatch.setattr(harness, "waiting_group", lambda: "waiting group")
    monkeypatch.setattr(harness, "run_benchmarks", failing)
    options = dict(limit=None, batch_size=1, max_length=8)
    main = SimpleNamespace(is_main_process=True, num_processes=2, autocast=contextlib.nullcontext)
    with pytest.raises(OSError, match="disk gone"):
        harness.benchmark_on_main_process(main, None, None, None, **options)
    assert sent == ["OSError: disk gone"]
    other = SimpleNamespace(is_main_process=False, num_processes=2, autocast=contextlib.nullcontext)
    with pytest.raises(RuntimeError, match=r"the benchmarks failed on the main process \(OSError: disk gone\)"):
        harness.benchmark_on_main_process(other, None, None, None, **options)


def test_a_task_scored_under_several_filters_reports_its_first_filter_only():
    from pretrain.evaluation.harness import BenchmarkResults, collect

    # As forks of the harness report a task that splits its score by exam under filters of their own.
    output = {"results": {"exam_pt": {"alias": "exam_pt", "acc,all": 0.5, "acc_stderr,all": 0.1, "acc,2010": 0.25,
                                      "acc,2011": 0.75}},
              "n-shot": {"exam_pt": 3}, "n-samples": {"exam_pt": {"effective": 8, "original": 8}},
              "configs": {"exam_pt": {"dataset_path": "exams", "test_split": "test"}}, "lm_eval_version": "0.4.x"}
    results = BenchmarkResults()
    collect(output, results)
    assert results.metrics == {"benchmark/exam_pt/acc": 0.5}
    assert results.tasks["exam_pt"]["filter"] == "all" and results.tasks["exam_pt"]["num_fewshot"] == 3
