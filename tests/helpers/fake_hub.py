"""The Hugging Face Hub, faked: HfApi calls and downloads checked against huggingface_hub's own signatures,
recorded, served from local folders, and made to fail on demand."""

import fnmatch
import inspect
import shutil
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path


@dataclass
class HubCall:
    name: str          # "whoami", "create_repo", "create_branch", "upload_folder", "snapshot_download", ...
    token: object      # the token the call carried (the HfApi's own unless the call passed one)
    arguments: dict    # the arguments as passed, by parameter name; upload_folder adds "files", the files sent


class FakeHub:
    """The Hub as the code under test sees it: HfApi calls and downloads, checked against huggingface_hub's own
    signatures and recorded; downloads are served from local folders; any call can be made to fail.

        fake_hub.repos["someone/tokenizer"] = folder       # what snapshot_download and hf_hub_download serve
        fake_hub.fail("upload_folder", ConnectionError("Hub is down"), revision="step-200")
        [call.name for call in fake_hub.calls]             # ["whoami", "create_repo", "upload_folder"]

    As in huggingface_hub, an upload with run_as_future=True returns a Future that holds its failure.
    """

    def __init__(self, cache: Path):
        import huggingface_hub

        self.cache = cache
        # Taken before the fake replaces them: every call is checked against the real signature.
        self.signatures = {name: inspect.signature(getattr(huggingface_hub.HfApi, name))
                           for name in ("__init__", "whoami", "create_repo", "create_branch", "upload_folder")}
        self.signatures.update({name: inspect.signature(getattr(huggingface_hub, name))
                                for name in ("snapshot_download", "hf_hub_download")})
        self.calls: list[HubCall] = []
        self.repos: dict[str, Path] = {}
        self.failures = []

    def fail(self, name: str, error: BaseException, **when):
        """Make the calls to `name` whose arguments include `when` raise `error`; `failures.clear()` undoes it."""
        self.failures.append((name, when, error))

    def calls_to(self, name: str) -> list[dict]:
        return [call.arguments for call in self.calls if call.name == name]

    def api(self, *args, **kwargs):
        """Stands in for the class huggingface_hub.HfApi."""
        options = self.bind("__init__", None, *args, **kwargs)
        return _FakeHfApi(self, options.get("token"))

    def snapshot_download(self, *args, **kwargs) -> str:
        arguments = self._record("snapshot_download", None, self.bind("snapshot_download", *args, **kwargs))
        source, target = self._repo(arguments["repo_id"]), self.cache / arguments["repo_id"]
        for name in _files(source, allow=arguments.get("allow_patterns")):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
        target.mkdir(parents=True, exist_ok=True)
        return str(target)

    def hf_hub_download(self, *args, **kwargs) -> str:
        arguments = self._record("hf_hub_download", None, self.bind("hf_hub_download", *args, **kwargs))
        repo_id, filename = arguments["repo_id"], arguments["filename"]
        source, target = self._repo(repo_id) / filename, self.cache / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def bind(self, name: str, *args, **kwargs) -> dict:
        """The arguments by parameter name, or the TypeError the real function would raise; `self` left out."""
        arguments = dict(self.signatures[name].bind(*args, **kwargs).arguments)
        arguments.pop("self", None)
        return arguments

    def _record(self, name: str, token, arguments: dict) -> dict:
        self.calls.append(HubCall(name, arguments.get("token") or token, arguments))
        for failing, when, error in self.failures:
            if failing == name and all(arguments.get(key) == value for key, value in when.items()):
                raise error
        return arguments

    def _repo(self, repo_id: str) -> Path:
        if repo_id not in self.repos:
            raise OSError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/api/models/"
                          f"{repo_id}")
        return Path(self.repos[repo_id])


class _FakeHfApi:
    def __init__(self, hub: FakeHub, token):
        self.hub, self.token = hub, token

    def _call(self, name: str, args, kwargs) -> dict:
        arguments = self.hub.bind(name, self, *args, **kwargs)
        return self.hub._record(name, self.token, arguments)

    def whoami(self, *args, **kwargs):
        self._call("whoami", args, kwargs)
        return {"type": "user", "name": "someone"}

    def create_repo(self, *args, **kwargs):
        arguments = self._call("create_repo", args, kwargs)
        return f"https://huggingface.co/{arguments['repo_id']}"

    def create_branch(self, *args, **kwargs):
        self._call("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        arguments = self.hub.bind("upload_folder", self, *args, **kwargs)
        arguments["files"] = _files(Path(arguments["folder_path"]), ignore=arguments.get("ignore_patterns"))
        future = Future()
        try:
            self.hub._record("upload_folder", self.token, arguments)
            future.set_result(f"https://huggingface.co/{arguments['repo_id']}/commit/0")
        except Exception as error:
            if not arguments.get("run_as_future"):
                raise
            future.set_exception(error)
        return future if arguments.get("run_as_future") else future.result()


def _files(folder: Path, allow=None, ignore=None) -> list[str]:
    """The files under `folder` (relative, sorted) that huggingface_hub's allow/ignore patterns would select."""
    allow, ignore = ([p] if isinstance(p, str) else list(p or []) for p in (allow, ignore))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [name for name in names if (not allow or any(fnmatch.fnmatch(name, p) for p in allow))
            and not any(fnmatch.fnmatch(name, p) for p in ignore)]


def _always_reachable(timeout: float = 3.0) -> bool:
    return True


def install_fake_hub(monkeypatch, cache: Path):
    """Install a FakeHub in place of huggingface_hub.HfApi, snapshot_download and hf_hub_download, and make the
    Hub reachable: pretrain.hub.hub_reachable, and each pretrain module's own name for it, return True. Returns
    (fake, undo): `undo` gives the real check back to a module first imported while the fake was in place."""
    import huggingface_hub

    from pretrain import hub

    fake = FakeHub(cache)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    real = hub.hub_reachable
    for module in _pretrain_modules_holding(real):
        monkeypatch.setattr(module, "hub_reachable", _always_reachable)

    def undo():
        for module in _pretrain_modules_holding(_always_reachable):
            module.hub_reachable = real

    return fake, undo


def _pretrain_modules_holding(function):
    return [module for name, module in list(sys.modules.items())
            if name.split(".")[0] == "pretrain" and getattr(module, "hub_reachable", None) is function]
