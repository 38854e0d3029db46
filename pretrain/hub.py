"""The Hugging Face Hub: whether it can be reached, what counts as a local path, downloads and uploads.

Every script takes local paths as well as Hub names; a Hub name that cannot be reached fails with a message that
says to pass a local path. HF_HUB_OFFLINE=1 makes the Hub "unreachable" without touching the network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pretrain.errors import InputError, first_line

# Suffixes of local text corpora, and the format each is read as; no Hub name ends with one.
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet", ".csv": "csv"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; honours HF_HUB_OFFLINE so tests never touch the network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_local(name: str) -> bool:
    """A path that exists, or one spelled like a path (so a typo is reported as a missing path, not a Hub miss)."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or \
        Path(name).suffix.lower() in TEXT_SUFFIXES


def require_hub(what: str, name: str) -> None:
    """Stop with a clear message when `name` is not local and the Hub cannot be reached."""
    if not hub_reachable():
        raise InputError(f"{what} '{name}' is not a local path and the Hugging Face Hub cannot be reached; "
                         f"pass a local path instead")


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def check_push_access(repo_id: str, token: str | None) -> None:
    """Fail before any work when the upload at the end could not happen."""
    if not hub_reachable():
        raise InputError(f"--push-to-hub {repo_id}: the Hugging Face Hub cannot be reached; connect to it, or "
                         f"drop --push-to-hub and upload the folder later")
    from huggingface_hub import HfApi

    try:
        HfApi(token=token).whoami()
    except Exception as error:  # no token, a revoked one, a proxy page: the user needs the gist
        raise InputError(f"--push-to-hub {repo_id}: the Hub does not accept the token ({first_line(error)}); "
                         f"pass --token or set HF_TOKEN") from None


def download_tokenizer(name: str, token: str | None) -> Path:
    require_hub("tokenizer", name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=TOKENIZER_FILES, token=token))
    except Exception as error:  # unknown repo, gated, no permission
        raise InputError(f"could not download tokenizer '{name}' from the Hub ({first_line(error)}); "
                         f"check the name, or pass a local folder") from None


def upload_dataset_folder(folder: Path, repo_id: str, token: str | None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
                          commit_message="Upload tokenized dataset")
    except Exception as error:  # network, permissions, quota: the local folder is fine either way
        raise InputError(f"'{folder}' is complete, but uploading it to '{repo_id}' failed ({first_line(error)}); "
                         f"rerun the same command to retry the upload") from None
    print(f"uploaded '{folder}' to https://huggingface.co/datasets/{repo_id}")


class HubPusher:
    """Uploads checkpoints in the background. A failed upload is a warning, never the end of a training run: the
    checkpoint stays on disk, the upload is retried with the next checkpoint and at the end, and the end of the run
    says what is still not on the Hub and the command that uploads it."""

    EXCLUDE = "accelerate_state/*"  # the resumable state stays local: only the model is sent

    def __init__(self, api, repo_id: str, say=print):
        self.api, self.repo_id, self.say = api, repo_id, say
        self.pending = []   # (folder, branch, future) of the uploads under way
        self.failed = {}    # folder -> branch, for the uploads that failed and wait for a retry
        self.warned = set()  # folders already reported: a Hub that stays down is reported once per checkpoint
        self.order = {}      # folder -> when it was first pushed, for the summary

    def push(self, folder: Path, branch: str | None):
        self.order.setdefault(folder, len(self.order))
        self.collect(wait=False)
        self.retry()
        self.submit(folder, branch)

    def submit(self, folder: Path, branch: str | None):
        try:
            if branch is not None:
                self.api.create_branch(self.repo_id, branch=branch, exist_ok=True)
            future = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), revision=branch,
                                            commit_message=f"{folder.name}",
                                            ignore_patterns=[self.EXCLUDE], run_as_future=True)
            self.pending.append((folder, branch, future))
        except Exception as error:  # network and Hub errors alike must not stop training
            self.record_failure(folder, branch, error)

    def record_failure(self, folder: Path, branch: str | None, error: BaseException):
        self.failed[folder] = branch
        if folder not in self.warned:
            self.warned.add(folder)
            self.say(f"warning: could not push {folder.name} to {self.repo_id}: {first_line(error)}; it stays in "
                     f"{folder} and the upload is tried again with the next checkpoint")

    def collect(self, wait: bool):
        """Take in the uploads that have ended (all of them, waiting, when `wait`)."""
        running = []
        for folder, branch, future in self.pending:
            if not wait and not future.done():
                running.append((folder, branch, future))
                continue
            try:
                future.result()
                self.failed.pop(folder, None)
            except Exception as error:
                self.record_failure(folder, branch, error)
        self.pending = running

    def retry(self):
        for folder, branch in list(self.failed.items()):
            if not folder.is_dir():  # pruned by keep_last_checkpoints, or rolled back, before it could be sent
                del self.failed[folder]
                self.say(f"warning: {folder.name} was never pushed to {self.repo_id} and is no longer on disk")
                continue
            del self.failed[folder]
            self.submit(folder, branch)

    def wait(self):
        """At the end of the run: wait for the uploads, try the failed ones once more while the Hub answers, and
        say what is still not on the Hub, with the command that uploads each folder."""
        self.collect(wait=True)
        if self.failed and hub_reachable():
            self.retry()
            self.collect(wait=True)
        if self.failed:
            self.say("\n".join(self.not_uploaded()))

    def not_uploaded(self) -> list[str]:
        import shlex

        failed = sorted(self.failed.items(), key=lambda item: self.order.get(item[0], 0))
        names = ", ".join(f"{folder.name} (branch {branch or 'main'})" for folder, branch in failed)
        lines = [f"not uploaded to {self.repo_id}: {names}; the folders are complete on disk, upload them with:"]
        for folder, branch in failed:
            revision = f" --revision {shlex.quote(branch)}" if branch else ""
            lines.append(f"  hf upload {shlex.quote(self.repo_id)} {shlex.quote(str(folder))} .{revision} "
                         f"--exclude {shlex.quote(self.EXCLUDE)}")
        return lines


def open_model_repo(spec) -> HubPusher:
    from huggingface_hub import HfApi

    if not hub_reachable():
        raise InputError("training_args.push_to_hub is on but the Hugging Face Hub cannot be reached; "
                         "set push_to_hub: false or fix the network before training")
    if not spec.training.hub_token:
        raise InputError("training_args.push_to_hub needs a Hub token: set HF_TOKEN or training_args.hub_token")
    api = HfApi(token=spec.training.hub_token)
    try:
        api.create_repo(spec.training.hub_model_id, exist_ok=True)
    except Exception as error:
        raise InputError(f"could not create or reach Hub repository '{spec.training.hub_model_id}': "
                         f"{first_line(error)}") from None
    return HubPusher(api, spec.training.hub_model_id)
