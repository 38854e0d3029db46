"""The FakeHub of tests/helpers/fake_hub.py in a script run as a process of its own, for tests only: on the path of
that process through PYTHONPATH (with the repository, for tests.helpers).

    FAKE_HUB_FAILURES='[["upload_folder", {"revision": "step-2"}, "Hub is down"]]' FAKE_HUB_CALLS=calls.json \
        PYTHONPATH=tests/fake_hub_process:. python pre-training.py --spec-file ... training_args.push_to_hub=true

Python imports this file at start-up (it is `sitecustomize`): it installs the fake as the fake_hub fixture does, makes
each call named in FAKE_HUB_FAILURES (name, the arguments that select it, the message) raise ConnectionError, and at
exit writes every call the script made to FAKE_HUB_CALLS as JSON (name and arguments, the token left out).
"""

import atexit
import json
import os
import tempfile
from pathlib import Path

# transformers names huggingface_hub's HfApi in its own annotations when first imported: it must see the real class.
import transformers.utils.hub  # noqa: F401

from tests.helpers.fake_hub import install_fake_hub


class _SetAttribute:
    """What install_fake_hub needs of pytest's monkeypatch: this process ends instead of undoing."""

    @staticmethod
    def setattr(target, name, value):
        setattr(target, name, value)


fake, _ = install_fake_hub(_SetAttribute, Path(tempfile.mkdtemp(prefix="fake-hub-cache-")))
for name, when, message in json.loads(os.environ.get("FAKE_HUB_FAILURES", "[]")):
    fake.fail(name, ConnectionError(message), **when)


@atexit.register
def write_calls():
    if "FAKE_HUB_CALLS" in os.environ:
        calls = [{"name": call.name, **{k: v for k, v in call.arguments.items() if k != "token"}}
                 for call in fake.calls]
        Path(os.environ["FAKE_HUB_CALLS"]).write_text(json.dumps(calls, default=str))
