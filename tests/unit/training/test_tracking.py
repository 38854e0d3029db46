"""pretrain/training/tracking.py: which trackers a spec asks for, W&B online or offline (decided in seconds), and
trackers that fail without stopping the run. The end-to-end runs are in tests/scripts/test_tracking_runs.py."""

import os
import socket
import time
from types import SimpleNamespace

import pytest

from pretrain.errors import InputError
from pretrain.spec.loading import load_spec
from pretrain.training import tracking
from tests.helpers.wandb_server import KEY, wandb_server


@pytest.fixture(autouse=True)
def restore_the_key(monkeypatch):
    """plan_wandb hands the key to wandb through os.environ; each test gets the environment back as it was."""
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")
    monkeypatch.delenv("WANDB_API_KEY")


def spec_with(*overrides, key=None):
    spec = load_spec(None, list(overrides), environ={})
    spec.extra.wandb_token = key
    return spec


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------- which trackers

@pytest.mark.parametrize("overrides, key, wandb_mode, names", [
    ([], None, "", []),                                          # spec files as they were: W&B needs a key...
    ([], KEY, "", ["wandb"]),
    ([], None, "offline", ["wandb"]),                            # ...or WANDB_MODE
    ([], KEY, "disabled", []),
    (["extra_args.report_to=[tensorboard]"], None, "", ["tensorboard"]),
    (["extra_args.report_to=[tensorboard, wandb]"], None, "", ["wandb", "tensorboard"]),  # named: no key needed
    (["extra_args.report_to=[tensorboard, wandb]"], KEY, "disabled", ["tensorboard"]),
    (["extra_args.report_to=[]"], KEY, "online", []),
    (["extra_args.with_tracking=false"], KEY, "online", []),
    (["extra_args.with_tracking=false", "extra_args.report_to=tensorboard"], None, "", []),
])
def test_with_tracking_and_report_to_choose_the_trackers(overrides, key, wandb_mode, names):
    assert tracking.chosen_trackers(spec_with(*overrides, key=key), {"WANDB_MODE": wandb_mode}) == names


def test_report_to_names_are_checked_with_the_spec():
    with pytest.raises(InputError, match="extra_args.report_to: 'tensorbord' is not one of wandb, tensorboard "
                                         "\\(did you mean 'tensorboard'\\?\\)"):
        spec_with("extra_args.report_to=[wandb, tensorbord]")
    spec = spec_with("extra_args.with_tracking=false", "extra_args.report_to=[tensorboard]")
    assert "note: extra_args.report_to has no effect while extra_args.with_tracking is false" in spec.notes


# ------------------------------------------------------------------------------------------- W&B online or offline

def never(*args):
    pytest.fail(f"called with {args}")


def test_wandb_is_planned_only_when_used_and_offline_without_a_key_or_by_choice():
    assert tracking.plan_wandb(spec_with(key=KEY), ["tensorboard"], {}, check=never) is None
    plan = tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_MODE": "offline"}, check=never)
    assert plan == tracking.WandbMode("offline", "WANDB_MODE=offline")
    plan = tracking.plan_wandb(spec_with(), ["wandb"], {}, check=never)
    assert plan.mode == "offline" and plan.reason.startswith("no API key")


def test_the_server_is_w_and_b_s_own_unless_wandb_base_url_names_another():
    asked = []

    def check(url, key):
        asked.append(url)
        return True, ""

    plan = tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {}, check=check)
    tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_BASE_URL": "http://wandb.local:8080/"}, check=check)
    assert plan == tracking.WandbMode("online") and asked == ["https://api.wandb.ai", "http://wandb.local:8080"]


def test_a_server_that_does_not_answer_is_found_in_seconds_and_means_offline():
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    plan = tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_BASE_URL": url})
    assert time.perf_counter() - started < tracking.PROBE_TIMEOUT_S
    assert plan == tracking.WandbMode("offline", f"{url} cannot be reached ([Errno 111] Connection refused)")
    assert os.environ["WANDB_API_KEY"] == KEY  # how the key reaches wandb: this process's environment only
    with wandb_server() as url:  # something answers, but not as W&B's server: offline too, not a refused key
        assert tracking.check_wandb_key(f"{url}/elsewhere", KEY) == (None, "HTTP 404")


def test_the_key_check_asks_the_server_as_wandb_login_does():
    with wandb_server(known_key=KEY) as url:
        assert tracking.check_wandb_key(url, KEY) == (True, "")
        assert tracking.check_wandb_key(url, "an-other-key") == (False, "user is not logged in")
        assert tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_BASE_URL": url}).mode == "online"


def test_the_key_check_goes_through_the_proxy_as_wandb_does(monkeypatch):
    with wandb_server(known_key=KEY) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert tracking.check_wandb_key("http://wandb.invalid", KEY) == (True, "")


def test_a_key_the_server_refuses_stops_the_run_without_showing_it():
    with pytest.raises(InputError) as caught:
        tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_BASE_URL": "http://w.example"},
                            check=lambda url, key: (False, f"API key {key} is not valid"))
    assert str(caught.value) == (
        "W&B at http://w.example does not accept the API key of extra_args.wandb_token or WANDB_API_KEY (API key *** "
        "is not valid); fix the key, or set WANDB_MODE=offline to log locally and upload later with wandb sync")
    with wandb_server() as url, pytest.raises(InputError, match="\\(user is not logged in\\)"):
        tracking.plan_wandb(spec_with(key=KEY), ["wandb"], {"WANDB_BASE_URL": url})


