"""pretrain/hub.py: what counts as local, whether the Hub is reachable, and every call to it, against the FakeHub of
tests/helpers/fake_hub.py (the Hub itself is never reached)."""

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain import hub
from pretrain.errors import InputError


def refused(match, function, *args):
    with pytest.raises(InputError, match=match) as caught:
        function(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ----------------------------------------------------------------------------------------- local paths and reachability

@pytest.mark.parametrize("name, local", [
    ("someone/corpus", False), ("gpt2", False), ("org/name-with.dots", False),
    ("./corpus", True), ("../corpus", True), ("/data/corpus", True), ("~/corpus", True),
    ("data/pt/corpus", True),                                   # two slashes: no Hub name has them
    ("corpus.jsonl", True), ("someone/corpus.PARQUET", True), ("notes.txt", True), ("table.csv", True),
    ("existing-folder", True),                                  # spelled like a Hub name but there
])
def test_looks_local(tmp_path, monkeypatch, name, local):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing-folder").mkdir()
    assert hub.looks_local(name) is local


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_hf_hub_offline_makes_the_hub_unreachable_without_touching_the_network(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(hub, "socket", SimpleNamespace(create_connection=pytest.fail))
    assert hub.hub_reachable() is False


def test_reachable_is_whether_the_endpoint_accepts_a_connection(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/mirror")
        assert hub.hub_reachable(timeout=5) is True
    assert hub.hub_reachable(timeout=5) is False                # closed now: the connection is refused


def test_the_endpoint_defaults_to_the_hub_on_port_443(monkeypatch):
    asked = []

    def create_connection(address, timeout):
        asked.append((address, timeout))
        raise OSError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(hub, "socket", SimpleNamespace(create_connection=create_connection))
    assert hub.hub_reachable(timeout=1.5) is False
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    assert hub.hub_reachable() is False
    assert asked == [(("huggingface.co", 443), 1.5), (("hub.example.org", 8443), 3.0)]


def test_require_hub(fake_hub, monkeypatch):
    assert hub.require_hub("dataset", "someone/corpus") is None
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    assert refused("dataset", hub.require_hub, "dataset", "someone/corpus") == (
        "dataset 'someone/corpus' is not a local path and the Hugging Face Hub cannot be reached; pass a local "
        "path instead")


def test_the_fake_hub_fixture_reaches_every_module_that_asks(fake_hub):
    from pretrain.model import build as model
    from pretrain.tokenizer import training as tokenizer_training

    assert hub.hub_reachable() and model.hub_reachable() and tokenizer_training.hub_reachable()


# -------------------------------------------------------------------------------------------------- tokenized data

def test_push_access_is_checked_with_the_token_before_any_work(fake_hub, monkeypatch):
    assert hub.check_push_access("someone/corpus", "hf_x") is None
    assert [(call.name, call.token) for call in fake_hub.calls] == [("whoami", "hf_x")]
    fake_hub.fail("whoami", RuntimeError("401 Client Error: Unauthorized\nfor url ..."))
    assert refused("token", hub.check_push_access, "someone/corpus", None) == (
        "--push-to-hub someone/corpus: the Hub does not accept the token (401 Client Error: Unauthorized); pass "
        "--token or set HF_TOKEN")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    refused("--push-to-hub someone/corpus: the Hugging Face Hub cannot be reached; connect to it, or drop "
            "--push-to-hub", hub.check_push_access, "someone/corpus", "hf_x")
    assert len(fake_hub.calls) == 2


def test_a_dataset_folder_is_uploaded_whole_or_the_failure_says_to_rerun(fake_hub, tmp_path, capsys):
    folder = tmp_path / "tokenized"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "part-00000.parquet").write_bytes(b"blocks")
    (folder / "manifest.json").write_text("{}")
    hub.upload_dataset_folder(folder, "someone/corpus", "hf_x")
    assert [call.name for call in fake_hub.calls] == ["create_repo", "upload_folder"]
    create, upload = fake_hub.calls_to("create_repo")[0], fake_hub.calls_to("upload_folder")[0]
    assert create == {"repo_id": "someone/corpus", "repo_type": "dataset", "exist_ok": True}
    assert (upload["repo_id"], upload["repo_type"], upload["folder_path"]) == ("someone/corpus", "dataset", str(folder))
    assert upload["files"] == ["manifest.json", "train/part-00000.parquet"]
    assert capsys.readouterr().out == f"uploaded '{folder}' to https://huggingface.co/datasets/someone/corpus\n"
    fake_hub.fail("upload_folder", ConnectionError("Connection reset by peer\nretry later"))
    assert refused("is complete", hub.upload_dataset_folder, folder, "someone/corpus", None) == (
        f"'{folder}' is complete, but uploading it to 'someone/corpus' failed (Connection reset by peer); rerun the "
        f"same command to retry the upload")


# -------------------------------------------------------------------------------------------------------- tokenizers

def test_a_tokenizer_is_downloaded_with_only_its_files(fake_hub, tmp_path, monkeypatch):
    source = tmp_path / "repo"
    source.mkdir()
    for name in [*hub.TOKENIZER_FILES, "model.safetensors", "README.md"]:
        (source / name).write_text(name)
    fake_hub.repos["someone/tokenizer"] = source
    folder = hub.download_tokenizer("someone/tokenizer", "hf_x")
    assert sorted(p.name for p in folder.iterdir()) == sorted(hub.TOKENIZER_FILES)
    assert (folder / "tokenizer.json").read_text() == "tokenizer.json"
    assert [(c.name, c.token, c.arguments) for c in fake_hub.calls] == [
        ("snapshot_download", "hf_x", {"repo_id": "someone/tokenizer", "allow_patterns": hub.TOKENIZER_FILES,
                                       "token": "hf_x"})]
    assert refused("someone/missing", hub.download_tokenizer, "someone/missing", None).startswith(
        "could not download tokenizer 'someone/missing' from the Hub (404 Client Error. Repository Not Found")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    refused("tokenizer 'someone/tokenizer' is not a local path and the Hugging Face Hub cannot be reached",
            hub.download_tokenizer, "someone/tokenizer", None)


# ---------------------------------------------------------------------------------------------- model repositories

def push_spec(token="hf_x", repo="me/model"):
    return SimpleNamespace(training=SimpleNamespace(hub_token=token, hub_model_id=repo))


def test_a_model_repository_is_opened_with_the_token_and_pushed_to(fake_hub, tmp_path):
    pusher = hub.open_model_repo(push_spec())
    assert isinstance(pusher, hub.HubPusher) and pusher.repo_id == "me/model"
    assert fake_hub.calls_to("create_repo") == [{"repo_id": "me/model", "exist_ok": True}]
    (tmp_path / "final-checkpoint").mkdir()
    (tmp_path / "final-checkpoint" / "config.json").write_text("{}")
    pusher.push(tmp_path / "final-checkpoint", None)
    assert len(pusher.pending) == 1
    pusher.wait()
    assert pusher.pending == [] and fake_hub.calls_to("create_branch") == []
    upload = fake_hub.calls_to("upload_folder")[0]
    assert (upload["revision"], upload["commit_message"], upload["files"]) == (None, "final-checkpoint",
                                                                             ["config.json"])
    assert upload["run_as_future"] is True and {call.token for call in fake_hub.calls} == {"hf_x"}


def test_a_model_repository_that_cannot_be_opened_is_refused_before_training(fake_hub, monkeypatch):
    assert refused("token", hub.open_model_repo, push_spec(token=None)) == (
        "training_args.push_to_hub needs a Hub token: set HF_TOKEN or training_args.hub_token")
    fake_hub.fail("create_repo", PermissionError("403 Forbidden: you cannot create repos under 'me'\nmore"))
    assert refused("me/model", hub.open_model_repo, push_spec()) == (
        "could not create or reach Hub repository 'me/model': 403 Forbidden: you cannot create repos under 'me'")
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    refused("push_to_hub is on but the Hugging Face Hub cannot be reached; set push_to_hub: false",
            hub.open_model_repo, push_spec())



def hub_api(token):
    import huggingface_hub

    return huggingface_hub.HfApi(token=token)


def checkpoint_folders(root, *names):
    for name in names:
        (root / name / "accelerate_state").mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"weights")
        (root / name / "accelerate_state" / "optimizer.bin").write_bytes(b"optimizer state")
    return [root / name for name in names]


def uploaded(fake_hub):
    return [(Path(c["folder_path"]).name, c["revision"]) for c in fake_hub.calls_to("upload_folder")]


def test_a_failed_upload_warns_once_and_is_retried_with_the_next_checkpoint(fake_hub, tmp_path):
    step_2, step_4, step_6, final = checkpoint_folders(tmp_path, "step_2", "step_4", "step_6", "final-checkpoint")
    said = []
    pusher = hub.HubPusher(hub_api("hf_x"), "me/model", say=said.append)
    fake_hub.fail("upload_folder", ConnectionError("Connection reset by peer\nmore"), revision="step-2")
    pusher.push(step_2, "step-2")
    pusher.push(step_4, "step-4")                              # finds step_2 failed, sends it again, then step_4
    assert said == [f"warning: could not push step_2 to me/model: Connection reset by peer; it stays in {step_2} "
                    f"and the upload is tried again with the next checkpoint"]
    pusher.push(step_6, "step-6")                              # fails again: no second warning
    fake_hub.failures.clear()                                  # the network is back
    pusher.push(final, None)
    pusher.wait()
    assert uploaded(fake_hub) == [("step_2", "step-2"), ("step_2", "step-2"), ("step_4", "step-4"),
                                  ("step_2", "step-2"), ("step_6", "step-6"), ("step_2", "step-2"),
                                  ("final-checkpoint", None)]
    assert len(said) == 1 and pusher.failed == {} and pusher.pending == []
    assert (step_2 / "model.safetensors").read_bytes() == b"weights"  # the local checkpoint is untouched


def test_what_is_still_not_on_the_hub_at_the_end_is_said_with_the_command_that_uploads_it(fake_hub, tmp_path):
    step_2, final = checkpoint_folders(tmp_path / "my out", "step_2", "final-checkpoint")
    said = []
    pusher = hub.HubPusher(hub_api("hf_x"), "me/model", say=said.append)
    fake_hub.fail("upload_folder", ConnectionError("Hub is down"))
    pusher.push(step_2, "step-2")
    pusher.push(final, None)
    pusher.wait()                                              # tries each once more: the Hub answers
    assert uploaded(fake_hub) == [("step_2", "step-2"), ("step_2", "step-2"), ("final-checkpoint", None),
                                  ("step_2", "step-2"), ("final-checkpoint", None)]
    assert said[-1].splitlines() == [
        "not uploaded to me/model: step_2 (branch step-2), final-checkpoint (branch main); the folders are complete "
        "on disk, upload them with:",
        f"  hf upload me/model '{step_2}' . --revision step-2 --exclude 'accelerate_state/*'",
        f"  hf upload me/model '{final}' . --exclude 'accelerate_state/*'"]
    assert "hf_x" not in "\n".join(said)


def test_the_end_does_not_retry_while_the_hub_is_unreachable_nor_a_folder_gone_from_disk(fake_hub, tmp_path,
                                                                                          monkeypatch):
    import shutil

    step_2, step_4, final = checkpoint_folders(tmp_path, "step_2", "step_4", "final-checkpoint")
    said = []
    pusher = hub.HubPusher(hub_api("hf_x"), "me/model", say=said.append)
    fake_hub.fail("create_branch", ConnectionError("Hub is down"))
    pusher.push(step_2, "step-2")
    pusher.push(step_4, "step-4")
    shutil.rmtree(step_2)                                      # pruned by keep_last_checkpoints
    pusher.push(final, None)
    assert said[-1] == "warning: step_2 was never pushed to me/model and is no longer on disk"
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    pusher.wait()
    assert [c["branch"] for c in fake_hub.calls_to("create_branch")] == ["step-2", "step-2", "step-4", "step-4"]
    assert uploaded(fake_hub) == [("final-checkpoint", None)]
    assert said[-1].splitlines()[0] == "not uploaded to me/model: step_4 (branch step-4); the folders are complete " \
                                       "on disk, upload them with:"
