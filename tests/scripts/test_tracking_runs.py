"""pre-training.py end to end with its trackers and the Hub when the network is not there: W&B falls back to offline
in seconds, a key W&B refuses stops the run before it writes anything, TensorBoard's event files hold what
metrics.jsonl holds, and a Hub upload failing mid-run is retried and reported while training goes on."""

import json
import os
import socket
import time

import pytest

from tests.helpers.runs import REPO, TINY_MODEL, run_script
from tests.helpers.wandb_server import KEY, wandb_server

STEPS = ["training_args.max_steps=5", "training_args.warmup_steps=0", "training_args.per_device_train_batch_size=4",
         "extra_args.wandb_log_steps=1", "extra_args.sample_every=2", "extra_args.checkpointing_steps=null"]


def train(tokenizer, data, output_dir, *overrides, env=None):
    started = time.perf_counter()
    result = run_script("pre-training.py", "--spec-file", "specs-tiny.yaml", *TINY_MODEL, *STEPS,
                        f"model_args.tokenizer_name={tokenizer}", f"data_args.folder_path={data}",
                        f"training_args.output_dir={output_dir}", *overrides, env=env)
    return result, time.perf_counter() - started


def records(output_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (output_dir / name).read_text().splitlines()]


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


# ------------------------------------------------------------------------------------------------------------- W&B

def test_with_a_key_and_no_network_the_run_logs_offline_and_says_how_to_sync(sample_tokenizer, sample_tokenized,
                                                                               tmp_path):
    baseline, baseline_s = train(sample_tokenizer, sample_tokenized, tmp_path / "plain")
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    # WANDB_MODE empty is WANDB_MODE unset: W&B online is asked for, with a key, of a server that refuses connections.
    offline_env = {"WANDB_MODE": "", "WANDB_API_KEY": KEY, "WANDB_BASE_URL": closed_port_url()}
    result, offline_s = train(sample_tokenizer, sample_tokenized, tmp_path / "out", env=offline_env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    [run] = (out / "wandb").glob("offline-run-*")
    line = (f"W&B: {offline_env['WANDB_BASE_URL']} cannot be reached ([Errno 111] Connection refused); logging "
            f"offline to {run}; upload it later with: wandb sync {run}")
    assert result.stdout.splitlines().count(line) == 1
    assert f"W&B: logging offline to {run}; upload it later with: wandb sync {run}" in result.stdout  # at the end
    assert "wandb:" not in result.stdout + result.stderr  # W&B's own lines would tell to go online
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5]
    assert list(run.glob("*.wandb")) and (out / "final-checkpoint" / "model.safetensors").is_file()
    # W&B's own client waits 90 s for a server that is not there; the probe gives up in seconds.
    assert offline_s < baseline_s + 30, (offline_s, baseline_s)
    assert KEY not in result.stdout + result.stderr
    for path in out.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_a_key_the_w_and_b_server_refuses_stops_the_run_before_anything_is_written(sample_tokenizer,
                                                                                    sample_tokenized, tmp_path):
    out = tmp_path / "out"
    with wandb_server() as url:
        result, _ = train(sample_tokenizer, sample_tokenized, out,
                          env={"WANDB_MODE": "", "WANDB_API_KEY": KEY, "WANDB_BASE_URL": url})
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: W&B at {url} does not accept the API key of extra_args.wandb_token or WANDB_API_KEY "
        f"(user is not logged in); fix the key, or set WANDB_MODE=offline to log locally and upload later with "
        f"wandb sync")
    assert KEY not in result.stdout + result.stderr and not out.exists()


# ----------------------------------------------------------------------------------------------------- TensorBoard

def test_tensorboard_event_files_hold_the_scalars_of_metrics_jsonl_and_the_samples(sample_tokenizer,
                                                                                   sample_tokenized, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    result, _ = train(sample_tokenizer, sample_tokenized, out, "extra_args.report_to=[tensorboard]",
                      env={"WANDB_API_KEY": KEY, "WANDB_MODE": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "wandb").exists()  # a key alone does not add W&B to report_to's list
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = records(out)
    names = {key for record in logged for key, value in record.items() if key != "step" and value is not None}
    assert {"loss", "learning_rate", "grad_norm", "eval_loss", "perplexity"} <= names
    assert set(events.Tags()["scalars"]) == names
    for name in names:
        expected = [(r["step"], r[name]) for r in logged if r.get(name) is not None]
        got = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in got] == [step for step, _ in expected], name
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), name
    # The samples in the text tab, step by step as in samples.jsonl, and the resolved spec with its secrets masked.
    samples = {event.step: event.tensor_proto.string_val[0].decode()
               for event in events.Tensors("samples/text_summary")}
    assert samples == {r["step"]: r["text"] for r in records(out, "samples.jsonl")} and sorted(samples) == [2, 4]
    [spec] = events.Tensors("spec/text_summary")
    assert "report_to:" in spec.tensor_proto.string_val[0].decode()
    for path in out.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------------------------------------------------- Hub

def test_a_hub_upload_failing_mid_run_is_retried_and_reported_while_training_goes_on(sample_tokenizer,
                                                                                    sample_tokenized, tmp_path):
    out, calls = tmp_path / "out", tmp_path / "calls.json"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fake_hub_process"), str(REPO)]),
           "FAKE_HUB_FAILURES": json.dumps([["upload_folder", {"revision": "step-2"}, "Connection reset by peer"]]),
           "FAKE_HUB_CALLS": str(calls), "HF_TOKEN": "hf_fake_token_1234"}
    result, _ = train(sample_tokenizer, sample_tokenized, out, "extra_args.checkpointing_steps=2",
                      "training_args.push_to_hub=true", "training_args.hub_model_id=me/tiny", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5]  # training went on
    assert (out / "step_2" / "model.safetensors").is_file()                       # the checkpoint is kept
    uploads = [(call["folder_path"].rsplit("/", 1)[-1], call["revision"]) for call in json.loads(calls.read_text())
               if call["name"] == "upload_folder"]
    # Sent at step 2, again with step 4's checkpoint, with the final one, and once more at the end.
    assert uploads == [("step_2", "step-2"), ("step_2", "step-2"), ("step_4", "step-4"), ("step_2", "step-2"),
                       ("final-checkpoint", None), ("step_2", "step-2")]
    lines = result.stdout.splitlines()
    assert lines.count(f"warning: could not push step_2 to me/tiny: Connection reset by peer; it stays in "
                       f"{out / 'step_2'} and the upload is tried again with the next checkpoint") == 1
    at = lines.index("not uploaded to me/tiny: step_2 (branch step-2); the folders are complete on disk, upload "
                     "them with:")
    assert lines[at + 1] == f"  hf upload me/tiny {out / 'step_2'} . --revision step-2 --exclude 'accelerate_state/*'"
    assert "hf_fake_token_1234" not in result.stdout + result.stderr