# ------------------------------------------------------------------------------------- trackers that fail

class Tracker:
    def __init__(self, name, fail_on=(), hang_on_finish=False, offline=False):
        self.name, self.fail_on, self.hang_on_finish = name, fail_on, hang_on_finish
        self.logged, self.tables, self.configs, self.finished = [], [], [], False
        self.init_kwargs = {}
        self.tracker = SimpleNamespace(offline=offline, sync_dir="/out/wandb/offline-run-1")  # the wandb Run

    def check(self, what):
        if what in self.fail_on:
            raise ConnectionError(f"{self.name} {what} failed\nsecond line")

    def start(self):
        self.check("start")
        self.writer = SimpleNamespace(add_text=lambda tag, text: self.configs.append((tag, text)))

    def store_init_configuration(self, values):
        self.configs.append(values)

    def log(self, values, step):
        self.check("log")
        self.logged.append((step, values))

    def log_table(self, name, columns, data, step):
        self.check("log")
        self.tables.append((name, columns, [list(row) for row in data], step))

    def finish(self):
        if self.hang_on_finish:
            time.sleep(60)
        self.check("finish")
        self.finished = True


def accelerator_with(*trackers, started=True):
    return SimpleNamespace(is_main_process=True, log_with=list(trackers), trackers=list(trackers) if started else [])


def test_a_tracker_that_raises_is_reported_once_and_dropped_while_the_others_log_on():
    broken, fine, said = Tracker("wandb", fail_on={"log"}), Tracker("tensorboard"), []
    accelerator = accelerator_with(broken, fine)
    for step in (1, 2, 3):
        tracking.log(accelerator, {"loss": 7.0 - step}, step, say=said.append)
    assert said == ["warning: wandb failed (wandb log failed); training goes on without it"]
    assert accelerator.trackers == [fine] and broken.logged == []
    assert fine.logged == [(1, {"loss": 6.0}), (2, {"loss": 5.0}), (3, {"loss": 4.0})]


def test_samples_go_to_a_w_and_b_table_and_to_tensorboard_s_text():
    wandb, board = Tracker("wandb"), Tracker("tensorboard")
    accelerator = accelerator_with(wandb, board)
    samples = [[2, "Era uma vez", "Era uma vez um gato"], [4, "O rio", "O rio Amazonas corre"]]
    tracking.log_sample(accelerator, samples, 4)
    assert wandb.tables == [("samples", ["step", "prompt", "text"], samples, 4)]
    assert board.logged == [(4, {"samples": "O rio Amazonas corre"})]
    board.fail_on = {"log"}
    said = []
    tracking.log_sample(accelerator, samples, 6, say=said.append)
    assert accelerator.trackers == [wandb] and said == [
        "warning: tensorboard failed (tensorboard log failed); training goes on without it"]


def test_trackers_start_with_the_masked_spec_and_one_that_cannot_start_is_left_out():
    spec = spec_with(key=KEY)
    wandb, board, said = Tracker("wandb"), Tracker("tensorboard", fail_on={"start"}), []
    accelerator = accelerator_with(wandb, board, started=False)
    tracking.start_trackers(accelerator, spec, tracking.WandbMode("online"), say=said.append)
    assert accelerator.trackers == [wandb] and wandb.init_kwargs == {"mode": "online"}
    assert wandb.configs == [spec.to_dict(mask_secrets=True)] and KEY not in str(wandb.configs)
    assert said == ["warning: tensorboard could not start (tensorboard start failed); training goes on without it"]
    board = Tracker("tensorboard")
    tracking.start_trackers(accelerator_with(board, started=False), spec, None)
    [(tag, text)] = board.configs  # TensorBoard's hparams take flat scalars: the spec goes in as indented text
    assert tag == "spec" and "    extra_args:" in text.splitlines() and KEY not in text


def test_an_offline_w_and_b_run_says_where_it_is_and_how_to_upload_it_at_the_start_and_the_end():
    wandb, said = Tracker("wandb", offline=True), []
    accelerator = accelerator_with(wandb, started=False)
    tracking.start_trackers(accelerator, spec_with(key=KEY), tracking.WandbMode("offline", "http://w cannot be "
                                                                                  "reached"), say=said.append)
    assert wandb.init_kwargs["mode"] == "offline" and wandb.init_kwargs["settings"].silent
    tracking.finish_trackers(accelerator, say=said.append)
    assert said == ["W&B: http://w cannot be reached; logging offline to /out/wandb/offline-run-1; upload it later "
                    "with: wandb sync /out/wandb/offline-run-1",
                    "W&B: logging offline to /out/wandb/offline-run-1; upload it later with: wandb sync "
                    "/out/wandb/offline-run-1"]
    assert wandb.finished


def test_closing_neither_waits_on_a_stuck_tracker_nor_fails_on_a_raising_one():
    stuck, raising, fine, said = Tracker("wandb", hang_on_finish=True), Tracker("a", {"finish"}), Tracker("b"), []
    accelerator = accelerator_with(stuck, raising, fine)
    started = time.perf_counter()
    tracking.finish_trackers(accelerator, say=said.append, timeout=0.5)
    assert time.perf_counter() - started < 5
    assert said == ["warning: wandb did not close within 0.5 s; leaving it",
                    "warning: a failed to close (a finish failed)"]  # an online W&B run says no sync line
    assert fine.finished and accelerator.trackers == []  # accelerator.end_training() has nothing left to close
