"""The trackers beside metrics.jsonl: W&B, TensorBoard, both or neither, through accelerate's trackers.

    names = chosen_trackers(spec)                          # extra_args.with_tracking and report_to, WANDB_MODE
    accelerator = Accelerator(log_with=make_trackers(spec, names) or None, ...)
    wandb_mode = plan_wandb(spec, names)                   # before anything is written: refuses a key W&B refuses
    start_trackers(accelerator, spec, wandb_mode)          # once output_dir exists
    log(accelerator, record, step); log_sample(accelerator, samples, step)
    finish_trackers(accelerator)

A node cut off from the internet still trains: when the W&B server does not answer the key check within seconds,
W&B logs offline into output_dir and the run says, in one line, the `wandb sync` command that uploads it later.
A tracker never stops a step: one whose start, logging or finish raises is reported once and dropped, and the run
goes on with the others. W&B's logging hands its records to a local service process, so logging does not wait on
the network.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from pretrain.errors import InputError, first_line
from pretrain.spec.fields import TRACKERS

WANDB_URL = "https://api.wandb.ai"
# W&B's own client retries for its init_timeout (90 s by default) when its server does not answer; the key check
# gives up after this.
PROBE_TIMEOUT_S = 5.0
# How long the end of a run waits for a tracker to close (W&B online flushes its uploads) before leaving it.
FINISH_TIMEOUT_S = 120.0


def chosen_trackers(spec, environ=None) -> list[str]:
    """The trackers this run logs to, in a fixed order.

    `with_tracking: false` turns them all off. `report_to` names them; left null, it means W&B alone, and only when
    a key is given or WANDB_MODE is set (what spec files without report_to have always done). WANDB_MODE=disabled
    drops W&B either way.
    """
    environ = os.environ if environ is None else environ
    e = spec.extra
    mode = environ.get("WANDB_MODE", "").lower()
    if not e.with_tracking:
        return []
    if e.report_to is None:
        names = ["wandb"] if e.wandb_token or mode else []
    else:
        names = [name for name in TRACKERS if name in e.report_to]
    return [name for name in names if name != "wandb" or mode != "disabled"]


@dataclass
class WandbMode:
    mode: str                     # "online" or "offline", for wandb.init
    reason: str | None = None     # why offline, for the line that gives the sync command


def plan_wandb(spec, names: list[str], environ=None, check=None) -> WandbMode | None:
    """Online or offline for W&B, decided in seconds before anything is written; None when W&B is not used.

    Online needs a key and a server that accepts it; a key the server refuses stops the run (an InputError that
    never shows the key). No key, or a server that does not answer: offline, and the run says why.
    """
    if "wandb" not in names:
        return None
    environ = os.environ if environ is None else environ
    key, mode = spec.extra.wandb_token, environ.get("WANDB_MODE", "").lower()
    if os.environ.get("WANDB_MODE") == "":  # set but empty means unset here; wandb would refuse to start on it
        del os.environ["WANDB_MODE"]
    if key:
        # wandb reads the key from the environment of this process only; it is never printed or saved.
        os.environ["WANDB_API_KEY"] = key
    if mode in {"offline", "dryrun"}:
        return WandbMode("offline", f"WANDB_MODE={mode}")
    if not key:
        return WandbMode("offline", "no API key (set WANDB_API_KEY or extra_args.wandb_token to log online)")
    url = (environ.get("WANDB_BASE_URL") or WANDB_URL).rstrip("/")
    accepted, why = (check or check_wandb_key)(url, key)
    if accepted is None:
        return WandbMode("offline", f"{url} cannot be reached ({why})")
    if not accepted:
        raise InputError(f"W&B at {url} does not accept the API key of extra_args.wandb_token or WANDB_API_KEY "
                         f"({why.replace(key, '***')}); fix the key, or set WANDB_MODE=offline to log locally "
                         f"and upload later with wandb sync")
    return WandbMode("online")


def check_wandb_key(url: str, key: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool | None, str]:
    """Ask the W&B server whose key this is, as `wandb login` does (GraphQL `viewer`, the key as the password of
    user `api`): (True, "") accepted, (False, why) refused, (None, why) no answer within `timeout` seconds.

    One request, through HTTP(S)_PROXY as wandb goes; the HTTP status tells a refused key (401, 403) from a server
    that is down or a network that answers for it.
    """
    import base64
    import http.client
    import json
    import urllib.error
    import urllib.request

    credentials = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": "query Viewer { viewer { id } }"})
                                     .encode(), headers={"Content-Type": "application/json",
                                                         "Authorization": f"Basic {credentials}"})
    try:
        with urllib.request.build_opener().open(request, timeout=timeout) as response:  # the proxies of now
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return False, graphql_error(error.read()) or f"HTTP {error.code}"
        return None, f"HTTP {error.code}"
    except (OSError, ValueError, http.client.HTTPException) as error:  # no route, refused, timed out, DNS, TLS;
        # or something that is not W&B's server answered
        return None, first_line(getattr(error, "reason", error))
    if not isinstance(answer, dict) or not (answer.get("data") or {}).get("viewer"):
        return False, graphql_error(answer) or "the server knows no user with this key"
    return True, ""


def graphql_error(body) -> str | None:
    """The first error message of a GraphQL answer (bytes or parsed), if it has one."""
    import json

    try:
        answer = json.loads(body) if isinstance(body, bytes) else body
        return first_line(answer["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def make_trackers(spec, names: list[str]) -> list:
    """accelerate's trackers for `names`; W&B's mode is set when it starts. TensorBoard writes to
    output_dir/tensorboard/."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    output_dir = spec.training.output_dir
    trackers = {"wandb": lambda: WandBTracker(spec.extra.logger_name, name=spec.model.model_id, dir=output_dir),
                "tensorboard": lambda: TensorBoardTracker("tensorboard", output_dir)}
    return [trackers[name]() for name in names]


def start_trackers(accelerator, spec, wandb_mode: WandbMode | None, say=print):
    """Start each tracker on the main process with the resolved spec (secrets masked); one that fails is dropped."""
    if not accelerator.is_main_process:
        return
    config = spec.to_dict(mask_secrets=True)
    for tracker in accelerator.log_with:
        if tracker.name == "wandb" and wandb_mode is not None:
            tracker.init_kwargs["mode"] = wandb_mode.mode
            if wandb_mode.mode == "offline":  # the run's own line says all that W&B's lines would, and rightly
                import wandb

                tracker.init_kwargs["settings"] = wandb.Settings(silent=True)
        try:
            tracker.start()
            if tracker.name == "tensorboard":  # its hparams take flat scalars only: the spec goes in as text
                import yaml

                text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
                tracker.writer.add_text("spec", "\n".join(f"    {line}" for line in text.splitlines()))
            else:
                tracker.store_init_configuration(config)
        except Exception as error:
            say(f"warning: {tracker.name} could not start ({first_line(error)}); training goes on without it")
            continue
        accelerator.trackers.append(tracker)
    if (line := offline_line(accelerator, wandb_mode.reason if wandb_mode else None)) is not None:
        say(line)


def offline_line(accelerator, reason: str | None = None) -> str | None:
    """The one line that says W&B logs offline, where, and the command that uploads it; None if it does not."""
    run = next((t.tracker for t in accelerator.trackers if t.name == "wandb"), None)
    if run is None or not run.offline:
        return None
    return (f"W&B: {reason + '; ' if reason else ''}logging offline to {run.sync_dir}; upload it later with: "
            f"wandb sync {run.sync_dir}")


def log(accelerator, values: dict, step: int, say=print):
    """Log `values` at `step` to every tracker; a tracker that raises is reported once and dropped."""
    for tracker in list(accelerator.trackers):
        try:
            tracker.log(values, step=step)
        except Exception as error:
            drop(accelerator, tracker, error, say)


def log_sample(accelerator, samples: list, step: int, say=print):
    """The samples so far: a table (step, prompt, text) in W&B, the newest text in TensorBoard's text tab."""
    for tracker in list(accelerator.trackers):
        try:
            if tracker.name == "wandb":
                tracker.log_table("samples", columns=["step", "prompt", "text"], data=samples, step=step)
            else:
                tracker.log({"samples": samples[-1][2]}, step=step)
        except Exception as error:
            drop(accelerator, tracker, error, say)


def drop(accelerator, tracker, error: BaseException, say=print):
    accelerator.trackers.remove(tracker)
    say(f"warning: {tracker.name} failed ({first_line(error)}); training goes on without it")


def finish_trackers(accelerator, say=print, timeout: float = FINISH_TIMEOUT_S):
    """Close every tracker, each given at most `timeout` seconds, and repeat the W&B sync line of an offline run.

    Leaves accelerator.trackers empty, so accelerator.end_training() closes nothing twice."""
    line = offline_line(accelerator)
    for tracker in list(accelerator.trackers):
        accelerator.trackers.remove(tracker)
        failure = []

        def close(tracker=tracker, failure=failure):
            try:
                tracker.finish()
            except Exception as error:
                failure.append(error)

        # A daemon thread: a tracker stuck on a dead network cannot hold the end of the run.
        closing = threading.Thread(target=close, daemon=True)
        closing.start()
        closing.join(timeout)
        if closing.is_alive():
            say(f"warning: {tracker.name} did not close within {timeout:g} s; leaving it")
        elif failure:
            say(f"warning: {tracker.name} failed to close ({first_line(failure[0])})")
    if line is not None:
        say(line)
